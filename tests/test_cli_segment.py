"""``sam-fast segment``: prompts and everything mode end to end on a tiny checkpoint; checkpoint errors."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from skimage import data

from sam_fast.cli import main
from sam_fast.reference.postprocess import coco_counts
from sam_fast.models import load_sam, tiny_sam


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("segment")
    ckpt = root / "tiny.pth"
    torch.save(tiny_sam().state_dict(), ckpt)
    images = []
    for name, step in (("astronaut", 3), ("coffee", 4)):
        path = root / f"{name}.png"
        Image.fromarray(np.ascontiguousarray(getattr(data, name)()[::step, ::step])).save(path)
        images.append(str(path))
    return root, str(ckpt), images


def _check_outputs(out, images):
    for path in images:
        name = os.path.splitext(os.path.basename(path))[0]
        with open(out / f"{name}.json") as f:
            coco = json.load(f)
        H, W = coco["images"][0]["height"], coco["images"][0]["width"]
        assert coco["annotations"]
        for ann in coco["annotations"]:
            seg = ann["segmentation"]
            mask = mask_utils.decode(dict(seg, counts=seg["counts"].encode()))
            assert mask.shape == (H, W) and int(mask.sum()) == ann["area"]
            assert coco_counts(seg["counts"]) == _counts_of(mask)
        assert Image.open(out / f"{name}.png").size == (W, H)
    return coco


def _counts_of(mask):
    flat = mask.flatten(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return counts if flat[0] == 0 else [0] + counts


def test_segment_points_and_box(files, tmp_path):
    root, ckpt, images = files
    rc = main(["segment", *images, "--checkpoint", ckpt, "--model-type", "tiny", "--points", "40,60",
               "--points", "100,20,0", "--box", "10,10,150,120", "--out", str(tmp_path)])
    assert rc == 0
    coco = _check_outputs(tmp_path, images)
    assert len(coco["annotations"]) == 1  # several prompts: one mask


def test_segment_everything_hierarchical(files, tmp_path):
    root, ckpt, images = files
    rc = main(["segment", images[0], "--checkpoint", ckpt, "--model-type", "tiny", "--everything",
               "--hierarchical", "--points-per-side", "8", "--out", str(tmp_path)])
    assert rc == 0
    assert os.path.exists(tmp_path / "astronaut.json") and os.path.exists(tmp_path / "astronaut.png")


def test_segment_errors_name_the_file(files, tmp_path, capsys):
    root, ckpt, images = files
    assert main(["segment", images[0], "--checkpoint", str(root / "nope.pth"), "--model-type", "tiny",
                 "--everything", "--out", str(tmp_path)]) == 2
    assert "nope.pth does not exist" in capsys.readouterr().err
    assert main(["segment", images[0], "--checkpoint", ckpt, "--model-type", "vit_b", "--everything",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "tiny.pth does not match model type vit_b" in err
    assert main(["segment", images[0], "--checkpoint", ckpt, "--model-type", "tiny", "--out", str(tmp_path)]) == 2
    assert "--everything" in capsys.readouterr().err
    assert main(["segment", str(root / "missing.png"), "--checkpoint", ckpt, "--model-type", "tiny",
                 "--everything", "--out", str(tmp_path)]) == 2
    assert "missing.png does not exist" in capsys.readouterr().err


def test_load_sam_errors(files, tmp_path):
    root, ckpt, images = files
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"bad.pth is not a PyTorch checkpoint \(neither .* it starts with b'no'\)"):
        load_sam(str(bad), "tiny")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"\x80\x02 truncated pickle")
    with pytest.raises(ValueError, match="broken.pth could not be read as a PyTorch state_dict"):
        load_sam(str(broken), "tiny")
    partial = tmp_path / "partial.pth"
    state = tiny_sam().state_dict()
    state.pop("mask_decoder.iou_token.weight")
    torch.save(state, partial)
    with pytest.raises(ValueError, match="partial.pth does not match model type tiny: 1 missing keys"):
        load_sam(str(partial), "tiny")
    with pytest.raises(ValueError, match="model_type"):
        load_sam(ckpt, "vit_x")
    sam = load_sam(ckpt, "tiny")
    assert torch.equal(sam.mask_decoder.iou_token.weight, tiny_sam().mask_decoder.iou_token.weight)
