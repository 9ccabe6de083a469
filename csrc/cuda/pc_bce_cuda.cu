// Pivot-consistent BCE on CUDA (see pc_bce.h): every scale in two launches each way.
//
// 1. pc_mask_bits_kernel reads the full-resolution mask once, for all scales,
//    and writes its bits (pc_bits.h: 1[M > 0.5], one bit a pixel, 1/32 of a
//    float32 mask's bytes): each warp turns 32-pixel runs of a row into words
//    with __ballot_sync, its loads coalesced. The forward's also zeroes the
//    stats kernel's block counter (no memset).
// 2. The stats (forward) and backward kernels never read the mask: one block
//    per TILE_H x TILE_W tile of a prediction; the blocks of all scales form one
//    1-D grid (each block finds its scale from the scales' first blocks). The
//    block computes the shrunk mask G of its tile plus a halo of `radius` cells
//    into shared memory (each cell counts its s_y x s_x window in the bits with
//    popcounts: s_y words for s_x <= 32 and aligned windows; the words come from
//    L2, the bits of a B = 4, 512 x 512 batch being 128 KiB), finds the contour
//    band with two separable passes (row windows, then column windows, each an
//    OR of "saw a 0" / "saw a 1" bits), and then each thread handles one
//    prediction pixel.
// Forward: per-block partial sums (warp shuffles, fixed order) go to a buffer;
// the last block to finish (an integer counter, zeroed by the bits kernel)
// adds them up per scale in float64 in a fixed order and turns them into
// the loss, and the result is the same bit for bit from run to run
// (no float atomics; which block comes last changes nothing in the order of the
// sums). Backward: one pass writing (sigmoid(z) - g) * (c_band [in E] + c_all),
// the coefficients read from the stats and grad_loss on the device.
#include <ATen/AccumulateType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/types.h>

#include <type_traits>

#include "../dispatch.h"
#include "../pc_bce.h"
#include "../pc_bits.h"

namespace ncl_fast {
namespace {

// 32 columns: a warp reads one row of logits, coalesced. 8 rows: 256 threads,
// enough warps per block to hide the bits' loads, and a halo overhead of
// (8 + 2r)(32 + 2r) / 256 = 1.6x cells at the default r = 2.
constexpr int kTileW = 32;
constexpr int kTileH = 8;
constexpr int kThreads = kTileW * kTileH;
constexpr int kWarps = kThreads / 32;
// Halo bytes at r: (8 + 2r)(32 + 2r) + (8 + 2r) 32; r = 64 needs 26 KiB, inside
// the 48 KiB of shared memory any launch may use without opting in.
constexpr int64_t kMaxRadius = 64;

struct Strides {
  int64_t b, y, x;
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(2), t.stride(3)}; }

// The mask's bits (pc_bits.h), (B * H, row_words) words. Warp w of the grid
// makes the words of bits_run(w) (pc_bits.h: up to 32 words of one row): for
// word j, lane l reads pixel run_pixel(run, j, l) (a coalesced load,
// kBitsUnroll words in flight), the ballot of the 32 lanes is the word, and
// lane j keeps word j, so that the warp's stores are coalesced too. zero_me (the
// stats kernel's block counter, or null) is set to 0.
constexpr int kBitsUnroll = 8;

template <typename mask_t>
__global__ void __launch_bounds__(kThreads)
    pc_mask_bits_kernel(const mask_t* __restrict__ mask, Strides ms, int64_t height, int64_t width, int64_t rows,
                        uint32_t* __restrict__ bits, unsigned int* zero_me) {
  if (zero_me && blockIdx.x == 0 && threadIdx.x == 0) *zero_me = 0;
  const int64_t warp = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t row_words = bit_row_words(width);
  if (warp >= bits_runs(rows, row_words)) return;  // the whole warp: the ballots below see full warps only
  const BitsRun run = bits_run(warp, row_words);
  const mask_t* src = mask + mask_row_offset(run.row, height, ms.b, ms.y);
  uint32_t mine = 0;
  for (int j0 = 0; j0 < run.n_words; j0 += kBitsUnroll) {  // the same trip count for every lane
    bool v[kBitsUnroll];
#pragma unroll
    for (int u = 0; u < kBitsUnroll; ++u) {
      const int64_t x = run_pixel(run, j0 + u, lane);
      v[u] = j0 + u < run.n_words && x < width && static_cast<float>(src[x * ms.x]) > 0.5f;
    }
#pragma unroll
    for (int u = 0; u < kBitsUnroll; ++u) {
      const uint32_t word = __ballot_sync(0xffffffffu, v[u]);  // bit l = lane l's pixel
      if (lane == j0 + u) mine = word;
    }
  }
  if (lane < run.n_words) bits[run.row * row_words + run.word0 + lane] = mine;
}

// Fill sG ((kTileH + 2r) x (kTileW + 2r): 0, 1, or 2 outside the image) and
// sH ((kTileH + 2r) x kTileW: bit 0 = a 0 in the row window, bit 1 = a 1).
__device__ __forceinline__ void load_tile(const uint32_t* __restrict__ bits, const PcGeometry& g, int64_t b,
                                          int64_t y0, int64_t x0, uint8_t* sG, uint8_t* sH) {
  const int r = static_cast<int>(g.radius);
  const int halo_w = kTileW + 2 * r, halo_h = kTileH + 2 * r;
  const int64_t row_words = bit_row_words(g.width);
  const uint32_t* image = bits + b * g.height * row_words;
  for (int i = threadIdx.x; i < halo_h * halo_w; i += kThreads) {
    const int64_t y = y0 - r + i / halo_w, x = x0 - r + i % halo_w;
    uint8_t v = 2;
    if (y >= 0 && y < g.out_h && x >= 0 && x < g.out_w)
      v = cell_target(image, row_words, g.stride_y, g.stride_x, y, x);  // the cell's window, counted in the bits
    sG[i] = v;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < halo_h * kTileW; i += kThreads) {
    const int hy = i / kTileW, tx = i % kTileW;
    uint8_t seen = 0;
    for (int dx = 0; dx <= 2 * r; ++dx) {
      const uint8_t v = sG[hy * halo_w + tx + dx];
      seen |= v == 0 ? 1 : (v == 1 ? 2 : 0);
    }
    sH[i] = seen;
  }
  __syncthreads();
}

// For this thread's pixel: is it in the band, and its g.
__device__ __forceinline__ void pixel_band(const PcGeometry& g, const uint8_t* sG, const uint8_t* sH, int ty, int tx,
                                           bool* band, uint8_t* gt) {
  const int r = static_cast<int>(g.radius);
  uint8_t seen = 0;
  for (int dy = 0; dy <= 2 * r; ++dy) seen |= sH[(ty + dy) * kTileW + tx];
  *band = seen == 3;  // the clipped window holds a 0 and a 1: max != min
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

constexpr int kMaxScales = 4;

// One prediction of a multi-scale call.
template <typename scalar_t>
struct Scale {
  const scalar_t* logits;
  scalar_t* grad;  // backward only
  Strides zs, gs;
  PcGeometry g;
  int64_t tiles_x, tiles_y;
  int64_t first_block;  // in the launch's 1-D grid
};

template <typename scalar_t>
struct Scales {
  Scale<scalar_t> s[kMaxScales];
  int n;
};

// This block's scale and tile: (scale index, image, first row, first column).
template <typename scalar_t>
__device__ __forceinline__ int locate(const Scales<scalar_t>& sc, int64_t* b, int64_t* y0, int64_t* x0) {
  const int64_t block = blockIdx.x;
  int k = 0;
  while (k + 1 < sc.n && block >= sc.s[k + 1].first_block) ++k;
  const Scale<scalar_t>& s = sc.s[k];
  const int64_t local = block - s.first_block;
  const int64_t per_image = s.tiles_x * s.tiles_y;
  *b = local / per_image;
  *y0 = (local % per_image) / s.tiles_x * kTileH;
  *x0 = (local % per_image) % s.tiles_x * kTileW;
  return k;
}

// This thread's prediction pixel: its scale, position, ground truth and band flag.
struct Pixel {
  int scale;
  int64_t b, y, x;
  bool valid, band;
  uint8_t gt;
};

// Every thread of the block: find the tile, build its G and band bits in shared
// memory (synchronizes the block), then read this thread's pixel.
template <typename scalar_t>
__device__ __forceinline__ Pixel visit_pixel(const Scales<scalar_t>& sc, const uint32_t* __restrict__ bits,
                                             uint8_t* smem) {
  Pixel px;
  int64_t y0, x0;
  px.scale = locate(sc, &px.b, &y0, &x0);
  const PcGeometry& g = sc.s[px.scale].g;
  const int r = static_cast<int>(g.radius);
  uint8_t* sG = smem;
  uint8_t* sH = smem + (kTileH + 2 * r) * (kTileW + 2 * r);
  load_tile(bits, g, px.b, y0, x0, sG, sH);
  const int ty = threadIdx.x / kTileW, tx = threadIdx.x % kTileW;
  px.y = y0 + ty;
  px.x = x0 + tx;
  px.valid = px.y < g.out_h && px.x < g.out_w;
  px.band = false;
  px.gt = 0;
  if (px.valid) pixel_band(g, sG, sH, ty, tx, &px.band, &px.gt);
  return px;
}

struct ReduceArgs {
  int64_t first_block[kMaxScales + 1];  // scale k owns blocks [first_block[k], first_block[k + 1])
  double numel[kMaxScales];             // B * h_o * w_o
  int n;
};

// Run by every thread of the stats kernel's last block: stats[k] = the sums of
// scale k's partials (float64, a fixed order: thread t adds blocks t, t + 256,
// ... in order, then the warp sums in order) and the loss from them.
// Not inlined: its float64 registers would otherwise count against every block
// of the launch (inlined, the stats kernel took 40 registers, 6 blocks of 256
// threads per SM; with this call it keeps the 32 of its two-launch form, 8 blocks).
template <typename loss_t>
__device__ __noinline__ void reduce_partials(const double* partials, const ReduceArgs& ra, double mu, double* __restrict__ stats,
                                loss_t* __restrict__ loss) {
  __shared__ double warp_acc[3][kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  double total_loss = 0;  // meaningful in thread 0
  // Unrolled over the largest scale count, so that ra's arrays are indexed by
  // constants: a dynamic index would copy the struct to local memory (a stack
  // frame) in every block of the launch, not only in the last one.
#pragma unroll
  for (int k = 0; k < kMaxScales; ++k) {
    if (k >= ra.n) break;  // the same for every thread of the block
    // (the q loops are unrolled so that acc and sums stay in registers)
    double acc[3] = {0, 0, 0};
    for (int64_t i = ra.first_block[k] + threadIdx.x; i < ra.first_block[k + 1]; i += kThreads) {
#pragma unroll
      for (int q = 0; q < 3; ++q) acc[q] += __ldcg(partials + i * 3 + q);  // from L2: other blocks wrote them
    }
#pragma unroll
    for (int q = 0; q < 3; ++q) {
      acc[q] = warp_sum(acc[q]);
      if (lane == 0) warp_acc[q][warp] = acc[q];
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      double sums[3] = {0, 0, 0};
#pragma unroll
      for (int q = 0; q < 3; ++q)
        for (int w = 0; w < kWarps; ++w) sums[q] += warp_acc[q][w];
      const double band_sum = sums[0], band_n = sums[1], sum = sums[2];
      stats[3 * k] = band_sum;
      stats[3 * k + 1] = band_n;
      stats[3 * k + 2] = sum;
      total_loss += (band_n > 0 ? mu * band_sum / band_n : 0.0) + (1 - mu) * sum / ra.numel[k];
    }
    __syncthreads();  // warp_acc is reused by the next scale
  }
  if (threadIdx.x == 0) *loss = static_cast<loss_t>(total_loss);
}

// partials: (gridDim.x, 3) float64, written here; blocks_done: 0 at launch.
// 5 blocks per SM (1280 threads): up to 48 registers. ptxas takes 46-48 on
// sm_80 and 48 on sm_90, with no spills (bound to 6 blocks, 40 registers, the
// cell counts in the bits spilled 28 B on sm_80).
template <typename scalar_t, typename loss_t>
__global__ void __launch_bounds__(kThreads, 5)
    pc_loss_stats_kernel(Scales<scalar_t> sc, const uint32_t* __restrict__ bits, double* partials,
                         unsigned int* blocks_done, ReduceArgs ra, double mu, double* __restrict__ stats,
                         loss_t* __restrict__ loss) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  extern __shared__ uint8_t smem[];
  const Pixel px = visit_pixel(sc, bits, smem);
  const Scale<scalar_t>& s = sc.s[px.scale];
  acc_t band_sum = 0, band_n = 0, total = 0;
  if (px.valid) {
    const acc_t z = static_cast<acc_t>(s.logits[px.b * s.zs.b + px.y * s.zs.y + px.x * s.zs.x]);
    // BCE with logits: max(z, 0) - z g + log(1 + exp(-|z|))
    const acc_t l = (z > 0 ? z : acc_t(0)) - z * acc_t(px.gt) + log1p_(exp_(-abs_(z)));
    total = l;
    if (px.band) {
      band_sum = l;
      band_n = 1;
    }
  }
  // 1. Block sum in a fixed order: warp shuffles, then one thread per quantity over the warps.
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
    double sum = 0;
    for (int w = 0; w < kWarps; ++w) sum += static_cast<double>(warp_part[threadIdx.x][w]);
    partials[int64_t(blockIdx.x) * 3 + threadIdx.x] = sum;
  }
  // 2. Count this block as done; the last one adds up every partial. The fence
  // orders this block's partial stores before its count (the CUDA programming
  // guide's last-block pattern, threadFenceReduction).
  __shared__ bool last_block;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last_block = atomicAdd(blocks_done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  reduce_partials(partials, ra, mu, stats, loss);
}

template <typename scalar_t, typename loss_t>
__global__ void __launch_bounds__(kThreads) pc_loss_backward_kernel(Scales<scalar_t> sc,
                                                                    const uint32_t* __restrict__ bits,
                                                                    const double* __restrict__ stats,
                                                                    const loss_t* __restrict__ grad_loss, double mu) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  extern __shared__ uint8_t smem[];
  const Pixel px = visit_pixel(sc, bits, smem);
  if (!px.valid) return;
  const Scale<scalar_t>& s = sc.s[px.scale];
  const PcGeometry& g = s.g;
  const double gl = static_cast<double>(*grad_loss);
  const double band_n = stats[3 * px.scale + 1];
  const acc_t c_all = static_cast<acc_t>(gl * (1 - mu) / double(g.batch * g.out_h * g.out_w));
  const acc_t c_band = band_n > 0 ? static_cast<acc_t>(gl * mu / band_n) : acc_t(0);
  const acc_t w = px.band ? c_band + c_all : c_all;
  const acc_t z = static_cast<acc_t>(s.logits[px.b * s.zs.b + px.y * s.zs.y + px.x * s.zs.x]);
  const acc_t sig = acc_t(1) / (acc_t(1) + exp_(-z));
  s.grad[px.b * s.gs.b + px.y * s.gs.y + px.x * s.gs.x] = static_cast<scalar_t>((sig - acc_t(px.gt)) * w);
}

size_t smem_bytes(int64_t radius) {
  TORCH_CHECK_VALUE(radius <= kMaxRadius, "pc_loss (CUDA): radius ", radius, " is above the supported ",
                    kMaxRadius, " pixels; use the CPU or the reference for wider bands");
  return static_cast<size_t>((kTileH + 2 * radius) * (kTileW + 2 * radius) + (kTileH + 2 * radius) * kTileW);
}

// Scales of one launch; grads empty in the forward. Returns the total block count.
template <typename scalar_t>
int64_t make_scales(at::TensorList logits, const std::vector<PcGeometry>& geoms, std::vector<at::Tensor>* grads,
                    Scales<scalar_t>* sc, ReduceArgs* ra) {
  int64_t blocks = 0;
  sc->n = static_cast<int>(logits.size());
  if (ra) ra->n = sc->n;
  for (int k = 0; k < sc->n; ++k) {
    Scale<scalar_t>& s = sc->s[k];
    s.logits = logits[k].data_ptr<scalar_t>();
    s.zs = strides_of(logits[k]);
    s.grad = grads ? (*grads)[k].data_ptr<scalar_t>() : nullptr;
    s.gs = grads ? strides_of((*grads)[k]) : s.zs;
    s.g = geoms[k];
    s.tiles_x = (geoms[k].out_w + kTileW - 1) / kTileW;
    s.tiles_y = (geoms[k].out_h + kTileH - 1) / kTileH;
    s.first_block = blocks;
    if (ra) {
      ra->first_block[k] = blocks;
      ra->numel[k] = double(geoms[k].batch * geoms[k].out_h * geoms[k].out_w);
    }
    blocks += s.tiles_x * s.tiles_y * geoms[k].batch;
  }
  if (ra) ra->first_block[sc->n] = blocks;
  TORCH_CHECK_VALUE(blocks < (int64_t(1) << 31), "pc_loss (CUDA): the predictions are too large for one launch");
  return blocks;
}

// The mask's bits on the device (pc_bits.h): (B, H, row_words) words; blocks_done
// (or null) zeroed by the same launch.
at::Tensor mask_bits_cuda(const at::Tensor& mask, unsigned int* blocks_done, cudaStream_t stream) {
  const int64_t B = mask.size(0), H = mask.size(2), W = mask.size(3), row_words = bit_row_words(W);
  auto bits = at::empty({B, H, row_words}, mask.options().dtype(at::kInt));
  const int64_t rows = B * H;
  const int64_t blocks = (bits_runs(rows, row_words) + kWarps - 1) / kWarps;
  TORCH_CHECK_VALUE(blocks < (int64_t(1) << 31), "pc_loss (CUDA): the mask is too large for one launch");
  NCL_FAST_DISPATCH_MASK(mask.scalar_type(), "pc_loss", [&] {
    pc_mask_bits_kernel<mask_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        mask.data_ptr<mask_t>(), strides_of(mask), H, W, rows,
        reinterpret_cast<uint32_t*>(bits.data_ptr<int32_t>()), blocks_done);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return bits;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> pc_loss_fwd_cuda(at::TensorList logits, const at::Tensor& mask, double mu,
                                                    int64_t radius) {
  const auto geoms = check_pc_scales(logits, mask, radius, "pc_loss_fwd");
  TORCH_CHECK_VALUE(logits[0].is_cuda(), "pc_loss_fwd_cuda: logits must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(logits[0].device());
  const int64_t S = static_cast<int64_t>(logits.size());
  const auto loss_type = logits[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto stats = at::empty({S, 3}, logits[0].options().dtype(at::kDouble));
  auto loss = at::empty({}, logits[0].options().dtype(loss_type));
  const size_t smem = smem_bytes(radius);
  auto stream = c10::cuda::getCurrentCUDAStream();
  NCL_FAST_DISPATCH_LOGITS(logits[0].scalar_type(), "pc_loss_fwd_cuda", [&] {
    Scales<scalar_t> sc;
    ReduceArgs ra;
    const int64_t blocks = make_scales<scalar_t>(logits, geoms, nullptr, &sc, &ra);
    using loss_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    // (blocks, 3) partial sums, then one float64 slot whose first 4 bytes count the finished blocks
    auto partials = at::empty({blocks * 3 + 1}, logits[0].options().dtype(at::kDouble));
    auto* blocks_done = reinterpret_cast<unsigned int*>(partials.data_ptr<double>() + blocks * 3);
    const auto bits = mask_bits_cuda(mask, blocks_done, stream);  // also zeroes blocks_done
    pc_loss_stats_kernel<scalar_t, loss_t><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
        sc, reinterpret_cast<const uint32_t*>(bits.data_ptr<int32_t>()), partials.data_ptr<double>(), blocks_done,
        ra, mu, stats.data_ptr<double>(), loss.data_ptr<loss_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, stats};
}

std::vector<at::Tensor> pc_loss_bwd_cuda(const at::Tensor& grad_loss, at::TensorList logits, const at::Tensor& mask,
                                         const at::Tensor& stats, double mu, int64_t radius) {
  const auto geoms = check_pc_scales(logits, mask, radius, "pc_loss_bwd");
  const int64_t S = static_cast<int64_t>(logits.size());
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == S && stats.size(1) == 3 &&
                        stats.scalar_type() == at::kDouble && stats.device() == logits[0].device(),
                    "pc_loss_bwd: stats must be the float64 (", S, ", 3) tensor of pc_loss_fwd");
  TORCH_CHECK_VALUE(grad_loss.numel() == 1 && grad_loss.device() == logits[0].device(),
                    "pc_loss_bwd: grad_loss must be a scalar on the logits' device");
  const c10::cuda::CUDAGuard guard(logits[0].device());
  std::vector<at::Tensor> grads;
  for (const auto& z : logits) grads.push_back(at::empty_like(z));
  const size_t smem = smem_bytes(radius);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto st = stats.contiguous();
  NCL_FAST_DISPATCH_LOGITS(logits[0].scalar_type(), "pc_loss_bwd_cuda", [&] {
    using loss_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto gl = grad_loss.to(c10::CppTypeToScalarType<loss_t>::value).contiguous();
    Scales<scalar_t> sc;
    const int64_t blocks = make_scales<scalar_t>(logits, geoms, &grads, &sc, nullptr);
    const auto bits = mask_bits_cuda(mask, nullptr, stream);
    pc_loss_backward_kernel<scalar_t, loss_t><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
        sc, reinterpret_cast<const uint32_t*>(bits.data_ptr<int32_t>()), st.data_ptr<double>(),
        gl.data_ptr<loss_t>(), mu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grads;
}

}  // namespace ncl_fast

TORCH_LIBRARY_IMPL(ncl_fast, CUDA, m) {
  m.impl("pc_loss_fwd", &ncl_fast::pc_loss_fwd_cuda);
  m.impl("pc_loss_bwd", &ncl_fast::pc_loss_bwd_cuda);
}
