"""The stored algorithm (the default; notation in `ncl_common.py`): the image's block
S = [s_my] (m in P, y in P u N), |P| rows of |P|+|N| fp32 values (each row padded to
a multiple of WS_ALIGN values, so that rows and blocks start 16-byte aligned), lives
in the op's workspace between the forward and the backward.

Forward (persistent programs over the work lists of `_ncl_plan_kernel`: only items
that have work, an item's image found by a binary search over the prefix sums):

* `_ncl_sim_kernel`: the similarity GEMM, one item per (split of D, row tile, column
  tile) of S. An image whose tiles alone would leave SMs idle splits D into up to
  SIM_SPLITS parts (as many as its slot holds blocks): each part writes its own
  partial block of dots, the row pass adds them in a fixed order (deterministic).
  From the column tiles it loads anyway, the items of the first row tile also sum
  each column's |f_y|^2 and its dots with both anchors (and the anchors' |a|^2) over
  their part of D: the statistics pass adds those parts up instead of reading the
  map a second time;
* `_ncl_rows_kernel`: one item per block of ROWS_BM rows: adds the partial blocks,
  scales them by 1 / (|f_m| |f_y| tau) into S, then lam_m, W_m and the rows' share
  of t1.

Backward:

* `_ncl_coef_kernel` (persistent): one pass over S that writes the coefficients
  G = dL/dS / k1 into a buffer of the workspace's layout (S stays as the forward left
  it: a second backward of the same graph reads it again) (one exp per element: e = exp(s_my - lam_m) gives
  -1/(1 + e) = -sigmoid(lam_m - s_mj) on tampered columns and W_m e on authentic ones;
  the diagonal and the padding get 0), and the partial sums of sum_y G_my s_my (per
  row, over a column tile) and sum_m G_mx s_mx (per column, over a row tile). With
  half coefficients (bf16 features) it writes G already scaled and rounded, twice:
  Gc_my = G_my / |f_y| and Gr_my = G_my / |f_m| in the features' half type;
* `_ncl_grad_kernel`: per item (row tile x, listed image, chunk of D; see GRAD_PER_SM) (on sm_90 with
  half coefficients and the head kernel off, per GRAD_GROUP row tiles, sharing one load
  of the tampered partners' features on the chunk: GRAD_PANEL): the two plain GEMMs of the floor,
  G[x, :] @ hat F (x in P) + G[:, x]^T @ hat F_P, whose K
  loops only load and multiply (Gc's rows and Gr's columns with the features; fp32
  G is scaled by 1/|f| in the loop); then the anchors' share and the normalization's
  backward. Items are ordered row tile first, so that the tiles of tampered rows
  (the longest: K = 2|P| + |N| against |P|) start first (at the paper's shapes the
  longest program stays well inside the launch's L2-bound time: no balancing);
* `_ncl_grad_head_kernel` (sm_90, half coefficients, images with |P| <= GRAD_HEAD, in
  place of `_ncl_grad_kernel` for them): one program per (image, chunk of D) over all
  of the image's patches, so that the chunk's features are read once for both GEMMs and
  G once (see GRAD_HEAD); balanced by construction (every program the same work for
  alike images).

Work: one pass over the P x (P+N) block forward, two GEMMs backward.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .ncl_common import (_anchor_parts, _d_offsets, _dot_step, _find_image, _grad_out, _is_stored, _pair_terms,
                         _patch_offsets, _row_setup, _sim_splits, _store_row_stats, _store_rows, _wide, _ws_block,
                         _ws_ld, WS_ALIGN)

# Similarity GEMM, half features: 128 tampered rows (two wgmma M tiles) x 64 columns per
# item on 8 warps; fp32 (tf32x3 or FFMA, bound by its multiply-adds, and spilling at the
# half tiles): 64 x 32 on 4 warps. K chunks of 64 half values or 32 fp32 values (128 B).
# At most SIM_SPLITS parts of D per image, as many as bring the batch to SIM_PER_SM items
# per SM (the plan kernel's choice). The columns' statistics in the K loop hold the column
# tile in registers too: half features at 8 warps take 125-242 registers (one block per SM
# in NCHW; `maxnreg=128` spilled 4-384 B), fp32 at 4 warps up to 255 on sm_80; ieee runs
# 2 stages (3 spilled 16 B at p = 1 on sm_90).
SIM_BM = 128
SIM_BN = 64
SIM_WARPS = 8
SIM_BM_F32 = 64
SIM_BN_F32 = 32
SIM_WARPS_F32 = 4
SIM_BK_HALF = 64
SIM_BK_F32 = 32
SIM_STAGES = 3
SIM_STAGES_IEEE = 2
SIM_SPLITS = 8
SIM_PER_SM = 4
# Row pass over S: 4 rows x 128 columns per step (4 warps, 56 registers, 9 blocks per
# SM): short items, as each reads its rows of every partial block (8 rows took 95
# registers and twice as long an item, with the rows' norms loaded here).
ROWS_BM = 4
ROWS_BC = 128
ROWS_PER_SM = 4
# Coefficient pass: tiles of 16 rows x 128 columns of S (4 warps, about 100 registers).
COEF_BM = 16
COEF_BN = 128
COEF_PER_SM = 4
# Row stride of the half coefficient blocks Gc, Gr (HALF_COEF), in half values: 16-byte
# rows, so that the backward's tiles of them load as 128-bit vectors.
G_ALIGN: tl.constexpr = tl.constexpr(8)
# Backward GEMMs, by the coefficients' type (`grad_tiles`). Every chunk of D re-reads its
# rows and columns of G, and every row tile the partners' features: wider tiles read them
# fewer times, as far as the registers allow.
# * Half coefficients (bf16 features): 64 patches x 128 values of D per program, 32
#   partners per step (8 half values of G per thread: 128-bit loads), 8 warps within 128
#   registers (two blocks per SM; 128 x 128 spilled hundreds of bytes, and still 100-150
#   on sm_80 with its epilogue run on four parts of the chunk in turn); at p = 1 in NCHW,
#   where a patch's values are a channel apart and load as scalar gathers, 64 x 64 (64 x
#   128 spilled there).
# * fp32 coefficients: fp32 features, 64 x 64 per program and 8 partners per step (tf32's
#   native k) in 4 warps; fp16 features (tf32 products), 64 x 64 and 16 partners in 8
#   warps within 128 registers.
GRAD_BX = 64
GRAD_BY = 32
GRAD_BD = 128
GRAD_BD_GATHER = 64
GRAD_WARPS = 8
GRAD_STAGES = 2
GRAD_MAXNREG = 128
GRAD_BX_F32 = 64
GRAD_BD_F32 = 64
GRAD_BY_F32 = 8
GRAD_WARPS_F32 = 4
GRAD_STAGES_F32 = 1
GRAD_BY_F16 = 16
# Half coefficients on sm_90 with the head kernel off (`ncl_terms._grad_panel`, `GRAD_HEAD_MAJORS
# = ()`; with it on, the images that a panel would serve take the head kernel): each program takes GRAD_GROUP row
# tiles (r, r + n_grp, ...) of one chunk of D and holds the tampered partners' features on
# that chunk (up to GRAD_PANEL of them: the column GEMM's whole K, 32 KiB of shared memory,
# loaded once for the group) instead of every row tile re-reading them: at [93, 877, 54]
# 3.0 MB of reads per image instead of 12.2 (an image with |P| > GRAD_PANEL streams them
# as before). Within 128 registers (two blocks per SM) on sm_90; on sm_80 it spills there
# (456-572 B), so sm_80 keeps one row tile a program and no panel.
GRAD_GROUP = 4
GRAD_PANEL = 128
# Beside the head kernel the grouped kernel runs persistent programs over its work list
# (the images with |P| > GRAD_HEAD: none at the paper's 15 %), GRAD_PER_SM per SM (two
# resident, two queued: items differ in length), instead of a grid of every image's items
# whose programs mostly return (2,048 at stage 1). Only there: within 128 registers the
# loop spilled 8-368 B on sm_80 and in fp32.
GRAD_PER_SM = 4


def grad_tiles(up: bool, half_coef: bool, gather: bool, panel: int = 0, wide: bool = False,
               narrow: bool = False) -> dict:
    """The grad kernel's tile sizes and launch options: `up` for fp32 operands (fp32
    features), `half_coef` for coefficients in the features' half type (bf16), `gather`
    where a patch's values are a channel apart (p = 1, NCHW); `panel` > 0 (half
    coefficients only): GRAD_GROUP row tiles a program and a panel of up to `panel`
    tampered partners (see GRAD_PANEL); `wide`: 64-bit offsets (half coefficients: the
    gathers' chunk of D, as 128 spilled 8-32 B at p = 4 in NCHW); `narrow` (half
    coefficients): the gathers' chunk too (the persistent launch at p < 8 in NCHW, where
    128 spilled 16 B on sm_90 at p = 4)."""
    if half_coef:
        bd = GRAD_BD_GATHER if gather or wide or narrow else GRAD_BD
        if panel:
            return dict(BX=GRAD_BX, BY=GRAD_BY, BD=bd, GROUP=GRAD_GROUP, PANEL=panel, num_warps=GRAD_WARPS,
                        num_stages=GRAD_STAGES, maxnreg=GRAD_MAXNREG)
        return dict(BX=GRAD_BX, BY=GRAD_BY, BD=bd, GROUP=1, PANEL=0, num_warps=GRAD_WARPS, num_stages=GRAD_STAGES,
                    maxnreg=GRAD_MAXNREG)
    if up:
        return dict(BX=GRAD_BX_F32, BY=GRAD_BY_F32, BD=GRAD_BD_F32, GROUP=1, PANEL=0, num_warps=GRAD_WARPS_F32,
                    num_stages=GRAD_STAGES_F32, maxnreg=None)
    return dict(BX=GRAD_BX_F32, BY=GRAD_BY_F16, BD=GRAD_BD_F32, GROUP=1, PANEL=0, num_warps=GRAD_WARPS,
                num_stages=GRAD_STAGES, maxnreg=GRAD_MAXNREG)


@triton.jit
def _ncl_sim_kernel(
    feat_ptr, apos_ptr, aneg_ptr, perm_ptr, counts_ptr, plan_ptr,
    sched_ptr,  # (B + 1,) int32: the images' prefix sums of similarity items
    ws_ptr,  # fp32 workspace out: the partial blocks of <f_m, f_y> of each stored image
    colpart_ptr,  # (B, SIM_SPLITS, 3, L) fp32 out: per part of D, sum f_y^2, <f_y, a+>, <f_y, a->
    apart_ptr,  # (B, SIM_SPLITS, 2) fp32 out: per part of D, |a+|^2, |a-|^2
    stride_fb, stride_fc, stride_fy, stride_fx,
    stride_ab, stride_ad, stride_nb, stride_nd,
    B, L, Q, C, P_: tl.constexpr, D,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLITS: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, IDX64: tl.constexpr,
    LOG_B: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    # int64 offsets where an image can span past 2^31 elements
    stride_fc, stride_fy, stride_fx = _wide(stride_fc, IDX64), _wide(stride_fy, IDX64), _wide(stride_fx, IDX64)
    stride_ad, stride_nd = _wide(stride_ad, IDX64), _wide(stride_nd, IDX64)
    total = tl.load(sched_ptr + B)
    for t in range(pid, total, nprog):
        bi = _find_image(sched_ptr, t, B, LOG_B)
        local = t - tl.load(sched_ptr + bi)
        b = bi.to(tl.int64)
        n_p = tl.load(counts_ptr + b * 3)
        n_used = n_p + tl.load(counts_ptr + b * 3 + 1)
        splits = _sim_splits(plan_ptr, b)
        n_tn = tl.cdiv(n_used, BN)
        n_tiles = tl.cdiv(n_p, BM) * n_tn
        ks = local // n_tiles  # the part of D, slowest: concurrent items share its row tiles
        tile = local % n_tiles
        tm = tile // n_tn
        tn = tile % n_tn
        chunk = tl.cdiv(tl.cdiv(D, splits), BK) * BK
        k_lo = ks * chunk
        k_hi = tl.minimum(k_lo + chunk, D)
        feat_b = feat_ptr + b * stride_fb
        perm_b = perm_ptr + b * L
        rows = tm * BM + tl.arange(0, BM)
        rmask = rows < n_p
        cols = tn * BN + tl.arange(0, BN)
        cmask = cols < n_used
        poff_m = _patch_offsets(perm_b, rows, rmask, Q, P_, stride_fy, stride_fx)
        poff_n = _patch_offsets(perm_b, cols, cmask, Q, P_, stride_fy, stride_fx)
        # the GEMM's partial dots, and from the column tiles it loads anyway the columns'
        # statistics (|f_y|^2 and both anchors' dots: no pass of its own over the map)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        sq = tl.zeros([BN], dtype=tl.float32)
        dp = tl.zeros([BN], dtype=tl.float32)
        dn = tl.zeros([BN], dtype=tl.float32)
        ap2 = tl.zeros([], dtype=tl.float32)
        an2 = tl.zeros([], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BK):
            acc, fy, canon, kmask = _dot_step(feat_b, poff_m, rmask, poff_n, cmask, k0, acc, C, P_, D, stride_fc,
                                              stride_fy, stride_fx, BK, CHANNELS_LAST, UPCAST, PRECISION)
            ap = tl.load(apos_ptr + b * stride_ab + canon * stride_ad, mask=kmask, other=0.0).to(tl.float32)
            an = tl.load(aneg_ptr + b * stride_nb + canon * stride_nd, mask=kmask, other=0.0).to(tl.float32)
            fyf = fy.to(tl.float32)
            sq += tl.sum(fyf * fyf, axis=1)
            dp += tl.sum(fyf * ap[None, :], axis=1)
            dn += tl.sum(fyf * an[None, :], axis=1)
            ap2 += tl.sum(ap * ap, axis=0)
            an2 += tl.sum(an * an, axis=0)
        # rows of ld values, partial block ks at ks |P| ld; the padding columns [|P| + |N|, ld)
        # get the zeros their masked loads gave (the workspace is not zero-filled: these
        # blocks are all of it that the statistics pass does not zero); the row pass normalizes
        ld = _ws_ld(n_used)
        out = _ws_block(ws_ptr, plan_ptr, b) + ks.to(tl.int64) * n_p * ld
        tl.store(out + rows[:, None].to(tl.int64) * ld + cols[None, :], acc, mask=rmask[:, None] & (cols < ld)[None, :])
        # the columns' statistics of this part, from the first row tile's items
        if tm == 0:
            cp = colpart_ptr + ((b * SPLITS + ks) * 3) * L
            tl.store(cp + cols, sq, mask=cmask)
            tl.store(cp + L + cols, dp, mask=cmask)
            tl.store(cp + 2 * L + cols, dn, mask=cmask)
            if tn == 0:
                tl.store(apart_ptr + (b * SPLITS + ks) * 2, ap2)
                tl.store(apart_ptr + (b * SPLITS + ks) * 2 + 1, an2)


@triton.jit
def _sum_parts(ptrs, load_mask, store_mask, part_stride, splits, scale):
    """S over a tile: the partial blocks of dots added in a fixed order, times `scale`
    (1 / (|f_m| |f_y| tau)), written into block 0 (which becomes S) where `store_mask`
    holds. Loads take whole aligned runs of 4 columns (`load_mask`: 128-bit vectors)."""
    s = tl.load(ptrs, mask=load_mask, other=0.0)
    for k in range(1, splits):
        s += tl.load(ptrs + k * part_stride, mask=load_mask, other=0.0)
    s = s * scale
    tl.store(ptrs, s, mask=store_mask)
    return s


@triton.jit
def _ncl_rows_kernel(
    ws_ptr, plan_ptr, counts_ptr,
    sched_ptr,  # (B + 1,) int32: the images' prefix sums of row blocks
    nrm_ptr,  # (B, L) fp32: |f_x| by position (_ncl_stats_fwd_kernel)
    lse_ptr, w_ptr,  # (B, L) fp32 out: lam_m, W_m by position (tampered rows of stored images)
    part_ptr,  # (B, n_blocks) fp32 out: sum over the block's rows of sum_j softplus(lam_m - s_mj)
    B, L, n_blocks, inv_tau, eps,
    BM: tl.constexpr, BC: tl.constexpr, LOG_B: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    total = tl.load(sched_ptr + B)
    for t in range(pid, total, nprog):
        bi = _find_image(sched_ptr, t, B, LOG_B)
        blk = t - tl.load(sched_ptr + bi)
        b = bi.to(tl.int64)
        n_p = tl.load(counts_ptr + b * 3)
        n_used = n_p + tl.load(counts_ptr + b * 3 + 1)
        splits = _sim_splits(plan_ptr, b)
        ld = _ws_ld(n_used)
        part_stride = n_p.to(tl.int64) * ld
        rows = blk * BM + tl.arange(0, BM)
        rmask = rows < n_p
        row_ptr = _ws_block(ws_ptr, plan_ptr, b) + rows.to(tl.int64) * ld
        nrm_b = nrm_ptr + b * L
        rn_m = inv_tau / tl.maximum(tl.load(nrm_b + rows, mask=rmask, other=1.0), eps)
        # 1. lam_m: online, max-shifted log-sum-exp over the authentic columns (from the
        #    aligned column at or below |P|); every step holds a column (rows past |P|
        #    read 0 there), so the running max of every row is finite and no lane forms
        #    -inf - -inf
        run_max = tl.full([BM], float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros([BM], dtype=tl.float32)
        for c0 in range(n_p // WS_ALIGN * WS_ALIGN, n_used, BC):
            cols = c0 + tl.arange(0, BC)
            cmask = (cols >= n_p) & (cols < n_used)
            rn_y = 1.0 / tl.maximum(tl.load(nrm_b + cols, mask=cols < n_used, other=1.0), eps)
            s = _sum_parts(row_ptr[:, None] + cols[None, :], rmask[:, None] & (cols < ld)[None, :],
                           rmask[:, None] & cmask[None, :], part_stride, splits, rn_m[:, None] * rn_y[None, :])
            s = tl.where(cmask[None, :], s, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(s, axis=1))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(s - new_max[:, None]), axis=1)
            run_max = new_max
        lse = run_max + tl.log(run_sum)
        # 2. sum_j softplus(lam_m - s_mj) and W_m over the tampered columns j != m
        term = tl.zeros([BM], dtype=tl.float32)
        wsum = tl.zeros([BM], dtype=tl.float32)
        for c0 in range(0, n_p, BC):
            cols = c0 + tl.arange(0, BC)
            inb = rmask[:, None] & (cols < n_p)[None, :]
            rn_y = 1.0 / tl.maximum(tl.load(nrm_b + cols, mask=cols < n_p, other=1.0), eps)
            s = _sum_parts(row_ptr[:, None] + cols[None, :], rmask[:, None] & (cols < ld)[None, :], inb,
                           part_stride, splits, rn_m[:, None] * rn_y[None, :])
            ok = inb & (cols[None, :] != rows[:, None])
            z = lse[:, None] - tl.where(ok, s, 0.0)
            term, wsum = _pair_terms(z, ok, term, wsum)
        _store_row_stats(lse_ptr, w_ptr, part_ptr, b, L, n_blocks, blk, rows, rmask, lse, wsum, term)


@triton.jit
def _g_ld(n_used):
    """Row stride of an image's half coefficient blocks Gc and Gr (HALF_COEF): |P| + |N|
    rounded up to a multiple of G_ALIGN half values (16-byte rows: 128-bit loads)."""
    return tl.multiple_of((n_used + (G_ALIGN - 1)) // G_ALIGN * G_ALIGN, G_ALIGN)


@triton.jit
def _g_blocks(g_ptr, b, g_cap):
    """The image's half coefficient blocks Gc and Gr (HALF_COEF): g_cap half values each
    (a multiple of G_ALIGN), the image's pair at 2 b g_cap."""
    cap = tl.multiple_of(g_cap, G_ALIGN)
    gc_b = g_ptr + tl.multiple_of(b * 2 * cap, G_ALIGN)
    return gc_b, gc_b + cap


@triton.jit
def _ncl_coef_kernel(
    ws_ptr,  # fp32 workspace: S of each stored image
    g_ptr,  # out: the coefficients of each stored image (fp32 G in the workspace's layout, or Gc, Gr: HALF_COEF)
    plan_ptr, counts_ptr,
    sched_ptr,  # (B + 1,) int32: the images' prefix sums of coefficient tiles
    lse_ptr, w_ptr, nrm_ptr,
    rdot_ptr,  # (B, n_cn, L) fp32 out: sum over column tile j of G_my s_my, by row m
    cdot_ptr,  # (B, n_cm, L) fp32 out: sum over row tile i of G_mx s_mx, by column x
    B, L, n_cn, n_cm, g_cap, eps,
    BM: tl.constexpr, BN: tl.constexpr, HALF_COEF: tl.constexpr, LOG_B: tl.constexpr,
):
    """G = dL/dS / k1 over one (row tile, column tile) of S per item:
    G_mj = -sigmoid(lam_m - s_mj) (j in P, j != m), G_mi = W_m exp(s_mi - lam_m) (i in N),
    0 on the diagonal and in the rows' padding. HALF_COEF: written already scaled by the
    partners' 1/|f| and rounded to the half type of `g_ptr`, twice (g_cap half values
    apart, rows of _g_ld): Gc_my = G_my / max(|f_y|, eps) (the grad kernel's rows of G)
    and Gr_my = G_my / max(|f_m|, eps) (its columns)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    total = tl.load(sched_ptr + B)
    for t in range(pid, total, nprog):
        bi = _find_image(sched_ptr, t, B, LOG_B)
        local = t - tl.load(sched_ptr + bi)
        b = bi.to(tl.int64)
        n_p = tl.load(counts_ptr + b * 3)
        n_used = n_p + tl.load(counts_ptr + b * 3 + 1)
        n_tn = tl.cdiv(n_used, BN)
        tm = local // n_tn
        tn = local % n_tn
        ld = _ws_ld(n_used)
        rows = tm * BM + tl.arange(0, BM)
        rmask = rows < n_p
        cols = tn * BN + tl.arange(0, BN)
        offs = rows[:, None].to(tl.int64) * ld + cols[None, :]  # within the image's block
        s_b = _ws_block(ws_ptr, plan_ptr, b)
        inb = rmask[:, None] & (cols < ld)[None, :]  # whole aligned rows, padding included
        s = tl.load(s_b + offs, mask=inb, other=0.0)
        ok = rmask[:, None] & (cols < n_used)[None, :] & (rows[:, None] != cols[None, :])
        s = tl.where(ok, s, 0.0)
        lse = tl.load(lse_ptr + b * L + rows, mask=rmask, other=0.0)
        w = tl.load(w_ptr + b * L + rows, mask=rmask, other=0.0)
        # one exp per element; s - lam <= 0 on authentic columns, and the clamp keeps a
        # tampered column with s far above lam (tau -> 0) finite: -1/(1 + e^80) ~ 0
        e = tl.exp(tl.minimum(s - lse[:, None], 80.0))
        if tn * BN >= n_p:  # authentic columns only: no division
            g = w[:, None] * e
        else:
            g = tl.where((cols < n_p)[None, :], -1.0 / (1.0 + e), w[:, None] * e)
        g = tl.where(ok, g, 0.0)
        gs = g * s
        tl.store(rdot_ptr + (b * n_cn + tn) * L + rows, tl.sum(gs, axis=1), mask=rmask)
        tl.store(cdot_ptr + (b * n_cm + tm) * L + cols, tl.sum(gs, axis=0), mask=cols < n_used)
        if HALF_COEF:
            # the products the grad kernel's dots take, as it formed them before: (G / |f|) in fp32,
            # then rounded once; padding columns up to the half rows' stride get 0
            rn_r = 1.0 / tl.maximum(tl.load(nrm_ptr + b * L + rows, mask=rmask, other=1.0), eps)
            rn_c = 1.0 / tl.maximum(tl.load(nrm_ptr + b * L + cols, mask=cols < n_used, other=1.0), eps)
            gc_b, gr_b = _g_blocks(g_ptr, b, g_cap)
            hoffs = rows[:, None].to(tl.int64) * _g_ld(n_used) + cols[None, :]
            hinb = rmask[:, None] & (cols < _g_ld(n_used))[None, :]
            tl.store(gc_b + hoffs, (g * rn_c[None, :]).to(g_ptr.dtype.element_ty), mask=hinb)
            tl.store(gr_b + hoffs, (g * rn_r[:, None]).to(g_ptr.dtype.element_ty), mask=hinb)
        else:
            tl.store(_ws_block(g_ptr, plan_ptr, b) + offs, g, mask=inb)


@triton.jit
def _grad_item(
    t, n_img, feat_ptr, grad_ptr, apos_ptr, aneg_ptr, perm_ptr, counts_ptr, nrm_ptr, nrma_ptr, sa_ptr, lse_ptr,
    w_ptr, lsea_ptr, wa_ptr, gout_ptr, plan_ptr, g_ptr, rdot_ptr, cdot_ptr, apart_ptr, adots_ptr, sched_ptr,
    stride_fb, stride_fc, stride_fy, stride_fx, stride_gb, stride_gc, stride_gy, stride_gx, stride_ab, stride_ad,
    stride_nb, stride_nd, B, L, Q, C, P_: tl.constexpr, D, n_tx, n_grp, n_td, n_cn, n_cm, g_cap, inv_tau, eps,
    BX: tl.constexpr, BY: tl.constexpr, BD: tl.constexpr, GROUP: tl.constexpr, PANEL: tl.constexpr, CM: tl.constexpr,
    CN: tl.constexpr, CHANNELS_LAST: tl.constexpr, PRECISION: tl.constexpr, HALF_COEF: tl.constexpr,
    IDX64: tl.constexpr, LOG_B: tl.constexpr,
):
    """Item t of the grouped kernel: (row group (slowest), listed image, chunk of D
    (fastest)), n_img listed images (see `_ncl_grad_kernel`)."""
    td = t % n_td
    rest = t // n_td
    b = _find_image(sched_ptr, rest % n_img, B, LOG_B).to(tl.int64)
    grp = rest // n_img
    n_p = tl.load(counts_ptr + b * 3)
    n_n = tl.load(counts_ptr + b * 3 + 1)
    n_used = n_p + n_n
    t1 = (n_p >= 2) & (n_n >= 1)
    kd = td * BD + tl.arange(0, BD)
    kdmask = kd < D
    perm_b = perm_ptr + b * L
    d_off, canon = _d_offsets(kd, C, P_, stride_fc, stride_fy, stride_fx, CHANNELS_LAST)
    feat_b = feat_ptr + b * stride_fb
    # the panel (PANEL > 0): every tampered partner's features on this chunk, loaded once for
    # all the group's row tiles (their column GEMM's whole K), where |P| <= PANEL; else
    # the column GEMM streams them per tile
    if PANEL > 0:
        ms_pan = tl.arange(0, PANEL)
        on_pan = t1 & (n_p <= PANEL) & (grp * BX < n_used)  # (a group of contour tiles only needs none)
        pmask = (ms_pan < n_p) & on_pan
        fpan = tl.load(feat_b + _patch_offsets(perm_b, ms_pan, pmask, Q, P_, stride_fy, stride_fx)[:, None]
                       + d_off[None, :], mask=pmask[:, None] & kdmask[None, :], other=0.0)
        n_stream = tl.where(on_pan, 0, n_p)
    else:
        n_stream = n_p
    # the group's row tiles, unrolled (GROUP = 1: one tile, no loop); a tile past the map
    # (tx >= n_tx, in the last groups) takes the contour branch with every store masked off
    for gi in tl.static_range(GROUP):
        tx = grp + gi * n_grp
        if GROUP > 1:
            # the chunk's offsets formed again per tile, from a value of the tile (so that they are
            # neither hoisted nor shared): held across the group, their copies in each layout took
            # the registers that keep two blocks per SM (within 128 on sm_90, no spill)
            td_t = tl.where(tx >= 0, td, 0)
            kd = td_t * BD + tl.arange(0, BD)
            kdmask = kd < D
            d_off, canon = _d_offsets(kd, C, P_, stride_fc, stride_fy, stride_fx, CHANNELS_LAST)
        x0 = tx * BX
        rows = x0 + tl.arange(0, BX)
        in_grid = rows < L
        if x0 >= n_used:  # contour patches only: their gradient is zero
            _store_rows(grad_ptr + b * stride_gb, tl.zeros([BX, BD], dtype=tl.float32), perm_b, rows, in_grid, kd,
                        kdmask, C, Q, P_, stride_gc, stride_gy, stride_gx, CHANNELS_LAST)
        else:
            xmask = rows < n_used
            x_is_p = rows < n_p
            # the pairs' share, without the factor k1 (coefficients of order 1: nothing underflows);
            # what only the end needs is loaded there, so that it holds no registers in the loops
            pair = tl.zeros([BX, BD], dtype=tl.float32)
            pdot = tl.zeros([BX], dtype=tl.float32)
            if t1:
                # G loads as whole aligned runs of columns (its padding columns are 0: 128-bit
                # loads); the diagonal is 0 in G itself
                if HALF_COEF:  # Gc and Gr: G already scaled by the partners' 1/|f|, in the features' half type
                    gc_b, gr_b = _g_blocks(g_ptr, b, g_cap)
                    ld = _g_ld(n_used)
                else:  # fp32 G, scaled here
                    gc_b = _ws_block(g_ptr, plan_ptr, b)
                    gr_b = gc_b
                    ld = _ws_ld(n_used)
                # 1. x in P: sum_y G_xy hat f_y over y in P u N (row x of G)
                if x0 < n_p:
                    for y0 in range(0, n_used, BY):
                        cols = y0 + tl.arange(0, BY)
                        ymask = cols < n_used
                        g = tl.load(gc_b + rows[:, None].to(tl.int64) * ld + cols[None, :],
                                    mask=x_is_p[:, None] & (cols < ld)[None, :], other=0.0)
                        poff_y = _patch_offsets(perm_b, cols, ymask, Q, P_, stride_fy, stride_fx)
                        fy = tl.load(feat_b + poff_y[:, None] + d_off[None, :],
                                     mask=ymask[:, None] & kdmask[None, :], other=0.0)
                        if HALF_COEF:  # both operands in the features' half type (bf16: the fp32 range)
                            pair = tl.dot(g, fy, pair)
                        else:
                            rn_y = 1.0 / tl.maximum(tl.load(nrm_ptr + b * L + cols, mask=ymask, other=1.0), eps)
                            pair = tl.dot(g * rn_y[None, :], fy.to(tl.float32), pair, input_precision=PRECISION)
                # 2. every x: sum_m G_mx hat f_m over m in P (column x of G): from the panel, or streamed
                if PANEL > 0:
                    if on_pan:
                        gt = tl.load(gr_b + ms_pan[:, None].to(tl.int64) * ld + rows[None, :],
                                     mask=pmask[:, None] & (rows < ld)[None, :], other=0.0)  # [PANEL, BX]
                        pair = tl.dot(tl.trans(gt), fpan, pair)
                for m0 in range(0, n_stream, BY):
                    ms = m0 + tl.arange(0, BY)
                    mmask = ms < n_p
                    gt = tl.load(gr_b + ms[:, None].to(tl.int64) * ld + rows[None, :],
                                 mask=mmask[:, None] & (rows < ld)[None, :], other=0.0)  # [BY, BX]
                    poff_m = _patch_offsets(perm_b, ms, mmask, Q, P_, stride_fy, stride_fx)
                    fm = tl.load(feat_b + poff_m[:, None] + d_off[None, :], mask=mmask[:, None] & kdmask[None, :],
                                 other=0.0)
                    if HALF_COEF:
                        pair = tl.dot(tl.trans(gt), fm, pair)
                    else:
                        rn_m = 1.0 / tl.maximum(tl.load(nrm_ptr + b * L + ms, mask=mmask, other=1.0), eps)
                        pair = tl.dot(tl.trans(gt * rn_m[:, None]), fm.to(tl.float32), pair,
                                      input_precision=PRECISION)
                # <hat f_x, sum_y T_xy hat f_y> tau = sum_y T_xy s_xy: the coefficient pass's
                # partial sums, added in a fixed order
                for j in range(0, tl.cdiv(n_used, CN)):
                    pdot += tl.load(rdot_ptr + (b * n_cn + j) * L + rows, mask=x_is_p, other=0.0)
                for i in range(0, tl.cdiv(n_p, CM)):
                    pdot += tl.load(cdot_ptr + (b * n_cm + i) * L + rows, mask=xmask, other=0.0)
                n_pf = n_p.to(tl.float32)
                k1 = tl.load(gout_ptr + b * 3) / tl.maximum(n_pf * (n_pf - 1.0), 1.0)
                pair = k1 * pair
                pdot = k1 * pdot
            nrm_x, _, _, _, c_pos, c_neg, dot_x = _row_setup(
                b, rows, xmask, x_is_p, counts_ptr, nrm_ptr, sa_ptr, lse_ptr, w_ptr, lsea_ptr, wa_ptr, gout_ptr, L,
            )
            dot_x += pdot
            # the anchors' share, then through the normalization into the map's own layout;
            # contour rows of a mixed tile get 0
            fx = tl.load(feat_b + _patch_offsets(perm_b, rows, xmask, Q, P_, stride_fy, stride_fx)[:, None]
                         + d_off[None, :], mask=xmask[:, None] & kdmask[None, :], other=0.0)
            # the anchors' gradients take their sums over x from the features loaded here (no
            # second pass over the map); with half coefficients, in the features' half type
            # (where they go decides the registers ptxas keeps: with fp32 coefficients they come
            # before the gradient's epilogue at p = 1, after it otherwise; with half coefficients,
            # after the tile's gradient is stored, from the half tile: the placements that spill
            # in no variant)
            if not HALF_COEF and P_ == 1:
                _anchor_parts(apart_ptr, adots_ptr, b, tx, n_tx, td == 0, rows, xmask, c_pos, c_neg, nrm_x,
                              fx.to(tl.float32), canon, kdmask, sa_ptr, L, D, eps, PRECISION)
            grad = _grad_out(pair, dot_x, c_pos, c_neg, nrm_x, fx.to(tl.float32), b, kdmask, canon, apos_ptr,
                             aneg_ptr, nrma_ptr, stride_ab, stride_ad, stride_nb, stride_nd, inv_tau, eps)
            grad = tl.where(xmask[:, None], grad, 0.0)
            if not HALF_COEF and P_ != 1:
                _anchor_parts(apart_ptr, adots_ptr, b, tx, n_tx, td == 0, rows, xmask, c_pos, c_neg, nrm_x,
                              fx.to(tl.float32), canon, kdmask, sa_ptr, L, D, eps, PRECISION)
            _store_rows(grad_ptr + b * stride_gb, grad, perm_b, rows, in_grid, kd, kdmask,
                        C, Q, P_, stride_gc, stride_gy, stride_gx, CHANNELS_LAST)
            if HALF_COEF:
                _anchor_parts(apart_ptr, adots_ptr, b, tx, n_tx, td == 0, rows, xmask, c_pos, c_neg, nrm_x, fx,
                              canon, kdmask, sa_ptr, L, D, eps, PRECISION)


# The grouped kernel's launch: its items (row group, listed image, chunk of D) come from
# the plan's work list, `_grad_item` doing one: one a program, or beside the head kernel
# persistent programs over them (see GRAD_PER_SM).
@triton.jit
def _ncl_grad_kernel(
    feat_ptr, grad_ptr,  # (B, C, h, w) in, and its gradient out (uncovered cells are the caller's)
    apos_ptr, aneg_ptr,
    perm_ptr, counts_ptr, nrm_ptr, nrma_ptr, sa_ptr, lse_ptr, w_ptr, lsea_ptr, wa_ptr,
    gout_ptr,  # (B, 3) fp32: dL/d(t1, t2, t3)
    plan_ptr, g_ptr,  # the coefficients of each stored image (_ncl_coef_kernel: fp32 G, or Gc and Gr)
    rdot_ptr, cdot_ptr,  # the coefficient pass's partial sums (see _ncl_coef_kernel)
    apart_ptr, adots_ptr,  # (B, n_tx, 2, D), (B, n_tx, 2) fp32 out: the anchors' gradients' sums per row tile
    sched_ptr,  # (B + 1,) int32: the prefix sums of the images this launch takes (1 each: _ncl_plan_kernel)
    stride_fb, stride_fc, stride_fy, stride_fx,
    stride_gb, stride_gc, stride_gy, stride_gx,
    stride_ab, stride_ad, stride_nb, stride_nd,
    B, L, Q, C, P_: tl.constexpr, D, n_tx, n_grp, n_td, n_cn, n_cm, g_cap, inv_tau, eps,
    BX: tl.constexpr, BY: tl.constexpr, BD: tl.constexpr, GROUP: tl.constexpr, PANEL: tl.constexpr, CM: tl.constexpr,
    CN: tl.constexpr, CHANNELS_LAST: tl.constexpr, PRECISION: tl.constexpr, HALF_COEF: tl.constexpr,
    IDX64: tl.constexpr, LOG_B: tl.constexpr, PERSISTENT: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    # int64 offsets where an image can span past 2^31 elements
    stride_fc, stride_fy, stride_fx = _wide(stride_fc, IDX64), _wide(stride_fy, IDX64), _wide(stride_fx, IDX64)
    stride_gc, stride_gy, stride_gx = _wide(stride_gc, IDX64), _wide(stride_gy, IDX64), _wide(stride_gx, IDX64)
    stride_ad, stride_nd = _wide(stride_ad, IDX64), _wide(stride_nd, IDX64)
    # the items (row group (slowest), image, chunk of D (fastest)) of the images of the work
    # list (the stored images the head kernel leaves): group r takes the row tiles r, r +
    # n_grp, ... (the tampered tiles, first, land in different items). PERSISTENT: programs
    # loop over items pid, pid + programs, ...; else program pid takes item pid (a grid of
    # every image's items; see GRAD_PER_SM)
    n_img = tl.load(sched_ptr + B)
    total = n_grp * n_img * n_td
    if PERSISTENT:
        for t in range(pid, total, nprog):
            _grad_item(
                t, n_img, feat_ptr, grad_ptr, apos_ptr, aneg_ptr, perm_ptr, counts_ptr, nrm_ptr, nrma_ptr, sa_ptr,
                lse_ptr, w_ptr, lsea_ptr, wa_ptr, gout_ptr, plan_ptr, g_ptr, rdot_ptr, cdot_ptr, apart_ptr, adots_ptr,
                sched_ptr, stride_fb, stride_fc, stride_fy, stride_fx, stride_gb, stride_gc, stride_gy, stride_gx,
                stride_ab, stride_ad, stride_nb, stride_nd, B, L, Q, C, P_, D, n_tx, n_grp, n_td, n_cn, n_cm, g_cap,
                inv_tau, eps, BX, BY, BD, GROUP, PANEL, CM, CN, CHANNELS_LAST, PRECISION, HALF_COEF, IDX64, LOG_B,
            )
    elif pid < total:
        _grad_item(
            pid, n_img, feat_ptr, grad_ptr, apos_ptr, aneg_ptr, perm_ptr, counts_ptr, nrm_ptr, nrma_ptr, sa_ptr,
            lse_ptr, w_ptr, lsea_ptr, wa_ptr, gout_ptr, plan_ptr, g_ptr, rdot_ptr, cdot_ptr, apart_ptr, adots_ptr,
            sched_ptr, stride_fb, stride_fc, stride_fy, stride_fx, stride_gb, stride_gc, stride_gy, stride_gx,
            stride_ab, stride_ad, stride_nb, stride_nd, B, L, Q, C, P_, D, n_tx, n_grp, n_td, n_cn, n_cm, g_cap,
            inv_tau, eps, BX, BY, BD, GROUP, PANEL, CM, CN, CHANNELS_LAST, PRECISION, HALF_COEF, IDX64, LOG_B,
        )


# Half coefficients, images with |P| <= GRAD_HEAD (`ncl_terms._grad_head`): one program per
# (image, chunk of D) takes every listed patch of the chunk, in tiles of GRAD_HEAD / 2 rows,
# so that the chunk's features are read once for both GEMMs and G once (instead of once per
# row tile that holds tampered rows, and Gc and Gr both). It holds the tampered rows' sums
# over all partners (two accumulators of GRAD_HEAD / 2 rows) and the tampered partners'
# features (the column GEMM's whole K) across its tiles, and runs the tiles past the
# tampered rows first, then the two tiles of rows [0, GRAD_HEAD) with the sums complete.
GRAD_HEAD = 128
GRAD_HEAD_BD = 128
GRAD_HEAD_BD_SMALL = 64
GRAD_HEAD_BD_GATHER = 32
GRAD_HEAD_WARPS = 8
GRAD_HEAD_STAGES = 1


def grad_head_tiles(patch: int, channels_last: bool) -> dict:
    """The head kernel's chunk of D and launch options: chunks of GRAD_HEAD_BD at p >= 8;
    GRAD_HEAD_BD_GATHER at p = 1 in NCHW (a patch's values a channel apart: scalar gathers);
    GRAD_HEAD_BD_SMALL otherwise (with 128, NCHW at p = 4 and channels_last at p = 1 spilled
    8-100 B on sm_90)."""
    if patch >= 8:
        bd = GRAD_HEAD_BD
    else:
        bd = GRAD_HEAD_BD_GATHER if patch == 1 and not channels_last else GRAD_HEAD_BD_SMALL
    return dict(HEAD=GRAD_HEAD, BD=bd, num_warps=GRAD_HEAD_WARPS, num_stages=GRAD_HEAD_STAGES)


@triton.jit
def _head_g(gc_b, ld, ms, pmask, rows):
    """Gc[m, x] of the head's tampered rows m (ms: HEAD of them) and a tile of partners x (rows);
    int32 offsets within the image's block (|P| ld8 <= g_cap, below 2^31: see `_g_cap`)."""
    return tl.load(gc_b + ms[:, None] * ld + rows[None, :], mask=pmask[:, None] & (rows < ld)[None, :], other=0.0)


@triton.jit
def _head_col(g, fpan, nrm_ptr, b, L, rows, xmask, eps):
    """A tile's column GEMM from its G: sum_m Gc[m, x] hat f_m max(|f_x|, eps) = sum_m G_mx /
    max(|f_m|, eps) f_m (one [x, m] @ [m, D] product, K = HEAD)."""
    col = tl.dot(tl.trans(g), fpan)
    return col * tl.maximum(tl.load(nrm_ptr + b * L + rows, mask=xmask, other=1.0), eps)[:, None]


@triton.jit
def _head_pdot(t1, rows, n_p, n_used, b, rdot_ptr, cdot_ptr, L, n_cn, n_cm, XB: tl.constexpr, CM: tl.constexpr,
               CN: tl.constexpr):
    """sum_y T_xy s_xy / k1 of a tile: the coefficient pass's partial sums, in a fixed order
    (loaded before the tile's GEMMs, when few values are held)."""
    pdot = tl.zeros([XB], dtype=tl.float32)
    if t1:
        for j in range(0, tl.cdiv(n_used, CN)):
            pdot += tl.load(rdot_ptr + (b * n_cn + j) * L + rows, mask=rows < n_p, other=0.0)
        for j in range(0, tl.cdiv(n_p, CM)):
            pdot += tl.load(cdot_ptr + (b * n_cm + j) * L + rows, mask=rows < n_used, other=0.0)
    return pdot


@triton.jit
def _head_epilogue(
    pair, pdot, t1, k1, fx, tx, n_p, n_used, b, td, kd, kdmask, d_canon, apart_ptr, adots_ptr, n_tx, D,
    grad_ptr, perm_b, counts_ptr, nrm_ptr, nrma_ptr, sa_ptr, lse_ptr, w_ptr, lsea_ptr, wa_ptr, gout_ptr,
    rdot_ptr, cdot_ptr, apos_ptr, aneg_ptr,
    stride_gb, stride_gc, stride_gy, stride_gx, stride_ab, stride_ad, stride_nb, stride_nd,
    L, Q, C, P_: tl.constexpr, n_cn, n_cm, inv_tau, eps,
    XB: tl.constexpr, CM: tl.constexpr, CN: tl.constexpr, CHANNELS_LAST: tl.constexpr,
):
    """Tile tx's gradient from its pairs' sum and partial dot sums (without k1): the anchors'
    share and the normalization's backward, stored; and its share of the anchors' sums, into
    its entry tx (as the grouped kernel's tiles of XB rows)."""
    rows = tx * XB + tl.arange(0, XB)
    xmask = rows < n_used
    x_is_p = rows < n_p
    nrm_x, lse_x, w_x, k1_x, c_pos, c_neg, dot_x = _row_setup(
        b, rows, xmask, x_is_p, counts_ptr, nrm_ptr, sa_ptr, lse_ptr, w_ptr, lsea_ptr, wa_ptr, gout_ptr, L,
    )
    grad = _grad_out(k1 * pair, dot_x + k1 * pdot, c_pos, c_neg, nrm_x, fx.to(tl.float32), b, kdmask, d_canon,
                     apos_ptr, aneg_ptr, nrma_ptr, stride_ab, stride_ad, stride_nb, stride_nd, inv_tau, eps)
    grad = tl.where(xmask[:, None], grad, 0.0)
    _store_rows(grad_ptr + b * stride_gb, grad, perm_b, rows, rows < L, kd, kdmask,
                C, Q, P_, stride_gc, stride_gy, stride_gx, CHANNELS_LAST)
    # the anchors' sums over the tile, into its entry (the features it holds, in their half type)
    _anchor_parts(apart_ptr, adots_ptr, b, tx, n_tx, td == 0, rows, xmask, c_pos, c_neg, nrm_x, fx, d_canon,
                  kdmask, sa_ptr, L, D, eps, "tf32")


@triton.jit
def _ncl_grad_head_kernel(
    feat_ptr, grad_ptr,  # (B, C, h, w) in, and its gradient out (uncovered cells are the caller's)
    apos_ptr, aneg_ptr,
    perm_ptr, counts_ptr, nrm_ptr, nrma_ptr, sa_ptr, lse_ptr, w_ptr, lsea_ptr, wa_ptr,
    gout_ptr,  # (B, 3) fp32: dL/d(t1, t2, t3)
    plan_ptr, g_ptr,  # Gc and Gr of each stored image (_ncl_coef_kernel, HALF_COEF); Gc only is read
    rdot_ptr, cdot_ptr,  # the coefficient pass's partial sums (see _ncl_coef_kernel)
    apart_ptr, adots_ptr,  # (B, n_tx, 2, D), (B, n_tx, 2) fp32 out: the anchors' sums per tile of HEAD / 2 rows
    stride_fb, stride_fc, stride_fy, stride_fx,
    stride_gb, stride_gc, stride_gy, stride_gx,
    stride_ab, stride_ad, stride_nb, stride_nd,
    B, L, Q, C, P_: tl.constexpr, D, n_tx, n_td, n_cn, n_cm, g_cap, inv_tau, eps,
    HEAD: tl.constexpr, BD: tl.constexpr, CM: tl.constexpr, CN: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    IDX64: tl.constexpr, CHECK_STORED: tl.constexpr,
):
    """The stored backward of an image with |P| <= HEAD on one chunk of D (half
    coefficients). For each tile x of HEAD / 2 listed patches: the tampered rows' sums
    acc += Gc[P, x] @ f_x (K = every partner) and the tile's column GEMM from the tampered
    features held by the program (`_head_col`: G is read once, Gc alone), then its
    epilogue; the tiles of rows [0, HEAD) (P first) come last and add acc. Patches past
    the lists (contour) get zeros. The anchors' sums go into each tile's entry, as the
    grouped kernel's row tiles of HEAD / 2 write theirs (`_ncl_anchor_grad_kernel`)."""
    XB: tl.constexpr = HEAD // 2
    pid = tl.program_id(0)
    td = pid % n_td
    b = (pid // n_td).to(tl.int64)
    # int64 offsets where an image can span past 2^31 elements
    stride_fc, stride_fy, stride_fx = _wide(stride_fc, IDX64), _wide(stride_fy, IDX64), _wide(stride_fx, IDX64)
    stride_gc, stride_gy, stride_gx = _wide(stride_gc, IDX64), _wide(stride_gy, IDX64), _wide(stride_gx, IDX64)
    stride_ad, stride_nd = _wide(stride_ad, IDX64), _wide(stride_nd, IDX64)
    if CHECK_STORED:  # both paths run in this batch: the bounded kernel does this image
        if _is_stored(plan_ptr, b) == 0:
            return
    n_p = tl.load(counts_ptr + b * 3)
    if n_p > HEAD:  # the grouped kernel (_ncl_grad_kernel) does this image
        return
    n_n = tl.load(counts_ptr + b * 3 + 1)
    n_used = n_p + n_n
    t1 = (n_p >= 2) & (n_n >= 1)
    kd = td * BD + tl.arange(0, BD)
    kdmask = kd < D
    d_off, canon = _d_offsets(kd, C, P_, stride_fc, stride_fy, stride_fx, CHANNELS_LAST)
    feat_b = feat_ptr + b * stride_fb
    perm_b = perm_ptr + b * L
    gc_b, gr_unused = _g_blocks(g_ptr, b, g_cap)
    ld = _g_ld(n_used)
    # the tampered rows and their features on the chunk (the column GEMM's K), as
    # hat f_m = f_m / max(|f_m|, eps) rounded once to the features' type
    ms = tl.arange(0, HEAD)
    pmask = (ms < n_p) & t1
    fpan = tl.load(feat_b + _patch_offsets(perm_b, ms, pmask, Q, P_, stride_fy, stride_fx)[:, None] + d_off[None, :],
                   mask=pmask[:, None] & kdmask[None, :], other=0.0)
    rn_m = 1.0 / tl.maximum(tl.load(nrm_ptr + b * L + ms, mask=pmask, other=1.0), eps)
    fpan = (fpan.to(tl.float32) * rn_m[:, None]).to(fpan.dtype)
    n_pf = n_p.to(tl.float32)
    k1 = tl.load(gout_ptr + b * 3) / tl.maximum(n_pf * (n_pf - 1.0), 1.0)
    acc = tl.zeros([HEAD, BD], dtype=tl.float32)  # the tampered rows' sums over every partner
    n_t = tl.cdiv(n_used, XB)
    # 1. the tiles past the head's rows (authentic patches only), the last first
    for i in range(0, n_t - 2):
        x0 = (n_t - 1 - i) * XB
        rows = x0 + tl.arange(0, XB)
        xmask = rows < n_used
        # the chunk's offsets formed again per tile, from a value of the tile (so that they are not
        # hoisted and held across the loop)
        td_t = tl.where(x0 >= 0, td, 0)
        kd = td_t * BD + tl.arange(0, BD)
        kdmask = kd < D
        d_off, canon = _d_offsets(kd, C, P_, stride_fc, stride_fy, stride_fx, CHANNELS_LAST)
        pdot = _head_pdot(t1, rows, n_p, n_used, b, rdot_ptr, cdot_ptr, L, n_cn, n_cm, XB, CM, CN)
        fx = tl.load(feat_b + _patch_offsets(perm_b, rows, xmask, Q, P_, stride_fy, stride_fx)[:, None]
                     + d_off[None, :], mask=xmask[:, None] & kdmask[None, :], other=0.0)
        g = _head_g(gc_b, ld, ms, pmask, rows)
        acc = tl.dot(g, fx, acc)
        col = _head_col(g, fpan, nrm_ptr, b, L, rows, xmask, eps)
        _head_epilogue(
            col, pdot, t1, k1, fx, x0 // XB, n_p, n_used, b, td, kd, kdmask, canon, apart_ptr, adots_ptr, n_tx, D,
            grad_ptr, perm_b, counts_ptr, nrm_ptr, nrma_ptr, sa_ptr, lse_ptr, w_ptr, lsea_ptr, wa_ptr, gout_ptr,
            rdot_ptr, cdot_ptr, apos_ptr, aneg_ptr, stride_gb, stride_gc, stride_gy, stride_gx,
            stride_ab, stride_ad, stride_nb, stride_nd, L, Q, C, P_, n_cn, n_cm, inv_tau, eps, XB, CM, CN,
            CHANNELS_LAST)
    # 2. the head's rows: tile 1 ([XB, HEAD)) adds its share of the sums, then tile 0 ([0, XB))
    #    adds its share and takes its gradient (rows [0, XB) of the sums), then tile 1 its
    #    gradient (rows [XB, HEAD); its G and features loaded again: fewer values held at once)
    # (the chunk's offsets formed again, from a value of the loop: not held across it)
    td_h = tl.where(n_t >= 0, td, 0)
    kd = td_h * BD + tl.arange(0, BD)
    kdmask = kd < D
    d_off, canon = _d_offsets(kd, C, P_, stride_fc, stride_fy, stride_fx, CHANNELS_LAST)
    rows1 = XB + tl.arange(0, XB)
    rows0 = tl.arange(0, XB)
    x1mask = rows1 < n_used
    x0mask = rows0 < n_used
    fx = tl.load(feat_b + _patch_offsets(perm_b, rows1, x1mask, Q, P_, stride_fy, stride_fx)[:, None]
                 + d_off[None, :], mask=x1mask[:, None] & kdmask[None, :], other=0.0)
    acc = tl.dot(_head_g(gc_b, ld, ms, pmask, rows1), fx, acc)
    fx = tl.load(feat_b + _patch_offsets(perm_b, rows0, x0mask, Q, P_, stride_fy, stride_fx)[:, None]
                 + d_off[None, :], mask=x0mask[:, None] & kdmask[None, :], other=0.0)
    g = _head_g(gc_b, ld, ms, pmask, rows0)
    acc = tl.dot(g, fx, acc)
    col = _head_col(g, fpan, nrm_ptr, b, L, rows0, x0mask, eps)
    # the sums' rows [0, XB) and [XB, HEAD)
    acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (2, XB, BD)), (1, 2, 0)))
    _head_epilogue(
        col + acc0, _head_pdot(t1, rows0, n_p, n_used, b, rdot_ptr, cdot_ptr, L, n_cn, n_cm, XB, CM, CN), t1, k1, fx,
        0, n_p, n_used, b, td, kd, kdmask, canon, apart_ptr, adots_ptr, n_tx, D,
        grad_ptr, perm_b, counts_ptr, nrm_ptr, nrma_ptr, sa_ptr, lse_ptr, w_ptr, lsea_ptr, wa_ptr, gout_ptr,
        rdot_ptr, cdot_ptr, apos_ptr, aneg_ptr, stride_gb, stride_gc, stride_gy, stride_gx,
        stride_ab, stride_ad, stride_nb, stride_nd, L, Q, C, P_, n_cn, n_cm, inv_tau, eps, XB, CM, CN, CHANNELS_LAST)
    if n_used > XB:  # (else the tile holds contour patches only: zeros below)
        fx = tl.load(feat_b + _patch_offsets(perm_b, rows1, x1mask, Q, P_, stride_fy, stride_fx)[:, None]
                     + d_off[None, :], mask=x1mask[:, None] & kdmask[None, :], other=0.0)
        col = acc1 + _head_col(_head_g(gc_b, ld, ms, pmask, rows1), fpan, nrm_ptr, b, L, rows1, x1mask, eps)
        _head_epilogue(
            col, _head_pdot(t1, rows1, n_p, n_used, b, rdot_ptr, cdot_ptr, L, n_cn, n_cm, XB, CM, CN), t1, k1, fx, 1,
            n_p, n_used, b, td, kd, kdmask, canon, apart_ptr, adots_ptr, n_tx, D,
            grad_ptr, perm_b, counts_ptr, nrm_ptr, nrma_ptr, sa_ptr, lse_ptr, w_ptr, lsea_ptr, wa_ptr, gout_ptr,
            rdot_ptr, cdot_ptr, apos_ptr, aneg_ptr, stride_gb, stride_gc, stride_gy, stride_gx,
            stride_ab, stride_ad, stride_nb, stride_nd, L, Q, C, P_, n_cn, n_cm, inv_tau, eps, XB, CM, CN,
            CHANNELS_LAST)
    # 3. contour patches (past the lists): zeros
    for x0 in range(tl.maximum(n_t, 1) * XB, L, XB):
        rows = x0 + tl.arange(0, XB)
        _store_rows(grad_ptr + b * stride_gb, tl.zeros([XB, BD], dtype=tl.float32), perm_b, rows, rows < L, kd,
                    kdmask, C, Q, P_, stride_gc, stride_gy, stride_gx, CHANNELS_LAST)
