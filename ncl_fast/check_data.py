"""`python -m ncl_fast.check_data PATH [--invert-masks]`: a report on a dataset
(Tp/Gt folder, JSON list, or a test-set map): counts, and every problem that
would stop training (missing, unreadable or corrupt files, count and size
mismatches, images too large to decode safely) or spoil it (0/1-valued or
coloured masks, mismatched names).

Exit status (as every command, see `ncl_fast.cli`): 0 when every dataset is
usable, 2 when one is not (bad input), 130 when interrupted.
"""
from __future__ import annotations

import argparse
import sys

from . import cli
from .data.report import report_one
from .data.sources import DatasetError, list_test_sets


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ncl_fast.check_data", description=__doc__,
                                 formatter_class=cli.HelpFormatter)
    cli.add_version_option(ap)
    ap.add_argument("path", help="Tp/Gt folder, JSON list, or JSON map {name: path}")
    ap.add_argument("--invert-masks", "--invert_masks", action="store_true",
                    help="masks are black = tampered (raw NIST16)")
    cli.add_large_images_option(ap.add_argument)
    return ap


@cli.command
def main(argv=None) -> int:
    args = cli.parse_args(build_parser(), argv)
    try:
        sets = list_test_sets(args.path)
    except DatasetError as err:
        print(f"ERROR {err}")
        return cli.USAGE
    ok = [report_one(name, path, args.invert_masks) for name, path in sets.items()]
    return cli.OK if all(ok) else cli.USAGE


if __name__ == "__main__":
    sys.exit(main())
