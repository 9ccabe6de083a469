"""Random masks for the tests and the benchmarks: one generator, so that what
`bench/` times and what `tests/` checks are the same kind of tampered region.

* `ellipse_masks`: irregular regions, unions of random rotated ellipses, either
  grown until each image's tampered fraction reaches a target drawn from `area`
  (the benchmarks' masks: `area=(0.05, 0.30)`, the default semi-axes) or a
  number of them drawn from `count`.
* `random_mask`: the kinds the tests sweep: `blobs` (one to three ellipses of
  semi-axes up to 0.3 of the side: about 12 % of the image on average, so most
  images keep authentic, tampered and contour regions), `all`, `none`,
  `aligned` (no patch of a given window mixed) and `noise`.

Everything is drawn from the generator passed in (a `torch.Generator`, or an int
seed for a new one), so a seed replays the same masks.
"""
from __future__ import annotations

import torch

MASK_KINDS = ("blobs", "all", "none", "aligned", "noise")

#: ellipses per image of the `blobs` kind
BLOB_COUNT = (1, 3)
#: their semi-axes, as fractions of the mask's height and width (from a speck to 0.3)
BLOB_RADIUS = (0.02, 0.30)


def _generator(generator: torch.Generator | int) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise TypeError(f"generator must be a torch.Generator or an int seed, got {type(generator).__name__}")


def _ellipse(g: torch.Generator, yy: torch.Tensor, xx: torch.Tensor, radius: tuple[float, float]) -> torch.Tensor:
    """Bool `(H, W)`: one ellipse, its centre, semi-axes and angle drawn from `g`."""
    H, W = yy.shape[0], xx.shape[1]
    cy, cx = torch.rand(2, generator=g).tolist()
    ry, rx = (radius[0] + (radius[1] - radius[0]) * torch.rand(2, generator=g)).tolist()
    angle = torch.rand(1, generator=g).item() * 3.1416
    c, s = torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle))
    dy, dx = yy - cy * H, xx - cx * W
    u, v = (c * dx + s * dy) / (rx * W), (-s * dx + c * dy) / (ry * H)
    return u**2 + v**2 <= 1


def ellipse_masks(B: int, H: int, W: int, generator: torch.Generator | int, area: tuple[float, float] = (0.05, 0.30),
                  radius: tuple[float, float] = (0.03, 0.15), count: tuple[int, int] | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Float `(B, 1, H, W)` masks in {0, 1}: unions of random rotated ellipses.

    For each image a target tampered fraction is drawn uniformly from `area`
    (0 <= low <= high < 1), then ellipses are added until the mask covers it;
    with `count=(low, high)` instead, the number of ellipses is drawn uniformly
    from low..high and `area` is not used. Each ellipse has its centre anywhere
    in the image, semi-axes drawn uniformly from `radius` (fractions of H for
    the vertical one, of W for the horizontal one) and a random angle. Drawn on
    the CPU from `generator` (so a seed gives the same masks on every device),
    then moved to `device`.
    """
    if B < 0 or H < 1 or W < 1:
        raise ValueError(f"ellipse_masks: B must be >= 0 and H, W >= 1, got B={B}, H={H}, W={W}")
    if count is None and not 0.0 <= area[0] <= area[1] < 1.0:
        raise ValueError(f"ellipse_masks: area must satisfy 0 <= low <= high < 1, got {area}")
    if count is not None and not 0 <= count[0] <= count[1]:
        raise ValueError(f"ellipse_masks: count must satisfy 0 <= low <= high, got {count}")
    if not 0.0 < radius[0] <= radius[1]:
        raise ValueError(f"ellipse_masks: radius must satisfy 0 < low <= high, got {radius}")
    g = _generator(generator)
    yy = torch.arange(H, dtype=torch.float32)[:, None]
    xx = torch.arange(W, dtype=torch.float32)[None, :]
    masks = torch.zeros(B, 1, H, W)
    for b in range(B):
        m = torch.zeros(H, W, dtype=torch.bool)
        if count is None:
            target = area[0] + (area[1] - area[0]) * torch.rand(1, generator=g).item()
            while m.float().mean() < target:
                m |= _ellipse(g, yy, xx, radius)
        else:
            for _ in range(int(torch.randint(count[0], count[1] + 1, (1,), generator=g))):
                m |= _ellipse(g, yy, xx, radius)
        masks[b, 0] = m.float()
    return masks if device is None else masks.to(device)


def random_mask(B: int, H: int, W: int, kind: str, generator: torch.Generator | int,
                window: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """Float `(B, 1, H, W)` mask in {0, 1}, of one of `MASK_KINDS`:

    * blobs: irregular tampered regions (`ellipse_masks` with `BLOB_COUNT`, `BLOB_RADIUS`)
    * all / none: every pixel tampered / authentic
    * aligned: constant over each `window` tile, so no patch of that size is mixed
    * noise: independent pixels (almost every window is mixed)
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"random_mask: kind must be one of {MASK_KINDS}, got {kind!r}")
    if kind == "all":
        return torch.ones(B, 1, H, W)
    if kind == "none":
        return torch.zeros(B, 1, H, W)
    g = _generator(generator)
    if kind == "noise":
        return (torch.rand(B, 1, H, W, generator=g) < 0.5).float()
    if kind == "aligned":
        wy, wx = window
        tiles = (torch.rand(B, 1, -(-H // wy), -(-W // wx), generator=g) < 0.5).float()
        return tiles.repeat_interleave(wy, 2).repeat_interleave(wx, 3)[:, :, :H, :W].contiguous()
    return ellipse_masks(B, H, W, g, radius=BLOB_RADIUS, count=BLOB_COUNT)
