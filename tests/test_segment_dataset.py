"""Dataset-scale segmentation: the exact partition, per-shard restartable outputs, error rows, the Ray engine on a
local cluster, and records identical to running the generator / predictor directly on each image."""

import json
import os

import numpy as np
import pytest
import skimage.data as data
from PIL import Image

from sam_fast import SamFastAutomaticMaskGenerator, SamFastPredictor
from sam_fast.checkpoint import save_sam
from sam_fast.cli import main
from sam_fast.images import list_images, read_rgb
from sam_fast.models import tiny_sam
from sam_fast.segment_dataset import SegmentWorker, make_shards, partition, read_results, run_ray, run_shards

# thresholds off: the tiny random model's masks pass them, so the comparisons below compare masks, not empty lists
GEN = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 0.99}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset")
    (root / "imgs" / "sub").mkdir(parents=True)
    for i, name in enumerate(("astronaut", "coffee", "chelsea", "rocket", "cat")):
        im = getattr(data, name)()[::3, ::3]
        folder = root / "imgs" / ("sub" if i % 2 else "")
        Image.fromarray(np.ascontiguousarray(im)).save(folder / f"{name}.png")
    (root / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ckpt = root / "tiny.pth"
    save_sam(tiny_sam(), str(ckpt))
    return root, str(ckpt), list_images(str(root / "imgs"))


def _direct(ckpt, path):
    from sam_fast.checkpoint import load_sam

    sam = load_sam(ckpt)
    import sam_fast

    sam_fast.apply(sam)
    return SamFastAutomaticMaskGenerator(sam, output_mode="coco_rle", **GEN).generate(read_rgb(path))


def _shard_files(out):
    return sorted(n for n in os.listdir(out) if n.startswith("shard-"))


def _shard_file(out, k):
    (name,) = [n for n in _shard_files(out) if n.startswith(f"shard-{k:06d}-")]
    return os.path.join(out, name)


def _same_results(got, want):
    """Two runs' merged results: the same images, errors and masks; the decoder's scores equal up to float rounding
    (Ray's actors run on one thread, the loop here on two: the GEMMs sum in another order)."""
    assert got["images"] == want["images"]

    def errors(run):  # the engines word a missing file differently; what failed and where must agree
        return [(e["image_id"], e["file_name"], e["error"].split(":")[0]) for e in run["errors"]]

    assert errors(got) == errors(want)
    assert len(got["annotations"]) == len(want["annotations"]) > 0
    for a, b in zip(got["annotations"], want["annotations"]):
        assert set(a) == set(b)
        for key in a:
            if key in ("predicted_iou", "stability_score"):
                assert a[key] == pytest.approx(b[key], abs=1e-5), key
            else:
                assert a[key] == b[key], key


def _strip(records):
    return json.loads(json.dumps([{k: v for k, v in r.items() if k not in ("id", "image_id")} for r in records]))


@pytest.mark.parametrize("n, world", [(10, 1), (10, 3), (7, 4), (3, 5), (0, 2), (64, 64)])
def test_partition_covers_every_item_exactly_once(n, world):
    items = list(range(n))
    parts = [partition(items, r, world) for r in range(world)]
    assert sorted(x for p in parts for x in p) == items
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="rank"):
        partition(items, world, world)


def test_loop_writes_one_result_per_image_identical_to_the_generator(dataset, tmp_path):
    root, ckpt, files = dataset
    worker = SegmentWorker(ckpt, generator_kwargs=GEN, device="cpu")
    summary = run_shards(worker, files, str(tmp_path), shard_size=2, progress=False)
    assert (summary.images, summary.errors, summary.shards_written) == (6, 1, 3)
    merged = read_results(str(tmp_path))
    assert sorted(im["file_name"] for im in merged["images"]) == sorted(files)  # each once
    assert [e["file_name"] for e in merged["errors"]] == [str(root / "imgs" / "broken.jpg")]
    assert "cannot read" in merged["errors"][0]["error"]
    ids = {im["file_name"]: im["id"] for im in merged["images"]}
    path = str(root / "imgs" / "chelsea.png")
    mine = [a for a in merged["annotations"] if a["image_id"] == ids[path]]
    direct = _direct(ckpt, path)
    assert len(direct) >= 3 and _strip(mine) == _strip(direct)
    assert len({a["id"] for a in merged["annotations"]}) == len(merged["annotations"])


def test_a_killed_run_completes_without_duplicates(dataset, tmp_path):
    _, ckpt, files = dataset
    worker = SegmentWorker(ckpt, generator_kwargs=GEN, device="cpu")
    run_shards(worker, files, str(tmp_path), shard_size=2, progress=False)
    before = read_results(str(tmp_path))
    assert before["annotations"]
    os.unlink(_shard_file(tmp_path, 1))  # the shard a kill interrupted: not written, or half in a tmp file
    (tmp_path / ".tmp-abc.json").write_text('{"images": [')
    again = run_shards(worker, files, str(tmp_path), shard_size=2, progress=False)
    assert (again.shards_written, again.shards_skipped, again.images) == (1, 2, 2)
    after = read_results(str(tmp_path))
    assert sorted(i["id"] for i in after["images"]) == sorted(i["id"] for i in before["images"]) == list(range(1, 7))
    assert after["annotations"] == before["annotations"]


def test_shard_option_splits_the_work_exactly(dataset, tmp_path, capsys):
    _, ckpt, files = dataset
    n_shards = len(make_shards(files, 1))
    for world in (1, 2, 4):
        out = tmp_path / f"w{world}"
        for rank in range(world):
            assert main(["segment-dataset", str(dataset[0] / "imgs"),
                         "--out", str(out), "--checkpoint", ckpt, "--shard", f"{rank}/{world}", "--shard-size", "1",
                         "--points-per-side", "4", "--device", "cpu"]) == 0
        merged = read_results(str(out))
        assert sorted(i["file_name"] for i in merged["images"]) == sorted(files)
        assert len(_shard_files(out)) == n_shards
    assert "images with errors" in capsys.readouterr().out
    assert main(["segment-dataset", str(dataset[0] / "imgs"), "--out", str(tmp_path / "x"), "--checkpoint", ckpt,
                 "--shard", "3/2"]) == 2


def test_boxes_mode_matches_the_predictor(dataset, tmp_path):
    from pycocotools import mask as mask_utils

    from sam_fast.checkpoint import load_sam

    root, ckpt, _ = dataset
    path = str(root / "imgs" / "sub" / "coffee.png")
    boxes = [[10, 20, 120, 100], [50, 40, 150, 160]]
    worker = SegmentWorker(ckpt, mode="boxes", device="cpu")
    row = worker.process_image(path, 1, boxes)
    assert row["error"] == "" and len(row["annotations"]) == 2
    import sam_fast

    sam = load_sam(ckpt)
    sam_fast.apply(sam)
    predictor = SamFastPredictor(sam)
    predictor.set_images([read_rgb(path)])
    masks = predictor.predict_batch([{"boxes": np.array(boxes, dtype=float)}], multimask_output=False)[0]["masks"]
    assert masks[:, 0].any(dim=(1, 2)).all()  # real masks to compare
    for rec, m, box in zip(row["annotations"], masks[:, 0].numpy(), boxes):
        got = mask_utils.decode(dict(rec["segmentation"], counts=rec["segmentation"]["counts"].encode()))
        assert np.array_equal(got.astype(bool), m)
        _check_record_fields(rec, m)
        assert rec["box_prompt"] == [float(v) for v in box]
    assert worker.process_image(path, 1, None)["error"].startswith("no boxes")  # boxes mode, no entry: reported
    assert worker.process_image(path, 1, [])["annotations"] == []  # an entry with no box: nothing, no error


def _check_record_fields(rec, mask):
    """segment_anything's record fields and conventions (sam_fast.coco): bbox XYWH from the inclusive XYXY box,
    w = x1 - x0, area the pixel count, crop_box the whole image."""
    ys, xs = np.nonzero(mask)
    H, W = mask.shape
    assert list(rec)[:7] == ["segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score",
                             "crop_box"]
    assert rec["area"] == int(mask.sum())
    assert rec["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
    assert rec["crop_box"] == [0, 0, W, H]


def test_every_path_writes_the_same_record_for_the_same_mask(dataset, tmp_path):
    """One record builder: sam-fast segment's box prompt, segment-dataset's boxes mode and the predictor's
    coco_records give the same fields and numbers for the same box on the same image."""
    from pycocotools import mask as mask_utils

    root, ckpt, _ = dataset
    path = str(root / "imgs" / "sub" / "coffee.png")
    box = [30, 25, 140, 120]
    assert main(["segment", path, "--checkpoint", ckpt, "--model-type", "auto", "--box", ",".join(map(str, box)),
                 "--out", str(tmp_path / "cli"), "--device", "cpu"]) == 0
    with open(tmp_path / "cli" / "coffee.json") as f:
        (cli,) = json.load(f)["annotations"]
    worker = SegmentWorker(ckpt, mode="boxes", device="cpu")
    (dataset_rec,) = worker.process_image(path, 1, [box])["annotations"]
    mask = mask_utils.decode(dict(cli["segmentation"], counts=cli["segmentation"]["counts"].encode())).astype(bool)
    assert mask.any()
    _check_record_fields(cli, mask)
    for key in ("segmentation", "area", "bbox", "stability_score", "crop_box", "box_prompt", "point_coords"):
        assert cli[key] == dataset_rec[key], key
    assert cli["predicted_iou"] == pytest.approx(dataset_rec["predicted_iou"], abs=1e-6)


def _cli(src, out, ckpt, *extra):
    return main(["segment-dataset", str(src), "--out", str(out), "--checkpoint", ckpt, "--shard", "0/1",
                 "--points-per-side", "2", "--device", "cpu", *extra])


def _each_image_once(out, files):
    merged = read_results(str(out))
    names = sorted(i["file_name"] for i in merged["images"])
    assert names == sorted(files), names
    assert sorted(i["id"] for i in merged["images"]) == list(range(1, len(files) + 1))
    return merged


def test_a_rerun_with_another_plan_is_refused_or_redone(dataset, tmp_path, capsys):
    """A rerun with another --shard-size, or after an image was added that sorts first, would have skipped shards
    by index that hold other images (duplicates, or images never segmented): it is refused with what changed,
    and --overwrite redoes exactly the shards that changed."""
    import shutil

    root, ckpt, _ = dataset
    src = tmp_path / "src"
    shutil.copytree(root / "imgs", src)
    files = list_images(str(src))
    out = tmp_path / "out"
    assert _cli(src, out, ckpt, "--shard-size", "2") == 0
    _each_image_once(out, files)
    capsys.readouterr()
    assert _cli(src, out, ckpt, "--shard-size", "3") == 2
    err = capsys.readouterr().err
    assert "--shard-size 3 (it was 2)" in err and "--overwrite" in err
    _each_image_once(out, files)  # nothing was touched
    assert _cli(src, out, ckpt, "--shard-size", "3", "--overwrite") == 0
    _each_image_once(out, files)
    assert len(_shard_files(out)) == 2
    # a photo added that sorts first shifts every image id
    Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8)).save(src / "aaa.png")
    files = list_images(str(src))
    capsys.readouterr()
    assert _cli(src, out, ckpt, "--shard-size", "3") == 2
    assert "1 added (e.g." in capsys.readouterr().err
    assert _cli(src, out, ckpt, "--shard-size", "3", "--overwrite") == 0
    assert "3 shards written (0 already done" in capsys.readouterr().out
    _each_image_once(out, files)
    # a photo added that sorts last: only the last shard changes
    Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8)).save(src / "zzz.png")
    files = list_images(str(src))
    assert _cli(src, out, ckpt, "--shard-size", "3", "--overwrite") == 0
    assert "1 shards written (2 already done" in capsys.readouterr().out
    _each_image_once(out, files)
    # other settings are another run too
    capsys.readouterr()
    assert main(["segment-dataset", str(src), "--out", str(out), "--checkpoint", ckpt, "--shard", "0/1",
                 "--points-per-side", "3", "--device", "cpu", "--shard-size", "3"]) == 2
    assert "settings (generator_kwargs)" in capsys.readouterr().err


def test_boxes_keys_in_the_forms_people_write(dataset, tmp_path, capsys, monkeypatch):
    """--boxes keyed by bare file names, by paths relative to SRC or to the working directory, or absolute: every
    image gets its masks; a key naming no image is refused; an image without an entry is an error row; {} runs
    boxes mode (no segment-everything), every image reported."""
    root, ckpt, files = dataset
    src = root / "imgs"
    box = [[10, 10, 60, 70]]
    monkeypatch.chdir(root)
    forms = {"chelsea.png": box, os.path.join("sub", "coffee.png"): box, os.path.join("imgs", "astronaut.png"): box,
             str(src / "sub" / "rocket.png"): box, "cat.png": box}
    (tmp_path / "boxes.json").write_text(json.dumps(forms))
    out = tmp_path / "out"
    capsys.readouterr()
    assert _cli(src, out, ckpt, "--boxes", str(tmp_path / "boxes.json")) == 0
    err = capsys.readouterr().err
    merged = _each_image_once(out, [os.path.abspath(f) for f in files])
    assert len(merged["annotations"]) == 5
    assert [os.path.basename(e["file_name"]) for e in merged["errors"]] == ["broken.jpg"]
    assert "1 of 6 images have no --boxes entry" in err and "broken.jpg" in err
    (tmp_path / "bad.json").write_text(json.dumps({"chelsea.png": box, "nope.png": box}))
    assert _cli(src, tmp_path / "bad", ckpt, "--boxes", str(tmp_path / "bad.json")) == 2
    assert "1 of its 2 keys name no image" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    (tmp_path / "empty.json").write_text("{}")
    assert _cli(src, tmp_path / "empty", ckpt, "--boxes", str(tmp_path / "empty.json")) == 0
    empty = read_results(str(tmp_path / "empty"))
    assert empty["annotations"] == [] and len(empty["errors"]) == 6
    assert all(e["error"].startswith("no boxes") for e in empty["errors"])


@pytest.mark.whole_program
@pytest.mark.cpu_plain_gate  # Ray's worker processes run sam_fast as shipped (no conftest): so does the loop here
def test_ray_engine_on_a_local_cluster_matches_the_loop(dataset, tmp_path):
    ray = pytest.importorskip("ray")
    _, ckpt, files = dataset
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        kwargs = dict(checkpoint=ckpt, generator_kwargs=GEN, device="cpu")
        summary = run_ray(files, str(tmp_path / "ray"), kwargs, shard_size=2, num_workers=2, progress=False)
        assert (summary.images, summary.errors, summary.shards_written) == (6, 1, 3)
        again = run_ray(files, str(tmp_path / "ray"), kwargs, shard_size=2, num_workers=2, progress=False)
        assert (again.shards_written, again.shards_skipped) == (0, 3)
        # a job killed after some shards: rerunning writes only the missing one
        first = read_results(str(tmp_path / "ray"))
        broken = [e for e in first["errors"] if e["file_name"].endswith("broken.jpg")]
        assert len(broken) == 1 and "broken.jpg" in broken[0]["error"] and "BytesIO" not in broken[0]["error"]
        os.remove(_shard_file(tmp_path / "ray", 1))
        rerun = run_ray(files, str(tmp_path / "ray"), kwargs, shard_size=2, num_workers=1, progress=False)
        assert (rerun.shards_written, rerun.shards_skipped, rerun.images) == (1, 2, 2)
        assert read_results(str(tmp_path / "ray")) == first
        # boxes from a detector stage reach the actors by path; a listed file that is gone is an error row
        gone = str(tmp_path / "gone.png")
        boxes = {files[0]: {"boxes": [[10, 10, 60, 70]]}, files[2]: {"boxes": [[0, 0, 40, 40], [5, 5, 90, 80]]},
                 gone: {"boxes": [[0, 0, 10, 10]]}}
        box_kwargs = dict(kwargs, mode="boxes")
        mixed = run_ray([files[0], files[2], gone], str(tmp_path / "boxes"), box_kwargs, shard_size=2,
                        prompts=boxes, batch_size=2, progress=False)
        assert (mixed.images, mixed.annotations, mixed.errors) == (3, 3, 1)
    finally:
        ray.shutdown()
    run_shards(SegmentWorker(**kwargs), files, str(tmp_path / "loop"), shard_size=2, progress=False)
    _same_results(read_results(str(tmp_path / "ray")), read_results(str(tmp_path / "loop")))
    got = read_results(str(tmp_path / "boxes"))
    assert [e["file_name"] for e in got["errors"]] == [gone] and "cannot read" in got["errors"][0]["error"]
    run_shards(SegmentWorker(**box_kwargs), [files[0], files[2], gone], str(tmp_path / "boxes-loop"), shard_size=2,
               prompts=boxes, progress=False)
    want = read_results(str(tmp_path / "boxes-loop"))
    _same_results(got, want)


def test_worker_calibrates_int8_from_images(dataset):
    from sam_fast import SamFastConfig
    from sam_fast.nn import Int8Linear

    root, ckpt, files = dataset
    with pytest.raises(ValueError, match="calibration_images: cannot read .*broken.jpg"):
        SegmentWorker(ckpt, config=SamFastConfig(quantize="int8"), calibration_images=files, device="cpu")
    photos = [f for f in files if f.endswith(".png")][:2]
    worker = SegmentWorker(ckpt, config=SamFastConfig(quantize="int8"), calibration_images=photos,
                           generator_kwargs=GEN, device="cpu")
    lin2 = [m for n, m in worker.sam.named_modules() if n.endswith("mlp.lin2") and isinstance(m, Int8Linear)]
    assert lin2 and all(m.act_scale is not None for m in lin2)  # static scales: calibration ran
    row = worker.process_image(files[0], 1)
    assert row["error"] == "" and row["height"] > 0


def test_worker_segments_with_a_sam2_model(dataset):
    """A SAM 2 model: its Hiera blocks swapped (exact attention), the boxes mode's records those of SAM 2's predictor
    (single mask per box) and the everything mode's those of its generator."""
    pytest.importorskip("sam2")
    import sam_fast
    from sam_fast.models.sam2 import tiny_sam2

    root, _, _ = dataset
    path = str(root / "imgs" / "sub" / "coffee.png")
    image = read_rgb(path)
    boxes = [[10, 20, 120, 100], [50, 40, 150, 160]]
    worker = SegmentWorker(tiny_sam2(), mode="boxes", device="cpu")
    with sam_fast.record_backends() as rec:
        row = worker.process_image(path, 1, boxes)
    assert row["error"] == "" and len(row["annotations"]) == 2
    assert ("hiera_attention", "cpu") in rec.calls  # the encoder runs sam_fast's kernel
    predictor = SamFastPredictor(worker.sam)
    predictor.set_image(image)
    masks = predictor.predict(box=np.array(boxes, dtype=float), multimask_output=False)[0]
    for r, m, box in zip(row["annotations"], masks[:, 0], boxes):
        _check_record_fields(r, m)
        assert r["box_prompt"] == [float(v) for v in box]
    everything = SegmentWorker(worker.sam, generator_kwargs=GEN, device="cpu")
    want = SamFastAutomaticMaskGenerator(worker.sam, output_mode="coco_rle", **GEN).generate(image)
    assert _strip(everything.process_image(path, 2)["annotations"]) == _strip(want) != []
