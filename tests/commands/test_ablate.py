"""The ablation runner on a tiny model: tables, JSON and plot written; finished runs
skipped; an interrupted run resumes to the same result; bad input refused."""
import json
import os
import signal
import statistics

import numpy as np
import pytest
from PIL import Image

from helpers import TINY_TRAIN, synthetic_split
from ncl_fast import ablate, train
from ncl_fast.engine import ablation, loop, records

TINY = TINY_TRAIN


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_split(tmp_path_factory.mktemp("synth"), n=10, seed=2, n_train=8)


def argv(out, data, *extra):
    return ["--output_dir", str(out), "--data_path", str(data / "train.json"), "--test_data_path",
            str(data / "test.json")] + TINY + list(extra)


def last_record(run_dir):
    return [json.loads(line) for line in (run_dir / "log.txt").read_text().splitlines()][-1]


@pytest.mark.slow
def test_tables_json_plot_and_skip(tmp_path, data, capsys):
    cmd = argv(tmp_path, data, "--tables", "variants", "--configs", "base", "pivot", "--seeds", "3", "5",
               "--epochs", "2")
    assert ablate.main(cmd) == 0
    for config in ("base", "pivot"):
        for seed in (3, 5):
            run = json.loads((tmp_path / config / f"seed{seed}" / "run.json").read_text())
            assert run["done"] and run["config"] == config and run["seed"] == seed
            assert run["options"]["seed"] == seed and run["options"]["variant"] == config
            assert run["curves"]["eval_epoch"] == [0, 1]  # evaluated every epoch
    # the table's mean and std, recomputed from the runs' own log.txt
    md = (tmp_path / "ablation.md").read_text()
    for label, config in (("Base (BCE)", "base"), ("Base + Pivot (NCL)", "pivot")):
        f1 = [last_record(tmp_path / config / f"seed{s}")["test_pixel-level F1"] for s in (3, 5)]
        auc = [last_record(tmp_path / config / f"seed{s}")["test_pixel-level AUC"] for s in (3, 5)]
        row = next(line for line in md.splitlines() if line.startswith(f"| {label} |"))
        assert f"{np.mean(f1):.4f} ± {np.std(f1, ddof=1):.4f}" in row
        assert f"{np.mean(auc):.4f} ± {np.std(auc, ddof=1):.4f}" in row
        assert f"{f1[0]:.4f}, {f1[1]:.4f}" in row and "| 3 5 |" in row
    assert "Base + Pivot + PC (full)" not in md  # not asked for
    base_row = next(line for line in md.splitlines() if line.startswith("| Base (BCE) |"))
    assert base_row.endswith("| - | - |")  # no NCL term, no probe
    for s in (3, 5):
        probe = json.loads((tmp_path / "pivot" / f"seed{s}" / "run.json").read_text())["probe"]
        # 32 px images hold no pure 16 px patch, so the NCL term and its gradient are 0 here (the
        # probe's value is checked in test_gradient_probe_against_the_total_loss)
        assert probe["ncl_grad_ratio"] == 0 and probe["batches"] == 4
    pivot_row = next(line for line in md.splitlines() if line.startswith("| Base + Pivot (NCL) |"))
    assert pivot_row.endswith("| 0.000 ± 0.000 | 0.000 ± 0.000 |")
    record = json.loads((tmp_path / "ablation.json").read_text())
    rows = record["tables"]["variants"]["rows"]
    assert [r["config"] for r in rows] == ["base", "pivot"]
    assert rows[0]["stats"]["test"]["pixel-level IOU"][0] == pytest.approx(statistics.fmean(
        last_record(tmp_path / "base" / f"seed{s}")["test_pixel-level IOU"] for s in (3, 5)))
    png = Image.open(tmp_path / "ablation.png")
    assert png.format == "PNG" and png.size[0] > 800 and png.size[1] > 300
    # run again: nothing is retrained
    logs = {p: p.read_text() for p in tmp_path.glob("*/seed*/log.txt")}
    capsys.readouterr()
    assert ablate.main(cmd) == 0
    out = capsys.readouterr().out
    assert out.count("finished before, skipped") == 4 and ": training in" not in out and "resuming" not in out
    assert {p: p.read_text() for p in tmp_path.glob("*/seed*/log.txt")} == logs


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_result(tmp_path, data, monkeypatch):
    cmd = ["--tables", "variants", "--configs", "full", "--seeds", "0", "--epochs", "2"]
    assert ablate.main(argv(tmp_path / "a", data, *cmd)) == 0
    calls = []
    original = loop.Trainer.train_step

    def interrupt_at_step_6(self, image, mask, lr):
        calls.append(1)
        if len(calls) == 6:  # in the middle of epoch 1 (4 steps per epoch)
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, image, mask, lr)

    monkeypatch.setattr(loop.Trainer, "train_step", interrupt_at_step_6)
    assert ablate.main(argv(tmp_path / "b", data, *cmd)) == 130
    state = json.loads((tmp_path / "b" / "full" / "seed0" / "run.json").read_text())
    assert not state["done"] and list((tmp_path / "b" / "full" / "seed0").glob("checkpoint-*.pth"))
    monkeypatch.setattr(loop.Trainer, "train_step", original)
    assert ablate.main(argv(tmp_path / "b", data, *cmd)) == 0
    a = json.loads((tmp_path / "a" / "full" / "seed0" / "run.json").read_text())
    b = json.loads((tmp_path / "b" / "full" / "seed0" / "run.json").read_text())
    assert b["done"] and b["final"] == a["final"] and b["curves"] == a["curves"]


@pytest.mark.slow
def test_vit_rows_take_the_vit_and_drop_resnet_options(tmp_path, data):
    """--backbone 18 --width 8 are for the ResNet rows: the ViT rows run --vit_backbone instead."""
    assert ablate.main(argv(tmp_path, data, "--tables", "backbones", "--configs", "vit-full", "--seeds", "0",
                            "--epochs", "1", "--vit_backbone", "vit_demo")) == 0
    run = json.loads((tmp_path / "vit-full" / "seed0" / "run.json").read_text())
    assert run["done"] and run["options"]["backbone"] == "vit_demo"
    assert run["options"]["width"] is None and run["options"]["pivot_stage"] is None
    from ncl_fast.engine.checkpoints import newest_readable

    _, ckpt, _ = newest_readable(tmp_path / "vit-full" / "seed0")
    assert ckpt["model_config"]["backbone"] == "vit_demo"
    assert "| ViT + NCL + PC (full) | 0 |" in (tmp_path / "ablation.md").read_text()


def test_bad_input_is_refused_before_any_work(tmp_path, data, capsys):
    assert ablate.main(argv(tmp_path, data, "--variant", "base")) == 2
    assert "--variant: the runner sets this" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        ablate.main(argv(tmp_path, data, "--tables", "variants", "--configs", "vit-base"))
    assert exc.value.code == 2 and "in none of the tables" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        ablate.main(argv(tmp_path, data, "--seeds", "1", "1"))
    assert exc.value.code == 2 and "repeats a seed" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "nothing was written"
    # a run folder made with other options is not silently reused
    run_dir = tmp_path / "base" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"argv": ["--epochs", "7"], "done": True}))
    assert ablate.main(argv(tmp_path, data, "--tables", "variants", "--configs", "base", "--seeds", "0")) == 2
    err = capsys.readouterr().err
    assert str(run_dir) in err and "other options" in err


@pytest.mark.slow
def test_runs_are_compared_by_value_not_by_spelling(tmp_path, data, capsys):
    """The same options in another order or spelling, and options that cannot change
    results (workers, progress bars), leave a finished run finished."""
    cmd = ["--tables", "variants", "--configs", "base", "--seeds", "0", "--epochs", "1"]
    assert ablate.main(argv(tmp_path, data, *cmd)) == 0
    first = argv(tmp_path, data, *cmd)
    pairs = [first[i:i + 2] for i in range(0, 6, 2)]  # --output_dir, --data_path, --test_data_path and values
    reordered = (sum(pairs[::-1], []) + [a.replace("--image_size", "--image-size") for a in first[6:]]
                 + ["--num_workers", "1", "--log_every", "3"])
    capsys.readouterr()
    assert ablate.main(reordered) == 0
    assert "finished before, skipped" in capsys.readouterr().out
    # an option that changes results makes it another run
    assert ablate.main(argv(tmp_path, data, *cmd, "--lr", "0.02")) == 2
    assert "lr" in capsys.readouterr().err


@pytest.mark.slow
def test_gradient_probe_against_the_total_loss(tmp_path, data):
    """The probe's NCL gradient, recomputed as grad(total loss) - grad(rest): the same ratio."""
    import torch

    from ncl_fast import distributed
    from ncl_fast.data import ForgeryDataset, load_entries, to_model_input
    from ncl_fast.engine.checkpoints import model_from_checkpoint, newest_readable

    # 64 px images and 8 px patches: tampered and authentic patches to contrast
    assert train.main(argv(tmp_path, data, "--variant", "full", "--epochs", "1", "--omega", "0.5", "--image_size",
                           "64", "--test_image_size", "64", "--patch_px", "8")) == 0
    probe = ablation.gradient_share(tmp_path, distributed.Context(), batches=1)
    path, ckpt, _ = newest_readable(tmp_path)
    model, _ = model_from_checkpoint(str(path), torch.device("cpu"))
    model.criterion.config.omega, model.criterion.config.patch_px = 0.5, 8
    model.train()
    model.net.aspp.dropout.eval()
    ds = ForgeryDataset(load_entries(str(data / "train.json"))[0], 64, "resize", train=True, seed=0)
    items = [ds[i] for i in torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:2].tolist()]
    image, mask, _ = to_model_input({"image": torch.stack([it["image"] for it in items]),
                                     "mask": torch.stack([it["mask"] for it in items])}, "cpu")
    params = [p for n, p in model.named_parameters() if n.startswith("net.")]
    parts = model.criterion(model.net(image), mask, model.pivot)
    g_total = torch.autograd.grad(parts["loss"], params, retain_graph=True, allow_unused=True)
    g_rest = torch.autograd.grad(parts["pc"], params, allow_unused=True)
    flat = lambda gs: torch.cat([(g if g is not None else torch.zeros_like(p)).double().reshape(-1)
                                 for g, p in zip(gs, params)])
    total, rest = flat(g_total), flat(g_rest)
    assert probe["ncl_grad_ratio"] == pytest.approx(((total - rest).norm() / rest.norm()).item(), rel=1e-3)
    assert probe["ncl_grad_ratio"] > 1e-4


def test_metrics_of_several_test_sets():
    record = {"epoch": 3, "test_CASIAv1_pixel-level F1": 0.5, "test_CASIAv1_pixel-level AUC": 0.75,
              "test_Columbia_pixel-level F1": 0.25, "test_Columbia_pixel-level F1 (tampered only)": 0.9,
              "test_Columbia_pixel-level IOU": 0.125, "train_loss": 1.0}
    assert records.test_metrics(record) == {
        "CASIAv1": {"pixel-level F1": 0.5, "pixel-level AUC": 0.75},
        "Columbia": {"pixel-level F1": 0.25, "pixel-level IOU": 0.125},
    }
    one = {"test_pixel-level F1": 0.5, "test_pixel-level F1 (dataset-level)": 0.1, "test_pixel-level IOU": 0.2}
    assert records.test_metrics(one) == {"test": {"pixel-level F1": 0.5, "pixel-level IOU": 0.2}}
