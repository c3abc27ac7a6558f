"""SAM 2's prompt encoder + mask decoder in BatchedMaskDecoder, and Sam2FastPredictor against Meta's
SAM2ImagePredictor (random-initialised SAM 2.1 Hiera-T, Meta's classes)."""

import copy

import numpy as np
import pytest
import torch
from devices import gpu
from skimage import data

import sam_fast
from sam_fast.nn.decoder import BatchedMaskDecoder
from sam_fast.ops.upscale_mask_product import upscale_mask_product
from sam_fast.reference import upscale_mask_product as reference
from sam_fast.testing import FWD_FACTOR, check_against_reference

pytest.importorskip("sam2")


@pytest.fixture(scope="module")
def sam2():
    """SAM 2.1 as Meta builds it (decoder at full size) with a tiny Hiera trunk: the predictor's real feature sizes."""
    from sam_fast.models.sam2 import tiny_sam2

    return tiny_sam2()


def _features(I, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(I, 256, 64, 64, generator=g), torch.randn(I, 32, 256, 256, generator=g),
            torch.randn(I, 64, 128, 128, generator=g))


# -- the fused kernel's skip input ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_upscale_mask_product_adds_each_prompts_skip_features(dtype):
    """The Triton kernel (interpreter) with SAM 2's high-resolution skip, read per prompt's image through the
    index, vs the float64 definition."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 16, 6, 5, generator=g)
    weight = torch.randn(16, 8, 2, 2, generator=g) * 0.3
    bias = torch.randn(8, generator=g)
    hyper = torch.randn(5, 3, 8, generator=g) * 0.3
    skip = torch.randn(2, 8, 12, 10, generator=g)
    index = torch.tensor([1, 0, 0, 1, 1])
    args = [t.to(dtype) for t in (x, weight, bias, hyper, skip)]
    with sam_fast.record_backends() as rec:
        got = upscale_mask_product(*args[:4], args[4], index, backend="triton")
    assert rec.calls == [("upscale_mask_product", "triton")]
    exact = reference.upscale_mask_product(*[a.double() for a in args], index)
    same_precision = upscale_mask_product(*args[:4], args[4], index, backend="reference")
    check_against_reference("upscale_mask_product", got, exact, same_precision, dtype, FWD_FACTOR)
    no_skip = reference.upscale_mask_product(*[a.double() for a in args[:4]])
    assert (exact - no_skip).abs().max() > 0.1  # the skip term is there


def test_upscale_mask_product_skip_is_checked_by_name():
    x, w, b, hyper = torch.randn(2, 4, 3, 3), torch.randn(4, 8, 2, 2), torch.randn(8), torch.randn(2, 1, 8)
    skip = torch.randn(1, 8, 6, 6)
    with pytest.raises(ValueError, match="skip and skip_index must be given together"):
        upscale_mask_product(x, w, b, hyper, skip)
    with pytest.raises(ValueError, match=r"skip must have shape \(I, 8, 6, 6\)"):
        upscale_mask_product(x, w, b, hyper, torch.randn(1, 8, 3, 3), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="skip_index must be int64 or int32"):
        upscale_mask_product(x, w, b, hyper, skip, torch.zeros(2))
    with pytest.raises(ValueError, match=r"skip_index must be a \(2,\) tensor"):
        upscale_mask_product(x, w, b, hyper, skip, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"skip_index must lie in \[0, 1\), got values in \[0, 1\]"):
        upscale_mask_product(x, w, b, hyper, skip, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="skip must have x's dtype"):
        upscale_mask_product(x, w, b, hyper, skip.half(), torch.zeros(2, dtype=torch.int64))


# -- the decoder --------------------------------------------------------------------------------------------

def _meta_decode(model, feats, index, coords, labels, masks_in, multimask, dtype):
    """Meta's prompt encoder + mask decoder, one prompt at a time, as SAM2ImagePredictor._predict calls them."""
    emb, s0, s1 = (f.to(dtype) for f in feats)
    lows, ious, objs = [], [], []
    for p in range(index.shape[0]):
        i = int(index[p])
        points = None if coords is None else (coords[p:p + 1].to(dtype), labels[p:p + 1])
        sparse, dense = model.sam_prompt_encoder(points=points, boxes=None,
                                                 masks=None if masks_in is None else masks_in[p:p + 1].to(dtype))
        lo, io, _, ob = model.sam_mask_decoder(
            image_embeddings=emb[i:i + 1], image_pe=model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask,
            repeat_image=False, high_res_features=[s0[i:i + 1], s1[i:i + 1]])
        lows.append(lo)
        ious.append(io)
        objs.append(ob)
    return torch.cat(lows), torch.cat(ious), torch.cat(objs)


@pytest.mark.parametrize("kind", ["points", "box+points", "mask+points"])
@pytest.mark.parametrize("multimask", [True, False])
def test_batched_decoder_matches_metas_sam2_decoder(sam2, kind, multimask):
    """Masks, IoU and object scores of prompts over several images (unsorted, box corners as labels 2 / 3, mask
    inputs) vs Meta's decoder in float64, by the tolerance rule; multimask off exercises the stability choice."""
    feats = _features(2)
    g = torch.Generator().manual_seed(2)
    index = torch.tensor([1, 0, 0, 1, 1])
    P = len(index)
    coords = torch.rand(P, 2, 2, generator=g) * 1024
    labels = torch.randint(0, 2, (P, 2), generator=g, dtype=torch.int32)
    if kind == "box+points":
        corners = torch.rand(P, 2, 2, generator=g).sort(dim=1).values * 1024
        coords = torch.cat([corners, coords], dim=1)
        labels = torch.cat([torch.tensor([[2, 3]], dtype=torch.int32).expand(P, 2), labels], dim=1)
    masks_in = torch.randn(P, 1, 256, 256, generator=g) * 4 if kind == "mask+points" else None
    dec = BatchedMaskDecoder.from_sam(sam2)  # the fused kernel's skip input: tested above, under the interpreter
    assert dec.is_sam2
    with sam_fast.record_backends() as rec:
        got = dec(feats[0], index, coords, labels, None, masks_in, multimask, high_res_features=feats[1:],
                  return_object_scores=True)
    assert rec.backends("upscale_mask_product") == {"reference"}
    ref_model = copy.deepcopy(sam2).double()
    pe = ref_model.sam_prompt_encoder.pe_layer  # Meta casts coordinates to float32 for it
    pe.positional_encoding_gaussian_matrix = pe.positional_encoding_gaussian_matrix.float()
    ref = _meta_decode(ref_model, feats, index, coords, labels, masks_in, multimask, torch.float64)
    own = _meta_decode(sam2, feats, index, coords, labels, masks_in, multimask, torch.float32)
    M = 3 if multimask else 1
    assert got[0].shape == (P, M, 256, 256) and got[1].shape == (P, M) and got[2].shape == (P, 1)
    for name, a, r, o in zip(("logits", "iou", "object score"), got, ref, own):
        err = (a.double() - r).abs().max().item()
        own_err = (o.double() - r).abs().max().item()
        assert err <= FWD_FACTOR * own_err + 1e-6, (name, err, own_err)


def test_single_mask_choice_is_sam2s(sam2):
    """The stability choice among multimask outputs (single mask asked for) picks what Meta's decoder picks, on
    logits made to be stable for some prompts and not for others."""
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(6, 4, 32, 32, generator=g)
    logits[:3, 0] = torch.where(logits[:3, 0] > 0, 5.0, -5.0)  # far from +-delta: stable
    logits[4, 0] = 0.01 * logits[4, 0]  # most pixels within +-delta: unstable
    iou = torch.rand(6, 4, generator=g)
    got = BatchedMaskDecoder.from_sam(sam2)._stable_single_mask(logits, iou)
    want = sam2.sam_mask_decoder._dynamic_multimask_via_stability(logits, iou)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    chosen_single = (got[1][:, 0] == iou[:, 0]).tolist()
    assert chosen_single[:3] == [True] * 3 and not chosen_single[4]


def test_batched_decoder_sam2_errors(sam2):
    dec = BatchedMaskDecoder.from_sam(sam2)
    emb, s0, s1 = _features(1)
    one = torch.zeros(1, dtype=torch.int64)
    pts, lab = torch.zeros(1, 1, 2), torch.ones(1, 1, dtype=torch.int)
    with pytest.raises(ValueError, match="needs high_res_features"):
        dec(emb, one, pts, lab)
    with pytest.raises(ValueError, match=r"feat_s1 must have shape \(1, 64, 128, 128\)"):
        dec(emb, one, pts, lab, high_res_features=(s0, s0))
    with pytest.raises(TypeError, match="feat_s0 must be a float tensor"):
        dec(emb, one, pts, lab, high_res_features=(s0.long(), s1))
    with pytest.raises(ValueError, match="feat_s1 must be on meta with image_embeddings"):
        dec(emb.to("meta"), one.to("meta"), pts, lab, high_res_features=(s0.to("meta"), s1))
    with pytest.raises(ValueError, match=r"2 / 3 \(box corners\).*got values in \[1, 4\]"):
        dec(emb, torch.zeros(2, dtype=torch.int64), torch.zeros(2, 1, 2), torch.tensor([[1], [4]]),
            high_res_features=(s0, s1))
    low, iou, obj = dec(emb, torch.zeros(0, dtype=torch.int64), high_res_features=(s0, s1),
                        return_object_scores=True)
    assert low.shape == (0, 3, 256, 256) and iou.shape == (0, 3) and obj.shape == (0, 1)


def test_batched_decoder_sam2_hooks_run_metas_modules(sam2):
    """With a hook on the decoder, Meta's own modules run (the hook sees them) and give the fused path's result."""
    dec = BatchedMaskDecoder.from_sam(sam2)
    emb, s0, s1 = _features(2, seed=4)
    index = torch.tensor([0, 1, 1])
    pts = torch.rand(3, 1, 2, generator=torch.Generator().manual_seed(5)) * 1024
    lab = torch.ones(3, 1, dtype=torch.int)
    fused = dec(emb, index, pts, lab, high_res_features=(s0, s1), return_object_scores=True)
    seen = []
    handle = sam2.sam_mask_decoder.register_forward_hook(lambda *a: seen.append(1))
    try:
        with sam_fast.record_backends() as rec:
            hooked = dec(emb, index, pts, lab, high_res_features=(s0, s1), return_object_scores=True)
    finally:
        handle.remove()
    assert len(seen) == 2 and rec.fallbacks
    for a, b in zip(fused, hooked):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# -- the predictor -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def photos(sam2):
    """Two photos and Meta's image features of both, computed once (the encoder is not what is tested here)."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    images = [np.ascontiguousarray(data.astronaut()[::3, ::4]), np.ascontiguousarray(data.coffee()[::2, ::2])]
    meta = SAM2ImagePredictor(sam2)
    meta.set_image_batch(images)
    return images, meta._features


def _set(predictor, images, features, i=None):
    """The state set_image / set_image_batch leave, from precomputed features."""
    predictor.reset_predictor()
    if i is None:
        predictor._features, predictor._orig_hw, predictor._is_batch = features, [im.shape[:2] for im in images], True
    else:
        predictor._features = {"image_embed": features["image_embed"][i:i + 1],
                               "high_res_feats": [f[i:i + 1] for f in features["high_res_feats"]]}
        predictor._orig_hw = [images[i].shape[:2]]
    predictor._is_image_set = True


def _near_threshold_only(got, want, logits):
    diff = got != want
    assert (np.abs(logits[diff]) < 1e-3).all()
    assert diff.mean() < 1e-3


def _cases(H, W):
    return [
        dict(point_coords=np.array([[W * 0.3, H * 0.6]]), point_labels=np.array([1])),
        dict(point_coords=np.array([[W * 0.3, H * 0.6], [W * 0.8, H * 0.1]]), point_labels=np.array([1, 0])),
        dict(box=np.array([W * 0.1, H * 0.2, W * 0.7, H * 0.9])),
        dict(point_coords=np.array([[W * 0.5, H * 0.5]]), point_labels=np.array([1]),
             box=np.array([-20, -10, W + 30, H * 0.5])),
        # several objects at once (SAM 2's "batched mode": boxes (B, 4), points (B, n, 2))
        dict(point_coords=np.array([[[W * 0.2, H * 0.3]], [[W * 0.6, H * 0.7]]]), point_labels=np.array([[1], [1]]),
             box=np.array([[0, 0, W * 0.5, H * 0.5], [W * 0.4, H * 0.4, W, H]])),
    ]


@pytest.mark.parametrize("multimask", [True, False])
def test_predictor_matches_sam2_image_predictor(sam2, photos, multimask):
    """predict: masks, IoU and low-res logits for points, boxes, box + points, several objects and a mask input
    from the previous round equal SAM2ImagePredictor's on the same image features."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    images, features = photos
    meta, fast = SAM2ImagePredictor(sam2), sam_fast.SamFastPredictor(sam2)
    assert isinstance(fast, sam_fast.Sam2FastPredictor)
    _set(meta, images, features, 0)
    _set(fast, images, features, 0)
    H, W = images[0].shape[:2]
    with sam_fast.record_backends() as rec:
        for kw in _cases(H, W):
            m_ref, iou_ref, low_ref = meta.predict(multimask_output=multimask, **kw)
            m, iou, low = fast.predict(multimask_output=multimask, **kw)
            logits = meta.predict(multimask_output=multimask, return_logits=True, **kw)[0]
            assert m.shape == m_ref.shape and m.dtype == m_ref.dtype
            np.testing.assert_allclose(iou, iou_ref, atol=1e-4)
            np.testing.assert_allclose(low, low_ref, atol=2e-3, rtol=1e-4)
            _near_threshold_only(m, m_ref, logits)
            np.testing.assert_allclose(fast.predict(multimask_output=multimask, return_logits=True, **kw)[0], logits,
                                       atol=2e-3, rtol=1e-4)
            prev = low_ref[:1] if low_ref.ndim == 3 else low_ref[:, :1]
            mine = low[:1] if low.ndim == 3 else low[:, :1]
            m2_ref = meta.predict(mask_input=prev, multimask_output=multimask, **kw)
            m2 = fast.predict(mask_input=mine, multimask_output=multimask, **kw)
            np.testing.assert_allclose(m2[1], m2_ref[1], atol=1e-4)
            logits2 = meta.predict(mask_input=prev, multimask_output=multimask, return_logits=True, **kw)[0]
            _near_threshold_only(m2[0], m2_ref[0], logits2)
    assert ("mask_postprocess", "cpu") in rec.calls
    assert any(op == "upscale_mask_product" for op, _ in rec.calls)


def test_predict_batch_decodes_all_images_together(sam2, photos, monkeypatch):
    """predict_batch: SAM2ImagePredictor's results per image, from one decoder call per prompt structure."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    images, features = photos
    meta, fast = SAM2ImagePredictor(sam2), sam_fast.SamFastPredictor(sam2)
    _set(meta, images, features)
    _set(fast, images, features)
    kw = dict(point_coords_batch=[np.array([[50.0, 60.0], [100, 20]]), np.array([[200.0, 100.0], [10, 30]])],
              point_labels_batch=[np.array([1, 0]), np.array([1, 1])],
              box_batch=[np.array([10.0, 10, 120, 150]), np.array([30.0, 20, 300, 200])])
    calls = []
    forward = fast.decoder.forward
    monkeypatch.setattr(fast.decoder, "forward", lambda *a, **k: calls.append(a[1].tolist()) or forward(*a, **k))
    got = fast.predict_batch(**kw)
    want = meta.predict_batch(**kw)
    logits = meta.predict_batch(**kw, return_logits=True)[0]
    assert calls == [[0, 1]]
    for i in range(2):
        np.testing.assert_allclose(got[1][i], want[1][i], atol=1e-4)
        np.testing.assert_allclose(got[2][i], want[2][i], atol=2e-3, rtol=1e-4)
        _near_threshold_only(got[0][i], want[0][i], logits[i])
    with pytest.raises(ValueError, match=r"box_batch must hold one entry per image set \(2\), got 1"):
        fast.predict_batch(box_batch=[np.array([1.0, 2, 3, 4])])


def test_coco_records_are_the_predicted_masks(sam2, photos):
    """coco_records: per image set, each prompt's masks as COCO records whose decoded masks, IoU and boxes are
    predict's; an image without prompts gets none."""
    from sam_fast.ops.mask_postprocess import coco_to_mask

    images, features = photos
    fast = sam_fast.SamFastPredictor(sam2)
    _set(fast, images, features)
    prompt = dict(point_coords=np.array([[[60.0, 40.0]], [[150.0, 90.0]]]), point_labels=np.array([[1], [0]]),
                  boxes=np.array([[10.0, 10, 120, 150], [50, 30, 200, 170]]))
    records = fast.coco_records([prompt, {}])
    assert len(records[0]) == 6 and records[1] == []
    _set(fast, images, features, 0)
    masks, iou, _ = fast.predict(prompt["point_coords"], prompt["point_labels"], prompt["boxes"])
    for k in range(2):
        for m in range(3):
            r = records[0][3 * k + m]
            assert np.array_equal(coco_to_mask(r["segmentation"]), masks[k, m])
            assert r["predicted_iou"] == pytest.approx(float(iou[k, m]), abs=1e-6)
            assert r["area"] == int(masks[k, m].sum()) and r["box_prompt"] == prompt["boxes"][k].tolist()
            assert r["point_coords"] == prompt["point_coords"][k].tolist()


def test_predictor_under_autocast_as_sam2_runs_it(sam2, photos):
    """SAM 2's examples run the predictor under torch.autocast(bfloat16): the fused decoder then computes in bf16 as
    Meta's modules do; its logits stay within bf16 rounding of Meta's and its IoU predictions match."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    images, features = photos
    meta, fast = SAM2ImagePredictor(sam2), sam_fast.SamFastPredictor(sam2)
    _set(meta, images, features, 1)
    _set(fast, images, features, 1)
    kw = dict(point_coords=np.array([[40.0, 60.0], [150, 100]]), point_labels=np.array([1, 0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = meta.predict(**kw)
        got = fast.predict(**kw)
    scale = np.abs(want[2]).max()
    assert np.abs(got[2] - want[2]).max() <= 0.03 * scale
    np.testing.assert_allclose(got[1], want[1], atol=0.02)
    assert (got[0] != want[0]).mean() < 0.01


def test_predictor_errors_are_named(sam2, photos):
    images, features = photos
    fast = sam_fast.SamFastPredictor(sam2)
    with pytest.raises(RuntimeError, match="set_image"):
        fast.predict(point_coords=np.array([[1.0, 2.0]]), point_labels=np.array([1]))
    _set(fast, images, features, 0)
    with pytest.raises(ValueError, match="point_coords and point_labels must be given together"):
        fast.predict(point_coords=np.array([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="point_labels must be whole numbers"):
        fast.predict(point_coords=np.array([[1.0, 2.0]]), point_labels=np.array([0.5]))
    with pytest.raises(ValueError, match="2 boxes and 1 point sets"):
        fast.predict(point_coords=np.array([[[1.0, 2.0]]]), point_labels=np.array([[1]]),
                     box=np.array([[0, 0, 5, 5], [1, 1, 6, 6.0]]))
    with pytest.raises(ValueError, match="needs point_coords, box or mask_input"):
        fast.predict()
    with pytest.raises(ValueError, match=r"box must be \(4,\) or \(B, 4\) XYXY, got shape \(3,\)"):
        fast.predict(box=np.array([1.0, 2, 3]))
    with pytest.raises(ValueError, match=r"point_coords must be \(N, 2\) or \(B, N, 2\)"):
        fast.predict(point_coords=np.array([[1.0, 2.0, 3.0]]), point_labels=np.array([1]))
    with pytest.raises(ValueError, match="point_coords holds NaN"):
        fast.predict(point_coords=np.array([[np.nan, 2.0]]), point_labels=np.array([1]))
    with pytest.raises(ValueError, match=r"image must be an HxWx3 RGB array"):
        fast.set_image(np.zeros((20, 20), np.uint8))
    with pytest.raises(ValueError, match="image_list must be a non-empty list"):
        fast.set_image_batch([])
    with pytest.raises(RuntimeError, match="set_image_batch"):
        fast.predict_batch(box_batch=[np.array([1.0, 2, 3, 4])])
    with pytest.raises(ValueError, match="backend is the mask post-processing's"):
        sam_fast.SamFastPredictor(sam2, backend="triton")


# -- segment everything ---------------------------------------------------------------------------------------

EVERYTHING = {
    "plain": dict(output_mode="coco_rle"),
    "m2m": dict(output_mode="coco_rle", use_m2m=True, points_per_side=3),
    "crops-single-mask": dict(output_mode="uncompressed_rle", crop_n_layers=1, crop_n_points_downscale_factor=2,
                              multimask_output=False),
    "binary-threshold": dict(output_mode="binary_mask", mask_threshold=1.5, stability_score_offset=0.5),
}
KEEP_ALL = dict(points_per_side=4, pred_iou_thresh=-1.0, stability_score_thresh=0.0, box_nms_thresh=1.0,
                crop_nms_thresh=1.0)


def _same_records(want, got):
    """SAM2AutomaticMaskGenerator's records, in its order: the same points, crops, masks, areas and boxes; IoU
    predictions to float rounding; stability scores to 0.1% (their counts at threshold +- offset may differ by a
    pixel or two whose logit lies on those cuts, computed in another order); a mask may differ for the same reason
    in a pixel or two (0.1% of its area), and only a few masks may."""
    from pycocotools import mask as mask_utils

    def binary(seg):
        if isinstance(seg, np.ndarray):
            return seg
        if isinstance(seg["counts"], str):
            return mask_utils.decode(dict(seg, counts=seg["counts"].encode())).astype(bool)
        return mask_utils.decode(mask_utils.frPyObjects(seg, *seg["size"])).astype(bool)

    assert len(got) == len(want) > 0
    flips = 0
    for a, b in zip(want, got):
        assert a.keys() == b.keys()
        assert a["point_coords"] == b["point_coords"] and a["crop_box"] == b["crop_box"]
        assert abs(a["predicted_iou"] - b["predicted_iou"]) < 1e-5
        ma, mb = binary(a["segmentation"]), binary(b["segmentation"])
        if np.array_equal(ma, mb):
            assert a["area"] == b["area"] and a["bbox"] == b["bbox"]
            assert a["stability_score"] == pytest.approx(b["stability_score"], rel=1e-3)
        else:
            flips += 1
            assert (ma != mb).sum() <= max(2, a["area"] // 1000)
    assert flips <= max(2, len(want) // 8)


@pytest.mark.parametrize("case", EVERYTHING, ids=str)
def test_everything_gives_sam2_automatic_mask_generators_records(sam2, case):
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    image = np.ascontiguousarray(data.astronaut()[::2, ::3])
    kw = dict(KEEP_ALL, **EVERYTHING[case])
    want = SAM2AutomaticMaskGenerator(sam2, **kw).generate(image)
    fast = sam_fast.SamFastAutomaticMaskGenerator(sam2, **kw)
    assert isinstance(fast, sam_fast.Sam2FastAutomaticMaskGenerator)
    with sam_fast.record_backends() as rec:
        got = fast.generate(image)
    assert rec.backends("mask_postprocess") == {"cpu"}
    crops = 1 + 4 * kw.get("crop_n_layers", 0)
    assert fast.last_stats["decoder_calls"] == crops  # a crop's points in one call (the m2m pass is one more each)
    _same_records(want, got)


def test_everything_min_region_area_is_sam2s_hole_filling(sam2):
    """SAM 2 turns min_mask_region_area into its predictor's hole / sprinkle filling, by its CUDA extension (warning
    and skipping where that is not built): the same records, the same warning."""
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    image = np.ascontiguousarray(data.coffee()[::2, ::2])
    kw = dict(KEEP_ALL, output_mode="coco_rle", min_mask_region_area=50)
    with pytest.warns(UserWarning) as meta_warnings:
        want = SAM2AutomaticMaskGenerator(sam2, **kw).generate(image)
    with pytest.warns(UserWarning) as our_warnings:
        got = sam_fast.SamFastAutomaticMaskGenerator(sam2, **kw).generate(image)
    assert {str(w.message) for w in meta_warnings if "post-processing" in str(w.message)} == \
        {str(w.message) for w in our_warnings if "post-processing" in str(w.message)} != set()
    _same_records(want, got)


def test_everything_sam2_defaults_hierarchical_and_errors(sam2):
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    fast, meta = sam_fast.SamFastAutomaticMaskGenerator(sam2), SAM2AutomaticMaskGenerator(sam2)
    for name in ("pred_iou_thresh", "stability_score_thresh", "mask_threshold", "box_nms_thresh", "use_m2m",
                 "multimask_output", "crop_overlap_ratio", "output_mode"):
        assert getattr(fast, name) == getattr(meta, name), name
    image = np.ascontiguousarray(data.astronaut()[::2, ::3])
    two = sam_fast.SamFastAutomaticMaskGenerator(sam2, **dict(KEEP_ALL, points_per_side=8), hierarchical=True,
                                                 hierarchical_logit_thresh=2.0)
    records = two.generate(image)
    assert two.last_stats["decoder_calls"] == 2 and two.last_stats["points_skipped"] > 0 and records
    with pytest.raises(TypeError, match="use_m2m must be a bool"):
        sam_fast.SamFastAutomaticMaskGenerator(sam2, use_m2m="yes")
    with pytest.raises(ValueError, match="mask_threshold must be a finite number"):
        sam_fast.SamFastAutomaticMaskGenerator(sam2, mask_threshold=float("nan"))
    with pytest.raises(TypeError, match="unexpected keyword argument 'not_an_option'"):
        sam_fast.SamFastAutomaticMaskGenerator(sam2, not_an_option=1)
    with pytest.raises(ValueError, match="image must be an HxWx3 uint8 array"):
        fast.generate(np.zeros((5, 5), np.uint8))


# -- CUDA (pytest -m gpu): the decoder's Triton kernels under SAM 2's predictor and generator ------------------------

@gpu
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
def test_predictor_on_cuda_matches_sam2_image_predictor(autocast):
    """On CUDA (the fused upscale kernel with SAM 2's skip input, small-key attention, the CUDA post-processing), in
    float32 and under bf16 autocast as SAM 2's examples run: logits within the precision's rounding of Meta's, IoU
    predictions close, binary masks differing in under 1% of pixels."""
    import contextlib

    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from sam_fast.models.sam2 import tiny_sam2

    model = tiny_sam2().cuda()
    image = np.ascontiguousarray(data.astronaut()[::2, ::2])
    meta, fast = SAM2ImagePredictor(model), sam_fast.SamFastPredictor(model)
    context = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    H, W = image.shape[:2]
    with context:
        meta.set_image(image)
        fast._features, fast._orig_hw, fast._is_image_set = meta._features, meta._orig_hw, True
        with sam_fast.record_backends() as rec:
            for kw in _cases(H, W):
                want = meta.predict(**kw)
                got = fast.predict(**kw)
                scale = np.abs(want[2]).max()
                assert np.abs(got[2] - want[2]).max() <= (0.03 if autocast else 2e-3) * scale
                np.testing.assert_allclose(got[1], want[1], atol=0.02 if autocast else 1e-3)
                assert (got[0] != want[0]).mean() < 0.01
    assert ("upscale_mask_product", "triton") in rec.calls and ("mask_postprocess", "cuda") in rec.calls


@gpu
def test_everything_on_cuda_gives_sam2_generators_masks():
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    from sam_fast.models.sam2 import tiny_sam2

    model = tiny_sam2().cuda()
    image = np.ascontiguousarray(data.astronaut()[::2, ::3])
    kw = dict(KEEP_ALL, points_per_side=8, output_mode="uncompressed_rle")
    want = SAM2AutomaticMaskGenerator(model, **kw).generate(image)
    with sam_fast.record_backends() as rec:
        got = sam_fast.SamFastAutomaticMaskGenerator(model, **kw).generate(image)
    assert rec.backends("mask_postprocess") == {"cuda"} and rec.backends("upscale_mask_product") == {"triton"}
    assert len(got) == len(want) == 192
    same = sum(a["segmentation"] == b["segmentation"] and a["point_coords"] == b["point_coords"]
               for a, b in zip(want, got))
    assert same >= len(want) - max(2, len(want) // 20)  # the rest differ at pixels whose logit is on the threshold
