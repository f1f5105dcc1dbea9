//! ctxcore: long-context KV cache compression for PyTorch language models.
//!
//! The Rust core holds the product-quantization codec ([`pq`]), and (in later milestones)
//! token chunking, paged KV storage with disk offload, and attention over compressed pages.
//! It never depends on Python: the PyO3 bindings live in `py/`, compiled only with the
//! `python` feature.

#![deny(missing_docs)]

pub mod attention;
pub mod chunk;
pub mod cuda;
pub mod error;
pub mod parallel;
pub mod pq;
pub mod rng;
#[doc(hidden)]
pub mod simd;
pub mod store;

#[cfg(feature = "python")]
mod py;

pub use error::{Error, Result};
pub use pq::{Metric, ProductQuantizer};
