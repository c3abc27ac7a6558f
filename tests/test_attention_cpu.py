"""The CPU backend of dilated_attention: undilated single-branch patterns batched over all segments
(SAM's windows with and without padding, dense, 1-D segments) against the reference's per-segment
loop - outputs, lse and gradients (q, k, v, rel-pos tables) in float64 and float32; and under no_grad,
where PyTorch's fused CPU attention runs them, outputs and lse in float64, float32, bf16 and fp16."""

import pytest
import torch

import sam_fast
from sam_fast import Branch
from sam_fast.ops.attention_cpu import batches_segments
from sam_fast.pattern import resolve_pattern

# (B, grid, H, D, pattern, rel-pos, pad_kv)
CASES = [
    (2, (7, 9), 3, 8, Branch((3, 3)), True, True),  # SAM window block, partial windows padded
    (1, (7, 9), 2, 14, Branch((3, 4)), True, False),  # partial windows without padding keys
    (1, (7, 9), 2, 8, Branch((7, 9)), True, False),  # one window = the grid
    (1, (7, 9), 2, 8, None, True, False),  # dense (SAM global block)
    (1, (5, 6), 2, 8, Branch((8, 8)), True, True),  # a window larger than the grid, padded
    (1, (5, 6), 2, 8, Branch((8, 8)), True, False),
    (2, (1, 30), 2, 8, Branch(7), False, False),  # 1-D segments, the last partial
    (1, (5, 6), 2, 8, Branch(30), False, False),  # 1-D, one segment
]


def _run(case, dtype, backend):
    B, grid, H, D, pattern, rel, pad = case
    gen = torch.Generator().manual_seed(0)
    N = grid[0] * grid[1]
    q, k, v = (torch.randn(B, N, H, D, generator=gen, dtype=dtype).requires_grad_() for _ in range(3))
    kw, tables = dict(grid=grid, return_lse=True), []
    if rel:
        L = 2 * max(*grid, 8) - 1
        tables = [torch.randn(L, D, generator=gen, dtype=dtype).requires_grad_() for _ in range(2)]
        kw.update(rel_pos_h=tables[0], rel_pos_w=tables[1])
    if pad:
        kw["pad_kv"] = (torch.randn(H, D, generator=gen, dtype=dtype), torch.randn(H, D, generator=gen, dtype=dtype))
    with sam_fast.record_backends() as rec:
        out, lse = sam_fast.dilated_attention(q, k, v, pattern, backend=backend, **kw)
    weight = torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)
    grads = torch.autograd.grad((out * weight).sum() + lse.sum(), [q, k, v] + tables)
    return out.detach(), lse.detach(), grads, rec


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1]}-{c[4]}-rel{int(c[5])}-pad{int(c[6])}")
def test_cpu_backend_matches_reference(case):
    branches = resolve_pattern(case[4], case[1][0] * case[1][1], case[1])
    assert batches_segments(branches, case[5] or None)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        out, lse, grads, rec = _run(case, dtype, "auto")
        ref_out, ref_lse, ref_grads, _ = _run(case, dtype, "reference")
        assert rec.calls == [("dilated_attention", "cpu")]
        scale = float(ref_out.abs().max())
        assert float((out - ref_out).abs().max()) <= tol * scale
        assert float((lse - ref_lse).abs().max()) <= tol * float(ref_lse.abs().max())
        for g, r in zip(grads, ref_grads):
            assert float((g - r).abs().max()) <= tol * float(r.abs().max())


def test_cpu_backend_runs_the_reference_loop_otherwise():
    """Dilated and multi-branch patterns are not batched; the CPU backend gives the reference's result."""
    grid = (8, 8)
    for pattern in ([Branch((4, 4), 2)], [Branch((4, 4)), Branch((8, 8), 2)]):
        assert not batches_segments(resolve_pattern(pattern, 64, grid), None)
        q, k, v = (torch.randn(1, 64, 2, 8) for _ in range(3))
        a = sam_fast.dilated_attention(q, k, v, pattern, grid=grid, backend="cpu")
        b = sam_fast.dilated_attention(q, k, v, pattern, grid=grid, backend="reference")
        assert torch.equal(a, b)
    # 1-D branches with rel-pos need the reference's coordinate mapping
    assert not batches_segments(resolve_pattern(Branch(16), 64, grid), torch.zeros(15, 8))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1]}-{c[4]}-rel{int(c[5])}-pad{int(c[6])}")
def test_inference_runs_the_fused_cpu_kernel(case, monkeypatch):
    """Under no_grad the segments go through PyTorch's fused CPU attention with the bias as its mask;
    out and lse still match the reference (float64: to rounding; float32, bf16, fp16: by DESIGN's rule)."""
    import sam_fast.ops.attention_cpu as cpu
    from sam_fast.testing import FWD_FACTOR, check_against_reference

    fused = []
    real = cpu._fused_ok
    monkeypatch.setattr(cpu, "_fused_ok", lambda *t: fused.append(real(*t)) or fused[-1])
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        with torch.no_grad():
            out, lse = _run_no_grad(case, dtype, "cpu")
            exact_out, exact_lse = _run_no_grad(case, torch.float64, "reference")
            same_out, same_lse = _run_no_grad(case, dtype, "reference")
        if dtype == torch.float64:
            assert float((out - exact_out).abs().max()) <= 1e-12 * float(exact_out.abs().max())
            assert float((lse - exact_lse).abs().max()) <= 1e-12 * float(exact_lse.abs().max())
        else:
            check_against_reference("out", out, exact_out, same_out, dtype, FWD_FACTOR)
            check_against_reference("lse", lse, exact_lse, same_lse, dtype, FWD_FACTOR)
        assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert fused == [True, True, True, True]


def _run_no_grad(case, dtype, backend):
    B, grid, H, D, pattern, rel, pad = case
    gen = torch.Generator().manual_seed(0)
    N = grid[0] * grid[1]
    q, k, v = (torch.randn(B, N, H, D, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3))
    kw = dict(grid=grid, return_lse=True)
    if rel:
        L = 2 * max(*grid, 8) - 1
        kw.update(rel_pos_h=torch.randn(L, D, generator=gen, dtype=torch.float64).to(dtype),
                  rel_pos_w=torch.randn(L, D, generator=gen, dtype=torch.float64).to(dtype))
    if pad:
        kw["pad_kv"] = tuple(torch.randn(H, D, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    return sam_fast.dilated_attention(q, k, v, pattern, backend=backend, **kw)
