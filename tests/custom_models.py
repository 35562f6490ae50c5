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


class Block(nn.Module):
    """A ResNet basic block: two 3x3 conv/batch-norm stages, a projected shortcut where the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A user's ResNet for small images, CIFAR ResNet-sized: a 3x3 stem and three stages of one basic block
    each (16, 32, 64 channels; the last two halve the resolution), global average pooling, a linear head."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.stages = nn.Sequential(Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2))
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build_resnet(num_classes: int, in_channels: int) -> nn.Module:
    return SmallResNet(num_classes, in_channels)


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
