"""``sam_fast.apply(model, SamFastConfig(...)) -> SamFastHandle``: swap fast kernels into a model instance.

Patching is explicit, per instance and reversible: :func:`apply` walks the model, recognises
segment_anything image-encoder blocks by their structure (:func:`sam_fast.surgery.is_sam_vit_block`) and
replaces each, in its parent, by a :class:`sam_fast.nn.SamFastBlock` that shares the block's
submodules (so parameters and state_dict keys are untouched). Library classes are never modified.
With ``attention=Dilated(pattern, blocks)`` the chosen blocks (``"global"``, ``"all"`` or a list of block
indices; or the keys of a per-block pattern dict) run dilated attention over the whole token grid with their
own weights; every other block keeps exact fused attention.
With ``quantize=Int8(calibration)`` the linears of every ViT block become :class:`sam_fast.nn.Int8Linear`
(W8A8; see :mod:`sam_fast.quantize`), composing with either attention mode, and the modules whose LayerNorm
fuses into an int8 GEMM are swapped for their fused forms. Which modules qualify is decided in
:mod:`sam_fast.surgery`.
Applying again is harmless: already swapped blocks take the new backend and pattern, and the new
handle's ``undo()`` gives them back their previous ones; ``handle.undo()`` puts the original block
objects back.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ._dispatch import check_backend_name
from ._hooks import share_hooks
from .models.tinyvit import TinyViT
from .nn.attention import SamFastBlock
from .nn.hiera import FastHieraBlock, FastHieraLayerForward, hiera_blocks, transformers_hiera_layers
from .nn.quantized import Int8Linear
from .nn.tinyvit import _FastForm, tinyvit_fast_modules
from .pattern import check_pattern
from .quantize import Calibration
from .surgery import eligible_linears, fusable_modules, too_narrow, transformers_vit_layers, vit_blocks

ATTENTION_MODES = ("exact", "dilated", "none")
QUANTIZE_MODES = (None, "int8")
BLOCK_CHOICES = ("global", "all")


def _check_blocks(blocks, pattern):
    """``Dilated.blocks``: None, ``"global"``, ``"all"`` or a list of block indices (each in the pattern dict, if
    the pattern is one); returned as a tuple for a list."""
    if blocks is None or (isinstance(blocks, str) and blocks in BLOCK_CHOICES):
        return blocks
    if isinstance(blocks, str):
        raise ValueError(f"dilated_blocks must be one of {BLOCK_CHOICES} or a list of block indices, got {blocks!r}")
    if not isinstance(blocks, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                        for i in blocks):
        raise TypeError(f"dilated_blocks must be 'global', 'all' or a list of block indices, got {blocks!r}")
    if any(i < 0 for i in blocks):
        raise ValueError(f"dilated_blocks: block indices count from 0, got {blocks!r}")
    if isinstance(pattern, dict):
        missing = [i for i in blocks if i not in pattern]
        if missing:
            raise ValueError(f"dilated_blocks {missing} have no entry in the dilated_pattern dict")
    return tuple(blocks)


@dataclasses.dataclass(frozen=True)
class Dilated:
    """``SamFastConfig(attention=Dilated(pattern, blocks))``: dilated attention in the chosen blocks, exact
    fused attention in the others. Checked when made.

    Args:
        pattern: a :class:`sam_fast.Branch` or list of them used by every chosen block, or a dict
            ``{block_index: pattern}`` giving each chosen block its own (stored as a tuple of Branch, or a dict of
            them).
        blocks: ``"global"`` (SAM's global-attention blocks; the default), ``"all"``, or a list of block
            indices (stored as a tuple); with a dict pattern the default is the dict's keys.
    """

    pattern: Any
    blocks: Any = None

    def __post_init__(self):
        pat = self.pattern
        if pat is None:
            raise ValueError("Dilated needs a pattern (dilated_pattern): a Branch, a list of Branch, or a dict "
                             "{block_index: pattern}")
        if isinstance(pat, dict):
            if not pat:
                raise ValueError("dilated_pattern dict must name at least one block")
            for key in pat:
                if not isinstance(key, int) or isinstance(key, bool) or key < 0:
                    raise TypeError(f"dilated_pattern keys must be block indices (ints >= 0), got {key!r}")
            pat = {key: check_pattern(p, f"dilated_pattern[{key}]") for key, p in pat.items()}
        else:
            pat = check_pattern(pat, "dilated_pattern")
        object.__setattr__(self, "pattern", pat)
        object.__setattr__(self, "blocks", _check_blocks(self.blocks, pat))

    def chosen_blocks(self):
        """``"global"``, ``"all"`` or the tuple of block indices that get a pattern; a dict pattern without
        ``blocks`` chooses its keys."""
        if self.blocks is not None:
            return self.blocks
        return tuple(sorted(self.pattern)) if isinstance(self.pattern, dict) else "global"

    def pattern_for(self, index: int, block: nn.Module):
        """The pattern block ``index`` gets, or None (exact attention)."""
        blocks = self.chosen_blocks()
        if blocks == "global":
            chosen = int(block.window_size) == 0
        else:
            chosen = blocks == "all" or index in blocks
        if not chosen:
            return None
        return self.pattern.get(index) if isinstance(self.pattern, dict) else self.pattern


@dataclasses.dataclass(frozen=True)
class Int8:
    """``SamFastConfig(quantize=Int8(calibration))``: W8A8 for the linears of every ViT block.

    Args:
        calibration: a :class:`sam_fast.quantize.Calibration` from :func:`sam_fast.quantize.calibrate`
            (static scales where it chose them; layers it kept in float stay float), or None (dynamic
            per-token activations everywhere).
    """

    calibration: Any = None

    def __post_init__(self):
        if self.calibration is not None and not isinstance(self.calibration, Calibration):
            raise TypeError(f"Int8 calibration must be a sam_fast.quantize.Calibration (from calibrate()), got "
                            f"{type(self.calibration).__name__}")


@dataclasses.dataclass(frozen=True, init=False)
class SamFastConfig:
    """What :func:`apply` swaps: ``SamFastConfig(attention="exact" | "none" | Dilated(pattern, blocks),
    quantize=None | Int8(calibration), backend="auto")``. Each part checks itself when made.

    Stored nested and typed: ``attention`` is ``"exact"``, ``"none"`` or a :class:`Dilated`; ``quantize`` is None or
    an :class:`Int8`. The flat spellings (``attention="dilated", dilated_pattern=..., dilated_blocks=...``,
    ``quantize="int8", calibration=...``) are accepted and stored nested, so both compare equal.

    Args:
        attention: ``"exact"`` - fused flash attention with SAM's rel-pos bias in every ViT block
            (global and windowed), numerically the original model; in a TinyViT encoder (MobileSAM, TinySAM),
            its fast forms (:mod:`sam_fast.nn.tinyvit`: fused attention with its learned bias, BatchNorms folded
            into the convolutions, channels-last convolutions, the MLP's GELU and residual in the linears'
            epilogues); ``"none"`` - leave attention alone; a :class:`Dilated` - dilated attention in its
            blocks, exact in the others.
        backend: handed to every op the swapped modules call (``"auto"``, ``"triton"``, ``"cuda"``,
            ``"cpu"``, ``"reference"``); e.g. ``"triton"`` forces the kernel (under TRITON_INTERPRET=1
            on a CPU).
        quantize: None or an :class:`Int8`: W8A8 for the linears of every ViT block (qkv, proj, MLP) with
            :class:`sam_fast.nn.Int8Linear`; with exact or dilated attention the LayerNorms fuse into the int8
            GEMMs' input quantization (see :mod:`sam_fast.quantize`).
    """

    attention: Any = "exact"
    backend: str = "auto"
    quantize: Optional[Int8] = None

    def __init__(self, attention="exact", backend="auto", quantize=None, *, dilated_pattern=None,
                 dilated_blocks=None, calibration=None):
        if isinstance(attention, str) and attention == "dilated":
            if dilated_pattern is None:
                raise ValueError("attention='dilated' needs dilated_pattern (a Branch, a list of Branch, or a dict "
                                 "{block_index: pattern})")
            attention = Dilated(dilated_pattern, dilated_blocks)
        elif dilated_pattern is not None or dilated_blocks is not None:
            if isinstance(attention, Dilated):
                raise ValueError("attention=Dilated(...) already holds the pattern and blocks: leave "
                                 "dilated_pattern / dilated_blocks unset")
            raise ValueError(f"dilated_pattern / dilated_blocks need attention='dilated', got attention={attention!r}")
        if not isinstance(attention, Dilated):
            if not isinstance(attention, str):
                raise TypeError(f"SamFastConfig attention must be one of {ATTENTION_MODES} or a sam_fast.Dilated, "
                                f"got {type(attention).__name__}")
            if attention not in ("exact", "none"):
                raise ValueError(f"SamFastConfig attention must be one of {ATTENTION_MODES}, got {attention!r}")
        if isinstance(quantize, str) and quantize == "int8":
            quantize = Int8(calibration)
        elif calibration is not None:
            if isinstance(quantize, Int8):
                raise ValueError("quantize=Int8(...) already holds the calibration: leave calibration unset")
            raise ValueError("calibration needs quantize='int8'")
        if quantize is not None and not isinstance(quantize, Int8):
            if not isinstance(quantize, str):
                raise TypeError(f"SamFastConfig quantize must be None, 'int8' or a sam_fast.Int8, got "
                                f"{type(quantize).__name__}")
            raise ValueError(f"SamFastConfig quantize must be one of {QUANTIZE_MODES}, got {quantize!r}")
        check_backend_name(backend)
        object.__setattr__(self, "attention", attention)
        object.__setattr__(self, "backend", backend)
        object.__setattr__(self, "quantize", quantize)

    @property
    def dilated(self) -> Optional[Dilated]:
        """The :class:`Dilated` part, or None (exact attention, or none)."""
        return self.attention if isinstance(self.attention, Dilated) else None

    def chosen_blocks(self):
        """``"global"``, ``"all"`` or the tuple of block indices that get a dilated pattern (None without
        dilated attention)."""
        return None if self.dilated is None else self.dilated.chosen_blocks()

    def pattern_for(self, index: int, block: nn.Module):
        """The dilated pattern block ``index`` gets, or None (exact attention)."""
        return None if self.dilated is None else self.dilated.pattern_for(index, block)


class SamFastHandle:
    """Returned by :func:`apply`; ``undo()`` restores every module it swapped (once; later calls no-op)."""

    def __init__(self, model: nn.Module, swaps: List[Tuple[nn.Module, str, nn.Module, nn.Module]],
                 updates: Optional[List[Tuple[SamFastBlock, str, Any]]] = None,
                 left_float: Optional[Dict[str, str]] = None, overrides: Optional[List[nn.Module]] = None,
                 hooks: Optional[list] = None):
        self.model = model
        self._swaps = swaps
        # (already swapped block or transformers layer forward, previous backend, previous pattern)
        self._updates = updates or []
        self._overrides = overrides or []  # transformers layers given an instance forward
        self._hooks = hooks or []  # pre-hooks refusing output_attentions, instance attributes refusing saves
        #: with quantize="int8": eligible linears kept in float, ``{"blocks.<i>.<attn|mlp>.<name>": why}``
        self.left_float = dict(left_float or {})

    @property
    def swapped(self) -> List[str]:
        """Qualified names (in the model) of the modules this handle replaced (and of the transformers vision
        layers it gave a fused forward)."""
        names = {id(mod): name for name, mod in self.model.named_modules()}
        return ([names.get(id(new), f"<detached {type(new).__name__}>") for _, _, _, new in self._swaps]
                + [names.get(id(layer), "<detached layer>") for layer in self._overrides])

    def undo(self) -> None:
        """Put the original modules back. An int8 layer whose weights changed since :func:`apply` (a
        ``load_state_dict`` into the swapped model) hands its dequantized weights and its bias to the float
        linear it replaced, so the restored model is the loaded one, not a mix of two; one moved or cast
        with the model (``.to()``) moves its float linear along. Otherwise the original linears come
        back bit for bit."""
        for parent, name, original, new in reversed(self._swaps):
            if parent._modules.get(name) is new:
                if isinstance(new, Int8Linear) and isinstance(original, nn.Linear):
                    _sync_float_linear(original, new)
                parent._modules[name] = original
        for block, backend, pattern in reversed(self._updates):
            block.backend, block.pattern = backend, pattern
        for layer in reversed(self._overrides):
            layer.__dict__.pop("forward", None)
        for hook in self._hooks:
            hook.remove()
        self._swaps, self._updates, self._overrides, self._hooks = [], [], [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()

    def __repr__(self):
        return f"SamFastHandle({len(self._swaps) + len(self._overrides)} swapped modules)"


def _sync_float_linear(lin: nn.Linear, q: Int8Linear) -> None:
    """Make ``lin`` (the float linear ``q`` replaced) what ``q`` holds now: same device and bias dtype, and
    ``q``'s dequantized weight and bias if ``q`` no longer is ``lin`` quantized (it was loaded since)."""
    import torch

    from .ops.int8_linear import quantize_weight

    with torch.no_grad():
        dev = q.weight.device
        w = lin.weight.detach().to(dev)
        wq, ws = quantize_weight(w.float())
        same = torch.equal(wq, q.weight) and torch.equal(ws, q.weight_scale)
        if lin.bias is not None and q.bias is not None:
            same = same and torch.equal(lin.bias.detach().to(dev, q.bias.dtype), q.bias)
        elif (lin.bias is None) != (q.bias is None):
            same = False
        dtype = q.bias.dtype if q.bias is not None else lin.weight.dtype
        lin.to(device=dev, dtype=dtype)
        if not same:
            lin.weight.copy_(q.dequantized_weight().to(dtype))
            if lin.bias is not None:
                if q.bias is not None:
                    lin.bias.copy_(q.bias)
                else:
                    lin.bias.zero_()


def apply(model: nn.Module, config: SamFastConfig = None) -> SamFastHandle:
    """Swap sam_fast modules into ``model`` in place; returns a handle whose ``undo()`` reverts it.

    All or nothing: if anything fails (an invalid calibration entry, a weight that cannot be quantized),
    what was already swapped is put back before the error propagates, so the model is as it was."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    recorded = getattr(model, "sam_fast_config", None)
    if not isinstance(recorded, SamFastConfig):
        recorded = None
    if config is None:
        config = recorded if recorded is not None else SamFastConfig()
    if not isinstance(config, SamFastConfig):
        raise TypeError(f"config must be a sam_fast.SamFastConfig, got {type(config).__name__}")
    if recorded is not None and recorded.dilated is not None:
        _warn_if_pattern_dropped(model, config, recorded)
    swaps, updates, overrides, hooks = [], [], [], []
    try:
        if config.attention != "none":
            _swap_blocks(model, config, swaps, updates, overrides, hooks)
        left_float = {}
        if config.quantize is not None and _has_hiera(model):
            raise ValueError("quantize='int8' does not cover SAM 2's Hiera encoder yet: use quantize=None")
        if config.quantize is not None:
            left_float = _quantize_linears(model, config, swaps)
            _fuse_int8_modules(model, swaps)
            _refuse_pretrained_saves(model, hooks)
    except BaseException:
        SamFastHandle(model, swaps, updates, overrides=overrides, hooks=hooks).undo()
        raise
    return SamFastHandle(model, swaps, updates, left_float, overrides, hooks)


class _InstanceAttribute:
    """An attribute set on one module instance, removed by ``remove()`` (as a hook handle is)."""

    def __init__(self, module: nn.Module, name: str, value):
        self.module, self.name = module, name
        module.__dict__[name] = value

    def remove(self) -> None:
        self.module.__dict__.pop(self.name, None)


def _refuse_pretrained_saves(model: nn.Module, hooks: list) -> None:
    """transformers models (``save_pretrained``) holding int8 layers get an instance ``save_pretrained`` that refuses:
    transformers would write the int8 integers as the float weights, and its ``from_pretrained`` loads them into a
    float model with only an "unexpected keys" note (the weight scales). ``undo()`` removes it."""
    for m in model.modules():
        if callable(getattr(m, "save_pretrained", None)) and hasattr(m, "config") \
                and any(isinstance(x, Int8Linear) for x in m.modules()):
            hooks.append(_InstanceAttribute(m, "save_pretrained", _int8_save_refused))


def _int8_save_refused(*args, **kwargs):
    raise ValueError("this model has sam_fast int8 layers (quantize='int8'): save_pretrained would write their int8 "
                     "integers as float weights, which from_pretrained loads into a broken model. Save the float "
                     "model (undo() the sam_fast handle first) and quantize again after loading; torch.save of the "
                     "state_dict keeps the int8 layers for loading after the same sam_fast.apply()")


def _warn_if_pattern_dropped(model, config, recorded) -> None:
    """A distilled student (``model.sam_fast_config``, set by sam_fast.distill and load_sam) was trained for
    its dilated pattern; a config that runs other attention in those blocks computes another function."""
    import warnings

    changed = [index for *_, block, index in vit_blocks(model)
               if recorded.pattern_for(index, block) is not None and config.attention != "none"
               and config.pattern_for(index, block) != recorded.pattern_for(index, block)]
    if changed:
        warnings.warn(f"this model was trained for dilated attention in blocks {changed} (model.sam_fast_config), but "
                      f"the config runs {config.attention!r} attention there, which is not the function its weights "
                      "learned; pass dataclasses.replace(model.sam_fast_config, ...) or no config to keep it",
                      UserWarning, stacklevel=3)


def _patch_transformers_layers(model, config, layers, updates, overrides, hooks) -> None:
    """transformers' SAM vision layers keep their objects and get an instance forward (sam_fast.nn.transformers_sam)."""
    from .nn.transformers_sam import FastLayerForward, refuse_attention_weights

    wanted = config.chosen_blocks()
    if isinstance(wanted, (list, tuple)):
        missing = sorted(set(wanted) - {index for _, _, index in layers})
        if missing:
            raise ValueError(f"dilated blocks {missing} do not exist: the model's vision layers are "
                             f"{sorted({index for _, _, index in layers})}")
    encoders = []
    for enc, layer, index in layers:
        pattern = config.pattern_for(index, layer)
        current = layer.__dict__.get("forward")
        if isinstance(current, FastLayerForward):
            updates.append((current, current.backend, current.pattern))
            current.backend, current.pattern = config.backend, pattern
        else:
            layer.forward = FastLayerForward(layer, config.backend, pattern)
            overrides.append(layer)
        if not any(e is enc for e in encoders):
            encoders.append(enc)
    for enc in encoders:
        hooks.append(enc.register_forward_pre_hook(refuse_attention_weights, with_kwargs=True))


def _swap_blocks(model, config, swaps, updates, overrides, hooks) -> None:
    found = vit_blocks(model)  # collected before any change
    if not found and _has_hiera(model):
        _swap_hiera(model, config, swaps, updates, overrides, hooks)
        return
    if not found:
        layers = transformers_vit_layers(model)
        if layers:
            _patch_transformers_layers(model, config, layers, updates, overrides, hooks)
            return
        tinyvit = tinyvit_fast_modules(model)
        if not tinyvit and not any(isinstance(m, _FastForm) for m in model.modules()):
            raise ValueError(f"attention={config.attention!r} found no segment_anything ViT blocks (nor a TinyViT "
                             "encoder) in the model")
        _swap_tinyvit(model, config, tinyvit, swaps, hooks)
        return
    wanted = config.chosen_blocks()
    if isinstance(wanted, (list, tuple)):
        missing = sorted(set(wanted) - {index for *_, index in found})
        if missing:
            raise ValueError(f"dilated blocks {missing} do not exist: the model's ViT blocks are "
                             f"{sorted({index for *_, index in found})}")
    for parent, name, child, index in found:
        pattern = config.pattern_for(index, child)
        if isinstance(child, SamFastBlock):
            updates.append((child, child.backend, child.pattern))
            child.backend, child.pattern = config.backend, pattern
        else:
            new = SamFastBlock(child, backend=config.backend, pattern=pattern)
            new.train(child.training)
            parent._modules[name] = new
            swaps.append((parent, name, child, new))


def _fast_hiera(model) -> List[FastHieraBlock]:
    return [m for m in model.modules() if isinstance(m, FastHieraBlock)]


def _has_hiera(model) -> bool:
    """Whether ``model`` holds SAM 2 Hiera blocks (Meta's or transformers', patched or not)."""
    return bool(hiera_blocks(model) or _fast_hiera(model) or transformers_hiera_layers(model))


def _swap_hiera(model, config, swaps, updates, overrides, hooks) -> None:
    """SAM 2's Hiera blocks (sam2's ``MultiScaleBlock``) in their fast form (sam_fast.nn.hiera) for
    attention="exact": the C++ kernel and fused linears at CPU inference, the Triton kernel on a GPU, the original
    forward elsewhere. Dilated patterns are refused, not ignored."""
    if config.attention != "exact":
        raise ValueError("SAM 2's Hiera encoder takes attention='exact' (its fast blocks) or 'none'; dilated "
                         "patterns are not available for its blocks")
    for block in _fast_hiera(model):
        updates.append((block, block.backend, block.pattern))
        block.backend = config.backend
    for parent, name, child in hiera_blocks(model):
        new = FastHieraBlock(child)
        new.backend = config.backend
        new.train(child.training)
        parent._modules[name] = new
        swaps.append((parent, name, child, new))
    from .nn.transformers_sam import refuse_attention_weights

    encoders = []
    for enc, layer in transformers_hiera_layers(model):  # transformers' layers keep their objects (as SAM's do)
        current = layer.__dict__.get("forward")
        if isinstance(current, FastHieraLayerForward):
            updates.append((current, current.backend, current.pattern))
            current.backend = config.backend
        else:
            layer.forward = FastHieraLayerForward(layer, config.backend)
            overrides.append(layer)
            if not any(e is enc for e in encoders):
                encoders.append(enc)
    for enc in encoders:
        hooks.append(enc.register_forward_pre_hook(refuse_attention_weights, with_kwargs=True))


def _contiguous_output(module, args, output):
    return output.contiguous() if isinstance(output, torch.Tensor) else output


def _swap_tinyvit(model, config, found, swaps, hooks) -> None:
    """A TinyViT encoder's fast forms (sam_fast.nn.tinyvit) for attention="exact": the same function, on sam_fast's
    C++ window-attention kernel and linear epilogues (CPU), PyTorch's fused attention (elsewhere) and folded
    convolutions. Dilated patterns, and a kernel backend other than the C++ one for a float model, are refused, not
    ignored (with int8, the backend is the int8 ops')."""
    if config.attention != "exact":
        raise ValueError("a TinyViT encoder (MobileSAM, TinySAM) has no ViT blocks for dilated attention: use "
                         "attention='exact' (its fast forms) or 'none'")
    if config.backend not in ("auto", "cpu") and config.quantize is None:
        raise ValueError(f"backend={config.backend!r}: a TinyViT encoder's fast forms run sam_fast's C++ CPU kernels "
                         "(PyTorch's fused attention off the CPU), not a chosen backend; use backend='auto' (or "
                         "attention='none' for the model as written)")
    for parent, name, child, fast in found:
        new = fast(child)
        parent._modules[name] = new
        swaps.append((parent, name, child, new))
    # the fast forms keep tokens in channels-last order through the neck: the embedding comes out contiguous, as
    # the original's does (code that .view()s it keeps working)
    for enc in model.modules():
        if isinstance(enc, TinyViT) and found:
            hooks.append(enc.register_forward_hook(_contiguous_output))


def _quantize_linears(model, config, swaps) -> Dict[str, str]:
    """Swap Int8Linear into every eligible linear (see sam_fast.quantize); returns those kept float."""
    slots = eligible_linears(model)
    if not slots:
        raise ValueError("quantize='int8' found no segment_anything ViT (or TinyViT) block linears in the model")
    cal = config.quantize.calibration
    if cal is not None:
        unknown = [s.key for s in slots if s.key not in cal.layers]
        if unknown:
            raise ValueError(f"the calibration has no entry for {unknown[:3]}{' ...' if len(unknown) > 3 else ''}: "
                             f"it was made on another model (it knows {len(cal.layers)} layers)")
    left_float, planned = {}, []
    for slot in slots:  # decide and build everything before changing anything
        lin = slot.module
        if isinstance(lin, Int8Linear):
            continue
        entry = cal.layers[slot.key] if cal is not None else None
        if entry is not None:
            entry.check()  # entries are mutable: checked again here
        reason = entry.reason if entry is not None and entry.mode == "float" else too_narrow(lin)
        if reason:
            left_float[slot.key] = reason
            continue
        scale = entry.static_scale if entry is not None and entry.mode == "static" else None
        try:
            new = Int8Linear.from_float(lin, act_scale=scale, backend=config.backend)
            share_hooks(new, lin)
        except ValueError as exc:
            raise ValueError(f"{slot.key}: {exc}") from None
        new.train(lin.training)
        planned.append((slot, lin, new))
    for slot, lin, new in planned:
        slot.parent._modules[slot.name] = new
        swaps.append((slot.parent, slot.name, lin, new))
    return left_float


def _fuse_int8_modules(model, swaps) -> None:
    """Swap in the fused forms of the modules whose LayerNorm fuses into an int8 GEMM (DC-ViT's attention-free
    blocks, TinyViT's attention and MLP; SAM's ViT blocks fuse inside SamFastBlock). A fused module shares
    the original's parameters; where its linears stayed float it runs the original forward."""
    for parent, name, child, fused_class in fusable_modules(model):
        new = fused_class(child)
        parent._modules[name] = new
        swaps.append((parent, name, child, new))
