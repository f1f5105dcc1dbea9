// Shared definitions of the ctxcore CUDA kernels: dtype conversions, warp reductions, and the
// parameter blocks passed by value to every kernel.
//
// Every kernel takes a single `const XxxParams` argument. The structs below are mirrored field
// for field by `#[repr(C)]` structs in rust/src/cuda/params.rs (the Rust tests compare their
// sizes with `ctx_params_sizes()` from the CPU emulation build), so change both together.
//
// Pointers are device addresses of contiguous torch tensors. Float inputs are float32, float16
// or bfloat16 (the template parameter `T`); all accumulation is in float32.
//
// The same sources compile with nvcc to PTX (the shipped path) and with a host C++ compiler
// under CTX_EMU (cuda/emu/emu.h), which runs every CUDA thread of a block as a host thread so
// the CPU test suite can check the kernels' indexing and reductions against the CPU reference.
#pragma once

#ifdef CTX_EMU
#include "emu/emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#define CTX_DYN_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace ctx {

constexpr int kWarp = 32;

template <typename T>
__device__ __forceinline__ float to_f32(T x);
template <>
__device__ __forceinline__ float to_f32<float>(float x) {
    return x;
}
template <>
__device__ __forceinline__ float to_f32<__half>(__half x) {
    return __half2float(x);
}
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) {
    return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) {
    return x;
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) {
    return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__host__ __device__ inline int code_bytes(int m, int nbits) { return (m * nbits + 7) / 8; }

// Code of subquantizer `j` in a token's code row: one byte per code at 8 bits; at 4 bits two
// codes per byte, subquantizer j in byte j / 2, low nibble when j is even (ProductQuantizer's
// layout).
__device__ __forceinline__ int pq_code(const uint8_t* row, int j, int nbits) {
    if (nbits == 8) return row[j];
    return (row[j >> 1] >> ((j & 1) * 4)) & 15;
}

// Rows of query (query head x query token) handled by one block of pq_attn_split.
constexpr int kAttnRows = 8;

// ---- parameter blocks (mirrored in rust/src/cuda/params.rs) --------------------------------

// Attention of q over a history of PQ codes followed by a full-precision part (sinks + recent
// window); semantics of torch.ops.ctxcore.pq_attention. Pass 1 (pq_attn_split_*) writes one
// normalized partial (output row, log-sum-exp) per split of the history; pass 2
// (pq_attn_combine_*) merges the partials by log-sum-exp.
struct PqAttnParams {
    const void* q;              // [B, Hq, Tq, D] T
    const uint8_t* k_codes;     // [B, Hkv, N, k_code_bytes]
    const uint8_t* v_codes;     // [B, Hkv, N, v_code_bytes]
    const float* k_centroids;   // [Hkv, k_m, k_ksub, D / k_m]
    const float* v_centroids;   // [Hkv, v_m, v_ksub, D / v_m]
    const int64_t* code_range;  // [B, 2] valid code tokens [start, end)
    const void* fp_k;           // [B, Hkv, F, D] T
    const void* fp_v;           // [B, Hkv, F, D] T
    const int64_t* fp_range;    // [B, 2]
    float* work;                // partial outputs [B*Hq*Tq, splits, D], then lse [B*Hq*Tq, splits]
    void* out;                  // [B, Hq, Tq, D] T
    float* lse;                 // [B, Hq, Tq]
    // Paged mode (selected pages of the codes, in place): page ids [B, Hkv, n / page_size]
    // (-1: none) into each (sequence, KV head)'s `rows` code tokens; code token t of the
    // split walk is row pages[t / page_size] * page_size + t % page_size, attended when that
    // id is >= 0 and the row < rows. code_range is then not read. Null: dense.
    const int64_t* pages;
    int32_t b, hq, hkv, tq, d, n, f;
    int32_t k_m, k_nbits, v_m, v_nbits;
    int32_t code_splits, code_chunk;  // history split into code_splits chunks of code_chunk tokens
    int32_t fp_splits, fp_chunk;      // then the full-precision part, likewise
    int32_t row_tiles;                // ceil(Hq / Hkv * Tq / kAttnRows)
    int32_t causal;
    int32_t half_centroids;  // codebooks staged in shared memory as float16 (else float32)
    int32_t page_size, rows;  // paged mode only (see pages)
    float scale;
    int32_t pad_;
};

// Quest page bounds: scores[b, h, p] = max over the group's query rows of
// sum_d max(q_d * kmin_d, q_d * kmax_d).
struct PageScoresParams {
    const void* q;     // [B, Hq, Tq, D] T
    const void* kmin;  // [B, Hkv, P, D] T
    const void* kmax;  // [B, Hkv, P, D] T
    float* scores;     // [B, Hkv, P]
    int32_t b, hq, hkv, tq, d, p;
};

// Copy the tokens of selected pages: out[b, h, i * page_size + t] = src[b, h, pages[b, h, i] *
// page_size + t] for tokens < n; zeros past the end of the history and for page id -1.
struct PageGatherParams {
    const void* src;       // [B, H, N, D] T
    const int64_t* pages;  // [B, H, K]
    void* out;             // [B, H, K * page_size, D] T
    int32_t b, h, n, d, k, page_size;
    int32_t elem_bytes;
    int32_t pad_;
};

// Nearest-centroid PQ encode: codes[b, h, t] = argmin_c ||x_sub - c||^2 per subquantizer, with
// ties to the lowest index and distances in the expanded form ||c||^2 - 2 c.x (the CPU order).
struct PqEncodeParams {
    const void* x;             // [B, H, N, D] T
    const float* centroids;    // [H, m, ksub, D / m]
    uint8_t* codes;            // [B, H, N, code_bytes]
    int32_t b, h, n, d, m, nbits;
    int32_t smem_centroids;    // centroids (+ norms) staged in shared memory
    int32_t tokens_per_block;
};

}  // namespace ctx
