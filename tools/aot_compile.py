"""Compile every Triton kernel of sam_fast for a GPU ahead of time, on a machine without one.

Triton's compiler and the ``ptxas`` its wheel ships turn a launch into a cubin for any NVIDIA
architecture without a device. This script drives sam_fast's public ops (``backend="triton"``) with
SAM's real shapes and dtypes on CPU tensors while an offline driver reports the target GPU; each
kernel launch compiles exactly the specialization a GPU run would (block sizes, constexprs,
divisibility of strides and sizes) and launches nothing, so outputs are garbage and only the
compilation is checked:

* lowering errors the interpreter cannot see (an op or layout the backend lacks, ``tl.dot`` operand
  types, reshapes, scalar ``tl.where``), ptxas failures;
* shared memory per block against the architecture's limit (227 KiB on sm_90, 163 KiB on sm_80).

It also reads each cubin's registers per thread and stack frame (``cuobjdump``; a stack frame at 255
registers means spills) and which tensor-core instruction its PTX uses (``wgmma`` on Hopper, else
``mma.sync``), for tuning before a GPU is at hand. What it cannot check: numerics, speed, or
Triton versions other than the one imported (the H100 machine has Triton 3.6; put one beside the
installed one with ``pip install --target DIR triton==3.6.0`` and ``PYTHONPATH=DIR``). ``pytest -m gpu``
on a GPU remains the verification.

    python -m tools.aot_compile [--arch 90] [--quick] [--out DIR]

Prints one row per distinct compiled kernel configuration (kernel, shared bytes, warps, stages,
registers, stack bytes, first case), writes ``DIR/aot_compile_sm<arch>.csv`` with provenance (one row
per kernel configuration and case), and exits 1 when any case fails to compile.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

from sam_fast.kernels._interpreter import compile_for_gpu  # noqa: E402

compile_for_gpu()  # compile for the GPU, not the interpreter: before any kernel module loads

import torch  # noqa: E402

# Largest dynamic shared memory per block (bytes), by compute capability.
SHARED_LIMIT = {90: 232448, 89: 101376, 86: 101376, 80: 166912}


class OfflineDriver:
    """The part of a Triton driver that compiling needs: a device, a stream and the target."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


_USAGE = {}


def resource_usage(kernel):
    """(registers per thread, stack frame bytes, tensor-core instruction) of a compiled kernel: registers
    and stack from the cubin through the cuobjdump that Triton's wheel ships (a stack frame at 255
    registers means spills; None without the tool), and whether its PTX issues Hopper's ``wgmma``,
    the older ``mma.sync`` or no MMA at all."""
    import re
    import subprocess
    import tempfile

    import triton

    key = id(kernel)
    if key not in _USAGE:
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        regs = stack = None
        if os.path.exists(tool) and "cubin" in kernel.asm:
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(kernel.asm["cubin"])
                f.flush()
                out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
            m = re.search(r"REG:(\d+) STACK:(\d+)", out)
            if m:
                regs, stack = int(m.group(1)), int(m.group(2))
        ptx = kernel.asm.get("ptx", "")
        mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "-"
        _USAGE[key] = (regs, stack, mma)
    return _USAGE[key]


class CompileRecorder:
    """Makes every Triton launch a compile-only warmup and records what was compiled."""

    def __init__(self, progress: bool = False):
        self.rows = []
        self.case = ""
        self.progress = progress

    def __enter__(self):
        from triton.runtime.jit import JITFunction

        self._orig = orig = JITFunction.run
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            kernel = orig(fn, *args, grid=grid, warmup=True, **kwargs)
            md = kernel.metadata
            regs, stack, mma = resource_usage(kernel)
            recorder.rows.append(dict(kernel=fn.fn.__name__, case=recorder.case, shared=int(md.shared),
                                      num_warps=int(md.num_warps), num_stages=int(md.num_stages),
                                      regs=regs, stack=stack, mma=mma,
                                      fp_fusion_stated="enable_fp_fusion" in kwargs))
            recorder.bar.set_postfix_str(recorder.case, refresh=False)
            recorder.bar.update(1)
            return kernel

        JITFunction.run = run
        from tqdm.auto import tqdm

        self.bar = tqdm(desc="compiling", unit="launch", disable=not self.progress, leave=False)
        return self

    def __exit__(self, *exc):
        from triton.runtime.jit import JITFunction

        JITFunction.run = self._orig
        self.bar.close()


def _attention_cases(quick: bool):
    from sam_fast import Branch

    # (name, B, grid, H, D, pattern, rel, pad): SAM ViT-B/H global and window blocks, SlimSAM head dims,
    # the dilated benchmark's patterns, rel-pos under dilation, a non-square grid.
    cases = [
        ("vit_b global", 1, (64, 64), 12, 64, None, True, False),
        ("vit_h window", 1, (64, 64), 16, 80, Branch((14, 14)), True, True),
        ("vit_h global", 1, (64, 64), 16, 80, None, True, False),
        ("slimsam_77 global", 1, (64, 64), 12, 14, None, True, False),
        ("slimsam_50 window", 1, (64, 64), 12, 32, Branch((14, 14)), True, True),
        ("2-D (32,32) r=2", 8, (64, 64), 16, 64, Branch((32, 32), 2), False, False),
        ("LongNet mix", 1, (64, 64), 16, 64, [Branch(1024, 1), Branch(2048, 2), Branch(4096, 4)], False, False),
        ("rel-pos, two 2-D branches", 1, (64, 64), 12, 64, [Branch((14, 14)), Branch((32, 32), 2)], True, False),
        ("rel-pos, LongNet mix on SAM's grid", 1, (64, 64), 16, 64,
         [Branch(1024, 1), Branch(2048, 2), Branch(4096, 4)], True, False),
        ("non-nested, odd grid", 1, (33, 47), 5, 32, [Branch((16, 16), 2), Branch((33, 47), 4)], False, False),
        ("D=128", 1, (32, 32), 4, 128, None, False, False),
    ]
    return cases[:3] if quick else cases


def compile_attention(rec, quick, dtypes):
    import sam_fast

    for name, B, grid, H, D, pattern, rel, pad in _attention_cases(quick):
        for dtype in dtypes:
            rec.case = f"dilated_attention {name} {str(dtype)[6:]}"
            N = grid[0] * grid[1]
            q, k, v = (torch.empty(B, N, H, D, dtype=dtype).requires_grad_() for _ in range(3))
            kw = {}
            if rel:
                side = 2 * max(grid) - 1
                kw = dict(rel_pos_h=torch.zeros(side, D, dtype=dtype, requires_grad=True),
                          rel_pos_w=torch.zeros(side, D, dtype=dtype, requires_grad=True))
            if pad:
                kw["pad_kv"] = (torch.zeros(H, D, dtype=dtype), torch.zeros(H, D, dtype=dtype))
            out, lse = sam_fast.dilated_attention(q, k, v, pattern, grid=grid, return_lse=True, backend="triton", **kw)
            torch.autograd.backward((out, lse), (torch.zeros_like(out), torch.zeros_like(lse)))


def compile_int8(rec, quick, dtypes):
    import sam_fast

    shapes = [(768, 2304), (3072, 768)] if quick else [(768, 2304), (768, 768), (768, 3072), (3072, 768),
                                                        (1280, 3840), (1280, 5120), (5120, 1280), (40, 50)]
    ms = [1, 4096] if quick else [1, 4096, 4097, 32768]
    for dtype in dtypes:
        for K, N in shapes:
            w = torch.zeros(N, K, dtype=torch.int8)
            ws = torch.ones(N)
            bias = torch.zeros(N, dtype=dtype)
            for M in ms:
                rec.case = f"int8 M={M} K={K} N={N} {str(dtype)[6:]}"
                x = torch.zeros(M, K, dtype=dtype)
                sam_fast.quantize_per_token(x, backend="triton")
                sam_fast.layer_norm_quantize(x, torch.ones(K, dtype=dtype), torch.zeros(K, dtype=dtype), 1e-6,
                                             backend="triton")
                sam_fast.int8_linear(x, w, ws, bias, activation="gelu", backend="triton")
                sam_fast.int8_linear(x, w, ws, bias, act_scale=0.05, out_dtype=torch.int8, out_scale=0.1,
                                     backend="triton")
                xq = torch.zeros(M, K, dtype=torch.int8)
                sam_fast.int8_linear(xq, w, ws, bias, act_scale=torch.ones(M), out_dtype=dtype, backend="triton")


def compile_decoder(rec, quick, dtypes):
    from sam_fast.ops.small_key_attention import small_key_attention
    from sam_fast.ops.upscale_mask_product import upscale_mask_product

    for dtype in dtypes:
        for P, M in ((1, 1), (256, 3)) if not quick else ((256, 3),):
            rec.case = f"upscale_mask_product P={P} M={M} {str(dtype)[6:]}"
            upscale_mask_product(torch.zeros(P, 64, 128, 128, dtype=dtype), torch.zeros(64, 32, 2, 2, dtype=dtype),
                                 torch.zeros(32, dtype=dtype), torch.zeros(P, M, 32, dtype=dtype), backend="triton")
        rec.case = f"upscale_mask_product SAM 2 skip P=64 M=3 {str(dtype)[6:]}"
        upscale_mask_product(torch.zeros(64, 64, 128, 128, dtype=dtype), torch.zeros(64, 32, 2, 2, dtype=dtype),
                             torch.zeros(32, dtype=dtype), torch.zeros(64, 3, 32, dtype=dtype),
                             torch.zeros(2, 32, 256, 256, dtype=dtype), torch.zeros(64, dtype=torch.int64),
                             backend="triton")
        for P, T in ((300, 7), (1, 5)):
            rec.case = f"small_key_attention P={P} T={T} {str(dtype)[6:]}"
            q = torch.zeros(3, 4096, 128, dtype=dtype)
            kv = torch.zeros(P, T, 128, dtype=dtype)
            small_key_attention(q, torch.arange(P) * 3 // P, kv, kv, 8, backend="triton")


def compile_hiera(rec, quick, dtypes):
    """SAM 2's Hiera attention at 1024 px: every window geometry of the released trunks (windows 8 / 4 / 14 / 7, 16 at
    Hiera-L's third stage, the stage changes pooling queries, the global blocks) and their head dims."""
    from sam_fast.ops.hiera_attention import hiera_attention

    cases = [("hiera_t stage 1", 256, 1, 96, 8, 1), ("hiera_t stage 2 pooling", 256, 2, 96, 8, 2),
             ("hiera_t stage 2", 128, 2, 96, 4, 1), ("hiera_t stage 3 pooling", 128, 4, 96, 4, 2),
             ("hiera_t stage 3", 64, 4, 96, 14, 1), ("hiera_t global", 64, 4, 96, 0, 1),
             ("hiera_t stage 4 pooling", 64, 8, 96, 14, 2), ("hiera_t stage 4", 32, 8, 96, 7, 1),
             ("hiera_b+ stage 1", 256, 2, 56, 8, 1), ("hiera_l stage 3", 64, 8, 72, 16, 1),
             ("hiera_l global", 64, 8, 72, 0, 1)]
    for name, grid, heads, D, window, stride in cases[:3] if quick else cases:
        for dtype in dtypes:
            rec.case = f"hiera_attention {name} {str(dtype)[6:]}"
            qkv = torch.zeros(1, grid, grid, 3 * heads * D, dtype=dtype)
            pad = (torch.zeros(heads, D, dtype=dtype), torch.zeros(heads, D, dtype=dtype))
            hiera_attention(qkv, heads, window, stride, pad, None, torch.zeros(3 * heads * D, dtype=dtype),
                            backend="triton")


def compile_tune_candidates(rec, quick, dtypes):
    """Every candidate ``tools/tune_dilated_attention.py`` would time on a GPU, for its cases in bf16: which fit the
    architecture's shared memory, and their registers and spills (cases named ``tune <case> <dir> <config>``)."""
    import sam_fast
    from sam_fast.kernels.dilated_attention import forced_config
    from tools import tune_dilated_attention as T

    gen = torch.Generator().manual_seed(0)
    for case in T.CASES[:4] if quick else T.CASES:
        args, kw = T.make_inputs(case, 1, torch.bfloat16, torch.device("cpu"), gen)
        rec.case = f"tune {case[0]} forward of the backward candidates (default configuration)"
        out = sam_fast.dilated_attention(*args, backend="triton", **kw)
        for backward in (False, True):
            for cfg in T.candidates(case[3], backward):
                rec.case = f"tune {case[0]} {'bwd' if backward else 'fwd'} " + \
                    " ".join(f"{k}={v}" for k, v in cfg.items())
                with forced_config(cfg):
                    if backward:
                        torch.autograd.grad(out, args[:3], torch.zeros_like(out), retain_graph=True)
                    else:
                        with torch.no_grad():
                            sam_fast.dilated_attention(*args, backend="triton", **kw)


def compile_int8_tune_candidates(rec, quick, dtypes):
    """Every block configuration ``tools/tune_int8_linear.py`` would time, on the ViT-H MLP shapes at M = 4096
    (the timed call: bf16 out, bias, per-token scales; cases named ``tune int8 <K>-><N> <config>``)."""
    from sam_fast.kernels.int8_linear import int8_gemm
    from tools import tune_int8_linear as T8

    shapes = [(1280, 5120)] if quick else [(1280, 5120), (5120, 1280)]
    for k, n in shapes:
        a, w = torch.zeros(4096, k, dtype=torch.int8), torch.zeros(n, k, dtype=torch.int8)
        sa, sw, bias = torch.ones(4096), torch.ones(n), torch.zeros(n, dtype=torch.bfloat16)
        for cfg in T8.candidates():
            rec.case = f"tune int8 {k}->{n} " + " ".join(f"{key}={v}" for key, v in cfg.items())
            int8_gemm(a, sa, w, sw, bias, None, torch.bfloat16, None, cfg)


def run(arch: int = 90, quick: bool = False, progress: bool = False, tune_candidates: bool = False):
    import triton

    from sam_fast import _dispatch

    triton.runtime.driver.set_active(OfflineDriver(arch))
    _dispatch.triton_device_refusal = lambda t, explicit: None  # CPU tensors stand in for the GPU's
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32]
    failures = []
    parts = (compile_tune_candidates, compile_int8_tune_candidates) if tune_candidates else \
        (compile_attention, compile_int8, compile_decoder, compile_hiera)
    with CompileRecorder(progress) as rec:
        for part in parts:
            try:
                part(rec, quick, dtypes)
            except Exception as exc:  # keep going: report every part that fails
                failures.append((rec.case, f"{type(exc).__name__}: {exc}"))
                traceback.print_exc()
    limit = SHARED_LIMIT.get(arch)
    for r in rec.rows:
        if not r["fp_fusion_stated"]:  # its arithmetic would change with the Triton version (kernels/_arch.py)
            failures.append((r["case"], f"{r['kernel']} is launched without COMPILE_OPTIONS (enable_fp_fusion)"))
        if limit is not None and r["shared"] > limit:
            failures.append((r["case"], f"{r['kernel']} needs {r['shared']} B of shared memory, sm_{arch} has {limit}"))
    return rec.rows, failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100, 80: A100)")
    parser.add_argument("--quick", action="store_true", help="bf16 and a few shapes only")
    parser.add_argument("--out", default=None, help="write aot_compile_sm<arch>.csv here")
    parser.add_argument("--tune-candidates", action="store_true",
                        help="compile the candidates of tools/tune_dilated_attention.py and tools/tune_int8_linear.py "
                             "instead (aot_tune_candidates_sm<arch>.csv); "
                             "a candidate over the shared-memory limit is reported, not a failure")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    rows, failures = run(args.arch, args.quick, progress=sys.stderr.isatty(), tune_candidates=args.tune_candidates)
    if args.tune_candidates:
        too_big = [f for f in failures if "shared memory" in f[1]]
        failures = [f for f in failures if f not in too_big]
        for case, why in too_big:
            print(f"does not fit: {case}: {why}")
    seen = {}
    for r in rows:  # one line per distinct compiled specialization
        key = (r["kernel"], r["shared"], r["num_warps"], r["num_stages"], r["regs"], r["stack"], r["mma"])
        seen.setdefault(key, r)
    print(f"{'kernel':<36} {'shared B':>9} {'warps':>5} {'stages':>6} {'regs':>5} {'stack B':>7} {'mma':>8}  "
          "first case")
    for (kernel, shared, warps, stages, regs, stack, mma), r in sorted(seen.items(), key=lambda kv: str(kv[0])):
        print(f"{kernel:<36} {shared:>9} {warps:>5} {stages:>6} {str(regs):>5} {str(stack):>7} {mma:>8}  "
              f"{r['case']}")
    print(f"{len(rows)} launches compiled for sm_{args.arch} ({len(seen)} distinct kernels/configs) in "
          f"{time.perf_counter() - t0:.0f} s")
    if args.out:
        from sam_fast.bench.harness import append_csv, provenance

        # a kernel launched several times in one case with one config: one row
        per_case = dict.fromkeys((r["kernel"], r["case"], r["shared"], r["num_warps"], r["num_stages"], r["regs"],
                                  r["stack"], r["mma"]) for r in rows)
        prov = provenance(torch.device("cpu"))
        name = "aot_tune_candidates" if args.tune_candidates else "aot_compile"
        append_csv(os.path.join(args.out, f"{name}_sm{args.arch}.csv"),
                   [dict(prov, op=kernel, case=case, backend="triton", mode="compile", metric="shared_bytes",
                         value=shared, num_warps=warps, num_stages=stages, regs=regs, stack_bytes=stack, mma=mma,
                         note=f"compiled for sm_{args.arch}")
                    for kernel, case, shared, warps, stages, regs, stack, mma in per_case],
                   extra_columns=["num_warps", "num_stages", "regs", "stack_bytes", "mma"])
    for case, why in failures:
        print(f"FAILED {case}: {why}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
