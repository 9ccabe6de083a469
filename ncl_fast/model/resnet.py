"""ResNet-18/34/50/101 encoders, built here with random initialisation.

NCL trains from scratch (no pre-trained weights is the point of the paper), so
nothing is downloaded. Output stride 8: `layer3` is dilated by 2 and `layer4`
by 4 instead of striding. `forward` returns the five stages of SPEC.md
section 1: stage 1 = conv1 (before the max-pool), stages 2-5 = layer1-4.
"""
from __future__ import annotations

import torch
from torch import nn


def conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, dilation: int = 1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(cin, width, stride, dilation)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, 1, dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, dilation: int = 1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


#: depth -> (block, blocks per layer)
ARCHS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


class ResNetEncoder(nn.Module):
    """ResNet at output stride 8; `out_channels[i]` and `strides[i]` describe stage i+1."""

    def __init__(self, depth: int = 101, width: int = 64):
        """`width` is the stem's channel count (64 in ResNet); every stage scales with
        it. Smaller widths are for quick CPU runs only (the `demo` preset)."""
        super().__init__()
        if depth not in ARCHS:
            raise ValueError(f"backbone depth must be one of {sorted(ARCHS)}, got {depth}")
        if width < 8 or width % 8:
            raise ValueError(f"width must be a positive multiple of 8, got {width}")
        block, layers = ARCHS[depth]
        self.depth = depth
        w = width
        self.conv1 = nn.Conv2d(3, w, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._cin = w
        self._dilation = 1
        self.layer1 = self._make_layer(block, w, layers[0], stride=1)
        self.layer2 = self._make_layer(block, 2 * w, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * w, layers[2], stride=2, dilate=True)  # dilation 2
        self.layer4 = self._make_layer(block, 8 * w, layers[3], stride=2, dilate=True)  # dilation 4
        e = block.expansion
        self.out_channels = (w, w * e, 2 * w * e, 4 * w * e, 8 * w * e)
        self.strides = (2, 4, 8, 8, 8)
        self._init_weights()

    def _make_layer(self, block, width: int, blocks: int, stride: int, dilate: bool = False) -> nn.Sequential:
        previous_dilation = self._dilation
        if dilate:  # trade the stride for dilation (output stride 8)
            self._dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self._cin != width * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self._cin, width * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(width * block.expansion),
            )
        mods = [block(self._cin, width, stride, previous_dilation, downsample)]
        self._cin = width * block.expansion
        mods += [block(self._cin, width, 1, self._dilation) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero the last BN of every residual branch so each block starts as the
        # identity: the usual recipe for training deep ResNets from scratch.
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        s1 = self.relu(self.bn1(self.conv1(x)))
        s2 = self.layer1(self.maxpool(s1))
        s3 = self.layer2(s2)
        s4 = self.layer3(s3)
        s5 = self.layer4(s4)
        return [s1, s2, s3, s4, s5]
