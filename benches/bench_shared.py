"""Shared contexts on the default model: a saved context served from Redis, against a fresh
prefill, in one run (``CompressedCache(config)`` defaults, a private ``redis-server`` on
127.0.0.1 that this script starts and stops, or ``--url``).

TTFT of a question about a ``--tokens`` (7K) document, everything counted (load, prefill of what
was not loaded, first token), median of ``--reps`` interleaved repetitions:

  fresh         ``CompressedCache`` prefill of document + question (and ``DynamicCache``, the peer)
  redis         ``CompressedCache.load("redis://...", token_ids=prompt)``: the saved context whole
  directory     ``CompressedCache.load(dir, token_ids=prompt)``: the same context from a local save
  prefix        a prompt sharing the first ``--prefix`` (6K) tokens with the saved document, then
                ``--tokens - --prefix`` (1K) tokens of other text: the 6K prefix is loaded, the rest
                prefilled

Bytes stored for ``--docs`` (10) documents sharing a ``--shared`` (4K) prefix, each with 1K of
its own: saved into Redis as workers would (load the longest prefix, prefill the rest, save), and
each saved alone to a directory of its own.

Aggregate questions per second with 1, 2 and 4 worker processes answering different questions
(``--new-tokens`` greedy tokens each) about the one shared context at the same time.

Goal: loading the saved context and answering takes at most 1/10 of the fresh-prefill TTFT.

Usage: python benches/bench_shared.py [--tokens 7168] [--reps 3] [--out bench-results/shared.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import ctxcore
from ctxcore.cache import cache_kwargs
from ctxcore.evaluation import publish_codebooks

QUESTIONS = [
    "\nQuestion: Who speaks first in this text? Answer:",
    "\nQuestion: Which city is named in this text? Answer:",
    "\nQuestion: What does the first citizen want? Answer:",
    "\nQuestion: Name one character of this scene. Answer:",
    "\nQuestion: Is this text prose or verse? Answer:",
    "\nQuestion: What is the mood of the crowd? Answer:",
    "\nQuestion: Who is Caius Marcius? Answer:",
    "\nQuestion: What is the text about, in five words? Answer:",
]


def start_redis() -> tuple[subprocess.Popen, str, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("no redis-server binary (apt-get install redis-server), or pass --url")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = tempfile.mkdtemp(prefix="ctxcore-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", d],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import redis

    for _ in range(400):
        try:
            redis.Redis(port=port).ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0", d


@torch.no_grad()
def first_token(model, prompt: torch.Tensor, cache) -> int:
    out = model.generate(prompt, max_new_tokens=1, do_sample=False, **cache_kwargs(model, cache))
    return int(out[0, -1])


@torch.no_grad()
def ttft_fresh(model, prompt, dynamic: bool) -> float:
    t0 = time.perf_counter()
    cache = DynamicCache(config=model.config) if dynamic else ctxcore.CompressedCache(model.config)
    first_token(model, prompt, cache)
    return time.perf_counter() - t0


@torch.no_grad()
def ttft_load(model, prompt, target, **kw) -> tuple[float, int]:
    t0 = time.perf_counter()
    cache = ctxcore.CompressedCache.load(target, model.config, token_ids=prompt, **kw)
    matched = cache.get_seq_length()
    first_token(model, prompt, cache)
    return time.perf_counter() - t0, matched


@torch.no_grad()
def save_context(model, ids: torch.Tensor, url: str, ns: str) -> tuple[ctxcore.CompressedCache, dict]:
    """What a worker does: load the longest saved prefix, prefill the rest, save."""
    cache = ctxcore.CompressedCache.load(url, model.config, token_ids=ids, namespace=ns)
    model(ids[:, cache.get_seq_length() :], use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
    return cache, cache.save(url, token_ids=ids, namespace=ns)


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def worker(args) -> None:
    """One worker process: answer ``--questions`` about the shared context; prints JSON."""
    torch.set_num_threads(args.threads)
    ctxcore.set_num_threads(args.threads)
    model, tok = ctxcore.load_default_model()
    ctxcore.enable(model)
    doc = torch.load(args.doc_file)
    qs = [tok(q, return_tensors="pt").input_ids for q in json.loads(args.worker)]
    with torch.no_grad():  # one untimed question: a worker in its steady state
        warm = torch.cat([doc, qs[0]], 1)
        cache = ctxcore.CompressedCache.load(args.url, model.config, token_ids=warm, namespace="bench")
        model.generate(warm, max_new_tokens=2, do_sample=False, **cache_kwargs(model, cache))
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    t0 = time.perf_counter()
    answers = []
    for q in qs:
        prompt = torch.cat([doc, q], 1)
        with torch.no_grad():
            cache = ctxcore.CompressedCache.load(args.url, model.config, token_ids=prompt, namespace="bench")
            out = model.generate(
                prompt, max_new_tokens=args.new_tokens, do_sample=False, **cache_kwargs(model, cache)
            )
        answers.append(tok.decode(out[0, prompt.shape[1] :]))
    print(json.dumps({"seconds": time.perf_counter() - t0, "answers": answers}), flush=True)


def throughput(args, url: str, doc_file: str, n_workers: int) -> dict:
    per = args.questions
    procs = []
    for w in range(n_workers):
        qs = [QUESTIONS[(w * per + i) % len(QUESTIONS)] for i in range(per)]
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            json.dumps(qs),
            "--url",
            url,
            "--doc-file",
            doc_file,
            "--threads",
            str(max(1, args.threads // n_workers)),
            "--new-tokens",
            str(args.new_tokens),
        ]
        procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    for p in procs:
        while p.stdout.readline().strip() != "ready":
            pass
    t0 = time.perf_counter()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [json.loads(p.stdout.readlines()[-1]) for p in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.wait()
    return {
        "workers": n_workers,
        "questions": n_workers * per,
        "wall_s": wall,
        "questions_per_s": n_workers * per / wall,
        "sample_answer": results[0]["answers"][0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=7168)
    ap.add_argument("--prefix", type=int, default=6144)
    ap.add_argument("--shared", type=int, default=4096)
    ap.add_argument("--own", type=int, default=1024)
    ap.add_argument("--docs", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--questions", type=int, default=4, help="per worker")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--url", default=None, help="an existing server (default: start one)")
    ap.add_argument(
        "--parts",
        nargs="+",
        default=["ttft", "docs", "qps"],
        choices=["ttft", "docs", "qps"],
        help="what to measure (a subset updates --out in place)",
    )
    ap.add_argument("--text", default=str(Path(__file__).parents[2] / "shared/data/tinyshakespeare.txt"))
    ap.add_argument("--out", default="bench-results/shared.json")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--doc-file", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        return worker(args)
    torch.set_num_threads(args.threads)
    ctxcore.set_num_threads(args.threads)
    server, url, redis_dir = (None, args.url, None) if args.url else start_redis()
    tmp = Path(tempfile.mkdtemp(prefix="ctxcore-bench-shared-"))
    os.environ.setdefault("CTXCORE_CACHE_DIR", str(tmp / "codebooks"))
    try:
        import redis

        r = redis.Redis.from_url(url)
        model, tok = ctxcore.load_default_model()
        ctxcore.enable(model)
        ids = torch.tensor(tok(Path(args.text).read_text()[:1_500_000])["input_ids"])[None]
        # The model's codebooks, published once from other text (what a user has after the first context).
        publish_codebooks(model, ids[0, 300_000 : 300_000 + 4096])
        doc = ids[:, : args.tokens]
        q = tok(QUESTIONS[0], return_tensors="pt").input_ids
        prompt = torch.cat([doc, q], 1)
        other = ids[:, 100_000 : 100_000 + args.tokens - args.prefix]
        prefix_prompt = torch.cat([doc[:, : args.prefix], other, q], 1)

        first_token(model, prompt[:, :256], ctxcore.CompressedCache(model.config))  # warm-up
        saved, report = save_context(model, doc, url, "bench")
        saved.save(tmp / "ctx", token_ids=doc)
        doc_file = str(tmp / "doc.pt")
        torch.save(doc, doc_file)
        out = Path(args.out)
        result = json.loads(out.read_text()) if out.exists() and args.parts != ["ttft", "docs", "qps"] else {}
        runs: dict[str, list[float]] = {k: [] for k in ("dynamic", "fresh", "redis", "directory", "prefix")}
        matched: dict[str, int] = {}
        for _ in range(args.reps if "ttft" in args.parts else 0):
            runs["dynamic"].append(ttft_fresh(model, prompt, True))
            runs["fresh"].append(ttft_fresh(model, prompt, False))
            t, matched["redis"] = ttft_load(model, prompt, url, namespace="bench")
            runs["redis"].append(t)
            t, matched["directory"] = ttft_load(model, prompt, tmp / "ctx")
            runs["directory"].append(t)
            t, matched["prefix"] = ttft_load(model, prefix_prompt, url, namespace="bench")
            runs["prefix"].append(t)
            print({k: round(v[-1], 3) for k, v in runs.items()}, flush=True)
        if "ttft" in args.parts:
            result["ttft"] = ttft_report(runs, matched, prompt, prefix_prompt)
        if "docs" in args.parts:
            result["shared_prefix_documents"] = documents(args, model, ids, url, r, tmp)
        if "qps" in args.parts:
            result["throughput"] = qps = [throughput(args, url, doc_file, n) for n in args.workers]
            for row in qps:
                print(
                    f"{row['workers']} workers: {row['questions_per_s']:.2f} questions/s "
                    f"({row['questions']} in {row['wall_s']:.1f} s)",
                    flush=True,
                )
        ttft = result["ttft"]
        result |= {
            "bench": "shared",
            "date": time.strftime("%Y-%m-%d"),
            "machine": {"platform": platform.platform(), "simd": ctxcore.cpu_simd(), "threads": args.threads},
            "settings": vars(args) | {"cache": "CompressedCache(config) defaults, codebooks reused"},
            "save_report": report,
            "prompt_tokens": prompt.shape[1],
            "goal_load_vs_fresh": {
                "goal": 0.1,
                "measured": ttft["redis"]["vs_fresh"],
                "met": ttft["redis"]["vs_fresh"] <= 0.1,
            },
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
    finally:
        if server is not None:
            server.kill()
            shutil.rmtree(redis_dir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


def ttft_report(runs: dict, matched: dict, prompt: torch.Tensor, prefix_prompt: torch.Tensor) -> dict:
    """Medians and ratios to the fresh prefill; prints the summary line."""
    ttft = {k: spread(v) for k, v in runs.items()}
    fresh = ttft["fresh"]["median"]
    for k in ("redis", "directory", "prefix"):
        ttft[k]["vs_fresh"] = ttft[k]["median"] / fresh
        ttft[k]["matched_tokens"] = matched[k]
    ttft["dynamic"]["vs_fresh"] = ttft["dynamic"]["median"] / fresh
    print(
        f"TTFT at {prompt.shape[1]} tokens: fresh {fresh:.2f} s "
        f"(DynamicCache {ttft['dynamic']['median']:.2f} s); "
        f"redis {ttft['redis']['median']:.3f} s = {ttft['redis']['vs_fresh']:.3f}x of fresh; directory "
        f"{ttft['directory']['median']:.3f} s = {ttft['directory']['vs_fresh']:.3f}x; prefix hit of "
        f"{matched['prefix']} tokens + {prefix_prompt.shape[1] - matched['prefix']} prefilled "
        f"{ttft['prefix']['median']:.2f} s = {ttft['prefix']['vs_fresh']:.3f}x",
        flush=True,
    )

    return ttft


def documents(args, model, ids: torch.Tensor, url: str, r, tmp: Path) -> dict:
    """Bytes for ``--docs`` documents that share a prefix: in Redis as workers save them, and
    each saved alone to a directory."""
    # Bytes for documents that share a prefix.
    before = r.info("memory")["used_memory"]
    shared_tail = ids[:, 200_000 : 200_000 + args.shared]
    dedup_bytes = 0
    separate_bytes = 0
    for i in range(args.docs):
        start = 210_000 + i * 8_000
        own = ids[:, start : start + args.own]
        if own.shape[1] != args.own:
            raise SystemExit(f"--text is too short for {args.docs} documents")
        d = torch.cat([shared_tail, own], 1)
        cache, rep = save_context(model, d, url, "docs")
        dedup_bytes += rep["bytes_written"]
        cache.save(tmp / f"doc{i}", token_ids=d)
        separate_bytes += dir_bytes(tmp / f"doc{i}")
    server_bytes = r.info("memory")["used_memory"] - before
    docs = {
        "documents": args.docs,
        "shared_tokens": args.shared,
        "own_tokens": args.own,
        "redis_bytes_written": dedup_bytes,
        "redis_used_memory_delta": server_bytes,
        "separate_directory_bytes": separate_bytes,
        "ratio": dedup_bytes / separate_bytes,
    }
    print(
        f"{args.docs} documents sharing {args.shared} tokens: redis {dedup_bytes / 2**20:.1f} MiB "
        f"written (server used_memory +{server_bytes / 2**20:.1f} MiB) vs "
        f"{separate_bytes / 2**20:.1f} MiB in separate saves = {docs['ratio']:.3f}x",
        flush=True,
    )

    return docs


if __name__ == "__main__":
    main()
