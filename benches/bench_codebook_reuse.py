"""Quality of reused codebooks: the default ``CompressedCache(config, bits=4)`` with its codebooks
from the codebook cache (published by one context of other text) against codebooks trained on
each context (``codebooks="train"``), same model, text and positions, one process.

Perplexity: prefill L tokens, score the next ``--score`` tokens one decode step at a time, at
``--windows`` windows per L (as ``ctxcore eval ppl``). Passkey at ``--passkey-length`` tokens, 5
depths x ``--trials`` (as ``ctxcore eval passkey``: same keys and filler offsets), optionally with
``full`` (DynamicCache) in the same run (``--passkey-methods``). The publishing context is
``--calib-tokens`` tokens at token ``--calib-offset`` of the text, far from every scored window
and passkey filler. ``--lengths`` with no value skips perplexity.

Usage: python benches/bench_codebook_reuse.py [--lengths 1024 2048 4096 7168] [--trials 3]
JSON: bench-results/codebook_reuse.json (rewritten after every row).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import ctxcore
from ctxcore import evaluation as ev


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", nargs="*", type=int, default=[1024, 2048, 4096, 7168])
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--score", type=int, default=512)
    ap.add_argument("--passkey-length", type=int, default=7168)
    ap.add_argument("--trials", type=int, default=3, help="passkey trials per depth (0: no passkey)")
    ap.add_argument(
        "--passkey-methods", default="ctxcore4,ctxcore4-train", help="comma-separated (full: DynamicCache)"
    )
    ap.add_argument("--calib-offset", type=int, default=200_000)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", default=str(Path(__file__).parents[2] / "shared/data/tinyshakespeare.txt"))
    ap.add_argument("--out", default="bench-results/codebook_reuse.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ctxcore.set_num_threads(args.threads)
    model, tok = ctxcore.load_default_model()
    ctxcore.enable(model)
    text = Path(args.text).read_text()
    ids = torch.tensor(tok(text)["input_ids"])
    ev.publish_codebooks(model, ids[args.calib_offset : args.calib_offset + args.calib_tokens])
    result = {
        "bench": "codebook_reuse",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "simd": ctxcore.cpu_simd(), "threads": args.threads},
        "settings": vars(args),
        "ppl": [],
        "passkey": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(result, indent=1))

    sources = {}
    orig = ev.make_cache

    def make(method, model, sink_window=256):
        c = orig(method, model, sink_window)
        sources[method] = c
        return c

    ev.make_cache = make
    n = args.score
    for length in args.lengths:
        for w in range(args.windows):
            seg = ids[w * (length + n) : w * (length + n) + length + n]
            row = {"length": length, "window": w}
            for m in ("ctxcore4", "ctxcore4-train"):
                r = ev.perplexity(model, seg, length, n, m)
                row[m] = r.ppl
                row[m + "_sources"] = sorted(set(sources[m].codebook_source))
            row["change"] = row["ctxcore4"] / row["ctxcore4-train"] - 1
            result["ppl"].append(row)
            save()
            print(
                f"L={length} w={w}: reused {row['ctxcore4']:.3f} {row['ctxcore4_sources']}, trained "
                f"{row['ctxcore4-train']:.3f} ({row['change'] * 100:+.2f}%)",
                flush=True,
            )
    methods = [m for m in args.passkey_methods.split(",") if m]
    length = args.passkey_length
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0) if args.trials else ():
        for t in range(args.trials):
            key = 10000 + (hash((length, depth, t)) % 89999)  # as ctxcore eval passkey
            row = {"length": length, "depth": depth, "trial": t}
            for m in methods:
                row[m] = ev.passkey(model, tok, text, length, depth, key, m, offset=7 * t + int(depth * 13))
            result["passkey"].append(row)
            save()
            print(f"passkey depth {depth:.2f} trial {t}: {row}", flush=True)
    for m in methods if result["passkey"] else ():
        print(f"passkey {m}: {sum(r[m] for r in result['passkey'])}/{len(result['passkey'])}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
