"""Data problems are named: JSON lists in encodings that cannot be read, broken links,
rotated JPEGs, a file that vanishes mid-run, and an output that hits a file-size
limit. Each ends in one clear line, never a traceback."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import TINY_TRAIN, synthetic_split
from ncl_fast import distributed
from ncl_fast.check_data import main as check_data_main
from ncl_fast.engine.checkpoints import load_checkpoint
from ncl_fast.engine.config import resolve
from ncl_fast.engine.loop import run_training


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_split(tmp_path_factory.mktemp("synth"), n=10, seed=4, n_train=8)


def train(tmp, train_json, *extra):
    config = resolve(TINY_TRAIN + ["--data_path", str(train_json), "--output_dir", str(tmp)] + list(extra))
    return run_training(config, distributed.setup("cpu"))


@pytest.mark.slow
def test_json_lists_in_utf16_read_and_in_latin1_are_named(tmp_path, data, capsys):
    pairs = json.loads((data / "train.json").read_text())
    for i, (img, mask) in enumerate(pairs[:4]):  # names with accents
        for src, name in ((img, f"Tp/é{i}.png"), (mask, f"Gt/é{i}.png")):
            shutil.copy(data / src, data / name)
    accented = [[f"Tp/é{i}.png", f"Gt/é{i}.png"] for i in range(4)]
    (data / "utf16.json").write_text(json.dumps(accented, ensure_ascii=False), encoding="utf-16")
    assert check_data_main([str(data / "utf16.json")]) == 0
    (data / "latin1.json").write_bytes(json.dumps(accented, ensure_ascii=False).encode("latin-1"))
    capsys.readouterr()
    assert check_data_main([str(data / "latin1.json")]) == 2
    out = capsys.readouterr().out
    assert "latin1.json: the JSON is not UTF-8 (nor UTF-16/32) text" in out and "save it as UTF-8" in out
    assert train(tmp_path, data / "latin1.json") == 2
    err = capsys.readouterr().err
    assert "latin1.json: the JSON list is not UTF-8 (nor UTF-16/32) text" in err and "Traceback" not in err


def test_broken_links_are_named(tmp_path, data, capsys):
    root = tmp_path / "set"
    for sub in ("Tp", "Gt"):
        (root / sub).mkdir(parents=True)
    pairs = json.loads((data / "train.json").read_text())[:3]
    for img, mask in pairs:
        shutil.copy(data / img, root / img)
        shutil.copy(data / mask, root / mask)
    os.symlink(tmp_path / "gone.png", root / "Tp" / "zz_lost.png")
    os.symlink(tmp_path / "gone_mask.png", root / "Gt" / "zz_lost.png")
    capsys.readouterr()
    assert check_data_main([str(root)]) == 2
    out = capsys.readouterr().out
    assert f"{root / 'Tp' / 'zz_lost.png'}: a broken link to {tmp_path / 'gone.png'}" in out
    assert "OK" not in out.splitlines()[-1]


def test_a_rotated_jpeg_gets_a_warning(tmp_path, capsys):
    root = tmp_path / "set"
    for sub in ("Tp", "Gt"):
        (root / sub).mkdir(parents=True)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    photo.save(root / "Tp" / "a.jpg", exif=exif)
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(root / "Gt" / "a.png")
    assert check_data_main([str(root)]) == 0
    out = capsys.readouterr().out
    assert "a.jpg: its EXIF orientation is 6" in out and "would not align" in out


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_an_image_that_vanishes_mid_run_is_named_and_the_run_saved(tmp_path, data, capsys, workers):
    pairs = json.loads((data / "train.json").read_text())
    (tmp_path / "copy").mkdir()
    listed = []
    for i, (img, mask) in enumerate(pairs):
        shutil.copy(data / img, tmp_path / "copy" / f"{i}.png")
        listed.append([f"copy/{i}.png", mask if mask == "Negative" else str(data / mask)])
    (tmp_path / "list.json").write_text(json.dumps(listed))
    from ncl_fast.engine import loop

    real = loop.Trainer.train_epoch

    def remove_then_train(self, epoch):
        if epoch == 1:  # checked before the run, gone since
            for p in (tmp_path / "copy").iterdir():
                p.unlink()
        return real(self, epoch)

    loop.Trainer.train_epoch = remove_then_train
    try:
        assert train(tmp_path / "out", tmp_path / "list.json", "--epochs", "3", "--num_workers", str(workers)) == 1
    finally:
        loop.Trainer.train_epoch = real
    err = capsys.readouterr().err
    assert "error: cannot read " + str(tmp_path / "copy") in err and "training stopped at epoch 1, step 0" in err
    assert "--resume auto" in err and "Traceback" not in err
    assert load_checkpoint(tmp_path / "out" / "checkpoint-1.pth")["next_epoch"] == 1


@pytest.mark.slow
def test_a_file_size_limit_is_one_error_line_and_keeps_the_previous_checkpoint(tmp_path, data):
    """A quota or a full disk, as `ulimit -f` makes it: the checkpoint write fails."""
    common = [sys.executable, "-m", "ncl_fast.train", *TINY_TRAIN, "--data_path", str(data / "train.json"),
              "--output_dir", str(tmp_path), "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.run(common + ["--epochs", "1"], capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    before = (tmp_path / "checkpoint-0.pth").read_bytes()
    limit_kb = 64  # far below a checkpoint's size, above log.txt's
    cmd = " ".join(f"'{a}'" for a in common + ["--epochs", "2", "--resume", "auto"])
    second = subprocess.run(["bash", "-c", f"ulimit -f {limit_kb}; exec {cmd}"], capture_output=True, text=True,
                            env=env, timeout=600)
    assert second.returncode == 1, second.stderr[-2000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "checkpoint-1.pth" in errors[0] and "Traceback" not in second.stderr
    assert (tmp_path / "checkpoint-0.pth").read_bytes() == before
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
