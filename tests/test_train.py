"""The main job on a tiny model: train, checkpoint, resume exactly, Ctrl-C,
evaluate and predict, and bad arguments."""
import json

import pytest
import torch
from PIL import Image

from helpers import synthetic_split
from ncl_fast import train
from ncl_fast.checkpoint import load_checkpoint
from ncl_fast.data import ForgeryDataset
from ncl_fast.evaluate import main as evaluate_main
from ncl_fast.predict import main as predict_main

TINY = ["--backbone", "18", "--width", "8", "--head_channels", "16", "--image_size", "32", "--test_image_size", "32",
        "--batch_size", "2", "--num_workers", "0", "--lr", "0.01", "--no-progress", "--if_resizing"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_split(tmp_path_factory.mktemp("synth"), n=10, seed=1, n_train=8)


def run(tmp, data, *extra):
    args = train.resolve_args(TINY + ["--data_path", str(data / "train.json"), "--test_data_path",
                                      str(data / "test.json"), "--output_dir", str(tmp)] + list(extra))
    ctx = train.distributed.setup("cpu")
    return train.train(args, ctx)


def weights(path):
    return load_checkpoint(path)["model"]


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_train_writes_logs_and_checkpoints(tmp_path, data, capsys):
    assert run(tmp_path, data, "--epochs", "2", "--test_period", "1") == 0
    out = capsys.readouterr().out
    assert "validation (test): pixel-level F1" in out and "| final |" in out
    logs = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in logs] == [0, 1]
    for key in ("train_lr", "train_loss", "train_ncl", "train_pc", "test_pixel-level F1", "test_pixel-level AUC"):
        assert key in logs[-1]
    ckpt = load_checkpoint(tmp_path / "checkpoint-1.pth")
    assert {"model", "optimizer", "epoch", "scaler", "args"} <= set(ckpt)
    assert ckpt["epoch"] == 1 and ckpt["model_config"]["width"] == 8
    assert list(tmp_path.glob("events.out.tfevents*")), "TensorBoard scalars"
    assert not list(tmp_path.glob(".*.tmp-*")), "no temporary checkpoint left behind"


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_equals_uninterrupted(tmp_path, data, optimizer):
    assert run(tmp_path / "a", data, "--epochs", "3", "--optimizer", optimizer) == 0
    # stop in the middle of epoch 1 (4 steps per epoch), then resume
    assert run(tmp_path / "b", data, "--epochs", "3", "--max_steps", "6", "--optimizer", optimizer) == 0
    ckpt = load_checkpoint(tmp_path / "b" / "checkpoint-1.pth")
    assert (ckpt["next_epoch"], ckpt["next_step"], ckpt["global_step"]) == (1, 2, 6)
    assert run(tmp_path / "b", data, "--epochs", "3", "--resume", "auto", "--optimizer", optimizer) == 0
    assert same(weights(tmp_path / "a" / "checkpoint-2.pth"), weights(tmp_path / "b" / "checkpoint-2.pth"))
    ca, cb = (load_checkpoint(tmp_path / x / "checkpoint-2.pth") for x in ("a", "b"))
    assert ca["optimizer"]["state"].keys() == cb["optimizer"]["state"].keys()
    for k, state in ca["optimizer"]["state"].items():
        for name, value in state.items():
            other = cb["optimizer"]["state"][k][name]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, name


def test_ctrl_c_saves_and_resumes(tmp_path, data, monkeypatch, capsys):
    assert run(tmp_path / "a", data, "--epochs", "2") == 0
    calls = {"n": 0}
    original = ForgeryDataset.__getitem__

    def interrupt_on_the_seventh_item(self, index):
        calls["n"] += 1
        if self.train and calls["n"] == 7:
            raise KeyboardInterrupt
        return original(self, index)

    monkeypatch.setattr(ForgeryDataset, "__getitem__", interrupt_on_the_seventh_item)
    assert run(tmp_path / "b", data, "--epochs", "2") == 130
    assert "interrupted: saved" in capsys.readouterr().err
    ckpt = load_checkpoint(tmp_path / "b" / "checkpoint-0.pth")
    assert (ckpt["next_epoch"], ckpt["next_step"]) == (0, 3)  # items 7-8 would have been step 4
    monkeypatch.setattr(ForgeryDataset, "__getitem__", original)
    assert run(tmp_path / "b", data, "--epochs", "2", "--resume", "auto") == 0
    assert same(weights(tmp_path / "a" / "checkpoint-1.pth"), weights(tmp_path / "b" / "checkpoint-1.pth"))


@pytest.mark.parametrize("variant", ["base", "pivot"])
def test_variants_train(tmp_path, data, variant):
    assert run(tmp_path, data, "--epochs", "1", "--variant", variant) == 0
    assert load_checkpoint(tmp_path / "checkpoint-0.pth")["model_config"]["variant"] == variant


def test_evaluate_and_predict(tmp_path, data, capsys):
    assert run(tmp_path / "t", data, "--epochs", "1") == 0
    ckpt = str(tmp_path / "t" / "checkpoint-0.pth")
    capsys.readouterr()
    assert evaluate_main(["--checkpoint", ckpt, "--test_data_path", str(data / "test.json"), "--num_workers", "0",
                          "--robustness", "--output_dir", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "| clean |" in out and "| jpeg q=50 |" in out and "| resize 0.25x |" in out
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert len(report["results"]["test"]) == 9 and report["results"]["test"]["clean"]["images"] == 2
    # a checkpoint holding only {model} loads too
    torch.save({"model": load_checkpoint(ckpt)["model"]}, tmp_path / "bare.pth")
    images = sorted((data / "Tp").glob("*.png"))[:2]
    src = tmp_path / "in"
    src.mkdir()
    for p in images:
        (src / p.name).write_bytes(p.read_bytes())
    assert predict_main([str(src), "--checkpoint", str(tmp_path / "t" / "checkpoint-0.pth"), "--out",
                         str(tmp_path / "pred")]) == 0
    for p in images:
        pred = Image.open(tmp_path / "pred" / "pred" / p.name)
        assert pred.size == Image.open(p).size and pred.mode == "L"  # original size, 0..255
        assert (tmp_path / "pred" / "overlay" / p.name).is_file()
    with pytest.raises(SystemExit):
        predict_main([str(tmp_path / "missing"), "--checkpoint", ckpt, "--out", str(tmp_path / "p2")])


def test_bare_checkpoint_needs_matching_model(tmp_path, data):
    assert run(tmp_path / "t", data, "--epochs", "1") == 0
    torch.save({"model": load_checkpoint(tmp_path / "t" / "checkpoint-0.pth")["model"]}, tmp_path / "bare.pth")
    with pytest.raises(SystemExit, match="does not fit"):  # no model_config: ResNet-101 by default
        evaluate_main(["--checkpoint", str(tmp_path / "bare.pth"), "--test_data_path", str(data / "test.json")])


@pytest.mark.parametrize("bad, message", [
    (["--image_size", "40"], "multiple of 16"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--data_path", "/nowhere"], "does not exist"),
    (["--resume", "/nowhere.pth"], "is not a file"),
    (["--if_resizing", "--if_padding"], "not allowed with"),
    (["--omega", "-1"], "omega must be >= 0"),
])
def test_bad_arguments_are_rejected_before_work(bad, message, capsys):
    with pytest.raises(SystemExit):
        train.resolve_args(bad)
    assert message in capsys.readouterr().err
