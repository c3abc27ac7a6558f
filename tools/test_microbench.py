"""Microbenchmarks for pytest-benchmark: each op against its peers, on the cases the ``bench_<op>.py`` scripts
define (their ``cases`` / ``workload`` functions; one definition serves both).

Not part of the test run (``testpaths`` is ``tests``); run it explicitly::

    python -m pytest tools/test_microbench.py --benchmark-only --benchmark-autosave
    python -m pytest tools/test_microbench.py --benchmark-only --benchmark-compare
    python -m pytest tools/test_microbench.py --benchmark-only -k int8_linear --benchmark-group-by=param:case

On a GPU every round ends with a device synchronisation (pedantic mode, warm-up rounds first, so compilation
and autotuning stay out of the figures) and ``extra_info["cuda_event_ms"]`` holds the median of CUDA-event
timings of the same call. On a CPU the scripts' CPU cases are tiny shapes and the Triton kernels are left out:
the interpreter checks correctness, it is not a timing.
"""

from __future__ import annotations

import pytest
import torch

from sam_fast.kernels._interpreter import use_interpreter_without_gpu

use_interpreter_without_gpu()  # before any kernel module is imported (the bench scripts import them)

from sam_fast.bench import (  # noqa: E402
    bench_decoder,
    bench_dilated_attention,
    bench_dilated_attention_sam,
    bench_int8_linear,
    bench_resize_rel_pos,
)
from sam_fast.bench.harness import measure  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
ROUNDS, WARMUP = (50, 5) if GPU else (10, 2)


def run_benchmark(benchmark, fn, op: str, case: str, peer: str):
    """Time ``fn`` with pytest-benchmark; on a GPU each round is synchronised and CUDA events give a second
    figure in ``extra_info``."""
    benchmark.group = f"{op} {case}"
    benchmark.extra_info.update(op=op, case=case, peer=peer, device=str(DEVICE))
    if GPU:
        def call():
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
        benchmark.extra_info["cuda_event_ms"] = measure(fn, DEVICE)["median_ms"]
    else:
        benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)


def _params(entries):
    """pytest params (case, peer) with readable ids."""
    return [pytest.param(case, peer, id=f"{case_id}-{peer}") for case, case_id, peers in entries for peer in peers]


# -- int8_linear --------------------------------------------------------------------------------------------

_INT8_PEERS = [p for p in bench_int8_linear.peer_names(GPU) if p != "int_mm+compile"]  # one graph per shape
_INT8 = [(c, f"{c[1]}-{c[2]}x{c[3]}" + (f"-B{c[0]}" if c[0] else ""), _INT8_PEERS)
         for c in bench_int8_linear.cases(GPU, quick=True)]


@pytest.mark.parametrize("case,peer", _params(_INT8))
def test_int8_linear(benchmark, case, peer):
    B, model, K, N = case
    g = torch.Generator(device=DEVICE).manual_seed(0)
    name, _, _, peers = bench_int8_linear.workload(B, model, K, N, DEVICE, g, [peer])
    run_benchmark(benchmark, peers[peer], "int8_linear", name, peer)


# -- resize_rel_pos -----------------------------------------------------------------------------------------

_RESIZE_PEERS = [bench_resize_rel_pos.BASELINE, f"sam_fast({DEVICE.type})"]
_RESIZE = [(c, f"{c[0]}to{c[1]}", _RESIZE_PEERS) for c in bench_resize_rel_pos.CASES]


@pytest.mark.parametrize("case,peer", _params(_RESIZE))
def test_resize_rel_pos(benchmark, case, peer):
    name, _, peers = bench_resize_rel_pos.workload(*case, DEVICE)
    run_benchmark(benchmark, peers[peer], "resize_rel_pos", name, peer)


# -- mask_postprocess ---------------------------------------------------------------------------------------

_POST_PEERS = [bench_decoder.BASELINE, f"sam_fast_{'cuda' if GPU else 'cpu'}"]
_POST = [(g, g[0], _POST_PEERS) for g in bench_decoder.postprocess_geometries(GPU)]


@pytest.mark.parametrize("case,peer", _params(_POST))
def test_mask_postprocess(benchmark, case, peer):
    name, _, _, peers = bench_decoder.postprocess_workload(1024 if GPU else 64, case, DEVICE)
    run_benchmark(benchmark, peers[peer], "mask_postprocess", name, peer)


# -- dilated_attention: SAM's global blocks (fused rel-pos) and dilated patterns ----------------------------

_DTYPE = torch.bfloat16 if GPU else torch.float32
_SAM = [(c, c[0].replace(" ", "-"), [name for name, _ in bench_dilated_attention_sam.peers(DEVICE, c[3])])
        for c in bench_dilated_attention_sam.global_cases(DEVICE, quick=True)]


@pytest.mark.parametrize("case,peer", _params(_SAM))
def test_dilated_attention_sam(benchmark, case, peer):
    from sam_fast.bench.harness import padded_head_dim_for

    name, B, H, D, grid = case
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(B, grid[0] * grid[1], H, D, device=DEVICE, dtype=_DTYPE, generator=gen) for _ in range(3))
    rh, rw = bench_dilated_attention_sam.rel_tables(B, H, D, grid, DEVICE, _DTYPE, gen)
    fn = dict(bench_dilated_attention_sam.peers(DEVICE, D))[peer]
    call = bench_dilated_attention_sam.no_grad_call(fn, [q, k, v, rh, rw, grid, D ** -0.5])
    with padded_head_dim_for(peer):
        run_benchmark(benchmark, call, "dilated_attention", name, peer)


def _dilated_entries():
    out = []
    for c in bench_dilated_attention.cases(DEVICE, quick=True):
        case, pname, pattern, B, H, D, grid = c
        N = grid[0] * grid[1]
        peers = [name for name, _ in bench_dilated_attention.case_peers(pname, pattern, B, N, H, D, grid, DEVICE,
                                                                        "fwd", False)]
        out.append((c, f"{case}-{pname}".replace(" ", "-"), peers))
    return out


@pytest.mark.parametrize("case,peer", _params(_dilated_entries()))
def test_dilated_attention(benchmark, case, peer):
    from sam_fast.bench.harness import padded_head_dim_for

    name, pname, pattern, B, H, D, grid = case
    N = grid[0] * grid[1]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(B, N, H, D, device=DEVICE, dtype=_DTYPE, generator=gen) for _ in range(3))
    make = dict(bench_dilated_attention.case_peers(pname, pattern, B, N, H, D, grid, DEVICE, "fwd", False))[peer]
    call = bench_dilated_attention.timed(make(), [q, k, v], D ** -0.5, "fwd")
    with padded_head_dim_for(peer):
        run_benchmark(benchmark, call, "dilated_attention", f"{name} {pname}", peer)
