"""What every command shares: --help texts, option validation, default workers,
exit codes, and the README's set-up line. Nothing here trains a model."""
import re
import shlex

import pytest

from helpers import ROOT
from ncl_fast import check_data, cli, evaluate, predict, synth, train
from ncl_fast.engine.config import PRESETS, resolve

PARSERS = {
    "train": train.build_parser,
    "evaluate": evaluate.build_parser,
    "predict": predict.build_parser,
    "check_data": check_data.build_parser,
    "synth": synth.build_parser,
}
MAINS = {"train": train.main, "evaluate": evaluate.main, "predict": predict.main, "synth": synth.main}
REQUIRED = {
    "train": [],
    "evaluate": ["--checkpoint", "c.pth", "--test_data_path", "t.json"],
    "predict": ["in.png", "--checkpoint", "c.pth", "--out", "o"],
    "synth": ["out"],
}


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_help_is_whole(name):
    ap = PARSERS[name]()
    text = ap.format_help()
    assert text.startswith(f"usage: python -m ncl_fast.{name} ")
    # the description is the module's docstring, whole: it ends a sentence, and appears once
    first = ap.description.strip().splitlines()[0]
    assert text.count(first) == 1, "description printed twice"
    paragraphs = [p for p in ap.description.strip().split("\n\n") if p.strip()]
    assert all(p.rstrip().endswith((".", ":", ")", "`")) for p in paragraphs), paragraphs
    for action in ap._actions:
        if action.dest != "help":
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help"


def test_train_help_shows_preset_defaults_and_the_synthetic_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("NCL_FAST_SYNTH_DIR", str(tmp_path / "cache-here"))
    text = " ".join(train.build_parser().format_help().split())
    for key in ("batch_size", "lr", "epochs", "image_size", "backbone", "optimizer", "num_workers"):
        values = f"demo: {PRESETS['demo'][key]}; paper: {PRESETS['paper'][key]}"
        assert values in text, key
    assert str(tmp_path / "cache-here") in text
    assert "--output-dir OUTPUT_DIR folder for checkpoint-<epoch>.pth and log.txt" in text


BAD = [
    ("train", ["--lr", "nan"], "--lr: 'nan' is not a finite number"),
    ("train", ["--lr", "inf"], "--lr: 'inf' is not a finite number"),
    ("train", ["--image_size", "0"], "--image_size/--image-size: must be a positive multiple of 16"),
    ("train", ["--test_image_size", "-16"], "must be a positive multiple of 16, got -16"),
    ("train", ["--epochs", "0"], "must be >= 1, got 0"),
    ("train", ["--num_workers", "-1"], "must be >= 0, got -1"),
    ("train", ["--tau", "0"], "--tau: must be > 0, got 0.0"),
    ("train", ["--mu", "1.5"], "--mu: must be in [0, 1], got 1.5"),
    ("train", ["--tol", "0.5"], "--tol: must be in [0, 0.5), got 0.5"),
    ("train", ["--dropout", "nan"], "not a finite number"),
    ("train", ["--weight_decay", "-0.1"], "must be >= 0"),
    ("train", ["--momentum", "1"], "must be in [0, 1)"),
    ("train", ["--seed", "-3"], "must be >= 0"),
    ("train", ["--keep_checkpoints", "x"], "'x' is not an integer"),
    ("train", ["--width", "12"], "--width must be a multiple of 8"),
    ("evaluate", ["--image_size", "7"], "must be a positive multiple of 16, got 7"),
    ("evaluate", ["--image_size", "-16"], "must be a positive multiple of 16, got -16"),
    ("evaluate", ["--image_size", "0"], "must be a positive multiple of 16, got 0"),
    ("evaluate", ["--batch_size", "0"], "must be >= 1, got 0"),
    ("evaluate", ["--num_workers", "-2"], "must be >= 0, got -2"),
    ("predict", ["--image_size", "7"], "must be a positive multiple of 16, got 7"),
    ("predict", ["--image_size", "-16"], "must be a positive multiple of 16, got -16"),
    ("predict", ["--image_size", "0"], "must be a positive multiple of 16, got 0"),
    ("synth", ["--n", "0"], "must be >= 1, got 0"),
    ("synth", ["--n", "nan"], "'nan' is not an integer"),
]


@pytest.mark.parametrize("name, bad, message", BAD, ids=[f"{n}{' '.join(b)}" for n, b, _ in BAD])
def test_bad_numbers_stop_every_command_with_exit_2(name, bad, message, capsys):
    with pytest.raises(SystemExit) as exc:
        if name == "train":
            resolve(REQUIRED[name] + bad)
        else:
            MAINS[name](REQUIRED[name] + bad)
    assert exc.value.code == cli.USAGE
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_default_workers_follow_the_cpus(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert cli.default_workers() == 1
    assert resolve([]).num_workers == 1  # the demo preset's 2, capped
    assert resolve(["--preset", "paper"]).num_workers == 1
    assert resolve(["--num_workers", "3"]).num_workers == 3  # asked for: kept
    assert evaluate.build_parser().parse_args(REQUIRED["evaluate"]).num_workers == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert cli.default_workers() == 4 and resolve(["--preset", "paper"]).num_workers == 8


def test_command_wrapper_maps_outcomes_to_exit_codes(capsys):
    def raising(exc):
        @cli.command
        def main():
            raise exc
        return main()

    assert raising(cli.UsageError("bad --x 3")) == 2
    assert raising(cli.RunError("disk full")) == 1
    assert raising(KeyboardInterrupt()) == 130
    err = capsys.readouterr().err
    assert "error: bad --x 3" in err and "error: disk full" in err and "interrupted" in err


def test_output_dir_checks(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(cli.UsageError, match=r"--out .*file/sub: .*file is a file, not a folder"):
        cli.check_output_dir(tmp_path / "file" / "sub", "--out")
    assert cli.check_output_dir(tmp_path / "new" / "deep", "--out").is_dir()
    assert not list((tmp_path / "new" / "deep").iterdir()), "the write test leaves nothing behind"
    monkeypatch.setattr(cli.shutil, "disk_usage", lambda p: type("U", (), {"free": 5 << 20})())
    with pytest.raises(cli.UsageError, match=r"only 5 MiB free, about 100 MiB are needed"):
        cli.check_output_dir(tmp_path / "new", "--output_dir", need_bytes=100 << 20)


def test_json_safe_writes_null():
    import json

    safe = cli.json_safe({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2}})
    assert json.dumps(safe, allow_nan=False) == '{"a": null, "b": [1.0, null], "c": {"d": 2}}'


def test_readme_set_up_installs_numpy_with_torch_and_documents_exit_codes():
    readme = (ROOT / "README.md").read_text()
    setup = next(line for line in readme.splitlines() if line.startswith("python3 -m venv .venv"))
    torch_install = next(cmd for cmd in setup.split("&&") if "torch==" in cmd)
    assert "numpy" in shlex.split(torch_install), "numpy must come with torch, before the extension is built"
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"pip install .*torch==\S+ numpy", ci)
    assert "python -m pytest -q tests" in readme
    for code in ("0", "1", "2", "130"):
        assert re.search(rf"^\| `?{code}`? \|", readme, re.M), f"exit code {code} is not in the README's table"


def test_protocol_option_of_train_and_evaluate(monkeypatch, capsys):
    """--protocol reaches the training configuration; without OpenCV, IMDL-BenCo's protocol with
    resizing stops before any work (exit 2), naming what to install; padding needs no OpenCV."""
    import sys

    assert resolve([]).protocol == "ncl_fast"
    assert resolve(["--protocol", "benco13", "--if_padding"]).protocol == "benco13"
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 fails
    with pytest.raises(SystemExit) as stop:
        resolve(["--protocol", "benco", "--if_resizing"])
    assert stop.value.code == 2 and "pip install opencv-python-headless" in capsys.readouterr().err
    assert resolve(["--protocol", "benco", "--if_padding"]).protocol == "benco"
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--checkpoint", "nowhere.pth", "--test_data_path", "nowhere", "--protocol", "benco2"])
    assert stop.value.code == 2 and "invalid choice: 'benco2'" in capsys.readouterr().err
