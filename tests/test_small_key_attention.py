"""Triton small-key attention (SAM's image-to-token attention) under the interpreter vs its reference."""

import pytest
import torch
from devices import gpu, smoke

import sam_fast
from sam_fast.ops.small_key_attention import small_key_attention
from sam_fast.reference import small_key_attention as reference
from sam_fast.testing import FWD_FACTOR, check_against_reference


def _brute(q, q_index, k, v, heads):
    """softmax(q k^T / sqrt(D)) v per prompt and head, written out plainly (float64)."""
    P, T, C = k.shape
    D = C // heads
    out = torch.empty(P, q.shape[1], C, dtype=q.dtype)
    for p in range(P):
        for h in range(heads):
            cols = slice(h * D, (h + 1) * D)
            s = q[q_index[p], :, cols] @ k[p, :, cols].T / D ** 0.5
            out[p, :, cols] = s.softmax(-1) @ v[p, :, cols]
    return out


# (G, P, N, T, heads, D, shared): SAM's decoder (8 heads of 16, 7 tokens) with queries shared by the
# prompts of two images and per prompt; the tiny model's head dim 8; N off the block size; T = 1 and 17.
CASES = [(2, 5, 300, 7, 8, 16, True), (4, 4, 257, 7, 8, 16, False), (1, 3, 64, 1, 2, 8, True),
         (3, 3, 130, 17, 4, 32, False), (2, 6, 40, 6, 1, 80, True)]


def _inputs(G, P, N, T, heads, D, shared, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(G, N, heads * D, generator=g)
    k = torch.randn(P, T, heads * D, generator=g)
    v = torch.randn(P, T, heads * D, generator=g)
    index = torch.sort(torch.randint(0, G, (P,), generator=g)).values if shared else torch.arange(P)
    return q.to(dtype), index, k.to(dtype), v.to(dtype)


def test_reference_matches_the_definition():
    for case in CASES:
        q, idx, k, v = _inputs(*case, torch.float64)
        torch.testing.assert_close(reference.small_key_attention(q, idx, k, v, case[4]), _brute(q, idx, k, v, case[4]))


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(case, dtype, device):
    q, idx, k, v = (t.to(device) for t in _inputs(*case, dtype))
    heads = case[4]
    with sam_fast.record_backends() as rec:
        got = small_key_attention(q, idx, k, v, heads, backend="triton")
    assert rec.calls == [("small_key_attention", "triton")]
    exact = reference.small_key_attention(q.double(), idx, k.double(), v.double(), heads)
    same = reference.small_key_attention(q, idx, k, v, heads)
    check_against_reference("small_key_attention", got, exact, same, dtype, FWD_FACTOR)


def test_strided_inputs_and_auto_on_cpu():
    q, idx, k, v = _inputs(2, 3, 50, 5, 2, 16, True, torch.float32)
    wide = torch.cat([k, v], dim=-1)  # k and v as column slices of one projection, as a fused qkv would be
    got = small_key_attention(q, idx, wide[..., :32], wide[..., 32:], 2, backend="triton")
    torch.testing.assert_close(got, reference.small_key_attention(q, idx, k, v, 2), atol=1e-5, rtol=1e-5)
    with sam_fast.record_backends() as rec:
        small_key_attention(q, idx, k, v, 2)
    assert rec.calls == [("small_key_attention", "reference")]


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(num_heads=3), "num_heads"),
        (dict(q_index=torch.tensor([0, 0, 5])), "q_index must lie"),
        (dict(q_index=torch.tensor([0, 0])), "one entry per prompt"),
        (dict(q_index=torch.zeros(3)), "q_index must be a 1-d int64"),
        (dict(v=torch.zeros(3, 4, 32)), "k and v must have shape"),
        (dict(k=torch.zeros(3, 5, 32, dtype=torch.float16)), "k must be float32"),
        (dict(q=torch.zeros(50, 32)), "q must be 3-d"),
    ],
)
def test_errors_name_the_argument(change, match):
    q, idx, k, v = _inputs(2, 3, 50, 5, 2, 16, True, torch.float32)
    args = dict(q=q, q_index=idx, k=k, v=v, num_heads=2)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        small_key_attention(**args)


def test_opcheck():
    from sam_fast.ops.small_key_attention import _small_key_attention_op

    q, idx, k, v = _inputs(2, 3, 40, 5, 2, 16, True, torch.float32)
    torch.library.opcheck(_small_key_attention_op, (q, idx, k, v, 2), test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------------------------
# CUDA at SAM's real shapes (pytest -m gpu)
# ------------------------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=smoke), torch.float16, torch.float32])
@pytest.mark.parametrize("shared", [True, False])
def test_small_key_attention_sam_shapes(dtype, shared):
    from sam_fast.ops.small_key_attention import small_key_attention
    from sam_fast.reference import small_key_attention as reference
    from sam_fast.testing import FWD_FACTOR, check_against_reference

    g = torch.Generator(device="cuda").manual_seed(0)
    P, T, G = 300, 7, 3
    q = torch.randn(G if shared else P, 4096, 128, device="cuda", generator=g).to(dtype)
    k = torch.randn(P, T, 128, device="cuda", generator=g).to(dtype)
    v = torch.randn(P, T, 128, device="cuda", generator=g).to(dtype)
    idx = (torch.arange(P, device="cuda") * G // P) if shared else torch.arange(P, device="cuda")
    with sam_fast.record_backends() as rec:
        got = small_key_attention(q, idx, k, v, 8)
    assert rec.calls == [("small_key_attention", "triton")]
    exact = reference.small_key_attention(q.double(), idx, k.double(), v.double(), 8)
    same = reference.small_key_attention(q, idx, k, v, 8)
    check_against_reference("small_key_attention", got, exact, same, dtype, FWD_FACTOR)
