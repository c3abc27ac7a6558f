"""W8A8 ops: ``sam_fast.quantize_per_token``, ``sam_fast.layer_norm_quantize``, ``sam_fast.int8_linear``.

Layers: ``sam_fast::quantize_per_token``, ``sam_fast::quantize_static``, ``sam_fast::layer_norm_quantize`` (schemas in
the C++ library, so that AOTInductor packages can call them; defined here when it did not load) and
``sam_fast::int8_linear`` (a ``torch.library.custom_op``) are ops with fakes registered here (inference ops: no
autograd; a backward through them raises PyTorch's "no autograd formula" error). Each has one schema for every device:
the Triton launchers of :mod:`sam_fast.kernels.int8_linear` are their CUDA kernels, and the three quantisations' CPU
kernels are C++ (``csrc/cpu/int8_linear.cpp``, registered under the same names; one pass per quantisation, LayerNorm
fused into it). The CPU GEMM is ``torch._int_mm`` with the CPU-only ``sam_fast::int8_epilogue`` after it, or the AMX
GEMM ``sam_fast::int8_linear_amx`` on the weight's ``sam_fast::int8_pack_amx`` panels. The public functions validate,
flatten leading dims, pick a backend (``auto | triton | cpu | reference``) and run it. The plain-PyTorch reference,
which shares the kernels' numerics operation for operation, is :mod:`sam_fast.reference.int8_linear`; every backend has
its numerics. Under the Triton interpreter (CPU tensors, tests) the ``triton`` backend calls the launchers directly: the
ops' CPU kernels are the C++ ones.

Quantization scheme (docs/maintainers/design.md, "W8A8 linear"): weights int8 symmetric per output channel; activations
int8 symmetric per token (dynamic; the default) or per tensor with a calibrated scale (static); int32 accumulation; the
epilogue dequantizes, adds the bias, applies GELU and casts or re-quantizes for the next GEMM.
"""

from __future__ import annotations

import functools
import math
import numbers
import threading
import weakref
from typing import Optional, Tuple

import torch
from torch.library import triton_op

from .. import cpu_features, cpu_policy
from .._dispatch import Backend, Refusal, dispatch, export_target, note_call, triton_device_refusal, triton_op_wanted
from ..kernels import int8_linear as _k
from ..kernels._cache import persistent
from ..reference import int8_linear as _ref
from ._ext import cpp_device_refusal, extension_error, register_fake

Tensor = torch.Tensor
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_OUT_DTYPES = _FLOATS + (torch.int8, torch.int32)
MAX_ROW = 16384  # widest row the single-pass quantization kernels hold in registers


# ------------------------------------------------------------------------------------------------
# Custom ops (2-D, validated inputs)
# ------------------------------------------------------------------------------------------------


def _define(name: str, schema: str):
    """The op ``sam_fast::name``: its schema is the C++ library's (csrc/ops.cpp, so that AOTInductor packages find
    it), defined here only when the extension did not load (the Triton kernels still serve CUDA tensors then)."""
    if extension_error() is not None:
        torch.library.define(f"sam_fast::{name}", schema)
    return getattr(torch.ops.sam_fast, name).default


_quantize_per_token_op = _define("quantize_per_token", "(Tensor x) -> (Tensor, Tensor)")
_quantize_static_op = _define("quantize_static", "(Tensor x, Tensor scale) -> (Tensor, Tensor)")
_layer_norm_quantize_op = _define("layer_norm_quantize",
                                  "(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor)")


@torch.library.register_kernel("sam_fast::quantize_per_token", "cuda")
def _(x: Tensor) -> Tuple[Tensor, Tensor]:
    return _k.quantize_rows(x)


@torch.library.register_kernel("sam_fast::quantize_static", "cuda")
def _(x: Tensor, scale: Tensor) -> Tuple[Tensor, Tensor]:
    return _k.quantize_rows(x, scale)


@torch.library.register_kernel("sam_fast::layer_norm_quantize", "cuda")
def _(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor]:
    return _k.layer_norm_quantize(x, weight, bias, eps)


@torch.library.register_fake("sam_fast::quantize_per_token")
def _(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.register_fake("sam_fast::quantize_static")
def _(x, scale):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.register_fake("sam_fast::layer_norm_quantize")
def _(x, weight, bias, eps):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("sam_fast::int8_linear", mutates_args=())
def _int8_gemm_op(a: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                  activation: Optional[str], out_dtype: torch.dtype, out_scale: Optional[Tensor]) -> Tensor:
    return _k.int8_gemm(a, a_scale, w, w_scale, bias, activation, out_dtype, out_scale)


@_int8_gemm_op.register_fake
def _(a, a_scale, w, w_scale, bias, activation, out_dtype, out_scale):
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)


# The same four CUDA kernels as ``torch.library.triton_op``s, for AOTInductor packages of CUDA models (see
# :func:`sam_fast._dispatch.triton_op_wanted`): Inductor traces their bodies, sees the Triton launches and compiles
# the kernels into the package, which then needs neither Python nor sam_fast. Their fakes are their bodies run on fake
# tensors, which the Triton interpreter cannot do: CPU tests and torch.compile keep the custom ops above.


@triton_op("sam_fast::triton_quantize_per_token", mutates_args=())
def _quantize_per_token_twin(x: Tensor) -> Tuple[Tensor, Tensor]:
    return _k.quantize_rows(x, traceable=True)


@triton_op("sam_fast::triton_quantize_static", mutates_args=())
def _quantize_static_twin(x: Tensor, scale: Tensor) -> Tuple[Tensor, Tensor]:
    return _k.quantize_rows(x, scale, traceable=True)


@triton_op("sam_fast::triton_layer_norm_quantize", mutates_args=())
def _layer_norm_quantize_twin(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                              eps: float) -> Tuple[Tensor, Tensor]:
    return _k.layer_norm_quantize(x, weight, bias, eps, traceable=True)


@triton_op("sam_fast::triton_int8_linear", mutates_args=())
def _int8_gemm_twin(a: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                    activation: Optional[str], out_dtype: torch.dtype, out_scale: Optional[Tensor]) -> Tensor:
    return _k.int8_gemm(a, a_scale, w, w_scale, bias, activation, out_dtype, out_scale, traceable=True)


# ------------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------------


def _rows_supports(x, *args, explicit, **kwargs):
    refusal = triton_device_refusal(x, explicit)
    if refusal is None and x.shape[-1] > MAX_ROW:
        refusal = Refusal(f"the Triton quantization kernels hold a row in registers: rows up to {MAX_ROW} "
                          f"wide, got {x.shape[-1]}")
    return refusal


def _cpu_supports(x, *args, explicit, **kwargs):
    return cpp_device_refusal(x, "cpu")


# Fakes of the CPU-only C++ ops, so that torch.compile traces through them
@register_fake("sam_fast::int8_epilogue")
def _(acc, a_scale, w_scale, bias, gelu, out_dtype, out_scale):
    return acc.new_empty(acc.shape, dtype=out_dtype)


@register_fake("sam_fast::int8_epilogue_")
def _(acc, a_scale, w_scale, bias, gelu):
    return None


@register_fake("sam_fast::int8_linear_amx")
def _(x, x_scale, w_packed, N, w_scale, bias, gelu, out_dtype, out_scale):
    return x.new_empty((x.shape[0], N), dtype=out_dtype)


@register_fake("sam_fast::int8_linear_amx_quantize")
def _(x, x_scale, w_packed, N, w_scale, bias, gelu):
    return x.new_empty((x.shape[0], N)), x.new_empty((x.shape[0],), dtype=torch.float32)


@register_fake("sam_fast::int8_pack_amx")
def _(w):
    # the panels (64-channel, K a multiple of 4) where the AMX int8 path runs, else an empty tensor, as the kernel
    N, K = w.shape
    packs = _panel_gemm_runs() and K > 0 and K % 4 == 0 and N > 0
    return w.new_empty(((N + 63) // 64 * K * 64,) if packs else (0,))


@functools.lru_cache(maxsize=None)
def _panel_hardware() -> Tuple[bool, bool]:
    """(AMX int8, AVX512-VNNI): which GEMM of ``sam_fast::int8_linear_amx`` this CPU has, whatever is switched off
    now; the kernel asked once, at import (outside tracing), with one path switched off at a time."""
    if extension_error() is not None:
        return False, False
    before = cpu_features._mask(0)
    try:
        def packs(off: int) -> bool:
            cpu_features._mask(off)
            return torch.ops.sam_fast.int8_pack_amx(torch.zeros(1, 4, dtype=torch.int8)).numel() > 0

        return packs(cpu_features.AVX512), packs(cpu_features.AMX)
    finally:
        cpu_features._mask(before)


def _panel_gemm_runs() -> bool:
    """Whether ``sam_fast::int8_linear_amx`` runs now: AMX int8 with AMX on, or AVX512-VNNI with AVX-512 on (the C++
    kernel's own rule, csrc/cpu/int8_linear.cpp)."""
    amx, vnni = _panel_hardware()
    return (amx and cpu_features.amx()) or (vnni and cpu_features.avx512())


_panel_hardware()


def fused_int8_gemm() -> bool:
    """Whether CPU int8 linears run the GEMM with its epilogue fused per tile (AMX int8 or AVX512-VNNI, not switched
    off) rather than ``torch._int_mm`` and a pass over its int32 accumulator: the CPU int8 width rule
    (``cpu_policy.int8_min_in_features``) holds only for the latter."""
    return _panel_gemm_runs()


def _any_supports(*args, explicit, **kwargs):
    return None


def _on_device(op, launcher, twin):
    """The op (its CUDA kernel, the Triton launcher) for CUDA tensors, or its ``triton_op`` form ``twin`` in a trace
    for an AOTInductor package; the launcher itself under the Triton interpreter, since the op's CPU kernel is the
    C++ one. While torch.compile traces, the op whatever the device (a traced graph holds ops, not launchers): on CPU
    tensors the C++ kernel then runs, with the same numerics."""
    def run(x, *args):
        if triton_op_wanted(x):
            return twin(x, *args)
        if x.device.type == "cuda" or torch.compiler.is_compiling():
            return op(x, *args)
        return launcher(x, *args)
    return run


def _table(triton_supports, op, launcher, twin, reference_run):
    """The op's CPU kernel (C++) and its CUDA one (Triton) share one schema, ``op``."""
    return (
        Backend("triton", triton_supports, _on_device(op, launcher, twin)),
        Backend("cpu", _cpu_supports, op),
        Backend("reference", _any_supports, reference_run),
    )


_QUANT_TABLE = _table(_rows_supports, _quantize_per_token_op, _k.quantize_rows, _quantize_per_token_twin,
                      _ref.quantize_per_token)
_LN_TABLE = _table(_rows_supports, _layer_norm_quantize_op, _k.layer_norm_quantize, _layer_norm_quantize_twin,
                   _ref.layer_norm_quantize)
_quantize_triton = _on_device(_quantize_per_token_op, _k.quantize_rows, _quantize_per_token_twin)
_quantize_static_triton = _on_device(_quantize_static_op, _k.quantize_rows, _quantize_static_twin)


def _linear_triton_supports(x, x_scale, w, *args, explicit, **kwargs):
    if x.dtype == torch.int8:  # already quantized: only the GEMM runs
        return triton_device_refusal(w, explicit)
    return _rows_supports(x, explicit=explicit)


def _linear_cpu_supports(x, x_scale, w, *args, explicit, **kwargs):
    return _cpu_supports(w, explicit=explicit)


_workspace = threading.local()


def _cpu_accumulator(x: Tensor, w: Tensor) -> Tensor:
    """``_ref.int8_mm(x, w)`` (int32 (M, N)), in the thread's reused buffer where it fits (the policy's
    ``int8_workspace_bytes``, :mod:`sam_fast.cpu_policy`: a fresh allocation this large comes straight from the OS,
    glibc maps blocks over 32 MiB itself, and its first touch page-faults, which cost as much as the int8 GEMM
    saves); the caller consumes it before the next int8 GEMM of this thread."""
    M, K = x.shape
    N = w.shape[0]
    if torch.compiler.is_compiling() or K < 2 or M * N * 4 > cpu_policy.policy().int8_workspace_bytes:
        return _ref.int8_mm(x, w)
    buf = getattr(_workspace, "acc", None)
    if buf is None or buf.numel() < M * N:
        with persistent():
            buf = _workspace.acc = torch.empty(M * N, dtype=torch.int32)
    acc = buf[: M * N].view(M, N)
    torch._int_mm(x, w.t(), out=acc)
    return acc


#: id(weight) -> (weakref to it, its _version, its data_ptr, its AMX panels or None): the panels live as long as
#: the weight (a weakref callback drops them), and are rebuilt after an in-place change
_AMX_PANELS: dict = {}


def _amx_weight(w: Tensor) -> Optional[Tensor]:
    """``w``'s panels for ``sam_fast::int8_linear_amx`` (as much memory again as the int8 weight), packed once per
    weight tensor; None where that path does not run (neither AMX int8 nor AVX512-VNNI, or both switched off:
    :mod:`sam_fast.cpu_features`; K not a multiple of 4; while torch.compile traces)."""
    if torch.compiler.is_compiling() or not _panel_gemm_runs() or w.shape[1] % 4 or w.requires_grad:
        return None
    if w.is_inference():  # made under torch.inference_mode: no version counter shows an in-place change, so no cache
        packed = torch.ops.sam_fast.int8_pack_amx(w)
        return packed if packed.numel() else None
    key = id(w)
    hit = _AMX_PANELS.get(key)
    if hit is not None and hit[0]() is w and hit[1] == w._version and hit[2] == w.data_ptr():
        return hit[3]
    with persistent():
        packed = torch.ops.sam_fast.int8_pack_amx(w)
    packed = packed if packed.numel() else None
    ref = weakref.ref(w, lambda _ref, key=key: _AMX_PANELS.pop(key, None))
    _AMX_PANELS[key] = (ref, w._version, w.data_ptr(), packed)
    return packed


def _linear_cpu_run(x, x_scale, w, w_scale, bias, activation, out_dtype, out_scale):
    """The C++ quantisation, then the int8 GEMM with its epilogue fused per tile where the CPU has AMX int8 or
    AVX512-VNNI (:func:`_amx_weight`), else ``torch._int_mm`` (:func:`_ref.int8_mm`) and one epilogue pass over the
    accumulator: the reference's numerics, instead of its four to seven passes."""
    if x.dtype != torch.int8:
        x, x_scale = _quantize_per_token_op(x) if x_scale is None else _quantize_static_op(x, x_scale)
    if out_dtype == torch.int32:
        return _ref.int8_mm(x, w)
    packed = _amx_weight(w)
    if packed is not None:
        return torch.ops.sam_fast.int8_linear_amx(x, x_scale, packed, w.shape[0], w_scale, bias, activation == "gelu",
                                                  out_dtype, out_scale)
    if out_dtype == torch.float32 and not torch.compiler.is_compiling():
        # the result overwrites a fresh accumulator: one large allocation, as a float GEMM makes
        acc = _ref.int8_mm(x, w)
        if acc.is_contiguous():
            torch.ops.sam_fast.int8_epilogue_(acc, x_scale, w_scale, bias, activation == "gelu")
            return acc.view(torch.float32)
    else:
        acc = _cpu_accumulator(x, w)
    return torch.ops.sam_fast.int8_epilogue(acc, x_scale, w_scale, bias, activation == "gelu", out_dtype, out_scale)


def int8_gelu_quantize(x: Tensor, x_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                       backend: str) -> Optional[Tuple[Tensor, Tensor]]:
    """``quantize_per_token(int8_linear(x, w, w_scale, bias, act_scale=x_scale, activation="gelu",
    out_dtype=torch.float32))`` in one C++ op (``sam_fast::int8_linear_amx_quantize``: an int8 MLP's hidden
    activation written once, in int8, no float32 tensor of it in memory), where that op runs: x int8 (..., K) on the
    CPU with per-token scales, ``backend`` "auto" or "cpu", this CPU's panel GEMM (AMX int8 or AVX512-VNNI), in
    eager mode. None elsewhere (the caller takes the two steps); the same values either way."""
    if backend not in ("auto", "cpu") or x.device.type != "cpu" or x.dtype != torch.int8 or x.dim() < 2 \
            or x_scale.shape != x.shape[:-1] or torch.compiler.is_compiling() or export_target() is not None \
            or extension_error() is not None or not x.shape[:-1].numel():
        return None
    packed = _amx_weight(w)
    if packed is None:
        return None
    note_call("int8_linear", "cpu")
    q, scale = torch.ops.sam_fast.int8_linear_amx_quantize(x.reshape(-1, x.shape[-1]), x_scale.reshape(-1).float(),
                                                           packed, w.shape[0], w_scale, bias, True)
    return q.view(*x.shape[:-1], w.shape[0]), scale.view(x.shape[:-1])


def _linear_triton_run(x, x_scale, w, w_scale, bias, activation, out_dtype, out_scale):
    if x.dtype != torch.int8:
        x, x_scale = _quantize_triton(x) if x_scale is None else _quantize_static_triton(x, x_scale)
    gemm = _int8_gemm_twin if triton_op_wanted(x) else _int8_gemm_op
    return gemm(x, x_scale, w, w_scale, bias, activation, out_dtype, out_scale)


def _linear_reference_run(x, x_scale, w, w_scale, bias, activation, out_dtype, out_scale):
    if x.dtype != torch.int8:
        if x_scale is None:
            x, x_scale = _ref.quantize_per_token(x)
        else:
            x, x_scale = _ref.quantize_static(x, x_scale), _ref.static_row_scale(x, x_scale)
    return _ref.int8_gemm(x, x_scale, w, w_scale, bias, activation, out_dtype, out_scale)


_LINEAR_TABLE = (
    Backend("triton", _linear_triton_supports, _linear_triton_run),
    Backend("cpu", _linear_cpu_supports, _linear_cpu_run),
    Backend("reference", _any_supports, _linear_reference_run),
)


# ------------------------------------------------------------------------------------------------
# Validation helpers
# ------------------------------------------------------------------------------------------------


def _tensor(t, name: str) -> Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _float_input(x, name: str = "x") -> Tensor:
    _tensor(x, name)
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last dim (the features), got shape {tuple(x.shape)}")
    return x


def _rows(x: Tensor) -> Tensor:
    """x as (M, K) with a contiguous last dim (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 or x2.shape[-1] == 1 else x2.contiguous()


def _same_device(t: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def scalar_scale(s, name: str, device, check_value: bool = True) -> Tensor:
    """A calibrated scale as a 0-d fp32 tensor on ``device``, from a positive finite float or a one-element
    float tensor. ``check_value``: a CPU tensor's value is checked positive and finite too (on a GPU that
    would be a device sync per call: :class:`sam_fast.nn.Int8Linear` checks its scales once, at
    construction and load)."""
    if isinstance(s, numbers.Real) and not isinstance(s, bool):
        if not (s > 0 and math.isfinite(s)):
            raise ValueError(f"{name} must be a positive finite scale, got {s!r}")
        s = torch.tensor(float(s), device=device)
    _tensor(s, name)
    if not s.is_floating_point():
        raise TypeError(f"{name} must be a floating-point scale, got {s.dtype}")
    if s.numel() != 1:
        raise ValueError(f"{name} must be a single (per-tensor) scale, got shape {tuple(s.shape)}")
    if s.device != torch.device(device):
        raise ValueError(f"{name} must be on {device}, got {s.device}")
    if check_value and s.device.type == "cpu":
        v = float(s)
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be a positive finite scale, got {v!r}")
    return s.reshape(()).float()


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------


def quantize_per_token(x: Tensor, *, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Symmetric per-token int8 quantization of activations.

    Args:
        x: (..., K) float16/bfloat16/float32; each row along the last dim is one token.
    Returns:
        ``(x_int8, scale)``: ``x_int8`` int8 shaped like ``x``; ``scale`` fp32 shaped ``x.shape[:-1]``
        with ``x ~= x_int8 * scale[..., None]``, ``scale = max|row| / 127`` (1 for an all-zero row).
    """
    _float_input(x)
    x2 = _rows(x)
    if x2.shape[0] == 0:
        return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)
    q, scale = dispatch("quantize_per_token", _QUANT_TABLE, backend, x2)
    return q.reshape(x.shape), scale.reshape(x.shape[:-1])


def layer_norm_quantize(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                        eps: float = 1e-5, *, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """``quantize_per_token(F.layer_norm(x, (K,), weight, bias, eps))`` in one pass: the normalised
    activations never exist in floating point (fp32 statistics). Returns ``(x_int8, scale)`` as
    :func:`quantize_per_token`.
    """
    _float_input(x)
    K = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        _tensor(t, name)
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if tuple(t.shape) != (K,):
            raise ValueError(f"{name} must have shape (K,) = ({K},), got {tuple(t.shape)}")
        _same_device(t, name, x, "x")
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    x2 = _rows(x)
    if x2.shape[0] == 0:
        return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    q, scale = dispatch("layer_norm_quantize", _LN_TABLE, backend, x2, weight, bias, float(eps))
    return q.reshape(x.shape), scale.reshape(x.shape[:-1])


def _check_weight(weight_int8, weight_scale, bias):
    _tensor(weight_int8, "weight_int8")
    if weight_int8.dtype != torch.int8:
        hint = (" (quantize a float weight first: sam_fast.quantize.quantize_weight or "
                "sam_fast.nn.Int8Linear.from_float)" if weight_int8.is_floating_point() else "")
        raise TypeError(f"weight_int8 must be torch.int8, got {weight_int8.dtype}{hint}")
    if weight_int8.dim() != 2 or 0 in weight_int8.shape:
        raise ValueError(f"weight_int8 must be a non-empty (out_features, in_features) matrix, got shape "
                         f"{tuple(weight_int8.shape)}")
    N, K = weight_int8.shape
    if K > _ref.MAX_K:
        raise ValueError(f"weight_int8 has in_features={K}; the int32 accumulator is exact only up to "
                         f"{_ref.MAX_K}")
    _tensor(weight_scale, "weight_scale")
    if weight_scale.dtype != torch.float32:
        raise TypeError(f"weight_scale must be float32 (one scale per output channel), got {weight_scale.dtype}")
    if tuple(weight_scale.shape) != (N,):
        raise ValueError(f"weight_scale must have shape (out_features,) = ({N},), got {tuple(weight_scale.shape)}")
    _same_device(weight_scale, "weight_scale", weight_int8, "weight_int8")
    if bias is not None:
        _tensor(bias, "bias")
        if not bias.is_floating_point():
            raise TypeError(f"bias must be a floating-point tensor, got {bias.dtype}")
        if tuple(bias.shape) != (N,):
            raise ValueError(f"bias must have shape (out_features,) = ({N},), got {tuple(bias.shape)}")
        _same_device(bias, "bias", weight_int8, "weight_int8")
    return N, K


def int8_linear(
    x: Tensor,
    weight_int8: Tensor,
    weight_scale: Tensor,
    bias: Optional[Tensor] = None,
    *,
    act_scale=None,
    activation: Optional[str] = None,
    out_dtype: Optional[torch.dtype] = None,
    out_scale=None,
    backend: str = "auto",
) -> Tensor:
    """W8A8 ``nn.Linear``: ``epilogue(quantize(x) @ weight_int8.T)`` on int8 tensor cores.

    Args:
        x: (..., K). Floating point: quantized per token on the fly (``act_scale=None``, dynamic) or with
            the calibrated per-tensor ``act_scale`` (static). Already int8 (from
            :func:`quantize_per_token`, :func:`layer_norm_quantize` or a GEMM with ``out_dtype=torch.int8``):
            ``act_scale`` is required, per tensor (one element) or per token (shape ``x.shape[:-1]``).
        weight_int8: (N, K) int8, symmetric per output channel (nn.Linear's layout).
        weight_scale: (N,) float32, ``weight ~= weight_int8 * weight_scale[:, None]``.
        bias: (N,) float or None.
        activation: None or ``"gelu"`` (exact erf form, SAM's ``nn.GELU()``), applied after the bias.
        out_dtype: float16/bfloat16/float32 (default: ``x``'s dtype, or ``bias``'s / float32 for int8 ``x``),
            or ``torch.int8`` to re-quantize the output with the static ``out_scale`` for the next GEMM.
        out_scale: the calibrated per-tensor scale of the output, with ``out_dtype=torch.int8`` only.
        backend: ``"auto" | "triton" | "cpu" | "reference"``; every backend gives the same numerics.

    Scales are checked positive and finite: floats always, tensors on the CPU (per-token int8 scales may be
    NaN, marking rows that held NaN / inf). CUDA tensors are not read back per call (a device sync):
    :class:`sam_fast.nn.Int8Linear` checks its scales once, at construction and load.

    Returns:
        (..., N) in ``out_dtype``. Any M, K, N >= 1 (block edges are masked, nothing is padded).
    """
    return int8_linear_op(x, weight_int8, weight_scale, bias, act_scale=act_scale, activation=activation,
                          out_dtype=out_dtype, out_scale=out_scale, backend=backend, check_scale_values=True)


def int8_linear_op(x, weight_int8, weight_scale, bias=None, *, act_scale=None, activation=None, out_dtype=None,
                   out_scale=None, backend="auto", check_scale_values=True) -> Tensor:
    """:func:`int8_linear` with the check of the scales' values optional: ``check_scale_values=False`` is for
    :class:`sam_fast.nn.Int8Linear`, which checks its scales once (reading CUDA scales back is a device sync)."""
    N, K = _check_weight(weight_int8, weight_scale, bias)
    _tensor(x, "x")
    if x.dtype != torch.int8:
        _float_input(x)
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must have in_features={K} in its last dim, got shape {tuple(x.shape)}")
    _same_device(x, "x", weight_int8, "weight_int8")
    lead = x.shape[:-1]
    x2 = _rows(x)
    M = x2.shape[0]

    if x.dtype == torch.int8:
        if act_scale is None:
            raise ValueError("x is int8, so act_scale is required: its per-tensor scale (one element) or its "
                             f"per-token scales (shape {tuple(lead)})")
        _tensor(act_scale, "act_scale")
        if act_scale.dtype != torch.float32:
            raise TypeError(f"act_scale must be float32, got {act_scale.dtype}")
        _same_device(act_scale, "act_scale", x, "x")
        if act_scale.numel() == 1 and tuple(act_scale.shape) != tuple(lead):
            x_scale = act_scale.reshape(())
            if check_scale_values:
                scalar_scale(x_scale, "act_scale", x.device)
        elif tuple(act_scale.shape) == tuple(lead):
            x_scale = act_scale.reshape(M).contiguous()
            if check_scale_values and x_scale.device.type == "cpu" and bool((x_scale <= 0).any()
                                                                          | torch.isinf(x_scale).any()):
                raise ValueError("act_scale (per token) must be positive and finite (NaN marks a row that held "
                                 "NaN or inf), got a zero, negative or infinite value")
        else:
            raise ValueError(f"act_scale must have one element (per tensor) or shape {tuple(lead)} (per token), "
                             f"got {tuple(act_scale.shape)}")
    else:
        x_scale = None if act_scale is None else scalar_scale(act_scale, "act_scale", x.device, check_scale_values)

    if activation not in _k.ACTIVATIONS:
        raise ValueError(f"activation must be None or 'gelu', got {activation!r}")
    if out_dtype is None:
        out_dtype = x.dtype if x.dtype != torch.int8 else (bias.dtype if bias is not None else torch.float32)
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {[str(d) for d in _OUT_DTYPES]}, got {out_dtype}")
    if out_dtype == torch.int8:
        if out_scale is None:
            raise ValueError("out_dtype=torch.int8 re-quantizes the output and needs its calibrated out_scale")
        out_scale = scalar_scale(out_scale, "out_scale", x.device, check_scale_values)
    elif out_scale is not None:
        raise ValueError(f"out_scale is used only with out_dtype=torch.int8, got out_dtype={out_dtype}")
    if out_dtype == torch.int32 and (bias is not None or activation is not None):
        raise ValueError("out_dtype=torch.int32 returns the raw accumulator: bias and activation must be None")

    if M == 0:
        return x.new_empty((*lead, N), dtype=out_dtype)
    w = weight_int8 if weight_int8.stride(-1) == 1 else weight_int8.contiguous()
    bias = bias.contiguous() if bias is not None else None
    out = dispatch("int8_linear", _LINEAR_TABLE, backend, x2, x_scale, w, weight_scale.contiguous(), bias,
                   activation, out_dtype, out_scale)
    return out.reshape(*lead, N)


def quantize_weight(weight: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-output-channel symmetric int8 of a float weight (N, K): ``(weight_int8, weight_scale (N,) fp32)``."""
    _tensor(weight, "weight")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if weight.dim() != 2 or 0 in weight.shape:
        raise ValueError(f"weight must be a non-empty (out_features, in_features) matrix, got {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):  # once per layer, when quantizing: NaN scales would be silent
        raise ValueError("weight holds NaN or infinite values; they cannot be quantized")
    return _ref.quantize_weight(weight)
