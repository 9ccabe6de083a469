"""Input validation shared by every backend (SPEC.md sections 1, 2 and 6).

Every public op (`ncl_fast.functional`, `ncl_fast.reference`, `NCLLoss`) checks
its arguments here, once, at its entry, before any backend runs, so that a user
gets the same message whichever implementation was chosen; the backends and the
kernels trust what they are given. Each message says what is wrong and what to do
about it.

Sizes are compared, never converted with `int()`, so that under
`torch.compile(dynamic=True)` a check adds no guard that pins a shape.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PatchGrid:
    """Geometry of the patch grid of SPEC.md section 1."""

    stride_y: int  # s along rows: H / h
    stride_x: int  # s along columns: W / w
    patch: int  # p, in feature cells
    rows: int  # R = h // p
    cols: int  # Q = w // p

    @property
    def num_patches(self) -> int:
        return self.rows * self.cols

    @property
    def window_y(self) -> int:
        """Height in mask pixels of one patch: p * s."""
        return self.patch * self.stride_y

    @property
    def window_x(self) -> int:
        return self.patch * self.stride_x


def check_mask(mask: torch.Tensor, name: str = "mask") -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(
            f"{name} must have shape (B, 1, H, W), got {tuple(mask.shape)}; "
            f"add the channel axis with {name}.unsqueeze(1) or keep one channel"
        )
    if mask.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (B = 0); pass at least one image")
    if mask.shape[2] == 0 or mask.shape[3] == 0:
        raise ValueError(f"{name} has an empty spatial size {tuple(mask.shape[2:])}")
    if mask.is_complex():
        raise ValueError(f"{name} must be bool, integer or floating point, got {mask.dtype}")


def check_feature_map(feat: torch.Tensor, name: str = "feat") -> None:
    if not isinstance(feat, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(feat).__name__}")
    if feat.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, h, w), got {tuple(feat.shape)}")
    if feat.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (B = 0); pass at least one image")
    if not feat.is_floating_point():
        raise ValueError(f"{name} must be floating point (fp32, bf16, fp16 or fp64), got {feat.dtype}")


def integer_stride(full: int, reduced: int, axis: str, what: str) -> int:
    """`full / reduced` as an int, or a ValueError naming both sizes."""
    if reduced <= 0 or full % reduced != 0:
        raise ValueError(
            f"the {what} stride along {axis} is not an integer: the mask has {full} pixels "
            f"and the {what} {reduced}; SPEC requires H / h to be an integer, so resize the "
            f"image to a multiple of the network stride (e.g. 512)"
        )
    return full // reduced


def patch_grid(mask_hw: tuple[int, int], feature_hw: tuple[int, int], patch: int) -> PatchGrid:
    """Validate the feature stride and the patch size and return the grid."""
    H, W = mask_hw[0], mask_hw[1]
    h, w = feature_hw[0], feature_hw[1]
    sy = integer_stride(H, h, "rows", "feature map")
    sx = integer_stride(W, w, "columns", "feature map")
    if isinstance(patch, bool) or not isinstance(patch, (int, torch.SymInt)) or patch < 1:
        raise ValueError(
            f"patch must be a positive integer number of feature cells, got {patch!r}; "
            f"it is patch_px / stride (16 px / stride 2 = 8 at stage 1)"
        )
    R, Q = h // patch, w // patch
    if R == 0 or Q == 0:
        raise ValueError(
            f"the feature map ({h}x{w}) is smaller than one patch ({patch}x{patch} cells): "
            f"no patch fits; use a larger image or a smaller patch"
        )
    return PatchGrid(stride_y=sy, stride_x=sx, patch=patch, rows=R, cols=Q)


def patch_cells(patch_px: int, stride: int) -> int:
    """p = patch_px / s, or a ValueError if the stride does not divide the patch."""
    if patch_px % stride != 0:
        raise ValueError(
            f"the patch size of {patch_px} px is not a whole number of feature cells at stride "
            f"{stride}; choose patch_px as a multiple of {stride}"
        )
    return patch_px // stride


def check_tol(tol: float) -> None:
    if not 0.0 <= float(tol) < 0.5:
        raise ValueError(f"tol must be in [0, 0.5), got {tol}")


def check_same_batch(**tensors: torch.Tensor) -> None:
    sizes = {name: t.shape[0] for name, t in tensors.items()}
    if len(set(sizes.values())) > 1:
        desc = ", ".join(f"{n} has {b}" for n, b in sizes.items())
        raise ValueError(f"batch sizes differ ({desc}); pass the masks of the same images")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors are on different devices ({desc}); move them to one device")


def check_anchor(anchor: torch.Tensor, batch: int, length: int, name: str) -> None:
    if not isinstance(anchor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(anchor).__name__}")
    if tuple(anchor.shape) != (batch, length):
        raise ValueError(
            f"{name} must have shape (B, D) = ({batch}, {length}) with D = C * p * p, "
            f"got {tuple(anchor.shape)}"
        )


def check_labels(labels: torch.Tensor, batch: int, num_patches: int) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if tuple(labels.shape) != (batch, num_patches):
        raise ValueError(
            f"labels must have shape (B, L) = ({batch}, {num_patches}), got {tuple(labels.shape)}; "
            f"compute them with patch_labels(mask, feat.shape[-2:], patch)"
        )
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor (uint8), got {labels.dtype}")
    # Values are read only where that is free (CPU tensors): on a GPU it would make the
    # host wait. There, a value outside {0, 1, 2} puts its patch in none of P, N, K.
    if (labels.device.type == "cpu" and labels.numel() and not torch.compiler.is_compiling()
            and not bool(((labels >= 0) & (labels <= 2)).all())):
        bad = labels[(labels < 0) | (labels > 2)].unique()[:5].tolist()
        raise ValueError(
            f"labels must be 0 (authentic), 1 (tampered) or 2 (contour); found {bad}; "
            f"compute them with patch_labels(mask, feat.shape[-2:], patch)"
        )


def check_logits(logits: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
    """Check one prediction against the mask; return its strides (s_y, s_x)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"logits must have shape (B, 1, h, w), got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    check_same_batch(logits=logits, mask=mask)
    check_same_device(logits=logits, mask=mask)
    sy = integer_stride(mask.shape[2], logits.shape[2], "rows", "prediction")
    sx = integer_stride(mask.shape[3], logits.shape[3], "columns", "prediction")
    return sy, sx


def check_pc_args(mu: float, radius: int) -> None:
    if not 0.0 <= float(mu) <= 1.0:
        raise ValueError(f"mu must be in [0, 1], got {mu}")
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
        raise ValueError(f"radius must be a non-negative integer (pixels), got {radius!r}")


def check_tau(tau: float) -> None:
    if not float(tau) > 0:
        raise ValueError(f"tau must be positive, got {tau}")


def check_patch_labels_args(mask: torch.Tensor, feature_size, patch: int, tol: float) -> PatchGrid:
    """Validate the arguments of `patch_labels`; return the patch grid of the mask."""
    check_mask(mask)
    check_tol(tol)
    if isinstance(feature_size, (int, torch.SymInt)):
        feature_size = (feature_size, feature_size)
    return patch_grid(mask.shape[-2:], tuple(feature_size), patch)


def check_anchors(feat: torch.Tensor, patch: int, anchor_pos: torch.Tensor, anchor_neg: torch.Tensor) -> None:
    B, C = feat.shape[:2]
    D = C * patch * patch
    check_anchor(anchor_pos, B, D, "anchor_pos")
    check_anchor(anchor_neg, B, D, "anchor_neg")
    check_same_device(feat=feat, anchor_pos=anchor_pos, anchor_neg=anchor_neg)


def check_ncl_inputs(feat, labels, anchor_pos, anchor_neg, patch: int, tau: float) -> PatchGrid:
    """Validate the arguments of `ncl_terms`; return the patch grid of the feature map."""
    check_feature_map(feat)
    check_tau(tau)
    grid = patch_grid(feat.shape[-2:], feat.shape[-2:], patch)
    check_labels(labels, feat.shape[0], grid.num_patches)
    check_same_device(feat=feat, labels=labels)
    check_anchors(feat, patch, anchor_pos, anchor_neg)
    return grid


def check_ncl_loss_args(feat: torch.Tensor, mask: torch.Tensor, patch: int, tau: float, tol: float) -> PatchGrid:
    """Validate the arguments of `ncl_loss` once the two maps have passed `check_feature_map`
    and `check_mask`; return the patch grid (of the mask: its rows and columns are the
    feature map's too)."""
    check_same_batch(feat=feat, mask=mask)
    check_same_device(feat=feat, mask=mask)
    check_tau(tau)
    check_tol(tol)
    return patch_grid(mask.shape[-2:], feat.shape[-2:], patch)


def check_pc_inputs(logits_list, mask: torch.Tensor, mu: float, radius: int) -> None:
    """Validate the arguments of `pc_loss` (a list of predictions) or `pc_bce` (a list of one)."""
    check_mask(mask)
    check_pc_args(mu, radius)
    if len(logits_list) == 0:
        raise ValueError("pc_loss needs at least one prediction; pass the model's logits list")
    B, H, W = mask.shape[0], mask.shape[2], mask.shape[3]
    for z in logits_list:
        # a training step passes here every step: the valid case in one expression, and
        # check_logits (which raises, naming what is wrong) only when it fails
        if not (isinstance(z, torch.Tensor) and z.dim() == 4 and z.shape[1] == 1 and z.is_floating_point()
                and z.shape[0] == B and z.device == mask.device and z.shape[2] > 0 and z.shape[3] > 0
                and H % z.shape[2] == 0 and W % z.shape[3] == 0):
            check_logits(z, mask)
