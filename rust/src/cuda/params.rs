//! Kernel parameter blocks, mirrored field for field from `cuda/common.cuh`.
//!
//! Every kernel takes one of these structs by value. `#[repr(C)]` gives the C layout; the CPU
//! emulation tests compare `size_of` with the C++ compiler's `sizeof` of the same structs.
//! Pointers are device addresses (`u64`), counts `i32` as in the kernels.

/// `ctx::PqAttnParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[allow(missing_docs)]
pub struct PqAttnParams {
    pub q: u64,
    pub k_codes: u64,
    pub v_codes: u64,
    pub k_centroids: u64,
    pub v_centroids: u64,
    pub code_range: u64,
    pub fp_k: u64,
    pub fp_v: u64,
    pub fp_range: u64,
    pub work: u64,
    pub out: u64,
    pub lse: u64,
    pub pages: u64,
    pub b: i32,
    pub hq: i32,
    pub hkv: i32,
    pub tq: i32,
    pub d: i32,
    pub n: i32,
    pub f: i32,
    pub k_m: i32,
    pub k_nbits: i32,
    pub v_m: i32,
    pub v_nbits: i32,
    pub code_splits: i32,
    pub code_chunk: i32,
    pub fp_splits: i32,
    pub fp_chunk: i32,
    pub row_tiles: i32,
    pub causal: i32,
    pub half_centroids: i32,
    pub page_size: i32,
    pub rows: i32,
    pub scale: f32,
    pub pad_: i32,
}

/// `ctx::PageScoresParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[allow(missing_docs)]
pub struct PageScoresParams {
    pub q: u64,
    pub kmin: u64,
    pub kmax: u64,
    pub scores: u64,
    pub b: i32,
    pub hq: i32,
    pub hkv: i32,
    pub tq: i32,
    pub d: i32,
    pub p: i32,
}

/// `ctx::PageGatherParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[allow(missing_docs)]
pub struct PageGatherParams {
    pub src: u64,
    pub pages: u64,
    pub out: u64,
    pub b: i32,
    pub h: i32,
    pub n: i32,
    pub d: i32,
    pub k: i32,
    pub page_size: i32,
    pub elem_bytes: i32,
    pub pad_: i32,
}

/// `ctx::PqEncodeParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[allow(missing_docs)]
pub struct PqEncodeParams {
    pub x: u64,
    pub centroids: u64,
    pub codes: u64,
    pub b: i32,
    pub h: i32,
    pub n: i32,
    pub d: i32,
    pub m: i32,
    pub nbits: i32,
    pub smem_centroids: i32,
    pub tokens_per_block: i32,
}

/// The bytes of a parameter block, as the kernel receives them.
pub(crate) fn bytes_of<T: Copy>(p: &T) -> Vec<u8> {
    // SAFETY: the parameter structs are `#[repr(C)]` plain data laid out without padding (explicit
    // `pad_` fields fill what alignment would leave), so every byte is initialized.
    unsafe { std::slice::from_raw_parts((p as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
        .to_vec()
}
