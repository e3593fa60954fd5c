"""Pipeline stages: skipped when current, resumed when partial, redone (old folder kept) on change."""
import pytest

from likeness.backend.errors import UserError
from likeness.training.stages import Pipeline


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
