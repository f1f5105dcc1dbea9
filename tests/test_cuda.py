"""CUDA ops: build and dispatch checks that run everywhere, and GPU tests (skipped cleanly where
ctxcore's CUDA kernels cannot run) that check every kernel against the CPU reference kernels and
against torch SDPA over dequantized K/V.

The kernels' indexing, masking and split-K merging are also checked without a GPU, through a
CPU emulation of the kernels, by the Rust tests (rust/src/cuda/emulated_tests.rs).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctxcore import _ctxcore
from ctxcore.exceptions import ConfigError, DeviceError, ShapeError

torch = pytest.importorskip("torch")
ops = pytest.importorskip("ctxcore.ops")
F = torch.nn.functional

GPU = ops.cuda_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="no GPU that ctxcore's CUDA kernels can run on")
OPS = ("pq_attention", "pq_paged_attention", "page_scores", "pq_encode", "gather_pages")


# -- everywhere ------------------------------------------------------------------------------
@pytest.mark.skipif(sys.platform != "linux", reason="the PyPI CUDA toolchain is Linux-only")
def test_wheel_has_cuda_kernels():
    # The wheel is built with nvcc 13.0 from PyPI (pyproject build requirements): a build that
    # silently fell back to CPU-only would ship no GPU support.
    assert _ctxcore.cuda_compiled()


@pytest.mark.parametrize("op", OPS)
def test_ops_have_cuda_kernels(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ctxcore::{op}", "CUDA")


@pytest.mark.skipif(GPU, reason="checks the no-GPU error")
def test_without_a_gpu_device_calls_raise_device_error():
    assert not ops.cuda_available()
    with pytest.raises(DeviceError):
        _ctxcore.cuda_device_info(0)
    with pytest.raises(DeviceError):
        _ctxcore.cuda_page_gather(0, 0, [1, 1, 1, 1, 1, 1, 2], [0, 0, 0])


def test_mixed_devices_raise_device_error():
    q = torch.randn(1, 2, 1, 8)
    cent = torch.randn(2, 8, 16, 1)
    codes = torch.zeros(1, 2, 3, 4, dtype=torch.uint8, device="meta")
    with pytest.raises(DeviceError, match="different devices"):
        ops.pq_attention(q, codes, codes, cent, cent)
    with pytest.raises(DeviceError, match="different devices"):
        ops.pq_encode(torch.randn(1, 2, 3, 8, device="meta"), cent)


# -- new ops on the CPU (the reference for their CUDA kernels) --------------------------------
def test_pq_encode_matches_product_quantizer_and_round_trips():
    import ctxcore

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 200, 16, generator=g)
    for m, nbits in ((8, 8), (16, 4), (4, 8)):
        pqs = [ctxcore.ProductQuantizer(16, m, nbits) for _ in range(3)]
        for h, pq in enumerate(pqs):
            pq.train(x[:, h].reshape(-1, 16).numpy(), iters=5, seed=h)
        cent = torch.stack([torch.from_numpy(pq.centroids) for pq in pqs])
        codes = ops.pq_encode(x, cent)
        assert codes.dtype == torch.uint8 and codes.shape == (2, 3, 200, (m * nbits + 7) // 8)
        for h, pq in enumerate(pqs):
            for b in range(2):
                want = pq.encode(x[b, h].numpy())
                assert (codes[b, h].numpy() == want).all()
        dec = ops.decode_codes(codes, cent)
        assert dec.shape == x.shape
        # Decoding the codes of decoded vectors gives them back (they are codewords).
        assert torch.equal(ops.decode_codes(ops.pq_encode(dec, cent), cent), dec)


def test_pq_encode_errors():
    with pytest.raises(ShapeError):
        ops.pq_encode(torch.randn(1, 2, 3, 16), torch.randn(2, 5, 16, 3))
    with pytest.raises(ConfigError, match="16 .4-bit. or 256"):
        ops.pq_encode(torch.randn(1, 2, 3, 16), torch.randn(2, 8, 32, 2))


def test_gather_pages_cpu_semantics():
    src = torch.arange(2 * 3 * 10 * 4, dtype=torch.float32).reshape(2, 3, 10, 4)
    pages = torch.tensor([[[0, 2], [1, -1], [2, 0]]] * 2)  # page 2 of 4-token pages: tokens 8, 9
    out = ops.gather_pages(src, pages, 4)
    assert out.shape == (2, 3, 8, 4)
    assert torch.equal(out[0, 0, :4], src[0, 0, 0:4])
    assert torch.equal(out[0, 0, 4:6], src[0, 0, 8:10])
    assert torch.equal(out[0, 0, 6:], torch.zeros(2, 4))  # past the end
    assert torch.equal(out[1, 1, 4:], torch.zeros(4, 4))  # page -1
    with pytest.raises(ConfigError):
        ops.gather_pages(src, pages, 0)
    with pytest.raises(ShapeError):
        ops.gather_pages(src, pages[:, :2], 4)


@pytest.mark.parametrize("tq", [1, 3])
def test_quest_attention_full_budget_is_exact_and_selects_the_relevant_page(tq):
    g = torch.Generator().manual_seed(tq)
    b, hq, hkv, n, d, f = 2, 6, 3, 16 * 10 + 5, 32, 7
    q = torch.randn(b, hq, tq, d, generator=g)
    k, v = torch.randn(b, hkv, n, d, generator=g), torch.randn(b, hkv, n, d, generator=g)
    fk, fv = torch.randn(b, hkv, f, d, generator=g), torch.randn(b, hkv, f, d, generator=g)
    out, lse = ops.quest_attention(q, k, v, 1.0, page_size=16, fp_k=fk, fp_v=fv)
    kk, vv = torch.cat([k, fk], 2), torch.cat([v, fv], 2)
    pos = torch.arange(n + f)
    mask = pos[None, :] <= (n + f - tq + torch.arange(tq))[:, None]
    ref = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # A page whose keys align with the queries: one selected page (+ the partial tail and the
    # fp part) carries almost all of the softmax mass.
    u = torch.randn(d, generator=g)
    u /= u.norm()
    q = q + 4 * u
    k2 = k.clone()
    k2[:, :, 48:64] += 12 * u
    kk2 = torch.cat([k2, fk], 2)
    exact = F.scaled_dot_product_attention(q, kk2, vv, attn_mask=mask, enable_gqa=True)
    one, _ = ops.quest_attention(q, k2, v, 16, page_size=16, fp_k=fk, fp_v=fv)
    assert float((one - exact).norm() / exact.norm()) < 0.1
    none, _ = ops.quest_attention(q, k2, v, 0, page_size=16, fp_k=fk, fp_v=fv)
    assert float((none - exact).norm() / exact.norm()) > 0.5


def test_opcheck_new_ops_cpu():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 5, 8, generator=g)
    cent = torch.randn(2, 4, 256, 2, generator=g)
    torch.library.opcheck(torch.ops.ctxcore.pq_encode.default, (x, cent))
    pages = torch.tensor([[[1, 0], [0, -1]]])
    torch.library.opcheck(torch.ops.ctxcore.gather_pages.default, (x, pages, 2))


def random_pages(b, hkv, n, page_size, slots, seed):
    """Ragged selections: per (sequence, KV head) a random number of distinct random pages
    (the history's partial last page among the candidates) in random order, -1 elsewhere."""
    g = torch.Generator().manual_seed(seed)
    count = -(-n // page_size)
    ids = torch.full((b, hkv, slots), -1, dtype=torch.int64)
    for i in range(b):
        for h in range(hkv):
            take = int(torch.randint(0, min(slots, count) + 1, (1,), generator=g))
            pick = torch.randperm(count, generator=g)[:take]
            where = torch.randperm(slots, generator=g)[:take]
            ids[i, h, where] = pick
    return ids


def selected_pages_oracle(case, pages, page_size, fr, scale, causal):
    """pq_attention (dense) over each (sequence, KV head)'s selected pages' codes, copied out."""
    q = case["q"]
    b, hq, tq, d = q.shape
    hkv, n = case["k_codes"].shape[1], case["k_codes"].shape[2]
    g = hq // hkv
    out = torch.zeros(b, hq, tq, d)
    lse = torch.full((b, hq, tq), float("-inf"))
    for i in range(b):
        for h in range(hkv):
            rows = [
                t
                for p in pages[i, h].tolist()
                if p >= 0
                for t in range(p * page_size, min((p + 1) * page_size, n))
            ]
            idx = torch.tensor(rows, dtype=torch.int64)
            sl = slice(h * g, (h + 1) * g)
            o, ls = ops.pq_attention(
                case["q"][i : i + 1, sl].float(),
                case["k_codes"][i : i + 1, h : h + 1, idx],
                case["v_codes"][i : i + 1, h : h + 1, idx],
                case["k_centroids"][h : h + 1],
                case["v_centroids"][h : h + 1],
                case["fp_k"][i : i + 1, h : h + 1].float(),
                case["fp_v"][i : i + 1, h : h + 1].float(),
                fp_range=fr[i : i + 1],
                scale=scale,
                causal=causal,
            )
            out[i, sl], lse[i, sl] = o[0], ls[0]
    return out, lse


@pytest.mark.parametrize(
    "b,hq,hkv,tq,d,n,f,k_dsub,v_dsub,knbits,page_size,slots",
    [
        (1, 9, 3, 1, 64, 1000, 20, 2, 1, 8, 64, 5),  # the default layout (8-bit keys, 4-bit values)
        (2, 8, 2, 3, 32, 333, 7, 1, 1, 4, 50, 9),  # 4-bit codes, partial last page, causal chunk
        (1, 4, 4, 1, 64, 0, 3, 2, 2, 8, 16, 2),  # no code tokens: every id -1
    ],
)
def test_pq_paged_attention_equals_pq_attention_over_the_selected_pages(
    b, hq, hkv, tq, d, n, f, k_dsub, v_dsub, knbits, page_size, slots
):
    case = make(b, hq, hkv, tq, d, n, f, k_dsub, v_dsub, knbits, seed=n + slots)
    if knbits == 8 and v_dsub == 1:  # values as 4-bit codes over 1 dim, as bits=4 stores them
        g = torch.Generator().manual_seed(2)
        case["v_codes"] = torch.randint(0, 256, (b, hkv, n, d // 2), dtype=torch.uint8, generator=g)
        case["v_centroids"] = torch.randn(hkv, d, 16, 1, generator=g)
    pages = random_pages(b, hkv, n, page_size, slots, seed=7)
    fr = torch.tensor([[0, f]] * b)
    if b > 1:
        fr[1, 0] = 2
    want, want_lse = selected_pages_oracle(case, pages, page_size, fr, 0.125, True)
    got, lse = ops.pq_paged_attention(
        case["q"],
        case["k_codes"],
        case["v_codes"],
        case["k_centroids"],
        case["v_centroids"],
        pages,
        page_size,
        case["fp_k"],
        case["fp_v"],
        fp_range=fr,
        scale=0.125,
    )
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-5)
    if n:
        dup = pages.clone()
        dup[0, 0, :2] = 0
        with pytest.raises(ConfigError, match="twice"):
            ops.pq_paged_attention(
                case["q"],
                case["k_codes"],
                case["v_codes"],
                case["k_centroids"],
                case["v_centroids"],
                dup,
                page_size,
            )
        far = pages.clone()
        far[0, 0, 0] = -(-n // page_size)
        with pytest.raises(ConfigError, match="out of range"):
            ops.pq_paged_attention(
                case["q"],
                case["k_codes"],
                case["v_codes"],
                case["k_centroids"],
                case["v_centroids"],
                far,
                page_size,
            )
    with pytest.raises(ShapeError, match="pages"):
        ops.pq_paged_attention(
            case["q"],
            case["k_codes"],
            case["v_codes"],
            case["k_centroids"],
            case["v_centroids"],
            pages[:, :1],
            page_size,
        )


def test_opcheck_pq_paged_attention_cpu():
    case = make(1, 4, 2, 2, 16, 40, 3, 2, 2, 8, seed=3)
    pages = torch.tensor([[[2, -1, 0], [1, 4, -1]]])
    args = [case[k] for k in ("q", "k_codes", "v_codes", "k_centroids", "v_centroids")]
    fr = torch.tensor([[0, 3]])
    torch.library.opcheck(
        torch.ops.ctxcore.pq_paged_attention.default,
        (*args, pages, 8, case["fp_k"], case["fp_v"], fr, 0.25, True),
    )


# -- the CUDA path end to end on the CPU, through the emulation of the kernels ---------------
@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """The ops' CUDA implementations (Python glue + Rust launch planning + kernels) running on
    CPU tensors through the CPU emulation of the kernels (CTXCORE_CUDA_EMULATOR)."""
    src = Path(__file__).resolve().parents[1] / "cuda" / "emu" / "emu.cpp"
    cxx = os.environ.get("CXX", "g++")
    if not src.exists() or shutil.which(cxx) is None:
        pytest.fail(f"the emulation needs {src} and a C++20 compiler ({cxx})")
    lib = tmp_path_factory.mktemp("emu") / "libctxemu.so"
    flags = ["-std=c++20", "-O2", "-ffp-contract=off", "-shared", "-fPIC", "-pthread"]
    subprocess.run([cxx, *flags, str(src), "-o", str(lib)], check=True)
    old = os.environ.get("CTXCORE_CUDA_EMULATOR")
    os.environ["CTXCORE_CUDA_EMULATOR"] = str(lib)
    saved = ops._stream, ops._ordinal
    ops._stream, ops._ordinal = (lambda dev: 0), (lambda dev: 0)
    yield
    ops._stream, ops._ordinal = saved
    if old is None:
        del os.environ["CTXCORE_CUDA_EMULATOR"]
    else:
        os.environ["CTXCORE_CUDA_EMULATOR"] = old


@pytest.mark.parametrize(
    "b,hq,hkv,tq,d,n,f,dsub,nbits,dtype",
    [
        (2, 8, 2, 1, 64, 600, 20, 2, 8, torch.float32),
        (1, 9, 3, 3, 64, 300, 12, 1, 4, torch.float16),
        (2, 4, 4, 1, 128, 200, 5, 2, 8, torch.bfloat16),
        (1, 4, 2, 1, 32, 0, 0, 2, 8, torch.float32),
    ],
)
def test_emulated_cuda_pq_attention_matches_cpu(emulated, b, hq, hkv, tq, d, n, f, dsub, nbits, dtype):
    case = to(make(b, hq, hkv, tq, d, n, f, dsub, dsub, nbits, seed=n + d), "cpu", dtype)
    cr = torch.tensor([[0, n]] * b)
    fr = torch.tensor([[0, f]] * b)
    if b > 1:
        cr[1, 0], fr[1, 0] = n // 4, min(2, f)
    scale = 1 / math.sqrt(d)
    args = [case[k] for k in ("q", "k_codes", "v_codes", "k_centroids", "v_centroids")]
    args = [*args, cr, case["fp_k"], case["fp_v"], fr, scale, True]
    want, want_lse = torch.ops.ctxcore.pq_attention(*args)
    got, lse = ops._pq_attention_cuda(*args)
    assert got.dtype == dtype and got.shape == want.shape
    tol = tolerance(dtype, d, nbits, dsub)
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(lse, want_lse, rtol=1e-3, atol=1e-3)
    with pytest.raises(ConfigError, match="outside"):
        ops._pq_attention_cuda(*args[:5], torch.tensor([[0, n + 1]] * b), *args[6:])


@st.composite
def attention_cases(draw):
    hkv = draw(st.sampled_from([1, 2, 3]))
    group = draw(st.sampled_from([1, 2, 3, 8]))
    d = draw(st.sampled_from([8, 16, 24, 64]))
    nbits = draw(st.sampled_from([4, 8]))
    dsub = draw(st.sampled_from([s for s in (1, 2, 4, 8) if d % s == 0]))
    b = draw(st.integers(1, 3))
    tq = draw(st.integers(1, 4))
    n = draw(st.integers(0, 700))
    f = draw(st.integers(0, 40))
    ranges = []
    for _ in range(b):
        cs = draw(st.integers(0, n))
        ce = draw(st.integers(cs, n))
        fs = draw(st.integers(0, f))
        fe = draw(st.integers(fs, f))
        ranges.append((cs, ce, fs, fe))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    causal = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return b, group * hkv, hkv, tq, d, n, f, dsub, nbits, dtype, causal, ranges, seed


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=attention_cases())
def test_emulated_cuda_pq_attention_property(emulated, case):
    """Random shapes, code widths, dtypes, ranges (left padding, empty parts) and masks: the CUDA
    path (through the emulation) equals the CPU kernels."""
    b, hq, hkv, tq, d, n, f, dsub, nbits, dtype, causal, ranges, seed = case
    c = to(make(b, hq, hkv, tq, d, n, f, dsub, dsub, nbits, seed=seed), "cpu", dtype)
    cr = torch.tensor([[r[0], r[1]] for r in ranges])
    fr = torch.tensor([[r[2], r[3]] for r in ranges])
    args = [c[k] for k in ("q", "k_codes", "v_codes", "k_centroids", "v_centroids")]
    args = [*args, cr, c["fp_k"], c["fp_v"], fr, 1 / math.sqrt(d), causal]
    want, want_lse = torch.ops.ctxcore.pq_attention(*args)
    got, lse = ops._pq_attention_cuda(*args)
    tol = tolerance(dtype, d, nbits, dsub)
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    fin = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[fin], want_lse[fin], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "b,hq,hkv,tq,d,n,f,dsub,nbits,page_size,slots,dtype",
    [
        (1, 9, 3, 1, 64, 1000, 20, 2, 8, 64, 5, torch.float32),
        (2, 8, 2, 3, 32, 333, 7, 1, 4, 50, 9, torch.float16),
        (1, 4, 2, 1, 64, 2100, 4, 2, 8, 512, 3, torch.bfloat16),
        (1, 4, 4, 1, 64, 0, 3, 2, 8, 16, 2, torch.float32),
    ],
)
def test_emulated_cuda_pq_paged_attention_matches_cpu(
    emulated, b, hq, hkv, tq, d, n, f, dsub, nbits, page_size, slots, dtype
):
    """The CUDA paged mode of the attention kernel (through the emulation) equals the CPU op."""
    case = to(make(b, hq, hkv, tq, d, n, f, dsub, dsub, nbits, seed=n + 1), "cpu", dtype)
    pages = random_pages(b, hkv, n, page_size, slots, seed=n)
    fr = torch.tensor([[0, f]] * b)
    if b > 1:
        fr[1, 0] = 2
    args = [case[k] for k in ("q", "k_codes", "v_codes", "k_centroids", "v_centroids")]
    args = [*args, pages, page_size, case["fp_k"], case["fp_v"], fr, 1 / math.sqrt(d), True]
    want, want_lse = torch.ops.ctxcore.pq_paged_attention(*args)
    got, lse = ops._pq_paged_attention_cuda(*args)
    assert got.dtype == dtype and got.shape == want.shape
    tol = tolerance(dtype, d, nbits, dsub)
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    fin = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[fin], want_lse[fin], rtol=1e-3, atol=1e-3)
    if n:
        dup = pages.clone()
        dup[0, 0, :2] = 0
        with pytest.raises(ConfigError, match="twice"):
            ops._pq_paged_attention_cuda(*args[:5], dup, *args[6:])


def test_emulated_cuda_page_scores_gather_encode_match_cpu(emulated):
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 6, 2, 64, generator=g).half()
    a, c = torch.randn(1, 3, 20, 64, generator=g), torch.randn(1, 3, 20, 64, generator=g)
    kmin, kmax = torch.minimum(a, c), torch.maximum(a, c)  # float32 bounds, half q: converted
    want = ops.page_scores(q, kmin.half(), kmax.half())
    torch.testing.assert_close(ops._page_scores_cuda(q, kmin, kmax), want, rtol=1e-4, atol=1e-4)
    src = torch.randn(2, 3, 100, 24, generator=g).bfloat16()
    pages = torch.tensor([[[0, 6, -1], [1, 2, 3], [6, 5, 4]]] * 2)
    assert torch.equal(ops._gather_pages_cuda(src, pages, 16), ops.gather_pages(src, pages, 16))
    x = torch.randn(2, 3, 70, 64, generator=g)
    for m, ksub in ((32, 256), (64, 16)):
        cent = torch.randn(3, m, ksub, 64 // m, generator=g)
        assert torch.equal(ops._pq_encode_cuda(x, cent), ops.pq_encode(x, cent))


# -- GPU: every kernel against the CPU reference ---------------------------------------------
def make(b, hq, hkv, tq, d, n, f, k_dsub, v_dsub, nbits, seed=0):
    g = torch.Generator().manual_seed(seed)
    ksub = 2**nbits
    km, vm = d // k_dsub, d // v_dsub
    return dict(
        q=torch.randn(b, hq, tq, d, generator=g),
        k_codes=torch.randint(0, 256, (b, hkv, n, (km * nbits + 7) // 8), dtype=torch.uint8, generator=g),
        v_codes=torch.randint(0, 256, (b, hkv, n, (vm * nbits + 7) // 8), dtype=torch.uint8, generator=g),
        k_centroids=torch.randn(hkv, km, ksub, k_dsub, generator=g),
        v_centroids=torch.randn(hkv, vm, ksub, v_dsub, generator=g),
        fp_k=torch.randn(b, hkv, f, d, generator=g),
        fp_v=torch.randn(b, hkv, f, d, generator=g),
    )


def to(case, device, dtype=None):
    out = {}
    for k, v in case.items():
        v = v.to(device)
        if dtype is not None and k in ("q", "fp_k", "fp_v"):
            v = v.to(dtype)
        out[k] = v
    return out


def tolerance(dtype, d, nbits, dsub):
    # float16 codebooks in shared memory when float32 ones do not fit (256 centroids x 128 dims).
    half_books = nbits == 8 and d >= 128
    if dtype == torch.float32:
        return 3e-3 if half_books else 1e-4
    return 1e-2 if dtype == torch.float16 else 4e-2


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("bits", [(4, 1), (8, 2)], ids=["4bit-codes", "8bit-codes"])
@pytest.mark.parametrize("n", [1, 777, 70_000])
def test_cuda_pq_attention_matches_cpu(dtype, d, group, bits, n):
    nbits, dsub = bits
    case = make(2, 2 * group, 2, 1, d, n, 20, dsub, dsub, nbits, seed=n)
    cr = torch.tensor([[0, n], [n // 3, n]])
    fr = torch.tensor([[0, 20], [4, 20]])
    cpu = to(case, "cpu", dtype)
    want, want_lse = ops.pq_attention(**cpu, code_range=cr, fp_range=fr)
    got, lse = ops.pq_attention(**to(case, "cuda", dtype), code_range=cr, fp_range=fr)
    assert got.device.type == "cuda" and got.dtype == dtype
    tol = tolerance(dtype, d, nbits, dsub)
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(lse.cpu(), want_lse, rtol=1e-3, atol=1e-3)


@needs_gpu
@pytest.mark.parametrize("tq,causal", [(1, True), (4, True), (4, False)])
def test_cuda_pq_attention_matches_sdpa_over_dequantized(tq, causal):
    case = make(1, 32, 8, tq, 128, 5000, 132, 2, 2, 8, seed=3)
    dev = to(case, "cuda", torch.float16)
    out, _ = ops.pq_attention(**dev, causal=causal)
    k = torch.cat([ops.decode_codes(dev["k_codes"], dev["k_centroids"]).half(), dev["fp_k"]], dim=2)
    v = torch.cat([ops.decode_codes(dev["v_codes"], dev["v_centroids"]).half(), dev["fp_v"]], dim=2)
    mask = None
    if causal:
        n_all = k.shape[2]
        pos = torch.arange(n_all, device="cuda")
        mask = pos[None, :] <= (n_all - tq + torch.arange(tq, device="cuda"))[:, None]
    ref = F.scaled_dot_product_attention(dev["q"], k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)


@needs_gpu
def test_cuda_pq_attention_one_million_tokens():
    # Llama-8B shape, 1M code tokens at 4 bits per element: against torch over the decoded K/V.
    n, d = 1 << 20, 128
    case = make(1, 32, 8, 1, d, n, 132, 2, 2, 8, seed=5)
    dev = to(case, "cuda", torch.float16)
    out, lse = ops.pq_attention(**dev)
    kd = ops.decode_codes(dev["k_codes"], dev["k_centroids"]).half()
    vd = ops.decode_codes(dev["v_codes"], dev["v_centroids"]).half()
    k = torch.cat([kd, dev["fp_k"]], dim=2)
    v = torch.cat([vd, dev["fp_v"]], dim=2)
    ref = F.scaled_dot_product_attention(dev["q"], k, v, enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    assert torch.isfinite(lse).all()


@needs_gpu
def test_cuda_pq_attention_edge_cases_and_streams():
    # Empty history: zeros and lse = -inf, like the CPU.
    case = make(1, 4, 2, 1, 64, 0, 0, 2, 2, 8)
    out, lse = ops.pq_attention(**to(case, "cuda"))
    assert torch.equal(out.cpu(), torch.zeros_like(out.cpu()))
    assert torch.isneginf(lse).all()
    # On a side stream, results are ordered on that stream.
    case = make(1, 4, 2, 1, 64, 3000, 10, 2, 2, 8, seed=9)
    want, _ = ops.pq_attention(**case)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        got, _ = ops.pq_attention(**to(case, "cuda"))
    s.synchronize()
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    # Ranges checked on the host when given as CPU tensors.
    with pytest.raises(ConfigError, match="outside"):
        ops.pq_attention(**to(case, "cuda"), code_range=torch.tensor([[0, 3001]]))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_page_scores_gather_encode_match_cpu(dtype):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 8, 2, 64, generator=g).to(dtype)
    a, b = torch.randn(2, 2, 300, 64, generator=g), torch.randn(2, 2, 300, 64, generator=g)
    kmin, kmax = torch.minimum(a, b).to(dtype), torch.maximum(a, b).to(dtype)
    want = ops.page_scores(q, kmin, kmax)
    got = ops.page_scores(q.cuda(), kmin.cuda(), kmax.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)

    src = torch.randn(2, 3, 1000, 128, generator=g).to(dtype)
    pages = torch.randint(-1, 16, (2, 3, 5), generator=g)
    assert torch.equal(ops.gather_pages(src.cuda(), pages.cuda(), 64).cpu(), ops.gather_pages(src, pages, 64))

    x = torch.randn(2, 3, 333, 64, generator=g).to(dtype)
    for m, ksub in ((32, 256), (64, 16)):
        cent = torch.randn(3, m, ksub, 64 // m, generator=g)
        want = ops.pq_encode(x.float(), cent)
        got = ops.pq_encode(x.cuda(), cent.cuda()).cpu()
        # Only exact distance ties may pick another centroid: compare decoded distances.
        dw = (ops.decode_codes(want, cent) - x.float()).pow(2).sum(-1)
        dg = (ops.decode_codes(got, cent) - x.float()).pow(2).sum(-1)
        torch.testing.assert_close(dg, dw, rtol=1e-5, atol=1e-5)
        assert (got == want).float().mean() > 0.999


@needs_gpu
def test_cuda_quest_attention_matches_cpu():
    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 32, 1, 128, generator=g)
    k, v = torch.randn(2, 8, 4100, 128, generator=g), torch.randn(2, 8, 4100, 128, generator=g)
    fk, fv = torch.randn(2, 8, 132, 128, generator=g), torch.randn(2, 8, 132, 128, generator=g)
    for budget in (0.1, 1.0):
        want, _ = ops.quest_attention(q.half(), k.half(), v.half(), budget, fp_k=fk.half(), fp_v=fv.half())
        dev = [t.half().cuda() for t in (q, k, v, fk, fv)]
        got, _ = ops.quest_attention(*dev[:3], budget, fp_k=dev[3], fp_v=dev[4])
        torch.testing.assert_close(got.cpu(), want, rtol=1e-2, atol=1e-2)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_pq_paged_attention_matches_cpu(dtype):
    case = make(2, 32, 8, 1, 128, 70_000, 132, 2, 2, 8, seed=5)
    pages = random_pages(2, 8, 70_000, 64, 110, seed=5)
    fr = torch.tensor([[0, 132], [3, 132]])
    cpu = to(case, "cpu", dtype)
    args = [cpu[k] for k in ("q", "k_codes", "v_codes", "k_centroids", "v_centroids")]
    want, want_lse = ops.pq_paged_attention(*args, pages, 64, cpu["fp_k"], cpu["fp_v"], fp_range=fr)
    dev = to(case, "cuda", dtype)
    args = [dev[k] for k in ("q", "k_codes", "v_codes", "k_centroids", "v_centroids")]
    got, lse = ops.pq_paged_attention(*args, pages.cuda(), 64, dev["fp_k"], dev["fp_v"], fp_range=fr.cuda())
    tol = tolerance(dtype, 128, 8, 2)
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(lse.cpu(), want_lse, rtol=1e-3, atol=1e-3)


@needs_gpu
def test_opcheck_cuda():
    case = to(make(1, 4, 2, 2, 64, 300, 8, 2, 2, 8), "cuda", torch.float16)
    cr = torch.tensor([[0, 300]], device="cuda")
    fr = torch.tensor([[0, 8]], device="cuda")
    args = (
        case["q"],
        case["k_codes"],
        case["v_codes"],
        case["k_centroids"],
        case["v_centroids"],
        cr,
        case["fp_k"],
        case["fp_v"],
        fr,
        1 / math.sqrt(64),
        True,
    )
    torch.library.opcheck(torch.ops.ctxcore.pq_attention.default, args)
    q = case["q"]
    kmin = torch.randn(1, 2, 7, 64, device="cuda", dtype=torch.float16)
    torch.library.opcheck(torch.ops.ctxcore.page_scores.default, (q, kmin, kmin + 1))
    cent = torch.randn(2, 32, 256, 2, device="cuda")
    torch.library.opcheck(torch.ops.ctxcore.pq_encode.default, (case["fp_k"], cent))
    pages = torch.tensor([[[0, 1], [-1, 0]]], device="cuda")
    torch.library.opcheck(torch.ops.ctxcore.gather_pages.default, (case["fp_k"], pages, 4))
    sel = torch.tensor([[[3, -1, 0], [1, 4, -1]]], device="cuda")
    torch.library.opcheck(torch.ops.ctxcore.pq_paged_attention.default, (*args[:5], sel, 64, *args[6:]))


def test_cli_info_reports_cuda_status(capsys):
    from ctxcore.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ctxcore ") and "CPU kernels:" in out
    assert "Python " in out and "torch " in out and "transformers " in out
    assert "CUDA: kernels built" in out if _ctxcore.cuda_compiled() else "no CUDA kernels" in out
    if GPU:
        assert "kernels run here" in out
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"ctxcore", "python", "numpy", "torch", "transformers", "cpu_kernels", "gpus"} <= set(info)
    assert info["cuda_kernels_built"] == bool(_ctxcore.cuda_compiled())
