"""KVStore.attend: dense-over-codes and Quest attention computed in Rust straight from the store."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from store_oracles import dense_attention_from_store, selective_attention

import ctxcore
import ctxcore.ops as ops
from ctxcore.exceptions import ConfigError

H, D, HQ = 2, 16, 6


def build(tokens=300, keep_fp=True, plant=None, **kw) -> tuple[ctxcore.KVStore, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    s = ctxcore.KVStore(1, H, D, page_size=16, window=8, sinks=2, bits=4, keep_full_precision=keep_fp, **kw)
    sample = rng.standard_normal((H, 400, D)).astype(np.float32)
    s.calibrate(0, sample, sample * 0.5, iters=3)
    k = rng.standard_normal((H, tokens, D)).astype(np.float32)
    v = rng.standard_normal((H, tokens, D)).astype(np.float32)
    if plant is not None:  # keys of page `plant` aligned with dimension 0
        k[:, 2 + plant * 16 : 2 + (plant + 1) * 16, 0] = 5.0
    for i in range(0, tokens, 37):
        s.append(0, k[:, i : i + 37], v[:, i : i + 37])
    return s, k, v


def reference(q: torch.Tensor, k: np.ndarray, v: np.ndarray, tq: int) -> torch.Tensor:
    """Causal attention of q [HQ, tq, D] whose positions are the last tq of k/v [H, T, D]."""
    kk = torch.from_numpy(k).double().repeat_interleave(HQ // H, 0)
    vv = torch.from_numpy(v).double().repeat_interleave(HQ // H, 0)
    t = k.shape[1]
    mask = torch.ones(tq, t, dtype=torch.bool).tril(t - tq)
    return torch.nn.functional.scaled_dot_product_attention(q.double(), kk, vv, attn_mask=mask).float()


def stored_history(s: ctxcore.KVStore, fp16: bool) -> tuple[np.ndarray, np.ndarray]:
    """[sinks; pages (decoded codes, or fp16 copies); window] as [H, T, D] float32."""
    kc, vc = s.codebooks(0)
    ks, vs = s.sinks(0)
    parts_k, parts_v = [ks], [vs]
    for p in range(s.num_pages(0)):
        page = s.page(0, p)
        if fp16:
            parts_k.append(page.k_fp16.astype(np.float32))
            parts_v.append(page.v_fp16.astype(np.float32))
        else:
            parts_k.append(
                ops.decode_codes(torch.from_numpy(page.k_codes)[None], torch.from_numpy(kc))[0].numpy()
            )
            parts_v.append(
                ops.decode_codes(torch.from_numpy(page.v_codes)[None], torch.from_numpy(vc))[0].numpy()
            )
    kw, vw = s.window(0)
    parts_k.append(kw)
    parts_v.append(vw)
    return np.concatenate(parts_k, 1), np.concatenate(parts_v, 1)


@pytest.mark.parametrize("tokens", [0, 1, 9, 10, 26, 300])
@pytest.mark.parametrize("tq", [1, 3])
def test_dense_equals_attention_over_decoded_pages(tokens, tq):
    s, _, _ = build(tokens=max(tokens, 0))
    if tokens < tq:
        pytest.skip("queries are the last appended tokens")
    q = torch.randn(HQ, tq, D)
    out, lse = s.attend(0, q)
    assert out.shape == q.shape and lse.shape == (HQ, tq)
    k, v = stored_history(s, fp16=False)
    torch.testing.assert_close(out, reference(q, k, v, tq), rtol=1e-4, atol=1e-5)


def test_dense_matches_the_python_path_and_reads_evicted_pages(tmp_path):
    s, _, _ = build(tokens=500, ram_budget=None, offload_dir=tmp_path)
    s.evict_all()
    q = torch.randn(1, HQ, 1, D)
    out, lse = s.attend(0, q)
    ref, ref_lse = dense_attention_from_store(q, s, 0)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4)
    assert s.stats()["bytes_read"] > 0


@pytest.mark.parametrize("tq", [1, 2])
def test_quest_full_budget_is_exact_over_fp16_copies(tq):
    s, k, v = build(tokens=300)
    q = torch.randn(HQ, tq, D)
    kf, vf = stored_history(s, fp16=True)
    for budget in (None, 1.0, 10_000):
        out, _ = s.attend(0, q, method="quest", budget=budget)
        torch.testing.assert_close(out, reference(q, kf, vf, tq), rtol=1e-4, atol=1e-5)
    # and close to the original float32 keys/values
    torch.testing.assert_close(out, reference(q, k, v, tq), rtol=0, atol=5e-3)
    py, _ = selective_attention(q[None], s, 0, 1.0, method="quest")
    torch.testing.assert_close(out, py[0], rtol=1e-4, atol=1e-5)


def test_quest_small_budget_finds_the_planted_page():
    s, _, _ = build(tokens=300, plant=7)
    q = torch.zeros(HQ, 1, D)
    q[:, 0, 0] = 10.0
    out, _ = s.attend(0, q, method="quest", budget=16)  # one page per KV head
    full, _ = s.attend(0, q, method="quest")
    assert torch.isfinite(out).all()
    # The planted page carries almost all of the softmax mass: one page is close to everything.
    torch.testing.assert_close(out, full, rtol=0, atol=0.05)
    bf, _ = s.attend(0, q.bfloat16(), method="quest", budget=0.1)
    assert bf.dtype == torch.bfloat16


@pytest.mark.parametrize("start", [0, 5, 40])
def test_quest_without_fp16_copies_attends_the_codes(start):
    # No fp16 copies: Quest attends the selected pages' codes; with every page selected that is
    # dense attention over the codes, and a budget reads only the pages it selects.
    s, _, _ = build(tokens=300, keep_fp=False)
    q = torch.randn(HQ, 1, D, generator=torch.Generator().manual_seed(3)) * 2
    dense, dl = s.attend(0, q, start=start)
    every, el = s.attend(0, q, method="quest", start=start)
    torch.testing.assert_close(every, dense, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(el, dl, rtol=1e-4, atol=1e-5)
    s.evict_all()
    before = s.stats()
    part, _ = s.attend(0, q, method="quest", budget=32, start=start)  # 2 pages per KV head
    after = s.stats()
    read = after["misses"] + after["prefetched"] - before["misses"] - before["prefetched"]
    assert torch.isfinite(part).all() and 0 < read <= 2 * H < s.num_pages(0)


def test_errors():
    s, _, _ = build(tokens=40, keep_fp=False)
    with pytest.raises(ConfigError, match="multiple"):
        s.attend(0, np.zeros((3, 1, D), np.float32))
    with pytest.raises(ConfigError, match="method"):
        s.attend(0, np.zeros((HQ, 1, D), np.float32), method="magic")
    with pytest.raises(ctxcore.exceptions.ShapeError):
        s.attend(0, np.zeros((HQ, 1, D + 1), np.float32))
    with pytest.raises(ConfigError, match="fraction"):
        build(tokens=40)[0].attend(0, np.zeros((HQ, 1, D), np.float32), method="quest", budget=1.5)


def reference_from(q: torch.Tensor, k: np.ndarray, v: np.ndarray, tq: int, start: int) -> tuple:
    """Causal attention over positions >= start only; a query seeing nothing gives zeros, lse -inf."""
    kk = torch.from_numpy(k).double().repeat_interleave(HQ // H, 0)
    vv = torch.from_numpy(v).double().repeat_interleave(HQ // H, 0)
    t = k.shape[1]
    pos = torch.arange(t)
    own = torch.arange(t - tq, t)[:, None]
    visible = (pos[None] <= own) & (pos[None] >= start)
    s = (q.double() @ kk.transpose(1, 2)) / np.sqrt(D)
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, -1)
    w = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return (w @ vv).float(), lse.float()


# 300 tokens: sinks [0, 2), 18 closed pages [2, 290), open page [290, 292), window [292, 300).
@pytest.mark.parametrize("start", [0, 1, 2, 18, 57, 290, 291, 292, 295, 298, 299, 300])
def test_start_ignores_left_padding(start):
    s, _, _ = build(tokens=300)
    tq = 3
    q = torch.randn(HQ, tq, D) * 2
    kd, vd = stored_history(s, fp16=False)
    ref, ref_lse = reference_from(q, kd, vd, tq, start)
    out, lse = s.attend(0, q, start=start)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4)
    kf, vf = stored_history(s, fp16=True)
    ref, ref_lse = reference_from(q, kf, vf, tq, start)
    out, lse = s.attend(0, q, method="quest", start=start)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4)
    if start > 300 - tq:  # the first queries see nothing at all
        blind = 300 - tq + np.arange(tq) < start
        assert (out[:, blind] == 0).all() and torch.isneginf(lse[:, blind]).all()


def test_start_skips_padded_pages_for_quest_and_reads():
    # Page 0 (positions 2..18) is padding with keys aligned to q; page 7 is the real match.
    s, k, v = build(tokens=300, plant=7)
    kk = k.copy()
    kk[:, 2:18, 0] = 50.0
    s2 = ctxcore.KVStore(1, H, D, page_size=16, window=8, sinks=2, bits=4, keep_full_precision=True)
    s2.calibrate(0, kk, v, iters=3)
    s2.append(0, kk, v)
    q = torch.zeros(HQ, 1, D)
    q[:, 0, 0] = 10.0
    one, _ = s2.attend(0, q, method="quest", budget=16, start=18)
    full, _ = s2.attend(0, q, method="quest", start=18)
    torch.testing.assert_close(one, full, rtol=0, atol=0.05)


def test_start_errors():
    s, _, _ = build(tokens=40)
    q = np.zeros((HQ, 1, D), np.float32)
    with pytest.raises(ConfigError, match="start"):
        s.attend(0, q, start=41)
    with pytest.raises(ConfigError, match="start"):
        s.attend(0, q, start=-1)
    out, lse = s.attend(0, q, start=40)
    assert (out == 0).all() and np.isneginf(lse).all()
