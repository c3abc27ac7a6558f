"""Run by test_distill_ddp.py, as one process or under ``torch.distributed.run``: the same tiny distillation, once per
method named (comma-separated), each into ``OUT/<method>``: one launch covers every method.

Under torchrun the first run joins the process group itself (distill's own path: it starts the group from torchrun's
environment and ends it); the later ones share a group this script starts, on a rendezvous of its own (a group
cannot be started twice on torchrun's store)."""

import os
import sys

import torch

from sam_fast import Branch
from sam_fast.distill import dilated_student, distill
from sam_fast.models import tiny_sam

if __name__ == "__main__":
    images, out, methods = sys.argv[1:4]
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for n, method in enumerate(methods.split(",")):
        if world > 1 and n == 1:
            os.environ["MASTER_PORT"] = str(int(os.environ["MASTER_PORT"]) + 1)
            os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"  # rank 0 hosts this rendezvous' store
            torch.distributed.init_process_group("gloo")
        teacher = tiny_sam()
        student = dilated_student(teacher, [Branch((16, 16), (2, 1))])
        res = distill(teacher, student, images, out_dir=f"{out}/{method}", method=method, steps=3,
                      decoder_steps=2 if method == "dld" else 0, batch_size=4, lr=3e-4, progress=False,
                      prompts_per_image=2, checkpoint_every=2)
        open(f"{out}/{method}/rank{res.rank}_of_{res.world_size}", "w").close()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
