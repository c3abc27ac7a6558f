"""Triton upscale + GELU + hypernetwork mask product (under the interpreter) vs its reference."""

import pytest
import torch
from devices import gpu, smoke

import sam_fast
from sam_fast.models import tiny_sam
from sam_fast.nn.decoder import BatchedMaskDecoder
from sam_fast.ops.upscale_mask_product import upscale_mask_product
from sam_fast.reference import upscale_mask_product as reference
from sam_fast.testing import FWD_FACTOR, check_against_reference

# (P, CIN, COUT, h, w, M): SAM's channels (64 -> 32) on a small grid, the tiny model's (8 -> 4),
# one mask, a non-square grid off every block size, widths that are not powers of two.
CASES = [(2, 64, 32, 8, 8, 3), (3, 8, 4, 5, 7, 1), (1, 24, 12, 9, 13, 3), (2, 64, 32, 3, 40, 4)]


def _inputs(P, CIN, COUT, h, w, M, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(P, CIN, h, w, generator=g)
    weight = torch.randn(CIN, COUT, 2, 2, generator=g) / CIN ** 0.5
    bias = torch.randn(COUT, generator=g) * 0.1
    hyper = torch.randn(P, M, COUT, generator=g)
    return [t.to(dtype) for t in (x, weight, bias, hyper)]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(case, dtype, device):
    args = [t.to(device) for t in _inputs(*case, dtype)]
    with sam_fast.record_backends() as rec:
        got = upscale_mask_product(*args, backend="triton")
    assert rec.calls == [("upscale_mask_product", "triton")]
    exact = reference.upscale_mask_product(*[a.double() for a in args])
    same_precision = upscale_mask_product(*args, backend="reference")
    assert got.shape == exact.shape and got.dtype == dtype
    check_against_reference("upscale_mask_product", got, exact, same_precision, dtype, FWD_FACTOR)


def test_auto_on_cpu_runs_the_reference():
    args = _inputs(1, 8, 4, 4, 4, 3, torch.float32)
    with sam_fast.record_backends() as rec:
        upscale_mask_product(*args)
    assert rec.calls == [("upscale_mask_product", "reference")] and not rec.fallbacks


def test_decoder_runs_the_kernel():
    sam = tiny_sam()
    emb = torch.randn(2, 32, 16, 16)
    index = torch.tensor([1, 0, 1])
    coords, labels = torch.rand(3, 1, 2) * 256, torch.ones(3, 1, dtype=torch.int)
    with sam_fast.record_backends() as rec:
        got, iou = BatchedMaskDecoder.from_sam(sam, backend="triton")(emb, index, coords, labels)
    assert rec.backends("upscale_mask_product") == {"triton"}
    assert rec.backends("small_key_attention") == {"triton"}
    want, want_iou = BatchedMaskDecoder.from_sam(sam, backend="reference")(emb, index, coords, labels)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(iou, want_iou, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: [a[0][0], *a[1:]], "x must have shape"),
        (lambda a: [a[0], a[1][:, :, :1], *a[2:]], "weight must have shape"),
        (lambda a: [*a[:2], a[2][:2], a[3]], "bias must have shape"),
        (lambda a: [*a[:3], a[3][:, :, :2]], "hyper must have shape"),
        (lambda a: [a[0], a[1].half(), *a[2:]], "weight and hyper must have x's dtype"),
        (lambda a: [a[0].int(), *a[1:]], "x must be float32"),
    ],
)
def test_errors_name_the_argument(change, match):
    args = _inputs(2, 8, 4, 4, 4, 3, torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        upscale_mask_product(*change(args))


def test_opcheck():
    args = _inputs(2, 8, 4, 3, 5, 3, torch.float32)
    from sam_fast.ops.upscale_mask_product import _upscale_mask_product_op

    torch.library.opcheck(_upscale_mask_product_op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("case", CASES[:2], ids=str)
def test_gpu_fp32_block_matches_reference(case, monkeypatch):
    """fp32 on a GPU takes 16-pixel blocks (no spills on sm_90); the interpreter runs them here too."""
    import sam_fast.kernels.upscale_mask_product as k

    launches = []
    kernel = k._upscale_mask_product_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs["BLOCK_N"])
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(k, "_interpreting", lambda: False)
    monkeypatch.setattr(k, "_upscale_mask_product_kernel", Spy())
    args = _inputs(*case, torch.float32)
    got = upscale_mask_product(*args, backend="triton")
    assert launches and set(launches) == {16}
    exact = reference.upscale_mask_product(*[a.double() for a in args])
    same_precision = upscale_mask_product(*args, backend="reference")
    check_against_reference("upscale_mask_product", got, exact, same_precision, torch.float32, FWD_FACTOR)


# ------------------------------------------------------------------------------------------------
# CUDA at SAM's real shapes (pytest -m gpu)
# ------------------------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=smoke), torch.float16, torch.float32])
@pytest.mark.parametrize("P,M", [(64, 3), (257, 1)])
def test_upscale_mask_product_sam_shapes(dtype, P, M):
    from sam_fast.ops.upscale_mask_product import upscale_mask_product
    from sam_fast.reference import upscale_mask_product as reference
    from sam_fast.testing import FWD_FACTOR, check_against_reference

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(P, 64, 128, 128, device="cuda", generator=g)
    weight = torch.randn(64, 32, 2, 2, device="cuda", generator=g) / 8
    bias = torch.randn(32, device="cuda", generator=g) * 0.1
    hyper = torch.randn(P, M, 32, device="cuda", generator=g)
    args = [t.to(dtype) for t in (x, weight, bias, hyper)]
    with sam_fast.record_backends() as rec:
        got = upscale_mask_product(*args)
    assert rec.calls == [("upscale_mask_product", "triton")]
    exact = reference.upscale_mask_product(*[a.double() for a in args])
    same = reference.upscale_mask_product(*args)
    check_against_reference("upscale_mask_product", got, exact, same, dtype, FWD_FACTOR)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_upscale_mask_product_sam2_skip_shapes(dtype):
    """SAM 2's decoder tail: the stride-4 skip features of 3 images added per prompt through the index."""
    from sam_fast.ops.upscale_mask_product import upscale_mask_product
    from sam_fast.reference import upscale_mask_product as reference
    from sam_fast.testing import FWD_FACTOR, check_against_reference

    g = torch.Generator(device="cuda").manual_seed(1)
    P = 100
    x = torch.randn(P, 64, 128, 128, device="cuda", generator=g)
    weight = torch.randn(64, 32, 2, 2, device="cuda", generator=g) / 8
    bias = torch.randn(32, device="cuda", generator=g) * 0.1
    hyper = torch.randn(P, 3, 32, device="cuda", generator=g)
    skip = torch.randn(3, 32, 256, 256, device="cuda", generator=g)
    index = torch.randint(0, 3, (P,), device="cuda", generator=g)
    args = [t.to(dtype) for t in (x, weight, bias, hyper, skip)]
    with sam_fast.record_backends() as rec:
        got = upscale_mask_product(*args, index)
    assert rec.calls == [("upscale_mask_product", "triton")]
    exact = reference.upscale_mask_product(*[a.double() for a in args], index)
    same = reference.upscale_mask_product(*args, index)
    check_against_reference("upscale_mask_product", got, exact, same, dtype, FWD_FACTOR)
