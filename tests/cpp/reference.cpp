#include "reference.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace ref {

namespace {

Vec softmax_row(const double* l, int E) {
  double mx = *std::max_element(l, l + E);
  Vec p(E);
  double sum = 0;
  for (int e = 0; e < E; ++e) sum += p[e] = std::exp(l[e] - mx);
  for (auto& v : p) v /= sum;
  return p;
}

// y[n_out] = W[n_out, n_in] . x[n_in]
Vec matvec(const double* W, const double* x, std::int64_t n_out, std::int64_t n_in) {
  Vec y(n_out, 0.0);
  for (std::int64_t o = 0; o < n_out; ++o)
    for (std::int64_t i = 0; i < n_in; ++i) y[o] += W[o * n_in + i] * x[i];
  return y;
}

// x[n_in] += W^T . y
void matvec_t_add(const double* W, const double* y, std::int64_t n_out, std::int64_t n_in, double* x) {
  for (std::int64_t o = 0; o < n_out; ++o)
    for (std::int64_t i = 0; i < n_in; ++i) x[i] += W[o * n_in + i] * y[o];
}

// G[n_out, n_in] += s * y x^T
void outer_add(double* G, const double* y, const double* x, std::int64_t n_out, std::int64_t n_in, double s) {
  for (std::int64_t o = 0; o < n_out; ++o)
    for (std::int64_t i = 0; i < n_in; ++i) G[o * n_in + i] += s * y[o] * x[i];
}

double sigmoid(double g) { return 1 / (1 + std::exp(-g)); }

}  // namespace

Routing router_forward(const Vec& logits, std::int64_t T, int E, int k, bool renormalize) {
  Routing r{Ints(T * k), Vec(T * k)};
  for (std::int64_t t = 0; t < T; ++t) {
    Vec p = softmax_row(&logits[t * E], E);
    Ints order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });  // ties: lower id
    double sum = 0;
    for (int j = 0; j < k; ++j) sum += p[order[j]];
    for (int j = 0; j < k; ++j) {
      r.ids[t * k + j] = order[j];
      r.weights[t * k + j] = renormalize ? p[order[j]] / sum : p[order[j]];
    }
  }
  return r;
}

Vec router_backward(const Vec& logits, const Ints& ids, std::int64_t T, int E, int k, bool renormalize,
                    const Vec& grad_w) {
  Vec g(T * E, 0.0);
  for (std::int64_t t = 0; t < T; ++t) {
    Vec p = softmax_row(&logits[t * E], E);
    const int* id = &ids[t * k];
    const double* gw = &grad_w[t * k];
    double* gl = &g[t * E];
    if (renormalize) {
      // w = softmax restricted to the chosen ids: dl[id_j] = w_j (gw_j - sum_i w_i gw_i), zero elsewhere.
      double z = 0, dot = 0;
      for (int j = 0; j < k; ++j) z += p[id[j]];
      for (int j = 0; j < k; ++j) dot += p[id[j]] / z * gw[j];
      for (int j = 0; j < k; ++j) gl[id[j]] += p[id[j]] / z * (gw[j] - dot);
    } else {
      // w_j = p[id_j]: dl[m] = sum_j gw_j p[id_j] (delta(m, id_j) - p[m]).
      double dot = 0;
      for (int j = 0; j < k; ++j) dot += gw[j] * p[id[j]];
      for (int m = 0; m < E; ++m) gl[m] = -dot * p[m];
      for (int j = 0; j < k; ++j) gl[id[j]] += gw[j] * p[id[j]];
    }
  }
  return g;
}

Plan routing_plan(const Ints& ids, std::int64_t T, int k, int E) {
  Plan plan{T, k, E, Ints(E, 0), Ints(E + 1, 0), Ints(T * k), Ints(T * k)};
  auto key = [&](int p) { return std::min(ids[p], E); };  // every placeholder shares the key E
  std::iota(plan.sorted_pairs.begin(), plan.sorted_pairs.end(), 0);
  std::stable_sort(plan.sorted_pairs.begin(), plan.sorted_pairs.end(), [&](int a, int b) { return key(a) < key(b); });
  for (std::int64_t s = 0; s < T * k; ++s) plan.pair_positions[plan.sorted_pairs[s]] = static_cast<int>(s);
  for (int id : ids)
    if (id < E) ++plan.counts[id];
  for (int e = 0; e < E; ++e) plan.offsets[e + 1] = plan.offsets[e] + plan.counts[e];
  return plan;
}

// Visits each real sorted row s of expert e, with its pair p, token t and source row of x.
template <class F>
static void for_each_row(const Plan& plan, bool gather, F f) {
  for (int e = 0; e < plan.E; ++e)
    for (int s = plan.offsets[e]; s < plan.offsets[e + 1]; ++s) {
      int p = plan.sorted_pairs[s];
      f(e, s, p, p / plan.k, gather ? p / plan.k : s);
    }
}

Vec linear_forward(const Plan& plan, const Vec& x, const Vec& W, std::int64_t n_out, std::int64_t n_in, bool gather,
                   const Vec* combine) {
  Vec out((combine ? plan.T : plan.T * plan.k) * n_out, 0.0);
  for_each_row(plan, gather, [&](int e, int s, int p, std::int64_t t, std::int64_t src) {
    Vec row = matvec(&W[e * n_out * n_in], &x[src * n_in], n_out, n_in);
    for (std::int64_t o = 0; o < n_out; ++o) {
      if (combine)
        out[t * n_out + o] += (*combine)[p] * row[o];
      else
        out[s * n_out + o] = row[o];
    }
  });
  return out;
}

LinearGrads linear_backward(const Plan& plan, const Vec& x, const Vec& W, std::int64_t n_out, std::int64_t n_in,
                            bool gather, const Vec* combine, const Vec& grad_out) {
  LinearGrads g{Vec(x.size(), 0.0), Vec(W.size(), 0.0), Vec(combine ? combine->size() : 0, 0.0)};
  for_each_row(plan, gather, [&](int e, int s, int p, std::int64_t t, std::int64_t src) {
    const double* We = &W[e * n_out * n_in];
    const double* xs = &x[src * n_in];
    Vec grow(n_out);  // gradient reaching this (un-combined) row
    for (std::int64_t o = 0; o < n_out; ++o)
      grow[o] = combine ? (*combine)[p] * grad_out[t * n_out + o] : grad_out[s * n_out + o];
    matvec_t_add(We, grow.data(), n_out, n_in, &g.x[src * n_in]);
    outer_add(&g.weight[e * n_out * n_in], grow.data(), xs, n_out, n_in, 1.0);
    if (combine) {
      Vec row = matvec(We, xs, n_out, n_in);
      for (std::int64_t o = 0; o < n_out; ++o) g.combine[p] += grad_out[t * n_out + o] * row[o];
    }
  });
  return g;
}

Vec swiglu_forward(const Vec& h, std::int64_t R, std::int64_t I) {
  Vec a(R * I);
  for (std::int64_t r = 0; r < R; ++r)
    for (std::int64_t i = 0; i < I; ++i) {
      double g = h[r * 2 * I + i], u = h[r * 2 * I + I + i];
      a[r * I + i] = g * sigmoid(g) * u;
    }
  return a;
}

Vec swiglu_backward(const Vec& h, const Vec& grad_a, std::int64_t R, std::int64_t I) {
  Vec gh(R * 2 * I);
  for (std::int64_t r = 0; r < R; ++r)
    for (std::int64_t i = 0; i < I; ++i) {
      double g = h[r * 2 * I + i], u = h[r * 2 * I + I + i], s = sigmoid(g), ga = grad_a[r * I + i];
      gh[r * 2 * I + i] = ga * u * s * (1 + g * (1 - s));  // d silu(g) / dg = s + g s (1 - s)
      gh[r * 2 * I + I + i] = ga * g * s;
    }
  return gh;
}

// One expert applied to one token: h = gate_up[e] . x, a = swiglu(h), y = down[e] . a.
struct ExpertPass {
  Vec h, a, y;
};
static ExpertPass expert_pass(const Block& b, const BlockParams& p, int e, std::int64_t t) {
  ExpertPass r;
  r.h = matvec(&p.gate_up[e * 2 * b.I * b.H], &p.x[t * b.H], 2 * b.I, b.H);
  r.a = swiglu_forward(r.h, 1, b.I);
  r.y = matvec(&p.down[e * b.H * b.I], r.a.data(), b.H, b.I);
  return r;
}

static Vec router_logits(const Block& b, const BlockParams& p) {
  Vec logits(b.T * b.E);
  for (std::int64_t t = 0; t < b.T; ++t) {
    Vec l = matvec(p.router.data(), &p.x[t * b.H], b.E, b.H);
    std::copy(l.begin(), l.end(), &logits[t * b.E]);
  }
  return logits;
}

BlockForward block_forward(const Block& b, const BlockParams& p, const Vec* route_logits) {
  BlockForward f;
  f.logits = router_logits(b, p);
  f.routing = router_forward(route_logits ? *route_logits : f.logits, b.T, b.E, b.k, b.renormalize);
  f.out.assign(b.T * b.H, 0.0);
  for (std::int64_t t = 0; t < b.T; ++t)
    for (int j = 0; j < b.k; ++j) {
      ExpertPass ep = expert_pass(b, p, f.routing.ids[t * b.k + j], t);
      for (std::int64_t c = 0; c < b.H; ++c) f.out[t * b.H + c] += f.routing.weights[t * b.k + j] * ep.y[c];
    }
  return f;
}

BlockParams block_backward(const Block& b, const BlockParams& p, const Vec& logits, const Vec& grad_out,
                           const Vec* grad_logits) {
  BlockParams g{Vec(p.x.size(), 0.0), Vec(p.router.size(), 0.0), Vec(p.gate_up.size(), 0.0),
                Vec(p.down.size(), 0.0)};
  Routing r = router_forward(logits, b.T, b.E, b.k, b.renormalize);
  Vec grad_w(b.T * b.k, 0.0);
  for (std::int64_t t = 0; t < b.T; ++t)
    for (int j = 0; j < b.k; ++j) {
      int e = r.ids[t * b.k + j];
      double w = r.weights[t * b.k + j];
      const double* go = &grad_out[t * b.H];
      ExpertPass ep = expert_pass(b, p, e, t);
      for (std::int64_t c = 0; c < b.H; ++c) grad_w[t * b.k + j] += go[c] * ep.y[c];
      outer_add(&g.down[e * b.H * b.I], go, ep.a.data(), b.H, b.I, w);
      Vec grad_a(b.I, 0.0);
      matvec_t_add(&p.down[e * b.H * b.I], go, b.H, b.I, grad_a.data());
      for (auto& v : grad_a) v *= w;
      Vec grad_h = swiglu_backward(ep.h, grad_a, 1, b.I);
      matvec_t_add(&p.gate_up[e * 2 * b.I * b.H], grad_h.data(), 2 * b.I, b.H, &g.x[t * b.H]);
      outer_add(&g.gate_up[e * 2 * b.I * b.H], grad_h.data(), &p.x[t * b.H], 2 * b.I, b.H, 1.0);
    }
  Vec gl = router_backward(logits, r.ids, b.T, b.E, b.k, b.renormalize, grad_w);
  if (grad_logits)
    for (std::size_t i = 0; i < gl.size(); ++i) gl[i] += (*grad_logits)[i];
  // logits = x . router^T
  for (std::int64_t t = 0; t < b.T; ++t) {
    matvec_t_add(p.router.data(), &gl[t * b.E], b.E, b.H, &g.x[t * b.H]);
    outer_add(g.router.data(), &gl[t * b.E], &p.x[t * b.H], b.E, b.H, 1.0);
  }
  return g;
}

}  // namespace ref
