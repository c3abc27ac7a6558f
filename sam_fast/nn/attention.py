"""nn.Module drop-ins for segment_anything's ViT blocks, built on :func:`sam_fast.dilated_attention`.

:class:`SamFastBlock` wraps an ``image_encoder.Block`` *sharing its submodules* (``norm1``, ``attn``,
``norm2``, ``mlp``), so parameter names, state_dict keys and optimizer state are unchanged. Its forward
is segment_anything's, except attention: global blocks run dense fused attention over the (Hg, Wg)
grid; window blocks run the 2-D window pattern directly on the unpadded grid, with SAM's zero-token
padding reproduced by virtual keys whose k, v are the qkv bias (``pad_kv``) - no pad, partition or
unpartition copies. With a ``pattern`` the block runs dilated attention over the whole grid instead
(SAM-Lightening's replacement), keeping the block's weights.

:class:`DilatedAttention` is a stand-alone drop-in for segment_anything's ``Attention`` (same
constructor arguments and parameter names ``qkv``, ``proj``, ``rel_pos_h``, ``rel_pos_w``) that takes
a pattern.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .. import cpu_policy
from .._dispatch import check_backend_name, note_fallback
from .._hooks import has_hooks, share_hooks
from ..ops.dilated_attention import dilated_attention, needed_rel_rows
from ..ops.linear_epilogue import fused_linear, gemm
from ..ops.resize_rel_pos import resize_rel_pos
from ..ops.sam_block_attention import sam_block_attention, sam_block_fits
from ..pattern import Branch, check_pattern, resolve_pattern
from .quantized import Int8Linear, int8_mlp, norm_int8_linear


def _rel_table(table: torch.Tensor, size: int) -> torch.Tensor:
    """segment_anything's get_rel_pos resize: the table must span 2 * size - 1 offsets."""
    need = 2 * size - 1
    return table if table.shape[0] == need else resize_rel_pos(table, need)


def _pattern_rel_sizes(pattern, grid, base):
    """Coordinate extents the rel-pos tables must span for ``pattern`` on ``grid``: segment_anything's
    size for the block (``base``: its window or the grid), widened when a pattern segment reaches
    further (the table is then resized as get_rel_pos would for that size)."""
    need_h, need_w = 2 * base[0] - 1, 2 * base[1] - 1
    for br in resolve_pattern(pattern, grid[0] * grid[1], grid):
        lh, lw = needed_rel_rows(br, grid, padded=False)
        need_h, need_w = max(need_h, lh), max(need_w, lw)
    return (need_h + 1) // 2, (need_w + 1) // 2


def _plain_cpu_fits(attn: nn.Module, x: Optional[torch.Tensor], pattern, backend: str) -> bool:
    """Whether a tiny block runs plain PyTorch (``sam_block_attention``'s reference backend: segment_anything's
    partition, SDPA with the bias as mask): ``auto``, SAM's own block (no pattern, x given), on the CPU, at
    inference, with at most ``cpu_policy.policy().plain_max_tokens`` tokens; at that size the batched path's fixed
    per-call work costs more than it saves."""
    if x is None or pattern is not None or backend != "auto" or x.device.type != "cpu" or x.dim() != 4:
        return False
    if x.shape[1] * x.shape[2] > cpu_policy.policy().plain_max_tokens:
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in attn.parameters())))


def _pad_kv(attn: nn.Module, Hg: int, Wg: int, window_size: int):
    """The k and v that segment_anything's zero-padded window tokens carry (the qkv bias' parts), or None when the
    windows tile the grid or there is no bias (zeros)."""
    bias = attn.qkv.bias
    if window_size > 0 and (Hg % window_size or Wg % window_size) and bias is not None:
        return tuple(bias.view(3, attn.num_heads, -1)[1:])
    return None


def sam_attention(attn: nn.Module, x: Optional[torch.Tensor], window_size: int = 0, backend: str = "auto",
                  pattern=None, qkv: Optional[torch.Tensor] = None,
                  residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """segment_anything ``Attention`` (with its Block's window partition when ``window_size > 0``)
    on x (B, Hg, Wg, C) through the fused kernel. Returns (B, Hg, Wg, C_out of attn.proj), plus ``residual``
    when given (added into the projection's output at inference).

    With a ``pattern`` the attention is dilated attention over the whole (Hg, Wg) grid (no window
    partition); rel-pos tables keep absolute coordinates and are resized only when the pattern reaches
    beyond what the block's tables span. ``qkv`` (B, Hg, Wg, 3C), when given, is ``attn.qkv(x)`` already
    computed (e.g. by a fused LayerNorm -> int8 GEMM) and ``x`` is not read.

    On the CPU, SAM's own block (no pattern) with a rel-pos bias at inference runs the C++ kernel of
    :func:`~sam_fast.ops.sam_block_attention.sam_block_attention` straight on the qkv tensor where
    :func:`~sam_fast.ops.sam_block_attention.sam_block_fits` (in float32 with the qkv bias added as the kernel reads
    the rows, and the projection's bias and residual fused after its GEMM:
    :func:`~sam_fast.ops.linear_epilogue.fused_linear`). Otherwise a tiny block on the CPU at inference (at most
    the policy's ``plain_max_tokens`` tokens, ``backend="auto"``, no pattern) runs that op's plain-PyTorch
    reference backend."""
    heads = attn.num_heads
    if pattern is None and getattr(attn, "use_rel_pos", False):
        src = x if qkv is None else qkv
        Hg, Wg = src.shape[1], src.shape[2]
        size_h, size_w = (window_size, window_size) if window_size > 0 else (Hg, Wg)
        rel_h, rel_w = _rel_table(attn.rel_pos_h, size_h), _rel_table(attn.rel_pos_w, size_w)
        bias = attn.qkv.bias
        params = () if bias is None else (bias, attn.qkv.weight)
        if sam_block_fits(src, window_size, rel_h, rel_w, backend, *params):
            qkv_bias = None
            if qkv is None:
                if type(attn.qkv) is nn.Linear and bias is not None and x.dtype == torch.float32 \
                        and not has_hooks(attn.qkv):
                    qkv, qkv_bias = gemm(x, attn.qkv.weight), bias  # the kernel adds the bias as it reads
                else:
                    qkv = attn.qkv(x)
            out = sam_block_attention(qkv, heads, window_size, rel_h, rel_w, _pad_kv(attn, Hg, Wg, window_size),
                                      attn.scale, qkv_bias=qkv_bias, backend="cpu")
            return _project(attn, out, residual, backend)
    if qkv is None and _plain_cpu_fits(attn, x, pattern, backend):
        Hg, Wg = x.shape[1], x.shape[2]
        size_h, size_w = (window_size, window_size) if window_size > 0 else (Hg, Wg)
        rel_h = rel_w = None
        if getattr(attn, "use_rel_pos", False):
            rel_h, rel_w = _rel_table(attn.rel_pos_h, size_h), _rel_table(attn.rel_pos_w, size_w)
        out = sam_block_attention(attn.qkv(x), heads, window_size, rel_h, rel_w, _pad_kv(attn, Hg, Wg, window_size),
                                  attn.scale, backend="reference")
        return _add_residual(attn.proj(out), attn.proj, residual)
    if qkv is None:
        qkv = attn.qkv(x)
    B, Hg, Wg, _ = qkv.shape
    qkv = qkv.reshape(B, Hg * Wg, 3, heads, -1)
    q, k, v = qkv.unbind(2)  # (B, N, heads, head_dim) views; last dim contiguous
    head_dim = q.shape[-1]
    pad_kv = None
    size_h, size_w = Hg, Wg
    if pattern is not None:
        base = (window_size, window_size) if window_size > 0 else (Hg, Wg)
        if getattr(attn, "use_rel_pos", False):
            size_h, size_w = _pattern_rel_sizes(pattern, (Hg, Wg), base)
    elif window_size > 0:
        pattern = Branch((window_size, window_size))
        size_h = size_w = window_size
        if Hg % window_size or Wg % window_size:
            if attn.qkv.bias is not None:
                bias = attn.qkv.bias.view(3, heads, head_dim).to(q.dtype)
                pad_kv = (bias[1], bias[2])
            else:
                zero = q.new_zeros(heads, head_dim)
                pad_kv = (zero, zero)
    rel_h = rel_w = None
    if getattr(attn, "use_rel_pos", False):
        rel_h = _rel_table(attn.rel_pos_h, size_h)
        rel_w = _rel_table(attn.rel_pos_w, size_w)
    out = dilated_attention(q, k, v, pattern, grid=(Hg, Wg), rel_pos_h=rel_h, rel_pos_w=rel_w,
                            softmax_scale=attn.scale, backend=backend, pad_kv=pad_kv)
    return _project(attn, out.reshape(B, Hg, Wg, heads * head_dim), residual, backend)


#: modules whose output is a new tensor nobody else holds (so the block may add into it in place)
_OWN_OUTPUT = (nn.Linear, Int8Linear)


def _inplace_ok() -> bool:
    """Whether the block may write into the fresh outputs of its layers: nothing for autograd to record, and not
    while torch.compile traces (it fuses these adds itself)."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _add_residual(fresh: torch.Tensor, made_by: Optional[nn.Module], residual: Optional[torch.Tensor]) -> torch.Tensor:
    """``residual + fresh`` (just ``fresh`` without a residual): at inference, into ``fresh`` itself when
    ``made_by`` (the module whose output it is) returns new tensors and nothing broadcasts or changes dtype - the
    same values (addition is commutative, bit for bit) with one full-size tensor less written."""
    if residual is None:
        return fresh
    same = fresh.dtype == residual.dtype and fresh.shape == residual.shape
    # (never into an output a hook on made_by saw: the hook may hold it)
    if same and _inplace_ok() and isinstance(made_by, _OWN_OUTPUT) and not has_hooks(made_by):
        return fresh.add_(residual)
    return residual + fresh


def _fused_linear(backend: str, lin: nn.Module, x: torch.Tensor, activation: str = "none",
                  residual: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """:func:`~sam_fast.ops.linear_epilogue.fused_linear` under the CPU backends (``"auto"``, ``"cpu"``); None under
    an explicit other one (``"triton"``, ``"reference"``: the block's linears then run as the modules are written)."""
    return fused_linear(lin, x, activation, residual) if backend in ("auto", "cpu") else None


def _project(attn: nn.Module, out: torch.Tensor, residual: Optional[torch.Tensor], backend: str = "auto"
             ) -> torch.Tensor:
    """``attn.proj(out)`` (+ ``residual``), the bias and residual fused after the GEMM where they can be
    (:func:`_fused_linear`). An int8 projection of bf16 attention (:func:`_int8_attention_dtype`) writes the
    residual's dtype itself."""
    proj = attn.proj
    if residual is not None and out.dtype != residual.dtype and type(proj) is Int8Linear and not has_hooks(proj):
        return _add_residual(proj(out, out_dtype=residual.dtype), proj, residual)
    fused = _fused_linear(backend, proj, out, residual=residual)
    return fused if fused is not None else _add_residual(attn.proj(out), attn.proj, residual)


def _mlp_fused(mlp: nn.Module, x: torch.Tensor, residual: torch.Tensor, backend: str = "auto"
               ) -> Optional[torch.Tensor]:
    """segment_anything ``MLPBlock`` (lin1 -> GELU -> lin2) on x, plus ``residual``, at inference: the bias, GELU and
    residual fused with each GEMM (:func:`_fused_linear`), or in place on the linears' fresh outputs where that does
    not apply. None for any other MLP."""
    return mlp_layers_fused(*(getattr(mlp, n, None) for n in ("lin1", "act", "lin2")), x, residual, backend)


def mlp_layers_fused(lin1, act, lin2, x: torch.Tensor, residual: torch.Tensor, backend: str = "auto"
                     ) -> Optional[torch.Tensor]:
    """``residual + lin2(act(lin1(x)))`` at inference as :func:`_mlp_fused` runs it, for any MLP of a linear, a GELU
    and a linear (TinyViT's fc1 / act / fc2 too). None unless act is an ``nn.GELU`` and lin1 a layer returning new
    tensors."""
    if type(act) is not nn.GELU or not isinstance(lin1, _OWN_OUTPUT) or lin2 is None:
        return None
    hidden = _fused_linear(backend, lin1, x, "gelu" if act.approximate == "none" else "gelu_tanh")
    if hidden is None:
        hidden = torch.ops.aten.gelu_(lin1(x), approximate=act.approximate)
    out = _fused_linear(backend, lin2, hidden, residual=residual)
    return out if out is not None else _add_residual(lin2(hidden), lin2, residual)


def _int8_attention_dtype(attn: nn.Module, x: torch.Tensor, window_size: int, backend: str, pattern,
                          inplace: bool) -> torch.dtype:
    """The dtype the int8 qkv GEMM writes for the attention: bf16 where the CPU policy's ``int8_attention_bf16``
    asks for it (the C++ block kernel then runs bf16 GEMMs: AVX512-BF16 dot products or AMX) - a float32 block at
    inference with int8 qkv and proj layers that the block kernel takes in bf16 (:func:`sam_block_fits`: a CPU that
    multiplies bf16 in hardware, the rel-pos bias, the segment size) - else ``x``'s dtype."""
    if not (inplace and pattern is None and x.dtype == torch.float32 and cpu_policy.policy().int8_attention_bf16
            and type(attn.qkv) is Int8Linear and type(attn.proj) is Int8Linear):
        return x.dtype
    rel_h = attn.rel_pos_h if getattr(attn, "use_rel_pos", False) else None
    fits = sam_block_fits(x, window_size, rel_h, None, backend, dtype=torch.bfloat16)
    return torch.bfloat16 if fits else x.dtype


def vit_block_forward(x: torch.Tensor, norm1: nn.Module, attn, norm2: nn.Module, mlp: nn.Module, window_size: int,
                      backend: str, pattern) -> torch.Tensor:
    """segment_anything's ViT block on x (B, Hg, Wg, C) with fused attention (:func:`sam_attention`); with
    W8A8 linears (``quantize="int8"``) the norms fuse into the int8 GEMMs' input quantization. At inference the
    residual adds, biases and the MLP's GELU are fused after the GEMMs or run in place on their fresh outputs.

    When a layer of the block has hooks (:func:`~sam_fast._hooks.has_hooks`), every layer is called as a module
    and no output is written in place: the attention kernel still runs, the fusions around it do not."""
    if has_hooks(norm1, attn.qkv, attn.proj, norm2, mlp, *(getattr(mlp, n, None) for n in ("lin1", "act", "lin2"))):
        x = x + _hooked_attention(attn, norm1(x), window_size, backend, pattern)
        return x + mlp(norm2(x))
    inplace = _inplace_ok()
    qkv = norm_int8_linear(norm1, attn.qkv, x, _int8_attention_dtype(attn, x, window_size, backend, pattern, inplace))
    if qkv is None:
        out = sam_attention(attn, norm1(x), window_size, backend, pattern, residual=x if inplace else None)
    else:
        out = sam_attention(attn, None, window_size, backend, pattern, qkv=qkv, residual=x if inplace else None)
    x = out if inplace else x + out
    hidden = int8_mlp(norm2, mlp, x)
    if hidden is not None:
        return _add_residual(hidden, getattr(mlp, "lin2", None), x) if inplace else x + hidden
    if inplace:
        fused = _mlp_fused(mlp, norm2(x), x, backend)
        if fused is not None:
            return fused
    return x + mlp(norm2(x))


def hooked_attention_fallback(where: str, pattern, block_forward, *args, **kwargs) -> torch.Tensor:
    """A block whose attention module has hooks: the fused kernels never call that module, so the block's own
    forward runs (its attention called as a module, with its hooks), recorded and warned about as a fallback
    (:func:`sam_fast.record_backends`). A block running a dilated ``pattern`` has no such forward: ValueError."""
    if pattern is not None:
        raise ValueError(f"{where}: the block's attn module has hooks, but the block runs dilated attention, which "
                         "never calls attn (segment_anything's Attention computes dense / window attention); register "
                         "the hook on the block itself or on attn.qkv / attn.proj, which do run")
    note_fallback("sam_block", "reference", "the attn module has hooks: the block's own forward runs so that they do")
    return block_forward(*args, **kwargs)


def _hooked_attention(attn, x: torch.Tensor, window_size: int, backend: str, pattern) -> torch.Tensor:
    """The attention of a block whose layers have hooks: qkv and proj called as modules on what segment_anything
    gives them (a window block's zero-padded windows, so that the hooks see the same tensors), the fused kernel
    between them."""
    if window_size == 0 or pattern is not None:
        return sam_attention(attn, x, window_size, backend, pattern)
    from segment_anything.modeling.image_encoder import window_partition, window_unpartition

    windows, pad_hw = window_partition(x, window_size)
    out = sam_attention(attn, windows, 0, backend)  # each window attends within itself, as a global block would
    return window_unpartition(out, window_size, pad_hw, (x.shape[1], x.shape[2]))


class SamFastBlock(nn.Module):
    """segment_anything ViT ``Block`` with fused attention; shares the wrapped block's submodules.

    ``pattern=None`` runs the block's own attention exactly (global or windowed); a pattern (a
    :class:`sam_fast.Branch` or a list of them) runs dilated attention over the whole token grid.
    """

    def __init__(self, block: nn.Module, backend: str = "auto", pattern=None):
        super().__init__()
        self.norm1 = block.norm1
        self.attn = block.attn
        self.norm2 = block.norm2
        self.mlp = block.mlp
        self.window_size = int(block.window_size)
        self.backend = backend
        self.pattern = check_pattern(pattern, "pattern")
        # the wrapped block (not a submodule: its parameters are these), whose forward runs when attn has hooks
        self.__dict__["_block_forward"] = block.forward
        share_hooks(self, block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if has_hooks(self.attn):
            return hooked_attention_fallback("SamFastBlock", self.pattern, self._block_forward, x)
        return vit_block_forward(x, self.norm1, self.attn, self.norm2, self.mlp, self.window_size, self.backend,
                                 self.pattern)

    def extra_repr(self) -> str:
        extra = "" if self.pattern is None else f", pattern={self.pattern}"
        return f"window_size={self.window_size}, backend={self.backend!r}{extra}"


class DilatedAttention(nn.Module):
    """Dilated attention as a drop-in for segment_anything's image-encoder ``Attention``.

    Same constructor arguments and parameter names (``qkv``, ``proj``, ``rel_pos_h``, ``rel_pos_w``),
    so a pretrained block's ``attn`` state_dict loads unchanged; input and output are (B, Hg, Wg, C).
    ``pattern`` is a :class:`sam_fast.Branch` or list of them over the (Hg, Wg) token grid (2-D
    branches) or the row-major token sequence (1-D); None is dense attention, i.e. exactly
    segment_anything's global ``Attention``.

    Args:
        dim, num_heads, qkv_bias, use_rel_pos, rel_pos_zero_init, input_size: as segment_anything.
        pattern: the dilated pattern.
        backend: handed to :func:`sam_fast.dilated_attention`.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, use_rel_pos: bool = False,
                 rel_pos_zero_init: bool = True, input_size: Optional[Tuple[int, int]] = None, *,
                 pattern=None, backend: str = "auto"):
        super().__init__()
        if not isinstance(dim, int) or not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim must be a positive multiple of num_heads, got dim={dim!r}, num_heads={num_heads!r}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size must be given when use_rel_pos=True (the rel-pos tables' grid)")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
            if not rel_pos_zero_init:
                nn.init.trunc_normal_(self.rel_pos_h, std=0.02)
                nn.init.trunc_normal_(self.rel_pos_w, std=0.02)
        self.pattern = check_pattern(pattern, "pattern")
        self.backend = check_backend_name(backend)

    @classmethod
    def from_attention(cls, attn: nn.Module, pattern=None, backend: str = "auto") -> "DilatedAttention":
        """Wrap an existing segment_anything ``Attention``, sharing (not copying) its parameters."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_heads, new.scale = attn.num_heads, attn.scale
        new.qkv, new.proj = attn.qkv, attn.proj
        new.use_rel_pos = bool(getattr(attn, "use_rel_pos", False))
        if new.use_rel_pos:
            new.rel_pos_h, new.rel_pos_w = attn.rel_pos_h, attn.rel_pos_w
        new.pattern = check_pattern(pattern, "pattern")
        new.backend = check_backend_name(backend)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.qkv.in_features:
            raise ValueError(f"x must be (B, Hg, Wg, C) with C = dim = {self.qkv.in_features}, got shape "
                             f"{tuple(x.shape)}")
        pattern = self.pattern if self.pattern is not None else Branch((x.shape[1], x.shape[2]))  # dense
        return sam_attention(self, x, 0, self.backend, pattern)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, pattern={self.pattern}, backend={self.backend!r}"
