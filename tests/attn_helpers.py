"""Shared by the attention tests: run an attention call on fresh leaves and check a kernel's forward
and gradients against the reference by the tolerance rule of docs/maintainers/design.md."""

import pytest
import torch

import sam_fast
from sam_fast.testing import BWD_FACTOR, FWD_FACTOR, check_against_reference


def leaves(tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def run_op(backend, qkv, pattern, kw, cast=None):
    """sam_fast.dilated_attention on copies of q, k, v and the tensors in kw (rel-pos tables, pad_kv);
    returns (inputs as leaves, out, lse)."""
    names = [n for n in ("rel_pos_h", "rel_pos_w") if n in kw]
    extra = [kw[n] for n in names] + (list(kw["pad_kv"]) if "pad_kv" in kw else [])
    ins = leaves([t.to(cast) if cast else t for t in list(qkv) + extra])
    q, k, v = ins[:3]
    kwargs = {"grid": kw.get("grid"), **dict(zip(names, ins[3:3 + len(names)]))}
    if "pad_kv" in kw:
        kwargs["pad_kv"] = tuple(ins[3 + len(names):])
    out, lse = sam_fast.dilated_attention(q, k, v, pattern, return_lse=True, backend=backend, **kwargs)
    return ins, out, lse


def check_kernel_vs_reference(qkv, pattern, kw, dtype, backend="triton"):
    """Kernel forward (out, lse) and every input gradient (through out and lse) vs the fp64 oracle,
    within the rule's factor of PyTorch's own error at ``dtype``. Returns the kernel's lse."""
    with sam_fast.record_backends() as rec:
        ins_k, out_k, lse_k = run_op(backend, qkv, pattern, kw)
    assert rec.calls == [("dilated_attention", backend)]
    ins_r, out_r, lse_r = run_op("reference", qkv, pattern, kw)                        # same precision
    ins_x, out_x, lse_x = run_op("reference", qkv, pattern, kw, cast=torch.float64)    # exact oracle
    check_against_reference("out", out_k, out_x, out_r, dtype, FWD_FACTOR)
    assert lse_k.dtype == torch.float32
    assert torch.equal(torch.isinf(lse_k), torch.isinf(lse_x)), "positions kept by no branch differ"
    check_against_reference("lse", lse_k, lse_x, lse_r, dtype, FWD_FACTOR)

    g = torch.Generator().manual_seed(1)
    dout = torch.randn(out_k.shape, generator=g).to(out_k.device)
    dlse = torch.randn(lse_k.shape, generator=g).to(out_k.device)
    grads = []
    for ins, out, lse in ((ins_k, out_k, lse_k), (ins_r, out_r, lse_r), (ins_x, out_x, lse_x)):
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # uncovered positions carry no loss
        loss = (out.double() * dout.double()).sum() + (lse.double() * dlse.double()).sum()
        grads.append(torch.autograd.grad(loss, ins))
    names = ["dq", "dk", "dv"] + [n for n in ("drel_h", "drel_w") if "rel_pos_h" in kw]
    names += ["dpad_k", "dpad_v"] if "pad_kv" in kw else []
    for name, gk, gr, gx in zip(names, *grads):
        check_against_reference(name, gk, gx, gr, dtype, BWD_FACTOR)
    return lse_k


def record_launch_configs(monkeypatch):
    """The launch configurations the attention kernels pick from now on (a list that fills as they run)."""
    from sam_fast.kernels.dilated_attention import tuning as kernel

    configs = []
    original = kernel.launch_config

    def spy(*args, **kwargs):
        cfg = original(*args, **kwargs)
        configs.append(cfg)
        return cfg

    monkeypatch.setattr(kernel, "launch_config", spy)
    return configs


def far_apart_batches(device, dtype):
    """q, k, v (3, 64, 2, 16) whose batch stride (2**30 + 2**20 elements) is below 2**31 while the last
    batch starts past it: views into one 4.3 GB allocation of which only the used rows are ever touched."""
    stride = 2**30 + 2**20
    per = 64 * 2 * 16
    try:
        store = torch.empty(2 * stride + 3 * per, dtype=dtype, device=device)
    except (RuntimeError, MemoryError) as exc:  # the storage is mapped lazily: only the rows used are touched
        pytest.fail(f"cannot map the 4.3 GB view storage this test needs (only its used rows are touched): {exc}")
    g = torch.Generator().manual_seed(9)
    views = []
    for i in range(3):
        t = store.as_strided((3, 64, 2, 16), (stride, 32, 16, 1), i * per)
        for b in range(3):
            t[b].copy_(torch.randn(64, 2, 16, generator=g).to(dtype))
        views.append(t)
    return views


def check_far_apart_batches(device, dtype, atol_out, atol_grad):
    """Forward and gradients of the Triton kernels on :func:`far_apart_batches` vs the float64 reference."""
    q, k, v = (t.detach().requires_grad_() for t in far_apart_batches(device, dtype))
    assert q.stride(0) < 2**31 <= 2 * q.stride(0)
    out = sam_fast.dilated_attention(q, k, v, backend="triton")
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    ref_in = [t.detach().contiguous().double().requires_grad_() for t in (q, k, v)]
    ref = sam_fast.dilated_attention(*ref_in, backend="reference")
    ref_grads = torch.autograd.grad(ref.sum(), ref_in)
    torch.testing.assert_close(out.double(), ref, atol=atol_out, rtol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=atol_grad, rtol=0)


def check_fused_bf16_encoder(enc, x):
    """Cast ``enc`` to bf16 and check its fused-attention embedding against the fp32 one by the bf16 rule
    (segment_anything's own bf16 error as the yardstick). Returns the fused bf16 embedding."""
    with torch.no_grad():
        exact = enc(x)
        enc_bf = enc.to(torch.bfloat16)
        expected = enc_bf(x.bfloat16())
        with sam_fast.apply(enc_bf, sam_fast.SamFastConfig()):
            with sam_fast.record_backends() as rec:
                got = enc_bf(x.bfloat16())
    assert rec.backends("dilated_attention") == {"triton"}
    check_against_reference("embedding", got, exact, expected, torch.bfloat16, FWD_FACTOR)
    return got
