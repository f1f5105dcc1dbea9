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
        "ids = torch.randint(0, 64, (1, 60))\n"
        "out = m.generate(ids, max_new_tokens=4, do_sample=False, **ctxcore.cache.cache_kwargs(m, c))\n"
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
