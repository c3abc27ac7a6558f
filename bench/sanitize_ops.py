"""Run every C++/CUDA op of sam_fast once on small CUDA inputs, for compute-sanitizer.

    compute-sanitizer --tool memcheck python bench/sanitize_ops.py
    compute-sanitizer --tool racecheck python bench/sanitize_ops.py

Each op runs on shapes that hit its edges (partial warps and blocks, a crop inside a frame, masks
that are empty, full and ragged) and its result is checked against the CPU kernel, so a run that
the sanitizer passes also says the CUDA result was right.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_ops: needs a CUDA GPU", file=sys.stderr)
        return 2
    import sam_fast
    from sam_fast.ops.postprocess import mask_postprocess

    table = torch.randn(27, 40)
    torch.testing.assert_close(sam_fast.resize_rel_pos(table.cuda(), 63, backend="cuda").cpu(),
                               sam_fast.resize_rel_pos(table, 63, backend="cpu"))
    g = torch.Generator().manual_seed(0)
    logits = F.interpolate(torch.randn(9, 1, 6, 6, generator=g) * 8, (64, 64), mode="bicubic")[:, 0]
    logits[0] = -1.0
    logits[1] = 1.0
    for kw in (dict(input_size=(256, 171), original_size=(75, 50)),
               dict(input_size=(256, 256), original_size=(33, 33), crop_box=(3, 0, 36, 33), image_size=(33, 40)),
               dict(input_size=(200, 256), original_size=(37, 47), crop_box=(5, 6, 52, 43), image_size=(50, 60))):
        cpu = mask_postprocess(logits, padded_size=(256, 256), return_masks=True, backend="cpu", **kw)
        cuda = mask_postprocess(logits.cuda(), padded_size=(256, 256), return_masks=True, backend="cuda", **kw)
        assert torch.equal(cuda.area.cpu(), cpu.area), kw
        assert torch.equal(cuda.rle_counts.cpu(), cpu.rle_counts), kw
        assert torch.equal(cuda.masks.cpu(), cpu.masks), kw
    torch.cuda.synchronize()
    print("sanitize_ops: all CUDA ops ran and matched the CPU kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
