//! Attention over 4-bit codes with AVX-512: keys and values decoded by 16-entry table lookups.
//!
//! A 4-bit code of subquantizer `j` stands for `dsub` floats `T_o[code]`, `o = j * dsub + dd`:
//! one 16-float table per dimension, which is exactly one AVX-512 register. One `vpermps` then
//! decodes that dimension for 16 tokens, and the group's queries consume the decoded lanes with
//! one FMA each:
//!
//! * key scores: `s_q[i] += q[o] * T_o[code_i]` (the query weight broadcast), so a table lookup
//!   is shared by every query of the GQA group and there are no per-query tables to build;
//! * values: `acc_q[o] += p_q[i] * T_o[code_i]` over the softmax weights `p`.
//!
//! Both are float arithmetic on the exact centroids (no table quantization): the result equals
//! attention over the decoded codes up to float summation order. Per token and dimension the
//! cost is `1/16` of a lookup plus `queries/16` FMAs, so the kernels run at the FMA rate, the same
//! work SDPA does on dense float keys while reading 1/8 of the bytes (4-bit codes).
//!
//! Codes are transposed per block of [`TB`] tokens to column-major (one row of bytes per code
//! byte): one 16-byte load gives 16 tokens' codes of two subquantizers (low and high nibble).

// Register arrays indexed by query and token group read best as index loops.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::values::avx2::transpose;
use super::values::{ahead, block_weights, prefetch_range, tables, TB};

/// One transposed block of codes and what the kernels need to decode it.
#[derive(Clone, Copy)]
struct Block<'a> {
    /// Column-major codes, Layout `(cb, rp)`: `rows` tokens padded to `rp` (a multiple of 32)
    /// with code 0.
    cols: &'a [u8],
    rp: usize,
    rows: usize,
    /// Code bytes per token.
    cb: usize,
    /// Dimensions per subquantizer.
    dsub: usize,
    /// Per-dimension tables, Layout `(2 * cb * dsub, 16)` (see [`tables`]).
    tab: &'a [f32],
    /// Codes of the block two ahead, prefetched a slice at a time while this one is computed.
    next: &'a [u8],
}

/// Transpose `codes` (Layout `(len, cb)`) block by block and call `f(block, first token)`.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx2,fma")]
unsafe fn blocks(
    codes: &[u8],
    cb: usize,
    dsub: usize,
    tab: &[f32],
    mut f: impl FnMut(Block, usize),
) {
    let len = codes.len() / cb;
    let mut cols = vec![0u8; cb * TB];
    for t0 in (0..len).step_by(TB) {
        let rows = (len - t0).min(TB);
        let rp = rows.div_ceil(32) * 32;
        let cols = &mut cols[..cb * rp];
        transpose(&codes[t0 * cb..(t0 + rows) * cb], rows, cb, cols, rp);
        let next = ahead(codes, cb, t0 + rows);
        f(
            Block {
                cols,
                rp,
                rows,
                cb,
                dsub,
                tab,
                next,
            },
            t0,
        );
    }
}

/// `by_queries!(qn, kernel(args..))` calls `kernel::<Q, TG>(args..)` for `qn` (1 to 8) queries:
/// up to 4 queries two groups of 16 tokens at a time, more queries one group (so there are
/// `2 * Q * TG` = 4 to 16 independent FMA chains and the accumulators fit in 32 registers).
macro_rules! by_queries {
    ($qn:expr, $kernel:ident($($arg:expr),*)) => {
        match $qn {
            1 => $kernel::<1, 2>($($arg),*),
            2 => $kernel::<2, 2>($($arg),*),
            3 => $kernel::<3, 2>($($arg),*),
            4 => $kernel::<4, 2>($($arg),*),
            5 => $kernel::<5, 1>($($arg),*),
            6 => $kernel::<6, 1>($($arg),*),
            7 => $kernel::<7, 1>($($arg),*),
            _ => $kernel::<8, 1>($($arg),*),
        }
    };
}

/// Key scores: `s[q * len + i] = scale * sum_o q_rows[q * d + o] * T_o[code of token i]`.
///
/// `q_rows`: Layout `(nq, d)`, `d = km * dsub`; `kc`: Layout `(len, ck)` (subquantizer `j` in
/// byte `j / 2`, low nibble first); `cent`: this KV head's key centroids, Layout
/// `(km, 16, dsub)`; `s`: Layout `(nq, len)`.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VBMI, AVX2 and FMA.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx2,fma")]
pub unsafe fn key_scores(
    q_rows: &[f32],
    scale: f32,
    nq: usize,
    len: usize,
    kc: &[u8],
    ck: usize,
    km: usize,
    dsub: usize,
    cent: &[f32],
    s: &mut [f32],
) {
    let d = km * dsub;
    let dp = 2 * ck * dsub;
    assert!(ck == km.div_ceil(2) && kc.len() == len * ck && cent.len() == km * 16 * dsub);
    assert!(q_rows.len() == nq * d && s.len() == nq * len);
    let tab = tables(cent, km, dsub, ck);
    // Scaled query rows padded to dp dimensions (weight 0 on the padding subquantizer).
    let mut qp = vec![0f32; nq * dp];
    for qi in 0..nq {
        for (o, &x) in qp[qi * dp..qi * dp + d]
            .iter_mut()
            .zip(&q_rows[qi * d..(qi + 1) * d])
        {
            *o = x * scale;
        }
    }
    blocks(kc, ck, dsub, &tab, |blk, t0| {
        for q0 in (0..nq).step_by(8) {
            let qn = (nq - q0).min(8);
            let qs = &qp[q0 * dp..(q0 + qn) * dp];
            let out = &mut s[q0 * len..(q0 + qn) * len];
            by_queries!(qn, key_block(blk, qs, out, t0));
        }
    });
}

/// Scores of `Q` queries over one block: `TG` groups of 16 tokens at a time, the two nibbles of a
/// code byte in separate accumulators (`2 * Q * TG` independent FMA chains).
#[inline(always)]
unsafe fn key_block<const Q: usize, const TG: usize>(
    blk: Block,
    q: &[f32],
    out: &mut [f32],
    t0: usize,
) {
    let Block {
        cols,
        rp,
        rows,
        cb,
        dsub,
        tab,
        next,
    } = blk;
    let dp = 2 * cb * dsub;
    let len = out.len() / Q;
    debug_assert!(rp.is_multiple_of(16 * TG) && q.len() == Q * dp && t0 + rows <= len);
    let (tab, q) = (tab.as_ptr(), q.as_ptr());
    for g0 in (0..rp).step_by(16 * TG) {
        prefetch_range(next, g0 * cb, (g0 + 16 * TG) * cb);
        let mut acc = [[[_mm512_setzero_ps(); Q]; 2]; TG];
        for b in 0..cb {
            // SAFETY: cols has rp bytes per code byte and g0 + 16 * TG <= rp.
            let col = cols.as_ptr().add(b * rp + g0);
            let lo: [__m512i; TG] = std::array::from_fn(|t| {
                _mm512_cvtepu8_epi32(_mm_loadu_si128(col.add(16 * t) as _))
            });
            // vpermps reads index bits 0-3: the low nibble as is, the high one shifted down.
            let hi: [__m512i; TG] = std::array::from_fn(|t| _mm512_srli_epi32::<4>(lo[t]));
            for dd in 0..dsub {
                let o0 = 2 * b * dsub + dd;
                let o1 = o0 + dsub;
                // SAFETY: tab has 16 floats per row o < dp; q has dp floats per query.
                let t0v = _mm512_loadu_ps(tab.add(o0 * 16));
                let t1v = _mm512_loadu_ps(tab.add(o1 * 16));
                for t in 0..TG {
                    let k0 = _mm512_permutexvar_ps(lo[t], t0v);
                    let k1 = _mm512_permutexvar_ps(hi[t], t1v);
                    for k in 0..Q {
                        let w0 = _mm512_set1_ps(*q.add(k * dp + o0));
                        let w1 = _mm512_set1_ps(*q.add(k * dp + o1));
                        acc[t][0][k] = _mm512_fmadd_ps(w0, k0, acc[t][0][k]);
                        acc[t][1][k] = _mm512_fmadd_ps(w1, k1, acc[t][1][k]);
                    }
                }
            }
        }
        for (t, a) in acc.iter().enumerate() {
            let start = g0 + 16 * t;
            if start >= rows {
                break;
            }
            let mask: __mmask16 = if rows - start >= 16 {
                0xffff
            } else {
                (1u16 << (rows - start)) - 1
            };
            for k in 0..Q {
                // SAFETY: lanes written are tokens t0 + start .. t0 + min(rows, start + 16) of
                // row k of out (Layout (Q, len)).
                let dst = out.as_mut_ptr().add(k * len + t0 + start);
                _mm512_mask_storeu_ps(dst, mask, _mm512_add_ps(a[0][k], a[1][k]));
            }
        }
    }
}

/// Softmax numerators in place: per row of `s` (Layout `(nq, len)`), `m[q]` = row max,
/// `s[q][i] = exp(s[q][i] - m[q])`, `l[q]` = their sum (with [`super::exp_neg`]'s arithmetic).
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VBMI, AVX2 and FMA.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx2,fma")]
pub unsafe fn softmax_rows(s: &mut [f32], nq: usize, len: usize, m: &mut [f32], l: &mut [f32]) {
    assert!(s.len() == nq * len && m.len() == nq && l.len() == nq);
    for qi in 0..nq {
        let row = &mut s[qi * len..(qi + 1) * len];
        let full = len / 16 * 16;
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        for c in (0..full).step_by(16) {
            // SAFETY: c + 16 <= full <= len.
            mx = _mm512_max_ps(mx, _mm512_loadu_ps(row.as_ptr().add(c)));
        }
        let mut mxs = _mm512_reduce_max_ps(mx);
        for &x in &row[full..] {
            mxs = mxs.max(x);
        }
        let mv = _mm512_set1_ps(mxs);
        let mut sum = _mm512_setzero_ps();
        for c in (0..full).step_by(16) {
            let p = row.as_mut_ptr().add(c);
            let e = exp_neg16(_mm512_sub_ps(_mm512_loadu_ps(p), mv));
            _mm512_storeu_ps(p, e);
            sum = _mm512_add_ps(sum, e);
        }
        let mut sums = _mm512_reduce_add_ps(sum);
        for x in &mut row[full..] {
            *x = super::exp_neg(*x - mxs);
            sums += *x;
        }
        m[qi] = mxs;
        l[qi] = sums;
    }
}

/// [`super::exp_neg`] on 16 lanes (the same operations, so the same results).
#[inline(always)]
unsafe fn exp_neg16(x: __m512) -> __m512 {
    let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
    let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fmadd_ps(k, _mm512_set1_ps(-0.693_145_75), x);
    let r = _mm512_fmadd_ps(k, _mm512_set1_ps(-1.428_606_8e-6), r);
    let mut p = _mm512_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(
        _mm512_cvtps_epi32(k),
        _mm512_set1_epi32(127),
    ));
    _mm512_mul_ps(p, _mm512_castsi512_ps(bits))
}

/// `out[q * d + o] = sum_i s[q * len + i] * T_o[code of token i]` (the value side).
///
/// `s`: Layout `(nq, len)`; `vc`: Layout `(len, cv)`; `cent`: this KV head's value centroids,
/// Layout `(vm, 16, dsub)`; `out`: Layout `(nq, vm * dsub)`.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VBMI, AVX2 and FMA.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx2,fma")]
pub unsafe fn weighted_values(
    s: &[f32],
    nq: usize,
    len: usize,
    vc: &[u8],
    cv: usize,
    vm: usize,
    dsub: usize,
    cent: &[f32],
    out: &mut [f32],
) {
    let d = vm * dsub;
    let dp = 2 * cv * dsub;
    assert!(cv == vm.div_ceil(2) && s.len() == nq * len && vc.len() == len * cv);
    assert!(cent.len() == vm * 16 * dsub && out.len() == nq * d);
    let tab = tables(cent, vm, dsub, cv);
    // 16 token lanes per (query, padded dimension).
    let mut acc = vec![_mm512_setzero_ps(); nq * dp];
    let mut pw = vec![0f32; nq * TB];
    blocks(vc, cv, dsub, &tab, |blk, t0| {
        let rp = blk.rp;
        block_weights(s, len, t0, blk.rows, rp, &mut pw);
        for q0 in (0..nq).step_by(8) {
            let qn = (nq - q0).min(8);
            let p = &pw[q0 * rp..(q0 + qn) * rp];
            let a = &mut acc[q0 * dp..(q0 + qn) * dp];
            by_queries!(qn, value_block(blk, p, a));
        }
    });
    for q in 0..nq {
        for o in 0..d {
            out[q * d + o] = _mm512_reduce_add_ps(acc[q * dp + o]);
        }
    }
}

/// One block for `Q` queries: `p` Layout `(Q, rp)`, `acc` Layout `(Q, dp)` (16 token lanes each).
/// The two nibbles of a code byte and `TG` groups of 16 tokens go to separate accumulators
/// (`2 * Q * TG` independent FMA chains).
#[inline(always)]
unsafe fn value_block<const Q: usize, const TG: usize>(blk: Block, p: &[f32], acc: &mut [__m512]) {
    let Block {
        cols,
        rp,
        cb,
        dsub,
        tab,
        next,
        ..
    } = blk;
    let dp = 2 * cb * dsub;
    debug_assert!(rp.is_multiple_of(16 * TG) && p.len() == Q * rp && acc.len() == Q * dp);
    let p = p.as_ptr();
    for b in 0..cb {
        prefetch_range(next, b * rp, (b + 1) * rp);
        let col = cols.as_ptr().add(b * rp);
        for dd in 0..dsub {
            let o0 = 2 * b * dsub + dd;
            let o1 = o0 + dsub;
            // SAFETY: tab has 16 floats per row o < dp.
            let t0v = _mm512_loadu_ps(tab.as_ptr().add(o0 * 16));
            let t1v = _mm512_loadu_ps(tab.as_ptr().add(o1 * 16));
            let mut a = [[[_mm512_setzero_ps(); Q]; 2]; TG];
            for k in 0..Q {
                a[0][0][k] = acc[k * dp + o0];
                a[0][1][k] = acc[k * dp + o1];
            }
            for g0 in (0..rp).step_by(16 * TG) {
                for (t, at) in a.iter_mut().enumerate() {
                    let g = g0 + 16 * t;
                    // SAFETY: g + 16 <= rp bytes of this code byte's row and floats of p's rows.
                    let lo = _mm512_cvtepu8_epi32(_mm_loadu_si128(col.add(g) as _));
                    let v0 = _mm512_permutexvar_ps(lo, t0v);
                    let v1 = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(lo), t1v);
                    for k in 0..Q {
                        let pk = _mm512_loadu_ps(p.add(k * rp + g));
                        at[0][k] = _mm512_fmadd_ps(pk, v0, at[0][k]);
                        at[1][k] = _mm512_fmadd_ps(pk, v1, at[1][k]);
                    }
                }
            }
            for k in 0..Q {
                let (mut s0, mut s1) = (a[0][0][k], a[0][1][k]);
                for at in &a[1..] {
                    s0 = _mm512_add_ps(s0, at[0][k]);
                    s1 = _mm512_add_ps(s1, at[1][k]);
                }
                acc[k * dp + o0] = s0;
                acc[k * dp + o1] = s1;
            }
        }
    }
}

/// 8-bit key codes: a query's float byte tables (one 256-entry table per code byte) quantized
/// to 24-bit integers in three byte planes, Layout `(3, cb, 256)`, so that one `vpermi2b` pair
/// looks up 64 tokens of one plane at once (the scalar scan does one lookup per token and code
/// byte). Each entry is off by at most half a step, `span / 2^25` (`span` = the widest table's
/// range): a score is within `cb * span / 2^25` of the float sum (about 1e-6 of the span at
/// 32 code bytes), float-exact for softmax attention, as the AVX2 4-bit scan.
pub struct Lut8 {
    tables: Vec<u8>,
    cb: usize,
    scale: f32,
    bias: f32,
}

/// Code bytes up to which [`Lut8`] plane sums fit their 16-bit accumulators.
pub const LUT8_MAX_BYTES: usize = 256;

impl Lut8 {
    /// Quantize `tables` (`cb` float tables of 256 entries; `cb <= LUT8_MAX_BYTES`). Written
    /// as lane loops that vectorize where it is inlined (the table build, compiled per SIMD
    /// level): a serial min/max chain per table cost as much as the scan it serves.
    #[inline(always)]
    pub fn new(tables: &[[f32; 256]]) -> Self {
        let cb = tables.len();
        debug_assert!(cb <= LUT8_MAX_BYTES);
        let mut mins = Vec::with_capacity(cb);
        let mut span = 0f32;
        for t in tables {
            let (mut lo, mut hi) = ([f32::INFINITY; 16], [f32::NEG_INFINITY; 16]);
            for c in t.chunks_exact(16) {
                for l in 0..16 {
                    lo[l] = lo[l].min(c[l]);
                    hi[l] = hi[l].max(c[l]);
                }
            }
            let lo = lo.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = hi.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            mins.push(lo);
            span = span.max(hi - lo);
        }
        // Steps of span / (2^24 - 1): entries are integers below 2^24, exact in f32.
        let top = ((1u32 << 24) - 1) as f32;
        let a = if span > 0.0 && span.is_finite() {
            top / span
        } else {
            1.0
        };
        let mut q = vec![0u8; 3 * cb * 256];
        let plane = cb * 256;
        for (j, t) in tables.iter().enumerate() {
            let mut v = [0u32; 256];
            for (o, &x) in v.iter_mut().zip(t) {
                // Round half up; `as` saturates, so the top entry cannot wrap.
                *o = ((x - mins[j]) * a + 0.5).min(top) as u32;
            }
            for p in 0..3 {
                let dst = &mut q[p * plane + j * 256..p * plane + (j + 1) * 256];
                for (d, &x) in dst.iter_mut().zip(&v) {
                    *d = (x >> (8 * p)) as u8;
                }
            }
        }
        Lut8 {
            tables: q,
            cb,
            scale: 1.0 / a,
            bias: mins.iter().map(|&v| v as f64).sum::<f64>() as f32,
        }
    }
}

/// Tokens per transposed block of [`key_scores8`]: the block's columns (`cb * 128` bytes) and
/// one query's tables (`3 * cb * 256` bytes) stay in L1 together at 32 code bytes.
const TB8: usize = 128;

/// Key scores of 8-bit codes: `s[q * len + i] = bias_q + scale_q * sum_b T_q[b][code_i[b]]`.
///
/// `luts`: one per query; `kc`: Layout `(len, cb)`; `s`: Layout `(luts.len(), len)`.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VBMI and AVX2.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx2")]
pub unsafe fn key_scores8(luts: &[Lut8], kc: &[u8], cb: usize, s: &mut [f32]) {
    let len = kc.len() / cb.max(1);
    assert!(kc.len() == len * cb && s.len() == luts.len() * len && cb <= LUT8_MAX_BYTES);
    assert!(luts.iter().all(|l| l.cb == cb));
    let mut cols = vec![0u8; cb * TB8];
    for t0 in (0..len).step_by(TB8) {
        let rows = (len - t0).min(TB8);
        let rp = rows.div_ceil(64) * 64;
        let cols = &mut cols[..cb * rp];
        transpose(&kc[t0 * cb..(t0 + rows) * cb], rows, cb, cols, rp);
        for (qi, lut) in luts.iter().enumerate() {
            let out = &mut s[qi * len + t0..qi * len + t0 + rows];
            for g0 in (0..rp).step_by(64) {
                lut8_group(lut, cols, rp, g0, &mut out[g0..(g0 + 64).min(rows)]);
            }
        }
    }
}

/// Scores of 64 tokens `g0..g0 + 64` of a transposed block (`cols`: Layout `(cb, rp)`) into
/// `out` (its first `out.len() <= 64`).
#[inline(always)]
unsafe fn lut8_group(lut: &Lut8, cols: &[u8], rp: usize, g0: usize, out: &mut [f32]) {
    let cb = lut.cb;
    debug_assert!(cols.len() == cb * rp && g0 + 64 <= rp);
    // Per plane, the sums of 64 tokens as two registers of 32 u16 lanes.
    let mut acc = [[_mm512_setzero_si512(); 2]; 3];
    let t = lut.tables.as_ptr();
    for b in 0..cb {
        // SAFETY: cols has rp >= g0 + 64 bytes per code byte; every table has 256 bytes.
        let idx = _mm512_loadu_si512(cols.as_ptr().add(b * rp + g0) as *const _);
        // Bit 7 picks the upper 128 entries; vpermi2b reads bits 0-6.
        let upper = _mm512_movepi8_mask(idx);
        for (p, a) in acc.iter_mut().enumerate() {
            let tab = t.add((p * cb + b) * 256);
            let t0 = _mm512_loadu_si512(tab as *const _);
            let t1 = _mm512_loadu_si512(tab.add(64) as *const _);
            let t2 = _mm512_loadu_si512(tab.add(128) as *const _);
            let t3 = _mm512_loadu_si512(tab.add(192) as *const _);
            let lo = _mm512_permutex2var_epi8(t0, idx, t1);
            let hi = _mm512_permutex2var_epi8(t2, idx, t3);
            let r = _mm512_mask_blend_epi8(upper, lo, hi);
            a[0] = _mm512_add_epi16(a[0], _mm512_cvtepu8_epi16(_mm512_castsi512_si256(r)));
            a[1] = _mm512_add_epi16(
                a[1],
                _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64::<1>(r)),
            );
        }
    }
    let (scale, bias) = (_mm512_set1_ps(lut.scale), _mm512_set1_ps(lut.bias));
    for half in 0..2 {
        for quarter in 0..2 {
            let start = half * 32 + quarter * 16;
            if start >= out.len() {
                return;
            }
            let wide = |p: usize| -> __m512i {
                let x = if quarter == 0 {
                    _mm512_castsi512_si256(acc[p][half])
                } else {
                    _mm512_extracti64x4_epi64::<1>(acc[p][half])
                };
                _mm512_cvtepu16_epi32(x)
            };
            // plane 2 * 2^16 + plane 1 * 2^8 + plane 0 <= cb * (2^24 - 1) < 2^32.
            let total = _mm512_add_epi32(
                _mm512_add_epi32(
                    _mm512_slli_epi32::<16>(wide(2)),
                    _mm512_slli_epi32::<8>(wide(1)),
                ),
                wide(0),
            );
            let v = _mm512_fmadd_ps(_mm512_cvtepu32_ps(total), scale, bias);
            let n = (out.len() - start).min(16);
            let mask: __mmask16 = if n == 16 { 0xffff } else { (1u16 << n) - 1 };
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(start), mask, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pq::kernels::scan_bytes;
    use crate::rng::SplitMix64;

    #[test]
    fn key_scores8_matches_the_float_byte_scan() {
        if !crate::simd::has_avx512() {
            return; // nothing to compare on this CPU; the scalar scan is the reference
        }
        let mut r = SplitMix64::new(7, 0);
        for &cb in &[1usize, 3, 32, 64, 256] {
            for &len in &[1usize, 63, 64, 65, 129, 300] {
                let nq = 3;
                let tables: Vec<[f32; 256]> = (0..nq * cb)
                    .map(|_| std::array::from_fn(|_| (r.next_f64() as f32 - 0.5) * 8.0))
                    .collect();
                let codes: Vec<u8> = (0..len * cb).map(|_| r.next_u64() as u8).collect();
                let luts: Vec<Lut8> = tables.chunks_exact(cb).map(Lut8::new).collect();
                let mut got = vec![f32::NAN; nq * len];
                // SAFETY: has_avx512 checked above.
                unsafe { key_scores8(&luts, &codes, cb, &mut got) };
                for qi in 0..nq {
                    let mut want = vec![0f32; len];
                    scan_bytes(&tables[qi * cb..(qi + 1) * cb], &codes, &mut want);
                    // Quantization: at most cb half-steps of span / (2^24 - 1), span <= 8.
                    let tol = cb as f32 * 8.0 / (1u32 << 24) as f32 + 1e-5 * cb as f32;
                    for (i, (&g, &w)) in got[qi * len..(qi + 1) * len].iter().zip(&want).enumerate()
                    {
                        assert!(
                            (g - w).abs() <= tol,
                            "cb {cb} len {len} q {qi} token {i}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }
}
