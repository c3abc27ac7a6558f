"""NaN in, NaN out, on every backend: a NaN or an infinity in q, k, v, a rel-pos table, the softmax scale or a
model weight reaches exactly the outputs it reaches in PyTorch (softmax makes a whole row NaN once one of its
logits is NaN or +inf), never a finite number computed around it."""

import math

import pytest
import torch

import sam_fast
from sam_fast import Branch
from sam_fast.models import tiny_image_encoder
from sam_fast.ops import dilated_attention_cpu as cpu_attention
from sam_fast.ops._ext import extension_error
from sam_fast.ops.sam_block_attention import sam_block_attention

NAN, INF = float("nan"), float("inf")


def _qkv(B=1, N=256, H=2, D=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, N, H, D, generator=g).to(dtype) for _ in range(3)]


def _tables(grid, D, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2 * grid[0] - 1, D, generator=g) * 0.1, torch.randn(2 * grid[1] - 1, D, generator=g) * 0.1


def _nan_rows(out):
    """(B, N, H) where an output row holds a NaN."""
    return torch.isnan(out.float()).any(-1)


def _poisoned(tensors: dict, spots: dict, where: str) -> dict:
    """Copies of ``tensors`` with the value of ``spots[where]`` = (name, index, value) put in place."""
    out = {n: t.clone() for n, t in tensors.items()}
    name, index, value = spots[where]
    out[name][index] = value
    return out


# where the attention tests put a NaN or an inf: q, k, v (B, N, H, D) on a 16 x 16 grid, the rel-pos table at
# offset 0 (used by every pattern)
ATTENTION_SPOTS = {"q": ("q", (0, 37, 1, 3), NAN), "k": ("k", (0, 90, 0, 0), NAN), "k_inf": ("k", (0, 90, 0, 0), INF),
                   "v": ("v", (0, 200, 1, 2), NAN), "rel_pos_h": ("th", (15, 0), NAN),
                   "q_inf": ("q", (0, 37, 0, 1), -INF)}


def _poison(q, k, v, tables, where):
    t = _poisoned({"q": q, "k": k, "v": v, "th": tables[0], "tw": tables[1]}, ATTENTION_SPOTS, where)
    return t["q"], t["k"], t["v"], (t["th"], t["tw"])


BACKENDS = ["reference", "cpu", "triton"]
# on a 16 x 16 grid: segments of 256 and 144 keys take the CPU backend's C++ kernel (128 keys and up)
PATTERNS = {"dense": None, "window": Branch((12, 12)), "dilated": [Branch((16, 16), 2), Branch((12, 12))]}


@pytest.mark.parametrize("where", ["q", "k", "k_inf", "v", "rel_pos_h", "q_inf"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_dilated_attention_propagates_nonfinite_inputs(backend, pattern, where):
    grid = (16, 16)
    q, k, v = _qkv()
    q, k, v, (th, tw) = _poison(q, k, v, _tables(grid, 16), where)
    kw = dict(grid=grid, rel_pos_h=th, rel_pos_w=tw, return_lse=True)
    want, want_lse = sam_fast.dilated_attention(q.double(), k.double(), v.double(), PATTERNS[pattern],
                                                backend="reference", **{**kw, "rel_pos_h": th.double(),
                                                                        "rel_pos_w": tw.double()})
    with sam_fast.record_backends() as rec:
        got, lse = sam_fast.dilated_attention(q, k, v, PATTERNS[pattern], backend=backend, **kw)
    if backend == "cpu" and cpu_attention.fused_bias_kernel():
        assert ("rel_pos_attention", "cpu") in rec.calls  # the C++ kernel ran
    poisoned = _nan_rows(want)
    assert poisoned.any()  # the case poisons something
    assert torch.equal(_nan_rows(got), poisoned)
    if backend == "triton" and where == "q_inf":
        # a -inf query channel makes +inf and NaN logits in one row: the reference's lse is NaN, the Triton
        # kernel's +inf (its row max drops NaN, and telling the two apart would cost the inner loop a reduction)
        assert torch.equal(torch.isnan(lse) | torch.isposinf(lse), torch.isnan(want_lse) | torch.isposinf(want_lse))
    else:
        assert torch.equal(torch.isnan(lse), torch.isnan(want_lse))
        assert torch.equal(torch.isposinf(lse), torch.isposinf(want_lse))
    torch.testing.assert_close(got[~poisoned].double(), want[~poisoned], rtol=1e-4, atol=1e-4)


# the same for the rel_pos_attention op: q, k (S, H, L, D), rel_h (S, H, L, a), the scale
OP_SPOTS = {"q": ("q", (0, 1, 7, 2), NAN), "k": ("k", (0, 0, 11, 5), NAN), "k_inf": ("k", (0, 0, 11, 5), INF),
            "rel_h": ("rh", (0, 1, 3, 2), NAN)}


def _rel_pos_op_case(dtype, where, L=64, a=8):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, L, 16, generator=g).to(dtype) for _ in range(3))
    rh, rw = torch.randn(1, 2, L, a, generator=g) * 0.1, torch.randn(1, 2, L, L // a, generator=g) * 0.1
    if where == "scale":
        return q, k, v, rh, rw, NAN
    spots = dict(OP_SPOTS)
    if L > 64:  # the poisoned key in the last chunk of a long row (bf16 on VNNI panels takes rows in chunks)
        spots = {name: (t, (*at[:2], at[2] + L - 64, at[3]) if t == "k" else at, val)
                 for name, (t, at, val) in OP_SPOTS.items()}
    t = _poisoned({"q": q, "k": k, "rh": rh}, spots, where)
    return t["q"], t["k"], v, t["rh"], rw, 0.25


def _rel_pos_op_logits(q, k, rh, rw, scale):
    logits = scale * q.double() @ k.double().transpose(-1, -2)
    return logits + (rh.double()[..., :, None] + rw.double()[..., None, :]).flatten(-2)


def _rel_pos_op_reference(q, k, v, rh, rw, scale):
    return (torch.softmax(_rel_pos_op_logits(q, k, rh, rw, scale), -1) @ v.double()).transpose(1, 2)  # (S, L, H, D)


@pytest.mark.skipif(extension_error() is not None, reason="the C++ extension is required by this project's install")
@pytest.mark.parametrize("where", ["q", "k", "k_inf", "rel_h", "scale"])
@pytest.mark.parametrize("dtype,L", [(torch.float32, 64), (torch.bfloat16, 64), (torch.bfloat16, 1024)])
def test_rel_pos_attention_op_propagates_nonfinite(dtype, L, where, cpu_paths, monkeypatch):
    """The C++ kernel's row pass (AVX-512 or plain, AMX or plain GEMMs) turns a row with a NaN or +inf logit into
    NaN, its lse too; over 1024 keys bf16's chunked rows too (chunks of 128 on either VNNI path), the bad key in the
    last chunk."""
    if L > 64:
        monkeypatch.setenv("SAM_FAST_CPU_ATTENTION_CHUNK", "128")
    q, k, v, rh, rw, scale = _rel_pos_op_case(dtype, where, L=L, a=8 if L == 64 else 32)
    want = _rel_pos_op_reference(q, k, v, rh, rw, scale)
    out = torch.empty(1, L, 2, 16, dtype=dtype)
    lse = torch.empty(1, 2, L)
    torch.ops.sam_fast.rel_pos_attention(q, k, v, rh, rw, scale, out, lse)
    want_lse = torch.logsumexp(_rel_pos_op_logits(q, k, rh, rw, scale), -1).float()
    poisoned = _nan_rows(want)
    assert poisoned.any()
    assert torch.equal(_nan_rows(out), poisoned)
    assert torch.equal(torch.isnan(lse), torch.isnan(want_lse)) and torch.equal(lse.isposinf(), want_lse.isposinf())
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out[~poisoned].double(), want[~poisoned], rtol=tol, atol=tol)


@pytest.mark.skipif(extension_error() is not None, reason="the C++ extension is required by this project's install")
@pytest.mark.parametrize("window", [0, 7])
def test_sam_block_attention_propagates_nan(window):
    """A NaN key in SAM's block poisons exactly the queries that attend it: its window's (or every query of a
    global block)."""
    heads, D, Hg, Wg = 2, 16, 14, 14
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, Hg, Wg, 3 * heads * D, generator=g)
    qkv[0, 2, 3, heads * D + 4] = NAN  # a key of head 0 at (2, 3)
    seg = window or Hg
    th, tw = torch.randn(2 * seg - 1, D, generator=g) * 0.1, torch.randn(2 * seg - 1, D, generator=g) * 0.1
    out = sam_block_attention(qkv, heads, window, th, tw, None, D ** -0.5, backend="cpu")
    nan = torch.isnan(out.view(1, Hg, Wg, heads, D)).any(-1)
    want = torch.zeros(1, Hg, Wg, heads, dtype=torch.bool)
    if window:
        want[0, :7, :7, 0] = True
    else:
        want[0, :, :, 0] = True
    assert torch.equal(nan, want)


@pytest.mark.parametrize("config", ["exact", "dilated", "int8"])
def test_encoder_with_a_nan_weight_gives_the_nan_embedding_segment_anything_gives(config, cpu_rules):
    """One NaN in a qkv weight: the patched encoder's embedding is NaN exactly where segment_anything's is (int8
    refuses to quantize the weight, naming the layer)."""

    cpu_rules(epilogue_min_bytes=0)  # the fused epilogues on this tiny model too
    enc = tiny_image_encoder(img_size=224, embed_dim=64, num_heads=2, depth=2, window_size=7,
                             global_attn_indexes=(1,)).eval()
    with torch.no_grad():
        enc.blocks[0].attn.qkv.weight[70, 5] = NAN  # a key channel of head 0
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = enc(x)
        cfg = {"exact": sam_fast.SamFastConfig(attention="exact"),
               "dilated": sam_fast.SamFastConfig(attention=sam_fast.Dilated(Branch((14, 14)), blocks=[1])),
               "int8": sam_fast.SamFastConfig(attention="exact", quantize="int8")}[config]
        if config == "int8":
            with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv: weight holds NaN"):
                sam_fast.apply(enc, cfg)
            return
        with sam_fast.apply(enc, cfg):
            got = enc(x)
    assert torch.isnan(want).any()
    assert torch.equal(torch.isnan(got), torch.isnan(want))


@pytest.mark.parametrize("static", [False, True], ids=["per_token", "static_scale"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_linear_rows_holding_nan_or_inf_are_nan(backend, static):
    """int8 holds no NaN: a row with a NaN or an inf gets a NaN scale (its own, or in place of the calibrated
    static one), so its float output row is NaN; the other rows are what the reference gives."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 64, generator=g)
    x[3, 10], x[17, 0] = NAN, -INF
    w = torch.randint(-127, 128, (24, 64), dtype=torch.int8, generator=g)
    ws = torch.rand(24, generator=g) * 0.01 + 1e-3
    kw = dict(act_scale=0.05) if static else {}
    want = sam_fast.int8_linear(x, w, ws, torch.zeros(24), backend="reference", **kw)
    got = sam_fast.int8_linear(x, w, ws, torch.zeros(24), backend=backend, **kw)
    bad = torch.zeros(40, dtype=torch.bool)
    bad[[3, 17]] = True
    assert torch.isnan(want[bad]).all() and torch.isfinite(want[~bad]).all()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    torch.testing.assert_close(got[~bad], want[~bad], rtol=1e-5, atol=1e-5)


def test_softmax_scale_must_be_finite():
    q, k, v = _qkv()
    for bad in (NAN, INF, -math.inf):
        with pytest.raises(ValueError, match="softmax_scale"):
            sam_fast.dilated_attention(q, k, v, softmax_scale=bad)
