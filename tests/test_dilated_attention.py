"""Dilated and multi-branch attention: kernel vs reference, reference vs the definition, errors."""

import os

import pytest
import torch
from attn_helpers import check_kernel_vs_reference, record_launch_configs
from devices import gpu, smoke

import sam_fast
from sam_fast import Branch
from sam_fast.kernels.dilated_attention import Geometry, plan_groups
from sam_fast.pattern import resolve_pattern
from sam_fast.reference.dilated_attention import dilated_attention_reference

# (B, N or grid, H, D, pattern, rel). Covers 1-D and 2-D, one and several branches, r in {1, 2, 3, 4},
# partial segments, N off every block size, head dims 14/32/64/80, batch 1, heads fewer than r
# (positions kept by no branch) and heads not a multiple of r, nested (one launch) and non-nested
# (several launches merged through the running lse) patterns, rel-pos across branches.
CASES = [
    (2, 20, 3, 16, [Branch(8, 2)], False),                                      # H=3 not a multiple of r=2
    (1, 19, 2, 14, [Branch(6, 3)], False),                                      # H=2 < r=3: uncovered
    (1, 37, 5, 32, [Branch(16, 4)], False),                                     # r=4, partial segment
    (1, 30, 4, 64, [Branch(8, 1), Branch(16, 2), Branch(32, 4)], False),        # LongNet-style, nested
    (1, 17, 2, 80, [Branch(3, 1), Branch(5, 2)], False),                        # non-nested: two launches
    (1, 70, 1, 32, [Branch(70, 2), Branch(16, 1)], False),                      # H=1 < r, covered by branch 2
    (1, (6, 7), 4, 16, [Branch((4, 4), (2, 2))], True),                         # 2-D, rel-pos, partial
    (1, (5, 9), 2, 14, [Branch((5, 9), (2, 2))], True),                         # H=2 < 4 offsets: uncovered
    (1, (4, 6), 3, 32, [Branch((2, 3), 1), Branch((4, 6), (2, 3))], False),     # 2-D nested, r=(2,3)
    (1, (9, 10), 2, 64, [Branch((3, 3), 1), Branch((4, 4), (2, 2))], True),     # 2-D non-nested + rel
    (1, (8, 8), 3, 80, [Branch((4, 8), 1), Branch((8, 8), (2, 4))], True),      # 2-D nested, r=4, rel
    (1, (4, 6), 3, 16, [Branch(10, 2)], True),                                  # 1-D over a 2-D grid + rel
    (1, (10, 15), 2, 16, [Branch(150, 1)], True),                               # 1-D + rel, 3 key blocks a row
    (1, (6, 8), 4, 32, [Branch(12, 1), Branch(24, 2), Branch(48, 4)], True),    # LongNet + rel, per-key tables
    (1, (4, 5), 2, 16, [Branch((2, 2)), Branch(10, 2)], True),                  # 2-D and 1-D mixed (two grids)
    (1, (4, 5), 2, 16, [Branch(10, 2), Branch((2, 2))], False),                 # ... in the other order
]


@pytest.fixture(params=["fused", "per-branch"])
def grouping(request, monkeypatch):
    """Nested multi-branch patterns run as one launch ("fused": tile-size rule off) and as one launch per
    branch merged through the running lse ("per-branch")."""
    from sam_fast.kernels.dilated_attention import plan

    monkeypatch.setattr(plan, "MIN_FUSED_TILE", 1 if request.param == "fused" else 10**9)
    return request.param


def _case(B, n, H, D, pattern, rel, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = n if isinstance(n, tuple) else None
    N = grid[0] * grid[1] if grid else n
    qkv = [torch.randn(B, N, H, D, generator=g).to(dtype) for _ in range(3)]
    kw = {"grid": grid}
    if rel:
        kw["rel_pos_h"] = (torch.randn(2 * grid[0] - 1, D, generator=g) * 0.3).to(dtype)
        kw["rel_pos_w"] = (torch.randn(2 * grid[1] - 1, D, generator=g) * 0.3).to(dtype)
    return qkv, kw


def _id(c):
    pat = "+".join(f"{b.segment}r{b.dilation}".replace(" ", "") for b in c[4])
    return f"B{c[0]}-N{c[1]}-H{c[2]}-D{c[3]}-{pat}-rel{int(c[5])}".replace(" ", "")


def _check_case(case, dtype):
    B, n, H, D, pattern, rel = case
    qkv, kw = _case(B, n, H, D, pattern, rel, dtype)
    lse = check_kernel_vs_reference(qkv, pattern, kw, dtype)
    heads_cover = all(H >= (b.dilation if isinstance(b.dilation, int) else b.dilation[0] * b.dilation[1])
                      for b in pattern)
    if not heads_cover and len(pattern) == 1:  # some positions are kept by no head's offset
        assert torch.isinf(lse).any()


@pytest.mark.parametrize("case", [c for c in CASES if len(c[4]) == 1], ids=_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dilated_kernel_matches_reference(case, dtype):
    _check_case(case, dtype)


MULTI = [c for c in CASES if len(c[4]) > 1]


def _bf16_case(case) -> bool:
    """The multi-branch cases that also run in bf16 under the interpreter, the cheap ones there: a non-nested 1-D
    pair (two launches, head dim 80), a 1-D pair over one head, and the 2-D / 1-D mixes with and without rel-pos.
    fp32 runs every case here; bf16 and fp16 run multi-branch patterns at SAM's shapes on the GPU
    (test_dilated_kernel_vs_reference_real_shapes, -m gpu)."""
    return case[1] in (17, 70, (4, 5))


@pytest.mark.parametrize("grouping,dtype,case", [
    *(pytest.param("fused", torch.float32, c, id=f"fused-fp32-{_id(c)}") for c in MULTI),
    *(pytest.param("fused", torch.bfloat16, c, id=f"fused-bf16-{_id(c)}") for c in MULTI if _bf16_case(c)),
    *(pytest.param("per-branch", torch.float32, c, id=f"per-branch-fp32-{_id(c)}") for c in MULTI),
], indirect=["grouping"])
def test_multi_branch_kernel_matches_reference(grouping, dtype, case):
    _check_case(case, dtype)


def test_uncovered_positions_are_zero_with_lse_minus_inf():
    """r=4 with 2 heads: head h keeps positions = h mod 4; positions 2 and 3 mod 4 are nobody's."""
    q, k, v = (torch.randn(1, 16, 2, 16) for _ in range(3))
    out, lse = sam_fast.dilated_attention(q, k, v, Branch(8, 4), return_lse=True, backend="triton")
    for h in range(2):
        kept = torch.arange(16) % 4 == h
        assert torch.isfinite(lse[0, h, kept]).all() and torch.isinf(lse[0, h, ~kept]).all()
        assert (lse[0, h, ~kept] < 0).all() and torch.equal(out[0, ~kept, h], torch.zeros(12, 16))


def test_launch_groups():
    def groups(pattern, n, grid=None):
        brs = resolve_pattern(pattern, n, grid)
        return [len(g.branches) for g in plan_groups([Geometry(b.rows, b.cols, *b.seg, *b.dil) for b in brs])]

    assert groups([Branch(1024, 1), Branch(2048, 2), Branch(4096, 4)], 4096) == [3]   # LongNet: one launch
    assert groups([Branch(8, 1), Branch(16, 2), Branch(32, 4)], 30) == [1, 1, 1]        # tiles of 2: too small
    assert groups([Branch(3, 1), Branch(5, 2)], 17) == [1, 1]                           # not nested
    assert groups([Branch(8, 2), Branch(16, 3)], 64) == [1, 1]                          # lcm 6 != max 3
    assert groups([Branch((32, 32), 2)], 4096, (64, 64)) == [1]
    assert groups([Branch(w, 1) for w in (64, 128, 256, 512, 1024)], 1024) == [4, 1]   # 4 per launch
    assert groups([Branch(8, 1), Branch((2, 2), 1)], 16, (4, 4)) == [1, 1]              # 1-D with 2-D
    assert groups([Branch((2, 2), 1), Branch(4, 1)], 16, (4, 4)) == [1, 1]              # each on its grid


# ---------------------------------------------------------------------------------------------
# The reference against the definition
# ---------------------------------------------------------------------------------------------

def _definition(q, k, v, pattern, grid, scale, rel_pos_h=None, rel_pos_w=None):
    """The op contract of docs/maintainers/design.md from scratch: for each head and branch an explicit N x N mask (same
    segment, both positions at the head's offset modulo the dilation); the branches' masked logits
    concatenated along the key axis and soft-maxed together, which is the lse-weighted merge."""
    B, N, H, D = q.shape
    pos = torch.arange(N)
    if grid is not None:
        ys, xs = pos // grid[1], pos % grid[1]
    logits_all = []
    for b in pattern:
        if b.is_2d:
            (sh, sw), (dh, dw) = b.segment, b.dilation
            seg_id = (ys // sh) * 10_000 + xs // sw
            iy, ix = ys % sh, xs % sw
        else:
            seg_id = pos // b.segment
            iy, ix = torch.zeros_like(pos), pos % b.segment
            dh, dw = 1, b.dilation
        masks = []
        for h in range(H):
            oy, ox = (h // dw) % dh, h % dw
            kept = (iy % dh == oy) & (ix % dw == ox)
            masks.append(kept[:, None] & kept[None, :] & (seg_id[:, None] == seg_id[None, :]))
        mask = torch.stack(masks)  # (H, N, N)
        logits = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale
        if rel_pos_h is not None:
            ch, cw = (rel_pos_h.shape[0] - 1) // 2, (rel_pos_w.shape[0] - 1) // 2
            th = rel_pos_h[ys[:, None] - ys[None, :] + ch]  # (N, N, D)
            tw = rel_pos_w[xs[:, None] - xs[None, :] + cw]
            logits = logits + torch.einsum("bnhd,nmd->bhnm", q, th) + torch.einsum("bnhd,nmd->bhnm", q, tw)
        logits_all.append(logits.masked_fill(~mask, float("-inf")))
    logits = torch.cat(logits_all, dim=-1)  # (B, H, N, nb * N)
    lse = torch.logsumexp(logits, dim=-1)
    p = torch.where(torch.isinf(lse)[..., None], torch.zeros_like(logits), torch.exp(logits - lse[..., None]))
    out = torch.einsum("bhnm,bmhd->bnhd", p, torch.cat([v] * len(pattern), dim=1))
    return out, lse


DEFINITION_CASES = [
    (14, None, 3, [Branch(6, 2)], False),
    (23, None, 5, [Branch(4, 1), Branch(8, 2), Branch(16, 4)], False),
    (17, None, 2, [Branch(3, 1), Branch(5, 3)], False),
    (35, (5, 7), 4, [Branch((3, 4), (1, 2)), Branch((5, 7), (2, 2))], True),
    (24, (4, 6), 2, [Branch(12, 3)], True),  # 1-D branch with the bias: absolute grid coordinates
]


@pytest.mark.parametrize("case", DEFINITION_CASES, ids=lambda c: f"N{c[0]}-{len(c[3])}br-rel{int(c[4])}")
def test_reference_matches_definition(case):
    N, grid, H, pattern, rel = case
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, N, H, 8, generator=g, dtype=torch.float64) for _ in range(3))
    kw = {}
    if rel:
        kw = dict(rel_pos_h=torch.randn(2 * grid[0] - 1, 8, generator=g, dtype=torch.float64),
                  rel_pos_w=torch.randn(2 * grid[1] - 1, 8, generator=g, dtype=torch.float64))
    out, lse = dilated_attention_reference(q, k, v, resolve_pattern(pattern, N, grid), grid, softmax_scale=0.4, **kw)
    out_d, lse_d = _definition(q, k, v, pattern, grid, 0.4, kw.get("rel_pos_h"), kw.get("rel_pos_w"))
    torch.testing.assert_close(out, out_d)
    torch.testing.assert_close(lse, lse_d)


def test_reference_gradcheck_multi_branch():
    g = torch.Generator().manual_seed(8)
    grid, H, D = (4, 4), 3, 4
    q, k, v = (torch.randn(1, 16, H, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rh = torch.randn(7, D, generator=g, dtype=torch.float64, requires_grad=True)
    rw = torch.randn(7, D, generator=g, dtype=torch.float64, requires_grad=True)
    pattern = [Branch((2, 2), 1), Branch((4, 4), (2, 2))]

    def f(q, k, v, rh, rw):
        out, lse = sam_fast.dilated_attention(q, k, v, pattern, grid=grid, rel_pos_h=rh, rel_pos_w=rw,
                                              return_lse=True, backend="reference")
        return out, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    assert torch.autograd.gradcheck(f, (q, k, v, rh, rw))


def test_branch_weight_gradient_reaches_both_branches():
    """Mixing weights depend on q, k through the lse's: the kernel's dq must include that path
    (checked against autograd through the reference's explicit softmax-of-lse merge)."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 24, 2, 16, generator=g) for _ in range(3))
    pattern = [Branch(8, 1), Branch(24, 2)]
    qkv, kw = [q, k, v], {"grid": None}
    check_kernel_vs_reference(qkv, pattern, kw, torch.float32)
    # A pattern with an all-constant v makes out independent of the weights; a non-constant v does not.
    grads = []
    for be in ("triton", "reference"):
        ql = q.clone().requires_grad_()
        out = sam_fast.dilated_attention(ql, k, v, pattern, backend=be)
        grads.append(torch.autograd.grad(out.square().sum(), ql)[0])
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Convenience API and errors
# ---------------------------------------------------------------------------------------------

def test_dilated_attn_func_matches_pattern_call():
    q, k, v = (torch.randn(1, 32, 4, 16) for _ in range(3))
    out, lse = sam_fast.dilated_attn_func(q, k, v, [8, 16, 32], [1, 2, 4], softmax_scale=0.3, return_lse=True)
    ref, ref_lse = sam_fast.dilated_attention(q, k, v, [Branch(8, 1), Branch(16, 2), Branch(32, 4)],
                                              softmax_scale=0.3, return_lse=True)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    assert sam_fast.dilated_attn_func(q, k, v, 8, 2).shape == q.shape  # scalars accepted
    with pytest.raises(ValueError, match="segment_lengths and dilation_rates must have the same length"):
        sam_fast.dilated_attn_func(q, k, v, [8, 16], [1])
    with pytest.raises(TypeError, match="segment_lengths must be an int or a list of ints"):
        sam_fast.dilated_attn_func(q, k, v, "8", 2)


def test_bad_patterns_raise_value_error_naming_the_argument():
    q = torch.randn(1, 12, 2, 16)
    with pytest.raises(ValueError, match="Branch segment must be >= 1"):
        Branch(0)
    with pytest.raises(ValueError, match="Branch segment must be >= 1 along each axis"):
        Branch((0, 4))
    with pytest.raises(ValueError, match="dilation 8 must not exceed the segment 4"):
        Branch(4, 8)
    with pytest.raises(ValueError, match=r"dilation \(1, 5\) must not exceed the segment \(4, 4\)"):
        Branch((4, 4), (1, 5))
    with pytest.raises(ValueError, match="pattern\\[0\\] is a 2-D branch .* no grid"):
        sam_fast.dilated_attention(q, q, q, Branch((2, 2), 2))
    with pytest.raises(ValueError, match=r"grid \(3, 3\) has 9 tokens but q has N=12"):
        sam_fast.dilated_attention(q, q, q, Branch((2, 2)), grid=(3, 3))
    with pytest.raises(ValueError, match="pattern must contain at least one Branch"):
        sam_fast.dilated_attention(q, q, q, [])
    with pytest.raises(TypeError, match="pattern\\[1\\] must be a sam_fast.Branch"):
        sam_fast.dilated_attention(q, q, q, [Branch(4), (4, 2)])
    with pytest.raises(ValueError, match="pad_kv completes the partial segments of one 2-D branch"):
        z = torch.zeros(2, 16)
        sam_fast.dilated_attention(q, q, q, [Branch((2, 2)), Branch((3, 4))], grid=(3, 4), pad_kv=(z, z))


def test_dilation_beyond_the_tokens_is_refused():
    """A dilation larger than the (clipped) segment's tokens keeps at most one token per head, and its
    cost grows with the dilation (one program per residue; gigabytes on the CPU backend): refused."""
    q = torch.randn(1, 100, 2, 16)
    for backend in ("cpu", "reference", "triton"):
        with pytest.raises(ValueError, match=r"pattern\[0\] has dilation 16777216, larger than the N=100 tokens"):
            sam_fast.dilated_attention(q, q, q, Branch(2**24, 2**24), backend=backend)
    with pytest.raises(ValueError, match=r"pattern\[1\] has dilation \(1, 16\), larger than the 10x10 grid"):
        sam_fast.dilated_attention(q, q, q, [Branch(10), Branch((64, 64), (1, 16))], grid=(10, 10))
    out = sam_fast.dilated_attention(q, q, q, Branch(2**24, 100), backend="cpu")  # within N: fine
    assert torch.isfinite(out).all()


def test_triton_interpret_set_after_import_is_explained():
    """Triton decides at definition time whether a kernel runs under the interpreter: setting
    TRITON_INTERPRET=1 after sam_fast loaded its kernels gave '0 active drivers' from inside Triton."""
    import subprocess
    import sys

    code = ("import os, torch\n"
            "os.environ.pop('TRITON_INTERPRET', None)\n"
            "import sam_fast\n"
            "import sam_fast.kernels.dilated_attention\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "q = torch.randn(1, 8, 1, 16)\n"
            "try:\n"
            "    sam_fast.dilated_attention(q, q, q, backend='triton')\n"
            "except Exception as exc:\n"
            "    print(type(exc).__name__, exc)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    expected = "TRITON_INTERPRET=1 was set after sam_fast's Triton kernels were loaded"
    assert expected in res.stdout, res.stdout + res.stderr
    assert "before importing sam_fast" in res.stdout


def test_per_key_rel_table_of_1d_branch_matches_definition():
    """The Triton path's bias for a 1-D branch over a 2-D grid: table[i, u] is q_i . (rel_pos_h[dy] +
    rel_pos_w[dx]) for the u-th kept key of i's segment, with absolute grid coordinates (row = idx // W,
    col = idx % W); its hand-written backward matches autograd through the same table."""
    from sam_fast.kernels.dilated_attention import relpos_backward_1d, relpos_table_1d

    g = torch.Generator().manual_seed(5)
    grid, H, D, seg, dil = (5, 7), 3, 8, 13, 3
    N = grid[0] * grid[1]
    q = torch.randn(2, N, H, D, generator=g, dtype=torch.float64, requires_grad=True)
    rh = torch.randn(2 * grid[0] - 1, D, generator=g, dtype=torch.float64, requires_grad=True)
    rw = torch.randn(2 * grid[1] - 1, D, generator=g, dtype=torch.float64, requires_grad=True)
    geom = Geometry(1, N, 1, seg, 1, dil)
    table = relpos_table_1d(q, geom, grid, rh, rw)
    kept = -(-seg // dil)
    assert table.shape == (2, H, N, 8)
    for i in (0, 12, 13, 30, 34):
        for h in range(H):
            origin = (i // seg) * seg
            for u in range(kept):
                key = origin + h % dil + u * dil
                if key >= min(origin + seg, N):
                    continue
                dy = i // grid[1] - key // grid[1] + grid[0] - 1
                dx = i % grid[1] - key % grid[1] + grid[1] - 1
                want = q[:, i, h].double() @ (rh[dy] + rw[dx])
                torch.testing.assert_close(table[:, h, i, u].double(), want)
    dt = torch.randn(table.shape, generator=g, dtype=torch.float64)
    valid = torch.zeros_like(dt, dtype=torch.bool)  # entries past a segment's end are never read
    for i in range(N):
        origin = (i // seg) * seg
        for h in range(H):
            n_keys = len(range(origin + h % dil, min(origin + seg, N), dil))
            valid[:, h, i, :n_keys] = True
    dt = torch.where(valid, dt, torch.zeros_like(dt))
    want = torch.autograd.grad((table * dt).sum(), (q, rh, rw))
    got = relpos_backward_1d(q.detach(), dt, geom, grid, rh.detach(), rw.detach())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b)


def test_random_patterns_mixing_1d_and_2d_branches():
    """Seeded random patterns of one to three branches, 1-D and 2-D mixed in any order, with and without
    the rel-pos bias, on odd grids: the Triton kernel (forward and every gradient) against the reference."""
    import random

    rnd = random.Random(2026)
    for trial in range(6):
        grid = (rnd.randint(2, 6), rnd.randint(2, 6))
        N = grid[0] * grid[1]
        pattern = []
        for _ in range(rnd.randint(1, 3)):
            if rnd.random() < 0.5:
                seg = rnd.randint(1, N + 3)
                pattern.append(Branch(seg, rnd.randint(1, min(seg, 3))))
            else:
                seg = (rnd.randint(1, grid[0] + 1), rnd.randint(1, grid[1] + 1))
                pattern.append(Branch(seg, (rnd.randint(1, min(seg[0], 2)), rnd.randint(1, min(seg[1], 2)))))
        rel = rnd.random() < 0.6
        H = rnd.randint(1, 4)
        qkv, kw = _case(1, grid, H, 16, pattern, rel, torch.float32, seed=trial)
        if rel:  # long enough for any branch's offsets
            g = torch.Generator().manual_seed(trial)
            kw["rel_pos_h"] = torch.randn(2 * grid[0] + 1, 16, generator=g) * 0.3
            kw["rel_pos_w"] = torch.randn(2 * grid[1] + 1, 16, generator=g) * 0.3
        try:
            check_kernel_vs_reference(qkv, pattern, kw, torch.float32)
        except AssertionError as exc:
            raise AssertionError(f"grid {grid}, H={H}, rel={rel}, pattern {pattern}: {exc}") from exc


def test_benchmark_peers_compute_the_same_attention():
    """The benchmark's gather -> dense -> scatter peer and kept-pair count agree with the definition,
    so its speedups compare equal work."""
    from sam_fast.bench.bench_dilated_attention import GatherSdpaScatter, kept_pairs

    g = torch.Generator().manual_seed(11)
    for pattern, grid in (([Branch((4, 4), (2, 2))], (8, 8)), ([Branch(16, 1), Branch(32, 2), Branch(64, 4)], None)):
        N, H = 64, 4
        q, k, v = (torch.randn(2, N, H, 8, generator=g) for _ in range(3))
        peer = GatherSdpaScatter(pattern, 2, N, H, grid, torch.device("cpu"))(q, k, v, 0.5)
        ref = sam_fast.dilated_attention(q, k, v, pattern, grid=grid, softmax_scale=0.5, backend="reference")
        torch.testing.assert_close(peer, ref, atol=1e-5, rtol=1e-5)
    # 2-D (4,4) r=(2,2) on 8x8: every head keeps 2x2 per segment, 4 segments -> 16 pairs x 4 segments
    assert kept_pairs([Branch((4, 4), (2, 2))], 1, 64, 4, (8, 8)) == 4 * 4 * 16
    assert kept_pairs([Branch(64, 1)], 2, 64, 3, None) == 2 * 3 * 64 * 64


@pytest.mark.parametrize("case", [CASES[2], CASES[4], CASES[6], CASES[9]], ids=_id)
def test_gpu_fp32_blocks_match_reference(case, monkeypatch):
    """The block shapes a GPU gives fp32 inputs (32 keys, 32 or 16 queries, chosen so the sm_90 compile
    does not spill) run here too: the interpreter otherwise picks its own larger blocks."""
    from sam_fast.kernels.dilated_attention import tuning

    monkeypatch.setattr(tuning, "_interpreting", lambda: False)
    chosen = record_launch_configs(monkeypatch)
    _check_case(case, torch.float32)
    assert chosen and all(c["BLOCK_M"] == (16 if case[3] > 64 else 32) for c in chosen)


# ------------------------------------------------------------------------------------------------
# CUDA at SAM's real shapes (pytest -m gpu)
# ------------------------------------------------------------------------------------------------

# (B, grid, H, D, pattern, rel): the benchmark's patterns at SAM's grid, a non-nested pattern (two
# launches), rel-pos under dilation, an odd grid, and N = 16384 (a 2048^2 image).
LONGNET = [Branch(1024, 1), Branch(2048, 2), Branch(4096, 4)]
DILATED = [
    pytest.param((1, (64, 64), 16, 64, [Branch((32, 32), 2)], False), marks=smoke),
    (2, (64, 64), 16, 80, [Branch((64, 64), 4)], False),
    pytest.param((1, (64, 64), 16, 64, LONGNET, False), marks=smoke),
    pytest.param((1, (64, 64), 16, 64, LONGNET, True), marks=smoke),  # 1-D branches' per-key rel-pos tables
    (1, (64, 64), 16, 64, [Branch((2, 2)), Branch(100, 2)], True),  # 2-D and 1-D mixed: two launch groups
    (1, (64, 64), 12, 64, [Branch((14, 14), 1), Branch((32, 32), (2, 2))], True),
    (1, (64, 64), 16, 80, [Branch((32, 32), 2)], True),
    (1, (33, 47), 5, 32, [Branch((16, 16), (2, 2)), Branch((33, 47), (4, 4))], False),
    (1, (128, 128), 16, 64, [Branch((64, 64), 2)], False),
]


@gpu
@pytest.mark.parametrize("case", DILATED, ids=lambda c: f"B{c[0]}-{c[1]}-H{c[2]}-D{c[3]}-{len(c[4])}br-rel{int(c[5])}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dilated_kernel_vs_reference_real_shapes(case, dtype):
    B, grid, H, D, pattern, rel = case
    g = torch.Generator(device="cuda").manual_seed(0)
    N = grid[0] * grid[1]
    qkv = [t.to(dtype) for t in torch.randn(B, N, 3, H, D, device="cuda", generator=g).unbind(2)]
    kw = {"grid": grid}
    if rel:
        kw["rel_pos_h"] = (torch.randn(2 * grid[0] - 1, D, device="cuda", generator=g) * 0.2).to(dtype)
        kw["rel_pos_w"] = (torch.randn(2 * grid[1] - 1, D, device="cuda", generator=g) * 0.2).to(dtype)
    check_kernel_vs_reference(qkv, pattern, kw, dtype)


@gpu
def test_swapped_vit_b_shaped_encoder_dilated_on_gpu():
    from sam_fast.models import tiny_image_encoder

    enc = tiny_image_encoder(img_size=1024, embed_dim=768, num_heads=12, depth=4, window_size=14,
                             global_attn_indexes=(1, 3), out_chans=256).cuda().to(torch.bfloat16)
    x = torch.randn(1, 3, 1024, 1024, device="cuda", dtype=torch.bfloat16)
    cfg = sam_fast.SamFastConfig(attention="dilated", dilated_pattern=Branch((32, 32), 2))
    with sam_fast.apply(enc, cfg):
        with sam_fast.record_backends() as rec:
            y = enc(x)
            y.float().square().mean().backward()
        assert rec.backends("dilated_attention") == {"triton"} and not rec.fallbacks
        for blk in enc.blocks:
            blk.backend = "reference"
        y_ref = enc(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), y_ref.float(), atol=5e-2, rtol=5e-2)
