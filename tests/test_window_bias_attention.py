"""``window_bias_attention``: TinyViT's window attention from its qkv tensor - the C++ kernel against the reference
and a float64 computation written from the definition, on each instruction-set path; refusals of bad arguments."""

import pytest
import torch
import torch.nn.functional as F

from sam_fast.ops.window_bias_attention import window_bias_attention
from sam_fast.testing import FWD_FACTOR, check_against_reference


def _definition(qkv, heads, window, bias, pad_k, pad_v, scale):
    """float64, one window at a time, from TinyViT's forward: pad the tokens' qkv, attend inside each window."""
    B, Hg, Wg, C3 = qkv.shape
    D = C3 // 3 // heads
    out = torch.zeros(B, Hg, Wg, heads, D, dtype=torch.float64)
    for b in range(B):
        for y0 in range(0, Hg, window):
            for x0 in range(0, Wg, window):
                rows = []
                for j in range(window * window):
                    y, x = y0 + j // window, x0 + j % window
                    if y < Hg and x < Wg:
                        rows.append(qkv[b, y, x].double().view(heads, 3, D))
                    else:
                        rows.append(torch.stack([torch.zeros(heads, D, dtype=torch.float64), pad_k.double(),
                                                 pad_v.double()], 1))
                t = torch.stack(rows, 1)  # (heads, L, 3, D)
                logits = t[:, :, 0] @ t[:, :, 1].transpose(1, 2) * scale + bias.double()
                o = F.softmax(logits, -1) @ t[:, :, 2]  # (heads, L, D)
                for i in range(window * window):
                    y, x = y0 + i // window, x0 + i % window
                    if y < Hg and x < Wg:
                        out[b, y, x] = o[:, i]
    return out.reshape(B, Hg, Wg, heads * D)


# (B, grid, heads, D, window): padded windows, a grid that is one window, windows of 7 and 14 (TinyViT's), odd sizes
CASES = [(2, (9, 11), 3, 16, 5), (1, (7, 7), 2, 8, 7), (1, (14, 14), 5, 32, 14), (1, (10, 6), 2, 16, 4),
         (1, (3, 5), 1, 8, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-{c[1][0]}x{c[1][1]}-H{c[2]}-D{c[3]}-w{c[4]}")
def test_kernel_and_reference_match_the_definition(case, dtype, cpu_paths):
    B, (Hg, Wg), heads, D, window = case
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, Hg, Wg, 3 * heads * D, generator=g)
    bias = torch.randn(heads, window ** 2, window ** 2, generator=g)
    pad = tuple(torch.randn(heads, D, generator=g) for _ in range(2))
    scale = D ** -0.5
    exact = _definition(qkv.to(dtype), heads, window, bias, pad[0].to(dtype), pad[1].to(dtype), scale)
    same = window_bias_attention(qkv.to(dtype), heads, window, bias, tuple(p.to(dtype) for p in pad), scale,
                                 backend="reference")
    got = window_bias_attention(qkv.to(dtype), heads, window, bias, tuple(p.to(dtype) for p in pad), scale,
                                backend="cpu")
    assert got.dtype == dtype and got.shape == (B, Hg, Wg, heads * D)
    check_against_reference(f"window_bias_attention {dtype} {cpu_paths}", got.double(), exact, same.double(), dtype,
                            FWD_FACTOR)
    check_against_reference("reference", same.double(), exact, same.double(), dtype, 1.0)


def test_padded_keys_are_zeros_without_pad_kv():
    g = torch.Generator().manual_seed(1)
    qkv, bias = torch.randn(1, 5, 5, 24, generator=g), torch.randn(2, 9, 9, generator=g)
    zeros = (torch.zeros(2, 4), torch.zeros(2, 4))
    want = window_bias_attention(qkv, 2, 3, bias, zeros, 0.5, backend="cpu")
    torch.testing.assert_close(window_bias_attention(qkv, 2, 3, bias, None, 0.5, backend="cpu"), want)
    torch.testing.assert_close(window_bias_attention(qkv, 2, 3, bias, None, 0.5, backend="reference"), want)


def test_autograd_takes_the_reference():
    """The kernel has no backward: with autograd recording, "auto" runs the differentiable reference."""
    import sam_fast

    qkv = torch.randn(1, 4, 4, 24, requires_grad=True)
    bias = torch.randn(2, 4, 4)
    with sam_fast.record_backends() as rec:
        out = window_bias_attention(qkv, 2, 2, bias, None, 0.5)
    assert rec.backends() == {"reference"}
    out.sum().backward()
    assert qkv.grad is not None and torch.isfinite(qkv.grad).all()


def test_bad_arguments_are_refused_by_name():
    qkv, bias = torch.randn(1, 6, 6, 48), torch.randn(2, 9, 9)
    with pytest.raises(TypeError, match="qkv must be a torch.Tensor"):
        window_bias_attention(qkv.numpy(), 2, 3, bias, None, 0.5)
    with pytest.raises(ValueError, match="qkv must be a floating-point"):
        window_bias_attention(qkv[0], 2, 3, bias, None, 0.5)
    with pytest.raises(ValueError, match="3 \\* heads \\* D"):
        window_bias_attention(qkv, 5, 3, bias, None, 0.5)
    with pytest.raises(ValueError, match="window"):
        window_bias_attention(qkv, 2, 0, bias, None, 0.5)
    with pytest.raises(ValueError, match="bias must be \\(heads, window\\^2, window\\^2\\) = \\(2, 9, 9\\)"):
        window_bias_attention(qkv, 2, 3, torch.randn(2, 4, 4), None, 0.5)
    with pytest.raises(ValueError, match="pad_k must be a \\(heads, D\\) = \\(2, 8\\)"):
        window_bias_attention(qkv, 2, 3, bias, (torch.zeros(3), torch.zeros(16)), 0.5)
    with pytest.raises((TypeError, ValueError), match="scale"):
        window_bias_attention(qkv, 2, 3, bias, None, "half")
    op = torch.ops.sam_fast.window_bias_attention
    out = torch.empty(1, 6, 6, 16)
    with pytest.raises(RuntimeError, match="bias must be a contiguous float32 \\(2, 9, 9\\)"):
        op(qkv, 2, 3, bias.double(), None, None, 0.5, out)
    with pytest.raises(RuntimeError, match="out must be a contiguous \\(1, 6, 6, 16\\)"):
        op(qkv, 2, 3, bias, None, None, 0.5, torch.empty(1, 6, 6, 8))
    with pytest.raises(RuntimeError, match="window must be in \\[1, 64\\]"):
        op(qkv, 2, 0, bias, None, None, 0.5, out)
    with pytest.raises(RuntimeError, match="both pad_k and pad_v"):
        op(qkv, 2, 3, bias, torch.zeros(2, 8), None, 0.5, out)
    with pytest.raises(RuntimeError, match="single memory location"):
        op(qkv, 2, 3, bias, None, None, 0.5, qkv.view(-1)[: 36 * 16].view(1, 6, 6, 16))
