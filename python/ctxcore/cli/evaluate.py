"""``ctxcore eval {ppl,passkey,speed,all}``: the evaluation report (see evaluation.py)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from ._common import UsageError
from .qa import _load_model, _quiet_loading, _read_text, _step

__all__ = ["add_parser", "run_eval"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity, passkey retrieval, memory and speed: ctxcore vs DynamicCache, quanto, sink+window",
        description=(
            "Run the evaluation on the default model (or --model) and write JSON results to --out. "
            "--quick finishes in a few minutes (short lengths, few tokens)."
        ),
    )
    p.add_argument("what", choices=["ppl", "passkey", "speed", "all"])
    p.add_argument("--quick", action="store_true", help="small settings for CI (a few minutes)")
    p.add_argument(
        "--text", metavar="FILE", default=None, help="text for perplexity/speed (default: built-in)"
    )
    p.add_argument("--model", metavar="GGUF_OR_DIR", default=None, help="default: the embedded SmolLM2")
    p.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    p.add_argument("--lengths", default=None, help="comma-separated prefix lengths in tokens")
    p.add_argument(
        "--score-tokens",
        type=int,
        default=None,
        help="tokens scored per perplexity window (default 512; 32 with --quick)",
    )
    p.add_argument("--windows", type=int, default=None, help="perplexity windows per length")
    p.add_argument(
        "--isolate",
        action="store_true",
        help="speed: run each (method, length) in its own process, so peak RSS is per method",
    )
    p.add_argument("--trials", type=int, default=None, help="passkey trials per (length, depth) cell")
    p.add_argument(
        "--reps",
        type=int,
        default=None,
        help="speed: interleaved repetitions of every (method, length) (default 3; 1 with --quick)",
    )
    p.add_argument(
        "--depths", default=None, help="comma-separated passkey depths in [0, 1] (default 0,0.25,0.5,0.75,1)"
    )
    p.add_argument(
        "--out", default="eval-results", metavar="DIR", help="output directory (default eval-results)"
    )


def _bar(desc: str, total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not sys.stderr.isatty(), leave=False)


def run_eval(args: argparse.Namespace) -> int:
    _quiet_loading()
    from .. import evaluation as ev

    methods = ev.available_methods()
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        bad = [m for m in wanted if m not in ev.METHODS]
        if bad:
            raise UsageError(f"--methods: unknown {', '.join(bad)}; known: {', '.join(ev.METHODS)}")
        missing = [m for m in wanted if m not in methods]
        if missing:
            raise UsageError(
                f"--methods: {', '.join(missing)} need packages that are not installed "
                "(pip install optimum-quanto / hqq)"
            )
        methods = wanted
    try:
        lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else None
    except ValueError:
        raise UsageError(f"--lengths: expected comma-separated integers, got {args.lengths!r}") from None
    if args.depths:
        try:
            args.depths = [float(d) for d in args.depths.split(",") if d.strip()]
        except ValueError:
            raise UsageError(f"--depths: expected numbers like 0,0.5,1, got {args.depths!r}") from None
        if not args.depths or any(not 0.0 <= d <= 1.0 for d in args.depths):
            raise UsageError(f"--depths: each depth must be in [0, 1], got {args.depths}")
    if args.trials is not None and args.trials < 1:
        raise UsageError(f"--trials must be at least 1, got {args.trials}")
    text = _read_text(args.text) if args.text else None
    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out: cannot create {args.out}: {exc.strerror or exc}") from None
    import torch

    from ..attention import enable
    from ..models import SAMPLE_TEXT

    model, tok, name = _load_model(args.model)
    enable(model)
    ids = torch.tensor(tok(text or SAMPLE_TEXT * 4)["input_ids"])
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "model": name,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "methods": methods,
        "quick": args.quick,
    }
    whats = ["ppl", "passkey", "speed"] if args.what == "all" else [args.what]
    for what in whats:
        if what == "ppl":
            res = _ppl(ev, model, ids, methods, args, lengths)
        elif what == "passkey":
            res = _passkey(ev, model, tok, text or SAMPLE_TEXT, methods, args, lengths)
        elif args.isolate:
            res = _speed_isolated(methods, args, lengths)
        else:
            res = _speed(ev, model, ids, methods, args, lengths)
        path = out_dir / f"eval-{what}.json"
        extra = {"spread": _spread(res)} if what == "speed" and res else {}
        path.write_text(json.dumps({**meta, "results": res, **extra}, indent=1))
        _step(f"wrote {path}")
    return 0


def _sink_window(ev: Any, model: Any, ctx_bytes: int, length: int) -> int:
    """Recent-window size whose fp16 K/V take ``ctx_bytes`` (ctxcore 2-bit's bytes at ``length``)."""
    from ..cache import _shape, _text_config

    layers, _, hkv, d = _shape(_text_config(model.config))
    per_token = 2 * layers * hkv * d * 2
    return max(16, min(length, ctx_bytes // per_token - 4))


def _ppl(ev: Any, model: Any, ids: Any, methods: list[str], args: argparse.Namespace, lengths: Any) -> list:
    n_score = args.score_tokens or (32 if args.quick else 512)
    windows = args.windows or (1 if args.quick else 2)
    lengths = lengths or ([512] if args.quick else [1024, 2048, 4096, 7168])
    rows = []
    for length in lengths:
        for w in range(windows):
            start = w * (length + n_score)
            seg = ids[start : start + length + n_score]
            if seg.numel() < length + n_score:
                _step(f"ppl: text too short for {windows} windows of {length}+{n_score} tokens; skipping")
                continue
            sink_w = 256
            for m in (["ctxcore2"] if "sink" in methods and "ctxcore2" in methods else []) + methods:
                if m == "ctxcore2" and any(
                    r["method"] == m and r["prefix"] == length and r["window"] == w for r in rows
                ):
                    continue
                with _bar(f"ppl {m} L={length} w={w}", n_score) as bar:
                    r = ev.perplexity(model, seg, length, n_score, m, sink_window=sink_w, progress=bar.update)
                if m == "ctxcore2":
                    sink_w = _sink_window(ev, model, r.kv_bytes, length)
                rows.append(
                    {
                        "method": m,
                        "prefix": length,
                        "window": w,
                        "ppl": r.ppl,
                        "nll": r.nll,
                        "scored": n_score,
                        "kv_bytes": r.kv_bytes,
                        "cached_tokens": r.cached_tokens,
                        "kv_bytes_per_token": r.kv_bytes / r.cached_tokens,
                        "sink_window": sink_w if m == "sink" else None,
                        "seconds": r.seconds,
                    }
                )
                per = r.kv_bytes / r.cached_tokens
                _step(f"ppl L={length} window {w} {m:<16} {r.ppl:8.3f}  ({per:,.0f} B/token)")
    return rows


def _passkey(
    ev: Any, model: Any, tok: Any, filler: str, methods: list[str], args: argparse.Namespace, lengths: Any
) -> list:
    lengths = lengths or ([1024] if args.quick else [1024, 2048, 4096, 7168])
    depths = args.depths or ([0.0, 0.5, 1.0] if args.quick else [0.0, 0.25, 0.5, 0.75, 1.0])
    trials = args.trials or (1 if args.quick else 2)
    rows = []
    for length in lengths:
        for depth in depths:
            for t in range(trials):
                key = 10000 + (hash((length, depth, t)) % 89999)
                for m in methods:
                    ok = ev.passkey(model, tok, filler, length, depth, key, m, offset=7 * t + int(depth * 13))
                    rows.append({"method": m, "length": length, "depth": depth, "trial": t, "correct": ok})
                _step(
                    f"passkey L={length} depth={depth:.2f} trial {t}: "
                    + " ".join(
                        f"{r['method']}={'ok' if r['correct'] else 'miss'}" for r in rows[-len(methods) :]
                    )
                )
    return rows


def _speed_lengths(args: argparse.Namespace, lengths: Any) -> list[int]:
    return lengths or ([512] if args.quick else [2048, 4096, 7168])


def _reps(args: argparse.Namespace) -> int:
    reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    if reps < 1:
        raise UsageError(f"--reps must be >= 1, got {reps}")
    return reps


def _spread(rows: list[dict]) -> list[dict]:
    """Median, min and max of TTFT and TPOT per (method, length) over the repetitions."""
    import statistics

    out = []
    for key in dict.fromkeys((r["method"], r["length"]) for r in rows):
        rs = [r for r in rows if (r["method"], r["length"]) == key]
        row: dict = {"method": key[0], "length": key[1], "reps": len(rs)}
        for f in ("ttft_s", "tpot_s"):
            xs = [r[f] for r in rs]
            row[f] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}
        out.append(row)
        _step(
            f"speed L={key[1]} {key[0]:<16} TTFT {row['ttft_s']['median']:.2f} s "
            f"[{row['ttft_s']['min']:.2f}, {row['ttft_s']['max']:.2f}]  TPOT "
            f"{row['tpot_s']['median'] * 1000:.0f} ms [{row['tpot_s']['min'] * 1000:.0f}, "
            f"{row['tpot_s']['max'] * 1000:.0f}] over {len(rs)} interleaved runs"
        )
    return out


def _speed(ev: Any, model: Any, ids: Any, methods: list[str], args: argparse.Namespace, lengths: Any) -> list:
    lengths = _speed_lengths(args, lengths)
    rows = []
    for length in lengths:
        if ids.numel() < length + 1:
            _step(f"speed: text too short for {length} tokens; skipping")
            continue
        # Repetitions interleaved across methods: every method sees the same machine phases.
        for rep in range(_reps(args)):
            for m in methods:
                r = ev.speed(model, ids, length, m, new_tokens=8 if args.quick else 32)
                rows.append({"method": m, "length": length, "rep": rep, **r})
                _step(f"speed L={length} {m:<16} TTFT {r['ttft_s']:.2f} s  TPOT {r['tpot_s'] * 1000:.0f} ms")
    return rows


def _speed_isolated(methods: list[str], args: argparse.Namespace, lengths: Any) -> list:
    """:func:`_speed` with every (method, length) in a fresh process: its peak RSS is its own."""
    import subprocess
    import tempfile

    lengths = _speed_lengths(args, lengths)
    rows = []
    runs = [(n, rep, m) for n in lengths for rep in range(_reps(args)) for m in methods]
    for length, rep, m in runs:
        with tempfile.TemporaryDirectory(prefix="ctxcore-eval-") as tmp:
            cmd = [sys.executable, "-m", "ctxcore", "eval", "speed", "--methods", m, "--reps", "1"]
            cmd += ["--lengths", str(length), "--out", tmp]
            cmd += ["--quick"] if args.quick else []
            cmd += ["--text", args.text] if args.text else []
            cmd += ["--model", args.model] if args.model else []
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                raise UsageError(f"speed run of {m} at {length} tokens failed:\n{p.stderr[-2000:]}")
            got = json.loads((Path(tmp) / "eval-speed.json").read_text())["results"]
            for r in got:
                r["rep"] = rep
        rows += got
        for r in got:
            _step(
                f"speed L={length} {m:<16} TTFT {r['ttft_s']:.2f} s  TPOT {r['tpot_s'] * 1000:.0f} ms  "
                f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB (own process)"
            )
    return rows
