//! The crate's thread pool.
//!
//! torch and rayon each start a pool; on small machines they fight over cores. ctxcore runs its
//! parallel work in its own rayon pool whose size the caller sets with [`set_num_threads`]
//! (the Python package sizes it from `torch.get_num_threads()` or `CTXCORE_NUM_THREADS`).

use std::sync::{Arc, RwLock};

use crate::error::{Error, Result};

static POOL: RwLock<Option<Arc<rayon::ThreadPool>>> = RwLock::new(None);

fn default_threads() -> usize {
    if let Some(n) = std::env::var("CTXCORE_NUM_THREADS")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
    {
        if n > 0 {
            return n;
        }
    }
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn build(n: usize) -> Result<Arc<rayon::ThreadPool>> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("ctxcore-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| Error::Internal(format!("could not start {n} worker threads: {e}")))
}

fn pool() -> Result<Arc<rayon::ThreadPool>> {
    if let Some(p) = POOL
        .read()
        .map_err(|_| Error::Internal("thread pool lock poisoned".into()))?
        .as_ref()
    {
        return Ok(p.clone());
    }
    let mut guard = POOL
        .write()
        .map_err(|_| Error::Internal("thread pool lock poisoned".into()))?;
    if let Some(p) = guard.as_ref() {
        return Ok(p.clone());
    }
    let p = build(default_threads())?;
    *guard = Some(p.clone());
    Ok(p)
}

/// Set the number of worker threads used by all ctxcore kernels (must be ≥ 1).
pub fn set_num_threads(n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::config("num_threads must be at least 1"));
    }
    let p = build(n)?;
    *POOL
        .write()
        .map_err(|_| Error::Internal("thread pool lock poisoned".into()))? = Some(p);
    Ok(())
}

/// Number of worker threads ctxcore kernels use.
pub fn num_threads() -> usize {
    pool().map(|p| p.current_num_threads()).unwrap_or(1)
}

/// Run `f` inside the ctxcore pool (rayon parallel iterators inside `f` use it).
pub fn install<T: Send>(f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let p = pool()?;
    p.install(f)
}
