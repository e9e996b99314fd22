// gatelab fused engine: the time loops of LSTM (plain and layer-norm), GRU (reset-after), Elman and
// the gated-state cell,
// forward and hand-written backward, for any stateless registered activation in any slot.
//
// Per step: one product with W_hh, then one pass over the batch rows that applies every activation and
// the cell's elementwise update. In float32 on a CPU with AVX-512 the product is gatelab's own packed
// kernel and each worker of one parallel region per sequence owns a range of units (see "gatelab's own
// per-step product" below); otherwise the BLAS torch links or oneDNN on raw pointers, and the row pass
// in a parallel region per step. The input projection of all steps
// and the weight gradients are GEMMs done by the Python caller before and after these loops
// (gatelab/engines/fused/function.py), which also holds the pure-PyTorch twin of every function
// here (steps.py); tests tie the two.
//
// Layouts: time-major (T, B, F), contiguous. Pre-activation rows follow torch's gate order.
// A sequence b is live at step t when t < lengths[b]; dead steps hold the state and output zero.

#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vmath.h"

// Before an elementwise loop whose iterations are independent (every array read and written at the same
// index j; arrays may be the same buffer but never overlap at other offsets): vectorise it without the
// aliasing checks the compiler cannot prove away (several stores per iteration defeat them).
#define SIMD _Pragma("omp simd")

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using at::Tensor;

// Keep in sync with KINDS in cpp.py.
enum Act : int64_t {
  IDENTITY = 0, SIGMOID, HARD_SIGMOID, ELLIOTT, TANH, HARDTANH, SOFTSIGN, RELU, LEAKY_RELU, ELU,
  SELU, GELU, SILU, SOFTPLUS
};

// The loops run activations inside parallel regions, where an error cannot be raised: check first.
void check_kinds(at::IntArrayRef kinds) {
  for (const int64_t kind : kinds) TORCH_CHECK(kind >= IDENTITY && kind <= SOFTPLUS, "gatelab fused: unknown activation kind ", kind);
}

constexpr double kSeluAlpha = 1.6732632423543772848170429916717;
constexpr double kSeluScale = 1.0507009873554804934193349852946;

// vexp, vtanh: vmath.h (shared with kernels_scan.cpp)

// y = f(x) over n contiguous elements; the switch sits outside the loops so each loop vectorises.
template <typename T>
__attribute__((always_inline)) inline void act_forward_n(int64_t kind, T a, const T* __restrict x, T* __restrict y,
                                                         int64_t n) {
  switch (kind) {
    case IDENTITY: for (int64_t j = 0; j < n; ++j) y[j] = x[j]; break;
    case SIGMOID: for (int64_t j = 0; j < n; ++j) y[j] = T(1) / (T(1) + vexp(-x[j])); break;
    case HARD_SIGMOID:
      for (int64_t j = 0; j < n; ++j) y[j] = std::min(std::max(a * x[j] + T(0.5), T(0)), T(1));
      break;
    case ELLIOTT: for (int64_t j = 0; j < n; ++j) y[j] = T(0.5) * x[j] / (T(1) + std::abs(x[j])) + T(0.5); break;
    case TANH: for (int64_t j = 0; j < n; ++j) y[j] = vtanh(x[j]); break;
    case HARDTANH: for (int64_t j = 0; j < n; ++j) y[j] = std::min(std::max(x[j], T(-1)), T(1)); break;
    case SOFTSIGN: for (int64_t j = 0; j < n; ++j) y[j] = x[j] / (T(1) + std::abs(x[j])); break;
    case RELU: for (int64_t j = 0; j < n; ++j) y[j] = x[j] > T(0) ? x[j] : T(0); break;
    case LEAKY_RELU: for (int64_t j = 0; j < n; ++j) y[j] = x[j] > T(0) ? x[j] : a * x[j]; break;
    case ELU: for (int64_t j = 0; j < n; ++j) y[j] = x[j] > T(0) ? x[j] : a * (vexp(x[j]) - T(1)); break;
    case SELU:
      for (int64_t j = 0; j < n; ++j)
        y[j] = T(kSeluScale) * (x[j] > T(0) ? x[j] : T(kSeluAlpha) * (vexp(x[j]) - T(1)));
      break;
    case GELU:
      for (int64_t j = 0; j < n; ++j) y[j] = T(0.5) * x[j] * (T(1) + std::erf(x[j] * T(M_SQRT1_2)));
      break;
    case SILU: for (int64_t j = 0; j < n; ++j) y[j] = x[j] / (T(1) + vexp(-x[j])); break;
    case SOFTPLUS:  // torch's threshold 20
      for (int64_t j = 0; j < n; ++j) y[j] = x[j] > T(20) ? x[j] : std::log1p(std::exp(x[j]));
      break;
    default: TORCH_CHECK(false, "gatelab fused: unknown activation kind ", kind);
  }
}

template <typename T>
__attribute__((noinline)) void act_forward(int64_t kind, T a, const T* x, T* y, int64_t n) {
  act_forward_n(kind, a, x, y, n);
}

// The same over `rows` rows of n elements, x and y advancing by ldx and ldy: one call for a worker's
// rows of one gate (the kernel loops), so that the call and the switch are not paid per row.
template <typename T>
__attribute__((noinline)) void act_forward_rows(int64_t kind, T a, const T* x, int64_t ldx, T* y, int64_t ldy,
                                                int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) act_forward_n(kind, a, x + r * ldx, y + r * ldy, n);
}

// g = dy ⊙ f'(x), where y = f(x); g may alias dy. The derivative is taken from the output y for
// every kind but GELU and SiLU (and leaky ReLU / ELU with a non-positive parameter), which need
// the input x; x may be null otherwise, so forward passes need not keep pre-activations.
template <typename T>
__attribute__((always_inline)) inline void act_backward_n(int64_t kind, T a, const T* __restrict x,
                                                          const T* __restrict y, const T* dy, T* g, int64_t n) {
  switch (kind) {
    case IDENTITY: for (int64_t j = 0; j < n; ++j) g[j] = dy[j]; break;
    case SIGMOID: for (int64_t j = 0; j < n; ++j) g[j] = dy[j] * y[j] * (T(1) - y[j]); break;
    case HARD_SIGMOID:  // derivative a on the open ramp 0 < y < 1
      for (int64_t j = 0; j < n; ++j) g[j] = (y[j] > T(0) && y[j] < T(1)) ? dy[j] * a : T(0);
      break;
    case ELLIOTT:  // s = 2y − 1 = x / (1 + |x|), f' = ½ (1 − |s|)²
      for (int64_t j = 0; j < n; ++j) {
        const T d = T(1) - std::abs(T(2) * y[j] - T(1));
        g[j] = dy[j] * T(0.5) * d * d;
      }
      break;
    case TANH: for (int64_t j = 0; j < n; ++j) g[j] = dy[j] * (T(1) - y[j] * y[j]); break;
    case HARDTANH: for (int64_t j = 0; j < n; ++j) g[j] = (y[j] > T(-1) && y[j] < T(1)) ? dy[j] : T(0); break;
    case SOFTSIGN:  // f' = (1 − |y|)²
      for (int64_t j = 0; j < n; ++j) {
        const T d = T(1) - std::abs(y[j]);
        g[j] = dy[j] * d * d;
      }
      break;
    case RELU: for (int64_t j = 0; j < n; ++j) g[j] = y[j] > T(0) ? dy[j] : T(0); break;
    case LEAKY_RELU:
      if (a > T(0)) for (int64_t j = 0; j < n; ++j) g[j] = y[j] > T(0) ? dy[j] : a * dy[j];
      else for (int64_t j = 0; j < n; ++j) g[j] = x[j] > T(0) ? dy[j] : a * dy[j];
      break;
    case ELU:
      if (a > T(0)) for (int64_t j = 0; j < n; ++j) g[j] = y[j] > T(0) ? dy[j] : dy[j] * (y[j] + a);
      else for (int64_t j = 0; j < n; ++j) g[j] = x[j] > T(0) ? dy[j] : dy[j] * (y[j] + a);
      break;
    case SELU:
      for (int64_t j = 0; j < n; ++j)
        g[j] = y[j] > T(0) ? dy[j] * T(kSeluScale) : dy[j] * (y[j] + T(kSeluScale * kSeluAlpha));
      break;
    case GELU:
      for (int64_t j = 0; j < n; ++j) {
        T cdf = T(0.5) * (T(1) + std::erf(x[j] * T(M_SQRT1_2)));
        T pdf = vexp(T(-0.5) * x[j] * x[j]) * T(0.3989422804014327);
        g[j] = dy[j] * (cdf + x[j] * pdf);
      }
      break;
    case SILU:
      for (int64_t j = 0; j < n; ++j) {
        T s = T(1) / (T(1) + vexp(-x[j]));
        g[j] = dy[j] * s * (T(1) + x[j] * (T(1) - s));
      }
      break;
    case SOFTPLUS: for (int64_t j = 0; j < n; ++j) g[j] = dy[j] * (T(1) - vexp(-y[j])); break;
    default: TORCH_CHECK(false, "gatelab fused: unknown activation kind ", kind);
  }
}

template <typename T>
__attribute__((noinline)) void act_backward(int64_t kind, T a, const T* x, const T* y, const T* dy, T* g, int64_t n) {
  act_backward_n(kind, a, x, y, dy, g, n);
}

// The same over `rows` rows of n elements (x, y, dy and g advance by their own ld; x may be null where
// act_backward's may), as act_forward_rows.
template <typename T>
__attribute__((noinline)) void act_backward_rows(int64_t kind, T a, const T* x, int64_t ldx, const T* y, int64_t ldy,
                                                 const T* dy, int64_t lddy, T* g, int64_t ldg, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
    act_backward_n(kind, a, x ? x + r * ldx : nullptr, y + r * ldy, dy + r * lddy, g + r * ldg, n);
}

// Rows per task so that small steps stay on one thread.
int64_t grain(int64_t row_elems) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_elems)); }

struct Loop {
  int64_t T, B;
  bool reverse;
  const int64_t* len;  // nullptr: every sequence runs all T steps
  int64_t step(int64_t k) const { return reverse ? T - 1 - k : k; }
  bool live(int64_t t, int64_t b) const { return len == nullptr || t < len[b]; }
};

Loop make_loop(const Tensor& x, const c10::optional<Tensor>& lengths, bool reverse) {
  TORCH_CHECK(x.dim() >= 2 && x.size(0) > 0, "gatelab fused: the loops need at least one time step, got shape ",
              x.sizes());
  return Loop{x.size(0), x.size(1), reverse, lengths.has_value() ? lengths->data_ptr<int64_t>() : nullptr};
}

// Where a forward pass keeps per-step buffers: every step when training (the backward reads them),
// one reused slot otherwise; recurrent inputs alternate between two slots.
struct Keep {
  const Loop& L;
  bool train;
  int64_t n, n_rec;
  Keep(const Loop& loop, bool tr) : L(loop), train(tr), n(tr ? loop.T : 1), n_rec(tr ? loop.T : 2) {}
  int64_t at(int64_t t) const { return train ? t : 0; }
  int64_t rec(int64_t k) const { return train ? L.step(k) : k % 2; }
};

// A per-step buffer of a forward pass. With lengths, a dead step's rows are never written: zeroed,
// every output is defined (the same on every call, as an operator's outputs must be).
Tensor per_step(const Loop& L, at::IntArrayRef sizes, const at::TensorOptions& options) {
  return L.len ? at::zeros(sizes, options) : at::empty(sizes, options);
}

template <typename T>
const T* opt_ptr(const c10::optional<Tensor>& t) { return t.has_value() ? t->data_ptr<T>() : nullptr; }

// ---------------------------------------------------------------------------------------------
// Matrix products on raw pointers. The per-step products are small (batch rows), so the cost of
// building Tensor views for them would rival the work at small sizes: there, call the BLAS that torch
// itself links (Fortran interface, column-major), declared weak so that a torch without it still
// loads; then ATen does the product through from_blob views. Larger float32 products go to oneDNN,
// which torch builds in and exports (at::native::mkldnn_matmul): on AMD processors MKL takes slower
// code paths, and oneDNN ran the (32 x H)(H x 4H) step product at 144-174 GFLOP/s against MKL's
// 123-136 at H 256-512 (2-core EPYC, benchmarks/speed.py prints the path), while its per-call cost
// loses below about 2^22 multiply-adds.

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

}  // namespace

namespace at::native {
// result = beta * result + alpha * mat1 @ mat2 through oneDNN (ATen/native/mkldnn/Matmul.cpp).
void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result, float beta, float alpha)
    __attribute__((weak));
}  // namespace at::native

namespace {

// Which library runs the per-step float32 products (set_gemm_library): by size and CPU, or one of them.
// GEMM_BY_SIZE: the BLAS or oneDNN by size and CPU, as before gatelab's kernel (benchmarks compare the two).
enum GemmChoice : int64_t { GEMM_AUTO = 0, GEMM_BLAS = 1, GEMM_ONEDNN = 2, GEMM_KERNEL = 3, GEMM_BY_SIZE = 4 };
int64_t gemm_choice = GEMM_AUTO;
constexpr int64_t kOneDnnMinMacs = int64_t(1) << 24;  // below: BLAS measured as fast or faster in the loop

// A torch built without oneDNN may still export a throwing stub: check the build, and give up on
// oneDNN for the process at its first error (onednn_product then reports failure to its caller).
bool onednn_broken = false;
bool onednn_available() { return &at::native::mkldnn_matmul != nullptr && at::hasMKLDNN() && !onednn_broken; }

bool cpu_prefers_onednn() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool amd = __builtin_cpu_is("amd");
  return amd;  // on Intel, MKL's own kernels are the fast path
#else
  return false;
#endif
}

template <typename T>
bool use_onednn(int64_t m, int64_t n, int64_t k) {
  if constexpr (!std::is_same_v<T, float>) {
    return false;
  } else {
    if (gemm_choice == GEMM_BLAS || !onednn_available()) return false;
    return gemm_choice == GEMM_ONEDNN || (cpu_prefers_onednn() && m * n * k >= kOneDnnMinMacs);
  }
}

// Row-major C (M×N) = beta C + A (M×K) · op(B): B is row-major (N×K) used transposed, or (K×N).
// Returns false (C untouched) when oneDNN refuses; the caller then runs the BLAS.
template <typename T>
bool onednn_product(T* C, const T* A, const T* Bm, int64_t M, int64_t N, int64_t K, bool b_transposed, T beta) {
  auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  Tensor a = at::from_blob(const_cast<T*>(A), {M, K}, opt);
  Tensor b = b_transposed ? at::from_blob(const_cast<T*>(Bm), {K, N}, {1, K}, opt)
                          : at::from_blob(const_cast<T*>(Bm), {K, N}, opt);
  Tensor c = at::from_blob(C, {M, N}, opt);
  try {
    at::native::mkldnn_matmul(a, b, c, float(beta), 1.0f);
  } catch (const c10::Error&) {  // checked before writing: C holds what it held
    onednn_broken = true;
    return false;
  }
  return true;
}

// Column-major C (m×n, ldc) = op(A) op(B) + beta C, op = transpose when the flag is 'T'.
template <typename T>
void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
          T beta, T* c, int64_t ldc) {
  const int im = m, in = n, ik = k, ilda = lda, ildb = ldb, ildc = ldc;
  const T one = 1;
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) return sgemm_(&ta, &tb, &im, &in, &ik, &one, a, &ilda, b, &ildb, &beta, c, &ildc);
  } else {
    if (dgemm_ != nullptr) return dgemm_(&ta, &tb, &im, &in, &ik, &one, a, &ilda, b, &ildb, &beta, c, &ildc);
  }
  auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  Tensor A = at::from_blob(const_cast<T*>(a), {m, k}, ta == 'N' ? at::IntArrayRef{1, lda} : at::IntArrayRef{lda, 1}, opt);
  Tensor Bm = at::from_blob(const_cast<T*>(b), {k, n}, tb == 'N' ? at::IntArrayRef{1, ldb} : at::IntArrayRef{ldb, 1}, opt);
  Tensor C = at::from_blob(c, {m, n}, {1, ldc}, opt);
  if (beta == T(0)) C.copy_(at::mm(A, Bm)); else C.mul_(beta).add_(at::mm(A, Bm));
}

// Row-major Z (B×G) (+)= H (B×R) · Wᵀ, with W (G×R) row-major.
template <typename T>
void times_Wt(T* Z, const T* H, const T* W, int64_t B, int64_t G, int64_t R, T beta) {
  if (use_onednn<T>(B, G, R) && onednn_product<T>(Z, H, W, B, G, R, true, beta)) return;
  gemm<T>('T', 'N', G, B, R, W, R, H, R, beta, Z, G);
}

// Row-major D (B×R) (+)= G (B×Gn) · W, with W (Gn×R) row-major.
template <typename T>
void times_W(T* D, const T* Gr, const T* W, int64_t B, int64_t Gn, int64_t R, T beta) {
  if (use_onednn<T>(B, R, Gn) && onednn_product<T>(D, Gr, W, B, R, Gn, false, beta)) return;
  gemm<T>('N', 'N', R, B, Gn, W, R, Gr, Gn, beta, D, R);
}

// dh += (dG · W_hh) ⊙ mask, the recurrent part of the state gradient.
template <typename T>
void recurrent_grad(T* dh, const T* dG, const T* W, const T* mask, std::vector<T>& tmp, int64_t B, int64_t G,
                    int64_t R) {
  if (mask == nullptr) return times_W<T>(dh, dG, W, B, G, R, T(1));
  tmp.resize(B * R);
  times_W<T>(tmp.data(), dG, W, B, G, R, T(0));
  for (int64_t j = 0; j < B * R; ++j) dh[j] += tmp[j] * mask[j];
}

// HR_row = h_row ⊙ mask_row: the recurrent input of the next step.
template <typename T>
inline void write_rec(T* hr, const T* h, const T* mask, int64_t n) {
  if (mask == nullptr) {
    SIMD for (int64_t j = 0; j < n; ++j) hr[j] = h[j];
  } else {
    SIMD for (int64_t j = 0; j < n; ++j) hr[j] = h[j] * mask[j];
  }
}

// ---------------------------------------------------------------------------------------------
// gatelab's own per-step product for float32 on AVX-512 (GEMM_KERNEL; the automatic choice where the
// library was built for such a CPU). The BLAS and oneDNN calls above pay a per-call cost that rivals a
// small step's work, re-read W_hh in their own layout every step and leave the step's elementwise pass
// to a second parallel region. Here instead:
// * W_hh is packed once per call into panels, one per block of units: a panel holds, for every k, the
//   columns of NG column groups (LSTM forward: the 16 units' i, f, g and o rows of W_hh; the backward's
//   dh = dZ W_hh: 2 x 16 consecutive units), so one step's tile reads it sequentially;
// * a register tile of MR batch rows x NG x 16 columns accumulates onto the input projection already
//   in the output (broadcast of h, fused multiply-add);
// * the workers of one parallel region for the whole sequence each own a range of units: each packs its
//   own panels, computes its columns of the product and then runs the step's elementwise pass on its
//   units only (the gate values it just wrote, still in its cache); one barrier per step hands the new
//   h (forward) or dZ (backward) to the others.

#if defined(__AVX512F__)
constexpr bool kHaveKernel = true;
#else
constexpr bool kHaveKernel = false;
#endif

template <typename T>
bool use_kernel() {
  if constexpr (!std::is_same_v<T, float>) {
    return false;
  } else {
    return kHaveKernel && (gemm_choice == GEMM_AUTO || gemm_choice == GEMM_KERNEL);
  }
}

// How many workers the loop's parallel region gets: one per torch thread (at most one per block of
// units), provided this file is compiled with OpenMP, so that at::parallel_for runs an OpenMP team
// whose threads all run at once and take one chunk each, which the barrier needs; else one (then
// at::parallel_for calls its function inline).
int64_t kernel_workers(int64_t blocks) {
#if defined(_OPENMP)
  return at::in_parallel_region() ? 1 : std::max<int64_t>(1, std::min<int64_t>(blocks, at::get_num_threads()));
#else
  return 1;
#endif
}

// The number of threads one at::parallel_for(0, n, 1, ...) region of the kernel drivers runs on
// (`region_threads` op; tests check that the workers really run in parallel).
int64_t region_threads(int64_t n) {
  std::atomic<int64_t> calls{0};
  at::parallel_for(0, std::max<int64_t>(1, n), 1, [&](int64_t, int64_t) { calls.fetch_add(1); });
  return calls.load();
}

// A spinning barrier for the workers of one at::parallel_for(0, n, 1, ...): a chunk [w0, w1) arrives with
// weight w1 - w0, so any split of the n slices among the team's threads (one thread taking several
// included) completes it. Spins briefly, then yields (a shared or oversubscribed machine). A worker
// that fails calls abort(): every wait() then returns false, so no worker waits for it forever.
class Barrier {
 public:
  explicit Barrier(int64_t total) : total_(total) {}
  bool wait(int64_t weight) {
    const int64_t phase = phase_.load(std::memory_order_acquire);
    if (count_.fetch_add(weight, std::memory_order_acq_rel) + weight == total_) {
      count_.store(0, std::memory_order_relaxed);
      phase_.store(phase + 1, std::memory_order_release);
      return !aborted_.load(std::memory_order_acquire);
    }
    for (int64_t spins = 0; phase_.load(std::memory_order_acquire) == phase; ++spins) {
      if (aborted_.load(std::memory_order_acquire)) return false;
      if (spins < 2000) {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
    return !aborted_.load(std::memory_order_acquire);
  }
  void abort() { aborted_.store(true, std::memory_order_release); }

 private:
  const int64_t total_;
  alignas(64) std::atomic<int64_t> count_{0};
  alignas(64) std::atomic<int64_t> phase_{0};
  std::atomic<bool> aborted_{false};
};

// Runs body(w0, w1) as the workers [w0, w1) of one parallel region of nw; an exception in one aborts the
// barrier for the others and reaches the caller (at::parallel_for rethrows it).
template <typename Body>
void in_region(int64_t nw, Barrier& barrier, Body body) {
  at::parallel_for(0, nw, 1, [&](int64_t w0, int64_t w1) {
    try {
      body(w0, w1);
    } catch (...) {
      barrier.abort();
      throw;
    }
  });
}

// Units [lo, hi) of worker chunk [w0, w1) of nw, in blocks of `width` units (the last block may be short).
struct Units {
  int64_t block_lo, block_hi, lo, hi;
  Units(int64_t w0, int64_t w1, int64_t nw, int64_t H, int64_t width) {
    const int64_t blocks = (H + width - 1) / width;
    block_lo = w0 * blocks / nw;
    block_hi = w1 * blocks / nw;
    lo = std::min(H, block_lo * width);
    hi = std::min(H, block_hi * width);
  }
};

#if defined(__AVX512F__)
// C (MR rows, ldc) (+)= A (MR rows, lda; K columns) · panel (K x NG·16), column group g of the tile
// landing at C + g·gs; mask[g] marks the group's columns that exist (a short last block).
template <int NG, int MR>
__attribute__((always_inline)) inline void tile(const float* __restrict A, int64_t lda, const float* __restrict P,
                                                int64_t K, float* C, int64_t ldc, int64_t gs, const __mmask16* mask,
                                                bool accumulate) {
  __m512 acc[MR][NG];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int g = 0; g < NG; ++g)
      acc[r][g] = accumulate ? _mm512_maskz_loadu_ps(mask[g], C + r * ldc + g * gs) : _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[NG];
#pragma GCC unroll 4
    for (int g = 0; g < NG; ++g) b[g] = _mm512_loadu_ps(P + (k * NG + g) * 16);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + k]);
#pragma GCC unroll 4
      for (int g = 0; g < NG; ++g) acc[r][g] = _mm512_fmadd_ps(a, b[g], acc[r][g]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int g = 0; g < NG; ++g) _mm512_mask_storeu_ps(C + r * ldc + g * gs, mask[g], acc[r][g]);
}

// The last M < MR rows: the tile of exactly M rows.
template <int NG, int MR>
inline void tile_rows(int64_t M, const float* A, int64_t lda, const float* P, int64_t K, float* C, int64_t ldc,
                      int64_t gs, const __mmask16* mask, bool accumulate) {
  if constexpr (MR > 0) {
    if (M == MR) return tile<NG, MR>(A, lda, P, K, C, ldc, gs, mask, accumulate);
    tile_rows<NG, MR - 1>(M, A, lda, P, K, C, ldc, gs, mask, accumulate);
  }
}

// The lane masks of a block's NG column groups when `valid` of its columns exist: the groups are gates
// of the same units (each holds the block's first `valid` lanes) or consecutive units (`consecutive`).
template <int NG>
void block_masks(int64_t valid, bool consecutive, __mmask16* mask) {
  for (int g = 0; g < NG; ++g) {
    const int64_t n = consecutive ? std::min<int64_t>(16, std::max<int64_t>(0, valid - 16 * g)) : valid;
    mask[g] = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u);
  }
}

// All M rows of one panel: C (M rows) (+)= A (M x K) · panel, group g at C + g·gs.
template <int NG, int MR>
__attribute__((noinline)) void panel_product(const float* A, int64_t lda, const float* P, int64_t K, float* C,
                                             int64_t ldc, int64_t gs, const __mmask16* mask, int64_t M,
                                             bool accumulate) {
  int64_t r = 0;
  for (; r + MR <= M; r += MR) tile<NG, MR>(A + r * lda, lda, P, K, C + r * ldc, ldc, gs, mask, accumulate);
  if (r < M) tile_rows<NG, MR - 1>(M - r, A + r * lda, lda, P, K, C + r * ldc, ldc, gs, mask, accumulate);
}
#endif

// Packs one block's panel: P[(k·NG + g)·16 + jj] = elem(k, g, col), col the column within the block
// (jj for gate groups, g·16 + jj for consecutive units), zero from `valid` on.
template <int NG, typename Elem>
void pack_panel(float* P, int64_t K, int64_t valid, bool consecutive, Elem elem) {
  for (int g = 0; g < NG; ++g)
    for (int64_t jj = 0; jj < 16; ++jj) {
      const int64_t col = consecutive ? g * 16 + jj : jj;
      for (int64_t k = 0; k < K; ++k) P[(k * NG + g) * 16 + jj] = col < valid ? elem(k, g, col) : 0.0f;
    }
}

// The forward time loop of a cell with NG blocks of H pre-activations per row (W_hh: NG·H x H,
// row-major), on gatelab's kernel; false (nothing done) where it does not run (not float32, not built,
// not chosen). Per step every worker adds the recurrent input rec(k) (B x H) times its units' rows of
// W_hh into out(t) (B x NG·H, onto what is there when `accumulate`), then runs rows(k, j0, n): the step's
// elementwise pass over every batch row on its units [j0, j0 + n), which writes rec(k + 1) there.
// rec(0) = state ⊙ M (the recurrent mask, if any), written by each worker for its units.
template <int NG, typename T, typename Out, typename Rec, typename Rows>
bool kernel_forward(const Loop& L, int64_t H, const T* W, const T* state, const T* M, Out out, bool accumulate, Rec rec,
                    Rows rows) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    if (!use_kernel<T>()) return false;
    constexpr int MR = std::min(24 / NG, 12);  // MR x NG accumulators + NG loads + 1 broadcast <= 32 registers
    const int64_t B = L.B, G = NG * H, blocks = (H + 15) / 16, panel = H * NG * 16, nw = kernel_workers(blocks);
    Tensor packed = at::empty({blocks * panel}, at::kFloat);
    float* Pk = packed.data_ptr<float>();
    Barrier barrier(nw);
    in_region(nw, barrier, [&](int64_t w0, int64_t w1) {
      const Units U(w0, w1, nw, H, 16);
      const int64_t n = U.hi - U.lo;
      for (int64_t u = U.block_lo; u < U.block_hi; ++u)  // the NG rows of W_hh of each unit 16u ... 16u + 15
        pack_panel<NG>(Pk + u * panel, H, std::min<int64_t>(16, H - 16 * u), false,
                       [&](int64_t k, int g, int64_t col) { return W[(g * H + 16 * u + col) * H + k]; });
      for (int64_t b = 0; b < B; ++b)
        write_rec(rec(0) + b * H + U.lo, state + b * H + U.lo, M ? M + b * H + U.lo : nullptr, n);
      for (int64_t k = 0; k < L.T; ++k) {
        if (!barrier.wait(w1 - w0)) return;  // every unit of this step's recurrent input is written
        float* C = out(L.step(k));
        for (int64_t u = U.block_lo; u < U.block_hi; ++u) {
          __mmask16 lanes[NG];
          block_masks<NG>(std::min<int64_t>(16, H - 16 * u), false, lanes);
          panel_product<NG, MR>(rec(k), H, Pk + u * panel, H, C + 16 * u, G, H, lanes, B, accumulate);
        }
        if (n > 0) rows(k, U.lo, n);
      }
    });
    return true;
  }
#endif
  return false;
}

// The backward time loop on gatelab's kernel (false where it does not run, as kernel_forward): per step
// (k = T-1 ... 0) every worker runs rows(k, j0, n, tmp) over every batch row on its units (dL/dZ there
// into dz(t), B x G, from dh; tmp holds B·n values), then, once all of dz(t) is written, adds dz(t) W_hh
// (W_hh: G x H) to dh (B x H) for its units, times the recurrent mask M.
template <typename T, typename DZ, typename Rows>
bool kernel_backward(const Loop& L, int64_t H, int64_t G, const T* W, T* dh, const T* M, DZ dz, Rows rows) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    if (!use_kernel<T>()) return false;
    const int64_t B = L.B, blocks = (H + 31) / 32, panel = G * 32, nw = kernel_workers(blocks);
    Tensor packed = at::empty({blocks * panel}, at::kFloat);
    Tensor tmps = at::empty({nw, B * H}, at::kFloat), masked = at::empty({M ? B : 0, H}, at::kFloat);  // dz W_hh, then ⊙ M
    float *Pk = packed.data_ptr<float>(), *tmp0 = tmps.data_ptr<float>(), *Dm = M ? masked.data_ptr<float>() : nullptr;
    Barrier barrier(nw);
    in_region(nw, barrier, [&](int64_t w0, int64_t w1) {
      const Units U(w0, w1, nw, H, 32);
      float* tmp = tmp0 + w0 * B * H;
      for (int64_t u = U.block_lo; u < U.block_hi; ++u)  // columns 32u ... 32u + 31 of W_hh
        pack_panel<2>(Pk + u * panel, G, std::min<int64_t>(32, H - 32 * u), true,
                      [&](int64_t k, int, int64_t col) { return W[k * H + 32 * u + col]; });
      for (int64_t k = L.T - 1; k >= 0; --k) {
        if (U.hi > U.lo) rows(k, U.lo, U.hi - U.lo, tmp);
        if (!barrier.wait(w1 - w0)) return;  // every unit of dz at this step is written
        const float* D = dz(L.step(k));
        for (int64_t u = U.block_lo; u < U.block_hi; ++u) {
          __mmask16 lanes[2];
          block_masks<2>(std::min<int64_t>(32, H - 32 * u), true, lanes);
          panel_product<2, 12>(D, G, Pk + u * panel, G, (M ? Dm : dh) + 32 * u, H, 16, lanes, B, !M);
        }
        if (M)
          for (int64_t b = 0; b < B; ++b)
            for (int64_t j = U.lo; j < U.hi; ++j) dh[b * H + j] += Dm[b * H + j] * M[b * H + j];
      }
    });
    return true;
  }
#endif
  return false;
}


// ---------------------------------------------------------------------------------------------
// One batch row of an LSTM step (H units), shared by the plain and the layer-norm loops. Gate order
// i, f, g, o; `a` holds the five activation parameters (sigma_i, sigma_f, phi, sigma_o, psi).

template <typename T>
inline void lstm_gates_forward(at::IntArrayRef kinds, const T* a, const T* zr, T* ar, int64_t H) {
  for (int64_t g = 0; g < 4; ++g) act_forward(kinds[g], a[g], zr + g * H, ar + g * H, H);
}

// c' = f c + i g.
template <typename T>
inline void lstm_cell_update(const T* ar, const T* c, T* cn, int64_t H, int64_t n) {
  SIMD for (int64_t j = 0; j < n; ++j) cn[j] = ar[H + j] * c[j] + ar[j] * ar[2 * H + j];
}

// h' = o k, then the state handed on: c <- m_c c + (1 - m_c) c', h <- m_h h + (1 - m_h) h' (no
// zoneout share: the update itself); the output is the new h.
template <typename T>
inline void lstm_hand_on(const T* ar, const T* k, const T* cn, const T* mh, const T* mc, T* c, T* h, T* out,
                         int64_t H, int64_t n) {
  SIMD for (int64_t j = 0; j < n; ++j) {
    const T hn = ar[3 * H + j] * k[j];
    c[j] = mc ? mc[j] * c[j] + (T(1) - mc[j]) * cn[j] : cn[j];
    out[j] = h[j] = mh ? mh[j] * h[j] + (T(1) - mh[j]) * hn : hn;
  }
}

// Backward of the output side: dL/dh after the step (dout + dh) -> dL/do into gr, dL/dk into dk;
// dh keeps the zoned-out share (the recurrent product adds the rest later).
template <typename T>
inline void lstm_output_backward(const T* dor, const T* mh, const T* ar, const T* k, T* dh, T* gr, T* dk, int64_t H,
                                 int64_t n) {
  SIMD for (int64_t j = 0; j < n; ++j) {
    T d = dor[j] + dh[j];
    dh[j] = T(0);
    if (mh) { dh[j] = d * mh[j]; d *= T(1) - mh[j]; }
    gr[3 * H + j] = d * k[j];
    dk[j] = d * ar[3 * H + j];
  }
}

// Backward of the cell update: dcc = dL/dc' through the output, dc = dL/dc after the step (becomes
// dL/dc before it) -> dL/di, dL/df, dL/dg into gr.
template <typename T>
inline void lstm_cell_backward(const T* dcc, const T* mc, const T* ar, const T* cprev, T* dc, T* gr, int64_t H,
                               int64_t n) {
  SIMD for (int64_t j = 0; j < n; ++j) {
    const T keep_c = mc ? mc[j] : T(0);
    const T dcn = dc[j] * (T(1) - keep_c) + dcc[j];
    gr[j] = dcn * ar[2 * H + j];
    gr[H + j] = dcn * cprev[j];
    gr[2 * H + j] = dcn * ar[j];
    dc[j] = dcn * ar[H + j] + dc[j] * keep_c;
  }
}

// Peepholes (P: w_ci, w_cf, w_co, each H; nullptr: none): i and f read the previous cell state c, o
// reads c' (`current`) or c.
template <typename T>
inline void lstm_peep_if(const T* P, const T* c, T* zr, int64_t H, int64_t n) {
  if (!P) return;
  SIMD for (int64_t j = 0; j < n; ++j) { zr[j] += P[j] * c[j]; zr[H + j] += P[H + j] * c[j]; }
}

template <typename T>
inline void lstm_peep_o(const T* P, const T* c, T* zr, int64_t H, int64_t n) {
  if (!P) return;
  SIMD for (int64_t j = 0; j < n; ++j) zr[3 * H + j] += P[2 * H + j] * c[j];
}

template <typename T>
inline void lstm_gates_backward(at::IntArrayRef kinds, const T* a, const T* zr, const T* ar, T* gr, int64_t H) {
  for (int64_t g = 0; g < 4; ++g)
    act_backward(kinds[g], a[g], zr ? zr + g * H : nullptr, ar + g * H, gr + g * H, gr + g * H, H);
}

// ---------------------------------------------------------------------------------------------
// LSTM, gates i, f, g, o; kinds/params: sigma_i, sigma_f, phi, sigma_o, psi.
// xw (T, B, 4H) holds W_ih x + b_ih + b_hh and is overwritten with the pre-activations Z, returned
// when save_z (some derivative needs its input). Saves A (activations), C (the cell's update c' of
// each step, held on dead steps), K = psi(C) and HR (recurrent inputs).
// Zoneout (zh, zc: (T, B, H) shares of the old value kept, or absent): the state after a step is
// m * old + (1 - m) * update, for h and c separately; then CP saves the zoned-out cell state of each
// step (the next step's c), which differs from C. Without zoneout CP is empty and C serves for both.

std::vector<Tensor> lstm_forward(const Tensor& xw, const Tensor& W_hh, const Tensor& h0, const Tensor& c0,
                                 const c10::optional<Tensor>& lengths, const c10::optional<Tensor>& mask,
                                 const c10::optional<Tensor>& zh, const c10::optional<Tensor>& zc,
                                 const c10::optional<Tensor>& peep, bool peep_current, at::IntArrayRef kinds, at::ArrayRef<double> params, bool reverse, bool save_z, bool train) {
  check_kinds(kinds);
  const Loop L = make_loop(xw, lengths, reverse);
  const int64_t H = c0.size(1), B = L.B, G = 4 * H;
  const Keep keep(L, train);
  const bool zone = zh.has_value() || zc.has_value();
  Tensor A = per_step(L, {keep.n, B, G}, xw.options());
  Tensor C = per_step(L, {keep.n, B, H}, c0.options()), K = per_step(L, C.sizes(), C.options()), out = at::empty({L.T, B, H}, c0.options());
  Tensor CP = zone && train ? per_step(L, C.sizes(), C.options()) : at::empty({0}, c0.options());
  Tensor HR = at::empty({keep.n_rec, B, H}, h0.options());
  Tensor h = h0.clone(), c = c0.clone();
  AT_DISPATCH_FLOATING_TYPES(xw.scalar_type(), "lstm_forward", [&] {
    using T = scalar_t;
    const T a[5] = {T(params[0]), T(params[1]), T(params[2]), T(params[3]), T(params[4])};
    T *Z = xw.data_ptr<T>(), *Ap = A.data_ptr<T>(), *Cp = C.data_ptr<T>(), *Kp = K.data_ptr<T>();
    T *Op = out.data_ptr<T>(), *HRp = HR.data_ptr<T>(), *cp = c.data_ptr<T>(), *hp = h.data_ptr<T>();
    T *CPp = CP.numel() ? CP.data_ptr<T>() : nullptr;
    const T *W = W_hh.data_ptr<T>(), *M = opt_ptr<T>(mask), *MH = opt_ptr<T>(zh), *MC = opt_ptr<T>(zc);
    const T* P = opt_ptr<T>(peep);
    // Batch row b of step t, units [j0, j0 + n), once Z holds the step's pre-activations there.
    auto row = [&](int64_t t, T* hr_next, int64_t b, int64_t j0, int64_t n) {
      const int64_t r = t * B + b, q = keep.at(t) * B + b;
      T *zr = Z + r * G + j0, *ar = Ap + q * G + j0, *cr = cp + b * H + j0, *hrow = hp + b * H + j0;
      T *Cr = Cp + q * H + j0, *Kr = Kp + q * H + j0, *orow = Op + r * H + j0;
      const T* Pj = P ? P + j0 : nullptr;
      if (L.live(t, b)) {
        lstm_peep_if(Pj, cr, zr, H, n);
        for (int64_t g = 0; g < 3; ++g) act_forward(kinds[g], a[g], zr + g * H, ar + g * H, n);
        lstm_cell_update(ar, cr, Cr, H, n);
        lstm_peep_o(Pj, peep_current ? Cr : cr, zr, H, n);
        act_forward(kinds[3], a[3], zr + 3 * H, ar + 3 * H, n);
        act_forward(kinds[4], a[4], Cr, Kr, n);
        lstm_hand_on(ar, Kr, Cr, MH ? MH + r * H + j0 : nullptr, MC ? MC + r * H + j0 : nullptr, cr, hrow, orow, H, n);
      } else {
        for (int64_t j = 0; j < n; ++j) { Cr[j] = cr[j]; orow[j] = T(0); }
      }
      if (CPp) for (int64_t j = 0; j < n; ++j) CPp[q * H + j0 + j] = cr[j];
      if (hr_next) write_rec(hr_next + b * H + j0, hrow, M ? M + b * H + j0 : nullptr, n);
    };
    // Every batch row of step t on units [j0, j0 + n) (the kernel's pass): with every row live, stage by
    // stage over all rows, one activation call per gate instead of one per row and gate.
    auto rows = [&](int64_t t, T* hr_next, int64_t j0, int64_t n) {
      if (L.len) {
        for (int64_t b = 0; b < B; ++b) row(t, hr_next, b, j0, n);
        return;
      }
      const int64_t r0 = t * B, q0 = keep.at(t) * B;
      T *Zt = Z + r0 * G + j0, *At = Ap + q0 * G + j0, *Ct = Cp + q0 * H + j0, *Kt = Kp + q0 * H + j0;
      const T* Pj = P ? P + j0 : nullptr;
      if (Pj) for (int64_t b = 0; b < B; ++b) lstm_peep_if(Pj, cp + b * H + j0, Zt + b * G, H, n);
      for (int64_t g = 0; g < 3; ++g) act_forward_rows(kinds[g], a[g], Zt + g * H, G, At + g * H, G, B, n);
      for (int64_t b = 0; b < B; ++b) lstm_cell_update(At + b * G, cp + b * H + j0, Ct + b * H, H, n);
      if (Pj)
        for (int64_t b = 0; b < B; ++b) lstm_peep_o(Pj, peep_current ? Ct + b * H : cp + b * H + j0, Zt + b * G, H, n);
      act_forward_rows(kinds[3], a[3], Zt + 3 * H, G, At + 3 * H, G, B, n);
      act_forward_rows(kinds[4], a[4], Ct, H, Kt, H, B, n);
      for (int64_t b = 0; b < B; ++b) {
        const int64_t r = r0 + b;
        T *cr = cp + b * H + j0, *hrow = hp + b * H + j0;
        lstm_hand_on(At + b * G, Kt + b * H, Ct + b * H, MH ? MH + r * H + j0 : nullptr,
                     MC ? MC + r * H + j0 : nullptr, cr, hrow, Op + r * H + j0, H, n);
        if (CPp) for (int64_t j = 0; j < n; ++j) CPp[(q0 + b) * H + j0 + j] = cr[j];
        if (hr_next) write_rec(hr_next + b * H + j0, hrow, M ? M + b * H + j0 : nullptr, n);
      }
    };
    auto hr_of = [&](int64_t k) { return k < L.T ? HRp + keep.rec(k) * B * H : nullptr; };
    if (kernel_forward<4>(L, H, W, hp, M, [&](int64_t t) { return Z + t * B * G; }, true, hr_of,
                          [&](int64_t k, int64_t j0, int64_t n) { rows(L.step(k), hr_of(k + 1), j0, n); }))
      return;
    write_rec(hr_of(0), hp, M, B * H);
    for (int64_t k = 0; k < L.T; ++k) {
      const int64_t t = L.step(k);
      times_Wt<T>(Z + t * B * G, hr_of(k), W, B, G, H, T(1));
      at::parallel_for(0, B, grain(G), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) row(t, hr_of(k + 1), b, 0, H);
      });
    }
  });
  return {out, h, c, save_z ? xw : at::empty({0}, xw.options()), A, C, K, HR, CP};
}

std::vector<Tensor> lstm_backward(const Tensor& dout, const Tensor& dhT, const Tensor& dcT, const Tensor& Z,
                                  const Tensor& A, const Tensor& C, const Tensor& K, const Tensor& CP,
                                  const Tensor& c0, const Tensor& W_hh, const c10::optional<Tensor>& lengths,
                                  const c10::optional<Tensor>& mask, const c10::optional<Tensor>& zh,
                                  const c10::optional<Tensor>& zc, const c10::optional<Tensor>& peep,
                                  bool peep_current, at::IntArrayRef kinds, at::ArrayRef<double> params,
                                  bool reverse) {
  check_kinds(kinds);
  const Loop L = make_loop(A, lengths, reverse);
  const int64_t H = c0.size(1), B = L.B, G = 4 * H;
  const bool zone = zh.has_value() || zc.has_value();
  TORCH_CHECK(!zone || CP.numel() == C.numel(), "gatelab fused: zoneout backward needs the zoned-out cell states");
  Tensor dZ = at::empty_like(A), dh = dhT.clone(), dc = dcT.clone();
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "lstm_backward", [&] {
    using T = scalar_t;
    const T a[5] = {T(params[0]), T(params[1]), T(params[2]), T(params[3]), T(params[4])};
    const T *Zp = Z.numel() ? Z.data_ptr<T>() : nullptr, *Ap = A.data_ptr<T>(), *Cp = C.data_ptr<T>();
    const T *Kp = K.data_ptr<T>(), *dOp = dout.data_ptr<T>(), *c0p = c0.data_ptr<T>();
    const T *W = W_hh.data_ptr<T>(), *M = opt_ptr<T>(mask), *MH = opt_ptr<T>(zh), *MC = opt_ptr<T>(zc);
    const T *Sp = zone ? CP.data_ptr<T>() : Cp;  // the cell state each step hands on
    const T* P = opt_ptr<T>(peep);
    T *dZp = dZ.data_ptr<T>(), *dhp = dh.data_ptr<T>(), *dcp = dc.data_ptr<T>();
    auto cprev_of = [&](int64_t k) { return k == 0 ? c0p : Sp + L.step(k - 1) * B * H; };
    // dL/dZ of batch row b at step t, units [j0, j0 + n), from dh and dc there; tmp holds n values.
    auto row = [&](int64_t t, const T* cprev, int64_t b, int64_t j0, int64_t n, T* tmp) {
      const int64_t r = t * B + b;
      const T *zr = Zp ? Zp + r * G + j0 : nullptr, *ar = Ap + r * G + j0, *Cr = Cp + r * H + j0;
      const T *Kr = Kp + r * H + j0, *cpr = cprev + b * H + j0, *dor = dOp + r * H + j0;
      T *gr = dZp + r * G + j0, *dhr = dhp + b * H + j0, *dcr = dcp + b * H + j0;
      if (!L.live(t, b)) {  // state passed through; nothing to differentiate
        for (int64_t g = 0; g < 4; ++g) for (int64_t j = 0; j < n; ++j) gr[g * H + j] = T(0);
        return;
      }
      lstm_output_backward(dor, MH ? MH + r * H + j0 : nullptr, ar, Kr, dhr, gr, tmp, H, n);
      act_backward(kinds[4], a[4], Cr, Kr, tmp, tmp, n);  // dL/dc' through psi
      // dL/dz_o now: with a peephole on c' it adds to dL/dc'
      act_backward(kinds[3], a[3], zr ? zr + 3 * H : nullptr, ar + 3 * H, gr + 3 * H, gr + 3 * H, n);
      if (P && peep_current) for (int64_t j = 0; j < n; ++j) tmp[j] += gr[3 * H + j] * P[2 * H + j0 + j];
      lstm_cell_backward(tmp, MC ? MC + r * H + j0 : nullptr, ar, cpr, dcr, gr, H, n);
      for (int64_t g = 0; g < 3; ++g)
        act_backward(kinds[g], a[g], zr ? zr + g * H : nullptr, ar + g * H, gr + g * H, gr + g * H, n);
      if (P) {  // i and f (and o, reading c) read the previous cell state
        for (int64_t j = 0; j < n; ++j) dcr[j] += gr[j] * P[j0 + j] + gr[H + j] * P[H + j0 + j];
        if (!peep_current) for (int64_t j = 0; j < n; ++j) dcr[j] += gr[3 * H + j] * P[2 * H + j0 + j];
      }
    };
    // Every batch row of step t on units [j0, j0 + n) (the kernel's pass; tmp holds B·n values): with every
    // row live, stage by stage over all rows, one activation call per gate instead of one per row and gate.
    auto rows = [&](int64_t t, const T* cprev, int64_t j0, int64_t n, T* tmp) {
      if (L.len) {
        for (int64_t b = 0; b < B; ++b) row(t, cprev, b, j0, n, tmp);
        return;
      }
      const int64_t r0 = t * B;
      const T *Zt = Zp ? Zp + r0 * G + j0 : nullptr, *At = Ap + r0 * G + j0, *Ct = Cp + r0 * H + j0;
      const T* Kt = Kp + r0 * H + j0;
      T* gt = dZp + r0 * G + j0;
      for (int64_t b = 0; b < B; ++b)
        lstm_output_backward(dOp + (r0 + b) * H + j0, MH ? MH + (r0 + b) * H + j0 : nullptr, At + b * G, Kt + b * H,
                             dhp + b * H + j0, gt + b * G, tmp + b * n, H, n);
      act_backward_rows(kinds[4], a[4], Ct, H, Kt, H, tmp, n, tmp, n, B, n);  // dL/dc' through psi
      act_backward_rows(kinds[3], a[3], Zt ? Zt + 3 * H : nullptr, G, At + 3 * H, G, gt + 3 * H, G, gt + 3 * H, G, B, n);
      for (int64_t b = 0; b < B; ++b) {
        T *tb = tmp + b * n, *gb = gt + b * G;
        if (P && peep_current) for (int64_t j = 0; j < n; ++j) tb[j] += gb[3 * H + j] * P[2 * H + j0 + j];
        lstm_cell_backward(tb, MC ? MC + (r0 + b) * H + j0 : nullptr, At + b * G, cprev + b * H + j0, dcp + b * H + j0,
                           gb, H, n);
      }
      for (int64_t g = 0; g < 3; ++g)
        act_backward_rows(kinds[g], a[g], Zt ? Zt + g * H : nullptr, G, At + g * H, G, gt + g * H, G, gt + g * H, G, B,
                          n);
      if (P)
        for (int64_t b = 0; b < B; ++b) {
          const T* gb = gt + b * G;
          T* dcr = dcp + b * H + j0;
          for (int64_t j = 0; j < n; ++j) dcr[j] += gb[j] * P[j0 + j] + gb[H + j] * P[H + j0 + j];
          if (!peep_current) for (int64_t j = 0; j < n; ++j) dcr[j] += gb[3 * H + j] * P[2 * H + j0 + j];
        }
    };
    if (kernel_backward(L, H, G, W, dhp, M, [&](int64_t t) { return dZp + t * B * G; },
                        [&](int64_t k, int64_t j0, int64_t n, T* tmp) { rows(L.step(k), cprev_of(k), j0, n, tmp); }))
      return;
    std::vector<T> scratch;
    for (int64_t k = L.T - 1; k >= 0; --k) {
      const int64_t t = L.step(k);
      at::parallel_for(0, B, grain(G), [&](int64_t b0, int64_t b1) {
        std::vector<T> tmp(H);
        for (int64_t b = b0; b < b1; ++b) row(t, cprev_of(k), b, 0, H, tmp.data());
      });
      recurrent_grad<T>(dhp, dZp + t * B * G, W, M, scratch, B, G, H);
    }
  });
  return {dZ, dh, dc};
}

// ---------------------------------------------------------------------------------------------
// Layer-norm LSTM (Ba et al. 2016; LSTMCell(layer_norm=True)): pre = xw + LN(W_hh h_rec) * g_hh,
// with xw = LN(W_ih x) * g_ih + b_ih + b_hh from the caller (outside the loop, under autograd), and
// h' = o * psi(LN(c') * g_c + b_c); the state c' itself is not normalised. LN normalises a row with
// its mean and biased variance (+ eps), as torch's layer_norm. Besides A, C, K and HR the forward
// saves Y (psi's input), NH and RH (the normalised recurrent product and its 1/std per row), NC and
// RC (the same for c'); with zoneout (zh, zc as for lstm_forward) also CP. The backward returns
// dZ (= dL/dpre = dL/dxw), dGH (dL/d(W_hh h_rec), for the weight gradient and the recurrent
// product) and dY (dL/dY, for the gradients of g_c and b_c); the caller reduces the gain gradients
// from dZ * NH and dY * NC, so dead steps save zeros there.

// Row statistics accumulate in double (a float row of a few thousand values keeps full precision).
template <typename T>
inline void ln_row(const T* x, T* n, int64_t len, T eps, T& rstd) {
  double mean = 0, var = 0;
  for (int64_t j = 0; j < len; ++j) mean += x[j];
  mean /= double(len);
  for (int64_t j = 0; j < len; ++j) { const double d = x[j] - mean; var += d * d; }
  const double r = 1.0 / std::sqrt(var / double(len) + double(eps));
  rstd = T(r);
  for (int64_t j = 0; j < len; ++j) n[j] = T((x[j] - mean) * r);
}

// dx = rstd * (dn - mean(dn) - n * mean(dn * n)) for n = (x - mean) * rstd.
template <typename T>
inline void ln_row_backward(const T* dn, const T* n, T rstd, T* dx, int64_t len) {
  double m1 = 0, m2 = 0;
  for (int64_t j = 0; j < len; ++j) { m1 += dn[j]; m2 += double(dn[j]) * n[j]; }
  const T a = T(m1 / double(len)), c = T(m2 / double(len));
  for (int64_t j = 0; j < len; ++j) dx[j] = rstd * (dn[j] - a - n[j] * c);
}

std::vector<Tensor> lstm_ln_forward(const Tensor& xw, const Tensor& W_hh, const Tensor& h0, const Tensor& c0,
                                    const c10::optional<Tensor>& lengths, const c10::optional<Tensor>& mask,
                                    const c10::optional<Tensor>& zh, const c10::optional<Tensor>& zc,
                                    const Tensor& g_hh, const Tensor& g_c, const Tensor& b_c, double eps,
                                    at::IntArrayRef kinds, at::ArrayRef<double> params, bool reverse, bool save_z,
                                    bool train) {
  const Loop L = make_loop(xw, lengths, reverse);
  const int64_t H = c0.size(1), B = L.B, G = 4 * H;
  const Keep keep(L, train);
  const bool zone = zh.has_value() || zc.has_value();
  Tensor A = per_step(L, {keep.n, B, G}, xw.options()), NH = per_step(L, A.sizes(), A.options());
  Tensor C = per_step(L, {keep.n, B, H}, c0.options()), K = per_step(L, C.sizes(), C.options()), Y = per_step(L, C.sizes(), C.options());
  Tensor NC = per_step(L, C.sizes(), C.options());
  Tensor RH = per_step(L, {keep.n, B}, c0.options()), RC = per_step(L, RH.sizes(), RH.options());
  Tensor CP = zone && train ? per_step(L, C.sizes(), C.options()) : at::empty({0}, c0.options());  // zoned-out c, as lstm_forward
  Tensor out = at::empty({L.T, B, H}, c0.options()), HR = at::empty({keep.n_rec, B, H}, h0.options());
  Tensor GH = at::empty({B, G}, xw.options()), h = h0.clone(), c = c0.clone();
  AT_DISPATCH_FLOATING_TYPES(xw.scalar_type(), "lstm_ln_forward", [&] {
    using T = scalar_t;
    const T a[5] = {T(params[0]), T(params[1]), T(params[2]), T(params[3]), T(params[4])}, e = eps;
    T *Z = xw.data_ptr<T>(), *Ap = A.data_ptr<T>(), *Cp = C.data_ptr<T>(), *Kp = K.data_ptr<T>();
    T *Yp = Y.data_ptr<T>(), *NHp = NH.data_ptr<T>(), *NCp = NC.data_ptr<T>(), *RHp = RH.data_ptr<T>();
    T *RCp = RC.data_ptr<T>(), *Op = out.data_ptr<T>(), *HRp = HR.data_ptr<T>(), *GHp = GH.data_ptr<T>();
    T *cp = c.data_ptr<T>(), *hp = h.data_ptr<T>();
    const T *W = W_hh.data_ptr<T>(), *M = opt_ptr<T>(mask);
    const T *gh = g_hh.data_ptr<T>(), *gc = g_c.data_ptr<T>(), *bc = b_c.data_ptr<T>();
    const T *MH = opt_ptr<T>(zh), *MC = opt_ptr<T>(zc);
    T* CPp = CP.numel() ? CP.data_ptr<T>() : nullptr;
    write_rec(HRp + keep.rec(0) * B * H, hp, M, B * H);
    for (int64_t k = 0; k < L.T; ++k) {
      const int64_t t = L.step(k);
      const int64_t s = keep.at(t);
      T* hr_next = k + 1 < L.T ? HRp + keep.rec(k + 1) * B * H : nullptr;
      times_Wt<T>(GHp, HRp + keep.rec(k) * B * H, W, B, G, H, T(0));  // the raw recurrent product
      at::parallel_for(0, B, grain(G), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t r = t * B + b, q = s * B + b;
          T *zr = Z + r * G, *ar = Ap + q * G, *nh = NHp + q * G, *cr = cp + b * H, *hrow = hp + b * H;
          T *Cr = Cp + q * H, *Kr = Kp + q * H, *yr = Yp + q * H, *nc = NCp + q * H, *orow = Op + r * H;
          if (L.live(t, b)) {
            ln_row(GHp + b * G, nh, G, e, RHp[q]);
            for (int64_t j = 0; j < G; ++j) zr[j] += nh[j] * gh[j];
            lstm_gates_forward(kinds, a, zr, ar, H);
            lstm_cell_update(ar, cr, Cr, H, H);
            ln_row(Cr, nc, H, e, RCp[q]);
            for (int64_t j = 0; j < H; ++j) yr[j] = nc[j] * gc[j] + bc[j];
            act_forward(kinds[4], a[4], yr, Kr, H);
            lstm_hand_on(ar, Kr, Cr, MH ? MH + r * H : nullptr, MC ? MC + r * H : nullptr, cr, hrow, orow, H, H);
          } else {  // the caller reduces gain gradients over NH and NC: no stale memory on dead steps
            for (int64_t j = 0; j < H; ++j) { Cr[j] = cr[j]; orow[j] = T(0); nc[j] = T(0); }
            for (int64_t j = 0; j < G; ++j) nh[j] = T(0);
          }
          if (CPp) for (int64_t j = 0; j < H; ++j) CPp[q * H + j] = cr[j];
          if (hr_next) write_rec(hr_next + b * H, hrow, M ? M + b * H : nullptr, H);
        }
      });
    }
  });
  return {out, h, c, save_z ? xw : at::empty({0}, xw.options()), A, C, K, HR, Y, NH, RH, NC, RC, CP};
}

std::vector<Tensor> lstm_ln_backward(const Tensor& dout, const Tensor& dhT, const Tensor& dcT, const Tensor& Z,
                                     const Tensor& A, const Tensor& C, const Tensor& K, const Tensor& Y,
                                     const Tensor& NH, const Tensor& RH, const Tensor& NC, const Tensor& RC,
                                     const Tensor& CP, const Tensor& c0, const Tensor& W_hh, const Tensor& g_hh,
                                     const Tensor& g_c, const c10::optional<Tensor>& lengths,
                                     const c10::optional<Tensor>& mask, const c10::optional<Tensor>& zh,
                                     const c10::optional<Tensor>& zc, at::IntArrayRef kinds,
                                     at::ArrayRef<double> params, bool reverse) {
  const Loop L = make_loop(A, lengths, reverse);
  const int64_t H = c0.size(1), B = L.B, G = 4 * H;
  const bool zone = zh.has_value() || zc.has_value();
  TORCH_CHECK(!zone || CP.numel() == C.numel(), "gatelab fused: zoneout backward needs the zoned-out cell states");
  Tensor dZ = at::empty_like(A), dGH = at::empty_like(A), dY = at::empty_like(C), dh = dhT.clone(), dc = dcT.clone();
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "lstm_ln_backward", [&] {
    using T = scalar_t;
    const T a[5] = {T(params[0]), T(params[1]), T(params[2]), T(params[3]), T(params[4])};
    const T *Zp = Z.numel() ? Z.data_ptr<T>() : nullptr, *Ap = A.data_ptr<T>(), *Cp = C.data_ptr<T>();
    const T *Kp = K.data_ptr<T>(), *Yp = Y.data_ptr<T>(), *NHp = NH.data_ptr<T>(), *RHp = RH.data_ptr<T>();
    const T *NCp = NC.data_ptr<T>(), *RCp = RC.data_ptr<T>(), *dOp = dout.data_ptr<T>(), *c0p = c0.data_ptr<T>();
    const T *W = W_hh.data_ptr<T>(), *M = opt_ptr<T>(mask), *gh = g_hh.data_ptr<T>(), *gc = g_c.data_ptr<T>();
    T *dZp = dZ.data_ptr<T>(), *dGHp = dGH.data_ptr<T>(), *dYp = dY.data_ptr<T>();
    T *dhp = dh.data_ptr<T>(), *dcp = dc.data_ptr<T>();
    const T *MH = opt_ptr<T>(zh), *MC = opt_ptr<T>(zc), *Sp = zone ? CP.data_ptr<T>() : Cp;  // c handed on
    std::vector<T> scratch;
    for (int64_t k = L.T - 1; k >= 0; --k) {
      const int64_t t = L.step(k);
      const T* cprev = k == 0 ? c0p : Sp + L.step(k - 1) * B * H;
      at::parallel_for(0, B, grain(G), [&](int64_t b0, int64_t b1) {
        std::vector<T> tmp(G), tmp2(G);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t r = t * B + b;
          const T *zr = Zp ? Zp + r * G : nullptr, *ar = Ap + r * G, *Kr = Kp + r * H, *yr = Yp + r * H;
          const T *cpr = cprev + b * H, *dor = dOp + r * H, *nh = NHp + r * G, *nc = NCp + r * H;
          T *gr = dZp + r * G, *ggr = dGHp + r * G, *dyr = dYp + r * H, *dhr = dhp + b * H, *dcr = dcp + b * H;
          if (!L.live(t, b)) {  // state passed through; nothing to differentiate
            for (int64_t j = 0; j < G; ++j) gr[j] = ggr[j] = T(0);
            for (int64_t j = 0; j < H; ++j) dyr[j] = T(0);
            continue;
          }
          lstm_output_backward(dor, MH ? MH + r * H : nullptr, ar, Kr, dhr, gr, tmp.data(), H, H);
          act_backward(kinds[4], a[4], yr, Kr, tmp.data(), dyr, H);  // dL/dY
          for (int64_t j = 0; j < H; ++j) tmp2[j] = dyr[j] * gc[j];
          ln_row_backward(tmp2.data(), nc, RCp[r], tmp.data(), H);  // dL/dc' through the norm
          lstm_cell_backward(tmp.data(), MC ? MC + r * H : nullptr, ar, cpr, dcr, gr, H, H);
          lstm_gates_backward(kinds, a, zr, ar, gr, H);
          for (int64_t j = 0; j < G; ++j) tmp2[j] = gr[j] * gh[j];
          ln_row_backward(tmp2.data(), nh, RHp[r], ggr, G);    // dL/d(W_hh h_rec)
        }
      });
      recurrent_grad<T>(dhp, dGHp + t * B * G, W, M, scratch, B, G, H);
    }
  });
  return {dZ, dGH, dh, dc, dY};
}

// ---------------------------------------------------------------------------------------------
// GRU, reset-after; kinds/params: sigma_r, sigma_z, phi. xw = W_ih x + b_ih (T, B, 3H) is
// overwritten with the pre-activations (a_r, a_z, z_n); the recurrent product GH = W_hh h_rec + b_hh
// is kept apart because r multiplies its n block. Saves A = (r, z, n), GHn (the n block of GH),
// S (state after each step), HR. Zoneout (zh: (T, B, H) shares of the old h kept, or absent): the
// state after a step is m * old + (1 - m) * update; S and the output hold the zoned-out state.

std::vector<Tensor> gru_forward(const Tensor& xw, const Tensor& W_hh, const c10::optional<Tensor>& b_hh,
                                const Tensor& h0, const c10::optional<Tensor>& lengths,
                                const c10::optional<Tensor>& mask, const c10::optional<Tensor>& zh, at::IntArrayRef kinds,
                                at::ArrayRef<double> params, bool reverse, bool save_z, bool train) {
  check_kinds(kinds);
  const Loop L = make_loop(xw, lengths, reverse);
  const int64_t H = h0.size(1), B = L.B, G = 3 * H;
  const Keep keep(L, train);
  Tensor A = per_step(L, {keep.n, B, G}, xw.options()), GHn = per_step(L, {keep.n, B, H}, h0.options());
  Tensor S = per_step(L, GHn.sizes(), GHn.options()), out = at::empty({L.T, B, H}, h0.options()), HR = per_step(L, {keep.n_rec, B, H}, h0.options());
  Tensor gh = at::empty({B, G}, h0.options()), h = h0.clone();
  AT_DISPATCH_FLOATING_TYPES(xw.scalar_type(), "gru_forward", [&] {
    using T = scalar_t;
    const T ar_ = params[0], az_ = params[1], an_ = params[2];
    T *Z = xw.data_ptr<T>(), *Ap = A.data_ptr<T>(), *Np = GHn.data_ptr<T>(), *Sp = S.data_ptr<T>();
    T *Op = out.data_ptr<T>(), *HRp = HR.data_ptr<T>(), *hp = h.data_ptr<T>(), *ghp = gh.data_ptr<T>();
    const T *W = W_hh.data_ptr<T>(), *M = opt_ptr<T>(mask), *bh = opt_ptr<T>(b_hh), *MZ = opt_ptr<T>(zh);
    auto hr_of = [&](int64_t k) { return k < L.T ? HRp + keep.rec(k) * B * H : nullptr; };
    // Batch row b of step t, units [j0, j0 + n), once gh holds W_hh h_rec there.
    auto row = [&](int64_t t, T* hr_next, int64_t b, int64_t j0, int64_t n) {
      const int64_t r = t * B + b, q = keep.at(t) * B + b;
      T *ghr = ghp + b * G + j0, *zr = Z + r * G + j0, *arow = Ap + q * G + j0, *nr = Np + q * H + j0;
      T *hrow = hp + b * H + j0, *Sr = Sp + q * H + j0, *orow = Op + r * H + j0;
      if (L.live(t, b)) {
        if (bh)
          for (int64_t g = 0; g < 3; ++g) { SIMD for (int64_t j = 0; j < n; ++j) ghr[g * H + j] += bh[g * H + j0 + j]; }
        for (int64_t g = 0; g < 2; ++g) { SIMD for (int64_t j = 0; j < n; ++j) zr[g * H + j] += ghr[g * H + j]; }
        act_forward(kinds[0], ar_, zr, arow, n);
        act_forward(kinds[1], az_, zr + H, arow + H, n);
        SIMD for (int64_t j = 0; j < n; ++j) {
          nr[j] = ghr[2 * H + j];
          zr[2 * H + j] += arow[j] * nr[j];
        }
        act_forward(kinds[2], an_, zr + 2 * H, arow + 2 * H, n);
        const T* mz = MZ ? MZ + r * H + j0 : nullptr;
        SIMD for (int64_t j = 0; j < n; ++j) {
          const T z = arow[H + j], nn = arow[2 * H + j];
          const T hn = (T(1) - z) * nn + z * hrow[j];
          orow[j] = Sr[j] = hrow[j] = mz ? mz[j] * hrow[j] + (T(1) - mz[j]) * hn : hn;
        }
      } else {
        SIMD for (int64_t j = 0; j < n; ++j) { Sr[j] = hrow[j]; orow[j] = T(0); }
      }
      if (hr_next) write_rec(hr_next + b * H + j0, hrow, M ? M + b * H + j0 : nullptr, n);
    };
    if (kernel_forward<3>(L, H, W, hp, M, [&](int64_t) { return ghp; }, false, hr_of,
                          [&](int64_t k, int64_t j0, int64_t n) {
                            for (int64_t b = 0; b < B; ++b) row(L.step(k), hr_of(k + 1), b, j0, n);
                          }))
      return;
    write_rec(hr_of(0), hp, M, B * H);
    for (int64_t k = 0; k < L.T; ++k) {
      const int64_t t = L.step(k);
      times_Wt<T>(ghp, hr_of(k), W, B, G, H, T(0));
      at::parallel_for(0, B, grain(G), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) row(t, hr_of(k + 1), b, 0, H);
      });
    }
  });
  return {out, h, save_z ? xw : at::empty({0}, xw.options()), A, GHn, S, HR};
}

std::vector<Tensor> gru_backward(const Tensor& dout, const Tensor& dhT, const Tensor& Z, const Tensor& A,
                                 const Tensor& GHn, const Tensor& S, const Tensor& h0, const Tensor& W_hh,
                                 const c10::optional<Tensor>& lengths, const c10::optional<Tensor>& mask,
                                 const c10::optional<Tensor>& zh, at::IntArrayRef kinds, at::ArrayRef<double> params,
                                 bool reverse) {
  check_kinds(kinds);
  const Loop L = make_loop(A, lengths, reverse);
  const int64_t H = h0.size(1), B = L.B, G = 3 * H;
  Tensor dXW = at::empty_like(A), dGH = at::empty_like(A), dh = dhT.clone();
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "gru_backward", [&] {
    using T = scalar_t;
    const T ar_ = params[0], az_ = params[1], an_ = params[2];
    const T *Zp = Z.numel() ? Z.data_ptr<T>() : nullptr, *Ap = A.data_ptr<T>(), *Np = GHn.data_ptr<T>();
    const T *Sp = S.data_ptr<T>(), *dOp = dout.data_ptr<T>(), *h0p = h0.data_ptr<T>();
    const T *W = W_hh.data_ptr<T>(), *M = opt_ptr<T>(mask), *MZ = opt_ptr<T>(zh);
    T *gxp = dXW.data_ptr<T>(), *ghp = dGH.data_ptr<T>(), *dhp = dh.data_ptr<T>();
    auto hprev_of = [&](int64_t k) { return k == 0 ? h0p : Sp + L.step(k - 1) * B * H; };
    auto row = [&](int64_t t, const T* hprev, int64_t b, int64_t j0, int64_t n) {
      const int64_t r = t * B + b;
      const T *zr = Zp ? Zp + r * G + j0 : nullptr, *arow = Ap + r * G + j0, *nr = Np + r * H + j0;
      const T *hpr = hprev + b * H + j0, *dor = dOp + r * H + j0;
      T *gxr = gxp + r * G + j0, *ghr = ghp + r * G + j0, *dhr = dhp + b * H + j0;
      if (!L.live(t, b)) {
        for (int64_t g = 0; g < 3; ++g) { SIMD for (int64_t j = 0; j < n; ++j) gxr[g * H + j] = ghr[g * H + j] = T(0); }
        return;
      }
      const T* mz = MZ ? MZ + r * H + j0 : nullptr;
      SIMD for (int64_t j = 0; j < n; ++j) {
        const T z = arow[H + j], nn = arow[2 * H + j];
        T d = dor[j] + dhr[j], kept = T(0);  // dL/dh after the step (zoned out, if any)
        if (mz) { kept = d * mz[j]; d *= T(1) - mz[j]; }
        gxr[2 * H + j] = d * (T(1) - z);     // dL/dn
        gxr[H + j] = d * (hpr[j] - nn);      // dL/dz
        dhr[j] = d * z + kept;               // direct paths; the product adds the rest
      }
      act_backward(kinds[2], an_, zr ? zr + 2 * H : nullptr, arow + 2 * H, gxr + 2 * H, gxr + 2 * H, n);
      act_backward(kinds[1], az_, zr ? zr + H : nullptr, arow + H, gxr + H, gxr + H, n);
      SIMD for (int64_t j = 0; j < n; ++j) gxr[j] = gxr[2 * H + j] * nr[j];  // dL/dr
      act_backward(kinds[0], ar_, zr, arow, gxr, gxr, n);
      for (int64_t g = 0; g < 2; ++g) { SIMD for (int64_t j = 0; j < n; ++j) ghr[g * H + j] = gxr[g * H + j]; }
      SIMD for (int64_t j = 0; j < n; ++j) ghr[2 * H + j] = gxr[2 * H + j] * arow[j];
    };
    if (kernel_backward(L, H, G, W, dhp, M, [&](int64_t t) { return ghp + t * B * G; },
                        [&](int64_t k, int64_t j0, int64_t n, T*) {
                          for (int64_t b = 0; b < B; ++b) row(L.step(k), hprev_of(k), b, j0, n);
                        }))
      return;
    std::vector<T> scratch;
    for (int64_t k = L.T - 1; k >= 0; --k) {
      const int64_t t = L.step(k);
      at::parallel_for(0, B, grain(G), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) row(t, hprev_of(k), b, 0, H);
      });
      recurrent_grad<T>(dhp, ghp + t * B * G, W, M, scratch, B, G, H);
    }
  });
  return {dXW, dGH, dh};
}

// ---------------------------------------------------------------------------------------------
// Elman: h' = phi(xw + W_hh h_rec); xw (T, B, H) holds both biases and becomes the pre-activations.
// S saves the activations phi(.) of live steps; without zoneout and lengths it is the output itself.
// Zoneout (zh, or absent): the state and output are m * old + (1 - m) * phi(.).

std::vector<Tensor> elman_forward(const Tensor& xw, const Tensor& W_hh, const Tensor& h0,
                                  const c10::optional<Tensor>& lengths, const c10::optional<Tensor>& mask,
                                  const c10::optional<Tensor>& zh, int64_t kind, double param, bool reverse,
                                  bool save_z, bool train) {
  check_kinds({kind});
  const Loop L = make_loop(xw, lengths, reverse);
  const int64_t H = h0.size(1), B = L.B;
  const Keep keep(L, train);
  const bool zone = zh.has_value();
  Tensor out = at::empty_like(xw), HR = at::empty({keep.n_rec, B, H}, h0.options());
  Tensor S = !train ? at::empty({1, B, H}, h0.options()) : lengths.has_value() || zone ? at::empty_like(xw) : out;
  Tensor h = h0.clone();
  AT_DISPATCH_FLOATING_TYPES(xw.scalar_type(), "elman_forward", [&] {
    using T = scalar_t;
    const T a = param;
    T *Z = xw.data_ptr<T>(), *Sp = S.data_ptr<T>(), *Op = out.data_ptr<T>(), *HRp = HR.data_ptr<T>();
    T* hp = h.data_ptr<T>();
    const T *W = W_hh.data_ptr<T>(), *M = opt_ptr<T>(mask), *MZ = opt_ptr<T>(zh);
    auto hr_of = [&](int64_t k) { return k < L.T ? HRp + keep.rec(k) * B * H : nullptr; };
    auto row = [&](int64_t t, T* hr_next, int64_t b, int64_t j0, int64_t n) {
      const int64_t r = t * B + b;
      T *hrow = hp + b * H + j0, *Sr = Sp + (keep.at(t) * B + b) * H + j0, *orow = Op + r * H + j0;
      T* zr = Z + r * H + j0;
      if (L.live(t, b) && zone) {
        const T* mz = MZ + r * H + j0;
        act_forward(kind, a, zr, Sr, n);
        SIMD for (int64_t j = 0; j < n; ++j) orow[j] = hrow[j] = mz[j] * hrow[j] + (T(1) - mz[j]) * Sr[j];
      } else if (L.live(t, b)) {
        act_forward(kind, a, zr, hrow, n);
        SIMD for (int64_t j = 0; j < n; ++j) orow[j] = hrow[j];
        if (Sp != Op) { SIMD for (int64_t j = 0; j < n; ++j) Sr[j] = hrow[j]; }
      } else {
        SIMD for (int64_t j = 0; j < n; ++j) { Sr[j] = hrow[j]; orow[j] = T(0); }
      }
      if (hr_next) write_rec(hr_next + b * H + j0, hrow, M ? M + b * H + j0 : nullptr, n);
    };
    if (kernel_forward<1>(L, H, W, hp, M, [&](int64_t t) { return Z + t * B * H; }, true, hr_of,
                          [&](int64_t k, int64_t j0, int64_t n) {
                            for (int64_t b = 0; b < B; ++b) row(L.step(k), hr_of(k + 1), b, j0, n);
                          }))
      return;
    write_rec(hr_of(0), hp, M, B * H);
    for (int64_t k = 0; k < L.T; ++k) {
      const int64_t t = L.step(k);
      times_Wt<T>(Z + t * B * H, hr_of(k), W, B, H, H, T(1));
      at::parallel_for(0, B, grain(H), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) row(t, hr_of(k + 1), b, 0, H);
      });
    }
  });
  return {out, h, save_z ? xw : at::empty({0}, xw.options()), S, HR};
}

std::vector<Tensor> elman_backward(const Tensor& dout, const Tensor& dhT, const Tensor& Z, const Tensor& S,
                                   const Tensor& W_hh, const c10::optional<Tensor>& lengths,
                                   const c10::optional<Tensor>& mask, const c10::optional<Tensor>& zh, int64_t kind,
                                   double param, bool reverse) {
  check_kinds({kind});
  const Loop L = make_loop(S, lengths, reverse);
  const int64_t H = S.size(2), B = L.B;
  Tensor dZ = at::empty_like(S), dh = dhT.clone();
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "elman_backward", [&] {
    using T = scalar_t;
    const T a = param;
    const T *Zp = Z.numel() ? Z.data_ptr<T>() : nullptr, *Sp = S.data_ptr<T>(), *dOp = dout.data_ptr<T>();
    const T *W = W_hh.data_ptr<T>(), *M = opt_ptr<T>(mask), *MZ = opt_ptr<T>(zh);
    T *dZp = dZ.data_ptr<T>(), *dhp = dh.data_ptr<T>();
    auto row = [&](int64_t t, int64_t b, int64_t j0, int64_t n) {
      const int64_t r = t * B + b;
      T *gr = dZp + r * H + j0, *dhr = dhp + b * H + j0;
      const T* dor = dOp + r * H + j0;
      if (!L.live(t, b)) {
        SIMD for (int64_t j = 0; j < n; ++j) gr[j] = T(0);
        return;
      }
      if (MZ) {  // kept share -> old h; the rest -> through phi
        const T* mz = MZ + r * H + j0;
        SIMD for (int64_t j = 0; j < n; ++j) {
          const T d = dor[j] + dhr[j];
          gr[j] = d * (T(1) - mz[j]);
          dhr[j] = d * mz[j];
        }
      } else {
        SIMD for (int64_t j = 0; j < n; ++j) { gr[j] = dor[j] + dhr[j]; dhr[j] = T(0); }
      }
      act_backward(kind, a, Zp ? Zp + r * H + j0 : nullptr, Sp + r * H + j0, gr, gr, n);
    };
    if (kernel_backward(L, H, H, W, dhp, M, [&](int64_t t) { return dZp + t * B * H; },
                        [&](int64_t k, int64_t j0, int64_t n, T*) {
                          for (int64_t b = 0; b < B; ++b) row(L.step(k), b, j0, n);
                        }))
      return;
    std::vector<T> scratch;
    for (int64_t k = L.T - 1; k >= 0; --k) {
      const int64_t t = L.step(k);
      at::parallel_for(0, B, grain(H), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) row(t, b, 0, H);
      });
      recurrent_grad<T>(dhp, dZp + t * B * H, W, M, scratch, B, H, H);
    }
  });
  return {dZ, dh};
}

// ---------------------------------------------------------------------------------------------
// Gated state: blocks f, i, o, n; s' = f s + i n, y = o s'; the state s recurs. kinds/params:
// sigma_f, sigma_i, sigma_o, phi. xw becomes Z; saves A, S (state after each step), HR.
// Zoneout (zs, or absent): the state handed on is m * s + (1 - m) * s' while y still reads s'; then
// SN saves s' of each step (S the zoned-out state). Without zoneout SN is empty.

std::vector<Tensor> gated_state_forward(const Tensor& xw, const Tensor& W_hh, const Tensor& s0,
                                        const c10::optional<Tensor>& lengths, const c10::optional<Tensor>& mask,
                                        const c10::optional<Tensor>& zs, at::IntArrayRef kinds,
                                        at::ArrayRef<double> params, bool reverse, bool save_z, bool train) {
  check_kinds(kinds);
  const Loop L = make_loop(xw, lengths, reverse);
  const int64_t H = s0.size(1), B = L.B, G = 4 * H;
  const Keep keep(L, train);
  Tensor A = per_step(L, {keep.n, B, G}, xw.options());
  Tensor S = per_step(L, {keep.n, B, H}, s0.options()), out = at::empty({L.T, B, H}, s0.options());
  Tensor SN = zs.has_value() && train ? per_step(L, S.sizes(), S.options()) : at::empty({0}, s0.options());
  Tensor HR = at::empty({keep.n_rec, B, H}, s0.options());
  Tensor s = s0.clone();
  AT_DISPATCH_FLOATING_TYPES(xw.scalar_type(), "gated_state_forward", [&] {
    using T = scalar_t;
    T *Z = xw.data_ptr<T>(), *Ap = A.data_ptr<T>(), *Sp = S.data_ptr<T>(), *Op = out.data_ptr<T>();
    T *HRp = HR.data_ptr<T>(), *sp = s.data_ptr<T>(), *SNp = SN.numel() ? SN.data_ptr<T>() : nullptr;
    const T *W = W_hh.data_ptr<T>(), *M = opt_ptr<T>(mask), *MZ = opt_ptr<T>(zs);
    auto hr_of = [&](int64_t k) { return k < L.T ? HRp + keep.rec(k) * B * H : nullptr; };
    auto row = [&](int64_t t, T* hr_next, int64_t b, int64_t j0, int64_t n) {
      const int64_t r = t * B + b, q = keep.at(t) * B + b;
      T *zr = Z + r * G + j0, *ar = Ap + q * G + j0, *sr = sp + b * H + j0, *Sr = Sp + q * H + j0;
      T* orow = Op + r * H + j0;
      if (L.live(t, b)) {
        for (int64_t g = 0; g < 4; ++g) act_forward(kinds[g], T(params[g]), zr + g * H, ar + g * H, n);
        if (MZ) {
          const T* mz = MZ + r * H + j0;
          SIMD for (int64_t j = 0; j < n; ++j) {
            const T sn = ar[j] * sr[j] + ar[H + j] * ar[3 * H + j];
            orow[j] = ar[2 * H + j] * sn;
            Sr[j] = sr[j] = mz[j] * sr[j] + (T(1) - mz[j]) * sn;
            if (SNp) SNp[q * H + j0 + j] = sn;
          }
        } else {
          SIMD for (int64_t j = 0; j < n; ++j) {
            Sr[j] = sr[j] = ar[j] * sr[j] + ar[H + j] * ar[3 * H + j];
            orow[j] = ar[2 * H + j] * sr[j];
          }
        }
      } else {
        SIMD for (int64_t j = 0; j < n; ++j) { Sr[j] = sr[j]; orow[j] = T(0); }
      }
      if (hr_next) write_rec(hr_next + b * H + j0, sr, M ? M + b * H + j0 : nullptr, n);
    };
    if (kernel_forward<4>(L, H, W, sp, M, [&](int64_t t) { return Z + t * B * G; }, true, hr_of,
                          [&](int64_t k, int64_t j0, int64_t n) {
                            for (int64_t b = 0; b < B; ++b) row(L.step(k), hr_of(k + 1), b, j0, n);
                          }))
      return;
    write_rec(hr_of(0), sp, M, B * H);
    for (int64_t k = 0; k < L.T; ++k) {
      const int64_t t = L.step(k);
      times_Wt<T>(Z + t * B * G, hr_of(k), W, B, G, H, T(1));
      at::parallel_for(0, B, grain(G), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) row(t, hr_of(k + 1), b, 0, H);
      });
    }
  });
  return {out, s, save_z ? xw : at::empty({0}, xw.options()), A, S, HR, SN};
}

std::vector<Tensor> gated_state_backward(const Tensor& dout, const Tensor& dsT, const Tensor& Z, const Tensor& A,
                                         const Tensor& S, const Tensor& SN, const Tensor& s0, const Tensor& W_hh,
                                         const c10::optional<Tensor>& lengths, const c10::optional<Tensor>& mask,
                                         const c10::optional<Tensor>& zs, at::IntArrayRef kinds,
                                         at::ArrayRef<double> params, bool reverse) {
  check_kinds(kinds);
  const Loop L = make_loop(A, lengths, reverse);
  const int64_t H = s0.size(1), B = L.B, G = 4 * H;
  TORCH_CHECK(!zs.has_value() || SN.numel() == S.numel(), "gatelab fused: zoneout backward needs the states s'");
  Tensor dZ = at::empty_like(A), ds = dsT.clone();
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "gated_state_backward", [&] {
    using T = scalar_t;
    const T *Zp = Z.numel() ? Z.data_ptr<T>() : nullptr, *Ap = A.data_ptr<T>(), *Sp = S.data_ptr<T>();
    const T *dOp = dout.data_ptr<T>(), *s0p = s0.data_ptr<T>(), *W = W_hh.data_ptr<T>(), *M = opt_ptr<T>(mask);
    const T *MZ = opt_ptr<T>(zs), *SNp = MZ ? SN.data_ptr<T>() : Sp;  // s' of each step
    T *dZp = dZ.data_ptr<T>(), *dsp = ds.data_ptr<T>();
    auto sprev_of = [&](int64_t k) { return k == 0 ? s0p : Sp + L.step(k - 1) * B * H; };
    auto row = [&](int64_t t, const T* sprev, int64_t b, int64_t j0, int64_t n) {
      const int64_t r = t * B + b;
      const T *zr = Zp ? Zp + r * G + j0 : nullptr, *ar = Ap + r * G + j0, *Sr = SNp + r * H + j0;
      const T *spr = sprev + b * H + j0, *dor = dOp + r * H + j0, *mz = MZ ? MZ + r * H + j0 : nullptr;
      T *gr = dZp + r * G + j0, *dsr = dsp + b * H + j0;
      if (!L.live(t, b)) {
        for (int64_t g = 0; g < 4; ++g) { SIMD for (int64_t j = 0; j < n; ++j) gr[g * H + j] = T(0); }
        return;
      }
      SIMD for (int64_t j = 0; j < n; ++j) {
        const T keep_s = mz ? mz[j] : T(0);  // kept share of the handed-on state -> old s
        const T dst = dsr[j] * (T(1) - keep_s) + dor[j] * ar[2 * H + j];
        gr[2 * H + j] = dor[j] * Sr[j];      // dL/do
        gr[j] = dst * spr[j];                // dL/df
        gr[H + j] = dst * ar[3 * H + j];     // dL/di
        gr[3 * H + j] = dst * ar[H + j];     // dL/dn
        dsr[j] = dst * ar[j] + dsr[j] * keep_s;
      }
      for (int64_t g = 0; g < 4; ++g)
        act_backward(kinds[g], T(params[g]), zr ? zr + g * H : nullptr, ar + g * H, gr + g * H, gr + g * H, n);
    };
    if (kernel_backward(L, H, G, W, dsp, M, [&](int64_t t) { return dZp + t * B * G; },
                        [&](int64_t k, int64_t j0, int64_t n, T*) {
                          for (int64_t b = 0; b < B; ++b) row(L.step(k), sprev_of(k), b, j0, n);
                        }))
      return;
    std::vector<T> scratch;
    for (int64_t k = L.T - 1; k >= 0; --k) {
      const int64_t t = L.step(k);
      at::parallel_for(0, B, grain(G), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) row(t, sprev_of(k), b, 0, H);
      });
      recurrent_grad<T>(dsp, dZp + t * B * G, W, M, scratch, B, G, H);
    }
  });
  return {dZ, ds};
}

// The engine's large products (the input projection of all steps, the weight and input gradients after
// the loop): a (M×K) · b (K×N) [+ bias], any strides, through oneDNN where it wins (float32, large, N and K
// >= 256: 182-193 against MKL's 139-158 GFLOP/s here at the benchmark's shapes; no gain at 128), else ATen.
bool dense_onednn(int64_t M, int64_t N, int64_t K) { return N >= 256 && K >= 256 && use_onednn<float>(M, N, K); }

Tensor matmul(const Tensor& a, const Tensor& b, const c10::optional<Tensor>& bias) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "gatelab fused: matmul shapes ", a.sizes(), " ",
              b.sizes());
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  if (a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && a.device().is_cpu() && M > 0 &&
      dense_onednn(M, N, K)) {
    Tensor out = bias.has_value() ? bias->expand({M, N}).contiguous() : at::empty({M, N}, a.options());
    try {
      at::native::mkldnn_matmul(a, b, out, bias.has_value() ? 1.0f : 0.0f, 1.0f);
      return out;
    } catch (const c10::Error&) {
      onednn_broken = true;  // fall through to ATen
    }
  }
  return bias.has_value() ? at::addmm(*bias, a, b) : at::mm(a, b);
}

// set_gemm_library(0 auto, 1 BLAS, 2 oneDNN, 3 gatelab's kernel, 4 BLAS or oneDNN by size) -> the previous
// choice. gemm_library(m, n, k, dense, cell) -> what a float32 product of that shape runs on now: with
// `dense`, matmul's rule (the products before and after the loops); else a bare per-step product's
// (`cell` empty: BLAS or oneDNN by size) or the per-step product of a loop (`cell` names it: gatelab's
// kernel where it is built in and chosen; the layer-norm LSTM's product is a bare one).
int64_t set_gemm_library(int64_t choice) {
  TORCH_CHECK(choice >= GEMM_AUTO && choice <= GEMM_BY_SIZE,
              "gatelab fused: gemm library 0 (auto), 1 (BLAS), 2 (oneDNN), 3 (kernel) or 4 (BLAS/oneDNN by size), got ",
              choice);
  TORCH_CHECK(choice != GEMM_ONEDNN || onednn_available(), "gatelab fused: this torch exports no oneDNN matmul");
  TORCH_CHECK(choice != GEMM_KERNEL || kHaveKernel, "gatelab fused: the AVX-512 kernel is not built for this CPU");
  const int64_t previous = gemm_choice;
  gemm_choice = choice;
  return previous;
}

std::string gemm_library(int64_t m, int64_t n, int64_t k, bool dense, const std::string& cell) {
  TORCH_CHECK(cell.empty() || cell == "loop" || cell == "lstm" || cell == "gru" || cell == "rnn" || cell == "gated_state",
              "gatelab fused: gemm_library's cell is '' (a bare product), loop, lstm, gru, rnn or gated_state, got ", cell);
  if (!dense && !cell.empty() && use_kernel<float>()) return "AVX-512 kernel";
  return (dense ? dense_onednn(m, n, k) : use_onednn<float>(m, n, k)) ? "oneDNN" : "BLAS";
}

}  // namespace

TORCH_LIBRARY(gatelab_fused, m) {
  m.def("set_gemm_library(int choice) -> int", &set_gemm_library);
  m.def("gemm_library(int m, int n, int k, bool dense=False, str cell=\"\") -> str", &gemm_library);
  m.def("region_threads(int n) -> int", &region_threads);
  m.def("matmul(Tensor a, Tensor b, Tensor? bias) -> Tensor");
  m.def("lstm_forward(Tensor xw, Tensor W_hh, Tensor h0, Tensor c0, Tensor? lengths, Tensor? mask, Tensor? zh, Tensor? zc, Tensor? peep, bool peep_current, int[] kinds, float[] params, bool reverse, bool save_z, bool train) -> Tensor[]");
  m.def("lstm_backward(Tensor dout, Tensor dhT, Tensor dcT, Tensor Z, Tensor A, Tensor C, Tensor K, Tensor CP, Tensor c0, Tensor W_hh, Tensor? lengths, Tensor? mask, Tensor? zh, Tensor? zc, Tensor? peep, bool peep_current, int[] kinds, float[] params, bool reverse) -> Tensor[]");
  m.def("lstm_ln_forward(Tensor xw, Tensor W_hh, Tensor h0, Tensor c0, Tensor? lengths, Tensor? mask, Tensor? zh, Tensor? zc, Tensor g_hh, Tensor g_c, Tensor b_c, float eps, int[] kinds, float[] params, bool reverse, bool save_z, bool train) -> Tensor[]");
  m.def("lstm_ln_backward(Tensor dout, Tensor dhT, Tensor dcT, Tensor Z, Tensor A, Tensor C, Tensor K, Tensor Y, Tensor NH, Tensor RH, Tensor NC, Tensor RC, Tensor CP, Tensor c0, Tensor W_hh, Tensor g_hh, Tensor g_c, Tensor? lengths, Tensor? mask, Tensor? zh, Tensor? zc, int[] kinds, float[] params, bool reverse) -> Tensor[]");
  m.def("gru_forward(Tensor xw, Tensor W_hh, Tensor? b_hh, Tensor h0, Tensor? lengths, Tensor? mask, Tensor? zh, int[] kinds, float[] params, bool reverse, bool save_z, bool train) -> Tensor[]");
  m.def("gru_backward(Tensor dout, Tensor dhT, Tensor Z, Tensor A, Tensor GHn, Tensor S, Tensor h0, Tensor W_hh, Tensor? lengths, Tensor? mask, Tensor? zh, int[] kinds, float[] params, bool reverse) -> Tensor[]");
  m.def("elman_forward(Tensor xw, Tensor W_hh, Tensor h0, Tensor? lengths, Tensor? mask, Tensor? zh, int kind, float param, bool reverse, bool save_z, bool train) -> Tensor[]");
  m.def("elman_backward(Tensor dout, Tensor dhT, Tensor Z, Tensor S, Tensor W_hh, Tensor? lengths, Tensor? mask, Tensor? zh, int kind, float param, bool reverse) -> Tensor[]");
  m.def("gated_state_forward(Tensor xw, Tensor W_hh, Tensor s0, Tensor? lengths, Tensor? mask, Tensor? zs, int[] kinds, float[] params, bool reverse, bool save_z, bool train) -> Tensor[]");
  m.def("gated_state_backward(Tensor dout, Tensor dsT, Tensor Z, Tensor A, Tensor S, Tensor SN, Tensor s0, Tensor W_hh, Tensor? lengths, Tensor? mask, Tensor? zs, int[] kinds, float[] params, bool reverse) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(gatelab_fused, CPU, m) {
  m.impl("matmul", &matmul);
  m.impl("lstm_forward", &lstm_forward);
  m.impl("lstm_backward", &lstm_backward);
  m.impl("lstm_ln_forward", &lstm_ln_forward);
  m.impl("lstm_ln_backward", &lstm_ln_backward);
  m.impl("gru_forward", &gru_forward);
  m.impl("gru_backward", &gru_backward);
  m.impl("elman_forward", &elman_forward);
  m.impl("elman_backward", &elman_backward);
  m.impl("gated_state_forward", &gated_state_forward);
  m.impl("gated_state_backward", &gated_state_backward);
}
