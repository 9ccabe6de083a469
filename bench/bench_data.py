"""What one CPU core of the input pipeline delivers: images/s of the training loader with
`num_workers=0` (one process, one torch thread: what each DataLoader worker does) at the
paper preset (512 px random crops, flips, batch 4), and where the time goes.

    python bench/bench_data.py                      # this checkout
    python bench/bench_data.py --against 5a53e41    # and REV, side by side, in the same run

Three sets, made once in --data-dir: (a) the synthetic set (`ncl_fast.synth`, PNG, about
0.1 Mpx), (b) CASIA-size JPEGs (384x256 to 800x600, quality 90, PNG masks), (c) a few
JPEGs of 4 to 8 Mpx. Each checkout is timed in its own subprocess that imports
`ncl_fast` from that checkout (REV is extracted with `git archive` into a temporary
folder); the runs alternate (this, REV, this, REV, ...), each pass a new epoch (new
crops), and the tables give medians over the passes, so a loaded machine weighs on
both alike.

Stages, per image (the item's steps, timed one by one; the loader column is the real
`DataLoader` epoch):
* decode: `read_image`; mask read: `read_mask`;
* fit/crop + flip: the sizing, the crop and the flip, up to the uint8 canvas;
* worker float work: what the item does after that in the worker (5a53e41: `normalize`
  and float32 masks; now: nothing but wrapping the arrays);
* collate: `default_collate` of batches of 4;
* device conversion: `to_model_input` (here on the CPU; on the GPU in training, where it
  is off the workers' clock); 5a53e41 had none.
Nothing is asserted: the figures are printed, as markdown tables.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SETS = ("synthetic", "jpeg", "large")
SIZE, BATCH = 512, 4  # the paper preset: 512 px crops, batch 4
STAGES = ("decode", "mask read", "fit/crop + flip", "worker float work", "collate", "device conversion")


# ---- the data sets ------------------------------------------------------------------------------------------------

def make_sets(folder: Path, n_synth: int, n_jpeg: int, n_large: int) -> dict[str, Path]:
    """The three sets in `folder` (made once; a set's folder is reused when its count matches)."""
    import numpy as np
    from PIL import Image

    from ncl_fast import synth

    out = {name: folder / f"{name}-{n}" for name, n in zip(SETS, (n_synth, n_jpeg, n_large))}
    if not (out["synthetic"] / "manifest.json").is_file():
        synth.generate(out["synthetic"], n_synth, seed=0, progress=False)
    photos = None
    for name, n, sizes, least in (("jpeg", n_jpeg, ((256, 384), (600, 800)), 0),
                                  ("large", n_large, ((1728, 2304), (2448, 3264)), 4_000_000)):
        root = out[name]
        if (root / "done").is_file():
            continue
        photos = photos if photos is not None else synth.load_photos()
        (root / "Tp").mkdir(parents=True, exist_ok=True)
        (root / "Gt").mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(1)
        (h0, w0), (h1, w1) = sizes
        for i in range(n):
            h = w = 0
            while h * w <= least:  # (h, w) drawn in the ranges; at least 4 Mpx for the large set
                h, w = int(rng.integers(h0, h1 + 1)), int(rng.integers(w0, w1 + 1))
            img, _ = synth.random_crop(photos, rng, h, w)
            img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)  # sensor-like noise
            Image.fromarray(img).save(root / "Tp" / f"{i:04d}.jpg", quality=90)
            mask = synth.blob(rng, h, w) if i % 10 else np.zeros((h, w), bool)  # one in ten authentic
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / "Gt" / f"{i:04d}.png")
        (root / "done").write_text("")
    return out


def extract(rev: str, into: Path) -> Path:
    """The files of commit `rev` in `into` (`git archive`: the repository itself is not touched)."""
    data = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


# ---- one pass, in a subprocess that imports ncl_fast from the checkout under test ---------------------------------

def one_pass(root: Path, sets: dict[str, str], epoch: int) -> dict:
    """Loader images/s and stage times (ms per image) of every set, for one epoch."""
    sys.path.insert(0, str(root))
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, default_collate

    import ncl_fast
    import ncl_fast.data as D

    assert Path(ncl_fast.__file__).resolve().is_relative_to(root.resolve()), ncl_fast.__file__
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    current = hasattr(D, "to_model_input")  # 5a53e41: float32 items, `normalize` in the worker
    if current:
        from ncl_fast.data.dataset import crop_origin, resize_to_fit, to_canvas
    else:
        from ncl_fast.data.dataset import fit_size, normalize
    results = {}
    for name, folder in sets.items():
        entries = D.load_entries(folder, check=False)[0]
        ds = D.ForgeryDataset(entries, SIZE, "crop", train=True, seed=0)
        D.read_image(entries[0].image), D.read_mask(entries[0].mask)  # lazy imports and caches, off the clock
        if current:
            keys = [(epoch, i) for i in range(len(ds))]
        else:
            ds.set_epoch(epoch)
            keys = list(range(len(ds)))
        n = len(keys) // BATCH * BATCH
        loader = DataLoader(ds, batch_size=BATCH, sampler=keys, num_workers=0, drop_last=True)
        t0 = time.perf_counter()
        batches = list(loader)
        loader_s = time.perf_counter() - t0
        stage = dict.fromkeys(STAGES, 0.0)
        items = []
        for i in range(n):
            e = entries[i]
            t0 = time.perf_counter()
            image = D.read_image(e.image)
            t1 = time.perf_counter()
            mask = D.read_mask(e.mask)
            t2 = time.perf_counter()
            rng = np.random.default_rng([0, epoch, i])
            if current:
                image, mask = resize_to_fit(image, mask, SIZE, "crop")
                y0, x0 = crop_origin(*mask.shape, SIZE, rng)
                img, m, _ = to_canvas(image, mask, SIZE, y0, x0, bool(rng.random() < 0.5))
                t3 = time.perf_counter()
                item = {"image": torch.from_numpy(img), "mask": torch.from_numpy(m)[None]}
            else:
                img, m, shape = fit_size(image, mask, SIZE, "crop", rng)
                if rng.random() < 0.5:
                    img, m, shape = img[:, ::-1], m[:, ::-1], shape[:, ::-1]
                t3 = time.perf_counter()
                item = {"image": normalize(img),
                        "mask": torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None],
                        "shape_mask": torch.from_numpy(np.ascontiguousarray(shape, dtype=np.float32))[None]}
            t4 = time.perf_counter()
            items.append(item)
            for key, dt in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                stage[key] += dt
        t0 = time.perf_counter()
        for b in range(0, n, BATCH):
            default_collate(items[b : b + BATCH])
        stage["collate"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for batch in batches:
            if current:
                D.to_model_input(batch, "cpu")
            else:  # already float32 and normalized: the copy to the device is all
                batch["image"].to("cpu"), batch["mask"].to("cpu")
        stage["device conversion"] = time.perf_counter() - t0
        results[name] = {"images": n, "loader_ms": 1e3 * loader_s / n, **{k: 1e3 * v / n for k, v in stage.items()}}
    return results


# ---- the driver ---------------------------------------------------------------------------------------------------

def run_pass(root: Path, sets: dict[str, Path], epoch: int) -> dict:
    cmd = [sys.executable, __file__, "--pass-of", str(root), "--epoch", str(epoch),
           "--sets", json.dumps({k: str(v) for k, v in sets.items()})]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(root))
    if out.returncode:
        raise RuntimeError(f"the pass on {root} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        cpu = model
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu}, {os.cpu_count()} cores, load average {load:.1f} at the start"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", metavar="REV", help="also time commit REV (e.g. 5a53e41) in the same run")
    ap.add_argument("--passes", type=int, default=5, help="passes (epochs) per checkout; medians over them (default 5)")
    ap.add_argument("--n-synth", type=int, default=60, help="synthetic images (default 60)")
    ap.add_argument("--n-jpeg", type=int, default=60, help="CASIA-size JPEGs (default 60)")
    ap.add_argument("--n-large", type=int, default=8, help="JPEGs of 4 Mpx or more (default 8)")
    ap.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "ncl_fast_bench_data",
                    help="where the sets are made, once (default: %(default)s)")
    ap.add_argument("--pass-of", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--epoch", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--sets", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.pass_of is not None:  # a subprocess: one pass, JSON on the last line
        print(json.dumps(one_pass(args.pass_of, json.loads(args.sets), args.epoch)))
        return 0

    if min(args.n_synth, args.n_jpeg, args.n_large) < BATCH:
        ap.error(f"every set needs at least one batch of {BATCH} images")
    header = machine()
    sets = make_sets(args.data_dir, args.n_synth, args.n_jpeg, args.n_large)
    for folder in sets.values():  # into the page cache, for every checkout alike
        for f in folder.rglob("*"):
            if f.is_file():
                f.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        roots = {"this checkout": REPO}
        if args.against:
            roots[args.against] = extract(args.against, Path(tmp) / "against")
        passes = {label: [] for label in roots}
        for epoch in range(args.passes):
            for label, root in roots.items():
                passes[label].append(run_pass(root, sets, epoch))
                print(f"pass {epoch + 1}/{args.passes}: {label} done", file=sys.stderr, flush=True)

    def med(label, name, key):
        return statistics.median(p[name][key] for p in passes[label])

    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    print(f"CPU: {header}; torch threads 1, num_workers=0; {SIZE} px crops, flips, batch {BATCH}; "
          f"medians of {args.passes} passes; this checkout: {head}\n")
    labels = list(roots)
    rows = ["| set | images | checkout | images/s per core (loader) | ms per image (loader) | "
            "+ device conversion on this CPU, images/s |", "|---|---|---|---|---|---|"]
    for name in SETS:
        for label in labels:
            ms, conv = med(label, name, "loader_ms"), med(label, name, "device conversion")
            rows.append(f"| {name} | {passes[label][0][name]['images']} | {label} | {1e3 / ms:.1f} | {ms:.2f} | "
                        f"{1e3 / (ms + conv):.1f} |")
    print("\n".join(rows))
    if args.against:
        print()
        for name in SETS:
            ratio = med(labels[1], name, "loader_ms") / med(labels[0], name, "loader_ms")
            both = ((med(labels[1], name, "loader_ms") + med(labels[1], name, "device conversion"))
                    / (med(labels[0], name, "loader_ms") + med(labels[0], name, "device conversion")))
            print(f"{name}: this checkout delivers {ratio:.2f}x the images/s per core of {labels[1]} "
                  f"({both:.2f}x counting the device conversion on the CPU)")
    print("\nms per image by stage (medians):\n")
    cols = [f"{name}: {label}" for name in SETS for label in labels]
    print("| stage | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for key in STAGES + ("loader_ms",):
        cells = [f"{med(label, name, key):.2f}" for name in SETS for label in labels]
        print(f"| {'loader (whole item + collate)' if key == 'loader_ms' else key} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
