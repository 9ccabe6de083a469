// Pivot-consistent BCE (SPEC.md section 6): shared declarations.
//
// One prediction Z (B, 1, h_o, w_o) of logits against the full-resolution mask
// M (B, 1, H, W), s_y = H / h_o, s_x = W / w_o integers:
//   G = 1[mean over the s_y x s_x window of (M > 0.5) >= 0.5]
//   E = 1[the (2r+1)^2 window of G, clipped at the borders, holds both 0 and 1]
//   l = max(z, 0) - z g + log(1 + exp(-|z|))
//   L_PC(Z) = mu sum_E l / |E| + (1 - mu) sum l / n   (the band term is 0 when |E| = 0)
// pc_loss_fwd takes every scale's prediction at once and returns the loss
// sum_s L_PC(Z_s) (fp32; fp64 for fp64 logits) and the float64 stats
// (S, 3) = [sum_E l, |E|, sum l] per scale, which the backward reads on the device.
// pc_loss_bwd returns, per scale,
//   dL/dz = (sigmoid(z) - g) * grad_loss * (mu [in E] / |E| + (1 - mu) / n).
#pragma once

#include <torch/types.h>

#include <tuple>
#include <vector>

namespace ncl_fast {

// Geometry of one prediction against its mask, validated by check_pc_inputs.
struct PcGeometry {
  int64_t batch, height, width;  // mask
  int64_t out_h, out_w;          // prediction
  int64_t stride_y, stride_x;    // H / h_o, W / w_o
  int64_t radius;
};

// Checks shapes, dtypes, devices and integer strides; throws ValueError
// (TORCH_CHECK_VALUE) with a message that says what to do.
PcGeometry check_pc_inputs(const at::Tensor& logits, const at::Tensor& mask, int64_t radius, const char* op);
// The same for every scale, plus: at least one, one dtype and one device for all.
std::vector<PcGeometry> check_pc_scales(at::TensorList logits, const at::Tensor& mask, int64_t radius,
                                        const char* op);

std::tuple<at::Tensor, at::Tensor> pc_loss_fwd_cpu(at::TensorList logits, const at::Tensor& mask, double mu,
                                                   int64_t radius);
std::vector<at::Tensor> pc_loss_bwd_cpu(const at::Tensor& grad_loss, at::TensorList logits, const at::Tensor& mask,
                                        const at::Tensor& stats, double mu, int64_t radius);

#ifdef NCL_FAST_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> pc_loss_fwd_cuda(at::TensorList logits, const at::Tensor& mask, double mu,
                                                    int64_t radius);
std::vector<at::Tensor> pc_loss_bwd_cuda(const at::Tensor& grad_loss, at::TensorList logits, const at::Tensor& mask,
                                         const at::Tensor& stats, double mu, int64_t radius);
#endif

// The loss from the stats of every scale, in float64.
inline double pc_loss_from_stats(const double* stats, const std::vector<PcGeometry>& geoms, double mu) {
  double loss = 0;
  for (size_t s = 0; s < geoms.size(); ++s) {
    const double n = double(geoms[s].batch * geoms[s].out_h * geoms[s].out_w);
    const double band_n = stats[3 * s + 1];
    loss += (band_n > 0 ? mu * stats[3 * s] / band_n : 0.0) + (n > 0 ? (1 - mu) * stats[3 * s + 2] / n : 0.0);
  }
  return loss;
}

}  // namespace ncl_fast
