//! Property tests of the PQ codec through the public Rust API.

use _ctxcore::{Error, Metric, ProductQuantizer};
use proptest::prelude::*;

fn vectors(n: usize, dim: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = _ctxcore::rng::SplitMix64::new(seed, 99);
    (0..n * dim)
        .map(|_| ((r.next_f64() as f32) - 0.5) * scale)
        .collect()
}

fn configs() -> impl Strategy<Value = (usize, usize, u32)> {
    prop_oneof![
        Just((4, 2)),
        Just((6, 3)),
        Just((8, 8)),
        Just((12, 4)),
        Just((16, 2)),
        Just((10, 5))
    ]
    .prop_flat_map(|(dim, m)| prop_oneof![Just(4u32), Just(8u32)].prop_map(move |b| (dim, m, b)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn scores_equal_scores_of_decoded(cfg in configs(), n in 0usize..90, seed in any::<u64>(), scale in 0.01f32..100.0) {
        let (dim, m, nbits) = cfg;
        let mut pq = ProductQuantizer::new(dim, m, nbits).unwrap();
        let train = vectors(300, dim, seed, scale);
        pq.train(&train, 3, seed).unwrap();
        let x = vectors(n, dim, seed ^ 1, scale);
        let codes = pq.encode(&x).unwrap();
        prop_assert_eq!(codes.len(), n * pq.code_bytes());
        let y = pq.decode(&codes).unwrap();
        // Decoding is a projection: re-encoding decoded vectors gives the same codes.
        prop_assert_eq!(pq.encode(&y).unwrap(), codes.clone());
        let q = vectors(2, dim, seed ^ 2, scale);
        let ip = pq.scores(&q, &codes, Metric::InnerProduct).unwrap();
        let l2 = pq.scores(&q, &codes, Metric::L2).unwrap();
        let tol = 1e-4 * scale * scale * dim as f32;
        for qi in 0..2 {
            let qq = &q[qi * dim..(qi + 1) * dim];
            for i in 0..n {
                let yi = &y[i * dim..(i + 1) * dim];
                let e: f64 = yi.iter().zip(qq).map(|(a, b)| (*a as f64) * (*b as f64)).sum();
                let d: f64 = yi.iter().zip(qq).map(|(a, b)| ((*a - *b) as f64).powi(2)).sum();
                prop_assert!((ip[qi * n + i] as f64 - e).abs() <= (tol as f64) + 1e-4 * e.abs());
                prop_assert!((l2[qi * n + i] as f64 - d).abs() <= (tol as f64) + 1e-4 * d.abs());
            }
        }
        // Serialization round trip preserves behaviour.
        let back = ProductQuantizer::from_bytes(&pq.to_bytes()).unwrap();
        prop_assert_eq!(back.encode(&x).unwrap(), codes);
    }

    #[test]
    fn any_single_byte_corruption_is_detected(pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut pq = ProductQuantizer::new(8, 4, 4).unwrap();
        pq.train(&vectors(64, 8, 3, 1.0), 2, 0).unwrap();
        let mut b = pq.to_bytes();
        let i = pos.index(b.len());
        b[i] ^= 1 << bit;
        prop_assert!(ProductQuantizer::from_bytes(&b).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = ProductQuantizer::from_bytes(&b);
    }
}

#[test]
fn errors_are_typed() {
    let pq = ProductQuantizer::new(8, 4, 8).unwrap();
    assert!(matches!(
        pq.encode(&[0.0; 8]),
        Err(Error::NotTrained { .. })
    ));
    assert!(matches!(
        ProductQuantizer::new(8, 3, 8),
        Err(Error::Config(_))
    ));
    let mut pq = ProductQuantizer::new(8, 4, 4).unwrap();
    pq.train(&vectors(32, 8, 0, 1.0), 2, 0).unwrap();
    assert!(matches!(pq.decode(&[0u8; 5]), Err(Error::Shape { .. })));
    assert!(matches!(
        pq.scores(&[0.0; 8], &[0u8; 3], Metric::L2),
        Err(Error::Shape { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// One-dimensional subspaces encode by comparisons with midpoints: every code must still
    /// be a nearest centroid of its value.
    #[test]
    fn scalar_codes_are_nearest_centroids(nbits in prop_oneof![Just(4u32), Just(8u32)], dim in 1usize..40,
                                          seed in any::<u64>(), scale in 0.01f32..100.0) {
        let mut pq = ProductQuantizer::new(dim, dim, nbits).unwrap();
        pq.train(&vectors(300, dim, seed, scale), 5, seed).unwrap();
        let x = vectors(50, dim, seed ^ 7, scale * 1.5);
        let y = pq.decode(&pq.encode(&x).unwrap()).unwrap();
        let cent = pq.centroids().unwrap();
        let ksub = 1usize << nbits;
        for i in 0..50 {
            for j in 0..dim {
                let v = x[i * dim + j];
                let best = cent[j * ksub..(j + 1) * ksub]
                    .iter()
                    .map(|c| (v - c).abs())
                    .fold(f32::INFINITY, f32::min);
                let got = (v - y[i * dim + j]).abs();
                prop_assert!(got <= best * (1.0 + 1e-6) + 1e-6 * scale, "dim {} value {}: {} vs {}", j, v, got, best);
            }
        }
    }
}
