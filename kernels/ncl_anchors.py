"""Per-patch statistics and the anchors' terms t2, t3 (SPEC.md section 5; notation in
`ncl_common.py`), shared by both algorithms:

* `_ncl_stats_fwd_kernel`: |f_x|, s(a+, x), s(a-, x) of every listed patch and the
  anchors' norms: for the stored path's images, from the sums the similarity GEMM
  formed over its parts of D (it loads every used patch's features already); for the
  others, one pass over the used patches;
* `_ncl_anchor_fwd_kernel`: t2 and t3, and t1 closed from the row blocks' sums;
* `_ncl_anchor_bwd_kernel` (the bounded path's images; the stored path's backward forms
  the same sums from the features it loads), `_ncl_anchor_grad_kernel`: both anchors'
  gradients.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .ncl_common import (_anchor_coef, _d_offsets, _is_stored, _patch_offsets, _sigmoid, _sim_splits, _softplus, _wide,
                         _ws_ld, _ws_zero_tail)

# Per-patch statistics: 8 patches x 512 values of D per step, so that ~4 programs
# per SM keep enough loads in flight (one pass over the used patches).
STATS_BX = 8
STATS_BK = 512
# The workspace's values no block holds are zeroed by the statistics pass, in runs of
# 1024 fp32 values (8 per thread: two 128-bit stores) spread over its programs.
STATS_ZB = 1024
# Anchors' backward: the patch list in 4 splits x chunks of D (both anchors per program);
# the sums added up in chunks of 128 values of D (B x D / 128 programs: each reads its
# chunk of every row tile's sums; with 256, 64 programs at stage 1 left half the SMs idle
# and bound the launch by its longest program).
ANCHOR_SPLITS = 4
ANCHOR_GRAD_BLOCK = 128


@triton.jit
def _ncl_stats_fwd_kernel(
    feat_ptr,  # (B, C, h, w) fp32/bf16/fp16, strides below
    apos_ptr, aneg_ptr,  # (B, D) anchors a+, a- (canonical order)
    perm_ptr, counts_ptr,  # (B, L) int32, (B, 3) int32
    plan_ptr,  # (B, 3) int64: the workspace plan (_ncl_plan_kernel)
    colpart_ptr, apart_ptr,  # the similarity GEMM's statistics per part of D (SIM: see _ncl_sim_kernel)
    ws_ptr, slot,  # the workspace (B x slot fp32 values, at least one): its values past the blocks are zeroed here
    nrm_ptr,  # (B, L) fp32 out: |f_x| by list position
    sa_ptr,  # (B, 2, L) fp32 out: s(a+, x), s(a-, x) by list position
    lse_ptr, w_ptr,  # (B, L) fp32 out: 0 at the positions the t1 kernels leave (not tampered rows of t1)
    nrma_ptr,  # (B, 2) fp32 out: |a+|, |a-|
    stride_fb, stride_fc, stride_fy, stride_fx,
    stride_ab, stride_ad, stride_nb, stride_nd,
    L, Q, C, P_: tl.constexpr, D, inv_tau, eps,
    BLOCK_X: tl.constexpr, BLOCK_K: tl.constexpr, SPLITS: tl.constexpr, SIM: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, IDX64: tl.constexpr, ZB: tl.constexpr,
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
    t1_ok = (n_p >= 2) & (n_n >= 1)
    # The similarity GEMM wrote the image's blocks (splits x |P| rows of ld); the rest of
    # its slot is zeroed here, by all of the image's programs
    sim_done = tl.zeros([], dtype=tl.int64)
    if SIM:
        if t1_ok:
            sim_done = _is_stored(plan_ptr, b)
    splits = tl.zeros([], dtype=tl.int32)
    blocks_end = tl.zeros([], dtype=tl.int64)
    if sim_done != 0:
        splits = _sim_splits(plan_ptr, b)
        blocks_end = splits.to(tl.int64) * n_p.to(tl.int64) * _ws_ld(n_used).to(tl.int64)
    _ws_zero_tail(ws_ptr, b, blocks_end, slot, pid, tl.num_programs(0), b == tl.num_programs(1) - 1, ZB)
    not_t1_row = (pos >= n_p) | (n_p < 2) | (n_n < 1)
    tl.store(lse_ptr + b * L + pos, tl.zeros([BLOCK_X], dtype=tl.float32), mask=in_list & not_t1_row)
    tl.store(w_ptr + b * L + pos, tl.zeros([BLOCK_X], dtype=tl.float32), mask=in_list & not_t1_row)
    if (pid != 0) & (x0 >= n_used):  # no listed patch here (program 0 always runs: the anchors' norms)
        zero = tl.zeros([BLOCK_X], dtype=tl.float32)
        tl.store(nrm_ptr + b * L + pos, zero, mask=in_list)
        tl.store(sa_ptr + b * 2 * L + pos, zero, mask=in_list)
        tl.store(sa_ptr + b * 2 * L + L + pos, zero, mask=in_list)
        return
    pmask = pos < n_used
    sq = tl.zeros([BLOCK_X], dtype=tl.float32)
    dp = tl.zeros([BLOCK_X], dtype=tl.float32)
    dn = tl.zeros([BLOCK_X], dtype=tl.float32)
    ap2 = tl.zeros([], dtype=tl.float32)
    an2 = tl.zeros([], dtype=tl.float32)
    if sim_done != 0:
        # the similarity GEMM summed these over its parts of D: add the parts in order
        for k in range(0, splits):
            cp = colpart_ptr + ((b * SPLITS + k) * 3) * L
            sq += tl.load(cp + pos, mask=pmask, other=0.0)
            dp += tl.load(cp + L + pos, mask=pmask, other=0.0)
            dn += tl.load(cp + 2 * L + pos, mask=pmask, other=0.0)
            ap2 += tl.load(apart_ptr + (b * SPLITS + k) * 2)
            an2 += tl.load(apart_ptr + (b * SPLITS + k) * 2 + 1)
    else:
        feat_b = feat_ptr + b * stride_fb
        poff = _patch_offsets(perm_ptr + b * L, pos, pmask, Q, P_, stride_fy, stride_fx)
        apv = tl.zeros([BLOCK_K], dtype=tl.float32)
        anv = tl.zeros([BLOCK_K], dtype=tl.float32)
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
            apv += ap * ap
            anv += an * an
        ap2 = tl.sum(apv, axis=0)
        an2 = tl.sum(anv, axis=0)
    nrm = tl.sqrt(sq)
    nrm_p = tl.sqrt(ap2)
    nrm_n = tl.sqrt(an2)
    rn = 1.0 / tl.maximum(nrm, eps)
    # past the lists the loads gave 0: these stores write zeros there
    tl.store(nrm_ptr + b * L + pos, nrm, mask=in_list)
    tl.store(sa_ptr + b * 2 * L + pos, dp * rn * (inv_tau / tl.maximum(nrm_p, eps)), mask=in_list)
    tl.store(sa_ptr + b * 2 * L + L + pos, dn * rn * (inv_tau / tl.maximum(nrm_n, eps)), mask=in_list)
    if pid == 0:
        tl.store(nrma_ptr + b * 2, nrm_p)
        tl.store(nrma_ptr + b * 2 + 1, nrm_n)


@triton.jit
def _ncl_plan_kernel(
    counts_ptr,  # (B, 3) int32: |P|, |N|, |K|
    plan_ptr,  # (B, 3) int64 out: the image's slot offset in ws, 1 if its block is stored, K splits
    sched_ptr,  # (SCHED_KINDS, B + 1) int32 out: per kind of work item, the images' prefix sums
    B, slot,  # fp32 values of workspace per image
    sim_target,  # similarity items wanted per image (split-K fills up to it)
    n_k,  # the similarity GEMM's K chunks over D (cdiv(D, BK)): no part of D is left empty
    SIM_BM: tl.constexpr, SIM_BN: tl.constexpr, SIM_SPLITS: tl.constexpr, ROWS_BM: tl.constexpr,
    COEF_BM: tl.constexpr, COEF_BN: tl.constexpr, PAIR_BM: tl.constexpr, GRAD_HEAD: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """The workspace plan and the work lists of the persistent kernels, in one program:
    an image is stored when its block S (|P| rows of ld) fits its slot; its similarity
    GEMM splits D into as many parts (at most SIM_SPLITS) as reach `sim_target` items
    and whose partial blocks all fit the slot, with no part of D left empty. Item counts per image (0 where t1 is
    undefined or the image is not stored): kind 0 the similarity tiles x splits, kind 1
    the row blocks of the row pass, kind 2 the tiles of the coefficient pass; then for
    the bounded images, kind 3 the row blocks of the bounded forward (where t1 is
    defined) and kind 4 the images themselves (1 each); for the stored backward's grouped
    kernel, kind 5 the stored images (1 each) and kind 6 those with |P| > GRAD_HEAD (the
    head kernel, where it runs, takes the others). The prefix sums run over the
    batch in blocks of BLOCK_B (a cumsum each, no loop over images)."""
    carry_sim = tl.zeros([], dtype=tl.int32)
    carry_rows = tl.zeros([], dtype=tl.int32)
    carry_coef = tl.zeros([], dtype=tl.int32)
    carry_pair = tl.zeros([], dtype=tl.int32)
    carry_bnd = tl.zeros([], dtype=tl.int32)
    carry_st = tl.zeros([], dtype=tl.int32)
    carry_big = tl.zeros([], dtype=tl.int32)
    for kind in tl.static_range(7):
        tl.store(sched_ptr + kind * (B + 1), carry_sim)
    for b0 in range(0, B, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        bm = bs < B
        n_p = tl.load(counts_ptr + bs * 3, mask=bm, other=0)
        n_n = tl.load(counts_ptr + bs * 3 + 1, mask=bm, other=0)
        n_used = n_p + n_n
        t1_ok = (n_p >= 2) & (n_n >= 1)
        size = tl.where(t1_ok, n_p.to(tl.int64) * _ws_ld(n_used), 0)
        stored = (size <= slot) & (slot > 0)
        work = t1_ok & stored & bm
        tiles = tl.cdiv(n_p, SIM_BM) * tl.cdiv(n_used, SIM_BN)
        splits = tl.minimum(tl.maximum(tl.cdiv(sim_target, tl.maximum(tiles, 1)), 1), SIM_SPLITS)
        splits = tl.maximum(tl.minimum(splits, (slot // tl.maximum(size, 1)).to(tl.int32)), 1)
        # as many parts as the chunks split into with none empty: each part takes cdiv(n_k, splits) chunks
        splits = tl.minimum(splits, n_k)
        splits = tl.cdiv(n_k, tl.cdiv(n_k, splits))
        tl.store(plan_ptr + bs * 3, bs.to(tl.int64) * slot, mask=bm)
        tl.store(plan_ptr + bs * 3 + 1, stored.to(tl.int64), mask=bm)
        tl.store(plan_ptr + bs * 3 + 2, splits.to(tl.int64), mask=bm)
        n_sim = tl.where(work, tiles * splits, 0)
        n_rows = tl.where(work, tl.cdiv(n_p, ROWS_BM), 0)
        n_coef = tl.where(work, tl.cdiv(n_p, COEF_BM) * tl.cdiv(n_used, COEF_BN), 0)
        tl.store(sched_ptr + 1 + bs, carry_sim + tl.cumsum(n_sim, 0), mask=bm)
        tl.store(sched_ptr + (B + 1) + 1 + bs, carry_rows + tl.cumsum(n_rows, 0), mask=bm)
        tl.store(sched_ptr + 2 * (B + 1) + 1 + bs, carry_coef + tl.cumsum(n_coef, 0), mask=bm)
        bounded = (~stored) & bm
        n_pair = tl.where(bounded & t1_ok, tl.cdiv(n_p, PAIR_BM), 0)
        n_bnd = bounded.to(tl.int32)
        tl.store(sched_ptr + 3 * (B + 1) + 1 + bs, carry_pair + tl.cumsum(n_pair, 0), mask=bm)
        tl.store(sched_ptr + 4 * (B + 1) + 1 + bs, carry_bnd + tl.cumsum(n_bnd, 0), mask=bm)
        carry_sim += tl.sum(n_sim, 0)
        carry_rows += tl.sum(n_rows, 0)
        carry_coef += tl.sum(n_coef, 0)
        carry_pair += tl.sum(n_pair, 0)
        carry_bnd += tl.sum(n_bnd, 0)
        n_st = (stored & bm).to(tl.int32)
        n_big = (stored & bm & (n_p > GRAD_HEAD)).to(tl.int32)
        tl.store(sched_ptr + 5 * (B + 1) + 1 + bs, carry_st + tl.cumsum(n_st, 0), mask=bm)
        tl.store(sched_ptr + 6 * (B + 1) + 1 + bs, carry_big + tl.cumsum(n_big, 0), mask=bm)
        carry_st += tl.sum(n_st, 0)
        carry_big += tl.sum(n_big, 0)


@triton.jit
def _ncl_anchor_fwd_kernel(
    sa_ptr, counts_ptr,
    terms_ptr,  # (B, 3) fp32 out: t1, t2, t3
    lsea_ptr, wa_ptr,  # (B, 2) fp32 out: lam+-, W+- (0 where undefined)
    part_s_ptr, part_b_ptr,  # (B, n_s), (B, n_b) fp32: the row blocks' sums of t1 (both paths)
    plan_ptr,
    L, n_s, n_b,
    ROWS_BM: tl.constexpr, PAIR_BM: tl.constexpr, BLOCK: tl.constexpr,
):
    """t2 (program 0 of an image) and t3 (program 1); program 0 also closes t1 from the
    row blocks' sums, in a fixed order: the stored path's blocks that ran (the row pass
    runs only the |P| / ROWS_BM blocks of stored images where t1 is defined), and the
    |P| / PAIR_BM blocks of the bounded path (n_b = 0 when it was not launched)."""
    b = tl.program_id(0).to(tl.int64)
    which = tl.program_id(1)  # 0: a+ (positives P, negatives N); 1: a- (positives N, negatives P)
    if which == 0:
        t1 = tl.zeros([BLOCK], dtype=tl.float32)
        n_p1 = tl.load(counts_ptr + b * 3)
        t1_ok = (n_p1 >= 2) & (tl.load(counts_ptr + b * 3 + 1) >= 1)
        n_s_b = tl.where(t1_ok & (_is_stored(plan_ptr, b) != 0), tl.cdiv(n_p1, ROWS_BM), 0)
        for i0 in range(0, n_s_b, BLOCK):
            offs = i0 + tl.arange(0, BLOCK)
            t1 += tl.load(part_s_ptr + b * n_s + offs, mask=offs < n_s_b, other=0.0)
        n_b_b = tl.where(t1_ok & (_is_stored(plan_ptr, b) == 0) & (n_b > 0), tl.cdiv(n_p1, PAIR_BM), 0)
        for i0 in range(0, n_b_b, BLOCK):
            offs = i0 + tl.arange(0, BLOCK)
            t1 += tl.load(part_b_ptr + b * n_b + offs, mask=offs < n_b_b, other=0.0)
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
def _ncl_anchor_bwd_kernel(
    feat_ptr,
    part_ptr,  # (B, RS, 2, D) fp32 out: sum over the split's patches of c_x hat f_x, per anchor
    dots_ptr,  # (B, RS, 2) fp32 out: sum over the split's patches of c_x s(a, x), per anchor
    perm_ptr, counts_ptr, nrm_ptr, sa_ptr, lsea_ptr, wa_ptr, gout_ptr, plan_ptr,
    stride_fb, stride_fc, stride_fy, stride_fx,
    L, Q, C, P_: tl.constexpr, D, n_td, rows_per_split, eps,
    RS: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_D: tl.constexpr, CHANNELS_LAST: tl.constexpr, IDX64: tl.constexpr,
    SKIP_STORED: tl.constexpr,
):
    """Both anchors' gradients, first half, for the bounded path's images (the stored
    path's backward forms these sums itself, `_anchor_parts`): one chunk of D and one
    split of the patch list per program (every feature read once for both anchors). With
    SKIP_STORED, a stored image's splits are zeros."""
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
    if SKIP_STORED:
        t23_ok = t23_ok & (_is_stored(plan_ptr, b) == 0)
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
    part_ptr, dots_ptr,  # the bounded path's sums (`_ncl_anchor_bwd_kernel`), (B, RS, 2, D) and (B, RS, 2)
    spart_ptr, sdots_ptr,  # the stored path's, per row tile of its backward, (B, n_tx, 2, D) and (B, n_tx, 2)
    counts_ptr, plan_ptr, apos_ptr, aneg_ptr, nrma_ptr,
    gpos_ptr, gneg_ptr,  # (B, D) contiguous out: gradients of a+, a-
    stride_ab, stride_ad, stride_nb, stride_nd,
    D, n_tx, inv_tau, eps,
    RS: tl.constexpr, BX: tl.constexpr, STORED: tl.constexpr, BOUNDED: tl.constexpr, BLOCK: tl.constexpr,
    IDX64: tl.constexpr,
):
    """Both anchors' gradients, second half: the sums of the paths that ran (the bounded
    splits, zeros for stored images; the stored backward's row tiles that hold listed
    patches, of stored images) in a fixed order, then through each anchor's normalization."""
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
    if BOUNDED:
        for rs in range(RS):
            base = part_ptr + ((b * RS + rs) * 2) * D
            acc_p += tl.load(base + kd, mask=kdmask, other=0.0)
            acc_n += tl.load(base + D + kd, mask=kdmask, other=0.0)
            dot_p += tl.load(dots_ptr + (b * RS + rs) * 2)
            dot_n += tl.load(dots_ptr + (b * RS + rs) * 2 + 1)
    if STORED:
        n_used = tl.load(counts_ptr + b * 3) + tl.load(counts_ptr + b * 3 + 1)
        n_t = tl.where(_is_stored(plan_ptr, b) != 0, tl.cdiv(n_used, BX), 0)
        for tx in range(0, n_t):
            base = spart_ptr + ((b * n_tx + tx) * 2) * D
            acc_p += tl.load(base + kd, mask=kdmask, other=0.0)
            acc_n += tl.load(base + D + kd, mask=kdmask, other=0.0)
            dot_p += tl.load(sdots_ptr + (b * n_tx + tx) * 2)
            dot_n += tl.load(sdots_ptr + (b * n_tx + tx) * 2 + 1)
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
