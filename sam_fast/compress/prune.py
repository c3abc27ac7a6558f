"""Structured pruning of a segment_anything ViT image encoder to given widths.

What can be narrowed, and every tensor each choice touches (the *groups*; :func:`channel_groups` lists them):

* ``embed`` - the residual width all blocks share: the patch embedding's output channels, ``pos_embed``, every
  block's ``norm1`` / ``norm2``, the qkv and ``mlp.lin1`` input columns, the ``proj`` and ``mlp.lin2`` output rows,
  and the neck's input channels;
* ``head_dim`` of block i - the head count is kept and every head keeps the same dims (SAM's rel-pos tables are
  shared by the heads, and q and k must agree): the q, k and v rows of those dims in each head, the rel-pos tables'
  columns, and ``proj``'s input columns;
* ``mlp`` of block i - the hidden width: ``mlp.lin1``'s rows and bias, ``mlp.lin2``'s input columns. DC-ViT's
  attention-free blocks have only this one.

A group keeps its highest-scoring channels, in their original order. The scores are the caller's (``scores``) or
the weights' magnitudes (:func:`magnitude_scores`). The pruned model is built fresh from the sliced weights with
:mod:`sam_fast.models`' geometry reader, so it is exactly what ``load_sam(path)`` ("auto") builds from its
checkpoint; the model passed in is not modified. The softmax scale of a narrowed head is ``head_dim ** -0.5`` of the
new head dim, as segment_anything computes it (and as SlimSAM trains).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._args import int_arg
from ..models.vit import EncoderGeometry, build_image_encoder, encoder_geometry
from ..surgery import find_encoder

Group = Tuple  # ("embed",) | ("head_dim", block) | ("mlp", block)


@dataclasses.dataclass(frozen=True)
class Slice:
    """One tensor of a group: ``param`` (a key of the encoder's state_dict) along ``dim``. Group channel c is the
    tensor's index ``k * period + c`` for every k in ``range(repeat)`` (each of the q, k, v parts of every head of a
    qkv weight), or ``c`` when ``repeat`` is 1."""

    param: str
    dim: int
    repeat: int = 1
    period: int = 0

    def indices(self, keep: torch.Tensor) -> torch.Tensor:
        if self.repeat == 1:
            return keep
        return (torch.arange(self.repeat, device=keep.device)[:, None] * self.period + keep[None, :]).flatten()


def _blocks(encoder: nn.Module) -> List[nn.Module]:
    blocks = getattr(encoder, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not hasattr(encoder, "patch_embed") or not hasattr(encoder, "neck"):
        raise TypeError(f"model must be a segment_anything Sam or ImageEncoderViT (blocks, patch_embed, neck), got "
                        f"{type(encoder).__name__}")
    return list(blocks)


def geometry(encoder: nn.Module, state: Optional[Mapping[str, torch.Tensor]] = None) -> EncoderGeometry:
    """The geometry of ``encoder`` (a segment_anything ``ImageEncoderViT``, pruned or not), read from ``state``
    (default: its own state_dict) with its head count when it has no rel-pos tables to read it from."""
    attn = next((b.attn for b in _blocks(encoder) if getattr(b, "attn", None) is not None), None)
    heads = None if attn is None or getattr(attn, "use_rel_pos", False) else int(attn.num_heads)
    return encoder_geometry(encoder.state_dict() if state is None else state, prefix="", num_heads=heads)


def channel_groups(model: nn.Module) -> Dict[Group, Tuple[int, List[Slice]]]:
    """Every prunable group of the encoder of ``model`` (a ``Sam`` or a bare ``ImageEncoderViT``): group -> (its
    width, the tensors it slices). Keys of the slices are the encoder's own state_dict keys."""
    enc, _, _ = find_encoder(model)
    blocks = _blocks(enc)
    state = enc.state_dict()
    embed = int(enc.patch_embed.proj.out_channels)
    emb = [Slice("patch_embed.proj.weight", 0), Slice("patch_embed.proj.bias", 0), Slice("neck.0.weight", 1)]
    if "pos_embed" in state:
        emb.append(Slice("pos_embed", 3))
    groups: Dict[Group, Tuple[int, List[Slice]]] = {}
    for i, blk in enumerate(blocks):
        b = f"blocks.{i}."
        emb += [Slice(b + "norm2.weight", 0), Slice(b + "norm2.bias", 0), Slice(b + "mlp.lin1.weight", 1),
                Slice(b + "mlp.lin2.weight", 0), Slice(b + "mlp.lin2.bias", 0)]
        hidden = int(blk.mlp.lin1.out_features)
        groups[("mlp", i)] = (hidden, [Slice(b + "mlp.lin1.weight", 0), Slice(b + "mlp.lin1.bias", 0),
                                       Slice(b + "mlp.lin2.weight", 1)])
        attn = getattr(blk, "attn", None)
        if attn is None:
            continue  # DC-ViT: attention removed
        emb += [Slice(b + "norm1.weight", 0), Slice(b + "norm1.bias", 0), Slice(b + "attn.qkv.weight", 1),
                Slice(b + "attn.proj.weight", 0), Slice(b + "attn.proj.bias", 0)]
        heads = int(attn.num_heads)
        D = int(attn.qkv.out_features) // (3 * heads)
        head = [Slice(b + "attn.qkv.weight", 0, 3 * heads, D), Slice(b + "attn.proj.weight", 1, heads, D)]
        if b + "attn.qkv.bias" in state:
            head.append(Slice(b + "attn.qkv.bias", 0, 3 * heads, D))
        if b + "attn.rel_pos_h" in state:
            head += [Slice(b + "attn.rel_pos_h", 1), Slice(b + "attn.rel_pos_w", 1)]
        groups[("head_dim", i)] = (D, head)
    groups[("embed",)] = (embed, [s for s in emb if s.param in state])
    return groups


def group_totals(values: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[Group, torch.Tensor]:
    """Per group of ``model``'s encoder, each channel's sum of ``values`` (one tensor per encoder parameter, shaped
    like it: a per-weight importance) over every weight the channel owns. float64."""
    out = {}
    for group, (width, slices) in channel_groups(model).items():
        score = torch.zeros(width, dtype=torch.float64)
        for s in slices:
            t = values[s.param].detach().double().cpu()
            per = t.transpose(0, s.dim).reshape(t.shape[s.dim], -1).sum(1)  # (tensor length along dim,)
            if s.repeat > 1:
                per = per.view(s.repeat, s.period).sum(0)
            score += per
        out[group] = score
    return out


def magnitude_scores(model: nn.Module) -> Dict[Group, torch.Tensor]:
    """Per group, each channel's importance as the L2 norm of every weight it owns, each tensor's squares first
    divided by that tensor's mean square (so a wide tensor does not drown a narrow one)."""
    enc, _, _ = find_encoder(model)
    squares = {}
    for name, t in enc.state_dict().items():
        sq = t.detach().double().pow(2)
        squares[name] = sq / max(float(sq.mean()), 1e-30) if sq.numel() else sq
    return {group: total.sqrt() for group, total in group_totals(squares, model).items()}


def _per_block(value, name: str, depth: int, blocks_with, full: Sequence[int]) -> Dict[int, int]:
    if value is None:
        return {i: full[i] for i in blocks_with}
    if isinstance(value, (list, tuple)):
        if len(value) != depth:
            raise ValueError(f"{name} must give one width per block ({depth}), got {len(value)}")
        return {i: int_arg(value[i], f"{name}[{i}]", 1, full[i]) for i in blocks_with}
    return {i: int_arg(value, name, 1, full[i]) for i in blocks_with}


def target_widths(model: nn.Module, *, embed: Optional[int] = None, head_dim: Union[int, Sequence[int], None] = None,
                  mlp: Union[int, Sequence[int], None] = None) -> Dict[Group, int]:
    """Per group of ``model``'s encoder, the width :func:`prune_to_widths` would keep for these arguments; a width
    outside [1, the current width], or a list of the wrong length, is a ValueError naming it (nothing is pruned)."""
    groups = channel_groups(model)
    depth = max(g[1] for g in groups if g[0] == "mlp") + 1
    attn_blocks = [i for i in range(depth) if ("head_dim", i) in groups]
    want: Dict[Group, int] = {("embed",): groups[("embed",)][0] if embed is None
                              else int_arg(embed, "embed", 1, groups[("embed",)][0])}
    full_d = [groups[("head_dim", i)][0] if ("head_dim", i) in groups else 0 for i in range(depth)]
    full_m = [groups[("mlp", i)][0] for i in range(depth)]
    want.update({("head_dim", i): w for i, w in _per_block(head_dim, "head_dim", depth, attn_blocks, full_d).items()})
    want.update({("mlp", i): w for i, w in _per_block(mlp, "mlp", depth, range(depth), full_m).items()})
    return want


def prune_to_widths(model: nn.Module, *, embed: Optional[int] = None,
                    head_dim: Union[int, Sequence[int], None] = None, mlp: Union[int, Sequence[int], None] = None,
                    scores: Optional[Mapping[Group, torch.Tensor]] = None) -> nn.Module:
    """A copy of ``model`` (a ``Sam`` or an ``ImageEncoderViT``) whose image encoder keeps ``embed`` residual
    channels, ``head_dim`` dims per head and ``mlp`` hidden channels (an int for every block, or a list with one per
    block; None keeps the width), chosen by ``scores`` (per group, as :func:`channel_groups` names them; default
    :func:`magnitude_scores`). Widths must lie in [1, the current width]; the model is not modified."""
    enc, _, _ = find_encoder(model)
    groups = channel_groups(model)
    want = target_widths(model, embed=embed, head_dim=head_dim, mlp=mlp)
    if scores is None:
        scores = magnitude_scores(model)
    keep: Dict[Group, torch.Tensor] = {}
    for group, (width, _) in groups.items():
        s = scores.get(group) if hasattr(scores, "get") else None
        if not isinstance(s, torch.Tensor) or s.shape != (width,):
            raise ValueError(f"scores[{group}] must be a ({width},) tensor, got "
                             f"{None if s is None else tuple(getattr(s, 'shape', ()))}")
        n = want[group]
        keep[group] = torch.sort(torch.topk(s.double(), n).indices).values if n < width else torch.arange(width)
    state = {k: v.detach().clone() for k, v in enc.state_dict().items()}
    for group, (width, slices) in groups.items():
        if len(keep[group]) == width:
            continue
        for s in slices:
            t = state[s.param]
            state[s.param] = t.index_select(s.dim, s.indices(keep[group]).to(t.device)).contiguous()
    new_enc = build_image_encoder(geometry(enc, state))
    missing, unexpected = new_enc.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"the pruned encoder does not take its weights: missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}")
    param = next(enc.parameters())
    new_enc.to(device=param.device, dtype=param.dtype).train(enc.training)
    if enc is model:
        return new_enc
    # the rest of the model copied, with the new encoder in the old one's place (the old one is never copied)
    return copy.deepcopy(model, {id(enc): new_enc})


MODES = ("uniform", "global")


def plan_widths(model: nn.Module, ratio: float, mode: str = "uniform",
                scores: Optional[Mapping[Group, torch.Tensor]] = None) -> Dict[str, object]:
    """The widths that prune ``ratio`` of each kind of channel (0 < ratio < 1), as keywords for
    :func:`prune_to_widths`: ``{"embed": int, "head_dim": [per block], "mlp": [per block]}``.

    ``"uniform"``: every block keeps ``round((1 - ratio) * width)`` of its head dims and MLP channels (SlimSAM's
    uniform models: ratio 0.5 takes ViT-B to embed 384 / head dim 32 / MLP 1536). ``"global"``: the head dims of
    all blocks are ranked together by ``scores`` (each block's scores divided by their mean, so blocks compare), and
    so are the MLP channels; each block keeps what it has among the top ``1 - ratio``, at least one. The embedding
    width is shared by every block, so it is ``round((1 - ratio) * width)`` in both modes."""
    from .._args import float_arg

    ratio = float_arg(ratio, "ratio", positive=True, maximum=1)
    if ratio >= 1:
        raise ValueError(f"ratio must be below 1 (the fraction of channels removed), got {ratio!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    groups = channel_groups(model)
    depth = max(g[1] for g in groups if g[0] == "mlp") + 1

    def keep(width):
        return max(1, round((1 - ratio) * width))

    plan: Dict[str, object] = {"embed": keep(groups[("embed",)][0])}
    if mode == "global" and scores is None:
        scores = magnitude_scores(model)
    for kind in ("head_dim", "mlp"):
        present = [i for i in range(depth) if (kind, i) in groups]
        widths = {i: groups[(kind, i)][0] for i in present}
        if mode == "uniform":
            kept = {i: keep(w) for i, w in widths.items()}
        else:
            pooled = torch.cat([scores[(kind, i)].double() / max(float(scores[(kind, i)].double().mean()), 1e-30)
                                for i in present])
            owner = torch.cat([torch.full((widths[i],), i) for i in present])
            top = torch.topk(pooled, keep(int(pooled.numel()))).indices
            kept = {i: max(1, int((owner[top] == i).sum())) for i in present}
        plan[kind] = [kept.get(i, 1) for i in range(depth)]  # (1 for a block without this group: not read)
    return plan
