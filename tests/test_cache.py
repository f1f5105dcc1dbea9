"""CompressedCache + the ctxcore attention on small random Llama / Qwen2 / Mistral models."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import ctxcore  # noqa: E402
from ctxcore.attention import disable, enable  # noqa: E402
from ctxcore.cache import CompressedCache, CompressedLayer, _exact_with_lse, _merge, _split_mask  # noqa: E402
from ctxcore.exceptions import (  # noqa: E402
    ConfigError,
    ContextMismatchError,
    RamBudgetError,
    ShapeError,
    SlowPathWarning,
    UnsupportedModelError,
)

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)  # fmt: skip


def _model(kind: str = "llama", **over):
    torch.manual_seed(0)
    kw = {**SMALL, **over}
    if kind == "llama":
        cfg = transformers.LlamaConfig(**kw)
        cls = transformers.LlamaForCausalLM
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**kw)
        cls = transformers.Qwen2ForCausalLM
    elif kind == "mistral":
        cfg = transformers.MistralConfig(sliding_window=None, **kw)
        cls = transformers.MistralForCausalLM
    else:  # pragma: no cover
        raise ValueError(kind)
    m = cls(cfg).eval()
    # Sharper attention than random init gives, so compression errors would show.
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
    return m


def _ids(n: int, b: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


def _cache(model, **kw) -> CompressedCache:
    kw = {"bits": 4, "window": 16, "sinks": 2, "page_size": 8, **kw}
    return CompressedCache(model.config, **kw)


def _teacher_forced(model, cache, ids: torch.Tensor, prefix: int, mask=None) -> torch.Tensor:
    """Logits of positions prefix-1 .. end-1: one prefill of ``prefix`` tokens, then one decode
    step per token (so decode attention over the cache is what is measured)."""
    outs = []
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": mask[:, :prefix]}
        out = model(ids[:, :prefix], past_key_values=cache, use_cache=True, **kw)
        outs.append(out.logits[:, -1])
        for t in range(prefix, ids.shape[1]):
            kw = {} if mask is None else {"attention_mask": mask[:, : t + 1]}
            if mask is not None:
                kw["position_ids"] = (mask[:, : t + 1].long().cumsum(-1) - 1)[:, -1:]
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True, **kw)
            outs.append(out.logits[:, -1])
    return torch.stack(outs, 1)


def _calibrated(model, ids, **kw) -> CompressedCache:
    cache = _cache(model, **kw)
    cache.calibrate(model, ids[:1])
    return cache


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_enabled_kernels_equal_dequantized_reference(kind):
    """Attention over the pages (ctxcore kernels) == SDPA over the dequantized cache, same codebooks."""
    model = _model(kind)
    ids = _ids(160)
    ref = _teacher_forced(model, _calibrated(model, ids), ids, 100)  # sdpa over dequantized K/V
    enable(model)
    try:
        got = _teacher_forced(model, _calibrated(model, ids), ids, 100)
    finally:
        disable(model)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_8bit_cache_tracks_the_full_cache_and_4bit_is_close():
    model = enable(_model())
    ids = _ids(200)
    full = _teacher_forced(model, transformers.DynamicCache(config=model.config), ids, 120)
    for bits, tol in ((8, 0.02), (4, 0.15)):
        got = _teacher_forced(model, _cache(model, bits=bits), ids, 120)
        err = ((got - full).norm() / full.norm()).item()
        assert err < tol, (bits, err)
        # Same next-token distribution almost everywhere.
        agree = (got.argmax(-1) == full.argmax(-1)).float().mean().item()
        assert agree > (0.95 if bits == 8 else 0.8), (bits, agree)


def test_prefill_is_exact():
    model = enable(_model())
    ids = _ids(120)
    with torch.no_grad():
        full = model(ids, past_key_values=transformers.DynamicCache(config=model.config)).logits
        got = model(ids, past_key_values=_cache(model)).logits
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)


def test_generate_lengths_and_mask_sizes():
    model = enable(_model())
    cache = _cache(model)
    ids = _ids(50)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=7, do_sample=False)
    assert out.shape == (1, 57)
    assert cache.get_seq_length() == 56
    assert cache.get_mask_sizes(1, 0) == (57, 0)
    assert all(lay.get_seq_length() == 56 for lay in cache.layers)
    assert cache.store.paged_tokens(0) == 56 - 16 - 2


def test_lse_merge_equals_attention_over_the_union():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 5, 16, generator=g)
    k, v = torch.randn(2, 2, 40, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g)
    valid = torch.ones(2, 5, 40, dtype=torch.bool).tril_(35)
    valid[1, :, :7] = False  # left padding
    o1, l1 = _exact_with_lse(q, k[:, :, :30], v[:, :, :30], valid[..., :30], 0.25)
    o2, l2 = _exact_with_lse(q, k[:, :, 30:], v[:, :, 30:], valid[..., 30:], 0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=valid[:, None], scale=0.25
    )
    torch.testing.assert_close(_merge(o1, l1, o2, l2), ref, rtol=1e-5, atol=1e-5)
    # A part nobody sees contributes nothing.
    none = torch.zeros(2, 5, 10, dtype=torch.bool)
    o3, l3 = _exact_with_lse(q, k[:, :, :10], v[:, :, :10], none, 0.25)
    assert torch.isinf(l3).all() and (o3 == 0).all()
    torch.testing.assert_close(_merge(ref, torch.zeros_like(l3), o3, l3), ref)


def test_update_returns_the_length_get_mask_sizes_reports():
    model = enable(_model())
    cache = _cache(model)
    k = torch.randn(1, 2, 5, 16)
    kk, vv = cache.update(k, k, 0)
    assert kk.shape == vv.shape == (1, 2, 5, 16) and kk.stride()[2] == 0  # placeholder, no memory
    assert cache.get_mask_sizes(3, 0) == (8, 0)
    kk, _ = cache.update(k * 2, k, 0)  # the first K/V were never attended: committed now
    assert kk.shape[2] == 10 == cache.get_seq_length(0)
    disable(model)
    kk, _ = cache.update(k, k, 1)  # any other attention: the real (here exact) history
    assert kk.shape[2] == 5 and torch.equal(kk, k)


def test_chunk_merge_path_tracks_the_full_cache():
    """A chunk attended as history (pages, before it is committed) + itself exactly, merged by
    log-sum-exp, is as close to the full cache as committing first and attending causally."""
    model = enable(_model())
    ids = _ids(160)
    a, b = _calibrated(model, ids, bits=8), _calibrated(model, ids, bits=8)
    dyn = transformers.DynamicCache(config=model.config)
    _teacher_forced(model, a, ids[:, :120], 100)
    _teacher_forced(model, b, ids[:, :120], 100)
    _teacher_forced(model, dyn, ids[:, :120], 100)
    b.window = 0  # only the cache's path choice; the store keeps its 16-token window
    with torch.no_grad():
        la = model(ids[:, 120:132], past_key_values=a).logits
        lb = model(ids[:, 120:132], past_key_values=b).logits
        full = model(ids[:, 120:132], past_key_values=dyn).logits
    ea, eb = (la - full).norm().item(), (lb - full).norm().item()
    assert eb <= ea * 1.5, (ea, eb)
    assert eb / full.norm().item() < 1e-3


def test_long_second_turn_attends_the_compressed_history():
    model = enable(_model())
    ids = _ids(300)
    dyn = transformers.DynamicCache(config=model.config)
    cache = _cache(model, bits=8)
    with torch.no_grad():
        model(ids[:, :150], past_key_values=dyn)
        model(ids[:, :150], past_key_values=cache)
        full = model(ids[:, 150:], past_key_values=dyn).logits
        got = model(ids[:, 150:], past_key_values=cache).logits
    assert ((got - full).norm() / full.norm()).item() < 0.02
    assert cache.get_seq_length() == 300


def test_generate_continues_from_a_previous_turn():
    model = enable(_model())
    cache = _cache(model)
    ids = _ids(80)
    out1 = model.generate(ids, past_key_values=cache, max_new_tokens=5, do_sample=False)
    follow = torch.cat([out1, _ids(30, seed=1)], dim=1)
    out2 = model.generate(follow, past_key_values=cache, max_new_tokens=5, do_sample=False)
    assert out2.shape[1] == follow.shape[1] + 5
    assert cache.get_seq_length() == out2.shape[1] - 1


def test_left_padded_batch_matches_dequantized_reference():
    """Padding is masked on the paged path exactly as SDPA masks it on dequantized K/V."""
    model = _model()
    a, b = _ids(140, seed=2), _ids(100, seed=3)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 40, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    calib = _ids(200, seed=4)
    ref = _teacher_forced(model, _calibrated(model, calib), ids, 110, mask)
    enable(model)
    try:
        got = _teacher_forced(model, _calibrated(model, calib), ids, 110, mask)
    finally:
        disable(model)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_padded_batch_generate_matches_single_runs_at_8_bits():
    model = enable(_model())
    a, b = _ids(120, seed=5), _ids(90, seed=6)
    pad = torch.zeros(1, 30, dtype=torch.long)
    ids = torch.cat([a, torch.cat([pad, b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :30] = 0
    out = model.generate(ids, attention_mask=mask, past_key_values=_cache(model, bits=8), max_new_tokens=6,
                         do_sample=False, pad_token_id=0)  # fmt: skip
    for row, single in ((0, a), (1, b)):
        alone = model.generate(single, past_key_values=transformers.DynamicCache(config=model.config),
                               max_new_tokens=6, do_sample=False)  # fmt: skip
        assert out[row, -6:].tolist() == alone[0, -6:].tolist()


def test_beam_search_reorders_sequences():
    model = _model()
    ids = _ids(90)
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, num_return_sequences=2)
    ref = model.generate(ids, past_key_values=_calibrated(model, ids), **kw)
    enable(model)
    try:
        cache = _calibrated(model, ids)
        got = model.generate(ids, past_key_values=cache, **kw)
    finally:
        disable(model)
    assert got.tolist() == ref.tolist()
    assert cache.batch_size == 3


def test_assisted_decoding_crops_the_cache():
    model = enable(_model())
    ids = torch.cat([_ids(40, seed=7)] * 3, dim=1)  # repetitive: prompt lookup proposes tokens
    plain = model.generate(ids, past_key_values=_cache(model, bits=8), max_new_tokens=12, do_sample=False)
    cache = _cache(model, bits=8)
    got = model.generate(
        ids, past_key_values=cache, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=4
    )
    assert got.shape == plain.shape
    assert cache.get_seq_length() == got.shape[1] - 1
    assert (got[0, -12:] == plain[0, -12:]).float().mean() > 0.8


def test_crop_limits():
    model = enable(_model())
    cache = _cache(model)
    with torch.no_grad():
        model(_ids(60), past_key_values=cache)
        cache.crop(-30)  # still warming up (held exactly): any length
        assert cache.get_seq_length() == 30
        model(_ids(30, seed=1), past_key_values=cache)
        model(_ids(1, seed=2), past_key_values=cache)  # a decode step ends the warm-up
    assert cache.store.has_codebooks(0)
    cache.crop(-5)
    assert cache.get_seq_length() == 56
    with pytest.raises(ConfigError, match="window"):
        cache.crop(-40)
    with pytest.raises(ConfigError):
        cache.crop(3)
    assert cache.get_seq_length() == 56


def test_online_calibration_waits_for_a_large_sample():
    model = enable(_model())
    cache = _cache(model, calibration_tokens=100, prefill_block=40)
    ids = _ids(150)
    with torch.no_grad():
        full = model(ids[:, :80], past_key_values=transformers.DynamicCache(config=model.config)).logits
        got = torch.cat([model(ids[:, i : i + 40], past_key_values=cache).logits for i in (0, 40)], 1)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)  # held exactly so far
    assert not cache.store.has_codebooks(0) and cache.memory_stats()["ram_bytes"] > 0
    cache.prefill(model, ids[:, 80:])  # crosses calibration_tokens: trained on 120 tokens
    assert cache.store.has_codebooks(0) and cache.store.num_tokens(0) == 150
    assert cache.layers[0].warm_tokens == 0


def test_save_load_roundtrip(tmp_path):
    model = enable(_model())
    ids = _ids(100)
    cache = _cache(model)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    cache.save(tmp_path / "ctx", token_ids=ids[0], metadata={"note": "x"})
    loaded = CompressedCache.load(tmp_path / "ctx", model.config)
    assert loaded.get_seq_length() == 100 and loaded.token_ids == ids[0].tolist()
    assert loaded.metadata == {"note": "x"}
    nxt = _ids(10, seed=9)
    with torch.no_grad():
        a = model(nxt, past_key_values=cache).logits
        b = model(nxt, past_key_values=loaded).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    other = _model(num_key_value_heads=4)
    with pytest.raises(ContextMismatchError):
        CompressedCache.load(tmp_path / "ctx", other.config)


def test_page_abstracts_only_with_select(tmp_path):
    # Abstracts (what Quest selection scores pages by) cost RAM per page: a cache that never
    # selects keeps none, one with select= does; a context saved without them cannot be loaded
    # into a selecting cache (a typed error, not a wrong selection).
    model = enable(_model())
    ids = _ids(100)
    plain, sel = _cache(model), _cache(model, select=1.0)
    assert plain.store.config["abstracts"] is False and plain.store.config["abstract_bytes"] == 0
    assert sel.store.config["abstracts"] is True and sel.store.config["abstract_bytes"] > 0
    with torch.no_grad():
        for c in (plain, sel):
            model(ids, past_key_values=c)
        # the first decode step compresses the prefill
        a = model(_ids(1, seed=3), past_key_values=plain).logits
        b = model(_ids(1, seed=3), past_key_values=sel).logits
    torch.testing.assert_close(a, b)  # select=1.0 attends every page: the same codes
    pages = plain.store.paged_tokens(0) // 8
    assert pages > 0
    per_page = sel.store.config["abstract_bytes"] * len(plain.compressed_layers)
    saved = sel.memory_stats()["compressed_bytes"] - plain.memory_stats()["compressed_bytes"]
    assert saved == pages * per_page
    with pytest.raises(ConfigError, match="abstracts"):
        plain.store.abstracts(0)
    # abstracts=True keeps them without select=, so selection can be switched on later; on a
    # cache without them, switching it on is a typed error at the next step.
    late = _cache(model, abstracts=True)
    assert late.store.config["abstracts"] is True
    plain.save(tmp_path / "ctx", token_ids=ids[0])
    twin = copy.deepcopy(plain)
    twin.select = 0.5
    with torch.no_grad(), pytest.raises(ConfigError, match="abstracts"):
        model(_ids(1, seed=5), past_key_values=twin)
    with pytest.raises(ConfigError, match="without page abstracts"):
        CompressedCache.load(tmp_path / "ctx", model.config, select=0.5)
    loaded = CompressedCache.load(tmp_path / "ctx", model.config)
    assert loaded.store.config["abstracts"] is False
    nxt = _ids(3, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(
            model(nxt, past_key_values=loaded).logits, model(nxt, past_key_values=plain).logits
        )


def test_ram_budget_offloads_without_changing_results(tmp_path):
    model = enable(_model())
    ids = _ids(300)
    ref_cache = _calibrated(model, ids)
    ref = model.generate(ids, past_key_values=ref_cache, max_new_tokens=8, do_sample=False)
    st = ref_cache.store.stats()
    budget = st["ram_bytes"] - st["ram_page_bytes"] + st["ram_page_bytes"] // 3
    cache = _cache(model, ram_budget=budget, offload_dir=tmp_path / "off")
    cache.calibrate(model, ids)
    got = model.generate(ids, past_key_values=cache, max_new_tokens=8, do_sample=False)
    assert got.tolist() == ref.tolist()
    s = cache.memory_stats()
    assert s["ram_bytes"] <= budget and s["disk_bytes"] > 0
    assert s["compressed_bytes"] == ref_cache.memory_stats()["compressed_bytes"]


def test_budget_below_minimum_states_it():
    model = _model()
    with pytest.raises(RamBudgetError, match=r"\d+"):
        _cache(model, ram_budget=100)


def test_memory_stats_counts_everything():
    model = enable(_model())
    cache = _cache(model, window=16, sinks=2, page_size=8)
    with torch.no_grad():
        model(_ids(399), past_key_values=cache)
        held = cache.memory_stats()
        # held: layers x heads x (keys, 8-bit over 2 dims: head_dim x 256 float16 centroids;
        # values, 4-bit over 1 dim: head_dim x 16 float16 centroids, head_dim x 15 float32
        # midpoints, head_dim x 16 rank bytes); no page abstracts without select=
        codebooks = 2 * 2 * ((16 * 256 + 16 * 16) * 2 + 16 * 15 * 4 + 16 * 16)
        assert held["ram_bytes"] == held["compressed_bytes"] == codebooks + 2 * 2 * 2 * 399 * 16 * 4
        model(_ids(1), past_key_values=cache)
    s = cache.memory_stats()
    assert s["tokens"] == 400 and s["batch"] == 1
    assert s["dense_bytes"] == 2 * 2 * 2 * 400 * 16 * 4  # layers x K/V x heads x tokens x dim x f32
    assert codebooks < s["compressed_bytes"] < s["dense_fp16_bytes"] + codebooks
    assert s["ram_bytes"] == s["compressed_bytes"] and s["disk_bytes"] == 0


def test_float16_window_halves_the_window_bytes_and_keeps_the_logits():
    model = enable(_model())
    ids = _ids(120)
    c16, c32 = _cache(model), _cache(model, window_dtype="float32")
    assert c16.store.config["window_dtype"] == "float16"  # the default
    assert c32.store.config["window_dtype"] == "float32"
    l16 = _teacher_forced(model, c16, ids, 100)
    l32 = _teacher_forced(model, c32, ids, 100)
    # float16 rounding of 16 window tokens moves the logits far less than the codes do
    assert ((l16 - l32).norm() / l32.norm()).item() < 1e-2
    s16, s32 = c16.memory_stats(), c32.memory_stats()
    assert s16["tokens"] == s32["tokens"] == 120
    # layers x heads x window tokens x head_dim x (K, V) x 2 bytes saved
    assert s32["compressed_bytes"] - s16["compressed_bytes"] == 2 * 2 * 16 * 16 * 2 * 2
    with pytest.raises(ConfigError, match="window_dtype"):
        _cache(model, window_dtype="bfloat16")


def test_selective_attention_with_full_budget_is_exact_over_fp16():
    model = enable(_model())
    ids = _ids(200)
    full = _teacher_forced(model, transformers.DynamicCache(config=model.config), ids, 150)
    got = _teacher_forced(model, _cache(model, select=1.0, keep_full_precision=True), ids, 150)
    torch.testing.assert_close(got, full, rtol=5e-3, atol=5e-3)  # fp16 page copies
    part = _teacher_forced(model, _cache(model, select=32, keep_full_precision=True), ids, 150)
    assert ((part - full).norm() / full.norm()).item() < 0.5


def test_selective_attention_over_codes_with_full_budget_equals_dense_codes():
    # Without fp16 copies (the default), select= attends the selected pages' codes: with every
    # page selected, the same logits as dense decoding over the codes; pages hold no fp16.
    model = enable(_model())
    ids = _ids(200)
    dense = _teacher_forced(model, _cache(model), ids, 150)
    every = _teacher_forced(model, _cache(model, select=1.0), ids, 150)
    torch.testing.assert_close(every, dense, rtol=1e-4, atol=1e-4)
    part_cache = _cache(model, select=32)
    part = _teacher_forced(model, part_cache, ids, 150)
    assert ((part - dense).norm() / dense.norm()).item() < 0.5
    assert not part_cache.store.config["keep_full_precision"]
    assert part_cache.store.config["page_bytes"] == _cache(model).store.config["page_bytes"]
    # The exact fallback at share 0: every head whose selection leaves pages out attends them
    # all, so the logits are dense decoding's again, and the store counts those heads.
    fb_cache = _cache(model, select=32, select_fallback=0.0)
    fb = _teacher_forced(model, fb_cache, ids, 150)
    torch.testing.assert_close(fb, dense, rtol=1e-4, atol=1e-4)
    assert fb_cache.store.stats()["fallbacks"] > 0
    assert copy.deepcopy(fb_cache).select_fallback == 0.0
    with pytest.raises(ConfigError, match="select_fallback"):
        _cache(model, select=32, select_fallback=1.0)
    with pytest.raises(ConfigError, match="keep_full_precision"):
        _cache(model, select=32, select_fallback=0.5, keep_full_precision=True)


def test_cache_without_enable_works_with_sdpa_and_eager():
    model = _model()
    ids = _ids(120)
    for impl in ("sdpa", "eager"):
        model.set_attn_implementation(impl)
        cache = _cache(model, bits=8)
        with pytest.warns(SlowPathWarning):
            out = model.generate(ids, past_key_values=cache, max_new_tokens=5, do_sample=False)
        full = model.generate(ids, max_new_tokens=5, do_sample=False)
        assert out[0, 120:].tolist() == full[0, 120:].tolist(), impl  # the generated tokens only


def test_enabled_decode_never_decodes_the_pages(monkeypatch):
    """Decode steps over a paged context read the codes in the kernels: the dequantize paths
    must not run (they would be a silent dense fallback)."""
    import ctxcore.ops

    model = enable(_model())
    ids = _ids(150)
    cache = _cache(model, bits=4)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    cache.compress()
    assert cache.store.paged_tokens(0) > 0

    def forbidden(*a, **k):
        raise AssertionError("a decode step decoded the pages")

    monkeypatch.setattr(CompressedLayer, "dequantized", forbidden)
    monkeypatch.setattr(ctxcore.ops, "decode_codes", forbidden)
    out = model.generate(torch.cat([ids, ids[:, :1]], 1), past_key_values=cache, max_new_tokens=8,
                         do_sample=False)  # fmt: skip
    assert out.shape[1] == 151 + 8


def test_enabled_model_still_works_with_dynamic_cache():
    model = _model()
    ids = _ids(40)
    ref = model.generate(ids, max_new_tokens=5, do_sample=False)
    enable(model)
    assert model.generate(ids, max_new_tokens=5, do_sample=False).tolist() == ref.tolist()


def test_prefill_blocks_and_calibration_online():
    model = enable(_model())
    ids = _ids(300)
    cache = _cache(model, prefill_block=64, calibration_tokens=128)
    logits = cache.prefill(model, ids)
    assert cache.get_seq_length() == 300 and logits.shape == (1, VOCAB)
    with torch.no_grad():
        full = model(ids, past_key_values=transformers.DynamicCache(config=model.config)).logits[:, -1]
    assert ((logits - full).norm() / full.norm()).item() < 0.15
    assert all(cache.store.has_codebooks(i) for i in range(2))


def test_unsupported_architectures_are_named():
    with pytest.raises(UnsupportedModelError, match="t5.*encoder-decoder"):
        CompressedCache(transformers.T5Config())
    gemma = transformers.Gemma2Config(**{**SMALL, "head_dim": 16})  # soft-capped attention logits
    with pytest.raises(UnsupportedModelError, match="gemma2.*soft-caps"):
        enable(transformers.Gemma2ForCausalLM(gemma))


def test_bad_inputs():
    model = _model()
    cache = _cache(model)
    with pytest.raises(ShapeError):
        cache.update(torch.zeros(1, 3, 4, 16), torch.zeros(1, 3, 4, 16), 0)
    with pytest.raises(ConfigError):
        _cache(model, select=1.5)
    with pytest.raises(ConfigError):
        _cache(model, bits=3)


def test_split_mask_shapes():
    causal = torch.ones(3, 8, dtype=torch.bool).tril(5)[None, None].repeat(2, 1, 1, 1)
    causal[1, :, :, :2] = False
    starts, new, plain = _split_mask(causal, 2, 3, 5)
    assert starts == [0, 2] and plain
    holes = causal.clone()
    holes[0, :, :, 3] = False
    assert _split_mask(holes, 2, 3, 5)[0] is None


def test_public_names():
    assert ctxcore.CompressedCache is CompressedCache
    assert ctxcore.enable is enable


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("enabled", [False, True], ids=["sdpa-over-dequantized", "ctxcore-attention"])
def test_model_on_gpu_gives_the_cpu_results(enabled):
    """The pages stay on the host; a model on a GPU gets the same logits as on the CPU (padded
    batch, prefill blocks, decode steps, beam reorder)."""
    ids = _ids(150, b=2)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    outs = []
    for dev in ("cpu", "cuda"):
        model = _model().to(dev)
        if enabled:
            enable(model)
        cache = _calibrated(model, ids)
        try:
            got = _teacher_forced(model, cache, ids.to(dev), 90, mask=mask.to(dev))
            cache.reorder_cache(torch.tensor([1, 0], device=dev))
        finally:
            disable(model)
        outs.append(got.float().cpu())
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-3, atol=2e-3)
