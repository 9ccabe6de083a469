"""ncl_fast: NCL image-manipulation localization (Zhou et al., ICCV 2023), trained
from scratch, with fused losses.

Importing the package never needs a GPU, Triton or the compiled extension: the
fused backends are loaded on first use (see `ncl_fast._backend`).
"""
from . import functional, reference
from ._backend import BackendUnavailableError
from ._version import __version__
from .functional import ncl_loss, ncl_terms, patch_labels, pc_bce, pc_loss
from .model.ncl_loss import NCLLoss

__all__ = [
    "BackendUnavailableError",
    "NCLLoss",
    "functional",
    "ncl_loss",
    "ncl_terms",
    "patch_labels",
    "pc_bce",
    "pc_loss",
    "reference",
]
