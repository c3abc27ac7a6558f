"""SAM's last mask-decoder step fused: final upscaling convolution, GELU and hypernetwork mask product.

segment_anything's ``MaskDecoder`` ends with

    up   = GELU(ConvTranspose2d(C/4 -> C/8, kernel 2, stride 2)(x))        (P, C/8, 2h, 2w)
    mask = hyper @ up.view(P, C/8, 4hw)                                     (P, M, 2h, 2w)

where x (P, C/4, h, w) is the first upscaling stage's output (128 x 128 for SAM) and hyper (P, M, C/8)
the hypernetwork MLPs' outputs for the M masks asked for. ``up`` is the largest tensor of the decoder
(32 x 256 x 256 per prompt: 4 MB in bf16, written once and read once). Here it never leaves registers:
a program takes BLOCK_N input pixels of one prompt, and for each of the kernel's four taps (a, b)

    y = GELU(x_tile @ W[:, :, a, b] + bias)       (BLOCK_N, C/8)   tl.dot, fp32 accumulation
    o = y @ hyper[p]^T                              (BLOCK_N, M)     tl.dot, y cast to the input dtype
                                                                      (as the unfused bf16 model does)

and stores o at output pixels (2i + a, 2j + b). SAM 2's decoder adds a high-resolution skip feature before
that GELU (``GELU(conv(x) + bias + skip[image])``, the stride-4 features of its image encoder): with
HAS_SKIP the kernel reads skip (I, COUT, 2h, 2w) at the prompt's image ``skip_index[p]``, so the
per-prompt copy of the image's skip features is never made either. Tensor contract (validated by
:mod:`sam_fast.ops.upscale_mask_product`): x (P, CIN, h, w) contiguous; weight (CIN, COUT, 2, 2) contiguous (the
ConvTranspose2d layout); bias (COUT,); hyper (P, M, COUT) contiguous; skip (I, COUT, 2h, 2w) contiguous and
skip_index (P,) int64 in [0, I) when HAS_SKIP; out (P, M, 2h, 2w) contiguous, float32/float16/bfloat16, all one
dtype except fp32 bias handling inside.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._arch import COMPILE_OPTIONS
from ._interpreter import interpreting as _interpreting
from ._tl import dot as _dot
from ._tl import precision as _precision
from ._tl import upcast as _upcast


@triton.jit
def _round_bf16(y, UPCAST: tl.constexpr):
    """Round fp32 ``y`` to the nearest-even bfloat16 value, kept in fp32. Needed only under the Triton
    interpreter (UPCAST), whose fp32 -> bf16 conversion truncates; on a GPU the cast itself rounds to
    nearest even, so this is the identity there."""
    if UPCAST:
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        y = bits.to(tl.float32, bitcast=True)
    return y


@triton.jit
def _upscale_mask_product_kernel(x_ptr, w_ptr, b_ptr, hyper_ptr, skip_ptr, skip_index_ptr, out_ptr, HW, W_IN, M,
                                 CIN: tl.constexpr, COUT: tl.constexpr, CIN_P: tl.constexpr,
                                 COUT_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                                 HAS_SKIP: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_n = tl.program_id(0)
    p = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < HW
    ci = tl.arange(0, CIN_P)
    co = tl.arange(0, COUT_P)
    mm = tl.arange(0, BLOCK_M)
    x = tl.load(x_ptr + p * CIN * HW + ci[None, :] * HW + offs_n[:, None],
                mask=n_ok[:, None] & (ci[None, :] < CIN), other=0.0)
    hyper = tl.load(hyper_ptr + p * M * COUT + mm[:, None] * COUT + co[None, :],
                    mask=(mm[:, None] < M) & (co[None, :] < COUT), other=0.0)
    bias = tl.load(b_ptr + co, mask=co < COUT, other=0.0).to(tl.float32)
    row = offs_n // W_IN
    col = offs_n - row * W_IN
    out_base = out_ptr + p * M * (4 * HW) + mm[None, :] * (4 * HW)
    if HAS_SKIP:
        skip_base = skip_ptr + tl.load(skip_index_ptr + p) * (COUT * 4 * HW) + co[None, :] * (4 * HW)
    for a in tl.static_range(2):
        for b in tl.static_range(2):
            w = tl.load(w_ptr + ci[:, None] * (COUT * 4) + co[None, :] * 4 + (a * 2 + b),
                        mask=(ci[:, None] < CIN) & (co[None, :] < COUT), other=0.0)
            y = _dot(x, w, PREC, UPCAST) + bias[None, :]
            pix = (2 * row + a) * (2 * W_IN) + (2 * col + b)
            if HAS_SKIP:
                y += tl.load(skip_base + pix[:, None], mask=n_ok[:, None] & (co[None, :] < COUT),
                             other=0.0).to(tl.float32)
            y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))  # nn.GELU(): the exact erf form
            # Padded channels hold GELU(0) = 0, so they add nothing to the product below.
            o = _dot(_round_bf16(y, UPCAST).to(x_ptr.dtype.element_ty), tl.trans(hyper), PREC, UPCAST)
            tl.store(out_base + pix[:, None], _round_bf16(o, UPCAST).to(out_ptr.dtype.element_ty),
                     mask=n_ok[:, None] & (mm[None, :] < M))


_MAX_GRID_Y = 65535  # CUDA's limit on a launch grid's y and z dimensions


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def upscale_mask_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, hyper: torch.Tensor,
                         skip: Optional[torch.Tensor] = None,
                         skip_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launch: ``hyper @ GELU(conv_transpose2d(x, weight, bias, stride=2) [+ skip[skip_index]])`` -> (P, M, 2h, 2w)."""
    P, CIN, h, w = x.shape
    COUT = weight.shape[1]
    M = hyper.shape[1]
    out = torch.empty((P, M, 2 * h, 2 * w), device=x.device, dtype=x.dtype)
    if P == 0 or M == 0:
        return out
    HW = h * w
    CIN_P, COUT_P = _pow2_at_least_16(CIN), _pow2_at_least_16(COUT)
    # 64 input pixels -> 256 outputs per mask per program; the x tile (64 x CIN_P) and one weight tap
    # (CIN_P x COUT_P) stay in registers. fp32 (IEEE dots on FMA units) takes 16 pixels: at 64 the
    # sm_90 compile spills about 8 KB per thread (tools/aot_compile.py).
    BLOCK_N = 16 if x.dtype == torch.float32 and not _interpreting() else 64 if CIN_P <= 64 else 32
    for p0 in range(0, P, _MAX_GRID_Y):  # the grid's second dimension holds at most 65535 prompts
        p1 = min(P, p0 + _MAX_GRID_Y)
        _upscale_mask_product_kernel[(triton.cdiv(HW, BLOCK_N), p1 - p0)](
            x[p0:p1], weight, bias, hyper[p0:p1], x if skip is None else skip,
            x if skip_index is None else skip_index[p0:p1], out[p0:p1], HW, w, M, CIN=CIN, COUT=COUT, CIN_P=CIN_P,
            COUT_P=COUT_P, BLOCK_N=BLOCK_N, BLOCK_M=_pow2_at_least_16(M), HAS_SKIP=skip is not None,
            PREC=_precision(x.dtype),
            UPCAST=_upcast(x.dtype), num_warps=4, **COMPILE_OPTIONS)
    return out
