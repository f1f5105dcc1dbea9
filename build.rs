//! Compiles cuda/*.cu to PTX when the `cuda` feature is on, and embeds the PTX (OUT_DIR/ptx.rs).
//!
//! nvcc is looked up, in order: $CTXCORE_NVCC, $NVCC, $CUDA_HOME/bin/nvcc, the PyPI toolchain
//! (`nvidia-cuda-nvcc`, `nvidia-nvvm`, ... 13.0.x) in ./.cuda-toolchain (where .ci/run installs
//! it) or as `nvidia/cu13/bin/nvcc` of the Python that runs the build (e.g. pip's isolated build
//! environment with pyproject.toml's build requirements), then `nvcc` on PATH. Without nvcc the
//! build is CPU-only (a warning), unless CTXCORE_REQUIRE_CUDA=1 makes that an error.
//! The PTX targets compute capability 8.0 (`compute_80`), so the driver JIT-compiles it for
//! Ampere, Ada and Hopper GPUs; nvcc 13.0 keeps it loadable by CUDA 13.0 drivers.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rerun-if-changed=build.rs");
    for v in [
        "CTXCORE_NVCC",
        "NVCC",
        "CUDA_HOME",
        "PYO3_PYTHON",
        "PYTHON_SYS_EXECUTABLE",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let Some(nvcc) = find_nvcc(&root) else {
        let msg = "the `cuda` feature needs nvcc 13.0 to compile cuda/*.cu to PTX, and none was \
             found: install it with `pip install \"nvidia-cuda-nvcc==13.0.*\" \
             \"nvidia-nvvm==13.0.*\" \"nvidia-cuda-crt==13.0.*\" \"nvidia-cuda-runtime==13.0.*\" \
             \"nvidia-cuda-cccl==13.0.*\"` or set CTXCORE_NVCC=/path/to/nvcc";
        if env::var_os("CTXCORE_REQUIRE_CUDA").is_some_and(|v| v != "0") {
            panic!("{msg}");
        }
        // Platforms without the PyPI toolchain (macOS, ...): a CPU-only build whose CUDA entry
        // points raise DeviceError.
        println!("cargo:warning=ctxcore: {msg}; building without CUDA kernels");
        std::fs::write(
            out.join("ptx.rs"),
            "pub const PTX: &[(&str, &str)] = &[];\n",
        )
        .unwrap();
        return;
    };
    let version = Command::new(&nvcc).arg("--version").output();
    match version {
        Ok(v) if String::from_utf8_lossy(&v.stdout).contains("release 13.0") => {}
        Ok(v) => println!(
            "cargo:warning=ctxcore: {} is not nvcc 13.0 ({}); its PTX may not load on CUDA 13.0 drivers",
            nvcc.display(),
            String::from_utf8_lossy(&v.stdout).lines().last().unwrap_or("?")
        ),
        Err(e) => panic!("cannot run {}: {e}", nvcc.display()),
    }
    let mut sources: Vec<PathBuf> = std::fs::read_dir(root.join("cuda"))
        .expect("cuda/ directory")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    let mut table = String::from("pub const PTX: &[(&str, &str)] = &[\n");
    for src in &sources {
        let stem = src.file_stem().unwrap().to_str().unwrap().to_string();
        let ptx = out.join(format!("{stem}.ptx"));
        let status = Command::new(&nvcc)
            .args([
                "-ptx",
                "-arch=compute_80",
                "-O3",
                "-std=c++17",
                "-Werror",
                "all-warnings",
            ])
            .arg("-I")
            .arg(root.join("cuda"))
            .arg(src)
            .arg("-o")
            .arg(&ptx)
            .status()
            .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
        assert!(status.success(), "nvcc failed on {}", src.display());
        table += &format!(
            "    ({stem:?}, include_str!({:?})),\n",
            ptx.display().to_string()
        );
    }
    table += "];\n";
    std::fs::write(out.join("ptx.rs"), table).unwrap();
}

fn executable(p: PathBuf) -> Option<PathBuf> {
    p.is_file().then_some(p)
}

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    for v in ["CTXCORE_NVCC", "NVCC"] {
        if let Some(p) = env::var_os(v) {
            return Some(PathBuf::from(p));
        }
    }
    if let Some(p) =
        env::var_os("CUDA_HOME").and_then(|h| executable(PathBuf::from(h).join("bin/nvcc")))
    {
        return Some(p);
    }
    // The PyPI toolchain: in ./.cuda-toolchain (where .ci/run installs it), or nvidia/cu13/bin/nvcc
    // next to any `nvidia` package the build's Python sees.
    if let Some(p) = executable(root.join(".cuda-toolchain/nvidia/cu13/bin/nvcc")) {
        return Some(p);
    }
    let mut pythons: Vec<String> = ["PYO3_PYTHON", "PYTHON_SYS_EXECUTABLE"]
        .iter()
        .filter_map(|v| env::var(v).ok())
        .collect();
    pythons.extend(["python3".to_string(), "python".to_string()]);
    for py in pythons {
        let Ok(o) = Command::new(&py)
            .args([
                "-c",
                "import nvidia, sys; print('\\n'.join(nvidia.__path__))",
            ])
            .output()
        else {
            continue;
        };
        for dir in String::from_utf8_lossy(&o.stdout).lines() {
            if let Some(p) = executable(PathBuf::from(dir).join("cu13/bin/nvcc")) {
                return Some(p);
            }
        }
    }
    let o = Command::new("nvcc").arg("--version").output().ok()?;
    o.status.success().then(|| PathBuf::from("nvcc"))
}
