"""Compile the Triton kernels of one (dtype, layout, path) ahead of the parity tests
and benchmarks, so that `gpu_check.sh` can compile all variants in parallel
processes (Triton's on-disk cache then serves the later runs). Runs one NCL forward
and backward at every shape those runs use: full size (B = 4, 512 x 512, stages 1
and 2) and the odd shapes of `sanitize_check.py`.

Run: python bench/warm_cache.py --dtype bfloat16 --layout channels_last --path stored
"""
from __future__ import annotations

import argparse

import torch

from ncl_fast import functional
from ncl_fast.kernels import ncl_terms as k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--layout", default="contiguous")
    ap.add_argument("--path", default="stored", choices=["stored", "bounded"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    shapes = [(4, 64, 256, 256, 8, 2), (4, 256, 128, 128, 4, 4), (3, 8, 36, 28, 4, 2), (2, 16, 16, 24, 2, 4)]
    for B, C, h, w, p, s in shapes:
        k.SIM_BUDGET = 0.0 if args.path == "bounded" else (k.SIM_BUDGET if h >= 128 else 64.0)
        mask = (torch.rand(B, 1, h * s, w * s, device=dev, generator=g) > 0.7).float()
        mask[:, :, : h * s // 3] = 1.0
        mask[:, :, -(h * s // 3):] = 0.0
        feat = torch.randn(B, C, h, w, device=dev, generator=g).to(dtype)
        if args.layout == "channels_last":
            feat = feat.to(memory_format=torch.channels_last)
        feat.requires_grad_()
        D = C * p * p
        ap_ = torch.randn(B, D, device=dev, generator=g).to(dtype).requires_grad_()
        an_ = torch.randn(B, D, device=dev, generator=g).to(dtype).requires_grad_()
        labels = functional.patch_labels(mask, (h, w), p, impl="triton")
        functional.ncl_terms(feat, labels, ap_, an_, p, 0.1, impl="triton").sum().backward()
    torch.cuda.synchronize()
    print(f"warm: {args.dtype} {args.layout} {args.path}")


if __name__ == "__main__":
    main()
