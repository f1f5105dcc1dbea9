"""Decode attention (one step, Tq=1, one layer): ctxcore over PQ codes vs torch SDPA.

Per model shape (SmolLM2-135M: 9 query / 3 KV heads, head_dim 64; Llama-3-8B: 32 / 8, 128) and
context length (default 8K, 32K, 128K tokens), on the same thread count for both libraries:

  sdpa       torch ``scaled_dot_product_attention`` over dense float32 K/V: the faster of
             ``enable_gqa=True`` and the grouped-query view (q as ``[1, Hkv, Hq/Hkv, D]``, no K/V
             expansion); both are in the JSON.
  sdpa_bf16  the same SDPA (grouped view) over bfloat16 K/V: the half-precision peer.
  bits4      ``ctxcore.ops.pq_attention`` over codes in the layout of ``bits=4`` (the default of
             ``KVStore`` and ``CompressedCache``, ``ctxcore.bits_to_pq``: keys 8-bit codes over
             2 dims, values 4-bit codes over 1 dim), plus a float32 part of 4 sinks + 128 recent
             tokens.
  bits2      the same in the layout of ``bits=2`` (8-bit codes over 4 dims for K and V).
  extra_k64x4_v64x4  a labelled extra: 4-bit codes over 1 dim for keys and values (4 bits per
             element; the fastest kernels, but no ``bits`` setting uses it for keys).
  quest5     selective attention, Quest-style, 5% of the history: ``ctxcore.ops.page_scores``
             over per-page min/max keys (64-token pages), top-k pages per KV head, exact
             attention over the selected pages where they lie plus sinks + window
             (``ctxcore.ops.paged_attention``: no gather copy). This times the kernel path with
             K/V already in RAM tensors (no ``KVStore`` page reads).
  quest5+sdpa  the same selection, the pages gathered into a preallocated buffer
             (``index_select``) and torch SDPA over it: the peer a user would build with torch.

Codes and codebooks are random (any byte is a valid code): the cost of attention over codes does
not depend on their values. Columns: median time over rounds that call every method once each
(interleaved, so phases of a shared machine hit all methods alike), speedup vs sdpa (> 1 means
faster than sdpa), bytes that must be read per step (sdpa: K + V float32; pq: codes + fp part +
codebooks; quest: page bounds + selected K/V + fp part), achieved GB/s = bytes / time, next to
the machine's memory bandwidth measured with a large numpy copy (and a multi-threaded torch
copy). Also reports the relative error of quest5 vs exact attention on random data (where
attention is diffuse, the worst case for selection) and on structured data (a few runs of keys
aligned with the query, as in retrieval heads).

Writes JSON (default bench-results/bench_attention.json).

Usage: python benches/bench_attention.py [--lengths 8K 32K 128K 1M] [--threads 2] [--repeat 7]
       python benches/bench_attention.py --device cuda [--lengths 32K 128K 1M] [--batches 1 16]
       (the GPU benchmark: benches/bench_attention_cuda.py)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

import ctxcore
from ctxcore import ops

F = torch.nn.functional
SHAPES = {"SmolLM2-135M": (9, 3, 64), "Llama-3-8B": (32, 8, 128)}
SINKS, WINDOW, PAGE, QUEST_FRACTION = 4, 128, 64, 0.05


def parse_len(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1024, "M": 1024 * 1024}.get(s[-1:], 1)
    return int(float(s.rstrip("KM")) * mult)


def median_time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def memory_bandwidth(threads: int) -> dict:
    """GB/s of a large copy (bytes read + bytes written): numpy (one thread) and torch (threads)."""
    n = 256 * 1024 * 1024 // 4  # 256 MiB of float32
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    t_np = min(median_time(lambda: np.copyto(dst, src), 1) for _ in range(3))
    ts, td = torch.from_numpy(src), torch.from_numpy(dst)
    t_t = min(median_time(lambda: td.copy_(ts), 1) for _ in range(3))
    return {
        "numpy_copy_GBps": 2 * src.nbytes / t_np / 1e9,
        "torch_copy_GBps": 2 * src.nbytes / t_t / 1e9,
        "threads": threads,
    }


class Quest:
    """Quest selection over in-RAM float32 K/V ``[1, Hkv, N, D]`` (page bounds precomputed).

    ctxcore attends the selected pages where they are (``ops.paged_attention``); the SDPA peer
    needs them gathered into a contiguous buffer first (``index_select`` into a preallocated
    buffer, the cheapest gather torch offers)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, fp_k: torch.Tensor, fp_v: torch.Tensor, frac: float):
        _, hkv, n, d = k.shape
        self.k, self.v, self.fp_k, self.fp_v = k.contiguous(), v.contiguous(), fp_k, fp_v
        self.pages = n // PAGE
        self.kmin, self.kmax = ops.page_bounds(self.k, PAGE)
        self.top = max(1, math.ceil(frac * self.pages))
        self.k4 = self.k[0, :, : self.pages * PAGE].view(hkv, self.pages, PAGE, d)
        self.v4 = self.v[0, :, : self.pages * PAGE].view(hkv, self.pages, PAGE, d)
        sel = self.top * PAGE
        # SDPA peer: selected pages first, then sinks + window (order does not matter without a
        # causal mask inside the history; the queries' own positions stay last)
        self.buf_k = torch.empty(1, hkv, sel + fp_k.shape[2], d)
        self.buf_v = torch.empty_like(self.buf_k)
        self.buf_k[:, :, sel:] = fp_k
        self.buf_v[:, :, sel:] = fp_v
        self.hkv, self.d = hkv, d

    def select(self, q: torch.Tensor) -> torch.Tensor:
        """Top pages per KV head, ``[1, Hkv, top]``."""
        return ops.page_scores(q, self.kmin, self.kmax).topk(self.top, dim=-1, sorted=False).indices

    def attend(self, q: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        return ops.paged_attention(q, self.k, self.v, sel, PAGE, self.fp_k, self.fp_v)[0]

    def gather(self, sel: torch.Tensor) -> None:
        n = self.top * PAGE
        for h in range(self.hkv):
            out_k = self.buf_k[0, h, :n].view(self.top, PAGE, self.d)
            out_v = self.buf_v[0, h, :n].view(self.top, PAGE, self.d)
            torch.index_select(self.k4[h], 0, sel[0, h], out=out_k)
            torch.index_select(self.v4[h], 0, sel[0, h], out=out_v)

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        return self.attend(q, self.select(q))

    def bytes(self) -> int:
        return (2 * self.kmin.numel() + 2 * self.buf_k.numel()) * 4


def interleaved_medians(fns: dict, repeat: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in rounds (each function once per round,
    after one warm-up call each): every method samples the same stretch of time, so phases of a
    shared machine (its speed moves by 20-40% over seconds on the development VM) hit all of them
    alike instead of whichever ran then. Each round runs them in a new (seeded) random order, so
    no method always follows the same one (e.g. SDPA with ``enable_gqa``, which allocates and
    frees expanded K/V copies)."""
    for fn in fns.values():
        fn()
    rng = np.random.default_rng(0)
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for i in rng.permutation(len(names)):
            t = time.perf_counter()
            fns[names[i]]()
            times[names[i]].append(time.perf_counter() - t)
    return {name: float(np.median(ts)) for name, ts in times.items()}


def bench_shape(name: str, shape: tuple[int, int, int], n: int, repeat: int, seed: int) -> list[dict]:
    hq, hkv, d = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, 1, d, generator=g)
    k = torch.randn(1, hkv, n, d, generator=g)
    v = torch.randn(1, hkv, n, d, generator=g)
    qg = q.view(1, hkv, hq // hkv, d)
    n_fp = SINKS + WINDOW
    fp_k, fp_v = k[:, :, n - n_fp :].contiguous(), v[:, :, n - n_fp :].contiguous()

    fns = {}
    nbytes = {}
    # sdpa: the faster of the two ways a user would call it
    fns["sdpa_grouped"] = lambda: F.scaled_dot_product_attention(qg, k, v)
    if hq // hkv * k.numel() * 4 <= 4 << 30:  # enable_gqa expands K/V on the CPU
        fns["sdpa_enable_gqa"] = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    # The layouts users get (ctxcore.bits_to_pq: KVStore(bits=b) and CompressedCache(bits=b))
    # and, as a labelled extra, 4-bit scalar codes for keys and values (no bits setting).
    layouts = {
        "bits4": ctxcore.bits_to_pq(4, d),
        "bits2": ctxcore.bits_to_pq(2, d),
        "extra_k64x4_v64x4": ((d, 4), (d, 4)),
    }
    for method, ((km, kb), (vm, vb)) in layouts.items():
        ck, cv = (km * kb + 7) // 8, (vm * vb + 7) // 8
        kc = torch.randint(0, 256, (1, hkv, n - n_fp, ck), dtype=torch.uint8, generator=g)
        vc = torch.randint(0, 256, (1, hkv, n - n_fp, cv), dtype=torch.uint8, generator=g)
        kcent = torch.randn(hkv, km, 1 << kb, d // km, generator=g)
        vcent = torch.randn(hkv, vm, 1 << vb, d // vm, generator=g)
        fns[method] = lambda kc=kc, vc=vc, kcent=kcent, vcent=vcent: ops.pq_attention(
            q, kc, vc, kcent, vcent, fp_k, fp_v
        )
        floats = fp_k.numel() + fp_v.numel() + kcent.numel() + vcent.numel()
        nbytes[method] = kc.numel() + vc.numel() + floats * 4
    # The half-precision peer: what most users hold (bf16 K/V; fp16 SDPA is slower on CPUs).
    qh, kh, vh = qg.bfloat16(), k.bfloat16(), v.bfloat16()
    fns["sdpa_bf16"] = lambda: F.scaled_dot_product_attention(qh, kh, vh)

    quest = Quest(k[:, :, : n - n_fp], v[:, :, : n - n_fp], fp_k, fp_v, QUEST_FRACTION)
    sel = quest.select(q)
    quest.gather(sel)

    def quest_sdpa():
        quest.gather(quest.select(q))
        return F.scaled_dot_product_attention(qg, quest.buf_k, quest.buf_v)

    fns["quest5"] = lambda: quest(q)
    fns["quest5+sdpa"] = quest_sdpa
    # the pieces: ctxcore's selection and attention; the SDPA peer's gather and SDPA
    fns["select"] = lambda: quest.select(q)
    fns["attend"] = lambda: quest.attend(q, sel)
    fns["gather"] = lambda: quest.gather(sel)
    fns["attend_sdpa"] = lambda: F.scaled_dot_product_attention(qg, quest.buf_k, quest.buf_v)
    t = interleaved_medians(fns, repeat)

    rows = []

    def row(method: str, sec: float, nb: int, **extra) -> None:
        r = {"model": name, "tokens": n, "method": method, "time_ms": sec * 1e3, "bytes": nb}
        rows.append(r | {"GBps": nb / sec / 1e9} | extra)

    t_sdpa = min(t[k] for k in ("sdpa_grouped", "sdpa_enable_gqa") if k in t)
    row(
        "sdpa",
        t_sdpa,
        (k.numel() + v.numel()) * 4,
        sdpa_grouped_ms=t["sdpa_grouped"] * 1e3,
        sdpa_enable_gqa_ms=t["sdpa_enable_gqa"] * 1e3 if "sdpa_enable_gqa" in t else None,
    )
    row("sdpa_bf16", t["sdpa_bf16"], (k.numel() + v.numel()) * 2)
    for method, layout in layouts.items():
        bpe = 4 if method != "bits2" else 2
        row(
            method,
            t[method],
            nbytes[method],
            bits_per_element=bpe,
            layout=f"K {layout[0][0]}x{layout[0][1]}-bit, V {layout[1][0]}x{layout[1][1]}-bit",
            speedup_vs_sdpa_bf16=t["sdpa_bf16"] / t[method],
        )
    parts = {f"{p}_ms": t[p] * 1e3 for p in ("select", "attend", "gather", "attend_sdpa")}
    row("quest5", t["quest5"], quest.bytes(), pages_selected=quest.top, pages=quest.pages, **parts)
    row("quest5+sdpa", t["quest5+sdpa"], quest.bytes())
    for r in rows:
        r["speedup_vs_sdpa"] = t_sdpa / (r["time_ms"] / 1e3)
    return rows


def quest_error(n: int, structured: bool, seed: int) -> dict:
    """quest5 vs exact attention (SmolLM2 shape): relative L2 error of the output, and the share
    of the exact softmax mass on the tokens quest5 attends to (mean over query heads)."""
    hq, hkv, d = SHAPES["SmolLM2-135M"]
    grp = hq // hkv
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, hkv, n, d, generator=g)
    v = torch.randn(1, hkv, n, d, generator=g)
    q = torch.randn(1, hq, 1, d, generator=g)
    fp = SINKS + WINDOW
    if structured:
        # per KV head: 10 runs of 32 keys aligned with the group's mean query direction
        for h in range(hkv):
            u = q[0, h * grp : (h + 1) * grp, 0].mean(0)
            u = u / u.norm()
            q[0, h * grp : (h + 1) * grp, 0] += 6 * u
            for s in torch.randint(0, n - 32 - fp, (10,), generator=g).tolist():
                k[0, h, s : s + 32] += 6 * u
    qg = q.view(1, hkv, grp, d)
    exact = F.scaled_dot_product_attention(qg, k, v).view_as(q)
    quest = Quest(k[:, :, : n - fp], v[:, :, : n - fp], k[:, :, n - fp :], v[:, :, n - fp :], QUEST_FRACTION)
    sel = quest.select(q)
    out = quest(q)
    probs = torch.softmax(qg @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)[0]  # [Hkv, grp, n]
    mask = torch.zeros(hkv, n, dtype=torch.bool)
    mask[:, n - fp :] = True
    for h in range(hkv):
        for p in sel[0, h].tolist():
            mask[h, p * PAGE : (p + 1) * PAGE] = True
    recall = float((probs * mask[:, None]).sum(-1).mean())
    return {"rel_l2_error": float((out - exact).norm() / exact.norm()), "mass_recall": recall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", nargs="+", default=["8K", "32K", "128K"], help="context lengths, e.g. 8K 1M")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", default=None, help="default: bench-results/bench_attention[_cuda].json")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16], help="batch sizes (--device cuda)")
    args = ap.parse_args()
    if args.device == "cuda":
        import sys

        sys.path.insert(0, str(Path(__file__).parent))
        import bench_attention_cuda

        lengths = args.lengths if args.lengths != ["8K", "32K", "128K"] else ["32K", "128K", "1M"]
        bench_attention_cuda.main(
            [parse_len(s) for s in lengths],
            args.batches,
            max(args.repeat, 20),
            args.out or "bench-results/bench_attention_cuda.json",
        )
        return
    args.out = args.out or "bench-results/bench_attention.json"
    torch.set_num_threads(args.threads)
    ctxcore.set_num_threads(args.threads)
    lengths = [parse_len(s) for s in args.lengths]

    bw = memory_bandwidth(args.threads)
    peak = max(bw["numpy_copy_GBps"], bw["torch_copy_GBps"])
    print(
        f"threads={args.threads}  memory bandwidth: numpy copy {bw['numpy_copy_GBps']:.1f} GB/s, "
        f"torch copy ({args.threads} threads) {bw['torch_copy_GBps']:.1f} GB/s"
    )
    rows = []
    for name, shape in SHAPES.items():
        for n in lengths:
            rows += bench_shape(name, shape, n, args.repeat, seed=n)

    hdr = (
        f"{'model':<13} {'tokens':>8} {'method':<17} {'ms':>9} {'vs sdpa':>8} {'MB/step':>9} "
        f"{'GB/s':>6} {'% bw':>5}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(
            f"{r['model']:<13} {r['tokens']:>8} {r['method']:<17} {r['time_ms']:>9.2f} "
            f"{r['speedup_vs_sdpa']:>7.2f}x {r['bytes'] / 1e6:>9.1f} {r['GBps']:>6.2f} "
            f"{100 * r['GBps'] / peak:>4.0f}%"
        )
    errors = {
        "random 32K": quest_error(32768, False, 1),
        "structured 32K": quest_error(32768, True, 2),
    }
    for what, e in errors.items():
        print(
            f"quest5 vs exact attention, SmolLM2 shape, {what} data: relative L2 error "
            f"{e['rel_l2_error']:.4f}, softmax mass on the attended tokens {e['mass_recall']:.3f}"
        )

    result = {
        "bench": "attention",
        "ctxcore_version": ctxcore.__version__,
        "torch_version": torch.__version__,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "avx2": ctxcore.cpu_has_avx2(),
            "simd": ctxcore.cpu_simd(),
        },
        "threads": args.threads,
        "memory_bandwidth": bw,
        "settings": {
            "sinks": SINKS,
            "window": WINDOW,
            "page_size": PAGE,
            "quest_fraction": QUEST_FRACTION,
            "repeat": args.repeat,
            "statistic": "median of interleaved rounds (each method once per round)",
        },
        "rows": rows,
        "quest_relative_error": errors,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
