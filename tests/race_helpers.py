"""A global-memory race detector for Triton kernels run under the interpreter.

compute-sanitizer's racecheck sees shared memory only, and the interpreter runs a launch's programs one
after another, so two programs of one launch storing to the same global address, or one program reading
what another of the same launch stores - results that depend on the GPU's scheduling - pass every
interpreter test unnoticed. :func:`write_races` records, for every launch, which program stored and
loaded which address, and reports the launches where an address stored by one program was stored or
loaded by another.
"""

import contextlib

import numpy as np


class Writes:
    """``races``: ``(kernel name, launch number, addresses stored by several programs)`` and
    ``read_races``: ``(kernel name, launch number, addresses stored by one program and loaded by another)``
    per launch with such an overlap; ``launches``: ``(kernel name, addresses stored)`` per launch, so a
    check can see it looked."""

    def __init__(self):
        self.races, self.read_races, self.launches = [], [], []


@contextlib.contextmanager
def write_races():
    """Yields a :class:`Writes` that fills as the interpreter launches kernels inside the block.
    Needs ``TRITON_INTERPRET=1``."""
    from triton.runtime import interpreter as interp

    record = Writes()
    state = {"writes": [], "reads": [], "launch": 0, "kernel": None}
    real_store = interp.InterpreterBuilder.create_masked_store
    real_load = interp.InterpreterBuilder.create_masked_load
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
            if state["reads"]:
                raddr = np.concatenate([a for a, _ in state["reads"]]).astype(np.int64)
                rprog = np.concatenate([p for _, p in state["reads"]])
                hit = np.isin(raddr, pairs[0])
                both = np.unique(np.concatenate([pairs, np.stack([raddr[hit], rprog[hit]])], axis=1), axis=1)
                _, programs_per_address = np.unique(both[0], return_counts=True)
                crossed = int((programs_per_address > 1).sum()) - shared
                if crossed:
                    record.read_races.append((state["kernel"], state["launch"], crossed))
        record.launches.append((state["kernel"], sum(len(a) for a, _ in state["writes"])))
        state["writes"], state["reads"] = [], []

    def call(self, *args, **kwargs):
        state["launch"] += 1
        state["kernel"] = getattr(self.fn, "__name__", str(self.fn))
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
