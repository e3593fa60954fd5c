"""Training of the dual-domain generators and the face parser.

Stages
  real    G_real on real faces (image + part map pairs) with the two-branch discriminator.
  avatar  G_avatar initialised from G_real (``init``: a real-stage work dir or checkpoint), trained on
          engine renders with the GAN loss plus the colour-matching loss: for the same z, the squared
          distance between the mean colours of the hair and face regions of G_real(z) and G_avatar(z), each
          region weighted by its own generator's soft segmentation (weight ``lambda_color``). The engine's
          exact masks feed the discriminator's segmentation branch. ``freeze_local`` keeps the mapping and
          the local generators of G_real, so both domains share their layouts exactly.
  parser  a small U-Net face parser on the real train split, evaluated by mIoU on the validation split.

StyleGAN2 recipe: non-saturating logistic loss, lazy R1 (gamma 10, every 16 minibatches, on both D inputs),
lazy path-length regularisation (weight 0.5, every 4), style mixing 0.3, generator EMA, and DiffAugment-
style differentiable augmentation (colour, translation, cutout; geometric ones applied to image and
segmentation alike) on every D input, real and fake.

Runs: checkpoints (safetensors weights + a torch state file loaded with weights_only=True, with optimiser,
step and RNG states) every ``ckpt_every`` steps; resuming reproduces the uninterrupted run exactly. A
checkpoint of another config is refused. Non-finite losses stop the run with a clear message. Ctrl-C
(SIGINT) or SIGTERM: the current step finishes, a checkpoint is written, the run exits. A sample grid every
``sample_every`` steps. Multi-process data parallel with ``torchrun --nproc_per_node N -m
likeness.training.generators.train_gan ...`` (NCCL on GPUs, gloo on CPUs): each rank draws batch/N samples, gradients
are averaged. ``--device auto|cpu|cuda`` (``training.common.device``); always float32 (TF32 matmuls on CUDA): the
R1 and path-length penalties take second derivatives, which float16 autocast overflows, so the GAN stages
use no mixed precision. The loop, checkpoints and SIGINT/SIGTERM handling are ``training.common.trainer`` and
``training.common.checkpoint``'s.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...backend.errors import UserError
from ..common import checkpoint as ckpt_mod
from ..common import data as data_mod
from ..common import device as dev_mod
from ..readout.face_parser import FaceParser, confusion, miou
from .gan_configs import GANConfig, config_from_dict, get_config, SCHEDULE_FIELDS
from ..common.parts import COLOR_PARTS, NUM_PARTS, PART_IDS, PARTS, colorize_parts
from .semantic_gan import Discriminator, Generator
from ..common.trainer import Trainer

STAGES = ("real", "avatar", "parser")


# ============================================================================================
# Distributed helpers (no-ops in a single process)
# ============================================================================================

def dist_setup(device: torch.device | None = None) -> tuple[int, int]:
    """(rank, world). Initialises the process group when torchrun set WORLD_SIZE > 1: NCCL when the
    ranks train on CUDA, gloo on the CPU (whether or not the machine has a GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group(dev_mod.ddp_backend(device or torch.device("cpu")))
    return dist.get_rank(), dist.get_world_size()


def _world() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_mean_(tensors: list[torch.Tensor]):
    """Average tensors in place across ranks, as one flat buffer."""
    if _world() == 1 or not tensors:
        return
    import torch.distributed as dist
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= _world()
    i = 0
    for t in tensors:
        t.copy_(flat[i:i + t.numel()].view_as(t))
        i += t.numel()


def sync_grads(module: torch.nn.Module):
    all_reduce_mean_([p.grad for p in module.parameters() if p.grad is not None])


def broadcast_module(module: torch.nn.Module):
    if _world() == 1:
        return
    import torch.distributed as dist
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, 0)


# ============================================================================================
# Losses and augmentation
# ============================================================================================

def region_mean_color(image: torch.Tensor, probs: torch.Tensor, part: int, eps: float = 1.0):
    """image [B, 3, H, W], probs [B, K, H, W] -> [B, 3] mean colour of the part, weighted by its
    probability (eps: one pixel of weight, so an absent part gives ~0 rather than noise)."""
    m = probs[:, part:part + 1]
    return (image * m).sum(dim=(2, 3)) / (m.sum(dim=(2, 3)) + eps)


def color_loss(img_a, probs_a, img_b, probs_b, parts=COLOR_PARTS) -> torch.Tensor:
    """Sum over ``parts`` of the squared distance between the two images' part mean colours (batch mean).
    The region weights are detached: the loss changes colours, not layouts."""
    loss = img_a.new_zeros(())
    for name in parts:
        k = PART_IDS[name]
        ca = region_mean_color(img_a, probs_a.detach(), k)
        cb = region_mean_color(img_b, probs_b.detach(), k)
        loss = loss + (ca - cb).pow(2).sum(dim=1).mean()
    return loss


# Parts the avatar may draw over any other part: the engine's accessories (the renders wear them
# far more often than G_real's faces do), so the layout loss does not forbid them.
LAYOUT_FREE_PARTS = ("eyeglasses", "hat")


def layout_loss(ref_seg: torch.Tensor, seg: torch.Tensor, free=LAYOUT_FREE_PARTS) -> torch.Tensor:
    """Layout agreement of G_avatar with G_real for the same latents (beyond the papers, like the
    colour loss but for parts): -log of the probability G_avatar's segmentation ``seg`` (logits
    [B, K, H, W]) gives G_real's part at each pixel (argmax of ``ref_seg``), where covering it with
    a ``free`` part (an accessory) counts as agreeing too. Zero when the layouts agree."""
    target = ref_seg.detach().argmax(1, keepdim=True)                            # [B, 1, H, W]
    probs = seg.softmax(1)
    free_ids = torch.tensor([PART_IDS[p] for p in free], device=seg.device)
    p_free = probs[:, free_ids].sum(1, keepdim=True)
    p_target = probs.gather(1, target)
    target_is_free = (target[..., None] == free_ids).any(-1)
    agree = torch.where(target_is_free, p_free, p_target + p_free)
    return -agree.clamp(1e-6, 1.0).log().mean()


def diff_augment(image: torch.Tensor, seg: torch.Tensor, policy: str):
    """DiffAugment (Zhao et al., 2020) for image [B, 3, H, W] and part probabilities seg [B, K, H, W].

    colour: brightness, saturation, contrast (image only); translation (1/8 of the side; the image is
    padded with zeros, the segmentation with background); cutout (a square of half the side, zeroed in
    both). Differentiable in both inputs; randomness from the global torch RNG.
    """
    if not policy:
        return image, seg
    ops = policy.split(",")
    b, _, h, w = image.shape
    dev = image.device
    if "color" in ops:
        image = image + (torch.rand(b, 1, 1, 1, device=dev) - 0.5)
        mean = image.mean(dim=1, keepdim=True)
        image = (image - mean) * (torch.rand(b, 1, 1, 1, device=dev) * 2) + mean
        mean = image.mean(dim=(1, 2, 3), keepdim=True)
        image = (image - mean) * (torch.rand(b, 1, 1, 1, device=dev) + 0.5) + mean
    if "translation" in ops:
        r = max(1, int(h * 0.125 + 0.5))
        sy = torch.randint(-r, r + 1, (b, 1, 1), device=dev)
        sx = torch.randint(-r, r + 1, (b, 1, 1), device=dev)
        yy = torch.arange(h, device=dev).view(1, h, 1) - sy                # source row of each output row
        xx = torch.arange(w, device=dev).view(1, 1, w) - sx
        valid = ((yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)).unsqueeze(1).float()   # [B, 1, H, W]
        idx = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).view(b, 1, h * w)
        image = _gather(image, idx) * valid
        bg = torch.zeros_like(seg[:1, :, :1, :1])
        bg[:, PART_IDS["background"]] = 1.0
        seg = _gather(seg, idx) * valid + bg * (1 - valid)
    if "cutout" in ops:
        ch, cw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
        cy = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), device=dev)
        cx = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), device=dev)
        yy = torch.arange(h, device=dev).view(1, h, 1)
        xx = torch.arange(w, device=dev).view(1, 1, w)
        inside = ((yy - cy + ch // 2).clamp(0) < ch) & ((yy - cy + ch // 2) >= 0) & \
                 ((xx - cx + cw // 2) >= 0) & ((xx - cx + cw // 2) < cw)
        keep = (~inside).unsqueeze(1).float()                               # [B, 1, H, W]
        image, seg = image * keep, seg * keep
    return image, seg


def attribute_groups(dataset) -> tuple[np.ndarray, list[str]]:
    """Each training face's group: its hair-length rank (the real labels' hair-fraction thresholds)
    x glasses x hat (the validation's pixel rules), from its part map. -> (group ids, names)."""
    out = []
    for start in range(0, len(dataset), 256):
        _, parts = dataset.batch(np.arange(start, min(start + 256, len(dataset))))
        out.append(groups_of_parts(parts))
    return np.concatenate(out), GROUP_NAMES


def groups_of_parts(parts: torch.Tensor) -> np.ndarray:
    """Attribute group ids (``GROUP_NAMES``) of part maps [N, H, W] (ids of ``PARTS``)."""
    from ...backend.colour_match import parse_shows
    from ..estimator.real_labels import hair_rank_of_fraction
    p = np.asarray(parts)
    hair = hair_rank_of_fraction((p == PART_IDS["hair"]).mean(axis=(1, 2)))
    glasses, hat = parse_shows(p, PARTS, "glasses"), parse_shows(p, PARTS, "headwear")
    return (hair * 4 + glasses * 2 + hat).astype(np.int64)


def _group_names() -> list[str]:
    from ...backend.schema import TAG_VOCABULARY
    order = TAG_VOCABULARY["hair_length"]
    return [f"{order[g // 4]}{' glasses' if g & 2 else ''}{' hat' if g & 1 else ''}"
            for g in range(4 * len(order))]


GROUP_NAMES = _group_names()


def group_shares(groups: np.ndarray) -> dict:
    """Shares of hats, glasses and each hair-length rank among attribute group ids."""
    groups = np.asarray(groups)
    n = max(len(groups), 1)
    hair = [name for name in GROUP_NAMES if " " not in name]
    return {"n": int(len(groups)), "hat": float((groups & 1).sum() / n),
            "glasses": float(((groups >> 1) & 1).sum() / n),
            "hair_length": {h: float((groups // 4 == r).sum() / n) for r, h in enumerate(hair)}}


def balance_weights(dataset, power: float) -> np.ndarray:
    """Sampling weights (sum 1): frequency of each face's attribute group to the power -``power``.
    G_real learns what it is shown: fitted to 744 faces with 37 hats it hardly draws one, yet the
    pairs need realistic faces for every avatar the pack can make."""
    groups, _ = attribute_groups(dataset)
    freq = np.bincount(groups, minlength=groups.max() + 1)[groups] / len(groups)
    w = freq ** -float(power)
    return (w / w.sum()).astype(np.float64)


def _gather(x, idx):
    """x [B, C, H, W], idx [B, 1, H*W] flat source positions -> [B, C, H, W]"""
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).gather(2, idx.expand(b, c, h * w)).view(b, c, h, w)


def requires_grad(module, flag: bool):
    for p in module.parameters():
        p.requires_grad_(flag)


# ============================================================================================
# The GAN trainer: one object per process, one call per step
# ============================================================================================

class GANTrainer:
    """G, D, G_ema, their optimisers and one training step. ``g_ref`` (avatar stage): frozen G_real."""

    def __init__(self, cfg: GANConfig, dataset, stage: str = "real", g_ref: Generator | None = None,
                 rank: int = 0, world: int = 1, device: torch.device | str = "cpu"):
        if cfg.batch % world:
            raise UserError(f"batch {cfg.batch} must divide among {world} processes")
        self.cfg, self.stage, self.data = cfg, stage, dataset
        self.rank, self.world, self.b = rank, world, cfg.batch // world
        self.device = dev = torch.device(device)
        torch.manual_seed(cfg.seed)                       # same initial weights on every rank
        self.G, self.D = Generator(cfg).to(dev), Discriminator(cfg).to(dev)
        broadcast_module(self.G)
        broadcast_module(self.D)
        self.G_ema = copy.deepcopy(self.G).eval()
        requires_grad(self.G_ema, False)
        self.g_ref = g_ref
        if g_ref is not None:
            g_ref.to(dev)
            requires_grad(g_ref, False)
            g_ref.eval()
        self.trainable_g = [p for n, p in self.G.named_parameters() if not self._frozen(n)]
        cg = cfg.pl_every / (cfg.pl_every + 1)
        cd = cfg.r1_every / (cfg.r1_every + 1)
        self.opt_g = torch.optim.Adam(self.trainable_g, lr=cfg.lr_g * cg, betas=(0.0, 0.99 ** cg))
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=cfg.lr_d * cd, betas=(0.0, 0.99 ** cd))
        self.pl_mean = torch.zeros((), device=dev)
        self.step = 0
        self.ema_beta = 0.5 ** (cfg.batch / max(cfg.ema_kimg * 1000, 1e-8))
        self.data_gen = torch.Generator().manual_seed(cfg.seed * 1000 + 17 + rank)
        torch.manual_seed(cfg.seed * 1000 + 7919 * (rank + 1))   # per-rank z, noise, augmentation
        self.data_weights = None
        if stage == "real" and cfg.balance > 0:
            self.data_weights = torch.from_numpy(balance_weights(dataset, cfg.balance))

    def _frozen(self, name: str) -> bool:
        return self.stage == "avatar" and self.cfg.freeze_local and name.startswith(("mapping.", "local."))

    # ---- data and latents -------------------------------------------------------------------
    def real_batch(self, n: int | None = None):
        """-> image [n, 3, H, W] in [-1, 1], one-hot parts [n, K, H, W]"""
        n = n or self.b
        if self.data_weights is None:
            idx = torch.randint(len(self.data), (n,), generator=self.data_gen)
        else:
            idx = torch.multinomial(self.data_weights, n, replacement=True, generator=self.data_gen)
        flip = torch.rand(n, generator=self.data_gen) < 0.5
        img, parts = dev_mod.to(self.data.batch(idx), self.device)
        if self.cfg.xflip and bool(flip.any()):
            flip = flip.to(self.device)
            img = torch.where(flip[:, None, None, None], img.flip(3), img)
            parts = torch.where(flip[:, None, None], parts.flip(2), parts)
        seg = F.one_hot(parts, NUM_PARTS).permute(0, 3, 1, 2).float()
        return img, seg

    def draw_latents(self, n: int):
        """(z1, z2, crossover) for style mixing: codes [0, crossover) from z1, the rest from z2."""
        dev = self.device
        z1, z2 = torch.randn(n, self.cfg.z_dim, device=dev), torch.randn(n, self.cfg.z_dim, device=dev)
        mix = torch.rand(n, device=dev) < self.cfg.mixing
        cross = torch.where(mix, torch.randint(1, self.G.n_latent, (n,), device=dev),
                            torch.full((n,), self.G.n_latent, device=dev))
        return z1, z2, cross

    @staticmethod
    def latents_of(G: Generator, lat):
        z1, z2, cross = lat
        return G.mix(G.map(z1), G.map(z2), cross)          # [n, n_latent, w_dim]

    # ---- one step ----------------------------------------------------------------------------
    def d_loss(self, real=None, lat=None):
        cfg = self.cfg
        real_img, real_seg = real if real is not None else self.real_batch()
        lat = lat if lat is not None else self.draw_latents(self.b)
        with torch.no_grad():
            fake = self.G(self.latents_of(self.G, lat))
        d_fake = self.D(*diff_augment(fake["image"], fake["seg"].softmax(1), cfg.augment))
        d_real = self.D(*diff_augment(real_img, real_seg, cfg.augment))
        return F.softplus(d_fake).mean() + F.softplus(-d_real).mean()

    def g_loss(self, lat=None):
        """-> (total, gan loss, colour loss); the layout loss (if weighted) is in ``self.last_layout``"""
        cfg = self.cfg
        lat = lat if lat is not None else self.draw_latents(self.b)
        fake = self.G(self.latents_of(self.G, lat))
        probs = fake["seg"].softmax(1)
        gan = F.softplus(-self.D(*diff_augment(fake["image"], probs, cfg.augment))).mean()
        col = torch.zeros((), device=self.device)
        if self.g_ref is not None:                         # with lambda_color 0 it is only monitored
            with torch.no_grad():
                ref = self.g_ref(self.latents_of(self.g_ref, lat))
            with torch.set_grad_enabled(cfg.lambda_color > 0 and torch.is_grad_enabled()):
                col = color_loss(ref["image"], ref["seg"].softmax(1), fake["image"], probs)
            with torch.set_grad_enabled(cfg.lambda_layout > 0 and torch.is_grad_enabled()):
                self.last_layout = layout_loss(ref["seg"], fake["seg"])
        total = gan + cfg.lambda_color * col if cfg.lambda_color > 0 else gan
        if self.g_ref is not None and cfg.lambda_layout > 0:
            total = total + cfg.lambda_layout * self.last_layout
        return total, gan, col

    def train_step(self) -> dict:
        cfg, stats = self.cfg, {}
        # -- discriminator
        requires_grad(self.G, False)
        requires_grad(self.D, True)
        loss = self.d_loss()
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        sync_grads(self.D)
        self.opt_d.step()
        stats["d"] = loss.detach()
        if cfg.r1_gamma > 0 and self.step % cfg.r1_every == 0:
            img, seg = self.real_batch()
            img.requires_grad_(True)
            seg.requires_grad_(True)
            out = self.D(*diff_augment(img, seg, cfg.augment))
            g_img, g_seg = torch.autograd.grad(out.sum(), [img, seg], create_graph=True)
            r1 = (g_img.pow(2).flatten(1).sum(1) + g_seg.pow(2).flatten(1).sum(1)).mean()
            self.opt_d.zero_grad(set_to_none=True)
            (cfg.r1_gamma / 2 * r1 * cfg.r1_every + 0 * out[0, 0]).backward()
            sync_grads(self.D)
            self.opt_d.step()
            stats["r1"] = r1.detach()
        # -- generator
        requires_grad(self.D, False)
        for p in self.trainable_g:
            p.requires_grad_(True)
        total, gan, col = self.g_loss()
        self.opt_g.zero_grad(set_to_none=True)
        total.backward()
        sync_grads(self.G)
        self.opt_g.step()
        stats["g"] = gan.detach()
        if self.g_ref is not None:
            stats["color"] = col.detach()
            stats["layout"] = self.last_layout.detach()
        if cfg.pl_weight > 0 and self.step % cfg.pl_every == 0:
            n = max(1, self.b // cfg.pl_batch_shrink)
            wp = self.latents_of(self.G, self.draw_latents(n))
            if not wp.requires_grad:                      # frozen mapping (avatar stage, freeze_local)
                wp = wp.detach().requires_grad_(True)
            img = self.G(wp)["image"]
            noise = torch.randn_like(img) / math.sqrt(img.shape[2] * img.shape[3])
            (grad,) = torch.autograd.grad((img * noise).sum(), wp, create_graph=True)
            path_len = grad.pow(2).sum(2).mean(1).sqrt()                     # [n]
            mean_now = path_len.detach().mean().reshape(1)
            all_reduce_mean_([mean_now])
            pl_mean = self.pl_mean + cfg.pl_decay * (mean_now[0] - self.pl_mean)
            pl = (path_len - pl_mean).pow(2).mean()
            self.opt_g.zero_grad(set_to_none=True)
            (cfg.pl_weight * cfg.pl_every * pl + 0 * img[0, 0, 0, 0]).backward()
            sync_grads(self.G)
            self.opt_g.step()
            self.pl_mean = pl_mean.detach()
            stats["pl"] = pl.detach()
        # -- EMA
        with torch.no_grad():
            for pe, p in zip(self.G_ema.parameters(), self.G.parameters()):
                pe.lerp_(p, 1 - self.ema_beta)
            for be, b in zip(self.G_ema.buffers(), self.G.buffers()):
                be.copy_(b)
        self.step += 1
        return stats

    # ---- state -------------------------------------------------------------------------------
    def modules(self) -> dict:
        return {"G": self.G, "G_ema": self.G_ema, "D": self.D}

    def optimizers(self) -> dict:
        return {"g": self.opt_g, "d": self.opt_d}

    def tensors(self) -> dict:
        return {"pl_mean": self.pl_mean.clone()}

    def load_tensors(self, t: dict):
        self.pl_mean = t["pl_mean"].to(self.device).clone()


# ============================================================================================
# The parser trainer
# ============================================================================================

class ParserTrainer:
    """The face parser's step. Cross-entropy on a U-Net is safe under float16 autocast: on CUDA the
    forward pass runs under it with a GradScaler (nothing changes on the CPU)."""

    def __init__(self, cfg: GANConfig, dataset, rank: int = 0, world: int = 1, device: torch.device | str = "cpu"):
        if cfg.parser_batch % world:
            raise UserError(f"parser batch {cfg.parser_batch} must divide among {world} processes")
        self.cfg, self.data, self.rank, self.world = cfg, dataset, rank, world
        self.b = cfg.parser_batch // world
        self.device = torch.device(device)
        torch.manual_seed(cfg.seed)
        self.net = FaceParser(cfg.parser_channels).to(self.device)
        broadcast_module(self.net)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.parser_lr)
        self.scaler = dev_mod.scaler(self.device)
        self.step = 0
        self.data_gen = torch.Generator().manual_seed(cfg.seed * 1000 + 17 + rank)
        torch.manual_seed(cfg.seed * 1000 + 7919 * (rank + 1))

    def batch(self):
        idx = torch.randint(len(self.data), (self.b,), generator=self.data_gen)
        flip = torch.rand(self.b, generator=self.data_gen) < 0.5
        img, parts = dev_mod.to(self.data.batch(idx), self.device)
        flip = flip.to(self.device)
        img = torch.where(flip[:, None, None, None], img.flip(3), img)
        parts = torch.where(flip[:, None, None], parts.flip(2), parts)
        # photometric jitter, so the parser also reads generated images
        dev = self.device
        img = img * (torch.rand(self.b, 1, 1, 1, device=dev) * 0.4 + 0.8) + \
            (torch.rand(self.b, 3, 1, 1, device=dev) - 0.5) * 0.2
        return img, parts

    def loss(self, img, parts):
        with dev_mod.amp(self.device):
            logits = self.net(img)
        return F.cross_entropy(logits.float(), parts)

    def train_step(self) -> dict:
        self.net.train()
        img, parts = dev_mod.to(self.batch(), self.device)     # (a subclass's batch may be on the CPU)
        loss = self.loss(img, parts)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.opt)                # average true gradients across ranks
        sync_grads(self.net)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.step += 1
        return {"ce": loss.detach()}

    def modules(self) -> dict:
        return {"parser": self.net}

    def optimizers(self) -> dict:
        return {"opt": self.opt}

    def tensors(self) -> dict:
        return {}

    def load_tensors(self, t: dict):
        pass


@torch.no_grad()
def evaluate_parser(net: FaceParser, dataset, batch: int = 64) -> dict:
    net.eval()
    dev = next(net.parameters()).device
    conf = torch.zeros(NUM_PARTS, NUM_PARTS, dtype=torch.long)
    for i in range(0, len(dataset), batch):
        img, parts = dataset.batch(range(i, min(i + batch, len(dataset))))
        conf += confusion(net(img.to(dev)).argmax(1).cpu(), parts)
    m, per = miou(conf)
    return {"miou": m, "per_part": per, "pixel_acc": float(conf.diag().sum() / conf.sum())}


# ============================================================================================
# Checkpoints
# ============================================================================================

def save_checkpoint(work: Path, trainer, cfg: GANConfig, stage: str, extra: dict | None = None,
                    keep: int | None = None) -> Path:
    """work/checkpoints/step_XXXXXXXX/ in the one checkpoint format (``training.common.checkpoint``: module
    weights, optim_<name>.pt, tensors.pt, rng_rank<r>.pt, state.json) plus meta.json (the stats a
    person reads); work/latest.json points at the newest. Rank 0 writes weights and state; each
    rank its RNG."""
    folder = work / "checkpoints" / f"step_{trainer.step:08d}"
    device = getattr(trainer, "device", torch.device("cpu"))
    rng = {**dev_mod.rng_state(device), "data": trainer.data_gen.get_state()}
    state = {"step": trainer.step, "stage": stage, "config": json.dumps(cfg.to_dict()),
             "fingerprint": cfg.fingerprint(), "world": trainer.world}
    opts = trainer.optimizers() if hasattr(trainer, "optimizers") else {}
    tensors = trainer.tensors() if hasattr(trainer, "tensors") else {}
    ckpt_mod.save(folder, state, trainer.modules(), opts, tensors, rng=rng, rank=trainer.rank)
    if trainer.rank != 0:
        return folder
    meta = {"stage": stage, "config": cfg.name, "fingerprint": cfg.fingerprint(), "step": trainer.step,
            "world": trainer.world, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **(extra or {})}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    tmp = work / ".latest.json.tmp"
    tmp.write_text(json.dumps({"step": trainer.step, "path": str(folder.relative_to(work))}))
    os.replace(tmp, work / "latest.json")
    if keep:
        old = sorted((work / "checkpoints").glob("step_*"))[:-keep]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
    return folder


def find_checkpoint(path) -> Path:
    """A checkpoint folder from itself or from a work dir (its latest.json)."""
    return ckpt_mod.find(path)


def read_state(folder: Path) -> dict:
    """A checkpoint's state: step, stage, config (JSON text), fingerprint, world."""
    return ckpt_mod.read_state(folder)


load_weights = ckpt_mod.load_weights


def check_config(state: dict, cfg: GANConfig, stage: str, folder: Path):
    saved = config_from_dict(json.loads(state["config"]))
    if state.get("stage") != stage:
        raise UserError(f"{folder}: a checkpoint of stage '{state.get('stage')}', not '{stage}'")
    if state["fingerprint"] != cfg.fingerprint():
        diff = sorted(k for k, v in cfg.to_dict().items()
                      if k not in SCHEDULE_FIELDS and saved.to_dict().get(k) != v)
        raise UserError(f"{folder}: checkpoint of config '{saved.name}' (fingerprint {state['fingerprint']}) "
                        f"cannot resume config '{cfg.name}' ({cfg.fingerprint()}); differing: "
                        f"{', '.join(diff)}. Use --config {saved.name} or another --work.")


def load_checkpoint(folder: Path, trainer, cfg: GANConfig, stage: str):
    """Resume ``trainer`` from ``folder`` onto its device (a checkpoint written on any device)."""
    st = read_state(folder)
    check_config(st, cfg, stage, folder)
    if int(st.get("world", 1)) != trainer.world:
        raise UserError(f"{folder}: written by {st.get('world')} process(es); resume with the same number "
                        f"(now {trainer.world}) to continue the same run")
    st, tensors = ckpt_mod.load(folder, trainer.modules(), trainer.optimizers(), trainer.device)
    trainer.step = int(st["step"])
    trainer.load_tensors(tensors)
    rng = ckpt_mod.read_rng(folder, trainer.rank)
    dev_mod.set_rng_state(rng, trainer.device)
    trainer.data_gen.set_state(rng["data"])


def load_generator(path, cfg: GANConfig | None = None, which: str = "G_ema",
                   device=None) -> tuple[Generator, GANConfig]:
    """A generator from a real/avatar checkpoint folder or work dir (EMA weights by default), on
    ``device`` (default the CPU) whatever device it trained on."""
    folder = find_checkpoint(path)
    st = read_state(folder)
    saved = config_from_dict(json.loads(st["config"]))
    G = Generator(cfg or saved).to(device or "cpu")
    load_weights(G, folder / f"{which}.safetensors", f"the generator of config '{(cfg or saved).name}'")
    return G.eval(), saved


SHIP_MODULES = {"real": ("G_ema", "D"), "parser": ("parser",)}


def export_for_shipping(run, out, licence: str) -> Path:
    """The weights a retrain starts from, without optimiser state: G_ema and D of a real-stage run
    (G_avatar initialises both from them) or a parser run's weights, a slim state.json (stage,
    config, step) and a README with the licence. ``out`` is a checkpoint folder itself."""
    folder = find_checkpoint(run)
    st = read_state(folder)
    stage = st.get("stage")
    if stage not in SHIP_MODULES:
        raise UserError(f"{folder}: a '{stage}' checkpoint; only real and parser runs are shipped")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in SHIP_MODULES[stage]:
        shutil.copyfile(folder / f"{name}.safetensors", out / f"{name}.safetensors")
    slim = {k: st[k] for k in ("stage", "config", "fingerprint", "step", "world") if k in st}
    ckpt_mod.save(out, slim)
    cfg = config_from_dict(json.loads(st["config"]))
    (out / "README.md").write_text(
        f"# {stage} weights, config '{cfg.name}' ({cfg.resolution} px), step {st.get('step')}\n\n"
        f"Exported from `{folder.name}` by `likeness train export-gan`. `likeness retrain --config "
        f"{cfg.name}` starts from these instead of training the {stage} stage.\n\n{licence}\n")
    return out


def load_frozen_real(avatar_run) -> Generator:
    """The G_real an avatar run was transfer-learned from (the copy in its work dir): the twin
    whose latents mean the same face as G_avatar's, so paired data must use this one."""
    folder = find_checkpoint(avatar_run)
    saved = config_from_dict(json.loads(read_state(folder)["config"]))
    for ref in (folder / "G_real.safetensors", folder.parent.parent / "G_real.safetensors"):
        if ref.is_file():
            G = Generator(saved)
            load_weights(G, ref, "the frozen G_real of the avatar run")
            return G.eval()
    raise UserError(f"{avatar_run}: no frozen G_real (G_real.safetensors) beside the avatar checkpoint")


def load_parser(path, device=None) -> tuple[FaceParser, GANConfig]:
    """A parser run's face parser and its GAN config (``face_parser.load_parser`` does the loading)."""
    from ..readout.face_parser import load_parser as load
    net, info = load(find_checkpoint(path), device)
    return net, config_from_dict(json.loads(read_state(info["folder"])["config"]))


# ============================================================================================
# Sample grids
# ============================================================================================

def to_uint8(img: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8"""
    return ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def sample_grid(gens: list[Generator], n: int = 8, seed: int = 0, truncation: float = 1.0) -> np.ndarray:
    """Rows of shared z: for each generator, image | colourised segmentation."""
    from ...backend.visual import grid
    dev = next(gens[0].parameters()).device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [], device_type=dev.type):
        torch.manual_seed(seed)
        z = torch.randn(n, gens[0].cfg.z_dim).to(dev)
        outs = [{k: v.cpu() for k, v in G.eval().sample(z).items() if k in ("image", "seg")} for G in gens]
    tiles = []
    for i in range(n):
        for o in outs:
            tiles.append(to_uint8(o["image"][i:i + 1])[0])
            tiles.append(colorize_parts(o["seg"][i].argmax(0).byte().numpy()))
    return grid(tiles, columns=2 * len(gens))


def save_png(arr: np.ndarray, path: Path):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


# ============================================================================================
# The run
# ============================================================================================

def default_work_dir(stage: str, cfg: GANConfig) -> Path:
    return data_mod.cache_root() / "runs" / f"{stage}_{cfg.name}"


def train(stage: str, config="tiny", data=None, work_dir=None, steps: int | None = None,
          resume: bool | str = False, init=None, overrides: dict | None = None, log=None,
          dataset=None, parser_trainer: type | None = None, device="cpu") -> dict:
    """Train one stage; returns a summary dict (step, work dir, last checkpoint, last stats).

    stage: real | avatar | parser. config: a name or GANConfig; ``overrides`` replace its fields.
    data: dataset folder (real: 1k layout or CelebAMask-HQ release, default the shared faces; avatar: an
    engine dataset, required). work_dir: checkpoints, samples and log (default cache/runs/<stage>_<cfg>).
    steps: total steps of the run (default the config's). resume: continue from work_dir's latest
    checkpoint (or from the given checkpoint path). init: avatar stage, the real stage's work dir/checkpoint.
    dataset: an already opened SegDataset (tests, metrics), instead of ``data``.
    parser_trainer: parser stage, a ``ParserTrainer`` subclass with other augmentation (the backend's
    photo parser must not see colour jitter: colours are what it measures).
    device: auto | cpu | cuda (``training.common.device.resolve``; under torchrun each rank its LOCAL_RANK GPU).
    """
    if stage not in STAGES:
        raise UserError(f"unknown stage '{stage}' ({', '.join(STAGES)})")
    cfg = get_config(config)
    if overrides:
        try:
            cfg = cfg.replace(**overrides)
        except TypeError as e:
            raise UserError(f"bad config override: {e}") from None
    if steps is not None:
        cfg = cfg.replace(steps=int(steps)) if stage != "parser" else cfg.replace(parser_steps=int(steps))
    total = cfg.parser_steps if stage == "parser" else cfg.steps
    device = dev_mod.resolve(device)
    rank, world = dist_setup(device)
    torch.set_flush_denormal(True)                       # denormals slow CPU kernels by orders of magnitude
    work = Path(work_dir).expanduser() if work_dir else default_work_dir(stage, cfg)
    say = _logger(work, rank, log)

    # ---- data
    if dataset is None:
        if stage == "avatar" and data is None:
            raise UserError("the avatar stage needs --data: an engine dataset folder (likeness render --out)")
        if data is not None:
            kind = data_mod.detect_kind(data)
            if (stage == "avatar") != (kind == "avatar"):
                raise UserError(f"{data}: a {kind} dataset cannot train stage '{stage}'")
        dataset = data_mod.open_dataset(data, cfg.resolution, split="train")
    if dataset.resolution != cfg.resolution:
        raise UserError(f"dataset resolution {dataset.resolution} differs from config '{cfg.name}' "
                        f"({cfg.resolution} px)")
    data_mod.check_parts(dataset)

    # ---- trainer, init, resume
    latest_exists = (work / "latest.json").is_file()
    if latest_exists and not resume:
        raise UserError(f"{work} already holds a run; pass --resume to continue it or choose another --work")
    if stage == "parser":
        trainer = (parser_trainer or ParserTrainer)(cfg, dataset, rank, world, device)
    else:
        g_ref = None
        if stage == "avatar":
            g_ref = _avatar_reference(work, init, cfg, resume)
        trainer = GANTrainer(cfg, dataset, stage, g_ref, rank, world, device)
        if stage == "avatar" and not (resume and latest_exists):
            _init_avatar(trainer, init, cfg)
    if resume:
        folder = find_checkpoint(work if resume is True else resume)
        load_checkpoint(folder, trainer, cfg, stage)
        say(f"resumed {stage}/{cfg.name} from {folder} at step {trainer.step}")
    if rank == 0:
        work.mkdir(parents=True, exist_ok=True)
        (work / "config.json").write_text(json.dumps({"stage": stage, **cfg.to_dict()}, indent=1))
    say(f"{stage} stage, config {cfg.name} ({cfg.resolution} px, batch {cfg.batch}, {world} process(es)), "
        f"{len(dataset)} training samples from {dataset.source}; work dir {work}; device "
        f"{dev_mod.describe(device)}")

    val = None
    if stage == "parser":
        val = data_mod.open_dataset(data, cfg.resolution, split="val") if data is None or \
            data_mod.detect_kind(data) != "avatar" else None

    # ---- loop (training.common.trainer): this module keeps the steps, checkpoints and sample grids
    def save(t: Trainer) -> Path:
        extra = {"stats": t.stats}
        if stage == "parser" and val is not None and rank == 0:
            ev = evaluate_parser(trainer.net, val)
            extra["val"] = ev
            say(f"parser validation mIoU {ev['miou']:.4f}, pixel accuracy {ev['pixel_acc']:.4f}")
        if world > 1:
            import torch.distributed as dist
            dist.barrier()
        folder = save_checkpoint(work, trainer, cfg, stage, extra, cfg.keep_ckpts)
        if world > 1:
            import torch.distributed as dist
            dist.barrier()
        say(f"checkpoint step {trainer.step} -> {folder}")
        return folder

    def reduce(stats: dict, stop: bool):
        keys = sorted(stats)
        vec = torch.tensor([stats[k] for k in keys] + [float(stop)], dtype=torch.float32, device=device)
        all_reduce_mean_([vec])
        vec = vec.tolist()
        return dict(zip(keys, vec[:-1])), vec[-1] > 0

    def after_step(step: int, stats: dict):
        if stage != "parser" and (step % cfg.sample_every == 0 or step == total) and rank == 0:
            gens = [trainer.g_ref, trainer.G_ema] if trainer.g_ref is not None else [trainer.G_ema]
            save_png(sample_grid(gens), work / "samples" / f"step_{step:08d}.png")

    def diverged(step: int, stats: dict):
        if rank == 0:
            (work / "diverged.json").write_text(json.dumps({"step": step, "stats": stats}))

    state = {"step": trainer.step}
    loop = Trainer(stage, work, state, device=device, total=total, checkpoint_every=cfg.ckpt_every,
                   log=say, progress=False, step_key="step",
                   images_per_step=cfg.parser_batch if stage == "parser" else cfg.batch,
                   log_every=cfg.log_every, save=save, reduce=reduce, rank=rank, on_diverged=diverged,
                   diverged_hint="lower the learning rate (--set lr_g=... lr_d=...) or raise r1_gamma")
    result = loop.run(lambda t: trainer.train_step(), after_step=after_step)
    last_ckpt, stats, stopped = loop.last_checkpoint, loop.stats, result == "stopped"
    if world > 1:
        _check_replicas(trainer)
    return {"stage": stage, "config": cfg.name, "step": trainer.step, "work_dir": str(work),
            "checkpoint": str(last_ckpt) if last_ckpt else None, "stats": stats, "stopped": stopped,
            "trainer": trainer}


def _latest_str(work: Path) -> str:
    try:
        return str(find_checkpoint(work))
    except UserError:
        return "none"


def _avatar_reference(work: Path, init, cfg: GANConfig, resume) -> Generator:
    """The frozen G_real of the avatar stage: a copy kept in the work dir (so a resume needs no --init)."""
    ref_path = work / "G_real.safetensors"
    if resume and ref_path.is_file():
        G = Generator(cfg)
        load_weights(G, ref_path, "G_real")
        return G
    if init is None:
        raise UserError("the avatar stage needs --init: the real stage's work dir or checkpoint")
    folder = find_checkpoint(init)
    st = read_state(folder)
    if st.get("stage") != "real":
        raise UserError(f"{folder}: --init must be a checkpoint of the real stage, not '{st.get('stage')}'")
    G = Generator(cfg)
    load_weights(G, folder / "G_ema.safetensors",
                 f"config '{cfg.name}' (the init checkpoint is config '{json.loads(st['config'])['name']}')")
    if int(os.environ.get("RANK", "0")) == 0:
        work.mkdir(parents=True, exist_ok=True)
        ckpt_mod.save_weights(G, ref_path)
        (work / "init.json").write_text(json.dumps({"init": str(folder), "step": st["step"]}))
    return G


def _init_avatar(trainer: GANTrainer, init, cfg: GANConfig):
    folder = find_checkpoint(init)
    for name, file in (("G", "G_ema"), ("G_ema", "G_ema"), ("D", "D")):
        load_weights(trainer.modules()[name], folder / f"{file}.safetensors", f"{name} of config '{cfg.name}'")


def _check_replicas(trainer):
    """All ranks must hold identical weights (gradients are averaged); a cheap checksum proves it."""
    import torch.distributed as dist
    mods = trainer.modules()
    s = torch.stack([sum(p.detach().double().sum() for p in m.parameters()) for m in mods.values()])
    lo, hi = s.clone(), s.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError("DDP replicas diverged: parameters differ across ranks")


def _logger(work: Path, rank: int, log):
    def say(msg: str):
        if rank != 0:
            return
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        if log is not None:
            log(line)
        else:
            print(line, flush=True)
        try:
            work.mkdir(parents=True, exist_ok=True)
            with open(work / "log.txt", "a") as f:
                f.write(line + "\n")
        except OSError:
            pass
    return say


# ============================================================================================
# CLI
# ============================================================================================

def parse_overrides(items) -> dict:
    """["lambda_color=0", "freeze_local=true", "batch=8"] -> typed dict using GANConfig's field types."""
    from ..common.presets import parse_set
    return parse_set(get_config("tiny"), items)


CELEBAMASK_LICENCE = ("**Licence:** trained on CelebAMask-HQ photos (the 744 TRAIN faces of "
                      "../shared/data/celebamask-hq-1k): non-commercial research use only.")


def cli_export(args) -> int:
    """Handler of ``likeness train export-gan --from RUN --out DIR``."""
    out = export_for_shipping(args.source, args.out, CELEBAMASK_LICENCE)
    print(json.dumps({"out": str(out), "bytes": sum(p.stat().st_size for p in out.iterdir())}))
    return 0


def cli_train(args) -> int:
    """Handler of ``likeness train gan``: args.stage, .config, .data, .work, .steps, .resume, .init
    (optionally .set: FIELD=VALUE overrides, .threads: torch CPU threads)."""
    threads = getattr(args, "threads", None)
    if threads:
        torch.set_num_threads(int(threads))
    summary = train(getattr(args, "stage", "real"), getattr(args, "config", "tiny") or "tiny",
                    data=getattr(args, "data", None), work_dir=getattr(args, "work", None),
                    steps=getattr(args, "steps", None), resume=getattr(args, "resume", False) or False,
                    init=getattr(args, "init", None), overrides=parse_overrides(getattr(args, "set", None)),
                    device=getattr(args, "device", None) or "auto")
    if int(os.environ.get("RANK", "0")) == 0:
        summary.pop("trainer", None)
        print(json.dumps(summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m likeness.training.generators.train_gan",
                                 description="train G_real, G_avatar or the face parser")
    ap.add_argument("--stage", choices=STAGES, default="real")
    ap.add_argument("--config", default="tiny", help="tiny, cpu, small or paper")
    ap.add_argument("--data", help="dataset folder (real: default the shared faces; avatar: required)")
    ap.add_argument("--work", help="work dir (default ~/.cache/likeness/runs/<stage>_<config>)")
    ap.add_argument("--steps", type=int, help="total steps (default: the config's)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --work")
    ap.add_argument("--init", help="avatar stage: the real stage's work dir or checkpoint")
    ap.add_argument("--set", nargs="*", metavar="FIELD=VALUE", help="override config fields")
    ap.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy shared CPU)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: each rank's CUDA GPU (LOCAL_RANK) when PyTorch sees one, else the CPU")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return cli_train(args)
    except UserError as e:
        print(f"train_gan: error: {e}", file=sys.stderr)
        return 1
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            try:                # ranks leave together: gloo aborts a rank whose peer already left
                dist.barrier()
            except RuntimeError:
                pass
            dist.destroy_process_group()


if __name__ == "__main__":
    code = main()
    if os.environ.get("WORLD_SIZE", "1") != "1":
        # a torchrun rank: everything is written and the process group destroyed; leave without
        # the interpreter's teardown, where gloo's threads can abort a rank whose peer already left
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
