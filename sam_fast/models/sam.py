"""Loading SAM checkpoints in segment_anything's official format, with errors that say what is wrong."""

from __future__ import annotations

import os

import torch

MODEL_TYPES = ("vit_b", "vit_l", "vit_h", "tiny")

# image_encoder.patch_embed.proj.weight's first dimension identifies the official encoders.
_EMBED_DIMS = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}


def build_sam(model_type: str):
    """An uninitialised segment_anything ``Sam`` of ``model_type`` ("tiny": :func:`tiny_sam`'s geometry)."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if model_type == "tiny":
        from .tiny import tiny_sam

        return tiny_sam()
    from segment_anything import sam_model_registry

    return sam_model_registry[model_type](checkpoint=None)


def load_sam(checkpoint: str, model_type: str):
    """Build a ``Sam`` of ``model_type`` and load ``checkpoint`` (a state_dict with the official keys).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file, the expected
    model type and what differs (missing / unexpected keys, shapes) for a mismatched one.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if not isinstance(checkpoint, (str, os.PathLike)) or not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint!s} does not exist (expected a SAM {model_type} "
                                "state_dict, e.g. sam_vit_b_01ec64.pth)")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint {checkpoint} could not be read as a PyTorch state_dict "
                         f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {checkpoint} is not a state_dict of tensors (got {type(state).__name__})")
    sam = build_sam(model_type)
    expected = sam.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        proj = state.get("image_encoder.patch_embed.proj.weight")
        guess = _EMBED_DIMS.get(int(proj.shape[0])) if isinstance(proj, torch.Tensor) and proj.dim() else None
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if shapes:
            k, got, want = shapes[0]
            parts.append(f"{len(shapes)} shape mismatches (e.g. {k}: checkpoint {got}, {model_type} {want})")
        hint = f"; it looks like a {guess} checkpoint" if guess and guess != model_type else ""
        raise ValueError(f"checkpoint {checkpoint} does not match model type {model_type}: "
                         + ", ".join(parts) + hint)
    sam.load_state_dict(state)
    return sam.eval()
