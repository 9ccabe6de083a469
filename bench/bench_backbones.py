"""Training-step time of the backbones at the demo preset's shape: the demo's
quarter-width ResNet-18 DeepLabV3+ (stem 16, head 64) beside the ViT sizes
(head 64), batch 8, 160 x 160, variant `full`, AdamW, fp32, the loss backend
`auto` picks (on a CPU: the reference NCL ops and the CPU build of the PC
extension, as `python -m ncl_fast.train --preset demo` runs them).

One step = forward, NCL + PC loss, backward, optimizer update. The models are
timed in interleaved rounds, so load from other processes touches every row
alike; p20 is the figure least disturbed by such load.

Run: python bench/bench_backbones.py [--device cpu] [--threads 2] [--backbones 18,vit_demo]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _harness import device_header, table  # noqa: E402

from ncl_fast.model import LossConfig, NCLModel, describe_backbone  # noqa: E402
from ncl_fast.testing import ellipse_masks  # noqa: E402


def build(backbone: str, dev: torch.device) -> NCLModel:
    torch.manual_seed(0)
    if backbone.isdigit():  # the demo preset's ResNet: 16-channel stem, 64-channel head
        return NCLModel(int(backbone), 1, LossConfig(), width=16, head_channels=64).to(dev).train()
    return NCLModel(backbone, loss=LossConfig(), head_channels=64).to(dev).train()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="18,vit_demo,vit_tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per model per round")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    print(device_header() + f", {torch.get_num_threads()} CPU threads")
    names = args.backbones.split(",")
    models = {n: build(n, dev) for n in names}
    opts = {n: torch.optim.AdamW(m.parameters(), lr=0.003, weight_decay=0.01) for n, m in models.items()}
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
    mask = ellipse_masks(args.batch, args.size, args.size, 0, area=(0.05, 0.30), device=dev)

    def step(n: str) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = models[n](x, mask)["loss"]
        opts[n].zero_grad(set_to_none=True)
        loss.backward()
        opts[n].step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - t0)

    times = {n: [] for n in names}
    for n in names:  # warm-up
        step(n)
    for _ in range(args.rounds):
        for n in names:
            times[n] += [step(n) for _ in range(args.steps)]
    rows = []
    first = None
    for n in names:
        t = sorted(times[n])
        q = lambda f: t[min(len(t) - 1, int(f * len(t)))]
        first = first or q(0.2)
        params = sum(p.numel() for p in models[n].parameters())
        backbone = int(n) if n.isdigit() else n
        rows.append([describe_backbone(backbone, 16 if n.isdigit() else None), f"{params / 1e6:.2f}",
                     f"{q(0.5):.0f} ({q(0.2):.0f}-{q(0.8):.0f})", f"{q(0.2) / first:.2f}x"])
    print(f"\nbatch {args.batch}, {args.size} x {args.size}, variant full, fp32, {len(times[names[0]])} steps each\n")
    print(table(["backbone", "parameters (M)", "step ms p50 (p20-p80)", f"p20 vs {names[0]}"], rows))


if __name__ == "__main__":
    main()
