"""The ViT backbone (SPEC section 10): shapes at sizes other than the construction
size, torchvision's own forward as the oracle, every parameter trained by every
variant, and the commands (train, resume, evaluate, predict) on a ViT checkpoint."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings

from helpers import losses_over_steps, random_mask, synthetic_split
from ncl_fast import distributed
from ncl_fast.engine import loop
from ncl_fast.engine.config import resolve
from ncl_fast.engine.loop import run_training
from ncl_fast.engine.checkpoints import load_checkpoint
from ncl_fast.evaluate import main as evaluate_main
from ncl_fast.engine.checkpoints import model_from_checkpoint
from ncl_fast.model import (VIT_CONFIGS, DeepLabV3Plus, LossConfig, NCLModel, ViTConfig, ViTEncoder,
                            ViTSegmenter)
from ncl_fast.predict import main as predict_main

# A few-second size for the module tests, built at 64 px (a 4x4 token grid).
TINY = ViTConfig(depth=2, width=32, heads=2, mlp=64, image_size=64)


def randomized(enc: ViTEncoder) -> ViTEncoder:
    """No zero-initialised tensor (the class token, biases) hides a term."""
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return enc.eval()


def three_kinds_mask(B: int, H: int, W: int, gen: torch.Generator) -> torch.Tensor:
    """Tampered left of a cut inside the second 16 px patch column, blobs on the right:
    tampered, contour and authentic 16 px patches in every image."""
    mask = random_mask(B, H, W, "blobs", gen)
    mask[..., : W // 2] = 0
    mask[..., : int(torch.randint(17, 32, (1,), generator=gen))] = 1
    return mask


@pytest.mark.parametrize("size", [(32, 32), (48, 64), (64, 64)])
@pytest.mark.parametrize("aux", [True, False])
def test_shapes_at_any_multiple_of_16(size, aux, gen):
    H, W = size
    net = ViTSegmenter(TINY, aux_heads=aux, head_channels=16).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, H, W, generator=gen))
    assert out["features"].shape == (2, TINY.width, H // 16, W // 16) and net.feature_channels == TINY.width
    assert out["logits"].shape == (2, 1, H, W)
    expect = [(2, 1, H // 16, W // 16), (2, 1, H // 8, W // 8)] if aux else []
    assert [tuple(a.shape) for a in out["aux"]] == expect


def test_tokens_equal_torchvision_at_the_construction_size(gen):
    enc = randomized(ViTEncoder(TINY))
    x = torch.randn(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        ours = enc.tokens(x)
        vit = enc.vit
        theirs = vit.encoder(torch.cat([vit.class_token.expand(2, -1, -1), vit._process_input(x)], dim=1))
        cls = vit(x)  # torchvision's forward itself; `heads` is the identity: the class token
        feat = enc(x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[:, 0], cls, rtol=0, atol=1e-6)
    # the token map: patch tokens, class token dropped, row-major over the 4x4 grid
    for r, c in [(0, 0), (0, 3), (2, 1), (3, 3)]:
        torch.testing.assert_close(feat[:, :, r, c], ours[:, 1 + 4 * r + c], rtol=0, atol=0)


@pytest.mark.parametrize("size", [32, 96])
def test_other_sizes_equal_torchvision_with_interpolated_embeddings(size, gen):
    """torchvision's `interpolate_embeddings` resizes a state dict for a model built
    at another size; that model's forward is the oracle of ours at that size."""
    enc = randomized(ViTEncoder(TINY))
    state = interpolate_embeddings(size, 16, {k: v.clone() for k, v in enc.vit.state_dict().items()})
    other = VisionTransformer(size, 16, TINY.depth, TINY.heads, TINY.width, TINY.mlp)
    other.heads = torch.nn.Identity()
    other.load_state_dict(state)
    other.eval()
    x = torch.randn(2, 3, size, size, generator=gen)
    with torch.no_grad():
        ours = enc.tokens(x)
        theirs = other.encoder(torch.cat([other.class_token.expand(2, -1, -1), other._process_input(x)], dim=1))
        cls = other(x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[:, 0], cls, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["base", "pivot", "full"])
def test_every_parameter_trains_in_every_variant(variant, gen):
    """No unused parameter (DistributedDataParallel needs that): the aux heads and the
    Pivot exist exactly where the loss uses them."""
    model = NCLModel(TINY, loss=LossConfig(variant=variant, impl="reference"), head_channels=16).train()
    x = torch.randn(2, 3, 64, 48, generator=gen)
    mask = three_kinds_mask(2, 64, 48, gen)
    out = model(x, mask)
    assert torch.isfinite(out["loss"])
    if variant != "base":
        assert out["ncl"] > 0
        # the token map has stride 16: a 16 px patch is one cell, D = C
        assert model.criterion.patch_cells((64, 48), (4, 3)) == 1
    out["loss"].backward()
    assert (model.pivot is None) == (variant == "base")
    assert hasattr(model.net, "aux_head_16") == (variant == "full")
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} is unused"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_pc_loss_applies_at_every_stride(gen):
    from ncl_fast import functional

    model = NCLModel(TINY, loss=LossConfig(impl="reference"), head_channels=16).eval()
    x = torch.randn(2, 3, 64, 64, generator=gen)
    mask = three_kinds_mask(2, 64, 64, gen)
    with torch.no_grad():
        out = model.net(x)
        parts = model(x, mask)
    preds = out["aux"] + [out["logits"]]
    assert [64 // p.shape[-1] for p in preds] == [16, 8, 1]
    each = sum(functional.pc_bce(p, mask, 0.9, 2, impl="reference") for p in preds)
    torch.testing.assert_close(parts["pc"], each)


@pytest.mark.slow
def test_model_can_learn(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = NCLModel(TINY, loss=LossConfig(impl="reference"), head_channels=16).train()
    mask = three_kinds_mask(2, 64, 64, gen)
    x = torch.randn(2, 3, 64, 64, generator=gen) + 2 * mask  # a visible trace of the tampering
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = losses_over_steps(model, x, mask, opt, 10)
    assert losses[-1] < 0.8 * losses[0], losses


def test_bad_inputs_and_options():
    net = ViTSegmenter(TINY)
    with pytest.raises(ValueError, match="multiple of 16"):
        net(torch.randn(1, 3, 40, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        net(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="empty batch"):
        net(torch.randn(0, 3, 32, 32))
    with pytest.raises(ValueError, match="vit_demo, vit_tiny, vit_small, vit_base"):
        NCLModel("vit_huge")
    for option in ({"pivot_stage": 1}, {"width": 16}):
        with pytest.raises(ValueError, match=f"{next(iter(option))} applies to ResNet backbones only"):
            NCLModel("vit_demo", **option)
    with pytest.raises(ValueError, match="multiple of its heads"):
        ViTConfig(depth=1, width=30, heads=4, mlp=8, image_size=32)


def test_named_sizes():
    got = {n: (c.depth, c.width, c.heads, c.mlp) for n, c in VIT_CONFIGS.items()}
    assert got == {"vit_demo": (4, 128, 4, 512), "vit_tiny": (12, 192, 3, 768), "vit_small": (12, 384, 6, 1536),
                   "vit_base": (12, 768, 12, 3072)}
    net = ViTSegmenter("vit_demo", head_channels=16)
    assert net.feature_channels == 128 and len(net.encoder.vit.encoder.layers) == 4


@pytest.mark.slow
def test_no_graph_break_in_the_training_step(gen):
    model = NCLModel(TINY, loss=LossConfig(impl="reference"), head_channels=16).train()
    x = torch.randn(2, 3, 48, 32, generator=gen)  # not the construction size: the interpolation traces too
    mask = three_kinds_mask(2, 48, 32, gen)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda x, mask: model(x, mask)["loss"])(x, mask)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.slow
def test_benco_wrapper_with_a_vit(gen):
    from ncl_fast.benco import NCLBenCo

    model = NCLBenCo("vit_demo", variant="full").train()
    x = torch.randn(2, 3, 32, 32, generator=gen)
    out = model(x, three_kinds_mask(2, 32, 32, gen)[:, 0], torch.ones(2))
    assert out["pred_mask"].shape == (2, 1, 32, 32)
    out["backward_loss"].backward()


# ---- the commands ---------------------------------------------------------------------------------------------------
ARGS = ["--backbone", "vit_demo", "--head_channels", "16", "--image_size", "32", "--test_image_size", "32",
        "--batch_size", "2", "--num_workers", "0", "--lr", "0.001", "--no-progress", "--if_resizing"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_split(tmp_path_factory.mktemp("synth"), n=10, seed=1, n_train=8)


def run(tmp, data, *extra, base=ARGS):
    args = resolve(base + ["--data_path", str(data / "train.json"), "--test_data_path",
                                      str(data / "test.json"), "--output_dir", str(tmp)] + list(extra))
    return run_training(args, distributed.setup("cpu"))


def test_backbone_option():
    assert resolve(["--backbone", "18"]).backbone == 18  # an int, as old checkpoints store it
    args = resolve(["--backbone", "vit_small"])
    assert (args.backbone, args.pivot_stage, args.width) == ("vit_small", None, None)
    assert resolve(["--backbone", "vit_base", "--preset", "paper"]).width is None


@pytest.mark.parametrize("bad, message", [
    (["--backbone", "vit_huge"], "invalid choice: 'vit_huge'"),
    (["--backbone", "19"], "invalid choice: 19"),
    (["--backbone", "vit_demo", "--pivot_stage", "1"], "--pivot_stage applies to ResNet backbones only"),
    (["--backbone", "vit_demo", "--width", "16"], "--width applies to ResNet backbones only"),
    (["--backbone", "vit_demo", "--width", "16", "--pivot_stage", "2"], "--pivot_stage and --width apply to"),
])
def test_bad_backbone_options_exit_2(bad, message, capsys):
    with pytest.raises(SystemExit) as exc:
        resolve(bad)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_train_resume_evaluate_predict(tmp_path, data, capsys):
    assert run(tmp_path / "a", data, "--epochs", "2") == 0
    out = capsys.readouterr().out
    assert "training full NCL, ViT vit_demo (depth 4, width 128, 4 heads), Pivot on the token map" in out
    ckpt = load_checkpoint(tmp_path / "a" / "checkpoint-1.pth")
    cfg = ckpt["model_config"]
    assert (cfg["backbone"], cfg["pivot_stage"], cfg["width"], cfg["head_channels"]) == ("vit_demo", None, None, 16)
    assert any(k.startswith("net.encoder.vit.encoder.layers.") for k in ckpt["model"])
    # stopped in epoch 1 (4 steps per epoch), resumed: the same weights as without the stop
    assert run(tmp_path / "b", data, "--epochs", "2", "--max_steps", "6") == 0
    assert run(tmp_path / "b", data, "--epochs", "2", "--resume", "auto") == 0
    theirs = load_checkpoint(tmp_path / "b" / "checkpoint-1.pth")["model"]
    assert ckpt["model"].keys() == theirs.keys() and all(torch.equal(ckpt["model"][k], theirs[k]) for k in theirs)
    path = str(tmp_path / "a" / "checkpoint-1.pth")
    model, _ = model_from_checkpoint(path, torch.device("cpu"))
    assert isinstance(model.net, ViTSegmenter)
    capsys.readouterr()
    assert evaluate_main(["--checkpoint", path, "--test_data_path", str(data / "test.json"), "--num_workers", "0",
                          "--no-progress", "--output_dir", str(tmp_path / "ev")]) == 0
    assert "| clean |" in capsys.readouterr().out
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["results"]["test"]["clean"]["images"] == 2
    image = sorted((data / "Tp").glob("*.png"))[0]
    assert predict_main([str(image), "--checkpoint", path, "--out", str(tmp_path / "pred")]) == 0
    prob = np.asarray(Image.open(tmp_path / "pred" / "prob" / image.name))
    assert prob.shape == Image.open(image).size[::-1]
    # a bare {model} file: evaluate rebuilds it from --backbone (and the default head: 256 channels, not 16)
    torch.save({"model": ckpt["model"]}, tmp_path / "bare.pth")
    assert evaluate_main(["--checkpoint", str(tmp_path / "bare.pth"), "--test_data_path", str(data / "test.json"),
                          "--backbone", "vit_demo", "--num_workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "does not fit a ViT vit_demo" in err and "Traceback" not in err


@pytest.mark.slow
def test_old_int_backbone_checkpoints_still_load_and_resume(tmp_path, data, monkeypatch, capsys):
    """Checkpoints written before ViTs existed store an int backbone, and (older still)
    no width or pivot_stage in model_config: evaluate loads them, train continues them
    with --backbone 18 and refuses to continue them as a ViT."""
    model = NCLModel(18, 1, width=8, head_channels=16)
    old = {"backbone": 18, "pivot_stage": 1, "variant": "full", "dropout": 0.1, "width": 8, "head_channels": 16}
    torch.save({"model": model.state_dict(), "model_config": old, "epoch": 0}, tmp_path / "old.pth")
    older = {"backbone": 18, "variant": "full", "head_channels": 16}
    torch.save({"model": NCLModel(18, 1, head_channels=16).state_dict(), "model_config": older},
               tmp_path / "older.pth")
    for name in ("old.pth", "older.pth"):
        loaded, _ = model_from_checkpoint(str(tmp_path / name), torch.device("cpu"))
        assert isinstance(loaded.net, DeepLabV3Plus) and loaded.net.pivot_stage == 1
    loaded, _ = model_from_checkpoint(str(tmp_path / "old.pth"), torch.device("cpu"))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())

    resumed = {}
    monkeypatch.setattr(loop.Trainer, "run", lambda self: resumed.update(self.model.state_dict()) or 0)
    resnet = ["--backbone", "18", "--width", "8"] + ARGS[2:]
    assert run(tmp_path / "r", data, "--epochs", "2", "--resume", str(tmp_path / "old.pth"), base=resnet) == 0
    assert all(torch.equal(v, resumed[k]) for k, v in model.state_dict().items())
    capsys.readouterr()
    assert run(tmp_path / "v", data, "--epochs", "2", "--resume", str(tmp_path / "old.pth")) == 2
    err = capsys.readouterr().err
    assert "was trained with --backbone 18 (this run: vit_demo);" in err and "Traceback" not in err
