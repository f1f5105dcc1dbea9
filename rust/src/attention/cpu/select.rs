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

/// Quest bounds per query row straight from quantized abstracts
/// (`crate::store::quantize_abstract`'s layout: per KV head `[lo f32, hi f32, min u8 (d),
/// max u8 (d), mean u8 (d)]`), one slice per page: each page's bounds are dequantized into a
/// small buffer and scored there, so no dequantized copy of every abstract is made.
///
/// `q`: `(hq, tq, d)` of one sequence. Returns `(hq * tq, pages)`: row `r` (query head
/// `r / tq`, token `r % tq`) bounds `q_r . k` over the keys of its KV head in each page.
pub fn page_bounds_quantized(
    q: &[f32],
    abstracts: &[&[u8]],
    hq: usize,
    hkv: usize,
    tq: usize,
    d: usize,
) -> Result<Vec<f32>> {
    check_heads(hq, hkv)?;
    if q.len() != hq * tq * d {
        return Err(Error::shape(
            "q",
            format!("[{hq}, {tq}, {d}]"),
            format!("{} values", q.len()),
        ));
    }
    let per_head = 8 + 3 * d;
    if let Some(p) = abstracts.iter().position(|a| a.len() != hkv * per_head) {
        return Err(Error::shape(
            "page abstract",
            format!("{} bytes", hkv * per_head),
            format!("{} bytes (page {p})", abstracts[p].len()),
        ));
    }
    let (pages, rows) = (abstracts.len(), hq * tq);
    let g = hq / hkv;
    // A task's part: Layout (rows, np) for its np pages.
    let score_pages = |p0: usize, part: &mut [f32]| {
        let mut lo_hi = vec![0f32; 2 * d];
        let np = part.len() / rows;
        for i in 0..np {
            let a = abstracts[p0 + i];
            for h in 0..hkv {
                let x = &a[h * per_head..(h + 1) * per_head];
                let lo = f32::from_le_bytes(x[..4].try_into().expect("4 bytes"));
                let hi = f32::from_le_bytes(x[4..8].try_into().expect("4 bytes"));
                let step = (hi - lo) / 255.0;
                for (o, &c) in lo_hi.iter_mut().zip(&x[8..8 + 2 * d]) {
                    *o = if c == 255 { hi } else { lo + c as f32 * step };
                }
                let (kmin, kmax) = lo_hi.split_at(d);
                for r in h * g * tq..(h + 1) * g * tq {
                    part[r * np + i] = bound(&q[r * d..(r + 1) * d], kmin, kmax);
                }
            }
        }
    };
    const PAGES_PER_TASK: usize = 2048;
    let tasks = pages.div_ceil(PAGES_PER_TASK);
    let parts = crate::parallel::map(tasks, |t| {
        let p0 = t * PAGES_PER_TASK;
        let mut part = vec![0f32; (pages - p0).min(PAGES_PER_TASK) * rows];
        crate::dispatch!(score_pages(p0, &mut part));
        part
    })?;
    let mut out = vec![f32::NEG_INFINITY; rows * pages];
    for (t, part) in parts.iter().enumerate() {
        let (p0, np) = (t * PAGES_PER_TASK, part.len() / rows);
        for r in 0..rows {
            out[r * pages + p0..r * pages + p0 + np].copy_from_slice(&part[r * np..(r + 1) * np]);
        }
    }
    Ok(out)
}

/// [`page_scores`] straight from quantized abstracts: the maximum of
/// [`page_bounds_quantized`] over the rows of each KV head. The same values as [`page_scores`]
/// over `crate::store::dequantize_abstract`'s output, bit for bit. Returns `(hkv, pages)`.
pub fn page_scores_quantized(
    q: &[f32],
    abstracts: &[&[u8]],
    hq: usize,
    hkv: usize,
    tq: usize,
    d: usize,
) -> Result<Vec<f32>> {
    let b = page_bounds_quantized(q, abstracts, hq, hkv, tq, d)?;
    Ok(group_max(&b, hkv, (hq / hkv) * tq, abstracts.len()))
}

/// `(hkv * per, pages)` -> `(hkv, pages)`: the maximum over each KV head's `per` rows.
pub(crate) fn group_max(b: &[f32], hkv: usize, per: usize, pages: usize) -> Vec<f32> {
    let mut out = vec![f32::NEG_INFINITY; hkv * pages];
    for h in 0..hkv {
        let o = &mut out[h * pages..(h + 1) * pages];
        for r in h * per..(h + 1) * per {
            for (x, &y) in o.iter_mut().zip(&b[r * pages..(r + 1) * pages]) {
                *x = x.max(y);
            }
        }
    }
    out
}
