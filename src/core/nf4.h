// The 4-bit expert weight format (NF4, QLoRA's): shared by the core's checks and both backends' kernels.
// A weight row of `in` elements is cut into runs of 64; each run keeps its absolute maximum m (f32) and, per element,
// the index of the level nearest to w / m among 16 fixed levels, the normal-float levels of Dettmers et al., QLoRA
// (2023). Dequantized, an element is level * m, rounded once to the compute dtype. A row is stored as
// [ceil(in / 2) index bytes | pad to 16][ceil(in / 64) f32 maxima | pad to 16]; element 2i sits in the high nibble of
// byte i, as bitsandbytes packs it. Padding is zero.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MOEFUSE_HD __host__ __device__ __forceinline__
#else
#define MOEFUSE_HD inline
#endif

namespace moefuse::detail {

constexpr int kNf4Run = 64;

MOEFUSE_HD constexpr std::int64_t round16(std::int64_t n) { return (n + 15) / 16 * 16; }
MOEFUSE_HD constexpr std::int64_t nf4_runs(std::int64_t in) { return (in + kNf4Run - 1) / kNf4Run; }
MOEFUSE_HD constexpr std::int64_t nf4_index_bytes(std::int64_t in) { return round16((in + 1) / 2); }
MOEFUSE_HD constexpr std::int64_t nf4_bytes_per_row(std::int64_t in) {
  return nf4_index_bytes(in) + round16(4 * nf4_runs(in));
}

// Level i of 16, ascending, -1 to 1 with 0 at i = 7 (a run of zeros stays exact).
MOEFUSE_HD constexpr float nf4_level(int i) {
  switch (i) {
    case 0: return -1.0f;
    case 1: return -0.6961928009986877f;
    case 2: return -0.5250730514526367f;
    case 3: return -0.39491748809814453f;
    case 4: return -0.28444138169288635f;
    case 5: return -0.18477343022823334f;
    case 6: return -0.09105003625154495f;
    case 7: return 0.0f;
    case 8: return 0.07958029955625534f;
    case 9: return 0.16093020141124725f;
    case 10: return 0.24611230194568634f;
    case 11: return 0.33791524171829224f;
    case 12: return 0.44070982933044434f;
    case 13: return 0.5626170039176941f;
    case 14: return 0.7229568362236023f;
    default: return 1.0f;
  }
}

// The index of the level nearest to v (a tie goes to the lower level; NaN to level 0). The same f32 operations on
// the host and the device, so both backends quantize to the same bits.
MOEFUSE_HD int nf4_index(float v) {
  int c = 0;
  for (int i = 0; i < 15; ++i) c += v > 0.5f * (nf4_level(i) + nf4_level(i + 1));
  return c;
}

// w / m for a run of maximum m: 0 in a run of zeros; NaN when m is (the run held a NaN).
MOEFUSE_HD float nf4_scaled(float w, float m) { return m > 0.f ? w / m : (m == m ? 0.f : m); }

// max(a, |w|) that keeps a NaN: a run with a NaN dequantizes to NaNs rather than hiding it.
MOEFUSE_HD float nf4_absmax(float a, float w) {
  const float b = w < 0.f ? -w : w;
  return a != a || b != b ? (a != a ? a : b) : (b > a ? b : a);
}

}  // namespace moefuse::detail
