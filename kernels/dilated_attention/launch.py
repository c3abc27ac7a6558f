"""The launchers (for the op layer): a whole pattern's forward and backward, one launch per branch group."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton

from .._arch import COMPILE_OPTIONS, launchable
from .._tl import precision as _precision
from .._tl import upcast as _upcast
from . import tuning as _tuning  # by module: the tuner spies on tuning.config_for
from .backward import _dilated_attention_bwd_dkdv_kernel, _dilated_attention_bwd_dq_kernel
from .forward import _dilated_attention_fwd_kernel
from .plan import Group, decode_pattern, plan_groups
from .relpos import _group_tables, _rel_rows, relpos_backward, relpos_backward_1d

LOG2E = 1.4426950408889634


def _branch_args(group: Group, rel_offsets=None) -> tuple:
    """The kernels' ``BRANCHES``: per branch of the group, (seg_h, seg_w, dil_h, dil_w, rel-pos table column
    offsets h, w)."""
    offs = rel_offsets or [(0, 0)] * len(group.branches)
    return tuple((b[2], b[3], b[4], b[5], offs[j][0], offs[j][1]) for j, b in enumerate(group.branches))


def dilated_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    geometry,
    rel_pos_h: Optional[torch.Tensor],
    rel_pos_w: Optional[torch.Tensor],
    pad_k: Optional[torch.Tensor],
    pad_v: Optional[torch.Tensor],
    scale: float,
    traceable: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward of a whole pattern (``geometry`` from :func:`encode_pattern`).
    Returns (out (B, N, H, D), lse (B, H, N) fp32, natural log). ``traceable``: launch through
    :func:`~sam_fast.kernels._arch.launchable` (the body of the op's ``triton_op`` form)."""
    B, N, H, D = q.shape
    tokens, branches = decode_pattern(geometry)
    groups = plan_groups(branches)
    padded = pad_k is not None
    has_rel = rel_pos_h is not None
    # Every position belongs to exactly one class tile of each group, so nothing needs zero-filling.
    # Several groups merge through the running (out, lse): out stays fp32 until the last one.
    out = torch.empty((B, N, H, D), dtype=q.dtype if len(groups) == 1 else torch.float32, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    pk = pad_k.contiguous() if padded else q.new_empty(1)
    pv = pad_v.contiguous() if padded else q.new_empty(1)
    for gi, group in enumerate(groups):
        cfg = _tuning.config_for(group, padded, has_rel, q, backward=False, rel_rows=_rel_rows(group, tokens))
        if has_rel:
            rh, rw, rel_offs, _ = _group_tables(q, group, tokens, rel_pos_h, rel_pos_w, padded)
        else:
            rh = rw = q.new_empty((1, 1, 1, 1))
            rel_offs = None
        qh, qw = group.class_extent(False)
        grid = (triton.cdiv(qh * qw, cfg["BLOCK_M"]), group.n_class_tiles(), B * H)
        launchable(_dilated_attention_fwd_kernel, traceable)[grid](
            q, k, v, out, lse, rh, rw, pk, pv,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1), rh.stride(0), rh.stride(1), rh.stride(2),
            rw.stride(0), rw.stride(1), rw.stride(2),
            H, D, group.rows, group.cols, group.base[0], group.base[1], group.step[0], group.step[1],
            group.n_seg[1], scale * LOG2E, _branch_args(group, rel_offs),
            NB=len(group.branches), BLOCK_M=cfg["BLOCK_M"], BKY=cfg["BKY"], BKX=cfg["BKX"],
            BLOCK_D=cfg["BLOCK_D"], BLOCK_DT=cfg["BLOCK_DT"], TAIL=cfg["TAIL"], HAS_REL=has_rel,
            REL_ROWS=cfg["REL_ROWS"], SINGLE_KX=cfg["SINGLE_KX"], PADDED=padded,
            PREC=_precision(q.dtype), UPCAST=_upcast(q.dtype), ACCUMULATE=gi > 0,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **COMPILE_OPTIONS,
        )
    return out.to(q.dtype), lse


def dilated_attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: Optional[torch.Tensor],
    geometry,
    rel_pos_h: Optional[torch.Tensor],
    rel_pos_w: Optional[torch.Tensor],
    pad_k: Optional[torch.Tensor],
    pad_v: Optional[torch.Tensor],
    scale: float,
):
    """Backward of a whole pattern. Returns (dq, dk, dv, d_rel_pos_h, d_rel_pos_w, dpad_k, dpad_v), the
    last four None when the corresponding input is absent.

    The merged attention is one softmax over the union of the branches' key sets, with the combined lse
    as normaliser; so each branch's backward is the flash backward with that lse and
    ``delta = rowsum(dO * O) - dlse``, and the gradient through the merge weights needs no extra term.
    """
    B, N, H, D = q.shape
    tokens, branches = decode_pattern(geometry)
    groups = plan_groups(branches)
    padded = pad_k is not None
    has_rel = rel_pos_h is not None
    if dout.stride(-1) != 1:  # autograd may hand in expanded (stride-0) gradients
        dout = dout.contiguous()
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    if dlse is not None:
        delta = delta - torch.where(torch.isfinite(lse), dlse.float(), torch.zeros_like(delta))
    multi = len(groups) > 1
    # Several groups (or the bias's second dq term) accumulate: keep fp32 until the end.
    dq = torch.empty(q.shape, dtype=torch.float32 if (has_rel or multi) else q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=torch.float32 if multi else k.dtype, device=q.device)
    dv = torch.empty(v.shape, dtype=torch.float32 if multi else v.dtype, device=q.device)
    if padded:
        # pad_kv patterns are a single 2-D branch (validated by sam_fast.dilated_attention).
        geom = groups[0].branches[0]
        pr, pc = geom.padded_grid()
        npad = pr * pc - geom.rows * geom.cols
        dpk = torch.zeros((B, H, max(npad, 1), D), dtype=torch.float32, device=q.device)
        dpv = torch.zeros_like(dpk)
        pk, pv = pad_k.contiguous(), pad_v.contiguous()
    else:
        pr = pc = 0
        dpk = dpv = torch.zeros((1, 1, 1, 1), dtype=torch.float32, device=q.device)
        pk = pv = q.new_empty(1)
    drel_h = drel_w = None
    for gi, group in enumerate(groups):
        cfg = _tuning.config_for(group, padded, has_rel, q, backward=True, rel_rows=_rel_rows(group, tokens))
        if has_rel:
            rh, rw, rel_offs, tables = _group_tables(q, group, tokens, rel_pos_h, rel_pos_w, padded)
            drh = torch.zeros(rh.shape, dtype=torch.float32, device=q.device)
            drw = torch.zeros(rw.shape, dtype=torch.float32, device=q.device)
        else:
            rh = rw = drh = drw = q.new_empty((1, 1, 1, 1))
            rel_offs = None
        common = dict(NB=len(group.branches), BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"],
                      BLOCK_DT=cfg["BLOCK_DT"], TAIL=cfg["TAIL"], HAS_REL=has_rel,
                      REL_ROWS=cfg["REL_ROWS"], PADDED=padded, PREC=_precision(q.dtype), UPCAST=_upcast(q.dtype),
                      ACCUMULATE=gi > 0,
                      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **COMPILE_OPTIONS)
        bargs = _branch_args(group, rel_offs)
        geo = (H, D, group.rows, group.cols, group.base[0], group.base[1], group.step[0], group.step[1],
               group.n_seg[1])
        ch, cw = group.class_extent(padded)
        n_kblocks = triton.cdiv(ch, cfg["KBY"]) * triton.cdiv(cw, cfg["KBX"])
        _dilated_attention_bwd_dkdv_kernel[(n_kblocks, group.n_class_tiles(), B * H)](
            q, k, v, dout, lse, delta, rh, rw, pk, pv, dk, dv, dpk, dpv,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            lse.stride(0), lse.stride(1), rh.stride(0), rh.stride(1), rh.stride(2),
            rw.stride(0), rw.stride(1), rw.stride(2), dpk.stride(0), dpk.stride(1), dpk.stride(2),
            *geo, pr, pc, scale * LOG2E, scale, bargs, BKY=cfg["KBY"], BKX=cfg["KBX"], **common,
        )
        qh, qw = group.class_extent(False)
        _dilated_attention_bwd_dq_kernel[(triton.cdiv(qh * qw, cfg["BLOCK_M"]), group.n_class_tiles(), B * H)](
            q, k, v, dout, lse, delta, rh, rw, pk, pv, dq, drh, drw,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            lse.stride(0), lse.stride(1), rh.stride(0), rh.stride(1), rh.stride(2),
            rw.stride(0), rw.stride(1), rw.stride(2),
            *geo, scale * LOG2E, scale, bargs, BKY=cfg["BKY"], BKX=cfg["BKX"], **common,
        )
        if has_rel:
            ends = [o[1] for o in rel_offs[1:]] + [rw.shape[-1]]
            for j, tabs in enumerate(tables):
                (oh, ow) = rel_offs[j]
                if tabs is None:  # a 1-D branch's per-key table
                    dq_rel, dth, dtw = relpos_backward_1d(q, drw[..., ow:ends[j]], group.branches[j], tokens,
                                                          rel_pos_h, rel_pos_w)
                else:
                    kh_p, kw_p = tabs[0].shape[2], tabs[2].shape[2]
                    dq_rel, dth, dtw = relpos_backward(q, drh[..., oh:oh + kh_p], drw[..., ow:ow + kw_p], tabs,
                                                       rel_pos_h, rel_pos_w)
                dq += dq_rel
                drel_h = dth if drel_h is None else drel_h + dth
                drel_w = dtw if drel_w is None else drel_w + dtw
    dpad_k = dpad_v = None
    if has_rel:
        drel_h, drel_w = drel_h.to(rel_pos_h.dtype), drel_w.to(rel_pos_w.dtype)
    if padded:
        dpad_k = dpk.sum(dim=(0, 2)).to(pad_k.dtype)
        dpad_v = dpv.sum(dim=(0, 2)).to(pad_v.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), drel_h, drel_w, dpad_k, dpad_v
