// gatelab scan kernels: the elementwise recurrences of minGRU / minLSTM (a linear scan) and IndRNN,
// forward and backward, on the CPU. Compiled into the same library as kernels.cpp (cpp.py builds both)
// but independent of it: its own op namespace, gatelab_scan, and nothing shared.
//
// The Python callers (gatelab/engines/scan.py) do the input GEMM of all steps and every activation of
// the scan cells (gates read x_t only, so those are elementwise over all steps at once); these loops
// carry the state through time. scan.py holds the PyTorch twin of each function; tests tie the two.
//
// Layouts: time-major, contiguous; a and b (T, N) with N = B·H for the linear scan, (T, B, H) for IndRNN.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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

}  // namespace

TORCH_LIBRARY_FRAGMENT(gatelab_scan, m) {
  m.def("linear_scan(Tensor a, Tensor b, Tensor h0, bool reverse) -> Tensor");
  m.def("linear_scan_backward(Tensor a, Tensor H, Tensor h0, Tensor gH, bool reverse) -> Tensor[]");
  m.def("indrnn_forward(Tensor xw, Tensor u, Tensor h0, Tensor? lengths, int kind, float param, bool reverse) -> Tensor");
}

TORCH_LIBRARY_IMPL(gatelab_scan, CPU, m) {
  m.impl("linear_scan", &linear_scan);
  m.impl("linear_scan_backward", &linear_scan_backward);
  m.impl("indrnn_forward", &indrnn_forward);
}
