"""DeepLabV3+ (ResNet, output stride 8) or a ViT, with the NCL Pivot and losses."""
from .deeplab import ASPP, Decoder, DeepLabV3Plus
from .loss import VARIANTS, LossConfig, NCLCriterion
from .ncl_loss import NCLLoss
from .net import BACKBONES, NCLModel, describe_backbone
from .pivot import Pivot, PivotBranch
from .resnet import ResNetEncoder
from .vit import VIT_CONFIGS, ProgressiveDecoder, ViTConfig, ViTEncoder, ViTSegmenter

__all__ = [
    "ASPP",
    "BACKBONES",
    "Decoder",
    "DeepLabV3Plus",
    "LossConfig",
    "NCLCriterion",
    "NCLLoss",
    "NCLModel",
    "Pivot",
    "PivotBranch",
    "ProgressiveDecoder",
    "ResNetEncoder",
    "VARIANTS",
    "VIT_CONFIGS",
    "ViTConfig",
    "ViTEncoder",
    "ViTSegmenter",
    "describe_backbone",
]
