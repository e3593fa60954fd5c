"""Shared fixtures: a real SLURM cluster when it can be had, the real-face folder, a tiny retrain."""
import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


# Fixtures whose tests are slow: a tiny retrain, a SLURM cluster, Blender colour calibration and
# surrogate renders (test_real_labels), the extension zips for every platform (test_extension).
SLOW_FIXTURES = ("tiny_run", "slurm_env", "cal", "surrogate", "built_zip", "built_zips")
SLOW_NAMES = ("chromium",)                      # the rating page in a headless Chromium


def _slow_list() -> set[str]:
    """Test functions of tests/slow.txt (measured at 3 s or more; see the file's header), without
    their parameters: every case of a listed test is slow."""
    path = Path(__file__).with_name("slow.txt")
    return {line.split()[0].split("[")[0] for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")}


def _mark_slow(items):
    """The fast tier (``pytest -m "not slow"``, what a developer runs while working) leaves out the
    tests that render with Blender for long, run tiny retrains, SLURM or Chromium, or took 3 s or more."""
    listed = _slow_list()
    for item in items:
        nodeid = "tests/" + item.nodeid.split("tests/", 1)[-1].split("[")[0]
        if (nodeid in listed or any(f in getattr(item, "fixturenames", ()) for f in SLOW_FIXTURES)
                or any(n in item.name for n in SLOW_NAMES)):
            item.add_marker(pytest.mark.slow)


def pytest_collection_modifyitems(config, items):
    """Slow tests are marked (``_mark_slow``). Tests marked ``real_faces`` skip, saying where they
    looked, when the shared faces are absent (a checkout away from ../shared and without
    LIKENESS_CELEBAMASK)."""
    from likeness.backend import realfaces
    _mark_slow(items)
    root = realfaces.default_root()
    if (root / "images").is_dir():
        return
    skip = pytest.mark.skip(reason=f"the shared real faces are not at {root} (set LIKENESS_CELEBAMASK)")
    for item in items:
        if "real_faces" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def slurm_env():
    """Environment for sbatch/squeue against a one-node cluster started for this session."""
    import slurm_cluster
    reason = slurm_cluster.ensure_packages()
    if reason:
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld/slurmd/munged needs root")
    cluster = slurm_cluster.Cluster(Path(tempfile.mkdtemp(prefix="likeness-slurm-")))
    cluster.start()
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster.env
    finally:
        cluster.stop()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


@pytest.fixture(scope="session")
def tiny_default_model(tmp_path_factory):
    """A small, untrained estimator for the default pack, exported under the model contract."""
    import torch
    from likeness.backend.schema import find_pack
    from likeness.training.estimator import model as est
    from likeness.training.estimator.export import export_estimator
    pack = find_pack("default")
    torch.manual_seed(0)
    net = est.Estimator(pack.n_continuous, pack.slot_sizes, 16).eval()
    path = tmp_path_factory.mktemp("tiny-model") / "tiny.onnx"
    export_estimator(net, pack, path, 64, est.IMAGENET_MEAN, est.IMAGENET_STD)
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A whole `likeness retrain --config tiny` work folder (every stage, G_real trained), built once per
    session: (work, summary). Read it; tests that need to break it build their own folders from it."""
    from likeness.backend import realfaces
    from likeness.training.pipeline.retrain import retrain
    if not (realfaces.default_root() / "images").is_dir():     # G_real trains on the shared faces
        pytest.skip(f"the shared real faces are not at {realfaces.default_root()}")
    work = tmp_path_factory.mktemp("retrain")
    summary = retrain("default", "tiny", str(work), train_real=True, progress=False, log=lambda s: None)
    return work, summary


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread: on a shared 2-core CPU two OpenMP threads stall each other (measured 7x slower)."""
    torch = pytest.importorskip("torch")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
