"""Translations of sam_fast's custom ops into standard ONNX ops (opset 18), for ``torch.onnx.export(dynamo=True)``.

:func:`sam_fast.exporting.export` traces a model for ONNX with the CPU paths that keep every op in the graph
either a plain ATen op (which the exporter translates itself: attention is MatMul / Add / Softmax, dilated
attention the gather -> attention -> scatter of its segments) or one of the ops below. The W8A8 linears stay
integer: the activations are quantised per token (or with their calibrated scale) by ``QuantizeLinear``, the
GEMM is ``MatMulInteger`` (int8 x int8 -> int32) and the epilogue dequantises, so ONNX Runtime and OpenVINO run
the same integer arithmetic as the C++ and Triton kernels. A rel-pos table a dilated pattern widens is resized by
``sam_fast::resize_rel_pos``, translated into two gathers and their interpolation weights.

Each function is traced by the exporter (the ``op.*`` calls record nodes; Python arguments that are ONNX
attributes - flags, dtypes, epsilons - are plain values). The numerics follow
:mod:`sam_fast.reference.int8_linear`: ``scale = max|x| / 127`` per row (1 for a zero row),
``q = clamp(round(x / scale), -127, 127)``, ``y = ((float(acc) * a_scale) * w_scale) + bias`` [-> exact GELU].
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from onnxscript import FLOAT, INT8, INT32, ir
from onnxscript import opset18 as op

QMAX = 127.0


def _vec(*values: int):
    return op.Constant(value=ir.tensor(list(values), dtype=ir.DataType.INT64))


def _scalar(value: float):
    return op.Constant(value=ir.tensor(value, dtype=ir.DataType.FLOAT))


def _row_scale(x):
    """(M, K) float -> (M,) float32: max|x| / 127, 1 for an all-zero row, NaN for a row holding NaN or +-inf."""
    xf = op.Cast(x, to=ir.DataType.FLOAT)
    amax = op.ReduceMax(op.Abs(xf), _vec(-1), keepdims=0)
    scale = op.Div(amax, _scalar(QMAX))
    scale = op.Where(op.Equal(scale, _scalar(0.0)), _scalar(1.0), scale)
    return op.Where(_finite_rows(xf), scale, _scalar(float("nan")))


def _finite_rows(xf):
    """(M, K) float32 -> (M,) bool: the rows holding no NaN and no inf (read from the elements: a runtime's ReduceMax
    may skip NaN)."""
    bad = op.Cast(op.Or(op.IsNaN(xf), op.IsInf(xf)), to=ir.DataType.FLOAT)
    return op.Equal(op.ReduceMax(bad, _vec(-1), keepdims=0), _scalar(0.0))


def _quantize(x, scale):
    """int8 clamp(round(x / scale), -127, 127); ``scale`` broadcasts against x; NaN -> 0, +-inf -> +-127."""
    y = op.Round(op.Div(op.Cast(x, to=ir.DataType.FLOAT), scale))
    y = op.Where(op.IsNaN(y), _scalar(0.0), y)
    y = op.Clip(y, _scalar(-QMAX), _scalar(QMAX))
    return op.Cast(y, to=ir.DataType.INT8)


def quantize_per_token(x: FLOAT):
    """``sam_fast::quantize_per_token(x (M, K)) -> (q int8 (M, K), scale float32 (M,))``."""
    scale = _row_scale(x)
    return _quantize(x, op.Unsqueeze(scale, _vec(-1))), scale


def quantize_static(x: FLOAT, scale: FLOAT):
    """``sam_fast::quantize_static(x (M, K), scale ()) -> (q int8, row scale (M,))``: NaN scale for a non-finite
    row."""
    xf = op.Cast(x, to=ir.DataType.FLOAT)
    s = op.Cast(scale, to=ir.DataType.FLOAT)
    row_ok = _finite_rows(xf)
    rows = op.Expand(s, op.Shape(row_ok))
    return _quantize(x, s), op.Where(row_ok, rows, _scalar(float("nan")))


def layer_norm_quantize(x: FLOAT, weight: Optional[FLOAT], bias: Optional[FLOAT], eps: float):
    """``sam_fast::layer_norm_quantize``: LayerNorm over the last dim in float32, then per-token int8."""
    xf = op.Cast(x, to=ir.DataType.FLOAT)
    width = op.Slice(op.Shape(xf), _vec(-1), _vec(2**62))
    if weight is None:
        weight = op.Expand(_scalar(1.0), width)
    if bias is None:
        bias = op.Expand(_scalar(0.0), width)
    y = op.LayerNormalization(xf, op.Cast(weight, to=ir.DataType.FLOAT), op.Cast(bias, to=ir.DataType.FLOAT),
                              axis=-1, epsilon=eps)
    if isinstance(y, (tuple, list)):  # (Y, Mean, InvStdDev): the normalised rows are the first
        y = y[0]
    return quantize_per_token(y)


def _matmul_integer(a, b):
    """int8 (M, K) @ int8 (K, N) -> exact int32, as ``MatMulInteger`` of ``a + 128`` as uint8 with zero point 128:
    the same integers (``(a + 128) - 128 = a``), in the unsigned x signed form the runtimes' fast int8 GEMMs take
    (x86's VNNI multiplies u8 by s8; ONNX Runtime's s8 x s8 path is several times slower)."""
    offset = op.Constant(value=ir.tensor(128, dtype=ir.DataType.INT16))
    shifted = op.Cast(op.Add(op.Cast(a, to=ir.DataType.INT16), offset), to=ir.DataType.UINT8)
    zero = op.Constant(value=ir.tensor(128, dtype=ir.DataType.UINT8))
    return op.MatMulInteger(shifted, b, zero)


def int_mm(a: INT8, b: INT8):
    """``aten::_int_mm(a (M, K) int8, b (K, N) int8) -> int32``: ``MatMulInteger``."""
    return _matmul_integer(a, b)


def _epilogue(acc, a_scale, w_scale, bias, gelu: bool, out_dtype, out_scale):
    y = op.Mul(op.Cast(acc, to=ir.DataType.FLOAT), op.Reshape(op.Cast(a_scale, to=ir.DataType.FLOAT), _vec(-1, 1)))
    y = op.Mul(y, op.Cast(w_scale, to=ir.DataType.FLOAT))
    if bias is not None:
        y = op.Add(y, op.Cast(bias, to=ir.DataType.FLOAT))
    if gelu:  # exact GELU (opset 18 has no Gelu op)
        y = op.Mul(op.Mul(y, _scalar(0.5)), op.Add(op.Erf(op.Div(y, _scalar(math.sqrt(2.0)))), _scalar(1.0)))
    dtype = _onnx_dtype(out_dtype)
    if dtype == ir.DataType.INT8:
        return _quantize(y, op.Cast(out_scale, to=ir.DataType.FLOAT))
    if dtype == ir.DataType.INT32:
        return acc
    return op.Cast(y, to=dtype)


def _onnx_dtype(dtype) -> ir.DataType:
    if isinstance(dtype, torch.dtype):
        from torch.onnx._internal.exporter._core import torch_dtype_to_onnx_dtype

        return torch_dtype_to_onnx_dtype(dtype)
    return ir.DataType(int(dtype))


def int8_epilogue(acc: INT32, a_scale: FLOAT, w_scale: FLOAT, bias: Optional[FLOAT], gelu: bool, out_dtype: int,
                  out_scale: Optional[FLOAT]):
    """``sam_fast::int8_epilogue``: the int32 accumulator dequantised (+ bias [-> GELU]) to ``out_dtype``."""
    return _epilogue(acc, a_scale, w_scale, bias, gelu, out_dtype, out_scale)


def int8_linear(a: INT8, a_scale: FLOAT, w: INT8, w_scale: FLOAT, bias: Optional[FLOAT], activation: Optional[str],
                out_dtype: int, out_scale: Optional[FLOAT]):
    """``sam_fast::int8_linear`` (the GPU path's GEMM): ``MatMulInteger(a, w^T)`` and the epilogue."""
    acc = _matmul_integer(a, op.Transpose(w, perm=[1, 0]))
    return _epilogue(acc, a_scale, w_scale, bias, activation == "gelu", out_dtype, out_scale)


def resize_rel_pos(rel_pos: FLOAT, length: int):
    """``sam_fast::resize_rel_pos(rel_pos (L, C), length) -> (length, C)``: segment_anything's linear resize
    (``F.interpolate(mode="linear", align_corners=False)``) as two row gathers and their weights, which depend on L
    and length only (both fixed when a model is exported): ``w0 * rel_pos[i0] + w1 * rel_pos[i1]``."""
    L = rel_pos.shape[0] if rel_pos.shape is not None else None
    if not isinstance(L, int):
        raise ValueError("sam_fast::resize_rel_pos exports for a table of fixed length only")
    # float32 throughout, as PyTorch's CPU kernel computes the source positions and weights
    scale = np.float32(np.float32(L) / np.float32(length))
    src = np.maximum(scale * (np.arange(length, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), L - 1)
    i1 = np.minimum(i0 + 1, L - 1)
    lam = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    w0 = (np.float32(1.0) - lam)[:, None]
    w1 = lam[:, None]
    x = op.Cast(rel_pos, to=ir.DataType.FLOAT)
    rows0 = op.Gather(x, op.Constant(value=ir.tensor(i0)), axis=0)
    rows1 = op.Gather(x, op.Constant(value=ir.tensor(i1)), axis=0)
    return op.Add(op.Mul(rows0, op.Constant(value=ir.tensor(w0))), op.Mul(rows1, op.Constant(value=ir.tensor(w1))))


def translation_table() -> dict:
    """``{op overload: translation}`` for ``torch.onnx.export(custom_translation_table=...)``; the C++ extension
    is loaded first, so that every ``sam_fast::`` op it defines resolves."""
    from .ops import int8_linear as _int8  # noqa: F401  (registers the ops' schemas and fakes)
    from .ops import resize_rel_pos as _resize  # noqa: F401

    ops = torch.ops.sam_fast
    return {
        ops.quantize_per_token.default: quantize_per_token,
        ops.quantize_static.default: quantize_static,
        ops.layer_norm_quantize.default: layer_norm_quantize,
        ops.int8_epilogue.default: int8_epilogue,
        ops.int8_linear.default: int8_linear,
        ops.resize_rel_pos.default: resize_rel_pos,
        torch.ops.aten._int_mm.default: int_mm,
    }


__all__ = ["translation_table"]
