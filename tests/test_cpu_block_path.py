"""The CPU path of SAM's own blocks at inference: ``sam_fast::sam_block_attention`` (window and global attention read
straight from the qkv tensor, the decomposed rel-pos bias computed and added inside the kernel) against
segment_anything's own attention functions, float32 and bf16, odd grids, partial windows, head dims 7 / 14 / 80, more
than one block of rows, the qkv bias added as rows are read; ``sam_fast::linear_epilogue_`` and ``fused_linear``
(bias, GELU and residual after a bias-free GEMM); and the routing of ``SamFastBlock`` through them, which must leave
its input untouched."""

import copy

import pytest
import torch
import torch.nn.functional as F

from sam_fast.testing import FWD_FACTOR, check_against_reference


@pytest.fixture(autouse=True)
def _ops():
    from sam_fast.ops._ext import extension_error

    assert extension_error() is None  # (loads the C++ ops)


def _block_reference(qkv, heads, window, rel_pos_h, rel_pos_w, pad_k, pad_v, scale):
    """segment_anything's window partition and attention (before proj), written with its own helpers: qkv (B, Hg,
    Wg, 3C) -> (B, Hg, Wg, C); padded positions carry (anything, pad_k, pad_v) as SAM's zero-padded tokens carry
    the qkv bias."""
    from segment_anything.modeling.image_encoder import add_decomposed_rel_pos, window_partition, window_unpartition

    B, Hg, Wg, C3 = qkv.shape
    C = C3 // 3
    pad_hw = None
    if window > 0:
        fill = torch.cat([torch.zeros(C, dtype=qkv.dtype), pad_k.flatten(), pad_v.flatten()])
        mask = torch.zeros(B, Hg, Wg, 1, dtype=qkv.dtype)
        windows, pad_hw = window_partition(qkv, window)  # zeros where padded
        real, _ = window_partition(mask + 1, window)
        windows = windows + (1 - real) * fill
    else:
        windows = qkv
    n, h, w, _ = windows.shape
    q, k, v = windows.reshape(n, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4).reshape(3, n * heads, h * w, -1)
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = add_decomposed_rel_pos(attn, q, rel_pos_h.to(q.dtype), rel_pos_w.to(q.dtype), (h, w), (h, w))
    out = (attn.softmax(dim=-1) @ v).view(n, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(n, h, w, C)
    return window_unpartition(out, window, pad_hw, (Hg, Wg)) if window > 0 else out


# (B, grid, heads, head dim, window): partial windows with padded keys; D = 80 (VNNI panels of 64 + 16) without
# padding; a global block of 400 tokens (two blocks of rows, key grids over 16 wide); a window larger than the
# grid; a global 17 x 3 grid; an odd head dim (bf16 without VNNI pairs)
_CASES = [(2, (9, 11), 3, 14, 4), (1, (8, 8), 2, 80, 4), (1, (20, 20), 2, 8, 0), (1, (5, 7), 1, 32, 8),
          (1, (17, 3), 2, 16, 0), (1, (6, 6), 2, 7, 3)]


def _inputs(B, grid, heads, D, window, seed):
    gen = torch.Generator().manual_seed(seed)
    C = heads * D
    seg = window if window > 0 else None
    span_h = 2 * (seg or grid[0]) - 1
    span_w = 2 * (seg or grid[1]) - 1
    qkv = torch.randn(B, *grid, 3 * C, generator=gen, dtype=torch.float64) * 2
    rel_h = torch.randn(span_h, D, generator=gen, dtype=torch.float64) * 0.3
    rel_w = torch.randn(span_w, D, generator=gen, dtype=torch.float64) * 0.3
    bias = torch.randn(3 * C, generator=gen, dtype=torch.float64)
    return qkv, rel_h, rel_w, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,grid,heads,D,window", _CASES)
def test_sam_block_attention_op_matches_segment_anything(B, grid, heads, D, window, dtype, cpu_paths):
    """The op against segment_anything's attention in float64 (the tolerance rule, with the same computation in
    the op's dtype as the yardstick): with the padded keys' pad_k / pad_v, and with qkv holding x W^T alone and the
    bias handed to the kernel (the same result as the biased qkv); on each path (``cpu_paths``: the scalar row pass,
    rel-pos products and VNNI packing with AVX-512 off; bf16 GEMMs on plain row-major operands with AMX off)."""
    qkv, rel_h, rel_w, bias = _inputs(B, grid, heads, D, window, seed=B * 31 + D)
    C = heads * D
    scale = D ** -0.5
    pad_k, pad_v = bias[C:2 * C].view(heads, D), bias[2 * C:].view(heads, D)
    lowp = (qkv + bias).to(dtype)
    exact = _block_reference(lowp.double(), heads, window, rel_h.float().double(), rel_w.float().double(),
                             pad_k.to(dtype).double(), pad_v.to(dtype).double(), scale)
    same = _block_reference(lowp, heads, window, rel_h.float(), rel_w.float(), pad_k.to(dtype), pad_v.to(dtype), scale)
    tables = (rel_h.float(), rel_w.float())
    out = torch.full((B, *grid, C), float("nan"), dtype=dtype)
    torch.ops.sam_fast.sam_block_attention(lowp, heads, window, *tables, None, pad_k.to(dtype).contiguous(),
                                           pad_v.to(dtype).contiguous(), scale, out)
    check_against_reference("out", out, exact, same, dtype, FWD_FACTOR)
    # x W^T alone in qkv, the bias added by the kernel as it reads the rows (float32 here: exact inputs)
    if dtype == torch.float32:
        bare = qkv.float()
        out2 = torch.full_like(out, float("nan"))
        torch.ops.sam_fast.sam_block_attention(bare, heads, window, *tables, bias.float(), pad_k.float().contiguous(),
                                               pad_v.float().contiguous(), scale, out2)
        exact2 = _block_reference(bare.double() + bias.float().double(), heads, window, *(t.double() for t in tables),
                                  pad_k.float().double(), pad_v.float().double(), scale)
        check_against_reference("out (qkv bias in the kernel)", out2, exact2, same, dtype, FWD_FACTOR)


def test_sam_block_attention_op_pads_with_zeros_without_pad_kv():
    """No pad_k / pad_v: the padded keys are zeros (a qkv layer without bias), as segment_anything's zero padding
    gives."""
    qkv, rel_h, rel_w, _ = _inputs(1, (7, 5), 2, 8, 3, seed=3)
    zero = torch.zeros(2, 8, dtype=torch.float64)
    exact = _block_reference(qkv.float().double(), 2, 3, rel_h.float().double(), rel_w.float().double(), zero, zero,
                             0.3)
    same = _block_reference(qkv.float(), 2, 3, rel_h.float(), rel_w.float(), zero.float(), zero.float(), 0.3)
    out = torch.empty(1, 7, 5, 16)
    torch.ops.sam_fast.sam_block_attention(qkv.float(), 2, 3, rel_h.float(), rel_w.float(), None, None, None, 0.3, out)
    check_against_reference("out", out, exact, same, torch.float32, FWD_FACTOR)


def test_sam_block_attention_op_refuses_bad_arguments():
    qkv = torch.randn(1, 6, 6, 3 * 16)
    rh, rw = torch.randn(5, 8), torch.randn(5, 8)
    out = torch.empty(1, 6, 6, 16)
    op = torch.ops.sam_fast.sam_block_attention

    def call(**kw):
        args = dict(qkv=qkv, heads=2, window=3, rh=rh, rw=rw, bias=None, pk=None, pv=None, out=out)
        args.update(kw)
        op(args["qkv"], args["heads"], args["window"], args["rh"], args["rw"], args["bias"], args["pk"], args["pv"],
           0.5, args["out"])

    call()  # the arguments above are valid
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        call(qkv=qkv.double())
    with pytest.raises(RuntimeError, match="3 \\* heads \\* head_dim"):
        call(heads=5)
    with pytest.raises(RuntimeError, match="window must be >= 0"):
        call(window=-1)
    with pytest.raises(RuntimeError, match="rel_pos_h must be a contiguous float32 \\(5, 8\\)"):
        call(rh=torch.randn(7, 8))
    with pytest.raises(RuntimeError, match="rel_pos_w must be"):
        call(rw=rw.double())
    with pytest.raises(RuntimeError, match="out must be a contiguous \\(1, 6, 6, 16\\)"):
        call(out=torch.empty(1, 6, 6, 32)[..., :16])
    with pytest.raises(RuntimeError, match="qkv_bias must be a contiguous \\(48,\\)"):
        call(bias=torch.zeros(16))
    with pytest.raises(RuntimeError, match="both pad_k and pad_v"):
        call(pk=torch.zeros(2, 8))
    with pytest.raises(RuntimeError, match="pad_k and pad_v must be contiguous \\(2, 8\\)"):
        call(pk=torch.zeros(2, 4), pv=torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match="single memory location"):
        call(out=qkv.view(-1)[: 36 * 16].view(1, 6, 6, 16))  # out inside qkv
    with pytest.raises(RuntimeError, match="contiguous last dim"):
        call(qkv=torch.randn(1, 6, 6, 96)[..., ::2])


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


def test_fused_linear_matches_the_modules_and_steps_aside(monkeypatch):
    """fused_linear: the layer, its GELU and a residual in one pass after the GEMM (float32, large enough outputs);
    None (the caller runs the modules) for bf16, small outputs, another module type, or autograd recording."""
    import sam_fast.ops.linear_epilogue as le

    lin = torch.nn.Linear(48, 80)
    x = torch.randn(2, 30, 48)
    res = torch.randn(2, 30, 80)
    monkeypatch.setattr(le, "FUSED_MIN_BYTES", 0)
    with torch.no_grad():
        for act, approx in (("none", None), ("gelu", "none"), ("gelu_tanh", "tanh")):
            want = lin(x) if approx is None else F.gelu(lin(x), approximate=approx)
            torch.testing.assert_close(le.fused_linear(lin, x, act), want)
            torch.testing.assert_close(le.fused_linear(lin, x, act, residual=res), want + res)
        assert le.fused_linear(copy.deepcopy(lin).bfloat16(), x.bfloat16()) is None
        assert le.fused_linear(torch.nn.Identity(), x) is None
        monkeypatch.setattr(le, "FUSED_MIN_BYTES", 1 << 30)
        assert le.fused_linear(lin, x) is None
    monkeypatch.setattr(le, "FUSED_MIN_BYTES", 0)
    assert le.fused_linear(lin, x) is None  # grad enabled, the weight requires grad
    with pytest.raises(ValueError, match="activation must be one of"):
        le.fused_linear(lin, x, "relu")


def _sam_block(dim, heads, window, grid, seed=0):
    from segment_anything.modeling.image_encoder import Block

    torch.manual_seed(seed)
    blk = Block(dim, heads, mlp_ratio=2.0, qkv_bias=True, use_rel_pos=True, window_size=window, input_size=grid)
    with torch.no_grad():
        blk.attn.rel_pos_h.normal_(std=0.2)
        blk.attn.rel_pos_w.normal_(std=0.2)
    return blk.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,grid", [(4, (9, 11)), (0, (6, 5))])
def test_sam_fast_block_runs_the_block_kernel_at_inference(window, grid, dtype, monkeypatch):
    """SamFastBlock on the CPU at inference: the attention through sam_block_attention (float32: the qkv bias added in
    the kernel), the projection and MLP through fused_linear (float32), within the tolerance rule of
    segment_anything's block; its input is left untouched. With autograd recording or backend="reference" the block
    kernel does not run, and the result is the same."""
    import sam_fast.ops.dilated_attention_cpu as cpu
    import sam_fast.ops.linear_epilogue as le
    from sam_fast.nn.attention import SamFastBlock

    monkeypatch.setattr(cpu, "SAM_BLOCK_MIN_KEYS", 16)  # the 4 x 4 windows here
    monkeypatch.setattr(le, "FUSED_MIN_BYTES", 0)
    calls = []
    for name in ("sam_block_attention", "linear_epilogue_"):
        real = getattr(torch.ops.sam_fast, name)
        monkeypatch.setattr(torch.ops.sam_fast, name, lambda *a, _n=name, _r=real: calls.append(_n) or _r(*a),
                            raising=False)
    blk = _sam_block(32, 2, window, grid)
    x = torch.randn(2, *grid, 32)
    with torch.no_grad():
        exact = copy.deepcopy(blk).double()(x.double())
        same = copy.deepcopy(blk).to(dtype)(x.to(dtype))
        xd = x.to(dtype)
        keep = xd.clone()
        out = SamFastBlock(copy.deepcopy(blk).to(dtype))(xd)
    assert torch.equal(xd, keep)
    check_against_reference("block", out, exact, same, dtype, FWD_FACTOR)
    # the kernel needs AVX-512, and a bf16 model a CPU that multiplies bf16 in hardware (elsewhere the batched path
    # computes bf16 in float32)
    assert ("sam_block_attention" in calls) == (cpu._fused_bias_kernel() and cpu.compute_dtype(dtype) == dtype)
    assert ("linear_epilogue_" in calls) == (dtype == torch.float32)
    calls.clear()
    with torch.no_grad():
        ref_backend = SamFastBlock(copy.deepcopy(blk).to(dtype), backend="reference")(xd)
    check_against_reference("block (reference backend)", ref_backend, exact, same, dtype, FWD_FACTOR)
    assert "sam_block_attention" not in calls
    calls.clear()
    grad_x = xd.clone().requires_grad_(True)
    trained = SamFastBlock(copy.deepcopy(blk).to(dtype))(grad_x)
    check_against_reference("block (autograd)", trained.detach(), exact, same, dtype, FWD_FACTOR)
    assert calls == []
    trained.sum().backward()
    assert grad_x.grad is not None and torch.isfinite(grad_x.grad).all()
