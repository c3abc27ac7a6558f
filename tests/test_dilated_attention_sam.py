"""Fused attention kernel vs the shipped reference (CPU: Triton interpreter, tiny shapes)."""

import contextlib
import itertools

import pytest
import torch
from attn_helpers import (
    check_far_apart_batches,
    check_fused_bf16_encoder,
    check_kernel_vs_reference,
    record_launch_configs,
    run_op,
)
from devices import gpu, smoke

import sam_fast
from sam_fast import Branch
from sam_fast.pattern import resolve_pattern
from sam_fast.reference.dilated_attention import dilated_attention_reference
from sam_fast.testing import BWD_FACTOR, FWD_FACTOR, check_against_reference


def make_case(B, grid, H, D, dtype, window=None, rel=False, pad=False, seed=0, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    N = grid[0] * grid[1]
    if layout == "qkv":  # q, k, v as strided views of one (B, N, 3, H, D) tensor, as SAM's qkv gives
        qkv = torch.randn(B, N, 3, H, D, generator=g)
        q, k, v = qkv.to(dtype).unbind(2)
    elif layout == "bhnd":  # (B, H, N, D) storage seen as (B, N, H, D)
        q, k, v = (torch.randn(B, H, N, D, generator=g).to(dtype).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = (torch.randn(B, N, H, D, generator=g).to(dtype) for _ in range(3))
    kw = {"grid": grid}
    seg = grid if window is None else window
    if rel:
        kw["rel_pos_h"] = (torch.randn(2 * seg[0] - 1, D, generator=g) * 0.3).to(dtype)
        kw["rel_pos_w"] = (torch.randn(2 * seg[1] - 1, D, generator=g) * 0.3).to(dtype)
    if pad:
        kw["pad_kv"] = ((torch.randn(H, D, generator=g)).to(dtype), (torch.randn(H, D, generator=g)).to(dtype))
    pattern = None if window is None else Branch(window)
    return (q, k, v), pattern, kw


CASES = [
    # (B, grid, H, D, window, rel, pad)
    (1, (5, 7), 2, 16, None, False, False),      # dense, no bias, non-square grid, batch 1
    (2, (6, 5), 3, 14, None, True, False),       # SlimSAM-77 head dim, rel-pos
    (1, (7, 9), 2, 80, None, True, False),       # SAM-H head dim 80
    (1, (9, 10), 2, 32, (4, 4), True, False),    # windows, partial segments (no padding)
    (1, (9, 10), 2, 32, (4, 4), True, True),     # SAM window padding via pad_kv
    (1, (5, 6), 2, 64, (7, 7), True, True),      # window larger than the grid, padded (SAM at small input)
    (2, (11, 3), 1, 24, (4, 2), False, True),    # non-square window, pad without rel-pos
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-g{c[1][0]}x{c[1][1]}-H{c[2]}-D{c[3]}-w{c[4]}"
                                                     f"-rel{int(c[5])}-pad{int(c[6])}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(case, dtype):
    B, grid, H, D, window, rel, pad = case
    qkv, pattern, kw = make_case(B, grid, H, D, dtype, window, rel, pad, layout="qkv" if window else "contiguous")
    lse = check_kernel_vs_reference(qkv, pattern, kw, dtype)
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("layout", ["qkv", "bhnd"])
def test_strided_layouts_need_no_copy(layout):
    qkv, pattern, kw = make_case(1, (4, 6), 2, 16, torch.float32, None, True, layout=layout)
    assert not qkv[0].is_contiguous()
    out = sam_fast.dilated_attention(*qkv, backend="triton", **kw)
    ref = sam_fast.dilated_attention(*qkv, backend="reference", **kw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_fp16():
    qkv, pattern, kw = make_case(1, (5, 5), 2, 32, torch.float16, (3, 3), True, True)
    _, out_k, _ = run_op("triton", qkv, pattern, kw)
    _, out_r, _ = run_op("reference", qkv, pattern, kw)
    _, out_x, _ = run_op("reference", qkv, pattern, kw, cast=torch.float64)
    check_against_reference("out", out_k, out_x, out_r, torch.float16, FWD_FACTOR)


def _explicit_mask_attention(q, k, v, grid, window, scale):
    """Brute force: softmax over an explicit N x N mask built from the definition (same window)."""
    N = q.shape[1]
    ys, xs = torch.arange(N) // grid[1], torch.arange(N) % grid[1]
    if window is None:
        mask = torch.ones(N, N, dtype=torch.bool)
    else:
        same = ((ys[:, None] // window[0]) == (ys[None, :] // window[0])) & (
            (xs[:, None] // window[1]) == (xs[None, :] // window[1]))
        mask = same
    logits = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhnm,bmhd->bnhd", logits.softmax(-1), v)


@pytest.mark.parametrize("window", [None, (2, 3), (4, 4)])
def test_reference_matches_brute_force(window):
    g = torch.Generator().manual_seed(3)
    grid = (5, 7)
    q, k, v = (torch.randn(2, 35, 3, 8, generator=g, dtype=torch.float64) for _ in range(3))
    branches = resolve_pattern(None if window is None else Branch(window), 35, grid)
    out, lse = dilated_attention_reference(q, k, v, branches, grid, softmax_scale=0.3)
    torch.testing.assert_close(out, _explicit_mask_attention(q, k, v, grid, window, 0.3))
    assert torch.isfinite(lse).all()


def test_reference_gradcheck_with_bias_and_padding():
    g = torch.Generator().manual_seed(4)
    grid, H, D = (3, 4), 2, 4
    q, k, v = (torch.randn(1, 12, H, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rh = torch.randn(5, D, generator=g, dtype=torch.float64, requires_grad=True)
    rw = torch.randn(5, D, generator=g, dtype=torch.float64, requires_grad=True)
    pk = torch.randn(H, D, generator=g, dtype=torch.float64, requires_grad=True)
    pv = torch.randn(H, D, generator=g, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, rh, rw, pk, pv):
        return sam_fast.dilated_attention(q, k, v, Branch((3, 3)), grid=grid, rel_pos_h=rh, rel_pos_w=rw,
                                          pad_kv=(pk, pv), return_lse=True, backend="reference")

    assert torch.autograd.gradcheck(f, (q, k, v, rh, rw, pk, pv))


def test_sam_window_semantics_match_segment_anything_attention():
    """pad_kv reproduces SAM's pad -> partition -> Attention -> unpartition on border windows."""
    from segment_anything.modeling.image_encoder import Attention, window_partition, window_unpartition

    torch.manual_seed(5)
    dim, heads, ws, grid = 32, 2, 4, (6, 5)
    attn = Attention(dim, num_heads=heads, qkv_bias=True, use_rel_pos=True, input_size=(ws, ws)).double()
    with torch.no_grad():
        attn.rel_pos_h.normal_()
        attn.rel_pos_w.normal_()
        attn.qkv.bias.normal_()
    x = torch.randn(1, *grid, dim, dtype=torch.float64)
    xw, pad_hw = window_partition(x, ws)
    expected = window_unpartition(attn(xw), ws, pad_hw, grid)

    from sam_fast.nn.attention import sam_attention

    for backend in ("reference", "triton"):
        got = sam_attention(attn.float(), x.float(), ws, backend=backend)
        torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-5)
        attn.double()


def test_errors_name_the_argument():
    q = torch.randn(1, 12, 2, 16)
    with pytest.raises(TypeError, match="same dtype"):
        sam_fast.dilated_attention(q, q.half(), q)
    with pytest.raises(ValueError, match=r"q must have shape \(B, N, H, D\)"):
        sam_fast.dilated_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="contiguous last dim"):
        t = torch.randn(1, 12, 16, 2).transpose(-1, -2)
        sam_fast.dilated_attention(t, t, t)
    with pytest.raises(ValueError, match=r"grid \(3, 5\) has 15 tokens but q has N=12"):
        sam_fast.dilated_attention(q, q, q, grid=(3, 5))
    with pytest.raises(ValueError, match="head dim D=160"):
        big = torch.randn(1, 12, 2, 160)
        sam_fast.dilated_attention(big, big, big, backend="triton")
    with pytest.raises(ValueError, match="rel_pos_h has L=3 rows"):
        sam_fast.dilated_attention(q, q, q, grid=(3, 4), rel_pos_h=torch.zeros(3, 16), rel_pos_w=torch.zeros(7, 16))
    with pytest.raises(ValueError, match="needs grid"):
        sam_fast.dilated_attention(q, q, q, rel_pos_h=torch.zeros(5, 16), rel_pos_w=torch.zeros(7, 16))
    with pytest.raises(ValueError, match=r"pad_kv\[0\] must have shape"):
        sam_fast.dilated_attention(q, q, q, Branch((2, 2)), grid=(3, 4),
                                   pad_kv=(torch.zeros(3, 16), torch.zeros(2, 16)))
    with pytest.raises(ValueError, match="2-D branch"):
        sam_fast.dilated_attention(q, q, q, Branch((2, 2)))
    with pytest.raises(ValueError, match="backend must be one of"):
        sam_fast.dilated_attention(q, q, q, backend="fast")
    with pytest.raises(ValueError, match="Branch segment must be >= 1"):
        Branch(0)
    with pytest.raises(ValueError, match="must not exceed the segment"):
        Branch(4, 8)


def test_auto_on_cpu_uses_cpu_backend_without_warning(recwarn):
    q = torch.randn(1, 12, 2, 16)
    with sam_fast.record_backends() as rec:
        sam_fast.dilated_attention(q, q, q)
    assert rec.calls == [("dilated_attention", "cpu")] and rec.fallbacks == []
    assert not [w for w in recwarn if issubclass(w.category, sam_fast.SamFastFallbackWarning)]


def test_opcheck_fwd_and_bwd_ops():
    import sam_fast.ops.dilated_attention  # noqa: F401  (registers the custom ops; sam_fast's exports are lazy)

    for layout, rel in itertools.product(["contiguous", "qkv", "bhnd"], [False, True]):
        (q, k, v), _, kw = make_case(1, (3, 4), 2, 16, torch.float32, None, rel, layout=layout)
        args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), [3, 4, 3, 4, 3, 4, 1, 1],
                kw.get("rel_pos_h"), kw.get("rel_pos_w"), None, None, 0.25)
        torch.library.opcheck(torch.ops.sam_fast.dilated_attention_fwd.default, args)
    # Multi-branch geometry [rows, cols, (rows, cols, seg_h, seg_w, dil_h, dil_w) per branch]: 1-D, two branches.
    q, k, v = (torch.randn(1, 12, 2, 16, requires_grad=True) for _ in range(3))
    args = (q, k, v, [1, 12, 1, 12, 1, 4, 1, 1, 1, 12, 1, 12, 1, 2], None, None, None, None, 0.25)
    torch.library.opcheck(torch.ops.sam_fast.dilated_attention_fwd.default, args)


def test_torch_compile_fullgraph_no_graph_break():
    class Tiny(torch.nn.Module):
        def forward(self, q, k, v):
            return sam_fast.dilated_attention(q, k, v, grid=(3, 4), backend="triton") * 2

    (q, k, v), _, _ = make_case(1, (3, 4), 2, 16, torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(Tiny(), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), Tiny()(q, k, v))


@pytest.mark.parametrize("D,window,pad", [(80, (4, 4), True), (96, None, False), (40, (3, 5), True)])
def test_kernels_split_head_dim_that_is_not_a_power_of_two(D, window, pad, monkeypatch):
    """D = 80 (ViT-H), 96 and 40 run forward and backward as two power-of-two column slices (64+16, 64+32,
    32+16) rather than padded to 128 / 64; with SAM's window padding and rel-pos, out, lse and every
    gradient match the reference, and match the padded kernels to rounding."""
    from sam_fast.kernels.dilated_attention import tuning as k

    configs = record_launch_configs(monkeypatch)
    qkv, pattern, kw = make_case(1, (9, 10), 2, D, torch.float32, window, True, pad, layout="qkv")
    check_kernel_vs_reference(qkv, pattern, kw, torch.float32)
    main, tail = k.head_dim_split(D)
    assert D <= main + tail < 2 * main
    assert len(configs) == 2 and all(c["TAIL"] and (c["BLOCK_D"], c["BLOCK_DT"]) == (main, tail) for c in configs)

    results = []
    for split in (True, False):
        configs.clear()
        with contextlib.nullcontext() if split else k.padded_head_dim():
            ins, out, lse = run_op("triton", qkv, pattern, kw)
            grads = torch.autograd.grad(out.sum() + lse.sum(), ins)
        assert configs and all(c["TAIL"] == split for c in configs)
        results.append((out, lse) + grads)
    assert k.SPLIT_HEAD_DIM
    for a, b in zip(*results):  # fp32: the two differ only in summation order
        torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("window,pad", [(None, False), ((4, 4), True)], ids=["global", "window"])
def test_gpu_forward_blocks_for_split_head_dim(window, pad, monkeypatch):
    """The forward a GPU runs for ViT-H's head dim (128-query tiles over 64 + 16 columns; the interpreter
    otherwise picks 64-query tiles) matches the reference; fp16, whose tl.dot the interpreter gets right."""
    from sam_fast.kernels.dilated_attention import tuning

    monkeypatch.setattr(tuning, "_interpreting", lambda: False)
    configs = record_launch_configs(monkeypatch)
    qkv, pattern, kw = make_case(1, (12, 13), 2, 80, torch.float16, window, True, pad, layout="qkv")
    with torch.no_grad():
        _, out_k, lse_k = run_op("triton", qkv, pattern, kw)
        _, out_r, lse_r = run_op("reference", qkv, pattern, kw)
        _, out_x, lse_x = run_op("reference", qkv, pattern, kw, cast=torch.float64)
    assert [(c["BLOCK_M"], c["BLOCK_D"], c["BLOCK_DT"], c["TAIL"]) for c in configs] == [(128, 64, 16, True)]
    check_against_reference("out", out_k, out_x, out_r, torch.float16, FWD_FACTOR)
    check_against_reference("lse", lse_k, lse_x, lse_r, torch.float16, FWD_FACTOR)


@pytest.mark.parametrize("where", ["q nan", "k nan", "k inf", "v nan"])
@pytest.mark.parametrize("pattern", [None, [Branch(16, 1), Branch(32, 2)]], ids=["dense", "two-branch"])
def test_non_finite_inputs_give_what_the_reference_gives(where, pattern):
    """A NaN or inf input makes the same rows NaN / inf, in out and in lse, as the reference (the GPU's max
    drops NaN, so the kernel cannot leave it to the running max); every other value still matches."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 64, 2, 16, generator=g) for _ in range(3))
    t, val = {"q": q, "k": k, "v": v}[where[0]], float(where[2:])
    t[0, 5, 0, 3] = val
    ref = sam_fast.dilated_attention(q, k, v, pattern, return_lse=True, backend="reference")
    assert torch.isnan(ref[0]).any()  # the case does reach the output
    for backend in ("triton", "cpu"):
        got = sam_fast.dilated_attention(q, k, v, pattern, return_lse=True, backend=backend)
        for name, a, b in zip(("out", "lse"), got, ref):
            assert torch.equal(torch.isnan(a), torch.isnan(b)), (backend, name)
            assert torch.equal(a.isinf() & (a > 0), b.isinf() & (b > 0)), (backend, name)
            fin = torch.isfinite(b)
            torch.testing.assert_close(a[fin], b[fin], atol=1e-5, rtol=1e-5)


def test_batch_offsets_past_2_31_elements():
    """The kernels' batch offset (batch index x batch stride) is 64-bit: in int32 the last batch here
    wrapped to a negative address (the interpreter crashed; a GPU would read wrong memory)."""
    check_far_apart_batches("cpu", torch.float16, atol_out=3e-3, atol_grad=5e-3)


# ------------------------------------------------------------------------------------------------
# CUDA at SAM's real shapes (pytest -m gpu)
# ------------------------------------------------------------------------------------------------

# (B, grid, H, D, window, pad): ViT-B/H global and window blocks, SlimSAM head dims, batch 1 and 2,
# sizes just off block multiples, a non-square grid.
SHAPES = [
    pytest.param((1, (64, 64), 12, 64, None, False), marks=smoke),
    (1, (64, 64), 16, 80, None, False),
    (2, (64, 64), 12, 64, (14, 14), True),
    pytest.param((1, (64, 64), 16, 80, (14, 14), True), marks=smoke),
    (1, (64, 64), 12, 32, None, False),
    (1, (64, 64), 12, 14, None, False),
    (1, (33, 47), 4, 64, None, False),
    (1, (33, 47), 4, 64, (14, 14), True),
]


def _case(B, grid, H, D, window, pad, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    N = grid[0] * grid[1]
    qkv = torch.randn(B, N, 3, H, D, device="cuda", generator=g)
    seg = window or grid
    rh = torch.randn(2 * seg[0] - 1, D, device="cuda", generator=g) * 0.2
    rw = torch.randn(2 * seg[1] - 1, D, device="cuda", generator=g) * 0.2
    pk = torch.randn(H, D, device="cuda", generator=g) if pad else None
    pv = torch.randn(H, D, device="cuda", generator=g) if pad else None
    return qkv, rh, rw, pk, pv


def _call(qkv, rh, rw, pk, pv, window, grid, dtype, backend):
    leaves = [t.to(dtype).detach().requires_grad_() if t is not None else None for t in (qkv, rh, rw, pk, pv)]
    q, k, v = leaves[0].unbind(2)
    pad = (leaves[3], leaves[4]) if leaves[3] is not None else None
    out, lse = sam_fast.dilated_attention(q, k, v, Branch(window) if window else None, grid=grid,
                                          rel_pos_h=leaves[1], rel_pos_w=leaves[2], pad_kv=pad,
                                          return_lse=True, backend=backend)
    return [t for t in leaves if t is not None], out, lse


@gpu
@pytest.mark.parametrize("window", [None, (14, 14)], ids=["global", "window"])
def test_head_dim_split_matches_padded_forward_vit_h(window):
    """ViT-H (D=80): the forward's 64 + 16 column split and the padded (128) forward give the same out
    and lse up to summation order, in bf16 with rel-pos and window padding."""
    from sam_fast.kernels.dilated_attention import head_dim_split, padded_head_dim

    assert head_dim_split(80) == (64, 16)
    qkv, rh, rw, pk, pv = _case(1, (64, 64), 16, 80, window, window is not None, torch.bfloat16)
    with torch.no_grad():
        _, out_s, lse_s = _call(qkv, rh, rw, pk, pv, window, (64, 64), torch.bfloat16, "triton")
        with padded_head_dim():
            _, out_p, lse_p = _call(qkv, rh, rw, pk, pv, window, (64, 64), torch.bfloat16, "triton")
    torch.testing.assert_close(lse_s, lse_p, atol=1e-4, rtol=1e-5)
    assert (out_s.float() - out_p.float()).abs().max() <= 2 * out_p.float().abs().max() * 2**-8


@gpu
@pytest.mark.parametrize("pattern", [None, [Branch(1024, 1), Branch(2048, 2), Branch(4096, 4)]],
                         ids=["dense", "LongNet mix"])
@gpu
def test_non_finite_rows_match_the_reference_on_cuda(pattern):
    """The GPU's max drops NaN: a NaN query, a NaN key and an inf key must still leave NaN / +inf in the
    same rows of out and lse as the reference (ViT-H shape, bf16; also through the multi-group merge)."""
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(1, 4096, 16, 80, device="cuda", generator=g).bfloat16() for _ in range(3))
    q[0, 100, 0, 7] = float("nan")
    k[0, 2000, 1, 0] = float("nan")
    k[0, 3000, 2, 5] = float("inf")
    got = sam_fast.dilated_attention(q, k, v, pattern, return_lse=True, backend="triton")
    ref = sam_fast.dilated_attention(q, k, v, pattern, return_lse=True, backend="reference")
    for name, a, b in zip(("out", "lse"), got, ref):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), name
        assert torch.equal(a.isinf() & (a > 0), b.isinf() & (b > 0)), name
    assert torch.isnan(got[0]).any()


@gpu
def test_batch_offsets_past_2_31_elements_on_cuda():
    """A batch stride under 2**31 elements whose last batch starts past it (4.3 GB of bf16 views): the
    kernels' 64-bit batch offset reads the right rows, forward and backward."""
    check_far_apart_batches("cuda", torch.bfloat16, atol_out=2e-2, atol_grad=3e-2)


@gpu
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_vs_reference_real_shapes(shape, dtype):
    B, grid, H, D, window, pad = shape
    data = _case(*shape, dtype)
    with sam_fast.record_backends() as rec:
        res_k = _call(*data, window, grid, dtype, "triton")
    assert rec.backends() == {"triton"}
    res_r = _call(*data, window, grid, dtype, "reference")
    res_x = _call(*data, window, grid, torch.float32, "reference")
    check_against_reference("out", res_k[1], res_x[1], res_r[1], dtype, FWD_FACTOR)
    check_against_reference("lse", res_k[2], res_x[2], res_r[2], dtype, FWD_FACTOR)
    dout = torch.randn_like(res_x[1])
    grads = [torch.autograd.grad((o.float() * dout).sum(), ins) for ins, o, _ in (res_k, res_r, res_x)]
    for i, (gk, gr, gx) in enumerate(zip(*grads)):
        check_against_reference(f"grad[{i}]", gk, gx, gr, dtype, BWD_FACTOR)


@gpu
def test_auto_picks_triton_on_cuda_and_falls_back_loudly():
    q = torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16)
    with sam_fast.record_backends() as rec:
        sam_fast.dilated_attention(q, q, q)
    assert rec.calls == [("dilated_attention", "triton")]
    big = torch.randn(1, 64, 2, 160, device="cuda", dtype=torch.bfloat16)
    with sam_fast.record_backends() as rec, pytest.warns(sam_fast.SamFastFallbackWarning, match="head dim"):
        sam_fast.dilated_attention(big, big, big)
    assert rec.calls == [("dilated_attention", "reference")]


@gpu
def test_compile_inductor_fullgraph():
    q, k, v = (torch.randn(1, 4096, 12, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    f = lambda q, k, v: sam_fast.dilated_attention(q, k, v, grid=(64, 64)) * 2  # noqa: E731
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k, v), f(q, k, v))

@gpu
def test_patched_vit_b_shaped_encoder_on_gpu():
    from sam_fast.models import tiny_image_encoder

    enc = tiny_image_encoder(img_size=1024, embed_dim=768, num_heads=12, depth=4, window_size=14,
                             global_attn_indexes=(1, 3), out_chans=256).cuda()
    check_fused_bf16_encoder(enc, torch.randn(1, 3, 1024, 1024, device="cuda"))
