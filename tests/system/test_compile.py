"""The training step traces under torch.compile with no graph break at the losses
(the fused ops are custom ops with fake kernels; the Pivot has no data-dependent
shapes)."""
import pytest
import torch

from helpers import random_mask, require_backend
from ncl_fast import _backend
from ncl_fast.model import LossConfig, NCLModel

pytestmark = pytest.mark.slow

FUSED = {"patch_labels": "triton", "ncl_terms": "triton", "pc_bce": "cuda", "pc_loss": "cuda"}


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_no_graph_break_in_the_training_step(impl, gen, monkeypatch):
    if impl == "fused":
        require_backend("triton", "ncl_terms")
        require_backend("cuda", "pc_bce")
        choose = _backend.choose
        # what `auto` picks on a GPU: Triton for the NCL ops, the extension for the PC loss
        monkeypatch.setattr(_backend, "choose", lambda op, _impl, device: choose(op, FUSED[op], device))
    model = NCLModel(18, 1, LossConfig(impl="reference" if impl == "reference" else None), width=8,
                     head_channels=16).train()
    x = torch.randn(2, 3, 32, 32, generator=gen)
    mask = random_mask(2, 32, 32, "blobs", gen)
    mask[:, :, :, :9] = 1  # tampered, contour and authentic 16 px patches in every image

    def step(x, mask):
        return model(x, mask)["loss"]

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(x, mask)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
