// The one exception type moefuse throws. Messages name the argument, what was expected and what came.
#pragma once

#include <stdexcept>
#include <string>

namespace moefuse {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

}  // namespace moefuse
