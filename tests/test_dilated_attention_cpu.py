"""The CPU backend of dilated_attention: every branch batched over all its segments and heads (SAM's
windows with and without padding, dense, 1-D segments, 1-D and 2-D dilations with per-head offsets,
partial segments, heads fewer than the dilation, several branches mixed by lse) against the
reference's per-segment loop - outputs, lse and gradients (q, k, v, rel-pos tables) in float64 and
float32; and under no_grad, where PyTorch's fused CPU attention runs them, outputs and lse in float64,
float32, bf16 and fp16."""

import pytest
import torch

import sam_fast
from sam_fast import Branch
from sam_fast.ops.dilated_attention_cpu import batches_segments
from sam_fast.pattern import resolve_pattern
from sam_fast.testing import max_err


def _rel(a, b):
    """max |a - b| (equal infinities count as equal) relative to b's largest finite magnitude."""
    return max_err(a, b) / float(b[torch.isfinite(b)].abs().max())

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
    (2, (7, 9), 5, 8, Branch((4, 4), 2), True, False),  # 2-D r=2, partial segments, heads not a multiple
    (1, (7, 9), 5, 8, Branch((3, 5), (2, 3)), True, True),  # segments not multiples of the dilation, padded
    (1, (5, 6), 4, 8, Branch((8, 8), (3, 2)), True, True),  # dilated window larger than the grid
    (1, (6, 6), 2, 8, Branch((6, 6), 4), True, False),  # heads fewer than r*r: positions uncovered
    (1, (7, 9), 3, 8, [Branch((4, 4)), Branch((8, 8), 2)], True, False),  # two 2-D branches
    (2, (1, 30), 5, 8, [Branch(7, 3), Branch(16, 2), Branch(30, 4)], False, False),  # LongNet-style mix
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
    kept = torch.isfinite(lse)  # -inf where the head keeps the position in no branch
    grads = torch.autograd.grad((out * weight).sum() + lse[kept].sum(), [q, k, v] + tables)
    return out.detach(), lse.detach(), grads, rec


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1]}-{c[4]}-rel{int(c[5])}-pad{int(c[6])}")
def test_cpu_backend_matches_reference(case):
    branches = resolve_pattern(case[4], case[1][0] * case[1][1], case[1])
    assert batches_segments(branches, case[5] or None)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        out, lse, grads, rec = _run(case, dtype, "auto")
        ref_out, ref_lse, ref_grads, _ = _run(case, dtype, "reference")
        assert rec.calls == [("dilated_attention", "cpu")]
        assert _rel(out, ref_out) <= tol and _rel(lse, ref_lse) <= tol
        for g, r in zip(grads, ref_grads):
            assert _rel(g, r) <= tol


def test_one_dimensional_branch_with_rel_pos_runs_the_reference_loop():
    """A 1-D branch's rel-pos coordinates wrap at grid rows: that branch runs the reference's loop, the
    pattern's other branches stay batched, and the mix equals the reference (gradients included)."""
    import sam_fast.ops.dilated_attention_cpu as cpu

    grid, H, D = (5, 6), 3, 8
    pattern = [Branch(7, 3), Branch((3, 3), 2)]
    assert not batches_segments(resolve_pattern(pattern, 30, grid), torch.zeros(15, D))
    assert batches_segments(resolve_pattern(pattern, 30, grid), None)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 30, H, D, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    tables = [torch.randn(15, D, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    results = []
    for backend in ("cpu", "reference"):
        out, lse = sam_fast.dilated_attention(q, k, v, pattern, grid=grid, rel_pos_h=tables[0], rel_pos_w=tables[1],
                                              return_lse=True, backend=backend)
        results.append((out, lse, torch.autograd.grad(out.square().sum(), [q, k, v] + tables)))
    (out, lse, grads), (ref_out, ref_lse, ref_grads) = results
    assert _rel(out, ref_out) <= 1e-12 and _rel(lse, ref_lse) <= 1e-12
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) <= 1e-12
    assert cpu._batched(resolve_pattern(pattern, 30, grid)[1], tables[0])


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1]}-{c[4]}-rel{int(c[5])}-pad{int(c[6])}")
def test_inference_runs_the_fused_cpu_kernel(case, monkeypatch):
    """Under no_grad the segments go through PyTorch's fused CPU attention with the bias as its mask;
    out and lse still match the reference (float64: to rounding; float32, bf16, fp16: by the tolerance rule)."""
    import sam_fast.ops.dilated_attention_cpu as cpu
    from sam_fast.testing import FWD_FACTOR, check_against_reference

    fused = []
    real = cpu.fused_ok
    monkeypatch.setattr(cpu, "fused_ok", lambda *t: fused.append(real(*t)) or fused[-1])
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        with torch.no_grad():
            out, lse = _run_no_grad(case, dtype, "cpu")
            exact_out, exact_lse = _run_no_grad(case, torch.float64, "reference")
            same_out, same_lse = _run_no_grad(case, dtype, "reference")
        if dtype == torch.float64:
            assert _rel(out, exact_out) <= 1e-12 and _rel(lse, exact_lse) <= 1e-12
        else:
            check_against_reference("out", out, exact_out, same_out, dtype, FWD_FACTOR)
            check_against_reference("lse", lse, exact_lse, same_lse, dtype, FWD_FACTOR)
        assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    n_branches = 1 if case[4] is None or isinstance(case[4], Branch) else len(case[4])
    assert fused == [True] * 4 * n_branches


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


@pytest.mark.parametrize("pattern, padded", [([Branch((2, 3), (1, 2)), Branch((4, 4), 2)], False),
                                             (Branch((2, 3), (2, 2)), True)], ids=["two-branches", "padded"])
def test_gradcheck_batched_dilated_branches(pattern, padded):
    """torch.autograd.gradcheck (float64) through the batched path itself: dilated 2-D branches with
    rel-pos, mixed by lse or completed with virtual keys - gradients for q, k, v and both tables."""
    grid, H, D = (3, 4), 3, 4
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 12, H, D, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    th, tw = (torch.randn(7, D, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    pad = tuple(torch.randn(H, D, generator=gen, dtype=torch.float64) for _ in range(2)) if padded else None
    assert batches_segments(resolve_pattern(pattern, 12, grid), th)

    def f(q, k, v, th, tw):
        out, lse = sam_fast.dilated_attention(q, k, v, pattern, grid=grid, rel_pos_h=th, rel_pos_w=tw, pad_kv=pad,
                                              return_lse=True, backend="cpu")
        return out, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    assert torch.autograd.gradcheck(f, (q, k, v, th, tw))


def test_missing_keys_known_from_geometry():
    """Whether a branch masks any key is decided from its geometry in Python (so torch.compile sees no
    data-dependent branch); it must agree with the key-validity tensor over many layouts."""
    import itertools

    from sam_fast.ops.dilated_attention_cpu import _Layout
    from sam_fast.pattern import ResolvedBranch

    for rows, cols, sh, sw, dy, dx, H, full in itertools.product((1, 5, 7), (6, 9), (1, 3, 4, 8), (2, 5, 9), (1, 2, 3),
                                                                (1, 2, 4), (1, 2, 5), (False, True)):
        if dy <= sh and dx <= sw:
            lay = _Layout(ResolvedBranch(rows, cols, (sh, sw), (dy, dx), True), full, H, "cpu")
            assert lay.all_keys == bool(lay.is_key.all()), (rows, cols, sh, sw, dy, dx, H, full)


def test_cpu_backend_compiles_without_graph_breaks():
    """A dilated, partial, two-branch pattern with rel-pos through torch.compile(fullgraph=True): nothing
    data-dependent in the batched path; same result as eager."""
    grid, H, D = (5, 6), 3, 8
    pattern = [Branch((4, 4), 2), Branch((5, 6))]
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 30, H, D, generator=gen) for _ in range(3))
    th, tw = (torch.randn(11, D, generator=gen) for _ in range(2))

    def f(q, k, v):
        return sam_fast.dilated_attention(q, k, v, pattern, grid=grid, rel_pos_h=th, rel_pos_w=tw, backend="cpu")

    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v), f(q, k, v))


# The inference path's own machinery: SAM-shaped odd geometries (partial windows, head dims 14 and 80,
# dilated patterns), chunk boundaries, the geometry cache, the C++ bias op and the half-precision fallback.
ODD = [
    (1, (9, 11), 3, 14, Branch((4, 4)), True),  # partial windows padded with virtual keys, head dim 14
    (2, (6, 7), 2, 80, None, False),  # dense, head dim 80, batch 2
    (1, (9, 11), 4, 14, Branch((5, 6), 2), False),  # dilated with partial segments
    (1, (8, 8), 2, 80, Branch((4, 4), (2, 1)), True),  # dilated window, head dim 80
]


def _sam_inputs(B, grid, H, D, dtype, qkv_views=True, seed=0):
    """q, k, v as views of one (B, N, 3, H, D) tensor (SAM's blocks) or separate tensors; tables; pad_kv."""
    gen = torch.Generator().manual_seed(seed)
    N = grid[0] * grid[1]
    if qkv_views:
        q, k, v = torch.randn(B, N, 3, H, D, generator=gen, dtype=torch.float64).to(dtype).unbind(2)
    else:
        q, k, v = (torch.randn(B, N, H, D, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3))
    L = 2 * max(*grid) - 1
    th, tw = (torch.randn(L, D, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    pad = tuple(torch.randn(H, D, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    return q, k, v, th, tw, pad


def _attend(q, k, v, th, tw, pad, pattern, grid, backend):
    with torch.no_grad():
        return sam_fast.dilated_attention(q, k, v, pattern, grid=grid, rel_pos_h=th, rel_pos_w=tw, pad_kv=pad,
                                          return_lse=True, backend=backend)


@pytest.mark.parametrize("min_keys", [1, 1 << 30], ids=["bias-in-kernel", "bias-as-mask"])
@pytest.mark.parametrize("chunk_bytes", [1, 3000, 1 << 30], ids=["one-row", "few-rows", "whole"])
@pytest.mark.parametrize("case", ODD, ids=lambda c: f"{c[1]}-D{c[3]}-{c[4]}-pad{int(c[5])}")
def test_inference_chunks_and_odd_shapes_match_the_reference(case, chunk_bytes, min_keys, cpu_rules):
    """Chunks as small as one query row of one segment, a few rows (cutting segments mid-way in a dense
    block), or the whole bias at once: same outputs and lse; float32 and bf16 by the tolerance rule, q, k, v
    as views of one qkv tensor and as separate tensors."""
    from sam_fast.testing import FWD_FACTOR, check_against_reference

    # rel_terms_bytes: float32's kernel, segments per group; rel_pos_min_keys: float32 through both kernels,
    # whatever the segment size
    cpu_rules(bias_chunk_bytes=chunk_bytes, rel_terms_bytes=chunk_bytes, rel_pos_min_keys=min_keys)
    B, grid, H, D, pattern, padded = case
    for dtype, views in ((torch.float64, True), (torch.float32, True), (torch.float32, False), (torch.bfloat16, True)):
        q, k, v, th, tw, pad = _sam_inputs(B, grid, H, D, dtype, views)
        pad = pad if padded else None
        out, lse = _attend(q, k, v, th, tw, pad, pattern, grid, "cpu")
        exact = _attend(*(t.double() for t in (q, k, v, th, tw)), tuple(p.double() for p in pad) if pad else None,
                        pattern, grid, "reference")
        if dtype == torch.float64:
            assert _rel(out, exact[0]) <= 1e-12 and _rel(lse, exact[1]) <= 1e-12
            continue
        same = _attend(q, k, v, th, tw, pad, pattern, grid, "reference")
        check_against_reference("out", out, exact[0], same[0], dtype, FWD_FACTOR)
        check_against_reference("lse", lse, exact[1], same[1], dtype, FWD_FACTOR)


def test_chunk_plan_bounds_the_bias():
    """The chunk plan keeps a chunk's bias within the policy's bias_chunk_bytes, or one query row of one segment when
    even that is larger; the chunks cover every segment and row."""
    from sam_fast.cpu_policy import policy
    from sam_fast.ops.dilated_attention_cpu import _chunks, _Layout
    from sam_fast.pattern import ResolvedBranch

    for rows, cols, seg, H in (((64, 64, (14, 14), 12)), (64, 64, (64, 64), 12), (64, 64, (64, 64), 16),
                               (16, 16, (7, 7), 4), (5, 300, (5, 300), 2)):
        lay = _Layout(ResolvedBranch(rows, cols, seg, (1, 1), True), True, H, "cpu")
        L = lay.ay * lay.ax
        cs, cy = _chunks(lay, H, L, 4)
        assert 1 <= cs <= lay.n_seg and 1 <= cy <= lay.ay
        row = H * lay.ax * L * 4
        assert cs * cy * row <= max(policy().bias_chunk_bytes, row)
        if cy < lay.ay:
            assert cs == 1


def test_geometry_cache_is_keyed_by_geometry_heads_and_padding():
    """Two geometries, head counts and padding modes alternating in one process: each call gets its own
    layout (right answers every time), and a repeated geometry reuses its layout instead of rebuilding it."""
    import sam_fast.ops.dilated_attention_cpu as cpu

    cpu._LAYOUTS.clear()
    cases = [((9, 11), 3, Branch((4, 4)), True), ((7, 7), 2, Branch((4, 4)), True), ((9, 11), 2, Branch((4, 4)), True),
             ((9, 11), 3, Branch((4, 4)), False), ((9, 11), 3, Branch((4, 4), 2), False)]
    for rnd in range(2):
        for grid, H, pattern, padded in cases:
            q, k, v, th, tw, pad = _sam_inputs(1, grid, H, 8, torch.float64, seed=rnd)
            pad = pad if padded else None
            out, lse = _attend(q, k, v, th, tw, pad, pattern, grid, "cpu")
            ref = _attend(q, k, v, th, tw, pad, pattern, grid, "reference")
            assert _rel(out, ref[0]) <= 1e-12 and _rel(lse, ref[1]) <= 1e-12
        if rnd == 0:
            first = dict(cpu._LAYOUTS)
    assert len(first) == len(cases) and all(cpu._LAYOUTS[key] is lay for key, lay in first.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("avx512", [True, False])
def test_rel_pos_takes_the_bias_in_kernel_path_only_with_avx512(avx512, dtype, monkeypatch, cpu_rules):
    """float32 and bf16 inference with a rel-pos bias runs sam_fast::rel_pos_attention where the CPU has AVX-512,
    and PyTorch's fused kernel with the bias as its mask where it does not (the kernel's plain path is slower);
    fp16 always takes PyTorch's kernel; all match the reference. (bf16 / fp16 as on a CPU that multiplies them
    in hardware.)"""
    import sam_fast.ops.dilated_attention_cpu as cpu
    from sam_fast.ops._ext import extension_error
    from sam_fast.testing import FWD_FACTOR, check_against_reference

    assert extension_error() is None  # (loads the C++ ops)
    monkeypatch.setattr(cpu, "_avx512", lambda: avx512)
    monkeypatch.setattr(cpu, "_FAST_HALF", {torch.bfloat16: True, torch.float16: True})
    cpu_rules(rel_pos_min_keys=16)  # the 4 x 4 windows here
    calls = []
    fused, sdpa = torch.ops.sam_fast.rel_pos_attention, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    monkeypatch.setattr(cpu.torch.ops.sam_fast, "rel_pos_attention",
                        lambda *a: calls.append("sam_fast") or fused(*a), raising=False)
    monkeypatch.setattr(cpu.torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu",
                        lambda *a, **kw: calls.append("sdpa") or sdpa(*a, **kw), raising=False)
    grid, H, D = (9, 11), 3, 14
    q, k, v, th, tw, pad = _sam_inputs(1, grid, H, D, dtype)
    out, lse = _attend(q, k, v, th, tw, pad, Branch((4, 4)), grid, "cpu")
    assert out.dtype == dtype
    exact = _attend(*(t.double() for t in (q, k, v, th, tw)), tuple(p.double() for p in pad), Branch((4, 4)),
                    grid, "reference")
    same = _attend(q, k, v, th, tw, pad, Branch((4, 4)), grid, "reference")
    check_against_reference("out", out, exact[0], same[0], dtype, FWD_FACTOR)
    assert set(calls) == {"sam_fast" if avx512 and dtype != torch.float16 else "sdpa"}
    calls.clear()
    cpu_rules(rel_pos_min_keys=17)  # segments this small stay on PyTorch's kernel
    _attend(q, k, v, th, tw, pad, Branch((4, 4)), grid, "cpu")
    assert set(calls) == {"sdpa"}


def test_half_precision_without_cpu_support_computes_in_float32(monkeypatch):
    """On a CPU without bf16 / fp16 matmul instructions the inference path multiplies in float32 and returns
    the input dtype, within the tolerance rule."""
    import sam_fast.ops.dilated_attention_cpu as cpu
    from sam_fast.testing import FWD_FACTOR, check_against_reference

    monkeypatch.setattr(cpu, "_FAST_HALF", {torch.bfloat16: False, torch.float16: False})
    assert cpu.compute_dtype(torch.bfloat16) == torch.float32 and cpu.compute_dtype(torch.float32) == torch.float32
    calls = []
    real = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    monkeypatch.setattr(cpu.torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu",
                        lambda q, *a, **kw: calls.append(q.dtype) or real(q, *a, **kw), raising=False)
    fused = torch.ops.sam_fast.rel_pos_attention  # the float32 kernel with the bias inside
    monkeypatch.setattr(cpu.torch.ops.sam_fast, "rel_pos_attention",
                        lambda q, *a: calls.append(q.dtype) or fused(q, *a), raising=False)
    grid, H, D = (9, 11), 3, 14
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v, th, tw, pad = _sam_inputs(1, grid, H, D, dtype)
        out, lse = _attend(q, k, v, th, tw, pad, Branch((4, 4)), grid, "cpu")
        exact = _attend(*(t.double() for t in (q, k, v, th, tw)), tuple(p.double() for p in pad), Branch((4, 4)),
                        grid, "reference")
        same = _attend(q, k, v, th, tw, pad, Branch((4, 4)), grid, "reference")
        assert out.dtype == dtype
        check_against_reference("out", out, exact[0], same[0], dtype, FWD_FACTOR)
    assert calls and set(calls) == {torch.float32}
