// Pivot-consistent BCE on CUDA (see pc_bce.h).
//
// One block per TILE_H x TILE_W tile of the prediction. The block computes the
// shrunk mask G of its tile plus a halo of `radius` cells into shared memory
// (each cell reads its s_y x s_x mask window once), finds the contour band with
// two separable passes (row windows, then column windows, each an OR of "saw a
// 0" / "saw a 1" bits), and then each thread handles one prediction pixel.
// Forward: per-block partial sums (warp shuffles, fixed order) go to a buffer
// that one more block adds up in float64 in a fixed order: the result is the
// same bit for bit from run to run (no float atomics).
// Backward: one pass writing (sigmoid(z) - g) * (c_band [in E] + c_all).
#include <ATen/AccumulateType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/types.h>

#include "../dispatch.h"
#include "../pc_bce.h"

namespace ncl_fast {
namespace {

// 32 columns: a warp reads one row of logits, coalesced. 8 rows: 256 threads,
// enough warps per block to hide the mask loads, and a halo overhead of
// (8 + 2r)(32 + 2r) / 256 = 1.6x cells at the default r = 2.
constexpr int kTileW = 32;
constexpr int kTileH = 8;
constexpr int kThreads = kTileW * kTileH;
constexpr int kWarps = kThreads / 32;
// Halo bytes at r: (8 + 2r)(32 + 2r) + (8 + 2r) 32; r = 64 needs 26 KiB, inside
// the 48 KiB of shared memory any launch may use without opting in.
constexpr int64_t kMaxRadius = 64;
// Threads of the final reduction over the per-block partial sums.
constexpr int kReduceThreads = 256;

struct Strides {
  int64_t b, y, x;
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(2), t.stride(3)}; }

// Fill sG ((kTileH + 2r) x (kTileW + 2r): 0, 1, or 2 outside the image) and
// sH ((kTileH + 2r) x kTileW: bit 0 = a 0 in the row window, bit 1 = a 1).
template <typename mask_t>
__device__ __forceinline__ void load_tile(const mask_t* __restrict__ mask, Strides ms, const PcGeometry& g, int64_t b,
                                          int64_t y0, int64_t x0, uint8_t* sG, uint8_t* sH) {
  const int r = static_cast<int>(g.radius);
  const int halo_w = kTileW + 2 * r, halo_h = kTileH + 2 * r;
  const int64_t area = g.stride_y * g.stride_x;
  const mask_t* mb = mask + b * ms.b;
  for (int i = threadIdx.x; i < halo_h * halo_w; i += kThreads) {
    const int64_t y = y0 - r + i / halo_w, x = x0 - r + i % halo_w;
    uint8_t v = 2;
    if (y >= 0 && y < g.out_h && x >= 0 && x < g.out_w) {
      int64_t count = 0;
      for (int64_t dy = 0; dy < g.stride_y; ++dy) {
        const mask_t* row = mb + (y * g.stride_y + dy) * ms.y + x * g.stride_x * ms.x;
        for (int64_t dx = 0; dx < g.stride_x; ++dx) count += static_cast<float>(row[dx * ms.x]) > 0.5f;
      }
      v = 2 * count >= area;  // area mean >= 0.5, in integers
    }
    sG[i] = v;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < halo_h * kTileW; i += kThreads) {
    const int hy = i / kTileW, tx = i % kTileW;
    uint8_t bits = 0;
    for (int dx = 0; dx <= 2 * r; ++dx) {
      const uint8_t v = sG[hy * halo_w + tx + dx];
      bits |= v == 0 ? 1 : (v == 1 ? 2 : 0);
    }
    sH[i] = bits;
  }
  __syncthreads();
}

// For this thread's pixel: is it in the band, and its g.
__device__ __forceinline__ void pixel_band(const PcGeometry& g, const uint8_t* sG, const uint8_t* sH, int ty, int tx,
                                           bool* band, uint8_t* gt) {
  const int r = static_cast<int>(g.radius);
  uint8_t bits = 0;
  for (int dy = 0; dy <= 2 * r; ++dy) bits |= sH[(ty + dy) * kTileW + tx];
  *band = bits == 3;  // the clipped window holds a 0 and a 1: max != min
  *gt = sG[(ty + r) * (kTileW + 2 * r) + tx + r];
}

// Explicit single/double precision math (no reliance on overload resolution of abs/exp).
__device__ __forceinline__ float abs_(float x) { return fabsf(x); }
__device__ __forceinline__ double abs_(double x) { return fabs(x); }
__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log1p_(float x) { return log1pf(x); }
__device__ __forceinline__ double log1p_(double x) { return log1p(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

template <typename scalar_t, typename mask_t>
__global__ void __launch_bounds__(kThreads) pc_bce_stats_kernel(const scalar_t* __restrict__ logits, Strides zs,
                                                                const mask_t* __restrict__ mask, Strides ms,
                                                                PcGeometry g, double* __restrict__ partials) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  extern __shared__ uint8_t smem[];
  const int r = static_cast<int>(g.radius);
  uint8_t* sG = smem;
  uint8_t* sH = smem + (kTileH + 2 * r) * (kTileW + 2 * r);
  const int64_t b = blockIdx.z, y0 = int64_t(blockIdx.y) * kTileH, x0 = int64_t(blockIdx.x) * kTileW;
  load_tile(mask, ms, g, b, y0, x0, sG, sH);

  const int ty = threadIdx.x / kTileW, tx = threadIdx.x % kTileW;
  const int64_t y = y0 + ty, x = x0 + tx;
  acc_t band_sum = 0, band_n = 0, total = 0;
  if (y < g.out_h && x < g.out_w) {
    bool band;
    uint8_t gt;
    pixel_band(g, sG, sH, ty, tx, &band, &gt);
    const acc_t z = static_cast<acc_t>(logits[b * zs.b + y * zs.y + x * zs.x]);
    // BCE with logits: max(z, 0) - z g + log(1 + exp(-|z|))
    const acc_t l = (z > 0 ? z : acc_t(0)) - z * acc_t(gt) + log1p_(exp_(-abs_(z)));
    total = l;
    if (band) {
      band_sum = l;
      band_n = 1;
    }
  }
  // Block sum in a fixed order: warp shuffles, then warp 0 over the warps.
  __shared__ acc_t warp_part[3][kWarps];
  band_sum = warp_sum(band_sum);
  band_n = warp_sum(band_n);
  total = warp_sum(total);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_part[0][warp] = band_sum;
    warp_part[1][warp] = band_n;
    warp_part[2][warp] = total;
  }
  __syncthreads();
  if (threadIdx.x < 3) {
    double s = 0;
    for (int w = 0; w < kWarps; ++w) s += static_cast<double>(warp_part[threadIdx.x][w]);
    const int64_t block = (int64_t(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    partials[block * 3 + threadIdx.x] = s;
  }
}

// stats[k] = sum over blocks of partials[block][k], float64, fixed order.
__global__ void __launch_bounds__(kReduceThreads) reduce_partials_kernel(const double* __restrict__ partials,
                                                                        int64_t blocks, double* __restrict__ stats) {
  __shared__ double part[3][kReduceThreads];
  double s[3] = {0, 0, 0};
  for (int64_t i = threadIdx.x; i < blocks; i += kReduceThreads)
    for (int k = 0; k < 3; ++k) s[k] += partials[i * 3 + k];
  for (int k = 0; k < 3; ++k) part[k][threadIdx.x] = s[k];
  __syncthreads();
  for (int width = kReduceThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width)
      for (int k = 0; k < 3; ++k) part[k][threadIdx.x] += part[k][threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x < 3) stats[threadIdx.x] = part[threadIdx.x][0];
}

template <typename scalar_t, typename mask_t>
__global__ void __launch_bounds__(kThreads) pc_bce_backward_kernel(const scalar_t* __restrict__ logits, Strides zs,
                                                                   const mask_t* __restrict__ mask, Strides ms,
                                                                   const double* __restrict__ coef, PcGeometry g,
                                                                   scalar_t* __restrict__ grad, Strides gs) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  extern __shared__ uint8_t smem[];
  const int r = static_cast<int>(g.radius);
  uint8_t* sG = smem;
  uint8_t* sH = smem + (kTileH + 2 * r) * (kTileW + 2 * r);
  const int64_t b = blockIdx.z, y0 = int64_t(blockIdx.y) * kTileH, x0 = int64_t(blockIdx.x) * kTileW;
  load_tile(mask, ms, g, b, y0, x0, sG, sH);
  const int ty = threadIdx.x / kTileW, tx = threadIdx.x % kTileW;
  const int64_t y = y0 + ty, x = x0 + tx;
  if (y >= g.out_h || x >= g.out_w) return;
  bool band;
  uint8_t gt;
  pixel_band(g, sG, sH, ty, tx, &band, &gt);
  const acc_t c_all = static_cast<acc_t>(coef[1]);
  const acc_t w = band ? static_cast<acc_t>(coef[0]) + c_all : c_all;
  const acc_t z = static_cast<acc_t>(logits[b * zs.b + y * zs.y + x * zs.x]);
  const acc_t sig = acc_t(1) / (acc_t(1) + exp_(-z));
  grad[b * gs.b + y * gs.y + x * gs.x] = static_cast<scalar_t>((sig - acc_t(gt)) * w);
}

struct Launch {
  dim3 grid;
  size_t smem;
};

Launch launch_shape(const PcGeometry& g) {
  TORCH_CHECK_VALUE(g.radius <= kMaxRadius, "pc_bce (CUDA): radius ", g.radius, " is above the supported ",
                    kMaxRadius, " pixels; use the CPU or the reference for wider bands");
  TORCH_CHECK_VALUE(g.batch <= 65535 && (g.out_h + kTileH - 1) / kTileH <= 65535,
                    "pc_bce (CUDA): batch or height too large for one launch");
  const int64_t r = g.radius;
  Launch l;
  l.grid = dim3(static_cast<unsigned>((g.out_w + kTileW - 1) / kTileW),
                static_cast<unsigned>((g.out_h + kTileH - 1) / kTileH), static_cast<unsigned>(g.batch));
  l.smem = static_cast<size_t>((kTileH + 2 * r) * (kTileW + 2 * r) + (kTileH + 2 * r) * kTileW);
  return l;
}

}  // namespace

at::Tensor pc_bce_stats_cuda(const at::Tensor& logits, const at::Tensor& mask, int64_t radius) {
  const PcGeometry g = check_pc_inputs(logits, mask, radius, "pc_bce_stats");
  TORCH_CHECK_VALUE(logits.is_cuda(), "pc_bce_stats_cuda: logits must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(logits.device());
  auto stats = at::zeros({3}, logits.options().dtype(at::kDouble));
  if (g.batch * g.out_h * g.out_w == 0) return stats;
  const Launch l = launch_shape(g);
  const int64_t blocks = int64_t(l.grid.x) * l.grid.y * l.grid.z;
  auto partials = at::empty({blocks, 3}, logits.options().dtype(at::kDouble));
  auto stream = c10::cuda::getCurrentCUDAStream();
  NCL_FAST_DISPATCH_LOGITS(logits.scalar_type(), "pc_bce_stats_cuda", [&] {
    NCL_FAST_DISPATCH_MASK(mask.scalar_type(), "pc_bce_stats", [&] {
      pc_bce_stats_kernel<scalar_t, mask_t><<<l.grid, kThreads, l.smem, stream>>>(
          logits.data_ptr<scalar_t>(), strides_of(logits), mask.data_ptr<mask_t>(), strides_of(mask), g,
          partials.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  reduce_partials_kernel<<<1, kReduceThreads, 0, stream>>>(partials.data_ptr<double>(), blocks,
                                                           stats.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return stats;
}

at::Tensor pc_bce_backward_cuda(const at::Tensor& logits, const at::Tensor& mask, const at::Tensor& coef,
                                int64_t radius) {
  const PcGeometry g = check_pc_inputs(logits, mask, radius, "pc_bce_backward");
  TORCH_CHECK_VALUE(coef.numel() == 2 && coef.device() == logits.device(),
                    "pc_bce_backward: coef must hold 2 values on the logits' device");
  const c10::cuda::CUDAGuard guard(logits.device());
  auto grad = at::empty_like(logits);
  if (g.batch * g.out_h * g.out_w == 0) return grad;
  const auto c = coef.to(at::kDouble).contiguous();
  const Launch l = launch_shape(g);
  auto stream = c10::cuda::getCurrentCUDAStream();
  NCL_FAST_DISPATCH_LOGITS(logits.scalar_type(), "pc_bce_backward_cuda", [&] {
    NCL_FAST_DISPATCH_MASK(mask.scalar_type(), "pc_bce_backward", [&] {
      pc_bce_backward_kernel<scalar_t, mask_t><<<l.grid, kThreads, l.smem, stream>>>(
          logits.data_ptr<scalar_t>(), strides_of(logits), mask.data_ptr<mask_t>(), strides_of(mask),
          c.data_ptr<double>(), g, grad.data_ptr<scalar_t>(), strides_of(grad));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad;
}

}  // namespace ncl_fast

TORCH_LIBRARY_IMPL(ncl_fast, CUDA, m) {
  m.impl("pc_bce_stats", &ncl_fast::pc_bce_stats_cuda);
  m.impl("pc_bce_backward", &ncl_fast::pc_bce_backward_cuda);
}
