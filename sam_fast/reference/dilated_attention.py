"""Plain-PyTorch dilated attention: the CPU backend, the test oracle and the benchmark baseline.

Implements the contract in docs/maintainers/design.md ("Dilated flash attention") literally, one branch, offset
group and segment at a
time (see :mod:`sam_fast.pattern` for the pattern semantics). It computes in the inputs' dtype the way
segment_anything's ``Attention`` does (``(q * scale) @ k^T``, decomposed rel-pos bias, softmax, ``@ v``),
so in bfloat16 it is also "PyTorch at the same precision" for the tolerance rule; fed float32 or float64
it is the exact oracle. Autograd flows through everything, the branch weights and tables included.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..pattern import ResolvedBranch


def _axis_positions(start: int, stop_real: int, stop_full: int, offset: int, step: int, padded: bool):
    """Kept coordinates of one segment along one axis: (coords, is_real)."""
    stop = stop_full if padded else stop_real
    coords = torch.arange(start + offset, max(stop, start + offset), step)  # empty if the offset is past the end
    return coords, coords < stop_real


def _segment_tokens(br: ResolvedBranch, sy: int, sx: int, oy: int, ox: int, padded: bool):
    """Row-major kept positions of segment (sy, sx) for offsets (oy, ox) on the addressing grid.

    Returns (ys, xs, real): flattened addressing coordinates and whether each position is a real token
    (False only for SAM window padding, where ``padded`` extends partial segments to full size).
    """
    sh, sw = br.seg
    dy, dx = br.dil
    y0, x0 = sy * sh, sx * sw
    ys, ry = _axis_positions(y0, min(y0 + sh, br.rows), y0 + sh, oy, dy, padded)
    xs, rx = _axis_positions(x0, min(x0 + sw, br.cols), x0 + sw, ox, dx, padded)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    real = (ry[:, None] & rx[None, :]).reshape(-1)
    return yy.reshape(-1), xx.reshape(-1), real


def _grid_coords(br: ResolvedBranch, ys, xs, grid: Optional[Tuple[int, int]]):
    """Image-grid coordinates (for the rel-pos bias) of addressing coordinates."""
    if br.is_2d or grid is None:
        return ys, xs
    n = ys * br.cols + xs
    return n // grid[1], n % grid[1]


def _rel_bias(q_sel, table, cq, ck):
    """q_p . table[c_p - c_p' + (L - 1) / 2] for every (query, key) pair, in q's dtype."""
    center = (table.shape[0] - 1) // 2
    proj = torch.matmul(q_sel, table.to(q_sel.dtype).t())  # (B, h, nq, L)
    idx = (cq[:, None] - ck[None, :] + center).to(q_sel.device)  # (nq, nk)
    idx = idx.expand(*proj.shape[:-2], *idx.shape)
    return torch.gather(proj, -1, idx)


def branch_attention(q, k, v, br: ResolvedBranch, grid, rel_pos_h, rel_pos_w, scale, pad_kv):
    """One branch: output (B, H, N, D) in q's dtype and lse (B, H, N) in float32 (-inf where not kept)."""
    B, H, N, D = q.shape
    out = q.new_zeros(B, H, N, D)
    lse_dtype = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for an fp64 oracle
    lse = q.new_full((B, H, N), float("-inf"), dtype=lse_dtype)
    padded = pad_kv is not None
    groups = {}
    for h in range(H):
        groups.setdefault(br.offsets(h), []).append(h)
    nsy, nsx = br.n_seg
    for (oy, ox), heads in groups.items():
        hs = torch.tensor(heads, device=q.device)
        for sy in range(nsy):
            for sx in range(nsx):
                qy, qx, _ = _segment_tokens(br, sy, sx, oy, ox, padded=False)
                if qy.numel() == 0:
                    continue
                ky, kx, kreal = _segment_tokens(br, sy, sx, oy, ox, padded=padded)
                q_tok = (qy * br.cols + qx).to(q.device)
                q_sel = q[:, hs][:, :, q_tok]  # (B, h, nq, D)
                if padded:
                    k_tok = (ky.clamp(max=br.rows - 1) * br.cols + kx.clamp(max=br.cols - 1)).to(q.device)
                    is_real = kreal.to(q.device)[None, None, :, None]
                    pk, pv = pad_kv
                    k_sel = torch.where(is_real, k[:, hs][:, :, k_tok], pk[hs][None, :, None, :].to(k.dtype))
                    v_sel = torch.where(is_real, v[:, hs][:, :, k_tok], pv[hs][None, :, None, :].to(v.dtype))
                else:
                    k_tok = (ky * br.cols + kx).to(q.device)
                    k_sel = k[:, hs][:, :, k_tok]
                    v_sel = v[:, hs][:, :, k_tok]
                logits = torch.matmul(q_sel * scale, k_sel.transpose(-1, -2))
                if rel_pos_h is not None:
                    gqy, gqx = _grid_coords(br, qy, qx, grid)
                    gky, gkx = _grid_coords(br, ky, kx, grid)
                    logits = logits + _rel_bias(q_sel, rel_pos_h, gqy, gky) + _rel_bias(q_sel, rel_pos_w, gqx, gkx)
                p = logits.softmax(dim=-1)
                o = torch.matmul(p, v_sel)
                out[:, hs[:, None], q_tok[None, :]] = o
                lse[:, hs[:, None], q_tok[None, :]] = torch.logsumexp(logits.to(lse_dtype), dim=-1)
    return out, lse


def dilated_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    branches: Sequence[ResolvedBranch],
    grid: Optional[Tuple[int, int]] = None,
    rel_pos_h: Optional[torch.Tensor] = None,
    rel_pos_w: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    pad_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dilated attention of (B, N, H, D) tensors; returns ``(out (B, N, H, D), lse (B, H, N))``;
    lse is float32 (float64 for float64 inputs, so the reference can serve as an fp64 oracle).

    ``branches`` come from :func:`sam_fast.pattern.resolve_pattern`. ``pad_kv=(k_pad, v_pad)``, each
    (H, D), makes every partial 2-D segment full size with the missing positions acting as keys with
    these vectors (segment_anything pads windows with zero tokens, whose keys and values are the qkv
    bias). Inputs are assumed validated by :func:`sam_fast.dilated_attention`.
    """
    D = q.shape[-1]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    outs, lses = zip(*(branch_attention(qt, kt, vt, br, grid, rel_pos_h, rel_pos_w, scale, pad_kv) for br in branches))
    out, lse = merge_branches(outs, lses)
    return out.transpose(1, 2), lse


def merge_branches(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Branch results -> the combined attention: outputs weighted by softmax over the branches of their
    lse, and the lse of the union. Any layout where each ``out`` is its ``lse`` with a trailing feature
    dim; a position no branch keeps (every lse -inf) gets output 0 and lse -inf."""
    if len(outs) == 1:
        return outs[0], lses[0]
    lse_all = torch.stack(lses)  # (nb, ...)
    m = lse_all.amax(dim=0)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse_all - m_safe)
    total = w.sum(dim=0)
    total_safe = torch.where(total == 0, torch.ones_like(total), total)
    w = w / total_safe
    out = sum(wi[..., None] * oi.to(w.dtype) for wi, oi in zip(w, outs)).to(outs[0].dtype)
    # total is NaN where a branch's lse is: lse stays NaN there (as out does), not -inf
    lse = torch.where(total == 0, torch.full_like(m, float("-inf")), m_safe + torch.log(total_safe))
    return out, lse
