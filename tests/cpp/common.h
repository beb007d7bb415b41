// Shared test helpers: host tensors in any storage dtype, seeded data, poisoning, error-message matching.
// Tests see only the public API (moefuse/moefuse.h); 16-bit conversions are our own.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "moefuse/moefuse.h"
#include "reference.h"

namespace mt {

using moefuse::Device;
using moefuse::DType;
using moefuse::TensorView;
using Vec = std::vector<double>;
using Ints = std::vector<int>;

// ---- storage dtypes -----------------------------------------------------------------------------------------------
double round_to(DType dtype, double v);  // nearest value the float dtype can hold (ties to even)
std::uint16_t bf16_bits(double v);       // v rounded to bf16, as bits
double bf16_value(std::uint16_t bits);
std::uint16_t f16_bits(double v);
double f16_value(std::uint16_t bits);
const char* name(DType dtype);

// Tolerance on ||out - ref|| / ||ref|| for results stored in `dtype` (inputs already rounded to it).
double tol(DType dtype);

// ---- host tensors -------------------------------------------------------------------------------------------------
// Owns a 256-byte-aligned buffer; float elements read and write as double (rounded on write), i32 as int.
class Tensor {
 public:
  Tensor() = default;
  Tensor(DType dtype, std::vector<std::int64_t> shape, Device device = Device::cpu());

  TensorView view() const;  // contiguous view through moefuse::view
  std::int64_t numel() const { return numel_; }
  DType dtype() const { return dtype_; }
  void* data() const { return buf_.get(); }

  Vec values() const;
  void set(const Vec& v);  // rounds to the dtype
  Ints ints() const;
  void set(const Ints& v);
  void poison();  // 0xFF bytes: NaN in every float dtype, -1 in i32
  void zero();

 private:
  DType dtype_ = DType::f32;
  std::vector<std::int64_t> shape_;
  Device device_;
  std::int64_t numel_ = 0;
  std::shared_ptr<char> buf_;
};

// Reads any view's elements (floats as double); used for the views inside MoeSaved too.
Vec values(const TensorView& t);
Ints ints(const TensorView& t);

// A float tensor holding `v` rounded to `dtype`; `v` is replaced by the rounded values the reference must use.
Tensor make(DType dtype, std::vector<std::int64_t> shape, Vec& v);
// A u8 workspace/saved buffer of `bytes`, poisoned so an op cannot rely on its contents.
Tensor scratch(std::size_t bytes);

// Plan buffers for T tokens, k choices, E experts; plan() points at them.
struct PlanTensors {
  PlanTensors(std::int64_t T, int k, int E);
  moefuse::Plan plan() const;
  void poison();
  std::int64_t T;
  int k, E;
  Tensor counts, offsets, sorted_pairs, pair_positions, invalid;
};
// Plan buffers holding the reference plan (invalid = 0), so ops can be tested independently of routing_plan.
PlanTensors plan_tensors(const ref::Plan& p);

// Block weights / gradients without LoRA.
moefuse::MoeWeights weights_of(TensorView router, TensorView gate_up, TensorView down);
moefuse::MoeGrads grads_of(TensorView x, TensorView router, TensorView gate_up, TensorView down);

// ---- data ---------------------------------------------------------------------------------------------------------
// Seeded from the running test's full name plus `salt`, so every case gets different (but repeatable) data.
class Rng {
 public:
  explicit Rng(const std::string& salt = "");
  double normal(double scale = 1.0);
  double uniform(double lo, double hi);
  int integer(int lo, int hi);  // inclusive
  Vec normals(std::size_t n, double scale = 1.0);
  std::mt19937_64& engine() { return gen_; }

 private:
  std::mt19937_64 gen_;
};

// Router logits without near-ties: each token's E values are a random permutation of an evenly spaced grid
// (spacing > 2 bf16 ulps) plus small jitter, so f32 and double agree on every top-k choice.
Vec separated_logits(Rng& rng, std::int64_t T, int E);
// Distinct expert ids per token (like a router's output); with `placeholders`, about a fifth are ids >= E.
Ints random_ids(Rng& rng, std::int64_t T, int k, int E, bool placeholders);

// ---- checks -------------------------------------------------------------------------------------------------------
double rel_err(const Vec& out, const Vec& ref);  // ||out-ref|| / ||ref|| (||ref|| == 0: absolute); NaN-propagating
::testing::AssertionResult close(const char* out_expr, const char* ref_expr, const char* tol_expr, const Vec& out,
                                 const Vec& ref, double tol);
#define EXPECT_CLOSE(out, ref, tol) EXPECT_PRED_FORMAT3(::mt::close, out, ref, tol)

// True when `msg` mentions `arg` as a whole identifier (so "x" matches "x must be" but not "grad_x" or "expected").
bool names(const std::string& msg, const std::string& arg);
// Runs `fn`; succeeds when it throws moefuse::Error whose message names one of `args`.
::testing::AssertionResult throws_naming(const std::function<void()>& fn, std::initializer_list<const char*> args);
#define EXPECT_ERROR_NAMING(stmt, ...) EXPECT_TRUE(::mt::throws_naming([&] { stmt; }, {__VA_ARGS__}))

// Parameterized cases: each case type has name_of(case) (found by ADL), used for test names and printed params.
struct CaseName {
  template <class P>
  std::string operator()(const ::testing::TestParamInfo<P>& info) const {
    return name_of(info.param);
  }
};
#define MT_PRINTABLE_CASE(Case) \
  inline void PrintTo(const Case& c, std::ostream* os) { *os << name_of(c); }

constexpr DType kFloatTypes[] = {DType::f32, DType::bf16, DType::f16};

}  // namespace mt
