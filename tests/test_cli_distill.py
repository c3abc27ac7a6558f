"""``sam-fast distill`` / ``distill-eval`` end to end on a tiny teacher; the student in ``segment`` / ``inspect``."""

import json

import pytest
import skimage.data as data
from PIL import Image

from sam_fast.checkpoint import save_sam
from sam_fast.cli import main
from sam_fast.models import tiny_sam


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_distill")
    (root / "train").mkdir()
    (root / "held").mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(data, name)()).save(root / "train" / f"{name}.png")
    Image.fromarray(data.rocket()).save(root / "held" / "rocket.jpg")
    save_sam(tiny_sam(), str(root / "teacher.pth"))  # a 2-head decoder: save_sam records the head count
    return root


def test_distill_then_eval_segment_inspect(files, capsys):
    out = files / "run"
    argv = ["distill", "--teacher", str(files / "teacher.pth"), "--student", "dilated", "--pattern", "16x16:2x1",
            "--images", str(files / "train"), "--out", str(out), "--steps", "3", "--batch-size", "2"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "trained 3 steps on 3 images" in text and (out / "student.pt").is_file()
    assert main(argv) == 0  # the same command again: resumes the finished run, trains nothing
    assert "resumed at step 3" in capsys.readouterr().out

    assert main(["inspect", str(out / "student.pt")]) == 0
    text = capsys.readouterr().out
    assert "distilled student" in text and "block 1: segment (16, 16) dilation (2, 1)" in text

    seg = files / "seg"
    assert main(["segment", str(files / "held" / "rocket.jpg"), "--checkpoint", str(out / "student.pt"),
                 "--model-type", "auto", "--points", "200,300", "--out", str(seg)]) == 0
    assert "a distilled student" in capsys.readouterr().out and (seg / "rocket.json").is_file()

    ev = files / "eval"
    assert main(["distill-eval", "--teacher", str(files / "teacher.pth"), "--student", str(out / "student.pt"),
                 "--images", str(files / "held"), "--out", str(ev), "--prompts-per-image", "3"]) == 0
    assert "mask mIoU vs teacher, points" in capsys.readouterr().out
    result = json.loads((ev / "eval.json").read_text())
    assert 0 <= result["miou"]["boxes"] <= 1 and result["images"] == 1 and (ev / "eval.png").stat().st_size > 0


@pytest.mark.parametrize("extra, message", [
    (["--student", "dilated"], "--student dilated needs --pattern"),
    (["--student", "dilated", "--pattern", "16x16:2x2"], "pattern does not tile the 16x16 token grid"),
    (["--student", "dilated", "--pattern", "16x16:2"], None),
    (["--student", "dilated", "--pattern", "sixteen"], "--pattern: 'sixteen' is not a size"),
    (["--student", "dilated", "--pattern", "16x16:2x1", "--blocks", "1,x"], "--blocks must be"),
    (["--student", "dilated", "--pattern", "16x16:2x1", "--blocks", "-1"], "--blocks must be"),
    (["--student", "dilated", "--pattern", "8x8:\u00b2x1"], "--pattern: '\u00b2x1' is not a size"),
    (["--student", "nowhere.pth"], "does not exist"),
])
def test_distill_errors(files, tmp_path, capsys, extra, message):
    (tmp_path / "empty").mkdir()
    images = str(files / "train") if message is None else str(tmp_path / "empty")
    code = main(["distill", "--teacher", str(files / "teacher.pth"), "--images", images, "--out",
                 str(tmp_path / "o"), "--steps", "1", "--batch-size", "1", *extra])
    err = capsys.readouterr().err
    if message is None:  # "2" is a 2-D dilation (2, 2) for a 2-D segment: it does not tile either
        assert code == 2 and "does not tile" in err
    else:
        assert code == 2 and message in err, err


def test_distill_rerun_with_another_student_is_one_line(files, tmp_path, capsys):
    """A rerun of a run with another --student / --pattern: a one-line refusal saying what differs."""
    out = tmp_path / "run"
    base = ["distill", "--teacher", str(files / "teacher.pth"), "--images", str(files / "train"), "--out", str(out),
            "--steps", "1", "--batch-size", "1"]
    assert main([*base, "--student", "dilated", "--pattern", "16x16:2x1"]) == 0
    capsys.readouterr()
    assert main([*base, "--student", "dilated", "--pattern", "16x16:1x2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the student (its architecture or dilated pattern)" in err
    assert main([*base, "--student", str(files / "teacher.pth")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "the student" in err


def test_distill_eval_checks_its_output_before_working(files, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    assert main(["distill-eval", "--teacher", str(files / "teacher.pth"), "--student", str(files / "teacher.pth"),
                 "--images", str(files / "held"), "--out", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "taken" in err and "mIoU" not in err


def test_distill_empty_folder(files, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["distill", "--teacher", str(files / "teacher.pth"), "--student", "dilated", "--pattern", "16x16:2x1",
                 "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "images" in capsys.readouterr().err
