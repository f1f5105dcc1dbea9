//! Fast scan of 4-bit codes with 8-bit quantized lookup tables (the faiss "fast-scan" idea).
//!
//! The float lookup tables of a query (Layout `(m, 16)`) are shifted per subquantizer so their
//! minimum is 0 and scaled by one common factor `a = 255 / max_span` into `u8`. A code's score
//! is then `bias + (sum_j qlut[j][code_j]) / a`, with `bias = sum_j min_j`. Each table entry is
//! off by at most `0.5 / a`, so a score is off by at most `m * 0.5 / a = m * max_span / 510`
//! (typically `sqrt(m)` times smaller).
//!
//! With AVX2 a block of 32 codes is transposed in registers (byte column `b` of 32 codes in one
//! register), each 16-entry table lookup is one `pshufb` for 32 codes, and sums accumulate in
//! 16-bit lanes. Codes keep the ordinary row layout `(n, code_bytes)`: no repacking pass.
//! The portable path computes the same integers, so both give identical results.

/// Quantized lookup tables of one query.
#[derive(Clone, Debug)]
pub struct QuantLut {
    /// Layout: `(planes, 2 * code_bytes, 16)`; table `2b` is the low nibble of byte `b`, `2b + 1`
    /// the high nibble; plane `p` holds bits `8p..8p+8` of each quantized entry. A padding table
    /// (odd `m`) is all zeros.
    pub tables: Vec<u8>,
    /// 1 (8-bit entries, approximate) or 3 (24-bit entries, float-exact for attention).
    pub planes: usize,
    /// `1 / a`.
    pub scale: f32,
    /// `sum_j min_j`.
    pub bias: f32,
}

/// Quantize float tables, Layout `(m, 16)`, into 8-bit [`QuantLut`] (error per score up to
/// `m * max_span / 510`).
pub fn quantize(lut: &[f32], m: usize) -> QuantLut {
    quantize_planes(lut, m, 1)
}

/// Quantize into 24-bit entries split over three byte planes: each score is within
/// `m * max_span / 2^25` of the exact sum (about 2e-6 of the span at m = 64), float-exact for
/// softmax attention, at three table lookups per nibble instead of one.
pub fn quantize_exact(lut: &[f32], m: usize) -> QuantLut {
    quantize_planes(lut, m, 3)
}

fn quantize_planes(lut: &[f32], m: usize, planes: usize) -> QuantLut {
    let cb = m.div_ceil(2);
    let mut mins = vec![0f32; m];
    let mut span = 0f32;
    for j in 0..m {
        let t = &lut[j * 16..(j + 1) * 16];
        let lo = t.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = t.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        mins[j] = lo;
        span = span.max(hi - lo);
    }
    let top = ((1u64 << (8 * planes)) - 1) as f64;
    let a = if span > 0.0 && span.is_finite() {
        top / span as f64
    } else {
        1.0
    };
    let per_plane = 2 * cb * 16;
    let mut tables = vec![0u8; planes * per_plane];
    for j in 0..m {
        for k in 0..16 {
            let v = (((lut[j * 16 + k] - mins[j]) as f64) * a)
                .round()
                .clamp(0.0, top) as u32;
            for p in 0..planes {
                tables[p * per_plane + j * 16 + k] = (v >> (8 * p)) as u8;
            }
        }
    }
    let bias = mins.iter().map(|&v| v as f64).sum::<f64>() as f32;
    QuantLut {
        tables,
        planes,
        scale: (1.0 / a) as f32,
        bias,
    }
}

/// Portable reference: `rows[qi][i] = bias + scale * sum_j tables[j][code_j]`.
pub fn scan_portable(qs: &[QuantLut], codes: &[u8], cb: usize, rows: &mut [&mut [f32]]) {
    for (q, row) in qs.iter().zip(rows.iter_mut()) {
        let per_plane = 2 * cb * 16;
        for (o, c) in row.iter_mut().zip(codes.chunks_exact(cb)) {
            let mut total = 0f32;
            for p in (0..q.planes).rev() {
                let t = &q.tables[p * per_plane..(p + 1) * per_plane];
                let mut s = 0u32;
                for (b, &byte) in c.iter().enumerate() {
                    s += t[(2 * b) * 16 + (byte & 15) as usize] as u32;
                    s += t[(2 * b + 1) * 16 + (byte >> 4) as usize] as u32;
                }
                total = total.mul_add(256.0, s as f32);
            }
            *o = total.mul_add(q.scale, q.bias);
        }
    }
}

/// Scan `codes` (`(n, cb)`) for every query; `rows[qi]`: `[n]` scores of query `qi`.
///
/// Each group of 32 codes is transposed once and scored against all queries.
pub fn scan(qs: &[QuantLut], codes: &[u8], cb: usize, rows: &mut [&mut [f32]]) {
    #[cfg(target_arch = "x86_64")]
    {
        // u16 accumulators hold sums up to 257 * 255; beyond that use the portable path.
        if crate::simd::has_avx2_fma() && cb <= 128 {
            // SAFETY: AVX2 is available (checked above); memory accesses are bounds-checked
            // or derived from checked slice lengths inside.
            unsafe { avx2::scan(qs, codes, cb, rows) };
            return;
        }
    }
    scan_portable(qs, codes, cb, rows)
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::QuantLut;
    use std::arch::x86_64::*;

    /// Row order that makes the 4-stage unpack transpose come out in natural order.
    const BITREV4: [usize; 16] = [0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15];

    /// Transpose a 32 x 16 byte tile: `src` rows `i` and `i + 16` at `src + i * stride` and
    /// `src + (i + 16) * stride` (16 readable bytes each). Returns `out[p]` = byte column `p`:
    /// byte `t` of the register is row `t`.
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn transpose_32x16(src: *const u8, stride: usize) -> [__m256i; 16] {
        let mut x = [_mm256_setzero_si256(); 16];
        for (i, xi) in x.iter_mut().enumerate() {
            let r = BITREV4[i];
            // SAFETY: caller guarantees 32 rows of 16 readable bytes at `stride`.
            let lo = _mm_loadu_si128(src.add(r * stride) as *const __m128i);
            let hi = _mm_loadu_si128(src.add((r + 16) * stride) as *const __m128i);
            *xi = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), hi);
        }
        macro_rules! stage {
            ($lo:ident, $hi:ident) => {{
                let mut y = [_mm256_setzero_si256(); 16];
                for i in 0..8 {
                    y[2 * i] = $lo(x[i], x[i + 8]);
                    y[2 * i + 1] = $hi(x[i], x[i + 8]);
                }
                x = y;
            }};
        }
        stage!(_mm256_unpacklo_epi8, _mm256_unpackhi_epi8);
        stage!(_mm256_unpacklo_epi16, _mm256_unpackhi_epi16);
        stage!(_mm256_unpacklo_epi32, _mm256_unpackhi_epi32);
        stage!(_mm256_unpacklo_epi64, _mm256_unpackhi_epi64);
        x
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scan(qs: &[QuantLut], codes: &[u8], cb: usize, rows_out: &mut [&mut [f32]]) {
        let n = codes.len() / cb;
        let nq = qs.len();
        assert!(rows_out.len() == nq && rows_out.iter().all(|r| r.len() == n));
        let chunks = cb.div_ceil(16);
        let padded_cb = chunks * 16;
        // Each 16-entry table broadcast to both 128-bit lanes.
        // Layout per query: (planes, 2 * padded_cb); `offsets[qi]` is where query qi starts.
        let per_plane = 2 * cb * 16;
        let mut luts = Vec::new();
        let mut offsets = Vec::with_capacity(nq);
        for q in qs {
            assert!(q.planes >= 1 && q.tables.len() == q.planes * per_plane);
            offsets.push(luts.len());
            for p in 0..q.planes {
                for t in 0..2 * padded_cb {
                    let v = if t < 2 * cb {
                        // SAFETY: table t of plane p has 16 bytes inside q.tables (length checked).
                        _mm_loadu_si128(
                            q.tables.as_ptr().add(p * per_plane + t * 16) as *const __m128i
                        )
                    } else {
                        _mm_setzero_si128()
                    };
                    luts.push(_mm256_broadcastsi128_si256(v));
                }
            }
        }
        let mask = _mm256_set1_epi8(0x0f);
        // Scratch tile for partial groups/columns: 32 rows x padded_cb bytes, zero padded.
        let mut tile = vec![0u8; 32 * padded_cb];
        // Low and high nibbles of the byte columns of the current group of 32 codes:
        // nib[2b] = low nibbles of column b, nib[2b + 1] = high nibbles.
        let mut nib = vec![_mm256_setzero_si256(); 2 * padded_cb];
        let mut start = 0;
        while start < n {
            let rows = (n - start).min(32);
            // Prefetch the group 8 groups ahead (the DRAM stream otherwise adds ~25% per token).
            let ahead = (start + 8 * 32).min(n);
            let end = (ahead + 32).min(n);
            for off in (ahead * cb..end * cb).step_by(64) {
                // SAFETY: off < n * cb = codes.len(); prefetch has no architectural effect.
                _mm_prefetch::<_MM_HINT_T0>(codes.as_ptr().add(off) as *const i8);
            }
            let (src, stride) = if rows == 32 && cb.is_multiple_of(16) {
                (codes.as_ptr().add(start * cb), cb)
            } else {
                tile.fill(0);
                for r in 0..rows {
                    tile[r * padded_cb..r * padded_cb + cb]
                        .copy_from_slice(&codes[(start + r) * cb..(start + r + 1) * cb]);
                }
                (tile.as_ptr(), padded_cb)
            };
            for c in 0..chunks {
                // SAFETY: src has 32 rows of `stride >= 16 * chunks` readable bytes.
                let t = transpose_32x16(src.add(c * 16), stride);
                for (p, &col) in t.iter().enumerate() {
                    nib[2 * (c * 16 + p)] = _mm256_and_si256(col, mask);
                    nib[2 * (c * 16 + p) + 1] = _mm256_and_si256(_mm256_srli_epi16::<4>(col), mask);
                }
            }
            let zero = _mm256_setzero_si256();
            let f256 = _mm256_set1_ps(256.0);
            for (qi, q) in qs.iter().enumerate() {
                // Per plane (most significant first): u16 sums of 32 codes, widened to f32 in code
                // order, folded as total = total * 256 + plane_sum.
                let mut tot = [_mm256_setzero_ps(); 4];
                for p in (0..q.planes).rev() {
                    let base = offsets[qi] + p * 2 * padded_cb;
                    let ql = &luts[base..base + 2 * padded_cb];
                    let mut acc0 = _mm256_setzero_si256();
                    let mut acc1 = _mm256_setzero_si256();
                    for (t, &n) in ql.iter().zip(nib.iter()) {
                        let r = _mm256_shuffle_epi8(*t, n);
                        acc0 = _mm256_add_epi16(acc0, r);
                        acc1 = _mm256_add_epi16(acc1, _mm256_srli_epi16::<8>(r));
                    }
                    // acc0 word w = sum(code 2w) + 256 * sum(code 2w+1) (mod 2^16);
                    // acc1 word w = sum(code 2w+1).
                    let even = _mm256_sub_epi16(acc0, _mm256_slli_epi16::<8>(acc1));
                    // Interleave even/odd words back into code order and widen to i32.
                    let lo16 = _mm256_unpacklo_epi16(even, acc1); // codes 0..8 | 16..24
                    let hi16 = _mm256_unpackhi_epi16(even, acc1); // codes 8..16 | 24..32
                    let parts = [
                        _mm256_unpacklo_epi16(lo16, zero), // codes 0..4 | 16..20
                        _mm256_unpackhi_epi16(lo16, zero), // codes 4..8 | 20..24
                        _mm256_unpacklo_epi16(hi16, zero), // codes 8..12 | 24..28
                        _mm256_unpackhi_epi16(hi16, zero), // codes 12..16 | 28..32
                    ];
                    for (acc, &part) in tot.iter_mut().zip(parts.iter()) {
                        *acc = _mm256_fmadd_ps(*acc, f256, _mm256_cvtepi32_ps(part));
                    }
                }
                let scale = _mm256_set1_ps(q.scale);
                let bias = _mm256_set1_ps(q.bias);
                let mut res = [0f32; 32];
                for (k, &t) in tot.iter().enumerate() {
                    let f = _mm256_fmadd_ps(t, scale, bias);
                    let mut tmp = [0f32; 8];
                    _mm256_storeu_ps(tmp.as_mut_ptr(), f);
                    res[4 * k..4 * k + 4].copy_from_slice(&tmp[..4]);
                    res[16 + 4 * k..16 + 4 * k + 4].copy_from_slice(&tmp[4..]);
                }
                rows_out[qi][start..start + rows].copy_from_slice(&res[..rows]);
            }
            start += rows;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn random_lut(r: &mut SplitMix64, m: usize) -> Vec<f32> {
        (0..m * 16)
            .map(|_| (r.next_f64() as f32 - 0.3) * 7.0)
            .collect()
    }

    /// `n` random 4-bit codes of `m` subquantizers (padding nibble zero when `m` is odd).
    fn random_codes(r: &mut SplitMix64, n: usize, m: usize) -> Vec<u8> {
        let cb = m.div_ceil(2);
        let mut codes: Vec<u8> = (0..n * cb).map(|_| r.next_u64() as u8).collect();
        if m % 2 == 1 {
            for i in 0..n {
                codes[i * cb + cb - 1] &= 0x0f;
            }
        }
        codes
    }

    /// `sum_j lut[j][code_j]` in f64.
    fn exact_score(lut: &[f32], code: &[u8], m: usize) -> f64 {
        (0..m)
            .map(|j| {
                let byte = code[j / 2];
                let k = if j % 2 == 0 { byte & 15 } else { byte >> 4 };
                lut[j * 16 + k as usize] as f64
            })
            .sum()
    }

    #[test]
    fn exact_planes_match_float_sums() {
        for m in [1usize, 3, 32, 64, 128, 200] {
            let cb = m.div_ceil(2);
            let mut r = SplitMix64::new(100 + m as u64, 0);
            let lut = random_lut(&mut r, m);
            for n in [0usize, 1, 31, 32, 33, 100] {
                let codes = random_codes(&mut r, n, m);
                let q = [quantize_exact(&lut, m)];
                let mut a = vec![0f32; n];
                let mut b = vec![0f32; n];
                scan(&q, &codes, cb, &mut [&mut a[..]]);
                scan_portable(&q, &codes, cb, &mut [&mut b[..]]);
                for i in 0..n {
                    let exact = exact_score(&lut, &codes[i * cb..(i + 1) * cb], m);
                    let tol = 1e-5 * (1.0 + exact.abs());
                    assert!(
                        (a[i] as f64 - exact).abs() <= tol,
                        "simd m={m} i={i}: {} vs {exact}",
                        a[i]
                    );
                    assert!(
                        (b[i] as f64 - exact).abs() <= tol,
                        "portable m={m} i={i}: {} vs {exact}",
                        b[i]
                    );
                }
            }
        }
    }

    #[test]
    fn simd_equals_portable_and_error_is_bounded() {
        for m in [1usize, 2, 3, 8, 31, 32, 33, 64, 128, 200] {
            let cb = m.div_ceil(2);
            let mut r = SplitMix64::new(m as u64, 0);
            let lut = random_lut(&mut r, m);
            for n in [0usize, 1, 31, 32, 33, 100] {
                let codes = random_codes(&mut r, n, m);
                let q = [
                    quantize(&lut, m),
                    quantize(&lut.iter().map(|v| -v).collect::<Vec<_>>(), m),
                ];
                let mut a = vec![0f32; 2 * n];
                let mut b = vec![0f32; 2 * n];
                {
                    let (a0, a1) = a.split_at_mut(n);
                    scan(&q, &codes, cb, &mut [a0, a1]);
                    let (b0, b1) = b.split_at_mut(n);
                    scan_portable(&q, &codes, cb, &mut [b0, b1]);
                }
                assert_eq!(a, b, "m={m} n={n}");
                let span = (0..m)
                    .map(|j| {
                        let t = &lut[j * 16..(j + 1) * 16];
                        t.iter().cloned().fold(f32::MIN, f32::max)
                            - t.iter().cloned().fold(f32::MAX, f32::min)
                    })
                    .fold(0f32, f32::max);
                for i in 0..n {
                    let exact = exact_score(&lut, &codes[i * cb..(i + 1) * cb], m) as f32;
                    let bound = m as f32 * span / 510.0 + 1e-4 * exact.abs().max(1.0);
                    assert!(
                        (a[i] - exact).abs() <= bound,
                        "m={m} i={i}: {} vs {exact}",
                        a[i]
                    );
                    assert!(
                        (a[n + i] + exact).abs() <= bound,
                        "m={m} i={i}: {} vs {}",
                        a[n + i],
                        -exact
                    );
                }
            }
        }
    }
}
