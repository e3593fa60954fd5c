"""GAN inversion of engine renders into G_avatar's W+ space (SwiftAvatar, "Paired data generation").

Two ways to find w* with G_avatar(w*) ~ render y:

  optimisation (the paper's)
      w* = argmin_w  λp·P(y, G(w)) + λi·‖y − G(w)‖² + λl·‖w − w_init‖²  [+ λm·CE(seg_G(w), parts(y))]
      Adam (lr 0.1, cosine annealing to 0), 200 steps, from the modified mean latent (the transparent-part
      variant of ``Generator.mean_latents``). Norms are means over elements, so the weights do not depend on
      the resolution or w_dim. P is LPIPS when it can run offline, else the configured fallback
      (training/common/perceptual.py). The optional mask term uses what only the engine gives us: exact label maps,
      mapped to parts (training/common/parts.labels_to_parts), against G_avatar's segmentation logits. Batched:
      every sample has its own loss (the batch loss is their sum, and Adam is element-wise), so a batch is
      exactly many independent inversions run at once.
  encoder + short optimisation
      A small CNN trained on G_avatar's own samples, whose latents are known (z -> w, W+ with style mixing
      and per-part code replacement), regresses W+ as offsets from w_mean from the image and the one-hot part
      map (latent L2 + image reconstruction through G). Inversion = its prediction + ``short_steps`` of the
      optimisation above started (and regularised) there.

Per-conv noise maps are fixed per sample (seeded by the render index): G(w*) is a deterministic image.

API (for the pipeline)
  InvertConfig, get_config(name, **overrides)          presets tiny / cpu / paper
  invert(G, y, parts, cfg, w_init, perceptual, noise, steps=None) -> {"wp", "loss", "history", ...}
  train_encoder(g_avatar, cfg, work, means=None, max_steps=None) -> Encoder     (resumable; exact resume)
  load_encoder(work) -> Encoder
  invert_dataset(g_avatar, encoder, dataset_dir, out_dir, cfg, w_init=None, parser=None) -> latents file
      encoder None: full ``cfg.steps`` optimisation; else encoder + ``cfg.short_steps``. Writes chunks of
      ``cfg.chunk`` renders (out_dir/chunks/chunk_NNNNNN.safetensors), skips completed ones on a rerun,
      then out_dir/latents.safetensors: wp [N, n_latent, w_dim], index [N] (render indices), loss [N],
      metadata names (JSON list of the dataset's sample names).
  load_latents(path) -> {"wp", "index", "loss", "names", "meta"}
  compare_modes(G, encoder, y, parts, cfg, w_init, perceptual) -> per mode {mse, perceptual, miou, latents/s}
  load_renders(dataset_dir, names, resolution) -> (images [-1, 1] [n, 3, R, R], parts long [n, R, R])
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...backend.errors import UserError
from ..common.presets import pick
from ...backend.progress import Progress
from ...backend.schema import CLASSES
from ..common.parts import INVALID, NUM_PARTS, labels_to_parts


# ============================================================================================
# Configuration
# ============================================================================================

@dataclass(frozen=True)
class InvertConfig:
    name: str
    # --- optimisation ---------------------------------------------------------------------------
    batch: int = 16                  # renders inverted at once
    steps: int = 200                 # full optimisation
    short_steps: int = 25            # after the encoder
    lr: float = 0.1                  # Adam, cosine-annealed to 0 over the run
    lambda_p: float = 1.0            # perceptual
    lambda_i: float = 0.1            # pixel MSE
    lambda_l: float = 1.0            # ‖w − w_init‖²
    lambda_m: float = 0.0            # mask cross-entropy (engine masks); see the report for whether it helps
    perceptual: str = "lpips"        # lpips | parser | mse
    perceptual_fallback: str = "parser"
    lpips_net: str = "alex"
    init: str = "transparent"        # start: "transparent" (modified mean latent) or "mean"
    mean_samples: int = 10000        # samples for Generator.mean_latents
    noise: str = "fixed"             # per-sample seeded noise maps ("fixed") or none ("zero")
    chunk: int = 256                 # renders per resumable chunk of invert_dataset
    # --- encoder --------------------------------------------------------------------------------
    enc_channels: tuple = (32, 64, 128, 256)
    enc_head: int = 64               # channels of the 4x4 map that is flattened
    enc_hidden: int = 512
    enc_use_mask: bool = True        # input = image + one-hot part map
    enc_steps: int = 4000
    enc_batch: int = 32
    enc_lr: float = 1e-3
    enc_lambda_latent: float = 1.0
    enc_lambda_image: float = 1.0    # pixel MSE of G(prediction) vs the sample (needs a pass through G)
    enc_lambda_seg: float = 0.1      # CE of G(prediction)'s segmentation vs the sample's parts
    enc_image_every: int = 1         # the image terms on every k-th step (they cost a G forward+backward)
    enc_mixing: float = 0.5          # probability of a style-mixed W+ sample
    enc_part_noise: float = 0.5      # probability of replacing/blending random parts' codes
    enc_ckpt_every: int = 200
    enc_log_every: int = 50
    seed: int = 0


CONFIGS = {
    "tiny": InvertConfig("tiny", batch=8, steps=60, short_steps=10, mean_samples=500, chunk=8,
                         perceptual="lpips", perceptual_fallback="parser",
                         enc_channels=(16, 32, 64), enc_head=16, enc_hidden=128, enc_steps=60, enc_batch=16,
                         enc_ckpt_every=20, enc_log_every=10),
    "cpu": InvertConfig("cpu", batch=16, steps=200, short_steps=25, mean_samples=4000, chunk=256,
                        enc_channels=(32, 64, 128, 256), enc_head=64, enc_hidden=512, enc_steps=2000,
                        enc_batch=32, enc_image_every=2),
    "paper": InvertConfig("paper", batch=16, steps=200, short_steps=30, mean_samples=10000, chunk=512, lpips_net="vgg",
                          enc_channels=(32, 64, 128, 256, 512, 512, 512), enc_head=64, enc_hidden=1024,
                          enc_steps=50000, enc_batch=32, enc_ckpt_every=1000, enc_log_every=100),
}

# fields that do not change what the encoder or an inversion computes
_RUN_FIELDS = frozenset({"enc_steps", "enc_ckpt_every", "enc_log_every", "chunk", "batch"})


def get_config(name, **overrides) -> InvertConfig:
    return pick(CONFIGS, name, overrides, "inversion")


def _cfg_dict(cfg: InvertConfig, drop=()) -> dict:
    d = json.loads(json.dumps(asdict(cfg)))
    for k in drop:
        d.pop(k, None)
    return d


# ============================================================================================
# Helpers
# ============================================================================================

@contextlib.contextmanager
def frozen(module: nn.Module):
    """Parameters stop requiring gradients (and eval mode) for the block; flags restored afterwards."""
    flags = [p.requires_grad for p in module.parameters()]
    was_training = module.training
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)
        module.train(was_training)


def generator_fingerprint(G: nn.Module) -> str:
    """Hash of a generator's configuration and weights."""
    h = hashlib.sha256()
    cfg = getattr(G, "cfg", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        h.update(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    for k, v in G.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def noise_shapes(G) -> list[tuple[int, int]]:
    """(H, W) of each of the render net's per-conv noise maps."""
    return [(res, res) for res, _ in G.cfg.render_channels for _ in range(2)]


def make_noise(G, keys, seed: int = 0, mode: str = "fixed") -> list[torch.Tensor] | None:
    """Per-conv noise maps [B, 1, H, W], sample b seeded by (seed, keys[b]): the same render always gets
    the same noise, whatever batch or chunk it is in. mode "zero": all zeros."""
    keys = [int(k) for k in keys]
    shapes = noise_shapes(G)
    if mode == "zero":
        return [torch.zeros(len(keys), 1, h, w) for h, w in shapes]
    if mode != "fixed":
        raise ValueError(f"unknown noise mode '{mode}' (fixed, zero)")
    maps = [torch.empty(len(keys), 1, h, w) for h, w in shapes]
    for b, k in enumerate(keys):
        g = torch.Generator().manual_seed((seed * 1_000_003 + k) % (2**63 - 1))
        for m, (h, w) in zip(maps, shapes):
            m[b, 0] = torch.randn(h, w, generator=g)
    return maps


def random_noise(G, batch: int, generator: torch.Generator, device=None) -> list[torch.Tensor]:
    """Noise maps drawn on the CPU ``generator`` (the same on every device), then moved to ``device``."""
    maps = [torch.randn(batch, 1, h, w, generator=generator) for h, w in noise_shapes(G)]
    return maps if device is None else [m.to(device) for m in maps]


def start_latent(means: dict, cfg: InvertConfig) -> torch.Tensor:
    if cfg.init not in ("transparent", "mean"):
        raise UserError(f"inversion init must be 'transparent' or 'mean', got '{cfg.init}'")
    return means["w_mean_transparent" if cfg.init == "transparent" else "w_mean"]


def part_ce(seg_logits: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy [B] of part logits [B, K, H, W] against part ids [B, H', W'] (255 ignored),
    averaged over the valid pixels. Parts are resized (nearest) to the logits' size when they differ."""
    if parts.shape[-2:] != seg_logits.shape[-2:]:
        parts = F.interpolate(parts[:, None].float(), size=seg_logits.shape[-2:], mode="nearest")[:, 0].long()
    ce = F.cross_entropy(seg_logits, parts, ignore_index=INVALID, reduction="none")   # [B, H, W]
    valid = (parts != INVALID).float()
    return (ce * valid).sum(dim=(1, 2)) / valid.sum(dim=(1, 2)).clamp_min(1.0)


# ============================================================================================
# Optimisation-based inversion
# ============================================================================================

def inversion_losses(G, wp, w_ref, y, parts, cfg: InvertConfig, perceptual, noise, lambda_m=None):
    """Per-sample loss terms (each [B]) and the weighted total [B]."""
    lambda_m = cfg.lambda_m if lambda_m is None else lambda_m
    out = G(wp, noise)
    img = out["image"]
    terms = {"pixel": (img - y).pow(2).mean(dim=(1, 2, 3)),
             "latent": (wp - w_ref).pow(2).mean(dim=(1, 2))}
    total = cfg.lambda_i * terms["pixel"] + cfg.lambda_l * terms["latent"]
    if perceptual is not None and cfg.lambda_p:
        terms["perceptual"] = perceptual(img, y)
        total = total + cfg.lambda_p * terms["perceptual"]
    if lambda_m and parts is not None:
        terms["mask"] = part_ce(out["seg"], parts)
        total = total + lambda_m * terms["mask"]
    return total, terms, out


def invert(G, y: torch.Tensor, parts: torch.Tensor | None, cfg: InvertConfig, w_init: torch.Tensor,
           perceptual=None, noise=None, steps: int | None = None, lambda_m: float | None = None) -> dict:
    """Optimise W+ for a batch of targets.

    y [B, 3, R, R] in [-1, 1] at G's resolution; parts [B, R', R'] part ids (or None); w_init [n_latent,
    w_dim] or [B, n_latent, w_dim] (also the latent regulariser's anchor); noise from ``make_noise``.
    Returns {"wp" [B, L, D] (detached), "loss" [B] final per-sample total, "initial_loss" [B],
             "history" [steps + 1, B] per-sample totals (before each step, then after the last),
             "terms" {name: [B]} final terms}.
    """
    steps = cfg.steps if steps is None else steps
    b = y.shape[0]
    w0 = (w_init if w_init.dim() == 3 else w_init.expand(b, -1, -1)).detach().clone()
    wp = w0.clone().requires_grad_(True)
    history = []
    with frozen(G):
        if steps > 0:
            opt = torch.optim.Adam([wp], lr=cfg.lr, betas=(0.9, 0.999))
            for t in range(steps):
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * t / steps))
                total, _, _ = inversion_losses(G, wp, w0, y, parts, cfg, perceptual, noise, lambda_m)
                history.append(total.detach())
                opt.zero_grad(set_to_none=True)
                total.sum().backward()
                opt.step()
        with torch.no_grad():
            total, terms, _ = inversion_losses(G, wp, w0, y, parts, cfg, perceptual, noise, lambda_m)
    history.append(total.detach())
    if not torch.isfinite(total).all():
        raise UserError("inversion loss became non-finite; lower the learning rate (lr) or check the targets")
    return {"wp": wp.detach(), "loss": total, "initial_loss": history[0], "history": torch.stack(history),
            "terms": {k: v.detach() for k, v in terms.items()}}


# ============================================================================================
# Encoder
# ============================================================================================

class Encoder(nn.Module):
    """image [B, 3, R, R] in [-1, 1] (+ one-hot parts [B, K, R, R]) -> W+ [B, n_latent, w_dim].

    Stride-2 conv blocks (GroupNorm, leaky ReLU) down to an adaptive 4x4 map, a 1x1 reduction, two dense
    layers. The output is an offset from ``w_mean`` (a buffer, saved with the weights); the last layer starts
    at zero, so an untrained encoder predicts the mean latent.
    """

    def __init__(self, resolution: int, n_latent: int, w_dim: int, channels=(32, 64, 128, 256), head: int = 64,
                 hidden: int = 512, use_mask: bool = True, n_parts: int = NUM_PARTS, w_mean=None):
        super().__init__()
        self.resolution, self.n_latent, self.w_dim = resolution, n_latent, w_dim
        self.use_mask, self.n_parts = use_mask, n_parts
        c_in = 3 + (n_parts if use_mask else 0)
        layers, prev = [nn.Conv2d(c_in, channels[0], 3, padding=1), nn.LeakyReLU(0.2)], channels[0]
        for c in channels:
            layers += [nn.Conv2d(prev, c, 3, stride=2, padding=1), nn.GroupNorm(min(8, c), c), nn.LeakyReLU(0.2),
                       nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(min(8, c), c), nn.LeakyReLU(0.2)]
            prev = c
        layers += [nn.AdaptiveAvgPool2d(4), nn.Conv2d(prev, head, 1), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Sequential(nn.Linear(head * 16, hidden), nn.LeakyReLU(0.2))
        self.out = nn.Linear(hidden, n_latent * w_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.register_buffer("w_mean", torch.zeros(n_latent, w_dim) if w_mean is None else w_mean.clone())

    def make_input(self, image: torch.Tensor, parts: torch.Tensor | None) -> torch.Tensor:
        if image.shape[-1] != self.resolution:
            image = F.interpolate(image, size=self.resolution, mode="bilinear", align_corners=False,
                                  antialias=image.shape[-1] > self.resolution)
        if not self.use_mask:
            return image
        if parts is None:
            raise ValueError("this encoder takes the part map too")
        if parts.shape[-1] != self.resolution:
            parts = F.interpolate(parts[:, None].float(), size=self.resolution, mode="nearest")[:, 0].long()
        valid = parts != INVALID
        onehot = F.one_hot(torch.where(valid, parts, 0).long(), self.n_parts).permute(0, 3, 1, 2).float()
        return torch.cat([image, onehot * valid[:, None]], dim=1)

    def forward(self, image, parts=None):
        x = self.features(self.make_input(image, parts))
        d = self.out(self.fc(x.flatten(1)))
        return self.w_mean + d.view(-1, self.n_latent, self.w_dim)


def build_encoder(G, cfg: InvertConfig, w_mean=None) -> Encoder:
    return Encoder(G.cfg.resolution, G.n_latent, G.cfg.w_dim, cfg.enc_channels, cfg.enc_head, cfg.enc_hidden,
                   cfg.enc_use_mask, G.n_parts, w_mean)


@torch.no_grad()
def sample_wplus(G, batch: int, generator: torch.Generator, mixing: float, part_noise: float) -> torch.Tensor:
    """W+ samples like the ones inversion and augmentation produce: plain w, style mixing (a crossover index),
    and per-part code replacement/blending (each part with prob. 0.3, blend weight uniform in (0, 1])."""
    dev = next(G.parameters()).device      # random draws on the CPU generator, the same on any device
    z = torch.randn(2 * batch, G.cfg.z_dim, generator=generator).to(dev)
    w = G.map(z)
    w1, w2 = w[:batch], w[batch:]
    wp = G.broadcast(w1).clone()
    mix = (torch.rand(batch, generator=generator) < mixing).to(dev)
    cross = torch.randint(1, G.n_latent, (batch,), generator=generator).to(dev)
    if mix.any():
        wp[mix] = G.mix(w1[mix], w2[mix], cross[mix])
    pn = (torch.rand(batch, generator=generator) < part_noise).to(dev)
    if pn.any():
        z3 = torch.randn(batch * G.n_parts, G.cfg.z_dim, generator=generator).to(dev)
        w3 = G.map(z3).view(batch, G.n_parts, -1)
        pick = (torch.rand(batch, G.n_parts, generator=generator).to(dev) < 0.3) & pn[:, None]
        lam = 1.0 - torch.rand(batch, G.n_parts, 1, generator=generator).to(dev)
        idx = torch.tensor([G.shape_index(k) for k in range(G.n_parts)], device=dev)
        for off in (0, 1):
            cur = wp[:, idx + off]                                            # [B, K, D]
            wp[:, idx + off] = torch.where(pick[..., None], (1 - lam) * cur + lam * w3, cur)
    return wp


def _encoder_step_batch(G, cfg: InvertConfig, step: int):
    """The (deterministic given step) training batch: W+, noise, G's image and part map."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    wp = sample_wplus(G, cfg.enc_batch, g, cfg.enc_mixing, cfg.enc_part_noise)
    noise = random_noise(G, cfg.enc_batch, g, wp.device)
    with torch.no_grad():
        out = G(wp, noise)
    return wp, noise, out["image"], out["seg"].argmax(dim=1)


def encoder_loss(G, enc: Encoder, cfg: InvertConfig, wp, noise, img, parts, image_terms: bool):
    from ..common.device import amp
    with amp(img.device):          # the encoder's own forward in float16 on CUDA (safe: a CNN + MLP)
        pred = enc(img, parts)
    pred = pred.float()            # the latent loss and G's image terms in float32
    lat = (pred - wp).pow(2).mean()
    terms = {"latent": lat.item()}
    loss = cfg.enc_lambda_latent * lat
    if image_terms and (cfg.enc_lambda_image or cfg.enc_lambda_seg):
        out = G(pred, noise)
        pix = (out["image"] - img).pow(2).mean()
        seg = part_ce(out["seg"], parts).mean()
        terms.update(image=pix.item(), seg=seg.item())
        loss = loss + cfg.enc_lambda_image * pix + cfg.enc_lambda_seg * seg
    terms["total"] = loss.item()
    return loss, terms


def train_encoder(g_avatar, cfg: InvertConfig, work, means: dict | None = None, max_steps: int | None = None,
                  progress: bool = True, log=print, device="cpu") -> Encoder:
    """Train (or resume) the encoder in work/encoder/ on G_avatar's own samples; returns it (eval mode).

    Checkpoint: model.safetensors (weights + w_mean), optim.pt (Adam state, torch.load weights_only=True),
    state.json (step, config, generator fingerprint, loss history). Batches depend only on (seed, step),
    so a resumed run reproduces the uninterrupted one exactly. ``max_steps``: stop (with a checkpoint)
    after that many total steps, e.g. to split training over sittings. ``device``: auto | cpu | cuda
    (G_avatar is moved there). SIGINT/SIGTERM: a checkpoint, then KeyboardInterrupt.
    """
    from ..common import device as dev_mod
    from ..common.trainer import Trainer
    device = dev_mod.resolve(device)
    folder = Path(work) / "encoder"
    G = g_avatar.to(device)
    fp = generator_fingerprint(G)
    cfg_key = _cfg_dict(cfg, drop=_RUN_FIELDS)
    resuming = (folder / "state.json").is_file()
    if not resuming and means is None:
        means = G.mean_latents(n=cfg.mean_samples)
    if not resuming:
        torch.manual_seed(cfg.seed)
    enc = build_encoder(G, cfg, None if resuming else means["w_mean"]).to(device)
    opt = torch.optim.Adam(enc.parameters(), lr=cfg.enc_lr, betas=(0.9, 0.99))
    grad_scaler = dev_mod.scaler(device)
    state = {"config": cfg_key, "generator": fp, "step": 0, "history": [],
             "arch": {"resolution": enc.resolution, "n_latent": enc.n_latent, "w_dim": enc.w_dim,
                      "channels": list(cfg.enc_channels), "head": cfg.enc_head, "hidden": cfg.enc_hidden,
                      "use_mask": cfg.enc_use_mask, "n_parts": enc.n_parts}}
    total = cfg.enc_steps if max_steps is None else min(cfg.enc_steps, max_steps)
    trainer = Trainer("encoder", folder, state, modules={"model": enc}, optimizers={"opt": opt}, device=device,
                      total=total, checkpoint_every=cfg.enc_ckpt_every, log=log, progress=progress,
                      step_key="step", diverged_hint="lower enc_lr")

    def check(saved: dict):
        if saved["config"] != cfg_key or saved["generator"] != fp:
            what = "generator" if saved["generator"] != fp else "config"
            raise UserError(f"{folder} holds an encoder trained with another {what}; use another work folder")

    if trainer.resume(check) is not None:
        log(f"resuming encoder at step {state['step']}")
    enc.train()
    t0, run = time.monotonic(), {"done": 0}

    def step(t: Trainer) -> dict:
        i = state["step"]
        lr = cfg.enc_lr * 0.5 * (1.0 + math.cos(math.pi * i / cfg.enc_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        wp, noise, img, parts = _encoder_step_batch(G, cfg, i)
        loss, terms = encoder_loss(G, enc, cfg, wp, noise, img, parts,
                                   image_terms=i % max(1, cfg.enc_image_every) == 0)
        if not math.isfinite(terms["total"]):
            raise UserError(f"encoder loss became {terms['total']} at step {i}; lower enc_lr")
        opt.zero_grad(set_to_none=True)
        grad_scaler.scale(loss).backward()
        grad_scaler.step(opt)
        grad_scaler.update()
        run["done"] += 1
        n = i + 1
        if n % cfg.enc_log_every == 0 or n == total:
            terms.update(step=n, samples_per_s=run["done"] * cfg.enc_batch / (time.monotonic() - t0))
            state["history"].append(terms)
        return {}

    with frozen(G):
        trainer.run(step, raise_on_stop=True)
    return enc.eval()


def load_encoder(work, G=None, device=None) -> Encoder:
    """The encoder of work/encoder (or of the folder itself), on ``device`` (default: G's, else the
    CPU); checks it belongs to G when G is given."""
    from ..common.checkpoint import load_weights
    folder = Path(work)
    if not (folder / "state.json").is_file():
        folder = folder / "encoder"
    if not (folder / "state.json").is_file():
        raise UserError(f"{work}: no trained encoder")
    state = json.loads((folder / "state.json").read_text())
    if G is not None and state["generator"] != generator_fingerprint(G):
        raise UserError(f"{folder}: encoder was trained for another generator")
    a = state["arch"]
    if device is None:
        device = next(G.parameters()).device if G is not None else "cpu"
    enc = Encoder(a["resolution"], a["n_latent"], a["w_dim"], tuple(a["channels"]), a["head"], a["hidden"],
                  a["use_mask"], a["n_parts"]).to(device)
    load_weights(enc, folder / "model.safetensors", "the encoder", device)
    return enc.eval()


@torch.no_grad()
def encode(enc: Encoder, y, parts, batch: int = 64) -> torch.Tensor:
    return torch.cat([enc(y[i:i + batch], None if parts is None else parts[i:i + batch])
                      for i in range(0, len(y), batch)])


# ============================================================================================
# Renders on disk
# ============================================================================================

def dataset_names(dataset_dir) -> list[str]:
    """Sorted names of the complete samples (vector JSON + image + mask) of an engine dataset folder."""
    root = Path(dataset_dir)
    if not (root / "manifest.json").is_file():
        raise UserError(f"{root}: not an engine dataset (no manifest.json)")
    names = sorted(p.stem for p in (root / "vectors").glob("*.json") if not p.name.startswith("."))
    names = [n for n in names if (root / "images" / f"{n}.png").is_file() and (root / "masks" / f"{n}.png").is_file()]
    if not names:
        raise UserError(f"{root}: no complete samples")
    return names


def _read_one(root: Path, name: str, res: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image
    try:
        with Image.open(root / "images" / f"{name}.png") as im:
            im = im.convert("RGB")
            if im.size != (res, res):
                im = im.resize((res, res), Image.LANCZOS)
            rgb = np.asarray(im, np.uint8)
        with Image.open(root / "masks" / f"{name}.png") as im:
            if im.mode not in ("L", "P"):
                raise UserError(f"{root}/masks/{name}.png: not a single-channel label map (mode {im.mode})")
            if im.size != (res, res):
                im = im.resize((res, res), Image.NEAREST)
            lab = np.asarray(im, np.uint8)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{root}: sample {name} is unreadable ({type(e).__name__}: {e})") from None
    if (lab >= len(CLASSES)).any():
        raise UserError(f"{root}/masks/{name}.png: label ids outside the CelebAMask-HQ classes 0..18")
    return rgb, lab


def load_renders(dataset_dir, names: list[str], resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Renders as G targets: images [n, 3, R, R] in [-1, 1], parts long [n, R, R]."""
    from concurrent.futures import ThreadPoolExecutor
    root = Path(dataset_dir)
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        pairs = list(pool.map(lambda n: _read_one(root, n, resolution), names))
    rgb = np.stack([p[0] for p in pairs])
    lab = np.stack([p[1] for p in pairs])
    img = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return img, torch.from_numpy(labels_to_parts(lab)).long()


# ============================================================================================
# Batched, resumable inversion of a dataset
# ============================================================================================

def invert_batch(G, y, parts, keys, cfg: InvertConfig, w_init, perceptual=None, encoder=None,
                 steps: int | None = None, lambda_m: float | None = None) -> dict:
    """One batch: encoder start (if given) then ``steps`` (default: short_steps with an encoder, else steps)."""
    dev = next(G.parameters()).device        # targets and noise go where G is; results come back to the CPU
    noise = make_noise(G, keys, cfg.seed, cfg.noise)
    noise = None if noise is None else [m.to(dev) for m in noise]
    y, parts = y.to(dev), None if parts is None else parts.to(dev)
    if encoder is not None:
        start = encode(encoder, y, parts)
        steps = cfg.short_steps if steps is None else steps
    else:
        start = w_init.to(dev)
        steps = cfg.steps if steps is None else steps
    r = invert(G, y, parts, cfg, start, perceptual, noise, steps, lambda_m)
    if dev.type != "cpu":
        r = {k: ({n: t.cpu() for n, t in v.items()} if isinstance(v, dict) else v.cpu()) for k, v in r.items()}
    return r


def invert_dataset(g_avatar, encoder, dataset_dir, out_dir, cfg: InvertConfig, w_init=None, parser=None,
                   perceptual=None, progress: bool = True, log=print) -> Path:
    """Invert every complete render of an engine dataset; returns out_dir/latents.safetensors.

    Resumable: chunk k (renders names[k*chunk:(k+1)*chunk]) is written to out_dir/chunks/ atomically and
    skipped on a rerun when its stored names match. A folder made with another generator, encoder, config or
    start latent is refused. ``perceptual``: (fn, description) to override ``cfg.perceptual``.
    """
    from safetensors.torch import load_file, save_file
    from ..common.perceptual import resolve_perceptual
    G = g_avatar
    root, out = Path(dataset_dir), Path(out_dir)
    names = dataset_names(root)
    if w_init is None and encoder is None:
        w_init = start_latent(G.mean_latents(n=cfg.mean_samples), cfg)
    if perceptual is None:
        fn, desc, _ = resolve_perceptual(cfg.perceptual, cfg.perceptual_fallback, parser, cfg.lpips_net)
    else:
        fn, desc = perceptual
    log(f"inversion perceptual term: {desc}")
    mode = "encoder+opt" if encoder is not None else "opt"
    key = {"generator": generator_fingerprint(G), "mode": mode, "perceptual": desc,
           "encoder": generator_fingerprint(encoder) if encoder is not None else None,
           "w_init": hashlib.sha256(w_init.cpu().numpy().tobytes()).hexdigest()[:16] if w_init is not None else None,
           "config": _cfg_dict(cfg, drop=_RUN_FIELDS - {"chunk"}), "dataset": str(root.resolve())}
    out.mkdir(parents=True, exist_ok=True)
    (out / "chunks").mkdir(exist_ok=True)
    man_path = out / "manifest.json"
    if man_path.is_file():
        have = json.loads(man_path.read_text())
        diff = [k for k in key if have.get(k) != key[k]]
        if diff:
            raise UserError(f"{out} holds inversions made with another {', '.join(diff)}; use another folder")
    else:
        man_path.write_text(json.dumps(key, indent=1))
    chunks = [names[i:i + cfg.chunk] for i in range(0, len(names), cfg.chunk)]
    bar = Progress(len(names), f"invert ({mode})", enabled=progress)
    t0, n_new = time.monotonic(), 0
    for c, chunk_names in enumerate(chunks):
        path = out / "chunks" / f"chunk_{c:06d}.safetensors"
        if path.is_file():
            try:
                from safetensors import safe_open
                with safe_open(str(path), "pt") as f:
                    if json.loads(f.metadata()["names"]) == chunk_names:
                        bar.update(len(chunk_names))
                        continue
            except Exception:
                pass                       # unreadable or stale: redo it
        y, parts = load_renders(root, chunk_names, G.cfg.resolution)
        keys = [int(n) if n.isdigit() else c * cfg.chunk + i for i, n in enumerate(chunk_names)]
        wps, losses = [], []
        for i in range(0, len(chunk_names), cfg.batch):
            r = invert_batch(G, y[i:i + cfg.batch], parts[i:i + cfg.batch], keys[i:i + cfg.batch], cfg,
                             w_init, fn, encoder)
            wps.append(r["wp"])
            losses.append(r["loss"])
            bar.update(len(r["wp"]))
            n_new += len(r["wp"])
        tmp = path.with_name(f".tmp-{path.name}")
        save_file({"wp": torch.cat(wps).contiguous(), "loss": torch.cat(losses).contiguous(),
                   "index": torch.tensor(keys, dtype=torch.int64)}, str(tmp),
                  metadata={"names": json.dumps(chunk_names)})
        os.replace(tmp, path)
    bar.close()
    if n_new:
        log(f"inverted {n_new} renders at {n_new / (time.monotonic() - t0):.2f} latents/s")
    parts_ = [load_file(str(out / "chunks" / f"chunk_{c:06d}.safetensors")) for c in range(len(chunks))]
    final = out / "latents.safetensors"
    tmp = out / ".tmp-latents.safetensors"
    save_file({k: torch.cat([p[k] for p in parts_]).contiguous() for k in ("wp", "loss", "index")}, str(tmp),
              metadata={"names": json.dumps(names), "mode": mode, "perceptual": desc,
                        "noise": cfg.noise, "noise_seed": str(cfg.seed),
                        "generator": key["generator"], "dataset": key["dataset"]})
    os.replace(tmp, final)
    return final


def load_latents(path) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no latents file")
    t = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    return {"wp": t["wp"], "index": t["index"], "loss": t["loss"], "names": json.loads(meta.pop("names")),
            "meta": meta}


# ============================================================================================
# Measuring reconstructions
# ============================================================================================

@torch.no_grad()
def reconstruction_metrics(G, wp, y, parts, noise, perceptual=None, batch: int = 32) -> dict:
    """Pixel MSE (images in [-1, 1]), perceptual distance (if given), mIoU of G's segmentation vs parts."""
    from ..readout.face_parser import confusion, miou
    mse, perc, conf = [], [], torch.zeros(NUM_PARTS, NUM_PARTS, dtype=torch.long)
    for i in range(0, len(wp), batch):
        nz = None if noise is None else [m[i:i + batch] for m in noise]
        out = G(wp[i:i + batch], nz)
        yi = y[i:i + batch]
        mse.append((out["image"] - yi).pow(2).mean(dim=(1, 2, 3)))
        if perceptual is not None:
            perc.append(perceptual(out["image"], yi))
        if parts is not None:
            pi = parts[i:i + batch]
            seg = out["seg"]
            if seg.shape[-2:] != pi.shape[-2:]:
                seg = F.interpolate(seg, size=pi.shape[-2:], mode="bilinear", align_corners=False)
            pred = seg.argmax(1)
            valid = pi != INVALID
            conf += confusion(pred[valid], pi[valid], NUM_PARTS)
    res = {"mse": float(torch.cat(mse).mean())}
    if perc:
        res["perceptual"] = float(torch.cat(perc).mean())
    if parts is not None:
        res["miou"] = miou(conf)[0]
    return res


def compare_modes(G, encoder, y, parts, cfg: InvertConfig, w_init, perceptual=None, keys=None,
                  modes=("mean", "encoder", "encoder+opt", "opt"), lambda_m: float | None = None,
                  log=None) -> dict:
    """Reconstruction quality and speed of each inversion mode on targets y / parts (G's resolution).

    "mean": w_init itself; "encoder": encoder prediction; "encoder+opt": + cfg.short_steps;
    "opt": cfg.steps from w_init. Returns {mode: {mse, perceptual, miou, latents_per_s, seconds}}.
    """
    keys = list(range(len(y))) if keys is None else keys
    noise = make_noise(G, keys, cfg.seed, cfg.noise)
    res = {}
    for mode in modes:
        if mode.startswith("encoder") and encoder is None:
            continue
        t0 = time.monotonic()
        wps = []
        for i in range(0, len(y), cfg.batch):
            sl = slice(i, i + cfg.batch)
            nz = [m[sl] for m in noise]
            if mode == "mean":
                wps.append(w_init.expand(len(y[sl]), -1, -1))
            elif mode == "encoder":
                wps.append(encode(encoder, y[sl], parts[sl] if parts is not None else None))
            elif mode == "encoder+opt":
                start = encode(encoder, y[sl], parts[sl] if parts is not None else None)
                wps.append(invert(G, y[sl], parts[sl], cfg, start, perceptual, nz, cfg.short_steps,
                                  lambda_m)["wp"])
            elif mode == "opt":
                wps.append(invert(G, y[sl], parts[sl], cfg, w_init, perceptual, nz, cfg.steps, lambda_m)["wp"])
            else:
                raise ValueError(f"unknown mode {mode}")
        dt = time.monotonic() - t0
        m = reconstruction_metrics(G, torch.cat(wps), y, parts, noise, perceptual)
        m.update(seconds=round(dt, 3), latents_per_s=len(y) / max(dt, 1e-9))
        res[mode] = m
        if log:
            log(f"{mode:12s} " + " ".join(f"{k} {v:.4g}" for k, v in m.items()))
    return res
