"""The main job on a tiny model: train, checkpoint, resume exactly, Ctrl-C,
evaluate and predict, and bad arguments."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TINY_TRAIN, synthetic_split
from ncl_fast import distributed
from ncl_fast.engine import loop
from ncl_fast.engine.config import resolve
from ncl_fast.engine.loop import run_training
from ncl_fast.engine.checkpoints import load_checkpoint
from ncl_fast.data import ForgeryDataset
from ncl_fast.evaluate import main as evaluate_main
from ncl_fast.predict import main as predict_main

TINY = TINY_TRAIN


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_split(tmp_path_factory.mktemp("synth"), n=10, seed=1, n_train=8)


def run(tmp, data, *extra):
    args = resolve(TINY + ["--data_path", str(data / "train.json"), "--test_data_path",
                           str(data / "test.json"), "--output_dir", str(tmp)] + list(extra))
    return run_training(args, distributed.setup("cpu"))


#: log.txt keys that measure time, not training: they differ between any two runs
TIMINGS = ("train_images_per_s", "train_data_wait", "train_host_ms")


def weights(path):
    return load_checkpoint(path)["model"]


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_equals_uninterrupted(tmp_path, data, optimizer):
    assert run(tmp_path / "a", data, "--epochs", "3", "--optimizer", optimizer) == 0
    # stop in the middle of epoch 1 (4 steps per epoch), then resume
    assert run(tmp_path / "b", data, "--epochs", "3", "--max_steps", "6", "--optimizer", optimizer) == 0
    ckpt = load_checkpoint(tmp_path / "b" / "checkpoint-1.pth")
    assert (ckpt["next_epoch"], ckpt["next_step"], ckpt["global_step"]) == (1, 2, 6)
    assert run(tmp_path / "b", data, "--epochs", "3", "--resume", "auto", "--optimizer", optimizer) == 0
    assert same(weights(tmp_path / "a" / "checkpoint-2.pth"), weights(tmp_path / "b" / "checkpoint-2.pth"))
    # the log's epoch means cover the whole epoch, also the one split by the stop (its last record counts)
    logs = {}
    for x in ("a", "b"):
        for line in (tmp_path / x / "log.txt").read_text().splitlines():
            record = json.loads(line)
            for key in TIMINGS:
                record.pop(key)
            logs.setdefault(x, {})[record["epoch"]] = record
    assert logs["a"] == logs["b"]
    ca, cb = (load_checkpoint(tmp_path / x / "checkpoint-2.pth") for x in ("a", "b"))
    assert ca["optimizer"]["state"].keys() == cb["optimizer"]["state"].keys()
    for k, state in ca["optimizer"]["state"].items():
        for name, value in state.items():
            other = cb["optimizer"]["state"][k][name]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, name


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_saves_at_the_step_boundary_and_resumes(tmp_path, data, monkeypatch, capsys, signum, code):
    """Ctrl-C, or the SIGTERM a cluster sends before it kills a job, while a batch is
    being loaded: that batch's step still runs, then a checkpoint, the exit status and
    an exact resumption."""
    import os
    import signal

    assert run(tmp_path / "a", data, "--epochs", "2") == 0
    calls = {"n": 0}
    original = ForgeryDataset.__getitem__

    def signal_on_the_fifth_item(self, index):
        calls["n"] += 1
        if self.train and calls["n"] == 5:
            os.kill(os.getpid(), getattr(signal, signum))
        return original(self, index)

    monkeypatch.setattr(ForgeryDataset, "__getitem__", signal_on_the_fifth_item)
    assert run(tmp_path / "b", data, "--epochs", "2") == code
    assert f"interrupted by {signum}: saved" in capsys.readouterr().err
    ckpt = load_checkpoint(tmp_path / "b" / "checkpoint-0.pth")
    assert (ckpt["next_epoch"], ckpt["next_step"]) == (0, 3)  # items 5-6 are step 3: it runs, then the stop
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
        prob = np.asarray(Image.open(tmp_path / "pred" / "prob" / p.name))
        mask = np.asarray(Image.open(tmp_path / "pred" / "mask" / p.name))
        assert prob.shape == mask.shape == Image.open(p).size[::-1] and prob.dtype == mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}  # binary at the evaluation threshold
        assert (prob[mask == 255] >= 128).all() and (prob[mask == 0] <= 128).all()
        assert (tmp_path / "pred" / "overlay" / p.name).is_file()
    assert not (tmp_path / "pred" / "pred").exists()
    assert predict_main([str(tmp_path / "missing"), "--checkpoint", ckpt, "--out", str(tmp_path / "p2")]) == 2
    assert "missing does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_bare_checkpoint_needs_matching_model(tmp_path, data, capsys):
    assert run(tmp_path / "t", data, "--epochs", "1") == 0
    torch.save({"model": load_checkpoint(tmp_path / "t" / "checkpoint-0.pth")["model"]}, tmp_path / "bare.pth")
    capsys.readouterr()
    # no model_config: ResNet-101 by default
    assert evaluate_main(["--checkpoint", str(tmp_path / "bare.pth"), "--test_data_path", str(data / "test.json")]) == 2
    err = capsys.readouterr().err
    assert "bare.pth does not fit" in err and "pass --backbone as trained" in err and "Traceback" not in err


@pytest.mark.parametrize("bad, message", [
    (["--image_size", "40"], "multiple of 16"),
    (["--batch_size", "0"], "argument --batch_size/--batch-size: must be >= 1, got 0"),
    (["--lr", "-1"], "argument --lr: must be > 0, got -1.0"),
    (["--data_path", "/nowhere"], "does not exist"),
    (["--resume", "/nowhere.pth"], "is not a file"),
    (["--if_resizing", "--if_padding"], "not allowed with"),
    (["--omega", "-1"], "argument --omega: must be >= 0, got -1.0"),
    (["--accum_steps", "3"], "--accum_steps must divide --batch_size"),
])
def test_bad_arguments_are_rejected_before_work(bad, message, capsys):
    with pytest.raises(SystemExit):
        resolve(bad)
    assert message in capsys.readouterr().err


# ---- nothing lost: interrupts, damaged checkpoints, output locations ------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data):
    """Two epochs without a stop (4 steps each): the reference for exact resumption."""
    out = tmp_path_factory.mktemp("uninterrupted")
    assert run(out, data, "--epochs", "2") == 0
    return out


def same_state(a, b):
    """Bit-identical weights, BatchNorm statistics and counts, and optimizer state."""
    assert same(a["model"], b["model"])
    for k, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            other = b["optimizer"]["state"][k][name]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, name
    return True


@pytest.mark.slow
@pytest.mark.parametrize("where", ["forward", "update"])
def test_interrupt_inside_a_step_resumes_exactly(tmp_path, data, uninterrupted, monkeypatch, capsys, where):
    """Ctrl-C in the middle of step 3: after the forward pass has moved the BatchNorm
    statistics and the dropout RNG, or during the optimizer update. Either way the
    step completes, then the checkpoint: no per-step copy of the state is needed."""
    import os
    import signal

    from ncl_fast.model.loss import NCLCriterion

    calls = {"n": 0}
    if where == "forward":
        original = NCLCriterion.forward

        def patched(self, *args, **kwargs):
            calls["n"] += 1
            out = original(self, *args, **kwargs)
            if calls["n"] == 3:
                os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, after the forward pass moved the state
            return out

        monkeypatch.setattr(NCLCriterion, "forward", patched)
        done = 3  # the step finishes and counts
    else:
        original = torch.amp.GradScaler.update

        def patched(self, *args, **kwargs):
            calls["n"] += 1
            original(self, *args, **kwargs)
            if calls["n"] == 3:
                os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, between the update and the step count

        monkeypatch.setattr(torch.amp.GradScaler, "update", patched)
        done = 3  # the update finishes and counts
    assert run(tmp_path, data, "--epochs", "2") == 130
    assert "interrupted by SIGINT: saved" in capsys.readouterr().err
    ckpt = load_checkpoint(tmp_path / "checkpoint-0.pth")
    assert (ckpt["next_epoch"], ckpt["next_step"], ckpt["global_step"]) == (0, done, done)
    monkeypatch.setattr(NCLCriterion if where == "forward" else torch.amp.GradScaler,
                        "forward" if where == "forward" else "update", original)
    assert run(tmp_path, data, "--epochs", "2", "--resume", "auto") == 0
    assert same_state(load_checkpoint(uninterrupted / "checkpoint-1.pth"), load_checkpoint(tmp_path / "checkpoint-1.pth"))


def test_resume_auto_skips_damaged_checkpoints(tmp_path, data, uninterrupted, capsys):
    import os
    import shutil

    shutil.copy(uninterrupted / "checkpoint-0.pth", tmp_path / "checkpoint-0.pth")
    good = (uninterrupted / "checkpoint-1.pth").read_bytes()
    (tmp_path / "checkpoint-1.pth").write_bytes(good[: len(good) // 2])  # a truncated copy, the newest
    os.utime(tmp_path / "checkpoint-0.pth", (1, 1))
    capsys.readouterr()
    assert run(tmp_path, data, "--epochs", "2", "--resume", "auto") == 0
    err = capsys.readouterr().err
    assert "--resume auto skips checkpoint" in err and "checkpoint-1.pth cannot be read" in err
    assert same_state(load_checkpoint(uninterrupted / "checkpoint-1.pth"), load_checkpoint(tmp_path / "checkpoint-1.pth"))


def test_damaged_or_foreign_checkpoints_stop_with_a_clear_message(tmp_path, data, uninterrupted, capsys):
    good = (uninterrupted / "checkpoint-1.pth").read_bytes()
    (tmp_path / "damaged.pth").write_bytes(good[:1000])
    assert run(tmp_path / "a", data, "--epochs", "2", "--resume", str(tmp_path / "damaged.pth")) == 2
    err = capsys.readouterr().err
    assert "damaged.pth cannot be read" in err and "--resume auto" in err and "Traceback" not in err
    # every checkpoint in the folder damaged: auto says so rather than starting afresh over them
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "checkpoint-0.pth").write_bytes(b"garbage")
    assert run(tmp_path / "b", data, "--epochs", "2", "--resume", "auto") == 2
    assert "no checkpoint in" in capsys.readouterr().err
    # another architecture: named by its options, or by the first mismatching tensor
    assert run(tmp_path / "c", data, "--epochs", "2", "--width", "16", "--resume",
               str(uninterrupted / "checkpoint-0.pth")) == 2
    err = capsys.readouterr().err
    assert "checkpoint-0.pth was trained with --width 8 (this run: 16)" in err and "Traceback" not in err
    torch.save({"model": load_checkpoint(uninterrupted / "checkpoint-0.pth")["model"]}, tmp_path / "bare.pth")
    assert run(tmp_path / "d", data, "--epochs", "2", "--width", "16", "--resume", str(tmp_path / "bare.pth")) == 2
    err = capsys.readouterr().err
    assert "bare.pth holds another architecture (size mismatch" in err and "Traceback" not in err


def test_resuming_a_finished_run_says_so(tmp_path, data, uninterrupted, capsys):
    import shutil

    shutil.copytree(uninterrupted, tmp_path / "done")
    before = (tmp_path / "done" / "checkpoint-1.pth").read_bytes()
    capsys.readouterr()
    assert run(tmp_path / "done", data, "--epochs", "2", "--resume", "auto") == 0
    out = capsys.readouterr().out
    assert "nothing to do: " in out and "checkpoint-1.pth already finished all 2 epoch(s)" in out
    assert (tmp_path / "done" / "checkpoint-1.pth").read_bytes() == before


@pytest.mark.parametrize("option", ["--output_dir", "--log_dir"])
def test_unwritable_outputs_stop_training_before_any_work(tmp_path, data, monkeypatch, capsys, option):
    (tmp_path / "file").write_text("in the way")
    from ncl_fast.engine import datasets

    monkeypatch.setattr(datasets, "load_training_data", lambda *a: pytest.fail("work started"))
    target = str(tmp_path / "file" / "sub")
    args = resolve(TINY + ["--data_path", str(data / "train.json"), "--output_dir",
                                      target if option == "--output_dir" else str(tmp_path / "out")]
                              + (["--log_dir", target] if option == "--log_dir" else []))
    assert run_training(args, distributed.setup("cpu")) == 2
    err = capsys.readouterr().err
    assert f"error: {option} {target}: {tmp_path / 'file'} is a file, not a folder" in err


def test_no_room_for_a_checkpoint_stops_before_training(tmp_path, data, monkeypatch, capsys):
    from ncl_fast import cli

    monkeypatch.setattr(cli.shutil, "disk_usage", lambda p: type("Usage", (), {"free": 1000})())
    monkeypatch.setattr(loop.Trainer, "run", lambda self: pytest.fail("training started"))
    assert run(tmp_path, data, "--epochs", "1") == 2
    assert "MiB free, about" in capsys.readouterr().err


def test_a_checkpoint_that_cannot_be_written_fails_with_exit_1(tmp_path, data, monkeypatch, capsys):
    import errno

    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    assert run(tmp_path, data, "--epochs", "1") == 1
    err = capsys.readouterr().err
    assert "cannot write " in err and "checkpoint-0.pth (the disk is full)" in err and "Traceback" not in err
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name], "a temporary file was left behind"
    assert real_save is not full


def test_evaluate_and_predict_check_outputs_first(tmp_path, data, uninterrupted, monkeypatch, capsys):
    import ncl_fast.evaluate as ev

    (tmp_path / "file").write_text("in the way")
    monkeypatch.setattr(ev, "evaluate_sets", lambda *a, **k: pytest.fail("work started"))
    ckpt = str(uninterrupted / "checkpoint-1.pth")
    assert evaluate_main(["--checkpoint", ckpt, "--test_data_path", str(data / "test.json"), "--num_workers", "0",
                          "--output_dir", str(tmp_path / "file")]) == 2
    assert "--output_dir" in capsys.readouterr().err
    assert predict_main([str(data / "Tp"), "--checkpoint", ckpt, "--out", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_predict_names_counts_and_exit_codes(tmp_path, data, uninterrupted, capsys):
    src = tmp_path / "in"
    src.mkdir()
    photo = Image.open(sorted((data / "Tp").glob("*.png"))[0])
    photo.save(src / "x.png")
    photo.save(src / "x.jpg")
    (src / "broken.png").write_bytes(b"not an image")
    ckpt = str(uninterrupted / "checkpoint-1.pth")
    capsys.readouterr()
    assert predict_main([str(src), "--checkpoint", ckpt, "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    out, err = capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "o" / "mask").iterdir()) == ["x_jpg.png", "x_png.png"]
    assert sorted(p.name for p in (tmp_path / "o" / "prob").iterdir()) == ["x_jpg.png", "x_png.png"]
    assert "wrote 2 of 3 prediction(s)" in out
    assert "skipping" in err and "broken.png" in err and "1 of 3 image(s) could not be read" in err
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    (nothing / "a.png").write_bytes(b"junk")
    assert predict_main([str(nothing), "--checkpoint", ckpt, "--out", str(tmp_path / "o2")]) == 1
    assert "wrote 0 of 1 prediction(s)" in capsys.readouterr().out


def test_commands_exit_130_on_ctrl_c(tmp_path, data, uninterrupted, monkeypatch, capsys):
    import ncl_fast.evaluate as ev

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "evaluate_sets", ctrl_c)
    assert evaluate_main(["--checkpoint", str(uninterrupted / "checkpoint-1.pth"), "--test_data_path",
                          str(data / "test.json"), "--num_workers", "0"]) == 130
    assert "interrupted" in capsys.readouterr().err


# ---- nothing silent: NaN as null, one fallback line, where the outputs are, labels -------------------------------
def strict_json(text):
    def refuse(constant):
        raise AssertionError(f"bare {constant} in JSON")

    return json.loads(text, parse_constant=refuse)


def test_undefined_figures_are_null_with_a_reason(tmp_path, data, uninterrupted, capsys):
    pairs = json.loads((data / "train.json").read_text())
    tampered = [p for p in pairs if "authentic" not in p[0]][:2]
    (data / "only_tampered.json").write_text(json.dumps(tampered))
    assert run(tmp_path / "t", data, "--epochs", "1", "--test_data_path", str(data / "only_tampered.json")) == 0
    out = capsys.readouterr().out
    assert "image-level AUC: n/a, the set has no authentic images" in out
    log = [strict_json(line) for line in (tmp_path / "t" / "log.txt").read_text().splitlines()]
    assert log[-1]["test_image-level AUC"] is None
    assert evaluate_main(["--checkpoint", str(uninterrupted / "checkpoint-1.pth"), "--test_data_path",
                          str(data / "only_tampered.json"), "--num_workers", "0", "--no-progress",
                          "--output_dir", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "n/a: image-level AUC is undefined: the set has no authentic images" in out
    report = strict_json((tmp_path / "ev" / "eval.json").read_text())
    clean = report["results"]["only_tampered"]["clean"]
    assert clean["image-level AUC"] is None and "no authentic images" in clean["undefined"]["image-level AUC"]


def test_cpu_fallback_is_said_once_before_the_bar(tmp_path, data, monkeypatch, capsys):
    import warnings

    from ncl_fast import _backend

    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run(tmp_path, data, "--epochs", "1") == 0
    assert not [w for w in caught if "ncl_fast" in str(w.message)], [str(w.message) for w in caught]
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "PyTorch reference" in line]
    assert len(lines) == 1 and lines[0].startswith("loss backend: ") and "ncl_terms" in lines[0]
    assert out.index("loss backend: ") < out.index("training full NCL")


def test_end_of_training_says_where_outputs_are(tmp_path, data, capsys):
    assert run(tmp_path / "o", data, "--epochs", "1", "--log_dir", str(tmp_path / "tb")) == 0
    out = capsys.readouterr().out
    ckpt = tmp_path / "o" / "checkpoint-0.pth"
    assert f"newest: {ckpt}" in out and str(tmp_path / "o" / "log.txt") in out
    assert f"tensorboard --logdir {tmp_path / 'tb'}" in out
    assert f"python -m ncl_fast.predict IMAGE_OR_DIR --checkpoint {ckpt}" in out


def test_no_progress_means_no_bars_and_one_test_set_is_named_once(tmp_path, data, monkeypatch, capsys):
    from torch.utils.tensorboard import SummaryWriter

    tags = []
    original = SummaryWriter.add_scalar
    monkeypatch.setattr(SummaryWriter, "add_scalar",
                        lambda self, tag, *a, **k: (tags.append(tag), original(self, tag, *a, **k))[1])
    assert run(tmp_path, data, "--epochs", "1") == 0  # TINY has --no-progress
    err = capsys.readouterr().err
    assert "evaluating" not in err and "it/s" not in err and "epoch 0:" not in err
    assert "test/pixel-level F1" in tags and not [t for t in tags if t.startswith("test/test/")]
    from ncl_fast import distributed
    from ncl_fast.data import load_entries
    from ncl_fast.engine.evaluation import evaluate_dataset
    from ncl_fast.model import NCLModel

    net = NCLModel(18, 1, width=8, head_channels=16).net
    ds = ForgeryDataset(load_entries(str(data / "test.json"))[0], 32)
    evaluate_dataset(net, ds, distributed.Context(), 2, 0, desc="evaluating test")
    assert "evaluating test" in capsys.readouterr().err
    evaluate_dataset(net, ds, distributed.Context(), 2, 0, desc="evaluating test", progress=False)
    assert "evaluating" not in capsys.readouterr().err
