"""Argument checks every public function shares: one wording, one rule for what counts as an int or a number.

A wrong type is a ``TypeError`` naming the argument; a value out of range is a ``ValueError`` naming it and the value.
``bool`` is never an int or a number here (``True`` as a block count or a learning rate is a mistake), while numpy's
integer and float scalars are.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional


def int_arg(value, name: str, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """``value`` as an int, at least ``minimum`` and at most ``maximum`` where given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be an int <= {maximum}, got {value}")
    return value


def float_arg(value, name: str, *, positive: bool = False, minimum: Optional[float] = None,
              maximum: Optional[float] = None) -> float:
    """``value`` as a finite float: > 0 with ``positive``, within [``minimum``, ``maximum``] where given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be a number >= {minimum}, got {value!r}")
    if maximum is not None and v > maximum:
        raise ValueError(f"{name} must be a number <= {maximum}, got {value!r}")
    return v
