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
/// block sums (eight partial sums per block, in a fixed order: the same result on every SIMD
/// level). The AVX2 version does the same arithmetic eight points per register; the portable
/// loops are what LLVM did not vectorize well here (one serial chain of adds made the seeding
/// 7x a Lloyd iteration).
fn pp_update(xt: &[f32], n: usize, c: &[f32], dist: &mut [f32], bsum: &mut [f64]) {
    assert!(xt.len() >= c.len() * n && dist.len() == n);
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx2_fma() {
        // SAFETY: AVX2 and FMA are available (checked just above); the bounds are asserted.
        unsafe { pp_update_avx2(xt, n, c, dist, bsum) };
        return;
    }
    for (bi, (dblk, bs)) in dist.chunks_mut(PP_BLOCK).zip(bsum.iter_mut()).enumerate() {
        let lo = bi * PP_BLOCK;
        let mut lanes = [0f32; 8];
        for (i, w) in dblk.iter_mut().enumerate() {
            let mut nd = 0f32;
            for (dd, &cv) in c.iter().enumerate() {
                let diff = xt[dd * n + lo + i] - cv;
                nd = diff.mul_add(diff, nd);
            }
            *w = if nd < *w { nd } else { *w };
            lanes[i % 8] += *w;
        }
        *bs = lanes.iter().map(|&v| v as f64).sum();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pp_update_avx2(xt: &[f32], n: usize, c: &[f32], dist: &mut [f32], bsum: &mut [f64]) {
    use std::arch::x86_64::*;
    for (bi, (dblk, bs)) in dist.chunks_mut(PP_BLOCK).zip(bsum.iter_mut()).enumerate() {
        let lo = bi * PP_BLOCK;
        let len = dblk.len();
        let full = len / 8 * 8;
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i < full {
            let mut nd = _mm256_setzero_ps();
            for (dd, &cv) in c.iter().enumerate() {
                // SAFETY: dd * n + lo + i + 8 <= d * n <= xt.len() (i + 8 <= len, lo + len <= n).
                let x = _mm256_loadu_ps(xt.as_ptr().add(dd * n + lo + i));
                let diff = _mm256_sub_ps(x, _mm256_set1_ps(cv));
                nd = _mm256_fmadd_ps(diff, diff, nd);
            }
            let p = dblk.as_mut_ptr().add(i);
            let w = _mm256_loadu_ps(p);
            // vminps(nd, w) is `if nd < w { nd } else { w }`, as the portable loop (a blend
            // here compiles to a masked store, which is slow on AMD).
            let m = _mm256_min_ps(nd, w);
            _mm256_storeu_ps(p, m);
            acc = _mm256_add_ps(acc, m);
            i += 8;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        for (j, w) in dblk[full..].iter_mut().enumerate() {
            let mut nd = 0f32;
            for (dd, &cv) in c.iter().enumerate() {
                let diff = xt[dd * n + lo + full + j] - cv;
                nd = diff.mul_add(diff, nd);
            }
            *w = if nd < *w { nd } else { *w };
            lanes[(full + j) % 8] += *w;
        }
        *bs = lanes.iter().map(|&v| v as f64).sum();
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
    pp_update(&xt, n, &c[..d], &mut dist, &mut bsum);
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
        pp_update(&xt, n, &c[start..start + d], &mut dist, &mut bsum);
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

/// Fine bins of the value range in [`kmeans_1d`].
const BINS_1D: usize = 1024;
/// Up to this many values, [`kmeans_1d`] works on the sorted values themselves (exact).
const EXACT_1D: usize = 1024;

/// k-means for one-dimensional data (`d = 1`), in O(n) plus a few microseconds.
///
/// Beyond [`EXACT_1D`] values, they are first summarized in [`BINS_1D`] equal-width bins of their range (count, sum
/// and sum of squares per bin; each non-empty bin then acts as one weighted point at its
/// mean). In one dimension every cluster of a Lloyd fixed point is an interval of the ordered
/// points, so an iteration is `k` binary searches plus `k` range means from prefix sums:
/// O(k log bins), instead of O(n k) distance evaluations. Centroids are exact means of the
/// values they serve; only the cluster boundaries are resolved to a bin. Lloyd is seeded at the
/// high-resolution optimum of scalar quantization (centroid density proportional to the cube
/// root of the value density: on heavy-tailed data it starts within 4% of the converged error,
/// where equal-count quantiles start 2x above it and converge to a worse minimum) and runs to
/// convergence (no centroid moves by 1e-4 of the range; at most `max(iters, 64)` iterations). An empty cluster takes the upper half of
/// the cluster with the largest squared error. Deterministic. Returns `k` centroids in
/// increasing order.
pub fn kmeans_1d(x: &[f32], k: usize, iters: usize) -> Vec<f32> {
    let n = x.len();
    debug_assert!(n >= k && k > 0);
    let (lo, hi) = x
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let (lo, hi) = (lo as f64, hi as f64);
    let width = (hi - lo) / BINS_1D as f64;
    let inv = if width > 0.0 { 1.0 / width } else { 0.0 };
    // Up to EXACT_1D values are their own points (sorted: no two values share a bin); more
    // are summarized in the bins.
    let bins = if n <= EXACT_1D { n } else { BINS_1D };
    let mut cnt = vec![0f64; bins];
    let mut sum = vec![0f64; bins];
    let mut sq = vec![0f64; bins];
    if n <= EXACT_1D {
        let mut sorted: Vec<f32> = x.to_vec();
        sorted.sort_unstable_by(f32::total_cmp);
        for (i, &v) in sorted.iter().enumerate() {
            let v = v as f64;
            cnt[i] = 1.0;
            sum[i] = v;
            sq[i] = v * v;
        }
    } else {
        for &v in x {
            let v = v as f64;
            let b = (((v - lo) * inv) as usize).min(BINS_1D - 1);
            cnt[b] += 1.0;
            sum[b] += v;
            sq[b] += v * v;
        }
    }
    // Non-empty bins as weighted points, in increasing order, with prefix sums.
    let keep: Vec<usize> = (0..bins).filter(|&b| cnt[b] > 0.0).collect();
    let pts: Vec<f64> = keep.iter().map(|&b| sum[b] / cnt[b]).collect();
    let mut pc = vec![0f64; keep.len() + 1];
    let mut ps = pc.clone();
    let mut pq = pc.clone();
    for (i, &b) in keep.iter().enumerate() {
        pc[i + 1] = pc[i] + cnt[b];
        ps[i + 1] = ps[i] + sum[b];
        pq[i + 1] = pq[i] + sq[b];
    }
    let fit = Fit1d {
        tol: 1e-4 * (hi - lo),
        pts: &pts,
        c: &pc,
        s: &ps,
        q: &pq,
    };
    // Centroids at equal steps of a cumulative weight over the points.
    let by_mass = |w: &[f64]| -> Vec<f64> {
        let total: f64 = w.iter().sum();
        let mut out = Vec::with_capacity(k);
        let (mut acc, mut i) = (0.0, 0);
        for j in 0..k {
            let target = total * (j as f64 + 0.5) / k as f64;
            while i + 1 < w.len() && acc + w[i] < target {
                acc += w[i];
                i += 1;
            }
            out.push(pts[i]);
        }
        out
    };
    // Value density on 64 coarse cells (each 64 fine bins), cube-rooted, spread over the
    // points of each cell.
    let cells = 64;
    let cell = |i: usize| -> usize {
        if n <= EXACT_1D {
            // Sorted values: their cell by value.
            (((pts[i] - lo) * inv / (BINS_1D / cells) as f64) as usize).min(cells - 1)
        } else {
            keep[i] / (BINS_1D / cells)
        }
    };
    let mut cell_pts = vec![0usize; cells];
    let mut cell_cnt = vec![0f64; cells];
    for (i, &b) in keep.iter().enumerate() {
        cell_pts[cell(i)] += 1;
        cell_cnt[cell(i)] += cnt[b];
    }
    let cell_w: Vec<f64> = (0..cells)
        .map(|i| {
            if cell_pts[i] > 0 {
                cell_cnt[i].cbrt() / cell_pts[i] as f64
            } else {
                0.0
            }
        })
        .collect();
    let cube: Vec<f64> = (0..keep.len()).map(|i| cell_w[cell(i)]).collect();
    fit.lloyd(by_mass(&cube), iters.max(64))
        .1
        .into_iter()
        .map(|v| v as f32)
        .collect()
}

/// Ordered weighted points with prefix sums of weight, weighted value and weighted square, for
/// [`kmeans_1d`].
struct Fit1d<'a> {
    /// Convergence tolerance on centroid moves.
    tol: f64,
    pts: &'a [f64],
    c: &'a [f64],
    s: &'a [f64],
    q: &'a [f64],
}

impl Fit1d<'_> {
    fn mean(&self, a: usize, b: usize) -> f64 {
        (self.s[b] - self.s[a]) / (self.c[b] - self.c[a])
    }
    /// Squared error of points `[a, b)` around `m`.
    fn err(&self, a: usize, b: usize, m: f64) -> f64 {
        if b <= a {
            return 0.0;
        }
        let (w, s, q) = (
            self.c[b] - self.c[a],
            self.s[b] - self.s[a],
            self.q[b] - self.q[a],
        );
        (q - 2.0 * m * s + m * m * w).max(0.0)
    }
    /// Lloyd from `c` to a fixed point: `(squared error, sorted centroids)`.
    fn lloyd(&self, mut c: Vec<f64>, iters: usize) -> (f64, Vec<f64>) {
        let (n, k) = (self.pts.len(), c.len());
        let mut bounds = vec![0usize; k + 1];
        let assign = |c: &mut Vec<f64>, bounds: &mut Vec<usize>| {
            c.sort_unstable_by(f64::total_cmp);
            bounds[0] = 0;
            bounds[k] = n;
            for i in 1..k {
                let mid = 0.5 * (c[i - 1] + c[i]);
                bounds[i] = self.pts.partition_point(|&v| v < mid);
            }
        };
        for _ in 0..iters {
            assign(&mut c, &mut bounds);
            let mut next: Vec<f64> = (0..k)
                .map(|i| {
                    let (a, b) = (bounds[i], bounds[i + 1]);
                    if b > a {
                        self.mean(a, b)
                    } else {
                        f64::NAN
                    }
                })
                .collect();
            for i in 0..k {
                if !next[i].is_nan() {
                    continue;
                }
                let sse = |j: usize| {
                    let (a, b) = (bounds[j], bounds[j + 1]);
                    self.err(a, b, self.mean(a, b))
                };
                let worst = (0..k)
                    .filter(|&j| bounds[j + 1] - bounds[j] >= 2)
                    .max_by(|&a, &b| sse(a).total_cmp(&sse(b)));
                next[i] = match worst {
                    Some(j) => {
                        let (a, b) = (bounds[j], bounds[j + 1]);
                        let half = a + (b - a) / 2;
                        next[j] = self.mean(a, half);
                        bounds[j + 1] = half; // later empties see the split cluster
                        self.mean(half, b)
                    }
                    None => c[i], // fewer distinct values than centroids: a duplicate
                };
            }
            // Converged when no centroid moves by more than 1e-4 of the value range.
            let moved = next.iter().zip(&c).any(|(a, b)| (a - b).abs() > self.tol);
            c = next;
            if !moved {
                break;
            }
        }
        assign(&mut c, &mut bounds);
        let err = (0..k)
            .map(|i| self.err(bounds[i], bounds[i + 1], c[i]))
            .sum();
        (err, c)
    }
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
    fn one_dim_matches_lloyd_and_beats_quantiles() {
        // Heavy-tailed 1-D data: the sorted Lloyd must reach an error no worse than the generic
        // k-means (same objective), and every centroid must be the mean of its interval.
        let mut rng = SplitMix64::new(5, 0);
        let x: Vec<f32> = (0..4000)
            .map(|_| {
                let u = rng.next_f64() as f32 - 0.5;
                u * u * u * 40.0 + u
            })
            .collect();
        let err = |c: &[f32]| -> f64 {
            x.iter()
                .map(|&v| {
                    c.iter()
                        .map(|&cc| ((v - cc) as f64).powi(2))
                        .fold(f64::MAX, f64::min)
                })
                .sum()
        };
        let c1 = kmeans_1d(&x, 16, 15);
        assert!(c1.windows(2).all(|w| w[0] <= w[1]));
        let c2 = kmeans(&x, x.len(), 1, 16, 25, &mut SplitMix64::new(1, 0));
        // Within 5%: beyond EXACT_1D values the boundaries are resolved to 1/1024 of the range.
        assert!(err(&c1) <= err(&c2) * 1.05, "{} vs {}", err(&c1), err(&c2));
        for (i, &cc) in c1.iter().enumerate() {
            let mine: Vec<f32> = x
                .iter()
                .copied()
                .filter(|&v| {
                    c1.iter()
                        .enumerate()
                        .min_by(|a, b| (v - a.1).abs().total_cmp(&(v - b.1).abs()))
                        .unwrap()
                        .0
                        == i
                })
                .collect();
            let m = mine.iter().map(|&v| v as f64).sum::<f64>() / mine.len() as f64;
            // Boundaries are resolved to 1/1024 of the range, so a centroid is its interval's mean
            // up to the few points that sit within a bin of a boundary.
            assert!(
                (m as f32 - cc).abs() < 1e-2 * (1.0 + cc.abs()),
                "{m} vs {cc}"
            );
        }
    }

    #[test]
    fn one_dim_with_few_distinct_values() {
        let x: Vec<f32> = (0..100).map(|i| (i % 3) as f32).collect();
        let c = kmeans_1d(&x, 16, 15);
        assert_eq!(c.len(), 16);
        for v in [0.0f32, 1.0, 2.0] {
            assert!(c.contains(&v), "{c:?}");
        }
        assert!(c.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn duplicates_do_not_break_training() {
        let x = vec![1.0f32; 64 * 3];
        let c = kmeans(&x, 64, 3, 16, 5, &mut SplitMix64::new(0, 0));
        assert!(c.iter().all(|&v| v == 1.0));
    }
}
