"""ncl_fast against IMDL-BenCo's own code: `imdlbenco` 0.1.45 and `imdlbenco13` 0.2.9
(installed by `tests/system/benco_env.py`, without their dependencies; `.ci/run`
installs them and sets NCL_FAST_REQUIRE_BENCO=1, which makes their absence a
failure instead of a skip).

* every metric of both versions against ours, on generated predictions and masks;
* their `train_one_epoch` / `test_one_epoch` running `NCLBenCo`, built by their
  argument builder `misc.create_argparser`;
* checkpoints both ways: ours into their strict loader, theirs into our
  `evaluate`, `predict` and `--resume`;
* `--protocol benco|benco13`: our inputs equal their datasets' and our metrics
  theirs, end to end.

What is stubbed, and why (nothing else is):
* `torch.cuda.synchronize`, which their `train_one_epoch` calls around every step:
  a no-op here, where there is no CUDA device;
* `torch.distributed.all_gather`, which their image-level evaluators call in
  `epoch_update` even on one process (it needs a process group): with none
  initialized, the gather of one process is the tensor itself.
"""
import argparse
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from ncl_fast import metrics
from ncl_fast.testing import ellipse_masks
from system import benco_env

if os.environ.get("NCL_FAST_REQUIRE_BENCO") == "1":
    missing = [name for name in benco_env.VERSIONS if name not in benco_env.available()]
    if missing:
        raise RuntimeError(f"NCL_FAST_REQUIRE_BENCO=1 but {missing} are not installed in {benco_env.root()}: "
                           f"run `python tests/system/benco_env.py`")

VERSIONS = [pytest.param(name, marks=pytest.mark.skipif(
    name not in benco_env.available(),
    reason=f"{name} not installed (python tests/system/benco_env.py; CI installs it)")) for name in benco_env.VERSIONS]
#: ours' averaging for each of their versions
PROTOCOL = {"imdlbenco": "benco", "imdlbenco13": "benco13"}


@pytest.fixture
def benco(request, monkeypatch):
    """IMDL-BenCo `request.param`'s modules, with the two stubs of the module docstring."""
    mods = benco_env.load(request.param)
    real_gather = torch.distributed.all_gather

    def all_gather(out, tensor, *args, **kwargs):
        if torch.distributed.is_initialized():
            return real_gather(out, tensor, *args, **kwargs)
        assert len(out) == 1, "one process: world size 1"
        out[0].copy_(tensor)

    monkeypatch.setattr(torch.distributed, "all_gather", all_gather)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    mods["name"] = request.param
    yield mods
    for key in [k for k in sys.modules if k.split(".")[0] == "IMDLBenCo"]:
        del sys.modules[key]


def batches(gen, n_batches=3, B=4, H=24, W=28, ties=False):
    """(pred, mask, shape_mask) batches: random predictions, ellipse masks, some images
    authentic, some padded (a random valid top-left region), one whose valid pixels are all
    tampered (AUC undefined). Scores without ties: a random order of B H W distinct values
    in (0, 1) (uniform floats tie by chance, about one batch in a hundred, and a tie between a
    tampered and an authentic pixel counts half in ours, 0 or 1 in their curve: ~1e-5 of AUC).
    `ties`: predictions on a 1/8 grid, many tied scores."""
    out = []
    for b in range(n_batches):
        if ties:
            pred = torch.round(torch.rand(B, 1, H, W, generator=gen) * 8) / 8
        else:
            n = B * H * W
            pred = ((torch.randperm(n, generator=gen).float() + 0.5) / n).reshape(B, 1, H, W)
        mask = ellipse_masks(B, H, W, gen).float().reshape(B, 1, H, W)
        mask[1] = 0  # authentic
        shape = torch.zeros(B, 1, H, W)
        for k in range(B):
            h = int(torch.randint(H // 2, H + 1, (1,), generator=gen))
            w = int(torch.randint(W // 2, W + 1, (1,), generator=gen))
            shape[k, :, :h, :w] = 1
        mask *= shape  # padding is authentic, as their datasets make it
        if b == 0:  # every valid pixel tampered
            mask[2] = shape[2]
        out.append((pred, mask, shape))
    return out


def ours(data, protocol):
    rows = [metrics.image_metrics(p[k, 0], m[k, 0], s[k, 0]) for p, m, s in data for k in range(p.shape[0])]
    return rows, metrics.summarize(rows, protocol)


def theirs_pixel(benco, data, ties_ok=False):
    """Their pixel-level evaluators over the batches: {name: dataset value} as their tester forms it
    (0.1.45: the mean of the per-image values it returns; imdlbenco13: `epoch_update`)."""
    ev = benco["evaluation"]
    out = {}
    for evaluator in (ev.PixelF1(threshold=0.5), ev.PixelAUC(), ev.PixelIOU(threshold=0.5)):
        values = []
        for pred, mask, shape in data:
            r = evaluator.batch_update(predict=pred, mask=mask, shape_mask=shape)
            if r is not None:
                values += torch.as_tensor(r).tolist()
        final = evaluator.epoch_update()
        out[evaluator.name] = final if final is not None else values
    return out


@pytest.mark.parametrize("benco", VERSIONS, indirect=True)
def test_pixel_metrics_equal_theirs(benco, gen):
    """Pixel F1, IOU and AUC on continuous scores (no ties): per image for 0.1.45, and the
    dataset values each version reports, against ours under the matching protocol."""
    data = batches(gen)
    rows, summary = ours(data, PROTOCOL[benco["name"]])
    got = theirs_pixel(benco, data)
    if benco["name"] == "imdlbenco":  # per-image values, authentic images included
        f1, auc, iou = got["pixel-level F1"], got["pixel-level AUC"], got["pixel-level IOU"]
        assert len(f1) == len(rows)
        np.testing.assert_allclose(f1, [r["f1"] for r in rows], rtol=0, atol=1e-6)
        np.testing.assert_allclose(iou, [r["iou"] for r in rows], rtol=0, atol=1e-6)
        for theirs, r in zip(auc, rows):
            if r["auc"] is None:  # every valid pixel tampered: theirs is NaN, which ours drops and counts
                assert np.isnan(theirs)
            else:
                assert theirs == pytest.approx(r["auc"], abs=1e-5)
        assert summary["pixel-level F1"] == pytest.approx(np.mean(f1), abs=1e-6)
        assert summary["pixel-level IOU"] == pytest.approx(np.mean(iou), abs=1e-6)
        assert summary["pixel-level AUC"] == pytest.approx(np.nanmean(auc), abs=1e-5)
        assert summary["pixel-level AUC (undefined, dropped)"] == int(np.isnan(auc).sum()) == 1
    else:  # dataset values over tampered images only, undefined AUCs dropped
        for name in ("pixel-level F1", "pixel-level IOU", "pixel-level AUC"):
            assert summary[name] == pytest.approx(got[name], abs=1e-5), name
        assert summary["pixel-level F1"] == pytest.approx(summary["pixel-level F1 (tampered only)"])
        assert summary["pixel-level AUC"] == pytest.approx(summary["pixel-level AUC (tampered only)"])
        assert summary["pixel-level IOU"] == pytest.approx(summary["pixel-level IOU (tampered only)"])


@pytest.mark.parametrize("benco", VERSIONS, indirect=True)
def test_image_metrics_equal_theirs(benco, gen):
    """Image F1 and AUC from their evaluators (fed in batches, as their tester does) and ours, on
    the same scores and labels (ours: the max over valid pixels, which NCLBenCo's pred_label is)."""
    data = batches(gen, n_batches=4)
    rows, summary = ours(data, PROTOCOL[benco["name"]])
    ev = benco["evaluation"]
    f1, auc = ev.ImageF1(threshold=0.5), ev.ImageAUC()
    i = 0
    for pred, mask, shape in data:
        B = pred.shape[0]
        score = torch.tensor([r["score"] for r in rows[i:i + B]])
        label = torch.tensor([int(r["label"]) for r in rows[i:i + B]])
        i += B
        f1.batch_update(predict_label=score, label=label)
        auc.batch_update(predict_label=score, label=label)
    assert summary["image-level F1"] == pytest.approx(float(f1.epoch_update()), abs=1e-6)
    assert summary["image-level AUC"] == pytest.approx(float(auc.epoch_update()), abs=1e-9)


@pytest.mark.parametrize("benco", VERSIONS, indirect=True)
def test_tied_scores_ours_is_tie_correct(benco, gen):
    """With tied scores 0.1.45's pixel AUC depends on the order of the ties (an unstable sort
    without grouping); ours is the tie-correct value, scikit-learn's, whatever the order.
    imdlbenco13 computes it the same way. F1 and IOU do not depend on ties: still equal."""
    data = batches(gen, ties=True)
    rows, _ = ours(data, PROTOCOL[benco["name"]])
    k = 0
    for pred, mask, shape in data:
        for b in range(pred.shape[0]):
            valid = shape[b, 0] > 0
            m, p = mask[b, 0][valid], pred[b, 0][valid]
            if rows[k]["auc"] not in (None, 0.0):
                assert rows[k]["auc"] == pytest.approx(roc_auc_score(m.numpy(), p.numpy()), abs=1e-12)
                perm = torch.randperm(m.numel(), generator=gen)  # the order of the pixels changes nothing
                assert metrics.auc(p[perm], m[perm]) == pytest.approx(rows[k]["auc"], abs=1e-12)
            k += 1
    # their AUC on a constant map (every score tied): order-dependent, where the tie-correct value is 0.5
    pred = torch.full((1, 1, 16, 16), 0.5)
    mask = (torch.rand(1, 1, 16, 16, generator=gen) < 0.3).float()
    mask[0, 0, 0, 0] = 1
    assert metrics.auc(pred, mask) == 0.5
    theirs = benco["evaluation"].PixelAUC().Cal_AUC(mask[0], pred[0])
    assert 0 <= theirs <= 1  # a value, not NaN; which value depends on the sort's order of the ties


# ---- their scripts, our model ------------------------------------------------------------------------------------
TINY = ["--backbone", "18", "--width", "8", "--head_channels", "16"]
SIZE = 32


def write_images(folder, gen):
    """A small set IMDL-BenCo and ncl_fast both read: images smaller and larger than SIZE, RGB and
    greyscale masks, a faint mask (non-zero, nothing over 127.5: tampered by IMDL-BenCo's label rule,
    empty by the 127.5 mask rule), a JPEG, an authentic image. Returns [[image, mask | "Negative"]]
    relative to `folder`'s parent."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    (folder / "Tp").mkdir(parents=True)
    (folder / "Gt").mkdir()
    records = []
    sizes = [(40, 48), (20, 24), (50, 36), (33, 45), (36, 36), (64, 30)]
    for k, (h, w) in enumerate(sizes):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        name = f"im{k}.jpg" if k == 3 else f"im{k}.png"
        Image.fromarray(image).save(folder / "Tp" / name, quality=95)
        img = f"{folder.name}/Tp/{name}"
        if k == 4:
            records.append([img, "Negative"])
            continue
        m = ellipse_masks(1, h, w, gen).reshape(h, w).numpy()
        if k == 0:  # a rectangle: whole tampered and whole authentic patches, which the NCL term needs
            m[:] = False
            m[: h // 2, : w // 2] = True
        values = np.where(m, 255, 0).astype(np.uint8)
        if k == 2:  # faint: tampered by their label rule, empty after the 127.5 threshold
            values = np.where(m, rng.integers(1, 100), 0).astype(np.uint8)
        values[0, 0] = 30  # a stray faint pixel: empty after the threshold, non-zero for the label
        mask = Image.fromarray(values) if k % 2 else Image.fromarray(np.repeat(values[..., None], 3, axis=2))
        mask.save(folder / "Gt" / f"im{k}.png")
        records.append([img, f"{folder.name}/Gt/im{k}.png"])
    return records


@pytest.fixture
def their_data(tmp_path, gen, monkeypatch):
    """The set under tmp_path/data, a JSON list of paths relative to the working directory (tmp_path,
    as IMDL-BenCo resolves them) in tmp_path/lists/, where paths taken from the list's folder would
    not exist."""
    records = write_images(tmp_path / "data", gen)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "test.json").write_text(json.dumps([r + ["extra field"] for r in records]))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "lists" / "test.json"


def their_loader(benco, json_path, mode, batch_size=2, size=SIZE):
    import albumentations as albu
    ds = benco["datasets"].JsonDataset(str(json_path), is_padding=mode == "pad", is_resizing=mode == "resize",
                                       output_size=(size, size), common_transforms=albu.Compose([]))
    return ds, torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)


def their_model(benco, argv):
    """NCLBenCo as their train.py / test.py build it: options from `misc.create_argparser`."""
    from ncl_fast.benco import NCLBenCo
    model_args = benco["training_scripts.utils.misc"].create_argparser(NCLBenCo).parse_args(argv)
    return NCLBenCo(**vars(model_args)), model_args


def their_args(tmp_path, **changes):
    args = dict(if_not_amp=True, accum_iter=1, lr=1e-3, min_lr=0.0, warmup_epochs=0, epochs=1, if_predict_label=False,
                test_batch_size=2, no_model_eval=False, distributed=False, output_dir=str(tmp_path / "theirs"))
    args.update(changes)
    return argparse.Namespace(**args)


@pytest.mark.parametrize("benco", VERSIONS, indirect=True)
def test_their_argument_builder_makes_every_option(benco):
    """Their create_argparser turns every NCLBenCo parameter into a working option (typed, with its
    default), and the model built from them has what was asked."""
    model, args = their_model(benco, ["--backbone", "34", "--width", "8", "--head_channels", "16", "--dropout",
                                      "0.2", "--variant", "pivot", "--omega", "0.05", "--tau", "0.2", "--pivot_stage",
                                      "2"])
    assert args.backbone == "34" and args.width == 8 and args.dropout == 0.2 and args.omega == 0.05
    from ncl_fast.model import LossConfig, NCLModel
    want = NCLModel(34, 2, LossConfig(variant="pivot", omega=0.05, tau=0.2), dropout=0.2, width=8, head_channels=16)
    assert {k: v.shape for k, v in model.model.state_dict().items()} == \
        {k: v.shape for k, v in want.state_dict().items()}
    assert model.model.criterion.config == want.criterion.config
    assert [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)] == [0.2] * len(
        [m for m in want.modules() if isinstance(m, torch.nn.Dropout)])
    vit, args = their_model(benco, ["--backbone", "vit_demo", "--head_channels", "16"])
    assert args.width == 0 and type(vit.model.net).__name__ == "ViTSegmenter"
    defaults, args = their_model(benco, [])
    assert args.backbone == "101" and args.head_channels == 256 and args.variant == "full"


@pytest.mark.slow
@pytest.mark.parametrize("benco", VERSIONS, indirect=True)
def test_their_train_and_test_epochs_run_nclbenco(benco, their_data, tmp_path):
    """Their train_one_epoch trains NCLBenCo on their dataset (every parameter gets a gradient), their
    test_one_epoch evaluates it with their five evaluators, and the figures equal ours on the
    same model outputs; their save_model writes a checkpoint our evaluate, predict and --resume read."""
    torch.manual_seed(0)
    model, _ = their_model(benco, TINY)
    _, train_loader = their_loader(benco, their_data, "resize", size=64)  # 4 x 4 patches of 16 px: NCL has pairs
    misc = benco["training_scripts.utils.misc"]
    args = their_args(tmp_path)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    scaler = misc.NativeScalerWithGradNormCount()
    got_grad = set()
    for name, param in model.named_parameters():
        param.register_post_accumulate_grad_hook(
            lambda p, name=name: got_grad.add(name) if p.grad.abs().sum() > 0 else None)
    stats = benco["training_scripts.trainer"].train_one_epoch(model, train_loader, opt, torch.device("cpu"), 0,
                                                             scaler, log_writer=None, args=args)
    assert np.isfinite(stats["loss"]) and stats["loss"] > 0
    assert got_grad == {n for n, _ in model.named_parameters()}

    ev = benco["evaluation"]
    evaluators = [ev.PixelF1(threshold=0.5), ev.PixelAUC(), ev.PixelIOU(threshold=0.5), ev.ImageF1(threshold=0.5),
                  ev.ImageAUC()]
    for mode in ("resize", "pad"):
        _, test_loader = their_loader(benco, their_data, mode)
        theirs = benco["training_scripts.tester"].test_one_epoch(model, test_loader, evaluators, torch.device("cpu"),
                                                                0, name="t", log_writer=None, args=args)
        # ours, on the very outputs and inputs their tester saw
        model.eval()
        rows = []
        with torch.no_grad():
            for batch in test_loader:
                out = model(**batch)
                for k in range(out["pred_mask"].shape[0]):
                    shape = batch.get("shape_mask")
                    rows.append(metrics.image_metrics(out["pred_mask"][k, 0], batch["mask"][k, 0],
                                                      None if shape is None else shape[k, 0], bool(batch["label"][k])))
                    assert out["pred_label"][k] == pytest.approx(rows[-1]["score"])  # max over valid pixels only
        summary = metrics.summarize(rows, PROTOCOL[benco["name"]])
        for name in metrics.NAMES:  # their pixel AUC sums in float32: 1e-4
            tol = 1e-4 if name == "pixel-level AUC" else 1e-6
            assert float(theirs[name]) == pytest.approx(summary[name], abs=tol), (mode, name)

    os.makedirs(args.output_dir)  # their train.py makes it
    misc.save_model(args=args, epoch=0, model=model, model_without_ddp=model, optimizer=opt, loss_scaler=scaler)
    check_their_checkpoint_in_ours(tmp_path / "theirs" / "checkpoint-0.pth", model, their_data, tmp_path)


def check_their_checkpoint_in_ours(path, model, test_json, tmp_path):
    """Their checkpoint (Namespace args, weights under model.) in our evaluate, predict and --resume."""
    from ncl_fast.evaluate import main as evaluate_main
    from ncl_fast.predict import main as predict_main
    from ncl_fast.train import main as train_main

    ckpt = torch.load(path, weights_only=False)
    assert isinstance(ckpt["args"], argparse.Namespace) and all(k.startswith("model.") for k in ckpt["model"])
    assert evaluate_main(["--checkpoint", str(path), "--test_data_path", str(test_json), *TINY, "--image_size",
                          str(SIZE), "--num_workers", "0", "--no-progress", "--output_dir", str(tmp_path / "ev")]) == 0
    assert (tmp_path / "ev" / "eval.json").is_file()
    assert predict_main([str(tmp_path / "data" / "Tp"), "--checkpoint", str(path), *TINY, "--image_size", str(SIZE),
                         "--out", str(tmp_path / "pred"), "--no-progress"]) == 0
    # our predictions are their model's: the same weights give the same probabilities
    from ncl_fast.engine.checkpoints import model_from_checkpoint
    ours, _ = model_from_checkpoint(str(path), torch.device("cpu"), {"backbone": 18, "width": 8, "head_channels": 16})
    x = torch.randn(2, 3, SIZE, SIZE)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x)["pred_mask"], model(x)["pred_mask"])
    # --resume: our training continues theirs (AdamW, weights and optimizer state) at the next epoch
    assert train_main(["--data_path", str(test_json), *TINY, "--image_size", str(SIZE), "--test_image_size",
                       str(SIZE), "--batch_size", "2", "--num_workers", "0", "--no-progress", "--optimizer", "adamw",
                       "--epochs", "2", "--max_steps", "1", "--output_dir", str(tmp_path / "resumed"),
                       "--resume", str(path), "--test_data_path", str(test_json)]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("benco", VERSIONS, indirect=True)
def test_our_checkpoint_loads_strictly_in_theirs(benco, tmp_path, their_data):
    """An ncl_fast checkpoint (keys net.*, pivot.*) loads into NCLBenCo as their test.py loads it
    (load_state_dict, strict), and gives our model's predictions."""
    from ncl_fast.engine.checkpoints import model_from_checkpoint
    from ncl_fast.train import main as train_main

    assert train_main(["--data_path", str(their_data), *TINY, "--image_size", str(SIZE), "--test_image_size",
                       str(SIZE), "--batch_size", "2", "--num_workers", "0", "--no-progress", "--max_steps", "1",
                       "--output_dir", str(tmp_path / "ours"), "--test_data_path", str(their_data)]) == 0
    path = tmp_path / "ours" / "checkpoint-0.pth"
    ckpt = torch.load(path, weights_only=False)
    assert not any(k.startswith("model.") for k in ckpt["model"])
    cfg = ckpt["model_config"]
    model, _ = their_model(benco, ["--backbone", str(cfg["backbone"]), "--width", str(cfg["width"]),
                                   "--head_channels", str(cfg["head_channels"]), "--variant", cfg["variant"]])
    result = model.load_state_dict(ckpt["model"])  # strict, as their test.py
    assert not result.missing_keys and not result.unexpected_keys
    ours, _ = model_from_checkpoint(str(path), torch.device("cpu"))
    x = torch.randn(2, 3, SIZE, SIZE)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x)["pred_mask"], ours(x)["pred_mask"], rtol=0, atol=0)
    # and a wrong architecture is still refused by the strict load
    other, _ = their_model(benco, ["--backbone", "18", "--width", "16", "--head_channels", "16"])
    with pytest.raises(RuntimeError):
        other.load_state_dict(ckpt["model"])


# ---- --protocol benco|benco13: their inputs, their averaging -------------------------------------------------------
@pytest.mark.parametrize("mode", ["resize", "pad"])
@pytest.mark.parametrize("benco", VERSIONS, indirect=True)
def test_protocol_inputs_equal_theirs(benco, their_data, mode):
    """Under --protocol our dataset makes their inputs: the same paths (from the working directory),
    mask, label, shape mask, and image up to float rounding of the normalization."""
    from ncl_fast.data import ForgeryDataset, load_entries, to_model_input

    protocol = PROTOCOL[benco["name"]]
    entries = load_entries(str(their_data), paths="cwd")[0]
    ours = ForgeryDataset(entries, SIZE, mode, protocol=protocol)
    theirs, _ = their_loader(benco, their_data, mode)
    assert len(ours) == len(theirs)
    labels = []
    for k in range(len(ours)):
        a, b = ours[k], theirs[k]
        x = to_model_input({key: v[None] if isinstance(v, torch.Tensor) else v for key, v in a.items()}, "cpu")
        torch.testing.assert_close(x.image[0], b["image"].float(), rtol=0, atol=2e-5)
        assert torch.equal(x.mask[0], b["mask"].float()), k
        assert float(a["label"]) == float(b["label"]), k
        if mode == "pad":
            assert torch.equal(x.shape_mask[0], b["shape_mask"].float()), k
        else:
            assert "shape_mask" not in a and "shape_mask" not in b
        labels.append(float(a["label"]))
    assert labels == [1, 1, 1, 1, 0, 1]  # the faint mask (2) is tampered by their rule; its mask is empty
    assert not ours[2]["mask"].any()


@pytest.mark.slow
@pytest.mark.parametrize("benco", VERSIONS, indirect=True)
def test_protocol_metrics_equal_theirs_end_to_end(benco, their_data, tmp_path):
    """`evaluate --protocol` on a checkpoint gives, for every metric, what their tester gives for the
    same weights on the same files (their dataset, their evaluators)."""
    from ncl_fast.evaluate import main as evaluate_main

    protocol = PROTOCOL[benco["name"]]
    torch.manual_seed(1)
    model, _ = their_model(benco, TINY)
    model.eval()
    for bn in [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]:  # a trained-looking BN
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 2)
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(image_size=SIZE)}, tmp_path / "m.pth")
    ev = benco["evaluation"]
    for mode in ("resize", "pad"):
        evaluators = [ev.PixelF1(threshold=0.5), ev.PixelAUC(), ev.PixelIOU(threshold=0.5),
                      ev.ImageF1(threshold=0.5), ev.ImageAUC()]
        _, loader = their_loader(benco, their_data, mode)
        theirs = benco["training_scripts.tester"].test_one_epoch(model, loader, evaluators, torch.device("cpu"), 0,
                                                                name="t", log_writer=None, args=their_args(tmp_path))
        out = tmp_path / f"ev-{mode}"
        assert evaluate_main(["--checkpoint", str(tmp_path / "m.pth"), "--test_data_path",
                              os.path.relpath(their_data), *TINY, f"--if_{'padding' if mode == 'pad' else 'resizing'}",
                              "--protocol", protocol, "--num_workers", "0", "--no-progress", "--amp", "off",
                              "--output_dir", str(out)]) == 0
        record = json.loads((out / "eval.json").read_text())
        assert record["protocol"] == protocol
        ours = record["results"]["test"]["clean"]
        for name in metrics.NAMES:
            assert ours[name] == pytest.approx(float(theirs[name]), abs=1e-4), (mode, name)
