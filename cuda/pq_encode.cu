// PQ encode on the GPU: nearest centroid of every sub-vector, the same arithmetic as the CPU
// encoder (rust/src/pq/kernels.rs): distance ||c||^2 - 2 c.x accumulated with fused
// multiply-adds in dimension order, ties to the lowest centroid index.
//
// Grid: (ceil(N / tokens_per_block), H, B); block: 256 threads over (token, code byte) pairs; a
// 4-bit byte holds two subquantizers. The head's codebook and centroid norms are staged in
// shared memory when they fit (smem_centroids), else read through the cache.
#include "common.cuh"

namespace ctx {

template <typename T>
__device__ void pq_encode(const PqEncodeParams& p) {
    CTX_DYN_SMEM(smem);
    const int h = blockIdx.y, b = blockIdx.z;
    const int ksub = 1 << p.nbits, dsub = p.d / p.m;
    const int cb = code_bytes(p.m, p.nbits);
    const float* cg = p.centroids + (long long)h * ksub * p.d;
    float* norms = reinterpret_cast<float*>(smem);  // [m][ksub]
    const float* cent = cg;
    if (p.smem_centroids) {
        float* cs = norms + p.m * ksub;
        for (int i = threadIdx.x; i < ksub * p.d; i += blockDim.x) cs[i] = -2.f * cg[i];
        cent = cs;
    }
    for (int i = threadIdx.x; i < p.m * ksub; i += blockDim.x) {
        const float* c = cg + (long long)i * dsub;
        float s = 0.f;
        for (int e = 0; e < dsub; ++e) s = __fadd_rn(s, __fmul_rn(c[e], c[e]));  // unfused, as on the CPU
        norms[i] = s;
    }
    __syncthreads();
    const float cscale = p.smem_centroids ? 1.f : -2.f;
    const long long t0 = (long long)blockIdx.x * p.tokens_per_block;
    const int ntok = (int)min((long long)p.tokens_per_block, (long long)p.n - t0);
    const T* x = static_cast<const T*>(p.x);
    const long long bh = (long long)b * p.h + h;
    for (int u = threadIdx.x; u < ntok * cb; u += blockDim.x) {
        const int tok = u / cb, byte = u - tok * cb;
        const T* xr = x + (bh * p.n + t0 + tok) * p.d;
        const int per = p.nbits == 8 ? 1 : 2;
        int packed = 0;
        for (int k = 0; k < per; ++k) {
            const int j = byte * per + k;
            if (j >= p.m) break;
            float best = INFINITY;
            int bi = 0;
            for (int c = 0; c < ksub; ++c) {
                const float* cc = cent + ((long long)j * ksub + c) * dsub;
                float acc = norms[j * ksub + c];
                for (int e = 0; e < dsub; ++e) acc = fmaf(cscale * cc[e], to_f32(xr[j * dsub + e]), acc);
                if (acc < best) {
                    best = acc;
                    bi = c;
                }
            }
            packed |= bi << (k * 4);
        }
        p.codes[(bh * p.n + t0 + tok) * cb + byte] = (uint8_t)packed;
    }
}

}  // namespace ctx

extern "C" __global__ void pq_encode_f32(const ctx::PqEncodeParams p) { ctx::pq_encode<float>(p); }
extern "C" __global__ void pq_encode_f16(const ctx::PqEncodeParams p) { ctx::pq_encode<__half>(p); }
extern "C" __global__ void pq_encode_bf16(const ctx::PqEncodeParams p) { ctx::pq_encode<__nv_bfloat16>(p); }
