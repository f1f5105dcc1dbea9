"""The narrower kernels give the same answers: rerun the kernel suites with CTXCORE_PORTABLE=1
(ctxcore skips its AVX2/FMA paths, as on CPUs without them) and with CTXCORE_SIMD=avx2 (it skips
its AVX-512 paths, as on CPUs without AVX-512)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import ctxcore

ROOT = Path(__file__).resolve().parents[1]
LEVELS = {
    "portable": ({"CTXCORE_PORTABLE": "1"}, ["tests/test_pq.py"]),
    "avx2": ({"CTXCORE_SIMD": "avx2"}, []),
}
ORDER = ["portable", "avx2", "avx512"]


def run(level: str, args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, **LEVELS[level][0])
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def needs_wider(level: str) -> None:
    if ORDER.index(ctxcore.cpu_simd()) <= ORDER.index(level):
        pytest.skip(f"this CPU runs {ctxcore.cpu_simd()} kernels: nothing wider to switch off")


@pytest.mark.parametrize("level", list(LEVELS))
def test_switch_takes_effect(level):
    needs_wider(level)
    code = "import ctxcore; print(ctxcore.cpu_simd(), ctxcore.cpu_has_avx2())"
    r = run(level, [sys.executable, "-c", code])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [level, str(level != "portable")]


@pytest.mark.parametrize("level", list(LEVELS))
def test_kernel_suites_pass_on_narrower_paths(level):
    needs_wider(level)
    files = [*LEVELS[level][1], "tests/test_attention.py", "tests/test_store_attention.py"]
    r = run(level, [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout
