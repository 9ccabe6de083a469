"""`L = omega * L_NCL + L_PC` and the ablation variants of SPEC.md section 7."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import _checks, functional

VARIANTS = ("base", "pivot", "full")

#: the loss ops each variant runs (what a command announces a backend for)
VARIANT_OPS = {"base": ("pc_bce",), "pivot": ("pc_bce", "patch_labels", "ncl_terms"),
               "full": ("pc_loss", "patch_labels", "ncl_terms")}
#: the scalars each variant's criterion returns, the total `loss` last
VARIANT_PARTS = {"base": ("bce", "loss"), "pivot": ("bce", "ncl", "loss"), "full": ("pc", "ncl", "loss")}


@dataclass
class LossConfig:
    variant: str = "full"
    omega: float = 0.01
    mu: float = 0.9
    radius: int = 2  # contour band half-width, in pixels of each prediction's grid
    patch_px: int = 16  # patch side in input pixels
    tau: float = 0.1
    tol: float = 0.0
    impl: str | None = None  # backend, see ncl_fast._backend

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.omega < 0:
            raise ValueError(f"omega must be >= 0, got {self.omega}")
        _checks.check_pc_args(self.mu, self.radius)
        _checks.check_tol(self.tol)
        if self.tau <= 0:
            raise ValueError(f"tau must be positive, got {self.tau}")
        if self.patch_px < 1:
            raise ValueError(f"patch_px must be a positive integer, got {self.patch_px}")

    @property
    def ops(self) -> tuple[str, ...]:
        """The loss ops this variant runs (`ncl_fast.functional` names)."""
        return VARIANT_OPS[self.variant]

    @property
    def parts(self) -> tuple[str, ...]:
        """The names of the scalars the criterion returns, `loss` (the total) last."""
        return VARIANT_PARTS[self.variant]


class NCLCriterion(nn.Module):
    """Computes the training loss from the model's outputs.

    * `base`: plain BCE on the final output.
    * `pivot`: `base` + `omega * L_NCL`.
    * `full`: `omega * L_NCL` + the PC loss on every prediction, each at its own stride
      (DeepLabV3+: 8, 4, 1; ViTSegmenter: 16, 8, 1).

    Returns a dict with `loss` and its parts (`ncl`, `pc` or `bce`), all scalars.
    """

    def __init__(self, config: LossConfig | None = None):
        super().__init__()
        self.config = config or LossConfig()

    def patch_cells(self, image_hw, feature_hw) -> int:
        s = _checks.integer_stride(image_hw[0], feature_hw[0], "rows", "feature map")
        return _checks.patch_cells(self.config.patch_px, s)

    def forward(self, outputs: dict, mask: torch.Tensor, pivot: nn.Module | None) -> dict:
        cfg = self.config
        logits = outputs["logits"]
        parts = {}
        if cfg.variant == "full":
            preds = list(outputs["aux"]) + [logits]
            parts["pc"] = functional.pc_loss(preds, mask, cfg.mu, cfg.radius, impl=cfg.impl)
            total = parts["pc"]
        else:
            # mu = 0 turns the PC loss into the plain mean BCE.
            parts["bce"] = functional.pc_bce(logits, mask, 0.0, cfg.radius, impl=cfg.impl)
            total = parts["bce"]
        if cfg.variant in ("pivot", "full"):
            if pivot is None:
                raise ValueError(f"variant {cfg.variant!r} needs the Pivot network")
            feat = outputs["features"]
            p = self.patch_cells(mask.shape[-2:], feat.shape[-2:])
            parts["ncl"] = functional.ncl_loss(feat, mask, pivot, p, cfg.tau, cfg.tol, impl=cfg.impl)
            total = total + cfg.omega * parts["ncl"]
        parts["loss"] = total
        return parts
