"""`python -m ncl_fast.smoke`: a few training steps of a small NCL model on the CPU.

It checks an installation end to end (model, Pivot, NCL and PC losses, backend
choice) in seconds, on a synthetic batch whose tampered regions carry a trace.
"""
from __future__ import annotations

import argparse
import time

import torch

from . import _backend
from .model import VARIANTS, LossConfig, NCLModel


def synthetic_batch(batch: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images with elliptical tampered regions whose noise is stronger."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = []
    for _ in range(batch):
        cy, cx = (torch.rand(2, generator=gen) * size).tolist()
        ry, rx = (size * (0.15 + 0.2 * torch.rand(2, generator=gen))).tolist()
        masks.append((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).float())
    mask = torch.stack(masks)[:, None]
    image = torch.randn(batch, 3, size, size, generator=gen) * (1 + 1.5 * mask)
    return image, mask


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", type=int, default=18, choices=(18, 34, 50, 101))
    ap.add_argument("--variant", default="full", choices=VARIANTS)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=64, help="image side, a multiple of 16")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--impl", default=None, choices=_backend.IMPLS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.size % 16 or args.size < 32:
        ap.error(f"--size must be a multiple of 16 and at least 32, got {args.size}")
    if args.steps < 1 or args.batch < 1:
        ap.error("--steps and --batch must be positive")

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    image, mask = synthetic_batch(args.batch, args.size, gen)
    model = NCLModel(args.backbone, 1, LossConfig(variant=args.variant, impl=args.impl)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    for op in ("patch_labels", "ncl_terms", "pc_bce"):
        print(f"{op:>12}: {_backend.choose(op, args.impl, image.device)[0]}")
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        out = model(image, mask)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        parts = "  ".join(f"{k}={v.item():.4f}" for k, v in out.items() if k not in ("logits", "pred_mask"))
        print(f"step {step:3d}  {parts}")
    print(f"{args.steps} steps in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
