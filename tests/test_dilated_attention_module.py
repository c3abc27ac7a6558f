"""DilatedAttention module, SamFastConfig(attention="dilated") and a swapped tiny ImageEncoderViT."""

import pytest
import torch
from test_patch import _image

import sam_fast
from sam_fast import Branch
from sam_fast.models import tiny_image_encoder
from sam_fast.nn import DilatedAttention, SamFastBlock
from sam_fast.testing import BWD_FACTOR, FWD_FACTOR, check_against_reference


def _sam_attention(dim=32, heads=2, input_size=(6, 6), seed=0):
    from segment_anything.modeling.image_encoder import Attention

    torch.manual_seed(seed)
    attn = Attention(dim, num_heads=heads, qkv_bias=True, use_rel_pos=True, rel_pos_zero_init=False,
                     input_size=input_size)
    with torch.no_grad():
        attn.rel_pos_h.normal_(std=0.3)
        attn.rel_pos_w.normal_(std=0.3)
    return attn


def test_dilated_attention_loads_sam_weights_and_dense_is_sam():
    sam = _sam_attention()
    mod = DilatedAttention(32, num_heads=2, use_rel_pos=True, input_size=(6, 6), backend="triton")
    assert list(mod.state_dict()) == list(sam.state_dict())
    mod.load_state_dict(sam.state_dict())
    x = torch.randn(2, 6, 6, 32)
    with torch.no_grad():
        expected, exact = sam(x), sam.double()(x.double())
        got = mod(x)
    check_against_reference("dense DilatedAttention", got, exact, expected, torch.float32, FWD_FACTOR)


@pytest.mark.parametrize("pattern", [Branch((4, 4), (2, 2)), [Branch((3, 3), 1), Branch((6, 6), (2, 2))]],
                         ids=["one-branch", "two-branch"])
def test_dilated_attention_module_kernel_vs_reference(pattern):
    sam = _sam_attention()
    x = torch.randn(1, 6, 6, 32)
    outs, grads = [], []
    for backend in ("triton", "reference"):
        mod = DilatedAttention.from_attention(sam, pattern, backend=backend)
        assert mod.qkv is sam.qkv and mod.rel_pos_h is sam.rel_pos_h  # shared, not copied
        xl = x.clone().requires_grad_()
        out = mod(xl)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), [xl, sam.rel_pos_h, sam.qkv.weight]))
    torch.testing.assert_close(outs[0], outs[1], atol=2e-5, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # The pattern changes the result: it is not silently ignored.
    dense = DilatedAttention.from_attention(sam, None, backend="reference")(x)
    assert (dense - outs[1]).abs().max() > 1e-3


def test_swapped_encoder_dilated_forward_backward_on_triton_and_undo():
    enc = tiny_image_encoder(img_size=128, embed_dim=32, num_heads=4, depth=4, window_size=3,
                             global_attn_indexes=(1, 3)).train()
    x = _image(128)
    with torch.no_grad():
        original = enc(x)
    pattern = [Branch((4, 4), 1), Branch((8, 8), (2, 2))]  # 8x8 token grid
    config = sam_fast.SamFastConfig(attention="dilated", dilated_pattern=pattern, backend="triton")
    handle = sam_fast.apply(enc, config)
    assert [b.pattern is not None for b in enc.blocks] == [False, True, False, True]
    with sam_fast.record_backends() as rec:
        loss = enc(x).square().mean()
        grads = torch.autograd.grad(loss, list(enc.parameters()))
    assert rec.backends("dilated_attention") == {"triton"} and not rec.fallbacks
    # Same swapped model on the reference backend: PyTorch's own error is the yardstick.
    for blk in enc.blocks:
        blk.backend = "reference"
    loss_r = enc(x).square().mean()
    grads_r = torch.autograd.grad(loss_r, list(enc.parameters()))
    enc.double()
    loss_x = enc(x.double()).square().mean()
    grads_x = torch.autograd.grad(loss_x, list(enc.parameters()))
    enc.float()
    check_against_reference("loss", loss, loss_x, loss_r, torch.float32, FWD_FACTOR)
    for i, (g, gr, gx) in enumerate(zip(grads, grads_r, grads_x)):
        check_against_reference(f"grad[{i}]", g, gx, gr, torch.float32, BWD_FACTOR)
    assert (loss - original.square().mean()).abs() > 1e-6  # the dilated blocks really changed the model
    handle.undo()
    assert not any(isinstance(b, SamFastBlock) for b in enc.blocks)
    with torch.no_grad():
        assert torch.equal(enc(x), original)


def test_per_block_patterns_and_block_choices():
    enc = tiny_image_encoder(img_size=64, embed_dim=16, num_heads=2, depth=4, window_size=2,
                             global_attn_indexes=(1, 3))
    a, b = Branch((2, 2), (2, 2)), [Branch(8, 1), Branch(16, 2)]  # 4x4 token grid
    with torch.no_grad():
        shape = enc(_image(64)).shape
    cases = [
        (dict(dilated_pattern=a), [None, (a,), None, (a,)]),
        (dict(dilated_pattern=a, dilated_blocks="all"), [(a,)] * 4),
        (dict(dilated_pattern=a, dilated_blocks=[0, 3]), [(a,), None, None, (a,)]),
        (dict(dilated_pattern={0: a, 2: b}), [(a,), None, tuple(b), None]),
    ]
    for kw, expected in cases:
        with sam_fast.apply(enc, sam_fast.SamFastConfig(attention="dilated", **kw)):
            assert [blk.pattern for blk in enc.blocks] == expected
            with torch.no_grad():
                assert enc(_image(64)).shape == shape
    # Re-applying on top updates the patterns, and that handle's undo restores the previous ones.
    with sam_fast.apply(enc, sam_fast.SamFastConfig()):
        with sam_fast.apply(enc, sam_fast.SamFastConfig(attention="dilated", dilated_pattern=a)):
            assert enc.blocks[1].pattern == (a,)
        assert all(blk.pattern is None for blk in enc.blocks)


def test_dilated_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="attention='dilated' needs dilated_pattern"):
        sam_fast.SamFastConfig(attention="dilated")
    with pytest.raises(ValueError, match="need attention='dilated'"):
        sam_fast.SamFastConfig(dilated_pattern=Branch(4))
    with pytest.raises(TypeError, match=r"dilated_pattern\[1\] must be a sam_fast.Branch"):
        sam_fast.SamFastConfig(attention="dilated", dilated_pattern=[Branch(4), 4])
    with pytest.raises(ValueError, match="dilated_blocks must be one of"):
        sam_fast.SamFastConfig(attention="dilated", dilated_pattern=Branch(4), dilated_blocks="some")
    with pytest.raises(ValueError, match=r"dilated_blocks \[2\] have no entry"):
        sam_fast.SamFastConfig(attention="dilated", dilated_pattern={1: Branch(4)}, dilated_blocks=[1, 2])
    enc = tiny_image_encoder(img_size=64, embed_dim=16, num_heads=2, depth=2, window_size=2, global_attn_indexes=(1,))
    with pytest.raises(ValueError, match=r"dilated blocks \[5\] do not exist"):
        sam_fast.apply(enc, sam_fast.SamFastConfig(attention="dilated", dilated_pattern=Branch(4), dilated_blocks=[5]))
    assert not any(isinstance(b, SamFastBlock) for b in enc.blocks)  # nothing half-applied
    with pytest.raises(ValueError, match="dim must be a positive multiple of num_heads"):
        DilatedAttention(30, num_heads=4)
    with pytest.raises(ValueError, match="backend must be one of"):  # at construction, not at the first forward
        DilatedAttention(32, num_heads=4, backend="gpu")
    with pytest.raises(ValueError, match=r"C = dim = 32, got shape \(1, 4, 4, 16\)"):
        DilatedAttention(32, num_heads=4)(torch.randn(1, 4, 4, 16))
