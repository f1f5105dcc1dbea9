//! Runtime CPU-feature dispatch for hot loops.
//!
//! Hot kernels are written once as plain Rust loops over fixed-width lane arrays that LLVM
//! auto-vectorizes, marked `#[inline(always)]`, and instantiated twice by [`dispatch!`]: once
//! inside a `#[target_feature]` wrapper chosen at run time (AVX-512 F/BW, or AVX2+FMA), once for
//! the baseline target. One source, no `unsafe` arithmetic, and the wheel
//! stays portable to any x86-64 (or aarch64, where the baseline already has NEON).

/// Widest SIMD level the kernels use on this machine (read once).
///
/// `CTXCORE_PORTABLE=1` forces the portable loops (what CPUs without AVX2/FMA run) and
/// `CTXCORE_SIMD=avx2` caps the level at AVX2/FMA (what CPUs without AVX-512 run), so tests can
/// exercise every path on one machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Portable,
    Avx2,
    Avx512,
}

/// The [`Level`] the kernels use.
pub fn level() -> Level {
    static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        if std::env::var("CTXCORE_PORTABLE").is_ok_and(|v| v.trim() == "1") {
            return Level::Portable;
        }
        let cap = match std::env::var("CTXCORE_SIMD") {
            Ok(v) if v.trim().eq_ignore_ascii_case("portable") => Level::Portable,
            Ok(v) if v.trim().eq_ignore_ascii_case("avx2") => Level::Avx2,
            _ => Level::Avx512,
        };
        #[cfg(target_arch = "x86_64")]
        let found = {
            use std::arch::is_x86_feature_detected as has;
            if !(has!("avx2") && has!("fma")) {
                Level::Portable
            } else if has!("avx512f") && has!("avx512bw") && has!("avx512vbmi") {
                Level::Avx512
            } else {
                Level::Avx2
            }
        };
        #[cfg(not(target_arch = "x86_64"))]
        let found = Level::Portable;
        found.min(cap)
    })
}

/// Whether the AVX2+FMA fast paths run.
#[inline]
pub fn has_avx2_fma() -> bool {
    level() >= Level::Avx2
}

/// Whether the AVX-512 paths run (AVX-512 F, BW and VBMI, on top of AVX2+FMA).
#[inline]
pub fn has_avx512() -> bool {
    level() >= Level::Avx512
}

/// `dispatch!(fn_name(args...))` calls `fn_name` compiled for AVX-512 (F, BW) or AVX2+FMA when
/// available. The loops have no reassociated float reductions, so every width gives the same
/// results; the wider one runs the lane arrays (16 floats) in one register.
///
/// Expands to a call of a local `#[target_feature]` wrapper around the `#[inline(always)]`
/// generic function, or of the generic function itself.
#[macro_export]
macro_rules! dispatch {
    ($f:ident $(::<$($gen:tt),+>)? ( $($arg:expr),* $(,)? )) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if $crate::simd::has_avx512() {
                #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn wide512<F: FnOnce() -> R, R>(f: F) -> R { f() }
                // SAFETY: the CPU supports AVX-512 F/BW, AVX2 and FMA (checked just above).
                unsafe { wide512(#[inline(always)] || $f $(::<$($gen),+>)? ($($arg),*)) }
            } else if $crate::simd::has_avx2_fma() {
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

/// Convert float16 values to float32 (`dst.len() == src.len()`): eight at a time with F16C's
/// `vcvtph2ps` where the CPU has it (every AVX2 CPU the fast paths run on), else `half`'s
/// conversion. Exact either way (every float16 is a float32).
pub fn f16_to_f32(src: &[half::f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "f16_to_f32: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if has_f16c() {
        // SAFETY: the CPU supports F16C and AVX (checked just above); the lengths are equal.
        unsafe { f16_to_f32_f16c(src, dst) };
        return;
    }
    use half::slice::HalfFloatSliceExt;
    src.convert_to_f32_slice(dst);
}

/// Whether the CPU has F16C (and AVX), read once; off under `CTXCORE_PORTABLE=1`.
#[cfg(target_arch = "x86_64")]
fn has_f16c() -> bool {
    static F16C: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *F16C.get_or_init(|| {
        level() >= Level::Avx2
            && std::arch::is_x86_feature_detected!("f16c")
            && std::arch::is_x86_feature_detected!("avx")
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f16_to_f32_f16c(src: &[half::f16], dst: &mut [f32]) {
    use std::arch::x86_64::{__m128i, _mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};
    let n8 = src.len() / 8 * 8;
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let mut i = 0;
    while i < n8 {
        // SAFETY: i + 8 <= len for both slices; unaligned loads and stores.
        unsafe {
            let h = _mm_loadu_si128(s.add(i) as *const __m128i);
            _mm256_storeu_ps(d.add(i), _mm256_cvtph_ps(h));
        }
        i += 8;
    }
    for j in n8..src.len() {
        dst[j] = src[j].to_f32();
    }
}
