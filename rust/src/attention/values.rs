//! Value side of attention over 4-bit codes with AVX2: exact float table lookups.
//!
//! The output of one query is `sum_i p_i * decode(v_i)`: for output dimension `o` (subquantizer
//! `j = o / dsub`) that is `sum_i p_i * T_o[code_ij]` with a 16-entry float table
//! `T_o[c] = centroid_j[c][o % dsub]`. A 16-entry table is two 8-float registers: eight tokens'
//! values are two `vpermps` and a blend, then one FMA per query. Per token that is a few
//! instructions per output dimension instead of a scatter-add into a histogram per code byte
//! and query (the portable path), and it is exact float arithmetic (no table quantization).
//!
//! Codes are transposed per block of [`TB`] tokens to column-major (one contiguous row of bytes
//! per code byte), so the loop for one output dimension reads eight tokens' codes with one load.

/// Tokens per block (here and in the AVX-512 kernels): the block's column-major codes
/// (`cv * TB` bytes) and the weights of the queries (`4 * TB` floats; 8 in the AVX-512 kernels)
/// stay in L1 while every output dimension streams over them.
#[cfg(target_arch = "x86_64")]
pub(super) const TB: usize = 256;

#[cfg(target_arch = "x86_64")]
/// The codes (rows of `cb` bytes) of the block after the one that follows token `end`: what a
/// block prefetches while it is computed.
pub(super) fn ahead(codes: &[u8], cb: usize, end: usize) -> &[u8] {
    let n = codes.len() / cb;
    &codes[(end + TB).min(n) * cb..(end + 2 * TB).min(n) * cb]
}

/// Prefetch bytes `[from, to)` of `next` (clipped) into L2, one cache line at a time.
///
/// The kernels prefetch the codes two blocks ahead a slice at a time while they compute the
/// current block (spread out, not as one burst at the block start, and not into L1, which holds
/// the block's working set): measured 1.3-1.5x faster end to end than a burst or no prefetch on
/// a 2-core Zen 4 VM (two blocks ahead a little faster than one).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn prefetch_range(next: &[u8], from: usize, to: usize) {
    let to = to.min(next.len());
    let mut off = from;
    while off < to {
        // SAFETY: off < next.len(); prefetch has no architectural effect.
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T2 }>(
            next.as_ptr().add(off) as *const i8,
        );
        off += 64;
    }
}

/// Per-dimension tables, Layout `(2 * cb * dsub, 16)`: row `o = j * dsub + dd` is
/// `cent[j][c][dd]` for `c < 16`; rows of the padding subquantizer (odd `m`) are zero.
#[cfg(target_arch = "x86_64")]
pub(super) fn tables(cent: &[f32], m: usize, dsub: usize, cb: usize) -> Vec<f32> {
    debug_assert!(cent.len() == m * 16 * dsub && 2 * cb >= m);
    let mut tab = vec![0f32; 2 * cb * dsub * 16];
    if dsub == 1 {
        tab[..m * 16].copy_from_slice(cent);
        return tab;
    }
    for (j, books) in cent.chunks_exact(16 * dsub).enumerate() {
        for dd in 0..dsub {
            let row = &mut tab[(j * dsub + dd) * 16..(j * dsub + dd + 1) * 16];
            for (c, x) in row.iter_mut().enumerate() {
                *x = books[c * dsub + dd];
            }
        }
    }
    tab
}

/// The softmax weights of tokens `t0..t0 + rows` of every query (rows of `s`, Layout
/// `(nq, len)`) into `pw`, Layout `(nq, rp)`, rows `rows..rp` weight 0.
#[cfg(target_arch = "x86_64")]
pub(super) fn block_weights(
    s: &[f32],
    len: usize,
    t0: usize,
    rows: usize,
    rp: usize,
    pw: &mut [f32],
) {
    for (q, dst) in pw[..s.len() / len.max(1) * rp]
        .chunks_exact_mut(rp)
        .enumerate()
    {
        dst[..rows].copy_from_slice(&s[q * len + t0..q * len + t0 + rows]);
        dst[rows..].fill(0.0);
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use super::TB;
    use crate::pq::fastscan::avx2::transpose_32x16;
    use std::arch::x86_64::*;

    /// `out[q * d + o] = sum_i s[q * len + i] * cent[((o / dsub) * 16 + code) * dsub + o % dsub]`
    /// with `code` the 4-bit code of token `i` for subquantizer `o / dsub` in `vc` (Layout
    /// `(len, cv)`, subquantizer `j` in byte `j / 2`, low nibble first).
    ///
    /// `s`: Layout `(nq, len)`; `cent`: this KV head's value centroids, Layout `(vm, 16, dsub)`;
    /// `out`: Layout `(nq, vm * dsub)`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
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
        assert!(cv == vm.div_ceil(2) && s.len() == nq * len && vc.len() == len * cv);
        assert!(cent.len() == vm * 16 * dsub && out.len() == nq * d);
        // Tables, Layout (d, 16) (plus a zero row per padding dimension of an odd vm).
        let tab = super::tables(cent, vm, dsub, cv);
        let mut acc = vec![_mm256_setzero_ps(); nq * d];
        let mut cols = vec![0u8; cv * TB];
        let mut pw = vec![0f32; nq * TB];
        let mut t0 = 0;
        while t0 < len {
            let rows = (len - t0).min(TB);
            let next = super::ahead(vc, cv, t0 + rows);
            // Rows padded to a multiple of 8 with weight 0 (and code 0).
            let rp = rows.div_ceil(8) * 8;
            transpose(
                &vc[t0 * cv..(t0 + rows) * cv],
                rows,
                cv,
                &mut cols[..cv * rp],
                rp,
            );
            super::block_weights(s, len, t0, rows, rp, &mut pw);
            let mut q0 = 0;
            while q0 < nq {
                let qn = (nq - q0).min(4);
                let p = &pw[q0 * rp..(q0 + qn) * rp];
                let a = &mut acc[q0 * d..(q0 + qn) * d];
                match qn {
                    1 => block::<1>(&cols, rp, p, &tab, vm, dsub, a, next),
                    2 => block::<2>(&cols, rp, p, &tab, vm, dsub, a, next),
                    3 => block::<3>(&cols, rp, p, &tab, vm, dsub, a, next),
                    _ => block::<4>(&cols, rp, p, &tab, vm, dsub, a, next),
                }
                q0 += qn;
            }
            t0 += rows;
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            let h = _mm_add_ps(_mm256_castps256_ps128(*a), _mm256_extractf128_ps::<1>(*a));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            let h = _mm_add_ss(h, _mm_movehdup_ps(h));
            *o = _mm_cvtss_f32(h);
        }
    }

    /// One block for `Q` queries: `p` Layout `(Q, rp)`, `acc` Layout `(Q, d)` (8 token lanes each).
    ///
    /// The two subquantizers of a code byte are done together: one code load serves both, and
    /// `2 * Q` independent FMA chains hide the FMA latency. `next`: the codes two blocks ahead,
    /// prefetched a slice per code byte.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn block<const Q: usize>(
        cols: &[u8],
        rp: usize,
        p: &[f32],
        tab: &[f32],
        vm: usize,
        dsub: usize,
        acc: &mut [__m256],
        next: &[u8],
    ) {
        let d = vm * dsub;
        debug_assert!(p.len() == Q * rp && acc.len() == Q * d && rp.is_multiple_of(8));
        for b in 0..vm.div_ceil(2) {
            super::prefetch_range(next, b * rp, (b + 1) * rp);
            // With an odd vm the last byte's high nibble is padding: its dimension is computed
            // on a copy of the low one and dropped.
            let pair = 2 * b + 1 < vm;
            for dd in 0..dsub {
                let o0 = 2 * b * dsub + dd;
                let o1 = if pair { o0 + dsub } else { o0 };
                // SAFETY: tab has 16 floats per output dimension; cols has rp bytes per code
                // byte (b < cv); p has rp floats per query; 8-wide loads end at or below rp.
                let t0l = _mm256_loadu_ps(tab.as_ptr().add(o0 * 16));
                let t0h = _mm256_loadu_ps(tab.as_ptr().add(o0 * 16 + 8));
                let t1l = _mm256_loadu_ps(tab.as_ptr().add(o1 * 16));
                let t1h = _mm256_loadu_ps(tab.as_ptr().add(o1 * 16 + 8));
                let col = cols.as_ptr().add(b * rp);
                let mut a0: [__m256; Q] = std::array::from_fn(|k| acc[k * d + o0]);
                let mut a1: [__m256; Q] = std::array::from_fn(|k| acc[k * d + o1]);
                for g in (0..rp).step_by(8) {
                    let c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(col.add(g) as *const __m128i));
                    // vpermps reads index bits 0-2; bit 3 of the nibble, shifted to the sign,
                    // picks the table half.
                    let v0 = _mm256_blendv_ps(
                        _mm256_permutevar8x32_ps(t0l, c),
                        _mm256_permutevar8x32_ps(t0h, c),
                        _mm256_castsi256_ps(_mm256_slli_epi32::<28>(c)),
                    );
                    let hi = _mm256_srli_epi32::<4>(c);
                    let v1 = _mm256_blendv_ps(
                        _mm256_permutevar8x32_ps(t1l, hi),
                        _mm256_permutevar8x32_ps(t1h, hi),
                        _mm256_castsi256_ps(_mm256_slli_epi32::<24>(c)),
                    );
                    for k in 0..Q {
                        let pk = _mm256_loadu_ps(p.as_ptr().add(k * rp + g));
                        a0[k] = _mm256_fmadd_ps(pk, v0, a0[k]);
                        a1[k] = _mm256_fmadd_ps(pk, v1, a1[k]);
                    }
                }
                for k in 0..Q {
                    if pair {
                        acc[k * d + o1] = a1[k];
                    }
                    acc[k * d + o0] = a0[k];
                }
            }
        }
    }

    /// `codes` (`(rows, cv)`) to column-major `out` (`(cv, rp)`), rows `rows..rp` zero.
    #[target_feature(enable = "avx2")]
    pub(in crate::attention) unsafe fn transpose(
        codes: &[u8],
        rows: usize,
        cv: usize,
        out: &mut [u8],
        rp: usize,
    ) {
        debug_assert!(codes.len() == rows * cv && out.len() == cv * rp && rp >= rows);
        let full = if cv.is_multiple_of(16) {
            rows / 32 * 32
        } else {
            0
        };
        for r0 in (0..full).step_by(32) {
            for c0 in (0..cv).step_by(16) {
                // SAFETY: rows r0..r0 + 32 exist and each has 16 bytes from c0 (cv % 16 == 0);
                // stores land in out rows c0..c0 + 16 at r0..r0 + 32 <= rows <= rp.
                let t = transpose_32x16(codes.as_ptr().add(r0 * cv + c0), cv);
                for (k, &col) in t.iter().enumerate() {
                    _mm256_storeu_si256(
                        out.as_mut_ptr().add((c0 + k) * rp + r0) as *mut __m256i,
                        col,
                    );
                }
            }
        }
        for r in full..rows {
            for (c, &x) in codes[r * cv..(r + 1) * cv].iter().enumerate() {
                out[c * rp + r] = x;
            }
        }
        for c in 0..cv {
            out[c * rp + rows..(c + 1) * rp].fill(0);
        }
    }
}
