// Strided copy with a cast: how adapters given in another layout or dtype reach the kernels (core/block.cpp).
#include <cstdint>

#include "core/backend.h"
#include "cpu/cpu.h"

namespace moefuse::cpu {

void copy_strided(const TensorView& src, const TensorView& dst, void*) {
  const std::int64_t n0 = src.shape[0], n1 = src.shape[1], n2 = src.shape[2];
#pragma omp parallel for
  for (std::int64_t i = 0; i < n0; ++i)
    for (std::int64_t j = 0; j < n1; ++j)
      for (std::int64_t k = 0; k < n2; ++k)
        store(dst, i * dst.stride[0] + j * dst.stride[1] + k * dst.stride[2],
              load(src, i * src.stride[0] + j * src.stride[1] + k * src.stride[2]));
}

}  // namespace moefuse::cpu
