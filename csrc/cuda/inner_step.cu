// CUDA kernel of the fused inner optimiser step (spec: sophon_fast/reference/inner_step.py), no torch
// headers. One grid-stride pass over flat contiguous buffers, in place, per element:
//   g = grad + wd * param
//   SGD       param -= lr * g
//   MOMENTUM  buf = beta1 * buf + g;  param -= lr * buf
//   ADAM      m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2;
//             param -= (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//   zero_grad grad = 0
// Traffic per element: SGD 2R+1W, MOMENTUM 3R+2W, ADAM 4R+3W (+1W with zero_grad); 128-bit loads and
// stores when every buffer used is 16-byte aligned. Arithmetic in fp32 (fp64 for fp64 buffers); the scalars
// arrive as double. The capturable variant reads Adam's step number from device memory (CUDA-graph safe).
#include <cmath>

#include "dtypes.cuh"
#include "launchers.h"

namespace sophon_fast {
namespace cuda {
namespace {

template <typename A> struct Hyper {
  A lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, wd, step_size, sqrt_bc2;
};

// Updates one element in the accumulation type; m and v are read and written only by the kinds using them.
template <int KIND, typename A> __device__ __forceinline__ void update(A& p, A g, A& m, A& v, const Hyper<A>& h) {
  if (h.wd != A(0)) g = g + h.wd * p;
  if (KIND == 0) {
    p = p - h.lr * g;
  } else if (KIND == 1) {
    m = h.beta1 * m + g;
    p = p - h.lr * m;
  } else {
    m = h.beta1 * m + h.one_minus_beta1 * g;
    v = h.beta2 * v + h.one_minus_beta2 * g * g;
    p = p - h.step_size * m / (fsqrt(v) / h.sqrt_bc2 + h.eps);
  }
}

// Adam's step size lr / (1 - beta1^t) and sqrt(1 - beta2^t) in double, from the step number t.
__host__ __device__ inline void bias_corrections(double lr, double beta1, double beta2, int64_t t, double* step_size,
                                                 double* sqrt_bc2) {
  *step_size = lr / (1.0 - pow(beta1, double(t)));
  *sqrt_bc2 = sqrt(1.0 - pow(beta2, double(t)));
}

// step: NULL (the host folded the bias corrections into h) or Adam's step number on the device (capturable:
// each block forms the corrections once, in double, from *step, into shared memory).
template <typename T, int KIND, bool VEC>
__global__ void __launch_bounds__(256)
inner_step_kernel(T* __restrict__ param, T* __restrict__ grad, T* __restrict__ exp_avg, T* __restrict__ exp_avg_sq,
                  int64_t numel, Hyper<typename Acc<T>::type> h, bool zero_grad, const int64_t* __restrict__ step,
                  double lr, double beta1, double beta2) {
  using A = typename Acc<T>::type;
  if (KIND == 2 && step != nullptr) {
    __shared__ A corr[2];
    if (threadIdx.x == 0) {
      double ss, sq;
      bias_corrections(lr, beta1, beta2, *step, &ss, &sq);
      corr[0] = A(ss);
      corr[1] = A(sq);
    }
    __syncthreads();
    h.step_size = corr[0];
    h.sqrt_bc2 = corr[1];
  }
  constexpr int V = VEC ? Pack<T>::V : 1;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x * V;
  const int64_t nv = numel / V * V;
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * V; i < nv; i += stride) {
    if (VEC) {
      Pack<T> pp = *reinterpret_cast<const Pack<T>*>(param + i);
      const Pack<T> gp = *reinterpret_cast<const Pack<T>*>(grad + i);
      Pack<T> mp, vp;
      if (KIND >= 1) mp = *reinterpret_cast<const Pack<T>*>(exp_avg + i);
      if (KIND == 2) vp = *reinterpret_cast<const Pack<T>*>(exp_avg_sq + i);
#pragma unroll
      for (int k = 0; k < Pack<T>::V; ++k) {
        A p = to_acc<A>(pp.v[k]), m = KIND >= 1 ? to_acc<A>(mp.v[k]) : A(0), v = KIND == 2 ? to_acc<A>(vp.v[k]) : A(0);
        update<KIND>(p, to_acc<A>(gp.v[k]), m, v, h);
        pp.v[k] = from_acc<T>(p);
        if (KIND >= 1) mp.v[k] = from_acc<T>(m);
        if (KIND == 2) vp.v[k] = from_acc<T>(v);
      }
      *reinterpret_cast<Pack<T>*>(param + i) = pp;
      if (KIND >= 1) *reinterpret_cast<Pack<T>*>(exp_avg + i) = mp;
      if (KIND == 2) *reinterpret_cast<Pack<T>*>(exp_avg_sq + i) = vp;
      if (zero_grad) {
        Pack<T> z;
#pragma unroll
        for (int k = 0; k < Pack<T>::V; ++k) z.v[k] = from_acc<T>(A(0));
        *reinterpret_cast<Pack<T>*>(grad + i) = z;
      }
    } else {
      A p = to_acc<A>(param[i]), m = KIND >= 1 ? to_acc<A>(exp_avg[i]) : A(0);
      A v = KIND == 2 ? to_acc<A>(exp_avg_sq[i]) : A(0);
      update<KIND>(p, to_acc<A>(grad[i]), m, v, h);
      param[i] = from_acc<T>(p);
      if (KIND >= 1) exp_avg[i] = from_acc<T>(m);
      if (KIND == 2) exp_avg_sq[i] = from_acc<T>(v);
      if (zero_grad) grad[i] = from_acc<T>(A(0));
    }
  }
  // Tail of fewer than V elements (vector path only): the first threads of the grid take one each.
  const int64_t t = nv + int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (VEC && t < numel) {
    A p = to_acc<A>(param[t]), m = KIND >= 1 ? to_acc<A>(exp_avg[t]) : A(0);
    A v = KIND == 2 ? to_acc<A>(exp_avg_sq[t]) : A(0);
    update<KIND>(p, to_acc<A>(grad[t]), m, v, h);
    param[t] = from_acc<T>(p);
    if (KIND >= 1) exp_avg[t] = from_acc<T>(m);
    if (KIND == 2) exp_avg_sq[t] = from_acc<T>(v);
    if (zero_grad) grad[t] = from_acc<T>(A(0));
  }
}

template <typename T, int KIND>
void launch(T* p, T* g, T* m, T* v, int64_t numel, const Hyper<typename Acc<T>::type>& h, bool zero_grad,
            const int64_t* step, double lr, double b1, double b2, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const bool vec = aligned16(p) && aligned16(g) && (KIND < 1 || aligned16(m)) && (KIND < 2 || aligned16(v));
  const int64_t per_block = int64_t(kThreads) * (vec ? Pack<T>::V : 1);
  int64_t blocks = (numel + per_block - 1) / per_block;
  blocks = blocks < 1 ? 1 : (blocks > 65536 ? 65536 : blocks);  // grid-stride beyond 65536 blocks
  if (vec) {
    inner_step_kernel<T, KIND, true><<<static_cast<int>(blocks), kThreads, 0, stream>>>(p, g, m, v, numel, h, zero_grad,
                                                                                       step, lr, b1, b2);
  } else {
    inner_step_kernel<T, KIND, false><<<static_cast<int>(blocks), kThreads, 0, stream>>>(p, g, m, v, numel, h,
                                                                                        zero_grad, step, lr, b1, b2);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace sophon_fast

namespace {

int step_cuda(void* param, void* grad, void* exp_avg, void* exp_avg_sq, int dtype, int64_t numel, int kind, double lr,
              double beta1, double beta2, double eps, double weight_decay, int64_t step, const int64_t* step_ptr,
              int zero_grad, void* stream) {
  using namespace sophon_fast::cuda;
  if (numel < 0 || kind < 0 || kind > 2 || (kind == 2 && step_ptr == nullptr && step < 1) ||
      (kind >= 1 && exp_avg == nullptr) || (kind == 2 && exp_avg_sq == nullptr)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (numel == 0) return 0;
  // Bias corrections folded on the host in double (or, capturable, on the device from *step_ptr).
  double step_size = lr, sqrt_bc2 = 1.0;
  if (kind == 2 && step_ptr == nullptr) bias_corrections(lr, beta1, beta2, step, &step_size, &sqrt_bc2);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    const Hyper<A> h{A(lr), A(beta1), A(1.0 - beta1), A(beta2), A(1.0 - beta2), A(eps), A(weight_decay),
                     A(step_size), A(sqrt_bc2)};
    auto* p = static_cast<T*>(param);
    auto* g = static_cast<T*>(grad);
    auto* m = static_cast<T*>(exp_avg);
    auto* v = static_cast<T*>(exp_avg_sq);
    auto s = static_cast<cudaStream_t>(stream);
    const bool zg = zero_grad != 0;
    if (kind == 0) launch<T, 0>(p, g, m, v, numel, h, zg, step_ptr, lr, beta1, beta2, s);
    else if (kind == 1) launch<T, 1>(p, g, m, v, numel, h, zg, step_ptr, lr, beta1, beta2, s);
    else launch<T, 2>(p, g, m, v, numel, h, zg, step_ptr, lr, beta1, beta2, s);
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace

extern "C" int sf_inner_step_cuda(void* param, void* grad, void* exp_avg, void* exp_avg_sq, int dtype, int64_t numel,
                                  int kind, double lr, double beta1, double beta2, double eps, double weight_decay,
                                  int64_t step, int zero_grad, void* stream) {
  return step_cuda(param, grad, exp_avg, exp_avg_sq, dtype, numel, kind, lr, beta1, beta2, eps, weight_decay, step,
                   nullptr, zero_grad, stream);
}

extern "C" int sf_inner_step_capturable_cuda(void* param, void* grad, void* exp_avg, void* exp_avg_sq, int dtype,
                                             int64_t numel, int kind, double lr, double beta1, double beta2,
                                             double eps, double weight_decay, const int64_t* step, int zero_grad,
                                             void* stream) {
  if (step == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  return step_cuda(param, grad, exp_avg, exp_avg_sq, dtype, numel, kind, lr, beta1, beta2, eps, weight_decay, 0, step,
                   zero_grad, stream);
}
