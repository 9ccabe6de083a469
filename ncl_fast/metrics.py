"""Pixel- and image-level metrics, with IMDL-BenCo's definitions (ECOSYSTEM.md).

Per image, with `P = 1[p > 0.5]` (strictly greater), mask `m`, valid pixels `S`:
  F1 = 2 prec rec / (prec + rec + 1e-8), prec = TP / (TP + FP + 1e-8), rec = TP / (TP + FN + 1e-8)
  IoU = I / (sum(P S) + sum(m S) - I + 1e-8), I = TP
  AUC over the valid pixels, tie-correct (average ranks: ties count 1/2, as
  scikit-learn); an image with an empty mask scores 0. An image whose valid
  pixels are all tampered has no AUC (one class only): it is left out of the AUC
  means and counted under `pixel-level AUC (undefined, dropped)`.
Where IMDL-BenCo's own AUC differs: 0.1.45 walks an unstable sort without grouping
ties, so its value depends on the order of tied scores (this one does not), and
gives NaN for the undefined images (which this one drops, as imdlbenco13 does).

Dataset values (`protocol`):
* `ncl_fast` and `benco` (IMDL-BenCo 0.1.45): means over images, authentic
  images included (they score 0);
* `benco13` (imdlbenco13): pixel F1, AUC and IOU averaged over tampered images
  only (0 when there are none), as its evaluators do.
A figure that is undefined for a set (image-level AUC without authentic images,
tampered-only means without tampered images) is None, with the reason under
`undefined`: never NaN, which JSON cannot hold.
Also reported, under distinct names: the means over tampered images only, and a
dataset-level F1 from TP, FP, FN summed over all pixels. Image level: score =
max of the prediction over valid pixels, label = any tampered pixel (or the
label the dataset gives: IMDL-BenCo's protocols label an image by its raw mask),
F1 at 0.5 and AUC over images.

AUC is rank based (Mann-Whitney U with average ranks for ties) in torch, so it
runs on the GPU over full-resolution images; the tests check it against
scikit-learn's `roc_auc_score` and IMDL-BenCo's own evaluators.
"""
from __future__ import annotations

import math

import torch

EPS = 1e-8
NAMES = ("pixel-level F1", "pixel-level AUC", "pixel-level IOU", "image-level F1", "image-level AUC")
PROTOCOLS = ("ncl_fast", "benco", "benco13")


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC of `scores` for binary `labels` (ties count 1/2); nan with one class only."""
    scores = scores.reshape(-1).double()
    labels = labels.reshape(-1).bool()
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    # average rank (1-based) of each group of tied scores
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg_rank = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(scores)
    ranks[order] = avg_rank[inverse]
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return (u / (n_pos * n_neg)).item()


def image_metrics(pred: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor | None = None,
                  label: bool | None = None) -> dict:
    """Metrics of one image: `pred` (H, W) in [0, 1], `mask` (H, W) binary, `valid` (H, W) or None;
    `label`: the image's label when the dataset gives one (default: any tampered valid pixel).
    `auc` is None when undefined (every valid pixel tampered)."""
    pred = pred.reshape(pred.shape[-2:]).float()
    m = mask.reshape(pred.shape).bool()
    s = torch.ones_like(m) if valid is None else valid.reshape(pred.shape).bool()
    P = (pred > 0.5) & s
    ms = m & s
    tp = (P & ms).sum().item()
    fp = (P & ~m).sum().item()
    fn = (~P & ms).sum().item()
    prec = tp / (tp + fp + EPS)
    rec = tp / (tp + fn + EPS)
    f1 = 2 * prec * rec / (prec + rec + EPS)
    iou = tp / (P.sum().item() + ms.sum().item() - tp + EPS)
    tampered = bool(ms.any())
    a = auc(pred[s], m[s]) if tampered else 0.0
    if math.isnan(a):  # every valid pixel tampered: one class only
        a = None
    score = pred[s].max().item() if s.any() else 0.0
    return {"f1": f1, "iou": iou, "auc": a, "tp": tp, "fp": fp, "fn": fn, "tampered": tampered, "score": score,
            "label": tampered if label is None else bool(label), "n_mask": int(ms.sum()), "n_valid": int(s.sum())}


def summarize(per_image: list[dict], protocol: str = "ncl_fast") -> dict:
    """Dataset values from the per-image dicts of `image_metrics`, averaged as `protocol` does
    (one of PROTOCOLS; see the module's docstring)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    n = len(per_image)
    if n == 0:
        raise ValueError("no images to summarize")

    def mean(key, rows):
        values = [r[key] for r in rows if r[key] is not None]  # undefined AUCs dropped
        return sum(values) / len(values) if values else float("nan")

    tampered = [r for r in per_image if r["tampered"]]
    tp = sum(r["tp"] for r in per_image)
    fp = sum(r["fp"] for r in per_image)
    fn = sum(r["fn"] for r in per_image)
    prec, rec = tp / (tp + fp + EPS), tp / (tp + fn + EPS)
    labels = torch.tensor([r.get("label", r["tampered"]) for r in per_image])
    scores = torch.tensor([r["score"] for r in per_image])
    pred_lab = scores > 0.5
    itp = (pred_lab & labels).sum().item()
    ifp = (pred_lab & ~labels).sum().item()
    ifn = (~pred_lab & labels).sum().item()
    iprec, irec = itp / (itp + ifp + EPS), itp / (itp + ifn + EPS)
    headline = tampered if protocol == "benco13" else per_image

    def pixel(key):
        value = mean(key, headline)
        # imdlbenco13 scores 0 where it has nothing to average (no tampered image, or no defined AUC)
        return 0.0 if protocol == "benco13" and math.isnan(value) else value

    out = {
        "pixel-level F1": pixel("f1"),
        "pixel-level AUC": pixel("auc"),
        "pixel-level IOU": pixel("iou"),
        "image-level F1": 2 * iprec * irec / (iprec + irec + EPS),
        "image-level AUC": auc(scores, labels),
        "pixel-level F1 (tampered only)": mean("f1", tampered),
        "pixel-level AUC (tampered only)": mean("auc", tampered),
        "pixel-level IOU (tampered only)": mean("iou", tampered),
        "pixel-level AUC (undefined, dropped)": sum(r["auc"] is None for r in per_image),
        "pixel-level F1 (dataset-level)": 2 * prec * rec / (prec + rec + EPS),
        # what predicting "tampered" everywhere would score (prec = |m| / |S|, rec = 1)
        "pixel-level F1 (all-tampered baseline)": sum(
            2 * (r["n_mask"] / (r["n_valid"] + EPS)) / (r["n_mask"] / (r["n_valid"] + EPS) + 1 + EPS)
            if r["n_mask"] else 0.0 for r in per_image) / n,
        "images": n,
        "tampered images": len(tampered),
    }
    notes = {}
    for key, value in out.items():
        if isinstance(value, float) and math.isnan(value):
            out[key] = None
            notes[key] = undefined_reason(key, n, len(tampered))
    if notes:
        out["undefined"] = notes
    return out


def undefined_reason(key: str, images: int, tampered: int) -> str:
    """Why a dataset figure has no value (it is reported as null / n/a, never NaN)."""
    if "tampered only" in key:
        return "the set has no tampered images"
    if key == "image-level AUC":
        if tampered == 0:
            return "the set has no tampered images (image-level AUC needs both kinds)"
        if tampered == images:
            return "the set has no authentic images (image-level AUC needs both kinds)"
    return "undefined for this set"
