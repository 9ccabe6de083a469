"""Checkpoints and every other output file: one atomic write, exact resumption,
and loading a model from anybody's checkpoint.

A training checkpoint holds IMDL-BenCo's keys `{model, optimizer, epoch, scaler,
args}` plus what an exact resumption needs: the global step, the position to
continue from (`next_epoch`, `next_step`), the RNG states and the loss sums of an
epoch stopped part-way. A file holding only `{model}`, or a bare state dict,
loads too; so do IMDL-BenCo's (an `argparse.Namespace` as `args`, `NCLBenCo`'s
weights under `model.`).
"""
from __future__ import annotations

import argparse
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from ..model import LossConfig, NCLModel, describe_backbone
from ..outputs import OutputError, first_line, write_atomic, write_json

__all__ = ["CheckpointError", "OutputError", "checkpoints_newest_first", "load_checkpoint", "model_from_checkpoint",
           "newest_readable", "rng_state", "set_rng_state", "strip_prefixes", "write_atomic", "write_json"]


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
    """The checkpoint as a dict with at least `model` (a state dict) and `args` (a dict).

    Raises FileNotFoundError, or CheckpointError naming the file when it cannot be
    read (damaged, truncated, not a checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch.load raises many kinds on damaged files
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {first_line(err)}): "
                              f"it is damaged or incomplete") from None
    if isinstance(ckpt, dict) and "model" in ckpt and isinstance(ckpt["model"], dict):
        ckpt = dict(ckpt)
    elif isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        ckpt = {"model": ckpt}
    else:
        raise CheckpointError(f"checkpoint {path} holds neither {{'model': ...}} nor a state dict")
    args = ckpt.get("args")
    ckpt["args"] = vars(args) if isinstance(args, argparse.Namespace) else (args if isinstance(args, dict) else {})
    return ckpt


def strip_prefixes(state: dict) -> dict:
    """Remove the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes, and the
    `model.` of IMDL-BenCo's `NCLBenCo` wrapper."""
    out = {}
    wrapped = bool(state) and all(k.split(".", 1)[0] in ("model", "module", "_orig_mod") for k in state)
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in ("module.", "_orig_mod.") + (("model.",) if wrapped else ()):
                if k.startswith(prefix):
                    k, changed = k[len(prefix):], True
        out[k] = v
    return out


_NAME = re.compile(r"checkpoint-(\d+)\.pth$")


def checkpoints_newest_first(folder: str | os.PathLike) -> list[Path]:
    """The `checkpoint-<epoch>.pth` files in `folder`, furthest position first: by the
    epoch in the name, which is the epoch the file's recorded position is in (a stop
    mid-epoch writes that epoch's file), never by file times, which copies change."""
    found = [(int(m.group(1)), p) for p in Path(folder).glob("checkpoint-*.pth") if (m := _NAME.search(p.name))]
    return [p for _, p in sorted(found, key=lambda t: t[0], reverse=True)]


def newest_readable(folder: str | os.PathLike) -> tuple[Path | None, dict | None, list[CheckpointError]]:
    """`(path, checkpoint, skipped)`: the furthest checkpoint in `folder` that loads (None
    if none does), and the errors of the further ones that could not be read."""
    skipped: list[CheckpointError] = []
    for path in checkpoints_newest_first(folder):
        try:
            return path, load_checkpoint(path), skipped
        except CheckpointError as err:
            skipped.append(err)
    return None, None, skipped


def model_from_checkpoint(path: str, device: torch.device, fallback: dict | None = None) -> tuple[NCLModel, dict]:
    """Rebuild the model a checkpoint was trained with (`model_config`), load its weights.

    `fallback` gives what a checkpoint without `model_config` cannot say (its
    `backbone`). A missing `pivot_stage` or `width` takes NCLModel's default for the
    backbone (ResNet: 1 and 64; a ViT has neither and stores None). Raises ValueError
    naming the file when the weights do not fit."""
    ckpt = load_checkpoint(path)
    cfg = dict(fallback or {})
    cfg.update(ckpt.get("model_config") or {})
    backbone = cfg.get("backbone", 101)
    try:
        model = NCLModel(
            backbone, cfg.get("pivot_stage"), LossConfig(variant=cfg.get("variant", "full")),
            dropout=cfg.get("dropout", 0.1), width=cfg.get("width"), head_channels=cfg.get("head_channels", 256),
        )
    except ValueError as err:  # a model_config no model fits: edited, or from another version
        raise ValueError(f"checkpoint {path}: its model_config {cfg} builds no model ({err})") from None
    state = strip_prefixes(ckpt["model"])
    net = "DeepLabV3+" if isinstance(backbone, int) else "segmenter"
    what = f"a {describe_backbone(backbone, cfg.get('width'))} {net}"
    how = ("its model_config does not match the file's weights: it is damaged or was edited"
           if ckpt.get("model_config") else
           "it has no model_config: pass --backbone as trained (and --width, --head_channels, --variant)")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        first = str(err).strip().splitlines()[1:2]
        raise ValueError(f"checkpoint {path} does not fit {what}: {first}; {how}") from None
    needed = [k for k in missing if k.startswith("net.")]
    if needed or any(k.startswith("net.") for k in unexpected):
        raise ValueError(
            f"checkpoint {path} does not fit {what} (missing {needed[:3]}, unexpected {list(unexpected)[:3]}); {how}"
        )
    return model.to(device).eval(), ckpt
