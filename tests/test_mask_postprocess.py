"""sam_fast::mask_postprocess (C++ CPU kernel) vs segment_anything's own post-processing and pycocotools."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from devices import gpu, smoke
from pycocotools import mask as mask_utils

import sam_fast
from sam_fast.ops.mask_postprocess import mask_postprocess, rles_to_coco, rles_to_uncompressed
from sam_fast.reference import mask_postprocess as ref

# A logit this close to a threshold may binarise differently: the fused op rounds differently.
NEAR = 1e-4


def smooth_logits(P, h=256, w=256, seed=0, scale=8.0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(P, 1, 12, 12, generator=g) * scale
    out = F.interpolate(coarse, (h, w), mode="bicubic", align_corners=False)[:, 0].contiguous()
    out[0] = -5.0  # an empty mask
    if P > 1:
        out[1] = 5.0  # a full one
    if P > 2:
        out[2] = 0.0  # exactly at the threshold: empty, stability 0 / 0 = NaN as in segment_anything
    return out


# (input_size, original_size, crop_box, image_size): SAM's resize of a 1500x1000 image; a square one;
# a crop of the automatic mask generator inside a larger frame; a tiny and a one-pixel-wide image;
# the crop touching the frame's bottom edge (its columns meet) and its right edge.
GEOMETRIES = [
    ((1024, 683), (150, 100), None, None),
    ((1024, 1024), (64, 64), None, None),
    ((768, 1024), (48, 64), (10, 20, 74, 68), (80, 90)),
    ((1024, 731), (7, 5), None, None),
    ((1024, 4), (256, 1), None, None),
    ((1024, 1024), (40, 40), (5, 30, 45, 70), (70, 50)),
    ((1024, 1024), (40, 40), (10, 0, 50, 40), (40, 50)),
]


def _ambiguous(logits, geometry, thresholds):
    input_size, original_size = geometry[:2]
    up = ref.upsample_logits(logits, (1024, 1024), input_size, original_size)
    near = torch.zeros_like(up, dtype=torch.bool)
    for t in thresholds:
        near |= (up - t).abs() < NEAR
    return near


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0]}->{g[1]}-crop{g[2]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_matches_segment_anything(geometry, dtype):
    input_size, original_size, crop_box, image_size = geometry
    logits = smooth_logits(6, seed=hash(geometry) % 1000).to(dtype)
    kw = dict(input_size=input_size, original_size=original_size, crop_box=crop_box, image_size=image_size,
              return_masks=True)
    got = mask_postprocess(logits, backend="cpu", **kw)
    want = mask_postprocess(logits, backend="reference", **kw)
    near = _ambiguous(logits, geometry, (0.0, 1.0, -1.0))
    # Masks identical except where the upsampled logit is within NEAR of the threshold.
    assert torch.equal(got.masks & ~near, want.masks & ~near)
    for i in range(logits.shape[0]):
        if near[i].any():
            slack = int(near[i].sum())
            assert abs(int(got.area[i]) - int(want.area[i])) <= slack
            continue
        assert int(got.area[i]) == int(want.area[i])
        assert got.boxes[i].tolist() == want.boxes[i].tolist()
        s, t = got.stability_score[i], want.stability_score[i]
        assert (torch.isnan(s) and torch.isnan(t)) or s.item() == t.item()
    assert got.stability_score.dtype == torch.float32 and got.boxes.dtype == torch.int64
    # Every RLE, decoded by pycocotools, is the mask placed in its frame; compressed strings are the
    # bytes pycocotools itself writes.
    frame = image_size or original_size
    x0, y0 = (crop_box or (0, 0))[:2]
    H, W = original_size
    coco = rles_to_coco(got.rle_counts, got.rle_offsets, frame)
    for i, record in enumerate(coco):
        framed = np.zeros(frame, dtype=np.uint8)
        framed[y0:y0 + H, x0:x0 + W] = got.masks[i].numpy()
        assert np.array_equal(mask_utils.decode(dict(record, counts=record["counts"].encode())), framed)
        assert record["counts"] == mask_utils.encode(np.asfortranarray(framed))["counts"].decode()
    if not near.any():
        assert torch.equal(got.rle_counts, want.rle_counts)
        assert torch.equal(got.rle_offsets, want.rle_offsets)


def test_empty_full_and_threshold_masks():
    logits = smooth_logits(3)
    got = mask_postprocess(logits, input_size=(1024, 1024), original_size=(32, 48), backend="cpu")
    assert got.area.tolist() == [0, 32 * 48, 0]
    assert got.boxes.tolist() == [[0, 0, 0, 0], [0, 0, 47, 31], [0, 0, 0, 0]]
    assert got.stability_score[1].item() == 1.0 and torch.isnan(got.stability_score[0])
    records = rles_to_uncompressed(got.rle_counts, got.rle_offsets, (32, 48))
    assert [r["counts"] for r in records] == [[32 * 48], [0, 32 * 48], [32 * 48]]
    assert got.masks is None


def test_uncompressed_records_match_segment_anything():
    from segment_anything.utils.amg import mask_to_rle_pytorch

    logits = smooth_logits(5, seed=3)
    got = mask_postprocess(logits, input_size=(1024, 1024), original_size=(64, 64), return_masks=True,
                           backend="cpu")
    assert rles_to_uncompressed(got.rle_counts, got.rle_offsets, (64, 64)) == mask_to_rle_pytorch(got.masks)


def test_string_encoding_matches_pycocotools_on_awkward_counts():
    # Long runs (multi-group varints) and deltas of both signs, through the C++ op and the Python one.
    rng = np.random.default_rng(0)
    mask = np.zeros((300, 200), dtype=np.uint8)
    mask[:, 37] = 1
    mask[5:290, 100:180] = rng.random((285, 80)) < 0.3
    rle = mask_utils.encode(np.asfortranarray(mask))
    counts, offsets = ref.flatten_rles([{"counts": _uncompressed(mask)}])
    assert rles_to_coco(counts, offsets, (300, 200))[0]["counts"] == rle["counts"].decode()
    assert ref.coco_string(_uncompressed(mask)) == rle["counts"].decode()


@pytest.mark.parametrize("shape", [(300, 200), (1, 7), (5, 1)])
def test_coco_to_mask_inverts_pycocotools(shape):
    # Both record forms, str and bytes counts; masks starting with ones, all zeros and all ones.
    rng = np.random.default_rng(1)
    cases = [np.zeros(shape, np.uint8), np.ones(shape, np.uint8), (rng.random(shape) < 0.4).astype(np.uint8)]
    if shape == (300, 200):
        cases.append(cases[2].copy())
        cases[3][:, 37] = 1
    for mask in cases:
        rle = mask_utils.encode(np.asfortranarray(mask))
        expect = mask_utils.decode(rle).astype(bool)
        assert ref.coco_counts(rle["counts"].decode()) == _uncompressed(mask)
        for record in (rle, dict(rle, counts=rle["counts"].decode()),
                       {"size": list(shape), "counts": _uncompressed(mask)}):
            got = sam_fast.coco_to_mask(record)
            assert got.dtype == np.bool_ and got.shape == shape and np.array_equal(got, expect)


def test_coco_to_mask_of_an_empty_frame():
    assert sam_fast.coco_to_mask({"size": [0, 4], "counts": ""}).shape == (0, 4)
    assert sam_fast.coco_to_mask({"size": [3, 0], "counts": []}).shape == (3, 0)


def test_coco_to_mask_round_trips_the_op():
    logits = smooth_logits(6, h=64, w=64, seed=5)
    got = mask_postprocess(logits, input_size=(1024, 1024), original_size=(90, 70), return_masks=True)
    for record, mask in zip(rles_to_coco(got.rle_counts, got.rle_offsets, (90, 70)), got.masks):
        assert np.array_equal(sam_fast.coco_to_mask(record), mask.numpy())


@pytest.mark.parametrize("record, error, match", [
    ([1, 2], TypeError, "record"),
    ({"size": [2, 2]}, TypeError, "record"),
    ({"size": [2], "counts": [4]}, ValueError, r"record\['size'\]"),
    ({"size": [2, -1], "counts": []}, ValueError, r"record\['size'\]"),
    ({"size": [2, 2], "counts": [1, 2]}, ValueError, "cover 3 pixels"),
    ({"size": [2, 2], "counts": [5, -1]}, ValueError, "non-negative"),
    ({"size": [2, 2], "counts": 4}, TypeError, r"record\['counts'\]"),
    ({"size": [2, 2], "counts": "4 "}, ValueError, "not a compressed-RLE character"),
    ({"size": [2, 2], "counts": "o"}, ValueError, "ends inside a run"),
])
def test_coco_to_mask_rejects_malformed_records(record, error, match):
    with pytest.raises(error, match=match):
        sam_fast.coco_to_mask(record)


def _uncompressed(mask):
    flat = mask.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    return counts if flat[0] == 0 else [0] + counts


def test_no_rle_and_empty_batch():
    logits = smooth_logits(4)
    got = mask_postprocess(logits, input_size=(1024, 1024), original_size=(20, 20), return_rle=False,
                           backend="cpu")
    assert got.rle_counts.numel() == 0 and got.rle_offsets.tolist() == [0]
    assert got.area.shape == (4,)
    empty = mask_postprocess(logits[:0], input_size=(1024, 1024), original_size=(20, 20), return_masks=True,
                             backend="cpu")
    assert empty.area.shape == (0,) and empty.rle_offsets.tolist() == [0] and empty.masks.shape == (0, 20, 20)


def test_auto_runs_the_cpp_kernel():
    with sam_fast.record_backends() as rec:
        mask_postprocess(smooth_logits(2), input_size=(1024, 1024), original_size=(8, 8))
    assert rec.calls == [("mask_postprocess", "cpu")] and not rec.fallbacks


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(logits=torch.zeros(256, 256)), "logits must have shape"),
        (dict(logits=torch.zeros(1, 256, 256, dtype=torch.float64)), "logits must be float32"),
        (dict(logits=torch.zeros(1, 256, 256, dtype=torch.int32)), "logits must be float32"),
        (dict(input_size=(1025, 10)), "input_size"),
        (dict(original_size=(0, 10)), "original_size must be positive"),
        (dict(original_size=(10.5, 10)), "original_size must hold ints"),
        (dict(padded_size=(128, 128)), "padded_size"),
        (dict(crop_box=(0, 0, 5, 5)), "crop_box"),
        (dict(crop_box=(5, 5, 25, 25), image_size=(22, 22)), "crop_box .* inside image_size"),
        (dict(mask_threshold="0"), "mask_threshold"),
        (dict(mask_threshold=float("nan")), "mask_threshold"),
        (dict(logits=torch.zeros(2, 256, 256).index_put_((torch.tensor([1]),), torch.tensor(float("nan")))),
         "logits holds NaN"),
        (dict(logits=torch.full((1, 256, 256), float("-inf"), dtype=torch.bfloat16)), "logits holds NaN or infinite"),
        (dict(logits=torch.full((1, 256, 256), 60000.0, dtype=torch.float16)), None),  # large but finite: no error
        (dict(backend="cuda"), "refused"),
    ],
)
def test_errors_name_the_argument(kwargs, match):
    args = dict(logits=torch.zeros(1, 256, 256), input_size=(1024, 1024), original_size=(20, 20))
    args.update(kwargs)
    logits = args.pop("logits")
    if match is None:  # a control case: valid input that a careless check might refuse
        assert mask_postprocess(logits, **args).area.tolist() == [400] * logits.shape[0]
        return
    with pytest.raises((ValueError, TypeError), match=match):
        mask_postprocess(logits, **args)


def test_cpp_checks_its_own_arguments():
    import sam_fast.ops.mask_postprocess  # noqa: F401  (loads the extension)

    with pytest.raises(RuntimeError, match="do not fit the RLE frame"):
        torch.ops.sam_fast.mask_postprocess(torch.zeros(1, 8, 8), [32, 32], [32, 32], [16, 16], [10, 0, 16, 16],
                                            0.0, 1.0, True, False)


def test_opcheck():
    logits = smooth_logits(3, 32, 32)
    args = (logits, [128, 128], [128, 100], [40, 30], [0, 0, 40, 30], 0.0, 1.0, True, True)
    torch.library.opcheck(torch.ops.sam_fast.mask_postprocess.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    strided = smooth_logits(3, 32, 64)[:, :, ::2]
    torch.library.opcheck(torch.ops.sam_fast.mask_postprocess.default, (strided,) + args[1:],
                          test_utils=("test_schema", "test_faketensor"))


def test_large_batches_are_joined_from_chunks(monkeypatch):
    from sam_fast.ops import mask_postprocess as pp

    monkeypatch.setattr(pp, "_MAX_MASKS_PER_CALL", 4)
    logits = smooth_logits(10, 32, 32)
    kw = dict(padded_size=(128, 128), input_size=(128, 128), original_size=(20, 24), return_masks=True)
    got = mask_postprocess(logits, backend="cpu", **kw)
    monkeypatch.setattr(pp, "_MAX_MASKS_PER_CALL", 65535)
    want = mask_postprocess(logits, backend="cpu", **kw)
    for a, b in zip(got, want):
        assert torch.equal(a.nan_to_num(-1) if a.is_floating_point() else a,
                           b.nan_to_num(-1) if b.is_floating_point() else b)


# ------------------------------------------------------------------------------------------------
# CUDA at SAM's real shapes (pytest -m gpu)
# ------------------------------------------------------------------------------------------------

# --- on a GPU ---

POSTPROCESS_GEOMETRIES = [
    ((1024, 683), (1500, 1000), None, None),  # SAM's resize of a portrait photo
    ((768, 1024), (1200, 1600), (0, 0, 1600, 1200), None),
    pytest.param(((1024, 1024), (400, 400), (37, 500, 437, 900), (1200, 800)), marks=smoke),  # crop in a frame
    ((1024, 1024), (1024, 1024), None, None),
]


@gpu
@pytest.mark.parametrize("geometry", POSTPROCESS_GEOMETRIES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_postprocess_cuda_matches_cpu(geometry, dtype):
    import torch.nn.functional as F

    from sam_fast.ops.mask_postprocess import mask_postprocess
    from sam_fast.reference.mask_postprocess import upsample_logits

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
