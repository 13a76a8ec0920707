// Vector helpers of the CPU kernels (csrc/cpu/kernels.cpp only): W-wide loads/stores in the
// accumulation type, a fast exp, lane masks. at::vec with CPU_CAPABILITY_AVX2 when setup.py enables
// it (8 floats per Vectorized<float>), the generic at::vec otherwise.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <limits>
#include <type_traits>

namespace sophon_fast {
namespace cpu {

using at::vec::Vectorized;

// Hot lambdas and helpers are forced inline into their loops (GCC outlined the backward's
// per-vector lambda, reloading every constant per call).
#if defined(__GNUC__)
#define SF_INLINE __attribute__((always_inline))
#else
#define SF_INLINE
#endif
#if defined(CPU_CAPABILITY_AVX2)
static_assert(Vectorized<float>::size() == 8, "the AVX2 build must see 256-bit vectors of 8 floats");
#endif

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Loads/stores W = 2 * Vectorized<acc>::size() elements of T as two acc vectors (16-bit types convert).
template <typename T>
struct IO {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  static constexpr int64_t L = V::size();
  static constexpr int64_t W = 2 * L;
  static_assert(std::is_same_v<T, A> || Vectorized<T>::size() == W, "16-bit vector must hold 2 float vectors");

  static inline void load(const T* p, V& a, V& b) {
    if constexpr (std::is_same_v<T, A>) {
      a = V::loadu(p);
      b = V::loadu(p + L);
    } else {
      at::vec::load_to_float<T>(p, a, b);
    }
  }
  static inline void store(T* p, const V& a, const V& b) {
    if constexpr (std::is_same_v<T, A>) {
      a.store(p);
      b.store(p + L);
    } else {
      at::vec::convert_from_float<T>(a, b).store(p);
    }
  }
  // Non-temporal store (no read-for-ownership, no cache pollution) at a 32-byte aligned p; call
  // stream_fence() before the data is handed to other threads. Plain store without AVX2.
  static inline void stream(T* p, const V& a, const V& b) {
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float>) {
      _mm256_stream_ps(p, a);
      _mm256_stream_ps(p + L, b);
    } else if constexpr (std::is_same_v<T, double>) {
      _mm256_stream_pd(p, a);
      _mm256_stream_pd(p + L, b);
    } else {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), __m256i(at::vec::convert_from_float<T>(a, b)));
    }
#else
    store(p, a, b);
#endif
  }
  static inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2)
    _mm_sfence();
#endif
  }
  // n < W elements; the lanes past n read as 0.
  static inline void load_part(const T* p, int64_t n, V& a, V& b) {
    A buf[W];
    for (int64_t i = 0; i < W; ++i) buf[i] = i < n ? static_cast<A>(p[i]) : A(0);
    a = V::loadu(buf);
    b = V::loadu(buf + L);
  }
  static inline void store_part(T* p, int64_t n, const V& a, const V& b) {
    A buf[W];
    a.store(buf);
    b.store(buf + L);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(buf[i]);
  }
  // Lanes from n on (of the pair a|b) set to `fill`.
  static inline void fill_from(V& a, V& b, int64_t n, A fill) {
    const V f(fill);
    if (n < L) {
      a = V::set(f, a, n);
      b = f;
    } else {
      b = V::set(f, b, n - L);
    }
  }
  // Horizontal sum / max of the pair (shuffle trees; SIMD on AVX2).
  static inline double hsum(const V& a, const V& b) {
    return at::vec::vec_reduce_all<A>([](V& x, V& y) { return x + y; }, a + b);
  }
  static inline A hmax(const V& a, const V& b) {
    return at::vec::vec_reduce_all<A>([](V& x, V& y) { return at::vec::maximum(x, y); }, at::vec::maximum(a, b));
  }
};

// exp for the kernels. Arguments are z' - max (<= 0) except at the target column in the backward,
// whose value is overwritten. fp64: Sleef's 1-ulp exp.
template <typename V>
SF_INLINE inline V vexp(const V& x) {
  return x.exp();
}

#if defined(CPU_CAPABILITY_AVX2)
// fp32 on AVX2, for x <= 88 (larger x: garbage; only the backward's target column gets such x, and
// it is rewritten): x clamped below at -86.5 (so it returns >= 2.8e-38, never 0), n = round(x / ln2)
// with the 1.5 * 2^23 shifter, r = x - n ln2 in one fma (ln2's fp32 rounding adds |n| * 2e-9
// relative error: < 1 ulp for results above e^-40, irrelevant below), e^r by a degree-6 minimax
// polynomial (|rel err| 2e-9 on [-ln2/2, ln2/2]), n added to the exponent field. 12 ops.
template <>
SF_INLINE inline Vectorized<float> vexp(const Vectorized<float>& v) {
  const __m256 x = _mm256_max_ps(v, _mm256_set1_ps(-86.5f));
  const __m256 shifter = _mm256_set1_ps(12582912.0f);
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), shifter);
  const __m256 n = _mm256_sub_ps(t, shifter);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693147182f), x);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(1.384364325e-03f), r, _mm256_set1_ps(8.374155499e-03f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166800156e-02f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.666643173e-01f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.999999404e-01f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  // t's low mantissa bits hold n: (bits(t) << 23) == n << 23 (mod 2^32)
  const __m256i e = _mm256_slli_epi32(_mm256_castps_si256(t), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
}
#endif

// Lanes of the pair (a | b) at index < first or == skip (relative to the step) set to `fill`.
template <typename T>
inline void mask_lanes(typename IO<T>::V& a, typename IO<T>::V& b, int64_t first, int64_t skip,
                       acc_t<T> fill) {
  using V = typename IO<T>::V;
  using A = acc_t<T>;
  const V lo = V::arange(A(0), A(1)), hi = V::arange(A(IO<T>::L), A(1));
  const V f(fill), vf(static_cast<A>(first)), vs(static_cast<A>(skip));
  a = V::blendv(a, f, (lo < vf) | (lo == vs));
  b = V::blendv(b, f, (hi < vf) | (hi == vs));
}

// z' - m for z' = scale * x: a plain add/sub for scale = +-1 (SK = 1 / -1), an fma otherwise (SK = 0).
template <int SK, typename V>
SF_INLINE inline V shifted(const V& x, const V& vs, const V& neg_m) {
  if constexpr (SK == 1) return x + neg_m;
  else if constexpr (SK == -1) return neg_m - x;
  else return at::vec::fmadd(x, vs, neg_m);
}

inline int scale_kind(double scale) { return scale == 1.0 ? 1 : scale == -1.0 ? -1 : 0; }

}  // namespace cpu
}  // namespace sophon_fast
