// BACKEND(op, device, fn, args...) calls cpu::fn or cuda::fn with the same (already validated) arguments.
#pragma once

#include "core/backend.h"
#include "core/check.h"

#ifdef MOEFUSE_WITH_CUDA
#define BACKEND(op, device, fn, ...)                                                                      \
  (static_cast<void>(op), (device).type == ::moefuse::DeviceType::cpu ? ::moefuse::cpu::fn(__VA_ARGS__)    \
                                                                       : ::moefuse::cuda::fn(__VA_ARGS__))
#else
#define BACKEND(op, device, fn, ...)                                                                      \
  ((device).type == ::moefuse::DeviceType::cpu                                                            \
       ? ::moefuse::cpu::fn(__VA_ARGS__)                                                                  \
       : (::moefuse::detail::fail(op, "tensors are on ", ::moefuse::device_name(device),                  \
                                  " but this moefuse was built without the CUDA backend"),                \
          ::moefuse::cpu::fn(__VA_ARGS__)))
#endif
