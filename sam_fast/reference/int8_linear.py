"""Plain-PyTorch W8A8 quantization and int8 GEMM: the CPU backend, the test oracle, the bench baseline.

The numerics are those of the Triton kernels in :mod:`sam_fast.kernels.int8_linear`, operation for
operation, so results match across backends:

* ``quantize``: ``clamp(round(x / scale), -127, 127)`` in fp32 (IEEE division, ties to even);
  per-token scale ``max|x| / 127`` (1 for an all-zero row).
* non-finite inputs: int8 holds no NaN, so a NaN quantizes to 0 and +-inf saturates to +-127; a row
  holding either gets a NaN scale (per-token, or in place of the static one: :func:`static_row_scale`), so its
  output row is NaN, as a float linear's would be, rather than finite numbers computed from the rest of the row.
  An int8 *output* cannot carry NaN: a NaN row re-quantized for the next GEMM becomes zeros.
* int8 matmul: exact, ``torch._int_mm`` (int32 accumulation; on the CPU for K >= 2) or, for shapes
  it refuses on CUDA, a float64 matmul: every product of two int8 values and every partial sum up to
  ``K * 127**2 < 2**53`` is an exact float64 integer, so the result equals the int32 accumulator for
  any K below ``MAX_K`` (where int32 itself would overflow).
* epilogue: ``((float(acc) * a_scale) * w_scale) + bias`` in fp32, exact-erf GELU, then a cast or a
  re-quantization with a static scale.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

QMAX = 127
MAX_K = (2**31 - 1) // (QMAX * QMAX)  # larger K could overflow the int32 accumulator


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 ``clamp(round(x / scale))`` in fp32; ``scale`` broadcasts against ``x``. NaN -> 0, +-inf -> +-127."""
    y = torch.round(x.float() / scale)
    return torch.nan_to_num_(y, nan=0.0, posinf=QMAX, neginf=-QMAX).clamp_(-QMAX, QMAX).to(torch.int8)


def row_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-row (last dim) symmetric scale ``max|x| / 127`` in fp32; 1 for an all-zero row, NaN for a row
    holding NaN or +-inf (its output row is then NaN)."""
    amax = x.float().abs().amax(dim=-1)
    # a tensor divisor: PyTorch's CUDA division by a Python scalar multiplies by its reciprocal, which
    # rounds differently from the kernels' IEEE division
    scale = amax / amax.new_tensor(float(QMAX))
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.where(torch.isfinite(amax), scale, torch.full_like(scale, float("nan")))


def quantize_per_token(x: torch.Tensor):
    """``(q, scale)``: int8 ``q`` shaped like ``x`` and fp32 ``scale`` shaped ``x.shape[:-1]``."""
    scale = row_scale(x)
    return quantize(x, scale.unsqueeze(-1)), scale


def quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 ``x`` with one calibrated fp32 scale (a 0-d tensor) for the whole tensor."""
    return quantize(x, scale.float())


def static_row_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The per-row scale a statically quantized ``x`` goes into the GEMM with: the calibrated ``scale`` for every
    row, NaN for a row holding NaN or +-inf (its output row is then NaN, as with per-token scales)."""
    finite = torch.isfinite(x.float()).all(dim=-1)
    s = scale.float().reshape(())
    return torch.where(finite, s, torch.full_like(s, float("nan")))


def quantize_weight(weight: torch.Tensor):
    """Per-output-channel symmetric int8 of an nn.Linear weight (N, K): ``(w_int8 (N, K), scale (N,))``."""
    return quantize_per_token(weight.detach())


def layer_norm_quantize(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                        eps: float):
    """LayerNorm over the last dim in fp32, then per-token int8: ``(q, scale)``."""
    y = F.layer_norm(x.float(), (x.shape[-1],), None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    return quantize_per_token(y)


def int8_mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact ``a (M, K) int8 @ w (N, K) int8 ^T`` as int32 (K <= MAX_K).

    ``torch._int_mm`` (int32 accumulation) where it is right for the shapes - on the CPU any K >= 2 (with
    K = 1 and N >= 2 it returns memory it never wrote), on CUDA M > 16 and K, N multiples of 8 - else a
    float64 matmul, exact as well (products and sums of int8 stay far below 2**53)."""
    M, K = a.shape
    N = w.shape[0]
    if (a.device.type == "cpu" and K >= 2) or (a.device.type == "cuda" and M > 16 and K % 8 == 0 and N % 8 == 0):
        return torch._int_mm(a, w.t())
    return (a.double() @ w.double().t()).to(torch.int32)


def int8_gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
              bias: Optional[torch.Tensor] = None, activation: Optional[str] = None,
              out_dtype: torch.dtype = torch.float32, out_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The kernel's contract (see :func:`sam_fast.kernels.int8_linear.int8_gemm`) in plain PyTorch."""
    acc = int8_mm(a, w)
    if out_dtype == torch.int32:
        return acc
    a_scale = a_scale.float()
    y = acc.float() * (a_scale.unsqueeze(-1) if a_scale.dim() == 1 else a_scale)
    y = y * w_scale.float()
    if bias is not None:
        y = y + bias.float()
    if activation == "gelu":
        y = F.gelu(y)
    if out_dtype == torch.int8:
        return quantize(y, out_scale.float())
    return y.to(out_dtype)
