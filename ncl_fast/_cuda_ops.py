"""The C++/CUDA extension backend (`impl="cuda"`): `pc_bce` and `pc_loss`.

The kernels are registered by the extension as `torch.ops.ncl_fast.pc_loss_fwd`
(every scale at once: the loss, and float64 stats `[sum_E l, |E|, sum l]` per
scale) and `torch.ops.ncl_fast.pc_loss_bwd` (every scale's gradient, its
coefficients read from the stats on the device: no host synchronization). On
CUDA each is two launches: the mask read once into bits (`csrc/pc_bits.h`), then
one kernel over every scale's tiles that counts each cell's window in the bits. The extension also registers the autograd of `pc_loss_fwd`
in C++ (`csrc/pc_bce_autograd.cpp`): a forward and backward stay in the
dispatcher, with no Python on the way. This module adds the fake (meta) kernels
so `torch.compile` traces through them. CPU tensors run the extension's C++
kernel, CUDA tensors its CUDA kernel.

Loading: the extension built by `pip install` (`ncl_fast._C`); failing that, a
just-in-time build with ninja (`torch.utils.cpp_extension.load`). If both fail,
importing this module raises ImportError with the build error, which
`ncl_fast._backend` reports.
"""
from __future__ import annotations

import functools
import os

import torch

from ._ext_sources import extension_config

#: Mask dtypes the kernels read directly; others are binarized to bool first.
MASK_DTYPES = (torch.bool, torch.uint8, torch.float32, torch.float16, torch.bfloat16)
#: Predictions per launch (the kernels take their scales as one argument struct).
MAX_SCALES = 4


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


@torch.library.register_fake("ncl_fast::pc_loss_fwd")
def _pc_loss_fwd_fake(logits, mask, mu, radius):
    loss_dtype = torch.float64 if logits[0].dtype == torch.float64 else torch.float32
    return logits[0].new_empty((), dtype=loss_dtype), logits[0].new_empty(len(logits), 3, dtype=torch.float64)


@torch.library.register_fake("ncl_fast::pc_loss_bwd")
def _pc_loss_bwd_fake(grad_loss, logits, mask, stats, mu, radius):
    return [torch.empty_like(z) for z in logits]


def supports(device: torch.device) -> str | None:
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        return None if BUILD_INFO.get("with_cuda") else "the extension was built without CUDA (CPU-only build)"
    return f"the extension has no kernel for {device.type} tensors"


_pc_loss_fwd = torch.ops.ncl_fast.pc_loss_fwd.default  # the overload itself: no packet resolution per call


def pc_loss(logits_list: list, mask: torch.Tensor, mu: float, radius: int) -> torch.Tensor:
    """`ncl_fast.functional.pc_loss` on checked inputs: every scale in one fused pass each way.

    The per-call Python work is kept small (the kernels take microseconds): the
    inputs were checked once, by `functional`, and the op's autograd is in C++.
    """
    if len({z.dtype for z in logits_list}) > 1:  # one launch reads one dtype
        common = functools.reduce(torch.promote_types, (z.dtype for z in logits_list))
        logits_list = [z.to(common) for z in logits_list]
    if mask.dtype not in MASK_DTYPES:
        mask = mask > 0.5
    if len(logits_list) <= MAX_SCALES:  # the usual case: one call
        return _pc_loss_fwd(logits_list, mask, float(mu), radius)[0]
    total = None
    for start in range(0, len(logits_list), MAX_SCALES):  # one call covers up to 4 scales
        loss = _pc_loss_fwd(logits_list[start : start + MAX_SCALES], mask, float(mu), radius)[0]
        total = loss if total is None else total + loss
    return total


def pc_bce(logits: torch.Tensor, mask: torch.Tensor, mu: float, radius: int) -> torch.Tensor:
    """`ncl_fast.functional.pc_bce` on checked inputs: one prediction."""
    return pc_loss([logits], mask, mu, radius)


OPS = {"pc_bce": pc_bce, "pc_loss": pc_loss}
