"""Deploying without Python's kernels: SAM encoders and decoders as ONNX files or AOTInductor packages.

:func:`export` writes a model's image encoder (any family ``sam_fast.apply`` serves: SAM ViT-B/L/H, dilated
students, W8A8 int8 with or without calibration, SlimSAM-pruned and DC-ViT-compressed encoders, TinyViT, and
transformers' ``SamModel``) and / or its prompt encoder + mask decoder:

* ``format="onnx"``: ``torch.onnx.export(dynamo=True)`` at opset 18. The model is traced with the CPU paths that
  keep the graph portable (:func:`sam_fast._dispatch.exporting`): exact and dilated attention become MatMul /
  Add / Softmax over the gathered segments and back (with SAM's decomposed rel-pos bias as two small einsums), and
  the int8 linears stay integer - ``MatMulInteger`` between per-token (or calibrated) ``int8`` activations and the
  int8 weights - through the translations in :mod:`sam_fast.onnx_translations`. ONNX Runtime and OpenVINO run the
  file. The decoder is exported as segment_anything's ``SamOnnxModel`` (its inputs and outputs: a dynamic point
  count, the mask input and the original image size), so its file is a drop-in for segment_anything's own.
* ``format="aoti"``: ``torch.export`` then ``torch._inductor.aoti_compile_and_package`` into a ``.pt2`` package. On
  the CPU the C++ kernels of ``sam_fast._C`` (the SAM block attention, the rel-pos attention, the fused linear
  epilogues, the int8 quantisation and epilogue) are in the graph and the package calls them through PyTorch's
  dispatcher, so the library must be loaded in the process that runs it: :func:`load_aoti` does that. On a GPU the
  Triton ops are traced in their ``torch.library.triton_op`` forms (:func:`sam_fast._dispatch.triton_op_wanted`), so
  Inductor compiles the kernels themselves into the package, which then needs torch alone. No Python kernel of
  sam_fast runs from a package.

Before any work, :func:`export` refuses what it could not export faithfully: a model with module hooks (they would
not be in the file), a model in training mode, an ONNX export of a model on a GPU, an output that exists (unless
``overwrite``), a wrong suffix. Files are written whole or not at all. With ``check=True`` (the default) the result
runs once on a real photo against the eager model and :class:`ExportResult` reports the difference.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Dict, Optional, Union

import numpy as np
import torch
from torch import nn

from ._dispatch import exporting
from ._files import write_atomic
from ._hooks import has_foreign_hooks, has_hooks
from .metrics import sqnr_db

FORMATS = ("onnx", "aoti")
PARTS = ("encoder", "decoder", "both")
SUFFIX = {"onnx": ".onnx", "aoti": ".pt2"}
#: the largest batch a dynamic batch axis is traced for (the runtimes take any batch up to it; ONNX Runtime more)
MAX_DYNAMIC_BATCH = 64
#: the ONNX opset the files are written at (LayerNormalization, the reductions' axes as inputs)
ONNX_OPSET = 18
#: names of the decoder file's inputs and outputs: segment_anything's SamOnnxModel's
DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")
_SAM_MEAN = (123.675, 116.28, 103.53)
_SAM_STD = (58.395, 57.12, 57.375)


@dataclasses.dataclass
class ExportResult:
    """What :func:`export` wrote: ``files`` (part -> path), ``format``, ``sizes`` (part -> bytes), ``ops`` (part ->
    {op: count}: ONNX node types, or the exported graph's operators for a package), ``checks`` (part -> {"max_abs",
    "sqnr_db"} against the eager model on a photo; empty when not checked) and ``seconds`` (part -> export time)."""

    format: str
    files: Dict[str, str]
    sizes: Dict[str, int]
    ops: Dict[str, Dict[str, int]]
    checks: Dict[str, Dict[str, float]]
    seconds: Dict[str, float]

    def summary(self) -> str:
        lines = []
        for part, path in self.files.items():
            ops = self.ops.get(part, {})
            top = ", ".join(f"{k} {v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:8])
            lines.append(f"{part}: {path} ({self.sizes[part] / 2**20:.1f} MiB, {self.format}, "
                         f"{self.seconds[part]:.1f} s)")
            lines.append(f"  ops: {sum(ops.values())} ({top})")
            special = {k: v for k, v in ops.items() if k in ("MatMulInteger", "QuantizeLinear")
                       or k.startswith("sam_fast.")}
            if special:
                lines.append("  kernels: " + ", ".join(f"{k} x{v}" for k, v in sorted(special.items())))
            chk = self.checks.get(part)
            if chk:
                lines.append(f"  check on a photo vs eager PyTorch: max |diff| {chk['max_abs']:.3g}, "
                             f"SQNR {chk['sqnr_db']:.1f} dB")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# What is exported
# ------------------------------------------------------------------------------------------------


class _Encoder(nn.Module):
    """``image (B, 3, S, S) -> image_embeddings``: the model's image encoder with a tensor output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model if hasattr(model, "get_image_embeddings") else _encoder_of(model)

    def forward(self, image):
        m = self.model
        if hasattr(m, "get_image_embeddings"):  # transformers' SamModel
            return m.get_image_embeddings(image)
        out = m(image)
        if not isinstance(out, torch.Tensor):  # transformers' SamVisionModel: its output's first field
            out = out[0]
        return out


def _encoder_of(model: nn.Module) -> nn.Module:
    if hasattr(model, "image_encoder") and isinstance(model.image_encoder, nn.Module):  # segment_anything's Sam
        return model.image_encoder
    return model


def _image_size(model: nn.Module) -> Optional[int]:
    enc = _encoder_of(model)
    size = getattr(enc, "img_size", None)
    if size is None:
        config = getattr(model, "config", None)
        vision = getattr(config, "vision_config", config)
        size = getattr(vision, "image_size", None)
    return int(size) if size is not None else None


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in _encoder_of(model).parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _pixel_stats(model: nn.Module):
    mean, std = getattr(model, "pixel_mean", None), getattr(model, "pixel_std", None)
    if isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor):
        return mean.flatten().tolist(), std.flatten().tolist()
    return _SAM_MEAN, _SAM_STD


def photo_input(model: nn.Module, image_size: int, batch: int = 1, dtype=torch.float32, device="cpu"):
    """A real photograph (scikit-image's astronaut, then its coffee, camera... for a batch) as the encoder input:
    resized and padded as segment_anything does, normalised with the model's pixel statistics (SAM's for a bare
    encoder). (batch, 3, image_size, image_size)."""
    from .images import normalize, resize_pad, sample_photo

    names = ("astronaut", "coffee", "chelsea", "rocket", "camera")
    images, sizes = [], []
    for i in range(batch):
        img, hw = resize_pad(sample_photo(names[i % len(names)]), image_size)
        images.append(torch.from_numpy(img))
        sizes.append(hw)
    mean, std = _pixel_stats(model)
    x = normalize(torch.stack(images), torch.tensor(sizes), mean, std)
    return x.to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# Checks before any work
# ------------------------------------------------------------------------------------------------


def _check_args(model, path, format, parts, image_size, batch, dtype, overwrite):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a segment_anything Sam, an image encoder or a transformers "
                        f"SamModel), got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if parts not in PARTS:
        raise ValueError(f"parts must be one of {PARTS}, got {parts!r}")
    if image_size is not None and (not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 16):
        raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
    if batch != "dynamic" and (not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch
                               <= MAX_DYNAMIC_BATCH):
        raise ValueError(f"batch must be an int in [1, {MAX_DYNAMIC_BATCH}] or 'dynamic', got {batch!r}")
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be a bool, got {type(overwrite).__name__}")
    if parts != "encoder" and not (hasattr(model, "prompt_encoder") and hasattr(model, "mask_decoder")
                                   and hasattr(model, "image_encoder")):
        raise ValueError(f"parts={parts!r} needs a segment_anything Sam (prompt_encoder and mask_decoder); "
                         f"{type(model).__name__} has no decoder to export")
    if parts != "encoder" and format == "aoti":
        raise ValueError("the decoder exports to ONNX only (format='onnx'): segment_anything's decoder sizes its "
                         "output from the orig_im_size input, which a package compiled ahead of time cannot; "
                         "export parts='encoder' as a package")
    if model.training:
        raise ValueError("model is in training mode: call model.eval() before exporting (dropout and batch-norm "
                         "statistics would otherwise be traced as in training)")
    if has_hooks(nn.Identity()):
        raise ValueError("global module hooks are registered (torch.nn.modules.module.register_module_forward_hook "
                         "and its kin): an exported file would run without them; remove them first")
    hooked = [name or type(model).__name__ for name, m in model.named_modules() if has_foreign_hooks(m)]
    if hooked:
        raise ValueError(f"model has module hooks (on {', '.join(hooked[:3])}{' ...' if len(hooked) > 3 else ''}): "
                         f"an exported file would run without them; remove them first")
    forced = sorted({m.backend for m in model.modules() if getattr(m, "backend", "auto") in ("triton", "cuda")})
    if format == "onnx" and forced:
        raise ValueError(f"the model was patched with backend={forced[0]!r}: ONNX export traces the CPU paths, so "
                         f"apply sam_fast with backend='auto' (or 'cpu') before exporting")
    device = _device(model)
    if format == "onnx" and device.type != "cpu":
        raise ValueError(f"ONNX export traces the CPU paths: move the model to the CPU first (it is on {device})")
    want_dtype = dtype or _model_dtype(model)
    if want_dtype != _model_dtype(model):
        raise ValueError(f"dtype={want_dtype} but the model's weights are {_model_dtype(model)}: convert the model "
                         f"(model.to({want_dtype})) before exporting")
    if format == "onnx" and want_dtype != torch.float32:
        raise ValueError(f"ONNX export is float32 (or int8 through sam_fast's W8A8 layers); got {want_dtype}")
    return want_dtype


def _targets(path: str, format: str, parts: str, overwrite: bool) -> Dict[str, str]:
    """part -> output file. One part: ``path`` itself (with the format's suffix); both: ``path`` is a folder that
    gets ``encoder<suffix>`` and ``decoder.onnx``."""
    path = os.fspath(path)
    suffix = SUFFIX[format]
    if parts == "both":
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"parts='both' writes encoder{suffix} and decoder.onnx into the folder path; {path} is "
                             f"a file")
        files = {"encoder": os.path.join(path, "encoder" + suffix), "decoder": os.path.join(path, "decoder.onnx")}
    else:
        if not path.endswith(suffix):
            raise ValueError(f"path must end with {suffix} for format={format!r}, got {path!r}")
        files = {parts: path}
    for f in files.values():
        parent = os.path.dirname(os.path.abspath(f))
        if parts != "both" and not os.path.isdir(parent):
            raise ValueError(f"the folder of {f} does not exist")
        if os.path.exists(f) and not overwrite:
            raise FileExistsError(f"{f} exists: pass overwrite=True (--overwrite) to replace it")
        if os.path.isdir(f):
            raise ValueError(f"{f} is a folder")
    return files


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------


def export(model: nn.Module, path, *, format: str = "onnx", parts: str = "encoder", image_size: Optional[int] = None,
           batch: Union[int, str] = 1, dtype: Optional[torch.dtype] = None, overwrite: bool = False,
           check: bool = True) -> ExportResult:
    """Write ``model``'s image encoder and / or decoder as an ONNX file or an AOTInductor package (see the module
    docstring).

    Args:
        model: a segment_anything ``Sam`` (or its image encoder alone, or a TinyViT) or a transformers
            ``SamModel`` / ``SamVisionModel``, as it is: after :func:`sam_fast.apply` (any config) the file holds the
            sam_fast paths; in eval mode, without module hooks.
        path: the file (``.onnx`` / ``.pt2``); with ``parts="both"`` a folder that gets ``encoder.onnx`` (or
            ``encoder.pt2``) and ``decoder.onnx``.
        format: ``"onnx"`` or ``"aoti"``.
        parts: ``"encoder"``, ``"decoder"`` (ONNX only) or ``"both"``.
        image_size: the encoder's input side (default: the model's, e.g. 1024).
        batch: the encoder's batch, an int, or ``"dynamic"`` (a dynamic axis, traced with batch 2).
        dtype: the weights' dtype, checked against the model (ONNX: float32; the int8 layers stay int8).
        overwrite: replace existing files (otherwise they are refused before any work).
        check: run each file once on a photo and compare with the eager model (needs ``onnxruntime`` for ONNX).

    The encoder's input is ``image`` (B, 3, S, S): the preprocessed image (normalised, padded to S, as
    ``Sam.preprocess`` makes it); its output ``image_embeddings``.
    """
    dtype = _check_args(model, path, format, parts, image_size, batch, dtype, overwrite)
    _check_installed(format, parts, check)
    native = _image_size(model)
    size = image_size or native
    if size is None:
        raise ValueError(f"cannot tell {type(model).__name__}'s input size: pass image_size")
    if native is not None and size != native:
        raise ValueError(f"image_size={size}, but the model's image encoder takes {native} x {native} images (its "
                         f"position embedding is fixed to that grid): leave image_size unset")
    files = _targets(path, format, parts, overwrite)
    if parts == "both":
        os.makedirs(os.fspath(path), exist_ok=True)
    result = ExportResult(format, {}, {}, {}, {}, {})
    for part, target in files.items():
        t0 = time.perf_counter()
        if part == "encoder":
            ops = _export_encoder(model, target, format, size, batch, dtype)
        else:
            ops = _export_decoder(model, target)
        result.seconds[part] = time.perf_counter() - t0
        result.files[part], result.sizes[part], result.ops[part] = target, _size(target), ops
        if check:
            result.checks[part] = (check_encoder(model, target, size, format, dtype=dtype) if part == "encoder"
                                   else check_decoder(model, target))
    return result


def _check_installed(format: str, parts: str, check) -> None:
    """The optional packages the export needs, before any work: ONNX export needs onnx and onnxscript (torch's
    exporter), its check onnxruntime."""
    import importlib.util

    if not isinstance(check, bool):
        raise TypeError(f"check must be a bool, got {type(check).__name__}")
    needed = []
    if format == "onnx" or parts != "encoder":
        needed += ["onnx", "onnxscript"] + (["onnxruntime"] if check else [])
    absent = [m for m in needed if importlib.util.find_spec(m) is None]
    if absent:
        raise ImportError(f"format={format!r} needs {', '.join(absent)}: pip install 'sam_fast[export]'"
                          + (" (or check=False, without onnxruntime)" if absent == ["onnxruntime"] else ""))


def _size(path: str) -> int:
    total = os.path.getsize(path)
    data = path + ".data"
    return total + (os.path.getsize(data) if os.path.exists(data) else 0)


def _dynamic(batch):
    if batch != "dynamic":
        return None, batch
    return ({0: torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)},), 2


def _export_encoder(model, target, format, size, batch, dtype) -> Dict[str, int]:
    wrapper = _Encoder(model).eval()
    dynamic, b = _dynamic(batch)
    x = torch.zeros(b, 3, size, size, dtype=dtype, device=_device(model))
    if format == "onnx":
        from .onnx_translations import translation_table

        with torch.no_grad(), exporting("onnx"):
            program = torch.onnx.export(wrapper, (x,), dynamo=True, opset_version=ONNX_OPSET, verbose=False,
                                        input_names=["image"], output_names=["image_embeddings"],
                                        dynamic_shapes=dynamic, custom_translation_table=translation_table())
        _save_onnx(program, target)
        return _onnx_ops(target)
    with torch.no_grad(), exporting("aoti"):
        ep = torch.export.export(wrapper, (x,), dynamic_shapes=dynamic)
    ops = collections.Counter(_op_name(n.target) for n in ep.graph.nodes if n.op == "call_function")
    from . import __version__

    metadata = {"sam_fast_version": __version__, "needs": _package_needs(ops),
                "input": f"image ({'B' if batch == 'dynamic' else batch}, 3, {size}, {size}) {dtype}"}

    def write(tmp):
        torch._inductor.aoti_compile_and_package(ep, package_path=tmp,
                                                 inductor_configs={"aot_inductor.metadata": metadata})

    write_atomic(target, write)
    return dict(ops)


def _package_needs(ops) -> str:
    """What a process must load to run the package: ``sam_fast._C`` where the graph calls the C++ kernels (CPU models;
    a mutating op shows as ``auto_functionalized``), nothing but torch where all of it is Inductor's code and the
    Triton kernels it compiled into the package (the ``sam_fast::triton_*`` ops of a CUDA model)."""
    cpp = [op for op in ops if op == "auto_functionalized"
           or (op.startswith("sam_fast.") and not op.startswith("sam_fast.triton_"))]
    return "sam_fast._C (sam_fast.exporting.load_aoti loads it)" if cpp else "torch"


def _op_name(target) -> str:
    name = str(target)
    if "auto_functionalized" in name:  # a mutating custom op, functionalised for the trace
        return "auto_functionalized"
    return name


def _export_decoder(model, target) -> Dict[str, int]:
    from segment_anything.utils.onnx import SamOnnxModel

    wrapper = SamOnnxModel(model, return_single_mask=False).eval()
    dim = model.prompt_encoder.embed_dim
    side = model.prompt_encoder.image_embedding_size
    mask_side = model.prompt_encoder.mask_input_size
    inputs = (torch.zeros(1, dim, *side), torch.zeros(1, 5, 2), torch.zeros(1, 5), torch.zeros(1, 1, *mask_side),
              torch.ones(1), torch.tensor([float(model.image_encoder.img_size)] * 2))
    points = torch.export.Dim("points", min=1, max=1024)
    dynamic = {"image_embeddings": None, "point_coords": {1: points}, "point_labels": {1: points}, "mask_input": None,
               "has_mask_input": None, "orig_im_size": None}
    # The output size comes from orig_im_size's values: the exporter's first capture stops at that data-dependent
    # size (torch prints its partial graph and a warning) and its next one succeeds. That chatter is kept back and
    # shown only if the export fails.
    shapes_log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = shapes_log.level
    shapes_log.setLevel(logging.ERROR)
    chatter = io.StringIO()
    try:
        with exporting("onnx"), contextlib.redirect_stderr(chatter):
            program = torch.onnx.export(wrapper, inputs, dynamo=True, opset_version=ONNX_OPSET, verbose=False,
                                        input_names=list(DECODER_INPUTS), output_names=list(DECODER_OUTPUTS),
                                        dynamic_shapes=dynamic)
    except Exception:
        sys.stderr.write(chatter.getvalue())
        raise
    finally:
        shapes_log.setLevel(level)
    _save_onnx(program, target)
    return _onnx_ops(target)


def _save_onnx(program, target: str) -> None:
    """Save an ONNXProgram whole or not at all. Weights past 2 GiB go to ``<target>.data`` beside it (the file
    names it), moved in before the model file."""
    folder = os.path.dirname(os.path.abspath(target))
    with tempfile.TemporaryDirectory(dir=folder, prefix=".sam-fast-export-") as tmp:
        staged = os.path.join(tmp, os.path.basename(target))
        program.save(staged)
        if os.path.exists(staged + ".data"):
            os.replace(staged + ".data", target + ".data")
        write_atomic(target, lambda t: shutil.move(staged, t))


def _onnx_ops(path: str) -> Dict[str, int]:
    import onnx

    model = onnx.load(path, load_external_data=False)
    counts = collections.Counter(n.op_type for n in model.graph.node)
    for f in model.functions:  # nodes inside local functions count too
        counts.update(n.op_type for n in f.node)
    return dict(counts)


# ------------------------------------------------------------------------------------------------
# Loading and checking
# ------------------------------------------------------------------------------------------------


def load_aoti(path, device_index: int = -1):
    """Load an AOTInductor package :func:`export` wrote, with ``sam_fast._C`` (the C++ kernels a CPU package's graph
    calls) loaded first. Returns the callable ``runner(image) -> image_embeddings``; ``runner.get_metadata()`` tells
    what it was exported from and what it needs (``"needs"``)."""
    from .ops._ext import extension_error

    why = extension_error()
    if why is not None:
        raise RuntimeError(f"the package calls sam_fast's C++ kernels, but {why}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no AOTInductor package at {path}")
    return torch._inductor.aoti_load_package(path, device_index=device_index)


def onnx_session(path, threads: Optional[int] = None, spinning: bool = True):
    """An ONNX Runtime CPU session on ``path`` (``threads``: intra-op threads, default ONNX Runtime's). With
    ``spinning=False`` its worker threads sleep between runs instead of spinning (ONNX Runtime's default), which
    would take the cores from whatever runs next in the process (a benchmark's interleaved contenders)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError("running an ONNX file needs onnxruntime: pip install 'sam_fast[export]'") from exc
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def openvino_model(path, batch: Optional[int] = None, precision: str = "f32", threads: Optional[int] = None):
    """An OpenVINO CPU compiled model of an encoder file (or of an ``openvino.Model`` read from one, e.g. after NNCF
    quantised it), at a fixed ``batch`` when given (the dynamic batch axis reshaped to it: OpenVINO's fastest mode).
    ``precision``: the CPU plugin's inference precision (``"f32"``: the file's numerics; OpenVINO's own default on
    CPUs with bf16 arithmetic is bf16).

    With the batch left dynamic the CPU plugin's executor cache is switched off: with it, OpenVINO 2026.4 reuses a
    reduction's executor across the two branches of a dilated pattern and returns wrong values."""
    try:
        import openvino as ov
    except ImportError as exc:
        raise ImportError("running an ONNX file in OpenVINO needs openvino: pip install 'sam_fast[export]'") from exc
    core = ov.Core()
    model = path.clone() if isinstance(path, ov.Model) else core.read_model(os.fspath(path))  # the caller's untouched
    config = {"INFERENCE_PRECISION_HINT": precision}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    if batch is not None:
        model.reshape({model.inputs[0].get_any_name(): [batch, *model.inputs[0].get_partial_shape()[1:]]})
    elif model.inputs[0].get_partial_shape().is_dynamic:
        config["CPU_RUNTIME_CACHE_CAPACITY"] = "0"
    return core.compile_model(model, "CPU", config)


def run_file(path, x: torch.Tensor, format: str) -> torch.Tensor:
    """An encoder file on ``x`` (ONNX: in ONNX Runtime; AOTI: the package in this process)."""
    if format == "onnx":
        session = onnx_session(path)
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.cpu().numpy()})[0])
    with torch.no_grad():
        index = (x.device.index or 0) if x.device.type == "cuda" else -1
        out = load_aoti(path, device_index=index)(x)
    return out[0] if isinstance(out, (list, tuple)) else out


def check_encoder(model, path, image_size: int, format: str, dtype=torch.float32, batch: int = 1) -> Dict[str, float]:
    """Run the exported encoder on a photo and compare with the eager model: {"max_abs", "sqnr_db"}."""
    x = photo_input(model, image_size, batch, dtype, _device(model))
    with torch.no_grad():
        want = _Encoder(model)(x)
    got = run_file(path, x, format).to(want.device)
    return {"max_abs": float((got.float() - want.float()).abs().max()), "sqnr_db": sqnr_db(want.float(), got.float())}


def decoder_inputs(model, points: int = 3, seed: int = 0) -> Dict[str, np.ndarray]:
    """Inputs for a decoder file: an image embedding from the model's encoder on a photo, ``points`` prompt points
    (labels 1 and 0, then the padding point SamOnnxModel expects), a mask input and the photo's size."""
    gen = torch.Generator().manual_seed(seed)
    size = model.image_encoder.img_size
    with torch.no_grad():
        emb = model.image_encoder(photo_input(model, size, 1, _model_dtype(model), _device(model))).float().cpu()
    coords = torch.rand(1, points, 2, generator=gen) * size
    labels = torch.ones(1, points)
    labels[0, 1::2] = 0
    coords = torch.cat([coords, torch.zeros(1, 1, 2)], dim=1)
    labels = torch.cat([labels, -torch.ones(1, 1)], dim=1)
    mask = torch.randn(1, 1, *model.prompt_encoder.mask_input_size, generator=gen)
    return {"image_embeddings": emb.numpy(), "point_coords": coords.numpy(), "point_labels": labels.numpy(),
            "mask_input": mask.numpy(), "has_mask_input": np.ones(1, np.float32),
            "orig_im_size": np.array([size * 3 // 4, size], np.float32)}


def check_decoder(model, path, points: int = 3) -> Dict[str, float]:
    """Run the exported decoder in ONNX Runtime and compare its masks with segment_anything's SamOnnxModel in
    PyTorch on the same inputs: {"max_abs", "sqnr_db"} of the mask logits."""
    from segment_anything.utils.onnx import SamOnnxModel

    feeds = decoder_inputs(model, points)
    session = onnx_session(path)
    got = torch.from_numpy(session.run(None, feeds)[0])
    with torch.no_grad():
        want = SamOnnxModel(model, return_single_mask=False).eval()(
            *(torch.from_numpy(feeds[n]) for n in DECODER_INPUTS))[0]
    return {"max_abs": float((got - want).abs().max()), "sqnr_db": sqnr_db(want, got)}
