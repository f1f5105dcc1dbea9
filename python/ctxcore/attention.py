"""The ``"ctxcore"`` attention implementation for transformers models.

:func:`enable` registers (once) an attention function and its mask function under the name
``"ctxcore"`` in transformers' ``AttentionInterface`` / ``AttentionMaskInterface`` and switches
the model to it. With a :class:`ctxcore.CompressedCache` as ``past_key_values``, attention then
reads the compressed pages directly (through the Rust kernels behind
``torch.ops.ctxcore.pq_attention``, or Quest page selection with ``select=``); with any other cache
(or none) it is plain ``scaled_dot_product_attention``, so an enabled model keeps working with
``DynamicCache`` and friends.
"""

from __future__ import annotations

from typing import Any

import torch

from .cache import _sdpa, check_supported, take_handoff

__all__ = ["ATTENTION_NAME", "disable", "enable", "ctxcore_attention"]

ATTENTION_NAME = "ctxcore"
_registered = False


def ctxcore_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function with transformers' signature: ``query`` ``[B, Hq, Tq, D]``,
    ``key``/``value`` ``[B, Hkv, T, D]`` -> ``([B, Tq, Hq, D], None)``.

    If ``key`` is what a :class:`ctxcore.CompressedCache` layer's ``update`` just returned, the
    attention covers that layer's compressed history plus these new tokens; otherwise it is SDPA
    over ``key``/``value`` as given."""
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    layer = take_handoff(key)
    if layer is None:
        return _sdpa(module, query, key, value, attention_mask, scale, dropout=dropout, **kwargs), None
    if dropout and module.training:
        raise NotImplementedError("ctxcore attention is for inference: call model.eval()")
    return layer.attend(module, query, attention_mask, scale, **kwargs), None


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, ctxcore_attention)
    # Without a mask function under the same name transformers would pass no mask at all.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    _registered = True


def enable(model: Any) -> Any:
    """Switch ``model`` (a transformers decoder) to the ctxcore attention; returns ``model``.

    Raises :class:`~ctxcore.exceptions.UnsupportedModelError` for architectures the compressed
    cache does not support (see :func:`ctxcore.cache.check_supported`: encoder-decoder,
    state-space hybrids, multi-head latent attention, learned sinks, soft-capped logits).
    """
    check_supported(model.config)
    _register()
    prev = getattr(model.config, "_attn_implementation", None)
    if prev != ATTENTION_NAME:
        model._ctxcore_previous_attn = prev or "sdpa"
    model.set_attn_implementation(ATTENTION_NAME)
    return model


def disable(model: Any) -> Any:
    """Restore the attention implementation ``model`` had before :func:`enable`."""
    prev = getattr(model, "_ctxcore_previous_attn", None) or "sdpa"
    model.set_attn_implementation(prev)
    return model
