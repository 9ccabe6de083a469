"""Datasets in IMDL-BenCo's formats, and every bad-input path."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ncl_fast.check_data import main as check_data_main
from ncl_fast.data import DatasetError, Entry, ForgeryDataset, list_dataset, list_test_sets, load_entries, read_mask
from ncl_fast.data.attacks import grid


def write_pair(root, stem, size=(40, 48), tampered=True, mask_mode="L", mask_values=(0, 255), rng=None):
    rng = rng or np.random.default_rng(0)
    h, w = size
    (root / "Tp").mkdir(parents=True, exist_ok=True)
    (root / "Gt").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "Tp" / f"{stem}.png")
    m = np.zeros((h, w), np.uint8)
    if tampered:
        m[h // 4 : h // 2, w // 3 : w // 2] = 1
    m = np.where(m > 0, mask_values[1], mask_values[0]).astype(np.uint8)
    img = Image.fromarray(m)
    if mask_mode == "RGB-colour":
        rgb = np.zeros((h, w, 3), np.uint8)
        rgb[..., 0] = m  # red marks the region
        img = Image.fromarray(rgb)
    elif mask_mode != "L":
        img = img.convert(mask_mode)
    img.save(root / "Gt" / f"{stem}.png")


@pytest.fixture
def folder(tmp_path):
    for k in range(4):
        write_pair(tmp_path / "ds", f"img{k}", tampered=k != 3)
    return tmp_path / "ds"


def test_tp_gt_folder(folder):
    entries, report = load_entries(str(folder))
    assert [e.image.split("/")[-1] for e in entries] == ["img0.png", "img1.png", "img2.png", "img3.png"]
    assert report.tampered == 3 and report.authentic == 1 and not report.errors


def test_json_list_with_negative(tmp_path, folder):
    data = [["ds/Tp/img0.png", "ds/Gt/img0.png"], ["ds/Tp/img3.png", "Negative"]]
    (tmp_path / "list.json").write_text(json.dumps(data))
    entries, report = load_entries(str(tmp_path / "list.json"))
    assert entries[1].mask is None and report.authentic == 1
    ds = ForgeryDataset(entries, 32)
    assert ds[1]["mask"].sum() == 0 and ds[1]["label"] == 0 and ds[0]["label"] == 1


def test_test_set_map(tmp_path, folder):
    (tmp_path / "map.json").write_text(json.dumps({"Columbia": "ds", "Coverage": str(folder)}))
    assert list(list_test_sets(str(tmp_path / "map.json"))) == ["Columbia", "Coverage"]
    assert list(list_test_sets(str(folder))) == ["ds"]


@pytest.mark.parametrize("mode", ["L", "1", "P", "RGBA", "RGB"])
def test_mask_formats_read_the_same(tmp_path, mode):
    write_pair(tmp_path, "a", mask_mode=mode)
    m = read_mask(str(tmp_path / "Gt" / "a.png"))
    assert m.dtype == bool and m.sum() == (40 // 2 - 40 // 4) * (48 // 2 - 48 // 3)


def test_invert_masks(tmp_path):
    write_pair(tmp_path, "a")
    m = read_mask(str(tmp_path / "Gt" / "a.png"))
    assert np.array_equal(read_mask(str(tmp_path / "Gt" / "a.png"), invert=True), ~m)


def test_count_mismatch(tmp_path, folder):
    (folder / "Gt" / "img3.png").unlink()
    with pytest.raises(DatasetError, match="4 images in Tp/ but 3 masks in Gt/"):
        list_dataset(str(folder))


def test_name_mismatch_warns(tmp_path):
    write_pair(tmp_path / "ds", "a")
    (tmp_path / "ds" / "Gt" / "a.png").rename(tmp_path / "ds" / "Gt" / "zzz.png")
    _, report = load_entries(str(tmp_path / "ds"))
    assert any("names differ" in w and "a.png" in w for w in report.warnings)


def test_size_mismatch_names_both_files(tmp_path):
    write_pair(tmp_path / "ds", "a")
    Image.new("L", (10, 10)).save(tmp_path / "ds" / "Gt" / "a.png")
    with pytest.raises(DatasetError, match=r"size mismatch: image .*Tp/a.png is 48x40 but mask .*Gt/a.png is 10x10"):
        load_entries(str(tmp_path / "ds"))


def test_corrupt_and_missing_files(tmp_path):
    write_pair(tmp_path / "ds", "a")
    write_pair(tmp_path / "ds", "b")
    (tmp_path / "ds" / "Tp" / "a.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"Tp/a.png: unreadable or corrupt image"):
        load_entries(str(tmp_path / "ds"))
    (tmp_path / "list.json").write_text(json.dumps([["ds/Tp/b.png", "ds/Gt/missing.png"]]))
    with pytest.raises(DatasetError, match=r"missing.png: mask not found"):
        load_entries(str(tmp_path / "list.json"))


def test_empty_and_malformed_lists(tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DatasetError, match="holds no images"):
        load_entries(str(tmp_path / "empty.json"))
    (tmp_path / "bad.json").write_text(json.dumps([["only one"]]))
    with pytest.raises(DatasetError, match="item 0"):
        load_entries(str(tmp_path / "bad.json"))
    (tmp_path / "broken.json").write_text("[[")
    with pytest.raises(DatasetError, match="cannot read the JSON"):
        load_entries(str(tmp_path / "broken.json"))
    with pytest.raises(DatasetError, match="does not exist"):
        load_entries(str(tmp_path / "nowhere"))


def test_binary_and_colour_masks_warn(tmp_path):
    write_pair(tmp_path / "ds", "a", mask_values=(0, 1))
    write_pair(tmp_path / "ds", "b", mask_mode="RGB-colour")
    _, report = load_entries(str(tmp_path / "ds"))
    text = "\n".join(report.warnings)
    assert "a.png: mask values are 0/1" in text
    assert "b.png: the mask is in colour" in text


def test_check_data_cli(tmp_path, folder, capsys):
    assert check_data_main([str(folder)]) == 0
    out = capsys.readouterr().out
    assert "4 images: 3 with tampered pixels, 1 authentic" in out and "OK" in out
    Image.new("L", (10, 10)).save(folder / "Gt" / "img0.png")
    assert check_data_main([str(folder)]) == 2  # bad input
    assert "size mismatch" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["resize", "pad", "crop"])
def test_dataset_modes(tmp_path, mode):
    write_pair(tmp_path / "ds", "a", size=(40, 48))
    entries, _ = load_entries(str(tmp_path / "ds"))
    ds = ForgeryDataset(entries, 32, mode, train=mode == "crop", seed=3, shape_mask=True)
    item = ds[0]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 32, 32)
    assert item["mask"].dtype == item["shape_mask"].dtype == torch.bool
    assert item["mask"].shape == item["shape_mask"].shape == (1, 32, 32)
    assert item["size"].tolist() == [40, 48]
    if mode == "resize":
        assert item["shape_mask"].all()
    if mode == "pad":  # 48 > 32: scaled to 27x32, then padded at the bottom
        assert item["shape_mask"][0, :27].all() and not item["shape_mask"][0, 27:].any()
    if mode == "crop":  # deterministic in (seed, epoch, index), whatever the worker
        again = ds[0]
        assert torch.equal(item["image"], again["image"]) and torch.equal(item["mask"], again["mask"])
        assert torch.equal(ds[(0, 0)]["image"], item["image"])  # a plain index is epoch 0
        assert any(not torch.equal(ds[(epoch, 0)]["image"], item["image"]) for epoch in range(1, 7))
        assert any(not torch.equal(ForgeryDataset(entries, 32, mode, train=True, seed=s)[0]["image"], item["image"])
                   for s in range(4, 10))


@pytest.mark.parametrize("mode, train, expected", [
    ("resize", False, False), ("pad", False, True), ("crop", True, False), ("resize", True, False)])
def test_shape_mask_only_where_evaluation_needs_it(tmp_path, mode, train, expected):
    write_pair(tmp_path / "ds", "a", size=(20, 24))
    entries, _ = load_entries(str(tmp_path / "ds"))
    assert ("shape_mask" in ForgeryDataset(entries, 32, mode, train=train)[0]) == expected
    assert "shape_mask" in ForgeryDataset(entries, 32, mode, train=train, shape_mask=True)[0]
    assert "shape_mask" not in ForgeryDataset(entries, 32, mode, train=train, shape_mask=False)[0]


def test_padding_keeps_the_mask_aligned(tmp_path):
    write_pair(tmp_path / "ds", "a", size=(24, 20))
    entries, _ = load_entries(str(tmp_path / "ds"))
    item = ForgeryDataset(entries, 32, "pad")[0]
    m = read_mask(entries[0].mask)
    assert torch.equal(item["mask"][0, :24, :20].bool(), torch.from_numpy(m))
    assert not item["mask"][0, 24:].any() and not item["shape_mask"][0, 24:].any()


@pytest.mark.parametrize("name", ["ncl", "benco"])
def test_attacks_keep_size_and_change_pixels(name):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)
    attacks = grid(name)
    assert len(attacks) == (8 if name == "ncl" else 18)
    for a in attacks:
        out = a(img, "key")
        assert out.shape == img.shape and out.dtype == np.uint8, a.name
        if a.name != "jpeg q=100":
            assert not np.array_equal(out, img), a.name
        assert np.array_equal(out, a(img, "key")), f"{a.name} is not repeatable"


def test_imdl_benco_lists_read_as_they_do(tmp_path, folder, monkeypatch, capsys):
    """Lists made for IMDL-BenCo: records with more than two fields, paths relative to the working
    directory (where IMDL-BenCo takes them from), BalancedDataset lists; check_data names the rule."""
    from ncl_fast.data.sources import path_rule

    (tmp_path / "lists").mkdir()
    records = [["ds/Tp/img0.png", "ds/Gt/img0.png", "splicing", 1], ["ds/Tp/img3.png", "Negative", "x"]]
    (tmp_path / "lists" / "work.json").write_text(json.dumps(records))
    beside = [["../ds/Tp/img1.png", "../ds/Gt/img1.png"]]
    (tmp_path / "lists" / "beside.json").write_text(json.dumps(beside))
    monkeypatch.chdir(tmp_path)
    entries, _ = load_entries("lists/work.json")  # not beside the list: from the working directory
    assert [e.image for e in entries] == [str(tmp_path / "ds/Tp/img0.png"), str(tmp_path / "ds/Tp/img3.png")]
    assert entries[0].mask == str(tmp_path / "ds/Gt/img0.png") and entries[1].mask is None
    assert "from the working directory" in path_rule("lists/work.json")
    assert "from the list's folder" in path_rule("lists/beside.json")
    assert os.path.samefile(load_entries("lists/beside.json")[0][0].image, tmp_path / "ds/Tp/img1.png")
    with pytest.raises(DatasetError, match="img1.png: image not found"):  # IMDL-BenCo's rule only: not beside the list
        load_entries("lists/beside.json", paths="cwd")
    balanced = [["ManiDataset", "ds"], ["JsonDataset", "lists/work.json"]]
    (tmp_path / "lists" / "balanced.json").write_text(json.dumps(balanced))
    entries, report = load_entries("lists/balanced.json")
    assert [os.path.basename(e.image) for e in entries] == ["img0.png", "img1.png", "img2.png", "img3.png",
                                                            "img0.png", "img3.png"]
    assert report.tampered == 4 and report.authentic == 2
    (tmp_path / "lists" / "bad.json").write_text(json.dumps([["ManiDataset", "lists/work.json"]]))
    with pytest.raises(DatasetError, match="ManiDataset 'lists/work.json' must be a Tp/Gt folder"):
        load_entries("lists/bad.json")
    capsys.readouterr()
    assert check_data_main(["lists/work.json"]) == 0
    assert f"relative paths taken from the working directory {tmp_path}" in capsys.readouterr().out


def test_benco_protocol_label_and_padding(tmp_path, folder):
    """IMDL-BenCo's inputs: a faint mask (nothing over 127.5) labels its image tampered; padding crops the
    top-left of a larger image instead of shrinking it."""
    faint = np.zeros((40, 24, 3), dtype=np.uint8)
    faint[5:9, 5:9] = 90
    (tmp_path / "ds" / "Tp" / "big.png").parent.mkdir(exist_ok=True)
    image = np.random.default_rng(0).integers(0, 256, (40, 24, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "ds" / "Tp" / "big.png")
    Image.fromarray(faint).save(tmp_path / "ds" / "Gt" / "big.png")
    entry = [Entry(str(tmp_path / "ds/Tp/big.png"), str(tmp_path / "ds/Gt/big.png"))]
    ours, theirs = ForgeryDataset(entry, 32, "pad")[0], ForgeryDataset(entry, 32, "pad", protocol="benco")[0]
    assert ours["label"] == 0 and theirs["label"] == 1 and not theirs["mask"].any()
    assert torch.equal(theirs["image"][:, :32, :24], torch.from_numpy(image[:32].transpose(2, 0, 1)))
    assert theirs["shape_mask"][0, :32, :24].all() and not theirs["shape_mask"][0, :, 24:].any()
    assert not torch.equal(ours["image"][:, :32, :19], theirs["image"][:, :32, :19])  # ours shrank it to fit


def test_benco_protocol_without_opencv_says_what_to_install(monkeypatch):
    from ncl_fast.data.dataset import check_protocol

    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 fails
    with pytest.raises(ImportError, match="pip install opencv-python-headless"):
        check_protocol("benco", "resize")
    check_protocol("benco13", "pad")  # padding needs no resizing
    with pytest.raises(ValueError, match="protocol must be one of"):
        check_protocol("benco2", "pad")
