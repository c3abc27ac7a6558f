"""A global-memory write-race detector for Triton kernels run under the interpreter.

compute-sanitizer's racecheck sees shared memory only, and the interpreter runs a launch's programs one
after another, so two programs of one launch storing to the same global address - a result that depends
on the GPU's scheduling - pass every interpreter test unnoticed. :func:`write_races` records, for every
launch, which program stored to which address, and reports the launches where an address was stored by
more than one program.
"""

import contextlib

import numpy as np


class Writes:
    """``races``: ``(kernel name, launch number, addresses stored by several programs)`` per launch with an
    overlap; ``launches``: ``(kernel name, addresses stored)`` per launch, so a check can see it looked."""

    def __init__(self):
        self.races, self.launches = [], []


@contextlib.contextmanager
def write_races():
    """Yields a :class:`Writes` that fills as the interpreter launches kernels inside the block.
    Needs ``TRITON_INTERPRET=1``."""
    from triton.runtime import interpreter as interp

    record = Writes()
    state = {"writes": [], "launch": 0, "kernel": None}
    real_store = interp.InterpreterBuilder.create_masked_store
    real_call = interp.GridExecutor.__call__

    def finish():
        if state["writes"]:
            addr = np.concatenate([a for a, _ in state["writes"]])
            prog = np.concatenate([p for _, p in state["writes"]])
            pairs = np.unique(np.stack([addr.astype(np.int64), prog]), axis=1)  # (address, program), once each
            _, programs_per_address = np.unique(pairs[0], return_counts=True)
            shared = int((programs_per_address > 1).sum())
            if shared:
                record.races.append((state["kernel"], state["launch"], shared))
        record.launches.append((state["kernel"], sum(len(a) for a, _ in state["writes"])))
        state["writes"] = []

    def call(self, *args, **kwargs):
        state["launch"] += 1
        state["kernel"] = getattr(self.fn, "__name__", str(self.fn))
        try:
            return real_call(self, *args, **kwargs)
        finally:
            finish()

    def store(self, ptrs, value, mask, *rest):
        addresses = np.broadcast_to(np.asarray(ptrs.data), np.shape(mask.data))[np.asarray(mask.data, dtype=bool)]
        x, y, z = self.grid_idx
        program = (x * 65536 + y) * 65536 + z
        state["writes"].append((addresses.astype(np.uint64), np.full(addresses.shape, program, dtype=np.int64)))
        return real_store(self, ptrs, value, mask, *rest)

    interp.InterpreterBuilder.create_masked_store = store
    interp.GridExecutor.__call__ = call
    try:
        yield record
    finally:
        interp.InterpreterBuilder.create_masked_store = real_store
        interp.GridExecutor.__call__ = real_call
