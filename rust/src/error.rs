//! The one error type of the crate.
//!
//! Every fallible operation in ctxcore returns [`Result`]. The Python bindings map each
//! variant to one class of `ctxcore.exceptions` in a single place (`py/error.rs`), so the
//! variant names below are part of the Python contract:
//!
//! | variant            | Python exception                                  |
//! |--------------------|---------------------------------------------------|
//! | `Config`           | `ConfigError` (also a `ValueError`)               |
//! | `NotTrained`       | `NotTrainedError`                                 |
//! | `Shape`            | `ShapeError` (also a `ValueError`)                |
//! | `DType`            | `DTypeError` (also a `TypeError`)                 |
//! | `NonFinite`        | `NonFiniteError` (also a `ValueError`)            |
//! | `InsufficientData` | `InsufficientDataError` (also a `ValueError`)     |
//! | `Corrupt`          | `CorruptDataError` (also a `ValueError`)          |
//! | `Version`          | `FormatVersionError` (a `CorruptDataError`)       |
//! | `Io`               | `CtxcoreIOError` (also an `OSError`)              |
//! | `Budget`           | `RamBudgetError` (also a `MemoryError`)           |
//! | `Mismatch`         | `ContextMismatchError` (also a `ValueError`)      |
//! | `Device`           | `DeviceError` (also a `ValueError`)               |
//! | `Internal`         | `InternalError` (a bug: please report it)         |

use std::fmt;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in ctxcore. Messages say what was wrong and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An invalid construction parameter (e.g. `dim % m != 0`, unsupported `nbits`).
    #[error("{0}")]
    Config(String),

    /// An operation that needs trained codebooks was called before `train`.
    #[error("{what} needs trained codebooks: call train(x) first (or load a trained quantizer with from_bytes)")]
    NotTrained {
        /// The operation that was attempted.
        what: &'static str,
    },

    /// An array had the wrong rank or extent.
    #[error("{what}: expected shape {expected}, got {got}")]
    Shape {
        /// Which argument.
        what: String,
        /// The expected shape, e.g. `[n, 64]`.
        expected: String,
        /// The shape that was passed.
        got: String,
    },

    /// An array had the wrong element type.
    #[error("{what}: expected dtype {expected}, got {got}")]
    DType {
        /// Which argument.
        what: String,
        /// Expected dtype.
        expected: String,
        /// Dtype that was passed.
        got: String,
    },

    /// NaN or infinity in an input that must be finite.
    #[error("{what} contains a non-finite value ({value}) at row {row}, column {col}; remove or replace NaN/Inf before calling")]
    NonFinite {
        /// Which argument.
        what: String,
        /// Row of the first bad element.
        row: usize,
        /// Column of the first bad element.
        col: usize,
        /// The value found.
        value: f32,
    },

    /// Too few vectors to train the requested codebooks.
    #[error("{what}: got {got} training vectors but at least {needed} are needed ({reason})")]
    InsufficientData {
        /// Which operation.
        what: &'static str,
        /// Vectors provided.
        got: usize,
        /// Vectors needed.
        needed: usize,
        /// Why that many are needed.
        reason: String,
    },

    /// Serialized data failed validation (bad magic, truncated, checksum mismatch, ...).
    #[error("corrupt {what}: {detail}")]
    Corrupt {
        /// What was being read (e.g. "ProductQuantizer bytes").
        what: String,
        /// What exactly failed.
        detail: String,
    },

    /// Serialized data of a format version this build cannot read.
    #[error("{what} has format version {found}, this build reads version {supported}; re-create it with this version of ctxcore")]
    Version {
        /// What was being read.
        what: String,
        /// Version found in the data.
        found: u32,
        /// Version this build supports.
        supported: u32,
    },

    /// An I/O error, with the path or object involved.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, including the path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A RAM budget that cannot hold what must stay in RAM.
    #[error("{0}")]
    Budget(String),

    /// A saved context that does not match the model or configuration it is loaded for.
    #[error("{what} mismatch: the saved context has {saved}, but the current one has {current}")]
    Mismatch {
        /// What differs (e.g. "model", "head_dim").
        what: String,
        /// The saved side.
        saved: String,
        /// The current side.
        current: String,
    },

    /// A GPU operation that this build or machine cannot run (no CUDA support compiled in, no
    /// driver, too old a GPU) or a CUDA driver error; the message says which and what to do.
    #[error("{0}")]
    Device(String),

    /// A bug in ctxcore (a caught panic or a violated internal invariant).
    #[error("internal error in ctxcore (this is a bug, please report it): {0}")]
    Internal(String),
}

impl Error {
    /// Shorthand for [`Error::Config`].
    pub fn config(msg: impl fmt::Display) -> Self {
        Error::Config(msg.to_string())
    }

    /// Shorthand for [`Error::Shape`].
    pub fn shape(
        what: impl Into<String>,
        expected: impl Into<String>,
        got: impl Into<String>,
    ) -> Self {
        Error::Shape {
            what: what.into(),
            expected: expected.into(),
            got: got.into(),
        }
    }

    /// Shorthand for [`Error::Corrupt`].
    pub fn corrupt(what: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Corrupt {
            what: what.into(),
            detail: detail.into(),
        }
    }
}

/// Run `f`, turning a panic into [`Error::Internal`] so no panic unwinds past an API boundary.
pub fn catch_panic<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = if let Some(s) = payload.downcast_ref::<&str>() {
                (*s).to_string()
            } else if let Some(s) = payload.downcast_ref::<String>() {
                s.clone()
            } else {
                "unknown panic".to_string()
            };
            Err(Error::Internal(msg))
        }
    }
}
