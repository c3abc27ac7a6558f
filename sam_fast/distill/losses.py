"""Distillation losses, each returned per image so that a batch's loss is the mean over its images (the
same value however the batch is split across processes and accumulation steps).

* :func:`feature_loss` - normalised squared error ``||s - t||^2 / ||t||^2`` of one image's features (an
  embedding, a block output): scale-free, so blocks whose activations grow with depth weigh alike, and
  ``-10 log10`` of it is the features' SQNR in dB.
* :func:`mask_loss` - student vs teacher mask logits: the per-pixel KL divergence between the two
  Bernoulli distributions (binary cross-entropy against the teacher's probabilities minus the teacher's
  own entropy, so a perfect student scores 0), averaged over pixels and masks. (Measured on small
  models: adding a Dice term or thresholding the teacher's masks into hard targets made the students'
  masks agree *less* with the teacher's, because most pixels of a mask logit map sit near 0.)
* :func:`iou_loss` - squared error of the predicted IoUs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(B,) normalised squared error of (B, ...) student features against the teacher's (float32)."""
    s, t = student.float().flatten(1), teacher.float().flatten(1)
    return (s - t).pow(2).sum(1) / t.pow(2).sum(1).clamp_min(1e-12)


def mask_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Scalar: mean per-pixel KL(teacher || student) of the (..., h', w') mask logits' Bernoulli distributions."""
    s, t = student_logits.float(), teacher_logits.float()
    target = torch.sigmoid(t)
    return (F.binary_cross_entropy_with_logits(s, target) - F.binary_cross_entropy_with_logits(t, target))


def iou_loss(student_iou: torch.Tensor, teacher_iou: torch.Tensor) -> torch.Tensor:
    """Scalar: mean squared error of predicted IoUs."""
    return (student_iou.float() - teacher_iou.float()).pow(2).mean()
