"""NCL loss (patch labels + the three terms) forward / backward / both: Triton vs
the reference (eager) vs torch.compile(reference), at the paper's shapes.

B = 4 images of 512 x 512, masks of 5-30 % tampered area in irregular shapes;
stage 1 (C = 64, 256 x 256 features, p = 8, D = 4096) and stage 2 (C = 256,
128 x 128, p = 4, D = 4096); fp32 and bf16 features, contiguous.

Floors, per batch (|P_b|, |N_b| the tampered / authentic patch counts):
  FLOP forward  = sum_b 2 D |P_b| (|P_b| + |N_b|)  (the similarities the loss needs)
                + sum_b 2 * 2 D (|P_b| + |N_b|)    (both anchors)
  FLOP backward = 2 x the forward (d hat F = T hat F from both sides of each pair)
  bytes forward = the P and N patches' features once + the mask once
  bytes backward = the P and N patches' features once + the whole gradient map written once
Achieved TFLOP/s and GB/s below divide these floors by the measured p50.

Run: python bench/bench_ncl_loss.py  (a CUDA device is required)
"""
from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _harness import bench_ms, device_header, fmt_q, irregular_masks, peak_extra_mb, table  # noqa: E402

from ncl_fast import functional  # noqa: E402

STAGES = {"stage 1": (64, 256, 8), "stage 2": (256, 128, 4)}


def floors(mask: torch.Tensor, C: int, h: int, p: int, dtype: torch.dtype) -> tuple[float, float, float, float]:
    labels = functional.patch_labels(mask, (h, h), p, impl="reference")
    n_p = (labels == 1).sum(1).double()
    n_n = (labels == 0).sum(1).double()
    D = C * p * p
    esize = torch.tensor([], dtype=dtype).element_size()
    fwd_flop = (2 * D * n_p * (n_p + n_n) + 4 * D * (n_p + n_n)).sum().item()
    fwd_bytes = ((n_p + n_n).sum().item() * D * esize) + mask.numel() * mask.element_size()
    bwd_bytes = (n_p + n_n).sum().item() * D * esize + mask.shape[0] * C * h * h * esize
    return fwd_flop, 2 * fwd_flop, fwd_bytes, bwd_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_ncl_loss.py needs a CUDA device")
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference in true fp32, like the kernels
    print(device_header())
    mask = irregular_masks(args.batch, args.size, args.size, (0.05, 0.30), seed=0, device=dev)
    print(f"\nmasks: tampered fraction per image {[round(x, 3) for x in mask.mean((1, 2, 3)).tolist()]}\n")
    rows = []
    for stage, (C, h_full, p) in STAGES.items():
        h = h_full * args.size // 512
        for dname in args.dtypes.split(","):
            dtype = getattr(torch, dname)
            g = torch.Generator(device=dev).manual_seed(1)
            feat = torch.randn(args.batch, C, h, h, device=dev, generator=g).to(dtype).requires_grad_()
            D = C * p * p
            a_pos = torch.randn(args.batch, D, device=dev, generator=g).to(dtype).requires_grad_()
            a_neg = torch.randn(args.batch, D, device=dev, generator=g).to(dtype).requires_grad_()
            map_mb = feat.numel() * feat.element_size() / 1e6
            fwd_flop, bwd_flop, fwd_bytes, bwd_bytes = floors(mask, C, h, p, dtype)

            def loss_fn(impl):
                def f():
                    labels = functional.patch_labels(mask, (h, h), p, impl=impl)
                    return functional.ncl_terms(feat, labels, a_pos, a_neg, p, 0.1, impl=impl).sum(1).mean()

                return f

            impls = {"triton": loss_fn("triton"), "reference": loss_fn("reference")}
            if not args.no_compile:
                impls["compile(reference)"] = torch.compile(loss_fn("reference"))
            results = {}
            for name, f in impls.items():
                loss = f()
                loss.backward()  # warm-up (and compilation)
                fwd = bench_ms(f)
                loss = f()
                bwd = bench_ms(lambda: loss.backward(retain_graph=True))
                both = bench_ms(lambda: f().backward())
                feat.grad = a_pos.grad = a_neg.grad = None  # the gradients are outputs, not extra memory
                grads_mb = sum(t.numel() * t.element_size() for t in (feat, a_pos, a_neg)) / 1e6
                extra = peak_extra_mb(lambda: f().backward()) - grads_mb
                results[name] = (fwd, bwd, both, extra)
            for name, (fwd, bwd, both, extra) in results.items():
                rows.append([
                    stage, dname, name, fmt_q(fwd), fmt_q(bwd), fmt_q(both),
                    f"{results['reference'][2][1] / both[1]:.1f}x",
                    f"{(fwd_flop + bwd_flop) / both[1] / 1e9:.1f}",
                    f"{(fwd_bytes + bwd_bytes) / both[1] / 1e6:.0f}",
                    f"{extra:.1f} ({100 * extra / map_mb:.1f}%)",
                ])
            if "compile(reference)" in results:
                ratio = results["compile(reference)"][2][1] / results["triton"][2][1]
                print(f"{stage} {dname}: triton vs compile(reference), fwd+bwd: {ratio:.1f}x")
    print()
    print(table(
        ["features", "dtype", "impl", "fwd ms p50 (p20-p80)", "bwd ms", "fwd+bwd ms", "speedup vs reference",
         "TFLOP/s (floor / p50)", "GB/s (floor / p50)", "extra peak MB (% of map)"],
        rows,
    ))


if __name__ == "__main__":
    main()
