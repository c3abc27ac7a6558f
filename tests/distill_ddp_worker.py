"""Run by test_distill_ddp.py, as one process or under ``torch.distributed.run``: the same tiny distillation."""

import sys

import torch

from sam_fast import Branch
from sam_fast.distill import dilated_student, distill
from sam_fast.models import tiny_sam

if __name__ == "__main__":
    images, out, method = sys.argv[1:4]
    torch.set_num_threads(1)
    teacher = tiny_sam()
    student = dilated_student(teacher, [Branch((16, 16), (2, 1))])
    res = distill(teacher, student, images, out_dir=out, method=method, steps=3,
                  decoder_steps=2 if method == "dld" else 0, batch_size=4, lr=3e-4, progress=False,
                  prompts_per_image=2, checkpoint_every=2)
    open(f"{out}/rank{res.rank}_of_{res.world_size}", "w").close()
