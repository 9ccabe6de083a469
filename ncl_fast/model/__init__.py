"""DeepLabV3+ (ResNet, output stride 8) with the NCL Pivot and losses."""
from .deeplab import ASPP, Decoder, DeepLabV3Plus
from .loss import VARIANTS, LossConfig, NCLCriterion
from .ncl_loss import NCLLoss
from .net import NCLModel
from .pivot import Pivot, PivotBranch
from .resnet import ResNetEncoder

__all__ = [
    "ASPP",
    "Decoder",
    "DeepLabV3Plus",
    "LossConfig",
    "NCLCriterion",
    "NCLLoss",
    "NCLModel",
    "Pivot",
    "PivotBranch",
    "ResNetEncoder",
    "VARIANTS",
]
