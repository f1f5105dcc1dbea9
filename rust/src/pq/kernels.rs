//! Inner loops of PQ: nearest-centroid search, lookup-table build and scan.
//!
//! All functions are `#[inline(always)]` plain Rust over 8-wide lane arrays so that
//! [`crate::dispatch!`] can compile them for AVX2+FMA at the call site.

/// SIMD lane count the kernels are written for (8 x f32 = one AVX2 register).
pub const LANES: usize = 8;

/// Nearest centroid of one sub-vector.
///
/// `x`: `[dsub]`; `ct`: centroids transposed, Layout: `(dsub, ksub)`; `norms`: `[ksub]`,
/// `||c||^2`. `ksub` must be a multiple of [`LANES`]. Returns the index of the first centroid
/// minimizing `||x - c||^2` and that distance minus `||x||^2` (i.e. `||c||^2 - 2 x.c`).
#[inline(always)]
pub fn nearest(x: &[f32], ct: &[f32], norms: &[f32], ksub: usize) -> (u32, f32) {
    let mut best = [f32::INFINITY; LANES];
    let mut besti = [0u32; LANES];
    let mut xm2 = [0f32; 64];
    let dsub = x.len();
    if dsub <= 64 {
        for (o, v) in xm2.iter_mut().zip(x) {
            *o = -2.0 * v;
        }
        let xm2 = &xm2[..dsub];
        for c in 0..ksub / LANES {
            let base = c * LANES;
            let mut acc = [0f32; LANES];
            acc.copy_from_slice(&norms[base..base + LANES]);
            for (d, &xd) in xm2.iter().enumerate() {
                let row = &ct[d * ksub + base..d * ksub + base + LANES];
                for l in 0..LANES {
                    acc[l] = xd.mul_add(row[l], acc[l]);
                }
            }
            for l in 0..LANES {
                let better = acc[l] < best[l];
                best[l] = if better { acc[l] } else { best[l] };
                besti[l] = if better { (base + l) as u32 } else { besti[l] };
            }
        }
    } else {
        // Wide sub-vectors (dim/m > 64) are rare; a straightforward loop is fine.
        for c in 0..ksub / LANES {
            let base = c * LANES;
            let mut acc = [0f32; LANES];
            acc.copy_from_slice(&norms[base..base + LANES]);
            for (d, &xv) in x.iter().enumerate() {
                let xd = -2.0 * xv;
                let row = &ct[d * ksub + base..d * ksub + base + LANES];
                for l in 0..LANES {
                    acc[l] = xd.mul_add(row[l], acc[l]);
                }
            }
            for l in 0..LANES {
                let better = acc[l] < best[l];
                best[l] = if better { acc[l] } else { best[l] };
                besti[l] = if better { (base + l) as u32 } else { besti[l] };
            }
        }
    }
    // Reduce lanes: smallest value, ties broken by the smallest index.
    let mut bi = besti[0];
    let mut bv = best[0];
    for l in 1..LANES {
        if best[l] < bv || (best[l] == bv && besti[l] < bi) {
            bv = best[l];
            bi = besti[l];
        }
    }
    (bi, bv)
}

/// Inner-product lookup table of one sub-query: `out[k] = q . c_k`.
///
/// `q`: `[dsub]`; `ct`: Layout `(dsub, ksub)`; `out`: `[ksub]`.
#[inline(always)]
pub fn ip_table(q: &[f32], ct: &[f32], ksub: usize, out: &mut [f32]) {
    out.fill(0.0);
    for (d, &qd) in q.iter().enumerate() {
        let row = &ct[d * ksub..(d + 1) * ksub];
        for (o, &c) in out.iter_mut().zip(row) {
            *o = qd.mul_add(c, *o);
        }
    }
}

/// Squared-L2 lookup table of one sub-query: `out[k] = ||q - c_k||^2`.
#[inline(always)]
pub fn l2_table(q: &[f32], ct: &[f32], norms: &[f32], ksub: usize, out: &mut [f32]) {
    let qn: f32 = q.iter().map(|v| v * v).sum();
    out.copy_from_slice(norms);
    for (d, &qd) in q.iter().enumerate() {
        let row = &ct[d * ksub..(d + 1) * ksub];
        let m2 = -2.0 * qd;
        for (o, &c) in out.iter_mut().zip(row) {
            *o = m2.mul_add(c, *o);
        }
    }
    for o in out.iter_mut() {
        *o = (*o + qn).max(0.0);
    }
}

/// Scan byte-indexed tables: `out[i] = sum_b tables[b][codes[i * cb + b]]`.
///
/// `tables`: `[cb]` tables of 256 entries (one per code byte); `codes`: `[n, cb]`; `out`: `[n]`.
/// Four codes are summed at once to keep four independent add chains in flight.
#[inline(always)]
pub fn scan_bytes(tables: &[[f32; 256]], codes: &[u8], out: &mut [f32]) {
    let cb = tables.len();
    let n = out.len();
    let n4 = n / 4 * 4;
    let (out4, out_rest) = out.split_at_mut(n4);
    for (o, c) in out4.chunks_exact_mut(4).zip(codes.chunks_exact(4 * cb)) {
        let (c0, r) = c.split_at(cb);
        let (c1, r) = r.split_at(cb);
        let (c2, c3) = r.split_at(cb);
        let (mut s0, mut s1, mut s2, mut s3) = (0f32, 0f32, 0f32, 0f32);
        for (b, t) in tables.iter().enumerate() {
            s0 += t[c0[b] as usize];
            s1 += t[c1[b] as usize];
            s2 += t[c2[b] as usize];
            s3 += t[c3[b] as usize];
        }
        o[0] = s0;
        o[1] = s1;
        o[2] = s2;
        o[3] = s3;
    }
    for (o, c) in out_rest.iter_mut().zip(codes[n4 * cb..].chunks_exact(cb)) {
        let mut s = 0f32;
        for (t, &b) in tables.iter().zip(c) {
            s += t[b as usize];
        }
        *o = s;
    }
}

/// Fold per-subquantizer tables into per-byte tables for 4-bit codes.
///
/// `lut`: Layout `(m, 16)`; `out`: `[ceil(m/2)]` tables where
/// `out[b][byte] = lut[2b][byte & 15] + lut[2b+1][byte >> 4]` (the high nibble of the last byte
/// is padding when `m` is odd and contributes nothing).
#[inline(always)]
pub fn pair_tables_4bit(lut: &[f32], m: usize, out: &mut [[f32; 256]]) {
    for (b, t) in out.iter_mut().enumerate() {
        let lo = &lut[2 * b * 16..2 * b * 16 + 16];
        if 2 * b + 1 < m {
            let hi = &lut[(2 * b + 1) * 16..(2 * b + 1) * 16 + 16];
            for h in 0..16 {
                for l in 0..16 {
                    t[h * 16 + l] = lo[l] + hi[h];
                }
            }
        } else {
            for h in 0..16 {
                t[h * 16..h * 16 + 16].copy_from_slice(lo);
            }
        }
    }
}
