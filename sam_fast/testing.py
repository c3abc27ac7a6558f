"""Accuracy rules shared by tests and benchmarks (docs/maintainers/design.md, "Numerics and tests").

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


# W8A8 (docs/maintainers/design.md: int8 accuracy is stated as SQNR in dB, per test; kernel vs reference to rounding
# level).
INT8_ROUNDING_ULPS = 2.0  # dequantized kernel output vs the reference with the same integer accumulator
INT8_LINEAR_MIN_SQNR_DB = 30.0  # int8_linear vs fp32 F.linear, Gaussian inputs with a few outlier channels
INT8_EMBEDDING_MIN_SQNR_DB = 25.0  # W8A8 image encoder's embedding vs float on real images


def check_rounding_level(name: str, actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Raise AssertionError unless ``|actual - expected| <= k * eps * (|expected| + max|expected|)``
    elementwise (k = INT8_ROUNDING_ULPS, eps of ``actual``'s dtype): the kernel and the reference compute
    the same operations from the same int32 accumulator, differing only by rounding (an FMA, erf).
    Returns the largest error in units of eps * max|expected|."""
    eps = torch.finfo(actual.dtype).eps
    a, e = actual.detach().double(), expected.detach().double()
    top = float(e.abs().max()) if e.numel() else 0.0
    bound = INT8_ROUNDING_ULPS * eps * (e.abs() + top)
    err = (a - e).abs()
    if not bool((err <= bound).all()):
        worst = int((err - bound).argmax())
        raise AssertionError(f"{name}: kernel {a.flatten()[worst]:.8g} vs reference {e.flatten()[worst]:.8g} "
                             f"differs by more than {INT8_ROUNDING_ULPS:g} ulp of |ref| + max|ref| ({top:.3g})")
    return float(err.max()) / (eps * top) if top else 0.0


def write_photos(folder, names) -> list:
    """Write scikit-image's bundled sample photos ``names`` (e.g. ``"astronaut"``, ``"camera"``) into ``folder``
    (created) as RGB PNG files - grey ones as three equal channels, an alpha channel dropped - so tests run on
    real photographs without a download. Returns the paths, in the order of ``names``."""
    import os

    from PIL import Image

    from .images import sample_photo

    os.makedirs(folder, exist_ok=True)
    paths = []
    for name in names:
        paths.append(os.path.join(os.fspath(folder), f"{name}.png"))
        Image.fromarray(sample_photo(name)).save(paths[-1])
    return paths
