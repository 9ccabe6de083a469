"""`python -m ncl_fast.evaluate --checkpoint CKPT --test_data_path PATH`: the
IMDL-BenCo metrics of a checkpoint on one or several test sets, optionally under
the robustness attacks.

`--test_data_path` is a Tp/Gt folder, a JSON list, or a JSON map
`{"name": path}`. Every image is evaluated exactly once, on one process or many
(`torchrun`: each rank takes every world_size-th image, the per-image results are
gathered, nothing is padded or duplicated). Prints a markdown table per dataset
and writes `eval.json` (and `eval.md`) to `--output_dir` when given.
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from . import distributed, metrics
from .checkpoint import load_checkpoint, strip_prefixes
from .data import DatasetError, ForgeryDataset, list_test_sets, load_entries
from .data.attacks import grid
from .model import LossConfig, NCLModel

TABLE_KEYS = metrics.NAMES + ("pixel-level F1 (tampered only)", "pixel-level F1 (dataset-level)")


def autocast(device: torch.device, amp: str):
    if device.type != "cuda" or amp == "off":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate_dataset(net, dataset, ctx: distributed.Context, batch_size: int = 4, num_workers: int = 2,
                     amp: str = "off", desc: str = "evaluating") -> dict:
    """Summary metrics of `net` (a DeepLabV3Plus) on `dataset`, every image once."""
    was_training = net.training
    net.eval()
    shard = Subset(dataset, list(range(ctx.rank, len(dataset), ctx.world_size)))
    # its own generator: evaluating must not move the global RNG (exact resumption)
    loader = DataLoader(shard, batch_size=batch_size, num_workers=num_workers,
                        pin_memory=ctx.device.type == "cuda", shuffle=False, generator=torch.Generator())
    rows = []
    for batch in tqdm(loader, desc=desc, disable=not ctx.is_main, leave=False, unit="batch"):
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


def markdown(name: str, results: dict[str, dict]) -> str:
    """One table: a row per condition (clean, attacks), a column per metric."""
    lines = [f"### {name}", "", "| condition | " + " | ".join(TABLE_KEYS) + " | images |",
             "|---" * (len(TABLE_KEYS) + 2) + "|"]
    for cond, res in results.items():
        cells = " | ".join(f"{res[k]:.4f}" for k in TABLE_KEYS)
        lines.append(f"| {cond} | {cells} | {res['images']} |")
    return "\n".join(lines)


def model_from_checkpoint(path: str, device: torch.device, fallback: dict | None = None) -> tuple[NCLModel, dict]:
    """Rebuild the model a checkpoint was trained with (`model_config`), load its weights."""
    ckpt = load_checkpoint(path)
    cfg = dict(fallback or {})
    cfg.update(ckpt.get("model_config", {}))
    model = NCLModel(
        cfg.get("backbone", 101), cfg.get("pivot_stage", 1), LossConfig(variant=cfg.get("variant", "full")),
        dropout=cfg.get("dropout", 0.1), width=cfg.get("width", 64), head_channels=cfg.get("head_channels", 256),
    )
    state = strip_prefixes(ckpt["model"])
    what = f"a ResNet-{cfg.get('backbone', 101)} DeepLabV3+ (width {cfg.get('width', 64)})"
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        first = str(err).strip().splitlines()[1:2]
        raise ValueError(f"checkpoint {path} does not fit {what}: {first}; pass --backbone as trained") from None
    needed = [k for k in missing if k.startswith("net.")]
    if needed or any(k.startswith("net.") for k in unexpected):
        raise ValueError(
            f"checkpoint {path} does not fit {what} (missing {needed[:3]}, unexpected {list(unexpected)[:3]}); "
            f"pass --backbone as trained"
        )
    return model.to(device).eval(), ckpt


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ncl_fast.evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--test_data_path", "--test-data-path", required=True)
    ap.add_argument("--image_size", "--image-size", type=int, default=None, help="default: the training one, else 512")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--if_resizing", "--if-resizing", action="store_true", help="resize to image_size (default)")
    size.add_argument("--if_padding", "--if-padding", action="store_true", help="top-left zero padding")
    ap.add_argument("--batch_size", "--batch-size", type=int, default=4)
    ap.add_argument("--num_workers", "--num-workers", type=int, default=4)
    ap.add_argument("--invert-masks", "--invert_masks", action="store_true", help="masks are black = tampered (NIST16)")
    ap.add_argument("--robustness", action="store_true", help="also evaluate under attacks")
    ap.add_argument("--robustness-grid", "--robustness_grid", default="ncl", choices=("ncl", "benco"))
    ap.add_argument("--output_dir", "--output-dir", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "off"), help="autocast on GPU")
    ap.add_argument("--backbone", type=int, default=101, help="for checkpoints without model_config")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or args.num_workers < 0:
        sys.exit("--batch_size must be >= 1 and --num_workers >= 0")
    ctx = distributed.setup(args.device)
    try:
        try:
            test_sets = list_test_sets(args.test_data_path)
            entries = {name: load_entries(path)[0] for name, path in test_sets.items()}
            model, ckpt = model_from_checkpoint(args.checkpoint, ctx.device, {"backbone": args.backbone})
        except (DatasetError, FileNotFoundError, ValueError) as err:
            sys.exit(f"error: {err}")
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
                                                 desc=f"{name} / {cond}")
            report[name] = results
            texts.append(markdown(name, results))
        if ctx.is_main:
            header = f"checkpoint {args.checkpoint}, {size}x{size} ({mode}), F1 at threshold 0.5"
            print(header + "\n\n" + "\n\n".join(texts))
            if args.output_dir:
                out = Path(args.output_dir)
                out.mkdir(parents=True, exist_ok=True)
                (out / "eval.json").write_text(json.dumps({"checkpoint": args.checkpoint, "size": size,
                                                           "mode": mode, "results": report}, indent=1))
                (out / "eval.md").write_text(header + "\n\n" + "\n\n".join(texts) + "\n")
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
