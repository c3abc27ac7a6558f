"""Int8Linear, calibration and W8A8 SAM encoders swapped by sam_fast.apply (Triton under the interpreter)."""

import pytest
import skimage.data
import torch
from torch import nn

import sam_fast
from sam_fast import Branch, SamFastConfig
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
    from sam_fast.quantize import _PIXEL_MEAN, _PIXEL_STD

    return torch.cat([prepare_image(im, enc.img_size, _PIXEL_MEAN, _PIXEL_STD, "cpu", torch.float32)
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
    x = _batch(enc)
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
    torch.testing.assert_close(traced, eager)


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
