"""The NCL loss terms (SPEC.md section 5), fused in Triton, forward and backward.

Notation (per image b): P, N, K the tampered, authentic and contour patch sets,
listed in `perm` (P first, then N, then K; see `patch_labels.py`) with counts
`[|P|, |N|, |K|]`; a patch is addressed by its *position* in that list. f_x is
the patch feature read straight from the `(B, C, h, w)` feature map by index
(no unfold, no copy), hat f_x = f_x / max(|f_x|, eps), s_xy = <hat f_x, hat f_y> / tau.

    t1 = 1/(|P|(|P|-1)) sum_{m in P} sum_{j in P, j != m} softplus(lam_m - s_mj),
         lam_m = log sum_{i in N} exp(s_mi)
    t2 = 1/|P| sum_{j in P} softplus(lam+ - s(a+, j)),  lam+ = log sum_{i in N} exp(s(a+, i))
    t3 = 1/|N| sum_{i in N} softplus(lam- - s(a-, i)),  lam- = log sum_{j in P} exp(s(a-, j))

(`log(exp(s) + sum exp(s_i)) - s == softplus(lam - s)`.)

Backward. With g = dL/d(t1, t2, t3) and k1 = g1/(|P|(|P|-1)), k2 = g2/|P|,
k3 = g3/|N|, the loss depends on the features through s only, with
  dL/ds_mj = -k1 sigmoid(lam_m - s_mj)       (m, j in P, j != m)
  dL/ds_mi =  k1 W_m exp(s_mi - lam_m)       (m in P, i in N),  W_m = sum_{j != m} sigmoid(lam_m - s_mj)
and likewise for the anchors. For a patch x, T_xy = dL/ds_xy + dL/ds_yx gives
  d hat f_x = (1/tau) (sum_y T_xy hat f_y + c+_x hat a+ + c-_x hat a-)
  <hat f_x, d hat f_x> = sum_y T_xy s_xy + c+_x s(a+, x) + c-_x s(a-, x)
and the normalization's backward
  d f_x = (d hat f_x - [|f_x| >= eps] hat f_x <hat f_x, d hat f_x>) / max(|f_x|, eps).

Two paths, chosen per image on the device (no host synchronization):

* **Stored** (the default): the image's block S = [s_my] (m in P, y in P u N),
  |P| rows of |P|+|N| fp32 values (each row padded to a multiple of 4 values, so
  that rows and blocks start 16-byte aligned), lives in a workspace between the
  forward and the backward. The forward is one tiled GEMM over (row tile x column tile)
  (`_ncl_sim_kernel`) and one pass over S for the row log-sum-exps and the t1
  sums (`_ncl_rows_kernel`). The backward is one kernel (`_ncl_grad_kernel`)
  parallel over (patch tile x chunk of D): for its patches x it forms the
  coefficients dL/ds from S as it reads it, and accumulates
  G[x, :] @ hat F (x in P) + G[:, x]^T @ hat F_P: the two GEMMs of the floor.
  Work: one pass over the P x (P+N) block forward, two backward.
* **Bounded** (`_ncl_pair_fwd_kernel`, `_ncl_pair_bwd_kernel`): nothing of size
  L x L is kept; the forward streams tiles with an online log-sum-exp and the
  backward recomputes each similarity tile per chunk of D (D / BLOCK_D times).
  It runs the images whose blocks do not fit in the workspace.

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
coefficients are fp32 values of order 1 (the factor k1 is applied after the
product, so nothing underflows in any input dtype); they meet the features as
tf32 (`FP32_DOT_PRECISION` for fp32 features, "tf32" for bf16/fp16 features,
whose values tf32 holds exactly). Everything else is fp32.

Layouts: features are indexed in an internal D order that follows memory:
(channel, row, column) for contiguous maps and (row, column, channel) for
channels_last maps; similarities do not depend on the order of D, and anchors
are read at the matching canonical index.

Grids put the tiles on axis 0 (up to 2^31 - 1 programs) and the image on axis 1
(B <= 65535).

Tested on the CPU under TRITON_INTERPRET=1 (tests/test_ncl_terms.py, both
paths); `bench/kernel_report.py` compiles every kernel for sm_90 and sm_80 and
counts each launch's work; the GPU parity and timing run is `bench/gpu_check.sh`.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .patch_labels import _device_guard, needs_64bit_offsets

#: True when Triton runs kernels on the CPU through its interpreter.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# ---- stored path -------------------------------------------------------------------------
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

# ---- bounded path (and the per-patch statistics) -----------------------------------------
# 32 x 32 similarity tiles, BLOCK_K = 64 elements per load; the backward holds a
# 32 x 256 fp32 accumulator (8 warps) and recomputes its tiles per chunk of D.
BLOCK_M = 32
BLOCK_N = 32
BLOCK_K = 64  # half inputs
BLOCK_D_F32_BOUNDED = 64  # and half the chunk of D in the backward (spill-free on sm_80 and sm_90)
BLOCK_K_F32_BOUNDED = 16  # fp32 tiles of the bounded kernels (tf32x3 splits each operand): spill-free
BLOCK_D = 128
NUM_WARPS = 4
NUM_WARPS_BWD = 8
# Per-patch statistics: 8 patches x 512 values of D per step, so that ~4 programs
# per SM keep enough loads in flight (one pass over the used patches).
STATS_BX = 8
STATS_BK = 512
# Anchors' backward: the patch list in 4 splits x chunks of D (both anchors per program).
ANCHOR_SPLITS = 4

# Row stride of the workspace blocks, in fp32 values: rows (and blocks) start 16-byte
# aligned, so that the backward's tiles of S load as 128-bit vectors.
WS_ALIGN: tl.constexpr = tl.constexpr(4)

PRECISIONS = ("ieee", "tf32", "tf32x3")
FP32_DOT_PRECISION = os.environ.get("NCL_FAST_FP32_DOT_PRECISION", "tf32x3")
#: MiB of similarity workspace per image, at most (see the module docstring): 64 MiB holds
#: the block of any image of up to 4096 patches.
SIM_BUDGET = float(os.environ.get("NCL_FAST_SIM_BUDGET", "64"))
EPS = 1e-12  # the F.normalize clamp of SPEC section 3


@triton.jit
def _d_offsets(k, C, P_, stride_c, stride_y, stride_x, CHANNELS_LAST: tl.constexpr):
    """Memory offsets (within a patch) and canonical indices (c * p * p + i * p + j)
    of the internal D positions k."""
    if CHANNELS_LAST:
        ch = k % C
        ij = k // C
        i = ij // P_
        j = ij % P_
    else:
        # k // P_ and k % P_ of k itself (not of k % (P_ * P_)): Triton's alignment
        # analysis then sees runs of P_ contiguous, aligned offsets (vector loads)
        ch = k // (P_ * P_)
        i = (k // P_) % P_
        j = k % P_
    return ch * stride_c + i * stride_y + j * stride_x, ch * P_ * P_ + i * P_ + j


@triton.jit
def _wide(stride, IDX64: tl.constexpr):
    """The stride as int64 where an image's offsets can pass 2^31 (IDX64), so that every
    offset formed from it is int64; else as it is (int32 arithmetic, 1 kept constant)."""
    if IDX64:
        return stride + tl.zeros([], dtype=tl.int64)
    else:
        return stride


@triton.jit
def _patch_offsets(perm_b, pos, pmask, Q, P_, stride_y, stride_x):
    """Offset of the top-left cell of the patches at list positions `pos`."""
    l = tl.load(perm_b + pos, mask=pmask, other=0)
    return (l // Q) * P_ * stride_y + (l % Q) * P_ * stride_x


@triton.jit
def _softplus(z):
    # max(z, 0) + log1p(exp(-|z|)); log1p(u) ~ u - u^2/2 below 1e-4 keeps the
    # relative accuracy where exp(-|z|) is tiny.
    u = tl.exp(-tl.abs(z))
    return tl.maximum(z, 0.0) + tl.where(u < 1e-4, u * (1.0 - 0.5 * u), tl.log(1.0 + u))


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _ws_ld(n_used):
    """Row stride of an image's block S in the workspace: |P| + |N| rounded up to a
    multiple of WS_ALIGN fp32 (16-byte rows). Every block is |P| rows of it, so every
    block starts 16-byte aligned too (the plan's offsets are sums of block sizes)."""
    return (n_used + (WS_ALIGN - 1)) // WS_ALIGN * WS_ALIGN


@triton.jit
def _ws_block(ws_ptr, plan_ptr, b):
    """The image's block in the workspace; its offset is a multiple of WS_ALIGN, which
    the alignment analysis is told (with a 16-byte aligned `ws_ptr`: 128-bit accesses)."""
    return ws_ptr + tl.multiple_of(tl.load(plan_ptr + b * 2), WS_ALIGN)


@triton.jit
def _sim_tile(
    feat_b, poff_x, xmask, rn_x, poff_y, ymask, rn_y,
    C, P_, D, stride_c, stride_y, stride_x, inv_tau,
    BX: tl.constexpr, BY: tl.constexpr, BK: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """[BX, BY] similarities s_xy = <f_x, f_y> / (|f_x| |f_y|) / tau, over D in BK chunks."""
    acc = tl.zeros([BX, BY], dtype=tl.float32)
    for k0 in range(0, D, BK):
        k = k0 + tl.arange(0, BK)
        kmask = k < D
        d_off, _ = _d_offsets(k, C, P_, stride_c, stride_y, stride_x, CHANNELS_LAST)
        a = tl.load(feat_b + poff_x[:, None] + d_off[None, :], mask=xmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(feat_b + poff_y[:, None] + d_off[None, :], mask=ymask[:, None] & kmask[None, :], other=0.0)
        if UPCAST:  # fp32 operands (fp32 inputs; the interpreter's half dot is not exact)
            acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision=PRECISION)
        else:  # bf16/fp16 products are exact in the fp32 accumulator
            acc = tl.dot(a, tl.trans(b), acc)
    return acc * (rn_x * inv_tau)[:, None] * rn_y[None, :]


@triton.jit
def _ncl_stats_fwd_kernel(
    feat_ptr,  # (B, C, h, w) fp32/bf16/fp16, strides below
    apos_ptr, aneg_ptr,  # (B, D) anchors a+, a- (canonical order)
    perm_ptr, counts_ptr,  # (B, L) int32, (B, 3) int32
    nrm_ptr,  # (B, L) fp32 out: |f_x| by list position
    sa_ptr,  # (B, 2, L) fp32 out: s(a+, x), s(a-, x) by list position
    lse_ptr, w_ptr,  # (B, L) fp32 out: 0 at the positions the t1 kernels leave (not tampered rows of t1)
    nrma_ptr,  # (B, 2) fp32 out: |a+|, |a-|
    plan_ptr,  # (B, 2) int64 out: workspace offset of the image's block (its slot), 1 if stored
    stride_fb, stride_fc, stride_fy, stride_fx,
    stride_ab, stride_ad, stride_nb, stride_nd,
    L, Q, C, P_: tl.constexpr, D, inv_tau, eps,
    slot,  # fp32 values of workspace per image
    BLOCK_X: tl.constexpr, BLOCK_K: tl.constexpr, CHANNELS_LAST: tl.constexpr, IDX64: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    # int64 offsets where an image can span past 2^31 elements
    stride_fc, stride_fy, stride_fx = _wide(stride_fc, IDX64), _wide(stride_fy, IDX64), _wide(stride_fx, IDX64)
    stride_ad, stride_nd = _wide(stride_ad, IDX64), _wide(stride_nd, IDX64)
    n_p = tl.load(counts_ptr + b * 3)
    n_n = tl.load(counts_ptr + b * 3 + 1)
    n_used = n_p + n_n
    x0 = pid * BLOCK_X
    pos = x0 + tl.arange(0, BLOCK_X)
    in_list = pos < L
    # Every entry of the (B, L) outputs is written, those past the image's lists as 0 (and
    # lam, W wherever the t1 kernels do not write them): the op's outputs are defined
    # values, which torch.compile's checks compare, and nothing reads unwritten memory.
    not_t1_row = (pos >= n_p) | (n_p < 2) | (n_n < 1)
    tl.store(lse_ptr + b * L + pos, tl.zeros([BLOCK_X], dtype=tl.float32), mask=in_list & not_t1_row)
    tl.store(w_ptr + b * L + pos, tl.zeros([BLOCK_X], dtype=tl.float32), mask=in_list & not_t1_row)
    if pid == 0:
        # one slot per image: stored when the block fits the slot (always, below the cap)
        size = tl.where((n_p >= 2) & (n_n >= 1), n_p.to(tl.int64) * _ws_ld(n_used), 0)
        tl.store(plan_ptr + b * 2, b * slot)
        tl.store(plan_ptr + b * 2 + 1, (size <= slot).to(tl.int64))
    elif x0 >= n_used:  # no listed patch here (program 0 always runs: the anchors' norms)
        zero = tl.zeros([BLOCK_X], dtype=tl.float32)
        tl.store(nrm_ptr + b * L + pos, zero, mask=in_list)
        tl.store(sa_ptr + b * 2 * L + pos, zero, mask=in_list)
        tl.store(sa_ptr + b * 2 * L + L + pos, zero, mask=in_list)
        return
    pmask = pos < n_used
    feat_b = feat_ptr + b * stride_fb
    poff = _patch_offsets(perm_ptr + b * L, pos, pmask, Q, P_, stride_fy, stride_fx)
    sq = tl.zeros([BLOCK_X], dtype=tl.float32)
    dp = tl.zeros([BLOCK_X], dtype=tl.float32)
    dn = tl.zeros([BLOCK_X], dtype=tl.float32)
    ap2 = tl.zeros([BLOCK_K], dtype=tl.float32)
    an2 = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < D
        d_off, canon = _d_offsets(k, C, P_, stride_fc, stride_fy, stride_fx, CHANNELS_LAST)
        f = tl.load(feat_b + poff[:, None] + d_off[None, :], mask=pmask[:, None] & kmask[None, :], other=0.0)
        f = f.to(tl.float32)
        ap = tl.load(apos_ptr + b * stride_ab + canon * stride_ad, mask=kmask, other=0.0).to(tl.float32)
        an = tl.load(aneg_ptr + b * stride_nb + canon * stride_nd, mask=kmask, other=0.0).to(tl.float32)
        sq += tl.sum(f * f, axis=1)
        dp += tl.sum(f * ap[None, :], axis=1)
        dn += tl.sum(f * an[None, :], axis=1)
        ap2 += ap * ap
        an2 += an * an
    nrm = tl.sqrt(sq)
    nrm_p = tl.sqrt(tl.sum(ap2, axis=0))
    nrm_n = tl.sqrt(tl.sum(an2, axis=0))
    rn = 1.0 / tl.maximum(nrm, eps)
    # past the lists the loads gave 0: these stores write zeros there
    tl.store(nrm_ptr + b * L + pos, nrm, mask=in_list)
    tl.store(sa_ptr + b * 2 * L + pos, dp * rn * (inv_tau / tl.maximum(nrm_p, eps)), mask=in_list)
    tl.store(sa_ptr + b * 2 * L + L + pos, dn * rn * (inv_tau / tl.maximum(nrm_n, eps)), mask=in_list)
    if pid == 0:
        tl.store(nrma_ptr + b * 2, nrm_p)
        tl.store(nrma_ptr + b * 2 + 1, nrm_n)


# ---- stored path kernels -----------------------------------------------------------------


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
    # rows of ld values; the padding columns [|P| + |N|, ld) are written too (zeros: the
    # masked columns' products), since the backward loads them in its 128-bit vectors
    ld = _ws_ld(n_used)
    tl.store(_ws_block(ws_ptr, plan_ptr, b) + rows[:, None].to(tl.int64) * ld + cols[None, :], s,
             mask=rmask[:, None] & (cols < ld)[None, :])


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
def _pair_terms(z, ok, term, wsum):
    """Adds softplus(z) (the t1 summands) and sigmoid(z) (W_m) over a tile's valid columns."""
    term += tl.sum(tl.where(ok, _softplus(z), 0.0), axis=1)
    wsum += tl.sum(tl.where(ok, _sigmoid(z), 0.0), axis=1)
    return term, wsum


@triton.jit
def _store_row_stats(lse_ptr, w_ptr, part_ptr, b, L, n_blocks, pid, rows, rmask, lse, wsum, term):
    """lam_m and W_m of the tampered rows, and the row block's share of t1."""
    tl.store(lse_ptr + b * L + rows, lse, mask=rmask)
    tl.store(w_ptr + b * L + rows, wsum, mask=rmask)
    tl.store(part_ptr + b * n_blocks + pid, tl.sum(tl.where(rmask, term, 0.0), axis=0))


@triton.jit
def _anchor_coef(x_is_p, s, lse, w, k2or3, IS_POS: tl.constexpr):
    """dL/ds(a, x) for the anchor a+ (IS_POS) or a-: see the module docstring."""
    if IS_POS:  # positives P, negatives N
        return tl.where(x_is_p, -k2or3 * _sigmoid(lse - s), k2or3 * w * tl.exp(s - lse))
    else:  # positives N, negatives P
        return tl.where(x_is_p, k2or3 * w * tl.exp(s - lse), -k2or3 * _sigmoid(lse - s))


@triton.jit
def _store_rows(grad_b, val, perm_b, rows, in_grid, kd, kdmask, C, Q, P_, stride_gc, stride_gy, stride_gx,
                CHANNELS_LAST: tl.constexpr):
    """Store a [rows, chunk of D] tile of patch gradients into the map's own layout
    (the addresses are formed here, at the end, so that they hold no registers before)."""
    g_off, _ = _d_offsets(kd, C, P_, stride_gc, stride_gy, stride_gx, CHANNELS_LAST)
    goff_x = _patch_offsets(perm_b, rows, in_grid, Q, P_, stride_gy, stride_gx)
    tl.store(grad_b + goff_x[:, None] + g_off[None, :], val.to(grad_b.dtype.element_ty),
             mask=in_grid[:, None] & kdmask[None, :])


@triton.jit
def _row_setup(
    b, rows, xmask, x_is_p,
    counts_ptr, nrm_ptr, sa_ptr, lse_ptr, w_ptr, lsea_ptr, wa_ptr, gout_ptr, L,
):
    """Per patch x of a tile: |f_x|, lam_x, W_x, k1, the anchor coefficients c+_x,
    c-_x and their share of <hat f_x, d hat f_x>: c+_x s(a+, x) + c-_x s(a-, x)."""
    n_p = tl.load(counts_ptr + b * 3)
    n_n = tl.load(counts_ptr + b * 3 + 1)
    n_k = tl.load(counts_ptr + b * 3 + 2)
    t23_ok = (n_p >= 1) & (n_n >= 1) & (n_k >= 1)
    n_pf = n_p.to(tl.float32)
    k1 = tl.load(gout_ptr + b * 3) / tl.maximum(n_pf * (n_pf - 1.0), 1.0)
    k2 = tl.load(gout_ptr + b * 3 + 1) / tl.maximum(n_pf, 1.0)
    k3 = tl.load(gout_ptr + b * 3 + 2) / tl.maximum(n_n.to(tl.float32), 1.0)
    nrm_x = tl.load(nrm_ptr + b * L + rows, mask=xmask, other=1.0)
    # lam and W exist only where t1 does (never read where they were not written)
    t1_ok = (n_p >= 2) & (n_n >= 1)
    lse_x = tl.load(lse_ptr + b * L + rows, mask=xmask & x_is_p & t1_ok, other=0.0)
    w_x = tl.load(w_ptr + b * L + rows, mask=xmask & x_is_p & t1_ok, other=0.0)
    s_pos = tl.load(sa_ptr + b * 2 * L + rows, mask=xmask, other=0.0)
    s_neg = tl.load(sa_ptr + b * 2 * L + L + rows, mask=xmask, other=0.0)
    c_pos = _anchor_coef(x_is_p, s_pos, tl.load(lsea_ptr + b * 2), tl.load(wa_ptr + b * 2), k2, True)
    c_neg = _anchor_coef(x_is_p, s_neg, tl.load(lsea_ptr + b * 2 + 1), tl.load(wa_ptr + b * 2 + 1), k3, False)
    c_pos = tl.where(t23_ok & xmask, c_pos, 0.0)
    c_neg = tl.where(t23_ok & xmask, c_neg, 0.0)
    return nrm_x, lse_x, w_x, k1, c_pos, c_neg, c_pos * s_pos + c_neg * s_neg


@triton.jit
def _grad_out(
    acc, dot_x, c_pos, c_neg, nrm_x, fx, b, kdmask, canon, apos_ptr, aneg_ptr, nrma_ptr,
    stride_ab, stride_ad, stride_nb, stride_nd, inv_tau, eps,
):
    """d f_x on a chunk of D from acc = sum_y T_xy hat f_y: adds the anchors' share
    c+_x hat a+ + c-_x hat a-, then the normalization's backward."""
    ap = tl.load(apos_ptr + b * stride_ab + canon * stride_ad, mask=kdmask, other=0.0).to(tl.float32)
    an = tl.load(aneg_ptr + b * stride_nb + canon * stride_nd, mask=kdmask, other=0.0).to(tl.float32)
    ap = ap / tl.maximum(tl.load(nrma_ptr + b * 2), eps)
    an = an / tl.maximum(tl.load(nrma_ptr + b * 2 + 1), eps)
    acc += c_pos[:, None] * ap[None, :] + c_neg[:, None] * an[None, :]
    rn_x = 1.0 / tl.maximum(nrm_x, eps)
    radial = tl.where(nrm_x >= eps, dot_x, 0.0)
    return rn_x[:, None] * (acc * inv_tau - fx * (rn_x * radial)[:, None])


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


# ---- bounded path kernels ----------------------------------------------------------------


@triton.jit
def _ncl_pair_fwd_kernel(
    feat_ptr, perm_ptr, counts_ptr, nrm_ptr, plan_ptr,
    lse_ptr,  # (B, L) fp32 out: lam_m by position (tampered rows)
    w_ptr,  # (B, L) fp32 out: W_m = sum_{j != m} sigmoid(lam_m - s_mj)
    part_ptr,  # (B, n_row_blocks) fp32 out: sum over the block's rows of sum_j softplus(...)
    stride_fb, stride_fc, stride_fy, stride_fx,
    L, Q, C, P_: tl.constexpr, D, n_blocks, inv_tau, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, IDX64: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    # int64 offsets where an image can span past 2^31 elements
    stride_fc, stride_fy, stride_fx = _wide(stride_fc, IDX64), _wide(stride_fy, IDX64), _wide(stride_fx, IDX64)
    n_p = tl.load(counts_ptr + b * 3)
    n_n = tl.load(counts_ptr + b * 3 + 1)
    m0 = pid * BLOCK_M
    stored = tl.load(plan_ptr + b * 2 + 1)
    if (stored != 0) | (m0 >= n_p) | (n_p < 2) | (n_n < 1):  # stored path, no rows here, or t1 undefined
        tl.store(part_ptr + b * n_blocks + pid, 0.0)
        return
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
                      stride_fx, inv_tau, BLOCK_M, BLOCK_N, BLOCK_K, CHANNELS_LAST, UPCAST, PRECISION)
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
                      stride_fx, inv_tau, BLOCK_M, BLOCK_N, BLOCK_K, CHANNELS_LAST, UPCAST, PRECISION)
        z = lse[:, None] - s
        ok = cmask[None, :] & (cols[None, :] != rows[:, None])
        term, wsum = _pair_terms(z, ok, term, wsum)
    _store_row_stats(lse_ptr, w_ptr, part_ptr, b, L, n_blocks, pid, rows, rmask, lse, wsum, term)


@triton.jit
def _ncl_anchor_fwd_kernel(
    sa_ptr, counts_ptr,
    terms_ptr,  # (B, 3) fp32 out: t1, t2, t3
    lsea_ptr, wa_ptr,  # (B, 2) fp32 out: lam+-, W+- (0 where undefined)
    part_s_ptr, part_b_ptr,  # (B, n_s), (B, n_b) fp32: the row blocks' sums of t1 (both paths)
    L, n_s, n_b,
    BLOCK: tl.constexpr,
):
    """t2 (program 0 of an image) and t3 (program 1); program 0 also closes t1 from the
    row blocks' sums, in a fixed order."""
    b = tl.program_id(0).to(tl.int64)
    which = tl.program_id(1)  # 0: a+ (positives P, negatives N); 1: a- (positives N, negatives P)
    if which == 0:
        t1 = tl.zeros([BLOCK], dtype=tl.float32)
        for i0 in range(0, n_s, BLOCK):
            offs = i0 + tl.arange(0, BLOCK)
            t1 += tl.load(part_s_ptr + b * n_s + offs, mask=offs < n_s, other=0.0)
        for i0 in range(0, n_b, BLOCK):
            offs = i0 + tl.arange(0, BLOCK)
            t1 += tl.load(part_b_ptr + b * n_b + offs, mask=offs < n_b, other=0.0)
        n_pf = tl.load(counts_ptr + b * 3).to(tl.float32)
        # every part of an image whose t1 is undefined is 0
        tl.store(terms_ptr + b * 3, tl.sum(t1, axis=0) / tl.maximum(n_pf * (n_pf - 1.0), 1.0))
    n_p = tl.load(counts_ptr + b * 3)
    n_n = tl.load(counts_ptr + b * 3 + 1)
    n_k = tl.load(counts_ptr + b * 3 + 2)
    ok = (n_p >= 1) & (n_n >= 1) & (n_k >= 1)
    pos_lo = tl.where(which == 0, 0, n_p)
    pos_hi = tl.where(which == 0, n_p, n_p + n_n)
    neg_lo = tl.where(which == 0, n_p, 0)
    neg_hi = tl.where(which == 0, n_p + n_n, n_p)
    row = sa_ptr + b * 2 * L + which * L
    # 1. lam: max-shifted log-sum-exp over the negatives, one running (max, sum)
    #    per lane; a finite sentinel keeps empty lanes free of -inf - -inf
    run_max = tl.full([BLOCK], -1e30, dtype=tl.float32)
    run_sum = tl.zeros([BLOCK], dtype=tl.float32)
    for i0 in range(neg_lo, neg_hi, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        m = offs < neg_hi
        s = tl.load(row + offs, mask=m, other=-1e30)
        new_max = tl.maximum(run_max, s)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.where(m, tl.exp(s - new_max), 0.0)
        run_max = new_max
    top = tl.max(run_max, axis=0)
    total = tl.sum(run_sum * tl.exp(run_max - top), axis=0)
    lse = tl.where(ok, top + tl.log(tl.where(ok, total, 1.0)), 0.0)
    # 2. positives
    term = tl.zeros([BLOCK], dtype=tl.float32)
    wsum = tl.zeros([BLOCK], dtype=tl.float32)
    for j0 in range(pos_lo, pos_hi, BLOCK):
        offs = j0 + tl.arange(0, BLOCK)
        m = offs < pos_hi
        z = lse - tl.load(row + offs, mask=m, other=0.0)
        term += tl.where(m, _softplus(z), 0.0)
        wsum += tl.where(m, _sigmoid(z), 0.0)
    n_pos = tl.maximum(pos_hi - pos_lo, 1).to(tl.float32)
    tl.store(terms_ptr + b * 3 + 1 + which, tl.where(ok, tl.sum(term, axis=0) / n_pos, 0.0))
    tl.store(lsea_ptr + b * 2 + which, lse)
    tl.store(wa_ptr + b * 2 + which, tl.where(ok, tl.sum(wsum, axis=0), 0.0))


@triton.jit
def _ncl_pair_bwd_kernel(
    feat_ptr, grad_ptr,  # (B, C, h, w) in, and its gradient out (uncovered cells are the caller's)
    apos_ptr, aneg_ptr,
    perm_ptr, counts_ptr, nrm_ptr, nrma_ptr, sa_ptr, lse_ptr, w_ptr, lsea_ptr, wa_ptr,
    gout_ptr,  # (B, 3) fp32: dL/d(t1, t2, t3)
    plan_ptr,
    stride_fb, stride_fc, stride_fy, stride_fx,
    stride_gb, stride_gc, stride_gy, stride_gx,
    stride_ab, stride_ad, stride_nb, stride_nd,
    L, Q, C, P_: tl.constexpr, D, n_tx, inv_tau, eps,
    BLOCK_X: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, COEF_PRECISION: tl.constexpr,
    IDX64: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    # int64 offsets where an image can span past 2^31 elements
    stride_fc, stride_fy, stride_fx = _wide(stride_fc, IDX64), _wide(stride_fy, IDX64), _wide(stride_fx, IDX64)
    stride_gc, stride_gy, stride_gx = _wide(stride_gc, IDX64), _wide(stride_gy, IDX64), _wide(stride_gx, IDX64)
    stride_ad, stride_nd = _wide(stride_ad, IDX64), _wide(stride_nd, IDX64)
    if tl.load(plan_ptr + b * 2 + 1) != 0:  # the stored path does this image
        return
    pid_d = pid // n_tx
    pid_x = pid % n_tx
    n_p = tl.load(counts_ptr + b * 3)
    n_n = tl.load(counts_ptr + b * 3 + 1)
    n_used = n_p + n_n
    x0 = pid_x * BLOCK_X
    perm_b = perm_ptr + b * L
    rows = x0 + tl.arange(0, BLOCK_X)
    in_grid = rows < L
    kd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    kdmask = kd < D
    if x0 >= n_used:  # contour patches only: their gradient is zero
        _store_rows(grad_ptr + b * stride_gb, tl.zeros([BLOCK_X, BLOCK_D], dtype=tl.float32), perm_b, rows, in_grid,
                    kd, kdmask, C, Q, P_, stride_gc, stride_gy, stride_gx, CHANNELS_LAST)
        return
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
                          stride_fx, inv_tau, BLOCK_X, BLOCK_N, BLOCK_K, CHANNELS_LAST, UPCAST, PRECISION)
            # dL/ds_xy with x as the row (x in P) ...
            c_row = tl.where(y_is_p[None, :], -_sigmoid(lse_x[:, None] - s),
                             w_x[:, None] * tl.exp(s - lse_x[:, None]))
            c_row = tl.where(x_is_p[:, None], c_row, 0.0)
            # ... and dL/ds_yx with y as the row (y in P), s_yx = s_xy
            c_col = tl.where(x_is_p[:, None], -_sigmoid(lse_y[None, :] - s),
                             w_y[None, :] * tl.exp(s - lse_y[None, :]))
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


@triton.jit
def _ncl_anchor_bwd_kernel(
    feat_ptr,
    part_ptr,  # (B, RS, 2, D) fp32 out: sum over the split's patches of c_x hat f_x, per anchor
    dots_ptr,  # (B, RS, 2) fp32 out: sum over the split's patches of c_x s(a, x), per anchor
    perm_ptr, counts_ptr, nrm_ptr, sa_ptr, lsea_ptr, wa_ptr, gout_ptr,
    stride_fb, stride_fc, stride_fy, stride_fx,
    L, Q, C, P_: tl.constexpr, D, n_td, rows_per_split, eps,
    RS: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_D: tl.constexpr, CHANNELS_LAST: tl.constexpr, IDX64: tl.constexpr,
):
    """Both anchors' gradients, first half: one chunk of D and one split of the patch
    list per program (every feature read once for both anchors)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    # int64 offsets where an image can span past 2^31 elements
    stride_fc, stride_fy, stride_fx = _wide(stride_fc, IDX64), _wide(stride_fy, IDX64), _wide(stride_fx, IDX64)
    pid_d = pid % n_td
    rs = pid // n_td
    n_p = tl.load(counts_ptr + b * 3)
    n_n = tl.load(counts_ptr + b * 3 + 1)
    n_k = tl.load(counts_ptr + b * 3 + 2)
    t23_ok = (n_p >= 1) & (n_n >= 1) & (n_k >= 1)
    k2 = tl.load(gout_ptr + b * 3 + 1) / tl.maximum(n_p.to(tl.float32), 1.0)
    k3 = tl.load(gout_ptr + b * 3 + 2) / tl.maximum(n_n.to(tl.float32), 1.0)
    lse_p = tl.load(lsea_ptr + b * 2)
    lse_n = tl.load(lsea_ptr + b * 2 + 1)
    w_p = tl.load(wa_ptr + b * 2)
    w_n = tl.load(wa_ptr + b * 2 + 1)
    feat_b = feat_ptr + b * stride_fb
    perm_b = perm_ptr + b * L
    kd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    kdmask = kd < D
    d_off, canon = _d_offsets(kd, C, P_, stride_fc, stride_fy, stride_fx, CHANNELS_LAST)
    acc_p = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_n = tl.zeros([BLOCK_D], dtype=tl.float32)
    dot_p = tl.zeros([BLOCK_X], dtype=tl.float32)
    dot_n = tl.zeros([BLOCK_X], dtype=tl.float32)
    n_used = tl.where(t23_ok, n_p + n_n, 0)
    lo = rs * rows_per_split
    hi = tl.minimum(lo + rows_per_split, n_used)
    for x0 in range(lo, hi, BLOCK_X):
        rows = x0 + tl.arange(0, BLOCK_X)
        xmask = rows < hi
        x_is_p = rows < n_p
        s_p = tl.load(sa_ptr + b * 2 * L + rows, mask=xmask, other=0.0)
        s_n = tl.load(sa_ptr + b * 2 * L + L + rows, mask=xmask, other=0.0)
        c_p = tl.where(xmask, _anchor_coef(x_is_p, s_p, lse_p, w_p, k2, True), 0.0)
        c_n = tl.where(xmask, _anchor_coef(x_is_p, s_n, lse_n, w_n, k3, False), 0.0)
        rn_x = 1.0 / tl.maximum(tl.load(nrm_ptr + b * L + rows, mask=xmask, other=1.0), eps)
        poff = _patch_offsets(perm_b, rows, xmask, Q, P_, stride_fy, stride_fx)
        f = tl.load(feat_b + poff[:, None] + d_off[None, :], mask=xmask[:, None] & kdmask[None, :],
                    other=0.0).to(tl.float32)
        acc_p += tl.sum((c_p * rn_x)[:, None] * f, axis=0)
        acc_n += tl.sum((c_n * rn_x)[:, None] * f, axis=0)
        dot_p += c_p * s_p
        dot_n += c_n * s_n
    out = part_ptr + ((b * RS + rs) * 2) * D
    tl.store(out + canon, acc_p, mask=kdmask)
    tl.store(out + D + canon, acc_n, mask=kdmask)
    if pid_d == 0:
        tl.store(dots_ptr + (b * RS + rs) * 2, tl.sum(dot_p, axis=0))
        tl.store(dots_ptr + (b * RS + rs) * 2 + 1, tl.sum(dot_n, axis=0))


@triton.jit
def _ncl_anchor_grad_kernel(
    part_ptr, dots_ptr, apos_ptr, aneg_ptr, nrma_ptr,
    gpos_ptr, gneg_ptr,  # (B, D) contiguous out: gradients of a+, a-
    stride_ab, stride_ad, stride_nb, stride_nd,
    D, inv_tau, eps,
    RS: tl.constexpr, BLOCK: tl.constexpr, IDX64: tl.constexpr,
):
    """Both anchors' gradients, second half: the splits' sums in a fixed order, then
    through each anchor's normalization."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    # int64 offsets where an image can span past 2^31 elements
    stride_ad, stride_nd = _wide(stride_ad, IDX64), _wide(stride_nd, IDX64)
    kd = pid * BLOCK + tl.arange(0, BLOCK)
    kdmask = kd < D
    acc_p = tl.zeros([BLOCK], dtype=tl.float32)
    acc_n = tl.zeros([BLOCK], dtype=tl.float32)
    dot_p = 0.0
    dot_n = 0.0
    for rs in range(RS):
        base = part_ptr + ((b * RS + rs) * 2) * D
        acc_p += tl.load(base + kd, mask=kdmask, other=0.0)
        acc_n += tl.load(base + D + kd, mask=kdmask, other=0.0)
        dot_p += tl.load(dots_ptr + (b * RS + rs) * 2)
        dot_n += tl.load(dots_ptr + (b * RS + rs) * 2 + 1)
    for which in tl.static_range(2):
        if which == 0:
            a = tl.load(apos_ptr + b * stride_ab + kd * stride_ad, mask=kdmask, other=0.0).to(tl.float32)
            acc = acc_p
            dot = dot_p
        else:
            a = tl.load(aneg_ptr + b * stride_nb + kd * stride_nd, mask=kdmask, other=0.0).to(tl.float32)
            acc = acc_n
            dot = dot_n
        nrm_a = tl.load(nrma_ptr + b * 2 + which)
        rn_a = 1.0 / tl.maximum(nrm_a, eps)
        radial = tl.where(nrm_a >= eps, dot, 0.0)
        grad = rn_a * (acc * inv_tau - a * rn_a * radial)
        if which == 0:
            tl.store(gpos_ptr + b * D + kd, grad, mask=kdmask)
        else:
            tl.store(gneg_ptr + b * D + kd, grad, mask=kdmask)


# ---- launchers ---------------------------------------------------------------------------


def _layout(feat: torch.Tensor) -> bool:
    """True when channels are the fastest axis (channels_last): read D as (row, col, channel)."""
    return feat.shape[1] > 1 and feat.stride(1) == 1


def _upcast(feat: torch.Tensor) -> bool:
    return INTERPRET or feat.dtype == torch.float32


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
    plan: torch.Tensor  # (B, 2) int64: the image's slot offset in ws, 1 if its block is stored
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
            plan=torch.empty(B, 2, dtype=torch.int64, device=device),
            # zeros: the blocks fill only part of each slot, and an output of the op must
            # hold defined values (one memset, B x slot x 4 bytes: 16.8 MB at stage 1)
            ws=torch.zeros(torch.sym_max(B * slot, 1), **f32),
        )


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
    # Each kernel writes every entry of its outputs (see _ncl_stats_fwd_kernel); only the
    # workspace is zero-filled.
    slot = workspace_slot(L) if slot is None else slot
    saved = NCLSaved.empty(B, L, slot, dev)
    terms = torch.empty(B, 3, **f32)
    n_tm, n_tn = triton.cdiv(L, SIM_BM), triton.cdiv(L, SIM_BN)
    if n_tm * n_tn > 2**31 - 1:  # the stored path's grid would not fit: bounded path for every image
        slot = 0
    n_blocks_b = triton.cdiv(L, BLOCK_M)
    n_blocks_s = triton.cdiv(L, ROWS_BM)
    part_b = torch.empty(B, n_blocks_b, **f32)
    part_s = torch.empty(B, n_blocks_s, **f32)
    fs = (feat.stride(0), feat.stride(1), feat.stride(2), feat.stride(3))
    cl = _layout(feat)
    up = _upcast(feat)
    wide = needs_64bit_offsets(feat, anchor_pos, anchor_neg)
    inv_tau = 1.0 / tau
    nrm, nrma, sa, lse, w, lsea, wa, plan, ws = saved
    with _device_guard(feat):
        _ncl_stats_fwd_kernel[(triton.cdiv(L, STATS_BX), B)](
            feat, anchor_pos, anchor_neg, perm, counts, nrm, sa, lse, w, nrma, plan,
            *fs, anchor_pos.stride(0), anchor_pos.stride(1), anchor_neg.stride(0), anchor_neg.stride(1),
            L, Q, C, patch, D, inv_tau, EPS, slot,
            BLOCK_X=STATS_BX, BLOCK_K=STATS_BK, CHANNELS_LAST=cl, IDX64=wide, num_warps=NUM_WARPS,
        )
        _ncl_sim_kernel[(n_tm * n_tn if slot > 0 else 1, B)](
            feat, perm, counts, nrm, plan, ws,
            *fs, L, Q, C, patch, D, n_tn, inv_tau, EPS,
            BM=SIM_BM, BN=SIM_BN, BK=SIM_BK_F32 if up else SIM_BK_HALF, CHANNELS_LAST=cl,
            UPCAST=up, PRECISION=precision, IDX64=wide, num_warps=SIM_WARPS, num_stages=SIM_STAGES,
        )
        _ncl_rows_kernel[(n_blocks_s, B)](ws, plan, counts, lse, w, part_s, L, n_blocks_s, BM=ROWS_BM, BC=ROWS_BC)
        _ncl_pair_fwd_kernel[(n_blocks_b, B)](
            feat, perm, counts, nrm, plan, lse, w, part_b,
            *fs, L, Q, C, patch, D, n_blocks_b, inv_tau, EPS,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K_F32_BOUNDED if up else BLOCK_K, CHANNELS_LAST=cl,
            UPCAST=up, PRECISION=precision, IDX64=wide, num_warps=NUM_WARPS,
        )
        # one program per (image, anchor) walks at most L similarities in blocks of 256
        _ncl_anchor_fwd_kernel[(B, 2)](sa, counts, terms, lsea, wa, part_s, part_b, L, n_blocks_s, n_blocks_b,
                                       BLOCK=256)
    return terms, saved


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
    nrm, nrma, sa, lse, w, lsea, wa, plan, ws = saved
    B, C = feat.shape[:2]
    R, Q = grid_rq
    L = R * Q
    D = C * patch * patch
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
        n_tx, n_td = triton.cdiv(L, GRAD_BX), triton.cdiv(D, GRAD_BD)
        _ncl_grad_kernel[(_grid_check(n_tx * n_td, "the backward"), B)](
            feat, grad_feat, anchor_pos, anchor_neg, *common, ws,
            *fs, *gs, *as_, L, Q, C, patch, D, n_tx, inv_tau, EPS,
            BX=GRAD_BX, BY=GRAD_BY, BD=GRAD_BD, CHANNELS_LAST=cl,
            PRECISION=precision if up else "tf32", IDX64=wide, num_warps=GRAD_WARPS_F32 if up else GRAD_WARPS,
            num_stages=GRAD_STAGES_F32 if up else GRAD_STAGES, maxnreg=None if up else GRAD_MAXNREG,
        )
        bd = BLOCK_D_F32_BOUNDED if up else BLOCK_D
        n_tx, n_td = triton.cdiv(L, BLOCK_M), triton.cdiv(D, bd)
        _ncl_pair_bwd_kernel[(_grid_check(n_tx * n_td, "the bounded backward"), B)](
            feat, grad_feat, anchor_pos, anchor_neg, *common,
            *fs, *gs, *as_, L, Q, C, patch, D, n_tx, inv_tau, EPS,
            BLOCK_X=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K_F32_BOUNDED if up else BLOCK_K, BLOCK_D=bd, CHANNELS_LAST=cl,
            UPCAST=up, PRECISION=precision, COEF_PRECISION=precision if up else "tf32", IDX64=wide,
            num_warps=NUM_WARPS_BWD,
            num_stages=2 if up else 3,
        )
        n_td = triton.cdiv(D, BLOCK_D)
        rows_per_split = triton.cdiv(triton.cdiv(L, ANCHOR_SPLITS), BLOCK_M) * BLOCK_M
        part = torch.empty(B, ANCHOR_SPLITS, 2, D, dtype=torch.float32, device=feat.device)
        dots = torch.empty(B, ANCHOR_SPLITS, 2, dtype=torch.float32, device=feat.device)
        _ncl_anchor_bwd_kernel[(_grid_check(n_td * ANCHOR_SPLITS, "the anchors' backward"), B)](
            feat, part, dots, perm, counts, nrm, sa, lsea, wa, gout,
            *fs, L, Q, C, patch, D, n_td, rows_per_split, EPS,
            RS=ANCHOR_SPLITS, BLOCK_X=BLOCK_M, BLOCK_D=BLOCK_D, CHANNELS_LAST=cl, IDX64=wide, num_warps=NUM_WARPS,
        )
        _ncl_anchor_grad_kernel[(triton.cdiv(D, 1024), B)](
            part, dots, anchor_pos, anchor_neg, nrma, grad_pos, grad_neg,
            *as_, D, inv_tau, EPS, RS=ANCHOR_SPLITS, BLOCK=1024, IDX64=wide, num_warps=NUM_WARPS,
        )
    return grad_feat, grad_pos, grad_neg
