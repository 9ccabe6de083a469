"""What every command shares: option types that validate numbers, checks of output
folders before any work, exit codes, JSON without NaN.

Exit codes, the same for every command (`train`, `evaluate`, `predict`,
`check_data`, `synth`):

* 0: done;
* 1: a failure at run time (a file that cannot be written, a loss that is no
  longer finite, images that could not be read, ...);
* 2: bad input or usage (an option value, a dataset, a checkpoint, an output
  location); nothing was computed;
* 130: interrupted (Ctrl-C); `train` saves a checkpoint first.
"""
from __future__ import annotations

import argparse
import errno
import functools
import math
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Callable

from ._version import __version__

OK, FAILURE, USAGE, INTERRUPTED = 0, 1, 2, 130

#: The stride of the network and the 16 px patches: image sizes are multiples of it.
SIZE_MULTIPLE = 16


class UsageError(Exception):
    """Bad input: the message names the value or file and what to do (exit 2)."""


class RunError(Exception):
    """A failure while working: the message says what and what to do (exit 1)."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (the module docstring), and option help wrapped
    without splitting paths or option names at their hyphens."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)


# ---- option types: argparse calls them, so a bad value stops the command at parse time (exit 2) -------------------
def _number(kind: type, text: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _number(int, text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def float_in(low: float, high: float | None = None, low_open: bool = False,
             high_open: bool = False) -> Callable[[str], float]:
    """A finite float in [low, high] (ends open where asked; no upper end when `high` is None)."""
    if high is None:
        span = f"{'>' if low_open else '>='} {low:g}"
    else:
        span = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        value = _number(float, text)
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"must be {span}, got {value}")
        if high is not None and (value > high or (high_open and value == high)):
            raise argparse.ArgumentTypeError(f"must be {span}, got {value}")
        return value

    parse.__name__ = f"number {span}"
    return parse


def image_size(text: str) -> int:
    """A positive multiple of 16 (the network stride and the 16 px patches)."""
    value = _number(int, text)
    if value < SIZE_MULTIPLE or value % SIZE_MULTIPLE:
        raise argparse.ArgumentTypeError(
            f"must be a positive multiple of {SIZE_MULTIPLE}, got {value} (the network stride and the 16 px patches)")
    return value


def backbone(text: str) -> int | str:
    """A backbone: a ResNet depth as an int (`18`), a ViT size by its name (`vit_small`);
    the option's `choices` say which exist."""
    text = text.strip()
    return int(text) if text.isdigit() else text


def device(text: str) -> str:
    """A torch device for a command: `cpu`, `cuda` or `cuda:N`."""
    text = text.strip().lower()
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda or cuda:N")
    return text


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)
positive_float = float_in(0.0, low_open=True)
nonnegative_float = float_in(0.0)


def add_version_option(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`--version`, the same for every command: prints `ncl_fast <version>` (from
    `ncl_fast/_version.py`) and exits 0. Returns the parser."""
    parser.add_argument("--version", action="version", version=f"ncl_fast {__version__}",
                        help="print the version of ncl_fast and exit")
    return parser


def add_large_images_option(add: Callable[..., object]) -> None:
    """`--allow-large-images`, shared by every command that decodes images (`add` is a
    parser's `add_argument`)."""
    add("--allow-large-images", "--allow_large_images", action="store_true",
        help="decode images above Pillow's decompression-bomb limit (about 89 Mpx); only for files you trust")


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse; a command with `--allow-large-images` set lifts Pillow's limit here."""
    args = parser.parse_args(argv)
    if getattr(args, "allow_large_images", False):
        from .data.sources import allow_large_images

        allow_large_images()
    return args


def default_workers(most: int = 4) -> int:
    """DataLoader workers: at most `most`, and no more than the CPUs this process may use
    (more makes PyTorch warn and only adds contention)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(most, cpus))


# ---- output locations --------------------------------------------------------------------------------------------
def check_output_dir(path: str | os.PathLike, option: str, need_bytes: int = 0) -> Path:
    """Create `path` if needed and prove a file can be written in it, before any work starts.

    Raises UsageError naming the folder, the option and what is wrong: a file where
    a folder (or one of its parents) should be, no permission, a read-only file
    system, or less free space than `need_bytes`.
    """
    folder = Path(path)
    for parent in [folder, *folder.parents]:
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"{option} {folder}: {parent} is a file, not a folder; "
                             f"remove it or choose another {option}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".ncl_fast-write-test-{uuid.uuid4().hex}"
        with open(probe, "wb") as f:
            f.write(b"x")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as err:
        raise UsageError(f"{option} {folder} cannot be written ({describe_os_error(err)}); "
                         f"choose another {option} or fix its permissions") from None
    if need_bytes:
        free = shutil.disk_usage(folder).free
        if free < need_bytes:
            raise UsageError(f"{option} {folder}: only {free / 2**20:.0f} MiB free, about {need_bytes / 2**20:.0f} MiB "
                             f"are needed; free some space or choose another {option}")
    return folder


def describe_os_error(err: OSError) -> str:
    names = {errno.ENOSPC: "the disk is full", errno.EROFS: "read-only file system",
             errno.EACCES: "permission denied", errno.EPERM: "permission denied",
             errno.ENOTDIR: "a file is in the way of a folder", errno.EEXIST: "a file is in the way",
             errno.EDQUOT: "disk quota exceeded"}
    return names.get(err.errno, err.strerror or str(err))


# ---- JSON --------------------------------------------------------------------------------------------------------
def json_safe(obj):
    """`obj` with every NaN or infinity replaced by None (null), so `json.dumps(..., allow_nan=False)` works."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


# ---- the one way commands end ------------------------------------------------------------------------------------
def error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def command(func: Callable[..., int]) -> Callable[..., int]:
    """Wrap a command's `main`: UsageError -> 2, RunError -> 1, Ctrl-C -> 130, each with
    one clear line on stderr instead of a traceback."""

    @functools.wraps(func)
    def main(*args, **kwargs) -> int:
        try:
            return func(*args, **kwargs)
        except UsageError as err:
            error(str(err))
            return USAGE
        except RunError as err:
            error(str(err))
            return FAILURE
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr, flush=True)
            return INTERRUPTED

    return main
