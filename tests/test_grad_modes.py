"""Every op and module works under ``torch.inference_mode()`` (the idiom most inference code uses), ``torch.no_grad()``
and grad mode, in any order in one process.

Two ways this broke: a C++ op calling ATen inside its parallel loop, where OpenMP's worker threads do not share the
caller's grad or inference mode (an int8 encoder failed under inference_mode with "Inference tensors cannot be saved
for backward"), and a tensor cached between calls (an int32 workspace, index tables, layouts) that was created under
inference_mode and then written or saved for backward outside it. Inputs are made inside each mode, as a caller's
would be, and large enough that the C++ ops run on several threads.
"""

import contextlib

import pytest
import torch

import sam_fast
from sam_fast import Branch
from sam_fast.models import tiny_image_encoder, tiny_sam
from sam_fast.quantize import calibrate

MODES = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "grad": contextlib.nullcontext}
ORDERS = [("inference_mode", "no_grad", "grad"), ("grad", "inference_mode", "no_grad")]


def _encoder():
    enc = tiny_image_encoder(img_size=256, embed_dim=256, num_heads=4, depth=2, window_size=7,
                             global_attn_indexes=(1,)).eval()
    return enc


def _images(n=2, size=256):
    return [torch.randn(3, size, size, generator=torch.Generator().manual_seed(s)) for s in range(n)]


@pytest.fixture(scope="module")
def calibration():
    return calibrate(_encoder(), _images(), progress=False)


@pytest.mark.parametrize("order", ORDERS, ids="-then-".join)
@pytest.mark.parametrize("config", ["exact", "dilated", "int8", "int8_static"])
def test_patched_encoder_in_every_grad_mode(config, order, calibration, cpu_rules):
    cpu_rules(epilogue_min_bytes=0)  # the fused epilogues on this small model too
    enc = _encoder()
    with torch.no_grad():
        want = enc(_images(1)[0][None])
    cfg = {"exact": sam_fast.SamFastConfig(attention="exact"),
           "dilated": sam_fast.SamFastConfig(attention=sam_fast.Dilated(Branch((16, 16)), blocks=[1])),
           "int8": sam_fast.SamFastConfig(attention="exact", quantize="int8"),
           "int8_static": sam_fast.SamFastConfig(attention="exact", quantize=sam_fast.Int8(calibration))}[config]
    sam_fast.apply(enc, cfg)
    for mode in order:
        with MODES[mode]():
            x = _images(1)[0][None].clone()  # made inside the mode (an inference tensor under inference_mode)
            got = enc(x)
        assert got.shape == want.shape and torch.isfinite(got).all(), mode
        db = 60 if config in ("exact", "dilated") else 25
        assert sam_fast.quantize.sqnr_db(want, got.detach()) > db, mode


@pytest.mark.parametrize("mode", list(MODES))
def test_ops_in_every_grad_mode(mode):
    with MODES[mode]():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(300, 96, generator=g)
        q, s = sam_fast.quantize_per_token(x)
        ln_w, ln_b = torch.ones(96), torch.zeros(96)
        lq, ls = sam_fast.layer_norm_quantize(x, ln_w, ln_b, 1e-6)
        w = torch.randint(-127, 128, (64, 96), dtype=torch.int8, generator=g)
        y = sam_fast.int8_linear(x, w, torch.full((64,), 0.01), torch.zeros(64), activation="gelu")
        y8 = sam_fast.int8_linear(x, w, torch.full((64,), 0.01), None, act_scale=0.05)
        t = sam_fast.resize_rel_pos(torch.randn(27, 16, generator=g), 55)
        qkv = torch.randn(1, 256, 3, 4, 16, generator=g)
        th, tw = torch.randn(31, 16, generator=g), torch.randn(31, 16, generator=g)
        o = sam_fast.dilated_attention(*qkv.unbind(2), Branch((16, 16)), grid=(16, 16), rel_pos_h=th, rel_pos_w=tw)
        post = sam_fast.mask_postprocess(torch.randn(3, 64, 64, generator=g), input_size=(256, 200),
                                         original_size=(512, 400))
    for out in (q, s, lq, ls, y, y8, t, o, post.stability_score):
        assert not out.is_floating_point() or torch.isfinite(out).all()


@pytest.mark.parametrize("order", ORDERS, ids="-then-".join)
def test_predictor_in_every_grad_mode(order):
    import numpy as np

    sam = tiny_sam()
    predictor = sam_fast.SamFastPredictor(sam)
    image = np.random.default_rng(0).integers(0, 255, (200, 240, 3), dtype=np.uint8)
    results = []
    for mode in order:
        with MODES[mode]():
            predictor.set_image(image)
            masks, scores, _ = predictor.predict(point_coords=np.array([[100, 120]]), point_labels=np.array([1]))
        results.append((masks, scores))
    for masks, scores in results[1:]:
        assert np.array_equal(masks, results[0][0]) and np.allclose(scores, results[0][1], atol=1e-5)
