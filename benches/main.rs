//! `cargo bench`: criterion benches, one module per area.

use criterion::{criterion_group, criterion_main};

mod pq;

criterion_group!(benches, pq::train, pq::encode, pq::scan);
criterion_main!(benches);
