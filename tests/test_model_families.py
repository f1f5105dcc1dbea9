"""CompressedCache on small random configs of each supported model family, sliding-window and
hybrid ones included: full-attention layers are compressed, sliding-window / chunked layers stay
transformers' own exact layers. Greedy decoding at 8 bits equals DynamicCache's past a prompt
longer than the window; 4 bits stays within a stated tolerance; batching with left padding, beam
search, crop, multi-turn, deepcopy and save/load work across the mixture; what is not supported
is rejected with the reason."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import ctxcore  # noqa: E402
from ctxcore import CompressedCache  # noqa: E402
from ctxcore.cache import cache_kwargs, layer_windows  # noqa: E402
from ctxcore.exceptions import ConfigError, UnsupportedModelError  # noqa: E402

VOCAB = 96
WINDOW = 24  # the models' sliding window: shorter than the prompts
BASE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
S, F = "sliding_attention", "full_attention"
#: family -> (config class, extra config fields, compressed layers)
FAMILIES = {
    "llama": ("LlamaConfig", {}, 4),
    "qwen2": ("Qwen2Config", {}, 4),
    "qwen2-window": (
        "Qwen2Config",
        dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
        2,
    ),
    "qwen3": ("Qwen3Config", dict(head_dim=16), 4),
    "mistral": ("MistralConfig", dict(sliding_window=None), 4),
    "mistral-window": ("MistralConfig", dict(sliding_window=WINDOW), 0),
    "gemma2": (
        "Gemma2Config",
        dict(head_dim=16, sliding_window=WINDOW, layer_types=[S, F, S, F], attn_logit_softcapping=None),
        2,
    ),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=WINDOW, layer_types=[S, S, F, S]), 1),
    "phi3": ("Phi3Config", {}, 4),
    "phi3-window": ("Phi3Config", dict(sliding_window=WINDOW), 0),
    "cohere2": ("Cohere2Config", dict(sliding_window=WINDOW, layer_types=[S, S, S, F]), 1),
    "olmo2": ("Olmo2Config", {}, 4),
}


def build(family: str):
    cls_name, extra, _ = FAMILIES[family]
    torch.manual_seed(0)
    cfg = getattr(transformers, cls_name)(**{**BASE, **extra})
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # sharper attention than random init gives, so errors would show
        for layer in model.model.layers:
            attn = layer.self_attn
            if hasattr(attn, "q_proj"):
                attn.q_proj.weight.mul_(3.0)
            else:  # Phi-3: one fused projection, queries first
                attn.qkv_proj.weight[: BASE["hidden_size"]].mul_(3.0)
    return ctxcore.enable(model)


def ids(n: int, b: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


def cache_for(model, **kw) -> CompressedCache:
    return CompressedCache(model.config, **{"bits": 8, "window": 16, "sinks": 2, "page_size": 8, **kw})


def generate(model, prompt, cache, n=32, **kw):
    out = model.generate(
        prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, **cache_kwargs(model, cache), **kw
    )
    return out[:, prompt.shape[1] :]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param, build(request.param)


def test_layers_split_into_compressed_and_exact(family):
    name, model = family
    cache = cache_for(model)
    assert cache.num_layers == FAMILIES[name][2] == layer_windows(model.config).count(None)
    assert len(cache.layers) == BASE["num_hidden_layers"]
    kinds = ["compressed" if w is None else "exact" for w in layer_windows(model.config)]
    assert [type(lay).__name__ == "CompressedLayer" for lay in cache.layers] == [
        k == "compressed" for k in kinds
    ]


def test_greedy_at_8_bits_equals_dynamic_cache_past_the_window(family):
    name, model = family
    prompt = ids(80, seed=1)  # longer than the sliding window and than the cache's own window
    ref = generate(model, prompt, transformers.DynamicCache(config=model.config))
    cache = cache_for(model)
    got = generate(model, prompt, cache)
    assert got.tolist() == ref.tolist(), name
    if cache.num_layers:
        assert cache.store.paged_tokens(0) > 0  # the full-attention layers really are paged


def test_4_bit_logits_stay_close(family):
    name, model = family
    x = ids(120, seed=2)
    with torch.no_grad():
        full = model(x, **cache_kwargs(model, transformers.DynamicCache(config=model.config))).logits[:, 80:]
        cache = cache_for(model, bits=4)
        model(x[:, :80], **cache_kwargs(model, cache))
        cache.compress()
        got = torch.cat(
            [model(x[:, t : t + 1], **cache_kwargs(model, cache)).logits for t in range(80, 120)], 1
        )
    # Positions 80..119, decoded one step at a time over the pages, against one full forward.
    rel = ((got - full).norm() / full.norm()).item()
    assert rel < 0.1, (name, rel)


@pytest.mark.parametrize("name", ["gemma3", "cohere2"])
def test_hybrid_batching_beams_crop_turns_copies_and_saves(name, tmp_path):
    model = build(name)
    dyn = lambda: transformers.DynamicCache(config=model.config)  # noqa: E731
    # Batching with left padding: each row answers as it does alone.
    a, b = ids(70, seed=3), ids(50, seed=4)
    pad = torch.zeros(1, 20, dtype=torch.long)
    batch = torch.cat([a, torch.cat([pad, b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :20] = 0
    got = generate(model, batch, cache_for(model), n=12, attention_mask=mask)
    assert got[0].tolist() == generate(model, a, cache_for(model), n=12)[0].tolist()
    assert got[1].tolist() == generate(model, b, cache_for(model), n=12)[0].tolist()
    # Beam search reorders compressed and exact layers alike.
    p = ids(60, seed=5)
    beams = generate(model, p, cache_for(model), n=10, num_beams=3)
    assert beams.tolist() == generate(model, p, dyn(), n=10, num_beams=3).tolist()
    # Multi-turn: a second turn continues the same cache.
    cache, ref = cache_for(model), dyn()
    first = generate(model, p, cache, n=8)
    assert first.tolist() == generate(model, p, ref, n=8).tolist()
    turn2 = torch.cat([p, first, ids(30, seed=6)], 1)
    assert generate(model, turn2, cache, n=8).tolist() == generate(model, turn2, ref, n=8).tolist()
    # deepcopy: two continuations of one prompt cache, each as from a fresh prefill.
    base = cache_for(model)
    with torch.no_grad():
        model(p, **cache_kwargs(model, base))
    q1, q2 = torch.cat([p, ids(9, seed=7)], 1), torch.cat([p, ids(11, seed=8)], 1)
    c1, c2 = copy.deepcopy(base), copy.deepcopy(base)
    assert generate(model, q1, c1, n=6).tolist() == generate(model, q1, cache_for(model), n=6).tolist()
    assert generate(model, q2, c2, n=6).tolist() == generate(model, q2, cache_for(model), n=6).tolist()
    assert base.get_seq_length() == 60
    # memory_stats counts both kinds of layer.
    s = c1.memory_stats()
    exact = sum(
        lay.keys.nbytes + lay.values.nbytes for lay in c1.layers if type(lay).__name__ != "CompressedLayer"
    )
    assert s["exact_layer_bytes"] == exact > 0 and s["compressed_bytes"] > exact
    # crop: the last tokens leave every layer (the sliding ones recording their past, where
    # transformers can; without it, crop past a window is a typed error).
    cache = cache_for(model)
    recording = hasattr(cache, "activate_past_recording")
    if recording:
        cache.activate_past_recording()
    with torch.no_grad():
        model(ids(40, seed=9), **cache_kwargs(model, cache))
        model(ids(5, seed=10), **cache_kwargs(model, cache))
    if recording:
        cache.crop(-5)
        assert all(lay.get_seq_length() == 40 for lay in cache.layers)
    else:
        with pytest.raises(ConfigError, match="sliding-window layer"):
            cache.crop(-5)
    # save / load keeps both: the loaded context answers as the one that was saved.
    cache = cache_for(model)
    with torch.no_grad():
        model(p, **cache_kwargs(model, cache))
    cache.save(tmp_path / "ctx", token_ids=p)
    q = torch.cat([p, ids(7, seed=11)], 1)
    want = generate(model, q, copy.deepcopy(cache), n=6).tolist()
    loaded = CompressedCache.load(tmp_path / "ctx", model.config, token_ids=q)
    assert loaded.get_seq_length() == 60 and generate(model, q, loaded, n=6).tolist() == want
    # A prompt that shares only part of the save cannot use it (a window cannot be cut back).
    other = torch.cat([p[:, :40], ids(30, seed=12)], 1)
    assert CompressedCache.load(tmp_path / "ctx", model.config, token_ids=other).get_seq_length() == 0
    with pytest.raises(ConfigError, match="sliding-window layers"):
        cache.save("redis://127.0.0.1:1/0", token_ids=p)


def test_crop_past_a_sliding_window_without_recording_is_a_typed_error():
    model = build("gemma3")
    cache = cache_for(model)
    with torch.no_grad():
        model(ids(40), **cache_kwargs(model, cache))
    with pytest.raises(ConfigError, match="activate_past_recording"):
        cache.crop(-3)
    assert cache.get_seq_length() == 40  # nothing was removed


def test_unsupported_models_name_what_is_missing():
    small = dict(BASE)
    cases = [
        (transformers.T5Config(), "encoder-decoder"),
        (transformers.Gemma2Config(**small, head_dim=16), "soft-caps.*attn_logit_softcapping = None"),
        (transformers.GptOssConfig(**{**small, "num_local_experts": 2}), "learned attention sinks"),
        (transformers.DeepseekV3Config(**small), "multi-head latent attention"),
        (transformers.JambaConfig(**small), "state-space"),
        (transformers.BambaConfig(**small), "state-space"),
    ]
    for cfg, why in cases:
        with pytest.raises(UnsupportedModelError, match=why):
            CompressedCache(cfg)
