"""End to end on the default model: the default ``CompressedCache(config, bits=4)`` vs
``DynamicCache``, in one process, interleaved repetitions.

Two ctxcore rows: ``ctxcore4`` is the default as a user meets it once the model's codebooks are
in the codebook cache (published beforehand by one context of *other* text, 200K tokens away;
see ``ctxcore.codebooks``), ``ctxcore4-train`` is a model's first context, which trains its
codebooks (``codebooks="train"``).

Per context length (default 2K, 4K, 7K tokens of tinyshakespeare or ``--text``):

  TTFT   prefill + first decode step, everything counted (calibration, compression);
  TPOT   mean of ``--steps`` greedy decode steps after the first token;
  KV     bytes per cached token (``memory_stats()["compressed_bytes"] / tokens`` for ctxcore,
         fp16-equivalent K/V for DynamicCache: ``dense_fp16_bytes``), divided by the tokens
         actually cached.

Then a batch of ``--batch`` sequences of ``--batch-tokens`` tokens (different text per row):
decode throughput (tokens/s over ``--steps`` steps) for both caches.

Ratios > 1 mean ctxcore is better (faster, or fewer bytes). Every figure is the median of
``--reps`` interleaved repetitions (full, ctxcore, ..., the order rotated by one per repetition so
that no cache always runs right after another); min and max are kept in the
JSON (default bench-results/e2e.json). ``paired`` also gives the ratios per repetition (each ctxcore
run against the DynamicCache run of the same repetition), robust to a machine whose speed drifts.

Usage: python benches/bench_e2e.py [--lengths 2048 4096 7168] [--reps 3] [--steps 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import ctxcore
from ctxcore.evaluation import publish_codebooks, time_decode


def _cache(method: str, model):
    if method == "full":
        return DynamicCache(config=model.config)
    if method == "ctxcore4-train":
        return ctxcore.CompressedCache(model.config, bits=4, codebooks="train")
    return ctxcore.CompressedCache(model.config, bits=4)


@torch.no_grad()
def single(model, ids: torch.Tensor, method: str, steps: int) -> dict:
    cache = _cache(method, model)
    ttft, tpot = time_decode(model, cache, ids, steps)
    if method == "full":
        tokens = cache.get_seq_length()
        kv = sum(lay.keys.numel() + lay.values.numel() for lay in cache.layers) * 2  # fp16 equivalent
    else:
        s = cache.memory_stats()
        tokens, kv = s["tokens"], s["compressed_bytes"]
        reused = cache.codebook_source.count("reused")
    row = {"ttft_s": ttft, "tpot_s": tpot, "tokens": tokens, "kv_bytes_per_token": kv / tokens}
    return row | ({} if method == "full" else {"reused_layers": reused})


def batched(model, ids: torch.Tensor, method: str, steps: int) -> dict:
    _, tpot = time_decode(model, _cache(method, model), ids, steps)
    return {"step_s": tpot, "tokens_per_s": ids.shape[0] / tpot}


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def rotated(methods: list[str], rep: int) -> list[str]:
    """The order of repetition ``rep``: rotated by one each time, so that each method runs in
    each position equally often (measured on the 2-core VM, 2026-12-08: the run right after a
    DynamicCache run prefilled 2K tokens 0.1-1.3 s slower, whichever cache it was)."""
    k = rep % len(methods)
    return methods[k:] + methods[:k]


def paired(num: list[dict], den: list[dict], key: str) -> dict:
    """Spread of the per-repetition ratios ``num[i][key] / den[i][key]``."""
    return spread([a[key] / b[key] for a, b in zip(num, den, strict=True)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 7168])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8, help="0: no batch rows")
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", default=str(Path(__file__).parents[2] / "shared/data/tinyshakespeare.txt"))
    ap.add_argument("--out", default="bench-results/e2e.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ctxcore.set_num_threads(args.threads)
    model, tok = ctxcore.load_default_model()
    ctxcore.enable(model)
    ids = torch.tensor(tok(Path(args.text).read_text()[:1_200_000])["input_ids"])
    # A private codebook cache, filled by one context of other text (what a user has after the
    # model's first context).
    publish_codebooks(model, ids[200_000 : 200_000 + 4096])
    single(model, ids[None, :256], "ctxcore4", 2)  # warm-up (allocator, thread pools)
    rows = []
    for n in args.lengths:
        runs: dict[str, list[dict]] = {"full": [], "ctxcore4": [], "ctxcore4-train": []}
        for rep in range(args.reps):
            for m in rotated(list(runs), rep):
                runs[m].append(single(model, ids[None, :n], m, args.steps))
        row = {"tokens": n}
        for m, rs in runs.items():
            row[m] = {k: spread([r[k] for r in rs]) for k in ("ttft_s", "tpot_s", "kv_bytes_per_token")}
            if m != "full":
                row[m]["reused_layers"] = [r["reused_layers"] for r in rs]
        f, c, t = row["full"], row["ctxcore4"], row["ctxcore4-train"]
        row["ttft_ratio"] = c["ttft_s"]["median"] / f["ttft_s"]["median"]
        row["ttft_ratio_train"] = t["ttft_s"]["median"] / f["ttft_s"]["median"]
        row["tpot_speedup"] = f["tpot_s"]["median"] / c["tpot_s"]["median"]
        row["kv_vs_fp16"] = c["kv_bytes_per_token"]["median"] / f["kv_bytes_per_token"]["median"]
        # Per repetition, against the DynamicCache run of the same repetition: on a VM whose
        # speed drifts between minutes, runs close in time are the fairer comparison.
        full = runs["full"]
        row["paired"] = {
            "ttft_ratio": paired(runs["ctxcore4"], full, "ttft_s"),
            "ttft_ratio_train": paired(runs["ctxcore4-train"], full, "ttft_s"),
            "tpot_speedup": paired(full, runs["ctxcore4"], "tpot_s"),
        }
        rows.append(row)
        print(
            f"L={n}: TTFT full {f['ttft_s']['median']:.2f} s, ctxcore {c['ttft_s']['median']:.2f} s "
            f"({row['ttft_ratio']:.2f}x of full; first context, training: {t['ttft_s']['median']:.2f} s = "
            f"{row['ttft_ratio_train']:.2f}x); TPOT full {f['tpot_s']['median'] * 1e3:.1f} ms, ctxcore "
            f"{c['tpot_s']['median'] * 1e3:.1f} ms ({row['tpot_speedup']:.2f}x faster); KV "
            f"{c['kv_bytes_per_token']['median']:.0f} B/token = {row['kv_vs_fp16']:.3f}x of fp16; layers "
            f"with reused codebooks {c['reused_layers']}; paired per repetition: TTFT ratio "
            f"{row['paired']['ttft_ratio']['median']:.2f}x, TPOT speedup "
            f"{row['paired']['tpot_speedup']['median']:.2f}x",
            flush=True,
        )
    batch = run_batch(model, ids, args) if args.batch else None
    result = {
        "bench": "e2e",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "simd": ctxcore.cpu_simd(), "threads": args.threads},
        "settings": vars(args)
        | {
            "ctxcore4": "CompressedCache(config, bits=4) defaults, codebooks reused from the codebook cache",
            "ctxcore4-train": 'CompressedCache(config, bits=4, codebooks="train") (a first context)',
            "layout": "K 32 x 8-bit, V 64 x 4-bit",
        },
        "rows": rows,
        "batch": batch,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def run_batch(model, ids: torch.Tensor, args: argparse.Namespace) -> dict:
    starts = [i * 7919 for i in range(args.batch)]
    bids = torch.stack([ids[s : s + args.batch_tokens] for s in starts])
    bruns: dict[str, list[dict]] = {"full": [], "ctxcore4": []}
    for rep in range(args.reps):
        for m in rotated(list(bruns), rep):
            bruns[m].append(batched(model, bids, m, args.steps))
    keys = ("step_s", "tokens_per_s")
    batch = {m: {k: spread([r[k] for r in rs]) for k in keys} for m, rs in bruns.items()}
    batch["throughput_ratio"] = (
        batch["ctxcore4"]["tokens_per_s"]["median"] / batch["full"]["tokens_per_s"]["median"]
    )
    batch["paired_throughput_ratio"] = paired(bruns["ctxcore4"], bruns["full"], "tokens_per_s")
    bf, bc = batch["full"]["tokens_per_s"]["median"], batch["ctxcore4"]["tokens_per_s"]["median"]
    print(
        f"batch {args.batch} x {args.batch_tokens}: full {bf:.1f} tok/s, ctxcore {bc:.1f} tok/s "
        f"({batch['throughput_ratio']:.2f}x; paired per repetition "
        f"{batch['paired_throughput_ratio']['median']:.2f}x)",
        flush=True,
    )
    return batch


if __name__ == "__main__":
    main()
