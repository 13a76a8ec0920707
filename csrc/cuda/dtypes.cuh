// Element types of the CUDA kernels (no torch headers): conversions to and from the accumulation type,
// 16-byte vector packs, fast-path alignment checks and the dtype-code dispatch of launchers.h.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace sophon_fast {
namespace cuda {

// Accumulation type: fp32, fp64 for fp64 buffers.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename A, typename T> __device__ __forceinline__ A to_acc(T x) { return static_cast<A>(x); }
template <> __device__ __forceinline__ float to_acc<float, __half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T, typename A> __device__ __forceinline__ T from_acc(A x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __half from_acc<__half, float>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float x) {
  return __float2bfloat16_rn(x);
}

// e^x from one FMUL and one MUFU.EX2 (ex2.approx.ftz: relative error ~2^-22, Triton's tl.exp): fp32 only; the
// fp64 kernels keep the accurate exp. Callers pass arguments <= 0 (or the small positive rescale gaps).
__device__ __forceinline__ float fast_exp(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
}
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }
__device__ __forceinline__ float fexp(float x) { return expf(x); }
__device__ __forceinline__ double fexp(double x) { return exp(x); }
__device__ __forceinline__ float flog(float x) { return logf(x); }
__device__ __forceinline__ double flog(double x) { return log(x); }
__device__ __forceinline__ float flog1p(float x) { return log1pf(x); }
__device__ __forceinline__ double flog1p(double x) { return log1p(x); }
__device__ __forceinline__ float fsqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double fsqrt(double x) { return sqrt(x); }

// V = 16 / sizeof(T) elements moved by one 128-bit load or store.
template <typename T> struct alignas(16) Pack {
  static constexpr int V = 16 / sizeof(T);
  T v[V];
};

inline bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Calls f(T{}) with T the C++ type of dtype code 0 fp32, 1 fp16, 2 bf16, 3 fp64.
template <typename F> int dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: return f(float{});
    case 1: return f(__half{});
    case 2: return f(__nv_bfloat16{});
    case 3: return f(double{});
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace cuda
}  // namespace sophon_fast
