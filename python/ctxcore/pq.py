"""Product quantization of vectors (the codec that compresses KV vectors).

A vector of ``dim`` floats is cut into ``m`` sub-vectors of ``dsub = dim // m`` floats, and each
sub-vector is stored as the index of its nearest centroid in a codebook of ``2**nbits``
centroids trained per subspace with k-means. With ``nbits=8`` a code is ``m`` bytes; with
``nbits=4`` two indices share a byte (subquantizer ``j`` in the low nibble of byte ``j // 2``
when ``j`` is even, the high nibble when odd), so a code is ``ceil(m / 2)`` bytes.

Bits per element are ``m * nbits / dim``: for ``dim=64``, ``m=64, nbits=4`` and ``m=32, nbits=8``
store 4 bits per element; ``m=16, nbits=8`` and ``m=32, nbits=4`` store 2.

Example:

>>> import numpy as np, ctxcore
>>> x = np.random.default_rng(0).standard_normal((2000, 64)).astype(np.float32)
>>> pq = ctxcore.ProductQuantizer(dim=64, m=16, nbits=8)
>>> pq.train(x, iters=10, seed=0)
>>> codes = pq.encode(x)
>>> codes.shape, codes.dtype
((2000, 16), dtype('uint8'))
>>> y = pq.decode(codes)
>>> bool(((x - y) ** 2).mean() < 0.5 * (x ** 2).mean())
True
>>> s = pq.inner_products(x[:3], codes)
>>> s.shape, bool(np.allclose(s, x[:3] @ y.T, rtol=1e-4, atol=1e-3))
((3, 2000), True)
>>> ctxcore.ProductQuantizer.from_bytes(pq.to_bytes()) == pq
True
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _ctxcore
from ._convert import as_2d, like

__all__ = ["ProductQuantizer"]


class ProductQuantizer:
    """Product quantizer with ``m`` subquantizers of ``2**nbits`` centroids each.

    Args:
        dim: vector dimension (e.g. the attention head_dim).
        m: number of subquantizers; must divide ``dim``.
        nbits: bits per subquantizer code, 4 or 8.

    Raises:
        ConfigError: ``dim % m != 0``, ``m`` out of range, or ``nbits`` not in {4, 8}.

    Inputs may be numpy arrays or CPU torch tensors (float32 vectors, uint8 codes). Outputs are
    numpy arrays, or torch tensors when the (first) input was a tensor. Non-contiguous inputs are
    copied; inputs of another dtype raise :class:`~ctxcore.exceptions.DTypeError`. All work runs
    in Rust with the GIL released, on ``ctxcore.get_num_threads()`` threads.
    """

    __slots__ = ("_codec",)

    def __init__(self, dim: int, m: int, nbits: int = 8) -> None:
        self._codec = _ctxcore.PQCodec(int(dim), int(m), int(nbits))

    # -- properties ---------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Vector dimension."""
        return self._codec.dim

    @property
    def m(self) -> int:
        """Number of subquantizers."""
        return self._codec.m

    @property
    def nbits(self) -> int:
        """Bits per subquantizer code (4 or 8)."""
        return self._codec.nbits

    @property
    def dsub(self) -> int:
        """Dimensions per subquantizer (``dim // m``)."""
        return self._codec.dsub

    @property
    def ksub(self) -> int:
        """Centroids per subquantizer (``2**nbits``)."""
        return self._codec.ksub

    @property
    def code_bytes(self) -> int:
        """Bytes per encoded vector (``ceil(m * nbits / 8)``)."""
        return self._codec.code_bytes

    @property
    def bits_per_element(self) -> float:
        """Stored bits per vector element, codebooks not counted (``m * nbits / dim``)."""
        return self.m * self.nbits / self.dim

    @property
    def codebook_bytes(self) -> int:
        """Bytes of the float32 codebooks (``4 * m * ksub * dsub``)."""
        return 4 * self.m * self.ksub * self.dsub

    @property
    def is_trained(self) -> bool:
        """Whether the codebooks are trained."""
        return self._codec.is_trained

    def compact(self) -> ProductQuantizer:
        """A copy holding its centroids in float16 and computing their norms per call, as a
        :class:`ctxcore.KVStore` holds its codebooks: about half the bytes; codes, decoding and
        scores are those of the float16-rounded centroids (computed in float32)."""
        obj = type(self).__new__(type(self))
        obj._codec = self._codec.compact()
        return obj

    @property
    def centroids(self) -> np.ndarray | None:
        """A copy of the codebooks, float32 ``[m, 2**nbits, dim // m]``; None before training."""
        return self._codec.centroids

    # -- codec --------------------------------------------------------------------------------
    def train(self, x: Any, iters: int = 25, seed: int = 0) -> None:
        """Train the codebooks with k-means (k-means++ seeding) on float32 ``[n, dim]``.

        Deterministic for a given ``x``, ``iters`` and ``seed``, whatever the thread count.
        When ``n > 256 * 2**nbits`` a deterministic random subset of that size is used.

        Raises:
            InsufficientDataError: ``n < 2**nbits``.
            NonFiniteError: ``x`` contains NaN or Inf.
            ShapeError / DTypeError / DeviceError: ``x`` is not a CPU float32 ``[n, dim]`` array.
        """
        if int(iters) < 0:
            from .exceptions import ConfigError

            raise ConfigError(f"iters must be >= 0, got {iters}")
        if int(seed) < 0:
            from .exceptions import ConfigError

            raise ConfigError(f"seed must be >= 0, got {seed}")
        arr = as_2d(x, "train input", np.float32, self.dim)
        self._codec.train(arr, int(iters), int(seed) & 0xFFFFFFFFFFFFFFFF)

    def encode(self, x: Any) -> Any:
        """Encode float32 ``[n, dim]`` into uint8 codes ``[n, code_bytes]``.

        Raises:
            NotTrainedError: before ``train``.
            NonFiniteError: ``x`` contains NaN or Inf.
        """
        arr = as_2d(x, "encode input", np.float32, self.dim)
        return like(self._codec.encode(arr), x)

    def decode(self, codes: Any) -> Any:
        """Decode uint8 codes ``[n, code_bytes]`` into float32 vectors ``[n, dim]``."""
        arr = as_2d(codes, "codes", np.uint8, self.code_bytes, "code_bytes")
        return like(self._codec.decode(arr), codes)

    def inner_products(self, q: Any, codes: Any, *, fast: bool = False) -> Any:
        """Scores float32 ``[nq, n]``: ``q @ decode(codes).T``, computed from lookup tables.

        Args:
            q: float32 queries ``[nq, dim]``.
            codes: uint8 codes ``[n, code_bytes]``.
            fast: for 4-bit codes, scan with 8-bit quantized tables (faiss-style fast scan,
                several times faster). Each score is then within ``m * max_span / 510`` of the
                exact one, ``max_span`` being the widest range of a subquantizer's table, which
                is fine for ranking/selection but not for exact attention. 8-bit codes are
                always scored exactly.
        """
        return self._scores(q, codes, "ip", fast)

    def l2_distances(self, q: Any, codes: Any, *, fast: bool = False) -> Any:
        """Squared L2 distances float32 ``[nq, n]`` between ``q`` and ``decode(codes)``.

        ``fast`` as in :meth:`inner_products`.
        """
        return self._scores(q, codes, "l2", fast)

    def lookup_tables(self, q: Any, metric: str = "ip") -> Any:
        """Per-subquantizer lookup tables float32 ``[nq, m, 2**nbits]`` (metric "ip" or "l2")."""
        arr = as_2d(q, "queries", np.float32, self.dim)
        return like(self._codec.lookup_tables(arr, metric), q)

    def _scores(self, q: Any, codes: Any, metric: str, fast: bool) -> Any:
        qa = as_2d(q, "queries", np.float32, self.dim)
        ca = as_2d(codes, "codes", np.uint8, self.code_bytes, "code_bytes")
        return like(self._codec.scores(qa, ca, metric, bool(fast)), q)

    # -- serialization ------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Versioned, checksummed bytes holding the configuration and codebooks."""
        return self._codec.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> ProductQuantizer:
        """Rebuild a quantizer from :meth:`to_bytes` output.

        Raises:
            CorruptDataError: truncated data, bad magic, length or checksum mismatch.
            FormatVersionError: data written by an incompatible format version.
        """
        obj = cls.__new__(cls)
        obj._codec = _ctxcore.PQCodec.from_bytes(bytes(data))
        return obj

    def __getstate__(self) -> bytes:
        return self.to_bytes()

    def __setstate__(self, state: bytes) -> None:
        self._codec = _ctxcore.PQCodec.from_bytes(state)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ProductQuantizer):
            return NotImplemented
        return self.to_bytes() == other.to_bytes()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        state = "trained" if self.is_trained else "untrained"
        return (
            f"ProductQuantizer(dim={self.dim}, m={self.m}, nbits={self.nbits}, "
            f"code_bytes={self.code_bytes}, {state})"
        )
