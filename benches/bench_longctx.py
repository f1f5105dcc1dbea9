"""Decode over a synthetic long context paged to disk under a RAM budget.

    python benches/bench_longctx.py [--tokens 131072,262144,1048576] [--budget 1GiB]
                                    [--peer-tokens 131072] [--steps 3] [--select 0.1]
                                    [--out bench-results/longctx.json]

No model can prefill a million tokens on a CPU in a benchmark's time, so the context is
synthetic: the default model (SmolLM2-135M-Instruct) prefills 2K tokens of real text, and each
layer's own keys and values (after RoPE) are tiled, with 5% noise, to ``--tokens`` and written
into the cache through the same path a prefill takes (encoding, paging, spilling). Then the model
decodes ``--steps`` greedy tokens at position ``--tokens``: every layer's attention reads all
pages through the ctxcore kernels, so each step streams the whole compressed context.

Rows (each method and length in its own process, so peak RSS is per process):
- ``ctxcore4`` / ``ctxcore2`` at each ``--tokens`` under ``--budget`` with pages on disk
  (a temporary directory; the first step starts from a cold page cache where it can be
  dropped, ``first_step_cold``);
- ``ctxcore4-select``: the same with ``select=--select`` (Quest selection by the page
  abstracts, attention over the selected pages' codes, only those pages read from disk);
- ``ctxcore4-pair`` (default): one fill, decoded first as ``ctxcore4`` then as
  ``ctxcore4-select`` (every page evicted from RAM and the page cache dropped in between), so
  dense-over-codes and selection are measured on the same pages;
- the peer in the same run: transformers ``DynamicCache`` (SDPA over float32 K/V) and ctxcore
  4-bit all in RAM, both at ``--peer-tokens`` (a DynamicCache of ``--tokens`` would need
  ``dense_bytes`` of RAM, printed, more than this machine has).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_store import drop_caches  # benches/ is on sys.path when a bench runs as a script

PREFIX = 2048
CHUNK = 32768


def one(method: str, tokens: int, budget: str | None, steps: int, select: float = 0.1) -> list[dict]:
    import torch
    from transformers import DynamicCache

    import ctxcore
    from ctxcore.models import SAMPLE_TEXT

    torch.manual_seed(0)
    model, tok = ctxcore.load_default_model()
    ids = torch.tensor(tok(SAMPLE_TEXT * 8)["input_ids"][:PREFIX])[None]
    ref = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=ref, use_cache=True)
    kv = [(lay.keys[0].float(), lay.values[0].float()) for lay in ref.layers]  # [H, PREFIX, D]
    del ref
    tmp = None
    if method == "full":
        cache = DynamicCache(config=model.config)
    else:
        bits = 4 if method.startswith("ctxcore4") else 2  # ctxcore4, -ram, -select, -pair
        ctxcore.enable(model)
        if budget is not None:
            tmp = tempfile.TemporaryDirectory(prefix="ctxcore-longctx-")
        # Selection is switched on after the fill (cache.select below): keep the page abstracts.
        cache = ctxcore.CompressedCache(
            model.config, bits=bits, ram_budget=budget, offload_dir=tmp.name if tmp else None,
            abstracts=method in ("ctxcore4-select", "ctxcore4-pair") or None,
        )  # fmt: skip
        cache.calibrate(model, ids)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(1)
    for li, (k, v) in enumerate(kv):
        ks, vs = k.std(), v.std()
        for s in range(0, tokens, CHUNK):
            idx = torch.arange(s, min(tokens, s + CHUNK)) % PREFIX
            kc = k[:, idx] + 0.05 * ks * torch.randn(k.shape[0], len(idx), k.shape[2], generator=gen)
            vc = v[:, idx] + 0.05 * vs * torch.randn(v.shape[0], len(idx), v.shape[2], generator=gen)
            if method == "full":
                cache.update(kc[None], vc[None], li)
            else:
                cache.layers[li].commit(kc[None], vc[None], [0])
        print(f"  {method}: layer {li + 1}/{len(kv)} filled", file=sys.stderr, flush=True)
    fill_s = time.perf_counter() - t0
    stats = cache.memory_stats() if method != "full" else None
    if stats is None:
        n = cache.get_seq_length()
        stats = {"tokens": n, "ram_bytes": sum(x.keys.nbytes + x.values.nbytes for x in cache.layers)}
    # "ctxcore4-pair": the same filled cache decodes dense over the codes, then with selection
    # (every page evicted from RAM and the page cache dropped in between).
    runs = (
        [("ctxcore4", None), ("ctxcore4-select", select)]
        if method == "ctxcore4-pair"
        else [(method, select if method.endswith("-select") else None)]
    )
    rows = []
    for name, sel in runs:
        if method != "full":
            cache.select = sel
            if budget is not None:
                cache.store.evict_all()
        cold = budget is not None and drop_caches()
        times, reads = _steps(model, cache, ids, tokens, steps, name, method != "full")
        # The first step pages everything in from the disk tier (cold if caches could be dropped).
        steady = times[1:] or times
        rows.append({
            "method": name,
            "tokens": tokens,
            "ram_budget": budget,
            "fill_s": fill_s,
            "step_s": times,
            "bytes_read_per_step": reads,
            "select": sel,
            "tokens_per_s": 1 / (sum(steady) / len(steady)),
            "first_step_cold": cold,
            "memory": stats,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        })  # fmt: skip
    if tmp is not None:
        tmp.cleanup()
    return rows


def _steps(model: Any, cache: Any, ids: Any, tokens: int, steps: int, name: str, paged: bool) -> tuple:
    import torch

    nxt = ids[:, -1:]
    times, reads = [], []
    with torch.no_grad():
        for i in range(steps):
            r0 = cache.store.stats()["bytes_read"] if paged else 0
            t = time.perf_counter()
            out = model(nxt, past_key_values=cache, use_cache=True, position_ids=torch.tensor([[tokens + i]]))
            times.append(time.perf_counter() - t)
            reads.append(cache.store.stats()["bytes_read"] - r0 if paged else 0)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            print(f"  {name}: step {i + 1}/{steps} {times[-1]:.2f} s", file=sys.stderr, flush=True)
    return times, reads


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default=str(1 << 20), help="context lengths, comma-separated")
    ap.add_argument("--budget", default="1GiB")
    ap.add_argument("--peer-tokens", type=int, default=1 << 17)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--methods", default="full,ctxcore4-ram,ctxcore4-pair,ctxcore2")
    ap.add_argument("--select", type=float, default=0.1, help="ctxcore4-select: fraction of the pages")
    ap.add_argument("--out", default="bench-results/longctx.json")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        method, tokens, budget = a.one.split(":")
        for row in one(method, int(tokens), budget or None, a.steps, a.select):
            print("ROW " + json.dumps(row), flush=True)
        return 0
    import torch  # noqa: F401  (fail early without torch)

    lengths = [int(x) for x in a.tokens.split(",")]
    rows = []
    for m in a.methods.split(","):
        peer = m in ("full", "ctxcore4-ram")
        for n in [a.peer_tokens] if peer else lengths:
            spec = f"{m}:{n}:{'' if peer else a.budget}"
            print(f"== {spec}", flush=True)
            p = subprocess.run(
                [sys.executable, __file__, "--one", spec, "--steps", str(a.steps), "--select", str(a.select)],
                capture_output=True, text=True,
            )  # fmt: skip
            got = [json.loads(x[4:]) for x in p.stdout.splitlines() if x.startswith("ROW ")]
            if p.returncode != 0 or not got:
                print(p.stderr[-3000:], file=sys.stderr)
                return 1
            for row in got:
                rows.append(row)
                mem = row["memory"]
                print(
                    f"{row['method']:<16} {row['tokens']:>9,} tokens  fill {row['fill_s']:6.1f} s  "
                    f"first step {row['step_s'][0]:6.2f} s{' (cold)' if row['first_step_cold'] else ''}  "
                    f"then {1 / row['tokens_per_s']:6.2f} s ({row['tokens_per_s']:.3f} tok/s)  "
                    f"RAM {mem['ram_bytes'] / 2**20:8.1f} MiB  "
                    f"disk {mem.get('disk_bytes', 0) / 2**20:8.1f} MiB  "
                    f"read/step {row['bytes_read_per_step'][-1] / 2**20:8.1f} MiB  "
                    f"peak RSS {row['peak_rss_bytes'] / 2**20:7.0f} MiB",
                    flush=True,
                )
    by = {(r["method"], r["tokens"]): r for r in rows}
    if ("full", a.peer_tokens) in by and ("ctxcore4-ram", a.peer_tokens) in by:
        f, c = by[("full", a.peer_tokens)], by[("ctxcore4-ram", a.peer_tokens)]
        print(
            f"ctxcore4 in RAM vs DynamicCache at {a.peer_tokens:,} tokens: step time ratio "
            f"{f['tokens_per_s'] / c['tokens_per_s']:.2f}x (<1 = ctxcore faster)"
        )
    for n in lengths:
        d, q = by.get(("ctxcore4", n)), by.get(("ctxcore4-select", n))
        if d and q and d["bytes_read_per_step"][-1]:
            speed = q["tokens_per_s"] / d["tokens_per_s"]
            read = q["bytes_read_per_step"][-1] / max(1, d["bytes_read_per_step"][-1])  # per step
            print(
                f"{n:>9,} tokens: selection vs dense over codes: {speed:.2f}x the speed, {read:.2f}x the read"
            )
    # float32 K/V of the default model: 30 layers x 3 KV heads x 64 dims x 2 (K and V) x 4 bytes.
    dense = {n: n * 30 * 3 * 64 * 2 * 4 for n in lengths}
    for n, b in dense.items():
        print(f"a DynamicCache of {n:,} tokens would hold {b / 2**30:.1f} GiB of float32 K/V")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine()}
    out.write_text(json.dumps({**meta, "dense_bytes_at_tokens": dense, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
