"""docs/export.md's Python example runs as written (docs that run), with stand-ins: ``sam_vit_b_01ec64.pth`` is a
random tiny SAM (a 256-pixel input, 64 x 64 mask inputs), and its masks match segment_anything's decoder in
PyTorch."""

import re
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "export.md"


def test_export_doc_example_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    from segment_anything.utils.onnx import SamOnnxModel

    from sam_fast import save_sam
    from sam_fast.models import tiny_sam

    (block,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert "photo_input(sam, 1024)" in block and "(1, 1, 256, 256)" in block
    save_sam(tiny_sam(), str(tmp_path / "sam_vit_b_01ec64.pth"))
    monkeypatch.chdir(tmp_path)
    scope = {}
    code = block.replace("photo_input(sam, 1024)", "photo_input(sam, 256)")
    code = code.replace("(1, 1, 256, 256)", "(1, 1, 64, 64)")
    exec(compile(code, str(DOC), "exec"), scope)
    assert "MatMulInteger x" in capsys.readouterr().out
    masks, embedding = scope["masks"], scope["embedding"]
    assert masks.shape == (1, 4, 768, 1024) and embedding.shape == (1, 32, 16, 16)
    sam = tiny_sam()  # the decoder in PyTorch on the file's embedding: the same masks
    with torch.no_grad():
        want = SamOnnxModel(sam, return_single_mask=False)(
            torch.from_numpy(embedding), torch.tensor([[[400.0, 300.0], [0.0, 0.0]]]), torch.tensor([[1.0, -1.0]]),
            torch.zeros(1, 1, 64, 64), torch.zeros(1), torch.tensor([768.0, 1024.0]))[0]
    assert float((torch.from_numpy(masks) - want).abs().max()) <= 1e-4 * float(want.abs().max())
