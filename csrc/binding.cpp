// sophon_fast._C: the backend-level ops of the C++ (CPU) and CUDA kernels, registered with the PyTorch
// dispatcher (the pattern of pytorch/extension-cpp): schemas in TORCH_LIBRARY_FRAGMENT(sophon_fast),
// implementations in TORCH_LIBRARY_IMPL for CPU and, when built WITH_CUDA, CUDA. The public custom ops
// (sophon_fast/ops/*.py: fake kernels, autograd, backend selection) call these as their "cpp" and "cuda"
// backends; their fake kernels are registered in sophon_fast/ops/_cext.py.
//
// Argument validation for users lives in ONE place, sophon_fast/ops/_checks.py, which runs before these
// ops are reached. The checks below only guard memory safety (layouts, dtypes, sizes of the buffers the
// kernels index) and raise c10::ValueError; target values are never checked here (that would be a
// data-dependent pass): the kernels turn an out-of-range target into a NaN row without reading it.
#include <torch/extension.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "cpu/kernels.h"

#ifdef WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/launchers.h"
#endif

namespace {

using at::Tensor;
using sophon_fast::cpu::LossWeights;

int dtype_code(const Tensor& t, const char* who) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    case at::kDouble: return 3;
    default: TORCH_CHECK_VALUE(false, who, ": dtype must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
  }
}

at::ScalarType acc_type(const Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Devices this build can run; raises for the others.
bool on_cuda(const Tensor& t, const char* who) {
  if (t.device().is_cpu()) return false;
  TORCH_CHECK_VALUE(t.is_cuda(), who, ": tensors must be on CPU or CUDA, got ", t.device());
#ifndef WITH_CUDA
  TORCH_CHECK(false, who, ": got CUDA tensors but sophon_fast._C was built without CUDA kernels "
              "(torch had no CUDA or nvcc was not found at build time); use the triton or reference backend");
#endif
  return true;
}

void check_same_device(const Tensor& a, const Tensor& b, const char* who, const char* name) {
  TORCH_CHECK_VALUE(a.device() == b.device(), who, ": ", name, " is on ", b.device(), " but logits on ", a.device());
}

// Shared checks of the row-loss entry points; returns the weights.
LossWeights check_rows(const Tensor& logits, const std::optional<Tensor>& target, at::ArrayRef<double> weights,
                       const char* who) {
  TORCH_CHECK_VALUE(logits.dim() == 2, who, ": logits must be 2-D (N, C), got shape ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) >= 1, who, ": logits needs at least one class");
  TORCH_CHECK_VALUE(logits.size(1) == 1 || logits.stride(1) == 1, who,
                    ": logits must have unit stride along classes, got strides ", logits.strides());
  TORCH_CHECK_VALUE(logits.size(0) <= 1 || logits.stride(0) >= 0, who, ": negative row stride");
  dtype_code(logits, who);
  TORCH_CHECK_VALUE(weights.size() == 4, who, ": weights must be [ce, ice, klu, negent], got ", weights.size(),
                    " values");
  if (target.has_value()) {
    const Tensor& t = *target;
    check_same_device(logits, t, who, "target");
    TORCH_CHECK_VALUE(t.scalar_type() == at::kLong, who, ": target must be int64, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == logits.size(0), who, ": target must have shape (",
                      logits.size(0), ",), got ", t.sizes());
    TORCH_CHECK_VALUE(t.is_contiguous(), who, ": target must be contiguous");
  } else {
    TORCH_CHECK_VALUE(weights[0] == 0 && weights[1] == 0, who, ": ce and ice need a target");
  }
  return LossWeights{weights[0], weights[1], weights[2], weights[3]};
}

// The gradient is written once, right after allocation. Large CPU buffers come fresh from mmap, and
// first-touch faults at 4 KB cost more than the kernel itself (262 MB: 45 ms vs 11 ms single thread
// on a VM), so ask for transparent huge pages on the 2 MB-aligned interior. Advisory: errors ignored.
Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  Tensor t = at::empty(sizes, opts);
#ifdef __linux__
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (t.is_cpu() && t.nbytes() >= 2 * kHuge) {
    const auto p = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = (p + t.nbytes()) & ~(kHuge - 1);
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#endif
  return t;
}

const int64_t* target_ptr(const std::optional<Tensor>& target) {
  return target.has_value() ? target->data_ptr<int64_t>() : nullptr;
}

std::tuple<Tensor, Tensor> row_losses_fwd(const Tensor& logits, const std::optional<Tensor>& target,
                                          at::ArrayRef<double> weights, double scale, int64_t ignore_index) {
  const char* who = "row_losses";
  const LossWeights w = check_rows(logits, target, weights, who);
  const int64_t n = logits.size(0), c = logits.size(1);
  auto opts = logits.options().dtype(acc_type(logits));
  Tensor loss = at::empty({n}, opts), stats = at::empty({n, 3}, opts);
  if (n == 0) return {loss, stats};
  const int code = dtype_code(logits, who);
  const int64_t rs = n > 1 ? logits.stride(0) : c;
  if (on_cuda(logits, who)) {
#ifdef WITH_CUDA
    c10::cuda::CUDAGuard guard(logits.device());
    const int err = sf_row_losses_fwd_cuda(logits.data_ptr(), code, n, c, rs, target_ptr(target), w.ce, w.ice, w.klu,
                                           w.negent, scale, ignore_index, loss.data_ptr(), stats.data_ptr(),
                                           at::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == 0, who, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
#endif
  } else {
    sophon_fast::cpu::row_losses_fwd(logits.data_ptr(), code, n, c, rs, target_ptr(target), w, scale, ignore_index,
                                     loss.data_ptr(), stats.data_ptr());
  }
  return {loss, stats};
}

// Backward kernels of both paths: row r's cotangent is grad_loss[r * gl_stride] / *denom (denom undefined: 1).
Tensor bwd_rows(const Tensor& grad_loss, int64_t gl_stride, const Tensor& denom, const Tensor& logits,
                const std::optional<Tensor>& target, const Tensor& stats, const LossWeights& w, double scale,
                int64_t ignore_index, const char* who) {
  const int64_t n = logits.size(0), c = logits.size(1);
  Tensor grad = empty_output({n, c}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (n == 0) return grad;
  const int code = dtype_code(logits, who);
  const int64_t rs = n > 1 ? logits.stride(0) : c;
  const void* dp = denom.defined() ? denom.data_ptr() : nullptr;
  if (on_cuda(logits, who)) {
#ifdef WITH_CUDA
    c10::cuda::CUDAGuard guard(logits.device());
    const int err = sf_row_losses_bwd_cuda(grad_loss.data_ptr(), gl_stride, dp, logits.data_ptr(), code, n, c, rs,
                                           target_ptr(target), stats.data_ptr(), w.ce, w.ice, w.klu, w.negent, scale,
                                           ignore_index, grad.data_ptr(), at::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == 0, who, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
#endif
  } else {
    sophon_fast::cpu::row_losses_bwd(grad_loss.data_ptr(), gl_stride, dp, logits.data_ptr(), code, n, c, rs,
                                     target_ptr(target), stats.data_ptr(), w, scale, ignore_index, grad.data_ptr());
  }
  return grad;
}

void check_stats(const Tensor& logits, const Tensor& stats, const char* who) {
  const auto acc = acc_type(logits);
  check_same_device(logits, stats, who, "stats");
  TORCH_CHECK_VALUE(stats.scalar_type() == acc && stats.dim() == 2 && stats.size(0) == logits.size(0) &&
                        stats.size(1) == 3 && stats.is_contiguous(),
                    who, ": stats must be a contiguous (", logits.size(0), ", 3) ", acc, " tensor, got ", stats.sizes(),
                    " ", stats.scalar_type());
}

Tensor row_losses_bwd(const Tensor& grad_loss, const Tensor& logits, const std::optional<Tensor>& target,
                      const Tensor& stats, at::ArrayRef<double> weights, double scale, int64_t ignore_index) {
  const char* who = "row_losses_backward";
  const LossWeights w = check_rows(logits, target, weights, who);
  const int64_t n = logits.size(0);
  const auto acc = acc_type(logits);
  check_same_device(logits, grad_loss, who, "grad_loss");
  TORCH_CHECK_VALUE(grad_loss.scalar_type() == acc && grad_loss.dim() == 1 && grad_loss.size(0) == n &&
                        grad_loss.is_contiguous(),
                    who, ": grad_loss must be a contiguous (", n, ",) ", acc, " tensor, got ", grad_loss.sizes(), " ",
                    grad_loss.scalar_type());
  check_stats(logits, stats, who);
  return bwd_rows(grad_loss, 1, Tensor(), logits, target, stats, w, scale, ignore_index, who);
}

// The backward written over the logits (the fused linear loss's private chunk buffer): no (N, C) allocation.
void row_losses_bwd_(const Tensor& grad_loss, const Tensor& logits, const std::optional<Tensor>& target,
                     const Tensor& stats, at::ArrayRef<double> weights, double scale, int64_t ignore_index) {
  const char* who = "row_losses_backward_";
  const LossWeights w = check_rows(logits, target, weights, who);
  TORCH_CHECK_VALUE(logits.is_contiguous(), who, ": logits must be contiguous to take the gradient in place");
  const int64_t n = logits.size(0), c = logits.size(1);
  const auto acc = acc_type(logits);
  check_same_device(logits, grad_loss, who, "grad_loss");
  TORCH_CHECK_VALUE(grad_loss.scalar_type() == acc && grad_loss.dim() == 1 && grad_loss.size(0) == n &&
                        grad_loss.is_contiguous(),
                    who, ": grad_loss must be a contiguous (", n, ",) ", acc, " tensor");
  check_stats(logits, stats, who);
  if (n == 0) return;
  const int code = dtype_code(logits, who);
  if (on_cuda(logits, who)) {
#ifdef WITH_CUDA
    c10::cuda::CUDAGuard guard(logits.device());
    const int err = sf_row_losses_bwd_cuda(grad_loss.data_ptr(), 1, nullptr, logits.data_ptr(), code, n, c, c,
                                           target_ptr(target), stats.data_ptr(), w.ce, w.ice, w.klu, w.negent, scale,
                                           ignore_index, logits.data_ptr(), at::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == 0, who, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
#endif
  } else {
    sophon_fast::cpu::row_losses_bwd(grad_loss.data_ptr(), 1, nullptr, logits.data_ptr(), code, n, c, c,
                                     target_ptr(target), stats.data_ptr(), w, scale, ignore_index, logits.data_ptr());
  }
}

// ------------------------------------------------------------------------------------------------
// The lean path of the public logits losses: forward = row kernel + the reduction kernel (which also checks
// the targets), backward = one row kernel reading the cotangent and the divisor on the device.
// ------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor> fused_loss_fwd(const Tensor& logits, const std::optional<Tensor>& target,
                                                  at::ArrayRef<double> weights, double scale, int64_t ignore_index,
                                                  int64_t reduction, bool check_targets) {
  const char* who = "fused_loss";
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2, who, ": reduction code must be 0 (none), 1 (mean) or 2 (sum)");
  auto [loss, stats] = row_losses_fwd(logits, target, weights, scale, ignore_index);
  const int64_t n = logits.size(0), c = logits.size(1);
  Tensor out = at::empty(reduction == 0 ? at::IntArrayRef{n} : at::IntArrayRef{}, logits.options());
  Tensor denom = at::empty({}, loss.options());
  const int code = dtype_code(logits, who);
  const bool check = check_targets && target.has_value();
  if (on_cuda(logits, who)) {
#ifdef WITH_CUDA
    c10::cuda::CUDAGuard guard(logits.device());
    const int err = sf_reduce_rows_cuda(loss.data_ptr(), code, target_ptr(target), n, c, ignore_index,
                                        static_cast<int>(reduction), check ? 1 : 0, out.data_ptr(), denom.data_ptr(),
                                        at::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == 0, who, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
#endif
  } else {
    const int64_t bad = sophon_fast::cpu::reduce_rows(loss.data_ptr(), code, target_ptr(target), n, c, ignore_index,
                                                      static_cast<int>(reduction), check, out.data_ptr(),
                                                      denom.data_ptr());
    // RuntimeError, as torch._assert_async on CPU tensors (the default mode of the public checks)
    TORCH_CHECK(bad < 0, who, ": a target is out of range for C = ", c, " classes (and is not ignore_index=",
                ignore_index, "): row ", bad, " has ", bad < 0 ? 0 : target->data_ptr<int64_t>()[bad]);
  }
  return {out, stats, denom};
}

// grad_out: the cotangent of fused_loss_fwd's `out` (any floating dtype; () for mean/sum, (N,) for none).
Tensor fused_loss_bwd(const Tensor& grad_out, const Tensor& logits, const std::optional<Tensor>& target,
                      const Tensor& stats, const Tensor& denom, at::ArrayRef<double> weights, double scale,
                      int64_t ignore_index) {
  const char* who = "fused_loss_backward";
  const LossWeights w = check_rows(logits, target, weights, who);
  const auto acc = acc_type(logits);
  check_stats(logits, stats, who);
  check_same_device(logits, grad_out, who, "grad_out");
  TORCH_CHECK_VALUE(grad_out.dim() == 0 || (grad_out.dim() == 1 && grad_out.size(0) == logits.size(0)), who,
                    ": grad_out must be a scalar or have shape (", logits.size(0), ",), got ", grad_out.sizes());
  TORCH_CHECK_VALUE(denom.dim() == 0 && denom.scalar_type() == acc, who, ": denom must be a 0-d ", acc, " tensor");
  const Tensor gl = grad_out.to(acc).contiguous();
  return bwd_rows(gl, gl.dim() == 0 ? 0 : 1, denom, logits, target, stats, w, scale, ignore_index, who);
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The autograd of sophon_fast::_cpp_fused_loss in C++: one node, no Python on the eager path. With a graph of
// the gradient requested (create_graph=True: the unrolled meta-gradient), the backward goes through the custom
// op sophon_fast::row_losses_backward instead, which has a double backward (sophon_fast/ops/row_losses.py).
class FusedLossFunction : public torch::autograd::Function<FusedLossFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& logits, const std::optional<Tensor>& target,
                        std::vector<double> weights, double scale, int64_t ignore_index, int64_t reduction,
                        bool check_targets) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("sophon_fast::_cpp_fused_loss_fwd", "")
                         .typed<decltype(fused_loss_fwd)>();
    auto [out, stats, denom] = op.call(logits, target, weights, scale, ignore_index, reduction, check_targets);
    ctx->save_for_backward({logits, target.value_or(Tensor()), stats, denom});
    ctx->saved_data["weights"] = weights;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["reduction"] = reduction;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &logits = saved[0], &stats = saved[2], &denom = saved[3];
    const std::optional<Tensor> target = saved[1].defined() ? std::optional<Tensor>(saved[1]) : std::nullopt;
    const auto weights = ctx->saved_data["weights"].toDoubleVector();
    const double scale = ctx->saved_data["scale"].toDouble();
    const int64_t ii = ctx->saved_data["ignore_index"].toInt();
    const Tensor& g = grads[0];
    Tensor grad;
    if (!g.defined()) {
      grad = Tensor();
    } else if (at::GradMode::is_enabled()) {  // differentiable backward: per-row cotangents, then the custom op
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("sophon_fast::row_losses_backward", "")
                           .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,
                                         at::ArrayRef<double>, double, int64_t)>();
      Tensor per_row = g.to(stats.scalar_type()) / denom;
      if (per_row.dim() == 0) per_row = per_row.expand({logits.size(0)});
      grad = op.call(per_row, logits, target, stats, weights, scale, ii);
    } else {
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("sophon_fast::_cpp_fused_loss_bwd", "")
                           .typed<decltype(fused_loss_bwd)>();
      grad = op.call(g, logits, target, stats, denom, weights, scale, ii);
    }
    return {grad, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor fused_loss_autograd(const Tensor& logits, const std::optional<Tensor>& target, at::ArrayRef<double> weights,
                           double scale, int64_t ignore_index, int64_t reduction, bool check_targets) {
  return FusedLossFunction::apply(logits, target, weights.vec(), scale, ignore_index, reduction, check_targets);
}

// Below autograd (inference mode, or no input requires grad): the forward alone.
Tensor fused_loss_plain(const Tensor& logits, const std::optional<Tensor>& target, at::ArrayRef<double> weights,
                        double scale, int64_t ignore_index, int64_t reduction, bool check_targets) {
  return std::get<0>(fused_loss_fwd(logits, target, weights, scale, ignore_index, reduction, check_targets));
}

// Shared checks of both inner steps; returns the dtype code.
int check_step_buffers(const Tensor& param, const Tensor& grad, const Tensor& exp_avg, const Tensor& exp_avg_sq,
                       int64_t kind, const char* who) {
  TORCH_CHECK_VALUE(kind >= 0 && kind <= 2, who, ": kind must be 0 (sgd), 1 (momentum) or 2 (adam), got ", kind);
  const int code = dtype_code(param, who);
  TORCH_CHECK_VALUE(param.is_contiguous(), who, ": param must be contiguous");
  // Only the buffers this kind uses are checked (and touched).
  std::vector<std::pair<const char*, const Tensor*>> used{{"grad", &grad}};
  if (kind >= 1) used.push_back({"exp_avg", &exp_avg});
  if (kind == 2) used.push_back({"exp_avg_sq", &exp_avg_sq});
  for (auto& [name, t] : used) {
    TORCH_CHECK_VALUE(t->sizes() == param.sizes() && t->scalar_type() == param.scalar_type() &&
                          t->device() == param.device() && t->is_contiguous(),
                      who, ": ", name, " must be a contiguous tensor matching param (", param.sizes(), ", ",
                      param.scalar_type(), ", ", param.device(), ")");
  }
  return code;
}

void inner_step_(const Tensor& param, const Tensor& grad, const Tensor& exp_avg, const Tensor& exp_avg_sq, int64_t kind,
                 double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step, bool zero_grad) {
  const char* who = "inner_step_";
  const int code = check_step_buffers(param, grad, exp_avg, exp_avg_sq, kind, who);
  const int64_t numel = param.numel();
  if (numel == 0) return;
  void* m1 = kind >= 1 ? exp_avg.data_ptr() : nullptr;
  void* m2 = kind == 2 ? exp_avg_sq.data_ptr() : nullptr;
  if (on_cuda(param, who)) {
#ifdef WITH_CUDA
    c10::cuda::CUDAGuard guard(param.device());
    const int err = sf_inner_step_cuda(param.data_ptr(), grad.data_ptr(), m1, m2, code, numel, static_cast<int>(kind),
                                       lr, beta1, beta2, eps, weight_decay, step, zero_grad ? 1 : 0,
                                       at::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == 0, who, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
#endif
  } else {
    sophon_fast::cpu::inner_step(param.data_ptr(), grad.data_ptr(), m1, m2, code, numel, static_cast<int>(kind), lr,
                                 beta1, beta2, eps, weight_decay, step, zero_grad);
  }
}

// The capturable step: `step` is a one-element int64 tensor on param's device, incremented here (step += 1, a
// device op) before the update, which reads the new value on the device. No host value depends on the step
// number, so a CUDA graph can capture the call once and replay it for every inner step.
void inner_step_capturable_(const Tensor& param, const Tensor& grad, const Tensor& exp_avg, const Tensor& exp_avg_sq,
                            const Tensor& step, int64_t kind, double lr, double beta1, double beta2, double eps,
                            double weight_decay, bool zero_grad) {
  const char* who = "inner_step_capturable_";
  const int code = check_step_buffers(param, grad, exp_avg, exp_avg_sq, kind, who);
  TORCH_CHECK_VALUE(step.numel() == 1 && step.scalar_type() == at::kLong && step.device() == param.device(), who,
                    ": step must be a one-element int64 tensor on ", param.device(), ", got ", step.sizes(), " ",
                    step.scalar_type(), " on ", step.device());
  step.add_(1);
  const int64_t numel = param.numel();
  if (numel == 0) return;
  void* m1 = kind >= 1 ? exp_avg.data_ptr() : nullptr;
  void* m2 = kind == 2 ? exp_avg_sq.data_ptr() : nullptr;
  if (on_cuda(param, who)) {
#ifdef WITH_CUDA
    c10::cuda::CUDAGuard guard(param.device());
    const int err = sf_inner_step_capturable_cuda(param.data_ptr(), grad.data_ptr(), m1, m2, code, numel,
                                                  static_cast<int>(kind), lr, beta1, beta2, eps, weight_decay,
                                                  step.data_ptr<int64_t>(), zero_grad ? 1 : 0,
                                                  at::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == 0, who, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
#endif
  } else {  // CPU tensors: reading the counter is not a device sync
    sophon_fast::cpu::inner_step(param.data_ptr(), grad.data_ptr(), m1, m2, code, numel, static_cast<int>(kind), lr,
                                 beta1, beta2, eps, weight_decay, *step.data_ptr<int64_t>(), zero_grad);
  }
}

Tensor row_sq_mean(const Tensor& x, const std::optional<Tensor>& y) {
  const char* who = "row_sq_mean";
  TORCH_CHECK_VALUE(x.dim() == 2 && x.is_contiguous(), who, ": x must be a contiguous 2-D tensor, got ", x.sizes());
  const int code = dtype_code(x, who);
  if (y.has_value()) {
    check_same_device(x, *y, who, "y");
    TORCH_CHECK_VALUE(y->sizes() == x.sizes() && y->scalar_type() == x.scalar_type() && y->is_contiguous(), who,
                      ": y must be a contiguous tensor matching x (", x.sizes(), ", ", x.scalar_type(), ")");
  }
  const int64_t n = x.size(0), d = x.size(1);
  Tensor out = at::empty({n}, x.options().dtype(acc_type(x)));
  if (n == 0) return out;
  TORCH_CHECK_VALUE(d >= 1, who, ": rows must have at least one element");
  const void* yp = y.has_value() ? y->data_ptr() : nullptr;
  if (on_cuda(x, who)) {
#ifdef WITH_CUDA
    c10::cuda::CUDAGuard guard(x.device());
    const int err = sf_row_sq_mean_cuda(x.data_ptr(), yp, code, n, d, out.data_ptr(),
                                        at::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == 0, who, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
#endif
  } else {
    sophon_fast::cpu::row_sq_mean(x.data_ptr(), yp, code, n, d, out.data_ptr());
  }
  return out;
}

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sophon_fast, m) {
  m.def("_cpp_row_losses_fwd(Tensor logits, Tensor? target, float[] weights, float scale, int ignore_index) "
        "-> (Tensor, Tensor)");
  m.def("_cpp_row_losses_bwd(Tensor grad_loss, Tensor logits, Tensor? target, Tensor stats, float[] weights, "
        "float scale, int ignore_index) -> Tensor");
  m.def("_cpp_row_losses_bwd_(Tensor grad_loss, Tensor(a!) logits, Tensor? target, Tensor stats, float[] weights, "
        "float scale, int ignore_index) -> ()");
  m.def("_cpp_fused_loss(Tensor logits, Tensor? target, float[] weights, float scale, int ignore_index, "
        "int reduction, bool check_targets) -> Tensor");
  m.def("_cpp_fused_loss_fwd(Tensor logits, Tensor? target, float[] weights, float scale, int ignore_index, "
        "int reduction, bool check_targets) -> (Tensor, Tensor, Tensor)");
  m.def("_cpp_fused_loss_bwd(Tensor grad_out, Tensor logits, Tensor? target, Tensor stats, Tensor denom, "
        "float[] weights, float scale, int ignore_index) -> Tensor");
  m.def("_cpp_inner_step_(Tensor(a!) param, Tensor(b!) grad, Tensor(c!) exp_avg, Tensor(d!) exp_avg_sq, int kind, "
        "float lr, float beta1, float beta2, float eps, float weight_decay, int step, bool zero_grad) -> ()");
  m.def("_cpp_inner_step_capturable_(Tensor(a!) param, Tensor(b!) grad, Tensor(c!) exp_avg, Tensor(d!) exp_avg_sq, "
        "Tensor(e!) step, int kind, float lr, float beta1, float beta2, float eps, float weight_decay, "
        "bool zero_grad) -> ()");
  m.def("_cpp_row_sq_mean(Tensor x, Tensor? y) -> Tensor");
}

#define SOPHON_FAST_KERNELS(m)                                        \
  m.impl("_cpp_row_losses_fwd", &row_losses_fwd);                     \
  m.impl("_cpp_row_losses_bwd", &row_losses_bwd);                     \
  m.impl("_cpp_row_losses_bwd_", &row_losses_bwd_);                   \
  m.impl("_cpp_fused_loss", &fused_loss_plain);                       \
  m.impl("_cpp_fused_loss_fwd", &fused_loss_fwd);                     \
  m.impl("_cpp_fused_loss_bwd", &fused_loss_bwd);                     \
  m.impl("_cpp_inner_step_", &inner_step_);                           \
  m.impl("_cpp_inner_step_capturable_", &inner_step_capturable_);     \
  m.impl("_cpp_row_sq_mean", &row_sq_mean)

TORCH_LIBRARY_IMPL(sophon_fast, CPU, m) { SOPHON_FAST_KERNELS(m); }

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(sophon_fast, CUDA, m) { SOPHON_FAST_KERNELS(m); }
#endif

TORCH_LIBRARY_IMPL(sophon_fast, Autograd, m) { m.impl("_cpp_fused_loss", &fused_loss_autograd); }

// Importing sophon_fast._C loads the library (and so the registrations above); the module itself only
// says whether this build contains the CUDA kernels.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sophon_fast kernels, registered as torch.ops.sophon_fast._cpp_* (CPU; CUDA when built)";
  m.def("has_cuda", &has_cuda, "whether this build contains the CUDA kernels");
}
