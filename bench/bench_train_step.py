"""Training-step time and peak memory of the paper's configuration (ResNet-101,
output stride 8, stage-1 Pivot, B = 4, 512 x 512), side by side:

* `base`: the model with plain BCE (no NCL, no PC);
* `NCL reference`: the full loss with the PyTorch reference ops;
* `NCL fused`: the full loss with the Triton NCL kernels and the CUDA PC extension;

each eager and under `torch.compile`, in fp32 (TF32 matmuls/convolutions) and in
bf16 autocast with channels_last. Then `python -m ncl_fast.train` itself on the
synthetic set (data loading included): images/s against the step alone, the
share of time spent waiting for data, and GPU utilization sampled by the
monitor's thread.

`--dispatch` (no GPU needed): dispatcher operations per training step, counted
by the profiler on the CPU, for the base and the full variant, as the training
loop issues them (the batch to the device, the step, the loss sums); with
`--against REV` the same on a git worktree of REV, side by side in one run.

Run: python bench/bench_train_step.py  (a CUDA device is required)
     python bench/bench_train_step.py --dispatch --against 5a53e41
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _harness import device_header, table  # noqa: E402
from bench_ncl_loss import top_kernels  # noqa: E402

from ncl_fast import _backend  # noqa: E402
from ncl_fast.data import to_model_input  # noqa: E402
from ncl_fast.engine.loop import TrainStep  # noqa: E402
from ncl_fast.model import LossConfig, NCLModel  # noqa: E402
from ncl_fast.testing import ellipse_masks  # noqa: E402

CONFIGS = {
    "base": ("base", None),
    "NCL reference": ("full", "reference"),
    "NCL fused": ("full", "fused"),
}
PROFILE = False
FUSED = {"patch_labels": "triton", "ncl_terms": "triton", "pc_bce": "cuda", "pc_loss": "cuda"}


#: how the step runs: eager, torch.compile (one graph: model and loss), and compiled with CUDA graphs
MODES = {"eager": None, "compiled": "default", "graphed": "reduce-overhead"}


def step_time(variant: str, impl: str | None, precision: str, mode: str, steps: int, B: int, size: int):
    """The training command's step (`to_model_input`: the uint8 batch normalized on the
    device; `TrainStep`: network and loss), backward and SGD update, on one batch
    resident on the GPU."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = NCLModel(101, 1, LossConfig(variant=variant, impl="reference" if impl == "reference" else None)).to(dev)
    cl = precision == "bf16"
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.007, momentum=0.9, weight_decay=5e-4)
    batch = {"image": torch.randint(0, 256, (B, 3, size, size), dtype=torch.uint8, device=dev),
             "mask": ellipse_masks(B, size, size, 0, area=(0.05, 0.30), device=dev) > 0.5}
    step = TrainStep(model)
    fwd = step if MODES[mode] is None else torch.compile(step, mode=None if MODES[mode] == "default" else MODES[mode])

    def one():
        x, mask, _ = to_model_input(batch, dev, channels_last=cl)
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
        print(f"\n{variant} {impl} {precision} {mode}: top kernels per step")
        print(top_kernels(one, iters=3, n=10), flush=True)
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]
    return (q(0.2), q(0.5), q(0.8)), torch.cuda.max_memory_allocated() / 1e9


# Runs in a subprocess with the revision's checkout first on sys.path: counts the
# profiler's aten:: events per step of the training loop, at the paper's model
# (ResNet-101, stage-1 Pivot, batch 4) on 64 px images (the count does not depend
# on the image size).
DISPATCH_SCRIPT = r"""
import json, sys, tempfile
sys.path.insert(0, sys.argv[1])
import torch
from torch.profiler import ProfilerActivity, profile
variant, steps, data = sys.argv[2], int(sys.argv[3]), sys.argv[4]
argv = ["--preset", "paper", "--image_size", "64", "--test_image_size", "64", "--num_workers", "0",
        "--variant", variant, "--data_path", data, "--no-progress", "--device", "cpu",
        "--output_dir", tempfile.mkdtemp()]
from ncl_fast import distributed
ctx = distributed.setup("cpu")
try:
    from ncl_fast.engine.config import resolve
    from ncl_fast.engine.datasets import load_training_data
    from ncl_fast.engine.loop import Trainer
    from ncl_fast.data import to_model_input
    config = resolve(argv)
    trainer = Trainer(config, ctx, *load_training_data(config, ctx))
    trainer.prepare()
    trainer.sums = torch.zeros(len(trainer.parts))
    def step(batch):
        image, mask, _ = to_model_input(batch, ctx.device)
        trainer.sums += trainer.train_step(image, mask, 0.007)
except ImportError:  # the layout before the engine (main 5a53e41)
    from ncl_fast import train
    args = train.resolve_args(argv)
    trainer = train.Trainer(args, ctx, *train.load_datasets(args, ctx))
    trainer.prepare()
    trainer.step = trainer.global_step = 0
    sums = {}
    def step(batch):
        for k, v in trainer.train_step(batch, 0.007).items():
            sums[k] = sums.get(k, 0.0) + v
trainer.model.train()
batches = iter(trainer.loader)
step(next(batches))  # warm-up
counts = []
for _ in range(steps):
    batch = next(batches)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(batch)
    counts.append(sum(1 for e in prof.events() if e.name.startswith("aten::")))
print(json.dumps({"per_step": counts}))
"""


def dispatch_counts(root: str, variant: str, steps: int, data: str) -> list[int]:
    proc = subprocess.run([sys.executable, "-c", DISPATCH_SCRIPT, root, variant, str(steps), data],
                          capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "NCL_FAST_BACKEND": "reference"})
    if proc.returncode:
        raise RuntimeError(f"{root}: {proc.stderr[-2000:]}")
    import json

    return json.loads(proc.stdout.strip().splitlines()[-1])["per_step"]


def dispatch_report(against: str | None, steps: int) -> None:
    """Dispatcher operations per training step, this tree beside `against` (a git revision)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    roots = {"this tree": here}
    with tempfile.TemporaryDirectory() as tmp:
        if against:
            sha = subprocess.run(["git", "-C", here, "rev-parse", "--short", against], capture_output=True,
                                 text=True, check=True).stdout.strip()
            subprocess.run(["git", "-C", here, "worktree", "add", "--detach", f"{tmp}/rev", sha], check=True,
                           capture_output=True)
            roots = {f"{against} ({sha})": f"{tmp}/rev", **roots}
        sys.path.insert(0, os.path.join(here, "tests"))
        from helpers import synthetic_split

        data = synthetic_split(f"{tmp}/data", n=4 * (steps + 1), seed=0, n_train=4 * (steps + 1)) / "train.json"
        print(device_header())
        print(f"\nDispatcher operations per training step (profiler aten:: events, CPU), ResNet-101, batch 4, "
              f"median of {steps} steps after one warm-up step; every loss op on the PyTorch reference in both (an "
              f"old checkout has no compiled extension)\n")
        rows, first = [], {}
        try:
            for variant in ("base", "full"):
                for label, root in roots.items():
                    counts = sorted(dispatch_counts(root, variant, steps, str(data)))
                    median = counts[len(counts) // 2]
                    first.setdefault(variant, median)
                    rows.append([variant, label, median, f"{median / first[variant]:.2f}x"])
        finally:
            if against:
                subprocess.run(["git", "-C", here, "worktree", "remove", "--force", f"{tmp}/rev"],
                               capture_output=True)
        print(table(["variant", "code", "ops per step", f"vs {next(iter(roots))}"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--modes", default="eager,compiled,graphed", help=f"step modes to time, of {','.join(MODES)}")
    ap.add_argument("--all", action="store_true", help="compiled fp32 too (compilation takes minutes)")
    ap.add_argument("--no-train", action="store_true", help="skip the python -m ncl_fast.train runs")
    ap.add_argument("--train-modes", default="eager,compiled",
                    help="python -m ncl_fast.train runs, of eager, compiled, graphed")
    ap.add_argument("--train-steps", type=int, default=300, help="steps of each python -m ncl_fast.train run")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="step configurations to time")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--no-steps", action="store_true", help="only the python -m ncl_fast.train runs")
    ap.add_argument("--profile", action="store_true", help="print the top kernels of every configuration's step")
    ap.add_argument("--dispatch", action="store_true", help="dispatcher operations per step on the CPU (no GPU)")
    ap.add_argument("--against", default=None, help="with --dispatch: a git revision to count beside this tree")
    args = ap.parse_args()
    if args.dispatch:
        dispatch_report(args.against, max(args.steps // 5, 3))
        return
    global PROFILE
    PROFILE = args.profile
    if not torch.cuda.is_available():
        sys.exit("bench_train_step.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    print(device_header())
    choose = _backend.choose
    rows, base, step_alone = [], {}, {}
    for p in ([] if args.no_steps else args.precisions.split(",")):
        precision = "bf16" if p == "bf16" else "fp32 (TF32)"
        # compiled: bf16 always (the target compares it with eager bf16), fp32 with --all
        asked = args.modes.split(",")
        modes = ["eager"] if args.no_compile or (p == "fp32" and not args.all) else asked
        for mode in modes:
            for name in args.configs.split(","):
                variant, impl = CONFIGS[name]
                if impl == "fused":
                    _backend.choose = lambda op, _i, device: choose(op, FUSED[op], device)
                try:
                    q, mem = step_time(variant, impl, p, mode, args.steps, args.batch, args.size)
                except Exception as err:  # report and go on: one failure must not hide the rest
                    rows.append([precision, mode, name, f"failed: {type(err).__name__}: {err}"[:120], "-", "-", "-"])
                    continue
                finally:
                    _backend.choose = choose
                    torch._dynamo.reset()
                key = (precision, mode)
                if name == "NCL fused" and p == "bf16":  # what the paper preset's command runs
                    step_alone[mode] = args.batch * 1e3 / q[1]
                if name == "base":
                    base[key] = (q[1], mem)
                b = base.get(key)
                rows.append([precision, mode, name,
                             f"{q[1]:.1f} ({q[0]:.1f}-{q[2]:.1f})",
                             f"{q[1] / b[0]:.3f}x" if b else "-", f"{mem:.2f}",
                             f"{100 * (mem / b[1] - 1):+.1f}%" if b else "-"])
    if rows:
        print()
        print(table(["precision", "mode", "loss", "step ms p50 (p20-p80)", "vs base step", "peak GB",
                     "peak vs base"], rows))
    if args.no_train:
        return
    # the command itself, data loading included: images/s against the step alone (the fused full step above)
    import json

    flags = {"eager": [], "compiled": ["--compile"], "graphed": ["--compile", "reduce-overhead"]}
    for mode in args.train_modes.split(","):
        alone = step_alone.get(mode) or step_alone.get("eager")
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "ncl_fast.train", "--preset", "paper", "--max_steps", str(args.train_steps),
                   "--output_dir", out, "--no-progress", *flags[mode]]
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            print(f"\n`python -m ncl_fast.train --preset paper --max_steps {args.train_steps} {' '.join(flags[mode])}`:"
                  f" exit {proc.returncode} in {time.time() - t0:.0f} s")
            if proc.returncode:
                print((proc.stdout + proc.stderr)[-1500:])
                continue
            print("\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if "warning" in line))
            rows = []
            for line in open(f"{out}/log.txt"):
                rec = json.loads(line)
                rate = rec["train_images_per_s"]
                rows.append([rec["epoch"], f"{rate:.1f}", f"{rate / alone:.2f}x" if alone else "-",
                             f"{100 * rec.get('train_data_wait', float('nan')):.1f}",
                             f"{rec.get('train_host_ms', float('nan')):.1f}",
                             f"{rec.get('train_gpu_util', float('nan')):.0f} ({rec.get('train_gpu_samples', 0)})",
                             f"{rec.get('train_peak_mem_gb', float('nan')):.2f}"])
            print(table(["epoch", "images/s", "vs step alone", "data wait %", "host ms/step",
                         "GPU util % (samples)", "peak GB"], rows))


if __name__ == "__main__":
    main()
