"""Shared contexts in Redis: content-addressed pages, prefix reuse, many workers on one context.

``CompressedCache.save("redis://host:port/db", token_ids=ids)`` and
``CompressedCache.load("redis://...", config, token_ids=ids)`` go through this module (it needs
``pip install "ctxcore[redis]"``). A context is split into self-checking pieces (the Rust core's
``parts`` formats: magic, version, CRC-32) and each piece is keyed by what it holds:

.. code-block:: text

    NS:C:b:B            codebooks of every layer             B = sha256(codebooks)[:32]
    NS:C:p:B:L:H(e)     closed page of layer L ending at token e (coded with B)
    NS:C:s:B:H(sinks)   the leading sink tokens (float32)
    NS:C:t:B:H(T)       tail of a saved context of T tokens: sinks, window, open page, counts
    NS:C:x:H(e)         prefix index: field B -> settings; "every layer of B is stored up to e"
    NS:C:e:H(b)         end index: field "B:T" -> settings and metadata of a saved context
                        whose last closed page ends at b

``NS`` is the namespace (``?namespace=`` in the URL, or ``namespace=``; default ``ctxcore``),
``C`` the codec: model fingerprint, shape, page size, sinks, window and code layout, so
contexts of other models or settings never meet. ``H(e)`` is a chained BLAKE2b hash of the
first ``e`` token ids under ``C``: a page is named by every token up to its end, and a page of a
context depends on nothing else but its codebooks. Page ``j`` ends at
``e = sinks + (j + 1) * page_size``.

**Save** writes only the pieces the server does not hold yet (``SET NX``; two documents with a
common prefix coded with the same codebooks store that prefix once), then the tail, and last,
in one ``MULTI``/``EXEC``, the index entries that make the prefixes findable. A writer that
dies, or a connection that drops, mid-save leaves nothing findable and changes nothing saved
before; two writers saving the same prefix write the same keys.

**Load** hashes the prompt's page boundaries, reads both indexes in one round trip, and takes
the longest saved prefix: a saved context's exact state (its tail) when a whole saved context
starts the prompt, else the longest page-aligned prefix of any saved context with the same
codebooks. Its codebooks and tail are read and verified before the cache exists; its pages are
only checked to exist, and are read lazily, a layer at a time when the model first reaches that
layer (pipelined ``MGET`` batches, the next layer read ahead in the background), each verified
before it is installed (a damaged piece raises :class:`~ctxcore.exceptions.CorruptDataError`);
over the RAM budget, pages spill to the local disk tier as they would after a prefill. A piece
evicted under ``maxmemory`` before ``load`` is a clean miss: the cache holds the longest prefix
still complete (maybe 0 tokens), never one with a hole; a page evicted after ``load``, before
its first read, raises :class:`~ctxcore.exceptions.PageEvictedError`. The cache always leaves
at least one prompt token to prefill, so ``generate(ids, cache=cache)`` (``past_key_values=``
before transformers 5.24) runs the model on the unmatched suffix.

Codebooks are part of every page's identity: a context trained on its own codebooks saves and
loads but shares pages only with contexts that continue from it (a worker that loads a prefix
and saves its longer context adds only its own pages). Contexts whose codebooks come from the
model's codebook cache (``codebooks="reuse"``) share pages with each other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from . import _ctxcore
from .exceptions import ConfigError, CorruptDataError, CtxcoreIOError, PageEvictedError, StoreConnectionError
from .store import KVStore

if TYPE_CHECKING:
    from .cache import CompressedCache

__all__ = ["DEFAULT_NAMESPACE", "is_url", "save", "load", "connect"]

log = logging.getLogger("ctxcore")

#: Key prefix when neither the URL (``?namespace=``) nor the caller names one.
DEFAULT_NAMESPACE = "ctxcore"
_SCHEMES = ("redis", "rediss", "unix")
#: Keys per pipelined MGET / SET batch.
_BATCH = 256


def is_url(target: Any) -> bool:
    """Whether ``target`` names a shared store (``redis://``, ``rediss://``, ``unix://``)."""
    return isinstance(target, str) and target.split("://", 1)[0].lower() in _SCHEMES and "://" in target


@dataclass
class _Conn:
    client: Any
    ns: str
    #: The URL without its password, for messages.
    where: str


def _redact(url: str) -> str:
    """``url`` without credentials or query, for messages."""
    u = urlsplit(url)
    return urlunsplit((u.scheme, u.netloc.rpartition("@")[2], u.path, "", ""))


@contextmanager
def _errors(where: str, doing: str) -> Iterator[None]:
    """Map redis-py's errors to ctxcore's typed ones, naming the server but not the password."""
    import redis

    try:
        yield
    except (redis.AuthenticationError, redis.exceptions.AuthorizationError) as e:
        raise StoreConnectionError(
            f"{where}: authentication failed while {doing} ({e}); put the right user and password "
            "in the URL, e.g. redis://:PASSWORD@host:6379/0"
        ) from e
    except (redis.ConnectionError, redis.TimeoutError) as e:
        raise StoreConnectionError(f"{where}: connection failed or dropped while {doing}: {e}") from e
    except redis.ResponseError as e:
        msg = str(e)
        if msg.startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
            raise StoreConnectionError(
                f"{where}: authentication failed while {doing} ({msg}); put the right user and "
                "password in the URL, e.g. redis://:PASSWORD@host:6379/0"
            ) from e
        if msg.startswith("OOM"):
            raise CtxcoreIOError(
                f"{where}: the server is full while {doing} ({msg}); raise its maxmemory or set an "
                "eviction policy such as allkeys-lru"
            ) from e
        raise CtxcoreIOError(f"{where}: the server refused a command while {doing}: {msg}") from e
    except redis.RedisError as e:
        raise CtxcoreIOError(f"{where}: {doing} failed: {e}") from e


def connect(url: str, namespace: str | None = None, *, check: bool = True) -> _Conn:
    """Open (and with ``check``, ping) the store at ``url``.

    ``url``: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS) or
    ``unix:///path/to/socket?db=0``; redis-py's connection options (``socket_timeout=``,
    ``ssl_ca_certs=``, ...) and ``namespace=`` go in its query string.

    Raises ConfigError for a malformed URL or a missing ``redis`` package, and
    StoreConnectionError when the server cannot be reached or rejects the credentials.
    """
    try:
        import redis
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError(
            'saving to or loading from redis:// needs the redis client: pip install "ctxcore[redis]"'
        ) from e
    if not is_url(url):
        raise ConfigError(
            f"not a redis URL: {url!r} (expected redis://host:port/db, rediss://... or unix://...)"
        )
    where = _redact(url)
    u = urlsplit(url)
    try:
        _ = u.port
    except ValueError as e:
        raise ConfigError(f"bad redis URL {where!r}: {e}") from e
    query = parse_qsl(u.query, keep_blank_values=True)
    ns = namespace
    rest = []
    for k, v in query:
        if k == "namespace":
            ns = ns if ns is not None else v
        else:
            rest.append((k, v))
    ns = DEFAULT_NAMESPACE if ns is None else str(ns)
    if not re.fullmatch(r"[A-Za-z0-9_.\-/]{1,128}", ns):
        raise ConfigError(
            f"namespace must be 1-128 characters of letters, digits, '_', '.', '-', '/', got {ns!r}"
        )
    clean = urlunsplit((u.scheme, u.netloc, u.path, urlencode(rest), u.fragment))
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    try:
        # A dropped connection is retried twice, briefly; a dead server fails within a second.
        client = redis.Redis.from_url(
            clean, socket_connect_timeout=10, socket_timeout=60,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        )  # fmt: skip
    except (ValueError, TypeError) as e:
        raise ConfigError(f"bad redis URL {where!r}: {e}") from e
    conn = _Conn(client, ns, where)
    if check:
        with _errors(where, "connecting"):
            client.ping()
    return conn


# -- identities ------------------------------------------------------------------------------
def _codec(c: dict) -> str:
    """Identity of everything that fixes a page's bytes and the tail's layout."""
    keys = (
        "model_id", "layers", "kv_heads", "head_dim", "page_size", "sinks", "window",
        "k_m", "k_nbits", "v_m", "v_nbits", "keep_full_precision",
    )  # fmt: skip
    ident = {k: c[k] for k in keys}
    ident["format"] = _ctxcore.PARTS_FORMAT_VERSION
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


class _Chain:
    """Chained hash of a token prefix: ``at(e)`` is the hash of ``ids[:e]`` (``e`` ascending)."""

    def __init__(self, ids: np.ndarray, codec: str) -> None:
        self.ids = ids
        self.h = hashlib.blake2b(codec.encode(), digest_size=16, person=b"ctxcore-prefix")
        self.pos = 0

    def at(self, e: int) -> str:
        if e < self.pos:
            raise AssertionError("positions must ascend")  # internal use only
        self.h.update(self.ids[self.pos : e].tobytes())
        self.pos = e
        return self.h.copy().hexdigest()


def _hashes(ids: np.ndarray, codec: str, positions: list[int]) -> dict[int, str]:
    ch = _Chain(ids, codec)
    return {e: ch.at(e) for e in sorted(set(positions))}


def _as_ids(token_ids: Any) -> np.ndarray:
    try:
        import torch

        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    a = np.asarray(token_ids)
    if a.ndim == 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 1:
        raise ConfigError(
            f"token_ids must be [T] or [1, T] for a shared store, got shape {a.shape}; save each "
            "sequence of a batch from a cache of its own"
        )
    if a.size and a.dtype.kind not in "iu":
        raise ConfigError(f"token_ids must be integers, got {a.dtype}")
    return a.astype("<i8")


def _closed_pages(store: KVStore, layer: int) -> int:
    return store.paged_tokens(layer) // store.config["page_size"]


def _ends(sinks: int, page: int, n_pages: int) -> list[int]:
    return [sinks + (j + 1) * page for j in range(n_pages)]


class _Keys:
    def __init__(self, ns: str, codec: str) -> None:
        self.p = f"{ns}:{codec}"

    def books(self, b: str) -> str:
        return f"{self.p}:b:{b}"

    def page(self, b: str, layer: int, h: str) -> str:
        return f"{self.p}:p:{b}:{layer}:{h}"

    def sinks(self, b: str, h: str) -> str:
        return f"{self.p}:s:{b}:{h}"

    def tail(self, b: str, h: str) -> str:
        return f"{self.p}:t:{b}:{h}"

    def prefix(self, h: str) -> str:
        return f"{self.p}:x:{h}"

    def end(self, h: str) -> str:
        return f"{self.p}:e:{h}"


def _check_all_compressed(cache: CompressedCache) -> None:
    if cache._exact:
        raise ConfigError(
            f"{getattr(cache.config, 'model_type', 'this model')} has sliding-window layers, whose "
            "state at a page boundary a shared store does not keep yet: save and load its contexts "
            "with a directory instead"
        )


# -- save ------------------------------------------------------------------------------------
def save(
    cache: CompressedCache,
    url: str,
    token_ids: Any,
    metadata: dict | None = None,
    *,
    namespace: str | None = None,
    _after_batch: Callable[[int], None] | None = None,
) -> dict:
    """Save ``cache`` (one sequence holding exactly ``token_ids``) to the store at ``url``.

    Returns what was written: ``tokens``, ``pages`` (closed pages of every layer),
    ``pages_written`` (those the store did not hold yet), ``bytes_written``, ``codebooks`` (the
    identity ``B``), ``namespace``. Raises ConfigError for a batch or ids that do not match the
    cache, StoreConnectionError / CtxcoreIOError if the server fails (then nothing new is
    findable).
    """
    if token_ids is None:
        raise ConfigError("saving to a shared store needs token_ids: the ids of every token the cache holds")
    ids = _as_ids(token_ids)
    _check_all_compressed(cache)
    store = cache.store
    if store.batch != 1:
        raise ConfigError(
            f"a shared store saves one sequence, this cache holds {store.batch}; "
            "use a cache per sequence (or save to a directory)"
        )
    cache._settle_all()
    store._fetch()  # pages of a loaded context not read yet
    t = cache.get_seq_length()
    if len(ids) != t:
        raise ConfigError(
            f"token_ids has {len(ids)} tokens but the cache holds {t}: pass the ids of every token it holds"
        )
    try:
        meta_json = json.dumps(metadata or {})
    except TypeError as e:
        raise ConfigError(f"metadata must be JSON-serializable: {e}") from e
    conn = connect(url, namespace)
    c = store.config
    codec = _codec(c)
    keys = _Keys(conn.ns, codec)
    layers, page, sinks = c["layers"], c["page_size"], c["sinks"]
    n_pages = [_closed_pages(store, layer) for layer in range(layers)]
    if len(set(n_pages)) != 1:  # every layer sees the same tokens
        raise ConfigError(f"layers hold different numbers of pages ({sorted(set(n_pages))}); cannot share")
    n = n_pages[0]
    books = store._s.export_books()
    b = hashlib.sha256(books).hexdigest()[:32] if books is not None else "0"
    ends = _ends(sinks, page, n)
    last = ends[-1] if n else min(t, sinks)
    hs = _hashes(ids, codec, [*ends, min(t, sinks), last, t])
    info = json.dumps(cache._settings())

    page_keys = [
        (layer, j, keys.page(b, layer, hs[e])) for layer in range(layers) for j, e in enumerate(ends)
    ]
    extra_keys = []
    if books is not None:
        extra_keys.append((keys.books(b), lambda: books))
    if t >= sinks and n:
        extra_keys.append((keys.sinks(b, hs[sinks]), lambda: store._s.export_sinks(0)))
    written = bytes_written = 0
    with _errors(conn.where, "saving a context"):
        r = conn.client
        have: list[int] = []
        all_keys = [k for *_, k in page_keys] + [k for k, _ in extra_keys]
        for i in range(0, len(all_keys), _BATCH * 4):
            pipe = r.pipeline(transaction=False)
            for k in all_keys[i : i + _BATCH * 4]:
                pipe.exists(k)
            have.extend(pipe.execute())
        missing_pages = [pk for pk, h in zip(page_keys, have[: len(page_keys)], strict=True) if not h]
        pipe = r.pipeline(transaction=False)
        for (k, piece), h in zip(extra_keys, have[len(page_keys) :], strict=True):
            if not h:
                blob = piece()
                pipe.set(k, blob, nx=True)
                bytes_written += len(blob)
        pipe.execute()
        for i in range(0, len(missing_pages), _BATCH):
            chunk = missing_pages[i : i + _BATCH]
            pipe = r.pipeline(transaction=False)
            by_layer: dict[int, list[tuple[int, str]]] = {}
            for layer, j, k in chunk:
                by_layer.setdefault(layer, []).append((j, k))
            for layer, items in by_layer.items():
                pieces = store._s.export_pages(0, layer, [j for j, _ in items])
                for (_, k), blob in zip(items, pieces, strict=True):
                    pipe.set(k, blob, nx=True)
                    bytes_written += len(blob)
            pipe.execute()
            written += len(chunk)
            if _after_batch is not None:
                _after_batch(written)
        tail = store._s.export_tail(0)
        if r.set(keys.tail(b, hs[t]), tail, nx=True):  # the same tokens and codebooks: the same tail
            bytes_written += len(tail)
        # Publication, last and all at once: the prefixes become findable together.
        pipe = r.pipeline(transaction=True)
        for e in ends:
            pipe.hset(keys.prefix(hs[e]), b, info)
        pipe.hset(
            keys.end(hs[last]),
            f"{b}:{t}",
            json.dumps({"settings": json.loads(info), "user": json.loads(meta_json)}),
        )
        pipe.execute()
    return {
        "tokens": t, "pages": n * layers, "pages_written": written, "bytes_written": bytes_written,
        "codebooks": b, "namespace": conn.ns,
    }  # fmt: skip


# -- load ------------------------------------------------------------------------------------
@dataclass
class _Candidate:
    tokens: int
    books: str
    pages: int
    #: Tokens of the saved context whose tail this is, or None for a page-aligned prefix.
    tail: int | None
    settings: dict
    user: dict


def hold_at_most(store: KVStore, want: int) -> int:
    """Cut a one-sequence ``store`` to at most ``want`` tokens: the window's last tokens cropped
    where that reaches, else a page-aligned prefix (:meth:`KVStore.truncate_to_pages`). Returns
    the tokens it then holds; 0 when no page-aligned prefix fits (the store is then unusable)."""
    held = store.num_tokens(0)
    if want >= held:
        return held
    try:
        store.crop(held - want)
        return want
    except ConfigError:
        c = store.config
        pages = (want - c["sinks"]) // c["page_size"] if want >= c["sinks"] else 0
        if pages <= 0:
            return 0
        store.truncate_to_pages(pages)
        return store.num_tokens(0)


def _mget(r: Any, keys: list[str]) -> list[bytes | None]:
    out: list[bytes | None] = []
    for i in range(0, len(keys), _BATCH):
        out.extend(r.mget(keys[i : i + _BATCH]))
    return out


def find(conn: _Conn, codec: str, ids: np.ndarray, sinks: int, page: int) -> list[_Candidate]:
    """Saved contexts starting ``ids``, longest first (at most ``len(ids) - 1`` tokens each)."""
    n = len(ids)
    keys = _Keys(conn.ns, codec)
    n_max = max(0, (n - sinks) // page) if n >= sinks else 0
    ends = _ends(sinks, page, n_max)
    small = list(range(1, min(sinks, n) + 1))
    chain = _Chain(ids, codec)
    hs = {e: chain.at(e) for e in sorted({*small, *ends})}
    with _errors(conn.where, "looking up saved prefixes"):
        pipe = conn.client.pipeline(transaction=False)
        for e in ends:
            pipe.hgetall(keys.prefix(hs[e]))
        for e in [*small, *ends]:
            pipe.hgetall(keys.end(hs[e]))
        res = pipe.execute()
    prefix_hits, end_hits = res[: len(ends)], res[len(ends) :]
    cands: list[_Candidate] = []
    # Page-aligned prefixes: the longest boundary each codebook set reaches, capped at n - 1.
    best: dict[str, int] = {}
    for j, hit in enumerate(prefix_hits):
        if ends[j] >= n:
            continue
        for b in hit:
            best[b.decode()] = j + 1
    for b, pages in best.items():
        settings = json.loads(prefix_hits[pages - 1][b.encode()])
        cands.append(_Candidate(sinks + pages * page, b, pages, None, settings, {}))
    # Whole saved contexts: exact tails, verified by the hash of all their tokens.
    tails = []
    for e, hit in zip([*small, *ends], end_hits, strict=True):
        for field, val in hit.items():
            b, _, t = field.decode().rpartition(":")
            t = int(t)
            if t > n or t < e:
                continue
            pages = max(0, (e - sinks) // page) if e >= sinks + page else 0
            tails.append((t, b, pages, json.loads(val)))
    if tails:
        th = _hashes(ids, codec, [t for t, *_ in tails])
        with _errors(conn.where, "looking up saved contexts"):
            pipe = conn.client.pipeline(transaction=False)
            for t, b, *_ in tails:
                pipe.exists(keys.tail(b, th[t]))
            exist = pipe.execute()
        for (t, b, pages, val), ok in zip(tails, exist, strict=True):
            if not ok:
                continue
            # The prompt must keep one token to prefill: a whole match gives up its last one.
            usable = min(t, n - 1)
            if usable >= 1:
                cands.append(_Candidate(usable, b, pages, t, val.get("settings", {}), val.get("user", {})))
    cands.sort(key=lambda c: (c.tokens, c.tail is not None), reverse=True)
    return cands


def load(
    cls: type[CompressedCache],
    url: str,
    config: Any,
    token_ids: Any,
    *,
    namespace: str | None = None,
    **cache_kwargs: Any,
) -> CompressedCache:
    """The longest saved prefix of ``token_ids`` in the store at ``url``, as a cache (see the
    module docs); a cache with 0 tokens when nothing matches. ``cache_kwargs``: the settings a
    new cache would get (``bits``, ``window``, ``sinks``, ``page_size``, ``select``,
    ``ram_budget``, ``offload_dir``, ``model_id``, ...); only contexts saved with the same
    codec settings match."""
    if token_ids is None:
        raise ConfigError(
            "loading from a shared store needs token_ids: the prompt to match saved prefixes against"
        )
    ids = _as_ids(token_ids)
    conn = connect(url, namespace)  # fails here, before any prefill
    fresh = cls(config, **cache_kwargs)
    _check_all_compressed(fresh)
    c = fresh.store.config
    codec = _codec(c)
    keys = _Keys(conn.ns, codec)
    layers, page, sinks = c["layers"], c["page_size"], c["sinks"]
    for cand in find(conn, codec, ids, sinks, page):
        got = _probe(conn, keys, codec, ids, cand, layers, page, sinks)
        if got is None:
            continue
        books, sink_piece, tail, page_keys = got
        if tail is None and not page_keys[0]:
            continue
        try:
            inner = _ctxcore.KVStore.assemble(
                c["layers"], c["kv_heads"], c["head_dim"], page, c["window"], sinks, c["k_m"], c["k_nbits"],
                c["v_m"], c["v_nbits"], c["keep_full_precision"], c["ram_budget"], c["offload_dir"],
                c["max_disk_bytes"], c["model_id"], books, sink_piece, [[] for _ in range(layers)], tail,
                pending=[len(lk) for lk in page_keys], window_f16=c["window_dtype"] == "float16",
                abstracts=c.get("abstracts", True),
            )  # fmt: skip
        except CorruptDataError as e:
            raise type(e)(f"{conn.where} (namespace {conn.ns!r}, codebooks {cand.books}): {e}") from e
        store = KVStore(0, 0, 0, _inner=inner)
        held = hold_at_most(store, cand.tokens)
        if held == 0:
            continue
        # Pages are read when a layer first needs them; map each pending page to its key.
        remote = [dict(zip(inner.pending_pages(li), lk, strict=False)) for li, lk in enumerate(page_keys)]
        if any(remote):
            store._lazy = _RemotePages(conn, cand.books, remote)
        store.metadata = {
            "token_ids": [ids[:held].tolist()],
            "ctxcore_cache": cand.settings,
            "user": cand.user,
        }
        cache = cls._adopt(config, store, cand.settings, cache_kwargs)
        cache.load_info = {
            "source": "context" if tail is not None and held == cand.tokens else "prefix", "tokens": held,
            "codebooks": cand.books, "pages": store.paged_tokens(0) // page, "namespace": conn.ns,
        }  # fmt: skip
        return cache
    fresh.load_info = {"source": "none", "tokens": 0, "codebooks": None, "pages": 0, "namespace": conn.ns}
    return fresh


def _probe(
    conn: _Conn,
    keys: _Keys,
    codec: str,
    ids: np.ndarray,
    cand: _Candidate,
    layers: int,
    page: int,
    sinks: int,
) -> tuple[bytes | None, bytes | None, bytes | None, list[list[str]]] | None:
    """The head pieces of ``cand`` (codebooks, sinks, tail) and the keys of its pages per layer,
    cut to the longest prefix whose pages all exist now (then without the tail); None if
    nothing of it is left. Pages are only checked for existence here, read on first use."""
    b = cand.books
    ends = _ends(sinks, page, cand.pages)
    pos = [sinks, *ends] + ([cand.tail] if cand.tail is not None else [])
    hs = _hashes(ids, codec, pos)
    head = [keys.books(b), keys.sinks(b, hs[sinks])]
    if cand.tail is not None:
        head.append(keys.tail(b, hs[cand.tail]))
    page_keys = [[keys.page(b, layer, hs[e]) for e in ends] for layer in range(layers)]
    with _errors(conn.where, "reading a saved context"):
        got = _mget(conn.client, head)
        exist: list[int] = []
        flat = [k for lk in page_keys for k in lk]
        for i in range(0, len(flat), _BATCH * 4):
            pipe = conn.client.pipeline(transaction=False)
            for k in flat[i : i + _BATCH * 4]:
                pipe.exists(k)
            exist.extend(pipe.execute())
    books, sink_piece = got[0], got[1]
    tail = got[2] if cand.tail is not None else None
    complete = cand.pages
    for layer in range(layers):
        row = exist[layer * cand.pages : (layer + 1) * cand.pages]
        if 0 in row:
            complete = min(complete, row.index(0))
    if books is None and b != "0":
        log.info("ctxcore: codebooks %s missing from %s (evicted?); skipping", b, conn.where)
        return None
    if complete == cand.pages and (cand.tail is None or tail is not None):
        return books, sink_piece, tail, page_keys
    # Something was evicted: the longest page-aligned prefix still whole, without the tail.
    complete = min(complete, max(0, (len(ids) - 1 - sinks) // page))
    if complete == 0 or sink_piece is None:
        log.info("ctxcore: saved prefix in %s lost pages (evicted?); nothing complete left", conn.where)
        return None
    log.info("ctxcore: saved prefix in %s lost pages (evicted?); using its first %d", conn.where, complete)
    return books, sink_piece, None, [lk[:complete] for lk in page_keys]


class _RemotePages:
    """The pages of a loaded shared context that are still in the store: read a layer at a time
    when the store first needs that layer (pipelined ``MGET``, every piece verified before it is
    installed), with the next layer read in the background meanwhile, as the model runs its
    layers in order. Shared by a store and its forks (each fills its own copy)."""

    def __init__(self, conn: _Conn, books: str, keys: list[dict[int, str]]) -> None:
        import threading
        from concurrent.futures import ThreadPoolExecutor

        self.conn, self.books, self.keys = conn, books, keys
        self._lock = threading.Lock()
        self._ahead: dict[int, Any] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctxcore-redis")

    def _read(self, layer: int, ids: list[int]) -> list[bytes | None]:
        with _errors(self.conn.where, f"reading pages of layer {layer} of a shared context"):
            return _mget(self.conn.client, [self.keys[layer][i] for i in ids])

    def _read_ahead(self, layer: int, store: KVStore) -> None:
        if layer >= len(self.keys):
            return
        with self._lock:
            if layer in self._ahead:
                return
            ids = list(store._s.pending_pages(layer))
            if ids:
                self._ahead[layer] = (ids, self._pool.submit(self._read, layer, ids))

    def fill(self, store: KVStore, layer: int | None) -> None:
        """Install the pending pages of ``layer`` (None: every layer) into ``store``."""
        filled = False
        for li in range(len(self.keys)) if layer is None else [int(layer)]:
            ids = list(store._s.pending_pages(li))
            if not ids:
                continue
            filled = True
            with self._lock:
                ahead = self._ahead.pop(li, None)
            if layer is not None:
                self._read_ahead(li + 1, store)
            got: dict[int, bytes | None] = {}
            if ahead is not None:
                got.update(zip(ahead[0], ahead[1].result(), strict=True))
            rest = [i for i in ids if i not in got]
            got.update(zip(rest, self._read(li, rest), strict=True))
            pieces = [got[i] for i in ids]
            if any(p is None for p in pieces):
                lost = sum(p is None for p in pieces)
                raise PageEvictedError(
                    f"{self.conn.where} (namespace {self.conn.ns!r}): {lost} page(s) of layer {li} of "
                    "a loaded shared context were evicted before they were read; load the "
                    "context again (it then holds the longest prefix still complete), or give "
                    "the server more maxmemory"
                )
            try:
                store._s.fill_pages(ids, pieces)
            except CorruptDataError as e:
                raise type(e)(
                    f"{self.conn.where} (namespace {self.conn.ns!r}, codebooks {self.books}), layer {li}: {e}"
                ) from e
        # The store's pending lists are the state: once every one is empty, drop the source.
        if filled and not any(store._s.pending_pages(li) for li in range(len(self.keys))):
            store._lazy = None
