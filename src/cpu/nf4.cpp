// 4-bit weights on the CPU (format: core/nf4.h).
#include <cstring>

#include "core/backend.h"
#include "core/nf4.h"
#include "cpu/cpu.h"

namespace moefuse::cpu {

using namespace detail;

void nf4_quantize(const TensorView& weight, const TensorView& packed, void*) {
  const std::int64_t rows = weight.shape[0] * weight.shape[1], in = weight.shape[2];
  const std::int64_t row_bytes = nf4_bytes_per_row(in), index_bytes = nf4_index_bytes(in);
#pragma omp parallel for
  for (std::int64_t r = 0; r < rows; ++r) {
    std::uint8_t* p = packed.ptr<std::uint8_t>() + r * row_bytes;
    std::memset(p, 0, static_cast<std::size_t>(row_bytes));
    float* maxima = reinterpret_cast<float*>(p + index_bytes);
    for (std::int64_t run = 0; run < nf4_runs(in); ++run) {
      const std::int64_t i0 = run * kNf4Run, i1 = std::min<std::int64_t>(i0 + kNf4Run, in);
      float m = 0.f;
      for (std::int64_t i = i0; i < i1; ++i) m = nf4_absmax(m, load(weight, r * in + i));
      maxima[run] = m;
      for (std::int64_t i = i0; i < i1; ++i) {
        const int c = nf4_index(nf4_scaled(load(weight, r * in + i), m));
        p[i / 2] |= static_cast<std::uint8_t>(i % 2 ? c : c << 4);
      }
    }
  }
}

void nf4_dequantize(const TensorView& packed, const TensorView& counts, const TensorView& weight, void*) {
  const std::int64_t experts = weight.shape[0], out = weight.shape[1], in = weight.shape[2];
  const std::int64_t row_bytes = nf4_bytes_per_row(in), index_bytes = nf4_index_bytes(in);
  float level[16];
  for (int c = 0; c < 16; ++c) level[c] = nf4_level(c);
#pragma omp parallel for
  for (std::int64_t r = 0; r < experts * out; ++r) {
    if (counts.defined() && counts.ptr<int>()[r / out] == 0) continue;
    const std::uint8_t* p = packed.ptr<std::uint8_t>() + r * row_bytes;
    const float* maxima = reinterpret_cast<const float*>(p + index_bytes);
    for (std::int64_t i = 0; i < in; ++i) {
      const int c = i % 2 ? p[i / 2] & 15 : p[i / 2] >> 4;
      store(weight, r * in + i, level[c] * maxima[i / kNf4Run]);
    }
  }
}

}  // namespace moefuse::cpu
