"""The codebook cache: codebooks trained on a model's first context are reused by later caches
where they fit, kept safely on disk, and never used for a model they do not fit."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import ctxcore  # noqa: E402
from ctxcore import codebooks as cb  # noqa: E402
from ctxcore.exceptions import ConfigError, CorruptDataError, FormatVersionError  # noqa: E402

TOKENS = 2200  # above MIN_PUBLISH_TOKENS once the sinks and window are counted in


def _model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(seed)
    return ctxcore.enable(LlamaForCausalLM(cfg).eval())


@pytest.fixture(scope="module")
def model():
    return _model(0)


def _run(model, seed: int, tokens: int = TOKENS, **kw):
    ids = torch.randint(0, 64, (1, tokens), generator=torch.Generator().manual_seed(seed))
    cache = ctxcore.CompressedCache(model.config, bits=4, **kw)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=3, do_sample=False)
    return cache, out


def _files():
    d = cb.cache_dir()
    return sorted(d.glob("*")) if d.is_dir() else []


def test_second_context_reuses_the_first_contexts_codebooks(model):
    first, _ = _run(model, 1)
    assert first.codebook_source == ["trained", "trained"]
    (path,) = _files()
    assert path.suffix == ".ctxcb"
    second, out = _run(model, 2)
    assert second.codebook_source == ["reused", "reused"]
    for layer in range(2):
        for a, b in zip(first.store.codebooks(layer), second.store.codebooks(layer), strict=True):
            np.testing.assert_array_equal(a, b)
    assert out.shape == (1, TOKENS + 3)
    assert _files() == [path]


def test_a_longer_context_replaces_the_codebooks_it_does_not_fit(model, monkeypatch):
    # Keys carry their position's rotation: codebooks of a short context may not fit a longer
    # one. The longer context's own codebooks then replace them; a context no longer than the
    # stored codebooks' leaves the file alone.
    _run(model, 1)
    (path,) = _files()
    before = path.read_bytes()
    stored = [lb.tokens for lb in cb.CodebookSet.load(path).layers]
    monkeypatch.setattr(cb, "FIT_RATIO", 0.0)  # every check fails
    same, _ = _run(model, 2)
    assert same.codebook_source == ["trained", "trained"]
    assert path.read_bytes() == before
    longer, _ = _run(model, 3, tokens=TOKENS + 700)
    assert longer.codebook_source == ["trained", "trained"]
    after = cb.CodebookSet.load(path)
    assert all(a > b for a, b in zip([lb.tokens for lb in after.layers], stored, strict=True))
    monkeypatch.setattr(cb, "FIT_RATIO", 3.0)
    third, _ = _run(model, 4)
    assert third.codebook_source == ["reused", "reused"]
    for layer in range(2):
        for a, b in zip(longer.store.codebooks(layer), third.store.codebooks(layer), strict=True):
            np.testing.assert_array_equal(a, b)
    assert _files() == [path]


def test_a_model_the_codebooks_do_not_fit_trains_and_leaves_the_file(model, caplog):
    _run(model, 1)
    (path,) = _files()
    before = path.read_bytes()
    other = _model(1)  # same config, other weights
    with caplog.at_level(logging.INFO, logger="ctxcore"):
        cache, _ = _run(other, 3)
    assert cache.codebook_source == ["trained", "trained"]
    assert "do not fit" in caplog.text
    assert path.read_bytes() == before


def test_train_mode_reads_and_writes_nothing(model):
    cache, _ = _run(model, 1, codebooks="train")
    assert cache.codebook_source == ["trained", "trained"]
    assert _files() == []


def test_an_explicit_file(model, tmp_path):
    path = tmp_path / "books.ctxcb"
    _run(model, 1, codebooks=path)
    assert path.is_file() and _files() == []
    cache, _ = _run(model, 2, codebooks=str(path))
    assert cache.codebook_source == ["reused", "reused"]


def test_a_damaged_file_is_ignored_and_replaced(model, caplog):
    _run(model, 1)
    (path,) = _files()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="ctxcore"):
        cache, _ = _run(model, 2)
    assert cache.codebook_source == ["trained", "trained"]
    assert "checksum" in caplog.text
    cb.CodebookSet.load(path)  # a valid file again


def test_a_crash_mid_write_keeps_the_old_file(model, monkeypatch):
    first, _ = _run(model, 1)
    (path,) = _files()
    before = path.read_bytes()
    s = cb.CodebookSet.load(path)

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(cb.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        s.save(path)
    assert path.read_bytes() == before
    assert _files() == [path]  # no temporary file left behind


def test_format_errors_are_typed(model):
    _run(model, 1)
    (path,) = _files()
    data = path.read_bytes()
    with pytest.raises(CorruptDataError, match="magic"):
        cb.CodebookSet.from_bytes(b"XXXXXXXX" + data[8:])
    with pytest.raises(CorruptDataError):
        cb.CodebookSet.from_bytes(data[:100])
    with pytest.raises(FormatVersionError, match="version 99"):
        cb.CodebookSet.from_bytes(data[:8] + (99).to_bytes(4, "little") + data[12:])
    s = cb.CodebookSet.from_bytes(data)
    assert s.to_bytes() == data


def test_bad_codebooks_argument(model):
    with pytest.raises(ConfigError, match="codebooks"):
        ctxcore.CompressedCache(model.config, codebooks=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="codebooks"):
        ctxcore.CompressedCache(model.config, codebooks="")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CTXCORE_CACHE_DIR", str(tmp_path))
    assert cb.cache_dir() == tmp_path / "codebooks"
    monkeypatch.delenv("CTXCORE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cb.cache_dir() == tmp_path / "x" / "ctxcore" / "codebooks"
    assert os.fspath(cb.cache_dir()).endswith("codebooks")
