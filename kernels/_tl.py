"""Triton helpers every kernel shares: the fp32-accumulating ``tl.dot`` and how its precision is chosen."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._interpreter import interpreting


@triton.jit
def dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation. UPCAST (set only under TRITON_INTERPRET for bfloat16, whose dot the
    interpreter gets wrong) feeds fp32 copies: bf16 products are exact in fp32, so the result is the
    tensor-core one up to summation order."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


def precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast(dtype):
    return dtype == torch.bfloat16 and interpreting()
