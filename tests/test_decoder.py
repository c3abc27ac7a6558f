"""Batched mask decoder, SamFastPredictor and SamFastAutomaticMaskGenerator vs segment_anything's own."""

import copy

import numpy as np
import pytest
import torch
from devices import gpu
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from skimage import data

import sam_fast
from sam_fast.everything import (
    SamFastAutomaticMaskGenerator,
    points_inside,
    remove_small_regions,
    sample_upsampled_logits,
)
from sam_fast.models import tiny_sam
from sam_fast.nn.decoder import BatchedMaskDecoder
from sam_fast.predictor import SamFastPredictor
from sam_fast.reference.mask_postprocess import upsample_logits
from sam_fast.testing import FWD_FACTOR


@pytest.fixture(scope="module")
def sam():
    return tiny_sam()


def _photo(name, step=(2, 3)):
    return np.ascontiguousarray(getattr(data, name)()[::step[0], ::step[1], :3])


# -- the decoder ----------------------------------------------------------------------------------------

PROMPT_KINDS = {"points": (1, 0, 0), "points+box": (1, 1, 0), "box": (0, 1, 0), "points+mask": (1, 0, 1),
                "box+mask": (0, 1, 1)}


@pytest.mark.parametrize("kind", PROMPT_KINDS, ids=str)
@pytest.mark.parametrize("multimask", [True, False])
def test_batched_decoder_matches_segment_anything(sam, kind, multimask):
    pts_on, box_on, mask_on = PROMPT_KINDS[kind]
    g = torch.Generator().manual_seed(1)
    I = 3
    emb = torch.randn(I, 32, 16, 16, generator=g)
    index = torch.tensor([2, 0, 0, 1, 2, 2, 0])  # unsorted, image 1 with a single prompt
    P = len(index)
    coords = torch.rand(P, 3, 2, generator=g) * 256
    labels = torch.randint(0, 2, (P, 3), generator=g)
    boxes = torch.rand(P, 2, 2, generator=g).sort(dim=1).values.flatten(1) * 256
    masks_in = torch.randn(P, 1, 64, 64, generator=g)
    args = (coords if pts_on else None, labels if pts_on else None, boxes if box_on else None,
            masks_in if mask_on else None)

    def segment_anything(model, dtype):
        lows, ious = [], []
        for p in range(P):
            pick = [a[p:p + 1].to(dtype) if a is not None and a.is_floating_point() else
                    (a[p:p + 1] if a is not None else None) for a in args]
            sparse, dense = model.prompt_encoder(points=None if pick[0] is None else (pick[0], pick[1]),
                                                 boxes=pick[2], masks=pick[3])
            lo, io = model.mask_decoder(emb[index[p]:index[p] + 1].to(dtype), model.prompt_encoder.get_dense_pe(),
                                        sparse, dense, multimask)
            lows.append(lo)
            ious.append(io)
        return torch.cat(lows), torch.cat(ious)

    got_low, got_iou = BatchedMaskDecoder.from_sam(sam)(emb, index, *args, multimask_output=multimask)
    ref_model = copy.deepcopy(sam).double()
    pe = ref_model.prompt_encoder.pe_layer  # segment_anything casts coordinates to float32 for it
    pe.positional_encoding_gaussian_matrix = pe.positional_encoding_gaussian_matrix.float()
    ref_low, ref_iou = segment_anything(ref_model, torch.float64)
    sa_low, sa_iou = segment_anything(sam, torch.float32)
    assert got_low.shape == (P, 3 if multimask else 1, 64, 64) and got_iou.shape == (P, 3 if multimask else 1)
    # docs/maintainers/design.md's tolerance rule: error vs float64 at most 2x segment_anything's own float32 error
    # (+ eps).
    for got, ref, own in ((got_low, ref_low, sa_low), (got_iou, ref_iou, sa_iou)):
        err = (got.double() - ref).abs().max().item()
        own_err = (own.double() - ref).abs().max().item()
        assert err <= FWD_FACTOR * own_err + 1e-6, (err, own_err)


def test_batched_decoder_shares_image_work(sam, monkeypatch):
    # The first block's image-side projections run once per image, not once per prompt.
    dec = BatchedMaskDecoder.from_sam(sam)
    k_proj = sam.mask_decoder.transformer.layers[0].cross_attn_token_to_image.k_proj
    rows = []
    forward = k_proj.forward  # counted through the instance's forward: a hook would make the decoder run unfused

    def counting(x):
        rows.append(x.shape[0])
        return forward(x)

    monkeypatch.setattr(k_proj, "forward", counting)
    emb = torch.randn(2, 32, 16, 16)
    dec(emb, torch.tensor([0, 0, 0, 1, 1]), torch.rand(5, 1, 2) * 256, torch.ones(5, 1, dtype=torch.int))
    assert rows == [2]


def test_batched_decoder_zero_prompts_and_errors(sam):
    dec = BatchedMaskDecoder.from_sam(sam)
    emb = torch.randn(2, 32, 16, 16)
    low, iou = dec(emb, torch.zeros(0, dtype=torch.int64))
    assert low.shape == (0, 3, 64, 64) and iou.shape == (0, 3)
    one = torch.zeros(1, dtype=torch.int64)
    pts, lab = torch.zeros(1, 1, 2), torch.ones(1, 1, dtype=torch.int)
    with pytest.raises(ValueError, match="image_embeddings"):
        dec(torch.randn(2, 16, 16, 16), one, pts, lab)
    with pytest.raises(ValueError, match="image_index"):
        dec(emb, torch.tensor([2]), pts, lab)
    with pytest.raises(TypeError, match="image_index"):
        dec(emb, torch.zeros(1), pts, lab)
    with pytest.raises(ValueError, match="point_labels"):
        dec(emb, one, pts, None)
    with pytest.raises(ValueError, match="boxes"):
        dec(emb, one, boxes=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="mask_inputs"):
        dec(emb, one, mask_inputs=torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="needs point_coords, boxes or mask_inputs"):
        dec(emb, one)
    with pytest.raises(ValueError, match=r"image_index must lie in \[0, 2\), got values in \[-1, 0\]"):
        dec(emb, torch.tensor([0, -1]), pts.expand(2, 1, 2), lab.expand(2, 1))
    # NaN / inf prompts are named, not decoded into garbage masks
    with pytest.raises(ValueError, match="point_coords holds NaN"):
        dec(emb, one, torch.full((1, 1, 2), float("nan")), lab)
    with pytest.raises(ValueError, match="boxes holds NaN"):
        dec(emb, one, pts, lab, boxes=torch.tensor([[0.0, 0.0, float("inf"), 5.0]]))
    with pytest.raises(ValueError, match="mask_inputs holds NaN"):
        dec(emb, one, mask_inputs=torch.full((1, 1, 64, 64), float("nan")))
    # a label SAM's prompt encoder does not embed would silently decode as an unlabelled point
    with pytest.raises(ValueError, match=r"point_labels must be 1 \(foreground\).*got values in \[0, 7\]"):
        dec(emb, torch.tensor([0, 1]), pts.expand(2, 1, 2), torch.tensor([[0], [7]]))
    dec(emb, torch.tensor([0, 1]), torch.zeros(2, 2, 2), torch.tensor([[1, -1], [0, 1]]))  # -1 pads


def test_batched_decoder_loads_sam_weights(sam):
    fresh = tiny_sam(seed=5)
    dec = BatchedMaskDecoder.from_sam(fresh)
    keys = {k for k in sam.state_dict() if k.startswith(("prompt_encoder.", "mask_decoder."))}
    assert set(dec.state_dict()) == keys
    dec.load_state_dict({k: v for k, v in sam.state_dict().items() if k in keys})
    assert torch.equal(fresh.mask_decoder.iou_token.weight, sam.mask_decoder.iou_token.weight)


# -- the predictor --------------------------------------------------------------------------------------


def _near_threshold_only(got, want, logits, threshold=0.0):
    """Binary masks equal except at pixels whose logit lies within 1e-4 of the threshold."""
    diff = got != want
    assert (np.abs(logits[diff] - threshold) < 1e-4).all()
    assert diff.mean() < 1e-3


@pytest.mark.parametrize("photo", ["astronaut", "coffee"])
@pytest.mark.parametrize("multimask", [True, False])
def test_predictor_matches_sam_predictor(sam, photo, multimask):
    image = _photo(photo)
    sa, fast = SamPredictor(sam), SamFastPredictor(sam)
    sa.set_image(image)
    with sam_fast.record_backends() as rec:
        fast.set_image(image)
        H, W = image.shape[:2]
        cases = [
            dict(point_coords=np.array([[W * 0.3, H * 0.6]]), point_labels=np.array([1])),
            dict(point_coords=np.array([[W * 0.3, H * 0.6], [W * 0.8, H * 0.1]]), point_labels=np.array([1, 0])),
            dict(box=np.array([W * 0.1, H * 0.2, W * 0.7, H * 0.9])),
            dict(point_coords=np.array([[W * 0.5, H * 0.5]]), point_labels=np.array([1]),
                 box=np.array([-20, -10, W + 30, H * 0.5])),  # a box reaching outside the image
        ]
        for kw in cases:
            m_ref, iou_ref, low_ref = sa.predict(multimask_output=multimask, **kw)
            m, iou, low = fast.predict(multimask_output=multimask, **kw)
            logits, _, _ = sa.predict(multimask_output=multimask, return_logits=True, **kw)
            np.testing.assert_allclose(iou, iou_ref, atol=1e-5)
            np.testing.assert_allclose(low, low_ref, atol=1e-4)
            _near_threshold_only(m, m_ref, logits)
            # mask_input from the previous round
            m2_ref = sa.predict(mask_input=low_ref[:1], multimask_output=multimask, **kw)[0]
            m2 = fast.predict(mask_input=low[:1], multimask_output=multimask, **kw)[0]
            logits2 = sa.predict(mask_input=low_ref[:1], multimask_output=multimask, return_logits=True, **kw)[0]
            _near_threshold_only(m2, m2_ref, logits2)
            fl, _, _ = fast.predict(multimask_output=multimask, return_logits=True, **kw)
            np.testing.assert_allclose(fl, logits, atol=1e-4)
    assert ("mask_postprocess", "cpu") in rec.calls


def test_predictor_takes_prompts_as_lists(sam):
    """Prompts as plain lists (segment_anything's SamPredictor needs numpy arrays) give what arrays give."""
    image = _photo("astronaut")
    fast = SamFastPredictor(sam)
    fast.set_image(image)
    for lists, arrays in [
            (dict(point_coords=[[100, 200], [300, 50]], point_labels=[1, 0]),
             dict(point_coords=np.array([[100.0, 200.0], [300.0, 50.0]]), point_labels=np.array([1, 0]))),
            (dict(box=[10, 20, 400, 300]), dict(box=np.array([10, 20, 400, 300])))]:
        got, want = fast.predict(**lists), fast.predict(**arrays)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
    low = fast.predict(box=[10, 20, 400, 300])[2][:1]
    np.testing.assert_array_equal(fast.predict(box=[10, 20, 400, 300], mask_input=low.tolist())[2],
                                  fast.predict(box=[10, 20, 400, 300], mask_input=low)[2])


def test_predictor_sees_the_model_as_it_is_at_call_time():
    """Replacing sam.mask_decoder after the predictor was made: segment_anything's predictor uses the new
    decoder, and so must ours (it used the one captured at construction)."""
    model = tiny_sam(seed=1)
    image = _photo("astronaut")
    sa, fast = SamPredictor(model), SamFastPredictor(model)
    sa.set_image(image)
    fast.set_image(image)
    kw = dict(point_coords=np.array([[100.0, 80.0]]), point_labels=np.array([1]))
    before = fast.predict(**kw)[1]
    model.mask_decoder = tiny_sam(seed=9).mask_decoder
    want, got = sa.predict(**kw)[1], fast.predict(**kw)[1]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(got, before, atol=1e-3)


def test_threads_sharing_a_predictor_get_their_own_image():
    """Two threads set different images on one predictor, then both predict: each gets its own image's
    masks (the image state is per thread), as a predictor per thread would give."""
    import threading

    model = tiny_sam(seed=2)
    images = [_photo("astronaut"), _photo("coffee")]
    kw = dict(point_coords=np.array([[60.0, 50.0]]), point_labels=np.array([1]))
    want = []
    for image in images:
        p = SamFastPredictor(model)
        p.set_image(image)
        with sam_fast.record_backends() as one_call:
            want.append(p.predict(**kw))
    shared = SamFastPredictor(model)
    both_set = threading.Barrier(2)
    got, errors = [None, None], []

    def work(i):
        try:
            shared.set_image(images[i])
            both_set.wait(timeout=60)  # both images set before either predicts
            with sam_fast.record_backends() as rec:
                got[i] = shared.predict(**kw)
            assert rec.calls == one_call.calls  # this thread's op calls only
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for i in range(2):
        for a, b in zip(got[i], want[i]):
            np.testing.assert_array_equal(a, b)
    assert not shared.is_image_set  # the main thread set nothing
    with pytest.raises(RuntimeError, match="An image must be set"):
        shared.predict(**kw)


def test_predict_batch_matches_per_image(sam):
    images = [_photo("astronaut"), _photo("chelsea", (3, 2)), _photo("rocket", (4, 4))]
    fast = SamFastPredictor(sam)
    fast.set_images(images, batch_size=2)
    g = np.random.default_rng(0)
    prompts = [
        {"point_coords": g.random((5, 1, 2)) * 150, "point_labels": np.ones((5, 1))},
        {},  # zero prompts for this image
        {"point_coords": g.random((4, 2, 2)) * 100, "point_labels": np.ones((4, 2)),
         "boxes": np.array([[10, 10, 90, 80]] * 4)},
    ]
    out = fast.predict_batch(prompts)
    assert out[1]["masks"].shape == (0, 3) + images[1].shape[:2]
    single = SamFastPredictor(sam)
    for i in (0, 2):
        single.set_image(images[i])
        coords = single.transform.apply_coords(prompts[i]["point_coords"], images[i].shape[:2])
        boxes = prompts[i].get("boxes")
        if boxes is not None:
            boxes = torch.as_tensor(single.transform.apply_boxes(boxes, images[i].shape[:2])).float()
        m, iou, low = single.predict_torch(torch.as_tensor(coords).float(),
                                           torch.as_tensor(prompts[i]["point_labels"]).int(), boxes)
        torch.testing.assert_close(out[i]["low_res_logits"], low, atol=1e-4, rtol=0)
        torch.testing.assert_close(out[i]["iou_predictions"], iou, atol=1e-5, rtol=0)
        assert (out[i]["masks"] != m).float().mean() < 1e-3


def test_predict_batch_errors(sam):
    fast = SamFastPredictor(sam)
    with pytest.raises(RuntimeError, match="set_images"):
        fast.predict_batch([{}])
    with pytest.raises(ValueError, match="images"):
        fast.set_images([])
    with pytest.raises(ValueError, match=r"images\[0\]"):
        fast.set_images([np.zeros((10, 10), dtype=np.uint8)])
    fast.set_images([_photo("astronaut")])
    with pytest.raises(ValueError, match="one entry per image"):
        fast.predict_batch([{}, {}])
    with pytest.raises(ValueError, match="unknown keys"):
        fast.predict_batch([{"points": 1}])
    with pytest.raises(ValueError, match="same number of prompts"):
        fast.predict_batch([{"point_coords": np.zeros((2, 1, 2)), "point_labels": np.ones((2, 1)),
                             "boxes": np.zeros((3, 4))}])
    with pytest.raises(ValueError, match="point_coords holds NaN"):
        fast.predict_batch([{"point_coords": np.array([[np.nan, 3.0]]), "point_labels": np.array([1])}])
    fast.set_image(_photo("astronaut"))
    with pytest.raises(ValueError, match="boxes holds NaN"):
        fast.predict(box=np.array([0.0, 0.0, np.nan, 10.0]))
    # where segment_anything asserts, or fails deep inside, SamFastPredictor names the argument
    one, lab = np.array([[5.0, 5.0]]), np.array([1])
    with pytest.raises(ValueError, match="point_coords and point_labels must be given together"):
        fast.predict(point_coords=one)
    with pytest.raises(ValueError, match=r"point_coords must be \(N, 2\) with point_labels \(N,\), got \(2,\)"):
        fast.predict(point_coords=np.array([5.0, 5.0]), point_labels=lab)
    with pytest.raises(ValueError, match="point_labels"):
        fast.predict(point_coords=np.zeros((2, 2)), point_labels=lab)
    with pytest.raises(ValueError, match="point_labels must be 1"):
        fast.predict(point_coords=one, point_labels=np.array([3]))
    with pytest.raises(ValueError, match=r"box must be \(4,\)"):
        fast.predict(box=np.zeros(3))
    with pytest.raises(ValueError, match=r"mask_input must be \(1, 64, 64\)"):
        fast.predict(point_coords=one, point_labels=lab, mask_input=np.zeros((1, 10, 10)))
    with pytest.raises(ValueError, match="image must be an HxWx3 array"):
        fast.set_image(np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(ValueError, match="image_format"):
        fast.set_image(_photo("astronaut"), image_format="XYZ")
    with pytest.raises(ValueError, match="backend must be one of"):
        SamFastPredictor(sam, backend="gpu")


def test_tiny_and_many_points(sam):
    fast = SamFastPredictor(sam)
    tiny = np.full((3, 5, 3), 128, dtype=np.uint8)
    fast.set_image(tiny)
    m, iou, _ = fast.predict(point_coords=np.array([[1.0, 1.0]]), point_labels=np.array([1]))
    assert m.shape == (3, 3, 5)
    fast.set_images([_photo("coffee")])
    pts = np.random.default_rng(1).random((5000, 1, 2)) * 200
    out = fast.predict_batch([{"point_coords": pts, "point_labels": np.ones((5000, 1))}], multimask_output=False)
    assert out[0]["masks"].shape[:2] == (5000, 1)


# -- everything mode ------------------------------------------------------------------------------------

AMG_KW = dict(points_per_side=8, pred_iou_thresh=-1.0, stability_score_thresh=0.0, box_nms_thresh=1.0,
              crop_nms_thresh=1.0)


def _logits_for(sam, image, record):
    """segment_anything's upsampled logits (3, H, W) of the record's point, in its crop."""
    x0, y0, w, h = (int(v) for v in record["crop_box"])
    pred = SamPredictor(sam)
    pred.set_image(image[y0:y0 + h, x0:x0 + w])
    px, py = record["point_coords"][0]
    logits = pred.predict(point_coords=np.array([[px - x0, py - y0]]), point_labels=np.array([1]),
                          return_logits=True)[0]
    full = np.full((3,) + image.shape[:2], -1e9, dtype=np.float32)
    full[:, y0:y0 + h, x0:x0 + w] = logits
    return full


@pytest.mark.parametrize("output_mode", ["binary_mask", "uncompressed_rle", "coco_rle"])
@pytest.mark.parametrize("crop_n_layers", [0, 1])
def test_everything_matches_segment_anything(sam, output_mode, crop_n_layers):
    from pycocotools import mask as mask_utils

    image = _photo("astronaut")
    kw = dict(AMG_KW, output_mode=output_mode, crop_n_layers=crop_n_layers)
    want = SamAutomaticMaskGenerator(sam, points_per_batch=16, **kw).generate(image)
    fast = SamFastAutomaticMaskGenerator(sam, **kw)
    with sam_fast.record_backends() as rec:
        got = fast.generate(image)
    assert rec.backends("mask_postprocess") == {"cpu"}
    assert fast.last_stats["decoder_calls"] == 1 + 4 * crop_n_layers  # one call per crop
    assert len(got) == len(want) > 50

    def binary(seg):
        if output_mode == "binary_mask":
            return seg
        if output_mode == "coco_rle":
            return mask_utils.decode(dict(seg, counts=seg["counts"].encode())).astype(bool)
        h, w = seg["size"]
        return mask_utils.decode(mask_utils.frPyObjects(seg, h, w)).astype(bool)

    flips = 0
    for a, b in zip(want, got):
        assert a.keys() == b.keys()
        assert a["point_coords"] == b["point_coords"] and a["crop_box"] == b["crop_box"]
        assert abs(a["predicted_iou"] - b["predicted_iou"]) < 1e-5
        if a["segmentation"] == b["segmentation"] if output_mode != "binary_mask" else np.array_equal(
                a["segmentation"], b["segmentation"]):
            assert a["area"] == b["area"] and a["bbox"] == b["bbox"]
            assert a["stability_score"] == pytest.approx(b["stability_score"], abs=1e-6)
            continue
        # A differing mask differs only at pixels within 1e-4 of the threshold.
        flips += 1
        diff = binary(a["segmentation"]) != binary(b["segmentation"])
        logits = _logits_for(sam, image, a)
        assert (np.abs(logits[:, diff]).min(axis=0) < 1e-4).all()
    assert flips <= max(2, len(want) // 50)


def test_everything_min_region_cleanup_matches(sam):
    image = _photo("coffee")
    kw = dict(AMG_KW, points_per_side=4, output_mode="uncompressed_rle", min_mask_region_area=200)
    got = SamFastAutomaticMaskGenerator(sam, **kw).generate(image)
    plain = SamFastAutomaticMaskGenerator(sam, **dict(kw, min_mask_region_area=0)).generate(image)
    assert 0 < len(got) <= len(plain)
    # segment_anything's cleanup needs OpenCV (in the dev extra): this comparison runs, it is never skipped
    want = SamAutomaticMaskGenerator(sam, **kw).generate(image)
    assert [r["segmentation"] for r in got] == [r["segmentation"] for r in want]


def test_remove_small_regions_definition():
    mask = np.zeros((12, 12), dtype=bool)
    mask[1:9, 1:9] = True
    mask[4, 4] = False  # a one-pixel hole
    mask[10, 10] = True  # a one-pixel island, touching nothing
    mask[9, 9] = True  # ... and a diagonal neighbour of the square: 8-connected, not an island
    filled, changed = remove_small_regions(mask, 2, "holes")
    assert changed and filled[4, 4] and filled.sum() == mask.sum() + 1
    cleaned, changed = remove_small_regions(mask, 2, "islands")
    assert not changed  # (10, 10) - (9, 9) - (8, 8): one component
    mask[9, 9] = False
    cleaned, changed = remove_small_regions(mask, 2, "islands")
    assert changed and not cleaned[10, 10] and cleaned.sum() == mask.sum() - 1


def test_sample_upsampled_logits_equals_full_upsample():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(4, 64, 64, generator=g) * 5
    for input_size, original in (((256, 171), (384, 256)), ((200, 256), (150, 192)), ((256, 256), (7, 7))):
        full = upsample_logits(low, (256, 256), input_size, original)
        H, W = original
        pts = torch.stack([torch.rand(300, generator=g) * W, torch.rand(300, generator=g) * H], 1)
        got = sample_upsampled_logits(low, pts, (256, 256), input_size, original)
        want = full[:, pts[:, 1].long(), pts[:, 0].long()]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_hierarchical_skips_points_inside_confident_masks():
    # Synthetic confidence map: a square of logit 10 in the middle of the low-res logits.
    low = torch.full((2, 64, 64), -10.0)
    low[0, 16:48, 16:48] = 10.0
    input_size, original = (256, 256), (512, 512)
    xs = np.arange(8, 512, 16, dtype=float)
    points = np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2)
    inside = points_inside(low, points, 8.5, (256, 256), input_size, original)
    full = upsample_logits(low, (256, 256), input_size, original)
    brute = (full[:, points[:, 1].astype(int), points[:, 0].astype(int)] > 8.5).any(0).numpy()
    assert np.array_equal(inside, brute)
    assert 0 < inside.sum() < len(points)
    # Clearly inside and clearly outside the square.
    assert inside[(np.abs(points - 256) < 100).all(1)].all()
    assert not inside[(np.abs(points - 256) > 160).any(1)].any()
    assert not points_inside(low[:0], points, 8.5, (256, 256), input_size, original).any()


def _tinysam_rule(sparse_xy, done_hw, im_size, points_per_side):
    """TinySAM's round-2 point rule restated as plain loops (from the description of its
    hierarchical_generate): around each round-1 point, the 3x3 neighbourhood at one stride without the
    point, the +2 column and row where inside, and their corner; a point on a done pixel is dropped. Its
    done-mask is (W, H) and read at [x, y], i.e. (H, W) at [y, x]."""
    ih, iw = im_size
    hs, ws = ih // points_per_side, iw // points_per_side
    keep, all_points = [], []
    for x, y in sparse_xy:
        cands = []
        for a in (-1, 0, 1):
            for b in (-1, 0, 1):
                if (a, b) != (0, 0):
                    cands.append((x + ws * a, y + hs * b))
        if x + ws * 2 < iw:
            cands += [(x + ws * 2, y + hs * b) for b in (-1, 0, 1)]
        if y + hs * 2 < ih:
            cands += [(x + ws * a, y + hs * 2) for a in (-1, 0, 1)]
        if x + ws * 2 < iw and y + hs * 2 < ih:
            cands.append((x + ws * 2, y + hs * 2))
        for cx, cy in cands:
            all_points.append((cx, cy))
            if not done_hw[int(cy), int(cx)]:
                keep.append((cx, cy))
    return np.array(all_points), np.array(keep)


def test_tinysam_second_round_points_follow_their_rule():
    from segment_anything.utils.amg import build_all_layer_point_grids

    from sam_fast.everything import tinysam_second_round_points

    # the count and positions TinySAM decodes on a 512 x 512 image at 32 points per side
    sparse = build_all_layer_point_grids(8, 0, 1)[0] * 512
    pts = tinysam_second_round_points(sparse, (512, 512), 32)
    assert len(pts) == 897 and len({tuple(p) for p in pts}) == 897
    assert sorted(set(pts[:, 0])) == list(range(16, 497, 16))
    assert not set(map(tuple, pts)) & set(map(tuple, sparse))
    # non-square images, odd sizes: same points in the same order, and the same points survive a done-mask
    rng = np.random.default_rng(0)
    for (ih, iw), pps in (((480, 640), 32), ((333, 517), 16), ((256, 200), 24)):
        sparse = build_all_layer_point_grids(pps // 4, 0, 1)[0] * np.array([[iw, ih]])
        done = np.zeros((ih, iw), dtype=bool)
        done[rng.integers(0, ih // 2):, : rng.integers(iw // 3, iw)] = True  # not symmetric: a transpose shows
        want_all, want_keep = _tinysam_rule(sparse, done, (ih, iw), pps)
        got = tinysam_second_round_points(sparse, (ih, iw), pps)
        np.testing.assert_array_equal(got, want_all)
        low = torch.where(torch.as_tensor(done), 20.0, -20.0)[None]  # a logit map at full resolution
        inside = points_inside(low, got, 8.5, (ih, iw), (ih, iw), (ih, iw))
        np.testing.assert_array_equal(got[~inside], want_keep)


@pytest.mark.parametrize("mode", ["tinysam", "dense"])
def test_hierarchical_mode_runs_two_rounds(sam, mode):
    from sam_fast.everything import tinysam_second_round_points

    image = _photo("astronaut")
    kw = dict(AMG_KW, points_per_side=16, output_mode="coco_rle")
    sparse = SamFastAutomaticMaskGenerator(sam, hierarchical=mode, **kw).sparse_grids[0]
    assert len(sparse) == 16  # 16 // 4 points per side
    candidates = 256 if mode == "dense" else len(tinysam_second_round_points(
        sparse * np.array([image.shape[1::-1]]), image.shape[:2], 16))
    # Thresholds low enough for the random model's masks to mark pixels done.
    fast = SamFastAutomaticMaskGenerator(sam, hierarchical=mode, hierarchical_iou_thresh=-1.0,
                                         hierarchical_stability_thresh=0.0, hierarchical_logit_thresh=0.5, **kw)
    got = fast.generate(image)
    stats = fast.last_stats
    assert stats["decoder_calls"] == 2
    assert stats["points_skipped"] > 0
    assert stats["points_decoded"] == 16 + candidates - stats["points_skipped"]
    assert len(got) > 0 and all(isinstance(r["segmentation"]["counts"], str) for r in got)
    # With nothing confident, round 2 decodes every candidate.
    none = SamFastAutomaticMaskGenerator(sam, hierarchical=mode, hierarchical_iou_thresh=2.0, **kw)
    none.generate(image)
    assert none.last_stats["points_skipped"] == 0 and none.last_stats["points_decoded"] == 16 + candidates
    # hierarchical=True is TinySAM's rule
    assert SamFastAutomaticMaskGenerator(sam, hierarchical=True, **kw).hierarchical == "tinysam"
    with pytest.raises(ValueError, match="hierarchical must be one of"):
        SamFastAutomaticMaskGenerator(sam, hierarchical="sparse", **kw)


def test_everything_errors(sam):
    with pytest.raises(ValueError, match="output_mode"):
        SamFastAutomaticMaskGenerator(sam, output_mode="png")
    with pytest.raises(ValueError, match="points_per_side or point_grids"):
        SamFastAutomaticMaskGenerator(sam, points_per_side=None)
    with pytest.raises(ValueError, match="points_per_batch"):
        SamFastAutomaticMaskGenerator(sam, points_per_batch=0)
    with pytest.raises(ValueError, match="image must be"):
        SamFastAutomaticMaskGenerator(sam).generate(np.zeros((10, 10), dtype=np.uint8))
    for kwargs, name in (({"points_per_side": 0}, "points_per_side"), ({"crop_n_layers": -1}, "crop_n_layers"),
                         ({"crop_n_points_downscale_factor": 0}, "crop_n_points_downscale_factor"),
                         ({"min_mask_region_area": -5}, "min_mask_region_area"),
                         ({"crop_overlap_ratio": 1.0}, "crop_overlap_ratio"),
                         ({"points_per_side": None, "point_grids": [np.zeros((4, 2))] * 2}, "one grid per crop layer"),
                         ({"points_per_side": None, "point_grids": [np.full((4, 2), 2.0)]}, r"point_grids\[0\]")):
        with pytest.raises(ValueError, match=name):
            SamFastAutomaticMaskGenerator(sam, **kwargs)


def test_inputs_segment_anything_gets_wrong_are_named(sam):
    """Each of these failed deep inside (ZeroDivisionError, 'height and width must be > 0'), disabled NMS
    silently, truncated a label, or accepted a backend that fails only in generate()."""
    from sam_fast.predictor import check_image_size

    with pytest.raises(ValueError, match=r"image is empty \(0x0 pixels\)"):
        SamFastPredictor(sam).set_image(np.zeros((0, 0, 3), np.uint8))
    with pytest.raises(ValueError, match=r"image is empty"):
        SamFastAutomaticMaskGenerator(sam).generate(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ValueError, match=r"image is 5000x1 pixels: resized to SAM's 1024 .* becomes 0 pixels"):
        check_image_size((1, 5000), 1024)
    check_image_size((1, 1500), 1024)  # rounds to a 1-pixel side: fine
    with pytest.raises(ValueError, match=r"images\[1\] is empty"):
        SamFastPredictor(sam).set_images([_photo("coffee"), np.zeros((3, 0, 3), np.uint8)])
    for value in (float("nan"), 1.5, -0.1):
        with pytest.raises(ValueError, match="box_nms_thresh must be an IoU threshold in"):
            SamFastAutomaticMaskGenerator(sam, box_nms_thresh=value)
    with pytest.raises(ValueError, match="crop_nms_thresh"):
        SamFastAutomaticMaskGenerator(sam, crop_nms_thresh=float("nan"))
    with pytest.raises(ValueError, match="pred_iou_thresh must be a finite number"):
        SamFastAutomaticMaskGenerator(sam, pred_iou_thresh=float("inf"))
    with pytest.raises(ValueError, match="backend is the mask post-processing's"):
        SamFastAutomaticMaskGenerator(sam, backend="triton")
    predictor = SamFastPredictor(sam)
    predictor.set_image(_photo("astronaut"))
    with pytest.raises(ValueError, match="point_labels must be whole numbers"):
        predictor.predict(point_coords=np.array([[10.0, 20.0]]), point_labels=np.array([0.5]))
    ok = predictor.predict(point_coords=np.array([[10.0, 20.0]]), point_labels=np.array([1.0]))  # whole floats
    np.testing.assert_array_equal(ok[1], predictor.predict(point_coords=np.array([[10.0, 20.0]]),
                                                           point_labels=np.array([1]))[1])
    predictor.set_images([_photo("astronaut")])
    with pytest.raises(ValueError, match=r"prompts\[0\] point_labels must be whole numbers"):
        predictor.predict_batch([{"point_coords": np.array([[[1.0, 2.0]]]), "point_labels": np.array([[0.7]])}])


def test_bf16_model_end_to_end(sam):
    # segment_anything's own prompt encoder and predictor fail on a bf16 model; ours run it, with the
    # positional encoding in float32, and stay close to the float64 decoder.
    bf = copy.deepcopy(sam).to(torch.bfloat16)
    image = _photo("chelsea", (3, 3))
    fast = SamFastPredictor(bf)
    fast.set_image(image)
    m, iou, low = fast.predict(point_coords=np.array([[40.0, 50.0]]), point_labels=np.array([1]),
                               box=np.array([10, 10, 120, 90]))
    ref_model = copy.deepcopy(sam).double()
    pe = ref_model.prompt_encoder.pe_layer
    pe.positional_encoding_gaussian_matrix = pe.positional_encoding_gaussian_matrix.float()
    ref = SamPredictor(ref_model)
    ref.features = fast.features.double()
    ref.original_size, ref.input_size, ref.is_image_set = fast.original_size, fast.input_size, True
    box = torch.as_tensor(ref.transform.apply_boxes(np.array([[10, 10, 120, 90]]), image.shape[:2])).double()
    pts = torch.as_tensor(ref.transform.apply_coords(np.array([[[40.0, 50.0]]]), image.shape[:2])).double()
    _, _, ref_low = ref.predict_torch(pts, torch.ones(1, 1, dtype=torch.int), box[:, None])
    scale = ref_low.abs().max().item()
    assert np.abs(low.astype(np.float64) - ref_low[0].numpy()).max() <= 0.05 * scale
    assert m.dtype == bool and m.shape == (3,) + image.shape[:2]
    everything = SamFastAutomaticMaskGenerator(bf, **dict(AMG_KW, points_per_side=4)).generate(image)
    assert len(everything) > 0


# ------------------------------------------------------------------------------------------------
# CUDA at SAM's real shapes (pytest -m gpu)
# ------------------------------------------------------------------------------------------------

@gpu
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


@gpu
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
