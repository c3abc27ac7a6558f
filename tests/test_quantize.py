"""Int8Linear, calibration and W8A8 SAM encoders swapped by sam_fast.apply (Triton under the interpreter)."""

import pytest
import skimage.data
import torch
from attn_helpers import check_fused_bf16_encoder
from devices import gpu
from torch import nn

import sam_fast
from sam_fast import Branch, SamFastConfig, cpu_policy
from sam_fast.models.tiny import tiny_image_encoder
from sam_fast.nn import Int8Linear
from sam_fast.quantize import Calibration, calibrate, prepare_image, sqnr_db
from sam_fast.testing import INT8_EMBEDDING_MIN_SQNR_DB, INT8_LINEAR_MIN_SQNR_DB

IMAGES = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]


@pytest.fixture(scope="module")
def calibrated():
    enc = tiny_image_encoder()
    cal = calibrate(enc, IMAGES, num_images=4, progress=False)
    return enc, cal


def _batch(enc, images=IMAGES):
    from sam_fast.surgery import PIXEL_MEAN, PIXEL_STD

    return torch.cat([prepare_image(im, enc.img_size, PIXEL_MEAN, PIXEL_STD, "cpu", torch.float32)
                      for im in images])


def test_int8_linear_module():
    lin = nn.Linear(96, 40)
    q = Int8Linear.from_float(lin)
    assert q.weight.dtype == torch.int8 and q.weight_scale.dtype == torch.float32 and q.act_scale is None
    err = (q.dequantized_weight() - lin.weight).abs()
    assert bool((err <= q.weight_scale[:, None] / 2 + 1e-7).all())
    x = torch.randn(3, 7, 96)
    with torch.no_grad():
        assert sqnr_db(lin(x), q(x)) > INT8_LINEAR_MIN_SQNR_DB
    assert set(q.state_dict()) == {"weight", "weight_scale", "bias"}
    static = Int8Linear.from_float(lin, act_scale=0.05)
    assert set(static.state_dict()) == {"weight", "weight_scale", "bias", "act_scale"}
    # .to(bfloat16) casts the bias with the model, never the scales
    static.to(torch.bfloat16)
    assert static.bias.dtype == torch.bfloat16
    assert static.weight_scale.dtype == torch.float32 and static.act_scale.dtype == torch.float32
    assert static(x.bfloat16()).dtype == torch.bfloat16
    # static / dynamic follows the loaded state_dict
    q.load_state_dict(Int8Linear.from_float(lin, act_scale=0.05).state_dict())
    assert float(q.act_scale) == pytest.approx(0.05)
    q.load_state_dict(Int8Linear.from_float(lin).state_dict())
    assert q.act_scale is None
    with pytest.raises(TypeError, match="linear"):
        Int8Linear.from_float(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="act_scale"):
        Int8Linear.from_float(lin, act_scale=0.0)


def test_calibration_report(calibrated, tmp_path):
    enc, cal = calibrated
    keys = [f"blocks.{i}.{r}" for i in range(4) for r in ("attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2")]
    assert list(cal.layers) == keys
    assert cal.num_images == 4
    for key, e in cal.layers.items():
        assert e.act_amax > 0 and e.sqnr_dynamic_db > INT8_LINEAR_MIN_SQNR_DB
        assert e.mode == ("static" if key.endswith("lin2") else "dynamic")
    assert cal.layers["blocks.0.mlp.lin2"].static_scale == pytest.approx(cal.layers["blocks.0.mlp.lin2"].act_amax / 127)
    assert cal.embedding_sqnr_db > INT8_EMBEDDING_MIN_SQNR_DB
    text = str(cal)
    assert "blocks.3.mlp.lin2" in text and "image embedding SQNR" in text
    cal.save(tmp_path / "cal.json")
    assert Calibration.load(tmp_path / "cal.json") == cal
    # calibration left the model in float
    assert all(isinstance(s.module, nn.Linear) for s in sam_fast.quantize.eligible_linears(enc))


@pytest.mark.parametrize("attention", ["exact", "dilated"])
def test_swapped_encoder_runs_int8_on_real_images(calibrated, attention):
    enc, cal = calibrated
    x = _batch(enc, IMAGES[:2])  # two of the calibration photos: a batch, at half the interpreter's time of four
    with torch.no_grad():
        ref = enc(x)
        extra = dict(dilated_pattern=Branch((4, 4), 2)) if attention == "dilated" else {}
        float_cfg = SamFastConfig(attention=attention, backend="triton", **extra)
        with sam_fast.apply(enc, float_cfg):
            ref_attention = enc(x)  # the same attention in float: isolates the quantization error
        handle = sam_fast.apply(enc, SamFastConfig(attention=attention, backend="triton", quantize="int8",
                                                   calibration=cal, **extra))
        with sam_fast.record_backends() as rec:
            out = enc(x)
        handle.undo()
        restored = enc(x)
    assert rec.backends("int8_linear") == {"triton"} and rec.backends("layer_norm_quantize") == {"triton"}
    assert rec.backends("dilated_attention") == {"triton"} and not rec.fallbacks
    # per block: LN->int8 for qkv and lin1, int8 GEMMs for qkv, proj, lin1 (requantizing) and lin2
    assert sum(op == "layer_norm_quantize" for op, _ in rec.calls) == 2 * 4
    assert sum(op == "int8_linear" for op, _ in rec.calls) == 4 * 4
    assert sqnr_db(ref_attention, out) >= INT8_EMBEDDING_MIN_SQNR_DB
    assert torch.equal(restored, ref)
    assert all(isinstance(s.module, nn.Linear) for s in sam_fast.quantize.eligible_linears(enc))


def test_quantize_without_fused_attention(calibrated):
    enc, cal = calibrated
    x = _batch(enc, IMAGES[:1])
    with torch.no_grad():
        ref = enc(x)
        with sam_fast.apply(enc, SamFastConfig(attention="none", quantize="int8", backend="triton")) as handle:
            assert len(handle.swapped) == 16 and not handle.left_float
            assert not any(isinstance(m, sam_fast.nn.SamFastBlock) for m in enc.modules())
            with sam_fast.record_backends() as rec:
                out = enc(x)
        assert rec.backends() == {"triton"}
        assert torch.equal(enc(x), ref)
    assert sqnr_db(ref, out) >= INT8_EMBEDDING_MIN_SQNR_DB


def test_state_dict_round_trip(calibrated, tmp_path):
    enc, cal = calibrated
    x = _batch(enc, IMAGES[1:2])
    cfg = SamFastConfig(attention="exact", backend="triton", quantize="int8", calibration=cal)
    with torch.no_grad(), sam_fast.apply(enc, cfg):
        out = enc(x)
        torch.save(enc.state_dict(), tmp_path / "w8a8.pt")
    fresh = tiny_image_encoder(seed=7)
    # the structure comes from the config: dynamic layers are made static (or back) by what was saved
    handle = sam_fast.apply(fresh, SamFastConfig(attention="exact", backend="triton", quantize="int8"))
    fresh.load_state_dict(torch.load(tmp_path / "w8a8.pt"))
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
    assert fresh.blocks[2].mlp.lin2.act_scale is not None
    handle.undo()


def test_outlier_layer_stays_float():
    enc = tiny_image_encoder(seed=3)
    with torch.no_grad():
        # one huge activation channel into block 0's MLP that the weights then scale away (the output is
        # the same kind of signal): per-token int8 spends its whole range on that channel
        enc.blocks[0].norm2.weight[5] *= 3000.0
        enc.blocks[0].mlp.lin1.weight[:, 5] /= 3000.0
    cal = calibrate(enc, IMAGES[:2], num_images=8, progress=False)
    assert cal.num_images == 2
    e = cal.layers["blocks.0.mlp.lin1"]
    assert e.mode == "float" and "outliers" in e.reason
    assert "blocks.0.mlp.lin1" in cal.left_float and "blocks.0.mlp.lin1" in str(cal)
    with sam_fast.apply(enc, SamFastConfig(quantize="int8", calibration=cal, backend="triton")) as handle:
        assert isinstance(enc.blocks[0].mlp.lin1, nn.Linear)
        assert isinstance(enc.blocks[0].mlp.lin2, Int8Linear)
        assert handle.left_float == cal.left_float


def test_narrow_layers_stay_float():
    enc = tiny_image_encoder(embed_dim=8, num_heads=2, out_chans=8)  # every linear has an 8-wide side
    with sam_fast.apply(enc, SamFastConfig(attention="none", quantize="int8")) as handle:
        assert len(handle.left_float) == 16 and handle.swapped == []
        assert all("too few channels" in why for why in handle.left_float.values())
    enc = tiny_image_encoder(embed_dim=16, num_heads=2, out_chans=8)
    with sam_fast.apply(enc, SamFastConfig(attention="none", quantize="int8")) as handle:
        assert not handle.left_float and len(handle.swapped) == 16


@pytest.mark.cpu_int8_widths
def test_cpu_keeps_layers_with_few_input_channels_float():
    """On a CPU whose int8 GEMM is torch._int_mm (no AMX int8 or AVX512-VNNI, or both switched off), int8 is slower
    than float for linears with fewer than 256 input channels: they stay float, with why, in both the plain swap and
    the calibration; wider ones (the MLP's 256 -> 64 here) go int8. With the fused GEMM every layer goes int8. A bf16
    model stays bf16 where the CPU multiplies bf16 in hardware."""
    from sam_fast import cpu_features
    from sam_fast.ops.int8_linear import fused_int8_gemm

    assert cpu_policy.policy().int8_min_in_features == 256 and cpu_policy.policy().int8_half_stays_float
    enc = tiny_image_encoder(embed_dim=64, num_heads=2, out_chans=8)  # qkv 64->192, proj 64->64, MLP 64->256->64
    x = _batch(enc)[:1]
    with torch.no_grad():
        ref = enc(x)
    if fused_int8_gemm():
        with sam_fast.apply(enc, SamFastConfig(attention="none", quantize="int8")) as handle:
            assert not handle.left_float and len(handle.swapped) == 16
    with cpu_features.disable(amx=True, avx512=True):
        assert not fused_int8_gemm()
        with sam_fast.apply(enc, SamFastConfig(attention="none", quantize="int8")) as handle:
            kept = {key.rsplit(".", 1)[1] for key in handle.left_float}
            assert kept == {"qkv", "proj", "lin1"} and len(handle.left_float) == 12
            assert all("int8 is slower than float below 256 input channels" in why
                       for why in handle.left_float.values())
            assert all(isinstance(b.mlp.lin2, Int8Linear) and isinstance(b.mlp.lin1, nn.Linear) for b in enc.blocks)
            with torch.no_grad():
                assert sqnr_db(ref, enc(x)) > INT8_EMBEDDING_MIN_SQNR_DB
        cal = calibrate(enc, IMAGES[:1], progress=False)
        assert {k for k, e in cal.layers.items() if e.mode != "float"} == {f"blocks.{i}.mlp.lin2" for i in range(4)}
        assert "below 256 input channels" in cal.layers["blocks.0.attn.qkv"].reason
    # a bf16 model on a CPU that multiplies bf16 in hardware keeps every linear in bf16
    from sam_fast.ops.dilated_attention_cpu import compute_dtype

    enc = enc.to(torch.bfloat16)
    with sam_fast.apply(enc, SamFastConfig(attention="none", quantize="int8")) as handle:
        if compute_dtype(torch.bfloat16) == torch.bfloat16:
            assert len(handle.left_float) == 16 and "lin2" in " ".join(handle.left_float)
            assert "multiplies bfloat16 in hardware" in handle.left_float["blocks.0.mlp.lin2"]
        else:
            assert "blocks.0.mlp.lin2" not in handle.left_float


def test_config_errors(calibrated):
    enc, cal = calibrated
    with pytest.raises(ValueError, match="quantize"):
        SamFastConfig(quantize="int4")
    with pytest.raises(ValueError, match="backend must be one of"):
        Int8Linear(8, 4, backend="gpu")
    with pytest.raises(ValueError, match="calibration needs quantize"):
        SamFastConfig(calibration=cal)
    with pytest.raises(TypeError, match="calibration"):
        SamFastConfig(quantize="int8", calibration={"blocks.0.attn.qkv": 0.1})
    other = tiny_image_encoder(depth=6, global_attn_indexes=(2, 5))
    with pytest.raises(ValueError, match="another model"):
        sam_fast.apply(other, SamFastConfig(quantize="int8", calibration=cal))
    assert all(isinstance(s.module, nn.Linear) for s in sam_fast.quantize.eligible_linears(other))
    with pytest.raises(ValueError, match="images"):
        calibrate(enc, [], progress=False)
    with pytest.raises(ValueError, match="num_images"):
        calibrate(enc, IMAGES, num_images=0, progress=False)
    with pytest.raises(ValueError, match="uint8"):
        calibrate(enc, [IMAGES[0].astype("float32")], progress=False)
    with pytest.raises(TypeError, match="ImageEncoderViT"):
        calibrate(nn.Linear(3, 3), IMAGES, progress=False)
    with sam_fast.apply(enc, SamFastConfig(attention="none", quantize="int8")):
        with pytest.raises(ValueError, match="float model"):
            calibrate(enc, IMAGES, progress=False)


@pytest.mark.parametrize("attention", ["exact", "none"])
def test_swapped_encoder_compiles_without_graph_breaks(calibrated, attention):
    """segment-anything-fast's users compile the whole encoder: the swapped blocks (fused attention and
    W8A8 modules) trace as one graph, and the traced graph computes what eager does."""
    enc, cal = calibrated
    x = _batch(enc, IMAGES[:2])
    with torch.no_grad(), sam_fast.apply(enc, SamFastConfig(attention=attention, quantize="int8", calibration=cal)):
        eager = enc(x)
        torch._dynamo.reset()
        traced = torch.compile(enc, fullgraph=True, backend="aot_eager")(x)
    if attention == "none":
        torch.testing.assert_close(traced, eager)
    else:
        # traced, the attention runs the batched CPU path; eager, the C++ block kernel. They agree to float rounding,
        # and where that rounding crosses an int8 step a value moves by one quantum downstream (78 dB here; a
        # wrong graph would be tens of dB lower). The test model is the same in every process (seeded).
        assert sqnr_db(eager, traced) > 60, sqnr_db(eager, traced)


def test_tinyvit_int8_compiles_without_graph_breaks():
    from sam_fast.models import TinyViT

    enc = TinyViT(img_size=128, embed_dims=(16, 32, 40, 40), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2),
                  window_sizes=(7, 7, 7, 7)).eval()
    cal = calibrate(enc, IMAGES[:1], num_images=1, progress=False)
    x = _batch(enc, IMAGES[:2])
    with torch.no_grad(), sam_fast.apply(enc, SamFastConfig(attention="none", quantize="int8", calibration=cal)):
        eager = enc(x)
        torch._dynamo.reset()
        traced = torch.compile(enc, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(traced, eager)


# ---- consistency of apply / undo / load_state_dict, and scale checks ----

def _linears(enc):
    return {s.key: s.module for s in sam_fast.quantize.eligible_linears(enc)}


def test_undo_after_loading_int8_weights_gives_the_loaded_model():
    """apply(int8) -> load another model's int8 state_dict -> undo(): the float linears come back holding the
    loaded (dequantized) weights, consistent with the loaded norms and embeddings, not the pre-load ones."""
    a, b = tiny_image_encoder(seed=0), tiny_image_encoder(seed=7)
    x = _batch(a, IMAGES[:1])
    with torch.no_grad():
        want = b(x)
    cfg = SamFastConfig(attention="none", quantize="int8", backend="reference")
    with sam_fast.apply(b, cfg):
        sd_b = b.state_dict()
        deq = {k: (m.dequantized_weight(), m.bias.clone()) for k, m in _linears(b).items()}
    handle = sam_fast.apply(a, cfg)
    a.load_state_dict(sd_b)
    handle.undo()
    for key, lin in _linears(a).items():
        assert isinstance(lin, nn.Linear)
        assert torch.equal(lin.weight, deq[key][0]) and torch.equal(lin.bias, deq[key][1]), key
    with torch.no_grad():
        assert sqnr_db(want, a(x)) >= INT8_EMBEDDING_MIN_SQNR_DB  # was ~0 dB: a hybrid of two models


def test_undo_follows_a_device_or_dtype_move_and_is_exact_otherwise():
    enc = tiny_image_encoder(seed=1)
    before = {k: m.weight.detach().clone() for k, m in _linears(enc).items()}
    handle = sam_fast.apply(enc, SamFastConfig(attention="none", quantize="int8"))
    handle.undo()
    assert all(torch.equal(m.weight, before[k]) for k, m in _linears(enc).items())  # bit for bit
    handle = sam_fast.apply(enc, SamFastConfig(attention="none", quantize="int8"))
    enc.to(torch.bfloat16)
    handle.undo()
    for k, m in _linears(enc).items():  # as if the float model had been cast
        assert m.weight.dtype == torch.bfloat16 and torch.equal(m.weight, before[k].bfloat16()), k


def test_float_state_dict_is_not_cast_into_int8_buffers():
    enc = tiny_image_encoder(seed=2)
    float_sd = {k: v.clone() for k, v in enc.state_dict().items()}
    with sam_fast.apply(enc, SamFastConfig(attention="none", quantize="int8")):
        int8_before = {k: v.clone() for k, v in enc.state_dict().items() if v.dtype == torch.int8}
        with pytest.raises(RuntimeError, match=r"blocks\.0\.attn\.qkv\.weight: the state_dict holds a torch\.float32 "
                                               r"weight.*load float checkpoints before sam_fast\.apply"):
            enc.load_state_dict(float_sd, strict=False)
        after = enc.state_dict()
        assert all(torch.equal(after[k], v) for k, v in int8_before.items())


def _ids(model):
    return [(name, id(m)) for name, m in model.named_modules()]


@pytest.mark.parametrize("trigger", ["nan static scale", "nan weight in block 2"])
def test_failed_apply_leaves_the_model_unchanged(calibrated, trigger):
    import copy

    enc, cal = calibrated
    cal = copy.deepcopy(cal)
    model = copy.deepcopy(enc)
    if trigger == "nan static scale":
        cal.layers["blocks.2.mlp.lin2"].static_scale = float("nan")  # entries are mutable
        match = r"blocks\.2\.mlp\.lin2: static_scale must be a positive finite number"
    else:
        with torch.no_grad():
            model.blocks[2].mlp.lin1.weight[0, 0] = float("nan")
        match = r"blocks\.2\.mlp\.lin1: weight holds NaN"
    before = _ids(model)
    with pytest.raises(ValueError, match=match):
        sam_fast.apply(model, SamFastConfig(attention="exact", quantize="int8", calibration=cal))
    assert _ids(model) == before  # blocks 0-1 were swapped before the error: put back
    assert not any(isinstance(m, (sam_fast.nn.SamFastBlock, Int8Linear)) for m in model.modules())


def test_tensor_scales_are_checked_like_float_ones(calibrated):
    import copy

    from sam_fast.quantize import LayerCalibration

    lin = nn.Linear(32, 24)
    wq, ws = sam_fast.quantize.quantize_weight(lin.weight.detach())
    x = torch.randn(5, 32)
    for bad in (torch.tensor(0.0), torch.tensor(-1.0), torch.tensor(float("nan")), torch.tensor(float("inf"))):
        with pytest.raises(ValueError, match="act_scale must be a positive finite scale"):
            sam_fast.int8_linear(x, wq, ws, act_scale=bad)
        with pytest.raises(ValueError, match="out_scale must be a positive finite scale"):
            sam_fast.int8_linear(x, wq, ws, out_dtype=torch.int8, out_scale=bad)
        with pytest.raises(ValueError, match="act_scale must be a positive finite scale"):
            Int8Linear.from_float(lin, act_scale=bad)
    xq, xs = sam_fast.quantize_per_token(x)
    xs[2] = 0.0
    with pytest.raises(ValueError, match=r"act_scale \(per token\) must be positive"):
        sam_fast.int8_linear(xq, wq, ws, act_scale=xs)
    # a state_dict with a negative act_scale (or weight scale) is refused, naming the key
    q = Int8Linear.from_float(lin, act_scale=0.05)
    sd = q.state_dict()
    sd["act_scale"] = torch.tensor(-0.05)
    with pytest.raises(RuntimeError, match=r"act_scale: 1 of 1 values are not positive and finite"):
        q.load_state_dict(sd)
    sd = q.state_dict()
    sd["weight_scale"] = sd["weight_scale"].clone()
    sd["weight_scale"][3] = 0.0
    with pytest.raises(RuntimeError, match=r"weight_scale: 1 of 24 values"):
        q.load_state_dict(sd)
    assert float(q.act_scale) == pytest.approx(0.05)  # nothing was loaded
    # calibration entries: a scale that saturates the calibrated range, an unknown mode
    enc, cal = calibrated
    cal = copy.deepcopy(cal)
    entry = cal.layers["blocks.1.mlp.lin2"]
    with pytest.raises(ValueError, match="static_scale 1e-30 covers only"):
        LayerCalibration(**{**entry.__dict__, "static_scale": 1e-30})
    with pytest.raises(ValueError, match="mode must be one of"):
        LayerCalibration(**{**entry.__dict__, "mode": "int4"})
    d = cal.to_dict()
    d["layers"][0]["mode"] = "int4"
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv: mode must be one of"):
        Calibration.from_dict(d)
    entry.static_scale = 1e-30
    model = copy.deepcopy(enc)
    with pytest.raises(ValueError, match="would saturate"):
        sam_fast.apply(model, SamFastConfig(quantize="int8", calibration=cal))
    assert not any(isinstance(m, Int8Linear) for m in model.modules())


# ------------------------------------------------------------------------------------------------
# CUDA at SAM's real shapes (pytest -m gpu)
# ------------------------------------------------------------------------------------------------

@gpu
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


@gpu
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
    got = check_fused_bf16_encoder(enc, x)  # enc is bf16 from here on
    cal = calibrate(enc, [skimage.data.astronaut(), skimage.data.coffee()], progress=False)
    with torch.no_grad():
        with sam_fast.apply(enc, sam_fast.SamFastConfig(attention="exact", quantize="int8", calibration=cal)):
            with sam_fast.record_backends() as rec:
                out = enc(x.bfloat16())
    assert rec.backends() == {"triton"} and not rec.fallbacks
    assert sqnr_db(got.float(), out.float()) >= INT8_EMBEDDING_MIN_SQNR_DB


@gpu
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


@pytest.mark.cpu_int8_bf16_attention
def test_int8_model_runs_its_attention_in_bf16_where_the_cpu_multiplies_bf16(monkeypatch):
    """On a CPU with bf16 arithmetic (AVX512-BF16 or AMX) a float32 int8 model's SAM blocks take bf16 qkv from the int8
    GEMM into the C++ block kernel, and the int8 projection writes float32 again; the embedding stays as close to
    the float model as the float32-attention int8 model (within 1 dB). Elsewhere, or with the policy's
    int8_attention_bf16 off, the attention stays float32."""
    from sam_fast import cpu_policy
    from sam_fast.models import tiny_sam
    from sam_fast.nn import attention as attention_module
    from sam_fast.ops.dilated_attention_cpu import compute_dtype

    seen = []
    real = attention_module.sam_block_attention

    def spy(qkv, *args, **kwargs):
        seen.append(qkv.dtype)
        return real(qkv, *args, **kwargs)

    monkeypatch.setattr(attention_module, "sam_block_attention", spy)
    model = tiny_sam().eval()
    enc = model.image_encoder
    x = _batch(enc, IMAGES[:1])
    with torch.no_grad(), cpu_policy.use(int8_min_in_features=0, sam_block_min_keys=16, plain_max_tokens=0):
        ref = enc(x)
        sam_fast.apply(enc, SamFastConfig("exact", quantize="int8"))
        with cpu_policy.use(int8_attention_bf16=False):
            out32 = enc(x)
        assert set(seen) == {torch.float32}
        seen.clear()
        out = enc(x)
    hardware = compute_dtype(torch.bfloat16) == torch.bfloat16
    assert set(seen) == ({torch.bfloat16} if hardware else {torch.float32})
    assert out.dtype == torch.float32
    assert sqnr_db(ref, out) >= sqnr_db(ref, out32) - 1.0
    if not hardware:
        assert torch.equal(out, out32)
