"""Python re-implementations of a :class:`ctxcore.KVStore` layer's attention, composed from the
public ops (``pq_attention``, ``select_pages``, ``select_tokens_pq``): test oracles for the
Rust store paths (``KVStore.attend``, ``append_attend``) and for the ops themselves. Not part
of the package: users call ``KVStore.attend``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ctxcore.exceptions import ConfigError, DTypeError, ShapeError
from ctxcore.ops import _empty_codes, _require_cpu, pq_attention, select_pages, select_tokens_pq
from ctxcore.store import budget_count as _budget


def _store_q(q: torch.Tensor, hkv: int, d: int) -> tuple[torch.Tensor, bool]:
    if not isinstance(q, torch.Tensor):
        raise DTypeError(f"q: expected a torch.Tensor, got {type(q).__name__}")
    squeeze = q.dim() == 3
    if squeeze:
        q = q.unsqueeze(0)
    if q.dim() != 4 or q.shape[0] != 1 or q.shape[3] != d:
        raise ShapeError(
            f"q: expected [1, Hq, Tq, D={d}] (or [Hq, Tq, D]) for one sequence, got {tuple(q.shape)}"
        )
    if q.shape[1] % hkv:
        raise ConfigError(f"query heads ({q.shape[1]}) must be a multiple of the store's KV heads ({hkv})")
    _require_cpu("selective_attention", q=q)
    return q, squeeze


def _codebooks(store: Any, layer: int, codebooks: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k_centroids, v_centroids)`` ``[Hkv, m, ksub, dsub]`` float32 from ``codebooks``: a pair of
    lists of ProductQuantizer (one per KV head), or a pair of centroid arrays; by default from
    ``store.codebooks(layer)``."""
    if codebooks is None:
        getter = getattr(store, "codebooks", None)
        codebooks = getter(int(layer)) if getter is not None else None
        if codebooks is None:
            raise ConfigError(
                f"layer {layer} of the store has no codebooks (set them with KVStore.calibrate or "
                "set_codebooks), or pass codebooks=(key_quantizers, value_quantizers)"
            )
    out = []
    for side in codebooks:
        if isinstance(side, (list, tuple)):
            cents = [pq.centroids for pq in side]
            if any(c is None for c in cents):
                raise ConfigError("codebooks: a ProductQuantizer is not trained")
            out.append(torch.from_numpy(np.stack(cents)).float())
        else:
            out.append(torch.as_tensor(side).float())
    return out[0], out[1]


def _fp_batch(
    sinks: tuple[np.ndarray, np.ndarray],
    mids: list[tuple[np.ndarray, np.ndarray]],
    window: tuple[np.ndarray, np.ndarray],
    d: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp arrays ``[Hkv, 1, F, D]`` holding, per KV head (as a batch entry), sinks | mid | window
    | padding, and fp_range ``[Hkv, 2]`` ending each head's valid part after its window."""
    hkv = len(mids)
    lens = [sinks[0].shape[1] + mids[h][0].shape[0] + window[0].shape[1] for h in range(hkv)]
    f = max(lens, default=0)
    fk = torch.zeros((hkv, 1, f, d), dtype=torch.float32)
    fv = torch.zeros_like(fk)
    for h in range(hkv):
        for dst, src in ((fk, 0), (fv, 1)):
            parts = [sinks[src][h], mids[h][src], window[src][h]]
            dst[h, 0, : lens[h]] = torch.from_numpy(
                np.concatenate(parts, axis=0).astype(np.float32, copy=False)
            )
    rng = torch.zeros((hkv, 2), dtype=torch.int64)
    rng[:, 1] = torch.tensor(lens, dtype=torch.int64)
    return fk, fv, rng


def selective_attention(
    q: torch.Tensor,
    store: Any,
    layer: int,
    budget: int | float,
    seq: int = 0,
    method: str = "quest",
    scale: float | None = None,
    *,
    causal: bool = True,
    codebooks: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over the sinks, the recent window and a query-selected part of the pages.

    The store must be built with ``keep_full_precision=True``: selected tokens are read from the
    pages' fp16 copies. Selection is per KV head:

    * ``method="quest"``: pages ranked by :func:`page_scores` on the page abstracts (which stay in
      RAM); the top ``ceil(budget / page_size)`` pages are prefetched and read.
    * ``method="pq"``: tokens ranked by PQ scores of every page's key codes
      (:func:`select_tokens_pq`; every page is prefetched and read, so this touches the whole
      context) with the layer's key codebooks (``codebooks``, as in
      :func:`dense_attention_from_store`; given as ProductQuantizer lists, the scores are
      computed in Rust, several times faster than from centroid arrays).

    The fp part given to ``pq_attention`` (with no codes) is ``sinks | selected | window`` in
    position order; each KV head is passed as its own batch entry, so heads may select different
    tokens.

    Args:
        q: ``[1, Hq, Tq, D]`` or ``[Hq, Tq, D]`` queries of sequence ``seq``, whose own K/V were
            already appended (with ``causal``, they are the window's last ``Tq`` tokens).
        store: a :class:`ctxcore.KVStore`; layer, seq: which cache.
        budget: history tokens to select besides sinks and window: a count (int) or a fraction
            of the paged tokens (float in (0, 1]). Covering every page gives exact attention
            (over the fp16 copies of the paged K/V).
        scale: default ``1 / sqrt(D)``.

    Returns:
        ``(out, lse)``: ``out`` in q's dtype and shape; ``lse`` float32 ``[1, Hq, Tq]`` (or
        ``[Hq, Tq]``).
    """
    c = store.config
    hkv, d, ps = c["kv_heads"], c["head_dim"], c["page_size"]
    if not c["keep_full_precision"]:
        raise ConfigError("selective_attention needs a KVStore built with keep_full_precision=True")
    if method not in ("quest", "pq"):
        raise ConfigError(f"method must be 'quest' or 'pq', got {method!r}")
    q4, squeeze = _store_q(q, hkv, d)
    hq, tq = q4.shape[1], q4.shape[2]
    g = hq // hkv
    npages = store.num_pages(layer, seq)
    k_tokens = _budget(budget, store.paged_tokens(layer, seq), "selective_attention")
    mids: list[tuple[np.ndarray, np.ndarray]]
    empty = np.zeros((0, d), np.float16)
    if npages == 0 or k_tokens == 0:
        mids = [(empty, empty)] * hkv
    elif method == "quest":
        sel = select_pages(q4, store.abstracts(layer, seq), min(npages, math.ceil(k_tokens / ps)))[0]
        wanted = sorted(set(sel.flatten().tolist()))
        store.prefetch(layer, wanted, seq)
        pages = {p: store.page(layer, p, seq) for p in wanted}
        mids = [
            tuple(
                np.concatenate([getattr(pages[p], a)[h] for p in sel[h].tolist()])
                for a in ("k_fp16", "v_fp16")
            )
            for h in range(hkv)
        ]
    else:
        if codebooks is not None and isinstance(codebooks[0], (list, tuple)):
            kc = list(codebooks[0])  # ProductQuantizer objects: scored in Rust
        else:
            kc, _ = _codebooks(store, layer, codebooks)
        store.prefetch(layer, list(range(npages)), seq)
        pages = [store.page(layer, p, seq) for p in range(npages)]
        codes = torch.from_numpy(np.concatenate([p.k_codes for p in pages], axis=1))[None]
        toks = select_tokens_pq(q4, codes, kc, k_tokens, scale=scale)[0]  # [Hkv, k]
        kf = np.concatenate([p.k_fp16 for p in pages], axis=1)
        vf = np.concatenate([p.v_fp16 for p in pages], axis=1)
        mids = [(kf[h, toks[h].numpy()], vf[h, toks[h].numpy()]) for h in range(hkv)]
    fk, fv, fr = _fp_batch(store.sinks(layer, seq), mids, store.window(layer, seq), d)
    qb = q4.reshape(hkv, g, tq, d)  # KV head h's group as batch entry h
    out, lse = pq_attention(qb, fp_k=fk, fp_v=fv, fp_range=fr, scale=scale, causal=causal)
    out, lse = out.reshape(1, hq, tq, d), lse.reshape(1, hq, tq)
    return (out[0], lse[0]) if squeeze else (out, lse)


def dense_attention_from_store(
    q: torch.Tensor,
    store: Any,
    layer: int,
    seq: int = 0,
    *,
    codebooks: Any = None,
    scale: float | None = None,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over every token of a :class:`ctxcore.KVStore` layer, on the PQ codes.

    All pages' codes form the code part; the sinks and the window form the fp part as
    ``fp = sinks | window``. Positionally the sinks come before the pages, but softmax attention
    over tokens that are all visible does not depend on their order, so this is exact; with
    ``causal`` the mask applies only to the window's last ``Tq`` tokens (the queries' own
    positions, already appended), which must therefore be in the window (``Tq <= window``).

    Args:
        q: ``[1, Hq, Tq, D]`` or ``[Hq, Tq, D]``.
        codebooks: ``(key_quantizers, value_quantizers)`` as given to
            :meth:`ctxcore.KVStore.set_codebooks` (lists of trained ProductQuantizer, one per KV
            head), or ``(k_centroids, v_centroids)`` arrays ``[Hkv, m, ksub, D // m]``; default:
            :meth:`ctxcore.KVStore.codebooks`.
        scale: default ``1 / sqrt(D)``.

    Returns:
        ``(out, lse)`` as :func:`selective_attention`.
    """
    c = store.config
    hkv, d = c["kv_heads"], c["head_dim"]
    q4, squeeze = _store_q(q, hkv, d)
    kc, vc = _codebooks(store, layer, codebooks)
    npages = store.num_pages(layer, seq)
    store.prefetch(layer, list(range(npages)), seq)
    pages = [store.page(layer, p, seq) for p in range(npages)]
    if pages:
        k_codes = torch.from_numpy(np.concatenate([p.k_codes for p in pages], axis=1))[None]
        v_codes = torch.from_numpy(np.concatenate([p.v_codes for p in pages], axis=1))[None]
    else:
        k_codes, v_codes = _empty_codes(1, hkv, kc), _empty_codes(1, hkv, vc)
    (sk, sv), (wk, wv) = store.sinks(layer, seq), store.window(layer, seq)
    fk = torch.from_numpy(np.concatenate([sk, wk], axis=1))[None]
    fv = torch.from_numpy(np.concatenate([sv, wv], axis=1))[None]
    out, lse = pq_attention(q4, k_codes, v_codes, kc, vc, fk, fv, scale=scale, causal=causal)
    return (out[0], lse[0]) if squeeze else (out, lse)
