"""`python -m ncl_fast.evaluate --checkpoint CKPT --test_data_path PATH`: the
IMDL-BenCo metrics of a checkpoint on one or several test sets, optionally under
the robustness attacks.

`--test_data_path` is a Tp/Gt folder, a JSON list, or a JSON map
`{"name": path}`. Every image is evaluated exactly once, on one process or many
(`torchrun`: each rank takes every world_size-th image, the per-image results are
gathered, nothing is padded or duplicated). Prints a markdown table per dataset
and writes `eval.json` (and `eval.md`) to `--output_dir` when given; that folder
is checked before any work starts. A figure undefined for a set (image-level AUC
without authentic images, for instance) is `null` in `eval.json` and `n/a` in
the tables, with the reason.

Exit status: 0 done, 1 failure at run time, 2 bad input, 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from . import cli, distributed, metrics
from .checkpoint import load_checkpoint, strip_prefixes
from .data import DatasetError, ForgeryDataset, list_test_sets, load_entries
from .data.attacks import grid
from .model import BACKBONES, LossConfig, NCLModel, describe_backbone

TABLE_KEYS = metrics.NAMES + ("pixel-level F1 (tampered only)", "pixel-level F1 (dataset-level)")


def autocast(device: torch.device, amp: str):
    if device.type != "cuda" or amp == "off":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate_dataset(net, dataset, ctx: distributed.Context, batch_size: int = 4, num_workers: int = 2,
                     amp: str = "off", desc: str = "evaluating", progress: bool = True) -> dict:
    """Summary metrics of `net` (a DeepLabV3Plus or a ViTSegmenter) on `dataset`, every image once."""
    was_training = net.training
    net.eval()
    shard = Subset(dataset, list(range(ctx.rank, len(dataset), ctx.world_size)))
    # its own generator: evaluating must not move the global RNG (exact resumption)
    loader = DataLoader(shard, batch_size=batch_size, num_workers=num_workers,
                        pin_memory=ctx.device.type == "cuda", shuffle=False, generator=torch.Generator())
    rows = []
    for batch in tqdm(loader, desc=desc, disable=not (ctx.is_main and progress), leave=False, unit="batch"):
        image = batch["image"].to(ctx.device, non_blocking=True)
        if ctx.device.type == "cuda":
            image = image.to(memory_format=torch.channels_last)
        with autocast(ctx.device, amp):
            prob = torch.sigmoid(net(image)["logits"].float())
        mask = batch["mask"].to(ctx.device)
        shape = batch["shape_mask"].to(ctx.device)
        for k in range(prob.shape[0]):
            r = metrics.image_metrics(prob[k, 0], mask[k, 0], shape[k, 0])
            r["index"] = int(batch["index"][k])
            rows.append(r)
    net.train(was_training)
    every = [r for part in distributed.gather_objects(rows, ctx) for r in part]
    indices = sorted(r["index"] for r in every)
    if indices != list(range(len(dataset))):
        raise RuntimeError(f"evaluation covered {len(indices)} of {len(dataset)} images; each must be seen once")
    return metrics.summarize(every)


def fmt(value) -> str:
    """A figure for a table: 4 decimals, or n/a when undefined."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}"


def markdown(name: str, results: dict[str, dict]) -> str:
    """One table: a row per condition (clean, attacks), a column per metric; then why any n/a."""
    lines = [f"### {name}", "", "| condition | " + " | ".join(TABLE_KEYS) + " | images |",
             "|---" * (len(TABLE_KEYS) + 2) + "|"]
    notes = {}
    for cond, res in results.items():
        cells = " | ".join(fmt(res[k]) for k in TABLE_KEYS)
        lines.append(f"| {cond} | {cells} | {res['images']} |")
        notes.update({k: why for k, why in res.get("undefined", {}).items() if k in TABLE_KEYS})
    if notes:
        lines.append("")
        lines += [f"n/a: {k} is undefined: {why}." for k, why in notes.items()]
    return "\n".join(lines)


def model_from_checkpoint(path: str, device: torch.device, fallback: dict | None = None) -> tuple[NCLModel, dict]:
    """Rebuild the model a checkpoint was trained with (`model_config`), load its weights.

    A missing `pivot_stage` or `width` takes NCLModel's default for the backbone
    (ResNet: 1 and 64; a ViT has neither and stores None)."""
    ckpt = load_checkpoint(path)
    cfg = dict(fallback or {})
    cfg.update(ckpt.get("model_config", {}))
    backbone = cfg.get("backbone", 101)
    try:
        model = NCLModel(
            backbone, cfg.get("pivot_stage"), LossConfig(variant=cfg.get("variant", "full")),
            dropout=cfg.get("dropout", 0.1), width=cfg.get("width"), head_channels=cfg.get("head_channels", 256),
        )
    except ValueError as err:  # a model_config no model fits: edited, or from another version
        raise ValueError(f"checkpoint {path}: its model_config {cfg} builds no model ({err})") from None
    state = strip_prefixes(ckpt["model"])
    net = "DeepLabV3+" if isinstance(backbone, int) else "segmenter"
    what = f"a {describe_backbone(backbone, cfg.get('width'))} {net}"
    how = ("its model_config does not match the file's weights: it is damaged or was edited"
           if "model_config" in ckpt else "pass --backbone as trained")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        first = str(err).strip().splitlines()[1:2]
        raise ValueError(f"checkpoint {path} does not fit {what}: {first}; {how}") from None
    needed = [k for k in missing if k.startswith("net.")]
    if needed or any(k.startswith("net.") for k in unexpected):
        raise ValueError(
            f"checkpoint {path} does not fit {what} (missing {needed[:3]}, unexpected {list(unexpected)[:3]}); {how}"
        )
    return model.to(device).eval(), ckpt


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ncl_fast.evaluate", description=__doc__,
                                 formatter_class=cli.HelpFormatter)
    cli.add_version_option(ap)
    ap.add_argument("--checkpoint", required=True, help="a checkpoint-<epoch>.pth of ncl_fast.train (or {model: ...})")
    ap.add_argument("--test_data_path", "--test-data-path", required=True,
                    help="Tp/Gt folder, JSON list, or JSON map {name: path}")
    ap.add_argument("--image_size", "--image-size", type=cli.image_size, default=None,
                    help="a multiple of 16 (default: the checkpoint's test size, else 512)")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--if_resizing", "--if-resizing", action="store_true", help="resize to image_size (default)")
    size.add_argument("--if_padding", "--if-padding", action="store_true", help="top-left zero padding")
    ap.add_argument("--batch_size", "--batch-size", type=cli.positive_int, default=4, help="per process (default: 4)")
    workers = cli.default_workers()
    ap.add_argument("--num_workers", "--num-workers", type=cli.nonnegative_int, default=workers,
                    help=f"DataLoader workers (default: {workers}, the CPUs available up to 4)")
    ap.add_argument("--invert-masks", "--invert_masks", action="store_true", help="masks are black = tampered (NIST16)")
    ap.add_argument("--robustness", action="store_true", help="also evaluate under attacks (NCL paper Table 3)")
    ap.add_argument("--robustness-grid", "--robustness_grid", default="ncl", choices=("ncl", "benco"),
                    help="ncl: the NCL paper's attacks; benco: IMDL-BenCo's grids (default: ncl)")
    ap.add_argument("--output_dir", "--output-dir", default=None,
                    help="folder for eval.json and eval.md (default: print only)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "off"), help="autocast on GPU (default: bf16)")
    ap.add_argument("--backbone", type=cli.backbone, default=101, choices=BACKBONES,
                    help="a ResNet depth or ViT size, for checkpoints without model_config (default: 101)")
    cli.add_large_images_option(ap.add_argument)
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


@cli.command
def main(argv=None) -> int:
    args = cli.parse_args(build_parser(), argv)
    out = cli.check_output_dir(args.output_dir, "--output_dir") if args.output_dir else None
    ctx = distributed.setup(args.device)
    try:
        try:
            test_sets = list_test_sets(args.test_data_path)
            entries = {name: load_entries(path)[0] for name, path in test_sets.items()}
            model, ckpt = model_from_checkpoint(args.checkpoint, ctx.device, {"backbone": args.backbone})
        except (DatasetError, FileNotFoundError, ValueError) as err:
            raise cli.UsageError(str(err)) from None
        trained = ckpt.get("args", {}) or {}
        size = args.image_size or trained.get("test_image_size") or trained.get("image_size") or 512
        mode = "pad" if args.if_padding or (not args.if_resizing and trained.get("if_padding")) else "resize"
        if ctx.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        attacks = grid(args.robustness_grid) if args.robustness else []
        report, texts = {}, []
        for name, ents in entries.items():
            results = {}
            for attack in [None] + attacks:
                ds = ForgeryDataset(ents, size, mode, invert_masks=args.invert_masks, attack=attack)
                cond = "clean" if attack is None else attack.name
                results[cond] = evaluate_dataset(model.net, ds, ctx, args.batch_size, args.num_workers, args.amp,
                                                 desc=f"evaluating {name} ({cond})", progress=not args.no_progress)
            report[name] = results
            texts.append(markdown(name, results))
        if ctx.is_main:
            header = f"checkpoint {args.checkpoint}, {size}x{size} ({mode}), F1 at threshold 0.5"
            print(header + "\n\n" + "\n\n".join(texts))
            if out is not None:
                record = {"checkpoint": args.checkpoint, "size": size, "mode": mode, "results": report}
                try:
                    (out / "eval.json").write_text(json.dumps(cli.json_safe(record), indent=1, allow_nan=False))
                    (out / "eval.md").write_text(header + "\n\n" + "\n\n".join(texts) + "\n")
                except OSError as err:
                    raise cli.RunError(f"cannot write {out / 'eval.json'} ({cli.describe_os_error(err)}); "
                                       f"the results are printed above") from None
                print(f"\nwrote {out / 'eval.json'} and {out / 'eval.md'}")
    finally:
        distributed.teardown()
    return cli.OK


if __name__ == "__main__":
    sys.exit(main())
