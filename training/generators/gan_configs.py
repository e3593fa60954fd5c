"""Named configurations of the dual-domain generators, the discriminator, training and the face parser.

  tiny   32 px, tests and smoke runs: a training step takes a few hundredths of a second on CPU.
  cpu    64 px, sized for throughput on a 2-core CPU (measure: ``python -m likeness.training.generators.gan_metrics
         throughput``).
  small  128 px, a modest GPU or a long CPU run.
  paper  512 px, batch 16: the resolution of SemanticStyleGAN / SwiftAvatar.

Architecture and optimisation fields are checked when resuming (a checkpoint of another config is refused);
schedule fields (SCHEDULE_FIELDS) may change between runs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from ...backend.errors import UserError


@dataclass(frozen=True)
class GANConfig:
    name: str
    resolution: int                 # output side, pixels
    local_res: int = 16             # side of the local generators' coordinate grid
    # --- generator -------------------------------------------------------------------------
    z_dim: int = 256
    w_dim: int = 256
    n_mlp: int = 8                  # mapping network depth
    mapping_lr_mul: float = 0.01
    n_freq: int = 32                # Fourier features: 2*n_freq input channels per local generator
    local_hidden: int = 64          # width of each part's MLP
    local_shape_layers: int = 3     # modulated layers driven by the part's shape code (after the base layer)
    local_texture_layers: int = 2   # modulated layers driven by the part's texture code
    feat_dim: int = 64              # channels of each part's feature map (and of the fused map)
    render_channels: tuple = ((16, 128), (32, 64), (64, 32))  # (resolution, channels) of render stages
    # --- discriminator ---------------------------------------------------------------------
    d_channels: tuple = ((64, 32), (32, 64), (16, 128), (8, 128), (4, 128))  # image branch per res
    d_seg_channels: tuple = ((64, 16), (32, 32), (16, 64))                  # seg branch down to fuse_res
    fuse_res: int = 16
    mbstd_group: int = 4
    # --- training --------------------------------------------------------------------------
    batch: int = 16
    lr_g: float = 0.002
    lr_d: float = 0.002
    r1_gamma: float = 10.0
    r1_every: int = 16
    pl_weight: float = 0.5
    pl_every: int = 4
    pl_batch_shrink: int = 2
    pl_decay: float = 0.01
    mixing: float = 0.3
    ema_kimg: float = 10.0
    augment: str = "color,translation,cutout"
    xflip: bool = True
    lambda_color: float = 1.0       # avatar stage: colour-matching loss weight
    lambda_layout: float = 0.0      # avatar stage: layout-agreement loss weight (train_gan.layout_loss)
    freeze_local: bool = False      # avatar stage: freeze mapping + local generators
    # real stage: draw training faces with weight (frequency of their attribute group)^-balance,
    # groups = hair-length rank x glasses x hat (train_gan.balance_weights); 0 uniform, 1 every
    # group equally often. A sampling schedule: may change on resume.
    balance: float = 0.0
    # --- face parser -----------------------------------------------------------------------
    parser_channels: tuple = (16, 32, 64, 128)
    parser_batch: int = 16
    parser_lr: float = 0.002
    # --- schedule (may change on resume) -----------------------------------------------------
    steps: int = 10000
    parser_steps: int = 2000
    ckpt_every: int = 500
    sample_every: int = 500
    log_every: int = 50
    keep_ckpts: int = 3
    seed: int = 0

    @property
    def n_parts(self) -> int:
        from ..common.parts import NUM_PARTS
        return NUM_PARTS

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def fingerprint(self) -> str:
        """Hash of everything but the schedule: two runs with one fingerprint can share checkpoints."""
        d = {k: v for k, v in self.to_dict().items() if k not in SCHEDULE_FIELDS
             and not (k in LATER_FIELDS and v == LATER_FIELDS[k])}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, **kw) -> "GANConfig":
        return dataclasses.replace(self, **kw)


SCHEDULE_FIELDS = frozenset({"steps", "parser_steps", "ckpt_every", "sample_every", "log_every",
                             "keep_ckpts", "balance"})
# Fields added after checkpoints existed: left out of the fingerprint while at these defaults, so
# older checkpoints (and the shipped G_real) keep theirs.
LATER_FIELDS = {"lambda_layout": 0.0}

CONFIGS: dict[str, GANConfig] = {
    "tiny": GANConfig(
        name="tiny", resolution=32, local_res=8, z_dim=32, w_dim=32, n_mlp=2, n_freq=8,
        local_hidden=16, local_shape_layers=1, local_texture_layers=1, feat_dim=16,
        render_channels=((8, 32), (16, 16), (32, 16)),
        d_channels=((32, 16), (16, 32), (8, 32), (4, 32)), d_seg_channels=((32, 8), (16, 16)),
        fuse_res=8, mbstd_group=2, batch=8, ema_kimg=0.5, parser_channels=(8, 16, 32),
        parser_batch=16, steps=200, parser_steps=100, ckpt_every=50, sample_every=50, log_every=10),
    "cpu": GANConfig(
        name="cpu", resolution=64, local_res=16, z_dim=128, w_dim=128, n_mlp=4, n_freq=16,
        local_hidden=32, local_shape_layers=2, local_texture_layers=1, feat_dim=32,
        render_channels=((16, 64), (32, 32), (64, 16)),
        d_channels=((64, 16), (32, 32), (16, 64), (8, 96), (4, 96)), d_seg_channels=((64, 8), (32, 16)),
        fuse_res=16, batch=16, ema_kimg=5.0, parser_channels=(16, 32, 64, 96),
        steps=100000, parser_steps=3000, ckpt_every=500, sample_every=500, log_every=50),
    "small": GANConfig(
        name="small", resolution=128, local_res=16, z_dim=256, w_dim=256, n_mlp=8, n_freq=32,
        local_hidden=64, local_shape_layers=3, local_texture_layers=2, feat_dim=64,
        render_channels=((16, 256), (32, 128), (64, 64), (128, 32)),
        d_channels=((128, 32), (64, 64), (32, 128), (16, 256), (8, 256), (4, 256)),
        d_seg_channels=((128, 16), (64, 32), (32, 64)),
        fuse_res=16, batch=16, ema_kimg=10.0, parser_channels=(16, 32, 64, 128),
        steps=200000, parser_steps=5000),
    "paper": GANConfig(
        name="paper", resolution=512, local_res=16, z_dim=512, w_dim=512, n_mlp=8, n_freq=128,
        local_hidden=256, local_shape_layers=4, local_texture_layers=4, feat_dim=512,
        render_channels=((16, 512), (32, 512), (64, 256), (128, 128), (256, 64), (512, 32)),
        d_channels=((512, 32), (256, 64), (128, 128), (64, 256), (32, 512), (16, 512), (8, 512),
                    (4, 512)),
        d_seg_channels=((512, 16), (256, 32), (128, 64), (64, 128), (32, 256)),
        fuse_res=16, batch=16, ema_kimg=10.0, parser_channels=(32, 64, 128, 256),
        steps=800000, parser_steps=20000, ckpt_every=2000, sample_every=2000, log_every=100),
}


def get_config(name_or_config) -> GANConfig:
    if isinstance(name_or_config, GANConfig):
        return name_or_config
    try:
        return CONFIGS[name_or_config]
    except KeyError:
        raise UserError(f"unknown GAN config '{name_or_config}' (choose from {', '.join(CONFIGS)})")


def config_from_dict(d: dict) -> GANConfig:
    d = dict(d)
    for k, v in d.items():
        if isinstance(v, list):
            d[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v)
    return GANConfig(**d)
