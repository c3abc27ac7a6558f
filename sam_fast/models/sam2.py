"""SAM 2.1's image encoders as Meta's ``sam2`` package builds them (its Hiera trunk and FPN neck), from the released
configurations, with random weights: what benchmarks and tests time and check ``sam_fast.apply`` against. Building
needs the ``sam2`` package (``pip install sam_fast[sam2]``; it is an sdist: ``SAM2_BUILD_CUDA=0`` skips its optional
CUDA extension)."""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

#: the Hiera trunks of SAM 2.1's released image encoders (its configs' ``trunk`` entries; Hiera's defaults otherwise:
#: windows 8, 4, 14, 7, queries pooled 2 x 2 at each stage change); all take 1024 px images
HIERA_CONFIGS: Dict[str, dict] = {
    "hiera_t": dict(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2), global_att_blocks=(5, 7, 9),
                    window_pos_embed_bkg_spatial_size=(7, 7)),
    "hiera_s": dict(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2), global_att_blocks=(7, 10, 13),
                    window_pos_embed_bkg_spatial_size=(7, 7)),
    "hiera_b+": dict(embed_dim=112, num_heads=2),
    "hiera_l": dict(embed_dim=144, num_heads=2, stages=(2, 6, 36, 4), global_att_blocks=(23, 33, 43),
                    window_pos_embed_bkg_spatial_size=(7, 7), window_spec=(8, 4, 16, 8)),
}


def sam2_available() -> bool:
    """Whether Meta's ``sam2`` package can be imported."""
    try:
        import sam2.modeling.backbones.hieradet  # noqa: F401
    except ImportError:
        return False
    return True


def _require_sam2() -> None:
    if not sam2_available():
        raise ImportError("SAM 2's models need Meta's sam2 package: pip install 'sam_fast[sam2]' (with "
                          "SAM2_BUILD_CUDA=0 to skip its CUDA extension)")


def build_sam2_image_encoder(name: str, seed: int = 0) -> nn.Module:
    """SAM 2.1's image encoder ``name`` (a key of :data:`HIERA_CONFIGS`) as Meta's ``ImageEncoder``: the Hiera trunk
    and the FPN neck (256 channels, sine position encodings, nearest-neighbour top-down sums into the two finest
    levels, the coarsest level dropped), in eval mode, with random weights seeded by ``seed``: layers as PyTorch
    initialises them, the position embeddings N(0, 0.2) (SAM 2 initialises them to zero, which would hide them)."""
    if name not in HIERA_CONFIGS:
        raise ValueError(f"name must be one of {sorted(HIERA_CONFIGS)}, got {name!r}")
    _require_sam2()
    from sam2.modeling.backbones.hieradet import Hiera
    from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
    from sam2.modeling.position_encoding import PositionEmbeddingSine

    torch.manual_seed(seed)
    trunk = Hiera(**HIERA_CONFIGS[name])
    neck = FpnNeck(PositionEmbeddingSine(num_pos_feats=256, normalize=True, temperature=10000), 256,
                   trunk.channel_list, fpn_top_down_levels=[2, 3], fpn_interp_model="nearest")
    encoder = ImageEncoder(trunk, neck, scalp=1)
    with torch.no_grad():
        for pname, p in encoder.named_parameters():
            if "pos_embed" in pname:
                p.normal_(0.0, 0.2)
    return encoder.eval()


# --- SAM 2 / 2.1 checkpoints (Meta's .pt files: {"model": state_dict}) ------------------------------------------------

#: SAM 2's released models: the config inside Meta's sam2 package that builds each
SAM2_MODEL_TYPES: Dict[str, str] = {
    f"{version}_{trunk}": f"configs/{version}/{version}_{trunk}.yaml"
    for version in ("sam2", "sam2.1") for trunk in HIERA_CONFIGS}

#: (embedding width, blocks) of each released Hiera trunk
_TRUNKS = {(96, 12): "hiera_t", (96, 16): "hiera_s", (112, 24): "hiera_b+", (144, 48): "hiera_l"}
_TRUNK = "image_encoder.trunk."


def is_sam2_state(state) -> bool:
    """Whether a state_dict is a SAM 2 model's (its image encoder a Hiera trunk)."""
    return any(isinstance(k, str) and k.startswith(_TRUNK) for k in state)


def sam2_model_type(state) -> str:
    """The released SAM 2 model (a key of :data:`SAM2_MODEL_TYPES`) a state_dict belongs to, read from its trunk's
    width and depth; SAM 2.1 by the keys it added (``no_obj_embed_spatial``). ``ValueError`` for a trunk that is not
    a released one."""
    w = state.get(f"{_TRUNK}patch_embed.proj.weight")
    if not isinstance(w, torch.Tensor) or w.dim() != 4:
        raise ValueError(f"it has no 4-D {_TRUNK}patch_embed.proj.weight (Hiera's patch embedding)")
    blocks = {k[len(_TRUNK) + len("blocks."):].split(".")[0] for k in state if k.startswith(f"{_TRUNK}blocks.")}
    depth = 1 + max((int(b) for b in blocks if b.isdigit()), default=-1)
    trunk = _TRUNKS.get((int(w.shape[0]), depth))
    if trunk is None:
        known = ", ".join(f"{name} ({dim} wide, {n} blocks)" for (dim, n), name in _TRUNKS.items())
        raise ValueError(f"its Hiera trunk ({int(w.shape[0])} wide, {depth} blocks) is none of SAM 2's released ones: "
                         f"{known}")
    return f"{'sam2.1' if 'no_obj_embed_spatial' in state else 'sam2'}_{trunk}"


def build_sam2(model_type: str) -> nn.Module:
    """SAM 2's model ``model_type`` (a key of :data:`SAM2_MODEL_TYPES`) as Meta's ``build_sam2`` builds it, with random
    weights, on the CPU, in eval mode."""
    if model_type not in SAM2_MODEL_TYPES:
        raise ValueError(f"model_type must be one of {sorted(SAM2_MODEL_TYPES)}, got {model_type!r}")
    _require_sam2()
    from sam2.build_sam import build_sam2 as meta_build

    return meta_build(SAM2_MODEL_TYPES[model_type], None, device="cpu", mode="eval")


def tiny_sam2(seed: int = 0, logit_scale: float = 20.0) -> nn.Module:
    """SAM 2.1 (Meta's ``SAM2Base``, built as ``sam2.1_hiera_t`` is, decoder and all) with a tiny Hiera trunk (width
    24, one head, blocks 1 / 2 / 2 / 1, windows 8 / 4 / 6 / 3), random weights, 1024 px: the 256 / 128 / 64 feature
    levels SAM 2's predictor expects, at a fraction of Hiera-T's encoder time - for tests and examples. The
    hypernetworks' last layers are scaled by ``logit_scale`` so that mask logits span about +-10 as a trained
    model's do (random ones hug 0, where thresholds and stability scores mean nothing)."""
    _require_sam2()
    from sam2.modeling.backbones.hieradet import Hiera
    from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
    from sam2.modeling.position_encoding import PositionEmbeddingSine

    model = build_sam2("sam2.1_hiera_t")
    torch.manual_seed(seed)
    trunk = Hiera(embed_dim=24, num_heads=1, stages=(1, 2, 2, 1), window_spec=(8, 4, 6, 3), global_att_blocks=(4,),
                  window_pos_embed_bkg_spatial_size=(4, 4))
    neck = FpnNeck(PositionEmbeddingSine(num_pos_feats=256, normalize=True, temperature=10000), 256,
                   trunk.channel_list, fpn_top_down_levels=[2, 3], fpn_interp_model="nearest")
    model.image_encoder = ImageEncoder(trunk, neck, scalp=1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "pos_embed" in pname and "image_encoder" in pname:
                p.normal_(0.0, 0.2)
        for mlp in model.sam_mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(logit_scale)
    return model.eval()
