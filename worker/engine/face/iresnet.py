"""IResNet (ArcFace's improved ResNet) for 112×112 ArcFace-aligned faces, 512-d.

Parameter and buffer names follow insightface
``recognition/arcface_torch/backbones/iresnet.py`` exactly, so its public
checkpoints (r18 … r100) load with ``strict=True``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

# Input normalisation on [0, 1] images: (x - 0.5) / 0.5.
MEAN = 0.5
STD = 0.5

LAYERS: dict[str, tuple[int, int, int, int]] = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
}


def _conv3x3(inp: int, oup: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inp, oup, 3, stride, 1, bias=False)


class IBasicBlock(nn.Module):
    """BN → conv → BN → PReLU → conv(stride) → BN, plus the (projected) input."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                nn.BatchNorm2d(planes, eps=1e-5),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """Takes normalised [B, 3, 112, 112] crops, returns [B, num_features] (not L2-normalised)."""

    input_size = (112, 112)

    def __init__(
        self, layers: tuple[int, int, int, int], num_features: int = 512, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.embedding_dim = num_features
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        inplanes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            blocks = [IBasicBlock(inplanes, planes, stride=2)]
            blocks += [IBasicBlock(planes, planes) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        # Not in place: an in-place op on a view would break gradients to the input.
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)
        # As in arcface_torch: the final BN has a fixed unit scale, only a shift is learnt.
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def layers_of(state: dict[str, Tensor]) -> tuple[int, int, int, int]:
    """Blocks per stage of an IResNet state_dict (``layerN.M.conv1.weight`` keys)."""
    counts = []
    for stage in range(1, 5):
        blocks = {
            int(k.split(".")[1])
            for k in state
            if k.startswith(f"layer{stage}.") and k.endswith(".conv1.weight")
        }
        if not blocks or blocks != set(range(len(blocks))):
            raise ValueError(f"not an IResNet state_dict: layer{stage} has no consecutive blocks")
        counts.append(len(blocks))
    return counts[0], counts[1], counts[2], counts[3]


def name_of(layers: tuple[int, ...]) -> str | None:
    """``"r50"`` for (3, 4, 14, 3) etc.; None for depths without a standard name."""
    return next((name for name, ls in LAYERS.items() if ls == tuple(layers)), None)


def from_state_dict(state: dict[str, Tensor]) -> IResNet:
    """An IResNet holding an arcface_torch ``state`` (depth and width read from it),
    loaded as float32 with ``strict=True``, in eval mode."""
    model = IResNet(layers_of(state), num_features=state["fc.weight"].shape[0])
    model.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True
    )
    return model.eval()


def load_iresnet(path: str | Path, map_location: str | torch.device = "cpu") -> IResNet:
    """An IResNet from a plain arcface_torch state_dict file (e.g. ``backbone.pth``)."""
    return from_state_dict(torch.load(path, map_location=map_location, weights_only=True))


def get_backbone(name: str, num_features: int = 512, dropout: float = 0.0) -> IResNet:
    """``"r18" | "r34" | "r50" | "r100"`` (``"iresnet50"`` etc. also accepted)."""
    key = name.lower().replace("iresnet", "r")
    if key not in LAYERS:
        raise ValueError(f"unknown IResNet {name!r}; expected one of {sorted(LAYERS)}")
    return IResNet(LAYERS[key], num_features=num_features, dropout=dropout)
