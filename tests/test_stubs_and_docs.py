"""The type stubs match the compiled extension, and docstring examples run."""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
from pathlib import Path

import pytest

import ctxcore
from ctxcore import _ctxcore

STUB = Path(ctxcore.__file__).with_name("_ctxcore.pyi")


def stub_names() -> dict[str, set[str]]:
    tree = ast.parse(STUB.read_text())
    out: dict[str, set[str]] = {"": set()}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out[""].add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[""].add(node.target.id)
        elif isinstance(node, ast.ClassDef):
            out[""].add(node.name)
            out[node.name] = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
    return out


def test_stub_is_shipped_with_py_typed():
    assert STUB.exists()
    assert STUB.with_name("py.typed").exists()


def test_stubs_match_extension():
    stubs = stub_names()
    runtime = {n for n in dir(_ctxcore) if not n.startswith("_") or n == "__version__"}
    assert stubs[""] == runtime, f"stub-only: {stubs[''] - runtime}, missing from stub: {runtime - stubs['']}"
    for cls, members in stubs.items():
        if not cls:
            continue
        obj = getattr(_ctxcore, cls)
        rt = {n for n in dir(obj) if not n.startswith("_")} | {"__init__"}
        dunders = {m for m in members if m.startswith("__") and m != "__init__"}
        assert all(hasattr(obj, m) for m in dunders), f"{cls}: stub declares missing {dunders}"
        members = members - dunders
        assert members == rt, f"{cls}: stub-only {members - rt}, missing from stub {rt - members}"


@pytest.mark.parametrize(
    "module",
    ["ctxcore.pq", "ctxcore.exceptions", "ctxcore.chunking", "ctxcore.store", "ctxcore.ops", "ctxcore.cache"],
)
def test_docstring_examples_run(module):
    if module in ("ctxcore.ops", "ctxcore.cache"):
        pytest.importorskip("torch")
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{module} has no doctest examples to run"
    assert result.failed == 0


def test_public_api_documented():
    for name in ctxcore.__all__:
        obj = getattr(ctxcore, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__, f"{name} has no docstring"
