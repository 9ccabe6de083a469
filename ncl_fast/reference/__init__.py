"""The executable form of SPEC.md: plain PyTorch, no Triton, no extension.

Every fast backend is tested against these functions, and they are the
run-time fallback wherever a fast backend is not available.
"""
from . import ncl, patches, pc
from .ncl import ncl_terms
from .patches import AUTHENTIC, CONTOUR, TAMPERED, patch_features, patch_labels
from .pc import pc_bce, pc_loss

__all__ = [
    "AUTHENTIC",
    "CONTOUR",
    "TAMPERED",
    "ncl_terms",
    "patch_features",
    "patch_labels",
    "pc_bce",
    "pc_loss",
]
