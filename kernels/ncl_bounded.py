"""The bounded algorithm (the first design; notation in `ncl_common.py`): nothing of
size L x L is kept. `_ncl_pair_fwd_kernel` streams similarity tiles with an online
log-sum-exp for lam_m, W_m and t1; `_ncl_pair_bwd_kernel` recomputes each tile per
chunk of D (D / BLOCK_D times; two exps per pair and chunk, one per direction). It runs
the images whose block does not fit their workspace slot, and is launched only when
some image can (the slot below L x ld(L)). Both kernels take their items from the work
lists of `_ncl_plan_kernel` (bounded images only), one item per program: their grids
are the upper bounds from B and L (persistent loops made ptxas spill here), and the
programs past the count exit at once.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .ncl_common import (_d_offsets, _find_image, _grad_out, _pair_terms, _patch_offsets, _row_setup, _sim_tile,
                         _store_row_stats, _store_rows, _wide)

# 32 x 32 similarity tiles, BLOCK_K = 64 elements per load; the backward holds a
# 32 x 256 fp32 accumulator (8 warps) and recomputes its tiles per chunk of D.
BLOCK_M = 32
BLOCK_N = 32
BLOCK_K = 64  # half inputs
BLOCK_D_F32_BOUNDED = 64  # and half the chunk of D in the backward (spill-free on sm_80 and sm_90)
BLOCK_K_F32_BOUNDED = 16  # fp32 tiles of the bounded kernels (tf32x3 splits each operand): spill-free
BLOCK_K_F32_IEEE = 8  # and in the backward with plain fp32 FMA, 4 warps (16 and 8 warps spilled)
BLOCK_D = 128
NUM_WARPS_BWD = 8
# Warps and software-pipeline stages of the forward by its dot (tiles as above): fp32 with
# tf32x3 keeps 4 warps and 3 stages; bf16/fp16 (mma.sync) and plain fp32 FMA (ieee) take 8 warps,
# with 2 stages and 1. At 4 warps and 3 stages ptxas held those to 96 registers on sm_80 (5
# blocks per SM) and spilled 16-24 B in channels_last and ieee; so they compile spill-free on
# sm_80 and sm_90 at 48-128 registers, 2-5 blocks of 8 warps per SM.
FWD_WARPS_HALF, FWD_STAGES_HALF = 8, 2
FWD_WARPS_IEEE, FWD_STAGES_IEEE = 8, 1
FWD_STAGES_F32 = 3
# Stages of the backward: 3 for half features, 2 for fp32 with tf32x3, 1 with ieee (2 spilled
# 32 B on sm_90 at p = 1 channels_last, held to 168 registers for 3 blocks per SM).
BWD_STAGES_HALF, BWD_STAGES_F32, BWD_STAGES_IEEE = 3, 2, 1


@triton.jit
def _ncl_pair_fwd_kernel(
    feat_ptr, perm_ptr, counts_ptr, nrm_ptr,
    sched_ptr,  # (B + 1,) int32: the images' prefix sums of row blocks (bounded images with t1)
    lse_ptr,  # (B, L) fp32 out: lam_m by position (tampered rows)
    w_ptr,  # (B, L) fp32 out: W_m = sum_{j != m} sigmoid(lam_m - s_mj)
    part_ptr,  # (B, n_row_blocks) fp32 out: sum over the block's rows of sum_j softplus(...)
    stride_fb, stride_fc, stride_fy, stride_fx,
    B, L, Q, C, P_: tl.constexpr, D, n_blocks, inv_tau, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, IDX64: tl.constexpr,
    LOG_B: tl.constexpr,
):
    """One item per block of BLOCK_M tampered rows of a bounded image, program t doing
    item t of the batch's list (the grid is the upper bound B x L / BLOCK_M; the
    programs past the list's count exit at once)."""
    t = tl.program_id(0)
    # int64 offsets where an image can span past 2^31 elements
    stride_fc, stride_fy, stride_fx = _wide(stride_fc, IDX64), _wide(stride_fy, IDX64), _wide(stride_fx, IDX64)
    if t < tl.load(sched_ptr + B):
        bi = _find_image(sched_ptr, t, B, LOG_B)
        blk = t - tl.load(sched_ptr + bi)
        _pair_fwd_rows(feat_ptr, perm_ptr, counts_ptr, nrm_ptr, lse_ptr, w_ptr, part_ptr, bi.to(tl.int64), blk,
                       stride_fb, stride_fc, stride_fy, stride_fx, L, Q, C, P_, D, n_blocks, inv_tau, eps,
                       BLOCK_M, BLOCK_N, BLOCK_K, CHANNELS_LAST, UPCAST, PRECISION)


@triton.jit
def _pair_fwd_rows(
    feat_ptr, perm_ptr, counts_ptr, nrm_ptr, lse_ptr, w_ptr, part_ptr, b, pid,
    stride_fb, stride_fc, stride_fy, stride_fx, L, Q, C, P_: tl.constexpr, D, n_blocks, inv_tau, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    n_p = tl.load(counts_ptr + b * 3)
    n_n = tl.load(counts_ptr + b * 3 + 1)
    m0 = pid * BLOCK_M
    feat_b = feat_ptr + b * stride_fb
    perm_b = perm_ptr + b * L
    rows = m0 + tl.arange(0, BLOCK_M)
    rmask = rows < n_p
    poff_m = _patch_offsets(perm_b, rows, rmask, Q, P_, stride_fy, stride_fx)
    rn_m = 1.0 / tl.maximum(tl.load(nrm_ptr + b * L + rows, mask=rmask, other=1.0), eps)

    # 1. lam_m: online, max-shifted log-sum-exp over the authentic columns
    run_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(n_p, n_p + n_n, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < n_p + n_n
        poff_n = _patch_offsets(perm_b, cols, cmask, Q, P_, stride_fy, stride_fx)
        rn_n = 1.0 / tl.maximum(tl.load(nrm_ptr + b * L + cols, mask=cmask, other=1.0), eps)
        s = _sim_tile(feat_b, poff_m, rmask, rn_m, poff_n, cmask, rn_n, C, P_, D, stride_fc, stride_fy,
                      stride_fx, inv_tau, 0, D, BLOCK_M, BLOCK_N, BLOCK_K, CHANNELS_LAST, UPCAST, PRECISION)
        new_max = tl.maximum(run_max, tl.max(tl.where(cmask[None, :], s, float("-inf")), axis=1))
        # new_max is finite (every tile holds a column); masked columns add exp(-inf) = 0
        p = tl.exp(tl.where(cmask[None, :], s - new_max[:, None], float("-inf")))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(p, axis=1)
        run_max = new_max
    lse = run_max + tl.log(run_sum)

    # 2. sum_j softplus(lam_m - s_mj) and W_m over the tampered columns j != m
    term = tl.zeros([BLOCK_M], dtype=tl.float32)
    wsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for j0 in range(0, n_p, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < n_p
        poff_j = _patch_offsets(perm_b, cols, cmask, Q, P_, stride_fy, stride_fx)
        rn_j = 1.0 / tl.maximum(tl.load(nrm_ptr + b * L + cols, mask=cmask, other=1.0), eps)
        s = _sim_tile(feat_b, poff_m, rmask, rn_m, poff_j, cmask, rn_j, C, P_, D, stride_fc, stride_fy,
                      stride_fx, inv_tau, 0, D, BLOCK_M, BLOCK_N, BLOCK_K, CHANNELS_LAST, UPCAST, PRECISION)
        z = lse[:, None] - s
        ok = cmask[None, :] & (cols[None, :] != rows[:, None])
        term, wsum = _pair_terms(z, ok, term, wsum)
    _store_row_stats(lse_ptr, w_ptr, part_ptr, b, L, n_blocks, pid, rows, rmask, lse, wsum, term)


@triton.jit
def _ncl_pair_bwd_kernel(
    feat_ptr, grad_ptr,  # (B, C, h, w) in, and its gradient out (uncovered cells are the caller's)
    apos_ptr, aneg_ptr,
    perm_ptr, counts_ptr, nrm_ptr, nrma_ptr, sa_ptr, lse_ptr, w_ptr, lsea_ptr, wa_ptr,
    gout_ptr,  # (B, 3) fp32: dL/d(t1, t2, t3)
    plan_ptr,
    sched_ptr,  # (B + 1,) int32: the bounded images' prefix count
    stride_fb, stride_fc, stride_fy, stride_fx,
    stride_gb, stride_gc, stride_gy, stride_gx,
    stride_ab, stride_ad, stride_nb, stride_nd,
    B, L, Q, C, P_: tl.constexpr, D, n_tx, n_td, inv_tau, eps,
    BLOCK_X: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, COEF_PRECISION: tl.constexpr,
    IDX64: tl.constexpr, LOG_B: tl.constexpr,
):
    """n_tx x n_td items (patch tile x chunk of D) per bounded image, program t doing
    item t (the grid is the upper bound B x n_tx x n_td; the programs past the list's
    count exit at once); the k-th bounded image is found by a binary search over
    their prefix count."""
    t = tl.program_id(0)
    # int64 offsets where an image can span past 2^31 elements
    stride_fc, stride_fy, stride_fx = _wide(stride_fc, IDX64), _wide(stride_fy, IDX64), _wide(stride_fx, IDX64)
    stride_gc, stride_gy, stride_gx = _wide(stride_gc, IDX64), _wide(stride_gy, IDX64), _wide(stride_gx, IDX64)
    stride_ad, stride_nd = _wide(stride_ad, IDX64), _wide(stride_nd, IDX64)
    per_image = n_tx * n_td
    if t < tl.load(sched_ptr + B) * per_image:
        b = _find_image(sched_ptr, t // per_image, B, LOG_B).to(tl.int64)
        local = t % per_image
        pid_d = local // n_tx
        pid_x = local % n_tx
        n_used = tl.load(counts_ptr + b * 3) + tl.load(counts_ptr + b * 3 + 1)
        x0 = pid_x * BLOCK_X
        rows = x0 + tl.arange(0, BLOCK_X)
        kd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        if x0 >= n_used:  # contour patches only: their gradient is zero
            _store_rows(grad_ptr + b * stride_gb, tl.zeros([BLOCK_X, BLOCK_D], dtype=tl.float32), perm_ptr + b * L,
                        rows, rows < L, kd, kd < D, C, Q, P_, stride_gc, stride_gy, stride_gx, CHANNELS_LAST)
        else:
            _pair_bwd_tile(feat_ptr, grad_ptr, apos_ptr, aneg_ptr, perm_ptr, counts_ptr, nrm_ptr, nrma_ptr, sa_ptr,
                           lse_ptr, w_ptr, lsea_ptr, wa_ptr, gout_ptr, b, x0, rows, kd,
                           stride_fb, stride_fc, stride_fy, stride_fx, stride_gb, stride_gc, stride_gy, stride_gx,
                           stride_ab, stride_ad, stride_nb, stride_nd, L, Q, C, P_, D, inv_tau, eps,
                           BLOCK_X, BLOCK_N, BLOCK_K, BLOCK_D, CHANNELS_LAST, UPCAST, PRECISION, COEF_PRECISION)


@triton.jit
def _pair_bwd_tile(
    feat_ptr, grad_ptr, apos_ptr, aneg_ptr, perm_ptr, counts_ptr, nrm_ptr, nrma_ptr, sa_ptr,
    lse_ptr, w_ptr, lsea_ptr, wa_ptr, gout_ptr, b, x0, rows, kd,
    stride_fb, stride_fc, stride_fy, stride_fx, stride_gb, stride_gc, stride_gy, stride_gx,
    stride_ab, stride_ad, stride_nb, stride_nd, L, Q, C, P_: tl.constexpr, D, inv_tau, eps,
    BLOCK_X: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, COEF_PRECISION: tl.constexpr,
):
    n_p = tl.load(counts_ptr + b * 3)
    n_n = tl.load(counts_ptr + b * 3 + 1)
    n_used = n_p + n_n
    perm_b = perm_ptr + b * L
    in_grid = rows < L
    kdmask = kd < D
    # 1. per-patch coefficients; undefined terms get no gradient
    t1_ok = (n_p >= 2) & (n_n >= 1)
    feat_b = feat_ptr + b * stride_fb
    xmask = rows < n_used
    x_is_p = rows < n_p
    poff_x = _patch_offsets(perm_b, rows, xmask, Q, P_, stride_fy, stride_fx)
    nrm_x, lse_x, w_x, k1, c_pos, c_neg, dot_x = _row_setup(  # dot_x: <hat f_x, d hat f_x>, accumulated below
        b, rows, xmask, x_is_p, counts_ptr, nrm_ptr, sa_ptr, lse_ptr, w_ptr, lsea_ptr, wa_ptr, gout_ptr, L,
    )
    rn_x = 1.0 / tl.maximum(nrm_x, eps)

    d_off, canon = _d_offsets(kd, C, P_, stride_fc, stride_fy, stride_fx, CHANNELS_LAST)
    pair = tl.zeros([BLOCK_X, BLOCK_D], dtype=tl.float32)  # without the factor k1: nothing underflows

    # 3. pairs: columns over P always, over N too when this block holds tampered rows
    y_end = tl.where(x0 < n_p, n_used, n_p)
    if t1_ok:
        pdot = tl.zeros([BLOCK_X], dtype=tl.float32)
        for y0 in range(0, y_end, BLOCK_N):
            cols = y0 + tl.arange(0, BLOCK_N)
            ymask = cols < y_end
            y_is_p = cols < n_p
            poff_y = _patch_offsets(perm_b, cols, ymask, Q, P_, stride_fy, stride_fx)
            rn_y = 1.0 / tl.maximum(tl.load(nrm_ptr + b * L + cols, mask=ymask, other=1.0), eps)
            lse_y = tl.load(lse_ptr + b * L + cols, mask=ymask & y_is_p, other=0.0)
            w_y = tl.load(w_ptr + b * L + cols, mask=ymask & y_is_p, other=0.0)
            s = _sim_tile(feat_b, poff_x, xmask, rn_x, poff_y, ymask, rn_y, C, P_, D, stride_fc, stride_fy,
                          stride_fx, inv_tau, 0, D, BLOCK_X, BLOCK_N, BLOCK_K, CHANNELS_LAST, UPCAST, PRECISION)
            # dL/ds_xy with x as the row (x in P) ...
            # one exp per coefficient: e = exp(s - lam) gives -sigmoid(lam - s) = -1/(1 + e)
            # and W e (the clamp keeps e finite where s is far above lam)
            e_row = tl.exp(tl.minimum(s - lse_x[:, None], 80.0))
            c_row = tl.where(y_is_p[None, :], -1.0 / (1.0 + e_row), w_x[:, None] * e_row)
            c_row = tl.where(x_is_p[:, None], c_row, 0.0)
            # ... and dL/ds_yx with y as the row (y in P), s_yx = s_xy
            e_col = tl.exp(tl.minimum(s - lse_y[None, :], 80.0))
            c_col = tl.where(x_is_p[:, None], -1.0 / (1.0 + e_col), w_y[None, :] * e_col)
            c_col = tl.where(y_is_p[None, :], c_col, 0.0)
            keep = xmask[:, None] & ymask[None, :] & (rows[:, None] != cols[None, :])
            t = tl.where(keep, c_row + c_col, 0.0)
            pdot += tl.sum(t * s, axis=1)
            fy = tl.load(feat_b + poff_y[:, None] + d_off[None, :], mask=ymask[:, None] & kdmask[None, :],
                         other=0.0)
            t = t * rn_y[None, :]  # T @ hat F_y == (T diag(1/|f_y|)) @ F_y
            # fp32 coefficients (tf32 for half features, which tf32 holds exactly)
            pair = tl.dot(t, fy.to(tl.float32), pair, input_precision=COEF_PRECISION)
        pair = k1 * pair
        dot_x += k1 * pdot

    # 4. the anchors' share, then through the normalization into the map's own layout
    fx = tl.load(feat_b + poff_x[:, None] + d_off[None, :], mask=xmask[:, None] & kdmask[None, :],
                 other=0.0).to(tl.float32)
    grad = _grad_out(pair, dot_x, c_pos, c_neg, nrm_x, fx, b, kdmask, canon, apos_ptr, aneg_ptr, nrma_ptr,
                     stride_ab, stride_ad, stride_nb, stride_nd, inv_tau, eps)
    grad = tl.where(xmask[:, None], grad, 0.0)  # contour rows of a mixed tile get 0
    _store_rows(grad_ptr + b * stride_gb, grad, perm_b, rows, in_grid, kd, kdmask,
                C, Q, P_, stride_gc, stride_gy, stride_gx, CHANNELS_LAST)
