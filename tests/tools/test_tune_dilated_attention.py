"""The attention kernels' tuned table (kernels/tuned/dilated_attention.json) and its tuner,
tools/tune_dilated_attention.py: lookup, validation, forced configs, and a whole tuning pass on a tiny case under
the interpreter with a stand-in timer (real timings need the GPU the table is for)."""

import json

import pytest
import torch
from attn_helpers import record_launch_configs

import sam_fast.kernels.dilated_attention as K
from sam_fast.kernels.dilated_attention import tuning
from tools import tune_dilated_attention as T

TINY = ("tiny D=80 window", (5, 6), 1, 80, (4, 4), True, True)


@pytest.fixture
def table(tmp_path, monkeypatch):
    """Point the kernels at a table file of the test's own; returns a writer for its entries."""
    path = tmp_path / "dilated_attention.json"
    monkeypatch.setattr(tuning, "_TABLE_PATH", str(path))
    K.tuned_table.cache_clear()

    def write(configs):
        path.write_text(json.dumps({"note": "test", "configs": configs}))
        K.tuned_table.cache_clear()
        return path

    yield write
    K.tuned_table.cache_clear()


def _key(backward=False):
    return {"dir": "bwd" if backward else "fwd", "d": 80, "bits": 16, "rel": True, "pad": False, "nb": 1,
            "kept": [64, 64], "step": [1, 1]}


def test_checked_in_table_loads():
    K.tuned_table.cache_clear()
    assert isinstance(K.tuned_table(), dict)


def test_lookup_by_key_and_architecture(table, monkeypatch):
    cfg = {"BLOCK_M": 64, "num_warps": 4, "num_stages": 3, "split": False}
    table({"sm_90": [{"key": _key(), "config": cfg}]})
    cuda = torch.device("cuda")
    monkeypatch.setattr(tuning, "device_arch", lambda device: "sm_90")
    assert K.tuned_choice(_key(), cuda) == cfg
    assert K.tuned_choice(_key(backward=True), cuda) is None         # another key
    assert K.tuned_choice(_key(), torch.device("cpu")) is None        # the CPU has no table
    monkeypatch.setattr(tuning, "device_arch", lambda device: "sm_80")
    assert K.tuned_choice(_key(), cuda) is None                       # another architecture
    monkeypatch.setattr(tuning, "device_arch", lambda device: "sm_90")
    with K.padded_head_dim():                                         # the pre-split reference ignores it
        assert K.tuned_choice(_key(), cuda) is None
    forced = {"BLOCK_M": 128, "num_warps": 8, "num_stages": 2, "split": True}
    with K.forced_config(forced):                                     # the tuner's candidates win
        assert K.tuned_choice(_key(), cuda) == forced
    assert K.tuned_choice(_key(), cuda) == cfg


def test_malformed_table_and_forced_fields_are_named(table):
    path = table({"sm_90": [{"key": _key(), "config": {"BLOCK_N": 32}}]})
    with pytest.raises(ValueError, match=rf"{path.name}.*malformed.*BLOCK_N"):
        K.tuned_table()
    with pytest.raises(ValueError, match="forced_config: unknown fields.*BKX"):
        with K.forced_config({"BKX": 8}):
            pass


def test_choice_sets_tile_warps_stages_and_split(monkeypatch):
    monkeypatch.setattr(tuning, "_interpreting", lambda: False)
    group = K.plan_groups([K.Geometry(64, 64, 64, 64, 1, 1)])[0]
    default = tuning.launch_config(group, False, True, 80)
    assert (default["BLOCK_M"], default["num_warps"], default["num_stages"], default["TAIL"]) == (128, 8, 2, True)
    chosen = tuning.launch_config(group, False, True, 80, choice={"BLOCK_M": 64, "num_warps": 4, "num_stages": 3,
                                                               "split": False})
    assert (chosen["BLOCK_M"], chosen["num_warps"], chosen["num_stages"]) == (64, 4, 3)
    assert (chosen["BLOCK_D"], chosen["TAIL"]) == (128, False)
    assert {k: v for k, v in chosen.items() if k not in ("BLOCK_M", "num_warps", "num_stages", "BLOCK_D",
                                                          "BLOCK_DT", "TAIL")} == \
        {k: v for k, v in default.items() if k not in ("BLOCK_M", "num_warps", "num_stages", "BLOCK_D",
                                                        "BLOCK_DT", "TAIL")}  # key blocks are structural
    assert tuning.launch_config(group, False, True, 80, backward=True)["num_stages"] == 1


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_tune_case_picks_the_fastest_agreeing_candidate(backward, monkeypatch):
    """Every candidate runs (through forced_config: the launches see it) and agrees with the heuristic
    configuration; the stand-in timer makes the padded, 3-stage (or 2-stage), 8-warp one fastest."""
    configs = record_launch_configs(monkeypatch)
    cands = list(T.candidates(80, backward))
    assert {c["split"] for c in cands} == {True, False}
    favourite = dict(BLOCK_M=64, num_warps=8, num_stages=2 if backward else 3, split=False)
    assert favourite in cands
    timed = []

    def bench(fn):
        cfg = dict(tuning._FORCED) if tuning._FORCED is not None else None
        timed.append(cfg)
        return 1.0 if cfg == favourite else 2.0

    entry = T.tune_case(TINY, 1, torch.float32, torch.device("cpu"), backward, bench, log=lambda *a: None)
    assert entry["config"] == favourite and entry["ms"] == 1.0 and entry["heuristic_ms"] == 2.0
    assert timed[:-1] == cands and timed[-1] is None  # every candidate, then the heuristic one
    key = entry["key"]
    assert key["dir"] == ("bwd" if backward else "fwd") and key["d"] == 80 and key["pad"] and key["rel"]
    assert key["kept"] == [4, 4] and key["bits"] == 32
    # the launches honoured the forced split (padded: one 128-column slice; split: 64 + 16)
    assert {(c["BLOCK_D"], c["TAIL"]) for c in configs} == {(64, True), (128, False)}


def test_tune_case_stops_on_a_candidate_that_disagrees(monkeypatch):
    monkeypatch.setattr(T, "agrees", lambda got, want, dtype: "result 0: made up")
    with pytest.raises(T.Disagreement, match="disagrees with the heuristic configuration: result 0: made up"):
        T.tune_case(TINY, 1, torch.float32, torch.device("cpu"), False, lambda fn: 1.0, log=lambda *a: None)


def test_agrees_measures_error_against_the_largest_value():
    a = torch.tensor([100.0, 1.0, float("-inf")])
    assert T.agrees([a], [a.clone()], torch.bfloat16) is None
    assert T.agrees([a + torch.tensor([0.0, 2.0, 0.0])], [a], torch.bfloat16) is None  # 2 / 100 < 3e-2
    assert "max error" in T.agrees([a + torch.tensor([0.0, 5.0, 0.0])], [a], torch.bfloat16)
    assert "non-finite" in T.agrees([torch.tensor([100.0, 1.0, 0.0])], [a], torch.bfloat16)


def test_written_table_is_what_the_kernels_read(table, tmp_path, monkeypatch):
    path = table({})
    entry = {"key": _key(), "config": {"BLOCK_M": 64, "num_warps": 4, "num_stages": 2, "split": True},
             "ms": 1.0, "heuristic_ms": 1.2, "case": "vit_h global B=8 bfloat16"}
    doc = json.loads(path.read_text())
    T.write_table(str(path), doc, "sm_90", {json.dumps(entry["key"], sort_keys=True): entry}, "H100")
    K.tuned_table.cache_clear()
    monkeypatch.setattr(tuning, "device_arch", lambda device: "sm_90")
    assert K.tuned_choice(_key(), torch.device("cuda")) == entry["config"]
    assert json.loads(path.read_text())["devices"] == {"sm_90": "H100"}


def test_tuner_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert T.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
