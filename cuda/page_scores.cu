// Quest page scores: an upper bound of q . k over each page's keys from the page's per-dimension
// key bounds, maximized over the query rows (GQA group x query tokens) of the KV head. The
// caller picks the top pages with torch.topk on the same stream. Semantics and CPU reference:
// torch.ops.ctxcore.page_scores / rust/src/attention/cpu.rs (page_scores).
//
// Grid: (ceil(P / kPagesPerBlock), Hkv, B); block: kPagesPerBlock warps, one warp per page, lanes
// over dimensions.
#include "common.cuh"

namespace ctx {

constexpr int kPagesPerBlock = 8;

template <typename T>
__device__ void page_scores(const PageScoresParams& p) {
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    const long long page = (long long)blockIdx.x * kPagesPerBlock + warp;
    const int h = blockIdx.y, b = blockIdx.z;
    if (page >= p.p) return;  // whole warp leaves together: the shuffles below stay full-warp
    const int group = p.hq / p.hkv;
    const T* q = static_cast<const T*>(p.q);
    const long long kv = (((long long)b * p.hkv + h) * p.p + page) * p.d;
    const T* lo = static_cast<const T*>(p.kmin) + kv;
    const T* hi = static_cast<const T*>(p.kmax) + kv;
    float best = -INFINITY;
    for (int r = 0; r < group * p.tq; ++r) {
        const int hq = h * group + r / p.tq, t = r % p.tq;
        const T* qr = q + (((long long)b * p.hq + hq) * p.tq + t) * p.d;
        float s = 0.f;
        for (int d = lane; d < p.d; d += kWarp) {
            const float qd = to_f32(qr[d]);
            s += fmaxf(qd * to_f32(lo[d]), qd * to_f32(hi[d]));
        }
        best = fmaxf(best, warp_sum(s));
    }
    if (lane == 0) p.scores[((long long)b * p.hkv + h) * p.p + page] = best;
}

}  // namespace ctx

extern "C" __global__ void page_scores_f32(const ctx::PageScoresParams p) { ctx::page_scores<float>(p); }
extern "C" __global__ void page_scores_f16(const ctx::PageScoresParams p) { ctx::page_scores<__half>(p); }
extern "C" __global__ void page_scores_bf16(const ctx::PageScoresParams p) {
    ctx::page_scores<__nv_bfloat16>(p);
}
