"""Loading of the compiled extension ``sam_fast._C`` (C++ / CUDA ops under ``sam_fast::``).

A failed load is never fatal at import: the C++ backends then refuse with the load error as their
reason, so ``backend="auto"`` falls back (with a warning) and an explicit request says why.

The C++ ops' schemas come with the extension; their fake (meta) implementations and autograd formulas are
Python. Each op module registers them at its import through :func:`register_fake` / :func:`register_autograd`,
which load the extension first, so a module's ops are complete (traceable, opcheck-able) from the moment it is
imported.
"""

from __future__ import annotations

import functools

import torch

from .._dispatch import Refusal


@functools.lru_cache(maxsize=None)
def extension_error():
    """None when sam_fast._C loaded, else the reason it did not."""
    try:
        from .. import _C  # noqa: F401  (registers the sam_fast:: ops)
    except Exception as exc:  # ImportError, or an undefined symbol against another torch build
        return f"the compiled extension sam_fast._C failed to load ({type(exc).__name__}: {exc})"
    return None


def register_fake(op: str):
    """Decorator: ``fn`` is the fake implementation of the C++ op ``op`` (``"sam_fast::name"``), registered now;
    nothing is registered when the extension did not load (the op does not exist then)."""
    def decorate(fn):
        if extension_error() is None:
            torch.library.register_fake(op)(fn)
        return fn
    return decorate


def register_autograd(op: str, backward, setup_context) -> None:
    """``torch.library.register_autograd`` for the C++ op ``op``, when the extension loaded."""
    if extension_error() is None:
        torch.library.register_autograd(op, backward, setup_context=setup_context)


@functools.lru_cache(maxsize=None)
def has_cuda_kernels() -> bool:
    """Whether sam_fast._C was built with its CUDA sources."""
    if extension_error() is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("sam_fast::resize_rel_pos", "CUDA")


def cpp_device_refusal(t: torch.Tensor, device_type: str):
    """Why the C++ (``"cpu"``) or CUDA (``"cuda"``) kernels of sam_fast._C cannot take tensor ``t``, or None:
    another device (the normal choice for it, not a fallback), an extension that did not load, or a
    build without CUDA sources."""
    if t.device.type != device_type:
        return Refusal(f"the {device_type} kernel needs a {device_type} tensor, got {t.device}", wrong_device=True)
    err = extension_error()
    if err is not None:
        return Refusal(err)
    if device_type == "cuda" and not has_cuda_kernels():
        return Refusal("sam_fast._C was built without CUDA sources (no CUDA toolkit at install time)")
    return None
