"""sam_fast::resize_rel_pos, the C++ op, vs segment_anything's F.interpolate resize."""

import pytest
import torch
from devices import gpu, smoke

import sam_fast
from sam_fast.reference.resize_rel_pos import resize_rel_pos as resize_rel_pos_reference


@pytest.mark.parametrize("L,length", [(27, 55), (27, 13), (127, 127 * 2 + 1), (5, 1), (1, 9), (63, 127)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matches_interpolate(L, length, dtype, device):
    t = torch.randn(L, 24, dtype=dtype)
    with sam_fast.record_backends() as rec:
        got = sam_fast.resize_rel_pos(t.to(device), length).cpu()
    assert rec.calls == [("resize_rel_pos", device.type)]
    ref = resize_rel_pos_reference(t, length)
    assert got.shape == (length, 24) and got.dtype == dtype
    if dtype == torch.float64:
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    elif dtype == torch.float32:  # same formula; float scale rounding only
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
    else:
        torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=0)


def test_opcheck_and_gradient():
    t = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    sam_fast.resize_rel_pos(t, 17)  # registers fake and autograd
    torch.library.opcheck(torch.ops.sam_fast.resize_rel_pos.default, (t, 17))
    torch.library.opcheck(torch.ops.sam_fast.resize_rel_pos.default, (t.detach().t().contiguous().t(), 5))
    assert torch.autograd.gradcheck(lambda x: sam_fast.resize_rel_pos(x, 17), (t,))


def test_errors():
    with pytest.raises(ValueError, match=r"rel_pos must have shape \(L, C\)"):
        sam_fast.resize_rel_pos(torch.zeros(3), 5)
    with pytest.raises(ValueError, match="length must be a positive int"):
        sam_fast.resize_rel_pos(torch.zeros(3, 2), 0)
    with pytest.raises(TypeError, match="floating-point"):
        sam_fast.resize_rel_pos(torch.zeros(3, 2, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match="backend='cuda' refused"):
        sam_fast.resize_rel_pos(torch.zeros(3, 2), 5, backend="cuda")
    with pytest.raises(RuntimeError, match="sam_fast::resize_rel_pos: expected length >= 1"):
        torch.ops.sam_fast.resize_rel_pos(torch.zeros(3, 2), 0)


# ------------------------------------------------------------------------------------------------
# CUDA at SAM's real shapes (pytest -m gpu)
# ------------------------------------------------------------------------------------------------

@gpu
@smoke
def test_resize_rel_pos_cuda_matches_cpu():
    t = torch.randn(27, 80)
    with sam_fast.record_backends() as rec:
        got = sam_fast.resize_rel_pos(t.cuda(), 127)
    assert rec.calls == [("resize_rel_pos", "cuda")]
    torch.testing.assert_close(got.cpu(), sam_fast.resize_rel_pos(t, 127), atol=1e-6, rtol=0)
