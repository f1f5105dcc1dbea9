//! Paged KV store: append (encode + page fill), page-in from the disk tier, eviction.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use _ctxcore::rng::SplitMix64;
use _ctxcore::store::{KvStore, StoreConfig};
use _ctxcore::ProductQuantizer;
use criterion::{BatchSize, Criterion, Throughput};

const H: usize = 3;
const D: usize = 64;
const P: usize = 64;

fn cfg(dir: Option<PathBuf>, budget: Option<u64>) -> StoreConfig {
    StoreConfig {
        layers: 1,
        kv_heads: H,
        head_dim: D,
        page_size: P,
        window: 0,
        sinks: 0,
        k_m: 64,
        k_nbits: 4,
        v_m: 64,
        v_nbits: 4,
        keep_full_precision: true,
        window_f16: false,
        abstracts: true,
        batch: 1,
        ram_budget: budget,
        offload_dir: dir,
        max_disk_bytes: None,
        model_id: "bench".into(),
    }
}

fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut r = SplitMix64::new(seed, 0);
    (0..n).map(|_| r.next_f64() as f32 * 2.0 - 1.0).collect()
}

fn store(c: StoreConfig) -> KvStore {
    let s = KvStore::new(c).unwrap();
    let books = || -> Vec<ProductQuantizer> {
        (0..H)
            .map(|h| {
                let mut pq = ProductQuantizer::new(D, 64, 4).unwrap();
                pq.train(&rand(1024 * D, h as u64), 5, 0).unwrap();
                pq
            })
            .collect()
    };
    s.set_codebooks(0, books(), books()).unwrap();
    s
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ctxcore-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

pub fn append(c: &mut Criterion) {
    let mut g = c.benchmark_group("store_append");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    let t = 1024;
    let k = rand(H * t * D, 1);
    g.throughput(Throughput::Elements(t as u64));
    g.bench_function("1024_tokens_3x64_4bit_fp16copy", |b| {
        b.iter_batched(
            || store(cfg(None, None)),
            |s| s.append(0, 0, black_box(&k), black_box(&k), t).unwrap(),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

pub fn page_in(c: &mut Criterion) {
    let mut g = c.benchmark_group("store_page_in");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    let dir = tmp("pagein");
    let s = store(cfg(Some(dir.clone()), None));
    let t = 64 * P;
    let k = rand(H * t * D, 2);
    s.append(0, 0, &k, &k, t).unwrap();
    let bytes = s.config().page_bytes() as u64 * 64;
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function("64_pages_from_disk_tier", |b| {
        b.iter(|| {
            s.evict_all().unwrap();
            for p in 0..64 {
                black_box(s.page(0, 0, p).unwrap());
            }
        })
    });
    g.finish();
    drop(s);
    let _ = std::fs::remove_dir_all(dir);
}

pub fn eviction(c: &mut Criterion) {
    let mut g = c.benchmark_group("store_eviction");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    let t = 64 * P;
    let k = rand(H * t * D, 3);
    g.throughput(Throughput::Elements(64));
    g.bench_function("spill_64_pages", |b| {
        b.iter_batched(
            || {
                let dir = tmp("evict");
                let s = store(cfg(Some(dir.clone()), None));
                s.append(0, 0, &k, &k, t).unwrap();
                (s, dir)
            },
            |(s, dir)| {
                s.evict_all().unwrap();
                drop(s);
                let _ = std::fs::remove_dir_all(dir);
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}
