// CUDA kernels of the row-wise loss core (spec: sophon_fast/reference/losses.py), no torch headers.
//
// Per row of logits z (length C, target y or none), with z' = scale * z:
//   forward   m_x, S_x, T_x = online max, sum e^(z'-m_x), sum e^(z'-m_x) (z'-m_x) over c != y;
//             lse_x = m_x + log S_x; y folded in analytically gives (m, S, T) over all c:
//             lse = m + log S, NEGENT = T / S - log S; CE = lse - z'_y, ICE = softplus(z'_y - lse_x),
//             KLU = lse - mean(z') - log C; loss = sum_k w_k loss_k (0 on ignored rows).
//   backward  dL/dz_c = scale * grad_loss * (w_ce (p_c - [c=y]) + w_ice ([c=y] p_y - [c!=y] p_y q_c)
//                       + w_klu (p_c - 1/C) + w_negent p_c (z'_c - lse - NEGENT)),
//             p_c = e^(z'_c - lse), q_c = e^(z'_c - lse_x), from the saved stats [lse, lse_x, NEGENT].
// Traffic: forward reads the logits once (plus z_y) and writes 4 values per row; backward reads them
// once and writes the gradient once (ignored rows: no read, zeros written). 128-bit loads and stores
// when rows are 16-byte aligned. Rows of up to 1024 classes get one warp, longer rows one block; each
// forward thread keeps an online (m, S, T) state, merged by warp shuffles and, across warps, shared memory.
#include "dtypes.cuh"
#include "launchers.h"

namespace sophon_fast {
namespace cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;

template <typename A> struct State {
  A m, s, t, sum_z;  // running max, sum e^(z-m), sum e^(z-m)(z-m) over c != y; sum of z' over all c
};

template <typename A> __device__ __forceinline__ State<A> empty_state() {
  return State<A>{-INFINITY, A(0), A(0), A(0)};
}

// Adds one logit z' (not the target) to the state. A non-empty state has s >= 1.
template <typename A> __device__ __forceinline__ void push(State<A>& st, A z) {
  if (z > st.m) {
    const bool seen = st.s > A(0);
    const A a = seen ? fexp(st.m - z) : A(0);
    st.t = seen ? a * (st.t + (st.m - z) * st.s) : A(0);
    st.s = a * st.s + A(1);
    st.m = z;
  } else {
    const A d = z - st.m;
    const A e = fexp(d);
    st.s += e;
    st.t += e * d;
  }
}

template <typename A> __device__ __forceinline__ State<A> merge(const State<A>& a, const State<A>& b) {
  State<A> r;
  r.sum_z = a.sum_z + b.sum_z;
  if (b.s == A(0)) { r.m = a.m; r.s = a.s; r.t = a.t; return r; }
  if (a.s == A(0)) { r.m = b.m; r.s = b.s; r.t = b.t; return r; }
  r.m = a.m > b.m ? a.m : b.m;
  const A ea = fexp(a.m - r.m), eb = fexp(b.m - r.m);
  r.s = ea * a.s + eb * b.s;
  r.t = ea * (a.t + (a.m - r.m) * a.s) + eb * (b.t + (b.m - r.m) * b.s);
  return r;
}

template <typename A> __device__ __forceinline__ State<A> warp_merge(State<A> x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    State<A> y;
    y.m = __shfl_xor_sync(kFull, x.m, o);
    y.s = __shfl_xor_sync(kFull, x.s, o);
    y.t = __shfl_xor_sync(kFull, x.t, o);
    y.sum_z = __shfl_xor_sync(kFull, x.sum_z, o);
    x = merge(x, y);
  }
  return x;
}

template <typename A> struct Weights { A ce, ice, klu, ne, scale; };

template <typename A> __device__ __forceinline__ A softplus(A x) {  // log(1 + e^x), stable for any x
  return x > A(0) ? x + flog1p(fexp(-x)) : flog1p(fexp(x));
}

// Row bookkeeping shared by forward and backward.
// valid: the row counts (not ignored); has_y: it has a target class y in [0, c); bad: its target is
// outside [0, c) (never used as an index: the row's loss, stats and gradient are NaN).
struct RowTarget { bool valid, has_y, bad; int64_t y; };
__device__ __forceinline__ RowTarget row_target(const int64_t* target, int64_t r, int64_t c, int64_t ignore_index) {
  if (target == nullptr) return RowTarget{true, false, false, -1};
  const int64_t y = target[r];
  const bool valid = y != ignore_index, in_range = y >= 0 && y < c;
  return RowTarget{valid, valid && in_range, valid && !in_range, (valid && in_range) ? y : -1};
}

// Calls f(j, z') for every class j of the row handled by this thread (lane of tpr threads).
template <typename T, typename A, bool VEC, typename F>
__device__ __forceinline__ void for_row(const T* row, int64_t c, int lane, int tpr, A scale, F&& f) {
  int64_t j0 = 0;
  if (VEC) {
    constexpr int V = Pack<T>::V;
    const int64_t cv = c / V * V;
    for (int64_t j = int64_t(lane) * V; j < cv; j += int64_t(tpr) * V) {
      const Pack<T> pk = *reinterpret_cast<const Pack<T>*>(row + j);
#pragma unroll
      for (int k = 0; k < V; ++k) f(j + k, scale * to_acc<A>(pk.v[k]));
    }
    j0 = cv;
  }
  for (int64_t j = j0 + lane; j < c; j += tpr) f(j, scale * to_acc<A>(row[j]));
}

// TPR threads per row (32: a warp per row; BLOCK: the whole block per row), BLOCK / TPR rows per block.
template <typename T, int TPR, int BLOCK, bool VEC>
__global__ void __launch_bounds__(BLOCK)
row_losses_fwd_kernel(const T* __restrict__ logits, int64_t n, int64_t c, int64_t row_stride,
                      const int64_t* __restrict__ target, Weights<typename Acc<T>::type> w, int64_t ignore_index,
                      typename Acc<T>::type* __restrict__ loss, typename Acc<T>::type* __restrict__ stats) {
  using A = typename Acc<T>::type;
  static_assert(TPR == 32 || TPR == BLOCK, "a row is served by one warp or by the whole block");
  constexpr int ROWS = BLOCK / TPR, WARPS = TPR / 32;
  __shared__ State<A> partial[WARPS];
  const int lane = threadIdx.x % TPR, warp = lane / 32;
  for (int64_t r = int64_t(blockIdx.x) * ROWS + threadIdx.x / TPR; r < n; r += int64_t(gridDim.x) * ROWS) {
    const RowTarget rt = row_target(target, r, c, ignore_index);
    const T* row = logits + r * row_stride;
    State<A> st = empty_state<A>();
    const int64_t y = rt.y;
    for_row<T, A, VEC>(row, c, lane, TPR, w.scale, [&](int64_t j, A z) {
      st.sum_z += z;
      if (j != y) push(st, z);
    });
    st = warp_merge(st);
    if (WARPS > 1) {
      if (lane % 32 == 0) partial[warp] = st;
      __syncthreads();
      if (warp == 0) {
        st = (lane < WARPS) ? partial[lane] : empty_state<A>();
        st = warp_merge(st);
      }
      __syncthreads();  // partial[] is reused by the next row
    }
    if (lane != 0) continue;
    const A z_y = rt.has_y ? w.scale * to_acc<A>(row[y]) : A(0);
    const bool seen = st.s > A(0);
    const A lse_x = seen ? st.m + flog(st.s) : A(-INFINITY);
    const A m = (rt.has_y && (!seen || z_y > st.m)) ? z_y : st.m;
    const A a = seen ? fexp(st.m - m) : A(0);
    const A b = rt.has_y ? fexp(z_y - m) : A(0);
    const A s_all = a * st.s + b;
    const A t_all = (seen ? a * (st.t + (st.m - m) * st.s) : A(0)) + (rt.has_y ? b * (z_y - m) : A(0));
    const A log_s = flog(s_all);
    const A lse = m + log_s, negent = t_all / s_all - log_s;
    A l = A(0);
    if (w.ce != A(0)) l += w.ce * (lse - z_y);
    if (w.ice != A(0)) l += w.ice * softplus(z_y - lse_x);
    if (w.klu != A(0)) l += w.klu * (lse - st.sum_z / A(c) - flog(A(c)));
    if (w.ne != A(0)) l += w.ne * negent;
    const A nan = A(NAN);
    loss[r] = rt.bad ? nan : (rt.valid ? l : A(0));
    stats[3 * r] = rt.bad ? nan : lse;
    stats[3 * r + 1] = rt.bad ? nan : lse_x;
    stats[3 * r + 2] = rt.bad ? nan : negent;
  }
}

template <typename T, int TPR, int BLOCK, bool VEC>
__global__ void __launch_bounds__(BLOCK)
row_losses_bwd_kernel(const typename Acc<T>::type* __restrict__ grad_loss, const T* __restrict__ logits, int64_t n,
                      int64_t c, int64_t row_stride, const int64_t* __restrict__ target,
                      const typename Acc<T>::type* __restrict__ stats, Weights<typename Acc<T>::type> w,
                      int64_t ignore_index, T* __restrict__ grad) {
  using A = typename Acc<T>::type;
  constexpr int ROWS = BLOCK / TPR;
  const int lane = threadIdx.x % TPR;
  const bool need_p = w.ce != A(0) || w.klu != A(0) || w.ne != A(0);
  for (int64_t r = int64_t(blockIdx.x) * ROWS + threadIdx.x / TPR; r < n; r += int64_t(gridDim.x) * ROWS) {
    const RowTarget rt = row_target(target, r, c, ignore_index);
    T* out = grad + r * c;
    if (!rt.valid || rt.bad) {
      const A fill = rt.bad ? A(NAN) : A(0);
      for (int64_t j = lane; j < c; j += TPR) out[j] = from_acc<T>(fill);
      continue;
    }
    const T* row = logits + r * row_stride;
    const A lse = stats[3 * r], lse_x = stats[3 * r + 1], negent = stats[3 * r + 2];
    const A gl = grad_loss[r] * w.scale;
    const int64_t y = rt.y;
    const A p_y = (rt.has_y && w.ice != A(0)) ? fexp(w.scale * to_acc<A>(row[y]) - lse) : A(0);
    const A inv_c = A(1) / A(c);
    auto grad_at = [&](int64_t j, A z) -> T {
      const bool is_y = j == y;
      A g = A(0);
      if (need_p) {
        const A p = fexp(z - lse);
        g = (w.ce + w.klu) * p - w.klu * inv_c + w.ne * p * (z - lse - negent);
        if (is_y) g -= w.ce;
      }
      if (w.ice != A(0)) g += is_y ? w.ice * p_y : -w.ice * p_y * fexp(z - lse_x);
      return from_acc<T>(g * gl);
    };
    if (VEC) {
      // Both row starts are 16-byte aligned (checked on the host): whole packs in, whole packs out.
      constexpr int V = Pack<T>::V;
      const int64_t cv = c / V * V;
      for (int64_t j = int64_t(lane) * V; j < cv; j += int64_t(TPR) * V) {
        const Pack<T> in = *reinterpret_cast<const Pack<T>*>(row + j);
        Pack<T> o;
#pragma unroll
        for (int k = 0; k < V; ++k) o.v[k] = grad_at(j + k, w.scale * to_acc<A>(in.v[k]));
        *reinterpret_cast<Pack<T>*>(out + j) = o;
      }
      for (int64_t j = cv + lane; j < c; j += TPR) out[j] = grad_at(j, w.scale * to_acc<A>(row[j]));
    } else {
      for (int64_t j = lane; j < c; j += TPR) out[j] = grad_at(j, w.scale * to_acc<A>(row[j]));
    }
  }
}

inline int grid_for(int64_t n, int rows_per_block) {
  const int64_t blocks = (n + rows_per_block - 1) / rows_per_block;
  return static_cast<int>(blocks < (int64_t(1) << 20) ? blocks : (int64_t(1) << 20));  // rows are strided
}

// Rows of up to 1024 classes: a warp per row, 8 rows per block; up to 16384: 256 threads; beyond: 1024
// (the backward streams rows longer than 1024 with 256 threads).
template <typename T, bool VEC>
void launch_fwd(const T* x, int64_t n, int64_t c, int64_t rs, const int64_t* target, Weights<typename Acc<T>::type> w,
                int64_t ii, typename Acc<T>::type* loss, typename Acc<T>::type* stats, cudaStream_t st) {
  if (c <= 1024) {
    row_losses_fwd_kernel<T, 32, 256, VEC><<<grid_for(n, 8), 256, 0, st>>>(x, n, c, rs, target, w, ii, loss, stats);
  } else if (c <= 16384) {
    row_losses_fwd_kernel<T, 256, 256, VEC><<<grid_for(n, 1), 256, 0, st>>>(x, n, c, rs, target, w, ii, loss, stats);
  } else {
    row_losses_fwd_kernel<T, 1024, 1024, VEC><<<grid_for(n, 1), 1024, 0, st>>>(x, n, c, rs, target, w, ii, loss,
                                                                               stats);
  }
}

template <typename T, bool VEC>
void launch_bwd(const typename Acc<T>::type* gl, const T* x, int64_t n, int64_t c, int64_t rs, const int64_t* target,
                const typename Acc<T>::type* stats, Weights<typename Acc<T>::type> w, int64_t ii, T* g,
                cudaStream_t st) {
  if (c <= 1024) {
    row_losses_bwd_kernel<T, 32, 256, VEC><<<grid_for(n, 8), 256, 0, st>>>(gl, x, n, c, rs, target, stats, w, ii, g);
  } else {  // no reduction here: 256 threads stream any longer row
    row_losses_bwd_kernel<T, 256, 256, VEC><<<grid_for(n, 1), 256, 0, st>>>(gl, x, n, c, rs, target, stats, w, ii, g);
  }
}

template <typename T>
Weights<typename Acc<T>::type> weights(float w_ce, float w_ice, float w_klu, float w_negent, float scale) {
  using A = typename Acc<T>::type;
  return Weights<A>{A(w_ce), A(w_ice), A(w_klu), A(w_negent), A(scale)};
}

}  // namespace
}  // namespace cuda
}  // namespace sophon_fast

extern "C" int sf_row_losses_fwd_cuda(const void* logits, int dtype, int64_t n, int64_t c, int64_t row_stride,
                                      const int64_t* target, float w_ce, float w_ice, float w_klu, float w_negent,
                                      float scale, int64_t ignore_index, void* loss, void* stats, void* stream) {
  using namespace sophon_fast::cuda;
  if (n < 0 || c < 1 || (target == nullptr && (w_ce != 0.f || w_ice != 0.f))) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (n == 0) return 0;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    const auto* x = static_cast<const T*>(logits);
    const auto w = weights<T>(w_ce, w_ice, w_klu, w_negent, scale);
    auto* l = static_cast<A*>(loss);
    auto* st = static_cast<A*>(stats);
    auto s = static_cast<cudaStream_t>(stream);
    if (aligned16(x) && row_stride % Pack<T>::V == 0) {
      launch_fwd<T, true>(x, n, c, row_stride, target, w, ignore_index, l, st, s);
    } else {
      launch_fwd<T, false>(x, n, c, row_stride, target, w, ignore_index, l, st, s);
    }
    return static_cast<int>(cudaGetLastError());
  });
}

extern "C" int sf_row_losses_bwd_cuda(const void* grad_loss, const void* logits, int dtype, int64_t n, int64_t c,
                                      int64_t row_stride, const int64_t* target, const void* stats, float w_ce,
                                      float w_ice, float w_klu, float w_negent, float scale, int64_t ignore_index,
                                      void* grad, void* stream) {
  using namespace sophon_fast::cuda;
  if (n < 0 || c < 1 || (target == nullptr && (w_ce != 0.f || w_ice != 0.f))) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (n == 0) return 0;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    const auto* x = static_cast<const T*>(logits);
    auto* g = static_cast<T*>(grad);
    const auto w = weights<T>(w_ce, w_ice, w_klu, w_negent, scale);
    const auto* gl = static_cast<const A*>(grad_loss);
    const auto* st = static_cast<const A*>(stats);
    auto s = static_cast<cudaStream_t>(stream);
    if (aligned16(x) && aligned16(g) && row_stride % Pack<T>::V == 0 && c % Pack<T>::V == 0) {
      launch_bwd<T, true>(gl, x, n, c, row_stride, target, st, w, ignore_index, g, s);
    } else {
      launch_bwd<T, false>(gl, x, n, c, row_stride, target, st, w, ignore_index, g, s);
    }
    return static_cast<int>(cudaGetLastError());
  });
}
