// CUDA kernels of the row-wise loss core (spec: sophon_fast/reference/losses.py), no torch headers.
//
// Per row of logits z (length C, target y or none), with z' = scale * z:
//   forward   m_x, S_x, T_x = online max, sum e^(z'-m_x), sum e^(z'-m_x) (z'-m_x) over c != y;
//             lse_x = m_x + log S_x; y folded in analytically gives (m, S, T) over all c:
//             lse = m + log S, NEGENT = T / S - log S; CE = lse - z'_y, ICE = softplus(z'_y - lse_x),
//             KLU = lse - mean(z') - log C; loss = sum_k w_k loss_k (0 on ignored rows).
//   backward  dL/dz_c = scale * g_r * (w_ce (p_c - [c=y]) + w_ice ([c=y] p_y - [c!=y] p_y q_c)
//                       + w_klu (p_c - 1/C) + w_negent p_c (z'_c - lse - NEGENT)),
//             p_c = e^(z'_c - lse), q_c = e^(z'_c - lse_x), from the saved stats [lse, lse_x, NEGENT];
//             g_r = grad_loss[r * gl_stride] / denom (the lean path's broadcast cotangent of a mean or sum).
// Traffic: forward reads the logits once (plus z_y) and writes 4 values per row; backward reads them
// once and writes the gradient once (ignored rows: no read, zeros written). 128-bit loads and stores
// when rows are 16-byte aligned, two packs in flight per thread. Rows of up to 1024 classes get one warp,
// longer rows one block; each forward thread keeps an online (m, S, T) state, merged by warp shuffles and,
// across warps, shared memory.
//
// Instruction budget (fp32 / bf16 / fp16; fp64 keeps accurate exp and log): per element one FMUL + one
// MUFU.EX2 (ex2.approx, fast_exp in dtypes.cuh) and two or three FADD/FFMA; per 16-byte pack one max tree,
// at most one rescale of the running sums (only when the pack raises the row max: rare after the first packs)
// and one 32-bit test for the target column. Only the terms a call needs are compiled in: the forward is
// templated on KLU (sum z') and NEG (T), the backward on NEED_P (CE, KLU or NEGENT) and ICE; with both, the
// backward shares one exponential: p_c = q_c e^(lse_x - lse) (the factor is <= 1: nothing overflows).
#include <climits>
#include <type_traits>

#include "dtypes.cuh"
#include "launchers.h"

#ifdef NDEBUG
#undef NDEBUG  // the target-range assertion of sf_reduce_rows_cuda must survive release builds
#endif
#include <cassert>

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

// Moves the running sums to a new maximum mx >= st.m (a non-empty state has s >= 1).
template <typename A, bool NEG> __device__ __forceinline__ void raise_max(State<A>& st, A mx) {
  if (st.s > A(0)) {
    const A gap = st.m - mx, a = fast_exp(gap);
    if (NEG) st.t = a * (st.t + gap * st.s);
    st.s *= a;
  }
  st.m = mx;
}

// Adds K logits z' (none of them the target) to the state: one max over the group, at most one rescale.
template <typename A, bool NEG, int K> __device__ __forceinline__ void push_group(State<A>& st, const A* z) {
  A mx = z[0];
#pragma unroll
  for (int k = 1; k < K; ++k) mx = fmax(mx, z[k]);
  if (mx > st.m) raise_max<A, NEG>(st, mx);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const A d = z[k] - st.m, e = fast_exp(d);
    st.s += e;
    if (NEG) st.t = fma(e, d, st.t);
  }
}

// The rare group that holds the target column `skip`: the same sums without it.
template <typename A, bool NEG, int K>
__device__ __forceinline__ void push_group_skip(State<A>& st, const A* z, int skip) {
  A mx = -INFINITY;
#pragma unroll
  for (int k = 0; k < K; ++k) mx = k == skip ? mx : fmax(mx, z[k]);
  if (mx == -INFINITY) return;  // the group is the target alone
  if (mx > st.m) raise_max<A, NEG>(st, mx);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (k == skip) continue;
    const A d = z[k] - st.m, e = fast_exp(d);
    st.s += e;
    if (NEG) st.t = fma(e, d, st.t);
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
// outside [0, c) (never used as an index: the row's loss, stats and gradient are NaN). y is a 32-bit
// column (-1 without one): rows are shorter than 2^31 (checked by the launchers).
struct RowTarget { bool valid, has_y, bad; int y; };
__device__ __forceinline__ RowTarget row_target(const int64_t* target, int64_t r, int64_t c, int64_t ignore_index) {
  if (target == nullptr) return RowTarget{true, false, false, -1};
  const int64_t y = target[r];
  const bool valid = y != ignore_index, in_range = y >= 0 && y < c;
  return RowTarget{valid, valid && in_range, valid && !in_range, (valid && in_range) ? static_cast<int>(y) : -1};
}

// True when column y lies in [j, j + K): one unsigned 32-bit compare (y = -1 never does).
template <int K> __device__ __forceinline__ bool holds(int y, int j) {
  return static_cast<unsigned>(y - j) < static_cast<unsigned>(K);
}

template <typename T, typename A, int K>
__device__ __forceinline__ void unpack(const Pack<T>& pk, A scale, A* z, A& sum_z) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
    z[k] = scale * to_acc<A>(pk.v[k]);
    sum_z += z[k];  // dead code (removed) unless KLU reads it
  }
}

// TPR threads per row (32: a warp per row; BLOCK: the whole block per row), BLOCK / TPR rows per block.
template <typename T, int TPR, int BLOCK, bool VEC, bool KLU, bool NEG>
__global__ void __launch_bounds__(BLOCK)
row_losses_fwd_kernel(const T* __restrict__ logits, int64_t n, int c, int64_t row_stride,
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
    const int y = rt.y;
    int j0 = 0;
    if (VEC) {
      constexpr int V = Pack<T>::V;
      const int cv = c / V * V, step = TPR * V;
      for (int j = lane * V; j < cv; j += 2 * step) {  // two 16-byte loads in flight
        const int j2 = j + step;
        const Pack<T> a = *reinterpret_cast<const Pack<T>*>(row + j);
        Pack<T> b;
        if (j2 < cv) b = *reinterpret_cast<const Pack<T>*>(row + j2);
        A z[V];
        unpack<T, A, V>(a, w.scale, z, st.sum_z);
        if (holds<V>(y, j)) push_group_skip<A, NEG, V>(st, z, y - j);
        else push_group<A, NEG, V>(st, z);
        if (j2 < cv) {
          unpack<T, A, V>(b, w.scale, z, st.sum_z);
          if (holds<V>(y, j2)) push_group_skip<A, NEG, V>(st, z, y - j2);
          else push_group<A, NEG, V>(st, z);
        }
      }
      j0 = cv;
    }
    for (int j = j0 + lane; j < c; j += TPR) {
      const A z = w.scale * to_acc<A>(row[j]);
      st.sum_z += z;
      if (j != y) push_group<A, NEG, 1>(st, &z);
    }
    if (!KLU) st.sum_z = A(0);
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
    const A log_s = flog(s_all);
    const A lse = m + log_s;
    A negent = A(NAN);  // only defined (and read) with the NEGENT term, as the C++ kernel stores it
    if (NEG) {
      const A t_all = (seen ? a * (st.t + (st.m - m) * st.s) : A(0)) + (rt.has_y ? b * (z_y - m) : A(0));
      negent = t_all / s_all - log_s;
    }
    A l = A(0);
    if (w.ce != A(0)) l += w.ce * (lse - z_y);
    if (w.ice != A(0)) l += w.ice * softplus(z_y - lse_x);
    if (KLU) l += w.klu * (lse - st.sum_z / A(c) - flog(A(c)));
    if (NEG) l += w.ne * negent;
    const A nan = A(NAN);
    loss[r] = rt.bad ? nan : (rt.valid ? l : A(0));
    stats[3 * r] = rt.bad ? nan : lse;
    stats[3 * r + 1] = rt.bad ? nan : lse_x;
    stats[3 * r + 2] = rt.bad ? nan : negent;
  }
}

// Per-row constants of the backward and the gradient of one non-target element (times the row's g_r).
template <typename A, bool NEED_P, bool ICE> struct Grad {
  A lse, lse_x, negent, k, p_y, ice_py, ce_klu, klu_c, ne;
  __device__ __forceinline__ A at(A z) const {
    if (NEED_P && ICE) {
      const A q = fast_exp(z - lse_x), p = q * k;  // one exponential; q <= 1 off the target
      return fma(p, ce_klu + ne * (z - lse - negent), -klu_c) - ice_py * q;
    } else if (NEED_P) {
      const A p = fast_exp(z - lse);
      return fma(p, ce_klu + ne * (z - lse - negent), -klu_c);
    } else {
      return -ice_py * fast_exp(z - lse_x);
    }
  }
};

// Register budget of the backward: 6 blocks of 256 threads per SM (<= 40 registers) for the 16- and 32-bit types,
// so that enough 16-byte loads are in flight; fp64 is compute-bound anyway and keeps the default.
template <typename T> constexpr int bwd_min_blocks() { return sizeof(T) == 8 ? 1 : 6; }

template <typename T, int TPR, int BLOCK, bool VEC, bool NEED_P, bool ICE>
__global__ void __launch_bounds__(BLOCK, bwd_min_blocks<T>())
row_losses_bwd_kernel(const typename Acc<T>::type* __restrict__ grad_loss, int64_t gl_stride,
                      const typename Acc<T>::type* __restrict__ gl_denom, const T* __restrict__ logits, int64_t n,
                      int c, int64_t row_stride, const int64_t* __restrict__ target,
                      const typename Acc<T>::type* __restrict__ stats, Weights<typename Acc<T>::type> w,
                      int64_t ignore_index, T* __restrict__ grad) {
  using A = typename Acc<T>::type;
  constexpr int ROWS = BLOCK / TPR;
  const int lane = threadIdx.x % TPR;
  const A denom = gl_denom == nullptr ? A(1) : *gl_denom;
  for (int64_t r = int64_t(blockIdx.x) * ROWS + threadIdx.x / TPR; r < n; r += int64_t(gridDim.x) * ROWS) {
    const RowTarget rt = row_target(target, r, c, ignore_index);
    T* out = grad + r * c;
    if (!rt.valid || rt.bad) {
      const A fill = rt.bad ? A(NAN) : A(0);
      for (int j = lane; j < c; j += TPR) out[j] = from_acc<T>(fill);
      continue;
    }
    const T* row = logits + r * row_stride;
    const int y = rt.y;
    Grad<A, NEED_P, ICE> gr;
    gr.lse = stats[3 * r];
    gr.lse_x = stats[3 * r + 1];
    gr.negent = w.ne != A(0) ? stats[3 * r + 2] : A(0);
    gr.k = (NEED_P && ICE) ? fexp(gr.lse_x - gr.lse) : A(1);
    const A z_y = rt.has_y ? w.scale * to_acc<A>(row[y]) : A(0);
    // In place (grad == logits): every thread of the row has read z'_y before any writes it over.
    if (TPR == 32) __syncwarp(); else __syncthreads();
    gr.p_y = rt.has_y ? fexp(z_y - gr.lse) : A(0);
    gr.ice_py = w.ice * gr.p_y;
    gr.ce_klu = w.ce + w.klu;
    gr.klu_c = w.klu / A(c);
    gr.ne = w.ne;
    const A gl = grad_loss[r * gl_stride] / denom * w.scale;
    // the target element, from the scalar formula
    const A g_y = (w.ce * (gr.p_y - A(1)) + w.ice * gr.p_y + w.klu * (gr.p_y - A(1) / A(c)) +
                   w.ne * gr.p_y * (z_y - gr.lse - gr.negent)) * gl;
    int j0 = 0;
    if (VEC) {
      // Both row starts are 16-byte aligned (checked on the host): whole packs in, whole packs out.
      constexpr int V = Pack<T>::V;
      const int cv = c / V * V, step = TPR * V;
      for (int j = lane * V; j < cv; j += 2 * step) {  // two 16-byte loads in flight
        const int j2 = j + step;
        const Pack<T> a = *reinterpret_cast<const Pack<T>*>(row + j);
        Pack<T> b;
        if (j2 < cv) b = *reinterpret_cast<const Pack<T>*>(row + j2);
        Pack<T> o;
#pragma unroll
        for (int k = 0; k < V; ++k) o.v[k] = from_acc<T>(gr.at(w.scale * to_acc<A>(a.v[k])) * gl);
        if (holds<V>(y, j)) o.v[y - j] = from_acc<T>(g_y);
        *reinterpret_cast<Pack<T>*>(out + j) = o;
        if (j2 < cv) {
#pragma unroll
          for (int k = 0; k < V; ++k) o.v[k] = from_acc<T>(gr.at(w.scale * to_acc<A>(b.v[k])) * gl);
          if (holds<V>(y, j2)) o.v[y - j2] = from_acc<T>(g_y);
          *reinterpret_cast<Pack<T>*>(out + j2) = o;
        }
      }
      j0 = cv;
    }
    for (int j = j0 + lane; j < c; j += TPR) {
      out[j] = from_acc<T>(j == y ? g_y : gr.at(w.scale * to_acc<A>(row[j])) * gl);
    }
  }
}

inline int grid_for(int64_t n, int rows_per_block) {
  const int64_t blocks = (n + rows_per_block - 1) / rows_per_block;
  return static_cast<int>(blocks < (int64_t(1) << 20) ? blocks : (int64_t(1) << 20));  // rows are strided
}

template <typename T> using AccOf = typename Acc<T>::type;

// Rows of up to 1024 classes: a warp per row, 8 rows per block; up to 16384: 256 threads; beyond: 1024
// (the backward streams rows longer than 1024 with 256 threads).
template <typename T, bool VEC, bool KLU, bool NEG>
void launch_fwd(const T* x, int64_t n, int c, int64_t rs, const int64_t* target, Weights<AccOf<T>> w, int64_t ii,
                AccOf<T>* loss, AccOf<T>* stats, cudaStream_t st) {
  if (c <= 1024) {
    row_losses_fwd_kernel<T, 32, 256, VEC, KLU, NEG><<<grid_for(n, 8), 256, 0, st>>>(x, n, c, rs, target, w, ii, loss,
                                                                                     stats);
  } else if (c <= 16384) {
    row_losses_fwd_kernel<T, 256, 256, VEC, KLU, NEG><<<grid_for(n, 1), 256, 0, st>>>(x, n, c, rs, target, w, ii,
                                                                                      loss, stats);
  } else {
    row_losses_fwd_kernel<T, 1024, 1024, VEC, KLU, NEG><<<grid_for(n, 1), 1024, 0, st>>>(x, n, c, rs, target, w, ii,
                                                                                         loss, stats);
  }
}

template <typename T, bool VEC, bool NEED_P, bool ICE>
void launch_bwd(const AccOf<T>* gl, int64_t gl_stride, const AccOf<T>* gl_denom, const T* x, int64_t n, int c,
                int64_t rs, const int64_t* target, const AccOf<T>* stats, Weights<AccOf<T>> w, int64_t ii, T* g,
                cudaStream_t st) {
  if (c <= 1024) {
    row_losses_bwd_kernel<T, 32, 256, VEC, NEED_P, ICE><<<grid_for(n, 8), 256, 0, st>>>(gl, gl_stride, gl_denom, x, n,
                                                                                        c, rs, target, stats, w, ii, g);
  } else {  // no reduction here: 256 threads stream any longer row
    row_losses_bwd_kernel<T, 256, 256, VEC, NEED_P, ICE><<<grid_for(n, 1), 256, 0, st>>>(gl, gl_stride, gl_denom, x,
                                                                                         n, c, rs, target, stats, w,
                                                                                         ii, g);
  }
}

template <typename T>
Weights<AccOf<T>> weights(double w_ce, double w_ice, double w_klu, double w_negent, double scale) {
  using A = AccOf<T>;
  return Weights<A>{A(w_ce), A(w_ice), A(w_klu), A(w_negent), A(scale)};
}

// One block, fixed order (deterministic): per-row losses -> the reduced output, the divisor, the target check.
template <typename T>
__global__ void __launch_bounds__(256)
reduce_rows_kernel(const AccOf<T>* __restrict__ loss, const int64_t* __restrict__ target, int64_t n, int64_t c,
                   int64_t ignore_index, int reduction, int check, T* __restrict__ out, AccOf<T>* __restrict__ denom) {
  using A = AccOf<T>;
  __shared__ double sums[256];
  __shared__ long long counts[256];
  double total = 0;
  long long count = 0;
  for (int64_t r = threadIdx.x; r < n; r += blockDim.x) {
    const int64_t y = target == nullptr ? 0 : target[r];
    const bool valid = target == nullptr || y != ignore_index;
    if (check && valid) assert((y >= 0 && y < c) && "sophon_fast: a target is out of range (and is not ignore_index)");
    count += valid ? 1 : 0;
    if (reduction == 0) out[r] = from_acc<T>(loss[r]);
    else total += static_cast<double>(loss[r]);
  }
  sums[threadIdx.x] = total;
  counts[threadIdx.x] = count;
  __syncthreads();
  for (int o = blockDim.x / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o) {
      sums[threadIdx.x] += sums[threadIdx.x + o];
      counts[threadIdx.x] += counts[threadIdx.x + o];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const A d = reduction == 1 ? static_cast<A>(counts[0]) : A(1);
    if (reduction != 0) out[0] = from_acc<T>(static_cast<A>(sums[0]) / d);
    *denom = d;
  }
}

}  // namespace
}  // namespace cuda
}  // namespace sophon_fast

extern "C" int sf_row_losses_fwd_cuda(const void* logits, int dtype, int64_t n, int64_t c, int64_t row_stride,
                                      const int64_t* target, double w_ce, double w_ice, double w_klu, double w_negent,
                                      double scale, int64_t ignore_index, void* loss, void* stats, void* stream) {
  using namespace sophon_fast::cuda;
  if (n < 0 || c < 1 || c > INT_MAX / 2 || (target == nullptr && (w_ce != 0 || w_ice != 0))) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (n == 0) return 0;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = AccOf<T>;
    const auto* x = static_cast<const T*>(logits);
    const auto w = weights<T>(w_ce, w_ice, w_klu, w_negent, scale);
    auto* l = static_cast<A*>(loss);
    auto* st = static_cast<A*>(stats);
    auto s = static_cast<cudaStream_t>(stream);
    const int ci = static_cast<int>(c);
    const bool vec = aligned16(x) && row_stride % Pack<T>::V == 0, klu = w_klu != 0, neg = w_negent != 0;
    auto go = [&](auto vec_t, auto klu_t, auto neg_t) {
      launch_fwd<T, decltype(vec_t)::value, decltype(klu_t)::value, decltype(neg_t)::value>(
          x, n, ci, row_stride, target, w, ignore_index, l, st, s);
    };
    using F = std::false_type;
    using Tr = std::true_type;
    if (vec) {
      if (klu && neg) go(Tr{}, Tr{}, Tr{}); else if (klu) go(Tr{}, Tr{}, F{}); else if (neg) go(Tr{}, F{}, Tr{});
      else go(Tr{}, F{}, F{});
    } else {
      if (klu && neg) go(F{}, Tr{}, Tr{}); else if (klu) go(F{}, Tr{}, F{}); else if (neg) go(F{}, F{}, Tr{});
      else go(F{}, F{}, F{});
    }
    return static_cast<int>(cudaGetLastError());
  });
}

extern "C" int sf_row_losses_bwd_cuda(const void* grad_loss, int64_t gl_stride, const void* gl_denom,
                                      const void* logits, int dtype, int64_t n, int64_t c, int64_t row_stride,
                                      const int64_t* target, const void* stats, double w_ce, double w_ice,
                                      double w_klu, double w_negent, double scale, int64_t ignore_index, void* grad,
                                      void* stream) {
  using namespace sophon_fast::cuda;
  if (n < 0 || c < 1 || c > INT_MAX / 2 || (target == nullptr && (w_ce != 0 || w_ice != 0))) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (n == 0) return 0;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = AccOf<T>;
    const auto* x = static_cast<const T*>(logits);
    auto* g = static_cast<T*>(grad);
    const auto w = weights<T>(w_ce, w_ice, w_klu, w_negent, scale);
    const auto* gl = static_cast<const A*>(grad_loss);
    const auto* gd = static_cast<const A*>(gl_denom);
    const auto* st = static_cast<const A*>(stats);
    auto s = static_cast<cudaStream_t>(stream);
    const int ci = static_cast<int>(c);
    const bool vec = aligned16(x) && aligned16(g) && row_stride % Pack<T>::V == 0 && c % Pack<T>::V == 0;
    const bool need_p = w_ce != 0 || w_klu != 0 || w_negent != 0, ice = w_ice != 0;
    auto go = [&](auto vec_t, auto p_t, auto ice_t) {
      launch_bwd<T, decltype(vec_t)::value, decltype(p_t)::value, decltype(ice_t)::value>(
          gl, gl_stride, gd, x, n, ci, row_stride, target, st, w, ignore_index, g, s);
    };
    using F = std::false_type;
    using Tr = std::true_type;
    if (vec) {
      if (need_p && ice) go(Tr{}, Tr{}, Tr{}); else if (ice) go(Tr{}, F{}, Tr{}); else go(Tr{}, Tr{}, F{});
    } else {
      if (need_p && ice) go(F{}, Tr{}, Tr{}); else if (ice) go(F{}, F{}, Tr{}); else go(F{}, Tr{}, F{});
    }
    return static_cast<int>(cudaGetLastError());
  });
}

extern "C" int sf_reduce_rows_cuda(const void* loss, int dtype, const int64_t* target, int64_t n, int64_t c,
                                   int64_t ignore_index, int reduction, int check, void* out, void* denom,
                                   void* stream) {
  using namespace sophon_fast::cuda;
  if (n < 0 || reduction < 0 || reduction > 2) return static_cast<int>(cudaErrorInvalidValue);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = AccOf<T>;
    reduce_rows_kernel<T><<<1, 256, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const A*>(loss), target, n, c, ignore_index, reduction, check, static_cast<T*>(out),
        static_cast<A*>(denom));
    return static_cast<int>(cudaGetLastError());
  });
}
