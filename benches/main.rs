//! `cargo bench`: criterion benches, one module per area.

use criterion::{criterion_group, criterion_main};

mod attention;
mod pq;
mod store;

criterion_group!(pq_benches, pq::train, pq::encode, pq::scan);
criterion_group!(
    store_benches,
    store::append,
    store::page_in,
    store::eviction
);
criterion_group!(attention_benches, attention::decode_step);
criterion_main!(pq_benches, store_benches, attention_benches);
