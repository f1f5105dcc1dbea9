"""Codebooks trained once per model and reused across contexts: the codebook cache.

Training the key codebooks (8-bit k-means over pairs of dimensions, per layer and KV head) is
most of what a fresh :class:`~ctxcore.CompressedCache` adds to the time to the first token. The
keys and values of one model have much the same distribution from one text to the next, so
``CompressedCache(..., codebooks="reuse")`` (the default) trains them on the first context
only and publishes them to a file; later caches of the same model read that file instead of
training.

Reuse is checked per layer, on the context at hand: the stored codebooks' relative quantization
error on a sample of the new K/V (squared error over the sample's variance) must be at most
:data:`FIT_RATIO` times the error they had on their own training sample. A layer that fails the
check (another model with the same shape, random weights, a very different input, or positions
past the stored codebooks' context: keys carry their position's rotation) is trained on its
context. Once every layer has codebooks, the layers trained on more tokens than the stored ones
replace them in the file, so the cache follows the longest contexts seen (codebooks from a 4K
context fail 21 of 30 key checks of a 7K context on SmolLM2, 7-8x their error at worst; shorter
contexts reuse the longer context's codebooks).

What reuse costs, measured on SmolLM2-135M (tinyshakespeare, codebooks from a 4K-token text
200K tokens away): the key codebooks' error on a new 2K-token text is 1.6-2.1x the error they had
on their own text (per-context k-means fits the very tokens it encodes, with 8 points per
centroid), values 1.1-1.8x; another model of the same shape with other weights gives 3.4-4.9x.
Perplexity over 512 scored tokens at 1K-7K was equal on average (+0.94% against DynamicCache
reused, +0.87% trained per context, over seven windows; README), for no training time.

File format (one file per model and codec, ``<key>.ctxcb``): the magic ``CTXCBOOK``, a format
version (u32 LE), the length of a JSON header (u32 LE), the header (model id, codec, per layer
the training errors and the byte lengths of its quantizers), the quantizers' own versioned and
checksummed bytes (:meth:`ctxcore.ProductQuantizer.to_bytes`), and a SHA-256 of everything
before it. Files are written to a temporary name and renamed into place, so a reader sees the
old file or the new one, never half of one; a damaged or foreign file is ignored (and logged) and
replaced by the next context that trains.

The directory is ``$CTXCORE_CACHE_DIR/codebooks``, else ``$XDG_CACHE_HOME/ctxcore/codebooks``,
else ``~/.cache/ctxcore/codebooks``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .exceptions import CorruptDataError, FormatVersionError
from .pq import ProductQuantizer

__all__ = ["FIT_RATIO", "CodebookSet", "LayerBooks", "cache_dir", "relative_error"]

log = logging.getLogger("ctxcore")

MAGIC = b"CTXCBOOK"
FORMAT_VERSION = 1
#: A stored layer is reused when its relative error on the new context is at most this many
#: times its relative error on its own training sample (see the module docs for the measurement
#: behind it).
FIT_RATIO = 3.0
#: Rows per KV head used to measure a relative error (strided over the sample). Measured on
#: SmolLM2 (2K-token contexts, codebooks of another 4K): 128 rows give each layer's error ratio
#: within 3% of all 2,048 rows' (the fit limit is 3x) at a quarter of 512 rows' time.
FIT_ROWS = 128
#: Codebooks trained on fewer tokens per KV head than this are used but not published (they fit
#: their own short context, not the model).
MIN_PUBLISH_TOKENS = 2048


def cache_dir() -> Path:
    """The directory of the codebook cache (see the module docs)."""
    root = os.environ.get("CTXCORE_CACHE_DIR")
    if root:
        return Path(root) / "codebooks"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "ctxcore" / "codebooks"


def set_key(model_id: str, codec: dict) -> str:
    """File stem for a model id and codec (``layers``, ``kv_heads``, ``head_dim``, ``k_m``, ...)."""
    blob = json.dumps({"model_id": model_id, "codec": codec}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def _rows(x: np.ndarray, n: int = FIT_ROWS) -> np.ndarray:
    if x.shape[0] > n:
        x = x[np.linspace(0, x.shape[0] - 1, n).astype(np.int64)]
    return np.ascontiguousarray(x, dtype=np.float32)


def relative_error(books: list[ProductQuantizer], x: np.ndarray) -> float:
    """Quantization error of ``x`` ``[kv_heads, n, head_dim]`` under one quantizer per head:
    the squared error summed over heads, over the sum of the per-dimension variances (on at
    most :data:`FIT_ROWS` rows per head)."""
    sse = sst = 0.0
    for h, q in enumerate(books):
        r = _rows(x[h])
        if r.shape[0] == 0:
            continue
        rec = np.asarray(q.decode(q.encode(r)))
        sse += float(np.square(r - rec, dtype=np.float64).sum())
        sst += float(np.square(r - r.mean(0), dtype=np.float64).sum())
    return sse / sst if sst > 0 else 0.0


@dataclass
class LayerBooks:
    """One layer's quantizers (one per KV head for keys and for values) and their relative
    errors on the sample they were trained on."""

    keys: list[ProductQuantizer]
    values: list[ProductQuantizer]
    k_err: float
    v_err: float
    tokens: int

    def fits(self, k: np.ndarray, v: np.ndarray) -> tuple[bool, float, float]:
        """Whether these codebooks serve ``k``/``v`` ``[kv_heads, n, head_dim]`` about as well as
        their own training data; also returns the two error ratios."""
        rk = relative_error(self.keys, k) / max(self.k_err, 1e-12)
        rv = relative_error(self.values, v) / max(self.v_err, 1e-12)
        return rk <= FIT_RATIO and rv <= FIT_RATIO, rk, rv


@dataclass
class CodebookSet:
    """Every layer's :class:`LayerBooks` for one model and codec."""

    model_id: str
    codec: dict
    layers: list[LayerBooks]

    def to_bytes(self) -> bytes:
        blobs: list[bytes] = []
        layers = []
        for lb in self.layers:
            k = [q.to_bytes() for q in lb.keys]
            v = [q.to_bytes() for q in lb.values]
            blobs += k + v
            layers.append(
                {"k_err": lb.k_err, "v_err": lb.v_err, "tokens": lb.tokens, "k": [len(b) for b in k],
                 "v": [len(b) for b in v]}
            )  # fmt: skip
        header = json.dumps({"model_id": self.model_id, "codec": self.codec, "layers": layers}).encode()
        body = MAGIC + struct.pack("<II", FORMAT_VERSION, len(header)) + header + b"".join(blobs)
        return body + hashlib.sha256(body).digest()

    @classmethod
    def from_bytes(cls, data: bytes) -> CodebookSet:
        """Parse :meth:`to_bytes` output; raises :class:`~ctxcore.exceptions.CorruptDataError`
        or :class:`~ctxcore.exceptions.FormatVersionError`."""
        if len(data) < 16 + 32 or data[:8] != MAGIC:
            raise CorruptDataError("not a ctxcore codebook file (bad magic or truncated)")
        version, hlen = struct.unpack_from("<II", data, 8)
        if version != FORMAT_VERSION:
            raise FormatVersionError(
                f"codebook file format version {version}; this ctxcore reads version {FORMAT_VERSION}"
            )
        body, digest = data[:-32], data[-32:]
        if hashlib.sha256(body).digest() != digest:
            raise CorruptDataError("codebook file checksum mismatch (damaged file)")
        try:
            header = json.loads(body[16 : 16 + hlen])
            pos = 16 + hlen
            layers = []
            for lay in header["layers"]:
                sides = []
                for lens in (lay["k"], lay["v"]):
                    qs = []
                    for n in lens:
                        qs.append(ProductQuantizer.from_bytes(body[pos : pos + n]))
                        pos += n
                    sides.append(qs)
                layers.append(LayerBooks(sides[0], sides[1], float(lay["k_err"]), float(lay["v_err"]),
                                         int(lay["tokens"])))  # fmt: skip
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptDataError(f"codebook file header is malformed: {e}") from e
        if pos != len(body):
            raise CorruptDataError("codebook file has trailing bytes")
        return cls(header["model_id"], header["codec"], layers)

    def save(self, path: Path) -> None:
        """Write atomically (temporary file in the same directory, fsync, rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self.to_bytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    @classmethod
    def load(cls, path: Path) -> CodebookSet:
        return cls.from_bytes(path.read_bytes())


_MEMO: dict[str, tuple[tuple[int, int], CodebookSet]] = {}


def read_set(path: Path, model_id: str, codec: dict) -> CodebookSet | None:
    """The codebook set at ``path`` if it exists, parses and is for ``model_id``/``codec``;
    None otherwise (a damaged or foreign file is logged). Parsed sets are memoized per file
    version (size, mtime)."""
    try:
        st = path.stat()
    except OSError:
        return None
    stamp = (st.st_size, st.st_mtime_ns)
    memo = _MEMO.get(str(path))
    if memo is not None and memo[0] == stamp:
        s = memo[1]
    else:
        try:
            s = CodebookSet.load(path)
        except (OSError, CorruptDataError) as e:
            log.warning("ignoring codebook cache file %s: %s", path, e)
            return None
        _MEMO[str(path)] = (stamp, s)
    if s.model_id != model_id or s.codec != codec or len(s.layers) != codec.get("layers"):
        log.warning("ignoring codebook cache file %s: written for another model or codec", path)
        return None
    return s
