//! The CUDA driver side (feature `cuda`): loads the PTX embedded at build time through the
//! dynamically loaded driver library (cudarc with `dynamic-loading`: no link-time dependency on
//! CUDA), and runs planned [`Launch`]es on a caller-given stream (torch's current stream).
//!
//! Nothing here panics into the caller: a missing `libcuda`, a GPU older than compute
//! capability 8.0, or a driver error becomes [`Error::Device`] with what to do about it.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result, sys};

use super::{DeviceLimits, Launch, Launcher, DEFAULT_SMEM};
use crate::error::{catch_panic, Error, Result};

mod ptx {
    // `pub const PTX: &[(&str, &str)]`: (file stem, PTX text) for every cuda/*.cu.
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

/// The PTX modules compiled into this build: (file stem, PTX text).
pub fn ptx_modules() -> &'static [(&'static str, &'static str)] {
    ptx::PTX
}

fn driver_error(what: &str, e: result::DriverError) -> Error {
    let detail = e
        .error_string()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{e:?}"));
    Error::Device(format!("CUDA driver error in {what}: {detail} ({e:?})"))
}

/// Whether the CUDA driver library can be loaded and initialized (checked once).
fn driver() -> Result<()> {
    static STATE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    STATE
        .get_or_init(|| {
            let names = cudarc::get_lib_name_candidates("cuda");
            // SAFETY: loading the system's CUDA driver library, which has no initializers with
            // preconditions; cudarc loads the same library afterwards.
            let found = names
                .iter()
                .any(|n| unsafe { libloading::Library::new(n) }.is_ok());
            if !found {
                return Err(
                    "no CUDA driver found (libcuda.so.1 could not be loaded): install the NVIDIA \
                     driver, or keep the tensors on the CPU"
                        .to_string(),
                );
            }
            catch_panic(|| result::init().map_err(|e| driver_error("cuInit", e)))
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(Error::Device)
}

/// One GPU: its primary context (the one torch uses), the loaded modules and a cache of
/// kernel handles.
pub struct Device {
    ctx: sys::CUcontext,
    modules: Vec<sys::CUmodule>,
    functions: Mutex<HashMap<String, (usize, u32)>>,
    /// Launch-planning limits of this GPU.
    pub limits: DeviceLimits,
    /// Marketing name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Compute capability (major, minor).
    pub capability: (i32, i32),
}

// SAFETY: driver handles (contexts, modules, functions) may be used from any thread; the
// function cache is behind a mutex.
unsafe impl Send for Device {}
unsafe impl Sync for Device {}

/// The device with CUDA ordinal `ordinal` (as torch numbers them), loaded once per process.
pub fn device(ordinal: i32) -> Result<Arc<Device>> {
    static DEVICES: OnceLock<Mutex<HashMap<i32, Arc<Device>>>> = OnceLock::new();
    if ptx::PTX.is_empty() {
        return Err(super::no_cuda());
    }
    driver()?;
    let mut map = DEVICES
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| Error::Internal("CUDA device table poisoned".into()))?;
    if let Some(d) = map.get(&ordinal) {
        return Ok(d.clone());
    }
    let d = Arc::new(catch_panic(|| load(ordinal))?);
    map.insert(ordinal, d.clone());
    Ok(d)
}

fn load(ordinal: i32) -> Result<Device> {
    let count = result::device::get_count().map_err(|e| driver_error("cuDeviceGetCount", e))?;
    if ordinal < 0 || ordinal >= count {
        return Err(Error::Device(format!(
            "CUDA device {ordinal} does not exist ({count} visible)"
        )));
    }
    let dev = result::device::get(ordinal).map_err(|e| driver_error("cuDeviceGet", e))?;
    use sys::CUdevice_attribute_enum as A;
    // SAFETY: `dev` comes from cuDeviceGet; the primary context is retained for the life of the
    // process (as torch does) and made current before module loading.
    unsafe {
        let attr = |a| {
            result::device::get_attribute(dev, a)
                .map_err(|e| driver_error("cuDeviceGetAttribute", e))
        };
        let capability = (
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        let name = result::device::get_name(dev).unwrap_or_default();
        if capability.0 < 8 {
            return Err(Error::Device(format!(
                "{name} has compute capability {}.{}; ctxcore's CUDA kernels need 8.0 or newer \
                 (Ampere, Ada, Hopper): keep the tensors on the CPU",
                capability.0, capability.1
            )));
        }
        let limits = DeviceLimits {
            sm_count: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32,
            max_smem: attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as u32,
        };
        let ctx = result::primary_ctx::retain(dev)
            .map_err(|e| driver_error("cuDevicePrimaryCtxRetain", e))?;
        result::ctx::set_current(ctx).map_err(|e| driver_error("cuCtxSetCurrent", e))?;
        let mut modules = Vec::new();
        for (stem, text) in ptx::PTX {
            let image = CString::new(*text)
                .map_err(|_| Error::Internal(format!("{stem}.ptx has a NUL byte")))?;
            let m = result::module::load_data(image.as_ptr().cast())
                .map_err(|e| driver_error(&format!("loading {stem}.ptx (cuModuleLoadData)"), e))?;
            modules.push(m);
        }
        Ok(Device {
            ctx,
            modules,
            functions: Mutex::new(HashMap::new()),
            limits,
            name,
            capability,
        })
    }
}

impl Device {
    /// Kernel handle by name, with at least `smem` bytes of dynamic shared memory allowed.
    fn function(&self, name: &str, smem: u32) -> Result<sys::CUfunction> {
        let mut cache = self
            .functions
            .lock()
            .map_err(|_| Error::Internal("CUDA function cache poisoned".into()))?;
        let entry = match cache.get(name) {
            Some(&e) => e,
            None => {
                let mut found = None;
                for &m in &self.modules {
                    let c =
                        CString::new(name).map_err(|_| Error::Internal("kernel name".into()))?;
                    // SAFETY: `m` is a loaded module of this context.
                    if let Ok(f) = unsafe { result::module::get_function(m, c) } {
                        found = Some(f);
                        break;
                    }
                }
                let f = found.ok_or_else(|| {
                    Error::Internal(format!("kernel {name} is not in the embedded PTX"))
                })?;
                (f as usize, DEFAULT_SMEM)
            }
        };
        let f = entry.0 as sys::CUfunction;
        let mut allowed = entry.1;
        if smem > allowed {
            // SAFETY: `f` is a valid kernel handle.
            unsafe {
                result::function::set_function_attribute(
                    f,
                    sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
            }
            .map_err(|e| {
                driver_error(&format!("allowing {smem} B of shared memory for {name}"), e)
            })?;
            allowed = smem;
        }
        cache.insert(name.to_string(), (f as usize, allowed));
        Ok(f)
    }
}

/// Launches on one stream of one device.
pub struct StreamLauncher {
    device: Arc<Device>,
    stream: sys::CUstream,
}

impl StreamLauncher {
    /// Launch on `stream` (a `CUstream`/`cudaStream_t` address, e.g. torch's
    /// `torch.cuda.current_stream().cuda_stream`; 0 = the legacy default stream).
    pub fn new(device: Arc<Device>, stream: u64) -> Self {
        StreamLauncher {
            device,
            stream: stream as usize as sys::CUstream,
        }
    }
}

impl Launcher for StreamLauncher {
    fn launch(&self, l: &Launch) -> Result<()> {
        catch_panic(|| {
            // SAFETY: the context is the device's retained primary context.
            unsafe { result::ctx::set_current(self.device.ctx) }
                .map_err(|e| driver_error("cuCtxSetCurrent", e))?;
            let f = self.device.function(&l.kernel, l.smem)?;
            let mut params = [l.params.as_ptr() as *mut c_void];
            // SAFETY: the parameter block matches the kernel's single by-value struct parameter
            // (checked against the C layout in the tests); its pointers are device addresses
            // of live tensors that the caller keeps alive until the stream has run the kernel.
            unsafe {
                result::launch_kernel(
                    f,
                    (l.grid[0], l.grid[1], l.grid[2]),
                    (l.block[0], l.block[1], l.block[2]),
                    l.smem,
                    self.stream,
                    &mut params,
                )
            }
            .map_err(|e| driver_error(&format!("launching {}", l.kernel), e))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_ptx_has_every_planned_kernel() {
        let all: String = ptx_modules().iter().map(|(_, t)| *t).collect();
        for dt in ["f32", "f16", "bf16"] {
            for k in [
                "pq_attn_split",
                "pq_attn_combine",
                "page_scores",
                "pq_encode",
            ] {
                assert!(
                    all.contains(&format!(".entry {k}_{dt}(")),
                    "{k}_{dt} missing"
                );
            }
        }
        assert!(all.contains(".entry page_gather("));
        for (stem, text) in ptx_modules() {
            assert!(
                text.contains(".target sm_80"),
                "{stem}: PTX for compute_80 expected"
            );
        }
    }

    #[test]
    fn no_gpu_is_a_device_error_not_a_panic() {
        match super::super::device_limits(0) {
            Ok(l) => assert!(l.sm_count > 0 && l.max_smem >= DEFAULT_SMEM),
            Err(Error::Device(msg)) => assert!(!msg.is_empty()),
            Err(e) => panic!("expected a DeviceError, got {e}"),
        }
        match super::super::run(1 << 20, 0, &[]) {
            Ok(()) => {}
            Err(Error::Device(_)) => {}
            Err(e) => panic!("expected a DeviceError, got {e}"),
        }
    }
}
