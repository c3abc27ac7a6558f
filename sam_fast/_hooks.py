"""Module hooks on patched models: what sam_fast does so that every hook a user registered still runs.

sam_fast's fused paths compute a layer from its weights instead of calling it (a bias-free GEMM with the bias,
GELU and residual fused after it; the LayerNorm fused into an int8 GEMM's quantisation; a block's qkv GEMM whose
bias the attention kernel adds), and they write into the layers' fresh outputs in place. A forward hook, a
pre-hook or a backward hook on such a layer would be skipped, and a hook that kept a layer's output would see it
changed afterwards. So:

* a layer with hooks of its own (or any module, when global module hooks are registered) is called as a module,
  and nothing is written into its output in place (:func:`has_hooks`; the block runs its plain path);
* a module that ``sam_fast.apply`` swaps in for another (a :class:`~sam_fast.nn.SamFastBlock` for a ViT block,
  an :class:`~sam_fast.nn.Int8Linear` for a linear, a fused int8 form of a TinyViT / DC-ViT module) takes over the
  original's hook dictionaries, the same objects (:func:`share_hooks`): hooks registered before ``apply`` keep
  running, their handles still remove them, and hooks registered while patched stay after ``undo()``.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules import module as _module

#: a module's own hook dictionaries (forward, pre-forward, backward and their flags)
HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
              "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_is_full_backward_hook")

_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


#: where transformers defines the hooks it installs on its models' layers and attention modules to collect hidden
#: states and attention weights on request. sam_fast serves both itself: a vision layer is still called as a module
#: (its hidden state is collected), and a call asking for attention weights is refused with a clear error.
_TRANSFORMERS_CAPTURE = "transformers.utils.output_capturing"


def _user_hooks(hooks: dict, sam_fast_own: bool = False) -> bool:
    """Whether ``hooks`` holds one that is not transformers' output capturing (nor, with ``sam_fast_own``, one of
    sam_fast's own guards, such as a patched transformers layer's refusal of ``output_attentions``)."""
    for h in hooks.values():
        where = getattr(h, "__module__", None) or ""
        if where != _TRANSFORMERS_CAPTURE and not (sam_fast_own and where.startswith("sam_fast.")):
            return True
    return False


def has_foreign_hooks(m: nn.Module) -> bool:
    """Whether ``m`` has hooks of its own that neither sam_fast nor transformers' output capturing installed: what
    an exported graph would run without."""
    return any(_user_hooks(getattr(m, name, {}), sam_fast_own=True)
               for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def has_hooks(*modules) -> bool:
    """Whether calling any of ``modules`` (None and non-modules are skipped) would run a forward, pre-forward or
    backward hook: one registered on the module itself, or a global module hook
    (``torch.nn.modules.module.register_module_forward_hook`` and its kin), which runs on every module.
    transformers' own output-capturing hooks do not count (see :data:`_TRANSFORMERS_CAPTURE`)."""
    if any(getattr(_module, name, None) for name in _GLOBAL_HOOKS):
        return True
    for m in modules:
        if isinstance(m, nn.Module) and (m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                                         or (m._forward_hooks and _user_hooks(m._forward_hooks))):
            return True
    return False


def share_hooks(new: nn.Module, original: nn.Module) -> None:
    """Make ``new`` (swapped in for ``original``) hold ``original``'s hook dictionaries themselves (see the module
    docstring)."""
    for name in HOOK_DICTS:
        if name in original.__dict__:
            new.__dict__[name] = original.__dict__[name]
