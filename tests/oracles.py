"""Independent float64 oracles, written literally from SPEC.md with loops over the sets.

Nothing here imports ncl_fast: these are the definitions the implementations are
checked against, deliberately slow and obvious.
"""
from __future__ import annotations

import math

import torch


def patch_labels(mask: torch.Tensor, h: int, w: int, p: int, tol: float = 0.0) -> torch.Tensor:
    """SPEC section 2, one patch at a time."""
    B, _, H, W = mask.shape
    sy, sx = H // h, W // w
    R, Q = h // p, w // p
    out = torch.empty(B, R * Q, dtype=torch.uint8)
    m = mask.double() > 0.5 if mask.dtype != torch.bool else mask
    for b in range(B):
        for r in range(R):
            for c in range(Q):
                window = m[b, 0, r * p * sy : (r + 1) * p * sy, c * p * sx : (c + 1) * p * sx]
                frac = window.double().mean().item()
                if frac >= 1 - tol:
                    label = 1
                elif frac <= tol:
                    label = 0
                else:
                    label = 2
                out[b, r * Q + c] = label
    return out


def _patch_vector(F: torch.Tensor, b: int, l: int, Q: int, p: int) -> torch.Tensor:
    r, c = divmod(l, Q)
    return F[b, :, r * p : (r + 1) * p, c * p : (c + 1) * p].reshape(-1)  # channel, row, column


def _sim(u: torch.Tensor, v: torch.Tensor, tau: float) -> float:
    eps = 1e-12
    return (torch.dot(u, v) / (max(u.norm().item(), eps) * max(v.norm().item(), eps)) / tau).item()


def ncl_terms(F, labels, a_pos, a_neg, p: int, tau: float = 0.1) -> torch.Tensor:
    """SPEC section 5 in float64: `(B, 3)` per-image `[t1, t2, t3]`."""
    F = F.double()
    a_pos, a_neg = a_pos.double(), a_neg.double()
    B, _, h, w = F.shape
    Q = w // p
    out = torch.zeros(B, 3, dtype=torch.float64)
    for b in range(B):
        lab = labels[b].tolist()
        P = [l for l, v in enumerate(lab) if v == 1]
        N = [l for l, v in enumerate(lab) if v == 0]
        K = [l for l, v in enumerate(lab) if v == 2]
        f = {l: _patch_vector(F, b, l, Q, p) for l in P + N}
        if len(P) >= 2 and len(N) >= 1:
            total = 0.0
            for m in P:
                neg = sum(math.exp(_sim(f[m], f[i], tau)) for i in N)
                for j in P:
                    if j == m:
                        continue
                    s_mj = _sim(f[m], f[j], tau)
                    total += math.log(math.exp(s_mj) + neg) - s_mj
            out[b, 0] = total / (len(P) * (len(P) - 1))
        if len(P) >= 1 and len(N) >= 1 and len(K) >= 1:
            neg = sum(math.exp(_sim(a_pos[b], f[i], tau)) for i in N)
            total = 0.0
            for j in P:
                s = _sim(a_pos[b], f[j], tau)
                total += math.log(math.exp(s) + neg) - s
            out[b, 1] = total / len(P)
            pos = sum(math.exp(_sim(a_neg[b], f[j], tau)) for j in P)
            total = 0.0
            for i in N:
                s = _sim(a_neg[b], f[i], tau)
                total += math.log(math.exp(s) + pos) - s
            out[b, 2] = total / len(N)
    return out


def shrunk_mask(mask: torch.Tensor, ho: int, wo: int) -> torch.Tensor:
    """`G = 1[avgpool_s(M) >= 0.5]`, one output pixel at a time (bool `(B, ho, wo)`)."""
    B, _, H, W = mask.shape
    sy, sx = H // ho, W // wo
    m = mask.double() > 0.5 if mask.dtype != torch.bool else mask
    G = torch.zeros(B, ho, wo, dtype=torch.bool)
    for b in range(B):
        for y in range(ho):
            for x in range(wo):
                G[b, y, x] = m[b, 0, y * sy : (y + 1) * sy, x * sx : (x + 1) * sx].double().mean().item() >= 0.5
    return G


def contour_band(G: torch.Tensor, r: int) -> torch.Tensor:
    """`E = 1[max != min]` over the in-image part of the (2r+1)^2 window."""
    B, ho, wo = G.shape
    E = torch.zeros_like(G)
    for b in range(B):
        for y in range(ho):
            for x in range(wo):
                window = G[b, max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1]
                E[b, y, x] = bool(window.max() != window.min())
    return E


def pc_bce(Z: torch.Tensor, mask: torch.Tensor, mu: float = 0.9, r: int = 2) -> float:
    """SPEC section 6 in float64, as a Python float."""
    B, _, ho, wo = Z.shape
    G = shrunk_mask(mask, ho, wo)
    E = contour_band(G, r)
    band_sum, band_n, total = 0.0, 0, 0.0
    for b in range(B):
        for y in range(ho):
            for x in range(wo):
                z = float(Z[b, 0, y, x])
                g = 1.0 if G[b, y, x] else 0.0
                l = max(z, 0.0) - z * g + math.log(1.0 + math.exp(-abs(z)))
                total += l
                if E[b, y, x]:
                    band_sum += l
                    band_n += 1
    band_term = band_sum / band_n if band_n else 0.0
    return mu * band_term + (1 - mu) * total / (B * ho * wo)
