"""The shared preamble of the NCL kernels (SPEC.md section 5): notation, the math of
the forward and backward, and the device helpers both algorithms use
(`ncl_stored.py`, `ncl_bounded.py`; the per-patch statistics and the anchors'
terms are `ncl_anchors.py`; the op that launches them is `ncl_terms.py`).

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

Layouts: features are indexed in an internal D order that follows memory:
(channel, row, column) for contiguous maps and (row, column, channel) for
channels_last maps; similarities do not depend on the order of D, and anchors
are read at the matching canonical index. Offsets within an image are int32, or
int64 where the image can span past 2^31 elements (`IDX64`, `_wide`).

Grids put the tiles on axis 0 (up to 2^31 - 1 programs) and the image on axis 1
(B <= 65535).
"""
from __future__ import annotations

import triton
import triton.language as tl

EPS = 1e-12  # the F.normalize clamp of SPEC section 3
# Warps of the small kernels (statistics, anchors, bounded forward).
NUM_WARPS = 4
# Row stride of the workspace blocks, in fp32 values: rows (and blocks) start 16-byte
# aligned, so that the backward's tiles of S load as 128-bit vectors.
WS_ALIGN: tl.constexpr = tl.constexpr(4)
# Columns of the plan (B, PLAN_COLS) int64: slot offset, stored, splits of the similarity GEMM.
PLAN_COLS: tl.constexpr = tl.constexpr(3)


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
    # the exp capped at e^80 (finite in fp32): below z = -80 the value is ~1e-35 instead of
    # smaller (an exp of -z past 88 would overflow to inf)
    return 1.0 / (1.0 + tl.exp(tl.minimum(-z, 80.0)))


@triton.jit
def _ws_ld(n_used):
    """Row stride of an image's block S in the workspace: |P| + |N| rounded up to a
    multiple of WS_ALIGN fp32 (16-byte rows). Every block is |P| rows of it, so every
    block starts 16-byte aligned too (the plan's offsets are sums of block sizes)."""
    return tl.multiple_of((n_used + (WS_ALIGN - 1)) // WS_ALIGN * WS_ALIGN, WS_ALIGN)


@triton.jit
def _ws_block(ws_ptr, plan_ptr, b):
    """The image's block in the workspace; its offset is a multiple of WS_ALIGN, which
    the alignment analysis is told (with a 16-byte aligned `ws_ptr`: 128-bit accesses)."""
    return ws_ptr + tl.multiple_of(tl.load(plan_ptr + b * PLAN_COLS), WS_ALIGN)


@triton.jit
def _ws_zero_tail(ws_ptr, b, lo, slot, part, parts, last, ZB: tl.constexpr):
    """Zeros image b's slot of the workspace from `lo` (where its blocks end: the
    similarity GEMM writes every value before it, padding columns included) to the
    slot's end, program `part` of `parts` taking every parts-th run of ZB values; `last`
    (the batch's last image) also zeros the workspace's one value where the slot is
    empty. Keeps the workspace, an output of the op, defined without a memset of it all."""
    # offsets within the slot in the slot's own integer type; slot and lo are multiples of
    # WS_ALIGN, which the hints tell the alignment analysis (128-bit stores where the slot
    # is specialized as a multiple of 16, as at every L that is a multiple of 4)
    ws_b = ws_ptr + b * slot
    lo = tl.multiple_of(lo.to(slot.dtype), WS_ALIGN)
    for z0 in range(lo + part * ZB, slot, parts * ZB):
        z = tl.multiple_of(z0, WS_ALIGN) + tl.arange(0, ZB)
        tl.store(ws_b + z, tl.zeros([ZB], dtype=tl.float32), mask=z < slot)
    if last & (slot == 0) & (part == 0):
        tl.store(ws_ptr, 0.0)


@triton.jit
def _is_stored(plan_ptr, b):
    """1 when the image's block S is stored (the stored path runs it), else 0 (bounded)."""
    return tl.load(plan_ptr + b * PLAN_COLS + 1)


@triton.jit
def _sim_splits(plan_ptr, b):
    """The parts of D the image's similarity GEMM is split into (the plan's choice)."""
    return tl.load(plan_ptr + b * PLAN_COLS + 2).to(tl.int32)


@triton.jit
def _find_image(starts_ptr, t, B, LOG_B: tl.constexpr):
    """The image whose work items hold item t of a persistent launch: the largest b with
    starts[b] <= t (starts: B + 1 ascending prefix sums of the images' item counts, t <
    starts[B]). A binary search: LOG_B = ceil(log2(B)) scalar loads, not a loop over B."""
    lo = tl.zeros([], dtype=tl.int32)
    hi = lo + B
    for _ in tl.static_range(LOG_B):
        mid = (lo + hi) // 2
        go = tl.load(starts_ptr + mid) <= t
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    return lo


@triton.jit
def _sim_tile(
    feat_b, poff_x, xmask, rn_x, poff_y, ymask, rn_y,
    C, P_, D, stride_c, stride_y, stride_x, inv_tau, k_lo, k_hi,
    BX: tl.constexpr, BY: tl.constexpr, BK: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """[BX, BY] similarities s_xy = <f_x, f_y> / (|f_x| |f_y|) / tau, over D in BK chunks
    (or their share over the values [k_lo, k_hi) of D: one part of a split K loop)."""
    acc = tl.zeros([BX, BY], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        acc, _, _, _ = _dot_step(feat_b, poff_x, xmask, poff_y, ymask, k0, acc, C, P_, D, stride_c, stride_y,
                                 stride_x, BK, CHANNELS_LAST, UPCAST, PRECISION)
    return acc * (rn_x * inv_tau)[:, None] * rn_y[None, :]


@triton.jit
def _dot_step(
    feat_b, poff_x, xmask, poff_y, ymask, k0, acc,
    C, P_, D, stride_c, stride_y, stride_x,
    BK: tl.constexpr, CHANNELS_LAST: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One K chunk [k0, k0 + BK) of a similarity GEMM: acc + <f_x, f_y> over the chunk.
    Returns the new acc, the f_y tile as loaded, the chunk's canonical indices of D and
    its mask (for what a caller forms from the same tile)."""
    k = k0 + tl.arange(0, BK)
    kmask = k < D
    d_off, canon = _d_offsets(k, C, P_, stride_c, stride_y, stride_x, CHANNELS_LAST)
    a = tl.load(feat_b + poff_x[:, None] + d_off[None, :], mask=xmask[:, None] & kmask[None, :], other=0.0)
    b = tl.load(feat_b + poff_y[:, None] + d_off[None, :], mask=ymask[:, None] & kmask[None, :], other=0.0)
    if UPCAST:  # fp32 inputs: fp32 operands at PRECISION
        acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision=PRECISION)
    else:  # bf16/fp16 products are exact in the fp32 accumulator
        acc = tl.dot(a, tl.trans(b), acc)
    return acc, b, canon, kmask


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
    """dL/ds(a, x) for the anchor a+ (IS_POS) or a-: see the module docstring. The exp's
    argument is <= 0 on the lanes each branch keeps (s <= lse there); the cap keeps the
    discarded lanes finite at small tau."""
    if IS_POS:  # positives P, negatives N
        return tl.where(x_is_p, -k2or3 * _sigmoid(lse - s), k2or3 * w * tl.exp(tl.minimum(s - lse, 80.0)))
    else:  # positives N, negatives P
        return tl.where(x_is_p, k2or3 * w * tl.exp(tl.minimum(s - lse, 80.0)), -k2or3 * _sigmoid(lse - s))


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
def _anchor_parts(part_ptr, dots_ptr, b, tx, n_tx, first_chunk, rows, xmask, c_pos, c_neg, nrm_x, fx, canon, kdmask,
                  sa_ptr, L, D, eps, PRECISION: tl.constexpr):
    """The anchors' gradients' share of a tile of patches x on a chunk of D, from the
    features the tile already holds: sum_x c+-_x hat f_x into part (B, n_tx, 2, D), and
    on the first chunk sum_x c+-_x s(a+-, x) into dots (B, n_tx, 2) (c = 0 past the list).
    The sums over x run on the tensor cores, as a [16, x] @ [x, D] product whose rows 0
    and 1 hold the coefficients (a reduction across the tile's rows held registers), in
    fx's own type: fp32 (at PRECISION), or a half type for both operands."""
    rn_x = 1.0 / tl.maximum(nrm_x, eps)
    sel = tl.arange(0, 16)[:, None]
    coef = tl.where(sel == 0, (c_pos * rn_x)[None, :], tl.where(sel == 1, (c_neg * rn_x)[None, :], 0.0))
    if fx.dtype == tl.float32:
        sums = tl.dot(coef, fx, input_precision=PRECISION)
    else:  # half features (bf16: the coefficients keep the fp32 range), fp32 accumulation
        sums = tl.dot(coef.to(fx.dtype), fx)
    out = part_ptr + ((b * n_tx + tx) * 2) * D
    tl.store(out + sel * D + canon[None, :], sums, mask=(sel < 2) & kdmask[None, :])
    if first_chunk:
        s_pos = tl.load(sa_ptr + b * 2 * L + rows, mask=xmask, other=0.0)
        s_neg = tl.load(sa_ptr + b * 2 * L + L + rows, mask=xmask, other=0.0)
        tl.store(dots_ptr + (b * n_tx + tx) * 2, tl.sum(c_pos * s_pos, axis=0))
        tl.store(dots_ptr + (b * n_tx + tx) * 2 + 1, tl.sum(c_neg * s_neg, axis=0))


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
