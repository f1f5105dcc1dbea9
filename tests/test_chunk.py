"""chunk_tokens: stable chained hashes, prefix property, namespaces, inputs, validation."""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ctxcore
from ctxcore import TokenChunk, chunk_tokens, matching_prefix_tokens
from ctxcore.exceptions import ConfigError, CtxcoreError, DTypeError, ShapeError

# The golden vector of rust/src/chunk.rs (cross-checked there against an independent BLAKE3).
GOLDEN = [
    (0, 2, "a04a94ad984d80486d83e5b6d3e5bf9a9d8fc81db2818dce66ebdb43e31cc0d4"),
    (2, 4, "9c3d15b72c4125b51cb985b64f55238be00959a21c6f367189352ac4d0d54ae0"),
    (4, 5, "d65287ecb8b613ca23a45aec5379bafae2d4b52254c02fa334c2f57662cb3b1e"),
]

token_lists = st.lists(st.integers(0, 2**32 - 1), max_size=200) | st.lists(st.integers(0, 2), max_size=200)


def spans(chunks: list[TokenChunk]) -> list[tuple[int, int, str]]:
    return [(c.start, c.end, c.hash) for c in chunks]


def test_golden_vector():
    assert spans(chunk_tokens([1, 2, 3, 4, 5], 2, namespace="test-model")) == GOLDEN


def test_hashes_are_stable_across_processes():
    ids = np.random.default_rng(0).integers(0, 49152, size=1000)
    here = [c.hash for c in chunk_tokens(ids, 64, "SmolLM2-135M")]
    code = (
        "import json, sys, numpy as np, ctxcore\n"
        "ids = np.random.default_rng(0).integers(0, 49152, size=1000)\n"
        "print(json.dumps([c.hash for c in ctxcore.chunk_tokens(ids, 64, 'SmolLM2-135M')]))\n"
        "print(json.dumps([c.hash for c in ctxcore.chunk_tokens([1, 2, 3, 4, 5], 2, 'test-model')]))\n"
    )
    for seed in ("0", "12345", "random"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd="/"
        ).stdout.splitlines()
        assert json.loads(out[0]) == here
        assert json.loads(out[1]) == [h for _, _, h in GOLDEN]


@settings(max_examples=60, deadline=None)
@given(ids=token_lists, size=st.integers(1, 40), data=st.data())
def test_chunks_tile_and_prefix_chunks_are_leading_chunks(ids, size, data):
    full = chunk_tokens(ids, size)
    assert len(full) == -(-len(ids) // size)
    assert [(c.start, c.end) for c in full] == [
        (s, min(s + size, len(ids))) for s in range(0, len(ids), size)
    ]
    assert all(c.is_full(size) for c in full[:-1])
    assert all(len(c.hash) == 64 and int(c.hash, 16) >= 0 for c in full)
    p = data.draw(st.integers(0, len(ids)), label="prefix length")
    pre = chunk_tokens(ids[:p], size)
    nfull = p // size
    assert pre[:nfull] == full[:nfull]
    known = {c.hash for c in pre}
    expected = p if p == len(ids) else nfull * size
    assert matching_prefix_tokens(full, known) == expected


@settings(max_examples=40, deadline=None)
@given(ids=token_lists.filter(bool), size=st.integers(1, 40), data=st.data())
def test_a_changed_token_changes_its_chunk_and_all_later(ids, size, data):
    i = data.draw(st.integers(0, len(ids) - 1), label="index")
    changed = list(ids)
    changed[i] = (changed[i] + 1) % 2**32
    a, b = chunk_tokens(ids, size), chunk_tokens(changed, size)
    k = i // size
    assert a[:k] == b[:k]
    assert all(x.hash != y.hash for x, y in zip(a[k:], b[k:], strict=True))


def test_namespace_and_chunk_size_are_part_of_the_hash():
    ids = list(range(64))
    a = chunk_tokens(ids, 16, namespace="model-a")
    b = chunk_tokens(ids, 16, namespace="model-b")
    assert not {c.hash for c in a} & {c.hash for c in b}
    assert matching_prefix_tokens(b, {c.hash for c in a}) == 0
    assert chunk_tokens(ids, 16) == chunk_tokens(ids, 16, namespace="")
    assert chunk_tokens(ids, 16, "ab") != chunk_tokens(ids, 16, "a")
    assert chunk_tokens(ids, 16, "é") != chunk_tokens(ids, 16, "e")
    # Chunk 0:16 of 8-token chunks is not the 16-token chunk 0:16.
    assert chunk_tokens(ids, 8)[1].hash != chunk_tokens(ids, 16)[0].hash


def test_matching_prefix_tokens():
    ids = list(range(100, 150))
    saved = chunk_tokens(ids[:35], 10, "m")
    prompt = chunk_tokens(ids, 10, "m")
    known = {c.hash for c in saved}
    assert matching_prefix_tokens(prompt, known) == 30  # the saved 30:35 is not the new 30:40
    assert matching_prefix_tokens(saved, known) == 35
    assert matching_prefix_tokens(prompt, {c.hash: "page id" for c in saved}) == 30
    assert matching_prefix_tokens(prompt, set()) == 0
    assert matching_prefix_tokens([], known) == 0
    # A cache that evicted chunk 10:20 holds only 0:10 of the prompt.
    assert matching_prefix_tokens(prompt, known - {prompt[1].hash}) == 10


def test_empty_input():
    assert chunk_tokens([], 16) == []
    assert chunk_tokens(np.zeros(0, dtype=np.int64), 16) == []
    assert chunk_tokens(np.zeros((1, 0), dtype=np.int64), 16) == []


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int16, np.uint8, np.uint16, np.uint32, np.uint64])
def test_numpy_list_and_torch_inputs_agree(dtype):
    ids = np.random.default_rng(1).integers(0, 200, size=77)
    ref = chunk_tokens(ids.tolist(), 16, "m")
    assert chunk_tokens(ids.astype(dtype), 16, "m") == ref
    assert chunk_tokens(ids.astype(dtype)[None, :], 16, "m") == ref
    assert chunk_tokens(tuple(ids.tolist()), 16, "m") == ref
    # A non-contiguous view is copied.
    wide = np.repeat(ids.astype(dtype), 2)
    assert chunk_tokens(wide[::2], 16, "m") == ref


def test_torch_inputs_agree():
    torch = pytest.importorskip("torch")
    ids = np.random.default_rng(2).integers(0, 49152, size=100)
    ref = chunk_tokens(ids, 32, "m")
    t = torch.from_numpy(ids)
    assert chunk_tokens(t, 32, "m") == ref
    assert chunk_tokens(t[None, :], 32, "m") == ref  # input_ids of a batch of one
    assert chunk_tokens(t.to(torch.int32), 32, "m") == ref
    assert chunk_tokens(torch.stack([t, t], 1)[:, 0], 32, "m") == ref  # non-contiguous
    assert chunk_tokens(t.clone().requires_grad_(False), 32, "m") == ref


def test_chunk_size_accepts_numpy_ints():
    assert chunk_tokens([1, 2, 3], np.int64(2)) == chunk_tokens([1, 2, 3], 2)


@pytest.mark.parametrize(
    "ids",
    [[-1, 2], [0, 2**32], [2**70], np.array([5, -3]), np.array([2**32], dtype=np.uint64)],
    ids=["negative", "2**32", "huge python int", "numpy negative", "uint64 too large"],
)
def test_out_of_range_ids_are_config_errors(ids):
    with pytest.raises(ConfigError, match=r"\[0, 2\*\*32\)"):
        chunk_tokens(ids, 4)


def test_largest_id_is_accepted():
    a = chunk_tokens([2**32 - 1, 0], 4)
    assert a == chunk_tokens(np.array([2**32 - 1, 0], dtype=np.uint64), 4)
    assert a == chunk_tokens(np.array([2**32 - 1, 0], dtype=np.uint32), 4)


@pytest.mark.parametrize(
    "ids",
    [[1.0, 2.0], np.array([1.5]), np.array([1, 2], dtype=np.float32), [True, False], ["a", "b"], [1, "a"]],
    ids=["float list", "float array", "float32 array", "bools", "strings", "mixed"],
)
def test_non_integer_ids_are_dtype_errors(ids):
    with pytest.raises(DTypeError, match="token_ids"):
        chunk_tokens(ids, 4)


def test_non_integer_torch_ids_are_dtype_errors():
    torch = pytest.importorskip("torch")
    for t in (torch.ones(4), torch.ones(4, dtype=torch.bfloat16), torch.ones(4, dtype=torch.bool)):
        with pytest.raises(DTypeError, match="integer"):
            chunk_tokens(t, 4)


@pytest.mark.parametrize(
    "ids",
    [
        np.zeros((2, 5), dtype=np.int64),
        np.zeros((0, 5), dtype=np.int64),
        np.int64(3),
        np.zeros((1, 1, 4), int),
    ],
    ids=["batch of 2", "batch of 0", "scalar", "3-D"],
)
def test_bad_shapes_are_shape_errors(ids):
    with pytest.raises(ShapeError, match=r"\[T\] or \[1, T\]"):
        chunk_tokens(ids, 4)


@pytest.mark.parametrize("size", [0, -1, 2.0, True, "4", None])
def test_bad_chunk_size_is_a_config_error(size):
    with pytest.raises(ConfigError, match="chunk_size"):
        chunk_tokens([1, 2, 3], size)


def test_bad_namespace_is_a_config_error():
    with pytest.raises(ConfigError, match="namespace"):
        chunk_tokens([1, 2, 3], 2, namespace=b"model")


def test_errors_are_ctxcore_errors():
    for args in (([1], 0), ([-1], 1), ([1.0], 1), (np.zeros((2, 2), int), 1)):
        with pytest.raises(CtxcoreError):
            chunk_tokens(*args)


def test_token_chunk_object():
    chunks = chunk_tokens(list(range(10)), 4, "m")
    c = chunks[2]
    assert (c.start, c.end, len(c)) == (8, 10, 2)
    assert not c.is_full(4) and chunks[0].is_full(4)
    assert repr(c) == f"TokenChunk(start=8, end=10, hash='{c.hash}')"
    assert isinstance(c, ctxcore.TokenChunk)
    # Value semantics: equal fields are equal and hash alike; usable as dict keys.
    again = TokenChunk(c.start, c.end, c.hash.upper())
    assert again == c and hash(again) == hash(c) and len({c, again, chunks[0]}) == 2
    assert c != chunks[1] and c != "not a chunk"
    assert pickle.loads(pickle.dumps(chunks)) == chunks
    assert copy.deepcopy(c) == c
    with pytest.raises(AttributeError):
        c.start = 0  # frozen
    with pytest.raises(ConfigError, match="64 hex digits"):
        TokenChunk(0, 4, "abc")
    with pytest.raises(ConfigError, match="start <= end"):
        TokenChunk(5, 4, c.hash)


def test_long_sequence_matches_chained_prefixes():
    ids = np.random.default_rng(3).integers(0, 2**32, size=200_000, dtype=np.uint64)
    chunks = chunk_tokens(ids, 256, "m")
    assert len(chunks) == -(-200_000 // 256)
    assert chunk_tokens(ids[:25_600], 256, "m") == chunks[:100]
