"""Small launches of every GPU kernel, for `compute-sanitizer` (what the interpreter
cannot show), under each of its three tools:

    for tool in memcheck initcheck racecheck; do
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $tool --error-exitcode 9 \
          python bench/sanitize_check.py
    done

memcheck: out-of-bounds accesses (without the caching allocator every tensor is its
own allocation, so an access past a tensor's end is outside any allocation);
initcheck: reads of global memory never written (the kernels read no padding, no
lam/W of an image without t1, and the forward writes every value of the workspace:
the similarity GEMM's blocks and the statistics pass's zeros for the rest); racecheck:
shared-memory races within a block. Every case runs both paths, every dtype and
layout, odd sizes and images without t1 (|P| = 1). Prints one line per case; the
sanitizer's report follows if anything is wrong. `bench/gpu_check.sh sanitize` runs
the three.
"""
from __future__ import annotations

import torch

from ncl_fast import functional
from ncl_fast.testing import ellipse_masks


def main() -> None:
    from ncl_fast.kernels import ncl_terms as k

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    default_budget = k.SIM_BUDGET
    # (B, C, h, w, p, stride): odd sizes leave uncovered cells; stage-1-like and stage-2-like
    for B, C, h, w, p, s in ((3, 8, 36, 28, 4, 2), (2, 16, 16, 24, 2, 4)):
        mask = ellipse_masks(B, h * s, w * s, B, device=dev)
        labels = functional.patch_labels(mask, (h, w), p, impl="triton")
        assert torch.equal(labels, functional.patch_labels(mask, (h, w), p, impl="reference"))
        # image 0 with one tampered patch: no t1 (its lam and W are never written, nor read)
        labels = labels.clone()
        labels[0][labels[0] == 1] = 0
        labels[0, 0] = 1
        D = C * p * p
        for dtype, layout, path in [(d, lay, "stored") for d in (torch.float32, torch.bfloat16, torch.float16)
                                    for lay in ("contiguous", "channels_last")] + [
                (torch.float32, "contiguous", "bounded"), (torch.bfloat16, "channels_last", "bounded")]:
            # stored: a workspace every block fits in; bounded: none
            k.SIM_BUDGET = 64.0 if path == "stored" else 0.0
            feat = torch.randn(B, C, h, w, device=dev, generator=g).to(dtype)
            if layout == "channels_last":
                feat = feat.to(memory_format=torch.channels_last)
            feat.requires_grad_()
            ap = torch.randn(B, D, device=dev, generator=g).to(dtype).requires_grad_()
            an = torch.randn(B, D, device=dev, generator=g).to(dtype).requires_grad_()
            terms = functional.ncl_terms(feat, labels, ap, an, p, 0.1, impl="triton")
            terms.sum().backward()
            torch.cuda.synchronize()
            print(f"ncl_terms B={B} C={C} {h}x{w} p={p} {dtype} {layout} {path}: terms {terms.sum().item():.4f}",
                  flush=True)
    k.SIM_BUDGET = default_budget
    mask = ellipse_masks(2, 96, 80, 7, device=dev)
    for dtype in (torch.float32, torch.bfloat16):
        preds = [torch.randn(2, 1, 96 // k, 80 // k, device=dev, generator=g).to(dtype).requires_grad_()
                 for k in (8, 4, 1)]
        loss = functional.pc_loss(preds, mask, 0.9, 2, impl="cuda")
        loss.backward()
        torch.cuda.synchronize()
        print(f"pc_loss {dtype}: {loss.item():.4f}", flush=True)
    print("sanitize_check: every case ran")


if __name__ == "__main__":
    main()
