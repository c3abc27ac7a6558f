"""DC-ViT-style block compression: remove the attention of the blocks that need it least.

A block without attention keeps ``norm2`` and its MLP and computes ``x + mlp(norm2(x))``
(:class:`sam_fast.models.vit.MlpBlock`, the format ``load_sam`` reads). Which blocks lose their attention is decided
by measurement on a few images: for each block, the image embedding's SQNR against the original when that block
alone has its attention removed; the ``blocks`` with the highest SQNR (the least damage) go.
"""

from __future__ import annotations

import copy
import os
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from tqdm import tqdm

from .._args import int_arg
from ..metrics import sqnr_db
from ..models.vit import MlpBlock
from ..surgery import find_encoder
from .importance import _encoder_inputs


def _without_attention(block: nn.Module) -> MlpBlock:
    """``block``'s norm2 and MLP as an attention-free block (weights copied)."""
    mlp = MlpBlock(int(block.norm2.normalized_shape[0]), int(block.mlp.lin1.out_features))
    mlp.norm2.load_state_dict(block.norm2.state_dict())
    mlp.norm2.eps = block.norm2.eps
    mlp.mlp.load_state_dict(block.mlp.state_dict())
    param = next(block.parameters())
    return mlp.to(device=param.device, dtype=param.dtype)


def attention_removal_sqnr(model: nn.Module, images, *, num_images: int = 8, batch_size: int = 4,
                           progress: bool = True) -> Dict[int, float]:
    """For every block of ``model``'s encoder that has attention: the embedding SQNR (dB) against the original
    when that block alone computes ``x + mlp(norm2(x))``, on ``num_images`` images (files, a folder, or encoder
    inputs). Higher: the block's attention matters less. The model is not modified. ``progress``: a bar over the
    blocks."""
    num_images = int_arg(num_images, "num_images", 1)
    batch_size = int_arg(batch_size, "batch_size", 1)
    enc, _, _ = find_encoder(model)
    x = _encoder_inputs(model, images, num_images)
    dev = next(enc.parameters()).device
    was = enc.training
    enc.eval()
    out: Dict[int, float] = {}
    try:
        with torch.no_grad():
            batches = [x[i:i + batch_size].to(dev) for i in range(0, x.shape[0], batch_size)]
            ref = torch.cat([enc(b) for b in batches])
            for i, block in enumerate(tqdm(enc.blocks, desc="attention removal", unit="block",
                                           disable=not progress)):
                if getattr(block, "attn", None) is None:
                    continue
                enc.blocks[i] = _without_attention(block)
                try:
                    out[i] = sqnr_db(ref, torch.cat([enc(b) for b in batches]))
                finally:
                    enc.blocks[i] = block
    finally:
        enc.train(was)
    return out


def drop_attention(model: nn.Module, images, *, blocks: int, num_images: int = 8, batch_size: int = 4,
                   out_dir: Optional[str] = None, recover=None, device=None,
                   progress: bool = True) -> Tuple[nn.Module, List[int], Dict[int, float]]:
    """A copy of ``model`` in which the ``blocks`` attention blocks whose removal costs the least embedding SQNR
    (:func:`attention_removal_sqnr`, on ``num_images`` of ``images``) compute ``x + mlp(norm2(x))`` only. Returns
    ``(compressed model, the blocks chosen, every block's SQNR)``; the model passed in is not modified.

    With ``out_dir`` the copy is then recovered by distilling ``model`` into it on ``images`` (image files):
    :func:`sam_fast.distill.distill` with ``recover`` (a ``DistillConfig``; default ``method="dld"``, block by
    block: the compressed blocks learn to stand in for the attention they lost), ``device`` and ``progress``; the
    run (resumable) and ``compressed.pth`` (a :func:`sam_fast.save_sam` checkpoint) go to ``out_dir``. ``progress``
    shows bars for the measurement and the recovery."""
    from ..distill import DistillConfig, distill

    enc, _, _ = find_encoder(model)
    candidates = [i for i, b in enumerate(enc.blocks) if getattr(b, "attn", None) is not None]
    blocks = int_arg(blocks, "blocks", 1)
    if blocks >= len(candidates):
        raise ValueError(f"blocks={blocks}: the encoder has {len(candidates)} attention blocks and at least one "
                         "must keep its attention")
    if out_dir is not None:
        recover = DistillConfig(method="dld") if recover is None else recover
        if not isinstance(recover, DistillConfig):
            raise TypeError(f"recover must be a sam_fast.distill.DistillConfig, got {type(recover).__name__}")
        if isinstance(images, torch.Tensor):
            raise TypeError("images: the recovery (out_dir) reads image files; give a folder or a list of paths")
    elif recover is not None:
        raise ValueError("recover applies with out_dir (where the recovery's run and checkpoint go)")
    scores = attention_removal_sqnr(model, images, num_images=num_images, batch_size=batch_size, progress=progress)
    chosen = sorted(sorted(scores, key=lambda i: -scores[i])[:blocks])
    copied = copy.deepcopy(model)
    new_enc, _, _ = find_encoder(copied)
    for i in chosen:
        new_enc.blocks[i] = _without_attention(new_enc.blocks[i])
    if out_dir is not None:
        from ..checkpoint import save_sam

        distill(model, copied, images, out_dir=out_dir, config=recover, device=device, progress=progress)
        save_sam(copied, os.path.join(os.fspath(out_dir), "compressed.pth"))
    return copied, chosen, scores


__all__ = ["attention_removal_sqnr", "drop_attention"]
