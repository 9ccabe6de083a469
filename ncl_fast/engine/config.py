"""The training configuration: the options of `python -m ncl_fast.train`, resolved
once from a preset and the command line into a frozen `TrainConfig`.

`train_parser()` is the option parser (the `train` and `ablate` commands both use
it); `resolve(argv)` parses, fills every unset option from the preset, checks
combinations and returns the configuration, or exits 2 naming every problem.
Nothing changes a `TrainConfig` afterwards: a variation (the ablation's runs) is a
new one made with `dataclasses.replace` and checked with `problems()`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import _backend, cli
from ..model import BACKBONES, VARIANTS, VIT_CONFIGS, LossConfig

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
#: `--compile` modes: torch.compile's own (`reduce-overhead` adds CUDA graphs on a GPU)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def synthetic_root() -> Path:
    """Where the synthetic dataset is cached: $NCL_FAST_SYNTH_DIR when set (and not
    empty), else $XDG_CACHE_HOME/ncl_fast or ~/.cache/ncl_fast."""
    explicit = os.environ.get("NCL_FAST_SYNTH_DIR", "").strip()
    if explicit:
        return Path(explicit)
    cache = Path(os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache") / "ncl_fast"
    return cache / f"synthetic-n{SYNTH_N}-seed{SYNTH_SEED}"


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run, resolved (see `resolve`)."""

    # data
    data_path: str
    test_data_path: str | None
    synthetic: bool  # data_path is the embedded synthetic set (made on first use)
    image_size: int
    test_image_size: int
    if_padding: bool
    train_mode: str
    invert_masks: bool
    allow_large_images: bool
    num_workers: int
    # model
    backbone: int | str
    pivot_stage: int | None
    width: int | None
    head_channels: int
    dropout: float
    # loss
    variant: str
    omega: float
    mu: float
    tau: float
    patch_px: int
    tol: float
    edge_mask_width: int
    impl: str | None
    # optimization
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    accum_steps: int
    epochs: int
    max_steps: int | None
    seed: int
    # execution
    device: str | None
    amp: str
    compile: str | None
    sync_bn: bool
    # outputs
    output_dir: str
    log_dir: str | None
    resume: str | None
    test_period: int
    keep_checkpoints: int
    log_every: int
    progress: bool
    preset: str = "demo"
    overwrite: bool = False
    protocol: str = "ncl_fast"  # how the evaluation makes inputs and averages (evaluate --protocol)

    # ---- what the rest of the engine derives from it --------------------------------------------------------------
    @property
    def if_resizing(self) -> bool:
        return not self.if_padding

    @property
    def test_mode(self) -> str:
        return "pad" if self.if_padding else "resize"

    @property
    def tensorboard_dir(self) -> str:
        return self.log_dir or self.output_dir

    def loss_config(self) -> LossConfig:
        return LossConfig(variant=self.variant, omega=self.omega, mu=self.mu, radius=self.edge_mask_width,
                          patch_px=self.patch_px, tau=self.tau, tol=self.tol, impl=self.impl)

    def model_config(self) -> dict:
        """What rebuilds the network (stored in checkpoints as `model_config`)."""
        return dict(backbone=self.backbone, pivot_stage=self.pivot_stage, variant=self.variant,
                    dropout=self.dropout, width=self.width, head_channels=self.head_channels)

    def as_dict(self) -> dict:
        """Plain values (a checkpoint's `args`, IMDL-BenCo's key)."""
        return dataclasses.asdict(self)

    #: options that cannot change what a run computes (where it writes, how it shows progress, how it is resumed)
    NOT_RESULTS = ("num_workers", "progress", "log_every", "output_dir", "log_dir", "resume", "keep_checkpoints",
                   "allow_large_images", "device", "preset", "overwrite")

    def identity(self) -> dict:
        """The values that decide a run's results: two configurations with equal identities train the same run."""
        return {k: v for k, v in self.as_dict().items() if k not in self.NOT_RESULTS}

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """A configuration from a checkpoint's `args` (extra keys ignored; keys missing in
        older checkpoints take the demo preset's or the parser's defaults)."""
        base = resolve([])
        known = {f.name for f in dataclasses.fields(cls)}
        return dataclasses.replace(base, **{k: v for k, v in values.items() if k in known})

    def problems(self) -> list[str]:
        """What is wrong with this combination of options (empty when it can run)."""
        out = []
        if self.backbone in VIT_CONFIGS:
            if self.pivot_stage is not None or self.width is not None:
                given = [f"--{k}" for k in ("pivot_stage", "width") if getattr(self, k) is not None]
                verb = "applies" if len(given) == 1 else "apply"
                out.append(f"{' and '.join(given)} {verb} to ResNet backbones only; --backbone {self.backbone} "
                           f"has its Pivot on the token map and its width in its size")
        elif self.width is None or self.width < 8 or self.width % 8:
            out.append(f"--width must be a multiple of 8, got {self.width}")
        for key in ("data_path", "test_data_path"):
            path = getattr(self, key)
            if path is not None and not self.synthetic and not Path(path).exists():
                out.append(f"--{key} {path} does not exist")
        if self.overwrite and self.resume:
            out.append("--overwrite starts afresh and --resume continues: give one of them")
        if self.resume not in (None, "auto") and not Path(self.resume).is_file():
            out.append(f"--resume {self.resume} is not a file (use a checkpoint path or 'auto')")
        if self.batch_size % self.accum_steps:
            out.append(f"--accum_steps must divide --batch_size ({self.batch_size}), got {self.accum_steps}")
        on_cpu = self.device == "cpu" or (self.device is None and not torch.cuda.is_available())
        if self.sync_bn and on_cpu:
            out.append("--sync_bn needs GPUs (PyTorch's SyncBatchNorm has no CPU kernel)")
        if self.device is not None and self.device.startswith("cuda") and not torch.cuda.is_available():
            out.append(f"--device {self.device} was asked for but no CUDA device is visible")
        for key in ("image_size", "test_image_size"):
            if self.patch_px > getattr(self, key):
                out.append(f"--patch_px {self.patch_px} is larger than --{key} {getattr(self, key)}: no patch fits "
                           f"in an image; lower --patch_px or raise --{key}")
        if self.variant != "base":
            stride = self.feature_stride()
            if self.patch_px % stride:
                where = "the ViT's token map" if self.backbone in VIT_CONFIGS else f"ResNet stage {self.pivot_stage}"
                out.append(f"--patch_px {self.patch_px} is not a whole number of cells of the map the Pivot reads "
                           f"({where}, stride {stride}); use a multiple of {stride}")
        try:
            self.loss_config()
        except ValueError as err:
            out.append(str(err))
        return out

    def feature_stride(self) -> int:
        """The stride of the feature map the Pivot reads (SPEC sections 1 and 10)."""
        if self.backbone in VIT_CONFIGS:
            return 16
        return {1: 2, 2: 4}.get(self.pivot_stage or 1, 8)


def preset_help(key: str, text: str) -> str:
    """`text`, then the default each preset gives `key`."""
    values = "; ".join(f"{name}: {PRESETS[name][key]}" for name in sorted(PRESETS))
    return f"{text} (default from --preset, {values})" if text else f"default from --preset, {values}"


def train_parser(prog: str = "python -m ncl_fast.train", description: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=description, formatter_class=cli.HelpFormatter)
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
    A("--resume", default=None, help="a checkpoint, or 'auto' for the furthest readable one in output_dir")
    A("--overwrite", action="store_true",
      help="start afresh in an --output_dir that holds a previous run's checkpoints (they and its log.txt are "
           "removed); without it such a folder is refused unless --resume is given")
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
    A("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
      help="torch.compile the training step (model and loss as one graph); a mode may follow: reduce-overhead "
           "adds CUDA graphs on a GPU (default mode: default)")
    A("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"), help="autocast (default: auto, bf16 on GPU)")
    A("--sync_bn", "--sync-bn", action="store_true", help="SyncBatchNorm across GPU processes")
    A("--accum_steps", "--accum-steps", type=cli.positive_int, default=1,
      help="split each batch into K micro-batches (gradient accumulation; less memory at 1024 px) (default: 1)")
    A("--test_period", "--test-period", type=cli.positive_int, default=None,
      help=preset_help("test_period", "evaluate every N epochs"))
    A("--keep_checkpoints", "--keep-checkpoints", type=cli.nonnegative_int, default=3,
      help="keep the newest N checkpoint-<epoch>.pth (0: keep all) (default: 3)")
    A("--max_steps", "--max-steps", type=cli.positive_int, default=None,
      help="stop after N steps in all, with a checkpoint (benchmarks, smoke tests)")
    A("--log_every", "--log-every", type=cli.positive_int, default=20,
      help="read the loss from the device, update the progress bar and TensorBoard every N steps (the only host "
           "reads of a step) (default: 20)")
    A("--device", type=cli.device, default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    A("--invert-masks", "--invert_masks", action="store_true", help="masks are black = tampered (NIST16)")
    A("--protocol", default="ncl_fast", choices=("ncl_fast", "benco", "benco13"),
      help="the evaluation's inputs and averaging, as `evaluate --protocol`: ncl_fast (default), benco "
           "(IMDL-BenCo 0.1.45's, inputs included), benco13 (imdlbenco13's)")
    cli.add_large_images_option(A)
    A("--no-progress", action="store_true", help="no progress bars")
    return ap


def resolve(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> TrainConfig:
    """Parse `argv` (the option types reject bad numbers), fill from the preset, and
    reject bad combinations before any work starts (exit 2 through `parser.error`)."""
    ap = parser or train_parser()
    ns = ap.parse_args(argv)
    config, problems = from_namespace(ns)
    if problems:
        ap.error("\n  " + "\n  ".join(problems))
    return config


def from_namespace(ns: argparse.Namespace) -> tuple[TrainConfig, list[str]]:
    """The configuration of parsed options, and its problems."""
    preset = PRESETS[ns.preset]
    pick = lambda key: getattr(ns, key) if getattr(ns, key) is not None else preset[key]
    vit = pick("backbone") in VIT_CONFIGS
    synthetic = ns.data_path is None
    root = synthetic_root()
    values: dict[str, Any] = dict(
        data_path=str(root / "train.json") if synthetic else ns.data_path,
        test_data_path=ns.test_data_path if ns.test_data_path or not synthetic else str(root / "test.json"),
        synthetic=synthetic,
        image_size=pick("image_size"), test_image_size=pick("test_image_size"),
        if_padding=ns.if_padding or (not ns.if_resizing and preset["if_padding"]),
        train_mode=pick("train_mode"), invert_masks=ns.invert_masks, allow_large_images=ns.allow_large_images,
        num_workers=ns.num_workers if ns.num_workers is not None else cli.default_workers(preset["num_workers"]),
        backbone=pick("backbone"),
        # a ViT has neither: given, they are reported by problems(); not given, the preset's ResNet values do not apply
        pivot_stage=ns.pivot_stage if vit else pick("pivot_stage"),
        width=ns.width if vit else pick("width"),
        head_channels=pick("head_channels"), dropout=ns.dropout,
        variant=ns.variant, omega=ns.omega, mu=ns.mu, tau=ns.tau, patch_px=ns.patch_px, tol=ns.tol,
        edge_mask_width=ns.edge_mask_width, impl=ns.impl,
        optimizer=pick("optimizer"), lr=pick("lr"), momentum=ns.momentum, weight_decay=pick("weight_decay"),
        batch_size=pick("batch_size"), accum_steps=ns.accum_steps, epochs=pick("epochs"), max_steps=ns.max_steps,
        seed=ns.seed, device=ns.device, amp=ns.amp, compile=ns.compile, sync_bn=ns.sync_bn,
        output_dir=ns.output_dir, log_dir=ns.log_dir, resume=ns.resume, test_period=pick("test_period"),
        keep_checkpoints=ns.keep_checkpoints, log_every=ns.log_every, progress=not ns.no_progress, preset=ns.preset,
        overwrite=ns.overwrite, protocol=ns.protocol,
    )
    config = TrainConfig(**values)
    problems = config.problems()
    try:
        from ..data.dataset import check_protocol
        check_protocol(config.protocol, config.test_mode)
    except (ValueError, ImportError) as err:
        problems.append(f"--protocol {config.protocol}: {err}")
    return config, problems
