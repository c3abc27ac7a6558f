"""W8A8 quantization of SAM image encoders: calibration, per-layer SQNR report, eligible layers.

>>> cal = sam_fast.quantize.calibrate(sam, images, num_images=8)   # a progress bar while it runs
>>> print(cal)                                                     # per-layer SQNR (dB), what stays float
>>> handle = sam_fast.apply(sam, sam_fast.SamFastConfig(attention="exact", quantize="int8", calibration=cal))

What is quantized: the four linears of every ViT block of the image encoder (``attn.qkv``,
``attn.proj``, ``mlp.lin1``, ``mlp.lin2``; only the MLP of a block whose attention DC-ViT removed; in
a TinyViT encoder - MobileSAM, TinySAM - ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` of every
TinyViT block); weights int8 per output channel.
Activations are quantized per token at run time (dynamic), fused into the preceding LayerNorm for qkv
and lin1; ``mlp.lin2``'s (``mlp.fc2``'s) input gets a static per-tensor scale from calibration, so
lin1's epilogue writes its GELU output directly in int8 (no quantization pass over the 4x-wide hidden
activation). TinyViT's convolutions (its MBConv stage, patch merging, local convs) stay in float.

Calibration (:func:`calibrate`) runs a few images (TinySAM used 8) through the float encoder and
measures, for each eligible layer, the SQNR of its quantized output against its float output on the
same inputs (dynamic, and static for lin2); then the embedding SQNR of the whole quantized encoder.
Layers below ``min_sqnr_db`` (outlier-heavy inputs) or too narrow to gain from int8 stay in float and
are listed in the report with the reason; a static lin2 scale below the bar falls back to dynamic.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ._files import write_json_atomic
from .metrics import ratio_db, sqnr_db
from .nn.quantized import Int8Linear
from .ops.int8_linear import int8_linear, quantize_weight
from .reference.int8_linear import QMAX
from .surgery import MIN_FEATURES, eligible_linears, find_encoder, too_narrow

__all__ = ["Calibration", "LayerCalibration", "calibrate", "eligible_linears", "quantize_weight", "sqnr_db",
           "MIN_FEATURES", "DEFAULT_MIN_SQNR_DB"]

LAYER_MODES = ("dynamic", "static", "float")
# A static scale may clip the calibrated absmax (percentile-style calibration does) but not by more than this
# factor; calibrate() itself clips nothing (scale = absmax / 127).
MAX_STATIC_CLIP = 16.0
DEFAULT_MIN_SQNR_DB = 20.0


@dataclasses.dataclass
class LayerCalibration:
    """Calibration result of one linear. ``mode``: ``"dynamic"``, ``"static"`` or ``"float"`` (left
    unquantized, with ``reason``). SQNRs in dB of the layer's quantized output vs its float output."""

    key: str
    in_features: int
    out_features: int
    act_amax: float
    sqnr_dynamic_db: float
    sqnr_static_db: Optional[float] = None
    static_scale: Optional[float] = None
    mode: str = "dynamic"
    reason: str = ""

    @property
    def sqnr_db(self) -> float:
        return self.sqnr_static_db if self.mode == "static" else self.sqnr_dynamic_db

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """ValueError naming the layer when the entry cannot describe a working layer: an unknown mode, or a
        static scale that is not positive and finite or that clips the calibrated input range (its
        absmax ``act_amax``) by more than :data:`MAX_STATIC_CLIP` (int8 would saturate almost everything).
        Run at construction and again by ``sam_fast.apply`` (entries are mutable)."""
        if self.mode not in LAYER_MODES:
            raise ValueError(f"calibration entry {self.key}: mode must be one of {LAYER_MODES}, got {self.mode!r}")
        if self.mode != "static":
            return
        s, amax = self.static_scale, self.act_amax
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (math.isfinite(s) and s > 0):
            raise ValueError(f"calibration entry {self.key}: static_scale must be a positive finite number, got {s!r}")
        if not (isinstance(amax, (int, float)) and math.isfinite(amax) and amax >= 0):
            raise ValueError(f"calibration entry {self.key}: act_amax must be a finite number >= 0, got {amax!r}")
        if s * QMAX * MAX_STATIC_CLIP < amax:
            raise ValueError(f"calibration entry {self.key}: static_scale {s:g} covers only +-{s * QMAX:.3g}, but the "
                             f"calibrated inputs reach {amax:.3g}: int8 would saturate them (calibrate() sets "
                             f"act_amax / {QMAX})")


@dataclasses.dataclass
class Calibration:
    """What :func:`calibrate` found; pass it as ``SamFastConfig(quantize="int8", calibration=...)``.
    ``print(cal)`` shows the report. :meth:`save` / :meth:`load` keep it as JSON."""

    layers: Dict[str, LayerCalibration]
    num_images: int
    min_sqnr_db: float
    embedding_sqnr_db: Optional[float] = None

    @property
    def left_float(self) -> Dict[str, str]:
        """Layers kept in float, with why."""
        return {k: e.reason for k, e in self.layers.items() if e.mode == "float"}

    def report(self) -> str:
        width = max([22] + [len(k) for k in self.layers])
        lines = [f"int8 calibration on {self.num_images} image(s); layers under {self.min_sqnr_db:g} dB stay float",
                 f"{'layer':<{width}} {'in->out':>12} {'mode':>8} {'SQNR dB':>8} {'dynamic':>8} {'static':>8}  note"]
        for e in self.layers.values():
            static = "-" if e.sqnr_static_db is None else f"{e.sqnr_static_db:.1f}"
            lines.append(f"{e.key:<{width}} {f'{e.in_features}->{e.out_features}':>12} {e.mode:>8} {e.sqnr_db:>8.1f} "
                         f"{e.sqnr_dynamic_db:>8.1f} {static:>8}  {e.reason}")
        if self.embedding_sqnr_db is not None:
            lines.append(f"image embedding SQNR, quantized encoder vs float: {self.embedding_sqnr_db:.1f} dB")
        return "\n".join(lines)

    __str__ = report

    def to_dict(self) -> dict:
        return {"num_images": self.num_images, "min_sqnr_db": self.min_sqnr_db,
                "embedding_sqnr_db": self.embedding_sqnr_db,
                "layers": [dataclasses.asdict(e) for e in self.layers.values()]}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        fields = {f.name for f in dataclasses.fields(LayerCalibration)}
        for e in d["layers"]:
            unknown = sorted(set(e) - fields)
            if unknown:
                raise ValueError(f"calibration entry {e.get('key', '?')}: unknown fields {unknown}")
        layers = {e["key"]: LayerCalibration(**e) for e in d["layers"]}
        return cls(layers, d["num_images"], d["min_sqnr_db"], d.get("embedding_sqnr_db"))

    def save(self, path: str) -> None:
        write_json_atomic(path, self.to_dict(), indent=1, allow_nan=True)

    @classmethod
    def load(cls, path: str) -> "Calibration":
        with open(path) as f:
            return cls.from_dict(json.load(f))


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------


def prepare_image(image, img_size: int, mean, std, device, dtype) -> torch.Tensor:
    """SamPredictor's preprocessing of one image: an HxWx3 uint8 array (or (3, H, W) uint8 tensor) is
    resized so its longest side is ``img_size``, normalised and zero-padded to a square; a float
    (3, img_size, img_size) tensor is taken as already preprocessed. Returns (1, 3, S, S)."""
    from .images import normalize, resize_pad

    if isinstance(image, torch.Tensor) and image.is_floating_point():
        if tuple(image.shape) != (3, img_size, img_size):
            raise ValueError(f"a float image tensor must be preprocessed, shape (3, {img_size}, {img_size}); got "
                             f"{tuple(image.shape)}")
        return image.to(device=device, dtype=dtype)[None]
    if isinstance(image, torch.Tensor):
        image = image.permute(1, 2, 0).cpu().numpy()
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"images must be HxWx3 uint8 arrays (or preprocessed float tensors), got "
                         f"{getattr(image, 'dtype', type(image).__name__)} of shape {getattr(image, 'shape', None)}")
    padded, hw = resize_pad(image, img_size)
    x = normalize(torch.from_numpy(padded)[None].to(device), torch.tensor([hw]), mean, std)
    return x.to(dtype)


# ------------------------------------------------------------------------------------------------
# Calibration
# ------------------------------------------------------------------------------------------------


class _Stats:
    __slots__ = ("amax", "signal", "noise_dyn", "noise_static")

    def __init__(self):
        self.amax, self.signal, self.noise_dyn, self.noise_static = 0.0, 0.0, 0.0, 0.0


@torch.no_grad()
def calibrate(model: nn.Module, images: Sequence, num_images: int = 8, *,
              min_sqnr_db: float = DEFAULT_MIN_SQNR_DB, backend: str = "auto", progress: bool = True) -> Calibration:
    """Calibrate W8A8 for ``model``'s image encoder on a few images and report per-layer SQNR.

    Args:
        model: a segment_anything ``Sam`` (its pixel mean/std are used) or ``ImageEncoderViT``, in float
            (exact or dilated attention swapped in is fine; quantized linears are not).
        images: HxWx3 uint8 arrays (any size; resized as SamPredictor does) or preprocessed float
            (3, S, S) tensors; the first ``num_images`` are used.
        num_images: how many images (TinySAM: 8).
        min_sqnr_db: layers whose quantized output is below this SQNR stay in float.
        backend: backend of the int8 ops used to measure (the one the model will run).
        progress: show a progress bar.

    Returns:
        A :class:`Calibration`: per layer the input absmax, SQNR (dynamic; static for lin2), the chosen
        mode and why; and the image-embedding SQNR of the quantized encoder vs float.
    """
    from tqdm.auto import tqdm

    if not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 1:
        raise ValueError(f"num_images must be a positive int, got {num_images!r}")
    if not isinstance(min_sqnr_db, (int, float)) or isinstance(min_sqnr_db, bool):
        raise TypeError(f"min_sqnr_db must be a number of dB, got {min_sqnr_db!r}")
    enc, mean, std = find_encoder(model)
    images = list(images)[:num_images]
    if not images:
        raise ValueError("images is empty: calibration needs at least one image")
    slots = eligible_linears(enc)
    if not slots:
        raise ValueError("the model has no segment_anything ViT (or TinyViT) block linears to quantize")
    quantized = [s.key for s in slots if isinstance(s.module, Int8Linear)]
    if quantized:
        raise ValueError(f"calibrate a float model: {quantized[0]} (and {len(quantized) - 1} more) are already "
                         "int8; undo() the quantization first")
    param = next(enc.parameters())
    batch = [prepare_image(im, enc.img_size, mean, std, param.device, param.dtype) for im in images]
    stats = {s.key: _Stats() for s in slots}
    weights = {s.key: quantize_weight(s.module.weight.float()) for s in slots}
    bar = tqdm(total=3 * len(batch), desc="int8 calibration", disable=not progress, leave=False)

    def run(hook_fn, keys):
        handles = [s.module.register_forward_hook(hook_fn(s)) for s in slots if s.key in keys]
        try:
            outs = []
            for x in batch:
                outs.append(enc(x).float())
                bar.update(1)
            return outs
        finally:
            for h in handles:
                h.remove()

    def measure_dynamic(slot):
        st, (wq, ws), bias = stats[slot.key], weights[slot.key], slot.module.bias

        def hook(mod, inputs, output):
            x = inputs[0]
            st.amax = max(st.amax, float(x.detach().abs().max()))
            y = output.double()
            yq = int8_linear(x, wq, ws, bias, out_dtype=torch.float32, backend=backend).double()
            st.signal += float(y.pow(2).sum())
            st.noise_dyn += float((y - yq).pow(2).sum())
        return hook

    def measure_static(slot):
        st, (wq, ws), bias = stats[slot.key], weights[slot.key], slot.module.bias
        scale = st.amax / QMAX  # > 0: only layers that saw a nonzero input are measured static

        def hook(mod, inputs, output):
            yq = int8_linear(inputs[0], wq, ws, bias, act_scale=scale, out_dtype=torch.float32, backend=backend)
            st.noise_static += float((output.double() - yq.double()).pow(2).sum())
        return hook

    float_embeddings = run(measure_dynamic, set(stats))
    static_keys = {s.key for s in slots if s.static_role and stats[s.key].amax > 0}
    if static_keys:
        run(measure_static, static_keys)
    else:
        bar.update(len(batch))

    layers = {}
    for s in slots:
        st, lin = stats[s.key], s.module
        e = LayerCalibration(s.key, lin.in_features, lin.out_features, st.amax, ratio_db(st.signal, st.noise_dyn))
        if s.key in static_keys:
            e.sqnr_static_db = ratio_db(st.signal, st.noise_static)
        narrow = too_narrow(lin)
        if narrow:
            e.mode, e.reason = "float", narrow
        elif e.sqnr_dynamic_db < min_sqnr_db:
            e.mode, e.reason = "float", f"SQNR {e.sqnr_dynamic_db:.1f} dB < {min_sqnr_db:g} dB (outliers)"
        elif e.sqnr_static_db is not None and e.sqnr_static_db >= min_sqnr_db:
            e.mode, e.static_scale = "static", st.amax / QMAX
        elif e.sqnr_static_db is not None:
            e.reason = f"static scale SQNR {e.sqnr_static_db:.1f} dB < {min_sqnr_db:g} dB: per-token instead"
        layers[s.key] = e
    cal = Calibration(layers, len(batch), float(min_sqnr_db))

    # The embedding of the encoder with every linear replaced by what W8A8 makes of it (forward hooks that
    # swap each output for the int8 one: no module of the model changes, so nothing needs undoing)
    def quantized_output(slot):
        entry, (wq, ws), bias = layers[slot.key], weights[slot.key], slot.module.bias

        def hook(mod, inputs, output):
            if entry.mode == "float":
                return None
            scale = entry.static_scale if entry.mode == "static" else None
            return int8_linear(inputs[0], wq, ws, bias, act_scale=scale, backend=backend).to(output.dtype)
        return hook

    try:
        signal = noise = 0.0
        for out, ref in zip(run(quantized_output, set(stats)), float_embeddings):
            signal += float(ref.double().pow(2).sum())
            noise += float((out.double() - ref.double()).pow(2).sum())
        cal.embedding_sqnr_db = ratio_db(signal, noise)
    finally:
        bar.close()
    return cal
