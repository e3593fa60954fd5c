"""Shared fixtures: a real SLURM cluster when it can be had, the real-face folder, a tiny retrain."""
import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


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
    from likeness.training import estimator as est
    from likeness.training.export import export_estimator
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
    from likeness.training.retrain import retrain
    work = tmp_path_factory.mktemp("retrain")
    summary = retrain("default", "tiny", str(work), train_real=True, progress=False, log=lambda s: None)
    return work, summary


@pytest.fixture(scope="session")
def tiny_engine_gans(tmp_path_factory):
    """Inputs of the methods built on the engine's generators, at the tiny config on CPU: 64 renders of the
    default pack at 64 px (real Blender), and G_real, the face parser and G_avatar trained a few steps on the
    shared real faces and those renders. Decoded arrays and the built pack go to a session cache folder
    (``cache``); tests that read the data again should point LIKENESS_CACHE there."""
    pytest.importorskip("bpy")
    import torch
    from likeness.backend import realfaces
    from likeness.backend.schema import find_pack
    from likeness.render_engine.dataset import Job, render_dataset
    from likeness.training import train_gan
    if not (realfaces.default_root() / "images").is_dir():
        pytest.skip("shared real faces absent")
    root = tmp_path_factory.mktemp("engine-gans")
    old_cache, old_threads = os.environ.get("LIKENESS_CACHE"), torch.get_num_threads()
    os.environ["LIKENESS_CACHE"] = str(root / "cache")
    torch.set_num_threads(1)
    quiet = lambda s: None                                  # noqa: E731
    try:
        pack = find_pack("default")
        render_dataset(Job(pack, root / "render", count=64, seed=0, resolution=64), workers=1, progress=False)
        train_gan.train("real", "tiny", work_dir=root / "real", steps=10, log=quiet)
        train_gan.train("parser", "tiny", work_dir=root / "parser", steps=20, log=quiet)
        train_gan.train("avatar", "tiny", data=str(root / "render"), work_dir=root / "avatar", steps=10,
                        init=root / "real", log=quiet)
    finally:
        torch.set_num_threads(old_threads)
        if old_cache is None:
            os.environ.pop("LIKENESS_CACHE", None)
        else:
            os.environ["LIKENESS_CACHE"] = old_cache
    from types import SimpleNamespace
    return SimpleNamespace(root=root, cache=root / "cache", renders=root / "render", real=root / "real",
                           parser=root / "parser", avatar=root / "avatar")
