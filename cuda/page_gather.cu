// Page gather for selective attention: copies the tokens of the selected pages of a [B, H, N, D]
// history into a contiguous [B, H, K * page_size, D] tensor (zeros past the end of the history
// and for page id -1), which then goes through exact attention with the recent window.
//
// Grid: (K * page_size, H, B); block: 128 threads copying one token row in 16-byte words when
// the row allows it, else element by element. Dtype-agnostic (moves elem_bytes-wide elements).
#include "common.cuh"

namespace ctx {

__device__ void gather_rows(const PageGatherParams& p) {
    const int slot = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int i = slot / p.page_size, t = slot - i * p.page_size;
    const long long bh = (long long)b * p.h + h;
    const long long page = p.pages[bh * p.k + i];
    const long long tok = page * p.page_size + t;
    const bool valid = page >= 0 && tok < p.n;
    const long long row_bytes = (long long)p.d * p.elem_bytes;
    const uint8_t* src = static_cast<const uint8_t*>(p.src) + (bh * p.n + (valid ? tok : 0)) * row_bytes;
    uint8_t* dst = static_cast<uint8_t*>(p.out) + (bh * p.k * p.page_size + slot) * row_bytes;
    if ((row_bytes & 15) == 0 && (reinterpret_cast<uintptr_t>(src) & 15) == 0 &&
        (reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
        const uint4* s4 = reinterpret_cast<const uint4*>(src);
        uint4* d4 = reinterpret_cast<uint4*>(dst);
        for (long long w = threadIdx.x; w < row_bytes / 16; w += blockDim.x) {
            d4[w] = valid ? s4[w] : make_uint4(0, 0, 0, 0);
        }
    } else {
        for (long long w = threadIdx.x; w < row_bytes; w += blockDim.x) dst[w] = valid ? src[w] : 0;
    }
}

}  // namespace ctx

extern "C" __global__ void page_gather(const ctx::PageGatherParams p) { ctx::gather_rows(p); }
