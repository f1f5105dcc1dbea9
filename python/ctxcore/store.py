"""Paged KV store: PQ-coded pages, a RAM budget, a disk tier, prefetch and persistence.

Per sequence and layer, token positions are laid out as::

    [0, sinks)                    sink tokens, float32, always in RAM
    [sinks, sinks + paged)        pages of ``page_size`` tokens: PQ codes (+ optional fp16 copy)
    [sinks + paged, num_tokens)   recent window (<= ``window`` tokens), float32, in RAM

Tokens pushed out of the window are encoded with the layer's codebooks into the last page. A
full page is immutable; its *abstract* (per KV head: per-dimension min, max and mean of the
keys, 8-bit quantized with conservative rounding) stays in RAM, while the page itself lives in
the RAM tier until the RAM total exceeds ``ram_budget``, when least-recently-used pages spill to
segment files in ``offload_dir`` (a private temporary directory if not given).

Example:

>>> import numpy as np, ctxcore
>>> rng = np.random.default_rng(0)
>>> store = ctxcore.KVStore(layers=1, kv_heads=2, head_dim=16, page_size=8, window=4, sinks=2,
...                         bits=4)
>>> train = rng.standard_normal((512, 16)).astype(np.float32)
>>> store.calibrate(0, train[None].repeat(2, 0), train[None].repeat(2, 0))
>>> k = rng.standard_normal((2, 30, 16)).astype(np.float32)
>>> store.append(0, k, k)
>>> store.num_tokens(0), store.num_pages(0), store.window(0)[0].shape
(30, 3, (2, 4, 16))
>>> page = store.page(0, 0)
>>> page.k_codes.shape, page.tokens
((2, 8, 8), 8)
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import _ctxcore
from ._convert import is_torch
from .exceptions import ConfigError, DTypeError, ShapeError
from .pq import ProductQuantizer

__all__ = ["KVStore", "Page", "bits_to_pq"]


def bits_to_pq(bits: float, head_dim: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Map average stored bits per element to the ``((k_m, k_nbits), (v_m, v_nbits))`` product
    quantizers of keys and values for a head dimension.

    The one mapping for :class:`KVStore` and :class:`ctxcore.CompressedCache`:

    ====  ===========================  =========================  ==========================
    bits  keys                         values                     kernels
    ====  ===========================  =========================  ==========================
    8     ``D`` x 8-bit (1 dim/code)   ``D`` x 8-bit (1 dim)      byte tables, histograms
    4     ``D/2`` x 8-bit (2 dims)     ``D`` x 4-bit (1 dim)      key byte tables; values on
                                                                  the AVX-512/AVX2 lookups
    2     ``D/4`` x 8-bit (4 dims)     ``D/4`` x 8-bit (4 dims)   byte tables, histograms
    1     ``D/8`` x 8-bit (8 dims)     ``D/8`` x 8-bit (8 dims)   byte tables, histograms
    ====  ===========================  =========================  ==========================

    At 4 bits (the default) keys keep 8-bit vector codes over pairs of dimensions and values
    take one 16-level scalar quantizer per dimension. Measured on SmolLM2 (README,
    "What is stored"): 4-bit scalar keys cost perplexity (+0.7% at 2K tokens, against +0.0%
    with 2-dim 8-bit keys); 4-bit scalar values cost little (0.0% at 2K, up to +0.5% in one
    4K window) and run the fastest value kernel with 1/16 of the codebook bytes.
    """
    d = head_dim
    table = {
        8: ((d, 8), (d, 8)),
        4: ((d // 2, 8), (d, 4)),
        2: ((d // 4, 8), (d // 4, 8)),
        1: ((d // 8, 8), (d // 8, 8)),
    }
    if bits not in table:
        raise ConfigError(f"bits must be one of 1, 2, 4, 8, got {bits}")
    layout = table[bits]
    for m, _ in layout:
        if m < 1 or d % m:
            raise ConfigError(f"bits={bits} needs head_dim divisible by {d // max(m, 1)}; got {d}")
    return layout


def check_budget(budget: Any, what: str) -> None:
    """The one rule for selection budgets (``CompressedCache(select=)``, ``KVStore.attend``, the
    ops): an int count ``>= 0``, or a float fraction in ``(0, 1]``. Raises ConfigError."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{what}: budget must be an int count or a float fraction, got {budget!r}")
    if isinstance(budget, (float, np.floating)):
        if not 0.0 < float(budget) <= 1.0:
            raise ConfigError(f"{what}: a fractional budget must be in (0, 1], got {budget}")
    elif int(budget) < 0:
        raise ConfigError(f"{what}: budget must be >= 0, got {budget}")


def budget_count(budget: int | float, total: int, what: str) -> int:
    """``budget`` (see :func:`check_budget`) as a count out of ``total``: a fraction rounds up."""
    check_budget(budget, what)
    if isinstance(budget, (float, np.floating)):
        return min(total, math.ceil(float(budget) * total - 1e-9))
    return min(total, int(budget))


def _parse_bytes(v: int | str | None, what: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, str):
        s = v.strip().upper().replace("IB", "B")
        units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40, "B": 1}
        for u, mult in units.items():
            if s.endswith(u):
                try:
                    return int(float(s[: -len(u)]) * mult)
                except ValueError:
                    break
        try:
            return int(s)
        except ValueError:
            raise ConfigError(f"{what}: cannot parse {v!r}; use bytes or a size like '256MB'") from None
    if int(v) < 0:
        raise ConfigError(f"{what} must be >= 0, got {v}")
    return int(v)


def _float_array(x: Any, what: str) -> np.ndarray:
    """``x`` (numpy, CPU torch tensor or nested lists of any float dtype) as a float32 array."""
    if is_torch(x):
        if x.device.type != "cpu":
            from .exceptions import DeviceError

            raise DeviceError(f"{what} is on {x.device}; the store runs on the CPU ({what}.cpu())")
        return x.detach().float().numpy()
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise DTypeError(f"{what}: expected a floating-point array, got {x.dtype}")
    return x.astype(np.float32, copy=False)


def _as_kv(x: Any, what: str, kv_heads: int, head_dim: int) -> np.ndarray:
    x = _float_array(x, what)
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3 or x.shape[0] != kv_heads or x.shape[2] != head_dim:
        raise ShapeError(
            f"{what}: expected shape [kv_heads={kv_heads}, t, head_dim={head_dim}], got {tuple(x.shape)}"
        )
    return np.ascontiguousarray(x)


@dataclass(frozen=True)
class Page:
    """One page as read from the store.

    Attributes:
        k_codes: uint8 ``[kv_heads, tokens, k_code_bytes]``.
        v_codes: uint8 ``[kv_heads, tokens, v_code_bytes]``.
        k_fp16: float16 ``[kv_heads, tokens, head_dim]`` or None (``keep_full_precision=False``).
        v_fp16: float16 ``[kv_heads, tokens, head_dim]`` or None.
        tokens: tokens in the page (``page_size`` except for the last, open page).
    """

    k_codes: np.ndarray
    v_codes: np.ndarray
    k_fp16: np.ndarray | None
    v_fp16: np.ndarray | None
    tokens: int


def _window_f16(window_dtype: Any) -> bool:
    """``window_dtype`` (``"float16"`` / ``"float32"``, or the torch / numpy dtype) as the
    store's flag."""
    name = str(window_dtype).removeprefix("torch.")
    if name not in ("float16", "float32"):
        raise ConfigError(f'window_dtype must be "float16" or "float32", got {window_dtype!r}')
    return name == "float16"


class KVStore:
    """Paged, PQ-compressed KV storage for ``layers`` x ``kv_heads`` x ``head_dim``.

    Args:
        layers, kv_heads, head_dim: model shape.
        page_size: tokens per page.
        window: recent tokens kept in full precision (not yet encoded), in ``window_dtype``.
        sinks: leading tokens kept in float32 forever.
        bits: average bits per stored K/V element (1, 2, 4 or 8), mapped by :func:`bits_to_pq`;
            or give ``k_m, k_nbits, v_m, v_nbits`` explicitly.
        keep_full_precision: also keep an fp16 copy of K/V in each page (for exact re-ranking).
        window_dtype: ``"float32"`` (default: the window exact) or ``"float16"`` (half the
            window's bytes; K/V values beyond float16's range, ``|x| > 65504``, are a
            :class:`~ctxcore.exceptions.ConfigError`; what :class:`ctxcore.CompressedCache`
            uses by default). Tokens pass through it before they are encoded.
        abstracts: keep each page's abstract (per KV head, min, max and mean of the keys:
            ``config["abstract_bytes"]`` of RAM per page) for ``method="quest"`` and
            :meth:`abstracts`. With False (what :class:`ctxcore.CompressedCache` does unless
            ``select=`` is given) those raise :class:`~ctxcore.exceptions.ConfigError`.
        batch: number of sequences at construction (``config["batch"]``); :meth:`select_seqs`
            may change it later, see :attr:`batch`.
        ram_budget: bytes (or a size string like ``"256MB"``) for everything held in RAM;
            None = unbounded. Below the fixed minimum (``config["min_ram_budget"]``) raises
            :class:`~ctxcore.exceptions.RamBudgetError`.
        offload_dir: directory of the disk tier (checked writable at construction).
        max_disk_bytes: cap on the disk tier's size.
        model_id: identity of the model, checked when a saved context is loaded.
    """

    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        page_size: int = 64,
        window: int = 128,
        sinks: int = 4,
        bits: float = 4,
        *,
        k_m: int | None = None,
        k_nbits: int | None = None,
        v_m: int | None = None,
        v_nbits: int | None = None,
        keep_full_precision: bool = False,
        window_dtype: str = "float32",
        abstracts: bool = True,
        batch: int = 1,
        ram_budget: int | str | None = None,
        offload_dir: str | os.PathLike | None = None,
        max_disk_bytes: int | str | None = None,
        model_id: str = "",
        _inner: Any = None,
    ) -> None:
        #: Where pages declared but not fetched yet come from (a shared context loaded from
        #: Redis, see :mod:`ctxcore.shared`); None once every page is here.
        self._lazy: Any = None
        if _inner is not None:
            self._s = _inner
            self.metadata: dict = {}
            return
        for name, v in (
            ("layers", layers),
            ("kv_heads", kv_heads),
            ("head_dim", head_dim),
            ("page_size", page_size),
            ("batch", batch),
            ("window", window),
            ("sinks", sinks),
        ):
            if int(v) < 0:
                raise ConfigError(f"{name} must be >= 0, got {v}")
        (km, kb), (vm, vb) = bits_to_pq(bits, head_dim) if (k_m is None or v_m is None) else ((0, 4), (0, 4))
        self._s = _ctxcore.KVStore(
            int(layers), int(kv_heads), int(head_dim), int(page_size), int(window), int(sinks),
            int(k_m if k_m is not None else km), int(k_nbits if k_nbits is not None else kb),
            int(v_m if v_m is not None else vm), int(v_nbits if v_nbits is not None else vb),
            bool(keep_full_precision), int(batch), _parse_bytes(ram_budget, "ram_budget"),
            None if offload_dir is None else os.fspath(offload_dir),
            _parse_bytes(max_disk_bytes, "max_disk_bytes"), str(model_id),
            window_f16=_window_f16(window_dtype), abstracts=bool(abstracts),
        )  # fmt: skip
        self.metadata = {}

    # -- configuration -----------------------------------------------------------------------
    @property
    def config(self) -> dict:
        """Configuration, plus ``page_bytes``, ``abstract_bytes`` and ``min_ram_budget``.

        ``config["batch"]`` is the batch the store was created (or saved) with; the current
        number of sequences is :attr:`batch`."""
        return self._s.config

    @property
    def batch(self) -> int:
        """Current number of sequences (``config["batch"]`` until :meth:`select_seqs`)."""
        return self._s.batch

    def __repr__(self) -> str:
        c = self.config
        return (
            f"KVStore(layers={c['layers']}, kv_heads={c['kv_heads']}, head_dim={c['head_dim']}, "
            f"page_size={c['page_size']}, window={c['window']}, sinks={c['sinks']}, "
            f"ram_budget={c['ram_budget']})"
        )

    # -- codebooks -----------------------------------------------------------------------------
    def set_codebooks(self, layer: int, keys: list[ProductQuantizer], values: list[ProductQuantizer]) -> None:
        """Set one layer's codebooks: a trained quantizer per KV head for keys and for values."""
        self._s.set_codebooks(int(layer), [q._codec for q in keys], [q._codec for q in values])

    def calibrate(self, layer: int, k: Any, v: Any, iters: int = 25, seed: int = 0) -> None:
        """Train and set the codebooks of ``layer`` from sample keys/values ``[kv_heads, n, head_dim]``."""
        c = self.config
        k = _as_kv(k, "keys", c["kv_heads"], c["head_dim"])
        v = _as_kv(v, "values", c["kv_heads"], c["head_dim"])
        kq, vq = [], []
        for h in range(c["kv_heads"]):
            a = ProductQuantizer(c["head_dim"], c["k_m"], c["k_nbits"])
            a.train(k[h], iters=iters, seed=seed)
            b = ProductQuantizer(c["head_dim"], c["v_m"], c["v_nbits"])
            b.train(v[h], iters=iters, seed=seed)
            kq.append(a)
            vq.append(b)
        self.set_codebooks(layer, kq, vq)

    def codebooks(self, layer: int) -> tuple[np.ndarray, np.ndarray] | None:
        """``(k_centroids, v_centroids)`` float32 ``[kv_heads, m, 2**nbits, head_dim // m]`` of
        ``layer`` (the layout :func:`ctxcore.ops.pq_attention` takes), or None if not set."""
        return self._s.codebooks(int(layer))

    def has_codebooks(self, layer: int) -> bool:
        """Whether ``layer`` has codebooks."""
        return self._s.has_codebooks(int(layer))

    # -- data ----------------------------------------------------------------------------------
    def append(self, layer: int, k: Any, v: Any, seq: int = 0) -> None:
        """Append keys/values ``[kv_heads, t, head_dim]`` (numpy or CPU torch; any float dtype).

        Keys are expected after RoPE. Raises NotTrainedError if tokens would be paged before
        the layer has codebooks, NonFiniteError on NaN/Inf; on error nothing is appended.
        """
        c = self.config
        self._s.append(int(seq), int(layer), _as_kv(k, "keys", c["kv_heads"], c["head_dim"]),
                       _as_kv(v, "values", c["kv_heads"], c["head_dim"]))  # fmt: skip

    def num_tokens(self, layer: int, seq: int = 0) -> int:
        """Tokens stored for ``(seq, layer)``."""
        return self._s.num_tokens(int(seq), int(layer))

    def num_pages(self, layer: int, seq: int = 0) -> int:
        """Pages, counting a partially filled last page."""
        return self._s.num_pages(int(seq), int(layer))

    def paged_tokens(self, layer: int, seq: int = 0) -> int:
        """Tokens held in pages (between the sinks and the window)."""
        return self._s.paged_tokens(int(seq), int(layer))

    def page(self, layer: int, idx: int, seq: int = 0) -> Page:
        """Read page ``idx`` (from RAM, or from disk with its checksum verified).

        The arrays are views of one copy of the page's bytes (layout
        ``K codes [H, P, ck] | V codes [H, P, cv] | K fp16 [H, P, D] | V fp16 [H, P, D]``).
        """
        self._fetch(layer)
        blob, t = self._s.page(int(seq), int(layer), int(idx))
        c = self._layout
        h, p, d, ck, cv = c
        kc_end = h * p * ck
        vc_end = kc_end + h * p * cv
        k_codes = blob[:kc_end].reshape(h, p, ck)[:, :t]
        v_codes = blob[kc_end:vc_end].reshape(h, p, cv)[:, :t]
        k_fp = v_fp = None
        if len(blob) > vc_end:
            fp = blob[vc_end:].view("<f2").reshape(2, h, p, d)
            k_fp, v_fp = fp[0, :, :t], fp[1, :, :t]
        return Page(k_codes, v_codes, k_fp, v_fp, t)

    @property
    def _layout(self) -> tuple[int, int, int, int, int]:
        lay = getattr(self, "_layout_cache", None)
        if lay is None:
            c = self.config
            ck = (c["k_m"] * c["k_nbits"] + 7) // 8
            cv = (c["v_m"] * c["v_nbits"] + 7) // 8
            lay = (c["kv_heads"], c["page_size"], c["head_dim"], ck, cv)
            self._layout_cache = lay
        return lay

    def sinks(self, layer: int, seq: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Sink tokens ``(k, v)``, float32 ``[kv_heads, s, head_dim]``."""
        return self._s.full_precision(int(seq), int(layer), "sinks")

    def window(self, layer: int, seq: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Recent window ``(k, v)``, float32 ``[kv_heads, w, head_dim]``."""
        return self._s.full_precision(int(seq), int(layer), "window")

    def abstracts(self, layer: int, seq: int = 0) -> np.ndarray:
        """Page abstracts float32 ``[pages, kv_heads, 3, head_dim]``: min, max, mean of the keys.
        A :class:`~ctxcore.exceptions.ConfigError` on a store without them (``abstracts=False``)."""
        if self.config["abstracts"]:
            self._fetch(layer)
        return self._s.abstracts(int(seq), int(layer))

    def attend(
        self,
        layer: int,
        q: Any,
        seq: int = 0,
        method: str = "dense",
        budget: int | float | None = None,
        scale: float | None = None,
        causal: bool = True,
        start: int = 0,
        fallback: float | None = None,
    ) -> tuple[Any, Any]:
        """Decode attention of ``q`` over this store's context, entirely in Rust.

        Args:
            q: queries ``[Hq, Tq, D]`` or ``[1, Hq, Tq, D]`` (numpy or CPU torch, any float
                dtype; ``Hq`` a multiple of ``kv_heads``). With ``causal`` their own K/V must
                already be appended: they are the window's last ``Tq`` tokens.
            method: ``"dense"``: sinks + window in float32 and every page through its PQ codes
                (:func:`ctxcore.ops.pq_attention` semantics, no page decoded). ``"quest"``:
                per KV head, the pages whose abstracts bound ``q . k`` highest, over their PQ
                codes (or exactly over their fp16 copies where the store keeps them,
                ``keep_full_precision=True``), plus sinks, the open page and the window. Only
                the selected pages are read from the disk tier.
            budget: for ``"quest"``: history tokens to select (int) or a fraction of the paged
                tokens (float in (0, 1]); rounded up to whole pages. Default: everything.
            fallback: for ``"quest"`` over the codes: the exact fallback. Where the abstracts
                bound the attention share the left-out pages could hold above ``fallback``
                (in ``[0, 1)``) for some query row, that KV head attends every page (counted in
                ``stats()["fallbacks"]``). None: off.
            scale: default ``1 / sqrt(D)``.
            start: absolute position of the sequence's first real token (left padding of a
                batch): every token at a position ``< start`` (sinks ``[0, sinks)``, pages
                after them, then the window) gets no attention weight, and pages wholly before
                ``start`` are neither read nor Quest candidates. ``0 <= start <= num_tokens``.
                A query that sees no token (``start`` past its own position with ``causal``)
                returns zeros and ``lse = -inf``.

        Returns:
            ``(out, lse)``: ``out`` like ``q`` (same kind and dtype), ``lse`` float32
            ``[Hq, Tq]`` (``[1, Hq, Tq]`` for 4-D ``q``).
        """
        c = self._static_config
        torch_in = is_torch(q)
        dtype = q.dtype if torch_in else None
        qa = _float_array(q, "q")
        four = qa.ndim == 4
        if four:
            if qa.shape[0] != 1:
                raise ShapeError(f"q: a store holds one sequence per call; got batch {qa.shape[0]}")
            qa = qa[0]
        if qa.ndim != 3 or qa.shape[2] != c["head_dim"]:
            raise ShapeError(f"q: expected [Hq, Tq, head_dim={c['head_dim']}], got {tuple(np.shape(q))}")
        qa = np.ascontiguousarray(qa)
        scale = 1.0 / np.sqrt(c["head_dim"]) if scale is None else float(scale)
        start = int(start)
        if start < 0 or (start > 0 and start > self.num_tokens(layer, seq)):
            raise ConfigError(
                f"start must be in [0, num_tokens={self.num_tokens(layer, seq)}] for sequence {seq}, "
                f"layer {layer}; got {start}"
            )
        if method != "quest":
            pages = 0  # dense reads every page; no budget
        else:
            pages = self._quest_pages(layer, seq, start, budget)
        self._fetch(layer)
        out, lse = self._s.attend(
            int(seq),
            int(layer),
            qa,
            scale,
            bool(causal),
            str(method),
            int(pages),
            start,
            None if fallback is None or method != "quest" else float(fallback),
        )
        if four:
            out, lse = out[None], lse[None]
        if torch_in:
            import torch

            return torch.from_numpy(out).to(dtype), torch.from_numpy(lse)
        return out, lse

    def append_attend(
        self, layer: int, q: Any, k: Any, v: Any, scale: float | None = None, starts: list[int] | None = None
    ) -> tuple[Any, Any]:
        """One decode step of every sequence of ``layer`` in one call: append K/V
        ``[B, kv_heads, Tq, D]`` (``B`` = :attr:`batch`) and attend ``q`` ``[B, Hq, Tq, D]``
        densely over each sequence's whole context, causal over the new tokens (which must fit
        in the window); ``starts[b]`` as ``start`` of :meth:`attend` (default 0). The same
        result as :meth:`append` then :meth:`attend` per sequence, with one snapshot of the
        layer and one kernel call for the batch. On error nothing is appended.

        Returns ``(out, lse)``: ``out`` like ``q`` (same kind and dtype), ``lse`` float32
        ``[B, Hq, Tq]``.
        """
        c = self._static_config
        torch_in = is_torch(q)
        dtype = q.dtype if torch_in else None
        qa = np.ascontiguousarray(_float_array(q, "q"))
        ka = np.ascontiguousarray(_float_array(k, "keys"))
        va = np.ascontiguousarray(_float_array(v, "values"))
        if qa.ndim != 4 or ka.ndim != 4 or qa.shape[3] != c["head_dim"]:
            raise ShapeError(
                f"append_attend: q [B, Hq, Tq, {c['head_dim']}] and k/v [B, kv_heads, Tq, "
                f"{c['head_dim']}] expected, got {tuple(qa.shape)} and {tuple(ka.shape)}"
            )
        starts = [0] * qa.shape[0] if starts is None else [int(x) for x in starts]
        if any(x < 0 for x in starts):
            raise ConfigError(f"starts must be >= 0, got {starts}")
        scale = 1.0 / np.sqrt(c["head_dim"]) if scale is None else float(scale)
        self._fetch(layer)
        out, lse = self._s.append_attend(int(layer), qa, ka, va, scale, starts)
        if torch_in:
            import torch

            return torch.from_numpy(out).to(dtype), torch.from_numpy(lse)
        return out, lse

    @property
    def _static_config(self) -> dict:
        """:attr:`config` read once (everything in it but ``batch`` is fixed at construction)."""
        c = getattr(self, "_config_cache", None)
        if c is None:
            c = self._config_cache = self.config
        return c

    def _quest_pages(self, layer: int, seq: int, start: int, budget: int | float | None) -> int:
        c = self._static_config
        closed = self.paged_tokens(layer, seq) // c["page_size"]
        # Closed pages wholly before `start` are no candidates (budget fractions are of the rest).
        sinks = min(self.num_tokens(layer, seq), c["sinks"])
        closed -= min(max(start - sinks, 0) // c["page_size"], closed)
        if budget is None:
            return closed
        check_budget(budget, "KVStore.attend")
        if isinstance(budget, (float, np.floating)):
            return budget_count(budget, closed, "KVStore.attend")
        return -(-int(budget) // c["page_size"])

    def prefetch(self, layer: int, pages: list[int], seq: int = 0) -> None:
        """Load ``pages`` into RAM in the background, ahead of use."""
        self._fetch(layer)
        self._s.prefetch(int(seq), int(layer), [int(p) for p in pages])

    def _fetch(self, layer: int | None = None) -> None:
        """Read the pages of ``layer`` (None: of every layer) that a shared context declared
        but did not fetch yet; a no-op for every other store."""
        if self._lazy is not None:
            self._lazy.fill(self, layer)

    def evict_all(self) -> None:
        """Move every resident page to the disk tier (frees RAM; data stays readable)."""
        self._s.evict_all()

    def fork(self) -> KVStore:
        """An independent copy of the store, cheap: closed pages are shared copy-on-write (in RAM
        by reference, on disk by reading the same files), sinks, windows, open pages and
        codebooks are copied. The copy spills pages into a private directory of its own.
        ``copy.deepcopy(store)`` does the same."""
        obj = KVStore(0, 0, 0, _inner=self._s.fork())
        obj.metadata = copy.deepcopy(self.metadata)
        obj._lazy = self._lazy  # the copy's pending pages are the same ids, fetched on its own
        return obj

    def __deepcopy__(self, memo: dict) -> KVStore:
        return self.fork()

    def select_seqs(self, indices: Any) -> None:
        """Reorder, repeat or drop sequences, e.g. for beam search.

        Args:
            indices: 1-D integer sequence (list, numpy array or torch LongTensor) of length
                ``new_batch >= 1``, each in ``[0, batch)``; repeats allowed.

        New sequence ``i`` becomes a copy of old sequence ``indices[i]`` in every layer (token
        count, sinks, window and partially filled page copied; closed pages, immutable, are
        shared rather than copied, so appending to one copy never affects another). Pages no
        sequence references any more are released from RAM. Saved ``token_ids`` /
        ``chunk_hashes`` in :attr:`metadata` are reordered the same way. On error
        (ConfigError for a bad index, RamBudgetError if the new batch's full-precision part
        exceeds ``ram_budget``) nothing changes.
        """
        if is_torch(indices):
            indices = indices.detach().cpu().numpy()
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise ConfigError(f"indices must be a 1-D integer sequence, got {idx.dtype} of shape {idx.shape}")
        batch = self.batch
        if idx.size == 0:
            raise ConfigError("select_seqs needs at least one sequence index: the batch cannot become empty")
        bad = idx[(idx < 0) | (idx >= batch)]
        if bad.size:
            raise ConfigError(
                f"select_seqs: sequence index {int(bad[0])} out of range: the store holds batch={batch}"
            )
        sel = [int(i) for i in idx]
        self._s.select_seqs(sel)
        for key in ("token_ids", "chunk_hashes"):
            old = self.metadata.get(key)
            if isinstance(old, list) and len(old) == batch:
                self.metadata[key] = [list(old[i]) for i in sel]

    def crop(self, n: int, seq: int | None = None, layer: int | None = None) -> None:
        """Remove the last ``n`` tokens of ``(seq, layer)``; None = every sequence / layer.

        Only tokens still in full precision can be removed: at most the window's tokens, or,
        while nothing of a sequence is paged yet, its window and then its sinks. Older tokens
        are already PQ-coded in pages, so a larger ``n`` raises ConfigError naming the maximum.
        Every targeted ``(seq, layer)`` is checked before any is cropped: on error nothing
        changes.
        """
        if int(n) < 0:
            raise ConfigError(f"n must be >= 0, got {n}")
        seqs = range(self.batch) if seq is None else [int(seq)]
        layers = range(self.config["layers"]) if layer is None else [int(layer)]
        if any(x < 0 for x in (*seqs, *layers)):
            raise ConfigError(f"seq and layer must be >= 0, got seq={seq}, layer={layer}")
        self._s.crop(int(n), [(s, lay) for s in seqs for lay in layers])

    def truncate_to_pages(self, n_pages: int) -> None:
        """Keep only the sinks and the first ``n_pages`` closed pages of every sequence and
        layer (window and open page dropped): the page-aligned prefix of ``sinks + n_pages *
        page_size`` tokens, e.g. the part of a loaded context a new prompt shares. ConfigError
        (nothing changed) if some layer has fewer closed pages."""
        if int(n_pages) < 0:
            raise ConfigError(f"n_pages must be >= 0, got {n_pages}")
        self._s.truncate_to_pages(int(n_pages))
        n = self.num_tokens(0) if self.batch == 1 else None
        ids = self.metadata.get("token_ids")
        if n is not None and isinstance(ids, list) and ids:
            self.metadata["token_ids"] = [list(ids[0][:n])]
        self.metadata.pop("chunk_hashes", None)

    def stats(self) -> dict:
        """Counters (hits, misses, prefetched, prefetch_requested, evictions, bytes_read, fallbacks,
        bytes_written) and
        ``ram_bytes`` (everything counted against the budget), ``ram_page_bytes``,
        ``disk_bytes``, ``pages`` (closed pages in use; a page shared by several sequences after
        :meth:`select_seqs` counts once)."""
        return self._s.stats()

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, token_ids: Any = None, metadata: dict | None = None) -> None:
        """Save the context to directory ``path`` (atomically replacing an earlier save).

        ``token_ids`` (per sequence, or one list for batch 1) are saved with their chained
        chunk hashes (:func:`ctxcore.chunk_tokens` with ``page_size`` and ``model_id``) so a
        later prompt can be matched against the saved prefix. ``metadata``: JSON-serializable.
        """
        meta = dict(self.metadata)
        if metadata:
            meta.update(metadata)
        if token_ids is not None:
            from .chunking import chunk_tokens

            seqs = token_ids if (len(token_ids) and np.ndim(token_ids[0]) == 1) else [token_ids]
            c = self.config
            meta["token_ids"] = [[int(t) for t in np.asarray(s).reshape(-1)] for s in seqs]
            meta["chunk_hashes"] = [
                [ch.hash for ch in chunk_tokens(s, c["page_size"], c["model_id"])] for s in meta["token_ids"]
            ]
        try:
            blob = json.dumps(meta).encode()
        except TypeError as e:
            raise ConfigError(f"metadata must be JSON-serializable: {e}") from e
        self._fetch()
        self._s.save(os.fspath(path), blob)
        self.metadata = meta

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        ram_budget: int | str | None = None,
        offload_dir: str | os.PathLike | None = None,
        max_disk_bytes: int | str | None = None,
        model_id: str | None = None,
        layers: int | None = None,
        kv_heads: int | None = None,
        head_dim: int | None = None,
    ) -> KVStore:
        """Load a saved context. Pages are read lazily (checksum verified on first read).

        ``model_id``, ``layers``, ``kv_heads``, ``head_dim``: what the caller expects; a saved
        context that differs raises :class:`~ctxcore.exceptions.ContextMismatchError` naming
        both sides. Corrupt or missing files raise CorruptDataError / FormatVersionError /
        CtxcoreIOError naming the file.
        """
        p = Path(path)
        inner, extra = _ctxcore.KVStore.load(
            os.fspath(p), _parse_bytes(ram_budget, "ram_budget"),
            None if offload_dir is None else os.fspath(offload_dir),
            _parse_bytes(max_disk_bytes, "max_disk_bytes"), model_id, layers, kv_heads, head_dim,
        )  # fmt: skip
        obj = cls(0, 0, 0, _inner=inner)
        try:
            obj.metadata = json.loads(bytes(extra).decode()) if extra else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            obj.metadata = {}
        return obj

    def matching_prefix(self, token_ids: Any, seq: int = 0) -> int:
        """Tokens of ``token_ids`` whose leading page-aligned chunks match the saved context."""
        from .chunking import chunk_tokens

        hashes = self.metadata.get("chunk_hashes")
        if not hashes:
            return 0
        saved = hashes[seq]
        c = self.config
        n = 0
        for i, ch in enumerate(chunk_tokens(token_ids, c["page_size"], c["model_id"])):
            if i >= len(saved) or saved[i] != ch.hash:
                break
            n = ch.end
        return n
