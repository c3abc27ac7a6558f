"""``torch.library.opcheck`` over every op registered under ``sam_fast::``: the schema says what the kernel does
(mutations, aliasing), the fake implementation matches the real outputs, and (for the C++ ops) the op survives AOT
dispatch, as torch.compile and torch.export use it. Every op needs a case here: a new op without one fails
``test_every_registered_op_has_a_case``."""

import importlib
import pkgutil

import pytest
import torch

import sam_fast.ops
from sam_fast.ops._ext import extension_error

pytestmark = pytest.mark.skipif(extension_error() is not None, reason="the C++ extension is part of the install")

for _m in pkgutil.iter_modules(sam_fast.ops.__path__):
    importlib.import_module(f"sam_fast.ops.{_m.name}")  # every op module: registers its ops and fakes

#: ops whose schema takes no tensor: nothing for opcheck to compare (their CompositeExplicitAutograd kernels run as
#: they are under fake tensors too)
NO_TENSORS = {"sam_fast::parallel_threads", "sam_fast::cpu_features"}

#: the Triton ops run under the interpreter here: the schema and fake checks, not opcheck's repeated AOT runs
#: (test_dilated_attention_sam.py opchecks the forward with autograd as well)
TRITON = ("test_schema", "test_faketensor")
#: the ``triton_op`` forms of the Triton ops (what a trace for an AOTInductor package of a CUDA model calls): the schema
#: check alone, as their fakes are their bodies on fake tensors, which the interpreter cannot run
#: (test_export.py lowers them as Inductor does, for sm_90, in a process without the interpreter)
TRITON_OP = ("test_schema",)
#: ops with an output whose size depends on the data: a fake cannot make its AOT graph
DYNAMIC = ("test_schema", "test_faketensor")


def _cases():
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    S, H, L, D = 2, 2, 12, 8
    rh, rw = randn(S, H, L, 3), randn(S, H, L, 4)
    qkv = randn(1, 5, 6, 48)
    acc = torch.randint(-3000, 3000, (9, 16), dtype=torch.int32, generator=g)
    x = randn(9, 32)
    w8 = torch.randint(-127, 128, (16, 32), dtype=torch.int8, generator=g)
    ws = torch.rand(16, generator=g) * 0.01
    xq = torch.randint(-127, 128, (9, 32), dtype=torch.int8, generator=g)
    packed = torch.ops.sam_fast.int8_pack_amx(w8)
    q, k, v = (randn(1, 20, 2, 8) for _ in range(3))
    geom = [4, 5, 4, 5, 2, 5, 1, 1]  # a 4 x 5 grid, one branch: segments (2, 5), no dilation
    out, lse = torch.ops.sam_fast.dilated_attention_fwd(q, k, v, geom, None, None, None, None, 0.3)
    cases = {
        "sam_fast::resize_rel_pos": [((randn(9, 6), 17), None)],
        "sam_fast::mask_postprocess": [((randn(2, 16, 16), [64, 64], [64, 50], [30, 24], [0, 0, 30, 24], 0.0, 1.0,
                                         True, True), DYNAMIC)],
        "sam_fast::rle_to_string": [((torch.tensor([3, 5, 2, 4, 6]), torch.tensor([0, 3, 5])), DYNAMIC)],
        "sam_fast::decomposed_bias": [((rh, rw, torch.empty(S, H, L, 12)), None)],
        "sam_fast::rel_pos_attention": [((randn(S, H, L, D), randn(S, H, L, D), randn(S, H, L, D), rh, rw, 0.3,
                                          torch.empty(S, L, H, D), torch.empty(S, H, L)), None)],
        "sam_fast::sam_block_attention": [  # a partial-window block, and a global block with the qkv bias inside
            ((qkv, 2, 3, randn(5, 8), randn(5, 8), None, None, None, 0.35, torch.empty(1, 5, 6, 16)), None),
            ((qkv, 2, 0, randn(9, 8), randn(11, 8), randn(48), None, None, 0.35, torch.empty(1, 5, 6, 16)), None)],
        "sam_fast::window_bias_attention": [  # padded 3 x 3 windows with pad_kv, and one whole 5 x 6 ... 2 x 2
            ((qkv, 2, 3, randn(2, 9, 9), randn(2, 8), randn(2, 8), 0.35, torch.empty(1, 5, 6, 16)), None),
            ((qkv, 2, 2, randn(2, 4, 4), None, None, 0.35, torch.empty(1, 5, 6, 16)), None)],
        "sam_fast::hiera_attention": [  # padded 4 x 4 windows pooling their queries 2 x 2, and a global block
            ((qkv, 2, 4, 2, randn(48), randn(2, 8), randn(2, 8), 0.35, torch.empty(1, 2, 3, 16)), None),
            ((qkv, 2, 0, 1, None, None, None, 0.35, torch.empty(1, 5, 6, 16)), None)],
        "sam_fast::linear_epilogue_": [((randn(9, 16), randn(16), "gelu", randn(9, 16)), None)],
        # one schema per quantisation for every device: on CPU tensors the C++ kernels, opchecked in full
        "sam_fast::quantize_per_token": [((x,), None)],
        "sam_fast::quantize_static": [((x, torch.tensor(0.05)), None)],
        "sam_fast::layer_norm_quantize": [((x, randn(32), randn(32), 1e-6), None), ((x, None, None, 1e-5), None)],
        "sam_fast::int8_epilogue": [((acc, torch.rand(9, generator=g), ws, randn(16), True, torch.bfloat16, None),
                                     None),
                                    ((acc, torch.tensor(0.02), ws, None, False, torch.int8, torch.tensor(0.1)), None)],
        "sam_fast::int8_epilogue_": [((acc.clone(), torch.rand(9, generator=g), ws, None, False), None)],
        "sam_fast::int8_pack_amx": [((w8,), None)],
        "sam_fast::int8_linear": [((xq, torch.rand(9, generator=g), w8, ws, None, "gelu", torch.float32, None),
                                   TRITON)],
        "sam_fast::dilated_attention_fwd": [((q, k, v, geom, None, None, None, None, 0.3), TRITON)],
        "sam_fast::triton_dilated_attention_fwd": [((q, k, v, geom, None, None, None, None, 0.3), TRITON_OP)],
        "sam_fast::triton_quantize_per_token": [((x,), TRITON_OP)],
        "sam_fast::triton_quantize_static": [((x, torch.tensor(0.05)), TRITON_OP)],
        "sam_fast::triton_layer_norm_quantize": [((x, randn(32), randn(32), 1e-6), TRITON_OP),
                                                 ((x, None, None, 1e-5), TRITON_OP)],
        "sam_fast::triton_int8_linear": [((xq, torch.rand(9, generator=g), w8, ws, randn(16), "gelu", torch.bfloat16,
                                          None), TRITON_OP),
                                         ((xq, torch.tensor(0.02), w8, ws, None, None, torch.int8, torch.tensor(0.1)),
                                          TRITON_OP)],
        "sam_fast::dilated_attention_bwd": [((randn(1, 20, 2, 8), q, k, v, out, lse, None, geom, None, None, None,
                                              None, 0.3), TRITON)],
        "sam_fast::hiera_attention_triton": [((randn(1, 5, 6, 48), 2, 4, 2, randn(48), randn(2, 8), randn(2, 8),
                                               0.35), TRITON)],
        "sam_fast::small_key_attention": [((randn(2, 40, 32), torch.tensor([0, 0, 1]), randn(3, 5, 32),
                                            randn(3, 5, 32), 2), TRITON)],
        "sam_fast::upscale_mask_product": [((randn(2, 8, 4, 3), randn(8, 4, 2, 2), randn(4), randn(2, 3, 4)),
                                            TRITON),
                                           ((randn(2, 8, 4, 3), randn(8, 4, 2, 2), randn(4), randn(2, 3, 4),
                                             randn(2, 4, 8, 6), torch.tensor([1, 0])), TRITON)],
    }
    if packed.numel():  # a CPU with AMX int8: the GEMM on its panels
        cases["sam_fast::int8_linear_amx"] = [((xq, torch.rand(9, generator=g), packed, 16, ws, None, True,
                                                torch.float32, None), None)]
        cases["sam_fast::int8_linear_amx_quantize"] = [((xq, torch.rand(9, generator=g), packed, 16, ws, None,
                                                         True), None)]
    else:  # elsewhere the kernel refuses whatever it gets (it says why): its fake is checked alone
        cases["sam_fast::int8_linear_amx"] = [((xq, torch.rand(9, generator=g), torch.zeros(2048, dtype=torch.int8),
                                                16, ws, None, True, torch.float32, None), "refuses")]
        cases["sam_fast::int8_linear_amx_quantize"] = [((xq, torch.rand(9, generator=g),
                                                         torch.zeros(2048, dtype=torch.int8), 16, ws, None, True),
                                                        "refuses")]
    return cases


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_opcheck(name):
    op = getattr(torch.ops.sam_fast, name.split("::")[1]).default
    for args, utils in CASES[name]:
        if utils == "refuses":  # int8_linear_amx on a CPU without AMX int8
            with pytest.raises(RuntimeError, match="no AMX int8"):
                op(*args)
            from torch._subclasses.fake_tensor import FakeTensorMode

            with FakeTensorMode() as mode:
                fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
            assert fake.shape == (9, 16) and fake.dtype == torch.float32
            continue
        torch.library.opcheck(op, args, **({} if utils is None else {"test_utils": utils}))


def test_every_registered_op_has_a_case():
    names = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("sam_fast::")}
    missing = sorted(names - NO_TENSORS - set(CASES))
    assert not missing, f"ops without an opcheck case: {missing}"
    assert NO_TENSORS <= names


@pytest.mark.parametrize("name", sorted(n for n in CASES if n.startswith("sam_fast::triton_")))
def test_triton_op_form_computes_what_the_op_does(name):
    """Each ``triton_op`` form gives what its op gives on the same inputs: the dilated forward and the int8 GEMM the
    same Triton kernels' results, the quantisations the C++ kernels' (one schema serves both: the same integers, and
    scales within an ulp, as the C++ LayerNorm sums its statistics in another order)."""
    twin = getattr(torch.ops.sam_fast, name.split("::")[1]).default
    op = getattr(torch.ops.sam_fast, name.split("::triton_")[1]).default
    for args, _ in CASES[name]:
        torch.testing.assert_close(twin(*args), op(*args), rtol=1e-6, atol=0)
