"""Training-step time and peak memory of the paper's configuration (ResNet-101,
output stride 8, stage-1 Pivot, B = 4, 512 x 512), side by side:

* `base`: the model with plain BCE (no NCL, no PC);
* `NCL reference`: the full loss with the PyTorch reference ops;
* `NCL fused`: the full loss with the Triton NCL kernels and the CUDA PC extension;

each eager and under `torch.compile`, in fp32 (TF32 matmuls/convolutions) and in
bf16 autocast with channels_last. Then `python -m ncl_fast.train` itself on the
synthetic set (data loading included): images/s and GPU utilization.

Run: python bench/bench_train_step.py  (a CUDA device is required)
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _harness import device_header, table  # noqa: E402
from bench_ncl_loss import top_kernels  # noqa: E402

from ncl_fast import _backend  # noqa: E402
from ncl_fast.model import LossConfig, NCLModel  # noqa: E402
from ncl_fast.testing import ellipse_masks  # noqa: E402

CONFIGS = {
    "base": ("base", None),
    "NCL reference": ("full", "reference"),
    "NCL fused": ("full", "fused"),
}
PROFILE = False
FUSED = {"patch_labels": "triton", "ncl_terms": "triton", "pc_bce": "cuda", "pc_loss": "cuda"}


def step_time(variant: str, impl: str | None, precision: str, compiled: bool, steps: int, B: int, size: int):
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = NCLModel(101, 1, LossConfig(variant=variant, impl="reference" if impl == "reference" else None)).to(dev)
    cl = precision == "bf16"
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.007, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(B, 3, size, size, device=dev)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    mask = ellipse_masks(B, size, size, 0, area=(0.05, 0.30), device=dev)
    fwd = torch.compile(model) if compiled else model

    def one():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = fwd(x, mask)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up (and compilation)
        one()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(steps):
        start.record()
        one()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    if PROFILE:
        print(f"\n{variant} {impl} {precision} {'compiled' if compiled else 'eager'}: top kernels per step")
        print(top_kernels(one, iters=3, n=10), flush=True)
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]
    return (q(0.2), q(0.5), q(0.8)), torch.cuda.max_memory_allocated() / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--all", action="store_true", help="compiled fp32 too (compilation takes minutes)")
    ap.add_argument("--no-train", action="store_true", help="skip the python -m ncl_fast.train runs")
    ap.add_argument("--train-modes", default="eager,compile", help="python -m ncl_fast.train runs: eager and/or compile")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="step configurations to time")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--no-steps", action="store_true", help="only the python -m ncl_fast.train runs")
    ap.add_argument("--profile", action="store_true", help="print the top kernels of every configuration's step")
    args = ap.parse_args()
    global PROFILE
    PROFILE = args.profile
    if not torch.cuda.is_available():
        sys.exit("bench_train_step.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    print(device_header())
    choose = _backend.choose
    rows, base = [], {}
    for p in ([] if args.no_steps else args.precisions.split(",")):
        precision = "bf16" if p == "bf16" else "fp32 (TF32)"
        # compiled: bf16 always (the target compares it with eager bf16), fp32 with --all
        modes = [False] if args.no_compile or (p == "fp32" and not args.all) else [False, True]
        for compiled in modes:
            for name in args.configs.split(","):
                variant, impl = CONFIGS[name]
                if impl == "fused":
                    _backend.choose = lambda op, _i, device: choose(op, FUSED[op], device)
                try:
                    q, mem = step_time(variant, impl, p, compiled, args.steps, args.batch, args.size)
                except Exception as err:  # report and go on: one failure must not hide the rest
                    rows.append([precision, "compiled" if compiled else "eager", name, f"failed: {err}"[:80],
                                 "-", "-", "-"])
                    continue
                finally:
                    _backend.choose = choose
                    torch._dynamo.reset()
                key = (precision, compiled)
                if name == "base":
                    base[key] = (q[1], mem)
                b = base.get(key)
                rows.append([precision, "compiled" if compiled else "eager", name,
                             f"{q[1]:.1f} ({q[0]:.1f}-{q[2]:.1f})",
                             f"{q[1] / b[0]:.3f}x" if b else "-", f"{mem:.2f}",
                             f"{100 * (mem / b[1] - 1):+.1f}%" if b else "-"])
    if rows:
        print()
        print(table(["precision", "mode", "loss", "step ms p50 (p20-p80)", "vs base step", "peak GB",
                     "peak vs base"], rows))
    if args.no_train:
        return
    # the command itself, data loading included, eager and compiled
    modes = {"eager": [], "compile": ["--compile"]}
    for extra in (modes[m] for m in args.train_modes.split(",")):
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "ncl_fast.train", "--preset", "paper", "--max_steps", "60",
                   "--output_dir", out, "--no-progress", "--num_workers", "8", *extra]
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            print(f"\n`python -m ncl_fast.train --preset paper --max_steps 60 {' '.join(extra)}`: "
                  f"exit {proc.returncode} in {time.time() - t0:.0f} s")
            if proc.returncode:
                print((proc.stdout + proc.stderr)[-1500:])
                continue
            import json

            for line in open(f"{out}/log.txt"):
                rec = json.loads(line)
                print(f"images/s (data loading included) {rec['train_images_per_s']:.1f}, mean GPU utilization "
                      f"{rec.get('train_gpu_util', float('nan')):.0f}%, peak memory "
                      f"{rec.get('train_peak_mem_gb', float('nan')):.2f} GB, mean loss {rec['train_loss']:.4f}")


if __name__ == "__main__":
    main()
