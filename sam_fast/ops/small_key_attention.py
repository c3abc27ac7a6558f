"""``small_key_attention``: the mask decoder's image-to-token attention, 4096 queries over a prompt's few keys,
queries optionally shared between prompts, as one Triton kernel (:mod:`sam_fast.kernels.small_key_attention`).
Reference: :mod:`sam_fast.reference.small_key_attention`; :class:`sam_fast.nn.BatchedMaskDecoder` calls it.
"""

from __future__ import annotations

import torch

from .._dispatch import Backend, Refusal, dispatch, triton_device_refusal
from ..reference import small_key_attention as _ref

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

@torch.library.custom_op("sam_fast::small_key_attention", mutates_args=())
def _small_key_attention_op(q: torch.Tensor, q_index: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            num_heads: int) -> torch.Tensor:
    from ..kernels import small_key_attention as kernel

    return kernel.small_key_attention(q, q_index, k, v, num_heads)


@_small_key_attention_op.register_fake
def _(q, q_index, k, v, num_heads):
    return q.new_empty((k.shape[0], q.shape[1], q.shape[2]))


def _ska_supports(q, q_index, k, v, num_heads, explicit):
    refusal = triton_device_refusal(q, explicit)
    if refusal is not None:
        return refusal
    from ..kernels.small_key_attention import MAX_HEAD_DIM, MAX_KEYS

    if k.shape[1] > MAX_KEYS:
        return Refusal(f"the kernel holds all keys in registers: at most {MAX_KEYS}, got {k.shape[1]}")
    if q.shape[2] // num_heads > MAX_HEAD_DIM:
        return Refusal(f"head dims up to {MAX_HEAD_DIM}, got {q.shape[2] // num_heads}")
    return None


def _ska_run(q, q_index, k, v, num_heads):
    last = lambda t: t if t.stride(-1) == 1 else t.contiguous()  # noqa: E731
    return _small_key_attention_op(last(q), q_index.long().contiguous(), last(k), last(v), num_heads)


_SKA_TABLE = (
    Backend("triton", _ska_supports, _ska_run),
    Backend("reference", lambda *args, explicit: None, _ref.small_key_attention),
)


def small_key_attention(q: torch.Tensor, q_index: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        num_heads: int, *, backend: str = "auto", check_index: bool = True) -> torch.Tensor:
    """Many queries attending to a few keys, queries shared between prompts through ``q_index``.

    Args:
        q: (G, N, heads * D) query rows; prompt p reads ``q[q_index[p]]``.
        q_index: (P,) int64 / int32 in [0, G).
        k, v: (P, T, heads * D) each prompt's keys and values (T small: the kernel holds them all).
        num_heads: heads; D = q.shape[-1] // num_heads, scale 1 / sqrt(D) (segment_anything's Attention).
        backend: "auto" | "triton" | "reference".
        check_index: verify that q_index lies in [0, G) (one device-to-host read); callers that built
            q_index themselves, as :class:`sam_fast.nn.BatchedMaskDecoder` does twice per call, skip it.

    Returns:
        (P, N, heads * D).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS or t.dtype != q.dtype:
            raise TypeError(f"{name} must be float32, float16 or bfloat16 with q's dtype {q.dtype}, got {t.dtype}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-d, got shape {tuple(t.shape)}")
    if not isinstance(q_index, torch.Tensor) or q_index.dim() != 1 or q_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"q_index must be a 1-d int64/int32 tensor, got {q_index!r}")
    if not isinstance(num_heads, int) or num_heads < 1 or q.shape[2] % num_heads:
        raise ValueError(f"num_heads must be a positive int dividing {q.shape[2]}, got {num_heads!r}")
    P = k.shape[0]
    if tuple(v.shape) != tuple(k.shape) or k.shape[2] != q.shape[2]:
        raise ValueError(f"k and v must have shape (P, T, {q.shape[2]}), got {tuple(k.shape)} and {tuple(v.shape)}")
    if q_index.shape[0] != P:
        raise ValueError(f"q_index must have one entry per prompt ({P}), got {q_index.shape[0]}")
    if P and check_index:
        lo, hi = torch.stack(torch.aminmax(q_index)).tolist()
        if lo < 0 or hi >= q.shape[0]:
            raise ValueError(f"q_index must lie in [0, {q.shape[0]}), got [{lo}, {hi}]")
    if k.shape[1] < 1:
        raise ValueError("k must hold at least one key per prompt")
    return dispatch("small_key_attention", _SKA_TABLE, backend, q, q_index, k, v, num_heads)
