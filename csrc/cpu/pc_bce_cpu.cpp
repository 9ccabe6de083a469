// Pivot-consistent BCE on the CPU (see pc_bce.h), every scale of a prediction.
// Each pass first binarizes the mask into bits (pc_bits.h: one read of the mask
// for all scales), then finds every scale's g from the bits with the helpers the
// CUDA kernels use. One image per task; the per-image sums are float64 and added
// in image order, so the result does not depend on the thread count.
#include <ATen/AccumulateType.h>
#include <ATen/Parallel.h>
#include <torch/types.h>

#include <cmath>
#include <vector>

#include "../dispatch.h"
#include "../pc_bce.h"
#include "../pc_bits.h"

namespace ncl_fast {
namespace {

// The mask's bits (pc_bits.h), (B, H, row_words) 32-bit words: the CUDA bits
// kernel's map of work (bits_run), its warps' ballots done lane by lane here.
at::Tensor mask_bits_cpu(const at::Tensor& mask) {
  const int64_t B = mask.size(0), H = mask.size(2), W = mask.size(3), row_words = bit_row_words(W);
  auto bits = at::empty({B, H, row_words}, mask.options().dtype(at::kInt));
  uint32_t* out = reinterpret_cast<uint32_t*>(bits.data_ptr<int32_t>());
  NCL_FAST_DISPATCH_MASK(mask.scalar_type(), "pc_loss", [&] {
    const mask_t* m = mask.data_ptr<mask_t>();
    const int64_t mb = mask.stride(0), my = mask.stride(2), mx = mask.stride(3);
    at::parallel_for(0, bits_runs(B * H, row_words), 16, [&](int64_t begin, int64_t end) {
      for (int64_t warp = begin; warp < end; ++warp) {
        const BitsRun run = bits_run(warp, row_words);
        const mask_t* src = m + mask_row_offset(run.row, H, mb, my);
        for (int j = 0; j < run.n_words; ++j) {
          uint32_t word = 0;  // the ballot: bit l = lane l's pixel
          for (int lane = 0; lane < 32; ++lane) {
            const int64_t x = run_pixel(run, j, lane);
            word |= uint32_t(x < W && static_cast<float>(src[x * mx]) > 0.5f) << lane;
          }
          out[run.row * row_words + run.word0 + j] = word;  // on CUDA, lane j stores word j
        }
      }
    });
  });
  return bits;
}

// G (shrunk mask) and E (contour band) of image b, each (out_h, out_w) row-major.
void contour_maps(const uint32_t* bits, const PcGeometry& g, int64_t b, std::vector<uint8_t>& G,
                  std::vector<uint8_t>& E) {
  const int64_t row_words = bit_row_words(g.width);
  const uint32_t* image = bits + b * g.height * row_words;
  const int64_t ho = g.out_h, wo = g.out_w, r = g.radius;
  G.assign(ho * wo, 0);
  E.assign(ho * wo, 0);
  for (int64_t y = 0; y < ho; ++y)
    for (int64_t x = 0; x < wo; ++x) G[y * wo + x] = cell_target(image, row_words, g.stride_y, g.stride_x, y, x);
  if (r == 0) return;
  // Integral image of G: the count of ones in any clipped window in O(1).
  std::vector<int64_t> I((ho + 1) * (wo + 1), 0);
  for (int64_t y = 0; y < ho; ++y)
    for (int64_t x = 0; x < wo; ++x)
      I[(y + 1) * (wo + 1) + x + 1] = G[y * wo + x] + I[y * (wo + 1) + x + 1] + I[(y + 1) * (wo + 1) + x] -
                                      I[y * (wo + 1) + x];
  for (int64_t y = 0; y < ho; ++y) {
    const int64_t y0 = std::max<int64_t>(0, y - r), y1 = std::min<int64_t>(ho, y + r + 1);
    for (int64_t x = 0; x < wo; ++x) {
      const int64_t x0 = std::max<int64_t>(0, x - r), x1 = std::min<int64_t>(wo, x + r + 1);
      const int64_t ones = I[y1 * (wo + 1) + x1] - I[y0 * (wo + 1) + x1] - I[y1 * (wo + 1) + x0] + I[y0 * (wo + 1) + x0];
      E[y * wo + x] = ones > 0 && ones < (y1 - y0) * (x1 - x0);  // max != min
    }
  }
}

template <typename acc_t>
inline acc_t bce_with_logits(acc_t z, acc_t g) {
  return std::max(z, acc_t(0)) - z * g + std::log1p(std::exp(-std::abs(z)));
}

// [sum_E l, |E|, sum l] of one prediction, float64, summed image by image in order.
void stats_one(const at::Tensor& logits, const uint32_t* bits, const PcGeometry& g, double* out) {
  std::vector<double> band_sum(g.batch, 0.0), band_n(g.batch, 0.0), total(g.batch, 0.0);
  NCL_FAST_DISPATCH_LOGITS(logits.scalar_type(), "pc_loss_fwd_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
    const scalar_t* z = logits.data_ptr<scalar_t>();
    const int64_t zb = logits.stride(0), zy = logits.stride(2), zx = logits.stride(3);
    at::parallel_for(0, g.batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<uint8_t> G, E;
      for (int64_t b = begin; b < end; ++b) {
        contour_maps(bits, g, b, G, E);
        double bs = 0, bn = 0, t = 0;
        for (int64_t y = 0; y < g.out_h; ++y) {
          for (int64_t x = 0; x < g.out_w; ++x) {
            const acc_t l = bce_with_logits<acc_t>(static_cast<acc_t>(z[b * zb + y * zy + x * zx]),
                                                    static_cast<acc_t>(G[y * g.out_w + x]));
            t += l;
            if (E[y * g.out_w + x]) {
              bs += l;
              bn += 1;
            }
          }
        }
        band_sum[b] = bs;
        band_n[b] = bn;
        total[b] = t;
      }
    });
  });
  out[0] = out[1] = out[2] = 0;
  for (int64_t b = 0; b < g.batch; ++b) {  // fixed order: deterministic
    out[0] += band_sum[b];
    out[1] += band_n[b];
    out[2] += total[b];
  }
}

// dL/dz of one prediction: (sigmoid(z) - g) (c_band [in E] + c_all).
at::Tensor backward_one(const at::Tensor& logits, const uint32_t* bits, const PcGeometry& g, double c_band,
                        double c_all) {
  auto grad = at::empty_like(logits);
  NCL_FAST_DISPATCH_LOGITS(logits.scalar_type(), "pc_loss_bwd_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
    const scalar_t* z = logits.data_ptr<scalar_t>();
    scalar_t* dz = grad.data_ptr<scalar_t>();
    const int64_t zb = logits.stride(0), zy = logits.stride(2), zx = logits.stride(3);
    const int64_t gb = grad.stride(0), gy = grad.stride(2), gx = grad.stride(3);
    at::parallel_for(0, g.batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<uint8_t> G, E;
      for (int64_t b = begin; b < end; ++b) {
        contour_maps(bits, g, b, G, E);
        for (int64_t y = 0; y < g.out_h; ++y) {
          for (int64_t x = 0; x < g.out_w; ++x) {
            const int64_t i = y * g.out_w + x;
            const acc_t zz = static_cast<acc_t>(z[b * zb + y * zy + x * zx]);
            const acc_t sig = acc_t(1) / (acc_t(1) + std::exp(-zz));
            const acc_t w = static_cast<acc_t>(E[i] ? c_band + c_all : c_all);
            dz[b * gb + y * gy + x * gx] = static_cast<scalar_t>((sig - static_cast<acc_t>(G[i])) * w);
          }
        }
      }
    });
  });
  return grad;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> pc_loss_fwd_cpu(at::TensorList logits, const at::Tensor& mask, double mu,
                                                   int64_t radius) {
  const auto geoms = check_pc_scales(logits, mask, radius, "pc_loss_fwd");
  TORCH_CHECK_VALUE(logits[0].is_cpu(), "pc_loss_fwd_cpu: logits must be on the CPU");
  const int64_t S = static_cast<int64_t>(logits.size());
  auto stats = at::empty({S, 3}, logits[0].options().dtype(at::kDouble));
  double* st = stats.data_ptr<double>();
  const auto bits = mask_bits_cpu(mask);  // the mask read once, for every scale
  const uint32_t* bp = reinterpret_cast<const uint32_t*>(bits.data_ptr<int32_t>());
  for (int64_t s = 0; s < S; ++s) stats_one(logits[s], bp, geoms[s], st + 3 * s);
  const auto loss_type = logits[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto loss = at::scalar_tensor(pc_loss_from_stats(st, geoms, mu), logits[0].options().dtype(loss_type));
  return {loss, stats};
}

std::vector<at::Tensor> pc_loss_bwd_cpu(const at::Tensor& grad_loss, at::TensorList logits, const at::Tensor& mask,
                                        const at::Tensor& stats, double mu, int64_t radius) {
  const auto geoms = check_pc_scales(logits, mask, radius, "pc_loss_bwd");
  const int64_t S = static_cast<int64_t>(logits.size());
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == S && stats.size(1) == 3,
                    "pc_loss_bwd: stats must have shape (", S, ", 3), got ", stats.sizes());
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, "pc_loss_bwd: grad_loss must be a scalar");
  const auto st = stats.to(at::kDouble).contiguous();  // no copy for the float64 stats of pc_loss_fwd
  const double g = grad_loss.item<double>();
  const auto bits = mask_bits_cpu(mask);
  const uint32_t* bp = reinterpret_cast<const uint32_t*>(bits.data_ptr<int32_t>());
  std::vector<at::Tensor> grads;
  for (int64_t s = 0; s < S; ++s) {
    const double n = double(geoms[s].batch * geoms[s].out_h * geoms[s].out_w);
    const double band_n = st.data_ptr<double>()[3 * s + 1];
    const double c_band = band_n > 0 ? g * mu / band_n : 0.0;
    grads.push_back(backward_one(logits[s], bp, geoms[s], c_band, g * (1 - mu) / n));
  }
  return grads;
}

}  // namespace ncl_fast
