"""``likeness eval synth``: the synthetic benchmark with known answers (issue #6), built from the
session's tiny retrain (real Blender renders, the work folder's encoder + optimisation, its G_real),
then read end to end by ``likeness eval --aligned --truth``."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from likeness.backend.errors import UserError
from likeness.backend.schema import find_pack
from likeness.cli import main
from likeness.evaluation.harness import load_truth
from likeness.evaluation.synthetic import KEY_SHIFT, SEED_BASE, build_benchmark

PACK = find_pack("default")
N, K, SEED = 4, 1, 3
STEMS = [f"{i:06d}" for i in range(N)]
QUIET = dict(progress=False, log=lambda *a, **k: None)


def rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.int16)


@pytest.fixture(scope="module")
def bench(tiny_run, tmp_path_factory):
    work, _ = tiny_run
    out = tmp_path_factory.mktemp("synth") / "bench"
    man = build_benchmark(work, N, out, seed=SEED, augment=K, workers=1, **QUIET)
    return work, out, man


def test_layout_and_truth_for_every_stem(bench):
    work, out, man = bench
    res = man["generators"]["resolution"]
    aug = [f"{s}_a{k}" for s in STEMS for k in range(K)]
    assert sorted(p.stem for p in (out / "realistic" / "images").glob("*.png")) == STEMS
    assert sorted(p.stem for p in (out / "augmented" / "images").glob("*.png")) == aug
    assert sorted(p.stem for p in (out / "renders" / "images").glob("*.png")) == STEMS
    assert sorted(p.stem for p in (out / "vectors").glob("*.json")) == sorted(STEMS + aug)
    assert rgb(out / "realistic" / "images" / f"{STEMS[0]}.png").shape == (res, res, 3)
    assert man["complete"] and man["kind"] == "likeness synthetic benchmark"
    assert man["counts"] == {"vectors": N, "renders": N, "realistic": N, "augmented": N * K,
                             "truth_files": N * (1 + K)}
    assert man["work"] == str(work.resolve()) and set(man["generators"]) >= {"G_real", "G_avatar", "encoder"}
    assert man["timings_s"]["total"] > 0 and man["hardware"]["threads"] == 1
    # the truth of each stem is the vector the engine rendered; an augmented face's is its source's
    for stem in STEMS + aug:
        rec = json.loads((out / "vectors" / f"{stem}.json").read_text())
        src = stem.split("_a")[0]
        assert rec["source"] == src
        rendered = json.loads((out / "renders" / "vectors" / f"{src}.json").read_text())
        assert rec["vector"] == rendered["vector"]
    truths, missing = load_truth(str(out / "vectors"), PACK, STEMS + aug)   # what `eval --truth` reads
    assert missing == [] and truths[aug[0]].to_arrays() == truths[STEMS[0]].to_arrays()


def test_faces_are_g_real_of_the_stored_latents(bench):
    from likeness.training.pairs import invert
    from likeness.training.pairs import paired_data
    from likeness.training.generators.train_gan import load_generator
    work, out, man = bench
    lat = invert.load_latents(out / "invert" / "latents.safetensors")
    assert lat["names"] == STEMS and lat["meta"]["mode"] == "encoder+opt"
    res = man["generators"]["resolution"]
    cfg = paired_data.get_config(man["augmentation"]["paired_config"], n_aug=K)
    keys = [man["stems"][s]["face_key"] for s in STEMS]
    g_real, _ = load_generator(man["generators"]["G_real_checkpoint"])
    faces = paired_data.realistic_faces(g_real, lat["wp"], keys, cfg)          # re-decoded, one batch
    imgs = paired_data.to_uint8(faces.flatten(0, 1), res).reshape(N, 1 + K, res, res, 3).astype(np.int16)
    g_avatar, _ = load_generator(work / "avatar")
    other = paired_data.realistic_faces(g_avatar, lat["wp"], keys, cfg)         # the twin, same codes
    other = paired_data.to_uint8(other.flatten(0, 1), res).reshape(N, 1 + K, res, res, 3).astype(np.int16)
    for i, s in enumerate(STEMS):
        real = rgb(out / "realistic" / "images" / f"{s}.png")
        augmented = rgb(out / "augmented" / "images" / f"{s}_a0.png")
        assert np.abs(real - imgs[i, 0]).max() <= 2                  # uint8 rounding of batch-order noise
        assert np.abs(augmented - imgs[i, 1]).max() <= 2
        # G_real's face, not G_avatar's (the tiny twin starts from G_real: close, but well
        # beyond the rounding the G_real check allows)
        assert np.abs(real - other[i, 0]).max() > 2 and np.abs(real - other[i, 0]).mean() > \
            4 * max(np.abs(real - imgs[i, 0]).mean(), 0.25)
        assert np.abs(real - augmented).mean() > 1                   # the augmentation redrew parts


def test_vectors_and_face_keys_are_held_out(bench):
    work, out, man = bench
    train = json.loads((work / "render" / "manifest.json").read_text())
    bench_man = json.loads((out / "renders" / "manifest.json").read_text())
    s = man["seeds"]
    assert s["job_seed"] == SEED_BASE + SEED == bench_man["seed"] != train["seed"] == s["training_job_seed"]
    assert bench_man["resolution"] == train["resolution"] and bench_man["jitter"] == train["jitter"]
    # vector i is the pack's seeded sample of the benchmark job, and none is a training vector
    assert PACK.sample_seeded(s["job_seed"], 2).to_json() == \
        json.loads((out / "vectors" / f"{STEMS[2]}.json").read_text())["vector"]

    def cont(folder):
        return np.array([json.loads(p.read_text())["continuous"] for p in sorted(folder.glob("*.json"))])
    seen, new = cont(work / "render" / "vectors"), cont(out / "renders" / "vectors")
    assert np.abs(seen[None] - new[:, None]).max(axis=2).min() > 1e-3
    # noise and augmentation codes of the faces are keyed above every training render index
    assert min(v["face_key"] for v in man["stems"].values()) >= (SEED_BASE << KEY_SHIFT) > train["count"]


def test_eval_reads_the_benchmark_aligned_with_truth(bench, tmp_path, capsys):
    work, out, _ = bench
    model = work / "model.onnx"
    rep = tmp_path / "report"
    # the photo set's folder as the docs name it (its images/ inside)
    code = main(["eval", "--photos", str(out / "realistic"), "--aligned", "--truth",
                 str(out / "vectors"), "--methods", f"onnx:{model}=tiny", "--out", str(rep), "--no-progress"])
    capsys.readouterr()
    assert code == 0
    r = json.loads((rep / "report.json").read_text())
    assert r["counts"] == {"photos": N, "detected": N, "failed": 0, "method_failures": 0}
    assert r["align"]["detection_skipped"] is True and "skipped" in r["align"]["detection"]
    assert "Face detection skipped (--aligned)" in (rep / "report.html").read_text()
    t = r["truth"]["methods"]["tiny"]
    assert t["n"] == N and r["truth"]["photos_without_truth"] == []
    assert set(t["slot_accuracy"]["per_slot"]) == {s.name for s in PACK.slots}
    for p in r["per_photo"]:
        m = p["methods"]["tiny"]
        assert 0 <= m["slot_accuracy"] <= 1 and 0 <= m["l1"] <= 1 and 0 <= m["iou"] <= 1
    assert sorted(p["stem"] for p in r["per_photo"]) == STEMS

    # augmented faces with their sources' truth; unusable images are still counted with --aligned
    photos = tmp_path / "aug"
    shutil.copytree(out / "augmented" / "images", photos)
    (photos / "broken.png").write_bytes(b"not a png")
    Image.new("RGB", (40, 32)).save(photos / "wide.png")
    code = main(["eval", "--photos", str(photos), "--aligned", "--truth", str(out), "--methods",
                 f"onnx:{model}=tiny", "--out", str(tmp_path / "report-aug"), "--no-progress"])
    capsys.readouterr()
    r = json.loads((tmp_path / "report-aug" / "report.json").read_text())
    assert code == 0 and r["counts"]["detected"] == N and r["counts"]["failed"] == 2
    assert {f["stem"] for f in r["failures"]} == {"broken", "wide"}
    assert r["truth"]["methods"]["tiny"]["n"] == N

    # without --aligned detection runs (and fails on tiny GAN faces): every failure is counted
    code = main(["eval", "--photos", str(out / "realistic" / "images"), "--truth", str(out / "vectors"),
                 "--methods", f"onnx:{model}=tiny", "--out", str(tmp_path / "report-det"), "--no-progress"])
    capsys.readouterr()
    r = json.loads((tmp_path / "report-det" / "report.json").read_text())
    assert r["align"]["detection_skipped"] is False
    assert r["counts"]["detected"] + r["counts"]["failed"] == N
    assert code == (0 if r["counts"]["detected"] else 1)


def test_rerun_keeps_the_benchmark_and_other_settings_are_refused(bench):
    work, out, man = bench
    before = rgb(out / "realistic" / "images" / f"{STEMS[1]}.png")
    again = build_benchmark(work, N, out, seed=SEED, augment=K, workers=1, **QUIET)
    assert again["settings"] == man["settings"]
    assert np.array_equal(rgb(out / "realistic" / "images" / f"{STEMS[1]}.png"), before)
    with pytest.raises(UserError, match=r"other settings \(count\)"):
        build_benchmark(work, N + 1, out, seed=SEED, augment=K, workers=1, **QUIET)
    assert json.loads((out / "manifest.json").read_text())["settings"] == man["settings"]


def test_bad_input_is_refused_before_any_work(tiny_run, tmp_path, capsys):
    work, _ = tiny_run

    def refused(w, match, count=N, out=None, **kw):
        out = out or tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        with pytest.raises(UserError, match=match):
            build_benchmark(w, count, out, **kw, **QUIET)
        return out

    assert not refused(work, "at least 1", count=0).exists()
    assert not refused(work, "0 or more", augment=-1).exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    refused(work, "not a synthetic benchmark", out=busy)
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    # a --baseline run has no generators; a full run stopped before its encoder has none either
    base = tmp_path / "base"
    base.mkdir()
    ident = json.loads((work / "pipeline.json").read_text())
    (base / "pipeline.json").write_text(json.dumps({**ident, "mode": "baseline"}))
    assert not refused(base, "baseline").exists()
    no_enc = tmp_path / "no-encoder"
    no_enc.mkdir()
    for p in work.iterdir():
        if p.name != "encoder":
            os.symlink(p, no_enc / p.name)
    assert not refused(no_enc, "no inversion encoder").exists()
    refused(tmp_path / "nowhere", "not a retrain work folder")
    # the command line: one clear line, exit 1
    code = main(["eval", "synth", "--work", str(base), "--count", "2", "--out", str(tmp_path / "cli")])
    err = capsys.readouterr().err
    assert code == 1 and "likeness eval: error:" in err and "baseline" in err and "Traceback" not in err
