"""Benchmark: SAM encoder blocks on the CPU - sam_fast vs segment_anything, SDPA-with-mask and its compile.

Whole ViT blocks (norm, qkv, attention with the decomposed rel-pos bias, proj, MLP) at B=1 on the 64 x 64
token grid of a 1024 px image: SlimSAM-77 (C 168, 12 heads of dim 14, MLP 696) and ViT-B (C 768, 12 heads
of 64, MLP 3072), each as a window-14 block (SAM pads the grid to 70 x 70) and a global block; plus the small
window block of ``sam-fast bench``'s tiny encoder (C 128, 4 heads, window 7, 16 x 16 grid).

Peers in the same run, all in the block's dtype:

* ``segment_anything`` - the block as segment_anything runs it (the baseline);
* ``sdpa_mask`` - segment_anything's block with its attention rewritten the way a user would in ten lines:
  the rel-pos bias materialised as ``attn_mask`` of ``F.scaled_dot_product_attention``;
* ``sdpa_mask_compiled`` - ``torch.compile`` of that block (skipped with ``--quick``: compiling takes
  tens of seconds per case on a small CPU);
* ``sam_fast(cpu)`` - the block patched by sam_fast (``SamFastBlock``, backend ``auto``).

fp32 always; bf16 where the CPU has bf16 matmul instructions (AVX512-BF16 or AMX). Each thread count
(1 and all cores) is timed with the peers interleaved: one call of each per round, the median of the
rounds (7, or as many as fill about 2 s per peer for a block of a few milliseconds, up to 300; with --quick 3, or
0.15 s per peer), so a slow
spell of a shared machine hits every peer alike. ``max_err`` is the largest absolute
difference from segment_anything's block run in float64.

    python bench/bench_cpu_blocks.py [--out bench/results] [--quick] [--no-compile] [--blocks global,small]
"""

from __future__ import annotations

import copy
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from sam_fast.bench.harness import bench_main, progress, provenance, save_results

SCRIPT = "bench_cpu_blocks"
BASELINE = "segment_anything"

# (name, dim, heads, mlp hidden, window (0: global), grid)
BLOCKS = (
    ("small window 7", 128, 4, 512, 7, 16),
    ("slimsam77 window 14", 168, 12, 696, 14, 64),
    ("slimsam77 global", 168, 12, 696, 0, 64),
    ("vit_b window 14", 768, 12, 3072, 14, 64),
    ("vit_b global", 768, 12, 3072, 0, 64),
)


def make_block(dim, heads, hidden, window, grid, seed=0):
    """A segment_anything ``Block`` with random weights and rel-pos tables (the trained tables are far
    from zero; zeros would hide the bias path)."""
    from segment_anything.modeling.image_encoder import Block

    torch.manual_seed(seed)
    blk = Block(dim, heads, mlp_ratio=hidden / dim, qkv_bias=True, use_rel_pos=True, window_size=window,
                input_size=(grid, grid))
    with torch.no_grad():
        blk.attn.rel_pos_h.normal_(std=0.2)
        blk.attn.rel_pos_w.normal_(std=0.2)
    return blk.eval()


def _sdpa_attention_forward(self, x):
    """segment_anything ``Attention.forward`` with the decomposed rel-pos bias handed to SDPA as its mask."""
    from segment_anything.modeling.image_encoder import get_rel_pos

    B, H, W, _ = x.shape
    qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, heads, HW, D)
    D = q.shape[-1]
    Rh, Rw = get_rel_pos(H, H, self.rel_pos_h), get_rel_pos(W, W, self.rel_pos_w)
    r_q = q.reshape(B * self.num_heads, H, W, D)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw)
    mask = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(B, self.num_heads, H * W, H * W)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return self.proj(out.transpose(1, 2).reshape(B, H, W, -1))


def sdpa_block(block):
    """A copy of ``block`` whose attention is :func:`_sdpa_attention_forward`."""
    import types

    peer = copy.deepcopy(block)
    peer.attn.forward = types.MethodType(_sdpa_attention_forward, peer.attn)
    return peer


def fast_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions (AVX512-BF16 or AMX tiles)."""
    cpu = getattr(torch, "cpu", None)
    return bool(cpu is not None and (getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                                     or getattr(cpu, "_is_amx_tile_supported", lambda: False)()))


def interleaved(fns, rounds, warmup: bool = True):
    """{name: [ms, ...]}: ``rounds`` rounds, each calling every fn once (after one warm-up call each, unless the
    caller has run them already: ``warmup=False``)."""
    for fn in fns.values() if warmup else ():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def _stats(ms):
    ms = sorted(ms)
    q = statistics.quantiles(ms, n=5) if len(ms) > 1 else [ms[0]] * 4
    return {"median_ms": statistics.median(ms), "p20_ms": q[0], "p80_ms": q[3], "peak_mem_mb": float("nan")}


def peers(block, dtype, compile_peer):
    """{name: module} for one block in ``dtype``."""
    from sam_fast.nn.attention import SamFastBlock

    base = copy.deepcopy(block).to(dtype)
    out = {BASELINE: base, "sdpa_mask": sdpa_block(base)}
    if compile_peer:
        out["sdpa_mask_compiled"] = torch.compile(sdpa_block(base), dynamic=False)
    out["sam_fast(cpu)"] = SamFastBlock(copy.deepcopy(base))
    return out


def run(out_dir: str, quick: bool = False, device: str = None, no_compile: bool = False, blocks: str = ""):
    if device not in (None, "cpu"):
        raise ValueError(f"device: this benchmark times the CPU path, got {device!r}")
    prov = provenance(torch.device("cpu"))
    all_threads = torch.get_num_threads()
    threads = sorted({1, all_threads})
    dtypes = [torch.float32] + ([torch.bfloat16] if fast_bf16() else [])
    chosen = [b for b in BLOCKS if not blocks or any(w.strip() and w.strip() in b[0] for w in blocks.split(","))]
    if not chosen:
        raise ValueError(f"--blocks {blocks!r} matches none of {[b[0] for b in BLOCKS]}")
    blocks = chosen[:2] if quick else chosen
    rounds = 3 if quick else 7
    rows = []
    cases = [(b, dt) for b in blocks for dt in dtypes]
    for (name, dim, heads, hidden, window, grid), dtype in progress(cases, "cpu blocks",
                                                                     lambda c: f"{c[0][0]} {c[1]}"):
        block = make_block(dim, heads, hidden, window, grid)
        x = torch.randn(1, grid, grid, dim)
        with torch.no_grad():
            ref = block.double()(x.double())
            block.float()
        mods = peers(block, dtype, compile_peer=not (quick or no_compile))
        xd = x.to(dtype)
        fns = {}
        errs = {}
        for peer, mod in mods.items():
            def call(mod=mod):
                with torch.no_grad():
                    return mod(xd)
            try:
                errs[peer] = float((call().double() - ref).abs().max())
                fns[peer] = call
            except Exception as exc:  # a peer that cannot run this case (e.g. a compile failure) says so
                rows.append(dict(prov, op="cpu_block", case=f"{name} {str(dtype)[6:]}", backend=peer, mode="fwd",
                                 median_ms="", metric="blocks_per_s", value="",
                                 note=f"failed: {type(exc).__name__}: {str(exc)[:120]}"))
        # at least ``rounds`` rounds, more for a block of a few milliseconds (about 2 s of calls per peer, 0.15 s
        # with --quick)
        t0 = time.perf_counter()
        next(iter(fns.values()))()
        n_rounds = max(rounds, min(300, int((0.15 if quick else 2.0) / max(time.perf_counter() - t0, 1e-6))))
        for t in threads:
            torch.set_num_threads(t)
            try:
                times = interleaved(fns, n_rounds)
            finally:
                torch.set_num_threads(all_threads)
            for peer, ms in times.items():
                st = _stats(ms)
                rows.append(dict(prov, op="cpu_block", case=f"{name} {str(dtype)[6:]} t{t}", backend=peer,
                                 mode="fwd", metric="blocks_per_s", value=1e3 / st["median_ms"],
                                 max_err=errs[peer], note=f"{t} thread(s), {n_rounds} interleaved rounds", **st))
    return save_results(out_dir, SCRIPT, rows, BASELINE, "SAM blocks on the CPU (B=1, fp32/bf16)")


def main(argv=None):
    return bench_main(__doc__, run, BASELINE, argv, options=(
        ("--no-compile", "store_true", "leave out the torch.compile peer (it takes tens of seconds per case)"),
        ("--blocks", "store", "comma-separated parts of block names to run, e.g. 'global' or 'vit_b'")))


if __name__ == "__main__":
    sys.exit(main())
