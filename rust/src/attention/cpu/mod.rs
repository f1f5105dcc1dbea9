//! CPU kernels: dense attention over PQ codes with a full-precision part, and Quest page scores.
use crate::error::{Error, Result};
use crate::pq::fastscan::{self, QuantLut};
use crate::pq::kernels::{pair_tables_4bit, scan_bytes};

/// Tokens per parallel chunk (split-K), for codes and for the full-precision part.
const CHUNK: usize = 4096;
/// Below this many (token, query) pairs a call runs on the calling thread.
const SEQUENTIAL_BELOW: usize = 1 << 12;

/// Inputs of [`pq_attention`]. All arrays are row-major (C-contiguous).
#[derive(Clone, Copy, Debug)]
pub struct PqAttention<'a> {
    /// Batch size.
    pub batch: usize,
    /// Query heads.
    pub hq: usize,
    /// KV heads (`hq % hkv == 0`).
    pub hkv: usize,
    /// Query tokens per sequence.
    pub tq: usize,
    /// Head dimension.
    pub d: usize,
    /// Queries, Layout `(batch, hq, tq, d)`.
    pub q: &'a [f32],
    /// Code tokens per (sequence, KV head) in the code arrays (capacity).
    pub n: usize,
    /// Key codes, Layout `(batch, hkv, n, ck)`.
    pub k_codes: &'a [u8],
    /// Value codes, Layout `(batch, hkv, n, cv)`.
    pub v_codes: &'a [u8],
    /// Key centroids, Layout `(hkv, k_m, 2^k_nbits, d / k_m)`.
    pub k_cent: &'a [f32],
    /// Key subquantizers.
    pub k_m: usize,
    /// Key code bits (4 or 8).
    pub k_nbits: u32,
    /// Value centroids, Layout `(hkv, v_m, 2^v_nbits, d / v_m)`.
    pub v_cent: &'a [f32],
    /// Value subquantizers.
    pub v_m: usize,
    /// Value code bits (4 or 8).
    pub v_nbits: u32,
    /// Valid code tokens per sequence: `[start, end)` (`start` skips left padding).
    pub code_range: &'a [(usize, usize)],
    /// Full-precision tokens per (sequence, KV head) in the fp arrays (capacity).
    pub f: usize,
    /// Full-precision keys, Layout `(batch, hkv, f, d)`, positionally after the codes.
    pub fp_k: &'a [f32],
    /// Full-precision values, Layout `(batch, hkv, f, d)`.
    pub fp_v: &'a [f32],
    /// Valid fp tokens per sequence: `[start, end)`.
    pub fp_range: &'a [(usize, usize)],
    /// Score scale (usually `1 / sqrt(d)`).
    pub scale: f32,
    /// The last `tq` valid fp tokens are the queries themselves: query `t` sees fp tokens up
    /// to `end - tq + t` (inclusive).
    pub causal: bool,
}

use crate::pq::code_bytes;

/// Selected pages of a full-precision history, attended in place (no gather copy): the
/// input of [`paged_attention`].
#[derive(Clone, Copy, Debug)]
pub struct Pages<'a> {
    /// Keys, Layout `(batch, hkv, n, d)`.
    pub k: &'a [f32],
    /// Values, Layout `(batch, hkv, n, d)`.
    pub v: &'a [f32],
    /// Tokens per (sequence, KV head).
    pub n: usize,
    /// Page ids per (sequence, KV head), Layout `(batch, hkv, s)`: page `p` is tokens
    /// `[p * size, min((p + 1) * size, n))`; negative ids are skipped. Ids must be distinct.
    pub ids: &'a [i64],
    /// Page ids per (sequence, KV head).
    pub s: usize,
    /// Tokens per page.
    pub size: usize,
}

/// Codes and full-precision tokens where the store holds them (the dense decode path) rather
/// than in [`PqAttention`]'s arrays (`k_codes`, `v_codes`, `fp_k`, `fp_v`, which are then
/// empty): each parallel task copies its own chunk out of the pages or token rows into a
/// cache-sized buffer, instead of the caller copying everything into one array on one thread
/// first (measured at batch 8 x 2K tokens: that serial copy and its zero fill were 15% of a
/// decode call, with the second thread idle).
#[derive(Clone, Copy, Debug)]
pub struct Resident<'a> {
    /// Per (sequence, KV head), Layout `(batch, hkv)`: the key and value codes of its pages in
    /// token order, Layout `(tokens, ck)` and `(tokens, cv)`. Every page of a list but the
    /// last holds `size` tokens.
    pub segs: &'a [Vec<(&'a [u8], &'a [u8])>],
    /// Tokens per page.
    pub size: usize,
    /// Per sequence: its full-precision tokens in order (sinks, then window), each a key row and
    /// a value row of Layout `(hkv, d)`.
    pub fp: &'a [Vec<(&'a [f32], &'a [f32])>],
}

impl Resident<'_> {
    /// Token count of `(b, h)`'s list.
    fn tokens(&self, bh: usize, ck: usize) -> usize {
        self.segs[bh].iter().map(|(k, _)| k.len() / ck.max(1)).sum()
    }

    fn validate(&self, a: &PqAttention, ck: usize, cv: usize) -> Result<()> {
        if self.segs.len() != a.batch * a.hkv || self.size == 0 {
            return Err(Error::config(format!(
                "code pages: need one page list per (sequence, KV head) ({}) and a positive page \
                 size, got {} lists and size {}",
                a.batch * a.hkv,
                self.segs.len(),
                self.size
            )));
        }
        for (bh, list) in self.segs.iter().enumerate() {
            for (i, (k, v)) in list.iter().enumerate() {
                let t = k.len() / ck;
                let full = i + 1 < list.len();
                if k.len() != t * ck
                    || v.len() != t * cv
                    || (full && t != self.size)
                    || t > self.size
                {
                    return Err(Error::config(format!(
                        "code pages: page {i} of (sequence {}, KV head {}) holds {} key / {} value \
                         code bytes, not whole tokens of a {}-token page",
                        bh / a.hkv,
                        bh % a.hkv,
                        k.len(),
                        v.len(),
                        self.size
                    )));
                }
            }
            if self.tokens(bh, ck) < a.code_range[bh / a.hkv].1 {
                return Err(Error::config(format!(
                    "code pages: (sequence {}, KV head {}) holds {} tokens, the code range ends at {}",
                    bh / a.hkv,
                    bh % a.hkv,
                    self.tokens(bh, ck),
                    a.code_range[bh / a.hkv].1
                )));
            }
        }
        if self.fp.len() != a.batch {
            return Err(Error::config(format!(
                "resident fp tokens: need one list per sequence ({}), got {}",
                a.batch,
                self.fp.len()
            )));
        }
        for (b, rows) in self.fp.iter().enumerate() {
            let row = a.hkv * a.d;
            if rows.len() < a.fp_range[b].1
                || rows.iter().any(|(k, v)| k.len() != row || v.len() != row)
            {
                return Err(Error::config(format!(
                    "resident fp tokens of sequence {b}: {} rows for an fp range ending at {}, each \
                     must hold {row} key and value floats",
                    rows.len(),
                    a.fp_range[b].1
                )));
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    /// Copy head `h`'s key and value rows of fp tokens `[lo, hi)` of sequence `b`.
    fn gather_fp(
        &self,
        b: usize,
        h: usize,
        d: usize,
        lo: usize,
        hi: usize,
        kb: &mut Vec<f32>,
        vb: &mut Vec<f32>,
    ) {
        kb.clear();
        vb.clear();
        for (k, v) in &self.fp[b][lo..hi] {
            kb.extend_from_slice(&k[h * d..(h + 1) * d]);
            vb.extend_from_slice(&v[h * d..(h + 1) * d]);
        }
    }

    /// Copy the key and value codes of tokens `[lo, hi)` of `bh` into `kb`, `vb`.
    fn gather(
        &self,
        bh: usize,
        lo: usize,
        hi: usize,
        (ck, cv): (usize, usize),
        kb: &mut Vec<u8>,
        vb: &mut Vec<u8>,
    ) {
        kb.clear();
        vb.clear();
        let mut t = lo;
        while t < hi {
            let (p, off) = (t / self.size, t % self.size);
            let (k, v) = self.segs[bh][p];
            let end = (k.len() / ck).min(off + hi - t);
            kb.extend_from_slice(&k[off * ck..end * ck]);
            vb.extend_from_slice(&v[off * cv..end * cv]);
            t += end - off;
        }
    }
}

impl Pages<'_> {
    fn validate(&self, batch: usize, hkv: usize, d: usize) -> Result<()> {
        let n = self.n;
        for (what, got) in [("k", self.k.len()), ("v", self.v.len())] {
            if got != batch * hkv * n * d {
                return Err(Error::shape(
                    what,
                    format!("[{batch}, {hkv}, {n}, {d}]"),
                    format!("{got} values"),
                ));
            }
        }
        check_page_ids(self.ids, batch, hkv, self.s, n, self.size)
    }
}

/// Page ids of Layout `(batch, hkv, s)` over `n` tokens in pages of `size`: in range, distinct
/// per (sequence, KV head) (negative ids are "no page").
fn check_page_ids(
    ids: &[i64],
    batch: usize,
    hkv: usize,
    s: usize,
    n: usize,
    size: usize,
) -> Result<()> {
    if ids.len() != batch * hkv * s {
        return Err(Error::shape(
            "pages",
            format!("[{batch}, {hkv}, {s}]"),
            format!("{} values", ids.len()),
        ));
    }
    if size == 0 {
        return Err(Error::config("page_size must be positive"));
    }
    let count = n.div_ceil(size) as i64;
    if let Some(&bad) = ids.iter().find(|&&id| id >= count) {
        return Err(Error::config(format!(
            "page id {bad} out of range: {n} tokens in pages of {size} make {count} pages"
        )));
    }
    // A repeated id would count its tokens twice: a silent wrong answer.
    for (i, list) in ids.chunks(s.max(1)).enumerate() {
        let mut seen: Vec<i64> = list.iter().copied().filter(|&id| id >= 0).collect();
        seen.sort_unstable();
        if let Some(w) = seen.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::config(format!(
                "page id {} appears twice for (sequence {}, KV head {}); ids must be distinct \
                 (use -1 for no page)",
                w[0],
                i / hkv,
                i % hkv
            )));
        }
    }
    Ok(())
}

/// GQA head counts: `hq` query heads share `hkv` KV heads in equal groups.
pub fn check_heads(hq: usize, hkv: usize) -> Result<()> {
    if hkv == 0 || !hq.is_multiple_of(hkv) {
        return Err(Error::config(format!(
            "query heads ({hq}) must be a multiple of KV heads ({hkv})"
        )));
    }
    Ok(())
}

impl<'a> PqAttention<'a> {
    /// Attention over a full-precision part only (no code tokens, no codebooks), scale
    /// `1 / sqrt(d)`, causal. `code_range`: `[(0, 0)]` per sequence.
    pub fn fp_only(
        (batch, hq, hkv, tq, d): (usize, usize, usize, usize, usize),
        q: &'a [f32],
        (f, fp_k, fp_v): (usize, &'a [f32], &'a [f32]),
        fp_range: &'a [(usize, usize)],
        code_range: &'a [(usize, usize)],
    ) -> Self {
        PqAttention {
            batch,
            hq,
            hkv,
            tq,
            d,
            q,
            n: 0,
            k_codes: &[],
            v_codes: &[],
            k_cent: &[],
            k_m: 1,
            k_nbits: 4,
            v_cent: &[],
            v_m: 1,
            v_nbits: 4,
            code_range,
            f,
            fp_k,
            fp_v,
            fp_range,
            scale: 1.0 / (d as f32).sqrt(),
            causal: true,
        }
    }

    fn validate(&self, paged: Option<&Resident>) -> Result<()> {
        let bad = |msg: String| Err(Error::config(msg));
        let (b, hq, hkv, tq, d) = (self.batch, self.hq, self.hkv, self.tq, self.d);
        check_heads(hq, hkv)?;
        if d == 0 {
            return bad("head_dim must be positive".into());
        }
        for (what, m, nbits) in [
            ("key", self.k_m, self.k_nbits),
            ("value", self.v_m, self.v_nbits),
        ] {
            if nbits != 4 && nbits != 8 {
                return bad(format!("{what} codes: nbits must be 4 or 8, got {nbits}"));
            }
            if m == 0 || d % m != 0 {
                return bad(format!("{what} codebooks: m={m} must divide head_dim={d}"));
            }
        }
        let (ck, cv) = (
            code_bytes(self.k_m, self.k_nbits),
            code_bytes(self.v_m, self.v_nbits),
        );
        let checks: [(&str, usize, usize, String); 7] = [
            (
                "q",
                self.q.len(),
                b * hq * tq * d,
                format!("[{b}, {hq}, {tq}, {d}]"),
            ),
            (
                "k_codes",
                self.k_codes.len(),
                b * hkv * self.n * ck,
                format!("[{b}, {hkv}, {}, {ck}]", self.n),
            ),
            (
                "v_codes",
                self.v_codes.len(),
                b * hkv * self.n * cv,
                format!("[{b}, {hkv}, {}, {cv}]", self.n),
            ),
            (
                "k_centroids",
                self.k_cent.len(),
                hkv * (1 << self.k_nbits) * d,
                format!(
                    "[{hkv}, {}, {}, {}]",
                    self.k_m,
                    1 << self.k_nbits,
                    d / self.k_m
                ),
            ),
            (
                "v_centroids",
                self.v_cent.len(),
                hkv * (1 << self.v_nbits) * d,
                format!(
                    "[{hkv}, {}, {}, {}]",
                    self.v_m,
                    1 << self.v_nbits,
                    d / self.v_m
                ),
            ),
            (
                "fp_k",
                self.fp_k.len(),
                b * hkv * self.f * d,
                format!("[{b}, {hkv}, {}, {d}]", self.f),
            ),
            (
                "fp_v",
                self.fp_v.len(),
                b * hkv * self.f * d,
                format!("[{b}, {hkv}, {}, {d}]", self.f),
            ),
        ];
        for (what, got, want, shape) in checks {
            // Without code tokens the codebooks are never read: empty ones are fine.
            let unused_books = self.n == 0 && got == 0 && what.ends_with("centroids");
            let in_place =
                paged.is_some() && got == 0 && (what.ends_with("codes") || what.starts_with("fp_"));
            if got != want && !unused_books && !in_place {
                return Err(Error::shape(what, shape, format!("{got} values")));
            }
        }
        if self.code_range.len() != b || self.fp_range.len() != b {
            return bad(format!(
                "code/fp lengths must have one entry per sequence ({b})"
            ));
        }
        for (i, (&(cs, ce), &(fs, fe))) in self.code_range.iter().zip(self.fp_range).enumerate() {
            if cs > ce || ce > self.n {
                return bad(format!(
                    "sequence {i}: code range [{cs}, {ce}) outside [0, {}]",
                    self.n
                ));
            }
            if fs > fe || fe > self.f {
                return bad(format!(
                    "sequence {i}: fp range [{fs}, {fe}) outside [0, {}]",
                    self.f
                ));
            }
        }
        if !self.scale.is_finite() {
            return bad(format!("scale must be finite, got {}", self.scale));
        }
        if let Some(p) = paged {
            p.validate(self, ck, cv)?;
        }
        Ok(())
    }
}

/// `exp(x)` for `x <= 0` (returns 0 below -87), vectorizable, relative error < 2e-7.
#[inline(always)]
pub fn exp_neg(x: f32) -> f32 {
    let x = x.max(-87.0);
    // exp(x) = 2^k * exp(r), k = round(x / ln2), |r| <= ln2 / 2.
    let k = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = k.mul_add(-0.693_145_75, x);
    let r = k.mul_add(-1.428_606_8e-6, r);
    // Degree-6 Taylor/minimax polynomial for exp(r) on [-ln2/2, ln2/2].
    let mut p = 1.0 / 720.0f32;
    p = p.mul_add(r, 1.0 / 120.0);
    p = p.mul_add(r, 1.0 / 24.0);
    p = p.mul_add(r, 1.0 / 6.0);
    p = p.mul_add(r, 0.5);
    p = p.mul_add(r, 1.0);
    p = p.mul_add(r, 1.0);
    let bits = ((k as i32 + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

/// Softmax numerators in place: per row of `s` (Layout `(nq, len)`), `m[q]` = the row's max,
/// `s[q][i] = exp(s[q][i] - m[q])` and `l[q]` = their sum.
#[inline(always)]
fn softmax_rows(s: &mut [f32], len: usize, m: &mut [f32], l: &mut [f32]) {
    let nq = m.len();
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx512() {
        // SAFETY: the CPU has the AVX-512 level (checked just above).
        unsafe { super::avx512::softmax_rows(s, nq, len, m, l) };
        return;
    }
    for qi in 0..nq {
        let row = &mut s[qi * len..(qi + 1) * len];
        let mx = max_of(row);
        let mut sum = 0f32;
        for x in row.iter_mut() {
            *x = exp_neg(*x - mx);
            sum += *x;
        }
        m[qi] = mx;
        l[qi] = sum;
    }
}

/// Largest element (`-inf` for none) with eight independent lanes (vectorizes; a left-to-right
/// fold is one dependent chain).
#[inline(always)]
fn max_of(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    let c = x.chunks_exact(8);
    let rest = c.remainder();
    for v in c {
        for l in 0..8 {
            m[l] = m[l].max(v[l]);
        }
    }
    rest.iter()
        .chain(&m)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// What a parallel task attends to: a chunk `[lo, hi)` of the codes or of the fp tokens.
#[derive(Clone, Copy)]
enum Part {
    Codes(usize, usize),
    Fp(usize, usize),
    /// Page ids `[lo, hi)` of the (sequence, KV head)'s list in [`Pages`].
    Pages(usize, usize),
}

/// `(sequence, KV head, part)`.
type WorkItem = (usize, usize, Part);

/// Running softmax state of one query over part of the history.
#[derive(Clone)]
struct Partial {
    m: f32,
    l: f32,
    /// Unnormalized output relative to `m`, Layout `(d,)`.
    acc: Vec<f32>,
}

mod codes;
mod exact;
mod select;

use crate::pq::kernels::transpose_books;
use codes::{codes_chunk, tables_for, GroupTables};
use exact::{fp_chunk, pages_chunk};
pub(crate) use select::group_max;
pub use select::{page_bounds_quantized, page_scores, page_scores_quantized};

/// Softmax attention over `[decode(codes); fp]` for every query, without decoding.
///
/// Returns `(out, lse)`: Layout `(batch, hq, tq, d)` and `(batch, hq, tq)` (natural-log
/// log-sum-exp of the scaled scores; `-inf` and a zero output for a query that sees nothing).
pub fn pq_attention(a: &PqAttention) -> Result<(Vec<f32>, Vec<f32>)> {
    attend(a, None, None)
}

/// [`pq_attention`] over codes and fp tokens read where `at` says they are, instead of
/// `a.k_codes`, `a.v_codes`, `a.fp_k`, `a.fp_v` (which must then be empty); `a.n` and `a.f` are
/// the longest lists' token counts.
pub fn pq_attention_paged(a: &PqAttention, at: &Resident) -> Result<(Vec<f32>, Vec<f32>)> {
    attend(a, None, Some(at))
}

/// Selected pages of the code tokens: the input of [`pq_attention_selected`].
#[derive(Clone, Copy, Debug)]
pub struct CodePages<'a> {
    /// Page ids per (sequence, KV head), Layout `(batch, hkv, s)`: page `p` is code tokens
    /// `[p * size, min((p + 1) * size, n))`; negative ids are skipped. Ids must be distinct.
    pub ids: &'a [i64],
    /// Page ids per (sequence, KV head).
    pub s: usize,
    /// Tokens per page.
    pub size: usize,
}

/// [`pq_attention`] over the code tokens of the selected pages only (each (sequence, KV head)
/// its own pages, attended in place) plus the fp part: `a.code_range` must be `(0, n)` for
/// every sequence (the pages say which code tokens are attended). Returns `(out, lse)` as
/// [`pq_attention`]. The CPU reference of the CUDA kernel's paged mode.
pub fn pq_attention_selected(a: &PqAttention, sel: &CodePages) -> Result<(Vec<f32>, Vec<f32>)> {
    a.validate(None)?;
    if a.code_range.iter().any(|&r| r != (0, a.n)) {
        return Err(Error::config(
            "selected code pages: code_range must cover all code tokens; the pages select them",
        ));
    }
    check_page_ids(sel.ids, a.batch, a.hkv, sel.s, a.n, sel.size)?;
    let (g, tq, d, n, f) = (a.hq / a.hkv, a.tq, a.d, a.n, a.f);
    let (ck, cv) = (code_bytes(a.k_m, a.k_nbits), code_bytes(a.v_m, a.v_nbits));
    let (kbook, vbook) = ((1usize << a.k_nbits) * d, (1usize << a.v_nbits) * d);
    let rows = g * tq;
    let mut out = vec![0f32; a.batch * a.hq * tq * d];
    let mut lse = vec![f32::NEG_INFINITY; a.batch * a.hq * tq];
    for b in 0..a.batch {
        for h in 0..a.hkv {
            let bh = b * a.hkv + h;
            let mut ids: Vec<usize> = sel.ids[bh * sel.s..(bh + 1) * sel.s]
                .iter()
                .filter(|&&id| id >= 0)
                .map(|&id| id as usize)
                .collect();
            // Every page but the last of a list must be whole: the history's partial page last.
            ids.sort_unstable_by_key(|&p| ((p + 1) * sel.size > n, p));
            let segs: Vec<(&[u8], &[u8])> = ids
                .iter()
                .map(|&p| {
                    let (lo, hi) = (bh * n + p * sel.size, bh * n + ((p + 1) * sel.size).min(n));
                    (&a.k_codes[lo * ck..hi * ck], &a.v_codes[lo * cv..hi * cv])
                })
                .collect();
            let tokens = segs.iter().map(|(k, _)| k.len() / ck.max(1)).sum::<usize>();
            let fp: Vec<(&[f32], &[f32])> = (0..f)
                .map(|t| {
                    let o = (bh * f + t) * d;
                    (&a.fp_k[o..o + d], &a.fp_v[o..o + d])
                })
                .collect();
            let q0 = (b * a.hq + h * g) * tq * d;
            let sub = PqAttention {
                batch: 1,
                hq: g,
                hkv: 1,
                q: &a.q[q0..q0 + rows * d],
                n: tokens,
                k_codes: &[],
                v_codes: &[],
                k_cent: &a.k_cent[h * kbook..(h + 1) * kbook],
                v_cent: &a.v_cent[h * vbook..(h + 1) * vbook],
                code_range: &[(0, tokens)],
                fp_k: &[],
                fp_v: &[],
                fp_range: &a.fp_range[b..b + 1],
                ..*a
            };
            let at = Resident {
                segs: std::slice::from_ref(&segs),
                size: sel.size,
                fp: std::slice::from_ref(&fp),
            };
            let (o, l) = attend(&sub, None, Some(&at))?;
            out[q0..q0 + rows * d].copy_from_slice(&o);
            let l0 = (b * a.hq + h * g) * tq;
            lse[l0..l0 + rows].copy_from_slice(&l);
        }
    }
    Ok((out, lse))
}

/// [`pq_attention`] over `[decode(codes); selected pages; fp]`: the pages are attended where they
/// are (Quest-style selection without a gather copy). Returns `(out, lse)` as [`pq_attention`].
pub fn paged_attention(a: &PqAttention, pages: &Pages) -> Result<(Vec<f32>, Vec<f32>)> {
    pages.validate(a.batch, a.hkv, a.d)?;
    attend(a, Some(pages), None)
}

fn attend(
    a: &PqAttention,
    pages: Option<&Pages>,
    paged: Option<&Resident>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    a.validate(paged)?;
    crate::pq::check_finite("q", a.q, a.d)?;
    let (g, tq, d) = (a.hq / a.hkv, a.tq, a.d);
    let nq = g * tq;
    // Work items: (b, h, Some(chunk lo, hi)) for code chunks, (b, h, None) for the fp part.
    let mut items: Vec<WorkItem> = Vec::new();
    let mut work = 0usize;
    for b in 0..a.batch {
        for h in 0..a.hkv {
            for (range, codes) in [(a.code_range[b], true), (a.fp_range[b], false)] {
                let (mut lo, end) = range;
                work += (end - lo) * nq;
                while lo < end {
                    let hi = (lo + CHUNK).min(end);
                    items.push((
                        b,
                        h,
                        if codes {
                            Part::Codes(lo, hi)
                        } else {
                            Part::Fp(lo, hi)
                        },
                    ));
                    lo = hi;
                }
            }
        }
    }
    if let Some(p) = pages {
        // Pages per item: about CHUNK tokens.
        let per = (CHUNK / p.size).max(1);
        for b in 0..a.batch {
            for h in 0..a.hkv {
                let ids = &p.ids[(b * a.hkv + h) * p.s..(b * a.hkv + h + 1) * p.s];
                work += ids.iter().filter(|&&id| id >= 0).count() * p.size * nq;
                for lo in (0..p.s).step_by(per) {
                    items.push((b, h, Part::Pages(lo, (lo + per).min(p.s))));
                }
            }
        }
    }
    // Small problems (short histories, tests, prefill of a few tokens) run on the calling thread:
    // waking the pool costs more than the work.
    let parallel = work >= SEQUENTIAL_BELOW;
    let any_codes = a.code_range.iter().any(|&(cs, ce)| cs < ce);
    let (kt, vt) = if any_codes {
        (
            transpose_books(a.k_cent, 1 << a.k_nbits, d / a.k_m),
            transpose_books(a.v_cent, 1 << a.v_nbits, d / a.v_m),
        )
    } else {
        (Vec::new(), Vec::new())
    };
    let tables: Vec<GroupTables> = if parallel {
        crate::parallel::map(a.batch * a.hkv, |bh| {
            crate::dispatch!(tables_for(a, &kt, bh))
        })?
    } else {
        (0..a.batch * a.hkv)
            .map(|bh| crate::dispatch!(tables_for(a, &kt, bh)))
            .collect()
    };
    let run = |&(b, h, part): &WorkItem| {
        let p = match part {
            Part::Fp(lo, hi) => crate::dispatch!(fp_chunk(a, paged, b, h, lo, hi)),
            Part::Pages(lo, hi) => match pages {
                Some(p) => crate::dispatch!(pages_chunk(a, p, b, h, lo, hi)),
                None => unreachable!("page items exist only with pages"),
            },
            Part::Codes(lo, hi) => {
                crate::dispatch!(codes_chunk(
                    a,
                    paged,
                    &tables[b * a.hkv + h],
                    &vt,
                    b,
                    h,
                    lo,
                    hi
                ))
            }
        };
        (b * a.hkv + h, p)
    };
    let parts: Vec<(usize, Vec<Partial>)> = if parallel {
        crate::parallel::map(items.len(), |i| run(&items[i]))?
    } else {
        items.iter().map(run).collect()
    };
    // Merge partials per (b, h, query) by log-sum-exp.
    let mut merged: Vec<Partial> = (0..a.batch * a.hkv * nq)
        .map(|_| Partial {
            m: f32::NEG_INFINITY,
            l: 0.0,
            acc: vec![0f32; d],
        })
        .collect();
    for (bh, ps) in parts {
        for (qi, p) in ps.into_iter().enumerate() {
            let dst = &mut merged[bh * nq + qi];
            if p.m == f32::NEG_INFINITY {
                continue;
            }
            if dst.m == f32::NEG_INFINITY {
                *dst = p;
                continue;
            }
            let m = dst.m.max(p.m);
            let (ca, cb) = (exp_neg(dst.m - m), exp_neg(p.m - m));
            dst.l = dst.l * ca + p.l * cb;
            for (x, y) in dst.acc.iter_mut().zip(&p.acc) {
                *x = *x * ca + y * cb;
            }
            dst.m = m;
        }
    }
    let mut out = vec![0f32; a.batch * a.hq * tq * d];
    let mut lse = vec![f32::NEG_INFINITY; a.batch * a.hq * tq];
    for b in 0..a.batch {
        for h in 0..a.hkv {
            for qi in 0..nq {
                let p = &merged[(b * a.hkv + h) * nq + qi];
                let (gi, t) = (qi / tq, qi % tq);
                let row = (b * a.hq + h * g + gi) * tq + t;
                if p.l > 0.0 {
                    let inv = 1.0 / p.l;
                    for (o, x) in out[row * d..(row + 1) * d].iter_mut().zip(&p.acc) {
                        *o = x * inv;
                    }
                    lse[row] = p.m + p.l.ln();
                }
            }
        }
    }
    Ok((out, lse))
}
#[cfg(test)]
mod tests;

/// A/B timings behind the kernel's design choices (ignored by default).
#[cfg(test)]
mod ab;
