"""The CPU path of SAM's own blocks at inference: ``sam_fast::sam_block_attention`` (window and global attention read
straight from the qkv tensor, the decomposed rel-pos bias computed and added inside the kernel) against
segment_anything's own attention functions, float32 and bf16, odd grids, partial windows, head dims 7 / 14 / 80, more
than one block of rows, the qkv bias added as rows are read; the shipped reference and the public function's
backends; and the routing of ``SamFastBlock`` through the kernel (with ``fused_linear`` around it), which must leave
its input untouched."""

import copy

import pytest
import torch

import sam_fast
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
# grid; a global 17 x 3 grid; an odd head dim (bf16 without VNNI pairs); global blocks of 600 and 575 keys (bf16 on
# AMX takes the first in chunks of 256, flash attention's way, a last chunk of 88 keys; both again in chunks of 128
# on either VNNI path, SAM_FAST_CPU_ATTENTION_CHUNK: an odd count's zero key in the last chunk)
_CASES = [(2, (9, 11), 3, 14, 4), (1, (8, 8), 2, 80, 4), (1, (20, 20), 2, 8, 0), (1, (5, 7), 1, 32, 8),
          (1, (17, 3), 2, 16, 0), (1, (6, 6), 2, 7, 3), (1, (24, 25), 2, 48, 0), (1, (23, 25), 1, 16, 0)]


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
def test_sam_block_attention_op_matches_segment_anything(B, grid, heads, D, window, dtype, cpu_paths, monkeypatch):
    """The op against segment_anything's attention in float64 (the tolerance rule, with the same computation in
    the op's dtype as the yardstick): with the padded keys' pad_k / pad_v, and with qkv holding x W^T alone and the
    bias handed to the kernel (the same result as the biased qkv); on each path (``cpu_paths``: the scalar row pass,
    rel-pos products and ATen's bf16 GEMMs on plain row-major operands with AVX-512 off; bf16 GEMMs in AVX512-BF16
    dot products on VNNI panels with AMX off, where the CPU has them). float32 at head dims up to 32 (the cases of
    7-32) runs the kernel's own AVX-512 GEMMs, MKL's above (80) and with AVX-512 off."""
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
    if dtype == torch.bfloat16 and grid[0] * grid[1] > 512:  # chunks of 128 keys on any VNNI path
        monkeypatch.setenv("SAM_FAST_CPU_ATTENTION_CHUNK", "128")
        out.fill_(float("nan"))
        torch.ops.sam_fast.sam_block_attention(lowp, heads, window, *tables, None, pad_k.to(dtype).contiguous(),
                                               pad_v.to(dtype).contiguous(), scale, out)
        check_against_reference("out (chunks of 128 keys)", out, exact, same, dtype, FWD_FACTOR)
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


def test_forced_chunk_length_must_be_a_multiple_of_64(monkeypatch):
    """SAM_FAST_CPU_ATTENTION_CHUNK (the bf16 row chunks' length) that is not a positive multiple of 64 keys is
    refused by name where bf16 runs on VNNI panels; elsewhere (no AVX512-BF16, no AMX, or both switched off) rows
    are whole and it is not read."""
    from sam_fast import cpu_features

    qkv = torch.randn(1, 24, 25, 3 * 2 * 16).to(torch.bfloat16)
    tables = (torch.randn(47, 16), torch.randn(49, 16))
    out = torch.empty(1, 24, 25, 32, dtype=torch.bfloat16)
    pads = (torch.zeros(2, 16, dtype=torch.bfloat16), torch.zeros(2, 16, dtype=torch.bfloat16))
    flags = set(cpu_features.describe().split())  # the hardware; and what is switched on (the environment's)
    vnni = ("amx-bf16" in flags and cpu_features.amx()) or ("avx512-bf16" in flags and cpu_features.avx512())
    for bad in ("100", "0", "-64", "64k"):
        monkeypatch.setenv("SAM_FAST_CPU_ATTENTION_CHUNK", bad)
        if vnni:
            with pytest.raises(RuntimeError, match="SAM_FAST_CPU_ATTENTION_CHUNK must be a positive multiple of 64"):
                torch.ops.sam_fast.sam_block_attention(qkv, 2, 0, *tables, None, *pads, 0.25, out)
        else:  # plain bf16 GEMMs: whole rows, the variable unread
            out.fill_(float("nan"))
            torch.ops.sam_fast.sam_block_attention(qkv, 2, 0, *tables, None, *pads, 0.25, out)
            assert torch.isfinite(out).all()


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


@pytest.mark.parametrize("B,grid,heads,D,window", _CASES)
def test_reference_and_backends_match_segment_anything(B, grid, heads, D, window):
    """The shipped reference (plain PyTorch, the path of tiny blocks) against segment_anything's own helpers, to
    float64 rounding; the public function's ``cpu`` and ``reference`` backends agree by the tolerance rule, with the
    qkv bias given apart or already in qkv, and are recorded."""
    from sam_fast.ops.sam_block_attention import sam_block_attention
    from sam_fast.reference.sam_block_attention import sam_block_attention as reference

    qkv, rel_h, rel_w, bias = _inputs(B, grid, heads, D, window, seed=B * 7 + D)
    C = heads * D
    pad_k, pad_v = bias[C:2 * C].view(heads, D), bias[2 * C:].view(heads, D)
    scale = D ** -0.5
    exact = _block_reference(qkv + bias, heads, window, rel_h, rel_w, pad_k, pad_v, scale)
    ref = reference(qkv, heads, window, rel_h, rel_w, bias, pad_k, pad_v, scale)
    torch.testing.assert_close(ref, exact, rtol=1e-10, atol=1e-10)
    x32, b32, th, tw = qkv.float(), bias.float(), rel_h.float(), rel_w.float()
    pad = (pad_k.float(), pad_v.float())
    with sam_fast.record_backends() as rec:
        got = sam_block_attention(x32, heads, window, th, tw, pad, scale, qkv_bias=b32, backend="cpu")
        same = sam_block_attention(x32 + b32, heads, window, th, tw, pad, scale, backend="reference")
    assert rec.calls == [("sam_block_attention", "cpu"), ("sam_block_attention", "reference")]
    check_against_reference("out", got, exact, same, torch.float32, FWD_FACTOR)


def test_public_function_refuses_bad_arguments_by_name():
    from sam_fast.ops.sam_block_attention import sam_block_attention

    qkv = torch.randn(1, 6, 6, 3 * 16)
    rh, rw = torch.randn(5, 8), torch.randn(5, 8)
    cases = [
        (dict(qkv=[1]), TypeError, "qkv must be a torch.Tensor"),
        (dict(qkv=qkv[0]), ValueError, "qkv must be a floating-point \\(B, Hg, Wg"),
        (dict(heads=True), TypeError, "heads must be an int"),
        (dict(heads=0), ValueError, "heads must be an int >= 1"),
        (dict(heads=5), ValueError, "3 \\* heads \\* D"),
        (dict(window=-2), ValueError, "window must be an int >= 0"),
        (dict(rh=None), ValueError, "both be given or both be None"),
        (dict(rh=torch.randn(7, 8)), ValueError, "rel_pos_h must be \\(2 \\* 3 - 1, D\\)"),
        (dict(pad_kv=(torch.zeros(2, 8),)), TypeError, "pad_kv must be None or a \\(pad_k, pad_v\\) pair"),
        (dict(pad_kv=(torch.zeros(2, 8), torch.zeros(3))), ValueError, "pad_v must be a \\(heads, D\\)"),
        (dict(qkv_bias=torch.zeros(16)), ValueError, "qkv_bias must be None or a \\(48,\\)"),
        (dict(scale="0.5"), TypeError, "scale must be a number"),
        (dict(backend="fast"), ValueError, "backend must be one of"),
    ]
    for change, error, match in cases:
        args = dict(qkv=qkv, heads=2, window=3, rh=rh, rw=rw, pad_kv=None, scale=0.5, qkv_bias=None, backend="auto")
        args.update(change)
        with pytest.raises(error, match=match):
            sam_block_attention(args["qkv"], args["heads"], args["window"], args["rh"], args["rw"], args["pad_kv"],
                                args["scale"], args["qkv_bias"], backend=args["backend"])
    with pytest.raises(sam_fast.BackendUnavailableError, match="autograd is recording"):
        sam_block_attention(qkv.requires_grad_(), 2, 3, rh, rw, None, 0.5, backend="cpu")


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
def test_sam_fast_block_runs_the_block_kernel_at_inference(window, grid, dtype, monkeypatch, cpu_rules):
    """SamFastBlock on the CPU at inference: the attention through sam_block_attention (float32: the qkv bias added in
    the kernel), the projection and MLP through fused_linear (float32), within the tolerance rule of
    segment_anything's block; its input is left untouched. With autograd recording or backend="reference" the block
    kernel does not run, and the result is the same."""
    import sam_fast.ops.dilated_attention_cpu as cpu
    from sam_fast.nn.attention import SamFastBlock

    cpu_rules(sam_block_min_keys=16)  # the 4 x 4 windows here
    cpu_rules(epilogue_min_bytes=0)
    calls = []
    real = torch.ops.sam_fast.sam_block_attention
    monkeypatch.setattr(torch.ops.sam_fast, "sam_block_attention", lambda *a: calls.append("sam_block_attention")
                        or real(*a), raising=False)
    blk = _sam_block(32, 2, window, grid)
    x = torch.randn(2, *grid, 32)
    with torch.no_grad():
        exact = copy.deepcopy(blk).double()(x.double())
        same = copy.deepcopy(blk).to(dtype)(x.to(dtype))
        xd = x.to(dtype)
        keep = xd.clone()
        with sam_fast.record_backends() as rec:
            out = SamFastBlock(copy.deepcopy(blk).to(dtype))(xd)
    assert torch.equal(xd, keep)
    check_against_reference("block", out, exact, same, dtype, FWD_FACTOR)
    # the kernel needs AVX-512, and a bf16 model a CPU that multiplies bf16 in hardware (elsewhere the batched path
    # computes bf16 in float32)
    assert ("sam_block_attention" in calls) == (cpu.fused_bias_kernel() and cpu.compute_dtype(dtype) == dtype)
    # the projection (with its residual) and both MLP linears (GELU; the residual): float32, and bf16 on oneDNN's
    # bf16 GEMM where the CPU multiplies bf16 in hardware
    import sam_fast.ops.linear_epilogue as le

    fused = dtype == torch.float32 or (cpu.compute_dtype(dtype) == dtype and le._onednn_linear_present())
    assert len([op for op, _ in rec.calls if op == "fused_linear"]) == (3 if fused else 0)
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
