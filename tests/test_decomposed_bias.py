"""``decomposed_bias``: SAM's decomposed rel-pos bias in full. The C++ op ``sam_fast::decomposed_bias`` against its
reference, the public function's backends (the C++ kernel for float32 / float64, the reference otherwise, neither a
fallback), and argument checks."""

import warnings

import pytest
import torch

import sam_fast
from sam_fast.ops.decomposed_bias import decomposed_bias
from sam_fast.reference.decomposed_bias import decomposed_bias as reference


def test_decomposed_bias_op_matches_its_reference():
    """sam_fast::decomposed_bias (C++) against the broadcasting add it replaces, rows of 14, 16, 17 and 64
    (the AVX-512 path's masked tails) in float32 and float64, strided inputs, written into the given buffer;
    a wrong buffer or dtype is refused."""
    gen = torch.Generator().manual_seed(0)
    for ay, ax in ((14, 14), (16, 16), (3, 17), (64, 64), (1, 1)):
        for dtype in (torch.float32, torch.float64):
            rh = torch.randn(2, 3, ay, 5, generator=gen, dtype=dtype).transpose(-1, -2)  # strided
            rw = torch.randn(2, 3, 5, ax, generator=gen, dtype=dtype)
            out = torch.full((2, 3, 5, ay * ax), float("nan"), dtype=dtype)
            got = decomposed_bias(rh, rw, out)
            assert got is out and torch.equal(out, reference(rh, rw))
    with pytest.raises(RuntimeError, match="out must be"):
        torch.ops.sam_fast.decomposed_bias(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 11))
    with pytest.raises(RuntimeError, match="float32 or all float64"):
        torch.ops.sam_fast.decomposed_bias(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.float64),
                                           torch.zeros(2, 12))



def test_backends_by_dtype_without_fallback_warnings():
    """float32 / float64 through the C++ kernel, bf16 / fp16 through the reference: the kernel's dtypes by design,
    so ``auto`` warns of no fallback; an explicit ``cpu`` for bf16 says why not."""
    gen = torch.Generator().manual_seed(1)
    rh, rw = torch.randn(2, 4, 7, generator=gen), torch.randn(2, 4, 5, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sam_fast.SamFastFallbackWarning)
        with sam_fast.record_backends() as rec:
            for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
                got = decomposed_bias(rh.to(dtype), rw.to(dtype))
                assert got.dtype == dtype and torch.equal(got, reference(rh.to(dtype), rw.to(dtype)))
    assert [b for _, b in rec.calls] == ["cpu", "cpu", "reference", "reference"]
    with pytest.raises(sam_fast.BackendUnavailableError, match="float32 or float64"):
        decomposed_bias(rh.bfloat16(), rw.bfloat16(), backend="cpu")


def test_public_function_refuses_bad_arguments_by_name():
    rh, rw = torch.zeros(2, 3), torch.zeros(2, 4)
    with pytest.raises(TypeError, match="rel_h must be a torch.Tensor"):
        decomposed_bias([0.0], rw)
    with pytest.raises(TypeError, match="rel_w must be floating point"):
        decomposed_bias(rh, torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="rel_h must have at least one dim"):
        decomposed_bias(torch.tensor(1.0), rw)
    with pytest.raises(ValueError, match="share their leading dims"):
        decomposed_bias(rh, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="out must be a contiguous \\(2, 12\\)"):
        decomposed_bias(rh, rw, torch.zeros(2, 11))
    with pytest.raises(ValueError, match="not contiguous"):
        decomposed_bias(rh, rw, torch.zeros(12, 2).t())
    with pytest.raises(TypeError, match="out must have the terms' dtype"):
        decomposed_bias(rh, rw, torch.zeros(2, 12, dtype=torch.float64))
    with pytest.raises(TypeError, match="out must be a torch.Tensor or None"):
        decomposed_bias(rh, rw, [0.0] * 24)
