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

// logits: n rows of c classes, row r starts at logits + r * row_stride (elements), unit class stride.
// target: n int64 labels or NULL (no target: every row counts, CE/ICE weights must be 0). A label
// outside [0, c) that is not ignore_index is never read through: NaN loss, stats and gradient row.
// loss: n values; stats: n x 3 values [lse, lse_without_target, negent], row-major.
int sf_row_losses_fwd_cuda(const void* logits, int dtype, int64_t n, int64_t c, int64_t row_stride,
                           const int64_t* target, float w_ce, float w_ice, float w_klu, float w_negent,
                           float scale, int64_t ignore_index, void* loss, void* stats, void* stream);

// grad_loss: n values; grad: contiguous n x c output in the logits' dtype.
int sf_row_losses_bwd_cuda(const void* grad_loss, const void* logits, int dtype, int64_t n, int64_t c,
                           int64_t row_stride, const int64_t* target, const void* stats, float w_ce,
                           float w_ice, float w_klu, float w_negent, float scale, int64_t ignore_index,
                           void* grad, void* stream);

// In place over `numel` contiguous elements; kind 0 sgd, 1 momentum, 2 adam.
int sf_inner_step_cuda(void* param, void* grad, void* exp_avg, void* exp_avg_sq, int dtype, int64_t numel,
                       int kind, float lr, float beta1, float beta2, float eps, float weight_decay,
                       int64_t step, int zero_grad, void* stream);

// out[r] = mean_j (x[r, j] - y[r, j])^2 over contiguous n x d rows (y NULL: mean of x^2); out fp32
// (fp64 for fp64 x). One block per row (grid-strided), csrc/cuda/sq_mean.cu.
int sf_row_sq_mean_cuda(const void* x, const void* y, int dtype, int64_t n, int64_t d, void* out, void* stream);

#ifdef __cplusplus
}
#endif
