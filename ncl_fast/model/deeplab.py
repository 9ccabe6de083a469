"""DeepLabV3+ with one logit per pixel and auxiliary heads (SPEC.md section 7)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import ResNetEncoder


def conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def check_images(x: torch.Tensor, multiple: int) -> None:
    """A network's input check: `(B, 3, H, W)`, B > 0, sides multiples of its stride."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("empty batch (B = 0): pass at least one image")
    H, W = x.shape[-2:]
    if H % multiple or W % multiple:
        raise ValueError(
            f"image size {H}x{W} is not a multiple of {multiple} (the network stride): "
            f"resize or pad the images, e.g. to 512x512"
        )


class ImagePooling(nn.Module):
    """ASPP's image-level branch. No BatchNorm after the 1x1 conv: on a 1x1 map it
    would need more than one image per device, and batch 1 per GPU is common at 1024."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(F.adaptive_avg_pool2d(x, 1)))
        return y.expand(-1, -1, x.shape[2], x.shape[3])


class ASPP(nn.Module):
    """1x1 branch, three atrous 3x3 branches, image pooling; concatenated and projected."""

    def __init__(self, cin: int, cout: int = 256, rates: tuple[int, ...] = (12, 24, 36), dropout: float = 0.1):
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(cin, cout, 1)] + [conv_bn_relu(cin, cout, 3, r) for r in rates] + [ImagePooling(cin, cout)]
        )
        self.project = conv_bn_relu(cout * (len(rates) + 2), cout, 1)
        # Light dropout: the model trains from scratch on small forensic sets.
        self.dropout = nn.Dropout(dropout)
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.project(torch.cat([b(x) for b in self.branches], dim=1)))


class Decoder(nn.Module):
    """Stride-4 low-level features (1x1 to 48) + upsampled ASPP output, two 3x3 convs."""

    def __init__(self, low_channels: int, aspp_channels: int = 256, low_out: int = 48, cout: int = 256):
        super().__init__()
        self.reduce = conv_bn_relu(low_channels, low_out, 1)
        self.fuse = nn.Sequential(conv_bn_relu(aspp_channels + low_out, cout, 3), conv_bn_relu(cout, cout, 3))
        self.out_channels = cout

    def forward(self, aspp_out: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(aspp_out, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([up, self.reduce(low)], dim=1))


class DeepLabV3Plus(nn.Module):
    """ResNet (OS 8) -> ASPP -> decoder -> 1-logit head, upsampled to the input size.

    `forward(x)` returns a dict: `logits` `(B, 1, H, W)`; `aux`, the logits of the
    auxiliary heads on the ASPP output (stride 8) and on the decoder output
    (stride 4), empty without `aux_heads`; `features`, the backbone stage
    `pivot_stage` (1..5) for the Pivot.
    """

    #: input sides must be multiples of this (the encoder's largest stride)
    size_multiple = 8

    def __init__(
        self,
        backbone: int = 101,
        pivot_stage: int = 1,
        aspp_rates=(12, 24, 36),
        aux_heads: bool = True,
        dropout: float = 0.1,
        width: int = 64,
        head_channels: int = 256,
    ):
        super().__init__()
        if pivot_stage not in (1, 2, 3, 4, 5):
            raise ValueError(f"pivot_stage must be 1..5 (ResNet stage numbering), got {pivot_stage}")
        self.encoder = ResNetEncoder(backbone, width)
        self.pivot_stage = pivot_stage
        self.aspp = ASPP(self.encoder.out_channels[-1], head_channels, tuple(aspp_rates), dropout)
        # 48 low-level channels per 256 head channels, as in DeepLabV3+
        low = max(8, head_channels * 48 // 256)
        self.decoder = Decoder(self.encoder.out_channels[1], self.aspp.out_channels, low, head_channels)
        self.head = nn.Conv2d(self.decoder.out_channels, 1, 1)
        # Only the `full` variant trains the auxiliary heads; without them no
        # parameter goes unused (DistributedDataParallel requires that).
        self.aux_heads = aux_heads
        if aux_heads:
            self.aux_head_aspp = nn.Conv2d(self.aspp.out_channels, 1, 1)
            self.aux_head_decoder = nn.Conv2d(self.decoder.out_channels, 1, 1)

    @property
    def feature_channels(self) -> int:
        return self.encoder.out_channels[self.pivot_stage - 1]

    def check_input(self, x: torch.Tensor) -> None:
        check_images(x, self.size_multiple)

    def forward(self, x: torch.Tensor) -> dict:
        self.check_input(x)
        stages = self.encoder(x)
        a = self.aspp(stages[-1])
        d = self.decoder(a, stages[1])
        logits = F.interpolate(self.head(d), size=x.shape[-2:], mode="bilinear", align_corners=False)
        aux = [self.aux_head_aspp(a), self.aux_head_decoder(d)] if self.aux_heads else []
        return {"logits": logits, "aux": aux, "features": stages[self.pivot_stage - 1]}
