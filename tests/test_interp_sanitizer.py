"""No two programs of one launch store to the same global address, and none loads what another stores,
in every Triton kernel (interpreter).

The interpreter runs a launch's programs in order, so such a race would pass every numerical test here
and make GPU results depend on scheduling; compute-sanitizer's racecheck covers shared memory only.
:func:`interp_sanitizer.interpreter_sanitizer` records the stores and loads of each launch by program, and
also checks every access against the launch's tensor arguments (out of bounds)."""

import pytest
import torch
import triton
import triton.language as tl
from attn_helpers import record_launch_configs
from interp_sanitizer import interpreter_sanitizer

import sam_fast
from sam_fast import Branch


@triton.jit
def _store_block(out, n, OVERLAP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK) + (0 if OVERLAP else tl.program_id(0) * BLOCK)
    tl.store(out + offs, tl.program_id(0) + offs * 0, mask=offs < n)


@triton.jit
def _shift_add(out, NEIGHBOUR: tl.constexpr, BLOCK: tl.constexpr):
    """Each program adds 1 to its block; with NEIGHBOUR it first reads the next program's block."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    src = (offs + BLOCK) % (tl.num_programs(0) * BLOCK) if NEIGHBOUR else offs
    tl.store(out + offs, tl.load(out + src) + 1)


@pytest.mark.no_sanitizer  # races on purpose (conftest runs every other test inside a sanitizer)
def test_detector_sees_a_race_and_only_a_race():
    out = torch.zeros(64, dtype=torch.int32)
    with interpreter_sanitizer() as w:
        _store_block[(4,)](out, 64, OVERLAP=False, BLOCK=16)
    assert w.findings() == [] and w.launches == [("_store_block", 64)] and out.tolist() == [i // 16 for i in range(64)]
    with interpreter_sanitizer() as w:
        _store_block[(4,)](out, 10, OVERLAP=True, BLOCK=16)  # every program writes out[0:10]
    assert w.races == [("_store_block", 1, 10)] and w.read_races == []
    with interpreter_sanitizer() as w:
        _shift_add[(4,)](out, NEIGHBOUR=False, BLOCK=16)  # read-modify-write of its own block: fine
    assert w.findings() == []
    with interpreter_sanitizer() as w:
        _shift_add[(4,)](out, NEIGHBOUR=True, BLOCK=16)  # reads what the next program writes
    assert w.races == [] and w.read_races == [("_shift_add", 1, 64)]


@triton.jit
def _copy(src, dst, n, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    if MASKED:
        tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)
    else:
        tl.store(dst + offs, tl.load(src + offs))


@pytest.mark.no_sanitizer  # reads out of bounds on purpose
def test_detector_sees_out_of_bounds_access():
    """A view of 10 elements of a 64-element tensor: the masked copy stays inside, the unmasked one reads
    and writes 6 elements past both views (inside the allocation, so nothing crashes and nothing else
    would notice)."""
    src, dst = torch.arange(64, dtype=torch.float32), torch.zeros(64)
    with interpreter_sanitizer() as w:
        _copy[(1,)](src[:10], dst[:10], 10, MASKED=True, BLOCK=16)
    assert w.findings() == [] and torch.equal(dst[:10], src[:10])
    with interpreter_sanitizer() as w:
        _copy[(1,)](src[:10], dst[:10], 10, MASKED=False, BLOCK=16)
    assert w.out_of_bounds == [("_copy", 1, "load", 6), ("_copy", 1, "store", 6)]


def _qkv(B, N, H, D, g, dtype=torch.float32):
    return [torch.randn(B, N, H, D, generator=g, dtype=torch.float32).to(dtype).requires_grad_() for _ in range(3)]


# (name, B, grid, H, D, pattern, rel, pad): dense, SAM windows with padding and rel-pos, D split 64 + 16,
# 1-D and 2-D dilation with per-head offsets, a nested LongNet mix (one launch), a non-nested pair (two
# launches through the running lse), heads fewer than offsets.
ATTENTION = [
    ("dense rel", 1, (6, 7), 2, 16, None, True, False),
    ("window pad rel D=80", 2, (6, 7), 2, 80, Branch((4, 4)), True, True),
    ("2-D r=2 rel", 1, (8, 8), 3, 16, Branch((4, 4), 2), True, False),
    ("LongNet mix", 1, (1, 64), 4, 32, [Branch(16, 1), Branch(32, 2), Branch(64, 4)], False, False),
    ("non-nested", 1, (1, 17), 2, 16, [Branch(3, 1), Branch(5, 2)], False, False),
    ("2-D non-nested rel", 1, (9, 10), 2, 16, [Branch((3, 3), 1), Branch((4, 4), (2, 2))], True, False),
]


@pytest.mark.parametrize("tiles", ["interpreter", "gpu fp16", "gpu fp32"])
@pytest.mark.parametrize("case", ATTENTION, ids=[c[0] for c in ATTENTION])
def test_attention_kernels_forward_and_backward(case, tiles, monkeypatch):
    """Also with the block shapes a GPU picks (128-query forward tiles in fp16; 16 / 32-query tiles over
    32-key blocks in fp32), which the interpreter otherwise replaces with its own."""
    from sam_fast.kernels.dilated_attention import tuning

    _, B, grid, H, D, pattern, rel, pad = case
    dtype = torch.float16 if tiles == "gpu fp16" else torch.float32
    if tiles != "interpreter":
        monkeypatch.setattr(tuning, "_interpreting", lambda: False)
    configs = record_launch_configs(monkeypatch)
    g = torch.Generator().manual_seed(0)
    q, k, v = _qkv(B, grid[0] * grid[1], H, D, g, dtype)
    kw = {"grid": grid}
    leaves = [q, k, v]
    if rel:
        seg = pattern.segment if pad else grid  # SAM's window tables, else absolute grid coordinates
        kw["rel_pos_h"] = (torch.randn(2 * seg[0] - 1, D, generator=g) * 0.3).to(dtype).requires_grad_()
        kw["rel_pos_w"] = (torch.randn(2 * seg[1] - 1, D, generator=g) * 0.3).to(dtype).requires_grad_()
        leaves += [kw["rel_pos_h"], kw["rel_pos_w"]]
    if pad:
        kw["pad_kv"] = tuple(torch.randn(H, D, generator=g).to(dtype).requires_grad_() for _ in range(2))
        leaves += list(kw["pad_kv"])
    with interpreter_sanitizer() as w, sam_fast.record_backends() as rec:
        out, lse = sam_fast.dilated_attention(q, k, v, pattern, return_lse=True, backend="triton", **kw)
        torch.autograd.grad(out.float().sum() + torch.where(torch.isfinite(lse), lse, 0).sum(), leaves)
    assert rec.backends() == {"triton"}
    assert w.findings() == []
    launched = {name for name, stored in w.launches if stored > 0}
    assert launched == {"_dilated_attention_fwd_kernel", "_dilated_attention_bwd_dkdv_kernel",
                        "_dilated_attention_bwd_dq_kernel"}
    query_tiles = {c["BLOCK_M"] for c in configs}
    assert query_tiles == {"interpreter": {64}, "gpu fp16": {64, 128}, "gpu fp32": {16 if D > 64 else 32}}[tiles]


def test_int8_kernels():
    from sam_fast.kernels import int8_linear as K

    g = torch.Generator().manual_seed(1)
    x = torch.randn(70, 136, generator=g)
    w8 = torch.randint(-127, 128, (90, 136), dtype=torch.int8, generator=g)
    ws = torch.rand(90, generator=g)
    with interpreter_sanitizer() as w:
        a, sa = K.quantize_rows(x)
        K.quantize_rows(x, torch.tensor(0.05))
        K.layer_norm_quantize(x, torch.ones(136), torch.zeros(136), 1e-6)
        for cfg in (None, dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP_M=2, num_warps=4, num_stages=2)):
            K.int8_gemm(a, sa, w8, ws, torch.zeros(90), "gelu", torch.float32, None, cfg)
            K.int8_gemm(a, sa, w8, ws, None, None, torch.int8, torch.tensor(0.1), cfg)
    assert w.findings() == []
    assert [name for name, stored in w.launches if stored > 0] == \
        ["_quantize_rows_kernel"] * 2 + ["_layer_norm_quantize_kernel"] + ["_int8_gemm_kernel"] * 4


@pytest.mark.parametrize("tiles", ["interpreter", "gpu fp32"])
def test_decoder_kernels(tiles, monkeypatch):
    """Also with the mask product's fp32 GPU block (16 pixels; the interpreter takes 64)."""
    import sam_fast.kernels.upscale_mask_product as mp
    from sam_fast.ops.small_key_attention import small_key_attention
    from sam_fast.ops.upscale_mask_product import upscale_mask_product

    if tiles == "gpu fp32":
        monkeypatch.setattr(mp, "_interpreting", lambda: False)
    g = torch.Generator().manual_seed(2)
    with interpreter_sanitizer() as w:
        q = torch.randn(2, 64, 32, generator=g)
        kv = torch.randn(3, 5, 32, generator=g)
        small_key_attention(q, torch.tensor([0, 1, 1]), kv, kv, 2, backend="triton")
        upscale_mask_product(torch.randn(3, 16, 8, 8, generator=g), torch.randn(16, 8, 2, 2, generator=g),
                             torch.randn(8, generator=g), torch.randn(3, 2, 8, generator=g), backend="triton")
    assert w.findings() == []
    assert [name for name, stored in w.launches if stored > 0] == ["_small_key_attention_kernel",
                                                                    "_upscale_mask_product_kernel"]
