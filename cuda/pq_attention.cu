// Decode attention over PQ-compressed keys/values plus a full-precision tail, split-K
// (flash-decoding): pass 1 splits the history across blocks, each writing a normalized partial
// output and its log-sum-exp; pass 2 merges the partials. Semantics and the CPU reference:
// torch.ops.ctxcore.pq_attention / rust/src/attention/cpu/. In paged mode (PqAttnParams::pages)
// the code tokens are those of selected pages, read in place: torch.ops.ctxcore.pq_paged_attention.
//
// Pass 1 grid: (code_splits + fp_splits, Hkv * row_tiles, B); block: kThreads threads.
// A block owns one KV head, up to kAttnRows query rows of its GQA group (query head x query
// token) and one chunk of tokens, walked in tiles of kThreads tokens:
//   1. the tile's K and V code rows are copied to shared memory (coalesced);
//   2. thread t scores token t for every row: the K codebook of the head is staged in shared
//      memory once per block, so each code costs one shared-memory gather and dsub FMAs per
//      row. (A per-query lookup table would be m * 256 floats per query row, 64 KiB at
//      head_dim 128 with 8-bit codes: a GQA group's tables do not fit in shared memory, the
//      staged codebook serves every row of the group);
//   3. online softmax: block max per row, p = exp(s - m) kept in shared memory;
//   4. threads own output dims (groups of D threads over interleaved tokens) and accumulate
//      p * V-centroid, decoding V codes from the staged V codebook.
// Full-precision splits do the same with K/V rows read from global memory and the causal mask.
//
// Pass 2 grid: (B * Hq * Tq); block: D rounded up to a warp. One output row per block.
#include "common.cuh"

namespace ctx {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;

__host__ __device__ inline int align16(int x) { return (x + 15) & ~15; }

// Shared-memory layout of pass 1; the host computes the same sizes (rust/src/cuda/plan.rs).
struct AttnSmem {
    int q_off, p_off, wmax_off, kcent_off, vcent_off, kcode_off, vcode_off, red_off, total;
    int kstride, vstride;  // bytes per staged code row (odd number of 32-bit words)
};

// Bytes per staged code row: an odd number of 32-bit words, so threads reading their own rows
// hit distinct shared-memory banks.
__host__ __device__ inline int row_stride(int bytes) { return (((bytes + 3) / 4) | 1) * 4; }

__host__ __device__ inline AttnSmem attn_smem(const PqAttnParams& p) {
    AttnSmem s;
    const int d = p.d;
    const int tg = d <= kThreads ? kThreads / d : 1;
    const int csize = p.half_centroids ? 2 : 4;
    const int kksub = 1 << p.k_nbits, vksub = 1 << p.v_nbits;
    s.kstride = row_stride(code_bytes(p.k_m, p.k_nbits));
    s.vstride = row_stride(code_bytes(p.v_m, p.v_nbits));
    int off = 0;
    s.q_off = off;
    off += align16(kAttnRows * d * 4);
    s.p_off = off;
    off += align16(kAttnRows * kThreads * 4);
    s.wmax_off = off;
    off += align16(kWarps * kAttnRows * 4);
    s.red_off = off;
    off += align16(tg * kAttnRows * (d + 1) * 4);
    s.kcent_off = off;
    s.vcent_off = off;
    s.kcode_off = off;
    s.vcode_off = off;
    if (p.code_splits > 0) {
        off += align16(kksub * d * csize);
        s.vcent_off = off;
        off += align16(vksub * d * csize);
        s.kcode_off = off;
        off += align16(kThreads * s.kstride);
        s.vcode_off = off;
        off += align16(kThreads * s.vstride);
    }
    s.total = off;
    return s;
}

// Copy `rows` code rows of `bytes` bytes (contiguous in global memory) to shared memory rows of
// `stride` bytes.
__device__ inline void stage_codes(const uint8_t* __restrict__ g, uint8_t* s, int rows, int bytes,
                                   int stride) {
    const int tid = threadIdx.x;
    if ((bytes & 3) == 0 && (reinterpret_cast<uintptr_t>(g) & 3) == 0) {
        const int words = bytes >> 2, sw = stride >> 2;
        const uint32_t* gw = reinterpret_cast<const uint32_t*>(g);
        uint32_t* swp = reinterpret_cast<uint32_t*>(s);
        for (int i = tid; i < rows * words; i += kThreads) {
            const int r = i / words, c = i - r * words;
            swp[r * sw + c] = gw[i];
        }
    } else {
        for (int i = tid; i < rows * bytes; i += kThreads) {
            const int r = i / bytes, c = i - r * bytes;
            s[r * stride + c] = g[i];
        }
    }
}

// Row (in the (sequence, KV head)'s code tensor) of code token t in paged mode, or -1 when t
// falls on no page (id -1) or past the last row.
__device__ inline long long paged_row(const PqAttnParams& p, long long kv_base, long long t) {
    const long long npages = p.n / p.page_size;
    const long long id = p.pages[kv_base * npages + t / p.page_size];
    if (id < 0) return -1;
    const long long row = id * p.page_size + t % p.page_size;
    return row < p.rows ? row : -1;
}

// stage_codes for paged mode: row r of the tile is code token t0 + r, read where its page is;
// rows on no page are zero (their scores are masked).
__device__ inline void stage_paged_codes(const PqAttnParams& p, long long kv_base, long long t0,
                                         const uint8_t* __restrict__ g, uint8_t* s, int rows,
                                         int bytes, int stride) {
    if ((bytes & 3) == 0 && (reinterpret_cast<uintptr_t>(g) & 3) == 0) {
        const int words = bytes >> 2, sw = stride >> 2;
        const uint32_t* gw = reinterpret_cast<const uint32_t*>(g);
        uint32_t* swp = reinterpret_cast<uint32_t*>(s);
        for (int i = threadIdx.x; i < rows * words; i += kThreads) {
            const int r = i / words, c = i - r * words;
            const long long row = paged_row(p, kv_base, t0 + r);
            swp[r * sw + c] = row < 0 ? 0u : gw[(kv_base * p.rows + row) * words + c];
        }
    } else {
        for (int i = threadIdx.x; i < rows * bytes; i += kThreads) {
            const int r = i / bytes, c = i - r * bytes;
            const long long row = paged_row(p, kv_base, t0 + r);
            s[r * stride + c] = row < 0 ? 0 : g[(kv_base * p.rows + row) * bytes + c];
        }
    }
}

template <typename C>
__device__ inline void stage_centroids(const float* __restrict__ g, C* s, int count) {
    for (int i = threadIdx.x; i < count; i += kThreads) s[i] = from_f32<C>(g[i]);
}

static_assert(kAttnRows == 8, "rows_fma / rows_accumulate read 8 rows as two float4");

// s[r] += q[r] * c for the 8 rows (q: 8 consecutive floats, 16-byte aligned).
__device__ __forceinline__ void rows_fma(float* s, const float* q, float c) {
    const float4 a = reinterpret_cast<const float4*>(q)[0];
    const float4 b = reinterpret_cast<const float4*>(q)[1];
    s[0] = fmaf(a.x, c, s[0]);
    s[1] = fmaf(a.y, c, s[1]);
    s[2] = fmaf(a.z, c, s[2]);
    s[3] = fmaf(a.w, c, s[3]);
    s[4] = fmaf(b.x, c, s[4]);
    s[5] = fmaf(b.y, c, s[5]);
    s[6] = fmaf(b.z, c, s[6]);
    s[7] = fmaf(b.w, c, s[7]);
}

// acc[r] += p[r] * v and lsum[r] += p[r] for the 8 rows.
__device__ __forceinline__ void rows_accumulate(float* acc, float* lsum, const float* p, float v) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    const float w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int r = 0; r < 8; ++r) {
        acc[r] = fmaf(w[r], v, acc[r]);
        lsum[r] += w[r];
    }
}

template <typename T, typename C>
__device__ void attn_split(const PqAttnParams& p) {
    CTX_DYN_SMEM(smem);
    const AttnSmem L = attn_smem(p);
    // Row-minor layouts: the kAttnRows values a thread needs at once are two float4 loads.
    float* q_s = reinterpret_cast<float*>(smem + L.q_off);      // [D][kAttnRows]
    float* p_s = reinterpret_cast<float*>(smem + L.p_off);      // [kThreads][kAttnRows]
    float* wmax_s = reinterpret_cast<float*>(smem + L.wmax_off);  // [kWarps][kAttnRows]
    float* red_s = reinterpret_cast<float*>(smem + L.red_off);  // [tg][kAttnRows][D + 1]

    const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
    const int split = blockIdx.x;
    const int h = blockIdx.y / p.row_tiles, tile = blockIdx.y % p.row_tiles;
    const int b = blockIdx.z;
    const int D = p.d;
    const int group = p.hq / p.hkv;
    const int r0 = tile * kAttnRows;
    const int nrows = min(kAttnRows, group * p.tq - r0);
    const bool is_code = split < p.code_splits;

    // Token range of this split, clipped to the valid range of sequence b.
    long long lo, hi;
    const bool paged = p.pages != nullptr;
    if (is_code) {
        lo = (long long)split * p.code_chunk;
        hi = min((long long)p.n, lo + p.code_chunk);
        if (!paged) {
            lo = max(lo, (long long)p.code_range[2 * b]);
            hi = min(hi, (long long)p.code_range[2 * b + 1]);
        }
    } else {
        lo = (long long)(split - p.code_splits) * p.fp_chunk;
        hi = min((long long)p.f, lo + p.fp_chunk);
        lo = max(lo, (long long)p.fp_range[2 * b]);
        hi = min(hi, (long long)p.fp_range[2 * b + 1]);
    }
    const long long fp_end = p.fp_range[2 * b + 1];

    // Query rows, pre-scaled.
    const T* q = static_cast<const T*>(p.q);
    for (int i = tid; i < kAttnRows * D; i += kThreads) {
        const int d = i / kAttnRows, r = i - d * kAttnRows;
        float v = 0.f;
        if (r < nrows) {
            const int row = r0 + r;
            const int hq = h * group + row / p.tq, t = row % p.tq;
            v = to_f32(q[(((long long)b * p.hq + hq) * p.tq + t) * D + d]) * p.scale;
        }
        q_s[i] = v;
    }

    const int kksub = 1 << p.k_nbits, vksub = 1 << p.v_nbits;
    const int kdsub = is_code ? D / p.k_m : 0, vdsub = is_code ? D / p.v_m : 0;
    const int kbytes = code_bytes(p.k_m, p.k_nbits), vbytes = code_bytes(p.v_m, p.v_nbits);
    C* kcent_s = reinterpret_cast<C*>(smem + L.kcent_off);
    C* vcent_s = reinterpret_cast<C*>(smem + L.vcent_off);
    uint8_t* kcode_s = smem + L.kcode_off;
    uint8_t* vcode_s = smem + L.vcode_off;
    if (is_code) {
        stage_centroids(p.k_centroids + (long long)h * kksub * D, kcent_s, kksub * D);
        stage_centroids(p.v_centroids + (long long)h * vksub * D, vcent_s, vksub * D);
    }

    // Output ownership: thread (g, d) accumulates dim d over tokens g, g + tg, ...
    const int tg = D <= kThreads ? kThreads / D : 1;
    const int my_g = tid / D, my_d = tid - my_g * D;
    const bool owns = my_g < tg && my_d < D;
    float acc[kAttnRows], lsum[kAttnRows], m_run[kAttnRows];
#pragma unroll
    for (int r = 0; r < kAttnRows; ++r) {
        acc[r] = 0.f;
        lsum[r] = 0.f;
        m_run[r] = -INFINITY;
    }

    const long long kv_base = (long long)b * p.hkv + h;
    const T* fk = static_cast<const T*>(p.fp_k);
    const T* fv = static_cast<const T*>(p.fp_v);
    __syncthreads();

    for (long long t0 = lo; t0 < hi; t0 += kThreads) {
        const int cnt = (int)min((long long)kThreads, hi - t0);
        if (is_code && paged) {
            stage_paged_codes(p, kv_base, t0, p.k_codes, kcode_s, cnt, kbytes, L.kstride);
            stage_paged_codes(p, kv_base, t0, p.v_codes, vcode_s, cnt, vbytes, L.vstride);
            __syncthreads();
        } else if (is_code) {
            stage_codes(p.k_codes + (kv_base * p.n + t0) * kbytes, kcode_s, cnt, kbytes, L.kstride);
            stage_codes(p.v_codes + (kv_base * p.n + t0) * vbytes, vcode_s, cnt, vbytes, L.vstride);
            __syncthreads();
        }
        // 2. scores of token t0 + tid for every row.
        float s[kAttnRows];
#pragma unroll
        for (int r = 0; r < kAttnRows; ++r) s[r] = 0.f;
        if (tid < cnt) {
            if (is_code) {
                const uint8_t* row = kcode_s + tid * L.kstride;
                for (int j = 0; j < p.k_m; ++j) {
                    const C* c = kcent_s + (j * kksub + pq_code(row, j, p.k_nbits)) * kdsub;
                    const float* qj = q_s + j * kdsub * kAttnRows;
                    for (int e = 0; e < kdsub; ++e) rows_fma(s, qj + e * kAttnRows, to_f32(c[e]));
                }
            } else {
                const T* krow = fk + (kv_base * p.f + t0 + tid) * D;
                for (int d = 0; d < D; ++d) {
                    const float kd = to_f32(krow[d]);
                    rows_fma(s, q_s + d * kAttnRows, kd);
                }
            }
        }
        // Mask: tokens past the tile, rows past the group, (paged) tokens on no page, and (full
        // precision, causal) tokens after the query's own position.
        const bool on_page = !(is_code && paged) || (tid < cnt && paged_row(p, kv_base, t0 + tid) >= 0);
#pragma unroll
        for (int r = 0; r < kAttnRows; ++r) {
            bool ok = tid < cnt && r < nrows && on_page;
            if (ok && !is_code && p.causal) {
                const int t = (r0 + r) % p.tq;
                ok = t0 + tid <= fp_end - p.tq + t;
            }
            if (!ok) s[r] = -INFINITY;
        }
        // 3. online softmax over the tile.
#pragma unroll
        for (int r = 0; r < kAttnRows; ++r) {
            const float wm = warp_max(s[r]);
            if (lane == 0) wmax_s[warp * kAttnRows + r] = wm;
        }
        __syncthreads();
        float alpha[kAttnRows];
#pragma unroll
        for (int r = 0; r < kAttnRows; ++r) {
            float tmax = -INFINITY;
            for (int w = 0; w < kWarps; ++w) tmax = fmaxf(tmax, wmax_s[w * kAttnRows + r]);
            const float m_new = fmaxf(m_run[r], tmax);
            alpha[r] = m_run[r] == -INFINITY ? 0.f : __expf(m_run[r] - m_new);
            p_s[tid * kAttnRows + r] = s[r] == -INFINITY ? 0.f : __expf(s[r] - m_new);
            m_run[r] = m_new;
        }
        __syncthreads();
        // 4. values.
        if (owns) {
#pragma unroll
            for (int r = 0; r < kAttnRows; ++r) {
                acc[r] *= alpha[r];
                lsum[r] *= alpha[r];
            }
            if (is_code) {
                const int j = my_d / vdsub, e = my_d - j * vdsub;
                const C* cj = vcent_s + j * vksub * vdsub + e;
                for (int tt = my_g; tt < cnt; tt += tg) {
                    const float v = to_f32(cj[pq_code(vcode_s + tt * L.vstride, j, p.v_nbits) * vdsub]);
                    rows_accumulate(acc, lsum, p_s + tt * kAttnRows, v);
                }
            } else {
                for (int tt = my_g; tt < cnt; tt += tg) {
                    const float v = to_f32(fv[(kv_base * p.f + t0 + tt) * D + my_d]);
                    rows_accumulate(acc, lsum, p_s + tt * kAttnRows, v);
                }
            }
        }
        __syncthreads();
    }

    // Reduce the token groups, normalize, write the partial.
    if (owns) {
#pragma unroll
        for (int r = 0; r < kAttnRows; ++r) {
            red_s[(my_g * kAttnRows + r) * (D + 1) + my_d] = acc[r];
            if (my_d == 0) red_s[(my_g * kAttnRows + r) * (D + 1) + D] = lsum[r];
        }
    }
    __syncthreads();
    const int splits = p.code_splits + p.fp_splits;
    const long long rows_all = (long long)p.b * p.hq * p.tq;
    float* lse_part = p.work + rows_all * splits * D;
    for (int i = tid; i < nrows * D; i += kThreads) {
        const int r = i / D, d = i - r * D;
        float o = 0.f, l = 0.f;
        for (int g = 0; g < tg; ++g) {
            o += red_s[(g * kAttnRows + r) * (D + 1) + d];
            l += red_s[(g * kAttnRows + r) * (D + 1) + D];
        }
        const int row = r0 + r;
        const int hq = h * group + row / p.tq, t = row % p.tq;
        const long long orow = ((long long)b * p.hq + hq) * p.tq + t;
        p.work[(orow * splits + split) * D + d] = l > 0.f ? o / l : 0.f;
        if (d == 0) lse_part[orow * splits + split] = l > 0.f ? m_run[r] + logf(l) : -INFINITY;
    }
}

template <typename T>
__device__ void attn_combine(const PqAttnParams& p) {
    const long long row = blockIdx.x;
    const int splits = p.code_splits + p.fp_splits;
    const int D = p.d;
    const long long rows_all = (long long)p.b * p.hq * p.tq;
    const float* lse_part = p.work + rows_all * splits * D + row * splits;
    float mx = -INFINITY;
    for (int s = 0; s < splits; ++s) mx = fmaxf(mx, lse_part[s]);
    float wsum = 0.f;
    if (mx != -INFINITY)
        for (int s = 0; s < splits; ++s) wsum += __expf(lse_part[s] - mx);
    T* out = static_cast<T*>(p.out);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float o = 0.f;
        if (mx != -INFINITY) {
            for (int s = 0; s < splits; ++s) {
                const float w = lse_part[s];
                if (w != -INFINITY) o += __expf(w - mx) * p.work[(row * splits + s) * D + d];
            }
            o /= wsum;
        }
        out[row * D + d] = from_f32<T>(o);
    }
    if (threadIdx.x == 0) p.lse[row] = mx == -INFINITY ? -INFINITY : mx + logf(wsum);
}

}  // namespace ctx

#define CTX_ATTN_KERNELS(SUFFIX, T)                                                         \
    extern "C" __global__ void __launch_bounds__(ctx::kThreads)                             \
        pq_attn_split_##SUFFIX(const ctx::PqAttnParams p) {                                 \
        if (p.half_centroids)                                                               \
            ctx::attn_split<T, __half>(p);                                                  \
        else                                                                                \
            ctx::attn_split<T, float>(p);                                                   \
    }                                                                                       \
    extern "C" __global__ void pq_attn_combine_##SUFFIX(const ctx::PqAttnParams p) {        \
        ctx::attn_combine<T>(p);                                                            \
    }

CTX_ATTN_KERNELS(f32, float)
CTX_ATTN_KERNELS(f16, __half)
CTX_ATTN_KERNELS(bf16, __nv_bfloat16)

// Shared-memory bytes pass 1 needs, for the host-side consistency test (CPU emulation only).
#ifdef CTX_EMU
extern "C" int ctx_pq_attn_smem_bytes(const ctx::PqAttnParams* p) {
    return ctx::attn_smem(*p).total;
}
#endif
