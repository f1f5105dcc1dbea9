//! Bindings of [`crate::chunk`]: `_ctxcore.chunk_tokens` and `_ctxcore.TokenChunk`.
//!
//! Token ids arrive as a C-contiguous uint32 ``[T]`` array; the Python wrapper
//! (`ctxcore.chunk_tokens`) converts lists, numpy arrays and torch tensors and range-checks
//! the ids first with friendly messages.

use numpy::{PyReadonlyArray1, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::error::IntoPy;
use crate::chunk::{self, Chunk};
use crate::error::{catch_panic, Error};

/// A chunk of a token sequence: tokens ``start:end`` and the chained hash of tokens ``0:end``
/// (see `ctxcore.chunking` for the documented API and hash format).
#[pyclass(frozen, eq, hash, module = "ctxcore._ctxcore")]
#[derive(PartialEq, Eq, Hash)]
pub struct TokenChunk {
    inner: Chunk,
}

#[pymethods]
impl TokenChunk {
    /// Rebuild a chunk from saved fields (``start <= end``, ``hash`` 64 hex digits).
    #[new]
    fn new(start: usize, end: usize, hash: &str) -> PyResult<Self> {
        if end < start {
            return Err(Error::config(format!(
                "TokenChunk needs start <= end, got start={start}, end={end}"
            )))
            .py();
        }
        Ok(TokenChunk {
            inner: Chunk {
                start,
                end,
                hash: chunk::from_hex(hash).py()?,
            },
        })
    }

    /// ``(start, end, hash)``: lets pickle and copy rebuild the chunk through ``__new__``.
    fn __getnewargs__(&self) -> (usize, usize, String) {
        (self.inner.start, self.inner.end, self.inner.hash_hex())
    }

    /// Index of the first token of the chunk.
    #[getter]
    fn start(&self) -> usize {
        self.inner.start
    }

    /// One past the index of the last token of the chunk.
    #[getter]
    fn end(&self) -> usize {
        self.inner.end
    }

    /// Chained BLAKE3 hash of tokens ``0:end``, 64 lowercase hex digits.
    #[getter]
    fn hash(&self) -> String {
        self.inner.hash_hex()
    }

    /// Whether the chunk holds exactly ``chunk_size`` tokens (only the last one may not).
    fn is_full(&self, chunk_size: usize) -> bool {
        self.inner.is_full(chunk_size)
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "TokenChunk(start={}, end={}, hash='{}')",
            self.inner.start,
            self.inner.end,
            self.inner.hash_hex()
        )
    }
}

/// Chunks of ``chunk_size`` tokens of uint32 ``tokens [T]`` with hashes chained from
/// ``namespace`` (see ``ctxcore.chunk_tokens``).
#[pyfunction]
pub fn chunk_tokens(
    py: Python<'_>,
    tokens: PyReadonlyArray1<'_, u32>,
    chunk_size: usize,
    namespace: &str,
) -> PyResult<Vec<TokenChunk>> {
    let toks = tokens
        .as_slice()
        .map_err(|_| {
            Error::shape(
                "token_ids",
                "a C-contiguous array",
                format!(
                    "a non-contiguous view of shape {:?} (use np.ascontiguousarray)",
                    tokens.shape()
                ),
            )
        })
        .py()?;
    let chunks = py
        .detach(|| catch_panic(|| chunk::chunk_tokens(toks, chunk_size, namespace)))
        .py()?;
    Ok(chunks
        .into_iter()
        .map(|inner| TokenChunk { inner })
        .collect())
}
