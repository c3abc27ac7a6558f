"""W8A8 kernels and ops vs the shipped reference (Triton under the interpreter on CPU).

Integer results (quantized activations, the int32 accumulator) must be equal; dequantized outputs
equal to rounding level; accuracy against float is stated as SQNR in dB.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from devices import gpu, smoke

import sam_fast
from sam_fast import (
    _C,  # noqa: F401  (registers the sam_fast:: C++ ops the tests call directly)
    cpu_features,
)
from sam_fast.kernels import int8_linear as K
from sam_fast.metrics import sqnr_db
from sam_fast.ops import int8_linear as ops
from sam_fast.reference import int8_linear as R
from sam_fast.testing import INT8_LINEAR_MIN_SQNR_DB, check_rounding_level

# (M, K, N): SAM ViT-B / ViT-H linears with few tokens, M = 1, M off every block size, K and N not
# multiples of 16 (handled by masking: no error, no padding copy).
GEMM_SHAPES = [
    (20, 768, 2304), (17, 768, 768), (9, 768, 3072), (5, 3072, 768),  # ViT-B qkv, proj, lin1, lin2
    (3, 1280, 3840), (2, 5120, 1280),  # ViT-H qkv, lin2
    (1, 64, 64), (130, 96, 200), (37, 40, 50), (64, 13, 17),
]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _activations(m, k, seed, dtype=torch.float32, outliers=4, mult=6.0):
    x = torch.randn(m, k, generator=_gen(seed))
    cols = torch.randperm(k, generator=_gen(seed + 1))[: min(outliers, k)]
    x[:, cols] *= mult
    return x.to(dtype)


def _weights(n, k, seed):
    w = torch.randn(n, k, generator=_gen(seed)) / k**0.5
    b = torch.randn(n, generator=_gen(seed + 1)) * 0.1
    return w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k", [(1, 64), (37, 13), (130, 768), (5, 5120)])
def test_quantize_per_token_exact(m, k, dtype):
    x = _activations(m, k, seed=m + k, dtype=dtype)
    x[0] = 0  # an all-zero row: scale 1, zeros
    q, s = sam_fast.quantize_per_token(x, backend="triton")
    qr, sr = R.quantize_per_token(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (m,)
    assert torch.equal(q, qr) and torch.equal(s, sr)
    assert s[0] == 1 and not q[0].any()
    # the quantization error is at most half a step per element
    assert bool(((q.float() * s[:, None] - x.float()).abs() <= s[:, None] * 0.5 + 1e-6).all())


def test_quantize_batched_and_strided():
    x = torch.randn(2, 3, 5, 48, generator=_gen(3))
    q, s = sam_fast.quantize_per_token(x, backend="triton")
    assert q.shape == x.shape and s.shape == (2, 3, 5)
    qr, sr = R.quantize_per_token(x)
    assert torch.equal(q, qr) and torch.equal(s, sr)
    wide = torch.randn(7, 96, generator=_gen(4))[:, :48]  # row stride 96, last dim contiguous
    assert torch.equal(sam_fast.quantize_per_token(wide, backend="triton")[0], R.quantize_per_token(wide)[0])


def test_static_quantize_exact():
    x = _activations(33, 80, seed=5)
    scale = torch.tensor(0.03)  # small on purpose: outliers clamp at +-127
    q = K.quantize_rows(x, scale)[0]
    qr = R.quantize_static(x, scale)
    assert torch.equal(q, qr)
    assert int(q.max()) == 127 and int(q.min()) == -127


def test_non_finite_rows_come_out_nan_on_both_backends():
    """A NaN or +-inf anywhere in a row makes that row's output NaN, as a float linear's would be, on both
    backends (Triton's max reduction alone drops NaN, which left such rows finite); the other rows are
    untouched. int8 holds no NaN: a NaN quantizes to 0 and +-inf saturates, with a static scale too."""
    x = _activations(6, 48, seed=21)
    x[1, 5] = float("nan")
    x[3, 0] = float("inf")
    x[4, 47] = -float("inf")
    w, b = _weights(24, 48, seed=22)
    wq, ws = R.quantize_weight(w)
    clean = [0, 2, 5]
    for backend in ("triton", "cpu", "reference"):
        q, s = sam_fast.quantize_per_token(x, backend=backend)
        assert torch.isnan(s[[1, 3, 4]]).all() and torch.isfinite(s[clean]).all()
        assert not q[[1, 3, 4]].any()
        out = sam_fast.int8_linear(x, wq, ws, b, activation="gelu", backend=backend)
        assert torch.isnan(out[[1, 3, 4]]).all()
        ok = sam_fast.int8_linear(x[clean], wq, ws, b, activation="gelu", backend=backend)
        assert torch.equal(out[clean], ok)
        ql, sl = sam_fast.layer_norm_quantize(x, None, None, 1e-6, backend=backend)
        assert torch.isnan(sl[[1, 3, 4]]).all() and torch.isfinite(sl[clean]).all()
    scale = torch.tensor(0.05)
    q = K.quantize_rows(x, scale)[0]
    assert torch.equal(q, R.quantize_static(x, scale))
    assert q[1, 5] == 0 and q[3, 0] == 127 and q[4, 47] == -127
    # the re-quantizing epilogue: a NaN output (the NaN row) quantizes to 0 on both backends
    a, sa = R.quantize_per_token(x)
    got = K.int8_gemm(a, sa, wq, ws, b, out_dtype=torch.int8, out_scale=scale)
    assert torch.equal(got, R.int8_gemm(a, sa, wq, ws, b, out_dtype=torch.int8, out_scale=scale))
    assert not got[[1, 3, 4]].any()
    assert torch.equal(torch.ops.sam_fast.quantize_static(x, scale)[0], R.quantize_static(x, scale))


# The CPU backend's C++ ops (csrc/cpu/int8_linear.cpp) against the reference, across their blocks of rows.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k", [(1, 1), (37, 13), (300, 768), (3, 5120)])
def test_cpu_quantize_equals_the_reference(m, k, dtype):
    """Per-token and static quantisation: integers and scales bit for bit, an all-zero row, strided rows."""
    x = _activations(m, k, seed=m * k, dtype=dtype)
    x[0] = 0
    q, s = sam_fast.quantize_per_token(x, backend="cpu")
    qr, sr = R.quantize_per_token(x)
    assert torch.equal(q, qr) and torch.equal(s, sr)
    wide = _activations(m, 2 * k, seed=k, dtype=dtype)[:, :k]
    assert torch.equal(sam_fast.quantize_per_token(wide, backend="cpu")[0], R.quantize_per_token(wide)[0])
    scale = torch.tensor(0.03)
    assert torch.equal(torch.ops.sam_fast.quantize_static(x, scale)[0], R.quantize_static(x, scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,affine", [(19, 64, True), (200, 768, True), (8, 40, False), (2, 5120, True)])
def test_cpu_layer_norm_quantize_equals_the_reference(m, k, affine, dtype):
    """LayerNorm -> int8 in one pass runs ATen's own LayerNorm on blocks of rows: the same integers and scales
    as the reference's whole-tensor LayerNorm then quantisation."""
    x = (torch.randn(m, k, generator=_gen(k)) * 3 + 1).to(dtype)
    w = torch.randn(k, generator=_gen(k + 1)).to(dtype) if affine else None
    b = torch.randn(k, generator=_gen(k + 2)).to(dtype) if affine else None
    q, s = sam_fast.layer_norm_quantize(x, w, b, 1e-6, backend="cpu")
    qr, sr = R.layer_norm_quantize(x, w, b, 1e-6)
    assert torch.equal(q, qr) and torch.equal(s, sr)


@pytest.fixture
def amx_int8():
    """``amx_int8(False)`` switches the fused int8 GEMM off for the rest of the test - AMX and AVX-512, so neither
    AMX int8 nor AVX512-VNNI runs and torch._int_mm does (``True``: as the CPU has them)."""
    with contextlib.ExitStack() as stack:
        yield lambda on: stack.enter_context(cpu_features.disable(amx=not on, avx512=not on))


@pytest.mark.parametrize("amx", [True, False])
@pytest.mark.parametrize("m,k,n", [(300, 768, 2304), (5, 96, 3072), (1, 64, 1), (90, 40, 50)])
@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
def test_cpu_epilogue_matches_the_reference(m, k, n, activation, out_dtype, amx, amx_int8):
    """Dequantise + bias (+ GELU) and the cast or re-quantisation, dynamic and static input scales, with and
    without bias, fused per tile into the AMX GEMM (where this CPU has it) or after torch._int_mm: without GELU
    bit for bit; with it to rounding level (ATen's GELU splits rows into vector and scalar parts at other places
    than the reference's whole-tensor call), as integers within one step."""
    amx_int8(amx)
    x = _activations(m, k, seed=k + n)
    w, b = _weights(n, k, seed=n + 1)
    wq, ws = sam_fast.quantize.quantize_weight(w)
    out_scale = torch.tensor(0.02) if out_dtype == torch.int8 else None
    for act_scale, bias in ((None, b), (torch.tensor(0.05), None), (None, b.to(torch.bfloat16))):
        kw = dict(act_scale=act_scale, activation=activation, out_dtype=out_dtype, out_scale=out_scale)
        y = sam_fast.int8_linear(x, wq, ws, bias, backend="cpu", **kw)
        yr = sam_fast.int8_linear(x, wq, ws, bias, backend="reference", **kw)
        assert y.dtype == yr.dtype == out_dtype and y.shape == (m, n)
        if activation is None:
            assert torch.equal(y, yr)
        elif out_dtype == torch.int8:
            assert int((y.int() - yr.int()).abs().max()) <= 1
        else:
            check_rounding_level("int8_linear", y, yr)


def test_cpu_accumulator_memory_is_never_shared_with_a_result(monkeypatch, cpu_rules):
    """A bf16 / int8 result's int32 accumulator lives in a per-thread buffer kept between calls (grown when a
    larger one comes); a float32 result is written over its own fresh accumulator. Earlier results stay intact
    whatever shapes follow, the buffer is really reused, and over its size limit the path still matches."""
    from sam_fast.ops import int8_linear as ops

    def case(m, k, n, out_dtype, seed):
        x = _activations(m, k, seed=seed)
        w, b = _weights(n, k, seed=seed + 1)
        wq, ws = sam_fast.quantize.quantize_weight(w)
        out_scale = torch.tensor(0.02) if out_dtype == torch.int8 else None
        kw = dict(out_dtype=out_dtype, out_scale=out_scale)
        return (sam_fast.int8_linear(x, wq, ws, b, backend="cpu", **kw),
                sam_fast.int8_linear(x, wq, ws, b, backend="reference", **kw))

    results = [case(*c, seed=i) for i, c in enumerate([(33, 64, 40, torch.bfloat16), (70, 96, 130, torch.int8),
                                                         (50, 64, 90, torch.float32), (20, 32, 24, torch.bfloat16)])]
    buf = ops._workspace.acc
    assert buf.numel() >= 70 * 130
    results.append(case(10, 48, 20, torch.int8, seed=9))
    assert ops._workspace.acc is buf  # smaller: the same buffer
    cpu_rules(int8_workspace_bytes=16)
    results.append(case(40, 64, 72, torch.bfloat16, seed=10))
    for y, yr in results:
        assert torch.equal(y, yr)
    acc = torch.zeros(8, 6, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.sam_fast.int8_epilogue_(acc.t(), torch.ones(6), torch.ones(8), None, False)


@pytest.mark.parametrize("amx", [True, False])
@pytest.mark.parametrize("m,k,n", [(300, 96, 200), (1, 64, 64), (129, 40, 70), (5, 30, 8)])
def test_cpu_float32_result_with_and_without_the_amx_gemm(m, k, n, amx, monkeypatch, amx_int8):
    """float32 results: with AMX int8 or AVX512-VNNI (where the CPU has it and K is a multiple of 4) the GEMM and its
    epilogue run tile by tile (sam_fast::int8_linear_amx: 128-row tiles with a partial last one, 64-channel panels
    with a partial last one); otherwise torch._int_mm and the in-place epilogue. Both equal the reference: bit for bit
    without GELU, to rounding level with it; per-row and static input scales, with and without bias."""
    from sam_fast.ops import int8_linear as ops

    amx_int8(amx)
    x = _activations(m, k, seed=m + k)
    w, b = _weights(n, k, seed=n)
    wq, ws = sam_fast.quantize.quantize_weight(w)
    calls = []
    real = torch.ops.sam_fast.int8_linear_amx
    monkeypatch.setattr(ops.torch.ops.sam_fast, "int8_linear_amx", lambda *a: calls.append(1) or real(*a),
                        raising=False)
    for act_scale, bias, activation in ((None, b, None), (torch.tensor(0.05), None, "gelu"), (None, None, "gelu")):
        kw = dict(act_scale=act_scale, activation=activation)
        y = sam_fast.int8_linear(x, wq, ws, bias, backend="cpu", **kw)
        yr = sam_fast.int8_linear(x, wq, ws, bias, backend="reference", **kw)
        assert y.dtype == torch.float32 and y.shape == (m, n)
        if activation is None:
            assert torch.equal(y, yr)
        else:
            check_rounding_level("int8_linear", y, yr)
    can = torch.ops.sam_fast.int8_pack_amx(wq).numel() > 0  # (AMX int8 or AVX512-VNNI here, and k % 4 == 0)
    assert bool(calls) == (amx and can)
    if can:
        assert k % 4 == 0


@pytest.mark.parametrize("no_amx", [False, True], ids=["amx", "vnni"])
@pytest.mark.parametrize("m,k,n", [(300, 96, 200), (129, 40, 3072), (5, 64, 8)])
def test_cpu_gemm_gelu_quantize_equals_the_two_steps(m, k, n, no_amx):
    """sam_fast::int8_linear_amx_quantize (an int8 MLP's hidden activation straight from lin1's GEMM, GELU and
    per-row quantisation in the thread's (128, N) buffer) against quantize_per_token of the float32 result: the same
    scales (to rounding level) and int8 values within one step (ATen's GELU on a block of rows vs on the whole
    tensor); a row holding NaN gets a NaN scale; int8_gelu_quantize is None where the op does not run. On AMX's
    tiles and, with AMX switched off, on AVX512-VNNI's (where the CPU has them)."""
    from sam_fast import cpu_features

    with cpu_features.disable(amx=no_amx):
        _check_gelu_quantize(m, k, n)


def _check_gelu_quantize(m, k, n):
    from sam_fast import cpu_features
    from sam_fast.ops import int8_linear as ops

    x = _activations(m, k, seed=m + n)
    x[min(3, m - 1), 0] = float("nan")
    w, b = _weights(n, k, seed=n)
    wq, ws = sam_fast.quantize.quantize_weight(w)
    xq, xs = sam_fast.quantize_per_token(x)
    fused = ops.int8_gelu_quantize(xq, xs, wq, ws, b, "auto")
    if ops._amx_weight(wq) is None:  # no AMX int8 / AVX512-VNNI here (or K % 4): the caller takes the two steps
        assert fused is None
        return
    q, s = fused
    hq, hs = sam_fast.quantize_per_token(sam_fast.int8_linear(xq, wq, ws, b, act_scale=xs, activation="gelu",
                                                               out_dtype=torch.float32, backend="cpu"))
    assert q.dtype == torch.int8 and q.shape == (m, n) and s.shape == (m,)
    assert torch.equal(torch.isnan(s), torch.isnan(hs)) and torch.isnan(s[min(3, m - 1)])
    ok = ~torch.isnan(hs)
    check_rounding_level("scale", s[ok], hs[ok])
    assert int((q[ok].int() - hq[ok].int()).abs().max()) <= 1
    # (..., K) input keeps its leading dims; other backends, float input or the panel GEMM switched off: None
    q3, s3 = ops.int8_gelu_quantize(xq.view(1, m, k), xs.view(1, m), wq, ws, b, "cpu")
    assert q3.shape == (1, m, n) and torch.equal(q3[0], q) and torch.equal(s3[0].nan_to_num(), s.nan_to_num())
    assert ops.int8_gelu_quantize(xq, xs, wq, ws, b, "reference") is None
    assert ops.int8_gelu_quantize(x, xs, wq, ws, b, "auto") is None
    with cpu_features.disable(amx=True, avx512=True):
        assert ops.int8_gelu_quantize(xq, xs, wq, ws, b, "auto") is None


def test_cpu_int8_mlp_writes_its_hidden_activation_in_int8(monkeypatch):
    """A dynamic int8 MLP block on the CPU (LayerNorm -> lin1 -> GELU -> lin2) takes lin1's GEMM, GELU and
    quantisation in one op where the panel GEMM runs, and gives what the two steps give."""
    from sam_fast.nn import quantized
    from sam_fast.ops import int8_linear as ops

    g = torch.Generator().manual_seed(0)
    norm = torch.nn.LayerNorm(64)
    lin1, lin2 = torch.nn.Linear(64, 192), torch.nn.Linear(192, 64)
    q1, q2 = (sam_fast.nn.Int8Linear.from_float(lin) for lin in (lin1, lin2))
    x = torch.randn(2, 70, 64, generator=g)
    with torch.no_grad():
        y = quantized.int8_norm_mlp(norm, q1, torch.nn.GELU(), q2, x)
        fused = ops.int8_gelu_quantize(*quantized.layer_norm_quantize(x, norm.weight, norm.bias, norm.eps), q1.weight,
                                       q1.weight_scale, q1.bias, "auto")
        monkeypatch.setattr(quantized, "int8_gelu_quantize", lambda *a: None)
        two = quantized.int8_norm_mlp(norm, q1, torch.nn.GELU(), q2, x)
    assert y.shape == two.shape == x.shape
    if fused is not None:  # the fused op ran in the first call
        torch.testing.assert_close(y, two, rtol=0, atol=float(two.abs().max()) * 2e-2)
    else:
        assert torch.equal(y, two)


def test_cpu_amx_weight_panels_follow_the_weight(monkeypatch):
    """The AMX panels are packed once per weight tensor, repacked after an in-place change and dropped with the
    weight; the ops refuse bad arguments by name. (On a CPU without AMX int8: no panels, the _int_mm path, and the
    GEMM op refuses to run.)"""
    from sam_fast.ops import int8_linear as ops

    w, b = _weights(70, 64, seed=3)
    wq, ws = sam_fast.quantize.quantize_weight(w)
    x = _activations(20, 64, seed=4)
    if torch.ops.sam_fast.int8_pack_amx(wq).numel() == 0:
        # a CPU without AMX int8: no panels, and the torch._int_mm path gives the reference's result
        assert ops._amx_weight(wq) is None
        assert torch.equal(sam_fast.int8_linear(x, wq, ws, b, backend="cpu"),
                           sam_fast.int8_linear(x, wq, ws, b, backend="reference"))
        with pytest.raises(RuntimeError, match="no AMX int8"):
            torch.ops.sam_fast.int8_linear_amx(torch.zeros(3, 64, dtype=torch.int8), torch.ones(3),
                                               torch.zeros(2 * 64 * 64, dtype=torch.int8), 70, ws, None, False,
                                               torch.float32, None)
        return
    first = ops._amx_weight(wq)
    assert ops._amx_weight(wq) is first  # cached
    y0 = sam_fast.int8_linear(x, wq, ws, b, backend="cpu")
    wq.neg_()  # in place: the panels must follow
    assert ops._amx_weight(wq) is not first
    y1 = sam_fast.int8_linear(x, wq, ws, b, backend="cpu")
    assert torch.equal(y1, sam_fast.int8_linear(x, wq, ws, b, backend="reference"))
    assert not torch.equal(y0, y1)
    packed = ops._amx_weight(wq)
    xq = torch.zeros(3, 64, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="w_packed must be"):
        torch.ops.sam_fast.int8_linear_amx(xq, torch.ones(3), packed[:-1], 70, ws, None, False, torch.float32, None)
    with pytest.raises(RuntimeError, match="x must be a 2-D int8"):
        torch.ops.sam_fast.int8_linear_amx(xq.float(), torch.ones(3), packed, 70, ws, None, False, torch.float32, None)
    with pytest.raises(RuntimeError, match="w_scale must hold"):
        torch.ops.sam_fast.int8_linear_amx(xq, torch.ones(3), packed, 70, ws[:-1], None, False, torch.float32, None)
    with pytest.raises(RuntimeError, match="x_scale must hold"):
        torch.ops.sam_fast.int8_linear_amx(xq, torch.ones(4), packed, 70, ws, None, False, torch.float32, None)
    with pytest.raises(RuntimeError, match="needs out_scale"):
        torch.ops.sam_fast.int8_linear_amx(xq, torch.ones(3), packed, 70, ws, None, False, torch.int8, None)
    with pytest.raises(RuntimeError, match="out_dtype must be"):
        torch.ops.sam_fast.int8_linear_amx(xq, torch.ones(3), packed, 70, ws, None, False, torch.int32, None)
    with pytest.raises(RuntimeError, match="w must be a 2-D int8"):
        torch.ops.sam_fast.int8_pack_amx(w)
    key = id(wq)
    assert key in ops._AMX_PANELS
    del wq, packed
    assert key not in ops._AMX_PANELS  # the panels went with their weight


def test_round_half_even_like_torch():
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 0.49999997, 3.0, -126.5, 127.49, 0.0]])
    q = K.quantize_rows(x, torch.tensor(1.0))[0]
    assert q.tolist() == [[0, 2, 2, 0, -2, -2, 126, 0, 3, -126, 127, 0]]
    assert torch.equal(q, R.quantize_static(x, torch.tensor(1.0)))
    long = x.repeat(1, 4)  # the C++ op's 16-wide loop and its masked tail
    assert torch.equal(torch.ops.sam_fast.quantize_static(long, torch.tensor(1.0))[0], q.repeat(1, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,affine", [(19, 64, True), (3, 1280, True), (8, 40, False)])
def test_layer_norm_quantize(m, k, affine, dtype):
    x = (torch.randn(m, k, generator=_gen(k)) * 3 + 1).to(dtype)
    w = torch.randn(k, generator=_gen(k + 1)).to(dtype) if affine else None
    b = torch.randn(k, generator=_gen(k + 2)).to(dtype) if affine else None
    q, s = sam_fast.layer_norm_quantize(x, w, b, 1e-6, backend="triton")
    qr, sr = R.layer_norm_quantize(x, w, b, 1e-6)
    # fp32 statistics computed in another order: a value within rounding of a .5 boundary may differ by one
    assert int((q.int() - qr.int()).abs().max()) <= 1
    assert float((q != qr).float().mean()) < 0.01
    torch.testing.assert_close(s, sr, rtol=1e-5, atol=0)
    y = F.layer_norm(x.float(), (k,), None if w is None else w.float(), None if b is None else b.float(), 1e-6)
    assert bool(((q.float() * s[:, None] - y).abs() <= s[:, None] * 0.5 + 2e-5 * y.abs().amax()).all())


@pytest.mark.parametrize("m,k,n", GEMM_SHAPES)
def test_int32_accumulator_exact(m, k, n):
    a = torch.randint(-127, 128, (m, k), generator=_gen(m), dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), generator=_gen(n), dtype=torch.int8)
    acc = K.int8_gemm(a, torch.ones(m), w, torch.ones(n), out_dtype=torch.int32)
    exact = a.to(torch.int64) @ w.to(torch.int64).t()
    assert torch.equal(acc.to(torch.int64), exact)
    assert torch.equal(R.int8_mm(a, w).to(torch.int64), exact)


@pytest.mark.parametrize("k", list(range(1, 20)) + [31, 33, 64])
def test_every_in_features_is_exact(k):
    """The accumulator for in_features 1 .. 19 and around block sizes, several M and N, on every backend: on
    the CPU torch._int_mm returns memory it never wrote for K = 1 and N >= 2 (a different wrong answer
    each run), so that shape must not reach it."""
    for m, n in ((1, 1), (1, 2), (5, 3), (17, 33)):
        a = torch.randint(-127, 128, (m, k), generator=_gen(m + 100 * k), dtype=torch.int8)
        w = torch.randint(-127, 128, (n, k), generator=_gen(n + 100 * k), dtype=torch.int8)
        exact = a.to(torch.int64) @ w.to(torch.int64).t()
        for _ in range(2):  # garbage differs between calls
            assert torch.equal(R.int8_mm(a, w).to(torch.int64), exact), (m, k, n)
        x = _activations(m, k, seed=k)
        wf, b = _weights(n, k, seed=n)
        wq, ws = sam_fast.quantize.quantize_weight(wf)
        ys = [sam_fast.int8_linear(x, wq, ws, b, backend=be) for be in ("reference", "cpu", "triton")]
        assert torch.equal(ys[0], ys[1]), (m, k, n)
        check_rounding_level("int8_linear", ys[2], ys[0])
        xq, xs = R.quantize_per_token(x)
        manual = (xq.double() @ wq.double().t()) * xs.double()[:, None] * ws.double() + b.double()
        torch.testing.assert_close(ys[0].double(), manual, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,k,n", GEMM_SHAPES[::2] + [GEMM_SHAPES[-1]])
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_int8_linear_vs_reference(m, k, n, activation):
    x = _activations(m, k, seed=k)
    w, b = _weights(n, k, seed=n)
    wq, ws = sam_fast.quantize.quantize_weight(w)
    y = sam_fast.int8_linear(x, wq, ws, b, activation=activation, backend="triton")
    yr = sam_fast.int8_linear(x, wq, ws, b, activation=activation, backend="reference")
    check_rounding_level("int8_linear", y, yr)
    assert torch.equal(sam_fast.int8_linear(x, wq, ws, b, activation=activation, backend="cpu"), yr)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_int8_linear_low_precision_out(out_dtype):
    x = _activations(45, 96, seed=8, dtype=out_dtype)
    w, b = _weights(72, 96, seed=9)
    wq, ws = sam_fast.quantize.quantize_weight(w)
    y = sam_fast.int8_linear(x, wq, ws, b.to(out_dtype), activation="gelu", backend="triton")
    assert y.dtype == out_dtype
    check_rounding_level("int8_linear", y, sam_fast.int8_linear(x, wq, ws, b.to(out_dtype), activation="gelu",
                                                                backend="reference"))


def test_requantizing_epilogue():
    """GELU output re-quantized in the epilogue with a static scale, then consumed by the next GEMM."""
    x = _activations(50, 64, seed=10)
    w1, b1 = _weights(256, 64, seed=11)
    w2, b2 = _weights(64, 256, seed=12)
    q1, s1 = sam_fast.quantize.quantize_weight(w1)
    q2, s2 = sam_fast.quantize.quantize_weight(w2)
    hidden = F.gelu(F.linear(x, w1, b1))
    out_scale = hidden.abs().max() / 127
    h8 = sam_fast.int8_linear(x, q1, s1, b1, activation="gelu", out_dtype=torch.int8, out_scale=out_scale,
                              backend="triton")
    h8r = sam_fast.int8_linear(x, q1, s1, b1, activation="gelu", out_dtype=torch.int8, out_scale=out_scale,
                               backend="reference")
    assert h8.dtype == torch.int8
    assert int((h8.int() - h8r.int()).abs().max()) <= 1 and float((h8 != h8r).float().mean()) < 0.01
    y = sam_fast.int8_linear(h8, q2, s2, b2, act_scale=out_scale, backend="triton")
    check_rounding_level("int8_linear(int8 x)", y,
                         sam_fast.int8_linear(h8, q2, s2, b2, act_scale=out_scale, backend="reference"))
    assert sqnr_db(F.linear(hidden, w2, b2), y) > 25


def test_static_and_pre_quantized_inputs():
    x = _activations(31, 64, seed=13)
    w, b = _weights(48, 64, seed=14)
    wq, ws = sam_fast.quantize.quantize_weight(w)
    scale = float(x.abs().max()) / 127
    y = sam_fast.int8_linear(x, wq, ws, b, act_scale=scale, backend="triton")
    check_rounding_level("static", y, sam_fast.int8_linear(x, wq, ws, b, act_scale=scale, backend="reference"))
    xq, xs = sam_fast.quantize_per_token(x, backend="triton")
    y_pre = sam_fast.int8_linear(xq, wq, ws, b, act_scale=xs, backend="triton")
    assert torch.equal(y_pre, sam_fast.int8_linear(x, wq, ws, b, backend="triton"))


def test_sqnr_with_outlier_channels():
    x = _activations(64, 768, seed=15)
    w, b = _weights(768, 768, seed=16)
    wq, ws = sam_fast.quantize.quantize_weight(w)
    y = sam_fast.int8_linear(x, wq, ws, b, backend="triton")
    assert sqnr_db(F.linear(x, w, b), y) >= INT8_LINEAR_MIN_SQNR_DB


@pytest.mark.parametrize("shape", [(2, 5, 7, 40), (3, 11, 40), (40,)])
def test_batch_flattened_inputs(shape):
    x = torch.randn(shape, generator=_gen(17))
    w, b = _weights(24, 40, seed=18)
    wq, ws = sam_fast.quantize.quantize_weight(w)
    y = sam_fast.int8_linear(x, wq, ws, b, backend="triton")
    assert y.shape == (*shape[:-1], 24)
    flat = sam_fast.int8_linear(x.reshape(-1, 40), wq, ws, b, backend="triton")
    assert torch.equal(y.reshape(-1, 24), flat)


def test_empty_batch():
    wq, ws = sam_fast.quantize.quantize_weight(torch.randn(8, 16))
    assert sam_fast.int8_linear(torch.randn(0, 16), wq, ws).shape == (0, 8)
    q, s = sam_fast.quantize_per_token(torch.randn(2, 0, 16))
    assert q.shape == (2, 0, 16) and s.shape == (2, 0)


def test_bad_inputs_name_the_argument():
    x = torch.randn(4, 32)
    w = torch.randn(16, 32)
    wq, ws = sam_fast.quantize.quantize_weight(w)
    cases = [
        (TypeError, "weight_int8", dict(weight_int8=w)),  # float weights passed as int8
        (ValueError, "weight_scale", dict(weight_scale=torch.ones(15))),  # scale shape mismatch
        (TypeError, "weight_scale", dict(weight_scale=ws.half())),
        (TypeError, "x must be", dict(x=x.long())),
        (TypeError, "x must be", dict(x=x.double())),
        (ValueError, "in_features=32", dict(x=torch.randn(4, 31))),
        (ValueError, "act_scale is required", dict(x=wq[:4])),
        (ValueError, "act_scale", dict(x=wq[:4], act_scale=torch.ones(3))),
        (ValueError, "bias", dict(bias=torch.ones(17))),
        (ValueError, "activation", dict(activation="relu")),
        (ValueError, "out_scale", dict(out_dtype=torch.int8)),
        (ValueError, "out_scale", dict(out_scale=0.1)),
        (TypeError, "out_dtype", dict(out_dtype=torch.float64)),
        (ValueError, "act_scale must be a positive", dict(act_scale=-1.0)),
        (ValueError, "act_scale must be a positive finite", dict(act_scale=float("inf"))),
        (ValueError, "act_scale must be a positive finite", dict(act_scale=float("nan"))),
        (ValueError, "backend", dict(backend="gpu")),
    ]
    for exc, text, kw in cases:
        args = dict(x=x, weight_int8=wq, weight_scale=ws, bias=None)
        args.update(kw)
        pos = [args.pop(n) for n in ("x", "weight_int8", "weight_scale", "bias")]
        with pytest.raises(exc, match=text):
            sam_fast.int8_linear(*pos, **args)
    with pytest.raises(TypeError, match="x must be"):
        sam_fast.quantize_per_token(x.long())
    with pytest.raises(ValueError, match="weight must have shape"):
        sam_fast.layer_norm_quantize(x, torch.ones(31))
    with pytest.raises(ValueError, match="eps"):
        sam_fast.layer_norm_quantize(x, eps=0)
    with pytest.raises(ValueError, match="weight holds NaN"):
        sam_fast.quantize.quantize_weight(torch.tensor([[1.0, float("nan")], [0.5, 2.0]]))


def test_backend_choice_is_recorded():
    x = torch.randn(4, 32)
    wq, ws = sam_fast.quantize.quantize_weight(torch.randn(16, 32))
    with sam_fast.record_backends() as rec:
        sam_fast.int8_linear(x, wq, ws)  # auto on CPU: the C++-free CPU backend, no fallback warning
        sam_fast.int8_linear(x, wq, ws, backend="triton")
    assert rec.calls == [("int8_linear", "cpu"), ("int8_linear", "triton")] and not rec.fallbacks


def test_opcheck_and_compile():
    x = torch.randn(21, 48)
    strided = torch.randn(21, 96)[:, :48]
    wq, ws = R.quantize_weight(torch.randn(40, 48))
    b = torch.randn(40)
    for t in (x, strided):
        torch.library.opcheck(ops._quantize_per_token_op, (t,))
        torch.library.opcheck(ops._quantize_static_op, (t, torch.tensor(0.05)))
        torch.library.opcheck(ops._layer_norm_quantize_op, (t, torch.randn(48), torch.randn(48), 1e-6))
    xq, xs = R.quantize_per_token(x)
    ws = R.quantize_weight(torch.randn(40, 48, generator=_gen(0)))[1]
    for out_dtype, out_scale in ((torch.float32, None), (torch.int8, torch.tensor(0.1)), (torch.int32, None)):
        bias, act = (None, None) if out_dtype == torch.int32 else (b, "gelu")
        torch.library.opcheck(ops._int8_gemm_op, (xq, xs, wq, ws, bias, act, out_dtype, out_scale))

    def f(x):
        return sam_fast.int8_linear(x, wq, ws, b, activation="gelu", backend="triton")

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), f(x))


def test_tuned_table_lookup(monkeypatch):
    table = K.tuned_table()  # the shipped file parses; entries (if any) are well formed
    for arch, entries in table.items():
        for e in entries:
            assert {"m", "n", "k", "config"} <= set(e) and {"BLOCK_M", "BLOCK_N", "BLOCK_K"} <= set(e["config"])
    small = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
    large = dict(small, BLOCK_M=128)
    monkeypatch.setattr(K, "tuned_table", lambda: {"cpu": [{"m": 4096, "n": 50, "k": 40, "config": small},
                                                            {"m": 131072, "n": 50, "k": 40, "config": large}]})
    cpu = torch.device("cpu")
    assert K.gemm_config(3000, 50, 40, cpu) == small
    assert K.gemm_config(100000, 50, 40, cpu) == large
    assert K.gemm_config(3000, 64, 40, cpu) == K.heuristic_config(3000, 64, 40)
    x = _activations(37, 40, seed=19)
    wq, ws = R.quantize_weight(torch.randn(50, 40))
    assert torch.equal(sam_fast.int8_linear(x, wq, ws, backend="triton"),
                       sam_fast.int8_linear(x, wq, ws, backend="cpu"))


def test_bench_int_mm_peer_matches_the_scheme():
    from sam_fast.bench.bench_int8_linear import int_mm_separate

    x = _activations(40, 64, seed=20)
    w, b = _weights(32, 64, seed=21)
    wq, ws = R.quantize_weight(w)
    y = int_mm_separate(x, wq.t(), ws, b)
    check_rounding_level("int_mm peer", y, sam_fast.int8_linear(x, wq, ws, b, backend="reference"))


# ------------------------------------------------------------------------------------------------
# CUDA at SAM's real shapes (pytest -m gpu)
# ------------------------------------------------------------------------------------------------

# ------------------------------------------------------------------------------------------------
# W8A8: SAM's real linear shapes (M = tokens of one or two images)
# ------------------------------------------------------------------------------------------------

INT8_SHAPES = [(4096, 768, 2304), (4096, 768, 768), (4096, 768, 3072), (4096, 3072, 768),
               (8192, 1280, 3840), pytest.param(4096, 1280, 5120, marks=smoke), (4096, 5120, 1280),
               (4097, 1280, 1280), (1, 768, 768), pytest.param(333, 40, 50, marks=smoke)]


@gpu
@pytest.mark.parametrize("m,k,n", INT8_SHAPES, ids=str)
def test_int8_gemm_real_shapes(m, k, n):
    from sam_fast.kernels import int8_linear as K
    from sam_fast.reference import int8_linear as R
    from sam_fast.testing import check_rounding_level

    g = torch.Generator(device="cuda").manual_seed(m + k + n)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    w = torch.randn(n, k, device="cuda", generator=g) / k**0.5
    b = torch.randn(n, device="cuda", generator=g).bfloat16()
    q, s = sam_fast.quantize_per_token(x)
    qr, sr = R.quantize_per_token(x)
    assert torch.equal(q, qr) and torch.equal(s, sr)
    wq, ws = sam_fast.quantize.quantize_weight(w)
    acc = K.int8_gemm(q, s, wq, ws, out_dtype=torch.int32)
    assert torch.equal(acc, R.int8_mm(q, wq))
    for act in (None, "gelu"):
        y = sam_fast.int8_linear(x, wq, ws, b, activation=act, out_dtype=torch.float32)
        check_rounding_level("int8_linear", y, sam_fast.int8_linear(x, wq, ws, b, activation=act,
                                                                    out_dtype=torch.float32, backend="reference"))
    h8 = sam_fast.int8_linear(x, wq, ws, b, activation="gelu", out_dtype=torch.int8, out_scale=0.02)
    h8r = sam_fast.int8_linear(x, wq, ws, b, activation="gelu", out_dtype=torch.int8, out_scale=0.02,
                               backend="reference")
    assert int((h8.int() - h8r.int()).abs().max()) <= 1 and float((h8 != h8r).float().mean()) < 1e-3


@gpu
def test_int8_non_finite_rows_are_nan_on_cuda():
    """The GPU's max reduction and min / max instructions drop NaN: rows holding NaN or +-inf must still
    come out NaN (both quantizers) and NaN must quantize to 0 with a static scale, as on the CPU."""
    from sam_fast.kernels import int8_linear as K
    from sam_fast.reference import int8_linear as R

    x = torch.randn(256, 1280, device="cuda").bfloat16()
    x[7, 100] = float("nan")
    x[9, 0] = float("inf")
    x[200, 1279] = -float("inf")
    bad, clean = [7, 9, 200], [i for i in range(256) if i not in (7, 9, 200)]
    wq, ws = sam_fast.quantize.quantize_weight(torch.randn(512, 1280, device="cuda") / 1280**0.5)
    out = sam_fast.int8_linear(x, wq, ws, activation="gelu")
    assert torch.isnan(out[bad]).all() and torch.isfinite(out[clean]).all()
    assert torch.isnan(sam_fast.layer_norm_quantize(x, None, None, 1e-6)[1][bad]).all()
    scale = torch.tensor(0.02, device="cuda")
    q = K.quantize_rows(x, scale)[0]
    assert torch.equal(q, R.quantize_static(x, scale)) and q[7, 100] == 0 and q[9, 0] == 127


@gpu
@smoke
def test_layer_norm_quantize_real_shape():
    from sam_fast.reference import int8_linear as R

    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(2, 64, 64, 1280, device="cuda", generator=g).bfloat16()
    w, b = torch.randn(1280, device="cuda", generator=g), torch.randn(1280, device="cuda", generator=g)
    q, s = sam_fast.layer_norm_quantize(x, w, b, 1e-6)
    qr, sr = R.layer_norm_quantize(x, w, b, 1e-6)
    assert int((q.int() - qr.int()).abs().max()) <= 1 and float((q != qr).float().mean()) < 1e-3
    torch.testing.assert_close(s, sr, rtol=1e-5, atol=0)
