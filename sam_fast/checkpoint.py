"""sam_fast's checkpoint layer: reading SAM-family checkpoints into a ``Sam`` and writing them back.

:func:`load_sam` reads every format :mod:`sam_fast.models` knows - segment_anything's and SlimSAM's state_dicts,
MobileSAM's and TinySAM's TinyViT, DC-ViT's, transformers SAM directories - builds the model their geometry asks
for, and applies the dilated pattern a checkpoint :func:`save_sam` wrote records. :func:`save_sam` and
:func:`save_transformers` refuse what the target format cannot hold (int8 layers, dilated blocks for
transformers). This layer sits above :mod:`sam_fast.patch` (it applies patterns) and :mod:`sam_fast.models` (it
builds models): every import points down.
"""

from __future__ import annotations

import os
import re
import zipfile
from typing import List, Optional

import torch
from torch import nn

from ._files import write_atomic
from .models.sam import MODEL_TYPES, build_sam, known_model_type
from .models.sam2 import build_sam2, is_sam2_state, sam2_model_type
from .models.tiny import sam_around
from .models.tinyvit import TinyViT, is_tinyvit_state, tinyvit_config
from .models.transformers_format import (
    _SHARED_PE,
    is_transformers_dir,
    read_transformers_dir,
    sam_to_transformers_state,
    transformers_config,
)
from .models.vit import build_sam_from_geometry, decoder_geometry, encoder_geometry, normalize_state_dict
from .nn.quantized import Int8Linear
from .patch import Dilated, SamFastConfig, apply
from .pattern import Branch, check_pattern_covers
from .surgery import vit_blocks


def _read_state(checkpoint, model_type):
    if is_transformers_dir(checkpoint):
        state, meta = read_transformers_dir(os.fspath(checkpoint))
        _check_stored_bytes(checkpoint, state)
        return normalize_state_dict(state), meta
    if isinstance(checkpoint, (str, os.PathLike)) and os.path.isdir(checkpoint):
        raise IsADirectoryError(f"checkpoint {checkpoint!s} is a directory without a config.json; expected a SAM "
                                f"{model_type} state_dict file (e.g. sam_vit_b_01ec64.pth) or a transformers SAM "
                                "directory (config.json + model.safetensors)")
    if not isinstance(checkpoint, (str, os.PathLike)) or not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint!s} does not exist (expected a SAM {model_type} "
                                "state_dict, e.g. sam_vit_b_01ec64.pth)")
    with open(checkpoint, "rb") as f:
        head = f.read(4)
    is_zip = zipfile.is_zipfile(checkpoint)
    if not is_zip and head[:2] == b"PK":
        raise ValueError(f"checkpoint {checkpoint} is a damaged or truncated zip archive (torch.save's format, "
                         f"{os.path.getsize(checkpoint)} bytes, no end record): the download or copy is probably "
                         "incomplete")
    if not is_zip and head[:1] != b"\x80":  # torch.save's zip, or a legacy pickle
        raise ValueError(f"checkpoint {checkpoint} is not a PyTorch checkpoint (neither torch.save's zip format nor "
                         f"a pickle; it starts with {head[:2]!r}); expected a SAM {model_type} state_dict, e.g. "
                         "sam_vit_b_01ec64.pth")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # torch's message: many lines, terminal bold
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)  # torch's own reason, past its preamble
        first_line = detail.group(1).strip() if detail else (text.splitlines()[0] if text else "")
        if "Unsupported global" in text:
            raise ValueError(
                f"checkpoint {checkpoint} holds pickled Python objects, not only tensors, so it was not loaded: "
                "unpickling them runs code from the file. It is probably a whole pickled model (SlimSAM's "
                "SlimSAM-50.pth / SlimSAM-77.pth are). Safest: use a state_dict release of the same model where "
                "one exists. Only for a file you trust, re-save its state_dict once where the model's classes "
                "import: torch.save(torch.load(path, weights_only=False).state_dict(), new_path) - "
                "weights_only=False executes whatever the file contains.") from exc
        raise ValueError(f"checkpoint {checkpoint} could not be read as a PyTorch state_dict "
                         f"({type(exc).__name__}: {first_line})") from exc
    meta = None
    for wrapper in ("model", "state_dict"):  # training checkpoints (TinySAM's, MobileSAM's, save_sam's) nest it
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict) and \
                not any(isinstance(v, torch.Tensor) for v in state.values()):
            meta = state.get("sam_fast") if wrapper == "model" else None
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {checkpoint} is not a state_dict of tensors (got {type(state).__name__})")
    _check_stored_bytes(checkpoint, state)
    return normalize_state_dict(state), meta


def _check_stored_bytes(checkpoint, state) -> None:
    """Refuse tensors that claim more elements than the file stores for them: the model's geometry is
    read from shapes, and a stride-0 (expanded) or overlapping view can claim any shape, so a 1 MB file
    could make the loader build a model of many gigabytes."""
    storages, claimed = {}, 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        storage = t.untyped_storage()
        if t.numel() and (any(st == 0 for st, n in zip(t.stride(), t.shape) if n > 1)
                          or (t.storage_offset() + 1) * t.element_size() + sum(
                              (n - 1) * st * t.element_size() for n, st in zip(t.shape, t.stride())) > storage.nbytes()
                          or nbytes > storage.nbytes()):
            raise ValueError(f"checkpoint {checkpoint}: tensor {key} claims shape {tuple(t.shape)} "
                             f"({nbytes} bytes) but the file stores {storage.nbytes()} bytes for it (a broadcast or "
                             "overlapping view, not a saved weight); refusing to build a model from it")
        storages[storage.data_ptr()] = storage.nbytes()
        claimed += nbytes
    stored = sum(storages.values())
    if claimed > 2 * stored + 2**20:
        raise ValueError(f"checkpoint {checkpoint}: its tensors claim {claimed / 2**20:.0f} MiB but share "
                         f"{stored / 2**20:.0f} MiB of stored data (views of the same bytes); refusing to build a "
                         "model from it")


def load_sam(checkpoint: str, model_type: str = "auto", *, decoder_heads: Optional[int] = None):
    """Build a ``Sam`` of ``model_type`` and load ``checkpoint``: a state_dict with the official keys
    (SlimSAM's split ``attn.q/k/v`` and ``module.`` prefixes are converted, see
    :func:`sam_fast.models.vit.normalize_state_dict`), a checkpoint :func:`save_sam` wrote (its dilated
    pattern is applied again), or a transformers SAM directory (``config.json`` + ``model.safetensors``, e.g.
    SlimSAM's releases; :mod:`sam_fast.models.transformers_format`).

    With ``model_type="auto"`` the image encoder's geometry (per block) and the decoder's widths are read
    from the checkpoint; the decoder's head count is not stored in a state_dict, so a decoder narrower
    or wider than SAM's 256 needs ``decoder_heads`` (SAM's 256-wide decoder has 8).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file, the expected
    model type and what differs (missing / unexpected keys, shapes) for a mismatched one.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if decoder_heads is not None and (not isinstance(decoder_heads, int) or decoder_heads < 1):
        raise ValueError(f"decoder_heads must be a positive int, got {decoder_heads!r}")
    if decoder_heads is not None and model_type != "auto":
        raise ValueError(f"decoder_heads applies to model_type='auto' only; {model_type} has its own decoder")
    state, meta = _read_state(checkpoint, model_type)
    if meta is not None and meta.get("source") != "transformers":
        _check_meta(meta, checkpoint)
    if decoder_heads is None and model_type == "auto" and meta is not None and "decoder_heads" in meta:
        decoder_heads = meta["decoder_heads"]  # save_sam records it
    if is_sam2_state(state):
        return _load_sam2(checkpoint, state, model_type, meta)
    tinyvit = is_tinyvit_state(state)
    try:
        geom = None if tinyvit else encoder_geometry(state)
        tinyvit_kwargs = tinyvit_config(state) if tinyvit else None
    except ValueError as exc:
        if model_type == "auto":
            raise ValueError(f"checkpoint {checkpoint}: cannot read a SAM image encoder from it: {exc}") from exc
        geom = tinyvit_kwargs = None
    if model_type == "auto":
        try:
            width, mlp_dim, iou_hidden = decoder_geometry(state)
        except ValueError as exc:
            raise ValueError(f"checkpoint {checkpoint}: cannot read a SAM mask decoder from it: {exc}") from exc
        if decoder_heads is None:
            if width != 256:
                raise ValueError(f"checkpoint {checkpoint} has a {width}-wide mask decoder, not SAM's 256: pass "
                                 "decoder_heads (sam-fast: --decoder-heads N); a state_dict does not record the "
                                 "head count")
            decoder_heads = 8
        if width % decoder_heads or (width // 2) % decoder_heads:
            raise ValueError(f"decoder_heads={decoder_heads} does not divide the checkpoint's {width}-wide mask "
                             f"decoder (its attention layers are {width} and {width // 2} wide)")
        if tinyvit:
            sam = sam_around(TinyViT(**tinyvit_kwargs), tinyvit_kwargs["img_size"], width, decoder_heads, mlp_dim,
                              iou_hidden).eval()
        else:
            sam = build_sam_from_geometry(geom, width, decoder_heads, mlp_dim, iou_hidden)
    else:
        sam = build_sam(model_type)
    parts = _state_mismatch(sam, state, model_type)
    if parts:
        hint = ""
        if tinyvit and model_type not in ("vit_t", "auto"):
            hint = "; it looks like a vit_t (MobileSAM / TinySAM TinyViT) checkpoint"
        elif geom is not None and model_type != "auto":
            guess = known_model_type(geom)
            hint = (f"; it looks like a {guess} checkpoint" if guess and guess != model_type else
                    "; its image encoder is not a released geometry (per-block widths?): try model_type='auto'"
                    if guess is None else "")
        raise ValueError(f"checkpoint {checkpoint} does not match model type {model_type}: "
                         + ", ".join(parts) + hint)
    sam.load_state_dict(state)
    sam.eval()
    if meta is not None and meta.get("source") != "transformers":
        _restore_pattern(sam, meta, checkpoint)
    return sam


# ------------------------------------------------------------------------------------------------
# sam_fast's own checkpoint: the official state_dict plus what the weights were trained for
# ------------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = 1


def _state_mismatch(model: nn.Module, state, model_type: str) -> List[str]:
    """What keeps ``state`` from loading into ``model`` strictly: missing and unexpected keys, shape mismatches."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    if shapes:
        k, got, want = shapes[0]
        parts.append(f"{len(shapes)} shape mismatches (e.g. {k}: checkpoint {got}, {model_type} {want})")
    return parts


def _load_sam2(checkpoint, state, model_type: str, meta=None) -> nn.Module:
    """A SAM 2 / 2.1 checkpoint (Meta's ``{"model": state_dict}``) as Meta's ``SAM2Base`` with its weights; a
    transformers ``Sam2Model`` directory (``meta["family"] == "sam2"``) as SAM 2.1's ``SAM2Base`` with its image part
    (the video memory modules, which Sam2Model does not hold, keep their initialisation: ``sam_fast_image_only``)."""
    from .models.transformers_sam2 import IMAGE_PREFIXES, meta_hiera_geometry

    hf = meta is not None and meta.get("family") == "sam2"
    try:  # (a state without SAM 2.1's own keys reads as SAM 2; transformers' releases are 2.1's layout)
        found = sam2_model_type(dict(state, no_obj_embed_spatial=torch.zeros(1, 1)) if hf else state)
    except ValueError as exc:
        raise ValueError(f"checkpoint {checkpoint} holds a SAM 2 image encoder, but {exc}") from None
    if model_type != "auto":
        raise ValueError(f"checkpoint {checkpoint} is a SAM 2 checkpoint ({found}), not a {model_type} one: load it "
                         "with model_type='auto'")
    model = build_sam2(found)
    if hf:
        built = meta_hiera_geometry(model)
        if built != tuple(meta["hiera"]):
            names = ("blocks per stage", "heads per stage", "windows per stage", "global blocks")
            diff = [f"{n} {got} (the weights' size, {found}, has {want})" for n, got, want in
                    zip(names, meta["hiera"], built) if tuple(got) != tuple(want)]
            raise ValueError(f"checkpoint {checkpoint}: config.json's Hiera trunk is not {found}'s: " + ", ".join(diff))
        own = model.state_dict()
        state = {**{k: v for k, v in own.items() if not k.startswith(IMAGE_PREFIXES)}, **state}
    parts = _state_mismatch(model, state, found)
    if parts:
        raise ValueError(f"checkpoint {checkpoint} does not match {found} (its Hiera trunk's size): "
                         + ", ".join(parts))
    model.load_state_dict(state)
    model.sam_fast_image_only = hf
    return model.eval()


def is_sam2_model(model) -> bool:
    """Whether ``model`` is one of Meta's SAM 2 models (what :func:`load_sam` returns for a SAM 2 checkpoint)."""
    return type(model).__module__.startswith("sam2.")


def refuse_sam2(model, what: str):
    """``model``, or a ValueError where it is a SAM 2 model and ``what`` takes only the SAM 1 family so far."""
    if is_sam2_model(model):
        raise ValueError(f"the checkpoint holds a SAM 2 model: {what} takes SAM 1-family models (SAM, SlimSAM, "
                         "MobileSAM / TinySAM, DC-ViT) so far; sam_fast.load_sam and sam_fast.apply take SAM 2's")
    return model


def _pattern_to_json(pattern):
    return [{"segment": list(b.segment) if b.is_2d else b.segment,
             "dilation": list(b.dilation) if b.is_2d else b.dilation} for b in pattern]


def _pattern_from_json(items, where: str):
    if not isinstance(items, list) or not items:
        raise ValueError(f"{where}: a dilated pattern must be a non-empty list of branches, got {items!r}")
    out = []
    for b in items:
        if not isinstance(b, dict) or set(b) != {"segment", "dilation"}:
            raise ValueError(f"{where}: each branch must be {{'segment': ..., 'dilation': ...}}, got {b!r}")
        seg, dil = b["segment"], b["dilation"]
        try:
            out.append(Branch(tuple(seg) if isinstance(seg, list) else seg,
                              tuple(dil) if isinstance(dil, list) else dil))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {b!r} is not a branch ({exc})") from None
    return out


def save_sam(sam, path: str) -> None:
    """Write ``sam`` (a segment_anything ``Sam``, patched or not) to ``path`` atomically.

    A model without dilated blocks and with SAM's 8-head mask decoder is written as a plain state_dict with
    the official keys (what segment_anything's builders load). A model whose blocks run dilated attention (a
    distilled student), or whose decoder has another head count (which a state_dict cannot show), is written
    as ``{"model": state_dict, "sam_fast": {"format": 1, "dilated": {block: [branch, ...]},
    "decoder_heads": n}}``: :func:`load_sam` reads it back with its pattern applied; plain segment_anything
    code reads ``torch.load(path)["model"]`` (the weights, without the pattern they were trained for).
    A model with int8 layers is refused: save the float model (``handle.undo()`` first)."""
    if any(isinstance(m, Int8Linear) for m in sam.modules()):
        raise ValueError("sam has int8 layers (quantize='int8'): save the float model - undo() the handle first - "
                         "and quantize after loading")
    state = {k: v.detach().cpu() for k, v in sam.state_dict().items()}
    dilated = {str(i): _pattern_to_json(b.pattern) for *_, b, i in vit_blocks(sam)
               if getattr(b, "pattern", None) is not None}
    heads = getattr(getattr(getattr(sam, "mask_decoder", None), "transformer", None), "num_heads", None)
    meta = {"format": CHECKPOINT_FORMAT, "dilated": dilated}
    if isinstance(heads, int):
        meta["decoder_heads"] = heads
    obj = {"model": state, "sam_fast": meta} if dilated or heads not in (None, 8) else state
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


_META_KEYS = {"format", "dilated", "decoder_heads"}


def _check_meta(meta, checkpoint) -> None:
    """A sam_fast checkpoint's ``sam_fast`` entry, checked as strictly as :func:`save_sam` writes it: format 1, a
    ``dilated`` dict of block index -> branches, and a positive int ``decoder_heads`` (a ``true`` there built a
    decoder with ``num_heads=True``)."""
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT or not isinstance(meta.get("dilated"),
                                                                                                 dict):
        raise ValueError(f"checkpoint {checkpoint}: its 'sam_fast' entry is not one this version writes (format "
                         f"{CHECKPOINT_FORMAT} with a 'dilated' dict), got {str(meta)[:80]}")
    unknown = sorted(set(meta) - _META_KEYS)
    if unknown:
        raise ValueError(f"checkpoint {checkpoint}: its 'sam_fast' entry has fields this version does not know: "
                         f"{unknown}")
    heads = meta.get("decoder_heads", 8)
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"checkpoint {checkpoint}: its 'sam_fast' entry's decoder_heads must be a positive int, got "
                         f"{heads!r}")
    for key in meta["dilated"]:
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise ValueError(f"checkpoint {checkpoint}: dilated pattern key {key!r} is not a block index")


def _restore_pattern(sam, meta, checkpoint) -> None:
    """Apply the dilated pattern a sam_fast checkpoint records (the student's attention) and record it as
    ``sam.sam_fast_config``, which :func:`sam_fast.apply` uses when no config is given. A pattern must tile the
    encoder's token grid with its blocks' heads, as :func:`sam_fast.distill.distill` requires of the patterns it
    trains (one that does not leaves tokens with zero attention output)."""
    patterns = {int(key): _pattern_from_json(items, f"checkpoint {checkpoint}, block {key}")
                for key, items in meta["dilated"].items()}
    if not patterns:
        return
    enc = sam.image_encoder
    blocks = getattr(enc, "blocks", None)
    grid = (enc.img_size // enc.patch_embed.proj.kernel_size[0],) * 2
    for i, pat in patterns.items():
        if blocks is None or i >= len(blocks):
            raise ValueError(f"checkpoint {checkpoint}: a dilated pattern for block {i}, but the encoder has "
                             f"{0 if blocks is None else len(blocks)} blocks")
        check_pattern_covers(pat, grid, blocks[i].attn.num_heads, f"checkpoint {checkpoint}: block {i}'s pattern")
    config = SamFastConfig(attention=Dilated(patterns))
    try:
        apply(sam, config)
    except ValueError as exc:
        raise ValueError(f"checkpoint {checkpoint}: its recorded dilated pattern does not fit the model: "
                         f"{exc}") from exc
    sam.sam_fast_config = config


def save_transformers(sam: nn.Module, directory: str) -> str:
    """Write ``sam`` (a segment_anything ``Sam``, patched or not) as a transformers SAM directory that
    ``SamModel.from_pretrained(directory)`` and :func:`load_sam` read. Needs transformers
    (``pip install sam_fast[transformers]``). Returns ``directory``."""
    try:
        from transformers import SamConfig, SamModel
    except ImportError:
        raise ImportError("save_transformers needs transformers: pip install sam_fast[transformers]") from None
    if any(isinstance(m, Int8Linear) for m in sam.modules()):
        raise ValueError("sam has int8 layers: save the float model (undo() the handle first)")
    dilated = [i for *_, b, i in vit_blocks(sam) if getattr(b, "pattern", None) is not None]
    if dilated:
        raise ValueError(f"sam has no transformers form: blocks {dilated} run dilated attention, which transformers' "
                         "SamVisionLayer cannot (save it with sam_fast.save_sam)")
    config = SamConfig(**transformers_config(sam))
    state = sam_to_transformers_state({k: v.detach().cpu() for k, v in sam.state_dict().items()})
    model = SamModel(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != _SHARED_PE]
    if missing or unexpected:
        raise ValueError(f"sam: its weights do not fill transformers' SamModel ({len(missing)} missing, e.g. "
                         f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]})")
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    return directory
