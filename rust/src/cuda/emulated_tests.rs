//! The CUDA kernels run through a CPU emulation (`cuda/emu/`) and checked against the CPU
//! reference kernels, with the launches planned by this crate's launch code: indexing, masking,
//! split-K merging, parameter layout and shared-memory sizing are tested on machines without a
//! GPU. (Speed, and anything the emulation cannot model, is for the GPU tests.)
//!
//! The emulation library is compiled with the system C++ compiler (`CXX`, default `g++`,
//! C++20) once per test run.

use std::ffi::{c_int, c_void};
use std::path::PathBuf;
use std::sync::OnceLock;

use half::{bf16, f16};

use super::emulator::{self, Emulator};
use super::*;
use crate::attention::{page_scores, pq_attention, pq_attention_selected, CodePages, PqAttention};
use crate::rng::SplitMix64 as Rng;
use crate::ProductQuantizer;

type SizesFn = unsafe extern "C" fn(*mut usize);
type SmemFn = unsafe extern "C" fn(*const PqAttnParams) -> c_int;

struct Emu {
    lib: Emulator,
    sizes: SizesFn,
    attn_smem: SmemFn,
}

fn emu() -> &'static Emu {
    static EMU: OnceLock<Emu> = OnceLock::new();
    EMU.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let lib = std::env::temp_dir().join(format!("ctxcore-emu-{}.so", std::process::id()));
        emulator::build(&root, &lib).unwrap();
        let e = Emulator::open(&lib).unwrap();
        let _ = std::fs::remove_file(&lib);
        // SAFETY: the symbols have the declared signatures (cuda/emu/emu.cpp,
        // cuda/pq_attention.cu).
        unsafe {
            Emu {
                lib: e,
                sizes: std::mem::transmute::<*mut c_void, SizesFn>(
                    e.symbol("ctx_params_sizes").unwrap(),
                ),
                attn_smem: std::mem::transmute::<*mut c_void, SmemFn>(
                    e.symbol("ctx_pq_attn_smem_bytes").unwrap(),
                ),
            }
        }
    })
}

/// [`Launcher`] over the emulation: "device addresses" are host addresses.
struct EmuLauncher;

impl Launcher for EmuLauncher {
    fn launch(&self, l: &Launch) -> Result<()> {
        emu().lib.launch(l)
    }
}

fn addr<T>(v: &[T]) -> u64 {
    v.as_ptr() as u64
}

/// Address of an output buffer (the kernels write through it).
fn addr_mut<T>(v: &mut [T]) -> u64 {
    v.as_mut_ptr() as u64
}

fn randn(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            // Box-Muller.
            let u: f64 = rng.next_f64().max(1e-12);
            let v = rng.next_f64();
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
        })
        .collect()
}

/// Values rounded through `dt` (what a float16 / bfloat16 tensor holds), and their bytes.
fn in_dtype(x: &[f32], dt: DType) -> (Vec<f32>, Vec<u8>) {
    match dt {
        DType::F32 => (x.to_vec(), x.iter().flat_map(|v| v.to_ne_bytes()).collect()),
        DType::F16 => (
            x.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
            x.iter()
                .flat_map(|&v| f16::from_f32(v).to_ne_bytes())
                .collect(),
        ),
        DType::BF16 => (
            x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
            x.iter()
                .flat_map(|&v| bf16::from_f32(v).to_ne_bytes())
                .collect(),
        ),
    }
}

fn from_dtype(b: &[u8], dt: DType) -> Vec<f32> {
    match dt {
        DType::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_ne_bytes(c.try_into().unwrap()))
            .collect(),
        DType::F16 => b
            .chunks_exact(2)
            .map(|c| f16::from_ne_bytes(c.try_into().unwrap()).to_f32())
            .collect(),
        DType::BF16 => b
            .chunks_exact(2)
            .map(|c| bf16::from_ne_bytes(c.try_into().unwrap()).to_f32())
            .collect(),
    }
}

#[test]
fn parameter_blocks_match_the_c_layout() {
    let mut sizes = [0usize; 4];
    // SAFETY: writes 4 sizes.
    unsafe { (emu().sizes)(sizes.as_mut_ptr()) };
    assert_eq!(
        sizes,
        [
            std::mem::size_of::<PqAttnParams>(),
            std::mem::size_of::<PageScoresParams>(),
            std::mem::size_of::<PageGatherParams>(),
            std::mem::size_of::<PqEncodeParams>(),
        ]
    );
}

#[test]
fn shared_memory_sizing_matches_the_kernel() {
    for (d, kb, vb, n, lim) in [
        (64, 8, 8, 5000, DeviceLimits::H100),
        (128, 8, 8, 5000, DeviceLimits::H100),
        (128, 4, 8, 5000, DeviceLimits::H100),
        (96, 4, 4, 10, DeviceLimits::H100),
        (256, 4, 4, 0, DeviceLimits::H100),
        (
            32,
            8,
            4,
            100,
            DeviceLimits {
                sm_count: 1,
                max_smem: 65_536,
            },
        ),
    ] {
        let s = PqAttnShape {
            batch: 2,
            hq: 8,
            hkv: 2,
            tq: 1,
            d,
            n,
            f: 10,
            k_m: d / 2,
            k_nbits: kb,
            v_m: d / 4,
            v_nbits: vb,
            dtype: DType::F32,
            scale: 1.0,
            causal: true,
            paged: None,
        };
        let plan = plan_pq_attention(&s, &lim).unwrap();
        // SAFETY: reads the parameter block.
        let c = unsafe { (emu().attn_smem)(&plan.params) };
        assert_eq!(c as usize, plan.smem(), "d={d} kbits={kb} vbits={vb} n={n}");
    }
}

/// One pq_attention case: random codes and codebooks, CPU reference vs emulated CUDA kernels.
#[derive(Clone, Copy, Debug)]
struct Case {
    batch: usize,
    hq: usize,
    hkv: usize,
    tq: usize,
    d: usize,
    n: usize,
    f: usize,
    k_dsub: usize,
    /// Key code bits.
    nbits: u32,
    v_dsub: usize,
    /// Value code bits (`None`: as the keys).
    v_nbits: Option<u32>,
    dtype: DType,
    causal: bool,
    /// Left padding of sequence 1 (codes) and a shorter fp part for it.
    pad: bool,
    lim: DeviceLimits,
    /// Paged mode: (page size, id slots per (sequence, KV head)): each list gets a random
    /// number of distinct random pages (the history's partial page among them where it falls)
    /// in random order, the other slots -1.
    paged: Option<(usize, usize)>,
}

fn run_attention(c: Case, seed: u64) {
    let mut rng = Rng::new(seed, 7);
    let (b, hq, hkv, tq, d, n, f) = (c.batch, c.hq, c.hkv, c.tq, c.d, c.n, c.f);
    let (k_m, v_m) = (d / c.k_dsub, d / c.v_dsub);
    let vbits = c.v_nbits.unwrap_or(c.nbits);
    let (ksub, vsub) = (1usize << c.nbits, 1usize << vbits);
    let kcb = (k_m * c.nbits as usize).div_ceil(8);
    let vcb = (v_m * vbits as usize).div_ceil(8);
    let (q, q_bytes) = in_dtype(&randn(&mut rng, b * hq * tq * d), c.dtype);
    let k_codes: Vec<u8> = (0..b * hkv * n * kcb)
        .map(|_| rng.below(256) as u8)
        .collect();
    let v_codes: Vec<u8> = (0..b * hkv * n * vcb)
        .map(|_| rng.below(256) as u8)
        .collect();
    let k_cent = randn(&mut rng, hkv * ksub * d);
    let v_cent = randn(&mut rng, hkv * vsub * d);
    let (fp_k, fk_bytes) = in_dtype(&randn(&mut rng, b * hkv * f * d), c.dtype);
    let (fp_v, fv_bytes) = in_dtype(&randn(&mut rng, b * hkv * f * d), c.dtype);
    let mut code_range = vec![(0usize, n); b];
    let mut fp_range = vec![(0usize, f); b];
    if c.pad && b > 1 {
        code_range[1] = (n / 3, n);
        fp_range[1] = (f.min(tq + 2) / 2, f);
    }
    let scale = 1.0 / (d as f32).sqrt();
    let ids: Vec<i64> = match c.paged {
        None => Vec::new(),
        Some((size, slots)) => {
            code_range = vec![(0, n); b];
            let count = n.div_ceil(size);
            let mut ids = Vec::with_capacity(b * hkv * slots);
            for _ in 0..b * hkv {
                let mut all: Vec<i64> = (0..count as i64).collect();
                for i in (1..all.len()).rev() {
                    all.swap(i, rng.below(i + 1));
                }
                let take = rng.below(slots.min(count) + 1);
                let mut list: Vec<i64> = all[..take].to_vec();
                list.resize(slots, -1);
                for i in (1..list.len()).rev() {
                    list.swap(i, rng.below(i + 1));
                }
                ids.extend(list);
            }
            ids
        }
    };
    let args = PqAttention {
        batch: b,
        hq,
        hkv,
        tq,
        d,
        q: &q,
        n,
        k_codes: &k_codes,
        v_codes: &v_codes,
        k_cent: &k_cent,
        k_m,
        k_nbits: c.nbits,
        v_cent: &v_cent,
        v_m,
        v_nbits: vbits,
        code_range: &code_range,
        f,
        fp_k: &fp_k,
        fp_v: &fp_v,
        fp_range: &fp_range,
        scale,
        causal: c.causal,
    };
    let (want, want_lse) = match c.paged {
        None => pq_attention(&args),
        Some((size, slots)) => pq_attention_selected(
            &args,
            &CodePages {
                ids: &ids,
                s: slots,
                size,
            },
        ),
    }
    .unwrap();

    let shape = PqAttnShape {
        batch: b,
        hq,
        hkv,
        tq,
        d,
        n,
        f,
        k_m,
        k_nbits: c.nbits,
        v_m,
        v_nbits: vbits,
        dtype: c.dtype,
        scale,
        causal: c.causal,
        paged: c
            .paged
            .map(|(page_size, ids)| PagedCodes { page_size, ids }),
    };
    let plan = plan_pq_attention(&shape, &c.lim).unwrap();
    let cr: Vec<i64> = code_range
        .iter()
        .flat_map(|&(s, e)| [s as i64, e as i64])
        .collect();
    let fr: Vec<i64> = fp_range
        .iter()
        .flat_map(|&(s, e)| [s as i64, e as i64])
        .collect();
    // Outputs with guard words after them: a write past the end shows up.
    let out_len = b * hq * tq * d * c.dtype.size();
    let guard = 64;
    let mut out = vec![0xABu8; out_len + guard];
    let mut lse = vec![f32::NAN; b * hq * tq + guard];
    let mut work = vec![f32::NAN; plan.work_bytes / 4 + guard];
    let ptrs = PqAttnPtrs {
        q: addr(&q_bytes),
        k_codes: addr(&k_codes),
        v_codes: addr(&v_codes),
        k_centroids: addr(&k_cent),
        v_centroids: addr(&v_cent),
        code_range: addr(&cr),
        fp_k: addr(&fk_bytes),
        fp_v: addr(&fv_bytes),
        fp_range: addr(&fr),
        out: addr_mut(&mut out),
        lse: addr_mut(&mut lse),
        pages: if ids.is_empty() { 0 } else { addr(&ids) },
    };
    for l in plan.launches(&ptrs, addr_mut(&mut work)) {
        EmuLauncher.launch(&l).unwrap();
    }
    assert!(
        out[out_len..].iter().all(|&x| x == 0xAB),
        "{c:?}: out overrun"
    );
    assert!(
        lse[b * hq * tq..].iter().all(|x| x.is_nan()),
        "{c:?}: lse overrun"
    );
    assert!(
        work[plan.work_bytes / 4..].iter().all(|x| x.is_nan()),
        "{c:?}: work overrun"
    );
    let got = from_dtype(&out[..out_len], c.dtype);
    // float32 everywhere: 1e-4 relative; float16 codebooks in shared memory or a float16 /
    // bfloat16 output: the rounding of those.
    let tol = match (c.dtype, plan.half_centroids()) {
        (DType::F32, false) => 1e-4,
        (DType::F32, true) | (DType::F16, _) => 4e-3,
        (DType::BF16, _) => 2e-2,
    };
    let lse_tol = if plan.half_centroids() { 2e-3 } else { 1e-4 };
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{c:?}: out[{i}] = {g}, CPU reference {w} (splits {})",
            plan.splits()
        );
    }
    for (i, (&g, &w)) in lse[..b * hq * tq].iter().zip(&want_lse).enumerate() {
        if w == f32::NEG_INFINITY {
            assert_eq!(g, w, "{c:?}: lse[{i}]");
        } else {
            assert!(
                (g - w).abs() <= lse_tol * (1.0 + w.abs()),
                "{c:?}: lse[{i}] = {g}, CPU reference {w}"
            );
        }
    }
}

const SMALL_GPU: DeviceLimits = DeviceLimits {
    sm_count: 2,
    max_smem: 232_448,
};

fn base() -> Case {
    Case {
        batch: 1,
        hq: 4,
        hkv: 2,
        tq: 1,
        d: 64,
        n: 700,
        f: 20,
        k_dsub: 2,
        nbits: 8,
        v_dsub: 2,
        v_nbits: None,
        dtype: DType::F32,
        causal: true,
        pad: false,
        lim: SMALL_GPU,
        paged: None,
    }
}

#[test]
fn attention_matches_cpu_reference_over_head_dims_and_gqa() {
    for (i, (d, hq, hkv)) in [
        (64, 4, 4),
        (64, 9, 3),
        (128, 8, 1),
        (128, 6, 2),
        (32, 16, 2),
    ]
    .into_iter()
    .enumerate()
    {
        run_attention(
            Case {
                d,
                hq,
                hkv,
                ..base()
            },
            i as u64,
        );
    }
}

#[test]
fn attention_matches_cpu_reference_for_4_bit_codes_and_odd_widths() {
    // 4-bit codes (nibbles), key and value codebooks of different widths, odd code rows.
    for (i, (kd, vd, nbits, d)) in [(4, 2, 4, 64), (2, 4, 8, 64), (1, 8, 4, 40), (8, 8, 8, 96)]
        .into_iter()
        .enumerate()
    {
        run_attention(
            Case {
                k_dsub: kd,
                v_dsub: vd,
                nbits,
                d,
                ..base()
            },
            10 + i as u64,
        );
    }
}

#[test]
fn attention_matches_cpu_reference_for_the_default_layout() {
    // bits=4 (ctxcore.bits_to_pq): keys 8-bit codes over 2 dims, values 4-bit codes over 1 dim;
    // SmolLM2's GQA shape, float32 and bfloat16 inputs, left padding, a causal chunk.
    for (i, (dtype, tq, n)) in [
        (DType::F32, 1, 700),
        (DType::BF16, 1, 300),
        (DType::F32, 3, 513),
    ]
    .into_iter()
    .enumerate()
    {
        run_attention(
            Case {
                batch: 2,
                hq: 9,
                hkv: 3,
                tq,
                n,
                d: 64,
                k_dsub: 2,
                nbits: 8,
                v_dsub: 1,
                v_nbits: Some(4),
                dtype,
                pad: true,
                ..base()
            },
            40 + i as u64,
        );
    }
}

#[test]
fn attention_matches_cpu_reference_over_lengths_and_padding() {
    // Empty history, codes only, fp only, not multiples of the 256-token tile, a history split
    // over many blocks, left padding, several causal query tokens.
    for (i, (n, f, tq, batch, pad)) in [
        (0, 0, 1, 1, false),
        (1, 0, 1, 1, false),
        (0, 5, 1, 1, false),
        (257, 3, 1, 2, true),
        (2500, 40, 3, 2, true),
        (600, 8, 5, 1, false),
    ]
    .into_iter()
    .enumerate()
    {
        run_attention(
            Case {
                n,
                f,
                tq,
                batch,
                pad,
                ..base()
            },
            20 + i as u64,
        );
    }
    // Non-causal multi-token queries.
    run_attention(
        Case {
            tq: 4,
            causal: false,
            ..base()
        },
        30,
    );
}

#[test]
fn attention_matches_cpu_reference_in_half_precision_and_half_codebooks() {
    for (i, dtype) in [DType::F16, DType::BF16].into_iter().enumerate() {
        run_attention(
            Case {
                dtype,
                hq: 8,
                hkv: 2,
                ..base()
            },
            40 + i as u64,
        );
    }
    // head_dim 128 with 256 centroids on an H100: codebooks staged as float16.
    let c = Case {
        d: 128,
        hq: 8,
        hkv: 2,
        lim: DeviceLimits::H100,
        ..base()
    };
    run_attention(c, 50);
}

#[test]
fn paged_codes_attention_matches_the_cpu_selected_pages_reference() {
    // Selected pages of the codes attended in place: ragged id lists with -1 slots, random
    // order, the history's partial last page, pages smaller and larger than the 256-token tile,
    // the default layout (8-bit keys over 2 dims, 4-bit values over 1 dim), GQA, splits over
    // many blocks, half precision, a causal multi-token query, no pages at all.
    for (i, (n, size, slots, tq, batch, v_nbits, dtype)) in [
        (700, 64, 6, 1, 1, None, DType::F32),
        (1000, 64, 16, 1, 2, Some(4), DType::F32),
        (2500, 512, 3, 1, 2, Some(4), DType::F32),
        (300, 100, 4, 3, 1, Some(4), DType::BF16),
        (130, 16, 9, 1, 1, None, DType::F16),
        (0, 64, 2, 1, 1, None, DType::F32),
    ]
    .into_iter()
    .enumerate()
    {
        let d = 64;
        run_attention(
            Case {
                n,
                tq,
                batch,
                hq: 9,
                hkv: 3,
                d,
                k_dsub: 2,
                v_dsub: if v_nbits.is_some() { 1 } else { 2 },
                v_nbits,
                dtype,
                pad: batch > 1,
                paged: Some((size, slots)),
                ..base()
            },
            60 + i as u64,
        );
    }
}

#[test]
fn page_scores_match_cpu_reference() {
    let mut rng = Rng::new(3, 3);
    for (b, hq, hkv, tq, p, d, dt) in [
        (2, 8, 2, 1, 37, 64, DType::F32),
        (1, 6, 3, 3, 9, 128, DType::F16),
        (1, 4, 4, 1, 1, 40, DType::BF16),
    ] {
        let (q, qb) = in_dtype(&randn(&mut rng, b * hq * tq * d), dt);
        let x = randn(&mut rng, b * hkv * p * d);
        let y = randn(&mut rng, b * hkv * p * d);
        let lo: Vec<f32> = x.iter().zip(&y).map(|(a, c)| a.min(*c)).collect();
        let hi: Vec<f32> = x.iter().zip(&y).map(|(a, c)| a.max(*c)).collect();
        let (lo, lob) = in_dtype(&lo, dt);
        let (hi, hib) = in_dtype(&hi, dt);
        let want = page_scores(&q, &lo, &hi, b, hq, hkv, tq, p, d).unwrap();
        let mut got = vec![f32::NAN; b * hkv * p + 8];
        let l = page_scores_launch(
            b,
            hq,
            hkv,
            tq,
            p,
            d,
            dt,
            [addr(&qb), addr(&lob), addr(&hib), addr_mut(&mut got)],
        )
        .unwrap()
        .unwrap();
        EmuLauncher.launch(&l).unwrap();
        assert!(got[b * hkv * p..].iter().all(|v| v.is_nan()));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "[{i}] {g} vs {w}");
        }
    }
}

#[test]
fn page_gather_copies_selected_pages_and_zero_fills() {
    for (elem, d) in [(2usize, 64usize), (4, 24), (2, 3)] {
        let (b, h, n, ps, k) = (2, 3, 100, 16, 4);
        let row = d * elem;
        let src: Vec<u8> = (0..b * h * n * row).map(|i| (i % 251) as u8).collect();
        // Pages per (b, h): includes the partial last page (6: tokens 96..100) and -1.
        let pages: Vec<i64> = (0..b * h)
            .flat_map(|bh| [(bh % 6) as i64, 6, -1, 2])
            .collect();
        let mut out = vec![0xCDu8; b * h * k * ps * row + 16];
        let l = page_gather_launch(
            b,
            h,
            n,
            d,
            k,
            ps,
            elem,
            [addr(&src), addr(&pages), addr_mut(&mut out)],
        )
        .unwrap()
        .unwrap();
        EmuLauncher.launch(&l).unwrap();
        let total = b * h * k * ps * row;
        assert!(out[total..].iter().all(|&x| x == 0xCD));
        for bh in 0..b * h {
            for i in 0..k {
                let page = pages[bh * k + i];
                for t in 0..ps {
                    let dst = &out[((bh * k + i) * ps + t) * row..][..row];
                    let tok = page * ps as i64 + t as i64;
                    if page < 0 || tok >= n as i64 {
                        assert!(dst.iter().all(|&x| x == 0), "bh={bh} page={page} t={t}");
                    } else {
                        assert_eq!(dst, &src[(bh * n + tok as usize) * row..][..row]);
                    }
                }
            }
        }
    }
}

#[test]
fn pq_encode_matches_cpu_encoder() {
    let mut rng = Rng::new(5, 5);
    for (d, m, nbits, n, dt, lim) in [
        (64, 32, 8, 150, DType::F32, DeviceLimits::H100),
        (64, 16, 4, 70, DType::F32, DeviceLimits::H100),
        (48, 12, 8, 65, DType::F16, DeviceLimits::H100),
        // Codebook too big for shared memory: read through the cache.
        (
            64,
            32,
            8,
            40,
            DType::BF16,
            DeviceLimits {
                sm_count: 1,
                max_smem: 40_000,
            },
        ),
    ] {
        let (b, h) = (2, 2);
        let ksub = 1usize << nbits;
        let cent = randn(&mut rng, h * ksub * d);
        let (x, xb) = in_dtype(&randn(&mut rng, b * h * n * d), dt);
        let cb = (m * nbits as usize).div_ceil(8);
        let mut codes = vec![0xEEu8; b * h * n * cb + 8];
        let l = pq_encode_launch(
            b,
            h,
            n,
            d,
            m,
            nbits,
            dt,
            &lim,
            [addr(&xb), addr(&cent), addr_mut(&mut codes)],
        )
        .unwrap()
        .unwrap();
        EmuLauncher.launch(&l).unwrap();
        assert!(codes[b * h * n * cb..].iter().all(|&x| x == 0xEE));
        for hh in 0..h {
            let pq = ProductQuantizer::with_centroids(
                d,
                m,
                nbits,
                cent[hh * ksub * d..(hh + 1) * ksub * d].to_vec(),
            )
            .unwrap();
            for bb in 0..b {
                let rows = &x[(bb * h + hh) * n * d..][..n * d];
                let want = pq.encode(rows).unwrap();
                let got = &codes[(bb * h + hh) * n * cb..][..n * cb];
                if want != got {
                    // Only exact distance ties may differ: the decoded vectors must be equally
                    // close.
                    let (dw, dg) = (pq.decode(&want).unwrap(), pq.decode(got).unwrap());
                    for t in 0..n {
                        let dist = |v: &[f32]| -> f32 {
                            v.iter()
                                .zip(&rows[t * d..(t + 1) * d])
                                .map(|(a, b)| (a - b) * (a - b))
                                .sum()
                        };
                        let (a, g) = (dist(&dw[t * d..][..d]), dist(&dg[t * d..][..d]));
                        assert!((a - g).abs() <= 1e-5 * (1.0 + a), "token {t}: {g} vs {a}");
                    }
                }
            }
        }
    }
}
