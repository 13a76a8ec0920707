// CPU kernels of sophon_fast (no pybind, no torch front end): plain launchers over raw pointers, with
// the same arguments as the CUDA launchers in csrc/cuda/launchers.h so csrc/binding.cpp can dispatch
// both from one place. Semantics: sophon_fast/reference/losses.py and sophon_fast/reference/inner_step.py.
//
// dtype codes: 0 fp32, 1 fp16, 2 bf16, 3 fp64. Accumulation is fp32 (fp64 for fp64 inputs);
// loss / stats / grad_loss buffers are fp32 (fp64 for fp64 logits). Argument errors throw c10::ValueError.
#pragma once
#include <cstdint>

namespace sophon_fast {
namespace cpu {

struct LossWeights {
  double ce, ice, klu, negent;  // order of reference.losses.LOSS_NAMES
};

// logits: n rows of c classes, row r at logits + r * row_stride elements, unit class stride (any
// row stride, 0 included). target: n int64 labels or nullptr (every row counts; ce/ice must be 0);
// a label outside [0, c) that is not ignore_index is never read through: that row gets NaN loss,
// NaN stats and a NaN gradient row.
// loss: n values; stats: n x 3 row-major [lse, lse_without_target, negent].
// negent (stats[:, 2]) is only accumulated when w.negent != 0; otherwise it is written as NaN.
void row_losses_fwd(const void* logits, int dtype, int64_t n, int64_t c, int64_t row_stride,
                    const int64_t* target, LossWeights w, double scale, int64_t ignore_index, void* loss,
                    void* stats);

// grad_loss: row r's cotangent is grad_loss[r * gl_stride] / *gl_denom (gl_stride 0: one value broadcast;
// gl_denom null: 1), both in the accumulation type; stats: the forward's; grad: contiguous n x c in the
// logits' dtype; grad == logits (contiguous rows) writes the gradient over the logits, each element read first.
void row_losses_bwd(const void* grad_loss, int64_t gl_stride, const void* gl_denom, const void* logits, int dtype,
                    int64_t n, int64_t c, int64_t row_stride, const int64_t* target, const void* stats,
                    LossWeights w, double scale, int64_t ignore_index, void* grad);

// The reduction of the lean loss path over the forward's per-row losses `loss` (accumulation type of
// dtype code `dtype`): reduction 0 "none" writes out[r] = loss[r], 1 "mean" out[0] = sum / (rows not
// ignored), 2 "sum" out[0] = sum; out in the logits' dtype `dtype`. *denom (accumulation type) gets the
// divisor (the count for "mean", else 1), which the backward reads. With `check`, returns the first row whose
// target is outside [0, c) and not ignore_index (-1: none), so the caller can raise.
int64_t reduce_rows(const void* loss, int dtype, const int64_t* target, int64_t n, int64_t c, int64_t ignore_index,
                    int reduction, bool check, void* out, void* denom);

// In place over numel contiguous elements; kind 0 sgd, 1 momentum, 2 adam. Buffers a kind does not
// use may be null.
void inner_step(void* param, void* grad, void* exp_avg, void* exp_avg_sq, int dtype, int64_t numel,
                int kind, double lr, double beta1, double beta2, double eps, double weight_decay,
                int64_t step, bool zero_grad);

// out[r] = mean_j (x[r, j] - y[r, j])^2 over contiguous n x d rows (y null: mean of x^2); out is fp32
// (fp64 for fp64 x), accumulated in fp64 (csrc/cpu/sq_mean.cpp).
void row_sq_mean(const void* x, const void* y, int dtype, int64_t n, int64_t d, void* out);

}  // namespace cpu
}  // namespace sophon_fast
