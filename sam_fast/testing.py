"""Accuracy rules shared by tests and benchmarks (DESIGN.md "Numerics and tests").

A kernel's error against an fp32 (or fp64) reference must be at most ``factor`` times the error of
PyTorch computing the same thing at the kernel's precision, plus a small epsilon: 2x for forward
outputs, 3x for gradients.
"""

from __future__ import annotations

import torch

FWD_FACTOR = 2.0
BWD_FACTOR = 3.0
EPS = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    diff = torch.where(both_inf, torch.zeros_like(a), (a - b).abs())
    return float(diff.max()) if diff.numel() else 0.0


def check_against_reference(name: str, actual, exact, same_precision, dtype, factor: float) -> float:
    """Raise AssertionError unless err(actual) <= factor * err(same_precision) + eps. Returns the error."""
    err = max_err(actual, exact)
    base = max_err(same_precision, exact)
    bound = factor * base + EPS[dtype]
    if not err <= bound:
        raise AssertionError(f"{name}: error {err:.3e} exceeds {factor}x PyTorch's {dtype} error "
                             f"{base:.3e} + eps {EPS[dtype]:.0e} = {bound:.3e}")
    return err
