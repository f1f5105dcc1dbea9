//! The crate's thread pool.
//!
//! torch and rayon each start a pool; on small machines they fight over cores. ctxcore runs its
//! parallel work in its own rayon pool whose size the caller sets with [`set_num_threads`]
//! (the Python package sizes it from `torch.get_num_threads()` or `CTXCORE_NUM_THREADS`).
//!
//! The decode-attention kernels, which run between torch ops on every step, use [`map`]: when
//! the process has loaded GNU OpenMP (torch's CPU backend on Linux), it runs on the OpenMP team
//! of the calling thread, the same threads torch's ops just used. After a parallel region those
//! threads spin for a few milliseconds waiting for more work; a separate pool's threads would
//! share the cores with the spinning ones (measured: a 4 ms attention call right after an SDPA
//! call took up to 2x longer on 2 cores). `CTXCORE_PARALLEL=rayon` turns this off.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

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

/// `GOMP_parallel(fn, data, num_threads, flags)`: the entry point of GNU OpenMP's
/// `#pragma omp parallel` (every thread of the team, the caller included, runs `fn(data)`).
type GompParallel = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, u32, u32);

/// GNU OpenMP's `GOMP_parallel`, if the process has loaded it (and `CTXCORE_PARALLEL` is not
/// `rayon`).
fn gomp_parallel() -> Option<GompParallel> {
    static GOMP: OnceLock<Option<usize>> = OnceLock::new();
    let addr = *GOMP.get_or_init(|| {
        if std::env::var("CTXCORE_PARALLEL").is_ok_and(|v| v.trim().eq_ignore_ascii_case("rayon")) {
            return None;
        }
        // SAFETY: dlsym with a NUL-terminated name; a null result means "not loaded".
        let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"GOMP_parallel".as_ptr()) };
        (!p.is_null()).then_some(p as usize)
    });
    // SAFETY: the symbol is GNU OpenMP's GOMP_parallel, whose C signature GompParallel matches.
    addr.map(|a| unsafe { std::mem::transmute::<usize, GompParallel>(a) })
}

/// Work shared by the threads of one [`map`] call on the OpenMP team.
/// `omp_get_max_threads()` of the loaded GNU OpenMP (the team size torch asked for), or
/// `usize::MAX` when it cannot be found.
fn omp_max_threads() -> usize {
    type MaxThreads = unsafe extern "C" fn() -> i32;
    static SYM: OnceLock<Option<usize>> = OnceLock::new();
    let addr = *SYM.get_or_init(|| {
        // SAFETY: dlsym with a NUL-terminated name; a null result means "not loaded".
        let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"omp_get_max_threads".as_ptr()) };
        (!p.is_null()).then_some(p as usize)
    });
    match addr {
        // SAFETY: the symbol is libgomp's `int omp_get_max_threads(void)`; it is per calling
        // thread and cheap.
        Some(a) => {
            let f = unsafe { std::mem::transmute::<usize, MaxThreads>(a) };
            (unsafe { f() }).max(1) as usize
        }
        None => usize::MAX,
    }
}

struct Shared<'a, T, F> {
    f: &'a F,
    next: AtomicUsize,
    out: Vec<OnceLock<T>>,
    panicked: AtomicBool,
}

/// What each OpenMP thread runs: take item indices until none are left.
extern "C" fn omp_worker<T: Send, F: Fn(usize) -> T + Sync>(data: *mut c_void) {
    // SAFETY: data points to the Shared that map() keeps alive until GOMP_parallel returns.
    let sh = unsafe { &*(data as *const Shared<T, F>) };
    loop {
        let i = sh.next.fetch_add(1, Ordering::Relaxed);
        if i >= sh.out.len() {
            return;
        }
        // A panic must not unwind into C: record it and stop taking items.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (sh.f)(i))) {
            Ok(v) => {
                let _ = sh.out[i].set(v);
            }
            Err(_) => {
                sh.panicked.store(true, Ordering::Relaxed);
                sh.next.store(sh.out.len(), Ordering::Relaxed);
                return;
            }
        }
    }
}

/// `[f(0), f(1), .., f(n - 1)]` computed in parallel: on the calling thread's OpenMP team when
/// GNU OpenMP is loaded (see the module docs), else in the ctxcore rayon pool. Items are handed
/// out one at a time (dynamic scheduling), so uneven items balance.
pub fn map<T: Send, F: Fn(usize) -> T + Sync + Send>(n: usize, f: F) -> Result<Vec<T>> {
    if let Some(gomp) = gomp_parallel() {
        let sh = Shared {
            f: &f,
            next: AtomicUsize::new(0),
            out: (0..n).map(|_| OnceLock::new()).collect(),
            panicked: AtomicBool::new(false),
        };
        // Never more threads than the OpenMP team torch runs with (its set_num_threads): a team
        // larger than that starts or wakes sleeping threads on every call (measured 1.3 ms per
        // decode-sized call with torch at 1 thread and ctxcore at 2, against 0.34 ms at 1).
        let threads = num_threads().min(omp_max_threads()).clamp(1, n.max(1)) as u32;
        // SAFETY: omp_worker::<T, F> matches the callback ABI and only reads `sh`, which
        // outlives the call (GOMP_parallel returns after every thread of the team is done).
        unsafe {
            gomp(
                omp_worker::<T, F>,
                &sh as *const Shared<T, F> as *mut c_void,
                threads,
                0,
            )
        };
        if sh.panicked.load(Ordering::Relaxed) {
            return Err(Error::Internal("a ctxcore worker panicked".into()));
        }
        return sh
            .out
            .into_iter()
            .map(|c| {
                c.into_inner()
                    .ok_or_else(|| Error::Internal("a work item was not run".into()))
            })
            .collect();
    }
    use rayon::prelude::*;
    install(|| Ok((0..n).into_par_iter().map(&f).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_returns_every_item_in_order() {
        for n in [0usize, 1, 2, 7, 1000] {
            let v = map(n, |i| i * i).unwrap();
            assert_eq!(v, (0..n).map(|i| i * i).collect::<Vec<_>>());
        }
    }
}
