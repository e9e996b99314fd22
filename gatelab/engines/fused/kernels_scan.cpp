// gatelab scan kernels: the elementwise recurrences of minGRU / minLSTM (a linear scan) and IndRNN,
// forward and backward, on the CPU. Compiled into the same library as kernels.cpp (cpp.py builds both)
// but independent of it: its own op namespace, gatelab_scan, and nothing shared.
//
// The Python callers (gatelab/engines/scan.py) do the input GEMM of all steps; these loops carry the
// state through time. minGRU / minLSTM run min_rnn_forward / min_rnn_backward (the activations and the
// recurrence in one pass); for other activations scan.py applies them over all steps (gates read x_t
// only) and runs linear_scan. The step-by-step reference loop is the twin of each; tests tie them.
//
// sLSTM (slstm_forward, slstm_backward) carries four states through a block-diagonal recurrent
// product, step by step; its Python caller does the input GEMM before and the GEMM of ∂L/∂R after.
//
// Layouts: time-major, contiguous; a and b (T, N) with N = B·H for the linear scan, (T, B, H) for IndRNN
// and for sLSTM's states, (T, B, 4H) for sLSTM's pre-activations (gate blocks i, f, z, o), (T, B, G·H)
// for minGRU's (G = 2: z, h) and minLSTM's (G = 3: f, i, h) projections.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vmath.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using at::Tensor;

// IndRNN's activations in C++. Keep in sync with INDRNN_KINDS in gatelab/engines/scan.py.
enum ScanAct : int64_t { S_IDENTITY = 0, S_RELU, S_TANH, S_SIGMOID, S_LEAKY_RELU, S_HARDTANH };

template <typename T>
inline T act_forward(int64_t kind, T x, T param) {
  switch (kind) {
    case S_RELU: return x > T(0) ? x : T(0);
    case S_TANH: return std::tanh(x);
    case S_SIGMOID: return T(1) / (T(1) + std::exp(-x));
    case S_LEAKY_RELU: return x > T(0) ? x : param * x;
    case S_HARDTANH: return std::min(std::max(x, T(-1)), T(1));
    default: return x;
  }
}

int64_t grain(int64_t n) { return std::max<int64_t>(256, n / (4 * std::max<int64_t>(1, at::get_num_threads()))); }

void check(const Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), "gatelab_scan: ", name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == dtype, "gatelab_scan: ", name, " is ", t.scalar_type(), ", expected ", dtype);
}

// h_t = a_t ⊙ h_{t-1} + b_t for t = 0 .. T-1 (T-1 .. 0 when reverse), from h0; returns every h_t.
Tensor linear_scan(const Tensor& a_, const Tensor& b_, const Tensor& h0_, bool reverse) {
  TORCH_CHECK(a_.sizes() == b_.sizes() && a_.dim() >= 1, "gatelab_scan.linear_scan: a and b must have one shape");
  const auto dtype = a_.scalar_type();
  check(a_, "a", dtype); check(b_, "b", dtype); check(h0_, "h0", dtype);
  const Tensor a = a_.contiguous(), b = b_.contiguous(), h0 = h0_.contiguous();
  const int64_t T = a.size(0), N = T ? a.numel() / T : 0;
  TORCH_CHECK(h0.numel() == N, "gatelab_scan.linear_scan: h0 has ", h0.numel(), " values, a step has ", N);
  Tensor H = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES(dtype, "linear_scan", [&] {
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* pb = b.data_ptr<scalar_t>();
    const scalar_t* ph0 = h0.data_ptr<scalar_t>();
    scalar_t* pH = H.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain(N), [&](int64_t j0, int64_t j1) {
      const scalar_t* prev = ph0;
      for (int64_t s = 0; s < T; ++s) {
        const int64_t t = reverse ? T - 1 - s : s;
        const scalar_t* at_ = pa + t * N;
        const scalar_t* bt = pb + t * N;
        scalar_t* ht = pH + t * N;
        for (int64_t j = j0; j < j1; ++j) ht[j] = at_[j] * prev[j] + bt[j];
        prev = ht;
      }
    });
  });
  return H;
}

// The backward of linear_scan: from gH = dL/dh_t (every step, as an output), the total gradient
// g_t = gH_t + a_{next} ⊙ g_{next} (next: the step after t in the scan's order) gives
// ga_t = g_t ⊙ h_{t-1}, gb_t = g_t and gh0 = a_first ⊙ g_first. Returns (ga, gb, gh0).
std::vector<Tensor> linear_scan_backward(const Tensor& a_, const Tensor& H_, const Tensor& h0_, const Tensor& gH_,
                                         bool reverse) {
  const auto dtype = a_.scalar_type();
  check(a_, "a", dtype); check(H_, "H", dtype); check(h0_, "h0", dtype); check(gH_, "gH", dtype);
  TORCH_CHECK(a_.sizes() == H_.sizes() && a_.sizes() == gH_.sizes(), "gatelab_scan.linear_scan_backward: shapes differ");
  const Tensor a = a_.contiguous(), H = H_.contiguous(), h0 = h0_.contiguous(), gH = gH_.contiguous();
  const int64_t T = a.size(0), N = T ? a.numel() / T : 0;
  Tensor ga = at::empty_like(a), gb = at::empty_like(a), gh0 = at::empty_like(h0);
  AT_DISPATCH_FLOATING_TYPES(dtype, "linear_scan_backward", [&] {
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* pH = H.data_ptr<scalar_t>();
    const scalar_t* ph0 = h0.data_ptr<scalar_t>();
    const scalar_t* pg = gH.data_ptr<scalar_t>();
    scalar_t* pga = ga.data_ptr<scalar_t>();
    scalar_t* pgb = gb.data_ptr<scalar_t>();
    scalar_t* pgh0 = gh0.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain(N), [&](int64_t j0, int64_t j1) {
      std::vector<scalar_t> carry(j1 - j0, scalar_t(0));  // a_next ⊙ g_next
      for (int64_t s = T - 1; s >= 0; --s) {
        const int64_t t = reverse ? T - 1 - s : s;
        const scalar_t* prev = s == 0 ? ph0 : pH + (reverse ? t + 1 : t - 1) * N;
        const scalar_t* at_ = pa + t * N;
        const scalar_t* gt = pg + t * N;
        scalar_t* gat = pga + t * N;
        scalar_t* gbt = pgb + t * N;
        for (int64_t j = j0; j < j1; ++j) {
          const scalar_t g = gt[j] + carry[j - j0];
          gbt[j] = g;
          gat[j] = g * prev[j];
          carry[j - j0] = at_[j] * g;
        }
      }
      for (int64_t j = j0; j < j1; ++j) pgh0[j] = carry[j - j0];
    });
  });
  return {ga, gb, gh0};
}

// IndRNN: h_t = φ(xw_t + u ⊙ h_{t-1}) where sequence b is live (t < lengths[b]), else h_t = h_{t-1}.
// xw (T, B, H), u (H), h0 (B, H); returns every h_t (T, B, H) (held, not zeroed, on dead steps).
Tensor indrnn_forward(const Tensor& xw_, const Tensor& u_, const Tensor& h0_, const c10::optional<Tensor>& lengths_,
                      int64_t kind, double param, bool reverse) {
  TORCH_CHECK(xw_.dim() == 3, "gatelab_scan.indrnn_forward: xw must be (T, B, H)");
  TORCH_CHECK(kind >= S_IDENTITY && kind <= S_HARDTANH, "gatelab_scan.indrnn_forward: unknown activation kind ", kind);
  const auto dtype = xw_.scalar_type();
  check(xw_, "xw", dtype); check(u_, "u", dtype); check(h0_, "h0", dtype);
  const Tensor xw = xw_.contiguous(), u = u_.contiguous(), h0 = h0_.contiguous();
  const int64_t T = xw.size(0), B = xw.size(1), Hn = xw.size(2);
  TORCH_CHECK(u.numel() == Hn && h0.numel() == B * Hn, "gatelab_scan.indrnn_forward: u or h0 has the wrong size");
  Tensor lengths;
  if (lengths_.has_value() && lengths_->defined()) {
    lengths = lengths_->to(at::kLong).contiguous();
    TORCH_CHECK(lengths.numel() == B, "gatelab_scan.indrnn_forward: lengths must have B entries");
  }
  const int64_t* plen = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  Tensor H = at::empty_like(xw);
  AT_DISPATCH_FLOATING_TYPES(dtype, "indrnn_forward", [&] {
    const scalar_t* px = xw.data_ptr<scalar_t>();
    const scalar_t* pu = u.data_ptr<scalar_t>();
    const scalar_t* ph0 = h0.data_ptr<scalar_t>();
    scalar_t* pH = H.data_ptr<scalar_t>();
    const scalar_t p = static_cast<scalar_t>(param);
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t len = plen ? plen[b] : T;
        const scalar_t* prev = ph0 + b * Hn;
        for (int64_t s = 0; s < T; ++s) {
          const int64_t t = reverse ? T - 1 - s : s;
          const scalar_t* xt = px + (t * B + b) * Hn;
          scalar_t* ht = pH + (t * B + b) * Hn;
          if (t < len) {
            switch (kind) {  // the switch outside the unit loop, so that the simple kinds vectorise
              case S_RELU:
                for (int64_t j = 0; j < Hn; ++j) { const scalar_t z = xt[j] + pu[j] * prev[j]; ht[j] = z > 0 ? z : 0; }
                break;
              case S_IDENTITY:
                for (int64_t j = 0; j < Hn; ++j) ht[j] = xt[j] + pu[j] * prev[j];
                break;
              default:
                for (int64_t j = 0; j < Hn; ++j) ht[j] = act_forward<scalar_t>(kind, xt[j] + pu[j] * prev[j], p);
            }
          } else {
            std::copy(prev, prev + Hn, ht);
          }
          prev = ht;
        }
      }
    });
  });
  return H;
}


// -- sLSTM ----------------------------------------------------------------------------------------
//
// The stabilised step (gatelab/cells/slstm.py), per unit j of head k = j / d:
//   p = xw_t + b_hh + R h            (p_g[j] = Σ_l R[g·H + j, l] h[k·d + l], gate blocks g = i, f, z, o)
//   li = log σ_i(p_i), lf = log σ_f(p_f)           (σ_i, σ_f ∈ {exp, sigmoid}: exact closed forms)
//   m' = max(lf + m, li);  i' = e^(li − m'),  f' = e^(lf + m − m')
//   c' = f' c + i' φ(p_z);  n' = f' n + i';  h' = σ_o(p_o) c' / n'
// Keep the kinds in sync with SLSTM_KINDS in gatelab/engines/scan.py (minGRU / minLSTM use them too).
enum SlstmAct : int64_t {
  L_IDENTITY = 0, L_SIGMOID, L_HARD_SIGMOID, L_ELLIOTT, L_TANH, L_HARDTANH, L_SOFTSIGN, L_RELU, L_LEAKY_RELU, L_EXP
};

template <typename T>
inline T slstm_act(int64_t kind, T x, T a) {
  switch (kind) {
    case L_SIGMOID: return T(1) / (T(1) + vexp(-x));  // vmath.h: no libm call, so the span loops vectorise
    case L_HARD_SIGMOID: return std::min(std::max(a * x + T(0.5), T(0)), T(1));
    case L_ELLIOTT: return T(0.5) * x / (T(1) + std::abs(x)) + T(0.5);
    case L_TANH: return vtanh(x);
    case L_HARDTANH: return std::min(std::max(x, T(-1)), T(1));
    case L_SOFTSIGN: return x / (T(1) + std::abs(x));
    case L_RELU: return x > T(0) ? x : T(0);
    case L_LEAKY_RELU: return x > T(0) ? x : a * x;
    case L_EXP: return std::exp(x);
    default: return x;
  }
}

// f'(x) from x and y = f(x), as autograd differentiates the Python forms (a kink takes its
// one-sided value as torch does: relu' (0) = 0, clamp passes the gradient on its closed interval).
template <typename T>
inline T slstm_act_grad(int64_t kind, T x, T y, T a) {
  switch (kind) {
    case L_SIGMOID: return y * (T(1) - y);
    case L_HARD_SIGMOID: { const T v = a * x + T(0.5); return (v >= T(0) && v <= T(1)) ? a : T(0); }
    case L_ELLIOTT: { const T q = T(1) + std::abs(x); return T(0.5) / (q * q); }
    case L_TANH: return T(1) - y * y;
    case L_HARDTANH: return (x >= T(-1) && x <= T(1)) ? T(1) : T(0);
    case L_SOFTSIGN: { const T q = T(1) + std::abs(x); return T(1) / (q * q); }
    case L_RELU: return x > T(0) ? T(1) : T(0);
    case L_LEAKY_RELU: return x > T(0) ? T(1) : a;
    case L_EXP: return y;
    default: return T(1);
  }
}

// log σ(x) and its derivative for the exponential gates: exp (x, 1) and sigmoid (logsigmoid, 1 − σ(x)).
template <typename T>
inline T log_gate(int64_t kind, T x) {
  if (kind == L_EXP) return x;
  return std::min(x, T(0)) - std::log1p(std::exp(-std::abs(x)));  // logsigmoid, stable both ways
}

template <typename T>
inline T log_gate_grad(int64_t kind, T x) {
  if (kind == L_EXP) return T(1);
  return T(1) / (T(1) + std::exp(x));  // 1 − σ(x)
}

struct SlstmShape {
  int64_t T, B, H, K, d;
};

void check_slstm_kinds(at::IntArrayRef kinds, at::ArrayRef<double> params) {
  TORCH_CHECK(kinds.size() == 4 && params.size() == 4, "gatelab_scan.slstm: kinds and params need 4 entries (i, f, z, o)");
  for (const int64_t k : kinds) TORCH_CHECK(k >= L_IDENTITY && k <= L_EXP, "gatelab_scan.slstm: unknown activation kind ", k);
  for (int g = 0; g < 2; ++g)
    TORCH_CHECK(kinds[g] == L_EXP || kinds[g] == L_SIGMOID, "gatelab_scan.slstm: the i and f gates take exp or sigmoid");
}

SlstmShape slstm_shape(const Tensor& P, const Tensor& R, int64_t num_heads) {
  TORCH_CHECK(P.dim() == 3 && P.size(2) % 4 == 0, "gatelab_scan.slstm: the pre-activations must be (T, B, 4H)");
  const int64_t H = P.size(2) / 4;
  TORCH_CHECK(num_heads >= 1 && H % num_heads == 0, "gatelab_scan.slstm: H must be a multiple of num_heads");
  const int64_t d = H / num_heads;
  TORCH_CHECK(R.dim() == 2 && R.size(0) == 4 * H && R.size(1) == d, "gatelab_scan.slstm: R must be (4H, H/num_heads)");
  return {P.size(0), P.size(1), H, num_heads, d};
}

Tensor slstm_lengths(const c10::optional<Tensor>& lengths_, int64_t B) {
  if (!lengths_.has_value() || !lengths_->defined()) return Tensor();
  Tensor lengths = lengths_->to(at::kLong).contiguous();
  TORCH_CHECK(lengths.numel() == B, "gatelab_scan.slstm: lengths must have B entries");
  return lengths;
}

// Every state after every step (held on a padded step) and the pre-activations p of every live step
// (zero on padded ones): {Hs, Cs, Ns, Ms, P}, states (T, B, H), P (T, B, 4H).
std::vector<Tensor> slstm_forward(const Tensor& xw_, const Tensor& R_, const c10::optional<Tensor>& b_hh_,
                                  const Tensor& h0_, const Tensor& c0_, const Tensor& n0_, const Tensor& m0_,
                                  const c10::optional<Tensor>& lengths_, int64_t num_heads, at::IntArrayRef kinds,
                                  at::ArrayRef<double> params, bool reverse) {
  const auto dtype = xw_.scalar_type();
  check(xw_, "xw", dtype); check(R_, "R", dtype);
  check(h0_, "h0", dtype); check(c0_, "c0", dtype); check(n0_, "n0", dtype); check(m0_, "m0", dtype);
  check_slstm_kinds(kinds, params);
  const Tensor xw = xw_.contiguous(), R = R_.contiguous();
  const SlstmShape sh = slstm_shape(xw, R, num_heads);
  const int64_t T = sh.T, B = sh.B, H = sh.H, d = sh.d;
  const Tensor h0 = h0_.contiguous(), c0 = c0_.contiguous(), n0 = n0_.contiguous(), m0 = m0_.contiguous();
  for (const Tensor* s : {&h0, &c0, &n0, &m0}) TORCH_CHECK(s->numel() == B * H, "gatelab_scan.slstm_forward: a state must be (B, H)");
  Tensor bias;
  if (b_hh_.has_value() && b_hh_->defined()) {
    check(*b_hh_, "b_hh", dtype);
    bias = b_hh_->contiguous();
    TORCH_CHECK(bias.numel() == 4 * H, "gatelab_scan.slstm_forward: b_hh must have 4H entries");
  }
  const Tensor lengths = slstm_lengths(lengths_, B);
  const int64_t* plen = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  const auto opts = xw.options();
  Tensor Hs = at::empty({T, B, H}, opts), Cs = at::empty({T, B, H}, opts), Ns = at::empty({T, B, H}, opts),
         Ms = at::empty({T, B, H}, opts), P = at::zeros({T, B, 4 * H}, opts);
  const int64_t ki = kinds[0], kf = kinds[1], kz = kinds[2], ko = kinds[3];
  AT_DISPATCH_FLOATING_TYPES(dtype, "slstm_forward", [&] {
    using S = scalar_t;
    const S az = static_cast<S>(params[2]), ao = static_cast<S>(params[3]);
    const S* px = xw.data_ptr<S>();
    const S* pR = R.data_ptr<S>();
    const S* pb = bias.defined() ? bias.data_ptr<S>() : nullptr;
    const S* init[4] = {h0.data_ptr<S>(), c0.data_ptr<S>(), n0.data_ptr<S>(), m0.data_ptr<S>()};
    S* out[4] = {Hs.data_ptr<S>(), Cs.data_ptr<S>(), Ns.data_ptr<S>(), Ms.data_ptr<S>()};
    S* pP = P.data_ptr<S>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t len = plen ? plen[b] : T;
        const S *h = init[0] + b * H, *c = init[1] + b * H, *n = init[2] + b * H, *m = init[3] + b * H;
        for (int64_t s = 0; s < T; ++s) {
          const int64_t t = reverse ? T - 1 - s : s;
          const int64_t row = t * B + b;
          S *h2 = out[0] + row * H, *c2 = out[1] + row * H, *n2 = out[2] + row * H, *m2 = out[3] + row * H;
          if (t < len) {
            S* p = pP + row * 4 * H;
            const S* xt = px + row * 4 * H;
            for (int64_t r = 0; r < 4 * H; ++r) {  // row r = g·H + j reads head (j / d) of h
              const S* w = pR + r * d;
              const S* hk = h + ((r % H) / d) * d;
              S acc = xt[r] + (pb ? pb[r] : S(0));
              for (int64_t l = 0; l < d; ++l) acc += w[l] * hk[l];
              p[r] = acc;
            }
            for (int64_t j = 0; j < H; ++j) {
              const S li = log_gate<S>(ki, p[j]), lf = log_gate<S>(kf, p[H + j]);
              const S mn = std::max(lf + m[j], li);
              const S i = std::exp(li - mn), f = std::exp(lf + m[j] - mn);
              const S z = slstm_act<S>(kz, p[2 * H + j], az), o = slstm_act<S>(ko, p[3 * H + j], ao);
              c2[j] = f * c[j] + i * z;
              n2[j] = f * n[j] + i;
              m2[j] = mn;
              h2[j] = o * c2[j] / n2[j];
            }
          } else {
            std::copy(h, h + H, h2); std::copy(c, c + H, c2); std::copy(n, n + H, n2); std::copy(m, m + H, m2);
          }
          h = h2; c = c2; n = n2; m = m2;
        }
      }
    });
  });
  return {Hs, Cs, Ns, Ms, P};
}

// The backward of slstm_forward (backpropagation through time, one reverse pass per sequence) from
// the gradients of every state after every step: {dP, gh0, gc0, gn0, gm0}. dP (T, B, 4H) is ∂L/∂p,
// which is ∂L/∂xw and, summed, ∂L/∂b_hh; the caller forms ∂L/∂R = Σ_t,b dP ⊗ h_prev as one GEMM.
// The max of the stabiliser is differentiated as torch.maximum is: a tie sends half to each side.
std::vector<Tensor> slstm_backward(const Tensor& R_, const Tensor& P_, const Tensor& h0_, const Tensor& c0_,
                                   const Tensor& n0_, const Tensor& m0_, const Tensor& Hs_, const Tensor& Cs_,
                                   const Tensor& Ns_, const Tensor& Ms_, const Tensor& gH_, const Tensor& gC_,
                                   const Tensor& gN_, const Tensor& gM_, const c10::optional<Tensor>& lengths_,
                                   int64_t num_heads, at::IntArrayRef kinds, at::ArrayRef<double> params, bool reverse) {
  const auto dtype = P_.scalar_type();
  for (const Tensor* t : {&R_, &P_, &h0_, &c0_, &n0_, &m0_, &Hs_, &Cs_, &Ns_, &Ms_, &gH_, &gC_, &gN_, &gM_})
    check(*t, "an argument", dtype);
  check_slstm_kinds(kinds, params);
  const Tensor R = R_.contiguous(), P = P_.contiguous();
  const SlstmShape sh = slstm_shape(P, R, num_heads);
  const int64_t T = sh.T, B = sh.B, H = sh.H, d = sh.d;
  const Tensor init[4] = {h0_.contiguous(), c0_.contiguous(), n0_.contiguous(), m0_.contiguous()};
  const Tensor seq[4] = {Hs_.contiguous(), Cs_.contiguous(), Ns_.contiguous(), Ms_.contiguous()};
  const Tensor grad[4] = {gH_.contiguous(), gC_.contiguous(), gN_.contiguous(), gM_.contiguous()};
  for (int q = 0; q < 4; ++q) {
    TORCH_CHECK(init[q].numel() == B * H, "gatelab_scan.slstm_backward: a state must be (B, H)");
    TORCH_CHECK(seq[q].numel() == T * B * H && grad[q].numel() == T * B * H, "gatelab_scan.slstm_backward: a sequence must be (T, B, H)");
  }
  const Tensor lengths = slstm_lengths(lengths_, B);
  const int64_t* plen = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  Tensor dP = at::zeros_like(P);
  Tensor g0[4] = {at::empty_like(init[0]), at::empty_like(init[1]), at::empty_like(init[2]), at::empty_like(init[3])};
  const int64_t ki = kinds[0], kf = kinds[1], kz = kinds[2], ko = kinds[3];
  AT_DISPATCH_FLOATING_TYPES(dtype, "slstm_backward", [&] {
    using S = scalar_t;
    const S az = static_cast<S>(params[2]), ao = static_cast<S>(params[3]);
    const S* pR = R.data_ptr<S>();
    const S* pP = P.data_ptr<S>();
    const S* pi[4] = {init[0].data_ptr<S>(), init[1].data_ptr<S>(), init[2].data_ptr<S>(), init[3].data_ptr<S>()};
    const S* ps[4] = {seq[0].data_ptr<S>(), seq[1].data_ptr<S>(), seq[2].data_ptr<S>(), seq[3].data_ptr<S>()};
    const S* pg[4] = {grad[0].data_ptr<S>(), grad[1].data_ptr<S>(), grad[2].data_ptr<S>(), grad[3].data_ptr<S>()};
    S* pg0[4] = {g0[0].data_ptr<S>(), g0[1].data_ptr<S>(), g0[2].data_ptr<S>(), g0[3].data_ptr<S>()};
    S* pdP = dP.data_ptr<S>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<S> carry(4 * H), dp(4 * H);  // ∂L/∂(h, c, n, m) of the state entering the step
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t len = plen ? plen[b] : T;
        std::fill(carry.begin(), carry.end(), S(0));
        S *gh = carry.data(), *gc = gh + H, *gn = gc + H, *gm = gn + H;
        for (int64_t s = T - 1; s >= 0; --s) {
          const int64_t t = reverse ? T - 1 - s : s;
          const int64_t row = t * B + b;
          for (int q = 0; q < 4; ++q)
            for (int64_t j = 0; j < H; ++j) carry[q * H + j] += pg[q][row * H + j];
          if (t >= len) continue;  // a padded step holds the state: its gradient passes through
          const int64_t prow = s == 0 ? -1 : (reverse ? t + 1 : t - 1) * B + b;
          const S* prev[4];
          for (int q = 0; q < 4; ++q) prev[q] = prow < 0 ? pi[q] + b * H : ps[q] + prow * H;
          const S* p = pP + row * 4 * H;
          const S *c2 = ps[1] + row * H, *n2 = ps[2] + row * H, *m2 = ps[3] + row * H;
          for (int64_t j = 0; j < H; ++j) {
            const S xi = p[j], xf = p[H + j], xz = p[2 * H + j], xo = p[3 * H + j];
            const S li = log_gate<S>(ki, xi), lf = log_gate<S>(kf, xf);
            const S a = lf + prev[3][j], mn = m2[j];
            const S i = std::exp(li - mn), f = std::exp(a - mn);
            const S z = slstm_act<S>(kz, xz, az), o = slstm_act<S>(ko, xo, ao);
            const S inv_n = S(1) / n2[j];
            const S go = gh[j] * c2[j] * inv_n;
            const S gc2 = gc[j] + gh[j] * o * inv_n;
            const S gn2 = gn[j] - gh[j] * o * c2[j] * inv_n * inv_n;
            const S gf = gc2 * prev[1][j] + gn2 * prev[2][j];
            const S gi = gc2 * z + gn2;
            const S gmn = gm[j] - gf * f - gi * i;  // m' enters f' and i' as e^(−m')
            const S share_a = a > li ? S(1) : (a < li ? S(0) : S(0.5));
            const S ga = gf * f + gmn * share_a;
            const S gli = gi * i + gmn * (S(1) - share_a);
            dp[j] = gli * log_gate_grad<S>(ki, xi);
            dp[H + j] = ga * log_gate_grad<S>(kf, xf);
            dp[2 * H + j] = gc2 * i * slstm_act_grad<S>(kz, xz, z, az);
            dp[3 * H + j] = go * slstm_act_grad<S>(ko, xo, o, ao);
            gc[j] = gc2 * f;
            gn[j] = gn2 * f;
            gm[j] = ga;
          }
          std::copy(dp.begin(), dp.end(), pdP + row * 4 * H);
          std::fill(gh, gh + H, S(0));
          for (int64_t r = 0; r < 4 * H; ++r) {  // ∂L/∂h_prev = Rᵀ dp, head by head
            const S* w = pR + r * d;
            S* gk = gh + ((r % H) / d) * d;
            const S g = dp[r];
            for (int64_t l = 0; l < d; ++l) gk[l] += w[l] * g;
          }
        }
        for (int q = 0; q < 4; ++q) std::copy(carry.begin() + q * H, carry.begin() + (q + 1) * H, pg0[q] + b * H);
      }
    });
  });
  return {dP, g0[0], g0[1], g0[2], g0[3]};
}

// -- minGRU and minLSTM: the activations and the linear recurrence in one pass ------------------------
//
// xw (T, B, G·H) holds the input projections of all steps (the caller's GEMM), gate blocks
//   minGRU  (G = 2): z, h      z = σ_z(xw_z), h̃ = g(xw_h);               h' = (1 − z) ⊙ h + z ⊙ h̃
//   minLSTM (G = 3): f, i, h   f = σ_f(xw_f), i = σ_i(xw_i), h̃ = g(xw_h); h' = f/(f+i) ⊙ h + i/(f+i) ⊙ h̃
// with kinds (one per block) from enum SlstmAct. One pass reads xw once and writes every output (zero
// on a padded step, t ≥ lengths[b], where the state is held) and the final state; the backward
// recomputes the activations from xw and runs the reverse recurrence in the same pass, giving ∂L/∂xw.
// Both are parallel over the B·H units: a chunk of units is a few contiguous spans of rows.

template <int64_t K, bool Grad, typename S>
inline void act_span_k(const S* x, S* y, S* d, int64_t n, S a) {
  for (int64_t j = 0; j < n; ++j) {
    const S v = slstm_act<S>(K, x[j], a);
    y[j] = v;
    if (Grad) d[j] = slstm_act_grad<S>(K, x[j], v, a);
  }
}

// y = f(x) (and d = f'(x) when Grad) over n contiguous values, the kind's switch outside the loop.
template <bool Grad, typename S>
void act_span(int64_t kind, const S* x, S* y, S* d, int64_t n, S a) {
  switch (kind) {
    case L_SIGMOID: return act_span_k<L_SIGMOID, Grad>(x, y, d, n, a);
    case L_HARD_SIGMOID: return act_span_k<L_HARD_SIGMOID, Grad>(x, y, d, n, a);
    case L_ELLIOTT: return act_span_k<L_ELLIOTT, Grad>(x, y, d, n, a);
    case L_TANH: return act_span_k<L_TANH, Grad>(x, y, d, n, a);
    case L_HARDTANH: return act_span_k<L_HARDTANH, Grad>(x, y, d, n, a);
    case L_SOFTSIGN: return act_span_k<L_SOFTSIGN, Grad>(x, y, d, n, a);
    case L_RELU: return act_span_k<L_RELU, Grad>(x, y, d, n, a);
    case L_LEAKY_RELU: return act_span_k<L_LEAKY_RELU, Grad>(x, y, d, n, a);
    case L_EXP: return act_span_k<L_EXP, Grad>(x, y, d, n, a);
    default: return act_span_k<L_IDENTITY, Grad>(x, y, d, n, a);
  }
}

struct Span {
  int64_t b, j0, n, off;  // row b, units j0 .. j0 + n − 1, at offset off of the chunk's buffers
};

// The rows of the units n0 .. n1 − 1 of (B, H).
std::vector<Span> spans_of(int64_t n0, int64_t n1, int64_t H) {
  std::vector<Span> spans;
  for (int64_t b = n0 / H; b * H < n1; ++b) {
    const int64_t j0 = std::max<int64_t>(n0 - b * H, 0), j1 = std::min<int64_t>(n1 - b * H, H);
    spans.push_back({b, j0, j1 - j0, b * H + j0 - n0});
  }
  return spans;
}

struct MinShape {
  int64_t T, B, H, G;
};

MinShape min_shape(const Tensor& xw, const Tensor& h0, at::IntArrayRef kinds, at::ArrayRef<double> params,
                   const char* op) {
  const int64_t G = static_cast<int64_t>(kinds.size());
  TORCH_CHECK((G == 2 || G == 3) && params.size() == kinds.size(), "gatelab_scan.", op,
              ": kinds and params need 2 entries (minGRU: z, h) or 3 (minLSTM: f, i, h)");
  for (const int64_t k : kinds) TORCH_CHECK(k >= L_IDENTITY && k <= L_EXP, "gatelab_scan.", op, ": unknown activation kind ", k);
  TORCH_CHECK(xw.dim() == 3 && xw.size(2) % G == 0, "gatelab_scan.", op, ": xw must be (T, B, ", G, "·H)");
  const int64_t H = xw.size(2) / G;
  TORCH_CHECK(h0.numel() == xw.size(1) * H, "gatelab_scan.", op, ": h0 must be (B, H)");
  return {xw.size(0), xw.size(1), H, G};
}

// {out (T, B, H), h_last (B, H)}: every output (zero on padded steps) and the state after the last step.
std::vector<Tensor> min_rnn_forward(const Tensor& xw_, const Tensor& h0_, const c10::optional<Tensor>& lengths_,
                                    at::IntArrayRef kinds, at::ArrayRef<double> params, bool reverse) {
  const auto dtype = xw_.scalar_type();
  check(xw_, "xw", dtype); check(h0_, "h0", dtype);
  const Tensor xw = xw_.contiguous(), h0 = h0_.contiguous();
  const MinShape sh = min_shape(xw, h0, kinds, params, "min_rnn_forward");
  const int64_t T = sh.T, B = sh.B, H = sh.H, G = sh.G, N = B * H;
  const Tensor lengths = slstm_lengths(lengths_, B);
  const int64_t* plen = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  Tensor out = at::empty({T, B, H}, xw.options()), last = at::empty({B, H}, xw.options());
  const std::vector<int64_t> k(kinds.begin(), kinds.end());
  AT_DISPATCH_FLOATING_TYPES(dtype, "min_rnn_forward", [&] {
    using S = scalar_t;
    const S* px = xw.data_ptr<S>();
    const S* ph0 = h0.data_ptr<S>();
    S* pout = out.data_ptr<S>();
    S* plast = last.data_ptr<S>();
    S p[3];
    for (int64_t g = 0; g < G; ++g) p[g] = static_cast<S>(params[g]);
    at::parallel_for(0, N, grain(N), [&](int64_t n0, int64_t n1) {
      const std::vector<Span> spans = spans_of(n0, n1, H);
      const int64_t L = n1 - n0;
      std::vector<S> h(ph0 + n0, ph0 + n1), y(G * L);  // the state, and the activations of one step
      for (int64_t s = 0; s < T; ++s) {
        const int64_t t = reverse ? T - 1 - s : s;
        for (const Span& sp : spans) {
          S* o = pout + (t * B + sp.b) * H + sp.j0;
          if (plen && t >= plen[sp.b]) {
            std::fill(o, o + sp.n, S(0));
            continue;
          }
          const S* x = px + (t * B + sp.b) * G * H + sp.j0;
          S* hs = h.data() + sp.off;
          for (int64_t g = 0; g < G; ++g) act_span<false, S>(k[g], x + g * H, y.data() + g * L + sp.off, nullptr, sp.n, p[g]);
          const S* y0 = y.data() + sp.off;
          const S* y1 = y0 + L;
          if (G == 2) {
            for (int64_t j = 0; j < sp.n; ++j) o[j] = hs[j] = (S(1) - y0[j]) * hs[j] + y0[j] * y1[j];
          } else {
            const S* y2 = y1 + L;
            for (int64_t j = 0; j < sp.n; ++j) {
              const S total = y0[j] + y1[j];
              o[j] = hs[j] = y0[j] / total * hs[j] + y1[j] / total * y2[j];
            }
          }
        }
      }
      std::copy(h.begin(), h.end(), plast + n0);
    });
  });
  return {out, last};
}

// The backward of min_rnn_forward from g_out = ∂L/∂out (every step) and g_last = ∂L/∂h_last (either
// absent: zero): {∂L/∂xw (zero on padded steps), ∂L/∂h0}. One reverse pass: g = g_out_t + carry, the
// step's activations and derivatives recomputed from xw, h_{t−1} read from out (h0 before the first
// live step), then carry = a_t ⊙ g.
std::vector<Tensor> min_rnn_backward(const Tensor& xw_, const Tensor& h0_, const Tensor& out_,
                                     const c10::optional<Tensor>& g_out_, const c10::optional<Tensor>& g_last_,
                                     const c10::optional<Tensor>& lengths_, at::IntArrayRef kinds,
                                     at::ArrayRef<double> params, bool reverse) {
  const auto dtype = xw_.scalar_type();
  check(xw_, "xw", dtype); check(h0_, "h0", dtype); check(out_, "out", dtype);
  const Tensor xw = xw_.contiguous(), h0 = h0_.contiguous(), out = out_.contiguous();
  const MinShape sh = min_shape(xw, h0, kinds, params, "min_rnn_backward");
  const int64_t T = sh.T, B = sh.B, H = sh.H, G = sh.G, N = B * H;
  TORCH_CHECK(out.numel() == T * N, "gatelab_scan.min_rnn_backward: out must be (T, B, H)");
  Tensor g_out, g_last;
  if (g_out_.has_value() && g_out_->defined()) {
    check(*g_out_, "g_out", dtype);
    g_out = g_out_->contiguous();
    TORCH_CHECK(g_out.numel() == T * N, "gatelab_scan.min_rnn_backward: g_out must be (T, B, H)");
  }
  if (g_last_.has_value() && g_last_->defined()) {
    check(*g_last_, "g_last", dtype);
    g_last = g_last_->contiguous();
    TORCH_CHECK(g_last.numel() == N, "gatelab_scan.min_rnn_backward: g_last must be (B, H)");
  }
  const Tensor lengths = slstm_lengths(lengths_, B);
  const int64_t* plen = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  Tensor dxw = at::empty_like(xw), gh0 = at::empty({B, H}, xw.options());
  const std::vector<int64_t> k(kinds.begin(), kinds.end());
  AT_DISPATCH_FLOATING_TYPES(dtype, "min_rnn_backward", [&] {
    using S = scalar_t;
    const S* px = xw.data_ptr<S>();
    const S* ph0 = h0.data_ptr<S>();
    const S* pout = out.data_ptr<S>();
    const S* pg = g_out.defined() ? g_out.data_ptr<S>() : nullptr;
    const S* pgl = g_last.defined() ? g_last.data_ptr<S>() : nullptr;
    S* pdx = dxw.data_ptr<S>();
    S* pgh0 = gh0.data_ptr<S>();
    S p[3];
    for (int64_t g = 0; g < G; ++g) p[g] = static_cast<S>(params[g]);
    at::parallel_for(0, N, grain(N), [&](int64_t n0, int64_t n1) {
      const std::vector<Span> spans = spans_of(n0, n1, H);
      const int64_t L = n1 - n0;
      std::vector<S> carry(L, S(0)), y(G * L), d(G * L);  // carry: ∂L/∂h of the state entering the step after
      if (pgl) std::copy(pgl + n0, pgl + n1, carry.begin());
      for (int64_t s = T - 1; s >= 0; --s) {
        const int64_t t = reverse ? T - 1 - s : s;
        const int64_t tp = reverse ? t + 1 : t - 1;  // the step before t in the scan's order (s > 0)
        for (const Span& sp : spans) {
          const int64_t len = plen ? plen[sp.b] : T;
          S* dx = pdx + (t * B + sp.b) * G * H + sp.j0;
          if (t >= len) {  // the state is held: its gradient passes through
            for (int64_t g = 0; g < G; ++g) std::fill(dx + g * H, dx + g * H + sp.n, S(0));
            continue;
          }
          const S* x = px + (t * B + sp.b) * G * H + sp.j0;
          const S* hp = (s == 0 || tp >= len) ? ph0 + sp.b * H + sp.j0 : pout + (tp * B + sp.b) * H + sp.j0;
          const S* go = pg ? pg + (t * B + sp.b) * H + sp.j0 : nullptr;
          S* c = carry.data() + sp.off;
          for (int64_t g = 0; g < G; ++g)
            act_span<true, S>(k[g], x + g * H, y.data() + g * L + sp.off, d.data() + g * L + sp.off, sp.n, p[g]);
          const S *y0 = y.data() + sp.off, *d0 = d.data() + sp.off;
          const S *y1 = y0 + L, *d1 = d0 + L;
          if (G == 2) {  // a = 1 − z, b = z h̃
            for (int64_t j = 0; j < sp.n; ++j) {
              const S gt = (go ? go[j] : S(0)) + c[j];
              dx[j] = gt * (y1[j] - hp[j]) * d0[j];
              dx[H + j] = gt * y0[j] * d1[j];
              c[j] = (S(1) - y0[j]) * gt;
            }
          } else {  // a = f / (f + i), b = i / (f + i) h̃
            const S *y2 = y1 + L, *d2 = d1 + L;
            for (int64_t j = 0; j < sp.n; ++j) {
              const S gt = (go ? go[j] : S(0)) + c[j];
              const S inv = S(1) / (y0[j] + y1[j]);
              const S w = gt * (y2[j] - hp[j]) * inv * inv;  // ∂L/∂i = f w, ∂L/∂f = −i w
              dx[j] = -y1[j] * w * d0[j];
              dx[H + j] = y0[j] * w * d1[j];
              dx[2 * H + j] = gt * y1[j] * inv * d2[j];
              c[j] = y0[j] * inv * gt;
            }
          }
        }
      }
      std::copy(carry.begin(), carry.end(), pgh0 + n0);
    });
  });
  return {dxw, gh0};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gatelab_scan, m) {
  m.def("linear_scan(Tensor a, Tensor b, Tensor h0, bool reverse) -> Tensor");
  m.def("linear_scan_backward(Tensor a, Tensor H, Tensor h0, Tensor gH, bool reverse) -> Tensor[]");
  m.def("indrnn_forward(Tensor xw, Tensor u, Tensor h0, Tensor? lengths, int kind, float param, bool reverse) -> Tensor");
  m.def("slstm_forward(Tensor xw, Tensor R, Tensor? b_hh, Tensor h0, Tensor c0, Tensor n0, Tensor m0, Tensor? lengths, "
        "int num_heads, int[] kinds, float[] params, bool reverse) -> Tensor[]");
  m.def("slstm_backward(Tensor R, Tensor P, Tensor h0, Tensor c0, Tensor n0, Tensor m0, Tensor Hs, Tensor Cs, "
        "Tensor Ns, Tensor Ms, Tensor gH, Tensor gC, Tensor gN, Tensor gM, Tensor? lengths, int num_heads, "
        "int[] kinds, float[] params, bool reverse) -> Tensor[]");
  m.def("min_rnn_forward(Tensor xw, Tensor h0, Tensor? lengths, int[] kinds, float[] params, bool reverse) -> Tensor[]");
  m.def("min_rnn_backward(Tensor xw, Tensor h0, Tensor out, Tensor? g_out, Tensor? g_last, Tensor? lengths, "
        "int[] kinds, float[] params, bool reverse) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(gatelab_scan, CPU, m) {
  m.impl("linear_scan", &linear_scan);
  m.impl("linear_scan_backward", &linear_scan_backward);
  m.impl("indrnn_forward", &indrnn_forward);
  m.impl("slstm_forward", &slstm_forward);
  m.impl("slstm_backward", &slstm_backward);
  m.impl("min_rnn_forward", &min_rnn_forward);
  m.impl("min_rnn_backward", &min_rnn_backward);
}
