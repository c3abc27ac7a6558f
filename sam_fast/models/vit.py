"""SAM ViT image encoders of any geometry read from a checkpoint: SAM, SlimSAM's pruned encoders and
DC-ViT's block-compressed ones.

SlimSAM prunes SAM ViT-B in two steps: the embedding (residual) width first, then each block's
attention heads' width and MLP hidden width. Its checkpoints come in two forms, both loaded here into
segment_anything's own module classes (so every sam_fast swap, the predictor and the mask generator
work on them unchanged):

* **uniform** (``"slimsam_50"``, ``"slimsam_77"``; SlimSAM's ``vit_p50`` / ``vit_p77``): every block
  alike - ViT-B's 12 blocks, 12 heads, global blocks 2, 5, 8, 11, window 14, at embed 384 / head dim
  32 / MLP 1536 or embed 168 / head dim 14 / MLP 696; state_dict keys are segment_anything's.
* **globally pruned** (SlimSAM-50 / SlimSAM-77 of the paper): each block has its own head dim and MLP
  width. SlimSAM trains these with separate ``attn.q`` / ``attn.k`` / ``attn.v`` linears and saves
  whole pickled models; a state_dict of one (``torch.save(model.state_dict(), path)`` in SlimSAM's
  environment) loads with ``load_sam(path, "auto")``: the three linears are concatenated into
  segment_anything's ``attn.qkv`` (same q, k, v order) and DataParallel's ``module.`` prefix dropped.

Per block, the geometry is read from the weights themselves::

    attn.qkv.weight  (3 * heads * head_dim, embed)     attn.rel_pos_h  (2 * S - 1, head_dim)
    mlp.lin1.weight  (mlp_dim, embed)                  S == grid side  -> global block, else window S

so :func:`encoder_geometry` also reads SAM ViT-B/L/H and the tiny test models. The softmax scale is
``head_dim ** -0.5`` of the block's own (pruned) head dim, as SlimSAM trains it.

**DC-ViT** (dense compression with few samples) removes the attention of chosen blocks and narrows
their MLP: such a block keeps only ``norm2`` and ``mlp.lin1`` / ``mlp.lin2`` (any hidden width) and
computes ``x + mlp(norm2(x))``. A block with no ``attn.*`` and no ``norm1.*`` keys is read as one
(:class:`MlpBlock`; ``BlockGeometry.num_heads == 0``); the other blocks keep their attention, so the
fused-attention swaps apply to them and W8A8 to every MLP.
"""

from __future__ import annotations

import dataclasses
import re
from functools import partial
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import nn

#: SlimSAM's uniform checkpoints: (embed dim, MLP width); 12 blocks of 12 heads, ViT-B's layout.
SLIMSAM_UNIFORM = {"slimsam_50": (384, 1536), "slimsam_77": (168, 696)}
_VIT_B_GLOBAL = (2, 5, 8, 11)


@dataclasses.dataclass(frozen=True)
class BlockGeometry:
    """One ViT block: ``num_heads`` x ``head_dim`` attention width, MLP hidden width, window (0: global).
    ``num_heads == 0``: DC-ViT removed the block's attention (``x + mlp(norm2(x))`` only)."""

    num_heads: int
    head_dim: int
    mlp_dim: int
    window_size: int

    @property
    def has_attention(self) -> bool:
        return self.num_heads > 0


class MlpBlock(nn.Module):
    """A DC-ViT-compressed ViT block: attention removed, MLP (any width) kept: ``x + mlp(norm2(x))`` on
    (B, H, W, C) tokens. Parameter names are segment_anything ``Block``'s ``norm2.*`` and ``mlp.*``."""

    def __init__(self, dim: int, mlp_dim: int):
        super().__init__()
        from segment_anything.modeling.common import MLPBlock

        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm2(x))


@dataclasses.dataclass(frozen=True)
class EncoderGeometry:
    """A segment_anything ``ImageEncoderViT`` with per-block widths (SlimSAM prunes them per block)."""

    img_size: int
    patch_size: int
    embed_dim: int
    out_chans: int
    blocks: Tuple[BlockGeometry, ...]
    use_rel_pos: bool = True
    qkv_bias: bool = True

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def global_attn_indexes(self) -> Tuple[int, ...]:
        return tuple(i for i, b in enumerate(self.blocks) if b.window_size == 0 and b.has_attention)

    @property
    def uniform(self) -> bool:
        """Every block has the same heads, head dim and MLP width (SlimSAM's uniform checkpoints)."""
        return len({(b.num_heads, b.head_dim, b.mlp_dim) for b in self.blocks}) == 1


def slimsam_uniform_geometry(model_type: str) -> EncoderGeometry:
    """The encoder of SlimSAM's uniform ``"slimsam_50"`` / ``"slimsam_77"`` checkpoints."""
    if model_type not in SLIMSAM_UNIFORM:
        raise ValueError(f"model_type must be one of {tuple(SLIMSAM_UNIFORM)}, got {model_type!r}")
    embed, mlp = SLIMSAM_UNIFORM[model_type]
    blocks = tuple(BlockGeometry(12, embed // 12, mlp, 0 if i in _VIT_B_GLOBAL else 14) for i in range(12))
    return EncoderGeometry(img_size=1024, patch_size=16, embed_dim=embed, out_chans=256, blocks=blocks)


_MODULE_PREFIX = re.compile(r"(^|\.)module\.")
_SPLIT_QKV = re.compile(r"^(.*\.attn)\.([qkv])\.(weight|bias)$")


def normalize_state_dict(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """segment_anything's key names for a SAM-family state_dict: drops DataParallel's ``module.``
    (SlimSAM wraps its image encoder) and concatenates SlimSAM's split ``attn.q`` / ``attn.k`` /
    ``attn.v`` linears into ``attn.qkv``; drops TinyViT's ``attention_bias_idxs`` (a constant of the
    window size, saved by some versions). Other keys and every tensor pass through unchanged."""
    out: Dict[str, torch.Tensor] = {}
    split: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        key = _MODULE_PREFIX.sub(r"\1", key)
        if key.endswith(".attention_bias_idxs"):
            continue
        m = _SPLIT_QKV.match(key)
        if m:
            split.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        else:
            out[key] = value
    for (attn, kind), parts in split.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"state_dict has {attn}.{'/'.join(sorted(parts))}.{kind} but not all of q, k, v")
        if f"{attn}.qkv.{kind}" in out:
            raise ValueError(f"state_dict has both {attn}.qkv.{kind} and split {attn}.q/k/v.{kind}")
        out[f"{attn}.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out


def state_shape(state, key, dims, what):
    t = state.get(key)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"state_dict has no {key} ({what})")
    if t.dim() != dims:
        raise ValueError(f"state_dict {key} has shape {tuple(t.shape)}, expected {dims} dimensions ({what})")
    return tuple(int(s) for s in t.shape)


def encoder_geometry(state: Mapping[str, torch.Tensor], prefix: str = "image_encoder.",
                     num_heads: Optional[int] = None) -> EncoderGeometry:
    """Read a SAM ViT image encoder's geometry from its state_dict (keys after
    :func:`normalize_state_dict`; ``prefix`` is ``"image_encoder."`` for a whole ``Sam``, ``""`` for an
    encoder). Heads are ``qkv width / 3 / head dim`` with the head dim from the rel-pos tables; a model
    without rel-pos tables needs ``num_heads``. Raises ``ValueError`` naming the key that is missing or
    inconsistent."""
    embed, chans, ph, pw = state_shape(state, prefix + "patch_embed.proj.weight", 4, "the patch embedding")
    if chans != 3 or ph != pw:
        raise ValueError(f"{prefix}patch_embed.proj.weight: expected (embed, 3, p, p), got {(embed, chans, ph, pw)}")
    _, gh, gw, pos_dim = state_shape(state, prefix + "pos_embed", 4, "the absolute position embedding")
    if gh != gw or pos_dim != embed:
        raise ValueError(f"{prefix}pos_embed has shape {(1, gh, gw, pos_dim)}, expected (1, G, G, {embed})")
    out_chans = state_shape(state, prefix + "neck.0.weight", 4, "the neck")[0]
    depth = 0
    while f"{prefix}blocks.{depth}.norm2.weight" in state:
        depth += 1
    if depth == 0:
        raise ValueError(f"state_dict has no {prefix}blocks.0.norm2.weight: not a SAM ViT image encoder")
    attn_blocks = [i for i in range(depth) if f"{prefix}blocks.{i}.attn.qkv.weight" in state]
    use_rel_pos = bool(attn_blocks) and f"{prefix}blocks.{attn_blocks[0]}.attn.rel_pos_h" in state
    blocks = []
    for i in range(depth):
        b = f"{prefix}blocks.{i}."
        mlp_dim, mlp_in = state_shape(state, b + "mlp.lin1.weight", 2, "the MLP's first linear")
        if i not in attn_blocks and not any(k.startswith((b + "attn.", b + "norm1.")) for k in state):
            if mlp_in != embed:
                raise ValueError(f"{b}mlp.lin1.weight {(mlp_dim, mlp_in)} does not fit embed dim {embed}")
            blocks.append(BlockGeometry(0, 0, mlp_dim, 0))  # DC-ViT: attention removed
            continue
        width3, in_dim = state_shape(state, b + "attn.qkv.weight", 2, "the attention's qkv linear")
        if in_dim != embed or mlp_in != embed or width3 % 3:
            raise ValueError(f"{b}attn.qkv.weight {(width3, in_dim)} / mlp.lin1.weight {(mlp_dim, mlp_in)} do not "
                             f"fit embed dim {embed} (qkv rows must be 3 x heads x head_dim)")
        width = width3 // 3
        if use_rel_pos:
            rows, head_dim = state_shape(state, b + "attn.rel_pos_h", 2, "the rel-pos table")
            if width % head_dim:
                raise ValueError(f"{b}attn.rel_pos_h head dim {head_dim} does not divide the qkv width {width}")
            heads = width // head_dim
            if num_heads is not None and num_heads != heads:
                raise ValueError(f"num_heads={num_heads} but {b}attn has {heads} heads of {head_dim}")
            side = (rows + 1) // 2
            window = 0 if side == gh else side
        else:
            if num_heads is None or width % num_heads:
                raise ValueError(f"{b}attn has no rel-pos tables to read its head dim from: pass num_heads "
                                 f"(a divisor of the qkv width {width})")
            heads, head_dim, window = num_heads, width // num_heads, 0
        blocks.append(BlockGeometry(heads, head_dim, mlp_dim, window))
    if not attn_blocks:
        raise ValueError(f"state_dict has no {prefix}blocks.*.attn.qkv.weight: every block lacks attention")
    windows = {b.window_size for b in blocks} - {0}
    if len(windows) > 1:
        raise ValueError(f"{prefix}blocks use several window sizes {sorted(windows)}; segment_anything's "
                         "ImageEncoderViT has one")
    return EncoderGeometry(img_size=gh * ph, patch_size=ph, embed_dim=embed, out_chans=out_chans,
                           blocks=tuple(blocks), use_rel_pos=use_rel_pos,
                           qkv_bias=f"{prefix}blocks.{attn_blocks[0]}.attn.qkv.bias" in state)


def build_image_encoder(geom: EncoderGeometry) -> nn.Module:
    """segment_anything's ``ImageEncoderViT`` at ``geom``'s widths (uninitialised weights): blocks whose
    head dim or MLP width differ from ``embed / heads`` and ``4 * embed`` get narrowed ``qkv``, ``proj``,
    rel-pos tables and MLP linears in segment_anything's own classes, with the softmax scale of their
    own head dim; blocks without attention (DC-ViT) are :class:`MlpBlock`."""
    from segment_anything.modeling import ImageEncoderViT

    if not isinstance(geom, EncoderGeometry):
        raise TypeError(f"geom must be an EncoderGeometry, got {type(geom).__name__}")
    windows = {b.window_size for b in geom.blocks} - {0}
    first = next((b for b in geom.blocks if b.has_attention), None)
    if first is None:
        raise ValueError("geom has no block with attention")
    enc = ImageEncoderViT(
        img_size=geom.img_size, patch_size=geom.patch_size, embed_dim=geom.embed_dim, depth=len(geom.blocks),
        num_heads=first.num_heads, mlp_ratio=4.0, out_chans=geom.out_chans, qkv_bias=geom.qkv_bias,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), use_abs_pos=True, use_rel_pos=geom.use_rel_pos,
        window_size=windows.pop() if windows else 0, global_attn_indexes=geom.global_attn_indexes)
    for i, g in enumerate(geom.blocks):
        if not g.has_attention:
            enc.blocks[i] = MlpBlock(geom.embed_dim, g.mlp_dim)
            continue
        blk = enc.blocks[i]
        attn, width = blk.attn, g.num_heads * g.head_dim
        if attn.num_heads != g.num_heads or attn.qkv.out_features != 3 * width:
            attn.num_heads = g.num_heads
            attn.qkv = nn.Linear(geom.embed_dim, 3 * width, bias=geom.qkv_bias)
            attn.proj = nn.Linear(width, geom.embed_dim)
            if geom.use_rel_pos:
                side = g.window_size or geom.grid
                attn.rel_pos_h = nn.Parameter(torch.zeros(2 * side - 1, g.head_dim))
                attn.rel_pos_w = nn.Parameter(torch.zeros(2 * side - 1, g.head_dim))
        attn.scale = g.head_dim ** -0.5
        if blk.mlp.lin1.out_features != g.mlp_dim:
            blk.mlp.lin1 = nn.Linear(geom.embed_dim, g.mlp_dim)
            blk.mlp.lin2 = nn.Linear(g.mlp_dim, geom.embed_dim)
    return enc


def decoder_geometry(state: Mapping[str, torch.Tensor]) -> Tuple[int, int, int]:
    """(width, two-way transformer MLP width, IoU head hidden width) of a ``Sam`` state_dict's prompt
    encoder and mask decoder: (256, 2048, 256) for every released SAM family."""
    gauss = state_shape(state, "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", 2,
                   "the prompt encoder's positional encoding")
    mlp = state_shape(state, "mask_decoder.transformer.layers.0.mlp.lin1.weight", 2, "the two-way transformer's MLP")
    iou = state_shape(state, "mask_decoder.iou_prediction_head.layers.0.weight", 2, "the IoU head")
    return 2 * gauss[1], mlp[0], iou[0]


def build_sam_from_geometry(geom: EncoderGeometry, decoder_dim: int = 256, decoder_heads: int = 8,
                            decoder_mlp_dim: int = 2048, iou_hidden: int = 256) -> nn.Module:
    """A whole segment_anything ``Sam`` around :func:`build_image_encoder`, with segment_anything's
    ``PromptEncoder`` and ``MaskDecoder`` (SAM's: width 256, 8 heads, MLP 2048, by default)."""
    from .tiny import sam_around

    if geom.out_chans != decoder_dim:
        raise ValueError(f"the encoder's neck gives {geom.out_chans} channels but the decoder width is {decoder_dim}")
    return sam_around(build_image_encoder(geom), geom.img_size, decoder_dim, decoder_heads, decoder_mlp_dim,
                       iou_hidden, patch_size=geom.patch_size)
