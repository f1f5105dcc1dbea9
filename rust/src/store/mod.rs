//! Paged KV store: PQ-coded pages per layer, a RAM tier under a byte budget, a disk tier, a
//! prefetch thread, and persistence.
//!
//! Token positions of one sequence and layer are laid out as
//!
//! ```text
//! [0, sinks)                         sink tokens, full precision, always in RAM
//! [sinks, sinks + paged)             pages of `page_size` tokens: PQ codes (+ optional fp16 copy)
//! [sinks + paged, n_tokens)          recent window (<= `window` tokens), full precision, in RAM
//! ```
//!
//! Appending fills the window; tokens pushed out of the window are PQ-encoded (with the layer's
//! codebooks) into the last, open page. A full page is closed: it becomes immutable, its
//! abstract (per KV head: per-dimension min, max and mean of the keys, fp16) stays in RAM, and
//! the blob enters the RAM tier, from which least-recently-used pages spill to the disk tier
//! whenever the RAM total exceeds `ram_budget`.
//!
//! [`KvStore::select_seqs`] reorders / repeats / drops sequences (beam search): closed pages
//! are then shared by id between sequences (they are immutable), and pages no sequence
//! references leave RAM. [`KvStore::crop`] removes trailing tokens still in full precision.
//!
//! Page blob layout (`page_bytes` bytes):
//! `K codes (H, P, ck) | V codes (H, P, cv) | [K fp16 (H, P, D) | V fp16 (H, P, D)]`.

mod attend;
mod disk;
mod parts;
mod persist;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use half::f16;

use crate::error::{Error, Result};
use crate::pq::ProductQuantizer;
pub use attend::{Attended, Queries, Step};

/// A page blob as held in RAM.
type Blob = Arc<Vec<u8>>;

/// Most page reads [`KvStore::pages`] keeps in flight.
pub const IO_THREADS: usize = 16;
pub use disk::Slot;
use disk::{read_at, DiskTier};
pub use parts::PARTS_FORMAT_VERSION;
pub use persist::{check_compatible, LoadOptions, STORE_FORMAT_VERSION};

/// Configuration of a [`KvStore`].
#[derive(Clone, Debug, PartialEq)]
pub struct StoreConfig {
    /// Transformer layers.
    pub layers: usize,
    /// KV heads per layer.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Tokens per page.
    pub page_size: usize,
    /// Recent tokens kept in full precision.
    pub window: usize,
    /// Leading (attention-sink) tokens kept in full precision.
    pub sinks: usize,
    /// Subquantizers of the key codebooks.
    pub k_m: usize,
    /// Bits per key code (4 or 8).
    pub k_nbits: u32,
    /// Subquantizers of the value codebooks.
    pub v_m: usize,
    /// Bits per value code (4 or 8).
    pub v_nbits: u32,
    /// Keep an fp16 copy of K/V in each page (for exact re-ranking).
    pub keep_full_precision: bool,
    /// Hold the recent window in float16 instead of float32 (half its bytes; values beyond
    /// float16's range are a typed error). Sinks stay float32. Tokens pass through the window
    /// dtype before they are encoded, so pages do not depend on how appends were split.
    pub window_f16: bool,
    /// Keep a page abstract (per KV head: min, max, mean of the keys per dimension) in RAM for
    /// every closed page: what Quest selection (`method="quest"`) scores pages by. Without
    /// them (a cache that never selects) the store saves [`StoreConfig::abstract_bytes`] per
    /// page, and selection is a typed error.
    pub abstracts: bool,
    /// Sequences (batch size) at construction. [`KvStore::select_seqs`] may change the number
    /// of sequences later; [`KvStore::batch`] is the current one.
    pub batch: usize,
    /// Byte budget of everything held in RAM; `None` = unbounded.
    pub ram_budget: Option<u64>,
    /// Directory of the disk tier; a private temporary directory when `None`.
    pub offload_dir: Option<PathBuf>,
    /// Cap on disk-tier bytes (to bound disk use, and to test "disk full").
    pub max_disk_bytes: Option<u64>,
    /// Identity of the model (checked on load).
    pub model_id: String,
}

impl StoreConfig {
    fn validate(&self) -> Result<()> {
        let pos = |name: &str, v: usize| {
            if v == 0 {
                Err(Error::config(format!("{name} must be at least 1")))
            } else {
                Ok(())
            }
        };
        pos("layers", self.layers)?;
        pos("kv_heads", self.kv_heads)?;
        pos("head_dim", self.head_dim)?;
        pos("page_size", self.page_size)?;
        pos("batch", self.batch)?;
        ProductQuantizer::new(self.head_dim, self.k_m, self.k_nbits)
            .map_err(|e| Error::config(format!("key codebooks: {e}")))?;
        ProductQuantizer::new(self.head_dim, self.v_m, self.v_nbits)
            .map_err(|e| Error::config(format!("value codebooks: {e}")))?;
        if let Some(b) = self.ram_budget {
            let min = self.min_ram_budget();
            if b < min {
                return Err(Error::Budget(format!(
                    "ram_budget={b} bytes is below the fixed minimum of {min} bytes for this configuration \
                     (codebooks, sinks and window in full precision, one open and one resident page per \
                     layer and sequence); raise ram_budget to at least {min}"
                )));
            }
        }
        Ok(())
    }

    /// Bytes of a key code / value code.
    pub fn code_bytes(&self) -> (usize, usize) {
        (
            (self.k_m * self.k_nbits as usize).div_ceil(8),
            (self.v_m * self.v_nbits as usize).div_ceil(8),
        )
    }

    /// Bytes of one page blob.
    pub fn page_bytes(&self) -> usize {
        let (ck, cv) = self.code_bytes();
        let hp = self.kv_heads * self.page_size;
        hp * (ck + cv)
            + if self.keep_full_precision {
                2 * hp * self.head_dim * 2
            } else {
                0
            }
    }

    /// Bytes the codebooks of all layers hold in RAM once trained: per KV head, each key and
    /// value quantizer ([`ProductQuantizer::held_bytes_for`], compact: float16 centroids, the
    /// midpoints of 1-dim subspaces).
    pub fn codebook_bytes(&self) -> usize {
        let d = self.head_dim;
        let k = ProductQuantizer::held_bytes_for(d, self.k_m, self.k_nbits, true);
        let v = ProductQuantizer::held_bytes_for(d, self.v_m, self.v_nbits, true);
        self.layers * self.kv_heads * (k + v)
    }

    /// RAM bytes of one page's abstract: per KV head `lo, hi` (f32) and min, max, mean of the
    /// keys per dimension quantized to `u8` on `[lo, hi]` (min rounded down, max up).
    /// 0 without [`StoreConfig::abstracts`].
    pub fn abstract_bytes(&self) -> usize {
        if self.abstracts {
            self.kv_heads * (8 + 3 * self.head_dim)
        } else {
            0
        }
    }

    /// The typed error of an operation that needs page abstracts on a store without them.
    pub(crate) fn need_abstracts(&self, what: &str) -> Result<()> {
        if self.abstracts {
            return Ok(());
        }
        Err(Error::config(format!(
            "{what} needs page abstracts, but this store keeps none (abstracts=False; a \
             CompressedCache keeps them only with select=...): create the store with \
             abstracts=True, or the cache with select=..."
        )))
    }

    /// Bytes of one sink token's keys and values (float32).
    pub fn sink_token_bytes(&self) -> usize {
        2 * self.kv_heads * self.head_dim * 4
    }

    /// Bytes of one window token's keys and values (float16 with `window_f16`, else float32).
    pub fn window_token_bytes(&self) -> usize {
        2 * self.kv_heads * self.head_dim * if self.window_f16 { 2 } else { 4 }
    }

    /// Fixed RAM: codebooks, sinks + window, the open page and one resident page per layer and
    /// sequence (of the initial `batch`). A budget below this is rejected.
    pub fn min_ram_budget(&self) -> u64 {
        let per_layer = self.sinks * self.sink_token_bytes()
            + self.window * self.window_token_bytes()
            + 2 * self.page_bytes()
            + self.abstract_bytes();
        (self.codebook_bytes() + self.batch * self.layers * per_layer) as u64
    }
}

/// Without a RAM budget, freed heap memory goes back to the OS after this many bytes of K/V
/// were appended (store-wide) since the last time; with one, after half the budget (at least
/// [`TRIM_MIN_BYTES`]). Trimming after every large append (as before 2026-12-07) cost a 4K
/// prefill of SmolLM2 about 20% more time: each trim also hands back the freed blocks torch
/// reuses for its temporaries, and every later op page-faults them in again.
const TRIM_EVERY_BYTES: u64 = 256 << 20;
/// Smallest trim interval with a RAM budget.
const TRIM_MIN_BYTES: u64 = 8 << 20;

/// Return freed heap memory to the OS. glibc's malloc keeps freed blocks that lie between
/// live allocations (here: the many long-lived page blobs) and raises its mmap threshold after
/// large frees, so without this the temporaries of a long prefill (the caller's tensors and the
/// encoder's token buffers) stay in the process RSS: ~4 GB of RSS for a 0.8 GB store filled in
/// 32K-token appends. A no-op on other allocators.
fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; no pointer is involved.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Counters of tier traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Page reads served from RAM.
    pub hits: u64,
    /// Page reads that went to disk (demand misses).
    pub misses: u64,
    /// Pages loaded by the prefetch thread.
    pub prefetched: u64,
    /// Pages queued for prefetch (not resident when asked for).
    pub prefetch_requested: u64,
    /// Pages evicted from RAM.
    pub evictions: u64,
    /// Bytes read from the disk tier.
    pub bytes_read: u64,
    /// Bytes written to the disk tier.
    pub bytes_written: u64,
    /// KV heads whose Quest selection was widened to every page by the exact fallback
    /// ([`KvStore::attend_quest`]'s `fallback`).
    pub fallbacks: u64,
    /// Bytes held in RAM now (everything counted against the budget).
    pub ram_bytes: u64,
    /// Bytes of page blobs resident in the RAM tier.
    pub ram_page_bytes: u64,
    /// Bytes in the disk tier.
    pub disk_bytes: u64,
    /// Closed pages referenced by some sequence (a page shared by several sequences after
    /// [`KvStore::select_seqs`] counts once).
    pub pages: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    prefetched: AtomicU64,
    prefetch_requested: AtomicU64,
    evictions: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    fallbacks: AtomicU64,
    /// K/V bytes appended since the heap was last trimmed (see [`TRIM_EVERY_BYTES`]).
    since_trim: AtomicU64,
}

/// A page as read: an immutable blob plus its token count.
#[derive(Clone, Debug)]
pub struct PageView {
    blob: Arc<Vec<u8>>,
    /// Tokens in the page (`page_size`, or fewer for the open page).
    pub tokens: usize,
    h: usize,
    p: usize,
    d: usize,
    ck: usize,
    cv: usize,
    fp: bool,
}

impl PageView {
    /// Key codes of head `h`: Layout `(tokens, ck)`.
    pub fn k_codes(&self, h: usize) -> &[u8] {
        let off = h * self.p * self.ck;
        &self.blob[off..off + self.tokens * self.ck]
    }
    /// Value codes of head `h`: Layout `(tokens, cv)`.
    pub fn v_codes(&self, h: usize) -> &[u8] {
        let off = self.h * self.p * self.ck + h * self.p * self.cv;
        &self.blob[off..off + self.tokens * self.cv]
    }
    fn fp_off(&self, which: usize, h: usize) -> Option<usize> {
        self.fp.then(|| {
            self.h * self.p * (self.ck + self.cv) + (which * self.h + h) * self.p * self.d * 2
        })
    }
    /// fp16 keys of head `h` as little-endian bytes, Layout `(tokens, D)`, if kept.
    pub fn k_fp16(&self, h: usize) -> Option<&[u8]> {
        self.fp_off(0, h)
            .map(|o| &self.blob[o..o + self.tokens * self.d * 2])
    }
    /// fp16 values of head `h`, Layout `(tokens, D)`, if kept.
    pub fn v_fp16(&self, h: usize) -> Option<&[u8]> {
        self.fp_off(1, h)
            .map(|o| &self.blob[o..o + self.tokens * self.d * 2])
    }
    /// The whole blob.
    pub fn blob(&self) -> &[u8] {
        &self.blob
    }
}

#[derive(Clone)]
struct OpenPage {
    blob: Vec<u8>,
    filled: usize,
    /// Layout (H, D) each.
    kmin: Vec<f32>,
    kmax: Vec<f32>,
    ksum: Vec<f64>,
}

impl OpenPage {
    fn new(cfg: &StoreConfig) -> Self {
        // No running key statistics without abstracts.
        let hd = if cfg.abstracts {
            cfg.kv_heads * cfg.head_dim
        } else {
            0
        };
        OpenPage {
            blob: vec![0u8; cfg.page_bytes()],
            filled: 0,
            kmin: vec![f32::INFINITY; hd],
            kmax: vec![f32::NEG_INFINITY; hd],
            ksum: vec![0.0; hd],
        }
    }

    /// Abstract Layout (H, 3, D): min, max, mean of the keys.
    fn abstract_f32(&self, cfg: &StoreConfig) -> Vec<f32> {
        let (h, d) = (cfg.kv_heads, cfg.head_dim);
        let mut out = vec![0f32; h * 3 * d];
        let n = self.filled.max(1) as f64;
        for hh in 0..h {
            for dd in 0..d {
                let i = hh * d + dd;
                out[hh * 3 * d + dd] = self.kmin[i];
                out[hh * 3 * d + d + dd] = self.kmax[i];
                out[hh * 3 * d + 2 * d + dd] = (self.ksum[i] / n) as f32;
            }
        }
        out
    }
}

/// One token's keys or values in the window, Layout `(H, D)`, in the window's dtype
/// ([`StoreConfig::window_f16`]). Shared, not copied, by the snapshot a decode step reads.
#[derive(Clone, Debug)]
pub(crate) enum Row {
    F32(Arc<[f32]>),
    F16(Arc<[half::f16]>),
}

impl Row {
    /// `x` held as `f16` (`half`) or float32; a value beyond float16's range is a typed error.
    fn new(x: &[f32], half: bool) -> Result<Row> {
        if !half {
            return Ok(Row::F32(x.into()));
        }
        let mut h = vec![half::f16::ZERO; x.len()];
        {
            use half::slice::HalfFloatSliceExt;
            h.convert_from_f32_slice(x);
        }
        if let Some(i) = h.iter().position(|v| v.is_infinite()) {
            return Err(Row::out_of_range(x[i]));
        }
        Ok(Row::F16(h.into()))
    }

    fn out_of_range(x: f32) -> Error {
        Error::config(format!(
            "a K/V value of {x} is beyond float16's range (|x| <= 65504): the window is held in \
             float16; use window_dtype=\"float32\" for this model"
        ))
    }

    fn len(&self) -> usize {
        match self {
            Row::F32(x) => x.len(),
            Row::F16(x) => x.len(),
        }
    }

    /// Write the values as float32 into `out` (`len()` values).
    pub(crate) fn read_into(&self, out: &mut [f32]) {
        match self {
            Row::F32(x) => out.copy_from_slice(x),
            Row::F16(x) => crate::simd::f16_to_f32(x, out),
        }
    }

    /// The values as float32.
    pub(crate) fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.len()];
        self.read_into(&mut out);
        out
    }
}

/// One token's keys and values in the window, each Layout `(H, D)`.
pub(crate) type TokenKv = (Row, Row);
/// A just-closed page: blob and quantized abstract.
type ClosedPage = (Vec<u8>, Box<[u8]>);

#[derive(Clone, Default)]
struct LayerState {
    n_tokens: usize,
    /// Token-major (t, H, D).
    sinks_k: Vec<f32>,
    sinks_v: Vec<f32>,
    /// Oldest first; each entry (H, D).
    window: VecDeque<TokenKv>,
    pages: Vec<u32>,
    open: Option<OpenPage>,
}

#[derive(Clone)]
struct PageMeta {
    /// Page-table entries (over all sequences) naming this page; 0 = dead: not resident, its
    /// abstract dropped, the id never reused.
    refs: u32,
    crc: u32,
    disk: Option<Slot>,
    /// Quantized abstract, see [`StoreConfig::abstract_bytes`] and [`quantize_abstract`].
    abstract_: Box<[u8]>,
    /// Declared but not here yet: a page of a shared context that is fetched on first use
    /// ([`KvStore::fill_pages`]); neither in RAM nor on disk, no abstract.
    pending: bool,
}

#[derive(Clone, Default)]
struct RamTier {
    map: HashMap<u32, (Arc<Vec<u8>>, u64)>,
    order: BTreeMap<u64, u32>,
    tick: u64,
    bytes: u64,
}

impl RamTier {
    fn touch(&mut self, id: u32) -> Option<Arc<Vec<u8>>> {
        let tick = self.tick + 1;
        let (blob, t) = self.map.get_mut(&id)?;
        self.order.remove(t);
        *t = tick;
        self.order.insert(tick, id);
        self.tick = tick;
        Some(blob.clone())
    }
    fn insert(&mut self, id: u32, blob: Arc<Vec<u8>>) {
        if self.touch(id).is_some() {
            return;
        }
        self.tick += 1;
        self.bytes += blob.len() as u64;
        self.order.insert(self.tick, id);
        self.map.insert(id, (blob, self.tick));
    }
    fn remove(&mut self, id: u32) -> Option<Arc<Vec<u8>>> {
        let (blob, t) = self.map.remove(&id)?;
        self.order.remove(&t);
        self.bytes -= blob.len() as u64;
        Some(blob)
    }
    fn lru(&self) -> Option<u32> {
        self.order.values().next().copied()
    }
}

/// Key and value centroids of every KV head, each Layout `(H, m, ksub, dsub)`.
pub(crate) type FlatBooks = Arc<(Vec<f32>, Vec<f32>)>;

/// A layer's held codebooks and their [`LayerBooks::expanded`] copy, which a batched decode
/// step encodes with while the layer still holds the former.
pub(crate) type Expanded<'a> = (&'a Arc<LayerBooks>, &'a LayerBooks);

/// One layer's quantizers (one per KV head), shared by the snapshots that read them.
pub(crate) struct LayerBooks {
    k: Vec<ProductQuantizer>,
    v: Vec<ProductQuantizer>,
}

impl LayerBooks {
    /// Held compactly ([`ProductQuantizer::compact`]: float16 centroids, norms computed per
    /// encode call): 3.41 instead of 9.21 MiB for SmolLM2's 30 layers x 3 KV heads, 0.02x
    /// instead of 0.06x of the fp16 KV bytes of a 7K context.
    fn new(k: Vec<ProductQuantizer>, v: Vec<ProductQuantizer>) -> Arc<Self> {
        let compact = |qs: Vec<ProductQuantizer>| qs.iter().map(|q| q.compact()).collect();
        Arc::new(LayerBooks {
            k: compact(k),
            v: compact(v),
        })
    }

    /// The same codebooks with float32 centroids and norms ([`ProductQuantizer::expanded`]),
    /// for the encodes of one batched decode step: converted once instead of per sequence.
    pub(crate) fn expanded(&self) -> LayerBooks {
        LayerBooks {
            k: self.k.iter().map(|q| q.expanded()).collect(),
            v: self.v.iter().map(|q| q.expanded()).collect(),
        }
    }

    /// The centroids of every KV head as float32 for the kernels, Layout `(H, m, ksub, dsub)`
    /// for keys and for values: converted per call straight into one buffer per side (about
    /// the cost of the transposition the kernel does per call anyway), so the store holds
    /// each codebook once, in float16.
    pub(crate) fn flat(&self) -> FlatBooks {
        let cat = |qs: &[ProductQuantizer]| -> Vec<f32> {
            let mut out = Vec::new();
            for p in qs {
                p.extend_centroids(&mut out);
            }
            out
        };
        Arc::new((cat(&self.k), cat(&self.v)))
    }
}

struct State {
    books: Vec<Option<Arc<LayerBooks>>>,
    /// [batch][layers]; `seqs.len()` is the current batch.
    seqs: Vec<Vec<LayerState>>,
    /// Indexed by page id.
    pages: Vec<PageMeta>,
    /// Pages with `refs > 0`.
    live: usize,
    ram: RamTier,
    disk: DiskTier,
    /// Pages being read from disk right now (by the prefetch thread or a reader); others wait
    /// for them on `Shared::loaded` instead of reading them a second time.
    inflight: HashSet<u32>,
}

impl State {
    /// A new closed page, resident in RAM with one reference; returns its id.
    fn add_page(&mut self, blob: Vec<u8>, abstract_: Box<[u8]>) -> u32 {
        let id = self.pages.len() as u32;
        self.pages.push(PageMeta {
            refs: 1,
            crc: crc32fast::hash(&blob),
            disk: None,
            abstract_,
            pending: false,
        });
        self.live += 1;
        self.ram.insert(id, Arc::new(blob));
        id
    }

    /// A new closed page whose bytes come later ([`KvStore::fill_pages`]); returns its id.
    fn add_pending(&mut self) -> u32 {
        let id = self.pages.len() as u32;
        self.pages.push(PageMeta {
            refs: 1,
            crc: 0,
            disk: None,
            abstract_: Box::default(),
            pending: true,
        });
        self.live += 1;
        id
    }

    /// A typed error if a page of `l` has not been fetched yet.
    fn check_fetched(&self, l: &LayerState, seq: usize, layer: usize) -> Result<()> {
        if l.pages.iter().any(|&id| self.pages[id as usize].pending) {
            return Err(not_fetched(seq, layer));
        }
        Ok(())
    }
}

fn not_fetched(seq: usize, layer: usize) -> Error {
    Error::config(format!(
        "sequence {seq}, layer {layer} has pages of a shared context that were not fetched yet: \
         fill them first (KvStore::fill_pages; ctxcore's Python wrapper does it on first use)"
    ))
}

struct Shared {
    cfg: StoreConfig,
    state: Mutex<State>,
    loaded: Condvar,
    counters: Counters,
}

/// The paged KV store (see the module docs).
pub struct KvStore {
    shared: Arc<Shared>,
    prefetch_tx: Option<Sender<Vec<u32>>>,
    prefetch_thread: Option<JoinHandle<()>>,
}

impl Drop for KvStore {
    fn drop(&mut self) {
        self.prefetch_tx.take();
        if let Some(t) = self.prefetch_thread.take() {
            let _ = t.join();
        }
    }
}

/// Quantize an abstract (Layout `(H, 3, D)` f32: min, max, mean) into
/// `H x [lo f32 LE, hi f32 LE, min u8 (D), max u8 (D), mean u8 (D)]`. Min is rounded down and
/// max up, so the stored bounds still contain every key of the page (Quest's bound stays valid).
pub fn quantize_abstract(a: &[f32], h: usize, d: usize) -> Box<[u8]> {
    let mut out = Vec::with_capacity(h * (8 + 3 * d));
    for hh in 0..h {
        let x = &a[hh * 3 * d..(hh + 1) * 3 * d];
        let lo = x[..d].iter().copied().fold(f32::INFINITY, f32::min);
        let hi = x[d..2 * d]
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        out.extend_from_slice(&lo.to_le_bytes());
        out.extend_from_slice(&hi.to_le_bytes());
        let span = hi - lo;
        let q = |v: f32, mode: i8| -> u8 {
            if span <= 0.0 || !span.is_finite() {
                return 0;
            }
            let t = ((v - lo) / span * 255.0).clamp(0.0, 255.0);
            (match mode {
                -1 => t.floor(),
                1 => t.ceil(),
                _ => t.round(),
            }) as u8
        };
        out.extend(x[..d].iter().map(|&v| q(v, -1)));
        out.extend(x[d..2 * d].iter().map(|&v| q(v, 1)));
        out.extend(x[2 * d..].iter().map(|&v| q(v, 0)));
    }
    out.into()
}

/// Inverse of [`quantize_abstract`] into Layout `(H, 3, D)` f32.
pub fn dequantize_abstract(b: &[u8], h: usize, d: usize, out: &mut Vec<f32>) {
    for hh in 0..h {
        let x = &b[hh * (8 + 3 * d)..(hh + 1) * (8 + 3 * d)];
        let lo = f32::from_le_bytes(x[..4].try_into().expect("4"));
        let hi = f32::from_le_bytes(x[4..8].try_into().expect("4"));
        let step = (hi - lo) / 255.0;
        out.extend(
            x[8..]
                .iter()
                .map(|&q| if q == 255 { hi } else { lo + q as f32 * step }),
        );
    }
}

fn f32_to_f16_bytes(src: &[f32], dst: &mut [u8]) {
    for (v, o) in src.iter().zip(dst.chunks_exact_mut(2)) {
        o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
    }
}

impl Shared {
    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| Error::Internal("store lock poisoned by an earlier panic".into()))
    }

    fn view(&self, blob: Arc<Vec<u8>>, tokens: usize) -> PageView {
        let (ck, cv) = self.cfg.code_bytes();
        PageView {
            blob,
            tokens,
            h: self.cfg.kv_heads,
            p: self.cfg.page_size,
            d: self.cfg.head_dim,
            ck,
            cv,
            fp: self.cfg.keep_full_precision,
        }
    }

    fn fixed_bytes(&self, st: &State) -> u64 {
        let cfg = &self.cfg;
        let mut b = cfg.codebook_bytes() as u64;
        let (sink_token, window_token) = (cfg.sink_token_bytes(), cfg.window_token_bytes());
        for seq in &st.seqs {
            for l in seq {
                b += ((l.sinks_k.len() / (cfg.kv_heads * cfg.head_dim)) * sink_token) as u64;
                b += (l.window.len() * window_token) as u64;
                if l.open.is_some() {
                    b += cfg.page_bytes() as u64;
                }
            }
        }
        b += st.live as u64 * cfg.abstract_bytes() as u64;
        b += st.pages.len() as u64 * std::mem::size_of::<PageMeta>() as u64;
        b
    }

    fn ram_total(&self, st: &State) -> u64 {
        self.fixed_bytes(st) + st.ram.bytes
    }

    /// Move the least recently used resident page out of RAM, writing it to the disk tier first
    /// if it has no copy there. Returns false when no page is resident.
    fn evict_lru(&self, st: &mut State) -> Result<bool> {
        let Some(id) = st.ram.lru() else {
            return Ok(false);
        };
        if st.pages[id as usize].disk.is_none() {
            let blob = st.ram.map[&id].0.clone();
            let slot = st.disk.write(&blob)?; // on failure the page stays in RAM: no data lost
            self.counters
                .bytes_written
                .fetch_add(blob.len() as u64, Ordering::Relaxed);
            st.pages[id as usize].disk = Some(slot);
        }
        st.ram.remove(id);
        self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Evict LRU pages until the RAM total fits the budget (spilling them to disk first).
    fn enforce_budget(&self, st: &mut State) -> Result<()> {
        let Some(budget) = self.cfg.ram_budget else {
            return Ok(());
        };
        // Evicting only moves resident pages: the fixed part is the same throughout.
        let fixed = self.fixed_bytes(st);
        while fixed + st.ram.bytes > budget && self.evict_lru(st)? {}
        if fixed + st.ram.bytes > budget {
            return Err(Error::Budget(format!(
                "the store needs {fixed} bytes of RAM that cannot be offloaded (window, sinks, open \
                 pages, codebooks and {} page abstracts) but ram_budget is {budget}; raise \
                 ram_budget or use a larger page_size",
                st.live
            )));
        }
        Ok(())
    }

    /// Read a closed page, from RAM or disk; `prefetch` marks reads by the prefetch thread.
    /// A page already being read by another thread is waited for, not read twice.
    fn page_in(&self, id: u32, prefetch: bool) -> Result<Arc<Vec<u8>>> {
        let mut st = self.lock()?;
        loop {
            if let Some(b) = st.ram.touch(id) {
                if !prefetch {
                    self.counters.hits.fetch_add(1, Ordering::Relaxed);
                }
                return Ok(b);
            }
            if !st.inflight.contains(&id) {
                break;
            }
            if prefetch {
                return Ok(Arc::new(Vec::new())); // someone is already loading it
            }
            st = self
                .loaded
                .wait(st)
                .map_err(|_| Error::Internal("store lock poisoned by an earlier panic".into()))?;
        }
        let meta = st
            .pages
            .get(id as usize)
            .ok_or_else(|| Error::Internal(format!("unknown page {id}")))?;
        if prefetch && (meta.refs == 0 || meta.pending) {
            return Ok(Arc::new(Vec::new())); // dropped by select_seqs since it was queued
        }
        if meta.pending {
            return Err(Error::config(format!(
                "page {id} of a shared context was not fetched yet: fill it first (KvStore::fill_pages)"
            )));
        }
        let slot = meta
            .disk
            .ok_or_else(|| Error::Internal(format!("page {id} is neither in RAM nor on disk")))?;
        let crc = meta.crc;
        let (file, off, path) = st.disk.reader(slot)?;
        st.inflight.insert(id);
        drop(st);
        let len = self.cfg.page_bytes();
        let read = read_at(&file, off, len, &path, id as u64).and_then(|buf| {
            let actual = crc32fast::hash(&buf);
            if actual != crc {
                return Err(Error::corrupt(
                    format!("page {id} in {}", path.display()),
                    format!("checksum mismatch (expected {crc:#010x}, read {actual:#010x}); the file was modified or damaged"),
                ));
            }
            Ok(buf)
        });
        let mut st = self.lock()?;
        st.inflight.remove(&id);
        self.loaded.notify_all();
        let buf = read?;
        self.counters
            .bytes_read
            .fetch_add(len as u64, Ordering::Relaxed);
        let c = if prefetch {
            &self.counters.prefetched
        } else {
            &self.counters.misses
        };
        c.fetch_add(1, Ordering::Relaxed);
        let blob: Arc<Vec<u8>> = Arc::new(buf);
        if st.pages[id as usize].refs == 0 {
            // No sequence uses it any more (select_seqs ran meanwhile): do not keep it resident.
            return Ok(blob);
        }
        if let Some(budget) = self.cfg.ram_budget {
            // Scan resistance: decode reads every layer's pages (or their selected pages) once
            // per step in the same order, and plain LRU on such a loop larger than the RAM tier
            // evicts each page just before its next use (measured at 256K tokens under 1 GiB:
            // 1.4 GiB read per step for 0.5 GiB on disk). So when RAM is full, 7 in 8 pages
            // read on demand (pseudo-randomly, by a hash of the LRU clock) are handed over
            // without being kept: many resident pages then survive a pass and hit on the next
            // one, while a working set that fits still becomes resident, within some passes.
            // Prefetched pages are always kept (they are read to be used soon).
            let full = self.fixed_bytes(&st) + st.ram.bytes + len as u64 > budget;
            let keep = (st.ram.tick.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 61) == 0;
            st.ram.tick += 1;
            if full && !keep && !prefetch {
                return Ok(blob);
            }
        }
        st.ram.insert(id, blob.clone());
        if self.enforce_budget(&mut st).is_err() {
            // Cannot make room (e.g. the disk tier is full): hand the page to the caller without
            // keeping it resident, so RAM stays where it was and the read still succeeds.
            st.ram.remove(id);
        }
        Ok(blob)
    }
}

impl KvStore {
    /// A new, empty store.
    pub fn new(cfg: StoreConfig) -> Result<Self> {
        cfg.validate()?;
        let mut disk = DiskTier::new(
            cfg.offload_dir.as_deref(),
            cfg.page_bytes(),
            cfg.max_disk_bytes,
        )?;
        if cfg.offload_dir.is_some() {
            disk.check_writable()?; // fail now, not in the middle of a prefill
        }
        let state = State {
            books: (0..cfg.layers).map(|_| None).collect(),
            seqs: (0..cfg.batch)
                .map(|_| (0..cfg.layers).map(|_| LayerState::default()).collect())
                .collect(),
            pages: Vec::new(),
            live: 0,
            ram: RamTier::default(),
            disk,
            inflight: HashSet::new(),
        };
        Ok(Self::from_parts(cfg, state))
    }

    fn from_parts(cfg: StoreConfig, state: State) -> Self {
        let shared = Arc::new(Shared {
            cfg,
            state: Mutex::new(state),
            loaded: Condvar::new(),
            counters: Counters::default(),
        });
        let (tx, rx) = channel::<Vec<u32>>();
        let weak = Arc::downgrade(&shared);
        let thread = std::thread::Builder::new()
            .name("ctxcore-prefetch".into())
            .spawn(move || {
                while let Ok(ids) = rx.recv() {
                    let Some(sh) = weak.upgrade() else { break };
                    for id in ids {
                        // Errors surface again on the demand read, with full context.
                        let _ = sh.page_in(id, true);
                    }
                }
            })
            .ok();
        KvStore {
            shared,
            prefetch_tx: thread.as_ref().map(|_| tx),
            prefetch_thread: thread,
        }
    }

    /// An independent copy of the store, cheap: closed pages are shared copy-on-write (their
    /// blobs in RAM by reference, their disk slots by sharing the segment files read-only),
    /// while sinks, windows, open pages, page tables and codebooks are copied. Either store can
    /// then append, crop, select and drop without affecting the other; the copy writes pages it
    /// evicts into a private directory of its own.
    pub fn fork(&self) -> Result<KvStore> {
        let st = self.shared.lock()?;
        let state = State {
            books: st.books.clone(),
            seqs: st.seqs.clone(),
            pages: st.pages.clone(),
            live: st.live,
            ram: st.ram.clone(),
            disk: st.disk.fork(),
            inflight: HashSet::new(),
        };
        drop(st);
        Ok(Self::from_parts(self.shared.cfg.clone(), state))
    }

    /// The configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.shared.cfg
    }

    /// Current number of sequences (the initial `batch`, changed by [`KvStore::select_seqs`]).
    pub fn batch(&self) -> Result<usize> {
        Ok(self.shared.lock()?.seqs.len())
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        let layers = self.shared.cfg.layers;
        if layer >= layers {
            return Err(Error::config(format!(
                "layer {layer} out of range: the store has {layers} layers"
            )));
        }
        Ok(())
    }

    /// Validate `(seq, layer)` against the locked state (the batch can change between locks).
    fn check_in(&self, st: &State, seq: usize, layer: usize) -> Result<()> {
        if seq >= st.seqs.len() {
            return Err(Error::config(format!(
                "sequence {seq} out of range: the store holds batch={}",
                st.seqs.len()
            )));
        }
        self.check_layer(layer)
    }

    fn check(&self, seq: usize, layer: usize) -> Result<()> {
        let st = self.shared.lock()?;
        self.check_in(&st, seq, layer)
    }

    /// Set the codebooks of `layer`: one quantizer per KV head for keys and for values.
    pub fn set_codebooks(
        &self,
        layer: usize,
        k: Vec<ProductQuantizer>,
        v: Vec<ProductQuantizer>,
    ) -> Result<()> {
        self.check_layer(layer)?;
        let cfg = &self.shared.cfg;
        for (what, books, m, nbits) in [
            ("key", &k, cfg.k_m, cfg.k_nbits),
            ("value", &v, cfg.v_m, cfg.v_nbits),
        ] {
            if books.len() != cfg.kv_heads {
                return Err(Error::config(format!(
                    "{what} codebooks: got {} quantizers, need one per KV head ({})",
                    books.len(),
                    cfg.kv_heads
                )));
            }
            for (h, pq) in books.iter().enumerate() {
                if pq.dim() != cfg.head_dim
                    || pq.m() != m
                    || pq.nbits() != nbits
                    || !pq.is_trained()
                {
                    return Err(Error::config(format!(
                        "{what} codebook of head {h}: expected a trained quantizer with dim={}, m={m}, nbits={nbits}, \
                         got dim={}, m={}, nbits={}, trained={}",
                        cfg.head_dim,
                        pq.dim(),
                        pq.m(),
                        pq.nbits(),
                        pq.is_trained()
                    )));
                }
            }
        }
        let mut st = self.shared.lock()?;
        let in_use: usize = st
            .seqs
            .iter()
            .map(|seq| seq[layer].pages.len() + seq[layer].open.is_some() as usize)
            .sum();
        if in_use > 0 {
            // Pages are only meaningful with the codebooks that encoded them.
            return Err(Error::config(format!(
                "layer {layer} already has {in_use} pages encoded with its current codebooks; codebooks \
                 cannot be replaced once tokens are paged (use a new store)"
            )));
        }
        st.books[layer] = Some(LayerBooks::new(k, v));
        Ok(())
    }

    /// The codebooks of `layer` (key and value quantizers per KV head), if set.
    #[allow(clippy::type_complexity)]
    pub fn codebooks(
        &self,
        layer: usize,
    ) -> Result<Option<(Vec<ProductQuantizer>, Vec<ProductQuantizer>)>> {
        self.check_layer(layer)?;
        let st = self.shared.lock()?;
        Ok(st.books[layer].as_ref().map(|b| (b.k.clone(), b.v.clone())))
    }

    /// The centroids of `layer`'s codebooks flattened for the kernels, or None.
    pub(crate) fn flat_centroids(&self, layer: usize) -> Result<Option<FlatBooks>> {
        self.check_layer(layer)?;
        let books = self.shared.lock()?.books[layer].clone();
        Ok(books.map(|b| b.flat()))
    }

    /// Whether `layer` has codebooks.
    pub fn has_codebooks(&self, layer: usize) -> bool {
        self.shared
            .lock()
            .map(|st| st.books.get(layer).is_some_and(|b| b.is_some()))
            .unwrap_or(false)
    }

    /// Append `t` tokens to `(seq, layer)`: `k`, `v` Layout `(H, t, D)`, finite float32.
    ///
    /// Validates everything before changing state, so an error leaves the store as it was
    /// (except a disk-tier write failure during eviction, after which all data is still held).
    pub fn append(&self, seq: usize, layer: usize, k: &[f32], v: &[f32], t: usize) -> Result<()> {
        self.append_with(seq, layer, k, v, t, None)
    }

    /// [`KvStore::append`], encoding with `books` where the layer's codebooks are still the
    /// ones they were expanded from (see [`Expanded`]).
    pub(crate) fn append_with(
        &self,
        seq: usize,
        layer: usize,
        k: &[f32],
        v: &[f32],
        t: usize,
        books: Option<Expanded>,
    ) -> Result<()> {
        let r = self.append_inner(seq, layer, k, v, t, books);
        let every = match self.shared.cfg.ram_budget {
            Some(b) => (b / 2).max(TRIM_MIN_BYTES),
            None => TRIM_EVERY_BYTES,
        };
        let added = (k.len() + v.len()) as u64 * 4;
        let since = &self.shared.counters.since_trim;
        if since.fetch_add(added, Ordering::Relaxed) + added >= every {
            since.store(0, Ordering::Relaxed);
            release_free_heap();
        }
        r
    }

    fn append_inner(
        &self,
        seq: usize,
        layer: usize,
        k: &[f32],
        v: &[f32],
        t: usize,
        expanded: Option<Expanded>,
    ) -> Result<()> {
        self.check(seq, layer)?;
        let cfg = &self.shared.cfg;
        let (h, d) = (cfg.kv_heads, cfg.head_dim);
        for (what, x) in [("keys", k), ("values", v)] {
            if x.len() != h * t * d {
                return Err(Error::shape(
                    what,
                    format!("[{h}, {t}, {d}]"),
                    format!("{} values", x.len()),
                ));
            }
            crate::pq::check_finite(what, x, d)?;
        }
        let mut st = self.shared.lock()?;
        let st = &mut *st;
        self.check_in(st, seq, layer)?;
        let n0 = st.seqs[seq][layer].n_tokens;
        let to_sinks = cfg.sinks.saturating_sub(n0).min(t);
        let win_len = st.seqs[seq][layer].window.len();
        let overflow = (win_len + t - to_sinks).saturating_sub(cfg.window);
        if overflow > 0 && st.books[layer].is_none() {
            return Err(Error::NotTrained {
                what: "append beyond sinks + window (set_codebooks for this layer first)",
            });
        }
        let tok = |x: &[f32], i: usize| -> Vec<f32> {
            let mut b = vec![0f32; h * d];
            for hh in 0..h {
                b[hh * d..(hh + 1) * d].copy_from_slice(&x[(hh * t + i) * d..(hh * t + i + 1) * d]);
            }
            b
        };
        // Tokens leaving the window, oldest first: from the current window, then from the
        // input; as float32 in the window's dtype (tokens passing straight to pages are
        // rounded as if they had been in the window), Layout (H, n, D) each.
        let from_window = overflow.min(win_len);
        let first_kept = to_sinks + (overflow - from_window);
        let (n, fresh) = (overflow, first_kept - to_sinks);
        let mut lk = vec![0f32; h * n * d];
        let mut lv = vec![0f32; h * n * d];
        let mut row_buf = vec![0f32; h * d];
        for (i, (rk, rv)) in st.seqs[seq][layer]
            .window
            .iter()
            .take(from_window)
            .enumerate()
        {
            for (row, out) in [(rk, &mut lk), (rv, &mut lv)] {
                row.read_into(&mut row_buf);
                for hh in 0..h {
                    out[(hh * n + i) * d..(hh * n + i + 1) * d]
                        .copy_from_slice(&row_buf[hh * d..(hh + 1) * d]);
                }
            }
        }
        for (x, out) in [(k, &mut lk), (v, &mut lv)] {
            for hh in 0..h {
                let dst = &mut out[(hh * n + from_window) * d..(hh + 1) * n * d];
                dst.copy_from_slice(&x[(hh * t + to_sinks) * d..(hh * t + first_kept) * d]);
                if cfg.window_f16 {
                    round_to_f16(dst)?;
                }
            }
        }
        debug_assert_eq!(from_window + fresh, n);
        // Tokens entering the window, in its dtype (checked before the state changes: all or
        // nothing).
        let row = |x: &[f32], i: usize| Row::new(&tok(x, i), cfg.window_f16);
        let rows: Vec<TokenKv> = (first_kept..t)
            .map(|i| Ok((row(k, i)?, row(v, i)?)))
            .collect::<Result<_>>()?;
        let ls = &mut st.seqs[seq][layer];
        for i in 0..to_sinks {
            ls.sinks_k.extend_from_slice(&tok(k, i));
            ls.sinks_v.extend_from_slice(&tok(v, i));
        }
        ls.window.drain(..from_window);
        ls.window.extend(rows);
        ls.n_tokens += t;
        if n > 0 {
            let held = st.books[layer].as_ref().expect("checked above");
            let books = match expanded {
                Some((from, e)) if Arc::ptr_eq(from, held) => e,
                _ => &**held,
            };
            let closed = encode_into_pages(cfg, books, &mut st.seqs[seq][layer], &lk, &lv, n)?;
            for (blob, abs) in closed {
                let id = st.add_page(blob, abs);
                st.seqs[seq][layer].pages.push(id);
            }
        }
        self.shared.enforce_budget(st)
    }

    /// Tokens stored for `(seq, layer)`.
    pub fn num_tokens(&self, seq: usize, layer: usize) -> Result<usize> {
        let st = self.shared.lock()?;
        self.check_in(&st, seq, layer)?;
        Ok(st.seqs[seq][layer].n_tokens)
    }

    /// Pages of `(seq, layer)` including a partially filled last page.
    pub fn num_pages(&self, seq: usize, layer: usize) -> Result<usize> {
        let st = self.shared.lock()?;
        self.check_in(&st, seq, layer)?;
        let l = &st.seqs[seq][layer];
        Ok(l.pages.len() + l.open.as_ref().is_some_and(|o| o.filled > 0) as usize)
    }

    /// Tokens in pages (between the sinks and the window).
    pub fn paged_tokens(&self, seq: usize, layer: usize) -> Result<usize> {
        let st = self.shared.lock()?;
        self.check_in(&st, seq, layer)?;
        let l = &st.seqs[seq][layer];
        Ok(l.pages.len() * self.shared.cfg.page_size + l.open.as_ref().map_or(0, |o| o.filled))
    }

    /// Read page `idx` of `(seq, layer)` (the last one may be the open, partial page).
    pub fn page(&self, seq: usize, layer: usize, idx: usize) -> Result<PageView> {
        let mut one = self.pages(seq, layer, &[idx])?;
        Ok(one.pop().expect("one page asked, one returned"))
    }

    /// Pages `idxs` of `(seq, layer)` (as [`KvStore::page`]: the last may be the open one),
    /// from RAM or the disk tier (checksummed). When many are on disk they are read by up to
    /// [`IO_THREADS`] threads at once: a disk serves random page reads several times faster at
    /// a deeper queue (measured on this project's VM: 143 MB/s with one read in flight,
    /// 490 MB/s with 8, 620 MB/s with 32, for 12 KiB pages).
    pub fn pages(&self, seq: usize, layer: usize, idxs: &[usize]) -> Result<Vec<PageView>> {
        let (ids, open, missing) = {
            let st = self.shared.lock()?;
            self.check_in(&st, seq, layer)?;
            let l = &st.seqs[seq][layer];
            let filled = l.open.as_ref().map_or(0, |o| o.filled);
            let mut open = None;
            let mut ids = Vec::with_capacity(idxs.len());
            for &i in idxs {
                if let Some(&id) = l.pages.get(i) {
                    ids.push(id);
                } else if i == l.pages.len() && filled > 0 {
                    let o = l.open.as_ref().expect("filled > 0");
                    open = Some(self.shared.view(Arc::new(o.blob.clone()), filled));
                    ids.push(u32::MAX);
                } else {
                    return Err(Error::config(format!(
                        "page {i} out of range: sequence {seq}, layer {layer} has {} pages",
                        l.pages.len() + (filled > 0) as usize
                    )));
                }
            }
            let missing = ids
                .iter()
                .filter(|&&id| id != u32::MAX && !st.ram.map.contains_key(&id))
                .count();
            (ids, open, missing)
        };
        let sh = &self.shared;
        let read = |id: u32| -> Result<Arc<Vec<u8>>> {
            if id == u32::MAX {
                Ok(Arc::default()) // the open page, put in below
            } else {
                sh.page_in(id, false)
            }
        };
        let sh = &self.shared;
        let threads = IO_THREADS.min(missing / 4);
        let blobs: Vec<Arc<Vec<u8>>> = if threads < 2 {
            ids.iter().map(|&id| read(id)).collect::<Result<_>>()?
        } else {
            let next = std::sync::atomic::AtomicUsize::new(0);
            let parts: Vec<Vec<(usize, Result<Blob>)>> = std::thread::scope(|s| {
                let workers: Vec<_> = (0..threads)
                    .map(|_| {
                        s.spawn(|| {
                            let mut got = Vec::new();
                            loop {
                                let i = next.fetch_add(1, Ordering::Relaxed);
                                let Some(&id) = ids.get(i) else { break };
                                let r = read(id);
                                let failed = r.is_err();
                                got.push((i, r));
                                if failed {
                                    next.store(ids.len(), Ordering::Relaxed);
                                }
                            }
                            got
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .map(|w| w.join().unwrap_or_default())
                    .collect()
            });
            let mut out: Vec<Option<Arc<Vec<u8>>>> = vec![None; ids.len()];
            for (i, r) in parts.into_iter().flatten() {
                out[i] = Some(r?);
            }
            out.into_iter()
                .map(|b| b.ok_or_else(|| Error::Internal("a page read thread died".into())))
                .collect::<Result<_>>()?
        };
        Ok(ids
            .iter()
            .zip(blobs)
            .map(|(&id, b)| match id {
                u32::MAX => open.clone().expect("the open page"),
                _ => sh.view(b, sh.cfg.page_size),
            })
            .collect())
    }

    /// Ask the prefetch thread to load pages `idxs` of `(seq, layer)` into RAM ahead of use.
    pub fn prefetch(&self, seq: usize, layer: usize, idxs: &[usize]) -> Result<()> {
        let ids: Vec<u32> = {
            let st = self.shared.lock()?;
            self.check_in(&st, seq, layer)?;
            let l = &st.seqs[seq][layer];
            idxs.iter()
                .filter_map(|&i| l.pages.get(i).copied())
                .filter(|id| !st.ram.map.contains_key(id))
                .collect()
        };
        if ids.is_empty() {
            return Ok(());
        }
        self.shared
            .counters
            .prefetch_requested
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        match &self.prefetch_tx {
            Some(tx) if tx.send(ids.clone()).is_ok() => Ok(()),
            _ => {
                for id in ids {
                    self.shared.page_in(id, true)?;
                }
                Ok(())
            }
        }
    }

    /// Sinks and window of `(seq, layer)` in full precision: `(k, v, tokens)`, Layout `(H, t, D)`.
    pub fn full_precision(
        &self,
        seq: usize,
        layer: usize,
        which: Region,
    ) -> Result<(Vec<f32>, Vec<f32>, usize)> {
        let (h, d) = (self.shared.cfg.kv_heads, self.shared.cfg.head_dim);
        let st = self.shared.lock()?;
        self.check_in(&st, seq, layer)?;
        let l = &st.seqs[seq][layer];
        let window: (Vec<f32>, Vec<f32>);
        let toks: Vec<(&[f32], &[f32])> = match which {
            Region::Sinks => l
                .sinks_k
                .chunks_exact(h * d)
                .zip(l.sinks_v.chunks_exact(h * d))
                .collect(),
            Region::Window => {
                let (t, hd) = (l.window.len(), h * d);
                let mut k = vec![0f32; hd * t];
                let mut v = vec![0f32; hd * t];
                for (i, (tk, tv)) in l.window.iter().enumerate() {
                    tk.read_into(&mut k[i * hd..(i + 1) * hd]);
                    tv.read_into(&mut v[i * hd..(i + 1) * hd]);
                }
                window = (k, v);
                window
                    .0
                    .chunks_exact(hd)
                    .zip(window.1.chunks_exact(hd))
                    .collect()
            }
        };
        let t = toks.len();
        let mut k = vec![0f32; h * t * d];
        let mut v = vec![0f32; h * t * d];
        for (i, (tk, tv)) in toks.iter().enumerate() {
            for hh in 0..h {
                k[(hh * t + i) * d..(hh * t + i + 1) * d]
                    .copy_from_slice(&tk[hh * d..(hh + 1) * d]);
                v[(hh * t + i) * d..(hh * t + i + 1) * d]
                    .copy_from_slice(&tv[hh * d..(hh + 1) * d]);
            }
        }
        Ok((k, v, t))
    }

    /// Page abstracts of `(seq, layer)`, Layout `(pages, H, 3, D)`: min, max, mean of the keys
    /// (the open page included). Always served from RAM.
    pub fn abstracts(&self, seq: usize, layer: usize) -> Result<(Vec<f32>, usize)> {
        let cfg = &self.shared.cfg;
        cfg.need_abstracts("abstracts()")?;
        let st = self.shared.lock()?;
        self.check_in(&st, seq, layer)?;
        let l = &st.seqs[seq][layer];
        st.check_fetched(l, seq, layer)?;
        let mut out = Vec::with_capacity((l.pages.len() + 1) * cfg.kv_heads * 3 * cfg.head_dim);
        for &id in &l.pages {
            dequantize_abstract(
                &st.pages[id as usize].abstract_,
                cfg.kv_heads,
                cfg.head_dim,
                &mut out,
            );
        }
        let mut n = l.pages.len();
        if let Some(o) = l.open.as_ref().filter(|o| o.filled > 0) {
            out.extend(o.abstract_f32(cfg));
            n += 1;
        }
        Ok((out, n))
    }

    /// Counters and current RAM / disk use.
    pub fn stats(&self) -> Result<Stats> {
        let st = self.shared.lock()?;
        let c = &self.shared.counters;
        Ok(Stats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            prefetched: c.prefetched.load(Ordering::Relaxed),
            prefetch_requested: c.prefetch_requested.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            bytes_read: c.bytes_read.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            fallbacks: c.fallbacks.load(Ordering::Relaxed),
            ram_bytes: self.shared.ram_total(&st),
            ram_page_bytes: st.ram.bytes,
            disk_bytes: st.disk.bytes,
            pages: st.live as u64,
        })
    }

    /// Drop every resident closed page from RAM (spilling to disk), e.g. to test page-in.
    pub fn evict_all(&self) -> Result<()> {
        let mut st = self.shared.lock()?;
        while self.shared.evict_lru(&mut st)? {}
        Ok(())
    }

    /// Reorder, repeat or drop sequences (beam search). Afterwards the store holds
    /// `indices.len()` sequences and sequence `i` is a copy of the former sequence `indices[i]`
    /// in every layer: token count, sinks, window and open page are copied; closed pages are
    /// immutable and shared by id, not copied, so appending to one copy never changes another.
    /// Indices may repeat, and the batch may grow or shrink (it must stay >= 1).
    ///
    /// Pages no sequence references any more leave the RAM tier and their abstracts are
    /// dropped, so they stop counting against `ram_budget`; then the budget is enforced.
    ///
    /// Errors, with nothing changed: [`Error::Config`] for an empty `indices` or an index
    /// `>= batch`; [`Error::Budget`] if the new batch's sinks, windows and open pages alone
    /// exceed `ram_budget` (possible when growing beyond the configured `batch`).
    pub fn select_seqs(&self, indices: &[usize]) -> Result<()> {
        if indices.is_empty() {
            return Err(Error::config(
                "select_seqs needs at least one sequence index: the batch cannot become empty",
            ));
        }
        let mut guard = self.shared.lock()?;
        let st = &mut *guard;
        let batch = st.seqs.len();
        if let Some(&bad) = indices.iter().find(|&&i| i >= batch) {
            return Err(Error::config(format!(
                "select_seqs: sequence index {bad} out of range: the store holds batch={batch} \
                 (valid indices 0..{batch})"
            )));
        }
        let mut refs = vec![0u32; st.pages.len()];
        for &i in indices {
            for l in &st.seqs[i] {
                for &id in &l.pages {
                    let r = &mut refs[id as usize];
                    *r = r.saturating_add(1);
                }
            }
        }
        let live = refs.iter().filter(|&&r| r > 0).count();
        let new_seqs: Vec<Vec<LayerState>> = indices.iter().map(|&i| st.seqs[i].clone()).collect();
        let old_seqs = std::mem::replace(&mut st.seqs, new_seqs);
        let old_live = std::mem::replace(&mut st.live, live);
        if let Some(budget) = self.shared.cfg.ram_budget {
            let fixed = self.shared.fixed_bytes(st);
            if fixed > budget {
                st.seqs = old_seqs;
                st.live = old_live;
                return Err(Error::Budget(format!(
                    "select_seqs to {} sequences needs {fixed} bytes of RAM that cannot be \
                     offloaded (sinks, windows, open pages, codebooks and page abstracts) but \
                     ram_budget is {budget}; raise ram_budget or select fewer sequences",
                    indices.len()
                )));
            }
        }
        for (id, (meta, &r)) in st.pages.iter_mut().zip(&refs).enumerate() {
            if meta.refs > 0 && r == 0 {
                st.ram.remove(id as u32);
                meta.abstract_ = Box::default();
            }
            meta.refs = r;
        }
        drop(old_seqs);
        self.shared.enforce_budget(st)
    }

    /// Tokens at the end of `l` still in full precision and removable by [`KvStore::crop`]:
    /// the window, plus the sinks while no token is paged.
    fn croppable(&self, l: &LayerState) -> (usize, bool) {
        let paged = !l.pages.is_empty() || l.open.as_ref().is_some_and(|o| o.filled > 0);
        let sinks = l.sinks_k.len() / (self.shared.cfg.kv_heads * self.shared.cfg.head_dim);
        (l.window.len() + if paged { 0 } else { sinks }, paged)
    }

    /// Remove the last `n` tokens of `(seq, layer)` (e.g. rejected speculative tokens).
    ///
    /// Only tokens still in full precision can be removed: at most the window's tokens or,
    /// while nothing of the sequence is paged yet, the window's and then the sinks' tokens.
    /// Older tokens are already PQ-coded into pages (possibly shared with other sequences), so a
    /// larger `n` is an [`Error::Config`] naming the maximum, and nothing is changed.
    pub fn crop(&self, seq: usize, layer: usize, n: usize) -> Result<()> {
        self.crop_many(&[(seq, layer)], n)
    }

    /// [`KvStore::crop`] of every `(seq, layer)` in `targets` (duplicates count once), all or
    /// nothing: every target is checked before any is changed.
    pub fn crop_many(&self, targets: &[(usize, usize)], n: usize) -> Result<()> {
        let mut targets = targets.to_vec();
        targets.sort_unstable();
        targets.dedup();
        let mut guard = self.shared.lock()?;
        let st = &mut *guard;
        for &(seq, layer) in &targets {
            self.check_in(st, seq, layer)?;
            let (max, paged) = self.croppable(&st.seqs[seq][layer]);
            if n > max {
                return Err(Error::config(if paged {
                    format!(
                        "cannot crop {n} tokens of sequence {seq}, layer {layer}: at most {max} can \
                         be removed (the tokens of the full-precision window); older tokens are \
                         already PQ-coded in pages"
                    )
                } else {
                    format!(
                        "cannot crop {n} tokens of sequence {seq}, layer {layer}: it holds only \
                         {max} tokens"
                    )
                }));
            }
        }
        let hd = self.shared.cfg.kv_heads * self.shared.cfg.head_dim;
        for &(seq, layer) in &targets {
            let l = &mut st.seqs[seq][layer];
            let from_window = n.min(l.window.len());
            l.window.truncate(l.window.len() - from_window);
            let rest = n - from_window;
            if rest > 0 {
                // Nothing is paged (checked above): drop an empty open page too.
                let keep = l.sinks_k.len() / hd - rest;
                l.sinks_k.truncate(keep * hd);
                l.sinks_v.truncate(keep * hd);
                l.open = None;
            }
            l.n_tokens -= n;
        }
        Ok(())
    }
}

/// Which full-precision region to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Region {
    /// The leading sink tokens.
    Sinks,
    /// The recent window.
    Window,
}

/// `x` rounded to float16 in place; a value beyond float16's range is a typed error.
fn round_to_f16(x: &mut [f32]) -> Result<()> {
    use half::slice::HalfFloatSliceExt;
    let mut h = vec![half::f16::ZERO; x.len()];
    h.convert_from_f32_slice(x);
    if let Some(i) = h.iter().position(|v| v.is_infinite()) {
        return Err(Row::out_of_range(x[i]));
    }
    crate::simd::f16_to_f32(&h, x);
    Ok(())
}

/// Encode `n` leaving tokens (oldest first), `lk`/`lv` Layout `(H, n, D)`, into the open page,
/// closing full pages.
/// Returns the closed pages' blobs and abstracts.
fn encode_into_pages(
    cfg: &StoreConfig,
    books: &LayerBooks,
    ls: &mut LayerState,
    lk: &[f32],
    lv: &[f32],
    n: usize,
) -> Result<Vec<ClosedPage>> {
    let (h, d, p) = (cfg.kv_heads, cfg.head_dim, cfg.page_size);
    let (ck, cv) = cfg.code_bytes();
    // Encode per head in one batch: codes Layout (H, n, c).
    let mut kc = vec![0u8; h * n * ck];
    let mut vc = vec![0u8; h * n * cv];
    for hh in 0..h {
        let rows = hh * n * d..(hh + 1) * n * d;
        books.k[hh].encode_into(&lk[rows.clone()], &mut kc[hh * n * ck..(hh + 1) * n * ck])?;
        books.v[hh].encode_into(&lv[rows], &mut vc[hh * n * cv..(hh + 1) * n * cv])?;
    }
    let mut closed = Vec::new();
    for i in 0..n {
        let tk = |hh: usize| &lk[(hh * n + i) * d..(hh * n + i + 1) * d];
        let tv = |hh: usize| &lv[(hh * n + i) * d..(hh * n + i + 1) * d];
        let o = ls.open.get_or_insert_with(|| OpenPage::new(cfg));
        let slot = o.filled;
        for hh in 0..h {
            let dst = hh * p * ck + slot * ck;
            o.blob[dst..dst + ck].copy_from_slice(&kc[(hh * n + i) * ck..(hh * n + i + 1) * ck]);
            let dst = h * p * ck + hh * p * cv + slot * cv;
            o.blob[dst..dst + cv].copy_from_slice(&vc[(hh * n + i) * cv..(hh * n + i + 1) * cv]);
            if cfg.keep_full_precision {
                let base = h * p * (ck + cv);
                let kd = base + (hh * p + slot) * d * 2;
                f32_to_f16_bytes(tk(hh), &mut o.blob[kd..kd + 2 * d]);
                let vd = base + ((h + hh) * p + slot) * d * 2;
                f32_to_f16_bytes(tv(hh), &mut o.blob[vd..vd + 2 * d]);
            }
            if !cfg.abstracts {
                continue;
            }
            for (dd, &x) in tk(hh).iter().enumerate() {
                let j = hh * d + dd;
                o.kmin[j] = o.kmin[j].min(x);
                o.kmax[j] = o.kmax[j].max(x);
                o.ksum[j] += x as f64;
            }
        }
        o.filled += 1;
        if o.filled == p {
            let full = ls.open.take().expect("just filled");
            let abs = if cfg.abstracts {
                quantize_abstract(&full.abstract_f32(cfg), h, d)
            } else {
                Box::default()
            };
            closed.push((full.blob, abs));
        }
    }
    Ok(closed)
}

#[cfg(test)]
mod tests;
