"""CUDA checks with SAM's real shapes: ``pytest -m gpu`` on a machine with a GPU."""

import pytest
import torch
from attn_helpers import check_far_apart_batches, check_kernel_vs_reference

import sam_fast
from sam_fast import Branch
from sam_fast.testing import BWD_FACTOR, FWD_FACTOR, check_against_reference

pytestmark = pytest.mark.gpu
# The smoke subset (`pytest -m "gpu and smoke"`, the first stage of tools/gpu_verify.py): each Triton kernel
# and CUDA op once at SAM's shapes against its reference, within about two minutes on 8 workers.
SMOKE = pytest.mark.smoke

# (B, grid, H, D, window, pad): ViT-B/H global and window blocks, SlimSAM head dims, batch 1 and 2,
# sizes just off block multiples, a non-square grid.
SHAPES = [
    pytest.param((1, (64, 64), 12, 64, None, False), marks=SMOKE),
    (1, (64, 64), 16, 80, None, False),
    (2, (64, 64), 12, 64, (14, 14), True),
    pytest.param((1, (64, 64), 16, 80, (14, 14), True), marks=SMOKE),
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


@pytest.mark.parametrize("pattern", [None, [Branch(1024, 1), Branch(2048, 2), Branch(4096, 4)]],
                         ids=["dense", "LongNet mix"])
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


def test_batch_offsets_past_2_31_elements_on_cuda():
    """A batch stride under 2**31 elements whose last batch starts past it (4.3 GB of bf16 views): the
    kernels' 64-bit batch offset reads the right rows, forward and backward."""
    check_far_apart_batches("cuda", torch.bfloat16, atol_out=2e-2, atol_grad=3e-2)


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


def test_auto_picks_triton_on_cuda_and_falls_back_loudly():
    q = torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16)
    with sam_fast.record_backends() as rec:
        sam_fast.dilated_attention(q, q, q)
    assert rec.calls == [("dilated_attention", "triton")]
    big = torch.randn(1, 64, 2, 160, device="cuda", dtype=torch.bfloat16)
    with sam_fast.record_backends() as rec, pytest.warns(sam_fast.SamFastFallbackWarning, match="head dim"):
        sam_fast.dilated_attention(big, big, big)
    assert rec.calls == [("dilated_attention", "reference")]


def test_compile_inductor_fullgraph():
    q, k, v = (torch.randn(1, 4096, 12, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    f = lambda q, k, v: sam_fast.dilated_attention(q, k, v, grid=(64, 64)) * 2  # noqa: E731
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k, v), f(q, k, v))


@SMOKE
def test_resize_rel_pos_cuda_matches_cpu():
    t = torch.randn(27, 80)
    with sam_fast.record_backends() as rec:
        got = sam_fast.resize_rel_pos(t.cuda(), 127)
    assert rec.calls == [("resize_rel_pos", "cuda")]
    torch.testing.assert_close(got.cpu(), sam_fast.resize_rel_pos(t, 127), atol=1e-6, rtol=0)


def test_patched_vit_b_shaped_encoder_on_gpu():
    from sam_fast.models import tiny_image_encoder

    enc = tiny_image_encoder(img_size=1024, embed_dim=768, num_heads=12, depth=4, window_size=14,
                             global_attn_indexes=(1, 3), out_chans=256).cuda()
    _check_fused_bf16_encoder(enc, torch.randn(1, 3, 1024, 1024, device="cuda"))


def _check_fused_bf16_encoder(enc, x):
    """Cast ``enc`` to bf16 and check its fused-attention embedding against the fp32 one by the bf16 rule
    (segment_anything's own bf16 error as the yardstick). Returns the fused bf16 embedding."""
    with torch.no_grad():
        exact = enc(x)
        enc_bf = enc.to(torch.bfloat16)
        expected = enc_bf(x.bfloat16())
        with sam_fast.apply(enc_bf, sam_fast.SamFastConfig()):
            with sam_fast.record_backends() as rec:
                got = enc_bf(x.bfloat16())
    assert rec.backends("dilated_attention") == {"triton"}
    check_against_reference("embedding", got, exact, expected, torch.bfloat16, FWD_FACTOR)
    return got


# (B, grid, H, D, pattern, rel): the benchmark's patterns at SAM's grid, a non-nested pattern (two
# launches), rel-pos under dilation, an odd grid, and N = 16384 (a 2048^2 image).
LONGNET = [Branch(1024, 1), Branch(2048, 2), Branch(4096, 4)]
DILATED = [
    pytest.param((1, (64, 64), 16, 64, [Branch((32, 32), 2)], False), marks=SMOKE),
    (2, (64, 64), 16, 80, [Branch((64, 64), 4)], False),
    pytest.param((1, (64, 64), 16, 64, LONGNET, False), marks=SMOKE),
    pytest.param((1, (64, 64), 16, 64, LONGNET, True), marks=SMOKE),  # 1-D branches' per-key rel-pos tables
    (1, (64, 64), 16, 64, [Branch((2, 2)), Branch(100, 2)], True),  # 2-D and 1-D mixed: two launch groups
    (1, (64, 64), 12, 64, [Branch((14, 14), 1), Branch((32, 32), (2, 2))], True),
    (1, (64, 64), 16, 80, [Branch((32, 32), 2)], True),
    (1, (33, 47), 5, 32, [Branch((16, 16), (2, 2)), Branch((33, 47), (4, 4))], False),
    (1, (128, 128), 16, 64, [Branch((64, 64), 2)], False),
]


@pytest.mark.parametrize("case", DILATED, ids=lambda c: f"B{c[0]}-{c[1]}-H{c[2]}-D{c[3]}-{len(c[4])}br-rel{int(c[5])}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dilated_kernel_vs_reference_real_shapes(case, dtype):
    B, grid, H, D, pattern, rel = case
    g = torch.Generator(device="cuda").manual_seed(0)
    N = grid[0] * grid[1]
    qkv = [t.to(dtype) for t in torch.randn(B, N, 3, H, D, device="cuda", generator=g).unbind(2)]
    kw = {"grid": grid}
    if rel:
        kw["rel_pos_h"] = (torch.randn(2 * grid[0] - 1, D, device="cuda", generator=g) * 0.2).to(dtype)
        kw["rel_pos_w"] = (torch.randn(2 * grid[1] - 1, D, device="cuda", generator=g) * 0.2).to(dtype)
    check_kernel_vs_reference(qkv, pattern, kw, dtype)


def test_swapped_vit_b_shaped_encoder_dilated_on_gpu():
    from sam_fast.models import tiny_image_encoder

    enc = tiny_image_encoder(img_size=1024, embed_dim=768, num_heads=12, depth=4, window_size=14,
                             global_attn_indexes=(1, 3), out_chans=256).cuda().to(torch.bfloat16)
    x = torch.randn(1, 3, 1024, 1024, device="cuda", dtype=torch.bfloat16)
    cfg = sam_fast.SamFastConfig(attention="dilated", dilated_pattern=Branch((32, 32), 2))
    with sam_fast.apply(enc, cfg):
        with sam_fast.record_backends() as rec:
            y = enc(x)
            y.float().square().mean().backward()
        assert rec.backends("dilated_attention") == {"triton"} and not rec.fallbacks
        for blk in enc.blocks:
            blk.backend = "reference"
        y_ref = enc(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), y_ref.float(), atol=5e-2, rtol=5e-2)


# ------------------------------------------------------------------------------------------------
# W8A8: SAM's real linear shapes (M = tokens of one or two images)
# ------------------------------------------------------------------------------------------------

INT8_SHAPES = [(4096, 768, 2304), (4096, 768, 768), (4096, 768, 3072), (4096, 3072, 768),
               (8192, 1280, 3840), pytest.param(4096, 1280, 5120, marks=SMOKE), (4096, 5120, 1280),
               (4097, 1280, 1280), (1, 768, 768), pytest.param(333, 40, 50, marks=SMOKE)]


@pytest.mark.parametrize("m,k,n", INT8_SHAPES, ids=str)
def test_int8_gemm_real_shapes(m, k, n):
    from sam_fast.kernels import int8_gemm as K
    from sam_fast.reference import int8 as R
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


def test_int8_non_finite_rows_are_nan_on_cuda():
    """The GPU's max reduction and min / max instructions drop NaN: rows holding NaN or +-inf must still
    come out NaN (both quantizers) and NaN must quantize to 0 with a static scale, as on the CPU."""
    from sam_fast.kernels import int8_gemm as K
    from sam_fast.reference import int8 as R

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


@SMOKE
def test_layer_norm_quantize_real_shape():
    from sam_fast.reference import int8 as R

    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(2, 64, 64, 1280, device="cuda", generator=g).bfloat16()
    w, b = torch.randn(1280, device="cuda", generator=g), torch.randn(1280, device="cuda", generator=g)
    q, s = sam_fast.layer_norm_quantize(x, w, b, 1e-6)
    qr, sr = R.layer_norm_quantize(x, w, b, 1e-6)
    assert int((q.int() - qr.int()).abs().max()) <= 1 and float((q != qr).float().mean()) < 1e-3
    torch.testing.assert_close(s, sr, rtol=1e-5, atol=0)


def test_w8a8_vit_b_shaped_encoder_on_gpu():
    import skimage.data

    from sam_fast.models import tiny_image_encoder
    from sam_fast.quantize import calibrate, sqnr_db
    from sam_fast.testing import INT8_EMBEDDING_MIN_SQNR_DB

    enc = tiny_image_encoder(img_size=1024, embed_dim=768, num_heads=12, depth=4, window_size=14,
                             global_attn_indexes=(1, 3), out_chans=256).cuda().to(torch.bfloat16)
    images = [skimage.data.astronaut(), skimage.data.coffee()]
    cal = calibrate(enc, images, progress=False)
    assert cal.embedding_sqnr_db >= INT8_EMBEDDING_MIN_SQNR_DB
    x = torch.randn(2, 3, 1024, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        with sam_fast.apply(enc, sam_fast.SamFastConfig(attention="exact")):
            ref = enc(x)
        with sam_fast.apply(enc, sam_fast.SamFastConfig(attention="exact", quantize="int8", calibration=cal)):
            with sam_fast.record_backends() as rec:
                out = enc(x)
    assert rec.backends() == {"triton"} and not rec.fallbacks
    assert sqnr_db(ref.float(), out.float()) >= INT8_EMBEDDING_MIN_SQNR_DB


def test_slimsam_pruned_encoder_on_gpu():
    """A SlimSAM-77-shaped encoder with per-block pruned widths (head dims 14, 10 and 8 at 4096 tokens)
    loaded from a checkpoint: fused attention within the bf16 rule, then W8A8 on top."""
    import dataclasses

    import skimage.data

    from sam_fast.models import build_image_encoder, encoder_geometry, released_geometry
    from sam_fast.quantize import calibrate, sqnr_db
    from sam_fast.testing import INT8_EMBEDDING_MIN_SQNR_DB

    geom = released_geometry("slimsam_77")
    blocks = list(geom.blocks)
    for i, (heads, head_dim, mlp) in {0: (12, 10, 520), 2: (8, 14, 696), 5: (12, 8, 300), 11: (6, 14, 400)}.items():
        blocks[i] = dataclasses.replace(blocks[i], num_heads=heads, head_dim=head_dim, mlp_dim=mlp)
    geom = dataclasses.replace(geom, blocks=tuple(blocks))
    enc = build_image_encoder(geom)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.normal_(0, 0.2)
    assert encoder_geometry(enc.state_dict(), prefix="") == geom
    enc = enc.cuda().eval()
    x = torch.randn(1, 3, 1024, 1024, device="cuda")
    got = _check_fused_bf16_encoder(enc, x)  # enc is bf16 from here on
    cal = calibrate(enc, [skimage.data.astronaut(), skimage.data.coffee()], progress=False)
    with torch.no_grad():
        with sam_fast.apply(enc, sam_fast.SamFastConfig(attention="exact", quantize="int8", calibration=cal)):
            with sam_fast.record_backends() as rec:
                out = enc(x.bfloat16())
    assert rec.backends() == {"triton"} and not rec.fallbacks
    assert sqnr_db(got.float(), out.float()) >= INT8_EMBEDDING_MIN_SQNR_DB


def test_vit_t_w8a8_on_gpu():
    """MobileSAM's TinyViT at 1024 x 1024 in bf16 on CUDA (SDPA with its bias table), then W8A8 with
    the LayerNorms fused, all int8 work on the Triton kernels."""
    import skimage.data

    from sam_fast.models import build_vit_t
    from sam_fast.quantize import calibrate, sqnr_db
    from sam_fast.testing import INT8_EMBEDDING_MIN_SQNR_DB

    sam = build_vit_t()
    with torch.no_grad():
        for name, p in sam.image_encoder.named_parameters():
            if "attention_biases" in name:
                p.normal_(0, 1)
    enc = sam.image_encoder.cuda().eval()
    x = torch.randn(2, 3, 1024, 1024, device="cuda")
    with torch.no_grad():
        exact = enc(x)
        enc.to(torch.bfloat16)
        ref = enc(x.bfloat16())
    assert ref.shape == (2, 256, 64, 64)
    assert sqnr_db(exact, ref.float()) >= 30  # bf16 TinyViT vs fp32: bf16 rounding only
    cal = calibrate(enc, [skimage.data.astronaut(), skimage.data.coffee()], progress=False)
    with torch.no_grad(), sam_fast.apply(enc, sam_fast.SamFastConfig(attention="none", quantize="int8",
                                                                     calibration=cal)):
        with sam_fast.record_backends() as rec:
            out = enc(x.bfloat16())
    assert rec.backends() == {"triton"} and not rec.fallbacks
    assert sqnr_db(ref.float(), out.float()) >= INT8_EMBEDDING_MIN_SQNR_DB


# --- mask post-processing (issue 5) ---

POSTPROCESS_GEOMETRIES = [
    ((1024, 683), (1500, 1000), None, None),  # SAM's resize of a portrait photo
    ((768, 1024), (1200, 1600), (0, 0, 1600, 1200), None),
    pytest.param(((1024, 1024), (400, 400), (37, 500, 437, 900), (1200, 800)), marks=SMOKE),  # crop in a frame
    ((1024, 1024), (1024, 1024), None, None),
]


@pytest.mark.gpu
@pytest.mark.parametrize("geometry", POSTPROCESS_GEOMETRIES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_postprocess_cuda_matches_cpu(geometry, dtype):
    import torch.nn.functional as F

    from sam_fast.ops.postprocess import mask_postprocess
    from sam_fast.reference.postprocess import upsample_logits

    input_size, original_size, crop_box, image_size = geometry
    g = torch.Generator().manual_seed(0)
    logits = F.interpolate(torch.randn(67, 1, 12, 12, generator=g) * 8, (256, 256), mode="bicubic")[:, 0]
    logits[0] = -3.0
    logits[1] = 3.0
    logits = logits.to(dtype)
    kw = dict(input_size=input_size, original_size=original_size, crop_box=crop_box, image_size=image_size,
              return_masks=True)
    cpu = mask_postprocess(logits, backend="cpu", **kw)
    with sam_fast.record_backends() as rec:
        cuda = mask_postprocess(logits.cuda(), **kw)
    assert rec.calls == [("mask_postprocess", "cuda")]
    up = upsample_logits(logits, (1024, 1024), input_size, original_size)
    near = torch.zeros_like(up, dtype=torch.bool)
    for t in (0.0, 1.0, -1.0):
        near |= (up - t).abs() < 1e-4
    assert torch.equal(cuda.masks.cpu() & ~near, cpu.masks & ~near)
    clean = ~near.flatten(1).any(1)
    assert torch.equal(cuda.area.cpu()[clean], cpu.area[clean])
    assert torch.equal(cuda.boxes.cpu()[clean], cpu.boxes[clean])
    assert torch.equal(cuda.stability_score.cpu()[clean].nan_to_num(-1), cpu.stability_score[clean].nan_to_num(-1))
    # RLE of every clean mask identical to the CPU kernel's (itself checked against pycocotools).
    co, go = cpu.rle_offsets.tolist(), cuda.rle_offsets.cpu().tolist()
    cc, gc = cpu.rle_counts.tolist(), cuda.rle_counts.cpu().tolist()
    for i in torch.nonzero(clean).flatten().tolist():
        assert gc[go[i]:go[i + 1]] == cc[co[i]:co[i + 1]]
    no_rle = mask_postprocess(logits.cuda(), return_rle=False, **kw)
    assert torch.equal(no_rle.area, cuda.area)


@pytest.mark.gpu
def test_batched_decoder_sam_shapes_bf16():
    import copy

    from sam_fast.models import sam_decoder
    from sam_fast.nn.decoder import BatchedMaskDecoder

    sam = sam_decoder().cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    emb = torch.randn(2, 256, 64, 64, device="cuda", generator=g)
    index = torch.tensor([1, 0, 1, 1, 0], device="cuda")
    coords = torch.rand(5, 2, 2, device="cuda", generator=g) * 1024
    labels = torch.ones(5, 2, dtype=torch.int, device="cuda")

    def segment_anything(model, dtype):
        # segment_anything's prompt encoder fails on a bf16 model (fp32 coordinates meet its bf16 Fourier
        # matrix), so its prompts are encoded by the fp32 model, whose weights are the same.
        lows = []
        for p in range(5):
            sparse, dense = sam.prompt_encoder(points=(coords[p:p + 1], labels[p:p + 1]), boxes=None, masks=None)
            dense_pe = sam.prompt_encoder.get_dense_pe().to(dtype)
            lows.append(model.mask_decoder(emb[index[p]:index[p] + 1].to(dtype), dense_pe,
                                           sparse.to(dtype), dense.to(dtype), True)[0])
        return torch.cat(lows).float()

    ref = segment_anything(sam, torch.float32)
    bf = copy.deepcopy(sam).to(torch.bfloat16)
    own = segment_anything(bf, torch.bfloat16)
    got = BatchedMaskDecoder.from_sam(bf)(emb, index, coords, labels)[0].float()
    assert (got - ref).abs().max() <= 2 * (own - ref).abs().max() + 1e-3


@pytest.mark.gpu
def test_everything_on_cuda_matches_segment_anything():
    import numpy as np
    from segment_anything import SamAutomaticMaskGenerator
    from skimage import data

    from sam_fast import SamFastAutomaticMaskGenerator
    from sam_fast.models import tiny_sam

    sam = tiny_sam().cuda()
    image = np.ascontiguousarray(data.astronaut()[::2, ::3])
    kw = dict(points_per_side=8, pred_iou_thresh=-1.0, stability_score_thresh=0.0, box_nms_thresh=1.0,
              output_mode="uncompressed_rle")
    want = SamAutomaticMaskGenerator(sam, **kw).generate(image)
    with sam_fast.record_backends() as rec:
        got = SamFastAutomaticMaskGenerator(sam, **kw).generate(image)
    assert rec.backends("mask_postprocess") == {"cuda"}
    assert len(got) == len(want) > 50
    same = sum(a["segmentation"] == b["segmentation"] and a["bbox"] == b["bbox"] for a, b in zip(want, got))
    assert same >= len(want) - max(2, len(want) // 50)  # the rest differ only at near-threshold pixels


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=SMOKE), torch.float16, torch.float32])
@pytest.mark.parametrize("P,M", [(64, 3), (257, 1)])
def test_upscale_mask_product_sam_shapes(dtype, P, M):
    from sam_fast.ops.decoder import upscale_mask_product
    from sam_fast.reference import decoder as reference
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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=SMOKE), torch.float16, torch.float32])
@pytest.mark.parametrize("shared", [True, False])
def test_small_key_attention_sam_shapes(dtype, shared):
    from sam_fast.ops.decoder import small_key_attention
    from sam_fast.reference import decoder as reference
    from sam_fast.testing import FWD_FACTOR, check_against_reference

    g = torch.Generator(device="cuda").manual_seed(0)
    P, T, G = 300, 7, 3
    q = torch.randn(G if shared else P, 4096, 128, device="cuda", generator=g).to(dtype)
    k = torch.randn(P, T, 128, device="cuda", generator=g).to(dtype)
    v = torch.randn(P, T, 128, device="cuda", generator=g).to(dtype)
    idx = (torch.arange(P, device="cuda") * G // P) if shared else torch.arange(P, device="cuda")
    with sam_fast.record_backends() as rec:
        got = small_key_attention(q, idx, k, v, 8)
    assert rec.calls == [("small_key_attention", "triton")]
    exact = reference.small_key_attention(q.double(), idx, k.double(), v.double(), 8)
    same = reference.small_key_attention(q, idx, k, v, 8)
    check_against_reference("small_key_attention", got, exact, same, dtype, FWD_FACTOR)
