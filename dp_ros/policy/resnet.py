"""ResNet-18 written in the project (torchvision is not a dependency).

Parameter names mirror torchvision's (`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.downsample.0`,
...) so weights from torchvision, robomimic or LeRobot map one to one. With ``norm="group"``
every BatchNorm becomes GroupNorm with channels/16 groups, as in the Diffusion Policy paper
(BatchNorm statistics drift badly with the EMA weights the paper uses).
"""

from __future__ import annotations

import torch
from torch import nn


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(num_groups=channels // 16, num_channels=channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"unknown norm {kind!r} (expected 'group' or 'batch')")


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = make_norm(norm, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = make_norm(norm, out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), make_norm(norm, out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18Trunk(nn.Module):
    """ResNet-18 without its average pool and classifier: (B, 3, H, W) -> (B, 8*width, H/32, W/32).

    ``width`` is the first stage's channel count: 64 is torchvision's ResNet-18; a narrower
    trunk (e.g. 16, 1/16 of the FLOPs) makes an image policy trainable on a laptop CPU.
    """

    def __init__(self, norm: str = "group", width: int = 64):
        super().__init__()
        self.out_channels = 8 * width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = make_norm(norm, width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [width, 2 * width, 4 * width, 8 * width]
        in_ch = width
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(
                BasicBlock(in_ch, w, stride, norm), BasicBlock(w, w, 1, norm)))
            in_ch = w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    @staticmethod
    def output_size(height: int, width: int) -> tuple[int, int]:
        """Spatial size of the trunk's output for an input of height x width."""
        def down(n: int) -> int:
            n = (n + 2 * 3 - 7) // 2 + 1  # conv1
            n = (n + 2 * 1 - 3) // 2 + 1  # maxpool
            for _ in range(3):  # layer2..4, stride 2
                n = (n + 2 * 1 - 3) // 2 + 1
            return n
        return down(height), down(width)
