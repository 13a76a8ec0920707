// CUDA kernel of the per-row mean of squares (spec: sophon_fast/reference/sq_mean.py), no torch headers:
//   out[r] = mean_j (x[r, j] - y[r, j])^2   (y null: mean_j x[r, j]^2)
// Traffic: one read of x (and y), one write per row. One 256-thread block per row (grid-strided over
// rows), each thread a strided partial sum in the accumulation type, reduced by warp shuffles and
// shared memory.
#include "dtypes.cuh"
#include "launchers.h"

namespace sophon_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
row_sq_mean_kernel(const T* __restrict__ x, const T* __restrict__ y, int64_t n, int64_t d,
                   typename Acc<T>::type* __restrict__ out) {
  using A = typename Acc<T>::type;
  __shared__ A partial[kThreads / 32];
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    const T* xr = x + r * d;
    const T* yr = y == nullptr ? nullptr : y + r * d;
    A acc = A(0);
    for (int64_t j = threadIdx.x; j < d; j += kThreads) {
      const A v = to_acc<A>(xr[j]) - (yr == nullptr ? A(0) : to_acc<A>(yr[j]));
      acc += v * v;
    }
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = acc;
    __syncthreads();
    if (threadIdx.x < 32) {
      acc = threadIdx.x < kThreads / 32 ? partial[threadIdx.x] : A(0);
      for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
      if (threadIdx.x == 0) out[r] = acc / A(d);
    }
    __syncthreads();  // partial[] is reused by the next row
  }
}

}  // namespace
}  // namespace cuda
}  // namespace sophon_fast

extern "C" int sf_row_sq_mean_cuda(const void* x, const void* y, int dtype, int64_t n, int64_t d, void* out,
                                   void* stream) {
  using namespace sophon_fast::cuda;
  if (n < 0 || d < 1 || x == nullptr || out == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  if (n == 0) return 0;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    const int64_t blocks = n < (int64_t(1) << 20) ? n : (int64_t(1) << 20);
    row_sq_mean_kernel<T><<<static_cast<int>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), static_cast<const T*>(y), n, d, static_cast<A*>(out));
    return static_cast<int>(cudaGetLastError());
  });
}
