"""The README's Python examples run, in order, as one script (docs that run).

Stand-ins, because no weights can be downloaded and there is no GPU here: ``"cuda"`` becomes the CPU;
each checkpoint the README names is written in its official key format from a random model
(``sam_vit_b_01ec64.pth``: a narrow SAM with ViT-B's 1024 input and 64 x 64 token grid, which
``sam_model_registry["vit_b"]`` is pointed at; SlimSAM-77 uniform and in its split-q/k/v global format;
MobileSAM's ``vit_t``). Everything else runs as written, and its results are checked below.
"""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _on_cpu(src: str) -> str:
    # a distillation of 2 steps, not 2000, on this CPU
    return (src.replace('device="cuda"', 'device="cpu"').replace(".cuda()", "").replace("steps=2000", "steps=2")
            .replace("batch_size=8", "batch_size=2"))


def _write_checkpoints(tmp_path):
    from test_models import _slimsam_format

    from sam_fast.models import build_sam, build_vit_t, tiny_sam

    torch.save(tiny_sam(img_size=1024, encoder_dim=32, encoder_heads=4).state_dict(), tmp_path / "sam_vit_b_01ec64.pth")
    import skimage.data
    from PIL import Image

    for folder, names in (("my_photos", ("astronaut", "coffee", "chelsea")), ("held_out_photos", ("rocket",))):
        (tmp_path / folder).mkdir()
        for name in names:
            Image.fromarray(getattr(skimage.data, name)()).save(tmp_path / folder / f"{name}.jpg")
    slim = build_sam("slimsam_77").state_dict()
    torch.save(slim, tmp_path / "SlimSAM-77-uniform.pth")
    torch.save(_slimsam_format(slim), tmp_path / "slimsam77_global_state_dict.pth")
    torch.save(build_vit_t().state_dict(), tmp_path / "mobile_sam.pt")


def _narrow_vit_b(checkpoint=None):
    from sam_fast.models import tiny_sam

    sam = tiny_sam(img_size=1024, encoder_dim=32, encoder_heads=4)  # 4 heads: a (2, 2) dilation tiles its grid
    sam.load_state_dict(torch.load(checkpoint, map_location="cpu"))
    return sam


def test_readme_examples_run(tmp_path, monkeypatch):
    import segment_anything

    import sam_fast

    blocks = _blocks()
    assert len(blocks) >= 5, "the README's Python examples moved: update this test"
    _write_checkpoints(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", _narrow_vit_b)
    env = {}
    for i, src in enumerate(blocks):
        try:
            exec(compile(_on_cpu(src), f"README.md python block {i + 1}", "exec"), env)
        except Exception as e:  # name the block, keep the traceback
            raise AssertionError(f"README python block {i + 1} failed: {type(e).__name__}: {e}") from e

    # What the examples promise, checked on what they produced.
    assert env["emb"].shape[-2:] == (64, 64) and env["emb"].dtype == torch.bfloat16
    assert env["rec"].backends() <= {"cpu", "reference"}  # CPU here; {'triton'} on a GPU
    assert env["lse"].shape == (1, 16, 4096) and env["lse"].dtype == torch.float32
    cal = env["cal"]
    assert "SQNR" in str(cal) and cal.embedding_sqnr_db > 20
    state = torch.load(tmp_path / "sam_w8a8.pt")
    assert any(v.dtype == torch.int8 for v in state.values()), "the saved W8A8 state holds no int8 weights"
    assert isinstance(env["slim"].image_encoder.blocks[0].attn.qkv, sam_fast.nn.Int8Linear)
    assert env["slim"].image_encoder.blocks[0].attn.qkv.weight.shape[0] == 3 * 12 * 14  # SlimSAM-77's width
    assert any(isinstance(m, sam_fast.nn.Int8Linear) for m in env["mobile"].image_encoder.modules())
    # A random model's masks miss SAM's default IoU / stability thresholds, so the record lists may be empty.
    assert isinstance(env["masks"], list) and all(isinstance(m["segmentation"]["counts"], str) for m in env["masks"])
    assert isinstance(env["fast"], list)
    out = env["out"]
    assert [o["masks"].shape[:2] for o in out] == [(2, 3), (1, 3)]
    assert out[0]["masks"].shape[2:] == env["image_a"].shape[:2]
    assert out[1]["masks"].shape[2:] == env["image_b"].shape[:2]
    assert env["run"].steps == 2 and (tmp_path / "distill_run" / "student.pt").is_file()
    assert sam_fast.distill.dilated_patterns(env["student"]) == {1: (sam_fast.Branch((64, 64), (2, 2)),),
                                                                 3: (sam_fast.Branch((64, 64), (2, 2)),)}

