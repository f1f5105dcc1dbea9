//! Inner loops of PQ: nearest-centroid search, lookup-table build and scan.
//!
//! All functions are `#[inline(always)]` plain Rust over fixed-width lane arrays so that
//! [`crate::dispatch!`] can compile them for AVX2+FMA at the call site.

/// Sub-vectors handled together by [`nearest_group`]: two AVX2 registers, lane = vector.
pub const GROUP: usize = 16;
/// Up to this many vectors, [`nearest_rows`] searches one vector at a time.
const FEW: usize = 2;

/// Nearest centroid of each of [`GROUP`] sub-vectors of width `D`.
///
/// `xt`: the sub-vectors transposed, Layout `(D, GROUP)`; `cm2`: `-2 * centroids`, Layout
/// `(ksub, D)`; `norms`: `[ksub]`, `||c||^2`. Lanes run over vectors, so there is no horizontal
/// reduction: per centroid, `D` fused multiply-adds and a compare/select per register. Returns,
/// per vector, the first index minimizing `||x - c||^2` and that minimum minus `||x||^2`.
#[inline(always)]
pub fn nearest_group<const D: usize>(
    xt: &[f32],
    cm2: &[f32],
    norms: &[f32],
    idx: &mut [u32; GROUP],
    dist: &mut [f32; GROUP],
) {
    let mut xr = [[0f32; GROUP]; D];
    for (d, r) in xr.iter_mut().enumerate() {
        r.copy_from_slice(&xt[d * GROUP..(d + 1) * GROUP]);
    }
    let mut best = [f32::INFINITY; GROUP];
    let mut bi = [0u32; GROUP];
    for (k, (ck, &nk)) in cm2.chunks_exact(D).zip(norms).enumerate() {
        let mut acc = [nk; GROUP];
        for d in 0..D {
            let c = ck[d];
            for v in 0..GROUP {
                acc[v] = c.mul_add(xr[d][v], acc[v]);
            }
        }
        for v in 0..GROUP {
            let better = acc[v] < best[v];
            best[v] = if better { acc[v] } else { best[v] };
            bi[v] = if better { k as u32 } else { bi[v] };
        }
    }
    *idx = bi;
    *dist = best;
}

/// [`nearest_group`] for any width (runtime `dsub`); slower, used for unusual widths.
#[inline(always)]
pub fn nearest_group_dyn(
    xt: &[f32],
    cm2: &[f32],
    norms: &[f32],
    dsub: usize,
    idx: &mut [u32; GROUP],
    dist: &mut [f32; GROUP],
) {
    let mut best = [f32::INFINITY; GROUP];
    let mut bi = [0u32; GROUP];
    for (k, (ck, &nk)) in cm2.chunks_exact(dsub).zip(norms).enumerate() {
        let mut acc = [nk; GROUP];
        for (d, &c) in ck.iter().enumerate() {
            let xr = &xt[d * GROUP..(d + 1) * GROUP];
            for v in 0..GROUP {
                acc[v] = c.mul_add(xr[v], acc[v]);
            }
        }
        for v in 0..GROUP {
            let better = acc[v] < best[v];
            best[v] = if better { acc[v] } else { best[v] };
            bi[v] = if better { k as u32 } else { bi[v] };
        }
    }
    *idx = bi;
    *dist = best;
}

/// Nearest centroids of rows of `x` in one subspace.
///
/// Row `i`'s sub-vector is `x[i * stride + off .. i * stride + off + dsub]` for `i < n`.
/// Writes `idx[i]` and `dist[i]` (`||x - c||^2 - ||x||^2`). `cm2`/`norms` as in
/// [`nearest_group`]. Specialized for the common widths.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn nearest_rows(
    x: &[f32],
    n: usize,
    stride: usize,
    off: usize,
    dsub: usize,
    cm2: &[f32],
    norms: &[f32],
    mut emit: impl FnMut(usize, u32, f32),
) {
    if n <= FEW {
        // A few vectors (a decode step appends one token): a lane per vector would waste most
        // of the GROUP lanes. Same arithmetic in the same order, so the same codes.
        const L: usize = 8;
        let ksub = norms.len();
        for i in 0..n {
            let row = &x[i * stride + off..i * stride + off + dsub];
            // Lane l scans centroids k = l (mod L); ties resolve to the smallest k below.
            let mut best = [f32::INFINITY; L];
            let mut bk = [0u32; L];
            let mut k0 = 0;
            while k0 + L <= ksub {
                let mut acc = [0f32; L];
                acc.copy_from_slice(&norms[k0..k0 + L]);
                for (d, &xv) in row.iter().enumerate() {
                    for l in 0..L {
                        acc[l] = cm2[(k0 + l) * dsub + d].mul_add(xv, acc[l]);
                    }
                }
                for l in 0..L {
                    let better = acc[l] < best[l];
                    best[l] = if better { acc[l] } else { best[l] };
                    bk[l] = if better { (k0 + l) as u32 } else { bk[l] };
                }
                k0 += L;
            }
            for k in k0..ksub {
                let mut acc = norms[k];
                for (d, &xv) in row.iter().enumerate() {
                    acc = cm2[k * dsub + d].mul_add(xv, acc);
                }
                let l = k % L;
                if acc < best[l] {
                    best[l] = acc;
                    bk[l] = k as u32;
                }
            }
            let (mut bi, mut best_d) = (bk[0], best[0]);
            for l in 1..L {
                if best[l] < best_d || (best[l] == best_d && bk[l] < bi) {
                    best_d = best[l];
                    bi = bk[l];
                }
            }
            let best = best_d;
            emit(i, bi, best);
        }
        return;
    }
    let mut xt = vec![0f32; dsub * GROUP];
    let mut idx = [0u32; GROUP];
    let mut dist = [0f32; GROUP];
    let mut start = 0;
    while start < n {
        let g = GROUP.min(n - start);
        for v in 0..g {
            let row = &x[(start + v) * stride + off..(start + v) * stride + off + dsub];
            for (d, &val) in row.iter().enumerate() {
                xt[d * GROUP + v] = val;
            }
        }
        for v in g..GROUP {
            for d in 0..dsub {
                xt[d * GROUP + v] = 0.0;
            }
        }
        match dsub {
            1 => nearest_group::<1>(&xt, cm2, norms, &mut idx, &mut dist),
            2 => nearest_group::<2>(&xt, cm2, norms, &mut idx, &mut dist),
            3 => nearest_group::<3>(&xt, cm2, norms, &mut idx, &mut dist),
            4 => nearest_group::<4>(&xt, cm2, norms, &mut idx, &mut dist),
            6 => nearest_group::<6>(&xt, cm2, norms, &mut idx, &mut dist),
            8 => nearest_group::<8>(&xt, cm2, norms, &mut idx, &mut dist),
            16 => nearest_group::<16>(&xt, cm2, norms, &mut idx, &mut dist),
            _ => nearest_group_dyn(&xt, cm2, norms, dsub, &mut idx, &mut dist),
        }
        for v in 0..g {
            emit(start + v, idx[v], dist[v]);
        }
        start += g;
    }
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
/// Four codes are summed at once to keep four independent add chains in flight, and code bytes
/// are read eight at a time as little-endian words.
#[inline(always)]
pub fn scan_bytes(tables: &[[f32; 256]], codes: &[u8], out: &mut [f32]) {
    let cb = tables.len();
    let words = cb / 8;
    let n = out.len();
    let n4 = n / 4 * 4;
    let (out4, out_rest) = out.split_at_mut(n4);
    let word =
        |c: &[u8], w: usize| u64::from_le_bytes(c[w * 8..w * 8 + 8].try_into().expect("8 bytes"));
    for (o, c) in out4.chunks_exact_mut(4).zip(codes.chunks_exact(4 * cb)) {
        let (c0, r) = c.split_at(cb);
        let (c1, r) = r.split_at(cb);
        let (c2, c3) = r.split_at(cb);
        let (mut s0, mut s1, mut s2, mut s3) = (0f32, 0f32, 0f32, 0f32);
        for (w, t8) in tables.chunks_exact(8).enumerate() {
            let (w0, w1, w2, w3) = (word(c0, w), word(c1, w), word(c2, w), word(c3, w));
            for (k, t) in t8.iter().enumerate() {
                let sh = 8 * k as u32;
                s0 += t[((w0 >> sh) & 255) as usize];
                s1 += t[((w1 >> sh) & 255) as usize];
                s2 += t[((w2 >> sh) & 255) as usize];
                s3 += t[((w3 >> sh) & 255) as usize];
            }
        }
        for b in words * 8..cb {
            let t = &tables[b];
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

/// Centroids `(.., ksub, dsub)` transposed per block of `ksub * dsub` to `(.., dsub, ksub)` (one
/// quantizer's subspaces, or every KV head's for the attention kernels).
pub fn transpose_books(cent: &[f32], ksub: usize, dsub: usize) -> Vec<f32> {
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
