//! k-means for one PQ subspace: k-means++ seeding, Lloyd iterations, empty-cluster re-seeding.

use super::kernels::nearest_rows;
use crate::rng::SplitMix64;

/// From centroids `(k, d)`: the transpose `(d, k)`, `-2 * c` `(k, d)` and squared norms `[k]`.
pub fn derived(c: &[f32], k: usize, d: usize, ct: &mut [f32], cm2: &mut [f32], norms: &mut [f32]) {
    for kk in 0..k {
        let row = &c[kk * d..(kk + 1) * d];
        norms[kk] = row.iter().map(|v| v * v).sum();
        for (dd, &v) in row.iter().enumerate() {
            ct[dd * k + kk] = v;
            cm2[kk * d + dd] = -2.0 * v;
        }
    }
}

/// Points per block of the k-means++ distance table (block sums make sampling O(n / B + B)).
const PP_BLOCK: usize = 256;

/// `dist[i] = min(dist[i], ||x_i - c||^2)` over points `xt` (Layout `(d, n)`), refreshing the
/// block sums. Vectorizes over points.
#[inline(always)]
fn pp_update(xt: &[f32], n: usize, c: &[f32], dist: &mut [f32], bsum: &mut [f64]) {
    let mut tmp = [0f32; PP_BLOCK];
    for (bi, (dblk, bs)) in dist.chunks_mut(PP_BLOCK).zip(bsum.iter_mut()).enumerate() {
        let lo = bi * PP_BLOCK;
        let len = dblk.len();
        let t = &mut tmp[..len];
        t.fill(0.0);
        for (dd, &cv) in c.iter().enumerate() {
            let col = &xt[dd * n + lo..dd * n + lo + len];
            for (acc, &v) in t.iter_mut().zip(col) {
                let diff = v - cv;
                *acc = diff.mul_add(diff, *acc);
            }
        }
        let mut sum = 0f32;
        for (w, &nd) in dblk.iter_mut().zip(t.iter()) {
            *w = w.min(nd);
            sum += *w;
        }
        *bs = sum as f64;
    }
}

/// k-means++ seeding: `k` rows of `x` (`[n, d]`), chosen with probability proportional to the
/// squared distance to the nearest already chosen center.
fn kmeanspp(x: &[f32], n: usize, d: usize, k: usize, rng: &mut SplitMix64) -> Vec<f32> {
    let mut xt = vec![0f32; d * n];
    for (i, row) in x.chunks_exact(d).enumerate() {
        for (dd, &v) in row.iter().enumerate() {
            xt[dd * n + i] = v;
        }
    }
    let mut dist = vec![f32::INFINITY; n];
    let mut bsum = vec![0f64; n.div_ceil(PP_BLOCK)];
    let mut c = Vec::with_capacity(k * d);
    let first = rng.below(n);
    c.extend_from_slice(&x[first * d..(first + 1) * d]);
    crate::dispatch!(pp_update(&xt, n, &c[..d], &mut dist, &mut bsum));
    for _ in 1..k {
        let total: f64 = bsum.iter().sum();
        let pick = if total > 0.0 && total.is_finite() {
            let mut r = rng.next_f64() * total;
            let mut blk = bsum.len() - 1;
            for (bi, &w) in bsum.iter().enumerate() {
                if r < w {
                    blk = bi;
                    break;
                }
                r -= w;
            }
            let lo = blk * PP_BLOCK;
            let hi = (lo + PP_BLOCK).min(n);
            let mut pick = hi - 1;
            for (i, &w) in dist[lo..hi].iter().enumerate() {
                if r < w as f64 {
                    pick = lo + i;
                    break;
                }
                r -= w as f64;
            }
            // Never pick a point with zero weight (it is already a center).
            if dist[pick] == 0.0 {
                dist.iter().rposition(|&w| w > 0.0).unwrap_or(pick)
            } else {
                pick
            }
        } else {
            rng.below(n) // all points coincide with centers: duplicates are unavoidable
        };
        let start = c.len();
        c.extend_from_slice(&x[pick * d..(pick + 1) * d]);
        crate::dispatch!(pp_update(
            &xt,
            n,
            &c[start..start + d],
            &mut dist,
            &mut bsum
        ));
    }
    c
}

/// Train `k` centroids on `x` (`[n, d]`, `n >= k`). Returns Layout `(k, d)`.
///
/// Deterministic for a given `rng` state. Empty clusters are re-seeded with the points farthest
/// from their assigned centroid.
pub fn kmeans(
    x: &[f32],
    n: usize,
    d: usize,
    k: usize,
    iters: usize,
    rng: &mut SplitMix64,
) -> Vec<f32> {
    debug_assert!(n >= k);
    let mut c = kmeanspp(x, n, d, k, rng);
    let mut ct = vec![0f32; k * d];
    let mut cm2 = vec![0f32; k * d];
    let mut norms = vec![0f32; k];
    let mut assign = vec![0u32; n];
    let mut err = vec![0f32; n];
    let mut sums = vec![0f64; k * d];
    let mut counts = vec![0usize; k];
    for _ in 0..iters {
        derived(&c, k, d, &mut ct, &mut cm2, &mut norms);
        crate::dispatch!(assign_all(x, n, d, &cm2, &norms, &mut assign, &mut err));
        sums.fill(0.0);
        counts.fill(0);
        for (i, &a) in assign.iter().enumerate() {
            let a = a as usize;
            counts[a] += 1;
            for (s, &v) in sums[a * d..(a + 1) * d]
                .iter_mut()
                .zip(&x[i * d..(i + 1) * d])
            {
                *s += v as f64;
            }
        }
        for kk in 0..k {
            if counts[kk] > 0 {
                let inv = 1.0 / counts[kk] as f64;
                for dd in 0..d {
                    c[kk * d + dd] = (sums[kk * d + dd] * inv) as f32;
                }
            }
        }
        // Re-seed empty clusters with the worst-served points (distinct points each time).
        let empty: Vec<usize> = (0..k).filter(|&kk| counts[kk] == 0).collect();
        if !empty.is_empty() {
            let mut order: Vec<usize> = (0..n).collect();
            // err holds ||c||^2 - 2x.c; add ||x||^2 to get the true squared distance.
            let full: Vec<f32> = (0..n)
                .map(|i| err[i] + x[i * d..(i + 1) * d].iter().map(|v| v * v).sum::<f32>())
                .collect();
            order.sort_by(|&a, &b| full[b].total_cmp(&full[a]).then(a.cmp(&b)));
            for (slot, &kk) in empty.iter().enumerate() {
                let p = order[slot % n];
                c[kk * d..(kk + 1) * d].copy_from_slice(&x[p * d..(p + 1) * d]);
            }
        }
    }
    c
}

#[inline(always)]
fn assign_all(
    x: &[f32],
    n: usize,
    d: usize,
    cm2: &[f32],
    norms: &[f32],
    assign: &mut [u32],
    err: &mut [f32],
) {
    nearest_rows(x, n, d, 0, d, cm2, norms, |i, a, e| {
        assign[i] = a;
        err[i] = e;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_separated_clusters() {
        // Four well separated 2-D blobs, k = 8: every blob must get at least one centroid.
        let mut rng = SplitMix64::new(1, 0);
        let centers = [(0.0, 0.0), (10.0, 0.0), (0.0, 10.0), (10.0, 10.0)];
        let mut x = Vec::new();
        for i in 0..400 {
            let (cx, cy) = centers[i % 4];
            x.push(cx + rng.next_f64() as f32 * 0.1);
            x.push(cy + rng.next_f64() as f32 * 0.1);
        }
        let c = kmeans(&x, 400, 2, 8, 10, &mut SplitMix64::new(3, 0));
        for (cx, cy) in centers {
            let best = (0..8)
                .map(|k| (c[2 * k] - cx).powi(2) + (c[2 * k + 1] - cy).powi(2))
                .fold(f32::MAX, f32::min);
            assert!(
                best < 0.1,
                "blob ({cx},{cy}) has no centroid nearby: {best}"
            );
        }
    }

    #[test]
    fn duplicates_do_not_break_training() {
        let x = vec![1.0f32; 64 * 3];
        let c = kmeans(&x, 64, 3, 16, 5, &mut SplitMix64::new(0, 0));
        assert!(c.iter().all(|&v| v == 1.0));
    }
}
