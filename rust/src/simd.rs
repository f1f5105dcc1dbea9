//! Runtime CPU-feature dispatch for hot loops.
//!
//! Hot kernels are written once as plain Rust loops over fixed-width lane arrays that LLVM
//! auto-vectorizes, marked `#[inline(always)]`, and instantiated twice by [`dispatch!`]: once
//! inside a `#[target_feature(enable = "avx2,fma")]` wrapper chosen at run time when the CPU has
//! AVX2+FMA, once for the baseline target. One source, no `unsafe` arithmetic, and the wheel
//! stays portable to any x86-64 (or aarch64, where the baseline already has NEON).

/// Whether the AVX2+FMA fast paths run: the CPU supports them and the environment variable
/// `CTXCORE_PORTABLE` is not set to `1` (read once; it lets tests exercise the portable paths
/// that CPUs without AVX2 take).
#[inline]
pub fn has_avx2_fma() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| {
        if std::env::var("CTXCORE_PORTABLE").is_ok_and(|v| v.trim() == "1") {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// `dispatch!(fn_name(args...))` calls `fn_name` compiled for AVX2+FMA when available.
///
/// Expands to a call of a local `#[target_feature]` wrapper around the `#[inline(always)]`
/// generic function, or of the generic function itself.
#[macro_export]
macro_rules! dispatch {
    ($f:ident $(::<$($gen:tt),+>)? ( $($arg:expr),* $(,)? )) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if $crate::simd::has_avx2_fma() {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn wide<F: FnOnce() -> R, R>(f: F) -> R { f() }
                // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                unsafe { wide(#[inline(always)] || $f $(::<$($gen),+>)? ($($arg),*)) }
            } else {
                $f $(::<$($gen),+>)? ($($arg),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $f $(::<$($gen),+>)? ($($arg),*)
        }
    }};
}
