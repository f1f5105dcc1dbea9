// CPU emulation of the subset of CUDA the ctxcore kernels use, for the host test suite.
//
// Each CUDA thread of a block runs as a host thread; blocks run one after another. Shared
// memory is one buffer per block, filled with 0xFF bytes (float NaN) before each block so a
// read of uninitialized shared memory shows up as NaN in the results. __syncthreads is a
// barrier over the block's threads and warp shuffles exchange through a per-warp buffer; a
// thread that returns early drops out of both, as on the GPU. This checks indexing, masking and
// reductions on machines without a GPU; it says nothing about speed, and the GPU tests remain
// the authority on memory-model or scheduling bugs.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }

struct __half {
    uint16_t bits;
};
struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __half2float(__half h) {
    _Float16 f;
    std::memcpy(&f, &h.bits, 2);
    return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
    _Float16 f = static_cast<_Float16>(v);
    __half h;
    std::memcpy(&h.bits, &f, 2);
    return h;
}
inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t u = static_cast<uint32_t>(h.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    if (std::isnan(f)) return {0x7FC0};
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return {static_cast<uint16_t>(u >> 16)};
}

inline float __expf(float x) { return std::exp(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
using std::max;
using std::min;

namespace emu {

struct Warp {
    explicit Warp(std::ptrdiff_t n) : bar(n) {}
    float vals[32];
    std::barrier<> bar;
};

struct Block {
    std::unique_ptr<std::barrier<>> bar;
    std::vector<std::unique_ptr<Warp>> warps;
    unsigned char* smem = nullptr;
};

inline thread_local dim3 tidx, bidx, bdim, gdim;
inline thread_local Block* block = nullptr;

inline unsigned linear_tid() { return tidx.x + bdim.x * (tidx.y + bdim.y * tidx.z); }

inline float shfl_xor(float v, int o) {
    const unsigned t = linear_tid();
    Warp& w = *block->warps[t / 32];
    const unsigned lane = t % 32;
    w.vals[lane] = v;
    w.bar.arrive_and_wait();
    const float r = w.vals[lane ^ static_cast<unsigned>(o)];
    w.bar.arrive_and_wait();
    return r;
}

using KernelFn = void (*)(const void*);

// Run `fn` over the grid: blocks in sequence, the threads of a block concurrently.
inline void run(KernelFn fn, dim3 grid, dim3 blk, size_t smem_bytes, const void* params) {
    const unsigned nt = blk.x * blk.y * blk.z;
    std::unique_ptr<unsigned char[]> smem(new unsigned char[smem_bytes + 16]);
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                std::memset(smem.get(), 0xFF, smem_bytes + 16);
                Block b;
                b.bar = std::make_unique<std::barrier<>>(nt);
                b.smem = smem.get();
                for (unsigned w = 0; w < (nt + 31) / 32; ++w)
                    b.warps.push_back(std::make_unique<Warp>(std::min(32u, nt - w * 32)));
                std::vector<std::thread> threads;
                threads.reserve(nt);
                for (unsigned t = 0; t < nt; ++t) {
                    threads.emplace_back([&, t] {
                        tidx = {t % blk.x, (t / blk.x) % blk.y, t / (blk.x * blk.y)};
                        bidx = {x, y, z};
                        bdim = blk;
                        gdim = grid;
                        block = &b;
                        fn(params);
                        b.warps[t / 32]->bar.arrive_and_drop();
                        b.bar->arrive_and_drop();
                    });
                }
                for (auto& th : threads) th.join();
            }
}

}  // namespace emu

#define threadIdx (emu::tidx)
#define blockIdx (emu::bidx)
#define blockDim (emu::bdim)
#define gridDim (emu::gdim)
#define __syncthreads() (emu::block->bar->arrive_and_wait())
#define __shfl_xor_sync(mask, v, o) (emu::shfl_xor((v), (o)))
#define CTX_DYN_SMEM(name) unsigned char* name = emu::block->smem
