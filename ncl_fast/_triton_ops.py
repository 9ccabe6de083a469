"""The Triton backend (`impl="triton"`): `patch_labels` and `ncl_terms`.

Each op is a `torch.library.custom_op` with a fake (meta) kernel, and
`ncl_terms` has its autograd registered on the op, so `torch.compile` traces a
training step through the loss without a graph break. Counts and lists stay on
the device: nothing in the forward or backward synchronizes with the host.

Runs CUDA tensors, and CPU tensors when Triton's interpreter is on
(`TRITON_INTERPRET=1` before the first import of Triton), which is how CI tests it.
"""
from __future__ import annotations

import torch

from . import _checks
from .kernels import ncl_terms as _k_ncl
from .kernels import patch_labels as _k_labels

FEATURE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supports(device: torch.device) -> str | None:
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        return None if _k_ncl.INTERPRET else "Triton runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
    return f"Triton has no kernels for {device.type} tensors here"


# ---- patch labels -------------------------------------------------------------------------------


@torch.library.custom_op("ncl_fast::patch_labels_triton", mutates_args=())
def _patch_labels_op(mask: torch.Tensor, win_y: int, win_x: int, rows: int, cols: int, tol: float) -> torch.Tensor:
    return _k_labels.patch_labels_fwd(mask, (win_y, win_x), (rows, cols), tol)


@_patch_labels_op.register_fake
def _(mask, win_y, win_x, rows, cols, tol):
    return mask.new_empty(mask.shape[0], rows * cols, dtype=torch.uint8)


def patch_labels(mask: torch.Tensor, grid: _checks.PatchGrid, tol: float) -> torch.Tensor:
    """`ncl_fast.functional.patch_labels` on checked inputs."""
    return _patch_labels_op(mask, grid.window_y, grid.window_x, grid.rows, grid.cols, float(tol))


# ---- NCL terms ----------------------------------------------------------------------------------

_NCL_OUTPUTS = 3 + len(_k_ncl.NCLSaved._fields)  # terms, counts, perm, then NCLSaved's fields


@torch.library.custom_op("ncl_fast::ncl_terms_triton", mutates_args=())
def _ncl_terms_op(
    feat: torch.Tensor,
    labels: torch.Tensor,
    anchor_pos: torch.Tensor,
    anchor_neg: torch.Tensor,
    patch: int,
    rows: int,
    cols: int,
    tau: float,
    slot: int,
) -> tuple[(torch.Tensor,) * _NCL_OUTPUTS]:  # terms, counts, perm, then NCLSaved's fields
    counts, perm = _k_labels.patch_lists_fwd(labels)
    terms, saved = _k_ncl.ncl_terms_fwd(feat, anchor_pos, anchor_neg, counts, perm, patch, (rows, cols), tau, slot)
    return (terms, counts, perm, *saved)


@_ncl_terms_op.register_fake
def _(feat, labels, anchor_pos, anchor_neg, patch, rows, cols, tau, slot):
    B, L = feat.shape[0], rows * cols
    terms = feat.new_empty(B, 3, dtype=torch.float32)
    counts = feat.new_empty(B, 3, dtype=torch.int32)
    perm = feat.new_empty(B, L, dtype=torch.int32)
    return (terms, counts, perm, *_k_ncl.NCLSaved.empty(B, L, slot, feat.device))


@torch.library.custom_op("ncl_fast::ncl_terms_triton_bwd", mutates_args=())
def _ncl_terms_bwd_op(
    grad_terms: torch.Tensor,
    feat: torch.Tensor,
    anchor_pos: torch.Tensor,
    anchor_neg: torch.Tensor,
    counts: torch.Tensor,
    perm: torch.Tensor,
    saved: list[torch.Tensor],  # the fields of NCLSaved, in order
    patch: int,
    rows: int,
    cols: int,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _k_ncl.ncl_terms_bwd(grad_terms, feat, anchor_pos, anchor_neg, counts, perm, _k_ncl.NCLSaved(*saved),
                                patch, (rows, cols), tau)


@_ncl_terms_bwd_op.register_fake
def _(grad_terms, feat, anchor_pos, anchor_neg, counts, perm, saved, patch, rows, cols, tau):
    # the real op's strides: empty_like(feat) for the map, contiguous (B, D) for the anchors
    return torch.empty_like(feat), anchor_pos.new_empty(anchor_pos.shape), anchor_neg.new_empty(anchor_neg.shape)


def _ncl_setup(ctx, inputs, output):
    feat, labels, anchor_pos, anchor_neg, patch, rows, cols, tau, _ = inputs
    _, counts, perm, *saved = output
    # only `terms` is differentiable: no zero gradients for the other outputs (the
    # workspace among them)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(feat, anchor_pos, anchor_neg, counts, perm, *saved)
    ctx.geometry = (patch, rows, cols, tau)


def _ncl_backward(ctx, grad_terms, *unused_grads):
    if grad_terms is None:  # nothing downstream used the terms
        return (None,) * 9
    feat, anchor_pos, anchor_neg, counts, perm, *saved = ctx.saved_tensors
    patch, rows, cols, tau = ctx.geometry
    g_feat, g_pos, g_neg = _ncl_terms_bwd_op(
        grad_terms.contiguous(), feat, anchor_pos, anchor_neg, counts, perm, saved, patch, rows, cols, tau
    )
    return g_feat, None, g_pos, g_neg, None, None, None, None, None


_ncl_terms_op.register_autograd(_ncl_backward, setup_context=_ncl_setup)


def ncl_terms(
    feat: torch.Tensor,
    labels: torch.Tensor,
    anchor_pos: torch.Tensor,
    anchor_neg: torch.Tensor,
    grid: _checks.PatchGrid,
    tau: float,
) -> torch.Tensor:
    """`ncl_fast.functional.ncl_terms` on checked inputs (fp32, fp16 and bf16)."""
    for name, t in (("feat", feat), ("anchor_pos", anchor_pos), ("anchor_neg", anchor_neg)):
        if t.dtype not in FEATURE_DTYPES:
            raise ValueError(
                f"impl='triton' computes in fp32 from fp32/bf16/fp16 inputs; {name} is {t.dtype} "
                f"(use impl='reference' for fp64, e.g. in gradcheck)"
            )
    L = grid.rows * grid.cols
    # the workspace's values per image are an argument of the op: its size is part of the
    # traced graph (and of any cache key), never read from the environment by the fake
    return _ncl_terms_op(feat, _as_label_codes(labels), anchor_pos, anchor_neg, grid.patch, grid.rows, grid.cols,
                         float(tau), _k_ncl.workspace_slot(L))[0]


def _as_label_codes(labels: torch.Tensor) -> torch.Tensor:
    """uint8 labels for the kernels. A value outside {0, 1, 2} is in none of P, N, K
    (so the reference treats it): the list kernel puts such patches after the contour
    ones, where they get no gradient. Other integer dtypes are mapped on the device
    (a cast alone would wrap 256 to 0): no host synchronization."""
    if labels.dtype == torch.uint8:
        return labels
    return torch.where((labels >= 0) & (labels <= 2), labels, 3).to(torch.uint8)


OPS = {"patch_labels": patch_labels, "ncl_terms": ncl_terms}
