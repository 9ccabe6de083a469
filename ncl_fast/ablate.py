"""`python -m ncl_fast.ablate`: the paper's ablations at any scale, for an equal budget.

Trains every configuration of the chosen tables with the same data, the same
number of steps and the same seeds, evaluates each run on the test set(s) every
epoch, and writes, in `--output_dir`:

* `ablation.md`: per table, the mean +- std over the seeds of pixel-level F1,
  AUC and IOU (IMDL-BenCo's definitions, threshold 0.5), the F1 of each seed,
  and the minutes each run took;
* `ablation.json`: the same, plus every run's per-epoch curves;
* `ablation.png`: validation F1, training loss and the NCL term per epoch, one
  line per configuration (mean over seeds, min-max band).

The tables (paper section 4):

* `variants` (Table 5): base (plain BCE), pivot (+ NCL), full (+ NCL + PC loss);
* `stages` (Table 6): the Pivot after stage 1, 2 or 5 (variant full);
* `backbones` (Table 4): the ResNet and a ViT trained from scratch, each without
  and with NCL (variants base, pivot and full).

A run that appears in several tables (full at stage 1, say) is trained once.
Each run lives in `<output_dir>/<config>/seed<k>/` (checkpoints, `log.txt`,
`run.json`). Running the same command again skips the finished runs and
resumes an interrupted one exactly (`--resume auto`); a run folder made with
other options is refused with its name. Under
`torchrun --standalone --nproc_per_node=N -m ncl_fast.ablate ...` every run is
data-parallel over the N processes.

Options this command does not know go to `python -m ncl_fast.train` for every
run (`--data_path`, `--test_data_path`, `--image_size`, `--batch_size`,
`--lr`, `--backbone` of the ResNet rows, ...); without `--data_path` the runs
use the embedded synthetic set.

Exit status: 0 done, 1 a run failed (the others still ran), 2 bad input,
130 interrupted (the running run saved a checkpoint; run the command again).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

from . import cli, distributed

METRICS = ("pixel-level F1", "pixel-level AUC", "pixel-level IOU")

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

#: options the runner sets itself for every run
OWN_OPTIONS = ("--variant", "--pivot_stage", "--pivot-stage", "--seed", "--output_dir", "--output-dir",
               "--log_dir", "--log-dir", "--resume", "--test_period", "--test-period", "--max_steps", "--max-steps")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ncl_fast.ablate", description=__doc__,
                                 formatter_class=cli.HelpFormatter)
    cli.add_version_option(ap)
    A = ap.add_argument
    A("--tables", nargs="+", default=list(TABLES), choices=list(TABLES),
      help=f"tables to run (default: all: {' '.join(TABLES)})")
    A("--configs", nargs="+", default=None, choices=list(CONFIGS),
      help="run only these configurations of the chosen tables (default: every one)")
    A("--seeds", nargs="+", type=cli.nonnegative_int, default=[0, 1, 2], help="(default: 0 1 2)")
    A("--output_dir", "--output-dir", default="runs/ablation", help="(default: runs/ablation)")
    A("--preset", default="demo", choices=("demo", "paper"), help="train's preset for every run (default: demo)")
    A("--epochs", type=cli.positive_int, default=None, help="epochs of every run (default: the preset's)")
    A("--vit_backbone", "--vit-backbone", default=None,
      help="the ViT of the backbones table (default: vit_demo with --preset demo, vit_base with paper)")
    A("--eval_every", "--eval-every", type=cli.positive_int, default=1,
      help="evaluate every N epochs (the F1 curves' resolution; default: 1)")
    A("--no-progress", action="store_true", help="no progress bars")
    return ap


def plan(args: argparse.Namespace) -> list[str]:
    """The configurations to train, each once, in table order."""
    names = []
    for table in args.tables:
        for _, config in TABLES[table][1]:
            if config not in names and (args.configs is None or config in args.configs):
                names.append(config)
    return names


def train_argv(args: argparse.Namespace, extra: list[str], config: str, seed: int, run_dir: Path) -> list[str]:
    """The `ncl_fast.train` options of one run (without --resume)."""
    opts = dict(CONFIGS[config])
    if opts.get("backbone") == "VIT":  # the ViT rows: --vit_backbone replaces a --backbone given for the ResNet rows
        opts["backbone"] = args.vit_backbone
        for name in ("--backbone", "--width"):  # --width is the ResNet's stem
            extra = without_option(extra, name)
    argv = ["--preset", args.preset]
    for key, value in opts.items():
        argv += [f"--{key}", str(value)]
    if args.epochs is not None:
        argv += ["--epochs", str(args.epochs)]
    argv += ["--seed", str(seed), "--test_period", str(args.eval_every), "--output_dir", str(run_dir)]
    return argv + list(extra)


def without_option(argv: list[str], name: str) -> list[str]:
    """`argv` less `name VALUE` and `name=VALUE`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_metrics(record: dict) -> dict:
    """{test set: {metric: value}} from one log.txt record (one set: `test_<metric>`;
    several: `test_<set>_<metric>`)."""
    out: dict = {}
    for key, value in record.items():
        if not key.startswith("test_"):
            continue
        for metric in METRICS:
            if key == f"test_{metric}":
                out.setdefault("test", {})[metric] = value
            elif key.endswith(f"_{metric}"):
                out.setdefault(key[len("test_"): -len(metric) - 1], {})[metric] = value
    return out


def summarize_run(run_dir: Path) -> dict:
    """The final metrics and the per-epoch curves of a finished run, from its log.txt."""
    log = read_log(run_dir / "log.txt")
    last = {}
    for record in log:  # a resumed run may repeat an epoch: keep the last record of each
        last[record["epoch"]] = record
    records = [last[e] for e in sorted(last)]
    evaluated = [r for r in records if test_metrics(r)]
    curves = {
        "epoch": [r["epoch"] for r in records],
        "train_loss": [r.get("train_loss") for r in records],
        "train_ncl": [r.get("train_ncl") for r in records],
        "eval_epoch": [r["epoch"] for r in evaluated],
        "val_f1": {name: [test_metrics(r)[name].get("pixel-level F1") for r in evaluated]
                   for name in (test_metrics(evaluated[-1]) if evaluated else {})},
    }
    return {"final": test_metrics(evaluated[-1]) if evaluated else {}, "curves": curves}


def gradient_share(run_dir: Path, ctx: distributed.Context, batches: int = 4) -> dict | None:
    """How much the NCL term moves the network, at a run's last checkpoint: over `batches`
    training batches (fixed draw), the norm of `omega * grad L_NCL` over the norm of the
    gradient of the rest of the loss (BCE or PC), both with respect to the network's weights,
    and the cosine between the two. None for the variant without NCL."""
    import torch

    from .checkpoint import newest_readable
    from .data import ForgeryDataset, load_entries
    from .evaluate import model_from_checkpoint
    from .model import LossConfig

    path, ckpt, _ = newest_readable(run_dir)
    a = ckpt["args"]
    if a["variant"] == "base":
        return None
    model, _ = model_from_checkpoint(str(path), ctx.device)
    model.criterion.config = LossConfig(variant=a["variant"], omega=a["omega"], mu=a["mu"],
                                        radius=a["edge_mask_width"], patch_px=a["patch_px"], tau=a["tau"],
                                        tol=a["tol"], impl=a["impl"])
    model.train()  # BatchNorm on batch statistics, as in training; dropout off: the same draw, the same figure
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    entries, _ = load_entries(a["data_path"])
    ds = ForgeryDataset(entries, a["image_size"], a["train_mode"], train=True, invert_masks=a["invert_masks"],
                        seed=a["seed"])
    params = [p for n, p in model.named_parameters() if n.startswith("net.")]
    draw = torch.Generator().manual_seed(0)
    ratios, cosines = [], []
    for _ in range(batches):
        items = [ds[i] for i in torch.randperm(len(ds), generator=draw)[: a["batch_size"]].tolist()]
        image = torch.stack([it["image"] for it in items]).to(ctx.device)
        mask = torch.stack([it["mask"] for it in items]).to(ctx.device)
        parts = model.criterion(model.net(image), mask, model.pivot)
        rest = parts["pc"] if "pc" in parts else parts["bce"]

        def flat(loss, retain):
            grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
            return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                              for g, p in zip(grads, params)])

        g_rest, g_ncl = flat(rest, True), flat(a["omega"] * parts["ncl"], False)
        ratios.append((g_ncl.norm() / g_rest.norm()).item())
        cosines.append(torch.nn.functional.cosine_similarity(g_ncl, g_rest, dim=0).item())
    return {"ncl_grad_ratio": statistics.fmean(ratios), "ncl_grad_cosine": statistics.fmean(cosines),
            "batches": batches, "checkpoint": str(path)}


def write_json(path: Path, obj) -> None:
    """Atomically: a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(cli.json_safe(obj), indent=1, allow_nan=False))
    os.replace(tmp, path)


def run_one(args, extra, config: str, seed: int, ctx: distributed.Context, label: str) -> tuple[int, dict | None]:
    """Train (or resume, or skip) one run; returns (exit code, its record)."""
    from . import train

    run_dir = Path(args.output_dir) / config / f"seed{seed}"
    argv = train_argv(args, extra, config, seed, run_dir)
    state_path = run_dir / "run.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    if state is not None and state.get("argv") != argv:
        raise cli.UsageError(
            f"{run_dir} holds a run made with other options ({' '.join(state.get('argv', []))}); this command "
            f"would train it with {' '.join(argv)}: choose another --output_dir, or delete {run_dir}")
    if state is not None and state.get("done"):
        if ctx.is_main:
            print(f"{label} {config}, seed {seed}: finished before, skipped", flush=True)
            if "probe" not in state:  # a run finished by an older version of this command
                state["probe"] = gradient_share(run_dir, ctx)
                write_json(state_path, state)
        return cli.OK, state
    resume = any(run_dir.glob("checkpoint-*.pth"))
    if ctx.is_main:
        print(f"\n{label} {config}, seed {seed}: {'resuming' if resume else 'training'} in {run_dir}", flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        state = state or {"config": config, "seed": seed, "argv": argv, "seconds": 0.0, "done": False}
        write_json(state_path, state)
    distributed.barrier(ctx)
    quiet = ["--no-progress"] if args.no_progress else []  # not part of the run's identity
    targs = train.resolve_args(argv + quiet + (["--resume", "auto"] if resume else []))
    t0 = time.perf_counter()
    code = train.train(targs, ctx)
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
                "label": label, "config": config, "argv": done[0]["argv"] if done else None,
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
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def check_extra(args, extra: list[str]) -> None:
    """Reject options the runner sets itself, and let train check the rest now (exit 2, nothing trained)."""
    from . import train

    own = [a for a in extra if a.split("=")[0] in OWN_OPTIONS]
    if own:
        raise cli.UsageError(f"{' '.join(own)}: the runner sets this for every run; use --configs, --seeds, "
                             f"--output_dir or --eval_every instead")
    for config in plan(args):  # the ResNet and the ViT rows take different options
        train.resolve_args(train_argv(args, extra, config, args.seeds[0], Path(args.output_dir) / "check"))


@cli.command
def main(argv=None) -> int:
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    if args.vit_backbone is None:
        args.vit_backbone = "vit_demo" if args.preset == "demo" else "vit_base"
    if len(set(args.seeds)) != len(args.seeds):
        ap.error(f"--seeds repeats a seed: {' '.join(map(str, args.seeds))}")
    names = plan(args)
    if not names:
        ap.error(f"--configs {' '.join(args.configs)} are in none of the tables {' '.join(args.tables)}")
    check_extra(args, extra)
    out = cli.check_output_dir(args.output_dir, "--output_dir")
    command = "python -m ncl_fast.ablate " + " ".join(sys.argv[1:] if argv is None else argv)
    ctx = distributed.setup(next((extra[i + 1] for i, a in enumerate(extra[:-1]) if a == "--device"), None))
    runs, failed, total = {}, [], len(names) * len(args.seeds)
    try:
        k = 0
        for config in names:
            for seed in args.seeds:
                k += 1
                code, record = run_one(args, extra, config, seed, ctx, f"[{k}/{total}]")
                if code == cli.INTERRUPTED:
                    if ctx.is_main:
                        print("interrupted: run the same command again to continue", file=sys.stderr)
                    return cli.INTERRUPTED
                if code == cli.USAGE:
                    return cli.USAGE
                if code != cli.OK:
                    failed.append(f"{config} seed {seed}")
                runs[(config, seed)] = record
    finally:
        distributed.teardown()
    if not ctx.is_main:
        return cli.FAILURE if failed else cli.OK
    tables = aggregate(args, runs)
    text = markdown(tables, command)
    (out / "ablation.md.tmp").write_text(text)
    os.replace(out / "ablation.md.tmp", out / "ablation.md")
    write_json(out / "ablation.json", {"command": command, "tables": tables,
                                       "runs": [dict(r, key=f"{c}/seed{s}") for (c, s), r in runs.items() if r]})
    plot(tables, {key: r for key, r in runs.items() if r and r.get("done")}, out / "ablation.png")
    print("\n" + text)
    print(f"wrote {out / 'ablation.md'}, {out / 'ablation.json'} and {out / 'ablation.png'}")
    if failed:
        cli.error(f"{len(failed)} run(s) failed: {', '.join(failed)} (their output is above); the tables leave them out")
        return cli.FAILURE
    return cli.OK


if __name__ == "__main__":
    sys.exit(main())
