"""Pipeline stages: skipped when current, resumed when partial, redone (old folder kept) on change."""
import pytest

from likeness.backend.errors import UserError
from likeness.training.pipeline.stages import Pipeline


def test_stage_skip_resume_redo(tmp_path):
    calls = []

    def stage(folder):
        calls.append(folder.name)
        (folder / "out.txt").write_text("x")
        return {"n": len(calls)}

    p = Pipeline(tmp_path, {"pack": "p", "config": "tiny"}, log=lambda s: None)
    assert p.run("a", {"k": 1}, stage) == {"n": 1}
    assert p.run("b", {}, stage, depends=("a",)) == {"n": 2}
    p2 = Pipeline(tmp_path, {"pack": "p", "config": "tiny"}, log=lambda s: None)
    assert p2.run("a", {"k": 1}, stage) == {"n": 1} and len(calls) == 2     # skipped
    assert p2.run("b", {}, stage, depends=("a",)) == {"n": 2} and len(calls) == 2
    assert p2.run("a", {"k": 2}, stage) == {"n": 3}                          # inputs changed
    assert p2.run("b", {}, stage, depends=("a",)) == {"n": 4}                # upstream changed
    stale = sorted(x.name for x in tmp_path.glob("*.stale-*"))
    assert len(stale) == 2 and all((tmp_path / s / "out.txt").exists() for s in stale)  # kept


def test_partial_stage_resumes_in_place(tmp_path):
    p = Pipeline(tmp_path, {"pack": "p"}, log=lambda s: None)

    def crash(folder):
        (folder / "half.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        p.run("a", {}, crash)
    assert p.record("a")["done"] is False
    seen = []
    p.run("a", {}, lambda folder: seen.append((folder / "half.txt").read_text()) or {})
    assert seen == ["half"]                                                  # partial work kept


def test_work_folder_of_another_job_is_refused(tmp_path):
    Pipeline(tmp_path, {"pack": "p", "config": "tiny"})
    with pytest.raises(UserError, match="config: folder has 'tiny', this run wants 'cpu'"):
        Pipeline(tmp_path, {"pack": "p", "config": "cpu"})


def test_stage_time_of_an_interrupted_sitting_is_kept(tmp_path):
    """A stage stopped mid-way (a session ends) and resumed reports the time of both sittings."""
    import time
    p = Pipeline(tmp_path, {"pack": "p"}, log=lambda s: None)
    p.heartbeat_seconds = 0.05
    seen = []

    def first_sitting(folder):
        time.sleep(0.3)
        seen.append(p.record("a")["seconds"])        # kept current while the stage runs
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        p.run("a", {}, first_sitting)
    kept = p.record("a")["seconds"]
    assert 0.15 <= seen[0] <= kept < 0.6 and p.record("a")["done"] is False
    p2 = Pipeline(tmp_path, {"pack": "p"}, log=lambda s: None)
    p2.run("a", {}, lambda folder: time.sleep(0.2) or {})
    assert p2.record("a")["done"] and p2.record("a")["seconds"] >= kept + 0.2
    assert p2.timings()["a"] == pytest.approx(p2.record("a")["seconds"], abs=0.1)


def test_a_redone_stage_with_the_same_output_leaves_later_stages_current(tmp_path):
    """A stage whose result names its ``content`` (the real labels): redone after an input change
    that made the same output, the stages after it are not redone; a different output redoes them."""
    later = []

    def labels(content):
        return lambda folder: {"content": content}

    def estimator(folder):
        later.append(1)
        return {"n": len(later)}

    p = Pipeline(tmp_path, {"pack": "p"}, log=lambda s: None)
    p.run("labels", {"code": "v1"}, labels("abc"))
    p.run("estimator", {}, estimator, depends=("labels",))
    p = Pipeline(tmp_path, {"pack": "p"}, log=lambda s: None)
    p.run("labels", {"code": "v2"}, labels("abc"))          # code edited, labels the same
    assert p.run("estimator", {}, estimator, depends=("labels",)) == {"n": 1} and later == [1]
    p = Pipeline(tmp_path, {"pack": "p"}, log=lambda s: None)
    p.run("labels", {"code": "v3"}, labels("xyz"))          # the labels changed
    assert p.run("estimator", {}, estimator, depends=("labels",)) == {"n": 2}


def test_a_new_setting_at_its_default_leaves_stages_current(tmp_path):
    """A newer Likeness adds a config field (off by default): finished and partial stages of an
    older run stay current and resume; the field switched on redoes them."""
    quiet = dict(log=lambda s: None)
    calls = []

    def stage(folder):
        calls.append(folder.name)
        return {"n": len(calls)}

    def crash(folder):
        (folder / "half.txt").write_text("half")
        raise KeyboardInterrupt

    p = Pipeline(tmp_path, {"pack": "p"}, **quiet)
    assert p.run("a", {"k": 1}, stage) == {"n": 1}
    with pytest.raises(KeyboardInterrupt):
        p.run("b", {"k": 1}, crash, depends=("a",))
    p = Pipeline(tmp_path, {"pack": "p"}, **quiet)
    assert p.run("a", {"k": 1, "share": 0.0, "note": ""}, stage) == {"n": 1}     # still current
    seen = []
    p.run("b", {"k": 1, "share": 0.0}, lambda f: seen.append((f / "half.txt").read_text()) or {},
          depends=("a",))
    assert seen == ["half"] and not list(tmp_path.glob("*.stale-*"))            # resumed in place
    assert p.run("b", {"k": 1, "share": 0.0}, stage, depends=("a",)) == {}      # now finished
    assert p.run("a", {"k": 1, "share": 0.5}, stage) == {"n": 2}                # switched on: redone
    assert p.run("a", {"k": 2, "share": 0.0}, stage) == {"n": 3}                # a real change
