"""A count of the work each NCL launch executes, against the floor, from the
patch counts alone (no GPU): programs launched and programs that do work, the
`tl.dot` multiply-adds as the tiles execute them (padding included), and the
bytes each launch moves between memory (or L2) and the multiprocessors.

The floor (issue "second design"): one pass over each image's |P| x (|P| + |N|)
similarities forward (D multiply-adds each) and two backward. tf32x3 (the fp32
default) runs three tensor-core products per multiply-add counted here.

`tests/ops/test_work_model.py` checks the programs and the multiply-adds against an
interpreter run of the real kernels at a small shape; `bench/kernel_report.py`
prints the table at the paper's shapes.
"""
from __future__ import annotations

from dataclasses import dataclass


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def ws_ld(p: int, n: int) -> int:
    """Row stride of an image's block in the workspace: |P| + |N| padded to 16 bytes."""
    from ncl_fast.kernels import ncl_terms as k

    align = k.WS_ALIGN.value  # a tl.constexpr
    return cdiv(p + n, align) * align


@dataclass
class Launch:
    kernel: str
    programs: int  # launched
    working: int  # that get past their early exits and do the kernel's work
    dot_macs: int  # multiply-adds of the tl.dot tiles they execute
    bytes: int  # features, similarities and gradients moved (approximate: tiles as loaded)
    dot_programs: int = 0  # working programs that execute at least one tl.dot


def ncl_work(counts: list[tuple[int, int, int]], L: int, D: int, esize: int, stored: list[bool] | None = None,
             fp32: bool = False) -> list[Launch]:
    """Every launch of one NCL forward + backward. `counts[b] = (|P|, |N|, |K|)`;
    `stored[b]`: the image's block is in the workspace (default: all)."""
    from ncl_fast.kernels import ncl_terms as k

    B = len(counts)
    stored = stored if stored is not None else [True] * B
    t1 = [p >= 2 and n >= 1 for p, n, _ in counts]
    out = []
    # forward
    stats_working = sum(max(1, cdiv(p + n, k.STATS_BX)) for p, n, _ in counts)
    out.append(Launch("_ncl_stats_fwd_kernel", B * cdiv(L, k.STATS_BX), stats_working, 0,
                      sum((p + n) * D * esize for p, n, _ in counts) + stats_working * 2 * D * esize))
    sim_progs = B * cdiv(L, k.SIM_BM) * cdiv(L, k.SIM_BN)
    sim_working = sum(cdiv(p, k.SIM_BM) * cdiv(p + n, k.SIM_BN)
                      for (p, n, _), s, ok in zip(counts, stored, t1) if s and ok)
    bk = k.SIM_BK_F32 if fp32 else k.SIM_BK_HALF
    sim_tile_macs = k.SIM_BM * k.SIM_BN * cdiv(D, bk) * bk
    out.append(Launch("_ncl_sim_kernel", sim_progs, sim_working, sim_working * sim_tile_macs,
                      sim_working * (k.SIM_BM + k.SIM_BN) * D * esize  # S written, rows padded
                      + sum(4 * p * ws_ld(p, n) for (p, n, _), s, ok in zip(counts, stored, t1) if s and ok),
                      sim_working))
    rows_working = sum(cdiv(p, k.ROWS_BM) for (p, n, _), s, ok in zip(counts, stored, t1) if s and ok)
    out.append(Launch("_ncl_rows_kernel", B * cdiv(L, k.ROWS_BM), rows_working, 0,
                      sum(4 * p * (p + n) + 4 * p * p for (p, n, _), s, ok in zip(counts, stored, t1) if s and ok)))
    bkb = k.BLOCK_K_F32_BOUNDED if fp32 else k.BLOCK_K
    pf_working, pf_macs = 0, 0
    for (p, n, _), s, ok in zip(counts, stored, t1):
        if s or not ok:
            continue
        tiles = cdiv(p, k.BLOCK_M)
        pf_working += tiles
        # pass 1 over the N columns, pass 2 over the P columns, each tile over the whole D
        pf_macs += tiles * (cdiv(n, k.BLOCK_N) + cdiv(p, k.BLOCK_N)) * k.BLOCK_M * k.BLOCK_N * cdiv(D, bkb) * bkb
    out.append(Launch("_ncl_pair_fwd_kernel", B * cdiv(L, k.BLOCK_M), pf_working, pf_macs,
                      pf_macs // max(1, k.BLOCK_M * k.BLOCK_N) * (k.BLOCK_M + k.BLOCK_N) * esize, pf_working))
    out.append(Launch("_ncl_anchor_fwd_kernel", 2 * B, 2 * B, 0, sum(2 * 4 * (p + n) for p, n, _ in counts)))
    # backward
    n_td = cdiv(D, k.GRAD_BD)
    g_progs = B * cdiv(L, k.GRAD_BX) * n_td
    g_working, g_macs, g_bytes, g_dot = 0, 0, 0, 0
    by = k.GRAD_BY_F32 if fp32 else k.GRAD_BY  # partners per step
    for (p, n, _), s, ok in zip(counts, stored, t1):
        if not s:
            continue
        tiles = cdiv(L, k.GRAD_BX)
        g_working += tiles * n_td  # every tile writes its rows (contour rows get zeros)
        if ok:
            g_dot += cdiv(p + n, k.GRAD_BX) * n_td
            a_rows = cdiv(p, k.GRAD_BX) * k.GRAD_BX  # part 1: tampered row tiles x (P + N)
            a_cols = cdiv(p + n, by) * by
            b_rows = cdiv(p + n, k.GRAD_BX) * k.GRAD_BX  # part 2: every used tile x P
            b_cols = cdiv(p, by) * by
            g_macs += n_td * k.GRAD_BD * (a_rows * a_cols + b_rows * b_cols)
            g_bytes += n_td * (4 * (a_rows * a_cols + b_rows * b_cols) + k.GRAD_BD * esize * (
                cdiv(p, k.GRAD_BX) * a_cols + cdiv(p + n, k.GRAD_BX) * b_cols))
        g_bytes += L * D * esize + (p + n) * D * esize  # the gradient written, f_x read
    out.append(Launch("_ncl_grad_kernel", g_progs, g_working, g_macs, g_bytes, g_dot))
    bd = k.BLOCK_D_F32_BOUNDED if fp32 else k.BLOCK_D
    nb_td = cdiv(D, bd)
    pb_working, pb_macs, pb_bytes, pb_dot = 0, 0, 0, 0
    bkw = k.BLOCK_K_F32_BOUNDED if fp32 else k.BLOCK_K
    for (p, n, _), s, ok in zip(counts, stored, t1):
        if s:
            continue
        tiles = cdiv(L, k.BLOCK_M)
        pb_working += tiles * nb_td
        pb_bytes += L * D * esize
        if ok:
            pb_dot += cdiv(p + n, k.BLOCK_M) * nb_td
            for t in range(cdiv(p + n, k.BLOCK_M)):
                y_end = p + n if t * k.BLOCK_M < p else p
                steps = cdiv(y_end, k.BLOCK_N)
                # each step: a similarity tile over the whole D, then T @ F on the chunk
                pb_macs += nb_td * steps * k.BLOCK_M * k.BLOCK_N * (cdiv(D, bkw) * bkw + bd)
                pb_bytes += nb_td * steps * (k.BLOCK_M + k.BLOCK_N) * D * esize
    out.append(Launch("_ncl_pair_bwd_kernel", B * cdiv(L, k.BLOCK_M) * nb_td, pb_working, pb_macs, pb_bytes,
                      pb_dot))
    ab_td = cdiv(D, k.BLOCK_D)
    per_split = cdiv(cdiv(L, k.ANCHOR_SPLITS), k.BLOCK_M) * k.BLOCK_M
    ab_working = sum(ab_td * min(k.ANCHOR_SPLITS, cdiv(p + n, per_split)) for p, n, c in counts if p and n and c)
    out.append(Launch("_ncl_anchor_bwd_kernel", B * ab_td * k.ANCHOR_SPLITS, ab_working, 0,
                      sum((p + n) * D * esize for p, n, c in counts if p and n and c)
                      + B * k.ANCHOR_SPLITS * 2 * D * 4))
    out.append(Launch("_ncl_anchor_grad_kernel", B * cdiv(D, 1024), B * cdiv(D, 1024), 0,
                      B * k.ANCHOR_SPLITS * 2 * D * 4 + 4 * B * D * esize))
    return out


def floor_macs(counts: list[tuple[int, int, int]], D: int) -> tuple[int, int]:
    """(forward, backward) multiply-adds of the floor: D |P| (|P| + |N|) per image with t1
    defined, once forward and twice backward."""
    fwd = sum(D * p * (p + n) for p, n, _ in counts if p >= 2 and n >= 1)
    return fwd, 2 * fwd


def report(counts, L, D, esize, fp32=False, sms: int = 132) -> str:
    """A markdown table of every launch, and the forward / backward ratios to the floor."""
    launches = ncl_work(counts, L, D, esize, fp32=fp32)
    fwd_floor, bwd_floor = floor_macs(counts, D)
    fwd_names = {"_ncl_stats_fwd_kernel", "_ncl_sim_kernel", "_ncl_rows_kernel", "_ncl_pair_fwd_kernel",
                 "_ncl_anchor_fwd_kernel"}
    lines = ["| launch | programs | working (per SM) | dot MACs (G) | MB moved |", "| --- | --- | --- | --- | --- |"]
    for x in launches:
        lines.append(f"| {x.kernel} | {x.programs} | {x.working} ({x.working / sms:.2f}) | {x.dot_macs / 1e9:.3f} | "
                     f"{x.bytes / 1e6:.1f} |")
    fwd = sum(x.dot_macs for x in launches if x.kernel in fwd_names)
    bwd = sum(x.dot_macs for x in launches if x.kernel not in fwd_names)
    lines.append(f"\nforward: {fwd / 1e9:.3f} G MACs executed / {fwd_floor / 1e9:.3f} G floor = "
                 f"{fwd / fwd_floor:.2f}x; backward: {bwd / 1e9:.3f} / {bwd_floor / 1e9:.3f} = {bwd / bwd_floor:.2f}x"
                 + ("; tf32x3 runs 3 tensor-core products per MAC" if fp32 else ""))
    return "\n".join(lines)
