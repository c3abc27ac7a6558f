"""Where the CPU paths take over from PyTorch: every size threshold of the C++ / batched CPU paths in one frozen object.

Which instruction sets a path may use is :mod:`sam_fast.cpu_features`; *whether a path pays* at a given size is
this policy. Each field is a crossover measured with the benchmark named in its comment; the figures themselves,
per machine, are in ``bench/results/cpu_policy.md``. The defaults are what ships; :func:`policy` returns the one in
force, and :func:`use` replaces fields for a ``with`` block (process-wide, like ``torch.set_num_threads``), e.g. to
reach a path at a size it would not take by default::

    with sam_fast.cpu_policy.use(plain_max_tokens=0):   # tiny blocks through the kernels too
        encoder(image)
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading

from ._args import int_arg


@dataclasses.dataclass(frozen=True)
class CpuPolicy:
    """The CPU paths' size thresholds (see the module docstring). Every field is checked when the object is made."""

    #: SAM blocks whose grid has at most this many tokens run plain PyTorch at inference under ``backend="auto"``
    #: (the batched path's fixed per-call work costs more than it saves there; bench_cpu_blocks.py). 0: never.
    plain_max_tokens: int = 1024
    #: SAM's own blocks whose segments (window, or the grid of a global block) have at least this many keys run
    #: ``sam_fast::sam_block_attention`` (bench_cpu_blocks.py, window-7 block)
    sam_block_min_keys: int = 49
    #: segments of the batched dilated path with at least this many keys take ``sam_fast::rel_pos_attention`` (the
    #: bias added inside the kernel); smaller ones stay on PyTorch's fused kernel with the bias as its mask
    rel_pos_min_keys: int = 128
    #: bytes of materialised bias one chunk of the batched path may hold (one query row of one segment at least)
    bias_chunk_bytes: int = 1 << 21
    #: bytes of the two decomposed bias terms ``sam_fast::rel_pos_attention``'s caller computes at once
    rel_terms_bytes: int = 32 << 20
    #: off the oneDNN path (``fp32_gemm_onednn``), float32 linears whose output is smaller keep ``nn.Linear``
    #: (+ in-place ops) instead of ``sam_fast::linear_epilogue_`` (while the output fits a core's L2 the extra passes
    #: are cheap; sam-fast bench)
    epilogue_min_bytes: int = 1 << 21
    #: float32 linears of the fused block paths run oneDNN's GEMM with the bias, GELU and residual as post-ops
    #: (``torch.ops.mkldnn._linear_pointwise``) instead of ATen's addmm (MKL's sgemm) and ``linear_epilogue_``
    #: at any size (bench_linear_epilogue.py: 4-43% faster at ViT-B's shapes on an AVX-512 EPYC)
    fp32_gemm_onednn: bool = True
    #: with ``fp32_gemm_onednn``, bfloat16 linears too run oneDNN's GEMM with the bias, GELU and residual as post-ops,
    #: on CPUs that multiply bf16 in hardware (AMX, AVX512-BF16): GELU computed on the float32 accumulator in the same
    #: pass. ViT-B's lin1 + GELU on a 2-core Xeon with AMX: 11 ms against 28 ms for ATen's GEMM and GELU
    bf16_gemm_onednn: bool = True
    #: the int32 accumulator of a CPU int8 GEMM whose output is not float32 goes into a per-thread buffer kept
    #: between calls when it holds at most this many bytes (a fresh allocation this large comes from the OS and
    #: page-faults on first touch)
    int8_workspace_bytes: int = 256 << 20
    #: under ``quantize="int8"``, on a CPU whose int8 GEMM is ``torch._int_mm`` (no AMX int8, no AVX512-VNNI), linears
    #: with fewer input channels stay in float (quantising the input and the epilogue pass over the int32 accumulator
    #: cost about what the int8 GEMM saves; bench_int8_linear.py, bench_e2e.py). The fused GEMM of the other CPUs
    #: pays at every width
    int8_min_in_features: int = 256
    #: under ``quantize="int8"``, a bf16 / fp16 model's CPU linears stay in that dtype where the CPU multiplies it in
    #: hardware (AMX / AVX512-BF16 GEMMs outrun torch._int_mm; bench_e2e.py)
    int8_half_stays_float: bool = True
    #: under ``quantize="int8"``, a float32 model's SAM blocks (the C++ block kernel's) run their attention in bf16
    #: where the CPU multiplies bf16 in hardware (AVX512-BF16 / AMX): the qkv GEMM's epilogue writes bf16 and the
    #: projection reads it, writing float32 again. The attention's two GEMMs are half the int8 encoder's time in
    #: float32, and bf16 rounding costs far less accuracy than W8A8 itself (bench_cpu_runtimes.py)
    int8_attention_bf16: bool = True

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in (bool, "bool"):
                if not isinstance(value, bool):
                    raise TypeError(f"CpuPolicy.{f.name} must be a bool, got {type(value).__name__}")
            else:
                int_arg(value, f"CpuPolicy.{f.name}", 0)

    def replace(self, **changes) -> "CpuPolicy":
        """A copy with ``changes``; an unknown field is a TypeError naming it."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"CpuPolicy has no field {unknown[0]!r}; fields: {sorted(known)}")
        return dataclasses.replace(self, **changes)


DEFAULT = CpuPolicy()
_current = DEFAULT
_lock = threading.Lock()


def policy() -> CpuPolicy:
    """The policy in force."""
    return _current


def set_policy(new: CpuPolicy) -> CpuPolicy:
    """Put ``new`` in force for the process; returns the one it replaces."""
    global _current
    if not isinstance(new, CpuPolicy):
        raise TypeError(f"new must be a sam_fast.cpu_policy.CpuPolicy, got {type(new).__name__}")
    with _lock:
        old, _current = _current, new
    return old


@contextlib.contextmanager
def use(policy_or_none: CpuPolicy | None = None, **changes):
    """Inside the ``with`` block, ``policy_or_none`` (default: the one in force) with ``changes`` is in force."""
    base = policy() if policy_or_none is None else policy_or_none
    if not isinstance(base, CpuPolicy):
        raise TypeError(f"policy must be a sam_fast.cpu_policy.CpuPolicy, got {type(base).__name__}")
    old = set_policy(base.replace(**changes))
    try:
        yield policy()
    finally:
        set_policy(old)
