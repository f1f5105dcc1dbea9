"""ctxcore: long contexts for PyTorch language models.

The KV cache is compressed with product quantization, kept in fixed-size pages that spill from
a RAM budget to disk, and attention is computed over the compressed pages (Rust on the CPU,
CUDA on NVIDIA GPUs).
"""

from __future__ import annotations

from . import exceptions
from ._ctxcore import __version__, cpu_has_avx2, cpu_simd, get_num_threads, set_num_threads
from .chunking import TokenChunk, chunk_tokens, matching_prefix_tokens
from .exceptions import CtxcoreError
from .pq import ProductQuantizer
from .store import KVStore, Page, bits_to_pq

# Lazily imported (they need torch / transformers; ``import ctxcore`` alone does not).
_LAZY = {
    "CompressedCache": "cache",
    "enable": "attention",
    "disable": "attention",
    "load_default_model": "models",
}


def __getattr__(name: str):  # noqa: ANN202 - module attribute hook
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'ctxcore' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "CompressedCache",
    "disable",
    "enable",
    "load_default_model",
    "KVStore",
    "Page",
    "bits_to_pq",
    "__version__",
    "CtxcoreError",
    "ProductQuantizer",
    "TokenChunk",
    "chunk_tokens",
    "cpu_has_avx2",
    "cpu_simd",
    "exceptions",
    "get_num_threads",
    "matching_prefix_tokens",
    "set_num_threads",
]


def _register_attention() -> None:
    """Register the ``"ctxcore"`` attention implementation (and its mask function) with
    transformers, so ``from_pretrained(..., attn_implementation="ctxcore")`` and
    ``model.set_attn_implementation("ctxcore")`` work after ``import ctxcore`` (``enable``
    remains a shortcut). Nothing happens where torch or transformers is not installed."""
    import importlib.util

    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        return
    from .attention import _register

    _register()


_register_attention()
