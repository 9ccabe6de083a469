"""A kernel that forms NaN or inf in any lane under Triton's interpreter, masked lanes
included, fails its test (pyproject.toml's `filterwarnings`: numpy's warnings from
the interpreter are errors in every test, without a marker of their own)."""
import os

import pytest
import torch

from helpers import require_backend


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _masked_lanes_kernel(x_ptr, out_ptr, n, OP: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(x_ptr + offs, mask=m, other=float("-inf"))
        if OP == 0:  # -inf - -inf in the masked lanes
            y = x - x
        elif OP == 1:  # 1 / 0 in the masked lanes
            y = 1.0 / tl.where(m, x * x + 1.0, 0.0)
        elif OP == 2:  # exp overflows in the masked lanes (every lane is evaluated)
            y = tl.exp(tl.where(m, x, 1000.0))
        else:  # finite everywhere
            y = tl.where(m, x, 0.0) * 2.0
        tl.store(out_ptr + offs, tl.where(m, y, 0.0), mask=m)

    return _masked_lanes_kernel


@pytest.mark.parametrize("op,message", [(0, "invalid value"), (1, "divide by zero"), (2, "overflow")])
def test_masked_lane_nan_or_inf_fails(op, message, gen):
    require_backend("triton", "ncl_terms")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreter's warnings (a GPU forms NaN silently)")
    x = torch.randn(5, generator=gen)
    with pytest.raises(Exception, match=message):
        _kernel()[(1,)](x, torch.empty(5), 5, OP=op, BLOCK=8)


def test_finite_lanes_pass(gen):
    require_backend("triton", "ncl_terms")
    x = torch.randn(5, generator=gen)
    out = torch.empty(5)
    _kernel()[(1,)](x, out, 5, OP=3, BLOCK=8)
    torch.testing.assert_close(out, 2 * x)
