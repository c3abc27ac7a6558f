"""MobileSAM / TinySAM TinyViT encoders ("vit_t"): the module against a plain computation from the
state_dict, checkpoint loading, W8A8 swapped in (Triton under the interpreter) and the predictor."""

import collections
import copy

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from devices import gpu, smoke
from segment_anything import SamPredictor

import sam_fast
from sam_fast import SamFastConfig, SamFastPredictor
from sam_fast.checkpoint import load_sam
from sam_fast.models import TinyViT, build_vit_t, tinyvit_config
from sam_fast.models.tiny import sam_around
from sam_fast.quantize import calibrate, prepare_image, sqnr_db
from sam_fast.testing import INT8_EMBEDDING_MIN_SQNR_DB

# 128 x 128 input: stages at 32, 16, 8, 8 tokens a side; windows 5 (padded to 20), 3 (padded to 9) and
# 8 (the whole grid: no partition); head dims 16, 8, 16.
SMALL = dict(img_size=128, embed_dims=(16, 32, 40, 48), depths=(1, 2, 2, 1), num_heads=(1, 2, 5, 3),
             window_sizes=(7, 5, 3, 8), out_chans=32, num_classes=10)
IMAGES = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]


def _randomize(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.dtype == torch.long:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif t.dim() >= 2 and "attention_biases" not in name:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=gen) * fan_in ** -0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    return module.eval()


def _small_sam(seed=0):
    torch.manual_seed(seed)
    enc = _randomize(TinyViT(**SMALL), seed)
    return sam_around(enc, SMALL["img_size"], 32, 2, 64, 32).eval()


# ---- TinyViT written out from its definition, reading the state_dict directly ----

def _conv_bn(s, p, x, stride=1, pad=0, groups=1):
    y = F.conv2d(x, s[p + "c.weight"], None, stride, pad, groups=groups)
    return F.batch_norm(y, s[p + "bn.running_mean"], s[p + "bn.running_var"], s[p + "bn.weight"], s[p + "bn.bias"],
                        False, 0.0, 1e-5)


def _ln(s, p, x):
    return F.layer_norm(x, (x.shape[-1],), s[p + "weight"], s[p + "bias"], 1e-5)


def _window_attention(s, p, x, heads, window):
    """x (B', window * window, C): LayerNorm, per-head interleaved q|k|v, bias per (|dy|, |dx|)."""
    n, N, C = x.shape
    d = C // heads
    y = F.linear(_ln(s, p + "norm.", x), s[p + "qkv.weight"], s[p + "qkv.bias"]).view(n, N, heads, 3 * d)
    q, k, v = (y[..., i * d:(i + 1) * d].transpose(1, 2) for i in range(3))
    table = s[p + "attention_biases"]
    bias = torch.empty(heads, N, N, dtype=x.dtype)
    for i in range(N):
        for j in range(N):
            bias[:, i, j] = table[:, abs(i // window - j // window) * window + abs(i % window - j % window)]
    a = (q @ k.transpose(-2, -1)) * d ** -0.5 + bias
    o = (a.softmax(-1) @ v).transpose(1, 2).reshape(n, N, C)
    return F.linear(o, s[p + "proj.weight"], s[p + "proj.bias"])


def _tinyvit_reference(s, x, cfg):
    p = "image_encoder."
    x = _conv_bn(s, p + "patch_embed.seq.2.", F.gelu(_conv_bn(s, p + "patch_embed.seq.0.", x, 2, 1)), 2, 1)
    n = len(cfg["embed_dims"])
    for i in range(n):
        L = f"{p}layers.{i}."
        for b in range(cfg["depths"][i]):
            B_ = f"{L}blocks.{b}."
            if i == 0:
                hidden = F.gelu(_conv_bn(s, B_ + "conv1.", x))
                hidden = F.gelu(_conv_bn(s, B_ + "conv2.", hidden, 1, 1, groups=hidden.shape[1]))
                x = F.gelu(_conv_bn(s, B_ + "conv3.", hidden) + x)
                continue
            Bn, C, H, W = x.shape
            ws = cfg["window_sizes"][i]
            t = x.permute(0, 2, 3, 1)
            ph, pw = -H % ws, -W % ws
            t = F.pad(t, (0, 0, 0, pw, 0, ph))
            Hp, Wp = H + ph, W + pw
            win = t.reshape(Bn, Hp // ws, ws, Wp // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)
            a = _window_attention(s, B_ + "attn.", win, cfg["num_heads"][i], ws)
            a = a.reshape(Bn, Hp // ws, Wp // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(Bn, Hp, Wp, C)
            x = x + a[:, :H, :W].permute(0, 3, 1, 2)
            x = _conv_bn(s, B_ + "local_conv.", x, 1, 1, groups=C)
            t = x.permute(0, 2, 3, 1)
            m = F.linear(_ln(s, B_ + "mlp.norm.", t), s[B_ + "mlp.fc1.weight"], s[B_ + "mlp.fc1.bias"])
            t = t + F.linear(F.gelu(m), s[B_ + "mlp.fc2.weight"], s[B_ + "mlp.fc2.bias"])
            x = t.permute(0, 3, 1, 2)
        if i < n - 1:
            D = f"{L}downsample."
            stride = 2 if i < n - 2 else 1  # the last merge keeps the resolution
            y = F.gelu(_conv_bn(s, D + "conv1.", x))
            y = F.gelu(_conv_bn(s, D + "conv2.", y, stride, 1, groups=y.shape[1]))
            x = _conv_bn(s, D + "conv3.", y)

    def ln2d(y, q):
        y = F.layer_norm(y.permute(0, 2, 3, 1), (y.shape[1],), s[q + "weight"], s[q + "bias"], 1e-6)
        return y.permute(0, 3, 1, 2)

    y = ln2d(F.conv2d(x, s[p + "neck.0.weight"]), p + "neck.1.")
    return ln2d(F.conv2d(y, s[p + "neck.2.weight"], padding=1), p + "neck.3.")


def _images(enc, images):
    from sam_fast.surgery import PIXEL_MEAN, PIXEL_STD

    return torch.cat([prepare_image(im, enc.img_size, PIXEL_MEAN, PIXEL_STD, "cpu", torch.float32)
                      for im in images])


@pytest.fixture(scope="module")
def small():
    return _small_sam()


def test_tinyvit_matches_its_definition(small):
    x = _images(small.image_encoder, IMAGES[:2])
    state = {k: v.double() if v.is_floating_point() else v for k, v in small.state_dict().items()}
    with torch.no_grad():
        out = small.image_encoder(x)
        ref = _tinyvit_reference(state, x.double(), SMALL)
    assert out.shape == (2, 32, 8, 8)
    assert float((out.double() - ref).abs().max()) < 1e-5 * float(ref.abs().max())


def test_vit_t_checkpoint_loads(tmp_path, small, capsys):
    sam = _randomize(build_vit_t(), seed=1)
    state = sam.state_dict()
    assert tinyvit_config(state) == dict(img_size=1024, embed_dims=(64, 128, 160, 320), depths=(2, 2, 6, 2),
                                         num_heads=(0, 4, 5, 10), window_sizes=(0, 7, 14, 7), mlp_ratio=4.0,
                                         mbconv_expand_ratio=4.0, out_chans=256, num_classes=1000)
    # some releases saved the (constant) bias index tables too
    idx = {f"image_encoder.{n}": b for n, b in sam.image_encoder.named_buffers() if n.endswith("attention_bias_idxs")}
    assert len(idx) == 10
    path = tmp_path / "mobile_sam.pt"
    torch.save({**state, **idx}, path)
    for kind in ("vit_t", "auto"):
        loaded = load_sam(str(path), kind)
        assert isinstance(loaded.image_encoder, TinyViT)
        got = loaded.state_dict()
        assert set(got) == set(state) and all(torch.equal(got[k], v) for k, v in state.items())
    with torch.no_grad():
        assert loaded.image_encoder(torch.zeros(1, 3, 1024, 1024)).shape == (1, 256, 64, 64)
    with pytest.raises(ValueError, match="does not match model type vit_b.*looks like a vit_t"):
        load_sam(str(path), "vit_b")
    nested = tmp_path / "tinysam.pth"  # TinySAM / training checkpoints: {"model": state_dict}
    torch.save({"model": state}, nested)
    got = load_sam(str(nested), "vit_t").state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())
    from sam_fast.cli import main

    assert main(["inspect", str(nested)]) == 0
    out = capsys.readouterr().out
    assert "family: TinyViT (vit_t" in out and 'attention="exact" swaps in its fast forms' in out
    assert "swaps 40 of 40 linears" in out
    # a TinyViT with another decoder width and stage layout loads with "auto" too
    path = tmp_path / "small.pt"
    torch.save(small.state_dict(), path)
    with pytest.raises(ValueError, match="decoder_heads"):
        load_sam(str(path), "auto")


def test_tinyvit_int8(small, tmp_path):
    """W8A8 in every TinyViT block: LayerNorms fused into the int8 GEMMs, fc2 static; undo() and a
    state_dict round trip are exact."""
    enc = small.image_encoder
    x = _images(enc, IMAGES[:1])
    cal = calibrate(small, IMAGES, num_images=3, progress=False)
    blocks = [f"layers.{i}.blocks.{b}" for i, d in enumerate(SMALL["depths"]) if i for b in range(d)]
    assert list(cal.layers) == [f"{b}.{r}" for b in blocks for r in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert all(cal.layers[f"{b}.mlp.fc2"].mode == "static" for b in blocks) and not cal.left_float
    assert "layers.2.blocks.1.mlp.fc2" in str(cal)
    cfg = SamFastConfig(attention="none", quantize="int8", calibration=cal, backend="triton")
    originals = {name: m for name, m in enc.named_modules() if name.endswith((".attn", ".mlp"))}
    with torch.no_grad():
        ref = enc(x)
        handle = sam_fast.apply(small, cfg)
        # the fusions are swaps: fused forms sharing the original's parameters, the model classes untouched
        fused = {name: type(m).__name__ for name, m in enc.named_modules() if name in originals}
        assert set(fused.values()) == {"FusedInt8NormAttention", "FusedInt8NormMlp"}
        for n, m in originals.items():  # same parameters under the same keys (attention_biases included)
            got, want = enc.get_submodule(n).state_dict(), m.state_dict()
            assert list(got) == list(want) and all(got[k].data_ptr() == want[k].data_ptr() for k in want)
        with sam_fast.record_backends() as rec:
            out = enc(x)
        torch.save(small.state_dict(), tmp_path / "w8a8.pt")
        handle.undo()
        assert all(enc.get_submodule(n) is m for n, m in originals.items())
        assert torch.equal(enc(x), ref)
        fresh = _small_sam(seed=5)
        fresh_handle = sam_fast.apply(fresh, SamFastConfig(attention="none", quantize="int8", backend="triton"))
        fresh.load_state_dict(torch.load(tmp_path / "w8a8.pt"))
        assert torch.equal(fresh.image_encoder(x), out)
        fresh_handle.undo()
    assert rec.backends() == {"triton"} and not rec.fallbacks
    # per block: LN-quantize for qkv and fc1, GEMMs for qkv, proj, fc1 (writing int8) and fc2
    assert sum(op == "layer_norm_quantize" for op, _ in rec.calls) == 2 * len(blocks)
    assert sum(op == "int8_linear" for op, _ in rec.calls) == 4 * len(blocks)
    assert sqnr_db(ref, out) >= INT8_EMBEDDING_MIN_SQNR_DB


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_forms_compute_the_tinyvit(small, dtype, cpu_rules):
    """attention="exact" on a TinyViT swaps in its fast forms (folded convolutions, channels-last input, the fused
    attention with the bias it takes, the MLP's epilogues): the same function by the tolerance rule against float64,
    the parameters the original's under the same keys, a contiguous embedding; undo() gives the original back."""
    from sam_fast.nn import tinyvit as fast
    from sam_fast.ops.dilated_attention_cpu import compute_dtype, fused_bias_kernel
    from sam_fast.testing import FWD_FACTOR, check_against_reference

    cpu_rules(epilogue_min_bytes=0)  # the MLP epilogues at these tiny widths too
    model = copy.deepcopy(small).to(dtype)
    enc = model.image_encoder
    x = _images(enc, IMAGES[:2])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = enc(x.to(dtype))
        exact = copy.deepcopy(small).double().image_encoder(x.double())
        same_precision = copy.deepcopy(small).image_encoder(x) if dtype == torch.float32 else ref
        handle = sam_fast.apply(model, SamFastConfig())
        kinds = collections.Counter(type(m).__name__ for m in enc.modules())
        n_blocks = sum(SMALL["depths"][1:])
        assert kinds["FastTinyViTBlock"] == kinds["FastTinyViTAttention"] == n_blocks and kinds["TinyViTBlock"] == 0
        assert kinds["ChannelsLastPatchEmbed"] == 1 and kinds["Conv2dBN"] == 0
        assert kinds["FastMBConv"] == SMALL["depths"][0] and kinds["FastPatchMerging"] == len(SMALL["depths"]) - 1
        assert kinds["FoldedConv2dBN"] == sum(isinstance(m, fast.Conv2dBN) for m in small.modules())
        got = model.state_dict()
        assert list(got) == list(state) and all(torch.equal(got[k], v) for k, v in state.items())
        with sam_fast.record_backends() as rec:
            out = enc(x.to(dtype))
        assert out.is_contiguous() and out.shape == ref.shape
        check_against_reference(f"TinyViT fast forms {dtype}", out.double(), exact, same_precision.double(), dtype,
                                FWD_FACTOR)
        # every block's attention through the C++ window kernel where the CPU computes in the dtype; float32 on the
        # CPU: both MLP linears of every block through fused_linear (GELU, then the residual), and after the
        # kernel the projection with its residual
        kernel = compute_dtype(dtype) == dtype and fused_bias_kernel()
        epilogues = sum(op == "fused_linear" for op, _ in rec.calls)
        import sam_fast.ops.linear_epilogue as le  # bf16: oneDNN's bf16 GEMM where the CPU has bf16 arithmetic

        fused = dtype == torch.float32 or (compute_dtype(dtype) == dtype and le._onednn_linear_present())
        assert epilogues == ((2 + kernel) * n_blocks if fused else 0)
        assert sum(op == "window_bias_attention" for op, _ in rec.calls) == (n_blocks if kernel else 0)
        handle.undo()
        assert not any(isinstance(m, fast._FastForm) for m in enc.modules())
        assert not enc._forward_hooks
        assert torch.equal(enc(x.to(dtype)), ref)


def test_fast_forms_fall_back_where_they_would_change_something(small):
    """In training mode the BatchNorms use batch statistics (and update their running ones) as the original's do;
    a hook on a module the fast form would skip still runs; dilated patterns and an explicit Triton backend for a
    float TinyViT are refused, not ignored."""
    x = _images(small.image_encoder, IMAGES[:2])
    model, twin = copy.deepcopy(small), copy.deepcopy(small)
    with sam_fast.apply(model, SamFastConfig()):
        model.train()
        twin.train()
        # (float rounding apart: the fused attention and channels-last convolutions sum in other orders; running
        # statistics in a folded convolution would be off by the whole normalisation)
        torch.testing.assert_close(model.image_encoder(x), twin.image_encoder(x), rtol=1e-3, atol=1e-3)
        for (name, a), b in zip(model.named_buffers(), twin.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
        model.eval()
        seen = []
        bn = model.image_encoder.layers[1].blocks[0].local_conv.bn
        hook = bn.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        with torch.no_grad():
            model.image_encoder(x)
        hook.remove()
        assert len(seen) == 1
        # outputs a hook keeps are not written over by the in-place residuals
        kept = []
        blk = model.image_encoder.layers[2].blocks[0]
        hooks = [m.register_forward_hook(lambda m, i, o: kept.append((o, o.clone())))
                 for m in (blk.attn.proj, blk.mlp.fc2)]
        with torch.no_grad():
            model.image_encoder(x)
        for h in hooks:
            h.remove()
        assert len(kept) == 2 and all(torch.equal(o, c) for o, c in kept)
    with pytest.raises(ValueError, match="no ViT blocks for dilated attention"):
        sam_fast.apply(model, SamFastConfig(sam_fast.Dilated(sam_fast.Branch((4, 4), 2))))
    with pytest.raises(ValueError, match="backend='triton'.*use backend='auto'"):
        sam_fast.apply(model, SamFastConfig(backend="triton"))
    assert not any(type(m).__name__.startswith(("Fast", "Folded", "ChannelsLast")) for m in model.modules())


def test_fast_forms_with_int8(small):
    """exact + W8A8: the fast attention takes the int8 qkv with its LayerNorm fused into the quantization; the MLP
    takes the fused int8 form; the embedding keeps int8's SQNR."""
    enc = small.image_encoder
    x = _images(enc, IMAGES[:1])
    with torch.no_grad():
        ref = enc(x)
        with sam_fast.apply(small, SamFastConfig(quantize="int8", backend="triton")):
            kinds = collections.Counter(type(m).__name__ for m in enc.modules())
            with sam_fast.record_backends() as rec:
                out = enc(x)
        assert torch.equal(enc(x), ref)
    n_blocks = sum(SMALL["depths"][1:])
    assert kinds["FastTinyViTAttention"] == kinds["FusedInt8NormMlp"] == n_blocks
    # qkv and fc1 per block, and the qkv of a padded token (norm(0)) in the blocks whose grid windows do not tile
    res = [SMALL["img_size"] // 4 // 2 ** min(i, len(SMALL["depths"]) - 2) for i in range(len(SMALL["depths"]))]
    padded = sum(d for i, d in enumerate(SMALL["depths"]) if i and res[i] % SMALL["window_sizes"][i])
    assert padded == 4 and sum(op == "layer_norm_quantize" for op, _ in rec.calls) == 2 * n_blocks + padded
    assert rec.backends("int8_linear") == {"triton"} and not rec.fallbacks
    assert rec.backends("window_bias_attention") == {"cpu"}  # the attention kernel: C++, whatever the int8 backend
    assert sum(op == "window_bias_attention" for op, _ in rec.calls) == n_blocks
    assert sqnr_db(ref, out) >= INT8_EMBEDDING_MIN_SQNR_DB


@gpu
@smoke  # (not a kernel: the forms are PyTorch ops on the GPU; one cheap check in the one GPU stage that runs tests)
def test_fast_forms_on_the_gpu():
    """MobileSAM's geometry at 1024 px on CUDA in bf16: the fast forms (folded convolutions, channels-last, the fused
    attention with its 4-D bias; the C++ window kernel is the CPU's) compute the original's embedding by the
    tolerance rule against float64, and undo() restores it."""
    from sam_fast.testing import FWD_FACTOR, check_against_reference

    sam = _randomize(build_vit_t(), seed=3).cuda()
    enc = sam.image_encoder
    x = torch.randn(1, 3, 1024, 1024, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        exact = copy.deepcopy(enc).double()(x.double())
        bf16 = enc.to(torch.bfloat16)
        ref = bf16(x.bfloat16())
        with sam_fast.apply(bf16, SamFastConfig()):
            out = bf16(x.bfloat16())
        assert torch.equal(bf16(x.bfloat16()), ref)
    check_against_reference("TinyViT fast forms, CUDA bf16", out.double(), exact, ref.double(), torch.bfloat16,
                            FWD_FACTOR)


def test_model_classes_are_plain_pytorch():
    """The W8A8 fusions are swaps done by sam_fast.apply: the model modules never refer to int8."""
    import inspect

    from sam_fast.models import tinyvit, vit

    for mod in (tinyvit, vit):
        src = inspect.getsource(mod)
        assert "Int8Linear" not in src.replace("sam_fast.nn.Int8Linear", "") and "quantized import" not in src


def test_predictor_on_tinyvit(small):
    image = IMAGES[1][::4, ::4]
    sa, fast = SamPredictor(small), SamFastPredictor(small)
    sa.set_image(image)
    fast.set_image(image)
    kw = dict(point_coords=np.array([[40.0, 30.0]]), point_labels=np.array([1]), multimask_output=True)
    _, iou_ref, low_ref = sa.predict(**kw)
    _, iou, low = fast.predict(**kw)
    np.testing.assert_allclose(iou, iou_ref, atol=1e-5)
    np.testing.assert_allclose(low, low_ref, atol=1e-4)
