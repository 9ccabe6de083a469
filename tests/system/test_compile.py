"""Compile safety of the custom ops and of the training step.

* every custom op (Triton and extension alike) passes `torch.library.opcheck`
  (schema, fake kernel with the real strides, autograd registration, AOT dispatch)
  with contiguous, channels_last, transposed and expanded inputs;
* `dynamic=True` compiles the Triton NCL op once for two map sizes (no guard on a
  shape from the workspace's size);
* the first `impl="triton"` call of a fresh interpreter compiles under
  `torch.compile(fullgraph=True)` with inductor (no import inside traced code);
* the training step traces with no graph break at the losses and no recompile
  across batches with different masks."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import random_mask, require_backend
from ncl_fast import _backend, functional
from ncl_fast.model import LossConfig, NCLModel

# NaN or inf formed in any lane, masked ones included, is an error (the interpreter
# computes masked lanes too: numpy's warning is how they show)
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings(
    "error:invalid value encountered:RuntimeWarning",
    "error:overflow encountered:RuntimeWarning",
    "error:divide by zero encountered:RuntimeWarning",
)]

FUSED = {"patch_labels": "triton", "ncl_terms": "triton", "pc_bce": "cuda", "pc_loss": "cuda"}
LAYOUTS = ["contiguous", "channels_last", "transposed", "expanded"]


def in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """`t` (B, C, h, w) or (B, D) with the same values in another memory layout."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.to(memory_format=torch.channels_last) if t.dim() == 4 else t
    if layout == "transposed":  # the last two axes (every axis for a (B, D) anchor) reversed in memory
        return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() == 4 else t.t().contiguous().t()
    # expanded: one image broadcast over the batch (stride 0 along it)
    return t[:1].expand_as(t)


def _ncl_op_args(layout, gen, h=6, w=8, p=2):
    B, C = 2, 3
    feat = in_layout(torch.randn(B, C, h, w, generator=gen) + 0.5, layout)
    mask = random_mask(B, 2 * h, 2 * w, "blobs", gen, window=(2 * p, 2 * p))
    if layout == "expanded":
        mask = mask[:1].expand_as(mask)
    labels = functional.patch_labels(mask, (h, w), p, impl="reference")
    D = C * p * p
    a_pos = in_layout(torch.randn(B, D, generator=gen), layout)
    a_neg = in_layout(torch.randn(B, D, generator=gen), layout)
    return feat, mask, labels, a_pos, a_neg


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_triton_ops(layout, gen):
    require_backend("triton", "ncl_terms")
    from ncl_fast import _triton_ops
    from ncl_fast.kernels import ncl_terms as k
    from ncl_fast.kernels import patch_labels as kl

    h, w, p = 6, 8, 2
    feat, mask, labels, a_pos, a_neg = _ncl_op_args(layout, gen, h, w, p)
    R, Q = h // p, w // p
    slot = k.workspace_slot(R * Q)
    mask_l = in_layout(mask, layout)
    torch.library.opcheck(_triton_ops._patch_labels_op, (mask_l, 2 * p, 2 * p, R, Q, 0.0))
    args = [feat.requires_grad_(), labels, a_pos.requires_grad_(), a_neg.requires_grad_(), p, R, Q, 0.1, slot]
    torch.library.opcheck(_triton_ops._ncl_terms_op, args)
    counts, perm = kl.patch_lists_fwd(labels)
    _, saved = k.ncl_terms_fwd(feat.detach(), a_pos.detach(), a_neg.detach(), counts, perm, p, (R, Q), 0.1, slot)
    grad_terms = torch.rand(2, 3, generator=gen) + 0.5
    bwd_args = (grad_terms, feat.detach(), a_pos.detach(), a_neg.detach(), counts, perm, list(saved), p, R, Q, 0.1)
    torch.library.opcheck(_triton_ops._ncl_terms_bwd_op, bwd_args)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_extension_ops(layout, gen):
    require_backend("cuda", "pc_loss")
    mask = in_layout(random_mask(2, 16, 24, "blobs", gen), layout) > 0.5
    preds = [in_layout(torch.randn(2, 1, 16 // s, 24 // s, generator=gen), layout).requires_grad_() for s in (4, 1)]
    torch.library.opcheck(torch.ops.ncl_fast.pc_loss_fwd, (preds, mask, 0.9, 2))
    _, stats = torch.ops.ncl_fast.pc_loss_fwd(preds, mask, 0.9, 2)
    detached = [z.detach() for z in preds]
    torch.library.opcheck(torch.ops.ncl_fast.pc_loss_bwd, (torch.tensor(1.3), detached, mask, stats, 0.9, 2))


def test_triton_op_compiles_once_for_two_map_sizes(gen):
    require_backend("triton", "ncl_terms")
    from torch._dynamo.testing import CompileCounterWithBackend

    def loss_fn(feat, labels, a_pos, a_neg):
        return functional.ncl_terms(feat, labels, a_pos, a_neg, 2, 0.1, impl="triton").sum()

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss_fn, backend=counter, dynamic=True, fullgraph=True)
    compiles = []
    for h, w in ((6, 10), (10, 12)):  # L = 15, 30; D = 12 (no size equal to another)
        feat, _, labels, a_pos, a_neg = _ncl_op_args("contiguous", gen, h, w)
        leaves = [t.clone().requires_grad_() for t in (feat, a_pos, a_neg)]
        got = compiled(leaves[0], labels, leaves[1], leaves[2])
        got.backward()
        ref = [t.clone().requires_grad_() for t in (feat, a_pos, a_neg)]
        want = functional.ncl_terms(ref[0], labels, ref[1], ref[2], 2, 0.1, impl="reference").sum()
        want.backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for a, b in zip(leaves, ref):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
        compiles.append(counter.frame_count)
    # the first call compiles (dynamo may restart its analysis once, for the float tau);
    # the second map size runs the same graph
    assert compiles[0] >= 1 and compiles[1] == compiles[0], f"graphs compiled after each call: {compiles}"


FRESH_INTERPRETER = textwrap.dedent("""
    import torch
    from ncl_fast import functional

    torch.manual_seed({seed})
    feat = torch.randn(2, 3, 6, 8, requires_grad=True)
    mask = torch.zeros(2, 1, 12, 16)
    mask[:, :, :7, :5] = 1
    a_pos, a_neg = torch.randn(2, 12), torch.randn(2, 12)

    def step(feat, mask, a_pos, a_neg):
        labels = functional.patch_labels(mask, (6, 8), 2, impl="triton")
        return functional.ncl_terms(feat, labels, a_pos, a_neg, 2, impl="triton").sum()

    got = torch.compile(step, fullgraph=True, backend="inductor")(feat, mask, a_pos, a_neg)
    got.backward()
    want = step(feat.detach(), mask, a_pos, a_neg)
    torch.testing.assert_close(got, want)
    assert torch.isfinite(feat.grad).all() and feat.grad.abs().sum() > 0
    print("compiled")
""")


def test_first_triton_call_of_a_fresh_interpreter_compiles_fullgraph(gen, tmp_path):
    # The backend module is imported by the first call, inside the traced code: it must be
    # imported outside the trace, or fullgraph=True raises (a graph break without it).
    require_backend("triton", "ncl_terms")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), TRITON_INTERPRET="1")
    seed = int(torch.randint(0, 2**31, (), generator=gen))
    run = subprocess.run([sys.executable, "-c", FRESH_INTERPRETER.format(seed=seed)], env=env, capture_output=True,
                         text=True, timeout=1200)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-4000:]


def _step_model(impl, monkeypatch):
    if impl == "fused":
        require_backend("triton", "ncl_terms")
        require_backend("cuda", "pc_bce")
        choose = _backend.choose
        # what `auto` picks on a GPU: Triton for the NCL ops, the extension for the PC loss
        monkeypatch.setattr(_backend, "choose", lambda op, _impl, device: choose(op, FUSED[op], device))
        cfg = LossConfig(impl=None)
    else:
        cfg = LossConfig(impl="reference")
    return NCLModel(18, 1, cfg, width=8, head_channels=16).train()


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_no_graph_break_in_the_training_step(impl, gen, monkeypatch):
    model = _step_model(impl, monkeypatch)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    mask = random_mask(2, 32, 32, "blobs", gen)
    mask[:, :, :, :9] = 1  # tampered, contour and authentic 16 px patches in every image

    def step(x, mask):
        return model(x, mask)["loss"]

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(x, mask)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_cpu_training_step_compiles_once(gen, monkeypatch):
    # What runs on a CPU: the NCL ops' reference and the extension's C++ PC loss, forward and
    # backward, compiled once for batches with different masks. aot_eager runs the fakes,
    # the autograd and the guards that inductor gets; inductor itself (the same graph, 4
    # minutes on 2 cores) is run on the Triton op by the fresh-interpreter test above.
    require_backend("cuda", "pc_loss")
    from torch._dynamo.testing import CompileCounterWithBackend

    cfg = LossConfig(impl="reference")
    model = NCLModel(18, 1, cfg, width=8, head_channels=16).train()
    choose = _backend.choose
    monkeypatch.setattr(_backend, "choose",
                        lambda op, impl, device: choose(op, "cuda" if op.startswith("pc_") else impl, device))

    def step(x, mask):
        return model(x, mask)["loss"]

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    compiles = []
    for kind in ("blobs", "noise"):
        x = torch.randn(2, 3, 32, 32, generator=gen)
        mask = random_mask(2, 32, 32, kind, gen)
        mask[:, :, :, :9] = 1
        loss = compiled(x, mask)
        loss.backward()  # the backward graph, compiled too
        assert torch.isfinite(loss) and all(torch.isfinite(q.grad).all() for q in model.parameters() if q.grad is not None)
        compiles.append(counter.frame_count)
    assert compiles[0] >= 1 and compiles[1] == compiles[0], f"graphs compiled after each batch: {compiles}"
