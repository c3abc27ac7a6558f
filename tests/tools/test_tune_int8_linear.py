"""tools/tune_int8_linear.py: a whole tuning pass on a tiny GEMM under the interpreter with a stand-in timer
(real timings need the GPU the table is for), the agreement check that keeps a wrong kernel from winning,
and the table it writes."""

import json

import pytest
import torch

import sam_fast.kernels.int8_linear as K
from tools import tune_int8_linear as T

CANDS = [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3),
         dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
         dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)]


def test_candidates_are_valid_configs():
    cands = list(T.candidates())
    assert len(cands) == len({json.dumps(c, sort_keys=True) for c in cands}) > 20
    for c in cands:
        assert set(c) == {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"}
        assert 128 * 64 <= c["BLOCK_M"] * c["BLOCK_N"] <= 256 * 128


def test_target_shapes_are_tuned_first():
    order = T.work_order()
    assert len(order) == len(set(order)) == len(T.SHAPES) * len(T.M_VALUES)
    assert order[:4] == [(32768, 1280, 5120), (32768, 5120, 1280), (131072, 1280, 5120), (131072, 5120, 1280)]
    vit_b = [i for i, (m, k, n) in enumerate(order) if 1280 not in (k, n)]
    assert min(vit_b) == len(order) - len(vit_b)  # ViT-B's shapes come after every ViT-H one
    assert T.work_order(quick=True) == [s for s in order if s[0] == 4096]


def test_tune_shape_picks_the_fastest_agreeing_candidate():
    timed = []

    def bench(fn):
        timed.append(fn)
        return 1.0 if len(timed) == 3 else 2.0  # the third candidate is the fastest

    entry = T.tune_shape(70, 136, 90, torch.device("cpu"), bench, log=lambda *a: None, cands=CANDS)
    assert entry["config"] == CANDS[2] and entry["ms"] == 1.0 and entry["heuristic_ms"] == 2.0
    assert (entry["m"], entry["k"], entry["n"]) == (K._m_bucket(70), 136, 90)
    assert len(timed) == len(CANDS) + 1  # every candidate, then the heuristic configuration


def test_a_candidate_that_computes_something_else_stops_the_run(monkeypatch):
    real = K.int8_gemm

    def broken(a, a_scale, w, w_scale, bias=None, activation=None, out_dtype=torch.bfloat16, out_scale=None,
               config=None):
        out = real(a, a_scale, w, w_scale, bias, activation, out_dtype, out_scale, config)
        if config == CANDS[1]:
            out[3, 5] += 1  # one wrong element
        return out

    monkeypatch.setattr(K, "int8_gemm", broken)
    with pytest.raises(T.Disagreement, match=r"M=40 64->48 with .*BLOCK_M': 128.*int32 accumulator differs .* in 1 "):
        T.tune_shape(40, 64, 48, torch.device("cpu"), lambda fn: 1.0, log=lambda *a: None, cands=CANDS)


def test_a_candidate_that_fails_to_run_is_skipped_and_logged(monkeypatch):
    real = K.int8_gemm

    def refusing(a, a_scale, w, w_scale, bias=None, activation=None, out_dtype=torch.bfloat16, out_scale=None,
                 config=None):
        if config == CANDS[0]:
            raise RuntimeError("out of resources: shared memory")
        return real(a, a_scale, w, w_scale, bias, activation, out_dtype, out_scale, config)

    monkeypatch.setattr(K, "int8_gemm", refusing)
    logged = []
    entry = T.tune_shape(40, 64, 48, torch.device("cpu"), lambda fn: 1.0, log=logged.append, cands=CANDS)
    assert entry["config"] == CANDS[1]
    assert len(logged) == 1 and "skip" in logged[0] and "out of resources" in logged[0]


def test_written_table_is_what_the_kernel_reads(tmp_path, monkeypatch):
    """The tuner's entries, written with the shared writer, are found by gemm_config for that architecture."""
    from tools.tune_dilated_attention import write_table

    entry = T.tune_shape(40, 64, 48, torch.device("cpu"), lambda fn: 1.0, log=lambda *a: None, cands=CANDS[1:2])
    path = tmp_path / "int8_linear.json"
    doc = {"note": "test", "configs": {}}
    write_table(str(path), doc, "sm_90", {T._entry_key(entry): entry}, "NVIDIA H100")
    monkeypatch.setattr(K, "_TABLE_PATH", str(path))
    K.tuned_table.cache_clear()
    monkeypatch.setattr(K, "device_arch", lambda device: "sm_90")
    try:
        assert K.gemm_config(40, 48, 64, torch.device("cpu")) == CANDS[1]
        assert K.gemm_config(40, 48, 128, torch.device("cpu")) == K.heuristic_config(40, 48, 128)  # no entry
    finally:
        K.tuned_table.cache_clear()
    assert json.loads(path.read_text())["devices"] == {"sm_90": "NVIDIA H100"}
