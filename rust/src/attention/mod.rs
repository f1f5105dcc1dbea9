//! Decode attention over compressed pages (CPU reference kernels).
//!
//! [`pq_attention`] computes softmax attention of a few query tokens over a history stored as PQ
//! codes (keys and values) plus a full-precision part (attention sinks and the recent window),
//! without decompressing the codes:
//!
//! * 4-bit codes on AVX-512 (module `avx512`): one dimension's 16 centroid values are one
//!   register, so one `vpermps` decodes a dimension for 16 tokens and every query of the group
//!   consumes it with one FMA, for key scores (query weights broadcast) and for values (softmax
//!   weights); exact float arithmetic at the FMA rate;
//! * otherwise key scores come from per-query lookup tables (`q . c` for every centroid,
//!   scaled), summed over the code bytes of each token (on AVX2, 4-bit codes by `pshufb` over
//!   24-bit tables; else 4-bit tables folded pairwise into 256-entry byte tables);
//! * values: with 4-bit codes on AVX2, each output dimension is `sum_i p_i * T[code_i]` over a
//!   16-entry float table, eight tokens per two `vpermps` (module `values`); otherwise the softmax
//!   weights are summed per codeword in a histogram (one vector add per code byte for up to 8
//!   queries) multiplied with the value codebook once at the end (MILLION);
//! * the history is split into chunks processed in parallel, each with its own running max and
//!   sum (online softmax), and chunks plus the full-precision part are merged by log-sum-exp
//!   (flash-decoding's split-K).
//!
//! Query heads are grouped by KV head (GQA): the code tokens of a KV head are read once per block
//! for all query heads of its group. The result equals softmax attention over
//! `[decode(codes); fp]` up to float rounding.

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
mod cpu;
mod values;

pub(crate) use cpu::group_max;
pub use cpu::{
    check_heads, exp_neg, page_bounds_quantized, page_scores, page_scores_quantized,
    paged_attention, pq_attention, pq_attention_paged, pq_attention_selected, CodePages, Pages,
    PqAttention, Resident,
};
