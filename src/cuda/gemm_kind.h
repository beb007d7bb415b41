// The three grouped GEMMs of moe_linear (grouped_gemm.cuh describes them), shared by the portable and Hopper paths.
#pragma once

namespace moefuse::cuda {

enum class GemmKind { fwd, dgrad, wgrad };

}  // namespace moefuse::cuda
