"""A ViT segmentation network trained from scratch, for NCL on another backbone
(SPEC.md section 10, the paper's "plug-in merit", Table 4).

Encoder: torchvision's `VisionTransformer` (patch 16, torchvision's random
initialisation, nothing downloaded). Its blocks are used rather than a
hand-written transformer: they are widely used and tested, and the weights keep
torchvision's layout (`encoder.vit.*` loads into torchvision's own class).

Any input whose sides are multiples of 16 works. torchvision's forward asserts
the construction size, so `ViTEncoder` runs the same pieces itself and resizes
the patch-position part of the position embedding to the token grid (bicubic,
`align_corners=True`: what torchvision's `interpolate_embeddings` does to state
dicts), leaving the class token's position as it is. At the construction size
nothing is resized and the result is torchvision's forward.

`features`, the map the Pivot reads: the patch tokens of the last block after the
final LayerNorm, class token dropped, laid back row-major into
`(B, C, H/16, W/16)`; so `s = 16`, and with `patch_px = 16`, `p = 1`, `D = C`.

Head (`ProgressiveDecoder`): 3x3 conv-BN-ReLU to `head_channels` at stride 16,
then twice (bilinear x2, 3x3 conv-BN-ReLU), to stride 8 and stride 4; a 1x1 conv
to one logit at stride 4, bilinearly upsampled to the input size. The auxiliary
heads (variant `full` only) are 1x1 logit convs on the stride-16 and the stride-8
decoder maps, so each decoder stage has a prediction of its own and the PC loss
applies to predictions at strides 16, 8 and 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .deeplab import check_images, conv_bn_relu

#: The ViT patch side in pixels: the token grid has stride 16 (SPEC section 10).
PATCH = 16


@dataclass(frozen=True)
class ViTConfig:
    depth: int  # transformer blocks
    width: int  # embedding width C (the Pivot's channels)
    heads: int  # attention heads
    mlp: int  # hidden width of each block's MLP
    image_size: int  # side at which the position embedding is stored; other sizes interpolate it

    def __post_init__(self) -> None:
        if min(self.depth, self.width, self.heads, self.mlp) < 1:
            raise ValueError(f"every ViT size must be positive, got {self}")
        if self.width % self.heads:
            raise ValueError(f"the ViT width ({self.width}) must be a multiple of its heads ({self.heads})")
        if self.image_size < PATCH or self.image_size % PATCH:
            raise ValueError(f"the ViT image_size must be a positive multiple of {PATCH}, got {self.image_size}")


#: `--backbone` names. tiny/small/base are DeiT's sizes (Touvron et al. 2021), with
#: the position embedding stored at the paper's 512 px crop (SPEC section 8). demo
#: is for CPU minutes at the demo preset's 160 px: its training step took 0.25-0.6x
#: the time of the demo's quarter-width ResNet-18 on 2 shared CPU cores, batch 8
#: (bench/bench_backbones.py), for about as many parameters (1.1 M against 1.0 M).
VIT_CONFIGS = {
    "vit_demo": ViTConfig(depth=4, width=128, heads=4, mlp=512, image_size=160),
    "vit_tiny": ViTConfig(depth=12, width=192, heads=3, mlp=768, image_size=512),
    "vit_small": ViTConfig(depth=12, width=384, heads=6, mlp=1536, image_size=512),
    "vit_base": ViTConfig(depth=12, width=768, heads=12, mlp=3072, image_size=512),
}


def is_vit(backbone) -> bool:
    return isinstance(backbone, (str, ViTConfig))


def vit_config(backbone: str | ViTConfig) -> ViTConfig:
    if isinstance(backbone, ViTConfig):
        return backbone
    if backbone not in VIT_CONFIGS:
        raise ValueError(f"ViT backbone must be one of {', '.join(VIT_CONFIGS)}, got {backbone!r}")
    return VIT_CONFIGS[backbone]


class ViTEncoder(nn.Module):
    """torchvision's ViT, run at any multiple of 16; `forward(x)` returns the token map
    `(B, C, H/16, W/16)` and `tokens(x)` the whole sequence `(B, 1 + N, C)`, class token
    first, after the final LayerNorm."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        # Imported here: the ResNet models need no torchvision (nor its import time).
        try:
            from torchvision.models.vision_transformer import VisionTransformer
        except ImportError as err:
            raise ImportError(f"the ViT backbones need torchvision, the release that pairs with torch "
                              f"{torch.__version__} ({err})") from None
        self.config = config
        # Dropout 0 inside the transformer, as torchvision's own ViT sizes; the
        # segmentation head has its own dropout.
        self.vit = VisionTransformer(image_size=config.image_size, patch_size=PATCH, num_layers=config.depth,
                                     num_heads=config.heads, hidden_dim=config.width, mlp_dim=config.mlp)
        # No classifier: an unused parameter would break DistributedDataParallel.
        self.vit.heads = nn.Identity()
        self.out_channels = config.width
        self.stride = PATCH

    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """`(1, 1 + grid_h * grid_w, C)`: the class token's position, then the patch
        positions resized to the grid (the stored ones at the construction size)."""
        pos = self.vit.encoder.pos_embedding
        n = self.vit.image_size // PATCH
        if (grid_h, grid_w) == (n, n):
            return pos
        C = pos.shape[-1]
        grid = pos[:, 1:].transpose(1, 2).reshape(1, C, n, n)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=True)
        return torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        vit, enc = self.vit, self.vit.encoder
        B = x.shape[0]
        patches = vit.conv_proj(x).flatten(2).transpose(1, 2)  # (B, N, C), row-major over the grid
        seq = torch.cat([vit.class_token.expand(B, -1, -1), patches], dim=1)
        seq = seq + self.position_embedding(x.shape[-2] // PATCH, x.shape[-1] // PATCH)
        return enc.ln(enc.layers(enc.dropout(seq)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C = x.shape[0], self.out_channels
        h, w = x.shape[-2] // PATCH, x.shape[-1] // PATCH
        return self.tokens(x)[:, 1:].transpose(1, 2).reshape(B, C, h, w)


def upsample2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=(2 * x.shape[-2], 2 * x.shape[-1]), mode="bilinear", align_corners=False)


class ProgressiveDecoder(nn.Module):
    """Token map (stride 16) -> 3x3 conv at stride 16 -> x2, 3x3 conv at stride 8 -> x2,
    3x3 conv at stride 4. `forward` returns the three maps, coarsest first."""

    def __init__(self, cin: int, cout: int = 256, dropout: float = 0.1):
        super().__init__()
        self.stage16 = conv_bn_relu(cin, cout, 3)
        # Light dropout, as after DeepLab's ASPP: the model trains from scratch on small sets.
        self.dropout = nn.Dropout(dropout)
        self.stage8 = conv_bn_relu(cout, cout, 3)
        self.stage4 = conv_bn_relu(cout, cout, 3)
        self.out_channels = cout
        self.strides = (16, 8, 4)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d16 = self.dropout(self.stage16(tokens))
        d8 = self.stage8(upsample2(d16))
        d4 = self.stage4(upsample2(d8))
        return d16, d8, d4


class ViTSegmenter(nn.Module):
    """ViT (from scratch) -> progressive-upsampling decoder -> 1-logit head, upsampled
    to the input size; the same contract as `DeepLabV3Plus`.

    `forward(x)` returns a dict: `logits` `(B, 1, H, W)`; `aux`, the logits of the
    auxiliary heads on the stride-16 and stride-8 decoder maps, empty without
    `aux_heads`; `features`, the token map `(B, C, H/16, W/16)` for the Pivot.
    """

    #: input sides must be multiples of this (the ViT patch size)
    size_multiple = PATCH

    def __init__(self, backbone: str | ViTConfig = "vit_small", aux_heads: bool = True, dropout: float = 0.1,
                 head_channels: int = 256):
        super().__init__()
        self.encoder = ViTEncoder(vit_config(backbone))
        self.decoder = ProgressiveDecoder(self.encoder.out_channels, head_channels, dropout)
        self.head = nn.Conv2d(self.decoder.out_channels, 1, 1)
        # Only the `full` variant trains the auxiliary heads (every parameter trains under DDP).
        self.aux_heads = aux_heads
        if aux_heads:
            self.aux_head_16 = nn.Conv2d(self.decoder.out_channels, 1, 1)
            self.aux_head_8 = nn.Conv2d(self.decoder.out_channels, 1, 1)

    @property
    def feature_channels(self) -> int:
        return self.encoder.out_channels

    def check_input(self, x: torch.Tensor) -> None:
        check_images(x, self.size_multiple)

    def forward(self, x: torch.Tensor) -> dict:
        self.check_input(x)
        feat = self.encoder(x)
        d16, d8, d4 = self.decoder(feat)
        logits = F.interpolate(self.head(d4), size=x.shape[-2:], mode="bilinear", align_corners=False)
        aux = [self.aux_head_16(d16), self.aux_head_8(d8)] if self.aux_heads else []
        return {"logits": logits, "aux": aux, "features": feat}
