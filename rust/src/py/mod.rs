//! PyO3 bindings: the only module that knows about Python. Mirrors the core module by module.
//!
//! Every compute entry point releases the GIL (`Python::detach`) and runs inside
//! [`crate::error::catch_panic`], so no panic ever unwinds into Python.

mod attention;
mod chunk;
mod cuda;
pub(crate) mod error;
mod pq;
mod store;

use pyo3::prelude::*;

use error::IntoPy;

/// Set the number of worker threads of ctxcore's kernels (≥ 1).
#[pyfunction]
fn set_num_threads(n: usize) -> PyResult<()> {
    crate::parallel::set_num_threads(n).py()
}

/// Number of worker threads ctxcore's kernels use.
#[pyfunction]
fn get_num_threads() -> usize {
    crate::parallel::num_threads()
}

/// Whether this CPU runs the AVX2+FMA kernels.
#[pyfunction]
fn cpu_has_avx2() -> bool {
    crate::simd::has_avx2_fma()
}

/// The widest kernels this CPU runs: "avx512", "avx2" or "portable".
#[pyfunction]
fn cpu_simd() -> &'static str {
    match crate::simd::level() {
        crate::simd::Level::Avx512 => "avx512",
        crate::simd::Level::Avx2 => "avx2",
        crate::simd::Level::Portable => "portable",
    }
}

#[pymodule]
fn _ctxcore(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("PQ_FORMAT_VERSION", crate::pq::FORMAT_VERSION)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_has_avx2, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_simd, m)?)?;
    m.add_class::<pq::PQCodec>()?;
    m.add_class::<store::KVStore>()?;
    m.add_function(wrap_pyfunction!(attention::pq_attention, m)?)?;
    m.add_function(wrap_pyfunction!(attention::pq_paged_attention, m)?)?;
    m.add_function(wrap_pyfunction!(attention::paged_attention, m)?)?;
    m.add_function(wrap_pyfunction!(attention::page_scores, m)?)?;
    m.add_function(wrap_pyfunction!(attention::pq_encode, m)?)?;
    m.add_function(wrap_pyfunction!(cuda::cuda_compiled, m)?)?;
    m.add_function(wrap_pyfunction!(cuda::cuda_device_info, m)?)?;
    m.add_function(wrap_pyfunction!(cuda::cuda_pq_attention_work_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(cuda::cuda_pq_attention, m)?)?;
    m.add_function(wrap_pyfunction!(cuda::cuda_page_scores, m)?)?;
    m.add_function(wrap_pyfunction!(cuda::cuda_page_gather, m)?)?;
    m.add_function(wrap_pyfunction!(cuda::cuda_pq_encode, m)?)?;
    m.add("STORE_FORMAT_VERSION", crate::store::STORE_FORMAT_VERSION)?;
    m.add("PARTS_FORMAT_VERSION", crate::store::PARTS_FORMAT_VERSION)?;
    m.add_function(wrap_pyfunction!(chunk::chunk_tokens, m)?)?;
    m.add_class::<chunk::TokenChunk>()?;
    Ok(())
}
