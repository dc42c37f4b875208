"""A small CIFAR-style ResNet for the image task, small enough to train on a CPU in seconds.

Module names are public (routing policies and model surgery match them):
``stem.conv``/``stem.bn``, ``stages.S.B.conv1``/``bn1``/``conv2``/``bn2``,
``stages.S.B.shortcut`` (when the shape changes) and ``fc``. Every residual
block is a ``BasicBlock``, which is what stochastic depth and squeeze-excite
look for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ResNetConfig:
    num_classes: int
    in_channels: int = 1
    widths: tuple[int, ...] = (16, 32, 64)
    blocks_per_stage: int = 1
    dropout: float = 0.0  # before the classifier (what gyro dropout replaces)

    def __post_init__(self) -> None:
        if self.num_classes < 2 or self.in_channels < 1 or self.blocks_per_stage < 1 or not self.widths:
            raise ValueError(f"invalid ResNet config {self}")
        if any(w < 1 for w in self.widths):
            raise ValueError(f"every stage width must be at least 1, got {self.widths}")


class ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (He et al. 2016)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The branch that stochastic depth drops and squeeze-excite reweights."""
        out = F.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.shortcut(x) + self.residual(x))


class ResNet(nn.Module):
    """``forward`` maps images [B, C, H, W] to logits [B, num_classes]; any H, W >= 4 works (global pooling)."""

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        widths = config.widths
        self.stem = ConvBN(config.in_channels, widths[0])
        stages = []
        cin = widths[0]
        for index, width in enumerate(widths):
            blocks = []
            for b in range(config.blocks_per_stage):
                stride = 2 if index > 0 and b == 0 else 1
                blocks.append(BasicBlock(cin, width, stride))
                cin = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.drop = nn.Dropout(config.dropout)
        self.fc = nn.Linear(cin, config.num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = self.stages(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(self.drop(x))

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy; ``targets`` are labels [B] or distributions [B, K] (MixUp, label smoothing)."""
        logits = logits.float()
        if targets.dim() == logits.dim():
            return -(targets * F.log_softmax(logits, dim=-1)).sum()
        return F.cross_entropy(logits, targets, reduction="sum")

    @staticmethod
    def example_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-example loss [B] (selective backprop ranks examples by it)."""
        logits = logits.float()
        if targets.dim() == logits.dim():
            return -(targets * F.log_softmax(logits, dim=-1)).sum(-1)
        return F.cross_entropy(logits, targets, reduction="none")

    @staticmethod
    def loss_units(targets: torch.Tensor) -> torch.Tensor:
        return torch.tensor(targets.shape[0])

    @staticmethod
    def accuracy_counts(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Correct predictions in the batch (hard labels, or the argmax of distributions)."""
        labels = targets.argmax(-1) if targets.dim() == logits.dim() else targets
        return (logits.argmax(-1) == labels).sum()
