"""SAM's decomposed rel-pos bias in kernel form (for the op layer and the kernel author): the per-query row /
column tables a 2-D branch's key blocks slice, the per-key tables of 1-D branches over a 2-D grid, and the
backward of both."""

from __future__ import annotations

import functools
from typing import Tuple

import torch

from .._cache import persistent
from .plan import Geometry, Group, _pow2


@functools.lru_cache(maxsize=64)
def _rel_index(n_coord: int, seg: int, dil: int, kept: int, offsets: Tuple[int, ...], center: int, length: int,
               device: torch.device) -> torch.Tensor:
    """idx[h, c, u] = c - (segment origin of c + offsets[h] + u * dil) + center, clamped to the table's
    ``length`` rows, on ``device``. Cached: forward and backward of every call reuse it, no H2D copy."""
    with persistent():
        c = torch.arange(n_coord)
        origin = (c // seg) * seg
        u = torch.arange(kept)
        offs = torch.tensor(offsets)
        idx = c[None, :, None] - (origin[None, :, None] + offs[:, None, None] + u[None, None, :] * dil) + center
        return idx.clamp(0, length - 1).to(device)


def relpos_tables(q: torch.Tensor, geom: Geometry, rel_pos_h, rel_pos_w, padded: bool):
    """Per-query projections of the rel-pos tables onto every kept key row / column of its segment.

    Returns ``rh`` (B, H, N, KHP), ``rw`` (B, H, N, KWP) in q's dtype (fp32 accumulate), and the
    gathered tables ``(gh (H, rows, KHP, D), idx_h, gw, idx_w)`` the backward needs.
    """
    B, N, H, D = q.shape
    rows, cols = geom.rows, geom.cols
    dy, dx = geom.dil
    kh, kw = geom.kept_extent(padded)
    khp, kwp = _pow2(kh), _pow2(kw)
    lh, lw = rel_pos_h.shape[0], rel_pos_w.shape[0]
    idx_h = _rel_index(rows, geom[2], dy, khp, tuple((h // dx) % dy for h in range(H)), (lh - 1) // 2, lh, q.device)
    idx_w = _rel_index(cols, geom[3], dx, kwp, tuple(h % dx for h in range(H)), (lw - 1) // 2, lw, q.device)
    gh = rel_pos_h.to(q.dtype)[idx_h]  # (H, rows, KHP, D)
    gw = rel_pos_w.to(q.dtype)[idx_w]  # (H, cols, KWP, D)
    q5 = q.unflatten(1, (rows, cols))  # a view for any (B, N, H, D) strides
    rh = torch.einsum("byxhd,hyud->bhyxu", q5, gh).reshape(B, H, N, khp)
    rw = torch.einsum("byxhd,hxud->bhyxu", q5, gw).reshape(B, H, N, kwp)
    return rh, rw, (gh, idx_h, gw, idx_w)


def relpos_backward(q, drh, drw, tables, rel_pos_h, rel_pos_w):
    """Chain rule from the table gradients dRH/dRW to dq (B, N, H, D) fp32 and the two rel-pos tables
    (fp32)."""
    B, N, H, D = q.shape
    gh, idx_h, gw, idx_w = tables
    rows, cols = gh.shape[1], gw.shape[1]
    drh5 = drh.reshape(B, H, rows, cols, -1)
    drw5 = drw.reshape(B, H, rows, cols, -1)
    q5 = q.float().reshape(B, rows, cols, H, D)
    dq = torch.einsum("bhyxu,hyud->byxhd", drh5, gh.float()) + torch.einsum("bhyxu,hxud->byxhd", drw5, gw.float())
    dgh = torch.einsum("bhyxu,byxhd->hyud", drh5, q5)
    dgw = torch.einsum("bhyxu,byxhd->hxud", drw5, q5)
    dtab_h = torch.zeros(rel_pos_h.shape, dtype=torch.float32, device=q.device)
    dtab_w = torch.zeros(rel_pos_w.shape, dtype=torch.float32, device=q.device)
    dtab_h.index_add_(0, idx_h.reshape(-1), dgh.reshape(-1, D))
    dtab_w.index_add_(0, idx_w.reshape(-1), dgw.reshape(-1, D))
    return dq.reshape(B, N, H, D), dtab_h, dtab_w


@functools.lru_cache(maxsize=64)
def _rel_index_1d(n: int, grid: Tuple[int, int], seg: int, dil: int, kwp: int, heads: int, lh: int, lw: int,
                  device: torch.device):
    """Indices of :func:`relpos_table_1d` for N = ``n`` tokens on ``grid``, cached per geometry and device:
    ``idx_y`` (N, Hg) / ``idx_x`` (N, Wg) the table rows of offsets from query i to key row / column
    yk / xk, clamped; ``key_y`` / ``key_x`` (H, S, KWP) the grid row / column of the u-th kept key of
    segment s for head h (clamped into the sequence past the segment's end, where the kernel masks)."""
    with persistent():
        hg, wg = grid
        i = torch.arange(n)
        yq, xq = i // wg, i % wg
        idx_y = (yq[:, None] - torch.arange(hg)[None, :] + (lh - 1) // 2).clamp(0, lh - 1)
        idx_x = (xq[:, None] - torch.arange(wg)[None, :] + (lw - 1) // 2).clamp(0, lw - 1)
        s = torch.arange(-(-n // seg))
        offs = torch.arange(heads) % dil
        key = (s[None, :, None] * seg + offs[:, None, None] + torch.arange(kwp)[None, None, :] * dil).clamp(max=n - 1)
        return tuple(t.to(device) for t in (idx_y, idx_x, key // wg, key % wg))


def relpos_table_1d(q: torch.Tensor, geom: Geometry, grid: Tuple[int, int], rel_pos_h, rel_pos_w):
    """Per-query bias over the kept keys of a 1-D branch on a 2-D token grid (B, H, N, KWP), fp32 (fp64 for
    fp64 q):
    ``T[b, h, i, u] = q_i . rel_pos_h[y_i - y_k + (L_h - 1) / 2] + q_i . rel_pos_w[x_i - x_k + (L_w - 1) / 2]``
    for the u-th kept key k of query i's segment (head h's offset), with absolute coordinates
    ``y = idx // Wg``, ``x = idx % Wg``.

    A 1-D segment wraps around grid rows, so no row x column decomposition of its keys exists: the table
    holds every kept key (memory B * H * N * KWP, as a bias mask would), made from q's projections on
    both tables re-indexed by absolute key row / column (B, H, N, Hg + Wg), then gathered per segment.
    """
    B, N, H, D = q.shape
    seg, dil = geom[3], geom[5]
    kwp = _pow2(geom.kept_extent(False)[1])
    a, c, idx = _rel_abs_projections(q, grid, seg, dil, kwp, rel_pos_h, rel_pos_w)
    idx_y, idx_x, key_y, key_x = idx
    S = key_y.shape[1]
    pad = S * seg - N
    a = torch.nn.functional.pad(a, (0, 0, 0, pad)).view(B, H, S, seg, grid[0])
    c = torch.nn.functional.pad(c, (0, 0, 0, pad)).view(B, H, S, seg, grid[1])
    t = a.gather(4, key_y[None, :, :, None, :].expand(B, H, S, seg, kwp))
    t += c.gather(4, key_x[None, :, :, None, :].expand(B, H, S, seg, kwp))
    return t.view(B, H, S * seg, kwp)[:, :, :N]


def _rel_abs_projections(q, grid, seg, dil, kwp, rel_pos_h, rel_pos_w):
    """q's projections on both rel-pos tables, re-indexed by absolute key row / column: (B, H, N, Hg) and
    (B, H, N, Wg) in fp32 (or fp64), and the :func:`_rel_index_1d` indices."""
    B, N, H, D = q.shape
    lh, lw = rel_pos_h.shape[0], rel_pos_w.shape[0]
    idx = _rel_index_1d(N, tuple(grid), seg, dil, kwp, H, lh, lw, q.device)
    acc = torch.promote_types(q.dtype, torch.float32)
    qf = q.to(acc)
    a = torch.einsum("bnhd,ld->bhnl", qf, rel_pos_h.to(acc)).gather(3, idx[0].expand(B, H, N, grid[0]))
    c = torch.einsum("bnhd,ld->bhnl", qf, rel_pos_w.to(acc)).gather(3, idx[1].expand(B, H, N, grid[1]))
    return a, c, idx


def relpos_backward_1d(q, dt, geom: Geometry, grid, rel_pos_h, rel_pos_w):
    """Chain rule of :func:`relpos_table_1d`: from dT (B, H, N, KWP) to dq (B, N, H, D) and the two
    tables' gradients, in fp32 (fp64 for fp64 q)."""
    B, N, H, D = q.shape
    seg, dil = geom[3], geom[5]
    kwp = dt.shape[-1]
    lh, lw = rel_pos_h.shape[0], rel_pos_w.shape[0]
    idx_y, idx_x, key_y, key_x = _rel_index_1d(N, tuple(grid), seg, dil, kwp, H, lh, lw, q.device)
    S = key_y.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    dt5 = torch.nn.functional.pad(dt.to(acc), (0, 0, 0, S * seg - N)).view(B, H, S, seg, kwp)
    qf = q.to(acc)
    dq = torch.zeros((B, N, H, D), dtype=acc, device=q.device)
    grads = []
    for key, idx, extent, table in ((key_y, idx_y, grid[0], rel_pos_h), (key_x, idx_x, grid[1], rel_pos_w)):
        d_abs = torch.zeros((B, H, S, seg, extent), dtype=acc, device=q.device)
        d_abs.scatter_add_(4, key[None, :, :, None, :].expand(B, H, S, seg, kwp), dt5)
        d_abs = d_abs.view(B, H, S * seg, extent)[:, :, :N]
        d_proj = torch.zeros((B, H, N, table.shape[0]), dtype=acc, device=q.device)
        d_proj.scatter_add_(3, idx.expand(B, H, N, extent), d_abs)
        dq += torch.einsum("bhnl,ld->bnhd", d_proj, table.to(acc))
        grads.append(torch.einsum("bhnl,bnhd->ld", d_proj, qf))
    return dq, grads[0], grads[1]


def _rel_rows(group: "Group", grid: Tuple[int, int]) -> bool:
    """Whether a group takes SAM's decomposed (row + column) tables: its branches address the token grid
    (2-D branches). 1-D branches over a 2-D grid take per-key tables (:func:`relpos_table_1d`)."""
    return (group.rows, group.cols) == tuple(grid)


def _group_tables(q, group: Group, grid, rel_pos_h, rel_pos_w, padded: bool):
    """Every branch's RH / RW tables side by side (branch j's columns start at offs[j]) + backward data.
    1-D groups on a 2-D grid: per-key tables in RW (RH a placeholder no kernel reads)."""
    if _rel_rows(group, grid):
        parts = [relpos_tables(q, b, rel_pos_h, rel_pos_w, padded) for b in group.branches]
    else:
        empty = q.new_empty((1, 1, 1, 1))
        parts = [(empty, relpos_table_1d(q, b, grid, rel_pos_h, rel_pos_w).to(q.dtype), None)
                 for b in group.branches]
    rh = torch.cat([p[0] for p in parts], dim=-1).contiguous()  # the kernels share strides with dRH/dRW
    rw = torch.cat([p[1] for p in parts], dim=-1).contiguous()
    offs_h = [0]
    offs_w = [0]
    for p in parts[:-1]:
        offs_h.append(offs_h[-1] + p[0].shape[-1])
        offs_w.append(offs_w[-1] + p[1].shape[-1])
    return rh, rw, list(zip(offs_h, offs_w)), [p[2] for p in parts]
