"""`python -m ncl_fast.train`: train NCL (DeepLabV3+ from scratch, NCL + PC losses).
`--backbone vit_demo|vit_tiny|vit_small|vit_base` trains a ViT from scratch
instead (SPEC section 10), with the Pivot on its token map.

With no `--data_path`, it trains on the embedded synthetic dataset (made once
with `ncl_fast.synth` from scikit-image's photos, 80 % train / 20 % test, and
cached in $NCL_FAST_SYNTH_DIR, else $XDG_CACHE_HOME/ncl_fast or
~/.cache/ncl_fast). `--preset paper` is SPEC section 8 (ResNet-101, 512 crops,
batch 4, SGD 0.007 poly, 70 epochs); `--preset demo` is a small model that
visibly learns on a CPU in minutes. The same command runs under
`torchrun --standalone --nproc_per_node=N -m ncl_fast.train ...` (DDP: NCCL on
GPUs, gloo on the CPU; `--batch_size` is per process).

Outputs in `--output_dir`: `checkpoint-<epoch>.pth` (atomic writes; Ctrl-C
saves one for the last whole step), `log.txt` (JSON lines) and TensorBoard
scalars in `--log_dir`; both folders are checked before any work starts.
`--resume auto|PATH` continues exactly: model, optimizer, scaler, schedule,
epoch and step, RNG states; `auto` takes the newest readable checkpoint.

Exit status: 0 done, 1 failure at run time (a loss no longer finite, a file
that cannot be written), 2 bad input, 130 interrupted (after saving).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from . import _backend, cli, distributed
from .checkpoint import (CheckpointError, load_checkpoint, newest_readable, rng_state, save_atomic, set_rng_state,
                         strip_prefixes)
from .data import DatasetError, ForgeryDataset, allow_large_images, list_test_sets, load_entries
from .evaluate import evaluate_dataset, fmt, markdown
from .model import BACKBONES, VARIANTS, VIT_CONFIGS, LossConfig, NCLModel, describe_backbone

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


def synthetic_root() -> Path:
    """Where the synthetic dataset is cached."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ncl_fast"
    return Path(os.environ.get("NCL_FAST_SYNTH_DIR", cache / f"synthetic-n{SYNTH_N}-seed{SYNTH_SEED}"))


def preset_help(key: str, text: str) -> str:
    """`text`, then the default each preset gives `key`."""
    values = "; ".join(f"{name}: {PRESETS[name][key]}" for name in sorted(PRESETS))
    return f"{text} (default from --preset, {values})" if text else f"default from --preset, {values}"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ncl_fast.train", description=__doc__,
                                 formatter_class=cli.HelpFormatter)
    cli.add_version_option(ap)
    A = ap.add_argument
    A("--preset", default="demo", choices=sorted(PRESETS), help="defaults for every unset option (default: demo)")
    A("--data_path", "--data-path", default=None,
      help=f"Tp/Gt folder or JSON list (default: the synthetic set, cached in {synthetic_root()})")
    A("--test_data_path", "--test-data-path", default=None,
      help="dataset or JSON map {name: path} (default: the synthetic test split without --data_path, else none)")
    A("--output_dir", "--output-dir", default="output_dir",
      help="folder for checkpoint-<epoch>.pth and log.txt (default: output_dir)")
    A("--log_dir", "--log-dir", default=None, help="TensorBoard folder (default: output_dir)")
    A("--batch_size", "--batch-size", type=cli.positive_int, default=None, help=preset_help("batch_size", "per process"))
    A("--lr", type=cli.positive_float, default=None, help=preset_help("lr", "initial learning rate"))
    A("--epochs", type=cli.positive_int, default=None, help=preset_help("epochs", ""))
    A("--image_size", "--image-size", type=cli.image_size, default=None,
      help=preset_help("image_size", "training crop size, a multiple of 16"))
    A("--test_image_size", "--test-image-size", type=cli.image_size, default=None,
      help=preset_help("test_image_size", "evaluation size, a multiple of 16"))
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--if_resizing", "--if-resizing", action="store_true", help="test images resized (default)")
    size.add_argument("--if_padding", "--if-padding", action="store_true", help="test images top-left padded")
    A("--train_mode", "--train-mode", default=None, choices=("crop", "resize"),
      help=preset_help("train_mode", "crop: random crops, smaller images padded (paper); resize"))
    A("--edge_mask_width", "--edge-mask-width", type=cli.nonnegative_int, default=2,
      help="PC contour band radius r in pixels (default: 2)")
    A("--resume", default=None, help="a checkpoint, or 'auto' for the newest readable one in output_dir")
    A("--seed", type=cli.nonnegative_int, default=0, help="(default: 0)")
    A("--num_workers", "--num-workers", type=cli.nonnegative_int, default=None,
      help=preset_help("num_workers", "DataLoader workers, at most the CPUs available"))
    A("--backbone", type=cli.backbone, default=None, choices=BACKBONES,
      help=preset_help("backbone", "a ResNet depth (DeepLabV3+, output stride 8) or a ViT size (patch 16, "
                                   "progressive-upsampling head; vit_demo is for CPU minutes)"))
    A("--pivot_stage", "--pivot-stage", type=int, default=None, choices=(1, 2, 3, 4, 5),
      help=preset_help("pivot_stage", "ResNet stage the Pivot reads; not for a ViT, whose Pivot reads the token map"))
    A("--width", type=cli.positive_int, default=None,
      help=preset_help("width", "ResNet stem channels, a multiple of 8 (64 = the standard ResNet); not for a ViT, "
                                "whose width is part of its size"))
    A("--head_channels", "--head-channels", type=cli.int_at_least(8), default=None,
      help=preset_help("head_channels", "ASPP/decoder channels (256 in the paper); a ViT's decoder channels"))
    A("--variant", default="full", choices=VARIANTS, help="loss variant, paper Table 5 (default: full)")
    A("--impl", default=None, choices=_backend.IMPLS, help=f"loss backend (default: ${_backend.ENV_VAR} or auto)")
    A("--omega", type=cli.nonnegative_float, default=0.01, help="weight of the NCL loss (default: 0.01)")
    A("--mu", type=cli.float_in(0.0, 1.0), default=0.9, help="weight of the contour band in the PC loss (default: 0.9)")
    A("--tau", type=cli.positive_float, default=0.1, help="similarity temperature (default: 0.1)")
    A("--patch_px", "--patch-px", type=cli.positive_int, default=16, help="patch side in pixels (default: 16)")
    A("--tol", type=cli.float_in(0.0, 0.5, high_open=True), default=0.0,
      help="patch purity tolerance, in [0, 0.5) (default: 0)")
    A("--dropout", type=cli.float_in(0.0, 1.0, high_open=True), default=0.1, help="(default: 0.1)")
    A("--optimizer", default=None, choices=("sgd", "adamw"), help=preset_help("optimizer", "sgd (paper) or adamw"))
    A("--momentum", type=cli.float_in(0.0, 1.0, high_open=True), default=0.9, help="SGD momentum (default: 0.9)")
    A("--weight_decay", "--weight-decay", type=cli.nonnegative_float, default=None,
      help=preset_help("weight_decay", ""))
    A("--compile", action="store_true", help="torch.compile the model and loss")
    A("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"), help="autocast (default: auto, bf16 on GPU)")
    A("--sync_bn", "--sync-bn", action="store_true", help="SyncBatchNorm across GPU processes")
    A("--accum_steps", "--accum-steps", type=cli.positive_int, default=1,
      help="split each batch into K micro-batches (gradient accumulation; less memory at 1024 px) (default: 1)")
    A("--test_period", "--test-period", type=cli.positive_int, default=None,
      help=preset_help("test_period", "evaluate every N epochs"))
    A("--keep_checkpoints", "--keep-checkpoints", type=cli.nonnegative_int, default=3,
      help="keep the newest N checkpoint-<epoch>.pth (0: keep all) (default: 3)")
    A("--max_steps", "--max-steps", type=cli.positive_int, default=None, help="stop after N steps (benchmarks)")
    A("--device", default=None, help="cuda or cpu (default: cuda when present)")
    A("--invert-masks", "--invert_masks", action="store_true", help="masks are black = tampered (NIST16)")
    cli.add_large_images_option(A)
    A("--no-progress", action="store_true", help="no progress bars")
    return ap


def resolve_args(argv=None) -> argparse.Namespace:
    """Parse (the option types reject bad numbers), fill from the preset, and reject
    bad combinations before any work starts."""
    ap = build_parser()
    args = ap.parse_args(argv)
    resnet_only = [f"--{key}" for key in ("pivot_stage", "width") if getattr(args, key) is not None]
    preset = PRESETS[args.preset]
    for key, value in preset.items():
        if key == "if_padding":
            if not args.if_padding and not args.if_resizing:
                args.if_padding = value
            continue
        if key == "num_workers" and args.num_workers is None:
            args.num_workers = cli.default_workers(value)
            continue
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.if_resizing = not args.if_padding
    problems = []
    if args.backbone in VIT_CONFIGS:
        # A ViT has one feature map (the tokens) and its width is part of its size:
        # neither option means anything, and model_config records None for both.
        if resnet_only:
            verb = "applies" if len(resnet_only) == 1 else "apply"
            problems.append(f"{' and '.join(resnet_only)} {verb} to ResNet backbones only; --backbone "
                            f"{args.backbone} has its Pivot on the token map and its width in its size")
        args.pivot_stage = args.width = None
    elif args.width < 8 or args.width % 8:
        problems.append(f"--width must be a multiple of 8, got {args.width}")
    for key in ("data_path", "test_data_path"):
        path = getattr(args, key)
        if path is not None and not Path(path).exists():
            problems.append(f"--{key} {path} does not exist")
    if args.resume not in (None, "auto") and not Path(args.resume).is_file():
        problems.append(f"--resume {args.resume} is not a file (use a checkpoint path or 'auto')")
    if args.batch_size % args.accum_steps:
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
    """Make (once, in `synthetic_root()`) the synthetic set and its train/test JSON
    lists; return their paths."""
    root = synthetic_root()
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


@cli.command
def main(argv=None) -> int:
    args = resolve_args(argv)
    if args.allow_large_images:
        allow_large_images()
    ctx = distributed.setup(args.device)
    try:
        return train(args, ctx)
    finally:
        distributed.teardown()


@contextmanager
def sigint_deferred():
    """Hold a Ctrl-C that arrives inside the block until it ends, so the state is
    never half-updated (the optimizer step and the step counters change together)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def load_datasets(args: argparse.Namespace, ctx: distributed.Context):
    """The training entries and the test sets {name: entries}; prints the dataset warnings."""
    if args.data_path is None:
        train_json, test_json = synthetic_split(ctx)
        args.data_path = train_json
        if args.test_data_path is None:
            args.test_data_path = test_json
    entries, report = load_entries(args.data_path)
    test_sets = {n: load_entries(p)[0] for n, p in list_test_sets(args.test_data_path).items()} \
        if args.test_data_path else {}
    if ctx.is_main:
        for w in report.warnings[:10]:
            print(f"warning: {w}", file=sys.stderr)
        if len(report.warnings) > 10:
            print(f"warning: ... {len(report.warnings) - 10} more (python -m ncl_fast.check_data)", file=sys.stderr)
    return entries, test_sets


class Trainer:
    """One training run, in named pieces: `build_model`, `build_data`, `resume`,
    `train_step`, `train_epoch`, `evaluate`, `save` and `run`, which strings them
    together (IMDL-BenCo's `train_one_epoch` / `test_one_epoch` split)."""

    def __init__(self, args: argparse.Namespace, ctx: distributed.Context, entries, test_sets: dict):
        self.args, self.ctx, self.dev = args, ctx, ctx.device
        self.out_dir = Path(args.output_dir)
        self.log_dir = Path(args.log_dir or args.output_dir)
        self.test_sets = test_sets
        self.amp = args.amp if args.amp != "auto" else ("bf16" if self.dev.type == "cuda" else "off")
        self.start_epoch, self.start_step, self.global_step = 0, 0, 0
        self.rng_to_restore = None
        self.carry, self.partial = None, None
        self.resumed_from = None
        self.writer = None
        self.monitor = None
        torch.manual_seed(args.seed)
        self.build_model()
        self.build_data(entries)

    # ---- set-up -------------------------------------------------------------------------------------------------
    def build_model(self) -> None:
        args = self.args
        loss_cfg = LossConfig(variant=args.variant, omega=args.omega, mu=args.mu, radius=args.edge_mask_width,
                              patch_px=args.patch_px, tau=args.tau, tol=args.tol, impl=args.impl)
        self.model_config = dict(backbone=args.backbone, pivot_stage=args.pivot_stage, variant=args.variant,
                                 dropout=args.dropout, width=args.width, head_channels=args.head_channels)
        model = NCLModel(args.backbone, args.pivot_stage, loss_cfg, dropout=args.dropout, width=args.width,
                         head_channels=args.head_channels).to(self.dev)
        if args.sync_bn and self.ctx.distributed:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if self.dev.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        if args.optimizer == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                  weight_decay=args.weight_decay)
        self.model, self.opt = model, opt
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")

    def build_data(self, entries) -> None:
        args = self.args
        self.train_ds = ForgeryDataset(entries, args.image_size, args.train_mode, train=True,
                                       invert_masks=args.invert_masks, seed=args.seed)
        self.sampler = EpochSampler(len(self.train_ds), args.batch_size, self.ctx, args.seed)
        self.steps_per_epoch = self.sampler.steps
        self.total_steps = self.steps_per_epoch * args.epochs

    def checkpoint_bytes(self) -> int:
        """About the size of one checkpoint: the model, plus the optimizer's state per parameter."""
        params = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        per_param = 2 if self.args.optimizer == "adamw" else 1  # Adam's two moments, SGD's momentum
        weights = sum(t.numel() * t.element_size() for t in self.model.parameters())
        return params + per_param * weights + (1 << 20)

    def resume(self, path, ckpt: dict) -> None:
        """Load model, optimizer, scaler and the position in the schedule from checkpoint `ckpt` (read from `path`)."""
        trained = ckpt.get("model_config") or {}
        differs = {k: (v, self.model_config[k]) for k, v in trained.items()
                   if k in ARCHITECTURE and v != self.model_config[k]}
        if differs:
            # a None (a ResNet option a ViT lacks) follows from --backbone, which differs too
            what = ", ".join(f"--{k} {a} (this run: {b})" for k, (a, b) in differs.items()
                             if a is not None and b is not None)
            raise cli.UsageError(f"checkpoint {path} was trained with {what}; pass the same options to continue it, "
                                 f"or choose another --output_dir to start afresh")
        try:
            self.model.load_state_dict(strip_prefixes(ckpt["model"]))
        except RuntimeError as err:
            first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err)[:200])
            raise cli.UsageError(f"checkpoint {path} holds another architecture ({first}); pass the options it was "
                                 f"trained with (--backbone, --width, --head_channels, --variant, --pivot_stage), "
                                 f"or choose another --output_dir to start afresh") from None
        old_opt = (ckpt.get("args") or {}).get("optimizer")
        if old_opt and old_opt != self.args.optimizer:
            raise cli.UsageError(f"checkpoint {path} was trained with --optimizer {old_opt} (this run: "
                                 f"{self.args.optimizer}); pass --optimizer {old_opt} to continue it")
        if "optimizer" in ckpt:
            try:
                self.opt.load_state_dict(ckpt["optimizer"])
            except (ValueError, KeyError, RuntimeError) as err:
                raise cli.UsageError(f"checkpoint {path}: its optimizer state does not fit this model ({err}); "
                                     f"choose another --output_dir to start afresh") from None
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch = ckpt.get("next_epoch", ckpt.get("epoch", -1) + 1)
        self.start_step = ckpt.get("next_step", 0)
        self.global_step = ckpt.get("global_step", self.start_epoch * self.steps_per_epoch + self.start_step)
        self.rng_to_restore = ckpt.get("rng")
        self.carry = ckpt.get("epoch_partial")
        self.resumed_from = path
        if self.ctx.is_main:
            print(f"resumed from {path}: epoch {self.start_epoch}, step {self.start_step} of {self.steps_per_epoch}")

    def prepare(self) -> None:
        """DDP, torch.compile, the loader, TensorBoard and the GPU monitor."""
        args, ctx, dev = self.args, self.ctx, self.dev
        self.train_model = self.model
        if ctx.distributed:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[dev.index] if dev.type == "cuda" else None)
        if args.compile:
            self.train_model = torch.compile(self.train_model)
        self.loader = DataLoader(self.train_ds, batch_size=args.batch_size, sampler=self.sampler,
                                 num_workers=args.num_workers, pin_memory=dev.type == "cuda", drop_last=True,
                                 generator=torch.Generator().manual_seed(args.seed), persistent_workers=False,
                                 prefetch_factor=4 if args.num_workers > 0 else None)
        note = _backend.announce_fallbacks(LOSS_OPS[args.variant], args.impl, dev)  # every rank: no warnings later
        if ctx.is_main:
            if note:
                print(note, flush=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.log_dir))
            except ImportError:
                print("warning: tensorboard is not installed; no TensorBoard scalars", file=sys.stderr)
            pivot = "Pivot on the token map" if args.pivot_stage is None else f"pivot stage {args.pivot_stage}"
            print(f"training {args.variant} NCL, {describe_backbone(args.backbone, args.width)}, {pivot}, "
                  f"{len(self.train_ds)} images, {self.steps_per_epoch} steps/epoch x {args.epochs} epochs, "
                  f"batch {args.batch_size} x {ctx.world_size} process(es) on {dev}, amp {self.amp}", flush=True)
        self.monitor = GpuMonitor(dev) if ctx.is_main else None
        if self.rng_to_restore is not None:
            set_rng_state(self.rng_to_restore)

    # ---- one step, one epoch ------------------------------------------------------------------------------------
    def autocast(self):
        if self.amp == "off":
            return nullcontext()
        return torch.autocast(self.dev.type, dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16)

    def snapshot(self) -> tuple[dict, dict]:
        """What a forward pass changes before the optimizer step: the buffers (BatchNorm
        running statistics and batch counts) and the RNG states (dropout)."""
        return {k: b.detach().clone() for k, b in self.model.named_buffers()}, rng_state()

    def restore(self, snap: tuple[dict, dict]) -> None:
        buffers, rng = snap
        with torch.no_grad():
            for k, b in self.model.named_buffers():
                b.copy_(buffers[k])
        set_rng_state(rng)
        self.opt.zero_grad(set_to_none=True)

    def train_step(self, batch: dict, lr: float) -> dict:
        """One optimizer step on `batch`; returns the loss parts (detached, averaged over micro-batches).

        All or nothing: a Ctrl-C during the forward and backward passes rolls the
        buffers and RNG states back to the start of the step; one during the update
        waits until the step is counted. The state is then always that of a whole
        number of steps, which is what an interrupt saves."""
        snap = self.snapshot()
        try:
            parts = self.forward_backward(batch, lr)
        except KeyboardInterrupt:
            self.restore(snap)
            raise
        with sigint_deferred():
            self.scaler.step(self.opt)
            self.scaler.update()
            self.global_step += 1
            self.step += 1
        return parts

    def forward_backward(self, batch: dict, lr: float) -> dict:
        ctx, dev = self.ctx, self.dev
        for group in self.opt.param_groups:
            group["lr"] = lr
        image = batch["image"].to(dev, non_blocking=True)
        mask = batch["mask"].to(dev, non_blocking=True)
        if dev.type == "cuda":
            image = image.to(memory_format=torch.channels_last)
        self.opt.zero_grad(set_to_none=True)
        parts = {}
        K = self.args.accum_steps
        for j in range(K):  # micro-batch j: items j, j + K, ... (a rank's share under DDP)
            sync = nullcontext() if (j == K - 1 or not ctx.distributed) else self.train_model.no_sync()
            with sync:
                with self.autocast():
                    out = self.train_model(image[j::K], mask[j::K])
                self.scaler.scale(out["loss"] / K).backward()
            for k, v in out.items():
                if k not in ("logits", "pred_mask"):
                    parts[k] = parts.get(k, 0.0) + v.detach() / K
        return parts

    def train_epoch(self, epoch: int) -> dict | None:
        """The rest of epoch `epoch` from `self.step`; returns its log record (None: the loss is not finite)."""
        args, ctx = self.args, self.ctx
        first = self.step
        self.sampler.set_epoch(epoch, first)
        self.train_ds.set_epoch(epoch)
        sums, count, t0, gpu_util, lr = {}, 0, time.perf_counter(), [], None
        # the loss sums of the steps this epoch ran before an interrupt: the epoch's means stay whole-epoch means
        carried = self.carry if (self.carry and first > 0 and self.carry.get("epoch") == epoch) else None
        self.carry = None
        if carried:
            sums = {k: torch.tensor(v, dtype=torch.float32, device=self.dev) for k, v in carried["sums"].items()}
            count = carried["count"]
        self.partial = (epoch, sums, count)
        done_before = count
        bar = tqdm(self.loader, total=self.steps_per_epoch - first, desc=f"epoch {epoch}", unit="step",
                   disable=not ctx.is_main or args.no_progress, dynamic_ncols=True)
        for batch in bar:
            lr = poly_lr(args.lr, self.global_step, self.total_steps)
            parts = self.train_step(batch, lr)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            self.partial = (epoch, sums, count)
            if ctx.is_main and (self.step % 10 == 0 or self.step == self.steps_per_epoch):
                rate = (count - done_before) * args.batch_size * ctx.world_size / (time.perf_counter() - t0)
                post = {k: f"{(v / count).item():.4f}" for k, v in sums.items()}
                post["img/s"] = f"{rate:.1f}"
                gpu = self.monitor.read() if self.monitor else {}
                if gpu:
                    post["gpu%"] = f"{gpu['gpu_util']:.0f}"
                    gpu_util.append(gpu["gpu_util"])
                bar.set_postfix(post)
                if self.writer:
                    for k, v in parts.items():
                        self.writer.add_scalar(f"train/{k}", v.item(), self.global_step)
                    self.writer.add_scalar("train/lr", lr, self.global_step)
                    self.writer.add_scalar("train/images_per_s", rate, self.global_step)
                    for k, v in gpu.items():
                        self.writer.add_scalar(f"system/{k}", v, self.global_step)
            if self.stop_requested():
                break
        bar.close()
        if not math.isfinite(sum(v.item() for v in sums.values()) if sums else 0.0):
            return None
        elapsed = time.perf_counter() - t0
        log = {"epoch": epoch, "train_lr": lr if count else None,
               **{f"train_{k}": (v / max(count, 1)).item() for k, v in sums.items()},
               "train_images_per_s": (count - done_before) * args.batch_size * ctx.world_size / max(elapsed, 1e-9)}
        if gpu_util:
            log["train_gpu_util"] = sum(gpu_util) / len(gpu_util)
        if self.dev.type == "cuda":
            log["train_peak_mem_gb"] = torch.cuda.max_memory_allocated(self.dev) / 1e9
        return log

    def stop_requested(self) -> bool:
        return self.args.max_steps is not None and self.global_step >= self.args.max_steps

    # ---- evaluation and checkpoints -----------------------------------------------------------------------------
    def evaluate(self, epoch: int, log: dict) -> dict:
        """Every test set's summary metrics; adds them to `log` and TensorBoard."""
        args = self.args
        mode = "pad" if args.if_padding else "resize"
        results = {}
        for name, ents in self.test_sets.items():
            ds = ForgeryDataset(ents, args.test_image_size, mode, invert_masks=args.invert_masks)
            results[name] = evaluate_dataset(self.model.net, ds, self.ctx, args.batch_size, args.num_workers,
                                             self.amp, desc=f"evaluating {name}", progress=not args.no_progress)
        single = len(results) == 1
        for name, res in results.items():
            for k in res:
                # one test set: test_<metric> and test/<metric>; several: the set's name in between
                log[f"test_{k}" if single else f"test_{name}_{k}"] = res[k]
                if self.writer and isinstance(res[k], float):
                    self.writer.add_scalar(f"test/{k}" if single else f"test/{name}/{k}", res[k], epoch)
        if self.ctx.is_main:
            for name, res in results.items():
                print(f"epoch {epoch} {name}: pixel-level F1 {fmt(res['pixel-level F1'])}, "
                      f"pixel-level AUC {fmt(res['pixel-level AUC'])}", flush=True)
                for k, why in res.get("undefined", {}).items():
                    print(f"  {k}: n/a, {why}", flush=True)
        return results

    def save(self, epoch: int) -> Path:
        """Write `checkpoint-<epoch>.pth` for the current position (atomically; rank 0 only)."""
        done = self.step >= self.steps_per_epoch  # False when stopped mid-epoch
        next_epoch, next_step = (epoch + 1, 0) if done else (epoch, self.step)
        path = self.out_dir / f"checkpoint-{epoch}.pth"
        if not self.ctx.is_main:
            return path
        try:
            self._write_checkpoint(path, epoch, next_epoch, next_step)
        except OSError as err:
            raise cli.RunError(f"cannot write checkpoint {path} ({cli.describe_os_error(err)}); free space or fix "
                               f"the folder, then continue from the newest checkpoint with --resume auto") from None
        return path

    def _write_checkpoint(self, path: Path, epoch: int, next_epoch: int, next_step: int) -> None:
        save_atomic({
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "epoch": epoch,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None, "args": vars(self.args),
            "model_config": self.model_config, "global_step": self.global_step, "next_epoch": next_epoch,
            "next_step": next_step, "rng": rng_state(), "epoch_partial": self.epoch_partial(next_epoch, next_step),
        }, path)
        if self.args.keep_checkpoints > 0:
            files = sorted(self.out_dir.glob("checkpoint-*.pth"), key=lambda p: p.stat().st_mtime)
            for old in files[: -self.args.keep_checkpoints]:
                old.unlink(missing_ok=True)

    def epoch_partial(self, next_epoch: int, next_step: int) -> dict | None:
        """The loss sums of the steps run so far in an epoch stopped part-way (None at an epoch's end), so
        that the resumed run logs the same whole-epoch means as an uninterrupted one."""
        if next_step == 0 or self.partial is None or self.partial[0] != next_epoch:
            return None
        _, sums, count = self.partial
        return {"epoch": next_epoch, "count": count, "sums": {k: float(v) for k, v in sums.items()}}

    def write_log(self, log: dict) -> None:
        """Append one JSON line to log.txt (undefined figures as null, never NaN)."""
        if not self.ctx.is_main:
            return
        path = self.out_dir / "log.txt"
        try:
            with open(path, "a") as f:
                f.write(json.dumps(cli.json_safe(log), allow_nan=False) + "\n")
        except OSError as err:
            raise cli.RunError(f"cannot write {path} ({cli.describe_os_error(err)})") from None

    def weights_agree(self) -> bool:
        """DDP keeps replicas identical; check it (and fail loudly if they ever drift)."""
        sums = torch.stack([p.detach().double().sum() for p in self.model.parameters()]).cpu()
        every = distributed.gather_objects(sums, self.ctx)
        return all(torch.equal(every[0], other) for other in every[1:])

    # ---- the whole run ------------------------------------------------------------------------------------------
    def run(self) -> int:
        args, ctx = self.args, self.ctx
        if self.start_epoch >= args.epochs:
            if ctx.is_main:
                print(f"nothing to do: {self.resumed_from} already finished all {args.epochs} epoch(s); raise "
                      f"--epochs to train longer, or choose another --output_dir to start afresh")
                self.print_outputs(self.resumed_from)
            return cli.OK
        self.prepare()
        self.model.train()
        epoch = self.start_epoch
        self.step = self.start_step
        last_eval, saved = None, None
        try:
            for epoch in range(self.start_epoch, args.epochs):
                if epoch != self.start_epoch:
                    self.step = 0
                log = self.train_epoch(epoch)
                if log is None:
                    cli.error(f"the loss is no longer finite in epoch {epoch}; lower --lr or check the data "
                              f"(the newest checkpoint holds the last finite state)")
                    return cli.FAILURE
                stop = self.stop_requested()
                if self.test_sets and ((epoch + 1) % args.test_period == 0 or epoch + 1 == args.epochs or stop):
                    last_eval = self.evaluate(epoch, log)
                self.write_log(log)
                saved = self.save(epoch)
                if stop:
                    break
        except KeyboardInterrupt:
            path = self.save(epoch)
            if ctx.is_main:
                print(f"\ninterrupted: saved {path} (epoch {epoch}, {self.step} of {self.steps_per_epoch} steps done); "
                      f"continue with --resume auto", file=sys.stderr)
            return cli.INTERRUPTED
        finally:
            self.close()
        if ctx.distributed:
            if not self.weights_agree():
                cli.error("the processes' weights differ")
                return cli.FAILURE
            if ctx.is_main:
                print(f"weights identical on all {ctx.world_size} processes")
        if ctx.is_main and last_eval:
            print("\n" + "\n\n".join(markdown(n, {"final": r}) for n, r in last_eval.items()))
            for name, r in last_eval.items():
                print(f"\nvalidation ({name}): pixel-level F1 {fmt(r['pixel-level F1'])}, "
                      f"AUC {fmt(r['pixel-level AUC'])} (all-zero prediction: F1 0.0000; all-tampered: F1 "
                      f"{fmt(r['pixel-level F1 (all-tampered baseline)'])}, AUC 0.5)")
        if ctx.is_main and saved is not None:
            self.print_outputs(saved)
        return cli.OK

    def close(self) -> None:
        """Release what holds threads or the process group before the process group is
        destroyed: TensorBoard's writer thread, the loader's workers, DDP's reducer."""
        if self.writer:
            self.writer.close()
            self.writer = None
        self.loader = None  # its iterator ended with the epoch: no worker outlives this
        self.train_model = self.model

    def print_outputs(self, checkpoint) -> None:
        """Where everything went, and the next commands."""
        data = self.args.test_data_path or "TEST_DATA"
        print(f"\noutputs:\n"
              f"  checkpoints  {self.out_dir}/checkpoint-<epoch>.pth (newest: {checkpoint})\n"
              f"  log          {self.out_dir / 'log.txt'} (JSON lines)\n"
              f"  TensorBoard  tensorboard --logdir {self.log_dir}\n"
              f"predict:  python -m ncl_fast.predict IMAGE_OR_DIR --checkpoint {checkpoint} --out predictions/\n"
              f"evaluate: python -m ncl_fast.evaluate --checkpoint {checkpoint} --test_data_path {data}", flush=True)


#: The model_config keys that change the set of weights (dropout does not).
ARCHITECTURE = ("backbone", "pivot_stage", "variant", "width", "head_channels")
LOSS_OPS = {"base": ("pc_bce",), "pivot": ("pc_bce", "patch_labels", "ncl_terms"),
            "full": ("pc_loss", "patch_labels", "ncl_terms")}


@cli.command
def train(args: argparse.Namespace, ctx: distributed.Context) -> int:
    """Check the outputs and the data, build the trainer, resume if asked, run."""
    out_dir = cli.check_output_dir(args.output_dir, "--output_dir")
    log_dir = cli.check_output_dir(args.log_dir or args.output_dir, "--log_dir" if args.log_dir else "--output_dir")
    try:
        entries, test_sets = load_datasets(args, ctx)
    except DatasetError as err:
        raise cli.UsageError(str(err)) from None
    if len(entries) < args.batch_size * ctx.world_size:
        raise cli.UsageError(f"{len(entries)} training images are fewer than one global batch "
                             f"({args.batch_size} x {ctx.world_size}); lower --batch_size")
    trainer = Trainer(args, ctx, entries, test_sets)
    need = trainer.checkpoint_bytes() * 2  # a new checkpoint is written beside the previous one, then renamed
    cli.check_output_dir(out_dir, "--output_dir", need_bytes=need)
    if args.resume == "auto":
        path, ckpt, skipped = newest_readable(out_dir)
        for err in skipped:
            if ctx.is_main:
                print(f"warning: --resume auto skips {err}", file=sys.stderr)
        if path is None and skipped:
            raise cli.UsageError(f"--resume auto: no checkpoint in {out_dir} can be read; remove the damaged files "
                                 f"to start afresh, or choose another --output_dir")
    elif args.resume:
        path = args.resume
        try:
            ckpt = load_checkpoint(path)
        except (CheckpointError, FileNotFoundError) as err:
            raise cli.UsageError(f"--resume: {err}; pass another checkpoint, or --resume auto to take the newest "
                                 f"readable one in --output_dir") from None
    else:
        path = None
    if path is not None:
        trainer.resume(path, ckpt)
    return trainer.run()


if __name__ == "__main__":
    sys.exit(main())
