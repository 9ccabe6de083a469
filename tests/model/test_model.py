import pytest
import torch

from helpers import losses_over_steps, random_mask
from ncl_fast.model import DeepLabV3Plus, LossConfig, NCLModel, Pivot

STAGE_CHANNELS = {
    18: (64, 64, 128, 256, 512),
    34: (64, 64, 128, 256, 512),
    50: (64, 256, 512, 1024, 2048),
    101: (64, 256, 512, 1024, 2048),
}
STAGE_STRIDES = (2, 4, 8, 8, 8)


def split_mask(B: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Tampered left of a random column inside the second 16-px patch column, plus blobs
    on the right: every image has tampered, contour and authentic 16-px patches."""
    mask = random_mask(B, size, size, "blobs", gen)
    mask[..., : size // 2] = 0
    cut = int(torch.randint(17, 32, (1,), generator=gen))
    mask[..., :cut] = 1
    return mask


@pytest.mark.slow
@pytest.mark.parametrize("backbone", [18, 34, 50, 101])
def test_deeplab_shapes_every_stage(backbone, gen):
    x = torch.randn(2, 3, 48, 40, generator=gen)
    net = DeepLabV3Plus(backbone, pivot_stage=1).eval()
    with torch.no_grad():
        stages = net.encoder(x)
        out = net(x)
    assert out["logits"].shape == (2, 1, 48, 40)
    assert [tuple(a.shape) for a in out["aux"]] == [(2, 1, 6, 5), (2, 1, 12, 10)]
    for i, f in enumerate(stages):
        s = STAGE_STRIDES[i]
        assert f.shape == (2, STAGE_CHANNELS[backbone][i], 48 // s, 40 // s)
    assert net.encoder.out_channels == STAGE_CHANNELS[backbone]


@pytest.mark.slow
@pytest.mark.parametrize("backbone", [18, 50])
@pytest.mark.parametrize("stage", [1, 2, 3, 4, 5])
def test_full_model_every_pivot_stage(backbone, stage, gen):
    # 64 px: patch 16 px -> p = 8, 4, 2 cells at strides 2, 4, 8; a 4x4 patch grid.
    x = torch.randn(2, 3, 64, 64, generator=gen)
    mask = split_mask(2, 64, gen)
    model = NCLModel(backbone, stage, LossConfig(impl="reference"))
    out = model(x, mask)
    feat = model.net(x)["features"]
    s = STAGE_STRIDES[stage - 1]
    assert feat.shape == (2, STAGE_CHANNELS[backbone][stage - 1], 64 // s, 64 // s)
    assert out["pred_mask"].shape == (2, 1, 64, 64)
    assert set(out) >= {"loss", "ncl", "pc"}
    assert torch.isfinite(out["loss"]) and out["ncl"] > 0
    out["loss"].backward()
    for name, branch in (("pos", model.pivot.pos), ("neg", model.pivot.neg)):
        assert branch.conv.weight.grad is not None and branch.conv.weight.grad.abs().sum() > 0, name


def literal_anchors(pivot, feat, labels, p):
    """SPEC section 4 literally: gather the contour patches, run each branch on that
    (k, C, p, p) batch, average per image."""
    cols = torch.nn.functional.unfold(feat, p, stride=p).transpose(1, 2)  # (B, L, D)
    C = feat.shape[1]
    contour = cols[labels == 2].view(-1, C, p, p)
    owner = (labels == 2).nonzero()[:, 0]
    out = []
    for branch in (pivot.pos, pivot.neg):
        y = branch(contour).view(len(contour), -1)
        out.append(torch.stack([y[owner == b].mean(0) if (owner == b).any() else torch.zeros(y.shape[1])
                                for b in range(feat.shape[0])]))
    return out


@pytest.mark.parametrize("train", [True, False])
def test_pivot_matches_its_literal_definition(train, gen):
    pivot = Pivot(5).train(train)
    twin = Pivot(5).train(train)
    for m in (pivot, twin):  # non-trivial BatchNorm state
        torch.manual_seed(0)
        for prm in m.parameters():
            prm.data.uniform_(0.5, 1.5)
        for b in (m.pos.bn, m.neg.bn):
            b.running_mean.uniform_(-0.2, 0.2)
            b.running_var.uniform_(0.5, 2.0)
    feat = torch.randn(3, 5, 9, 11, generator=gen)  # trailing cells not covered by a 2x2 patch
    labels = torch.randint(0, 3, (3, 20), generator=gen, dtype=torch.uint8)
    labels[2] = 0  # no contour patch in image 2
    f1 = feat.clone().requires_grad_()
    f2 = feat.clone().requires_grad_()
    a_pos, a_neg = pivot(f1, labels, 2)
    w_pos, w_neg = literal_anchors(twin, f2, labels, 2)
    assert a_pos.shape == a_neg.shape == (3, 20)
    assert (a_pos[2] == 0).all() and (a_neg[2] == 0).all()
    torch.testing.assert_close(a_pos, w_pos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a_neg, w_neg, rtol=1e-5, atol=1e-6)
    (a_pos.sum() + 2 * a_neg.sum()).backward()
    (w_pos.sum() + 2 * w_neg.sum()).backward()
    torch.testing.assert_close(f1.grad, f2.grad, rtol=1e-4, atol=1e-6)
    for (n1, p1), (_, p2) in zip(pivot.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-6, msg=n1)
    for b1, b2 in ((pivot.pos.bn, twin.pos.bn), (pivot.neg.bn, twin.neg.bn)):
        torch.testing.assert_close(b1.running_mean, b2.running_mean)
        torch.testing.assert_close(b1.running_var, b2.running_var)


def test_pivot_without_contour_patches(gen):
    pivot = Pivot(4).train()
    feat = torch.randn(2, 4, 8, 8, generator=gen, requires_grad=True)
    labels = torch.zeros(2, 16, dtype=torch.uint8)
    before = pivot.pos.bn.running_mean.clone()
    a_pos, a_neg = pivot(feat, labels, 2)
    assert (a_pos == 0).all() and (a_neg == 0).all()
    (a_pos.sum() + a_neg.sum()).backward()
    # every parameter is in the graph (DistributedDataParallel needs it), with a zero gradient
    assert all(p.grad is not None and (p.grad == 0).all() for p in pivot.parameters())
    assert torch.equal(pivot.pos.bn.running_mean, before)


@pytest.mark.slow
def test_variants_loss_parts(gen):
    x = torch.randn(2, 3, 32, 32, generator=gen)
    mask = random_mask(2, 32, 32, "blobs", gen)
    parts = {v: NCLModel(18, 1, LossConfig(variant=v, impl="reference"))(x, mask) for v in ("base", "pivot", "full")}
    assert set(parts["base"]) == {"logits", "pred_mask", "loss", "bce"}
    assert set(parts["pivot"]) == {"logits", "pred_mask", "loss", "bce", "ncl"}
    assert set(parts["full"]) == {"logits", "pred_mask", "loss", "pc", "ncl"}
    for v in ("pivot", "full"):
        p = parts[v]
        rest = p["bce"] if v == "pivot" else p["pc"]
        torch.testing.assert_close(p["loss"], rest + 0.01 * p["ncl"])


@pytest.mark.slow
def test_model_can_learn(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = NCLModel(18, 1, LossConfig(impl="reference")).train()
    x = torch.randn(2, 3, 64, 64, generator=gen)
    mask = split_mask(2, 64, gen)
    x = x + 2 * mask  # a visible trace of the tampering
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = losses_over_steps(model, x, mask, opt, 8)
    assert losses[-1] < 0.8 * losses[0], losses


def test_bad_image_shapes():
    net = DeepLabV3Plus(18)
    with pytest.raises(ValueError, match="multiple of 8"):
        net(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        net(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="empty batch"):
        net(torch.randn(0, 3, 32, 32))
    with pytest.raises(ValueError, match="pivot_stage"):
        DeepLabV3Plus(18, pivot_stage=6)
    with pytest.raises(ValueError, match="depth"):
        DeepLabV3Plus(20)


@pytest.mark.slow
def test_patch_not_dividing_the_stride(gen):
    # stage 3 has stride 8: a 12 px patch is 1.5 cells
    model = NCLModel(18, 3, LossConfig(patch_px=12, impl="reference"))
    x = torch.randn(1, 3, 64, 64, generator=gen)
    with pytest.raises(ValueError, match="not a whole number of feature cells"):
        model(x, random_mask(1, 64, 64, "blobs", gen))


@pytest.mark.slow
def test_benco_wrapper_contract(gen):
    from ncl_fast.benco import NCLBenCo

    model = NCLBenCo(18, 1, "full").train()
    x = torch.randn(2, 3, 64, 64, generator=gen)
    mask = split_mask(2, 64, gen)[:, 0]  # IMDL-BenCo passes (B, H, W) masks too
    out = model(x, mask, torch.ones(2))
    assert {"backward_loss", "pred_mask", "pred_label", "visual_loss", "visual_image"} <= set(out)
    assert out["pred_mask"].shape == (2, 1, 64, 64) and out["pred_label"].shape == (2,)
    assert ((out["pred_mask"] >= 0) & (out["pred_mask"] <= 1)).all()
    out["backward_loss"].backward()
    torch.testing.assert_close(out["pred_label"], out["pred_mask"].flatten(1).amax(1))
    assert "backward_loss" not in model.eval()(x)  # inference: no mask, no loss
