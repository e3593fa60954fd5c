"""A small U-Net face parser: image [B, 3, H, W] in [-1, 1] -> part logits [B, K, H, W].

Trained on the real train split (``train_gan.train("parser", ...)``), evaluated by mIoU on the validation
split. Used to measure the generators (does G_real's own segmentation agree with what a parser sees in its
image?) and by later stages. GroupNorm, not BatchNorm: results do not depend on batch size or rank.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..common.parts import NUM_PARTS


def _block(in_ch, out_ch):
    g = min(8, out_ch)
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.GroupNorm(g, out_ch), nn.ReLU(inplace=True),
        nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), nn.GroupNorm(g, out_ch), nn.ReLU(inplace=True))


class FaceParser(nn.Module):
    def __init__(self, channels=(16, 32, 64, 128), n_parts: int = NUM_PARTS):
        super().__init__()
        self.down = nn.ModuleList()
        prev = 3
        for c in channels:                                   # level i works at H / 2^i
            self.down.append(_block(prev, c))
            prev = c
        self.up = nn.ModuleList(_block(channels[i + 1] + channels[i], channels[i])
                                for i in reversed(range(len(channels) - 1)))
        self.head = nn.Conv2d(channels[0], n_parts, 1)

    def features(self, x) -> list[torch.Tensor]:
        """The encoder levels: [B, channels[i], H / 2^i, W / 2^i] for each level i."""
        feats = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            feats.append(x)
        return feats

    def forward(self, x):                                    # [B, 3, H, W] -> [B, K, H, W]
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


def confusion(pred: torch.Tensor, target: torch.Tensor, n: int = NUM_PARTS) -> torch.Tensor:
    """pred, target: part ids of any equal shape -> [n, n] counts (rows: target, cols: pred)."""
    idx = target.reshape(-1).long() * n + pred.reshape(-1).long()
    return torch.bincount(idx, minlength=n * n).reshape(n, n)


def miou(conf: torch.Tensor) -> tuple[float, list[float | None]]:
    """Mean IoU over the parts present (in target or prediction) and the per-part IoUs (None: absent)."""
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    per = [float(i / u) if u > 0 else None for i, u in zip(inter, union)]
    present = [p for p in per if p is not None]
    return (sum(present) / len(present) if present else 0.0), per


def load_parser(path, device=None, what: str = "--parser") -> tuple[FaceParser, dict]:
    """The one loader of the training face parser, from wherever Likeness keeps one:

    * a parser run: its work dir or a checkpoint folder (``train_gan.train("parser")``, the shipped
      ``models/parser_<config>``, a retrain's ``parser/``);
    * a folder holding ``parser.json`` + ``parser.safetensors`` (an imitator folder's ``parser/``);
    * a ``parser.safetensors`` file, or a folder with one, whose metadata names its channels (a mapper
      folder's copy).

    -> (parser in eval mode on ``device``, info: channels, resolution (None where not recorded),
    folder). Anything else is a ``UserError`` naming ``what``."""
    import json
    from pathlib import Path
    from ...backend.errors import UserError
    from ..common import checkpoint
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{what} {path}: no such file or folder (a face parser's run, checkpoint or weights)")
    if path.is_dir() and (path / "parser.json").is_file():
        info = json.loads((path / "parser.json").read_text())
        weights, folder = path / "parser.safetensors", path
    elif path.is_file() or (path.is_dir() and (path / "parser.safetensors").is_file()
                            and not checkpoint.is_checkpoint(path) and not (path / "latest.json").is_file()):
        weights = path if path.is_file() else path / "parser.safetensors"
        info, folder = checkpoint.read_metadata(weights), weights.parent
        if "channels" not in info:
            raise UserError(f"{weights}: face parser weights without their channels (metadata)")
    else:
        from ..generators.gan_configs import config_from_dict
        folder = checkpoint.find(path)
        st = checkpoint.read_state(folder)
        if st.get("stage", "parser") != "parser":         # (hand-made folders may name no stage)
            raise UserError(f"{folder}: a checkpoint of stage '{st.get('stage')}', not the face parser")
        cfg = config_from_dict(json.loads(st["config"]))
        info = {"channels": list(cfg.parser_channels), "resolution": cfg.resolution, "config": cfg.name}
        weights = folder / "parser.safetensors"
    net = FaceParser(tuple(info["channels"]))
    if device is not None:
        net.to(device)
    checkpoint.load_weights(net, weights, "the face parser", device)
    res = info.get("resolution")
    return net.eval(), {**info, "resolution": int(res) if res is not None else None, "folder": folder}
