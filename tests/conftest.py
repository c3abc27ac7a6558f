"""Test setup: on a machine without a CUDA GPU, Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before triton.jit decorates the kernels, i.e. before sam_fast is imported.
GPU tests carry ``@pytest.mark.gpu`` (or take the ``device`` fixture, whose CUDA parameter does) and run with
``pytest -m gpu``; see devices.py.
"""


import os
import sys

import pytest
import torch
from devices import DEVICES

# Tests import the project tooling as tools.<name> from the repository root. The root goes *last* on the path:
# a staged or installed sam_fast must win over the root's own sam_fast/ (which lacks kernels/ and the
# extension), as on the GPU machine, where the tests run with PYTHONSAFEPATH=1 against a staged package.
# `python -m pytest` puts the working directory first, and from the repository root the source folder kernels/
# (installed as sam_fast.kernels) would then shadow the PyPI package `kernels` that transformers imports: the root
# moves last.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT] + [_ROOT]

from sam_fast.kernels._interpreter import interpreting, use_interpreter_without_gpu  # noqa: E402

use_interpreter_without_gpu()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(params=["all", "no_avx512", "no_amx"])
def cpu_paths(request):
    """Each instruction-set path of the C++ CPU kernels in turn, switched in process
    (``sam_fast.cpu_features.disable``): all that the CPU has, AVX-512 off, AMX off."""
    from sam_fast import cpu_features

    with cpu_features.disable(avx512=request.param == "no_avx512", amx=request.param == "no_amx"):
        yield request.param


@pytest.fixture(params=DEVICES)
def device(request):
    """Each device a test runs on: ``cpu`` always, ``cuda`` under ``-m gpu`` (devices.DEVICES)."""
    return torch.device(request.param)


def pytest_configure(config):
    config.addinivalue_line("markers", "no_sanitizer: a test that races or reads out of bounds on purpose")
    config.addinivalue_line("markers", "cpu_int8_widths: a test that keeps sam_fast's CPU int8 width rule "
                                       "(cpu_policy int8_min_in_features, int8_half_stays_float) instead of lifting it")
    config.addinivalue_line("markers", "cpu_plain_gate: a test that keeps the plain-PyTorch gate for tiny CPU "
                                       "blocks (cpu_policy plain_max_tokens) instead of turning it off")
    config.addinivalue_line("markers", "cpu_int8_bf16_attention: a test that keeps an int8 model's bf16 attention on "
                                       "CPUs with bf16 arithmetic (cpu_policy int8_attention_bf16)")


# sam_fast's CPU policy (sam_fast.cpu_policy) as the tests run it: rules that every test model trips are lifted,
# and restored for the tests marked with their marker, which test the rule itself (module-scoped fixtures quantise
# too, so the policy is set here, before any fixture; subprocesses - CLI, scripts, Ray workers - keep the shipped
# one):
# - quantize="int8" keeps linears with fewer than 256 input channels in float, and a bf16 / fp16 model's linears
#   where the CPU multiplies those in hardware: every test model is narrower than that;
# - tiny SAM blocks run plain PyTorch at inference: every test model is tiny;
# - an int8 float32 model runs its SAM attention in bf16 where the CPU multiplies bf16 in hardware: the int8 tests
#   check W8A8's own numerics, which would otherwise depend on the machine.
from sam_fast import cpu_policy as _cpu_policy  # noqa: E402

_LIFTED = {  # marker: {policy field: value in tests}
    "cpu_int8_widths": {"int8_min_in_features": 0, "int8_half_stays_float": False},
    "cpu_plain_gate": {"plain_max_tokens": 0},
    "cpu_int8_bf16_attention": {"int8_attention_bf16": False},
}
_TEST_POLICY = _cpu_policy.DEFAULT.replace(**{k: v for lifted in _LIFTED.values() for k, v in lifted.items()})
_cpu_policy.set_policy(_TEST_POLICY)


@pytest.fixture(autouse=True)
def _test_cpu_policy(request):
    """The tests' CPU policy, with the shipped value of every rule whose marker the test carries; whatever a test
    sets (:func:`cpu_rules`) ends with it."""
    shipped = {}
    for marker, lifted in _LIFTED.items():
        if request.node.get_closest_marker(marker):
            shipped.update({k: getattr(_cpu_policy.DEFAULT, k) for k in lifted})
    _cpu_policy.set_policy(_TEST_POLICY.replace(**shipped))
    yield
    _cpu_policy.set_policy(_TEST_POLICY)


@pytest.fixture
def cpu_rules():
    """``cpu_rules(field=value, ...)`` changes the CPU policy (:mod:`sam_fast.cpu_policy`) for the rest of the test."""
    def change(**changes):
        _cpu_policy.set_policy(_cpu_policy.policy().replace(**changes))

    return change


@pytest.fixture(autouse=True)
def _interpreter_sanitizer(request):
    """Every test's Triton launches under the interpreter run inside :func:`interp_sanitizer.interpreter_sanitizer`:
    a global-memory race or an access outside the launch's tensors fails the test (at teardown), which the
    interpreter's in-order, unchecked execution would otherwise hide."""
    if not interpreting() or request.node.get_closest_marker("no_sanitizer"):
        yield
        return
    from interp_sanitizer import interpreter_sanitizer

    with interpreter_sanitizer() as accesses:
        yield
    assert accesses.findings() == [], f"Triton launches with races or out-of-bounds accesses: {accesses.findings()}"


_POISON_LIMIT = 1 << 26  # elements; larger allocations (the 4.3 GB lazily mapped views) stay unfilled


def _poison(t):
    """Fill a fresh ``torch.empty`` result with values no kernel should ever read back: NaN for floats,
    a recognisable non-zero pattern for integers (booleans stay as they are)."""
    # plain tensors only: fake / meta tensors (opcheck, torch.compile tracing) have no data, maybe no fixed size
    if type(t) is torch.Tensor and t.device.type == "cpu" and 0 < t.numel() <= _POISON_LIMIT and t.dtype != torch.bool:
        with torch.no_grad():
            if t.is_floating_point():
                t.fill_(float("nan"))
            elif not t.is_complex():
                t.fill_(-77 if t.dtype.is_signed else 177)
    return t


def _dynamo_rules_built_unpatched():
    """torch.compile's tracer looks torch functions up in a table it builds once, by name (``torch.empty`` -> the
    object), and caches. Built while the poisoned ``torch.empty`` below is in place, the table holds the test's
    lambda instead, and every later trace of the real ``torch.empty`` fails ("marked as skipped"): which test
    first built it decided which later compile test broke. So the table is built here first, unpatched. The same
    holds for the set of factory functions a ``with torch.device("meta")`` block redirects (else a module built
    there gets CPU weights)."""
    if not getattr(_dynamo_rules_built_unpatched, "done", False):
        from torch._dynamo import trace_rules
        from torch.utils._device import _device_constructors

        trace_rules.get_torch_obj_rule_map()
        trace_rules.get_tensor_method()
        _device_constructors()
        _dynamo_rules_built_unpatched.done = True


@pytest.fixture(autouse=True)
def _poisoned_empty(monkeypatch, request):
    """On the CPU, fresh pages from torch.empty are usually zeros, so a kernel or launcher that reads
    memory it never wrote passes here and returns garbage on a GPU (whose caching allocator hands back
    used memory). Every test runs with torch.empty, empty_like and new_empty filled with poison."""
    if torch.cuda.is_available() or request.node.get_closest_marker("gpu"):
        yield
        return
    _dynamo_rules_built_unpatched()
    real_empty, real_like, real_new = torch.empty, torch.empty_like, torch.Tensor.new_empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(real_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: _poison(real_new(self, *a, **k)))
    yield
