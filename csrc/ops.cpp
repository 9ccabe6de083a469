// The extension module: the op schemas, the input checks, the CPU kernels'
// registration and the pybind11 module (build diagnostics).
#include <torch/extension.h>
#include <torch/library.h>

#include "pc_bce.h"

#ifdef NCL_FAST_WITH_CUDA
#include <cuda_runtime_api.h>  // CUDART_VERSION
#endif

namespace ncl_fast {

PcGeometry check_pc_inputs(const at::Tensor& logits, const at::Tensor& mask, int64_t radius, const char* op) {
  TORCH_CHECK_VALUE(logits.dim() == 4 && logits.size(1) == 1, op, ": logits must have shape (B, 1, h, w), got ",
                    logits.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(logits.scalar_type()), op,
                    ": logits must be floating point (fp32, fp16, bf16 or fp64), got ", logits.scalar_type());
  TORCH_CHECK_VALUE(mask.dim() == 4 && mask.size(1) == 1, op,
                    ": mask must have shape (B, 1, H, W), got ", mask.sizes(), "; add the channel axis with unsqueeze(1)");
  TORCH_CHECK_VALUE(logits.size(0) == mask.size(0), op, ": batch sizes differ (logits has ", logits.size(0),
                    ", mask has ", mask.size(0), ")");
  TORCH_CHECK_VALUE(logits.device() == mask.device(), op, ": logits are on ", logits.device(), " and the mask on ",
                    mask.device(), "; move them to one device");
  TORCH_CHECK_VALUE(radius >= 0, op, ": radius must be a non-negative integer, got ", radius);
  TORCH_CHECK_VALUE(mask.size(0) > 0, op, ": empty batch (B = 0)");
  PcGeometry g;
  g.batch = mask.size(0);
  g.height = mask.size(2);
  g.width = mask.size(3);
  g.out_h = logits.size(2);
  g.out_w = logits.size(3);
  g.radius = radius;
  TORCH_CHECK_VALUE(g.out_h > 0 && g.out_w > 0 && g.height % g.out_h == 0 && g.width % g.out_w == 0, op,
                    ": the prediction's stride is not an integer: mask ", g.height, "x", g.width, ", prediction ",
                    g.out_h, "x", g.out_w, "; H / h and W / w must be integers");
  g.stride_y = g.height / g.out_h;
  g.stride_x = g.width / g.out_w;
  return g;
}

std::vector<PcGeometry> check_pc_scales(at::TensorList logits, const at::Tensor& mask, int64_t radius,
                                        const char* op) {
  TORCH_CHECK_VALUE(!logits.empty(), op, ": needs at least one prediction");
  TORCH_CHECK_VALUE(logits.size() <= 4, op, ": at most 4 predictions (scales) per call, got ", logits.size());
  std::vector<PcGeometry> geoms;
  for (const auto& z : logits) {
    TORCH_CHECK_VALUE(z.scalar_type() == logits[0].scalar_type(), op,
                      ": every prediction must have one dtype, got ", logits[0].scalar_type(), " and ",
                      z.scalar_type());
    geoms.push_back(check_pc_inputs(z, mask, radius, op));
  }
  return geoms;
}

}  // namespace ncl_fast

TORCH_LIBRARY(ncl_fast, m) {
  m.def("pc_loss_fwd(Tensor[] logits, Tensor mask, float mu, int radius) -> (Tensor, Tensor)");
  m.def("pc_loss_bwd(Tensor grad_loss, Tensor[] logits, Tensor mask, Tensor stats, float mu, int radius) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(ncl_fast, CPU, m) {
  m.impl("pc_loss_fwd", &ncl_fast::pc_loss_fwd_cpu);
  m.impl("pc_loss_bwd", &ncl_fast::pc_loss_bwd_cpu);
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef NCL_FAST_WITH_CUDA
  info["with_cuda"] = true;
  info["cuda_runtime_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
#else
  info["with_cuda"] = false;
#endif
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#endif
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                          std::to_string(TORCH_VERSION_PATCH);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ncl_fast C++/CUDA ops (registered as torch.ops.ncl_fast.*)";
  m.def("build_info", &build_info, "How this extension was built: CUDA or not, versions, compiler.");
}
