"""sam_fast.export: ONNX files in ONNX Runtime and OpenVINO, AOTInductor packages in a fresh process, against eager.

Tiny models of every family (SAM ViT exact / dilated / W8A8 dynamic and calibrated, SlimSAM-pruned with a DC-ViT
block, TinyViT, transformers' SamModel) on real photos, batch 1 and 2 through a dynamic batch axis. Float files
follow the tolerance rule against the original model (the dilated one for a dilated student) in float64 (error at
most twice PyTorch's own float32 error, plus eps); int8 files are compared by SQNR with the float model and the
eager int8 one (a value on a rounding tie may quantise to the neighbouring integer in another runtime) and must hold
one integer MatMul per int8 linear.
"""

import collections
import copy
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import sam_fast
from sam_fast import exporting
from sam_fast.models.tiny import tiny_sam
from sam_fast.pattern import Branch
from sam_fast.testing import FWD_FACTOR, check_against_reference

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
onnx = pytest.importorskip("onnx")

#: an exported int8 encoder is as close to the float model as the eager int8 one (SQNR within this margin), and
#: differs from the eager int8 one by less than W8A8's own error (SQNR above it by this margin): the runtimes divide
#: and sum in other orders, so a value on a rounding tie may quantise to the neighbouring integer (measured on the
#: tiny ViT with every linear int8: float 44.3 dB, export vs eager 53 dB; eager vs sam_fast's reference: 62 dB)
INT8_EXPORT_MARGIN_DB = 6.0


def _tinyvit_sam():
    from test_tinyvit import SMALL, _randomize

    from sam_fast.models.tiny import sam_around
    from sam_fast.models.tinyvit import TinyViT

    return sam_around(_randomize(TinyViT(**SMALL), 1), 128, 32, 2, 64, 64).eval()


def _pruned_dcvit():
    from sam_fast.compress import prune_to_widths
    from sam_fast.models.vit import MlpBlock

    model = prune_to_widths(tiny_sam(), embed=40, head_dim=[14, 8, 24, 32], mlp=100).eval()
    model.image_encoder.blocks[2] = MlpBlock(40, 100)  # a DC-ViT block: attention removed
    return model


def _calibrated(model):
    import skimage.data as data

    from sam_fast.quantize import calibrate

    cal = calibrate(model, [data.astronaut(), data.coffee()], num_images=2, progress=False)
    return sam_fast.SamFastConfig("exact", quantize=sam_fast.Int8(cal))


def _transformers():
    pytest.importorskip("transformers")
    from test_transformers import _sam_model

    return _sam_model()


DILATED = sam_fast.Dilated([Branch((4, 4)), Branch((16, 16), (2, 2))], "global")
FAMILIES = {  # name: (model builder, config builder or None for apply's default, int8); exact attention in SAM's
    # ViT blocks is in vit_dilated's window blocks and in slimsam_dcvit
    "vit_dilated": (tiny_sam, lambda m: sam_fast.SamFastConfig(DILATED), False),
    "vit_int8": (tiny_sam, lambda m: sam_fast.SamFastConfig("exact", quantize="int8"), True),
    "vit_int8_calibrated": (tiny_sam, _calibrated, True),
    "slimsam_dcvit": (_pruned_dcvit, lambda m: sam_fast.SamFastConfig("exact"), False),
    "tinyvit_int8": (_tinyvit_sam, lambda m: sam_fast.SamFastConfig("none", quantize="int8"), True),
    "transformers": (_transformers, lambda m: None, False),
}


def _int8_linears(model) -> int:
    from sam_fast.nn import Int8Linear

    return sum(isinstance(m, Int8Linear) for m in model.modules())


def _encoder_out(model, x):
    with torch.no_grad():
        return exporting._Encoder(model)(x)


@pytest.fixture(scope="module")
def family_files(tmp_path_factory):
    """Each family exported once (dynamic batch), with its eager model and, for float families, the unpatched
    model in float64."""
    made = {}

    def get(name):
        if name not in made:
            build, config, int8 = FAMILIES[name]
            model = build().eval()
            original = copy.deepcopy(model)
            sam_fast.apply(model, config(model))
            if name == "vit_dilated":  # the function itself changes: the reference is the dilated model
                original = copy.deepcopy(model)
            path = str(tmp_path_factory.mktemp(name) / f"{name}.onnx")
            result = sam_fast.export(model, path, batch="dynamic", check=False)
            made[name] = (model, original, int8, path, result)
        return made[name]

    return get


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_onnx_encoder_matches_eager_in_onnxruntime_and_openvino(family, family_files):
    model, original, int8, path, result = family_files(family)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    size = exporting._image_size(model)
    x = exporting.photo_input(model, size, batch=2)
    want = _encoder_out(model, x)
    session = exporting.onnx_session(path)
    runs = {}
    for b in (1, 2):
        runs[f"onnxruntime batch {b}"] = torch.from_numpy(session.run(None, {"image": x[:b].numpy()})[0])
        runs[f"openvino batch {b}"] = torch.from_numpy(exporting.openvino_model(path, batch=b)(x[:b].numpy())[0])
    runs["openvino dynamic batch 2"] = torch.from_numpy(exporting.openvino_model(path)(x.numpy())[0])
    if int8:
        assert result.ops["encoder"].get("MatMulInteger", 0) == _int8_linears(model) > 0
        fp32 = _encoder_out(original, x)
        noise = exporting.sqnr_db(fp32, want)  # what W8A8 itself costs, eagerly
        for what, got in runs.items():
            n = got.shape[0]
            assert exporting.sqnr_db(fp32[:n], got) > noise - INT8_EXPORT_MARGIN_DB, what
            assert exporting.sqnr_db(want[:n], got) > noise + INT8_EXPORT_MARGIN_DB, what
        return
    assert "MatMulInteger" not in result.ops["encoder"]
    original = original.double()
    exact = _encoder_out(original, x.double())
    fp32 = _encoder_out(original.float(), x)
    for what, got in runs.items():
        n = got.shape[0]
        check_against_reference(f"{family}: {what}", got, exact[:n], fp32[:n], torch.float32, FWD_FACTOR)


def test_int8_onnx_translations_match_the_reference_on_hostile_rows(tmp_path):
    """The ONNX forms of the W8A8 ops, run in ONNX Runtime, equal sam_fast's reference: integers exactly, scales
    and dequantised outputs to float rounding; a zero row gets scale 1, a row holding NaN or inf a NaN scale (and
    int8 zeros); a calibrated scale saturates at +-127."""
    import onnxruntime as ort

    from sam_fast.onnx_translations import translation_table
    from sam_fast.reference import int8_linear as ref

    class Ops(torch.nn.Module):
        def forward(self, x, w, w_scale, bias, s):
            q, qs = torch.ops.sam_fast.quantize_per_token(x)
            st, sts = torch.ops.sam_fast.quantize_static(x, s)
            ln, lns = torch.ops.sam_fast.layer_norm_quantize(x, bias[: x.shape[1]] + 1, bias[: x.shape[1]], 1e-6)
            acc = torch._int_mm(q, w.t())
            y = torch.ops.sam_fast.int8_epilogue(acc, qs, w_scale, bias, True, torch.float32, None)
            y8 = torch.ops.sam_fast.int8_epilogue(acc, qs, w_scale, None, False, torch.int8, s)
            lin = torch.ops.sam_fast.int8_linear(q, qs, w, w_scale, bias, "gelu", torch.float32, None)
            return q, qs, st, sts, ln, lns, acc, y, y8, lin

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 32, generator=gen) * 3
    x[1] = 0
    x[2, 5] = float("nan")
    x[3, 7] = float("inf")
    x[4, 0] = 1e4  # beyond the calibrated range: saturates
    w, w_scale = ref.quantize_weight(torch.randn(32, 32, generator=gen))
    bias, s = torch.randn(32, generator=gen), torch.tensor(0.02)
    args = (x, w, w_scale, bias, s)
    program = torch.onnx.export(Ops().eval(), args, dynamo=True, custom_translation_table=translation_table(),
                                verbose=False)
    path = str(tmp_path / "ops.onnx")
    program.save(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = [torch.from_numpy(a) for a in session.run(None, {i.name: a.numpy() for i, a in
                                                              zip(session.get_inputs(), args)})]
    q, qs = ref.quantize_per_token(x)
    ln, lns = ref.layer_norm_quantize(x, bias[:32] + 1, bias[:32], 1e-6)
    finite = torch.isfinite(x).all(1)
    acc = ref.int8_mm(q, w)
    want = [q, qs, ref.quantize_static(x, s), ref.static_row_scale(x, s), ln, lns, acc,
            ref.int8_gemm(q, qs, w, w_scale, bias, "gelu"), ref.int8_gemm(q, qs, w, w_scale, None, None, torch.int8, s),
            ref.int8_gemm(q, qs, w, w_scale, bias, "gelu")]
    names = ["q", "scale", "static q", "static scale", "ln q", "ln scale", "acc", "y", "y int8", "int8_linear"]
    for name, g, e in zip(names, got, want):
        assert g.dtype == e.dtype and g.shape == e.shape, name
        if g.dtype.is_floating_point:
            both_nan = torch.isnan(g) & torch.isnan(e)
            assert torch.equal(torch.isnan(g), torch.isnan(e)), name
            torch.testing.assert_close(g[~both_nan], e[~both_nan], rtol=2e-6, atol=1e-6, msg=name)
        elif name in ("y int8", "acc"):  # rows of a NaN scale: compared where finite
            assert torch.equal(g[finite], e[finite]), name
        else:
            assert torch.equal(g, e), (name, (g != e).nonzero().tolist()[:5], g[g != e][:5], e[g != e][:5])
    assert qs[1] == 1 and torch.isnan(qs[2]) and torch.isnan(qs[3]) and not q[2].any() and not q[3].any()


@pytest.mark.parametrize("length", [27, 9, 15])
def test_resize_rel_pos_translation_matches_segment_anythings_resize(length, tmp_path):
    """A rel-pos table widened (or narrowed) for a dilated pattern: the ONNX form equals get_rel_pos's resize."""
    from sam_fast.onnx_translations import translation_table
    from sam_fast.reference.resize_rel_pos import resize_rel_pos

    class Resize(torch.nn.Module):
        def forward(self, table):
            return torch.ops.sam_fast.resize_rel_pos(table, length)

    table = torch.randn(15, 16, generator=torch.Generator().manual_seed(length))
    program = torch.onnx.export(Resize().eval(), (table,), dynamo=True, custom_translation_table=translation_table(),
                                verbose=False)
    path = str(tmp_path / "resize.onnx")
    program.save(path)
    (got,) = exporting.onnx_session(path).run(None, {"table": table.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), resize_rel_pos(table, length), rtol=1e-5, atol=4e-6)


def test_onnx_decoder_matches_segment_anythings_own_export(tmp_path):
    """The decoder file has SamOnnxModel's interface (a dynamic point count, the mask input, orig_im_size) and, in
    ONNX Runtime and OpenVINO, gives the outputs of segment_anything's own ONNX export of the same weights."""
    from segment_anything.utils.onnx import SamOnnxModel

    model = tiny_sam()
    sam_fast.apply(model)
    ours = str(tmp_path / "decoder.onnx")
    result = sam_fast.export(model, ours, parts="decoder")
    assert result.checks["decoder"]["sqnr_db"] > 90
    theirs = str(tmp_path / "sa_decoder.onnx")
    feeds = exporting.decoder_inputs(model, points=4)
    torch.onnx.export(SamOnnxModel(model, return_single_mask=False), tuple(torch.from_numpy(feeds[n]) for n in
                                                                            exporting.DECODER_INPUTS),
                      theirs, dynamo=False, opset_version=17, input_names=list(exporting.DECODER_INPUTS),
                      output_names=list(exporting.DECODER_OUTPUTS),
                      dynamic_axes={"point_coords": {1: "n"}, "point_labels": {1: "n"}})
    ort_ours, ort_theirs = exporting.onnx_session(ours), exporting.onnx_session(theirs)
    assert [i.name for i in ort_ours.get_inputs()] == [i.name for i in ort_theirs.get_inputs()]
    import openvino as ov

    ov_ours = ov.Core().compile_model(ours, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    eager = SamOnnxModel(model, return_single_mask=False).eval()
    traced_size = tuple(feeds["orig_im_size"].astype(int))
    # segment_anything's file is compared at the image size it was traced with: the TorchScript exporter bakes the
    # crop to that size (it warns so); at other sizes this file is compared with SamOnnxModel in PyTorch
    for points, size in ((1, traced_size), (6, traced_size), (3, (200, 256)), (2, (256, 120))):
        f = exporting.decoder_inputs(model, points=points, seed=points)
        f["orig_im_size"] = np.array(size, np.float32)
        a = ort_ours.run(None, f)
        if size == traced_size:
            b = ort_theirs.run(None, f)
        else:
            with torch.no_grad():
                b = [t.numpy() for t in eager(*(torch.from_numpy(f[n]) for n in exporting.DECODER_INPUTS))]
        c = list(ov_ours(f).values())
        assert a[0].shape == (1, 4, *size)
        for name, x, y, z in zip(exporting.DECODER_OUTPUTS, a, b, c):
            scale = float(np.abs(y).max())
            assert np.abs(x - y).max() <= 1e-5 * scale + 1e-6, (name, points, size)
            assert np.abs(z - y).max() <= 1e-5 * scale + 1e-6, (name, points, size)


def _run_in_fresh_process(path, x, tmp_path, load_library=None, device_index=-1):
    """The package at ``path`` run on ``x[:1]`` and ``x`` in a new Python process that never imports sam_fast (after
    ``torch.ops.load_library(load_library)`` where given)."""
    torch.save(x.cpu(), tmp_path / "x.pt")
    code = ("import sys, torch\n"
            + (f"torch.ops.load_library({load_library!r})\n" if load_library else "")
            + f"run = torch._inductor.aoti_load_package({path!r}, device_index={device_index})\n"
            f"x = torch.load({str(tmp_path / 'x.pt')!r}).to({str(x.device)!r})\n"
            "outs = [run(x[:1]).cpu(), run(x).cpu()]\n"
            f"torch.save(outs, {str(tmp_path / 'out.pt')!r})\n"
            "assert 'sam_fast' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [t.to(x.device) for t in torch.load(tmp_path / "out.pt")]


@pytest.mark.whole_program
def test_aoti_package_runs_in_a_fresh_process_without_sam_fast(tmp_path, cpu_rules):
    """A dilated int8 encoder (exact attention in its window blocks) as an AOTInductor package: its graph calls
    sam_fast's C++ kernels, and a fresh process that only loads the C++ library (no sam_fast import) runs it at
    batch 1 and 3 through the dynamic batch axis, matching eager; sam_fast.exporting.load_aoti does the same."""
    cpu_rules(sam_block_min_keys=9)  # the 3 x 3 windows through the SAM block kernel too
    model = tiny_sam()
    float_model = copy.deepcopy(model)
    sam_fast.apply(model, sam_fast.SamFastConfig(DILATED, quantize="int8"))
    path = str(tmp_path / "enc.pt2")
    result = sam_fast.export(model, path, format="aoti", batch="dynamic", check=False)
    ops = result.ops["encoder"]
    assert ops.get("sam_fast.sam_block_attention.default", 0) + ops.get("auto_functionalized", 0) >= 2
    assert ops.get("sam_fast.quantize_per_token.default", 0) + ops.get("sam_fast.layer_norm_quantize.default", 0) \
        == _int8_linears(model) > 0
    x = exporting.photo_input(model, 256, batch=3)
    lib = glob.glob(os.path.join(os.path.dirname(sam_fast.__file__), "_C*.so"))[0]
    one, three = _run_in_fresh_process(path, x, tmp_path, load_library=lib)
    want, fp32 = _encoder_out(model, x), _encoder_out(float_model_dilated(float_model), x)
    noise = exporting.sqnr_db(fp32, want)
    assert one.shape == want[:1].shape and three.shape == want.shape
    for got, n in ((one, 1), (three, 3)):
        assert exporting.sqnr_db(fp32[:n], got) > noise - INT8_EXPORT_MARGIN_DB
        assert exporting.sqnr_db(want[:n], got) > noise + INT8_EXPORT_MARGIN_DB
    runner = exporting.load_aoti(path)
    assert "sam_fast._C" in runner.get_metadata()["needs"]
    torch.testing.assert_close(runner(x), three)


TRACE_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "aoti_cuda_trace_worker.py")
#: what each Triton kernel of an encoder writes: its outputs, nothing it reads
KERNEL_OUTPUTS = {"_dilated_attention_fwd_kernel": ["LSE", "O"], "_int8_gemm_kernel": ["c_ptr"],
                  "_quantize_rows_kernel": ["q_ptr", "scale_ptr"],
                  "_layer_norm_quantize_kernel": ["q_ptr", "scale_ptr"]}


@pytest.mark.whole_program
def test_aoti_trace_of_a_cuda_model_compiles_the_triton_kernels_into_the_package():
    """A CUDA model's trace for an AOTInductor package (a dilated int8 encoder) holds the ``triton_op`` forms of the
    Triton ops and nothing that calls back into Python; lowered as Inductor lowers it, every op becomes Triton launches
    whose kernels compile to TTIR for sm_90 with the arguments they get (Inductor's analysis then knows exactly which
    tensors each writes: its outputs). Run in a process without the interpreter, on fake CUDA tensors
    (tests/aoti_cuda_trace_worker.py)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, TRACE_WORKER], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert sorted(report) == ["dilated_int8"]
    for name, got in report.items():
        exported = got["exported"]
        assert exported and all(op.startswith("sam_fast.triton_") for op in exported), (name, exported)
        assert got["lowered"] == {}, (name, got["lowered"])  # no sam_fast op left: all of it is Triton launches
        kernels = collections.Counter(launch[0] for launch in got["launches"])
        assert set(kernels) == set(KERNEL_OUTPUTS), (name, kernels)
        # one GEMM per int8 linear, each fed by one quantisation (or an int8 output of the GEMM before it)
        gemms = exported["sam_fast.triton_int8_linear.default"]
        assert kernels["_int8_gemm_kernel"] == gemms == 16
        assert kernels["_quantize_rows_kernel"] + kernels["_layer_norm_quantize_kernel"] <= gemms
        assert kernels["_dilated_attention_fwd_kernel"] >= exported["sam_fast.triton_dilated_attention_fwd.default"]
        for kernel, writes, odd in got["launches"]:
            assert writes == KERNEL_OUTPUTS[kernel], (name, kernel, writes)
            assert odd == [], (name, kernel, odd)  # e.g. a tuple not declared constexpr


def float_model_dilated(model):
    """``model`` with the dilated pattern alone (the float function an int8 dilated student approximates)."""
    sam_fast.apply(model, sam_fast.SamFastConfig(DILATED))
    return model


def test_export_refuses_before_any_work(tmp_path):
    model = tiny_sam()
    target = tmp_path / "enc.onnx"
    target.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        sam_fast.export(model, target)
    assert target.read_bytes() == b"keep me"
    with pytest.raises(ValueError, match=r"\.pt2"):
        sam_fast.export(model, tmp_path / "enc.onnx", format="aoti")
    with pytest.raises(ValueError, match="format"):
        sam_fast.export(model, tmp_path / "e.onnx", format="tensorrt")
    with pytest.raises(ValueError, match="parts"):
        sam_fast.export(model, tmp_path / "e.onnx", parts="everything")
    with pytest.raises(ValueError, match="batch"):
        sam_fast.export(model, tmp_path / "e.onnx", batch=0)
    with pytest.raises(ValueError, match="batch"):
        sam_fast.export(model, tmp_path / "e.onnx", batch="many")
    with pytest.raises(ValueError, match="ONNX only"):
        sam_fast.export(model, tmp_path / "d.pt2", format="aoti", parts="decoder")
    with pytest.raises(ValueError, match="no decoder"):
        sam_fast.export(model.image_encoder, tmp_path / "d.onnx", parts="decoder")
    with pytest.raises(ValueError, match="256 x 256"):
        sam_fast.export(model, tmp_path / "e.onnx", image_size=512)
    with pytest.raises(ValueError, match="dtype"):
        sam_fast.export(model, tmp_path / "e.onnx", dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="model"):
        sam_fast.export("sam.pth", tmp_path / "e.onnx")
    with pytest.raises(TypeError, match="path"):
        sam_fast.export(model, 3)
    with pytest.raises(ValueError, match="folder"):
        sam_fast.export(model, tmp_path / "missing" / "e.onnx")
    forced = tiny_sam()
    sam_fast.apply(forced, sam_fast.SamFastConfig("exact", backend="triton"))
    with pytest.raises(ValueError, match="backend='auto'"):
        sam_fast.export(forced, tmp_path / "e.onnx")
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        sam_fast.export(model, tmp_path / "e.onnx")
    model.eval()
    handle = model.image_encoder.blocks[1].register_forward_hook(lambda m, i, o: None)
    with pytest.raises(ValueError, match="hooks.*blocks.1"):
        sam_fast.export(model, tmp_path / "e.onnx")
    handle.remove()
    assert sorted(os.listdir(tmp_path)) == ["enc.onnx"]  # nothing written by any refusal


def test_cli_export_int8_calibrated_with_summary(tmp_path, capsys):
    from sam_fast.cli import main
    from sam_fast.testing import write_photos

    ckpt = tmp_path / "tiny.pth"
    torch.save(tiny_sam().state_dict(), ckpt)
    photos = tmp_path / "photos"
    write_photos(photos, ["astronaut", "coffee"])
    out = tmp_path / "enc.onnx"
    argv = ["export", "--checkpoint", str(ckpt), "--decoder-heads", "2", "--out", str(out), "--int8", "--calibration",
            str(photos), "--batch", "dynamic"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "MatMulInteger x" in text and "SQNR" in text and str(out) in text
    assert exporting.onnx_session(out).get_inputs()[0].shape[0] != 1  # the dynamic batch axis
    assert main(argv) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x.onnx"), "--calibration",
                 str(photos), "--decoder-heads", "2"]) == 2
    assert "--calibration needs --int8" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x.onnx"), "--batch", "two",
                 "--decoder-heads", "2"]) == 2
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["exact", pytest.param("dilated_int8", marks=pytest.mark.smoke)])
def test_aoti_package_of_a_cuda_model_runs_with_torch_alone(config, tmp_path):
    """On a GPU the package holds the Triton kernels themselves (the ops' triton_op forms): a fresh process with torch
    alone (no sam_fast, no sam_fast._C) runs it at batch 1 and 2 through the dynamic axis, matching eager."""
    model = tiny_sam().cuda().eval()
    if config == "exact":
        sam_fast.apply(model, sam_fast.SamFastConfig("exact"))
    else:
        sam_fast.apply(model, sam_fast.SamFastConfig(DILATED, quantize="int8"))
    path = str(tmp_path / "enc.pt2")
    result = sam_fast.export(model, path, format="aoti", batch="dynamic")
    ops = result.ops["encoder"]
    assert all(op.startswith("sam_fast.triton_") for op in ops if op.startswith("sam_fast")), ops
    assert ops.get("sam_fast.triton_dilated_attention_fwd.default", 0) > 0
    x = exporting.photo_input(model, 256, batch=2, device="cuda")
    one, two = _run_in_fresh_process(path, x, tmp_path, device_index=0)
    want = _encoder_out(model, x)
    assert one.shape == want[:1].shape and two.shape == want.shape
    for got, n in ((one, 1), (two, 2)):
        if config == "exact":
            torch.testing.assert_close(got, want[:n], rtol=1e-4, atol=1e-4)
        else:
            assert exporting.sqnr_db(want[:n], got) > 40
    runner = exporting.load_aoti(path, device_index=0)
    assert runner.get_metadata()["needs"] == "torch"
    assert result.checks["encoder"]["sqnr_db"] > 40
