"""A sanitizer for Triton kernels run under the interpreter: global-memory races and out-of-bounds access.

On a GPU, compute-sanitizer's memcheck finds out-of-bounds accesses and its racecheck shared-memory races.
Here there is no GPU, and the interpreter hides both kinds of bug:

* it runs a launch's programs one after another, so two programs of one launch storing to the same
  global address, or one program loading what another of the same launch stores - results that depend
  on the GPU's scheduling - pass every numerical test (racecheck would not see them either: they are in
  global memory);
* an unmasked access past a tensor reads or writes whatever host memory lies there, usually without a
  crash.

:func:`interpreter_sanitizer` wraps the interpreter's masked load and store and records, for every launch,
which program touched which address, and whether each address lies inside one of the launch's tensor
arguments (the span of the view from its lowest to its highest element).
"""

import contextlib

import numpy as np
import torch


class Accesses:
    """Per launch with a finding: ``races`` ``(kernel, launch number, addresses stored by several programs)``,
    ``read_races`` ``(kernel, launch number, addresses stored by one program and loaded by another)``,
    ``out_of_bounds`` ``(kernel, launch number, "load" | "store", accesses outside every tensor argument)``;
    ``launches``: ``(kernel, addresses stored)`` for every launch, so a check can see it looked."""

    def __init__(self):
        self.races, self.read_races, self.out_of_bounds, self.launches = [], [], [], []

    def findings(self):
        return self.races + self.read_races + self.out_of_bounds


def _span(t: torch.Tensor):
    """[first byte, one past the last byte) of the elements a view can reach."""
    if t.numel() == 0:
        return None
    lo = hi = 0
    for size, stride in zip(t.shape, t.stride()):
        reach = (size - 1) * stride
        lo, hi = (lo + reach, hi) if reach < 0 else (lo, hi + reach)
    return t.data_ptr() + lo * t.element_size(), t.data_ptr() + (hi + 1) * t.element_size()


def _tensors(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (tuple, list)):
            yield from _tensors(v)


@contextlib.contextmanager
def interpreter_sanitizer():
    """Yields an :class:`Accesses` that fills as the interpreter launches kernels inside the block.
    Needs ``TRITON_INTERPRET=1``."""
    from triton.runtime import interpreter as interp

    record = Accesses()
    state = {"writes": [], "reads": [], "launch": 0, "kernel": None, "spans": np.zeros((0, 2), np.uint64)}
    real_store = interp.InterpreterBuilder.create_masked_store
    real_load = interp.InterpreterBuilder.create_masked_load
    real_call = interp.GridExecutor.__call__

    def finish():
        launch = (state["kernel"], state["launch"])
        if state["writes"]:
            addr = np.concatenate([a for a, _ in state["writes"]])
            prog = np.concatenate([p for _, p in state["writes"]])
            pairs = np.unique(np.stack([addr.astype(np.int64), prog]), axis=1)  # (address, program), once each
            _, programs_per_address = np.unique(pairs[0], return_counts=True)
            shared = int((programs_per_address > 1).sum())
            if shared:
                record.races.append(launch + (shared,))
            if state["reads"]:
                raddr = np.concatenate([a for a, _ in state["reads"]]).astype(np.int64)
                rprog = np.concatenate([p for _, p in state["reads"]])
                hit = np.isin(raddr, pairs[0])
                both = np.unique(np.concatenate([pairs, np.stack([raddr[hit], rprog[hit]])], axis=1), axis=1)
                _, programs_per_address = np.unique(both[0], return_counts=True)
                crossed = int((programs_per_address > 1).sum()) - shared
                if crossed:
                    record.read_races.append(launch + (crossed,))
        for kind, accesses in (("load", state["reads"]), ("store", state["writes"])):
            if accesses:
                addr = np.concatenate([a for a, _ in accesses])
                spans = state["spans"]
                inside = ((addr[:, None] >= spans[None, :, 0]) & (addr[:, None] < spans[None, :, 1])).any(axis=1)
                if not inside.all():
                    record.out_of_bounds.append(launch + (kind, int((~inside).sum())))
        record.launches.append((state["kernel"], sum(len(a) for a, _ in state["writes"])))
        state["writes"], state["reads"] = [], []

    def call(self, *args, **kwargs):
        state["launch"] += 1
        state["kernel"] = getattr(self.fn, "__name__", str(self.fn))
        spans = [s for s in map(_span, _tensors(list(args) + list(kwargs.values()))) if s is not None]
        state["spans"] = np.array(spans, dtype=np.uint64).reshape(-1, 2)
        try:
            return real_call(self, *args, **kwargs)
        finally:
            finish()

    def accessed(builder, ptrs, mask):
        addresses = np.broadcast_to(np.asarray(ptrs.data), np.shape(mask.data))[np.asarray(mask.data, dtype=bool)]
        x, y, z = builder.grid_idx
        program = (x * 65536 + y) * 65536 + z
        return addresses.astype(np.uint64), np.full(addresses.shape, program, dtype=np.int64)

    def store(self, ptrs, value, mask, *rest):
        state["writes"].append(accessed(self, ptrs, mask))
        return real_store(self, ptrs, value, mask, *rest)

    def load(self, ptrs, mask, *rest):
        state["reads"].append(accessed(self, ptrs, mask))
        return real_load(self, ptrs, mask, *rest)

    interp.InterpreterBuilder.create_masked_store = store
    interp.InterpreterBuilder.create_masked_load = load
    interp.GridExecutor.__call__ = call
    try:
        yield record
    finally:
        interp.InterpreterBuilder.create_masked_store = real_store
        interp.InterpreterBuilder.create_masked_load = real_load
        interp.GridExecutor.__call__ = real_call
