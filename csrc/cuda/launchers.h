// Plain C launchers of the CUDA kernels (no torch headers): csrc/cuda/*.cu define them, the torch
// binding (csrc/binding.cpp, built WITH_CUDA) calls them. Each returns a cudaError_t as int (0 = ok).
//
// dtype codes of `logits`/`param` buffers: 0 fp32, 1 fp16, 2 bf16, 3 fp64.
// Accumulation and the `loss`/`stats`/`grad_loss` buffers are fp32, except for fp64 inputs (fp64).
// Semantics: sophon_fast/reference/losses.py (row losses) and sophon_fast/reference/inner_step.py.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Scalars (loss weights, scale, lr, betas, eps, weight decay) travel as double and are rounded once, to the
// accumulation type, inside: fp64 buffers keep every bit of them.
//
// logits: n rows of c classes, row r starts at logits + r * row_stride (elements), unit class stride.
// target: n int64 labels or NULL (no target: every row counts, CE/ICE weights must be 0). A label
// outside [0, c) that is not ignore_index is never read through: NaN loss, stats and gradient row.
// loss: n values; stats: n x 3 values [lse, lse_without_target, negent], row-major.
int sf_row_losses_fwd_cuda(const void* logits, int dtype, int64_t n, int64_t c, int64_t row_stride,
                           const int64_t* target, double w_ce, double w_ice, double w_klu, double w_negent,
                           double scale, int64_t ignore_index, void* loss, void* stats, void* stream);

// Row r's cotangent is grad_loss[r * gl_stride] / *gl_denom (gl_stride 0: one device value broadcast;
// gl_denom NULL: 1), read on the device (no host sync); grad: contiguous n x c output in the logits' dtype, or
// the logits themselves (contiguous rows: the gradient is written over them).
int sf_row_losses_bwd_cuda(const void* grad_loss, int64_t gl_stride, const void* gl_denom, const void* logits,
                           int dtype, int64_t n, int64_t c, int64_t row_stride, const int64_t* target,
                           const void* stats, double w_ce, double w_ice, double w_klu, double w_negent,
                           double scale, int64_t ignore_index, void* grad, void* stream);

// The reduction of the lean loss path (one block, fixed order: deterministic): reduction 0 "none" writes
// out[r] = loss[r], 1 "mean" out[0] = sum / (rows not ignored), 2 "sum" out[0] = sum, out in the logits' dtype;
// *denom (accumulation type) gets the divisor the backward reads. With check != 0, a target outside [0, c)
// that is not ignore_index fails a device-side assertion (as torch._assert_async: reported at the next sync).
int sf_reduce_rows_cuda(const void* loss, int dtype, const int64_t* target, int64_t n, int64_t c,
                        int64_t ignore_index, int reduction, int check, void* out, void* denom, void* stream);

// In place over `numel` contiguous elements; kind 0 sgd, 1 momentum, 2 adam.
int sf_inner_step_cuda(void* param, void* grad, void* exp_avg, void* exp_avg_sq, int dtype, int64_t numel,
                       int kind, double lr, double beta1, double beta2, double eps, double weight_decay,
                       int64_t step, int zero_grad, void* stream);

// The same step with Adam's step number t read on the device from *step (int64, already incremented by the
// caller): no host value depends on it, so a CUDA graph can capture the call and replay it for every step.
// The bias corrections 1 - beta^t are formed per block in double.
int sf_inner_step_capturable_cuda(void* param, void* grad, void* exp_avg, void* exp_avg_sq, int dtype,
                                  int64_t numel, int kind, double lr, double beta1, double beta2, double eps,
                                  double weight_decay, const int64_t* step, int zero_grad, void* stream);

// out[r] = mean_j (x[r, j] - y[r, j])^2 over contiguous n x d rows (y NULL: mean of x^2); out fp32
// (fp64 for fp64 x). One block per row (grid-strided), csrc/cuda/sq_mean.cu.
int sf_row_sq_mean_cuda(const void* x, const void* y, int dtype, int64_t n, int64_t d, void* out, void* stream);

#ifdef __cplusplus
}
#endif
