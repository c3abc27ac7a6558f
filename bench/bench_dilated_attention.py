"""Benchmark: dilated flash attention (one kernel, branches merged inside) vs its peers.

GPU cases (bf16): SAM's 64 x 64 token grid (N = 4096), H = 16, D = 64 and 80, batch 1 and 8, with
the patterns 2-D segment (32, 32) r=2, 2-D (64, 64) r=4, the LongNet mix {(1024,1), (2048,2),
(4096,4)} and the dense pattern; and N = 16384 (a 2048^2 image, 128 x 128 grid). Forward and
forward+backward.

Peers in the same run:
* ``gather_sdpa_scatter`` - the torchscale / dilated-attention-pytorch method: gather every head
  group's kept rows per segment, SDPA (flash backend) on the dense pieces, scatter back, and merge
  branches with the lse's SDPA returns (whose gradient, as in torchscale, is not propagated);
* ``flex_attention`` - FlexAttention with the dilation as a ``mask_mod`` on the original layout
  (block mask built once, outside the timing); several branches merged with its returned lse;
* ``sam_fast_dense`` - the dense fused kernel (pattern None) at the same N, for scale;
* ``dense_v1@<sha>`` - for the dense pattern: the project's first dense kernel, loaded from git history
  (or from $SAM_FAST_DENSE_V1_KERNEL where there is no .git), so "no regression from generality" is measured
  in the same run.

Metrics per row: median time; achieved TFLOP/s over kept (query, key) pairs only (4 * D per pair,
x3.5 for forward+backward); achieved GB/s counting Q, K, V read once and O written once, and that as
a fraction of this GPU's copy bandwidth measured in the same run; ``roofline_frac`` = roofline time
max(bytes / copy bandwidth, FLOPs / measured bf16 matmul FLOP/s) over the measured time.

On a CPU-only machine: small shapes, the CPU backend and the gather peer timed, the Triton kernel
checked for correctness under the interpreter (not timed).

    python bench/bench_dilated_attention.py [--out bench/results] [--quick | --targets]
"""

from __future__ import annotations

import importlib.util
import os
import sys

from sam_fast.kernels._interpreter import use_interpreter_without_gpu

if __name__ == "__main__":
    use_interpreter_without_gpu()  # before triton decorates sam_fast's kernels

import torch
import torch.nn.functional as F

from sam_fast.bench.harness import (
    PADDED_D,
    LiveRows,
    bench_main,
    measure,
    padded_head_dim_for,
    progress,
    provenance,
    raise_recompile_limit,
    save_results,
)

SCRIPT = "bench_dilated_attention"
BASELINE = "gather_sdpa_scatter"
EXTRA_COLUMNS = ["pattern", "kept_pairs", "gbps", "bw_frac", "roofline_frac"]
DENSE_V1_SHA = "26dab31"  # last commit of the project's first dense kernel


def _patterns():
    from sam_fast import Branch

    return {
        "2d(32,32)r2": [Branch((32, 32), 2)],
        "2d(64,64)r4": [Branch((64, 64), 4)],
        "longnet{1024:1,2048:2,4096:4}": [Branch(1024, 1), Branch(2048, 2), Branch(4096, 4)],
        "dense": [Branch((64, 64), 1)],
    }


def _resolved(pattern, N, grid):
    from sam_fast.pattern import resolve_pattern

    return resolve_pattern(pattern, N, grid)


def _head_groups(br, H):
    groups = {}
    for h in range(H):
        groups.setdefault(br.offsets(h), []).append(h)
    return groups


def _gather_index(br, oy, ox):
    """(n_seg, kept) token indices of one offset group of one branch (segments must keep equally many)."""
    from sam_fast.reference.dilated_attention import _segment_tokens

    rows = []
    nsy, nsx = br.n_seg
    for sy in range(nsy):
        for sx in range(nsx):
            ys, xs, _ = _segment_tokens(br, sy, sx, oy, ox, padded=False)
            rows.append(ys * br.cols + xs)
    sizes = {len(r) for r in rows}
    if len(sizes) != 1:
        raise ValueError("the gather peer needs segments that keep equally many positions")
    return torch.stack(rows)


def kept_pairs(pattern, B, N, H, grid) -> int:
    """Attended (query, key) pairs of the pattern, summed over branches, heads and batch."""
    from sam_fast.reference.dilated_attention import _segment_tokens

    total = 0
    for br in _resolved(pattern, N, grid):
        for (oy, ox), heads in _head_groups(br, H).items():
            nsy, nsx = br.n_seg
            for sy in range(nsy):
                for sx in range(nsx):
                    n = len(_segment_tokens(br, sy, sx, oy, ox, padded=False)[0])
                    total += n * n * len(heads)
    return total * B


def _sdpa_flash(q, k, v, scale):
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _flash_with_lse(q, k, v, scale):
    """SDPA's flash kernel, returning (out, lse (B, H, L) fp32) for the branch merge."""
    if q.is_cuda:
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[:2]
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)[:2]


class GatherSdpaScatter:
    """The gather -> dense flash -> scatter method (torchscale), indices precomputed once."""

    def __init__(self, pattern, B, N, H, grid, device):
        self.plan = []
        for br in _resolved(pattern, N, grid):
            groups = []
            for (oy, ox), heads in _head_groups(br, H).items():
                groups.append((torch.tensor(heads, device=device), _gather_index(br, oy, ox).to(device)))
            self.plan.append(groups)

    def __call__(self, q, k, v, scale):
        B, N, H, D = q.shape
        outs, lses = [], []
        for groups in self.plan:
            out = q.new_zeros(B, N, H, D)
            lse = q.new_full((B, H, N), float("-inf"), dtype=torch.float32)
            for heads, idx in groups:
                nseg, kept = idx.shape
                flat = idx.reshape(-1)
                pieces = [t[:, flat][:, :, heads].reshape(B, nseg, kept, len(heads), D).transpose(2, 3)
                          .reshape(B * nseg, len(heads), kept, D) for t in (q, k, v)]
                if len(self.plan) == 1:
                    o = _sdpa_flash(*pieces, scale=scale)
                else:
                    o, l_piece = _flash_with_lse(*pieces, scale)
                    l_piece = l_piece.reshape(B, nseg, len(heads), kept).permute(0, 2, 1, 3).reshape(B, len(heads), -1)
                    lse[:, heads[:, None], flat[None, :]] = l_piece
                o = o.reshape(B, nseg, len(heads), kept, D).transpose(2, 3).reshape(B, nseg * kept, len(heads), D)
                out[:, flat[:, None], heads[None, :]] = o
            outs.append(out)
            lses.append(lse)
        if len(outs) == 1:
            return outs[0]
        w = torch.softmax(torch.stack(lses), dim=0).nan_to_num(0.0)  # (nb, B, H, N)
        return sum(wi.transpose(1, 2)[..., None].to(o.dtype) * o for wi, o in zip(w, outs))


class FlexMasked:
    """FlexAttention with each branch's dilation as a mask_mod on the original layout."""

    def __init__(self, pattern, B, N, H, grid, device):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        self.flex = torch.compile(flex_attention, dynamic=False)
        self.masks = []
        for br in _resolved(pattern, N, grid):
            (sh, sw), (dh, dw), cols = br.seg, br.dil, br.cols

            def mask_mod(b, h, q_idx, kv_idx, sh=sh, sw=sw, dh=dh, dw=dw, cols=cols):
                qy, qx, ky, kx = q_idx // cols, q_idx % cols, kv_idx // cols, kv_idx % cols
                oy, ox = (h // dw) % dh, h % dw
                same = (qy // sh == ky // sh) & (qx // sw == kx // sw)
                q_kept = ((qy % sh) % dh == oy) & ((qx % sw) % dw == ox)
                k_kept = ((ky % sh) % dh == oy) & ((kx % sw) % dw == ox)
                return same & q_kept & k_kept

            self.masks.append(create_block_mask(mask_mod, B=None, H=H, Q_LEN=N, KV_LEN=N, device=device))

    def __call__(self, q, k, v, scale):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        if len(self.masks) == 1:
            return self.flex(qt, kt, vt, block_mask=self.masks[0], scale=scale).transpose(1, 2)
        outs, lses = zip(*(self.flex(qt, kt, vt, block_mask=m, scale=scale, return_lse=True) for m in self.masks))
        w = torch.softmax(torch.stack(lses).float(), dim=0).nan_to_num(0.0)  # (nb, B, H, N)
        return sum(wi[..., None].to(o.dtype) * o for wi, o in zip(w, outs)).transpose(1, 2)


def _dense_v1_kernel():
    """The project's first dense kernel as a module, from the checkout's maintainer tooling (tools/dense_v1.py: it
    reads the kernel from git history); None, with the reason on stderr, where that is not at hand (an installed
    package has no tools/)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "dense_v1.py")
    if not os.path.isfile(path):
        print("bench_dilated_attention: no dense_v1 row - the first dense kernel is loaded by tools/dense_v1.py, "
              "which only a checkout of the repository has", file=sys.stderr)
        return None
    spec = importlib.util.spec_from_file_location("sam_fast_dense_v1_loader", path)
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    return loader.dense_v1_kernel(DENSE_V1_SHA)


def _sam_fast(pattern, grid, backend):
    import sam_fast

    def run(q, k, v, scale):
        return sam_fast.dilated_attention(q, k, v, pattern, grid=grid, softmax_scale=scale, backend=backend)

    return run


def _peers(pattern_name, pattern, B, N, H, D, grid, device, mode="fwd"):
    """The backends of one case, FlexAttention (slowest to compile) last."""
    peers = [(BASELINE, lambda: GatherSdpaScatter(pattern, B, N, H, grid, device))]
    if device.type == "cuda":
        from sam_fast.kernels.dilated_attention import head_dim_split

        peers.append(("sam_fast(triton)", lambda: _sam_fast(pattern, grid, "triton")))
        if head_dim_split(D)[1]:
            peers.append((PADDED_D, lambda: _sam_fast(pattern, grid, "triton")))
        if pattern_name == "dense":
            mod = _dense_v1_kernel()
            if mod is not None:
                geom = mod.Geometry(grid[0], grid[1], grid[0], grid[1], 1, 1)

                def dense_v1(q, k, v, scale, mod=mod, geom=geom):
                    return mod.dilated_attention_fwd(q, k, v, geom, None, None, None, None, scale)[0]

                peers.append((f"dense_v1@{DENSE_V1_SHA}", lambda f=dense_v1: f))
        else:
            peers.append(("sam_fast_dense", lambda: _sam_fast(None, grid, "triton")))
        peers.append(("flex_attention(mask_mod)", lambda: FlexMasked(pattern, B, N, H, grid, device)))
    else:
        peers.append(("sam_fast(cpu)", lambda: _sam_fast(pattern, grid, "cpu")))
    return peers


def machine_rooflines(device):
    """Copy bandwidth (bytes/s, read + write of a 1 GiB buffer) and bf16 matmul FLOP/s, measured now."""
    x = torch.empty(2**29, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    t = measure(lambda: y.copy_(x), device)["median_ms"] * 1e-3
    bw = 2 * x.numel() * x.element_size() / t
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    t = measure(lambda: a @ a, device)["median_ms"] * 1e-3
    return bw, 2 * 8192**3 / t


# What the performance targets read (tools/targets.py): the single-branch 2-D r=2 pattern at batch 8 (speedups
# over the gather and FlexAttention peers, forward and forward+backward, and the roofline fraction) and the
# dense pattern against the first kernel of the project.
TARGET_PATTERNS = ("2d(32,32)r2", "dense")
TARGET_PEERS = (BASELINE, "sam_fast(triton)", "flex_attention(mask_mod)")


def cases(device, quick, targets=False):
    """The cases in the order they run: on a GPU the target cases first (D=64 at batch 8 holds the
    roofline target), so a run cut short by its stage's time limit has measured what matters; with
    ``targets`` only those."""
    pats = _patterns()
    if targets:
        return [("N=4096 D=64 B=8", name, pats[name], 8, 16, 64, (64, 64)) for name in TARGET_PATTERNS]
    if device.type == "cuda":
        out = []
        for D in (64, 80):
            for B in ([1] if quick else [8, 1]):
                for name in pats:
                    out.append((f"N=4096 D={D} B={B}", name, pats[name], B, 16, D, (64, 64)))
        from sam_fast import Branch

        for name, pat in (("2d(32,32)r2", [Branch((32, 32), 2)]), ("2d(64,64)r2", [Branch((64, 64), 2)])):
            out.append(("N=16384 D=64 B=1", name, pat, 1, 16, 64, (128, 128)))
        return out
    from sam_fast import Branch

    out = [("N=256 D=32 B=1", "2d(8,8)r2", [Branch((8, 8), 2)], 1, 4, 32, (16, 16)),
           ("N=256 D=32 B=1", "longnet{64:1,128:2,256:4}", [Branch(64, 1), Branch(128, 2), Branch(256, 4)],
            1, 4, 32, (16, 16))]
    if not quick:  # SAM's grid with ViT-B's 12 heads: what a CPU user of a dilated encoder runs
        out += [("N=4096 D=64 B=1 H=12", "2d(32,32)r2", [Branch((32, 32), 2)], 1, 12, 64, (64, 64)),
                ("N=4096 D=64 B=1 H=12", "longnet{1024:1,2048:2,4096:4}",
                 [Branch(1024, 1), Branch(2048, 2), Branch(4096, 4)], 1, 12, 64, (64, 64))]
    return out


def _modes(device, pname, targets):
    if device.type != "cuda" or (targets and pname == "dense"):
        return ("fwd",)
    return ("fwd", "fwd+bwd")


def case_peers(pname, pattern, B, N, H, D, grid, device, mode, targets):
    """The peers timed on one case and mode: all of them, or those the targets read."""
    out = []
    for name, make in _peers(pname, pattern, B, N, H, D, grid, device, mode):
        if mode != "fwd" and name.startswith("dense_v1@"):
            continue
        if targets and name not in TARGET_PEERS and not name.startswith("dense_v1@"):
            continue
        if targets and pname == "dense" and name.startswith("flex"):  # no target reads it; its compile is slow
            continue
        out.append((name, make))
    return out


def planned_rows(targets=True):
    """The (op, case, backend, mode, pattern) rows a GPU run writes, without running it."""
    dev = torch.device("cuda")
    rows = []
    for case, pname, pattern, B, H, D, grid in cases(dev, False, targets):
        N = grid[0] * grid[1]
        for mode in _modes(dev, pname, targets):
            rows += [dict(op="dilated_attention", case=f"{case} {pname}", backend=name, mode=mode, pattern=pname)
                     for name, _ in case_peers(pname, pattern, B, N, H, D, grid, dev, mode, targets)]
    return rows


def run_cases(device, dtype, quick, prov, each=None, rows=None, targets=False):
    """Measure every case; rows go to ``rows`` (a :class:`LiveRows` writes each at once) and are returned."""
    rows = [] if rows is None else rows
    bw = mm = None
    if device.type == "cuda":
        bw, mm = machine_rooflines(device)
        rows.append(dict(prov, op="machine", case="copy bandwidth / bf16 matmul", backend="torch", mode="-",
                         metric="GB/s", value=bw / 1e9, note=f"bf16 matmul {mm / 1e12:.0f} TFLOP/s (8192^3)"))
        raise_recompile_limit()  # FlexAttention: one graph per case and mode
    gen = torch.Generator(device=device).manual_seed(0)
    todo = cases(device, quick, targets)
    if targets:  # every case's forward before any backward (FlexAttention's backward compiles slowest)
        todo = [(c, "fwd") for c in todo] + [(c, "fwd+bwd") for c in todo if "fwd+bwd" in _modes(device, c[1], True)]
    else:
        todo = [(c, None) for c in todo]
    for (case, pname, pattern, B, H, D, grid), only in (each(todo) if each else todo):
        N = grid[0] * grid[1]
        q, k, v = (torch.randn(B, N, H, D, device=device, dtype=dtype, generator=gen) for _ in range(3))
        scale = D**-0.5
        pairs = kept_pairs(pattern, B, N, H, grid)
        nbytes = 4 * B * N * H * D * q.element_size()
        exact = _sam_fast(pattern, grid, "reference")(q.float(), k.float(), v.float(), scale)
        for mode in [m for m in _modes(device, pname, targets) if only in (None, m)]:
            for name, make in case_peers(pname, pattern, B, N, H, D, grid, device, mode, targets):
                row = dict(prov, op="dilated_attention", case=f"{case} {pname}", backend=name, mode=mode,
                           metric="tflops", pattern=pname, kept_pairs=pairs)
                try:
                    fn = make()
                    args = [t.detach().clone().requires_grad_(mode != "fwd") for t in (q, k, v)]
                    with torch.no_grad(), padded_head_dim_for(name):
                        out = fn(*args, scale)
                    if mode == "fwd":
                        row["max_err"] = float((out.float() - exact).abs().max())
                    with padded_head_dim_for(name):
                        row.update(measure(timed(fn, args, scale, mode), device))
                    t = row["median_ms"] * 1e-3
                    flops = 4 * D * pairs * (3.5 if mode != "fwd" else 1.0)
                    row["value"] = flops / t / 1e12
                    if bw is not None:
                        moved = nbytes * (1 if mode == "fwd" else 2.5)
                        row["gbps"] = moved / t / 1e9
                        row["bw_frac"] = moved / t / bw
                        row["roofline_frac"] = max(moved / bw, flops / mm) / t
                except Exception as exc:  # a peer that cannot run a case is reported, not fatal
                    row["note"] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
                rows.append(row)
    return rows


def timed(fn, args, scale, mode):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(*args, scale)

        return run
    grad = torch.randn_like(args[0])

    def step():
        for t in args:
            t.grad = None
        fn(*args, scale).backward(grad)

    return step


def check_triton_interpreter(prov):
    """CPU only: the Triton kernel vs the fp64 reference on a tiny multi-branch case (not timed)."""
    import sam_fast
    from sam_fast import Branch

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 64, 4, 32) for _ in range(3))
    pattern = [Branch((4, 4), 1), Branch((8, 8), (2, 2))]
    got = sam_fast.dilated_attention(q, k, v, pattern, grid=(8, 8), backend="triton")
    ref = sam_fast.dilated_attention(q.double(), k.double(), v.double(), pattern, grid=(8, 8), backend="reference")
    return [dict(prov, op="dilated_attention", case="tiny N=64 2 branches (interpreter)", backend="sam_fast(triton)",
                 mode="fwd", median_ms="", max_err=float((got.double() - ref).abs().max()),
                 note="checked under TRITON_INTERPRET, not timed: timing needs a GPU")]


def run(out_dir: str, quick: bool = False, device: str = None, targets: bool = False):
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    prov = provenance(dev)

    def each(todo):
        return progress(todo, "dilated attention cases",
                        lambda c: f"{c[0][0]} {c[0][1]}" + (f" {c[1]}" if c[1] else ""))

    rows = run_cases(dev, dtype, quick, prov, each, LiveRows(out_dir, SCRIPT, EXTRA_COLUMNS), targets)
    if dev.type == "cpu" and not targets:
        rows += check_triton_interpreter(prov)
    return save_results(out_dir, SCRIPT, rows, BASELINE, f"dilated attention, {prov['device']}, {prov['git_sha']}",
                        EXTRA_COLUMNS, plot_rows=[r for r in rows if r["op"] == "dilated_attention"])


def main(argv=None):
    return bench_main(__doc__, run, BASELINE, argv)


if __name__ == "__main__":
    sys.exit(main())
