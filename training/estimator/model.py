"""The avatar estimator: aligned face -> avatar vector (SwiftAvatar section "Avatar estimator").

ResNet-18 backbone (torchvision's architecture, so ImageNet weights load from a local file when a
user has them), one MLP head for the continuous block (sigmoid, L1 loss) and one MLP head per
discrete slot (symmetric cross-entropy, robust to the label noise that generation and semantic
augmentation introduce). Loss = λc·L1 + λd·Σ_slots SCE.

Training data are paired sets (``paired_set.PairedSet``: memory-mapped aligned faces with their
continuous and discrete labels; the format is documented there).

Optional second source (``EstimatorConfig.real_fraction`` > 0): real TRAIN photos with partial
labels from their parsing masks (``training.estimator.real_labels``: presence of glasses / headwear /
earrings / fringe, hair-length rank, calibrated colour parameters) make up that share of every
batch and add ``real_loss`` (BCE on P(tag is not none), ordinal BCE on the hair-length groups, L1
on the colour parameters, each masked by validity) to the synthetic pairs' loss.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...backend.errors import UserError
from ...backend.schema import Pack
from .paired_set import UNKNOWN, PairedSet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EstimatorConfig:
    name: str
    input_size: int = 128
    batch: int = 64
    epochs: int = 30
    lr: float = 1e-3
    lr_halve_every: int = 10          # epochs
    lambda_c: float = 1.0
    lambda_d: float = 10.0
    sce_alpha: float = 0.1            # SCE = α·CE + β·RCE (Wang et al., ICCV 2019)
    sce_beta: float = 1.0
    sce_log_floor: float = -4.0       # log 0 is clipped to A = -4 in the reverse term
    head_hidden: int = 256
    augment: bool = True
    val_fraction: float = 0.05
    checkpoint_every: int = 200       # iterations
    seed: int = 0
    # Auxiliary real photos (training/estimator/real_labels.py): this share of every batch is real TRAIN
    # photos with partial labels from their masks; 0 = synthetic pairs only (the plain run).
    real_fraction: float = 0.0
    lambda_real: float = 10.0         # presence BCE + hair-length ordinal terms
    lambda_real_colour: float = 10.0  # L1 on the calibrated colour parameters
    lambda_real_shape: float = 2.0    # Huber on the shape surrogate's measures (in render sds)
    real_balance: bool = True         # class-balanced presence BCE (the targets are balanced acc.)
    real_held_out: float = 0.1        # real training photos kept aside to monitor the terms
    # Synthetic images per epoch (None: the whole paired set). Fixes the budget in images, so
    # ablation rows whose paired sets differ in size (augmented or not) train equally long.
    epoch_images: int | None = None
    # Share of the synthetic part of every batch drawn from the engine's own renders beside the
    # realistic pairs (``train_estimator(renders=...)``; 0 = the pairs alone, the paper). Renders
    # carry exact labels a domain away; pairs carry the photo domain with the twins' label noise.
    render_share: float = 0.0


CONFIGS = {
    "tiny": EstimatorConfig("tiny", input_size=64, batch=16, epochs=2, lr_halve_every=1,
                            head_hidden=64, checkpoint_every=10, val_fraction=0.2),
    "cpu": EstimatorConfig("cpu", input_size=128, batch=64, epochs=24, lr_halve_every=8),
    "small": EstimatorConfig("small", input_size=160, batch=128, epochs=40, lr_halve_every=12),
    "paper": EstimatorConfig("paper", input_size=224, batch=256, epochs=100, lr_halve_every=30),
}


def get_config(name: str, **overrides) -> EstimatorConfig:
    if name not in CONFIGS:
        raise UserError(f"unknown estimator config '{name}' ({', '.join(CONFIGS)})")
    return replace(CONFIGS[name], **{k: v for k, v in overrides.items() if v is not None})


# ---- model -----------------------------------------------------------------------------------

def mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, n_out))


class Estimator(nn.Module):
    """x: [B, 3, S, S] normalised RGB -> (continuous [B, C] in [0, 1], [logits [B, n_k] per slot])."""

    def __init__(self, n_continuous: int, slot_sizes: tuple[int, ...], hidden: int = 256,
                 pretrained: str | os.PathLike | None = None):
        super().__init__()
        from ..common.resnet import resnet18
        self.backbone = resnet18()
        if pretrained:
            from ..common.resnet import load_pretrained
            load_pretrained(self.backbone, pretrained)
        features = self.backbone.fc.in_features                        # 512
        self.backbone.fc = nn.Identity()
        self.continuous_head = mlp(features, hidden, n_continuous)
        self.slot_heads = nn.ModuleList(mlp(features, hidden, k) for k in slot_sizes)

    def forward(self, x: torch.Tensor):
        f = self.backbone(x)                                           # [B, 512]
        return torch.sigmoid(self.continuous_head(f)), [h(f) for h in self.slot_heads]


def symmetric_cross_entropy(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.1,
                            beta: float = 1.0, log_floor: float = -4.0) -> torch.Tensor:
    """α·CE(y, p) + β·RCE, RCE = -Σ_k p_k log y_k with log 0 := A, i.e. -A·(1 - p_target).
    Targets ``UNKNOWN`` (a label the pair check found the face contradicts) are left out."""
    known = target != UNKNOWN
    if not bool(known.all()):
        if not bool(known.any()):
            return logits.sum() * 0.0
        logits, target = logits[known], target[known]
    ce = F.cross_entropy(logits, target)
    p_target = torch.softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
    rce = (-log_floor * (1.0 - p_target)).mean()
    return alpha * ce + beta * rce


def estimator_loss(pred, continuous, discrete, cfg: EstimatorConfig):
    cont_pred, logits = pred
    l1 = F.l1_loss(cont_pred, continuous)
    sce = sum(symmetric_cross_entropy(lg, discrete[:, k], cfg.sce_alpha, cfg.sce_beta, cfg.sce_log_floor)
              for k, lg in enumerate(logits))
    return cfg.lambda_c * l1 + cfg.lambda_d * sce, {"l1": float(l1.detach()), "sce": float(sce.detach())}


# ---- auxiliary loss on real photos with partial labels ---------------------------------------

def _log_group_prob(logits: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """log Σ_{k in members} softmax(logits)_k, stable (logsumexp); members: bool [n_options]."""
    masked = logits.masked_fill(~members[None, :], float("-inf"))
    return torch.logsumexp(masked, dim=1) - torch.logsumexp(logits, dim=1)


def _bce_from_logs(log_p: torch.Tensor, log_q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy from log P(yes) and log P(no) (= log(1 - P(yes)), computed apart)."""
    floor = math.log(1e-6)
    return -(y * log_p.clamp(min=floor) + (1 - y) * log_q.clamp(min=floor))


class RealBatches:
    """Real photos with partial labels (``training.estimator.real_labels.RealLabels``) as torch batches, and
    how the labels meet the estimator's outputs for ``pack`` (``real_labels.loss_spec``)."""

    def __init__(self, labels, pack: Pack, balance: bool = True, rows: np.ndarray | None = None):
        from .real_labels import loss_spec
        self.labels = labels
        spec = loss_spec(pack, labels.colour_params)
        names = tuple(p[0] for p in spec["presence"])
        if names != tuple(labels.presence_names):
            raise UserError(f"real labels measure {labels.presence_names}, pack '{pack.id}' has "
                            f"presence slots for {names}: rebuild the labels for this pack")
        self.presence = [(k, torch.from_numpy(m)) for _, k, m in spec["presence"]]
        self.hair = None
        self.hair_ranks = None
        if spec["hair"] is not None:
            k, ranks = spec["hair"]
            self.hair_ranks = ranks
            n_cut = labels.hair_cum.shape[1]
            self.hair = (k, torch.stack([torch.from_numpy(ranks > c) for c in range(n_cut)]))
        self.colour_index = torch.from_numpy(spec["colour_index"])
        # shape surrogate (real_labels.shape_surrogate): features [cont | probs | 1] -> measures
        sur = labels.info.get("shape_surrogate") if len(labels.shape_names) else None
        self.shape_w = self.shape_sd = None
        if sur:
            self.shape_w = torch.tensor(sur["weights"], dtype=torch.float32)        # [F, M]
            self.shape_sd = torch.tensor(sur["sd"], dtype=torch.float32)            # [M]
            n_feat = pack.n_continuous + sum(pack.slot_sizes) + 1
            if self.shape_w.shape[0] != n_feat:
                raise UserError(f"the shape surrogate has {self.shape_w.shape[0]} inputs, pack "
                                f"'{pack.id}' makes {n_feat}: rebuild the labels for this pack")
        pos = labels.positive_fraction(rows)
        if balance:   # each class weighs half; a rare class is capped at 10x
            w_pos = np.clip(0.5 / np.maximum(pos, 1e-3), 0.0, 10.0)
            w_neg = np.clip(0.5 / np.maximum(1 - pos, 1e-3), 0.0, 10.0)
        else:
            w_pos = w_neg = np.ones_like(pos)
        self.w_pos = torch.tensor(w_pos, dtype=torch.float32)
        self.w_neg = torch.tensor(w_neg, dtype=torch.float32)
        L = labels
        self.arrays = {
            "presence": torch.from_numpy(np.asarray(L.presence, np.float32)),
            "presence_valid": torch.from_numpy(np.asarray(L.presence_valid, bool)),
            "hair_cum": torch.from_numpy(np.asarray(L.hair_cum, np.float32)),
            "hair_valid": torch.from_numpy(np.asarray(L.hair_valid, bool)),
            "colour_target": torch.from_numpy(np.asarray(L.colour_target, np.float32)),
            "colour_valid": torch.from_numpy(np.asarray(L.colour_valid, bool)),
            "shape_target": torch.from_numpy(np.asarray(L.shape_target, np.float32)),
            "shape_valid": torch.from_numpy(np.asarray(L.shape_valid, bool)),
        }

    def __len__(self):
        return len(self.labels)

    def to(self, device: torch.device) -> "RealBatches":
        """The loss's tensors (option masks, weights, the shape surrogate) onto ``device``; batches
        stay on the CPU until the training loop moves them."""
        from ..common.device import to
        self.presence = [(k, m.to(device)) for k, m in self.presence]
        if self.hair is not None:
            self.hair = (self.hair[0], self.hair[1].to(device))
        self.colour_index, self.w_pos, self.w_neg = to((self.colour_index, self.w_pos, self.w_neg), device)
        if self.shape_w is not None:
            self.shape_w, self.shape_sd = to((self.shape_w, self.shape_sd), device)
        return self

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, dict]:
        idx = np.sort(np.asarray(idx))
        imgs = torch.from_numpy(np.ascontiguousarray(self.labels.images[idx]))
        t = torch.from_numpy(idx)
        return imgs, {k: v[t] for k, v in self.arrays.items()}


def real_loss(pred, target: dict, real: RealBatches, cfg: EstimatorConfig):
    """Loss of estimator outputs on real photos with partial labels, each term over its valid
    labels only:

    * presence: BCE on P(tag is not none) = the summed softmax of the slot's non-none options
      (class-balanced with ``cfg.real_balance``), summed over the measures;
    * hair length: ordinal BCE on P(rank > k) = the summed softmax of the hair slot's options of
      rank > k, against the soft targets ``hair_cum`` (mean over the cut points);
    * colours: L1 between the continuous outputs of the colour parameters and their calibrated
      targets (normalised units);
    * shape: Huber between the shape surrogate's measures of [continuous | option
      probabilities] and the photo's target measures, in units of the renders' spread.
    Total = λ_real·(presence + hair) + λ_real_colour·colour + λ_real_shape·shape."""
    cont_pred, logits = pred
    zero = cont_pred.sum() * 0.0
    pres = zero
    for j, (k, members) in enumerate(real.presence):
        valid = target["presence_valid"][:, j]
        if not bool(valid.any()):
            continue
        lg = logits[k]
        y = target["presence"][:, j]
        l = _bce_from_logs(_log_group_prob(lg, members), _log_group_prob(lg, ~members), y)
        w = torch.where(y > 0.5, real.w_pos[j], real.w_neg[j]) * valid
        pres = pres + (w * l).sum() / valid.sum()
    hair = zero
    if real.hair is not None:
        k, above = real.hair
        valid = target["hair_valid"]
        if bool(valid.any()):
            lg = logits[k]
            terms = [_bce_from_logs(_log_group_prob(lg, above[c]), _log_group_prob(lg, ~above[c]),
                                    target["hair_cum"][:, c]) for c in range(above.shape[0])]
            hair = (torch.stack(terms, 1).mean(1) * valid).sum() / valid.sum()
    colour = zero
    cv = target["colour_valid"]
    if len(real.colour_index) and bool(cv.any()):
        diff = (cont_pred[:, real.colour_index] - target["colour_target"]).abs()
        colour = (diff * cv).sum() / cv.sum()
    shape = zero
    if real.shape_w is not None and bool(target["shape_valid"].any()):
        sv = target["shape_valid"]
        feats = torch.cat([cont_pred, *[torch.softmax(lg, 1) for lg in logits],
                           torch.ones_like(cont_pred[:, :1])], 1)
        diff = (feats @ real.shape_w - target["shape_target"]) / real.shape_sd
        shape = (nn.functional.smooth_l1_loss(diff, torch.zeros_like(diff), reduction="none") * sv).sum() / sv.sum()
    total = (cfg.lambda_real * (pres + hair) + cfg.lambda_real_colour * colour
             + cfg.lambda_real_shape * shape)
    return total, {"real_presence": float(pres.detach()), "real_hair": float(hair.detach()),
                   "real_colour": float(colour.detach()), "real_shape": float(shape.detach())}


@torch.no_grad()
def evaluate_real(model: "Estimator", real: RealBatches, rows: np.ndarray, cfg: EstimatorConfig,
                  pack: Pack) -> dict:
    """On real photos aside from training (never the validation split): presence balanced
    accuracy of the argmax option's tag (as ``backend.predict`` decodes), colour MAE in
    normalised units, Spearman of the argmax option's hair-length rank vs the hair fraction."""
    from ...backend.fidelity import balanced_accuracy, spearman
    model.eval()
    L = real.labels
    pres_pred = {j: [] for j in range(len(real.presence))}
    hair_rank, cont, shape_pred = [], [], []
    for start in range(0, len(rows), 64):
        r = np.sort(rows[start:start + 64])
        imgs, _ = real.batch(r)
        cp, logits = model(prepare_batch(imgs.to(_device_of(model)), cfg.input_size, augment=False))
        cont.append(cp.float().cpu().numpy())
        for j, (k, members) in enumerate(real.presence):
            pres_pred[j] += members[logits[k].argmax(1)].tolist()
        if real.hair is not None:
            hair_rank += real.hair_ranks[logits[real.hair[0]].argmax(1).cpu().numpy()].tolist()
        if real.shape_w is not None:     # the surrogate's measures of the decoded (argmax) vector
            onehot = [nn.functional.one_hot(lg.argmax(1), lg.shape[1]).float() for lg in logits]
            feats = torch.cat([cp, *onehot, torch.ones_like(cp[:, :1])], 1)
            shape_pred.append((feats @ real.shape_w).cpu().numpy())
    model.train()
    rows = np.sort(rows)
    out: dict = {"n": int(len(rows)), "presence": {}, "colour_mae": {}}
    for j, name in enumerate(L.presence_names):
        truth = [bool(t) if v else None for t, v in zip(L.presence[rows, j], L.presence_valid[rows, j])]
        out["presence"][name] = balanced_accuracy(truth, pres_pred[j])["value"]
    cont = np.concatenate(cont) if cont else np.zeros((0, pack.n_continuous))
    for j, name in enumerate(L.colour_params):
        v = L.colour_valid[rows, j]
        col = int(real.colour_index[j])
        out["colour_mae"][name] = (float(np.abs(cont[v, col] - L.colour_target[rows[v], j]).mean())
                                   if v.any() else None)
    if shape_pred:
        sp = np.concatenate(shape_pred)
        out["shape_spearman"] = {
            name: spearman([float(t) if ok else None for t, ok in
                            zip(L.shape_target[rows, j], L.shape_valid[rows, j])],
                           sp[:, j].tolist())["value"]
            for j, name in enumerate(L.shape_names)}
    if hair_rank:
        hv = L.hair_valid[rows]
        out["hair_length_spearman"] = spearman(
            [float(f) if ok else None for f, ok in zip(L.hair_fraction[rows], hv)], hair_rank)["value"]
    return out


# ---- data ------------------------------------------------------------------------------------

def prepare_batch(images_uint8: torch.Tensor, size: int, augment: bool,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> normalised float [B, 3, size, size], with batched augmentation:
    small random scale/shift/rotation (alignment noise of real selfies) and colour jitter."""
    x = images_uint8.permute(0, 3, 1, 2).float().div_(255.0)
    b, dev = x.shape[0], x.device

    def rand(*shape):       # drawn on the CPU generator, so every device sees the same augmentation
        return torch.rand(*shape, generator=generator).to(dev)

    if augment:
        angle = (rand(b) - 0.5) * math.radians(12)
        scale = 1.0 + (rand(b) - 0.5) * 0.16
        shift = (rand(b, 2) - 0.5) * 0.12
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                             torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
        if x.shape[-1] > 2 * size:   # pre-shrink so bilinear sampling does not alias
            x = F.interpolate(x, size=2 * size, mode="bilinear", antialias=True, align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        bright = 1.0 + (rand(b, 1, 1, 1) - 0.5) * 0.4
        contrast = 1.0 + (rand(b, 1, 1, 1) - 0.5) * 0.4
        sat = 1.0 + (rand(b, 1, 1, 1) - 0.5) * 0.4
        gain = 1.0 + (rand(b, 3, 1, 1) - 0.5) * 0.1    # white-balance drift
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * contrast + mean
        grey = x.mean(dim=1, keepdim=True)
        x = ((x - grey) * sat + grey) * bright * gain
        x = x.clamp_(0.0, 1.0)
    elif x.shape[-1] != size:
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
    return (x - mean) / std


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---- training --------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: Estimator, data: PairedSet, idx: np.ndarray, cfg: EstimatorConfig,
             pack: Pack) -> dict:
    """Per-slot accuracy and continuous L1 on held-out pairs."""
    model.eval()
    correct = np.zeros(len(pack.slots))
    known = np.zeros(len(pack.slots))
    l1_sum, n = 0.0, 0
    for start in range(0, len(idx), 128):
        imgs, cont, disc = data.batch(idx[start:start + 128])
        cp, logits = model(prepare_batch(imgs.to(_device_of(model)), cfg.input_size, augment=False))
        cp, logits = cp.float().cpu(), [lg.cpu() for lg in logits]
        l1_sum += float((cp - cont).abs().mean(dim=1).sum())
        for k, lg in enumerate(logits):
            correct[k] += float((lg.argmax(1) == disc[:, k]).sum())
            known[k] += float((disc[:, k] != UNKNOWN).sum())
        n += len(imgs)
    model.train()
    acc = correct / np.maximum(known, 1)
    return {"n": n, "continuous_l1": l1_sum / max(n, 1),
            "slot_accuracy": {s.name: float(acc[k]) for k, s in enumerate(pack.slots)},
            "mean_slot_accuracy": float(acc.mean())}


def _share(n: int, fraction: float) -> int:
    """round(n * fraction), at least 1 when fraction > 0 and at most n - 1."""
    if fraction <= 0:
        return 0
    return min(max(int(round(n * fraction)), 1), n - 1)


def batch_split(cfg: EstimatorConfig) -> tuple[int, int]:
    """(synthetic, real) images per batch."""
    n_real = _share(cfg.batch, cfg.real_fraction)
    return cfg.batch - n_real, n_real


def _real_summary(r: dict) -> str:
    def f(v):
        return "n/a" if v is None else f"{v:.2f}"
    pres = " ".join(f"{k} {f(v)}" for k, v in r["presence"].items())
    mae = " ".join(f"{k} {f(v)}" for k, v in r["colour_mae"].items())
    return (f"; real held-out ({r['n']}): bal. acc. {pres}; colour MAE {mae}; "
            f"hair-length Spearman {f(r.get('hair_length_spearman'))}")


def _same_real_labels(saved: dict, now: dict) -> bool:
    """A checkpoint resumes on the same labels: the same content when both name it (checkpoints
    from before content digests compare the labels' provenance key)."""
    if saved.get("content") and now.get("content"):
        return saved["content"] == now["content"]
    return saved.get("key") == now.get("key")


def train_estimator(pack: Pack, paired: str | os.PathLike, work: str | os.PathLike,
                    cfg: EstimatorConfig, pretrained: str | None = None, progress: bool = True,
                    max_steps: int | None = None, log=print, real_labels=None,
                    renders: str | os.PathLike | None = None, device="cpu") -> dict:
    """Train (or resume) an estimator in ``work``; returns the final held-out evaluation.

    ``real_labels``: real TRAIN photos with partial labels (``training.estimator.real_labels.
    real_partial_labels``), needed when ``cfg.real_fraction`` > 0: that share of every batch is
    drawn from them and scored with ``real_loss`` beside the synthetic pairs' loss; a held-out
    part of them (``cfg.real_held_out``) is scored with ``evaluate_real`` after every epoch.

    ``renders``: a paired set of the engine's renders (``paired_data.renders_to_paired_set``), needed
    when ``cfg.render_share`` > 0: that share of the synthetic images comes from it (its exact labels
    scored by the same loss), the rest from ``paired``.

    ``device``: auto | cpu | cuda (``training.common.device.resolve``). Stopped by SIGINT/SIGTERM: a
    checkpoint, then KeyboardInterrupt; the same call resumes."""
    from ..common import device as dev_mod
    from ..common.trainer import Trainer
    device = dev_mod.resolve(device)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    data = PairedSet(paired, pack)
    train_idx, val_idx = data.split(cfg.val_fraction, cfg.seed)
    n_syn, n_real = batch_split(cfg)
    n_ren = _share(n_syn, cfg.render_share)
    rendered = None
    if n_ren:
        if renders is None:
            raise UserError(f"render_share {cfg.render_share} needs a paired set of renders")
        rendered = PairedSet(renders, pack)
        if rendered.images.shape[1:] != data.images.shape[1:]:
            raise UserError(f"renders {renders} are {rendered.images.shape[1]} px, the pairs "
                            f"{data.images.shape[1]} px: make both at the estimator's input size")
        ren_train, _ = rendered.split(cfg.val_fraction, cfg.seed)
    real = None
    if n_real:
        if real_labels is None:
            raise UserError(f"real_fraction {cfg.real_fraction} needs real labels "
                            "(training.estimator.real_labels.real_partial_labels)")
        real_train, real_held = real_labels.split(cfg.real_held_out, cfg.seed)
        if not len(real_train):
            raise UserError("no real photos left for training after the held-out share")
        real = RealBatches(real_labels, pack, cfg.real_balance, real_train).to(device)
    torch.manual_seed(cfg.seed)
    model = Estimator(pack.n_continuous, pack.slot_sizes, cfg.head_hidden, pretrained).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    # Mixed precision is safe here (a ResNet and MLP heads; the losses are computed in float32 from
    # the outputs): on CUDA the forward pass runs under float16 autocast with a GradScaler.
    grad_scaler = dev_mod.scaler(device)
    state = {"config": asdict(cfg), "pack": pack.id, "schema": pack.schema_hash,
             "paired": str(Path(paired).resolve()), "epoch": 0, "step_in_epoch": 0,
             "global_step": 0, "history": []}
    if real is not None:
        state["real"] = {"key": getattr(real_labels, "key", ""), "n": len(real_labels),
                         "content": real_labels.content_key()}
    steps_per_epoch = max(1, (cfg.epoch_images or len(train_idx)) // n_syn)
    n_pair = n_syn - n_ren
    total = steps_per_epoch * cfg.epochs
    trainer = Trainer("estimator", work / "checkpoint", state, modules={"model": model},
                      optimizers={"opt": opt}, device=device, total=total,
                      checkpoint_every=cfg.checkpoint_every, log=log, progress=progress,
                      diverged_hint="lower the learning rate or check the paired set")

    def check(saved: dict):
        # checkpoints from before a config field existed hold its default
        defaults = {k: v for k, v in asdict(EstimatorConfig(cfg.name)).items()
                    if k not in saved["config"]}
        saved_cfg = {**defaults, **saved["config"]}
        if saved_cfg != state["config"] or saved["schema"] != pack.schema_hash:
            raise UserError(f"{work} holds an estimator trained with another config or schema; "
                            "use a new --work folder")
        if not _same_real_labels(saved.get("real", {}), state.get("real", {})):
            raise UserError(f"{work} holds an estimator trained with other real labels; "
                            "use a new --work folder")

    if trainer.resume(check) is not None:
        log(f"resuming estimator at epoch {state['epoch']} step {state['step_in_epoch']}")
    t0, run = time.monotonic(), {"seen": 0, "loss": torch.tensor(float("nan")), "parts": {}}

    def read(epoch: int, order, ren_order, base: int):
        """Step ``i`` of the epoch's batch as CPU tensors (a background thread reads ahead on CUDA)."""
        def make(i: int):
            imgs, cont, disc = data.batch(order[i * n_pair:(i + 1) * n_pair])
            if rendered is not None:
                more = rendered.batch(ren_order[i * n_ren:(i + 1) * n_ren])
                imgs, cont, disc = (torch.cat([a, b]) for a, b in zip((imgs, cont, disc), more))
            out = {"imgs": imgs, "cont": cont, "disc": disc}
            if real is not None:
                rng = np.random.default_rng([cfg.seed, 31, base + i])
                ridx = rng.choice(real_train, n_real, replace=len(real_train) < n_real)
                out["rimgs"], out["rtarget"] = real.batch(ridx)
            return out
        return make

    def epoch_start(epoch: int):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * 0.5 ** (epoch // cfg.lr_halve_every)
        order = _epoch_order(train_idx, steps_per_epoch * n_pair, cfg.seed * 1000 + epoch)
        ren_order = (_epoch_order(ren_train, steps_per_epoch * n_ren, cfg.seed * 1000 + epoch + 7)
                     if rendered is not None else None)
        first = state["step_in_epoch"]
        make = read(epoch, order, ren_order, state["global_step"] - first)
        run["batches"] = iter(dev_mod.Prefetcher(make, range(first, steps_per_epoch), device))

    def step(t: Trainer) -> dict:
        b = next(run["batches"])
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + state["global_step"])
        imgs, cont, disc = b["imgs"], b["cont"], b["disc"]
        x = prepare_batch(imgs, cfg.input_size, cfg.augment, g)
        if real is not None:
            x = torch.cat([x, prepare_batch(b["rimgs"], cfg.input_size, cfg.augment, g)])
        with dev_mod.amp(device):
            cp, logits = model(x)
        cp, logits = cp.float(), [lg.float() for lg in logits]
        n = len(imgs)
        loss, parts = estimator_loss((cp[:n], [lg[:n] for lg in logits]), cont, disc, cfg)
        if real is not None:
            loss_r, parts_r = real_loss((cp[n:], [lg[n:] for lg in logits]), b["rtarget"], real, cfg)
            loss = loss + loss_r
            parts.update(parts_r)
        if not torch.isfinite(loss):
            raise UserError(f"estimator loss became {float(loss)} at step {state['global_step']}; "
                            "lower the learning rate or check the paired set")
        opt.zero_grad(set_to_none=True)
        grad_scaler.scale(loss).backward()
        grad_scaler.step(opt)
        grad_scaler.update()
        run["seen"] += int(x.shape[0])
        run["loss"], run["parts"] = loss.detach(), parts
        return {}

    def epoch_end(epoch: int):
        loss, parts = run["loss"], run["parts"]
        ev = evaluate(model, data, val_idx, cfg, pack) if len(val_idx) else {}
        if real is not None and len(real_held):
            ev["real_held_out"] = evaluate_real(model, real, real_held, cfg, pack)
        ev.update(epoch=epoch + 1, loss=float(loss), **parts,
                  images_per_s=run["seen"] / max(time.monotonic() - t0, 1e-9))
        state["history"].append(ev)
        log(f"epoch {epoch + 1}/{cfg.epochs}: loss {float(loss):.4f} "
            f"held-out slot acc {ev.get('mean_slot_accuracy', float('nan')):.3f} "
            f"L1 {ev.get('continuous_l1', float('nan')):.4f}"
            + (_real_summary(ev["real_held_out"]) if "real_held_out" in ev else ""))

    model.train()
    result = trainer.run(step, steps_per_epoch=steps_per_epoch, epoch_start=epoch_start,
                         epoch_end=epoch_end, max_steps=max_steps, raise_on_stop=True)
    if result == "max_steps":
        return {"stopped_at": state["global_step"]}
    return state["history"][-1] if state["history"] else {}


def _epoch_order(train_idx: np.ndarray, need: int, seed: int) -> np.ndarray:
    """One epoch's sample order: shuffled passes over ``train_idx`` until ``need`` samples."""
    rng = np.random.default_rng(seed)
    passes = -(-need // len(train_idx))
    return np.concatenate([train_idx[rng.permutation(len(train_idx))] for _ in range(passes)])[:need]


def load_trained(pack: Pack, work: str | os.PathLike, device="cpu") -> tuple[Estimator, EstimatorConfig]:
    """The trained estimator of ``work`` in eval mode, on ``device`` (whatever it trained on)."""
    from ..common import checkpoint
    from ..common.device import resolve
    ckpt = Path(work) / "checkpoint"
    if not (ckpt / "state.json").is_file():
        raise UserError(f"no trained estimator in {work}")
    state = checkpoint.read_state(ckpt)
    cfg = EstimatorConfig(**state["config"])
    device = resolve(device)
    model = Estimator(pack.n_continuous, pack.slot_sizes, cfg.head_hidden).to(device)
    checkpoint.load_weights(model, ckpt / "model.safetensors", "the estimator", device)
    return model.eval(), cfg


def cli_train_estimator(args) -> int:
    from ...backend.schema import find_pack
    pack = find_pack(args.pack)
    cfg = get_config(args.config, epochs=args.epochs, input_size=args.input_size)
    result = train_estimator(pack, args.pairs, args.work, cfg, pretrained=args.pretrained,
                             device=getattr(args, "device", "auto"))
    if args.export:
        from .export import export_estimator
        model, cfg = load_trained(pack, args.work)
        export_estimator(model, pack, args.export, cfg.input_size, IMAGENET_MEAN, IMAGENET_STD,
                         report={"config": asdict(cfg), "held_out": result})
        print(args.export)
    print(json.dumps(result))
    return 0
