// Autograd of pc_loss_fwd, in C++ (the Autograd dispatch key): the forward and
// the backward of `pc_loss(...).backward()` stay in the dispatcher, with no
// Python autograd.Function, pytree or setup_context on the way.
//
// The forward redispatches below autograd to the device kernel (CPU or CUDA)
// and saves the logits, the mask and the float64 stats; the backward calls
// pc_loss_bwd through the dispatcher, so torch.compile (AOTAutograd) traces it
// like any other op (the fake kernels are registered in ncl_fast/_cuda_ops.py).
// Only the loss carries a gradient: the stats are marked non-differentiable.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace ncl_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Typed handles, looked up once (the dispatcher's table does not move).
std::tuple<at::Tensor, at::Tensor> call_pc_loss_fwd(at::TensorList logits, const at::Tensor& mask, double mu,
                                                    int64_t radius) {
  static const auto op = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("ncl_fast::pc_loss_fwd", "")
                              .typed<std::tuple<at::Tensor, at::Tensor>(at::TensorList, const at::Tensor&, double,
                                                                        int64_t)>();
  return op.call(logits, mask, mu, radius);
}

std::vector<at::Tensor> call_pc_loss_bwd(const at::Tensor& grad_loss, at::TensorList logits, const at::Tensor& mask,
                                         const at::Tensor& stats, double mu, int64_t radius) {
  static const auto op = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("ncl_fast::pc_loss_bwd", "")
                              .typed<std::vector<at::Tensor>(const at::Tensor&, at::TensorList, const at::Tensor&,
                                                             const at::Tensor&, double, int64_t)>();
  return op.call(grad_loss, logits, mask, stats, mu, radius);
}

class PcLossFunction : public torch::autograd::Function<PcLossFunction> {
 public:
  // Inputs, in the order the backward returns their gradients: every logits
  // tensor, then mask, mu, radius (no gradient).
  static variable_list forward(AutogradContext* ctx, at::TensorList logits, const at::Tensor& mask, double mu,
                               int64_t radius) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, stats] = call_pc_loss_fwd(logits, mask, mu, radius);
    variable_list saved(logits.begin(), logits.end());
    saved.push_back(mask);
    saved.push_back(stats);
    ctx->save_for_backward(std::move(saved));
    ctx->saved_data["mu"] = mu;
    ctx->saved_data["radius"] = radius;
    ctx->mark_non_differentiable({stats});
    // No zeros for the stats' (always absent) gradient: one allocation and fill fewer.
    ctx->set_materialize_grads(false);
    return {loss, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const size_t n_logits = saved.size() - 2;
    if (!grad_outputs[0].defined()) return variable_list(n_logits + 3);  // no gradient reached the loss
    const at::TensorList logits(saved.data(), n_logits);
    const at::Tensor& mask = saved[n_logits];
    const at::Tensor& stats = saved[n_logits + 1];
    auto grads = call_pc_loss_bwd(grad_outputs[0], logits, mask, stats, ctx->saved_data["mu"].toDouble(),
                                  ctx->saved_data["radius"].toInt());
    variable_list out(std::make_move_iterator(grads.begin()), std::make_move_iterator(grads.end()));
    out.resize(n_logits + 3);  // mask, mu, radius: no gradient
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> pc_loss_fwd_autograd(at::TensorList logits, const at::Tensor& mask, double mu,
                                                        int64_t radius) {
  auto out = PcLossFunction::apply(logits, mask, mu, radius);
  return {std::move(out[0]), std::move(out[1])};
}

}  // namespace
}  // namespace ncl_fast

TORCH_LIBRARY_IMPL(ncl_fast, Autograd, m) { m.impl("pc_loss_fwd", &ncl_fast::pc_loss_fwd_autograd); }
