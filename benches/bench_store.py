"""Paged KV store: disk-tier page-in vs a plain sequential read, and prefetch hiding.

1. page-in: every page of an evicted context read back through ``KVStore.page`` (pread + CRC
   check + copy into numpy), vs a plain sequential Python read of the same segment files, same
   bytes, same disk, same run. Goal >= 0.8x.
2. prefetch: a sequential scan (PQ-score every page's keys, as decode attention would) over a
   context 10x the RAM budget, with prefetch of the next pages on, vs the same scan with the
   whole context in RAM. Goal <= 1.2x the all-in-RAM time.

When the page cache can be dropped (root, /proc/sys/vm/drop_caches writable) reads are cold;
otherwise both sides read from the page cache, which is reported. Writes JSON.

Usage: python benches/bench_store.py [--mb 512] [--budget-mb 48] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import ctxcore

H, D, P = 8, 128, 64  # Llama-8B-like KV heads and head_dim, 64-token pages


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def build(dirpath: Path, target_bytes: int, budget: int | None, keep_fp: bool = True) -> ctxcore.KVStore:
    s = ctxcore.KVStore(1, H, D, page_size=P, window=0, sinks=0, bits=4, keep_full_precision=keep_fp,
                        ram_budget=budget, offload_dir=dirpath)  # fmt: skip
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((H, 1024, D), np.float32)
    s.calibrate(0, sample, sample, iters=2)
    page = s.config["page_bytes"]
    chunk = rng.standard_normal((H, 16 * P, D), np.float32)
    while s.stats()["pages"] * page < target_bytes:
        s.append(0, chunk, chunk)
    return s


def bench_page_in(tmp: Path, mb: int) -> dict:
    s = build(tmp / "pagein", mb << 20, None)
    n = s.num_pages(0)
    s.evict_all()
    segs = sorted((tmp / "pagein").glob("offload-*.seg"))
    total = sum(p.stat().st_size for p in segs)
    res = {"pages": n, "bytes": total, "page_bytes": s.config["page_bytes"]}
    cold = drop_caches()
    res["cold_cache"] = cold
    times_store, times_read = [], []
    buf = bytearray(8 << 20)
    for _ in range(3):
        s.evict_all()
        drop_caches()
        t = time.perf_counter()
        for p in range(n):
            s.page(0, p)
        times_store.append(time.perf_counter() - t)
        drop_caches()
        t = time.perf_counter()
        for path in segs:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
        times_read.append(time.perf_counter() - t)
    res["store_gbps"] = total / min(times_store) / 1e9
    res["plain_read_gbps"] = total / min(times_read) / 1e9
    res["ratio"] = res["store_gbps"] / res["plain_read_gbps"]
    res["stats"] = s.stats()
    return res


#: Peak of the store's RAM (``stats()["ram_bytes"]``) sampled during the scans, every
#: ``SAMPLE_EVERY`` pages (the figure the budget bounds, at its highest, not at the end).
PEAK = {"ram_bytes": 0}
SAMPLE_EVERY = 32


def scan(s: ctxcore.KVStore, pq: ctxcore.ProductQuantizer, q: np.ndarray, prefetch: int) -> float:
    n = s.num_pages(0)
    t = time.perf_counter()
    if prefetch:
        s.prefetch(0, list(range(min(prefetch, n))))
    acc = 0.0
    for p in range(n):
        if prefetch and p + prefetch < n:
            s.prefetch(0, [p + prefetch])
        page = s.page(0, p)
        for h in range(H):
            acc += float(pq.inner_products(q, page.k_codes[h]).max())
        if p % SAMPLE_EVERY == 0:
            PEAK["ram_bytes"] = max(PEAK["ram_bytes"], s.stats()["ram_bytes"])
    return time.perf_counter() - t


def bench_prefetch(tmp: Path, budget_mb: int) -> dict:
    budget = budget_mb << 20
    target = 10 * budget
    in_ram = build(tmp / "ram", target, None)
    paged = build(tmp / "paged", target, budget)
    pq = ctxcore.ProductQuantizer(D, 128, 4)
    pq.train(np.random.default_rng(1).standard_normal((512, D), np.float32), iters=2)
    q = np.random.default_rng(2).standard_normal((4, D), np.float32)
    res = {"budget_bytes": budget, "context_bytes": paged.stats()["pages"] * paged.config["page_bytes"]}
    scan(in_ram, pq, q, 0)  # warm-up
    res["all_in_ram_s"] = min(scan(in_ram, pq, q, 0) for _ in range(3))
    runs_pf, runs_nopf = [], []
    PEAK["ram_bytes"] = 0  # the paged scans only
    for _ in range(3):
        paged.evict_all()
        drop_caches()
        runs_nopf.append(scan(paged, pq, q, 0))
        paged.evict_all()
        drop_caches()
        runs_pf.append(scan(paged, pq, q, 8))
    res["paged_no_prefetch_s"] = min(runs_nopf)
    res["paged_prefetch_s"] = min(runs_pf)
    res["ratio_prefetch_vs_ram"] = res["paged_prefetch_s"] / res["all_in_ram_s"]
    res["ratio_no_prefetch_vs_ram"] = res["paged_no_prefetch_s"] / res["all_in_ram_s"]
    st = paged.stats()
    res["max_ram_bytes_seen"] = PEAK["ram_bytes"]  # sampled during the paged scans
    res["ram_bytes_at_end"] = st["ram_bytes"]
    res["stats"] = st
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=512, help="context size for the page-in test (MiB)")
    ap.add_argument("--budget-mb", type=int, default=32, help="RAM budget for the prefetch test (MiB)")
    ap.add_argument("--dir", default=None, help="where to put the disk tier (default: a temp dir)")
    ap.add_argument("--out", default="bench-results/bench_store.json")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="ctxcore-bench-", dir=args.dir))
    try:
        page_in = bench_page_in(tmp, args.mb)
        print(f"page-in: {page_in['store_gbps']:.2f} GB/s vs plain sequential read "
              f"{page_in['plain_read_gbps']:.2f} GB/s -> ratio {page_in['ratio']:.2f} (goal >= 0.8; "
              f"{'cold' if page_in['cold_cache'] else 'warm page cache'})")  # fmt: skip
        shutil.rmtree(tmp / "pagein", ignore_errors=True)
        pf = bench_prefetch(tmp, args.budget_mb)
        print(f"scan of {pf['context_bytes'] / 2**20:.0f} MiB under a {args.budget_mb} MiB budget: "
              f"prefetch {pf['paged_prefetch_s']:.3f}s, no prefetch {pf['paged_no_prefetch_s']:.3f}s, "
              f"all in RAM {pf['all_in_ram_s']:.3f}s -> ratio {pf['ratio_prefetch_vs_ram']:.2f} "
              f"(goal <= 1.2)")  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "ctxcore": ctxcore.__version__,
        "page_in": page_in,
        "prefetch": pf,
        "goals_met": {"page_in": page_in["ratio"] >= 0.8, "prefetch": pf["ratio_prefetch_vs_ram"] <= 1.2},
    }
    out.write_text(json.dumps(result, indent=2))
    print("->", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
