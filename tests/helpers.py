"""Random test inputs: masks of irregular shape and feature maps."""
from __future__ import annotations

import torch

MASK_KINDS = ("blobs", "all", "none", "aligned", "noise")


def random_mask(B: int, H: int, W: int, kind: str, gen: torch.Generator, window=(1, 1)) -> torch.Tensor:
    """Float `(B, 1, H, W)` mask in {0, 1}.

    * blobs: a union of random ellipses (irregular tampered regions)
    * all / none: every pixel tampered / authentic
    * aligned: constant over each `window` tile, so no patch of that size is mixed
    * noise: independent pixels (almost every window is mixed)
    """
    if kind == "all":
        return torch.ones(B, 1, H, W)
    if kind == "none":
        return torch.zeros(B, 1, H, W)
    if kind == "noise":
        return (torch.rand(B, 1, H, W, generator=gen) < 0.5).float()
    if kind == "aligned":
        wy, wx = window
        tiles = (torch.rand(B, 1, -(-H // wy), -(-W // wx), generator=gen) < 0.5).float()
        return tiles.repeat_interleave(wy, 2).repeat_interleave(wx, 3)[:, :, :H, :W].contiguous()
    if kind != "blobs":
        raise ValueError(kind)
    yy = torch.arange(H, dtype=torch.float64)[:, None]
    xx = torch.arange(W, dtype=torch.float64)[None, :]
    out = torch.zeros(B, 1, H, W)
    for b in range(B):
        n = int(torch.randint(1, 4, (1,), generator=gen))
        for _ in range(n):
            cy, cx = (torch.rand(2, generator=gen).double() * torch.tensor([H, W])).tolist()
            ry, rx = (0.1 + 0.3 * torch.rand(2, generator=gen).double() * torch.tensor([H, W])).tolist()
            inside = ((yy - cy) / max(ry, 0.5)) ** 2 + ((xx - cx) / max(rx, 0.5)) ** 2 <= 1
            out[b, 0][inside] = 1.0
    return out


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
