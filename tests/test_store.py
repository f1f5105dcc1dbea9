"""KVStore: layout, RAM budget, disk tier, prefetch, persistence, faults, and a stateful model test."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import ctxcore
from ctxcore.exceptions import (
    ConfigError,
    ContextMismatchError,
    CorruptDataError,
    CtxcoreIOError,
    FormatVersionError,
    NonFiniteError,
    NotTrainedError,
    RamBudgetError,
    ShapeError,
)

H, D = 2, 16


def rand(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def make_store(layers=2, page_size=8, window=4, sinks=2, **kw) -> ctxcore.KVStore:
    s = ctxcore.KVStore(layers, H, D, page_size=page_size, window=window, sinks=sinks, bits=4,
                        model_id="test/model", **kw)  # fmt: skip
    for layer in range(layers):
        s.calibrate(layer, rand((H, 300, D), layer), rand((H, 300, D), 100 + layer), iters=3)
    return s


def quantizers(store, layer):
    """Re-train the same codebooks (training is deterministic) to compute expected codes, held
    compactly as the store holds them (float16 centroids)."""
    c = store.config
    qs = []
    for which, seed in (("k", layer), ("v", 100 + layer)):
        data = rand((H, 300, D), seed)
        row = []
        for h in range(H):
            pq = ctxcore.ProductQuantizer(D, c[f"{which}_m"], c[f"{which}_nbits"])
            pq.train(data[h], iters=3, seed=0)
            row.append(pq.compact())
        qs.append(row)
    return qs


def test_positions_codes_window_sinks_abstracts():
    s = make_store()
    k, v = rand((H, 27, D), 1), rand((H, 27, D), 2)
    s.append(0, k[:, :10], v[:, :10])
    s.append(0, k[:, 10:], v[:, 10:])
    # 27 tokens: 2 sinks, 21 paged (2 full pages + 5 in the open page), 4 in the window.
    assert (s.num_tokens(0), s.paged_tokens(0), s.num_pages(0)) == (27, 21, 3)
    np.testing.assert_array_equal(s.sinks(0)[0], k[:, :2])
    np.testing.assert_array_equal(s.window(0)[1], v[:, 23:])
    kq, vq = quantizers(s, 0)
    for p in range(3):
        page = s.page(0, p)
        lo = 2 + 8 * p
        hi = lo + page.tokens
        assert page.tokens == (8 if p < 2 else 5)
        for h in range(H):
            np.testing.assert_array_equal(page.k_codes[h], kq[h].encode(k[h, lo:hi]))
            np.testing.assert_array_equal(page.v_codes[h], vq[h].encode(v[h, lo:hi]))
    a = s.abstracts(0)
    assert a.shape == (3, H, 3, D)
    for p in range(3):
        seg = k[:, 2 + 8 * p : 2 + 8 * p + (8 if p < 2 else 5)]
        assert (a[p, :, 0] <= seg.min(1) + 1e-6).all() and (a[p, :, 1] >= seg.max(1) - 1e-6).all()
        np.testing.assert_allclose(a[p, :, 2], seg.mean(1), atol=0.05)
    assert s.num_tokens(1) == 0


def test_full_precision_copy_and_torch_input():
    torch = pytest.importorskip("torch")
    s = make_store(keep_full_precision=True)
    k = torch.randn(1, H, 20, D)
    s.append(1, k, k.to(torch.bfloat16))
    page = s.page(1, 0)
    assert page.k_fp16.dtype == np.float16 and page.k_fp16.shape == (H, 8, D)
    np.testing.assert_allclose(page.k_fp16.astype(np.float32), k[0, :, 2:10].numpy(), atol=2e-3)


def test_bad_input_changes_nothing():
    s = ctxcore.KVStore(1, H, D, page_size=4, window=2, sinks=1, bits=4)
    s.append(0, rand((H, 3, D), 0), rand((H, 3, D), 1))  # fits in sinks + window: no codebooks needed
    with pytest.raises(NotTrainedError):
        s.append(0, rand((H, 1, D), 0), rand((H, 1, D), 1))
    with pytest.raises(ShapeError):
        s.append(0, rand((H, 2, D + 1), 0), rand((H, 2, D + 1), 1))
    bad = rand((H, 2, D), 0)
    bad[1, 1, 3] = np.inf
    with pytest.raises(NonFiniteError):
        s.append(0, bad, bad)
    with pytest.raises(ConfigError):
        s.append(5, rand((H, 1, D), 0), rand((H, 1, D), 1))
    assert s.num_tokens(0) == 3
    with pytest.raises(ConfigError):
        ctxcore.KVStore(1, H, D, bits=3)
    with pytest.raises(ConfigError, match="256MB"):
        ctxcore.KVStore(1, H, D, ram_budget="lots")
    with pytest.raises(RamBudgetError, match="minimum"):
        ctxcore.KVStore(1, H, D, ram_budget=1000)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_ram_stays_within_budget_storing_10x(tmp_path):
    """Store >10x the budget; the accounted RAM never exceeds it and the process RSS does not
    grow with the context."""
    budget = 16 << 20
    s = ctxcore.KVStore(1, 4, 64, page_size=64, window=64, sinks=4, bits=4, keep_full_precision=True,
                        ram_budget=budget, offload_dir=tmp_path)  # fmt: skip
    s.calibrate(0, rand((4, 512, 64), 0), rand((4, 512, 64), 1), iters=2)
    page_bytes = s.config["page_bytes"]
    rss0 = rss_bytes()
    i = 0
    while s.stats()["pages"] * page_bytes < 10 * budget:
        k = rand((4, 2048, 64), i)
        s.append(0, k, k)
        i += 1
        assert s.stats()["ram_bytes"] <= budget
    growth = rss_bytes() - rss0
    st = s.stats()
    assert st["disk_bytes"] >= 9 * budget and st["evictions"] > 0
    assert growth < 3 * budget, f"RSS grew by {growth / 2**20:.1f} MiB for a {budget / 2**20:.0f} MiB budget"
    # Old pages come back from disk intact.
    first = s.page(0, 0)
    k0 = rand((4, 2048, 64), 0)
    pq = ctxcore.ProductQuantizer(64, *ctxcore.bits_to_pq(4, 64)[0])
    pq.train(rand((4, 512, 64), 0)[0], iters=2)
    np.testing.assert_array_equal(first.k_codes[0], pq.encode(k0[0, 4:68]))
    np.testing.assert_allclose(first.k_fp16[0].astype(np.float32), k0[0, 4:68], atol=5e-3)
    assert s.stats()["misses"] >= 1


def test_prefetch_turns_misses_into_hits(tmp_path):
    s = make_store(offload_dir=tmp_path)
    s.append(0, rand((H, 200, D), 3), rand((H, 200, D), 4))
    n = s.num_pages(0) - 1  # closed pages
    before = [s.page(0, p).k_codes for p in range(n)]
    s.evict_all()
    assert s.stats()["ram_page_bytes"] == 0
    s.prefetch(0, list(range(n)))
    import time

    deadline = time.time() + 10
    while s.stats()["prefetched"] < n and time.time() < deadline:
        time.sleep(0.01)
    st0 = s.stats()
    assert st0["prefetched"] == n
    for p in range(n):
        np.testing.assert_array_equal(s.page(0, p).k_codes, before[p])
    st1 = s.stats()
    assert st1["hits"] - st0["hits"] == n and st1["misses"] == st0["misses"]


def test_save_load_in_new_process_and_prefix_match(tmp_path):
    s = make_store()
    k, v = rand((H, 50, D), 5), rand((H, 50, D), 6)
    for layer in range(2):
        s.append(layer, k, v)
    tokens = list(range(1000, 1050))
    s.save(tmp_path / "ctx", token_ids=tokens, metadata={"note": "hello"})
    script = textwrap.dedent(
        f"""
        import numpy as np, ctxcore
        s = ctxcore.KVStore.load({str(tmp_path / "ctx")!r}, model_id="test/model")
        out = {{"n": s.num_tokens(1), "meta": s.metadata["note"],
               "pages": [s.page(1, p).v_codes.tobytes().hex() for p in range(s.num_pages(1))],
               "window": s.window(1)[0].tobytes().hex(),
               "prefix": s.matching_prefix(list(range(1000, 1040)) + [7, 7, 7])}}
        import json; print(json.dumps(out))
        """
    )
    import json

    res = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                    check=True).stdout)  # fmt: skip
    assert res["n"] == 50 and res["meta"] == "hello"
    assert res["pages"] == [s.page(1, p).v_codes.tobytes().hex() for p in range(s.num_pages(1))]
    assert res["window"] == s.window(1)[0].tobytes().hex()
    # page_size=8: the first 5 chunks (40 tokens) match, the 6th differs.
    assert res["prefix"] == 40


def saved(tmp_path) -> tuple[ctxcore.KVStore, Path]:
    s = make_store()
    s.append(0, rand((H, 60, D), 7), rand((H, 60, D), 8))
    d = tmp_path / "ctx"
    s.save(d)
    return s, d


def segment(d: Path) -> Path:
    (seg,) = d.glob("pages-*.seg")
    return seg


def test_flipped_byte_names_file_and_page(tmp_path):
    s, d = saved(tmp_path)
    seg = segment(d)
    b = bytearray(seg.read_bytes())
    b[s.config["page_bytes"] * 2 + 5] ^= 0x01
    seg.write_bytes(bytes(b))
    loaded = ctxcore.KVStore.load(d)
    loaded.page(0, 0)  # other pages stay readable
    with pytest.raises(CorruptDataError, match=r"page 2 in .*pages-.*\.seg.*checksum"):
        loaded.page(0, 2)


def test_truncated_missing_and_bad_metadata(tmp_path):
    s, d = saved(tmp_path)
    seg = segment(d)
    data = seg.read_bytes()
    seg.write_bytes(data[:-100])
    with pytest.raises(CorruptDataError, match="truncated"):
        ctxcore.KVStore.load(d)
    seg.unlink()
    with pytest.raises(CorruptDataError, match="missing segment"):
        ctxcore.KVStore.load(d)
    seg.write_bytes(data)
    meta = d / "meta.ctxkv"
    m = meta.read_bytes()
    meta.write_bytes(m[:8] + (99).to_bytes(4, "little") + m[12:])
    with pytest.raises(FormatVersionError, match="version 99"):
        ctxcore.KVStore.load(d)
    meta.write_bytes(b"NOTCTXKV" + m[8:])
    with pytest.raises(CorruptDataError, match="magic"):
        ctxcore.KVStore.load(d)
    meta.write_bytes(m[: len(m) // 2])
    with pytest.raises(CorruptDataError):
        ctxcore.KVStore.load(d)
    meta.write_bytes(m)
    assert ctxcore.KVStore.load(d).num_tokens(0) == 60
    with pytest.raises(CtxcoreIOError, match="meta.ctxkv"):
        ctxcore.KVStore.load(tmp_path / "nothing-here")


def test_mismatched_model_or_shape_names_both_sides(tmp_path):
    _, d = saved(tmp_path)
    with pytest.raises(ContextMismatchError, match=r"model=test/model.*model=other/model"):
        ctxcore.KVStore.load(d, model_id="other/model")
    with pytest.raises(ContextMismatchError, match=r"head_dim=16.*head_dim=64"):
        ctxcore.KVStore.load(d, head_dim=64)


def test_crash_mid_save_keeps_old_version(tmp_path):
    s, d = saved(tmp_path)
    # A crash after writing the new segment and temp metadata but before the rename leaves
    # these files behind; the old save must still load and equal what was saved.
    (d / "pages-ffffffffffffffff.seg.tmp").write_bytes(b"partial")
    (d / "meta.ctxkv.tmp").write_bytes(b"partial")
    loaded = ctxcore.KVStore.load(d)
    np.testing.assert_array_equal(loaded.page(0, 1).k_codes, s.page(0, 1).k_codes)
    # Saving again over it works and replaces it atomically.
    s.append(0, rand((H, 16, D), 9), rand((H, 16, D), 10))
    s.save(d)
    assert ctxcore.KVStore.load(d).num_tokens(0) == 76


def test_unwritable_directories(tmp_path):
    s = make_store()
    s.append(0, rand((H, 30, D), 1), rand((H, 30, D), 2))
    bad = Path("/proc/ctxcore-cannot-write") if os.geteuid() == 0 else tmp_path / "ro"
    if os.geteuid() != 0:
        bad.mkdir()
        bad.chmod(0o500)
        bad = bad / "sub"
    with pytest.raises(CtxcoreIOError, match=str(bad)):
        s.save(bad)
    with pytest.raises(CtxcoreIOError, match="not writable|creating offload"):
        ctxcore.KVStore(1, H, D, offload_dir=bad)
    assert s.num_tokens(0) == 30


def test_disk_full_keeps_every_page_readable(tmp_path):
    s0 = make_store(layers=1)
    cfg = s0.config
    budget = cfg["min_ram_budget"] + 3 * cfg["page_bytes"] + 4096
    s = make_store(layers=1, ram_budget=budget, offload_dir=tmp_path, max_disk_bytes=4 * cfg["page_bytes"])
    k = rand((H, 400, D), 3)
    with pytest.raises(CtxcoreIOError, match="disk tier"):
        for i in range(0, 400, 8):
            s.append(0, k[:, i : i + 8], k[:, i : i + 8])
    kq, _ = quantizers(s, 0)
    for p in range(s.num_pages(0)):
        page = s.page(0, p)
        np.testing.assert_array_equal(
            page.k_codes[0], kq[0].encode(k[0, 2 + 8 * p : 2 + 8 * p + page.tokens])
        )


def test_concurrent_readers(tmp_path):
    s, d = saved(tmp_path)
    script = textwrap.dedent(
        f"""
        import ctxcore, hashlib
        s = ctxcore.KVStore.load({str(d)!r})
        h = hashlib.sha256()
        for _ in range(20):
            for p in range(s.num_pages(0)):
                h.update(s.page(0, p).k_codes.tobytes())
            s.evict_all()
        print(h.hexdigest())
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(3)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outs)) == 1 and outs[0]


class StoreMachine(RuleBasedStateMachine):
    """Random append / evict / prefetch / read / save / load against a plain in-memory model."""

    @initialize()
    def setup(self):
        import tempfile

        self.tmp = Path(tempfile.mkdtemp(prefix="ctxcore-stateful-"))
        self.page_size, self.window, self.sinks = 4, 3, 2
        base = make_store(layers=2, page_size=self.page_size, window=self.window, sinks=self.sinks)
        self.min_budget = base.config["min_ram_budget"]
        # Room for a few resident pages plus the abstracts of every page this test can create.
        self.budget = self.min_budget + 3 * base.config["page_bytes"] + 32 * 1024
        self.store = make_store(layers=2, page_size=4, window=3, sinks=2, ram_budget=self.budget,
                                offload_dir=self.tmp / "off")  # fmt: skip
        self.kq = [quantizers(self.store, layer) for layer in range(2)]
        self.k = [np.zeros((H, 0, D), np.float32) for _ in range(2)]
        self.v = [np.zeros((H, 0, D), np.float32) for _ in range(2)]
        self.seed = 0

    @rule(layer=st.integers(0, 1), t=st.integers(0, 9))
    def append(self, layer, t):
        self.seed += 1
        k, v = rand((H, t, D), self.seed), rand((H, t, D), -self.seed % 2**31)
        self.store.append(layer, k, v)
        self.k[layer] = np.concatenate([self.k[layer], k], 1)
        self.v[layer] = np.concatenate([self.v[layer], v], 1)

    @rule()
    def evict(self):
        self.store.evict_all()

    @rule(layer=st.integers(0, 1), pages=st.lists(st.integers(0, 20), max_size=4))
    def prefetch(self, layer, pages):
        n = self.store.num_pages(layer)
        self.store.prefetch(layer, [p for p in pages if p < n])

    @precondition(lambda self: any(self.k[layer].shape[1] > 5 for layer in range(2)))
    @rule(layer=st.integers(0, 1), data=st.data())
    def read(self, layer, data):
        n = self.store.num_pages(layer)
        if n == 0:
            return
        p = data.draw(st.integers(0, n - 1))
        page = self.store.page(layer, p)
        lo = self.sinks + self.page_size * p
        kq, vq = self.kq[layer]
        for h in range(H):
            np.testing.assert_array_equal(
                page.k_codes[h], kq[h].encode(self.k[layer][h, lo : lo + page.tokens])
            )
            np.testing.assert_array_equal(
                page.v_codes[h], vq[h].encode(self.v[layer][h, lo : lo + page.tokens])
            )

    @rule()
    def save_and_reload(self):
        self.store.save(self.tmp / "ctx")
        self.store = ctxcore.KVStore.load(
            self.tmp / "ctx", ram_budget=self.budget, offload_dir=self.tmp / "off2"
        )

    @invariant()
    def counts_window_sinks_budget(self):
        if not hasattr(self, "store"):
            return
        for layer in range(2):
            n = self.k[layer].shape[1]
            assert self.store.num_tokens(layer) == n
            ks, vs = self.store.sinks(layer)
            np.testing.assert_array_equal(ks, self.k[layer][:, : min(n, self.sinks)])
            w = min(self.window, max(n - self.sinks, 0))
            kw, vw = self.store.window(layer)
            np.testing.assert_array_equal(vw, self.v[layer][:, n - w :])
            assert self.store.paged_tokens(layer) == n - min(n, self.sinks) - w
        st_ = self.store.stats()
        budget = self.store.config["ram_budget"]
        assert budget is None or st_["ram_bytes"] <= budget

    def teardown(self):
        import shutil

        if hasattr(self, "tmp"):
            shutil.rmtree(self.tmp, ignore_errors=True)


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(max_examples=25, stateful_step_count=25, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


def test_store_without_abstracts_saves_their_bytes_and_refuses_selection(tmp_path):
    with_abs, without = make_store(), make_store(abstracts=False)
    assert without.config["abstract_bytes"] == 0 < with_abs.config["abstract_bytes"]
    k, v = rand((H, 203, D), 5), rand((H, 203, D), 6)
    for s in (with_abs, without):
        s.append(0, k, v)
    pages = without.paged_tokens(0) // 8  # closed pages (the open one keeps running statistics)
    assert pages == with_abs.paged_tokens(0) // 8 > 0
    saved = with_abs.stats()["ram_bytes"] - without.stats()["ram_bytes"]
    assert saved == pages * with_abs.config["abstract_bytes"]
    q = rand((2 * H, 1, D), 7)
    np.testing.assert_array_equal(without.attend(0, q)[0], with_abs.attend(0, q)[0])
    for call in (lambda: without.attend(0, q, method="quest", budget=0.5), lambda: without.abstracts(0)):
        with pytest.raises(ConfigError, match="abstracts=True"):
            call()
    # the flag survives a save and a load; the loaded store attends the same
    without.save(tmp_path / "s")
    loaded = ctxcore.KVStore.load(tmp_path / "s")
    assert loaded.config["abstracts"] is False
    np.testing.assert_array_equal(loaded.attend(0, q)[0], without.attend(0, q)[0])
    with pytest.raises(ConfigError, match="abstracts"):
        loaded.attend(0, q, method="quest", budget=0.5)


def test_codebooks_round_trip_through_save(tmp_path):
    s = make_store()
    assert ctxcore.KVStore(1, H, D).codebooks(0) is None
    kc, vc = s.codebooks(1)
    kq, vq = quantizers(s, 1)
    assert kc.shape == (H, s.config["k_m"], 1 << s.config["k_nbits"], D // s.config["k_m"])
    np.testing.assert_array_equal(kc[1], kq[1].centroids)
    np.testing.assert_array_equal(vc[0], vq[0].centroids)
    s.save(tmp_path / "c")
    np.testing.assert_array_equal(ctxcore.KVStore.load(tmp_path / "c").codebooks(1)[0], kc)


def seq_state(s: ctxcore.KVStore, seq: int) -> list:
    """Everything observable of one sequence: per layer tokens, sinks, window, page codes, attention."""
    q = rand((2 * H, 1, D), 77)
    out = []
    for layer in range(s.config["layers"]):
        pages = [s.page(layer, p, seq) for p in range(s.num_pages(layer, seq))]
        out.append(
            (
                s.num_tokens(layer, seq),
                s.sinks(layer, seq)[0].tobytes(),
                s.window(layer, seq)[1].tobytes(),
                [(p.k_codes.tobytes(), p.v_codes.tobytes(), p.tokens) for p in pages],
                s.attend(layer, q, seq=seq)[0].tobytes(),
            )
        )
    return out


def beam_store(**kw) -> tuple[ctxcore.KVStore, list]:
    s = make_store(batch=2, **kw)
    for layer in range(2):
        s.append(layer, rand((H, 45, D), 10 + layer), rand((H, 45, D), 20 + layer), seq=0)
        s.append(layer, rand((H, 30, D), 30 + layer), rand((H, 30, D), 40 + layer), seq=1)
    return s, [seq_state(s, 0), seq_state(s, 1)]


def test_select_seqs_reorder_repeat_shrink(tmp_path):
    torch = pytest.importorskip("torch")
    s, old = beam_store(offload_dir=tmp_path / "off")
    pages = s.stats()["pages"]
    assert s.batch == 2 and s.config["batch"] == 2
    s.select_seqs([1, 0])
    assert s.batch == 2 and [seq_state(s, 0), seq_state(s, 1)] == [old[1], old[0]]
    s.select_seqs(np.array([1, 1, 0, 0]))  # -> old [0, 0, 1, 1]
    assert s.batch == 4 and s.config["batch"] == 2
    assert [seq_state(s, i) for i in range(4)] == [old[0], old[0], old[1], old[1]]
    assert s.stats()["pages"] == pages, "closed pages are shared, not copied"
    # Appending to one of two sequences sharing pages leaves the other as it was.
    for layer in range(2):
        s.append(layer, rand((H, 20, D), 50), rand((H, 20, D), 51), seq=1)
    assert seq_state(s, 0) == old[0] and s.num_tokens(0, seq=1) == 65
    # Shrink to one copy of the old sequence 1: pages only the others used leave RAM.
    ram = s.stats()["ram_bytes"]
    s.select_seqs(torch.tensor([3]))
    assert s.batch == 1 and seq_state(s, 0) == old[1]
    st = s.stats()
    assert st["ram_bytes"] < ram and st["pages"] == 2 * (s.paged_tokens(0) // 8)
    with pytest.raises(ConfigError):
        s.num_tokens(0, seq=1)


def test_select_seqs_errors_change_nothing():
    s, old = beam_store()
    for bad in ([], [0, 2], [-1], np.array([0.5]), [[0, 1]]):
        with pytest.raises(ConfigError):
            s.select_seqs(bad)
    assert s.batch == 2 and [seq_state(s, 0), seq_state(s, 1)] == old


def test_select_seqs_then_save_and_load(tmp_path):
    s, old = beam_store()
    s.save(tmp_path / "before", token_ids=[list(range(45)), list(range(100, 130))])
    s.select_seqs([1, 0, 1])
    assert [len(t) for t in s.metadata["token_ids"]] == [30, 45, 30]
    s.save(tmp_path / "ctx")
    loaded = ctxcore.KVStore.load(tmp_path / "ctx")
    assert loaded.batch == 3
    assert [seq_state(loaded, i) for i in range(3)] == [old[1], old[0], old[1]]
    assert loaded.stats()["pages"] == s.stats()["pages"]
    # Shared pages are written once: the segment is no bigger than before the selection.
    (seg_before,) = (tmp_path / "before").glob("pages-*.seg")
    (seg,) = (tmp_path / "ctx").glob("pages-*.seg")
    assert seg.stat().st_size == seg_before.stat().st_size
    assert loaded.matching_prefix(list(range(100, 116)), seq=2) == 16


def test_crop():
    s = make_store(batch=2)  # page_size 8, window 4, sinks 2
    k, v = rand((H, 30, D), 1), rand((H, 30, D), 2)
    for layer in range(2):
        s.append(layer, k, v, seq=0)
        s.append(layer, k[:, :5], v[:, :5], seq=1)  # nothing paged: 2 sinks + 3 window
    s.crop(3, seq=0)
    assert [s.num_tokens(layer, 0) for layer in range(2)] == [27, 27]
    np.testing.assert_array_equal(s.window(0)[0], k[:, 26:27])
    with pytest.raises(ConfigError, match=r"at most 1 .*PQ-coded"):
        s.crop(2, seq=0, layer=1)
    # Appending after a crop continues where it left off.
    s.append(0, k[:, 27:], v[:, 27:])
    np.testing.assert_array_equal(s.window(0)[1], v[:, 26:])
    assert s.num_tokens(0) == 30
    # No paged token yet: window, then sinks.
    s.crop(4, seq=1, layer=0)
    assert s.num_tokens(0, 1) == 1 and s.window(0, 1)[0].shape[1] == 0
    np.testing.assert_array_equal(s.sinks(0, 1)[0], k[:, :1])
    s.append(0, k[:, 1:12], v[:, 1:12], seq=1)
    np.testing.assert_array_equal(s.page(0, 0, seq=1).k_codes, s.page(0, 0, seq=0).k_codes[:, :6])
    # All sequences and layers, all or nothing: layer 0 of seq 0 holds 4 window tokens but
    # layer 1 only 1, so cropping 2 everywhere fails and changes nothing.
    before = [s.num_tokens(layer, seq) for seq in range(2) for layer in range(2)]
    with pytest.raises(ConfigError, match="at most 1"):
        s.crop(2)
    assert [s.num_tokens(layer, seq) for seq in range(2) for layer in range(2)] == before
    s.crop(1)
    assert [s.num_tokens(layer, seq) for seq in range(2) for layer in range(2)] == [n - 1 for n in before]
    with pytest.raises(ConfigError):
        s.crop(1, seq=2)
    with pytest.raises(ConfigError):
        s.crop(-1)


def test_one_budget_rule_for_cache_store_and_ops():
    """Selection budgets follow one rule everywhere: an int count >= 0 or a fraction in (0, 1]."""
    import torch
    from transformers import LlamaConfig

    from ctxcore import ops

    cfg = LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1,
    )  # fmt: skip
    s = make_store(keep_full_precision=True)
    s.append(0, rand((H, 200, D), 3), rand((H, 200, D), 4))
    q = rand((2 * H, 1, D), 5)
    abstracts = torch.from_numpy(s.abstracts(0))[None]
    for bad in (0.0, 1.5, -1, True, "10"):
        with pytest.raises(ConfigError, match="budget"):
            s.attend(0, q, method="quest", budget=bad)
        with pytest.raises(ConfigError, match="budget"):
            ops.select_pages(torch.from_numpy(q)[None], abstracts, bad)
        with pytest.raises(ConfigError, match="budget"):
            ctxcore.CompressedCache(cfg, select=bad)
    # The same good budgets are accepted by all three.
    for good in (0, 1, 64, 0.25, 1.0):
        s.attend(0, q, method="quest", budget=good)
        ops.select_pages(torch.from_numpy(q)[None], abstracts, good)
        ctxcore.CompressedCache(cfg, select=good)
