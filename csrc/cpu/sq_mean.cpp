// CPU kernel of the per-row mean of squares (spec: sophon_fast/reference/sq_mean.py):
//   out[r] = mean_j (x[r, j] - y[r, j])^2   (y null: mean_j x[r, j]^2)
// One read of x (and y), one write per row; rows in parallel, four independent accumulators per row in
// fp64 (the input is converted on load), so the sum carries no fp32 round-off whatever D is.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>

namespace sophon_fast {
namespace cpu {
namespace {

template <typename T, typename A>
void sq_mean_impl(const T* x, const T* y, int64_t n, int64_t d, A* out) {
  at::parallel_for(0, n, std::max<int64_t>(1, 65536 / d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * d;
      const T* yr = y ? y + r * d : nullptr;
      double acc[4] = {0, 0, 0, 0};
      int64_t j = 0;
      for (; j + 4 <= d; j += 4) {
        for (int k = 0; k < 4; ++k) {
          const double v = static_cast<double>(xr[j + k]) - (yr ? static_cast<double>(yr[j + k]) : 0.0);
          acc[k] += v * v;
        }
      }
      for (; j < d; ++j) {
        const double v = static_cast<double>(xr[j]) - (yr ? static_cast<double>(yr[j]) : 0.0);
        acc[0] += v * v;
      }
      out[r] = static_cast<A>((acc[0] + acc[1] + acc[2] + acc[3]) / static_cast<double>(d));
    }
  });
}

}  // namespace

void row_sq_mean(const void* x, const void* y, int dtype, int64_t n, int64_t d, void* out) {
  switch (dtype) {
    case 0: return sq_mean_impl(static_cast<const float*>(x), static_cast<const float*>(y), n, d,
                                static_cast<float*>(out));
    case 1: return sq_mean_impl(static_cast<const c10::Half*>(x), static_cast<const c10::Half*>(y), n, d,
                                static_cast<float*>(out));
    case 2: return sq_mean_impl(static_cast<const c10::BFloat16*>(x), static_cast<const c10::BFloat16*>(y), n, d,
                                static_cast<float*>(out));
    case 3: return sq_mean_impl(static_cast<const double*>(x), static_cast<const double*>(y), n, d,
                                static_cast<double*>(out));
    default: TORCH_CHECK_VALUE(false, "row_sq_mean: unsupported dtype code ", dtype);
  }
}

}  // namespace cpu
}  // namespace sophon_fast
