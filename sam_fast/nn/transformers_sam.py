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

from torch import nn

from .._hooks import has_hooks
from .attention import hooked_attention_fallback, vit_block_forward


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
