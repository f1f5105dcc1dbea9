"""Attention over PQ codes (torch custom ops): exactness vs SDPA, dtypes, opcheck, torch.compile,
errors, Quest page bounds, and selective attention over a KVStore."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ctxcore
from ctxcore.exceptions import ConfigError, CtxcoreError, DeviceError, DTypeError, ShapeError

torch = pytest.importorskip("torch")
ops = pytest.importorskip("ctxcore.ops")
from store_oracles import dense_attention_from_store, selective_attention  # noqa: E402

F = torch.nn.functional


# -- helpers --------------------------------------------------------------------------------
def make_case(*, b=1, hq=2, hkv=2, tq=1, d=64, n=10, f=5, k_m=None, k_nbits=4, v_m=None, v_nbits=8, seed=0):
    """Random codes (any byte is a valid code) and codebooks, random fp part."""
    g = torch.Generator().manual_seed(seed)
    k_m = d if k_m is None else k_m
    v_m = d // 2 if v_m is None else v_m

    def cb(m, nbits):
        cent = torch.randn(hkv, m, 2**nbits, d // m, generator=g)
        return cent, (m * nbits + 7) // 8

    kc, ck = cb(k_m, k_nbits)
    vc, cv = cb(v_m, v_nbits)
    return dict(
        q=torch.randn(b, hq, tq, d, generator=g),
        k_codes=torch.randint(0, 256, (b, hkv, n, ck), dtype=torch.uint8, generator=g),
        v_codes=torch.randint(0, 256, (b, hkv, n, cv), dtype=torch.uint8, generator=g),
        k_centroids=kc,
        v_centroids=vc,
        fp_k=torch.randn(b, hkv, f, d, generator=g),
        fp_v=torch.randn(b, hkv, f, d, generator=g),
    )


def reference(
    q,
    k_codes,
    v_codes,
    k_centroids,
    v_centroids,
    fp_k,
    fp_v,
    *,
    code_range=None,
    fp_range=None,
    scale=None,
    causal=True,
):
    """float64 softmax attention over [decode(codes); fp] with torch SDPA; lse computed directly."""
    b, hq, tq, d = q.shape
    hkv = k_codes.shape[1]
    scale = 1 / math.sqrt(d) if scale is None else scale
    kd = ops.decode_codes(k_codes, k_centroids).double()
    vd = ops.decode_codes(v_codes, v_centroids).double()
    outs, lses = [], []
    for bi in range(b):
        cs, ce = (0, k_codes.shape[2]) if code_range is None else map(int, code_range[bi])
        fs, fe = (0, fp_k.shape[2]) if fp_range is None else map(int, fp_range[bi])
        k = torch.cat([kd[bi, :, cs:ce], fp_k[bi, :, fs:fe].double()], dim=1)
        v = torch.cat([vd[bi, :, cs:ce], fp_v[bi, :, fs:fe].double()], dim=1)
        nf = fe - fs
        mask = torch.ones(tq, k.shape[1], dtype=torch.bool)
        if causal:
            for t in range(tq):
                mask[t, ce - cs + max(nf - tq + t + 1, 0) :] = False
        qb = q[bi].double()
        kk = k.repeat_interleave(hq // hkv, dim=0)
        s = (qb @ kk.transpose(-1, -2)) * scale
        s = s.masked_fill(~mask, -math.inf)
        lse = torch.logsumexp(s, dim=-1)
        if k.shape[1]:
            o = F.scaled_dot_product_attention(
                qb[None], k[None], v[None], attn_mask=mask, scale=scale, enable_gqa=True
            )[0]
        else:
            o = torch.zeros_like(qb)
        o = torch.where(torch.isinf(lse)[..., None], torch.zeros_like(o), o)
        outs.append(o)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def assert_close(out, lse, ref_out, ref_lse, rtol=1e-4):
    ref_out = ref_out.to(out.dtype) if out.dtype != torch.float32 else ref_out.float()
    atol = 1e-5 * max(1.0, float(ref_out.abs().max()) if ref_out.numel() else 1.0)
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite], ref_lse[finite].float(), rtol=rtol, atol=1e-4)


def run_both(case, **kw):
    out, lse = ops.pq_attention(**case, **kw)
    ref = reference(**case, **kw)
    return out, lse, ref


# -- exactness ------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 1000])
@pytest.mark.parametrize("bits", [(4, 4), (4, 8), (8, 4), (8, 8)], ids=lambda b: f"k{b[0]}v{b[1]}")
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("d", [64, 128])
def test_dense_over_codes_matches_sdpa(d, group, bits, n):
    kb, vb = bits
    case = make_case(
        hq=2 * group,
        hkv=2,
        d=d,
        n=n,
        f=5,
        k_m=d if kb == 4 else d // 2,
        k_nbits=kb,
        v_m=d // 2 if vb == 4 else d // 4,
        v_nbits=vb,
        seed=n + d + group,
    )
    out, lse, (ro, rl) = run_both(case)
    assert out.shape == case["q"].shape and out.dtype == torch.float32
    assert lse.shape == case["q"].shape[:3] and lse.dtype == torch.float32
    assert_close(out, lse, ro, rl)


def test_long_history_10k():
    case = make_case(hq=9, hkv=3, d=64, n=10_000, f=132, k_m=64, k_nbits=4, v_m=32, v_nbits=4, seed=7)
    out, lse, (ro, rl) = run_both(case)
    assert_close(out, lse, ro, rl)


def test_matches_product_quantizer_codes():
    """Codes and codebooks exactly as ctxcore.ProductQuantizer writes them (odd m with 4-bit)."""
    rng = np.random.default_rng(0)
    hkv, d, n = 2, 30, 300
    kq, vq, kcodes, vcodes, kx = [], [], [], [], []
    for m, nbits, store, codes in ((15, 4, kq, kcodes), (10, 8, vq, vcodes)):
        for h in range(hkv):
            x = rng.standard_normal((n, d)).astype(np.float32)
            pq = ctxcore.ProductQuantizer(d, m, nbits)
            pq.train(x, iters=3, seed=h)
            store.append(pq)
            codes.append(pq.encode(x))
            if nbits == 4:
                kx.append(pq.decode(codes[-1]))
    kc = torch.from_numpy(np.stack([p.centroids for p in kq]))
    vc = torch.from_numpy(np.stack([p.centroids for p in vq]))
    k_codes, v_codes = torch.from_numpy(np.stack(kcodes))[None], torch.from_numpy(np.stack(vcodes))[None]
    # decode_codes (used by the reference) agrees with ProductQuantizer.decode
    torch.testing.assert_close(ops.decode_codes(k_codes, kc)[0], torch.from_numpy(np.stack(kx)))
    q = torch.randn(1, 4, 1, d)
    out, lse = ops.pq_attention(q, k_codes, v_codes, kc, vc)
    assert_close(
        out,
        lse,
        *reference(q, k_codes, v_codes, kc, vc, torch.zeros(1, hkv, 0, d), torch.zeros(1, hkv, 0, d)),
    )


def test_empty_history_gives_zero_and_minus_inf():
    case = make_case(hq=6, hkv=2, n=0, f=0)
    out, lse = ops.pq_attention(**case)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()
    out, lse = ops.pq_attention(case["q"])  # no codes, no fp at all
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    out, lse = ops.pq_attention(case["q"], k_centroids=case["k_centroids"], v_centroids=case["v_centroids"])
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_causal_multi_token_queries_with_window():
    case = make_case(hq=6, hkv=2, tq=3, n=65, f=10, seed=3)
    for causal in (True, False):
        out, lse, (ro, rl) = run_both(case, causal=causal)
        assert_close(out, lse, ro, rl)
    a, _ = ops.pq_attention(**case, causal=True)
    b, _ = ops.pq_attention(**case, causal=False)
    assert not torch.allclose(a[:, :, 0], b[:, :, 0])  # the mask matters for early queries
    torch.testing.assert_close(a[:, :, -1], b[:, :, -1], rtol=1e-5, atol=1e-6)  # last sees all


def test_causal_fp_shorter_than_queries():
    """Queries whose own positions are not all in the fp part see codes only (or nothing)."""
    case = make_case(hq=2, hkv=1, tq=3, n=4, f=2, seed=4)
    out, lse, (ro, rl) = run_both(case)
    assert_close(out, lse, ro, rl)
    case = make_case(hq=2, hkv=1, tq=3, n=0, f=2, seed=4)
    out, lse, (ro, rl) = run_both(case)
    assert torch.isneginf(lse[:, :, 0]).all() and torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    assert_close(out, lse, ro, rl)


@pytest.mark.parametrize("range_dtype", [torch.int64, torch.int32])
def test_batch_with_left_padding(range_dtype):
    case = make_case(b=2, hq=6, hkv=2, tq=2, n=70, f=12, seed=5)
    cr = torch.tensor([[0, 70], [13, 61]], dtype=range_dtype)
    fr = torch.tensor([[0, 12], [4, 9]], dtype=range_dtype)
    out, lse, (ro, rl) = run_both(case, code_range=cr, fp_range=fr)
    assert_close(out, lse, ro, rl)
    # sequence 1 equals running it alone on its valid slices
    alone = {
        k: (
            v[1:, :, 13:61]
            if k.endswith("codes")
            else v[1:, :, 4:9]
            if k.startswith("fp")
            else v[1:]
            if k == "q"
            else v
        )
        for k, v in case.items()
    }
    o1, l1 = ops.pq_attention(**alone)
    torch.testing.assert_close(o1, out[1:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l1, lse[1:], rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 3),
    group=st.sampled_from([1, 2, 3]),
    tq=st.integers(1, 3),
    d=st.sampled_from([8, 16, 24]),
    n=st.integers(0, 300),
    f=st.integers(0, 6),
    kb=st.sampled_from([4, 8]),
    vb=st.sampled_from([4, 8]),
    causal=st.booleans(),
    seed=st.integers(0, 99),
    data=st.data(),
)
def test_random_configs(b, hkv, group, tq, d, n, f, kb, vb, causal, seed, data):
    divisors = [m for m in range(1, d + 1) if d % m == 0]
    k_m, v_m = data.draw(st.sampled_from(divisors)), data.draw(st.sampled_from(divisors))
    case = make_case(
        b=b,
        hq=hkv * group,
        hkv=hkv,
        tq=tq,
        d=d,
        n=n,
        f=f,
        k_m=k_m,
        k_nbits=kb,
        v_m=v_m,
        v_nbits=vb,
        seed=seed,
    )
    bounds = lambda m: sorted(data.draw(st.lists(st.integers(0, m), min_size=2, max_size=2)))  # noqa: E731
    cr = torch.tensor([bounds(n) for _ in range(b)])
    fr = torch.tensor([bounds(f) for _ in range(b)])
    scale = data.draw(st.floats(0.05, 1.0))
    out, lse, (ro, rl) = run_both(case, code_range=cr, fp_range=fr, scale=scale, causal=causal)
    assert_close(out, lse, ro, rl)


# -- dtypes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    case = make_case(hq=6, hkv=2, tq=2, n=200, f=8, seed=9)
    half = {k: (v.to(dtype) if k in ("q", "fp_k", "fp_v") else v) for k, v in case.items()}
    out, lse = ops.pq_attention(**half)
    assert out.dtype == dtype and lse.dtype == torch.float32
    as_f32 = {k: (v.float() if k in ("q", "fp_k", "fp_v") else v) for k, v in half.items()}
    o32, l32 = ops.pq_attention(**as_f32)
    torch.testing.assert_close(out.float(), o32, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(lse, l32)  # lse is computed and returned in float32
    o_full, _ = ops.pq_attention(**case)
    torch.testing.assert_close(out.float(), o_full, rtol=0.05, atol=0.05)


# -- torch integration ----------------------------------------------------------------------
def op_args(case, scale=0.3, causal=True):
    b = case["q"].shape[0]
    return (
        case["q"],
        case["k_codes"],
        case["v_codes"],
        case["k_centroids"],
        case["v_centroids"],
        ops._full_range(b, case["k_codes"].shape[2]),
        case["fp_k"],
        case["fp_v"],
        ops._full_range(b, case["fp_k"].shape[2]),
        scale,
        causal,
    )


def test_opcheck_pq_attention():
    torch.library.opcheck(torch.ops.ctxcore.pq_attention.default, op_args(make_case(hq=4, hkv=2, d=16, n=9)))
    half = make_case(hq=2, hkv=1, tq=2, d=8, n=3, f=3)
    half["q"] = half["q"].bfloat16()
    torch.library.opcheck(torch.ops.ctxcore.pq_attention.default, op_args(half, causal=False))


def test_opcheck_page_scores():
    q, lo = torch.randn(2, 4, 2, 16), torch.randn(2, 2, 5, 16)
    torch.library.opcheck(torch.ops.ctxcore.page_scores.default, (q, lo, lo + 1))


def test_torch_compile_traces_the_op():
    case = make_case(hq=4, hkv=2, d=16, n=40, f=4)

    def step(q, kc, vc, kcent, vcent, fk, fv):
        out, lse = ops.pq_attention(q * 2.0, kc, vc, kcent, vcent, fk, fv)
        return out.sum(dim=-1) + lse

    args = [case[k] for k in ("q", "k_codes", "v_codes", "k_centroids", "v_centroids", "fp_k", "fp_v")]
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), step(*args))


def test_meta_tensors_use_the_fake_kernel():
    case = make_case(hq=6, hkv=2, tq=2, d=16, n=5)
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in op_args(case)]
    out, lse = torch.ops.ctxcore.pq_attention(*meta)
    assert out.device.type == "meta" and out.shape == (1, 6, 2, 16) and lse.shape == (1, 6, 2)
    assert lse.dtype == torch.float32


# -- errors ---------------------------------------------------------------------------------
def test_non_cpu_tensor_raises_device_error():
    case = make_case(hq=2, hkv=2, d=16, n=3)
    for name in ("q", "k_codes", "fp_v"):
        bad = dict(case, **{name: case[name].to("meta")})
        with pytest.raises(DeviceError, match="different devices"):
            ops.pq_attention(**bad)
    with pytest.raises(DeviceError):
        ops.page_scores(
            torch.randn(1, 2, 1, 4, device="meta"), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
        )


def test_error_paths():
    case = make_case(hq=6, hkv=2, d=16, n=3)
    with pytest.raises(DTypeError, match="k_codes.*uint8"):
        ops.pq_attention(**dict(case, k_codes=case["k_codes"].int()))
    with pytest.raises(DTypeError, match="q"):
        ops.pq_attention(**dict(case, q=case["q"].double()))
    with pytest.raises(DTypeError, match="code_range"):
        ops.pq_attention(**case, code_range=torch.tensor([[0.0, 3.0]]))
    with pytest.raises(ConfigError, match="multiple of KV heads"):
        ops.pq_attention(**dict(case, q=torch.randn(1, 5, 1, 16)))
    with pytest.raises(ShapeError, match="bytes per token"):
        ops.pq_attention(**dict(case, k_codes=case["k_codes"][..., :-1]))
    with pytest.raises(ConfigError, match="codebooks for 3 KV heads"):
        ops.pq_attention(**dict(case, v_centroids=torch.randn(3, 8, 256, 2)))
    with pytest.raises(ConfigError, match="16 .4-bit. or 256"):
        ops.pq_attention(**dict(case, k_centroids=torch.randn(2, 16, 32, 1)))
    with pytest.raises(ShapeError, match="head_dim"):
        ops.pq_attention(**dict(case, k_centroids=torch.randn(2, 16, 16, 2)))
    with pytest.raises(ShapeError, match="fp_v"):
        ops.pq_attention(**dict(case, fp_v=case["fp_v"][:, :, :-1]))
    with pytest.raises(ShapeError, match="4-D"):
        ops.pq_attention(**dict(case, q=case["q"][0]))
    with pytest.raises(CtxcoreError):  # range bounds are checked by the kernel
        ops.pq_attention(**case, code_range=torch.tensor([[0, 99]]))
    with pytest.raises(ConfigError):  # also directly through the dispatcher
        torch.ops.ctxcore.pq_attention(*op_args(dict(case, q=torch.randn(1, 5, 1, 16))))


# -- page scores and selection --------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 3),
    group=st.integers(1, 3),
    tq=st.integers(1, 3),
    pages=st.integers(1, 6),
    ps=st.integers(1, 9),
    d=st.sampled_from([4, 16, 64]),
    seed=st.integers(0, 999),
)
def test_page_scores_are_upper_bounds(b, hkv, group, tq, pages, ps, d, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * group, tq, d, generator=g)
    keys = torch.randn(b, hkv, pages, ps, d, generator=g) * torch.rand(d, generator=g) * 3
    s = ops.page_scores(q, keys.amin(dim=3), keys.amax(dim=3))
    assert s.shape == (b, hkv, pages) and s.dtype == torch.float32
    qg = q.reshape(b, hkv, group * tq, d)
    dots = torch.einsum("bhqd,bhpkd->bhpqk", qg.double(), keys.double()).flatten(-2).amax(-1)
    assert (s.double() >= dots - 1e-4 * (1 + dots.abs())).all()


def test_select_pages_takes_top_scores():
    q = torch.randn(2, 6, 1, 16)
    lo = torch.randn(2, 2, 20, 16)
    hi = lo + torch.rand(2, 2, 20, 16)
    sel = ops.select_pages(q, (lo, hi), 5)
    assert sel.shape == (2, 2, 5) and sel.dtype == torch.int64
    assert (sel.diff(dim=-1) > 0).all()
    want = ops.page_scores(q, lo, hi).topk(5, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(sel, want)
    assert ops.select_pages(q, (lo, hi), 0.25).shape == (2, 2, 5)
    assert torch.equal(ops.select_pages(q, (lo, hi), 100)[0, 0], torch.arange(20))
    # store layout [P, Hkv, 3, D]
    abstracts = torch.stack([lo[0], hi[0], (lo[0] + hi[0]) / 2], dim=2).transpose(0, 1)
    assert torch.equal(ops.select_pages(q[:1], abstracts, 5), sel[:1])


# -- paged attention (selected pages attended in place) --------------------------------------
def _paged_reference(q, k, v, pages, page_size, fp_k, fp_v, causal):
    """SDPA over the selected pages' rows gathered in order, then the fp part, per KV head."""
    b, hq, tq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    out = torch.empty(b, hq, tq, d)
    for bi in range(b):
        for h in range(hkv):
            ids = [p for p in pages[bi, h].tolist() if p >= 0]
            rows = [torch.arange(p * page_size, min((p + 1) * page_size, n)) for p in ids]
            idx = torch.cat(rows) if rows else torch.empty(0, dtype=torch.int64)
            kk = torch.cat((k[bi, h, idx], fp_k[bi, h])).float()
            vv = torch.cat((v[bi, h, idx], fp_v[bi, h])).float()
            m = kk.shape[0]
            mask = torch.ones(tq, m, dtype=torch.bool)
            if causal:
                for t in range(tq):
                    mask[t, m - (tq - 1 - t) :] = False
            qq = q[bi, h * g : (h + 1) * g].float()
            out[bi, h * g : (h + 1) * g] = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tq,group,d", [(1, 3, 64), (3, 4, 128), (2, 1, 24)])
def test_paged_attention_equals_sdpa_over_gathered_pages(dtype, tq, group, d):
    g = torch.Generator().manual_seed(tq * 100 + d)
    b, hkv, n, ps = 2, 2, 300, 64  # 5 pages, the last one partial
    q = torch.randn(b, hkv * group, tq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, n, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, n, d, generator=g).to(dtype)
    fk = torch.randn(b, hkv, 6, d, generator=g).to(dtype)
    fv = torch.randn(b, hkv, 6, d, generator=g).to(dtype)
    pages = torch.tensor([[[4, 0, -1], [2, 3, 1]], [[1, -1, -1], [4, 2, 0]]])
    out, lse = ops.paged_attention(q, k, v, pages, ps, fk, fv)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (b, hkv * group, tq)
    want = _paged_reference(q, k, v, pages, ps, fk, fv, causal=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol)
    # The device-generic composition (the CUDA implementation) agrees on CPU tensors.
    fr = torch.tensor([[0, 6]] * b)
    got, got_lse = ops._paged_attention_composed(q, k, v, pages, ps, fk, fv, fr, 1 / math.sqrt(d), True)
    torch.testing.assert_close(got.float(), out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(got_lse, lse, atol=1e-4, rtol=1e-4)


def test_paged_attention_all_pages_is_exact_and_quest_uses_it():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 6, 1, 32, generator=g)
    k = torch.randn(1, 2, 200, 32, generator=g)
    v = torch.randn(1, 2, 200, 32, generator=g)
    full = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1))
    every = torch.arange(4).expand(1, 2, 4).contiguous()
    out, _ = ops.paged_attention(q, k, v, every, 64)
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    # Nothing selected and no fp part: zero output, lse -inf.
    none, lse = ops.paged_attention(q, k, v, torch.full((1, 2, 2), -1), 64)
    assert torch.equal(none, torch.zeros_like(none)) and torch.isinf(lse).all()
    quest, _ = ops.quest_attention(q, k, v, 1.0, page_size=64)
    torch.testing.assert_close(quest, full, atol=1e-5, rtol=1e-5)


def test_opcheck_paged_attention():
    g = torch.Generator().manual_seed(4)
    args = (
        torch.randn(1, 4, 2, 16, generator=g),
        torch.randn(1, 2, 70, 16, generator=g),
        torch.randn(1, 2, 70, 16, generator=g),
        torch.tensor([[[1, 0], [-1, 1]]]),
        32,
        torch.randn(1, 2, 3, 16, generator=g),
        torch.randn(1, 2, 3, 16, generator=g),
        torch.tensor([[0, 3]]),
        0.25,
        True,
    )
    torch.library.opcheck(torch.ops.ctxcore.paged_attention.default, args)


def test_paged_attention_errors():
    q = torch.randn(1, 4, 1, 16)
    k = torch.randn(1, 2, 70, 16)
    ok = torch.tensor([[[0, 1], [2, -1]]])
    with pytest.raises(ConfigError, match="out of range"):
        ops.paged_attention(q, k, k, torch.tensor([[[0, 3], [0, 1]]]), 32)
    with pytest.raises(ConfigError, match="appears twice"):
        ops.paged_attention(q, k, k, torch.tensor([[[0, 1], [2, 2]]]), 32)
    twice, none, fr = torch.tensor([[[0, 1], [2, 2]]]), k[:, :, :0], torch.tensor([[0, 0]])
    with pytest.raises(ConfigError, match="appears twice"):
        ops._paged_attention_composed(q, k, k, twice, 32, none, none, fr, 1.0, True)
    with pytest.raises(DTypeError):
        ops.paged_attention(q, k, k, ok.float(), 32)
    with pytest.raises(ShapeError):
        ops.paged_attention(q, k, k[:, :, :69], ok, 32)
    with pytest.raises(ShapeError):
        ops.paged_attention(q, k, k, ok[:, :1], 32)
    with pytest.raises(ConfigError):
        ops.paged_attention(q, k, k, ok, 0)
    with pytest.raises(ConfigError):
        ops.paged_attention(torch.randn(1, 3, 1, 16), k, k, ok, 32)


@pytest.mark.parametrize("k_nbits,k_m", [(4, 16), (4, 15), (8, 8)])
def test_pq_token_scores_and_selection(k_nbits, k_m):
    d = 30 if k_m == 15 else 16
    case = make_case(hq=6, hkv=2, tq=2, d=d, n=500, k_m=k_m, k_nbits=k_nbits)
    q, kc, cent = case["q"], case["k_codes"], case["k_centroids"]
    s = ops.pq_token_scores(q, kc, cent, block=128)
    keys = ops.decode_codes(kc, cent)
    want = torch.einsum("bhqd,bhnd->bhqn", q.reshape(1, 2, 6, d), keys)
    torch.testing.assert_close(s, want, rtol=1e-4, atol=1e-4)
    sel = ops.select_tokens_pq(q, kc, cent, 50)
    assert sel.shape == (1, 2, 50) and (sel.diff(dim=-1) > 0).all()
    w = want / math.sqrt(d)
    ranked = (w - w.logsumexp(-1, keepdim=True)).amax(2).topk(50, dim=-1).indices.sort(-1).values
    assert torch.equal(sel, ranked)
    assert torch.equal(ops.select_tokens_pq(q, kc, cent, 1.0)[0, 1], torch.arange(500))


def test_pq_token_scores_with_product_quantizers():
    """ProductQuantizer objects (scored in Rust) give the same scores as their centroids."""
    rng = np.random.default_rng(0)
    quantizers = []
    for h in range(2):
        pq = ctxcore.ProductQuantizer(16, 8, 4)
        pq.train(rng.standard_normal((400, 16)).astype(np.float32), iters=2, seed=h)
        quantizers.append(pq)
    cent = torch.from_numpy(np.stack([p.centroids for p in quantizers]))
    q = torch.randn(2, 6, 2, 16)
    kc = torch.randint(0, 256, (2, 2, 300, 4), dtype=torch.uint8)
    torch.testing.assert_close(
        ops.pq_token_scores(q, kc, quantizers), ops.pq_token_scores(q, kc, cent), rtol=1e-4, atol=1e-4
    )
    assert torch.equal(ops.select_tokens_pq(q, kc, quantizers, 30), ops.select_tokens_pq(q, kc, cent, 30))
    approx = ops.select_tokens_pq(q, kc, quantizers, 30, fast=True)
    assert approx.shape == (2, 2, 30)


# -- over a KVStore -------------------------------------------------------------------------
HKV, D, PS, WIN, SINKS = 2, 32, 16, 8, 4


def build_store(tokens=300, seed=0, **kw):
    rng = np.random.default_rng(seed)
    store = ctxcore.KVStore(
        layers=1,
        kv_heads=HKV,
        head_dim=D,
        page_size=PS,
        window=WIN,
        sinks=SINKS,
        bits=4,
        keep_full_precision=True,
        **kw,
    )
    train = rng.standard_normal((HKV, 600, D)).astype(np.float32)
    store.calibrate(0, train, train, iters=3)
    k = rng.standard_normal((HKV, tokens, D)).astype(np.float32)
    v = rng.standard_normal((HKV, tokens, D)).astype(np.float32)
    store.append(0, k[:, : tokens // 2], v[:, : tokens // 2])
    store.append(0, k[:, tokens // 2 :], v[:, tokens // 2 :])
    return store, torch.from_numpy(k), torch.from_numpy(v)


def store_codebooks(store):
    """Rebuild the layer's quantizers the way build_store calibrated them (same data, seed),
    held compactly as the store holds them (float16 centroids)."""
    rng = np.random.default_rng(0)
    train = rng.standard_normal((HKV, 600, D)).astype(np.float32)
    kq, vq = [], []
    c = store.config
    for h in range(HKV):
        for lst, m, nbits in ((kq, c["k_m"], c["k_nbits"]), (vq, c["v_m"], c["v_nbits"])):
            pq = ctxcore.ProductQuantizer(D, m, nbits)
            pq.train(train[h], iters=3, seed=0)
            lst.append(pq.compact())
    return kq, vq


def store_fp_history(store):
    """K/V in position order as the store holds them: sinks (f32) | pages (fp16) | window (f32)."""
    ks, vs = store.sinks(0)
    kw, vw = store.window(0)
    pages = [store.page(0, p) for p in range(store.num_pages(0))]
    k = np.concatenate([ks] + [p.k_fp16.astype(np.float32) for p in pages] + [kw], axis=1)
    v = np.concatenate([vs] + [p.v_fp16.astype(np.float32) for p in pages] + [vw], axis=1)
    return torch.from_numpy(k)[None], torch.from_numpy(v)[None]


def causal_sdpa(q, k, v):
    tq, n = q.shape[2], k.shape[2]
    mask = torch.ones(tq, n, dtype=torch.bool).tril(n - tq)
    return F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True
    ).float()


@pytest.mark.parametrize("method", ["quest", "pq"])
@pytest.mark.parametrize("tq", [1, 3])
def test_selective_full_budget_is_exact(method, tq):
    store, k, v = build_store()
    cb = store_codebooks(store)
    q = torch.randn(1, 6, tq, D)
    kf, vf = store_fp_history(store)
    for budget in (1.0, 10_000):
        out, lse = selective_attention(q, store, 0, budget, method=method, codebooks=cb)
        assert out.shape == q.shape and lse.shape == (1, 6, tq)
        torch.testing.assert_close(out, causal_sdpa(q, kf, vf), rtol=1e-4, atol=1e-5)
    # and close to attention over the original float32 K/V (pages hold fp16 copies)
    torch.testing.assert_close(out, causal_sdpa(q, k[None], v[None]), rtol=0, atol=5e-3)
    out3, lse3 = selective_attention(q[0], store, 0, 1.0, method=method, codebooks=cb)
    assert out3.shape == q.shape[1:] and lse3.shape == (6, tq)


@pytest.mark.parametrize("method", ["quest", "pq"])
def test_selective_small_budget(method):
    store, k, v = build_store(tokens=600, ram_budget="256KB")
    cb = store_codebooks(store)
    q = torch.randn(1, 6, 1, D).bfloat16()
    store.evict_all()
    before = store.stats()
    out, lse = selective_attention(q, store, 0, 0.1, method=method, codebooks=cb)
    after = store.stats()
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert torch.isfinite(lse).all()
    assert (
        after["prefetched"] + after["hits"] + after["misses"]
        > before["prefetched"] + before["hits"] + before["misses"]
    )
    # The selected pages were queued for prefetch (whether the prefetch thread or the reader
    # loads a page first is a race; either way it is read once).
    assert after["prefetch_requested"] > before["prefetch_requested"]
    if method == "pq":  # centroid arrays (torch scoring) select the same tokens as quantizers (Rust)
        arrays = tuple(np.stack([p.centroids for p in side]) for side in cb)
        same, _ = selective_attention(q, store, 0, 0.1, method=method, codebooks=arrays)
        torch.testing.assert_close(same, out)
    out0, _ = selective_attention(q, store, 0, 0, method=method, codebooks=cb)
    assert torch.isfinite(out0).all()  # sinks + window only


def test_selective_quest_finds_a_needle():
    """A page holding keys aligned with the query is selected, and the output follows its values."""
    store, _, _ = build_store(tokens=400, seed=1)
    rng = np.random.default_rng(2)
    needle = rng.standard_normal(D).astype(np.float32)
    needle /= np.linalg.norm(needle)
    k = np.tile(needle * 12, (HKV, PS, 1)).astype(np.float32)
    v = np.full((HKV, PS, D), 3.0, np.float32)
    store.append(0, k, v)
    filler = rng.standard_normal((HKV, 3 * PS, D)).astype(np.float32)
    store.append(0, filler, filler)
    q = torch.from_numpy(np.tile(needle * 4, (1, 6, 1, 1)).astype(np.float32))
    out, _ = selective_attention(q, store, 0, 2 * PS, method="quest")
    exact, _ = selective_attention(q, store, 0, 1.0, method="quest")
    torch.testing.assert_close(out, exact, rtol=0, atol=0.05)
    assert float(out.mean()) > 2.9  # the needle's values dominate


def test_dense_attention_from_store():
    store, _, _ = build_store()
    kq, vq = store_codebooks(store)
    q = torch.randn(1, 6, 2, D)
    out, lse = dense_attention_from_store(q, store, 0, codebooks=(kq, vq))
    # reference: decoded page codes, with sinks and window in full precision, in position order
    ks, vs = store.sinks(0)
    kw, vw = store.window(0)
    pages = [store.page(0, p) for p in range(store.num_pages(0))]
    kd = [
        np.concatenate([kq[h].decode(np.ascontiguousarray(p.k_codes[h])) for p in pages]) for h in range(HKV)
    ]
    vd = [
        np.concatenate([vq[h].decode(np.ascontiguousarray(p.v_codes[h])) for p in pages]) for h in range(HKV)
    ]
    k = torch.from_numpy(np.concatenate([ks, np.stack(kd), kw], axis=1))[None]
    v = torch.from_numpy(np.concatenate([vs, np.stack(vd), vw], axis=1))[None]
    torch.testing.assert_close(out, causal_sdpa(q, k, v), rtol=1e-4, atol=1e-5)
    cents = (np.stack([p.centroids for p in kq]), np.stack([p.centroids for p in vq]))
    out2, _ = dense_attention_from_store(q[0], store, 0, codebooks=cents)
    torch.testing.assert_close(out2, out[0])
    out3, _ = dense_attention_from_store(q, store, 0)  # codebooks from store.codebooks(0)
    torch.testing.assert_close(out3, out)
    bare = ctxcore.KVStore(layers=1, kv_heads=HKV, head_dim=D, page_size=PS, window=WIN, sinks=SINKS)
    with pytest.raises(ConfigError, match="codebooks"):
        dense_attention_from_store(q, bare, 0)


def test_store_errors():
    store, _, _ = build_store(tokens=40)
    with pytest.raises(ConfigError, match="method"):
        selective_attention(torch.randn(1, 6, 1, D), store, 0, 0.5, method="h2o")
    with pytest.raises(ConfigError, match="fraction|budget"):
        selective_attention(torch.randn(1, 6, 1, D), store, 0, 1.5)
    with pytest.raises(ConfigError, match="multiple"):
        selective_attention(torch.randn(1, 5, 1, D), store, 0, 0.5)
    plain = ctxcore.KVStore(layers=1, kv_heads=HKV, head_dim=D, page_size=PS, window=WIN, sinks=SINKS)
    with pytest.raises(ConfigError, match="keep_full_precision"):
        selective_attention(torch.randn(1, 6, 1, D), plain, 0, 0.5)
