//! CUDA kernels: launch planning (always compiled) and the driver (feature `cuda`).
//!
//! The kernels live in `cuda/*.cu`. With the `cuda` feature, `build.rs` compiles them to PTX
//! with nvcc, the PTX is embedded in the library, and [`driver`] loads it at run time through
//! the dynamically loaded CUDA driver (cudarc), so the same build runs on machines with no CUDA
//! at all and uses a GPU when one is present.
//!
//! This module holds what does not need a GPU: the parameter blocks ([`params`]), the launch
//! geometry and shared-memory sizing of every kernel ([`plan_pq_attention`] and friends), and
//! input validation. A [`Launch`] is what the driver hands to `cuLaunchKernel`; the tests run
//! the same launches through a CPU emulation of the kernels (`cuda/emu/`) against the CPU
//! reference kernels.
//!
//! Tensors are passed as device addresses of contiguous torch tensors; kernels run on the
//! caller's (torch's current) stream and write their outputs in place.

pub mod params;

#[cfg(feature = "cuda")]
pub mod driver;

pub mod emulator;

#[cfg(test)]
mod emulated_tests;

use crate::attention::check_heads;
use crate::error::{Error, Result};
use crate::pq::code_bytes;
use params::{bytes_of, PageGatherParams, PageScoresParams, PqAttnParams, PqEncodeParams};

/// Threads per block of the attention pass 1 (`kThreads` in `cuda/pq_attention.cu`).
pub const ATTN_THREADS: u32 = 256;
/// Query rows (query head x query token) per attention block (`kAttnRows`).
pub const ATTN_ROWS: usize = 8;
/// Pages scored per block, one warp each (`kPagesPerBlock` in `cuda/page_scores.cu`).
pub const PAGES_PER_BLOCK: usize = 8;
/// Tokens encoded per block by `pq_encode`.
pub const ENCODE_TOKENS: usize = 64;
/// Largest head dimension the attention kernel supports (one output dim per thread).
pub const MAX_HEAD_DIM: usize = 256;
/// Shared memory any kernel may use without opting in.
pub const DEFAULT_SMEM: u32 = 48 * 1024;

/// Element type of the float tensors of a launch (accumulation is always float32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    /// float32.
    F32,
    /// float16.
    F16,
    /// bfloat16.
    BF16,
}

impl DType {
    /// Parse torch's name of the dtype (`"float32"`, `"float16"`, `"bfloat16"`).
    pub fn from_name(name: &str) -> Result<Self> {
        match name.trim_start_matches("torch.") {
            "float32" | "float" => Ok(DType::F32),
            "float16" | "half" => Ok(DType::F16),
            "bfloat16" => Ok(DType::BF16),
            other => Err(Error::DType {
                what: "CUDA kernel input".into(),
                expected: "float32, float16 or bfloat16".into(),
                got: other.into(),
            }),
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

/// What launch planning needs to know about the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceLimits {
    /// Streaming multiprocessors.
    pub sm_count: u32,
    /// Largest dynamic shared memory per block after opting in (227 KiB on H100).
    pub max_smem: u32,
}

impl DeviceLimits {
    /// An H100 SXM: 132 SMs, 227 KiB of shared memory per block.
    pub const H100: DeviceLimits = DeviceLimits {
        sm_count: 132,
        max_smem: 232_448,
    };
}

/// One kernel launch: kernel name, geometry and the bytes of its single parameter block.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    /// `extern "C"` name of the kernel in the PTX.
    pub kernel: String,
    /// Grid (x, y, z).
    pub grid: [u32; 3],
    /// Block (x, y, z).
    pub block: [u32; 3],
    /// Dynamic shared memory in bytes.
    pub smem: u32,
    /// The parameter struct, by value.
    pub params: Vec<u8>,
}

/// Runs [`Launch`]es in order on one stream: the CUDA driver, or the CPU emulation in tests.
pub trait Launcher {
    /// Enqueue one launch.
    fn launch(&self, l: &Launch) -> Result<()>;
}

/// Whether this build has the CUDA kernels (the `cuda` feature, with PTX compiled by nvcc).
pub fn compiled() -> bool {
    #[cfg(feature = "cuda")]
    {
        !driver::ptx_modules().is_empty()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

pub(crate) fn no_cuda() -> Error {
    Error::Device(
        "this build of ctxcore has no CUDA kernels (it was compiled without the `cuda` feature or \
         without nvcc): keep the tensors on the CPU, or reinstall ctxcore \
         from source with `pip install .` (the build fetches nvcc from PyPI)"
            .into(),
    )
}

/// Launch-planning limits of CUDA device `ordinal` (loads the driver and kernels once). Under
/// the CPU emulation ([`emulator::ENV`]): an H100's.
pub fn device_limits(ordinal: i32) -> Result<DeviceLimits> {
    if emulator::Emulator::from_env()?.is_some() {
        return Ok(DeviceLimits::H100);
    }
    #[cfg(feature = "cuda")]
    {
        Ok(driver::device(ordinal)?.limits)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ordinal;
        Err(no_cuda())
    }
}

/// Name, compute capability and limits of CUDA device `ordinal`.
pub fn device_info(ordinal: i32) -> Result<(String, (i32, i32), DeviceLimits)> {
    #[cfg(feature = "cuda")]
    {
        let d = driver::device(ordinal)?;
        Ok((d.name.clone(), d.capability, d.limits))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ordinal;
        Err(no_cuda())
    }
}

/// Enqueue `launches` in order on `stream` of CUDA device `ordinal` (or run them through the
/// CPU emulation when [`emulator::ENV`] names it: tests only).
pub fn run(ordinal: i32, stream: u64, launches: &[Launch]) -> Result<()> {
    if let Some(e) = emulator::Emulator::from_env()? {
        return launches.iter().try_for_each(|l| e.launch(l));
    }
    #[cfg(feature = "cuda")]
    {
        if launches.is_empty() {
            return Ok(());
        }
        let l = driver::StreamLauncher::new(driver::device(ordinal)?, stream);
        launches.iter().try_for_each(|x| l.launch(x))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (ordinal, stream, launches);
        Err(no_cuda())
    }
}

fn i32_of(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        Error::config(format!(
            "{what} = {v} exceeds the CUDA kernels' 32-bit index range (2^31 - 1)"
        ))
    })
}

fn grid_dim(what: &str, v: usize, max: usize) -> Result<u32> {
    if v > max {
        return Err(Error::config(format!(
            "{what} = {v} exceeds the CUDA grid limit {max}; split the call into smaller ones"
        )));
    }
    Ok(v as u32)
}

/// The grid `(items, heads, batch)` the page and encode kernels use, within CUDA's limits.
fn item_head_batch_grid(what: &str, items: usize, heads: usize, batch: usize) -> Result<[u32; 3]> {
    Ok([
        grid_dim(what, items, i32::MAX as usize)?,
        grid_dim("heads", heads, 65_535)?,
        grid_dim("batch", batch, 65_535)?,
    ])
}

fn align16(x: usize) -> usize {
    (x + 15) & !15
}

fn row_stride(bytes: usize) -> usize {
    (bytes.div_ceil(4) | 1) * 4
}

fn check_nbits(what: &str, nbits: u32) -> Result<()> {
    if nbits == 4 || nbits == 8 {
        Ok(())
    } else {
        Err(Error::config(format!(
            "{what}: codes must be 4 or 8 bits (16 or 256 centroids), got {nbits}"
        )))
    }
}

// ---- pq_attention ------------------------------------------------------------------------

/// Sizes of a `pq_attention` call (the semantics of `torch.ops.ctxcore.pq_attention`).
#[derive(Clone, Copy, Debug, PartialEq)]
#[allow(missing_docs)]
pub struct PqAttnShape {
    pub batch: usize,
    pub hq: usize,
    pub hkv: usize,
    pub tq: usize,
    pub d: usize,
    /// Code tokens per (sequence, KV head) in the code tensors.
    pub n: usize,
    /// Full-precision tokens per (sequence, KV head).
    pub f: usize,
    pub k_m: usize,
    pub k_nbits: u32,
    pub v_m: usize,
    pub v_nbits: u32,
    /// dtype of q, fp_k, fp_v and out.
    pub dtype: DType,
    pub scale: f32,
    pub causal: bool,
    /// Paged mode: only the code tokens of selected pages are attended, in place (the
    /// semantics of `torch.ops.ctxcore.pq_paged_attention`); `None`: dense.
    pub paged: Option<PagedCodes>,
}

/// Paged mode of [`PqAttnShape`]: `ids` page ids per (sequence, KV head), Layout
/// `(batch, hkv, ids)` int64 at [`PqAttnPtrs::pages`]; page `p` is code tokens
/// `[p * page_size, min((p + 1) * page_size, n))`; negative ids are skipped; ids must be in
/// range and distinct (the caller checks: the kernel skips rows past `n`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct PagedCodes {
    pub page_size: usize,
    pub ids: usize,
}

/// Device addresses of the tensors of a `pq_attention` call (all contiguous).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct PqAttnPtrs {
    pub q: u64,
    pub k_codes: u64,
    pub v_codes: u64,
    pub k_centroids: u64,
    pub v_centroids: u64,
    /// int64 `[B, 2]`.
    pub code_range: u64,
    pub fp_k: u64,
    pub fp_v: u64,
    /// int64 `[B, 2]`.
    pub fp_range: u64,
    pub out: u64,
    /// float32 `[B, Hq, Tq]`.
    pub lse: u64,
    /// int64 `[B, Hkv, ids]` page ids (paged mode; 0 otherwise).
    pub pages: u64,
}

/// A planned `pq_attention`: split counts, shared memory, and the workspace it needs.
#[derive(Clone, Debug, PartialEq)]
pub struct PqAttnPlan {
    params: PqAttnParams,
    dtype: DType,
    smem: usize,
    paged: bool,
    /// Bytes of float32 workspace (partial outputs and log-sum-exps); allocate them on the
    /// device and pass the address to [`PqAttnPlan::launches`].
    pub work_bytes: usize,
}

/// Shared memory of attention pass 1, as `attn_smem` in `cuda/pq_attention.cu` computes it.
fn attn_smem(p: &PqAttnParams) -> usize {
    let d = p.d as usize;
    let threads = ATTN_THREADS as usize;
    let tg = if d <= threads { threads / d } else { 1 };
    let csize = if p.half_centroids != 0 { 2 } else { 4 };
    let (kksub, vksub) = (1usize << p.k_nbits, 1usize << p.v_nbits);
    let kstride = row_stride(code_bytes(p.k_m as usize, p.k_nbits as u32));
    let vstride = row_stride(code_bytes(p.v_m as usize, p.v_nbits as u32));
    let mut off = align16(ATTN_ROWS * d * 4)
        + align16(ATTN_ROWS * threads * 4)
        + align16(threads / 32 * ATTN_ROWS * 4)
        + align16(tg * ATTN_ROWS * (d + 1) * 4);
    if p.code_splits > 0 {
        off += align16(kksub * d * csize)
            + align16(vksub * d * csize)
            + align16(threads * kstride)
            + align16(threads * vstride);
    }
    off
}

/// Split a history of `len` tokens into at most `want` chunks of whole tiles.
fn split(len: usize, want: usize) -> (usize, usize) {
    if len == 0 {
        return (0, 0);
    }
    let tile = ATTN_THREADS as usize;
    let splits = want.clamp(1, len.div_ceil(tile));
    let chunk = len.div_ceil(splits).div_ceil(tile) * tile;
    (len.div_ceil(chunk), chunk)
}

/// Plan a `pq_attention` call on a GPU with limits `lim`: validates the sizes, splits the
/// history so that the grid fills the GPU about twice, and sizes shared memory (codebooks
/// staged as float32 when they fit, else float16).
pub fn plan_pq_attention(s: &PqAttnShape, lim: &DeviceLimits) -> Result<PqAttnPlan> {
    check_heads(s.hq, s.hkv)?;
    if s.d == 0 || s.d > MAX_HEAD_DIM {
        return Err(Error::config(format!(
            "head_dim {} is not supported by the CUDA attention kernel (1 to {MAX_HEAD_DIM})",
            s.d
        )));
    }
    check_nbits("k_centroids", s.k_nbits)?;
    check_nbits("v_centroids", s.v_nbits)?;
    for (what, m) in [("k", s.k_m), ("v", s.v_m)] {
        if m == 0 || !s.d.is_multiple_of(m) {
            return Err(Error::config(format!(
                "{what}_centroids: {m} subquantizers do not divide head_dim {}",
                s.d
            )));
        }
    }
    let rows = s.hq / s.hkv * s.tq;
    let row_tiles = rows.div_ceil(ATTN_ROWS);
    let base = (s.batch * s.hkv * row_tiles).max(1);
    let want = (2 * lim.sm_count as usize).div_ceil(base);
    // Code tokens the splits walk: every row, or (paged) every slot of every selected page.
    let walk = match s.paged {
        None => s.n,
        Some(pg) => {
            if pg.page_size == 0 {
                return Err(Error::config("page_size must be positive"));
            }
            // No code tokens: every id is -1 (the caller checks), nothing to walk.
            if s.n == 0 {
                0
            } else {
                pg.ids.checked_mul(pg.page_size).ok_or_else(|| {
                    Error::config("pq_paged_attention: page ids x page_size overflows")
                })?
            }
        }
    };
    let (code_splits, code_chunk) = split(walk, want);
    let (fp_splits, fp_chunk) = split(s.f, want);
    let mut p = PqAttnParams {
        b: i32_of("batch", s.batch)?,
        hq: i32_of("query heads", s.hq)?,
        hkv: i32_of("KV heads", s.hkv)?,
        tq: i32_of("query tokens", s.tq)?,
        d: s.d as i32,
        n: i32_of("code tokens", walk)?,
        f: i32_of("full-precision tokens", s.f)?,
        k_m: s.k_m as i32,
        k_nbits: s.k_nbits as i32,
        v_m: s.v_m as i32,
        v_nbits: s.v_nbits as i32,
        code_splits: i32_of("code splits", code_splits)?,
        code_chunk: i32_of("code chunk", code_chunk)?,
        fp_splits: i32_of("fp splits", fp_splits)?,
        fp_chunk: i32_of("fp chunk", fp_chunk)?,
        row_tiles: i32_of("row tiles", row_tiles)?,
        causal: s.causal as i32,
        page_size: i32_of("page size", s.paged.map_or(0, |pg| pg.page_size))?,
        rows: i32_of("code tokens", s.n)?,
        scale: s.scale,
        ..Default::default()
    };
    let mut smem = attn_smem(&p);
    if smem > lim.max_smem as usize {
        p.half_centroids = 1;
        smem = attn_smem(&p);
    }
    if smem > lim.max_smem as usize {
        return Err(Error::config(format!(
            "pq_attention needs {smem} bytes of shared memory per block at head_dim {} with \
             {}/{} centroids, but this GPU allows {}; use fewer bits per code",
            s.d,
            1 << s.k_nbits,
            1 << s.v_nbits,
            lim.max_smem
        )));
    }
    let splits = code_splits + fp_splits;
    let rows_all = s.batch * s.hq * s.tq;
    grid_dim("batch", s.batch, 65_535)?;
    grid_dim("KV heads x row tiles", s.hkv * row_tiles, 65_535)?;
    grid_dim(
        "batch x query heads x query tokens",
        rows_all,
        i32::MAX as usize,
    )?;
    Ok(PqAttnPlan {
        params: p,
        dtype: s.dtype,
        smem,
        paged: s.paged.is_some(),
        work_bytes: rows_all * splits * (s.d + 1) * 4,
    })
}

impl PqAttnPlan {
    /// Splits of the history (code chunks + full-precision chunks).
    pub fn splits(&self) -> usize {
        (self.params.code_splits + self.params.fp_splits) as usize
    }

    /// Whether the codebooks are staged in shared memory as float16.
    pub fn half_centroids(&self) -> bool {
        self.params.half_centroids != 0
    }

    /// Dynamic shared memory of pass 1.
    pub fn smem(&self) -> usize {
        self.smem
    }

    /// The launches, in order: pass 1 (skipped when there is no history) and pass 2. `work`:
    /// device address of at least [`PqAttnPlan::work_bytes`] bytes (float32-aligned).
    pub fn launches(&self, ptrs: &PqAttnPtrs, work: u64) -> Vec<Launch> {
        let p = PqAttnParams {
            q: ptrs.q,
            k_codes: ptrs.k_codes,
            v_codes: ptrs.v_codes,
            k_centroids: ptrs.k_centroids,
            v_centroids: ptrs.v_centroids,
            code_range: ptrs.code_range,
            fp_k: ptrs.fp_k,
            fp_v: ptrs.fp_v,
            fp_range: ptrs.fp_range,
            work,
            out: ptrs.out,
            lse: ptrs.lse,
            pages: if self.paged { ptrs.pages } else { 0 },
            ..self.params
        };
        let rows_all = (p.b * p.hq * p.tq) as u32;
        if rows_all == 0 {
            return Vec::new();
        }
        let sfx = self.dtype.suffix();
        let bytes = bytes_of(&p);
        let mut out = Vec::with_capacity(2);
        if self.splits() > 0 {
            out.push(Launch {
                kernel: format!("pq_attn_split_{sfx}"),
                grid: [
                    self.splits() as u32,
                    (p.hkv * p.row_tiles) as u32,
                    p.b as u32,
                ],
                block: [ATTN_THREADS, 1, 1],
                smem: self.smem as u32,
                params: bytes.clone(),
            });
        }
        out.push(Launch {
            kernel: format!("pq_attn_combine_{sfx}"),
            grid: [rows_all, 1, 1],
            block: [(p.d as u32).div_ceil(32).min(8) * 32, 1, 1],
            smem: 0,
            params: bytes,
        });
        out
    }
}

// ---- page_scores --------------------------------------------------------------------------

/// Launch of Quest page scores: `q [B, Hq, Tq, D]`, `kmin`/`kmax [B, Hkv, P, D]` in `dtype`,
/// `scores [B, Hkv, P]` float32 (addresses in that order).
#[allow(clippy::too_many_arguments)]
pub fn page_scores_launch(
    batch: usize,
    hq: usize,
    hkv: usize,
    tq: usize,
    pages: usize,
    d: usize,
    dtype: DType,
    ptrs: [u64; 4],
) -> Result<Option<Launch>> {
    check_heads(hq, hkv)?;
    if batch * hkv * pages == 0 {
        return Ok(None);
    }
    let p = PageScoresParams {
        q: ptrs[0],
        kmin: ptrs[1],
        kmax: ptrs[2],
        scores: ptrs[3],
        b: i32_of("batch", batch)?,
        hq: i32_of("query heads", hq)?,
        hkv: i32_of("KV heads", hkv)?,
        tq: i32_of("query tokens", tq)?,
        d: i32_of("head_dim", d)?,
        p: i32_of("pages", pages)?,
    };
    Ok(Some(Launch {
        kernel: format!("page_scores_{}", dtype.suffix()),
        grid: item_head_batch_grid("page blocks", pages.div_ceil(PAGES_PER_BLOCK), hkv, batch)?,
        block: [(PAGES_PER_BLOCK * 32) as u32, 1, 1],
        smem: 0,
        params: bytes_of(&p),
    }))
}

// ---- page_gather --------------------------------------------------------------------------

/// Launch of a page gather: `src [B, H, N, D]` (elements of `elem_bytes`), `pages [B, H, K]`
/// int64, `out [B, H, K * page_size, D]` (addresses in that order).
#[allow(clippy::too_many_arguments)]
pub fn page_gather_launch(
    batch: usize,
    heads: usize,
    n: usize,
    d: usize,
    k: usize,
    page_size: usize,
    elem_bytes: usize,
    ptrs: [u64; 3],
) -> Result<Option<Launch>> {
    if page_size == 0 {
        return Err(Error::config("page_size must be >= 1"));
    }
    if batch * heads * k * d == 0 {
        return Ok(None);
    }
    let p = PageGatherParams {
        src: ptrs[0],
        pages: ptrs[1],
        out: ptrs[2],
        b: i32_of("batch", batch)?,
        h: i32_of("heads", heads)?,
        n: i32_of("tokens", n)?,
        d: i32_of("head_dim", d)?,
        k: i32_of("pages", k)?,
        page_size: i32_of("page_size", page_size)?,
        elem_bytes: i32_of("element size", elem_bytes)?,
        pad_: 0,
    };
    Ok(Some(Launch {
        kernel: "page_gather".into(),
        grid: item_head_batch_grid("gathered tokens", k * page_size, heads, batch)?,
        block: [128, 1, 1],
        smem: 0,
        params: bytes_of(&p),
    }))
}

// ---- pq_encode ----------------------------------------------------------------------------

/// Launch of a PQ encode: `x [B, H, N, D]` in `dtype`, `centroids [H, m, 2^nbits, D / m]`
/// float32, `codes [B, H, N, code_bytes]` uint8 (addresses in that order).
#[allow(clippy::too_many_arguments)]
pub fn pq_encode_launch(
    batch: usize,
    heads: usize,
    n: usize,
    d: usize,
    m: usize,
    nbits: u32,
    dtype: DType,
    lim: &DeviceLimits,
    ptrs: [u64; 3],
) -> Result<Option<Launch>> {
    check_nbits("centroids", nbits)?;
    if m == 0 || !d.is_multiple_of(m) {
        return Err(Error::config(format!(
            "centroids: {m} subquantizers do not divide the dimension {d}"
        )));
    }
    if batch * heads * n == 0 {
        return Ok(None);
    }
    let ksub = 1usize << nbits;
    let norms = m * ksub * 4;
    let staged = norms + ksub * d * 4;
    let (smem_centroids, smem) = if staged <= lim.max_smem as usize {
        (1, staged)
    } else {
        (0, norms)
    };
    if smem > lim.max_smem as usize {
        return Err(Error::config(format!(
            "pq_encode: {m} x {ksub} centroid norms need {smem} bytes of shared memory, this \
             GPU allows {}",
            lim.max_smem
        )));
    }
    let p = PqEncodeParams {
        x: ptrs[0],
        centroids: ptrs[1],
        codes: ptrs[2],
        b: i32_of("batch", batch)?,
        h: i32_of("heads", heads)?,
        n: i32_of("tokens", n)?,
        d: i32_of("dimension", d)?,
        m: m as i32,
        nbits: nbits as i32,
        smem_centroids,
        tokens_per_block: ENCODE_TOKENS as i32,
    };
    Ok(Some(Launch {
        kernel: format!("pq_encode_{}", dtype.suffix()),
        grid: item_head_batch_grid("token blocks", n.div_ceil(ENCODE_TOKENS), heads, batch)?,
        block: [256, 1, 1],
        smem: smem as u32,
        params: bytes_of(&p),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(n: usize, f: usize, d: usize) -> PqAttnShape {
        PqAttnShape {
            batch: 1,
            hq: 32,
            hkv: 8,
            tq: 1,
            d,
            n,
            f,
            k_m: d / 2,
            k_nbits: 8,
            v_m: d / 2,
            v_nbits: 8,
            dtype: DType::F16,
            scale: 0.1,
            causal: true,
            paged: None,
        }
    }

    #[test]
    fn attention_splits_fill_the_gpu_and_cover_the_history() {
        for n in [1usize, 255, 256, 257, 10_000, 131_072, 1 << 20] {
            let plan = plan_pq_attention(&shape(n, 128, 128), &DeviceLimits::H100).unwrap();
            let p = plan.params;
            // Code splits cover [0, n) exactly with whole tiles.
            assert!(p.code_splits as usize * p.code_chunk as usize >= n);
            assert!((p.code_splits as usize - 1) * (p.code_chunk as usize) < n);
            assert_eq!(p.code_chunk as u32 % ATTN_THREADS, 0);
            assert_eq!(p.fp_splits, 1);
            // About 2 waves of 132 SMs (8 KV heads x 1 row tile per split) when the history
            // has enough tiles; whole-tile rounding may cost up to half of that.
            let want = 264usize.div_ceil(8).min(n.div_ceil(256));
            assert!(
                p.code_splits as usize * 2 >= want,
                "n={n}: {} splits",
                p.code_splits
            );
            assert_eq!(plan.work_bytes, 32 * plan.splits() * 129 * 4);
        }
    }

    #[test]
    fn attention_shared_memory_falls_back_to_half_codebooks() {
        // head_dim 64, 256 centroids: float32 codebooks fit; head_dim 128 they do not.
        let p64 = plan_pq_attention(&shape(4096, 0, 64), &DeviceLimits::H100).unwrap();
        assert!(!p64.half_centroids());
        let p128 = plan_pq_attention(&shape(4096, 0, 128), &DeviceLimits::H100).unwrap();
        assert!(p128.half_centroids());
        assert!(p128.smem() <= DeviceLimits::H100.max_smem as usize);
        // A GPU with 48 KiB cannot hold 2 x 256 x 128 half centroids.
        let small = DeviceLimits {
            sm_count: 10,
            max_smem: DEFAULT_SMEM,
        };
        let e = plan_pq_attention(&shape(4096, 0, 128), &small).unwrap_err();
        assert!(e.to_string().contains("shared memory"), "{e}");
        // No code tokens: no codebooks staged at all.
        let fp_only = plan_pq_attention(&shape(0, 100, 128), &small).unwrap();
        assert_eq!(fp_only.params.code_splits, 0);
    }

    #[test]
    fn attention_launch_geometry() {
        let mut s = shape(1000, 50, 64);
        s.hq = 24;
        s.hkv = 3; // GQA 8
        s.tq = 3; // 24 rows per KV head -> 3 row tiles
        s.batch = 2;
        let plan = plan_pq_attention(&s, &DeviceLimits::H100).unwrap();
        let ptrs = PqAttnPtrs {
            q: 16,
            ..Default::default()
        };
        let l = plan.launches(&ptrs, 4096);
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].kernel, "pq_attn_split_f16");
        assert_eq!(l[0].grid, [plan.splits() as u32, 9, 2]);
        assert_eq!(l[1].kernel, "pq_attn_combine_f16");
        assert_eq!(l[1].grid, [2 * 24 * 3, 1, 1]);
        assert_eq!(l[1].block, [64, 1, 1]);
        assert_eq!(l[0].params.len(), std::mem::size_of::<PqAttnParams>());
        // Empty history: only the combine pass (zeros, lse = -inf).
        let empty = plan_pq_attention(&shape(0, 0, 64), &DeviceLimits::H100).unwrap();
        let l = empty.launches(&ptrs, 0);
        assert_eq!(l.len(), 1);
        assert_eq!(empty.work_bytes, 0);
    }

    #[test]
    fn bad_shapes_are_config_errors() {
        let mut s = shape(10, 0, 64);
        s.hkv = 5;
        assert!(matches!(
            plan_pq_attention(&s, &DeviceLimits::H100),
            Err(Error::Config(_))
        ));
        let mut s = shape(10, 0, 64);
        s.d = 512;
        s.k_m = 256;
        s.v_m = 256;
        let e = plan_pq_attention(&s, &DeviceLimits::H100).unwrap_err();
        assert!(e.to_string().contains("head_dim 512"), "{e}");
        let mut s = shape(10, 0, 64);
        s.k_nbits = 2;
        assert!(plan_pq_attention(&s, &DeviceLimits::H100).is_err());
        let mut s = shape(10, 0, 64);
        s.v_m = 48;
        assert!(plan_pq_attention(&s, &DeviceLimits::H100).is_err());
        let mut s = shape(10, 0, 64);
        s.batch = 70_000;
        let e = plan_pq_attention(&s, &DeviceLimits::H100).unwrap_err();
        assert!(e.to_string().contains("grid limit"), "{e}");
        assert!(DType::from_name("torch.int8").is_err());
        assert_eq!(DType::from_name("torch.bfloat16").unwrap(), DType::BF16);
        assert!(page_gather_launch(1, 1, 1, 1, 1, 0, 2, [0; 3]).is_err());
        assert!(
            pq_encode_launch(1, 1, 1, 64, 7, 8, DType::F32, &DeviceLimits::H100, [0; 3]).is_err()
        );
    }

    #[test]
    fn empty_inputs_launch_nothing() {
        assert!(page_scores_launch(1, 4, 2, 1, 0, 64, DType::F32, [0; 4])
            .unwrap()
            .is_none());
        assert!(page_gather_launch(1, 2, 10, 64, 0, 16, 2, [0; 3])
            .unwrap()
            .is_none());
        assert!(
            pq_encode_launch(1, 2, 0, 64, 32, 8, DType::F32, &DeviceLimits::H100, [0; 3])
                .unwrap()
                .is_none()
        );
    }
}
