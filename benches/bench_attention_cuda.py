"""Decode attention on an NVIDIA GPU (one step, Tq=1, one layer): ctxcore's CUDA kernels over PQ
codes vs torch SDPA (flash backend) over dense float16 K/V. Run through
``python benches/bench_attention.py --device cuda`` (or this file directly).

Llama-3-8B shape (32 query heads, 8 KV heads, head_dim 128), batch 1 and 16, 32K / 128K / 1M
tokens (rows that do not fit in GPU memory are reported as skipped):

  sdpa     ``scaled_dot_product_attention`` with the flash backend over float16 K/V, the query
           heads of each KV head as query rows (no K/V expansion).
  bits4    ``ctxcore.ops.pq_attention`` in the layout of ``CompressedCache(bits=4)`` /
           ``KVStore(bits=4)`` (``ctxcore.bits_to_pq``: keys 8-bit codes over 2 dims, values 4-bit
           codes over 1 dim), plus a float16 part of 4 sinks + 128 recent tokens.
  bits2    the layout of ``bits=2``: 8-bit codes over 4 dims for keys and values.
  extra_k64x4_v64x4  a labelled extra, no ``bits`` setting: 4-bit codes over 1 dim for both.
  quest5   ``ctxcore.ops.quest_attention``, 5% of the pages (64 tokens): ``page_scores`` on
           per-page key bounds, ``torch.topk``, ``gather_pages`` of the selected float16 K/V,
           exact attention over them + sinks + window (``pq_attention`` with no codes).

Codes are random bytes (every byte is a valid code; the cost does not depend on the values).
Timing: CUDA events around each call on torch's current stream, median of ``--repeat`` runs
after a warm-up. Columns: time, speedup vs sdpa, bytes the method must read per step, achieved
GB/s, and that as a share of the GPU's copy bandwidth measured in the same run.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import torch

import ctxcore
from ctxcore import ops

F = torch.nn.functional
HQ, HKV, D = 32, 8, 128
SINKS, WINDOW, PAGE, QUEST_FRACTION = 4, 128, 64, 0.05


def cuda_time(fn, repeat: int) -> float:
    """Median seconds of ``fn`` on the current stream (CUDA events)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return times[len(times) // 2]


def device_bandwidth() -> float:
    """GB/s of a 2 GiB device-to-device copy (bytes read + written)."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), 5)
    return 2 * n / t / 1e9


def bench(batch: int, n: int, repeat: int) -> list[dict]:
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(n + batch)
    half = torch.float16
    q = torch.randn(batch, HQ, 1, D, device=dev, dtype=half, generator=g)
    n_fp = SINKS + WINDOW
    fp_k = torch.randn(batch, HKV, n_fp, D, device=dev, dtype=half, generator=g)
    fp_v = torch.randn_like(fp_k)
    rows: list[dict] = []

    def row(method: str, t: float | None, nbytes: int, **extra) -> None:
        rows.append(
            {
                "batch": batch,
                "tokens": n,
                "method": method,
                "time_ms": None if t is None else t * 1e3,
                "bytes": nbytes,
                "GBps": None if t is None else nbytes / t / 1e9,
                **extra,
            }
        )

    # sdpa over dense float16 K/V (flash backend), and quest5 over the same K/V.
    try:
        k = torch.randn(batch, HKV, n, D, device=dev, dtype=half, generator=g)
        v = torch.randn_like(k)
    except torch.OutOfMemoryError:
        k = v = None
        row("sdpa", None, 0, skipped="dense float16 K/V do not fit in GPU memory")
    if k is not None:
        qg = q.view(batch, HKV, HQ // HKV, D)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            t = cuda_time(lambda: F.scaled_dot_product_attention(qg, k, v), repeat)
        row("sdpa", t, 2 * k.numel() * 2, backend="flash")

        bounds = ops.page_bounds(k, PAGE)  # kept up to date as pages fill, not per step
        top = max(1, math.ceil(QUEST_FRACTION * (n // PAGE)))

        def quest():
            return ops.quest_attention(
                q, k, v, QUEST_FRACTION, page_size=PAGE, fp_k=fp_k, fp_v=fp_v, bounds=bounds
            )

        nbytes = 2 * bounds[0].numel() * 2 + 2 * top * PAGE * batch * HKV * D * 2 + 2 * fp_k.numel() * 2
        row("quest5", cuda_time(quest, repeat), nbytes, pages_selected=top)
        k = v = bounds = None  # free before the codes

    # The layouts of KVStore/CompressedCache(bits=4) and (bits=2) (ctxcore.bits_to_pq), and a
    # labelled extra: 4-bit codes over 1 dim for keys and values.
    layouts = {
        "bits4": ctxcore.bits_to_pq(4, D),
        "bits2": ctxcore.bits_to_pq(2, D),
        "extra_k64x4_v64x4": ((D, 4), (D, 4)),
    }
    for method, ((km, kb), (vm, vb)) in layouts.items():
        ck, cv = (km * kb + 7) // 8, (vm * vb + 7) // 8
        try:
            kc = torch.randint(0, 256, (batch, HKV, n, ck), dtype=torch.uint8, device=dev, generator=g)
            vc = torch.randint(0, 256, (batch, HKV, n, cv), dtype=torch.uint8, device=dev, generator=g)
        except torch.OutOfMemoryError:
            row(method, None, 0, skipped="codes do not fit in GPU memory")
            continue
        kcent = torch.randn(HKV, km, 1 << kb, D // km, device=dev, generator=g)
        vcent = torch.randn(HKV, vm, 1 << vb, D // vm, device=dev, generator=g)
        t = cuda_time(lambda: ops.pq_attention(q, kc, vc, kcent, vcent, fp_k, fp_v), repeat)  # noqa: B023
        nbytes = kc.numel() + vc.numel() + 2 * fp_k.numel() * 2 + (kcent.numel() + vcent.numel()) * 4
        row(method, t, nbytes, bits_per_element=8 * (ck + cv) / (2 * D))
        kc = vc = None  # free before the next method's codes
    torch.cuda.empty_cache()
    sdpa = next((r for r in rows if r["method"] == "sdpa" and r["time_ms"]), None)
    for r in rows:
        r["speedup_vs_sdpa"] = sdpa["time_ms"] / r["time_ms"] if sdpa and r["time_ms"] else None
    return rows


def main(lengths: list[int], batches: list[int], repeat: int, out: str) -> None:
    if not ops.cuda_available():
        raise SystemExit("no GPU that ctxcore's CUDA kernels can run on (ctxcore.ops.cuda_available())")
    name, cc, sms, smem = ctxcore._ctxcore.cuda_device_info(torch.cuda.current_device())
    bw = device_bandwidth()
    print(f"{name} (sm_{cc[0]}{cc[1]}, {sms} SMs): device copy bandwidth {bw:.0f} GB/s")
    rows = []
    for b in batches:
        for n in lengths:
            rows += bench(b, n, repeat)
    hdr = (
        f"{'batch':>5} {'tokens':>8} {'method':<17} {'ms':>9} {'vs sdpa':>8} {'MB/step':>9} "
        f"{'GB/s':>7} {'% bw':>5}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if r["time_ms"] is None:
            print(f"{r['batch']:>5} {r['tokens']:>8} {r['method']:<17} skipped: {r['skipped']}")
            continue
        r["bandwidth_share"] = r["GBps"] / bw
        vs = f"{r['speedup_vs_sdpa']:>7.2f}x" if r["speedup_vs_sdpa"] else f"{'-':>8}"
        print(
            f"{r['batch']:>5} {r['tokens']:>8} {r['method']:<17} {r['time_ms']:>9.3f} {vs} "
            f"{r['bytes'] / 1e6:>9.1f} {r['GBps']:>7.0f} {100 * r['bandwidth_share']:>4.0f}%"
        )
    result = {
        "bench": "attention_cuda",
        "ctxcore_version": ctxcore.__version__,
        "torch_version": torch.__version__,
        "gpu": {"name": name, "capability": cc, "sm_count": sms, "max_smem_per_block": smem},
        "host": platform.platform(),
        "device_copy_GBps": bw,
        "shape": {"query_heads": HQ, "kv_heads": HKV, "head_dim": D},
        "settings": {"sinks": SINKS, "window": WINDOW, "page_size": PAGE, "quest_fraction": QUEST_FRACTION},
        "repeat": repeat,
        "statistic": "median",
        "rows": rows,
    }
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(result, indent=2))
    print(f"wrote {p}")


if __name__ == "__main__":
    import argparse

    from bench_attention import parse_len

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", nargs="+", default=["32K", "128K", "1M"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out", default="bench-results/bench_attention_cuda.json")
    a = ap.parse_args()
    main([parse_len(s) for s in a.lengths], a.batches, a.repeat, a.out)
