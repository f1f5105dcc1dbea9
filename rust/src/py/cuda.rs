//! Bindings of [`crate::cuda`]: launch the CUDA kernels on device addresses of torch tensors.
//!
//! `ctxcore.ops` validates the tensors, allocates outputs and workspace with torch on the
//! tensors' device, and passes `data_ptr()`s and torch's current stream here. These functions
//! plan the launches (Rust) and enqueue them; nothing is synchronized or copied to the host.
//! Every one raises `DeviceError` when the build has no CUDA kernels or no driver is present.

use pyo3::prelude::*;

use super::error::IntoPy;
use crate::cuda::{self, DType, PagedCodes, PqAttnPtrs, PqAttnShape};
use crate::error::{catch_panic, Error};

fn dims<const N: usize>(what: &str, v: &[usize]) -> PyResult<[usize; N]> {
    v.try_into()
        .map_err(|_| Error::Internal(format!("{what}: expected {N} sizes, got {}", v.len())))
        .py()
}

fn ptrs<const N: usize>(what: &str, v: &[u64]) -> PyResult<[u64; N]> {
    v.try_into()
        .map_err(|_| Error::Internal(format!("{what}: expected {N} pointers, got {}", v.len())))
        .py()
}

/// `dims`: (B, Hq, Hkv, Tq, D, N, F, k_m, k_nbits, v_m, v_nbits), then (paged mode) the page
/// ids per (sequence, KV head) and the page size.
fn attn_shape(d: &[usize], dtype: &str, scale: f32, causal: bool) -> PyResult<PqAttnShape> {
    let (dense, paged) = match d.len() {
        13 => (
            &d[..11],
            Some(PagedCodes {
                ids: d[11],
                page_size: d[12],
            }),
        ),
        _ => (d, None),
    };
    let [batch, hq, hkv, tq, hd, n, f, k_m, k_nbits, v_m, v_nbits] = dims("pq_attention", dense)?;
    Ok(PqAttnShape {
        batch,
        hq,
        hkv,
        tq,
        d: hd,
        n,
        f,
        k_m,
        k_nbits: k_nbits as u32,
        v_m,
        v_nbits: v_nbits as u32,
        dtype: DType::from_name(dtype).py()?,
        scale,
        causal,
        paged,
    })
}

/// Plan a single-kernel op with `plan` (None: nothing to do) and enqueue it on `stream`, GIL
/// released, panics caught.
fn enqueue(
    py: Python<'_>,
    ordinal: i32,
    stream: u64,
    plan: impl FnOnce() -> crate::Result<Option<cuda::Launch>> + Send,
) -> PyResult<()> {
    py.detach(|| catch_panic(|| cuda::run(ordinal, stream, plan()?.as_slice())))
        .py()
}

/// Whether this build has the CUDA kernels.
#[pyfunction]
pub fn cuda_compiled() -> bool {
    cuda::compiled()
}

/// `(name, (major, minor), sm_count, max_smem_per_block)` of CUDA device `ordinal`.
#[pyfunction]
pub fn cuda_device_info(py: Python<'_>, ordinal: i32) -> PyResult<(String, (i32, i32), u32, u32)> {
    let (name, cc, lim) = py
        .detach(|| catch_panic(|| cuda::device_info(ordinal)))
        .py()?;
    Ok((name, cc, lim.sm_count, lim.max_smem))
}

/// Workspace bytes `cuda_pq_attention` needs for these sizes on device `ordinal`.
#[pyfunction]
pub fn cuda_pq_attention_work_bytes(
    ordinal: i32,
    dims: Vec<usize>,
    dtype: &str,
    scale: f32,
    causal: bool,
) -> PyResult<usize> {
    let s = attn_shape(&dims, dtype, scale, causal)?;
    let lim = cuda::device_limits(ordinal).py()?;
    Ok(cuda::plan_pq_attention(&s, &lim).py()?.work_bytes)
}

/// Enqueue `pq_attention` on `stream`. `dims`: (B, Hq, Hkv, Tq, D, N, F, k_m, k_nbits, v_m,
/// v_nbits[, page ids, page_size]); `ptrs`: q, k_codes, v_codes, k_centroids, v_centroids,
/// code_range, fp_k, fp_v, fp_range, out, lse[, pages]; `work`: workspace of
/// `cuda_pq_attention_work_bytes` bytes. With the page dims and pointer it is
/// `pq_paged_attention` (code_range unused).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn cuda_pq_attention(
    py: Python<'_>,
    ordinal: i32,
    stream: u64,
    dims: Vec<usize>,
    dtype: &str,
    scale: f32,
    causal: bool,
    ptrs: Vec<u64>,
    work: u64,
) -> PyResult<()> {
    let s = attn_shape(&dims, dtype, scale, causal)?;
    let (ptrs, pages) = match (s.paged, ptrs.len()) {
        (Some(_), 12) => (&ptrs[..11], ptrs[11]),
        (Some(_), n) => {
            return Err(Error::Internal(format!(
                "pq_paged_attention: expected 12 pointers, got {n}"
            )))
            .py()
        }
        (None, _) => (&ptrs[..], 0),
    };
    let [q, k_codes, v_codes, k_centroids, v_centroids, code_range, fp_k, fp_v, fp_range, out, lse] =
        self::ptrs("pq_attention", ptrs)?;
    let p = PqAttnPtrs {
        q,
        k_codes,
        v_codes,
        k_centroids,
        v_centroids,
        code_range,
        fp_k,
        fp_v,
        fp_range,
        out,
        lse,
        pages,
    };
    py.detach(|| {
        catch_panic(|| {
            let lim = cuda::device_limits(ordinal)?;
            let plan = cuda::plan_pq_attention(&s, &lim)?;
            cuda::run(ordinal, stream, &plan.launches(&p, work))
        })
    })
    .py()
}

/// Enqueue Quest page scores. `dims`: (B, Hq, Hkv, Tq, P, D); `ptrs`: q, kmin, kmax, scores.
#[pyfunction]
pub fn cuda_page_scores(
    py: Python<'_>,
    ordinal: i32,
    stream: u64,
    dims: Vec<usize>,
    dtype: &str,
    ptrs: Vec<u64>,
) -> PyResult<()> {
    let [b, hq, hkv, tq, p, d] = self::dims("page_scores", &dims)?;
    let dt = DType::from_name(dtype).py()?;
    let ptrs = self::ptrs("page_scores", &ptrs)?;
    enqueue(py, ordinal, stream, || {
        cuda::page_scores_launch(b, hq, hkv, tq, p, d, dt, ptrs)
    })
}

/// Enqueue a page gather. `dims`: (B, H, N, D, K, page_size, elem_bytes); `ptrs`: src, pages,
/// out.
#[pyfunction]
pub fn cuda_page_gather(
    py: Python<'_>,
    ordinal: i32,
    stream: u64,
    dims: Vec<usize>,
    ptrs: Vec<u64>,
) -> PyResult<()> {
    let [b, h, n, d, k, ps, eb] = self::dims("page_gather", &dims)?;
    let ptrs = self::ptrs("page_gather", &ptrs)?;
    enqueue(py, ordinal, stream, || {
        cuda::page_gather_launch(b, h, n, d, k, ps, eb, ptrs)
    })
}

/// Enqueue a PQ encode. `dims`: (B, H, N, D, m, nbits); `ptrs`: x, centroids, codes.
#[pyfunction]
pub fn cuda_pq_encode(
    py: Python<'_>,
    ordinal: i32,
    stream: u64,
    dims: Vec<usize>,
    dtype: &str,
    ptrs: Vec<u64>,
) -> PyResult<()> {
    let [b, h, n, d, m, nbits] = self::dims("pq_encode", &dims)?;
    let dt = DType::from_name(dtype).py()?;
    let ptrs = self::ptrs("pq_encode", &ptrs)?;
    enqueue(py, ordinal, stream, || {
        let lim = cuda::device_limits(ordinal)?;
        cuda::pq_encode_launch(b, h, n, d, m, nbits as u32, dt, &lim, ptrs)
    })
}
