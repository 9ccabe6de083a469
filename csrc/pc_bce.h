// Pivot-consistent BCE (SPEC.md section 6): shared declarations.
//
// One prediction Z (B, 1, h_o, w_o) of logits against the full-resolution mask
// M (B, 1, H, W), s_y = H / h_o, s_x = W / w_o integers:
//   G = 1[mean over the s_y x s_x window of (M > 0.5) >= 0.5]
//   E = 1[the (2r+1)^2 window of G, clipped at the borders, holds both 0 and 1]
//   l = max(z, 0) - z g + log(1 + exp(-|z|))
// pc_bce_stats returns float64 [sum_E l, |E|, sum l] over the whole batch; the
// loss mu * sum_E l / |E| + (1 - mu) * sum l / n is formed from them on the
// device by the caller, so the op never synchronizes with the host.
// pc_bce_backward returns dL/dz = (sigmoid(z) - g) * (coef[0] [in E] + coef[1]),
// coef = (dL/d sum_E l, dL/d sum l), a 2-element tensor on the logits' device.
#pragma once

#include <torch/types.h>

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

at::Tensor pc_bce_stats_cpu(const at::Tensor& logits, const at::Tensor& mask, int64_t radius);
at::Tensor pc_bce_backward_cpu(const at::Tensor& logits, const at::Tensor& mask, const at::Tensor& coef,
                               int64_t radius);

#ifdef NCL_FAST_WITH_CUDA
at::Tensor pc_bce_stats_cuda(const at::Tensor& logits, const at::Tensor& mask, int64_t radius);
at::Tensor pc_bce_backward_cuda(const at::Tensor& logits, const at::Tensor& mask, const at::Tensor& coef,
                                int64_t radius);
#endif

}  // namespace ncl_fast
