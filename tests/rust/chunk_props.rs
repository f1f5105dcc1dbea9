//! Property tests of token chunking and chained hashes through the public Rust API.

use std::collections::HashSet;

use _ctxcore::chunk::{
    chain_hash, chunk_tokens, from_hex, matching_prefix, root_hash, to_hex, ChunkHash,
};
use _ctxcore::Error;
use proptest::prelude::*;

fn tokens() -> impl Strategy<Value = Vec<u32>> {
    prop_oneof![
        prop::collection::vec(any::<u32>(), 0..300),
        // Small vocabularies make repeated chunks (same tokens at different positions) likely.
        prop::collection::vec(0u32..3, 0..300),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn chunks_tile_the_sequence(toks in tokens(), size in 1usize..70) {
        let chunks = chunk_tokens(&toks, size, "m").unwrap();
        prop_assert_eq!(chunks.len(), toks.len().div_ceil(size));
        let mut next = 0;
        for (i, c) in chunks.iter().enumerate() {
            prop_assert_eq!(c.start, i * size);
            prop_assert_eq!(c.start, next);
            prop_assert!(c.end > c.start);
            prop_assert!(c.is_full(size) || i + 1 == chunks.len());
            next = c.end;
        }
        prop_assert_eq!(next, toks.len());
    }

    #[test]
    fn hashes_are_the_documented_chain(toks in tokens(), size in 1usize..70, ns in ".{0,12}") {
        let chunks = chunk_tokens(&toks, size, &ns).unwrap();
        let mut prev = root_hash(&ns).unwrap();
        for c in &chunks {
            prev = chain_hash(&prev, &toks[c.start..c.end]).unwrap();
            prop_assert_eq!(c.hash, prev);
        }
    }

    #[test]
    fn prefix_chunks_are_leading_chunks(toks in tokens(), size in 1usize..70, cut in any::<prop::sample::Index>()) {
        let p = cut.index(toks.len() + 1);
        let full = chunk_tokens(&toks, size, "m").unwrap();
        let pre = chunk_tokens(&toks[..p], size, "m").unwrap();
        let nfull = p / size;
        prop_assert_eq!(&pre[..nfull], &full[..nfull]);
        if p == toks.len() {
            prop_assert_eq!(&pre, &full);
        }
        // A cache holding the prefix's chunks covers all of its full chunks, and all of it
        // when it is the whole sequence.
        let known: HashSet<ChunkHash> = pre.iter().map(|c| c.hash).collect();
        let covered = matching_prefix(&full, |h| known.contains(h));
        prop_assert_eq!(covered, if p == toks.len() { p } else { nfull * size });
    }

    #[test]
    fn a_changed_token_changes_its_chunk_and_all_later(toks in tokens(), size in 1usize..70, at in any::<prop::sample::Index>(), delta in 1u32..) {
        prop_assume!(!toks.is_empty());
        let i = at.index(toks.len());
        let mut t2 = toks.clone();
        t2[i] = t2[i].wrapping_add(delta);
        let a = chunk_tokens(&toks, size, "m").unwrap();
        let b = chunk_tokens(&t2, size, "m").unwrap();
        let k = i / size;
        prop_assert_eq!(&a[..k], &b[..k]);
        for (x, y) in a[k..].iter().zip(&b[k..]) {
            prop_assert_ne!(x.hash, y.hash);
        }
    }

    #[test]
    fn namespaces_never_share_hashes(toks in tokens(), size in 1usize..70, a in ".{0,8}", b in ".{0,8}") {
        prop_assume!(a != b);
        let ca = chunk_tokens(&toks, size, &a).unwrap();
        let cb = chunk_tokens(&toks, size, &b).unwrap();
        let known: HashSet<ChunkHash> = ca.iter().map(|c| c.hash).collect();
        prop_assert!(cb.iter().all(|c| !known.contains(&c.hash)));
        prop_assert_eq!(matching_prefix(&cb, |h| known.contains(h)), 0);
    }

    #[test]
    fn hex_round_trips(h in any::<[u8; 32]>()) {
        let s = to_hex(&h);
        prop_assert_eq!(s.len(), 64);
        prop_assert!(s.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
        prop_assert_eq!(from_hex(&s).unwrap(), h);
    }
}

#[test]
fn chunk_size_zero_is_a_config_error() {
    for toks in [&[][..], &[1, 2, 3][..]] {
        let e = chunk_tokens(toks, 0, "m").unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{e:?}");
    }
}
