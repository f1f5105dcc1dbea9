//! The CPU emulation of the CUDA kernels (`cuda/emu/`), loaded from a shared library.
//!
//! Testing only: with `CTXCORE_CUDA_EMULATOR=/path/to/libctxemu.so` in the environment,
//! [`super::run`] sends launches to the emulation instead of the driver and
//! [`super::device_limits`] reports an H100, so the whole CUDA path of the torch ops (Python
//! glue, launch planning, kernels) runs on host memory: call the ops' CUDA implementations
//! with CPU tensors. Build the library with
//! `g++ -std=c++20 -O2 -ffp-contract=off -shared -fPIC -pthread cuda/emu/emu.cpp -o libctxemu.so`
//! ([`build`] does that).

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CString};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use super::{Launch, Launcher};
use crate::error::{Error, Result};

/// The environment variable naming the emulation library.
pub const ENV: &str = "CTXCORE_CUDA_EMULATOR";

type LaunchFn = unsafe extern "C" fn(
    *const c_char,
    *const c_uint,
    *const c_uint,
    c_uint,
    *const c_void,
) -> c_int;

/// A loaded emulation library (never unloaded).
#[derive(Clone, Copy)]
pub struct Emulator {
    launch: LaunchFn,
    handle: usize,
}

impl Emulator {
    /// Load the library at `path`.
    pub fn open(path: &Path) -> Result<Emulator> {
        static OPEN: OnceLock<Mutex<HashMap<PathBuf, Emulator>>> = OnceLock::new();
        let mut open = OPEN
            .get_or_init(Default::default)
            .lock()
            .map_err(|_| Error::Internal("emulator table poisoned".into()))?;
        if let Some(e) = open.get(path) {
            return Ok(*e);
        }
        let c = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| Error::config(format!("{ENV}: path has a NUL byte")))?;
        // SAFETY: dlopen of a library the caller built from cuda/emu/emu.cpp.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW) };
        if h.is_null() {
            return Err(Error::Device(format!(
                "{ENV}={}: cannot load the CUDA emulation library",
                path.display()
            )));
        }
        let e = Emulator {
            // SAFETY: `ctx_emu_launch` has the LaunchFn signature (cuda/emu/emu.cpp).
            launch: unsafe {
                std::mem::transmute::<*mut c_void, LaunchFn>(sym(h, "ctx_emu_launch")?)
            },
            handle: h as usize,
        };
        open.insert(path.to_path_buf(), e);
        Ok(e)
    }

    /// The library named by `CTXCORE_CUDA_EMULATOR`, if set.
    pub fn from_env() -> Result<Option<Emulator>> {
        match std::env::var_os(ENV) {
            Some(p) if !p.is_empty() => Emulator::open(Path::new(&p)).map(Some),
            _ => Ok(None),
        }
    }

    /// Address of symbol `name` in the library.
    pub fn symbol(&self, name: &str) -> Result<*mut c_void> {
        sym(self.handle as *mut c_void, name)
    }
}

fn sym(h: *mut c_void, name: &str) -> Result<*mut c_void> {
    let c = CString::new(name).map_err(|_| Error::Internal("symbol name".into()))?;
    // SAFETY: `h` is a live dlopen handle.
    let s = unsafe { libc::dlsym(h, c.as_ptr()) };
    if s.is_null() {
        return Err(Error::Device(format!(
            "{name} missing from the CUDA emulation library"
        )));
    }
    Ok(s)
}

impl Launcher for Emulator {
    fn launch(&self, l: &Launch) -> Result<()> {
        let name =
            CString::new(l.kernel.as_str()).map_err(|_| Error::Internal("kernel name".into()))?;
        // SAFETY: the launch's parameter block holds host addresses of live buffers sized for
        // the launch (the emulation's "device" memory is host memory).
        let rc = unsafe {
            (self.launch)(
                name.as_ptr(),
                l.grid.as_ptr(),
                l.block.as_ptr(),
                l.smem,
                l.params.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(Error::Internal(format!("unknown kernel {}", l.kernel)));
        }
        Ok(())
    }
}

/// Compile `cuda/emu/emu.cpp` under `root` into `out` with `$CXX` (default `g++`).
pub fn build(root: &Path, out: &Path) -> Result<()> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let o = std::process::Command::new(&cxx)
        .args([
            "-std=c++20",
            "-O2",
            "-ffp-contract=off",
            "-shared",
            "-fPIC",
            "-pthread",
        ])
        .arg(root.join("cuda/emu/emu.cpp"))
        .arg("-o")
        .arg(out)
        .output()
        .map_err(|e| Error::Device(format!("running {cxx} for the CUDA emulation: {e}")))?;
    if !o.status.success() {
        return Err(Error::Device(format!(
            "compiling cuda/emu/emu.cpp failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        )));
    }
    Ok(())
}
