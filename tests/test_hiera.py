"""SAM 2's Hiera encoder: ``hiera_attention`` (the C++ kernel and the reference against a float64 computation written
from the definition, on each instruction-set path), and ``sam_fast.apply`` on Meta's own Hiera (the ``sam2`` package:
the same function at every returned feature level, undo, fallbacks, refusals)."""

import collections
import contextlib
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from devices import gpu, smoke

import sam_fast
from sam_fast.ops.hiera_attention import hiera_attention
from sam_fast.testing import FWD_FACTOR, check_against_reference


def _definition(qkv, heads, window, stride, pad_k, pad_v, scale):
    """float64, one window at a time, from SAM 2's block: pad the tokens' qkv (padded k / v: pad_k / pad_v), max-pool
    each window's queries stride x stride, attend, keep the pooled cells inside the floor-pooled grid."""
    B, Hg, Wg, C3 = qkv.shape
    D = C3 // 3 // heads
    sh, sw = (window, window) if window else (Hg, Wg)
    Hq, Wq = Hg // stride, Wg // stride
    out = torch.full((B, Hq, Wq, heads, D), float("nan"), dtype=torch.float64)
    for b in range(B):
        for y0 in range(0, Hg, sh):
            for x0 in range(0, Wg, sw):
                q = torch.full((sh, sw, heads, D), -float("inf"), dtype=torch.float64)
                k, v = (t.double().expand(sh, sw, heads, D).clone() for t in (pad_k, pad_v))
                for y in range(y0, min(y0 + sh, Hg)):
                    for x in range(x0, min(x0 + sw, Wg)):
                        t = qkv[b, y, x].double().view(3, heads, D)
                        q[y - y0, x - x0], k[y - y0, x - x0], v[y - y0, x - x0] = t[0], t[1], t[2]
                qh, qw = sh // stride, sw // stride  # (a global block's odd side: its last row is not pooled)
                qp = q[:qh * stride, :qw * stride].reshape(qh, stride, qw, stride, heads, D).amax(dim=(1, 3))
                qp = qp.reshape(-1, heads, D).transpose(0, 1)  # (heads, Lq, D)
                kk, vv = (t.reshape(-1, heads, D).transpose(0, 1) for t in (k, v))
                o = F.softmax(qp @ kk.transpose(1, 2) * scale, -1) @ vv  # (heads, Lq, D)
                for i in range(qp.shape[1]):
                    py, px = y0 // stride + i // qw, x0 // stride + i % qw
                    if py < Hq and px < Wq:
                        out[b, py, px] = o[:, i]
    return out.reshape(B, Hq, Wq, heads * D)


# (B, grid, heads, D, window, q_stride): Hiera's windows of 8 and 4 pooling their queries (a stage's first block),
# padded windows (14 and 7 at SAM 2's third and fourth stages), a global block, global pooling, head dims of SAM 2.1's
# sizes (56 base+, 72 large, 96 tiny / small) and odd grids whose last pooled row is dropped
CASES = [(2, (8, 8), 1, 96, 4, 2), (1, (9, 10), 2, 56, 4, 1), (1, (10, 13), 1, 72, 6, 2), (1, (6, 7), 3, 16, 0, 1),
         (1, (7, 5), 2, 8, 0, 2), (1, (13, 9), 2, 24, 4, 2), (1, (5, 5), 1, 8, 8, 1)]


def _case_inputs(case, dtype, seed):
    """qkv (x W^T alone), its bias, pad_kv and the float64 definition's output for a case of CASES / TRITON_CASES."""
    B, (Hg, Wg), heads, D, window, stride = case
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, Hg, Wg, 3 * heads * D, generator=g).to(dtype)
    bias = torch.randn(3 * heads * D, generator=g).to(dtype)
    pad = tuple(torch.randn(heads, D, generator=g).to(dtype) for _ in range(2))
    exact = _definition((qkv.double() + bias.double()).to(dtype), heads, window, stride, *pad, D ** -0.5)
    return qkv, bias, pad, exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-{c[1][0]}x{c[1][1]}-H{c[2]}-D{c[3]}-w{c[4]}-s{c[5]}")
def test_kernel_and_reference_match_the_definition(case, dtype, cpu_paths):
    B, (Hg, Wg), heads, D, window, stride = case
    qkv, bias, pad, exact = _case_inputs(case, dtype, seed=0)
    scale = D ** -0.5
    same = hiera_attention(qkv, heads, window, stride, pad, scale, bias, backend="reference")
    got = hiera_attention(qkv, heads, window, stride, pad, scale, bias, backend="cpu")
    assert got.dtype == dtype and got.shape == (B, Hg // stride, Wg // stride, heads * D)
    check_against_reference(f"hiera_attention {dtype} {cpu_paths}", got.double(), exact, same.double(), dtype,
                            FWD_FACTOR)
    check_against_reference("reference", same.double(), exact, same.double(), dtype, 1.0)


# the Triton kernel's cases (the interpreter is slow: small grids): a window of 8 pooling its queries, padded
# windows of 6 with a head dim of 56 (padded to 64 inside the program), and a global block whose keys span two blocks
TRITON_CASES = [(2, (8, 8), 1, 16, 8, 2), (1, (8, 7), 2, 56, 6, 1), (1, (9, 10), 1, 16, 0, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"B{c[0]}-{c[1][0]}x{c[1][1]}-D{c[3]}-w{c[4]}-s{c[5]}")
def test_triton_kernel_matches_the_definition(case, dtype, device):
    B, (Hg, Wg), heads, D, window, stride = case
    qkv, bias, pad, exact = _case_inputs(case, dtype, seed=2)
    same = hiera_attention(qkv, heads, window, stride, pad, None, bias, backend="reference")
    with sam_fast.record_backends() as rec:
        got = hiera_attention(qkv.to(device), heads, window, stride, tuple(p.to(device) for p in pad), None,
                              bias.to(device), backend="triton")
    assert rec.calls == [("hiera_attention", "triton")]
    assert got.dtype == dtype and got.shape == (B, Hg // stride, Wg // stride, heads * D)
    check_against_reference(f"hiera_attention triton {dtype}", got.double().cpu(), exact, same.double(), dtype,
                            FWD_FACTOR)


SAM2_SHAPES = [("hiera_t stage 1", 256, 1, 96, 8, 1), ("hiera_t stage 2 pooling", 256, 2, 96, 8, 2),
               ("hiera_l stage 3", 64, 8, 72, 16, 1), ("hiera_b+ global", 64, 8, 56, 0, 1),
               ("hiera_t stage 4 padded", 32, 8, 96, 7, 1)]


@gpu
@pytest.mark.parametrize("case,dtype", [
    pytest.param(c, d, marks=smoke if (c[0], d) == ("hiera_t stage 2 pooling", torch.bfloat16) else (),
                 id=f"{c[0]}-{str(d)[6:]}")
    for c in SAM2_SHAPES for d in (torch.bfloat16, torch.float16, torch.float32)])
def test_triton_kernel_at_sam2_shapes(case, dtype):
    """SAM 2's real grids at 1024 px on the GPU: the kernel against the reference (SDPA on SAM 2's partition); the
    smoke subset takes a stage change (pooled queries) in bf16."""
    _, grid, heads, D, window, stride = case
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(1, grid, grid, 3 * heads * D, device="cuda", generator=g).to(dtype)
    pad = tuple(torch.randn(heads, D, device="cuda", generator=g).to(dtype) for _ in range(2))
    exact = hiera_attention(qkv.double(), heads, window, stride, tuple(p.double() for p in pad), backend="reference")
    same = hiera_attention(qkv, heads, window, stride, pad, backend="reference")
    with sam_fast.record_backends() as rec:
        got = hiera_attention(qkv, heads, window, stride, pad)
    assert rec.backends() == {"triton"}
    check_against_reference(f"hiera_attention {case[0]} {dtype}", got.double(), exact, same.double(), dtype,
                            FWD_FACTOR)


def test_defaults_padded_keys_zeros_and_scale():
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(1, 5, 5, 24, generator=g)
    zeros = (torch.zeros(2, 4), torch.zeros(2, 4))
    want = hiera_attention(qkv, 2, 3, 1, zeros, 0.5, backend="cpu")
    torch.testing.assert_close(hiera_attention(qkv, 2, 3, 1, None, 0.5, backend="cpu"), want)
    torch.testing.assert_close(hiera_attention(qkv, 2, 3, 1, None, 0.5, backend="reference"), want)
    torch.testing.assert_close(hiera_attention(qkv, 2, 3, backend="cpu"),
                               hiera_attention(qkv, 2, 3, 1, None, 4 ** -0.5, backend="cpu"))


def test_autograd_takes_the_reference():
    """The kernel has no backward: with autograd recording, "auto" runs the differentiable reference."""
    qkv = torch.randn(1, 4, 4, 24, requires_grad=True)
    with sam_fast.record_backends() as rec:
        out = hiera_attention(qkv, 2, 2, 2)
    assert rec.backends() == {"reference"} and out.shape == (1, 2, 2, 8)
    out.sum().backward()
    assert qkv.grad is not None and torch.isfinite(qkv.grad).all()


def test_bad_arguments_are_refused_by_name():
    qkv = torch.randn(1, 6, 6, 48)
    with pytest.raises(TypeError, match="qkv must be a torch.Tensor"):
        hiera_attention(qkv.numpy(), 2, 3)
    with pytest.raises(ValueError, match="qkv must be a floating-point"):
        hiera_attention(qkv[0], 2, 3)
    with pytest.raises(ValueError, match="3 \\* heads \\* D"):
        hiera_attention(qkv, 5, 3)
    with pytest.raises(ValueError, match="window"):
        hiera_attention(qkv, 2, -1)
    with pytest.raises(ValueError, match="q_stride"):
        hiera_attention(qkv, 2, 3, 0)
    with pytest.raises(ValueError, match="q_stride \\(2\\) must divide window \\(3\\)"):
        hiera_attention(qkv, 2, 3, 2)
    with pytest.raises(ValueError, match="pad_k must be a \\(heads, D\\) = \\(2, 8\\)"):
        hiera_attention(qkv, 2, 3, 1, (torch.zeros(3), torch.zeros(16)))
    with pytest.raises(ValueError, match="qkv_bias must be None or a \\(48,\\) tensor"):
        hiera_attention(qkv, 2, 3, 1, qkv_bias=torch.zeros(16))
    with pytest.raises((TypeError, ValueError), match="scale"):
        hiera_attention(qkv, 2, 3, 1, None, "half")
    op = torch.ops.sam_fast.hiera_attention
    out = torch.empty(1, 3, 3, 16)
    with pytest.raises(RuntimeError, match="out must be a contiguous \\(1, 3, 3, 16\\)"):
        op(qkv, 2, 4, 2, None, None, None, 0.5, torch.empty(1, 6, 6, 16))
    with pytest.raises(RuntimeError, match="q_stride must be >= 1 and divide the window"):
        op(qkv, 2, 3, 2, None, None, None, 0.5, out)
    with pytest.raises(RuntimeError, match="qkv_bias must be a contiguous \\(48,\\)"):
        op(qkv, 2, 4, 2, torch.zeros(8), None, None, 0.5, out)
    with pytest.raises(RuntimeError, match="both pad_k and pad_v"):
        op(qkv, 2, 4, 2, None, torch.zeros(2, 8), None, 0.5, out)
    with pytest.raises(RuntimeError, match="single memory location"):
        op(qkv, 2, 4, 2, None, None, None, 0.5, qkv.view(-1)[: 9 * 16].view(1, 3, 3, 16))


# --- sam_fast.apply on Meta's Hiera (the sam2 package) --------------------------------------------------------------

#: small Hiera configurations at 128 px (grids 32, 16, 8, 4): a global block in the third stage, windows that pad
#: (6 on the 8 x 8 grid, 3 on 4 x 4), every stage change pooling its queries; head dims 24 and 56
HIERAS = {"t": dict(embed_dim=24, num_heads=1, stages=(1, 2, 2, 1), window_spec=(8, 4, 6, 3), global_att_blocks=(4,)),
          "b": dict(embed_dim=56, num_heads=1, stages=(1, 1, 2, 1), window_spec=(8, 4, 6, 4), global_att_blocks=(3,),
                    head_mul=1.0)}


def _hiera(name, seed=0):
    hieradet = pytest.importorskip("sam2.modeling.backbones.hieradet")
    torch.manual_seed(seed)
    model = hieradet.Hiera(**HIERAS[name], window_pos_embed_bkg_spatial_size=(4, 4)).eval()
    with torch.no_grad():  # weights far from zero-initialised embeddings, so that every term matters
        for p in model.parameters():
            p.normal_(0.0, 0.2 if p.dim() > 1 else 0.5)
    return model


def _image_encoder(name):
    """Meta's ImageEncoder (the Hiera trunk and its FPN neck), as SAM 2 builds it."""
    pytest.importorskip("sam2")
    from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
    from sam2.modeling.position_encoding import PositionEmbeddingSine

    trunk = _hiera(name)
    neck = FpnNeck(PositionEmbeddingSine(num_pos_feats=32), 32, trunk.channel_list, fpn_top_down_levels=[2, 3])
    return ImageEncoder(trunk, neck, scalp=1).eval()


@pytest.mark.parametrize("name", sorted(HIERAS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_computes_metas_hiera_at_every_level(name, dtype, cpu_rules):
    """attention="exact" on SAM 2's image encoder swaps every Hiera block for its fast form: every returned feature
    level (and the position encodings) by the tolerance rule against float64, the parameters the original's under
    the same keys, each block's attention through the C++ kernel where the CPU computes in the dtype (the stage
    changes pooling their queries in it) and float32's linears through the fused epilogues; undo() gives the original
    back, bit for bit."""
    from sam_fast.nn.hiera import FastHieraBlock
    from sam_fast.ops.dilated_attention_cpu import compute_dtype, fused_bias_kernel

    cpu_rules(epilogue_min_bytes=0)  # the epilogues at these tiny widths too
    base = _image_encoder(name)
    enc = copy.deepcopy(base).to(dtype)
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(3))  # (the op tests cover batches)
    state = {k: v.clone() for k, v in enc.state_dict().items()}
    blocks = len(base.trunk.blocks)
    with torch.no_grad():
        ref = enc(x.to(dtype))
        exact = copy.deepcopy(base).double()(x.double())
        same_precision = base(x) if dtype == torch.float32 else ref
        handle = sam_fast.apply(enc, sam_fast.SamFastConfig())
        assert collections.Counter(type(m) for m in enc.modules())[FastHieraBlock] == blocks
        assert len(handle.swapped) == blocks and handle.swapped[0] == "trunk.blocks.0"
        got = enc.state_dict()
        assert list(got) == list(state) and all(torch.equal(got[k], v) for k, v in state.items())
        with sam_fast.record_backends() as rec:
            out = enc(x.to(dtype))
        for key in ("vision_features", "backbone_fpn", "vision_pos_enc"):
            outs, wants, sames, refs = ([r[key]] if torch.is_tensor(r[key]) else r[key]
                                        for r in (out, exact, same_precision, ref))
            assert len(outs) == len(wants) >= 1
            for i, (o, e, s, r) in enumerate(zip(outs, wants, sames, refs)):
                assert o.shape == e.shape and o.dtype == r.dtype  # (the neck's top-down sums are float32)
                check_against_reference(f"Hiera {name} {dtype} {key}[{i}]", o.double(), e, s.double(), dtype,
                                        FWD_FACTOR)
        kernel = compute_dtype(dtype) == dtype and fused_bias_kernel()
        assert sum(op == "hiera_attention" for op, _ in rec.calls) == (blocks if kernel else 0)
        if kernel:
            assert rec.backends() >= {"cpu"} and "reference" not in rec.backends()
        if kernel and dtype == torch.float32:  # proj (with its residual), fc1 (+ GELU), fc2 (+ residual) per block
            assert sum(op == "fused_linear" for op, _ in rec.calls) == 3 * blocks
        handle.undo()
        assert not any(isinstance(m, FastHieraBlock) for m in enc.modules())
        again = enc(x.to(dtype))
        assert all(torch.equal(a, b) for a, b in zip(again["backbone_fpn"], ref["backbone_fpn"]))


def test_fast_blocks_fall_back_where_they_would_change_something():
    """Training mode, autograd, a hook on a layer the fast block skips and a device or backend without the kernel run
    the original forward (the same numbers, bit for bit, where nothing else differs); a configuration that Meta's
    block itself rejects fails as it does. Re-applying takes the new backend, and undo restores the old one."""
    from sam_fast.nn.hiera import FastHieraBlock

    model = _hiera("t")
    twin = copy.deepcopy(model)
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    with sam_fast.apply(model, sam_fast.SamFastConfig()):
        model.train()
        twin.train()
        with sam_fast.record_backends() as rec:
            assert all(torch.equal(a, b) for a, b in zip(model(x), twin(x)))  # training: the original forward
        assert not rec.calls
        model.eval()
        twin.eval()
        with sam_fast.record_backends() as rec:
            a, b = model(x.requires_grad_()), twin(x)
        assert all(torch.equal(p, q) for p, q in zip(a, b)) and not rec.calls  # autograd recording
        x = x.detach()
        seen = []
        block = model.blocks[1]
        handle = block.mlp.layers[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
        with torch.no_grad():
            model(x)
        handle.remove()
        assert seen == [(1, 16, 16, 192)]  # the hooked layer was called as a module
        with torch.no_grad(), sam_fast.record_backends() as rec:
            model(x)
        assert {op for op, _ in rec.calls} >= {"hiera_attention"}
        again = sam_fast.apply(model, sam_fast.SamFastConfig(backend="reference"))
        assert {blk.backend for blk in model.blocks} == {"reference"}
        with torch.no_grad(), sam_fast.record_backends() as rec:
            model(x)
        assert rec.backends() == {"reference"}
        again.undo()
        assert {blk.backend for blk in model.blocks} == {"auto"}
        assert all(isinstance(blk, FastHieraBlock) for blk in model.blocks)
    assert not any(isinstance(m, FastHieraBlock) for m in model.modules())

    # Meta's block cannot re-partition a pooled grid into another number of windows (window 3 pooled by 2): the fast
    # block does not invent an answer, it fails as the original does
    hieradet = pytest.importorskip("sam2.modeling.backbones.hieradet")
    bad = hieradet.Hiera(embed_dim=16, num_heads=1, stages=(1, 1, 1, 1), window_spec=(4, 4, 3, 2),
                         global_att_blocks=(), window_pos_embed_bkg_spatial_size=(4, 4)).eval()
    with torch.no_grad(), pytest.raises(RuntimeError) as theirs:
        bad(torch.zeros(1, 3, 96, 96))
    with torch.no_grad(), sam_fast.apply(bad, sam_fast.SamFastConfig()), pytest.raises(RuntimeError) as ours:
        bad(torch.zeros(1, 3, 96, 96))
    assert str(ours.value) == str(theirs.value)


def test_triton_backend_runs_metas_hiera(device):
    """backend="triton" (on the CPU under the interpreter, on a GPU as "auto" chooses it): every block's attention
    through the Triton kernel, the trunk's every level as Meta's computes it."""
    model = _hiera("t").to(device)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6)).to(device)
    with torch.no_grad():
        ref = model(x)
        with sam_fast.apply(model, sam_fast.SamFastConfig(backend="triton" if device.type == "cpu" else "auto")):
            with sam_fast.record_backends() as rec:
                out = model(x)
    assert [c for c in rec.calls if c[0] == "hiera_attention"] == [("hiera_attention", "triton")] * len(model.blocks)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_what_hiera_does_not_take_is_refused():
    """Dilated patterns and int8 are refused for a Hiera encoder with errors that say so, and a refused apply leaves
    the model as it was."""
    model = _hiera("t")
    blocks = list(model.blocks)
    dilated = sam_fast.Dilated([sam_fast.Branch((4, 4))], "all")
    for config, match in ((sam_fast.SamFastConfig(dilated), "dilated"),
                          (sam_fast.SamFastConfig(quantize="int8"), "quantize='int8' does not cover SAM 2's Hiera")):
        with pytest.raises(ValueError, match=match):
            sam_fast.apply(model, config)
        assert list(model.blocks) == blocks


def test_sam2_benchmark_times_both_peers(tmp_path):
    """bench_sam2 (in process, small images) times Meta's encoder and sam_fast's in every dtype, and sam_fast's
    features agree with Meta's float32 ones."""
    pytest.importorskip("sam2")
    from sam_fast.bench import bench_sam2

    rows, png = bench_sam2.run(str(tmp_path), quick=True, size="128")
    assert png and (tmp_path / "bench_sam2.csv").exists()
    by = {(r["case"], r["backend"]): r for r in rows}
    assert {b for _, b in by} == {"sam2", "sam_fast(cpu)"} and all(r["value"] > 0 for r in rows)
    assert all(r["max_err"] < (1e-4 if "float32" in case else 5e-2) for (case, _), r in by.items())
    with pytest.raises(ValueError, match="--models"):
        bench_sam2.run(str(tmp_path), models="hiera_xl")


# --- SAM 2 checkpoints: load_sam, inspect, and the commands that do not take them yet -------------------------------

@pytest.fixture(scope="module")
def sam2_checkpoint(tmp_path_factory):
    """Meta's SAM 2.1 Hiera-T (random weights) saved as Meta's release is: ``{"model": state_dict}``."""
    pytest.importorskip("sam2")
    from sam_fast.models.sam2 import build_sam2

    model = build_sam2("sam2.1_hiera_t")
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": model.state_dict()}, path)
    return path, model


def test_load_sam_reads_metas_sam2_checkpoint_and_apply_runs_it(sam2_checkpoint):
    """load_sam builds Meta's SAM2Base of the checkpoint's size and version with every tensor as saved; apply swaps
    its Hiera blocks and forward_image's features match the model as loaded."""
    from sam_fast.models.sam2 import sam2_model_type

    path, model = sam2_checkpoint
    sam = sam_fast.load_sam(str(path))
    assert type(sam).__name__ == "SAM2Base" and not sam.training
    want, got = model.state_dict(), sam.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert sam2_model_type(want) == "sam2.1_hiera_t"
    assert sam2_model_type({k: v for k, v in want.items() if k != "no_obj_embed_spatial"}) == "sam2_hiera_t"
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = sam.forward_image(x)
        with sam_fast.apply(sam, sam_fast.SamFastConfig()) as handle:
            assert len(handle.swapped) == len(sam.image_encoder.trunk.blocks) == 12
            out = sam.forward_image(x)
    for a, b in zip(out["backbone_fpn"], ref["backbone_fpn"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_tampered_or_foreign_sam2_checkpoints_get_clear_errors(sam2_checkpoint, tmp_path):
    path, model = sam2_checkpoint
    state = model.state_dict()
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "sam_mask_decoder.iou_token.weight"},
                    "does not match sam2.1_hiera_t .*1 missing keys .*iou_token"),
        "shape": (dict(state, **{"sam_mask_decoder.iou_token.weight": torch.zeros(1, 128)}),
                  "1 shape mismatches \\(e.g. sam_mask_decoder.iou_token.weight: checkpoint \\(1, 128\\)"),
        "size": ({k: v for k, v in state.items() if not k.startswith("image_encoder.trunk.blocks.11.")},
                 "Hiera trunk \\(96 wide, 11 blocks\\) is none of SAM 2's released ones"),
    }
    for name, (tampered, match) in cases.items():
        torch.save({"model": tampered}, tmp_path / f"{name}.pt")
        with pytest.raises(ValueError, match=match):
            sam_fast.load_sam(str(tmp_path / f"{name}.pt"))
    with pytest.raises(ValueError, match="is a SAM 2 checkpoint \\(sam2.1_hiera_t\\), not a vit_b one"):
        sam_fast.load_sam(str(path), "vit_b")


def test_cli_inspects_and_segments_sam2_and_refuses_it_where_not_built(sam2_checkpoint, tmp_path, capsys):
    import json

    from sam_fast.cli import main

    path, _ = sam2_checkpoint
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "family: SAM 2 (sam2.1_hiera_t)" in out and "[5, 7, 9]" in out and "swaps 12 Hiera blocks" in out
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    # segment: a point and a box (SAM 2's predictor), then everything (its mask generator), COCO records out
    assert main(["segment", str(image), "--checkpoint", str(path), "--model-type", "auto", "--points", "4,4",
                 "--box", "2,2,20,25", "--out", str(tmp_path / "out")]) == 0
    records = json.loads((tmp_path / "out" / "x.json").read_text())["annotations"]
    assert len(records) == 1 and records[0]["box_prompt"] == [2.0, 2.0, 20.0, 25.0]
    assert records[0]["segmentation"]["size"] == [32, 32] and (tmp_path / "out" / "x.png").exists()
    assert main(["segment", str(image), "--checkpoint", str(path), "--model-type", "auto", "--everything",
                 "--points-per-side", "2",
                 "--out", str(tmp_path / "all")]) == 0
    assert "wrote 1 of 1 image(s)" in capsys.readouterr().out
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "e.onnx")]) == 2
    assert "sam-fast export takes SAM 1-family models" in capsys.readouterr().err


# --- transformers' SAM 2 -------------------------------------------------------------------------------------------

def _transformers_sam2_vision(seed=0):
    """transformers' Sam2VisionModel with a small Hiera (4 stages, a global block, windows that pad, every stage
    change pooling queries, head dim 24 then 48) at 128 px, random weights far from zero."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    backbone = transformers.Sam2HieraDetConfig(
        hidden_size=24, num_attention_heads=1, image_size=128, blocks_per_stage=[1, 2, 2, 1],
        embed_dim_per_stage=[24, 48, 96, 192], num_attention_heads_per_stage=[1, 2, 2, 4],
        window_size_per_stage=[8, 4, 6, 3], global_attention_blocks=[4],
        window_positional_embedding_background_size=[4, 4])
    config = transformers.Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=[192, 96, 48, 24],
                                           backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]], fpn_hidden_size=32)
    model = transformers.Sam2VisionModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2 if p.dim() > 1 else 0.5)
    return model


def test_apply_computes_transformers_sam2_vision_model():
    """apply on transformers' Sam2VisionModel gives each Sam2MultiScaleBlock sam_fast's forward (the layer objects
    stay): the same hidden states and FPN levels, every block's attention through sam_fast's kernel; hidden states
    are still returned on request, attention weights are refused (the kernels never form them); undo restores the
    class's forward."""
    model = _transformers_sam2_vision()
    layers = list(model.backbone.blocks)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(pixel_values=x, output_hidden_states=True)
        handle = sam_fast.apply(model, sam_fast.SamFastConfig())
        assert list(model.backbone.blocks) == layers and len(handle.swapped) == len(layers)
        with sam_fast.record_backends() as rec:
            out = model(pixel_values=x, output_hidden_states=True)
        assert sum(op == "hiera_attention" for op, _ in rec.calls) == len(layers)
        for name in ("last_hidden_state", "fpn_hidden_states", "hidden_states"):
            got, want = getattr(out, name), getattr(ref, name)
            got, want = ([got], [want]) if torch.is_tensor(got) else (got, want)
            assert len(got) == len(want) >= 1, name
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
        with pytest.raises(ValueError, match="output_attentions=True"):
            model(pixel_values=x, output_attentions=True)
        handle.undo()
        assert all("forward" not in layer.__dict__ for layer in layers)
        again = model(pixel_values=x)
    assert torch.equal(again.last_hidden_state, ref.last_hidden_state)


def test_metas_image_predictor_runs_the_patched_encoder(sam2_checkpoint):
    """SAM2ImagePredictor on a model after apply (the encoder patched, Meta's decoder as it is): its image features
    (the embedding and both high-resolution levels) and the logits it predicts for a point and a box match the
    unpatched model's."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    path, _ = sam2_checkpoint
    sam = sam_fast.load_sam(str(path))
    image = (torch.rand(200, 300, 3, generator=torch.Generator().manual_seed(8)) * 255).byte().numpy()
    prompts = dict(point_coords=np.array([[120.0, 80.0]]), point_labels=np.array([1]),
                   box=np.array([40.0, 30.0, 250.0, 180.0]), return_logits=True)
    results = []
    for patched in (False, True):
        predictor = SAM2ImagePredictor(sam)
        with sam_fast.apply(sam, sam_fast.SamFastConfig()) if patched else contextlib.nullcontext():
            with sam_fast.record_backends() as rec:
                predictor.set_image(image)
            results.append((predictor._features, predictor.predict(**prompts)))
        assert sum(op == "hiera_attention" for op, _ in rec.calls) == (12 if patched else 0)
    (ref_feats, ref_out), (feats, out) = results
    for a, b in zip([feats["image_embed"], *feats["high_res_feats"]],
                    [ref_feats["image_embed"], *ref_feats["high_res_feats"]]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    logits, want = out[0], ref_out[0]
    assert logits.shape == want.shape == (3, 200, 300)
    assert np.abs(logits - want).max() <= 1e-3 * np.abs(want).max()
    np.testing.assert_allclose(out[1], ref_out[1], rtol=1e-3, atol=1e-4)  # the IoU predictions
