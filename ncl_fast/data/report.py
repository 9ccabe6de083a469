"""The dataset report of `python -m ncl_fast.check_data`: counts, and every problem
that would stop training or spoil it."""
from __future__ import annotations

import numpy as np

from .sources import DatasetError, check_entries, list_dataset, path_rule, read_mask


def report_one(name: str, path: str, invert: bool) -> bool:
    print(f"== {name}: {path}")
    try:
        entries, warnings = list_dataset(path)
    except DatasetError as err:
        print(f"  ERROR {err}")
        return False
    rule = path_rule(path)
    if rule:
        print(f"  {rule}")
    rep = check_entries(entries)
    rep.warnings = warnings + rep.warnings
    print(f"  {len(entries)} images: {rep.tampered} with tampered pixels, {rep.authentic} authentic")
    if not rep.errors:
        fracs = [read_mask(e.mask, invert).mean() for e in entries if e.mask is not None]
        if fracs:
            q = np.percentile(fracs, [0, 50, 100])
            print(f"  tampered area per image: min {q[0]:.3f}, median {q[1]:.3f}, max {q[2]:.3f}"
                  + (" (masks inverted)" if invert else ""))
            if invert is False and q[1] > 0.5:
                print("  note: most pixels read as tampered; if black means tampered here (NIST16), "
                      "use --invert-masks")
    for e in rep.errors:
        print(f"  ERROR {e}")
    for w in rep.warnings:
        print(f"  warning: {w}")
    print(f"  {'OK' if not rep.errors else f'{len(rep.errors)} error(s)'}, {len(rep.warnings)} warning(s)")
    return not rep.errors
