//! A/B timings behind the kernel's design choices (ignored by default).
#![allow(clippy::needless_range_loop)]
use super::*;
use crate::rng::SplitMix64;

/// Scores of 4-bit codes from per-nibble tables: `out[i] = sum_j lut[j][code_ij]`, four codes
/// at a time. `lut`: Layout `(m, 16)`; `codes`: `(n, ceil(m / 2))`.
#[inline(always)]
fn scan_nibbles(lut: &[f32], m: usize, codes: &[u8], out: &mut [f32]) {
    let cb = m.div_ceil(2);
    let pairs = m / 2;
    let n = out.len();
    let n4 = n / 4 * 4;
    let t = |j: usize, c: u8| lut[j * 16 + c as usize];
    for i in (0..n4).step_by(4) {
        let c = &codes[i * cb..(i + 4) * cb];
        let (mut s0, mut s1, mut s2, mut s3) = (0f32, 0f32, 0f32, 0f32);
        for bi in 0..pairs {
            let (b0, b1, b2, b3) = (c[bi], c[cb + bi], c[2 * cb + bi], c[3 * cb + bi]);
            s0 += t(2 * bi, b0 & 15) + t(2 * bi + 1, b0 >> 4);
            s1 += t(2 * bi, b1 & 15) + t(2 * bi + 1, b1 >> 4);
            s2 += t(2 * bi, b2 & 15) + t(2 * bi + 1, b2 >> 4);
            s3 += t(2 * bi, b3 & 15) + t(2 * bi + 1, b3 >> 4);
        }
        if m % 2 == 1 {
            s0 += t(m - 1, c[pairs] & 15);
            s1 += t(m - 1, c[cb + pairs] & 15);
            s2 += t(m - 1, c[2 * cb + pairs] & 15);
            s3 += t(m - 1, c[3 * cb + pairs] & 15);
        }
        out[i..i + 4].copy_from_slice(&[s0, s1, s2, s3]);
    }
    for i in n4..n {
        let c = &codes[i * cb..(i + 1) * cb];
        let mut s = 0f32;
        for bi in 0..pairs {
            s += t(2 * bi, c[bi] & 15) + t(2 * bi + 1, c[bi] >> 4);
        }
        if m % 2 == 1 {
            s += t(m - 1, c[pairs] & 15);
        }
        out[i] = s;
    }
}

/// Per-byte value histograms (32 adds per token at m = 64, 32 KB table) for the A/B below.
fn accumulate_bytes(p: &[f32], vc: &[u8], cv: usize, w: &mut [f32]) {
    for (pn, code) in p.iter().zip(vc.chunks_exact(cv)) {
        for (cell, &c) in w.chunks_exact_mut(256).zip(code) {
            cell[c as usize] += pn;
        }
    }
}

fn accumulate_nibbles(p: &[f32], vc: &[u8], cv: usize, w: &mut [f32]) {
    for (pn, code) in p.iter().zip(vc.chunks_exact(cv)) {
        for (bi, &c) in code.iter().enumerate() {
            w[2 * bi * 16 + (c & 15) as usize] += pn;
            w[(2 * bi + 1) * 16 + (c >> 4) as usize] += pn;
        }
    }
}

#[test]
#[ignore]
fn ab_value_accumulation() {
    let (m, n) = (64usize, 4096usize);
    let cv = m / 2;
    let mut r = SplitMix64::new(2, 0);
    let codes: Vec<u8> = (0..n * cv).map(|_| r.next_u64() as u8).collect();
    let p: Vec<f32> = (0..n).map(|_| r.next_f64() as f32).collect();
    let mut wb = vec![0f32; cv * 256];
    let mut wn = vec![0f32; m * 16];
    let (mut ta, mut tb) = (f64::MAX, f64::MAX);
    for _ in 0..50 {
        let t = std::time::Instant::now();
        for _ in 0..20 {
            crate::dispatch!(accumulate_bytes(&p, &codes, cv, &mut wb));
        }
        ta = ta.min(t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        for _ in 0..20 {
            crate::dispatch!(accumulate_nibbles(&p, &codes, cv, &mut wn));
        }
        tb = tb.min(t.elapsed().as_secs_f64());
    }
    println!(
        "byte cells: {:.1} ns/token, nibble cells: {:.1} ns/token",
        ta / 20.0 / n as f64 * 1e9,
        tb / 20.0 / n as f64 * 1e9
    );
}

#[test]
#[ignore]
fn ab_shuffle24_vs_pair_tables() {
    let (m, n, g) = (64usize, 4096usize, 3usize);
    let cb = m / 2;
    let mut r = SplitMix64::new(5, 0);
    let codes: Vec<u8> = (0..n * cb).map(|_| r.next_u64() as u8).collect();
    let luts: Vec<Vec<f32>> = (0..g)
        .map(|_| (0..m * 16).map(|_| r.next_f64() as f32).collect())
        .collect();
    let mut pairs = vec![[0f32; 256]; g * cb];
    for (q, lut) in luts.iter().enumerate() {
        crate::pq::kernels::pair_tables_4bit(lut, m, &mut pairs[q * cb..(q + 1) * cb]);
    }
    let qs: Vec<_> = luts
        .iter()
        .map(|l| crate::pq::fastscan::quantize_exact(l, m))
        .collect();
    let mut out = vec![0f32; g * n];
    let (mut ta, mut tb) = (f64::MAX, f64::MAX);
    for _ in 0..30 {
        let t = std::time::Instant::now();
        for q in 0..g {
            crate::dispatch!(scan_bytes(
                &pairs[q * cb..(q + 1) * cb],
                &codes,
                &mut out[q * n..(q + 1) * n]
            ));
        }
        ta = ta.min(t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        let mut rows: Vec<&mut [f32]> = out.chunks_exact_mut(n).collect();
        crate::pq::fastscan::scan(&qs, &codes, cb, &mut rows);
        tb = tb.min(t.elapsed().as_secs_f64());
    }
    let per = |t: f64| t / (n * g) as f64 * 1e9;
    println!(
        "K scan: pair tables {:.1} vs 24-bit shuffle {:.1} ns/token-query",
        per(ta),
        per(tb)
    );
}

/// Alternating timing of the two 4-bit key scans (run with `--ignored --nocapture`).
#[test]
#[ignore]
fn ab_key_scan() {
    let (m, n) = (64usize, 4096usize);
    let cb = m / 2;
    let mut r = SplitMix64::new(1, 0);
    let codes: Vec<u8> = (0..n * cb).map(|_| r.next_u64() as u8).collect();
    let lut: Vec<f32> = (0..m * 16).map(|_| r.next_f64() as f32).collect();
    let mut pairs = vec![[0f32; 256]; cb];
    crate::pq::kernels::pair_tables_4bit(&lut, m, &mut pairs);
    let mut out = vec![0f32; n];
    let (mut ta, mut tb) = (f64::MAX, f64::MAX);
    for _ in 0..50 {
        let t = std::time::Instant::now();
        for _ in 0..20 {
            crate::dispatch!(scan_bytes(&pairs, &codes, &mut out));
        }
        ta = ta.min(t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        for _ in 0..20 {
            crate::dispatch!(scan_nibbles(&lut, m, &codes, &mut out));
        }
        tb = tb.min(t.elapsed().as_secs_f64());
    }
    println!(
        "pair tables: {:.1} ns/code, nibbles: {:.1} ns/code",
        ta / 20.0 / n as f64 * 1e9,
        tb / 20.0 / n as f64 * 1e9
    );
}

/// Where one 4096-token chunk of codes_chunk goes (Llama-8B shape: 4 queries, d 128, 4-bit
/// keys and values at m = 128), one thread: key scan, softmax, values. Run with
/// `--ignored --nocapture`.
#[test]
#[ignore]
fn ab_chunk_parts() {
    // AB_SHAPE=smol: SmolLM2's (head_dim 64, 3 query heads per KV head).
    let smol = std::env::var("AB_SHAPE").is_ok_and(|v| v == "smol");
    let (m, n, nq, d) = if smol {
        (64usize, 4096usize, 3usize, 64usize)
    } else {
        (128, 4096, 4, 128)
    };
    let cb = m / 2;
    let mut r = SplitMix64::new(3, 0);
    let kc: Vec<u8> = (0..n * cb).map(|_| r.next_u64() as u8).collect();
    let vc: Vec<u8> = (0..n * cb).map(|_| r.next_u64() as u8).collect();
    let cent: Vec<f32> = (0..m * 16).map(|_| r.next_f64() as f32 - 0.5).collect();
    let q: Vec<f32> = (0..nq * d).map(|_| r.next_f64() as f32 - 0.5).collect();
    let luts: Vec<QuantLut> = (0..nq)
        .map(|_| {
            let lut: Vec<f32> = (0..m * 16).map(|_| r.next_f64() as f32).collect();
            fastscan::quantize_exact(&lut, m)
        })
        .collect();
    let mut s = vec![0f32; nq * n];
    let mut out = vec![0f32; nq * d];
    let mut cols = vec![0u8; n * cb];
    let (mut ml, mut ll) = (vec![0f32; nq], vec![0f32; nq]);
    let mut best = [f64::MAX; 6];
    let time = |slot: &mut f64, f: &mut dyn FnMut()| {
        let t = std::time::Instant::now();
        f();
        *slot = slot.min(t.elapsed().as_secs_f64());
    };
    if !crate::simd::has_avx2_fma() {
        return;
    }
    for _ in 0..30 {
        let [t_tr, t_scan, t_exp, t_val, t_k512, t_v512] = &mut best;
        // SAFETY (all blocks): AVX2/FMA checked above, AVX-512 checked where used.
        time(t_tr, &mut || unsafe {
            super::super::values::avx2::transpose(
                &kc[..256 * cb],
                256,
                cb,
                &mut cols[..256 * cb],
                256,
            )
        });
        time(t_scan, &mut || {
            let mut rows: Vec<&mut [f32]> = s.chunks_exact_mut(n).collect();
            fastscan::scan(&luts, &kc, cb, &mut rows);
        });
        time(t_exp, &mut || {
            crate::dispatch!(softmax_rows(&mut s, n, &mut ml, &mut ll))
        });
        time(t_val, &mut || unsafe {
            super::super::values::avx2::weighted_values(&s, nq, n, &vc, cb, m, 1, &cent, &mut out)
        });
        if crate::simd::has_avx512() {
            time(t_k512, &mut || unsafe {
                super::super::avx512::key_scores(&q, 0.1, nq, n, &kc, cb, m, 1, &cent, &mut s)
            });
            time(t_v512, &mut || unsafe {
                super::super::avx512::weighted_values(&s, nq, n, &vc, cb, m, 1, &cent, &mut out)
            });
        }
    }
    let ns = |t: f64| t / n as f64 * 1e9;
    println!(
        "per token ({nq} queries, head_dim {d}, 4-bit): transpose {:.1} ns (x16 per 256 of 4096), softmax {:.1} ns; \
         AVX2: key scan {:.1} ns, values {:.1} ns; AVX-512: keys {:.1} ns, values {:.1} ns",
        ns(best[0] * 16.0),
        ns(best[2]),
        ns(best[1]),
        ns(best[3]),
        ns(best[4]),
        ns(best[5])
    );
}

/// codes_chunk-like work over 64 chunks of fresh (uncached) codes vs one cached chunk, one
/// thread: how much the DRAM stream adds. Run with `--ignored --nocapture`.
#[test]
#[ignore]
fn ab_chunk_cold() {
    let smol = std::env::var("AB_SHAPE").is_ok_and(|v| v == "smol");
    let (m, n, nq, d, chunks) = if smol {
        (64usize, 4096usize, 3usize, 64usize, 512usize)
    } else {
        (128, 4096, 4, 128, 256)
    };
    let cb = m / 2;
    let mut r = SplitMix64::new(3, 0);
    let kc: Vec<u8> = (0..chunks * n * cb).map(|_| r.next_u64() as u8).collect();
    let vc: Vec<u8> = (0..chunks * n * cb).map(|_| r.next_u64() as u8).collect();
    let cent: Vec<f32> = (0..m * 16).map(|_| r.next_f64() as f32 - 0.5).collect();
    let luts: Vec<QuantLut> = (0..nq)
        .map(|_| {
            let lut: Vec<f32> = (0..m * 16).map(|_| r.next_f64() as f32 * 0.1).collect();
            fastscan::quantize_exact(&lut, m)
        })
        .collect();
    let q: Vec<f32> = (0..nq * d).map(|_| r.next_f64() as f32 - 0.5).collect();
    let mut s = vec![0f32; nq * n];
    let mut out = vec![0f32; nq * d];
    let (mut ml, mut ll) = (vec![0f32; nq], vec![0f32; nq]);
    let mut run = |c: usize| {
        let k = &kc[c * n * cb..(c + 1) * n * cb];
        let v = &vc[c * n * cb..(c + 1) * n * cb];
        #[cfg(target_arch = "x86_64")]
        if crate::simd::has_avx512() {
            // SAFETY (both blocks): AVX-512 checked just above.
            unsafe { super::super::avx512::key_scores(&q, 0.1, nq, n, k, cb, m, 1, &cent, &mut s) };
            softmax_rows(&mut s, n, &mut ml, &mut ll);
            unsafe {
                super::super::avx512::weighted_values(&s, nq, n, v, cb, m, 1, &cent, &mut out)
            };
            return;
        }
        let mut rows: Vec<&mut [f32]> = s.chunks_exact_mut(n).collect();
        fastscan::scan(&luts, k, cb, &mut rows);
        crate::dispatch!(softmax_rows(&mut s, n, &mut ml, &mut ll));
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the ab tests run on AVX2 machines (checked by dispatch users).
        unsafe {
            super::super::values::avx2::weighted_values(&s, nq, n, v, cb, m, 1, &cent, &mut out)
        };
    };
    // The bytes alone: a sequential sum over every chunk's codes.
    let mut stream = f64::MAX;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let mut acc = 0u64;
        for c in 0..chunks {
            for w in kc[c * n * cb..(c + 1) * n * cb]
                .chunks_exact(8)
                .chain(vc[c * n * cb..(c + 1) * n * cb].chunks_exact(8))
            {
                acc = acc.wrapping_add(u64::from_le_bytes(w.try_into().unwrap()));
            }
        }
        std::hint::black_box(acc);
        stream = stream.min(t.elapsed().as_secs_f64());
    }
    println!(
        "sequential sum of the codes: {:.1} ns per token-head ({:.1} GB/s)",
        stream / (chunks * n) as f64 * 1e9,
        (2 * chunks * n * cb) as f64 / stream / 1e9
    );
    let (mut hot, mut cold) = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        let t = std::time::Instant::now();
        for _ in 0..chunks {
            run(0);
        }
        hot = hot.min(t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        for c in 0..chunks {
            run(c);
        }
        cold = cold.min(t.elapsed().as_secs_f64());
    }
    let ns = |t: f64| t / (chunks * n) as f64 * 1e9;
    println!(
        "per token-head: cached {:.1} ns, streamed {:.1} ns",
        ns(hot),
        ns(cold)
    );
}
