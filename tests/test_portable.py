"""The portable (non-AVX2) kernels give the same answers: rerun the kernel suites with
CTXCORE_PORTABLE=1, which makes ctxcore skip its AVX2/FMA paths as on CPUs without them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, CTXCORE_PORTABLE="1")
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_switch_takes_effect():
    r = run([sys.executable, "-c", "import ctxcore; print(ctxcore.cpu_has_avx2())"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_kernel_suites_pass_on_portable_paths():
    files = ["tests/test_pq.py", "tests/test_attention.py", "tests/test_store_attention.py"]
    r = run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout
