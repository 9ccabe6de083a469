"""Three-scale pivot-consistent loss, forward + backward: the C++/CUDA extension vs
the reference (eager) vs torch.compile(reference).

B = 4, 512 x 512 uint8-valued float mask, predictions at strides 8, 4 and 1
(64^2, 128^2 and 512^2 logits), radius 2, mu 0.9; fp32 and bf16 logits.

Bytes floor (forward + backward): every scale's logits read twice (forward and
backward) and their gradients written once, plus the full-resolution mask read
once per pass: 3 * n_logits * e + 2 * B * H * W * e_mask. (The kernels read the
mask once per scale per pass, 3x that term.) GB/s = floor / p50.

Run: python bench/bench_pc_loss.py  (a CUDA device is required)
"""
from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _harness import bench_ms, device_header, fmt_q, irregular_masks, table  # noqa: E402

from ncl_fast import functional  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-all", action="store_true",
                    help="torch.compile(reference) for the uint8 mask too (float32 masks only by default)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_pc_loss.py needs a CUDA device")
    dev = torch.device("cuda")
    print(device_header())
    B, S = args.batch, args.size
    rows = []
    for mask_dtype in (torch.float32, torch.uint8):
        mask = irregular_masks(B, S, S, (0.05, 0.30), seed=0, device=dev).to(mask_dtype)
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator(device=dev).manual_seed(1)
            preds = [
                torch.randn(B, 1, S // s, S // s, device=dev, generator=g).to(dtype).requires_grad_()
                for s in (8, 4, 1)
            ]
            n = sum(z.numel() for z in preds)
            floor = 3 * n * preds[0].element_size() + 2 * mask.numel() * mask.element_size()

            def run(impl):
                return lambda: functional.pc_loss(preds, mask, 0.9, 2, impl=impl).backward()

            fns = {"cuda": run("cuda"), "reference": run("reference")}
            if not args.no_compile and (args.compile_all or mask_dtype == torch.float32):
                comp = torch.compile(lambda a, b, c, m: functional.pc_loss([a, b, c], m, 0.9, 2, impl="reference"))
                fns["compile(reference)"] = lambda: comp(*preds, mask).backward()
            res = {}
            for name, f in fns.items():
                try:
                    f()
                    res[name] = bench_ms(f)
                except Exception as err:  # report and go on
                    print(f"{mask_dtype} {dtype} {name}: failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
            for name, q in res.items():
                rows.append([
                    str(mask_dtype).replace("torch.", ""), str(dtype).replace("torch.", ""), name, fmt_q(q),
                    f"{res['reference'][1] / q[1]:.1f}x" if "reference" in res else "-",
                    f"{res['compile(reference)'][1] / q[1]:.1f}x" if "compile(reference)" in res else "-",
                    f"{floor / q[1] / 1e6:.0f}",
                ])
    print()
    print(table(["mask", "logits", "impl", "fwd+bwd ms p50 (p20-p80)", "vs reference", "vs compile(reference)",
                 "GB/s (floor / p50)"], rows))


if __name__ == "__main__":
    main()
