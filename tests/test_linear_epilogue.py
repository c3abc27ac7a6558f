"""``linear_epilogue_``: bias, activation and residual after a bias-free GEMM, in place. The C++ op
``sam_fast::linear_epilogue_`` against its reference and PyTorch's own ops, the public function's backends and
argument checks, and ``fused_linear``, which runs a whole ``nn.Linear`` through it."""

import copy

import pytest
import torch
import torch.nn.functional as F

import sam_fast
from sam_fast.ops.linear_epilogue import linear_epilogue_
from sam_fast.reference.linear_epilogue import linear_epilogue as reference


@pytest.fixture(autouse=True)
def _ops():
    from sam_fast.ops._ext import extension_error

    assert extension_error() is None  # (loads the C++ ops)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("activation", ["none", "gelu", "gelu_tanh"])
def test_linear_epilogue_op_matches_pytorch(activation, dtype):
    """act(y + bias) + residual in place, over row blocks (300 rows of 700: several blocks and a partial one), with
    and without bias or residual; the values are ATen's own kernels' (to an ulp: a block's vector tail may differ
    from the whole tensor's)."""
    gen = torch.Generator().manual_seed(7)
    y = (torch.randn(3, 100, 700, generator=gen) * 3).to(dtype)
    bias = torch.randn(700, generator=gen).to(dtype)
    res = torch.randn(3, 100, 700, generator=gen).to(dtype)
    approx = {"gelu": "none", "gelu_tanh": "tanh"}.get(activation)
    for b, r in ((bias, res), (None, res), (bias, None), (None, None)):
        want = y if b is None else y + b
        if approx is not None:
            want = F.gelu(want, approximate=approx)
        if r is not None:
            want = want + r
        got = y.clone()
        torch.ops.sam_fast.linear_epilogue_(got, b, activation, r)
        torch.testing.assert_close(got, want, rtol=2 * torch.finfo(dtype).eps, atol=2 * torch.finfo(dtype).eps)


def test_linear_epilogue_op_refuses_bad_arguments():
    y = torch.randn(4, 6)
    op = torch.ops.sam_fast.linear_epilogue_
    with pytest.raises(RuntimeError, match="activation must be"):
        op(y, None, "relu", None)
    with pytest.raises(RuntimeError, match="y must be a contiguous floating-point"):
        op(torch.zeros(4, 6, dtype=torch.int32), None, "none", None)
    with pytest.raises(RuntimeError, match="y must be a contiguous"):
        op(torch.randn(6, 4).t(), None, "none", None)
    with pytest.raises(RuntimeError, match="bias must be a \\(6,\\)"):
        op(y, torch.zeros(4), "none", None)
    with pytest.raises(RuntimeError, match="residual must be a contiguous"):
        op(y, None, "none", torch.zeros(4, 5))
    with pytest.raises(RuntimeError, match="single memory location"):
        op(y, None, "none", y)
    op(torch.empty(0, 6), torch.zeros(6), "gelu", torch.empty(0, 6))  # empty: nothing to do


#: float32 results against float64: K = 48 products summed in some order
FLOAT32 = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "epilogue"])
def test_fused_linear_matches_the_modules_and_steps_aside(cpu_rules, onednn):
    """fused_linear: the layer, its GELU and a residual in one call, matching float64. With the policy's
    ``fp32_gemm_onednn`` (and oneDNN in this PyTorch) oneDNN's GEMM with them as post-ops, at any size, an activation
    and a residual together excepted; otherwise the bias-free GEMM and the C++ epilogue, for large enough outputs.
    None (the caller runs the modules) for bf16 off the oneDNN path, small outputs off it, another module type, or
    autograd recording."""
    import sam_fast.ops.linear_epilogue as le

    lin = torch.nn.Linear(48, 80)
    x = torch.randn(2, 30, 48)
    res = torch.randn(2, 30, 80)
    cpu_rules(epilogue_min_bytes=0, fp32_gemm_onednn=onednn)
    onednn = onednn and le._onednn_linear_present()
    exact = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    with torch.no_grad():
        for act, approx in (("none", None), ("gelu", "none"), ("gelu_tanh", "tanh")):
            want = exact if approx is None else F.gelu(exact, approximate=approx)
            with sam_fast.record_backends() as rec:
                torch.testing.assert_close(le.fused_linear(lin, x, act).double(), want, **FLOAT32)
                torch.testing.assert_close(le.fused_linear(lin, x, act, residual=res).double(), want + res,
                                           **FLOAT32)
            # oneDNN takes one post-op chain: an activation and a residual together take the epilogue
            paths = [b for op, b in rec.calls if op == "fused_linear"]
            assert paths == ["onednn" if onednn else "epilogue", "onednn" if onednn and act == "none" else "epilogue"]
        cpu_rules(bf16_gemm_onednn=False)
        assert le.fused_linear(copy.deepcopy(lin).bfloat16(), x.bfloat16()) is None  # bf16: the oneDNN path only
        cpu_rules(bf16_gemm_onednn=True)
        assert le.fused_linear(torch.nn.Identity(), x) is None
        cpu_rules(epilogue_min_bytes=1 << 30)
        small = le.fused_linear(lin, x)
        assert small is None if not onednn else torch.allclose(small.double(), exact, **FLOAT32)
    cpu_rules(epilogue_min_bytes=0)
    assert le.fused_linear(lin, x) is None  # grad enabled, the weight requires grad
    with pytest.raises(ValueError, match="activation must be one of"):
        le.fused_linear(lin, x, "relu")


def test_bf16_linears_take_onednn_with_post_ops_where_the_cpu_has_bf16(cpu_rules):
    """bf16 linears on a CPU that multiplies bf16 in hardware (AMX, AVX512-BF16): oneDNN's GEMM with the bias, GELU
    (on the float32 accumulator) or residual as post-ops, within bf16 rounding of float64; elsewhere, or with the
    policy's ``bf16_gemm_onednn`` off, None (the modules run)."""
    import sam_fast.ops.linear_epilogue as le

    lin = torch.nn.Linear(64, 96).bfloat16()
    x = torch.randn(3, 40, 64).bfloat16()
    res = torch.randn(3, 40, 96).bfloat16()
    exact = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    from sam_fast.ops.dilated_attention_cpu import compute_dtype

    native = compute_dtype(torch.bfloat16) == torch.bfloat16 and le._onednn_linear_present()
    with torch.no_grad():
        for act, want in (("gelu", F.gelu(exact)), ("none", exact)):
            with sam_fast.record_backends() as rec:
                got = le.fused_linear(lin, x, act, residual=res if act == "none" else None)
            if not native:
                assert got is None and not rec.calls
                continue
            want = want + res.double() if act == "none" else want
            assert rec.calls == [("fused_linear", "onednn")] and got.dtype == torch.bfloat16
            modules = F.gelu(lin(x)) if act == "gelu" else lin(x) + res  # PyTorch's bf16 error, as the rule wants
            assert (got.double() - want).abs().max() <= 2 * (modules.double() - want).abs().max() + 1e-2
        cpu_rules(bf16_gemm_onednn=False)
        assert le.fused_linear(lin, x, "gelu") is None


def test_gemm_takes_onednn_only_at_eager_float32_inference(cpu_rules):
    """``gemm`` (the bias-free GEMM the SAM block kernel reads): oneDNN's where the policy asks (bf16: on a CPU with
    bf16 arithmetic), plain F.linear with autograd recording, or with the policy off; the same product every way."""
    import sam_fast.ops.linear_epilogue as le

    w = torch.randn(40, 24)
    x = torch.randn(5, 7, 24)
    exact = F.linear(x.double(), w.double())
    with torch.no_grad():
        assert le.onednn_gemm_wanted(x, w) == le._onednn_linear_present()
        torch.testing.assert_close(le.gemm(x, w).double(), exact, **FLOAT32)
        cpu_rules(bf16_gemm_onednn=False)
        assert not le.onednn_gemm_wanted(x.bfloat16(), w.bfloat16())
        cpu_rules(bf16_gemm_onednn=True)
        from sam_fast.ops.dilated_attention_cpu import compute_dtype

        assert le.onednn_gemm_wanted(x.bfloat16(), w.bfloat16()) == (compute_dtype(torch.bfloat16) == torch.bfloat16
                                                                        and le._onednn_linear_present())
        cpu_rules(fp32_gemm_onednn=False)
        assert not le.onednn_gemm_wanted(x, w)
        torch.testing.assert_close(le.gemm(x, w).double(), exact, **FLOAT32)
        # empty shapes: no rows is a product like any other; an empty reduction or width is not oneDNN's
        assert le.gemm(x[:0], w).shape == (0, 7, 40)
        cpu_rules(fp32_gemm_onednn=True)
        assert not le.onednn_gemm_wanted(x[..., :0], w[:, :0]) and not le.onednn_gemm_wanted(x, w[:0])
        torch.testing.assert_close(le.gemm(x[..., :0], w[:, :0]), torch.zeros(5, 7, 40))
    cpu_rules(fp32_gemm_onednn=True)
    xg = x.clone().requires_grad_(True)
    assert not le.onednn_gemm_wanted(xg, w)
    le.gemm(xg, w).sum().backward()
    torch.testing.assert_close(xg.grad, w.sum(0).expand_as(x))


@pytest.mark.parametrize("activation", ["none", "gelu", "gelu_tanh"])
def test_backends_agree_and_are_recorded(activation):
    """The public function: the C++ backend under ``auto`` for CPU tensors, the reference where asked or where
    autograd records (it differentiates), the same values either way."""
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(40, 300, generator=gen)
    bias, res = torch.randn(300, generator=gen), torch.randn(40, 300, generator=gen)
    want = reference(y, bias, activation, res)
    with sam_fast.record_backends() as rec:
        got = linear_epilogue_(y.clone(), bias, activation, res)
        ref = linear_epilogue_(y.clone(), bias, activation, res, backend="reference")
    assert rec.calls == [("linear_epilogue_", "cpu"), ("linear_epilogue_", "reference")]
    torch.testing.assert_close(got, want, rtol=2e-7, atol=2e-7)
    assert torch.equal(ref, want)
    leaf = y.clone().requires_grad_()
    y2 = leaf * 1.0
    with sam_fast.record_backends() as rec:
        out = linear_epilogue_(y2, bias, activation, res)
    assert rec.calls == [("linear_epilogue_", "reference")] and out is y2
    out.sum().backward()
    assert leaf.grad is not None and leaf.grad.shape == y.shape


def test_public_function_refuses_bad_arguments_by_name():
    y = torch.randn(4, 6)
    with pytest.raises(TypeError, match="y must be a torch.Tensor"):
        linear_epilogue_([1.0], None)
    with pytest.raises(ValueError, match="y must be a contiguous floating-point"):
        linear_epilogue_(torch.zeros(4, 6, dtype=torch.int32), None)
    with pytest.raises(ValueError, match="not contiguous"):
        linear_epilogue_(torch.randn(6, 4).t(), None)
    with pytest.raises(ValueError, match="activation must be one of"):
        linear_epilogue_(y, None, "relu")
    with pytest.raises(ValueError, match="bias must be a \\(6,\\)"):
        linear_epilogue_(y, torch.zeros(4))
    with pytest.raises(ValueError, match="residual must be a \\(4, 6\\)"):
        linear_epilogue_(y, None, "none", torch.zeros(4, 5))
    with pytest.raises(ValueError, match="bias must be"):
        linear_epilogue_(y, torch.zeros(6, dtype=torch.float64))
    with pytest.raises(TypeError, match="residual must be a torch.Tensor or None"):
        linear_epilogue_(y, None, "none", 3.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        linear_epilogue_(y, None, backend="gpu")
