"""The training loop: one step (micro-batches, AMP, compile, CUDA graphs), one
epoch, and the whole run with its checkpoints, evaluations and records.

What a step asks of the host: moving the uint8 batch to the device, issuing the
step, nothing else. The loss terms are summed on the device and read (one copy)
every `log_every` steps; a stop (Ctrl-C, SIGTERM, `--max_steps`) is a flag seen at
the next step boundary, where the state is that of a whole number of steps. Under
torchrun the processes combine their flags there (one all-reduce of three integers
over a gloo group, on the CPU), so all of them stop after the same step.
"""
from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import _backend, cli, distributed
from ..data import EpochSampler, ForgeryDataset, to_model_input
from ..data.dataset import UnreadableItemError
from ..model import NCLModel, describe_backbone
from . import records
from ..outputs import FolderLock, OutputError, write_atomic
from .checkpoints import (CheckpointError, checkpoints_newest_first, load_checkpoint, newest_readable, rng_state,
                          set_rng_state, strip_prefixes)
from .config import TrainConfig
from .evaluation import evaluate_sets, fmt, markdown
from .interrupts import StopRequest, ignore_in_workers

#: The model_config keys that change the set of weights (dropout does not).
ARCHITECTURE = ("backbone", "pivot_stage", "variant", "width", "head_channels")


def item_error(err: BaseException) -> str:
    """The file and reason of an `UnreadableItemError`, also when a DataLoader worker
    handed it over wrapped in its traceback (the last line is the original message)."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    prefix = f"{UnreadableItemError.__module__}.{UnreadableItemError.__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def poly_lr(lr0: float, step: int, total: int) -> float:
    """SPEC section 8: `lr0 * (1 - it / max_it) ** 0.9`."""
    return lr0 * (1 - min(step, total) / total) ** 0.9


class TrainStep(nn.Module):
    """What one micro-batch computes, as one module (and so one graph under
    `torch.compile`): network and loss. Returns the criterion's scalars only, so no
    large output outlives the step."""

    def __init__(self, model: NCLModel):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> dict:
        model = self.model
        return model.criterion(model.net(image), mask, model.pivot)


def build_model(config: TrainConfig, ctx: distributed.Context) -> NCLModel:
    model = NCLModel(config.backbone, config.pivot_stage, config.loss_config(), dropout=config.dropout,
                     width=config.width, head_channels=config.head_channels).to(ctx.device)
    if config.sync_bn and ctx.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if ctx.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


def resolve_amp(amp: str, device: torch.device) -> str:
    return amp if amp != "auto" else ("bf16" if device.type == "cuda" else "off")


class Trainer:
    """One training run: `resume` (optional), then `run`. The pieces: `train_step`
    (one optimizer step), `train_epoch` (the rest of an epoch), `end_epoch`
    (evaluation, record), `save` (a checkpoint of the current position)."""

    def __init__(self, config: TrainConfig, ctx: distributed.Context, entries, test_sets: dict):
        self.config, self.ctx, self.dev = config, ctx, ctx.device
        self.out_dir = Path(config.output_dir)
        self.test_sets = test_sets
        self.amp = resolve_amp(config.amp, self.dev)
        self.loss_config = config.loss_config()
        self.parts = self.loss_config.parts
        torch.manual_seed(config.seed)
        self.model = build_model(config, ctx)
        self.opt = build_optimizer(config, self.model)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        self.train_ds = ForgeryDataset(entries, config.image_size, config.train_mode, train=True,
                                       invert_masks=config.invert_masks, seed=config.seed)
        self.sampler = EpochSampler(len(self.train_ds), config.batch_size, ctx, config.seed)
        self.steps_per_epoch = self.sampler.steps
        self.total_steps = self.steps_per_epoch * config.epochs
        # position: the next step to run is step `step` of epoch `epoch`; `global_step` steps ran in all
        self.epoch, self.step, self.global_step = 0, 0, 0
        self.carry = None  # loss sums of the part of an epoch that ran before a stop
        self.pending_record = None  # a finished epoch whose record log.txt does not hold yet
        self.rng_to_restore = None
        self.resumed_from = None
        self.sums, self.count = None, 0
        self.stop = StopRequest()
        self.scalars = self.monitor = self.loader = None
        self.step_module = None
        self.warned_input_bound = False
        self.intervals = 0  # logging intervals this process has run
        self.unreadable = None  # what could not be read, when a training item failed
        self.peer_unreadable = None  # the rank of another process that could not read a training item

    # ---- set-up -------------------------------------------------------------------------------------------------
    def checkpoint_bytes(self) -> int:
        """About the size of one checkpoint: the model, plus the optimizer's state per parameter."""
        params = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        per_param = 2 if self.config.optimizer == "adamw" else 1  # Adam's two moments, SGD's momentum
        weights = sum(t.numel() * t.element_size() for t in self.model.parameters())
        return params + per_param * weights + (1 << 20)

    def resume(self, path, ckpt: dict) -> None:
        """Load model, optimizer, scaler and the position from checkpoint `ckpt` (read from `path`)."""
        mine = self.config.model_config()
        trained = ckpt.get("model_config") or {}
        differs = {k: (v, mine[k]) for k, v in trained.items() if k in ARCHITECTURE and v != mine[k]}
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
        args = ckpt.get("args") or {}
        old_opt = args.get("optimizer")
        if old_opt and old_opt != self.config.optimizer:
            raise cli.UsageError(f"checkpoint {path} was trained with --optimizer {old_opt} (this run: "
                                 f"{self.config.optimizer}); pass --optimizer {old_opt} to continue it")
        if "optimizer" in ckpt:
            try:
                self.opt.load_state_dict(ckpt["optimizer"])
            except (ValueError, KeyError, RuntimeError) as err:
                raise cli.UsageError(f"checkpoint {path}: its optimizer state does not fit this model ({err}); "
                                     f"choose another --output_dir to start afresh") from None
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch = ckpt.get("next_epoch", ckpt.get("epoch", -1) + 1)
        self.step = ckpt.get("next_step", 0)
        self.global_step = ckpt.get("global_step", self.epoch * self.steps_per_epoch + self.step)
        if self.step:
            self.check_same_data_order(path, args)
        self.rng_to_restore = ckpt.get("rng")
        self.carry = ckpt.get("epoch_partial")
        pending = ckpt.get("epoch_record")
        if pending is not None and self.ctx.is_main:  # log.txt (rank 0's) may hold it already
            pending = None if pending["epoch"] in {r.get("epoch") for r in records.read_log(self.out_dir / "log.txt")} \
                else pending
        self.pending_record = distributed.gather_objects(pending, self.ctx)[0]  # every rank evaluates, or none
        self.resumed_from = path
        if self.ctx.is_main:
            print(f"resumed from {path}: epoch {self.epoch}, step {self.step} of {self.steps_per_epoch}")

    def check_same_data_order(self, path, args: dict) -> None:
        """A checkpoint taken mid-epoch continues the epoch's permutation at its step: only
        exact with the batch, processes and data it was made with."""
        now = {"batch_size": self.config.batch_size, "accum_steps": self.config.accum_steps,
               "world_size": self.ctx.world_size, "train_images": len(self.train_ds), "seed": self.config.seed}
        changed = [f"--{k} {args[k]} (this run: {v})" if k != "train_images"
                   else f"{args[k]} training images (this run: {v})"
                   for k, v in now.items() if args.get(k) is not None and args[k] != v]
        if changed:
            raise cli.UsageError(f"checkpoint {path} stopped in the middle of an epoch with {', '.join(changed)}: "
                                 f"continuing would skip or repeat images; resume with the same options, or start "
                                 f"from an epoch's checkpoint")

    def prepare(self) -> None:
        """DDP, torch.compile, the loader (persistent workers), TensorBoard and the GPU monitor."""
        config, ctx, dev = self.config, self.ctx, self.dev
        module: nn.Module = TrainStep(self.model)
        self.ddp = None
        if ctx.distributed:
            module = self.ddp = torch.nn.parallel.DistributedDataParallel(
                module, device_ids=[dev.index] if dev.type == "cuda" else None)
        if config.compile:
            module = torch.compile(module, mode=None if config.compile == "default" else config.compile)
        self.step_module = module
        workers = config.num_workers
        self.loader = DataLoader(self.train_ds, batch_size=config.batch_size, sampler=self.sampler,
                                 num_workers=workers, pin_memory=dev.type == "cuda", drop_last=True,
                                 generator=torch.Generator().manual_seed(config.seed),
                                 persistent_workers=workers > 0, worker_init_fn=ignore_in_workers if workers else None,
                                 prefetch_factor=4 if workers > 0 else None)
        note = _backend.announce_fallbacks(self.loss_config.ops, config.impl, dev)  # every rank: no warnings later
        if ctx.is_main:
            if note:
                print(note, flush=True)
            self.scalars = records.Scalars(config.tensorboard_dir)
            pivot = "Pivot on the token map" if config.pivot_stage is None else f"pivot stage {config.pivot_stage}"
            compiled = f", compiled ({config.compile})" if config.compile else ""
            print(f"training {config.variant} NCL, {describe_backbone(config.backbone, config.width)}, {pivot}, "
                  f"{len(self.train_ds)} images, {self.steps_per_epoch} steps/epoch x {config.epochs} epochs, "
                  f"batch {config.batch_size} x {ctx.world_size} process(es) on {dev}, amp {self.amp}{compiled}",
                  flush=True)
            self.monitor = records.GpuMonitor(dev).start()
        if self.rng_to_restore is not None:
            set_rng_state(self.rng_to_restore)

    # ---- one step, one epoch ------------------------------------------------------------------------------------
    def autocast(self):
        if self.amp == "off":
            return nullcontext()
        return torch.autocast(self.dev.type, dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16)

    def train_step(self, image: torch.Tensor, mask: torch.Tensor, lr: float) -> torch.Tensor:
        """One optimizer step on a batch already on the device; returns the loss terms
        (`self.parts`, averaged over micro-batches) as one tensor on the device."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        K = self.config.accum_steps
        total = None
        for j in range(K):  # micro-batch j: items j, j + K, ... (a rank's share under DDP)
            sync = self.ddp.no_sync() if (self.ddp is not None and j < K - 1) else nullcontext()
            with sync:
                with self.autocast():
                    out = self.step_module(image[j::K] if K > 1 else image, mask[j::K] if K > 1 else mask)
                self.scaler.scale(out["loss"] / K if K > 1 else out["loss"]).backward()
            terms = torch.stack([out[k].detach().float() for k in self.parts])
            total = terms if total is None else total + terms
        self.scaler.step(self.opt)
        self.scaler.update()
        return total / K if K > 1 else total

    def train_epoch(self, epoch: int) -> dict | None:
        """The rest of epoch `epoch` from `self.step`, until its end or a stop; returns its
        record when the epoch ended (None when stopped part-way)."""
        config, ctx = self.config, self.ctx
        first = self.step
        self.sampler.set_epoch(epoch, first)  # the epoch travels to the (persistent) workers in the sampler's keys
        self.sums = torch.zeros(len(self.parts), device=self.dev)
        self.count = 0
        carried = self.carry if (self.carry and first > 0 and self.carry.get("epoch") == epoch) else None
        self.carry = None
        if carried:  # the steps this epoch ran before a stop: the epoch's means stay whole-epoch means
            self.sums += torch.tensor([carried["sums"].get(k, 0.0) for k in self.parts], device=self.dev)
            self.count = carried["count"]
        images_per_step = config.batch_size * ctx.world_size
        bar = records.Progress(self.steps_per_epoch - first, epoch, ctx.is_main and config.progress)
        clock, epoch_clock = records.StepClock(), {"wait": 0.0, "host": 0.0, "steps": 0}
        gpu_mark = self.monitor.mark() if self.monitor else 0
        lr, t0, ran = None, time.perf_counter(), 0
        batches = iter(self.loader)
        try:
            while self.step < self.steps_per_epoch and not self.max_steps_reached():
                # a signal that arrives while this batch loads lets its step run (the stop is seen at the
                # next boundary); one that arrived before skips the load
                batch, signalled = None, self.stop.signum
                if signalled is None:
                    try:
                        batch = next(batches)
                    except StopIteration:
                        break
                    except UnreadableItemError as err:  # a file that changed or vanished since the check
                        self.unreadable = item_error(err)
                    except RuntimeError:
                        if not self.stop.requested:  # else a loader worker ended by the stop's signal
                            raise
                        signalled = self.stop.signum
                if self.agree_to_stop(signalled):  # every process stops before the same step
                    break
                clock.waited()
                image, mask, _ = to_model_input(batch, self.dev, channels_last=self.dev.type == "cuda")
                lr = poly_lr(config.lr, self.global_step, self.total_steps)
                self.sums += self.train_step(image, mask, lr)
                self.count += 1
                self.step += 1
                self.global_step += 1
                ran += 1
                clock.stepped()
                bar.step()
                if self.step % config.log_every == 0 or self.step == self.steps_per_epoch:
                    self.log_interval(clock, epoch_clock, bar, lr, images_per_step)
        finally:
            bar.close()
            del batches
        if clock.steps:
            self.log_interval(clock, epoch_clock, bar, lr, images_per_step, show=False)
        if self.step < self.steps_per_epoch:
            return None
        elapsed = time.perf_counter() - t0
        means = self.read_means()
        record = {"epoch": epoch, "train_lr": lr, **{f"train_{k}": v for k, v in means.items()},
                  "train_images_per_s": ran * images_per_step / max(elapsed, 1e-9)}
        spent = epoch_clock["wait"] + epoch_clock["host"]
        if spent > 0:
            record["train_data_wait"] = epoch_clock["wait"] / spent
            record["train_host_ms"] = 1e3 * epoch_clock["host"] / max(epoch_clock["steps"], 1)
        gpu = self.monitor.since(gpu_mark) if self.monitor else {}
        if gpu:
            record["train_gpu_util"] = gpu["gpu_util"]
            record["train_gpu_samples"] = gpu["gpu_samples"]
        if self.dev.type == "cuda":
            record["train_peak_mem_gb"] = torch.cuda.max_memory_allocated(self.dev) / 1e9
        return record

    def agree_to_stop(self, signalled: int | None = -1) -> bool:
        """At a step boundary, on every process at once: does any process stop here (a
        signal, `signalled` when given, else the one received so far; a training file it
        could not read)? Then all of them do, with the same
        exit status (SIGTERM's when any process got it, else SIGINT's). One all-reduce of
        three integers over the gloo control group per step; alone, no communication."""
        import signal

        signalled = self.stop.signum if signalled == -1 else signalled  # default: the signal received so far
        mine = [int(signalled == signal.SIGINT), int(signalled == signal.SIGTERM),
                self.ctx.rank + 1 if self.unreadable else 0]
        sigint, sigterm, unreadable = distributed.agree(mine, self.ctx)
        if sigterm or sigint:
            self.stop.adopt(signal.SIGTERM if sigterm else signal.SIGINT)
        if unreadable and not self.unreadable:
            self.peer_unreadable = unreadable - 1
        return bool(sigint or sigterm or unreadable)

    def read_means(self) -> dict[str, float]:
        """The epoch's mean loss terms so far (a host read); exits 1 when one is not finite."""
        values = records.read_scalars({k: self.sums[i] / max(self.count, 1) for i, k in enumerate(self.parts)})
        if not all(math.isfinite(v) for v in values.values()):
            raise cli.RunError(f"the loss is no longer finite in epoch {self.epoch} ({values}); lower --lr or check "
                               f"the data (the newest checkpoint holds the last finite state)")
        return values

    def log_interval(self, clock, epoch_clock, bar, lr, images_per_step, show: bool = True) -> None:
        """Every `log_every` steps: one host read of the loss terms; the bar, TensorBoard and
        the input-bound warning."""
        times = clock.take()
        epoch_clock["wait"] += times["data_wait"] * times["seconds"]
        epoch_clock["host"] += times["seconds"] - times["data_wait"] * times["seconds"]
        epoch_clock["steps"] += times["steps"]
        if not show or not times["steps"]:
            return
        means = self.read_means()
        rate = times["steps"] * images_per_step / max(times["seconds"], 1e-9)
        gpu = self.monitor.since(max(self.monitor.mark() - 10, 0)) if self.monitor else {}
        bar.show(means, rate, times, gpu)
        if self.scalars:
            self.scalars.add("train", {**means, "lr": lr, "images_per_s": rate, "data_wait": times["data_wait"],
                                       "host_ms": times["host_ms"]}, self.global_step)
            self.scalars.add("system", {k: v for k, v in gpu.items() if k != "gpu_samples"}, self.global_step)
        # the first interval of a process includes the workers' start: judge the input from the second on
        self.intervals += 1
        if self.ctx.is_main and not self.warned_input_bound and self.intervals > 1 \
                and times["data_wait"] >= records.WAIT_WARNING:
            self.warned_input_bound = True
            bar.write(records.input_bound_advice(times["data_wait"], self.config.num_workers,
                                                 cli.default_workers(10**6)))

    # ---- the end of an epoch: evaluation, record, checkpoint ----------------------------------------------------
    def due_for_test(self, epoch: int) -> bool:
        return bool(self.test_sets) and ((epoch + 1) % self.config.test_period == 0
                                         or epoch + 1 == self.config.epochs or self.max_steps_reached())

    def max_steps_reached(self) -> bool:
        return self.config.max_steps is not None and self.global_step >= self.config.max_steps

    def end_epoch(self, record: dict) -> dict | None:
        """Evaluate when due, then append the epoch's record to log.txt; returns the test results."""
        epoch = record["epoch"]
        results = None
        if self.due_for_test(epoch):
            config = self.config
            report = evaluate_sets(self.model.net, self.test_sets, self.ctx, config.test_image_size, config.test_mode,
                                   batch_size=config.batch_size, num_workers=min(config.num_workers, 4),
                                   amp=self.amp, invert_masks=config.invert_masks, progress=config.progress,
                                   protocol=config.protocol)
            results = {name: conds["clean"] for name, conds in report.items()}
            records.add_test_results(record, results)
            if self.ctx.is_main:
                if self.scalars:
                    self.scalars.add_test(results, epoch)
                for name, res in results.items():
                    print(f"epoch {epoch} {name}: pixel-level F1 {fmt(res['pixel-level F1'])}, "
                          f"pixel-level AUC {fmt(res['pixel-level AUC'])}", flush=True)
                    for k, why in res.get("undefined", {}).items():
                        print(f"  {k}: n/a, {why}", flush=True)
        if self.ctx.is_main:
            records.append_log(self.out_dir / "log.txt", record)
        return results

    def save(self, epoch_done: dict | None = None) -> Path:
        """Write `checkpoint-<epoch>.pth` for the current position (atomically; rank 0 only).
        `epoch_done`: the record of the epoch that just ended, kept in the checkpoint
        until log.txt holds it (a stop during the evaluation loses nothing)."""
        finished = self.step >= self.steps_per_epoch
        epoch = self.epoch
        next_epoch, next_step = (epoch + 1, 0) if finished else (epoch, self.step)
        path = self.out_dir / f"checkpoint-{epoch}.pth"
        if not self.ctx.is_main:
            return path
        partial = None
        if not finished and self.count:
            partial = {"epoch": epoch, "count": self.count,
                       "sums": records.read_scalars({k: self.sums[i] for i, k in enumerate(self.parts)})}
        args = {**self.config.as_dict(), "world_size": self.ctx.world_size, "train_images": len(self.train_ds)}
        state = {
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "epoch": epoch,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None, "args": args,
            "model_config": self.config.model_config(), "global_step": self.global_step, "next_epoch": next_epoch,
            "next_step": next_step, "rng": rng_state(), "epoch_partial": partial, "epoch_record": epoch_done,
        }
        try:
            with distributed.writing():
                write_atomic(path, lambda f: torch.save(state, f))
        except OutputError as err:
            raise cli.RunError(f"{err}; free space or fix the folder, then continue from the newest checkpoint with "
                               f"--resume auto (the previous checkpoint is intact)") from None
        if self.config.keep_checkpoints > 0:
            for old in checkpoints_newest_first(self.out_dir)[self.config.keep_checkpoints:]:
                old.unlink(missing_ok=True)
        return path

    def weights_agree(self) -> bool:
        """DDP keeps replicas identical; check it (and fail loudly if they ever drift)."""
        sums = torch.stack([p.detach().double().sum() for p in self.model.parameters()]).cpu()
        every = distributed.gather_objects(sums, self.ctx)
        return all(torch.equal(every[0], other) for other in every[1:])

    # ---- the whole run ------------------------------------------------------------------------------------------
    def run(self) -> int:
        config, ctx = self.config, self.ctx
        if self.epoch >= config.epochs and not self.pending_record:
            if ctx.is_main:
                print(f"nothing to do: {self.resumed_from} already finished all {config.epochs} epoch(s); raise "
                      f"--epochs to train longer, or choose another --output_dir to start afresh")
                self.print_outputs(self.resumed_from)
            return cli.OK
        last_eval, saved = None, self.resumed_from
        with self.stop:
            try:
                self.prepare()
                self.model.train()
                if self.pending_record:
                    # stopped between an epoch's checkpoint and its record: evaluate and record it now
                    last_eval = self.end_epoch(dict(self.pending_record)) or last_eval
                    self.model.train()
                self.pending_record = None
                while self.epoch < config.epochs:
                    record = self.train_epoch(self.epoch)
                    if record is None:  # stopped part-way through the epoch
                        saved = self.save()
                        distributed.sync(ctx)  # no process ends before rank 0 wrote the checkpoint
                        if self.peer_unreadable is not None:
                            raise distributed.PeerFailed(f"process {self.peer_unreadable} could not read a "
                                                         f"training file")
                        if self.unreadable:
                            raise cli.RunError(
                                f"cannot read {self.unreadable}; training stopped at epoch {self.epoch}, step "
                                f"{self.step} of {self.steps_per_epoch} and saved {saved}: fix or remove the file "
                                f"(python -m ncl_fast.check_data lists every problem), then continue with "
                                f"--resume auto")
                        break
                    saved = self.save(epoch_done=record)
                    last_eval = self.end_epoch(record) or last_eval
                    self.model.train()
                    self.epoch, self.step = self.epoch + 1, 0
                    if self.max_steps_reached() or self.agree_to_stop():
                        distributed.sync(ctx)
                        break
            finally:
                self.close()
        if self.stop.requested:
            if ctx.distributed:  # the checkpoint is written: from here a signal, or the teardown, ends the process
                distributed.end_with(self.stop.exit_code)
            if ctx.is_main:
                print(f"\ninterrupted by {self.stop.name}: saved {saved} (epoch {self.epoch}, {self.step} of {self.steps_per_epoch} "
                      f"steps done); continue with --resume auto", file=sys.stderr, flush=True)
            return self.stop.exit_code
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
        destroyed: TensorBoard's writer thread, the GPU monitor, the loader's workers, DDP."""
        if self.scalars:
            self.scalars.close()
            self.scalars = None
        if self.monitor:
            self.monitor.stop()
            self.monitor = None
        self.loader = None  # persistent workers end with their loader
        self.step_module = self.ddp = None

    def print_outputs(self, checkpoint) -> None:
        """Where everything went, and the next commands."""
        data = self.config.test_data_path or "TEST_DATA"
        print(f"\noutputs:\n"
              f"  checkpoints  {self.out_dir}/checkpoint-<epoch>.pth (newest: {checkpoint})\n"
              f"  log          {self.out_dir / 'log.txt'} (JSON lines)\n"
              f"  TensorBoard  tensorboard --logdir {self.config.tensorboard_dir}\n"
              f"predict:  python -m ncl_fast.predict IMAGE_OR_DIR --checkpoint {checkpoint} --out predictions/\n"
              f"evaluate: python -m ncl_fast.evaluate --checkpoint {checkpoint} --test_data_path {data}", flush=True)


@cli.command
def run_training(config: TrainConfig, ctx: distributed.Context) -> int:
    """Check the outputs (one run per folder) and the data, build the trainer, resume if
    asked, run; returns the exit status (bad input 2 and run-time failures 1, each with
    one `error:` line)."""
    with distributed.one_failure_ends_all(ctx):  # under torchrun: an error on any process ends every process
        out_dir = cli.check_output_dir(config.output_dir, "--output_dir")
        cli.check_output_dir(config.tensorboard_dir, "--log_dir" if config.log_dir else "--output_dir")
        lock = FolderLock(out_dir)
        try:
            problem = claim_output_dir(config, out_dir, lock) if ctx.is_main else None
            problem = distributed.gather_objects(problem, ctx)[0]  # every rank stops, or none
            if problem:
                raise cli.UsageError(problem)
            return _run(config, ctx, out_dir)
        finally:
            lock.release()


def claim_output_dir(config: TrainConfig, out_dir: Path, lock: FolderLock) -> str | None:
    """Rank 0: take the folder's lock; refuse a fresh run over a previous run's checkpoints
    (a requeued job without --resume would overwrite them one by one) unless
    --overwrite, which removes them and their log.txt. Returns what is wrong, or None."""
    holder = lock.acquire()
    if holder is not None:
        return (f"--output_dir {out_dir} is in use by another run ({holder}); wait for it to end, or choose "
                f"another --output_dir")
    old = checkpoints_newest_first(out_dir)
    if old and not config.resume:
        if not config.overwrite:
            names = ", ".join(p.name for p in old[:3]) + (" ..." if len(old) > 3 else "")
            return (f"--output_dir {out_dir} holds a previous run's checkpoints ({names}); continue it with "
                    f"--resume auto, or pass --overwrite to start afresh there")
        for path in old + [out_dir / "log.txt"]:
            path.unlink(missing_ok=True)
    return None


def _run(config: TrainConfig, ctx: distributed.Context, out_dir: Path) -> int:
    from ..data import DatasetError
    from .datasets import load_training_data

    try:
        entries, test_sets = load_training_data(config, ctx)
    except DatasetError as err:
        raise cli.UsageError(str(err)) from None
    if len(entries) < config.batch_size * ctx.world_size:
        raise cli.UsageError(f"{len(entries)} training images are fewer than one global batch "
                             f"({config.batch_size} x {ctx.world_size}); lower --batch_size")
    trainer = Trainer(config, ctx, entries, test_sets)
    need = trainer.checkpoint_bytes() * 2  # a new checkpoint is written beside the previous one, then renamed
    cli.check_output_dir(out_dir, "--output_dir", need_bytes=need)
    path, ckpt = None, None
    if config.resume == "auto":
        path, ckpt, skipped = newest_readable(out_dir)
        for err in skipped:
            if ctx.is_main:
                print(f"warning: --resume auto skips {err}", file=sys.stderr)
        if path is None and skipped:
            raise cli.UsageError(f"--resume auto: no checkpoint in {out_dir} can be read; remove the damaged files "
                                 f"to start afresh, or choose another --output_dir")
    elif config.resume:
        path = config.resume
        try:
            ckpt = load_checkpoint(path)
        except (CheckpointError, FileNotFoundError) as err:
            raise cli.UsageError(f"--resume: {err}; pass another checkpoint, or --resume auto to take the newest "
                                 f"readable one in --output_dir") from None
    if path is not None:
        trainer.resume(path, ckpt)
    return trainer.run()

