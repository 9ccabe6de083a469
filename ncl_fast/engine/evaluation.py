"""Evaluation: IMDL-BenCo's metrics of a network on test sets, every image exactly
once on one process or many, and the tables that show them.

Under torchrun each rank takes every world_size-th image; the per-image results
are gathered, nothing is padded or duplicated.

`protocol`: `ncl_fast` (the default: our inputs, IMDL-BenCo 0.1.45's averaging),
`benco` (IMDL-BenCo 0.1.45's inputs and averaging) or `benco13` (its inputs,
imdlbenco13's averaging); see `metrics` and `data.dataset`.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from .. import distributed, metrics
from ..data import ForgeryDataset, to_model_input
from ..data.attacks import grid

TABLE_KEYS = metrics.NAMES + ("pixel-level F1 (tampered only)", "pixel-level F1 (dataset-level)")


def autocast(device: torch.device, amp: str):
    """Autocast for `amp` (bf16, fp16 or off) on `device`."""
    if amp == "off":
        return nullcontext()
    if device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate_dataset(net, dataset, ctx: distributed.Context, batch_size: int = 4, num_workers: int = 2,
                     amp: str = "off", desc: str = "evaluating", progress: bool = True,
                     protocol: str = "ncl_fast") -> dict:
    """Summary metrics of `net` (a DeepLabV3Plus or a ViTSegmenter) on `dataset`, every image once."""
    was_training = net.training
    net.eval()
    shard = Subset(dataset, list(range(ctx.rank, len(dataset), ctx.world_size)))
    # its own generator: evaluating must not move the global RNG (exact resumption)
    loader = DataLoader(shard, batch_size=batch_size, num_workers=num_workers,
                        pin_memory=ctx.device.type == "cuda", shuffle=False, generator=torch.Generator())
    rows = []
    for batch in tqdm(loader, desc=desc, disable=not (ctx.is_main and progress), leave=False, unit="batch"):
        image, mask, shape = to_model_input(batch, ctx.device, channels_last=ctx.device.type == "cuda")
        with autocast(ctx.device, amp):
            prob = torch.sigmoid(net(image)["logits"].float())
        for k in range(prob.shape[0]):  # shape None: the whole image is valid (resize mode)
            label = None if protocol == "ncl_fast" else bool(batch["label"][k])  # IMDL-BenCo's raw-mask label
            r = metrics.image_metrics(prob[k, 0], mask[k, 0], None if shape is None else shape[k, 0], label)
            r["index"] = int(batch["index"][k])
            rows.append(r)
    net.train(was_training)
    every = [r for part in distributed.gather_objects(rows, ctx) for r in part]
    indices = sorted(r["index"] for r in every)
    if indices != list(range(len(dataset))):
        raise RuntimeError(f"evaluation covered {len(indices)} of {len(dataset)} images; each must be seen once")
    return metrics.summarize(every, protocol)


def evaluate_sets(net, test_sets: dict, ctx: distributed.Context, size: int, mode: str, *, batch_size: int,
                  num_workers: int, amp: str, invert_masks: bool = False, attacks=(), progress: bool = True,
                  protocol: str = "ncl_fast") -> dict[str, dict[str, dict]]:
    """{set: {condition: summary}} for every test set (entries), clean and under each attack."""
    report = {}
    for name, entries in test_sets.items():
        results = {}
        for attack in [None, *attacks]:
            ds = ForgeryDataset(entries, size, mode, invert_masks=invert_masks, attack=attack, protocol=protocol)
            cond = "clean" if attack is None else attack.name
            label = f"evaluating {name}" + ("" if attack is None and not attacks else f" ({cond})")
            results[cond] = evaluate_dataset(net, ds, ctx, batch_size, num_workers, amp, desc=label,
                                             progress=progress, protocol=protocol)
        report[name] = results
    return report


def attack_grid(robustness: bool, which: str) -> list:
    return grid(which) if robustness else []


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
    dropped = {cond: res.get("pixel-level AUC (undefined, dropped)", 0) for cond, res in results.items()}
    if any(dropped.values()):
        notes["pixel-level AUC"] = None
    if notes:
        lines.append("")
        lines += [f"n/a: {k} is undefined: {why}." for k, why in notes.items() if why is not None]
    for cond, n in dropped.items():
        if n:
            lines.append(f"pixel-level AUC ({cond}): {n} image(s) whose valid pixels are all tampered have no AUC "
                         f"and are left out of the mean.")
    return "\n".join(lines)
