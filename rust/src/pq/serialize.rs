//! Versioned, checksummed byte format of a [`ProductQuantizer`].
//!
//! ```text
//! offset  size  field
//! 0       8     magic b"CTXCPQ\0\0"
//! 8       4     format version (u32 LE)
//! 12      4     dim (u32 LE)
//! 16      4     m (u32 LE)
//! 20      4     nbits (u32 LE)
//! 24      1     trained flag (0 or 1)
//! 25      7     reserved, zero
//! 32      8     payload length in bytes (u64 LE) = 4 * m * ksub * dsub if trained, else 0
//! 40      ...   centroids, f32 LE, Layout (m, ksub, dsub)
//! end-4   4     CRC-32 (IEEE) of every preceding byte (u32 LE)
//! ```

use super::ProductQuantizer;
use crate::error::{Error, Result};

/// Magic bytes at the start of a serialized quantizer.
pub const MAGIC: &[u8; 8] = b"CTXCPQ\0\0";
/// Current (and only readable) format version.
pub const FORMAT_VERSION: u32 = 1;
const HEADER: usize = 40;
const WHAT: &str = "ProductQuantizer bytes";

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

impl ProductQuantizer {
    /// Serialize configuration and codebooks (see the module docs for the layout).
    pub fn to_bytes(&self) -> Vec<u8> {
        let cents = self.centroids().unwrap_or_default();
        let mut out = Vec::with_capacity(HEADER + 4 * cents.len() + 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.dim() as u32).to_le_bytes());
        out.extend_from_slice(&(self.m() as u32).to_le_bytes());
        out.extend_from_slice(&self.nbits().to_le_bytes());
        out.push(self.is_trained() as u8);
        out.extend_from_slice(&[0u8; 7]);
        out.extend_from_slice(&((4 * cents.len()) as u64).to_le_bytes());
        for v in cents.iter() {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parse bytes written by [`ProductQuantizer::to_bytes`], verifying magic, version, sizes
    /// and checksum.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        if b.len() < HEADER + 4 {
            return Err(Error::corrupt(
                WHAT,
                format!(
                    "truncated: {} bytes, the header alone needs {}",
                    b.len(),
                    HEADER + 4
                ),
            ));
        }
        if &b[..8] != MAGIC {
            return Err(Error::corrupt(
                WHAT,
                "bad magic: this is not a serialized ctxcore ProductQuantizer",
            ));
        }
        let version = u32_at(b, 8);
        if version != FORMAT_VERSION {
            return Err(Error::Version {
                what: WHAT.into(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let payload = u64::from_le_bytes(b[32..40].try_into().expect("8 bytes"));
        let expected_len = (HEADER as u64)
            .checked_add(payload)
            .and_then(|v| v.checked_add(4));
        if expected_len != Some(b.len() as u64) {
            return Err(Error::corrupt(
                WHAT,
                format!(
                    "length mismatch: header says {} payload bytes, total should be {:?}, got {}",
                    payload,
                    expected_len,
                    b.len()
                ),
            ));
        }
        let body = &b[..b.len() - 4];
        let stored = u32_at(b, b.len() - 4);
        let actual = crc32fast::hash(body);
        if stored != actual {
            return Err(Error::corrupt(
                WHAT,
                format!("checksum mismatch (stored {stored:#010x}, computed {actual:#010x})"),
            ));
        }
        let (dim, m, nbits, trained) = (
            u32_at(b, 12) as usize,
            u32_at(b, 16) as usize,
            u32_at(b, 20),
            b[24],
        );
        let pq = ProductQuantizer::new(dim, m, nbits)
            .map_err(|e| Error::corrupt(WHAT, format!("invalid configuration: {e}")))?;
        match trained {
            0 if payload == 0 => Ok(pq),
            1 => {
                let want = 4 * (m * pq.ksub() * pq.dsub()) as u64;
                if payload != want {
                    return Err(Error::corrupt(
                        WHAT,
                        format!("payload has {payload} bytes, codebooks need {want}"),
                    ));
                }
                let cents: Vec<f32> = body[HEADER..]
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .collect();
                ProductQuantizer::with_centroids(dim, m, nbits, cents)
                    .map_err(|e| Error::corrupt(WHAT, e.to_string()))
            }
            _ => Err(Error::corrupt(
                WHAT,
                format!("invalid trained flag {trained} for payload of {payload} bytes"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn round_trip_and_every_corruption_is_caught() {
        let mut r = SplitMix64::new(0, 0);
        let x: Vec<f32> = (0..300 * 8).map(|_| r.next_f64() as f32).collect();
        let mut pq = ProductQuantizer::new(8, 4, 4).unwrap();
        let untrained = ProductQuantizer::from_bytes(&pq.to_bytes()).unwrap();
        assert!(!untrained.is_trained());
        pq.train(&x, 4, 1).unwrap();
        let b = pq.to_bytes();
        let back = ProductQuantizer::from_bytes(&b).unwrap();
        assert_eq!(back.centroids(), pq.centroids());
        for cut in [0, 10, HEADER, b.len() - 1] {
            assert!(ProductQuantizer::from_bytes(&b[..cut]).is_err());
        }
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x10;
            assert!(
                ProductQuantizer::from_bytes(&c).is_err(),
                "flip at byte {i} not detected"
            );
        }
        let mut v = b.clone();
        v[8] = 9;
        assert!(matches!(
            ProductQuantizer::from_bytes(&v),
            Err(Error::Version { found: 9, .. })
        ));
    }
}
