"""The transformers idioms a user reaches for first: the attention registered by ``import
ctxcore``, both spellings of the cache keyword, and a warning (not silence) on the slow path."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import ctxcore  # noqa: E402
from ctxcore.cache import cache_kwargs  # noqa: E402
from ctxcore.exceptions import SlowPathWarning  # noqa: E402

_CFG = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
_CACHE = dict(bits=8, window=16, sinks=2, page_size=8)
HAS_CACHE_KW = "cache" in __import__("inspect").signature(transformers.LlamaForCausalLM.forward).parameters


def _model(attn: str | None = None):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**_CFG)
    if attn is not None:
        cfg._attn_implementation = attn
    return transformers.LlamaForCausalLM(cfg).eval()


def _ids(n: int = 60):
    return torch.randint(0, 64, (1, n), generator=torch.Generator().manual_seed(0))


def test_import_registers_the_attention_implementation():
    code = (
        "import ctxcore, torch, transformers\n"
        f"cfg = transformers.LlamaConfig(**{_CFG!r})\n"
        "m = transformers.LlamaForCausalLM(cfg).eval()\n"
        "m.set_attn_implementation('ctxcore')\n"
        "assert m.config._attn_implementation == 'ctxcore'\n"
        "m2 = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation='ctxcore')\n"
        "assert m2.config._attn_implementation == 'ctxcore'\n"
        "c = ctxcore.CompressedCache(m.config, bits=8, window=16, sinks=2, page_size=8)\n"
        "ids = torch.randint(0, 64, (1, 60), generator=torch.Generator().manual_seed(0))\n"
        # min_new_tokens: a random model may pick the config's EOS first and end before any decode
        # step (which is what pages the calibration hold).
        "out = m.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,\n"
        "                 **ctxcore.cache.cache_kwargs(m, c))\n"
        "assert c.store.paged_tokens(0) > 0, 'pages were not used'\n"
        "print('ok')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


def test_set_attn_implementation_without_enable_attends_the_pages():
    model = _model()
    model.set_attn_implementation("ctxcore")
    ids = _ids()
    dyn = transformers.DynamicCache()
    ref = model.generate(ids, max_new_tokens=8, do_sample=False, **cache_kwargs(model, dyn))
    cache = ctxcore.CompressedCache(model.config, **_CACHE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowPathWarning)  # the fast path must not warn
        out = model.generate(ids, max_new_tokens=8, do_sample=False, **cache_kwargs(model, cache))
    assert torch.equal(out[0, 60:], ref[0, 60:])


@pytest.mark.parametrize("kw", ["past_key_values", "cache"])
def test_both_cache_keywords(kw):
    if kw == "cache" and not HAS_CACHE_KW:
        pytest.skip("this transformers has no cache= keyword")
    model = ctxcore.enable(_model())
    ids = _ids()
    ref = model.generate(ids, max_new_tokens=8, do_sample=False, **{kw: transformers.DynamicCache()})
    cache = ctxcore.CompressedCache(model.config, **_CACHE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # past_key_values= is deprecated in 5.24
        out = model.generate(ids, max_new_tokens=8, do_sample=False, **{kw: cache})
        assert cache.get_seq_length() == 60 + 7
        logits = model(out[:, -1:], use_cache=True, **{kw: cache}).logits
    assert torch.equal(out[0, 60:], ref[0, 60:])
    assert logits.shape == (1, 1, 64) and cache.get_seq_length() == 68


def test_cache_kwargs_follow_the_installed_transformers():
    model = _model()
    c = object()
    assert cache_kwargs(model, c) == ({"cache": c} if HAS_CACHE_KW else {"past_key_values": c})


def test_another_attention_implementation_warns_once_and_still_works():
    model = _model("sdpa")
    model.set_attn_implementation("sdpa")
    ids = _ids()
    dyn = transformers.DynamicCache()
    ref = model.generate(ids, max_new_tokens=6, do_sample=False, **cache_kwargs(model, dyn))
    cache = ctxcore.CompressedCache(model.config, **_CACHE)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = model.generate(ids, max_new_tokens=6, do_sample=False, **cache_kwargs(model, cache))
    slow = [w for w in rec if issubclass(w.category, SlowPathWarning)]
    assert len(slow) == 1, [str(w.message) for w in rec]
    msg = str(slow[0].message)
    assert "'sdpa'" in msg and "ctxcore.enable(model)" in msg
    assert torch.equal(out[0, 60:], ref[0, 60:])  # bits=8: the dequantized history decodes the same


def _prefilled(model, prompt, compress: bool = True, **kw):
    cache = ctxcore.CompressedCache(model.config, **{**_CACHE, **kw})
    with torch.no_grad():
        model(prompt, use_cache=True, **cache_kwargs(model, cache))
    if compress:
        cache.compress()
    return cache


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("budget", [None, "tight"])
def test_deepcopy_of_a_prompt_cache_serves_several_continuations(compress, budget):
    """The transformers idiom: prefill a prompt once, deep-copy the cache per continuation."""
    import copy
    import gc

    model = ctxcore.enable(_model())
    prompt = _ids(120)
    kw = {}
    if budget:
        probe = ctxcore.CompressedCache(model.config, **_CACHE)
        kw["ram_budget"] = probe.store.config["min_ram_budget"] + 10 * probe.store.config["page_bytes"]
    base = _prefilled(model, prompt, compress, **kw)
    n = base.get_seq_length()
    for seed in (1, 2):
        follow = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(seed))
        ids = torch.cat([prompt, follow], 1)
        ref = model.generate(ids, max_new_tokens=6, do_sample=False,
                             **cache_kwargs(model, _prefilled(model, prompt, compress, **kw)))  # fmt: skip
        mine = copy.deepcopy(base)
        assert mine.store is not base.store and mine.layers[0].cache is mine
        out = model.generate(ids, max_new_tokens=6, do_sample=False, **cache_kwargs(model, mine))
        assert torch.equal(out, ref)
        assert mine.get_seq_length() == 120 + 9 + 5
    assert base.get_seq_length() == n  # the original is untouched
    if budget:
        assert base.store.stats()["disk_bytes"] > 0  # some shared pages live on disk
    # A copy outlives its original (whose offload directory is removed with it).
    last = copy.deepcopy(base)
    del base
    gc.collect()
    follow = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(1))
    ids = torch.cat([prompt, follow], 1)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, **cache_kwargs(model, last))
    ref = model.generate(ids, max_new_tokens=6, do_sample=False,
                         **cache_kwargs(model, _prefilled(model, prompt, compress, **kw)))  # fmt: skip
    assert torch.equal(out, ref)
