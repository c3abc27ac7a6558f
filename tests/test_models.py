"""Model loaders: SlimSAM's uniform and globally pruned encoders, geometry read from checkpoints, and the
sam_fast swaps (fused attention at head dims 14 / 8, W8A8) on a per-block pruned encoder."""

import pytest
import skimage.data
import torch
import torch.nn.functional as F

import sam_fast
from sam_fast import SamFastConfig
from sam_fast.checkpoint import load_sam
from sam_fast.models import build_sam
from sam_fast.models.sam import known_model_type
from sam_fast.models.vit import (
    BlockGeometry,
    EncoderGeometry,
    MlpBlock,
    build_sam_from_geometry,
    encoder_geometry,
    normalize_state_dict,
    slimsam_uniform_geometry,
)
from sam_fast.quantize import calibrate, prepare_image, sqnr_db
from sam_fast.testing import INT8_EMBEDDING_MIN_SQNR_DB, check_against_reference

# A SlimSAM-like globally pruned encoder at test size: embed 42, each block its own heads x head dim and
# MLP width (head dim 14 as SlimSAM-77's), windows of 3 on an 8 x 8 grid (padded) and two global blocks.
PRUNED = EncoderGeometry(img_size=128, patch_size=16, embed_dim=42, out_chans=32, blocks=(
    BlockGeometry(3, 14, 100, 3), BlockGeometry(2, 8, 60, 0), BlockGeometry(3, 14, 84, 3), BlockGeometry(1, 16, 40, 0)))
DECODER = dict(decoder_dim=32, decoder_heads=2, decoder_mlp_dim=64, iou_hidden=32)
IMAGES = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]


def _randomized(sam, seed=0):
    """Random weights everywhere, rel-pos tables and position embedding included (SAM zero-inits them)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if name.startswith("image_encoder."):
                p.copy_(torch.randn(p.shape, generator=gen) * (0.2 if p.dim() < 2 or "rel_pos" in name
                                                               else p.shape[-1] ** -0.5))
    return sam.eval()


def _slimsam_format(state):
    """A state_dict as SlimSAM's training code holds it: DataParallel-wrapped image encoder, split q/k/v."""
    out = {}
    for key, value in state.items():
        if key.startswith("image_encoder."):
            key = "image_encoder.module." + key[len("image_encoder."):]
        if ".attn.qkv." in key:
            for name, part in zip("qkv", value.chunk(3, 0)):
                out[key.replace(".attn.qkv.", f".attn.{name}.")] = part.clone()
        else:
            out[key] = value
    return out


def _layer_norm_2d(x, w, b):
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w, b, 1e-6).permute(0, 3, 1, 2)


def _pruned_encoder_reference(state, geom, x):
    """The pruned encoder computed straight from a SlimSAM-format state_dict: q, k, v linears of each
    block's own width, softmax scale head_dim ** -0.5 of the pruned head dim, SAM's windows and rel-pos."""
    from segment_anything.modeling.image_encoder import add_decomposed_rel_pos, window_partition, window_unpartition

    p = "image_encoder.module."
    x = F.conv2d(x, state[p + "patch_embed.proj.weight"], state[p + "patch_embed.proj.bias"], stride=geom.patch_size)
    x = x.permute(0, 2, 3, 1) + state[p + "pos_embed"]
    E = geom.embed_dim
    for i, g in enumerate(geom.blocks):
        b = f"{p}blocks.{i}."
        if g.num_heads == 0:  # DC-ViT: attention removed, only the (narrowed) MLP
            m = F.layer_norm(x, (E,), state[b + "norm2.weight"], state[b + "norm2.bias"], 1e-6)
            m = F.gelu(F.linear(m, state[b + "mlp.lin1.weight"], state[b + "mlp.lin1.bias"]))
            x = x + F.linear(m, state[b + "mlp.lin2.weight"], state[b + "mlp.lin2.bias"])
            continue
        h = F.layer_norm(x, (E,), state[b + "norm1.weight"], state[b + "norm1.bias"], 1e-6)
        if g.window_size:
            H, W = h.shape[1:3]
            h, pad = window_partition(h, g.window_size)
        n, hh, ww, _ = h.shape

        def heads(name):
            y = F.linear(h, state[b + f"attn.{name}.weight"], state[b + f"attn.{name}.bias"])
            return y.reshape(n, hh * ww, g.num_heads, g.head_dim).transpose(1, 2).reshape(-1, hh * ww, g.head_dim)

        q, k, v = heads("q"), heads("k"), heads("v")
        attn = (q * g.head_dim ** -0.5) @ k.transpose(-2, -1)
        attn = add_decomposed_rel_pos(attn, q, state[b + "attn.rel_pos_h"], state[b + "attn.rel_pos_w"],
                                      (hh, ww), (hh, ww))
        o = (attn.softmax(-1) @ v).reshape(n, g.num_heads, hh, ww, g.head_dim).permute(0, 2, 3, 1, 4)
        o = F.linear(o.reshape(n, hh, ww, -1), state[b + "attn.proj.weight"], state[b + "attn.proj.bias"])
        if g.window_size:
            o = window_unpartition(o, g.window_size, pad, (H, W))
        x = x + o
        m = F.layer_norm(x, (E,), state[b + "norm2.weight"], state[b + "norm2.bias"], 1e-6)
        m = F.gelu(F.linear(m, state[b + "mlp.lin1.weight"], state[b + "mlp.lin1.bias"]))
        x = x + F.linear(m, state[b + "mlp.lin2.weight"], state[b + "mlp.lin2.bias"])
    y = _layer_norm_2d(F.conv2d(x.permute(0, 3, 1, 2), state[p + "neck.0.weight"]),
                       state[p + "neck.1.weight"], state[p + "neck.1.bias"])
    y = F.conv2d(y, state[p + "neck.2.weight"], padding=1)
    return _layer_norm_2d(y, state[p + "neck.3.weight"], state[p + "neck.3.bias"])


def _images(enc, images):
    from sam_fast.surgery import PIXEL_MEAN, PIXEL_STD

    return torch.cat([prepare_image(im, enc.img_size, PIXEL_MEAN, PIXEL_STD, "cpu", torch.float32)
                      for im in images])


def _int8_then_undo(model, enc, x, cal, ref):
    """Exact attention + calibrated W8A8 on ``model`` (Triton), the embedding of ``x``, then ``undo()``,
    which must give back ``ref`` bit for bit. Returns (embedding, backend record, handle)."""
    handle = sam_fast.apply(model, SamFastConfig(attention="exact", backend="triton", quantize="int8",
                                                 calibration=cal))
    with sam_fast.record_backends() as rec:
        out = enc(x)
    handle.undo()
    assert torch.equal(enc(x), ref)
    return out, rec, handle


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """(loaded Sam, the SlimSAM-format state_dict it was loaded from)."""
    source = _randomized(build_sam_from_geometry(PRUNED, **DECODER))
    state = _slimsam_format(source.state_dict())
    path = tmp_path_factory.mktemp("slimsam") / "slimsam_global.pth"
    torch.save(state, path)
    return load_sam(str(path), "auto", decoder_heads=DECODER["decoder_heads"]), state


def test_globally_pruned_loads_per_block_geometry(pruned):
    sam, state = pruned
    assert encoder_geometry(sam.state_dict()) == PRUNED and not PRUNED.uniform
    assert known_model_type(PRUNED) is None
    for blk, g in zip(sam.image_encoder.blocks, PRUNED.blocks):
        assert blk.attn.num_heads == g.num_heads and blk.attn.scale == g.head_dim ** -0.5
        assert blk.attn.qkv.out_features == 3 * g.num_heads * g.head_dim and blk.mlp.lin1.out_features == g.mlp_dim
        assert blk.window_size == g.window_size
    # q, k, v concatenated into qkv in segment_anything's order, every other tensor as saved
    converted = normalize_state_dict(state)
    loaded = sam.state_dict()
    assert set(converted) == set(loaded)
    assert all(torch.equal(loaded[k], v) for k, v in converted.items())
    q = state["image_encoder.module.blocks.2.attn.q.weight"]
    assert torch.equal(loaded["image_encoder.blocks.2.attn.qkv.weight"][: q.shape[0]], q)


def test_globally_pruned_matches_slimsam_forward(pruned):
    sam, state = pruned
    x = _images(sam.image_encoder, IMAGES[:2])
    with torch.no_grad():
        out = sam.image_encoder(x)
        ref = _pruned_encoder_reference({k: v.double() for k, v in state.items()}, PRUNED, x.double())
    # fp32 against the float64 computation from the SlimSAM-format weights: agreement to fp32 rounding
    assert float((out.double() - ref).abs().max()) < 1e-5 * float(ref.abs().max())


def test_pruned_encoder_fused_attention_and_int8(pruned):
    """The swaps run on per-block pruned widths: head dims 14, 8 and 16 through the Triton attention
    kernel (interpreter), W8A8 with calibration; undo() restores the float model bit for bit."""
    sam, state = pruned
    enc = sam.image_encoder
    x = _images(enc, IMAGES[:1])
    with torch.no_grad():
        ref = enc(x)
        exact = _pruned_encoder_reference({k: v.double() for k, v in state.items()}, PRUNED, x.double())
        with sam_fast.apply(enc, SamFastConfig(attention="exact", backend="triton")):
            with sam_fast.record_backends() as rec:
                fused = enc(x)
        assert rec.backends("dilated_attention") == {"triton"} and not rec.fallbacks
        # the tolerance rule of docs/maintainers/design.md: within 2x of segment_anything's own fp32 error against
        # float64
        check_against_reference("fused attention", fused, exact, ref, torch.float32, 2.0)
        cal = calibrate(enc, IMAGES, num_images=3, progress=False)
        assert set(cal.layers) == {f"blocks.{i}.{r}" for i in range(4)
                                   for r in ("attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2")}
        out, rec, handle = _int8_then_undo(sam, enc, x, cal, ref)
    assert rec.backends("int8_linear") == {"triton"} and not rec.fallbacks
    assert len(handle.left_float) + sum(op == "int8_linear" for op, _ in rec.calls) == 16
    assert sqnr_db(fused, out) >= INT8_EMBEDDING_MIN_SQNR_DB


@pytest.mark.parametrize("model_type,embed,head_dim,mlp", [("slimsam_50", 384, 32, 1536),
                                                            ("slimsam_77", 168, 14, 696)])
def test_slimsam_uniform(tmp_path, model_type, embed, head_dim, mlp):
    sam = build_sam(model_type)
    geom = encoder_geometry(sam.state_dict())
    assert geom == slimsam_uniform_geometry(model_type) and geom.uniform
    assert known_model_type(geom) == model_type
    assert geom.global_attn_indexes == (2, 5, 8, 11) and {b.window_size for b in geom.blocks} == {0, 14}
    blk = sam.image_encoder.blocks[0]
    assert (blk.attn.qkv.out_features, blk.mlp.lin1.out_features, blk.attn.rel_pos_h.shape[1]) == \
        (3 * embed, mlp, head_dim)
    path = tmp_path / f"{model_type}.pth"
    torch.save(sam.state_dict(), path)
    for kind in (model_type, "auto"):
        loaded = load_sam(str(path), kind)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), sam.state_dict().values()))
    with pytest.raises(ValueError, match=f"does not match model type vit_b.*looks like a {model_type}"):
        load_sam(str(path), "vit_b")


def test_loader_errors(pruned, tmp_path):
    sam, state = pruned
    path = tmp_path / "pruned.pth"
    torch.save(state, path)
    # a per-block pruned checkpoint under a fixed type: told what differs and to use "auto"
    with pytest.raises(ValueError, match="does not match model type slimsam_77.*try model_type='auto'"):
        load_sam(str(path), "slimsam_77")
    # a decoder narrower than SAM's needs its head count
    with pytest.raises(ValueError, match="32-wide mask decoder.*decoder_heads"):
        load_sam(str(path), "auto")
    with pytest.raises(ValueError, match="decoder_heads"):
        load_sam(str(path), "auto", decoder_heads=0)
    with pytest.raises(ValueError, match="decoder_heads applies to model_type='auto' only"):
        load_sam(str(path), "slimsam_77", decoder_heads=2)
    broken = dict(state)
    broken.pop("image_encoder.module.blocks.1.attn.k.bias")
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.q/v\.bias but not all of q, k, v"):
        normalize_state_dict(broken)
    both = dict(state, **{"image_encoder.blocks.0.attn.qkv.weight": torch.zeros(126, 42)})
    with pytest.raises(ValueError, match="both image_encoder.blocks.0.attn.qkv.weight and split"):
        normalize_state_dict(both)
    plain = normalize_state_dict(state)
    no_rel = {k: v for k, v in plain.items() if "rel_pos" not in k}
    with pytest.raises(ValueError, match="pass num_heads"):
        encoder_geometry(no_rel)
    geom = encoder_geometry({k: v for k, v in no_rel.items() if ".blocks.1." not in k and ".blocks.3." not in k},
                            num_heads=3)
    assert len(geom.blocks) == 1 and not geom.use_rel_pos and geom.blocks[0].head_dim == 14
    with pytest.raises(ValueError, match=r"num_heads=2 but image_encoder\.blocks\.0\.attn has 3 heads"):
        encoder_geometry(plain, num_heads=2)
    lopsided = dict(plain, **{"image_encoder.blocks.2.mlp.lin1.weight": torch.zeros(84, 40)})
    with pytest.raises(ValueError, match=r"blocks\.2\.attn\.qkv\.weight .* do not fit embed dim 42"):
        encoder_geometry(lopsided)
    with pytest.raises(ValueError, match="no image_encoder.patch_embed.proj.weight"):
        encoder_geometry({})
    headless = tmp_path / "headless.pth"
    torch.save({k: v for k, v in plain.items() if k.startswith("image_encoder.")}, headless)
    with pytest.raises(ValueError, match="cannot read a SAM mask decoder"):
        load_sam(str(headless), "auto")
    pickled = tmp_path / "whole_model.pth"
    torch.save(sam, pickled)
    with pytest.raises(ValueError, match="whole pickled model .* state_dict"):
        load_sam(str(pickled), "auto")
    with pytest.raises(ValueError, match="auto needs a checkpoint"):
        build_sam("auto")


# DC-ViT: the attention of blocks 1 and 3 removed and their MLPs narrowed; blocks 0 and 2 as SlimSAM's.
DCVIT = EncoderGeometry(img_size=128, patch_size=16, embed_dim=42, out_chans=32, blocks=(
    BlockGeometry(3, 14, 100, 3), BlockGeometry(0, 0, 50, 0), BlockGeometry(2, 8, 60, 0), BlockGeometry(0, 0, 30, 0)))


def test_dcvit_attention_free_blocks(tmp_path):
    source = _randomized(build_sam_from_geometry(DCVIT, **DECODER), seed=2)
    state = _slimsam_format(source.state_dict())
    assert not any(k.startswith(("image_encoder.module.blocks.1.attn", "image_encoder.module.blocks.1.norm1"))
                   for k in state)
    path = tmp_path / "dcvit.pth"
    torch.save(state, path)
    sam = load_sam(str(path), "auto", decoder_heads=DECODER["decoder_heads"])
    enc = sam.image_encoder
    assert encoder_geometry(sam.state_dict()) == DCVIT and DCVIT.global_attn_indexes == (2,)
    assert [type(b) is MlpBlock for b in enc.blocks] == [False, True, False, True]
    x = _images(enc, IMAGES[:1])
    with torch.no_grad():
        ref = enc(x)
        exact = _pruned_encoder_reference({k: v.double() for k, v in state.items()}, DCVIT, x.double())
        assert float((ref.double() - exact).abs().max()) < 1e-5 * float(exact.abs().max())
        cal = calibrate(sam, IMAGES, num_images=3, progress=False)
        assert list(cal.layers) == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.lin1", "blocks.0.mlp.lin2",
                                    "blocks.1.mlp.lin1", "blocks.1.mlp.lin2", "blocks.2.attn.qkv", "blocks.2.attn.proj",
                                    "blocks.2.mlp.lin1", "blocks.2.mlp.lin2", "blocks.3.mlp.lin1", "blocks.3.mlp.lin2"]
        with sam_fast.apply(sam, SamFastConfig(attention="exact", backend="triton")):
            fused = enc(x)
        out, rec, _ = _int8_then_undo(sam, enc, x, cal, ref)
    check_against_reference("fused attention", fused, exact, ref, torch.float32, 2.0)
    assert rec.backends() == {"triton"} and not rec.fallbacks
    assert sum(op == "dilated_attention" for op, _ in rec.calls) == 2  # blocks 0 and 2 only
    # LN-quantize: qkv and lin1 of the two attention blocks, lin1 of the two MLP-only blocks
    assert sum(op == "layer_norm_quantize" for op, _ in rec.calls) == 2 * 2 + 2
    assert sum(op == "int8_linear" for op, _ in rec.calls) == 4 * 2 + 2 * 2
    assert sqnr_db(fused, out) >= INT8_EMBEDDING_MIN_SQNR_DB


def test_inspect_command(tmp_path, capsys):
    from sam_fast.cli import main

    source = _randomized(build_sam_from_geometry(DCVIT, **DECODER), seed=4)
    path = tmp_path / "dcvit.pth"
    torch.save(_slimsam_format(source.state_dict()), path)
    assert main(["inspect", str(path), "--decoder-heads", "2"]) == 0
    out = capsys.readouterr().out
    assert "family: DC-ViT-compressed SAM ViT" in out and "embed 42, 4 blocks" in out
    assert "none (DC-ViT)" in out and "window 3" in out and "global" in out
    assert 'fuse the attention of 2 blocks (head dims [8, 14])' in out
    assert 'swaps 12 of 12 linears' in out
    uniform = tmp_path / "slim77.pth"
    torch.save(build_sam("slimsam_77").state_dict(), uniform)
    assert main(["inspect", str(uniform)]) == 0
    out = capsys.readouterr().out
    assert "family: slimsam_77" in out and "(head dims [14])" in out
    assert main(["inspect", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth does not exist" in capsys.readouterr().err
