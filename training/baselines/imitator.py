"""The imitator: AgileAvatar's differentiable stand-in for the engine (Sang et al., SIGGRAPH Asia 2022).

A function vector -> image + segmentation that gradients pass through, so losses measured on images reach
the avatar vector (F2P, F2P v2: training/baselines/f2p.py). B = batch, C = continuous parameters, D = C + options,
L = n_latent W+ codes, K = parts (training/common/parts.py), H = W = the generator's resolution.

  relaxed vector x [B, D] = [ continuous in [0, 1] (C) | slot 0's option probabilities | slot 1's | ... ]
      one-hot slots for a true vector, any probabilities (softmax of logits) for a relaxed one, so gradients
      reach discrete choices
  encoder   one small MLP per W+ code (all L run as one batched einsum): x -> W+ [B, L, w_dim], as offsets
            from G_avatar's mean latent; the last layer starts at zero, so an untrained encoder draws the
            mean avatar
  generator our SemanticStyleGAN-style G (semantic_gan.Generator, modulated convs), initialised from
            G_avatar, with fixed noise maps (buffers): the imitator is a deterministic function of x
            -> image [B, 3, H, W] (about [-1, 1]), seg [B, K, H, W] part logits

Training, the method's two steps mapped onto the project:
  step 1  an unconditional GAN on engine renders: G_avatar (``likeness retrain`` or
          ``train_gan --stage avatar``), read from its work dir
  step 2  encoder + generator together on the (vector, render) pairs of an engine dataset:
              L = λ1·L1 + λp·P + λid·(1 − cos(E(G(x)), E(render))) + λseg·CE(seg, engine mask)
          λ = 1, 0.8, 1 as in the method; the mask term (default 1) is ours: the engine gives exact masks.
    P   LPIPS when its ImageNet backbone is on disk, else the parser-feature distance of our face parser
        (training/common/perceptual.py); imitator.json and the summary say which ran.
    E   the identity network. No ArcFace weights exist here, so ``identity`` is one of
          "renders" (default) a small CNN trained first on the same training renders to recover their
                   vectors (continuous L1 + per-slot cross-entropy); its unit-normalised embedding is the
                   identity: two images are "the same person" when they show the same vector
          "parser"  pooled deepest encoder features of our face parser
          "none"    no identity term
  Held-out renders (``val_fraction``) never train anything; the summary reports on them L1 (pixels in
  [0, 1]), the perceptual and identity distances, and per-part IoU / mIoU of the imitator's segmentation
  vs the engine's mask, for the untrained imitator (the mean avatar) and the trained one.

Work folder
  imitator.json        what the run is: pack, schema, configs, generator and parser fingerprints, renders,
                       held-out names, perceptual and identity descriptions (a resume must match it)
  identity/            the identity network (model.safetensors, optim.pt, state.json)
  checkpoint/          imitator.safetensors (encoder, G, noise), optim.pt, state.json (step, history)
  parser/              the face parser F2P needs (parser.safetensors, parser.json)
  samples/step_N.png   held-out rows: render | imitator | engine mask | imitator segmentation
  summary.json         held-out fidelity, speed, what ran
Batches depend only on (seed, step), so a resumed run reproduces the uninterrupted one exactly.

API
  ImitatorConfig, get_config(name, **overrides)           presets tiny / cpu / paper
  VectorLayout(pack)                                      one-hot / relaxed / discretised vectors
  Imitator, VectorEncoder, IdentityNet
  train_imitator(pack, renders, generator, parser, work, cfg, ...) -> summary dict
  load_imitator(folder, pack=None) -> (Imitator, info);   load_folder_parser(folder) -> (parser, resolution)
  evaluate_imitator(imitator, ...) -> held-out metrics
  cli_train_imitator(args)            `likeness train imitator` (options in cli.py)
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...backend.errors import UserError
from ..common.presets import from_args, pick
from ...backend.schema import Pack
from ..common.parts import INVALID, NUM_PARTS, PARTS


# ============================================================================================
# Configuration
# ============================================================================================

@dataclass(frozen=True)
class ImitatorConfig:
    name: str
    gan: str                          # GAN config the generator must have (training/generators/gan_configs.py)
    # --- encoder: one MLP per W+ code ---------------------------------------------------------
    enc_hidden: int = 128
    enc_layers: int = 2               # hidden layers of each code's MLP (0: one linear map)
    mean_samples: int = 4000          # samples for G's mean latent (the encoder's origin)
    # --- step 2 ---------------------------------------------------------------------------------
    batch: int = 16
    steps: int = 20000
    lr_encoder: float = 1e-3
    lr_generator: float = 2e-4
    lambda_l1: float = 1.0
    lambda_perceptual: float = 0.8
    lambda_identity: float = 1.0
    lambda_seg: float = 1.0           # CE of the imitator's segmentation vs the engine's mask
    perceptual: str = "lpips"         # lpips | parser | mse (training/common/perceptual.py)
    perceptual_fallback: str = "parser"
    lpips_net: str = "alex"
    identity: str = "renders"         # renders | parser | none
    # --- identity network ("renders") -----------------------------------------------------------
    id_channels: tuple = (16, 32, 64, 128)
    id_dim: int = 128
    id_steps: int = 2000
    id_batch: int = 32
    id_lr: float = 1e-3
    # --- data and schedule ----------------------------------------------------------------------
    val_fraction: float = 0.1         # renders held out for the fidelity figures
    val_max: int = 512
    ckpt_every: int = 500
    log_every: int = 50
    sample_every: int = 1000
    seed: int = 0


CONFIGS = {
    "tiny": ImitatorConfig("tiny", gan="tiny", enc_hidden=32, enc_layers=1, mean_samples=500, batch=8,
                           steps=60, id_channels=(8, 16, 32), id_dim=32, id_steps=40, id_batch=16,
                           val_fraction=0.125, ckpt_every=20, log_every=10, sample_every=30),
    "cpu": ImitatorConfig("cpu", gan="cpu"),
    # AgileAvatar's imitator works at StyleGAN2's 512 px with per-layer MLP encoders; the widths and steps
    # are our reading of the paper, not its released numbers
    "paper": ImitatorConfig("paper", gan="paper", enc_hidden=512, enc_layers=3, mean_samples=10000, batch=16,
                            steps=200000, lpips_net="vgg", id_channels=(32, 64, 128, 256, 256, 512),
                            id_dim=512, id_steps=20000, id_batch=64, ckpt_every=2000, log_every=100,
                            sample_every=5000),
}

# fields that change neither the models nor the data order: may differ when resuming
RUN_FIELDS = frozenset({"steps", "ckpt_every", "log_every", "sample_every"})


def get_config(name, **overrides) -> ImitatorConfig:
    return pick(CONFIGS, name, overrides, "imitator")


def config_key(cfg, run_fields=RUN_FIELDS) -> dict:
    return {k: v for k, v in json.loads(json.dumps(asdict(cfg))).items() if k not in run_fields}


# ============================================================================================
# Vectors as tensors
# ============================================================================================

class VectorLayout:
    """How a pack's vectors meet the networks: [continuous (C) | slot 0 options | slot 1 options | ...].

    Continuous values are normalised to [0, 1] (``AvatarVector.to_arrays``); slot logits are kept flat
    [B, n_options] and softmaxed per slot.
    """

    def __init__(self, n_continuous: int, slot_sizes):
        self.n_continuous = int(n_continuous)
        self.slot_sizes = tuple(int(k) for k in slot_sizes)
        self.n_options = sum(self.slot_sizes)
        self.dim = self.n_continuous + self.n_options
        self.offsets = tuple(int(o) for o in np.cumsum((0,) + self.slot_sizes))

    @classmethod
    def of(cls, pack: Pack) -> "VectorLayout":
        return cls(pack.n_continuous, pack.slot_sizes)

    def slot_logits(self, logits: torch.Tensor) -> list[torch.Tensor]:
        """[B, n_options] -> per slot [B, n_k]"""
        return [logits[:, a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def relaxed(self, cont: torch.Tensor, logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
        """cont [B, C] in [0, 1], flat slot logits [B, n_options] -> x [B, D] (softmax(logits / tau) per slot)"""
        probs = [torch.softmax(lg / tau, dim=1) for lg in self.slot_logits(logits)]
        return torch.cat([cont] + probs, dim=1)

    def one_hot(self, cont: torch.Tensor, disc: torch.Tensor) -> torch.Tensor:
        """cont [B, C], option indices [B, K] -> x [B, D] with one-hot slots"""
        hots = [F.one_hot(disc[:, k].long(), n).to(cont.dtype) for k, n in enumerate(self.slot_sizes)]
        return torch.cat([cont] + hots, dim=1)

    def discretise(self, cont: torch.Tensor, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """-> (continuous clamped to [0, 1] [B, C] float64, argmax option per slot [B, K] int64)"""
        c = cont.detach().clamp(0.0, 1.0).double().cpu().numpy()
        d = torch.stack([lg.argmax(dim=1) for lg in self.slot_logits(logits.detach())], dim=1).cpu().numpy()
        return c, d.astype(np.int64)

    def to_dict(self) -> dict:
        return {"n_continuous": self.n_continuous, "slot_sizes": list(self.slot_sizes)}

    def check_pack(self, pack: Pack, what: str):
        if (pack.n_continuous, pack.slot_sizes) != (self.n_continuous, self.slot_sizes):
            raise UserError(f"{what} has {self.n_continuous} continuous parameters and slots "
                            f"{list(self.slot_sizes)}; pack '{pack.id}' has {pack.n_continuous} and "
                            f"{list(pack.slot_sizes)}")


# ============================================================================================
# Networks
# ============================================================================================

class PerCodeLinear(nn.Module):
    """One dense layer per W+ code, all run as one einsum. x [B, L, in] -> [B, L, out]"""

    def __init__(self, n_codes: int, in_dim: int, out_dim: int, zero: bool = False):
        super().__init__()
        w = torch.zeros(n_codes, out_dim, in_dim) if zero else torch.randn(n_codes, out_dim, in_dim)
        self.weight = nn.Parameter(w * math.sqrt(2.0 / in_dim))        # He init for leaky ReLU
        self.bias = nn.Parameter(torch.zeros(n_codes, out_dim))

    def forward(self, x):
        return torch.einsum("loi,bli->blo", self.weight, x) + self.bias


class VectorEncoder(nn.Module):
    """relaxed vector x [B, D] -> W+ [B, L, w_dim]: one MLP per code, as an offset from ``w_mean``."""

    def __init__(self, layout: VectorLayout, n_latent: int, w_dim: int, hidden: int = 128, layers: int = 2,
                 w_mean: torch.Tensor | None = None):
        super().__init__()
        self.n_continuous, self.dim, self.n_latent, self.w_dim = layout.n_continuous, layout.dim, n_latent, w_dim
        dims = [layout.dim] + [hidden] * layers
        self.hidden = nn.ModuleList(PerCodeLinear(n_latent, a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = PerCodeLinear(n_latent, dims[-1], w_dim, zero=True)
        self.register_buffer("w_mean", torch.zeros(n_latent, w_dim) if w_mean is None else w_mean.clone())

    def forward(self, x):
        if x.shape[1] != self.dim:
            raise ValueError(f"vector of {x.shape[1]} values, the encoder takes {self.dim}")
        c = self.n_continuous
        x = torch.cat([x[:, :c] * 2 - 1, x[:, c:]], dim=1)                  # centre the sliders
        h = x[:, None].expand(-1, self.n_latent, -1)                         # [B, L, D]
        for layer in self.hidden:
            h = F.leaky_relu(layer(h), 0.2)
        return self.w_mean + self.out(h)                                     # [B, L, w_dim]


class Imitator(nn.Module):
    """relaxed vector [B, D] -> {"image" [B, 3, H, W], "seg" [B, K, H, W] logits, "wp" [B, L, w_dim], ...}"""

    def __init__(self, layout: VectorLayout, G: nn.Module, hidden: int = 128, layers: int = 2,
                 w_mean: torch.Tensor | None = None, noise_seed: int = 0):
        super().__init__()
        from ..pairs.invert import random_noise
        self.layout = layout
        self.G = G
        self.encoder = VectorEncoder(layout, G.n_latent, G.cfg.w_dim, hidden, layers, w_mean)
        maps = random_noise(G, 1, torch.Generator().manual_seed(noise_seed))   # one fixed set for all x
        self.n_noise = len(maps)
        for i, m in enumerate(maps):
            self.register_buffer(f"noise_{i}", m)                              # [1, 1, h, w]

    @property
    def resolution(self) -> int:
        return self.G.cfg.resolution

    def noise(self) -> list[torch.Tensor]:
        return [getattr(self, f"noise_{i}") for i in range(self.n_noise)]

    def forward(self, x):
        wp = self.encoder(x)
        out = self.G(wp, self.noise())
        out["wp"] = wp
        return out

    def draw(self, cont: torch.Tensor, disc: torch.Tensor) -> dict:
        """A true vector's image: cont [B, C], option indices [B, K]."""
        return self(self.layout.one_hot(cont, disc))

    def generator_parameters(self) -> list[nn.Parameter]:
        """What step 2 fine-tunes of G: everything but the mapping network, which W+ codes bypass."""
        return [p for n, p in self.G.named_parameters() if not n.startswith("mapping.")]


def _conv_block(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(min(8, cout), cout),
            nn.LeakyReLU(0.2)]


class IdentityNet(nn.Module):
    """Our face-embedding network for the identity loss (no ArcFace here), trained on engine renders.

    image [B, 3, R, R] in [-1, 1] -> embedding [B, dim]; training heads recover the vector from it
    (continuous [B, C] through a sigmoid, flat slot logits [B, n_options]), so images of the same vector
    embed alike and images of different vectors apart. The embedding is taken relative to ``center``, the
    mean over the training renders (set after training): cosines then measure how two faces differ from the
    average avatar in the same way, instead of being ~1 for any pair.
    """

    def __init__(self, layout: VectorLayout, channels=(16, 32, 64, 128), dim: int = 128):
        super().__init__()
        layers, prev = _conv_block(3, channels[0], 1), channels[0]
        for c in channels:
            layers += _conv_block(prev, c, 2) + _conv_block(c, c, 1)
            prev = c
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(prev, dim)
        self.cont_head = nn.Linear(dim, layout.n_continuous)
        self.slot_head = nn.Linear(dim, layout.n_options)
        self.register_buffer("center", torch.zeros(dim))

    def embed(self, x):                                         # [B, 3, R, R] -> unit [B, dim]
        return F.normalize(self.fc(self.features(x)) - self.center, dim=1)

    def forward(self, x):
        e = F.leaky_relu(self.fc(self.features(x)), 0.2)
        return torch.sigmoid(self.cont_head(e)), self.slot_head(e)


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def make_identity(kind: str, idnet: IdentityNet | None = None, parser: nn.Module | None = None):
    """(distance fn(a, b) -> [B] or None, description). Networks are frozen; images keep gradients."""
    if kind == "none":
        return None, "no identity term"
    if kind == "renders":
        if idnet is None:
            raise UserError("identity 'renders' needs the identity network")
        freeze(idnet)
        return (lambda a, b: 1.0 - (idnet.embed(a) * idnet.embed(b)).sum(dim=1),
                "identity: 1 - cosine of our render-trained identity CNN's embeddings (no ArcFace weights here)")
    if kind == "parser":
        if parser is None:
            raise UserError("identity 'parser' needs the face parser")
        freeze(parser)

        def dist(a, b):
            f = parser.features(torch.cat([a, b]))[-1].mean(dim=(2, 3))            # [2B, C] pooled
            fa, fb = F.normalize(f, dim=1).chunk(2)
            return 1.0 - (fa * fb).sum(dim=1)
        return dist, "identity: 1 - cosine of the face parser's pooled deepest features (no ArcFace weights here)"
    raise UserError(f"unknown identity '{kind}' (renders, parser, none)")


# ============================================================================================
# Checkpoints (one folder per trained thing: <name>.safetensors per module, optim.pt, state.json)
# ============================================================================================

def save_folder(folder: Path, modules: dict, opt, state: dict):
    """A checkpoint in the one format (``training.common.checkpoint``)."""
    from ..common import checkpoint
    checkpoint.save(folder, state, modules, {"opt": opt} if opt is not None else None)


def load_module(module: nn.Module, path: Path, what: str):
    from ..common.checkpoint import load_weights
    load_weights(module, path, what)


def load_folder(folder: Path, modules: dict, opt=None) -> dict:
    from ..common import checkpoint
    return checkpoint.load(folder, modules, {"opt": opt} if opt is not None else None)[0]


def fingerprint(module: nn.Module) -> str:
    from ..pairs.invert import generator_fingerprint
    return generator_fingerprint(module)


# ============================================================================================
# Inputs: renders, G_avatar, the face parser
# ============================================================================================

def _pipeline_of(path: Path) -> dict | None:
    """The ``likeness retrain`` identity (pipeline.json) of a stage folder or checkpoint inside one."""
    for p in [path, *path.parents][:4]:
        if (p / "pipeline.json").is_file():
            try:
                return json.loads((p / "pipeline.json").read_text())
            except (OSError, json.JSONDecodeError):
                return None
    return None


def retrain_inputs(work) -> dict:
    """--renders, --generator and --parser of a ``likeness retrain`` work dir. The parser is the parser
    stage's checkpoint (may be the shipped weights); where that stage trained none (encoder-only
    inversion, the ``cpu`` config), the photo_parser stage's parser .onnx (the shared
    models/parser/parser.onnx, or the pack's fine-tuned one)."""
    work = Path(work).expanduser()
    if not (work / "pipeline.json").is_file():
        raise UserError(f"{work}: not a likeness retrain work folder (no pipeline.json)")
    from ..pipeline.stages import render_folder, stage_result
    parser = work / "parser"
    if stage_result(work, "parser").get("checkpoint"):
        parser = Path(stage_result(work, "parser")["checkpoint"])
    elif stage_result(work, "photo_parser").get("parser"):
        parser = Path(stage_result(work, "photo_parser")["parser"])
    return {"renders": render_folder(work), "generator": work / "avatar", "parser": parser}


def load_g_avatar(path, cfg: ImitatorConfig, pack: Pack):
    """G_avatar (EMA weights) from an avatar-stage work dir or checkpoint, checked against the config and pack."""
    from ..generators.train_gan import find_checkpoint, load_generator, read_state
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"--generator {path}: no such folder (the avatar stage's work dir or checkpoint)")
    folder = find_checkpoint(path)
    st = read_state(folder)
    if st.get("stage") != "avatar":
        raise UserError(f"{folder}: a checkpoint of stage '{st.get('stage')}'; the imitator starts from "
                        "G_avatar (train_gan --stage avatar, or a retrain work dir's avatar/)")
    G, gcfg = load_generator(folder)
    if gcfg.name != cfg.gan:
        raise UserError(f"{folder}: a generator of GAN config '{gcfg.name}' ({gcfg.resolution} px); imitator "
                        f"config '{cfg.name}' expects '{cfg.gan}'. Use --config {_config_for_gan(gcfg.name)} "
                        f"or --set gan={gcfg.name}.")
    pipe = _pipeline_of(folder)
    if pipe is not None and (pipe.get("pack"), pipe.get("schema")) != (pack.id, pack.schema_hash):
        raise UserError(f"{folder}: G_avatar was trained for pack '{pipe.get('pack')}' (schema "
                        f"{pipe.get('schema')}), not '{pack.id}' ({pack.schema_hash})")
    return G, folder


def _config_for_gan(gan: str) -> str:
    return next((c.name for c in CONFIGS.values() if c.gan == gan), "<another config>")


def load_face_parser(path):
    """(parser in eval mode, its training resolution, folder) from a parser work dir or checkpoint, or
    an exported parser .onnx (the photo parser: rebuilt as the same torch U-Net, run at its input size)."""
    path = Path(path).expanduser()
    if path.suffix == ".onnx" and path.is_file():
        from ..readout.photo_parser import describe, onnx_weights
        net, _ = onnx_weights(path)
        return net.eval(), int(describe(path)["input_size"]), path
    from ..readout.face_parser import load_parser
    net, info = load_parser(path)
    return net, info["resolution"], info["folder"]


def parse_probs(parser: nn.Module, img: torch.Tensor, parser_res: int) -> torch.Tensor:
    """The parser's part probabilities [B, K, H, W] of images [B, 3, H, W] in [-1, 1], run at the
    resolution it was trained at."""
    h = img.shape[-1]
    x = img if h == parser_res else F.interpolate(img, size=parser_res, mode="bilinear", align_corners=False,
                                                  antialias=h > parser_res)
    logits = parser(x)
    if logits.shape[-1] != h:
        logits = F.interpolate(logits, size=h, mode="bilinear", align_corners=False)
    return logits.softmax(dim=1)


def _save_parser(work: Path, parser: nn.Module, res: int, source: Path) -> dict:
    from ..common.checkpoint import save_weights
    folder = work / "parser"
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(parser, folder / "parser.safetensors")
    info = {"channels": [m[0].out_channels for m in parser.down], "resolution": res, "source": str(source),
            "fingerprint": fingerprint(parser)}
    (folder / "parser.json").write_text(json.dumps(info, indent=1))
    return info


def load_folder_parser(folder) -> tuple[nn.Module, int]:
    """The face parser kept in an imitator folder: (parser in eval mode, resolution)."""
    from ..readout.face_parser import load_parser
    folder = Path(folder) / "parser"
    if not (folder / "parser.json").is_file():
        raise UserError(f"{folder.parent}: no face parser (parser/parser.json); retrain the imitator")
    net, info = load_parser(folder)
    return net, int(info["resolution"])


def _split(names: list[str], cfg: ImitatorConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices: a seeded draw of ``val_fraction`` (at most ``val_max``, at least 1)."""
    n = len(names)
    if n < 2:
        raise UserError(f"the imitator needs at least 2 renders (1 held out), got {n}")
    n_val = min(max(1, int(round(n * cfg.val_fraction))), cfg.val_max, n - 1)
    perm = np.random.default_rng(cfg.seed + 4242).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# ============================================================================================
# Losses and evaluation
# ============================================================================================

def imitator_loss(out: dict, y: torch.Tensor, parts: torch.Tensor, cfg: ImitatorConfig, perceptual=None,
                  identity=None) -> tuple[torch.Tensor, dict]:
    """Step-2 loss of imitator outputs vs renders y [B, 3, H, W] and their part maps [B, H, W]."""
    from ..pairs.invert import part_ce
    img = out["image"]
    l1 = (img - y).abs().mean()
    total = cfg.lambda_l1 * l1
    terms = {"l1": l1}
    if perceptual is not None and cfg.lambda_perceptual:
        terms["perceptual"] = perceptual(img, y).mean()
        total = total + cfg.lambda_perceptual * terms["perceptual"]
    if identity is not None and cfg.lambda_identity:
        terms["identity"] = identity(img, y).mean()
        total = total + cfg.lambda_identity * terms["identity"]
    if cfg.lambda_seg:
        terms["seg"] = part_ce(out["seg"], parts).mean()
        total = total + cfg.lambda_seg * terms["seg"]
    terms["total"] = total
    return total, {k: float(v.detach()) for k, v in terms.items()}


@torch.no_grad()
def evaluate_imitator(imitator: Imitator, images: torch.Tensor, parts: torch.Tensor, x: torch.Tensor,
                      perceptual=None, identity=None, batch: int = 32) -> dict:
    """How closely the imitator draws what the engine rendered, on held-out (vector, render) pairs.

    images [N, 3, H, W] in [-1, 1], parts [N, H, W], x [N, D] one-hot vectors. Returns l1 (pixels in
    [0, 1], the imitator's image clamped to the valid range), perceptual and identity distances (when
    given), part IoU per part (None when absent from both), mIoU over present parts, pixel accuracy.
    """
    from ..readout.face_parser import confusion, miou
    was = imitator.training
    imitator.eval()
    l1, perc, ident = [], [], []
    conf = torch.zeros(NUM_PARTS, NUM_PARTS, dtype=torch.long)
    for i in range(0, len(x), batch):
        out = imitator(x[i:i + batch])
        img, y, pt = out["image"].clamp(-1, 1), images[i:i + batch], parts[i:i + batch]
        l1.append((img - y).abs().mean(dim=(1, 2, 3)) / 2)
        if perceptual is not None:
            perc.append(perceptual(img, y))
        if identity is not None:
            ident.append(identity(img, y))
        seg = out["seg"]
        if seg.shape[-2:] != pt.shape[-2:]:
            seg = F.interpolate(seg, size=pt.shape[-2:], mode="bilinear", align_corners=False)
        valid = pt != INVALID
        conf += confusion(seg.argmax(1)[valid].cpu(), pt[valid].cpu())
    imitator.train(was)
    m, per = miou(conf)
    res = {"n": int(len(x)), "l1": float(torch.cat(l1).mean()), "miou": m,  # (floats: any device)
           "iou": {name: (None if v is None else round(v, 4)) for name, v in zip(PARTS, per)},
           "pixel_accuracy": float(conf.diag().sum() / conf.sum().clamp_min(1))}
    if perc:
        res["perceptual"] = float(torch.cat(perc).mean())
    if ident:
        res["identity"] = float(torch.cat(ident).mean())
    return res


def _fmt_eval(e: dict) -> str:
    s = f"L1 {e['l1']:.4f}  mIoU {e['miou']:.3f}  pixel acc {e['pixel_accuracy']:.3f}"
    if "perceptual" in e:
        s += f"  perceptual {e['perceptual']:.4f}"
    if "identity" in e:
        s += f"  identity {e['identity']:.4f}"
    return s


@torch.no_grad()
def sample_sheet(imitator: Imitator, images, parts, x, n: int = 8) -> np.ndarray:
    """Rows: render | imitator | engine mask | imitator segmentation."""
    from ...backend.visual import grid
    from ..common.parts import colorize_parts
    from ..generators.train_gan import to_uint8
    was = imitator.training
    imitator.eval()
    out = {k: v.cpu() for k, v in imitator(x[:n]).items()}
    images, parts = images.cpu(), parts.cpu()
    imitator.train(was)
    tiles = []
    for i in range(min(n, len(x))):
        tiles += [to_uint8(images[i:i + 1])[0], to_uint8(out["image"][i:i + 1])[0],
                  colorize_parts(parts[i].numpy()), colorize_parts(out["seg"][i].argmax(0).byte().numpy())]
    return grid(tiles, columns=4)


# ============================================================================================
# The identity network's training
# ============================================================================================

def _jitter(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Small shifts, scalings and brightness changes: the embedding should not hinge on exact pixels."""
    b, dev = img.shape[0], img.device              # draws on the CPU generator, the same on any device
    scale = 1.0 + (torch.rand(b, generator=g) - 0.5) * 0.1
    shift = (torch.rand(b, 2, generator=g) - 0.5) * 0.1
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(dev), list(img.shape), align_corners=False)
    img = F.grid_sample(img, grid, padding_mode="border", align_corners=False)
    return img * (1.0 + (torch.rand(b, 1, 1, 1, generator=g).to(dev) - 0.5) * 0.2)


def identity_loss(net: IdentityNet, layout: VectorLayout, img, cont, disc) -> tuple[torch.Tensor, dict]:
    cp, logits = net(img)
    l1 = (cp - cont).abs().mean()
    ce = sum(F.cross_entropy(lg, disc[:, k]) for k, lg in enumerate(layout.slot_logits(logits)))
    ce = ce / len(layout.slot_sizes)
    return l1 + ce, {"l1": float(l1.detach()), "ce": float(ce.detach())}


@torch.no_grad()
def evaluate_identity(net: IdentityNet, layout: VectorLayout, images, cont, disc, batch: int = 64) -> dict:
    was = net.training
    net.eval()
    l1, correct = [], []
    for i in range(0, len(images), batch):
        cp, logits = net(images[i:i + batch])
        l1.append((cp - cont[i:i + batch]).abs().mean(dim=1))
        correct.append(torch.stack([lg.argmax(1) == disc[i:i + batch, k]
                                    for k, lg in enumerate(layout.slot_logits(logits))], 1).float())
    # how the embedding separates: cosine distance between different renders vs a render and its jittered copy
    with torch.random.fork_rng(devices=[]):
        e = net.embed(images[:256])
        e_jit = net.embed(_jitter(images[:256], torch.Generator().manual_seed(1)))
    n = len(e)
    off = (1.0 - e @ e.t())[~torch.eye(n, dtype=torch.bool, device=e.device)]
    net.train(was)
    return {"continuous_l1": float(torch.cat(l1).mean()), "slot_accuracy": float(torch.cat(correct).mean()),
            "distance_other_vector": float(off.mean()) if n > 1 else None,
            "distance_same_vector_jittered": float((1.0 - (e * e_jit).sum(1)).mean())}


@torch.no_grad()
def _set_center(net: IdentityNet, ds, idx: np.ndarray, batch: int = 128):
    was = net.training
    net.eval()
    dev = net.center.device
    feats = [net.fc(net.features(ds.batch(torch.from_numpy(idx[i:i + batch]))[0].to(dev)))
             for i in range(0, len(idx), batch)]
    net.center.copy_(torch.cat(feats).mean(dim=0))
    net.train(was)


def train_identity(work: Path, layout: VectorLayout, ds, cont, disc, train_idx, val_idx, cfg: ImitatorConfig,
                   key: dict, progress: bool = True, log=print, device=None) -> tuple[IdentityNet, dict]:
    """Train (or resume, or reuse) the render-trained identity network in work/identity/."""
    device = torch.device(device or "cpu")
    folder = work / "identity"
    torch.manual_seed(cfg.seed + 17)
    net = IdentityNet(layout, cfg.id_channels, cfg.id_dim).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.id_lr, betas=(0.9, 0.99))
    from ..common.trainer import Trainer
    state = {"key": key, "step": 0, "history": []}
    total = cfg.id_steps
    trainer = Trainer("identity net", folder, state, modules={"model": net}, optimizers={"opt": opt}, total=total,
                      checkpoint_every=max(1, cfg.ckpt_every), log=log, progress=progress, step_key="step",
                      diverged_hint="lower id_lr", device=device)

    def check(saved: dict):
        if saved.get("key") != key:
            raise UserError(f"{folder} holds an identity network of another run; use another --work")

    trainer.resume(check)

    def step(t: Trainer) -> dict:
        i = state["step"]
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 500_009 + i)
        idx = torch.from_numpy(train_idx)[torch.randint(len(train_idx), (cfg.id_batch,), generator=g)]
        img, _ = ds.batch(idx)
        loss, terms = identity_loss(net, layout, _jitter(img.to(device), g), cont[idx].to(device),
                                    disc[idx].to(device))
        if not math.isfinite(float(loss.detach())):
            raise UserError(f"identity network loss became {float(loss)} at step {i}; lower id_lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run["terms"] = terms
        return {}

    def after_step(n: int, stats: dict):
        if n % max(1, cfg.log_every) == 0 or n == total:
            state["history"].append({"step": n, **run["terms"]})
        if n == total:
            _set_center(net, ds, train_idx)
            img_v, _ = ds.batch(torch.from_numpy(val_idx))
            state["held_out"] = evaluate_identity(net, layout, img_v.to(device), cont[val_idx].to(device),
                                                  disc[val_idx].to(device))

    run: dict = {}
    if state["step"] < total:
        net.train()
        trainer.run(step, after_step=after_step, raise_on_stop=True)
        if "held_out" in state:
            log(f"identity network: held-out slot accuracy {state['held_out']['slot_accuracy']:.3f}, "
                f"continuous L1 {state['held_out']['continuous_l1']:.4f}")
    return net.eval(), state.get("held_out", {})


# ============================================================================================
# Step 2: encoder + generator on (vector, render) pairs
# ============================================================================================

def train_imitator(pack: Pack, renders=None, generator=None, parser=None, work=None, cfg="tiny",
                   resume: bool = False, max_steps: int | None = None, progress: bool = True, log=print,
                   device="cpu") -> dict:
    """Train (or resume) an imitator in ``work``; returns the summary (also work/summary.json).

    renders: an engine dataset folder of ``pack``; generator: G_avatar's work dir or checkpoint; parser: the
    face parser's work dir or checkpoint (kept in work/parser for F2P). On resume, omitted inputs come from
    work/imitator.json. ``max_steps``: stop (with a checkpoint) after that many total steps, e.g. to split
    training over sittings; the final evaluation runs only when the run reaches cfg.steps. ``device``:
    auto | cpu | cuda (float32 throughout: the loss backpropagates through G_avatar into the vector).
    """
    from ..common.data import avatar_dataset
    from ..pairs.paired_data import check_dataset_pack, read_vectors
    from ..common.perceptual import resolve_perceptual
    from ..common.device import resolve
    cfg = get_config(cfg)
    device = resolve(device)
    if work is None:
        raise UserError("the imitator needs --work (its folder)")
    work = Path(work).expanduser()
    torch.set_flush_denormal(True)                 # denormals slow CPU kernels by orders of magnitude
    run_path, ckpt = work / "imitator.json", work / "checkpoint"
    have = json.loads(run_path.read_text()) if run_path.is_file() else None
    if have is not None and (ckpt / "state.json").is_file() and not resume:
        raise UserError(f"{work} already holds an imitator run; pass --resume to continue it or choose "
                        "another --work")
    if have is not None:                           # a resume may omit the inputs
        renders = renders or have["renders"]["path"]
        generator = generator or have["generator"]["path"]
        parser = parser or have["parser"]["source"]
    for flag, value in (("--renders", renders), ("--generator", generator), ("--parser", parser)):
        if value is None:
            raise UserError(f"the imitator needs {flag} (or --retrain DIR, a likeness retrain work folder)")
    renders = Path(renders).expanduser()
    if not (renders / "manifest.json").is_file():
        raise UserError(f"--renders {renders}: not an engine dataset (no manifest.json)")
    check_dataset_pack(renders, pack)
    G, g_folder = load_g_avatar(generator, cfg, pack)
    pnet, parser_res, p_folder = load_face_parser(parser)
    G, pnet = G.to(device), pnet.to(device)
    layout = VectorLayout.of(pack)

    # ---- data: renders at G's resolution, their vectors, the held-out split
    ds = avatar_dataset(renders, G.cfg.resolution)
    cont_np, disc_np = read_vectors(renders, ds.names, pack)
    cont, disc = torch.from_numpy(cont_np), torch.from_numpy(disc_np)
    train_idx, val_idx = _split(ds.names, cfg)
    perceptual, perc_desc, perc_kind = resolve_perceptual(cfg.perceptual, cfg.perceptual_fallback, pnet,
                                                          cfg.lpips_net)
    run = {"pack": pack.id, "schema": pack.schema_hash, "config": config_key(cfg),
           "gan_config": G.cfg.to_dict(), "layout": layout.to_dict(),
           "generator": {"path": str(g_folder), "fingerprint": fingerprint(G)},
           "parser": {"source": str(p_folder), "fingerprint": fingerprint(pnet), "resolution": parser_res},
           "renders": {"path": str(renders.resolve()), "count": len(ds.names),
                       "names": hashlib.sha256(json.dumps(ds.names).encode()).hexdigest()[:16],
                       "held_out": [ds.names[i] for i in val_idx]},
           "perceptual": perc_kind}
    if have is not None:
        diff = [k for k in run if have.get(k) != run[k]]
        if diff:
            raise UserError(f"{work} holds an imitator trained with another {', '.join(diff)}; use another "
                            "--work (or the same inputs to resume)")
    work.mkdir(parents=True, exist_ok=True)
    run_path.write_text(json.dumps({**run, "perceptual_description": perc_desc}, indent=1))
    _save_parser(work, pnet, parser_res, p_folder)
    log(f"imitator config {cfg.name}: G_avatar {g_folder} ({G.cfg.name}, {G.cfg.resolution} px), "
        f"{len(train_idx)} training / {len(val_idx)} held-out renders; perceptual: {perc_desc}")

    # ---- identity network
    idnet = None
    if cfg.identity == "renders":
        idnet, _ = train_identity(work, layout, ds, cont, disc, train_idx, val_idx, cfg,
                                  {k: run[k] for k in ("pack", "schema", "config", "renders")}, progress, log,
                                  device)
    identity, id_desc = make_identity(cfg.identity, idnet, pnet)
    log(id_desc)

    # ---- the imitator, its optimiser, resume
    torch.manual_seed(cfg.seed)
    if (ckpt / "state.json").is_file():
        w_mean = None                               # a buffer of the checkpoint
    else:
        with torch.random.fork_rng(devices=[]):
            w_mean = G.mean_latents(n=cfg.mean_samples, seed=cfg.seed)["w_mean"]
    imitator = Imitator(layout, G, cfg.enc_hidden, cfg.enc_layers, w_mean, noise_seed=cfg.seed).to(device)
    opt = torch.optim.Adam([{"params": list(imitator.encoder.parameters()), "lr": cfg.lr_encoder},
                            {"params": imitator.generator_parameters(), "lr": cfg.lr_generator}],
                           betas=(0.9, 0.99))
    for p in imitator.G.mapping.parameters():
        p.requires_grad_(False)
    y_val, parts_val = (t.to(device) for t in ds.batch(torch.from_numpy(val_idx)))
    x_val = layout.one_hot(cont[val_idx], disc[val_idx]).to(device)
    from ..common import checkpoint
    from ..common.trainer import Trainer
    total = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
    clock = {"t0": time.monotonic()}

    def save(t: Trainer) -> Path:
        state["seconds"] += time.monotonic() - clock["t0"]
        clock["t0"] = time.monotonic()
        return checkpoint.save(ckpt, state, {"imitator": imitator}, {"opt": opt})

    state: dict = {"step": 0}
    trainer = Trainer("imitator", ckpt, state, modules={"imitator": imitator}, optimizers={"opt": opt},
                      total=total, device=device, checkpoint_every=cfg.ckpt_every, log=log, progress=progress, step_key="step",
                      save=save, diverged_hint="lower lr_generator / lr_encoder (--set)")
    if trainer.resume() is not None:
        log(f"resuming the imitator at step {state['step']}")
    else:
        state.update({"step": 0, "history": [], "seconds": 0.0,
                      "initial": evaluate_imitator(imitator, y_val, parts_val, x_val, perceptual, identity)})
        log(f"untrained imitator (the mean avatar) on held-out renders: {_fmt_eval(state['initial'])}")
        checkpoint.save(ckpt, state, {"imitator": imitator}, {"opt": opt})     # step 0: resumable from the start

    # ---- loop (training.common.trainer)
    imitator.train()
    win = {"t": time.monotonic(), "n": 0, "sums": {}}

    def step(t: Trainer) -> dict:
        i = state["step"]
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)
        idx = torch.from_numpy(train_idx)[torch.randint(len(train_idx), (cfg.batch,), generator=g)]
        y, parts = (t.to(device) for t in ds.batch(idx))
        out = imitator(layout.one_hot(cont[idx], disc[idx]).to(device))
        loss, terms = imitator_loss(out, y, parts, cfg, perceptual, identity)
        if not math.isfinite(terms["total"]):
            raise UserError(f"imitator loss became {terms['total']} at step {i}; the last checkpoint is kept. "
                            "Lower lr_generator / lr_encoder (--set) and resume")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        win["n"] += 1
        for k, v in terms.items():
            win["sums"][k] = win["sums"].get(k, 0.0) + v
        return {}

    def after_step(s: int, stats: dict):
        if s % cfg.log_every == 0 or s == total:
            now = time.monotonic()
            rate = win["n"] * cfg.batch / max(now - win["t"], 1e-9)
            avg = {k: v / win["n"] for k, v in win["sums"].items()}
            state["history"].append({"step": s, **avg, "images_per_s": rate})
            if not progress or s == total:
                log(f"imitator step {s}/{total}  " + "  ".join(f"{k} {v:.4f}" for k, v in avg.items())
                    + f"  {rate:.1f} img/s")
            win.update(t=now, n=0, sums={})
        if s % cfg.sample_every == 0 or s == total:
            from ..generators.train_gan import save_png
            save_png(sample_sheet(imitator, y_val, parts_val, x_val), work / "samples" / f"step_{s:08d}.png")

    clock["t0"] = time.monotonic()
    trainer.run(step, after_step=after_step, raise_on_stop=True)
    imitator.eval()
    summary = {"config": cfg.name, "step": state["step"], "steps": cfg.steps, "work": str(work),
               "finished": state["step"] >= cfg.steps, "perceptual": perc_desc, "identity": id_desc,
               "lambda": {"l1": cfg.lambda_l1, "perceptual": cfg.lambda_perceptual,
                          "identity": cfg.lambda_identity, "seg": cfg.lambda_seg},
               "renders": {"train": int(len(train_idx)), "held_out": int(len(val_idx)), "path": str(renders)},
               "generator": str(g_folder), "resolution": G.cfg.resolution,
               "initial_held_out": state["initial"], "train_seconds": round(state["seconds"], 1),
               "images_per_s": _median_rate(state["history"]),
               "machine": f"{os.cpu_count()}-core CPU, {torch.get_num_threads()} torch thread(s)",
               "device": str(device)}
    if idnet is not None:
        summary["identity_net"] = json.loads((work / "identity" / "state.json").read_text()).get("held_out", {})
    if state["step"] >= cfg.steps:
        summary["held_out"] = evaluate_imitator(imitator, y_val, parts_val, x_val, perceptual, identity)
        log(f"imitator on held-out renders: {_fmt_eval(summary['held_out'])}")
        (work / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _median_rate(history: list[dict]) -> float | None:
    rates = [h["images_per_s"] for h in history if "images_per_s" in h]
    return round(float(np.median(rates)), 2) if rates else None


# ============================================================================================
# Loading a trained imitator
# ============================================================================================

def load_imitator(folder, pack: Pack | None = None) -> tuple[Imitator, dict]:
    """The imitator of a work folder (its latest checkpoint), in eval mode, and its imitator.json."""
    from ..generators.gan_configs import config_from_dict
    from ..generators.semantic_gan import Generator
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"{folder}: no such imitator folder")
    if not (folder / "imitator.json").is_file() or not (folder / "checkpoint" / "state.json").is_file():
        raise UserError(f"{folder}: not a trained imitator (imitator.json and checkpoint/ missing); train one "
                        "with likeness.training.baselines.imitator")
    info = json.loads((folder / "imitator.json").read_text())
    layout = VectorLayout(**info["layout"])
    if pack is not None:
        if (info["pack"], info["schema"]) != (pack.id, pack.schema_hash):
            raise UserError(f"{folder}: an imitator of pack '{info['pack']}' (schema {info['schema']}), not "
                            f"'{pack.id}' ({pack.schema_hash})")
        layout.check_pack(pack, str(folder))
    cfg = info["config"]
    G = Generator(config_from_dict(info["gan_config"]))
    imitator = Imitator(layout, G, cfg["enc_hidden"], cfg["enc_layers"], noise_seed=cfg["seed"])
    state = load_folder(folder / "checkpoint", {"imitator": imitator})
    info["step"] = state["step"]
    freeze(imitator)
    return imitator, info


def load_loss_terms(folder, info: dict | None = None) -> tuple:
    """The perceptual and identity distances an imitator folder was trained with, as they can run here:
    (perceptual fn or None, identity fn or None, descriptions)."""
    from ..common.perceptual import resolve_perceptual
    folder = Path(folder).expanduser()
    info = info or json.loads((folder / "imitator.json").read_text())
    c = info["config"]
    parser, _ = load_folder_parser(folder)
    perceptual, p_desc, _ = resolve_perceptual(c["perceptual"], c["perceptual_fallback"], parser, c["lpips_net"])
    idnet = None
    if c["identity"] == "renders":
        idnet = IdentityNet(VectorLayout(**info["layout"]), tuple(c["id_channels"]), c["id_dim"])
        load_module(idnet, folder / "identity" / "model.safetensors", "the identity network")
    identity, i_desc = make_identity(c["identity"], idnet, parser)
    return perceptual, identity, {"perceptual": p_desc, "identity": i_desc}


# ============================================================================================
# CLI
# ============================================================================================

def cli_train_imitator(args) -> int:
    """Handler of the imitator's training command; prints the summary as JSON."""
    from ...backend.schema import find_pack
    if getattr(args, "threads", None):
        torch.set_num_threads(int(args.threads))
    pack = find_pack(getattr(args, "pack", None) or "default")
    cfg = from_args(get_config, args, "tiny")
    inputs = retrain_inputs(args.retrain) if getattr(args, "retrain", None) else {}
    summary = train_imitator(pack, getattr(args, "renders", None) or inputs.get("renders"),
                             getattr(args, "generator", None) or inputs.get("generator"),
                             getattr(args, "parser", None) or inputs.get("parser"), args.work, cfg,
                             resume=bool(getattr(args, "resume", False)),
                             log=lambda s: print(s, file=sys.stderr, flush=True),
                             device=getattr(args, "device", None) or "auto")
    print(json.dumps(summary, indent=1))
    return 0
