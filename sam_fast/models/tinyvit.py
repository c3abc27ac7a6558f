"""TinyViT image encoders of MobileSAM and TinySAM (model type ``"vit_t"``), with their official keys.

MobileSAM distilled SAM ViT-H into TinyViT-5M and TinySAM trained the same encoder further; both save a
whole ``Sam`` state_dict whose ``image_encoder.*`` keys are laid out as here, with segment_anything's
prompt encoder and mask decoder beside it. At 1024 x 1024 (embed dims 64/128/160/320, depths 2/2/6/2,
heads 2/4/5/10, windows 7/7/14/7)::

    patch_embed.seq   Conv3x3/2+BN, GELU, Conv3x3/2+BN                       3 x 1024^2 -> 64 x 256^2
    layers.0          MBConv blocks (1x1 expand x4, 3x3 depthwise, 1x1, residual); PatchMerging -> 128^2
    layers.1, .2      TinyViT blocks; PatchMerging (stride 2 into stage 2, stride 1 into stage 3)
    layers.3          TinyViT blocks at 64^2
    neck              segment_anything's neck                               -> (B, 256, 64, 64)
    norm_head, head   TinyViT's ImageNet classifier: unused, kept so checkpoints load strictly

A TinyViT block: ``x + attn(x)`` over windows (zero padded at the bottom/right *before* the attention's
own LayerNorm, as MobileSAM does), a 3x3 depthwise ``local_conv`` (+BN), then ``x + mlp(x)`` with the
LayerNorm inside the MLP. The attention adds a learned bias per head and per (|dy|, |dx|) offset inside
the window; q, k, v are interleaved per head in ``qkv``'s output. Attention runs through PyTorch's SDPA
with the bias as its mask (sam_fast's kernel takes SAM's decomposed rel-pos bias, not this table).

TinySAM's checkpoints may nest the state_dict under ``"model"`` (unwrapped by ``load_sam``), and its
mask decoder always returns the three multimask outputs (TinySAM drops the single-mask token whatever
``multimask_output`` says): with TinySAM weights ask for ``multimask_output=True``.

W8A8 (``sam_fast.apply(..., SamFastConfig(attention="none", quantize="int8"))``) swaps ``attn.qkv``,
``attn.proj``, ``mlp.fc1`` and ``mlp.fc2`` for :class:`sam_fast.nn.Int8Linear`, then the attention and MLP
modules for their fused forms (:mod:`sam_fast.nn.quantized`), which fuse the LayerNorms into the int8 GEMMs'
input quantization and, with a calibrated ``fc2``, write fc1's GELU output in int8 - the same fusions as a
SAM ViT block. These classes stay plain PyTorch.
"""

from __future__ import annotations

import re
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

#: MobileSAM's / TinySAM's encoder: TinyViT-5M at 1024 x 1024.
VIT_T = dict(img_size=1024, embed_dims=(64, 128, 160, 320), depths=(2, 2, 6, 2), num_heads=(2, 4, 5, 10),
             window_sizes=(7, 7, 14, 7))


class Conv2dBN(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d (keys ``c.*``, ``bn.*``)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, pad: int = 0, groups: int = 1):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, kernel, stride, pad, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.seq = nn.Sequential(Conv2dBN(3, dim // 2, 3, 2, 1), nn.GELU(), Conv2dBN(dim // 2, dim, 3, 2, 1))

    def forward(self, x):
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, GELU after the residual add."""

    def __init__(self, dim: int, expand: float):
        super().__init__()
        hidden = int(dim * expand)
        self.conv1, self.act1 = Conv2dBN(dim, hidden), nn.GELU()
        self.conv2, self.act2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden), nn.GELU()
        self.conv3, self.act3 = Conv2dBN(hidden, dim), nn.GELU()

    def forward(self, x):
        y = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.act3(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """1x1 conv to the next width, 3x3 depthwise conv with ``stride``, 1x1 conv; out (B, H'W', C')."""

    def __init__(self, resolution: Tuple[int, int], dim: int, out_dim: int, stride: int):
        super().__init__()
        self.resolution = resolution
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)
        self.act = nn.GELU()

    def forward(self, x):
        if x.dim() == 3:  # tokens (B, H*W, C) from a TinyViT stage
            H, W = self.resolution
            x = x.view(x.shape[0], H, W, -1).permute(0, 3, 1, 2)
        x = self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))
        return x.flatten(2).transpose(1, 2)


class TinyViTAttention(nn.Module):
    """Window self-attention with TinyViT's learned per-offset bias; input and output (B', N, C)."""

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be a multiple of num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        pos = torch.arange(window)
        dy = (pos[:, None, None, None] - pos[None, None, :, None]).abs()  # (row q, ., row k, .)
        dx = (pos[None, :, None, None] - pos[None, None, None, :]).abs()
        idx = (dy * window + dx).reshape(window * window, window * window)
        self.register_buffer("attention_bias_idxs", idx, persistent=False)

    def bias(self) -> torch.Tensor:
        """(heads, N, N) additive attention bias of one window."""
        return self.attention_biases[:, self.attention_bias_idxs]

    def forward(self, x):
        return self.attend(self.qkv(self.norm(x)))

    def attend(self, qkv):
        """Attention and projection from the (B, N, 3 * C) ``qkv`` of a window's tokens."""
        B, N, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = qkv.view(B, N, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias().to(q.dtype), scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class TinyViTMlp(nn.Module):
    """LayerNorm, fc1, GELU, fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    def __init__(self, dim: int, resolution: Tuple[int, int], num_heads: int, window_size: int,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.resolution, self.window_size = resolution, window_size
        self.attn = TinyViTAttention(dim, num_heads, window_size)
        self.mlp = TinyViTMlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, 3, 1, 1, groups=dim)

    def _windowed_attention(self, x):
        H, W = self.resolution
        B, L, C = x.shape
        ws = self.window_size
        if H == ws and W == ws:
            return self.attn(x)
        pad_b, pad_r = (-H) % ws, (-W) % ws
        y = F.pad(x.view(B, H, W, C), (0, 0, 0, pad_r, 0, pad_b))  # zeros, normalised by attn.norm
        nh, nw = (H + pad_b) // ws, (W + pad_r) // ws
        y = y.view(B, nh, ws, nw, ws, C).transpose(2, 3).reshape(B * nh * nw, ws * ws, C)
        y = self.attn(y).view(B, nh, nw, ws, ws, C).transpose(2, 3).reshape(B, nh * ws, nw * ws, C)
        return y[:, :H, :W].reshape(B, L, C)

    def forward(self, x):
        H, W = self.resolution
        B, L, C = x.shape
        x = x + self._windowed_attention(x)
        x = self.local_conv(x.transpose(1, 2).reshape(B, C, H, W)).view(B, C, L).transpose(1, 2)
        return x + self.mlp(x)


class _Stage(nn.Module):
    """``blocks`` in order, then ``downsample`` (a PatchMerging into the next stage, or None)."""

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class ConvLayer(_Stage):
    def __init__(self, dim: int, depth: int, expand: float, downsample):
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand) for _ in range(depth))
        self.downsample = downsample


class BasicLayer(_Stage):
    def __init__(self, dim: int, resolution: Tuple[int, int], depth: int, num_heads: int, window_size: int,
                 mlp_ratio: float, downsample):
        super().__init__()
        self.blocks = nn.ModuleList(TinyViTBlock(dim, resolution, num_heads, window_size, mlp_ratio)
                                    for _ in range(depth))
        self.downsample = downsample


class TinyViT(nn.Module):
    """MobileSAM's TinyViT image encoder: (B, 3, img_size, img_size) -> (B, out_chans, img_size/16, img_size/16).

    Stage i runs at ``img_size / 4 / 2**i`` except the last, which keeps the previous stage's resolution
    (so the output is on SAM's 16-pixel grid)."""

    def __init__(self, img_size: int = 1024, embed_dims: Sequence[int] = VIT_T["embed_dims"],
                 depths: Sequence[int] = VIT_T["depths"], num_heads: Sequence[int] = VIT_T["num_heads"],
                 window_sizes: Sequence[int] = VIT_T["window_sizes"], mlp_ratio: float = 4.0,
                 mbconv_expand_ratio: float = 4.0, out_chans: int = 256, num_classes: int = 1000):
        super().__init__()
        from segment_anything.modeling.common import LayerNorm2d

        n = len(embed_dims)
        if not (n >= 2 and len(depths) == len(num_heads) == len(window_sizes) == n):
            raise ValueError(f"embed_dims, depths, num_heads and window_sizes must have one entry per stage (>= 2), "
                             f"got {len(embed_dims)}, {len(depths)}, {len(num_heads)}, {len(window_sizes)}")
        if img_size % (4 * 2 ** (n - 2)):
            raise ValueError(f"img_size {img_size} must be a multiple of {4 * 2 ** (n - 2)} for {n} stages")
        self.img_size = img_size
        self.patch_embed = PatchEmbed(embed_dims[0])
        res = [img_size // 4 // 2 ** min(i, n - 2) for i in range(n)]
        self.output_size = res[-1]
        self.layers = nn.ModuleList()
        for i in range(n):
            down = None
            if i < n - 1:
                down = PatchMerging((res[i], res[i]), embed_dims[i], embed_dims[i + 1], 2 if res[i + 1] < res[i] else 1)
            if i == 0:
                self.layers.append(ConvLayer(embed_dims[0], depths[0], mbconv_expand_ratio, down))
            else:
                self.layers.append(BasicLayer(embed_dims[i], (res[i], res[i]), depths[i], num_heads[i],
                                              window_sizes[i], mlp_ratio, down))
        self.norm_head = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes)
        self.neck = nn.Sequential(nn.Conv2d(embed_dims[-1], out_chans, 1, bias=False), LayerNorm2d(out_chans),
                                  nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False), LayerNorm2d(out_chans))

    def forward(self, x):
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        B, L, C = x.shape
        side = self.output_size
        return self.neck(x.view(B, side, side, C).permute(0, 3, 1, 2))


def build_vit_t(img_size: int = VIT_T["img_size"], **tinyvit_kwargs) -> nn.Module:
    """segment_anything's ``Sam`` with MobileSAM's / TinySAM's TinyViT encoder (uninitialised weights)."""
    from .tiny import sam_around

    encoder = TinyViT(img_size=img_size, **tinyvit_kwargs)
    return sam_around(encoder, img_size, 256, 8, 2048, 256).eval()


def is_tinyvit_state(state, prefix: str = "image_encoder.") -> bool:
    """Whether a state_dict holds a TinyViT image encoder (MobileSAM / TinySAM layout)."""
    return f"{prefix}layers.0.blocks.0.conv1.c.weight" in state and f"{prefix}patch_embed.seq.0.c.weight" in state


def tinyvit_config(state, prefix: str = "image_encoder.", img_size: int = VIT_T["img_size"]) -> dict:
    """:class:`TinyViT` constructor arguments read from a state_dict's shapes (the input size is not
    stored in one: ``img_size``, 1024 for MobileSAM and TinySAM). Raises ``ValueError`` naming the key
    that is missing or inconsistent."""
    from .vit import state_shape

    def shape(key, dims=2):
        return state_shape(state, prefix + key, dims, "a TinyViT encoder")

    blocks = {}  # stage -> number of blocks, from the keys ``layers.<stage>.blocks.<block>.``
    for key in state:
        m = re.match(re.escape(prefix) + r"layers\.(\d+)\.blocks\.(\d+)\.", key)
        if m:
            blocks[int(m.group(1))] = max(blocks.get(int(m.group(1)), 0), int(m.group(2)) + 1)
    n = len(blocks)
    if n < 2 or sorted(blocks) != list(range(n)):
        raise ValueError(f"state_dict has TinyViT stages {sorted(blocks)} under {prefix}layers, expected 0, 1, ...")
    dims, depths, heads, windows, ratios = [shape("patch_embed.seq.2.c.weight", 4)[0]], [], [0], [0], set()
    for i in range(n):
        depths.append(blocks[i])
        if i == 0:
            expand = shape("layers.0.blocks.0.conv1.c.weight", 4)[0] / dims[0]
            continue
        dim = shape(f"layers.{i}.blocks.0.attn.qkv.weight")[1]
        nh, offsets = shape(f"layers.{i}.blocks.0.attn.attention_biases")
        window = int(round(offsets ** 0.5))
        if window * window != offsets:
            raise ValueError(f"{prefix}layers.{i}.blocks.0.attn.attention_biases has {offsets} offsets, not a "
                             "square window's")
        dims.append(dim)
        heads.append(nh)
        windows.append(window)
        ratios.add(shape(f"layers.{i}.blocks.0.mlp.fc1.weight")[0] / dim)
    if len(ratios) != 1:
        raise ValueError(f"{prefix}layers.*.mlp.fc1 widths give several MLP ratios {sorted(ratios)}; TinyViT has one")
    return dict(img_size=img_size, embed_dims=tuple(dims), depths=tuple(depths), num_heads=tuple(heads),
                window_sizes=tuple(windows), mlp_ratio=ratios.pop(), mbconv_expand_ratio=expand,
                out_chans=shape("neck.0.weight", 4)[0], num_classes=shape("head.weight")[0])
