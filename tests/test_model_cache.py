"""CompressedCache end to end on the real default model (SmolLM2-135M-Instruct), <= 1K tokens."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ctxcore.attention import enable  # noqa: E402
from ctxcore.cache import CompressedCache  # noqa: E402
from ctxcore.models import SAMPLE_TEXT  # noqa: E402
from ctxcore.qa import FACTS, build_document, chat_prefix, chat_question  # noqa: E402

PASSKEY = FACTS[0]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _cli() -> list[str]:
    exe = shutil.which("ctxcore")
    return [exe] if exe else [sys.executable, "-m", "ctxcore"]


@pytest.fixture(scope="module")
def model_tok(smollm2):
    model, tok = smollm2
    enable(model)
    return model, tok


@pytest.fixture(scope="module")
def passkey_prompt(model_tok):
    _, tok = model_tok
    doc = build_document(SAMPLE_TEXT, tok, 800, [PASSKEY])
    text = chat_prefix(tok, doc) + chat_question(tok, doc, PASSKEY.question)
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])


def _gen(model, ids, cache, n=16):
    return model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=n,
                          do_sample=False, pad_token_id=0)[0, ids.shape[1]:]  # fmt: skip


def test_8bit_greedy_matches_full_cache(model_tok, shakespeare_text):
    model, tok = model_tok
    ids = torch.tensor([tok(shakespeare_text[:3000])["input_ids"][:600]])
    full = _gen(model, ids, transformers.DynamicCache(config=model.config))
    got = _gen(model, ids, CompressedCache(model.config, bits=8))
    assert got.tolist() == full.tolist()


def test_4bit_answers_the_hidden_fact(model_tok, passkey_prompt):
    model, tok = model_tok
    assert passkey_prompt.shape[1] <= 1024
    full = tok.decode(_gen(model, passkey_prompt, transformers.DynamicCache(config=model.config)))
    got = tok.decode(_gen(model, passkey_prompt, CompressedCache(model.config, bits=4)))
    assert PASSKEY.answer in full, full  # the task is within the model's reach
    assert PASSKEY.answer in got, got


def test_tiny_ram_budget_gives_the_same_tokens(model_tok, passkey_prompt, tmp_path):
    model, _ = model_tok
    ref = CompressedCache(model.config, bits=4)
    ref.calibrate(model, passkey_prompt)  # the same codebooks for both (the budget caps the warm-up)
    ref_out = _gen(model, passkey_prompt, ref)
    minimum = ref.store.config["min_ram_budget"]
    budget = max(minimum, ref.memory_stats()["ram_bytes"] // 4)
    cache = CompressedCache(model.config, bits=4, ram_budget=budget, offload_dir=tmp_path)
    cache.calibrate(model, passkey_prompt)
    assert _gen(model, passkey_prompt, cache).tolist() == ref_out.tolist()
    s = cache.memory_stats()
    assert s["ram_bytes"] <= budget < s["compressed_bytes"] and s["disk_bytes"] > 0


def test_save_then_load_in_a_new_process_gives_the_same_answer(model_tok, passkey_prompt, tmp_path):
    model, tok = model_tok
    q_start = passkey_prompt.shape[1] - 20
    ctx, rest = passkey_prompt[:, :q_start], passkey_prompt
    cache = CompressedCache(model.config, bits=4)
    cache.prefill(model, ctx)
    cache.save(tmp_path / "ctx", token_ids=ctx[0])
    here = tok.decode(_gen(model, rest, cache))
    torch.save(rest, tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import torch, ctxcore
        from ctxcore.cache import CompressedCache
        model, tok = ctxcore.load_default_model()
        ctxcore.enable(model)
        cache = CompressedCache.load({str(tmp_path / "ctx")!r}, model.config)
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        assert cache.token_ids == ids[0, :cache.get_seq_length()].tolist()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                             max_new_tokens=16, do_sample=False, pad_token_id=0)
        print("ANSWER:" + tok.decode(out[0, ids.shape[1]:]))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=_env()
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    there = proc.stdout.split("ANSWER:", 1)[1].rstrip("\n")
    assert there == here
    assert PASSKEY.answer in here


def test_cli_ask_save_load_and_errors(model_tok, tmp_path):
    del model_tok
    doc = tmp_path / "doc.txt"
    doc.write_text(SAMPLE_TEXT[:1500] + "\n\nThe secret passkey is 48213.\n\n" + SAMPLE_TEXT[1500:3000])
    save = tmp_path / "saved"

    def run(*a: str) -> subprocess.CompletedProcess:
        return subprocess.run([*_cli(), "ask", *a], capture_output=True, text=True, timeout=600, env=_env())

    p = run("--context", str(doc), "--question", "What is the secret passkey?", "--save", str(save))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "48213" in p.stdout
    p2 = run("--load", str(save), "--question", "What is the secret passkey?")
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert p2.stdout == p.stdout
    assert "without" not in p2.stderr and "prefill:" not in p2.stderr
    p3 = run("--load", str(save), "--question", "What is the secret passkey?", "--json")
    assert p3.returncode == 0, p3.stderr[-3000:]
    got = json.loads(p3.stdout)
    assert "48213" in got["answer"] and got["answer"] == p.stdout.strip()
    assert got["memory"]["tokens"] == got["context_tokens"] > 0 and got["ttft_s"] > 0
    assert "loaded" in got["codebooks"]
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"not a model")
    cases = [
        (("--context", str(tmp_path / "missing.txt"), "--question", "q"), "no such file"),
        (("--context", str(doc), "--question", "  "), "question is empty"),
        (("--context", str(doc), "--question", "q", "--model", str(bad)), "not a .gguf"),
        (("--context", str(doc), "--question", "q", "--load", str(save)), "exclusive"),
        (("--load", str(tmp_path / "nowhere"), "--question", "q"), "nowhere"),
    ]
    if os.geteuid() != 0:  # root can write anywhere
        cases.append((("--context", str(doc), "--question", "q", "--offload-dir", str(ro / "x")), "writable"))
    for args, msg in cases:
        p = run(*args)
        assert p.returncode == 2, (args, p.stderr[-2000:])
        assert msg in p.stderr, (args, p.stderr[-2000:])
        assert "Traceback" not in p.stderr + p.stdout


def test_cli_demo_answers_with_both_caches(smollm2):
    del smollm2
    p = subprocess.run([*_cli(), "demo", "--tokens", "1000", "--max-new-tokens", "12"], capture_output=True,
                       text=True, timeout=900, env=_env())  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert "full (DynamicCache)" in p.stdout and "ctxcore 4-bit" in p.stdout
    assert "KV memory" in p.stdout and "per output token" in p.stdout
    assert "Traceback" not in p.stderr


def test_cli_demo_json_is_one_object_on_stdout(smollm2):
    del smollm2
    p = subprocess.run([*_cli(), "demo", "--tokens", "600", "--max-new-tokens", "8", "--json"],
                       capture_output=True, text=True, timeout=900, env=_env())  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)  # nothing but the JSON object
    assert out["document_tokens"] > 0 and set(out["caches"]) == {"full (DynamicCache)", "ctxcore 4-bit"}
