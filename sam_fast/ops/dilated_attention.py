"""``sam_fast.dilated_attention``: flash (dilated) attention with SAM's rel-pos bias.

Layers: the Triton launchers in :mod:`sam_fast.kernels.dilated_attention` are registered here once as
``sam_fast::dilated_attention_fwd`` / ``sam_fast::dilated_attention_bwd`` custom ops with fakes and
autograd; :func:`dilated_attention` validates, picks a backend (``auto | triton | cuda | cpu |
reference``) and runs it. The plain-PyTorch reference is :mod:`sam_fast.reference.dilated_attention`.

The ops are ``torch.library.custom_op``s (opaque to torch.compile): a ``triton_op`` is traced into by
AOTAutograd, which cannot run a kernel under ``TRITON_INTERPRET=1``, so neither ``opcheck`` nor a compiled model
could be tested on a CPU machine. The forward also exists as the ``triton_op``
``sam_fast::triton_dilated_attention_fwd``, which a trace for an AOTInductor package of a CUDA model calls instead, so
that the package holds the compiled kernel.
"""

from __future__ import annotations

import math
import numbers
from typing import List, Optional, Tuple

import torch
from torch.library import triton_op

from .._dispatch import Backend, Refusal, dispatch, triton_device_refusal, triton_op_wanted
from ..kernels import dilated_attention as _k
from ..pattern import ResolvedBranch, check_grid, resolve_pattern
from ..reference.dilated_attention import dilated_attention_reference
from .dilated_attention_cpu import cpu_dilated_attention

Tensor = torch.Tensor
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _opt(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None or t.numel() == 0 else t


@torch.library.custom_op("sam_fast::dilated_attention_fwd", mutates_args=())
def _fwd_op(
    q: Tensor, k: Tensor, v: Tensor, geometry: List[int],
    rel_pos_h: Optional[Tensor], rel_pos_w: Optional[Tensor],
    pad_k: Optional[Tensor], pad_v: Optional[Tensor], scale: float,
) -> Tuple[Tensor, Tensor]:
    return _k.dilated_attention_fwd(q, k, v, geometry, rel_pos_h, rel_pos_w, pad_k, pad_v, scale)


@_fwd_op.register_fake
def _(q, k, v, geometry, rel_pos_h, rel_pos_w, pad_k, pad_v, scale):
    B, N, H, D = q.shape
    return q.new_empty((B, N, H, D)), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("sam_fast::dilated_attention_bwd", mutates_args=())
def _bwd_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
    geometry: List[int], rel_pos_h: Optional[Tensor], rel_pos_w: Optional[Tensor],
    pad_k: Optional[Tensor], pad_v: Optional[Tensor], scale: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _k.dilated_attention_bwd(dout, q, k, v, out, lse, dlse, geometry, rel_pos_h, rel_pos_w,
                                     pad_k, pad_v, scale)
    # custom ops cannot return None: absent gradients are empty tensors.
    return tuple(g if g is not None else q.new_empty(0) for g in grads)


@_bwd_op.register_fake
def _(dout, q, k, v, out, lse, dlse, geometry, rel_pos_h, rel_pos_w, pad_k, pad_v, scale):
    def like(t):
        return q.new_empty(0) if t is None else torch.empty_like(t)

    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), like(rel_pos_h), like(rel_pos_w),
            like(pad_k), like(pad_v))


def _setup_context(ctx, inputs, output):
    q, k, v, geometry, rel_pos_h, rel_pos_w, pad_k, pad_v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, rel_pos_h, rel_pos_w, pad_k, pad_v)
    ctx.geometry = geometry
    ctx.scale = scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, rel_pos_h, rel_pos_w, pad_k, pad_v = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, drh, drw, dpk, dpv = _bwd_op(dout, q, k, v, out, lse, dlse, ctx.geometry, rel_pos_h,
                                             rel_pos_w, pad_k, pad_v, ctx.scale)
    return dq, dk, dv, None, _opt(drh), _opt(drw), _opt(dpk), _opt(dpv), None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@triton_op("sam_fast::triton_dilated_attention_fwd", mutates_args=())
def _fwd_twin(
    q: Tensor, k: Tensor, v: Tensor, geometry: List[int],
    rel_pos_h: Optional[Tensor], rel_pos_w: Optional[Tensor],
    pad_k: Optional[Tensor], pad_v: Optional[Tensor], scale: float,
) -> Tuple[Tensor, Tensor]:
    """The forward as a ``triton_op``, for AOTInductor packages of CUDA models
    (:func:`sam_fast._dispatch.triton_op_wanted`): Inductor sees its launches and compiles the kernel into the
    package. Inference only (an export traces without autograd)."""
    return _k.dilated_attention_fwd(q, k, v, geometry, rel_pos_h, rel_pos_w, pad_k, pad_v, scale, traceable=True)


# ------------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------------


def _triton_supports(q, k, v, branches, grid, rel_pos_h, rel_pos_w, scale, pad_kv, explicit):
    refusal = triton_device_refusal(q, explicit)
    if refusal is not None:
        return refusal
    if q.dtype not in _FLOATS:
        return Refusal(f"the Triton kernel supports float16/bfloat16/float32, got {q.dtype}")
    D = q.shape[-1]
    if D > _k.MAX_HEAD_DIM:
        return Refusal(f"the Triton kernel supports head dim D <= {_k.MAX_HEAD_DIM}, got head dim D={D}")
    if rel_pos_h is not None and any(br.is_2d for br in branches):
        # 1-D branches take per-key tables of any width; 2-D ones keep a kept row in one key block
        kw = max(br.kept_extent(pad_kv is not None)[1]
                 for br in branches if br.is_2d)
        if kw > _k.MAX_REL_WIDTH:
            return Refusal(f"with the rel-pos bias the Triton kernel supports kept segment widths up to "
                           f"{_k.MAX_REL_WIDTH}, got {kw}")
    return None


def _triton_run(q, k, v, branches, grid, rel_pos_h, rel_pos_w, scale, pad_kv):
    tokens = grid if grid is not None else (1, q.shape[1])
    geometry = _k.encode_pattern(*tokens, [(br.rows, br.cols, *br.seg, *br.dil) for br in branches])
    pad_k, pad_v = pad_kv if pad_kv is not None else (None, None)
    op = _fwd_twin if triton_op_wanted(q) else _fwd_op
    return op(q, k, v, geometry, rel_pos_h, rel_pos_w, pad_k, pad_v, float(scale))


def _reference_run(q, k, v, branches, grid, rel_pos_h, rel_pos_w, scale, pad_kv):
    return dilated_attention_reference(q, k, v, branches, grid, rel_pos_h, rel_pos_w, scale, pad_kv)


def _cpu_supports(q, *args, explicit, **kwargs):
    if q.device.type != "cpu":
        return Refusal(f"the CPU backend needs CPU tensors, got {q.device}", wrong_device=True)
    return None


_TABLE = (
    Backend("triton", _triton_supports, _triton_run),
    Backend("cpu", _cpu_supports, cpu_dilated_attention),
    Backend("reference", lambda *a, explicit, **kw: None, _reference_run),
)


# ------------------------------------------------------------------------------------------------
# Validation and the public function
# ------------------------------------------------------------------------------------------------


def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, N, H, D), got a {t.dim()}-d tensor of shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.numel() == 0:
            raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k and v must have the same shape, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must have the same dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on the same device, got q {q.device}, k {k.device}, v {v.device}")


def needed_rel_rows(br: ResolvedBranch, grid, padded: bool) -> Tuple[int, int]:
    """Smallest odd table lengths covering every coordinate offset the branch produces."""
    if br.is_2d:
        sh, sw = br.seg if padded else (min(br.seg[0], br.rows), min(br.seg[1], br.cols))
        return 2 * sh - 1, 2 * sw - 1
    w = br.seg[1]
    wg = grid[1]
    dy = min(grid[0] - 1, (w - 1 + wg - 1) // wg)
    dx = min(wg - 1, w - 1)
    return 2 * dy + 1, 2 * dx + 1


def _check_rel_pos(rel_pos_h, rel_pos_w, q, grid, branches, padded):
    if rel_pos_h is None and rel_pos_w is None:
        return
    if rel_pos_h is None or rel_pos_w is None:
        raise ValueError("rel_pos_h and rel_pos_w must be given together (got only "
                         f"{'rel_pos_h' if rel_pos_w is None else 'rel_pos_w'})")
    if grid is None:
        raise ValueError("the rel-pos bias needs grid=(Hg, Wg): rel_pos_h/rel_pos_w given without grid")
    D = q.shape[-1]
    for name, t in (("rel_pos_h", rel_pos_h), ("rel_pos_w", rel_pos_w)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dim() != 2 or t.shape[1] != D:
            raise ValueError(f"{name} must have shape (L, D={D}), got {tuple(t.shape)}")
        if t.shape[0] % 2 != 1:
            raise ValueError(f"{name} must have an odd number of rows L, got L={t.shape[0]}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    for i, br in enumerate(branches):
        need_h, need_w = needed_rel_rows(br, grid, padded)
        for name, t, need in (("rel_pos_h", rel_pos_h, need_h), ("rel_pos_w", rel_pos_w, need_w)):
            if t.shape[0] < need:
                raise ValueError(
                    f"{name} has L={t.shape[0]} rows but branch {i} produces offsets needing {need} rows; "
                    f"resize it first (sam_fast.resize_rel_pos, as segment_anything's get_rel_pos does)")


def _check_pad_kv(pad_kv, q, branches):
    if pad_kv is None:
        return None
    if not isinstance(pad_kv, (tuple, list)) or len(pad_kv) != 2:
        raise TypeError(f"pad_kv must be a pair (k_pad, v_pad) of (H, D) tensors, got {type(pad_kv).__name__}")
    H, D = q.shape[2], q.shape[3]
    for name, t in zip(("pad_kv[0]", "pad_kv[1]"), pad_kv):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != (H, D):
            raise ValueError(f"{name} must have shape (H, D) = ({H}, {D}), got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if len(branches) != 1 or not branches[0].is_2d:
        raise ValueError(f"pad_kv completes the partial segments of one 2-D branch (SAM's window padding); "
                         f"the pattern has {len(branches)} branch(es)"
                         + ("" if branches[0].is_2d else ", 1-D"))
    return tuple(pad_kv)


def dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern=None,
    *,
    grid: Optional[Tuple[int, int]] = None,
    rel_pos_h: Optional[Tensor] = None,
    rel_pos_w: Optional[Tensor] = None,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    backend: str = "auto",
    pad_kv: Optional[Tuple[Tensor, Tensor]] = None,
):
    """Flash attention over a dilated pattern, with optional SAM decomposed rel-pos bias.

    Args:
        q, k, v: (B, N, H, D), same dtype and device, last dim contiguous (other strides free).
        pattern: None (dense attention), a :class:`sam_fast.Branch` or a list of them; see
            :mod:`sam_fast.pattern` for the semantics and pictures.
        grid: (Hg, Wg) with Hg * Wg = N when tokens form an image grid (row-major); needed by 2-D
            branches and by the rel-pos bias.
        rel_pos_h, rel_pos_w: (L_h, D), (L_w, D) tables, odd L, indexed by absolute grid offsets
            ``y_p - y_p' + (L - 1) / 2`` and dotted with the unscaled query, as in segment_anything.
        softmax_scale: defaults to D ** -0.5.
        return_lse: also return the log-sum-exp (B, H, N), float32, natural log (-inf where a position
            is kept by no branch).
        backend: "auto" | "triton" | "cuda" | "cpu" | "reference".
        pad_kv: (k_pad, v_pad), each (H, D): complete partial 2-D segments with virtual keys carrying
            these vectors (segment_anything's window padding: zero tokens whose k, v are the qkv bias).

    Returns:
        out (B, N, H, D) in q's dtype, or (out, lse) with ``return_lse=True``.
    """
    _check_qkv(q, k, v)
    B, N, H, D = q.shape
    grid = check_grid(grid, N)
    branches = resolve_pattern(pattern, N, grid)
    padded = _check_pad_kv(pad_kv, q, branches) is not None
    _check_rel_pos(rel_pos_h, rel_pos_w, q, grid, branches, padded)
    if softmax_scale is None:
        scale = D ** -0.5
    else:
        if (not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool)
                or not math.isfinite(softmax_scale)):
            raise ValueError(f"softmax_scale must be a finite number or None, got {softmax_scale!r}")
        scale = float(softmax_scale)
    out, lse = dispatch("dilated_attention", _TABLE, backend, q, k, v, branches, grid, rel_pos_h, rel_pos_w,
                        scale, tuple(pad_kv) if pad_kv is not None else None)
    return (out, lse) if return_lse else out


def dilated_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths,
    dilation_rates,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    *,
    backend: str = "auto",
):
    """``flash_attn_func``-style dilated attention for code written against LongNet.

    ``segment_lengths`` and ``dilation_rates`` are ints or equal-length sequences of ints; branch i is
    ``Branch(segment_lengths[i], dilation_rates[i])`` over the token sequence, and the branches are
    combined exactly (softmax of their log-sum-exps). Same as
    ``dilated_attention(q, k, v, [Branch(w, r) ...], softmax_scale=..., return_lse=...)``.

    Args:
        q, k, v: (B, N, H, D).
        segment_lengths, dilation_rates: int or sequence of int.
        softmax_scale: defaults to D ** -0.5.
        return_lse: also return the combined lse (B, H, N), float32.
        backend: as for :func:`dilated_attention`.
    """
    from ..pattern import pattern_from_lists

    def as_list(x, name):
        if isinstance(x, numbers.Integral):
            return [x]
        if isinstance(x, (list, tuple)):
            return list(x)
        raise TypeError(f"{name} must be an int or a list of ints, got {type(x).__name__}")

    segs, dils = as_list(segment_lengths, "segment_lengths"), as_list(dilation_rates, "dilation_rates")
    pattern = pattern_from_lists(segs, dils)
    return dilated_attention(q, k, v, pattern, softmax_scale=softmax_scale, return_lse=return_lse, backend=backend)
