"""Patch classification straight from the mask (SPEC.md section 2), in Triton.

Two kernels, no unfold of the mask:

* `_patch_labels_fwd_kernel`: each program counts the tampered pixels of
  BLOCK_L patches (one pass over their windows) and writes the labels.
* `_patch_lists_fwd_kernel`: one program per image turns the labels into the
  counts `[|P|, |N|, |K|]` and one compacted permutation of the patch indices:
  tampered first, then authentic, then contour, each in ascending patch order
  (deterministic), then the patches whose label is none of 0, 1, 2 (a caller's
  invalid value: in no set, as the reference treats it), so that `perm` is always
  a whole permutation of the L patches. The NCL kernels and the Pivot's gather read these lists, so
  nothing scans the mask again.

Labels are compared as integer counts against thresholds computed on the host
in float64 exactly as the reference computes `frac <= tol` and
`frac >= 1 - tol`, so the two agree bit for bit.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

# Patches per program of the label kernel: 32 windows x BLOCK_WX columns per
# load keeps the tile at <= 2K elements for the default 16 px windows.
_LABELS_BLOCK_L = 32
# Patches per step of the list kernel (one program per image walks its L labels).
_LISTS_BLOCK = 256


@triton.jit
def _patch_labels_fwd_kernel(
    mask_ptr,  # (B, 1, H, W) any dtype (bool viewed as uint8); binarized as > 0.5 in its own dtype
    labels_ptr,  # (B, L) uint8 out
    stride_mb, stride_my, stride_mx,  # mask strides (batch, row, column)
    L, Q,  # patches per image, patches per row
    WIN_Y, WIN_X,  # window size in pixels: p * s_y, p * s_x
    lo_count, hi_count,  # authentic if count <= lo_count, tampered if count >= hi_count
    BLOCK_L: tl.constexpr,  # patches per program
    BLOCK_WX: tl.constexpr,  # window columns per load (power of two >= 16)
    IS_FLOAT: tl.constexpr,  # float mask: compare with 0.5 in its dtype (fp64 too); integer: > 0
    IDX64: tl.constexpr,  # an image of the mask spans 2^31 elements or more: int64 offsets
):
    b = tl.program_id(1).to(tl.int64)
    if IDX64:
        stride_my = stride_my + tl.zeros([], dtype=tl.int64)
        stride_mx = stride_mx + tl.zeros([], dtype=tl.int64)
    offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    valid = offs_l < L
    r = offs_l // Q
    c = offs_l % Q
    base = mask_ptr + b * stride_mb
    count = tl.zeros([BLOCK_L], dtype=tl.int32)
    # 1. count the tampered pixels of every window, row by row
    for wx0 in range(0, WIN_X, BLOCK_WX):
        cols = wx0 + tl.arange(0, BLOCK_WX)
        x = c[:, None] * WIN_X + cols[None, :]
        ld_mask = valid[:, None] & (cols[None, :] < WIN_X)
        for iy in range(0, WIN_Y):
            y = r * WIN_Y + iy
            v = tl.load(base + y[:, None] * stride_my + x * stride_mx, mask=ld_mask, other=0)
            if IS_FLOAT:
                hit = v > 0.5
            else:
                hit = v > 0
            count += tl.sum(hit.to(tl.int32), axis=1)
    # 2. label: 1 tampered, 0 authentic, 2 contour
    label = tl.where(count >= hi_count, 1, tl.where(count <= lo_count, 0, 2))
    tl.store(labels_ptr + b * L + offs_l, label.to(tl.uint8), mask=valid)


@triton.jit
def _patch_lists_fwd_kernel(
    labels_ptr,  # (B, L) uint8
    counts_ptr,  # (B, 3) int32 out: |P|, |N|, |K|
    perm_ptr,  # (B, L) int32 out: P indices, then N, then K, each ascending
    L,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    row = labels_ptr + b * L
    # 1. totals, so that each list can start right after the one before it
    n_p = tl.zeros([], dtype=tl.int32)
    n_n = tl.zeros([], dtype=tl.int32)
    n_k = tl.zeros([], dtype=tl.int32)
    for l0 in range(0, L, BLOCK):
        offs = l0 + tl.arange(0, BLOCK)
        lab = tl.load(row + offs, mask=offs < L, other=3).to(tl.int32)
        n_p += tl.sum((lab == 1).to(tl.int32), axis=0)
        n_n += tl.sum((lab == 0).to(tl.int32), axis=0)
        n_k += tl.sum((lab == 2).to(tl.int32), axis=0)
    # 2. stable compaction: running offset + inclusive prefix sum - 1
    seen_p = tl.zeros([], dtype=tl.int32)
    seen_n = tl.zeros([], dtype=tl.int32)
    seen_k = tl.zeros([], dtype=tl.int32)
    seen_x = tl.zeros([], dtype=tl.int32)
    for l0 in range(0, L, BLOCK):
        offs = l0 + tl.arange(0, BLOCK)
        lab = tl.load(row + offs, mask=offs < L, other=3).to(tl.int32)
        is_p = (lab == 1).to(tl.int32)
        is_n = (lab == 0).to(tl.int32)
        is_k = (lab == 2).to(tl.int32)
        is_x = ((lab > 2) & (offs < L)).to(tl.int32)  # a label outside {0, 1, 2}
        pos = tl.where(
            is_p == 1,
            seen_p + tl.cumsum(is_p, axis=0) - 1,
            tl.where(is_n == 1, n_p + seen_n + tl.cumsum(is_n, axis=0) - 1,
                     tl.where(is_k == 1, n_p + n_n + seen_k + tl.cumsum(is_k, axis=0) - 1,
                              n_p + n_n + n_k + seen_x + tl.cumsum(is_x, axis=0) - 1)),
        )
        tl.store(perm_ptr + b * L + pos, offs, mask=offs < L)
        seen_p += tl.sum(is_p, axis=0)
        seen_n += tl.sum(is_n, axis=0)
        seen_k += tl.sum(is_k, axis=0)
        seen_x += tl.sum(is_x, axis=0)
    tl.store(counts_ptr + b * 3 + 0, n_p)
    tl.store(counts_ptr + b * 3 + 1, n_n)
    tl.store(counts_ptr + b * 3 + 2, seen_k)


@functools.lru_cache(maxsize=256)
def count_thresholds(n: int, tol: float) -> tuple[int, int]:
    """`(lo, hi)`: `count / n <= tol` iff `count <= lo`, `count / n >= 1 - tol` iff `count >= hi`,
    with the float64 divisions of the reference (`frac = count / n`)."""
    lo = int(tol * n) + 1
    while lo >= 0 and not (lo / n <= tol):
        lo -= 1
    hi = int((1.0 - tol) * n) - 1
    while hi <= n and not (hi / n >= 1.0 - tol):
        hi += 1
    return lo, hi


def patch_labels_fwd(mask: torch.Tensor, window: tuple[int, int], grid_rq: tuple[int, int], tol: float) -> torch.Tensor:
    """uint8 `(B, L)` labels of the `R x Q` patch grid with `window` pixels per patch.

    The mask is read in place (any strides); bool masks are viewed as uint8.
    """
    B = mask.shape[0]
    R, Q = grid_rq
    L = R * Q
    wy, wx = window
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    lo, hi = count_thresholds(wy * wx, float(tol))
    labels = torch.empty(B, L, dtype=torch.uint8, device=mask.device)
    if B > 65535:
        raise ValueError(f"patch_labels (Triton): batch {B} above the grid's 65535 images per launch; split the batch")
    grid = (triton.cdiv(L, _LABELS_BLOCK_L), B)
    with _device_guard(mask):
        _patch_labels_fwd_kernel[grid](
            mask, labels,
            mask.stride(0), mask.stride(2), mask.stride(3),
            L, Q, wy, wx, lo, hi,
            BLOCK_L=_LABELS_BLOCK_L,
            BLOCK_WX=max(16, triton.next_power_of_2(min(wx, 64))),
            IS_FLOAT=mask.is_floating_point(),
            IDX64=needs_64bit_offsets(mask),
        )
    return labels


def patch_lists_fwd(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(counts (B, 3) int32, perm (B, L) int32)` from the labels; see the module docstring."""
    B, L = labels.shape
    labels = labels.contiguous()
    counts = torch.empty(B, 3, dtype=torch.int32, device=labels.device)
    perm = torch.empty(B, L, dtype=torch.int32, device=labels.device)
    with _device_guard(labels):
        _patch_lists_fwd_kernel[(B,)](labels, counts, perm, L, BLOCK=_LISTS_BLOCK)
    return counts, perm


#: Offsets within one image (and within one anchor row) are int32 up to this span, int64
#: past it (the kernels' `IDX64`).
INT32_SPAN = 2**31 - 1


def needs_64bit_offsets(*tensors: torch.Tensor) -> bool:
    """True when some element of one image (dims 1.. of any of `tensors`) lies more than
    INT32_SPAN elements from the image's first: e.g. a permuted (C, B, h, w) buffer, whose
    channel stride spans the batch. The kernels then form their offsets in int64 (`IDX64`);
    the image's own offset (b x batch stride) is always int64."""
    span = max(sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:]) if n > 0) for t in tensors)
    return span > INT32_SPAN


def _device_guard(t: torch.Tensor):
    """Launch on the tensor's device, whichever CUDA device is current."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
