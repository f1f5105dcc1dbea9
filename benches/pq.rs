//! PQ codec: train, encode and lookup-table scan throughput (peer comparisons against faiss live
//! in `bench_pq.py`, which runs both on the same data in one process).

use std::hint::black_box;
use std::time::Duration;

use _ctxcore::rng::SplitMix64;
use _ctxcore::{Metric, ProductQuantizer};
use criterion::{BenchmarkId, Criterion, Throughput};

const DIM: usize = 64;
/// (m, nbits): 8-bit over 4 dims (2 bits/elem), 4-bit over 2 dims (2 bits/elem),
/// 4-bit over 1 dim (4 bits/elem).
const CONFIGS: [(usize, u32); 3] = [(16, 8), (32, 4), (64, 4)];

fn vectors(n: usize, seed: u64) -> Vec<f32> {
    let mut r = SplitMix64::new(seed, 0);
    // Heavy-ish tails: a Cauchy-like mix keeps it closer to attention keys than uniform noise.
    (0..n * DIM)
        .map(|_| {
            let u = r.next_f64() as f32 - 0.5;
            u / (1.05 - 2.0 * u.abs())
        })
        .collect()
}

fn trained(m: usize, nbits: u32, x: &[f32]) -> ProductQuantizer {
    let mut pq = ProductQuantizer::new(DIM, m, nbits).unwrap();
    pq.train(x, 10, 0).unwrap();
    pq
}

pub fn train(c: &mut Criterion) {
    let mut g = c.benchmark_group("pq_train");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    let x = vectors(16_384, 1);
    for (m, nbits) in CONFIGS {
        g.throughput(Throughput::Elements(16_384));
        g.bench_with_input(
            BenchmarkId::new(format!("{m}x{nbits}"), "16k_x10it"),
            &x,
            |b, x| {
                b.iter(|| {
                    let mut pq = ProductQuantizer::new(DIM, m, nbits).unwrap();
                    pq.train(black_box(x), 10, 0).unwrap();
                    pq
                })
            },
        );
    }
    g.finish();
}

pub fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("pq_encode");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    let x = vectors(100_000, 2);
    for (m, nbits) in CONFIGS {
        let pq = trained(m, nbits, &x[..16_384 * DIM]);
        g.throughput(Throughput::Elements(100_000));
        g.bench_function(BenchmarkId::new(format!("{m}x{nbits}"), "100k"), |b| {
            b.iter(|| pq.encode(black_box(&x)).unwrap())
        });
    }
    g.finish();
}

pub fn scan(c: &mut Criterion) {
    let mut g = c.benchmark_group("pq_scan_ip");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    let x = vectors(200_000, 3);
    let q = vectors(8, 4);
    for (m, nbits) in CONFIGS {
        let pq = trained(m, nbits, &x[..16_384 * DIM]);
        let codes = pq.encode(&x).unwrap();
        g.throughput(Throughput::Elements(200_000 * 8));
        g.bench_function(BenchmarkId::new(format!("{m}x{nbits}"), "8q_x_200k"), |b| {
            b.iter(|| {
                pq.scores(black_box(&q), black_box(&codes), Metric::InnerProduct)
                    .unwrap()
            })
        });
        if nbits == 4 {
            g.bench_function(
                BenchmarkId::new(format!("{m}x{nbits}_fast"), "8q_x_200k"),
                |b| {
                    b.iter(|| {
                        pq.scores_fast(black_box(&q), black_box(&codes), Metric::InnerProduct)
                            .unwrap()
                    })
                },
            );
        }
    }
    g.finish();
}
