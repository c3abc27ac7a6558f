"""sam_fast: Triton and CUDA kernels that make Segment Anything (SAM) and its descendants fast.

Public API:

* :func:`dilated_attention` - flash (dilated) attention with SAM's rel-pos bias, (B, N, H, D) layout;
  :class:`Branch` describes a pattern branch.
* :func:`resize_rel_pos` - segment_anything's rel-pos table resize as a C++/CUDA op.
* :func:`apply` / :class:`SamFastConfig` - swap the kernels into a segment_anything model instance;
  ``handle.undo()`` restores it.
* :func:`record_backends` - which backend every op call ran on.

Importing sam_fast initialises no CUDA context and queries no GPU.
"""

from ._dispatch import (
    BACKENDS,
    BackendUnavailableError,
    SamFastFallbackWarning,
    record_backends,
)
from .ops.attention import dilated_attention
from .ops.relpos import resize_rel_pos
from .pattern import Branch
from .patch import SamFastConfig, SamFastHandle, apply

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "Branch",
    "SamFastConfig",
    "SamFastFallbackWarning",
    "SamFastHandle",
    "apply",
    "dilated_attention",
    "record_backends",
    "resize_rel_pos",
]
