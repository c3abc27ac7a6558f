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
kernel with the bias and key mask as its mask (it returns the lse too), built and consumed in chunks:

* what depends only on the geometry (the layout, key masks, rel-pos index tables) is built once per
  (branch, heads, device) and cached (:func:`_layout`), so a call costs little more host time than
  segment_anything's own attention;
* q, k and v, when they are views of one qkv tensor (as in SAM's blocks), are gathered into segments
  together, in one copy (none at all for a dense block, whose segment is the grid);
* the bias of a chunk - as many segments, or for a global block as many query rows, as fit in the policy's
  ``bias_chunk_bytes`` (:mod:`sam_fast.cpu_policy`; one query row of one segment at least) - is written contiguous
  in the kernel's layout straight from the two decomposed terms, with masked keys folded into those terms as
  -inf, and read by the kernel while it is still in cache. The temporary bias memory is bounded by
  ``max(bias_chunk_bytes, H * Lq_row * L * 4)`` bytes (``Lq_row``: the queries of one segment row, 64 for a
  global block on SAM's 64 x 64 grid), instead of ``S * H * L * L * 4`` for the whole bias (805 MB for a
  SlimSAM global block);
* float32 and bf16 (:data:`FUSED_DTYPES`) with a rel-pos bias, segments of at least the policy's
  ``rel_pos_min_keys`` keys, on a CPU with AVX-512, go instead through ``sam_fast::rel_pos_attention``
  (:func:`_fused_bias_branch`), which adds the two decomposed terms inside its row blocks: the bias memory is
  those terms, ``S * H * L * (ay + ax)`` floats at most ``rel_terms_bytes`` at a time;
* bf16 / fp16 run in their own dtype where the CPU has matmul instructions for it (AVX512-BF16 / AMX),
  otherwise in float32 (emulated half-precision matmuls are slower than float32 ones); the bias is
  float32 either way.

Otherwise (autograd recording) plain PyTorch ops in the inputs' dtype, which autograd differentiates, as
the reference does (lse in float32 / float64). A 1-D branch with a rel-pos bias (coordinates wrap at grid
rows, so its segments are not grid rectangles) runs the reference's loop.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import cpu_features, cpu_policy
from .._dispatch import aoti_export, export_target
from ..kernels._cache import persistent
from ..pattern import ResolvedBranch
from ..reference.dilated_attention import branch_attention as reference_branch
from ..reference.dilated_attention import merge_branches
from ._ext import extension_error
from .decomposed_bias import decomposed_bias
from .rel_pos_attention import rel_pos_attention


def batches_segments(branches, rel_pos_h) -> bool:
    """Whether every branch runs batched here (a 1-D branch with rel-pos runs the reference's loop)."""
    return all(_batched(br, rel_pos_h) for br in branches)


def _batched(br: ResolvedBranch, rel_pos_h) -> bool:
    return rel_pos_h is None or br.is_2d


def _has_fast_half(dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` (bf16 / fp16) matrices in hardware."""
    cpu = torch.cpu
    if dtype == torch.bfloat16:
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    else:
        checks = ("_is_amx_fp16_supported",)
    return any(getattr(cpu, c, lambda: False)() for c in checks)


_FAST_HALF: Dict[torch.dtype, bool] = {}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the inference path multiplies in: ``dtype``, or float32 for a half type the CPU lacks
    matmul instructions for."""
    if dtype not in (torch.bfloat16, torch.float16):
        return dtype
    if dtype not in _FAST_HALF:
        _FAST_HALF[dtype] = _has_fast_half(dtype)
    return dtype if _FAST_HALF[dtype] else torch.float32


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
        self.key_y, self.key_x = ky, kx  # (ns_y, H, ay), (ns_x, H, ax): a key is valid iff both are
        self.n_seg = self.ns_y * self.ns_x
        self.trivial = self.n_seg == 1 and not self.dilated and (sh, sw) == (br.rows, br.cols)
        self._cache: Dict[object, torch.Tensor] = {}
        # whether no key is missing, from the geometry alone (no data-dependent branch under torch.compile):
        # the furthest index any head reads along an axis must lie in its segment (and, without virtual
        # keys, in the grid's last segment)
        ly, lx = br.rows - (self.ns_y - 1) * sh, br.cols - (self.ns_x - 1) * sw
        far_y = max(oy for oy, _ in offsets) + (self.ay - 1) * self.dy
        far_x = max(ox for _, ox in offsets) + (self.ax - 1) * self.dx
        self.all_keys = far_y < (sh if full else min(sh, ly)) and far_x < (sw if full else min(sw, lx))
        self.pad_y, self.pad_x = self.ns_y * sh - br.rows, self.ns_x * sw - br.cols

    def key_neg(self, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """(n_seg, H, ay) and (n_seg, H, ax): 0 where the key row / column is valid, -inf where not; their
        sum over (row, column) is the key mask, so adding them to the two rel-pos terms masks the keys."""
        key = ("neg", dtype)
        if key not in self._cache:
            def neg(valid):
                return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill_(~valid, float("-inf"))

            with persistent():
                ny = neg(self.key_y)[:, None].expand(self.ns_y, self.ns_x, self.H, self.ay)
                nx = neg(self.key_x)[None, :].expand(self.ns_y, self.ns_x, self.H, self.ax)
                self._cache[key] = (ny.reshape(self.n_seg, self.H, self.ay), nx.reshape(self.n_seg, self.H, self.ax))
        return self._cache[key]

    def rel_index(self, axis: int, length: int) -> torch.Tensor:
        """(a, a) indices into a rel-pos table of ``length`` rows for the dilated in-segment offsets along
        ``axis`` (0: rows, 1: columns)."""
        key = ("rel", axis, length)
        if key not in self._cache:
            a, step = (self.ay, self.dy) if axis == 0 else (self.ax, self.dx)
            with persistent():
                pos = torch.arange(a, device=self.heads.device) * step
                self._cache[key] = pos[:, None] - pos[None, :] + (length - 1) // 2
        return self._cache[key]

    def gather_qkv(self, q, k, v, pad_kv):
        """q, k, v (B, N, H, D) -> three (B * S, H, L, D) tensors of the segments (views, for a dense
        layout); without dilation, one copy for all three (and none to stack them when they are views of one
        qkv tensor)."""
        B, N, H, D = q.shape
        if self.trivial:
            return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        fill = None
        if pad_kv is not None:
            fill = torch.stack((torch.zeros_like(pad_kv[0]), pad_kv[0], pad_kv[1])).to(q.dtype)  # (3, H, D)
        if self.dilated:
            fills = (None, None, None) if fill is None else fill.unbind(0)
            return tuple(self.gather(t, f) for t, f in zip((q, k, v), fills))
        rows, cols = self.br.rows, self.br.cols
        g = _stacked(q, k, v).view(B, rows, cols, 3, H, D)
        if self.pad_y or self.pad_x:
            buf = g.new_empty(B, rows + self.pad_y, cols + self.pad_x, 3, H, D)
            buf[:, :rows, :cols] = g
            value = fill if fill is not None else 0.0
            buf[:, rows:] = value
            buf[:, :rows, cols:] = value
            g = buf
        # segment-major, then token; each token's q, k, v stay one contiguous run of 3 * H * D values (a copy
        # in long runs), and the kernel reads q, k, v strided from it
        g = g.reshape(B, self.ns_y, self.sh, self.ns_x, self.sw, 3 * H * D).permute(0, 1, 3, 2, 4, 5)
        g = g.reshape(B * self.n_seg, self.sh * self.sw, 3, H, D)
        return g[:, :, 0].transpose(1, 2), g[:, :, 1].transpose(1, 2), g[:, :, 2].transpose(1, 2)

    def scatter_rows(self, t: torch.Tensor, B: int) -> torch.Tensor:
        """(B * S, L, H, E) (segment-major, then query) -> (B, N, H, E) for a layout without dilation."""
        H, E = self.H, t.shape[-1]
        if self.trivial:  # (views when t is contiguous, as the kernel's output is)
            return t.reshape(B, self.br.rows * self.br.cols, H, E)
        t = t.reshape(B, self.ns_y, self.ns_x, self.sh, self.sw, H, E).permute(0, 1, 3, 2, 4, 5, 6)
        t = t.reshape(B, self.ns_y * self.sh, self.ns_x * self.sw, H, E)
        return t[:, : self.br.rows, : self.br.cols].reshape(B, self.br.rows * self.br.cols, H, E)

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


_LAYOUTS: Dict[tuple, _Layout] = {}
_MAX_LAYOUTS = 64


def _layout(br: ResolvedBranch, full: bool, H: int, device) -> _Layout:
    """The branch's layout, built once per (branch, virtual keys, heads, device) and reused (a model has a
    handful); rebuilt while torch.compile traces, so that it sees tensors it created."""
    if torch.compiler.is_compiling():
        return _Layout(br, full, H, device)
    key = (br, full, H, torch.device(device))
    lay = _LAYOUTS.get(key)
    if lay is None:
        if len(_LAYOUTS) >= _MAX_LAYOUTS:
            _LAYOUTS.pop(next(iter(_LAYOUTS)))
        with persistent():
            lay = _LAYOUTS[key] = _Layout(br, full, H, device)
    return lay


def _stacked(q, k, v) -> torch.Tensor:
    """(B, N, 3, H, D): a view when q, k, v are the three parts of one qkv tensor (SAM's blocks reshape
    ``qkv(x)`` to (B, N, 3, H, D) and unbind it), else a stacked copy."""
    B, N, H, D = q.shape
    st = q.stride()
    if not torch.compiler.is_compiling() and q.dtype == k.dtype == v.dtype and st == k.stride() == v.stride():
        step = H * D * q.element_size()
        same = q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
        if same and st[3] == 1 and st[2] == D and k.data_ptr() - q.data_ptr() == step \
                and v.data_ptr() - k.data_ptr() == step:
            return q.as_strided((B, N, 3, H, D), (st[0], st[1], H * D, D, 1))
    return torch.stack((q, k, v), dim=2)


def _chunks(lay: _Layout, H: int, L: int, itemsize: int):
    """(segments per chunk, dilated query rows per chunk) so that a chunk's bias fits the policy's bias_chunk_bytes
    (at least one query row of one segment)."""
    row = H * lay.ax * L * itemsize
    budget = cpu_policy.policy().bias_chunk_bytes
    if lay.ay * row <= budget:
        return max(1, min(lay.n_seg, budget // (lay.ay * row))), lay.ay
    return 1, max(1, budget // row)


def _avx512() -> bool:
    """Whether the AVX-512 paths run (:func:`sam_fast.cpu_features.avx512`)."""
    return cpu_features.avx512()


#: the compute dtypes that take ``sam_fast::rel_pos_attention`` (bf16: where :func:`compute_dtype` keeps it, i.e.
#: the CPU multiplies bf16 in hardware)
FUSED_DTYPES = (torch.float32, torch.bfloat16)


def fused_bias_kernel() -> bool:
    """Whether ``sam_fast::rel_pos_attention`` (the bias added inside the kernel) may run: the C++ extension
    loaded, the CPU has AVX-512 (the kernel's plain path, an exp per element, is slower than PyTorch's fused
    kernel with a mask), and not while torch.compile traces (that path keeps PyTorch's kernel, which it knows) unless
    the trace is for an AOTInductor package (:func:`sam_fast._dispatch.aoti_export`), which calls the kernel."""
    if torch.compiler.is_compiling() and not aoti_export():
        return False
    return _avx512() and extension_error() is None


def _fused_bias_branch(qs, ks, vs, lay: "_Layout", th, tw, neg, scale: float, B: int):
    """float32 / bf16 q, k, v segments (S, H, L, D) -> out (S, L, H, D) in their dtype, lse (S, H, L) float32
    through ``sam_fast::rel_pos_attention``: the two decomposed terms per query (float32, with masked keys folded
    in as -inf) are all the bias memory there is, computed for as many segments at a time as fit
    the policy's rel_terms_bytes."""
    S, H, L, D = qs.shape
    ay, ax = lay.ay, lay.ax
    out = torch.empty(S, L, H, D, dtype=qs.dtype, device=qs.device)
    lse = torch.empty(S, H, L, dtype=torch.float32, device=qs.device)
    per_seg = H * L * (ay + ax) * 4
    cs = max(1, min(lay.n_seg, cpu_policy.policy().rel_terms_bytes // per_seg))
    for b in range(B):
        for j0 in range(0, lay.n_seg, cs):
            j1 = min(lay.n_seg, j0 + cs)
            s0, s1 = b * lay.n_seg + j0, b * lay.n_seg + j1
            q5 = qs[s0:s1].reshape(s1 - s0, H, ay, ax, D).to(th.dtype)
            rh = torch.einsum("shyxd,ykd->shyxk", q5, th)
            rw = torch.einsum("shyxd,xkd->shyxk", q5, tw)
            if neg is not None:
                rh = rh + neg[0][j0:j1, :, None, None, :]
                rw = rw + neg[1][j0:j1, :, None, None, :]
            rh = rh.reshape(s1 - s0, H, L, ay).contiguous()
            rw = rw.reshape(s1 - s0, H, L, ax).contiguous()
            rel_pos_attention(qs[s0:s1], ks[s0:s1], vs[s0:s1], rh, rw, scale, out=out[s0:s1], lse=lse[s0:s1],
                              backend="cpu")
    return out, lse


def _inference_branch(q, k, v, lay: _Layout, rel_pos_h, rel_pos_w, scale: float, pad_kv):
    """The no-autograd path of one batched branch (see the module docstring). Returns out (B, N, H, D) in
    q's dtype and lse (B, N, H)."""
    B, N, H, D = q.shape
    cdt = compute_dtype(q.dtype)
    lse_dtype = torch.promote_types(q.dtype, torch.float32)
    bias_dtype = torch.promote_types(cdt, torch.float32)
    qs, ks, vs = (t.to(cdt) for t in lay.gather_qkv(q, k, v, pad_kv))
    S, L = qs.shape[0], qs.shape[2]
    ay, ax = lay.ay, lay.ax
    th = tw = None
    if rel_pos_h is not None:
        th = rel_pos_h.to(bias_dtype)[lay.rel_index(0, rel_pos_h.shape[0])]  # (ay, ay, D)
        tw = rel_pos_w.to(bias_dtype)[lay.rel_index(1, rel_pos_w.shape[0])]  # (ax, ax, D)
    neg = None if lay.all_keys else lay.key_neg(bias_dtype)
    if export_target() == "onnx" or isinstance(B, torch.SymInt):
        out, lse = _whole_branch(qs, ks, vs, lay, th, tw, neg, scale)
        return _scatter_branch(lay, out.to(q.dtype), lse.to(lse_dtype), B)
    if th is not None and cdt in FUSED_DTYPES and L >= cpu_policy.policy().rel_pos_min_keys and fused_bias_kernel():
        out, lse = _fused_bias_branch(qs, ks, vs, lay, th, tw, neg, scale, B)
        return _scatter_branch(lay, out.to(q.dtype), lse.to(lse_dtype), B)
    cs, cy = _chunks(lay, H, L, torch.finfo(bias_dtype).bits // 8)
    # results in (segment, query, head) order: the scatter reads them once; the kernel writes its output
    # in this order too (a (c, q, H, D) tensor seen as (c, H, q, D))
    buf = torch.empty(cs * H * cy * ax * L if th is not None else 0, dtype=bias_dtype, device=q.device)

    def chunk(s0, s1, j0, j1, y0, y1):
        """Segments s0:s1 (j0:j1 within their image), dilated query rows y0:y1 -> the kernel's (o, lse)."""
        qc = qs[s0:s1, :, y0 * ax:y1 * ax]
        mask = None
        if th is not None:
            q5 = qc.reshape(s1 - s0, H, y1 - y0, ax, D).to(bias_dtype)
            rh = torch.einsum("shyxd,ykd->shyxk", q5, th[y0:y1])
            rw = torch.einsum("shyxd,xkd->shyxk", q5, tw)
            if neg is not None:
                rh = rh + neg[0][j0:j1, :, None, None, :]
                rw = rw + neg[1][j0:j1, :, None, None, :]
            n = (s1 - s0) * H * (y1 - y0) * ax * L
            mask = decomposed_bias(rh, rw, buf[:n].view(*rh.shape[:-1], L))
            mask = mask.reshape(s1 - s0, H, (y1 - y0) * ax, L)  # a view but while compiling
        elif neg is not None:
            mask = (neg[0][j0:j1, :, :, None] + neg[1][j0:j1, :, None, :]).view(s1 - s0, H, 1, L)
            mask = mask.expand(s1 - s0, H, (y1 - y0) * ax, L)
        # rows of padded queries may see no key (NaN there): the scatter drops them
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qc, ks[s0:s1], vs[s0:s1], attn_mask=mask,
                                                                          scale=scale)[:2]

    if B == 1 and cs >= lay.n_seg and cy >= ay:  # one chunk: the kernel's own output is the result
        o, lse = chunk(0, S, 0, lay.n_seg, 0, ay)
        out, lse = o.transpose(1, 2).to(q.dtype), lse.to(lse_dtype)
    else:
        out = q.new_empty(S, L, H, D)
        lse = torch.empty(S, H, L, dtype=lse_dtype, device=q.device)
        for b in range(B):
            for j0 in range(0, lay.n_seg, cs):
                j1 = min(lay.n_seg, j0 + cs)
                s0, s1 = b * lay.n_seg + j0, b * lay.n_seg + j1
                for y0 in range(0, ay, cy):
                    y1 = min(ay, y0 + cy)
                    o, l = chunk(s0, s1, j0, j1, y0, y1)
                    out[s0:s1, y0 * ax:y1 * ax] = o.transpose(1, 2)
                    lse[s0:s1, :, y0 * ax:y1 * ax] = l
    return _scatter_branch(lay, out, lse, B)


def _scatter_branch(lay: _Layout, out, lse, B):
    """A branch's segment results, out (B * S, L, H, D) and lse (B * S, H, L), back on the grid: (B, N, H, D) and
    (B, N, H)."""
    lse_out = lay.scatter(lse[..., None], B, float("-inf"))[..., 0]
    if lay.dilated:
        return lay.scatter(out.transpose(1, 2), B, 0.0), lse_out
    return lay.scatter_rows(out, B), lse_out


def _whole_branch(qs, ks, vs, lay: _Layout, th, tw, neg, scale: float):
    """The branch for an exported graph: every segment of every image at once, as plain matrix products and a
    softmax (no chunks, no loop over the batch, so the batch may be a dynamic axis; ONNX gets MatMul / Add /
    Softmax). qs, ks, vs (B * S, H, L, D) -> out (B * S, L, H, D), lse (B * S, H, L) in the bias dtype."""
    BS, H, L, D = qs.shape
    ay, ax = lay.ay, lay.ax
    dt = th.dtype if th is not None else torch.promote_types(qs.dtype, torch.float32)
    scores = torch.matmul(qs.to(dt), ks.to(dt).transpose(-1, -2)) * scale
    if th is not None or neg is not None:
        rh = rw = None
        if th is not None:
            q5 = qs.reshape(BS, H, ay, ax, D).to(dt)
            rh = torch.einsum("shyxd,ykd->shyxk", q5, th)
            rw = torch.einsum("shyxd,xkd->shyxk", q5, tw)
        if neg is not None:  # (n_seg, H, a): the same for every image
            ny = neg[0][:, :, None, None, :].repeat(BS // lay.n_seg, 1, 1, 1, 1)
            nx = neg[1][:, :, None, None, :].repeat(BS // lay.n_seg, 1, 1, 1, 1)
            rh = ny if rh is None else rh + ny
            rw = nx if rw is None else rw + nx
        bias = rh[..., :, None] + rw[..., None, :]  # (BS, H, ay, ax, ay, ax), or broadcasting to it
        scores = (scores.reshape(BS, H, ay, ax, ay, ax) + bias).reshape(BS, H, L, L)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]), vs.to(dt))
    return out.transpose(1, 2), lse


def fused_ok(*tensors) -> bool:
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
    lay = _layout(br, pad_kv is not None, H, q.device)
    if fused_ok(q, k, v, rel_pos_h, rel_pos_w, *(pad_kv or ())):
        return _inference_branch(q, k, v, lay, rel_pos_h, rel_pos_w, scale, pad_kv)
    pk, pv = pad_kv if pad_kv is not None else (None, None)
    qs, ks, vs = lay.gather(q), lay.gather(k, pk), lay.gather(v, pv)  # (B * S, H, L, D)
    S, L = qs.shape[0], qs.shape[2]
    lse_dtype = torch.promote_types(q.dtype, torch.float32)
    rel = None
    if rel_pos_h is not None:
        q5 = qs.reshape(S, H, lay.ay, lay.ax, D)
        rel_h = torch.einsum("shyxd,ykd->shyxk", q5, _rel_table(rel_pos_h, lay.ay, lay.dy, q.dtype))
        rel_w = torch.einsum("shyxd,xkd->shyxk", q5, _rel_table(rel_pos_w, lay.ax, lay.dx, q.dtype))
        rel = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(S, H, L, L)
    n_seg = lay.n_seg
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
