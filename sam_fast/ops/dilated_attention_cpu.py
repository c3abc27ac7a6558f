"""The CPU backend of ``sam_fast.dilated_attention``.

The reference (:mod:`sam_fast.reference.dilated_attention`) walks the pattern one branch, offset group and
segment at a time in Python: clear, but a SAM window block (hundreds of 14 x 14 windows) becomes hundreds
of small matmuls, and a LongNet mix over 4096 tokens dozens. Here each branch runs as one batched
attention over all its segments and heads at once:

* the token grid is padded to whole segments, and each segment to a multiple of the dilation, so that
  a segment reshapes to ``(sh / dy, dy, sw / dx, dx)``; head ``h`` reads index ``(oy, ox)`` of the two
  dilation axes (its offsets), which is exactly the positions it keeps - one gather for all heads;
* padded queries are dropped, padded keys are masked out (or with ``pad_kv`` those inside a segment
  but past the grid carry the virtual keys segment_anything's window padding creates);
* the decomposed rel-pos bias is added per segment with the dilated coordinate differences, as
  segment_anything's ``Attention`` adds it;
* the results are scattered back (positions a head keeps in no segment: output 0, lse -inf) and
  several branches are mixed by :func:`~sam_fast.reference.dilated_attention.merge_branches`.

When autograd records nothing (inference), the segments go through PyTorch's fused CPU flash-attention
kernel with the bias and key mask as its mask (it returns the lse too; about 2x segment_anything's
attention at SAM's 4096 tokens); otherwise plain PyTorch ops in the inputs' dtype, which autograd
differentiates, as the reference does (lse in float32 / float64). A 1-D branch with a rel-pos bias
(coordinates wrap at grid rows, so its segments are not grid rectangles) runs the reference's loop.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..pattern import ResolvedBranch
from ..reference.dilated_attention import branch_attention as reference_branch
from ..reference.dilated_attention import merge_branches


def batches_segments(branches, rel_pos_h) -> bool:
    """Whether every branch runs batched here (a 1-D branch with rel-pos runs the reference's loop)."""
    return all(_batched(br, rel_pos_h) for br in branches)


def _batched(br: ResolvedBranch, rel_pos_h) -> bool:
    return rel_pos_h is None or br.is_2d


def _rel_table(table: torch.Tensor, size: int, step: int, dtype) -> torch.Tensor:
    """(size, size, D): ``table[(i - j) * step + center]`` for dilated in-segment indices i (query), j (key)."""
    pos = torch.arange(size, device=table.device) * step
    center = (table.shape[0] - 1) // 2
    return table.to(dtype)[pos[:, None] - pos[None, :] + center]


class _Layout:
    """How one branch cuts the (rows, cols) grid: segments (sh, sw) - clipped to the grid unless the
    segment's missing positions are virtual keys (``full``) - each padded to ``(ay * dy, ax * dx)``."""

    def __init__(self, br: ResolvedBranch, full: bool, H: int, device):
        self.br, self.H = br, H
        (sh, sw), (self.dy, self.dx) = br.seg, br.dil
        if not full:
            sh, sw = min(sh, br.rows), min(sw, br.cols)
        self.sh, self.sw = sh, sw
        self.ns_y, self.ns_x = -(-br.rows // sh), -(-br.cols // sw)
        self.ay, self.ax = -(-sh // self.dy), -(-sw // self.dx)
        offsets = [br.offsets(h) for h in range(H)]  # the pattern's per-head offsets (oy, ox)
        self.heads = torch.arange(H, device=device)
        self.oy, self.ox = torch.tensor(offsets, dtype=torch.int64, device=device).unbind(1)
        self.dilated = (self.dy, self.dx) != (1, 1)
        # per head and segment, whether each dilated index is a query (a real token of the segment)
        # and whether it is a key (real, or virtual with full)
        qy, ky = self._axis(self.oy, self.dy, self.ay, self.ns_y, sh, br.rows, full)
        qx, kx = self._axis(self.ox, self.dx, self.ax, self.ns_x, sw, br.cols, full)
        shape = (self.ns_y * self.ns_x, H, self.ay * self.ax)
        self.is_query = (qy[:, None, :, :, None] & qx[None, :, :, None, :]).reshape(shape)
        self.is_key = (ky[:, None, :, :, None] & kx[None, :, :, None, :]).reshape(shape)
        # whether no key is missing, from the geometry alone (no data-dependent branch under torch.compile):
        # the furthest index any head reads along an axis must lie in its segment (and, without virtual
        # keys, in the grid's last segment)
        ly, lx = br.rows - (self.ns_y - 1) * sh, br.cols - (self.ns_x - 1) * sw
        far_y = max(oy for oy, _ in offsets) + (self.ay - 1) * self.dy
        far_x = max(ox for _, ox in offsets) + (self.ax - 1) * self.dx
        self.all_keys = far_y < (sh if full else min(sh, ly)) and far_x < (sw if full else min(sw, lx))
        self.pad_y, self.pad_x = self.ns_y * sh - br.rows, self.ns_x * sw - br.cols

    @staticmethod
    def _axis(offset, step, count, n_seg, seg, length, full):
        """(n_seg, H, count) query / key validity of in-segment index ``offset + i * step`` per head."""
        c = offset[None, :, None] + torch.arange(count, device=offset.device)[None, None, :] * step
        start = torch.arange(n_seg, device=offset.device)[:, None, None] * seg
        inside = c < seg
        real = inside & (start + c < length)
        return real, (inside.expand_as(real) if full else real)

    def gather(self, t: torch.Tensor, fill: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, N, H, D) -> (B * n_segments, H, ay * ax, D): each head's kept positions of each segment;
        positions outside the grid are zeros, or ``fill`` (H, D) where given."""
        B, _, H, D = t.shape
        g = t.reshape(B, self.br.rows, self.br.cols, H, D)
        if self.pad_y or self.pad_x:
            g = F.pad(g, (0, 0, 0, 0, 0, self.pad_x, 0, self.pad_y))
            if fill is not None:
                real = torch.zeros(g.shape[1:3], dtype=torch.bool, device=t.device)
                real[: self.br.rows, : self.br.cols] = True
                g = torch.where(real[None, :, :, None, None], g, fill.to(t.dtype)[None, None, None])
        g = g.reshape(B, self.ns_y, self.sh, self.ns_x, self.sw, H, D)
        # a segment that is not a multiple of the dilation is padded inside (never a key or a query)
        in_y, in_x = self.ay * self.dy - self.sh, self.ax * self.dx - self.sw
        if in_y or in_x:
            g = F.pad(g, (0, 0, 0, 0, 0, in_x, 0, 0, 0, in_y))
        g = g.reshape(B, self.ns_y, self.ay, self.dy, self.ns_x, self.ax, self.dx, H, D)
        if self.dilated:
            g = g.permute(0, 1, 2, 4, 5, 3, 6, 7, 8)[..., self.oy, self.ox, self.heads, :]
        else:
            g = g[:, :, :, 0, :, :, 0]
        # (B, ns_y, ay, ns_x, ax, H, D) -> (B * S, H, ay * ax, D)
        g = g.permute(0, 1, 3, 5, 2, 4, 6)
        return g.reshape(B * self.ns_y * self.ns_x, H, self.ay * self.ax, D)

    def scatter(self, t: torch.Tensor, B: int, fill: float) -> torch.Tensor:
        """(B * S, H, ay * ax, E) -> (B, N, H, E); positions a head does not keep get ``fill``."""
        H, E = self.H, t.shape[-1]
        t = t.reshape(B, self.ns_y, self.ns_x, H, self.ay, self.ax, E).permute(0, 1, 4, 2, 5, 3, 6)
        if self.dilated:
            full = t.new_full((B, self.ns_y, self.ay, self.ns_x, self.ax, self.dy, self.dx, H, E), fill)
            full[..., self.oy, self.ox, self.heads, :] = t
            t = full.permute(0, 1, 2, 5, 3, 4, 6, 7, 8)
        t = t.reshape(B, self.ns_y, self.ay * self.dy, self.ns_x, self.ax * self.dx, H, E)
        t = t[:, :, : self.sh, :, : self.sw].reshape(B, self.ns_y * self.sh, self.ns_x * self.sw, H, E)
        return t[:, : self.br.rows, : self.br.cols].reshape(B, self.br.rows * self.br.cols, H, E)


def _fused_ok(*tensors) -> bool:
    """Whether PyTorch's fused CPU attention may run: it takes no gradient through its mask (the rel-pos
    bias depends on q and the tables), so only when autograd records nothing here."""
    if not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def segment_batched_attention(q, k, v, br: ResolvedBranch, rel_pos_h, rel_pos_w, scale: float,
                              pad_kv: Optional[Tuple[torch.Tensor, torch.Tensor]]):
    """One branch over all its segments and heads at once; q, k, v (B, N, H, D). Returns
    ``(out (B, N, H, D), lse (B, N, H))``; lse -inf (and out 0) where the head keeps no position."""
    B, N, H, D = q.shape
    lay = _Layout(br, pad_kv is not None, H, q.device)
    pk, pv = pad_kv if pad_kv is not None else (None, None)
    qs, ks, vs = lay.gather(q), lay.gather(k, pk), lay.gather(v, pv)  # (B * S, H, L, D)
    S, L = qs.shape[0], qs.shape[2]
    lse_dtype = torch.promote_types(q.dtype, torch.float32)
    fused = _fused_ok(q, k, v, rel_pos_h, rel_pos_w, *(pad_kv or ()))
    rel = None
    if rel_pos_h is not None:
        # The fused kernel adds its mask to float32 logits: a float32 bias saves it the roundings of a
        # half-precision one (three of them, as many as the reference's, which the tests measure against)
        bias_dtype = lse_dtype if fused else q.dtype
        q5 = qs.reshape(S, H, lay.ay, lay.ax, D).to(bias_dtype)
        rel_h = torch.einsum("shyxd,ykd->shyxk", q5, _rel_table(rel_pos_h, lay.ay, lay.dy, bias_dtype))
        rel_w = torch.einsum("shyxd,xkd->shyxk", q5, _rel_table(rel_pos_w, lay.ax, lay.dx, bias_dtype))
        rel = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(S, H, L, L)
    n_seg = lay.ns_y * lay.ns_x
    if fused:
        # Inference: one fused CPU kernel (blocked online softmax, lse returned), the bias as its mask.
        # Rows of padded queries may see no key (NaN there); they are dropped by the scatter.
        mask = rel
        if not lay.all_keys:
            neg = torch.zeros(lay.is_key.shape, dtype=q.dtype if rel is None else rel.dtype, device=q.device)
            neg.masked_fill_(~lay.is_key, float("-inf"))
            neg = neg[:, :, None, :].repeat(B, 1, 1, 1)  # (B * S, H, 1, L)
            mask = neg.expand(S, H, L, L) if mask is None else mask + neg
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qs, ks, vs, attn_mask=mask,
                                                                              scale=scale)[:2]
        lse = lse.to(lse_dtype)
    else:
        logits = torch.matmul(qs * scale, ks.transpose(-1, -2))  # (B * S, H, L, L)
        if rel is not None:
            logits = logits + rel
        if not lay.all_keys:
            # only real queries' rows: a padded query's row keeps its keys, so that no row is all -inf
            # (its softmax would be NaN, and NaN times a zero gradient is still NaN)
            hide = (~lay.is_key)[:, :, None, :] & lay.is_query[:, :, :, None]
            logits = logits.view(B, n_seg, H, L, L).masked_fill(hide, float("-inf")).view_as(logits)
        lse = torch.logsumexp(logits.to(lse_dtype), dim=-1)
        out = torch.matmul(logits.softmax(dim=-1), vs)
    # every padded query lies past its segment or the grid, where the scatter crops it away
    return lay.scatter(out, B, 0.0), lay.scatter(lse[..., None], B, float("-inf"))[..., 0]


def cpu_dilated_attention(q, k, v, branches, grid, rel_pos_h, rel_pos_w, scale, pad_kv):
    """The CPU backend: every branch batched over its segments (the reference's loop for a 1-D branch
    with rel-pos), then the branches mixed exactly by their lse. Returns out (B, N, H, D), lse (B, H, N)."""
    outs, lses = [], []
    for br in branches:
        if _batched(br, rel_pos_h):
            out, lse = segment_batched_attention(q, k, v, br, rel_pos_h, rel_pos_w, scale, pad_kv)
        else:
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            out, lse = reference_branch(qt, kt, vt, br, grid, rel_pos_h, rel_pos_w, scale, pad_kv)
            out, lse = out.transpose(1, 2), lse.transpose(1, 2)
        outs.append(out)
        lses.append(lse)
    out, lse = merge_branches(outs, lses)
    return out, lse.transpose(1, 2)
