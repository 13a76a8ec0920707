// CPU kernels: row-wise fused losses (forward, backward) and the fused inner optimiser step.
//
// Row losses (spec: sophon_fast/reference/losses.py), on z' = scale * z, y the row's target:
//   forward   one read of the row: blocks of about kBlock elements, each giving a partial
//             (m, S = sum e^(z'-m), T = sum e^(z'-m)(z'-m), sum z) over c != y, merged in fp64. The
//             centre m is a running estimate of the max (any value of the row will do for S; a block
//             more than kHeadroom above it is rescanned); with NEGENT a block max is scanned first
//             from L1, since T / S - log S cancels to |max - m|. T only when w_negent != 0, sum z only
//             when w_klu != 0. lse_x = m + log S, lse = logaddexp(z'_y, lse_x), negent = T'/S' - log S'.
//   backward  one read of the row, one write of the gradient, one exp per element:
//             q_c = exp(z'_c - ref) with ref = lse, or lse_x when ICE is on and p_y is within
//             e^-20 of 1 (q_c <= 1 stays finite); every term is q_c times a per-row constant, so for c != y
//               g_c = gl*scale * [q_c (alpha + beta (z'_c - ref)) + gamma]
//             and g_y is rewritten from the scalar formula.
// Traffic: forward 1R of the logits (+ 4 floats per row written), backward 1R + 1W.
// Parallel over (row, chunk) items: rows when there are many, chunks of a row when there are few
// (3 x 262144 keeps every thread busy); chunk partials are merged per row.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "vec_utils.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace sophon_fast {
namespace cpu {
namespace {

using c10::BFloat16;
using c10::Half;

constexpr int64_t kBlock = 2048;       // elements scanned twice from L1 in the forward
constexpr int64_t kMinChunk = 16384;   // smallest piece of a row given to one thread
constexpr int64_t kStreamBytes = int64_t(16) << 20;  // gradients at least this big use streaming stores
constexpr double kInf = std::numeric_limits<double>::infinity();

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
struct Partial {
  double m = -kInf;  // max of z'
  double s = 0;      // sum exp(z' - m)
  double t = 0;      // sum exp(z' - m) (z' - m)
  double z = 0;      // sum of the raw logits (times scale at the end)
};

inline void merge(Partial& a, const Partial& b) {
  a.z += b.z;
  if (b.s == 0) return;  // empty (a non-empty partial has s >= 1)
  if (a.s == 0) {
    a.m = b.m, a.s = b.s, a.t = b.t;
    return;
  }
  const double m = std::max(a.m, b.m), da = a.m - m, db = b.m - m;
  const double ea = std::exp(da), eb = std::exp(db);
  a.t = ea * (a.t + da * a.s) + eb * (b.t + db * b.s);
  a.s = ea * a.s + eb * b.s;
  a.m = m;
}

// One scan of p[0, len) (len >= W) minus column `skip` (-1: none): whole W-steps, then one
// overlapping step over the last W elements with its already counted lanes masked (only that step
// and the one holding `skip` are masked). Sums are relative to `m`, which need not be the max: r
// gets (m, S, T, sum z) and the return value is max(z') - m, so the caller can check that no term
// overflowed. Sums are two-level (kSub steps per lane, then into block sums), so no fp32 chain is
// longer than about kSub + kBlock / (kSub W) terms.
template <typename T, bool KLU, bool NEG, int SK>
inline acc_t<T> block_scan(const T* p, int64_t len, int64_t skip, acc_t<T> scale, acc_t<T> m, Partial& r) {
  using io = IO<T>;
  using A = typename io::A;
  using V = typename io::V;
  constexpr int64_t W = io::W, kSub = 8;
  const V vs(scale), vm(-m);
  const int64_t full = len - len % W, skip_step = skip < 0 ? -1 : skip - skip % W;
  const int64_t last = full < len ? len - W : -1, first = full < len ? full - last : 0;
  V mx0(-std::numeric_limits<A>::infinity()), mx1 = mx0, z0(A(0)), z1(A(0));
  V s0(A(0)), s1(A(0)), t0(A(0)), t1(A(0)), bs(A(0)), bt(A(0));
  auto step = [&](int64_t i, int64_t first_lane, int64_t skip_lane, bool masked) SF_INLINE {
    V a, b;
    io::load(p + i, a, b);
    if constexpr (KLU) {
      V za = a, zb = b;
      if (masked) mask_lanes<T>(za, zb, first_lane, skip_lane, A(0));
      z0 += za, z1 += zb;
    }
    V da = shifted<SK>(a, vs, vm), db = shifted<SK>(b, vs, vm);
    // masked lanes: exp(-1000) (<= 2.8e-38) and its T term are negligible; -inf would make T NaN
    if (masked) mask_lanes<T>(da, db, first_lane, skip_lane, A(-1000));
    mx0 = at::vec::maximum(mx0, da), mx1 = at::vec::maximum(mx1, db);
    const V ea = vexp(da), eb = vexp(db);
    s0 += ea, s1 += eb;
    if constexpr (NEG) t0 = at::vec::fmadd(ea, da, t0), t1 = at::vec::fmadd(eb, db, t1);
  };
  for (int64_t i0 = 0; i0 < full; i0 += kSub * W) {
    for (int64_t i = i0; i < std::min(full, i0 + kSub * W); i += W) step(i, 0, skip - i, i == skip_step);
    bs += s0 + s1, s0 = s1 = V(A(0));
    if constexpr (NEG) bt += t0 + t1, t0 = t1 = V(A(0));
  }
  if (last >= 0) step(last, first, skip - last, true);
  r.m = m;
  r.s = io::hsum(s0 + bs, s1);
  r.t = NEG ? io::hsum(t0 + bt, t1) : 0.0;
  r.z = KLU ? io::hsum(z0, z1) : 0.0;
  return io::hmax(mx0, mx1);
}

// max of z' over p[0, len) (len >= W) minus `skip`, with block_scan's step pattern.
template <typename T, int SK>
inline acc_t<T> block_max(const T* p, int64_t len, int64_t skip, acc_t<T> scale) {
  using io = IO<T>;
  using A = typename io::A;
  using V = typename io::V;
  constexpr int64_t W = io::W;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  const V vs(scale), zero(A(0));
  const int64_t full = len - len % W;
  V mx0(kNegInf), mx1 = mx0;
  auto step = [&](int64_t i, int64_t first_lane) SF_INLINE {
    V a, b;
    io::load(p + i, a, b);
    a = shifted<SK>(a, vs, zero), b = shifted<SK>(b, vs, zero);
    if (first_lane > 0 || (skip >= i && skip < i + W)) mask_lanes<T>(a, b, first_lane, skip - i, kNegInf);
    mx0 = at::vec::maximum(mx0, a), mx1 = at::vec::maximum(mx1, b);
  };
  for (int64_t i = 0; i < full; i += W) step(i, 0);
  if (full < len) step(len - W, full - (len - W));
  return io::hmax(mx0, mx1);
}

// exp(z' - m) is evaluated up to this much above the running max estimate m (e^64 * 2^13 terms
// stay far from fp32 overflow); a block that goes higher is scanned again relative to its max.
constexpr double kHeadroom = 64.0;

// Partial over p[0, len) (len >= W) minus `skip`. Without NEGENT: one scan of the block relative to
// the running estimate *m_est (a value of the row; S's relative precision does not depend on the
// centre), scanned again in the rare case its max exceeds *m_est + kHeadroom. With NEGENT: a max
// scan first (from L1), because T / S - log S cancels to the precision of |max - centre|.
template <typename T, bool KLU, bool NEG, int SK>
inline Partial block_partial(const T* p, int64_t len, int64_t skip, acc_t<T> scale, acc_t<T>* m_est) {
  Partial r;
  if constexpr (NEG) {
    block_scan<T, KLU, NEG, SK>(p, len, skip, scale, block_max<T, SK>(p, len, skip, scale), r);
    return r;
  }
  const acc_t<T> top = *m_est + block_scan<T, KLU, NEG, SK>(p, len, skip, scale, *m_est, r);
  if (top > *m_est + kHeadroom) block_scan<T, KLU, NEG, SK>(p, len, skip, scale, top, r);
  *m_est = std::max(*m_est, top);
  return r;
}

// Scalar partial for pieces shorter than one step (C < W).
template <typename T, bool KLU, bool NEG>
inline Partial short_partial(const T* p, int64_t len, int64_t skip, double scale) {
  Partial r;
  for (int64_t i = 0; i < len; ++i) {
    if (i == skip) continue;
    const double x = static_cast<double>(static_cast<acc_t<T>>(p[i]));
    if (KLU) r.z += x;
    merge(r, Partial{scale * x, 1.0, 0.0, 0.0});
  }
  return r;
}

// Partial over [lo, hi) of a row minus the target column y (y < 0: none), in blocks of about kBlock.
template <typename T, bool KLU, bool NEG, int SK>
inline Partial chunk_partial_sk(const T* row, int64_t lo, int64_t hi, int64_t y, acc_t<T> scale) {
  constexpr int64_t W = IO<T>::W;
  if (hi - lo < W) return short_partial<T, KLU, NEG>(row + lo, hi - lo, y < 0 ? -1 : y - lo, scale);
  acc_t<T> m_est = scale * static_cast<acc_t<T>>(row[y == lo ? lo + 1 : lo]);
  Partial acc;
  for (int64_t b = lo; b < hi;) {
    const int64_t len = hi - b < kBlock + W ? hi - b : kBlock;  // never leave a piece shorter than W
    const int64_t skip = (y >= b && y < b + len) ? y - b : -1;
    merge(acc, block_partial<T, KLU, NEG, SK>(row + b, len, skip, scale, &m_est));
    b += len;
  }
  return acc;
}

template <typename T, bool KLU, bool NEG>
inline Partial chunk_partial(const T* row, int64_t lo, int64_t hi, int64_t y, acc_t<T> scale) {
  switch (scale_kind(scale)) {
    case 1: return chunk_partial_sk<T, KLU, NEG, 1>(row, lo, hi, y, scale);
    case -1: return chunk_partial_sk<T, KLU, NEG, -1>(row, lo, hi, y, scale);
    default: return chunk_partial_sk<T, KLU, NEG, 0>(row, lo, hi, y, scale);
  }
}

constexpr int64_t kNoTarget = -1;   // no target tensor, or an ignored row
constexpr int64_t kBadTarget = -2;  // a target outside [0, c): the row's loss, stats and gradient are NaN

// Row target y in [0, c), kNoTarget or kBadTarget; *valid is false on ignored rows only. Targets are
// never used as an index before this range check (the front end asserts the range asynchronously).
inline int64_t row_target(const int64_t* target, int64_t r, int64_t c, int64_t ignore_index, bool* valid) {
  *valid = true;
  if (target == nullptr) return kNoTarget;
  const int64_t y = target[r];
  if (y == ignore_index) {
    *valid = false;
    return kNoTarget;
  }
  return (y >= 0 && y < c) ? y : kBadTarget;
}

template <typename T, typename A>
void finalize_row(const T* row, Partial p, int64_t y, bool valid, int64_t c, double scale, const LossWeights& w,
                  bool neg, A* loss, A* stats) {
  if (y == kBadTarget) {
    *loss = stats[0] = stats[1] = stats[2] = std::numeric_limits<A>::quiet_NaN();
    return;
  }
  const double lse_x = p.m + std::log(p.s), log_c = std::log(static_cast<double>(c));
  double lse = lse_x, zy = 0, sp_pos = 0, sp_neg = 0, negent = std::numeric_limits<double>::quiet_NaN();
  if (y >= 0) {
    const double raw = static_cast<double>(static_cast<A>(row[y]));
    zy = static_cast<double>(static_cast<A>(scale) * static_cast<A>(raw));
    // d = z'_y - lse_x: lse = max + l1, softplus(+-d) = max(+-d, 0) + l1 from one exp and one log1p
    const double d = zy - lse_x, l1 = std::log1p(std::exp(-std::abs(d)));
    lse = std::max(zy, lse_x) + l1;
    sp_pos = std::max(d, 0.0) + l1;   // ICE = softplus(z'_y - lse_x)
    sp_neg = std::max(-d, 0.0) + l1;  // CE = lse - z'_y = softplus(lse_x - z'_y)
    p.z += raw;
    if (neg) merge(p, Partial{zy, 1.0, 0.0, 0.0});
  }
  if (neg) negent = p.t / p.s - std::log(p.s);
  double l = 0;
  if (valid) {
    if (w.ce) l += w.ce * sp_neg;
    if (w.ice) l += w.ice * sp_pos;
    if (w.klu) l += w.klu * (lse - scale * p.z / static_cast<double>(c) - log_c);
    if (w.negent) l += w.negent * negent;
  }
  *loss = static_cast<A>(l);
  stats[0] = static_cast<A>(lse);
  stats[1] = static_cast<A>(lse_x);
  stats[2] = static_cast<A>(negent);
}

// Pieces per row: 1 when rows alone keep every thread busy, else enough chunks (>= kMinChunk each).
inline int64_t row_splits(int64_t n, int64_t c) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || n >= 8 * threads || c < 2 * kMinChunk) return 1;
  return std::max<int64_t>(1, std::min((8 * threads + n - 1) / n, c / kMinChunk));
}

inline int64_t chunk_len(int64_t c, int64_t splits, int64_t w) {
  const int64_t len = (c + splits - 1) / splits;
  return (len + w - 1) / w * w;
}

template <typename T, bool KLU, bool NEG>
void fwd_impl(const T* logits, int64_t n, int64_t c, int64_t rs, const int64_t* target, const LossWeights& w,
              double scale, int64_t ignore_index, acc_t<T>* loss, acc_t<T>* stats) {
  using A = acc_t<T>;
  const A sc = static_cast<A>(scale);
  const int64_t splits = row_splits(n, c);
  if (splits == 1) {
    at::parallel_for(0, n, std::max<int64_t>(1, 32768 / c), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        bool valid;
        const int64_t y = row_target(target, r, c, ignore_index, &valid);
        const T* row = logits + r * rs;
        finalize_row<T, A>(row, chunk_partial<T, KLU, NEG>(row, 0, c, y, sc), y, valid, c, scale, w, NEG, loss + r,
                           stats + 3 * r);
      }
    });
    return;
  }
  const int64_t len = chunk_len(c, splits, IO<T>::W);
  const int64_t k = (c + len - 1) / len;
  std::vector<Partial> parts(n * k);
  at::parallel_for(0, n * k, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / k, lo = (i % k) * len;
      bool valid;
      const int64_t y = row_target(target, r, c, ignore_index, &valid);
      parts[i] = chunk_partial<T, KLU, NEG>(logits + r * rs, lo, std::min(c, lo + len), y, sc);
    }
  });
  for (int64_t r = 0; r < n; ++r) {
    Partial p = parts[r * k];
    for (int64_t j = 1; j < k; ++j) merge(p, parts[r * k + j]);
    bool valid;
    const int64_t y = row_target(target, r, c, ignore_index, &valid);
    finalize_row<T, A>(logits + r * rs, p, y, valid, c, scale, w, NEG, loss + r, stats + 3 * r);
  }
}

template <typename T>
void fwd_dispatch(const void* logits, int64_t n, int64_t c, int64_t rs, const int64_t* target, const LossWeights& w,
                  double scale, int64_t ignore_index, void* loss, void* stats) {
  using A = acc_t<T>;
  auto* z = static_cast<const T*>(logits);
  auto* l = static_cast<A*>(loss);
  auto* s = static_cast<A*>(stats);
  const bool klu = w.klu != 0, neg = w.negent != 0;
  if (klu && neg) fwd_impl<T, true, true>(z, n, c, rs, target, w, scale, ignore_index, l, s);
  else if (klu) fwd_impl<T, true, false>(z, n, c, rs, target, w, scale, ignore_index, l, s);
  else if (neg) fwd_impl<T, false, true>(z, n, c, rs, target, w, scale, ignore_index, l, s);
  else fwd_impl<T, false, false>(z, n, c, rs, target, w, scale, ignore_index, l, s);
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------
template <typename T, bool NEG, int SK>
void bwd_chunk(const T* row, T* out, int64_t lo, int64_t hi, int64_t c, int64_t y, bool valid, double gl,
               const double* st, const LossWeights& w, double scale, bool stream, bool in_place) {
  using io = IO<T>;
  using A = typename io::A;
  using V = typename io::V;
  constexpr int64_t W = io::W;
  if (y == kBadTarget || !valid || gl == 0) {
    const double fill = y == kBadTarget ? std::numeric_limits<double>::quiet_NaN() : 0.0;
    std::fill(out + lo, out + hi, static_cast<T>(fill));
    return;
  }
  const double lse = st[0], lse_x = st[1], negent = st[2];
  const double gs = gl * scale;
  // One exp per element, q_c = exp(z'_c - ref). Every term is q_c times exp(a combination of the
  // stats), so with ref = lse each has the reference's rounding (CE, KLU, NEGENT: q_c = p_c; ICE:
  // p_y kx q_c = p_y exp(z'_c - lse_x)). When 1 - p_y < e^-20 that ICE product would overflow kx
  // while q_c underflows, so ref = lse_x there (q_c <= 1, and p_c = kp q_c is tiny anyway).
  const bool ref_x = w.ice != 0 && lse - lse_x > 20.0;
  const double ref = ref_x ? lse_x : lse;
  const double kp = ref_x ? std::exp(lse_x - lse) : 1.0, kx = ref_x ? 1.0 : std::exp(lse - lse_x);
  double p_y = 0, zy = 0;
  if (y >= 0) {
    zy = static_cast<double>(static_cast<A>(scale) * static_cast<A>(row[y]));
    p_y = std::exp(zy - lse);
  }
  // g_c = gs * [q_c (alpha + beta d_c) + gamma], d_c = z'_c - ref:
  //   CE, KLU: kp q_c; ICE: -p_y kx q_c; KLU: -1/C; NEGENT: kp q_c (d_c + ref - lse - negent)
  double alpha = (w.ce + w.klu) * kp, beta = 0;
  if (w.ice != 0) alpha -= w.ice * p_y * kx;  // kx may be inf when ICE is off
  if (NEG) {
    alpha += w.negent * kp * (ref - lse - negent);
    beta = w.negent * kp;
  }
  const V vs(static_cast<A>(scale)), vl(static_cast<A>(-ref)), va(static_cast<A>(gs * alpha)),
      vb(static_cast<A>(gs * beta)), vg(static_cast<A>(-gs * w.klu / static_cast<double>(c)));
  auto grad = [&](const V& x) SF_INLINE {
    const V d = shifted<SK>(x, vs, vl);
    const V q = vexp(d);
    if constexpr (NEG) return at::vec::fmadd(q, at::vec::fmadd(vb, d, va), vg);
    else return at::vec::fmadd(q, va, vg);
  };
  int64_t i = lo;
  if (stream && hi - lo >= 2 * W) {
    // one plain step covers the head up to the first 32-byte aligned element, then streaming stores
    V a, b;
    io::load(row + lo, a, b);
    io::store(out + lo, grad(a), grad(b));
    i = lo + static_cast<int64_t>((32 - reinterpret_cast<uintptr_t>(out + lo) % 32) % 32 / sizeof(T));
    for (; i + W <= hi; i += W) {
      io::load(row + i, a, b);
      io::stream(out + i, grad(a), grad(b));
    }
  }
  for (; i + W <= hi; i += W) {
    V a, b;
    io::load(row + i, a, b);
    io::store(out + i, grad(a), grad(b));
  }
  if (i < hi && hi - lo >= W && !in_place) {  // overlapping last step: rewrites a few elements with equal values
    V a, b;
    io::load(row + hi - W, a, b);
    io::store(out + hi - W, grad(a), grad(b));
  } else if (i < hi) {
    V a, b;
    io::load_part(row + i, hi - i, a, b);
    io::store_part(out + i, hi - i, grad(a), grad(b));
  }
  if (y >= lo && y < hi) {
    const double g = w.ce * (p_y - 1.0) + w.ice * p_y + w.klu * (p_y - 1.0 / static_cast<double>(c)) +
                     (NEG ? w.negent * p_y * (zy - lse - negent) : 0.0);
    out[y] = static_cast<T>(gs * g);
  }
  if (stream) io::stream_fence();
}

template <typename T, bool NEG>
void bwd_impl(const acc_t<T>* grad_loss, int64_t gl_stride, acc_t<T> gl_denom, const T* logits, int64_t n, int64_t c,
              int64_t rs, const int64_t* target, const acc_t<T>* stats, const LossWeights& w, double scale,
              int64_t ignore_index, T* grad) {
  // In place (grad == logits, the fused linear loss's chunk buffer): every element is read before it is
  // overwritten only if a row is one piece (z'_y is read first), steps never overlap and no streaming head
  // re-reads written elements.
  const bool in_place = static_cast<const void*>(logits) == static_cast<const void*>(grad);
  const int64_t splits = in_place ? 1 : row_splits(n, c);
  const int64_t len = chunk_len(c, splits, IO<T>::W);
  const int64_t k = (c + len - 1) / len;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::min(len, c));
  // Gradients bigger than the caches bypass them (saves the read-for-ownership of every line).
  const bool stream = !in_place && n * c * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
  const int sk = scale_kind(scale);
  at::parallel_for(0, n * k, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / k, lo = (i % k) * len;
      bool valid;
      const int64_t y = row_target(target, r, c, ignore_index, &valid);
      const double st[3] = {static_cast<double>(stats[3 * r]), static_cast<double>(stats[3 * r + 1]),
                            static_cast<double>(stats[3 * r + 2])};
      const int64_t hi = std::min(c, lo + len);
      const double gl = static_cast<double>(grad_loss[r * gl_stride] / gl_denom);
      const T* row = logits + r * rs;
      T* out = grad + r * c;
      if (sk == 1) bwd_chunk<T, NEG, 1>(row, out, lo, hi, c, y, valid, gl, st, w, scale, stream, in_place);
      else if (sk == -1) bwd_chunk<T, NEG, -1>(row, out, lo, hi, c, y, valid, gl, st, w, scale, stream, in_place);
      else bwd_chunk<T, NEG, 0>(row, out, lo, hi, c, y, valid, gl, st, w, scale, stream, in_place);
    }
  });
}

template <typename T>
void bwd_dispatch(const void* grad_loss, int64_t gl_stride, const void* gl_denom, const void* logits, int64_t n,
                  int64_t c, int64_t rs, const int64_t* target, const void* stats, const LossWeights& w, double scale,
                  int64_t ignore_index, void* grad) {
  using A = acc_t<T>;
  auto* gl = static_cast<const A*>(grad_loss);
  const A gd = gl_denom == nullptr ? A(1) : *static_cast<const A*>(gl_denom);
  auto* z = static_cast<const T*>(logits);
  auto* st = static_cast<const A*>(stats);
  auto* g = static_cast<T*>(grad);
  if (w.negent != 0) bwd_impl<T, true>(gl, gl_stride, gd, z, n, c, rs, target, st, w, scale, ignore_index, g);
  else bwd_impl<T, false>(gl, gl_stride, gd, z, n, c, rs, target, st, w, scale, ignore_index, g);
}

// Row reduction of the forward's per-row losses (see kernels.h).
template <typename A, typename O>
int64_t reduce_impl(const A* loss, const int64_t* target, int64_t n, int64_t c, int64_t ignore_index, int reduction,
                    bool check, O* out, A* denom_out) {
  int64_t bad = -1, count = 0;
  double total = 0;
  for (int64_t r = 0; r < n; ++r) {
    const int64_t y = target == nullptr ? 0 : target[r];
    const bool valid = target == nullptr || y != ignore_index;
    if (check && bad < 0 && valid && (y < 0 || y >= c)) bad = r;
    count += valid;
    if (reduction == 0) out[r] = static_cast<O>(loss[r]);
    else total += static_cast<double>(loss[r]);
  }
  // "mean" divides by the counted rows in the accumulation type, as the composite (sum / count) does
  const A denom = reduction == 1 ? static_cast<A>(count) : A(1);
  if (reduction != 0) out[0] = static_cast<O>(static_cast<A>(total) / denom);
  *denom_out = denom;
  return bad;
}

// ---------------------------------------------------------------------------------------------
// Inner optimiser step: one pass, SGD 2R+1W, momentum 3R+2W, Adam 4R+3W (+1W with zero_grad).
// ---------------------------------------------------------------------------------------------
template <typename T, int KIND>
void step_impl(T* param, T* grad, T* m1, T* m2, int64_t numel, double lr, double beta1, double beta2, double eps,
               double wd, int64_t step, bool zero_grad) {
  using io = IO<T>;
  using A = typename io::A;
  using V = typename io::V;
  constexpr int64_t W = io::W;
  const double bc1 = KIND == 2 ? 1 - std::pow(beta1, static_cast<double>(step)) : 1;
  const double bc2 = KIND == 2 ? 1 - std::pow(beta2, static_cast<double>(step)) : 1;
  const V vlr(static_cast<A>(KIND == 2 ? lr / bc1 : lr)), vwd(static_cast<A>(wd)), vb1(static_cast<A>(beta1)),
      vb2(static_cast<A>(beta2)), v1b1(static_cast<A>(1 - beta1)), v1b2(static_cast<A>(1 - beta2)),
      vsq(static_cast<A>(std::sqrt(bc2))), veps(static_cast<A>(eps)), zero(A(0));
  // One W-wide step on registers; m and v are untouched for kinds that do not use them.
  auto update = [&](V& p, V g, V& m, V& v) SF_INLINE {
    g = at::vec::fmadd(vwd, p, g);
    if constexpr (KIND == 0) {
      p = p - vlr * g;
    } else if constexpr (KIND == 1) {
      m = at::vec::fmadd(vb1, m, g);
      p = p - vlr * m;
    } else {
      m = at::vec::fmadd(vb1, m, v1b1 * g);
      v = at::vec::fmadd(vb2, v, v1b2 * g * g);
      p = p - vlr * m / (v.sqrt() / vsq + veps);
    }
  };
  at::parallel_for(0, (numel + W - 1) / W, 4096, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i = blk * W, cnt = std::min(W, numel - i);
      V p0, p1, g0, g1, m0(A(0)), m1v(A(0)), v0(A(0)), v1(A(0));
      auto ld = [&](const T* src, V& a, V& b) { cnt == W ? io::load(src + i, a, b) : io::load_part(src + i, cnt, a, b); };
      auto st = [&](T* dst, const V& a, const V& b) { cnt == W ? io::store(dst + i, a, b) : io::store_part(dst + i, cnt, a, b); };
      ld(param, p0, p1);
      ld(grad, g0, g1);
      if constexpr (KIND >= 1) ld(m1, m0, m1v);
      if constexpr (KIND == 2) ld(m2, v0, v1);
      update(p0, g0, m0, v0);
      update(p1, g1, m1v, v1);
      st(param, p0, p1);
      if constexpr (KIND >= 1) st(m1, m0, m1v);
      if constexpr (KIND == 2) st(m2, v0, v1);
      if (zero_grad) st(grad, zero, zero);
    }
  });
}

template <typename T>
void step_dispatch(void* param, void* grad, void* m1, void* m2, int64_t numel, int kind, double lr, double beta1,
                   double beta2, double eps, double wd, int64_t step, bool zero_grad) {
  auto* p = static_cast<T*>(param);
  auto* g = static_cast<T*>(grad);
  auto* a = static_cast<T*>(m1);
  auto* b = static_cast<T*>(m2);
  if (kind == 0) step_impl<T, 0>(p, g, a, b, numel, lr, beta1, beta2, eps, wd, step, zero_grad);
  else if (kind == 1) step_impl<T, 1>(p, g, a, b, numel, lr, beta1, beta2, eps, wd, step, zero_grad);
  else step_impl<T, 2>(p, g, a, b, numel, lr, beta1, beta2, eps, wd, step, zero_grad);
}

template <typename F>
void by_dtype(int dtype, const char* who, F&& f) {
  switch (dtype) {
    case 0: return f(float{});
    case 1: return f(Half{});
    case 2: return f(BFloat16{});
    case 3: return f(double{});
    default: TORCH_CHECK_VALUE(false, who, ": unsupported dtype code ", dtype);
  }
}

}  // namespace

void row_losses_fwd(const void* logits, int dtype, int64_t n, int64_t c, int64_t row_stride, const int64_t* target,
                    LossWeights w, double scale, int64_t ignore_index, void* loss, void* stats) {
  by_dtype(dtype, "row_losses", [&](auto tag) {
    fwd_dispatch<decltype(tag)>(logits, n, c, row_stride, target, w, scale, ignore_index, loss, stats);
  });
}

void row_losses_bwd(const void* grad_loss, int64_t gl_stride, const void* gl_denom, const void* logits, int dtype,
                    int64_t n, int64_t c, int64_t row_stride, const int64_t* target, const void* stats, LossWeights w,
                    double scale, int64_t ignore_index, void* grad) {
  by_dtype(dtype, "row_losses_backward", [&](auto tag) {
    bwd_dispatch<decltype(tag)>(grad_loss, gl_stride, gl_denom, logits, n, c, row_stride, target, stats, w, scale,
                                ignore_index, grad);
  });
}

int64_t reduce_rows(const void* loss, int dtype, const int64_t* target, int64_t n, int64_t c, int64_t ignore_index,
                    int reduction, bool check, void* out, void* denom) {
  int64_t bad = -1;
  by_dtype(dtype, "fused_loss", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    bad = reduce_impl<A, T>(static_cast<const A*>(loss), target, n, c, ignore_index, reduction, check,
                            static_cast<T*>(out), static_cast<A*>(denom));
  });
  return bad;
}

void inner_step(void* param, void* grad, void* exp_avg, void* exp_avg_sq, int dtype, int64_t numel, int kind,
                double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step, bool zero_grad) {
  TORCH_CHECK_VALUE(kind >= 0 && kind <= 2, "inner_step_: kind must be 0 (sgd), 1 (momentum) or 2 (adam), got ", kind);
  TORCH_CHECK_VALUE(kind != 2 || step >= 1, "inner_step_: Adam needs step >= 1, got ", step);
  by_dtype(dtype, "inner_step_", [&](auto tag) {
    step_dispatch<decltype(tag)>(param, grad, exp_avg, exp_avg_sq, numel, kind, lr, beta1, beta2, eps, weight_decay,
                                 step, zero_grad);
  });
}

}  // namespace cpu
}  // namespace sophon_fast
