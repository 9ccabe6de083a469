"""Dataset discovery and validation, in the formats IMDL-BenCo users already have.

* a **Tp/Gt folder**: `Tp/` images and `Gt/` masks, both sorted and paired by
  position (a count mismatch is an error; pairs whose stems differ are warned);
* a **JSON list**: `[["img", "mask"], ["img", "Negative"], ...]`; `"Negative"`
  is an authentic image with an all-zero mask; a record may hold more fields
  after these two (IMDL-BenCo reads the first two, and so does this);
* IMDL-BenCo's **BalancedDataset list**: `[["ManiDataset", folder],
  ["JsonDataset", list.json], ...]`: the images of every dataset named, in order
  (IMDL-BenCo's training draws the same number from each; evaluation here reads
  each image once);
* a **test-set map**: a JSON object `{"name": path, ...}`, each path a folder or a
  JSON list (the key is the name used in logs and tables).

Relative paths in these JSON files (`paths`, see `PATH_RULES`): `auto` (the
default) takes a path from the JSON file's folder when the file is there, else
from the working directory, which is where IMDL-BenCo takes every relative path
from (its lists then work unchanged); `cwd` takes them from the working directory
only, as IMDL-BenCo does (`--protocol benco|benco13`). `path_rule` says which rule
a file's paths followed; `check_data` prints it.

`check_entries` opens every file once and reports, before any training starts:
unreadable or corrupt files, image/mask size mismatches (errors), masks stored
as 0/1 values or in colour, which the 127.5 rule would turn empty or wrong
(warnings).

Decoding (`read_image`, `read_mask`): Pillow opens every file (its header, the
decompression-bomb limit and its error messages); baseline and progressive
JPEGs in RGB or greyscale are then decoded by torchvision's libjpeg-turbo
decoder, whose pixels equal Pillow's (tests/data/test_images.py checks it) and which
skips Pillow's copies; every other file and mode is decoded by Pillow.
torchvision's PNG decoder is not used: it crashes the process on a PNG with a
bad checksum instead of raising an error.
"""
from __future__ import annotations

import functools
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

PATH_RULES = ("auto", "cwd")
#: the dataset classes a BalancedDataset list may name, and what they read
BALANCED_KINDS = {"ManiDataset": "a Tp/Gt folder", "JsonDataset": "a JSON list"}
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
    """The image files of a folder, broken links included (they are reported by name
    when opened, never skipped in silence, which would shift the pairing)."""
    return sorted(p for p in folder.iterdir()
                  if (p.is_file() or (p.is_symlink() and not p.exists())) and p.suffix.lower() in IMAGE_EXTS)


def read_json(path: Path, what: str):
    """A JSON file in UTF-8, UTF-16 or UTF-32 (with or without a byte-order mark), or a
    DatasetError naming the file and what to do."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"{path}: cannot read the {what} ({err.strerror or err})") from None
    try:
        return json.loads(raw)  # json detects UTF-8, -16 and -32 from the bytes
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: the {what} is not UTF-8 (nor UTF-16/32) text (byte {err.start} of {len(raw)}: "
                           f"{err.reason}); save it as UTF-8") from None
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: cannot read the {what} ({err})") from None


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


def resolve(value: str, base: Path, paths: str = "auto") -> tuple[str, str]:
    """`(path, rule)`: a path of a JSON file in folder `base` under the rule `paths` (PATH_RULES);
    `rule` is `absolute`, `json` (from the file's folder) or `cwd` (from the working directory)."""
    if paths not in PATH_RULES:
        raise ValueError(f"paths must be one of {', '.join(PATH_RULES)}, got {paths!r}")
    if os.path.isabs(value):
        return value, "absolute"
    if paths == "auto":
        beside = base / value
        if os.path.lexists(beside) or not os.path.lexists(value):
            return str(beside), "json"
    return os.path.abspath(value), "cwd"


def _balanced(data) -> bool:
    return bool(data) and all(isinstance(r, (list, tuple)) and len(r) == 2 and r[0] in BALANCED_KINDS
                              and isinstance(r[1], str) for r in data)


def list_json(path: Path, paths: str = "auto", rules: set | None = None) -> list[Entry]:
    """The entries of a JSON list, or of a BalancedDataset list; `rules` collects the path rules used."""
    data = read_json(path, "JSON list")
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of [image, mask] pairs, got {type(data).__name__}")
    rules = set() if rules is None else rules
    base = path.parent
    if _balanced(data):
        entries = []
        for kind, sub in data:
            where, rule = resolve(sub, base, paths)
            rules.add(rule)
            p = Path(where)
            if kind == "ManiDataset" and not p.is_dir() or kind == "JsonDataset" and not p.is_file():
                raise DatasetError(f"{path}: {kind} {sub!r} must be {BALANCED_KINDS[kind]}, but {where} is not")
            entries += list_folder(p)[0] if kind == "ManiDataset" else list_json(p, paths, rules)
        return entries
    entries = []
    for k, item in enumerate(data):
        if not (isinstance(item, (list, tuple)) and len(item) >= 2 and all(isinstance(x, str) for x in item[:2])):
            raise DatasetError(f"{path}: item {k} is {item!r}; each item must be [\"image\", \"mask\" or \"Negative\"] "
                               f"(more fields may follow; IMDL-BenCo's BalancedDataset lists hold "
                               f"[\"ManiDataset\" or \"JsonDataset\", path] records)")
        img, mask = item[0], item[1]
        img, rule = resolve(img, base, paths)
        rules.add(rule)
        if mask != NEGATIVE:
            mask, rule = resolve(mask, base, paths)
            rules.add(rule)
        entries.append(Entry(img, None if mask == NEGATIVE else mask))
    return entries


def path_rule(path: str | os.PathLike, paths: str = "auto") -> str | None:
    """How the relative paths of a JSON list were taken (None for a folder, or all absolute)."""
    p = Path(path)
    if not p.is_file():
        return None
    rules: set = set()
    list_json(p, paths, rules)
    said = {"json": f"from the list's folder {p.parent.resolve()}",
            "cwd": f"from the working directory {Path.cwd()} (IMDL-BenCo's rule)"}
    found = [said[r] for r in ("json", "cwd") if r in rules]
    return "relative paths taken " + " and ".join(found) if found else None


def list_dataset(path: str | os.PathLike, paths: str = "auto") -> tuple[list[Entry], list[str]]:
    """A folder (Tp/Gt), a JSON list or a BalancedDataset list -> (entries, warnings)."""
    p = Path(path)
    if p.is_dir():
        entries, warnings = list_folder(p)
    elif p.is_file():
        entries, warnings = list_json(p, paths), []
    else:
        raise DatasetError(f"{p} does not exist (expected a Tp/Gt folder or a JSON list)")
    if not entries:
        raise DatasetError(f"{p} holds no images; check the path")
    return entries, warnings


def list_test_sets(path: str | os.PathLike, paths: str = "auto") -> dict[str, str]:
    """`--test_data_path`: a dataset (named by its folder or file) or a JSON map {name: path}
    (its relative paths taken under the rule `paths`)."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".json":
        data = read_json(p, "JSON")
        if isinstance(data, dict):
            if not data:
                raise DatasetError(f"{p}: the test-set map is empty")
            out = {}
            for name, sub in data.items():
                if not isinstance(sub, str):
                    raise DatasetError(f"{p}: the path of test set {name!r} must be a string, got {sub!r}")
                out[str(name)] = resolve(sub, p.parent, paths)[0]
            return out
    return {p.stem if p.is_file() else p.name: str(p)}


class ImageTooLargeError(OSError):
    """An image above Pillow's decompression-bomb limit (`allow_large_images` lifts it)."""


class UnsupportedImageError(OSError):
    """An image whose pixel values cannot be turned into RGB without guessing."""


def allow_large_images(allow: bool = True) -> None:
    """Lift (or restore) Pillow's decompression-bomb limit for this process and the
    DataLoader workers it starts (`--allow-large-images`)."""
    Image.MAX_IMAGE_PIXELS = None if allow else _PIL_PIXEL_LIMIT


_PIL_PIXEL_LIMIT = Image.MAX_IMAGE_PIXELS


def open_image(path: str) -> Image.Image:
    """`Image.open`, with images above Pillow's pixel limit refused by name instead of a
    bare `DecompressionBombWarning` / `DecompressionBombError` (the limit guards against
    files that decode into gigabytes; trusted large images pass with --allow-large-images)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            limit = Image.MAX_IMAGE_PIXELS or 0
            raise ImageTooLargeError(
                f"{path}: too large to decode safely ({err}; the limit is {limit / 1e6:.0f} Mpx); "
                f"if you trust the file, pass --allow-large-images") from None


#: 16-bit and wider single-channel modes: Pillow's convert("RGB") clips them at 255.
_WIDE_GRAY = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535}


def to_rgb(im: Image.Image, path: str, keep_gray: bool = False) -> np.ndarray:
    """uint8 (H, W, 3) RGB of any mode users bring (with `keep_gray`, 1 and L images as they
    are: bool or uint8 (H, W), whose RGB would repeat them three times).

    * 1, L, P, LA, RGB, RGBA, CMYK, YCbCr (and 16-bit RGB TIFF, which Pillow reads
      as RGB): Pillow's conversion; alpha is dropped.
    * I;16 (16-bit grey): scaled by 255/65535.
    * I (32-bit integers): values in 0-255 read as 8-bit, in 0-65535 as 16-bit;
      anything else is refused (no single scale is right).
    * F (32-bit float): values in [0, 1] are scaled by 255, values in [0, 255]
      kept; anything else (or NaN) is refused.
    """
    mode = im.mode
    if mode in _WIDE_GRAY or mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if not np.isfinite(a).all():
            raise UnsupportedImageError(f"{path}: a {mode} image holding NaN or infinite values; "
                                        f"save it as an 8- or 16-bit image")
        if mode in _WIDE_GRAY:
            scale = _WIDE_GRAY[mode]
        elif lo >= 0 and hi <= (1.0 if mode == "F" else 255):
            scale = 1.0 if mode == "F" else 255
        elif lo >= 0 and hi <= 255 and mode == "F":
            scale = 255
        elif lo >= 0 and hi <= 65535 and mode == "I":
            scale = 65535
        else:
            raise UnsupportedImageError(
                f"{path}: a {mode} image with values from {lo:g} to {hi:g}, which fit no standard range "
                f"({'[0, 1] or [0, 255]' if mode == 'F' else '0-255 or 0-65535'}); save it as an 8- or 16-bit image")
        gray = np.clip(np.rint(a * (255.0 / scale)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    try:
        if mode == "RGB" or (keep_gray and mode in ("1", "L")):
            return np.asarray(im)  # no converted copy
        return np.asarray(im.convert("RGB"))
    except (ValueError, OSError) as err:
        raise UnsupportedImageError(f"{path}: Pillow cannot convert a {mode} image to RGB ({err}); "
                                    f"save it as RGB or greyscale") from None


@functools.cache
def _jpeg_decoder():
    """torchvision's `decode_jpeg` and its modes, or None where torchvision has none (its image
    decoders are deprecated since 0.29: when they go, Pillow decodes every file)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg, read_file
    except ImportError:
        return None
    return decode_jpeg, read_file, ImageReadMode


def decode_jpeg(im: Image.Image, path: str, gray: bool = False) -> np.ndarray | None:
    """The pixels of a JPEG that Pillow has opened (`im`), decoded by torchvision: uint8
    (H, W, 3) RGB, or (H, W) grey with `gray` (for greyscale files). None where the file is
    not a JPEG in RGB or greyscale (Pillow then decodes it), or where torchvision fails
    (Pillow then decodes it, or raises its own error on a damaged file).

    The pixels equal Pillow's `convert("RGB")` (both are libjpeg-turbo with the same
    settings); torchvision skips Pillow's unpacking into 4-byte pixels and the copy out."""
    decoder = _jpeg_decoder()
    if decoder is None or im.format != "JPEG" or im.mode not in ("RGB", "L"):
        return None
    decode, read_file, modes = decoder
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities of TorchVision")
            chw = decode(read_file(path), mode=modes.GRAY if gray else modes.RGB)
    except RuntimeError:
        return None
    return chw[0].numpy() if gray else chw.permute(1, 2, 0).numpy()  # (H, W, 3) in memory: no copy


#: mean(R, G, B) > 127.5 with R + G + B an integer: R + G + B >= 383 (382 / 3 = 127.33, 383 / 3 = 127.67).
MASK_SUM_THRESHOLD = 383
#: The same rule on a grey value g (R = G = B = g): 3 g >= 383, so g >= 128.
MASK_GRAY_THRESHOLD = 128


def tampered(values: np.ndarray) -> np.ndarray:
    """Bool (H, W): the mask rule mean(RGB) > 127.5, in integer arithmetic, on uint8 (H, W, 3)
    RGB, uint8 (H, W) grey (R = G = B) or bool (H, W) bilevel (0 or 255) values."""
    if values.dtype == bool:
        return values
    if values.ndim == 2:
        return values >= MASK_GRAY_THRESHOLD
    total = values[..., 0].astype(np.uint16)  # at most 3 x 255 = 765
    total += values[..., 1]
    total += values[..., 2]
    return total >= MASK_SUM_THRESHOLD


def read_mask(path: str, invert: bool = False) -> np.ndarray:
    """Bool (H, W): tampered where mean(RGB) > 127.5 (inverted with `invert`)."""
    with open_image(path) as im:
        values = decode_jpeg(im, path, gray=im.mode == "L")
        if values is None:
            values = to_rgb(im, path, keep_gray=True)
    m = tampered(values)
    return ~m if invert else m


def read_mask_and_label(path: str, invert: bool = False) -> tuple[np.ndarray, bool]:
    """IMDL-BenCo's reading of a mask file: bool (H, W) tampered where mean(RGB) > 127.5, and
    the image's label, true where any value of the file is non-zero (a faint mask labels its
    image tampered even where no pixel passes 127.5). `invert` inverts the values first."""
    with open_image(path) as im:
        values = decode_jpeg(im, path, gray=im.mode == "L")
        if values is None:
            values = to_rgb(im, path, keep_gray=True)
    if invert:
        values = ~values if values.dtype == bool else 255 - values
    return tampered(values), bool(values.any())


def read_image(path: str) -> np.ndarray:
    """uint8 (H, W, 3) RGB, whatever the file's mode (see `to_rgb`); may be read-only."""
    with open_image(path) as im:
        rgb = decode_jpeg(im, path)
        return rgb if rgb is not None else to_rgb(im, path)


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


#: the EXIF tag of the orientation in which viewers show an image
_EXIF_ORIENTATION = 0x0112


def _open(path: str, what: str, report: Report, missing_hint: str = "", read_rgb: bool = False):
    """(size, RGB array or None) of an image file, or None after recording why it cannot be read."""
    try:
        with open_image(path) as im:
            im.load()
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1) if im.format in ("JPEG", "TIFF", "PNG", "WEBP") \
                else 1
            if orientation not in (1, None):
                report.warnings.append(
                    f"{path}: its EXIF orientation is {orientation} (shown rotated or flipped by viewers); images "
                    f"and masks are read as stored, so a mask drawn on the displayed {what} would not align")
            if read_rgb:
                return im.size, to_rgb(im, path)
            if im.mode in ("I", "F"):  # decode now: their values may fit no range (an error before training)
                to_rgb(im, path)
            return im.size, None
    except FileNotFoundError:
        if os.path.islink(path):
            report.errors.append(f"{path}: a broken link to {os.readlink(path)} ({what}{missing_hint}); "
                                 f"restore its target or remove it")
        else:
            report.errors.append(f"{path}: {what} not found{missing_hint}")
    except (ImageTooLargeError, UnsupportedImageError) as err:
        report.errors.append(str(err))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
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
            if tampered(rgb).any():
                report.tampered += 1
            else:
                report.authentic += 1
    return report


def load_entries(path: str, check: bool = True, paths: str = "auto") -> tuple[list[Entry], Report]:
    """Discover and validate; raises DatasetError naming the files when anything is wrong."""
    entries, warnings = list_dataset(path, paths)
    report = check_entries(entries) if check else Report(entries)
    report.warnings = warnings + report.warnings
    report.raise_if_errors(path)
    return entries, report
