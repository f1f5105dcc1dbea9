"""Every byte format ctxcore reads, fuzzed: PQ codecs, saved contexts (``meta.ctxkv`` and page
segments), codebook-cache files and the shared-store pieces. Whatever the damage (flipped,
cut, inserted or replaced bytes), reading raises a typed :class:`CtxcoreError` (or succeeds on
bytes that still verify), never another exception, a crash or a wrong answer."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ctxcore
from ctxcore import _ctxcore
from ctxcore.exceptions import CtxcoreError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def damage(draw, data: bytes) -> bytes:
    """``data`` with one random kind of damage."""
    b = bytearray(data)
    kind = draw(st.sampled_from(["flip", "cut", "insert", "splice", "zero"]))
    i = draw(st.integers(0, len(b) - 1))
    if kind == "flip":
        b[i] ^= draw(st.integers(1, 255))
    elif kind == "cut":
        del b[i:]
    elif kind == "insert":
        b[i:i] = draw(st.binary(min_size=1, max_size=16))
    elif kind == "splice":
        junk = draw(st.binary(min_size=1, max_size=64))
        b[i : i + len(junk)] = junk
    else:
        n = draw(st.integers(1, 32))
        b[i : i + n] = bytes(min(n, len(b) - i))
    return bytes(b)


def _pq_bytes() -> bytes:
    x = np.random.default_rng(0).standard_normal((512, 16)).astype(np.float32)
    pq = ctxcore.ProductQuantizer(dim=16, m=4, nbits=4)
    pq.train(x, iters=3, seed=0)
    return pq.to_bytes()


PQ = _pq_bytes()


def parses_only_intact(parse, bad: bytes, good: bytes) -> None:
    """``parse(bad)`` raises a typed error, or accepts bytes that verify (they re-encode to
    themselves)."""
    try:
        got = parse(bad)
    except CtxcoreError:
        return
    assert bad == good or got.to_bytes() == bad


@FUZZ
@given(st.data())
def test_pq_from_bytes(data):
    parses_only_intact(ctxcore.ProductQuantizer.from_bytes, data.draw(damage(PQ)), PQ)


def _store(batch: int = 1) -> ctxcore.KVStore:
    s = ctxcore.KVStore(2, 2, 16, page_size=4, window=3, sinks=2, bits=4, batch=batch, model_id="fuzz")
    rng = np.random.default_rng(1)
    for layer in range(2):
        x = rng.standard_normal((2, 300, 16)).astype(np.float32)
        s.calibrate(layer, x, x[:, ::-1], iters=2)
        for seq in range(batch):
            s.append(layer, x[:, :23], x[:, 23:46], seq=seq)
    return s


def _assemble(books, sinks, pages, tail):
    c = _store().config
    return _ctxcore.KVStore.assemble(
        c["layers"], c["kv_heads"], c["head_dim"], c["page_size"], c["window"], c["sinks"], c["k_m"],
        c["k_nbits"], c["v_m"], c["v_nbits"], c["keep_full_precision"], None, None, None, c["model_id"],
        books, sinks, pages, tail,
    )  # fmt: skip


SRC = _store()
BOOKS = SRC._s.export_books()
SINKS = SRC._s.export_sinks(0)
TAIL = SRC._s.export_tail(0)
PAGES = [SRC._s.export_pages(0, layer, list(range(SRC.paged_tokens(layer) // 4))) for layer in range(2)]


def test_pieces_round_trip():
    got = ctxcore.KVStore(0, 0, 0, _inner=_assemble(BOOKS, None, PAGES, TAIL))
    for layer in range(2):
        assert got.num_tokens(layer) == SRC.num_tokens(layer) == 23
        np.testing.assert_array_equal(got.window(layer)[0], SRC.window(layer)[0])


@FUZZ
@given(st.data(), st.sampled_from(["books", "sinks", "tail", "page"]))
def test_shared_pieces(data, which):
    pieces = {"books": BOOKS, "sinks": SINKS, "tail": TAIL, "page": PAGES[1][0]}
    bad = data.draw(damage(pieces[which]))
    books, sinks, tail = BOOKS, None, TAIL
    pages = [list(p) for p in PAGES]
    if which == "books":
        books = bad
    elif which == "sinks":
        sinks, tail = bad, None
        pages = [p[:2] for p in pages]
    elif which == "tail":
        tail = bad
    else:
        pages[1][0] = bad
    try:
        _assemble(books, sinks, pages, tail)
    except CtxcoreError:
        return
    assert bad == pieces[which]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("ctx")
    _store(batch=2).save(d, token_ids=[list(range(23)), list(range(5, 28))], metadata={"x": 1})
    meta = (d / "meta.ctxkv").read_bytes()
    (seg,) = d.glob("pages-*.seg")
    return d, meta, seg, seg.read_bytes()


@FUZZ
@given(st.data())
def test_saved_context_metadata(saved, data):
    d, meta, _, _ = saved
    bad = data.draw(damage(meta))
    (d / "meta.ctxkv").write_bytes(bad)
    try:
        s = ctxcore.KVStore.load(d)
        for layer in range(2):
            for j in range(s.num_pages(layer)):
                s.page(layer, j)
    except CtxcoreError:
        return
    finally:
        (d / "meta.ctxkv").write_bytes(meta)
    assert bad == meta


@FUZZ
@given(st.data())
def test_saved_context_pages(saved, data):
    d, _, seg, seg_bytes = saved
    bad = data.draw(damage(seg_bytes))
    seg.write_bytes(bad)
    try:
        s = ctxcore.KVStore.load(d)
        blobs = [s.page(layer, j, seq=q).k_codes.copy() for q in range(2) for layer in range(2)
                 for j in range(s.paged_tokens(layer, q) // 4)]  # fmt: skip
    except CtxcoreError:
        return
    finally:
        seg.write_bytes(seg_bytes)
    # Bytes past the pages a context uses are never read; every page read verified.
    ref = ctxcore.KVStore.load(d)
    want = [ref.page(layer, j, seq=q).k_codes for q in range(2) for layer in range(2)
            for j in range(ref.paged_tokens(layer, q) // 4)]  # fmt: skip
    assert all(np.array_equal(a, b) for a, b in zip(blobs, want, strict=True))


def _codebook_file() -> bytes:
    from ctxcore import codebooks as cb

    k = [ctxcore.ProductQuantizer.from_bytes(PQ)]
    return cb.CodebookSet(
        model_id="fuzz", codec={"bits": 4}, layers=[cb.LayerBooks(k, k, 0.1, 0.1, 100)]
    ).to_bytes()


CODEBOOK_FILE = _codebook_file()


@FUZZ
@given(st.data())
def test_codebook_file_fuzz(data):
    from ctxcore import codebooks as cb

    parses_only_intact(cb.CodebookSet.from_bytes, data.draw(damage(CODEBOOK_FILE)), CODEBOOK_FILE)
