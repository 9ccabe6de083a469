"""`python -m ncl_fast.train`: train NCL (DeepLabV3+ from scratch, NCL + PC losses).

With no `--data_path`, it trains on the embedded synthetic dataset (made once
with `ncl_fast.synth` from scikit-image's photos, 80 % train / 20 % test).
`--preset paper` is SPEC section 8 (ResNet-101, 512 crops, batch 4, SGD 0.007
poly, 70 epochs); `--preset demo` is a small model that visibly learns on a
CPU in minutes. The same command runs under
`torchrun --standalone --nproc_per_node=N -m ncl_fast.train ...` (DDP: NCCL on
GPUs, gloo on the CPU; `--batch_size` is per process).

Outputs in `--output_dir`: `checkpoint-<epoch>.pth` (atomic writes; Ctrl-C
saves one too), `log.txt` (JSON lines) and TensorBoard scalars in `--log_dir`.
`--resume auto|PATH` continues exactly: model, optimizer, scaler, schedule,
epoch and step, RNG states.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from . import _backend, distributed
from .checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_atomic, set_rng_state, strip_prefixes
from .data import DatasetError, ForgeryDataset, list_test_sets, load_entries
from .evaluate import evaluate_dataset, markdown
from .model import VARIANTS, LossConfig, NCLModel

PRESETS = {
    # SPEC section 8: the paper's configuration.
    "paper": dict(optimizer="sgd", weight_decay=5e-4, backbone=101, width=64, head_channels=256, image_size=512,
                  test_image_size=512, batch_size=4, lr=0.007, epochs=70, pivot_stage=1, train_mode="crop",
                  if_padding=False, num_workers=8, test_period=5),
    # A few CPU minutes: a quarter-width ResNet-18 (16-channel stem, 64-channel
    # ASPP/decoder) on whole images resized to 160 px, AdamW (SGD from scratch
    # needs far more steps than a demo has).
    "demo": dict(optimizer="adamw", weight_decay=0.01, backbone=18, width=16, head_channels=64, image_size=160,
                 test_image_size=160, batch_size=8, lr=0.003, epochs=20, pivot_stage=1, train_mode="resize",
                 if_padding=False, num_workers=2, test_period=5),
}
SYNTH_N, SYNTH_SEED = 200, 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ncl_fast.train", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    A = ap.add_argument
    A("--preset", default="demo", choices=sorted(PRESETS), help="defaults for every unset option (default: demo)")
    A("--data_path", "--data-path", default=None, help="Tp/Gt folder or JSON list (default: synthetic set)")
    A("--test_data_path", "--test-data-path", default=None, help="dataset or JSON map {name: path}")
    A("--output_dir", "--output-dir", default="output_dir")
    A("--log_dir", "--log-dir", default=None, help="TensorBoard folder (default: output_dir)")
    A("--batch_size", "--batch-size", type=int, default=None, help="per process")
    A("--lr", type=float, default=None)
    A("--epochs", type=int, default=None)
    A("--image_size", "--image-size", type=int, default=None, help="training crop size")
    A("--test_image_size", "--test-image-size", type=int, default=None)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--if_resizing", "--if-resizing", action="store_true", help="test images resized")
    size.add_argument("--if_padding", "--if-padding", action="store_true", help="test images top-left padded")
    A("--train_mode", "--train-mode", default=None, choices=("crop", "resize"),
      help="crop: random crops, smaller images padded (paper); resize")
    A("--edge_mask_width", "--edge-mask-width", type=int, default=2, help="PC contour band radius r (pixels)")
    A("--resume", default=None, help="a checkpoint, or 'auto' for the newest in output_dir")
    A("--seed", type=int, default=0)
    A("--num_workers", "--num-workers", type=int, default=None)
    A("--backbone", type=int, default=None, choices=(18, 34, 50, 101))
    A("--pivot_stage", "--pivot-stage", type=int, default=None, choices=(1, 2, 3, 4, 5))
    A("--width", type=int, default=None, help="ResNet stem channels (64 = the standard ResNet)")
    A("--head_channels", "--head-channels", type=int, default=None, help="ASPP/decoder channels (256)")
    A("--variant", default="full", choices=VARIANTS)
    A("--impl", default=None, choices=_backend.IMPLS, help=f"loss backend (default: ${_backend.ENV_VAR} or auto)")
    A("--omega", type=float, default=0.01)
    A("--mu", type=float, default=0.9)
    A("--tau", type=float, default=0.1)
    A("--patch_px", "--patch-px", type=int, default=16)
    A("--tol", type=float, default=0.0)
    A("--dropout", type=float, default=0.1)
    A("--optimizer", default=None, choices=("sgd", "adamw"), help="sgd (paper) or adamw")
    A("--momentum", type=float, default=0.9)
    A("--weight_decay", "--weight-decay", type=float, default=None)
    A("--compile", action="store_true", help="torch.compile the model and loss")
    A("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"), help="autocast (auto: bf16 on GPU)")
    A("--sync_bn", "--sync-bn", action="store_true", help="SyncBatchNorm across GPU processes")
    A("--accum_steps", "--accum-steps", type=int, default=1,
      help="split each batch into K micro-batches (gradient accumulation; less memory at 1024 px)")
    A("--test_period", "--test-period", type=int, default=None, help="evaluate every N epochs")
    A("--keep_checkpoints", "--keep-checkpoints", type=int, default=3,
      help="keep the newest N checkpoint-<epoch>.pth (0: keep all)")
    A("--max_steps", "--max-steps", type=int, default=None, help="stop after N steps (benchmarks)")
    A("--device", default=None, help="cuda or cpu (default: cuda when present)")
    A("--invert-masks", "--invert_masks", action="store_true", help="masks are black = tampered (NIST16)")
    A("--no-progress", action="store_true")
    return ap


def resolve_args(argv=None) -> argparse.Namespace:
    """Parse, fill from the preset, and reject bad values before any work starts."""
    ap = build_parser()
    args = ap.parse_args(argv)
    preset = PRESETS[args.preset]
    for key, value in preset.items():
        if key == "if_padding":
            if not args.if_padding and not args.if_resizing:
                args.if_padding = value
            continue
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.if_resizing = not args.if_padding
    problems = []
    for key in ("batch_size", "epochs", "image_size", "test_image_size", "test_period"):
        if getattr(args, key) < 1:
            problems.append(f"--{key} must be >= 1, got {getattr(args, key)}")
    for key in ("image_size", "test_image_size"):
        if getattr(args, key) % 16:
            problems.append(f"--{key} must be a multiple of 16 (the network stride and the 16 px patches), "
                            f"got {getattr(args, key)}")
    if args.width < 8 or args.width % 8 or args.head_channels < 8:
        problems.append("--width must be a multiple of 8 and --head_channels >= 8")
    if args.lr <= 0:
        problems.append(f"--lr must be positive, got {args.lr}")
    if args.num_workers < 0:
        problems.append(f"--num_workers must be >= 0, got {args.num_workers}")
    if args.edge_mask_width < 0:
        problems.append(f"--edge_mask_width must be >= 0, got {args.edge_mask_width}")
    if not 0 <= args.dropout < 1:
        problems.append(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.keep_checkpoints < 0:
        problems.append(f"--keep_checkpoints must be >= 0, got {args.keep_checkpoints}")
    if args.max_steps is not None and args.max_steps < 1:
        problems.append(f"--max_steps must be >= 1, got {args.max_steps}")
    for key in ("data_path", "test_data_path"):
        path = getattr(args, key)
        if path is not None and not Path(path).exists():
            problems.append(f"--{key} {path} does not exist")
    if args.resume not in (None, "auto") and not Path(args.resume).is_file():
        problems.append(f"--resume {args.resume} is not a file (use a checkpoint path or 'auto')")
    if args.accum_steps < 1 or args.batch_size % args.accum_steps:
        problems.append(f"--accum_steps must divide --batch_size ({args.batch_size}), got {args.accum_steps}")
    on_cpu = args.device == "cpu" or (args.device is None and not torch.cuda.is_available())
    if args.sync_bn and on_cpu:
        problems.append("--sync_bn needs GPUs (PyTorch's SyncBatchNorm has no CPU kernel)")
    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append("--device cuda was asked for but no CUDA device is visible")
    try:
        LossConfig(variant=args.variant, omega=args.omega, mu=args.mu, radius=args.edge_mask_width,
                   patch_px=args.patch_px, tau=args.tau, tol=args.tol, impl=args.impl)
    except ValueError as err:
        problems.append(str(err))
    if problems:
        ap.error("\n  " + "\n  ".join(problems))
    return args


def synthetic_split(ctx: distributed.Context) -> tuple[str, str]:
    """Make (once, in the cache folder or $NCL_FAST_SYNTH_DIR) the synthetic set and
    its train/test JSON lists; return their paths."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ncl_fast"
    root = Path(os.environ.get("NCL_FAST_SYNTH_DIR", cache / f"synthetic-n{SYNTH_N}-seed{SYNTH_SEED}"))
    train_json, test_json = root / "train.json", root / "test.json"
    if ctx.is_main and not (train_json.is_file() and test_json.is_file()):
        from .synth import generate

        print(f"no --data_path: making the synthetic dataset in {root} (once)", flush=True)
        generate(root, SYNTH_N, SYNTH_SEED)
        pairs = [[f"Tp/{p.name}", f"Gt/{p.name}"] for p in sorted((root / "Tp").glob("*.png"))]
        cut = int(0.8 * len(pairs))
        save = lambda path, items: (path.with_suffix(".tmp").write_text(json.dumps(items, indent=0)),
                                    os.replace(path.with_suffix(".tmp"), path))
        save(test_json, pairs[cut:])
        save(train_json, pairs[:cut])
    distributed.barrier(ctx)
    return str(train_json), str(test_json)


class EpochSampler(Sampler):
    """The epoch's permutation (seeded by seed and epoch), sharded across processes,
    from batch `start` on: a run resumed mid-epoch sees exactly the remaining batches,
    and N processes together see the batches a single process would."""

    def __init__(self, n: int, batch_size: int, ctx: distributed.Context, seed: int):
        self.n, self.batch_size, self.ctx, self.seed = n, batch_size, ctx, seed
        self.epoch, self.start = 0, 0
        self.steps = n // (batch_size * ctx.world_size)  # drop_last

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)[: self.steps * self.batch_size * self.ctx.world_size]
        mine = perm[self.ctx.rank :: self.ctx.world_size]
        return iter(mine[self.start * self.batch_size :].tolist())

    def __len__(self) -> int:
        return (self.steps - self.start) * self.batch_size


class GpuMonitor:
    """GPU utilization and memory through nvidia-ml-py, when a GPU is present."""

    def __init__(self, device: torch.device):
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception:  # no NVML (e.g. inside some containers): just skip the figures
            self.handle = None

    def read(self) -> dict:
        if self.handle is None:
            return {}
        util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle)
        mem = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
        return {"gpu_util": float(util.gpu), "gpu_mem_gb": mem.used / 1e9}


def poly_lr(lr0: float, step: int, total: int) -> float:
    return lr0 * (1 - min(step, total) / total) ** 0.9


def main(argv=None) -> int:
    args = resolve_args(argv)
    ctx = distributed.setup(args.device)
    try:
        return train(args, ctx)
    finally:
        distributed.teardown()


def train(args: argparse.Namespace, ctx: distributed.Context) -> int:
    dev = ctx.device
    out_dir = Path(args.output_dir)
    log_dir = Path(args.log_dir or args.output_dir)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)
    if args.data_path is None:
        train_json, test_json = synthetic_split(ctx)
        args.data_path = train_json
        if args.test_data_path is None:
            args.test_data_path = test_json
    try:
        entries, report = load_entries(args.data_path)
        test_sets = {n: load_entries(p)[0] for n, p in list_test_sets(args.test_data_path).items()} \
            if args.test_data_path else {}
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if ctx.is_main:
        for w in report.warnings[:10]:
            print(f"warning: {w}", file=sys.stderr)
        if len(report.warnings) > 10:
            print(f"warning: ... {len(report.warnings) - 10} more (python -m ncl_fast.check_data)", file=sys.stderr)
    if len(entries) < args.batch_size * ctx.world_size:
        print(f"error: {len(entries)} training images are fewer than one global batch "
              f"({args.batch_size} x {ctx.world_size}); lower --batch_size", file=sys.stderr)
        return 2

    torch.manual_seed(args.seed)
    amp = args.amp if args.amp != "auto" else ("bf16" if dev.type == "cuda" else "off")
    loss_cfg = LossConfig(variant=args.variant, omega=args.omega, mu=args.mu, radius=args.edge_mask_width,
                          patch_px=args.patch_px, tau=args.tau, tol=args.tol, impl=args.impl)
    model_config = dict(backbone=args.backbone, pivot_stage=args.pivot_stage, variant=args.variant,
                        dropout=args.dropout, width=args.width, head_channels=args.head_channels)
    model = NCLModel(args.backbone, args.pivot_stage, loss_cfg, dropout=args.dropout, width=args.width,
                     head_channels=args.head_channels).to(dev)
    if args.sync_bn and ctx.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")

    train_ds = ForgeryDataset(entries, args.image_size, args.train_mode, train=True,
                              invert_masks=args.invert_masks, seed=args.seed)
    sampler = EpochSampler(len(train_ds), args.batch_size, ctx, args.seed)
    steps_per_epoch = sampler.steps
    total_steps = steps_per_epoch * args.epochs

    start_epoch, start_step, global_step = 0, 0, 0
    resume = latest_checkpoint(out_dir) if args.resume == "auto" else args.resume
    rng_to_restore = None
    if resume:
        ckpt = load_checkpoint(resume)
        model.load_state_dict(strip_prefixes(ckpt["model"]))
        if "optimizer" in ckpt:
            opt.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, start_step = ckpt.get("next_epoch", ckpt.get("epoch", -1) + 1), ckpt.get("next_step", 0)
        global_step = ckpt.get("global_step", start_epoch * steps_per_epoch + start_step)
        rng_to_restore = ckpt.get("rng")
        if ctx.is_main:
            print(f"resumed from {resume}: epoch {start_epoch}, step {start_step} of {steps_per_epoch}")

    train_model = model
    if ctx.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)
    loader = DataLoader(train_ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=dev.type == "cuda", drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed),
                        persistent_workers=False, prefetch_factor=4 if args.num_workers > 0 else None)
    writer = None
    if ctx.is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(log_dir))
        except ImportError:
            print("warning: tensorboard is not installed; no TensorBoard scalars", file=sys.stderr)
        print(f"training {args.variant} NCL, ResNet-{args.backbone}, pivot stage {args.pivot_stage}, "
              f"{len(train_ds)} images, {steps_per_epoch} steps/epoch x {args.epochs} epochs, "
              f"batch {args.batch_size} x {ctx.world_size} process(es) on {dev}, amp {amp}", flush=True)
    monitor = GpuMonitor(dev) if ctx.is_main else None
    if rng_to_restore is not None:
        set_rng_state(rng_to_restore)

    def checkpoint(epoch: int, next_epoch: int, next_step: int, name: str) -> None:
        if not ctx.is_main:
            return
        save_atomic({
            "model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
            "scaler": scaler.state_dict() if scaler.is_enabled() else None, "args": vars(args),
            "model_config": model_config, "global_step": global_step, "next_epoch": next_epoch,
            "next_step": next_step, "rng": rng_state(),
        }, out_dir / name)
        if args.keep_checkpoints > 0:
            old = sorted(out_dir.glob("checkpoint-*.pth"), key=lambda p: p.stat().st_mtime)[: -args.keep_checkpoints]
            for path in old:
                path.unlink(missing_ok=True)

    def autocast():
        if amp == "off":
            return nullcontext()
        return torch.autocast(dev.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)

    model.train()
    epoch, step = start_epoch, start_step
    last_eval = None
    try:
        for epoch in range(start_epoch, args.epochs):
            first = start_step if epoch == start_epoch else 0
            sampler.set_epoch(epoch, first)
            train_ds.set_epoch(epoch)
            sums, count, t0, gpu_util = {}, 0, time.perf_counter(), []
            bar = tqdm(loader, total=steps_per_epoch - first, desc=f"epoch {epoch}", unit="step",
                       disable=not ctx.is_main or args.no_progress, dynamic_ncols=True)
            step = first
            for batch in bar:
                lr = poly_lr(args.lr, global_step, total_steps)
                for group in opt.param_groups:
                    group["lr"] = lr
                image = batch["image"].to(dev, non_blocking=True)
                mask = batch["mask"].to(dev, non_blocking=True)
                if dev.type == "cuda":
                    image = image.to(memory_format=torch.channels_last)
                opt.zero_grad(set_to_none=True)
                parts = {}
                K = args.accum_steps
                for j in range(K):  # micro-batch j: items j, j + K, ... (a rank's share under DDP)
                    sync = nullcontext() if (j == K - 1 or not ctx.distributed) else train_model.no_sync()
                    with sync:
                        with autocast():
                            out = train_model(image[j::K], mask[j::K])
                        scaler.scale(out["loss"] / K).backward()
                    for k, v in out.items():
                        if k not in ("logits", "pred_mask"):
                            parts[k] = parts.get(k, 0.0) + v.detach() / K
                scaler.step(opt)
                scaler.update()
                global_step += 1
                step += 1
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                if ctx.is_main and (step % 10 == 0 or step == steps_per_epoch):
                    rate = count * args.batch_size * ctx.world_size / (time.perf_counter() - t0)
                    post = {k: f"{(v / count).item():.4f}" for k, v in sums.items()}
                    post["img/s"] = f"{rate:.1f}"
                    gpu = monitor.read() if monitor else {}
                    if gpu:
                        post["gpu%"] = f"{gpu['gpu_util']:.0f}"
                        gpu_util.append(gpu["gpu_util"])
                    bar.set_postfix(post)
                    if writer:
                        for k, v in parts.items():
                            writer.add_scalar(f"train/{k}", v.item(), global_step)
                        writer.add_scalar("train/lr", lr, global_step)
                        writer.add_scalar("train/images_per_s", rate, global_step)
                        for k, v in gpu.items():
                            writer.add_scalar(f"system/{k}", v, global_step)
                if args.max_steps is not None and global_step >= args.max_steps:
                    break
            bar.close()
            if not math.isfinite(sum(v.item() for v in sums.values()) if sums else 0.0):
                print("error: the loss is not finite; lower --lr or check the data", file=sys.stderr)
                return 3
            elapsed = time.perf_counter() - t0
            log = {"epoch": epoch, "train_lr": lr if count else None,
                   **{f"train_{k}": (v / max(count, 1)).item() for k, v in sums.items()},
                   "train_images_per_s": count * args.batch_size * ctx.world_size / max(elapsed, 1e-9)}
            if gpu_util:
                log["train_gpu_util"] = sum(gpu_util) / len(gpu_util)
            if dev.type == "cuda":
                log["train_peak_mem_gb"] = torch.cuda.max_memory_allocated(dev) / 1e9
            stop = args.max_steps is not None and global_step >= args.max_steps
            if test_sets and ((epoch + 1) % args.test_period == 0 or epoch + 1 == args.epochs or stop):
                mode = "pad" if args.if_padding else "resize"
                results = {}
                for name, ents in test_sets.items():
                    ds = ForgeryDataset(ents, args.test_image_size, mode, invert_masks=args.invert_masks)
                    results[name] = evaluate_dataset(model.net, ds, ctx, args.batch_size, args.num_workers, amp,
                                                     desc=f"test {name}")
                single = len(results) == 1
                for name, res in results.items():
                    for k in res:
                        log[f"test_{k}" if single else f"test_{name}_{k}"] = res[k]
                        if writer and isinstance(res[k], float):
                            writer.add_scalar(f"test/{name}/{k}", res[k], epoch)
                last_eval = results
                if ctx.is_main:
                    for name, res in results.items():
                        print(f"epoch {epoch} {name}: pixel-level F1 {res['pixel-level F1']:.4f}, "
                              f"pixel-level AUC {res['pixel-level AUC']:.4f}", flush=True)
            if ctx.is_main:
                with open(out_dir / "log.txt", "a") as f:
                    f.write(json.dumps(log) + "\n")
            done = step >= steps_per_epoch  # False when --max_steps stopped mid-epoch
            checkpoint(epoch, epoch + 1 if done else epoch, 0 if done else step, f"checkpoint-{epoch}.pth")
            if stop:
                break
    except KeyboardInterrupt:
        done = step >= steps_per_epoch
        checkpoint(epoch, epoch + 1 if done else epoch, 0 if done else step, f"checkpoint-{epoch}.pth")
        if ctx.is_main:
            print(f"\ninterrupted: saved {out_dir / f'checkpoint-{epoch}.pth'} "
                  f"(epoch {epoch}, step {step}); continue with --resume auto", file=sys.stderr)
        return 130
    finally:
        if writer:
            writer.close()
    if ctx.distributed:
        # DDP keeps replicas identical; say so (and fail loudly if they ever drift)
        sums = torch.stack([p.detach().double().sum() for p in model.parameters()]).cpu()
        every = distributed.gather_objects(sums, ctx)
        if not all(torch.equal(every[0], other) for other in every[1:]):
            print("error: the processes' weights differ", file=sys.stderr)
            return 4
        if ctx.is_main:
            print(f"weights identical on all {ctx.world_size} processes")
    if ctx.is_main and last_eval:
        print("\n" + "\n\n".join(markdown(n, {"final": r}) for n, r in last_eval.items()))
        for name, r in last_eval.items():
            print(f"\nvalidation ({name}): pixel-level F1 {r['pixel-level F1']:.4f}, AUC {r['pixel-level AUC']:.4f} "
                  f"(all-zero prediction: F1 0.0000; all-tampered: F1 "
                  f"{r['pixel-level F1 (all-tampered baseline)']:.4f}, AUC 0.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
