"""``sam_fast.apply(model, SamFastConfig(...)) -> SamFastHandle``: swap fast kernels into a model instance.

Patching is explicit, per instance and reversible: :func:`apply` walks the model, recognises
segment_anything image-encoder blocks by their structure (:func:`sam_fast.nn.is_sam_vit_block`) and
replaces each, in its parent, by a :class:`sam_fast.nn.SamFastBlock` that shares the block's
submodules (so parameters and state_dict keys are untouched). Library classes are never modified.
Applying again is harmless (already swapped blocks take the new backend); ``handle.undo()`` puts the
original block objects back.
"""

from __future__ import annotations

import dataclasses
from typing import List, Tuple

from torch import nn

from ._dispatch import check_backend_name
from .nn.attention import SamFastBlock, is_sam_vit_block

ATTENTION_MODES = ("exact", "none")


@dataclasses.dataclass(frozen=True)
class SamFastConfig:
    """What :func:`apply` swaps.

    Args:
        attention: ``"exact"`` - fused flash attention with SAM's rel-pos bias in every ViT block
            (global and windowed), numerically the original model; ``"none"`` - leave attention alone.
        backend: handed to every op the swapped modules call (``"auto"``, ``"triton"``, ``"cuda"``,
            ``"cpu"``, ``"reference"``); e.g. ``"triton"`` forces the kernel (under TRITON_INTERPRET=1
            on a CPU).
    """

    attention: str = "exact"
    backend: str = "auto"

    def __post_init__(self):
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"SamFastConfig attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        check_backend_name(self.backend)


class SamFastHandle:
    """Returned by :func:`apply`; ``undo()`` restores every module it swapped (once; later calls no-op)."""

    def __init__(self, model: nn.Module, swaps: List[Tuple[nn.Module, str, nn.Module, nn.Module]]):
        self.model = model
        self._swaps = swaps

    @property
    def swapped(self) -> List[str]:
        """Qualified names (in the model) of the modules this handle replaced."""
        names = {id(mod): name for name, mod in self.model.named_modules()}
        return [names.get(id(new), f"<detached {type(new).__name__}>") for _, _, _, new in self._swaps]

    def undo(self) -> None:
        for parent, name, original, new in reversed(self._swaps):
            if parent._modules.get(name) is new:
                parent._modules[name] = original
        self._swaps = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()

    def __repr__(self):
        return f"SamFastHandle({len(self._swaps)} swapped modules)"


def apply(model: nn.Module, config: SamFastConfig = None) -> SamFastHandle:
    """Swap sam_fast modules into ``model`` in place; returns a handle whose ``undo()`` reverts it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if config is None:
        config = SamFastConfig()
    if not isinstance(config, SamFastConfig):
        raise TypeError(f"config must be a sam_fast.SamFastConfig, got {type(config).__name__}")
    swaps = []
    if config.attention == "exact":
        for parent in list(model.modules()):
            for name, child in list(parent._modules.items()):
                if isinstance(child, SamFastBlock):
                    child.backend = config.backend
                elif child is not None and is_sam_vit_block(child):
                    new = SamFastBlock(child, backend=config.backend)
                    new.train(child.training)
                    parent._modules[name] = new
                    swaps.append((parent, name, child, new))
    return SamFastHandle(model, swaps)
