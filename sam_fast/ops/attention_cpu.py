"""The CPU backend of ``sam_fast.dilated_attention``.

The reference (:mod:`sam_fast.reference.attention`) walks the pattern one segment and offset group at a
time in Python: clear, but a SAM window block (hundreds of 14 x 14 windows) becomes hundreds of small
matmuls. Here a single branch without dilation - SAM's windows (with or without the zero-token
padding of partial windows), its dense global attention, 1-D segments - runs as one batched matmul over
all segments: the token grid is padded to whole segments (padded queries are dropped; padded keys are
masked out, or with ``pad_kv`` carry the virtual keys segment_anything's padding creates) and the
decomposed rel-pos bias is added per segment, as segment_anything's ``Attention`` does. When autograd
records nothing (inference), the segments go through PyTorch's fused CPU flash-attention kernel with
the bias as its mask (it returns the lse too; about 2x segment_anything's attention at SAM's 4096
tokens); otherwise plain PyTorch ops in the inputs' dtype, which autograd differentiates, as the
reference does (lse in float32 / float64). Dilated and multi-branch patterns run the reference's loop.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..pattern import ResolvedBranch
from ..reference.attention import dilated_attention_reference


def batches_segments(branches, rel_pos_h) -> bool:
    """Whether the pattern runs batched here: one branch, no dilation, rel-pos only on a 2-D branch."""
    if len(branches) != 1:
        return False
    br = branches[0]
    return br.dil == (1, 1) and (rel_pos_h is None or br.is_2d)


def _rel_table(table: torch.Tensor, size: int, dtype) -> torch.Tensor:
    """(size, size, D): ``table[i - j + center]`` for in-segment coordinates i (query), j (key)."""
    pos = torch.arange(size, device=table.device)
    center = (table.shape[0] - 1) // 2
    return table.to(dtype)[pos[:, None] - pos[None, :] + center]


def _segments(t: torch.Tensor, br: ResolvedBranch, full: bool, fill: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, N, H, D) on the (rows, cols) grid -> (B * n_segments, H, sh, sw, D), the grid padded to whole
    segments with zeros or with ``fill`` (H, D) vectors. ``full=False`` first clips a segment larger
    than the grid to the grid (without virtual keys the missing positions do not exist)."""
    B, _, H, D = t.shape
    (sh, sw), (ns_y, ns_x) = br.seg, br.n_seg
    if not full:
        sh, sw = min(sh, br.rows), min(sw, br.cols)
    g = t.reshape(B, br.rows, br.cols, H, D)
    pad_y, pad_x = ns_y * sh - br.rows, ns_x * sw - br.cols
    if pad_y or pad_x:
        g = F.pad(g, (0, 0, 0, 0, 0, pad_x, 0, pad_y))
        if fill is not None:
            real = torch.zeros(br.rows + pad_y, br.cols + pad_x, dtype=torch.bool, device=t.device)
            real[: br.rows, : br.cols] = True
            g = torch.where(real[None, :, :, None, None], g, fill.to(t.dtype)[None, None, None])
    g = g.reshape(B, ns_y, sh, ns_x, sw, H, D).permute(0, 1, 3, 5, 2, 4, 6)
    return g.reshape(B * ns_y * ns_x, H, sh, sw, D)


def _fused_ok(*tensors) -> bool:
    """Whether PyTorch's fused CPU attention may run: it takes no gradient through its mask (the rel-pos
    bias depends on q and the tables), so only when autograd records nothing here."""
    if not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def segment_batched_attention(q, k, v, br: ResolvedBranch, rel_pos_h, rel_pos_w, scale: float,
                              pad_kv: Optional[Tuple[torch.Tensor, torch.Tensor]]):
    """One undilated branch over all its segments at once; q, k, v (B, N, H, D). Returns
    ``(out (B, N, H, D), lse (B, H, N))`` like :func:`dilated_attention_reference`."""
    B, N, H, D = q.shape
    full = pad_kv is not None
    pk, pv = pad_kv if full else (None, None)
    qs = _segments(q, br, full)  # padded queries are dropped: zeros will do
    ks, vs = _segments(k, br, full, pk), _segments(v, br, full, pv)
    S, sh, sw = qs.shape[0], qs.shape[2], qs.shape[3]
    (ns_y, ns_x) = br.n_seg
    L = sh * sw
    qf, kf, vf = (t.reshape(S, H, L, D) for t in (qs, ks, vs))
    rel = None
    if rel_pos_h is not None:
        rel_h = torch.einsum("shyxd,ykd->shyxk", qs, _rel_table(rel_pos_h, sh, q.dtype))
        rel_w = torch.einsum("shyxd,xkd->shyxk", qs, _rel_table(rel_pos_w, sw, q.dtype))
        rel = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(S, H, L, L)
    pad_y, pad_x = ns_y * sh - br.rows, ns_x * sw - br.cols
    missing = None
    if (pad_y or pad_x) and pad_kv is None:  # keys past the grid do not exist
        real = torch.zeros(br.rows + pad_y, br.cols + pad_x, dtype=torch.bool, device=q.device)
        real[: br.rows, : br.cols] = True
        missing = ~real.reshape(ns_y, sh, ns_x, sw).permute(0, 2, 1, 3).reshape(ns_y * ns_x, 1, 1, L)
    lse_dtype = torch.promote_types(q.dtype, torch.float32)
    if _fused_ok(q, k, v, rel_pos_h, rel_pos_w, *(pad_kv or ())):
        # Inference: one fused CPU kernel (blocked online softmax, lse returned), the bias as its mask.
        mask = rel
        if missing is not None:
            neg = torch.zeros(missing.shape, dtype=q.dtype, device=q.device).masked_fill_(missing, float("-inf"))
            neg = neg.repeat(B, 1, 1, 1)
            mask = neg.expand(S, H, L, L) if mask is None else mask + neg
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qf, kf, vf, attn_mask=mask,
                                                                              scale=scale)[:2]
        lse = lse.to(lse_dtype)
    else:
        logits = torch.matmul(qf * scale, kf.transpose(-1, -2))  # (S, H, L, L)
        if rel is not None:
            logits = logits + rel
        if missing is not None:
            logits = logits.view(B, ns_y * ns_x, H, L, L).masked_fill(missing, float("-inf")).view_as(logits)
        lse = torch.logsumexp(logits.to(lse_dtype), dim=-1)
        out = torch.matmul(logits.softmax(dim=-1), vf)

    def unsegment(t):  # (S, H, sh*sw, E) -> (B, N, H, E), padded positions dropped
        E = t.shape[-1]
        t = t.reshape(B, ns_y, ns_x, H, sh, sw, E).permute(0, 1, 4, 2, 5, 3, 6)
        return t.reshape(B, ns_y * sh, ns_x * sw, H, E)[:, : br.rows, : br.cols].reshape(B, N, H, E)

    return unsegment(out), unsegment(lse[..., None])[..., 0].transpose(1, 2)


def cpu_dilated_attention(q, k, v, branches, grid, rel_pos_h, rel_pos_w, scale, pad_kv):
    """The CPU backend: batched segments where :func:`batches_segments`, the reference's loop otherwise."""
    if batches_segments(branches, rel_pos_h):
        return segment_batched_attention(q, k, v, branches[0], rel_pos_h, rel_pos_w, scale, pad_kv)
    return dilated_attention_reference(q, k, v, branches, grid, rel_pos_h, rel_pos_w, scale, pad_kv)
