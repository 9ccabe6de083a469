"""Dataset discovery and validation, in the formats IMDL-BenCo users already have.

* a **Tp/Gt folder**: `Tp/` images and `Gt/` masks, both sorted and paired by
  position (a count mismatch is an error; pairs whose stems differ are warned);
* a **JSON list**: `[["img", "mask"], ["img", "Negative"], ...]`; `"Negative"`
  is an authentic image with an all-zero mask; relative paths are taken from
  the JSON file's folder;
* a **test-set map**: a JSON object `{"name": path, ...}`, each path a folder or a
  JSON list (the key is the name used in logs and tables).

`check_entries` opens every file once and reports, before any training starts:
unreadable or corrupt files, image/mask size mismatches (errors), masks stored
as 0/1 values or in colour, which the 127.5 rule would turn empty or wrong
(warnings).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif"}
NEGATIVE = "Negative"


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class Entry:
    image: str
    mask: str | None  # None: authentic ("Negative"), an all-zero mask


@dataclass
class Report:
    """What `check_entries` found: errors stop training, warnings do not."""

    entries: list[Entry]
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tampered: int = 0
    authentic: int = 0

    def raise_if_errors(self, name: str) -> None:
        if self.errors:
            head = "\n  ".join(self.errors[:20])
            more = f"\n  ... and {len(self.errors) - 20} more" if len(self.errors) > 20 else ""
            raise DatasetError(
                f"dataset {name}: {len(self.errors)} problem(s):\n  {head}{more}\n"
                f"Run `python -m ncl_fast.check_data {name}` for the full report."
            )


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def list_folder(root: Path) -> tuple[list[Entry], list[str]]:
    """Tp/Gt folder -> entries, warnings. Raises DatasetError on a count mismatch."""
    tp, gt = root / "Tp", root / "Gt"
    for sub in (tp, gt):
        if not sub.is_dir():
            raise DatasetError(f"{root} is not a Tp/Gt dataset folder: {sub} is missing")
    images, masks = _images_in(tp), _images_in(gt)
    if len(images) != len(masks):
        raise DatasetError(
            f"{root}: {len(images)} images in Tp/ but {len(masks)} masks in Gt/; "
            f"every image needs exactly one mask (use a JSON list with \"Negative\" for authentic images)"
        )
    warnings = []
    for im, mk in zip(images, masks):
        if not (mk.stem == im.stem or mk.stem.startswith(im.stem) or im.stem.startswith(mk.stem)):
            warnings.append(f"paired by position but the names differ: {im.name} <-> {mk.name}")
    return [Entry(str(i), str(m)) for i, m in zip(images, masks)], warnings


def list_json(path: Path) -> list[Entry]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: cannot read the JSON list ({err})") from err
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of [image, mask] pairs, got {type(data).__name__}")
    base = path.parent
    entries = []
    for k, item in enumerate(data):
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            raise DatasetError(f"{path}: item {k} is {item!r}; each item must be [\"image\", \"mask\" or \"Negative\"]")
        img, mask = item
        img = str(base / img) if not os.path.isabs(img) else img
        if mask != NEGATIVE and not os.path.isabs(mask):
            mask = str(base / mask)
        entries.append(Entry(img, None if mask == NEGATIVE else mask))
    return entries


def list_dataset(path: str | os.PathLike) -> tuple[list[Entry], list[str]]:
    """A folder (Tp/Gt) or a JSON list -> (entries, warnings)."""
    p = Path(path)
    if p.is_dir():
        entries, warnings = list_folder(p)
    elif p.is_file():
        entries, warnings = list_json(p), []
    else:
        raise DatasetError(f"{p} does not exist (expected a Tp/Gt folder or a JSON list)")
    if not entries:
        raise DatasetError(f"{p} holds no images; check the path")
    return entries, warnings


def list_test_sets(path: str | os.PathLike) -> dict[str, str]:
    """`--test_data_path`: a dataset (named by its folder or file) or a JSON map {name: path}."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".json":
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise DatasetError(f"{p}: cannot read the JSON ({err})") from err
        if isinstance(data, dict):
            if not data:
                raise DatasetError(f"{p}: the test-set map is empty")
            out = {}
            for name, sub in data.items():
                if not isinstance(sub, str):
                    raise DatasetError(f"{p}: the path of test set {name!r} must be a string, got {sub!r}")
                out[str(name)] = sub if os.path.isabs(sub) else str(p.parent / sub)
            return out
    return {p.stem if p.is_file() else p.name: str(p)}


def read_mask(path: str, invert: bool = False) -> np.ndarray:
    """Bool (H, W): tampered where mean(RGB) > 127.5 (inverted with `invert`)."""
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
    m = rgb.mean(axis=2) > 127.5
    return ~m if invert else m


def read_image(path: str) -> np.ndarray:
    """uint8 (H, W, 3) RGB."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _mask_warnings(path: str, rgb: np.ndarray) -> list[str]:
    out = []
    vmax = int(rgb.max())
    if 0 < vmax <= 1:
        out.append(f"{path}: mask values are 0/1, which the 127.5 threshold reads as all-authentic; "
                   f"save masks as 0/255")
    if rgb.ndim == 3 and rgb.shape[2] == 3:
        spread = (rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2)).max()
        if spread > 32:
            out.append(f"{path}: the mask is in colour; tampered is read as mean(RGB) > 127.5, "
                       f"which may not be what the colours mean")
    return out


def _open(path: str, what: str, report: Report, missing_hint: str = "", read_rgb: bool = False):
    """(size, RGB array or None) of an image file, or None after recording why it cannot be read."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.size, (np.asarray(im.convert("RGB")) if read_rgb else None)
    except FileNotFoundError:
        report.errors.append(f"{path}: {what} not found{missing_hint}")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        report.errors.append(f"{path}: unreadable or corrupt {what} ({err}); re-export or remove it")
    return None


def check_entries(entries: list[Entry], check_masks: bool = True) -> Report:
    """Open every file once; collect errors and warnings (see the module docstring)."""
    report = Report(entries)
    for e in entries:
        opened = _open(e.image, "image", report)
        if opened is None:
            continue
        size = opened[0]
        if e.mask is None:
            report.authentic += 1
            continue
        opened = _open(e.mask, "mask", report, f" (image {e.image})", read_rgb=check_masks)
        if opened is None:
            continue
        msize, rgb = opened
        if msize != size:
            report.errors.append(
                f"size mismatch: image {e.image} is {size[0]}x{size[1]} but mask {e.mask} is "
                f"{msize[0]}x{msize[1]} (W x H); masks must have their image's size"
            )
            continue
        if rgb is not None:
            report.warnings += _mask_warnings(e.mask, rgb)
            if (rgb.mean(axis=2) > 127.5).any():
                report.tampered += 1
            else:
                report.authentic += 1
    return report


def load_entries(path: str, check: bool = True) -> tuple[list[Entry], Report]:
    """Discover and validate; raises DatasetError naming the files when anything is wrong."""
    entries, warnings = list_dataset(path)
    report = check_entries(entries) if check else Report(entries)
    report.warnings = warnings + report.warnings
    report.raise_if_errors(path)
    return entries, report
