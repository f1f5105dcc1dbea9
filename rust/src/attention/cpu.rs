//! CPU kernels: dense attention over PQ codes with a full-precision part, and Quest page scores.
use crate::error::{Error, Result};
use crate::pq::fastscan::{self, QuantLut};
use crate::pq::kernels::{pair_tables_4bit, scan_bytes};

/// Code tokens per block inside a chunk (scores of a block stay in L1).
const BLOCK: usize = 256;
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
        if self.ids.len() != batch * hkv * self.s {
            return Err(Error::shape(
                "pages",
                format!("[{batch}, {hkv}, {}]", self.s),
                format!("{} values", self.ids.len()),
            ));
        }
        if self.size == 0 {
            return Err(Error::config("page_size must be positive"));
        }
        let count = n.div_ceil(self.size) as i64;
        if let Some(&bad) = self.ids.iter().find(|&&id| id >= count) {
            return Err(Error::config(format!(
                "page id {bad} out of range: {n} tokens in pages of {} make {count} pages",
                self.size
            )));
        }
        // A repeated id would count its tokens twice: a silent wrong answer.
        for (i, list) in self.ids.chunks(self.s.max(1)).enumerate() {
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

    fn validate(&self) -> Result<()> {
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
            if got != want && !unused_books {
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

/// Per-(sequence, KV head) precomputed key tables of the group's queries.
struct GroupTables {
    /// Layout `(queries, ck)` byte tables (4-bit tables folded pairwise: one lookup per byte,
    /// measured 3.3x faster than two per-nibble lookups despite the larger tables).
    k: Vec<[f32; 256]>,
    /// 4-bit keys on AVX2: per query, 24-bit tables in three byte planes for the shuffle-based
    /// scan of [`crate::pq::fastscan`] (scores within ~2e-6 of the table span: float-exact).
    /// When present, `k` is empty.
    kq: Vec<QuantLut>,
}

#[inline(always)]
fn build_tables(a: &PqAttention, kt: &[f32], b: usize, h: usize) -> GroupTables {
    let (g, tq, d) = (a.hq / a.hkv, a.tq, a.d);
    let ksub = 1usize << a.k_nbits;
    let dsub = d / a.k_m;
    let ck = code_bytes(a.k_m, a.k_nbits);
    // Transposed centroids of this head, Layout (m, dsub, ksub): every table row is a few
    // contiguous multiply-adds over the codewords.
    let ct = &kt[h * a.k_m * dsub * ksub..(h + 1) * a.k_m * dsub * ksub];
    if lookup512(a.k_nbits) {
        // The AVX-512 key path decodes with the centroids themselves: no per-query tables.
        return GroupTables {
            k: Vec::new(),
            kq: Vec::new(),
        };
    }
    let shuffle = a.k_nbits == 4 && crate::simd::has_avx2_fma() && ck <= 128;
    let mut k = vec![[0f32; 256]; if shuffle { 0 } else { g * tq * ck }];
    let mut kq = Vec::with_capacity(if shuffle { g * tq } else { 0 });
    let mut lut = vec![0f32; a.k_m * ksub];
    for qi in 0..g * tq {
        let (gi, t) = (qi / tq, qi % tq);
        let qh = h * g + gi;
        let q = &a.q[((b * a.hq + qh) * tq + t) * d..((b * a.hq + qh) * tq + t + 1) * d];
        let fill = |j: usize, row: &mut [f32]| {
            row.fill(0.0);
            for dd in 0..dsub {
                let qd = q[j * dsub + dd] * a.scale;
                let c = &ct[(j * dsub + dd) * ksub..(j * dsub + dd + 1) * ksub];
                for (o, &x) in row.iter_mut().zip(c) {
                    *o = qd.mul_add(x, *o);
                }
            }
        };
        if a.k_nbits == 8 && !shuffle {
            for (j, row) in k[qi * ck..(qi + 1) * ck].iter_mut().enumerate() {
                fill(j, row);
            }
            continue;
        }
        for j in 0..a.k_m {
            fill(j, &mut lut[j * ksub..(j + 1) * ksub]);
        }
        if shuffle {
            kq.push(fastscan::quantize_exact(&lut, a.k_m));
            continue;
        }
        pair_tables_4bit(&lut, a.k_m, &mut k[qi * ck..(qi + 1) * ck]);
    }
    GroupTables { k, kq }
}

/// Whether codes of `nbits` take the AVX-512 lookup kernels of [`super::avx512`] (4-bit codes:
/// one 16-float table per dimension is one register).
#[inline]
fn lookup512(nbits: u32) -> bool {
    cfg!(target_arch = "x86_64") && nbits == 4 && crate::simd::has_avx512()
}

/// Centroids `(H, m, ksub, dsub)` transposed to `(H, m, dsub, ksub)`.
fn transpose_books(cent: &[f32], ksub: usize, dsub: usize) -> Vec<f32> {
    let mut out = vec![0f32; cent.len()];
    for (blk, dst) in cent
        .chunks_exact(ksub * dsub)
        .zip(out.chunks_exact_mut(ksub * dsub))
    {
        for c in 0..ksub {
            for dd in 0..dsub {
                dst[dd * ksub + c] = blk[c * dsub + dd];
            }
        }
    }
    out
}

/// `sum_i a[i] * b[i]` with eight independent accumulators (vectorizes).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s = x.mul_add(*y, s);
    }
    s
}

/// Key tables of `(b, h) = (bh / hkv, bh % hkv)`, or none when that sequence has no codes.
#[inline(always)]
fn tables_for(a: &PqAttention, kt: &[f32], bh: usize) -> GroupTables {
    let b = bh / a.hkv;
    let (cs, ce) = a.code_range[b];
    if cs == ce {
        return GroupTables {
            k: Vec::new(),
            kq: Vec::new(),
        };
    }
    build_tables(a, kt, b, bh % a.hkv)
}

/// Softmax weights of queries `q0..q0 + cnt` (`cnt <= W`; rows of `s`, Layout `(nq, len)`)
/// summed per value codeword: `w` Layout `(cnt, vm, 2^nbits)`.
///
/// Weights are transposed to `(len, W)` and histogrammed per code byte value, Layout
/// `(cv, 256, W)`: one W-wide vector add per code byte covers every query (1.9x faster than one
/// scalar add per code byte and query at GQA 4; one add per byte was measured 2.7x faster than
/// one per 4-bit subquantizer). 4-bit byte histograms are then folded into their two nibbles.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn value_weights<const W: usize>(
    s: &[f32],
    len: usize,
    q0: usize,
    cnt: usize,
    vc: &[u8],
    cv: usize,
    nbits: u32,
    vm: usize,
    w: &mut [f32],
) {
    let mut pt = vec![[0f32; W]; len];
    for k in 0..cnt {
        for (dst, &x) in pt.iter_mut().zip(&s[(q0 + k) * len..(q0 + k + 1) * len]) {
            dst[k] = x;
        }
    }
    let mut hist = vec![[[0f32; W]; 256]; cv];
    for (&p, code) in pt.iter().zip(vc.chunks_exact(cv)) {
        for (cells, &c) in hist.iter_mut().zip(code) {
            let cell = &mut cells[c as usize];
            // Written as a whole-array update so it compiles to one vector add.
            *cell = std::array::from_fn(|k| cell[k] + p[k]);
        }
    }
    let vsub = 1usize << nbits;
    let mut acc = vec![[0f32; W]; vm * vsub];
    if nbits == 8 {
        for (dst, cells) in acc.chunks_exact_mut(256).zip(&hist) {
            dst.copy_from_slice(cells);
        }
    } else {
        for (bi, cells) in hist.iter().enumerate() {
            for hi4 in 0..16 {
                let mut row = [0f32; W];
                for lo4 in 0..16 {
                    let x = cells[hi4 * 16 + lo4];
                    let lo = &mut acc[2 * bi * 16 + lo4];
                    *lo = std::array::from_fn(|k| lo[k] + x[k]);
                    row = std::array::from_fn(|k| row[k] + x[k]);
                }
                if 2 * bi + 1 < vm {
                    let hi = &mut acc[(2 * bi + 1) * 16 + hi4];
                    *hi = std::array::from_fn(|k| hi[k] + row[k]);
                }
            }
        }
    }
    for k in 0..cnt {
        for (dst, x) in w[k * vm * vsub..(k + 1) * vm * vsub].iter_mut().zip(&acc) {
            *dst = x[k];
        }
    }
}

/// Attention of the group's queries over code tokens `[lo, hi)` of `(b, h)` (at most [`CHUNK`]).
///
/// Three passes keep every table in L1 and avoid rescaling: key scores of the whole chunk (one
/// byte-table lookup per key code byte), one max and `exp` per query, then softmax weights summed
/// per value code byte value, folded per codeword and multiplied with the value codebook once.
#[inline(always)]
fn codes_chunk(
    a: &PqAttention,
    tables: &GroupTables,
    vt: &[f32],
    b: usize,
    h: usize,
    lo: usize,
    hi: usize,
) -> Vec<Partial> {
    let (g, tq, d) = (a.hq / a.hkv, a.tq, a.d);
    let nq = g * tq;
    let len = hi - lo;
    let (ck, cv) = (code_bytes(a.k_m, a.k_nbits), code_bytes(a.v_m, a.v_nbits));
    let kbase = ((b * a.hkv + h) * a.n + lo) * ck;
    let vbase = ((b * a.hkv + h) * a.n + lo) * cv;
    let kc = &a.k_codes[kbase..kbase + len * ck];
    let vc = &a.v_codes[vbase..vbase + len * cv];
    // Pass 1: scores, Layout (nq, len), block by block so a block of codes is read once. (Fusing
    // the group's queries per code byte was measured slower: it loses the 4-token ILP.) 4-bit
    // keys on AVX2 use the shuffle scan with 24-bit tables, all queries per transposed block.
    let mut s = vec![0f32; nq * len];
    if lookup512(a.k_nbits) {
        #[cfg(target_arch = "x86_64")]
        {
            let dsub = d / a.k_m;
            let q = &a.q[(b * a.hq + h * g) * tq * d..(b * a.hq + (h + 1) * g) * tq * d];
            let cent = &a.k_cent[h * a.k_m * 16 * dsub..(h + 1) * a.k_m * 16 * dsub];
            // SAFETY: lookup512 says the CPU has the AVX-512 level (F, BW, VBMI) and AVX2+FMA.
            unsafe {
                super::avx512::key_scores(q, a.scale, nq, len, kc, ck, a.k_m, dsub, cent, &mut s)
            };
        }
    } else if !tables.kq.is_empty() {
        let mut rows: Vec<&mut [f32]> = s.chunks_exact_mut(len.max(1)).collect();
        rows.truncate(nq);
        fastscan::scan(&tables.kq, kc, ck, &mut rows);
    } else {
        let mut start = 0;
        while start < len {
            let end = (start + BLOCK).min(len);
            for qi in 0..nq {
                let codes = &kc[start * ck..end * ck];
                let out = &mut s[qi * len + start..qi * len + end];
                scan_bytes(&tables.k[qi * ck..(qi + 1) * ck], codes, out);
            }
            start = end;
        }
    }
    // Pass 2: softmax numerators.
    let mut m = vec![f32::NEG_INFINITY; nq];
    let mut l = vec![0f32; nq];
    softmax_rows(&mut s, len, &mut m, &mut l);
    // Pass 3: softmax weights summed per value codeword for up to 8 queries at once, multiplied
    // with the value codebook once.
    let vsub = 1usize << a.v_nbits;
    let vm = a.v_m;
    let dsub = d / vm;
    let ct = &vt[h * vm * dsub * vsub..(h + 1) * vm * dsub * vsub];
    #[cfg(target_arch = "x86_64")]
    if a.v_nbits == 4 && crate::simd::has_avx2_fma() {
        let mut acc = vec![0f32; nq * d];
        let cent = &a.v_cent[h * vm * 16 * dsub..(h + 1) * vm * 16 * dsub];
        if lookup512(a.v_nbits) {
            // SAFETY: lookup512 says the CPU has the AVX-512 level (F, BW, VBMI) and AVX2+FMA.
            unsafe {
                super::avx512::weighted_values(&s, nq, len, vc, cv, vm, dsub, cent, &mut acc)
            };
        } else {
            // SAFETY: AVX2 and FMA are available (checked just above).
            unsafe {
                super::values::avx2::weighted_values(&s, nq, len, vc, cv, vm, dsub, cent, &mut acc)
            };
        }
        return (0..nq)
            .map(|qi| Partial {
                m: m[qi],
                l: l[qi],
                acc: acc[qi * d..(qi + 1) * d].to_vec(),
            })
            .collect();
    }
    let mut w = vec![0f32; nq * vm * vsub];
    let mut q0 = 0;
    while q0 < nq {
        let cnt = (nq - q0).min(8);
        let dst = &mut w[q0 * vm * vsub..(q0 + cnt) * vm * vsub];
        if cnt <= 4 {
            value_weights::<4>(&s, len, q0, cnt, vc, cv, a.v_nbits, vm, dst);
        } else {
            value_weights::<8>(&s, len, q0, cnt, vc, cv, a.v_nbits, vm, dst);
        }
        q0 += cnt;
    }
    // Value codebook transposed, Layout (m, dsub, ksub): one contiguous dot product per output
    // dimension.
    let mut out = Vec::with_capacity(nq);
    for qi in 0..nq {
        let w = &w[qi * vm * vsub..(qi + 1) * vm * vsub];
        let mut acc = vec![0f32; d];
        for j in 0..vm {
            let wj = &w[j * vsub..(j + 1) * vsub];
            for dd in 0..dsub {
                acc[j * dsub + dd] =
                    dot(wj, &ct[(j * dsub + dd) * vsub..(j * dsub + dd + 1) * vsub]);
            }
        }
        out.push(Partial {
            m: m[qi],
            l: l[qi],
            acc,
        });
    }
    out
}

/// Exact attention of the group's queries over fp tokens `[lo, hi)` of `(b, h)`.
#[inline(always)]
fn fp_chunk(a: &PqAttention, b: usize, h: usize, lo: usize, hi: usize) -> Vec<Partial> {
    let (tq, d) = (a.tq, a.d);
    let nq = a.hq / a.hkv * tq;
    let (fs, fe) = a.fp_range[b];
    let base = (b * a.hkv + h) * a.f * d;
    // Visible tokens of each query, counted from `lo`.
    let ends: Vec<usize> = (0..nq)
        .map(|qi| {
            let t = qi % tq;
            let visible = if a.causal {
                fe.saturating_sub(tq - 1 - t).max(fs)
            } else {
                fe
            };
            visible.clamp(lo, hi) - lo
        })
        .collect();
    let seg = (
        &a.fp_k[base + lo * d..base + hi * d],
        &a.fp_v[base + lo * d..base + hi * d],
    );
    exact_part(a, b, h, &[seg], &ends)
}

/// Exact attention of the group's queries over the selected pages `ids[lo..hi]` of `(b, h)`.
#[inline(always)]
fn pages_chunk(
    a: &PqAttention,
    p: &Pages,
    b: usize,
    h: usize,
    lo: usize,
    hi: usize,
) -> Vec<Partial> {
    let d = a.d;
    let base = (b * a.hkv + h) * p.n * d;
    let ids = &p.ids[(b * a.hkv + h) * p.s + lo..(b * a.hkv + h) * p.s + hi];
    let segs: Vec<(&[f32], &[f32])> = ids
        .iter()
        .filter(|&&id| id >= 0)
        .map(|&id| {
            let r0 = id as usize * p.size;
            let r1 = (r0 + p.size).min(p.n);
            (
                &p.k[base + r0 * d..base + r1 * d],
                &p.v[base + r0 * d..base + r1 * d],
            )
        })
        .collect();
    let len = segs.iter().map(|(k, _)| k.len() / d).sum();
    exact_part(a, b, h, &segs, &vec![len; a.hq / a.hkv * a.tq])
}

/// Exact attention of the group's queries of `(b, h)` over the key/value rows of `segs` (in
/// order); query `qi` sees the first `ends[qi]` of those tokens.
///
/// Scores: two keys against up to four queries per pass (eight independent FMA chains, every
/// key and query row loaded once per pass). Values: the group's outputs are accumulated in
/// 16-wide slices held in registers over all tokens, so each value row is loaded once per slice
/// for every query of the group.
#[inline(always)]
fn exact_part(
    a: &PqAttention,
    b: usize,
    h: usize,
    segs: &[(&[f32], &[f32])],
    ends: &[usize],
) -> Vec<Partial> {
    let (g, tq, d) = (a.hq / a.hkv, a.tq, a.d);
    let nq = g * tq;
    // The group's query rows are contiguous: Layout (nq, d).
    let q = &a.q[(b * a.hq + h * g) * tq * d..(b * a.hq + (h + 1) * g) * tq * d];
    let len: usize = segs.iter().map(|(k, _)| k.len() / d).sum();
    let mut s = vec![0f32; nq * len];
    let mut off = 0;
    for (keys, _) in segs {
        for q0 in (0..nq).step_by(4) {
            let n = (nq - q0).min(4);
            match n {
                1 => score_rows::<1>(q, keys, d, a.scale, &mut s, len, q0, off),
                2 => score_rows::<2>(q, keys, d, a.scale, &mut s, len, q0, off),
                3 => score_rows::<3>(q, keys, d, a.scale, &mut s, len, q0, off),
                _ => score_rows::<4>(q, keys, d, a.scale, &mut s, len, q0, off),
            }
        }
        off += keys.len() / d;
    }
    let mut m = vec![f32::NEG_INFINITY; nq];
    let mut l = vec![0f32; nq];
    for qi in 0..nq {
        let row = &mut s[qi * len..(qi + 1) * len];
        let (seen, hidden) = row.split_at_mut(ends[qi].min(len));
        hidden.fill(0.0);
        let mx = max_of(seen);
        m[qi] = mx;
        if mx == f32::NEG_INFINITY {
            seen.fill(0.0);
            continue;
        }
        let mut sum = 0f32;
        for x in seen.iter_mut() {
            *x = exp_neg(*x - mx);
            sum += *x;
        }
        l[qi] = sum;
    }
    let mut acc = vec![0f32; nq * d];
    let mut off = 0;
    for (_, vals) in segs {
        for q0 in (0..nq).step_by(4) {
            let n = (nq - q0).min(4);
            match n {
                1 => accumulate_rows::<1>(&s, len, q0, off, vals, d, &mut acc),
                2 => accumulate_rows::<2>(&s, len, q0, off, vals, d, &mut acc),
                3 => accumulate_rows::<3>(&s, len, q0, off, vals, d, &mut acc),
                _ => accumulate_rows::<4>(&s, len, q0, off, vals, d, &mut acc),
            }
        }
        off += vals.len() / d;
    }
    (0..nq)
        .map(|qi| Partial {
            m: m[qi],
            l: l[qi],
            acc: acc[qi * d..(qi + 1) * d].to_vec(),
        })
        .collect()
}

/// `s[(q0 + k) * len + off + i] = scale * q[q0 + k] . keys[i]` for `k < Q` and every key row.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn score_rows<const Q: usize>(
    q: &[f32],
    keys: &[f32],
    d: usize,
    scale: f32,
    s: &mut [f32],
    len: usize,
    q0: usize,
    off: usize,
) {
    let n = keys.len() / d;
    let d8 = d / 8 * 8;
    let qr: [&[f32]; Q] = std::array::from_fn(|k| &q[(q0 + k) * d..(q0 + k + 1) * d]);
    let mut i = 0;
    while i < n {
        let two = i + 1 < n;
        let k0 = &keys[i * d..(i + 1) * d];
        let k1 = if two {
            &keys[(i + 1) * d..(i + 2) * d]
        } else {
            k0
        };
        let mut acc = [[[0f32; 8]; 2]; Q];
        for c in (0..d8).step_by(8) {
            let a0: [f32; 8] = k0[c..c + 8].try_into().unwrap();
            let a1: [f32; 8] = k1[c..c + 8].try_into().unwrap();
            for k in 0..Q {
                let qv: [f32; 8] = qr[k][c..c + 8].try_into().unwrap();
                for l in 0..8 {
                    acc[k][0][l] = qv[l].mul_add(a0[l], acc[k][0][l]);
                    acc[k][1][l] = qv[l].mul_add(a1[l], acc[k][1][l]);
                }
            }
        }
        for k in 0..Q {
            let (mut t0, mut t1) = (hsum8(acc[k][0]), hsum8(acc[k][1]));
            for c in d8..d {
                t0 = qr[k][c].mul_add(k0[c], t0);
                t1 = qr[k][c].mul_add(k1[c], t1);
            }
            let row = (q0 + k) * len + off + i;
            s[row] = t0 * scale;
            if two {
                s[row + 1] = t1 * scale;
            }
        }
        i += 2;
    }
}

/// Sum of eight lanes as a tree (independent adds; a left-to-right sum is a chain of seven).
#[inline(always)]
fn hsum8(a: [f32; 8]) -> f32 {
    let b = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (b[0] + b[2]) + (b[1] + b[3])
}

/// `acc[q0 + k] += sum_i s[(q0 + k) * len + off + i] * vals[i]` for `k < Q`.
#[inline(always)]
fn accumulate_rows<const Q: usize>(
    s: &[f32],
    len: usize,
    q0: usize,
    off: usize,
    vals: &[f32],
    d: usize,
    acc: &mut [f32],
) {
    const W: usize = 16;
    let n = vals.len() / d;
    let p: [&[f32]; Q] =
        std::array::from_fn(|k| &s[(q0 + k) * len + off..(q0 + k) * len + off + n]);
    let dw = d / W * W;
    for c in (0..dw).step_by(W) {
        let mut o: [[f32; W]; Q] = std::array::from_fn(|k| {
            acc[(q0 + k) * d + c..(q0 + k) * d + c + W]
                .try_into()
                .unwrap()
        });
        for (i, v) in vals.chunks_exact(d).enumerate() {
            let v: [f32; W] = v[c..c + W].try_into().unwrap();
            for k in 0..Q {
                let pk = p[k][i];
                for l in 0..W {
                    o[k][l] = pk.mul_add(v[l], o[k][l]);
                }
            }
        }
        for k in 0..Q {
            acc[(q0 + k) * d + c..(q0 + k) * d + c + W].copy_from_slice(&o[k]);
        }
    }
    if dw < d {
        for (i, v) in vals.chunks_exact(d).enumerate() {
            for k in 0..Q {
                let pk = p[k][i];
                for (x, &y) in acc[(q0 + k) * d + dw..(q0 + k + 1) * d]
                    .iter_mut()
                    .zip(&v[dw..])
                {
                    *x = pk.mul_add(y, *x);
                }
            }
        }
    }
}

/// Softmax attention over `[decode(codes); fp]` for every query, without decoding.
///
/// Returns `(out, lse)`: Layout `(batch, hq, tq, d)` and `(batch, hq, tq)` (natural-log
/// log-sum-exp of the scaled scores; `-inf` and a zero output for a query that sees nothing).
pub fn pq_attention(a: &PqAttention) -> Result<(Vec<f32>, Vec<f32>)> {
    attend(a, None)
}

/// [`pq_attention`] over `[decode(codes); selected pages; fp]`: the pages are attended where they
/// are (Quest-style selection without a gather copy). Returns `(out, lse)` as [`pq_attention`].
pub fn paged_attention(a: &PqAttention, pages: &Pages) -> Result<(Vec<f32>, Vec<f32>)> {
    pages.validate(a.batch, a.hkv, a.d)?;
    attend(a, Some(pages))
}

fn attend(a: &PqAttention, pages: Option<&Pages>) -> Result<(Vec<f32>, Vec<f32>)> {
    a.validate()?;
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
            Part::Fp(lo, hi) => crate::dispatch!(fp_chunk(a, b, h, lo, hi)),
            Part::Pages(lo, hi) => match pages {
                Some(p) => crate::dispatch!(pages_chunk(a, p, b, h, lo, hi)),
                None => unreachable!("page items exist only with pages"),
            },
            Part::Codes(lo, hi) => {
                crate::dispatch!(codes_chunk(a, &tables[b * a.hkv + h], &vt, b, h, lo, hi))
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

/// `sum_d max(q_d * lo_d, q_d * hi_d)` with eight independent lanes (vectorizes).
#[inline(always)]
fn bound(q: &[f32], lo: &[f32], hi: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let n8 = q.len() / 8 * 8;
    for ((x, a), c) in q[..n8]
        .chunks_exact(8)
        .zip(lo[..n8].chunks_exact(8))
        .zip(hi[..n8].chunks_exact(8))
    {
        for l in 0..8 {
            acc[l] += (x[l] * a[l]).max(x[l] * c[l]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for ((x, a), c) in q[n8..].iter().zip(&lo[n8..]).zip(&hi[n8..]) {
        s += (x * a).max(x * c);
    }
    s
}

/// Quest page scores: for each page, an upper bound of `q . k` over its keys from the per-page
/// key minimum and maximum, maximized over the query heads of the KV head's group and the
/// query tokens.
///
/// `q`: `(batch, hq, tq, d)`; `kmin`, `kmax`: `(batch, hkv, pages, d)`. Returns
/// `(batch, hkv, pages)`.
#[allow(clippy::too_many_arguments)]
pub fn page_scores(
    q: &[f32],
    kmin: &[f32],
    kmax: &[f32],
    batch: usize,
    hq: usize,
    hkv: usize,
    tq: usize,
    pages: usize,
    d: usize,
) -> Result<Vec<f32>> {
    check_heads(hq, hkv)?;
    if q.len() != batch * hq * tq * d {
        return Err(Error::shape(
            "q",
            format!("[{batch}, {hq}, {tq}, {d}]"),
            format!("{} values", q.len()),
        ));
    }
    for (what, x) in [("kmin", kmin), ("kmax", kmax)] {
        if x.len() != batch * hkv * pages * d {
            return Err(Error::shape(
                what,
                format!("[{batch}, {hkv}, {pages}, {d}]"),
                format!("{} values", x.len()),
            ));
        }
    }
    let g = hq / hkv;
    let mut out = vec![f32::NEG_INFINITY; batch * hkv * pages];
    let score_rows = |bh: usize, p0: usize, row: &mut [f32]| {
        let (b, h) = (bh / hkv, bh % hkv);
        for (i, o) in row.iter_mut().enumerate() {
            let base = (bh * pages + p0 + i) * d;
            let (lo, hi) = (&kmin[base..base + d], &kmax[base..base + d]);
            for gi in 0..g {
                for t in 0..tq {
                    let qr = ((b * hq + h * g + gi) * tq + t) * d;
                    *o = o.max(bound(&q[qr..qr + d], lo, hi));
                }
            }
        }
    };
    const PAGES_PER_TASK: usize = 512;
    let per_row = pages.div_ceil(PAGES_PER_TASK);
    let parts = crate::parallel::map(out.len() / pages.max(1) * per_row, |t| {
        let (bh, c) = (t / per_row, t % per_row);
        let p0 = c * PAGES_PER_TASK;
        let mut part = vec![f32::NEG_INFINITY; (pages - p0).min(PAGES_PER_TASK)];
        crate::dispatch!(score_rows(bh, p0, &mut part));
        part
    })?;
    for (t, part) in parts.iter().enumerate() {
        let (bh, c) = (t / per_row, t % per_row);
        let p0 = bh * pages + c * PAGES_PER_TASK;
        out[p0..p0 + part.len()].copy_from_slice(part);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pq::ProductQuantizer;
    use crate::rng::SplitMix64;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut r = SplitMix64::new(seed, 0);
        (0..n).map(|_| r.next_f64() as f32 * 2.0 - 1.0).collect()
    }

    #[test]
    fn exp_is_accurate() {
        for i in 0..10000 {
            let x = -(i as f32) * 0.0087;
            let e = x.exp();
            assert!((exp_neg(x) - e).abs() <= 3e-7 * e + 1e-38, "{x}");
        }
        assert_eq!(exp_neg(-1000.0), exp_neg(-87.0));
    }

    /// Reference: decode codes, concatenate fp, plain softmax attention in f64.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        nk: usize,
        hq: usize,
        hkv: usize,
        tq: usize,
        d: usize,
        scale: f32,
        causal_fp: Option<usize>,
    ) -> Vec<f32> {
        let g = hq / hkv;
        let mut out = vec![0f32; hq * tq * d];
        for qh in 0..hq {
            let h = qh / g;
            for t in 0..tq {
                let qv = &q[(qh * tq + t) * d..(qh * tq + t + 1) * d];
                let visible = match causal_fp {
                    Some(fpn) => nk - fpn + (fpn - (tq - 1 - t)),
                    None => nk,
                };
                let s: Vec<f64> = (0..visible)
                    .map(|i| {
                        qv.iter()
                            .zip(&k[(h * nk + i) * d..(h * nk + i + 1) * d])
                            .map(|(a, b)| (*a as f64) * (*b as f64))
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = w.iter().sum();
                for dd in 0..d {
                    let o: f64 = (0..visible)
                        .map(|i| w[i] * v[(h * nk + i) * d + dd] as f64)
                        .sum();
                    out[(qh * tq + t) * d + dd] = (o / z) as f32;
                }
            }
        }
        out
    }

    #[test]
    fn equals_attention_over_decoded_codes() {
        for (hq, hkv, d, km, kn, vm, vn, n, f, tq) in [
            (3, 1, 16, 16, 4, 8, 4, 700, 5, 1),
            (4, 2, 16, 4, 8, 16, 4, 4100, 0, 2),
            (2, 2, 8, 8, 4, 2, 8, 0, 7, 3),
            (8, 1, 16, 16, 4, 16, 4, 9000, 3, 1),
            (2, 1, 16, 16, 4, 16, 4, 10, 9000, 2),
            // 4-bit values on AVX2 (exact table lookups): odd m and dsub > 1, 5 queries (a group
            // of 4 and one of 1), code widths that are and are not multiples of 16 bytes, and
            // lengths that are not multiples of 8, 32 or the 256-token block.
            (5, 1, 12, 12, 4, 3, 4, 37, 2, 1),
            (6, 3, 14, 7, 4, 7, 4, 290, 1, 1),
            (4, 1, 32, 32, 4, 32, 4, 1000, 3, 1),
            // 4-bit codes, 12 and 9 query rows per KV head (the AVX-512 kernels take up to 8 at
            // a time), and 8 rows in one pass.
            (4, 1, 16, 16, 4, 8, 4, 530, 6, 3),
            (9, 1, 16, 8, 4, 16, 4, 300, 2, 1),
            (8, 1, 32, 32, 4, 32, 4, 257, 1, 1),
            // 8-bit keys and values (the CompressedCache default), GQA 3, 4 and 6 queries.
            (3, 1, 16, 8, 8, 8, 8, 700, 5, 1),
            (8, 2, 16, 8, 8, 4, 8, 4100, 3, 1),
            (6, 2, 16, 8, 8, 8, 8, 300, 4, 2),
        ] {
            let mk = |m: usize, nbits: u32, seed: u64| {
                let mut pq = ProductQuantizer::new(d, m, nbits).unwrap();
                pq.train(&rand(300 * d, seed), 3, seed).unwrap();
                pq
            };
            let kpq: Vec<_> = (0..hkv).map(|h| mk(km, kn, h as u64)).collect();
            let vpq: Vec<_> = (0..hkv).map(|h| mk(vm, vn, 10 + h as u64)).collect();
            let kx = rand(hkv * n * d, 1);
            let vx = rand(hkv * n * d, 2);
            let mut kc = Vec::new();
            let mut vc = Vec::new();
            let mut kdec = Vec::new();
            let mut vdec = Vec::new();
            let fk = rand(hkv * f * d, 3);
            let fv = rand(hkv * f * d, 4);
            for h in 0..hkv {
                let a = kpq[h].encode(&kx[h * n * d..(h + 1) * n * d]).unwrap();
                let b = vpq[h].encode(&vx[h * n * d..(h + 1) * n * d]).unwrap();
                kdec.extend(kpq[h].decode(&a).unwrap());
                kdec.extend_from_slice(&fk[h * f * d..(h + 1) * f * d]);
                vdec.extend(vpq[h].decode(&b).unwrap());
                vdec.extend_from_slice(&fv[h * f * d..(h + 1) * f * d]);
                kc.extend(a);
                vc.extend(b);
            }
            let kcent: Vec<f32> = kpq
                .iter()
                .flat_map(|p| p.centroids().unwrap().to_vec())
                .collect();
            let vcent: Vec<f32> = vpq
                .iter()
                .flat_map(|p| p.centroids().unwrap().to_vec())
                .collect();
            let q = rand(hq * tq * d, 5)
                .iter()
                .map(|x| x * 3.0)
                .collect::<Vec<_>>();
            let scale = 1.0 / (d as f32).sqrt();
            let causal = f >= tq;
            let args = PqAttention {
                batch: 1,
                hq,
                hkv,
                tq,
                d,
                q: &q,
                n,
                k_codes: &kc,
                v_codes: &vc,
                k_cent: &kcent,
                k_m: km,
                k_nbits: kn,
                v_cent: &vcent,
                v_m: vm,
                v_nbits: vn,
                code_range: &[(0, n)],
                f,
                fp_k: &fk,
                fp_v: &fv,
                fp_range: &[(0, f)],
                scale,
                causal,
            };
            let (out, lse) = pq_attention(&args).unwrap();
            let want = reference(
                &q,
                &kdec,
                &vdec,
                n + f,
                hq,
                hkv,
                tq,
                d,
                scale,
                causal.then_some(f),
            );
            for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "cfg n={n} f={f} i={i}: {a} vs {b}"
                );
            }
            assert!(lse.iter().all(|x| x.is_finite() == (n + f > 0)));
        }
    }

    /// Attention over pages in place equals attention over the same pages gathered into the
    /// full-precision part (skipped ids, a partial last page, GQA 3, causal Tq = 2, batch 2).
    #[test]
    fn paged_equals_gathered() {
        let (batch, hq, hkv, tq, d, n, size, f) = (
            2usize, 6usize, 2usize, 2usize, 24usize, 300usize, 64usize, 5usize,
        );
        let k = rand(batch * hkv * n * d, 11);
        let v = rand(batch * hkv * n * d, 12);
        let fk = rand(batch * hkv * f * d, 13);
        let fv = rand(batch * hkv * f * d, 14);
        let q: Vec<f32> = rand(batch * hq * tq * d, 15)
            .iter()
            .map(|x| x * 2.0)
            .collect();
        let s = 3;
        let ids: Vec<i64> = vec![4, 0, -1, 2, 3, 1, 1, -1, -1, 4, 2, 0];
        // Gathered: selected rows first, then the fp part, per (b, h).
        let mut gk = Vec::new();
        let mut gv = Vec::new();
        let mut gf = 0;
        let mut lens = Vec::new();
        for bh in 0..batch * hkv {
            let mut rows_k = Vec::new();
            let mut rows_v = Vec::new();
            for &id in &ids[bh * s..(bh + 1) * s] {
                if id < 0 {
                    continue;
                }
                let (r0, r1) = (id as usize * size, ((id as usize + 1) * size).min(n));
                rows_k.extend_from_slice(&k[(bh * n + r0) * d..(bh * n + r1) * d]);
                rows_v.extend_from_slice(&v[(bh * n + r0) * d..(bh * n + r1) * d]);
            }
            rows_k.extend_from_slice(&fk[bh * f * d..(bh + 1) * f * d]);
            rows_v.extend_from_slice(&fv[bh * f * d..(bh + 1) * f * d]);
            gf = gf.max(rows_k.len() / d);
            lens.push(rows_k.len() / d);
            gk.push(rows_k);
            gv.push(rows_v);
        }
        // Each (b, h) right-aligned in a common capacity (left padding).
        let mut fk_all = vec![0f32; batch * hkv * gf * d];
        let mut fv_all = vec![0f32; batch * hkv * gf * d];
        for bh in 0..batch * hkv {
            let pad = gf - lens[bh];
            fk_all[(bh * gf + pad) * d..(bh + 1) * gf * d].copy_from_slice(&gk[bh]);
            fv_all[(bh * gf + pad) * d..(bh + 1) * gf * d].copy_from_slice(&gv[bh]);
        }
        /// [`PqAttention::fp_only`] at scale 0.3 (not the default 1/sqrt(d)) for both sides.
        fn fp_only<'a>(
            q: &'a [f32],
            dims: (usize, usize, usize, usize, usize),
            fk: &'a [f32],
            fv: &'a [f32],
            f: usize,
            fp_range: &'a [(usize, usize)],
            code_range: &'a [(usize, usize)],
        ) -> PqAttention<'a> {
            PqAttention {
                scale: 0.3,
                ..PqAttention::fp_only(dims, q, (f, fk, fv), fp_range, code_range)
            }
        }
        let dims = (batch, hq, hkv, tq, d);
        let ranges = [(0, f); 2];
        let empty = [(0, 0); 2];
        let all = fp_only(&q, dims, &fk, &fv, f, &ranges, &empty);
        let pages = Pages {
            k: &k,
            v: &v,
            n,
            ids: &ids,
            s,
            size,
        };
        let (out, lse) = paged_attention(&all, &pages).unwrap();
        let g = hq / hkv;
        for bh in 0..batch * hkv {
            // Reference per (sequence, KV head): the gathered rows, left-padded to gf.
            let (b, h) = (bh / hkv, bh % hkv);
            let pad = [(gf - lens[bh], gf)];
            let qh = &q[(b * hq + h * g) * tq * d..(b * hq + (h + 1) * g) * tq * d];
            let one = fp_only(
                qh,
                (1, g, 1, tq, d),
                &fk_all[bh * gf * d..(bh + 1) * gf * d],
                &fv_all[bh * gf * d..(bh + 1) * gf * d],
                gf,
                &pad,
                &empty[..1],
            );
            let (want, want_lse) = pq_attention(&one).unwrap();
            let got = &out[(b * hq + h * g) * tq * d..(b * hq + (h + 1) * g) * tq * d];
            for (x, y) in got.iter().zip(&want) {
                assert!(
                    (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                    "bh={bh}: {x} vs {y}"
                );
            }
            let got_lse = &lse[(b * hq + h * g) * tq..(b * hq + (h + 1) * g) * tq];
            for (x, y) in got_lse.iter().zip(&want_lse) {
                assert!(
                    (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                    "bh={bh} lse: {x} vs {y}"
                );
            }
        }
        // Out-of-range ids and mismatched shapes are errors, not panics.
        let bad: Vec<i64> = vec![5; batch * hkv * s];
        let e = paged_attention(&all, &Pages { ids: &bad, ..pages });
        assert!(e.unwrap_err().to_string().contains("out of range"));
        let twice: Vec<i64> = vec![1, -1, 1, 0, 1, 2, 0, 1, 2, 0, 1, 2];
        let e = paged_attention(
            &all,
            &Pages {
                ids: &twice,
                ..pages
            },
        );
        assert!(e.unwrap_err().to_string().contains("appears twice"));
        let e = paged_attention(
            &all,
            &Pages {
                k: &k[1..],
                ..pages
            },
        );
        assert!(e.is_err());
    }
}

/// A/B timings behind the kernel's design choices (ignored by default).
#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod ab {
    use super::*;
    use crate::rng::SplitMix64;

    /// Scores of 4-bit codes from per-nibble tables: `out[i] = sum_j lut[j][code_ij]`, four codes
    /// at a time. `lut`: Layout `(m, 16)`; `codes`: `(n, ceil(m / 2))`.
    #[inline(always)]
    fn scan_nibbles(lut: &[f32], m: usize, codes: &[u8], out: &mut [f32]) {
        let cb = m.div_ceil(2);
        let pairs = m / 2;
        let n = out.len();
        let n4 = n / 4 * 4;
        let t = |j: usize, c: u8| lut[j * 16 + c as usize];
        for i in (0..n4).step_by(4) {
            let c = &codes[i * cb..(i + 4) * cb];
            let (mut s0, mut s1, mut s2, mut s3) = (0f32, 0f32, 0f32, 0f32);
            for bi in 0..pairs {
                let (b0, b1, b2, b3) = (c[bi], c[cb + bi], c[2 * cb + bi], c[3 * cb + bi]);
                s0 += t(2 * bi, b0 & 15) + t(2 * bi + 1, b0 >> 4);
                s1 += t(2 * bi, b1 & 15) + t(2 * bi + 1, b1 >> 4);
                s2 += t(2 * bi, b2 & 15) + t(2 * bi + 1, b2 >> 4);
                s3 += t(2 * bi, b3 & 15) + t(2 * bi + 1, b3 >> 4);
            }
            if m % 2 == 1 {
                s0 += t(m - 1, c[pairs] & 15);
                s1 += t(m - 1, c[cb + pairs] & 15);
                s2 += t(m - 1, c[2 * cb + pairs] & 15);
                s3 += t(m - 1, c[3 * cb + pairs] & 15);
            }
            out[i..i + 4].copy_from_slice(&[s0, s1, s2, s3]);
        }
        for i in n4..n {
            let c = &codes[i * cb..(i + 1) * cb];
            let mut s = 0f32;
            for bi in 0..pairs {
                s += t(2 * bi, c[bi] & 15) + t(2 * bi + 1, c[bi] >> 4);
            }
            if m % 2 == 1 {
                s += t(m - 1, c[pairs] & 15);
            }
            out[i] = s;
        }
    }

    /// Per-byte value histograms (32 adds per token at m = 64, 32 KB table) for the A/B below.
    fn accumulate_bytes(p: &[f32], vc: &[u8], cv: usize, w: &mut [f32]) {
        for (pn, code) in p.iter().zip(vc.chunks_exact(cv)) {
            for (cell, &c) in w.chunks_exact_mut(256).zip(code) {
                cell[c as usize] += pn;
            }
        }
    }

    fn accumulate_nibbles(p: &[f32], vc: &[u8], cv: usize, w: &mut [f32]) {
        for (pn, code) in p.iter().zip(vc.chunks_exact(cv)) {
            for (bi, &c) in code.iter().enumerate() {
                w[2 * bi * 16 + (c & 15) as usize] += pn;
                w[(2 * bi + 1) * 16 + (c >> 4) as usize] += pn;
            }
        }
    }

    #[test]
    #[ignore]
    fn ab_value_accumulation() {
        let (m, n) = (64usize, 4096usize);
        let cv = m / 2;
        let mut r = SplitMix64::new(2, 0);
        let codes: Vec<u8> = (0..n * cv).map(|_| r.next_u64() as u8).collect();
        let p: Vec<f32> = (0..n).map(|_| r.next_f64() as f32).collect();
        let mut wb = vec![0f32; cv * 256];
        let mut wn = vec![0f32; m * 16];
        let (mut ta, mut tb) = (f64::MAX, f64::MAX);
        for _ in 0..50 {
            let t = std::time::Instant::now();
            for _ in 0..20 {
                crate::dispatch!(accumulate_bytes(&p, &codes, cv, &mut wb));
            }
            ta = ta.min(t.elapsed().as_secs_f64());
            let t = std::time::Instant::now();
            for _ in 0..20 {
                crate::dispatch!(accumulate_nibbles(&p, &codes, cv, &mut wn));
            }
            tb = tb.min(t.elapsed().as_secs_f64());
        }
        println!(
            "byte cells: {:.1} ns/token, nibble cells: {:.1} ns/token",
            ta / 20.0 / n as f64 * 1e9,
            tb / 20.0 / n as f64 * 1e9
        );
    }

    #[test]
    #[ignore]
    fn ab_shuffle24_vs_pair_tables() {
        let (m, n, g) = (64usize, 4096usize, 3usize);
        let cb = m / 2;
        let mut r = SplitMix64::new(5, 0);
        let codes: Vec<u8> = (0..n * cb).map(|_| r.next_u64() as u8).collect();
        let luts: Vec<Vec<f32>> = (0..g)
            .map(|_| (0..m * 16).map(|_| r.next_f64() as f32).collect())
            .collect();
        let mut pairs = vec![[0f32; 256]; g * cb];
        for (q, lut) in luts.iter().enumerate() {
            crate::pq::kernels::pair_tables_4bit(lut, m, &mut pairs[q * cb..(q + 1) * cb]);
        }
        let qs: Vec<_> = luts
            .iter()
            .map(|l| crate::pq::fastscan::quantize_exact(l, m))
            .collect();
        let mut out = vec![0f32; g * n];
        let (mut ta, mut tb) = (f64::MAX, f64::MAX);
        for _ in 0..30 {
            let t = std::time::Instant::now();
            for q in 0..g {
                crate::dispatch!(scan_bytes(
                    &pairs[q * cb..(q + 1) * cb],
                    &codes,
                    &mut out[q * n..(q + 1) * n]
                ));
            }
            ta = ta.min(t.elapsed().as_secs_f64());
            let t = std::time::Instant::now();
            let mut rows: Vec<&mut [f32]> = out.chunks_exact_mut(n).collect();
            crate::pq::fastscan::scan(&qs, &codes, cb, &mut rows);
            tb = tb.min(t.elapsed().as_secs_f64());
        }
        let per = |t: f64| t / (n * g) as f64 * 1e9;
        println!(
            "K scan: pair tables {:.1} vs 24-bit shuffle {:.1} ns/token-query",
            per(ta),
            per(tb)
        );
    }

    /// Alternating timing of the two 4-bit key scans (run with `--ignored --nocapture`).
    #[test]
    #[ignore]
    fn ab_key_scan() {
        let (m, n) = (64usize, 4096usize);
        let cb = m / 2;
        let mut r = SplitMix64::new(1, 0);
        let codes: Vec<u8> = (0..n * cb).map(|_| r.next_u64() as u8).collect();
        let lut: Vec<f32> = (0..m * 16).map(|_| r.next_f64() as f32).collect();
        let mut pairs = vec![[0f32; 256]; cb];
        crate::pq::kernels::pair_tables_4bit(&lut, m, &mut pairs);
        let mut out = vec![0f32; n];
        let (mut ta, mut tb) = (f64::MAX, f64::MAX);
        for _ in 0..50 {
            let t = std::time::Instant::now();
            for _ in 0..20 {
                crate::dispatch!(scan_bytes(&pairs, &codes, &mut out));
            }
            ta = ta.min(t.elapsed().as_secs_f64());
            let t = std::time::Instant::now();
            for _ in 0..20 {
                crate::dispatch!(scan_nibbles(&lut, m, &codes, &mut out));
            }
            tb = tb.min(t.elapsed().as_secs_f64());
        }
        println!(
            "pair tables: {:.1} ns/code, nibbles: {:.1} ns/code",
            ta / 20.0 / n as f64 * 1e9,
            tb / 20.0 / n as f64 * 1e9
        );
    }

    /// Where one 4096-token chunk of codes_chunk goes (Llama-8B shape: 4 queries, d 128, 4-bit
    /// keys and values at m = 128), one thread: key scan, softmax, values. Run with
    /// `--ignored --nocapture`.
    #[test]
    #[ignore]
    fn ab_chunk_parts() {
        // AB_SHAPE=smol: SmolLM2's (head_dim 64, 3 query heads per KV head).
        let smol = std::env::var("AB_SHAPE").is_ok_and(|v| v == "smol");
        let (m, n, nq, d) = if smol {
            (64usize, 4096usize, 3usize, 64usize)
        } else {
            (128, 4096, 4, 128)
        };
        let cb = m / 2;
        let mut r = SplitMix64::new(3, 0);
        let kc: Vec<u8> = (0..n * cb).map(|_| r.next_u64() as u8).collect();
        let vc: Vec<u8> = (0..n * cb).map(|_| r.next_u64() as u8).collect();
        let cent: Vec<f32> = (0..m * 16).map(|_| r.next_f64() as f32 - 0.5).collect();
        let q: Vec<f32> = (0..nq * d).map(|_| r.next_f64() as f32 - 0.5).collect();
        let luts: Vec<QuantLut> = (0..nq)
            .map(|_| {
                let lut: Vec<f32> = (0..m * 16).map(|_| r.next_f64() as f32).collect();
                fastscan::quantize_exact(&lut, m)
            })
            .collect();
        let mut s = vec![0f32; nq * n];
        let mut out = vec![0f32; nq * d];
        let mut cols = vec![0u8; n * cb];
        let (mut ml, mut ll) = (vec![0f32; nq], vec![0f32; nq]);
        let mut best = [f64::MAX; 6];
        let time = |slot: &mut f64, f: &mut dyn FnMut()| {
            let t = std::time::Instant::now();
            f();
            *slot = slot.min(t.elapsed().as_secs_f64());
        };
        if !crate::simd::has_avx2_fma() {
            return;
        }
        for _ in 0..30 {
            let [t_tr, t_scan, t_exp, t_val, t_k512, t_v512] = &mut best;
            // SAFETY (all blocks): AVX2/FMA checked above, AVX-512 checked where used.
            time(t_tr, &mut || unsafe {
                super::super::values::avx2::transpose(
                    &kc[..256 * cb],
                    256,
                    cb,
                    &mut cols[..256 * cb],
                    256,
                )
            });
            time(t_scan, &mut || {
                let mut rows: Vec<&mut [f32]> = s.chunks_exact_mut(n).collect();
                fastscan::scan(&luts, &kc, cb, &mut rows);
            });
            time(t_exp, &mut || {
                crate::dispatch!(softmax_rows(&mut s, n, &mut ml, &mut ll))
            });
            time(t_val, &mut || unsafe {
                super::super::values::avx2::weighted_values(
                    &s, nq, n, &vc, cb, m, 1, &cent, &mut out,
                )
            });
            if crate::simd::has_avx512() {
                time(t_k512, &mut || unsafe {
                    super::super::avx512::key_scores(&q, 0.1, nq, n, &kc, cb, m, 1, &cent, &mut s)
                });
                time(t_v512, &mut || unsafe {
                    super::super::avx512::weighted_values(&s, nq, n, &vc, cb, m, 1, &cent, &mut out)
                });
            }
        }
        let ns = |t: f64| t / n as f64 * 1e9;
        println!(
            "per token ({nq} queries, head_dim {d}, 4-bit): transpose {:.1} ns (x16 per 256 of 4096), softmax {:.1} ns; \
             AVX2: key scan {:.1} ns, values {:.1} ns; AVX-512: keys {:.1} ns, values {:.1} ns",
            ns(best[0] * 16.0),
            ns(best[2]),
            ns(best[1]),
            ns(best[3]),
            ns(best[4]),
            ns(best[5])
        );
    }

    /// codes_chunk-like work over 64 chunks of fresh (uncached) codes vs one cached chunk, one
    /// thread: how much the DRAM stream adds. Run with `--ignored --nocapture`.
    #[test]
    #[ignore]
    fn ab_chunk_cold() {
        let smol = std::env::var("AB_SHAPE").is_ok_and(|v| v == "smol");
        let (m, n, nq, d, chunks) = if smol {
            (64usize, 4096usize, 3usize, 64usize, 512usize)
        } else {
            (128, 4096, 4, 128, 256)
        };
        let cb = m / 2;
        let mut r = SplitMix64::new(3, 0);
        let kc: Vec<u8> = (0..chunks * n * cb).map(|_| r.next_u64() as u8).collect();
        let vc: Vec<u8> = (0..chunks * n * cb).map(|_| r.next_u64() as u8).collect();
        let cent: Vec<f32> = (0..m * 16).map(|_| r.next_f64() as f32 - 0.5).collect();
        let luts: Vec<QuantLut> = (0..nq)
            .map(|_| {
                let lut: Vec<f32> = (0..m * 16).map(|_| r.next_f64() as f32 * 0.1).collect();
                fastscan::quantize_exact(&lut, m)
            })
            .collect();
        let q: Vec<f32> = (0..nq * d).map(|_| r.next_f64() as f32 - 0.5).collect();
        let mut s = vec![0f32; nq * n];
        let mut out = vec![0f32; nq * d];
        let (mut ml, mut ll) = (vec![0f32; nq], vec![0f32; nq]);
        let mut run = |c: usize| {
            let k = &kc[c * n * cb..(c + 1) * n * cb];
            let v = &vc[c * n * cb..(c + 1) * n * cb];
            #[cfg(target_arch = "x86_64")]
            if crate::simd::has_avx512() {
                // SAFETY (both blocks): AVX-512 checked just above.
                unsafe {
                    super::super::avx512::key_scores(&q, 0.1, nq, n, k, cb, m, 1, &cent, &mut s)
                };
                softmax_rows(&mut s, n, &mut ml, &mut ll);
                unsafe {
                    super::super::avx512::weighted_values(&s, nq, n, v, cb, m, 1, &cent, &mut out)
                };
                return;
            }
            let mut rows: Vec<&mut [f32]> = s.chunks_exact_mut(n).collect();
            fastscan::scan(&luts, k, cb, &mut rows);
            crate::dispatch!(softmax_rows(&mut s, n, &mut ml, &mut ll));
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the ab tests run on AVX2 machines (checked by dispatch users).
            unsafe {
                super::super::values::avx2::weighted_values(&s, nq, n, v, cb, m, 1, &cent, &mut out)
            };
        };
        // The bytes alone: a sequential sum over every chunk's codes.
        let mut stream = f64::MAX;
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let mut acc = 0u64;
            for c in 0..chunks {
                for w in kc[c * n * cb..(c + 1) * n * cb]
                    .chunks_exact(8)
                    .chain(vc[c * n * cb..(c + 1) * n * cb].chunks_exact(8))
                {
                    acc = acc.wrapping_add(u64::from_le_bytes(w.try_into().unwrap()));
                }
            }
            std::hint::black_box(acc);
            stream = stream.min(t.elapsed().as_secs_f64());
        }
        println!(
            "sequential sum of the codes: {:.1} ns per token-head ({:.1} GB/s)",
            stream / (chunks * n) as f64 * 1e9,
            (2 * chunks * n * cb) as f64 / stream / 1e9
        );
        let (mut hot, mut cold) = (f64::MAX, f64::MAX);
        for _ in 0..3 {
            let t = std::time::Instant::now();
            for _ in 0..chunks {
                run(0);
            }
            hot = hot.min(t.elapsed().as_secs_f64());
            let t = std::time::Instant::now();
            for c in 0..chunks {
                run(c);
            }
            cold = cold.min(t.elapsed().as_secs_f64());
        }
        let ns = |t: f64| t / (chunks * n) as f64 * 1e9;
        println!(
            "per token-head: cached {:.1} ns, streamed {:.1} ns",
            ns(hot),
            ns(cold)
        );
    }
}
