"""Distillation: win back the quality a faster encoder gives up.

Dilated attention, pruning or a smaller encoder make SAM faster and change the function it computes.
:func:`distill` trains such a *student* to reproduce its *teacher* on a user's own images:

>>> from sam_fast import Branch
>>> from sam_fast.distill import dilated_student, distill, evaluate
>>> student = dilated_student(teacher, Branch((64, 64), (2, 2)))        # dilated global blocks
>>> result = distill(teacher, student, "photos/", out_dir="run", method="dld", steps=2000)
>>> print(evaluate(student, teacher, "held_out/").table())
>>> sam = sam_fast.load_sam("run/student.pt")                     # pattern restored and applied

Methods: ``"dld"`` (dynamic layer-wise distillation, :class:`DLDSchedule`), ``"embedding"`` and
``"full_stage"`` (encoder and decoder with online hard prompts); ``decoder_steps`` adds decoder alignment.
See :mod:`sam_fast.distill.train` for the loop, :mod:`~.cache` for the teacher cache, :mod:`~.prompts`
for prompt sampling and :mod:`~.losses` for the losses. ``torchrun --nproc_per_node N`` runs the same
call with DistributedDataParallel.
"""

from .evaluate import EvalResult, evaluate, plot_results
from .schedule import DLDSchedule, lr_factor, schedule_picture
from .students import FeatureAdapters, check_pattern_covers, dilated_patterns, dilated_student
from .train import METHODS, DistillConfig, DistillResult, distill, read_log

__all__ = ["DLDSchedule", "DistillConfig", "DistillResult", "EvalResult", "FeatureAdapters", "METHODS",
           "check_pattern_covers", "dilated_patterns", "dilated_student", "distill", "evaluate", "lr_factor",
           "plot_results", "read_log", "schedule_picture"]
