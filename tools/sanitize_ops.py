"""Run every C++/CUDA op of sam_fast once on small CUDA inputs, for compute-sanitizer.

    compute-sanitizer --tool memcheck python -m tools.sanitize_ops [--triton]
    compute-sanitizer --tool racecheck python -m tools.sanitize_ops

Each op runs on shapes that hit its edges (partial warps and blocks, a crop inside a frame, masks
that are empty, full and ragged) and its result is checked against the CPU kernel, so a run that
the sanitizer passes also says the CUDA result was right. ``--triton`` adds every Triton kernel
(dilated attention forward and backward with window padding, rel-pos and several branches; the int8
quantizers and GEMM at sizes off every block multiple; both decoder kernels), each checked against its
PyTorch reference: the wrapped and masked edge addressing is what memcheck is asked to clear.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_ops: needs a CUDA GPU", file=sys.stderr)
        return 2
    import sam_fast
    from sam_fast.ops.mask_postprocess import mask_postprocess

    table = torch.randn(27, 40)
    torch.testing.assert_close(sam_fast.resize_rel_pos(table.cuda(), 63, backend="cuda").cpu(),
                               sam_fast.resize_rel_pos(table, 63, backend="cpu"))
    g = torch.Generator().manual_seed(0)
    logits = F.interpolate(torch.randn(9, 1, 6, 6, generator=g) * 8, (64, 64), mode="bicubic")[:, 0]
    logits[0] = -1.0
    logits[1] = 1.0
    for kw in (dict(input_size=(256, 171), original_size=(75, 50)),
               dict(input_size=(256, 256), original_size=(33, 33), crop_box=(3, 0, 36, 33), image_size=(33, 40)),
               dict(input_size=(200, 256), original_size=(37, 47), crop_box=(5, 6, 52, 43), image_size=(50, 60))):
        cpu = mask_postprocess(logits, padded_size=(256, 256), return_masks=True, backend="cpu", **kw)
        cuda = mask_postprocess(logits.cuda(), padded_size=(256, 256), return_masks=True, backend="cuda", **kw)
        assert torch.equal(cuda.area.cpu(), cpu.area), kw
        assert torch.equal(cuda.rle_counts.cpu(), cpu.rle_counts), kw
        assert torch.equal(cuda.masks.cpu(), cpu.masks), kw
    torch.cuda.synchronize()
    print("sanitize_ops: all CUDA ops ran and matched the CPU kernels")
    if "--triton" in sys.argv[1:]:
        _triton_ops()
        torch.cuda.synchronize()
        print("sanitize_ops: all Triton kernels ran and matched their references")
    return 0


def _triton_ops() -> None:
    import sam_fast
    from sam_fast import Branch
    from sam_fast.ops.small_key_attention import small_key_attention
    from sam_fast.ops.upscale_mask_product import upscale_mask_product
    from sam_fast.reference import int8_linear as ref_int8
    from sam_fast.reference import small_key_attention as ref_ska
    from sam_fast.reference import upscale_mask_product as ref_ump
    from sam_fast.testing import FWD_FACTOR, check_against_reference, check_rounding_level

    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(dtype)

    # dilated attention: (grid, pattern, rel-pos, window padding), bf16 forward + backward vs fp32 reference
    cases = [((13, 11), Branch((5, 4)), True, True),  # SAM's padded windows on a ragged grid
             ((13, 11), [Branch((6, 6), 2), Branch((13, 11), (3, 2))], True, False),
             ((9, 9), [Branch(17, 1), Branch(40, 3)], False, False),
             ((10, 7), None, True, False)]
    for grid, pattern, rel, pad in cases:
        N, H, D = grid[0] * grid[1], 3, 40
        q, k, v = (randn(2, N, H, D, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
        kw = {"grid": grid}
        seg = pattern.segment if isinstance(pattern, Branch) else grid
        if rel:
            kw["rel_pos_h"] = randn(2 * seg[0] - 1, D, dtype=torch.bfloat16, scale=0.2)
            kw["rel_pos_w"] = randn(2 * seg[1] - 1, D, dtype=torch.bfloat16, scale=0.2)
        if pad:
            kw["pad_kv"] = (randn(H, D, dtype=torch.bfloat16), randn(H, D, dtype=torch.bfloat16))
        out = sam_fast.dilated_attention(q, k, v, pattern, backend="triton", **kw)
        dq, dk, dv = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
        kw32 = {key: (tuple(t.float() for t in val) if isinstance(val, tuple) else val.float())
                if key != "grid" else val for key, val in kw.items()}
        exact = sam_fast.dilated_attention(*leaves, pattern, backend="reference", **kw32)
        gx = torch.autograd.grad(exact.square().sum(), leaves)
        same = sam_fast.dilated_attention(q, k, v, pattern, backend="reference", **kw)
        gs = torch.autograd.grad(same.float().square().sum(), (q, k, v))
        check_against_reference("dilated out", out, exact, same, torch.bfloat16, FWD_FACTOR)
        for name, a, x, r in zip(("dq", "dk", "dv"), (dq, dk, dv), gx, gs):
            check_against_reference(f"dilated {name}", a, x, r, torch.bfloat16, 3.0)

    # int8: quantizers and the GEMM with every epilogue, M / K / N off the block multiples
    for M, K, N in ((37, 72, 50), (130, 200, 257), (1, 40, 16)):
        x = randn(M, K, dtype=torch.bfloat16)
        q8, s8 = sam_fast.quantize_per_token(x)
        qr, sr = ref_int8.quantize_per_token(x)
        assert torch.equal(q8, qr) and torch.equal(s8, sr), (M, K)
        lw, lb = randn(K), randn(K)
        ql, sl = sam_fast.layer_norm_quantize(x, lw, lb, 1e-6)
        qlr, slr = ref_int8.layer_norm_quantize(x, lw, lb, 1e-6)
        assert int((ql.int() - qlr.int()).abs().max()) <= 1, (M, K)
        wq, ws = sam_fast.quantize.quantize_weight(randn(N, K, scale=K ** -0.5))
        b = randn(N, dtype=torch.bfloat16)
        for act in (None, "gelu"):
            y = sam_fast.int8_linear(x, wq, ws, b, activation=act, out_dtype=torch.float32, backend="triton")
            yr = sam_fast.int8_linear(x, wq, ws, b, activation=act, out_dtype=torch.float32, backend="reference")
            check_rounding_level("int8_linear", y, yr)
        h8 = sam_fast.int8_linear(x, wq, ws, b, activation="gelu", out_dtype=torch.int8, out_scale=0.02,
                                  backend="triton")
        h8r = sam_fast.int8_linear(x, wq, ws, b, activation="gelu", out_dtype=torch.int8, out_scale=0.02,
                                   backend="reference")
        assert int((h8.int() - h8r.int()).abs().max()) <= 1, (M, K, N)

    # decoder kernels at small, ragged sizes
    for dtype in (torch.bfloat16, torch.float32):
        P, T, Nq, C = 5, 7, 150, 48
        qd = randn(2, Nq, C, dtype=dtype)
        idx = torch.tensor([0, 1, 1, 0, 1], device="cuda")
        kd, vd = randn(P, T, C, dtype=dtype), randn(P, T, C, dtype=dtype)
        got = small_key_attention(qd, idx, kd, vd, 3, backend="triton")
        check_against_reference("small_key_attention", got,
                                ref_ska.small_key_attention(qd.double(), idx, kd.double(), vd.double(), 3),
                                ref_ska.small_key_attention(qd, idx, kd, vd, 3), dtype, FWD_FACTOR)
        xs, w, bias, hyper = (randn(3, 24, 9, 11, dtype=dtype), randn(24, 8, 2, 2, dtype=dtype, scale=0.2),
                              randn(8, dtype=dtype, scale=0.1), randn(3, 2, 8, dtype=dtype))
        got = upscale_mask_product(xs, w, bias, hyper, backend="triton")
        check_against_reference("upscale_mask_product", got,
                                ref_ump.upscale_mask_product(xs.double(), w.double(), bias.double(),
                                                                 hyper.double()),
                                ref_ump.upscale_mask_product(xs, w, bias, hyper), dtype, FWD_FACTOR)


if __name__ == "__main__":
    sys.exit(main())
