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
    // (name, hq, hkv, d, m) with 4-bit codes: m = d is 4 bits/element, m = d/2 is 2.
    for (name, hq, hkv, d, m) in [
        ("smollm2_4bit", 9, 3, 64, 64),
        ("smollm2_2bit", 9, 3, 64, 32),
        ("llama8b_4bit", 32, 8, 128, 128),
    ] {
        let n = 32_768;
        let f = 132;
        let cb = m / 2;
        let kc = bytes(hkv * n * cb, 1);
        let vc = bytes(hkv * n * cb, 2);
        let kcent = floats(hkv * 16 * d, 3);
        let vcent = floats(hkv * 16 * d, 4);
        let q = floats(hq * d, 5);
        let fp = floats(hkv * f * d, 6);
        let args = PqAttention {
            batch: 1,
            hq,
            hkv,
            tq: 1,
            d,
            q: &q,
            n,
            k_codes: &kc,
            v_codes: &vc,
            k_cent: &kcent,
            k_m: m,
            k_nbits: 4,
            v_cent: &vcent,
            v_m: m,
            v_nbits: 4,
            code_range: &[(0, n)],
            f,
            fp_k: &fp,
            fp_v: &fp,
            fp_range: &[(0, f)],
            scale: 1.0 / (d as f32).sqrt(),
            causal: true,
        };
        g.throughput(Throughput::Elements((n * hq) as u64));
        g.bench_function(BenchmarkId::new(name, "32k"), |b| {
            b.iter(|| pq_attention(black_box(&args)).unwrap())
        });
    }
    g.finish();
}
