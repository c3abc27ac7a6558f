"""``sam_fast.compress``: structured pruning of a SAM ViT encoder to given widths. Every tensor a channel touches is
sliced with it, the pruned model is what ``load_sam`` builds from its checkpoint and runs under ``apply``, a channel
that carries nothing is the one removed, and bad widths are refused before any work."""

import pytest
import torch

import sam_fast
from sam_fast.compress import channel_groups, magnitude_scores, prune_to_widths
from sam_fast.models import tiny_image_encoder, tiny_sam
from sam_fast.testing import FWD_FACTOR, check_against_reference


def _image(size, seed=0):
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_pruned_widths_reach_every_tensor_and_load_back(tmp_path):
    """A tiny Sam pruned to embed 40, head dim 24 / 8 per block and MLP 100: every encoder tensor has exactly those
    widths, the decoder is untouched (copied), the original is unchanged, and the checkpoint save_sam writes loads
    back through load_sam("auto") as the same model, which apply() runs with the same embedding."""
    sam = tiny_sam().eval()
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    pruned = prune_to_widths(sam, embed=40, head_dim=[24, 8, 24, 8], mlp=100).eval()
    enc = pruned.image_encoder
    assert enc.patch_embed.proj.weight.shape[0] == 40 and enc.pos_embed.shape[-1] == 40
    assert enc.neck[0].weight.shape[1] == 40
    for i, blk in enumerate(enc.blocks):
        D = (24, 8, 24, 8)[i]
        heads = blk.attn.num_heads
        assert blk.norm1.weight.shape == blk.norm2.weight.shape == (40,)
        assert blk.attn.qkv.weight.shape == (3 * heads * D, 40) and blk.attn.proj.weight.shape == (40, heads * D)
        assert blk.attn.rel_pos_h.shape[1] == blk.attn.rel_pos_w.shape[1] == D
        assert blk.attn.scale == pytest.approx(D ** -0.5)
        assert blk.mlp.lin1.weight.shape == (100, 40) and blk.mlp.lin2.weight.shape == (40, 100)
    assert all(torch.equal(v, before[k]) for k, v in sam.state_dict().items())  # the original untouched
    assert pruned.mask_decoder is not sam.mask_decoder
    for k, v in sam.mask_decoder.state_dict().items():
        assert torch.equal(pruned.mask_decoder.state_dict()[k], v)
    path = tmp_path / "pruned.pth"
    sam_fast.save_sam(pruned, str(path))
    loaded = sam_fast.load_sam(str(path)).eval()
    x = _image(256)
    with torch.no_grad():
        want = pruned.image_encoder(x)
        assert torch.equal(loaded.image_encoder(x), want)
        exact = pruned.image_encoder.double()(x.double())
        pruned.float()
        with sam_fast.apply(loaded, sam_fast.SamFastConfig(attention="exact")):
            got = loaded.image_encoder(x)
    check_against_reference("pruned embedding", got, exact, want, torch.float32, FWD_FACTOR)


def test_an_mlp_channel_that_carries_nothing_is_the_one_removed_and_the_output_stays():
    """Zero one hidden channel of every block's MLP (its lin1 row and bias, its lin2 column): magnitude scores rank
    it last, pruning one channel removes exactly it, and the encoder computes the same embedding without it."""
    enc = tiny_image_encoder().eval()
    dead = 5
    with torch.no_grad():
        for blk in enc.blocks:
            blk.mlp.lin1.weight[dead] = 0
            blk.mlp.lin1.bias[dead] = 0
            blk.mlp.lin2.weight[:, dead] = 0
    scores = magnitude_scores(enc)
    hidden = enc.blocks[0].mlp.lin1.out_features
    for i in range(len(enc.blocks)):
        assert int(scores[("mlp", i)].argmin()) == dead
    pruned = prune_to_widths(enc, mlp=hidden - 1).eval()
    keep = [c for c in range(hidden) if c != dead]
    for old, new in zip(enc.blocks, pruned.blocks):
        assert torch.equal(new.mlp.lin1.weight, old.mlp.lin1.weight[keep])
        assert torch.equal(new.mlp.lin2.weight, old.mlp.lin2.weight[:, keep])
    x = _image(128, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), enc(x), rtol=1e-5, atol=1e-5)


def test_a_head_dim_is_removed_from_q_k_v_of_every_head_the_proj_and_the_rel_pos_tables():
    """Caller-given scores choose the dims: the kept dims are the same in every head and in q, k and v, proj's
    columns follow v's, and the rel-pos tables keep the same columns."""
    enc = tiny_image_encoder(embed_dim=32, num_heads=2).eval()
    D = 16
    groups = channel_groups(enc)
    assert groups[("head_dim", 0)][0] == D and groups[("embed",)][0] == 32
    scores = {g: torch.arange(width, dtype=torch.float64) for g, (width, _) in groups.items()}
    scores[("head_dim", 0)] = torch.tensor([float(d in (1, 4, 9)) for d in range(D)])
    pruned = prune_to_widths(enc, head_dim=[3, D, D, D], scores=scores)
    old, new = enc.blocks[0].attn, pruned.blocks[0].attn
    rows = [part * 2 * D + h * D + d for part in range(3) for h in range(2) for d in (1, 4, 9)]
    assert torch.equal(new.qkv.weight, old.qkv.weight[rows]) and torch.equal(new.qkv.bias, old.qkv.bias[rows])
    assert torch.equal(new.proj.weight, old.proj.weight[:, [h * D + d for h in range(2) for d in (1, 4, 9)]])
    assert torch.equal(new.rel_pos_h, old.rel_pos_h[:, [1, 4, 9]])
    assert torch.equal(new.rel_pos_w, old.rel_pos_w[:, [1, 4, 9]])
    assert torch.equal(pruned.blocks[1].attn.qkv.weight, enc.blocks[1].attn.qkv.weight)  # full width: untouched


def test_dc_vit_blocks_prune_their_mlp_only():
    """An encoder with an attention-free (DC-ViT) block: that block has an MLP group and no head group, and prunes."""
    from sam_fast.models.vit import MlpBlock

    enc = tiny_image_encoder().eval()
    enc.blocks[2] = MlpBlock(64, 96)
    groups = channel_groups(enc)
    assert ("head_dim", 2) not in groups and groups[("mlp", 2)][0] == 96
    pruned = prune_to_widths(enc, embed=48, mlp=[200, 200, 50, 200])
    assert isinstance(pruned.blocks[2], MlpBlock) and pruned.blocks[2].mlp.lin1.weight.shape == (50, 48)
    with torch.no_grad():
        assert pruned(_image(128)).shape == enc(_image(128)).shape


def test_bad_widths_and_models_are_refused_by_name():
    sam = tiny_sam()
    for kwargs, error, match in [
        (dict(embed=0), ValueError, "embed must be an int >= 1"),
        (dict(embed=65), ValueError, "embed must be an int <= 64"),
        (dict(embed=True), TypeError, "embed must be an int"),
        (dict(mlp=[8, 8]), ValueError, "mlp must give one width per block \\(4\\)"),
        (dict(head_dim=[8, 8, 8, 99]), ValueError, "head_dim\\[3\\] must be an int <= 32"),
        (dict(scores={}), ValueError, "scores\\[\\('mlp', 0\\)\\] must be a \\(256,\\) tensor, got None"),
    ]:
        with pytest.raises(error, match=match):
            prune_to_widths(sam, **kwargs)
    with pytest.raises(TypeError, match="must be a segment_anything Sam or an image encoder"):
        prune_to_widths(torch.nn.Linear(3, 3), embed=2)


def test_disturbed_taylor_scores_are_zero_without_the_disturbance_and_informative_with_it(tmp_path):
    """At the start the student is the teacher: without noise the distillation loss, its gradients and so every
    Taylor score are exactly zero; with SlimSAM's disturbance every group gets scores, the same for the same seed.
    Image files and preprocessed tensors both work, and the model's weights, requires_grad and grads are kept."""
    import skimage.data as data
    from PIL import Image

    from sam_fast.compress import taylor_scores

    enc = tiny_image_encoder().eval()
    enc.blocks[0].mlp.lin1.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    x = torch.randn(3, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    plain = taylor_scores(enc, x, sigma=0.0)
    assert set(plain) == set(channel_groups(enc)) and all(float(s.abs().max()) == 0 for s in plain.values())
    disturbed = taylor_scores(enc, x, sigma=0.05, batch_size=2, seed=1)
    assert all(float(s.min()) >= 0 and float(s.max()) > 0 for s in disturbed.values())
    again = taylor_scores(enc, x, sigma=0.05, batch_size=2, seed=1)
    assert all(torch.equal(disturbed[g], again[g]) for g in disturbed)
    assert all(torch.equal(v, before[k]) for k, v in enc.state_dict().items())
    assert not enc.blocks[0].mlp.lin1.weight.requires_grad and enc.blocks[0].mlp.lin1.weight.grad is None
    assert all(p.grad is None for p in enc.parameters())
    for name in ("astronaut", "coffee"):
        Image.fromarray(getattr(data, name)()).save(tmp_path / f"{name}.png")
    from_files = taylor_scores(enc, str(tmp_path), sigma=0.05, num_images=2)
    assert all(float(s.max()) > 0 for s in from_files.values())
    pruned = prune_to_widths(enc, embed=48, head_dim=16, mlp=128, scores=disturbed)
    assert pruned.blocks[0].mlp.lin1.weight.shape == (128, 48)
    for kwargs, error, match in [(dict(sigma=-1.0), ValueError, "sigma must be a number >= 0"),
                                 (dict(num_images=0), ValueError, "num_images must be an int >= 1"),
                                 (dict(batch_size=1.5), TypeError, "batch_size must be an int")]:
        with pytest.raises(error, match=match):
            taylor_scores(enc, x, **kwargs)
    with pytest.raises(ValueError, match="images as a tensor must be \\(N, 3, S, S\\)"):
        taylor_scores(enc, x[0])


def test_drop_attention_removes_the_least_needed_blocks_and_loads_as_dc_vit(tmp_path):
    """Block compression: each block's SQNR with its attention removed is measured; a block whose attention adds
    nothing (its proj zeroed) scores inf and is the one chosen; the copy computes x + mlp(norm2(x)) there, the original
    is unchanged, and the result saves and loads back as a DC-ViT checkpoint with the same embedding."""
    from sam_fast.compress import attention_removal_sqnr, drop_attention
    from sam_fast.models.vit import MlpBlock

    sam = tiny_sam().eval()
    with torch.no_grad():
        sam.image_encoder.blocks[2].attn.proj.weight.zero_()
        sam.image_encoder.blocks[2].attn.proj.bias.zero_()
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    scores = attention_removal_sqnr(sam, x)
    assert sorted(scores) == [0, 1, 2, 3] and scores[2] == float("inf")
    assert all(torch.isfinite(torch.tensor(scores[i])) for i in (0, 1, 3))
    compressed, chosen, same = drop_attention(sam, x, blocks=1)
    assert chosen == [2] and same == scores
    assert isinstance(compressed.image_encoder.blocks[2], MlpBlock)
    assert not isinstance(sam.image_encoder.blocks[2], MlpBlock)  # the original keeps its attention
    with torch.no_grad():
        torch.testing.assert_close(compressed.image_encoder(x), sam.image_encoder(x), rtol=1e-5, atol=1e-5)
    path = tmp_path / "dcvit.pth"
    sam_fast.save_sam(compressed, str(path))
    loaded = sam_fast.load_sam(str(path)).eval()
    assert isinstance(loaded.image_encoder.blocks[2], MlpBlock)
    with torch.no_grad():
        assert torch.equal(loaded.image_encoder(x), compressed.image_encoder(x))
    with pytest.raises(ValueError, match="at least one must keep its attention"):
        drop_attention(sam, x, blocks=4)
    with pytest.raises(ValueError, match="blocks must be an int >= 1"):
        drop_attention(sam, x, blocks=0)


def test_width_plans_uniform_and_global():
    """uniform: every block keeps round((1 - ratio) x width) of each kind (ViT-B at 0.5 would be 384 / 32 / 1536);
    global: the head dims and MLP channels of all blocks ranked together (each block's scores over their mean), so
    a block whose importance sits in 16 channels keeps those 16 and the others take the rest of the uniform total;
    both prune to what they plan."""
    from sam_fast.compress import plan_widths

    sam = tiny_sam()
    assert plan_widths(sam, 0.5) == {"embed": 32, "head_dim": [16] * 4, "mlp": [128] * 4}
    scores = magnitude_scores(sam)
    for i in range(4):
        scores[("mlp", i)] = torch.rand(256, generator=torch.Generator().manual_seed(i)) + 0.5
    scores[("mlp", 1)] = torch.cat([torch.ones(16), torch.zeros(240)]).double()
    plan = plan_widths(sam, 0.5, "global", scores=scores)
    assert plan["embed"] == 32 and sum(plan["mlp"]) == 512 and plan["mlp"][1] == 16
    assert all(150 < plan["mlp"][i] <= 256 for i in (0, 2, 3))
    pruned = prune_to_widths(sam, scores=scores, **plan)
    assert [b.mlp.lin1.out_features for b in pruned.image_encoder.blocks] == plan["mlp"]
    for ratio, error, match in [(0.0, ValueError, "ratio must be a positive number"), (1.0, ValueError, "below 1"),
                                (1.5, ValueError, "ratio must be a number <= 1"), ("half", TypeError, "ratio must be")]:
        with pytest.raises(error, match=match):
            plan_widths(sam, ratio)
    with pytest.raises(ValueError, match="mode must be one of"):
        plan_widths(sam, 0.5, "layerwise")


def test_prune_runs_both_stages_with_recovery_and_resumes(tmp_path):
    """prune(): the embedding width first, then head dims and MLPs, each stage recovered by sam_fast.distill and
    checkpointed; the result has the planned widths and loads back; the report has both stages' SQNR; a rerun takes
    the finished stages from their checkpoints (nothing retrained), and other settings in the same out_dir are
    refused before any work."""
    import os

    import skimage.data as data
    from PIL import Image

    from sam_fast.compress import prune
    from sam_fast.distill import DistillConfig

    images = tmp_path / "images"
    images.mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        Image.fromarray(getattr(data, name)()).save(images / f"{name}.png")
    teacher = tiny_sam().eval()
    recover = DistillConfig(method="dld", steps=2, batch_size=2, cache_batch_size=2, prompts_per_image=1)
    out = tmp_path / "run"
    res = prune(teacher, str(images), out_dir=out, ratio=0.5, recover=recover, num_images=4, eval_images=2,
                progress=False)
    assert res.widths == {"embed": 32, "head_dim": [16] * 4, "mlp": [128] * 4}
    enc = res.model.image_encoder
    assert enc.patch_embed.proj.out_channels == 32 and enc.blocks[0].mlp.lin1.out_features == 128
    assert enc.blocks[0].attn.rel_pos_h.shape[1] == 16
    assert [s["stage"] for s in res.stages] == ["embed", "bottleneck"]
    assert res.params_after < res.params_before and "encoder parameters" in res.summary()
    assert all(s["sqnr_db"] == s["sqnr_db"] for s in res.stages)  # finite or inf, never NaN
    final = sam_fast.load_sam(res.stages[-1]["checkpoint"])
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(final.image_encoder.eval()(x), enc.eval()(x))
    stamps = {s["checkpoint"]: os.path.getmtime(s["checkpoint"]) for s in res.stages}
    again = prune(teacher, str(images), out_dir=out, ratio=0.5, recover=recover, num_images=4, eval_images=2,
                  progress=False)
    assert {s["checkpoint"]: os.path.getmtime(s["checkpoint"]) for s in again.stages} == stamps
    with torch.no_grad():
        assert torch.equal(again.model.image_encoder.eval()(x), final.image_encoder.eval()(x))
    with pytest.raises(ValueError, match="other settings \\(plan, ratio\\)"):
        prune(teacher, str(images), out_dir=out, ratio=0.25, recover=recover, num_images=4, progress=False)
    for kwargs, error, match in [(dict(), ValueError, "give ratio or widths"),
                                 (dict(ratio=0.5, widths={"embed": 8}), ValueError, "give ratio or widths"),
                                 (dict(ratio=0.5, importance="l1"), ValueError, "importance must be one of"),
                                 (dict(ratio=0.5, recover={"steps": 2}), TypeError, "recover must be a")]:
        with pytest.raises(error, match=match):
            prune(teacher, str(images), out_dir=tmp_path / "other", **kwargs)
