"""Metrics against independent implementations: scikit-learn's roc_auc_score and F1
/ IoU counted by hand from ECOSYSTEM.md's definitions."""
import pytest
import torch
from sklearn.metrics import roc_auc_score

from ncl_fast import metrics


def hand_f1_iou(pred, mask, valid):
    P = [p > 0.5 for p in pred]
    tp = sum(1 for p, m, s in zip(P, mask, valid) if p and m and s)
    fp = sum(1 for p, m, s in zip(P, mask, valid) if p and not m and s)
    fn = sum(1 for p, m, s in zip(P, mask, valid) if not p and m and s)
    prec, rec = tp / (tp + fp + 1e-8), tp / (tp + fn + 1e-8)
    f1 = 2 * prec * rec / (prec + rec + 1e-8)
    n_p = sum(1 for p, s in zip(P, valid) if p and s)
    n_m = sum(1 for m, s in zip(mask, valid) if m and s)
    return f1, tp / (n_p + n_m - tp + 1e-8)


def test_auc_matches_sklearn_on_untied_scores(gen):
    for _ in range(5):
        n = int(torch.randint(20, 500, (1,), generator=gen))
        scores = torch.randperm(10 * n, generator=gen)[:n].double() / (10 * n)  # distinct values
        labels = torch.rand(n, generator=gen) < 0.3
        labels[0], labels[1] = True, False
        assert metrics.auc(scores, labels) == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12)


def test_auc_ties_count_half(gen):
    scores = torch.tensor([0.2, 0.2, 0.7, 0.7, 0.1])
    labels = torch.tensor([True, False, True, False, False])
    assert metrics.auc(scores, labels) == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()))


def test_image_metrics_by_hand(gen):
    for _ in range(5):
        h, w = 13, 17
        pred = torch.rand(h, w, generator=gen)
        pred[0, 0] = 0.5  # exactly 0.5 is not tampered (strictly greater)
        mask = torch.rand(h, w, generator=gen) < 0.3
        valid = torch.ones(h, w, dtype=torch.bool)
        valid[10:] = False  # padding
        r = metrics.image_metrics(pred, mask, valid)
        f1, iou = hand_f1_iou(pred.flatten().tolist(), mask.flatten().tolist(), valid.flatten().tolist())
        assert r["f1"] == pytest.approx(f1, abs=1e-12) and r["iou"] == pytest.approx(iou, abs=1e-12)
        want_auc = roc_auc_score(mask[valid].numpy(), pred[valid].numpy())
        assert r["auc"] == pytest.approx(want_auc, abs=1e-9)
        assert r["score"] == pytest.approx(pred[valid].max().item())


def test_empty_mask_scores_zero(gen):
    r = metrics.image_metrics(torch.rand(8, 8, generator=gen), torch.zeros(8, 8))
    assert r["f1"] == 0 and r["auc"] == 0 and not r["tampered"]


def test_summary(gen):
    rows = [
        metrics.image_metrics(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([[1, 0], [0, 1]])),  # perfect
        metrics.image_metrics(torch.tensor([[0.9, 0.1], [0.2, 0.3]]), torch.tensor([[1, 0], [0, 1]])),  # half
        metrics.image_metrics(torch.tensor([[0.2, 0.1], [0.2, 0.3]]), torch.zeros(2, 2)),  # authentic, clean
    ]
    s = metrics.summarize(rows)
    f1_half = 2 * 1.0 * 0.5 / 1.5
    assert s["pixel-level F1"] == pytest.approx((1 + f1_half + 0) / 3, abs=1e-6)
    assert s["pixel-level F1 (tampered only)"] == pytest.approx((1 + f1_half) / 2, abs=1e-6)
    # dataset level: TP 3, FP 0, FN 1
    assert s["pixel-level F1 (dataset-level)"] == pytest.approx(2 * 0.75 / 1.75, abs=1e-6)
    # image level: scores 0.9, 0.9, 0.3 for labels 1, 1, 0
    assert s["image-level F1"] == pytest.approx(1.0, abs=1e-6) and s["image-level AUC"] == 1.0
    assert s["images"] == 3 and s["tampered images"] == 2


def test_undefined_auc_is_dropped_and_counted(gen):
    """An image whose valid pixels are all tampered has no AUC: left out of the AUC means (not
    scored 0, not NaN) and counted; F1 and IOU keep it. imdlbenco13's averaging takes tampered
    images only."""
    from ncl_fast.engine.evaluation import markdown

    valid = torch.zeros(6, 6, dtype=torch.bool)
    valid[:3, :3] = True
    full = metrics.image_metrics(torch.rand(6, 6, generator=gen), valid.clone(), valid)  # every valid pixel tampered
    assert full["auc"] is None and full["tampered"] and full["f1"] > 0
    pred, mask = torch.rand(6, 6, generator=gen), torch.rand(6, 6, generator=gen) < 0.4
    mask[0, 0], mask[0, 1] = True, False
    part = metrics.image_metrics(pred, mask)
    auth = metrics.image_metrics(torch.rand(6, 6, generator=gen), torch.zeros(6, 6))
    want_auc = roc_auc_score(mask.flatten().numpy(), pred.flatten().numpy())
    s = metrics.summarize([full, part, auth])
    assert s["pixel-level AUC"] == pytest.approx((want_auc + 0) / 2, abs=1e-12)  # authentic scores 0
    assert s["pixel-level AUC (tampered only)"] == pytest.approx(want_auc, abs=1e-12)
    assert s["pixel-level AUC (undefined, dropped)"] == 1
    assert s["pixel-level F1"] == pytest.approx((full["f1"] + part["f1"] + 0) / 3, abs=1e-12)
    s13 = metrics.summarize([full, part, auth], "benco13")
    assert s13["pixel-level F1"] == pytest.approx((full["f1"] + part["f1"]) / 2, abs=1e-12)
    assert s13["pixel-level IOU"] == pytest.approx((full["iou"] + part["iou"]) / 2, abs=1e-12)
    assert s13["pixel-level AUC"] == pytest.approx(want_auc, abs=1e-12)
    assert metrics.summarize([auth], "benco13")["pixel-level F1"] == 0.0  # no tampered image: 0, as imdlbenco13
    assert "1 image(s) whose valid pixels are all tampered have no AUC" in markdown("set", {"clean": s})
    with pytest.raises(ValueError, match="protocol must be one of"):
        metrics.summarize([auth], "benco2")
