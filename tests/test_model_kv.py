"""Product quantization of the real KV cache of SmolLM2-135M, against faiss as the baseline.

Slow (the model loads once per session, ~20 s; a 2048-token prefill takes ~10 s on 2 cores).
Deselect with ``-m "not model"``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import ctxcore

pytestmark = pytest.mark.model

N_TOKENS = 2048
N_LAYERS, N_Q_HEADS, N_KV_HEADS, HEAD_DIM = 30, 9, 3, 64
PQ_CONFIGS = [(16, 8), (32, 4), (64, 4)]
ITERS = 25


@pytest.fixture(scope="module")
def shakespeare_kv(shakespeare_text, smollm2):
    """KV cache of the first 2048 tokens of tinyshakespeare.txt (keys/values [30, 3, 2048, 64])."""
    from ctxcore.models import extract_kv

    model, tokenizer = smollm2
    kv = extract_kv(model, tokenizer, shakespeare_text[:40_000], max_tokens=N_TOKENS)
    assert kv["tokens"] == N_TOKENS
    return kv


@pytest.fixture(scope="module")
def faiss_single_thread():
    """faiss with one OpenMP thread: on few cores its spinning OpenMP pool fights torch's (and
    ctxcore's) threads and k-means slows down 10x. Results do not depend on the thread count."""
    faiss = pytest.importorskip("faiss")
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield faiss
    faiss.omp_set_num_threads(before)


def _mse(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((x.astype(np.float64) - y) ** 2))


@pytest.mark.parametrize(("m", "nbits"), PQ_CONFIGS)
@pytest.mark.parametrize("kind", ["keys", "values"])
@pytest.mark.parametrize("layer", [0, 14, 29])
def test_pq_mse_within_5_percent_of_faiss(shakespeare_kv, faiss_single_thread, layer, kind, m, nbits):
    faiss = faiss_single_thread
    # The 3 KV heads of the layer pooled into one [3 * T, 64] training and test set.
    x = np.ascontiguousarray(shakespeare_kv[kind][layer].reshape(-1, HEAD_DIM))
    assert x.shape == (N_KV_HEADS * N_TOKENS, HEAD_DIM)

    pq = ctxcore.ProductQuantizer(HEAD_DIM, m, nbits)
    pq.train(x, iters=ITERS, seed=0)
    ours = _mse(x, pq.decode(pq.encode(x)))

    fpq = faiss.ProductQuantizer(HEAD_DIM, m, nbits)
    fpq.cp.niter = ITERS
    fpq.cp.seed = 0
    fpq.cp.min_points_per_centroid = 1  # only silences the "provide more training points" warning
    fpq.train(x)
    theirs = _mse(x, fpq.decode(fpq.compute_codes(x)))

    assert ours <= 1.05 * theirs, (
        f"layer {layer} {kind} m={m} nbits={nbits}: ctxcore MSE {ours:.6g} > 1.05 x faiss MSE {theirs:.6g} "
        f"(ratio {ours / theirs:.3f})"
    )


def test_extract_kv_shapes_match_config(smollm2, shakespeare_kv):
    model, _ = smollm2
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim) == (
        N_LAYERS,
        N_Q_HEADS,
        N_KV_HEADS,
        HEAD_DIM,
    )
    for name in ("keys", "values"):
        arr = shakespeare_kv[name]
        assert arr.shape == (N_LAYERS, N_KV_HEADS, N_TOKENS, HEAD_DIM)
        assert arr.dtype == np.float32
        assert arr.flags.c_contiguous
        assert np.isfinite(arr).all()
    assert shakespeare_kv["input_ids"].shape == (N_TOKENS,)


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def test_keys_are_post_rope_and_queries_reproduce_attention(smollm2, shakespeare_text):
    """Cache keys == RoPE(k_proj(x)) computed by hand; queries/keys/values give o_proj's input."""
    import torch

    from ctxcore.models import extract_kv

    model, tokenizer = smollm2
    layers = [0, 14]
    pre_rope: dict[int, np.ndarray] = {}
    attn_out: dict[int, np.ndarray] = {}
    hooks = []
    for li in layers:
        attn = model.model.layers[li].self_attn

        def k_hook(_mod, _inp, out, li=li):
            pre_rope[li] = out[0].float().numpy().copy()

        def o_hook(_mod, inp, li=li):
            attn_out[li] = inp[0][0].float().numpy().copy()

        hooks.append(attn.k_proj.register_forward_hook(k_hook))
        hooks.append(attn.o_proj.register_forward_pre_hook(o_hook))
    try:
        kv = extract_kv(model, tokenizer, shakespeare_text[:2000], max_tokens=64, return_queries=True)
    finally:
        for h in hooks:
            h.remove()
    n = kv["tokens"]
    assert n == 64
    assert kv["queries"].shape == (N_LAYERS, N_Q_HEADS, n, HEAD_DIM)

    # Reference RoPE (rotate-half convention), written independently of transformers.
    half = HEAD_DIM // 2
    inv_freq = 1.0 / (_rope_theta(model.config) ** (np.arange(0, HEAD_DIM, 2, dtype=np.float64) / HEAD_DIM))
    ang = np.arange(n, dtype=np.float64)[:, None] * inv_freq[None, :]  # [T, 32]
    cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))

    for li in layers:
        k = pre_rope[li].reshape(n, N_KV_HEADS, HEAD_DIM).transpose(1, 0, 2).astype(np.float64)
        rotated = np.concatenate([-k[..., half:], k[..., :half]], axis=-1)
        expected = k * cos + rotated * sin
        got = kv["keys"][li]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        # Meaningful: away from position 0 the rotation really changes the keys.
        assert np.abs(got[:, 1:] - k[:, 1:]).max() > 0.1 * np.abs(k).max()
        np.testing.assert_allclose(got[:, 0], k[:, 0], rtol=1e-5, atol=1e-5)  # position 0: identity

        # Causal GQA attention from the returned post-RoPE queries reproduces the model's output.
        q = torch.from_numpy(kv["queries"][li])[None]
        kk = torch.from_numpy(kv["keys"][li]).repeat_interleave(N_Q_HEADS // N_KV_HEADS, 0)[None]
        vv = torch.from_numpy(kv["values"][li]).repeat_interleave(N_Q_HEADS // N_KV_HEADS, 0)[None]
        out = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True)
        out = out[0].transpose(0, 1).reshape(n, N_Q_HEADS * HEAD_DIM).numpy()
        np.testing.assert_allclose(out, attn_out[li], rtol=1e-3, atol=1e-4)


def test_same_token_at_different_positions(smollm2):
    """Layer 0 sees only token embeddings: a repeated token has identical values everywhere, while
    its cached keys differ by position (RoPE) with the norm of every rotated pair preserved."""
    from ctxcore.models import extract_kv

    model, tokenizer = smollm2
    kv = extract_kv(model, tokenizer, " the" * 48, max_tokens=48)
    ids = kv["input_ids"]
    token = np.bincount(ids).argmax()
    pos = np.flatnonzero(ids == token)
    assert len(pos) >= 16
    k0, v0 = kv["keys"][0][:, pos], kv["values"][0][:, pos]  # [3, P, 64]
    np.testing.assert_allclose(v0, np.broadcast_to(v0[:, :1], v0.shape), rtol=1e-5, atol=1e-5)
    moved = np.abs(k0[:, 1:] - k0[:, :1]).max(axis=(0, 2))  # per later position
    assert moved.min() > 1e-2
    half = HEAD_DIM // 2
    pair_norms = k0[..., :half] ** 2 + k0[..., half:] ** 2
    np.testing.assert_allclose(
        pair_norms, np.broadcast_to(pair_norms[:, :1], pair_norms.shape), rtol=1e-3, atol=1e-4
    )


def _cli() -> list[str]:
    exe = shutil.which("ctxcore")
    return [exe] if exe else [sys.executable, "-m", "ctxcore"]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_cli_kv_report_runs(smollm2):
    del smollm2  # only to skip cleanly when the model is not installed
    proc = subprocess.run(
        [sys.executable, "-m", "ctxcore", "kv-report", "--tokens", "256", "--layers", "0"],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compression ratio" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_cli_missing_text_file_is_a_usage_error():
    proc = subprocess.run(
        [*_cli(), "kv-report", "--text", "/nonexistent"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert proc.returncode == 2
    assert "/nonexistent" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_bad_bits_is_a_usage_error():
    proc = subprocess.run(
        [*_cli(), "kv-report", "--bits", "3"], capture_output=True, text=True, timeout=120, env=_env()
    )
    assert proc.returncode == 2
    assert "--bits" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_version():
    proc = subprocess.run([*_cli(), "--version"], capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"ctxcore {ctxcore.__version__}"
