"""The one place where an implementation is chosen for an op.

`impl` is one of `auto | reference | triton | cuda`; when a call leaves it out
(`None`), the environment variable `NCL_FAST_BACKEND` decides, else `auto`.

* `reference` is the plain PyTorch code of `ncl_fast.reference`; it always works.
* `triton` / `cuda` are the fused backends. Each lives in its own module
  (`ncl_fast._triton_ops`, `ncl_fast._cuda_ops`) that exposes `OPS`, a dict
  op name -> function, and `supports(device) -> str | None` (None when it can
  run on that device, else the reason it cannot). A backend whose module is
  absent or fails to import is unavailable, with that error as the reason.
* Every function of `OPS` (and of the reference here) takes arguments that
  `ncl_fast.functional` has already checked, and checks nothing again:
  `patch_labels(mask, grid, tol)`, `ncl_terms(feat, labels, anchor_pos,
  anchor_neg, grid, tau)` with `grid` the `_checks.PatchGrid` the checks
  returned, `pc_bce(logits, mask, mu, radius)`, `pc_loss(logits_list, mask, mu,
  radius)`.
* An explicit request that cannot be met raises `BackendUnavailableError`
  with the reason. `auto` tries the preferred fused backend of the op and
  falls back to the reference, warning once per (op, reason); a command line
  says it once instead, before its progress bar (`announce_fallbacks`).
"""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import Callable

import torch

from . import reference

ENV_VAR = "NCL_FAST_BACKEND"
IMPLS = ("auto", "reference", "triton", "cuda")

_MODULES = {"triton": "ncl_fast._triton_ops", "cuda": "ncl_fast._cuda_ops"}

#: Fused backends `auto` tries, in order, per op.
PREFERENCE = {
    "patch_labels": ("triton",),
    "ncl_terms": ("triton",),
    "pc_bce": ("cuda",),
    "pc_loss": ("cuda",),
}

_REFERENCE_OPS: dict[str, Callable] = {
    "patch_labels": reference.patches.patch_labels_unchecked,
    "ncl_terms": reference.ncl.ncl_terms_unchecked,
    "pc_bce": reference.pc.pc_bce_unchecked,
    "pc_loss": reference.pc.pc_loss_unchecked,
}

_loaded: dict[str, ModuleType | str] = {}
_warned: set[tuple[str, str]] = set()


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this op here."""


def requested_impl(impl: str | None) -> str:
    """Resolve `None` through the environment and validate the name."""
    if impl is None:
        impl = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        source = f"the environment variable {ENV_VAR}"
    else:
        source = "impl"
    if impl not in IMPLS:
        raise ValueError(f"{source} must be one of {', '.join(IMPLS)}; got {impl!r}")
    return impl


def _load(backend: str) -> ModuleType | str:
    """The backend's module, or the reason it cannot be imported."""
    _import(backend)
    return _loaded[backend]


@torch.compiler.assume_constant_result
def _import(backend: str) -> bool:
    """Import the backend's module once, recording it (or why it failed) in `_loaded`.

    Under `torch.compile` this runs as plain Python while the call is traced (an
    import cannot be traced); its result is a constant of the graph, so the first
    fused call of a fresh interpreter compiles with `fullgraph=True`.
    """
    if backend not in _loaded:
        try:
            _loaded[backend] = importlib.import_module(_MODULES[backend])
        except ModuleNotFoundError as err:
            if err.name == _MODULES[backend]:
                _loaded[backend] = f"this build of ncl_fast has no {backend} backend"
            else:
                _loaded[backend] = f"importing it failed: {err}"
        except Exception as err:  # a broken build must not break `import ncl_fast`
            _loaded[backend] = f"importing it failed: {type(err).__name__}: {err}"
    return True


def unavailable_reason(backend: str, op: str, device: torch.device) -> str | None:
    """None if `backend` can run `op` on `device`, else why not."""
    if backend == "reference":
        return None
    mod = _load(backend)
    if isinstance(mod, str):
        return mod
    if op not in mod.OPS:
        return f"the {backend} backend has no {op}"
    return mod.supports(device)


def choose(op: str, impl: str | None, device: torch.device) -> tuple[str, Callable]:
    """Return `(backend name, function)` for `op` on tensors living on `device`."""
    impl = requested_impl(impl)
    if impl == "reference":
        return "reference", _REFERENCE_OPS[op]
    if impl != "auto":
        reason = unavailable_reason(impl, op, device)
        if reason is not None:
            raise BackendUnavailableError(f"impl={impl!r} cannot run {op} on {device}: {reason}")
        return impl, _load(impl).OPS[op]
    backend, fn, why = _auto(op, device)
    if why is not None and (op, why) not in _warned:
        _warned.add((op, why))
        warnings.warn(f"ncl_fast: {op} runs the PyTorch reference ({why})", RuntimeWarning, stacklevel=3)
    return backend, fn


def _auto(op: str, device: torch.device) -> tuple[str, Callable, str | None]:
    """What `auto` runs for `op` on `device`: (backend, function, why it fell back or None)."""
    reasons = []
    for backend in PREFERENCE[op]:
        if backend == "triton" and device.type != "cuda":
            # the interpreter runs CPU tensors, but far slower than the reference
            reasons.append("triton: used automatically for CUDA tensors only")
            continue
        reason = unavailable_reason(backend, op, device)
        if reason is None:
            return backend, _load(backend).OPS[op], None
        reasons.append(f"{backend}: {reason}")
    return "reference", _REFERENCE_OPS[op], "; ".join(reasons)


def announce_fallbacks(ops, impl: str | None, device: torch.device) -> str | None:
    """For a command line: one line saying which of `ops` `auto` will run on the
    reference on `device` and why (None when there is nothing to say), and no
    per-op RuntimeWarning later (which would break a progress bar). Library calls
    that never ask keep the warning once per op."""
    if requested_impl(impl) != "auto":
        return None
    by_reason: dict[str, list[str]] = {}
    for op in ops:
        _, _, why = _auto(op, device)
        if why is not None:
            _warned.add((op, why))
            by_reason.setdefault(why, []).append(op)
    if not by_reason:
        return None
    parts = [f"{', '.join(names)} ({why})" for why, names in by_reason.items()]
    return "loss backend: the PyTorch reference runs " + "; ".join(parts) + " (expected on a CPU; results are the same)"
