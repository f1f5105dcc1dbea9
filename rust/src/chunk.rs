//! Token chunking with chained content hashes, so a saved context can be found by its prefix.
//!
//! A token sequence is cut into chunks of `chunk_size` tokens (the page size of the KV store);
//! only the last chunk may be shorter. Each chunk carries a hash of *everything before and
//! including it*: the hash of chunk `i` is computed from the hash of chunk `i - 1` and the
//! tokens of chunk `i`, starting from a root hash of a namespace (e.g. the model id). Two
//! sequences therefore share the hash of chunk `i` exactly when they share the namespace and
//! the tokens `0..end_i` (up to BLAKE3 collisions), and a cache that keys saved pages by these
//! hashes can find how much of a new prompt is already stored with [`matching_prefix`].
//!
//! # Hash format (persistent: saved contexts are looked up by it)
//!
//! All hashes are 32-byte BLAKE3 digests (default, unkeyed mode). Integers are little-endian.
//!
//! ```text
//! root = BLAKE3( "ctxcore.chunk.v1"            16 bytes of ASCII, no terminator
//!              || u32 LE  len(namespace)       byte length of the UTF-8 namespace
//!              || namespace                    UTF-8 bytes )
//! h_0  = BLAKE3( root     || u32 LE n_0 || t_0 as u32 LE || ... || t_{n_0 - 1} as u32 LE )
//! h_i  = BLAKE3( h_{i-1}  || u32 LE n_i || the n_i tokens of chunk i, each as u32 LE )
//! ```
//!
//! where `n_i` is the number of tokens of chunk `i` (`chunk_size`, or less for the last one).
//! The token count makes a partial chunk's hash differ from that of any full chunk, and the
//! chunk boundaries (hence `chunk_size`) are part of what is hashed: hashes are comparable
//! only between sequences chunked with the same `chunk_size`. An empty sequence has no chunks.
//! The hashes depend on nothing else (no per-process seed, no platform word size or
//! endianness), so they are stable across processes, machines and versions; a change to this
//! format must change the `v1` domain tag.

use crate::error::{Error, Result};

/// Domain tag that starts the root hash; names the version of the format above.
pub const HASH_DOMAIN: &[u8; 16] = b"ctxcore.chunk.v1";

/// A 32-byte BLAKE3 chunk hash.
pub type ChunkHash = [u8; 32];

/// One chunk of a token sequence: tokens `start..end` (end exclusive) and its chained hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Chunk {
    /// Index of the first token of the chunk.
    pub start: usize,
    /// One past the index of the last token of the chunk.
    pub end: usize,
    /// Chained hash of tokens `0..end` (see the module docs for the exact format).
    pub hash: ChunkHash,
}

impl Chunk {
    /// Number of tokens in the chunk (0 if a hand-built chunk has `end < start`).
    pub fn len(&self) -> usize {
        self.end.saturating_sub(self.start)
    }

    /// Whether the chunk has no tokens (never true for chunks made by [`chunk_tokens`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the chunk holds exactly `chunk_size` tokens (only the last one may not).
    pub fn is_full(&self, chunk_size: usize) -> bool {
        self.len() == chunk_size
    }

    /// The hash as 64 lowercase hex digits.
    pub fn hash_hex(&self) -> String {
        to_hex(&self.hash)
    }
}

/// Lowercase hex of a hash (64 digits).
pub fn to_hex(hash: &ChunkHash) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in hash {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

/// Parse 64 hex digits (either case) back into a hash, the inverse of [`to_hex`].
///
/// Errors with [`Error::Config`] if `s` is not exactly 64 hex digits.
pub fn from_hex(s: &str) -> Result<ChunkHash> {
    let bad = || Error::config(format!("a chunk hash is 64 hex digits, got {s:?}"));
    let b = s.as_bytes();
    if b.len() != 64 {
        return Err(bad());
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(b.chunks_exact(2)) {
        *o = (nibble(pair[0]).ok_or_else(bad)? << 4) | nibble(pair[1]).ok_or_else(bad)?;
    }
    Ok(out)
}

fn len_u32(what: &str, n: usize) -> Result<u32> {
    u32::try_from(n)
        .map_err(|_| Error::config(format!("{what} must be at most {}, got {n}", u32::MAX)))
}

/// The root of the hash chain for `namespace` (e.g. a model id).
///
/// Errors with [`Error::Config`] if the namespace is longer than `u32::MAX` bytes.
pub fn root_hash(namespace: &str) -> Result<ChunkHash> {
    let len = len_u32("namespace length in bytes", namespace.len())?;
    let mut h = blake3::Hasher::new();
    h.update(HASH_DOMAIN);
    h.update(&len.to_le_bytes());
    h.update(namespace.as_bytes());
    Ok(*h.finalize().as_bytes())
}

/// The hash of a chunk holding `tokens`, following the chunk whose hash is `prev` (or the
/// [`root_hash`] for the first chunk). Lets a caller extend a chain as tokens arrive.
///
/// Errors with [`Error::Config`] if `tokens` has more than `u32::MAX` elements.
pub fn chain_hash(prev: &ChunkHash, tokens: &[u32]) -> Result<ChunkHash> {
    len_u32("chunk length in tokens", tokens.len())?;
    Ok(chain_hash_unchecked(prev, tokens))
}

/// [`chain_hash`] for `tokens.len() <= u32::MAX` (checked by the callers).
fn chain_hash_unchecked(prev: &ChunkHash, tokens: &[u32]) -> ChunkHash {
    // Tokens are serialized through a small stack buffer so the byte format is explicit
    // little-endian on every platform.
    const BATCH: usize = 256;
    let mut h = blake3::Hasher::new();
    h.update(prev);
    h.update(&(tokens.len() as u32).to_le_bytes());
    let mut buf = [0u8; 4 * BATCH];
    for batch in tokens.chunks(BATCH) {
        for (dst, t) in buf.chunks_exact_mut(4).zip(batch) {
            dst.copy_from_slice(&t.to_le_bytes());
        }
        h.update(&buf[..4 * batch.len()]);
    }
    *h.finalize().as_bytes()
}

/// Cut `tokens` into chunks of `chunk_size` tokens (the last one may be shorter), each with
/// the chained hash of all tokens up to its end, rooted at [`root_hash`]`(namespace)`.
///
/// The chunks of a prefix of `tokens` equal the leading chunks of `tokens`, except that the
/// prefix's last chunk differs when it is partial. An empty `tokens` gives no chunks.
///
/// Errors with [`Error::Config`] if `chunk_size` is 0 or above `u32::MAX`, or the namespace is
/// longer than `u32::MAX` bytes.
pub fn chunk_tokens(tokens: &[u32], chunk_size: usize, namespace: &str) -> Result<Vec<Chunk>> {
    if chunk_size == 0 {
        return Err(Error::config(
            "chunk_size must be >= 1 (use the page size of the KV store), got 0",
        ));
    }
    len_u32("chunk_size", chunk_size)?;
    let mut prev = root_hash(namespace)?;
    let mut out = Vec::with_capacity(tokens.len().div_ceil(chunk_size));
    for (i, toks) in tokens.chunks(chunk_size).enumerate() {
        prev = chain_hash_unchecked(&prev, toks);
        let start = i * chunk_size;
        out.push(Chunk {
            start,
            end: start + toks.len(),
            hash: prev,
        });
    }
    Ok(out)
}

/// Number of tokens covered by the longest run of leading chunks whose hashes are `known`,
/// i.e. how much of a new prompt a cache already holds. 0 if the first chunk is unknown.
///
/// Because each hash covers all tokens before it, a known hash of chunk `i` means the whole
/// prefix `0..end_i` was saved; the run stops at the first unknown chunk so that a cache that
/// evicted a middle chunk is not reported as holding what follows it.
pub fn matching_prefix(chunks: &[Chunk], known: impl Fn(&ChunkHash) -> bool) -> usize {
    chunks
        .iter()
        .take_while(|c| known(&c.hash))
        .last()
        .map_or(0, |c| c.end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn tokens(n: usize) -> Vec<u32> {
        (0..n as u32)
            .map(|i| i.wrapping_mul(2_654_435_761) >> 7)
            .collect()
    }

    #[test]
    fn golden_vector() {
        // Computed once from the format in the module docs; a change here breaks every saved
        // context, so it must come with a new domain tag.
        let chunks = chunk_tokens(&[1, 2, 3, 4, 5], 2, "test-model").unwrap();
        let got: Vec<(usize, usize, String)> = chunks
            .iter()
            .map(|c| (c.start, c.end, c.hash_hex()))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 2, GOLDEN[0].to_string()),
                (2, 4, GOLDEN[1].to_string()),
                (4, 5, GOLDEN[2].to_string()),
            ]
        );
        assert_eq!(to_hex(&root_hash("").unwrap()), GOLDEN_ROOT_EMPTY);
    }

    // Cross-checked against an independent BLAKE3 implementation (the `blake3` PyPI package)
    // fed the bytes of the documented format.
    const GOLDEN: [&str; 3] = [
        "a04a94ad984d80486d83e5b6d3e5bf9a9d8fc81db2818dce66ebdb43e31cc0d4",
        "9c3d15b72c4125b51cb985b64f55238be00959a21c6f367189352ac4d0d54ae0",
        "d65287ecb8b613ca23a45aec5379bafae2d4b52254c02fa334c2f57662cb3b1e",
    ];
    const GOLDEN_ROOT_EMPTY: &str =
        "a56b036360f05f0113e466329c34df76d2af11a1d435b9b91a65b4709c85d222";

    #[test]
    fn hash_matches_the_documented_byte_format() {
        let mut root_bytes = b"ctxcore.chunk.v1".to_vec();
        root_bytes.extend_from_slice(&3u32.to_le_bytes());
        root_bytes.extend_from_slice(b"abc");
        let root = *blake3::hash(&root_bytes).as_bytes();
        assert_eq!(root_hash("abc").unwrap(), root);
        let toks = tokens(700);
        let mut prev = root;
        let chunks = chunk_tokens(&toks, 300, "abc").unwrap();
        for (c, t) in chunks.iter().zip(toks.chunks(300)) {
            let mut b = prev.to_vec();
            b.extend_from_slice(&(t.len() as u32).to_le_bytes());
            for x in t {
                b.extend_from_slice(&x.to_le_bytes());
            }
            prev = *blake3::hash(&b).as_bytes();
            assert_eq!(c.hash, prev);
        }
        // chain_hash extends a chain exactly like chunk_tokens does.
        let h0 = chain_hash(&root, &toks[..300]).unwrap();
        assert_eq!(chain_hash(&h0, &toks[300..600]).unwrap(), chunks[1].hash);
    }

    #[test]
    fn hex_round_trip() {
        let h = chunk_tokens(&[7, 8, 9], 2, "x").unwrap()[1].hash;
        assert_eq!(from_hex(&to_hex(&h)).unwrap(), h);
        assert_eq!(from_hex(&to_hex(&h).to_uppercase()).unwrap(), h);
        for bad in [
            "",
            "abc",
            &"g".repeat(64),
            &"0".repeat(63),
            &"0".repeat(65),
            &"é".repeat(32),
        ] {
            assert!(matches!(from_hex(bad), Err(Error::Config(_))), "{bad:?}");
        }
    }

    #[test]
    fn boundaries() {
        for n in [0, 1, 15, 16, 17, 32, 33] {
            let chunks = chunk_tokens(&tokens(n), 16, "").unwrap();
            assert_eq!(chunks.len(), n.div_ceil(16));
            let mut next = 0;
            for (i, c) in chunks.iter().enumerate() {
                assert_eq!(c.start, next);
                assert!(!c.is_empty());
                assert_eq!(c.is_full(16), i + 1 < chunks.len() || n % 16 == 0);
                next = c.end;
            }
            assert_eq!(next, n);
        }
    }

    #[test]
    fn prefix_property() {
        let toks = tokens(100);
        let full = chunk_tokens(&toks, 8, "m").unwrap();
        for p in 0..=100 {
            let pre = chunk_tokens(&toks[..p], 8, "m").unwrap();
            let nfull = p / 8;
            assert_eq!(pre[..nfull], full[..nfull]);
            if p % 8 != 0 && full[nfull].is_full(8) {
                // A partial chunk covers fewer tokens of the full chunk and hashes differently.
                let last = pre.last().unwrap();
                assert_eq!(last.start, full[nfull].start);
                assert_ne!(last.hash, full[nfull].hash);
            }
        }
    }

    #[test]
    fn namespace_and_content_sensitivity() {
        let toks = tokens(40);
        let a = chunk_tokens(&toks, 10, "model-a").unwrap();
        let b = chunk_tokens(&toks, 10, "model-b").unwrap();
        assert!(a.iter().zip(&b).all(|(x, y)| x.hash != y.hash));
        // Changing one token changes the hash of its chunk and of every later chunk.
        let mut t2 = toks.clone();
        t2[25] ^= 1;
        let c = chunk_tokens(&t2, 10, "model-a").unwrap();
        assert_eq!(a[..2], c[..2]);
        assert!(a[2..].iter().zip(&c[2..]).all(|(x, y)| x.hash != y.hash));
        // The namespace length prefix keeps ("ab", tokens) apart from ("a", ...) etc.
        assert_ne!(root_hash("ab").unwrap(), root_hash("a").unwrap());
        assert_ne!(root_hash("").unwrap(), root_hash("\0").unwrap());
    }

    #[test]
    fn chunk_size_is_part_of_the_hash() {
        let toks = tokens(12);
        let a = chunk_tokens(&toks, 4, "").unwrap();
        let b = chunk_tokens(&toks, 6, "").unwrap();
        assert_ne!(a[2].hash, b[1].hash);
    }

    #[test]
    fn zero_chunk_size_is_a_config_error() {
        let e = chunk_tokens(&[1, 2, 3], 0, "").unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{e:?}");
        assert!(e.to_string().contains("chunk_size"));
        assert!(matches!(
            chunk_tokens(&[], 0, "").unwrap_err(),
            Error::Config(_)
        ));
    }

    #[test]
    fn matching_prefix_counts_leading_known_chunks() {
        let toks = tokens(50);
        let saved = chunk_tokens(&toks[..35], 10, "m").unwrap();
        let known: HashSet<ChunkHash> = saved.iter().map(|c| c.hash).collect();
        let new = chunk_tokens(&toks, 10, "m").unwrap();
        // Chunks 0..3 are full and shared; the saved partial chunk 30..35 is not chunk 30..40.
        assert_eq!(matching_prefix(&new, |h| known.contains(h)), 30);
        assert_eq!(matching_prefix(&saved, |h| known.contains(h)), 35);
        assert_eq!(matching_prefix(&new, |_| false), 0);
        assert_eq!(matching_prefix(&[], |_| true), 0);
        // Stops at the first unknown chunk even if later ones are known.
        let evicted = new[1].hash;
        assert_eq!(
            matching_prefix(&new, |h| *h != evicted && known.contains(h)),
            10
        );
        let other = chunk_tokens(&toks, 10, "other").unwrap();
        assert_eq!(matching_prefix(&other, |h| known.contains(h)), 0);
    }
}
