"""Shared contexts in a real redis-server: content-addressed pages, prefix reuse, concurrent
workers, and faults (server killed mid-save, restarted empty, corrupted and evicted pages, bad
URLs and passwords). Most tests use a tiny random Llama built identically in every process;
one compares greedy answers of the real default model across processes."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("redis", reason='redis-py is not installed (pip install "ctxcore[redis]")')

import ctxcore  # noqa: E402
from ctxcore import shared  # noqa: E402
from ctxcore.cache import cache_kwargs  # noqa: E402
from ctxcore.exceptions import (  # noqa: E402
    ConfigError,
    CorruptDataError,
    PageEvictedError,
    StoreConnectionError,
)

TINY = dict(
    vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=8192,
)  # fmt: skip
KW = dict(bits=4, window=16, sinks=2, page_size=8)
LAYERS = TINY["num_hidden_layers"]


def tiny_model():
    torch.manual_seed(0)
    return ctxcore.enable(transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval())


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def rand_ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (1, n), generator=torch.Generator().manual_seed(seed))


def prefilled(model, ids, codebooks="train", **kw):
    cache = ctxcore.CompressedCache(model.config, codebooks=codebooks, **{**KW, **kw})
    with torch.no_grad():
        model(ids, use_cache=True, **cache_kwargs(model, cache))
    return cache


def answer(model, ids, cache, n=6):
    out = model.generate(
        ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **cache_kwargs(model, cache)
    )
    return out[0, ids.shape[1] :].tolist()


def page_keys(client, ns) -> int:
    return sum(1 for _ in client.scan_iter(match=f"{ns}:*:p:*", count=1000))


def client_of(url):
    import redis

    return redis.Redis.from_url(url)


# -- one process -----------------------------------------------------------------------------
def test_save_load_gives_the_saved_state_and_the_same_answer(model, shared_redis):
    url, ns = shared_redis
    doc, q = rand_ids(300, 0), rand_ids(12, 1)
    cache = prefilled(model, doc)
    report = cache.save(url, token_ids=doc, namespace=ns)
    assert report["tokens"] == 300 and report["pages_written"] == report["pages"] > 0
    prompt = torch.cat([doc, q], 1)
    loaded = ctxcore.CompressedCache.load(url, model.config, token_ids=prompt, namespace=ns, **KW)
    assert loaded.load_info["source"] == "context" and loaded.get_seq_length() == 300
    assert loaded.codebook_source == ["loaded"] * LAYERS
    for layer in range(LAYERS):  # the exact saved state: pages, sinks and window
        assert loaded.store.num_tokens(layer) == cache.store.num_tokens(layer)
        for j in range(cache.store.num_pages(layer)):
            np.testing.assert_array_equal(
                loaded.store.page(layer, j).k_codes, cache.store.page(layer, j).k_codes
            )
        np.testing.assert_array_equal(loaded.store.window(layer)[0], cache.store.window(layer)[0])
    assert answer(model, prompt, loaded) == answer(model, prompt, cache)
    # Saving it again writes no page: the store holds them all.
    again = ctxcore.CompressedCache.load(url, model.config, token_ids=prompt, namespace=ns, **KW)
    assert again.load_info["tokens"] == 300


def test_prompt_equal_to_the_saved_tokens_leaves_one_to_prefill(model, shared_redis):
    url, ns = shared_redis
    doc = rand_ids(200, 2)
    cache = prefilled(model, doc)
    cache.save(url, token_ids=doc, namespace=ns)
    ref = answer(model, doc, prefilled(model, doc[:, :-1]))
    loaded = ctxcore.CompressedCache.load(url, model.config, token_ids=doc, namespace=ns, **KW)
    assert loaded.get_seq_length() == 199 and loaded.load_info["source"] == "context"
    assert answer(model, doc, loaded) == ref


def test_prefix_hit_prefills_only_the_rest(model, shared_redis):
    url, ns = shared_redis
    doc = rand_ids(400, 3)
    prefilled(model, doc).save(url, token_ids=doc, namespace=ns)
    other = torch.cat([doc[:, :250], rand_ids(60, 4)], 1)
    loaded = ctxcore.CompressedCache.load(url, model.config, token_ids=other, namespace=ns, **KW)
    # The longest page-aligned prefix within the 250 shared tokens: sinks + 31 pages of 8.
    assert loaded.load_info["source"] == "prefix"
    assert loaded.get_seq_length() == 2 + 31 * 8
    assert loaded.token_ids == other[0, :250].tolist()
    calls = []
    hook = model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, a, kw: calls.append(kw["hidden_states"].shape[1]), with_kwargs=True
    )
    try:
        out = answer(model, other, loaded, n=3)
    finally:
        hook.remove()
    assert calls[0] == other.shape[1] - 250 and len(out) == 3
    # Nothing shared: a new cache with 0 tokens that still generates.
    none = ctxcore.CompressedCache.load(url, model.config, token_ids=rand_ids(100, 5), namespace=ns, **KW)
    assert none.get_seq_length() == 0 and none.load_info["source"] == "none"
    assert len(answer(model, rand_ids(100, 5), none, n=2)) == 2


def test_second_document_with_a_shared_2k_prefix_adds_only_its_own_pages(model, shared_redis):
    url, ns = shared_redis
    r = client_of(url)
    a = rand_ids(2048 + 200, 6)
    first = prefilled(model, a).save(url, token_ids=a, namespace=ns)
    keys_a, mem_a = page_keys(r, ns), r.info("memory")["used_memory"]
    assert keys_a == first["pages"]
    b = torch.cat([a[:, :2048], rand_ids(200, 7)], 1)
    cache = ctxcore.CompressedCache.load(url, model.config, token_ids=b, namespace=ns, **KW)
    shared_pages = (2048 - KW["sinks"]) // KW["page_size"]
    assert cache.load_info["pages"] == shared_pages
    with torch.no_grad():
        model(b[:, cache.get_seq_length() :], use_cache=True, **cache_kwargs(model, cache))
    second = cache.save(url, token_ids=b, namespace=ns)
    own = second["pages"] - LAYERS * shared_pages
    assert second["pages_written"] == own and page_keys(r, ns) == keys_a + own
    assert second["bytes_written"] < 0.2 * first["bytes_written"]
    # The server's own figure (coarse: it also counts buffers and index entries).
    assert r.info("memory")["used_memory"] - mem_a < 0.5 * first["bytes_written"]
    # Both documents load whole.
    for doc in (a, b):
        c = ctxcore.CompressedCache.load(url, model.config, token_ids=torch.cat([doc, doc[:, :3]], 1),
                                         namespace=ns, **KW)  # fmt: skip
        assert c.load_info["source"] == "context" and c.get_seq_length() == doc.shape[1]


def test_namespaces_and_settings_do_not_mix(model, shared_redis):
    url, ns = shared_redis
    doc = rand_ids(200, 8)
    prefilled(model, doc).save(f"{url}?namespace={ns}", token_ids=doc)
    prompt = torch.cat([doc, rand_ids(5, 9)], 1)
    assert ctxcore.CompressedCache.load(
        url, model.config, token_ids=prompt, namespace=ns, **KW
    ).get_seq_length()
    other_ns = ctxcore.CompressedCache.load(url, model.config, token_ids=prompt, namespace=ns + "x", **KW)
    other_window = ctxcore.CompressedCache.load(
        url, model.config, token_ids=prompt, namespace=ns, **{**KW, "window": 32}
    )
    assert other_ns.get_seq_length() == 0 and other_window.get_seq_length() == 0


def test_bad_inputs_are_typed_errors(model, shared_redis):
    url, ns = shared_redis
    doc = rand_ids(50, 10)
    cache = prefilled(model, doc)
    with pytest.raises(ConfigError, match="token_ids"):
        cache.save(url, namespace=ns)
    with pytest.raises(ConfigError, match="holds 50"):
        cache.save(url, token_ids=doc[:, :40], namespace=ns)
    with pytest.raises(ConfigError, match="namespace"):
        cache.save(url, token_ids=doc, namespace="bad name!")
    with pytest.raises(ConfigError, match="token_ids"):
        ctxcore.CompressedCache.load(url, model.config, namespace=ns)
    with pytest.raises(ConfigError, match="JSON"):
        cache.save(url, token_ids=doc, metadata={"x": object()}, namespace=ns)


# -- several processes -----------------------------------------------------------------------
WORKER = textwrap.dedent(
    """
    import json, sys
    import torch, transformers, ctxcore
    from ctxcore.cache import cache_kwargs
    torch.set_num_threads(1)
    args = json.loads(sys.argv[1])
    torch.manual_seed(0)
    model = ctxcore.enable(transformers.LlamaForCausalLM(transformers.LlamaConfig(**args["tiny"])).eval())
    prompt = torch.tensor([args["prompt"]])
    cache = ctxcore.CompressedCache.load(args["url"], model.config, token_ids=prompt, namespace=args["ns"],
                                         **args["kw"])
    if args.get("save"):
        with torch.no_grad():
            model(prompt[:, cache.get_seq_length():], use_cache=True, **cache_kwargs(model, cache))
        cache.save(args["url"], token_ids=prompt, namespace=args["ns"])
        print(json.dumps({"tokens": cache.get_seq_length()}))
    else:
        out = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             **cache_kwargs(model, cache))
        print(json.dumps({"matched": cache.load_info["tokens"], "answer": out[0, prompt.shape[1]:].tolist()}))
    """
)


def _spawn(tmp_path: Path, **args) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    payload = json.dumps({"tiny": TINY, "kw": KW, **args})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(script), payload], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip


def _result(p: subprocess.Popen) -> dict:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_four_workers_answer_at_once_as_they_do_one_by_one(model, shared_redis, tmp_path):
    url, ns = shared_redis
    doc = rand_ids(600, 11)
    prefilled(model, doc).save(url, token_ids=doc, namespace=ns)
    prompts = [torch.cat([doc, rand_ids(10, 20 + i)], 1)[0].tolist() for i in range(4)]
    one_by_one = [_result(_spawn(tmp_path, url=url, ns=ns, prompt=p)) for p in prompts]
    at_once = [_result(p) for p in [_spawn(tmp_path, url=url, ns=ns, prompt=p) for p in prompts]]
    assert at_once == one_by_one
    assert all(r["matched"] == 600 for r in at_once)
    assert len({tuple(r["answer"]) for r in at_once}) > 1  # different questions, different answers


def test_two_writers_saving_one_prefix_at_once_give_one_copy(model, shared_redis, tmp_path):
    url, ns = shared_redis
    seed_doc = rand_ids(100, 12)
    prefilled(model, seed_doc).save(url, token_ids=seed_doc, namespace=ns)  # shared codebooks
    doc = torch.cat([seed_doc, rand_ids(700, 13)], 1)[0].tolist()
    writers = [_spawn(tmp_path, url=url, ns=ns, prompt=doc, save=True) for _ in range(2)]
    assert all(_result(w)["tokens"] == len(doc) for w in writers)
    n_pages = (len(doc) - KW["sinks"] - KW["window"]) // KW["page_size"]
    assert page_keys(client_of(url), ns) == LAYERS * n_pages
    c = ctxcore.CompressedCache.load(url, model.config, token_ids=doc + [1], namespace=ns, **KW)
    assert c.load_info["source"] == "context" and c.get_seq_length() == len(doc)


@pytest.mark.model
def test_real_model_answer_loaded_in_another_process_equals_the_prefilling_one(
    tmp_path, shared_redis, shakespeare_text
):
    pytest.importorskip("gguf")
    url, ns = shared_redis
    script = tmp_path / "real.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, sys, torch, ctxcore
            from ctxcore.cache import cache_kwargs
            url, ns, role, text = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
            model, tok = ctxcore.load_default_model()
            ctxcore.enable(model)
            doc = tok(text, return_tensors="pt").input_ids[:, :900]
            q = tok("\\nQuestion: who speaks first in this scene? Answer:", return_tensors="pt").input_ids
            prompt = torch.cat([doc, q], 1)
            if role == "prefill":
                cache = ctxcore.CompressedCache(model.config)
                with torch.no_grad():
                    model(doc, use_cache=True, **cache_kwargs(model, cache))
                cache.save(url, token_ids=doc, namespace=ns)
            else:
                cache = ctxcore.CompressedCache.load(url, model.config, token_ids=prompt, namespace=ns)
                assert cache.load_info["source"] == "context", cache.load_info
            out = model.generate(prompt, max_new_tokens=12, do_sample=False, **cache_kwargs(model, cache))
            print(json.dumps(out[0, prompt.shape[1]:].tolist()))
            """
        )
    )
    text = shakespeare_text[:6000]

    def run(role):
        p = subprocess.run([sys.executable, str(script), url, ns, role, text], capture_output=True, text=True,
                           timeout=900)  # fmt: skip
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout.strip().splitlines()[-1])

    first = run("prefill")
    assert run("load") == first and len(first) == 12


# -- faults ----------------------------------------------------------------------------------
def test_server_killed_mid_save_is_typed_and_earlier_contexts_survive(model, redis_factory):
    srv = redis_factory("--appendonly", "yes", "--appendfsync", "always")
    a, b = rand_ids(200, 14), rand_ids(1200, 15)
    prefilled(model, a).save(srv.url, token_ids=a)
    cache_b = prefilled(model, b)
    with pytest.raises(StoreConnectionError, match="127.0.0.1"):
        shared.save(cache_b, srv.url, b, _after_batch=lambda n: srv.kill())
    srv.start()  # the same data directory: the append-only file replays what was saved
    got_a = ctxcore.CompressedCache.load(srv.url, model.config, token_ids=torch.cat([a, b[:, :4]], 1), **KW)
    assert got_a.load_info["source"] == "context" and got_a.get_seq_length() == 200
    got_b = ctxcore.CompressedCache.load(srv.url, model.config, token_ids=torch.cat([b, a[:, :4]], 1), **KW)
    assert got_b.get_seq_length() == 0  # half-written: nothing of it is findable
    cache_b.save(srv.url, token_ids=b)  # and saving it again completes it
    again = ctxcore.CompressedCache.load(srv.url, model.config, token_ids=torch.cat([b, a[:, :4]], 1), **KW)
    assert again.get_seq_length() == 1200


def test_server_restarted_empty_loads_nothing_and_generation_works(model, redis_server):
    doc = rand_ids(300, 16)
    prefilled(model, doc).save(redis_server.url, token_ids=doc)
    redis_server.kill()
    with pytest.raises(StoreConnectionError):
        ctxcore.CompressedCache.load(redis_server.url, model.config, token_ids=doc, **KW)
    redis_server.start()  # no persistence: empty
    prompt = torch.cat([doc, rand_ids(8, 17)], 1)
    cache = ctxcore.CompressedCache.load(redis_server.url, model.config, token_ids=prompt, **KW)
    assert cache.get_seq_length() == 0 and cache.load_info["source"] == "none"
    ref = answer(model, prompt, ctxcore.CompressedCache(model.config, **KW))
    assert answer(model, prompt, cache) == ref


@pytest.mark.parametrize("kind", ["p", "t", "b"])
def test_corrupted_bytes_raise_corrupt_data_error(model, redis_server, kind):
    doc = rand_ids(300, 18)
    prefilled(model, doc).save(redis_server.url, token_ids=doc)
    r = redis_server.client()
    key = sorted(r.scan_iter(match=f"*:{kind}:*"))[0]
    val = bytearray(r.get(key))
    val[len(val) // 2] ^= 0x40
    r.set(key, bytes(val))
    prompt = torch.cat([doc, rand_ids(4, 19)], 1)
    if kind != "p":
        with pytest.raises(CorruptDataError, match="checksum"):
            ctxcore.CompressedCache.load(redis_server.url, model.config, token_ids=prompt, **KW)
        return
    # Pages are read, and verified, when a layer first needs them: the first forward fails.
    cache = ctxcore.CompressedCache.load(redis_server.url, model.config, token_ids=prompt, **KW)
    with pytest.raises(CorruptDataError, match="checksum"):
        answer(model, prompt, cache)


def test_pages_are_read_on_first_use_a_layer_at_a_time(model, redis_server, tmp_path):
    doc, q = rand_ids(300, 40), rand_ids(6, 41)
    src = prefilled(model, doc)
    src.save(redis_server.url, token_ids=doc)
    prompt = torch.cat([doc, q], 1)
    ref = answer(model, prompt, copy.deepcopy(src))
    r = redis_server.client()
    r.config_resetstat()
    cache = ctxcore.CompressedCache.load(redis_server.url, model.config, token_ids=prompt, **KW)
    n = src.store.paged_tokens(0) // KW["page_size"]  # closed pages
    assert n > 0 and cache.store.num_pages(0) == src.store.num_pages(0)
    # load read the codebooks and the tail, and only checked that the pages exist.
    assert all(len(cache.store._s.pending_pages(layer)) == n for layer in range(LAYERS))
    assert cache.store.stats()["ram_page_bytes"] == 0
    stats = r.info("commandstats")
    assert stats["cmdstat_mget"]["calls"] == 1, stats["cmdstat_mget"]
    # A copy taken before any page is read fetches its own; both answer as the prefilled cache.
    twin = copy.deepcopy(cache)
    # Reading one layer reads that layer (and the next one ahead of use), not the others.
    cache.store.page(0, 0)
    assert cache.store._s.pending_pages(0) == [] and len(cache.store._s.pending_pages(1)) == n
    assert answer(model, prompt, cache) == ref
    assert all(cache.store._s.pending_pages(layer) == [] for layer in range(LAYERS))
    assert len(twin.store._s.pending_pages(0)) == n
    assert answer(model, prompt, twin) == ref
    # Saving a loaded context elsewhere reads what it has not read yet.
    third = ctxcore.CompressedCache.load(redis_server.url, model.config, token_ids=prompt, **KW)
    third.save(tmp_path / "ctx", token_ids=doc)
    back = ctxcore.CompressedCache.load(tmp_path / "ctx", model.config, token_ids=prompt)
    assert back.get_seq_length() == 300 and answer(model, prompt, back) == ref


def test_a_page_evicted_after_load_is_a_typed_error_then_a_clean_miss(model, redis_server):
    doc = rand_ids(300, 42)
    cache = prefilled(model, doc)
    cache.save(redis_server.url, token_ids=doc)
    prompt = torch.cat([doc, rand_ids(5, 43)], 1)
    loaded = ctxcore.CompressedCache.load(redis_server.url, model.config, token_ids=prompt, **KW)
    assert loaded.get_seq_length() == 300
    r = redis_server.client()
    codec = shared._codec(cache.store.config)
    h = shared._hashes(doc[0].numpy().astype("<i8"), codec, [2 + 8 * 11])[2 + 8 * 11]
    (key,) = list(r.scan_iter(match=f"*:p:*:1:{h}"))  # layer 1, page 10
    r.delete(key)
    with pytest.raises(PageEvictedError, match="layer 1.*load the context again"):
        answer(model, prompt, loaded)
    # Loading again takes the longest prefix still complete, and answers like a fresh cache.
    again = ctxcore.CompressedCache.load(redis_server.url, model.config, token_ids=prompt, **KW)
    assert again.load_info["source"] == "prefix" and again.get_seq_length() == 2 + 10 * 8
    ref = answer(model, prompt, prefilled(model, doc[:, : 2 + 10 * 8]))
    assert answer(model, prompt, again) == ref


def test_a_lost_page_is_a_clean_miss_to_the_longest_complete_prefix(model, redis_server):
    doc = rand_ids(400, 20)
    cache = prefilled(model, doc)
    cache.save(redis_server.url, token_ids=doc)
    r = redis_server.client()
    codec = shared._codec(cache.store.config)
    books = shared.connect(redis_server.url)  # a live connection works with the defaults
    assert books.ns == "ctxcore"
    h = shared._hashes(doc[0].numpy().astype("<i8"), codec, [2 + 8 * 21])[2 + 8 * 21]
    (key,) = list(r.scan_iter(match=f"*:p:*:1:{h}"))  # layer 1, page 20
    r.delete(key)
    prompt = torch.cat([doc, rand_ids(4, 21)], 1)
    got = ctxcore.CompressedCache.load(redis_server.url, model.config, token_ids=prompt, **KW)
    assert got.load_info["source"] == "prefix" and got.load_info["pages"] == 20
    assert got.get_seq_length() == 2 + 20 * 8
    for layer in range(LAYERS):
        assert got.store.num_pages(layer) == 20
        for j in range(20):
            np.testing.assert_array_equal(
                got.store.page(layer, j).v_codes, cache.store.page(layer, j).v_codes
            )
    assert len(answer(model, prompt, got, n=2)) == 2


def test_eviction_under_maxmemory_never_leaves_a_hole(model, redis_server):
    r = redis_server.client()
    docs = [rand_ids(500, 30 + i) for i in range(3)]
    caches = [prefilled(model, d) for d in docs]
    for c, d in zip(caches, docs, strict=True):
        c.save(redis_server.url, token_ids=d)
    used = r.info("memory")["used_memory"]
    r.config_set("maxmemory-policy", "allkeys-random")
    r.config_set("maxmemory", str(int(used * 0.7)))
    for i in range(200):  # other users' data pushes ours out
        r.set(f"filler:{i}", b"x" * 4096)
    assert r.info("stats")["evicted_keys"] > 0
    for c, d in zip(caches, docs, strict=True):
        prompt = torch.cat([d, rand_ids(4, 40)], 1)
        got = ctxcore.CompressedCache.load(redis_server.url, model.config, token_ids=prompt, **KW)
        n = got.get_seq_length()
        assert got.load_info["source"] in ("context", "prefix", "none")
        if got.load_info["source"] == "prefix":  # page-aligned, every page the saved one
            assert (n - 2) % 8 == 0
            for j in range(got.store.num_pages(0)):
                np.testing.assert_array_equal(got.store.page(0, j).k_codes, c.store.page(0, j).k_codes)
        assert len(answer(model, prompt, got, n=2)) == 2


def test_bad_url_and_wrong_password_fail_before_any_prefill(model, redis_factory):
    srv = redis_factory("--requirepass", "s3cret")
    doc = rand_ids(20, 22)
    with pytest.raises(ConfigError):
        ctxcore.CompressedCache.load("redis://127.0.0.1:notaport/0", model.config, token_ids=doc)
    with pytest.raises(ConfigError, match="not a redis URL"):
        shared.connect("http://127.0.0.1/")
    with pytest.raises(StoreConnectionError, match="127.0.0.1:1"):
        ctxcore.CompressedCache.load("redis://127.0.0.1:1/0", model.config, token_ids=doc)
    for url in (srv.url, f"redis://:wrong@127.0.0.1:{srv.port}/0"):
        with pytest.raises(StoreConnectionError, match="authentication") as e:
            ctxcore.CompressedCache.load(url, model.config, token_ids=doc)
        assert "wrong" not in str(e.value)  # the password is never echoed
    ok = f"redis://:s3cret@127.0.0.1:{srv.port}/3"
    cache = prefilled(model, rand_ids(100, 23))
    cache.save(ok, token_ids=rand_ids(100, 23))
    got = ctxcore.CompressedCache.load(ok, model.config, token_ids=rand_ids(101, 23), **KW)
    assert got.get_seq_length() == 100


# -- directories with token_ids --------------------------------------------------------------
def test_directory_load_with_token_ids_holds_the_shared_prefix(model, tmp_path):
    doc = rand_ids(300, 24)
    cache = prefilled(model, doc)
    cache.save(tmp_path / "ctx", token_ids=doc)
    longer = torch.cat([doc, rand_ids(5, 25)], 1)
    full = ctxcore.CompressedCache.load(tmp_path / "ctx", model.config, token_ids=longer)
    assert full.get_seq_length() == 300
    assert answer(model, longer, full) == answer(model, longer, cache.__deepcopy__({}))
    same = ctxcore.CompressedCache.load(tmp_path / "ctx", model.config, token_ids=doc)
    assert same.get_seq_length() == 299  # one left to prefill, cropped from the window
    part = ctxcore.CompressedCache.load(tmp_path / "ctx", model.config,
                                        token_ids=torch.cat([doc[:, :100], rand_ids(9, 26)], 1))  # fmt: skip
    assert part.get_seq_length() == 2 + 12 * 8 and part.token_ids == doc[0, :98].tolist()
    none = ctxcore.CompressedCache.load(tmp_path / "ctx", model.config, token_ids=rand_ids(50, 27))
    assert none.get_seq_length() == 0
    with pytest.raises(ConfigError, match="shared stores"):
        ctxcore.CompressedCache.load(tmp_path / "ctx", model.config, window=8)


@pytest.mark.model
def test_cli_ask_shared_prefills_once_and_then_loads(tmp_path, shared_redis, shakespeare_text):
    pytest.importorskip("gguf")
    url, ns = shared_redis
    doc = tmp_path / "doc.txt"
    doc.write_text(
        shakespeare_text[:2500] + "\n\nThe secret passkey is 48213.\n\n" + shakespeare_text[2500:4000]
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")

    def ask(*a: str) -> dict:
        cmd = [sys.executable, "-m", "ctxcore", "ask", "--context", str(doc), "--json", *a]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout)

    target = f"{url}?namespace={ns}"
    first = ask("--question", "What is the secret passkey?", "--shared", target)
    assert first["loaded_tokens"] == 0 and "48213" in first["answer"]
    second = ask("--question", "What is the secret passkey?", "--shared", target)
    assert second["loaded_tokens"] == second["context_tokens"] - 1
    assert second["answer"] == first["answer"]
    bad = subprocess.run(
        [sys.executable, "-m", "ctxcore", "ask", "--context", str(doc), "--question", "q", "--shared",
         "redis://127.0.0.1:1/0"], capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert bad.returncode != 0 and "--shared" in bad.stderr and "Traceback" not in bad.stderr


def test_tls_rediss_url_with_the_servers_ca(model, tmp_path):
    import shutil
    import socket
    import time

    import redis

    openssl, binary = shutil.which("openssl"), shutil.which("redis-server")
    if openssl is None or binary is None:
        pytest.skip("needs openssl and redis-server")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
            "--tls-cert-file",
            str(cert),
            "--tls-key-file",
            str(key),
            "--tls-ca-cert-file",
            str(cert),
            "--tls-auth-clients",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}"
        for _ in range(200):
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        doc = rand_ids(120, 50)
        assert prefilled(model, doc).save(url, token_ids=doc)["pages_written"] > 0
        got = ctxcore.CompressedCache.load(url, model.config, token_ids=torch.cat([doc, doc[:, :2]], 1), **KW)
        assert got.get_seq_length() == 120
        with pytest.raises(StoreConnectionError):  # TLS port, plain protocol
            shared.connect(f"redis://127.0.0.1:{port}/0")
        with pytest.raises(StoreConnectionError):  # a certificate nobody vouched for
            shared.connect(f"rediss://127.0.0.1:{port}/0")
    finally:
        proc.kill()
        proc.wait()


def test_multi_turn_chat_reuses_the_earlier_turns(model, shared_redis):
    url, ns = shared_redis
    turn1 = torch.cat([rand_ids(300, 60), rand_ids(10, 61)], 1)
    cache = ctxcore.CompressedCache.load(url, model.config, token_ids=turn1, namespace=ns, **KW)
    assert cache.get_seq_length() == 0
    out = model.generate(
        turn1, max_new_tokens=8, min_new_tokens=8, do_sample=False, **cache_kwargs(model, cache)
    )
    held = cache.get_seq_length()  # the last generated token is not in the cache yet
    assert held == out.shape[1] - 1
    cache.save(url, token_ids=out[:, :held], namespace=ns)
    turn2 = torch.cat([out, rand_ids(10, 62)], 1)
    again = ctxcore.CompressedCache.load(url, model.config, token_ids=turn2, namespace=ns, **KW)
    assert again.load_info["source"] == "context" and again.get_seq_length() == held
    ref = answer(model, turn2, cache)  # the first process, continuing its own cache
    assert answer(model, turn2, again) == ref


def test_selective_and_budgeted_contexts_round_trip(model, shared_redis, tmp_path):
    url, ns = shared_redis
    doc = rand_ids(400, 63)
    kw = dict(KW, select=0.5, keep_full_precision=True)
    cache = prefilled(model, doc, **kw)
    cache.save(url, token_ids=doc, namespace=ns)
    prompt = torch.cat([doc, rand_ids(6, 64)], 1)
    # With a RAM budget far below the context (a quarter above the shape's fixed minimum): pages
    # spill to the local disk tier as they arrive.
    budget = cache.store.config["min_ram_budget"] * 5 // 4
    assert budget < cache.memory_stats()["ram_bytes"] // 2
    got = ctxcore.CompressedCache.load(
        url, model.config, token_ids=prompt, namespace=ns, ram_budget=budget, offload_dir=tmp_path, **kw
    )
    assert got.load_info["source"] == "context" and got.select == 0.5
    assert got.memory_stats()["disk_bytes"] == 0  # pages are read on first use
    assert answer(model, prompt, got) == answer(model, prompt, cache)
    s = got.memory_stats()
    assert s["disk_bytes"] > 0 and s["ram_bytes"] <= got.store.config["ram_budget"]
    # The same tokens under another codec (no fp16 page copies) share nothing.
    plain = ctxcore.CompressedCache.load(url, model.config, token_ids=prompt, namespace=ns, **KW)
    assert plain.get_seq_length() == 0
