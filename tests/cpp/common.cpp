#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <numeric>

namespace mt {

// ---- storage dtypes -----------------------------------------------------------------------------------------------
namespace {

// Round v to a binary format with `p` significand bits and minimum normal exponent `emin` (subnormals below).
double round_format(double v, int p, int emin) {
  if (v == 0 || !std::isfinite(v)) return v;
  int e;
  std::frexp(v, &e);  // |v| in [2^(e-1), 2^e)
  double ulp = std::ldexp(1.0, std::max(e - 1, emin) - (p - 1));
  return std::nearbyint(v / ulp) * ulp;  // default rounding mode: ties to even
}

}  // namespace

std::uint16_t bf16_bits(double v) {
  if (std::isnan(v)) return 0x7fc0;
  float f = static_cast<float>(round_format(v, 8, -126));  // exact in f32; overflow -> inf
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<std::uint16_t>(u >> 16);
}

double bf16_value(std::uint16_t bits) {
  std::uint32_t u = static_cast<std::uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

std::uint16_t f16_bits(double v) {
  std::uint16_t sign = std::signbit(v) ? 0x8000 : 0;
  if (std::isnan(v)) return 0x7e00;
  double a = std::fabs(round_format(v, 11, -14));
  if (a > 65504) return sign | 0x7c00;  // inf
  if (a == 0) return sign;
  int e;
  std::frexp(a, &e);
  if (e - 1 < -14) return sign | static_cast<std::uint16_t>(std::ldexp(a, 24));  // subnormal: multiple of 2^-24
  auto man = static_cast<std::uint16_t>(std::ldexp(a, 10 - (e - 1)) - 1024);
  return sign | static_cast<std::uint16_t>((e - 1 + 15) << 10) | man;
}

double f16_value(std::uint16_t bits) {
  double s = (bits & 0x8000) ? -1 : 1;
  int exp = (bits >> 10) & 0x1f, man = bits & 0x3ff;
  if (exp == 0x1f) return man ? NAN : s * INFINITY;
  if (exp == 0) return s * std::ldexp(man, -24);
  return s * std::ldexp(1024 + man, exp - 25);
}

double round_to(DType dtype, double v) {
  switch (dtype) {
    case DType::f32: return static_cast<float>(v);
    case DType::bf16: return bf16_value(bf16_bits(v));
    case DType::f16: return f16_value(f16_bits(v));
    default: ADD_FAILURE() << "round_to: not a float dtype"; return v;
  }
}

const char* name(DType dtype) { return moefuse::dtype_name(dtype); }

double tol(DType dtype) {
  switch (dtype) {
    case DType::bf16: return 1e-2;
    case DType::f16: return 2e-3;
    default: return 1e-5;
  }
}

// ---- host tensors -------------------------------------------------------------------------------------------------
Tensor::Tensor(DType dtype, std::vector<std::int64_t> shape, Device device)
    : dtype_(dtype), shape_(std::move(shape)), device_(device) {
  numel_ = 1;
  for (auto s : shape_) numel_ *= s;
  // Exactly the bytes needed (posix_memalign takes any size), so AddressSanitizer sees any overrun.
  std::size_t bytes = static_cast<std::size_t>(numel_) * moefuse::dtype_size(dtype);
  void* p = nullptr;
  if (posix_memalign(&p, 256, std::max<std::size_t>(bytes, 1)) != 0) throw std::bad_alloc();
  buf_.reset(static_cast<char*>(p), std::free);
  poison();
}

TensorView Tensor::view() const {
  void* p = buf_.get();
  const auto& s = shape_;
  switch (s.size()) {
    case 0: return moefuse::view(p, dtype_, device_, {});
    case 1: return moefuse::view(p, dtype_, device_, {s[0]});
    case 2: return moefuse::view(p, dtype_, device_, {s[0], s[1]});
    case 3: return moefuse::view(p, dtype_, device_, {s[0], s[1], s[2]});
    default: return moefuse::view(p, dtype_, device_, {s[0], s[1], s[2], s[3]});
  }
}

Vec values(const TensorView& t) {
  Vec v(t.numel());
  for (std::int64_t i = 0; i < t.numel(); ++i) {
    switch (t.dtype) {
      case DType::f32: v[i] = t.ptr<const float>()[i]; break;
      case DType::bf16: v[i] = bf16_value(t.ptr<const std::uint16_t>()[i]); break;
      case DType::f16: v[i] = f16_value(t.ptr<const std::uint16_t>()[i]); break;
      case DType::i32: v[i] = t.ptr<const std::int32_t>()[i]; break;
      case DType::u8: v[i] = t.ptr<const std::uint8_t>()[i]; break;
    }
  }
  return v;
}

Ints ints(const TensorView& t) {
  EXPECT_EQ(t.dtype, DType::i32);
  const auto* p = t.ptr<const std::int32_t>();
  return Ints(p, p + t.numel());
}

Vec Tensor::values() const { return mt::values(view()); }
Ints Tensor::ints() const { return mt::ints(view()); }

void Tensor::set(const Vec& v) {
  EXPECT_EQ(static_cast<std::int64_t>(v.size()), numel_);
  for (std::int64_t i = 0; i < numel_; ++i) {
    switch (dtype_) {
      case DType::f32: reinterpret_cast<float*>(data())[i] = static_cast<float>(v[i]); break;
      case DType::bf16: reinterpret_cast<std::uint16_t*>(data())[i] = bf16_bits(v[i]); break;
      case DType::f16: reinterpret_cast<std::uint16_t*>(data())[i] = f16_bits(v[i]); break;
      default: ADD_FAILURE() << "Tensor::set(Vec) on a non-float tensor"; return;
    }
  }
}

void Tensor::set(const Ints& v) {
  EXPECT_EQ(dtype_, DType::i32);
  EXPECT_EQ(static_cast<std::int64_t>(v.size()), numel_);
  std::copy(v.begin(), v.end(), reinterpret_cast<std::int32_t*>(data()));
}

void Tensor::poison() {
  std::memset(data(), 0xff, static_cast<std::size_t>(numel_) * moefuse::dtype_size(dtype_));
}

void Tensor::zero() { std::memset(data(), 0, static_cast<std::size_t>(numel_) * moefuse::dtype_size(dtype_)); }

Tensor make(DType dtype, std::vector<std::int64_t> shape, Vec& v) {
  Tensor t(dtype, std::move(shape));
  t.set(v);
  v = t.values();
  return t;
}

Tensor scratch(std::size_t bytes) { return Tensor(DType::u8, {static_cast<std::int64_t>(bytes)}); }

PlanTensors::PlanTensors(std::int64_t T_, int k_, int E_)
    : T(T_),
      k(k_),
      E(E_),
      counts(DType::i32, {E_}),
      offsets(DType::i32, {E_ + 1}),
      sorted_pairs(DType::i32, {T_ * k_}),
      pair_positions(DType::i32, {T_ * k_}),
      invalid(DType::i32, {1}) {}

moefuse::Plan PlanTensors::plan() const {
  moefuse::Plan p;
  p.tokens = T;
  p.top_k = k;
  p.experts = E;
  p.counts = counts.view();
  p.offsets = offsets.view();
  p.sorted_pairs = sorted_pairs.view();
  p.pair_positions = pair_positions.view();
  p.invalid = invalid.view();
  return p;
}

void PlanTensors::poison() {
  for (Tensor* t : {&counts, &offsets, &sorted_pairs, &pair_positions, &invalid}) t->poison();
}

PlanTensors plan_tensors(const ref::Plan& p) {
  PlanTensors pt(p.T, p.k, p.E);
  pt.counts.set(p.counts);
  pt.offsets.set(p.offsets);
  pt.sorted_pairs.set(p.sorted_pairs);
  pt.pair_positions.set(p.pair_positions);
  pt.invalid.set(Ints{0});
  return pt;
}

moefuse::MoeWeights weights_of(TensorView router, TensorView gate_up, TensorView down) {
  moefuse::MoeWeights w;
  w.router = router;
  w.gate_up = gate_up;
  w.down = down;
  return w;
}

moefuse::MoeGrads grads_of(TensorView x, TensorView router, TensorView gate_up, TensorView down) {
  moefuse::MoeGrads g;
  g.x = x;
  g.router = router;
  g.gate_up = gate_up;
  g.down = down;
  return g;
}

// ---- data ---------------------------------------------------------------------------------------------------------
Rng::Rng(const std::string& salt) {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string key = info ? std::string(info->test_suite_name()) + "." + info->name() : std::string();
  key += "/" + salt;
  std::uint64_t h = 1469598103934665603ull;  // FNV-1a: stable across runs and platforms
  for (unsigned char c : key) h = (h ^ c) * 1099511628211ull;
  gen_.seed(h);
}

double Rng::normal(double scale) { return std::normal_distribution<double>(0.0, scale)(gen_); }
double Rng::uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(gen_); }
int Rng::integer(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(gen_); }

Vec Rng::normals(std::size_t n, double scale) {
  Vec v(n);
  for (auto& x : v) x = normal(scale);
  return v;
}

Vec separated_logits(Rng& rng, std::int64_t T, int E) {
  double spacing = std::min(0.25, 6.0 / E);
  Vec v(static_cast<std::size_t>(T) * E);
  std::vector<int> perm(E);
  for (std::int64_t t = 0; t < T; ++t) {
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng.engine());
    for (int e = 0; e < E; ++e)
      v[t * E + e] = (perm[e] - 0.5 * (E - 1)) * spacing + rng.uniform(-0.1, 0.1) * spacing;
  }
  return v;
}

Ints random_ids(Rng& rng, std::int64_t T, int k, int E, bool placeholders) {
  Ints ids(static_cast<std::size_t>(T) * k);
  std::vector<int> perm(E);
  for (std::int64_t t = 0; t < T; ++t) {
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng.engine());
    for (int j = 0; j < k; ++j) {
      int id = perm[j];
      if (placeholders && rng.uniform(0, 1) < 0.2) id = rng.uniform(0, 1) < 0.5 ? E + rng.integer(0, 3) : 1 << 30;
      ids[t * k + j] = id;
    }
  }
  return ids;
}

// ---- checks -------------------------------------------------------------------------------------------------------
double rel_err(const Vec& out, const Vec& ref) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    num += (out[i] - ref[i]) * (out[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

::testing::AssertionResult close(const char* out_expr, const char* ref_expr, const char*, const Vec& out,
                                 const Vec& ref, double tol) {
  if (out.size() != ref.size())
    return ::testing::AssertionFailure() << out_expr << " has " << out.size() << " elements, " << ref_expr << " has "
                                         << ref.size();
  double err = rel_err(out, ref);
  if (err <= tol) return ::testing::AssertionSuccess();  // false for NaN
  std::size_t worst = 0, bad = 0;
  double worst_diff = -1;
  for (std::size_t i = 0; i < out.size(); ++i) {
    double d = std::isnan(out[i]) ? INFINITY : std::fabs(out[i] - ref[i]);
    if (d > worst_diff) worst_diff = d, worst = i;
    bad += !(std::fabs(out[i] - ref[i]) <= tol * (1 + std::fabs(ref[i])));
  }
  return ::testing::AssertionFailure() << out_expr << " vs " << ref_expr << ": relative error " << err << " > " << tol
                                       << "; " << bad << " of " << out.size() << " elements off, worst at [" << worst
                                       << "]: " << out[worst] << " vs " << ref[worst];
}

bool names(const std::string& msg, const std::string& arg) {
  auto ident = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; };
  for (std::size_t pos = msg.find(arg); pos != std::string::npos; pos = msg.find(arg, pos + 1)) {
    bool left = pos == 0 || !ident(msg[pos - 1]);
    bool right = pos + arg.size() == msg.size() || !ident(msg[pos + arg.size()]);
    if (left && right) return true;
  }
  return false;
}

::testing::AssertionResult throws_naming(const std::function<void()>& fn, std::initializer_list<const char*> args) {
  std::string wanted;
  for (const char* a : args) wanted += (wanted.empty() ? "" : " or ") + std::string(a);
  try {
    fn();
  } catch (const moefuse::Error& e) {
    for (const char* a : args)
      if (names(e.what(), a)) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "moefuse::Error \"" << e.what() << "\" does not name " << wanted;
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw a non-moefuse exception: " << e.what();
  }
  return ::testing::AssertionFailure() << "no moefuse::Error thrown (expected one naming " << wanted << ")";
}

}  // namespace mt
