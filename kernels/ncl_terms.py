"""The NCL loss terms (SPEC.md section 5), fused in Triton, forward and backward.

Notation (per image b): P, N, K the tampered, authentic and contour patch sets,
listed in `perm` (P first, then N, then K; see `patch_labels.py`) with counts
`[|P|, |N|, |K|]`; a patch is addressed by its *position* in that list. f_x is
the patch feature read straight from the `(B, C, h, w)` feature map, hat f_x =
f_x / max(|f_x|, eps), s_xy = <hat f_x, hat f_y> / tau.

    t1 = 1/(|P|(|P|-1)) sum_{m in P} sum_{j in P, j != m} softplus(lam_m - s_mj),
         lam_m = log sum_{i in N} exp(s_mi)
    t2 = 1/|P| sum_{j in P} softplus(lam+ - s(a+, j)),  lam+ = log sum_{i in N} exp(s(a+, i))
    t3 = 1/|N| sum_{i in N} softplus(lam- - s(a-, i)),  lam- = log sum_{j in P} exp(s(a-, j))

(`log(exp(s) + sum exp(s_i)) - s == softplus(lam - s)`.) Kernels:

1. `_ncl_stats_fwd_kernel` (B, L / BLOCK_X): norms |f_x| and the anchor
   similarities s(a+, x), s(a-, x) of every P and N patch: one read of those
   patches' features.
2. `_ncl_pair_fwd_kernel` (B, L / BLOCK_M): a block of tampered rows m; pass 1
   is a max-shifted online log-sum-exp over the authentic columns (lam_m), pass
   2 sums softplus(lam_m - s_mj) and W_m = sum_j sigmoid(lam_m - s_mj) over the
   tampered columns. Similarity tiles come from `tl.dot` over D in BLOCK_K
   chunks. Saves lam_m and W_m; never an L x L matrix.
3. `_ncl_anchor_fwd_kernel` (B, 2): t2 and t3 from the saved anchor similarities.

Backward. With g = dL/d(t1, t2, t3) and k1 = g1/(|P|(|P|-1)), k2 = g2/|P|,
k3 = g3/|N|, the loss depends on the features through s only, with
  dL/ds_mj = -k1 sigmoid(lam_m - s_mj)       (m, j in P, j != m)
  dL/ds_mi =  k1 W_m exp(s_mi - lam_m)       (m in P, i in N)
and likewise for the anchors. For a patch x, T_xy = dL/ds_xy + dL/ds_yx gives
  d hat f_x = (1/tau) (sum_y T_xy hat f_y + c+_x hat a+ + c-_x hat a-)
  <hat f_x, d hat f_x> = sum_y T_xy s_xy + c+_x s(a+, x) + c-_x s(a-, x)
(the second needs no pass over D), and the normalization's backward
  d f_x = (d hat f_x - [|f_x| >= eps] hat f_x <hat f_x, d hat f_x>) / max(|f_x|, eps).
4. `_ncl_pair_bwd_kernel` (B, L / BLOCK_X, D / BLOCK_D): a block of patches and
   a chunk of D; recomputes the similarity tiles (full D) and accumulates
   T @ hat F_y for its chunk. Gradients go to the feature map in its own layout;
   contour patches and uncovered cells keep the zeros they were given.
5. `_ncl_anchor_bwd_kernel` (B, 2, D / BLOCK_D): the anchors' gradients.

All arithmetic is fp32 (bf16/fp16 features are multiplied exactly into fp32
accumulators by `tl.dot`). Features are indexed in an internal D order that
follows memory: (channel, row, column) for contiguous maps and (row, column,
channel) for channels_last maps; similarities do not depend on the order of D,
and anchors are read at the matching canonical index.

Tested on the CPU under TRITON_INTERPRET=1 (tests/test_ncl_terms.py); the GPU
parity and timing run is `bench/gpu_check.sh`.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: True when Triton runs kernels on the CPU through its interpreter.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Block sizes (tl.dot needs every dimension >= 16). 32 rows x 32 columns keeps a
# similarity tile at 1K fp32 values (8 registers per thread at 4 warps) while
# amortizing the row tile's loads over 32 columns; BLOCK_K = 64 elements (256 B
# of an fp32 patch row) per load.
# The backward never stores similarities, so each chunk of BLOCK_D output columns
# recomputes its tiles over the full D: D / BLOCK_D recomputations (16 at D = 4096).
# BLOCK_D = 256 with 8 warps holds the 32 x 256 fp32 accumulator in 32 registers
# per thread. None of these is tuned on a GPU yet (bench/bench_ncl_loss.py).
BLOCK_M = 32
BLOCK_N = 32
BLOCK_K = 64
BLOCK_D = 256
NUM_WARPS = 4
NUM_WARPS_BWD = 8
# fp32 x fp32 products: "ieee" keeps the 1e-5 parity with the reference;
# "tf32x3" (near-fp32) or "tf32" trade accuracy for tensor-core speed.
FP32_DOT_PRECISION = os.environ.get("NCL_FAST_FP32_DOT_PRECISION", "ieee")
EPS = 1e-12  # the F.normalize clamp of SPEC section 3


@triton.jit
def _d_offsets(k, C, P_, stride_c, stride_y, stride_x, CHANNELS_LAST: tl.constexpr):
    """Memory offsets (within a patch) and canonical indices (c * p * p + i * p + j)
    of the internal D positions k."""
    if CHANNELS_LAST:
        ch = k % C
        ij = k // C
    else:
        ch = k // (P_ * P_)
        ij = k % (P_ * P_)
    i = ij // P_
    j = ij % P_
    return ch * stride_c + i * stride_y + j * stride_x, ch * P_ * P_ + i * P_ + j


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
        if UPCAST:  # fp32 operands (fp32 inputs; the interpreter's bf16 dot is not exact)
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
    nrma_ptr,  # (B, 2) fp32 out: |a+|, |a-|
    stride_fb, stride_fc, stride_fy, stride_fx,
    stride_ab, stride_ad, stride_nb, stride_nd,
    L, Q, C, P_, D, inv_tau, eps,
    BLOCK_X: tl.constexpr, BLOCK_K: tl.constexpr, CHANNELS_LAST: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    n_used = tl.load(counts_ptr + b * 3) + tl.load(counts_ptr + b * 3 + 1)
    x0 = pid * BLOCK_X
    if (pid > 0) & (x0 >= n_used):  # program 0 always runs: it writes the anchor norms
        return
    pos = x0 + tl.arange(0, BLOCK_X)
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
    tl.store(nrm_ptr + b * L + pos, nrm, mask=pmask)
    tl.store(sa_ptr + b * 2 * L + pos, dp * rn * (inv_tau / tl.maximum(nrm_p, eps)), mask=pmask)
    tl.store(sa_ptr + b * 2 * L + L + pos, dn * rn * (inv_tau / tl.maximum(nrm_n, eps)), mask=pmask)
    if pid == 0:
        tl.store(nrma_ptr + b * 2, nrm_p)
        tl.store(nrma_ptr + b * 2 + 1, nrm_n)


@triton.jit
def _ncl_pair_fwd_kernel(
    feat_ptr, perm_ptr, counts_ptr, nrm_ptr,
    lse_ptr,  # (B, L) fp32 out: lam_m by position (tampered rows)
    w_ptr,  # (B, L) fp32 out: W_m = sum_{j != m} sigmoid(lam_m - s_mj)
    part_ptr,  # (B, n_row_blocks) fp32 out: sum over the block's rows of sum_j softplus(...)
    stride_fb, stride_fc, stride_fy, stride_fx,
    L, Q, C, P_, D, n_blocks, inv_tau, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    n_p = tl.load(counts_ptr + b * 3)
    n_n = tl.load(counts_ptr + b * 3 + 1)
    m0 = pid * BLOCK_M
    if (m0 >= n_p) | (n_p < 2) | (n_n < 1):  # no rows here, or t1 undefined
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
        term += tl.sum(tl.where(ok, _softplus(z), 0.0), axis=1)
        wsum += tl.sum(tl.where(ok, _sigmoid(z), 0.0), axis=1)
    tl.store(lse_ptr + b * L + rows, lse, mask=rmask)
    tl.store(w_ptr + b * L + rows, wsum, mask=rmask)
    tl.store(part_ptr + b * n_blocks + pid, tl.sum(tl.where(rmask, term, 0.0), axis=0))


@triton.jit
def _ncl_anchor_fwd_kernel(
    sa_ptr, counts_ptr,
    t23_ptr,  # (B, 2) fp32 out: t2, t3
    lsea_ptr, wa_ptr,  # (B, 2) fp32 out: lam+-, W+- (0 where undefined)
    L,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    which = tl.program_id(1)  # 0: a+ (positives P, negatives N); 1: a- (positives N, negatives P)
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
    tl.store(t23_ptr + b * 2 + which, tl.where(ok, tl.sum(term, axis=0) / n_pos, 0.0))
    tl.store(lsea_ptr + b * 2 + which, lse)
    tl.store(wa_ptr + b * 2 + which, tl.where(ok, tl.sum(wsum, axis=0), 0.0))


@triton.jit
def _anchor_coef(x_is_p, s, lse, w, k2or3, IS_POS: tl.constexpr):
    """dL/ds(a, x) for the anchor a+ (IS_POS) or a-: see the module docstring."""
    if IS_POS:  # positives P, negatives N
        return tl.where(x_is_p, -k2or3 * _sigmoid(lse - s), k2or3 * w * tl.exp(s - lse))
    else:  # positives N, negatives P
        return tl.where(x_is_p, k2or3 * w * tl.exp(s - lse), -k2or3 * _sigmoid(lse - s))


@triton.jit
def _ncl_pair_bwd_kernel(
    feat_ptr, grad_ptr,  # (B, C, h, w) in, and its gradient out (zero-initialized)
    apos_ptr, aneg_ptr,
    perm_ptr, counts_ptr, nrm_ptr, nrma_ptr, sa_ptr, lse_ptr, w_ptr, lsea_ptr, wa_ptr,
    gout_ptr,  # (B, 3) fp32: dL/d(t1, t2, t3)
    stride_fb, stride_fc, stride_fy, stride_fx,
    stride_gb, stride_gc, stride_gy, stride_gx,
    stride_ab, stride_ad, stride_nb, stride_nd,
    L, Q, C, P_, D, inv_tau, eps,
    BLOCK_X: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pid_x = tl.program_id(1)
    pid_d = tl.program_id(2)
    n_p = tl.load(counts_ptr + b * 3)
    n_n = tl.load(counts_ptr + b * 3 + 1)
    n_k = tl.load(counts_ptr + b * 3 + 2)
    n_used = n_p + n_n
    x0 = pid_x * BLOCK_X
    if x0 >= n_used:
        return
    # 1. per-image coefficients; undefined terms get no gradient
    t1_ok = (n_p >= 2) & (n_n >= 1)
    t23_ok = (n_p >= 1) & (n_n >= 1) & (n_k >= 1)
    n_pf = n_p.to(tl.float32)
    k1 = tl.load(gout_ptr + b * 3) / tl.maximum(n_pf * (n_pf - 1.0), 1.0)
    k2 = tl.load(gout_ptr + b * 3 + 1) / tl.maximum(n_pf, 1.0)
    k3 = tl.load(gout_ptr + b * 3 + 2) / tl.maximum(n_n.to(tl.float32), 1.0)

    feat_b = feat_ptr + b * stride_fb
    perm_b = perm_ptr + b * L
    rows = x0 + tl.arange(0, BLOCK_X)
    xmask = rows < n_used
    x_is_p = rows < n_p
    poff_x = _patch_offsets(perm_b, rows, xmask, Q, P_, stride_fy, stride_fx)
    nrm_x = tl.load(nrm_ptr + b * L + rows, mask=xmask, other=1.0)
    rn_x = 1.0 / tl.maximum(nrm_x, eps)
    lse_x = tl.load(lse_ptr + b * L + rows, mask=xmask & x_is_p, other=0.0)
    w_x = tl.load(w_ptr + b * L + rows, mask=xmask & x_is_p, other=0.0)

    # 2. anchor coefficients c+_x, c-_x
    s_pos = tl.load(sa_ptr + b * 2 * L + rows, mask=xmask, other=0.0)
    s_neg = tl.load(sa_ptr + b * 2 * L + L + rows, mask=xmask, other=0.0)
    c_pos = _anchor_coef(x_is_p, s_pos, tl.load(lsea_ptr + b * 2), tl.load(wa_ptr + b * 2), k2, True)
    c_neg = _anchor_coef(x_is_p, s_neg, tl.load(lsea_ptr + b * 2 + 1), tl.load(wa_ptr + b * 2 + 1), k3, False)
    c_pos = tl.where(t23_ok & xmask, c_pos, 0.0)
    c_neg = tl.where(t23_ok & xmask, c_neg, 0.0)
    dot_x = c_pos * s_pos + c_neg * s_neg  # <hat f_x, d hat f_x>, accumulated below

    kd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    kdmask = kd < D
    d_off, canon = _d_offsets(kd, C, P_, stride_fc, stride_fy, stride_fx, CHANNELS_LAST)
    ap = tl.load(apos_ptr + b * stride_ab + canon * stride_ad, mask=kdmask, other=0.0).to(tl.float32)
    an = tl.load(aneg_ptr + b * stride_nb + canon * stride_nd, mask=kdmask, other=0.0).to(tl.float32)
    ap = ap / tl.maximum(tl.load(nrma_ptr + b * 2), eps)
    an = an / tl.maximum(tl.load(nrma_ptr + b * 2 + 1), eps)
    acc = c_pos[:, None] * ap[None, :] + c_neg[:, None] * an[None, :]  # [BLOCK_X, BLOCK_D]

    # 3. pairs: columns over P always, over N too when this block holds tampered rows
    y_end = tl.where(x0 < n_p, n_used, n_p)
    if t1_ok:
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
            c_row = tl.where(y_is_p[None, :], -k1 * _sigmoid(lse_x[:, None] - s),
                             k1 * w_x[:, None] * tl.exp(s - lse_x[:, None]))
            c_row = tl.where(x_is_p[:, None], c_row, 0.0)
            # ... and dL/ds_yx with y as the row (y in P), s_yx = s_xy
            c_col = tl.where(x_is_p[:, None], -k1 * _sigmoid(lse_y[None, :] - s),
                             k1 * w_y[None, :] * tl.exp(s - lse_y[None, :]))
            c_col = tl.where(y_is_p[None, :], c_col, 0.0)
            keep = xmask[:, None] & ymask[None, :] & (rows[:, None] != cols[None, :])
            t = tl.where(keep, c_row + c_col, 0.0)
            dot_x += tl.sum(t * s, axis=1)
            fy = tl.load(feat_b + poff_y[:, None] + d_off[None, :], mask=ymask[:, None] & kdmask[None, :],
                         other=0.0)
            t = t * rn_y[None, :]  # T @ hat F_y == (T diag(1/|f_y|)) @ F_y
            if UPCAST:
                acc = tl.dot(t, fy.to(tl.float32), acc, input_precision=PRECISION)
            else:  # half inputs: tensor-core dot; the gradient is rounded to that dtype anyway
                acc = tl.dot(t.to(fy.dtype), fy, acc)

    # 4. through the normalization, into the feature map's own layout
    fx = tl.load(feat_b + poff_x[:, None] + d_off[None, :], mask=xmask[:, None] & kdmask[None, :],
                 other=0.0).to(tl.float32)
    radial = tl.where(nrm_x >= eps, dot_x, 0.0)
    grad = rn_x[:, None] * (acc * inv_tau - fx * (rn_x * radial)[:, None])
    goff_x = _patch_offsets(perm_b, rows, xmask, Q, P_, stride_gy, stride_gx)
    g_off, _ = _d_offsets(kd, C, P_, stride_gc, stride_gy, stride_gx, CHANNELS_LAST)
    tl.store(grad_ptr + b * stride_gb + goff_x[:, None] + g_off[None, :], grad,
             mask=xmask[:, None] & kdmask[None, :])


@triton.jit
def _ncl_anchor_bwd_kernel(
    feat_ptr, apos_ptr, aneg_ptr,
    gpos_ptr, gneg_ptr,  # (B, D) contiguous out: gradients of a+, a-
    perm_ptr, counts_ptr, nrm_ptr, nrma_ptr, sa_ptr, lsea_ptr, wa_ptr, gout_ptr,
    stride_fb, stride_fc, stride_fy, stride_fx,
    stride_ab, stride_ad, stride_nb, stride_nd,
    L, Q, C, P_, D, inv_tau, eps,
    BLOCK_X: tl.constexpr, BLOCK_D: tl.constexpr, CHANNELS_LAST: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    which = tl.program_id(1)
    pid_d = tl.program_id(2)
    n_p = tl.load(counts_ptr + b * 3)
    n_n = tl.load(counts_ptr + b * 3 + 1)
    n_k = tl.load(counts_ptr + b * 3 + 2)
    t23_ok = (n_p >= 1) & (n_n >= 1) & (n_k >= 1)
    k = tl.load(gout_ptr + b * 3 + 1 + which) / tl.maximum(tl.where(which == 0, n_p, n_n).to(tl.float32), 1.0)
    lse = tl.load(lsea_ptr + b * 2 + which)
    w = tl.load(wa_ptr + b * 2 + which)
    feat_b = feat_ptr + b * stride_fb
    perm_b = perm_ptr + b * L
    kd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    kdmask = kd < D
    d_off, canon = _d_offsets(kd, C, P_, stride_fc, stride_fy, stride_fx, CHANNELS_LAST)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dot = tl.zeros([BLOCK_X], dtype=tl.float32)
    n_used = tl.where(t23_ok, n_p + n_n, 0)
    for x0 in range(0, n_used, BLOCK_X):
        rows = x0 + tl.arange(0, BLOCK_X)
        xmask = rows < n_used
        x_is_p = rows < n_p
        s = tl.load(sa_ptr + b * 2 * L + which * L + rows, mask=xmask, other=0.0)
        c_p = _anchor_coef(x_is_p, s, lse, w, k, True)
        c_n = _anchor_coef(x_is_p, s, lse, w, k, False)
        c = tl.where(xmask, tl.where(which == 0, c_p, c_n), 0.0)
        rn_x = 1.0 / tl.maximum(tl.load(nrm_ptr + b * L + rows, mask=xmask, other=1.0), eps)
        poff = _patch_offsets(perm_b, rows, xmask, Q, P_, stride_fy, stride_fx)
        f = tl.load(feat_b + poff[:, None] + d_off[None, :], mask=xmask[:, None] & kdmask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum((c * rn_x)[:, None] * f, axis=0)
        dot += c * s
    # through the anchor's normalization
    if which == 0:
        a = tl.load(apos_ptr + b * stride_ab + canon * stride_ad, mask=kdmask, other=0.0).to(tl.float32)
    else:
        a = tl.load(aneg_ptr + b * stride_nb + canon * stride_nd, mask=kdmask, other=0.0).to(tl.float32)
    nrm_a = tl.load(nrma_ptr + b * 2 + which)
    rn_a = 1.0 / tl.maximum(nrm_a, eps)
    radial = tl.where(nrm_a >= eps, tl.sum(dot, axis=0), 0.0)
    grad = rn_a * (acc * inv_tau - a * rn_a * radial)
    if which == 0:
        tl.store(gpos_ptr + b * D + canon, grad, mask=kdmask)
    else:
        tl.store(gneg_ptr + b * D + canon, grad, mask=kdmask)


# ---- launchers ---------------------------------------------------------------------------


def _layout(feat: torch.Tensor) -> bool:
    """True when channels are the fastest axis (channels_last): read D as (row, col, channel)."""
    return feat.shape[1] > 1 and feat.stride(1) == 1


def _upcast(feat: torch.Tensor) -> bool:
    return INTERPRET or feat.dtype == torch.float32


def ncl_terms_fwd(
    feat: torch.Tensor,
    anchor_pos: torch.Tensor,
    anchor_neg: torch.Tensor,
    counts: torch.Tensor,
    perm: torch.Tensor,
    patch: int,
    grid_rq: tuple[int, int],
    tau: float,
):
    """Per-image `[t1, t2, t3]` (B, 3) fp32 and what the backward needs:
    `(terms, nrm, nrma, sa, lse, w, lsea, wa)` (all linear in L)."""
    B, C = feat.shape[:2]
    R, Q = grid_rq
    L = R * Q
    D = C * patch * patch
    dev = feat.device
    f32 = dict(dtype=torch.float32, device=dev)
    nrm = torch.zeros(B, L, **f32)
    nrma = torch.zeros(B, 2, **f32)
    sa = torch.zeros(B, 2, L, **f32)
    lse = torch.zeros(B, L, **f32)
    w = torch.zeros(B, L, **f32)
    lsea = torch.zeros(B, 2, **f32)
    wa = torch.zeros(B, 2, **f32)
    t23 = torch.zeros(B, 2, **f32)
    n_blocks = triton.cdiv(L, BLOCK_M)
    part = torch.zeros(B, n_blocks, **f32)
    fs = (feat.stride(0), feat.stride(1), feat.stride(2), feat.stride(3))
    cl = _layout(feat)
    inv_tau = 1.0 / tau
    _ncl_stats_fwd_kernel[(B, triton.cdiv(L, BLOCK_M))](
        feat, anchor_pos, anchor_neg, perm, counts, nrm, sa, nrma,
        *fs, anchor_pos.stride(0), anchor_pos.stride(1), anchor_neg.stride(0), anchor_neg.stride(1),
        L, Q, C, patch, D, inv_tau, EPS,
        BLOCK_X=BLOCK_M, BLOCK_K=BLOCK_K, CHANNELS_LAST=cl, num_warps=NUM_WARPS,
    )
    _ncl_pair_fwd_kernel[(B, n_blocks)](
        feat, perm, counts, nrm, lse, w, part,
        *fs, L, Q, C, patch, D, n_blocks, inv_tau, EPS,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, CHANNELS_LAST=cl,
        UPCAST=_upcast(feat), PRECISION=FP32_DOT_PRECISION, num_warps=NUM_WARPS,
    )
    # one program per (image, anchor) walks at most L similarities in blocks of 256
    _ncl_anchor_fwd_kernel[(B, 2)](sa, counts, t23, lsea, wa, L, BLOCK=256)
    n_p = counts[:, 0].to(torch.float32)
    t1 = part.sum(dim=1) / (n_p * (n_p - 1)).clamp(min=1.0)  # 0 where undefined: every part is 0
    terms = torch.cat([t1[:, None], t23], dim=1)
    return terms, nrm, nrma, sa, lse, w, lsea, wa


def ncl_terms_bwd(
    grad_terms: torch.Tensor,
    feat: torch.Tensor,
    anchor_pos: torch.Tensor,
    anchor_neg: torch.Tensor,
    counts: torch.Tensor,
    perm: torch.Tensor,
    saved: tuple[torch.Tensor, ...],
    patch: int,
    grid_rq: tuple[int, int],
    tau: float,
):
    """Gradients `(d feat, d anchor_pos, d anchor_neg)`; `saved = (nrm, nrma, sa, lse, w, lsea, wa)`."""
    nrm, nrma, sa, lse, w, lsea, wa = saved
    B, C = feat.shape[:2]
    R, Q = grid_rq
    L = R * Q
    D = C * patch * patch
    gout = grad_terms.to(torch.float32).contiguous()
    grad_feat = torch.zeros_like(feat)
    grad_pos = torch.empty(B, D, dtype=anchor_pos.dtype, device=feat.device)
    grad_neg = torch.empty(B, D, dtype=anchor_neg.dtype, device=feat.device)
    fs = (feat.stride(0), feat.stride(1), feat.stride(2), feat.stride(3))
    gs = (grad_feat.stride(0), grad_feat.stride(1), grad_feat.stride(2), grad_feat.stride(3))
    as_ = (anchor_pos.stride(0), anchor_pos.stride(1), anchor_neg.stride(0), anchor_neg.stride(1))
    cl = _layout(feat)
    inv_tau = 1.0 / tau
    _ncl_pair_bwd_kernel[(B, triton.cdiv(L, BLOCK_M), triton.cdiv(D, BLOCK_D))](
        feat, grad_feat, anchor_pos, anchor_neg,
        perm, counts, nrm, nrma, sa, lse, w, lsea, wa, gout,
        *fs, *gs, *as_, L, Q, C, patch, D, inv_tau, EPS,
        BLOCK_X=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, CHANNELS_LAST=cl,
        UPCAST=_upcast(feat), PRECISION=FP32_DOT_PRECISION, num_warps=NUM_WARPS_BWD,
    )
    _ncl_anchor_bwd_kernel[(B, 2, triton.cdiv(D, BLOCK_D))](
        feat, anchor_pos, anchor_neg, grad_pos, grad_neg,
        perm, counts, nrm, nrma, sa, lsea, wa, gout,
        *fs, *as_, L, Q, C, patch, D, inv_tau, EPS,
        BLOCK_X=BLOCK_M, BLOCK_D=BLOCK_D, CHANNELS_LAST=cl, num_warps=NUM_WARPS,
    )
    return grad_feat, grad_pos, grad_neg
