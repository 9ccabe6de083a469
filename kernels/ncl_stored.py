"""The stored algorithm (the default; notation in `ncl_common.py`): the image's block
S = [s_my] (m in P, y in P u N), |P| rows of |P|+|N| fp32 values (each row padded to
a multiple of WS_ALIGN values, so that rows and blocks start 16-byte aligned), lives
in the op's workspace between the forward and the backward.

* `_ncl_sim_kernel`: one tiled GEMM over (row tile x column tile) writes S;
* `_ncl_rows_kernel`: one pass over S for the row log-sum-exps lam_m, W_m and t1;
* `_ncl_grad_kernel`: the backward, parallel over (patch tile x chunk of D): for its
  patches x it forms the coefficients dL/ds from S as it reads it, and accumulates
  G[x, :] @ hat F (x in P) + G[:, x]^T @ hat F_P, the two GEMMs of the floor.

Work: one pass over the P x (P+N) block forward, two backward.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .ncl_common import (_d_offsets, _grad_out, _pair_terms, _patch_offsets, _row_setup, _sigmoid, _sim_tile,
                         _store_row_stats, _store_rows, _wide, _ws_block, _ws_ld)

# Similarity GEMM: 64 tampered rows (wgmma's M) x 32 columns per program, so that
# the 15 %-area shapes (|P| ~ 93, |P| + |N| ~ 970, B = 4) give ~250 programs
# (about 2 per SM on 132 SMs). K chunks: 64 half values or 32 fp32 values (128 B).
SIM_BM = 64
SIM_BN = 32
SIM_BK_HALF = 64
SIM_BK_F32 = 32
SIM_WARPS = 4
SIM_STAGES = 3
# Row pass over S: 16 rows x 128 columns per step.
ROWS_BM = 16
ROWS_BC = 128
# Backward: 64 patches x 64 values of D per program, 16 partners per step. At least
# two blocks per SM on sm_80 and sm_90 (bench/kernel_report.py's "blocks/SM"):
# bf16/fp16 run 8 warps within 128 registers (2 x 256 threads x 128 = the 64K register
# file); fp32 (tf32x3: three products, split operands) runs 4 warps, one stage in
# flight (sm_80's mma.sync needs up to 255 registers there: 2 blocks of 128 threads).
# The price of the 64-wide chunks: each program reads S and forms its coefficients
# for 64 values of D, twice as often as with 128 (the GEMMs' multiply-adds are equal).
GRAD_BX = 64
GRAD_BY = 16
GRAD_BD = 64
GRAD_WARPS = 8
GRAD_STAGES = 2
GRAD_MAXNREG = 128
GRAD_WARPS_F32 = 4
GRAD_STAGES_F32 = 1
# fp32: 8 partners per step (tf32's native k): 168 registers on sm_80 instead of 249-255
# (3 blocks per SM instead of 2; no spill at p = 1, where 16 spilled 4 B at 255), the
# tiles of S still two 128-bit loads per row (bench/KERNEL_REPORT.md).
GRAD_BY_F32 = 8


@triton.jit
def _ncl_sim_kernel(
    feat_ptr, perm_ptr, counts_ptr, nrm_ptr, plan_ptr,
    ws_ptr,  # fp32 workspace out: S of each stored image, row-major (|P|, |P| + |N|)
    stride_fb, stride_fc, stride_fy, stride_fx,
    L, Q, C, P_: tl.constexpr, D, n_tn, inv_tau, eps,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, IDX64: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    # int64 offsets where an image can span past 2^31 elements
    stride_fc, stride_fy, stride_fx = _wide(stride_fc, IDX64), _wide(stride_fy, IDX64), _wide(stride_fx, IDX64)
    tm = pid // n_tn
    tn = pid % n_tn
    n_p = tl.load(counts_ptr + b * 3)
    n_n = tl.load(counts_ptr + b * 3 + 1)
    n_used = n_p + n_n
    stored = tl.load(plan_ptr + b * 2 + 1)
    m0 = tm * BM
    c0 = tn * BN
    if (stored == 0) | (n_p < 2) | (n_n < 1) | (m0 >= n_p) | (c0 >= n_used):
        return
    feat_b = feat_ptr + b * stride_fb
    perm_b = perm_ptr + b * L
    rows = m0 + tl.arange(0, BM)
    rmask = rows < n_p
    cols = c0 + tl.arange(0, BN)
    cmask = cols < n_used
    poff_m = _patch_offsets(perm_b, rows, rmask, Q, P_, stride_fy, stride_fx)
    poff_n = _patch_offsets(perm_b, cols, cmask, Q, P_, stride_fy, stride_fx)
    rn_m = 1.0 / tl.maximum(tl.load(nrm_ptr + b * L + rows, mask=rmask, other=1.0), eps)
    rn_n = 1.0 / tl.maximum(tl.load(nrm_ptr + b * L + cols, mask=cmask, other=1.0), eps)
    s = _sim_tile(feat_b, poff_m, rmask, rn_m, poff_n, cmask, rn_n, C, P_, D, stride_fc, stride_fy,
                  stride_fx, inv_tau, BM, BN, BK, CHANNELS_LAST, UPCAST, PRECISION)
    # rows of ld values; the padding columns [|P| + |N|, ld), which the backward loads
    # within its 128-bit vectors (and discards), keep the workspace's zeros
    ld = _ws_ld(n_used)
    tl.store(_ws_block(ws_ptr, plan_ptr, b) + rows[:, None].to(tl.int64) * ld + cols[None, :], s,
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _ncl_rows_kernel(
    ws_ptr, plan_ptr, counts_ptr,
    lse_ptr, w_ptr,  # (B, L) fp32 out: lam_m, W_m by position (tampered rows of stored images)
    part_ptr,  # (B, n_blocks) fp32 out: sum over the block's rows of sum_j softplus(lam_m - s_mj)
    L, n_blocks,
    BM: tl.constexpr, BC: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n_p = tl.load(counts_ptr + b * 3)
    n_n = tl.load(counts_ptr + b * 3 + 1)
    n_used = n_p + n_n
    stored = tl.load(plan_ptr + b * 2 + 1)
    m0 = pid * BM
    if (stored == 0) | (n_p < 2) | (n_n < 1) | (m0 >= n_p):
        tl.store(part_ptr + b * n_blocks + pid, 0.0)
        return
    rows = m0 + tl.arange(0, BM)
    rmask = rows < n_p
    row_ptr = _ws_block(ws_ptr, plan_ptr, b) + rows.to(tl.int64) * _ws_ld(n_used)
    # 1. lam_m: online, max-shifted log-sum-exp over the authentic columns; every
    #    step holds a column (rows past |P| read 0 there), so the running max of every
    #    row is finite and no lane forms -inf - -inf
    run_max = tl.full([BM], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BM], dtype=tl.float32)
    for c0 in range(n_p, n_used, BC):
        cols = c0 + tl.arange(0, BC)
        cmask = cols < n_used
        s = tl.load(row_ptr[:, None] + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
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
        ok = rmask[:, None] & (cols < n_p)[None, :] & (cols[None, :] != rows[:, None])
        s = tl.load(row_ptr[:, None] + cols[None, :], mask=ok, other=0.0)
        z = lse[:, None] - s
        term, wsum = _pair_terms(z, ok, term, wsum)
    _store_row_stats(lse_ptr, w_ptr, part_ptr, b, L, n_blocks, pid, rows, rmask, lse, wsum, term)


@triton.jit
def _ncl_grad_kernel(
    feat_ptr, grad_ptr,  # (B, C, h, w) in, and its gradient out (uncovered cells are the caller's)
    apos_ptr, aneg_ptr,
    perm_ptr, counts_ptr, nrm_ptr, nrma_ptr, sa_ptr, lse_ptr, w_ptr, lsea_ptr, wa_ptr,
    gout_ptr,  # (B, 3) fp32: dL/d(t1, t2, t3)
    plan_ptr, ws_ptr,
    stride_fb, stride_fc, stride_fy, stride_fx,
    stride_gb, stride_gc, stride_gy, stride_gx,
    stride_ab, stride_ad, stride_nb, stride_nd,
    L, Q, C, P_: tl.constexpr, D, n_tx, inv_tau, eps,
    BX: tl.constexpr, BY: tl.constexpr, BD: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    PRECISION: tl.constexpr, IDX64: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    # int64 offsets where an image can span past 2^31 elements
    stride_fc, stride_fy, stride_fx = _wide(stride_fc, IDX64), _wide(stride_fy, IDX64), _wide(stride_fx, IDX64)
    stride_gc, stride_gy, stride_gx = _wide(stride_gc, IDX64), _wide(stride_gy, IDX64), _wide(stride_gx, IDX64)
    stride_ad, stride_nd = _wide(stride_ad, IDX64), _wide(stride_nd, IDX64)
    if tl.load(plan_ptr + b * 2 + 1) == 0:  # the bounded kernel does this image
        return
    td = pid // n_tx
    tx = pid % n_tx
    n_p = tl.load(counts_ptr + b * 3)
    n_n = tl.load(counts_ptr + b * 3 + 1)
    n_used = n_p + n_n
    x0 = tx * BX
    rows = x0 + tl.arange(0, BX)
    in_grid = rows < L
    kd = td * BD + tl.arange(0, BD)
    kdmask = kd < D
    perm_b = perm_ptr + b * L
    if x0 >= n_used:  # contour patches only: their gradient is zero
        _store_rows(grad_ptr + b * stride_gb, tl.zeros([BX, BD], dtype=tl.float32), perm_b, rows, in_grid, kd, kdmask,
                    C, Q, P_, stride_gc, stride_gy, stride_gx, CHANNELS_LAST)
        return
    xmask = rows < n_used
    x_is_p = rows < n_p
    d_off, canon = _d_offsets(kd, C, P_, stride_fc, stride_fy, stride_fx, CHANNELS_LAST)
    feat_b = feat_ptr + b * stride_fb
    # the pairs' share, without the factor k1 (coefficients of order 1: nothing underflows);
    # what only the end needs is loaded there, so that it holds no registers in the loops
    pair = tl.zeros([BX, BD], dtype=tl.float32)
    pdot = tl.zeros([BX], dtype=tl.float32)
    if (n_p >= 2) & (n_n >= 1):
        ws_b = _ws_block(ws_ptr, plan_ptr, b)
        ld = _ws_ld(n_used)
        # Tiles of S load as whole aligned runs of 4 columns (the rows' padding up to ld
        # lies inside the block: 128-bit loads); the exact mask then selects the values.
        # 1. x in P: sum_y dL/ds_xy hat f_y over y in P u N (row x of S)
        if x0 < n_p:
            lse_x = tl.load(lse_ptr + b * L + rows, mask=x_is_p, other=0.0)
            w_x = tl.load(w_ptr + b * L + rows, mask=x_is_p, other=0.0)
            for iy in range(0, tl.cdiv(n_used, BY)):
                cols = iy * BY + tl.arange(0, BY)
                ymask = cols < n_used
                ok = x_is_p[:, None] & ymask[None, :] & (rows[:, None] != cols[None, :])
                s = tl.load(ws_b + rows[:, None].to(tl.int64) * ld + cols[None, :],
                            mask=x_is_p[:, None] & (cols < ld)[None, :], other=0.0)
                s = tl.where(ok, s, 0.0)
                c = tl.where((cols < n_p)[None, :], -_sigmoid(lse_x[:, None] - s),
                             w_x[:, None] * tl.exp(s - lse_x[:, None]))
                c = tl.where(ok, c, 0.0)
                pdot += tl.sum(c * s, axis=1)
                rn_y = 1.0 / tl.maximum(tl.load(nrm_ptr + b * L + cols, mask=ymask, other=1.0), eps)
                poff_y = _patch_offsets(perm_b, cols, ymask, Q, P_, stride_fy, stride_fx)
                fy = tl.load(feat_b + poff_y[:, None] + d_off[None, :], mask=ymask[:, None] & kdmask[None, :],
                             other=0.0)
                pair = tl.dot(c * rn_y[None, :], fy.to(tl.float32), pair, input_precision=PRECISION)
        # 2. every x: sum_y dL/ds_yx hat f_y over y in P (column x of S)
        for iy in range(0, tl.cdiv(n_p, BY)):
            ys = iy * BY + tl.arange(0, BY)
            ymask = ys < n_p
            ok = ymask[:, None] & xmask[None, :] & (ys[:, None] != rows[None, :])
            st = tl.load(ws_b + ys[:, None].to(tl.int64) * ld + rows[None, :],
                         mask=ymask[:, None] & (rows < ld)[None, :], other=0.0)  # [BY, BX]
            st = tl.where(ok, st, 0.0)
            lse_y = tl.load(lse_ptr + b * L + ys, mask=ymask, other=0.0)
            w_y = tl.load(w_ptr + b * L + ys, mask=ymask, other=0.0)
            ct = tl.where(x_is_p[None, :], -_sigmoid(lse_y[:, None] - st), w_y[:, None] * tl.exp(st - lse_y[:, None]))
            ct = tl.where(ok, ct, 0.0)
            pdot += tl.sum(ct * st, axis=0)
            rn_y = 1.0 / tl.maximum(tl.load(nrm_ptr + b * L + ys, mask=ymask, other=1.0), eps)
            poff_y = _patch_offsets(perm_b, ys, ymask, Q, P_, stride_fy, stride_fx)
            fy = tl.load(feat_b + poff_y[:, None] + d_off[None, :], mask=ymask[:, None] & kdmask[None, :], other=0.0)
            pair = tl.dot(tl.trans(ct * rn_y[:, None]), fy.to(tl.float32), pair, input_precision=PRECISION)
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
    fx = tl.load(feat_b + _patch_offsets(perm_b, rows, xmask, Q, P_, stride_fy, stride_fx)[:, None] + d_off[None, :],
                 mask=xmask[:, None] & kdmask[None, :], other=0.0).to(tl.float32)
    grad = _grad_out(pair, dot_x, c_pos, c_neg, nrm_x, fx, b, kdmask, canon, apos_ptr, aneg_ptr, nrma_ptr,
                     stride_ab, stride_ad, stride_nb, stride_nd, inv_tau, eps)
    grad = tl.where(xmask[:, None], grad, 0.0)
    _store_rows(grad_ptr + b * stride_gb, grad, perm_b, rows, in_grid, kd, kdmask,
                C, Q, P_, stride_gc, stride_gy, stride_gx, CHANNELS_LAST)
