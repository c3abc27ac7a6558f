"""``sam-fast prune``: a checkpoint in, a pruned checkpoint out, with the summary table; bad arguments are one-line
errors with exit status 2."""

import pytest
import torch

import sam_fast
from sam_fast.cli import main
from sam_fast.models import tiny_sam
from sam_fast.testing import write_photos


@pytest.fixture
def setup(tmp_path):
    images = tmp_path / "images"
    write_photos(images, ["astronaut", "coffee", "chelsea", "rocket"])
    ckpt = tmp_path / "sam.pth"
    sam_fast.save_sam(tiny_sam(), str(ckpt))
    return ckpt, images


def test_prune_command_writes_a_checkpoint_load_sam_reads_and_resumes_only_when_asked(setup, tmp_path, capsys):
    ckpt, images = setup
    out = tmp_path / "run"
    argv = ["prune", "--checkpoint", str(ckpt), "--images", str(images), "--out", str(out), "--widths",
            "embed=48,head_dim=16,mlp=100", "--drop-attention", "1", "--importance", "magnitude", "--method",
            "embedding", "--steps", "2", "--batch-size", "2", "--eval-images", "1", "--no-progress", "--device", "cpu"]
    code = main(argv)
    printed = capsys.readouterr().out
    assert code == 0, printed
    for word in ("attention", "embed", "bottleneck", "GMACs", "point mIoU", "pruned model:"):
        assert word in printed
    pruned = sam_fast.load_sam(str(out / "bottleneck" / "pruned.pth"))
    enc = pruned.image_encoder
    assert enc.patch_embed.proj.out_channels == 48 and enc.blocks[1].mlp.lin1.out_features == 100
    assert sum(getattr(b, "attn", None) is None for b in enc.blocks) == 1
    with torch.no_grad():
        assert enc.eval()(torch.zeros(1, 3, 256, 256)).shape == (1, 32, 16, 16)
    assert main(argv) == 2 and "--resume" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 0
    assert capsys.readouterr().out.splitlines()[:5] == printed.splitlines()[:5]  # the report, read back


@pytest.mark.parametrize("args, message", [
    ([], "nothing to compress: give --ratio, --widths or --drop-attention"),
    (["--ratio", "0.5", "--widths", "embed=8"], "give --ratio or --widths, not both"),
    (["--drop-attention", "4"], "at least one must keep its attention"),
    (["--drop-attention", "1", "--eval-images", "0"], "eval_images must be an int >= 1"),
    (["--widths", "mlp=300"], "mlp must be an int <= 256"),
    (["--widths", "embed=8,depth=2"], "--widths must be embed=N,head_dim=N,mlp=N"),
    (["--widths", "embed=-8"], "--widths: embed must be a positive integer"),
    (["--ratio", "1.5"], "ratio must be a number <= 1"),
    (["--ratio", "0.5", "--steps", "0"], "nothing to train"),
])
def test_prune_command_refuses_bad_arguments(setup, tmp_path, capsys, args, message):
    ckpt, images = setup
    code = main(["prune", "--checkpoint", str(ckpt), "--images", str(images), "--out", str(tmp_path / "r")] + args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_prune_command_names_a_missing_checkpoint(tmp_path, capsys):
    code = main(["prune", "--checkpoint", str(tmp_path / "nope.pth"), "--images", str(tmp_path), "--out",
                 str(tmp_path / "r"), "--ratio", "0.5"])
    assert code == 2 and "--checkpoint" in capsys.readouterr().err
