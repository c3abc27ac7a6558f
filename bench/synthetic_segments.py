"""A SAM decoder that really segments, for benchmarks that cannot download a checkpoint.

A random-weight decoder gives one near-identical mask for every point: non-maximum suppression keeps one
mask, and TinySAM's hierarchical mode finds no confident mask and skips no point. Segment-everything
timings then leave out the work a trained SAM causes (hundreds of surviving masks to encode and
suppress), and the hierarchical mode cannot be measured at all. So the everything benchmark trains the
decoder it times, in seconds, on a synthetic scene whose segments are known:

* the image is cut into ``n_regions`` Voronoi cells (random seeds, a fixed generator);
* the image embedding holds one random code vector per cell (each embedding position takes the code of
  the cell at its centre), which is what a perfect encoder would hand the decoder;
* the prompt encoder and mask decoder learn, from single positive points, to return the cell under the
  point - all mask outputs, logits pushed past +-12 so SAM's thresholds and stability offsets behave
  as on a trained model - and to predict each mask's IoU.

The timings then measure the decoder side on masks shaped like real segments (many survive, they have
boundaries to encode); the decoder's weights are learnt, its shapes are SAM's. Nothing here claims
accuracy on real images.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F


def voronoi_labels(side: int, n_regions: int, seed: int = 0) -> torch.Tensor:
    """(side, side) int64 cell index of every pixel: nearest of ``n_regions`` seeds drawn in the unit
    square (a fixed generator, so every run and machine gets the same scene)."""
    if n_regions < 1:
        raise ValueError(f"n_regions must be >= 1, got {n_regions}")
    g = torch.Generator().manual_seed(seed)
    seeds = torch.rand(n_regions, 2, generator=g)
    centres = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    yy, xx = torch.meshgrid(centres, centres, indexing="ij")
    d = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    return d.argmin(dim=-1)


def region_embedding(labels: torch.Tensor, channels: int, grid: int, seed: int = 0) -> torch.Tensor:
    """(1, channels, grid, grid) embedding: each position holds the code of the cell at its centre
    (``labels`` is the cell map at any multiple of ``grid``)."""
    side = labels.shape[0]
    if side % grid:
        raise ValueError(f"labels side {side} is not a multiple of the embedding grid {grid}")
    g = torch.Generator().manual_seed(seed + 1)
    codes = torch.randn(int(labels.max()) + 1, channels, generator=g)
    step = side // grid
    centre = labels[step // 2::step, step // 2::step]  # (grid, grid)
    return codes[centre].permute(2, 0, 1)[None].contiguous()


def train_segmenting_decoder(sam, n_regions: int = 48, steps: int = 300, points_per_step: int = 32,
                             lr: float = 3e-3, margin: float = 12.0, seed: int = 0,
                             progress: Optional[Callable] = None) -> Dict[str, object]:
    """Train ``sam``'s prompt encoder and mask decoder in place (float32, on ``sam``'s device) to segment
    the Voronoi scene; returns ``embedding`` (1, C, h, w) for a stub encoder, the low-resolution cell map
    ``labels`` and the last steps' mean IoU of the best mask ``mean_iou``."""
    if steps < 1 or points_per_step < 1:
        raise ValueError(f"steps and points_per_step must be >= 1, got {steps} and {points_per_step}")
    dev = next(sam.parameters()).device
    img = sam.image_encoder.img_size
    h, w = sam.prompt_encoder.image_embedding_size
    low = 4 * h  # the decoder's mask side
    labels = voronoi_labels(low, n_regions, seed).to(dev)
    emb = region_embedding(labels.cpu(), sam.prompt_encoder.embed_dim, h, seed).to(dev)
    params = list(sam.mask_decoder.parameters()) + list(sam.prompt_encoder.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    warm = max(1, steps // 10)  # linear warm-up, then cosine decay to zero

    def factor(i):
        return (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    g = torch.Generator(device=dev).manual_seed(seed + 2)
    ious = []
    sam.train()
    steps_iter = range(steps) if progress is None else progress(range(steps))
    for _ in steps_iter:
        coords = torch.rand(points_per_step, 1, 2, device=dev, generator=g) * img
        point_labels = torch.ones(points_per_step, 1, dtype=torch.int, device=dev)
        cell = labels[(coords[:, 0, 1] * low / img).long().clamp_max(low - 1),
                      (coords[:, 0, 0] * low / img).long().clamp_max(low - 1)]
        target = (labels[None] == cell[:, None, None]).float()[:, None]  # (P, 1, low, low)
        sparse, dense = sam.prompt_encoder(points=(coords, point_labels), boxes=None, masks=None)
        logits, iou_pred = sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                            multimask_output=True)
        sign = 2 * target - 1
        hinge = (F.relu(margin - sign * logits) / margin).pow(2)  # (P, 3, low, low)
        # each mask's cell and background weigh the same (a cell is a few percent of the image)
        pos = target.sum((2, 3)).clamp_min(1)
        neg = (1 - target).sum((2, 3)).clamp_min(1)
        mask_loss = ((hinge * target).sum((2, 3)) / pos + (hinge * (1 - target)).sum((2, 3)) / neg).mean()
        with torch.no_grad():
            pred = logits > 0
            inter = (pred & (target > 0)).flatten(2).sum(-1).float()
            union = (pred | (target > 0)).flatten(2).sum(-1).float().clamp_min(1)
            iou = inter / union  # (P, 3)
        loss = mask_loss + F.mse_loss(iou_pred, iou)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ious.append(float(iou.max(dim=1).values.mean()))
    sam.eval()
    tail = ious[-max(1, steps // 10):]
    return {"embedding": emb.detach(), "labels": labels, "n_regions": n_regions, "mean_iou": sum(tail) / len(tail)}
