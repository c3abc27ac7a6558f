"""Dataset-scale segmentation: the exact partition, per-shard restartable outputs, error rows, the Ray engine on a
local cluster, and records identical to running the generator / predictor directly on each image."""

import json
import os

import numpy as np
import pytest
import skimage.data as data
from PIL import Image

from sam_fast import SamFastAutomaticMaskGenerator, SamFastPredictor
from sam_fast.cli import main
from sam_fast.distributed import SegmentWorker, make_shards, partition, read_results, run_ray, run_shards
from sam_fast.images import list_images, read_rgb
from sam_fast.models import save_sam, tiny_sam

GEN = {"points_per_side": 4}


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
    from sam_fast.models import load_sam

    sam = load_sam(ckpt)
    import sam_fast

    sam_fast.apply(sam)
    return SamFastAutomaticMaskGenerator(sam, output_mode="coco_rle", **GEN).generate(read_rgb(path))


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
    assert _strip(mine) == _strip(_direct(ckpt, path))
    assert len({a["id"] for a in merged["annotations"]}) == len(merged["annotations"])


def test_a_killed_run_completes_without_duplicates(dataset, tmp_path):
    _, ckpt, files = dataset
    worker = SegmentWorker(ckpt, generator_kwargs=GEN, device="cpu")
    run_shards(worker, files, str(tmp_path), shard_size=2, progress=False)
    before = read_results(str(tmp_path))
    os.unlink(tmp_path / "shard-000001.json")  # the shard a kill interrupted: not written, or half in a tmp file
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
        assert len(os.listdir(out)) == n_shards
    assert "images with errors" in capsys.readouterr().out
    assert main(["segment-dataset", str(dataset[0] / "imgs"), "--out", str(tmp_path / "x"), "--checkpoint", ckpt,
                 "--shard", "3/2"]) == 2


def test_boxes_mode_matches_the_predictor(dataset, tmp_path):
    from pycocotools import mask as mask_utils

    from sam_fast.models import load_sam

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
    for rec, m in zip(row["annotations"], masks[:, 0].numpy()):
        got = mask_utils.decode(dict(rec["segmentation"], counts=rec["segmentation"]["counts"].encode()))
        assert np.array_equal(got.astype(bool), m)


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
        os.remove(os.path.join(tmp_path / "ray", "shard-000001.json"))
        rerun = run_ray(files, str(tmp_path / "ray"), kwargs, shard_size=2, num_workers=1, progress=False)
        assert (rerun.shards_written, rerun.shards_skipped, rerun.images) == (1, 2, 2)
        assert read_results(str(tmp_path / "ray")) == first
        # boxes from a detector stage reach the actors by path; a listed file that is gone is an error row
        gone = str(tmp_path / "gone.png")
        boxes = {files[0]: {"boxes": [[10, 10, 60, 70]]}, files[2]: {"boxes": [[0, 0, 40, 40], [5, 5, 90, 80]]}}
        box_kwargs = dict(kwargs, mode="boxes")
        mixed = run_ray([files[0], files[2], gone], str(tmp_path / "boxes"), box_kwargs, shard_size=2,
                        prompts=boxes, batch_size=2, progress=False)
        assert (mixed.images, mixed.annotations, mixed.errors) == (3, 3, 1)
    finally:
        ray.shutdown()
    run_shards(SegmentWorker(**kwargs), files, str(tmp_path / "loop"), shard_size=2, progress=False)
    assert read_results(str(tmp_path / "ray")) == read_results(str(tmp_path / "loop"))
    got = read_results(str(tmp_path / "boxes"))
    assert [e["file_name"] for e in got["errors"]] == [gone] and "cannot read" in got["errors"][0]["error"]
    run_shards(SegmentWorker(**box_kwargs), [files[0], files[2], gone], str(tmp_path / "boxes-loop"), shard_size=2,
               prompts=boxes, progress=False)
    want = read_results(str(tmp_path / "boxes-loop"))
    assert got["annotations"] == want["annotations"] and got["images"] == want["images"]


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
