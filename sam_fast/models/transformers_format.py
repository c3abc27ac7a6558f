"""SAM checkpoints in transformers' format (``config.json`` + ``model.safetensors``, as ``SamModel.save_pretrained``
writes them; SlimSAM's uniform models are distributed this way), to and from segment_anything's keys.

* :func:`read_transformers_dir` - a transformers SAM directory as a segment_anything state_dict, plus the
  decoder head count its config records (used by :func:`sam_fast.checkpoint.load_sam` for a directory);
* :func:`save_transformers` - a segment_anything ``Sam`` as such a directory (needs transformers).

The two key sets differ by names only: transformers calls the image encoder ``vision_encoder`` and its blocks
``layers`` with ``layer_norm1/2``; the neck's, the prompt encoder's mask downscaling and the decoder's upscaling
``nn.Sequential`` indices become named modules; the decoder's MLP heads name their first and last layer
``proj_in`` / ``proj_out``; the prompt encoder's random positional matrix is also stored once more at the top
level (``shared_image_embedding``). A model transformers' ``SamConfig`` cannot describe - per-block head dims or
MLP widths, blocks without attention, a TinyViT encoder, windows of several sizes, dilated attention - has no
transformers form: :func:`save_transformers` says which and why.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Dict, Optional, Tuple

import torch
from torch import nn

# (segment_anything, transformers) name pieces, most specific first; "{i}" is a block / layer number.
_PAIRS = (
    ("image_encoder.patch_embed.proj.", "vision_encoder.patch_embed.projection."),
    ("image_encoder.blocks.{i}.norm1.", "vision_encoder.layers.{i}.layer_norm1."),
    ("image_encoder.blocks.{i}.norm2.", "vision_encoder.layers.{i}.layer_norm2."),
    ("image_encoder.blocks.{i}.", "vision_encoder.layers.{i}."),
    ("image_encoder.neck.0.", "vision_encoder.neck.conv1."),
    ("image_encoder.neck.1.", "vision_encoder.neck.layer_norm1."),
    ("image_encoder.neck.2.", "vision_encoder.neck.conv2."),
    ("image_encoder.neck.3.", "vision_encoder.neck.layer_norm2."),
    ("image_encoder.", "vision_encoder."),
    ("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
     "prompt_encoder.shared_embedding.positional_embedding"),
    ("prompt_encoder.point_embeddings.{i}.", "prompt_encoder.point_embed.{i}."),
    ("prompt_encoder.mask_downscaling.0.", "prompt_encoder.mask_embed.conv1."),
    ("prompt_encoder.mask_downscaling.1.", "prompt_encoder.mask_embed.layer_norm1."),
    ("prompt_encoder.mask_downscaling.3.", "prompt_encoder.mask_embed.conv2."),
    ("prompt_encoder.mask_downscaling.4.", "prompt_encoder.mask_embed.layer_norm2."),
    ("prompt_encoder.mask_downscaling.6.", "prompt_encoder.mask_embed.conv3."),
    ("prompt_encoder.", "prompt_encoder."),
    ("mask_decoder.transformer.layers.{i}.norm{j}.", "mask_decoder.transformer.layers.{i}.layer_norm{j}."),
    ("mask_decoder.transformer.norm_final_attn.", "mask_decoder.transformer.layer_norm_final_attn."),
    ("mask_decoder.transformer.", "mask_decoder.transformer."),
    ("mask_decoder.output_upscaling.0.", "mask_decoder.upscale_conv1."),
    ("mask_decoder.output_upscaling.1.", "mask_decoder.upscale_layer_norm."),
    ("mask_decoder.output_upscaling.3.", "mask_decoder.upscale_conv2."),
    ("mask_decoder.iou_token.", "mask_decoder.iou_token."),
    ("mask_decoder.mask_tokens.", "mask_decoder.mask_tokens."),
)
_HEADS = ("mask_decoder.output_hypernetworks_mlps.{i}.", "mask_decoder.iou_prediction_head.")
_SHARED_PE = "shared_image_embedding.positional_embedding"
_SA_ONLY = ("pixel_mean", "pixel_std")


def _regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)"))


def _rename(key: str, to_hf: bool) -> Optional[str]:
    for sa, hf in _PAIRS:
        src, dst = (sa, hf) if to_hf else (hf, sa)
        m = _regex(src).match(key)
        if m:
            return dst.format(**m.groupdict()) + key[m.end():]
    return None


def _head_depths(keys, prefix_regex: re.Pattern, layer_regex: str) -> Dict[str, int]:
    """{head prefix: number of linear layers} of the decoder's MLP heads in ``keys``."""
    depth: Dict[str, int] = {}
    for k in keys:
        m = prefix_regex.match(k)
        if m:
            rest = k[m.end():]
            n = re.match(layer_regex, rest)
            if n:
                depth[m.group(0)] = max(depth.get(m.group(0), 0), int(n.group(1)) + 1)
    return depth


def _rename_head(key: str, to_hf: bool, depths: Dict[str, int]) -> Optional[str]:
    for template in _HEADS:
        m = _regex(template).match(key)
        if not m:
            continue
        prefix, rest = m.group(0), key[m.end():]
        if to_hf:
            n = re.match(r"layers\.(\d+)\.(.*)$", rest)
            last = depths[prefix] - 1
            k = int(n.group(1))
            name = "proj_in" if k == 0 else "proj_out" if k == last else f"layers.{k - 1}"
            return f"{prefix}{name}.{n.group(2)}"
        n = re.match(r"(proj_in|proj_out|layers\.(\d+))\.(.*)$", rest)
        last = depths[prefix] + 1  # transformers' "layers" are the middle ones
        k = 0 if n.group(1) == "proj_in" else last if n.group(1) == "proj_out" else int(n.group(2)) + 1
        return f"{prefix}layers.{k}.{n.group(3)}"
    return None


def sam_to_transformers_state(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """segment_anything ``Sam`` keys -> transformers ``SamModel`` keys (``ValueError`` for a key neither knows)."""
    heads = {**_head_depths(state, _regex(_HEADS[0]), r"layers\.(\d+)\."),
             **_head_depths(state, _regex(_HEADS[1]), r"layers\.(\d+)\.")}
    out = {}
    for key, value in state.items():
        if key in _SA_ONLY:
            continue
        new = _rename_head(key, True, heads) or _rename(key, True)
        if new is None:
            raise ValueError(f"sam: state_dict key {key!r} has no counterpart in transformers' SamModel")
        out[new] = value
    pe = out.get("prompt_encoder.shared_embedding.positional_embedding")
    if pe is not None:
        out[_SHARED_PE] = pe
    return out


def transformers_to_sam_state(state: Dict[str, torch.Tensor], where: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """transformers ``SamModel`` keys -> segment_anything ``Sam`` keys."""
    middle = {**_head_depths(state, _regex(_HEADS[0]), r"layers\.(\d+)\."),
              **_head_depths(state, _regex(_HEADS[1]), r"layers\.(\d+)\.")}
    for template in _HEADS:  # heads of depth 2 have no middle layers
        for k in state:
            m = _regex(template).match(k)
            if m:
                middle.setdefault(m.group(0), 0)
    out = {}
    for key, value in state.items():
        if key == _SHARED_PE:
            continue
        new = _rename_head(key, False, middle) or _rename(key, False)
        if new is None:
            raise ValueError(f"{where}: key {key!r} is not part of a transformers SamModel that segment_anything "
                             "can hold (SAM-HQ's extra decoder layers, for example, are not)")
        out[new] = value
    if "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" not in out and _SHARED_PE in state:
        out["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = state[_SHARED_PE]
    return out


# ------------------------------------------------------------------------------------------------
# Directories
# ------------------------------------------------------------------------------------------------


def is_transformers_dir(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.path.isdir(path) and \
        os.path.isfile(os.path.join(path, "config.json"))


def _load_weights(directory: str) -> Dict[str, torch.Tensor]:
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(single) or os.path.isfile(index):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"checkpoint {directory} is in safetensors format: pip install safetensors "
                              "(or sam_fast[transformers])") from None
        if os.path.isfile(single):
            return _read_safetensors(load_file, single)
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"checkpoint {directory}: model.safetensors.index.json is not an index of weight files "
                             f"({type(exc).__name__}: {exc})") from None
        state = {}
        for shard in shards:
            state.update(_read_safetensors(load_file, os.path.join(directory, shard)))
        return state
    binary = os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(binary):
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"checkpoint {directory} has a config.json but no model.safetensors, "
                            "model.safetensors.index.json or pytorch_model.bin")


def _read_safetensors(load_file, path: str) -> Dict[str, torch.Tensor]:
    """safetensors' load_file, with an error that names the file (its own, e.g. for a truncated file, does not)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path} does not exist (named by the index)")
    try:
        return load_file(path)
    except Exception as exc:
        raise ValueError(f"checkpoint file {path} cannot be read as safetensors ({type(exc).__name__}: {exc}); "
                         "a truncated download?") from None


#: config fields a state_dict cannot show, with the value segment_anything's modules have: a config with another
#: would describe a model that load_sam would silently build differently from SamModel.from_pretrained
_FIXED_CONFIG = {
    "vision_config": {"hidden_act": "gelu", "layer_norm_eps": 1e-6, "use_rel_pos": True, "use_abs_pos": True},
    "prompt_encoder_config": {"hidden_act": "gelu", "layer_norm_eps": 1e-6},
    "mask_decoder_config": {"hidden_act": "relu", "layer_norm_eps": 1e-6},
}


def _check_config(config: dict, directory: str) -> int:
    """config.json's sections and the fields sam_fast reads or cannot honour, checked (``ValueError`` naming
    config.json and the field); returns the mask decoder's head count."""
    where = f"checkpoint {directory}: config.json"
    for section, fixed in _FIXED_CONFIG.items():
        sub = config.get(section)
        if sub is None:
            continue
        if not isinstance(sub, dict):
            raise ValueError(f"{where}: {section} must be an object, got {type(sub).__name__}")
        for field, want in fixed.items():
            if field not in sub:
                continue
            got = sub[field]
            same = (got == want and type(got) is type(want)) if isinstance(want, (bool, str)) else \
                (isinstance(got, (int, float)) and not isinstance(got, bool) and math.isclose(got, want))
            if not same:
                raise ValueError(f"{where}: {section}.{field} is {got!r}, but segment_anything's SAM (what load_sam "
                                 f"builds) has {want!r}; transformers' SamModel would run another model")
    heads = (config.get("mask_decoder_config") or {}).get("num_attention_heads", 8)
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"{where}: mask_decoder_config.num_attention_heads must be a positive int, got {heads!r}")
    return heads


def read_transformers_dir(directory: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(segment_anything state_dict, {"decoder_heads": n}) of a transformers SAM directory; for a SAM 2 one
    (``Sam2Model``), Meta's SAM2Base state_dict of its image part and {"family": "sam2", "hiera": geometry}."""
    with open(os.path.join(directory, "config.json")) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"checkpoint {directory}: config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"checkpoint {directory}: config.json must hold a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type == "sam2":  # Sam2Model: Meta's SAM2Base names for its image part
        from .transformers_sam2 import hiera_geometry, sam2_state_from_transformers

        where = f"checkpoint {directory}"
        geometry = hiera_geometry(config, where)
        return sam2_state_from_transformers(_load_weights(directory), where), {
            "source": "transformers", "family": "sam2", "hiera": geometry}
    if model_type not in ("sam", "sam_hq"):
        raise ValueError(f"checkpoint {directory}: config.json describes a {model_type!r} model, not SAM ('sam') "
                         "nor SAM 2 ('sam2')")
    if model_type == "sam_hq":
        raise ValueError(f"checkpoint {directory} is a SAM-HQ model: its HQ decoder has no segment_anything form (its "
                         "vision encoder does; sam_fast.apply accepts SamHQModel directly)")
    heads = _check_config(config, directory)
    state = transformers_to_sam_state(_load_weights(directory), f"checkpoint {directory}")
    return state, {"decoder_heads": heads, "source": "transformers"}


def _uniform(values, what: str):
    values = set(values)
    if len(values) != 1:
        raise ValueError(f"sam has no transformers form: transformers' SamVisionConfig has one {what} for every block, "
                         f"this encoder has {sorted(values)}")
    return values.pop()


def transformers_config(sam: nn.Module) -> dict:
    """The ``SamConfig`` keyword arguments (vision, prompt encoder, mask decoder dicts) that describe ``sam``'s
    geometry; ``ValueError`` naming what transformers cannot describe. (What sam_fast changed in a model - int8
    layers, dilated blocks - is refused one level up, by :func:`sam_fast.checkpoint.save_transformers`.)"""
    from .vit import decoder_geometry, encoder_geometry

    enc = getattr(sam, "image_encoder", None)
    if enc is None or not hasattr(enc, "blocks"):
        raise ValueError(f"sam has no transformers form: transformers' SamModel has a ViT image encoder, this is a "
                         f"{type(enc).__name__}")
    state = sam.state_dict()
    geom = encoder_geometry(state)
    if any(not b.has_attention for b in geom.blocks):
        raise ValueError("sam has no transformers form: some blocks have no attention (DC-ViT)")
    heads = _uniform((b.num_heads for b in geom.blocks), "head count")
    head_dim = _uniform((b.head_dim for b in geom.blocks), "head dim")
    if heads * head_dim != geom.embed_dim:
        raise ValueError(f"sam has no transformers form: its attention is {heads} x {head_dim} wide but the blocks "
                         f"are {geom.embed_dim} wide; transformers ties the two")
    mlp_dim = _uniform((b.mlp_dim for b in geom.blocks), "MLP width")
    windows = {b.window_size for b in geom.blocks if b.window_size}
    window = _uniform(windows, "window size") if windows else 0
    width, dec_mlp, iou_hidden = decoder_geometry(state)
    transformer = sam.mask_decoder.transformer
    cross = transformer.layers[0].cross_attn_token_to_image
    md = sam.mask_decoder
    vision = dict(hidden_size=geom.embed_dim, output_channels=geom.out_chans, num_hidden_layers=len(geom.blocks),
                  num_attention_heads=heads, image_size=geom.img_size, patch_size=geom.patch_size,
                  qkv_bias=geom.qkv_bias, use_rel_pos=geom.use_rel_pos, use_abs_pos=True,
                  window_size=window, global_attn_indexes=[i for i, b in enumerate(geom.blocks) if not b.window_size],
                  mlp_dim=mlp_dim, mlp_ratio=mlp_dim / geom.embed_dim, num_pos_feats=width // 2, scale=width // 2,
                  layer_norm_eps=float(enc.blocks[0].norm1.eps))
    prompt = dict(hidden_size=width, image_size=geom.img_size, patch_size=geom.patch_size,
                  mask_input_channels=int(state["prompt_encoder.mask_downscaling.3.weight"].shape[0]),
                  num_point_embeddings=len(sam.prompt_encoder.point_embeddings),
                  image_embedding_size=geom.img_size // geom.patch_size)
    decoder = dict(hidden_size=width, num_attention_heads=int(transformer.num_heads), mlp_dim=dec_mlp,
                   num_hidden_layers=len(transformer.layers), attention_downsample_rate=width // cross.internal_dim,
                   num_multimask_outputs=int(md.num_multimask_outputs),
                   iou_head_depth=len(md.iou_prediction_head.layers), iou_head_hidden_dim=iou_hidden)
    return {"vision_config": vision, "prompt_encoder_config": prompt, "mask_decoder_config": decoder}
