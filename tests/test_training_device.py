"""Where training runs (training/common/device.py), the one loop (training/common/trainer.py) and the one checkpoint
format (training/common/checkpoint.py): device selection, a real two-process DDP run on the CPU with gloo,
checkpoints moved between devices, SIGTERM / divergence / max_steps handling of the shared loop."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from likeness.backend.errors import UserError
from likeness.training.common import checkpoint as C
from likeness.training.common import device as dev
from likeness.training.common.trainer import Trainer

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ---- device selection ---------------------------------------------------------------------------

def test_device_selection_without_cuda(no_cuda):
    assert dev.resolve("auto") == torch.device("cpu")
    assert dev.resolve("cpu") == torch.device("cpu")
    assert dev.resolve(None) == torch.device("cpu")
    for name in ("cuda", "cuda:0", "CUDA"):
        with pytest.raises(UserError, match="--device cuda: no CUDA device is available.*--device cpu"):
            dev.resolve(name)
    with pytest.raises(UserError, match="choose one of auto, cpu, cuda"):
        dev.resolve("tpu")
    assert dev.describe(torch.device("cpu")).startswith("cpu (")


def test_ddp_backend_mixed_precision_and_loading_follow_the_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert dev.ddp_backend(cpu) == "gloo" and dev.ddp_backend(cuda) == "nccl"
    assert not dev.scaler(cpu).is_enabled()
    with dev.amp(cpu):                                   # no autocast on the CPU: float32 stays float32
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert dev.loader_kwargs(cpu) == {"num_workers": 0, "pin_memory": False}
    k = dev.loader_kwargs(cuda, workers=3)
    assert k["pin_memory"] and k["num_workers"] == 3 and k["persistent_workers"]
    assert dev.map_location(None) == "cpu" and dev.map_location("meta") == "meta"
    # the CPU prefetcher yields the same batches in the same order as a plain loop
    got = list(dev.Prefetcher(lambda i: {"x": torch.full((2,), float(i))}, range(3, 7), cpu))
    assert [float(b["x"][0]) for b in got] == [3.0, 4.0, 5.0, 6.0]


def test_retrain_with_cuda_but_no_gpu_is_a_clear_message_before_any_work(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    r = subprocess.run([PY, "-m", "likeness.cli", "retrain", "--pack", "default", "--config", "tiny",
                        "--work", str(tmp_path / "w"), "--device", "cuda"],
                       capture_output=True, text=True, timeout=120, env=env)
    if torch.cuda.is_available() and torch.cuda.device_count() and r.returncode == 0:
        pytest.skip("a CUDA device is visible despite CUDA_VISIBLE_DEVICES")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "--device cuda: no CUDA device is available" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "w" / "render").exists()                   # nothing ran


# ---- the one checkpoint format, across devices --------------------------------------------------

def _tiny(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    return net, torch.optim.Adam(net.parameters(), lr=1e-2)


def _step_fn(net, opt, state):
    def step(t):
        g = torch.Generator().manual_seed(1000 + state["global_step"])     # the batch depends on the step only
        x = torch.randn(16, 4, generator=g).to(t.device)
        loss = (net(x).squeeze(1) - x.sum(1)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.detach()}
    return step


def test_a_cpu_checkpoint_loads_onto_another_device(tmp_path):
    net, opt = _tiny()
    state = {"global_step": 0}
    Trainer("tiny", tmp_path / "ck", state, modules={"model": net}, optimizers={"opt": opt}, total=3,
            progress=False, log=lambda s: None).run(_step_fn(net, opt, state))
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["model.safetensors", "optim.pt", "state.json"]
    # onto "meta" (the map_location path a GPU takes, checkable without one): every tensor moves
    with torch.device("meta"):
        meta_net, _ = _tiny()
    meta_opt = torch.optim.Adam(meta_net.parameters())
    st, _ = C.load(tmp_path / "ck", {"model": meta_net}, {"opt": meta_opt}, device="meta")
    assert st["global_step"] == 3
    assert all(p.device.type == "meta" for p in meta_net.parameters())
    assert all(v.device.type == "meta" for s in meta_opt.state_dict()["state"].values() for v in s.values()
               if isinstance(v, torch.Tensor) and v.dim())
    # and back onto the CPU: the same numbers
    cpu_net, cpu_opt = _tiny(seed=5)
    C.load(tmp_path / "ck", {"model": cpu_net}, {"opt": cpu_opt}, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), cpu_net.state_dict().values()))
    assert torch.equal(cpu_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_a_gan_checkpoint_resumes_onto_another_device(tmp_path):
    """A G_real run's checkpoint (weights, both optimisers, path-length mean, RNG) loads into a trainer
    built on another device with map_location; here "meta", as a CUDA trainer would on a GPU."""
    from likeness.training.generators import train_gan as T
    ds = _fake_real_dataset(8)
    T.train("real", "tiny", work_dir=tmp_path / "g", steps=2, dataset=ds, log=lambda s: None, device="cpu")
    folder = T.find_checkpoint(tmp_path / "g")
    assert {"G.safetensors", "G_ema.safetensors", "D.safetensors", "optim_g.pt", "optim_d.pt", "tensors.pt",
            "rng_rank0.pt", "state.json", "meta.json"} <= {p.name for p in folder.iterdir()}
    cfg = T.get_config("tiny").replace(steps=2)
    on_meta = T.GANTrainer(cfg, ds, "real", device="meta")
    T.load_checkpoint(folder, on_meta, cfg, "real")
    assert on_meta.step == 2 and on_meta.pl_mean.device.type == "meta"
    assert all(p.device.type == "meta" for m in on_meta.modules().values() for p in m.parameters())
    exp = on_meta.opt_g.state_dict()["state"]
    assert exp and all(s["exp_avg"].device.type == "meta" for s in exp.values())


# ---- the shared loop --------------------------------------------------------------------------

def test_sigterm_checkpoints_and_the_resumed_run_matches_the_uninterrupted_one(tmp_path):
    net, opt = _tiny()
    state = {"global_step": 0}
    Trainer("tiny", tmp_path / "full", state, modules={"model": net}, optimizers={"opt": opt}, total=8,
            progress=False, log=lambda s: None).run(_step_fn(net, opt, state))

    net2, opt2 = _tiny()
    state2 = {"global_step": 0}
    inner = _step_fn(net2, opt2, state2)

    def step_then_sigterm(t):
        out = inner(t)
        if state2["global_step"] == 2:                 # a farm's preemption during step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    logs = []
    t = Trainer("tiny", tmp_path / "split", state2, modules={"model": net2}, optimizers={"opt": opt2}, total=8,
                progress=False, log=logs.append)
    assert t.run(step_then_sigterm) == "stopped"
    assert json.loads((tmp_path / "split" / "state.json").read_text())["global_step"] == 3
    assert any("stopped at step 3" in line for line in logs)
    with pytest.raises(KeyboardInterrupt):            # what a pipeline stage sees: not done
        net3, opt3 = _tiny()
        s3 = {"global_step": 0}
        inner3 = _step_fn(net3, opt3, s3)

        def kill(t):
            out = inner3(t)
            os.kill(os.getpid(), signal.SIGINT)
            return out
        Trainer("tiny", tmp_path / "int", s3, modules={"model": net3}, optimizers={"opt": opt3}, total=8,
                progress=False, log=lambda s: None).run(kill, raise_on_stop=True)
    assert (tmp_path / "int" / "state.json").is_file()

    net4, opt4 = _tiny(seed=9)                         # other initial weights: the checkpoint's must win
    state4 = {"global_step": 0}
    t4 = Trainer("tiny", tmp_path / "split", state4, modules={"model": net4}, optimizers={"opt": opt4}, total=8,
                 progress=False, log=lambda s: None)
    assert t4.resume() is not None and state4["global_step"] == 3
    assert t4.run(_step_fn(net4, opt4, state4)) == "done"
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net4.state_dict().values()))


def test_epochs_max_steps_and_divergence(tmp_path):
    net, opt = _tiny()
    state = {"global_step": 0}
    seen = []
    t = Trainer("tiny", tmp_path / "e", state, modules={"model": net}, optimizers={"opt": opt}, total=6,
                progress=False, log=lambda s: None)
    r = t.run(_step_fn(net, opt, state), steps_per_epoch=3, epoch_start=lambda e: seen.append(("start", e)),
              epoch_end=lambda e: seen.append(("end", e)), max_steps=4)
    assert r == "max_steps" and state["epoch"] == 1 and state["step_in_epoch"] == 1
    assert seen == [("start", 0), ("end", 0), ("start", 1)]
    assert json.loads((tmp_path / "e" / "state.json").read_text())["global_step"] == 4

    bad = {"global_step": 0}
    with pytest.raises(UserError, match=r"diverged at step 0: loss=nan.*last good checkpoint is none"):
        Trainer("tiny", tmp_path / "nan", bad, total=3, progress=False, log=lambda s: None).run(
            lambda t: {"loss": float("nan")})
    assert not (tmp_path / "nan" / "state.json").exists()


# ---- two processes, gloo, on the CPU ---------------------------------------------------------

def _fake_real_dataset(n: int, res: int = 32, seed: int = 0):
    """Faces stand-in: a face ellipse, hair cap, eyes and mouth on a background, in CelebAMask-HQ ids."""
    from likeness.backend.schema import CLASS_IDS
    from likeness.training.common.data import SegDataset
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:res, 0:res] / res
    imgs = np.zeros((n, res, res, 3), np.uint8)
    labs = np.zeros((n, res, res), np.uint8)
    for i in range(n):
        cx, cy = 0.5 + rng.uniform(-0.05, 0.05), 0.45 + rng.uniform(-0.05, 0.05)
        face = ((xx - cx) / 0.25) ** 2 + ((yy - cy) / 0.32) ** 2 < 1
        labs[i][face] = CLASS_IDS["skin"]
        labs[i][face & (yy < cy - 0.15)] = CLASS_IDS["hair"]
        labs[i][face & (abs(yy - cy) < 0.03) & (abs(abs(xx - cx) - 0.1) < 0.04)] = CLASS_IDS["l_eye"]
        labs[i][face & (abs(yy - cy - 0.18) < 0.03) & (abs(xx - cx) < 0.08)] = CLASS_IDS["u_lip"]
        imgs[i] = rng.integers(0, 255, 3)[None, None]
        imgs[i][face] = rng.integers(120, 255, 3)
    return SegDataset(imgs, labs, [f"{i:05d}" for i in range(n)], "synthetic faces")


DDP_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from test_training_device import _fake_real_dataset
    from likeness.training.generators import train_gan as T
    torch.set_num_threads(1)
    out = T.train("real", "tiny", work_dir={work!r}, steps=3, dataset=_fake_real_dataset(8),
                  log=lambda s: None, device="cpu")
    if dist.get_rank() == 0:
        print(json.dumps({{"backend": dist.get_backend(), "world": dist.get_world_size(), "step": out["step"],
                           "checksum": float(sum(p.double().sum() for p in out["trainer"].G.parameters()))}}))
    dist.barrier()
    dist.destroy_process_group()
""")


def test_ddp_two_processes_with_gloo_on_the_cpu(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), work=str(tmp_path / "ddp")))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT.parent))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    r = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
                       capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads([l for l in r.stdout.splitlines() if l.startswith("{")][-1])
    assert res["backend"] == "gloo" and res["world"] == 2 and res["step"] == 3
    from likeness.training.generators import train_gan as T
    ck = T.find_checkpoint(tmp_path / "ddp")
    assert (ck / "rng_rank0.pt").is_file() and (ck / "rng_rank1.pt").is_file()
    assert T.read_state(ck)["world"] == 2
    # the replicas agreed (train checks it) and rank 0 saved what it trained
    G = T.load_generator(tmp_path / "ddp", which="G")[0]
    assert float(sum(p.detach().double().sum() for p in G.parameters())) == pytest.approx(res["checksum"], rel=1e-12)
    with pytest.raises(UserError, match="written by 2 process"):          # a resume needs the same world
        T.train("real", "tiny", work_dir=tmp_path / "ddp", steps=4, dataset=_fake_real_dataset(8), resume=True,
                log=lambda s: None, device="cpu")


def test_the_gpu_smoke_benchmark_runs_every_learning_stage(tmp_path):
    """scripts/bench_training.py (the README's GPU smoke run) on the CPU with the tiny config."""
    out = tmp_path / "bench.jsonl"
    r = subprocess.run([PY, str(ROOT / "scripts" / "bench_training.py"), "--config", "tiny", "--device", "cpu",
                        "--steps", "2", "--warmup", "1", "--threads", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["stage"].split()[0] for row in rows] == ["real", "parser", "avatar", "encoder", "invert", "pairs",
                                                         "estimator"]
    assert all(row.get("images_per_s", row.get("latents_per_s", 0)) > 0 for row in rows)
    assert all(row["device"].startswith("cpu") for row in rows)
