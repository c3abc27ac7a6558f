"""Every registered C++ CPU op is safe for any input its schema accepts: random shapes (empty ones included), one-
value scales of any shape, strided and expanded views, and inputs it must refuse (a RuntimeError naming the op,
never a crash or a read past a buffer). ``python -m tools.sanitize_cpu_ops`` runs this file under AddressSanitizer
and UBSan, which turn any out-of-bounds access into a failure."""

import pytest
import torch

from sam_fast import cpu_features
from sam_fast.ops._ext import extension_error
from sam_fast.reference import int8_linear as ref

pytestmark = pytest.mark.skipif(extension_error() is not None, reason="the C++ extension is part of the install")
ops = torch.ops.sam_fast

ONE_VALUE_SHAPES = [(), (1,), (1, 1)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", ONE_VALUE_SHAPES, ids=str)
@pytest.mark.parametrize("M", [1, 5, 300])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_int8_epilogue_takes_a_one_value_scale_of_any_shape(shape, M, out_dtype):
    """A scale holding one value applies to every row (a (1,) scale with M > 1 was read as per-row: past its
    end)."""
    N = 24
    acc = torch.randint(-5000, 5000, (M, N), dtype=torch.int32, generator=_gen(0))
    a_scale = torch.full(shape, 0.02)
    w_scale = torch.rand(N, generator=_gen(1)) * 0.01 + 1e-3
    bias = torch.randn(N, generator=_gen(2))
    out_scale = torch.tensor(0.05) if out_dtype == torch.int8 else None
    got = ops.int8_epilogue(acc, a_scale, w_scale, bias, False, out_dtype, out_scale)
    y = acc.float() * torch.tensor(0.02) * w_scale + bias
    want = ref.quantize(y, out_scale) if out_dtype == torch.int8 else y.to(out_dtype)
    assert torch.equal(got, want)
    if out_dtype == torch.float32:
        inplace = acc.clone()
        ops.int8_epilogue_(inplace, a_scale, w_scale, bias, False)
        assert torch.equal(inplace.view(torch.float32), want)


@pytest.mark.parametrize("shape", ONE_VALUE_SHAPES, ids=str)
def test_int8_linear_amx_takes_a_one_value_scale_of_any_shape(shape):
    w = torch.randint(-127, 128, (80, 64), dtype=torch.int8, generator=_gen(0))
    packed = ops.int8_pack_amx(w)
    if packed.numel() == 0:  # no AMX int8 here (or switched off): the op refuses, by name
        with pytest.raises(RuntimeError, match="int8_linear_amx"):
            ops.int8_linear_amx(torch.zeros(3, 64, dtype=torch.int8), torch.ones(shape), torch.zeros(80 * 64 * 2,
                                dtype=torch.int8), 80, torch.ones(80), None, False, torch.float32, None)
        return
    x = torch.randint(-127, 128, (200, 64), dtype=torch.int8, generator=_gen(1))
    w_scale = torch.rand(80, generator=_gen(2)) * 0.01
    got = ops.int8_linear_amx(x, torch.full(shape, 0.03), packed, 80, w_scale, None, False, torch.float32, None)
    want = ref.int8_gemm(x, torch.tensor(0.03), w, w_scale)
    assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="contiguous"):  # an expanded view of the right length reads past it
        ops.int8_linear_amx(x, torch.ones(()), packed[:1].expand(packed.numel()), 80, w_scale, None, False,
                            torch.float32, None)


@pytest.mark.parametrize("shape", ONE_VALUE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_rows_static_scale_of_any_shape(shape, dtype):
    x = (torch.randn(37, 19, generator=_gen(0)) * 3).to(dtype)
    x[5, 3] = float("nan")
    q, s = ops.quantize_static(x, torch.full(shape, 0.05))
    torch.testing.assert_close(s, ref.static_row_scale(x, torch.tensor(0.05)), rtol=0, atol=0, equal_nan=True)
    assert s.shape == (37,) and torch.isnan(s[5]) and (s[torch.arange(37) != 5] == torch.tensor(0.05)).all()
    assert torch.equal(q, ref.quantize(x, torch.tensor(0.05)))
    with pytest.raises(RuntimeError, match="one value"):
        ops.quantize_static(x, torch.ones(2))


@pytest.mark.parametrize("M,K", [(0, 8), (8, 0), (1, 1), (257, 33)])
def test_quantize_ops_on_empty_and_odd_shapes(M, K):
    x = torch.randn(M, K, generator=_gen(0))
    q, s = ops.quantize_per_token(x)
    # (the public ops refuse K = 0; the kernel gives empty rows their all-zero-row scale, 1)
    wq, ws = ref.quantize_per_token(x) if K else (torch.zeros(M, 0, dtype=torch.int8), torch.ones(M))
    assert torch.equal(q, wq) and torch.equal(s, ws)
    strided = torch.randn(K, M, generator=_gen(1)).t()  # a transposed view
    q, s = ops.quantize_per_token(strided)
    assert torch.equal(q, ref.quantize_per_token(strided)[0] if K else wq)
    if K:
        lq, ls = ops.layer_norm_quantize(strided, torch.ones(K), torch.zeros(K), 1e-6)
        rq, rs = ref.layer_norm_quantize(strided, torch.ones(K), torch.zeros(K), 1e-6)
        assert (lq.int() - rq.int()).abs().max() <= 1 if M else lq.numel() == 0


def test_int8_ops_refuse_what_their_contract_rules_out():
    acc = torch.zeros(4, 8, dtype=torch.int32)
    cases = [
        (lambda: ops.int8_epilogue(acc, torch.ones(3), torch.ones(8), None, False, torch.float32, None),
         "a_scale must hold one value or M = 4"),
        (lambda: ops.int8_epilogue(acc, torch.ones(4), torch.ones(7), None, False, torch.float32, None),
         "w_scale must hold N = 8"),
        (lambda: ops.int8_epilogue(acc, torch.ones(4), torch.ones(8), torch.ones(9), False, torch.float32, None),
         "bias must hold N = 8"),
        (lambda: ops.int8_epilogue(acc, torch.ones(4), torch.ones(8), None, False, torch.int8, None),
         "needs out_scale"),
        (lambda: ops.int8_epilogue(acc, torch.ones(4), torch.ones(8), None, False, torch.int32, None),
         "out_dtype"),
        (lambda: ops.int8_epilogue_(acc.t(), torch.ones(8), torch.ones(4), None, False), "contiguous"),
        (lambda: ops.quantize_per_token(torch.zeros(2, 3, 4)), "2-D"),
        (lambda: ops.quantize_per_token(torch.zeros(2, 3, dtype=torch.int32)), "float32"),
        (lambda: ops.layer_norm_quantize(torch.zeros(2, 3), torch.ones(4), None, 1e-6),
         r"layer_norm_quantize: weight must be a \(K = 3,\)"),
    ]
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call()


def test_linear_epilogue_refuses_a_tensor_autograd_tracks():
    y = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="requires grad"):
        ops.linear_epilogue_(y, None, "none", None)
    with torch.no_grad():  # as PyTorch allows in-place updates of leaves there
        ops.linear_epilogue_(y, torch.ones(8), "none", None)
    z = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="single memory location"):  # ATen's overlap check
        ops.linear_epilogue_(z, None, "none", z)


@pytest.mark.parametrize("seed", range(6))
def test_rel_pos_attention_random_geometry(seed):
    """Random (S, H, Lq, Lk = ay * ax, D), strided q / k / v views (the last dim contiguous), expanded k / v over
    the segments: the float64 softmax attention, rounded as float32 would be."""
    g = _gen(seed)
    S, H, Lq, D = (int(torch.randint(lo, hi, (), generator=g)) for lo, hi in ((1, 3), (1, 4), (1, 70), (1, 40)))
    ay, ax = (int(torch.randint(1, 13, (), generator=g)) for _ in range(2))
    Lk = ay * ax
    base = torch.randn(S, H, Lq, D + 3, generator=g)
    q = base[..., 1:D + 1]  # strided rows
    k = torch.randn(1, H, Lk, D, generator=g).expand(S, H, Lk, D)  # segments share keys (stride 0)
    v = torch.randn(S, Lk, H, D, generator=g).transpose(1, 2)
    rh, rw = torch.randn(S, H, Lq, ay, generator=g), torch.randn(S, H, Lq, ax, generator=g)
    out, lse = torch.empty(S, Lq, H, D), torch.empty(S, H, Lq)
    for off in ({}, {"avx512": True}):
        with cpu_features.disable(**off):
            ops.rel_pos_attention(q, k, v, rh, rw, 0.3, out, lse)
        logits = 0.3 * q.double() @ k.double().transpose(-1, -2) + (rh.double()[..., :, None]
                                                                  + rw.double()[..., None, :]).flatten(-2)
        want = (torch.softmax(logits, -1) @ v.double()).transpose(1, 2)
        torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(lse.double(), torch.logsumexp(logits, -1), rtol=2e-5, atol=2e-5)


def test_rel_pos_attention_refuses_outputs_that_alias_inputs():
    q = torch.randn(1, 1, 16, 8)
    rh = rw = torch.zeros(1, 1, 16, 4)
    lse = torch.empty(1, 1, 16)
    with pytest.raises(RuntimeError, match="single memory location"):
        ops.rel_pos_attention(q, q, q, rh, rw, 1.0, q.view(1, 16, 1, 8), lse)
    buf = torch.zeros(40)
    with pytest.raises(RuntimeError, match="single memory location"):  # out (2, 16) over rel_h's memory (2, 4)
        ops.decomposed_bias(buf[:8].view(2, 4), torch.zeros(2, 4), buf.as_strided((2, 16), (16, 1), 4))


@pytest.mark.parametrize("window", [0, 3, 5])
@pytest.mark.parametrize("grid", [(1, 1), (4, 7), (9, 9)])
def test_sam_block_attention_odd_grids_and_strided_qkv(window, grid):
    """Grids smaller than the window, partial windows, and a qkv tensor that is a slice of a wider one."""
    from segment_anything.modeling.image_encoder import add_decomposed_rel_pos, window_partition, window_unpartition

    heads, D = 2, 6
    C = heads * D
    g = _gen(sum(grid) + window)
    wide = torch.randn(2, *grid, 3 * C + 5, generator=g)
    qkv = wide[..., 2:3 * C + 2]
    seg = window or max(grid)
    sh, sw = (window, window) if window else grid
    th, tw = torch.randn(2 * sh - 1, D, generator=g), torch.randn(2 * sw - 1, D, generator=g)
    from sam_fast.ops.sam_block_attention import sam_block_attention

    out = sam_block_attention(qkv, heads, window, th, tw, None, D ** -0.5, backend="cpu")
    # segment_anything's attention on the zero-padded windows, in float64
    x = qkv.double()
    if window:
        x, pad_hw = window_partition(x, window)
    Bw, h, w, _ = x.shape
    q, k, v = x.reshape(Bw, h * w, 3, heads, D).permute(2, 0, 3, 1, 4).reshape(3, Bw * heads, h * w, D)
    attn = (q * D ** -0.5) @ k.transpose(-2, -1)
    attn = add_decomposed_rel_pos(attn, q, th.double(), tw.double(), (h, w), (h, w)).softmax(-1)
    o = (attn @ v).view(Bw, heads, h, w, D).permute(0, 2, 3, 1, 4).reshape(Bw, h, w, C)
    if window:
        o = window_unpartition(o, window, pad_hw, grid)
    assert seg >= 1
    torch.testing.assert_close(out.double(), o, rtol=2e-5, atol=2e-5)
