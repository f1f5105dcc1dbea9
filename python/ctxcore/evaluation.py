"""Quality, memory and speed of ctxcore against the caches transformers users have today.

Used by ``ctxcore eval`` and ``benches/bench_eval.py``. Every method runs on the same model, text
and positions in the same process:

* ``full``: transformers ``DynamicCache`` (full precision, SDPA);
* ``quanto4`` / ``quanto2``: ``QuantizedCache(backend="quanto")`` (needs ``optimum-quanto``),
  ``hqq4`` with ``backend="hqq"`` where ``hqq`` is installed;
* ``sink``: sink tokens + a recent window in full precision, everything else evicted
  (StreamingLLM-style, without re-rotating positions), sized to the bytes of ctxcore 2-bit;
* ``ctxcore4`` / ``ctxcore2``: :class:`ctxcore.CompressedCache` at 4 / 2 bits per element, dense
  attention over the codes (codebooks as the default gives them: reused from the codebook cache
  where it holds the model's, see :mod:`ctxcore.codebooks`); ``ctxcore4-train``: 4 bits with
  codebooks always trained on the context itself; ``ctxcore4-select``: Quest selection of 10% of
  the pages per decode step and KV head, attended over their codes (no fp16 page copies).

Perplexity prefills ``L`` tokens (exact attention for every method) and then scores the next
tokens one decode step at a time, so the compressed history is what is measured.
"""

from __future__ import annotations

import importlib.util
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from .cache import CompressedCache, _text_config, cache_kwargs

__all__ = [
    "METHODS",
    "SinkWindowCache",
    "available_methods",
    "kv_bytes",
    "make_cache",
    "passkey",
    "perplexity",
    "publish_codebooks",
    "speed",
]

METHODS = [
    "full", "quanto4", "quanto2", "hqq4", "sink", "ctxcore4", "ctxcore4-train", "ctxcore2", "ctxcore4-select",
]  # fmt: skip


def available_methods() -> list[str]:
    """Methods whose packages are installed."""
    out = []
    for m in METHODS:
        if m.startswith("quanto") and importlib.util.find_spec("optimum") is None:
            continue
        if m.startswith("quanto") and importlib.util.find_spec("optimum.quanto") is None:
            continue
        if m.startswith("hqq") and importlib.util.find_spec("hqq") is None:
            continue
        out.append(m)
    return out


class _SinkWindowLayer(DynamicLayer):
    """Keeps ``sinks`` leading and ``window`` recent tokens; the sequence length counts all."""

    def __init__(self, sinks: int, window: int) -> None:
        super().__init__()
        self.sinks, self.window, self.seen = sinks, window, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        k, v = super().update(key_states, value_states)
        self.seen += key_states.shape[-2]
        if k.shape[-2] > self.sinks + self.window:
            keep = torch.cat([torch.arange(self.sinks), torch.arange(k.shape[-2] - self.window, k.shape[-2])])
            self.keys, self.values = k[..., keep, :], v[..., keep, :]
        return k, v  # this step still sees everything it was given

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        # transformers before 5.x's rename passes the new tokens' cache_position instead.
        q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        kept = 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[-2]
        return kept + q, 0


class SinkWindowCache(Cache):
    """Sink tokens + a recent window in full precision (StreamingLLM-style eviction baseline).

    Evicted tokens are dropped; kept keys keep their original rotary positions. Decode steps
    must pass ``position_ids`` (the true positions), as :func:`perplexity` does."""

    def __init__(self, config: Any, sinks: int = 4, window: int = 256) -> None:
        n = int(_text_config(config).num_hidden_layers)
        super().__init__(layers=[_SinkWindowLayer(sinks, window) for _ in range(n)])


def kv_bytes(cache: Any, model: Any) -> int:
    """Bytes of K/V a cache holds (everything it stores: codes, scales, codebooks, window...)."""
    if isinstance(cache, CompressedCache):
        return cache.memory_stats()["compressed_bytes"]
    total = 0
    for lay in cache.layers:
        for name in ("keys", "values"):
            t = getattr(lay, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        for name in ("_quantized_keys", "_quantized_values"):
            q = getattr(lay, name, None)
            if q is not None:
                total += _qtensor_bytes(q)
    return total


def _qtensor_bytes(q: Any) -> int:
    if isinstance(q, torch.Tensor) and type(q) is torch.Tensor:
        return q.numel() * q.element_size()
    total = 0
    inner = getattr(q, "__tensor_flatten__", None)
    if inner is not None:
        names, _ = inner()
        for n in names:
            total += _qtensor_bytes(getattr(q, n))
        return total
    if isinstance(q, (tuple, list)):
        return sum(_qtensor_bytes(x) for x in q)
    if isinstance(q, dict):
        return sum(_qtensor_bytes(x) for x in q.values() if isinstance(x, torch.Tensor))
    return 0


def make_cache(method: str, model: Any, sink_window: int = 256) -> Any:
    """A fresh cache for ``method`` (see the module docs)."""
    cfg = model.config
    if method == "full":
        return DynamicCache(config=cfg)
    if method in ("quanto4", "quanto2", "hqq4"):
        from transformers import QuantizedCache

        if method.startswith("hqq"):
            # HQQ's own recommendation (its README: "start with nbits=4, group_size=64, axis=1").
            return QuantizedCache(backend="hqq", config=cfg, nbits=int(method[-1]), axis_key=1, axis_value=1)
        return QuantizedCache(backend="quanto", config=cfg, nbits=int(method[-1]))
    if method == "sink":
        return SinkWindowCache(cfg, sinks=4, window=sink_window)
    if method == "ctxcore4":
        return CompressedCache(cfg, bits=4)
    if method == "ctxcore4-train":  # codebooks trained on this context, whatever the codebook cache holds
        return CompressedCache(cfg, bits=4, codebooks="train")
    if method == "ctxcore2":
        return CompressedCache(cfg, bits=2)
    if method == "ctxcore4-select":
        return CompressedCache(cfg, bits=4, select=0.1)
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


@dataclass
class PplResult:
    method: str
    prefix: int
    start: int
    nll: float
    ppl: float
    tokens: int
    kv_bytes: int
    seconds: float
    #: Tokens the cache held when ``kv_bytes`` was read (the prefix plus the scored tokens but
    #: the last): divide by this, not by ``prefix``, for bytes per token.
    cached_tokens: int = 0


@torch.no_grad()
def perplexity(
    model: Any,
    ids: torch.Tensor,
    prefix: int,
    n_score: int,
    method: str,
    sink_window: int = 256,
    progress: Callable[[int], None] | None = None,
) -> PplResult:
    """Prefill ``ids[:prefix]`` into a fresh cache, then score ``ids[prefix : prefix + n_score]``
    one decode step at a time (``ids`` ``[T]``)."""
    cache = make_cache(method, model, sink_window)
    ids = ids.reshape(1, -1)
    t0 = time.perf_counter()
    kw = cache_kwargs(model, cache)
    out = model(ids[:, :prefix], use_cache=True, logits_to_keep=1, **kw)
    if isinstance(cache, CompressedCache):
        cache.compress()
    logits = out.logits[:, -1].float()
    nll = 0.0
    for i in range(n_score):
        pos = prefix + i
        target = ids[0, pos]
        nll -= torch.log_softmax(logits, -1)[0, target].item()
        if i + 1 == n_score:
            break
        out = model(ids[:, pos : pos + 1], use_cache=True, position_ids=torch.tensor([[pos]]), **kw)
        logits = out.logits[:, -1].float()
        if progress is not None:
            progress(1)
    mean = nll / n_score
    cached = int(cache.get_seq_length())
    return PplResult(
        method,
        prefix,
        0,
        mean,
        math.exp(mean),
        n_score,
        kv_bytes(cache, model),
        time.perf_counter() - t0,
        cached,
    )


def passkey_prompt(
    tok: Any, filler: str, length: int, depth: float, key: int, offset: int = 0
) -> torch.Tensor:
    """A chat prompt of about ``length`` tokens: paragraphs of ``filler`` (from paragraph
    ``offset`` on, wrapping around) with ``The secret passkey is KEY.`` inserted at relative
    ``depth`` (0 = start, 1 = end), then the question."""
    from .qa import chat_prefix, chat_question

    paras = [p.strip() for p in filler.split("\n\n") if p.strip()]
    if not paras:
        raise ValueError("filler text is empty")
    doc: list[str] = []
    total, i = 0, offset
    while total < length - 80:
        p = paras[i % len(paras)]
        doc.append(p)
        total += len(tok(p, add_special_tokens=False)["input_ids"]) + 1
        i += 1
    doc.insert(int(round(depth * len(doc))), f"The secret passkey is {key}.")
    text = "\n\n".join(doc)
    prompt = chat_prefix(tok, text) + chat_question(tok, text, "What is the secret passkey?")
    return torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])


@torch.no_grad()
def passkey(
    model: Any,
    tok: Any,
    filler: str,
    length: int,
    depth: float,
    key: int,
    method: str,
    sink_window: int = 256,
    offset: int = 0,
) -> bool:
    """Whether ``method`` retrieves the passkey (greedy, 12 new tokens). The prompt but its last
    token is prefilled first and a compressed cache compressed (as in :func:`perplexity`), so
    every method answers from the K/V it keeps."""
    ids = passkey_prompt(tok, filler, length, depth, key, offset)
    cache = make_cache(method, model, sink_window)
    kw = cache_kwargs(model, cache)
    model(ids[:, :-1], use_cache=True, logits_to_keep=1, **kw)
    if isinstance(cache, CompressedCache):
        cache.compress()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=12,
        **kw,
        do_sample=False,
        pad_token_id=tok.eos_token_id,
    )
    return str(key) in tok.decode(out[0, ids.shape[1] :])


@torch.no_grad()
def time_decode(model: Any, cache: Any, x: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Prefill ``x`` ``[B, T]`` into ``cache`` and decode ``new_tokens`` greedy steps after the
    first token: ``(ttft, tpot)`` in seconds (TTFT = prefill + first decode step, everything the
    cache does counted; TPOT = mean of the later steps). A compressed cache is compressed after
    the prefill, so the first decode step already reads the compressed K/V."""
    b, n = x.shape
    t0 = time.perf_counter()
    kw = cache_kwargs(model, cache)
    out = model(x, use_cache=True, logits_to_keep=1, **kw)
    if isinstance(cache, CompressedCache):
        cache.compress()
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    out = model(nxt, use_cache=True, position_ids=torch.full((b, 1), n), **kw)
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    for i in range(new_tokens):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        out = model(nxt, use_cache=True, position_ids=torch.full((b, 1), n + 1 + i), **kw)
    return ttft, (time.perf_counter() - t1) / max(new_tokens, 1)


@torch.no_grad()
def speed(
    model: Any, ids: torch.Tensor, length: int, method: str, new_tokens: int = 32, sink_window: int = 256
) -> dict[str, float]:
    """Time to first token (prefill of ``length`` tokens + the first decode step, calibration
    included) and time per output token over ``new_tokens`` greedy steps."""
    cache = make_cache(method, model, sink_window)
    ttft, tpot = time_decode(model, cache, ids.reshape(1, -1)[:, :length], new_tokens)
    return {
        "ttft_s": ttft,
        "tpot_s": tpot,
        "kv_bytes": kv_bytes(cache, model),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


@torch.no_grad()
def publish_codebooks(model: Any, ids: torch.Tensor) -> str:
    """Point the codebook cache at a fresh private directory and fill it from one context
    ``ids`` ``[T]`` (what a user has after the model's first context); returns the directory.
    Benchmarks of the default then measure reuse of codebooks trained on other text."""
    import os
    import tempfile

    d = tempfile.mkdtemp(prefix="ctxcore-bench-")
    os.environ["CTXCORE_CACHE_DIR"] = d
    cache = CompressedCache(model.config, bits=4)
    time_decode(model, cache, ids.reshape(1, -1), 1)
    if cache.codebook_source != ["trained"] * cache.num_layers:
        raise RuntimeError(f"publishing context did not train every layer: {cache.codebook_source}")
    return d
