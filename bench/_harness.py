"""Shared benchmark harness: device facts, timing quantiles, peak memory, markdown.

Timings come from `triton.testing.do_bench` (CUDA events, L2 flushed between
runs) as p20 / p50 / p80 in milliseconds. Benchmarks print; nothing is asserted.
"""
from __future__ import annotations

import datetime
import platform
from typing import Callable

import torch


def device_header() -> str:
    """One markdown line: card, versions, date."""
    import triton

    if torch.cuda.is_available():
        card = torch.cuda.get_device_name()
        sm = "sm_%d%d" % torch.cuda.get_device_capability()
        cuda = torch.version.cuda
    else:
        card, sm, cuda = f"CPU ({platform.processor() or platform.machine()})", "-", "-"
    return (
        f"**{card}** ({sm}), torch {torch.__version__}, Triton {triton.__version__}, CUDA {cuda}, "
        f"Python {platform.python_version()}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )


def bench_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> tuple[float, float, float]:
    """(p20, p50, p80) milliseconds of `fn()` on the GPU."""
    import triton.testing

    q = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.2, 0.5, 0.8])
    return tuple(float(x) for x in q)


def peak_extra_mb(fn: Callable[[], object]) -> float:
    """Peak memory allocated while `fn()` runs, above what was allocated before, in MB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e6


def fmt_q(q: tuple[float, float, float]) -> str:
    return f"{q[1]:.3f} ({q[0]:.3f}-{q[2]:.3f})"


def table(headers: list[str], rows: list[list[object]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)

