"""transformers' SAM 2 image model (``Sam2Model``) directories through ``sam_fast.load_sam``: Meta's ``SAM2Base``
with the same weights (image features bit for bit, the decoder's masks, IoU and object scores to float rounding,
against transformers' own forward), image-only (the video memory modules keep their initialisation); tampered
directories refused by name."""

import json
import os

import pytest
import torch

import sam_fast

transformers = pytest.importorskip("transformers")  # the optional extras; CI installs both with [dev]
pytest.importorskip("sam2")


@pytest.fixture(scope="module")
def hf_sam2(tmp_path_factory):
    """A random transformers Sam2Model (Hiera-T, transformers' default geometry), its positional embeddings and
    no-memory embedding given values (initialised to zero they would hide a mix-up), the two copies of the prompt
    positional encoding equal (as in transformers' converted releases), saved with save_pretrained."""
    torch.manual_seed(0)
    model = transformers.Sam2Model(transformers.Sam2Config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pos_embed" in name or "no_memory" in name:
                p.normal_(0, 0.2)
        model.shared_image_embedding.positional_embedding.copy_(model.prompt_encoder.shared_embedding.positional_embedding)
    directory = str(tmp_path_factory.mktemp("sam2_hf"))
    model.save_pretrained(directory)
    return model, directory


def test_load_sam_reads_a_transformers_sam2_directory(hf_sam2, capsys):
    from sam_fast import cli

    hf, directory = hf_sam2
    assert cli.main(["inspect", directory]) == 0
    said = capsys.readouterr().out
    assert "SAM 2 (sam2.1_hiera_t)" in said and "transformers Sam2Model directory" in said
    meta = sam_fast.load_sam(directory)
    assert type(meta).__name__ == "SAM2Base" and meta.sam_fast_image_only and not meta.training
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(1))
    points = torch.tensor([[[[300.0, 400.0], [600.0, 200.0]]]])
    labels = torch.tensor([[[1, 0]]])
    with torch.no_grad():
        want = hf(pixel_values=x, input_points=points, input_labels=labels, multimask_output=True)
        fpn = hf.vision_encoder(x).fpn_hidden_states
        got_fpn = meta.image_encoder(x)["backbone_fpn"]
        for a, b in zip(got_fpn, fpn):
            assert torch.equal(a, b)
        # SAM2ImagePredictor's path: the features with the no-memory embedding, prompts, the decoder
        _, feats, _, sizes = meta._prepare_backbone_features(meta.forward_image(x))
        feats[-1] = feats[-1] + meta.no_mem_embed
        maps = [f.permute(1, 2, 0).view(1, -1, *s) for f, s in zip(feats[::-1], sizes[::-1])][::-1]
        sparse, dense = meta.sam_prompt_encoder(points=(points[0], labels[0]), boxes=None, masks=None)
        masks, iou, _, obj = meta.sam_mask_decoder(
            image_embeddings=maps[-1], image_pe=meta.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True, repeat_image=False,
            high_res_features=maps[:-1])
    torch.testing.assert_close(masks, want.pred_masks[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(iou, want.iou_scores[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(obj, want.object_score_logits[0], rtol=1e-5, atol=1e-6)
    # every tensor of the image part is one of Sam2Model's; the video memory (not in Sam2Model) is there, as built
    from sam_fast.models.transformers_sam2 import IMAGE_PREFIXES, sam2_state_from_transformers

    own = meta.state_dict()
    converted = sam2_state_from_transformers(hf.state_dict(), "hf")
    assert sorted(converted) == sorted(k for k in own if k.startswith(IMAGE_PREFIXES))
    assert all(torch.equal(own[k], v) for k, v in converted.items())
    assert any(k.startswith("memory_attention.") for k in own)


def _tampered(hf_sam2, tmp_path, *, state=None, config=None):
    """A copy of the saved directory with its weights and / or config.json changed."""
    from safetensors.torch import load_file, save_file

    _, directory = hf_sam2
    weights = load_file(os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json")) as f:
        cfg = json.load(f)
    if state:
        state(weights)
    if config:
        config(cfg)
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(tmp_path, "model.safetensors"))
    with open(os.path.join(tmp_path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return str(tmp_path)


def test_tampered_transformers_sam2_directories_are_refused_by_name(hf_sam2, tmp_path):
    def windows(cfg):
        cfg["vision_config"]["backbone_config"]["window_size_per_stage"] = [8, 4, 16, 8]

    cases = [
        (dict(state=lambda w: w.update({"prompt_encoder.point_embed.weight": torch.zeros(3, 256)})),
         "point_embed.weight must be \\(4, C\\)"),
        (dict(state=lambda w: w.update({"vision_encoder.extra.weight": torch.zeros(2)})),
         "'vision_encoder.extra.weight' is not a tensor of transformers' Sam2Model"),
        (dict(state=lambda w: w.update({"shared_image_embedding.positional_embedding": torch.ones(2, 128)})),
         "different positional encodings"),
        (dict(state=lambda w: w.pop("mask_decoder.conv_s0.weight")), "missing keys.*conv_s0"),
        (dict(config=windows), "windows per stage \\(8, 4, 16, 8\\)"),
    ]
    for i, (change, match) in enumerate(cases):
        where = tmp_path / str(i)
        where.mkdir()
        with pytest.raises(ValueError, match=match):
            sam_fast.load_sam(_tampered(hf_sam2, where, **change))
