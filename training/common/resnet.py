"""ResNet-18 with torchvision's state-dict names (torchvision itself is not a dependency).

``resnet18(num_classes=...)`` builds the network; ``load_pretrained(model, path)`` loads torchvision
ImageNet weights (``resnet18-f37072fd.pth`` or a .safetensors copy) from a local file a user
already has -- nothing is downloaded. ``ResNetEstimator`` puts the estimator heads of the model
contract (``training/estimator/export.py``) on a ResNet-18 trunk.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, layers: Sequence[int] = (2, 2, 2, 2), num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x):
        return self.fc(self.features(x))


def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes=num_classes)


def load_pretrained(model: ResNet, path: str | os.PathLike, strict_trunk: bool = True) -> list[str]:
    """Load torchvision ResNet-18 weights from a local file into ``model``.

    The classifier (``fc.*``) is skipped when its shape differs (another ``num_classes``).
    Returns the names of the parameters left at their initial values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = [k for k in state if k not in usable]
    if strict_trunk and any(not k.startswith("fc.") for k in skipped):
        raise ValueError(f"{path}: not ResNet-18 weights (unexpected or mismatched: {skipped[:5]})")
    missing = [k for k in own if k not in usable]
    if strict_trunk and any(not k.startswith("fc.") for k in missing):
        raise ValueError(f"{path}: ResNet-18 weights incomplete (missing: {missing[:5]})")
    model.load_state_dict(usable, strict=False)
    return missing


class ResNetEstimator(nn.Module):
    """ResNet-18 trunk + estimator heads: (sigmoid continuous, [logits per slot])."""

    def __init__(self, n_continuous: int, slot_sizes: Sequence[int], trunk: ResNet | None = None):
        super().__init__()
        self.trunk = trunk or resnet18()
        self.trunk.fc = nn.Identity()
        self.continuous = nn.Linear(512, n_continuous) if n_continuous else None
        self.n_continuous = n_continuous
        self.slots = nn.ModuleList(nn.Linear(512, k) for k in slot_sizes)

    def forward(self, x):
        f = self.trunk.features(x)
        if self.continuous is not None:
            cont = torch.sigmoid(self.continuous(f))
        else:
            cont = f.new_zeros((f.shape[0], 0))
        return cont, [head(f) for head in self.slots]
