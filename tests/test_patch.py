"""Swapping fused attention into a segment_anything ImageEncoderViT (CPU, Triton interpreter)."""

import dataclasses

import pytest
import torch

import sam_fast
from sam_fast.models import tiny_image_encoder
from sam_fast.nn import SamFastBlock
from sam_fast.testing import FWD_FACTOR, check_against_reference


def _image(size, seed=0):
    """A real photo (scikit-image's astronaut), resized and normalised as SAM's preprocess would."""
    from skimage import data

    img = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float()[None]
    img = torch.nn.functional.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    return (img - mean) / std


# (embed_dim, heads) -> head dims 14 (SlimSAM-77) and 80 (SAM ViT-H); window 3 on an 8x8 grid pads to 9x9.
@pytest.mark.parametrize("embed_dim,heads", [(28, 2), (160, 2)])
def test_patched_encoder_matches_original(embed_dim, heads):
    enc = tiny_image_encoder(img_size=128, embed_dim=embed_dim, num_heads=heads, depth=4, window_size=3,
                             global_attn_indexes=(1, 3))
    x = _image(128)
    with torch.no_grad():
        expected = enc(x)
        exact = enc.double()(x.double())
        enc.float()
        keys = list(enc.state_dict())
        handle = sam_fast.apply(enc, sam_fast.SamFastConfig(attention="exact", backend="triton"))
        assert len(handle.swapped) == 4 and all(isinstance(b, SamFastBlock) for b in enc.blocks)
        assert list(enc.state_dict()) == keys
        with sam_fast.record_backends() as rec:
            got = enc(x)
        assert rec.backends("dilated_attention") == {"triton"}
        assert len([c for c in rec.calls if c[0] == "dilated_attention"]) == 4
        check_against_reference("embedding", got, exact, expected, torch.float32, FWD_FACTOR)

        again = sam_fast.apply(enc, sam_fast.SamFastConfig(backend="triton"))  # harmless
        assert again.swapped == [] and all(isinstance(b, SamFastBlock) for b in enc.blocks)

        handle.undo()
        assert not any(isinstance(b, SamFastBlock) for b in enc.blocks)
        assert torch.equal(enc(x), expected)
        handle.undo()  # twice is harmless too


@pytest.mark.cpu_plain_gate
def test_tiny_cpu_blocks_run_plain_pytorch_at_inference_only(cpu_rules):
    """On the CPU a block with at most the policy's plain_max_tokens tokens runs plain PyTorch (sam_block_attention's
    reference: segment_anything's partition, SDPA with the bias as mask) at inference under backend="auto", with the
    same embedding; with autograd recording, with a forced backend, or above the limit it runs dilated_attention."""
    from sam_fast import cpu_policy

    assert cpu_policy.policy().plain_max_tokens == 1024
    enc = tiny_image_encoder(img_size=128, embed_dim=28, num_heads=2, depth=4, window_size=3,
                             global_attn_indexes=(1, 3))  # 8 x 8 tokens, windows padded to 9 x 9
    x = _image(128)
    with torch.no_grad():
        expected = enc(x)
        exact = enc.double()(x.double())
        enc.float()
    with sam_fast.apply(enc, sam_fast.SamFastConfig(attention="exact")):
        with torch.no_grad(), sam_fast.record_backends() as rec:
            got = enc(x)
        assert rec.backends("dilated_attention") == set()
        assert "reference" in rec.backends("sam_block_attention")
        check_against_reference("embedding", got, exact, expected, torch.float32, FWD_FACTOR)
        with torch.no_grad(), sam_fast.record_backends() as rec:
            cpu_rules(plain_max_tokens=63)
            enc(x)
        assert rec.backends("dilated_attention") == {"cpu"}
        cpu_rules(plain_max_tokens=1024)
        with sam_fast.record_backends() as rec:
            enc(x).sum().backward()  # parameters require grad: the differentiable path
        assert rec.backends("dilated_attention") == {"cpu"}
    with sam_fast.apply(enc, sam_fast.SamFastConfig(attention="exact", backend="cpu")):
        with torch.no_grad(), sam_fast.record_backends() as rec:
            enc(x)
        assert rec.backends("dilated_attention") == {"cpu"}


def test_patched_encoder_backward_runs_through_kernel():
    enc = tiny_image_encoder(img_size=64, embed_dim=32, num_heads=2, depth=2, window_size=3,
                             global_attn_indexes=(1,)).train()
    x = _image(64)
    ref_grads = torch.autograd.grad(enc(x).square().mean(), list(enc.parameters()))
    with sam_fast.apply(enc, sam_fast.SamFastConfig(backend="triton")):
        with sam_fast.record_backends() as rec:
            grads = torch.autograd.grad(enc(x).square().mean(), list(enc.parameters()))
        assert rec.backends("dilated_attention") == {"triton"}
    for (name, _), g, r in zip(enc.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=2e-3, msg=lambda m: f"{name}: {m}")


def test_apply_rejects_bad_arguments():
    enc = tiny_image_encoder(img_size=64, embed_dim=32, depth=2, global_attn_indexes=(1,))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        sam_fast.apply("model")
    with pytest.raises(TypeError, match="config must be a sam_fast.SamFastConfig"):
        sam_fast.apply(enc, {"attention": "exact"})
    with pytest.raises(ValueError, match="attention must be one of"):
        sam_fast.SamFastConfig(attention="fastest")
    with pytest.raises(ValueError, match="backend must be one of"):
        sam_fast.SamFastConfig(backend="gpu")


def test_rel_pos_tables_are_resized_like_segment_anything():
    """A global block whose table was trained for another grid size goes through resize_rel_pos."""
    enc = tiny_image_encoder(img_size=64, embed_dim=32, depth=2, global_attn_indexes=(1,))
    blk = enc.blocks[1]
    with torch.no_grad():
        blk.attn.rel_pos_h = torch.nn.Parameter(torch.randn(9, 16) * 0.3)   # trained for 5 rows, grid has 4
        blk.attn.rel_pos_w = torch.nn.Parameter(torch.randn(11, 16) * 0.3)
        x = _image(64)
        expected = enc(x)
        with sam_fast.apply(enc, sam_fast.SamFastConfig(backend="triton")):
            with sam_fast.record_backends() as rec:
                got = enc(x)
    assert ("resize_rel_pos", "cpu") in rec.calls
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_nested_config_forms_say_each_choice_once():
    """SamFastConfig(attention=Dilated(pattern, blocks), quantize=Int8(cal)) equals the flat form, swaps the
    same modules, and cannot be combined with the flat fields it replaces."""
    from sam_fast import Branch, Dilated, Int8, SamFastConfig

    pat = {1: Branch((4, 4), 2)}
    nested = SamFastConfig(attention=Dilated(pat), quantize=Int8(), backend="reference")
    flat = SamFastConfig(attention="dilated", dilated_pattern=pat, quantize="int8", backend="reference")
    assert nested == flat and nested.chosen_blocks() == (1,)
    enc = tiny_image_encoder(img_size=128, embed_dim=32, num_heads=2, depth=4, window_size=3,
                             global_attn_indexes=(1, 3))
    x = _image(128)
    with torch.no_grad():
        with sam_fast.apply(enc, nested) as h:
            got, swapped = enc(x), h.swapped
        with sam_fast.apply(enc, flat) as h:
            assert torch.equal(enc(x), got) and h.swapped == swapped
    assert [b.pattern for b in enc.blocks if isinstance(b, SamFastBlock)] == []  # undone
    with pytest.raises(ValueError, match="already holds the pattern"):
        SamFastConfig(attention=Dilated(pat), dilated_pattern=pat)
    with pytest.raises(ValueError, match="already holds the calibration"):
        SamFastConfig(quantize=Int8(), calibration=object())
    with pytest.raises(ValueError, match="Dilated needs a pattern"):
        Dilated(None)
    with pytest.raises(TypeError, match="Int8 calibration must be a sam_fast.quantize.Calibration"):
        Int8("cal.json")
    with pytest.raises(TypeError, match="attention must be one of"):
        SamFastConfig(attention=Branch((4, 4), 2))
    with pytest.raises(TypeError, match="quantize must be None, 'int8' or a sam_fast.Int8"):
        SamFastConfig(quantize=8)


def test_config_is_stored_nested_and_typed():
    """Whatever the spelling, a config holds attention as "exact", "none" or a Dilated, and quantize as None or an
    Int8: one name for the pattern (Dilated.pattern, normalised to a tuple of Branch, or a dict of them); each part
    checks itself when it is made, so a bad pattern fails at Dilated(...), not at apply()."""
    from sam_fast import Branch, Dilated, Int8, SamFastConfig

    b = Branch((4, 4), 2)
    cfg = SamFastConfig(attention="dilated", dilated_pattern=[b], dilated_blocks=[0, 2], quantize="int8")
    assert cfg.attention == Dilated((b,), (0, 2)) and cfg.dilated is cfg.attention
    assert cfg.quantize == Int8(None) and cfg.quantize.calibration is None
    assert not hasattr(cfg, "dilated_pattern") and not hasattr(cfg, "calibration")
    assert SamFastConfig().attention == "exact" and SamFastConfig().dilated is None and SamFastConfig().quantize is None
    assert SamFastConfig(attention=Dilated(b)).chosen_blocks() == "global"
    per_block = Dilated({3: b, 1: [b, Branch(16)]})
    assert per_block.pattern == {3: (b,), 1: (b, Branch(16))} and per_block.chosen_blocks() == (1, 3)
    with pytest.raises(TypeError, match="dilated_pattern\\[1\\] must be None, a sam_fast.Branch"):
        Dilated({1: "2x2"})
    with pytest.raises(TypeError, match="dilated_pattern keys must be block indices"):
        Dilated({True: b})
    with pytest.raises(ValueError, match="dilated_blocks \\[5\\] have no entry"):
        Dilated({1: b}, [5])
    with pytest.raises(ValueError, match="block indices count from 0"):
        Dilated(b, [-1])
    with pytest.raises(ValueError, match="dilated_blocks must be one of"):
        Dilated(b, "odd")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.backend = "cpu"
    with pytest.raises(ValueError, match="attention='dilated' needs dilated_pattern"):
        SamFastConfig(attention="dilated")
    with pytest.raises(ValueError, match="need attention='dilated'"):
        SamFastConfig(dilated_blocks=[1])
    with pytest.raises(ValueError, match="calibration needs quantize='int8'"):
        SamFastConfig(calibration=object())
