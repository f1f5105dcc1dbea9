//! The one mapping from [`crate::Error`] to the classes of `ctxcore.exceptions`.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyType;

use crate::error::Error;

/// Name of the `ctxcore.exceptions` class raised for each error variant.
fn class_name(e: &Error) -> &'static str {
    match e {
        Error::Config(_) => "ConfigError",
        Error::NotTrained { .. } => "NotTrainedError",
        Error::Shape { .. } => "ShapeError",
        Error::DType { .. } => "DTypeError",
        Error::NonFinite { .. } => "NonFiniteError",
        Error::InsufficientData { .. } => "InsufficientDataError",
        Error::Corrupt { .. } => "CorruptDataError",
        Error::Version { .. } => "FormatVersionError",
        Error::Io { .. } => "CtxcoreIOError",
        Error::Budget(_) => "RamBudgetError",
        Error::Mismatch { .. } => "ContextMismatchError",
        Error::Device(_) => "DeviceError",
        Error::Internal(_) => "InternalError",
    }
}

/// Convert a core error into the matching Python exception.
pub fn to_pyerr(e: Error) -> PyErr {
    Python::attach(|py| {
        let cls = py
            .import("ctxcore.exceptions")
            .and_then(|m| m.getattr(class_name(&e)))
            .and_then(|c| c.cast_into::<PyType>().map_err(PyErr::from));
        match cls {
            Ok(cls) => PyErr::from_type(cls, e.to_string()),
            Err(_) => PyRuntimeError::new_err(e.to_string()),
        }
    })
}

/// Extension to turn `crate::Result` into `PyResult`.
pub trait IntoPy<T> {
    /// Map the error with [`to_pyerr`].
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for crate::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_pyerr)
    }
}
