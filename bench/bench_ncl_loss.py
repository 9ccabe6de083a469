"""NCL loss (patch labels + the three terms) forward / backward / both: the Triton
kernels (in each of their variants) vs the reference (eager) vs
torch.compile(reference), at the paper's shapes.

B = 4 images of 512 x 512, masks of 5-30 % tampered area in irregular shapes;
stage 1 (C = 64, 256 x 256 features, p = 8, D = 4096) and stage 2 (C = 256,
128 x 128, p = 4, D = 4096); fp32, bf16 and fp16 features, contiguous (`--layouts`:
also channels_last, as the training step passes them on a GPU).

Variants (`--variants`): `triton` is the default configuration (the stored path,
tf32x3 for fp32 features); `triton:NAME=VALUE` sets an attribute of
`ncl_fast.kernels.ncl_terms` for that row only: `triton:SIM_BUDGET=0` is the
bounded path (no similarity workspace: the first design's kernels),
`triton:FP32_DOT_PRECISION=ieee` plain fp32 FMA products (fp32 inputs only;
skipped for the others). Against the default on sm_90: `triton:GRAD_HEAD_MAJORS=`
(the backward without its head kernel: the grouped kernel with its row groups and
panel of tampered partners' features for every image; bf16), with `:GRAD_PANEL=0` too
(one row tile a program, as on sm_80), and the candidates `triton:SIM_BN=128` (the
similarity GEMM's 128 columns per item, half features; one block per SM) and
`triton:SIM_BN=128:SIM_SPLITS=5` (at most 5 parts of D per image: fewer partial blocks
to write and add, fewer items per SM). An empty value sets a tuple attribute to ().

Floors, per batch (|P_b|, |N_b| the tampered / authentic patch counts):
  FLOP forward  = sum_b 2 D |P_b| (|P_b| + |N_b|)  (the similarities the loss needs)
                + sum_b 2 * 2 D (|P_b| + |N_b|)    (both anchors)
  FLOP backward = 2 x the forward (d hat F = T hat F from both sides of each pair)
  bytes forward = the P and N patches' features once + the mask once
  bytes backward = the P and N patches' features once + the whole gradient map written once
Achieved TFLOP/s and GB/s below divide these floors by the measured p50.

Run: python bench/bench_ncl_loss.py  (a CUDA device is required)
"""
from __future__ import annotations

import argparse
import contextlib
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _harness import bench_ms, device_header, fmt_q, peak_extra_mb, table  # noqa: E402

from ncl_fast import functional  # noqa: E402
from ncl_fast.testing import ellipse_masks  # noqa: E402

STAGES = {"stage 1": (64, 256, 8), "stage 2": (256, 128, 4)}


def floors(mask: torch.Tensor, C: int, h: int, p: int, dtype: torch.dtype) -> tuple[float, float, float, float]:
    labels = functional.patch_labels(mask, (h, h), p, impl="reference")
    n_p = (labels == 1).sum(1).double()
    n_n = (labels == 0).sum(1).double()
    D = C * p * p
    esize = torch.tensor([], dtype=dtype).element_size()
    fwd_flop = (2 * D * n_p * (n_p + n_n) + 4 * D * (n_p + n_n)).sum().item()
    fwd_bytes = ((n_p + n_n).sum().item() * D * esize) + mask.numel() * mask.element_size()
    bwd_bytes = (n_p + n_n).sum().item() * D * esize + mask.shape[0] * C * h * h * esize
    return fwd_flop, 2 * fwd_flop, fwd_bytes, bwd_bytes


@contextlib.contextmanager
def kernel_settings(settings: dict):
    """Temporarily set module attributes of ncl_fast.kernels.ncl_terms."""
    from ncl_fast.kernels import ncl_terms as k

    old = {name: getattr(k, name) for name in settings}
    for name, value in settings.items():
        setattr(k, name, type(old[name])(value) if not isinstance(old[name], str) else value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(k, name, value)


def top_kernels(fn, iters: int = 10, n: int = 8) -> str:
    """The profiler's top CUDA kernels of `fn` (per call), as a small markdown table."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    rows = [[e.key[:60], e.count // iters, f"{e.device_time_total / iters:.1f}"] for e in events[:n]]
    return table(["kernel", "launches per call", "us per call"], rows)


def parse_variant(spec: str) -> tuple[str, str, dict]:
    """'triton:A=1:B=x' -> (label, impl, {A: '1', B: 'x'})."""
    impl, *pairs = spec.split(":")
    return spec, impl, dict(p.split("=", 1) for p in pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--area", default="0.05,0.30",
                    help="the masks' tampered fraction per image, drawn between these two (lo,hi)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--layouts", default="contiguous", help="the features' layouts: contiguous, channels_last")
    ap.add_argument("--stages", default="stage 1,stage 2")
    ap.add_argument("--variants", default="triton,triton:SIM_BUDGET=0,triton:FP32_DOT_PRECISION=ieee",
                    help="comma-separated Triton variants (see the module docstring)")
    ap.add_argument("--compile-stages", default="stage 1",
                    help="stages that also time torch.compile(reference) ('' for none; compiling takes ~20 s each)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference) everywhere")
    ap.add_argument("--profile", action="store_true",
                    help="print the profiler's top kernels of each Triton variant's fwd+bwd")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_ncl_loss.py needs a CUDA device")
    dev = torch.device("cuda")
    # the backward is timed alone with retain_graph=True, which compiled graphs with
    # donated buffers refuse
    torch._functorch.config.donated_buffer = False
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference in true fp32, like the kernels' default
    print(device_header())
    lo, hi = (float(x) for x in args.area.split(","))
    if not 0.0 < lo <= hi < 1.0:
        sys.exit(f"--area {args.area}: expected lo,hi with 0 < lo <= hi < 1 (tampered fraction per image)")
    mask = ellipse_masks(args.batch, args.size, args.size, 0, area=(lo, hi), device=dev)
    print(f"\nmasks: tampered fraction per image {[round(x, 3) for x in mask.mean((1, 2, 3)).tolist()]}")
    rows = []
    compile_stages = set() if args.no_compile else {s for s in args.compile_stages.split(",") if s}
    for stage in args.stages.split(","):
        C, h_full, p = STAGES[stage]
        h = h_full * args.size // 512
        labels = functional.patch_labels(mask, (h, h), p, impl="reference")
        counts = [[int((labels[b] == v).sum()) for v in (1, 0, 2)] for b in range(args.batch)]
        print(f"{stage}: [|P|, |N|, |K|] per image {counts}", flush=True)
        for dname, layout in [(d, lay) for d in args.dtypes.split(",") for lay in args.layouts.split(",")]:
            dtype = getattr(torch, dname)
            if layout not in ("contiguous", "channels_last"):
                sys.exit(f"--layouts {args.layouts}: expected contiguous and/or channels_last")
            g = torch.Generator(device=dev).manual_seed(1)
            feat = torch.randn(args.batch, C, h, h, device=dev, generator=g).to(dtype)
            if layout == "channels_last":  # as the training step passes the decoder's features on a GPU
                feat = feat.to(memory_format=torch.channels_last)
                dname = f"{dname} channels_last"
            feat.requires_grad_()
            D = C * p * p
            a_pos = torch.randn(args.batch, D, device=dev, generator=g).to(dtype).requires_grad_()
            a_neg = torch.randn(args.batch, D, device=dev, generator=g).to(dtype).requires_grad_()
            map_mb = feat.numel() * feat.element_size() / 1e6
            fwd_flop, bwd_flop, fwd_bytes, bwd_bytes = floors(mask, C, h, p, dtype)

            def loss_fn(impl):
                def f():
                    labels = functional.patch_labels(mask, (h, h), p, impl=impl)
                    return functional.ncl_terms(feat, labels, a_pos, a_neg, p, 0.1, impl=impl).sum(1).mean()

                return f

            impls = {}
            for spec in args.variants.split(","):
                label, impl, settings = parse_variant(spec)
                if "FP32_DOT_PRECISION" in settings and dtype != torch.float32:
                    continue
                impls[label] = (loss_fn(impl), settings)
            impls["reference"] = (loss_fn("reference"), {})
            if stage in compile_stages:
                impls["compile(reference)"] = (torch.compile(loss_fn("reference")), {})
            results = {}
            for name, (f, settings) in impls.items():
                try:
                    with kernel_settings(settings):
                        loss = f()
                        loss.backward()  # warm-up (and compilation)
                        fwd = bench_ms(f)
                        loss = f()
                        bwd = bench_ms(lambda: loss.backward(retain_graph=True))
                        both = bench_ms(lambda: f().backward())
                        feat.grad = a_pos.grad = a_neg.grad = None  # the gradients are outputs, not extra memory
                        grads_mb = sum(t.numel() * t.element_size() for t in (feat, a_pos, a_neg)) / 1e6
                        extra = peak_extra_mb(lambda: f().backward()) - grads_mb
                except Exception as err:  # report and go on
                    print(f"{stage} {dname} {name}: failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
                    continue
                results[name] = (fwd, bwd, both, extra)
                print(f"{stage} {dname} {name}: fwd+bwd p50 {both[1]:.3f} ms", flush=True)
                if args.profile and name.startswith("triton"):
                    with kernel_settings(settings):
                        print(top_kernels(lambda: f().backward()), flush=True)
            for name, (fwd, bwd, both, extra) in results.items():
                ref = results.get("reference")
                comp = results.get("compile(reference)")
                rows.append([
                    stage, dname, name, fmt_q(fwd), fmt_q(bwd), fmt_q(both),
                    f"{ref[2][1] / both[1]:.1f}x" if ref else "-",
                    f"{comp[2][1] / both[1]:.1f}x" if comp else "-",
                    f"{(fwd_flop + bwd_flop) / both[1] / 1e9:.1f}",
                    f"{(fwd_bytes + bwd_bytes) / both[1] / 1e6:.0f}",
                    f"{extra:.1f} ({100 * extra / map_mb:.1f}%)",
                ])
    print()
    print(table(
        ["features", "dtype", "impl", "fwd ms p50 (p20-p80)", "bwd ms", "fwd+bwd ms", "vs reference",
         "vs compile(reference)", "TFLOP/s (floor / p50)", "GB/s (floor / p50)", "extra peak MB (% of map)"],
        rows,
    ))


if __name__ == "__main__":
    main()
