"""Models for tests/test_custom_model.py, brought to kiln as model=python:custom_models:<callable>."""

import torch
from torch import nn


class SmallCNN(nn.Module):
    """A small CNN: two conv/batch-norm/ReLU stages with dropout, global average pooling, a linear head."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean(dim=(2, 3))
        return self.head(self.dropout(x))


def build(num_classes: int, in_channels: int) -> nn.Module:
    return SmallCNN(num_classes, in_channels)


class NotScriptable(nn.Module):
    """Takes **kwargs in forward, which TorchScript does not compile."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.head = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor, **options) -> torch.Tensor:
        return self.head(x.mean(dim=(2, 3)))


def build_not_scriptable(num_classes: int, in_channels: int) -> nn.Module:
    return NotScriptable(num_classes, in_channels)


def build_not_a_module(num_classes: int, in_channels: int) -> str:
    return "not a module"
