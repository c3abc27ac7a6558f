"""Signal-to-noise figures every part of sam_fast reports: one definition, one argument order.

``sqnr_db(reference, approx)``: the reference first, the approximation second (int8 against float, a student's
embedding against the teacher's). SQNR is not symmetric, so the order matters.
"""

from __future__ import annotations

import math

import torch


def ratio_db(power: float, noise: float) -> float:
    """``10 log10(power / noise)`` in dB: inf when the noise is 0 (exact), -inf when the power is 0."""
    if noise == 0.0:
        return math.inf
    if power == 0.0:
        return -math.inf
    return 10.0 * math.log10(power / noise)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """``10 log10(sum r^2 / sum (r - a)^2)`` in dB over all elements, in float64 (inf if ``approx`` is exact)."""
    r = reference.detach().double()
    return ratio_db(float(r.pow(2).sum()), float((r - approx.detach().double()).pow(2).sum()))
