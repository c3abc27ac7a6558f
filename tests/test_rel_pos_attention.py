"""``rel_pos_attention``: attention over segments with the decomposed rel-pos bias added inside the kernel. The C++ op
``sam_fast::rel_pos_attention`` on each of its instruction-set paths against the shipped reference in float64, the
public function's backends, and argument checks."""

import pytest
import torch

import sam_fast
from sam_fast.ops.rel_pos_attention import rel_pos_attention
from sam_fast.reference.rel_pos_attention import rel_pos_attention as reference

_OP_SHAPES = [(2, 3, 20, 15, 14), (1, 2, 7, 9, 80), (3, 1, 1, 1, 8), (1, 2, 3, 17, 32), (1, 2, 3, 75, 7)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S,H,ay,ax,D", _OP_SHAPES)
def test_rel_pos_attention_op_matches_its_reference(S, H, ay, ax, D, dtype, cpu_paths):
    """The kernel with the bias inside its row blocks, float32 and bf16, on each of its paths (``cpu_paths``: with
    AVX-512 off, the scalar row pass and ATen's bf16 GEMMs on plain row-major operands; with AMX off, the AVX512-BF16
    dot products on VNNI panels where the CPU has them, as on a CPU without AMX): q, k, v strided (views of one qkv
    tensor); more than one block of rows (300 queries: 256 + 44 in float32; bf16 blocks are shorter still); key
    counts past one 64-key panel with a partial last panel, odd key counts (bf16's VNNI pairs get a zero key),
    odd head dims; masked keys as -inf in rel_h / rel_w, a query row that sees no key at all (out 0, lse -inf);
    logits up to about +-90 (the vector exp's range reduction); within the tolerance rule of the same
    computation in PyTorch against float64 (bf16: bf16 inputs, PyTorch's bf16 attention as the yardstick).
    Bad arguments are refused by name."""
    from sam_fast.ops._ext import extension_error
    from sam_fast.testing import FWD_FACTOR, check_against_reference

    assert extension_error() is None  # (loads the C++ ops)
    gen = torch.Generator().manual_seed(S * 100 + ax)
    L = ay * ax
    qkv = (torch.randn(S, L, 3, H, D, generator=gen, dtype=torch.float64) * 3).to(dtype).double()
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (S, H, L, D), token stride 3 * H * D
    rh = torch.randn(S, H, L, ay, generator=gen, dtype=torch.float64) * 4
    rw = torch.randn(S, H, L, ax, generator=gen, dtype=torch.float64) * 4
    if ay > 2:
        rh[:, :, :, 1] = float("-inf")  # a masked key row
    if ax > 3:
        rw[:, :, :, -1] = float("-inf")  # a masked key column
    blind = S > 1 and L > 5
    if blind:
        rh[1, 0, 5] = float("-inf")  # one query that sees nothing
    scale = 10.0 / D ** 0.5
    exact = reference(q, k, v, rh, rw, scale)
    f32 = [t.float() for t in (q, k, v, rh, rw)]
    same = reference(*(t.to(dtype) for t in f32[:3]), *f32[3:], scale)
    q32, k32, v32 = (t.to(dtype).transpose(1, 2) for t in qkv.unbind(2))
    out = torch.full((S, L, H, D), float("nan"), dtype=dtype)
    lse = torch.full((S, H, L), float("nan"))
    torch.ops.sam_fast.rel_pos_attention(q32, k32, v32, f32[3], f32[4], scale, out, lse)
    check_against_reference("out", out, exact[0], same[0], dtype, FWD_FACTOR)
    finite = torch.isfinite(exact[1])
    assert torch.equal(torch.isfinite(lse), finite)
    # the lse is float32 in both dtypes (the logits are accumulated in float32 from the same inputs)
    check_against_reference("lse", lse[finite], exact[1][finite], same[1][finite].float(), torch.float32,
                            FWD_FACTOR)
    if blind:
        assert lse[1, 0, 5] == float("-inf") and torch.equal(out[1, 5, 0], torch.zeros(D, dtype=dtype))
    with pytest.raises(RuntimeError, match="all float32 or all bfloat16"):
        torch.ops.sam_fast.rel_pos_attention(q32.double(), k32, v32, f32[3], f32[4], scale, out, lse)
    with pytest.raises(RuntimeError, match="all float32 or all bfloat16"):
        other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
        torch.ops.sam_fast.rel_pos_attention(q32, k32.to(other), v32, f32[3], f32[4], scale, out, lse)
    with pytest.raises(RuntimeError, match="rel_h, rel_w and lse must be float32"):
        torch.ops.sam_fast.rel_pos_attention(q32, k32, v32, f32[3].double(), f32[4], scale, out, lse)
    with pytest.raises(RuntimeError, match="out must be a contiguous"):
        strided = torch.empty(S, L, H, 2 * D, dtype=dtype)[..., :D]
        torch.ops.sam_fast.rel_pos_attention(q32, k32, v32, f32[3], f32[4], scale, strided, lse)
    with pytest.raises(RuntimeError, match="ay \\* ax"):
        torch.ops.sam_fast.rel_pos_attention(q32, k32, v32, torch.cat([f32[3], f32[3]], -1), f32[4], scale, out, lse)



def _inputs(S, H, ay, ax, D, seed):
    gen = torch.Generator().manual_seed(seed)
    L = ay * ax
    q, k, v = (torch.randn(S, H, L, D, generator=gen) for _ in range(3))
    rh = torch.randn(S, H, L, ay, generator=gen)
    rw = torch.randn(S, H, L, ax, generator=gen)
    return q, k, v, rh, rw


def test_backends_agree_and_are_recorded():
    """The public function: ``auto`` runs the C++ kernel on float32 CPU tensors, the reference where asked, where
    autograd records (it differentiates) or for float64 (not the kernel's dtype: no fallback warning); out and lse
    are written where given."""
    from sam_fast.testing import FWD_FACTOR, check_against_reference

    q, k, v, rh, rw = _inputs(2, 3, 4, 5, 8, seed=5)
    exact = reference(*(t.double() for t in (q, k, v, rh, rw)), 0.4)
    out, lse = torch.empty(2, 20, 3, 8), torch.empty(2, 3, 20)
    with sam_fast.record_backends() as rec:
        got = rel_pos_attention(q, k, v, rh, rw, 0.4, out=out, lse=lse)
        ref = rel_pos_attention(q, k, v, rh, rw, 0.4, backend="reference")
        dbl = rel_pos_attention(*(t.double() for t in (q, k, v, rh, rw)), 0.4)
    assert [b for _, b in rec.calls] == ["cpu", "reference", "reference"] and rec.fallbacks == []
    assert got[0] is out and got[1] is lse
    check_against_reference("out", out, exact[0], ref[0], torch.float32, FWD_FACTOR)
    check_against_reference("lse", lse, exact[1], ref[1], torch.float32, FWD_FACTOR)
    assert torch.equal(dbl[0], exact[0])
    qg = q.clone().requires_grad_()
    with sam_fast.record_backends() as rec:
        o, _ = rel_pos_attention(qg, k, v, rh, rw, 0.4)
    assert rec.calls == [("rel_pos_attention", "reference")]
    o.sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()


def test_public_function_refuses_bad_arguments_by_name():
    q, k, v, rh, rw = _inputs(1, 2, 3, 4, 8, seed=0)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        rel_pos_attention(None, k, v, rh, rw, 0.5)
    with pytest.raises(ValueError, match="k must have 4 dims"):
        rel_pos_attention(q, k[0], v, rh, rw, 0.5)
    with pytest.raises(ValueError, match="k and v must be \\(S, H, Lk, D\\)"):
        rel_pos_attention(q, k[:, :1], v, rh, rw, 0.5)
    with pytest.raises(TypeError, match="share one dtype"):
        rel_pos_attention(q, k.double(), v, rh, rw, 0.5)
    with pytest.raises(ValueError, match="ay \\* ax = Lk = 12"):
        rel_pos_attention(q, k, v, rh[..., :2], rw, 0.5)
    with pytest.raises(TypeError, match="scale must be a number"):
        rel_pos_attention(q, k, v, rh, rw, None)
    with pytest.raises(ValueError, match="out must be a contiguous \\(1, 12, 2, 8\\)"):
        rel_pos_attention(q, k, v, rh, rw, 0.5, out=torch.empty(1, 2, 12, 8))
    with pytest.raises(ValueError, match="lse must be a contiguous"):
        rel_pos_attention(q, k, v, rh, rw, 0.5, lse=torch.empty(1, 2, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match="backend must be one of"):
        rel_pos_attention(q, k, v, rh, rw, 0.5, backend="gpu")
