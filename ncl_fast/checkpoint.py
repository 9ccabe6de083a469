"""Checkpoints: atomic writes, exact resumption, and loading other people's files.

A training checkpoint holds IMDL-BenCo's keys `{model, optimizer, epoch, scaler,
args}` plus what an exact resumption needs: the global step, the step inside the
epoch (a Ctrl-C mid-epoch), and the RNG states. A file holding only `{model}`,
or a bare state dict, loads too.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


def save_atomic(obj: dict, path: str | os.PathLike) -> Path:
    """Write to a temporary file in the same folder, flush it to disk, then rename:
    a crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """The checkpoint as a dict with at least `model` (a state dict).

    Raises FileNotFoundError, or CheckpointError naming the file when it cannot be
    read (damaged, truncated, not a checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch.load raises many kinds on damaged files
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {first[:200]}): "
                              f"it is damaged or incomplete") from None
    if isinstance(ckpt, dict) and "model" in ckpt and isinstance(ckpt["model"], dict):
        return ckpt
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return {"model": ckpt}
    raise CheckpointError(f"checkpoint {path} holds neither {{'model': ...}} nor a state dict")


def strip_prefixes(state: dict) -> dict:
    """Remove the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes."""
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def checkpoints_newest_first(folder: str | os.PathLike) -> list[Path]:
    """The `checkpoint-*.pth` files in `folder`, newest (by modification time) first."""
    return sorted(Path(folder).glob("checkpoint-*.pth"), key=lambda p: p.stat().st_mtime, reverse=True)


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest `checkpoint-*.pth` in `folder` by modification time, or None."""
    files = checkpoints_newest_first(folder)
    return files[0] if files else None


def newest_readable(folder: str | os.PathLike) -> tuple[Path | None, dict | None, list[CheckpointError]]:
    """`(path, checkpoint, skipped)`: the newest checkpoint in `folder` that loads (None
    if none does), and the errors of the newer ones that could not be read."""
    skipped: list[CheckpointError] = []
    for path in checkpoints_newest_first(folder):
        try:
            return path, load_checkpoint(path), skipped
        except CheckpointError as err:
            skipped.append(err)
    return None, None, skipped
