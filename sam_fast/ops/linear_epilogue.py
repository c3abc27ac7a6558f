"""``nn.Linear`` on the CPU at inference with what follows it fused: ``act(x W^T + b) + residual``.

PyTorch's CPU ``addmm`` copies the broadcast bias into the whole output before the GEMM runs on top of it, and a
GELU or a residual add after the layer is another full pass each. In a ViT-B block on SAM's 64 x 64 grid those
passes over the 4096 x 3072 hidden tensor cost about as much as the attention itself. :func:`fused_linear` runs
the GEMM without a bias and hands its output to :func:`linear_epilogue_`, which adds the bias, applies the
activation and adds the residual in place.

Where PyTorch has oneDNN (``torch.ops.mkldnn._linear_pointwise``, the op Inductor lowers CPU linears to) and the CPU
policy's ``fp32_gemm_onednn`` is on, eager inference instead runs oneDNN's float32 GEMM with the bias, GELU or residual
add as its post-ops, applied per tile while the tile is still in cache: one call, no separate pass. At ViT-B's
shapes it is 10-15% faster than ATen's ``addmm`` (MKL's sgemm) on the AVX-512 EPYC that sam_fast is measured on
(bench_linear_epilogue.py). Traces keep the bias-free GEMM and ``linear_epilogue_``: an AOTInductor package calls the
C++ epilogue, torch.compile fuses its own.

Backends of :func:`linear_epilogue_` (``sam_fast._dispatch``): ``cpu``, the C++ op ``sam_fast::linear_epilogue_``
(csrc/cpu/linear_epilogue.cpp; a cache-sized block of rows at a time, ATen's own kernels on each block), CPU tensors
autograd does not track; ``reference`` (:mod:`sam_fast.reference.linear_epilogue`), PyTorch's ops, copied back.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import cpu_policy
from .._dispatch import Backend, Refusal, aoti_export, dispatch, note_call
from .._hooks import has_hooks
from ..reference import linear_epilogue as _ref
from ._ext import cpp_device_refusal, extension_error, register_fake

#: the dtypes :func:`fused_linear` takes: bf16 linears gain nothing from it (oneDNN adds their bias inside its own
#: GEMM), and rounding the GEMM to bf16 before the bias would round twice
EPILOGUE_DTYPES = (torch.float32,)

ACTIVATIONS = _ref.ACTIVATIONS


@register_fake("sam_fast::linear_epilogue_")
def _(y, bias, activation, residual):
    return None


def _cpu_supports(y, bias, activation, residual, *, explicit):
    refusal = cpp_device_refusal(y, "cpu")
    if refusal is None and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (y, bias, residual)):
        refusal = Refusal("the C++ kernel writes in place and has no backward; autograd is recording",
                          wrong_device=True)
    return refusal


def _cpu_run(y, bias, activation, residual):
    torch.ops.sam_fast.linear_epilogue_(y, bias, activation, residual)
    return y


def _reference_run(y, bias, activation, residual):
    return y.copy_(_ref.linear_epilogue(y, bias, activation, residual))


_TABLE = (
    Backend("cpu", _cpu_supports, _cpu_run),
    Backend("reference", lambda *a, explicit: None, _reference_run),
)


def linear_epilogue_(y: torch.Tensor, bias: Optional[torch.Tensor], activation: str = "none",
                     residual: Optional[torch.Tensor] = None, *, backend: str = "auto") -> torch.Tensor:
    """``y = act(y + bias) + residual`` in place, and returns ``y``: y (..., N) contiguous floating point; bias (N,)
    or None; activation ``"none"``, ``"gelu"`` (exact) or ``"gelu_tanh"``; residual shaped like y, or None."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if not y.is_floating_point() or y.dim() < 1 or not y.is_contiguous():
        raise ValueError(f"y must be a contiguous floating-point tensor with a last dim, got {y.dtype} "
                         f"{tuple(y.shape)}{'' if y.is_contiguous() else ', not contiguous'}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    for name, t, shape in (("bias", bias, (y.shape[-1],)), ("residual", residual, tuple(y.shape))):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != shape or t.dtype != y.dtype or t.device != y.device:
            raise ValueError(f"{name} must be a {shape} {y.dtype} tensor on {y.device}, got {tuple(t.shape)} "
                             f"{t.dtype} on {t.device}")
    return dispatch("linear_epilogue_", _TABLE, backend, y, bias, activation, residual)


#: oneDNN's post-op for each activation: (attr, scalars, algorithm)
_ONEDNN_POST = {"none": ("none", [], ""), "gelu": ("gelu", [], "none"), "gelu_tanh": ("gelu", [], "tanh")}
_onednn_present: Optional[bool] = None


def _onednn_linear_present() -> bool:
    """Whether this PyTorch has oneDNN's CPU linear (``torch.ops.mkldnn._linear_pointwise``)."""
    global _onednn_present
    if _onednn_present is None:
        try:
            _onednn_present = bool(torch.backends.mkldnn.is_available()) and \
                torch.ops.mkldnn._linear_pointwise.default is not None
        except (AttributeError, RuntimeError):
            _onednn_present = False
    return _onednn_present


def onednn_gemm_wanted(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a float32 (or bfloat16) CPU linear of ``x`` by ``weight`` runs oneDNN's GEMM here: the policy's
    ``fp32_gemm_onednn`` (``bf16_gemm_onednn``, on a CPU that multiplies bf16 in hardware), oneDNN present and not
    switched off (``torch.backends.mkldnn``), eager inference (no trace, nothing for autograd to record: the op has no
    backward)."""
    if x.dtype != weight.dtype or x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu" \
            or weight.dim() != 2:
        return False
    if weight.numel() == 0:  # (oneDNN has no primitive for an empty reduction or output width)
        return False
    policy = cpu_policy.policy()
    if x.dtype == torch.bfloat16:
        from .dilated_attention_cpu import compute_dtype  # (bf16 in hardware: AMX or AVX512-BF16)

        if not (policy.bf16_gemm_onednn and compute_dtype(torch.bfloat16) == torch.bfloat16):
            return False
    if not policy.fp32_gemm_onednn or not torch.backends.mkldnn.enabled:
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or aoti_export():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    return _onednn_linear_present()


def gemm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight^T`` without a bias: oneDNN's GEMM where :func:`onednn_gemm_wanted`, else ``F.linear``."""
    if onednn_gemm_wanted(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return F.linear(x, weight)


def fused_linear(lin: nn.Module, x: torch.Tensor, activation: str = "none",
                 residual: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """``activation(lin(x)) + residual`` in one oneDNN call with post-ops (:func:`onednn_gemm_wanted`, any size; an
    activation and a residual together excepted) or in one pass after a bias-free GEMM, or None where neither applies
    (the caller then runs the module itself): ``lin`` a plain ``nn.Linear`` without hooks, x a CPU tensor in
    :data:`EPILOGUE_DTYPES` matching its weight, nothing for autograd to record, not while torch.compile traces (but
    while it traces for an AOTInductor package), the C++ extension loaded; on the epilogue path an output of at least
    the policy's ``epilogue_min_bytes`` (:mod:`sam_fast.cpu_policy`; any size in a trace for an AOTInductor package).
    ``activation``: ``"none"``, ``"gelu"`` (exact) or ``"gelu_tanh"``; ``residual`` shaped like the output, in its
    dtype."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if type(lin) is not nn.Linear or x.device.type != "cpu" or has_hooks(lin):
        return None
    if x.dtype != lin.weight.dtype or (torch.compiler.is_compiling() and not aoti_export()):
        return None
    if x.dtype not in EPILOGUE_DTYPES and not onednn_gemm_wanted(x, lin.weight):  # bf16: the oneDNN path only
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, lin.weight, lin.bias, residual)):
        return None
    if extension_error() is not None:
        return None
    if residual is not None and (residual.dtype != x.dtype or residual.shape[:-1] != x.shape[:-1]
                                 or residual.shape[-1] != lin.out_features):
        return None
    if onednn_gemm_wanted(x, lin.weight) and (residual is None or activation == "none"):
        note_call("fused_linear", "onednn")
        if residual is None:
            return torch.ops.mkldnn._linear_pointwise(x, lin.weight, lin.bias, *_ONEDNN_POST[activation])
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual.contiguous(), lin.weight, lin.bias, "add")
    rows = x.numel() // max(1, x.shape[-1])
    # (a package serves every batch its batch axis allows: no size rule that would guard on it)
    if not aoti_export() and rows * lin.out_features * x.element_size() < cpu_policy.policy().epilogue_min_bytes:
        return None
    note_call("fused_linear", "epilogue")
    y = F.linear(x, lin.weight)
    if not y.is_contiguous():
        y = y.contiguous()
    if residual is not None:
        residual = residual.reshape(y.shape) if residual.is_contiguous() else residual.contiguous().reshape(y.shape)
    return linear_epilogue_(y, lin.bias, activation, residual, backend="cpu")
