//! Product quantization: the codec that compresses KV vectors.
//!
//! A vector of `dim` floats is split into `m` sub-vectors of `dsub = dim / m` floats; each
//! sub-vector is replaced by the index of its nearest centroid in a per-subspace codebook of
//! `ksub = 2^nbits` centroids. Codes are stored as bytes, Layout `(n, code_bytes)`: with
//! `nbits = 8` byte `j` is subquantizer `j`; with `nbits = 4` subquantizer `j` is in byte
//! `j / 2`, low nibble for even `j`, high nibble for odd `j` (the same packing as faiss).
//!
//! Scoring never decompresses: a query is turned into lookup tables (one `ksub`-entry table per
//! subspace) and a code's score is the sum of `m` table entries (asymmetric distance
//! computation). 4-bit tables are folded pairwise into 256-entry byte tables so 4-bit and 8-bit
//! codes share one scan that does one lookup per code byte.

pub mod fastscan;
pub(crate) mod kernels;
mod kmeans;
mod serialize;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::rng::SplitMix64;
use kernels::{ip_table, l2_table, nearest_rows, pair_tables_4bit, scan_bytes};

pub use serialize::FORMAT_VERSION;

/// Rows handled per parallel task in encode / decode / scan.
const BLOCK: usize = 1024;
/// Training uses at most this many vectors per centroid (sampled deterministically), like faiss.
pub const MAX_POINTS_PER_CENTROID: usize = 256;

/// Similarity used to build lookup tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// `q . y`
    InnerProduct,
    /// `||q - y||^2`
    L2,
}

/// A product quantizer: configuration plus (once trained) its codebooks.
#[derive(Clone, Debug)]
pub struct ProductQuantizer {
    dim: usize,
    m: usize,
    nbits: u32,
    trained: Option<Codebooks>,
}

/// Trained codebooks in the layouts the kernels need.
#[derive(Clone, Debug)]
struct Codebooks {
    /// Layout: `(m, ksub, dsub)`: float32, or float16 in a compact quantizer
    /// ([`ProductQuantizer::compact`]).
    centroids: Centroids,
    /// Layout: `(m, ksub)` — squared norms of the centroids; empty for 1-dim subspaces, which
    /// encode by comparisons, and in compact quantizers, which compute them per encode call
    /// (see [`Codebooks::norms`]). (Nothing else derived is kept: the search scales the input
    /// by -2 instead of keeping `-2 * centroids`, and lookup tables transpose the centroids per
    /// call, so a store of many quantizers holds little beyond the centroids; see
    /// [`ProductQuantizer::held_bytes`].)
    norms: Vec<f32>,
    /// One-dimensional subspaces (`dsub = 1`): nearest-centroid search by comparisons with
    /// the midpoints between sorted centroid values.
    scalar: Option<ScalarCodes>,
}

/// Centroid storage: float32, or float16 where many quantizers are held (a KV store's, one
/// per layer, KV head and side). float16 keeps 11 significant bits, far below the
/// quantization error of the codes; every computation reads them as float32.
#[derive(Clone, Debug)]
enum Centroids {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
}

impl Centroids {
    /// The centroids as float32 (borrowed, or converted when held in float16).
    fn f32s(&self) -> std::borrow::Cow<'_, [f32]> {
        match self {
            Centroids::F32(c) => std::borrow::Cow::Borrowed(c),
            Centroids::F16(_) => {
                let mut out = Vec::new();
                self.extend_f32(&mut out);
                std::borrow::Cow::Owned(out)
            }
        }
    }

    /// Append the centroids as float32 to `out`.
    fn extend_f32(&self, out: &mut Vec<f32>) {
        match self {
            Centroids::F32(c) => out.extend_from_slice(c),
            Centroids::F16(c) => {
                let at = out.len();
                out.resize(at + c.len(), 0.0);
                crate::simd::f16_to_f32(c, &mut out[at..]);
            }
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Centroids::F32(c) => 4 * c.len(),
            Centroids::F16(c) => 2 * c.len(),
        }
    }
}

/// Encoding tables of a product quantizer whose subspaces are single dimensions: a value's
/// nearest centroid is the one whose rank among the sorted centroid values equals the number
/// of midpoints below the value.
#[derive(Clone, Debug)]
struct ScalarCodes {
    /// Midpoints between consecutive sorted centroid values, Layout `(ksub - 1, m)` (one
    /// contiguous row per rank: the comparisons vectorize over the subspaces of a vector).
    mids: Vec<f32>,
    /// Centroid index of each rank, Layout `(m, ksub)`.
    order: Vec<u8>,
}

impl ScalarCodes {
    fn new(centroids: &[f32], m: usize, ksub: usize) -> Self {
        let mut mids = vec![0f32; (ksub - 1) * m];
        let mut order = vec![0u8; m * ksub];
        for j in 0..m {
            let c = &centroids[j * ksub..(j + 1) * ksub];
            let mut idx: Vec<usize> = (0..ksub).collect();
            idx.sort_by(|&a, &b| c[a].total_cmp(&c[b]).then(a.cmp(&b)));
            for (r, &i) in idx.iter().enumerate() {
                order[j * ksub + r] = i as u8;
            }
            for r in 0..ksub - 1 {
                mids[r * m + j] = 0.5 * (c[idx[r]] + c[idx[r + 1]]);
            }
        }
        ScalarCodes { mids, order }
    }

    /// Codes of `n` rows of `x` (Layout `(n, m)`) into `codes` (`(n, cb)`).
    #[inline(always)]
    fn encode(&self, x: &[f32], codes: &mut [u8], m: usize, ksub: usize, nbits: u32) {
        let cb = if nbits == 8 { m } else { m.div_ceil(2) };
        let mut rank = vec![0u8; m];
        for (row, out) in x.chunks_exact(m).zip(codes.chunks_exact_mut(cb)) {
            rank.fill(0);
            for mid in self.mids.chunks_exact(m) {
                for ((r, &v), &b) in rank.iter_mut().zip(row).zip(mid) {
                    *r += (v > b) as u8;
                }
            }
            if nbits == 8 {
                for (j, (o, &r)) in out.iter_mut().zip(&rank).enumerate() {
                    *o = self.order[j * ksub + r as usize];
                }
            } else {
                for (bi, o) in out.iter_mut().enumerate() {
                    let lo = self.order[2 * bi * ksub + rank[2 * bi] as usize];
                    let hi = if 2 * bi + 1 < m {
                        self.order[(2 * bi + 1) * ksub + rank[2 * bi + 1] as usize]
                    } else {
                        0
                    };
                    *o = lo | (hi << 4);
                }
            }
        }
    }
}

impl Codebooks {
    fn new(centroids: Vec<f32>, m: usize, ksub: usize, dsub: usize) -> Self {
        debug_assert_eq!(centroids.len(), m * ksub * dsub);
        // 1-dim subspaces encode by comparisons (`scalar`) and need no norms.
        let norms = if dsub == 1 {
            Vec::new()
        } else {
            squared_norms(&centroids, dsub)
        };
        let scalar = (dsub == 1).then(|| ScalarCodes::new(&centroids, m, ksub));
        Codebooks {
            centroids: Centroids::F32(centroids),
            norms,
            scalar,
        }
    }

    /// The same codebooks held compactly: centroids rounded to float16 (the encoding tables
    /// rebuilt from the rounded values, so codes stay nearest-centroid codes), no norms.
    fn compact(&self, m: usize, ksub: usize, dsub: usize) -> Self {
        if let Centroids::F16(_) = self.centroids {
            return self.clone();
        }
        let half: Vec<half::f16> = self
            .centroids
            .f32s()
            .iter()
            .map(|&v| half::f16::from_f32(v))
            .collect();
        let rounded: Vec<f32> = half.iter().map(|v| v.to_f32()).collect();
        let scalar = (dsub == 1).then(|| ScalarCodes::new(&rounded, m, ksub));
        Codebooks {
            centroids: Centroids::F16(half),
            norms: Vec::new(),
            scalar,
        }
    }

    /// The centroids' squared norms, Layout `(m, ksub)`: held, or computed from `cents`
    /// (the centroids as float32, see [`Centroids::f32s`]).
    fn norms<'a>(&'a self, cents: &[f32], dsub: usize) -> std::borrow::Cow<'a, [f32]> {
        if self.norms.is_empty() {
            return std::borrow::Cow::Owned(squared_norms(cents, dsub));
        }
        std::borrow::Cow::Borrowed(&self.norms)
    }

    fn bytes(&self) -> usize {
        self.centroids.bytes()
            + 4 * self.norms.len()
            + self
                .scalar
                .as_ref()
                .map_or(0, |s| 4 * s.mids.len() + s.order.len())
    }
}

/// Squared norm of every `dsub`-float centroid.
fn squared_norms(centroids: &[f32], dsub: usize) -> Vec<f32> {
    let mut out = vec![0f32; centroids.len() / dsub];
    squared_norms_into(centroids, dsub, &mut out);
    out
}

/// [`squared_norms`] into `out` (`centroids.len() / dsub` values): the squares summed left to
/// right, with the common widths unrolled (a compact quantizer computes them per encode).
#[inline(always)]
fn squared_norms_into(centroids: &[f32], dsub: usize, out: &mut [f32]) {
    #[inline(always)]
    fn sum_sq(c: &[f32]) -> f32 {
        let mut s = c[0] * c[0];
        for v in &c[1..] {
            s += v * v;
        }
        s
    }
    /// A constant width: unrolled and vectorized.
    #[inline(always)]
    fn fixed<const N: usize>(centroids: &[f32], out: &mut [f32]) {
        for (o, c) in out.iter_mut().zip(centroids.chunks_exact(N)) {
            *o = sum_sq(&c[..N]);
        }
    }
    match dsub {
        1 => fixed::<1>(centroids, out),
        2 => fixed::<2>(centroids, out),
        4 => fixed::<4>(centroids, out),
        8 => fixed::<8>(centroids, out),
        _ => {
            for (o, c) in out.iter_mut().zip(centroids.chunks_exact(dsub)) {
                *o = sum_sq(c);
            }
        }
    }
}

impl ProductQuantizer {
    /// Check the configuration: `dim > 0`, `1 <= m <= dim`, `dim % m == 0`, `nbits` in {4, 8}.
    pub fn new(dim: usize, m: usize, nbits: u32) -> Result<Self> {
        if dim == 0 {
            return Err(Error::config("dim must be positive"));
        }
        if m == 0 || m > dim {
            return Err(Error::config(format!(
                "m must be between 1 and dim={dim}, got m={m}"
            )));
        }
        if !dim.is_multiple_of(m) {
            let divisors: Vec<String> = (1..=dim)
                .filter(|d| dim.is_multiple_of(*d))
                .map(|d| d.to_string())
                .collect();
            return Err(Error::config(format!(
                "dim={dim} is not divisible by m={m}; choose m among the divisors of dim: {}",
                divisors.join(", ")
            )));
        }
        if nbits != 4 && nbits != 8 {
            return Err(Error::config(format!("nbits must be 4 or 8, got {nbits}")));
        }
        Ok(ProductQuantizer {
            dim,
            m,
            nbits,
            trained: None,
        })
    }

    /// Vector dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }
    /// Number of subquantizers.
    pub fn m(&self) -> usize {
        self.m
    }
    /// Bits per subquantizer code (4 or 8).
    pub fn nbits(&self) -> u32 {
        self.nbits
    }
    /// Dimensions per subspace (`dim / m`).
    pub fn dsub(&self) -> usize {
        self.dim / self.m
    }
    /// Centroids per subspace (`2^nbits`).
    pub fn ksub(&self) -> usize {
        1 << self.nbits
    }
    /// Bytes per encoded vector (`ceil(m * nbits / 8)`).
    pub fn code_bytes(&self) -> usize {
        code_bytes(self.m, self.nbits)
    }
    /// [`ProductQuantizer::held_bytes`] of a trained quantizer of this shape (`dim % m == 0`),
    /// compact ([`ProductQuantizer::compact`]) or not.
    pub fn held_bytes_for(dim: usize, m: usize, nbits: u32, compact: bool) -> usize {
        let ksub = 1usize << nbits;
        let cent = if compact { 2 } else { 4 } * ksub * dim;
        if dim == m {
            // Centroids, midpoints (float32) and rank bytes; no norms.
            return cent + 4 * (ksub - 1) * m + m * ksub;
        }
        cent + if compact { 0 } else { 4 * m * ksub }
    }

    /// Bytes the trained codebooks hold in memory (centroids; their norms, or for 1-dim
    /// subspaces, the sorted midpoints that encode by comparison); 0 untrained.
    pub fn held_bytes(&self) -> usize {
        self.trained.as_ref().map_or(0, Codebooks::bytes)
    }

    /// The same quantizer holding its codebooks compactly: centroids in float16 (computations
    /// still in float32), squared norms computed per encode call instead of held. About half
    /// the bytes (a third for 8-bit codes over 2 dims); codes and scores differ from the
    /// float32 quantizer's only by the centroids' float16 rounding (2^-11 relative). A KV store
    /// holds its codebooks this way. Untrained quantizers are returned as they are.
    pub fn compact(&self) -> ProductQuantizer {
        let trained = self
            .trained
            .as_ref()
            .map(|b| b.compact(self.m, self.ksub(), self.dsub()));
        ProductQuantizer { trained, ..*self }
    }

    /// The same quantizer with float32 centroids and held norms: a compact quantizer converted
    /// once (the same codes and scores as the compact one: the same float32 values and norms),
    /// for many encode calls in a row. Others are returned as they are.
    pub fn expanded(&self) -> ProductQuantizer {
        let trained = self.trained.as_ref().map(|b| match &b.centroids {
            Centroids::F32(_) => b.clone(),
            Centroids::F16(_) => {
                let c = b.centroids.f32s().into_owned();
                let norms = match b.scalar {
                    Some(_) => Vec::new(),
                    None => squared_norms(&c, self.dsub()),
                };
                Codebooks {
                    centroids: Centroids::F32(c),
                    norms,
                    scalar: b.scalar.clone(),
                }
            }
        });
        ProductQuantizer { trained, ..*self }
    }

    /// Whether the codebooks are held compactly (see [`ProductQuantizer::compact`]).
    pub fn is_compact(&self) -> bool {
        matches!(
            self.trained.as_ref().map(|b| &b.centroids),
            Some(Centroids::F16(_))
        )
    }

    /// Whether codebooks are trained.
    pub fn is_trained(&self) -> bool {
        self.trained.is_some()
    }
    /// Centroids as float32, Layout `(m, ksub, dsub)`, if trained (a converted copy for a
    /// compact quantizer).
    pub fn centroids(&self) -> Option<std::borrow::Cow<'_, [f32]>> {
        self.trained.as_ref().map(|c| c.centroids.f32s())
    }

    /// Append the centroids as float32, Layout `(m, ksub, dsub)`, to `out` (converted in
    /// place for a compact quantizer); nothing if untrained.
    pub fn extend_centroids(&self, out: &mut Vec<f32>) {
        if let Some(b) = &self.trained {
            b.centroids.extend_f32(out);
        }
    }

    fn books(&self, what: &'static str) -> Result<&Codebooks> {
        self.trained.as_ref().ok_or(Error::NotTrained { what })
    }

    /// Build a trained quantizer from given centroids, Layout `(m, ksub, dsub)`.
    pub fn with_centroids(dim: usize, m: usize, nbits: u32, centroids: Vec<f32>) -> Result<Self> {
        let mut pq = Self::new(dim, m, nbits)?;
        let expected = m * pq.ksub() * pq.dsub();
        if centroids.len() != expected {
            return Err(Error::shape(
                "centroids",
                format!("[{m}, {}, {}] ({expected} values)", pq.ksub(), pq.dsub()),
                format!("{} values", centroids.len()),
            ));
        }
        if let Some(i) = centroids.iter().position(|v| !v.is_finite()) {
            let row = i / pq.dsub();
            return Err(Error::NonFinite {
                what: "centroids".into(),
                row,
                col: i % pq.dsub(),
                value: centroids[i],
            });
        }
        pq.trained = Some(Codebooks::new(centroids, m, pq.ksub(), pq.dsub()));
        Ok(pq)
    }

    /// Number of rows in `x` (`[n, dim]` row-major), checking the width.
    fn rows(&self, what: &str, x: &[f32]) -> Result<usize> {
        if !x.len().is_multiple_of(self.dim) {
            return Err(Error::shape(
                what,
                format!("[n, {}]", self.dim),
                format!("{} values (not a multiple of {})", x.len(), self.dim),
            ));
        }
        Ok(x.len() / self.dim)
    }

    /// Train codebooks on `x`, Layout `(n, dim)`, with `iters` Lloyd iterations per subspace.
    ///
    /// Needs `n >= 2^nbits` finite vectors. Subspaces train in parallel; the result depends only
    /// on `x`, `iters` and `seed` (not on the thread count). When `n` exceeds
    /// [`MAX_POINTS_PER_CENTROID`]` * ksub` (64x that for one-dimensional subspaces, which
    /// train from a histogram in O(n); see `kmeans_1d`), a deterministic random subset of that
    /// size is used.
    pub fn train(&mut self, x: &[f32], iters: usize, seed: u64) -> Result<()> {
        let n = self.rows("train input", x)?;
        let ksub = self.ksub();
        if n < ksub {
            return Err(Error::InsufficientData {
                what: "train",
                got: n,
                needed: ksub,
                reason: format!(
                    "nbits={} needs one vector per centroid; use nbits=4 or more data",
                    self.nbits
                ),
            });
        }
        check_finite("train input", x, self.dim)?;
        let (dim, dsub, m) = (self.dim, self.dsub(), self.m);
        // Deterministic subsample, shared by all subspaces (partial Fisher-Yates).
        // One-dimensional subspaces train by sorting (cheap), on up to 64x as many points.
        let cap = MAX_POINTS_PER_CENTROID * ksub * if dsub == 1 { 64 } else { 1 };
        let rows: Vec<usize> = if n > cap {
            let mut idx: Vec<usize> = (0..n).collect();
            let mut rng = SplitMix64::new(seed, u64::MAX);
            for i in 0..cap {
                let j = i + rng.below(n - i);
                idx.swap(i, j);
            }
            idx.truncate(cap);
            idx.sort_unstable();
            idx
        } else {
            (0..n).collect()
        };
        let nt = rows.len();
        let books: Vec<Vec<f32>> = crate::parallel::install(|| {
            Ok((0..m)
                .into_par_iter()
                .map(|j| {
                    let mut sub = Vec::with_capacity(nt * dsub);
                    for &r in &rows {
                        sub.extend_from_slice(&x[r * dim + j * dsub..r * dim + (j + 1) * dsub]);
                    }
                    if dsub == 1 {
                        return kmeans::kmeans_1d(&sub, ksub, iters);
                    }
                    let mut rng = SplitMix64::new(seed, j as u64);
                    kmeans::kmeans(&sub, nt, dsub, ksub, iters, &mut rng)
                })
                .collect())
        })?;
        let centroids = books.concat();
        self.trained = Some(Codebooks::new(centroids, m, ksub, dsub));
        Ok(())
    }

    /// Encode `x`, Layout `(n, dim)`, into codes, Layout `(n, code_bytes)`.
    pub fn encode(&self, x: &[f32]) -> Result<Vec<u8>> {
        let n = self.rows("encode input", x)?;
        let mut codes = vec![0u8; n * self.code_bytes()];
        self.encode_into(x, &mut codes)?;
        Ok(codes)
    }

    /// Encode into a caller-provided buffer of `n * code_bytes` bytes.
    pub fn encode_into(&self, x: &[f32], codes: &mut [u8]) -> Result<()> {
        let books = self.books("encode")?;
        let n = self.rows("encode input", x)?;
        let cb = self.code_bytes();
        if codes.len() != n * cb {
            return Err(Error::shape(
                "codes buffer",
                format!("[{n}, {cb}]"),
                format!("{} bytes", codes.len()),
            ));
        }
        check_finite("encode input", x, self.dim)?;
        let (dim, m, dsub, ksub, nbits) = (self.dim, self.m, self.dsub(), self.ksub(), self.nbits);
        // Float32 centroids and their norms for the search: held, or for a compact quantizer
        // converted and computed per subspace inside the search (no codebook-sized copies:
        // a decode step encodes a token or two); 1-dim subspaces search by comparisons.
        let search = match (&books.scalar, &books.centroids) {
            (Some(sc), _) => Search::Scalar(sc),
            (None, Centroids::F32(c)) => Search::F32(c, books.norms(c, dsub)),
            (None, Centroids::F16(c)) => Search::F16(c),
        };
        let books = &search;
        if n <= BLOCK {
            // One block: handing it to the pool costs more than encoding it (decode appends
            // encode a token or two per call).
            crate::dispatch!(encode_block(x, codes, books, dim, m, dsub, ksub, nbits));
            return Ok(());
        }
        // On the calling thread's OpenMP team where there is one (see `crate::parallel::map`):
        // a store's appends run between torch ops, whose spinning threads a separate pool's
        // would share the cores with.
        let blocks = crate::parallel::map(n.div_ceil(BLOCK), |b| {
            let rows = b * BLOCK..((b + 1) * BLOCK).min(n);
            let mut c = vec![0u8; rows.len() * cb];
            let xb = &x[rows.start * dim..rows.end * dim];
            crate::dispatch!(encode_block(xb, &mut c, books, dim, m, dsub, ksub, nbits));
            c
        })?;
        for (out, c) in codes.chunks_mut(BLOCK * cb).zip(&blocks) {
            out.copy_from_slice(c);
        }
        Ok(())
    }

    /// Decode codes, Layout `(n, code_bytes)`, into vectors, Layout `(n, dim)`.
    pub fn decode(&self, codes: &[u8]) -> Result<Vec<f32>> {
        let books = self.books("decode")?;
        let n = self.code_rows("codes", codes)?;
        let (dim, m, dsub, ksub, cb) = (
            self.dim,
            self.m,
            self.dsub(),
            self.ksub(),
            self.code_bytes(),
        );
        let four = self.nbits == 4;
        let cents = books.centroids.f32s();
        let mut out = vec![0f32; n * dim];
        crate::parallel::install(|| {
            out.par_chunks_mut(BLOCK * dim)
                .zip(codes.par_chunks(BLOCK * cb))
                .for_each(|(oblk, cblk)| {
                    for (o, c) in oblk.chunks_exact_mut(dim).zip(cblk.chunks_exact(cb)) {
                        for j in 0..m {
                            let k = code_at(c, j, four);
                            let src = &cents[(j * ksub + k) * dsub..(j * ksub + k + 1) * dsub];
                            o[j * dsub..(j + 1) * dsub].copy_from_slice(src);
                        }
                    }
                });
            Ok(())
        })?;
        Ok(out)
    }

    fn code_rows(&self, what: &str, codes: &[u8]) -> Result<usize> {
        let cb = self.code_bytes();
        if !codes.len().is_multiple_of(cb) {
            return Err(Error::shape(
                what,
                format!(
                    "[n, {cb}] (code_bytes for m={}, nbits={})",
                    self.m, self.nbits
                ),
                format!("{} bytes (not a multiple of {cb})", codes.len()),
            ));
        }
        Ok(codes.len() / cb)
    }

    /// Lookup tables of the queries `q`, Layout `(nq, dim)` -> `(nq, m, ksub)`.
    pub fn lookup_tables(&self, q: &[f32], metric: Metric) -> Result<Vec<f32>> {
        let books = self.books("lookup_tables")?;
        let nq = self.rows("queries", q)?;
        check_finite("queries", q, self.dim)?;
        let (dim, m, dsub, ksub) = (self.dim, self.m, self.dsub(), self.ksub());
        let mut out = vec![0f32; nq * m * ksub];
        // The centroids as float32 once, transposed per subspace, Layout (m, dsub, ksub).
        let cents = books.centroids.f32s();
        let norms = books.norms(&cents, dsub);
        let ct = if dsub == 1 {
            cents
        } else {
            std::borrow::Cow::Owned(kernels::transpose_books(&cents, ksub, dsub))
        };
        for (qi, t) in q.chunks_exact(dim).zip(out.chunks_exact_mut(m * ksub)) {
            crate::dispatch!(build_tables(qi, &ct, &norms, m, dsub, ksub, metric, t));
        }
        Ok(out)
    }

    /// Scores of every query against every code: Layout `(nq, n)`.
    ///
    /// `InnerProduct`: `q . decode(code)`; `L2`: `||q - decode(code)||^2`. Computed from lookup
    /// tables, never by decoding.
    pub fn scores(&self, q: &[f32], codes: &[u8], metric: Metric) -> Result<Vec<f32>> {
        let n = self.code_rows("codes", codes)?;
        let luts = self.lookup_tables(q, metric)?;
        let nq = q.len() / self.dim;
        let (m, ksub, cb) = (self.m, self.ksub(), self.code_bytes());
        #[cfg(target_arch = "x86_64")]
        if self.nbits == 4 && metric == Metric::InnerProduct && crate::simd::has_avx512() {
            // Exact float scores on the attention key kernel: one `vpermps` decodes a dimension
            // for 16 codes, shared by every query (no per-query byte tables).
            let cents = self.books("scores")?.centroids.f32s();
            let dsub = self.dsub();
            let mut out = vec![0f32; nq * n];
            par_blocks(codes, cb, nq, &mut out, |c, rows| {
                let len = c.len() / cb;
                let mut s = vec![0f32; nq * len];
                // SAFETY: has_avx512 says the CPU has AVX-512 F/BW/VBMI, AVX2 and FMA; the
                // shapes are the validated ones of this quantizer.
                unsafe {
                    crate::attention::avx512::key_scores(
                        q, 1.0, nq, len, c, cb, m, dsub, &cents, &mut s,
                    )
                };
                for (qi, row) in rows.iter_mut().enumerate() {
                    row.copy_from_slice(&s[qi * len..(qi + 1) * len]);
                }
            })?;
            return Ok(out);
        }
        // Byte tables: one 256-entry table per code byte and query.
        let tables: Vec<[f32; 256]> = if self.nbits == 8 {
            luts.chunks_exact(256)
                .map(|c| {
                    let mut t = [0f32; 256];
                    t.copy_from_slice(c);
                    t
                })
                .collect()
        } else {
            let mut t = vec![[0f32; 256]; nq * cb];
            for (l, o) in luts.chunks_exact(m * ksub).zip(t.chunks_exact_mut(cb)) {
                pair_tables_4bit(l, m, o);
            }
            t
        };
        let mut out = vec![0f32; nq * n];
        par_blocks(codes, cb, nq, &mut out, |c, rows| {
            for (t, row) in tables.chunks_exact(cb).zip(rows.iter_mut()) {
                crate::dispatch!(scan_bytes(t, c, row));
            }
        })?;
        Ok(out)
    }
}

impl ProductQuantizer {
    /// Approximate scores of 4-bit codes with 8-bit quantized tables (see [`fastscan`]).
    ///
    /// Layout `(nq, n)` like [`ProductQuantizer::scores`]; each score is within
    /// `m * max_span / 510` of the exact one, where `max_span` is the largest range of a
    /// subquantizer's lookup table. For 8-bit codes this returns the exact scores.
    pub fn scores_fast(&self, q: &[f32], codes: &[u8], metric: Metric) -> Result<Vec<f32>> {
        if self.nbits != 4 {
            return self.scores(q, codes, metric);
        }
        let n = self.code_rows("codes", codes)?;
        let luts = self.lookup_tables(q, metric)?;
        let nq = q.len() / self.dim;
        let (m, cb) = (self.m, self.code_bytes());
        let qluts: Vec<fastscan::QuantLut> = luts
            .chunks_exact(m * 16)
            .map(|l| fastscan::quantize(l, m))
            .collect();
        let mut out = vec![0f32; nq * n];
        // Each group of 32 codes is transposed once and scored against all queries.
        par_blocks(codes, cb, nq, &mut out, |c, rows| {
            fastscan::scan(&qluts, c, cb, rows)
        })?;
        Ok(out)
    }
}

/// Raw output pointer shared by the block tasks of [`par_blocks`].
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint ranges (see `par_blocks`).
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

/// Score codes in parallel blocks of [`BLOCK`] codes, all queries per block so a block of codes
/// is read from memory once. `out`: Layout `(nq, n)`; `f(codes_block, rows)` gets, per query,
/// the slice of its output row covering the block.
fn par_blocks(
    codes: &[u8],
    cb: usize,
    nq: usize,
    out: &mut [f32],
    f: impl Fn(&[u8], &mut [&mut [f32]]) + Sync + Send,
) -> Result<()> {
    let n = codes.len() / cb;
    if n == 0 || nq == 0 {
        return Ok(());
    }
    if out.len() != nq * n {
        return Err(Error::Internal(format!(
            "output has {} values, expected {nq} x {n}",
            out.len()
        )));
    }
    let ptr = OutPtr(out.as_mut_ptr());
    crate::parallel::install(|| {
        codes.par_chunks(BLOCK * cb).enumerate().for_each(|(b, c)| {
            let p = &ptr;
            let len = c.len() / cb;
            let mut rows: Vec<&mut [f32]> = (0..nq)
                // SAFETY: `out` holds nq * n values and is exclusively borrowed for this call;
                // block b of row qi is [qi * n + b * BLOCK, +len) with b * BLOCK + len <= n, so
                // the slices are in bounds and disjoint across all (block, query) pairs.
                .map(|qi| unsafe {
                    std::slice::from_raw_parts_mut(p.0.add(qi * n + b * BLOCK), len)
                })
                .collect();
            f(c, &mut rows);
        });
        Ok(())
    })
}

#[inline(always)]
fn code_at(c: &[u8], j: usize, four: bool) -> usize {
    if four {
        ((c[j / 2] >> ((j & 1) * 4)) & 15) as usize
    } else {
        c[j] as usize
    }
}

/// What [`encode_block`] searches.
enum Search<'a> {
    /// The comparison tables of 1-dim subspaces.
    Scalar(&'a ScalarCodes),
    /// float32 centroids and their squared norms, Layouts `(m, ksub, dsub)` and `(m, ksub)`.
    F32(&'a [f32], std::borrow::Cow<'a, [f32]>),
    /// A compact quantizer's float16 centroids, converted and normed one subspace at a time.
    F16(&'a [half::f16]),
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn encode_block(
    x: &[f32],
    codes: &mut [u8],
    books: &Search,
    dim: usize,
    m: usize,
    dsub: usize,
    ksub: usize,
    nbits: u32,
) {
    let n = x.len() / dim;
    let cb = codes.len() / n.max(1);
    if let Search::Scalar(sc) = books {
        sc.encode(x, codes, m, ksub, nbits);
        return;
    }
    // The search takes `-2 * centroids` against `x`; `centroids` against `-2 * x` is the same
    // arithmetic (scaling by 2 is exact), without a second copy of every codebook.
    let xm2: Vec<f32> = x.iter().map(|v| -2.0 * v).collect();
    let x = &xm2[..];
    // One subspace of a compact quantizer at a time, as float32 with its norms (the same
    // values, so the same codes, as the float32 quantizer of the rounded centroids).
    let (mut cbuf, mut nbuf) = match books {
        Search::F16(_) => (vec![0f32; ksub * dsub], vec![0f32; ksub]),
        _ => (Vec::new(), Vec::new()),
    };
    let book = ksub * dsub;
    for j in 0..m {
        let (cm2, norms) = match books {
            Search::F32(c, nr) => (&c[j * book..(j + 1) * book], &nr[j * ksub..(j + 1) * ksub]),
            Search::F16(c) => {
                crate::simd::f16_to_f32(&c[j * book..(j + 1) * book], &mut cbuf);
                squared_norms_into(&cbuf, dsub, &mut nbuf);
                (&cbuf[..], &nbuf[..])
            }
            Search::Scalar(_) => unreachable!("handled above"),
        };
        if nbits == 8 {
            nearest_rows(x, n, dim, j * dsub, dsub, cm2, norms, |i, k, _| {
                codes[i * cb + j] = k as u8
            });
        } else if j & 1 == 0 {
            nearest_rows(x, n, dim, j * dsub, dsub, cm2, norms, |i, k, _| {
                codes[i * cb + j / 2] = k as u8
            });
        } else {
            nearest_rows(x, n, dim, j * dsub, dsub, cm2, norms, |i, k, _| {
                codes[i * cb + j / 2] |= (k as u8) << 4
            });
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn build_tables(
    q: &[f32],
    transposed: &[f32],
    norms: &[f32],
    m: usize,
    dsub: usize,
    ksub: usize,
    metric: Metric,
    out: &mut [f32],
) {
    for j in 0..m {
        let qs = &q[j * dsub..(j + 1) * dsub];
        let ct = &transposed[j * ksub * dsub..(j + 1) * ksub * dsub];
        let o = &mut out[j * ksub..(j + 1) * ksub];
        match metric {
            Metric::InnerProduct => ip_table(qs, ct, ksub, o),
            Metric::L2 => l2_table(qs, ct, &norms[j * ksub..(j + 1) * ksub], ksub, o),
        }
    }
}

/// Bytes of one vector's codes: `m` codes of `nbits` bits, packed (4-bit: two per byte).
pub fn code_bytes(m: usize, nbits: u32) -> usize {
    (m * nbits as usize).div_ceil(8)
}

/// Error on the first NaN/Inf in `x` (Layout `(n, dim)`), naming its row and column.
pub fn check_finite(what: &str, x: &[f32], dim: usize) -> Result<()> {
    const CHUNK: usize = 1 << 16;
    // One chunk (a decode step's few tokens) is checked on the calling thread: handing it to the
    // pool costs tens of microseconds, far more than the scan.
    let bad = if x.len() <= CHUNK {
        x.iter().any(|v| !v.is_finite()).then_some(0)
    } else {
        crate::parallel::install(|| {
            Ok(x.par_chunks(CHUNK)
                .position_first(|c| c.iter().any(|v| !v.is_finite())))
        })?
    };
    if let Some(chunk) = bad {
        let base = chunk * CHUNK;
        let off = x[base..].iter().position(|v| !v.is_finite()).unwrap_or(0);
        let i = base + off;
        return Err(Error::NonFinite {
            what: what.into(),
            row: i / dim,
            col: i % dim,
            value: x[i],
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut r = SplitMix64::new(seed, 0);
        (0..n * dim)
            .map(|_| (r.next_f64() as f32 - 0.5) * 4.0)
            .collect()
    }

    #[test]
    fn compact_quantizer_is_the_float16_rounded_one_in_fewer_bytes() {
        // A compact quantizer encodes, decodes and scores exactly like a float32 quantizer
        // built from its float16-rounded centroids, for vector and scalar subspaces.
        let dim = 16;
        for (m, nbits) in [(8, 8), (8, 4), (16, 4), (16, 8), (4, 8)] {
            let mut pq = ProductQuantizer::new(dim, m, nbits).unwrap();
            pq.train(&data(2000, dim, 1), 5, 2).unwrap();
            let small = pq.compact();
            assert!(small.is_compact() && !pq.is_compact());
            let rounded: Vec<f32> = pq
                .centroids()
                .unwrap()
                .iter()
                .map(|&v| half::f16::from_f32(v).to_f32())
                .collect();
            let same = ProductQuantizer::with_centroids(dim, m, nbits, rounded.clone()).unwrap();
            assert_eq!(small.centroids().unwrap().as_ref(), &rounded[..]);
            let x = data(700, dim, 3);
            assert_eq!(
                small.encode(&x).unwrap(),
                same.encode(&x).unwrap(),
                "{m}x{nbits}"
            );
            // One row at a time (a decode step), and expanded back to float32 with norms (what
            // a batched decode step encodes with): the same codes.
            let big = small.expanded();
            assert!(!big.is_compact() && big.held_bytes() == same.held_bytes());
            assert_eq!(big.encode(&x).unwrap(), same.encode(&x).unwrap());
            for row in x.chunks_exact(dim).take(20) {
                let want = same.encode(row).unwrap();
                assert_eq!(small.encode(row).unwrap(), want, "{m}x{nbits}");
                assert_eq!(big.encode(row).unwrap(), want, "{m}x{nbits}");
            }
            let codes = same.encode(&x).unwrap();
            assert_eq!(small.decode(&codes).unwrap(), same.decode(&codes).unwrap());
            let q = data(3, dim, 4);
            for metric in [Metric::InnerProduct, Metric::L2] {
                assert_eq!(
                    small.scores(&q, &codes, metric).unwrap(),
                    same.scores(&q, &codes, metric).unwrap()
                );
            }
            assert_eq!(
                small.held_bytes(),
                ProductQuantizer::held_bytes_for(dim, m, nbits, true)
            );
            assert_eq!(
                pq.held_bytes(),
                ProductQuantizer::held_bytes_for(dim, m, nbits, false)
            );
            assert!(small.held_bytes() < pq.held_bytes());
            // Serialized, a compact quantizer is its float32 values (exact) and loads the same.
            let back = ProductQuantizer::from_bytes(&small.to_bytes()).unwrap();
            assert_eq!(back.encode(&x).unwrap(), same.encode(&x).unwrap());
        }
    }

    #[test]
    fn encoding_one_row_at_a_time_matches_the_batch() {
        for (dim, m, nbits) in [(16, 8, 8), (16, 16, 4), (12, 4, 8), (16, 2, 8)] {
            let x = data(300, dim, 3);
            let mut pq = ProductQuantizer::new(dim, m, nbits).unwrap();
            pq.train(&x, 4, 0).unwrap();
            let all = pq.encode(&x).unwrap();
            let cb = pq.code_bytes();
            for i in [0, 1, 17, 299] {
                let one = pq.encode(&x[i * dim..(i + 1) * dim]).unwrap();
                assert_eq!(
                    one,
                    all[i * cb..(i + 1) * cb],
                    "row {i}, m={m}, nbits={nbits}"
                );
                let two = pq
                    .encode(&x[i.min(298) * dim..(i.min(298) + 2) * dim])
                    .unwrap();
                assert_eq!(two, all[i.min(298) * cb..(i.min(298) + 2) * cb]);
            }
        }
    }

    #[test]
    fn config_errors() {
        assert!(matches!(
            ProductQuantizer::new(64, 7, 8),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            ProductQuantizer::new(64, 16, 6),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            ProductQuantizer::new(0, 1, 8),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            ProductQuantizer::new(8, 16, 8),
            Err(Error::Config(_))
        ));
        assert_eq!(ProductQuantizer::new(64, 16, 4).unwrap().code_bytes(), 8);
        assert_eq!(ProductQuantizer::new(63, 9, 4).unwrap().code_bytes(), 5);
    }

    #[test]
    fn untrained_and_bad_input() {
        let mut pq = ProductQuantizer::new(8, 4, 4).unwrap();
        assert!(matches!(
            pq.encode(&[0.0; 8]),
            Err(Error::NotTrained { .. })
        ));
        assert!(matches!(
            pq.train(&data(10, 8, 0), 5, 0),
            Err(Error::InsufficientData { .. })
        ));
        let mut x = data(64, 8, 0);
        x[8 * 3 + 5] = f32::NAN;
        match pq.train(&x, 5, 0) {
            Err(Error::NonFinite { row: 3, col: 5, .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(pq.train(&x[..63], 5, 0), Err(Error::Shape { .. })));
    }

    #[test]
    fn scores_match_decoded_both_nbits() {
        for (nbits, m) in [(8, 8), (4, 8), (4, 3)] {
            let dim = 24;
            let mut pq = ProductQuantizer::new(dim, m, nbits).unwrap();
            let x = data(600, dim, 1);
            pq.train(&x, 8, 42).unwrap();
            let codes = pq.encode(&x).unwrap();
            let y = pq.decode(&codes).unwrap();
            let q = data(3, dim, 9);
            let ip = pq.scores(&q, &codes, Metric::InnerProduct).unwrap();
            let l2 = pq.scores(&q, &codes, Metric::L2).unwrap();
            for qi in 0..3 {
                for i in 0..600 {
                    let yi = &y[i * dim..(i + 1) * dim];
                    let qq = &q[qi * dim..(qi + 1) * dim];
                    let e_ip: f32 = yi.iter().zip(qq).map(|(a, b)| a * b).sum();
                    let e_l2: f32 = yi.iter().zip(qq).map(|(a, b)| (a - b) * (a - b)).sum();
                    assert!((ip[qi * 600 + i] - e_ip).abs() < 1e-3 * (1.0 + e_ip.abs()));
                    assert!((l2[qi * 600 + i] - e_l2).abs() < 1e-3 * (1.0 + e_l2.abs()));
                }
            }
            // Encoding decoded vectors gives the same codes (nearest centroid is itself).
            assert_eq!(pq.encode(&y).unwrap(), codes);
        }
    }

    #[test]
    fn training_is_deterministic_and_reduces_error() {
        let x = data(2000, 16, 5);
        let mut a = ProductQuantizer::new(16, 4, 8).unwrap();
        let mut b = a.clone();
        a.train(&x, 10, 7).unwrap();
        b.train(&x, 10, 7).unwrap();
        assert_eq!(a.centroids(), b.centroids());
        let y = a.decode(&a.encode(&x).unwrap()).unwrap();
        let mse: f32 = x
            .iter()
            .zip(&y)
            .map(|(p, q)| (p - q) * (p - q))
            .sum::<f32>()
            / x.len() as f32;
        let var: f32 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        assert!(mse < 0.1 * var, "mse {mse} vs variance {var}");
    }
}
