"""The input pipeline: uint8 items across the DataLoader, the conversion on the device
(against the former float32 worker path as the oracle), the epoch sampler's order,
and persistent workers that still draw each epoch's crops and flips."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate

from ncl_fast import distributed
from ncl_fast.data import EpochSampler, ForgeryDataset, load_entries, to_model_input
from ncl_fast.data.sources import Entry

S = 32  # output size: smaller and larger images than this below


def make_set(root, rng, sizes, formats=("png", "jpg")):
    """A Tp/Gt folder: photo-like images of the given (h, w) sizes (PNG and JPEG in turn, one
    palette PNG), 0/255 masks (one all-authentic)."""
    (root / "Tp").mkdir(parents=True)
    (root / "Gt").mkdir()
    for k, (h, w) in enumerate(sizes):
        base = rng.integers(0, 256, (h // 4 + 2, w // 4 + 2, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC))
        img = Image.fromarray(np.clip(img.astype(int) + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8))
        fmt = formats[k % len(formats)]
        if k == 2:
            img, fmt = img.convert("P"), "png"
        img.save(root / "Tp" / f"{k:02d}.{fmt}", **({"quality": 90} if fmt == "jpg" else {}))
        mask = np.zeros((h, w), np.uint8)
        if k != 1:
            y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
            mask[y : y + h // 2, x : x + w // 3] = 255
        Image.fromarray(mask).save(root / "Gt" / f"{k:02d}.png")
    return load_entries(str(root))[0]


# ---- the former pipeline (main 5a53e41), the oracle: float32 in the worker -------------------------------------

OLD_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
OLD_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def old_item(entry: Entry, size: int, mode: str, train: bool, seed: int, epoch: int, index: int) -> dict:
    """5a53e41's `ForgeryDataset.__getitem__` (Pillow decoding, the float mask rule, `fit_size`,
    the flip, `normalize`), restated in one function."""
    with Image.open(entry.image) as im:
        image = np.asarray(im.convert("RGB"))
    if entry.mask is None:
        mask = np.zeros(image.shape[:2], bool)
    else:
        with Image.open(entry.mask) as im:
            mask = np.asarray(im.convert("RGB")).astype(np.float32).mean(axis=2) > 127.5
    rng = np.random.default_rng([seed, epoch, index]) if train else None
    h, w = mask.shape
    if mode == "resize":
        img = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
        m = np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))
        shape = np.ones((size, size), dtype=bool)
    else:
        if mode == "pad" and (h > size or w > size):
            scale = size / max(h, w)
            nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
            image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
            mask = np.asarray(Image.fromarray(mask).resize((nw, nh), Image.NEAREST))
            h, w = nh, nw
        y0 = x0 = 0
        if mode == "crop" and (h > size or w > size):
            y0 = int(rng.integers(0, max(h - size, 0) + 1))
            x0 = int(rng.integers(0, max(w - size, 0) + 1))
        crop_img, crop_mask = image[y0 : y0 + size, x0 : x0 + size], mask[y0 : y0 + size, x0 : x0 + size]
        ch, cw = crop_mask.shape
        img, m, shape = (np.zeros((size, size, 3), np.uint8), np.zeros((size, size), bool),
                         np.zeros((size, size), bool))
        img[:ch, :cw], m[:ch, :cw], shape[:ch, :cw] = crop_img, crop_mask, True
    if train and rng.random() < 0.5:
        img, m, shape = img[:, ::-1], m[:, ::-1], shape[:, ::-1]
    x = (img.astype(np.float32) / 255.0 - OLD_MEAN) / OLD_STD
    return {"image": torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))),
            "mask": torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None],
            "shape_mask": torch.from_numpy(np.ascontiguousarray(shape, dtype=np.float32))[None],
            "label": float(mask.any())}


#: fp32 rounding of values up to |2.7| (normalized pixels): a few ulps
FP32_ATOL = 4 * 2.7 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("mode, train", [("crop", True), ("resize", True), ("resize", False), ("pad", False)])
def test_model_input_equals_the_float32_worker_path(tmp_path, mode, train):
    rng = np.random.default_rng()
    sizes = [(20, 27), (45, 61), (31, 40), (64, 33), (29, 50), (80, 96)]  # smaller, larger and straddling S
    entries = make_set(tmp_path / "ds", rng, sizes)
    seed = int(rng.integers(0, 1000))
    ds = ForgeryDataset(entries, S, mode, train=train, seed=seed)
    for epoch in range(3 if train else 1):
        batch = default_collate([ds[(epoch, i)] for i in range(len(ds))])
        assert batch["image"].dtype == torch.uint8 and batch["mask"].dtype == torch.bool
        got = to_model_input(batch, "cpu")
        old = [old_item(e, S, mode, train, seed, epoch, i) for i, e in enumerate(entries)]
        for field, value in (("image", got.image), ("mask", got.mask)):
            expected = torch.stack([o[field] for o in old])
            assert value.dtype == torch.float32 and value.shape == expected.shape, field
            torch.testing.assert_close(value, expected, rtol=0, atol=FP32_ATOL if field == "image" else 0)
        assert batch["label"].tolist() == [o["label"] for o in old]
        if mode == "pad":
            torch.testing.assert_close(got.shape_mask, torch.stack([o["shape_mask"] for o in old]), rtol=0, atol=0)
        else:  # resize: all ones, left to the device; training never reads it
            assert got.shape_mask is None
            if mode == "resize":
                assert all(o["shape_mask"].all() for o in old)


def test_the_loss_equals_the_float32_worker_path(tmp_path):
    from ncl_fast.model import LossConfig, NCLModel

    rng = np.random.default_rng()
    entries = make_set(tmp_path / "ds", rng, [(40, 52), (36, 30), (50, 44), (33, 64)])
    seed = int(rng.integers(0, 1000))
    ds = ForgeryDataset(entries, S, "crop", train=True, seed=seed)
    new = to_model_input(default_collate([ds[(1, i)] for i in range(4)]), "cpu")
    old = [old_item(e, S, "crop", True, seed, 1, i) for i, e in enumerate(entries)]
    old_image, old_mask = torch.stack([o["image"] for o in old]), torch.stack([o["mask"] for o in old])
    model = NCLModel(18, 1, LossConfig(variant="full", patch_px=8), width=8, head_channels=16)
    losses = []
    for image, mask in ((new.image, new.mask), (old_image, old_mask)):
        torch.manual_seed(0)  # the same dropout draw
        losses.append(model(image, mask)["loss"])
    assert torch.isfinite(losses[0]) and losses[0] > 0
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)


def test_model_input_layout_and_bad_input():
    images = torch.randint(0, 256, (2, 3, 7, 9), dtype=torch.uint8)
    out = to_model_input(images, "cpu", channels_last=True)
    assert out.mask is None and out.shape_mask is None and out.image.dtype == torch.float32
    assert out.image.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.image, to_model_input(images, "cpu").image, rtol=0, atol=0)
    for bad, what in ((images.float(), "torch.float32"), (images[0], r"\(3, 7, 9\)"), (images[:, :1], r"\(2, 1, 7, 9\)"),
                      (images.numpy(), "ndarray")):
        with pytest.raises(ValueError, match=rf"uint8 \(B, 3, H, W\) tensor .*got .*{what}"):
            to_model_input(bad, "cpu")


# ---- the epoch sampler and persistent workers ---------------------------------------------------------------------

def old_order(n, batch_size, rank, world, seed, epoch, start):
    """5a53e41's EpochSampler order (in train.py then): the permutation seeded by
    seed * 1_000_003 + epoch, cut to whole global batches, sharded by rank, from batch `start`."""
    steps = n // (batch_size * world)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return perm[: steps * batch_size * world][rank::world][start * batch_size :]


@pytest.mark.parametrize("world", [1, 3])
def test_sampler_keeps_the_data_order(world):
    rng = np.random.default_rng()
    n, batch, seed = int(rng.integers(20, 60)), int(rng.integers(1, 4)), int(rng.integers(0, 10_000))
    for rank in range(world):
        sampler = EpochSampler(n, batch, distributed.Context(rank=rank, world_size=world), seed)
        for epoch, start in ((0, 0), (3, 0), (5, 2)):
            sampler.set_epoch(epoch, start)
            keys = list(sampler)
            assert keys == [(epoch, i) for i in old_order(n, batch, rank, world, seed, epoch, start)]
            assert len(sampler) == len(keys)


def run_epochs(loader, sampler, plan):
    """{(epoch, start): [(indices, images, masks) per batch]} over `plan`, with one loader."""
    out = {}
    for epoch, start in plan:
        sampler.set_epoch(epoch, start)
        out[(epoch, start)] = [(b["index"].tolist(), b["image"].clone(), b["mask"].clone()) for b in loader]
    return out


@pytest.mark.slow
def test_persistent_workers_draw_new_crops_every_epoch(tmp_path):
    rng = np.random.default_rng()
    sizes = [(int(rng.integers(40, 70)), int(rng.integers(40, 70))) for _ in range(8)]  # all larger than S: crops
    entries = make_set(tmp_path / "ds", rng, sizes)
    seed = int(rng.integers(0, 1000))
    plan = [(0, 0), (1, 0), (2, 0), (1, 2)]  # three epochs, then epoch 1 resumed at its third batch
    results = {}
    for workers in (0, 2):
        ds = ForgeryDataset(entries, S, "crop", train=True, seed=seed)
        sampler = EpochSampler(len(ds), 2, distributed.Context(), seed)
        loader = DataLoader(ds, batch_size=2, sampler=sampler, num_workers=workers, drop_last=True,
                            persistent_workers=workers > 0)
        results[workers] = run_epochs(loader, sampler, plan)
        if workers:
            first = loader._iterator  # the same workers served every epoch
            run_epochs(loader, sampler, [(0, 0)])
            assert loader._iterator is first
            del loader, first
    for key in plan:  # the same batches with or without (persistent) workers
        for (i0, img0, m0), (i2, img2, m2) in zip(results[0][key], results[2][key], strict=True):
            assert i0 == i2 and torch.equal(img0, img2) and torch.equal(m0, m2), key
    per_index = {}
    for (epoch, start), got in results[2].items():
        if start == 0:
            for idx, img, _ in got:
                for k, i in enumerate(idx):
                    per_index.setdefault(i, []).append(img[k])
    assert len(per_index) == len(entries)
    for i, crops in per_index.items():  # three epochs: three crops (and flips) of each image
        assert len(crops) == 3
    changed = sum(not torch.equal(a, b) for crops in per_index.values() for a, b in zip(crops, crops[1:]))
    assert changed >= len(entries), f"only {changed} of {2 * len(entries)} epoch-to-epoch crops changed"
    # resuming epoch 1 at batch 2 gives exactly its remaining batches
    whole, rest = results[2][(1, 0)], results[2][(1, 2)]
    assert len(rest) == len(whole) - 2
    for (i0, img0, m0), (i1, img1, m1) in zip(whole[2:], rest, strict=True):
        assert i0 == i1 and torch.equal(img0, img1) and torch.equal(m0, m1)
