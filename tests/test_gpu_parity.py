"""Parity of the fused ops with the reference at the paper's full sizes, on a CUDA
device (skipped without one; `bench/gpu_check.sh` runs these)."""
import pytest
import torch

from ncl_fast import functional

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def masks(B, size, seed):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = torch.zeros(B, 1, size, size)
    for b in range(B):
        for _ in range(3):
            cy, cx = (torch.rand(2, generator=g) * size).tolist()
            ry, rx = (size * (0.05 + 0.15 * torch.rand(2, generator=g))).tolist()
            out[b, 0] = torch.maximum(out[b, 0], ((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= 1).float())
    return out.cuda()


# stored: the default workspace (every image of these masks fits); bounded: none.
PATHS = {"stored": None, "bounded": 0.0}


@pytest.mark.parametrize("stage", [(64, 256, 8), (256, 128, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("path", ["stored", "bounded"])
def test_ncl_full_size(stage, dtype, layout, path, monkeypatch):
    from ncl_fast.kernels import ncl_terms as k

    if PATHS[path] is not None:
        monkeypatch.setattr(k, "SIM_BUDGET", PATHS[path])
    if path == "bounded" and (stage[0] == 256 or layout == "channels_last"):
        pytest.skip("the bounded path is checked at stage 1, contiguous (it is slow by design)")
    C, h, p = stage
    B = 4
    mask = masks(B, 512, 0)
    lab_t = functional.patch_labels(mask, (h, h), p, impl="triton")
    lab_r = functional.patch_labels(mask, (h, h), p, impl="reference")
    assert torch.equal(lab_t, lab_r)
    g = torch.Generator(device="cuda").manual_seed(0)
    feat = torch.randn(B, C, h, h, device="cuda", generator=g).to(dtype)
    if layout == "channels_last":
        feat = feat.to(memory_format=torch.channels_last)
    D = C * p * p
    anchors = [torch.randn(B, D, device="cuda", generator=g).to(dtype) for _ in range(2)]
    # dL/dterms of a training step: omega / B (0.0025), times a GradScaler's 2^16 in fp16
    grad_out = (torch.rand(B, 3, device="cuda", generator=g) + 0.5) * (0.0025 * 2**16 if dtype == torch.float16 else 1)
    outs = {}
    for impl in ("triton", "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in (feat, *anchors)]
        terms = functional.ncl_terms(leaves[0], lab_r, leaves[1], leaves[2], p, 0.1, impl=impl)
        (terms * grad_out).sum().backward()
        outs[impl] = (terms.detach(), [t.grad for t in leaves])
    if path == "stored":  # every image's block fits its slot of the workspace: the stored kernels ran
        counts = torch.stack([(lab_r == v).sum(1) for v in (1, 0)], 1).long()
        blocks = counts[:, 0] * ((counts.sum(1) + 3) // 4 * 4)
        assert (blocks <= k.workspace_slot((h // p) ** 2)).all()
    torch.testing.assert_close(outs["triton"][0], outs["reference"][0], rtol=1e-4, atol=1e-5)
    for name, a, b in zip(("feat", "anchor_pos", "anchor_neg"), outs["triton"][1], outs["reference"][1]):
        scale = b.abs().max().item()
        assert scale > 0, name
        # fp32: tf32x3 products (near fp32); bf16/fp16: the gradient is rounded to the input dtype
        tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * scale, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.uint8, torch.bool])
def test_pc_loss_full_size(dtype, mask_dtype):
    B = 4
    mask = masks(B, 512, 1).to(mask_dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    preds = [torch.randn(B, 1, 512 // s, 512 // s, device="cuda", generator=g).to(dtype) for s in (8, 4, 1)]
    outs = {}
    for impl in ("cuda", "reference"):
        leaves = [z.detach().clone().requires_grad_() for z in preds]
        loss = functional.pc_loss(leaves, mask, 0.9, 2, impl=impl)
        (1.7 * loss).backward()
        outs[impl] = (loss.detach(), [z.grad for z in leaves])
    torch.testing.assert_close(outs["cuda"][0], outs["reference"][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(outs["cuda"][1], outs["reference"][1]):
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.abs().max().item())


def test_pc_loss_is_deterministic_on_gpu():
    from ncl_fast import _cuda_ops  # noqa: F401  (registers torch.ops.ncl_fast.*)

    mask = masks(4, 512, 2)
    preds = [torch.randn(4, 1, 512 // s, 512 // s, device="cuda") for s in (8, 4, 1)]
    first = torch.ops.ncl_fast.pc_loss_fwd(preds, mask, 0.9, 2)
    for _ in range(5):
        again = torch.ops.ncl_fast.pc_loss_fwd(preds, mask, 0.9, 2)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
