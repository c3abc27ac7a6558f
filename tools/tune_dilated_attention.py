"""Tune the attention kernels' launch choices on this GPU for SAM's shapes; write the checked-in table.

For each case (SAM ViT-H / ViT-B / SlimSAM global and window blocks, the dilated benchmark's patterns)
and direction (forward; backward = dK/dV + dQ), every candidate of a small grid - query tile
``BLOCK_M``, ``num_warps``, ``num_stages`` and, where the head dim is not a power of two, split or
padded - is timed with ``triton.testing.do_bench`` under
:func:`sam_fast.kernels.dilated_attention.forced_config`. A candidate must agree with the heuristic
configuration's result (to the input dtype's rounding) or the run stops with an error; one that does
not compile here (shared memory, registers) is skipped. The fastest is stored under this GPU's
architecture in ``kernels/tuned/dilated_attention.json``, keyed by
:func:`~sam_fast.kernels.dilated_attention.tune_key`, after every case (a run cut short keeps what it
measured). The file is reviewed and committed like code; nothing is written into an installed package.

    python -m tools.tune_dilated_attention [--table kernels/tuned/dilated_attention.json] [--batch 8] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

# (name, grid, heads, head dim, pattern spec, rel-pos, window padding): most important first.
CASES = [
    ("vit_h global", (64, 64), 16, 80, None, True, False),
    ("vit_h window", (64, 64), 16, 80, (14, 14), True, True),
    ("vit_b global", (64, 64), 12, 64, None, True, False),
    ("vit_b window", (64, 64), 12, 64, (14, 14), True, True),
    ("2-D (32,32) r=2 D=64", (64, 64), 16, 64, [((32, 32), 2)], False, False),
    ("2-D (32,32) r=2 D=80", (64, 64), 16, 80, [((32, 32), 2)], False, False),
    ("2-D (64,64) r=4 D=64", (64, 64), 16, 64, [((64, 64), 4)], False, False),
    ("LongNet mix D=64", (64, 64), 16, 64, [(1024, 1), (2048, 2), (4096, 4)], False, False),
    ("slimsam_50 global", (64, 64), 12, 32, None, True, False),
    ("slimsam_50 window", (64, 64), 12, 32, (14, 14), True, True),
    ("slimsam_77 global", (64, 64), 12, 14, None, True, False),
]


def pattern_of(spec):
    from sam_fast import Branch

    if spec is None:
        return None
    if isinstance(spec, tuple):  # a window
        return Branch(spec)
    return [Branch(seg, dil) for seg, dil in spec]


def candidates(head_dim: int, backward: bool, fp32: bool = False) -> Iterator[dict]:
    """The grid: query tiles of 64 / 128 (16 / 32 for fp32), 4 or 8 warps, 1-3 pipeline stages (1-2
    backward), split or padded head dim where :func:`head_dim_split` would split it. 128-query tiles on
    4 warps are left out: compiled for sm_90 (``tools/aot_compile.py --tune-candidates``, Triton 3.6)
    44 of their 84 backward kernels and 18 of 42 forward ones spilled, up to 1.2 KB per thread; of the
    252 kernels with 8 warps, 9 spilled (at most 40 bytes)."""
    from sam_fast.kernels.dilated_attention import head_dim_split

    tiles = (16, 32) if fp32 else (64, 128)
    stages = (1, 2) if backward else (1, 2, 3)
    splits = (True, False) if head_dim_split(head_dim)[1] else (True,)
    for block_m, warps, st, split in itertools.product(tiles, (4, 8), stages, splits):
        if block_m == 128 and warps == 4:
            continue
        yield dict(BLOCK_M=block_m, num_warps=warps, num_stages=st, split=split)


def make_inputs(case, batch: int, dtype, device, gen):
    """(args, kwargs) of sam_fast.dilated_attention for a case, with leaves that take gradients."""
    _, grid, H, D, spec, rel, pad = case
    N = grid[0] * grid[1]
    q, k, v = (torch.randn(batch, N, H, D, device=device, dtype=dtype, generator=gen).requires_grad_()
               for _ in range(3))
    kw = {"grid": grid, "softmax_scale": D ** -0.5}
    seg = spec if isinstance(spec, tuple) else grid
    if rel:
        kw["rel_pos_h"] = (torch.randn(2 * seg[0] - 1, D, device=device, generator=gen) * 0.2).to(dtype)
        kw["rel_pos_w"] = (torch.randn(2 * seg[1] - 1, D, device=device, generator=gen) * 0.2).to(dtype)
    if pad:
        kw["pad_kv"] = tuple(torch.randn(H, D, device=device, generator=gen).to(dtype) for _ in range(2))
    return (q, k, v, pattern_of(spec)), kw


def case_runner(case, batch: int, dtype, device, backward: bool, seed: int = 0) -> Callable[[], List[torch.Tensor]]:
    """A function that runs one direction of a case and returns what it computed: out and lse, or with
    ``backward`` the gradients of q, k, v. For the backward the forward runs once, here (heuristic
    configuration), and each call replays only the backward launches through the retained graph."""
    import sam_fast

    gen = torch.Generator(device=device).manual_seed(seed)
    args, kw = make_inputs(case, batch, dtype, device, gen)
    if not backward:
        def forward():
            with torch.no_grad():
                return list(sam_fast.dilated_attention(*args, return_lse=True, backend="triton", **kw))
        return forward
    q, k, v = args[:3]
    dout = torch.randn(q.shape, device=device, dtype=dtype, generator=gen)
    out = sam_fast.dilated_attention(*args, backend="triton", **kw)

    def backward_only():
        return list(torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
    return backward_only


class Disagreement(Exception):
    """A candidate configuration computed something else than the heuristic one: a kernel bug."""


def agrees(got: List[torch.Tensor], want: List[torch.Tensor], dtype) -> Optional[str]:
    """None when a candidate's results equal the reference configuration's to rounding, else why not."""
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for i, (a, b) in enumerate(zip(got, want)):
        a, b = a.float(), b.float()
        fin = torch.isfinite(b)
        if not torch.equal(fin, torch.isfinite(a)):
            return f"result {i}: non-finite entries differ"
        scale = b[fin].abs().max().clamp_min(1.0) if fin.any() else 1.0
        err = (a[fin] - b[fin]).abs().max() / scale if fin.any() else 0.0
        if err > tol:
            return f"result {i}: max error {float(err):.3g} of the largest value (> {tol})"
    return None


def fastest(cands: Iterable[dict], trial: Callable[[dict], float], log=print) -> Optional[Tuple[float, dict]]:
    """(ms, config) of the fastest candidate, None when none ran. ``trial(cfg) -> ms`` checks a candidate's
    result (raising :class:`Disagreement`, which stops the run) and times it; any other error means the
    candidate does not fit this GPU (shared memory, registers) and it is skipped, saying so."""
    best = None
    for cfg in cands:
        try:
            ms = trial(cfg)
        except Disagreement:
            raise
        except Exception as exc:
            log(f"  skip {cfg}: {type(exc).__name__}: {str(exc)[:80]}")
            continue
        if best is None or ms < best[0]:
            best = (ms, cfg)
    return best


def tune_case(case, batch: int, dtype, device, backward: bool, bench: Callable[[Callable], float],
              log=print) -> Optional[dict]:
    """Time every candidate of one case and direction; returns the table entry of the fastest (None when
    nothing ran). ``bench(fn) -> ms`` times a callable (``triton.testing.do_bench`` on a GPU)."""
    from sam_fast.kernels.dilated_attention import tuning as K

    run = case_runner(case, batch, dtype, device, backward)  # (a backward's forward runs here, unrecorded)
    keys = []
    real_config = K.config_for

    def spy(group, padded, has_rel, q, backward, **kw):  # records the keys the launches look up
        keys.append(K.tune_key(group, padded, has_rel, q.shape[-1], q.dtype, backward))
        return real_config(group, padded, has_rel, q, backward=backward, **kw)

    K.config_for = spy
    try:
        want = run()  # the heuristic configuration: the reference every candidate must agree with
    finally:
        K.config_for = real_config
    key = keys[0]
    if len({json.dumps(k, sort_keys=True) for k in keys}) > 1:
        log(f"  {case[0]}: several launch groups; tuning their common choice under the first key")
    fp32 = dtype == torch.float32 and not K._interpreting()  # as the launchers decide it

    def trial(cfg):
        with K.forced_config(cfg):
            why = agrees(run(), want, dtype)
            if why is not None:
                raise Disagreement(f"{case[0]} {'bwd' if backward else 'fwd'} with {cfg} disagrees with the "
                                   f"heuristic configuration: {why}")
            return bench(run)

    best = fastest(candidates(case[3], backward, fp32), trial, log)
    if best is None:
        return None
    base_ms = bench(run)  # the heuristic configuration, for the record
    return {"key": key, "config": best[1], "ms": round(best[0], 4), "heuristic_ms": round(base_ms, 4),
            "case": f"{case[0]} B={batch} {str(dtype)[6:]}"}


def write_table(path: str, doc: dict, arch: str, entries: Dict[str, dict], device_name: str) -> None:
    doc.setdefault("configs", {})[arch] = [entries[k] for k in sorted(entries)]
    doc.setdefault("devices", {})[arch] = device_name
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table",
                   default=os.path.join(os.path.dirname(__file__), "..", "kernels", "tuned", "dilated_attention.json"))
    p.add_argument("--batch", type=int, default=8, help="images per timed call (the tuned entries ignore batch)")
    p.add_argument("--quick", action="store_true", help="the ViT-H and ViT-B cases only")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_dilated_attention: needs a CUDA GPU (the table is per GPU architecture)", file=sys.stderr)
        return 2
    import triton.testing
    from tqdm import tqdm

    from sam_fast.kernels._arch import device_arch

    device = torch.device("cuda")
    arch = device_arch(device)
    with open(args.table) as f:
        doc = json.load(f)
    entries = {json.dumps(e["key"], sort_keys=True): e for e in doc.get("configs", {}).get(arch, [])}
    todo = [(c, bwd) for c in (CASES[:4] if args.quick else CASES) for bwd in (False, True)]

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=10, rep=40)

    for case, backward in tqdm(todo, desc=f"tuning attention ({arch})"):
        entry = tune_case(case, args.batch, torch.bfloat16, device, backward, bench, log=tqdm.write)
        if entry is None:
            tqdm.write(f"{case[0]} {'bwd' if backward else 'fwd'}: no candidate ran")
            continue
        tqdm.write(f"{entry['case']} {entry['key']['dir']}: {entry['ms']:.3f} ms "
                   f"(heuristic {entry['heuristic_ms']:.3f}) "
                   f"with {entry['config']}")
        entries[json.dumps(entry["key"], sort_keys=True)] = entry
        write_table(args.table, doc, arch, entries, torch.cuda.get_device_name())
    print(f"wrote {len(entries)} entries for {arch} to {os.path.abspath(args.table)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
