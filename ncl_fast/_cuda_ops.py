"""The C++/CUDA extension backend (`impl="cuda"`): `pc_bce` and `pc_loss`.

The kernels are registered by the extension as `torch.ops.ncl_fast.pc_bce_stats`
(forward: float64 `[sum_E l, |E|, sum l]`) and `torch.ops.ncl_fast.pc_bce_backward`.
This module adds their fake (meta) kernels and autograd so `torch.compile`
traces through them, and forms the loss from the stats on the device (no host
synchronization). CPU tensors run the extension's C++ kernel, CUDA tensors its
CUDA kernel.

Loading: the extension built by `pip install` (`ncl_fast._C`); failing that, a
just-in-time build with ninja (`torch.utils.cpp_extension.load`). If both fail,
importing this module raises ImportError with the build error, which
`ncl_fast._backend` reports.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from . import _checks
from ._ext_sources import extension_config
from .reference.ncl import compute_dtype

#: Mask dtypes the kernels read directly; others are binarized to bool first.
MASK_DTYPES = (torch.bool, torch.uint8, torch.float32, torch.float16, torch.bfloat16)


def _load_extension():
    try:
        from . import _C  # built by setup.py

        return _C
    except ImportError as built_err:
        first = built_err
    from torch.utils import cpp_extension

    cfg = extension_config(cpp_extension.CUDA_HOME, absolute=True)
    macros = [f"-D{name}" for name, _ in cfg["define_macros"]]
    try:
        return cpp_extension.load(
            name="ncl_fast_C",
            sources=cfg["sources"],
            extra_cflags=cfg["cxx_flags"] + macros,
            extra_cuda_cflags=cfg["nvcc_flags"] + macros,
            with_cuda=cfg["with_cuda"],
            verbose=os.environ.get("NCL_FAST_VERBOSE_BUILD", "0") == "1",
        )
    except Exception as jit_err:
        raise ImportError(
            f"the ncl_fast C++/CUDA extension is not built ({first}) and building it now failed: {jit_err}"
        ) from jit_err


_C = _load_extension()
BUILD_INFO: dict = dict(_C.build_info())


@torch.library.register_fake("ncl_fast::pc_bce_stats")
def _pc_bce_stats_fake(logits, mask, radius):
    return logits.new_empty(3, dtype=torch.float64)


@torch.library.register_fake("ncl_fast::pc_bce_backward")
def _pc_bce_backward_fake(logits, mask, coef, radius):
    return torch.empty_like(logits)


def _pc_bce_stats_setup(ctx, inputs, output):
    logits, mask, radius = inputs
    ctx.save_for_backward(logits, mask)
    ctx.radius = radius


def _pc_bce_stats_backward(ctx, grad_stats):
    logits, mask = ctx.saved_tensors
    # d stats / dz: sum_E l -> l'(z) [in E], sum l -> l'(z); |E| has no gradient.
    coef = grad_stats[[0, 2]]
    grad = torch.ops.ncl_fast.pc_bce_backward(logits, mask, coef, ctx.radius)
    return grad, None, None


torch.library.register_autograd(
    "ncl_fast::pc_bce_stats", _pc_bce_stats_backward, setup_context=_pc_bce_stats_setup
)


def supports(device: torch.device) -> str | None:
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        return None if BUILD_INFO.get("with_cuda") else "the extension was built without CUDA (CPU-only build)"
    return f"the extension has no kernel for {device.type} tensors"


def pc_bce(logits: torch.Tensor, mask: torch.Tensor, mu: float = 0.9, radius: int = 2) -> torch.Tensor:
    """Same contract as `ncl_fast.reference.pc_bce`, one fused pass each way."""
    _checks.check_mask(mask)
    _checks.check_pc_args(mu, radius)
    _checks.check_logits(logits, mask)
    if mask.dtype not in MASK_DTYPES:
        mask = mask > 0.5
    stats = torch.ops.ncl_fast.pc_bce_stats(logits, mask, radius).to(compute_dtype(logits.dtype))
    band_sum, band_n, total = stats.unbind()
    return mu * band_sum / band_n.clamp(min=1) + (1.0 - mu) * total / logits.numel()


def pc_loss(logits_list: Sequence[torch.Tensor], mask: torch.Tensor, mu: float = 0.9, radius: int = 2) -> torch.Tensor:
    if len(logits_list) == 0:
        raise ValueError("pc_loss needs at least one prediction; pass the model's logits list")
    return sum(pc_bce(z, mask, mu, radius) for z in logits_list)


OPS = {"pc_bce": pc_bce, "pc_loss": pc_loss}
