"""Time-varying weights: the dynamic layer-wise distillation (DLD) schedule and the learning rate.

DLD weights
-----------
A student with the teacher's depth ``L`` is distilled block by block: the loss of block ``i`` is the
normalised squared error between the student's and the teacher's block outputs (see
:mod:`sam_fast.distill.losses`), weighted by ``w_i(p)`` where ``p = step / total_steps`` in [0, 1].
The first ``initial`` blocks keep the full weight 1 throughout: errors there reach every later block, and the
published method keeps the initial layers at the maximum weight for the whole run. The last ``focal`` blocks
(the ones closest to the embedding) are *focal*: always weighted ``focal_weight``. The other blocks, of the
``M = L - focal`` before the focal ones, follow a *front* that sweeps from block 0 to block ``M`` during the first
``transition`` of training::

    c(p)  = M * min(p / transition, 1)                          the front's position (in blocks)
    w_i(p) = 1                                                   i < initial
    w_i(p) = max(floor, 1 - (c(p) - i) * (1 - floor) / width)    i <= c(p): reached, decays to floor
    w_i(p) = max(0,     1 - (i - c(p)) / width)                  i >  c(p): ahead, fades in

So at the start the early blocks, whose errors every later block inherits, are aligned first. As the front
moves, the weight shifts to later blocks, and blocks it has passed keep at least ``floor``, so nothing aligned
early is forgotten. From ``p = transition`` on the weights are constant. The picture for ``L = 12``,
``initial = 1``, ``focal = 2``, ``width = 2``, ``floor = 0.1`` (rows: blocks 0..11; columns: p = 0, 0.15, 0.3,
0.45, 0.6, 1; ``#`` = 1, ``+`` >= 0.5, ``.`` > 0, blank = 0; :func:`schedule_picture` draws it)::

    block  0   # # # # # #   initial
    block  1   + . . . . .
    block  2     + . . . .
    block  3     + . . . .
    block  4     . + . . .
    block  5       # . . .
    block  6       + . . .
    block  7         + . .
    block  8         + . .
    block  9         . + +   (the front stops at M = 10)
    block 10   # # # # # #   focal
    block 11   # # # # # #   focal

``initial = 0`` lets block 0 decay to ``floor`` like the others once the front has passed it (docs/distill.md has
the measured comparison).

Learning rate
-------------
Linear warm-up from 0 over ``warmup_steps``, then a cosine from the peak down to ``min_lr_ratio`` of it
at the last step (:func:`lr_factor`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import List

from .._args import float_arg, int_arg


@dataclasses.dataclass(frozen=True)
class DLDSchedule:
    """The DLD layer weights (module docstring).

    Args:
        initial: how many of the first blocks keep weight 1 throughout (>= 0; default 1, block 0).
        focal: how many of the last blocks are always distilled (>= 1).
        transition: fraction of training over which the front sweeps the non-focal blocks (0, 1].
        width: how many blocks a weight takes to fade in ahead of the front or decay behind it (> 0).
        floor: the weight a block keeps once the front has passed it, in [0, 1].
        focal_weight: the focal blocks' constant weight (> 0).
        embedding_weight: the weight of the final image-embedding loss (>= 0).
    """

    focal: int = 2
    transition: float = 0.6
    width: float = 2.0
    floor: float = 0.1
    focal_weight: float = 1.0
    embedding_weight: float = 1.0
    initial: int = 1

    def __post_init__(self):
        checked = dict(focal=int_arg(self.focal, "DLDSchedule focal", 1),
                       initial=int_arg(self.initial, "DLDSchedule initial", 0),
                       transition=float_arg(self.transition, "DLDSchedule transition", positive=True, maximum=1),
                       width=float_arg(self.width, "DLDSchedule width", positive=True),
                       floor=float_arg(self.floor, "DLDSchedule floor", minimum=0, maximum=1),
                       focal_weight=float_arg(self.focal_weight, "DLDSchedule focal_weight", positive=True),
                       embedding_weight=float_arg(self.embedding_weight, "DLDSchedule embedding_weight", minimum=0))
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def check_depth(self, depth: int, name: str = "student") -> None:
        if self.focal > depth:
            raise ValueError(f"{name}: DLD with focal={self.focal} needs at least {self.focal} blocks, the encoder "
                             f"has {depth}")

    def weights(self, depth: int, progress: float) -> List[float]:
        """``[w_0(p), ..., w_{depth-1}(p)]`` at training progress ``p`` in [0, 1] (clipped)."""
        self.check_depth(depth, "depth")
        p = min(max(float(progress), 0.0), 1.0)
        moving = depth - self.focal
        front = moving * min(p / self.transition, 1.0)
        out = []
        for i in range(depth):
            if i >= moving:
                out.append(self.focal_weight)
            elif i < self.initial:
                out.append(1.0)
            elif i <= front:
                out.append(max(self.floor, 1.0 - (front - i) * (1.0 - self.floor) / self.width))
            else:
                out.append(max(0.0, 1.0 - (i - front) / self.width))
        return out


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    """The learning rate at optimizer step ``step`` (0-based) as a fraction of the peak: linear warm-up over
    ``warmup_steps`` (step 0 gets ``1 / warmup_steps``), then a cosine from 1 to ``min_lr_ratio`` ending at
    ``total_steps - 1``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps - 1, 1)
    t = min(max((step - warmup_steps) / span, 0.0), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def schedule_picture(schedule: DLDSchedule, depth: int, progress=(0.0, 0.15, 0.3, 0.45, 0.6, 1.0)) -> str:
    """The schedule as text: one row per block, one column per progress value (``#`` = 1, ``+`` >= 0.5,
    ``.`` > 0, blank = 0)."""
    cols = [schedule.weights(depth, p) for p in progress]
    rows = []
    for i in range(depth):
        marks = " ".join("#" if w[i] >= 1.0 - 1e-9 else "+" if w[i] >= 0.5 else "." if w[i] > 0 else " " for w in cols)
        tag = "   focal" if i >= depth - schedule.focal else "   initial" if i < schedule.initial else ""
        rows.append(f"block {i:2d}   {marks}".rstrip() + tag)
    return "\n".join(rows)
