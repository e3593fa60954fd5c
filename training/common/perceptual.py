"""Perceptual distances for GAN inversion: LPIPS when it can run offline, else our own face parser's features.

API
  make_perceptual(kind, parser=None, net="alex") -> (fn or None, description)
      kind "lpips"   LPIPS (Zhang et al., CVPR 2018) through the ``lpips`` package, only when the package
                     imports AND its ImageNet backbone weights are already on disk: $LIKENESS_LPIPS_BACKBONE
                     (a torchvision state dict of alexnet / vgg16), else the torch hub cache
                     (~/.cache/torch/hub/checkpoints/alexnet-owt-7be5be79.pth, vgg16-397923af.pth). The file
                     is checked BEFORE lpips.LPIPS is built (which would otherwise try to download it), and
                     the backbone is always built random and then loaded from that file: nothing is fetched.
           "parser"  LPIPS without learned weights over the intermediate features of our face parser:
                     ``parser.features(x) -> list[Tensor]`` (training/readout/face_parser.FaceParser's encoder levels
                     are used when the module has no such method); each feature map is normalised to unit
                     length over channels at every position, squared differences are summed over channels,
                     averaged over positions, then averaged over levels.
           "mse"     no perceptual term (the inversion then uses pixel MSE + the optional mask term).
      fn(x, y) -> [B] distances for images [B, 3, H, W] in [-1, 1], differentiable in both.
      None when the kind cannot run (the description says what was skipped and why) and for "mse".
  resolve_perceptual(kind, fallback, parser=None) -> (fn or None, description, kind_used)
      ``kind`` if it can run, else ``fallback`` ("parser" without a parser falls back to "mse"); the
      description names what was skipped and what the configuration chose instead.

The parser (or LPIPS net) is put in eval mode and its parameters stop requiring gradients: only the images
being compared get gradients.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("lpips", "parser", "mse")
# torchvision's file names for the ImageNet backbones that lpips wraps
BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
ENV_BACKBONE = "LIKENESS_LPIPS_BACKBONE"

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def hub_checkpoint_dir() -> Path:
    """torch hub's checkpoint folder ($TORCH_HOME/hub/checkpoints, default ~/.cache/torch/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def lpips_backbone_path(net: str = "alex") -> Path | None:
    """The local file of the ImageNet backbone of LPIPS ``net``, or None when it is not on disk."""
    env = os.environ.get(ENV_BACKBONE)
    if env:
        p = Path(env).expanduser()
        return p if p.is_file() else None
    p = hub_checkpoint_dir() / BACKBONE_FILES[net]
    return p if p.is_file() else None


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def make_lpips(net: str = "alex") -> tuple[Distance | None, str]:
    if net not in BACKBONE_FILES:
        raise ValueError(f"unknown LPIPS net '{net}' ({', '.join(BACKBONE_FILES)})")
    try:
        import lpips  # noqa: F401  (imports torchvision)
    except Exception as e:               # ModuleNotFoundError, or torchvision missing / broken
        return None, f"LPIPS skipped: the lpips package cannot be imported ({type(e).__name__}: {e})"
    path = lpips_backbone_path(net)
    if path is None:
        where = (f"${ENV_BACKBONE}={os.environ[ENV_BACKBONE]} (no such file)" if os.environ.get(ENV_BACKBONE)
                 else str(hub_checkpoint_dir() / BACKBONE_FILES[net]))
        return None, (f"LPIPS skipped: its ImageNet {net} backbone weights are not on disk ({where}); "
                      "nothing is downloaded at run time")
    try:
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        sd = torch.load(path, map_location="cpu", weights_only=True)
        # lpips splits torchvision's ``features`` Sequential into slices whose children keep their indices
        own = {}
        for name, _ in model.net.named_parameters():
            own[name] = "features." + name.split(".", 1)[1]
        missing = [v for v in own.values() if v not in sd]
        if missing:
            return None, f"LPIPS skipped: {path} is not a torchvision {net} state dict (no {missing[0]})"
        with torch.no_grad():
            for name, p in model.net.named_parameters():
                p.copy_(sd[own[name]])
    except Exception as e:
        return None, f"LPIPS skipped: could not build it from {path} ({type(e).__name__}: {e})"
    _freeze(model)

    def dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if next(model.parameters()).device != x.device:    # follows the images (training on a GPU)
            model.to(x.device)
        if x.shape[-1] < 64:             # AlexNet's stride-4 stem leaves almost nothing of tiny images
            x = F.interpolate(x, size=64, mode="bilinear", align_corners=False)
            y = F.interpolate(y, size=64, mode="bilinear", align_corners=False)
        return model(x, y, normalize=False).reshape(x.shape[0])

    return dist, f"LPIPS ({net}, backbone {path})"


def parser_features(parser: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Intermediate features of a face parser: its ``features`` method, else FaceParser's encoder levels."""
    if hasattr(parser, "features"):
        return list(parser.features(x))
    if hasattr(parser, "down"):          # training/readout/face_parser.FaceParser: the U-Net's encoder levels
        feats = []
        for i, block in enumerate(parser.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            feats.append(x)
        return feats
    raise TypeError(f"{type(parser).__name__} has no features(x) method")


def _unit(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return f * torch.rsqrt(f.pow(2).sum(dim=1, keepdim=True) + eps)


def make_parser_distance(parser: nn.Module) -> tuple[Distance, str]:
    _freeze(parser)

    def dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx = parser_features(parser, torch.cat([x, y]))        # one pass for both images
        total = 0.0
        for f in fx:
            a, b = _unit(f).chunk(2)
            total = total + (a - b).pow(2).sum(dim=1).mean(dim=(1, 2))
        return total / len(fx)

    return dist, f"parser features ({type(parser).__name__}, unit-normalised, unweighted)"


def make_perceptual(kind: str, parser: nn.Module | None = None, net: str = "alex"
                    ) -> tuple[Distance | None, str]:
    """(distance fn or None, description); see the module docstring."""
    if kind == "lpips":
        return make_lpips(net)
    if kind == "parser":
        if parser is None:
            return None, "parser perceptual distance skipped: no face parser given"
        return make_parser_distance(parser)
    if kind == "mse":
        return None, "no perceptual term (pixel MSE + mask term only)"
    raise ValueError(f"unknown perceptual kind '{kind}' ({', '.join(KINDS)})")


def resolve_perceptual(kind: str, fallback: str = "parser", parser: nn.Module | None = None,
                       net: str = "alex") -> tuple[Distance | None, str, str]:
    """The configured kind when it can run, else the fallback (then "mse"): (fn, description, kind used)."""
    fn, desc = make_perceptual(kind, parser, net)
    if fn is not None or kind == "mse":
        return fn, desc, kind
    notes = [desc]
    for alt in dict.fromkeys([fallback, "mse"]):
        if alt == kind:
            continue
        fn, alt_desc = make_perceptual(alt, parser, net)
        if fn is not None or alt == "mse":
            return fn, f"{'; '.join(notes)}; the config's fallback chose: {alt_desc}", alt
        notes.append(alt_desc)
    raise AssertionError("unreachable: 'mse' always resolves")
