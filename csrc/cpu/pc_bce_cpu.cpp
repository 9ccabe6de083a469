// Pivot-consistent BCE on the CPU (see pc_bce.h). One image per task; the
// per-image sums are float64 and added in image order, so the result does not
// depend on the thread count.
#include <ATen/AccumulateType.h>
#include <ATen/Parallel.h>
#include <torch/types.h>

#include <cmath>
#include <vector>

#include "../dispatch.h"
#include "../pc_bce.h"

namespace ncl_fast {
namespace {

// G (shrunk mask) and E (contour band) of image b, each (out_h, out_w) row-major.
template <typename mask_t>
void contour_maps(const at::Tensor& mask, const PcGeometry& g, int64_t b, std::vector<uint8_t>& G,
                  std::vector<uint8_t>& E) {
  const mask_t* m = mask.data_ptr<mask_t>() + b * mask.stride(0);
  const int64_t my = mask.stride(2), mx = mask.stride(3);
  const int64_t ho = g.out_h, wo = g.out_w, r = g.radius;
  const int64_t area = g.stride_y * g.stride_x;
  G.assign(ho * wo, 0);
  E.assign(ho * wo, 0);
  for (int64_t y = 0; y < ho; ++y) {
    for (int64_t x = 0; x < wo; ++x) {
      int64_t count = 0;
      for (int64_t dy = 0; dy < g.stride_y; ++dy) {
        const mask_t* row = m + (y * g.stride_y + dy) * my + x * g.stride_x * mx;
        for (int64_t dx = 0; dx < g.stride_x; ++dx) count += static_cast<float>(row[dx * mx]) > 0.5f;
      }
      G[y * wo + x] = 2 * count >= area;  // area mean >= 0.5, in integers
    }
  }
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

}  // namespace

at::Tensor pc_bce_stats_cpu(const at::Tensor& logits, const at::Tensor& mask, int64_t radius) {
  const PcGeometry g = check_pc_inputs(logits, mask, radius, "pc_bce_stats");
  TORCH_CHECK_VALUE(logits.is_cpu(), "pc_bce_stats_cpu: logits must be on the CPU");
  std::vector<double> band_sum(g.batch, 0.0), band_n(g.batch, 0.0), total(g.batch, 0.0);
  NCL_FAST_DISPATCH_LOGITS(logits.scalar_type(), "pc_bce_stats_cpu", [&] {
    NCL_FAST_DISPATCH_MASK(mask.scalar_type(), "pc_bce_stats", [&] {
      using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
      const scalar_t* z = logits.data_ptr<scalar_t>();
      const int64_t zb = logits.stride(0), zy = logits.stride(2), zx = logits.stride(3);
      at::parallel_for(0, g.batch, 1, [&](int64_t begin, int64_t end) {
        std::vector<uint8_t> G, E;
        for (int64_t b = begin; b < end; ++b) {
          contour_maps<mask_t>(mask, g, b, G, E);
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
  });
  double bs = 0, bn = 0, t = 0;
  for (int64_t b = 0; b < g.batch; ++b) {  // fixed order: deterministic
    bs += band_sum[b];
    bn += band_n[b];
    t += total[b];
  }
  auto stats = at::empty({3}, logits.options().dtype(at::kDouble));
  double* s = stats.data_ptr<double>();
  s[0] = bs;
  s[1] = bn;
  s[2] = t;
  return stats;
}

at::Tensor pc_bce_backward_cpu(const at::Tensor& logits, const at::Tensor& mask, const at::Tensor& coef,
                               int64_t radius) {
  const PcGeometry g = check_pc_inputs(logits, mask, radius, "pc_bce_backward");
  TORCH_CHECK_VALUE(coef.numel() == 2 && coef.device() == logits.device(),
                    "pc_bce_backward: coef must hold 2 values on the logits' device");
  const auto c = coef.to(at::kDouble).contiguous();
  const double c_band = c.data_ptr<double>()[0], c_all = c.data_ptr<double>()[1];
  auto grad = at::empty_like(logits);
  NCL_FAST_DISPATCH_LOGITS(logits.scalar_type(), "pc_bce_backward_cpu", [&] {
    NCL_FAST_DISPATCH_MASK(mask.scalar_type(), "pc_bce_backward", [&] {
      using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
      const scalar_t* z = logits.data_ptr<scalar_t>();
      scalar_t* dz = grad.data_ptr<scalar_t>();
      const int64_t zb = logits.stride(0), zy = logits.stride(2), zx = logits.stride(3);
      const int64_t gb = grad.stride(0), gy = grad.stride(2), gx = grad.stride(3);
      at::parallel_for(0, g.batch, 1, [&](int64_t begin, int64_t end) {
        std::vector<uint8_t> G, E;
        for (int64_t b = begin; b < end; ++b) {
          contour_maps<mask_t>(mask, g, b, G, E);
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
  });
  return grad;
}

}  // namespace ncl_fast
