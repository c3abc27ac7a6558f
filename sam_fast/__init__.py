"""sam_fast: Triton and CUDA kernels that make Segment Anything (SAM) and its descendants fast.

Public API:

* :func:`dilated_attention` - flash (dilated) attention with SAM's rel-pos bias, (B, N, H, D) layout;
  :class:`Branch` describes a pattern branch; :func:`dilated_attn_func` is the LongNet-style
  ``(segment_lengths, dilation_rates)`` form.
* :func:`resize_rel_pos` - segment_anything's rel-pos table resize as a C++/CUDA op.
* :func:`int8_linear`, :func:`quantize_per_token`, :func:`layer_norm_quantize` - W8A8 int8 GEMM with
  fused quantization and epilogue; :mod:`sam_fast.quantize` calibrates SAM encoders
  (``SamFastConfig(quantize="int8", calibration=...)``).
* :func:`mask_postprocess` - segment_anything's mask post-processing (resizes, threshold, stability,
  box, COCO RLE) as one C++ / CUDA op; :func:`rles_to_coco` / :func:`coco_to_mask` convert its RLE
  to pycocotools' strings and back to masks; :class:`SamFastPredictor` and
  :class:`SamFastAutomaticMaskGenerator` - ``SamPredictor`` / ``SamAutomaticMaskGenerator`` drop-ins
  on the batched decoder (:class:`sam_fast.nn.BatchedMaskDecoder`) and that op; :class:`Sam2FastPredictor`
  (what ``SamFastPredictor(sam2_model)`` returns) and :class:`Sam2FastAutomaticMaskGenerator` are SAM 2's
  ``SAM2ImagePredictor`` / ``SAM2AutomaticMaskGenerator`` drop-ins.
* :func:`apply` / :class:`SamFastConfig` (with :class:`Dilated` / :class:`Int8`) - swap the kernels into a
  segment_anything model instance; ``handle.undo()`` restores it.
* :func:`record_backends` - which backend every op call ran on.
* :func:`export` - an encoder and / or decoder as an ONNX file or an AOTInductor package
  (:mod:`sam_fast.exporting`).

Importing sam_fast initialises no CUDA context and queries no GPU.
"""

import importlib as _importlib

# Public names resolve lazily (PEP 562): importing a submodule such as sam_fast.cli does not import
# the Triton kernels, so the CLI can choose TRITON_INTERPRET before they are decorated.
_EXPORTS = {
    "BACKENDS": "._dispatch",
    "BackendUnavailableError": "._dispatch",
    "SamFastFallbackWarning": "._dispatch",
    "record_backends": "._dispatch",
    "dilated_attention": ".ops.dilated_attention",
    "dilated_attn_func": ".ops.dilated_attention",
    "resize_rel_pos": ".ops.resize_rel_pos",
    "quantize_per_token": ".ops.int8_linear",
    "layer_norm_quantize": ".ops.int8_linear",
    "int8_linear": ".ops.int8_linear",
    "mask_postprocess": ".ops.mask_postprocess",
    "rles_to_coco": ".ops.mask_postprocess",
    "coco_to_mask": ".ops.mask_postprocess",
    "SamFastPredictor": ".predictor",
    "Sam2FastPredictor": ".predictor_sam2",
    "SamFastAutomaticMaskGenerator": ".everything",
    "Sam2FastAutomaticMaskGenerator": ".everything_sam2",
    "Branch": ".pattern",
    "SamFastConfig": ".patch",
    "Dilated": ".patch",
    "Int8": ".patch",
    "SamFastHandle": ".patch",
    "apply": ".patch",
    "load_sam": ".checkpoint",
    "save_sam": ".checkpoint",
    "save_transformers": ".checkpoint",
    "export": ".exporting",
}


_SUBMODULES = ("checkpoint", "coco", "compress", "cpu_features", "cpu_policy", "distill", "everything",
               "everything_sam2", "exporting", "images", "models", "nn", "onnx_translations", "pattern", "predictor",
               "predictor_sam2", "quantize", "reference", "segment_dataset", "testing")


def __getattr__(name):
    if name in _SUBMODULES:
        return _importlib.import_module(f".{name}", __name__)
    if name in _EXPORTS:
        value = getattr(_importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sam_fast' has no attribute {name!r}")


def __dir__():
    private = {n for n in globals() if n.startswith("_") and not n.startswith("__")}  # the lazy-import plumbing
    return sorted((set(globals()) - private) | set(_EXPORTS) | set(_SUBMODULES))


__version__ = "0.1.0"

__all__ = sorted(_EXPORTS)  # one list: every lazy export is public
