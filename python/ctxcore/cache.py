"""A transformers 5.x ``Cache`` whose K/V live PQ-compressed in a :class:`ctxcore.KVStore`.

:class:`CompressedCache` is a drop-in ``past_key_values`` / ``cache`` for decoder models with
softmax attention: Llama, SmolLM2, Qwen2/3, Mistral, Phi-3, OLMo2, and the sliding-window and
hybrid families (Gemma 2/3, Cohere2, Mistral or Qwen with a window). Per full-attention layer,
sequence and KV head it keeps ``sinks`` leading tokens and the ``window`` most recent tokens in
float32 and every token in between as PQ codes in pages of ``page_size`` tokens (see
:class:`ctxcore.KVStore`). Keys are stored after RoPE, as the attention sees them. Sliding-window
and chunked layers hold at most their window anyway: they stay transformers' own exact
``DynamicSlidingWindowLayer`` (see :func:`layer_windows`), counted in ``memory_stats`` and kept
by ``save`` / ``load``, beam search, batching and ``deepcopy``.

Two ways to run attention over it:

* With :func:`ctxcore.enable` (``attn_implementation="ctxcore"``), ``update`` only hands the new
  K/V to the ctxcore attention function, which computes attention straight from the pages
  (log-sum-exp merge of the compressed history with the exact attention among the new tokens)
  and then commits the new K/V to the store. Nothing is decompressed.
* With any other attention implementation, ``update`` commits the new K/V and returns the whole
  history *dequantized* (sinks and window exact, pages decoded), like transformers'
  ``QuantizedCache``: it works everywhere, but costs a dense copy per layer and step.

The first prefill of a layer always attends exactly over its full-precision K/V; the K/V are
compressed as they enter the cache. Codebooks are trained per layer and KV head from the K/V
the layer first has to page out (online, PQCache-style: usually the prefill itself), unless
:meth:`CompressedCache.calibrate` set them from a calibration text first (offline,
MILLION-style). They are saved with the context. By default (``codebooks="reuse"``) the first
context of a model publishes its codebooks to a per-model file and later caches reuse them,
layer by layer, where they fit the new context (see :mod:`ctxcore.codebooks`): only the first
context of a model pays for training.

``bits`` is the average number of bits stored per K/V element in the pages (codebooks aside),
mapped to the key and value quantizers by :func:`ctxcore.bits_to_pq` (the same mapping as
:class:`ctxcore.KVStore`):

======  ===============================  ==============================  ======================
bits    keys (head_dim 64)               values                          codebooks held (SmolLM2)
======  ===============================  ==============================  ======================
8       64 x 8-bit (1 dim / code)        64 x 8-bit (1 dim / code)       25.27 MiB
4       32 x 8-bit (2 dims / code)       64 x 4-bit (1 dim / code)       9.21 MiB
2       16 x 8-bit (4 dims / code)       16 x 8-bit (4 dims / code)      14.06 MiB
1       8 x 8-bit (8 dims / code)        8 x 8-bit (8 dims / code)       12.66 MiB
======  ===============================  ==============================  ======================

Keys need vector codes (4-bit scalar keys cost perplexity), values do not (4-bit scalar values
run the fastest value kernel). The codebooks are counted in
:meth:`CompressedCache.memory_stats`; they pay for themselves beyond a few thousand tokens.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from . import codebooks as _books
from .exceptions import ConfigError, DeviceError, ShapeError, SlowPathWarning, UnsupportedModelError
from .pq import ProductQuantizer
from .store import KVStore, _parse_bytes, check_budget

__all__ = [
    "CompressedCache",
    "CompressedLayer",
    "cache_kwargs",
    "check_supported",
    "layer_windows",
    "model_fingerprint",
]

#: Most tokens per KV head used to train one codebook (a strided subsample beyond that).
CALIBRATION_SAMPLES = 4096
#: k-means iterations for codebook training.
CALIBRATION_ITERS = 15
#: k-means iterations for 8-bit codebooks over pairs of dimensions (the default keys), after
#: k-means++ seeding: measured on SmolLM2 (perplexity over 1K and 4K tokens, 512 scored) 0.2-0.3%
#: above 15 iterations, at a seventh of the training time. (Seeding with the grid of two scalar
#: quantizers reached the same held-out MSE but lost a passkey at 7K that k-means++ seeding keeps.)
PAIR_ITERS = 2
#: Query chunks at least this long attend a decoded copy of the history with SDPA (faster than
#: the per-query lookup tables when many queries share the history, e.g. block-wise prefill).
DENSE_CHUNK_TOKENS = 32

log = logging.getLogger("ctxcore")

_DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8}


# -- model checks ----------------------------------------------------------------------------
def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


#: Layer types kept exact in transformers' own bounded layers, with the config field of their
#: window: transformers' ``DynamicSlidingWindowLayer`` serves both (only the mask differs).
_WINDOWED = {"sliding_attention": "sliding_window", "chunked_attention": "attention_chunk_size"}
#: Config fields of state-space / linear-attention hybrids (Jamba, Zamba, Bamba, Falcon-H1,
#: Qwen3-Next, ...), whose recurrent layers hold no per-token K/V to compress.
_RECURRENT_FIELDS = (
    "mamba_d_state", "mamba_d_conv", "mamba_expand", "ssm_state_size", "linear_conv_kernel_dim",
    "linear_num_key_heads", "attn_layer_period", "layers_block_type", "hybrid_override_pattern",
)  # fmt: skip


def check_supported(config: Any) -> Any:
    """Check that a model config is one CompressedCache supports; return its text config.

    Supported: decoder-only transformers whose layers are causal softmax attention with rotary,
    absolute or no positions and grouped-query heads. Full-attention layers are compressed;
    sliding-window and chunked layers (Gemma 2/3, Mistral with a window, Cohere2, Qwen2/3 with
    ``use_sliding_window``, ...) stay exact in transformers' own bounded layers (see
    :func:`layer_windows`). Raises :class:`~ctxcore.exceptions.UnsupportedModelError` naming
    the architecture and what is missing otherwise: encoder-decoder models, linear-attention /
    state-space hybrids, multi-head latent attention, learned attention sinks (GPT-OSS) and
    attention-logit soft-capping (Gemma 2's default).
    """
    name = getattr(config, "model_type", None) or type(config).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{name} is an encoder-decoder model; CompressedCache supports decoder-only models"
        )
    cfg = _text_config(config)
    name = getattr(cfg, "model_type", None) or name
    for attr in ("num_hidden_layers", "num_attention_heads", "hidden_size"):
        if getattr(cfg, attr, None) is None:
            raise UnsupportedModelError(f"{name}: config has no {attr}; not a decoder-only transformer")
    if getattr(cfg, "kv_lora_rank", None) is not None:
        raise UnsupportedModelError(
            f"{name} uses multi-head latent attention (kv_lora_rank={cfg.kv_lora_rank}): its cache "
            "holds a compressed latent, not per-head K/V; CompressedCache does not support it yet"
        )
    recurrent = [f for f in _RECURRENT_FIELDS if getattr(cfg, f, None) is not None]
    if recurrent:
        raise UnsupportedModelError(
            f"{name} is a state-space / linear-attention hybrid ({', '.join(recurrent)}): its "
            "recurrent layers keep a state, not per-token K/V; CompressedCache does not support it yet"
        )
    if name == "gpt_oss" or getattr(cfg, "attention_sinks", None):
        raise UnsupportedModelError(
            f"{name} has learned attention sinks (a per-head `sinks` logit in every softmax), "
            "which ctxcore's attention kernels do not apply yet"
        )
    cap = getattr(cfg, "attn_logit_softcapping", None)
    if cap is not None:
        raise UnsupportedModelError(
            f"{name} soft-caps its attention logits (attn_logit_softcapping={cap}), which ctxcore's "
            "attention kernels do not apply; set config.attn_logit_softcapping = None before "
            "loading the model (as SDPA and most inference servers run it) to use CompressedCache"
        )
    layer_windows(cfg)
    return cfg


def layer_windows(config: Any) -> list[int | None]:
    """Per decoder layer of ``config``: None for a full-attention layer (compressed by
    :class:`CompressedCache`), else the window of a sliding-window or chunked layer (kept exact,
    at most that many tokens, in transformers' ``DynamicSlidingWindowLayer``). A window at
    least ``max_position_embeddings`` long is full attention over any context the model takes,
    and is compressed. Raises UnsupportedModelError for any other layer type."""
    cfg = _text_config(config)
    name = getattr(cfg, "model_type", None) or type(cfg).__name__
    n = int(cfg.num_hidden_layers)
    types = getattr(cfg, "layer_types", None)
    if types is None:
        if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True):
            types = ["sliding_attention"] * n
        elif getattr(cfg, "attention_chunk_size", None) is not None:
            types = ["chunked_attention"] * n
        else:
            types = ["full_attention"] * n
    types = list(types)
    other = sorted(set(types) - {"full_attention", *_WINDOWED})
    if other:
        raise UnsupportedModelError(
            f"{name} has {', '.join(other)} layers; CompressedCache supports full-attention layers "
            "(compressed) and sliding-window or chunked attention layers (kept exact); "
            "linear-attention/state-space hybrids and shared-KV layers are not supported yet"
        )
    if len(types) != n:
        raise UnsupportedModelError(f"{name}: config.layer_types has {len(types)} entries for {n} layers")
    limit = getattr(cfg, "max_position_embeddings", None)
    out: list[int | None] = []
    for t in types:
        w = getattr(cfg, _WINDOWED[t], None) if t in _WINDOWED else None
        if t in _WINDOWED and w is None:
            raise UnsupportedModelError(f"{name}: a {t} layer but config.{_WINDOWED[t]} is None")
        out.append(None if w is None or (limit is not None and int(w) >= int(limit)) else int(w))
    return out


def _shape(cfg: Any) -> tuple[int, int, int, int]:
    """``(layers, q_heads, kv_heads, head_dim)``."""
    hq = int(cfg.num_attention_heads)
    hkv = int(getattr(cfg, "num_key_value_heads", None) or hq)
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    return int(cfg.num_hidden_layers), hq, hkv, int(d)


_CACHE_KW: dict[type, str] = {}
#: transformers before the 5.x ``crop(tokens_to_remove)`` took ``crop(max_length)``: a positive
#: value is the length to keep (assisted decoding passes one).
_LEGACY_CROP = "max_length" in inspect.signature(DynamicSlidingWindowLayer.crop).parameters


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """The keyword that hands ``cache`` to ``model``'s ``forward`` / ``generate``:
    ``{"cache": cache}`` where the installed transformers takes ``cache=`` (5.24 on, where
    ``past_key_values=`` is deprecated), else ``{"past_key_values": cache}``."""
    cls = type(model)
    name = _CACHE_KW.get(cls)
    if name is None:
        params = inspect.signature(cls.forward).parameters
        name = _CACHE_KW[cls] = "cache" if "cache" in params else "past_key_values"
    return {name: cache}


def model_fingerprint(config: Any) -> str:
    """A short identity of a model's shape, saved with contexts and checked when they load."""
    cfg = _text_config(config)
    layers, hq, hkv, d = _shape(cfg)
    return (
        f"{getattr(cfg, 'model_type', 'model')}:L{layers}:H{hq}/{hkv}:D{d}:"
        f"E{getattr(cfg, 'hidden_size', 0)}:V{getattr(cfg, 'vocab_size', 0)}"
    )


# -- the hand-over between update() and the attention function ------------------------------
class _Handoff(threading.local):
    """The K/V that the last ``update`` (on this thread) left for the ctxcore attention."""

    layer: CompressedLayer | None = None
    key: torch.Tensor | None = None


_HANDOFF = _Handoff()


def take_handoff(key: torch.Tensor) -> CompressedLayer | None:
    """The layer whose ``update`` returned ``key`` for the ctxcore attention, if any (once)."""
    layer = _HANDOFF.layer
    if layer is None or _HANDOFF.key is not key:
        return None
    _HANDOFF.layer = _HANDOFF.key = None
    return layer


# -- masks ------------------------------------------------------------------------------------
def _valid(mask: torch.Tensor) -> torch.Tensor:
    """Boolean "may attend" from a boolean or additive float mask."""
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def _split_mask(
    mask: torch.Tensor | None, b: int, tq: int, past: int
) -> tuple[list[int] | None, torch.Tensor | None, bool]:
    """Split a ``[B|1, 1, Tq, past + Tq]`` attention mask into history starts and the new part.

    Returns ``(starts, new, plain)``: ``starts[b]`` is the first history position sequence ``b``
    may attend (left padding), or None when the history part is not of that shape (then the
    caller falls back to dense attention); ``new`` ``[B, Tq, Tq]`` boolean or None (plain
    causal); ``plain`` is True when ``new`` is the plain causal pattern.
    """
    if mask is None:
        return [0] * b, None, True
    if mask.dim() != 4 or mask.shape[-2] != tq or mask.shape[-1] < past + tq:
        return None, None, False
    valid = _valid(mask[:, 0, :, mask.shape[-1] - past - tq :].cpu()).expand(b, tq, past + tq)
    hist, new = valid[..., :past], valid[..., past:]
    causal = torch.ones(tq, tq, dtype=torch.bool).tril_()
    plain = bool((new == causal).all())
    if past == 0:
        return [0] * b, new, plain
    row = hist[:, -1]  # the last query sees the most
    starts = (~row).sum(-1)
    expect = torch.arange(past)[None] >= starts[:, None]
    # Every query must see the same history, and it must be "everything from start on".
    if not bool((row == expect).all()) or not bool((hist == row[:, None]).all()):
        return None, new, plain
    return [int(s) for s in starts], new, plain


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``x`` (host-side history) on ``ref``'s device in ``ref``'s dtype."""
    return x.to(device=ref.device, dtype=ref.dtype, non_blocking=False)


def _exact_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with its log-sum-exp, in float32, blocked over queries.

    ``q`` ``[B, Hq, Tq, D]``, ``k``/``v`` ``[B, Hkv, T, D]``, ``valid`` ``[B, Tq, T]`` boolean or
    None (causal with the queries as the last ``Tq`` keys). A query that sees nothing gets a zero
    output and ``lse = -inf``.
    """
    b, hq, tq, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    g = hq // hkv
    qf = q.float().reshape(b, hkv, g, tq, d)
    kf, vf = k.float(), v.float()
    if valid is None:
        valid = torch.ones(tq, t, dtype=torch.bool).tril_(t - tq)[None].expand(b, tq, t)
    outs, lses = [], []
    step = max(1, (1 << 22) // max(1, hq * t))
    for i in range(0, tq, step):
        s = torch.einsum("bhgqd,bhkd->bhgqk", qf[:, :, :, i : i + step], kf) * scale
        m = valid[:, None, None, i : i + step]
        s = s.masked_fill(~m, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse[..., None].clamp(min=torch.finfo(torch.float32).min))
        p = torch.nan_to_num(p, nan=0.0)
        outs.append(torch.einsum("bhgqk,bhkd->bhgqd", p, vf))
        lses.append(lse)
    out = torch.cat(outs, dim=3).reshape(b, hq, tq, d)
    return out, torch.cat(lses, dim=3).reshape(b, hq, tq)


def _merge(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """Combine two softmax attentions over disjoint key sets by their log-sum-exps."""
    m = torch.maximum(l1, l2)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    den = (w1 + w2).clamp(min=1e-30)
    return (o1 * w1[..., None] + o2 * w2[..., None]) / den[..., None]


# -- the per-layer view -----------------------------------------------------------------------
class CompressedLayer(CacheLayerMixin):
    """One decoder layer's view of a :class:`CompressedCache` (the K/V live in its store)."""

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(self, cache: CompressedCache, idx: int) -> None:
        super().__init__()
        self.cache = cache
        self.idx = idx
        # K/V an update() left for the ctxcore attention (committed by it).
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        # Warm-up: until the layer has codebooks, tokens are held exactly here (model dtype,
        # [B, kv_heads, T, head_dim]) so the codebooks can be trained on a large sample.
        self._warm: tuple[torch.Tensor, torch.Tensor] | None = None
        # Left padding per sequence (first position that may be attended), from the first mask.
        self._starts: list[int] | None = None
        self._committed = 0  # tokens in the store

    def __repr__(self) -> str:
        return f"CompressedLayer({self.idx}, tokens={self.get_seq_length()})"

    # -- transformers' layer API ------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Take new K/V ``[B, kv_heads, T, head_dim]`` (keys after RoPE).

        Returns K/V of the full length ``get_seq_length()``. With the ctxcore attention enabled
        they are zero-stride placeholders (no memory): that attention reads the pages and the
        new K/V directly. Otherwise the new K/V are committed and the whole history is returned
        dequantized (exact while the calibration warm-up holds it).
        """
        self.flush()
        self.cache._check_kv(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cache._ensure_batch(key_states.shape[0])
        if self.cache._ctxcore_attention():
            self._pending = (key_states, value_states)
            # Placeholders of the full length (what get_mask_sizes reports), without memory:
            # the ctxcore attention recognizes them and reads the pages and the pending K/V.
            b, h, _, d = key_states.shape
            shape = (b, h, self.get_seq_length(), d)
            kp = key_states.new_zeros(()).expand(shape)
            vp = value_states.new_zeros(()).expand(shape)
            _HANDOFF.layer, _HANDOFF.key = self, kp
            return kp, vp
        if self.warming:
            self._hold(key_states, value_states)
            kw, vw = self._warm  # type: ignore[misc]
            self._maybe_settle(key_states.shape[2])
            return _like(kw, key_states), _like(vw, value_states)  # exact
        past = self._committed
        self.commit(key_states, value_states, self._starts or [0] * key_states.shape[0])
        if past == 0:
            return key_states, value_states  # exact prefill
        self.cache._warn_dense()
        k, v = self.dequantized()
        return _like(k, key_states), _like(v, value_states)

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        # transformers before 5.x's rename passes the new tokens' cache_position instead.
        q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.get_seq_length() + q, 0

    def get_seq_length(self) -> int:
        pending = 0 if self._pending is None else self._pending[0].shape[2]
        return self._committed + self.warm_tokens + pending

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # the name before transformers 5.x renamed it
        return -1

    def reset(self) -> None:
        self._pending = self._warm = self._starts = None
        self._committed = 0
        self.is_initialized = False

    # Batch and length edits are done once for all layers by CompressedCache.
    def crop(self, tokens_to_remove: int) -> None:
        self.cache.crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.cache.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.cache.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.cache.batch_select_indices(indices)

    def offload(self) -> None:  # pages are offloaded by the store's RAM budget
        pass

    def prefetch(self) -> None:
        pass

    # -- ctxcore ----------------------------------------------------------------------------
    @property
    def warming(self) -> bool:
        """Whether new tokens are still held exactly, waiting for the codebooks' training."""
        return self._committed == 0 and not self.cache.store.has_codebooks(self.idx)

    @property
    def warm_tokens(self) -> int:
        return 0 if self._warm is None else self._warm[0].shape[2]

    def _hold(self, k: torch.Tensor, v: torch.Tensor) -> None:
        kc, vc = k.detach().cpu(), v.detach().cpu()
        if self._warm is None:
            self._warm = (kc.clone(), vc.clone())
        else:
            self._warm = (torch.cat([self._warm[0], kc], 2), torch.cat([self._warm[1], vc], 2))

    def _maybe_settle(self, tq: int) -> None:
        # A single-token step means the prompt is over: train on what there is.
        if tq == 1 or self.warm_tokens >= self.cache._calibration_cap():
            self.settle()

    def settle(self) -> None:
        """End the warm-up: train the codebooks on the held tokens and page them."""
        if self._warm is not None:
            k, v = self._warm
            self._warm = None
            self.commit(k, v, self._starts or [0] * k.shape[0])

    def flush(self) -> None:
        """Commit K/V an ``update`` left for an attention call that did not come."""
        if self._pending is not None:
            k, v = self._pending
            self._pending = None
            if self.warming:
                self._hold(k, v)
            else:
                self.commit(k, v, self._starts or [0] * k.shape[0])

    def commit(self, k: torch.Tensor, v: torch.Tensor, starts: list[int]) -> None:
        """Append K/V ``[B, kv_heads, T, head_dim]`` to the store, training codebooks first when
        this is the first time the layer pages tokens out (left padding before ``starts``
        excluded from training)."""
        store = self.cache.store
        t = k.shape[2]
        c = self.cache
        if not store.has_codebooks(self.idx) and self._committed + t > c.sinks + c.window:
            c._online_books(self.idx, self._training_kv(k, v, starts))
        kc = k.detach().to("cpu", torch.float32)
        vc = v.detach().to("cpu", torch.float32)
        for b in range(k.shape[0]):
            store.append(self.idx, kc[b], vc[b], seq=b)
        self._committed += t

    def _training_kv(self, k: torch.Tensor, v: torch.Tensor, starts: list[int]) -> tuple[Any, Any]:
        """Everything this layer holds in full precision plus ``k``/``v``, without padding:
        ``[kv_heads, n, head_dim]`` float32 each."""
        store, past = self.cache.store, self._committed
        ks, vs = [], []
        for b in range(k.shape[0]):
            kn, vn = k[b].detach().float().cpu().numpy(), v[b].detach().float().cpu().numpy()
            if past == 0:  # a first prefill: nothing held yet, padding at the front only
                ks.append(kn[:, starts[b] :])
                vs.append(vn[:, starts[b] :])
                continue
            (sk, sv), (wk, wv) = store.sinks(self.idx, b), store.window(self.idx, b)
            pos = np.concatenate(
                [np.arange(sk.shape[1]), np.arange(past - wk.shape[1], past), past + np.arange(k.shape[2])]
            )
            keep = pos >= starts[b]
            ks.append(np.concatenate([sk, wk, kn], axis=1)[:, keep])
            vs.append(np.concatenate([sv, wv, vn], axis=1)[:, keep])
        if len(ks) == 1:
            return ks[0], vs[0]
        return np.concatenate(ks, axis=1), np.concatenate(vs, axis=1)

    def dequantized(self, seqs: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The committed history decoded: ``(k, v)`` float32 ``[B, kv_heads, T, head_dim]``."""
        from .ops import decode_codes

        store = self.cache.store
        seqs = list(range(store.batch)) if seqs is None else seqs
        books = store.codebooks(self.idx)
        ks, vs = [], []
        for b in seqs:
            (sk, sv), (wk, wv) = store.sinks(self.idx, b), store.window(self.idx, b)
            parts_k, parts_v = [torch.from_numpy(sk)], [torch.from_numpy(sv)]
            n = store.num_pages(self.idx, b)
            if n:
                store.prefetch(self.idx, list(range(n)), b)
                pages = [store.page(self.idx, p, b) for p in range(n)]
                kc = torch.from_numpy(np.concatenate([p.k_codes for p in pages], axis=1))[None]
                vc = torch.from_numpy(np.concatenate([p.v_codes for p in pages], axis=1))[None]
                parts_k.append(decode_codes(kc, torch.from_numpy(books[0]))[0])
                parts_v.append(decode_codes(vc, torch.from_numpy(books[1]))[0])
            parts_k.append(torch.from_numpy(wk))
            parts_v.append(torch.from_numpy(wv))
            ks.append(torch.cat(parts_k, dim=1))
            vs.append(torch.cat(parts_v, dim=1))
        return torch.stack(ks), torch.stack(vs)

    def attend(
        self, module: Any, q: torch.Tensor, mask: torch.Tensor | None, scale: float, **kwargs: Any
    ) -> torch.Tensor:
        """The ctxcore attention for the K/V the last ``update`` left: ``q`` ``[B, Hq, Tq, D]``
        -> output ``[B, Tq, Hq, D]`` in q's dtype. Commits the new K/V."""
        assert self._pending is not None
        k_new, v_new = self._pending
        self._pending = None
        b, hq, tq, d = q.shape
        c = self.cache
        if self.warming:
            # Exact attention over the held tokens and the new ones, like a DynamicCache.
            past = self.warm_tokens
            if past == 0:
                if self._starts is None:
                    valid = _split_mask(mask, b, tq, 0)[1]
                    self._starts = [_first_valid(valid, i) for i in range(b)]
                k, v = k_new, v_new
            else:
                kw, vw = self._warm  # type: ignore[misc]
                k, v = torch.cat([_like(kw, k_new), k_new], 2), torch.cat([_like(vw, v_new), v_new], 2)
            out = _sdpa(module, q, k, v, mask, scale, **kwargs)
            self._hold(k_new, v_new)
            self._maybe_settle(tq)
            return out
        past = self._committed
        starts, new_valid, plain = c._split_mask(mask, b, tq, past)
        if past == 0:
            # First prefill: exact attention over the full-precision K/V, then compress them.
            out = _sdpa(module, q, k_new, v_new, mask, scale, **kwargs)
            self._starts = [_first_valid(new_valid, i) for i in range(b)]
            self.commit(k_new, v_new, self._starts)
            return out
        if starts is None:
            # A mask the paged kernels cannot express (holes in the history): dense fallback.
            if self.idx == 0:
                log.info("a mask with holes in the history: attending a decoded copy of the pages (slow)")
            kh, vh = self.dequantized()
            k = torch.cat([_like(kh, k_new), k_new], dim=2)
            v = torch.cat([_like(vh, v_new), v_new], dim=2)
            out = _sdpa(module, q, k, v, mask, scale, **kwargs)
            self.commit(k_new, v_new, [0] * b)
            return out
        method, budget = c._method()
        if tq <= c.window and plain and method == "dense" and c.store.has_codebooks(self.idx):
            # Decode (or a short causal chunk): one Rust call for the layer and every sequence
            # appends the new K/V and attends sinks + pages + window, the queries being the
            # window's last tokens.
            if c.store._lazy is not None:
                c.store._fetch(self.idx)
            out_np, _ = c.store._s.append_attend(
                self.idx, _f32(q), _f32(k_new), _f32(v_new), float(scale), starts
            )  # fmt: skip
            self._committed += tq
            out = torch.from_numpy(out_np)
            return out.to(q.device, q.dtype).transpose(1, 2).contiguous()
        qc = q.detach().cpu()
        if tq <= c.window and plain:
            # Decode (or a short causal chunk): append, then one Rust call per sequence over
            # sinks + pages + window with the queries as the window's last tokens.
            self.commit(k_new, v_new, starts)
            outs = [
                c.store.attend(
                    self.idx,
                    qc[b_],
                    seq=b_,
                    method=method,
                    budget=budget,
                    scale=scale,
                    causal=True,
                    start=starts[b_],
                    fallback=c.select_fallback,
                )[0]  # fmt: skip
                for b_ in range(b)
            ]
            out = torch.stack(outs)
        elif tq >= DENSE_CHUNK_TOKENS:
            # Prefill-sized chunk: decoding the history once and one SDPA is faster than
            # scoring codes per query; same result (the codes' values), chunk itself exact.
            kh, vh = self.dequantized()
            k = torch.cat([_like(kh, k_new), k_new], dim=2)
            v = torch.cat([_like(vh, v_new), v_new], dim=2)
            hist = torch.arange(past)[None, None, :] >= torch.tensor(starts)[:, None, None]
            nv = new_valid if new_valid is not None else torch.ones(tq, tq, dtype=torch.bool).tril_()[None]
            full = torch.cat([hist.expand(b, tq, past), nv.expand(b, tq, tq)], dim=2)[:, None].to(q.device)
            out = _sdpa(module, q, k, v, full, scale, **kwargs)
            self.commit(k_new, v_new, starts)
            return out
        else:
            # Short masked or long chunk: history from the pages, the chunk exactly, merged.
            hist = [
                c.store.attend(
                    self.idx,
                    qc[b_],
                    seq=b_,
                    method=method,
                    budget=budget,
                    scale=scale,
                    causal=False,
                    start=starts[b_],
                    fallback=c.select_fallback,
                )  # fmt: skip
                for b_ in range(b)
            ]
            oh = torch.stack([h[0] for h in hist]).float()
            lh = torch.stack([h[1] for h in hist])
            on, ln = _exact_with_lse(qc, k_new.cpu(), v_new.cpu(), new_valid, scale)
            out = _merge(oh, lh, on, ln)
            self.commit(k_new, v_new, starts)
        return out.to(q.device, q.dtype).transpose(1, 2).contiguous()


def _f32(x: torch.Tensor) -> np.ndarray:
    """``x`` as a C-contiguous float32 numpy array on the host (no copy when it already is)."""
    return x.detach().to("cpu", torch.float32).contiguous().numpy()


def _first_valid(valid: torch.Tensor | None, b: int) -> int:
    """Left padding of sequence ``b`` in a first-prefill mask ``[B, Tq, Tq]``."""
    if valid is None:
        return 0
    last = valid[b, -1]
    return int((~last).sum()) if bool(last.any()) else int(last.shape[0])


def _sdpa(module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, scale: float, **kw: Any):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kw.pop("is_causal", None)
    out, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=scale, **kw)
    return out


# -- the cache --------------------------------------------------------------------------------
class CompressedCache(Cache):
    """PQ-compressed, paged KV cache for a transformers 5.x decoder model.

    Args:
        config: the model's config (``model.config``); checked with :func:`check_supported`.
        bits: average bits per stored K/V element: 8, 4, 2 or 1 (see the module docs).
        window: most recent tokens kept in full precision per layer and sequence (in
            ``window_dtype``).
        sinks: leading tokens kept in float32 forever (attention sinks).
        page_size: tokens per page (the unit of offload and of selection).
        ram_budget: bytes, or a size like ``"256MB"``, bounding every KV byte the cache holds
            in RAM (pages, window, sinks, abstracts, codebooks); pages beyond it go to
            ``offload_dir``. None: no bound. Below the minimum the shape needs, raises
            :class:`~ctxcore.exceptions.RamBudgetError` stating the minimum.
        offload_dir: directory for pages spilled from RAM (default: a private temporary one).
        select: selective attention: per decode step and KV head, only the pages whose
            abstracts bound ``q . k`` highest (Quest) are attended, over their codes (read from
            RAM or the disk tier, only those pages), plus sinks and window. An int is a token
            budget, a float in (0, 1] a fraction of the paged tokens. None: dense attention over
            every page's codes, and no page abstracts are kept (``abstract_bytes`` per page
            saved; see ``abstracts``).
        select_fallback: exact fallback for ``select`` (over the codes): where the page
            abstracts bound the share of a query's attention that the left-out pages could hold
            above this value in ``[0, 1)``, that KV head attends every page that step. None:
            off. The Quest bounds are loose: on SmolLM2 at 7K tokens, 0.5 sends every head to
            dense attention (see the README's selective-attention section).
        keep_full_precision: pages also carry fp16 copies of their K/V, and ``select`` attends
            the selected pages exactly from them (``memory_stats`` counts them: about 4x the
            codes at 4 bits).
        window_dtype: ``"float16"`` (default: half the window's bytes, rounding 2^-11
            relative, well below the codes' error) or ``"float32"`` (the window exact for a
            float32 model, and for K/V beyond float16's range ``|x| > 65504``, which are a
            :class:`~ctxcore.exceptions.ConfigError` in float16).
        abstracts: keep each page's abstract (what ``select`` ranks pages by; about 0.012x of
            the fp16 K/V bytes). None (default): only with ``select=``. True lets ``select`` be
            set on the cache later; setting it on a cache without abstracts makes decode raise
            :class:`~ctxcore.exceptions.ConfigError`.
        prefill_block: tokens per forward in :meth:`prefill` (bounds peak memory of long
            prefills; ``generate(..., prefill_chunk_size=N)`` does the same inside generate).
        calibration_tokens: online calibration holds up to this many leading tokens exactly
            (in the model's dtype, counted in ``ram_bytes``) and trains the codebooks on them once reached,
            or at the first single-token (decode) step; attention over them is exact meanwhile.
            With ``ram_budget`` the hold is capped to fit the budget.
        model_id: identity saved with the context and checked on load (default: a fingerprint
            of the config's shape, see :func:`model_fingerprint`).
        max_disk_bytes: cap on the offload directory's size.
        codebooks: where online calibration gets its codebooks. ``"reuse"`` (default): from the
            model's file in the codebook cache (:func:`ctxcore.codebooks.cache_dir`), per layer
            where they fit this context (:data:`ctxcore.codebooks.FIT_RATIO`), else trained
            here; the first context that trains every layer publishes them there, and a
            longer context replaces the stored layers it trains (they did not fit it).
            ``"train"``: always trained on this context, nothing read or written. A path: a
            codebook file to reuse from and publish to, instead of the cache's.
            :attr:`codebook_source` tells, per layer, what happened.

    The pages, window and codebooks live in host memory (and on disk), whatever the model's
    device: with a model on a GPU, new K/V are copied to the host, decode attention runs on the
    CPU over the compressed pages (one small copy of the queries and outputs per layer and
    step), and prefill attention and returned K/V stay on the model's device.

    Example (a random tiny Llama; real use: ``ctxcore.load_default_model()``):

    >>> import torch, ctxcore
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> model = ctxcore.enable(LlamaForCausalLM(cfg).eval())
    >>> cache = ctxcore.CompressedCache(model.config, bits=4, window=16, sinks=2, page_size=8)
    >>> ids = torch.randint(0, 64, (1, 100), generator=torch.Generator().manual_seed(0))
    >>> out = model.generate(ids, past_key_values=cache, max_new_tokens=5, do_sample=False)
    >>> out.shape, cache.get_seq_length()
    (torch.Size([1, 105]), 104)
    >>> cache.memory_stats()["tokens"], cache.store.paged_tokens(0)  # 2 sinks + 86 paged + 16 window
    (104, 86)
    """

    def __init__(
        self,
        config: Any,
        bits: float = 4,
        window: int = 128,
        sinks: int = 4,
        page_size: int = 64,
        ram_budget: int | str | None = None,
        offload_dir: str | os.PathLike | None = None,
        select: int | float | None = None,
        *,
        select_fallback: float | None = None,
        prefill_block: int | None = None,
        calibration_tokens: int = 4096,
        model_id: str | None = None,
        max_disk_bytes: int | str | None = None,
        codebooks: str | os.PathLike = "reuse",
        keep_full_precision: bool = False,
        window_dtype: str = "float16",
        abstracts: bool | None = None,
        _store: KVStore | None = None,
    ) -> None:
        cfg = check_supported(config)
        self.config = config
        _, self.q_heads, self.kv_heads, self.head_dim = _shape(cfg)
        windows = layer_windows(cfg)
        #: Decoder layers whose K/V are compressed (the full-attention ones), in store order;
        #: the others (sliding-window, chunked) are transformers' own exact, bounded layers.
        self.compressed_layers = [i for i, w in enumerate(windows) if w is None]
        #: Compressed layers: the store's layers (``codebook_source`` has one entry each).
        self.num_layers = len(self.compressed_layers)
        self.bits, self.window, self.sinks, self.page_size = bits, int(window), int(sinks), int(page_size)
        if select is not None:
            check_budget(select, "CompressedCache(select=...)")
        self.select = select
        if select_fallback is not None and not 0.0 <= float(select_fallback) < 1.0:
            raise ConfigError(
                f"select_fallback must be a share of the attention in [0, 1), got {select_fallback}"
            )
        if select_fallback is not None and keep_full_precision:
            raise ConfigError(
                "select_fallback applies to selection over the codes; with keep_full_precision=True the "
                "selected pages are attended exactly from their fp16 copies: pass one or the other"
            )
        self.select_fallback = None if select_fallback is None else float(select_fallback)
        if prefill_block is not None and int(prefill_block) < 1:
            raise ConfigError(f"prefill_block must be >= 1 token, got {prefill_block}")
        self.prefill_block = None if prefill_block is None else int(prefill_block)
        if int(calibration_tokens) < 1:
            raise ConfigError(f"calibration_tokens must be >= 1, got {calibration_tokens}")
        self.calibration_tokens = int(calibration_tokens)
        self.model_id = model_id if model_id is not None else model_fingerprint(config)
        if codebooks in ("reuse", "train"):
            self.codebooks: str | Path = str(codebooks)
        elif isinstance(codebooks, (str, os.PathLike)) and str(codebooks):
            self.codebooks = Path(codebooks)
        else:
            raise ConfigError(f'codebooks must be "reuse", "train" or a file path, got {codebooks!r}')
        #: Per layer, where its codebooks came from: "trained" (on this context), "reused" (from
        #: the codebook cache), "calibrated" (:meth:`calibrate`), "loaded" (a saved context), or
        #: None (not yet).
        self.codebook_source: list[str | None] = [None] * self.num_layers
        #: After :meth:`load` with ``token_ids``: what matched (``source``: "context", "prefix",
        #: "directory" or "none"; ``tokens``; ...). None otherwise.
        self.load_info: dict | None = None
        self._trained: list[_books.LayerBooks | None] = [None] * self.num_layers
        keep_abstracts = select is not None if abstracts is None else bool(abstracts)
        self._store_kwargs = dict(
            layers=max(1, self.num_layers), kv_heads=self.kv_heads, head_dim=self.head_dim,
            page_size=self.page_size,
            window=self.window, sinks=self.sinks, bits=bits, keep_full_precision=bool(keep_full_precision),
            window_dtype=window_dtype, abstracts=keep_abstracts,
            ram_budget=_parse_bytes(ram_budget, "ram_budget"), offload_dir=offload_dir,
            max_disk_bytes=max_disk_bytes, model_id=self.model_id,
        )  # fmt: skip
        if offload_dir is not None:
            os.makedirs(offload_dir, exist_ok=True)
        self.store = _store if _store is not None else KVStore(**self._store_kwargs)
        self._fixed_books: list[tuple[list[ProductQuantizer], list[ProductQuantizer]] | None] = [
            None
        ] * self.num_layers
        self._kv_dtype: torch.dtype | None = None
        self._dense_warned = self._cap_logged = False
        self._mask_memo: tuple[Any, tuple[int, int, int], Any] | None = None
        super().__init__(layers=[self._new_layer(w, windows[:i].count(None)) for i, w in enumerate(windows)])

    def _new_layer(self, window: int | None, idx: int) -> CacheLayerMixin:
        if window is None:
            return CompressedLayer(self, idx)
        return DynamicSlidingWindowLayer(sliding_window=window)

    @property
    def _compressed(self) -> list[CompressedLayer]:
        """The compressed layers, in store order."""
        return [lay for lay in self.layers if isinstance(lay, CompressedLayer)]

    @property
    def _exact(self) -> list[Any]:
        """The layers transformers keeps exact (sliding-window / chunked), in model order."""
        return [lay for lay in self.layers if not isinstance(lay, CompressedLayer)]

    def __deepcopy__(self, memo: dict) -> CompressedCache:
        """A copy for another continuation of the same prompt (the transformers idiom for
        re-using a prompt cache), cheap: the store is forked (:meth:`ctxcore.KVStore.fork`:
        closed pages shared copy-on-write), windows, sinks and tokens still held for
        calibration are copied."""
        import copy

        self._flush()
        new = copy.copy(self)
        memo[id(self)] = new
        new.store = self.store.fork()
        new.codebook_source = list(self.codebook_source)
        new._trained = list(self._trained)
        new._fixed_books = list(self._fixed_books)
        new._store_kwargs = dict(self._store_kwargs)
        new._mask_memo = None
        new.layers = []
        for lay in self.layers:
            if not isinstance(lay, CompressedLayer):
                new.layers.append(copy.deepcopy(lay, memo))
                continue
            nl = copy.copy(lay)
            nl.cache = new
            if lay._warm is not None:
                nl._warm = (lay._warm[0].clone(), lay._warm[1].clone())
            nl._starts = None if lay._starts is None else list(lay._starts)
            new.layers.append(nl)
        return new

    def __repr__(self) -> str:
        return (
            f"CompressedCache(bits={self.bits}, window={self.window}, sinks={self.sinks}, "
            f"page_size={self.page_size}, select={self.select}, tokens={self.get_seq_length()})"
        )

    # -- internals -------------------------------------------------------------------------
    def _ctxcore_attention(self) -> bool:
        cfg = _text_config(self.config)
        return getattr(cfg, "_attn_implementation", None) == "ctxcore" or (
            getattr(self.config, "_attn_implementation", None) == "ctxcore"
        )

    def _calibration_cap(self) -> int:
        """Tokens the warm-up may hold: ``calibration_tokens``, within ``ram_budget``."""
        cap = self.calibration_tokens
        budget = self._store_kwargs.get("ram_budget")
        if budget is not None:
            size = _DTYPE_BYTES.get(self._kv_dtype or torch.float32, 4)
            per_token = 2 * self.num_layers * self.store.batch * self.kv_heads * self.head_dim * size
            spare = budget - self.store.config["min_ram_budget"]
            cap = min(cap, max(1, spare // per_token))
            if cap < self.calibration_tokens and not self._cap_logged:
                self._cap_logged = True
                log.info(
                    "ram_budget leaves room to hold %d of calibration_tokens=%d tokens for codebook "
                    "training; codebooks train on fewer tokens", cap, self.calibration_tokens,
                )  # fmt: skip
        return cap

    def _warn_dense(self) -> None:
        """Warn (once per cache) that another attention implementation is decoding the whole
        history at every step."""
        if self._dense_warned:
            return
        self._dense_warned = True
        impl = getattr(_text_config(self.config), "_attn_implementation", None)
        warnings.warn(
            f"CompressedCache is used with attn_implementation={impl!r}: every step decodes the "
            "whole compressed history into a dense copy (correct, but slow and memory-hungry). Use "
            'ctxcore.enable(model), model.set_attn_implementation("ctxcore") or '
            'from_pretrained(..., attn_implementation="ctxcore") to attend the pages directly.',
            SlowPathWarning,
            stacklevel=4,
        )

    def _split_mask(
        self, mask: torch.Tensor | None, b: int, tq: int, past: int
    ) -> tuple[list[int] | None, torch.Tensor | None, bool]:
        """:func:`_split_mask`, computed once per forward: every layer of a step gets the same
        mask tensor (the memo holds it, so its identity cannot be reused meanwhile)."""
        memo = self._mask_memo
        if memo is not None and memo[0] is mask and memo[1] == (b, tq, past):
            return memo[2]
        res = _split_mask(mask, b, tq, past)
        self._mask_memo = (mask, (b, tq, past), res)
        return res

    def _method(self) -> tuple[str, int | float | None]:
        return ("dense", None) if self.select is None else ("quest", self.select)

    def _check_kv(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if k.device.type == "meta":
            raise DeviceError("CompressedCache: K/V on the meta device hold no values to compress")
        if k.dim() != 4 or k.shape[1] != self.kv_heads or k.shape[3] != self.head_dim or v.shape != k.shape:
            raise ShapeError(
                f"K/V: expected [batch, kv_heads={self.kv_heads}, tokens, head_dim={self.head_dim}], got "
                f"{tuple(k.shape)} and {tuple(v.shape)}; is this cache built from this model's config?"
            )
        if self._kv_dtype is None:
            self._kv_dtype = k.dtype

    def _ensure_batch(self, b: int) -> None:
        cur = self.store.batch
        if b == cur:
            return
        if all(lay.get_seq_length() == 0 and lay._committed == 0 for lay in self._compressed):
            self.store.select_seqs([0] * b)
            return
        raise ShapeError(
            f"batch size {b} does not match the cache's {cur} sequences; use a new cache (or "
            "reorder_cache / batch_select_indices) for a different batch"
        )

    def _book_file(self) -> Path | None:
        """The codebook file this cache reuses from and publishes to (None: ``"train"``)."""
        if self.codebooks == "train":
            return None
        if isinstance(self.codebooks, Path):
            return self.codebooks
        name = getattr(self.config, "_name_or_path", "") or ""
        return _books.cache_dir() / f"{_books.set_key(f'{self.model_id}|{name}', self._codec())}.ctxcb"

    def _codec(self) -> dict:
        c = self.store.config
        return {k: int(c[k]) for k in ("layers", "kv_heads", "head_dim", "k_m", "k_nbits", "v_m", "v_nbits")}

    def _online_books(self, layer: int, kv: tuple[np.ndarray, np.ndarray]) -> None:
        """Set layer ``layer``'s codebooks for the context sampled in ``kv``: reused from the
        codebook file where they fit, else trained here. Once every layer has codebooks, trained
        ones are published: all of them when there is no file yet, else those trained on more
        tokens than the stored ones they failed to replace (codebooks of a short context do not
        cover the key rotations of later positions)."""
        path = self._book_file()
        stored = None if path is None else _books.read_set(path, self.model_id, self._codec())
        n = int(kv[0].shape[1])
        if stored is not None:
            lb = stored.layers[layer]
            ok, rk, rv = lb.fits(kv[0], kv[1])
            if ok:
                self.store.set_codebooks(layer, lb.keys, lb.values)
                self.codebook_source[layer] = "reused"
                self._maybe_publish(path)
                return
            log.info(
                "layer %d: the cached codebooks do not fit this context (error %.2fx / %.2fx their "
                "training error for keys / values, limit %.2fx); training on it", layer, rk, rv,
                _books.FIT_RATIO,
            )  # fmt: skip
        books = self._train_layer(layer, kv)
        self.codebook_source[layer] = "trained"
        if path is None:
            return
        # Worth publishing: a long enough context, and a new file or more tokens than stored.
        if n >= _books.MIN_PUBLISH_TOKENS and (stored is None or n > stored.layers[layer].tokens):
            errs = [_books.relative_error(books[i], kv[i]) for i in (0, 1)]
            self._trained[layer] = _books.LayerBooks(books[0], books[1], errs[0], errs[1], n)
        self._maybe_publish(path)

    def _maybe_publish(self, path: Path | None) -> None:
        """Once every layer has codebooks, write the trained ones worth keeping (see
        :meth:`_online_books`) to the codebook file; a new file needs every layer."""
        if path is None or None in self.codebook_source:
            return
        new = {i: lb for i, lb in enumerate(self._trained) if lb is not None}
        self._trained = [None] * self.num_layers  # the store holds them; this was for publishing
        if not new:
            return
        current = _books.read_set(path, self.model_id, self._codec())  # another cache may have written
        if current is None:
            if len(new) < self.num_layers:
                return
            layers = [new[i] for i in range(self.num_layers)]
        else:
            layers = list(current.layers)
            better = [i for i, lb in new.items() if lb.tokens > layers[i].tokens]
            if not better:
                return
            for i in better:
                layers[i] = new[i]
            log.info("codebook cache: layers %s replaced by codebooks of a longer context", better)
        try:
            _books.CodebookSet(self.model_id, self._codec(), layers).save(path)
        except OSError as e:
            log.warning("could not publish codebooks to %s: %s", path, e)

    def _train_layer(
        self, layer: int, kv: tuple[np.ndarray, np.ndarray], iters: int = CALIBRATION_ITERS
    ) -> tuple[list[ProductQuantizer], list[ProductQuantizer]]:
        """Train and set layer ``layer``'s codebooks from ``[kv_heads, n, head_dim]`` samples."""
        c = self.store.config
        books: tuple[list[ProductQuantizer], list[ProductQuantizer]] = ([], [])
        for side, x, m, nb in ((0, kv[0], c["k_m"], c["k_nbits"]), (1, kv[1], c["v_m"], c["v_nbits"])):
            # 8-bit codebooks over pairs of dimensions: PAIR_ITERS Lloyd iterations (1-D
            # codebooks train to convergence by sorting anyway).
            it = min(iters, PAIR_ITERS) if self.head_dim // m == 2 and nb == 8 else iters
            for h in range(self.kv_heads):
                q = ProductQuantizer(self.head_dim, m, nb)
                q.train(_training_sample(x[h], 1 << nb, seed=layer * 1000 + h), iters=it, seed=0)
                books[side].append(q)
        self.store.set_codebooks(layer, books[0], books[1])
        return books

    # -- transformers' Cache API -------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].get_seq_length()

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (transformers' convention: a negative
        count; as for ``DynamicCache`` a positive value is rejected, except with a transformers
        whose ``crop`` still takes the length to keep, where it is that length). Only tokens still
        in the full-precision window can be removed (assisted decoding removes a few)."""
        self._flush()
        if tokens_to_remove > 0:
            if not _LEGACY_CROP:
                raise ConfigError(
                    f"crop takes a negative count of tokens to remove (transformers' convention), got "
                    f"{tokens_to_remove}"
                )
            tokens_to_remove = min(0, int(tokens_to_remove) - self.get_seq_length())
        n = -int(tokens_to_remove)
        exact = [lay for lay in self._exact if lay.is_initialized]
        if n == 0:
            for lay in exact:
                if getattr(lay, "record_past", False):
                    lay.crop(0)  # a window recording its past goes back to its bound
            return
        if n > self.get_seq_length():
            raise ConfigError(f"cannot remove {n} tokens from a cache of {self.get_seq_length()}")
        held = [lay for lay in self._compressed if lay._warm is not None]
        paged = [lay for lay in self._compressed if lay._warm is None and lay._committed > 0]
        if any(lay.warm_tokens < n for lay in held):
            raise ConfigError(f"cannot remove {n} tokens: some layers hold fewer")
        for lay in exact:
            if lay.get_seq_length() >= lay.sliding_window and not getattr(lay, "record_past", False):
                raise ConfigError(
                    f"cannot remove {n} tokens: a sliding-window layer already dropped the tokens "
                    "before its window (call cache.activate_past_recording(), where transformers has "
                    "it, before the steps to roll back)"
                )
        if paged:
            self.store.crop(n, layer=None if len(paged) == self.num_layers else paged[0].idx)
            if 1 < len(paged) < self.num_layers:  # pragma: no cover - layers settle together
                for lay in paged[1:]:
                    self.store.crop(n, layer=lay.idx)
        for lay in held:
            k, v = lay._warm  # type: ignore[misc]
            lay._warm = (k[:, :, :-n], v[:, :, :-n])
        for lay in paged:
            lay._committed -= n
        for lay in exact:
            lay.crop(-n)

    def _flush(self) -> None:
        for lay in self._compressed:
            lay.flush()

    def _select(self, indices: list[int]) -> None:
        self._flush()
        if not indices or min(indices) < 0 or max(indices) >= self.store.batch:
            raise ConfigError(f"sequence indices {indices} out of range for batch {self.store.batch}")
        self.store.select_seqs(indices)
        idx = torch.tensor(indices)
        for ex in self._exact:
            if ex.is_initialized:
                ex.reorder_cache(idx.to(ex.keys.device))
        for lay in self._compressed:
            if lay._warm is not None:
                lay._warm = (lay._warm[0][idx], lay._warm[1][idx])
            if lay._starts is not None:
                lay._starts = [lay._starts[i] for i in indices]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: sequence ``i`` becomes a copy of sequence ``beam_idx[i]`` (pages shared)."""
        self._select([int(i) for i in beam_idx.reshape(-1).tolist()])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select([i for i in range(self.store.batch) for _ in range(int(repeats))])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        idx = torch.as_tensor(indices).reshape(-1)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().reshape(-1)
        self._select([int(i) for i in idx.tolist()])

    def reset(self) -> None:
        """Drop every token (codebooks set by :meth:`calibrate` are kept)."""
        super().reset()
        self.store = KVStore(**self._store_kwargs)
        self.codebook_source = [None] * self.num_layers
        self._trained = [None] * self.num_layers
        for i, books in enumerate(self._fixed_books):
            if books is not None:
                self.store.set_codebooks(i, *books)
                self.codebook_source[i] = "calibrated"

    @property
    def batch_size(self) -> int:
        return self.store.batch

    # -- ctxcore API ------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, model: Any, input_ids: Any, iters: int = CALIBRATION_ITERS) -> None:
        """Train every layer's codebooks offline from the K/V ``model`` produces on
        ``input_ids`` (``[1, T]`` or ``[T]``, e.g. a tokenized calibration text), before any
        context is cached. They are kept across :meth:`reset` and saved with the context."""
        if self.get_seq_length() > 0:
            raise ConfigError("calibrate before caching any tokens (or after reset())")
        from transformers import DynamicCache

        ids = torch.as_tensor(input_ids).reshape(1, -1).to(_model_device(model))
        dyn = DynamicCache(config=model.config)
        impl = getattr(model.config, "_attn_implementation", None)
        try:
            if impl == "ctxcore":
                model.set_attn_implementation("sdpa")
            model(ids, use_cache=True, **cache_kwargs(model, dyn))
        finally:
            if impl == "ctxcore":
                model.set_attn_implementation("ctxcore")
        for i, li in enumerate(self.compressed_layers):
            lay = dyn.layers[li]
            k = lay.keys[0].float().cpu().numpy()
            v = lay.values[0].float().cpu().numpy()
            self._fixed_books[i] = self._train_layer(i, (k, v), iters)
            self.codebook_source[i] = "calibrated"

    @torch.no_grad()
    def prefill(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        progress: Any = None,
    ) -> torch.Tensor:
        """Run ``model`` over ``input_ids`` ``[B, T]`` into this cache in blocks of
        ``prefill_block`` tokens (all at once if None); returns the last position's logits
        ``[B, vocab]``. ``progress(done, total)`` is called after each block."""
        dev = _model_device(model)
        ids = torch.as_tensor(input_ids).to(dev)
        if ids.dim() == 1:
            ids = ids[None]
        past = self.get_seq_length()
        t = ids.shape[1]
        block = self.prefill_block or t
        mask = None if attention_mask is None else torch.as_tensor(attention_mask).to(dev)
        if mask is not None and mask.shape[1] == t:
            mask = torch.cat([torch.ones(ids.shape[0], past, dtype=mask.dtype, device=dev), mask], dim=1)
        logits = None
        for s in range(0, t, block):
            e = min(t, s + block)
            kw: dict[str, Any] = {}
            if mask is not None:
                m = mask[:, : past + e]
                kw["attention_mask"] = m
                kw["position_ids"] = (m.long().cumsum(-1) - 1).clamp(min=0)[:, past + s : past + e]
            out = model(ids[:, s:e], use_cache=True, logits_to_keep=1, **cache_kwargs(model, self), **kw)
            logits = out.logits[:, -1]
            if progress is not None:
                progress(e, t)
        assert logits is not None, "empty input_ids"
        return logits

    def compress(self, progress: Any = None) -> None:
        """End the calibration warm-up now: train each layer's codebooks on the tokens held so
        far and page them (otherwise this happens at the first decode step or at
        ``calibration_tokens``). ``progress(done_layers, layers)`` is called per layer."""
        self._flush()
        for i, lay in enumerate(self._compressed):
            lay.settle()
            if progress is not None:
                progress(i + 1, self.num_layers)

    def memory_stats(self) -> dict[str, int]:
        """KV memory: ``tokens`` (per sequence), ``batch``, ``dense_bytes`` (what a
        ``DynamicCache`` holds for the same tokens in the model's K/V dtype),
        ``dense_fp16_bytes``, ``compressed_bytes`` (everything this cache stores, RAM and disk:
        pages, window, sinks, abstracts, codebooks, and the exact sliding-window layers),
        ``ram_bytes`` (the part in RAM; ``ram_budget`` bounds the store's part), ``disk_bytes``
        (offload files), ``exact_layer_bytes`` (the sliding-window / chunked layers, kept exact
        as a ``DynamicCache`` keeps them)."""
        self._flush()
        s = self.store.stats()
        held = sum(lay._warm[0].nbytes * 2 for lay in self._compressed if lay._warm is not None)
        t = self.get_seq_length()
        b = self.store.batch
        elems = 2 * self.num_layers * b * self.kv_heads * t * self.head_dim
        # Sliding-window layers hold the same exact tensors a DynamicCache would.
        exact = [lay for lay in self._exact if lay.is_initialized]
        exact_elems = sum(lay.keys.numel() + lay.values.numel() for lay in exact)
        exact_bytes = sum(lay.keys.nbytes + lay.values.nbytes for lay in exact)
        page_bytes = self.store.config["page_bytes"]
        return {
            "tokens": t,
            "batch": b,
            "dense_bytes": elems * _DTYPE_BYTES.get(self._kv_dtype or torch.float16, 2) + exact_bytes,
            "dense_fp16_bytes": (elems + exact_elems) * 2,
            "compressed_bytes": int(
                s["ram_bytes"] - s["ram_page_bytes"] + s["pages"] * page_bytes + held + exact_bytes
            ),
            "ram_bytes": int(s["ram_bytes"] + held + exact_bytes),
            "disk_bytes": int(s["disk_bytes"]),
            "exact_layer_bytes": int(exact_bytes),
        }

    def _settle_all(self) -> None:
        """Move every held token into the store (ends a calibration warm-up)."""
        self._flush()
        for lay in self._compressed:
            lay.settle()

    def _settings(self) -> dict:
        """What a loaded context needs besides the store's own configuration."""
        return {
            "bits": self.bits, "window": self.window, "sinks": self.sinks, "page_size": self.page_size,
            "select": self.select, "select_fallback": self.select_fallback,
            "prefill_block": self.prefill_block,
            "kv_dtype": str(self._kv_dtype).replace("torch.", "") if self._kv_dtype else None,
        }  # fmt: skip

    def save(
        self,
        target: str | os.PathLike,
        token_ids: Any = None,
        metadata: dict | None = None,
        *,
        namespace: str | None = None,
    ) -> dict | None:
        """Save the context (pages, window, sinks, codebooks, abstracts). Ends a calibration
        warm-up first.

        ``target``: a directory (written atomically; ``token_ids`` ``[T]`` or ``[B, T]`` are
        optional and saved with it so a later prompt can be matched, :attr:`token_ids`), or a
        shared store ``"redis://host:port/db"`` (also ``rediss://`` for TLS, ``unix://``; see
        :mod:`ctxcore.shared`): then ``token_ids`` ``[T]`` are required, pages are keyed by
        content and only those the store lacks are written, and a dict of what was written is
        returned. ``namespace``: the shared store's key prefix (default ``?namespace=`` in the
        URL, else ``"ctxcore"``)."""
        from . import shared

        if shared.is_url(target):
            return shared.save(self, str(target), token_ids, metadata, namespace=namespace)
        self._settle_all()
        meta = {
            "ctxcore_cache": {
                **self._settings(),
                "layers_committed": [lay._committed for lay in self._compressed],
                "exact_layers": _export_exact(self),
            }
        }
        if metadata:
            meta["user"] = metadata
        if token_ids is not None:
            token_ids = torch.as_tensor(token_ids)
            token_ids = token_ids.tolist() if token_ids.dim() == 2 else [token_ids.tolist()]
        self.store.save(target, token_ids=token_ids, metadata=meta)
        return None

    @classmethod
    def load(
        cls,
        target: str | os.PathLike,
        config: Any,
        *,
        token_ids: Any = None,
        ram_budget: int | str | None = None,
        offload_dir: str | os.PathLike | None = None,
        model_id: str | None = None,
        select: int | float | None = ...,  # type: ignore[assignment]
        namespace: str | None = None,
        **settings: Any,
    ) -> CompressedCache:
        """Load a context saved by :meth:`save` for the model of ``config``.

        From a directory, pages are read lazily; a context saved for another model shape raises
        :class:`~ctxcore.exceptions.ContextMismatchError` naming both. With ``token_ids`` (the
        prompt, ``[T]``) the cache holds the longest prefix of it the save holds: all of it when
        the saved tokens start the prompt, else the page-aligned prefix the two share (maybe 0
        tokens), and always at most ``T - 1`` tokens, so ``generate(token_ids,
        cache=cache)`` prefills only the rest.

        From a shared store (``"redis://..."``, see :mod:`ctxcore.shared`) ``token_ids`` are
        required and the cache holds the longest prefix of them any saved context holds, exact
        up to a saved context's last token, or page-aligned (maybe 0 tokens; then a new cache).
        ``settings`` (``bits``, ``window``, ``sinks``, ``page_size``, ...) must equal the saver's
        for its contexts to match; they default to the constructor's. :attr:`load_info` says
        what matched. Errors before any prefill: ConfigError for a bad URL,
        StoreConnectionError for an unreachable server or wrong password."""
        from . import shared

        if shared.is_url(target):
            kw = dict(settings, ram_budget=ram_budget, offload_dir=offload_dir, model_id=model_id)
            if select is not ...:
                kw["select"] = select
            return shared.load(cls, str(target), config, token_ids, namespace=namespace, **kw)
        if settings:
            raise ConfigError(
                f"{sorted(settings)}: a directory context keeps the settings it was saved with; "
                "these apply to shared stores only"
            )
        cfg = check_supported(config)
        _, _, hkv, d = _shape(cfg)
        layers = max(1, layer_windows(cfg).count(None))
        mid = model_id if model_id is not None else model_fingerprint(config)
        store = KVStore.load(
            target, ram_budget=ram_budget, offload_dir=offload_dir, model_id=mid, layers=layers, kv_heads=hkv,
            head_dim=d,
        )  # fmt: skip
        info = store.metadata.get("ctxcore_cache", {})
        kw = dict(ram_budget=ram_budget, offload_dir=offload_dir, model_id=mid)
        if select is not ...:
            kw["select"] = select
        if token_ids is not None:
            held = _dir_prefix(store, token_ids, whole_only=bool(info.get("exact_layers")))
            if held == 0:
                c = store.config
                fresh = cls(
                    config, bits=info.get("bits", 4), window=c["window"], sinks=c["sinks"],
                    page_size=c["page_size"], **kw,
                )  # fmt: skip
                fresh.load_info = {"source": "none", "tokens": 0, "pages": 0}
                return fresh
        cache = cls._adopt(config, store, info, kw)
        if token_ids is not None:
            cache.load_info = {"source": "directory", "tokens": cache.get_seq_length(), "pages": None}
        return cache

    @classmethod
    def _adopt(cls, config: Any, store: KVStore, info: dict, kw: dict) -> CompressedCache:
        """A cache around a loaded ``store``; ``info``: the saved :meth:`_settings`, ``kw``:
        the caller's ``ram_budget`` / ``offload_dir`` / ``model_id`` / ``select``."""
        c = store.config
        select = kw.get("select", info.get("select"))
        if select is not None and not c.get("abstracts", True):
            raise ConfigError(
                f"select={select!r}: this context was saved without page abstracts (by a cache "
                "without select=); load it without select=, or build it with select= set"
            )
        cache = cls(
            config, bits=info.get("bits", 4), window=c["window"], sinks=c["sinks"], page_size=c["page_size"],
            ram_budget=kw.get("ram_budget"), offload_dir=kw.get("offload_dir"), select=select,
            select_fallback=info.get("select_fallback") if c["keep_full_precision"] is False else None,
            prefill_block=info.get("prefill_block"), model_id=kw.get("model_id"),
            window_dtype=c.get("window_dtype", "float32"), _store=store,
        )  # fmt: skip
        # The saved bits may be an explicit (m, nbits) pair; the store's config is authoritative.
        cache._store_kwargs.update(
            bits=info.get("bits", 4),
            keep_full_precision=c["keep_full_precision"],
            abstracts=c.get("abstracts", True),
        )
        dt = info.get("kv_dtype")
        cache._kv_dtype = getattr(torch, dt) if dt else None
        for i, lay in enumerate(cache._compressed):
            if store.has_codebooks(i):
                cache.codebook_source[i] = "loaded"
            lay._committed = store.num_tokens(i, 0)
            lay.is_initialized = lay._committed > 0
            if lay.is_initialized:
                lay.dtype, lay.device = cache._kv_dtype or torch.float32, torch.device("cpu")
        _import_exact(cache, info.get("exact_layers") or [])
        return cache

    @property
    def token_ids(self) -> list[int] | None:
        """Token ids saved with a loaded context (sequence 0), if any."""
        ids = self.store.metadata.get("token_ids")
        return ids[0] if ids else None

    @property
    def metadata(self) -> dict:
        """User metadata saved with a loaded context."""
        return self.store.metadata.get("user", {})


def _export_exact(cache: CompressedCache) -> list[dict]:
    """The exact (sliding-window / chunked) layers' state, for a saved context's metadata."""
    import base64

    out = []
    for i, lay in enumerate(cache.layers):
        if isinstance(lay, CompressedLayer) or not lay.is_initialized:
            continue
        k, v = (x.detach().cpu().contiguous() for x in (lay.keys, lay.values))
        raw = [x.view(torch.uint8).numpy().tobytes() for x in (k, v)]
        out.append({
            "layer": i, "window": int(lay.sliding_window), "seen": int(lay.get_seq_length()),
            "dtype": str(k.dtype).replace("torch.", ""), "shape": list(k.shape),
            "k": base64.b64encode(raw[0]).decode(), "v": base64.b64encode(raw[1]).decode(),
        })  # fmt: skip
    return out


def _import_exact(cache: CompressedCache, saved: list[dict]) -> None:
    """Restore what :func:`_export_exact` saved into ``cache``'s exact layers."""
    import base64

    from .exceptions import ContextMismatchError, CorruptDataError

    for e in saved:
        try:
            i, shape, dtype = int(e["layer"]), [int(x) for x in e["shape"]], getattr(torch, str(e["dtype"]))
            lay = cache.layers[i]
            if isinstance(lay, CompressedLayer) or int(e["window"]) != lay.sliding_window:
                has = "full attention" if isinstance(lay, CompressedLayer) else lay.sliding_window
                raise ContextMismatchError(
                    f"saved context: layer {i} was a sliding-window layer of {e['window']} tokens, "
                    f"the model's is {has}"
                )
            raw = [bytearray(base64.b64decode(e[x])) for x in ("k", "v")]
            k, v = (torch.frombuffer(r, dtype=torch.uint8).view(dtype).reshape(shape) for r in raw)
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, IndexError) as err:
            raise CorruptDataError(
                f"saved context: the state of sliding-window layer {e.get('layer')!r} is damaged ({err})"
            ) from err
        lay.lazy_initialization(k, v)
        lay.keys, lay.values = k, v
        lay.cumulative_length = int(e["seen"])


def _dir_prefix(store: KVStore, token_ids: Any, whole_only: bool = False) -> int:
    """Cut a directory-loaded ``store`` to the longest prefix of ``token_ids`` it holds (at most
    ``len - 1`` tokens); the tokens it then holds (0: nothing usable). ``whole_only``: the save
    is usable only whole (its sliding-window layers cannot be cut back to a prefix)."""
    from .shared import _as_ids, hold_at_most

    ids = _as_ids(token_ids)
    saved = store.metadata.get("token_ids")
    if not saved:
        raise ConfigError("this context was saved without token_ids; load it without token_ids")
    if store.batch != 1:
        raise ConfigError(f"token_ids matching needs a context of one sequence, this one holds {store.batch}")
    sv = np.asarray(saved[0], dtype=np.int64)
    n = min(len(sv), len(ids))
    diff = np.nonzero(sv[:n] != ids[:n])[0]
    common = int(diff[0]) if diff.size else n
    if whole_only and min(common, len(ids) - 1) < len(sv):
        return 0
    n_held = hold_at_most(store, min(common, len(ids) - 1))
    if n_held == 0:
        return 0
    store.metadata["token_ids"] = [list(saved[0][:n_held])]
    store.metadata.pop("chunk_hashes", None)
    return n_held


def _training_sample(x: np.ndarray, ksub: int, seed: int) -> np.ndarray:
    """At most :data:`CALIBRATION_SAMPLES` rows of ``x`` ``[n, D]``; with fewer rows than
    centroids, the rows repeated with a small jitter so k-means has ``ksub`` distinct points."""
    n = x.shape[0]
    if n > CALIBRATION_SAMPLES:
        x = x[np.linspace(0, n - 1, CALIBRATION_SAMPLES).astype(np.int64)]
    if n == 0:
        raise ConfigError("no unpadded tokens to train codebooks from")
    if x.shape[0] < ksub:
        rng = np.random.default_rng(seed)
        reps = -(-ksub // x.shape[0])
        base = np.tile(x, (reps, 1))[:ksub]
        scale = float(np.std(x)) or 1.0
        x = base + rng.standard_normal(base.shape).astype(np.float32) * (1e-3 * scale)
    return np.ascontiguousarray(x, dtype=np.float32)
