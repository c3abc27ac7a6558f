"""The walk over a model's blocks: which modules :func:`sam_fast.apply` swaps and calibration measures.

Everything that recognises parts of a model lives here, by structure rather than by class, so models built
by segment_anything, by ``sam_fast.models`` or by a user's own code are treated alike:

* :func:`vit_blocks` - segment_anything ViT blocks (fused attention goes there);
* :func:`attention_free_blocks` - DC-ViT blocks whose attention was removed (``norm2`` + ``mlp``);
* :func:`eligible_linears` - the block linears W8A8 replaces, with the keys calibration reports them by;
* :func:`fusable_modules` - modules whose LayerNorm (and GELU) fuse into the int8 GEMM after it, once
  their linears are int8;
* :func:`find_encoder` - the image encoder of a ``Sam`` or a bare encoder, with its pixel statistics;
  :func:`sam_image_encoder` - a ``Sam``'s, refusing anything else; :func:`encoder_blocks` - its ``blocks`` in order;
* :func:`is_sam_vit_block`, :func:`is_transformers_vit_layer` / :func:`transformers_vit_layers` (transformers' SAM
  vision layers), :func:`tinyvit_blocks` (MobileSAM's / TinySAM's TinyViT) - one module at a time, or all of them.

Nothing else in the package decides what a block is: the modules, loaders, distillation and the CLI ask here.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch
from torch import nn

from . import cpu_policy
from .models.tinyvit import TinyViTAttention, TinyViTMlp
from .models.vit import MlpBlock
from .nn.attention import SamFastBlock
from .nn.quantized import FUSED_INT8_MODULES, Int8Linear
from .ops.dilated_attention_cpu import compute_dtype
from .ops.int8_linear import fused_int8_gemm

ROLES = (("attn", "qkv"), ("attn", "proj"), ("mlp", "lin1"), ("mlp", "lin2"))
TINYVIT_ROLES = (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2"))
STATIC_ROLES = (("mlp", "lin2"), ("mlp", "fc2"))  # inputs whose static scale removes a quantization pass
MIN_FEATURES = 16  # narrower layers stay in float: too few channels for int8 tensor cores to pay
PIXEL_MEAN = (123.675, 116.28, 103.53)  # segment_anything's defaults
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclasses.dataclass
class LinearSlot:
    """An eligible linear: ``key`` (``blocks.<i>.<attn|mlp>.<name>``; in a TinyViT encoder the block's
    name in the encoder, ``layers.<l>.blocks.<i>.<attn|mlp>.<name>``; in a transformers SAM vision encoder
    ``layers.<i>.<attn|mlp>.<name>``), its parent module and attribute."""

    key: str
    parent: nn.Module
    name: str
    static_role: bool

    @property
    def module(self) -> nn.Module:
        return self.parent._modules[self.name]


def is_sam_vit_block(m: nn.Module) -> bool:
    """Whether ``m`` is structured like segment_anything's image-encoder Block (by attributes and
    submodule types, not by class name): norm1, attn with Linear qkv/proj and num_heads, norm2, mlp,
    integer window_size, and qkv width divisible into 3 * num_heads heads."""
    attn = getattr(m, "attn", None)
    if attn is None or isinstance(m, SamFastBlock):
        return False
    if not all(isinstance(getattr(m, n, None), nn.Module) for n in ("norm1", "norm2", "mlp")):
        return False
    if not isinstance(getattr(m, "window_size", None), int):
        return False
    qkv, proj, heads = getattr(attn, "qkv", None), getattr(attn, "proj", None), getattr(attn, "num_heads", None)
    linear = (nn.Linear, Int8Linear)  # a block quantized in place (quantize="int8") is still one
    if not (isinstance(qkv, linear) and isinstance(proj, linear) and isinstance(heads, int) and heads > 0):
        return False
    if qkv.out_features % (3 * heads) != 0 or not hasattr(attn, "scale"):
        return False
    return proj.in_features == qkv.out_features // 3


def is_transformers_vit_layer(m: nn.Module) -> bool:
    """Whether ``m`` is structured like transformers' SAM vision layer (by attributes, not class name):
    ``layer_norm1`` / ``layer_norm2``, ``attn`` with linear ``qkv`` / ``proj``, ``num_attention_heads`` and
    ``scale``, ``mlp`` with ``lin1`` / ``lin2``, an integer ``window_size``."""
    attn, mlp = getattr(m, "attn", None), getattr(m, "mlp", None)
    if attn is None or mlp is None or not isinstance(getattr(m, "window_size", None), int):
        return False
    if not all(isinstance(getattr(m, n, None), nn.Module) for n in ("layer_norm1", "layer_norm2")):
        return False
    linear = (nn.Linear, Int8Linear)
    qkv, proj = getattr(attn, "qkv", None), getattr(attn, "proj", None)
    heads = getattr(attn, "num_attention_heads", None)
    if not (isinstance(qkv, linear) and isinstance(proj, linear) and isinstance(heads, int) and heads > 0
            and hasattr(attn, "scale") and qkv.out_features % (3 * heads) == 0):
        return False
    return all(isinstance(getattr(mlp, n, None), linear) for n in ("lin1", "lin2"))


def transformers_vit_layers(model: nn.Module) -> List[Tuple[nn.Module, nn.Module, int]]:
    """(encoder, layer, index) of every transformers SAM vision layer in ``model``; ``encoder`` is the module
    whose ``layers`` list holds it."""
    found = []
    for enc in model.modules():
        layers = getattr(enc, "layers", None)
        if isinstance(layers, nn.ModuleList):
            for index, layer in enumerate(layers):
                if is_transformers_vit_layer(layer):
                    found.append((enc, layer, index))
    return found


def tinyvit_blocks(model: nn.Module):
    """(qualified name, block) of every TinyViT block in ``model``, recognised by structure: an ``attn``
    with ``norm``, ``qkv``, ``proj`` and ``attention_biases`` and an ``mlp`` with ``norm``, ``fc1``, ``fc2``
    (MobileSAM's own classes qualify as well as these)."""
    found = []
    for name, m in model.named_modules():
        attn, mlp = getattr(m, "attn", None), getattr(m, "mlp", None)
        if attn is None or mlp is None:
            continue
        if all(isinstance(getattr(attn, a, None), nn.Module) for a in ("norm", "qkv", "proj")) and \
                isinstance(getattr(attn, "attention_biases", None), torch.Tensor) and \
                all(isinstance(getattr(mlp, a, None), nn.Module) for a in ("norm", "fc1", "fc2")):
            found.append((name, m))
    return found


def vit_blocks(model: nn.Module):
    """(parent, name, block, index) of every segment_anything ViT block in ``model`` (swapped or not);
    ``index`` is the block's position in its ``blocks`` list (-1 if its name is not a number)."""
    found = []
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and (isinstance(child, SamFastBlock) or is_sam_vit_block(child)):
                found.append((parent, name, child, int(name) if name.isdigit() else -1))
    return found


def attention_free_blocks(encoder: nn.Module):
    """(index, block) of the encoder's ``blocks`` whose attention DC-ViT removed: ``norm2`` and an ``mlp``
    with ``lin1`` / ``lin2``, no ``attn`` (see :class:`sam_fast.models.vit.MlpBlock`)."""
    found = []
    for index, block in enumerate(getattr(encoder, "blocks", None) or []):
        mlp = getattr(block, "mlp", None)
        if getattr(block, "attn", None) is None and isinstance(getattr(block, "norm2", None), nn.Module) and \
                all(isinstance(getattr(mlp, n, None), (nn.Linear, Int8Linear)) for n in ("lin1", "lin2")):
            found.append((index, block))
    return found


def eligible_linears(model: nn.Module) -> List[LinearSlot]:
    """The linears of the image encoder's ViT blocks (or TinyViT blocks) that W8A8 replaces, float or
    already quantized."""
    enc = getattr(model, "image_encoder", model)
    blocks = [(f"blocks.{index}", block, ROLES) for _, _, block, index in vit_blocks(model)]
    blocks += [(f"layers.{index}", layer, ROLES) for _, layer, index in transformers_vit_layers(model)]
    blocks += [(f"blocks.{index}", block, ROLES[2:]) for index, block in attention_free_blocks(enc)]
    blocks.sort(key=lambda b: int(b[0].split(".")[1]))
    blocks += [(name, block, TINYVIT_ROLES) for name, block in tinyvit_blocks(enc)]
    slots = []
    for prefix, block, roles in blocks:
        for owner, name in roles:
            parent = getattr(block, owner, None)
            lin = getattr(parent, name, None) if parent is not None else None
            if isinstance(lin, (nn.Linear, Int8Linear)):
                slots.append(LinearSlot(f"{prefix}.{owner}.{name}", parent, name, (owner, name) in STATIC_ROLES))
    return slots


def too_narrow(lin: nn.Module) -> Optional[str]:
    """Why ``lin`` stays in float under W8A8, or None: fewer than :data:`MIN_FEATURES` channels anywhere, or on a
    CPU (where its weight lives when quantised) whose int8 GEMM is ``torch._int_mm`` (no AMX int8, no AVX512-VNNI:
    the int32 accumulator's round trip through memory costs what the GEMM saves) fewer than the policy's
    ``int8_min_in_features`` input channels, or a bf16 / fp16 weight the CPU multiplies in hardware
    (``int8_half_stays_float``; :mod:`sam_fast.cpu_policy`): there int8 would make the layer slower. With the fused
    GEMM (AMX or VNNI, epilogue per tile) int8 pays at every width SAM's pruned encoders have (bench_int8_linear.py:
    SlimSAM-77's 168-channel layers run in about half their float32 time)."""
    if min(lin.in_features, lin.out_features) < MIN_FEATURES:
        return (f"too few channels ({lin.in_features} -> {lin.out_features}, < {MIN_FEATURES}) for int8 to pay")
    weight = getattr(lin, "weight", None)
    on_cpu = weight is not None and weight.device.type == "cpu"
    rules = cpu_policy.policy()
    if on_cpu and lin.in_features < rules.int8_min_in_features and not fused_int8_gemm():
        return (f"on a CPU without the fused int8 GEMM (AMX int8 or AVX512-VNNI) int8 is slower than float below "
                f"{rules.int8_min_in_features} input channels ({lin.in_features} -> {lin.out_features})")
    if on_cpu and rules.int8_half_stays_float and weight.dtype in (torch.bfloat16, torch.float16):
        if compute_dtype(weight.dtype) == weight.dtype:
            return (f"this CPU multiplies {str(weight.dtype)[6:]} in hardware (AMX / AVX512-BF16), faster than "
                    "int8 through torch._int_mm")
    return None


def fusable_modules(model: nn.Module):
    """(parent, name, module, fused class) of every module of ``model`` whose LayerNorm fuses into the int8
    GEMM after it: DC-ViT's attention-free blocks and TinyViT's attention and MLP (``sam_fast.models``
    classes; their swapped, fused forms are :mod:`sam_fast.nn.quantized`'s ``FUSED_INT8_MODULES``).
    Modules already fused are not listed."""
    fused = {MlpBlock: "MlpBlock", TinyViTAttention: "TinyViTAttention", TinyViTMlp: "TinyViTMlp"}
    found = []
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            kind = fused.get(type(child))
            if kind is not None:
                found.append((parent, name, child, FUSED_INT8_MODULES[kind]))
    return found


def find_encoder(model: nn.Module):
    """(encoder, pixel_mean, pixel_std) for a segment_anything ``Sam`` or a bare image encoder
    (``ImageEncoderViT`` or a TinyViT)."""
    enc = getattr(model, "image_encoder", model)
    if not (hasattr(enc, "img_size") and hasattr(enc, "patch_embed") and
            (hasattr(enc, "blocks") or hasattr(enc, "layers"))):
        raise TypeError(f"model must be a segment_anything Sam or an image encoder (ImageEncoderViT, TinyViT), got "
                        f"{type(model).__name__}")
    mean = getattr(model, "pixel_mean", None)
    std = getattr(model, "pixel_std", None)
    mean = mean.flatten().tolist() if isinstance(mean, torch.Tensor) else list(PIXEL_MEAN)
    std = std.flatten().tolist() if isinstance(std, torch.Tensor) else list(PIXEL_STD)
    return enc, mean, std


def sam_image_encoder(model: nn.Module, name: str) -> nn.Module:
    """``model.image_encoder`` of a segment_anything ``Sam``; a ``TypeError`` naming the argument ``name`` otherwise."""
    enc = getattr(model, "image_encoder", None)
    if enc is None or not hasattr(enc, "img_size"):
        raise TypeError(f"{name} must be a segment_anything Sam (with image_encoder, prompt_encoder and "
                        f"mask_decoder), got {type(model).__name__}")
    return enc


def encoder_blocks(model: nn.Module) -> Optional[List[nn.Module]]:
    """The ViT blocks of a Sam's image encoder in order (swapped SamFastBlocks included), or None for an
    encoder without a ``blocks`` list (TinyViT)."""
    enc = getattr(model, "image_encoder", model)
    blocks = getattr(enc, "blocks", None)
    return list(blocks) if isinstance(blocks, nn.ModuleList) else None
