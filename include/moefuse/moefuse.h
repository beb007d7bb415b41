// moefuse: fused Mixture-of-Experts layers for fine-tuning. Include this one header.
#pragma once

#include "moefuse/block.h"
#include "moefuse/error.h"
#include "moefuse/ops.h"
#include "moefuse/tensor.h"
#include "moefuse/tune.h"

namespace moefuse {

// True when this build has the CUDA backend.
bool has_cuda();

}  // namespace moefuse
