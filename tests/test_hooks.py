"""Module hooks on patched models run as they do on the original model (sam_fast._hooks).

The fused CPU paths compute a block's linears from their weights (the bias / GELU / residual epilogue, the qkv GEMM
whose bias the attention kernel adds, the LayerNorm fused into int8 quantisation) and write into fresh outputs in
place. Each test forces those paths on a tiny encoder (the 2 MiB gate lowered), registers hooks, and compares with
segment_anything's own encoder under the same hooks.
"""

import warnings

import pytest
import torch
from torch import nn

import sam_fast
from sam_fast.models import tiny_image_encoder
from sam_fast.quantize import calibrate


@pytest.fixture
def fused_everywhere(cpu_rules):
    """The fused CPU epilogues on the tiny test models too (they start at 2 MiB outputs)."""
    cpu_rules(epilogue_min_bytes=0)


def _encoder(seed=0):
    torch.manual_seed(seed)
    enc = tiny_image_encoder(img_size=128, embed_dim=64, num_heads=2, depth=2, window_size=3,
                             global_attn_indexes=(1,)).eval()
    for p in enc.parameters():  # real-scale weights, so that a changed layer shows in the embedding
        if p.dim() > 1:
            nn.init.normal_(p, std=0.05)
    return enc


def _x(seed=1):
    return torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(seed))


def _layers(enc, i=0):
    b = enc.blocks[i]
    return {"norm1": b.norm1, "qkv": b.attn.qkv, "proj": b.attn.proj, "norm2": b.norm2, "lin1": b.mlp.lin1,
            "act": b.mlp.act, "lin2": b.mlp.lin2}


def _run_with_hooks(enc, x, names, pre=False):
    """Run enc(x) with a recording forward hook (or pre-hook) on each named layer of block 0; returns
    (output, {name: [input shapes seen]})."""
    seen = {n: [] for n in names}
    handles = []
    for n in names:
        mod = _layers(enc)[n]
        if pre:
            handles.append(mod.register_forward_pre_hook(lambda m, args, n=n: seen[n].append(tuple(args[0].shape))))
        else:
            handles.append(mod.register_forward_hook(lambda m, args, out, n=n: seen[n].append(tuple(args[0].shape))))
    try:
        with torch.no_grad():
            out = enc(x)
    finally:
        for h in handles:
            h.remove()
    return out, seen


@pytest.mark.parametrize("pre", [False, True], ids=["forward_hook", "pre_hook"])
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_hooks_on_block_layers_run_after_apply(fused_everywhere, pre, quantize):
    enc = _encoder()
    x = _x()
    names = list(_layers(enc))
    _, want = _run_with_hooks(enc, x, names, pre)
    assert all(len(v) == 1 for v in want.values())
    with sam_fast.apply(enc, sam_fast.SamFastConfig(attention="exact", quantize=quantize)):
        _, got = _run_with_hooks(enc, x, names, pre)
    assert got == want


def test_output_changing_hook_is_honoured(fused_everywhere):
    """A hook that returns a new output (here: lin2's output scaled) changes the patched encoder exactly as it
    changes segment_anything's (the fused epilogue would have skipped it)."""
    enc = _encoder()
    x = _x()
    with torch.no_grad():
        plain = enc(x)
        h = enc.blocks[0].mlp.lin2.register_forward_hook(lambda m, args, out: out * 3.0)
        want = enc(x)
        h.remove()
        assert (want - plain).abs().max() > 0.1 * plain.abs().max()  # the hook matters
        with sam_fast.apply(enc, sam_fast.SamFastConfig(attention="exact")):
            h = enc.blocks[0].mlp.lin2.register_forward_hook(lambda m, args, out: out * 3.0)
            got = enc(x)
            h.remove()
            again = enc(x)  # without the hook: the fused path again
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, plain, rtol=1e-4, atol=1e-4)


def test_outputs_kept_by_a_hook_are_not_written_afterwards(fused_everywhere):
    """At inference the block adds the residual into its layers' fresh outputs in place; a hook that keeps an
    output must see it as the layer returned it."""
    enc = _encoder()
    x = _x()
    kept = {}
    for n in ("proj", "lin1", "lin2"):
        _layers(enc)[n].register_forward_hook(lambda m, args, out, n=n: kept.__setitem__(n, (out, out.clone())))
    with sam_fast.apply(enc, sam_fast.SamFastConfig(attention="exact")), torch.no_grad():
        enc(x)
    assert set(kept) == {"proj", "lin1", "lin2"}
    for n, (out, copy) in kept.items():
        assert torch.equal(out, copy), n


def test_hooks_registered_before_apply_survive_it(fused_everywhere):
    """apply() swaps blocks and linears for new modules: they take over the originals' hooks (the same
    dictionaries, so the user's handles still remove them), and undo() keeps hooks added meanwhile."""
    enc = _encoder()
    x = _x()
    calls = []
    h_block = enc.blocks[1].register_forward_hook(lambda m, a, o: calls.append("block"))
    h_lin = enc.blocks[1].attn.qkv.register_forward_pre_hook(lambda m, a: calls.append("qkv"))
    handle = sam_fast.apply(enc, sam_fast.SamFastConfig(attention="exact", quantize="int8"))
    assert type(enc.blocks[1]).__name__ == "SamFastBlock" and type(enc.blocks[1].attn.qkv).__name__ == "Int8Linear"
    with torch.no_grad():
        enc(x)
    assert calls == ["qkv", "block"]
    enc.blocks[1].register_forward_hook(lambda m, a, o: calls.append("added while patched"))
    h_lin.remove()
    calls.clear()
    with torch.no_grad():
        enc(x)
    assert calls == ["block", "added while patched"]
    handle.undo()
    calls.clear()
    with torch.no_grad():
        enc(x)
    assert calls == ["block", "added while patched"]
    h_block.remove()
    calls.clear()
    with torch.no_grad():
        enc(x)
    assert calls == ["added while patched"]


def test_hooked_attention_module_runs_the_blocks_own_forward(fused_everywhere):
    """The kernels never call the attn module: with hooks on it the block's own forward runs (the hook sees
    segment_anything's window partition), recorded and warned about as a fallback; a dilated block refuses."""
    enc = _encoder()
    x = _x()
    shapes = []
    enc.blocks[0].attn.register_forward_hook(lambda m, a, o: shapes.append(tuple(a[0].shape)))
    with torch.no_grad():
        want = enc(x)
    with sam_fast.apply(enc, sam_fast.SamFastConfig(attention="exact")), torch.no_grad():
        with sam_fast.record_backends() as rec, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = enc(x)
        assert ("sam_block", "reference") in rec.calls
        assert any("attn module has hooks" in str(w.message) for w in caught)
    assert shapes[0] == shapes[1] == (9, 3, 3, 64)  # 8 x 8 tokens padded to 9 x 9: nine 3 x 3 windows
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    config = sam_fast.SamFastConfig(attention=sam_fast.Dilated(sam_fast.Branch((4, 4), 2), blocks=[0]))
    with sam_fast.apply(enc, config), torch.no_grad(), pytest.raises(ValueError, match="dilated attention"):
        enc(x)


def test_global_module_hooks_see_every_layer(fused_everywhere):
    enc = _encoder()
    x = _x()
    names = []
    from torch.nn.modules.module import register_module_forward_hook

    lin = {id(m): n for n, m in enc.named_modules() if isinstance(m, nn.Linear)}
    h = register_module_forward_hook(lambda m, a, o: names.append(lin.get(id(m))))
    try:
        with torch.no_grad():
            enc(x)
        want = [n for n in names if n]
        names.clear()
        with sam_fast.apply(enc, sam_fast.SamFastConfig(attention="exact")), torch.no_grad():
            enc(x)
        assert [n for n in names if n] == want and len(want) == 8
    finally:
        h.remove()


def test_calibrate_on_a_patched_model_measures_every_layer(fused_everywhere):
    """calibrate() records each layer through forward hooks: on a model already given fused attention it finds
    what it finds on the plain model."""
    enc = _encoder()
    images = [torch.randn(3, 128, 128, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    plain = calibrate(enc, images, progress=False)
    with sam_fast.apply(enc, sam_fast.SamFastConfig(attention="exact")):
        patched = calibrate(enc, images, progress=False)
    assert set(plain.layers) == set(patched.layers) and len(plain.layers) == 8
    for key, e in plain.layers.items():
        p = patched.layers[key]
        assert e.act_amax > 0 and p.act_amax == pytest.approx(e.act_amax, rel=1e-4), key
        assert p.sqnr_dynamic_db == pytest.approx(e.sqnr_dynamic_db, abs=0.5), key
    assert patched.embedding_sqnr_db == pytest.approx(plain.embedding_sqnr_db, abs=0.5)


def test_hooks_on_transformers_layers_run(fused_everywhere):
    pytest.importorskip("transformers")
    from transformers import SamVisionConfig, SamVisionModel

    torch.manual_seed(0)
    cfg = SamVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=128, patch_size=16,
                          output_channels=32, window_size=3, global_attn_indexes=[1], mlp_dim=128)
    model = SamVisionModel(cfg).eval()
    x = _x()
    seen = []
    layer = model.vision_encoder.layers[0]
    for n in ("qkv", "proj"):
        getattr(layer.attn, n).register_forward_hook(lambda m, a, o, n=n: seen.append(n))
    layer.mlp.lin2.register_forward_hook(lambda m, a, o: seen.append("lin2"))
    with torch.no_grad():
        want = model(pixel_values=x).last_hidden_state
    expected = list(seen)
    seen.clear()
    with sam_fast.apply(model, sam_fast.SamFastConfig(attention="exact")), torch.no_grad():
        got = model(pixel_values=x).last_hidden_state
    assert expected == ["qkv", "proj", "lin2"] and seen == expected
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_hooks_on_the_mask_decoder_run_in_the_batched_decoder():
    """BatchedMaskDecoder computes the decoder from its weights; with a hook on any of the prompt encoder's or
    mask decoder's modules it runs segment_anything's modules instead (recorded as a fallback), with their
    hooks, and gives what segment_anything gives under the same hook."""
    from sam_fast.models import tiny_sam
    from sam_fast.nn.decoder import BatchedMaskDecoder

    sam = tiny_sam()
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(2, 32, 16, 16, generator=g)
    index = torch.tensor([1, 0, 1])
    coords, labels = torch.rand(3, 2, 2, generator=g) * 256, torch.ones(3, 2, dtype=torch.int64)
    calls = []
    h = sam.mask_decoder.iou_prediction_head.register_forward_hook(lambda m, a, o: calls.append(len(a[0])) or o + 1)
    dec = BatchedMaskDecoder.from_sam(sam)
    with torch.no_grad(), sam_fast.record_backends() as rec, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        low, iou = dec(emb, index, coords, labels)
    assert ("batched_mask_decoder", "reference") in rec.calls and sorted(calls) == [1, 2]
    with torch.no_grad():
        for p in range(3):
            sparse, dense = sam.prompt_encoder(points=(coords[p:p + 1], labels[p:p + 1]), boxes=None, masks=None)
            lo, io = sam.mask_decoder(emb[index[p]:index[p] + 1], sam.prompt_encoder.get_dense_pe(), sparse, dense,
                                      True)
            torch.testing.assert_close(low[p:p + 1], lo)
            torch.testing.assert_close(iou[p:p + 1], io)
    h.remove()
    with torch.no_grad(), sam_fast.record_backends() as rec:
        low2, iou2 = dec(emb, index, coords, labels)
    assert ("batched_mask_decoder", "reference") not in rec.calls
    torch.testing.assert_close(iou2 + 1, iou, rtol=1e-4, atol=1e-4)  # the hook's + 1, and nothing else
