"""Which instruction-set paths sam_fast's CPU kernels take, decided in one place (its C++ side: ``csrc/cpu/cpu.h``).

Two paths can be switched off, for the whole process:

* ``avx512``: the C++ kernels' AVX-512 loops (AVX512-BF16's dot products among them), and the choice of the
  bias-inside attention kernel (which needs them to beat PyTorch's fused kernel); the plain loops run, as on a CPU
  without AVX-512.
* ``amx``: oneDNN's AMX micro-kernels (bf16 attention GEMMs on VNNI panels, the int8 GEMM with its fused
  epilogue); bf16 attention GEMMs then run as AVX512-BF16 dot products where the CPU has them (else on row-major
  operands through ATen) and int8 GEMMs through ``torch._int_mm``.

The environment decides at start: ``SAM_FAST_CPU_NO_AVX512`` and ``SAM_FAST_CPU_NO_AMX`` switch a path off when set
to anything but ``""``, ``"0"``, ``"false"``, ``"no"`` or ``"off"``. :func:`disable` changes it in process (tests
use it to reach every path the CPU has):

>>> with sam_fast.cpu_features.disable(amx=True):
...     y = encoder(x)          # int8 GEMMs through torch._int_mm, bf16 attention without AMX
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

__all__ = ["env_flag", "switched_off", "avx512", "amx", "disable", "describe"]

AVX512, AMX = 1, 2  # the bits of the C++ mask (csrc/cpu/cpu.h)
_OFF_WORDS = ("", "0", "false", "no", "off")


def env_flag(name: str) -> bool:
    """Whether the environment flag ``name`` is on: set to anything but ``""``, ``"0"``, ``"false"``, ``"no"`` or
    ``"off"`` (any case)."""
    return os.environ.get(name, "").strip().lower() not in _OFF_WORDS


def _env_mask() -> int:
    return (AVX512 if env_flag("SAM_FAST_CPU_NO_AVX512") else 0) | (AMX if env_flag("SAM_FAST_CPU_NO_AMX") else 0)


def _mask(new: int = -1) -> int:
    """The switched-off mask (the C++ extension's, which its kernels read; the environment's without it), after
    setting ``new`` when it is >= 0. Returns the mask before the call."""
    from .ops._ext import extension_error

    if extension_error() is None:
        return int(torch.ops.sam_fast.cpu_features(new))
    before = getattr(_mask, "fallback", None)
    before = _env_mask() if before is None else before
    if new >= 0:
        _mask.fallback = new
    return before


def switched_off() -> frozenset:
    """The paths switched off now: a subset of ``{"avx512", "amx"}``."""
    m = _mask()
    return frozenset(name for name, bit in (("avx512", AVX512), ("amx", AMX)) if m & bit)


@functools.lru_cache(maxsize=None)
def _cpu_capability() -> str:
    return getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()


def avx512() -> bool:
    """Whether the AVX-512 paths run: PyTorch runs its AVX-512 kernels on this CPU and they are not switched off."""
    return _cpu_capability().startswith("AVX512") and not _mask() & AVX512


def amx() -> bool:
    """Whether the AMX paths may run (not switched off; the kernels still check that the CPU has AMX)."""
    return not _mask() & AMX


@contextlib.contextmanager
def disable(*, avx512: bool = False, amx: bool = False):
    """Switch the AVX-512 and / or AMX paths off for the whole process inside the ``with`` block (the previous
    state comes back after it). Switching is for tests and A/B timings: every thread sees it at once."""
    for name, v in (("avx512", avx512), ("amx", amx)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    before = _mask()
    _mask(before | (AVX512 if avx512 else 0) | (AMX if amx else 0))
    try:
        yield
    finally:
        _mask(before)


#: /proc/cpuinfo flags -> the names :func:`describe` gives them (the instruction sets the CPU paths choose between)
_FLAGS = (("avx512f", "avx512"), ("avx512_vnni", "vnni"), ("avx512_bf16", "avx512-bf16"), ("amx_bf16", "amx-bf16"),
          ("amx_int8", "amx-int8"))


@functools.lru_cache(maxsize=None)
def describe() -> str:
    """This CPU in one line for benchmark rows: its model name and the instruction sets that decide the CPU paths,
    e.g. ``"AMD EPYC 9R14, 2 cores; avx512 vnni avx512-bf16"`` (``"no avx512"`` without them). Linux reads
    /proc/cpuinfo; elsewhere the platform's processor name and PyTorch's capability stand in."""
    import platform

    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not name:
                    name = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
                if name and flags:
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    if flags:
        features = [label for flag, label in _FLAGS if flag in flags]
    else:
        features = [_cpu_capability().lower()] if _cpu_capability() else []
    return f"{name}, {os.cpu_count()} cores; {' '.join(features) or 'no avx512'}"
