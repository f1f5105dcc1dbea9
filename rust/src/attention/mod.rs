//! Decode attention over compressed pages (CPU reference kernels).
//!
//! [`pq_attention`] computes softmax attention of a few query tokens over a history stored as PQ
//! codes (keys and values) plus a full-precision part (attention sinks and the recent window),
//! without decompressing the codes:
//!
//! * key scores come from per-query lookup tables (`q . c` for every centroid, scaled), summed
//!   over the code bytes of each token (4-bit tables folded pairwise into 256-entry byte tables);
//! * values are accumulated per codeword: a softmax weight is added to a histogram cell per code
//!   byte, and the histogram is multiplied with the value codebook once at the end (MILLION);
//! * the history is split into chunks processed in parallel, each with its own running max and
//!   sum (online softmax), and chunks plus the full-precision part are merged by log-sum-exp
//!   (flash-decoding's split-K).
//!
//! Query heads are grouped by KV head (GQA): the code tokens of a KV head are read once per block
//! for all query heads of its group. The result equals softmax attention over
//! `[decode(codes); fp]` up to float rounding.

mod cpu;

pub use cpu::{check_heads, exp_neg, page_scores, pq_attention, PqAttention};
