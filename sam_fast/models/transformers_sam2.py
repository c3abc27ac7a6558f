"""transformers' SAM 2 image model (``Sam2Model``: Hiera trunk, FPN neck, prompt encoder, mask decoder) as the
state_dict of Meta's ``SAM2Base``, for :func:`sam_fast.load_sam`.

The two name the same tensors differently; every tensor but one keeps its values and shape:

* trunk ``vision_encoder.backbone.`` -> ``image_encoder.trunk.`` (``layer_norm1/2`` -> ``norm1/2``, the MLP's
  ``proj_in/proj_out`` -> ``layers.0/1``, ``patch_embed.projection`` -> ``patch_embed.proj``), neck
  ``vision_encoder.neck.convs.i`` -> ``image_encoder.neck.convs.i.conv``;
* prompt encoder: ``point_embed`` (4, C) is Meta's four ``point_embeddings.i`` (1, C) stacked, ``mask_embed``'s
  convs and norms are ``mask_downscaling``'s positions 0 / 1 / 3 / 4 / 6, ``shared_embedding.positional_embedding``
  is ``pe_layer.positional_encoding_gaussian_matrix`` (the model-level ``shared_image_embedding`` copy of it is
  dropped, after checking that it is the same);
* mask decoder: attention ``o_proj`` -> ``out_proj``, ``layer_norm*`` -> ``norm*``, two-layer MLPs
  ``proj_in/proj_out`` -> ``layers.0/1``, three-layer heads ``proj_in/layers.0/proj_out`` -> ``layers.0/1/2``,
  ``upscale_conv1 / upscale_layer_norm / upscale_conv2`` -> ``output_upscaling.0/1/3``;
* ``no_memory_embedding`` -> ``no_mem_embed``.

``Sam2Model`` holds no video memory (memory attention and encoder, object pointers): a model loaded from it is for
images (:class:`sam_fast.Sam2FastPredictor`, the automatic mask generator); those modules keep their
initialisation and the model says so (``sam_fast_image_only``).
"""

from __future__ import annotations

import re
from typing import Dict, Tuple

import torch

#: key prefixes of Meta's SAM2Base that transformers' Sam2Model holds (everything else is video memory)
IMAGE_PREFIXES = ("image_encoder.", "sam_prompt_encoder.", "sam_mask_decoder.", "no_mem_embed")

_PREFIXES = (("vision_encoder.backbone.", "image_encoder.trunk."), ("prompt_encoder.", "sam_prompt_encoder."),
             ("mask_decoder.", "sam_mask_decoder."))
_TRUNK_RENAMES = (("patch_embed.projection.", "patch_embed.proj."), (".layer_norm1.", ".norm1."),
                  (".layer_norm2.", ".norm2."), (".mlp.proj_in.", ".mlp.layers.0."),
                  (".mlp.proj_out.", ".mlp.layers.1."))
_PROMPT_RENAMES = (("shared_embedding.positional_embedding", "pe_layer.positional_encoding_gaussian_matrix"),
                   ("mask_embed.conv1.", "mask_downscaling.0."), ("mask_embed.layer_norm1.", "mask_downscaling.1."),
                   ("mask_embed.conv2.", "mask_downscaling.3."), ("mask_embed.layer_norm2.", "mask_downscaling.4."),
                   ("mask_embed.conv3.", "mask_downscaling.6."))
_DECODER_RENAMES = ((".o_proj.", ".out_proj."), ("layer_norm_final_attn.", "norm_final_attn."),
                    ("upscale_conv1.", "output_upscaling.0."), ("upscale_layer_norm.", "output_upscaling.1."),
                    ("upscale_conv2.", "output_upscaling.3."), (".mlp.proj_in.", ".mlp.layers.0."),
                    (".mlp.proj_out.", ".mlp.layers.1."))
_HEAD = re.compile(r"^(output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head)\."
                   r"(proj_in|layers\.0|proj_out)\.")
_HEAD_LAYER = {"proj_in": "layers.0", "layers.0": "layers.1", "proj_out": "layers.2"}
_NORM = re.compile(r"\.layer_norm(\d)\.")
_NECK = re.compile(r"^vision_encoder\.neck\.convs\.(\d+)\.")
_SHARED_PE = "shared_image_embedding.positional_embedding"


def _meta_key(key: str) -> str:
    """Meta's name of one of Sam2Model's tensors (``point_embed`` and the shared PE are handled by the caller)."""
    if key == "no_memory_embedding":
        return "no_mem_embed"
    neck = _NECK.match(key)
    if neck:
        return f"image_encoder.neck.convs.{neck.group(1)}.conv." + key[neck.end():]
    for hf, meta in _PREFIXES:
        if not key.startswith(hf):
            continue
        rest = key[len(hf):]
        if meta == "image_encoder.trunk.":
            for a, b in _TRUNK_RENAMES:
                rest = rest.replace(a, b)
        elif meta == "sam_prompt_encoder.":
            for a, b in _PROMPT_RENAMES:
                rest = rest.replace(a, b) if rest.startswith(a) else rest
        else:
            head = _HEAD.match(rest)
            if head:
                rest = f"{head.group(1)}.{_HEAD_LAYER[head.group(2)]}." + rest[head.end():]
            for a, b in _DECODER_RENAMES:
                rest = rest.replace(a, b)
            rest = _NORM.sub(r".norm\1.", rest)
        return meta + rest
    raise ValueError(f"{key!r} is not a tensor of transformers' Sam2Model (image encoder, prompt encoder, mask "
                     "decoder)")


def sam2_state_from_transformers(state: Dict[str, torch.Tensor], where: str) -> Dict[str, torch.Tensor]:
    """Meta's SAM2Base names (the image part, :data:`IMAGE_PREFIXES`) for a ``Sam2Model`` state_dict; ValueError
    naming ``where`` and the key for a tensor that is not one of Sam2Model's or a malformed point embedding."""
    out = {}
    for key, value in state.items():
        if key == _SHARED_PE:
            continue
        if key == "prompt_encoder.point_embed.weight":
            if value.dim() != 2 or value.shape[0] != 4:
                raise ValueError(f"{where}: prompt_encoder.point_embed.weight must be (4, C) (SAM's four point "
                                 f"labels), got {tuple(value.shape)}")
            for i in range(4):
                out[f"sam_prompt_encoder.point_embeddings.{i}.weight"] = value[i:i + 1].clone()
            continue
        try:
            out[_meta_key(key)] = value
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    shared = state.get(_SHARED_PE)
    own = state.get("prompt_encoder.shared_embedding.positional_embedding")
    if shared is not None and own is not None and not torch.equal(shared, own):
        raise ValueError(f"{where}: shared_image_embedding and prompt_encoder.shared_embedding hold different "
                         "positional encodings; Meta's SAM2Base uses one for the image and the prompts (as "
                         "transformers' converted releases hold it twice), so this model has no SAM2Base form")
    return out


def hiera_geometry(config: dict, where: str) -> Tuple[tuple, ...]:
    """(blocks per stage, heads per stage, windows per stage, global blocks) of a ``Sam2Config`` dict's Hiera trunk
    (transformers' defaults where a field is absent), for comparing with the released trunk the weights match."""
    vision = config.get("vision_config") or {}
    backbone = vision.get("backbone_config") or {}
    if not isinstance(backbone, dict):
        raise ValueError(f"{where}: config.json's vision_config.backbone_config must be an object")
    fields = (("blocks_per_stage", [1, 2, 7, 2]), ("num_attention_heads_per_stage", [1, 2, 4, 8]),
              ("window_size_per_stage", [8, 4, 14, 7]), ("global_attention_blocks", [5, 7, 9]))
    out = []
    for name, default in fields:
        value = backbone.get(name, default)
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"{where}: vision_config.backbone_config.{name} must be a list of ints, got {value!r}")
        out.append(tuple(value))
    return tuple(out)


def meta_hiera_geometry(model) -> Tuple[tuple, ...]:
    """The same four tuples for Meta's model (its Hiera trunk as built)."""
    trunk = model.image_encoder.trunk
    ends = list(trunk.stage_ends)
    blocks = tuple(e - s for s, e in zip([-1] + ends[:-1], ends))
    heads = tuple(trunk.blocks[e].attn.num_heads for e in ends)
    return blocks, heads, tuple(trunk.window_spec), tuple(trunk.global_att_blocks)
