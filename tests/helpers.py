"""What the tests share: random masks (`ncl_fast.testing`, the generator `bench/`
uses too), the backend check, the tiny training options and a synthetic split.
Tests import it as `helpers` (`pythonpath` in pyproject.toml); nothing is imported
from conftest.py, which holds only fixtures and hooks."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ncl_fast.testing import MASK_KINDS, random_mask  # noqa: F401  (the tests' masks)

#: the repository's root (README.md, .ci/, bench/)
ROOT = Path(__file__).resolve().parents[1]


def require_backend(backend: str, op: str) -> None:
    """Skip (or fail, where NCL_FAST_REQUIRE=<backend,...> says it must be there, as in CI)
    when `backend` cannot run `op` on CPU tensors here."""
    from ncl_fast import _backend

    reason = _backend.unavailable_reason(backend, op, torch.device("cpu"))
    if reason is None:
        return
    required = os.environ.get("NCL_FAST_REQUIRE", "").split(",")
    if backend in required:
        pytest.fail(f"NCL_FAST_REQUIRE lists {backend}, but it cannot run {op}: {reason}")
    pytest.skip(f"{backend} backend unavailable: {reason}")


def as_mask_dtype(mask: torch.Tensor, dtype: str, gen: torch.Generator) -> torch.Tensor:
    """The same binary mask as bool, uint8 (0/255) or soft float (values around 0.5)."""
    if dtype == "bool":
        return mask > 0.5
    if dtype == "uint8":
        return (mask * 255).to(torch.uint8)
    if dtype == "soft":
        # tampered in (0.5, 1], authentic in [0, 0.5]: binarization must recover the mask
        jitter = torch.rand(mask.shape, generator=gen)
        return torch.where(mask > 0.5, 0.5 + 0.5 * jitter.clamp(min=1e-3), 0.5 * jitter)
    return mask


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def synthetic_split(folder, n: int, seed: int, n_train: int):
    """A small synthetic Tp/Gt set in `folder` with train.json / test.json lists."""
    import json

    from ncl_fast import synth

    root = synth.generate(folder, n=n, seed=seed, progress=False)
    pairs = [[f"Tp/{p.name}", f"Gt/{p.name}"] for p in sorted((root / "Tp").glob("*.png"))]
    (root / "train.json").write_text(json.dumps(pairs[:n_train]))
    (root / "test.json").write_text(json.dumps(pairs[n_train:]))
    return root


#: `ncl_fast.train` options for a model that trains in seconds on the CPU (32 px images)
TINY_TRAIN = ["--backbone", "18", "--width", "8", "--head_channels", "16", "--image_size", "32",
              "--test_image_size", "32", "--batch_size", "2", "--num_workers", "0", "--lr", "0.01", "--no-progress",
              "--if_resizing"]


def tiny_train(**changes: str | None) -> list[str]:
    """`TINY_TRAIN` with the values of some options changed (`lr="0.05"`) or options
    left out (`batch_size=None`); keys are the options' names without `--`."""
    out, i = [], 0
    while i < len(TINY_TRAIN):
        option = TINY_TRAIN[i]
        has_value = i + 1 < len(TINY_TRAIN) and not TINY_TRAIN[i + 1].startswith("--")
        key = option[2:]
        if key in changes:
            if changes[key] is not None:
                if not has_value:
                    raise ValueError(f"tiny_train: {option} is a flag; it can only be left out ({key}=None)")
                out += [option, changes[key]]
        else:
            out += TINY_TRAIN[i:i + 1 + has_value]
        i += 1 + has_value
    unknown = set(changes) - {o[2:] for o in TINY_TRAIN if o.startswith("--")}
    if unknown:
        raise ValueError(f"tiny_train: {sorted(unknown)} are not options of TINY_TRAIN")
    return out


def losses_over_steps(model, x, mask, opt, steps: int) -> list:
    """The training loss of `model` on one batch over `steps` optimizer steps."""
    losses = []
    for _ in range(steps):
        loss = model(x, mask)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
