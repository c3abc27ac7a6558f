"""transformers' SAM vision layers (``SamVisionLayer``, ``SamHQVisionLayer``) on sam_fast's kernels.

transformers' vision encoder chooses between its "eager" and "sdpa" attention only, and records hidden states
and attention weights with forward hooks on the layer and attention *classes*. So a layer is not replaced:
:func:`sam_fast.apply` gives the layer object an instance-level ``forward`` (:class:`FastLayerForward`) that
runs segment_anything's block computation through :func:`sam_fast.nn.attention.vit_block_forward` - the fused
window / global attention with the rel-pos bias, a dilated pattern, the int8 fusions - on the layer's own
submodules (``layer_norm1``, ``attn``, ``layer_norm2``, ``mlp``). The class, the parameters, the state_dict keys,
``window_size`` (which SAM-HQ reads to collect its intermediate embeddings) and the hidden-state hooks stay;
``undo()`` deletes the instance ``forward``.

A flash kernel never forms the attention matrix, so attention weights cannot be returned:
:func:`refuse_attention_weights` is a pre-hook on the vision encoder that raises a ``ValueError`` saying so when a
call asks for them (``output_attentions=True`` or ``config.output_attentions``).
"""

from __future__ import annotations

from typing import List, Tuple

from torch import nn

from .._hooks import has_hooks
from .attention import hooked_attention_fallback, vit_block_forward
from .quantized import Int8Linear


class _AttentionView:
    """transformers' ``SamVisionAttention`` under segment_anything's attribute names (read at call time)."""

    __slots__ = ("_attn",)

    def __init__(self, attn: nn.Module):
        self._attn = attn

    @property
    def num_heads(self) -> int:
        return self._attn.num_attention_heads

    def __getattr__(self, name):
        return getattr(self._attn, name)


class FastLayerForward:
    """The instance ``forward`` sam_fast gives a transformers SAM vision layer (module docstring)."""

    def __init__(self, layer: nn.Module, backend: str, pattern):
        self.layer, self.backend, self.pattern = layer, backend, pattern

    def __call__(self, hidden_states, *args, **kwargs):
        layer = self.layer
        if has_hooks(layer.attn):  # the kernels never call attn: transformers' own forward runs, hooks and all
            return hooked_attention_fallback(type(layer).__name__, self.pattern, type(layer).forward.__get__(layer),
                                             hidden_states, *args, **kwargs)
        return vit_block_forward(hidden_states, layer.layer_norm1, _AttentionView(layer.attn), layer.layer_norm2,
                                 layer.mlp, int(layer.window_size), self.backend, self.pattern)

    def __repr__(self):
        return f"FastLayerForward(backend={self.backend!r}, pattern={self.pattern})"


def is_transformers_vit_layer(m: nn.Module) -> bool:
    """Whether ``m`` is structured like transformers' SAM vision layer (by attributes, not class name):
    ``layer_norm1`` / ``layer_norm2``, ``attn`` with linear ``qkv`` / ``proj``, ``num_attention_heads`` and
    ``scale``, ``mlp`` with ``lin1`` / ``lin2``, an integer ``window_size``."""
    attn, mlp = getattr(m, "attn", None), getattr(m, "mlp", None)
    if attn is None or mlp is None or not isinstance(getattr(m, "window_size", None), int):
        return False
    if not all(isinstance(getattr(m, n, None), nn.Module) for n in ("layer_norm1", "layer_norm2")):
        return False
    linear = (nn.Linear, Int8Linear)
    qkv, proj = getattr(attn, "qkv", None), getattr(attn, "proj", None)
    heads = getattr(attn, "num_attention_heads", None)
    if not (isinstance(qkv, linear) and isinstance(proj, linear) and isinstance(heads, int) and heads > 0
            and hasattr(attn, "scale") and qkv.out_features % (3 * heads) == 0):
        return False
    return all(isinstance(getattr(mlp, n, None), linear) for n in ("lin1", "lin2"))


def transformers_vit_layers(model: nn.Module) -> List[Tuple[nn.Module, nn.Module, int]]:
    """(encoder, layer, index) of every transformers SAM vision layer in ``model``; ``encoder`` is the module
    whose ``layers`` list holds it."""
    found = []
    for enc in model.modules():
        layers = getattr(enc, "layers", None)
        if isinstance(layers, nn.ModuleList):
            for index, layer in enumerate(layers):
                if is_transformers_vit_layer(layer):
                    found.append((enc, layer, index))
    return found


def refuse_attention_weights(encoder: nn.Module, args, kwargs):
    """Forward pre-hook (``with_kwargs=True``) of a patched vision encoder: refuse a call that asks for attention
    weights, which the fused kernels never form."""
    config = getattr(encoder, "config", None)
    if kwargs.get("output_attentions", getattr(config, "output_attentions", False)):
        raise ValueError("output_attentions=True: sam_fast's fused attention kernels never form the attention "
                         "matrix, so the vision encoder cannot return attention weights while patched; undo() the "
                         "sam_fast handle (or apply attention='none') for this call. Hidden states "
                         "(output_hidden_states=True) are returned as usual")
    return None
