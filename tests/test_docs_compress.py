"""docs/compress.md's Python example runs as written (docs that run), with stand-ins: ``sam_vit_b_01ec64.pth`` is a
random tiny SAM, the photo folders hold scikit-image's photos, and the recovery takes 2
steps of 2 images instead of 2000 of 8."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "compress.md"


def test_compress_doc_example_runs(tmp_path, monkeypatch, capsys):
    from sam_fast import save_sam
    from sam_fast.models import tiny_sam
    from sam_fast.testing import write_photos

    (block,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert "steps=2000, batch_size=8" in block
    save_sam(tiny_sam(), str(tmp_path / "sam_vit_b_01ec64.pth"))  # (recording its 2-head decoder)
    write_photos(tmp_path / "my_photos", ["astronaut", "coffee", "chelsea"])
    write_photos(tmp_path / "held_out_photos", ["camera"])
    (tmp_path / "held_out_photos" / "camera.png").rename(tmp_path / "held_out_photos" / "rocket.jpg")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block.replace("steps=2000, batch_size=8", "steps=2, batch_size=2"), str(DOC), "exec"), scope)
    printed = capsys.readouterr().out
    assert "bottleneck" in printed and "of the MACs" in printed
    assert [s["stage"] for s in scope["result"].stages] == ["attention", "embed", "bottleneck"]
    assert scope["masks"].shape == (3, 512, 512) and scope["scores"].shape == (3,)
