"""W8A8 modules: :class:`Int8Linear` and the fused LayerNorm -> int8 -> GEMM paths of a SAM ViT block.

:class:`Int8Linear` is an inference drop-in for ``nn.Linear``: int8 weight symmetric per output
channel (``weight``, ``weight_scale``), float ``bias``, and optionally a calibrated per-tensor
activation scale (``act_scale``; without it activations are quantized per token at run time). Its
state_dict keys are ``weight`` (int8), ``weight_scale``, ``bias`` and ``act_scale``; loading a state_dict
decides whether the layer is static (it has ``act_scale``) or dynamic. ``model.to(torch.bfloat16)``
casts the bias with the model but keeps the scales in float32.

:func:`norm_int8_linear` and :func:`int8_mlp` are what :class:`sam_fast.nn.SamFastBlock` runs when its
linears are quantized; :func:`int8_norm_mlp` is the same MLP fusion for other module names (TinyViT's ``fc1`` /
``fc2``). The fused forms of DC-ViT's attention-free block and of TinyViT's attention and MLP
(:class:`FusedInt8MlpBlock`, :class:`FusedInt8NormAttention`, :class:`FusedInt8NormMlp`) are swapped in by
``sam_fast.apply`` and share the original module's parameters, so the model classes stay plain PyTorch.
``norm1 -> qkv`` and ``norm2 -> lin1`` become one LayerNorm-quantize pass plus one GEMM, and with a calibrated
``lin2`` the first MLP GEMM re-quantizes its GELU output to int8 in the epilogue, so the 4x-wide hidden
activation is written once, in int8, and never quantized separately.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._dispatch import check_backend_name
from .._hooks import has_hooks, share_hooks
from ..ops.int8_linear import int8_gelu_quantize, int8_linear_op, layer_norm_quantize, quantize_weight, scalar_scale

_SCALES = ("weight_scale", "act_scale")


def _static_scale(act_scale, device) -> Optional[torch.Tensor]:
    """The module's own copy of a calibrated scale (checked positive and finite once, here, not per forward)."""
    if act_scale is None:
        return None
    if isinstance(act_scale, torch.Tensor):
        act_scale = act_scale.detach().to(device)
    scale = scalar_scale(act_scale, "act_scale", device if device is not None else "cpu").clone()
    why = _bad_scales(scale)  # on any device: once, here
    if why:
        raise ValueError(f"act_scale must be a positive finite scale: {why}")
    return scale


def _bad_scales(t: torch.Tensor) -> Optional[str]:
    """Why a scale tensor cannot be used (one device sync), or None: every element positive and finite."""
    bad = ~(torch.isfinite(t) & (t > 0))
    if bool(bad.any()):
        return f"{int(bad.sum())} of {t.numel()} values are not positive and finite (e.g. {float(t[bad][0])})"
    return None


class Int8Linear(nn.Module):
    """W8A8 ``nn.Linear`` for inference: ``y = int8_linear(x, weight, weight_scale, bias, act_scale=...)``.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        act_scale: None (dynamic per-token activation quantization) or the calibrated per-tensor scale.
        backend: handed to :func:`sam_fast.int8_linear`.
        device, bias_dtype: where the buffers live and the bias dtype.

    Input (..., in_features) float (quantized on the fly) or, through :meth:`forward_int8`, int8 with
    its scales. Output (..., out_features) in the input's dtype. There is no backward.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, act_scale=None,
                 backend: str = "auto", device=None, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)
        self.register_buffer("act_scale", _static_scale(act_scale, device))
        self.backend = check_backend_name(backend)

    @classmethod
    def from_float(cls, linear: nn.Linear, act_scale=None, backend: str = "auto") -> "Int8Linear":
        """Quantize ``linear``'s weight per output channel (symmetric int8) and copy its bias.

        ``act_scale``: the calibrated per-tensor input scale for static activation quantization (see
        :func:`sam_fast.quantize.calibrate`), or None for dynamic per-token quantization."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, act_scale=act_scale,
                  backend=backend, device=w.device,
                  bias_dtype=linear.bias.dtype if linear.bias is not None else torch.float32)
        wq, ws = quantize_weight(w.float())
        new.weight.copy_(wq)
        new.weight_scale.copy_(ws)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach())
        return new

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight this layer computes with: ``weight * weight_scale[:, None]`` (fp32)."""
        return self.weight.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``x`` quantized and multiplied; the output in ``out_dtype`` (default: ``x``'s dtype)."""
        # the module's scales were checked at construction / load: no per-call value check (device sync)
        return int8_linear_op(x, self.weight, self.weight_scale, self.bias, act_scale=self.act_scale,
                            out_dtype=out_dtype, backend=self.backend, check_scale_values=False)

    def forward_int8(self, x_int8: torch.Tensor, x_scale: torch.Tensor, *, activation: Optional[str] = None,
                     out_dtype: Optional[torch.dtype] = None, out_scale=None) -> torch.Tensor:
        """The GEMM on already quantized input (per-token or per-tensor ``x_scale``), with the fused
        epilogue: optional GELU, a float ``out_dtype`` or ``torch.int8`` with ``out_scale``."""
        return int8_linear_op(x_int8, self.weight, self.weight_scale, self.bias, act_scale=x_scale,
                            activation=activation, out_dtype=out_dtype, out_scale=out_scale, backend=self.backend,
                            check_scale_values=False)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() cast every float buffer; the scales must stay float32.
        kept = {n: self._buffers[n] for n in _SCALES if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for n, before in kept.items():
            after = self._buffers[n]
            if after.dtype != torch.float32:
                self._buffers[n] = before.to(device=after.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A float checkpoint's weight would be cast into the int8 buffer (truncated): refuse, naming the fix.
        w = state_dict.get(prefix + "weight")
        if isinstance(w, torch.Tensor) and w.dtype != torch.int8:
            error_msgs.append(
                f"{prefix}weight: the state_dict holds a {w.dtype} weight, but this layer is an Int8Linear (int8 "
                f"weight + weight_scale): load float checkpoints before sam_fast.apply(), or quantize them with "
                f"Int8Linear.from_float")
            return
        for name in _SCALES:  # checked once here, so forward needs no device sync
            t = state_dict.get(prefix + name)
            if isinstance(t, torch.Tensor):
                why = _bad_scales(t.detach()) if t.is_floating_point() else f"it is {t.dtype}, not float"
                if why:
                    error_msgs.append(f"{prefix}{name}: {why}")
                    return
        # Static or dynamic is part of the saved layer: follow the state_dict.
        key = prefix + "act_scale"
        if key in state_dict and self.act_scale is None:
            self.act_scale = torch.ones((), dtype=torch.float32, device=self.weight.device)
        elif key not in state_dict and self.act_scale is not None:
            self.act_scale = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for n in _SCALES:
            t = self._buffers.get(n)
            if t is not None and t.dtype != torch.float32:
                self._buffers[n] = t.float()

    def extra_repr(self) -> str:
        mode = "dynamic per-token" if self.act_scale is None else "static per-tensor"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, activations={mode}, backend={self.backend!r}")


def _is_layer_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1


def _is_exact_gelu(m: nn.Module) -> bool:
    if isinstance(m, nn.GELU):
        return m.approximate == "none"
    # transformers' GELUActivation("gelu") holds the exact functional GELU
    return getattr(m, "act", None) is torch.nn.functional.gelu and not list(m.children())


def norm_int8_linear(norm: nn.Module, linear: nn.Module, x: torch.Tensor,
                     out_dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    """``linear(norm(x))`` as LayerNorm-quantize + int8 GEMM when ``linear`` is a dynamic
    :class:`Int8Linear` and ``norm`` an ``nn.LayerNorm``, in ``out_dtype`` (default ``x``'s); None when the pair
    does not fuse (or either has hooks, which a fused call would skip)."""
    if not (isinstance(linear, Int8Linear) and linear.act_scale is None and _is_layer_norm(norm)) \
            or has_hooks(norm, linear):
        return None
    xq, xs = layer_norm_quantize(x, norm.weight, norm.bias, norm.eps, backend=linear.backend)
    return linear.forward_int8(xq, xs, out_dtype=out_dtype or x.dtype)


def int8_norm_mlp(norm: nn.Module, lin1: nn.Module, act: nn.Module, lin2: nn.Module,
                  x: torch.Tensor) -> Optional[torch.Tensor]:
    """``lin2(act(lin1(norm(x))))`` with the LayerNorm fused into lin1's input quantization, the exact
    GELU into its epilogue and, when lin2 is calibrated (static), the re-quantization for lin2 too, so
    the wide hidden activation is written once, in int8. None when the modules do not have that form
    (lin1 not a dynamic :class:`Int8Linear`, norm not a LayerNorm, act not an exact GELU) or when one of them has
    hooks."""
    if not (isinstance(lin1, Int8Linear) and lin1.act_scale is None and _is_layer_norm(norm)
            and isinstance(act, nn.Module) and _is_exact_gelu(act) and isinstance(lin2, nn.Module)):
        return None
    if has_hooks(norm, lin1, act, lin2):
        return None
    xq, xs = layer_norm_quantize(x, norm.weight, norm.bias, norm.eps, backend=lin1.backend)
    if isinstance(lin2, Int8Linear) and lin2.act_scale is not None:
        h = lin1.forward_int8(xq, xs, activation="gelu", out_dtype=torch.int8, out_scale=lin2.act_scale)
        return lin2.forward_int8(h, lin2.act_scale, out_dtype=x.dtype)
    if isinstance(lin2, Int8Linear) and lin2.act_scale is None and x.dtype == torch.float32:
        # lin2 quantises per token: on the CPU its int8 input straight from lin1's GEMM, with those scales
        fused = int8_gelu_quantize(xq, xs, lin1.weight, lin1.weight_scale, lin1.bias, lin1.backend)
        if fused is not None:
            return lin2.forward_int8(*fused, out_dtype=x.dtype)
    return lin2(lin1.forward_int8(xq, xs, activation="gelu", out_dtype=x.dtype))


def int8_mlp(norm: nn.Module, mlp: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """segment_anything ``MLPBlock`` on ``norm(x)`` through :func:`int8_norm_mlp` (None when it does not fuse)."""
    if has_hooks(mlp):
        return None
    return int8_norm_mlp(norm, getattr(mlp, "lin1", None), getattr(mlp, "act", None), getattr(mlp, "lin2", None), x)


# ------------------------------------------------------------------------------------------------
# Fused forms of model modules, swapped in by sam_fast.apply once their linears are int8
# ------------------------------------------------------------------------------------------------


class _SharedModule(nn.Module):
    """A module holding another's parameters, buffers, submodules and plain attributes (the same objects), so
    its state_dict keys and values are the original's; ``float_forward`` is the original class's forward."""

    def __init__(self, original: nn.Module):
        super().__init__()
        for key, value in vars(original).items():
            if key in ("_parameters", "_buffers", "_modules"):
                getattr(self, key).update(value)
            elif key == "_non_persistent_buffers_set":
                self._non_persistent_buffers_set = set(value)
            elif key == "training" or not key.startswith("_"):
                self.__dict__[key] = value
        self.__dict__["_original_class"] = type(original)
        share_hooks(self, original)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules
        except AttributeError:
            attr = getattr(self.__dict__["_original_class"], name, None)  # the original's methods (TinyViT's bias())
            if callable(attr) and not name.startswith("__"):
                return attr.__get__(self)
            raise

    def float_forward(self, *args, **kwargs):
        return self._original_class.forward(self, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"fused int8 form of {self._original_class.__name__}"


class FusedInt8MlpBlock(_SharedModule):
    """A DC-ViT attention-free block (``x + mlp(norm2(x))``) with ``norm2`` fused into ``lin1``'s input
    quantization and the GELU into its epilogue (:func:`int8_mlp`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_mlp(self.norm2, self.mlp, x)
        return self.float_forward(x) if y is None else x + y


class FusedInt8NormAttention(_SharedModule):
    """TinyViT attention (``attend(qkv(norm(x)))``) with the LayerNorm fused into the qkv GEMM's input
    quantization (:func:`norm_int8_linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = norm_int8_linear(self.norm, self.qkv, x)
        return self.float_forward(x) if qkv is None else self._original_class.attend(self, qkv)


class FusedInt8NormMlp(_SharedModule):
    """TinyViT's MLP (``fc2(act(fc1(norm(x))))``) through :func:`int8_norm_mlp`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_norm_mlp(self.norm, self.fc1, self.act, self.fc2, x)
        return self.float_forward(x) if y is None else y


#: which fused form each fusable model class gets (see :func:`sam_fast.surgery.fusable_modules`)
FUSED_INT8_MODULES = {"MlpBlock": FusedInt8MlpBlock, "TinyViTAttention": FusedInt8NormAttention,
                      "TinyViTMlp": FusedInt8NormMlp}
