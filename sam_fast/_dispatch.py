"""Backend choice as data.

Every public op owns an ordered table of backends. Each backend declares, through a ``supports``
function, whether it can run the given inputs and, if not, why. ``backend="auto"`` takes the first
backend in the table that accepts; an explicit backend that refuses raises with its reason; when
nothing accepts, the error lists every backend's reason.

Choosing a slower backend is never silent: when ``auto`` passes over a faster backend that serves the
inputs' device but refused them (say, a head dim the kernel lacks), a :class:`SamFastFallbackWarning`
is issued once per (op, backend, reason) and the fallback is recorded. :func:`record_backends` lets
callers, and tests, see which backend every op call ran on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import warnings
from typing import Callable, Optional, Sequence

import torch

from .kernels._interpreter import interpreting, kernels_defined_for_gpu

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")


class SamFastFallbackWarning(UserWarning):
    """``backend="auto"`` ran a slower backend because a faster one refused the inputs."""


class BackendUnavailableError(ValueError):
    """The requested backend (or every backend, for ``auto``) cannot run the given inputs."""


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why a backend cannot run some inputs.

    ``wrong_device`` marks refusals that only say "this backend is for another device": passing such a
    backend over is the normal choice for the device, not a fallback.
    """

    reason: str
    wrong_device: bool = False


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    supports: Callable[..., Optional[Refusal]]
    run: Callable[..., object]


@dataclasses.dataclass
class Fallback:
    op: str
    chosen: str
    passed_over: tuple  # ((backend, reason), ...)


@dataclasses.dataclass
class BackendRecord:
    """Filled by :func:`record_backends`: ``calls`` is a list of ``(op_name, backend_name)``."""

    calls: list = dataclasses.field(default_factory=list)
    fallbacks: list = dataclasses.field(default_factory=list)

    def backends(self, op: Optional[str] = None) -> set:
        return {b for o, b in self.calls if op is None or o == op}


_local = threading.local()
_warned: set = set()


def _recorders() -> list:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


@contextlib.contextmanager
def record_backends():
    """Record the backend of every sam_fast op call made inside the ``with`` block.

    >>> with sam_fast.record_backends() as rec:
    ...     sam_fast.dilated_attention(q, k, v)
    >>> rec.calls
    [('dilated_attention', 'triton')]

    Calls are recorded when the Python dispatch runs (eagerly, or once while torch.compile traces).
    Recording is per thread: a ``with`` block sees the op calls of the thread that entered it, not those
    other threads make meanwhile.
    """
    rec = BackendRecord()
    stack = _recorders()
    stack.append(rec)
    try:
        yield rec
    finally:
        stack.remove(rec)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


#: what :func:`exporting` may name: an AOTInductor package, or an ONNX file
EXPORT_TARGETS = ("aoti", "onnx")


def export_target() -> Optional[str]:
    """``"aoti"`` or ``"onnx"`` while :mod:`sam_fast.exporting` traces a model for that target (this thread), else
    None. The CPU paths read it: for an AOTInductor package the C++ kernels go into the graph (the package calls
    them through ``sam_fast._C``); for ONNX every op must be one that has a translation into standard ONNX ops."""
    return getattr(_local, "export", None)


def aoti_export() -> bool:
    """Whether a trace for an AOTInductor package is under way: the C++ CPU kernels that step aside while
    torch.compile traces (it fuses the plain ops around them itself) are wanted in the graph then."""
    return export_target() == "aoti"


def triton_op_wanted(t: torch.Tensor) -> bool:
    """Whether a Triton op on ``t`` runs in its ``torch.library.triton_op`` form: in a trace for an AOTInductor
    package of CUDA tensors, where Inductor compiles the kernels into the package. Everywhere else the ops are
    ``custom_op``s, which the Triton interpreter (CPU tests) and torch.compile's opaque-op path serve."""
    return aoti_export() and t.device.type == "cuda"


@contextlib.contextmanager
def exporting(target: str):
    """Trace for ``target`` (one of :data:`EXPORT_TARGETS`) inside the ``with`` block (this thread)."""
    if target not in EXPORT_TARGETS:
        raise ValueError(f"target must be one of {EXPORT_TARGETS}, got {target!r}")
    before = export_target()
    _local.export = target
    try:
        yield
    finally:
        _local.export = before


def _kernels_built_for_gpu() -> bool:
    if torch.compiler.is_compiling():  # tracing: the eager call before it already decided
        return False
    return kernels_defined_for_gpu()


def triton_device_refusal(t: torch.Tensor, explicit: bool) -> Optional[Refusal]:
    """Why a Triton backend cannot take tensor ``t`` on its device, or None.

    CUDA tensors are served. On CPU the kernels run only under ``TRITON_INTERPRET=1`` and only when
    asked for (``backend="triton"``): the interpreter is for tests, so ``auto`` passes over it as the
    normal choice for the device, not as a fallback.
    """
    if t.device.type == "cuda":
        return None
    if t.device.type == "cpu" and interpreting():
        if _kernels_built_for_gpu():
            return Refusal("TRITON_INTERPRET=1 was set after sam_fast's Triton kernels were loaded, so they were "
                           "built for a GPU (Triton decides when a kernel is defined, and without a GPU launching "
                           "them fails with '0 active drivers'); set TRITON_INTERPRET=1 before importing sam_fast, "
                           "e.g. in the shell", wrong_device=True)
        if explicit:
            return None
        return Refusal("on CPU the Triton kernels run only under TRITON_INTERPRET=1 with backend='triton' "
                       "(the interpreter is for testing, not speed)", wrong_device=True)
    return Refusal(f"Triton kernels need CUDA tensors, got {t.device}", wrong_device=True)


def check_backend_name(backend) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of {BACKENDS}, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def dispatch(op: str, table: Sequence[Backend], backend: str, *args, **kwargs):
    """Run ``op`` on the backend ``backend`` (or the first that accepts, for ``"auto"``)."""
    check_backend_name(backend)
    known = {b.name for b in table}
    if backend != "auto":
        if backend not in known:
            raise BackendUnavailableError(
                f"{op}: backend={backend!r} is not implemented for this op; available: "
                f"{sorted(known)} (or 'auto')"
            )
        chosen = next(b for b in table if b.name == backend)
        refusal = chosen.supports(*args, explicit=True, **kwargs)
        if refusal is not None:
            raise BackendUnavailableError(f"{op}: backend={backend!r} refused these inputs: {refusal.reason}")
        _note(op, chosen.name, ())
        return chosen.run(*args, **kwargs)

    refused = []
    for b in table:
        refusal = b.supports(*args, explicit=False, **kwargs)
        if refusal is None:
            passed = tuple((n, r.reason) for n, r in refused if not r.wrong_device)
            _note(op, b.name, passed)
            return b.run(*args, **kwargs)
        refused.append((b.name, refusal))
    lines = "\n".join(f"  {n}: {r.reason}" for n, r in refused)
    raise BackendUnavailableError(f"{op}: no backend can run these inputs:\n{lines}")


def note_fallback(op: str, chosen: str, reason: str, passed: str = "fused") -> None:
    """Record (and warn once about) a fast path that ran ``chosen`` instead of ``passed`` for ``reason``, outside a
    dispatch table (e.g. a block whose attention module has hooks)."""
    _note(op, chosen, ((passed, reason),))


def note_call(op: str, chosen: str) -> None:
    """Record that ``op`` ran on ``chosen`` by the policy's choice, outside a dispatch table (no fallback)."""
    _note(op, chosen, ())


def _note(op: str, chosen: str, passed_over: tuple) -> None:
    if _compiling():
        return
    for rec in _recorders():
        rec.calls.append((op, chosen))
        if passed_over:
            rec.fallbacks.append(Fallback(op, chosen, passed_over))
    if passed_over:
        key = (op, chosen, passed_over)
        if key not in _warned:
            _warned.add(key)
            why = "; ".join(f"{n}: {r}" for n, r in passed_over)
            warnings.warn(
                f"sam_fast.{op}: falling back to backend {chosen!r} ({why})",
                SamFastFallbackWarning,
                stacklevel=4,
            )
