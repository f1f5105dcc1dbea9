// The kernels of cuda/*.cu compiled for the host with the CPU emulation of emu.h, behind a
// cuLaunchKernel-like entry point that the Rust tests load with dlopen (rust/src/cuda/emulated_tests.rs).
#define CTX_EMU 1
#include "emu.h"

#include "../page_gather.cu"
#include "../page_scores.cu"
#include "../pq_attention.cu"
#include "../pq_encode.cu"

namespace {
struct Entry {
    const char* name;
    emu::KernelFn fn;
};
#define CTX_ENTRY(name, P) \
    Entry { #name, [](const void* p) { name(*static_cast<const ctx::P*>(p)); } }
const Entry kKernels[] = {
    CTX_ENTRY(pq_attn_split_f32, PqAttnParams),   CTX_ENTRY(pq_attn_split_f16, PqAttnParams),
    CTX_ENTRY(pq_attn_split_bf16, PqAttnParams),  CTX_ENTRY(pq_attn_combine_f32, PqAttnParams),
    CTX_ENTRY(pq_attn_combine_f16, PqAttnParams), CTX_ENTRY(pq_attn_combine_bf16, PqAttnParams),
    CTX_ENTRY(page_scores_f32, PageScoresParams), CTX_ENTRY(page_scores_f16, PageScoresParams),
    CTX_ENTRY(page_scores_bf16, PageScoresParams), CTX_ENTRY(page_gather, PageGatherParams),
    CTX_ENTRY(pq_encode_f32, PqEncodeParams),     CTX_ENTRY(pq_encode_f16, PqEncodeParams),
    CTX_ENTRY(pq_encode_bf16, PqEncodeParams),
};
}  // namespace

// Run kernel `name` over grid[3] x block[3] with `smem` bytes of dynamic shared memory and the
// parameter block at `params`. Returns 0, or -1 for an unknown kernel name.
extern "C" int ctx_emu_launch(const char* name, const unsigned* grid, const unsigned* block,
                              unsigned smem, const void* params) {
    for (const Entry& e : kKernels) {
        if (std::strcmp(e.name, name) == 0) {
            emu::run(e.fn, dim3{grid[0], grid[1], grid[2]}, dim3{block[0], block[1], block[2]},
                     smem, params);
            return 0;
        }
    }
    return -1;
}

// sizeof of the parameter blocks, to check the Rust mirrors.
extern "C" void ctx_params_sizes(size_t* out) {
    out[0] = sizeof(ctx::PqAttnParams);
    out[1] = sizeof(ctx::PageScoresParams);
    out[2] = sizeof(ctx::PageGatherParams);
    out[3] = sizeof(ctx::PqEncodeParams);
}
