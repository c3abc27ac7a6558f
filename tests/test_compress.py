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
    """A tiny Sam pruned to embed 40, head dims 14 / 8 / 24 / 32 (kept) and MLP 100: every encoder tensor has exactly
    those widths, the decoder is untouched (copied), the original is unchanged, and the checkpoint save_sam writes
    loads back through load_sam("auto") as the same model, which apply() runs with the same embedding."""
    sam = tiny_sam().eval()
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    pruned = prune_to_widths(sam, embed=40, head_dim=[14, 8, 24, 32], mlp=100).eval()
    enc = pruned.image_encoder
    assert enc.patch_embed.proj.weight.shape[0] == 40 and enc.pos_embed.shape[-1] == 40
    assert enc.neck[0].weight.shape[1] == 40
    for i, blk in enumerate(enc.blocks):
        D = (14, 8, 24, 32)[i]
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


def test_disturbed_taylor_scores_are_zero_without_the_disturbance_and_informative_with_it(tmp_path, capsys):
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
    assert "channel importance" in capsys.readouterr().err  # the progress bar
    again = taylor_scores(enc, x, sigma=0.05, batch_size=2, seed=1, progress=False)
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
    with pytest.raises(TypeError, match="teacher: model must be a segment_anything Sam"):
        taylor_scores(enc, x, teacher=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="teacher: its encoder takes 256-pixel images, the model's 128"):
        taylor_scores(enc, x, teacher=tiny_sam())


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
    with pytest.raises(TypeError, match="the recovery \\(out_dir\\) reads image files"):
        drop_attention(sam, x, blocks=1, out_dir=tmp_path / "r")
    with pytest.raises(ValueError, match="recover applies with out_dir"):
        drop_attention(sam, x, blocks=1, recover=_recover())


def test_drop_attention_recovers_by_distillation_into_out_dir(tmp_path):
    """With out_dir, the compressed copy is distilled from the original (block by block: its attention-free block
    learns to stand in for the attention it lost) and written as compressed.pth, which loads back as that model."""
    from sam_fast.compress import drop_attention
    from sam_fast.testing import write_photos

    images = write_photos(tmp_path / "images", ["astronaut", "coffee"])
    sam = tiny_sam().eval()
    plain, chosen, _ = drop_attention(sam, images, blocks=1, num_images=2)
    recovered, again, _ = drop_attention(sam, images, blocks=1, num_images=2, out_dir=tmp_path / "run",
                                         recover=_recover(), progress=False)
    assert again == chosen
    block = chosen[0]
    lin1 = recovered.image_encoder.blocks[block].mlp.lin1.weight
    assert not torch.equal(lin1, plain.image_encoder.blocks[block].mlp.lin1.weight)  # trained
    loaded = sam_fast.load_sam(str(tmp_path / "run" / "compressed.pth"))
    assert torch.equal(loaded.image_encoder.blocks[block].mlp.lin1.weight, lin1.detach().cpu())


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


def test_encoder_macs_count_every_product_of_the_encoder():
    """encoder_macs counts, for one image, every multiply-accumulate of the encoder, checked against a hand count for
    tiny_sam (256 px, patch 16: a 16 x 16 grid, width 64, 2 heads of 32, MLP 256; blocks 0 and 2 in 3 x 3 windows, the
    grid padded to 18 x 18), and falls by what pruning and attention removal take away."""
    from sam_fast.compress import drop_attention, encoder_macs, encoder_params
    from sam_fast.models.vit import MlpBlock

    sam = tiny_sam()
    patch, neck = 256 * 64 * (3 * 16 * 16), 256 * 32 * 64 + 256 * 32 * 32 * 9
    mlp = 2 * 256 * 64 * 256
    glob = 256 * 64 * 3 * 64 + 256 * 64 * 64 + 2 * (2 * 256 * 256 * 32) + 2 * (2 * 16 * 16 * 16 * 32) + mlp
    window = 324 * 64 * 3 * 64 + 324 * 64 * 64 + 2 * (36 * 2 * 9 * 9 * 32) + 2 * (36 * 2 * 3 * 3 * 3 * 32) + mlp
    assert encoder_macs(sam) == patch + neck + 2 * glob + 2 * window
    narrow = prune_to_widths(sam, mlp=100)
    assert encoder_macs(narrow) == encoder_macs(sam) - 4 * 2 * 256 * 64 * 156
    compressed, chosen, _ = drop_attention(sam, _image(256), blocks=1)
    assert isinstance(compressed.image_encoder.blocks[chosen[0]], MlpBlock)
    assert encoder_macs(compressed) == encoder_macs(sam) - ((glob if chosen[0] % 2 else window) - mlp)
    assert encoder_params(compressed) < encoder_params(sam) == sum(p.numel() for p in sam.image_encoder.parameters())


def _recover(steps=2):
    from sam_fast.distill import DistillConfig

    return DistillConfig(method="dld", steps=steps, batch_size=2, cache_batch_size=2, prompts_per_image=1)


def test_prune_runs_every_stage_with_recovery_reports_it_and_resumes(tmp_path, capsys):
    """prune(): attention removal, then the embedding width, then head dims and MLPs, each stage recovered by
    sam_fast.distill and checkpointed with its report (parameters and MACs falling, SQNR and point / box mIoU before
    and after recovery, wall time); the result loads back as a DC-ViT checkpoint with the planned widths, inspect
    describes it and apply runs it; a rerun reads every finished stage back (nothing retrained), and other settings
    or resume=False in the same out_dir are refused before any work."""
    import os

    from sam_fast.cli import main
    from sam_fast.compress import encoder_macs, prune
    from sam_fast.models.vit import MlpBlock
    from sam_fast.testing import write_photos

    images = write_photos(tmp_path / "images", ["astronaut", "coffee", "chelsea", "rocket"])
    teacher = tiny_sam().eval()
    out = tmp_path / "run"
    kw = dict(out_dir=out, ratio=0.5, drop_attention=1, recover=_recover(), num_images=4, eval_images=2,
              progress=False)
    res = prune(teacher, images, **kw)
    assert [r["stage"] for r in res.stages] == ["attention", "embed", "bottleneck"]
    assert res.widths == {"embed": 32, "head_dim": [16] * 4, "mlp": [128] * 4}
    assert len(res.blocks_without_attention) == 1 and res.stages[0]["blocks"] == res.blocks_without_attention
    enc = res.model.image_encoder
    dropped = res.blocks_without_attention[0]
    assert isinstance(enc.blocks[dropped], MlpBlock) and enc.patch_embed.proj.out_channels == 32
    assert all(b.mlp.lin1.out_features == 128 for b in enc.blocks)
    assert all(b.attn.rel_pos_h.shape[1] == 16 for i, b in enumerate(enc.blocks) if i != dropped)
    params = [res.params_before] + [r["params"] for r in res.stages]
    macs = [res.macs_before] + [r["macs"] for r in res.stages]
    assert params == sorted(params, reverse=True) and len(set(params)) == 4 and params[-1] == res.params_after
    assert macs == sorted(macs, reverse=True) and len(set(macs)) == 4 and macs[-1] == encoder_macs(res.model)
    for r in res.stages:
        assert r["seconds"] > 0 and os.path.isfile(r["checkpoint"])
        for when in ("pruned", "recovered"):
            assert set(r[when]) == {"sqnr_db", "points", "boxes"} and r[when]["sqnr_db"] == r[when]["sqnr_db"]
            assert 0 <= r[when]["points"] <= 1 and 0 <= r[when]["boxes"] <= 1
    table = res.summary()
    assert all(word in table for word in ("original", "attention", "embed", "bottleneck", "GMACs", "point mIoU"))
    final = sam_fast.load_sam(res.stages[-1]["checkpoint"]).eval()
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = enc.eval()(x)
        torch.testing.assert_close(final.image_encoder(x), want)
        with sam_fast.apply(final, sam_fast.SamFastConfig(attention="exact")):
            torch.testing.assert_close(final.image_encoder(x), want, rtol=1e-4, atol=1e-4)
    assert main(["inspect", res.stages[-1]["checkpoint"]]) == 0
    assert "DC-ViT" in capsys.readouterr().out
    stamps = {r["checkpoint"]: os.path.getmtime(r["checkpoint"]) for r in res.stages}
    again = prune(teacher, images, **kw)
    assert {r["checkpoint"]: os.path.getmtime(r["checkpoint"]) for r in again.stages} == stamps
    assert again.stages == res.stages and again.summary() == table
    with torch.no_grad():
        assert torch.equal(again.model.image_encoder.eval()(x), want)
    with pytest.raises(ValueError, match="other settings \\(ratio\\)"):
        prune(teacher, images, **dict(kw, ratio=0.25))
    with pytest.raises(ValueError, match="holds a pruning run: resume=True"):
        prune(teacher, images, **dict(kw, resume=False))
    not_vit = tiny_sam()
    not_vit.image_encoder = torch.nn.Conv2d(3, 32, 16, 16)
    (tmp_path / "empty").mkdir()
    fresh = tmp_path / "fresh"
    for model, imgs, args, error, match in [
            (teacher, images, dict(), ValueError, "nothing to compress"),
            (teacher, images, dict(ratio=0.5, widths={"embed": 8}), ValueError, "give ratio or widths, not both"),
            (teacher, images, dict(ratio=1.5), ValueError, "ratio must be a number <= 1"),
            (teacher, images, dict(widths={"mlp": 300}), ValueError, "mlp must be an int <= 256, got 300"),
            (teacher, images, dict(widths={"depth": 3}), ValueError, "widths must be a dict with keys among"),
            (teacher, images, dict(widths={"embed": 64, "mlp": 256}), ValueError, "nothing to compress: widths"),
            (teacher, images, dict(drop_attention=4), ValueError, "at least one must keep its attention"),
            (teacher, images, dict(ratio=0.5, importance="l1"), ValueError, "importance must be one of"),
            (teacher, images, dict(ratio=0.5, recover={"steps": 2}), TypeError, "recover must be a"),
            (teacher, tmp_path / "empty", dict(ratio=0.5), ValueError, "holds no JPEG or PNG images"),
            (teacher, images, dict(ratio=0.5, eval_images=0), ValueError, "eval_images must be an int >= 1"),
            (not_vit, images, dict(ratio=0.5), TypeError, "segment_anything")]:
        with pytest.raises(error, match=match):
            prune(model, imgs, out_dir=fresh, **args)
    assert not fresh.exists()  # refused before any work
    with pytest.raises(TypeError, match="out_dir must be a path, got int"):
        prune(teacher, images, out_dir=7, ratio=0.5)


def test_an_interrupted_stage_resumes_its_recovery(tmp_path, monkeypatch):
    """A run stopped after the bottleneck stage's recovery but before its checkpoint: the rerun reads the embedding
    stage back and resumes the bottleneck's distillation where it ended (no step retrained)."""
    import sam_fast.compress.slim as slim
    from sam_fast.compress import prune
    from sam_fast.testing import write_photos

    images = write_photos(tmp_path / "images", ["astronaut", "coffee"])
    teacher = tiny_sam().eval()
    kw = dict(out_dir=tmp_path / "run", widths={"embed": 48, "mlp": 200}, importance="magnitude",
              recover=_recover(), eval_images=1, progress=False)
    real_save, real_distill = slim.save_sam, slim.distill

    def stop_at_bottleneck(model, path):
        if "bottleneck" in str(path):
            raise KeyboardInterrupt
        real_save(model, path)

    monkeypatch.setattr(slim, "save_sam", stop_at_bottleneck)
    with pytest.raises(KeyboardInterrupt):
        prune(teacher, images, **kw)
    monkeypatch.setattr(slim, "save_sam", real_save)
    runs = []
    monkeypatch.setattr(slim, "distill", lambda *a, **k: runs.append(real_distill(*a, **k)) or runs[-1])
    res = prune(teacher, images, **kw)
    assert [r["stage"] for r in res.stages] == ["embed", "bottleneck"]
    assert len(runs) == 1 and runs[0].resumed_from == 2 and runs[0].steps == 2
    assert res.model.image_encoder.blocks[0].mlp.lin1.out_features == 200


def test_disturbed_taylor_pruning_and_recovery_beat_magnitude_on_held_out_photos(tmp_path):
    """The same teacher, ratio and recovery, two importances: disturbed Taylor keeps a higher embedding SQNR on
    held-out photos than weight magnitude, after each stage's recovery.

    The teacher is tiny_sam with 40% of every block's MLP units switched off by a large negative bias (weights
    untouched): trained ViTs have such units, active on almost no image, and a random tiny model has none. Their
    weights are as large as any, so magnitude keeps them; disturbed Taylor sees that the embedding does not depend
    on them. (On plain random tiny models the two rankings are close and either can win: docs/compress.md has the
    figures of six models of each kind.)"""
    from sam_fast.compress import prune
    from sam_fast.testing import write_photos

    train = write_photos(tmp_path / "train", ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
                                              "hubble_deep_field", "colorwheel", "retina"])
    held = write_photos(tmp_path / "held", ["camera", "coins", "clock", "moon", "brick", "grass"])
    teacher = tiny_sam().eval()
    gen = torch.Generator().manual_seed(100)
    with torch.no_grad():
        for blk in teacher.image_encoder.blocks:
            n = blk.mlp.lin1.out_features
            blk.mlp.lin1.bias[torch.randperm(n, generator=gen)[:int(0.4 * n)]] = -30.0
    final = {}
    for importance in ("disturbed_taylor", "magnitude"):
        res = prune(teacher, train, out_dir=tmp_path / importance, ratio=0.5, importance=importance, num_images=8,
                    draws=4, recover=_recover(steps=8), eval_images=held, progress=False)
        final[importance] = [r["recovered"]["sqnr_db"] for r in res.stages]
        print(importance, res.summary(), sep="\n")
    taylor, magnitude = final["disturbed_taylor"], final["magnitude"]
    assert all(t > m + 1.0 for t, m in zip(taylor, magnitude)), final
