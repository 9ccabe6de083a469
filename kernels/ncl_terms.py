"""The NCL loss terms (SPEC.md section 5), fused in Triton, forward and backward: the
launchers of the op (`ncl_fast._triton_ops` wraps them as custom ops), and what the
forward saves for the backward (`NCLSaved`). The kernels, by algorithm:

* `ncl_common.py`: the shared preamble (notation, math, device helpers);
* `ncl_anchors.py`: per-patch statistics, the workspace plan, and the anchors' terms;
* `ncl_stored.py`: the **stored** algorithm (the default): the image's similarity
  block S lives in a workspace between the forward and the backward;
* `ncl_bounded.py`: the **bounded** algorithm: nothing of size L x L is kept.

The path is chosen per image on the device (no host synchronization); a path that
no image can take, from L and the slot alone, is not launched (at the defaults, L <=
4096, only the stored path's kernels run). The stored path's forward kernels and its
coefficient pass are persistent: `_ncl_plan_kernel` (one program) writes the plan and
per kind of work item the images' prefix sums (`NCLSaved.sched`); each program loops
over items pid, pid + programs, ... of the batch's count, and finds an item's image by
a binary search. The grid is SM count x programs per SM (at most the items' upper bound
from B and L): no host synchronization, and no program placed on an image without work.

The workspace holds one slot per image of min(L x ld(L), SIM_BUDGET) fp32 values
(ld(L): L rounded up to WS_ALIGN; `SIM_BUDGET` in MiB per image, default 64, env
`NCL_FAST_SIM_BUDGET`): what the largest block S of an image of L patches can
need, so every image is stored while L x ld(L) x 4 B fits the cap (L <= 4096 at the
default: every stage of the paper and every ViT size, at any tampered area).
Past the cap, an image is stored if its own block fits its slot, else it takes
the bounded path. The size depends on B and L only (no host synchronization, and
under `torch.compile` no guard on the shapes); `SIM_BUDGET = 0` forces the bounded
path for every image.

Precision. Similarities: bf16/fp16 features go to the tensor cores as they are
(products exact in the fp32 accumulator); fp32 features use
`FP32_DOT_PRECISION` (default "tf32x3", three tf32 products, near-fp32; "ieee"
for plain fp32 FMA; env `NCL_FAST_FP32_DOT_PRECISION`). Backward GEMMs: the
coefficients G are formed once, in fp32, as values of order 1 (the factor k1 is
applied after the product, so nothing underflows in any input dtype); they meet the
features in `FP32_DOT_PRECISION` for fp32 features, in bf16 for bf16 features (G / |f|
formed in fp32 and rounded to bf16 by the coefficient pass, which writes them so:
a relative 2^-9 per coefficient, below the bf16 gradient's own rounding;
`HALF_COEF_DTYPES`), and as tf32 for fp16 features (which tf32
holds exactly; the coefficients lose their low 13 mantissa bits; fp16 itself would
lose relative precision below its normal range). Everything else is fp32.

Tested on the CPU under TRITON_INTERPRET=1 (tests/ops/test_ncl_terms.py, both
paths); `bench/kernel_report.py` compiles every kernel for sm_90 and sm_80 and
counts each launch's work; the GPU parity and timing run is `bench/gpu_check.sh`.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton

from .ncl_anchors import (ANCHOR_GRAD_BLOCK, ANCHOR_SPLITS, STATS_BK, STATS_BX, STATS_ZB, _ncl_anchor_bwd_kernel,
                          _ncl_anchor_fwd_kernel, _ncl_anchor_grad_kernel, _ncl_plan_kernel, _ncl_stats_fwd_kernel)
from .ncl_bounded import (BLOCK_D, BLOCK_D_F32_BOUNDED, BLOCK_K, BLOCK_K_F32_BOUNDED, BLOCK_K_F32_IEEE, BLOCK_M,
                          BLOCK_N, BWD_STAGES_F32, BWD_STAGES_HALF, BWD_STAGES_IEEE, FWD_STAGES_F32, FWD_STAGES_HALF,
                          FWD_STAGES_IEEE, FWD_WARPS_HALF, FWD_WARPS_IEEE, NUM_WARPS_BWD, _ncl_pair_bwd_kernel,
                          _ncl_pair_fwd_kernel)
from .ncl_common import EPS, NUM_WARPS, PLAN_COLS, WS_ALIGN
from .ncl_stored import (COEF_BM, COEF_BN, COEF_PER_SM, G_ALIGN, GRAD_PANEL, GRAD_PER_SM, ROWS_BC, ROWS_BM,
                         ROWS_PER_SM, SIM_BK_F32, SIM_BK_HALF, SIM_BM, SIM_BM_F32, SIM_BN, SIM_BN_F32, SIM_PER_SM,
                         SIM_SPLITS, SIM_STAGES, SIM_STAGES_IEEE, SIM_WARPS, SIM_WARPS_F32, _ncl_coef_kernel,
                         _ncl_grad_head_kernel, _ncl_grad_kernel, _ncl_rows_kernel, _ncl_sim_kernel, grad_head_tiles,
                         grad_tiles)
from .patch_labels import _device_guard, needs_64bit_offsets

#: True when Triton runs kernels on the CPU through its interpreter.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
PRECISIONS = ("ieee", "tf32", "tf32x3")
FP32_DOT_PRECISION = os.environ.get("NCL_FAST_FP32_DOT_PRECISION", "tf32x3")
#: MiB of similarity workspace per image, at most (see the module docstring): 64 MiB holds
#: the block of any image of up to 4096 patches.
SIM_BUDGET = float(os.environ.get("NCL_FAST_SIM_BUDGET", "64"))


def _layout(feat: torch.Tensor) -> bool:
    """True when channels are the fastest axis (channels_last): read D as (row, col, channel)."""
    return feat.shape[1] > 1 and feat.stride(1) == 1


def _upcast(feat: torch.Tensor) -> bool:
    """fp32 operands (fp32 features), else the features' own half type (bf16/fp16) as
    on the tensor cores. The interpreter runs the fp16 path as the GPU does (its fp16
    products are exact in fp32), so the CPU tests cover the half path's constants and
    loops; its bf16 tl.dot is wrong (Triton 3.8: values of order 1e10 for unit inputs),
    so bf16 features are upcast there."""
    return feat.dtype == torch.float32 or (INTERPRET and feat.dtype == torch.bfloat16)


#: bf16 features meet the backward's coefficients in bf16 (both operands on the tensor
#: cores at the half rate; bf16 keeps the fp32 exponent, and its 2^-9 relative rounding of
#: each coefficient is below the bf16 gradient's own rounding and tests/tolerances.py's
#: 1e-2). fp16 features keep fp32 coefficients in tf32 products: G / |f_y| can fall below
#: fp16's normal range (6e-5), where fp16 loses relative precision.
HALF_COEF_DTYPES = (torch.bfloat16,)


def _half_coef(feat: torch.Tensor) -> bool:
    return feat.dtype in HALF_COEF_DTYPES and not _upcast(feat)


#: Compute capabilities (majors) whose backward takes the grad kernel's row groups and panel
#: (ncl_stored.GRAD_PANEL): sm_90, where it compiles within 128 registers (two blocks per SM);
#: on sm_80 it spills there. Off a GPU (the interpreter, ahead-of-time compiles) the op
#: launches as on a device of major PANEL_CAPABILITY (the kernel report sets it per architecture).
GRAD_PANEL_MAJORS = (9,)
PANEL_CAPABILITY = 9


def _major(device: torch.device) -> int:
    """The compute capability's major of `device`; off a GPU, PANEL_CAPABILITY."""
    return torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else PANEL_CAPABILITY


def _grad_panel(device: torch.device) -> int:
    """The grad kernel's panel for `device` (0: one row tile a program, no panel)."""
    return GRAD_PANEL if _major(device) in GRAD_PANEL_MAJORS else 0


#: Compute capabilities (majors) whose backward runs the head kernel
#: (ncl_stored._ncl_grad_head_kernel) for the images with |P| <= GRAD_HEAD (half
#: coefficients): sm_90, where it compiles without a spill at one block per SM (wgmma);
#: not compiled for sm_80. Where it runs, the grouped kernel's panel is left out (it would
#: serve no image). Off a GPU, as on a device of major PANEL_CAPABILITY.
GRAD_HEAD_MAJORS = (9,)


def _grad_head(device: torch.device) -> bool:
    """Whether the backward runs the head kernel on `device` (half coefficients)."""
    major = torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else PANEL_CAPABILITY
    return major in GRAD_HEAD_MAJORS


def fp32_precision() -> str:
    if FP32_DOT_PRECISION not in PRECISIONS:
        raise ValueError(
            f"NCL_FAST_FP32_DOT_PRECISION (ncl_fast.kernels.ncl_terms.FP32_DOT_PRECISION) must be one of "
            f"{', '.join(PRECISIONS)}; got {FP32_DOT_PRECISION!r}"
        )
    return FP32_DOT_PRECISION


class NCLSaved(NamedTuple):
    """What the forward keeps for the backward, by name (the op's outputs after terms,
    counts and perm, in this order). `empty` allocates it for the forward launcher and
    for the op's fake alike, so that both agree on every shape and stride."""

    nrm: torch.Tensor  # (B, L) fp32: |f_x| by list position
    nrma: torch.Tensor  # (B, 2) fp32: |a+|, |a-|
    sa: torch.Tensor  # (B, 2, L) fp32: s(a+, x), s(a-, x) by list position
    lse: torch.Tensor  # (B, L) fp32: lam_m of the tampered rows (where t1 is defined)
    w: torch.Tensor  # (B, L) fp32: W_m, likewise
    lsea: torch.Tensor  # (B, 2) fp32: lam+, lam-
    wa: torch.Tensor  # (B, 2) fp32: W+, W-
    plan: torch.Tensor  # (B, 3) int64: the image's slot offset in ws, 1 if its block is stored, K splits
    sched: torch.Tensor  # (SCHED_KINDS, B + 1) int32: the persistent kernels' work lists (prefix sums)
    ws: torch.Tensor  # (B x slot,) fp32: the similarity workspace (at least one value)

    @staticmethod
    def empty(B, L, slot, device: torch.device) -> "NCLSaved":
        """`slot`: fp32 values of workspace per image (`workspace_slot(L)`)."""
        f32 = dict(dtype=torch.float32, device=device)
        return NCLSaved(
            nrm=torch.empty(B, L, **f32),
            nrma=torch.empty(B, 2, **f32),
            sa=torch.empty(B, 2, L, **f32),
            lse=torch.empty(B, L, **f32),
            w=torch.empty(B, L, **f32),
            lsea=torch.empty(B, 2, **f32),
            wa=torch.empty(B, 2, **f32),
            plan=torch.empty(B, PLAN_COLS.value, dtype=torch.int64, device=device),
            sched=torch.empty(SCHED_KINDS, B + 1, dtype=torch.int32, device=device),
            # every value is written by the forward's kernels (an output of the op holds
            # defined values): the similarity GEMM's blocks, padding included, and the
            # statistics pass's zeros for the rest, with no memset of it all (16.8 MB at stage 1)
            ws=torch.empty(torch.sym_max(B * slot, 1), **f32),
        )


#: Kinds of work item in `NCLSaved.sched` (see _ncl_plan_kernel): similarity tiles x splits,
#: row blocks, coefficient tiles (stored path); row blocks, images (bounded path); the
#: stored images, and those with |P| > GRAD_HEAD (the stored backward's grouped kernel).
SCHED_KINDS = 7
#: SMs assumed under the interpreter (few: each persistent program then runs several items).
INTERPRET_SMS = 2


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRET_SMS


def _persistent(device: torch.device, per_sm: int, upper: int) -> int:
    """Programs of a persistent launch: `per_sm` per SM, at most the items' upper bound
    (from B and L: the grid never depends on the data, so there is no host sync). A
    program whose first item is past the batch's count exits at once: the only idle
    programs, where the count is below the grid."""
    return max(1, min(upper, per_sm * _sm_count(device)))


def _log2_ceil(n: int) -> int:
    return max(0, (n - 1).bit_length())


def workspace_slot(L):
    """fp32 values of workspace per image: the largest block S an image of L patches can
    have (L rows of ld(L)), capped at `SIM_BUDGET` MiB (a multiple of WS_ALIGN values, so
    that every slot starts 16-byte aligned). `torch.sym_min`: a symbolic L (torch.compile,
    dynamic shapes) gets no guard."""
    if not SIM_BUDGET >= 0:
        raise ValueError(f"NCL_FAST_SIM_BUDGET (MiB of workspace per image) must be >= 0; got {SIM_BUDGET}")
    align = WS_ALIGN.value
    cap = int(SIM_BUDGET * 2**20) // (4 * align) * align
    return torch.sym_min(L * ((L + align - 1) // align * align), cap)


def _grid_check(n: int, what: str) -> int:
    if n > 2**31 - 1:
        raise ValueError(f"ncl_terms (Triton): {what} needs {n} programs on one grid axis, above 2^31 - 1")
    return n


def ncl_terms_fwd(
    feat: torch.Tensor,
    anchor_pos: torch.Tensor,
    anchor_neg: torch.Tensor,
    counts: torch.Tensor,
    perm: torch.Tensor,
    patch: int,
    grid_rq: tuple[int, int],
    tau: float,
    slot: int | None = None,
) -> tuple[torch.Tensor, NCLSaved]:
    """Per-image `[t1, t2, t3]` (B, 3) fp32 and what the backward needs (`NCLSaved`);
    `slot`: fp32 values of workspace per image (default `workspace_slot(L)`)."""
    B, C = feat.shape[:2]
    R, Q = grid_rq
    L = R * Q
    D = C * patch * patch
    if B > 65535:
        raise ValueError(f"ncl_terms (Triton): batch {B} above the grid's 65535 images per launch; split the batch")
    dev = feat.device
    f32 = dict(dtype=torch.float32, device=dev)
    precision = fp32_precision()
    # Each kernel writes every entry of its outputs (see _ncl_stats_fwd_kernel), the
    # workspace included: nothing is zero-filled.
    slot = workspace_slot(L) if slot is None else slot
    if slot < 0 or slot % WS_ALIGN.value:
        # every block and row of the workspace starts 16 bytes in (its 128-bit accesses)
        raise ValueError(f"ncl_terms (Triton): the workspace slot must be a multiple of {WS_ALIGN.value} fp32 "
                         f"values, >= 0; got {slot} (use workspace_slot(L))")
    saved = NCLSaved.empty(B, L, slot, dev)
    terms = torch.empty(B, 3, **f32)
    stored_any, bounded_any = _paths(L, slot)
    n_blocks_b = triton.cdiv(L, BLOCK_M)
    n_blocks_s = triton.cdiv(L, ROWS_BM)
    part_b = torch.empty(B, n_blocks_b if bounded_any else 1, **f32)
    part_s = torch.empty(B, n_blocks_s, **f32)
    fs = (feat.stride(0), feat.stride(1), feat.stride(2), feat.stride(3))
    fa = (anchor_pos.stride(0), anchor_pos.stride(1), anchor_neg.stride(0), anchor_neg.stride(1))
    # the similarity GEMM's sums of the columns' statistics, per part of D (read by the
    # statistics pass; every entry it reads is written first)
    colpart = torch.empty(B * SIM_SPLITS * 3 * L if stored_any else 1, **f32)
    apart = torch.empty(B * SIM_SPLITS * 2 if stored_any else 1, **f32)
    cl = _layout(feat)
    up = _upcast(feat)
    wide = needs_64bit_offsets(feat, anchor_pos, anchor_neg)
    inv_tau = 1.0 / tau
    log_b = _log2_ceil(B)
    sim_bm, sim_bn, sim_warps = _sim_tiles(up)
    nrm, nrma, sa, lse, w, lsea, wa, plan, sched, ws = saved
    with _device_guard(feat):
        # the plan and the work lists: one program (a cumsum over the batch per kind)
        _ncl_plan_kernel[(1,)](
            counts, plan, sched, B, slot if stored_any else 0, triton.cdiv(SIM_PER_SM * _sm_count(dev), B),
            triton.cdiv(D, _sim_bk(up, cl, patch)),
            SIM_BM=sim_bm, SIM_BN=sim_bn, SIM_SPLITS=SIM_SPLITS, ROWS_BM=ROWS_BM, COEF_BM=COEF_BM, COEF_BN=COEF_BN,
            PAIR_BM=BLOCK_M, GRAD_HEAD=grad_head_tiles(patch, cl)["HEAD"],
            BLOCK_B=min(1024, triton.next_power_of_2(B)), num_warps=NUM_WARPS,
        )
        if stored_any:
            # persistent programs over the work lists (items: see _ncl_plan_kernel); the
            # similarity GEMM also sums the columns' statistics, which the statistics pass
            # then adds up over the parts of D
            sim_upper = B * triton.cdiv(L, sim_bm) * triton.cdiv(L, sim_bn) * SIM_SPLITS
            _ncl_sim_kernel[(_persistent(dev, SIM_PER_SM, sim_upper),)](
                feat, anchor_pos, anchor_neg, perm, counts, plan, sched[0], ws, colpart, apart,
                *fs, *fa, B, L, Q, C, patch, D,
                BM=sim_bm, BN=sim_bn, BK=_sim_bk(up, cl, patch), SPLITS=SIM_SPLITS, CHANNELS_LAST=cl,
                UPCAST=up, PRECISION=precision, IDX64=wide, LOG_B=log_b, num_warps=sim_warps,
                # (ieee with 64-bit offsets: one stage, as two spilled 16 B at p = 1 in NCHW on sm_90)
                num_stages=(1 if wide else SIM_STAGES_IEEE) if up and precision == "ieee" else SIM_STAGES,
            )
        _ncl_stats_fwd_kernel[(triton.cdiv(L, STATS_BX), B)](
            feat, anchor_pos, anchor_neg, perm, counts, plan, colpart, apart, ws, slot, nrm, sa, lse, w, nrma,
            *fs, *fa, L, Q, C, patch, D, inv_tau, EPS,
            BLOCK_X=STATS_BX, BLOCK_K=STATS_BK, SPLITS=SIM_SPLITS, SIM=stored_any, CHANNELS_LAST=cl, IDX64=wide,
            ZB=STATS_ZB, num_warps=NUM_WARPS,
        )
        if stored_any:
            _ncl_rows_kernel[(_persistent(dev, ROWS_PER_SM, B * n_blocks_s),)](
                ws, plan, counts, sched[1], nrm, lse, w, part_s, B, L, n_blocks_s, inv_tau, EPS, BM=ROWS_BM,
                BC=ROWS_BC, LOG_B=log_b, num_stages=1,
            )
        if bounded_any:
            # plain fp32 FMA: 8-wide K chunks (16 spilled on sm_80); warps and stages by the dot
            # (spill-free on sm_80 and sm_90: see ncl_bounded.py)
            ieee = up and precision == "ieee"
            warps, stages = ((FWD_WARPS_IEEE, FWD_STAGES_IEEE) if ieee else (NUM_WARPS, FWD_STAGES_F32)) if up \
                else (FWD_WARPS_HALF, FWD_STAGES_HALF)
            _ncl_pair_fwd_kernel[(_grid_check(B * n_blocks_b, "the bounded forward"),)](
                feat, perm, counts, nrm, sched[3], lse, w, part_b,
                *fs, B, L, Q, C, patch, D, n_blocks_b, inv_tau, EPS,
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                BLOCK_K=(BLOCK_K_F32_IEEE if ieee else BLOCK_K_F32_BOUNDED) if up else BLOCK_K, CHANNELS_LAST=cl,
                UPCAST=up, PRECISION=precision, IDX64=wide, LOG_B=log_b, num_warps=warps, num_stages=stages,
            )
        # one program per (image, anchor) walks at most L similarities in blocks of 256
        _ncl_anchor_fwd_kernel[(B, 2)](sa, counts, terms, lsea, wa, part_s, part_b, plan, L, n_blocks_s,
                                       n_blocks_b if bounded_any else 0, ROWS_BM=ROWS_BM, PAIR_BM=BLOCK_M,
                                       BLOCK=256)
    return terms, saved


def _sim_tiles(up: bool) -> tuple[int, int, int]:
    """Rows, columns and warps of a similarity item: 128 x 64 on 8 warps for half features,
    64 x 32 on 4 warps for fp32 (see ncl_stored)."""
    return (SIM_BM_F32, SIM_BN_F32, SIM_WARPS_F32) if up else (SIM_BM, SIM_BN, SIM_WARPS)


def _sim_bk(up: bool, channels_last: bool, patch: int) -> int:
    """K chunk of the similarity GEMM: 128 bytes of a patch's features, or half that for
    half features at p = 1 in NCHW, where a patch's values are a channel apart and load
    as scalar gathers (the 64-wide chunk held 255 registers there), and for plain fp32
    FMA (32 spilled on sm_80)."""
    if up:
        return SIM_BK_F32 // 2 if fp32_precision() == "ieee" else SIM_BK_F32
    return SIM_BK_HALF // 2 if patch == 1 and not channels_last else SIM_BK_HALF


def _paths(L: int, slot: int) -> tuple[bool, bool]:
    """Which paths can run at all, from L and the slot alone (no data, no host sync): the
    stored path when a slot exists, the bounded path when a block S can outgrow the slot
    (|P| rows of ld(|P| + |N|) <= L x ld(L)). A path that cannot run is not launched."""
    stored = slot > 0
    bounded = not stored or slot < L * _ld(L)
    return stored, bounded


def _g_cap(slot: int, L: int) -> int:
    """Half values of each of an image's coefficient blocks Gc and Gr (HALF_COEF): a stored
    block has |P| ld(|P| + |N|) <= slot, and its half rows ld8 <= ld + 4, so |P| ld8 <= slot +
    4 L; a multiple of G_ALIGN (16-byte blocks)."""
    align = G_ALIGN.value
    return (slot + 4 * L + align - 1) // align * align


def _ld(n: int) -> int:
    align = WS_ALIGN.value
    return (n + align - 1) // align * align


def ncl_terms_bwd(
    grad_terms: torch.Tensor,
    feat: torch.Tensor,
    anchor_pos: torch.Tensor,
    anchor_neg: torch.Tensor,
    counts: torch.Tensor,
    perm: torch.Tensor,
    saved: NCLSaved,
    patch: int,
    grid_rq: tuple[int, int],
    tau: float,
):
    """Gradients `(d feat, d anchor_pos, d anchor_neg)` from what the forward saved.
    `d feat` has `empty_like(feat)`'s strides, the anchors' gradients are contiguous."""
    nrm, nrma, sa, lse, w, lsea, wa, plan, sched, ws = saved
    B, C = feat.shape[:2]
    R, Q = grid_rq
    L = R * Q
    D = C * patch * patch
    # the slot (a multiple of WS_ALIGN values) from the workspace's size: B x slot, or 1 value
    stored_any, bounded_any = _paths(L, ws.numel() // B if ws.numel() >= WS_ALIGN.value else 0)
    gout = grad_terms.to(torch.float32).contiguous()
    # every covered cell is written by the kernels (contour patches get zeros);
    # only the cells no whole patch covers are zeroed here
    grad_feat = torch.empty_like(feat)
    if R * patch < feat.shape[2]:
        grad_feat[:, :, R * patch:, :].zero_()
    if Q * patch < feat.shape[3]:
        grad_feat[:, :, : R * patch, Q * patch:].zero_()
    grad_pos = torch.empty(B, D, dtype=anchor_pos.dtype, device=feat.device)
    grad_neg = torch.empty(B, D, dtype=anchor_neg.dtype, device=feat.device)
    fs = (feat.stride(0), feat.stride(1), feat.stride(2), feat.stride(3))
    gs = (grad_feat.stride(0), grad_feat.stride(1), grad_feat.stride(2), grad_feat.stride(3))
    as_ = (anchor_pos.stride(0), anchor_pos.stride(1), anchor_neg.stride(0), anchor_neg.stride(1))
    cl = _layout(feat)
    up = _upcast(feat)
    wide = needs_64bit_offsets(feat, grad_feat, anchor_pos, anchor_neg)
    precision = fp32_precision()
    inv_tau = 1.0 / tau
    common = (perm, counts, nrm, nrma, sa, lse, w, lsea, wa, gout, plan)
    with _device_guard(feat):
        if stored_any:
            # 1. G = dL/dS / k1 from S, and the partial sums of sum_y G s
            n_cn, n_cm = triton.cdiv(L, COEF_BN), triton.cdiv(L, COEF_BM)
            rdot = torch.empty(B, n_cn, L, dtype=torch.float32, device=feat.device)
            cdot = torch.empty(B, n_cm, L, dtype=torch.float32, device=feat.device)
            half = _half_coef(feat)
            # G (not zeroed: every value read is written first): fp32 in S's layout, or for half
            # coefficients Gc and Gr, g_cap half values each per image (rows of ld8(|P| + |N|) <=
            # ld(|P| + |N|) + 4: |P| ld8 <= slot + 4 L, about the fp32 block's bytes for both)
            g_cap = _g_cap(ws.numel() // B, L) if half else 0
            gws = torch.empty(B * 2 * g_cap, dtype=feat.dtype, device=feat.device) if half else torch.empty_like(ws)
            _ncl_coef_kernel[(_persistent(feat.device, COEF_PER_SM, B * n_cn * n_cm),)](
                ws, gws, plan, counts, sched[2], lse, w, nrm, rdot, cdot, B, L, n_cn, n_cm, g_cap, EPS,
                BM=COEF_BM, BN=COEF_BN, HALF_COEF=half, LOG_B=_log2_ceil(B), num_warps=NUM_WARPS, num_stages=1,
            )
            # 2. the two GEMMs and the epilogue: images with |P| <= GRAD_HEAD take the head kernel where
            # it runs (half coefficients, sm_90), one program per (image, chunk of D), and the grouped
            # kernel's panel (for |P| <= GRAD_PANEL) then has no image; the grouped kernel, one program
            # per (row tile, image, chunk of D), takes the others. Neither the head kernel nor the
            # panel with 64-bit offsets (the grouped kernel spilled 12-60 B there on sm_90)
            head = grad_head_tiles(patch, cl) if half and not wide and _grad_head(feat.device) else None
            panel = 0 if wide or head is not None else _grad_panel(feat.device)
            tiles = grad_tiles(up, half, patch == 1 and not cl, panel, wide,
                               narrow=head is not None and patch < 8 and not cl)
            n_tx_s, n_td = triton.cdiv(L, tiles["BX"]), triton.cdiv(D, tiles["BD"])
            n_grp = triton.cdiv(n_tx_s, tiles["GROUP"])
            # the anchors' gradients' sums per row tile (only tiles of listed patches of stored images are read)
            spart = torch.empty(B, n_tx_s, 2, D, dtype=torch.float32, device=feat.device)
            sdots = torch.empty(B, n_tx_s, 2, dtype=torch.float32, device=feat.device)
            # the head kernel: one program per (image, chunk of D); the grouped kernel's persistent
            # programs take the items of the other stored images (work list 6; all of them: 5)
            if head is not None:
                assert head["HEAD"] == 2 * tiles["BX"]  # its tiles write the anchors' sums of the grouped kernel's
                n_td_h = triton.cdiv(D, head["BD"])
                _ncl_grad_head_kernel[(_grid_check(B * n_td_h, "the backward"),)](
                    feat, grad_feat, anchor_pos, anchor_neg, *common, gws, rdot, cdot, spart, sdots,
                    *fs, *gs, *as_, B, L, Q, C, patch, D, n_tx_s, n_td_h, n_cn, n_cm, g_cap, inv_tau, EPS,
                    CM=COEF_BM, CN=COEF_BN, CHANNELS_LAST=cl, IDX64=wide, CHECK_STORED=bounded_any, **head,
                )
            # (beside the head kernel, whose images are most often all: persistent programs; else one
            # program an item, on a grid of every image's items)
            # (the item count's bound is checked either way: the kernel forms item indices below it in int32)
            persistent = head is not None
            n_items = _grid_check(n_grp * B * n_td, "the backward")
            grid = _persistent(feat.device, GRAD_PER_SM, n_items) if persistent else n_items
            _ncl_grad_kernel[(grid,)](
                feat, grad_feat, anchor_pos, anchor_neg, *common, gws, rdot, cdot, spart, sdots,
                sched[5 if head is None else 6], *fs, *gs, *as_, B, L, Q, C, patch, D, n_tx_s, n_grp, n_td, n_cn,
                n_cm, g_cap, inv_tau, EPS, CM=COEF_BM, CN=COEF_BN, CHANNELS_LAST=cl,
                PRECISION=precision if up else "tf32", HALF_COEF=half, IDX64=wide, LOG_B=_log2_ceil(B),
                PERSISTENT=persistent, **tiles,
            )
        if bounded_any:
            bd = BLOCK_D_F32_BOUNDED if up else BLOCK_D
            if wide and patch == 1 and not cl:  # 64-bit gathers: half the chunk (the whole spilled 24-432 B)
                bd //= 2
            # plain fp32 FMA: 8-wide K chunks, 4 warps and 1 stage (spill-free on sm_80 and sm_90)
            ieee = up and precision == "ieee"
            bk = (BLOCK_K_F32_IEEE if ieee else BLOCK_K_F32_BOUNDED) if up else BLOCK_K
            n_tx, n_td = triton.cdiv(L, BLOCK_M), triton.cdiv(D, bd)
            _ncl_pair_bwd_kernel[(_grid_check(B * n_tx * n_td, "the bounded backward"),)](
                feat, grad_feat, anchor_pos, anchor_neg, *common, sched[4],
                *fs, *gs, *as_, B, L, Q, C, patch, D, n_tx, n_td, inv_tau, EPS,
                BLOCK_X=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=bk, BLOCK_D=bd,
                CHANNELS_LAST=cl, UPCAST=up, PRECISION=precision, COEF_PRECISION=precision if up else "tf32",
                IDX64=wide, LOG_B=_log2_ceil(B), num_warps=4 if ieee else NUM_WARPS_BWD,
                num_stages=(BWD_STAGES_IEEE if ieee else BWD_STAGES_F32) if up else BWD_STAGES_HALF,
            )
        if bounded_any:
            # the anchors' sums over the bounded images' patches (the stored backward formed its own)
            n_td = triton.cdiv(D, BLOCK_D)
            rows_per_split = triton.cdiv(triton.cdiv(L, ANCHOR_SPLITS), BLOCK_M) * BLOCK_M
            part = torch.empty(B, ANCHOR_SPLITS, 2, D, dtype=torch.float32, device=feat.device)
            dots = torch.empty(B, ANCHOR_SPLITS, 2, dtype=torch.float32, device=feat.device)
            _ncl_anchor_bwd_kernel[(_grid_check(n_td * ANCHOR_SPLITS, "the anchors' backward"), B)](
                feat, part, dots, perm, counts, nrm, sa, lsea, wa, gout, plan,
                *fs, L, Q, C, patch, D, n_td, rows_per_split, EPS,
                RS=ANCHOR_SPLITS, BLOCK_X=BLOCK_M, BLOCK_D=BLOCK_D, CHANNELS_LAST=cl, IDX64=wide,
                SKIP_STORED=stored_any, num_warps=NUM_WARPS,
            )
        else:
            part = dots = gout  # not read
        if not stored_any:
            spart = sdots = gout  # not read
            n_tx_s, tiles = 1, dict(BX=1)
        _ncl_anchor_grad_kernel[(triton.cdiv(D, ANCHOR_GRAD_BLOCK), B)](
            part, dots, spart, sdots, counts, plan, anchor_pos, anchor_neg, nrma, grad_pos, grad_neg,
            *as_, D, n_tx_s, inv_tau, EPS, RS=ANCHOR_SPLITS, BX=tiles["BX"], STORED=stored_any, BOUNDED=bounded_any,
            BLOCK=ANCHOR_GRAD_BLOCK, IDX64=wide, num_warps=NUM_WARPS,
        )
    return grad_feat, grad_pos, grad_neg
