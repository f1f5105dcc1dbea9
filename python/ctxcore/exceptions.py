"""Exceptions raised by ctxcore.

Every error ctxcore raises derives from :class:`CtxcoreError`. Each class also derives from the
builtin a caller would naturally catch (``ValueError`` for bad values, ``TypeError`` for bad
dtypes, ``OSError`` for I/O), so ``except ValueError`` keeps working.

The Rust core maps its one ``Error`` enum to these classes in a single place
(``rust/src/py/error.rs``); the class names are part of the public API.

>>> import ctxcore
>>> try:
...     ctxcore.ProductQuantizer(dim=64, m=7)
... except ctxcore.exceptions.ConfigError as e:
...     print(type(e).__name__, isinstance(e, ValueError), isinstance(e, CtxcoreError))
ConfigError True True

Warnings: :class:`SlowPathWarning` (a :class:`CtxcoreWarning`) when ctxcore falls back to a
correct but much slower path.
"""

from __future__ import annotations

__all__ = [
    "CtxcoreError",
    "ConfigError",
    "NotTrainedError",
    "ShapeError",
    "DTypeError",
    "NonFiniteError",
    "InsufficientDataError",
    "CorruptDataError",
    "FormatVersionError",
    "DeviceError",
    "CtxcoreIOError",
    "StoreConnectionError",
    "PageEvictedError",
    "RamBudgetError",
    "ContextMismatchError",
    "InternalError",
    "UnsupportedModelError",
    "CtxcoreWarning",
    "SlowPathWarning",
]


class CtxcoreError(Exception):
    """Base class of every ctxcore error."""


class ConfigError(CtxcoreError, ValueError):
    """An invalid construction parameter, e.g. ``dim % m != 0`` or an unsupported ``nbits``."""


class NotTrainedError(CtxcoreError, RuntimeError):
    """An operation that needs trained codebooks was called before ``train``."""


class ShapeError(CtxcoreError, ValueError):
    """An array had the wrong rank or extent (or could not be viewed contiguously)."""


class DTypeError(CtxcoreError, TypeError):
    """An array had the wrong element type."""


class NonFiniteError(CtxcoreError, ValueError):
    """An input contained NaN or infinity."""


class InsufficientDataError(CtxcoreError, ValueError):
    """Too few vectors to train the requested codebooks."""


class CorruptDataError(CtxcoreError, ValueError):
    """Serialized data failed validation: bad magic, truncation, length or checksum mismatch."""


class FormatVersionError(CorruptDataError):
    """Serialized data has a format version this build cannot read."""


class DeviceError(CtxcoreError, ValueError):
    """A tensor lives on a device this build or operation does not support."""


class CtxcoreIOError(CtxcoreError, OSError):
    """Reading or writing a file failed; the message names the file."""


class StoreConnectionError(CtxcoreIOError):
    """A shared store (e.g. ``redis://...``) could not be reached, refused the credentials, or
    dropped the connection mid-operation; the message names the server (never the password).
    A save it interrupts leaves nothing findable, and what was saved before stays intact."""


class PageEvictedError(CtxcoreIOError):
    """A page of a shared context loaded from a store (e.g. Redis) was gone when it was first
    read: the server evicted it after the context was loaded. Load the context again, which
    takes the longest prefix still complete."""


class RamBudgetError(CtxcoreError, MemoryError):
    """A RAM budget too small for what must stay in RAM; the message states the minimum."""


class ContextMismatchError(CtxcoreError, ValueError):
    """A saved context loaded for a different model, head_dim or configuration."""


class InternalError(CtxcoreError, RuntimeError):
    """A bug in ctxcore (an invariant was violated). Please report it."""


class UnsupportedModelError(ConfigError):
    """The model's architecture is not supported (the message names it and says why)."""


class CtxcoreWarning(UserWarning):
    """Base class of the warnings ctxcore issues."""


class SlowPathWarning(CtxcoreWarning):
    """ctxcore fell back to a correct but much slower path; the message says how to avoid it."""
