//! Bindings of [`crate::attention`]: `_ctxcore.pq_attention`, `_ctxcore.pq_paged_attention`,
//! `_ctxcore.paged_attention` and `_ctxcore.page_scores`.
//!
//! Arrays arrive C-contiguous in float32 / uint8 / int64 (the torch custom ops in
//! `ctxcore.ops` convert dtypes and check devices first).

use numpy::ndarray::{Array3, Array4};
use numpy::{
    IntoPyArray, PyArray3, PyArray4, PyReadonlyArray2, PyReadonlyArray3, PyReadonlyArray4,
    PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use super::error::IntoPy;
use crate::attention::{
    page_scores as core_page_scores, paged_attention as core_paged_attention,
    pq_attention as core_pq_attention, pq_attention_selected as core_pq_attention_selected,
    CodePages, Pages, PqAttention,
};
use crate::error::{catch_panic, Error};

fn contiguous<'a, T: numpy::Element>(
    what: &str,
    a: &'a PyReadonlyArray4<'_, T>,
) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|_| Error::shape(what, "a C-contiguous array", "a non-contiguous view"))
        .py()
}

fn ranges(
    what: &str,
    r: &PyReadonlyArray2<'_, i64>,
    batch: usize,
) -> PyResult<Vec<(usize, usize)>> {
    if r.shape() != [batch, 2] {
        return Err(Error::shape(
            what,
            format!("[{batch}, 2]"),
            format!("{:?}", r.shape()),
        ))
        .py();
    }
    let s = r
        .as_slice()
        .map_err(|_| Error::shape(what, "a C-contiguous array", "a non-contiguous view"))
        .py()?;
    s.chunks_exact(2)
        .map(|c| {
            if c[0] < 0 || c[1] < 0 {
                Err(Error::config(format!("{what}: negative bound in {c:?}"))).py()
            } else {
                Ok((c[0] as usize, c[1] as usize))
            }
        })
        .collect()
}

fn nbits_of(what: &str, ksub: usize) -> PyResult<u32> {
    match ksub {
        16 => Ok(4),
        256 => Ok(8),
        other => Err(Error::config(format!(
            "{what}: codebooks must have 16 (4-bit) or 256 (8-bit) centroids, got {other}"
        )))
        .py(),
    }
}

/// `ShapeError` for the first `(what, shape, want)` whose shape is not the wanted one.
fn check_shapes(checks: &[(&str, &[usize], [usize; 4])]) -> PyResult<()> {
    for (what, shape, want) in checks {
        if *shape != want.as_slice() {
            return Err(Error::shape(
                *what,
                format!("{want:?}"),
                format!("{shape:?}"),
            ))
            .py();
        }
    }
    Ok(())
}

/// Attention output `[B, Hq, Tq, D]` and log-sum-exp `[B, Hq, Tq]`.
type OutLse<'py> = (Bound<'py, PyArray4<f32>>, Bound<'py, PyArray3<f32>>);

/// The kernels' flat `(out, lse)` as numpy arrays.
fn out_lse<'py>(
    py: Python<'py>,
    (batch, hq, tq, d): (usize, usize, usize, usize),
    out: Vec<f32>,
    lse: Vec<f32>,
) -> PyResult<OutLse<'py>> {
    let out = Array4::from_shape_vec((batch, hq, tq, d), out)
        .map_err(|e| Error::Internal(e.to_string()))
        .py()?;
    let lse = Array3::from_shape_vec((batch, hq, tq), lse)
        .map_err(|e| Error::Internal(e.to_string()))
        .py()?;
    Ok((out.into_pyarray(py), lse.into_pyarray(py)))
}

/// Attention over PQ codes plus a full-precision part. See `ctxcore.ops.pq_attention`.
#[pyfunction]
#[pyo3(signature = (q, k_codes, v_codes, k_centroids, v_centroids, code_range, fp_k, fp_v, fp_range, scale, causal))]
#[allow(clippy::too_many_arguments)]
pub fn pq_attention<'py>(
    py: Python<'py>,
    q: PyReadonlyArray4<'py, f32>,
    k_codes: PyReadonlyArray4<'py, u8>,
    v_codes: PyReadonlyArray4<'py, u8>,
    k_centroids: PyReadonlyArray4<'py, f32>,
    v_centroids: PyReadonlyArray4<'py, f32>,
    code_range: PyReadonlyArray2<'py, i64>,
    fp_k: PyReadonlyArray4<'py, f32>,
    fp_v: PyReadonlyArray4<'py, f32>,
    fp_range: PyReadonlyArray2<'py, i64>,
    scale: f32,
    causal: bool,
) -> PyResult<OutLse<'py>> {
    codes_attention(
        py,
        (q, k_codes, v_codes, k_centroids, v_centroids),
        Codes::Range(code_range),
        (fp_k, fp_v, fp_range),
        scale,
        causal,
    )
}

/// Attention over the codes of selected pages (`pages [B, Hkv, S]` ids of `page_size`-token
/// pages, negative ids skipped) plus a full-precision part. See
/// `ctxcore.ops.pq_paged_attention`.
#[pyfunction]
#[pyo3(signature = (q, k_codes, v_codes, k_centroids, v_centroids, pages, page_size, fp_k, fp_v, fp_range, scale, causal))]
#[allow(clippy::too_many_arguments)]
pub fn pq_paged_attention<'py>(
    py: Python<'py>,
    q: PyReadonlyArray4<'py, f32>,
    k_codes: PyReadonlyArray4<'py, u8>,
    v_codes: PyReadonlyArray4<'py, u8>,
    k_centroids: PyReadonlyArray4<'py, f32>,
    v_centroids: PyReadonlyArray4<'py, f32>,
    pages: PyReadonlyArray3<'py, i64>,
    page_size: usize,
    fp_k: PyReadonlyArray4<'py, f32>,
    fp_v: PyReadonlyArray4<'py, f32>,
    fp_range: PyReadonlyArray2<'py, i64>,
    scale: f32,
    causal: bool,
) -> PyResult<OutLse<'py>> {
    codes_attention(
        py,
        (q, k_codes, v_codes, k_centroids, v_centroids),
        Codes::Pages(pages, page_size),
        (fp_k, fp_v, fp_range),
        scale,
        causal,
    )
}

/// Which code tokens [`codes_attention`] attends.
enum Codes<'py> {
    /// `[B, 2]` valid ranges.
    Range(PyReadonlyArray2<'py, i64>),
    /// Selected page ids and the page size.
    Pages(PyReadonlyArray3<'py, i64>, usize),
}

type CodeArrays<'py> = (
    PyReadonlyArray4<'py, f32>,
    PyReadonlyArray4<'py, u8>,
    PyReadonlyArray4<'py, u8>,
    PyReadonlyArray4<'py, f32>,
    PyReadonlyArray4<'py, f32>,
);

type FpArrays<'py> = (
    PyReadonlyArray4<'py, f32>,
    PyReadonlyArray4<'py, f32>,
    PyReadonlyArray2<'py, i64>,
);

fn codes_attention<'py>(
    py: Python<'py>,
    (q, k_codes, v_codes, k_centroids, v_centroids): CodeArrays<'py>,
    codes: Codes<'py>,
    (fp_k, fp_v, fp_range): FpArrays<'py>,
    scale: f32,
    causal: bool,
) -> PyResult<OutLse<'py>> {
    let qs = q.shape().to_vec();
    let (batch, hq, tq, d) = (qs[0], qs[1], qs[2], qs[3]);
    let kcs = k_codes.shape().to_vec();
    let (hkv, n) = (kcs[1], kcs[2]);
    let (kcent_s, vcent_s) = (k_centroids.shape().to_vec(), v_centroids.shape().to_vec());
    let k_nbits = nbits_of("k_centroids", kcent_s[2])?;
    let v_nbits = nbits_of("v_centroids", vcent_s[2])?;
    let f = fp_k.shape()[2];
    check_shapes(&[
        (
            "k_codes",
            kcs.as_slice(),
            [batch, hkv, n, (kcent_s[1] * k_nbits as usize).div_ceil(8)],
        ),
        (
            "v_codes",
            v_codes.shape(),
            [batch, hkv, n, (vcent_s[1] * v_nbits as usize).div_ceil(8)],
        ),
        (
            "k_centroids",
            kcent_s.as_slice(),
            [hkv, kcent_s[1], kcent_s[2], d / kcent_s[1].max(1)],
        ),
        (
            "v_centroids",
            vcent_s.as_slice(),
            [hkv, vcent_s[1], vcent_s[2], d / vcent_s[1].max(1)],
        ),
        ("fp_k", fp_k.shape(), [batch, hkv, f, d]),
        ("fp_v", fp_v.shape(), [batch, hkv, f, d]),
    ])?;
    let cr = match &codes {
        Codes::Range(r) => ranges("code_range", r, batch)?,
        Codes::Pages(..) => vec![(0, n); batch],
    };
    let fr = ranges("fp_range", &fp_range, batch)?;
    let args = PqAttention {
        batch,
        hq,
        hkv,
        tq,
        d,
        q: contiguous("q", &q)?,
        n,
        k_codes: contiguous("k_codes", &k_codes)?,
        v_codes: contiguous("v_codes", &v_codes)?,
        k_cent: contiguous("k_centroids", &k_centroids)?,
        k_m: kcent_s[1],
        k_nbits,
        v_cent: contiguous("v_centroids", &v_centroids)?,
        v_m: vcent_s[1],
        v_nbits,
        code_range: &cr,
        f,
        fp_k: contiguous("fp_k", &fp_k)?,
        fp_v: contiguous("fp_v", &fp_v)?,
        fp_range: &fr,
        scale,
        causal,
    };
    let (out, lse) = match &codes {
        Codes::Range(_) => py
            .detach(|| catch_panic(|| core_pq_attention(&args)))
            .py()?,
        Codes::Pages(pages, size) => {
            let s = page_ids("pages", pages, batch, hkv)?;
            let sel = CodePages {
                ids: s.1,
                s: s.0,
                size: *size,
            };
            py.detach(|| catch_panic(|| core_pq_attention_selected(&args, &sel)))
                .py()?
        }
    };
    out_lse(py, (batch, hq, tq, d), out, lse)
}

/// `(S, ids)` of a C-contiguous `[batch, hkv, S]` id array.
fn page_ids<'a>(
    what: &str,
    pages: &'a PyReadonlyArray3<'_, i64>,
    batch: usize,
    hkv: usize,
) -> PyResult<(usize, &'a [i64])> {
    let ps = pages.shape().to_vec();
    if ps[..2] != [batch, hkv] {
        return Err(Error::shape(
            what,
            format!("[{batch}, {hkv}, S]"),
            format!("{ps:?}"),
        ))
        .py();
    }
    let ids = pages
        .as_slice()
        .map_err(|_| Error::shape(what, "a C-contiguous array", "a non-contiguous view"))
        .py()?;
    Ok((ps[2], ids))
}

/// Exact attention over selected pages of `k, v [B, Hkv, N, D]` (ids `pages [B, Hkv, S]`,
/// negative ids skipped) plus a full-precision part, without gathering the pages. See
/// `ctxcore.ops.paged_attention`.
#[pyfunction]
#[pyo3(signature = (q, k, v, pages, page_size, fp_k, fp_v, fp_range, scale, causal))]
#[allow(clippy::too_many_arguments)]
pub fn paged_attention<'py>(
    py: Python<'py>,
    q: PyReadonlyArray4<'py, f32>,
    k: PyReadonlyArray4<'py, f32>,
    v: PyReadonlyArray4<'py, f32>,
    pages: PyReadonlyArray3<'py, i64>,
    page_size: usize,
    fp_k: PyReadonlyArray4<'py, f32>,
    fp_v: PyReadonlyArray4<'py, f32>,
    fp_range: PyReadonlyArray2<'py, i64>,
    scale: f32,
    causal: bool,
) -> PyResult<OutLse<'py>> {
    let qs = q.shape().to_vec();
    let (batch, hq, tq, d) = (qs[0], qs[1], qs[2], qs[3]);
    let ks = k.shape().to_vec();
    let (hkv, n) = (ks[1], ks[2]);
    let f = fp_k.shape()[2];
    check_shapes(&[
        ("k", ks.as_slice(), [batch, hkv, n, d]),
        ("v", v.shape(), [batch, hkv, n, d]),
        ("fp_k", fp_k.shape(), [batch, hkv, f, d]),
        ("fp_v", fp_v.shape(), [batch, hkv, f, d]),
    ])?;
    let (s_ids, ids) = page_ids("pages", &pages, batch, hkv)?;
    let fr = ranges("fp_range", &fp_range, batch)?;
    let no_codes = vec![(0usize, 0usize); batch];
    let args = PqAttention {
        scale,
        causal,
        ..PqAttention::fp_only(
            (batch, hq, hkv, tq, d),
            contiguous("q", &q)?,
            (f, contiguous("fp_k", &fp_k)?, contiguous("fp_v", &fp_v)?),
            &fr,
            &no_codes,
        )
    };
    let pages = Pages {
        k: contiguous("k", &k)?,
        v: contiguous("v", &v)?,
        n,
        ids,
        s: s_ids,
        size: page_size,
    };
    let (out, lse) = py
        .detach(|| catch_panic(|| core_paged_attention(&args, &pages)))
        .py()?;
    out_lse(py, (batch, hq, tq, d), out, lse)
}

/// Quest page scores ``[batch, hkv, pages]`` from ``q [batch, hq, tq, d]`` and per-page key
/// bounds ``kmin, kmax [batch, hkv, pages, d]``.
#[pyfunction]
pub fn page_scores<'py>(
    py: Python<'py>,
    q: PyReadonlyArray4<'py, f32>,
    kmin: PyReadonlyArray4<'py, f32>,
    kmax: PyReadonlyArray4<'py, f32>,
) -> PyResult<Bound<'py, PyArray3<f32>>> {
    let qs = q.shape().to_vec();
    let ks = kmin.shape().to_vec();
    if kmax.shape() != ks.as_slice() || ks[0] != qs[0] || ks[3] != qs[3] {
        return Err(Error::shape(
            "kmin/kmax",
            format!("[{}, hkv, pages, {}] (both equal)", qs[0], qs[3]),
            format!("{ks:?} and {:?}", kmax.shape()),
        ))
        .py();
    }
    let (qv, lo, hi) = (
        contiguous("q", &q)?,
        contiguous("kmin", &kmin)?,
        contiguous("kmax", &kmax)?,
    );
    let s = py
        .detach(|| {
            catch_panic(|| core_page_scores(qv, lo, hi, qs[0], qs[1], ks[1], qs[2], ks[2], qs[3]))
        })
        .py()?;
    let a = Array3::from_shape_vec((ks[0], ks[1], ks[2]), s)
        .map_err(|e| Error::Internal(e.to_string()))
        .py()?;
    Ok(a.into_pyarray(py))
}

/// PQ codes ``[B, H, N, code_bytes]`` uint8 of ``x [B, H, N, D]`` with per-head codebooks
/// ``centroids [H, m, 16 or 256, D // m]`` (nearest centroid per subquantizer).
#[pyfunction]
pub fn pq_encode<'py>(
    py: Python<'py>,
    x: PyReadonlyArray4<'py, f32>,
    centroids: PyReadonlyArray4<'py, f32>,
) -> PyResult<Bound<'py, PyArray4<u8>>> {
    let xs = x.shape().to_vec();
    let cs = centroids.shape().to_vec();
    let (b, h, n, d) = (xs[0], xs[1], xs[2], xs[3]);
    let nbits = nbits_of("centroids", cs[2])?;
    let m = cs[1];
    if cs[0] != h || m == 0 || m * cs[3] != d {
        return Err(Error::shape(
            "centroids",
            format!("[{h}, m, {}, {d} // m]", cs[2]),
            format!("{cs:?}"),
        ))
        .py();
    }
    let (xv, cv) = (contiguous("x", &x)?, contiguous("centroids", &centroids)?);
    let cb = (m * nbits as usize).div_ceil(8);
    let per_head = cs[2] * d;
    let codes = py
        .detach(|| {
            catch_panic(|| {
                let mut codes = vec![0u8; b * h * n * cb];
                for hh in 0..h {
                    let pq = crate::ProductQuantizer::with_centroids(
                        d,
                        m,
                        nbits,
                        cv[hh * per_head..(hh + 1) * per_head].to_vec(),
                    )?;
                    for bb in 0..b {
                        let r = (bb * h + hh) * n;
                        pq.encode_into(&xv[r * d..(r + n) * d], &mut codes[r * cb..(r + n) * cb])?;
                    }
                }
                Ok(codes)
            })
        })
        .py()?;
    let a = Array4::from_shape_vec((b, h, n, cb), codes)
        .map_err(|e| Error::Internal(e.to_string()))
        .py()?;
    Ok(a.into_pyarray(py))
}
