"""Run by test_export.py in a process of its own (the Triton kernels must be defined for a GPU, not for the
interpreter): what a trace for an AOTInductor package of a CUDA model holds, on a machine without a GPU.

The model is moved to fake CUDA tensors (``FakeTensorMode``), exported as :func:`sam_fast.export` does, then lowered
the way Inductor lowers it (``aot_export_module``, which runs the ``triton_op`` bodies under functionalization). The
GPU is stood in for where the trace asks about it: the capability of an sm_90 device, and Triton's compile target
(Inductor generates each kernel's TTIR to learn which tensors it writes: that is the check that the kernels and their
arguments compile for sm_90 through ``wrap_triton``). Prints one JSON object: per model, the sam_fast ops in the
exported graph, the sam_fast ops left after lowering, and each Triton launch with the tensors it writes and any
runtime argument Inductor could not pass."""

import collections
import json
import sys

from sam_fast.kernels._interpreter import compile_for_gpu

compile_for_gpu()  # before anything defines a kernel

import torch  # noqa: E402
import triton  # noqa: E402
from torch._functorch.aot_autograd import aot_export_module  # noqa: E402
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

import sam_fast  # noqa: E402
from sam_fast import cpu_policy  # noqa: E402
from sam_fast._dispatch import exporting  # noqa: E402
from sam_fast.exporting import _Encoder  # noqa: E402
from sam_fast.models.tiny import tiny_sam  # noqa: E402
from sam_fast.pattern import Branch  # noqa: E402


class _Hopper:
    """Triton's driver where there is none: only the compile target is asked for."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


def _configs():
    """A dilated student (two branches in its global blocks, exact attention in its windows), every linear int8."""
    dilated = sam_fast.Dilated([Branch((4, 4)), Branch((16, 16), (2, 2))], "global")
    yield "dilated_int8", tiny_sam().eval(), sam_fast.SamFastConfig(dilated, quantize="int8", backend="triton")


class _Tuple(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return (self.inner(x),)


def _sam_fast_ops(graph) -> dict:
    return dict(collections.Counter(str(n.target) for n in graph.nodes
                                    if n.op == "call_function" and "sam_fast" in str(n.target)))


def _launch(node) -> list:
    """[kernel name, the tensors it writes, its runtime arguments that are neither tensors nor scalars (Inductor
    cannot pass those to a kernel it compiles: a tuple must be a constexpr)]"""
    kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
    jit = kernel.fn if isinstance(kernel, Autotuner) else kernel  # launch options come as a one-config autotuner
    constants = kernel_side_table.get_constant_args(node.kwargs["constant_args_idx"])
    runtime = {p.name for p in jit.params if not p.is_constexpr}
    odd = sorted(name for name, value in constants.items()
                 if name in runtime and not isinstance(value, (bool, int, float, type(None))))
    return [jit.fn.__name__, sorted(node.kwargs["tensors_to_clone"]), odd]


def main():
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    triton.runtime.driver.set_active(_Hopper())
    cpu_policy.set_policy(cpu_policy.policy().replace(int8_min_in_features=0))  # every linear int8
    report = {}
    for name, model, config in _configs():
        sam_fast.apply(model, config)
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            model = model.to("cuda")
            x = torch.zeros(2, 3, 256, 256, device="cuda")
        dynamic = ({0: torch.export.Dim("batch", min=1, max=64)},)
        with torch.no_grad(), exporting("aoti"):
            ep = torch.export.export(_Encoder(model).eval(), (x,), dynamic_shapes=dynamic)
        with mode, torch.no_grad():
            lowered, _ = aot_export_module(_Tuple(ep.module()), [x], trace_joint=False)
        launches = [_launch(n) for n in lowered.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
        report[name] = {"exported": _sam_fast_ops(ep.graph), "lowered": _sam_fast_ops(lowered.graph),
                        "launches": launches}
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
