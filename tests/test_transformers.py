"""transformers' SamModel / SamVisionModel / SamHQModel: sam_fast.apply on their vision layers, and SAM checkpoints
moving between transformers' format and segment_anything's (tiny random models built with transformers itself)."""

import pytest
import torch

import sam_fast
from sam_fast import Branch
from sam_fast.checkpoint import load_sam, save_transformers
from sam_fast.models import tiny_sam
from sam_fast.quantize import sqnr_db

transformers = pytest.importorskip("transformers")  # the optional extra; CI installs it with [dev]


def _configs(hidden=64, heads=2, mlp=256, window=3, image=256, layers=4, glob=(1, 3)):
    vision = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, image_size=image,
                  window_size=window, global_attn_indexes=list(glob), mlp_dim=mlp, output_channels=32,
                  num_pos_feats=16)
    prompt = dict(hidden_size=32, image_size=image, patch_size=16, mask_input_channels=16,
                  image_embedding_size=image // 16)
    decoder = dict(hidden_size=32, num_attention_heads=2, mlp_dim=64, iou_head_hidden_dim=64)
    return vision, prompt, decoder


def _randomize(model, seed=0):
    """transformers initialises linears with std 1e-10 (blocks would be near identities): real-scale weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            big = "rel_pos" in name or "pos_embed" in name or name.endswith("bias")
            p.copy_(torch.randn(p.shape, generator=gen) * (0.2 if big else 0.1))
    return model.eval()


def _sam_model(**kw):
    from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

    vision, prompt, decoder = _configs(**kw)
    return _randomize(SamModel(SamConfig(vision_config=SamVisionConfig(**vision),
                                         prompt_encoder_config=SamPromptEncoderConfig(**prompt),
                                         mask_decoder_config=SamMaskDecoderConfig(**decoder))))


X = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
POINTS = torch.tensor([[[[100.0, 120.0]]], [[[30.0, 200.0]]]])


def _close(got, want, db=60.0):
    assert sqnr_db(got, want) > db, sqnr_db(got, want)


def test_exact_attention_in_samodel_matches_and_undo_restores():
    model = _sam_model()
    with torch.no_grad():
        ref = model(pixel_values=X, input_points=POINTS, output_hidden_states=True)
    handle = sam_fast.apply(model)
    assert handle.swapped == [f"vision_encoder.layers.{i}" for i in range(4)]
    with torch.no_grad(), sam_fast.record_backends() as rec:
        out = model(pixel_values=X, input_points=POINTS, output_hidden_states=True)
    # every layer's attention ran fused: the 3 x 3 windows through dilated_attention, the global layers (256 keys)
    # through the CPU's SAM block kernel where it runs (AVX-512)
    from sam_fast.ops.dilated_attention_cpu import fused_bias_kernel

    glob = "sam_block_attention" if fused_bias_kernel() else "dilated_attention"
    attention = [op for op, _ in rec.calls if op in ("dilated_attention", "sam_block_attention")]  # (not sub-ops)
    assert attention == ["dilated_attention", glob] * 2
    _close(out.pred_masks, ref.pred_masks)
    _close(out.iou_scores, ref.iou_scores)
    assert len(out.vision_hidden_states) == len(ref.vision_hidden_states) == 5  # recorded as transformers does
    for a, b in zip(out.vision_hidden_states, ref.vision_hidden_states):
        _close(a, b)
    with pytest.raises(ValueError, match="cannot return attention weights"):
        model(pixel_values=X, input_points=POINTS, output_attentions=True)
    handle.undo()
    assert all("forward" not in vars(layer) for layer in model.vision_encoder.layers)
    with torch.no_grad():
        back = model(pixel_values=X, input_points=POINTS, output_attentions=True)
    assert torch.equal(back.pred_masks, ref.pred_masks)  # and output_attentions is accepted again


def test_triton_kernel_runs_in_sam_vision_model():
    from transformers import SamVisionConfig, SamVisionModel

    vision, _, _ = _configs(image=128, layers=2, glob=(1,))
    model = _randomize(SamVisionModel(SamVisionConfig(**vision)))
    x = X[:1, :, :128, :128]
    with torch.no_grad():
        ref = model(pixel_values=x).last_hidden_state
        handle = sam_fast.apply(model, sam_fast.SamFastConfig(backend="triton"))
        with sam_fast.record_backends() as rec:
            out = model(pixel_values=x).last_hidden_state
    assert rec.backends() == {"triton"}
    _close(out, ref)
    handle.undo()


def test_int8_and_dilated_in_transformers_layers_match_segment_anything(tmp_path):
    """The same weights in both ecosystems give the same outputs under the same sam_fast config."""
    sam = tiny_sam()
    save_transformers(sam, str(tmp_path))
    hf = transformers.SamModel.from_pretrained(str(tmp_path)).eval()
    x = X[:1]
    for config in (sam_fast.SamFastConfig(quantize="int8"),
                   sam_fast.SamFastConfig(attention=sam_fast.Dilated(Branch((16, 16), (2, 1))))):
        h1, h2 = sam_fast.apply(sam, config), sam_fast.apply(hf, config)
        with torch.no_grad():
            a, b = sam.image_encoder(x), hf.get_image_embeddings(x)
        _close(b, a, 50.0)
        h1.undo()
        h2.undo()
    with torch.no_grad():
        float_emb = hf.get_image_embeddings(x)
        handle = sam_fast.apply(hf, sam_fast.SamFastConfig(quantize="int8"))
        assert sum(type(m).__name__ == "Int8Linear" for m in hf.modules()) == 16
        assert sqnr_db(hf.get_image_embeddings(x), float_emb) > 25
    handle.undo()


def test_sam_hq_vision_encoder_is_patched_and_keeps_its_intermediate_embeddings():
    from transformers import (
        SamHQConfig,
        SamHQMaskDecoderConfig,
        SamHQModel,
        SamHQPromptEncoderConfig,
        SamHQVisionConfig,
    )

    vision, prompt, decoder = _configs()
    decoder["vit_dim"] = 64
    model = _randomize(SamHQModel(SamHQConfig(vision_config=SamHQVisionConfig(**vision),
                                              prompt_encoder_config=SamHQPromptEncoderConfig(**prompt),
                                              mask_decoder_config=SamHQMaskDecoderConfig(**decoder))))
    with torch.no_grad():
        ref_emb, ref_inter = model.get_image_embeddings(X)
        handle = sam_fast.apply(model)
        with sam_fast.record_backends() as rec:
            emb, inter = model.get_image_embeddings(X)
    attention = [op for op, _ in rec.calls if op in ("dilated_attention", "sam_block_attention")]  # (not sub-ops)
    assert len(attention) == 4 and len(inter) == len(ref_inter) == 2  # the global layers' outputs
    _close(emb, ref_emb)
    for a, b in zip(inter, ref_inter):
        _close(a, b)
    handle.undo()


@pytest.mark.parametrize("geometry", ["tiny", "slimsam_77_uniform"])
def test_segment_anything_model_round_trips_through_transformers_format(tmp_path, geometry):
    """A segment_anything model saved in transformers' format: transformers loads it and gives the original's
    embeddings and masks; load_sam reads it back to the same state_dict. SlimSAM-77's uniform widths (12 heads
    of dim 14, MLP 696) on a 256-pixel input."""
    from sam_fast.models import EncoderGeometry
    from sam_fast.models.tiny import sam_around
    from sam_fast.models.vit import BlockGeometry, build_image_encoder

    if geometry == "tiny":
        sam = tiny_sam()
    else:
        blocks = tuple(BlockGeometry(12, 14, 696, 0 if i in (2, 5) else 14) for i in range(6))
        enc = build_image_encoder(EncoderGeometry(img_size=256, patch_size=16, embed_dim=168, out_chans=32,
                                                  blocks=blocks))
        sam = _randomize(sam_around(enc, 256, 32, 2, 64, 64))
    save_transformers(sam, str(tmp_path))
    hf = transformers.SamModel.from_pretrained(str(tmp_path)).eval()
    assert hf.config.vision_config.num_attention_heads == (2 if geometry == "tiny" else 12)
    with torch.no_grad():
        e_sa, e_hf = sam.image_encoder(X), hf.get_image_embeddings(X)
        _close(e_hf, e_sa)
        out = hf(image_embeddings=e_sa, input_points=POINTS, multimask_output=True)
        for b in range(2):
            sparse, dense = sam.prompt_encoder(points=(POINTS[b], torch.ones(1, 1, dtype=torch.int)), boxes=None,
                                               masks=None)
            low, iou = sam.mask_decoder(e_sa[b:b + 1], sam.prompt_encoder.get_dense_pe(), sparse, dense, True)
            _close(out.pred_masks[b], low)
            _close(out.iou_scores[b], iou)
    with torch.no_grad():  # the fused kernels in transformers' layers at this head dim (14 for SlimSAM-77)
        handle = sam_fast.apply(hf)
        _close(hf.get_image_embeddings(X), e_hf)
        handle.undo()
    back = load_sam(str(tmp_path))
    state = sam.state_dict()
    assert set(back.state_dict()) == set(state)
    assert all(torch.equal(v, state[k]) for k, v in back.state_dict().items())


def test_transformers_directory_written_by_transformers_loads(tmp_path):
    model = _sam_model()
    model.save_pretrained(str(tmp_path))
    sam = load_sam(str(tmp_path))
    with torch.no_grad():
        _close(sam.image_encoder(X), model.get_image_embeddings(X))
    assert sam.mask_decoder.transformer.num_heads == 2  # from config.json, no --decoder-heads needed


def test_models_without_a_transformers_form_say_why(tmp_path):
    from sam_fast.distill import dilated_student
    from sam_fast.models import build_vit_t

    with pytest.raises(ValueError, match="blocks \\[1, 3\\] run dilated attention"):
        save_transformers(dilated_student(tiny_sam(), Branch((16, 16), (2, 1))), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="TinyViT"):
        save_transformers(build_vit_t(), str(tmp_path / "b"))
    sam = tiny_sam()
    handle = sam_fast.apply(sam, sam_fast.SamFastConfig(attention="none", quantize="int8"))
    with pytest.raises(ValueError, match="int8"):
        save_transformers(sam, str(tmp_path / "c"))
    handle.undo()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="'bert' model, not SAM"):
        load_sam(str(tmp_path / "d"))
    from sam_fast.models import EncoderGeometry
    from sam_fast.models.tiny import sam_around
    from sam_fast.models.vit import BlockGeometry, build_image_encoder

    pruned = build_image_encoder(EncoderGeometry(img_size=256, patch_size=16, embed_dim=64, out_chans=32, blocks=(
        BlockGeometry(2, 32, 128, 3), BlockGeometry(2, 32, 96, 0))))
    with pytest.raises(ValueError, match="one MLP width for every block, this encoder has \\[96, 128\\]"):
        save_transformers(sam_around(pruned, 256, 32, 2, 64, 64), str(tmp_path / "e"))


def test_int8_transformers_model_refuses_save_pretrained(tmp_path):
    """transformers' save_pretrained would write the int8 integers as float weights (from_pretrained then loads a
    broken model with only an 'unexpected keys' note): while int8 layers are swapped in it refuses, and undo()
    gives it back."""
    model = _sam_model()
    handle = sam_fast.apply(model, sam_fast.SamFastConfig(quantize="int8"))
    with pytest.raises(ValueError, match="int8 layers"):
        model.save_pretrained(str(tmp_path / "int8"))
    assert not (tmp_path / "int8").exists()
    handle.undo()
    model.save_pretrained(str(tmp_path / "float"))
    again = transformers.SamModel.from_pretrained(str(tmp_path / "float")).eval()
    with torch.no_grad():
        _close(again.get_image_embeddings(X[:1]), model.get_image_embeddings(X[:1]), 100.0)


def test_transformers_directories_that_load_sam_cannot_trust_are_refused_by_name(tmp_path):
    """config.json fields with the wrong type or a value segment_anything's modules do not have (load_sam would
    build another model than SamModel.from_pretrained), and a truncated model.safetensors: ValueErrors naming the
    file and the field."""
    import json
    import shutil

    model = _sam_model()
    model.save_pretrained(str(tmp_path / "ok"))
    config = json.loads((tmp_path / "ok" / "config.json").read_text())

    def variant(name, edit):
        shutil.copytree(tmp_path / "ok", tmp_path / name)
        c = json.loads(json.dumps(config))
        edit(c)
        (tmp_path / name / "config.json").write_text(json.dumps(c))
        return str(tmp_path / name)

    cases = [
        (lambda c: c["vision_config"].update(hidden_act="relu"), r"config\.json: vision_config\.hidden_act is 'relu'"),
        (lambda c: c["vision_config"].update(layer_norm_eps=1e-5), r"vision_config\.layer_norm_eps is 1e-05"),
        (lambda c: c["vision_config"].update(use_rel_pos=False), r"vision_config\.use_rel_pos is False"),
        (lambda c: c["mask_decoder_config"].update(num_attention_heads="2"),
         r"config\.json: mask_decoder_config\.num_attention_heads must be a positive int, got '2'"),
        (lambda c: c["mask_decoder_config"].update(num_attention_heads=True), "must be a positive int, got True"),
        (lambda c: c.update(vision_config=[1, 2]), r"config\.json: vision_config must be an object"),
    ]
    for i, (edit, match) in enumerate(cases):
        with pytest.raises(ValueError, match=match):
            load_sam(variant(f"v{i}", edit))
    shutil.copytree(tmp_path / "ok", tmp_path / "cut")
    weights = tmp_path / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut/model\.safetensors cannot be read as safetensors"):
        load_sam(str(tmp_path / "cut"))
    assert load_sam(str(tmp_path / "ok")) is not None
