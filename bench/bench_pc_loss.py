"""Three-scale pivot-consistent loss, forward + backward: the C++/CUDA extension vs
the reference (eager) vs torch.compile(reference), and where the time goes.

B = 4, 512 x 512 mask (float32 and uint8), predictions at strides 8, 4 and 1
(64^2, 128^2 and 512^2 logits), radius 2, mu 0.9; fp32 and bf16 logits. One
call is `pc_loss(preds, mask).backward()` with the gradients set to None first
(what a training step does after `zero_grad()`; otherwise every call would add
three gradient accumulations that are no part of the loss).

Per implementation and dtype:

* eager p50 (p20-p80): `triton.testing.do_bench` of one call (L2 flushed). It
  includes host time wherever the host is slower than the GPU.
* host us/call: wall time of 30 calls queued back to back without a
  synchronization, divided by 30 (the Python, dispatcher and launch work; the
  GPU runs behind), median of 3.
* device us/call: the sum of the GPU kernel and memset times the profiler
  records for one call (averaged over 10 calls), and the kernels per call.
* graph us: p50 of replaying one call captured in a CUDA graph (no host work
  at all; L2 flushed), "-" where capture fails.

Bytes floor (forward + backward): every scale's logits read twice (forward and
backward) and their gradients written once, plus the full-resolution mask read
once per pass: 3 * n_logits * e + 2 * B * H * W * e_mask. GB/s = floor / time.
`byte_model` counts what the kernels move by design: per pass, the mask once
(the bits kernel), its bits written (one bit a pixel) and read back by the tile
kernels with their halos, the logits (and gradients), the forward's partial
sums; and, for comparison, the design before it, which read the mask under
every tile of every scale with its halo (56 MB at B = 4, 512 x 512, fp32).

Run: python bench/bench_pc_loss.py            (a CUDA device; ~40 s on an H200)
     python bench/bench_pc_loss.py --cpu-host (no GPU: host overhead and op
     counts of one call on tiny CPU tensors, the same Python and dispatch path)
     python bench/bench_pc_loss.py --bytes    (no GPU: the byte model alone)
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _harness import bench_ms, device_header, table  # noqa: E402

from ncl_fast import functional  # noqa: E402
from ncl_fast.testing import ellipse_masks  # noqa: E402

#: the CUDA kernels' tile (csrc/cuda/pc_bce_cuda.cu: kTileH x kTileW prediction cells a block)
TILE_H, TILE_W = 8, 32
STRIDES = (8, 4, 1)  # the training step's three predictions

HOST_CALLS = 30  # calls queued per host-time sample: ~120 launches for cuda, well under the launch queue's depth
HOST_SAMPLES = 3  # the median is reported
PROFILED_CALLS = 10  # enough for a stable mean of microsecond kernels; the profiler costs ~1 s per use


def byte_model(B: int, H: int, W: int, strides, radius: int, e_logit: int, e_mask: int) -> dict:
    """Bytes of one forward + backward (the three-scale call): the floor, this design, the one before.

    A tile kernel's block of scale s covers TILE_H x TILE_W cells plus `radius` cells of halo each
    side, clipped at the image; it reads s_y bit rows of every halo cell row, each the 32-bit words
    that span the halo's s_x (TILE_W + 2r) pixels. The sums over tiles are separable (rows x words).
    """
    import math

    words = math.ceil(W / 32)
    n_logits = sum(B * (H // s) * (W // s) for s in strides)
    mask = B * H * W * e_mask
    floor = 3 * n_logits * e_logit + 2 * mask
    bits_read = old_mask_read = blocks = 0
    for s in strides:
        h, w = H // s, W // s
        rows = sum((min(h, y0 + TILE_H + radius) - max(0, y0 - radius)) * s for y0 in range(0, h, TILE_H))
        spans = [(max(0, x0 - radius) * s, min(w, x0 + TILE_W + radius) * s) for x0 in range(0, w, TILE_W)]
        bits_read += B * rows * sum((hi - 1) // 32 - lo // 32 + 1 for lo, hi in spans) * 4
        old_mask_read += B * rows * sum(hi - lo for lo, hi in spans) * e_mask
        blocks += B * math.ceil(h / TILE_H) * math.ceil(w / TILE_W)
    partials = blocks * 3 * 8 * 2  # written, read by the last block
    bits_written = B * H * words * 4
    design = floor + 2 * (bits_written + bits_read) + partials
    old = 3 * n_logits * e_logit + 2 * old_mask_read + partials
    return {"floor": floor, "design": design, "old": old, "bits_written": bits_written, "bits_read": bits_read}


def bytes_main(args) -> None:
    rows = []
    for mask_dtype, e_mask in (("float32", 4), ("uint8", 1)):
        for dtype, e in (("float32", 4), ("bfloat16", 2)):
            m = byte_model(args.batch, args.size, args.size, STRIDES, 2, e, e_mask)
            rows.append([mask_dtype, dtype, f"{m['floor'] / 1e6:.2f}", f"{m['design'] / 1e6:.2f}",
                         f"{m['design'] / m['floor']:.3f}", f"{2 * (m['bits_written'] + m['bits_read']) / 1e6:.2f}",
                         f"{m['old'] / 1e6:.2f}", f"{m['old'] / m['floor']:.2f}"])
    print(f"Bytes of one three-scale forward + backward (strides {STRIDES}, radius 2), B = {args.batch}, "
          f"{args.size} x {args.size}; MB = 1e6 bytes\n")
    print(table(["mask", "logits", "floor MB", "kernels MB", "kernels / floor", "of which mask bits MB",
                 "previous design MB", "previous / floor"], rows))


def make_step(impl: str, preds: list[torch.Tensor], mask: torch.Tensor, compiled=None):
    """One fwd+bwd call, gradients cleared first."""
    if compiled is not None:
        def step():
            for z in preds:
                z.grad = None
            compiled(*preds, mask).backward()
    else:
        def step():
            for z in preds:
                z.grad = None
            functional.pc_loss(preds, mask, 0.9, 2, impl=impl).backward()
    return step


def host_us(step) -> float:
    """Median over HOST_SAMPLES samples of the wall time per call of HOST_CALLS calls queued without a sync."""
    samples = []
    for _ in range(HOST_SAMPLES):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(HOST_CALLS):
            step()
        samples.append((time.perf_counter() - t0) / HOST_CALLS * 1e6)
    torch.cuda.synchronize()
    return statistics.median(samples)


def device_us(step) -> tuple[float, float, list[tuple[str, float]]]:
    """(GPU us per call, kernels per call, top kernels (name, us per call)) from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_CALLS):
            step()
        torch.cuda.synchronize()
    per_kernel = collections.Counter()
    count = 0
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        per_kernel[evt.name] += evt.time_range.elapsed_us()  # a kernel or memset on the GPU
        count += 1
    total = sum(per_kernel.values()) / PROFILED_CALLS
    top = [(name, us / PROFILED_CALLS) for name, us in per_kernel.most_common(4)]
    return total, count / PROFILED_CALLS, top


def graph_us(step) -> tuple[float, float, float] | None:
    """(p20, p50, p80) microseconds of replaying one captured call, or None if capture fails."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up on a side stream, as capture requires
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graph.replay()
        torch.cuda.synchronize()
        return tuple(1e3 * x for x in bench_ms(graph.replay))
    except Exception as err:  # report and go on
        print(f"  graph capture failed: {type(err).__name__}: {str(err)[:200]}", flush=True)
        return None


def gpu_main(args) -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_pc_loss.py needs a CUDA device (or --cpu-host)")
    dev = torch.device("cuda")
    started = time.perf_counter()
    print(device_header())
    bytes_main(args)
    print()
    B, S = args.batch, args.size
    rows, kernel_rows = [], []
    for mask_dtype in (torch.float32, torch.uint8):
        mask = ellipse_masks(B, S, S, 0, area=(0.05, 0.30), device=dev).to(mask_dtype)
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator(device=dev).manual_seed(1)
            preds = [
                torch.randn(B, 1, S // s, S // s, device=dev, generator=g).to(dtype).requires_grad_()
                for s in STRIDES
            ]
            n = sum(z.numel() for z in preds)
            floor = byte_model(B, S, S, STRIDES, 2, preds[0].element_size(), mask.element_size())["floor"]
            assert floor == 3 * n * preds[0].element_size() + 2 * mask.numel() * mask.element_size()
            steps = {"cuda": make_step("cuda", preds, mask), "reference": make_step("reference", preds, mask)}
            if not args.no_compile and (args.compile_all or mask_dtype == torch.float32):
                comp = torch.compile(lambda a, b, c, m: functional.pc_loss([a, b, c], m, 0.9, 2, impl="reference"))
                steps["compile(reference)"] = make_step("reference", preds, mask, compiled=comp)
            res = {}
            for name, step in steps.items():
                label = f"{str(mask_dtype)[6:]} {str(dtype)[6:]} {name}"
                try:
                    step()
                    eager = bench_ms(step)
                    host = host_us(step)
                    dev_us, kernels, top = device_us(step)
                    graph = None if args.no_graph else graph_us(step)
                except Exception as err:  # report and go on
                    print(f"{label}: failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
                    continue
                res[name] = (eager, host, dev_us, kernels, graph)
                print(f"{label}: eager {eager[1] * 1e3:.1f} us, host {host:.1f} us/call, device {dev_us:.1f} us/call "
                      f"({kernels:.0f} kernels), graph {graph[1] if graph else float('nan'):.1f} us", flush=True)
                if name == "cuda":
                    for kname, us in top:
                        kernel_rows.append([str(mask_dtype)[6:], str(dtype)[6:], kname[:90], f"{us:.1f}"])
            ref = res.get("compile(reference)")
            for name, (eager, host, dev_us, kernels, graph) in res.items():
                rows.append([
                    str(mask_dtype)[6:], str(dtype)[6:], name, f"{eager[1] * 1e3:.1f} ({eager[0] * 1e3:.1f}-{eager[2] * 1e3:.1f})",
                    f"{host:.1f}", f"{dev_us:.1f}", f"{kernels:.0f}",
                    f"{graph[1]:.1f} ({graph[0]:.1f}-{graph[2]:.1f})" if graph else "-",
                    f"{ref[0][1] / eager[1]:.1f}x" if ref else "-",
                    f"{ref[2] / dev_us:.1f}x" if ref else "-",
                    f"{floor / (dev_us * 1e-6) / 1e9:.0f}",
                ])
    print()
    print("Kernels of the cuda implementation (us per call, profiler):\n")
    print(table(["mask", "logits", "kernel", "us/call"], kernel_rows))
    print()
    print(table(["mask", "logits", "impl", "eager fwd+bwd us p50 (p20-p80)", "host us/call", "device us/call",
                 "kernels/call", "graph replay us p50 (p20-p80)", "eager vs compile(ref)", "device vs compile(ref)",
                 "GB/s (floor / device)"], rows))
    print(f"\n({time.perf_counter() - started:.0f} s)")


def cpu_host_main(args) -> None:
    """Host overhead of one call on tiny CPU tensors (the extension's C++ kernel): the
    Python, dispatch and autograd path is the one a CUDA call takes."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(4, 1, 16, 16, generator=g) > 0.5).float()
    preds = [torch.randn(4, 1, 16 // s, 16 // s, generator=g).requires_grad_() for s in (8, 4, 1)]
    rows = []
    for impl in ("cuda", "reference"):
        step = make_step(impl, preds, mask)
        for _ in range(200):
            step()

        def per_call_us(fn, n=1000):  # thread CPU time: robust to other processes on a shared machine
            samples = []
            for _ in range(5):
                t0 = time.thread_time()
                for _ in range(n):
                    fn()
                samples.append((time.thread_time() - t0) / n * 1e6)
            return statistics.median(samples)

        total = per_call_us(step)
        kernels = "-"
        if impl == "cuda":  # the C++ kernels alone, called directly: what the total adds to them is overhead
            fwd, bwd = torch.ops.ncl_fast.pc_loss_fwd.default, torch.ops.ncl_fast.pc_loss_bwd.default
            detached = [z.detach() for z in preds]
            stats = fwd(detached, mask, 0.9, 2)[1]
            one = torch.tensor(1.0)
            k = per_call_us(lambda: fwd(detached, mask, 0.9, 2)) + per_call_us(
                lambda: bwd(one, detached, mask, stats, 0.9, 2))
            kernels = f"{k:.1f}"
            overhead = f"{total - k:.1f}"
        else:
            overhead = "-"
        calls = collections.Counter()

        def count(frame, event, arg):
            if event == "call":
                f = frame.f_code.co_filename
                calls["ncl_fast" if "/ncl_fast/" in f else "torch" if "/torch/" in f else "other"] += 1

        sys.setprofile(count)
        step()
        sys.setprofile(None)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        ops = collections.Counter(e.name for e in prof.events() if e.name.startswith(("aten::", "ncl_fast::")))
        rows.append([impl, f"{total:.1f}", kernels, overhead, calls["ncl_fast"], calls["torch"],
                     sum(ops.values()), ", ".join(f"{k} x{v}" if v > 1 else k for k, v in ops.most_common(6))])
    print(f"torch {torch.__version__}, CPU, B = 4, 16 x 16 mask, three scales; us are thread CPU time")
    print()
    print(table(["impl", "fwd+bwd us/call", "C++ kernels us", "overhead us", "Python calls (ncl_fast)",
                 "Python calls (torch)", "aten/ncl_fast ops", "most frequent ops"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA graph replay timing")
    ap.add_argument("--compile-all", action="store_true",
                    help="torch.compile(reference) for the uint8 mask too (float32 masks only by default)")
    ap.add_argument("--cpu-host", action="store_true",
                    help="no GPU needed: host overhead and op counts of one call on tiny CPU tensors")
    ap.add_argument("--bytes", action="store_true", help="no GPU needed: the byte model alone")
    args = ap.parse_args()
    if args.bytes:
        bytes_main(args)
    elif args.cpu_host:
        cpu_host_main(args)
    else:
        gpu_main(args)


if __name__ == "__main__":
    main()
