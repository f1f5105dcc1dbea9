//! Attention over PQ codes: one decode step (1 query token) of one layer.

use std::hint::black_box;
use std::time::Duration;

use _ctxcore::attention::{pq_attention, PqAttention};
use _ctxcore::rng::SplitMix64;
use criterion::{BenchmarkId, Criterion, Throughput};

fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut r = SplitMix64::new(seed, 0);
    (0..n).map(|_| r.next_u64() as u8).collect()
}

fn floats(n: usize, seed: u64) -> Vec<f32> {
    let mut r = SplitMix64::new(seed, 1);
    (0..n).map(|_| r.next_f64() as f32 - 0.5).collect()
}

pub fn decode_step(c: &mut Criterion) {
    let mut g = c.benchmark_group("pq_attention_decode");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    // (name, (batch, tokens), (hq, hkv, d), (k_m, k_nbits), (v_m, v_nbits)): "default" rows are the
    // `bits=4` layout (`bits_to_pq`: keys 8-bit over 2 dims, values 4-bit over 1 dim); "extra"
    // rows are all-4-bit layouts that no `bits` setting gives.
    type Row = (
        &'static str,
        (usize, usize),
        (usize, usize, usize),
        (usize, u32),
        (usize, u32),
    );
    let rows: [Row; 5] = [
        (
            "smollm2_default_bits4",
            (1, 32_768),
            (9, 3, 64),
            (32, 8),
            (64, 4),
        ),
        (
            "smollm2_default_bits4_batch8",
            (8, 2_048),
            (9, 3, 64),
            (32, 8),
            (64, 4),
        ),
        (
            "smollm2_extra_k64x4_v64x4",
            (1, 32_768),
            (9, 3, 64),
            (64, 4),
            (64, 4),
        ),
        (
            "smollm2_extra_k32x4_v32x4",
            (1, 32_768),
            (9, 3, 64),
            (32, 4),
            (32, 4),
        ),
        (
            "llama8b_default_bits4",
            (1, 32_768),
            (32, 8, 128),
            (64, 8),
            (128, 4),
        ),
    ];
    for (name, (batch, n), (hq, hkv, d), (km, kb), (vm, vb)) in rows {
        let f = 132;
        let (ck, cv) = (km * kb as usize / 8, vm * vb as usize / 8);
        let kc = bytes(batch * hkv * n * ck, 1);
        let vc = bytes(batch * hkv * n * cv, 2);
        let kcent = floats(hkv * (1 << kb) * d, 3);
        let vcent = floats(hkv * (1 << vb) * d, 4);
        let q = floats(batch * hq * d, 5);
        let fp = floats(batch * hkv * f * d, 6);
        let (code_range, fp_range) = (vec![(0, n); batch], vec![(0, f); batch]);
        let args = PqAttention {
            batch,
            hq,
            hkv,
            tq: 1,
            d,
            q: &q,
            n,
            k_codes: &kc,
            v_codes: &vc,
            k_cent: &kcent,
            k_m: km,
            k_nbits: kb,
            v_cent: &vcent,
            v_m: vm,
            v_nbits: vb,
            code_range: &code_range,
            f,
            fp_k: &fp,
            fp_v: &fp,
            fp_range: &fp_range,
            scale: 1.0 / (d as f32).sqrt(),
            causal: true,
        };
        g.throughput(Throughput::Elements((batch * n * hq) as u64));
        g.bench_function(BenchmarkId::new(name, format!("{batch}x{n}")), |b| {
            b.iter(|| pq_attention(black_box(&args)).unwrap())
        });
    }
    g.finish();
}
