"""Launch configuration (for the tuner): block shapes by heuristic, the head-dim split, the tuned table per GPU
architecture (``kernels/tuned/dilated_attention.json``, written by tools/tune_dilated_attention.py) and the
overrides the tuner and the benchmarks use (:func:`forced_config`, :func:`padded_head_dim`)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
from typing import Optional, Tuple

import torch

from .._arch import device_arch
from .._interpreter import interpreting as _interpreting
from .plan import Group, _pow2


def launch_config(group: Group, padded: bool, has_rel: bool, head_dim: int, backward: bool = False,
                   fp32: bool = False, choice: Optional[dict] = None, rel_rows: bool = True):
    """Block shapes for one group.

    Forward / dQ visit each branch's kept keys in BKY x BKX blocks, BKX a power of two covering the
    kept width when it is small (with the bias, always: one block per key row run, SINGLE_KX); the
    dK/dV kernel's key blocks (KBY x KBX) tile the class lattice of the base segment.
    fp32 inputs (``tl.dot`` in IEEE fp32 runs on FMA units, its tiles held in registers) take blocks
    of 32 keys and 32 queries (16 above head dim 64): at 64 the sm_90 compile spilled up to 20 KB per
    thread to local memory (``tools/aot_compile.py`` reports registers and stack).
    ``choice`` (a tuned entry's config, see :func:`tuned_choice`) overrides the query tile, warps,
    pipeline stages and the head-dim split; the key blocks are structural and stay.
    """
    choice = choice or {}
    kh, kw = group.kept_extent(padded)
    kwp = _pow2(kw)
    block_n = 32 if fp32 else 64
    if has_rel and rel_rows:  # one key block spans the kept width: the 2-D bias relies on it (SINGLE_KX)
        block_n = max(block_n, kwp)
        bkx = kwp
    else:
        bkx = min(kwp, block_n)
    bky = max(1, block_n // bkx)
    _, cw = group.class_extent(padded)
    kbx = min(_pow2(cw), block_n)
    kby = max(1, block_n // kbx)
    block_d, block_dt = head_dim_split(head_dim, choice.get("split", True))
    if fp32:
        block_m = 16 if head_dim > 64 else 32
    else:
        # 128-query forward tiles (each K/V block serves twice the queries) while the columns the
        # kernel computes stay at most 80: D = 64, and ViT-H's 80 once split into 64 + 16 (on sm_90:
        # 185-220 registers, no spills, 56-60 KiB shared, as D = 64); wider ones take 64.
        block_m = 64 if (_interpreting() or backward or block_d + block_dt > 80) else 128
    if backward:
        # fp32 backward: 8 warps. With 4, the sm_90 compile of most cases sat at 255 registers and spilled
        # 260-560 bytes per thread (dK/dV and dQ of the dilated and rel-pos patterns); with 8, one case in
        # fourteen spills (bench/results/aot_compile_sm90.csv).
        num_warps = 8 if fp32 else 4
    else:
        num_warps = 4 if block_m == 64 else 8
    if not _interpreting():  # the interpreter keeps its own (small) query tiles
        block_m = choice.get("BLOCK_M", block_m)
    return dict(BLOCK_M=block_m, BKY=bky, BKX=bkx, KBY=kby, KBX=kbx, BLOCK_D=block_d,
                BLOCK_DT=max(block_dt, 16), TAIL=block_dt > 0, SINGLE_KX=kwp <= bkx,
                num_warps=choice.get("num_warps", num_warps), num_stages=choice.get("num_stages", 1 if backward else 2))


# Forward and backward split a head dim that is not a power of two into two power-of-two column slices
# when that saves tensor-core work (set False to pad to the next power of two instead, e.g. to compare).
SPLIT_HEAD_DIM = True


@contextlib.contextmanager
def padded_head_dim():
    """Within this block the kernels pad the head dim to a power of two instead of splitting it, and
    ignore the tuned table: the configuration before the split (the benchmarks' same-run measure of
    what it buys; results agree to rounding)."""
    global SPLIT_HEAD_DIM
    saved, SPLIT_HEAD_DIM = SPLIT_HEAD_DIM, False
    try:
        yield
    finally:
        SPLIT_HEAD_DIM = saved


def head_dim_split(head_dim: int, split: bool = True) -> Tuple[int, int]:
    """(main, tail) column slices the kernels use for ``head_dim``: tail 0 means one slice padded to a
    power of two. tl.dot needs slices of at least 16, so D = 80 (ViT-H) becomes 64 + 16 (80 columns of
    MMA work instead of 128), D = 96 becomes 64 + 32, D = 40 becomes 32 + 16; D = 112 stays 128
    (64 + 64 saves nothing). ``split=False`` (or :func:`padded_head_dim`) always pads."""
    padded = max(16, _pow2(head_dim))
    if not (split and SPLIT_HEAD_DIM) or head_dim <= 16 or padded == head_dim:
        return padded, 0
    main = padded // 2
    tail = max(16, _pow2(head_dim - main))
    return (main, tail) if main + tail < padded else (padded, 0)


# ---- tuned table: kernels/tuned/dilated_attention.json, written on a GPU by tools/tune_dilated_attention.py ----

_KERNELS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TABLE_PATH = os.path.join(_KERNELS_DIR, "tuned", "dilated_attention.json")
TUNABLE = ("BLOCK_M", "num_warps", "num_stages", "split")
_FORCED: Optional[dict] = None


@functools.lru_cache(maxsize=None)
def tuned_table() -> dict:
    """{arch: [{"key": {...}, "config": {...}}, ...]} from ``tuned/dilated_attention.json`` (checked in per GPU
    architecture; empty until a GPU has tuned it). A config may set only :data:`TUNABLE` fields."""
    if not os.path.exists(_TABLE_PATH):
        return {}
    with open(_TABLE_PATH) as f:
        table = json.load(f).get("configs", {})
    for arch, entries in table.items():
        for e in entries:
            unknown = set(e.get("config", {})) - set(TUNABLE)
            if "key" not in e or "config" not in e or unknown:
                raise ValueError(f"{_TABLE_PATH}: entry for {arch} {e.get('key')} is malformed (needs 'key' and "
                                 f"'config' with fields among {TUNABLE}; unknown {sorted(unknown)})")
    return table


def tune_key(group: Group, padded: bool, has_rel: bool, head_dim: int, dtype: torch.dtype, backward: bool) -> dict:
    """What a tuned entry is keyed by: direction, head dim, 16- or 32-bit inputs, rel-pos, window padding,
    branches in the group, the kept key extent and the class step (the batch and head count are not)."""
    kh, kw = group.kept_extent(padded)
    return {"dir": "bwd" if backward else "fwd", "d": int(head_dim), "bits": 32 if dtype == torch.float32 else 16,
            "rel": bool(has_rel), "pad": bool(padded), "nb": len(group.branches), "kept": [int(kh), int(kw)],
            "step": [int(s) for s in group.step]}


def tuned_choice(key: dict, device: torch.device) -> Optional[dict]:
    """The config forced by :func:`forced_config`, else the tuned entry for this key on this GPU's
    architecture, else None (the heuristics of :func:`launch_config`). :func:`padded_head_dim` skips
    the table."""
    if _FORCED is not None:
        return _FORCED
    if not SPLIT_HEAD_DIM or device.type != "cuda":
        return None
    for e in tuned_table().get(device_arch(device), []):
        if e["key"] == key:
            return e["config"]
    return None


@contextlib.contextmanager
def forced_config(config: dict):
    """Within this block every launch uses ``config`` (TUNABLE fields): how the tuner times candidates."""
    global _FORCED
    unknown = set(config) - set(TUNABLE)
    if unknown:
        raise ValueError(f"forced_config: unknown fields {sorted(unknown)}; tunable: {TUNABLE}")
    saved, _FORCED = _FORCED, dict(config)
    try:
        yield
    finally:
        _FORCED = saved


def config_for(group: Group, padded: bool, has_rel: bool, q: torch.Tensor, backward: bool,
                rel_rows: bool = True) -> dict:
    fp32 = q.dtype == torch.float32 and not _interpreting()
    choice = tuned_choice(tune_key(group, padded, has_rel, q.shape[-1], q.dtype, backward), q.device)
    cfg = launch_config(group, padded, has_rel, q.shape[-1], backward=backward, fp32=fp32, choice=choice,
                         rel_rows=rel_rows)
    cfg["REL_ROWS"] = rel_rows
    return cfg
