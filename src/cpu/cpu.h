// Helpers shared by the CPU backend: f32 views of the storage dtypes, and a row-major sgemm.
#pragma once

#include <cblas.h>

#include <algorithm>
#include <cstdint>

#include "core/half.h"
#include "moefuse/tensor.h"

namespace moefuse::cpu {

// Element i of f32 | bf16 | f16 storage, as f32.
inline float load(const void* data, DType dtype, std::int64_t i) {
  switch (dtype) {
    case DType::bf16: return detail::bf16_to_f32(static_cast<const std::uint16_t*>(data)[i]);
    case DType::f16: return detail::f16_to_f32(static_cast<const std::uint16_t*>(data)[i]);
    default: return static_cast<const float*>(data)[i];
  }
}

// Stores v into element i, rounded once to the storage dtype.
inline void store(void* data, DType dtype, std::int64_t i, float v) {
  switch (dtype) {
    case DType::bf16: static_cast<std::uint16_t*>(data)[i] = detail::f32_to_bf16(v); break;
    case DType::f16: static_cast<std::uint16_t*>(data)[i] = detail::f32_to_f16(v); break;
    default: static_cast<float*>(data)[i] = v;
  }
}

inline float load(const TensorView& t, std::int64_t i) { return load(t.data, t.dtype, i); }
inline void store(const TensorView& t, std::int64_t i, float v) { store(t.data, t.dtype, i, v); }

// C[m, n] = op(A) . op(B) + beta * C on contiguous row-major f32 blocks, beta 0 or 1. op(A) is [m, kk] (A is stored
// [kk, m] when ta); op(B) is [kk, n] (B is stored [n, kk] when tb). Empty products never reach BLAS, which rejects
// leading dimensions of 0.
inline void gemm(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t kk, const float* a, const float* b,
                 float beta, float* c) {
  if (m == 0 || n == 0) return;
  if (kk == 0) {
    if (beta == 0.0f) std::fill(c, c + m * n, 0.0f);
    return;
  }
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, static_cast<int>(m),
              static_cast<int>(n), static_cast<int>(kk), 1.0f, a, static_cast<int>(ta ? m : kk), b,
              static_cast<int>(tb ? kk : n), beta, c, static_cast<int>(n));
}

}  // namespace moefuse::cpu
