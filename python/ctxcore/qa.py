"""Question answering over a long document with a full or a compressed KV cache.

The engine behind ``ctxcore demo`` and ``ctxcore ask``: prefill a document once into a cache,
then answer questions from copies of that cache (a ``DynamicCache`` is deep-copied; a
:class:`ctxcore.CompressedCache` is saved once and loaded per question, lazily), timing the
prefill, the time to first token and the time per output token.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Answer", "Fact", "FACTS", "build_document", "chat_prefix", "chat_question", "QASession"]


@dataclass(frozen=True)
class Fact:
    """A sentence hidden in a document, a question about it and the expected answer."""

    sentence: str
    question: str
    answer: str


FACTS: list[Fact] = [
    Fact("The secret passkey is 48213.", "What is the secret passkey?", "48213"),
    Fact(
        "The captain of the ship Albatross is named Mirela Vance.",
        "What is the name of the captain of the ship Albatross?",
        "Mirela",
    ),
    Fact(
        "The old lighthouse was painted bright green.", "What color was the old lighthouse painted?", "green"
    ),
]


def build_document(filler: str, tokenizer: Any, n_tokens: int, facts: list[Fact], seed: int = 0) -> str:
    """About ``n_tokens`` tokens of ``filler`` paragraphs (repeated as needed) with each fact's
    sentence inserted as its own paragraph at evenly spread depths (shuffled by ``seed``)."""
    paras = [p.strip() for p in filler.split("\n\n") if p.strip()]
    if not paras:
        raise ValueError("filler text is empty")
    out: list[str] = []
    total, i = 0, 0
    while total < n_tokens:
        p = paras[i % len(paras)]
        out.append(p)
        total += len(tokenizer(p, add_special_tokens=False)["input_ids"]) + 1
        i += 1
    depths = [(k + 1) / (len(facts) + 1) for k in range(len(facts))]
    random.Random(seed).shuffle(depths)
    for fact, depth in sorted(zip(facts, depths, strict=True), key=lambda x: -x[1]):
        out.insert(int(depth * len(out)), fact.sentence)
    return "\n\n".join(out)


def chat_prefix(tokenizer: Any, document: str) -> str:
    """The chat-formatted start of the user turn holding the document (ends before the question)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Read this document.\n\n{document}\n\nQUESTION"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return text[: text.index("QUESTION")]


def chat_question(tokenizer: Any, document: str, question: str) -> str:
    """What follows :func:`chat_prefix`: the question, the end of the turn and the assistant cue."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Read this document.\n\n{document}\n\nQUESTION"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return f"Answer in a few words. {question}" + text[text.index("QUESTION") + len("QUESTION") :]


class _Stamps:
    """A stopping criterion that never stops and records when each token was produced."""

    def __init__(self) -> None:
        from transformers import StoppingCriteria

        self.times: list[float] = []
        times = self.times

        class _C(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> torch.Tensor:
                times.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        self.criterion = _C()


@dataclass
class Answer:
    """One generated answer and its timings (seconds)."""

    text: str
    tokens: int
    ttft: float
    tpot: float


@dataclass
class QASession:
    """A prefilled document: the cache to copy per question and what the prefill cost.

    ``make_cache()`` returns a fresh cache (``None`` for transformers' default
    ``DynamicCache``).
    """

    model: Any
    tokenizer: Any
    context_ids: torch.Tensor
    make_cache: Callable[[], Any]
    prefill_seconds: float = 0.0
    compress_seconds: float = 0.0
    #: Seconds of the last copy of the prefilled cache (``copy.deepcopy``, once per question).
    copy_seconds: float = 0.0
    _snapshot: Any = None

    @torch.no_grad()
    def prefill(
        self,
        progress: Callable[[int, int], None] | None = None,
        block: int = 256,
        compress_progress: Callable[[int, int], None] | None = None,
    ) -> Any:
        """Run the document through the model into a new cache (and, for a CompressedCache,
        train its codebooks and compress: ``compress_seconds``); keep it for :meth:`ask`.
        ``prefill_seconds`` includes the compression."""
        from transformers import DynamicCache

        from .cache import CompressedCache, cache_kwargs

        cache = self.make_cache()
        t0 = time.perf_counter()
        if isinstance(cache, CompressedCache):
            if cache.prefill_block is None:
                cache.prefill_block = block
            cache.prefill(self.model, self.context_ids, progress=progress)
            t1 = time.perf_counter()
            cache.compress(compress_progress)
            self.compress_seconds = time.perf_counter() - t1
        else:
            cache = cache if cache is not None else DynamicCache(config=self.model.config)
            t = self.context_ids.shape[1]
            for s in range(0, t, block):
                self.model(
                    self.context_ids[:, s : s + block],
                    use_cache=True,
                    logits_to_keep=1,
                    **cache_kwargs(self.model, cache),
                )
                if progress is not None:
                    progress(min(t, s + block), t)
        self.prefill_seconds = time.perf_counter() - t0
        self._snapshot = cache
        return cache

    def adopt(self, cache: Any) -> None:
        """Use an already filled cache (e.g. a loaded context) as the snapshot."""
        self._snapshot = cache

    def _copy(self) -> Any:
        """A copy of the prefilled cache for one question (a CompressedCache forks its store:
        pages are shared, not copied)."""
        t0 = time.perf_counter()
        out = copy.deepcopy(self._snapshot)
        self.copy_seconds = time.perf_counter() - t0
        return out

    @torch.no_grad()
    def ask(self, question_ids: torch.Tensor, max_new_tokens: int = 24) -> Answer:
        """Answer from a copy of the prefilled cache: ``question_ids`` ``[1, T]`` follow the
        document."""
        from .cache import cache_kwargs

        cache = self._copy()
        ids = torch.cat([self.context_ids, question_ids], dim=1)
        stamp = _Stamps()
        stamps = stamp.times

        t0 = time.perf_counter()
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            stopping_criteria=[stamp.criterion],
            pad_token_id=self.tokenizer.eos_token_id,
            **cache_kwargs(self.model, cache),
        )
        new = out[0, ids.shape[1] :]
        text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        ttft = (stamps[0] - t0) if stamps else float("nan")
        tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
        return Answer(text, int(new.shape[0]), ttft, tpot)
