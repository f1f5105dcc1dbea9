//! Bindings of [`crate::pq::ProductQuantizer`] as `_ctxcore.PQCodec`.
//!
//! Arrays must arrive C-contiguous with the right dtype; the Python wrapper
//! (`ctxcore.ProductQuantizer`) converts torch tensors and checks dtypes first with friendly
//! messages. Outputs are new numpy arrays owned by Python.

use numpy::ndarray::{Array2, Array3};
use numpy::{IntoPyArray, PyArray2, PyArray3, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::error::IntoPy;
use crate::error::{catch_panic, Error};
use crate::pq::{Metric, ProductQuantizer};

fn slice<'a, T: numpy::Element>(what: &str, a: &'a PyReadonlyArray2<'_, T>) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|_| {
            Error::shape(
                what,
                "a C-contiguous array",
                "a non-contiguous view (use np.ascontiguousarray)",
            )
        })
        .py()
}

fn check_width(what: &str, shape: &[usize], width: usize) -> PyResult<()> {
    if shape[1] != width {
        return Err(Error::shape(
            what,
            format!("[n, {width}]"),
            format!("{shape:?}"),
        ))
        .py();
    }
    Ok(())
}

fn metric(name: &str) -> PyResult<Metric> {
    match name {
        "ip" | "inner_product" => Ok(Metric::InnerProduct),
        "l2" => Ok(Metric::L2),
        other => Err(Error::config(format!(
            "metric must be 'ip' or 'l2', got {other:?}"
        )))
        .py(),
    }
}

/// Product-quantization codec (see `ctxcore.ProductQuantizer` for the documented API).
#[pyclass(module = "ctxcore._ctxcore")]
pub struct PQCodec {
    pub(crate) inner: ProductQuantizer,
}

#[pymethods]
impl PQCodec {
    #[new]
    fn new(dim: usize, m: usize, nbits: u32) -> PyResult<Self> {
        Ok(PQCodec {
            inner: ProductQuantizer::new(dim, m, nbits).py()?,
        })
    }

    #[getter]
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    #[getter]
    fn m(&self) -> usize {
        self.inner.m()
    }
    #[getter]
    fn nbits(&self) -> u32 {
        self.inner.nbits()
    }
    #[getter]
    fn dsub(&self) -> usize {
        self.inner.dsub()
    }
    #[getter]
    fn ksub(&self) -> usize {
        self.inner.ksub()
    }
    #[getter]
    fn code_bytes(&self) -> usize {
        self.inner.code_bytes()
    }
    #[getter]
    fn is_trained(&self) -> bool {
        self.inner.is_trained()
    }

    /// The same quantizer with float16 centroids and no held norms (as a KV store holds it).
    fn compact(&self) -> PQCodec {
        PQCodec {
            inner: self.inner.compact(),
        }
    }

    /// Copy of the centroids, float32 ``[m, ksub, dsub]``, or None before training.
    #[getter]
    fn centroids<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyArray3<f32>>>> {
        let Some(c) = self.inner.centroids() else {
            return Ok(None);
        };
        let shape = (self.inner.m(), self.inner.ksub(), self.inner.dsub());
        let a = Array3::from_shape_vec(shape, c.to_vec())
            .map_err(|e| Error::Internal(e.to_string()))
            .py()?;
        Ok(Some(a.into_pyarray(py)))
    }

    /// Train on float32 ``[n, dim]``.
    fn train(
        &mut self,
        py: Python<'_>,
        x: PyReadonlyArray2<'_, f32>,
        iters: usize,
        seed: u64,
    ) -> PyResult<()> {
        check_width("train input", x.shape(), self.inner.dim())?;
        let xs = slice("train input", &x)?;
        let pq = &mut self.inner;
        py.detach(|| catch_panic(|| pq.train(xs, iters, seed))).py()
    }

    /// Encode float32 ``[n, dim]`` into uint8 ``[n, code_bytes]``.
    fn encode<'py>(
        &self,
        py: Python<'py>,
        x: PyReadonlyArray2<'py, f32>,
    ) -> PyResult<Bound<'py, PyArray2<u8>>> {
        check_width("encode input", x.shape(), self.inner.dim())?;
        let n = x.shape()[0];
        let xs = slice("encode input", &x)?;
        let pq = &self.inner;
        let codes = py.detach(|| catch_panic(|| pq.encode(xs))).py()?;
        to_2d(py, codes, n, pq.code_bytes())
    }

    /// Decode uint8 ``[n, code_bytes]`` into float32 ``[n, dim]``.
    fn decode<'py>(
        &self,
        py: Python<'py>,
        codes: PyReadonlyArray2<'py, u8>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        check_width("codes", codes.shape(), self.inner.code_bytes())?;
        let n = codes.shape()[0];
        let cs = slice("codes", &codes)?;
        let pq = &self.inner;
        let out = py.detach(|| catch_panic(|| pq.decode(cs))).py()?;
        to_2d(py, out, n, pq.dim())
    }

    /// Scores float32 ``[nq, n]`` of queries float32 ``[nq, dim]`` against codes ``[n, code_bytes]``.
    fn scores<'py>(
        &self,
        py: Python<'py>,
        q: PyReadonlyArray2<'py, f32>,
        codes: PyReadonlyArray2<'py, u8>,
        metric_name: &str,
        fast: bool,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let metric = metric(metric_name)?;
        check_width("queries", q.shape(), self.inner.dim())?;
        check_width("codes", codes.shape(), self.inner.code_bytes())?;
        let (nq, n) = (q.shape()[0], codes.shape()[0]);
        let (qs, cs) = (slice("queries", &q)?, slice("codes", &codes)?);
        let pq = &self.inner;
        let out = py
            .detach(|| {
                catch_panic(|| {
                    if fast {
                        pq.scores_fast(qs, cs, metric)
                    } else {
                        pq.scores(qs, cs, metric)
                    }
                })
            })
            .py()?;
        to_2d(py, out, nq, n)
    }

    /// Lookup tables float32 ``[nq, m, ksub]`` of queries ``[nq, dim]``.
    fn lookup_tables<'py>(
        &self,
        py: Python<'py>,
        q: PyReadonlyArray2<'py, f32>,
        metric_name: &str,
    ) -> PyResult<Bound<'py, PyArray3<f32>>> {
        let metric = metric(metric_name)?;
        check_width("queries", q.shape(), self.inner.dim())?;
        let nq = q.shape()[0];
        let qs = slice("queries", &q)?;
        let pq = &self.inner;
        let out = py
            .detach(|| catch_panic(|| pq.lookup_tables(qs, metric)))
            .py()?;
        let a = Array3::from_shape_vec((nq, pq.m(), pq.ksub()), out)
            .map_err(|e| Error::Internal(e.to_string()))
            .py()?;
        Ok(a.into_pyarray(py))
    }

    /// Versioned, checksummed serialization.
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.to_bytes())
    }

    /// Inverse of ``to_bytes``; raises CorruptDataError / FormatVersionError on bad input.
    #[staticmethod]
    fn from_bytes(py: Python<'_>, data: &[u8]) -> PyResult<Self> {
        let inner = py
            .detach(|| catch_panic(|| ProductQuantizer::from_bytes(data)))
            .py()?;
        Ok(PQCodec { inner })
    }
}

fn to_2d<T: numpy::Element>(
    py: Python<'_>,
    v: Vec<T>,
    rows: usize,
    cols: usize,
) -> PyResult<Bound<'_, PyArray2<T>>> {
    let a = Array2::from_shape_vec((rows, cols), v)
        .map_err(|e| Error::Internal(e.to_string()))
        .py()?;
    Ok(a.into_pyarray(py))
}
