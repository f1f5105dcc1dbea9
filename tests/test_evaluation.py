"""The evaluation harness (ctxcore eval): baselines and measurements on tiny random models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ctxcore import evaluation as ev  # noqa: E402
from ctxcore.attention import enable  # noqa: E402


def _model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return enable(transformers.LlamaForCausalLM(cfg).eval())


def test_sink_window_cache_keeps_sinks_and_recent_tokens():
    model = _model()
    cache = ev.SinkWindowCache(model.config, sinks=2, window=5)
    ids = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, past_key_values=cache)
        full = transformers.DynamicCache(config=model.config)
        model(ids, past_key_values=full)
    lay, ref = cache.layers[0], full.layers[0]
    assert cache.get_seq_length() == 20 and lay.keys.shape[-2] == 7
    assert torch.equal(lay.keys[..., :2, :], ref.keys[..., :2, :])
    assert torch.equal(lay.keys[..., 2:, :], ref.keys[..., -5:, :])
    assert cache.get_mask_sizes(1, 0) == (8, 0)
    with torch.no_grad():  # a decode step attends sinks + window + itself
        model(ids[:, -1:], past_key_values=cache, position_ids=torch.tensor([[20]]))
    assert lay.keys.shape[-2] == 7 and cache.get_seq_length() == 21


def test_perplexity_bookkeeping():
    model = _model()
    ids = torch.randint(0, 96, (300,), generator=torch.Generator().manual_seed(1))
    full = ev.perplexity(model, ids, 200, 40, "full")
    sink = ev.perplexity(model, ids, 200, 40, "sink", sink_window=8)
    assert full.tokens == 40 and math_close(full.ppl, 2.718281828**full.nll)
    assert full.cached_tokens == 239
    assert sink.kv_bytes < full.kv_bytes
    assert ev.kv_bytes(transformers.DynamicCache(config=model.config), model) == 0


@pytest.mark.model
def test_perplexity_sees_what_each_cache_keeps(smollm2, shakespeare_text):
    """A text repeated: its second copy is predictable only by attending to the first. The
    full cache copies (low perplexity), a small sink + window cache cannot see the first copy,
    and the compressed cache, whose pages hold it, stays close to the full one."""
    model, tok = smollm2
    enable(model)
    para = torch.tensor(tok(shakespeare_text[:2000])["input_ids"][:250])
    ids = torch.cat([para, para])
    full = ev.perplexity(model, ids, 300, 150, "full")
    c4 = ev.perplexity(model, ids, 300, 150, "ctxcore4")
    sink = ev.perplexity(model, ids, 300, 150, "sink", sink_window=16)
    assert full.ppl < 2.0, full.ppl
    assert sink.ppl > 3 * full.ppl, (sink.ppl, full.ppl)
    assert c4.ppl < 1.25 * full.ppl, (c4.ppl, full.ppl)


def math_close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


def test_passkey_prompt_places_the_key():
    tok = _FakeTok()
    filler = "\n\n".join(f"para {i} " + "word " * 20 for i in range(50))
    for depth in (0.0, 0.5, 1.0):
        ids = ev.passkey_prompt(tok, filler, 3000, depth, 12345)
        text = tok.decode(ids[0])
        lo, hi = text.index("para "), text.rindex("word")
        where = (text.index("passkey is 12345") - lo) / (hi - lo)
        assert abs(where - depth) < 0.1, (depth, where)
        assert text.count("12345") == 1 and text.rstrip().endswith("<assistant>")


class _FakeTok:
    """Byte-level stand-in with a chat template."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode())}

    def decode(self, ids):
        return bytes(int(i) for i in ids).decode()

    def apply_chat_template(self, msgs, tokenize=False, add_generation_prompt=True):
        return f"<user>{msgs[0]['content']}</user><assistant>"


@pytest.mark.model
def test_cli_eval_quick_writes_json(smollm2, tmp_path):
    del smollm2
    exe = shutil.which("ctxcore")
    cli = [exe] if exe else [sys.executable, "-m", "ctxcore"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    args = ["eval", "ppl", "--quick", "--methods", "full,sink,ctxcore4", "--out", str(tmp_path)]
    p = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads((tmp_path / "eval-ppl.json").read_text())["results"]
    by = {r["method"]: r for r in rows}
    assert set(by) >= {"full", "sink", "ctxcore4"}
    assert abs(by["ctxcore4"]["ppl"] / by["full"]["ppl"] - 1) < 0.05
    bad = subprocess.run([*cli, "eval", "ppl", "--methods", "nope"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "unknown" in bad.stderr and "Traceback" not in bad.stderr
    args = ["eval", "speed", "--quick", "--isolate", "--methods", "full,ctxcore4", "--out", str(tmp_path)]
    p = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads((tmp_path / "eval-speed.json").read_text())["results"]
    by = {r["method"]: r for r in rows}
    assert set(by) == {"full", "ctxcore4"} and all(r["length"] == 512 for r in rows)
    assert by["ctxcore4"]["kv_bytes"] < by["full"]["kv_bytes"]
    assert all(r["peak_rss_bytes"] > 0 and r["tpot_s"] > 0 for r in rows)
    for flag, value in (("--depths", "0,2"), ("--depths", "half"), ("--trials", "0")):
        bad = subprocess.run([*cli, "eval", "passkey", flag, value], capture_output=True, text=True, env=env)
        assert bad.returncode == 2 and flag in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
