"""sam_fast.distill on tiny random models and real photos: schedule, learning, resume, cache, errors, saving."""

import csv
import dataclasses
import math
import os
import shutil
import warnings

import numpy as np
import pytest
import skimage.data as data
import torch
from PIL import Image

import sam_fast
from sam_fast import Branch
from sam_fast.checkpoint import load_sam, save_sam
from sam_fast.distill import (
    DLDSchedule,
    dilated_patterns,
    dilated_student,
    distill,
    evaluate,
    lr_factor,
    plot_results,
    read_log,
    schedule_picture,
)
from sam_fast.distill.prompts import sample_generator
from sam_fast.distill.train import stream_indices
from sam_fast.models import tiny_sam
from sam_fast.models.tiny import sam_around, tiny_image_encoder
from sam_fast.nn.attention import SamFastBlock

PATTERN = [Branch((16, 16), (2, 1))]  # tiny_sam: 16x16 tokens, 2 heads; head h keeps rows h mod 2


def _gray(a):
    return np.ascontiguousarray(np.stack([a] * 3, -1))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Six training photos (PNG and JPEG, several sizes, one in a subfolder) and three held-out ones."""
    root = tmp_path_factory.mktemp("distill_photos")
    train, held = root / "train", root / "held"
    (train / "more").mkdir(parents=True)
    held.mkdir()
    Image.fromarray(data.astronaut()).save(train / "astronaut.png")
    Image.fromarray(data.coffee()).save(train / "coffee.jpg", quality=95)
    Image.fromarray(data.chelsea()).save(train / "chelsea.png")
    Image.fromarray(data.rocket()).save(train / "more" / "rocket.JPG")
    Image.fromarray(_gray(data.camera())).save(train / "camera.png")
    Image.fromarray(_gray(data.coins())).save(train / "more" / "coins.png")
    Image.fromarray(data.immunohistochemistry()).save(held / "ihc.jpg")
    Image.fromarray(_gray(data.moon())).save(held / "moon.png")
    Image.fromarray(_gray(data.page())).save(held / "page.png")
    return str(train), str(held)


def _teacher():
    return tiny_sam()


# ------------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------------


def test_dld_weights_follow_the_documented_function():
    s = DLDSchedule(focal=2, transition=0.5, width=2.0, floor=0.1, initial=0)
    # depth 6: M = 4 moving blocks; front c(p) = 4 * min(p / 0.5, 1)
    assert s.weights(6, 0.0) == pytest.approx([1.0, 0.5, 0.0, 0.0, 1.0, 1.0])
    # p = 0.25: c = 2 -> block 0 behind by 2: max(.1, 1 - 2 * .9 / 2) = 0.1; block 1: 1 - .45 = .55; block 2: 1;
    # block 3 ahead by 1: 0.5
    assert s.weights(6, 0.25) == pytest.approx([0.1, 0.55, 1.0, 0.5, 1.0, 1.0])
    # p = 0.125: c = 1 -> [1 - .45, 1, 1 - .5, 0, ...]
    assert s.weights(6, 0.125) == pytest.approx([0.55, 1.0, 0.5, 0.0, 1.0, 1.0])
    # from p = transition on the front rests at M = 4
    assert s.weights(6, 0.5) == s.weights(6, 0.9) == pytest.approx([0.1, 0.1, 0.1, 0.55, 1.0, 1.0])
    assert s.weights(6, 7.0) == s.weights(6, 1.0)  # progress is clipped
    # the default keeps block 0 at the full weight throughout (the initial layers at the maximum)
    held = DLDSchedule(focal=2, transition=0.5, width=2.0, floor=0.1)
    for p in (0.0, 0.125, 0.25, 0.5, 1.0):
        assert held.weights(6, p) == pytest.approx([1.0] + s.weights(6, p)[1:])


def test_dld_focal_blocks_never_zero_and_early_blocks_lead():
    s = DLDSchedule(focal=3, focal_weight=0.7)
    for p in np.linspace(0, 1, 41):
        w = s.weights(12, float(p))
        assert w[-3:] == [0.7, 0.7, 0.7]
        assert all(0.0 <= x <= 1.0 for x in w)
    early, late = s.weights(12, 0.0), s.weights(12, 1.0)
    assert early[0] == 1.0 and early[8] == 0.0
    assert late[0] == 1.0 and late[8] > late[1] == s.floor  # block 0 held, the others decayed
    assert "focal" in schedule_picture(s, 12).splitlines()[-1]


@pytest.mark.parametrize("kwargs, match", [
    ({"focal": 0}, "focal"), ({"transition": 0}, "transition"), ({"width": -1}, "width"),
    ({"floor": 1.5}, "floor"), ({"focal_weight": 0}, "focal_weight"), ({"transition": float("nan")}, "transition"),
    ({"initial": -1}, "initial"),
])
def test_dld_schedule_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DLDSchedule(**kwargs)


def test_lr_warmup_then_cosine():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(99, 100, 10, 0.01) == pytest.approx(0.01)
    mid = lr_factor(10 + 89 // 2, 100, 10)
    assert 0.45 < mid < 0.55


def test_stream_visits_every_image_once_per_epoch_and_depends_on_the_step_only():
    n, bs = 7, 3
    stream = [i for step in range(7) for i in stream_indices(step, bs, n, seed=5)]  # 21 = 3 epochs
    for e in range(3):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))
    assert stream_indices(4, bs, n, seed=5) == stream[12:15]
    assert stream_indices(0, bs, n, seed=6) != stream_indices(0, bs, n, seed=5) or n < 3
    a, b = sample_generator(1, 2, 3), sample_generator(1, 2, 3)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


# ------------------------------------------------------------------------------------------------
# Learning
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def learned(photos, tmp_path_factory):
    """Undistilled dilated swap, then DLD and embedding distillation at equal steps (seed 0)."""
    train, held = photos
    teacher = _teacher()
    out = {"before": evaluate(dilated_student(teacher, PATTERN), teacher, held, progress=False)}
    for method in ("dld", "embedding"):
        student = dilated_student(teacher, PATTERN)
        run = tmp_path_factory.mktemp(f"run_{method}")
        res = distill(teacher, student, train, out_dir=str(run), method=method, steps=100, batch_size=2, lr=3e-4,
                      progress=False)
        out[method] = evaluate(student, teacher, held, progress=False)
        out[method + "_result"] = res
    return teacher, out


def test_distillation_recovers_the_teacher(learned, tmp_path):
    _, r = learned
    before, after = r["before"], r["dld"]
    # Measured (seed 0, 100 steps): embedding SQNR 9.25 -> 19.13 dB, point mIoU 0.777 -> 0.932, box 0.780 -> 0.915
    assert after.sqnr_db > before.sqnr_db + 6.0, (before.sqnr_db, after.sqnr_db)
    assert after.miou["points"] > before.miou["points"] + 0.08, (before.miou, after.miou)
    assert after.miou["boxes"] > before.miou["boxes"] + 0.08, (before.miou, after.miou)
    png = plot_results({"dilated, undistilled": before, "DLD": after, "embedding": r["embedding"]},
                       str(tmp_path / "eval.png"))
    assert os.path.getsize(png) > 0
    assert "mask mIoU vs teacher, points" in after.table()


def test_dld_matches_or_beats_embedding_distillation(learned):
    _, r = learned
    # Measured (seed 0, 100 steps, lr 3e-4): DLD 19.13 dB / point mIoU 0.932; embedding 18.62 dB / 0.929
    assert r["dld"].sqnr_db >= r["embedding"].sqnr_db - 0.5, (r["dld"].sqnr_db, r["embedding"].sqnr_db)
    assert r["dld"].miou["points"] >= r["embedding"].miou["points"] - 0.02


def test_the_log_has_every_loss_term_per_step(learned):
    _, r = learned
    log = read_log(r["dld_result"].log)
    assert list(log["step"]) == list(range(100))
    for name in ("loss", "embedding", "block_0", "block_3", "w_0", "w_3", "lr"):
        assert np.isfinite(log[name]).all(), name
    assert log["w_3"].min() == 1.0 and (log["w_0"] == 1.0).all()  # block 0 held at the full weight
    assert log["w_1"][-1] == pytest.approx(0.55)  # block 1, one block behind the resting front (M = 2): 1 - 0.9 / 2
    assert log["loss"][-10:].mean() < 0.3 * log["loss"][:10].mean()
    assert set(r["embedding_result"].losses) == {"embedding", "loss"}


def test_evaluate_a_model_against_itself_is_perfect(photos):
    teacher = _teacher()
    r = evaluate(teacher, teacher, photos[1], prompts="boxes", prompts_per_image=3, progress=False)
    assert r.miou == {"boxes": 1.0} and r.prompts == {"boxes": 9} and math.isinf(r.sqnr_db)
    with pytest.raises(ValueError, match="prompts"):
        evaluate(teacher, teacher, photos[1], prompts="masks")


# ------------------------------------------------------------------------------------------------
# Checkpoints: resume, the saved student
# ------------------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _stop_at(k):
    def callback(step, losses):
        if step == k:
            raise _Stop
    return callback


@pytest.mark.parametrize("method, steps, decoder_steps, stop", [("dld", 7, 0, 4), ("full_stage", 3, 4, 4)])
def test_resume_continues_exactly(photos, tmp_path, method, steps, decoder_steps, stop):
    train, _ = photos
    teacher = _teacher()
    kw = dict(method=method, steps=steps, decoder_steps=decoder_steps, batch_size=2, lr=3e-4, checkpoint_every=2,
              progress=False, prompts_per_image=2)
    whole = dilated_student(teacher, PATTERN)
    distill(teacher, whole, train, out_dir=str(tmp_path / "whole"), **kw)
    cut = dilated_student(teacher, PATTERN)
    with pytest.raises(_Stop):  # interrupted after step `stop`; the last checkpoint is at step 4
        distill(teacher, cut, train, out_dir=str(tmp_path / "cut"), callback=_stop_at(stop), **kw)
    fresh = dilated_student(teacher, PATTERN)  # a new process: nothing but the files carries over
    res = distill(teacher, fresh, train, out_dir=str(tmp_path / "cut"), **kw)
    assert res.resumed_from == 4
    for (name, a), (_, b) in zip(whole.state_dict().items(), fresh.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    with open(tmp_path / "whole" / "train_log.csv") as f1, open(tmp_path / "cut" / "train_log.csv") as f2:
        rows1, rows2 = list(csv.DictReader(f1)), list(csv.DictReader(f2))
    assert [r["step"] for r in rows2] == [str(i) for i in range(steps + decoder_steps)]
    for r1, r2 in zip(rows1, rows2):
        for k in r1:
            if k not in ("step", "stage"):
                assert float(r1[k] or 0) == pytest.approx(float(r2[k] or 0), rel=1e-4, abs=1e-7), k


def test_seed_repeats_and_accumulation_splits_the_same_batch(photos, tmp_path):
    train, _ = photos
    teacher = _teacher()
    kw = dict(method="full_stage", epochs=1, batch_size=4, lr=3e-4, progress=False, prompts_per_image=2)
    runs = []
    for name, accumulate in (("a", 1), ("b", 1), ("c", 2)):
        student = dilated_student(teacher, PATTERN)
        res = distill(teacher, student, train, out_dir=str(tmp_path / name), accumulate=accumulate, **kw)
        runs.append((student, read_log(res.log)))
    assert len(runs[0][1]["step"]) == 2  # one epoch of six images at batch 4: ceil(6 / 4) steps
    for (pa, la), (pb, lb) in zip(runs[0][0].state_dict().items(), runs[1][0].state_dict().items()):
        assert torch.equal(la, lb), pa  # same seed, same run, bit for bit
    for k in ("loss", "embedding", "mask", "iou"):
        np.testing.assert_allclose(runs[2][1][k], runs[0][1][k], rtol=1e-4, atol=1e-8, err_msg=k)
    for (name, a), b in zip(runs[0][0].state_dict().items(), runs[2][0].state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=2e-5, msg=name)


def test_resume_refuses_other_settings(photos, tmp_path):
    train, _ = photos
    teacher = _teacher()
    distill(teacher, dilated_student(teacher, PATTERN), train, out_dir=str(tmp_path), steps=2, batch_size=2,
            progress=False)
    with pytest.raises(ValueError, match="resume.*lr"):
        distill(teacher, dilated_student(teacher, PATTERN), train, out_dir=str(tmp_path), steps=2, batch_size=2,
                lr=1e-3, progress=False)
    res = distill(teacher, dilated_student(teacher, PATTERN), train, out_dir=str(tmp_path), steps=2, batch_size=2,
                  lr=1e-3, resume=False, progress=False)
    assert res.resumed_from is None


def test_resume_refuses_another_student_or_other_images_before_touching_the_run(photos, tmp_path):
    """A rerun with another pattern resumed the old pattern's weights without a word; one with another image folder
    deleted the run's teacher cache and built a new one before refusing. Both are refused first, the run's files
    untouched; another student architecture is a ValueError, not a load_state_dict traceback."""
    train, held = photos
    teacher = _teacher()
    distill(teacher, dilated_student(teacher, PATTERN), train, out_dir=str(tmp_path), steps=2, batch_size=2,
            progress=False)

    def files():
        return {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}

    before = files()
    other = [Branch((16, 16), (1, 2))]
    with pytest.raises(ValueError, match=r"the student \(its architecture or dilated pattern\) differ"):
        distill(teacher, dilated_student(teacher, other), train, out_dir=str(tmp_path), steps=2, batch_size=2,
                progress=False)
    with pytest.raises(ValueError, match=r"the images or the teacher \(the teacher cache's key\) differ"):
        distill(teacher, dilated_student(teacher, PATTERN), held, out_dir=str(tmp_path), steps=2, batch_size=2,
                progress=False)
    from sam_fast.models import tiny_sam

    narrow = tiny_sam(encoder_dim=32)
    with pytest.raises(ValueError, match="the student"):
        distill(teacher, narrow, train, out_dir=str(tmp_path), method="embedding", steps=2, batch_size=2,
                progress=False)
    assert files() == before  # cache, checkpoint, log and student.pt as they were


def test_saved_student_loads_with_its_pattern(learned, tmp_path):
    teacher, r = learned
    res = r["dld_result"]
    loaded = load_sam(res.checkpoint)
    assert dilated_patterns(loaded) == {1: tuple(PATTERN), 3: tuple(PATTERN)}
    assert loaded.sam_fast_config.chosen_blocks() == (1, 3)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(loaded.image_encoder(x), res.student.image_encoder(x))
    # apply() with no config keeps the student's attention; a config that drops it warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sam_fast.apply(loaded)
    assert dilated_patterns(loaded) == {1: tuple(PATTERN), 3: tuple(PATTERN)}
    with pytest.warns(UserWarning, match="trained for dilated attention in blocks \\[1, 3\\]"):
        handle = sam_fast.apply(loaded, sam_fast.SamFastConfig(attention="exact"))
    handle.undo()
    # plain segment_anything reads the weights under "model"
    raw = torch.load(res.checkpoint, weights_only=True)
    assert set(raw) == {"model", "sam_fast"} and set(raw["model"]) == set(teacher.state_dict())
    # a model without dilated blocks and SAM's decoder heads is saved in the official format
    plain = tmp_path / "plain.pth"
    save_sam(load_sam(res.checkpoint), str(tmp_path / "again.pth"))
    sam = tiny_sam(decoder_dim=256, decoder_heads=8, decoder_mlp_dim=64)
    save_sam(sam, str(plain))
    assert all(isinstance(v, torch.Tensor) for v in torch.load(plain, weights_only=True).values())


def test_save_sam_refuses_int8(tmp_path):
    sam = _teacher()
    handle = sam_fast.apply(sam, sam_fast.SamFastConfig(attention="none", quantize="int8"))
    with pytest.raises(ValueError, match="int8"):
        save_sam(sam, str(tmp_path / "q.pth"))
    handle.undo()


# ------------------------------------------------------------------------------------------------
# Teacher cache
# ------------------------------------------------------------------------------------------------


def test_teacher_cache_is_reused_and_invalidated(photos, tmp_path):
    train, _ = photos
    teacher = _teacher()
    students = [dilated_student(teacher, PATTERN) for _ in range(3)]  # before the hook (a copy would take it)
    calls = []
    teacher.image_encoder.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    kw = dict(out_dir=str(tmp_path), steps=2, batch_size=2, progress=False, cache_batch_size=4)
    distill(teacher, students[0], train, **kw)
    assert calls == [4, 2]  # six images, once each
    distill(teacher, students[1], train, resume=False, **kw)
    assert calls == [4, 2]  # reused: the teacher encoder did not run
    (first,) = os.listdir(tmp_path / "teacher_cache")
    with torch.no_grad():
        teacher.image_encoder.blocks[0].mlp.lin1.bias.add_(0.01)
    distill(teacher, students[2], train, resume=False, **kw)
    assert calls == [4, 2, 4, 2]  # a changed teacher is a new cache; the stale one is gone
    (second,) = os.listdir(tmp_path / "teacher_cache")
    assert second != first


def test_cache_holds_sam_preprocessing(photos, tmp_path):
    from sam_fast.distill.cache import teacher_cache

    train, _ = photos
    teacher = _teacher()
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(train) for f in fs)
    cache = teacher_cache(teacher, files, str(tmp_path), (0, 3), mean=teacher.pixel_mean.flatten().tolist(),
                          std=teacher.pixel_std.flatten().tolist(), device="cpu", progress=False)
    from segment_anything.utils.transforms import ResizeLongestSide

    from sam_fast.images import read_rgb

    i = cache.files.index(os.path.join(train, "coffee.jpg"))
    image = read_rgb(cache.files[i])
    resized = torch.as_tensor(ResizeLongestSide(256).apply_image(image)).permute(2, 0, 1)[None].float()
    expected = teacher.preprocess(resized)
    batch = cache.batch([i], "cpu", teacher.pixel_mean.flatten().tolist(), teacher.pixel_std.flatten().tolist())
    torch.testing.assert_close(batch["image"], expected)
    with torch.no_grad():
        emb = teacher.image_encoder(expected)
    torch.testing.assert_close(batch["embedding"], emb, rtol=2e-3, atol=2e-3)  # stored as float16
    assert set(batch["blocks"]) == {0, 3} and batch["blocks"][3].shape == (1, 16, 16, 64)


# ------------------------------------------------------------------------------------------------
# Other students
# ------------------------------------------------------------------------------------------------


def test_narrower_same_depth_student_distills_through_adapters(photos, tmp_path):
    """A SlimSAM-style student: the teacher's depth, half its width; DLD compares blocks through adapters."""
    train, held = photos
    teacher = _teacher()
    enc = tiny_image_encoder(img_size=256, embed_dim=32, out_chans=32, seed=3)
    student = sam_around(enc, 256, 32, 2, 64, 64)
    student.prompt_encoder.load_state_dict(teacher.prompt_encoder.state_dict())
    student.mask_decoder.load_state_dict(teacher.mask_decoder.state_dict())
    before = evaluate(student, teacher, held, prompts="boxes", progress=False).sqnr_db
    res = distill(teacher, student, train, out_dir=str(tmp_path), steps=40, batch_size=2, lr=1e-3, progress=False)
    after = evaluate(student, teacher, held, prompts="boxes", progress=False).sqnr_db
    assert after > before + 3.0, (before, after)
    state = torch.load(os.path.join(tmp_path, "checkpoints", "last.pt"), weights_only=True)
    assert {k.split(".")[1] for k in state["adapters"]} == {"0", "1", "2", "3"}
    saved = torch.load(res.checkpoint, weights_only=True)  # 2-head decoder: the head count is recorded
    assert set(saved["model"]) == set(student.state_dict()) and saved["sam_fast"]["decoder_heads"] == 2
    assert dilated_patterns(load_sam(res.checkpoint)) == {}


def test_tinyvit_student_distills_its_embedding(photos, tmp_path):
    from sam_fast.models import TinyViT

    train, held = photos
    teacher = _teacher()
    torch.manual_seed(0)
    enc = TinyViT(img_size=256, embed_dims=(16, 32, 32, 48), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2),
                  window_sizes=(7, 7, 7, 7), out_chans=32)
    student = sam_around(enc, 256, 32, 2, 64, 64).eval()
    student.mask_decoder.load_state_dict(teacher.mask_decoder.state_dict())
    student.prompt_encoder.load_state_dict(teacher.prompt_encoder.state_dict())
    with pytest.raises(ValueError, match="student.*dld"):
        distill(teacher, student, train, out_dir=str(tmp_path / "dld"), steps=2, progress=False)
    before = evaluate(student, teacher, held, prompts="points", progress=False).sqnr_db
    distill(teacher, student, train, out_dir=str(tmp_path / "emb"), method="embedding", steps=40, batch_size=2,
            lr=2e-3, progress=False)
    after = evaluate(student, teacher, held, prompts="points", progress=False).sqnr_db
    assert after > before + 3.0, (before, after)


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before any training
# ------------------------------------------------------------------------------------------------


def _nothing_trained(out):
    return not os.path.exists(os.path.join(out, "train_log.csv"))


def test_empty_folder(tmp_path):
    teacher = _teacher()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="images.*no JPEG or PNG"):
        distill(teacher, dilated_student(teacher, PATTERN), str(tmp_path / "empty"), out_dir=str(tmp_path / "o"))
    assert _nothing_trained(tmp_path / "o")


def test_unreadable_images(photos, tmp_path):
    teacher = _teacher()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (bad / "text.jpg").write_text("not an image")
    with pytest.raises(ValueError, match="images: none of the 2"):
        distill(teacher, dilated_student(teacher, PATTERN), str(bad), out_dir=str(tmp_path / "o"), progress=False)
    assert _nothing_trained(tmp_path / "o")
    mixed = tmp_path / "mixed"
    shutil.copytree(photos[1], mixed)
    shutil.copy(bad / "text.jpg", mixed / "text.jpg")
    with pytest.warns(UserWarning, match="skipped 1 unreadable file.*text.jpg"):
        res = distill(teacher, dilated_student(teacher, PATTERN), str(mixed), out_dir=str(tmp_path / "m"), steps=1,
                      batch_size=1, progress=False)
    assert res.images == 3 and list(res.skipped) == [str(mixed / "text.jpg")]


def test_student_depth_must_match_for_dld(photos, tmp_path):
    teacher = _teacher()
    shallow = sam_around(tiny_image_encoder(img_size=256, depth=2, global_attn_indexes=(1,), out_chans=32),
                         256, 32, 2, 64, 64)
    with pytest.raises(ValueError, match="student: method='dld'.*2 blocks.*4"):
        distill(teacher, shallow, photos[0], out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="student: DLD with focal=5"):
        distill(teacher, dilated_student(teacher, PATTERN), photos[0], out_dir=str(tmp_path),
                schedule=DLDSchedule(focal=5))
    assert _nothing_trained(tmp_path)


def test_pattern_must_tile_the_grid(photos, tmp_path):
    teacher = _teacher()
    # 2 heads, dilation (2, 2): heads keep offsets (0, 0) and (0, 1); odd rows are kept by no head
    with pytest.raises(ValueError, match="pattern does not tile the 16x16 token grid with 2 heads: 128 tokens"):
        dilated_student(teacher, Branch((16, 16), (2, 2)))
    with pytest.raises(ValueError, match="pattern: .*dilation \\(32, 1\\), larger than the 16x16 grid"):
        dilated_student(teacher, Branch((32, 32), (32, 1)))
    # a student patched by hand with such a pattern is caught by distill
    student = tiny_sam()
    sam_fast.apply(student, sam_fast.SamFastConfig(attention=sam_fast.Dilated(Branch((16, 16), (2, 2)))))
    with pytest.raises(ValueError, match="student block 1's dilated pattern does not tile"):
        distill(teacher, student, photos[0], out_dir=str(tmp_path))
    assert _nothing_trained(tmp_path)


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "kd"}, "method"), ({"steps": -1}, "steps"), ({"steps": 0}, "nothing to train"),
    ({"steps": 5, "epochs": 1}, "steps or epochs"), ({"epochs": 0}, "epochs"),
    ({"batch_size": 3, "accumulate": 2}, "batch_size 3 must split"), ({"lr": 0}, "lr"),
    ({"precision": "fp8"}, "precision"), ({"cache_blocks": [0]}, "cache_blocks must include the focal"),
    ({"cache_blocks": [9, 2, 3]}, "cache_blocks: \\[9\\]"), ({"seed": 1.5}, "seed"),
    ({"schedule": {"focal": 2}}, "schedule"), ({"method": "embedding", "cache_blocks": [3]}, "cache_blocks"),
    ({"device": "tpu:x"}, "device"), ({"cache_dtype": "int8"}, "cache_dtype"),
])
def test_bad_arguments(photos, tmp_path, kwargs, match):
    teacher = _teacher()
    with pytest.raises((ValueError, TypeError), match=match):
        distill(teacher, dilated_student(teacher, PATTERN), photos[0], out_dir=str(tmp_path), **kwargs)
    assert _nothing_trained(tmp_path)


def test_student_must_not_be_the_teacher(photos, tmp_path):
    teacher = _teacher()
    with pytest.raises(ValueError, match="student is the teacher"):
        distill(teacher, teacher, photos[0], out_dir=str(tmp_path))
    quantized = dilated_student(teacher, PATTERN)
    sam_fast.apply(quantized, sam_fast.SamFastConfig(attention="none", quantize="int8"))
    with pytest.raises(ValueError, match="student has int8 layers"):
        distill(teacher, quantized, photos[0], out_dir=str(tmp_path))
    big = tiny_sam(img_size=512)
    with pytest.raises(ValueError, match="student: its encoder takes 512"):
        distill(teacher, big, photos[0], out_dir=str(tmp_path))


def test_dilated_student_leaves_the_teacher_alone():
    teacher = _teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = dilated_student(teacher, PATTERN, blocks=[3])
    assert not any(isinstance(b, SamFastBlock) for b in teacher.image_encoder.blocks)
    assert dilated_patterns(student) == {3: tuple(PATTERN)}
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    with pytest.raises(ValueError, match="blocks \\[7\\] do not exist"):
        dilated_student(teacher, PATTERN, blocks=[7])
    with pytest.raises(ValueError, match="blocks must be 'global'"):
        dilated_student(teacher, PATTERN, blocks="odd")
    with pytest.raises(TypeError, match="pattern must be None, a sam_fast.Branch"):
        dilated_student(teacher, "16x16:2x1")


def test_distill_config_checks_itself_and_is_the_only_way_in(tmp_path):
    """DistillConfig: frozen, every setting checked by name when made (a wrong type a TypeError, a value out of range a
    ValueError), defaults resolved (1000 steps, decoder_lr = lr, the default DLD schedule); distill() takes it or
    its fields as keywords, never both, and names an unknown setting - all before any work."""
    from sam_fast.distill import DistillConfig

    cfg = DistillConfig(lr=3e-4)
    assert cfg.steps == 1000 and cfg.decoder_lr == 3e-4 and cfg.schedule == DLDSchedule()
    assert DistillConfig(epochs=2).steps == 0 and DistillConfig(cache_blocks=[3, 1, 3]).cache_blocks == (1, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    for kwargs, error, match in [
        (dict(steps=1.5), TypeError, "steps must be an int"), (dict(batch_size=True), TypeError, "batch_size must be"),
        (dict(batch_size=0), ValueError, "batch_size must be an int >= 1"),
        (dict(lr=0), ValueError, "lr must be a positive number"), (dict(lr=float("nan")), ValueError, "lr must be a"),
        (dict(weight_decay=-1.0), ValueError, "weight_decay must be a number >= 0"),
        (dict(seed="0"), TypeError, "seed must be an int"), (dict(resume=1), TypeError, "resume must be a bool"),
        (dict(method="kd"), ValueError, "method must be one of"), (dict(precision="fp16"), ValueError, "precision"),
        (dict(steps=0), ValueError, "nothing to train"), (dict(steps=3, epochs=1), ValueError, "steps or epochs"),
        (dict(cache_blocks=[1], method="embedding"), ValueError, "cache_blocks applies to method='dld' only"),
        (dict(schedule="dld"), TypeError, "schedule must be a sam_fast.distill.DLDSchedule"),
    ]:
        with pytest.raises(error, match=match):
            DistillConfig(**kwargs)
    teacher = tiny_sam()
    with pytest.raises(TypeError, match="unknown settings \\['step'\\]"):
        distill(teacher, teacher, [], out_dir=tmp_path, step=3)
    with pytest.raises(TypeError, match="not both"):
        distill(teacher, teacher, [], out_dir=tmp_path, config=cfg, steps=3)
    with pytest.raises(TypeError, match="config must be a sam_fast.distill.DistillConfig"):
        distill(teacher, teacher, [], out_dir=tmp_path, config={"steps": 3})
    assert not any(tmp_path.iterdir())
