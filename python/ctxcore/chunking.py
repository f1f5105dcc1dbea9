"""Token chunking with chained content hashes, so a saved context can be found by its prefix.

A token sequence is cut into chunks of ``chunk_size`` tokens (use the page size of the KV
store); only the last chunk may be shorter. Each chunk's hash covers every token up to its
end: it is the BLAKE3 hash of the previous chunk's hash, the chunk's token count and its
tokens, starting from a root hash of a ``namespace`` such as the model id. Two sequences
share the hash of chunk ``i`` exactly when they share the namespace, the chunk size and the
tokens ``0:end``, so a cache keyed by these hashes finds how much of a new prompt it already
holds with :func:`matching_prefix_tokens`.

The hashes are stable across processes, machines and ctxcore versions (no per-process seed;
the byte format below is persistent and versioned by its domain tag). Integers are
little-endian::

    root = BLAKE3(b"ctxcore.chunk.v1" || u32 len(namespace.encode()) || namespace.encode())
    h_i  = BLAKE3(h_{i-1} || u32 n_i || n_i token ids as u32)      (h_{-1} = root)

Example:

>>> import ctxcore
>>> saved = ctxcore.chunk_tokens(list(range(40)), 16, namespace="SmolLM2-135M")
>>> [(c.start, c.end, len(c)) for c in saved]
[(0, 16, 16), (16, 32, 16), (32, 40, 8)]
>>> saved[0]
TokenChunk(start=0, end=16, hash='...')
>>> prompt = ctxcore.chunk_tokens(list(range(50)), 16, namespace="SmolLM2-135M")
>>> prompt[:2] == saved[:2], prompt[2] == saved[2]
(True, False)
>>> ctxcore.matching_prefix_tokens(prompt, {c.hash for c in saved})
32
>>> ctxcore.chunk_tokens([1, 2, 3, 4, 5], 2, namespace="test-model")[0].hash
'a04a94ad984d80486d83e5b6d3e5bf9a9d8fc81db2818dce66ebdb43e31cc0d4'
"""

from __future__ import annotations

import operator
from collections.abc import Container, Iterable
from typing import Any

import numpy as np

from . import _ctxcore
from ._convert import is_torch
from ._ctxcore import TokenChunk
from .exceptions import ConfigError, DTypeError, ShapeError

__all__ = ["TokenChunk", "chunk_tokens", "matching_prefix_tokens"]

_MAX_ID = 2**32 - 1


def chunk_tokens(token_ids: Any, chunk_size: int, namespace: str = "") -> list[TokenChunk]:
    """Cut token ids into chunks of ``chunk_size`` tokens with chained content hashes.

    Args:
        token_ids: integer token ids ``[T]`` or ``[1, T]``: a list of ints, a numpy integer
            array or a torch integer tensor (any device; it is copied to the CPU). Ids must lie
            in ``[0, 2**32)``.
        chunk_size: tokens per chunk, >= 1; use the page size of the KV store. Hashes are
            comparable only between sequences chunked with the same size.
        namespace: what the token ids mean, e.g. the model or tokenizer id; sequences under
            different namespaces never share a hash.

    Returns:
        ``ceil(T / chunk_size)`` :class:`TokenChunk` objects in order: chunk ``i`` covers
        tokens ``start:end`` (``i * chunk_size`` to ``min(T, (i + 1) * chunk_size)``) and its
        ``hash`` (64 hex digits) covers tokens ``0:end``. The chunks of a prefix of
        ``token_ids`` equal the leading full chunks of ``token_ids``.

    Raises:
        ConfigError: ``chunk_size < 1``, ``namespace`` not a str, or an id outside ``[0, 2**32)``.
        DTypeError: ``token_ids`` are not integers (floats, bools, strings, ...).
        ShapeError: ``token_ids`` is not ``[T]`` or ``[1, T]`` (e.g. a batch of several rows).

    The hashing runs in Rust with the GIL released.
    """
    if isinstance(chunk_size, bool):
        raise ConfigError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    try:
        size = operator.index(chunk_size)
    except TypeError:
        raise ConfigError(
            f"chunk_size must be an int >= 1, got {type(chunk_size).__name__} {chunk_size!r}"
        ) from None
    if size < 1:
        raise ConfigError(f"chunk_size must be >= 1 (use the page size of the KV store), got {size}")
    if size > _MAX_ID:
        raise ConfigError(f"chunk_size must be < 2**32, got {size}")
    if not isinstance(namespace, str):
        raise ConfigError(f"namespace must be a str (e.g. the model id), got {type(namespace).__name__}")
    ids = _as_token_ids(token_ids)
    return _ctxcore.chunk_tokens(ids, size, namespace)


def matching_prefix_tokens(chunks: Iterable[TokenChunk], known_hashes: Container[str]) -> int:
    """Number of tokens covered by the leading chunks whose hashes are in ``known_hashes``.

    This is how much of a new prompt a cache already holds: chunk the prompt with
    :func:`chunk_tokens` (same ``chunk_size`` and ``namespace`` as the saved contexts) and
    pass the hashes the cache has. The run stops at the first unknown chunk, so a cache that
    evicted a middle chunk is not credited with what follows it. 0 if the first chunk is
    unknown or ``chunks`` is empty.

    Args:
        chunks: the chunks of the new prompt, in order, from :func:`chunk_tokens`.
        known_hashes: hex hashes (``TokenChunk.hash``) of saved chunks; any container
            supporting ``in``, e.g. a set or a dict keyed by hash.
    """
    covered = 0
    for c in chunks:
        if c.hash not in known_hashes:
            break
        covered = c.end
    return covered


def _as_token_ids(x: Any) -> np.ndarray:
    """Return token ids as a C-contiguous uint32 ``[T]`` array, or raise a typed error."""
    what = "token_ids"
    if is_torch(x):
        if x.dtype.is_floating_point or x.dtype.is_complex or str(x.dtype) == "torch.bool":
            raise DTypeError(
                f"{what}: expected an integer tensor, got {x.dtype}; token ids are integers "
                "(convert with .long() if the values are whole numbers)"
            )
        x = x.detach().cpu().contiguous().numpy()
    elif not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except (TypeError, ValueError) as e:
            raise DTypeError(f"{what}: could not convert {type(x).__name__} to an integer array: {e}") from e
        if x.size == 0 and x.dtype.kind == "f":
            x = x.astype(np.int64)  # np.asarray([]) is float64
        elif x.dtype == object:
            x = _from_python_ints(x, what)
    if x.dtype.kind not in "iu":
        raise DTypeError(
            f"{what}: expected integer token ids, got dtype {x.dtype}; "
            "convert with .astype(np.int64) if the values are whole numbers"
        )
    if x.ndim == 2 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 1:
        hint = " (chunk one sequence at a time)" if x.ndim == 2 else ""
        raise ShapeError(f"{what}: expected shape [T] or [1, T], got {tuple(x.shape)}{hint}")
    if x.size and (x.dtype.kind == "i" or x.dtype.itemsize > 4):
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > _MAX_ID:
            bad = lo if lo < 0 else hi
            idx = int(np.argmax(x == bad))
            raise ConfigError(f"{what}: token ids must be in [0, 2**32), got {bad} at index {idx}")
    return np.ascontiguousarray(x, dtype=np.uint32)


def _from_python_ints(x: np.ndarray, what: str) -> np.ndarray:
    """An object array (e.g. from ints beyond int64) as int64/uint64, range-checked."""
    flat = x.ravel()
    for i, v in enumerate(flat):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise DTypeError(f"{what}: expected integer token ids, got {type(v).__name__} {v!r}")
        if not 0 <= int(v) <= _MAX_ID:
            raise ConfigError(f"{what}: token ids must be in [0, 2**32), got {int(v)} at index {i}")
    return np.asarray(x.tolist(), dtype=np.int64).reshape(x.shape)
