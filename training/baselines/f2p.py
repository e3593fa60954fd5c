"""F2P and F2P v2: photo -> avatar vector through the frozen imitator (training/baselines/imitator.py).

Both compare the imitator's drawing of a vector with the aligned photo y (the CelebA-HQ frame that renders
share), at the imitator's resolution, with the same image-level objective (per photo):

    L(x) = λpix·|G(x) − y|₁ + λp·P(G(x), y) + λparse·KL(parser(y) ‖ seg(G(x)))

    P       LPIPS when its backbone weights are on disk, else the parser-feature distance (the imitator's
            choice is re-resolved here; the method reports which)
    parse   per pixel, the KL divergence from our face parser's part probabilities of the photo to the
            imitator's segmentation (averaged over pixels): the face-parsing loss of F2P
    x       a relaxed vector: continuous = sigmoid(u) (always inside the schema's [0, 1]), and per slot
            softmax(logits / τ) (training/baselines/imitator.VectorLayout)

F2P (Shi et al., ICCV 2019): per photo, Adam on (u, logits) for ``steps`` steps from the pack's default
    sliders and uniform slot probabilities, τ annealed from ``tau_start`` to ``tau_end``; then discretised
    (argmax per slot; sliders already in range). Photos in a batch are independent problems (the batch loss is
    their sum and Adam is element-wise).
F2P v2 (Shi et al., 2020): a feed-forward predictor (the project's ResNet-18, or a small CNN for tests)
    photo -> (sliders, slot logits), trained through the frozen imitator with the same objective on the real
    TRAIN photos (backend.realfaces enforces the split; the c-f validation faces are never read) and, with
    ``greal_fraction`` > 0, G_real samples. A share of the training photos (``held_out``) is kept aside to
    monitor the objective. Batches depend only on (seed, step): a resumed run reproduces the uninterrupted one.

F2P v2 folder: f2pv2.json (pack, schema, configs, imitator), checkpoint/{predictor.safetensors, optim.pt,
state.json}, summary.json.

Methods for evaluation/methods.py (``.name``, ``.predict(aligned uint8 [S, S, 3]) -> AvatarVector``):
    load_f2p_method(imitator_dir, pack, name)      optional imitator_dir/f2p.json overrides F2PConfig fields
    load_f2p_v2_method(f2pv2_dir, pack, name)
CLI: cli_train_f2p_v2(args), `likeness train f2p-v2` (options in cli.py).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...backend.errors import UserError
from ..common.presets import from_args, pick
from ...backend.schema import AvatarVector, Pack
from .imitator import (VectorLayout, config_key, fingerprint, freeze, load_folder, load_folder_parser,
                       load_imitator, parse_probs)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ============================================================================================
# The shared objective
# ============================================================================================

@dataclass(frozen=True)
class Objective:
    lambda_pixel: float = 1.0
    lambda_perceptual: float = 0.8
    lambda_parse: float = 1.0


def objective(imitator, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor, perceptual, w: Objective
              ) -> tuple[torch.Tensor, dict]:
    """Per-photo loss [B] of relaxed vectors x [B, D] vs photos y [B, 3, H, W] in [-1, 1] and target part
    probabilities [B, K, H, W]; terms {name: [B]}."""
    out = imitator(x)
    img = out["image"]
    terms = {"pixel": (img - y).abs().mean(dim=(1, 2, 3))}
    total = w.lambda_pixel * terms["pixel"]
    if perceptual is not None and w.lambda_perceptual:
        terms["perceptual"] = perceptual(img, y)
        total = total + w.lambda_perceptual * terms["perceptual"]
    if w.lambda_parse:
        logq = F.log_softmax(out["seg"], dim=1)
        kl = (target * (torch.log(target.clamp_min(1e-8)) - logq)).sum(dim=1)            # [B, H, W]
        terms["parse"] = kl.mean(dim=(1, 2))
        total = total + w.lambda_parse * terms["parse"]
    return total, terms


def photos_to_tensor(photos, res: int) -> torch.Tensor:
    """uint8 [S, S, 3] or [B, S, S, 3] (array or list of arrays) -> [B, 3, res, res] in [-1, 1]."""
    if isinstance(photos, (list, tuple)):
        photos = np.stack([_check_photo(p) for p in photos])
    else:
        photos = np.asarray(photos)
        photos = _check_photo(photos)[None] if photos.ndim == 3 else photos
    x = torch.from_numpy(np.ascontiguousarray(photos)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[-1] != res or x.shape[-2] != res:
        x = F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False, antialias=x.shape[-1] > res)
    return x


def _check_photo(p) -> np.ndarray:
    p = np.asarray(p)
    if p.ndim != 3 or p.shape[2] != 3 or p.shape[0] != p.shape[1]:
        raise UserError(f"an aligned face must be a square RGB array [S, S, 3], got shape {p.shape}")
    if p.dtype != np.uint8:
        raise UserError(f"an aligned face must be uint8, got {p.dtype}")
    return p


def resolve_imitator_perceptual(info: dict, parser):
    """The perceptual distance the imitator was configured with, as it can run here: (fn, description)."""
    from ..common.perceptual import resolve_perceptual
    c = info["config"]
    fn, desc, _ = resolve_perceptual(c["perceptual"], c["perceptual_fallback"], parser, c["lpips_net"])
    return fn, desc


# ============================================================================================
# F2P: per-photo optimisation
# ============================================================================================

@dataclass(frozen=True)
class F2PConfig(Objective):
    name: str = "cpu"
    steps: int = 300
    lr: float = 0.05
    tau_start: float = 1.0
    tau_end: float = 0.3
    batch: int = 8                    # photos optimised at once


F2P_CONFIGS = {
    "tiny": F2PConfig(name="tiny", steps=40, lr=0.1),
    "cpu": F2PConfig(name="cpu", steps=300),
    "paper": F2PConfig(name="paper", steps=500),
}


def get_f2p_config(name, **overrides) -> F2PConfig:
    return pick(F2P_CONFIGS, name, overrides, "F2P")


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(0.02, 0.98)
    return torch.log(p) - torch.log1p(-p)


def f2p_optimise(imitator, y: torch.Tensor, target: torch.Tensor, perceptual, cfg: F2PConfig,
                 init_cont: torch.Tensor, steps: int | None = None) -> dict:
    """Optimise relaxed vectors for photos y [B, 3, H, W] with parser targets [B, K, H, W].

    init_cont [C] or [B, C]: starting sliders in [0, 1]; slot logits start at zero (uniform).
    Returns {"continuous" [B, C] float64 in [0, 1], "discrete" [B, K] int64, "history" [steps + 1, B] (the
    objective before each step, then after the last), "loss" [B] (final, relaxed), "loss_discrete" [B]
    (the discretised vector's objective), "logits" [B, n_options]}.
    """
    layout: VectorLayout = imitator.layout
    steps = cfg.steps if steps is None else steps
    b = y.shape[0]
    u = _logit(init_cont.expand(b, -1).detach().clone()).requires_grad_(True)
    logits = torch.zeros(b, layout.n_options, requires_grad=True)
    opt = torch.optim.Adam([u, logits], lr=cfg.lr)
    history = []

    def tau_at(t):
        return cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** (t / max(1, steps - 1))

    freeze(imitator)
    for t in range(steps):
        total, _ = objective(imitator, layout.relaxed(torch.sigmoid(u), logits, tau_at(t)), y, target,
                             perceptual, cfg)
        history.append(total.detach())
        opt.zero_grad(set_to_none=True)
        total.sum().backward()
        opt.step()
    with torch.no_grad():
        total, _ = objective(imitator, layout.relaxed(torch.sigmoid(u), logits, tau_at(max(0, steps - 1))), y,
                             target, perceptual, cfg)
        history.append(total)
        cont, disc = layout.discretise(torch.sigmoid(u), logits)
        hard, _ = objective(imitator, layout.one_hot(torch.from_numpy(cont).float(), torch.from_numpy(disc)),
                            y, target, perceptual, cfg)
    if not torch.isfinite(total).all():
        raise UserError("F2P objective became non-finite; lower its learning rate (f2p.json: lr)")
    return {"continuous": cont, "discrete": disc, "history": torch.stack(history), "loss": total,
            "loss_discrete": hard, "logits": logits.detach()}


class F2PMethod:
    """F2P behind the evaluation interface: ``predict(aligned uint8 [S, S, 3]) -> AvatarVector``."""

    def __init__(self, folder, pack: Pack, name: str | None = None, cfg: F2PConfig | None = None):
        folder = Path(folder).expanduser()
        self.pack, self.folder = pack, folder
        self.name = name or "f2p"
        self.imitator, self.info = load_imitator(folder, pack)
        self.parser, self.parser_res = load_folder_parser(folder)
        freeze(self.parser)
        self.perceptual, self.perceptual_desc = resolve_imitator_perceptual(self.info, self.parser)
        if cfg is None:
            base = self.info["config"]["name"] if self.info["config"]["name"] in F2P_CONFIGS else "cpu"
            extra = {}
            if (folder / "f2p.json").is_file():
                try:
                    extra = json.loads((folder / "f2p.json").read_text())
                except json.JSONDecodeError as e:
                    raise UserError(f"{folder / 'f2p.json'}: not JSON ({e})") from None
            cfg = get_f2p_config(base, **extra)
        self.cfg = cfg
        default = pack.default_vector().to_arrays()[0]
        self.init_cont = torch.tensor(default, dtype=torch.float32)
        self.last: dict | None = None                  # the last run's result (history, losses, seconds)

    @property
    def resolution(self) -> int:
        return self.imitator.resolution

    @torch.no_grad()
    def targets(self, y: torch.Tensor) -> torch.Tensor:
        return parse_probs(self.parser, y, self.parser_res)

    def optimise(self, photos, steps: int | None = None) -> dict:
        """Aligned photos -> the optimisation result (f2p_optimise) of all of them, in batches."""
        y_all = photos_to_tensor(photos, self.resolution)
        t0 = time.monotonic()
        parts = []
        for i in range(0, len(y_all), self.cfg.batch):
            y = y_all[i:i + self.cfg.batch]
            parts.append(f2p_optimise(self.imitator, y, self.targets(y), self.perceptual, self.cfg,
                                      self.init_cont, steps))
        res = {"continuous": np.concatenate([p["continuous"] for p in parts]),
               "discrete": np.concatenate([p["discrete"] for p in parts]),
               "history": torch.cat([p["history"] for p in parts], dim=1),
               "loss": torch.cat([p["loss"] for p in parts]),
               "loss_discrete": torch.cat([p["loss_discrete"] for p in parts]),
               "seconds": time.monotonic() - t0}
        self.last = res
        return res

    def predict_batch(self, photos) -> list[AvatarVector]:
        r = self.optimise(photos)
        return [self.pack.vector_from_arrays(c.tolist(), d.tolist())
                for c, d in zip(r["continuous"], r["discrete"])]

    def predict(self, aligned: np.ndarray) -> AvatarVector:
        return self.predict_batch([aligned])[0]


def load_f2p_method(path, pack: Pack, name: str | None = None) -> F2PMethod:
    """``f2p:DIR`` of evaluation/methods.py: DIR is an imitator folder (it keeps the face parser F2P needs)."""
    return F2PMethod(path, pack, name)


# ============================================================================================
# F2P v2: a feed-forward predictor trained through the imitator
# ============================================================================================

@dataclass(frozen=True)
class F2PV2Config(Objective):
    name: str = "cpu"
    backbone: str = "resnet18"        # resnet18 (training/common/resnet.py) | cnn (small, for tests)
    input_size: int = 64
    cnn_channels: tuple = (32, 64, 128, 256)
    batch: int = 16
    steps: int = 10000
    lr: float = 1e-3
    tau: float = 1.0                  # softmax temperature of the predicted slot logits
    parse_target: str = "parser"      # parser: our face parser's probabilities (as F2P) | mask: the photo's mask
    greal_fraction: float = 0.0       # share of every batch drawn from G_real (needs --greal)
    flip: bool = True
    held_out: float = 0.1             # TRAIN photos kept aside to monitor the objective
    ckpt_every: int = 500
    log_every: int = 50
    seed: int = 0


V2_CONFIGS = {
    "tiny": F2PV2Config(name="tiny", backbone="cnn", input_size=32, cnn_channels=(8, 16, 32), batch=8,
                        steps=30, ckpt_every=10, log_every=5),
    "cpu": F2PV2Config(name="cpu"),
    "paper": F2PV2Config(name="paper", input_size=224, batch=32, steps=100000, ckpt_every=2000, log_every=100),
}
V2_RUN_FIELDS = frozenset({"steps", "ckpt_every", "log_every"})


def get_v2_config(name, **overrides) -> F2PV2Config:
    return pick(V2_CONFIGS, name, overrides, "F2P v2")


class SmallCNN(nn.Module):
    """[B, 3, S, S] -> [B, channels[-1]]: stride-2 conv blocks, GroupNorm, global average pool."""

    def __init__(self, channels=(32, 64, 128, 256)):
        super().__init__()
        layers, prev = [], 3
        for c in channels:
            layers += [nn.Conv2d(prev, c, 3, stride=2, padding=1), nn.GroupNorm(min(8, c), c), nn.LeakyReLU(0.2),
                       nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(min(8, c), c), nn.LeakyReLU(0.2)]
            prev = c
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = prev

    def forward(self, x):
        return self.net(x)


class Predictor(nn.Module):
    """ImageNet-normalised face [B, 3, S, S] -> (sliders [B, C] in (0, 1), flat slot logits [B, n_options])."""

    def __init__(self, layout: VectorLayout, backbone: str = "resnet18", cnn_channels=(32, 64, 128, 256)):
        super().__init__()
        if backbone == "resnet18":
            from ..common.resnet import resnet18
            self.trunk = resnet18()
            self.trunk.fc = nn.Identity()
            dim = 512
        elif backbone == "cnn":
            self.trunk = SmallCNN(cnn_channels)
            dim = self.trunk.out_dim
        else:
            raise UserError(f"unknown F2P v2 backbone '{backbone}' (resnet18, cnn)")
        self.cont_head = nn.Linear(dim, layout.n_continuous)
        self.slot_head = nn.Linear(dim, layout.n_options)

    def forward(self, x):
        f = self.trunk(x)
        return torch.sigmoid(self.cont_head(f)), self.slot_head(f)


def normalise(img: torch.Tensor, size: int) -> torch.Tensor:
    """[-1, 1] images [B, 3, S, S] -> the predictor's input: ImageNet-normalised, size x size."""
    x = (img + 1) / 2
    if x.shape[-1] != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _resize(img: torch.Tensor, res: int) -> torch.Tensor:
    if img.shape[-1] == res:
        return img
    return F.interpolate(img, size=res, mode="bilinear", align_corners=False, antialias=img.shape[-1] > res)


class V2Data:
    """Training photos for F2P v2: the real TRAIN faces (with their masks), optionally G_real samples.

    ``batch(step)`` -> photos [B, 3, r, r] in [-1, 1] (r = max(imitator, input) resolution), part ids at the
    imitator's resolution [B, H, W] (the real masks, or G_real's own segmentation), deterministic in step.
    """

    def __init__(self, cfg: F2PV2Config, res: int, photos_root=None, greal=None):
        from ...backend import realfaces
        from ..common.data import real_faces
        self.cfg, self.res = cfg, res
        self.r = max(res, cfg.input_size)
        self.ds = real_faces(photos_root, "train", self.r)
        bad = [n for n in self.ds.names if realfaces.is_validation(n)]
        if bad:                                           # cannot happen: real_faces(split="train") filters
            raise UserError(f"validation faces in the training photos: {bad[:3]}")
        n = len(self.ds)
        n_val = min(max(1, int(round(n * cfg.held_out))), n - 1) if cfg.held_out > 0 and n > 1 else 0
        perm = np.random.default_rng(cfg.seed + 99).permutation(n)
        self.train_idx, self.val_idx = np.sort(perm[n_val:]), np.sort(perm[:n_val])
        self.G_real = None
        if cfg.greal_fraction > 0:
            if greal is None:
                raise UserError(f"greal_fraction {cfg.greal_fraction} needs --greal (G_real's work dir)")
            from ..generators.train_gan import find_checkpoint, load_generator, read_state
            folder = find_checkpoint(greal)
            if read_state(folder).get("stage") != "real":
                raise UserError(f"{folder}: --greal must be a checkpoint of the real stage")
            self.G_real, _ = load_generator(folder)
            freeze(self.G_real)
            self.greal_path = str(folder)
        self.n_greal = int(round(cfg.batch * cfg.greal_fraction)) if self.G_real is not None else 0

    def _parts(self, parts: torch.Tensor) -> torch.Tensor:
        if parts.shape[-1] == self.res:
            return parts
        return F.interpolate(parts[:, None].float(), size=self.res, mode="nearest")[:, 0].long()

    def real(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        img, parts = self.ds.batch(torch.as_tensor(idx))
        return img, self._parts(parts)

    def batch(self, step: int):
        cfg = self.cfg
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        n_real = cfg.batch - self.n_greal
        idx = torch.from_numpy(self.train_idx)[torch.randint(len(self.train_idx), (n_real,), generator=g)]
        img, parts = self.real(idx)
        if self.n_greal:
            from ..pairs.invert import random_noise
            Gr = self.G_real
            dev = next(Gr.parameters()).device           # CPU draws; the faces come back to the CPU
            z = torch.randn(self.n_greal, Gr.cfg.z_dim, generator=g).to(dev)
            with torch.no_grad():
                out = Gr(Gr.broadcast(Gr.map(z)), random_noise(Gr, self.n_greal, g, dev))
            gimg = _resize(out["image"].clamp(-1, 1), self.r).cpu()
            gparts = F.interpolate(out["seg"], size=self.res, mode="bilinear", align_corners=False).argmax(1).cpu()
            img, parts = torch.cat([img, gimg]), torch.cat([parts, gparts])
        if cfg.flip:
            flip = torch.rand(len(img), generator=g) < 0.5
            img = torch.where(flip[:, None, None, None], img.flip(3), img)
            parts = torch.where(flip[:, None, None], parts.flip(2), parts)
        return img, parts


class V2Trainer:
    """The predictor, its optimiser and one step through the frozen imitator."""

    def __init__(self, cfg: F2PV2Config, imitator, parser, parser_res: int, perceptual, device=None):
        self.device = torch.device(device or "cpu")
        self.cfg, self.imitator, self.parser, self.parser_res = cfg, imitator.to(self.device), parser, parser_res
        if parser is not None:
            parser.to(self.device)
        self.perceptual = perceptual
        self.layout: VectorLayout = imitator.layout
        torch.manual_seed(cfg.seed)
        self.net = Predictor(self.layout, cfg.backbone, cfg.cnn_channels).to(self.device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
        freeze(imitator)
        if parser is not None:
            freeze(parser)

    def targets(self, y: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
        """Part probabilities the imitator's segmentation should match: the parser's, or the masks'."""
        if self.cfg.parse_target == "mask":
            from ..common.parts import INVALID, NUM_PARTS
            valid = (parts != INVALID)
            hot = F.one_hot(torch.where(valid, parts, 0), NUM_PARTS).permute(0, 3, 1, 2).float()
            return hot * valid[:, None]
        if self.cfg.parse_target != "parser":
            raise UserError(f"unknown parse_target '{self.cfg.parse_target}' (parser, mask)")
        with torch.no_grad():
            return parse_probs(self.parser, y, self.parser_res)

    def loss(self, img: torch.Tensor, parts: torch.Tensor, hard: bool = False):
        """Per-photo objective [B] of the predictor's vectors for photos img [B, 3, r, r] in [-1, 1]."""
        img, parts = img.to(self.device), parts.to(self.device)
        y = _resize(img, self.imitator.resolution)
        cont, logits = self.net(normalise(img, self.cfg.input_size))
        if hard:
            c, d = self.layout.discretise(cont, logits)
            x = self.layout.one_hot(torch.from_numpy(c).float(), torch.from_numpy(d)).to(self.device)
        else:
            x = self.layout.relaxed(cont, logits, self.cfg.tau)
        return objective(self.imitator, x, y, self.targets(y, parts), self.perceptual, self.cfg)

    def step(self, img, parts) -> dict:
        self.net.train()
        total, terms = self.loss(img, parts)
        loss = total.mean()
        if not torch.isfinite(loss):
            raise UserError(f"F2P v2 loss became {float(loss)}; lower lr (--set lr=...) and resume")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"total": float(loss.detach()), **{k: float(v.detach().mean()) for k, v in terms.items()}}

    @torch.no_grad()
    def evaluate(self, data: V2Data, idx: np.ndarray, batch: int = 32) -> dict:
        """Mean objective on photos idx (relaxed and discretised vectors)."""
        self.net.eval()
        soft, hard = [], []
        for i in range(0, len(idx), batch):
            img, parts = data.real(idx[i:i + batch])
            soft.append(self.loss(img, parts)[0])
            hard.append(self.loss(img, parts, hard=True)[0])
        self.net.train()
        if not soft:
            return {}
        return {"n": int(len(idx)), "objective": float(torch.cat(soft).mean()),
                "objective_discrete": float(torch.cat(hard).mean())}


def train_f2p_v2(pack: Pack, imitator_dir, work, cfg="tiny", photos=None, greal=None, resume: bool = False,
                 max_steps: int | None = None, progress: bool = True, log=print, device="cpu") -> dict:
    """Train (or resume) F2P v2 in ``work`` through the frozen imitator of ``imitator_dir``; returns the
    summary (also work/summary.json when the run reaches cfg.steps). photos: the real faces root (default
    the shared faces; TRAIN split only); greal: G_real's work dir (with cfg.greal_fraction > 0). ``device``:
    auto | cpu | cuda (float32: the loss runs through the frozen imitator)."""
    from ..common.device import resolve
    device = resolve(device)
    cfg = get_v2_config(cfg)
    if work is None:
        raise UserError("F2P v2 needs --work (its folder)")
    work = Path(work).expanduser()
    torch.set_flush_denormal(True)
    run_path, ckpt = work / "f2pv2.json", work / "checkpoint"
    have = json.loads(run_path.read_text()) if run_path.is_file() else None
    if have is not None and (ckpt / "state.json").is_file() and not resume:
        raise UserError(f"{work} already holds an F2P v2 run; pass --resume to continue it or choose "
                        "another --work")
    if imitator_dir is None:
        if have is None:
            raise UserError("F2P v2 needs --imitator (a trained imitator folder)")
        imitator_dir = have["imitator"]["path"]
    if have is not None and greal is None:
        greal = have.get("greal")
    imitator, info = load_imitator(imitator_dir, pack)
    if not (Path(imitator_dir).expanduser() / "summary.json").is_file():
        # the run records the imitator's step and fingerprint: a later resume with the finished
        # imitator is refused rather than mixed
        log(f"warning: the imitator in {imitator_dir} has not finished its run (step {info['step']}); "
            "F2P v2 learns through it as it is now")
    parser, parser_res = load_folder_parser(imitator_dir)
    perceptual, perc_desc = resolve_imitator_perceptual(info, parser)
    data = V2Data(cfg, imitator.resolution, photos, greal)
    if data.G_real is not None:
        data.G_real.to(device)
    trainer = V2Trainer(cfg, imitator, parser, parser_res, perceptual, device)
    run = {"pack": pack.id, "schema": pack.schema_hash, "config": config_key(cfg, V2_RUN_FIELDS),
           "layout": imitator.layout.to_dict(),
           "imitator": {"path": str(Path(imitator_dir).expanduser().resolve()),
                        "fingerprint": fingerprint(imitator), "step": info["step"]},
           "photos": data.ds.source, "greal": getattr(data, "greal_path", None)}
    if have is not None:
        diff = [k for k in run if have.get(k) != run[k]]
        if diff:
            raise UserError(f"{work} holds an F2P v2 run with another {', '.join(diff)}; use another --work")
    work.mkdir(parents=True, exist_ok=True)
    run_path.write_text(json.dumps({**run, "perceptual": perc_desc}, indent=1))
    from ..common import checkpoint
    from ..common.trainer import Trainer
    total = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
    clock = {"t0": time.monotonic()}

    def save(t: Trainer) -> Path:
        state["seconds"] += time.monotonic() - clock["t0"]
        clock["t0"] = time.monotonic()
        return checkpoint.save(ckpt, state, {"predictor": trainer.net}, {"opt": trainer.opt})

    state: dict = {"step": 0}
    loop = Trainer("F2P v2", ckpt, state, modules={"predictor": trainer.net}, optimizers={"opt": trainer.opt},
                   total=total, device=device, checkpoint_every=cfg.ckpt_every, log=log, progress=progress, step_key="step",
                   save=save)
    if loop.resume() is not None:
        log(f"resuming F2P v2 at step {state['step']}")
    else:
        state.update({"step": 0, "history": [], "seconds": 0.0, "initial": trainer.evaluate(data, data.val_idx)})
    log(f"F2P v2 config {cfg.name}: {cfg.backbone} at {cfg.input_size} px through the imitator "
        f"({imitator.resolution} px); {len(data.train_idx)} training photos, {len(data.val_idx)} held out"
        + (f", {data.n_greal} G_real samples a batch" if data.n_greal else "") + f"; perceptual: {perc_desc}")
    win = {"t": time.monotonic(), "n": 0, "sums": {}}

    def step(t: Trainer) -> dict:
        img, parts = data.batch(state["step"])
        terms = trainer.step(img, parts)
        win["n"] += 1
        for k, v in terms.items():
            win["sums"][k] = win["sums"].get(k, 0.0) + v
        return {}

    def after_step(s: int, stats: dict):
        if s % cfg.log_every == 0 or s == total:
            now = time.monotonic()
            avg = {k: v / win["n"] for k, v in win["sums"].items()}
            state["history"].append({"step": s, **avg,
                                     "images_per_s": win["n"] * cfg.batch / max(now - win["t"], 1e-9)})
            if not progress or s == total:
                log(f"F2P v2 step {s}/{total}  " + "  ".join(f"{k} {v:.4f}" for k, v in avg.items())
                    + f"  {state['history'][-1]['images_per_s']:.1f} img/s")
            win.update(t=now, n=0, sums={})

    clock["t0"] = time.monotonic()
    loop.run(step, after_step=after_step, raise_on_stop=True)
    rates = [h["images_per_s"] for h in state["history"]]
    summary = {"config": cfg.name, "step": state["step"], "steps": cfg.steps, "work": str(work),
               "finished": state["step"] >= cfg.steps, "backbone": cfg.backbone, "input_size": cfg.input_size,
               "imitator": run["imitator"], "perceptual": perc_desc, "parse_target": cfg.parse_target,
               "photos": {"train": int(len(data.train_idx)), "held_out": int(len(data.val_idx)),
                          "source": data.ds.source, "greal_per_batch": data.n_greal},
               "initial_held_out": state["initial"], "train_seconds": round(state["seconds"], 1),
               "images_per_s": round(float(np.median(rates)), 2) if rates else None,
               "machine": f"{os.cpu_count()}-core CPU, {torch.get_num_threads()} torch thread(s)",
               "device": str(device)}
    if state["step"] >= cfg.steps:
        summary["held_out"] = trainer.evaluate(data, data.val_idx)
        if summary["held_out"]:
            log(f"F2P v2 on held-out TRAIN photos: objective {summary['held_out']['objective']:.4f} "
                f"(discretised {summary['held_out']['objective_discrete']:.4f}; before training "
                f"{state['initial'].get('objective', float('nan')):.4f})")
        (work / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


class F2PV2Method:
    """F2P v2 behind the evaluation interface: one forward pass of the trained predictor."""

    def __init__(self, folder, pack: Pack, name: str | None = None):
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise UserError(f"{folder}: no such F2P v2 folder")
        if not (folder / "f2pv2.json").is_file() or not (folder / "checkpoint" / "state.json").is_file():
            raise UserError(f"{folder}: not a trained F2P v2 folder (f2pv2.json and checkpoint/ missing)")
        info = json.loads((folder / "f2pv2.json").read_text())
        if (info["pack"], info["schema"]) != (pack.id, pack.schema_hash):
            raise UserError(f"{folder}: F2P v2 for pack '{info['pack']}' (schema {info['schema']}), not "
                            f"'{pack.id}' ({pack.schema_hash})")
        self.layout = VectorLayout(**info["layout"])
        self.layout.check_pack(pack, str(folder))
        c = info["config"]
        self.input_size = int(c["input_size"])
        self.net = Predictor(self.layout, c["backbone"], tuple(c["cnn_channels"]))
        self.step = load_folder(folder / "checkpoint", {"predictor": self.net})["step"]
        freeze(self.net)
        self.pack, self.info, self.name = pack, info, name or "f2pv2"

    @torch.no_grad()
    def predict_batch(self, photos) -> list[AvatarVector]:
        img = photos_to_tensor(photos, self.input_size)
        cont, logits = self.net(normalise(img, self.input_size))
        c, d = self.layout.discretise(cont, logits)
        return [self.pack.vector_from_arrays(ci.tolist(), di.tolist()) for ci, di in zip(c, d)]

    def predict(self, aligned: np.ndarray) -> AvatarVector:
        return self.predict_batch([aligned])[0]


def load_f2p_v2_method(path, pack: Pack, name: str | None = None) -> F2PV2Method:
    """``f2pv2:DIR`` of evaluation/methods.py."""
    return F2PV2Method(path, pack, name)


# ============================================================================================
# CLI
# ============================================================================================

def cli_train_f2p_v2(args) -> int:
    from ...backend.schema import find_pack
    if getattr(args, "threads", None):
        torch.set_num_threads(int(args.threads))
    pack = find_pack(getattr(args, "pack", None) or "default")
    cfg = from_args(get_v2_config, args, "tiny")
    summary = train_f2p_v2(pack, getattr(args, "imitator", None), args.work, cfg,
                           photos=getattr(args, "photos", None), greal=getattr(args, "greal", None),
                           resume=bool(getattr(args, "resume", False)),
                           log=lambda s: print(s, file=sys.stderr, flush=True),
                           device=getattr(args, "device", None) or "auto")
    print(json.dumps(summary, indent=1))
    return 0
