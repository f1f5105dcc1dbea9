"""Torch custom ops for attention over PQ-compressed KV, and page/token selection helpers.

Importing this module (it imports torch; ``import ctxcore`` alone does not) registers two ops in
the ``ctxcore`` namespace, each with a fake (meta) implementation so ``torch.compile`` can trace
them and ``torch.library.opcheck`` passes:

``torch.ops.ctxcore.pq_attention(q, k_codes, v_codes, k_centroids, v_centroids, code_range,
fp_k, fp_v, fp_range, scale, causal) -> (out, lse)``
    Softmax attention of ``q`` over a history stored as PQ codes followed by a full-precision
    part (sinks and recent window), computed on the codes without decompressing them:

    * ``q`` ``[B, Hq, Tq, D]`` float32 / bfloat16 / float16;
    * ``k_codes`` uint8 ``[B, Hkv, N, ck]``, ``v_codes`` uint8 ``[B, Hkv, N, cv]``; 4-bit codes
      pack subquantizer ``j`` in byte ``j // 2`` (low nibble when ``j`` is even), as
      :class:`ctxcore.ProductQuantizer` writes them;
    * ``k_centroids`` / ``v_centroids`` float ``[Hkv, m, 16 or 256, D // m]`` (one
      :attr:`ctxcore.ProductQuantizer.centroids` per KV head, stacked);
    * ``code_range`` int64/int32 ``[B, 2]``: valid code tokens ``[start, end)`` per sequence
      (``start > 0`` skips left padding);
    * ``fp_k`` / ``fp_v`` ``[B, Hkv, F, D]`` in q's dtype family: full-precision tokens,
      positionally after the codes; ``fp_range`` ``[B, 2]`` as ``code_range``;
    * ``causal``: the last ``Tq`` valid fp tokens are the queries' own positions, so query ``t``
      sees fp tokens up to ``fp_end - Tq + t`` (inclusive); every code token is visible.

    Returns ``out`` ``[B, Hq, Tq, D]`` in q's dtype and ``lse`` float32 ``[B, Hq, Tq]`` (natural
    log-sum-exp of the scaled scores; ``-inf`` with a zero output for a query that sees
    nothing). GQA: query head ``i`` uses KV head ``i // (Hq // Hkv)``. Computation is in float32.

``torch.ops.ctxcore.page_scores(q, kmin, kmax) -> scores``
    Quest upper bounds ``[B, Hkv, P]`` float32: ``sum_d max(q_d * kmin_d, q_d * kmax_d)`` per page,
    maximized over the query heads of the KV head's group and over the query tokens, from
    ``q`` ``[B, Hq, Tq, D]`` and per-page key bounds ``kmin, kmax`` ``[B, Hkv, P, D]``.

``torch.ops.ctxcore.pq_encode(x, centroids) -> codes``
    PQ codes uint8 ``[B, H, N, code_bytes]`` of ``x [B, H, N, D]`` with per-head codebooks
    ``centroids [H, m, 16 or 256, D // m]`` (nearest centroid, ties to the lowest index).

``torch.ops.ctxcore.gather_pages(src, pages, page_size) -> out``
    The tokens of selected pages: ``out [B, H, K * page_size, D]`` with
    ``out[b, h, i * page_size + t] = src[b, h, pages[b, h, i] * page_size + t]``; zeros past the
    end of ``src`` and for page id ``-1`` (so select full pages, or mask the padding).

Every op runs on CPU tensors (Rust, GIL released, ``ctxcore.get_num_threads()`` threads) and on
CUDA tensors (ctxcore's CUDA kernels on torch's current stream, outputs allocated by torch on
the tensors' device, no host round trip), with the same semantics; the CPU kernels are the
reference. All tensors of a call must be on one device, except ``code_range`` / ``fp_range``,
which may stay on the CPU (they are then checked on the host; on the GPU, ranges outside the
tensors are clipped to them). A CUDA tensor given to a build without CUDA kernels, on a machine
without a driver or on a GPU older than compute capability 8.0 raises
:class:`~ctxcore.exceptions.DeviceError`, as do other devices. Bad dtypes raise
:class:`~ctxcore.exceptions.DTypeError`, bad shapes :class:`~ctxcore.exceptions.ShapeError`,
inconsistent head counts or codebooks :class:`~ctxcore.exceptions.ConfigError`.

Plain-Python conveniences: :func:`pq_attention` (keyword arguments and defaults),
:func:`page_scores`, :func:`pq_encode`, :func:`gather_pages`, :func:`quest_attention` and
:func:`page_bounds` (Quest over K/V tensors on any device), :func:`select_pages` (Quest),
:func:`select_tokens_pq` (PQCache), :func:`cuda_available`. Attention over a
:class:`ctxcore.KVStore` is :meth:`ctxcore.KVStore.attend` (one Rust call).

Example (random codes are valid codes; the result equals softmax attention over the decoded
keys and values):

>>> import torch, ctxcore.ops as ops
>>> g = torch.Generator().manual_seed(0)
>>> q = torch.randn(1, 4, 1, 8, generator=g)                      # [B, Hq, Tq, D]
>>> kc = torch.randint(0, 256, (1, 2, 10, 4), dtype=torch.uint8, generator=g)  # 8 x 4-bit
>>> vc = torch.randint(0, 256, (1, 2, 10, 4), dtype=torch.uint8, generator=g)
>>> cent = torch.randn(2, 8, 16, 1, generator=g)                  # [Hkv, m, 16, D // m]
>>> out, lse = ops.pq_attention(q, kc, vc, cent, cent)
>>> out.shape, lse.shape
(torch.Size([1, 4, 1, 8]), torch.Size([1, 4, 1]))
>>> k, v = ops.decode_codes(kc, cent), ops.decode_codes(vc, cent)  # [B, Hkv, N, D]
>>> ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
>>> bool(torch.allclose(out, ref, atol=1e-5))
True
"""

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import _ctxcore
from .exceptions import ConfigError, DeviceError, DTypeError, ShapeError
from .store import budget_count as _budget

__all__ = [
    "cuda_available",
    "decode_codes",
    "gather_pages",
    "page_bounds",
    "page_scores",
    "paged_attention",
    "pq_attention",
    "pq_encode",
    "pq_paged_attention",
    "pq_token_scores",
    "quest_attention",
    "select_pages",
    "select_tokens_pq",
]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


# -- validation (shared by the real and the fake implementations) ----------------------------
def _check_device(op: str, **tensors: torch.Tensor) -> torch.device:
    """The one device of ``tensors`` (CPU or CUDA); DeviceError for mixed or other devices."""
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        where = ", ".join(f"{w} on {t.device}" for w, t in tensors.items())
        raise DeviceError(f"{op}: tensors are on different devices ({where}); move them to one device")
    dev = devices.pop() if devices else torch.device("cpu")
    if dev.type not in ("cpu", "cuda", "meta"):
        what = next(iter(tensors))
        raise DeviceError(
            f"{op}: {what} is on {dev}, but ctxcore's kernels run on CPU and CUDA tensors only; "
            f"pass CPU tensors ({what}.cpu())"
        )
    return dev


def _require_cpu(op: str, **tensors: torch.Tensor) -> None:
    for what, t in tensors.items():
        if t.device.type != "cpu":
            raise DeviceError(
                f"{op}: {what} is on {t.device}, but this runs on the CPU only; pass CPU tensors "
                f"({what}.cpu())"
            )


def cuda_available(device: int | torch.device | None = None) -> bool:
    """Whether ctxcore's CUDA kernels can run on ``device`` (default: torch's current CUDA device):
    this build has them, torch sees a GPU, and the driver loads them on it (compute capability
    8.0 or newer)."""
    if not _ctxcore.cuda_compiled() or not torch.cuda.is_available():
        return False
    dev = torch.device("cuda", device) if isinstance(device, int) else device
    try:
        _ctxcore.cuda_device_info(_ordinal(dev))
    except DeviceError:
        return False
    return True


def _ordinal(dev: torch.device | None) -> int:
    if dev is None or dev.index is None:
        return torch.cuda.current_device()
    return dev.index


def _stream(dev: torch.device) -> int:
    return torch.cuda.current_stream(dev).cuda_stream


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _check_float(what: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOATS:
        raise DTypeError(
            f"{what}: expected float32, bfloat16 or float16, got {t.dtype}; convert with .float()"
        )


def _check_rank(what: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if t.dim() != rank:
        raise ShapeError(f"{what}: expected a {rank}-D tensor {layout}, got shape {tuple(t.shape)}")


def _nbits(what: str, ksub: int) -> int:
    if ksub == 16:
        return 4
    if ksub == 256:
        return 8
    raise ConfigError(f"{what}: codebooks must have 16 (4-bit) or 256 (8-bit) centroids, got {ksub}")


def _check_pq_attention(q, k_codes, v_codes, k_centroids, v_centroids, code_range, fp_k, fp_v, fp_range):
    _check_rank("q", q, 4, "[B, Hq, Tq, D]")
    _check_float("q", q)
    b, hq, _, d = q.shape
    for what, t, lay in (
        ("k_codes", k_codes, "[B, Hkv, N, k_code_bytes]"),
        ("v_codes", v_codes, "[B, Hkv, N, v_code_bytes]"),
        ("k_centroids", k_centroids, "[Hkv, k_m, ksub, D // k_m]"),
        ("v_centroids", v_centroids, "[Hkv, v_m, ksub, D // v_m]"),
        ("fp_k", fp_k, "[B, Hkv, F, D]"),
        ("fp_v", fp_v, "[B, Hkv, F, D]"),
    ):
        _check_rank(what, t, 4, lay)
    for what, t in (("k_codes", k_codes), ("v_codes", v_codes)):
        if t.dtype != torch.uint8:
            raise DTypeError(f"{what}: expected uint8 PQ codes, got {t.dtype}; convert with .to(torch.uint8)")
    for what, t in (
        ("k_centroids", k_centroids),
        ("v_centroids", v_centroids),
        ("fp_k", fp_k),
        ("fp_v", fp_v),
    ):
        _check_float(what, t)
    for what, t in (("code_range", code_range), ("fp_range", fp_range)):
        if t.dtype not in (torch.int64, torch.int32):
            raise DTypeError(f"{what}: expected int64 (or int32) [B, 2] bounds, got {t.dtype}")
        if t.dim() != 2 or t.shape[0] != b or t.shape[1] != 2:
            raise ShapeError(
                f"{what}: expected shape [B={b}, 2] ([start, end) per sequence), got {tuple(t.shape)}"
            )
    hkv = k_codes.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ConfigError(
            f"query heads ({hq}) must be a multiple of KV heads ({hkv}, from k_codes.shape[1]) for GQA"
        )
    n = k_codes.shape[2]
    if k_codes.shape[0] != b:
        raise ShapeError(f"k_codes: batch {k_codes.shape[0]} != q batch {b}")
    if tuple(v_codes.shape[:3]) != (b, hkv, n):
        raise ShapeError(
            f"v_codes: expected [B={b}, Hkv={hkv}, N={n}, v_code_bytes] like k_codes, "
            f"got {tuple(v_codes.shape)}"
        )
    for what, codes, cent in (("k", k_codes, k_centroids), ("v", v_codes, v_centroids)):
        if cent.shape[0] != hkv:
            raise ConfigError(
                f"{what}_centroids has codebooks for {cent.shape[0]} KV heads, but {what}_codes has "
                f"{hkv} KV heads (one codebook per KV head expected)"
            )
        m, ksub, dsub = cent.shape[1], cent.shape[2], cent.shape[3]
        nbits = _nbits(f"{what}_centroids", ksub)
        if m * dsub != d:
            raise ShapeError(
                f"{what}_centroids: m={m} subquantizers of {dsub} dims cover {m * dsub} dims, "
                f"but head_dim D={d}"
            )
        want = (m * nbits + 7) // 8
        if codes.shape[3] != want:
            raise ShapeError(
                f"{what}_codes has {codes.shape[3]} bytes per token, but {what}_centroids (m={m}, "
                f"nbits={nbits}) need {want}"
            )
    f = fp_k.shape[2]
    for what, t in (("fp_k", fp_k), ("fp_v", fp_v)):
        if tuple(t.shape) != (b, hkv, f, d):
            raise ShapeError(f"{what}: expected shape [B={b}, Hkv={hkv}, F={f}, D={d}], got {tuple(t.shape)}")


def _np(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """C-contiguous numpy view of a CPU tensor (zero-copy when dtype and layout already match)."""
    return t.detach().to(dtype).contiguous().numpy()


def _out_lse(q: torch.Tensor, out: np.ndarray, lse: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """A CPU kernel's float32 ``(out, lse)`` as tensors, ``out`` in q's dtype."""
    return torch.from_numpy(out).to(q.dtype), torch.from_numpy(lse)


def _empty_out_lse(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake-kernel outputs of the attention ops: ``out`` like q, ``lse`` float32 ``[B, Hq, Tq]``."""
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


# -- ops ------------------------------------------------------------------------------------
@torch.library.custom_op(
    "ctxcore::pq_attention",
    mutates_args=(),
    schema=(
        "(Tensor q, Tensor k_codes, Tensor v_codes, Tensor k_centroids, Tensor v_centroids, "
        "Tensor code_range, Tensor fp_k, Tensor fp_v, Tensor fp_range, float scale, bool causal) "
        "-> (Tensor out, Tensor lse)"
    ),
)
def _pq_attention_op(
    q, k_codes, v_codes, k_centroids, v_centroids, code_range, fp_k, fp_v, fp_range, scale, causal
):
    _require_cpu(
        "pq_attention",
        q=q,
        k_codes=k_codes,
        v_codes=v_codes,
        k_centroids=k_centroids,
        v_centroids=v_centroids,
        code_range=code_range,
        fp_k=fp_k,
        fp_v=fp_v,
        fp_range=fp_range,
    )
    _check_pq_attention(q, k_codes, v_codes, k_centroids, v_centroids, code_range, fp_k, fp_v, fp_range)
    f32, i64, u8 = torch.float32, torch.int64, torch.uint8
    out, lse = _ctxcore.pq_attention(
        _np(q, f32),
        _np(k_codes, u8),
        _np(v_codes, u8),
        _np(k_centroids, f32),
        _np(v_centroids, f32),
        _np(code_range, i64),
        _np(fp_k, f32),
        _np(fp_v, f32),
        _np(fp_range, i64),
        float(scale),
        bool(causal),
    )
    return _out_lse(q, out, lse)


@_pq_attention_op.register_fake
def _(q, k_codes, v_codes, k_centroids, v_centroids, code_range, fp_k, fp_v, fp_range, scale, causal):
    _check_pq_attention(q, k_codes, v_codes, k_centroids, v_centroids, code_range, fp_k, fp_v, fp_range)
    return _empty_out_lse(q)


def _check_pq_paged(q, k_codes, v_codes, k_centroids, v_centroids, pages, page_size, fp_k, fp_v, fp_range):
    b = q.shape[0] if q.dim() == 4 else 0
    no_range = torch.zeros((b, 2), dtype=torch.int64)
    _check_pq_attention(q, k_codes, v_codes, k_centroids, v_centroids, no_range, fp_k, fp_v, fp_range)
    _check_gather(k_codes, pages, page_size)


def _check_page_ids(pages: torch.Tensor, n: int, page_size: int) -> None:
    """Ids in range and distinct per (sequence, KV head) (the CUDA path; the CPU kernel checks
    its own): a repeated id would count its tokens twice."""
    count = (n + page_size - 1) // page_size
    p = pages.long()
    if bool((p >= count).any()):
        raise ConfigError(f"page id out of range: {n} tokens in pages of {page_size} make {count} pages")
    srt = p.sort(dim=-1).values
    if bool(((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any()):
        raise ConfigError("a page id appears twice for one (sequence, KV head); ids must be distinct")


@torch.library.custom_op(
    "ctxcore::pq_paged_attention",
    mutates_args=(),
    schema=(
        "(Tensor q, Tensor k_codes, Tensor v_codes, Tensor k_centroids, Tensor v_centroids, "
        "Tensor pages, int page_size, Tensor fp_k, Tensor fp_v, Tensor fp_range, float scale, "
        "bool causal) -> (Tensor out, Tensor lse)"
    ),
)
def _pq_paged_attention_op(
    q, k_codes, v_codes, k_centroids, v_centroids, pages, page_size, fp_k, fp_v, fp_range, scale, causal
):
    _require_cpu(
        "pq_paged_attention",
        q=q,
        k_codes=k_codes,
        v_codes=v_codes,
        k_centroids=k_centroids,
        v_centroids=v_centroids,
        pages=pages,
        fp_k=fp_k,
        fp_v=fp_v,
        fp_range=fp_range,
    )
    _check_pq_paged(q, k_codes, v_codes, k_centroids, v_centroids, pages, page_size, fp_k, fp_v, fp_range)
    f32, i64, u8 = torch.float32, torch.int64, torch.uint8
    out, lse = _ctxcore.pq_paged_attention(
        _np(q, f32),
        _np(k_codes, u8),
        _np(v_codes, u8),
        _np(k_centroids, f32),
        _np(v_centroids, f32),
        _np(pages, i64),
        int(page_size),
        _np(fp_k, f32),
        _np(fp_v, f32),
        _np(fp_range, i64),
        float(scale),
        bool(causal),
    )
    return _out_lse(q, out, lse)


@_pq_paged_attention_op.register_fake
def _(q, k_codes, v_codes, k_centroids, v_centroids, pages, page_size, fp_k, fp_v, fp_range, scale, causal):
    _check_pq_paged(q, k_codes, v_codes, k_centroids, v_centroids, pages, page_size, fp_k, fp_v, fp_range)
    return _empty_out_lse(q)


def _check_page_scores(q, kmin, kmax):
    _check_rank("q", q, 4, "[B, Hq, Tq, D]")
    _check_rank("kmin", kmin, 4, "[B, Hkv, P, D]")
    for what, t in (("q", q), ("kmin", kmin), ("kmax", kmax)):
        _check_float(what, t)
    if tuple(kmax.shape) != tuple(kmin.shape):
        raise ShapeError(f"kmax: expected the shape of kmin {tuple(kmin.shape)}, got {tuple(kmax.shape)}")
    b, hq, _, d = q.shape
    if kmin.shape[0] != b or kmin.shape[3] != d:
        raise ShapeError(f"kmin/kmax: expected [B={b}, Hkv, P, D={d}], got {tuple(kmin.shape)}")
    hkv = kmin.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ConfigError(f"query heads ({hq}) must be a multiple of KV heads ({hkv}, from kmin.shape[1])")


@torch.library.custom_op(
    "ctxcore::page_scores", mutates_args=(), schema="(Tensor q, Tensor kmin, Tensor kmax) -> Tensor"
)
def _page_scores_op(q, kmin, kmax):
    _require_cpu("page_scores", q=q, kmin=kmin, kmax=kmax)
    _check_page_scores(q, kmin, kmax)
    f32 = torch.float32
    return torch.from_numpy(_ctxcore.page_scores(_np(q, f32), _np(kmin, f32), _np(kmax, f32)))


@_page_scores_op.register_fake
def _(q, kmin, kmax):
    _check_page_scores(q, kmin, kmax)
    return q.new_empty((kmin.shape[0], kmin.shape[1], kmin.shape[2]), dtype=torch.float32)


def _check_pq_encode(x, centroids):
    _check_rank("x", x, 4, "[B, H, N, D]")
    _check_rank("centroids", centroids, 4, "[H, m, ksub, D // m]")
    _check_float("x", x)
    _check_float("centroids", centroids)
    h, m, ksub, dsub = centroids.shape
    nbits = _nbits("centroids", ksub)
    if h != x.shape[1] or m * dsub != x.shape[3]:
        raise ShapeError(
            f"centroids: expected [H={x.shape[1]}, m, ksub, D // m] covering D={x.shape[3]}, "
            f"got {tuple(centroids.shape)}"
        )
    return (m * nbits + 7) // 8


@torch.library.custom_op(
    "ctxcore::pq_encode", mutates_args=(), schema="(Tensor x, Tensor centroids) -> Tensor"
)
def _pq_encode_op(x, centroids):
    _require_cpu("pq_encode", x=x, centroids=centroids)
    _check_pq_encode(x, centroids)
    f32 = torch.float32
    return torch.from_numpy(_ctxcore.pq_encode(_np(x, f32), _np(centroids, f32)))


@_pq_encode_op.register_fake
def _(x, centroids):
    cb = _check_pq_encode(x, centroids)
    return x.new_empty((*x.shape[:3], cb), dtype=torch.uint8)


def _check_gather(src, pages, page_size):
    _check_rank("src", src, 4, "[B, H, N, D]")
    _check_rank("pages", pages, 3, "[B, H, K]")
    if pages.dtype not in (torch.int64, torch.int32):
        raise DTypeError(f"pages: expected int64 page ids, got {pages.dtype}")
    if tuple(pages.shape[:2]) != tuple(src.shape[:2]):
        raise ShapeError(f"pages: expected [B={src.shape[0]}, H={src.shape[1]}, K], got {tuple(pages.shape)}")
    if page_size < 1:
        raise ConfigError(f"page_size must be >= 1, got {page_size}")


@torch.library.custom_op(
    "ctxcore::gather_pages", mutates_args=(), schema="(Tensor src, Tensor pages, int page_size) -> Tensor"
)
def _gather_pages_op(src, pages, page_size):
    _require_cpu("gather_pages", src=src, pages=pages)
    _check_gather(src, pages, page_size)
    b, h, n, d = src.shape
    k = pages.shape[2]
    tok = (pages.long().unsqueeze(-1) * page_size + torch.arange(page_size)).reshape(b, h, k * page_size)
    valid = (pages.long().unsqueeze(-1) >= 0).expand(b, h, k, page_size).reshape(b, h, -1) & (tok < n)
    idx = torch.where(valid, tok, 0).unsqueeze(-1).expand(b, h, k * page_size, d)
    if n == 0:
        return src.new_zeros((b, h, k * page_size, d))
    out = src.gather(2, idx)
    return out.masked_fill(~valid.unsqueeze(-1), 0)


@_gather_pages_op.register_fake
def _(src, pages, page_size):
    _check_gather(src, pages, page_size)
    b, h, _, d = src.shape
    return src.new_empty((b, h, pages.shape[2] * page_size, d))


def _check_paged(q, k, v, pages, page_size, fp_k, fp_v, fp_range):
    _check_rank("q", q, 4, "[B, Hq, Tq, D]")
    _check_float("q", q)
    b, hq, _, d = q.shape
    for what, t in (("k", k), ("v", v), ("fp_k", fp_k), ("fp_v", fp_v)):
        _check_rank(what, t, 4, "[B, Hkv, N, D]")
        _check_float(what, t)
    hkv = k.shape[1]
    if tuple(k.shape[:2]) != (b, hkv) or k.shape[3] != d:
        raise ShapeError(f"k: expected [B={b}, Hkv, N, D={d}], got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ShapeError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if hkv == 0 or hq % hkv != 0:
        raise ConfigError(f"query heads ({hq}) must be a multiple of KV heads ({hkv}, from k.shape[1])")
    _check_gather(k, pages, page_size)
    f = fp_k.shape[2]
    for what, t in (("fp_k", fp_k), ("fp_v", fp_v)):
        if tuple(t.shape) != (b, hkv, f, d):
            raise ShapeError(f"{what}: expected shape [B={b}, Hkv={hkv}, F={f}, D={d}], got {tuple(t.shape)}")
    if fp_range.dtype not in (torch.int64, torch.int32):
        raise DTypeError(f"fp_range: expected int64 (or int32) [B, 2] bounds, got {fp_range.dtype}")
    if fp_range.dim() != 2 or tuple(fp_range.shape) != (b, 2):
        raise ShapeError(f"fp_range: expected shape [B={b}, 2], got {tuple(fp_range.shape)}")


@torch.library.custom_op(
    "ctxcore::paged_attention",
    mutates_args=(),
    schema=(
        "(Tensor q, Tensor k, Tensor v, Tensor pages, int page_size, Tensor fp_k, Tensor fp_v, "
        "Tensor fp_range, float scale, bool causal) -> (Tensor out, Tensor lse)"
    ),
)
def _paged_attention_op(q, k, v, pages, page_size, fp_k, fp_v, fp_range, scale, causal):
    _require_cpu("paged_attention", q=q, k=k, v=v, pages=pages, fp_k=fp_k, fp_v=fp_v, fp_range=fp_range)
    _check_paged(q, k, v, pages, page_size, fp_k, fp_v, fp_range)
    f32 = torch.float32
    out, lse = _ctxcore.paged_attention(
        _np(q, f32),
        _np(k, f32),
        _np(v, f32),
        _np(pages, torch.int64),
        int(page_size),
        _np(fp_k, f32),
        _np(fp_v, f32),
        _np(fp_range, torch.int64),
        float(scale),
        bool(causal),
    )
    return _out_lse(q, out, lse)


@_paged_attention_op.register_fake
def _(q, k, v, pages, page_size, fp_k, fp_v, fp_range, scale, causal):
    _check_paged(q, k, v, pages, page_size, fp_k, fp_v, fp_range)
    return _empty_out_lse(q)


# -- CUDA implementations -------------------------------------------------------------------
def _cuda_range(what: str, r: torch.Tensor, cap: int, dev: torch.device) -> torch.Tensor:
    if r.device.type == "cpu":
        for i, (s, e) in enumerate(r.tolist()):
            if not 0 <= s <= e <= cap:
                raise ConfigError(f"sequence {i}: {what} [{s}, {e}) outside [0, {cap}]")
    return r.to(device=dev, dtype=torch.int64).contiguous()


def _pq_attention_cuda(
    q, k_codes, v_codes, k_centroids, v_centroids, code_range, fp_k, fp_v, fp_range, scale, causal
):
    dev = _check_device(
        "pq_attention",
        q=q,
        k_codes=k_codes,
        v_codes=v_codes,
        k_centroids=k_centroids,
        v_centroids=v_centroids,
        fp_k=fp_k,
        fp_v=fp_v,
    )
    _check_pq_attention(q, k_codes, v_codes, k_centroids, v_centroids, code_range, fp_k, fp_v, fp_range)
    cr = _cuda_range("code_range", code_range, k_codes.shape[2], dev)
    return _launch_pq_attention(
        dev, q, k_codes, v_codes, k_centroids, v_centroids, cr, fp_k, fp_v, fp_range, scale, causal
    )


def _pq_paged_attention_cuda(
    q, k_codes, v_codes, k_centroids, v_centroids, pages, page_size, fp_k, fp_v, fp_range, scale, causal
):
    dev = _check_device(
        "pq_paged_attention",
        q=q,
        k_codes=k_codes,
        v_codes=v_codes,
        k_centroids=k_centroids,
        v_centroids=v_centroids,
        pages=pages,
        fp_k=fp_k,
        fp_v=fp_v,
    )
    _check_pq_paged(q, k_codes, v_codes, k_centroids, v_centroids, pages, page_size, fp_k, fp_v, fp_range)
    _check_page_ids(pages, k_codes.shape[2], int(page_size))
    pc = pages.to(device=dev, dtype=torch.int64).contiguous()
    cr = torch.zeros((q.shape[0], 2), dtype=torch.int64, device=dev)
    return _launch_pq_attention(
        dev,
        q,
        k_codes,
        v_codes,
        k_centroids,
        v_centroids,
        cr,
        fp_k,
        fp_v,
        fp_range,
        scale,
        causal,
        paged=(pc, int(page_size)),
    )


def _launch_pq_attention(
    dev, q, k_codes, v_codes, k_centroids, v_centroids, cr, fp_k, fp_v, fp_range, scale, causal, paged=None
):
    """Enqueue the CUDA attention kernel (dense, or over the pages ``paged = (ids, page_size)``)."""
    if not math.isfinite(scale):
        raise ConfigError(f"scale must be finite, got {scale}")
    b, hq, tq, d = q.shape
    hkv, n = k_codes.shape[1], k_codes.shape[2]
    f = fp_k.shape[2]
    dt = q.dtype
    qc = q.contiguous()
    kc, vc = k_codes.contiguous(), v_codes.contiguous()
    kcent = k_centroids.to(torch.float32).contiguous()
    vcent = v_centroids.to(torch.float32).contiguous()
    fk, fv = fp_k.to(dt).contiguous(), fp_v.to(dt).contiguous()
    fr = _cuda_range("fp_range", fp_range, f, dev)
    out = torch.empty((b, hq, tq, d), dtype=dt, device=dev)
    lse = torch.empty((b, hq, tq), dtype=torch.float32, device=dev)
    km, kbits = kcent.shape[1], _nbits("k_centroids", kcent.shape[2])
    vm, vbits = vcent.shape[1], _nbits("v_centroids", vcent.shape[2])
    dims = [b, hq, hkv, tq, d, n, f, km, kbits, vm, vbits]
    tensors = [qc, kc, vc, kcent, vcent, cr, fk, fv, fr, out, lse]
    if paged is not None:
        dims += [paged[0].shape[2], paged[1]]
        tensors.append(paged[0])
    ordinal, name = _ordinal(dev), _dtype_name(dt)
    nbytes = _ctxcore.cuda_pq_attention_work_bytes(ordinal, dims, name, float(scale), bool(causal))
    work = torch.empty(max(1, nbytes // 4), dtype=torch.float32, device=dev)
    ptrs = [t.data_ptr() for t in tensors]
    _ctxcore.cuda_pq_attention(
        ordinal, _stream(dev), dims, name, float(scale), bool(causal), ptrs, work.data_ptr()
    )
    return out, lse


def _page_scores_cuda(q, kmin, kmax):
    dev = _check_device("page_scores", q=q, kmin=kmin, kmax=kmax)
    _check_page_scores(q, kmin, kmax)
    b, hq, tq, d = q.shape
    hkv, p = kmin.shape[1], kmin.shape[2]
    qc, lo, hi = q.contiguous(), kmin.to(q.dtype).contiguous(), kmax.to(q.dtype).contiguous()
    scores = torch.empty((b, hkv, p), dtype=torch.float32, device=dev)
    ptrs = [t.data_ptr() for t in (qc, lo, hi, scores)]
    _ctxcore.cuda_page_scores(_ordinal(dev), _stream(dev), [b, hq, hkv, tq, p, d], _dtype_name(q.dtype), ptrs)
    return scores


def _pq_encode_cuda(x, centroids):
    dev = _check_device("pq_encode", x=x, centroids=centroids)
    cb = _check_pq_encode(x, centroids)
    b, h, n, d = x.shape
    m, ksub = centroids.shape[1], centroids.shape[2]
    xc, cent = x.contiguous(), centroids.to(torch.float32).contiguous()
    codes = torch.empty((b, h, n, cb), dtype=torch.uint8, device=dev)
    dims = [b, h, n, d, m, _nbits("centroids", ksub)]
    ptrs = [xc.data_ptr(), cent.data_ptr(), codes.data_ptr()]
    _ctxcore.cuda_pq_encode(_ordinal(dev), _stream(dev), dims, _dtype_name(x.dtype), ptrs)
    return codes


def _gather_pages_cuda(src, pages, page_size):
    dev = _check_device("gather_pages", src=src, pages=pages)
    _check_gather(src, pages, page_size)
    b, h, n, d = src.shape
    k = pages.shape[2]
    sc, pc = src.contiguous(), pages.to(torch.int64).contiguous()
    out = torch.empty((b, h, k * page_size, d), dtype=src.dtype, device=dev)
    dims = [b, h, n, d, k, page_size, src.element_size()]
    _ctxcore.cuda_page_gather(
        _ordinal(dev), _stream(dev), dims, [sc.data_ptr(), pc.data_ptr(), out.data_ptr()]
    )
    return out


# The CUDA kernels of the ops. They are plain functions of the tensors' device; the tests also
# run them on CPU tensors through the CPU emulation of the kernels (CTXCORE_CUDA_EMULATOR).
def _paged_attention_composed(q, k, v, pages, page_size, fp_k, fp_v, fp_range, scale, causal):
    """paged_attention from device-generic pieces (the CUDA implementation): the selected pages
    are gathered (ctxcore's gather kernel) and attended with torch matmuls under a validity mask,
    the full-precision part with ``pq_attention``; the two are merged by log-sum-exp."""
    _check_device("paged_attention", q=q, k=k, v=v, pages=pages, fp_k=fp_k, fp_v=fp_v)
    _check_paged(q, k, v, pages, page_size, fp_k, fp_v, fp_range)
    if not math.isfinite(scale):
        raise ConfigError(f"scale must be finite, got {scale}")
    b, hq, tq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    pages = pages.long()
    count = (n + page_size - 1) // page_size
    if bool((pages >= count).any()):
        raise ConfigError(f"page id out of range: {n} tokens in pages of {page_size} make {count} pages")
    srt = pages.sort(dim=-1).values
    if bool(((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any()):
        raise ConfigError("a page id appears twice for one (sequence, KV head); ids must be distinct")
    f32 = torch.float32
    rows_k = torch.ops.ctxcore.gather_pages(k, pages, page_size).to(f32)
    rows_v = torch.ops.ctxcore.gather_pages(v, pages, page_size).to(f32)
    tok = pages.unsqueeze(-1) * page_size + torch.arange(page_size, device=pages.device)
    valid = ((pages.unsqueeze(-1) >= 0) & (tok < n)).reshape(b, hkv, 1, -1)
    qf = q.to(f32).reshape(b, hkv, g * tq, d)
    sc = (qf @ rows_k.transpose(-1, -2)) * scale
    sc = sc.masked_fill(~valid, float("-inf"))
    lse1 = torch.logsumexp(sc, dim=-1)
    p = torch.exp(sc - torch.where(torch.isfinite(lse1), lse1, 0.0).unsqueeze(-1))
    o1 = p @ rows_v
    empty_books = q.new_zeros((hkv, d, 16, 1), dtype=f32)
    no_codes = _empty_codes(b, hkv, empty_books, q.device)
    o2, lse2 = torch.ops.ctxcore.pq_attention(
        q,
        no_codes,
        no_codes,
        empty_books,
        empty_books,
        torch.zeros((b, 2), dtype=torch.int64, device=fp_range.device),
        fp_k,
        fp_v,
        fp_range,
        scale,
        causal,
    )
    lse2 = lse2.reshape(b, hkv, g * tq)
    lse = torch.logaddexp(lse1, lse2)
    safe = torch.where(torch.isfinite(lse), lse, 0.0)
    w1 = torch.where(torch.isfinite(lse1), torch.exp(lse1 - safe), 0.0).unsqueeze(-1)
    w2 = torch.where(torch.isfinite(lse2), torch.exp(lse2 - safe), 0.0).unsqueeze(-1)
    out = w1 * o1 + w2 * o2.to(f32).reshape(b, hkv, g * tq, d)
    return out.reshape(b, hq, tq, d).to(q.dtype), lse.reshape(b, hq, tq)


_pq_attention_op.register_kernel("cuda")(_pq_attention_cuda)
_pq_paged_attention_op.register_kernel("cuda")(_pq_paged_attention_cuda)
_paged_attention_op.register_kernel("cuda")(_paged_attention_composed)
_page_scores_op.register_kernel("cuda")(_page_scores_cuda)
_pq_encode_op.register_kernel("cuda")(_pq_encode_cuda)
_gather_pages_op.register_kernel("cuda")(_gather_pages_cuda)


# -- conveniences ---------------------------------------------------------------------------
def _full_range(b: int, n: int) -> torch.Tensor:
    r = torch.zeros(b, 2, dtype=torch.int64)
    r[:, 1] = n
    return r


def _as_range(r: Any, b: int, n: int, what: str) -> torch.Tensor:
    if r is None:
        return _full_range(b, n)
    if not isinstance(r, torch.Tensor):
        r = torch.as_tensor(np.asarray(r, dtype=np.int64))
    if r.dim() == 1 and r.numel() == 2:
        r = r.expand(b, 2)
    return r


def pq_attention(
    q: torch.Tensor,
    k_codes: torch.Tensor | None = None,
    v_codes: torch.Tensor | None = None,
    k_centroids: torch.Tensor | None = None,
    v_centroids: torch.Tensor | None = None,
    fp_k: torch.Tensor | None = None,
    fp_v: torch.Tensor | None = None,
    *,
    code_range: Any = None,
    fp_range: Any = None,
    scale: float | None = None,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over PQ codes plus a full-precision part; see ``torch.ops.ctxcore.pq_attention``.

    Args:
        q: queries ``[B, Hq, Tq, D]`` (float32, bfloat16 or float16; CPU or CUDA, the other
            tensors on the same device).
        k_codes, v_codes: uint8 ``[B, Hkv, N, ck]`` / ``[B, Hkv, N, cv]``; None (both) for no
            codes (``N = 0``; the centroids may then be None too).
        k_centroids, v_centroids: float ``[Hkv, m, 16 or 256, D // m]``.
        fp_k, fp_v: full-precision ``[B, Hkv, F, D]`` after the codes; None for ``F = 0``.
        code_range, fp_range: ``[B, 2]`` valid ``[start, end)`` per sequence (a pair applies to
            every sequence); default: everything.
        scale: score scale; default ``1 / sqrt(D)``.
        causal: the last ``Tq`` valid fp tokens are the queries' own positions.

    Returns:
        ``(out [B, Hq, Tq, D] in q's dtype, lse [B, Hq, Tq] float32)``.

    Raises:
        DeviceError: tensors on different devices, or CUDA tensors where ctxcore's CUDA kernels
            cannot run (see :func:`cuda_available`).
        DTypeError, ShapeError, ConfigError: inconsistent inputs (checked before any work).
    """
    if not isinstance(q, torch.Tensor):
        raise DTypeError(f"q: expected a torch.Tensor, got {type(q).__name__}")
    _check_rank("q", q, 4, "[B, Hq, Tq, D]")
    b, hq, _, d = q.shape
    given = {
        n: t
        for n, t in (
            ("q", q),
            ("k_codes", k_codes),
            ("v_codes", v_codes),
            ("k_centroids", k_centroids),
            ("v_centroids", v_centroids),
            ("fp_k", fp_k),
            ("fp_v", fp_v),
        )
        if t is not None
    }
    _check_device("pq_attention", **given)
    if (k_codes is None) != (v_codes is None) or (fp_k is None) != (fp_v is None):
        raise ConfigError("give both k_codes and v_codes (or neither), and both fp_k and fp_v (or neither)")
    if k_codes is not None or fp_k is not None:
        hkv = (k_codes if k_codes is not None else fp_k).shape[1]
    else:
        hkv = k_centroids.shape[0] if k_centroids is not None else hq
    if k_codes is None:
        if k_centroids is None:
            k_centroids = v_centroids = q.new_zeros((hkv, d, 16, 1), dtype=torch.float32)
        if v_centroids is None:
            v_centroids = k_centroids
        k_codes = _empty_codes(b, hkv, k_centroids, q.device)
        v_codes = _empty_codes(b, hkv, v_centroids, q.device)
    elif k_centroids is None or v_centroids is None:
        raise ConfigError("k_centroids and v_centroids are needed to attend over codes")
    if fp_k is None:
        fp_k = fp_v = q.new_zeros((b, hkv, 0, d))
    cr = _as_range(code_range, b, k_codes.shape[2], "code_range")
    fr = _as_range(fp_range, b, fp_k.shape[2], "fp_range")
    s = 1.0 / math.sqrt(d) if scale is None else float(scale)
    return torch.ops.ctxcore.pq_attention(
        q, k_codes, v_codes, k_centroids, v_centroids, cr, fp_k, fp_v, fr, s, bool(causal)
    )


def pq_paged_attention(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    v_codes: torch.Tensor,
    k_centroids: torch.Tensor,
    v_centroids: torch.Tensor,
    pages: torch.Tensor,
    page_size: int = 64,
    fp_k: torch.Tensor | None = None,
    fp_v: torch.Tensor | None = None,
    *,
    fp_range: Any = None,
    scale: float | None = None,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the PQ codes of selected pages only (Quest-style selection over the
    codes, read in place, no gather copy) plus a full-precision part; see
    ``torch.ops.ctxcore.pq_paged_attention``.

    Args:
        q: ``[B, Hq, Tq, D]`` (float32, bfloat16 or float16; CPU or CUDA).
        k_codes, v_codes: uint8 ``[B, Hkv, N, ck]`` / ``[B, Hkv, N, cv]``.
        k_centroids, v_centroids: float ``[Hkv, m, 16 or 256, D // m]``.
        pages: int64 ``[B, Hkv, S]`` distinct page ids per (sequence, KV head); page ``p`` is
            code tokens ``[p * page_size, min((p + 1) * page_size, N))``; negative ids are
            skipped (ragged selections pad with -1).
        fp_k, fp_v: ``[B, Hkv, F, D]`` after the codes (sinks + recent window); None for none.
        fp_range: ``[B, 2]`` valid ``[start, end)`` of the fp part per sequence (default: all).
        scale: default ``1 / sqrt(D)``.
        causal: the last ``Tq`` valid fp tokens are the queries' own positions.

    Returns:
        ``(out [B, Hq, Tq, D] in q's dtype, lse [B, Hq, Tq] float32)``: equal to
        :func:`pq_attention` over the selected pages' codes.
    """
    for what, t in (("q", q), ("k_codes", k_codes), ("v_codes", v_codes), ("pages", pages)):
        if not isinstance(t, torch.Tensor):
            raise DTypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    _check_rank("q", q, 4, "[B, Hq, Tq, D]")
    _check_rank("k_codes", k_codes, 4, "[B, Hkv, N, k_code_bytes]")
    b, _, _, d = q.shape
    if (fp_k is None) != (fp_v is None):
        raise ConfigError("give both fp_k and fp_v (or neither)")
    if fp_k is None:
        fp_k = fp_v = q.new_zeros((b, k_codes.shape[1], 0, d))
    fr = _as_range(fp_range, b, fp_k.shape[2], "fp_range")
    s = 1.0 / math.sqrt(d) if scale is None else float(scale)
    return torch.ops.ctxcore.pq_paged_attention(
        q, k_codes, v_codes, k_centroids, v_centroids, pages, int(page_size), fp_k, fp_v, fr, s, bool(causal)
    )


def _empty_codes(b: int, hkv: int, cent: torch.Tensor, device: Any = None) -> torch.Tensor:
    m, ksub = cent.shape[1], cent.shape[2]
    nbits = 4 if ksub == 16 else 8
    return torch.zeros((b, hkv, 0, (m * nbits + 7) // 8), dtype=torch.uint8, device=device)


def page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest page upper bounds ``[B, Hkv, P]`` float32 from ``q [B, Hq, Tq, D]`` and ``kmin, kmax
    [B, Hkv, P, D]``: for every key ``k`` of a page and every query of the group,
    ``q . k <= score``. CPU or CUDA tensors (one device)."""
    _check_device("page_scores", q=q, kmin=kmin, kmax=kmax)
    return torch.ops.ctxcore.page_scores(q, kmin, kmax)


def pq_encode(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """PQ codes uint8 ``[B, H, N, code_bytes]`` of ``x [B, H, N, D]`` with per-head codebooks
    ``centroids [H, m, 16 or 256, D // m]``: the nearest centroid per subquantizer (4-bit codes
    packed two per byte, as :class:`ctxcore.ProductQuantizer` writes them). CPU or CUDA; the
    inverse is :func:`decode_codes`."""
    _check_device("pq_encode", x=x, centroids=centroids)
    return torch.ops.ctxcore.pq_encode(x, centroids)


def gather_pages(src: torch.Tensor, pages: torch.Tensor, page_size: int) -> torch.Tensor:
    """Tokens of the selected pages of ``src [B, H, N, D]``: ``pages [B, H, K]`` int64 page ids
    (e.g. from :func:`select_pages`) give ``[B, H, K * page_size, D]``; tokens past ``N`` and
    pages ``-1`` read as zeros. CPU or CUDA."""
    _check_device("gather_pages", src=src, pages=pages)
    return torch.ops.ctxcore.gather_pages(src, pages, int(page_size))


def decode_codes(codes: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Decode PQ codes ``[B, H, N, code_bytes]`` uint8 with per-head codebooks
    ``[H, m, 16 or 256, D // m]`` into float32 vectors ``[B, H, N, D]`` (reference, in torch)."""
    _check_rank("codes", codes, 4, "[B, H, N, code_bytes]")
    _check_rank("centroids", centroids, 4, "[H, m, ksub, dsub]")
    b, h, n, _ = codes.shape
    hc, m, ksub, dsub = centroids.shape
    if hc != h:
        raise ConfigError(f"centroids have {hc} heads, codes {h}")
    idx = _unpack(codes, m, _nbits("centroids", ksub))  # [B, H, N, m]
    cent = centroids.float()
    heads = torch.arange(h, device=codes.device).view(1, h, 1, 1)
    sub = torch.arange(m, device=codes.device).view(1, 1, 1, m)
    return cent[heads, sub, idx].reshape(b, h, n, m * dsub)


def _unpack(codes: torch.Tensor, m: int, nbits: int) -> torch.Tensor:
    c = codes.long()
    if nbits == 8:
        return c[..., :m]
    both = torch.stack((c & 15, c >> 4), dim=-1).flatten(-2)
    return both[..., :m]


def select_pages(q: torch.Tensor, abstracts: Any, budget: int | float) -> torch.Tensor:
    """Top-``budget`` pages per (sequence, KV head) by Quest upper bound (:func:`page_scores`).

    Args:
        q: queries ``[B, Hq, Tq, D]`` (or ``[Hq, Tq, D]`` for one sequence).
        abstracts: a ``(kmin, kmax)`` pair of ``[B, Hkv, P, D]``, or page abstracts as
            :meth:`ctxcore.KVStore.abstracts` returns them, ``[P, Hkv, 3, D]`` (one sequence) or
            ``[B, P, Hkv, 3, D]`` (min, max, mean; numpy or torch).
        budget: pages to keep (int), or a fraction of the pages (float in (0, 1]).

    Returns:
        int64 ``[B, Hkv, k]`` page indices, ``k = min(budget, P)``, ascending (position order)
        within each row.
    """
    if q.dim() == 3:
        q = q.unsqueeze(0)
    if isinstance(abstracts, (tuple, list)):
        kmin, kmax = (torch.as_tensor(a) for a in abstracts)
    else:
        a = torch.as_tensor(abstracts)
        if a.dim() == 4:
            a = a.unsqueeze(0)
        if a.dim() != 5 or a.shape[3] < 2:
            raise ShapeError(f"abstracts: expected [P, Hkv, 3, D] or [B, P, Hkv, 3, D], got {tuple(a.shape)}")
        kmin = a[:, :, :, 0].transpose(1, 2)
        kmax = a[:, :, :, 1].transpose(1, 2)
    p = kmin.shape[2] if kmin.dim() == 4 else 0
    k = _budget(budget, p, "select_pages")
    scores = page_scores(q, kmin, kmax)
    return _topk_sorted(scores, k)


def page_bounds(k: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-page key bounds ``(kmin, kmax)`` ``[B, Hkv, N // page_size, D]`` of the full pages of
    ``k [B, Hkv, N, D]`` (compute them once as pages fill, not per step)."""
    _check_rank("k", k, 4, "[B, Hkv, N, D]")
    b, h, n, d = k.shape
    p = n // page_size
    pages = k[:, :, : p * page_size].reshape(b, h, p, page_size, d)
    return pages.amin(dim=3), pages.amax(dim=3)


def quest_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    budget: int | float,
    *,
    page_size: int = 64,
    fp_k: torch.Tensor | None = None,
    fp_v: torch.Tensor | None = None,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quest selective attention over full-precision K/V tensors, on the CPU or a GPU.

    Per (sequence, KV head), the full pages of the history ``k, v [B, Hkv, N, D]`` are ranked by
    their Quest bound (:func:`page_scores` over ``bounds``, default :func:`page_bounds`); the
    top ``ceil(budget / page_size)`` pages are attended exactly where they are
    (:func:`paged_attention`, no gather copy on the CPU) together with the history's last
    partial page and the full-precision part
    ``fp_k, fp_v [B, Hkv, F, D]`` (sinks + recent window; with ``causal``, its last ``Tq``
    tokens are the queries' own positions). Every op runs on the tensors' device: on a GPU,
    ctxcore's CUDA kernels with ``torch.topk`` between them; nothing goes through the host.

    Args:
        q: ``[B, Hq, Tq, D]``; k, v: ``[B, Hkv, N, D]`` in q's dtype family.
        budget: history tokens to attend (int), or a fraction of the full pages (float in
            (0, 1]); a budget covering every page gives exact attention.
        bounds: precomputed :func:`page_bounds` ``(kmin, kmax)`` (recommended: they change only
            when a page fills).

    Returns:
        ``(out [B, Hq, Tq, D] in q's dtype, lse [B, Hq, Tq] float32)``.
    """
    _check_rank("k", k, 4, "[B, Hkv, N, D]")
    if v.shape != k.shape:
        raise ShapeError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if page_size < 1:
        raise ConfigError(f"page_size must be >= 1, got {page_size}")
    b, hkv, n, d = k.shape
    full = n // page_size
    if isinstance(budget, float):
        pages = _budget(budget, full, "quest_attention")
    else:
        pages = min(full, math.ceil(_budget(budget, n, "quest_attention") / page_size))
    kmin, kmax = bounds if bounds is not None else page_bounds(k, page_size)
    ids = []
    if pages > 0:
        ids.append(page_scores(q, kmin, kmax).topk(pages, dim=-1, sorted=False).indices)
    if n % page_size:
        # The history's last, partial page is always attended.
        ids.append(torch.full((b, hkv, 1), full, dtype=torch.int64, device=k.device))
    sel = torch.cat(ids, dim=-1) if ids else torch.empty((b, hkv, 0), dtype=torch.int64, device=k.device)
    return paged_attention(q, k, v, sel, page_size, fp_k, fp_v, scale=scale, causal=causal)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pages: torch.Tensor,
    page_size: int = 64,
    fp_k: torch.Tensor | None = None,
    fp_v: torch.Tensor | None = None,
    *,
    fp_range: Any = None,
    scale: float | None = None,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over selected pages of ``k, v`` plus a full-precision part, without
    gathering the pages first; see ``torch.ops.ctxcore.paged_attention``.

    Args:
        q: ``[B, Hq, Tq, D]``; k, v: history ``[B, Hkv, N, D]`` (float32/bfloat16/float16).
        pages: int64 ``[B, Hkv, S]`` distinct page ids per (sequence, KV head); page ``p`` is
            tokens ``[p * page_size, min((p + 1) * page_size, N))``; negative ids are skipped.
        fp_k, fp_v: ``[B, Hkv, F, D]`` after the history (sinks + recent window); None for none.
        fp_range: ``[B, 2]`` valid ``[start, end)`` of the fp part per sequence (default: all).
        scale: default ``1 / sqrt(D)``.
        causal: the last ``Tq`` valid fp tokens are the queries' own positions.

    Returns:
        ``(out [B, Hq, Tq, D] in q's dtype, lse [B, Hq, Tq] float32)``.
    """
    for what, t in (("q", q), ("k", k), ("v", v), ("pages", pages)):
        if not isinstance(t, torch.Tensor):
            raise DTypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    _check_rank("q", q, 4, "[B, Hq, Tq, D]")
    _check_rank("k", k, 4, "[B, Hkv, N, D]")
    b, _, _, d = q.shape
    if (fp_k is None) != (fp_v is None):
        raise ConfigError("give both fp_k and fp_v (or neither)")
    if fp_k is None:
        fp_k = fp_v = k.new_zeros((b, k.shape[1], 0, d))
    fr = _as_range(fp_range, b, fp_k.shape[2], "fp_range")
    s = 1.0 / math.sqrt(d) if scale is None else float(scale)
    return torch.ops.ctxcore.paged_attention(q, k, v, pages, int(page_size), fp_k, fp_v, fr, s, bool(causal))


def _topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    if k >= scores.shape[-1]:
        return torch.arange(scores.shape[-1]).expand(*scores.shape[:-1], -1).contiguous()
    return scores.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values


def _pair_tables(q: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-byte lookup tables ``[B, Hkv, G*Tq, ck, 256]``: the score contribution of each code
    byte value (4-bit tables folded pairwise, as the kernel does)."""
    b, hq, tq, d = q.shape
    hkv, m, ksub, dsub = centroids.shape
    g = hq // hkv
    qs = q.float().reshape(b, hkv, g * tq, m, dsub)
    lut = torch.einsum("bhqmd,hmkd->bhqmk", qs, centroids.float())  # [B, Hkv, G*Tq, m, ksub]
    if ksub == 256:
        return lut, m
    ck = (m + 1) // 2
    even = lut[..., 0::2, :]
    odd = lut[..., 1::2, :]
    if odd.shape[-2] < ck:
        odd = torch.cat((odd, odd.new_zeros((*odd.shape[:-2], 1, 16))), dim=-2)
    # byte value = hi * 16 + lo: lo = even subquantizer, hi = odd one.
    pair = odd.unsqueeze(-1) + even.unsqueeze(-2)  # [..., ck, hi, lo]
    return pair.reshape(*pair.shape[:-2], 256), ck


def pq_token_scores(
    q: torch.Tensor, k_codes: torch.Tensor, k_centroids: Any, *, fast: bool = False, block: int = 32768
) -> torch.Tensor:
    """PQ inner products ``q . decode(code)`` float32 ``[B, Hkv, G*Tq, N]`` (query rows of each KV
    head's group, head-major), from ``q [B, Hq, Tq, D]`` and ``k_codes [B, Hkv, N, ck]``, without
    decoding.

    ``k_centroids``: codebooks ``[Hkv, m, ksub, D // m]`` (scored in torch from per-byte lookup
    tables), or the KV heads' trained :class:`ctxcore.ProductQuantizer` objects (scored in Rust
    with :meth:`~ctxcore.ProductQuantizer.inner_products`, several times faster; ``fast=True``
    then uses the approximate 4-bit fast scan, fine for ranking).
    """
    _require_cpu("pq_token_scores", q=q, k_codes=k_codes)
    _check_rank("q", q, 4, "[B, Hq, Tq, D]")
    _check_rank("k_codes", k_codes, 4, "[B, Hkv, N, ck]")
    if k_codes.dtype != torch.uint8:
        raise DTypeError(f"k_codes: expected uint8, got {k_codes.dtype}")
    b, hkv, n, ck = k_codes.shape
    if q.shape[1] % hkv:
        raise ConfigError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({hkv})")
    if isinstance(k_centroids, (list, tuple)):
        return _pq_scores_rust(q, k_codes, k_centroids, fast)
    _require_cpu("pq_token_scores", k_centroids=k_centroids)
    _check_rank("k_centroids", k_centroids, 4, "[Hkv, m, ksub, D // m]")
    _nbits("k_centroids", k_centroids.shape[2])
    if k_centroids.shape[0] != hkv or k_centroids.shape[1] * k_centroids.shape[3] != q.shape[-1]:
        raise ShapeError(
            f"k_centroids: expected [Hkv={hkv}, m, ksub, D // m] with D={q.shape[-1]}, "
            f"got {tuple(k_centroids.shape)}"
        )
    tables, want = _pair_tables(q, k_centroids)
    if ck != want:
        raise ShapeError(f"k_codes has {ck} bytes per token, the codebooks need {want}")
    rows = tables.shape[2]
    out = torch.empty((b, hkv, rows, n), dtype=torch.float32)
    offs = torch.arange(ck, dtype=torch.int64) * 256
    for bi in range(b):
        for h in range(hkv):
            w = tables[bi, h].reshape(rows, ck * 256).t().contiguous()  # [ck*256, rows]
            for s in range(0, n, block):
                idx = k_codes[bi, h, s : s + block].long() + offs
                out[bi, h, :, s : s + block] = torch.nn.functional.embedding_bag(idx, w, mode="sum").t()
    return out


def _pq_scores_rust(
    q: torch.Tensor, k_codes: torch.Tensor, quantizers: Sequence[Any], fast: bool
) -> torch.Tensor:
    b, hkv, n, _ = k_codes.shape
    if len(quantizers) != hkv:
        raise ConfigError(f"k_centroids: {len(quantizers)} quantizers for {hkv} KV heads")
    g, tq, d = q.shape[1] // hkv, q.shape[2], q.shape[3]
    qs = q.detach().float().reshape(b, hkv, g * tq, d)
    codes = k_codes.detach().contiguous().numpy()
    out = torch.empty((b, hkv, g * tq, n), dtype=torch.float32)
    for bi in range(b):
        for h, pq in enumerate(quantizers):
            rows = np.ascontiguousarray(qs[bi, h].numpy())
            out[bi, h] = torch.from_numpy(pq.inner_products(rows, codes[bi, h], fast=fast))
    return out


def select_tokens_pq(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_centroids: Any,
    budget: int | float,
    *,
    scale: float | None = None,
    fast: bool = False,
) -> torch.Tensor:
    """Top-``budget`` code tokens per (sequence, KV head) by PQ score (PQCache-style).

    Each token's key is scored against every query of the KV head's group from the codes
    (:func:`pq_token_scores`); the scores of each query are turned into log-softmax weights
    (``scale`` default ``1 / sqrt(D)``) so heads with larger norms do not dominate, and a token's
    rank is its largest weight over the group's queries.

    Args:
        q: ``[B, Hq, Tq, D]``; k_codes: uint8 ``[B, Hkv, N, ck]``;
        k_centroids: ``[Hkv, m, 16 or 256, D // m]``, or one trained ProductQuantizer per KV
            head (faster; ``fast`` as in :func:`pq_token_scores`).
        budget: tokens to keep (int), or a fraction of N (float in (0, 1]).

    Returns:
        int64 ``[B, Hkv, k]`` token indices, ``k = min(budget, N)``, ascending within each row.
    """
    if q.dim() == 3:
        q = q.unsqueeze(0)
    n = k_codes.shape[2]
    k = _budget(budget, n, "select_tokens_pq")
    if k >= n:
        return _topk_sorted(torch.zeros(k_codes.shape[:3]), k)
    s = pq_token_scores(q, k_codes, k_centroids, fast=fast)
    s *= 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    s -= s.logsumexp(dim=-1, keepdim=True)
    return _topk_sorted(s.amax(dim=2), k)


# -- over a KVStore -------------------------------------------------------------------------
