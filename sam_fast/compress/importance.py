"""Which channels matter, measured on data: SlimSAM's disturbed first-order Taylor importance.

Pruning starts from a student that equals its teacher, so a distillation loss between them is zero and so is every
gradient: plain Taylor scores ``|w * dL/dw|`` say nothing. SlimSAM disturbs the teacher's output with Gaussian noise
(``sigma`` times the embedding's own standard deviation) so that the loss and its gradients are informative, and sums
``|w * dL/dw|`` over every weight a channel owns (:func:`sam_fast.compress.channel_groups`) and over the images.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from tqdm import tqdm

from .._args import float_arg, int_arg
from ..surgery import find_encoder
from .prune import Group, group_totals


def _encoder_inputs(model: nn.Module, images, num_images: int) -> torch.Tensor:
    """``images`` as the encoder's normalised input: a (N, 3, S, S) float tensor already preprocessed, or image
    files / a folder (read, resized and padded as segment_anything does)."""
    enc, mean, std = find_encoder(model)
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images as a tensor must be (N, 3, S, S) float encoder inputs, got {images.dtype} "
                             f"{tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("images: no image to measure on")
        return images[:num_images]
    import numpy as np

    from ..images import list_images, normalize, read_rgb, resize_pad

    files = list_images(images, "images")[:num_images]
    size = int(enc.img_size)
    padded, sizes = zip(*(resize_pad(read_rgb(f), size) for f in files))
    return normalize(torch.from_numpy(np.stack(padded)), torch.tensor(sizes), mean, std)


def taylor_scores(model: nn.Module, images, *, sigma: float = 0.01, num_images: int = 64, batch_size: int = 4,
                  seed: int = 0, draws: int = 1, teacher: Optional[nn.Module] = None,
                  progress: bool = True) -> Dict[Group, torch.Tensor]:
    """Disturbed Taylor importance of every channel group of ``model``'s image encoder (see the module docstring).

    Args:
        model: a segment_anything ``Sam`` or ``ImageEncoderViT``; its weights are not changed (gradients are
            taken on a copy of the encoder's parameters' ``.grad`` and cleared after).
        images: a folder or list of image files, or a (N, 3, S, S) float tensor of encoder inputs.
        sigma: the disturbance, relative to the embedding's standard deviation; 0 gives plain Taylor scores,
            all zero for an unpruned model.
        num_images, batch_size: how many images, in batches of how many.
        seed: the noise.
        draws: noise draws per batch, a forward and backward each. The scores are a Monte-Carlo estimate: for
            weight w their mean over the noise is proportional to ``|w| * ||d embedding / d w||``, and each draw
            is one random projection of that gradient, so few images need several draws to rank channels reliably.
        teacher: whose embedding, disturbed, is the target (a ``Sam`` or encoder with ``model``'s embedding shape:
            the original model when ``model`` is already pruned, as in the second stage of alternate slimming, so
            the scores measure what the recovery will have to restore); default ``model`` itself.
        progress: a progress bar over the images' forward and backward passes.
    Returns:
        ``{group: (width,) float64 scores}``, as :func:`sam_fast.compress.prune_to_widths` takes them.
    """
    sigma = float_arg(sigma, "sigma", minimum=0)
    num_images = int_arg(num_images, "num_images", 1)
    batch_size = int_arg(batch_size, "batch_size", 1)
    seed = int_arg(seed, "seed")
    draws = int_arg(draws, "draws", 1)
    enc, _, _ = find_encoder(model)
    target_enc = enc
    if teacher is not None:
        try:
            target_enc = find_encoder(teacher)[0]
        except TypeError as exc:
            raise TypeError(f"teacher: {exc}") from None
        if int(getattr(target_enc, "img_size", 0)) != int(enc.img_size):
            raise ValueError(f"teacher: its encoder takes {getattr(target_enc, 'img_size', '?')}-pixel images, the "
                             f"model's {enc.img_size}")
    x = _encoder_inputs(model, images, num_images)
    params = dict(enc.named_parameters())
    saved = {n: (p.requires_grad, p.grad) for n, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    dev = next(enc.parameters()).device
    was = enc.training, target_enc.training
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    try:
        enc.eval()
        target_enc.eval()
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        with tqdm(total=x.shape[0] * (draws if sigma else 1), desc="channel importance", unit="pass",
                  disable=not progress) as bar:
            for i in range(0, x.shape[0], batch_size):
                xb = x[i:i + batch_size].to(dev)
                with torch.no_grad():
                    target = target_enc(xb.to(next(target_enc.parameters()).device)).to(dev)
                scale = sigma * target.std()
                for _ in range(draws if sigma else 1):
                    disturbed = target
                    if sigma:
                        disturbed = target + scale * torch.randn(target.shape, generator=gen).to(target)
                    out = enc(xb)
                    if out.shape != target.shape:
                        raise ValueError(f"teacher: its embedding is {tuple(target.shape)}, the model's "
                                         f"{tuple(out.shape)}")
                    loss = (out - disturbed).pow(2).mean()
                    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                    for (n, p), g in zip(params.items(), grads):
                        if g is not None:
                            acc[n] += (p.detach().double() * g.double()).abs()
                    bar.update(xb.shape[0])
    finally:
        for n, p in params.items():
            p.requires_grad_(saved[n][0])
            p.grad = saved[n][1]
        enc.train(was[0])
        target_enc.train(was[1])
    return group_totals(acc, model)


__all__ = ["taylor_scores"]
