"""What every kernel launch shares: the GPU architecture name the tuned tables are keyed by, and the
compile options each launch states."""

import torch

# Whether the compiler may contract a * b + c into one FMA ("FP fusion"). Triton up to 3.8 always did by
# default; 3.9 warns that its default turns to off in 3.10. Every launch states it, so each Triton version
# compiles the same arithmetic (faster, and one rounding instead of two): the test tolerances, the tuned
# tables and the int8 epilogue's notes all assume it. tools/aot_compile.py fails a launch that omits it.
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def device_arch(device: torch.device) -> str:
    """``sm_<major><minor>`` of a CUDA device (``sm_90`` for the H100), ``cpu`` otherwise."""
    if device.type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def launchable(kernel, traceable: bool = False):
    """``kernel`` for ``kernel[grid](...)``; with ``traceable`` wrapped by ``torch.library.wrap_triton``, as the
    bodies of the ``torch.library.triton_op`` forms of the ops launch it: a trace for Inductor (an AOTInductor
    package) then records the launch itself, and Inductor compiles the kernel into what it writes. Eagerly the
    wrapped kernel runs as the bare one."""
    if not traceable:
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)
