"""Evaluation report: runs ``ctxcore eval`` on tinyshakespeare and plots the results.

    python benches/bench_eval.py [--quick] [--out bench-results/eval] [--skip-run]

Perplexity, passkey retrieval, KV bytes per token and speed for transformers ``DynamicCache``,
``QuantizedCache`` (quanto 4/2-bit, when ``optimum-quanto`` is installed), a sink+window
baseline at the bytes of ctxcore 2-bit, and ctxcore at 4 and 2 bits (dense) and 4 bits with
Quest selection; JSON from ``ctxcore eval`` plus PNG plots (matplotlib) and a markdown summary
(``summary.md``) in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="bench-results/eval")
    ap.add_argument("--skip-run", action="store_true", help="only plot existing JSON")
    ap.add_argument("--what", default="all")
    ap.add_argument("extra", nargs="*", help="extra arguments for ctxcore eval")
    a = ap.parse_args()
    out = Path(a.out)
    if not a.skip_run:
        cmd = [sys.executable, "-m", "ctxcore", "eval", a.what, "--out", str(out), "--text", str(TEXT)]
        cmd += ["--isolate"]  # speed: one process per method, so peak RSS is per method
        cmd += ["--quick"] if a.quick else []
        subprocess.run(cmd + a.extra, check=True)
    summary = []
    ppl = _load(out / "eval-ppl.json")
    if ppl:
        summary += _ppl_report(ppl, out)
    pk = _load(out / "eval-passkey.json")
    if pk:
        summary += _passkey_report(pk, out)
    sp = _load(out / "eval-speed.json")
    if sp:
        summary += _speed_report(sp, out)
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    return 0


def _load(p: Path) -> dict | None:
    return json.loads(p.read_text()) if p.exists() else None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ppl_report(d: dict, out: Path) -> list[str]:
    by = defaultdict(list)
    bpt = defaultdict(list)
    for r in d["results"]:
        by[(r["method"], r["prefix"])].append(r["ppl"])
        bpt[(r["method"], r["prefix"])].append(r["kv_bytes_per_token"])
    methods = list(dict.fromkeys(r["method"] for r in d["results"]))
    lengths = sorted({r["prefix"] for r in d["results"]})
    lines = [
        f"### Perplexity ({d['model']}, {d['date']}; mean over windows ± half their range)",
        "",
        "| method | " + " | ".join(f"L={n}" for n in lengths) + " | vs full (mean) |",
        "|---|" + "---|" * (len(lengths) + 1),
    ]
    for m in methods:
        cells, rel = [], []
        for n in lengths:
            v = by.get((m, n))
            f = by.get(("full", n))
            if not v:
                cells.append("-")
                continue
            spread = (max(v) - min(v)) / 2
            cells.append(
                f"{statistics.mean(v):.2f} ±{spread:.2f} ({statistics.mean(bpt[(m, n)]):,.0f} B/tok)"
            )
            if f:
                rel.append(statistics.mean(v) / statistics.mean(f) - 1)
        lines.append(
            f"| {m} | " + " | ".join(cells) + (f" | {statistics.mean(rel) * 100:+.2f}% |" if rel else " | |")
        )
    try:
        plt = _plt()
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        for m in methods:
            xs = [n for n in lengths if (m, n) in by]
            rel = [100 * (statistics.mean(by[(m, n)]) / statistics.mean(by[("full", n)]) - 1) for n in xs]
            off = max(rel) > 10
            ax[0].plot(xs, rel, marker="o", label=f"{m} (off scale: {max(rel):+.0f}%)" if off else m)
            ax[1].plot(xs, [statistics.mean(bpt[(m, n)]) for n in xs], marker="o", label=m)
        ax[0].set(
            xlabel="prefix tokens", ylabel="perplexity vs DynamicCache (%)", xscale="log", ylim=(-5, 10)
        )
        ax[1].set(
            xlabel="prefix tokens", ylabel="KV bytes per token (all overheads)", xscale="log", yscale="log"
        )
        ax[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "ppl.png", dpi=120)
    except ImportError:
        lines.append("(matplotlib not installed: no plot)")
    return lines + [""]


def _passkey_report(d: dict, out: Path) -> list[str]:
    acc = defaultdict(list)
    for r in d["results"]:
        acc[(r["method"], r["length"], r["depth"])].append(r["correct"])
    methods = list(dict.fromkeys(r["method"] for r in d["results"]))
    lengths = sorted({r["length"] for r in d["results"]})
    depths = sorted({r["depth"] for r in d["results"]})
    lines = [
        "### Passkey retrieval accuracy (all depths and trials)",
        "",
        "| method | " + " | ".join(f"L={n}" for n in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    for m in methods:
        cells = []
        for n in lengths:
            v = [x for dd in depths for x in acc[(m, n, dd)]]
            cells.append(f"{sum(v)}/{len(v)}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    try:
        plt = _plt()
        fig, axes = plt.subplots(1, len(methods), figsize=(2.6 * len(methods), 3), squeeze=False)
        for ax, m in zip(axes[0], methods, strict=True):
            grid = [[statistics.mean(acc[(m, n, dd)]) for n in lengths] for dd in depths]
            ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_title(m, fontsize=8)
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=6)
            ax.set_yticks(range(len(depths)), [f"{dd:.0%}" for dd in depths], fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "passkey.png", dpi=120)
    except ImportError:
        lines.append("(matplotlib not installed: no plot)")
    return lines + [""]


def _speed_report(d: dict, out: Path) -> list[str]:
    lines = [
        "### Speed (CPU, decode after a prefill of L tokens)",
        "",
        "| method | L | TTFT s | TPOT ms | KV bytes | peak RSS MiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in d["results"]:
        lines.append(
            f"| {r['method']} | {r['length']} | {r['ttft_s']:.2f} | {r['tpot_s'] * 1000:.0f} | "
            f"{r['kv_bytes']:,} | {r['peak_rss_bytes'] / 2**20:.0f} |"
        )
    return lines + [""]


if __name__ == "__main__":
    sys.exit(main())
