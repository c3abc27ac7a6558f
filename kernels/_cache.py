"""Tensors kept between calls (caches of indices, layouts, workspaces) are made as normal tensors.

Under ``torch.inference_mode`` every new tensor is an *inference tensor*: autograd may not save it for a backward
pass and nothing outside inference mode may write it in place. A cache filled during an inference-mode call and
read by a later training step or written by a later call outside it would then fail there, far from the cause.
"""

from __future__ import annotations

import contextlib

import torch


def persistent():
    """Context in which to create a tensor that outlives the call: inference mode off (a no-op while torch.compile
    traces, which builds its own tensors and caches nothing)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.inference_mode(False)
