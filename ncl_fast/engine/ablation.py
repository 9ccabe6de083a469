"""The ablation runner's work (`python -m ncl_fast.ablate`): the runs of the
paper's ablation tables for an equal budget, each trained once, skipped when
finished, resumed when interrupted; then the tables, JSON and plot.

A run is a `TrainConfig`: the base configuration of the command line with the
row's variant, Pivot stage or backbone, the seed and the run's folder replaced.
A finished run is recognized by its configuration's values that decide results
(`TrainConfig.identity`), never by the text of its options.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

from .. import cli, distributed
from ..outputs import write_atomic, write_json
from . import records
from .config import TrainConfig, resolve
from .loop import run_training

METRICS = records.TABLE_METRICS

#: configuration name -> the train options that define it (the ViT's size is `--vit_backbone`)
CONFIGS = {
    "base": {"variant": "base"},
    "pivot": {"variant": "pivot"},
    "full": {"variant": "full"},
    "full-stage2": {"variant": "full", "pivot_stage": 2},
    "full-stage5": {"variant": "full", "pivot_stage": 5},
    "vit-base": {"variant": "base", "backbone": "VIT"},
    "vit-pivot": {"variant": "pivot", "backbone": "VIT"},
    "vit-full": {"variant": "full", "backbone": "VIT"},
}

#: table -> (title, [(row label, configuration)])
TABLES = {
    "variants": ("Loss variants (paper Table 5), ResNet, Pivot after stage 1",
                 [("Base (BCE)", "base"), ("Base + Pivot (NCL)", "pivot"), ("Base + Pivot + PC (full)", "full")]),
    "stages": ("Where the Pivot attaches (paper Table 6), variant full",
               [("stage 1", "full"), ("stage 2", "full-stage2"), ("stage 5", "full-stage5")]),
    "backbones": ("NCL on a CNN and a ViT (paper Table 4), both from scratch",
                  [("ResNet, no NCL (base)", "base"), ("ResNet + NCL (pivot)", "pivot"),
                   ("ResNet + NCL + PC (full)", "full"), ("ViT, no NCL (base)", "vit-base"),
                   ("ViT + NCL (pivot)", "vit-pivot"), ("ViT + NCL + PC (full)", "vit-full")]),
}



def plan(tables: list[str], configs: list[str] | None) -> list[str]:
    """The configurations to train, each once, in table order."""
    names = []
    for table in tables:
        for _, config in TABLES[table][1]:
            if config not in names and (configs is None or config in configs):
                names.append(config)
    return names


def run_config(base: TrainConfig, name: str, seed: int, run_dir: Path, eval_every: int, vit_backbone: str,
               resume: bool = False) -> TrainConfig:
    """The configuration of one run: `base` with the row's options, the seed and the folder."""
    row = dict(CONFIGS[name])
    if row.get("backbone") == "VIT":  # the ViT rows: no Pivot stage, no stem width (a ViT has neither)
        row.update(backbone=vit_backbone, pivot_stage=None, width=None)
    return dataclasses.replace(base, **row, seed=seed, test_period=eval_every, output_dir=str(run_dir), log_dir=None,
                               resume="auto" if resume else None, max_steps=None)


def identity_of(state: dict) -> dict | None:
    """The identity a run.json records (older files: re-read from their train options)."""
    if "options" in state:
        return state["options"]
    try:
        return resolve(state.get("argv", [])).identity()
    except SystemExit:
        return None


def summarize_run(run_dir: Path) -> dict:
    """The final metrics and the per-epoch curves of a finished run, from its log.txt."""
    log = records.read_log(run_dir / "log.txt")
    evaluated = [r for r in log if records.test_metrics(r)]
    curves = {
        "epoch": [r["epoch"] for r in log],
        "train_loss": [r.get("train_loss") for r in log],
        "train_ncl": [r.get("train_ncl") for r in log],
        "eval_epoch": [r["epoch"] for r in evaluated],
        "val_f1": {name: [records.test_metrics(r)[name].get("pixel-level F1") for r in evaluated]
                   for name in (records.test_metrics(evaluated[-1]) if evaluated else {})},
    }
    return {"final": records.test_metrics(evaluated[-1]) if evaluated else {}, "curves": curves}


def gradient_share(run_dir: Path, ctx: distributed.Context, batches: int = 4) -> dict | None:
    """How much the NCL term moves the network, at a run's last checkpoint: over `batches`
    training batches (fixed draw), the norm of `omega * grad L_NCL` over the norm of the
    gradient of the rest of the loss (BCE or PC), both with respect to the network's weights,
    and the cosine between the two. None for the variant without NCL."""
    import torch

    from ..data import ForgeryDataset, load_entries, to_model_input
    from .checkpoints import model_from_checkpoint, newest_readable

    path, ckpt, _ = newest_readable(run_dir)
    config = TrainConfig.from_dict(ckpt["args"])
    if config.variant == "base":
        return None
    model, _ = model_from_checkpoint(str(path), ctx.device)
    model.criterion.config = config.loss_config()
    model.train()  # BatchNorm on batch statistics, as in training; dropout off: the same draw, the same figure
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    entries, _ = load_entries(config.data_path)
    ds = ForgeryDataset(entries, config.image_size, config.train_mode, train=True, invert_masks=config.invert_masks,
                        seed=config.seed)
    params = [p for n, p in model.named_parameters() if n.startswith("net.")]
    draw = torch.Generator().manual_seed(0)
    ratios, cosines = [], []
    for _ in range(batches):
        items = [ds[i] for i in torch.randperm(len(ds), generator=draw)[: config.batch_size].tolist()]
        image, mask, _ = to_model_input({"image": torch.stack([it["image"] for it in items]),
                                         "mask": torch.stack([it["mask"] for it in items])}, ctx.device)
        parts = model.criterion(model.net(image), mask, model.pivot)
        rest = parts["pc"] if "pc" in parts else parts["bce"]

        def flat(loss, retain):
            grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
            return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                              for g, p in zip(grads, params)])

        g_rest, g_ncl = flat(rest, True), flat(config.omega * parts["ncl"], False)
        ratios.append((g_ncl.norm() / g_rest.norm()).item())
        cosines.append(torch.nn.functional.cosine_similarity(g_ncl, g_rest, dim=0).item())
    return {"ncl_grad_ratio": statistics.fmean(ratios), "ncl_grad_cosine": statistics.fmean(cosines),
            "batches": batches, "checkpoint": str(path)}


def run_one(config: TrainConfig, name: str, seed: int, ctx: distributed.Context, label: str) -> tuple[int, dict | None]:
    """Train (or resume, or skip) one run; returns (exit code, its record)."""
    run_dir = Path(config.output_dir)
    state_path = run_dir / "run.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    if state is not None:
        before = identity_of(state)
        if before != config.identity():
            changed = sorted(k for k in set(before or {}) | set(config.identity())
                             if (before or {}).get(k) != config.identity().get(k))
            raise cli.UsageError(
                f"{run_dir} holds a run made with other options ({', '.join(changed[:6]) or 'unreadable'} differ); "
                f"choose another --output_dir, or delete {run_dir}")
    if state is not None and state.get("done"):
        if ctx.is_main:
            print(f"{label} {name}, seed {seed}: finished before, skipped", flush=True)
            if "probe" not in state:  # a run finished by an older version of this command
                state["probe"] = gradient_share(run_dir, ctx)
                write_json(state_path, state)
        return cli.OK, state
    resume = any(run_dir.glob("checkpoint-*.pth"))
    if ctx.is_main:
        print(f"\n{label} {name}, seed {seed}: {'resuming' if resume else 'training'} in {run_dir}", flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        state = state or {"config": name, "seed": seed, "options": config.identity(), "seconds": 0.0, "done": False}
        state["options"] = config.identity()
        write_json(state_path, state)
    distributed.barrier(ctx)
    t0 = time.perf_counter()
    code = run_training(dataclasses.replace(config, resume="auto" if resume else None), ctx)
    seconds = time.perf_counter() - t0
    if not ctx.is_main:
        return code, None
    state["seconds"] += seconds
    state["done"] = code == cli.OK
    state["exit_code"] = code
    if code == cli.OK:
        state.update(summarize_run(run_dir))
        if not state["final"]:
            state["done"] = False
            write_json(state_path, state)
            raise cli.UsageError(f"{run_dir}: the run has no test metrics; give --test_data_path (or leave "
                                 f"--data_path out to use the synthetic set's test split)")
        try:
            state["probe"] = gradient_share(run_dir, ctx)
        except Exception as err:  # a diagnostic: never lose the run's result to it
            print(f"warning: {run_dir}: the NCL gradient probe failed ({type(err).__name__}: {err})", file=sys.stderr)
            state["probe"] = None
    write_json(state_path, state)
    return code, state


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def fmt_ms(m: float, s: float, digits: int = 4) -> str:
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if not math.isnan(s) else f"{m:.{digits}f}"


def aggregate(args, runs: dict) -> dict:
    """{table: {title, rows: [{label, config, seeds, per test set: mean/std per metric, per-seed F1}]}}."""
    tables = {}
    for table in args.tables:
        title, rows = TABLES[table]
        out_rows = []
        for label, config in rows:
            if args.configs is not None and config not in args.configs:
                continue
            done = [runs[(config, s)] for s in args.seeds if runs.get((config, s)) and runs[(config, s)].get("done")]
            sets = sorted({name for r in done for name in r["final"]})
            stats = {name: {m: mean_std([r["final"].get(name, {}).get(m) for r in done]) for m in METRICS}
                     for name in sets}
            out_rows.append({
                "label": label, "config": config, "options": done[0].get("options") if done else None,
                "seeds": [r["seed"] for r in done],
                "stats": stats,
                "per_seed_f1": {name: [r["final"].get(name, {}).get("pixel-level F1") for r in done] for name in sets},
                "minutes_per_run": statistics.fmean(r["seconds"] for r in done) / 60 if done else None,
                "ncl_grad_ratio": mean_std([(r.get("probe") or {}).get("ncl_grad_ratio") for r in done]),
                "ncl_grad_cosine": mean_std([(r.get("probe") or {}).get("ncl_grad_cosine") for r in done]),
            })
        tables[table] = {"title": title, "rows": out_rows}
    return tables


def markdown(tables: dict, command: str) -> str:
    lines = [f"Command: `{command}`", ""]
    for table in tables.values():
        sets = sorted({name for row in table["rows"] for name in row["stats"]}) or ["test"]
        for name in sets:
            lines += [f"### {table['title']}" + (f", test set {name}" if len(sets) > 1 else ""), "",
                      "| configuration | seeds | " + " | ".join(METRICS) + " | F1 per seed | minutes per run "
                      "| NCL gradient / rest | cosine |",
                      "| --- | --- | " + " | ".join("---" for _ in METRICS) + " | --- | --- | --- | --- |"]
            for row in table["rows"]:
                stats = row["stats"].get(name)
                cells = [fmt_ms(*stats[m]) if stats else "not run" for m in METRICS]
                per_seed = ", ".join("n/a" if v is None else f"{v:.4f}" for v in row["per_seed_f1"].get(name, []))
                minutes = f"{row['minutes_per_run']:.1f}" if row["minutes_per_run"] is not None else "n/a"
                seeds = " ".join(str(s) for s in row["seeds"]) or "none"
                probe = [fmt_ms(*row[k], digits=3) if not math.isnan(row[k][0]) else "-"
                         for k in ("ncl_grad_ratio", "ncl_grad_cosine")]
                lines.append(f"| {row['label']} | {seeds} | " + " | ".join(cells) + f" | {per_seed} | {minutes} | "
                             + " | ".join(probe) + " |")
            lines.append("")
    lines.append("Mean ± sample standard deviation over the seeds; IMDL-BenCo's pixel-level metrics "
                 "(per image, then averaged; threshold 0.5 for F1 and IOU), on the last epoch. "
                 "NCL gradient / rest: at the last checkpoint, over 4 training batches, the norm of "
                 "omega * grad L_NCL over the norm of the gradient of the rest of the loss (BCE or PC) with "
                 "respect to the network's weights; cosine: the cosine between the two gradients.")
    return "\n".join(lines) + "\n"


def plot(tables: dict, runs: dict, path: Path) -> None:
    """Validation F1, training loss and NCL term per epoch; one row per table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    panels = (("val_f1", "validation pixel-level F1"), ("train_loss", "training loss (each variant's own)"),
              ("train_ncl", "NCL term L_NCL (training)"))
    fig, axes = plt.subplots(len(tables), len(panels), figsize=(5 * len(panels), 3.6 * len(tables)), squeeze=False)
    for i, table in enumerate(tables.values()):
        for j, (key, title) in enumerate(panels):
            ax = axes[i][j]
            for k, row in enumerate(table["rows"]):  # one colour per configuration in every panel
                series, xs = [], None
                for seed in row["seeds"]:
                    curves = runs[(row["config"], seed)]["curves"]
                    if key == "val_f1":
                        name = next(iter(curves["val_f1"]), None)
                        ys, x = (curves["val_f1"][name] if name else []), curves["eval_epoch"]
                    else:
                        ys, x = curves[key], curves["epoch"]
                    if ys and all(v is not None for v in ys):
                        series.append(ys)
                        xs = x
                if not series:
                    continue
                n = min(len(s) for s in series)
                arr = np.array([s[:n] for s in series], dtype=float)
                x = np.array(xs[:n]) + 1
                ax.plot(x, arr.mean(0), label=row["label"], color=f"C{k}")
                if len(series) > 1:
                    ax.fill_between(x, arr.min(0), arr.max(0), alpha=0.2, color=f"C{k}")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if j == 0:
                ax.set_ylabel(table["title"].split(" (")[0], fontsize=9)
            if ax.lines:
                ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)




def run_ablation(args, base: TrainConfig, ctx: distributed.Context, out: Path, command: str) -> int:
    """Every run of the plan (`args`: tables, configs, seeds, eval_every, vit_backbone,
    output_dir), then the tables, JSON and plot in `out` (rank 0)."""
    names = plan(args.tables, args.configs)
    runs, failed, total = {}, [], len(names) * len(args.seeds)
    k = 0
    for name in names:
        for seed in args.seeds:
            k += 1
            config = run_config(base, name, seed, Path(args.output_dir) / name / f"seed{seed}", args.eval_every,
                                args.vit_backbone)
            code, record = run_one(config, name, seed, ctx, f"[{k}/{total}]")
            if code in (130, 143):
                if ctx.is_main:
                    print("interrupted: run the same command again to continue", file=sys.stderr)
                return code
            if code == cli.USAGE:
                return cli.USAGE
            if code != cli.OK:
                failed.append(f"{name} seed {seed}")
            runs[(name, seed)] = record
    if not ctx.is_main:
        return cli.FAILURE if failed else cli.OK
    tables = aggregate(args, runs)
    text = markdown(tables, command)
    write_atomic(out / "ablation.md", text)
    write_json(out / "ablation.json", {"command": command, "tables": tables,
                                       "runs": [dict(r, key=f"{c}/seed{s}") for (c, s), r in runs.items() if r]})
    plot(tables, {key: r for key, r in runs.items() if r and r.get("done")}, out / "ablation.png")
    print("\n" + text)
    print(f"wrote {out / 'ablation.md'}, {out / 'ablation.json'} and {out / 'ablation.png'}")
    if failed:
        cli.error(f"{len(failed)} run(s) failed: {', '.join(failed)} (their output is above); the tables leave them out")
        return cli.FAILURE
    return cli.OK
