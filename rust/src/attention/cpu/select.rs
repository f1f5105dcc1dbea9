//! Quest page selection: upper bounds of `q . k` from per-page key minima and maxima.
use super::*;

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
