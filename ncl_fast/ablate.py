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
options of other values (compared as values, so spelling, order and options
that cannot change results such as workers or progress bars do not count) is
refused with its name. Under
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
import sys
from pathlib import Path

from . import cli, distributed
from .engine.ablation import CONFIGS, TABLES, plan, run_ablation, run_config
from .engine.config import resolve, train_parser

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


@cli.command
def main(argv=None) -> int:
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    if args.vit_backbone is None:
        args.vit_backbone = "vit_demo" if args.preset == "demo" else "vit_base"
    if len(set(args.seeds)) != len(args.seeds):
        ap.error(f"--seeds repeats a seed: {' '.join(map(str, args.seeds))}")
    names = plan(args.tables, args.configs)
    if not names:
        ap.error(f"--configs {' '.join(args.configs)} are in none of the tables {' '.join(args.tables)}")
    own = [a for a in extra if a.split("=")[0] in OWN_OPTIONS]
    if own:
        raise cli.UsageError(f"{' '.join(own)}: the runner sets this for every run; use --configs, --seeds, "
                             f"--output_dir or --eval_every instead")
    # every other option is train's: parsed (exit 2 on a bad one) into the base configuration of every run
    base = resolve(["--preset", args.preset] + (["--epochs", str(args.epochs)] if args.epochs else [])
                   + extra + (["--no-progress"] if args.no_progress else []),
                   train_parser(prog="python -m ncl_fast.ablate (train options)"))
    problems = []
    for name in names:  # the ResNet and the ViT rows take different options: check each before any work
        for p in run_config(base, name, args.seeds[0], Path(args.output_dir), 1, args.vit_backbone).problems():
            if f"{name}: {p}" not in problems:
                problems.append(f"{name}: {p}")
    if problems:
        raise cli.UsageError("; ".join(problems))
    out = cli.check_output_dir(args.output_dir, "--output_dir")
    command = "python -m ncl_fast.ablate " + " ".join(sys.argv[1:] if argv is None else argv)
    ctx = distributed.setup(base.device)
    try:
        return run_ablation(args, base, ctx, out, command)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
