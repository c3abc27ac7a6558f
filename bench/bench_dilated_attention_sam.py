"""Benchmark: exact fused attention with SAM's rel-pos bias vs its peers.

GPU cases (bf16): SAM ViT-B/L/H global blocks (N = 64 x 64, H = 12/16/16, D = 64/64/80) at batch 1
and 8, forward and forward+backward, attention core only; window blocks (64 x 64 grid, 14 x 14
windows, SAM's padding to 70 x 70) as whole attention modules (qkv, attention, proj), since the
window peer's cost is its pad -> partition -> attention -> unpartition.

Peers in the same run: segment_anything's own attention (``add_decomposed_rel_pos``), SDPA with the
bias materialised as ``attn_mask`` (memory-efficient backend pinned; flash takes no mask),
FlexAttention with a rel-pos ``score_mod`` (compiled), flash_attn without bias when installed (speed
ceiling only). Achieved TFLOP/s use 4 * B * H * D * (attended pairs), x3.5 for forward+backward.

On a CPU-only machine: small shapes, CPU backends timed, the Triton kernel checked for correctness
under the interpreter and not timed.

    python bench/bench_dilated_attention_sam.py [--out bench/results] [--quick]
"""

from __future__ import annotations

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
    provenance,
    raise_recompile_limit,
    save_results,
)

SCRIPT = "bench_dilated_attention_sam"
BASELINE = "segment_anything"


def rel_tables(B, H, D, grid, device, dtype, gen):
    rh = torch.randn(2 * grid[0] - 1, D, device=device, dtype=dtype, generator=gen) * 0.2
    rw = torch.randn(2 * grid[1] - 1, D, device=device, dtype=dtype, generator=gen) * 0.2
    return rh, rw


def sam_core(q, k, v, rh, rw, grid, scale):
    """segment_anything's Attention.forward core on (B, N, H, D) inputs."""
    from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

    B, N, H, D = q.shape
    qh, kh, vh = (t.transpose(1, 2).reshape(B * H, N, D) for t in (q, k, v))
    attn = (qh * scale) @ kh.transpose(-2, -1)
    attn = add_decomposed_rel_pos(attn, qh, rh, rw, grid, grid)
    out = attn.softmax(dim=-1) @ vh
    return out.view(B, H, N, D).transpose(1, 2)


def _rel_hw(q, rh, rw, grid):
    """segment_anything's rel_h / rel_w projections: (B, H, N, Hg), (B, H, N, Wg)."""
    from segment_anything.modeling.image_encoder import get_rel_pos

    B, N, H, D = q.shape
    Rh = get_rel_pos(grid[0], grid[0], rh)
    Rw = get_rel_pos(grid[1], grid[1], rw)
    r_q = q.transpose(1, 2).reshape(B, H, grid[0], grid[1], D)
    rel_h = torch.einsum("bhyxc,ykc->bhyxk", r_q, Rh).reshape(B, H, N, grid[0])
    rel_w = torch.einsum("bhyxc,xkc->bhyxk", r_q, Rw).reshape(B, H, N, grid[1])
    return rel_h, rel_w


def sdpa_mask(q, k, v, rh, rw, grid, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rel_h, rel_w = _rel_hw(q, rh, rw, grid)
    B, N, H, D = q.shape
    mask = (rel_h.view(B, H, N, grid[0], 1) + rel_w.view(B, H, N, 1, grid[1])).view(B, H, N, N)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


_FLEX = {}


def flex_relpos(q, k, v, rh, rw, grid, scale):
    from torch.nn.attention.flex_attention import flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    rel_h, rel_w = _rel_hw(q, rh, rw, grid)
    W = grid[1]

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + rel_h[b, h, q_idx, kv_idx // W] + rel_w[b, h, q_idx, kv_idx % W]

    out = _FLEX["fn"](q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod, scale=scale)
    return out.transpose(1, 2)


def sam_fast_triton(q, k, v, rh, rw, grid, scale):
    import sam_fast

    return sam_fast.dilated_attention(q, k, v, grid=grid, rel_pos_h=rh, rel_pos_w=rw, softmax_scale=scale,
                                      backend="triton")


def sam_fast_cpu(q, k, v, rh, rw, grid, scale):
    import sam_fast

    return sam_fast.dilated_attention(q, k, v, grid=grid, rel_pos_h=rh, rel_pos_w=rw, softmax_scale=scale,
                                      backend="cpu")


def flash_attn_nobias(q, k, v, rh, rw, grid, scale):
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v, softmax_scale=scale)


def peers(device, head_dim=64, mode="fwd"):
    peers = [(BASELINE, sam_core)]
    if device.type == "cuda":
        from sam_fast.kernels.dilated_attention import head_dim_split

        peers += [("sdpa_mask(efficient)", sdpa_mask), ("flex_attention", flex_relpos),
                  ("sam_fast(triton)", sam_fast_triton)]
        if head_dim_split(head_dim)[1]:  # same-run measure of what the head-dim split buys
            peers.append((PADDED_D, sam_fast_triton))
        try:
            import flash_attn  # noqa: F401

            peers.append(("flash_attn(no bias)", flash_attn_nobias))
        except ImportError:
            pass
    else:
        peers.append(("sam_fast(cpu)", sam_fast_cpu))
    return peers


def _timed_fn(fn, args, mode):
    if mode == "fwd":
        return lambda: fn(*args)
    q, k, v = args[:3]
    grad = torch.randn_like(q)

    def step():
        for t in (q, k, v):
            t.grad = None
        fn(*args).backward(grad)

    return step


def global_cases(device, quick):
    if device.type == "cuda":
        models = [("vit_b", 12, 64), ("vit_l", 16, 64), ("vit_h", 16, 80)]
        batches = [1] if quick else [1, 8]
        return [(f"{m} global N=4096 B={b}", b, h, d, (64, 64)) for m, h, d in models for b in batches]
    small = [("small global N=256 B=1", 1, 4, 32, (16, 16)), ("small global N=256 D=40", 1, 4, 40, (16, 16))]
    return small + ([] if quick else [("vit_b global N=4096 B=1", 1, 12, 64, (64, 64))])  # ~1 s a call on 2 cores


def run_global(device, dtype, quick, prov, rows):
    gen = torch.Generator(device=device).manual_seed(0)
    for case, B, H, D, grid in global_cases(device, quick):
        N = grid[0] * grid[1]
        q, k, v = (torch.randn(B, N, H, D, device=device, dtype=dtype, generator=gen) for _ in range(3))
        rh, rw = rel_tables(B, H, D, grid, device, dtype, gen)
        scale = D ** -0.5
        exact = sam_core(q.float(), k.float(), v.float(), rh.float(), rw.float(), grid, scale) if B == 1 else None
        pairs = B * H * N * N
        for mode in ("fwd", "fwd+bwd"):
            for name, fn in peers(device, D, mode):
                args = [t.detach().clone().requires_grad_(mode != "fwd") for t in (q, k, v)] + [rh, rw, grid, scale]
                row = dict(prov, op="attention", case=case, backend=name, mode=mode, metric="tflops")
                try:
                    with torch.no_grad() if mode == "fwd" else torch.enable_grad(), padded_head_dim_for(name):
                        out = fn(*args)
                    if exact is not None and mode == "fwd":
                        row["max_err"] = float((out.float() - exact).abs().max())
                    with padded_head_dim_for(name):
                        m = measure(_timed_fn(fn, args, mode) if mode != "fwd" else no_grad_call(fn, args), device)
                    row.update(m)
                    flops = 4 * D * pairs * (3.5 if mode != "fwd" else 1.0)
                    row["value"] = flops / (m["median_ms"] * 1e-3) / 1e12
                except Exception as exc:  # a peer that cannot run this case is reported, not fatal
                    row["note"] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
                rows.append(row)
            if device.type == "cpu":
                break  # CPU: forward only
    return rows


def no_grad_call(fn, args):
    def run():
        with torch.no_grad():
            return fn(*args)

    return run


def run_window(device, dtype, quick, prov, rows):
    """Whole window-attention modules: segment_anything pad/partition/attn/unpartition vs sam_fast."""
    from segment_anything.modeling.image_encoder import Attention, window_partition, window_unpartition

    from sam_fast.nn.attention import sam_attention

    if device.type == "cuda":
        cases = [(f"{m} window 14 grid 64 B={b}", b, c, h, 14, (64, 64))
                 for m, c, h in [("vit_b", 768, 12), ("vit_h", 1280, 16)] for b in ([1] if quick else [1, 8])]
    else:
        cases = [("small window 7 grid 16 B=1", 1, 128, 4, 7, (16, 16))]
    torch.manual_seed(0)
    for case, B, C, H, ws, grid in cases:
        attn = Attention(C, num_heads=H, qkv_bias=True, use_rel_pos=True, input_size=(ws, ws)).to(device, dtype)
        with torch.no_grad():
            attn.rel_pos_h.normal_(std=0.2)
            attn.rel_pos_w.normal_(std=0.2)
        x = torch.randn(B, *grid, C, device=device, dtype=dtype)

        def sam_window(x=x, attn=attn):
            xw, pad_hw = window_partition(x, ws)
            return window_unpartition(attn(xw), ws, pad_hw, grid)

        ours_backend = "triton" if device.type == "cuda" else "cpu"

        def ours(x=x, attn=attn):
            return sam_attention(attn, x, ws, backend=ours_backend)

        with torch.no_grad():
            ref = sam_window()
            for name, fn in ((BASELINE, sam_window), (f"sam_fast({ours_backend})", ours)):
                row = dict(prov, op="window_attention", case=case, backend=name, mode="fwd", metric="tflops")
                row["max_err"] = float((fn().float() - ref.float()).abs().max())
                m = measure(fn, device)
                row.update(m)
                n_pad = (-(-grid[0] // ws) * ws) * (-(-grid[1] // ws) * ws)
                row["value"] = 4 * (C // H) * B * H * n_pad * ws * ws / (m["median_ms"] * 1e-3) / 1e12
                row["note"] = "module incl. qkv/proj"
                rows.append(row)
    return rows


def check_triton_interpreter(prov):
    """CPU only: the Triton kernel's result vs the fp64 reference on a tiny shape (not timed)."""
    import sam_fast

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 48, 2, 32) for _ in range(3))
    rh, rw = torch.randn(11, 32) * 0.2, torch.randn(15, 32) * 0.2
    kw = dict(grid=(6, 8), rel_pos_h=rh, rel_pos_w=rw)
    got = sam_fast.dilated_attention(q, k, v, backend="triton", **kw)
    ref = sam_fast.dilated_attention(q.double(), k.double(), v.double(), backend="reference", grid=(6, 8),
                                     rel_pos_h=rh.double(), rel_pos_w=rw.double())
    return [dict(prov, op="attention", case="tiny N=48 (interpreter)", backend="sam_fast(triton)", mode="fwd",
                 median_ms="", max_err=float((got.double() - ref).abs().max()),
                 note="checked under TRITON_INTERPRET, not timed: timing needs a GPU")]


def run(out_dir: str, quick: bool = False, device: str = None):
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    prov = provenance(dev)
    if dev.type == "cuda":
        raise_recompile_limit()  # flex_attention: one graph per case and mode
    rows = LiveRows(out_dir, SCRIPT)
    run_global(dev, dtype, quick, prov, rows)
    run_window(dev, dtype, quick, prov, rows)
    if dev.type == "cpu":
        rows += check_triton_interpreter(prov)
    return save_results(out_dir, SCRIPT, rows, BASELINE,
                        f"attention with SAM rel-pos, {prov['device']}, {prov['git_sha']}")


def main(argv=None):
    return bench_main(__doc__, run, BASELINE, argv)


if __name__ == "__main__":
    sys.exit(main())
