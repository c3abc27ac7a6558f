"""``sam-fast segment``: prompts and everything mode end to end on a tiny checkpoint; checkpoint errors."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from skimage import data

from sam_fast.checkpoint import load_sam
from sam_fast.cli import main
from sam_fast.models import tiny_sam
from sam_fast.reference.mask_postprocess import coco_counts


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


# ---- nothing lost: inputs, clashing names and existing outputs ----

def _seg(ckpt, images, out, *extra):
    return main(["segment", *map(str, images), "--checkpoint", ckpt, "--model-type", "tiny", "--points", "40,60",
                 "--out", str(out), *extra])


def test_segment_never_writes_over_an_input(files, tmp_path, capsys):
    root, ckpt, images = files
    inside = tmp_path / "astronaut.png"
    inside.write_bytes(open(images[0], "rb").read())
    before = inside.read_bytes()
    assert _seg(ckpt, [inside], tmp_path) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert inside.read_bytes() == before and not (tmp_path / "astronaut.json").exists()


def test_segment_gives_clashing_inputs_distinct_outputs(files, tmp_path, capsys):
    root, ckpt, images = files
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    im = Image.open(images[1])
    im.save(a / "photo.png")
    im.save(b / "photo.png")
    im.save(a / "photo.jpg")
    out = tmp_path / "out"
    assert _seg(ckpt, [a / "photo.png", b / "photo.png", a / "photo.jpg"], out) == 0
    printed = capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["photo_jpg.json", "photo_jpg.png", "photo_png.json", "photo_png.png",
                                       "photo_png_2.json", "photo_png_2.png"]
    assert "wrote 3 of 3 image(s)" in printed and "photo_png_2.json" in printed
    for name, src in (("photo_png", "a/photo.png"), ("photo_png_2", "b/photo.png"), ("photo_jpg", "a/photo.jpg")):
        with open(out / f"{name}.json") as f:
            assert json.load(f)["images"][0]["file_name"] == os.path.basename(src)


def test_segment_keeps_existing_outputs_unless_told(files, tmp_path, capsys):
    root, ckpt, images = files
    (tmp_path / "coffee.json").write_text("mine")
    assert _seg(ckpt, images, tmp_path) == 2
    assert "coffee.json already exist; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "coffee.json").read_text() == "mine" and not (tmp_path / "astronaut.json").exists()
    assert _seg(ckpt, images, tmp_path, "--overwrite") == 0
    _check_outputs(tmp_path, images)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".sam-fast-")]  # no temporary files left


@pytest.mark.parametrize("argv,message", [
    (["--points", "nan,5"], "--points must be finite numbers"),
    (["--points", "1e400,5"], "--points must be finite numbers"),
    (["--points", "40,60,5"], "label must be 1 (foreground) or 0 (background)"),
    (["--points", "40,60,0.5"], "label must be 1 (foreground) or 0 (background)"),
    (["--everything", "--points-per-side", "0"], "--points-per-side must be at least 1"),
])
def test_segment_bad_arguments_are_one_line_messages(files, tmp_path, capsys, argv, message):
    root, ckpt, images = files
    rc = main(["segment", images[0], "--checkpoint", ckpt, "--model-type", "tiny", *argv, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not os.listdir(tmp_path)


def test_segment_environment_errors_are_messages(files, tmp_path, capsys):
    root, ckpt, images = files
    base = ["--checkpoint", ckpt, "--model-type", "tiny", "--everything"]
    if not torch.cuda.is_available():
        assert main(["segment", images[0], *base, "--device", "cuda", "--out", str(tmp_path)]) == 2
        assert "--device cuda, but this machine has no CUDA GPU" in capsys.readouterr().err
    assert main(["segment", str(root), *base, "--out", str(tmp_path)]) == 2
    assert "is a directory; give image files" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["segment", images[0], *base, "--out", str(blocker / "sub")]) == 2
    assert f"--out {blocker / 'sub'}" in capsys.readouterr().err
    assert main(["segment", images[0], "--checkpoint", str(root), "--model-type", "tiny", "--everything",
                 "--out", str(tmp_path / "o")]) == 2
    assert "is a directory without a config.json; expected a SAM tiny state_dict file" in capsys.readouterr().err
    assert main(["segment", images[0], "--checkpoint", ckpt, "--model-type", "auto", "--everything",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "32-wide mask decoder" in err and "--decoder-heads N" in err  # an option segment has
    assert main(["segment", images[0], "--checkpoint", ckpt, "--model-type", "auto", "--decoder-heads", "3",
                 "--everything", "--out", str(tmp_path / "o")]) == 2
    assert "decoder_heads=3 does not divide the checkpoint's 32-wide mask decoder" in capsys.readouterr().err
    assert main(["segment", images[0], "--checkpoint", ckpt, "--model-type", "auto", "--decoder-heads", "2",
                 "--everything", "--points-per-side", "4", "--out", str(tmp_path / "o")]) == 0


def test_segment_reads_16_bit_images_without_saturating(tmp_path):
    from sam_fast.images import read_rgb as _read_rgb

    ramp = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)  # 0 .. 64491
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    rgb = _read_rgb(str(tmp_path / "deep.png"))
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 0], np.round(ramp / 65535 * 255).astype(np.uint8))
    assert len(np.unique(rgb)) > 200  # a ramp; the 8-bit conversion saturated it to white


def test_segment_reports_images_it_cannot_segment_and_goes_on(files, tmp_path, capsys):
    root, ckpt, images = files
    thin = tmp_path / "thin.png"
    Image.fromarray(np.zeros((1, 800, 3), np.uint8)).save(thin)  # a 1-pixel side that resizes to 0
    out = tmp_path / "out"
    assert _seg(ckpt, [thin, images[0]], out) == 1
    captured = capsys.readouterr()
    assert "cannot segment" in captured.err and "short side becomes 0 pixels" in captured.err
    assert "wrote 1 of 2 image(s)" in captured.out and (out / "astronaut.json").exists()


def test_load_sam_refuses_what_it_cannot_trust(tmp_path):
    state = tiny_sam().state_dict()
    key = "image_encoder.pos_embed"
    huge = dict(state)
    huge[key] = torch.zeros(1, 1, 1, state[key].shape[-1]).expand(1, 5000, 5000, state[key].shape[-1])
    torch.save(huge, tmp_path / "huge.pth")
    assert os.path.getsize(tmp_path / "huge.pth") < 2 * 2**20
    with pytest.raises(ValueError, match=r"image_encoder\.pos_embed claims shape \(1, 5000, 5000, \d+\)"):
        load_sam(str(tmp_path / "huge.pth"))
    shared = {k: (torch.zeros(v.numel()).view(v.shape) if v.is_floating_point() else v) for k, v in state.items()}
    base = torch.zeros(1 << 16)
    for i in range(200):  # many tensors over one storage: a small file claiming far more than it holds
        shared[f"image_encoder.blocks.{100 + i}.mlp.lin1.weight"] = base.view(256, 256)
    torch.save(shared, tmp_path / "shared.pth")
    with pytest.raises(ValueError, match="share 0 MiB of stored data|but share"):
        load_sam(str(tmp_path / "shared.pth"))
    torch.save(nn_module := torch.nn.Linear(2, 2), tmp_path / "pickled.pth")
    assert nn_module is not None
    with pytest.raises(ValueError, match="runs code from the file.*weights_only=False executes whatever"):
        load_sam(str(tmp_path / "pickled.pth"))
    torch.save(state, tmp_path / "ok.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "ok.pth").read_bytes()[:4096])
    with pytest.raises(ValueError, match="damaged or truncated zip archive"):
        load_sam(str(tmp_path / "cut.pth"), "tiny")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        load_sam(str(tmp_path), "tiny")


def test_load_sam_checks_student_metadata_as_strictly_as_save_sam_writes_it(tmp_path):
    """A student checkpoint whose pattern does not tile the grid (tokens with zero attention) or whose metadata is
    malformed ("decoder_heads": true built num_heads=True) is refused, naming the checkpoint."""
    from sam_fast import Branch
    from sam_fast.checkpoint import save_sam
    from sam_fast.distill import dilated_student

    save_sam(dilated_student(tiny_sam(), Branch((16, 16), (2, 1))), str(tmp_path / "ok.pt"))
    good = torch.load(tmp_path / "ok.pt", weights_only=True)
    assert load_sam(str(tmp_path / "ok.pt")).sam_fast_config is not None

    def variant(name, **meta):
        obj = {"model": good["model"], "sam_fast": dict(good["sam_fast"], **meta)}
        torch.save(obj, tmp_path / name)
        return str(tmp_path / name)

    bad_pattern = [{"segment": [8, 8], "dilation": [4, 4]}]  # 2 heads keep 2 of 16 offsets: 56 of 64 tokens unseen
    with pytest.raises(ValueError, match=r"bad\.pt: block 1's pattern does not tile the 16x16 token grid"):
        load_sam(variant("bad.pt", dilated={"1": bad_pattern}))
    with pytest.raises(ValueError, match="decoder_heads must be a positive int, got True"):
        load_sam(variant("heads.pt", decoder_heads=True))
    with pytest.raises(ValueError, match="fields this version does not know"):
        load_sam(variant("extra.pt", surprise=1))
    with pytest.raises(ValueError, match="is not a branch"):
        load_sam(variant("branch.pt", dilated={"1": [{"segment": [16, "x"], "dilation": 1}]}))
    with pytest.raises(ValueError, match="block 9, but the encoder has 4 blocks"):
        load_sam(variant("far.pt", dilated={"9": [{"segment": [16, 16], "dilation": [1, 1]}]}))
