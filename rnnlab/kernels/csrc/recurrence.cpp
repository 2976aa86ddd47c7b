// The time loops of rnnlab/kernels/fused.py's TanhRecurrence and GRURecurrence in compiled code
// (the same functions and gradients), and of nn.LSTM's recurrence; built and loaded by
// rnnlab/kernels/native.py (read its docstring first).
//
// Ops (registered below, called as torch.ops.rnnlab.*), float32 and float64 CPU tensors, weights
// as nn.RNN / nn.GRU / nn.LSTM keep them, w_hh (gates*hidden, hidden):
//   tanh_forward(g, h0, w_hh) -> hs                      hs = h_0 .. h_steps (steps+1, batch, hidden)
//   tanh_backward(d_out, d_last, hs, w_hh) -> (d_g, d_h0, d_w_hh)
//   gru_forward(gi, h0, w_hh, b_hh) -> (hs, gates)        gates (steps, batch, 4*hidden), per row:
//                                                         r_t, z_t, n_t and gh_n (n's recurrent
//                                                         product with its bias), for the backward
//   gru_backward(d_out, d_last, hs, gates, w_hh) -> (d_gi, d_h0, d_w_hh, d_b_hh)
//   lstm_forward(gi, h0, c0, w_hh) -> (hs, cs, gates)   nn.LSTM's recurrence; gi = x W_ih^T + both
//                                                         biases; cs = c_0 .. c_steps; gates
//                                                         (steps, batch, 5*hidden): i, f, g, o and
//                                                         tanh(c_t) per row
//   lstm_backward(d_out, d_last_h, d_last_c, hs, cs, gates, w_hh) -> (d_gi, d_h0, d_c0, d_w_hh)
//
// A step is one product by W_hh and one pass of plain loops over its (batch, hidden) elements for
// all the gates (forward) or all their gradients (backward), which the compiler vectorizes. The
// recurrent weight's gradient is one product over all steps at the end (ATen: MKL), or from a
// batch of kStepwiseGradBatch one per step in the loop, while its operands are in cache; the
// recurrent bias's gradient is summed in the gate passes.
//
// Two ways to run the loop:
//   - a *team* (batches up to kTeamMaxBatch, several threads): the hidden units split into one
//     slice per thread for the whole sequence, in one OpenMP region. Each thread keeps its slice
//     of W_hh laid out once for a register-blocked product kernel (`PackedRight`) and runs, 64
//     units at a time (float64: 32), its share of the step's product and at once the gates of
//     those units, while the product's output is in L1; one barrier per step (the next product
//     needs every unit). The backward runs step t-1's gate pass of a group of units right after
//     step t's product made their dL/dh_{t-1}.
//   - alone (larger batches, or one thread): ATen's product (MKL, on all threads), then the gate
//     pass, split by rows over threads when a step is large.
// A team is for small batches: alone, MKL's threads split each small product anew and lay the
// weight out anew at every call (docs/kernels.md).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <tuple>
#include <vector>

// The loops over a row's gates read and write several streams that never overlap; without this
// the compiler would need more run-time overlap checks than it makes, and not vectorize.
#if defined(__clang__)
#define RNNLAB_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define RNNLAB_IVDEP _Pragma("GCC ivdep")
#else
#define RNNLAB_IVDEP
#endif

namespace {

using at::Tensor;

// From this batch the recurrent weight's gradient is made step by step in the backward loop.
constexpr int64_t kStepwiseGradBatch = 256;
// A team gives each thread at least this many hidden units, and runs up to this batch.
constexpr int64_t kMinSliceUnits = 32;
constexpr int64_t kTeamMaxBatch = 64;
// A team member makes a step's product and gates this many panels of units at a time (of 1, 2, 4
// and 8 panels, 4 measured fastest).
constexpr int64_t kGroupPanels = 4;
static_assert(kTeamMaxBatch < kStepwiseGradBatch, "a team makes the weight's gradient at the end");
// Alone, a step's gate pass runs on several threads from this many elements (batch * hidden);
// below, starting the threads costs more than the pass.
constexpr int64_t kParallelElements = 32768;

// ---- sigmoid and tanh ---------------------------------------------------------------------------
// float: exp by Cephes' expf polynomial (about 1 ulp), written without branches or library calls
// so that the compiler vectorizes the gate loops; sigmoid(x) = 1 / (1 + exp(-x)),
// tanh(x) = 1 - 2 / (1 + exp(2x)) (absolute error ~1e-7, as the fused path's 2 sigmoid(2x) - 1).
// Beyond exp's float range the argument is clamped: sigmoid saturates to 0 or 1, tanh to -1 or 1;
// NaN stays NaN.
// double: the C library's functions (the tests' precision; speed is float32's business).

inline float exp_f(float x) {
  // Written so that NaN passes through: a comparison with NaN is false, so NaN keeps x.
  // (`x < c ? x : c` would turn NaN into c, and a diverged model into a finite loss.)
  x = x > 88.3762626647949f ? 88.3762626647949f : x;
  x = x < -87.3365447505531f ? -87.3365447505531f : x;
  // k = round(x / ln 2) by adding and subtracting 1.5 * 2^23 (needs IEEE rounding: no fast-math)
  const float shifter = 12582912.0f;
  const float k = (x * 1.44269504088896341f + shifter) - shifter;
  float r = x - k * 0.693359375f;  // x - k ln 2, ln 2 in two parts (Cephes)
  r = r - k * -2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;  // 2^k, k in [-126, 127]
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

template <typename T>
struct Fn;

template <>
struct Fn<float> {
  static float sigmoid(float x) { return 1.0f / (1.0f + exp_f(-x)); }
  static float tanh(float x) { return 1.0f - 2.0f / (1.0f + exp_f(2.0f * x)); }
};

template <>
struct Fn<double> {
  static double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
  static double tanh(double x) { return std::tanh(x); }
};

// ---- the gate passes: one row, n hidden units ---------------------------------------------------
// Pointers point at the first unit; `s*` is the distance between a row's gate blocks (r, z, n):
// hidden for the (.., gates*hidden) tensors, less in a team's buffer of a product's output.

// tanh RNN forward: h = tanh(g + a), a = h_{t-1} W^T
template <typename T>
void tanh_units_forward(const T* g, const T* a, T* h, int64_t n) {
  RNNLAB_IVDEP
  for (int64_t j = 0; j < n; ++j) h[j] = Fn<T>::tanh(g[j] + a[j]);
}

// tanh RNN backward: d_pre = dh (1 - h^2); dh_prev = d_out_{t-1} (or 0), W's share added later
template <typename T>
void tanh_units_backward(const T* dh, const T* h, const T* d_out_prev, T* d_pre, T* dh_prev,
                         int64_t n) {
  RNNLAB_IVDEP
  for (int64_t j = 0; j < n; ++j) d_pre[j] = dh[j] * (T(1) - h[j] * h[j]);
  if (d_out_prev) {
    std::memcpy(dh_prev, d_out_prev, n * sizeof(T));
  } else {
    std::memset(dh_prev, 0, n * sizeof(T));
  }
}

// GRU forward: gh = h_{t-1} W_hh^T without its bias -> gates (r, z, n, gh_n + b_n) and h_t.
template <typename T>
void gru_units_forward(const T* gi, int64_t s_gi, const T* gh, int64_t s_gh, const T* b,
                       int64_t s_b, const T* h_prev, T* gates, int64_t s_gates, T* h, int64_t n) {
  const T *gi_r = gi, *gi_z = gi + s_gi, *gi_n = gi + 2 * s_gi;
  const T *gh_r = gh, *gh_z = gh + s_gh, *gh_n = gh + 2 * s_gh;
  const T *b_r = b, *b_z = b + s_b, *b_n = b + 2 * s_b;
  T *r_ = gates, *z_ = gates + s_gates, *n_ = gates + 2 * s_gates, *ghn_ = gates + 3 * s_gates;
  RNNLAB_IVDEP
  for (int64_t j = 0; j < n; ++j) {
    const T r = Fn<T>::sigmoid(gi_r[j] + gh_r[j] + b_r[j]);
    const T z = Fn<T>::sigmoid(gi_z[j] + gh_z[j] + b_z[j]);
    const T ghn = gh_n[j] + b_n[j];
    const T nn = Fn<T>::tanh(gi_n[j] + r * ghn);
    r_[j] = r;
    z_[j] = z;
    n_[j] = nn;
    ghn_[j] = ghn;
    h[j] = nn + z * (h_prev[j] - nn);  // (1 - z) n + z h_{t-1}
  }
}

// GRU backward: dh = dL/dh_t -> dL/d gi_t, dL/d gh_t (gh with its bias), adds the latter to db,
// and the part of dL/dh_{t-1} that does not go through W_hh: dh z_t + d_out_{t-1}. Strides:
// hidden for every (.., gates*hidden) tensor.
template <typename T>
void gru_units_backward(const T* dh, const T* gates, const T* h_prev, const T* d_out_prev,
                        T* d_gi, T* d_gh, T* db, T* dh_prev, int64_t H, int64_t n) {
  const T *r_ = gates, *z_ = gates + H, *n_ = gates + 2 * H, *ghn_ = gates + 3 * H;
  T *d_gi_r = d_gi, *d_gi_z = d_gi + H, *d_gi_n = d_gi + 2 * H;
  T *d_gh_r = d_gh, *d_gh_z = d_gh + H, *d_gh_n = d_gh + 2 * H;
  T *db_r = db, *db_z = db + H, *db_n = db + 2 * H;
  RNNLAB_IVDEP
  for (int64_t j = 0; j < n; ++j) {
    const T g = dh[j], r = r_[j], z = z_[j], nn = n_[j];
    const T d_an = g * (T(1) - z) * (T(1) - nn * nn);   // dL/d(n's pre-activation)
    const T d_ar = d_an * ghn_[j] * r * (T(1) - r);     // dL/d(r's pre-activation)
    const T d_az = g * (h_prev[j] - nn) * z * (T(1) - z);  // dL/d(z's pre-activation)
    const T d_ghn = d_an * r;
    d_gi_r[j] = d_ar;
    d_gi_z[j] = d_az;
    d_gi_n[j] = d_an;
    d_gh_r[j] = d_ar;
    d_gh_z[j] = d_az;
    d_gh_n[j] = d_ghn;
    db_r[j] += d_ar;
    db_z[j] += d_az;
    db_n[j] += d_ghn;
    dh_prev[j] = g * z;
  }
  if (d_out_prev) {
    RNNLAB_IVDEP
    for (int64_t j = 0; j < n; ++j) dh_prev[j] += d_out_prev[j];
  }
}

// LSTM forward: gh = h_{t-1} W_hh^T; gi holds x W_ih^T and both biases -> gates (i, f, g, o and
// tanh c_t, for the backward), c_t and h_t. Gate blocks as nn.LSTM stacks them: i, f, g, o.
template <typename T>
void lstm_units_forward(const T* gi, int64_t s_gi, const T* gh, int64_t s_gh, const T* c_prev,
                        T* gates, int64_t s_gates, T* c, T* h, int64_t n) {
  const T *gi_i = gi, *gi_f = gi + s_gi, *gi_g = gi + 2 * s_gi, *gi_o = gi + 3 * s_gi;
  const T *gh_i = gh, *gh_f = gh + s_gh, *gh_g = gh + 2 * s_gh, *gh_o = gh + 3 * s_gh;
  T *i_ = gates, *f_ = gates + s_gates, *g_ = gates + 2 * s_gates, *o_ = gates + 3 * s_gates,
    *tc_ = gates + 4 * s_gates;
  RNNLAB_IVDEP
  for (int64_t j = 0; j < n; ++j) {
    const T i = Fn<T>::sigmoid(gi_i[j] + gh_i[j]);
    const T f = Fn<T>::sigmoid(gi_f[j] + gh_f[j]);
    const T g = Fn<T>::tanh(gi_g[j] + gh_g[j]);
    const T o = Fn<T>::sigmoid(gi_o[j] + gh_o[j]);
    const T cc = f * c_prev[j] + i * g;
    const T tc = Fn<T>::tanh(cc);
    i_[j] = i;
    f_[j] = f;
    g_[j] = g;
    o_[j] = o;
    tc_[j] = tc;
    c[j] = cc;
    h[j] = o * tc;
  }
}

// LSTM backward: dh = dL/dh_t, dc = dL/dc_t from step t + 1, replaced in place by that part of
// dL/dc_{t-1} -> dL/d(i, f, g, o pre-activations) (the gradient of gi and of gh alike), and the
// part of dL/dh_{t-1} that does not go through W_hh: d_out_{t-1}. Strides: hidden.
template <typename T>
void lstm_units_backward(const T* dh, T* dc, const T* gates, const T* c_prev,
                         const T* d_out_prev, T* d_a, T* dh_prev, int64_t H, int64_t n) {
  const T *i_ = gates, *f_ = gates + H, *g_ = gates + 2 * H, *o_ = gates + 3 * H,
          *tc_ = gates + 4 * H;
  T *d_i = d_a, *d_f = d_a + H, *d_g = d_a + 2 * H, *d_o = d_a + 3 * H;
  RNNLAB_IVDEP
  for (int64_t j = 0; j < n; ++j) {
    const T i = i_[j], f = f_[j], g = g_[j], o = o_[j], tc = tc_[j], d = dh[j];
    const T d_c = dc[j] + d * o * (T(1) - tc * tc);  // dL/dc_t, all of it
    d_i[j] = d_c * g * i * (T(1) - i);
    d_f[j] = d_c * c_prev[j] * f * (T(1) - f);
    d_g[j] = d_c * i * (T(1) - g * g);
    d_o[j] = d * tc * o * (T(1) - o);
    dc[j] = d_c * f;
  }
  if (d_out_prev) {
    std::memcpy(dh_prev, d_out_prev, n * sizeof(T));
  } else {
    std::memset(dh_prev, 0, n * sizeof(T));
  }
}

// ---- teams --------------------------------------------------------------------------------------

// The hidden units split into `size` slices, one per thread; begin[k] .. begin[k + 1].
struct Team {
  int64_t size = 1;
  std::vector<int64_t> begin;
  int64_t u0(int64_t k) const { return begin[k]; }
  int64_t units(int64_t k) const { return begin[k + 1] - begin[k]; }
};

// A team for this shape, or a team of one (the loop runs alone).
Team plan_team(int64_t batch, int64_t hidden) {
  Team team;
#ifdef _OPENMP
  if (batch <= kTeamMaxBatch && !at::in_parallel_region()) {
    team.size = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                      hidden / kMinSliceUnits));
  }
#endif
  team.begin.resize(team.size + 1);
  for (int64_t k = 0; k <= team.size; ++k) {  // boundaries on multiples of 16 units (64 bytes)
    team.begin[k] = k == team.size ? hidden : (hidden * k / team.size + 8) / 16 * 16;
  }
  return team;
}

// The first exception of a team's threads, rethrown after the region (none may leave it).
class Errors {
 public:
  template <typename F>
  void run(const F& f) {
    if (failed_.load(std::memory_order_relaxed)) return;
    try {
      f();
    } catch (...) {
      if (!failed_.exchange(true)) error_ = std::current_exception();
    }
  }
  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::atomic<bool> failed_{false};
  std::exception_ptr error_;
};

// body(k, i) for i = 0 .. iterations-1 and every slice k, in one OpenMP region: thread j takes
// the slices j, j + threads, ... (all of them if the region got one thread); a barrier after each
// iteration. Only for teams of two or more (plan_team makes none without OpenMP).
template <typename F>
void run_team(const Team& team, int64_t iterations, const F& body) {
#ifdef _OPENMP
  Errors errors;
#pragma omp parallel
  {
    const int64_t threads = omp_get_num_threads(), tid = omp_get_thread_num();
    for (int64_t i = 0; i < iterations; ++i) {
      for (int64_t k = tid; k < team.size; k += threads) errors.run([&] { body(k, i); });
#pragma omp barrier
    }
  }
  errors.rethrow();
#else
  TORCH_CHECK(false, "rnnlab native: a team needs OpenMP");
#endif
}

// f(row_begin, row_end) over a step's rows when the loop runs alone: on several threads when
// the step is large enough.
template <typename F>
void over_rows(int64_t batch, int64_t hidden, const F& f) {
  if (batch * hidden >= kParallelElements && batch > 1) {
    const int64_t grain = std::max<int64_t>(1, kParallelElements / (4 * hidden));
    at::parallel_for(0, batch, grain, f);
  } else {
    f(0, batch);
  }
}

// ---- a team member's products -------------------------------------------------------------------
// A thread of a team multiplies by the same slice of W_hh at every step. MKL lays its right
// operand out anew at every call (as much memory traffic as the product itself at a batch of 32,
// and it pushes the slice out of the core's cache); here it is laid out once per sequence, in
// panels of kNR columns, k-major (zero-padded at the right edge), and a register-blocked kernel
// (up to kMR rows x kNR columns of sums in registers; plain vector extensions, GCC and Clang) runs
// over it, a few panels at a time, so that the caller can use each piece while it is in L1.

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(32), aligned(sizeof(T)), may_alias));  // unaligned
};

template <typename T>
class PackedRight {
 public:
  using V = typename Vec<T>::type;
  static constexpr int64_t kLanes = 32 / sizeof(T), kNR = 2 * kLanes, kMR = 6;

  // The right operand B (k x n); element (kk, j) is at(kk, j).
  template <typename At>
  void pack(int64_t k, int64_t n, const At& at) {
    k_ = k;
    n_ = n;
    panels_ = (n + kNR - 1) / kNR;
    data_.assign(panels_ * k * kNR, T(0));
    for (int64_t p = 0; p < panels_; ++p) {
      for (int64_t kk = 0; kk < k; ++kk) {
        T* row = data_.data() + (p * k + kk) * kNR;
        for (int64_t c = 0; c < kNR && p * kNR + c < n; ++c) row[c] = at(kk, p * kNR + c);
      }
    }
  }

  int64_t panels() const { return panels_; }

  // Columns of panels p0 .. p1-1 of C = A B (m x kNR each, row stride ldc, panel p at
  // c + (p - p0) kNR), or C += A B when accumulate; A (m x k, row stride lda).
  void multiply(int64_t m, const T* a, int64_t lda, T* c, int64_t ldc, bool accumulate,
                int64_t p0, int64_t p1) const {
    for (int64_t p = p0; p < p1; ++p) {
      const T* b = data_.data() + p * k_ * kNR;
      T* cp = c + (p - p0) * kNR;
      const int64_t cols = std::min(kNR, n_ - p * kNR);
      for (int64_t i = 0; i < m;) {
        // blocks of kMR rows; the last 7 or 8 as two of 4 and 3 or 4 (fewer than 4 rows keep
        // too few sums in flight to hide the multiply-add's latency)
        const int64_t left = m - i;
        const int64_t rows = left == 7 || left == 8 ? 4 : std::min(left, kMR);
        const T* ai = a + i * lda;
        T* ci = cp + i * ldc;
        switch (rows) {
          case 6: block<6>(ai, lda, b, ci, ldc, cols, accumulate); break;
          case 5: block<5>(ai, lda, b, ci, ldc, cols, accumulate); break;
          case 4: block<4>(ai, lda, b, ci, ldc, cols, accumulate); break;
          case 3: block<3>(ai, lda, b, ci, ldc, cols, accumulate); break;
          case 2: block<2>(ai, lda, b, ci, ldc, cols, accumulate); break;
          default: block<1>(ai, lda, b, ci, ldc, cols, accumulate); break;
        }
        i += rows;
      }
    }
  }

 private:
  // MR rows of A times one panel: MR x kNR sums in registers over all of k.
  template <int MR>
  void block(const T* a, int64_t lda, const T* b, T* c, int64_t ldc, int64_t cols,
             bool accumulate) const {
    V acc[MR][2];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = V{};
    for (int64_t kk = 0; kk < k_; ++kk) {
      const V b0 = *reinterpret_cast<const V*>(b + kk * kNR);
      const V b1 = *reinterpret_cast<const V*>(b + kk * kNR + kLanes);
      for (int r = 0; r < MR; ++r) {
        const T x = a[r * lda + kk];
        acc[r][0] += x * b0;
        acc[r][1] += x * b1;
      }
    }
    for (int r = 0; r < MR; ++r) {
      T* cr = c + r * ldc;
      if (cols == kNR) {
        V* c0 = reinterpret_cast<V*>(cr);
        V* c1 = reinterpret_cast<V*>(cr + kLanes);
        if (accumulate) {
          acc[r][0] += *c0;
          acc[r][1] += *c1;
        }
        *c0 = acc[r][0];
        *c1 = acc[r][1];
      } else {  // the right edge
        T out[kNR];
        std::memcpy(out, &acc[r][0], sizeof(V));
        std::memcpy(out + kLanes, &acc[r][1], sizeof(V));
        for (int64_t j = 0; j < cols; ++j) cr[j] = accumulate ? cr[j] + out[j] : out[j];
      }
    }
  }

  int64_t k_ = 0, n_ = 0, panels_ = 0;
  std::vector<T> data_;
};

// ---- checks -------------------------------------------------------------------------------------

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "rnnlab native: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "rnnlab native: ", name, " must be float32 or float64, got ", t.scalar_type());
}

void check_same(const Tensor& a, const Tensor& b, const char* name) {
  check_cpu(b, name);
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), "rnnlab native: ", name, " has dtype ",
              b.scalar_type(), ", expected ", a.scalar_type());
}

// ---- the time loops, for every cell --------------------------------------------------------------
// A step of each cell is one product, gh = h_{t-1} W_hh^T (gates*hidden wide, W_hh as nn.* keeps
// it), and one gate pass; its backward one gate pass and one product, dL/dh_{t-1} += d W_hh with d
// the gradient of gh. The loops below run those for any cell; the cell's gate passes come in as
// functions.

// The forward loop. units(t, row, u, gh, s_gh, m): step t's gate pass on row `row`, units
// u .. u+m-1, whose gh blocks (one per gate) are at gh, gh + s_gh, ...
// Alone: ATen's product of each step, then the gate pass over rows. In a team: each member's slice
// of W_hh laid out once, in groups of U units (the panels of every gate of those units side by
// side, zeros past the slice's last unit), each group's product and at once its gate pass.
template <typename T, typename Units>
void forward_loop(const Team& team, Tensor& hs, const Tensor& w, int64_t gates,
                  const Units& units) {
  const int64_t steps = hs.size(0) - 1, batch = hs.size(1), H = hs.size(2), plane = batch * H;
  const T* hp = hs.data_ptr<T>();  // h_t at hp + t * plane
  if (team.size == 1) {
    Tensor gh = at::empty({batch, gates * H}, hs.options());
    const T* ghp = gh.data_ptr<T>();
    for (int64_t t = 0; t < steps; ++t) {
      at::mm_out(gh, hs[t], w.t());
      over_rows(batch, H, [&](int64_t b0, int64_t b1) {
        for (int64_t row = b0; row < b1; ++row) units(t, row, 0, ghp + row * gates * H, H, H);
      });
    }
    return;
  }
  using Packed = PackedRight<T>;
  constexpr int64_t GP = kGroupPanels, U = GP * Packed::kNR;  // U units a group
  const T* wp = w.data_ptr<T>();
  std::vector<Packed> w_t(team.size);  // a slice's rows of W_hh, transposed, by groups
  std::vector<std::vector<T>> gh(team.size);  // a group's h_{t-1} W_hh^T: (batch, gates U)
  run_team(team, steps, [&](int64_t k, int64_t t) {
    const int64_t u0 = team.u0(k), n = team.units(k), groups = (n + U - 1) / U;
    if (t == 0) {
      w_t[k].pack(H, gates * U * groups, [&](int64_t kk, int64_t c) {
        const int64_t gate = c / U % gates, unit = c / (gates * U) * U + c % U;
        return unit < n ? wp[(gate * H + u0 + unit) * H + kk] : T(0);
      });
      gh[k].resize(batch * gates * U);
    }
    for (int64_t q = 0; q < groups; ++q) {
      w_t[k].multiply(batch, hp + t * plane, H, gh[k].data(), gates * U, false, gates * GP * q,
                      gates * GP * (q + 1));
      const int64_t u = u0 + q * U, m = std::min(U, n - q * U);
      for (int64_t row = 0; row < batch; ++row) {
        units(t, row, u, gh[k].data() + row * gates * U, U, m);
      }
    }
  });
}

// The backward loop, from the last step to the first. gate_pass(t, b0, b1, u, m): step t's gate
// pass on rows b0 .. b1-1, units u .. u+m-1; it reads dL/dh_t from dh[i % 2] and writes the part
// of dL/dh_{t-1} that does not go through W_hh to dh[(i + 1) % 2], i = steps - 1 - t, and the
// gradient of step t's gh to d_gh[t] (or to d_gh[0] when d_gh holds one step). The loop adds
// d_gh_t W_hh to dL/dh_{t-1}. -> W_hh's gradient: from a batch of kStepwiseGradBatch one product
// per step in the loop, while its operands are in cache, else one over all steps at the end.
// Alone: ATen's products. In a team: each member's columns of W_hh laid out once; iteration 0 is
// the last step's gate pass, iteration i > 0 step t = steps - i's product and, a group of units
// at a time, step t-1's gate pass of those units (their dL/dh_{t-1} is then complete).
template <typename T, typename Pass>
Tensor backward_loop(const Team& team, const Tensor& hs, const Tensor& w, const Tensor& d_gh,
                     Tensor (&dh)[2], const Pass& gate_pass) {
  const int64_t steps = hs.size(0) - 1, batch = hs.size(1), H = hs.size(2), plane = batch * H;
  const int64_t gates = w.size(0) / H;
  const bool stepwise = batch >= kStepwiseGradBatch, one_step = d_gh.size(0) == 1;
  TORCH_CHECK(stepwise || !one_step || steps == 1, "rnnlab native: d_gh of one step, stepwise");
  if (team.size == 1) {
    Tensor d_w = stepwise ? at::zeros({gates * H, H}, hs.options()) : Tensor();
    for (int64_t t = steps - 1; t >= 0; --t) {
      over_rows(batch, H, [&](int64_t b0, int64_t b1) { gate_pass(t, b0, b1, 0, H); });
      const Tensor d_gh_t = d_gh[one_step ? 0 : t];
      if (stepwise) d_w.addmm_(d_gh_t.t(), hs[t]);
      dh[(steps - t) % 2].addmm_(d_gh_t, w);  // dL/dh_{t-1} += dL/d gh_t W_hh
    }
    if (stepwise) return d_w;
  } else {
    using Packed = PackedRight<T>;
    const T* wp = w.data_ptr<T>();
    const T* dgp = d_gh.data_ptr<T>();  // step t's at dgp + gates * t * plane
    T* dhp[2] = {dh[0].data_ptr<T>(), dh[1].data_ptr<T>()};
    std::vector<Packed> w_cols(team.size);  // a slice's columns of W_hh: (gates*hidden, n)
    run_team(team, steps + 1, [&](int64_t k, int64_t i) {
      const int64_t u0 = team.u0(k), n = team.units(k);
      if (i == 0) {
        w_cols[k].pack(gates * H, n, [&](int64_t kk, int64_t j) { return wp[kk * H + u0 + j]; });
        gate_pass(steps - 1, 0, batch, u0, n);
        return;
      }
      const int64_t t = steps - i, U = kGroupPanels * Packed::kNR;
      for (int64_t p = 0; p < w_cols[k].panels(); p += kGroupPanels) {  // U units at a time
        const int64_t u = u0 + p * Packed::kNR, m = std::min(U, n - p * Packed::kNR);
        w_cols[k].multiply(batch, dgp + gates * t * plane, gates * H, dhp[i % 2] + u, H, true, p,
                           std::min(p + kGroupPanels, w_cols[k].panels()));
        if (t > 0) gate_pass(t - 1, 0, batch, u, m);
      }
    });
  }
  return at::mm(d_gh.view({steps * batch, gates * H}).t(),
                hs.narrow(0, 0, steps).reshape({steps * batch, H}));
}

// dL/dh_t, from the output and from step t + 1, in turns: step t's gate pass reads one and starts
// dL/dh_{t-1} in the other, step t's product finishes it; dL/dh_{-1} ends in dh[steps % 2].
void start_dh(Tensor (&dh)[2], const Tensor& d_out, const Tensor& d_last) {
  dh[0] = at::add(d_out[d_out.size(0) - 1], d_last);
  dh[1] = at::empty_like(dh[0]);
}

// ---- tanh RNN -----------------------------------------------------------------------------------

Tensor tanh_forward(const Tensor& g_, const Tensor& h0_, const Tensor& w_hh_) {
  check_cpu(g_, "g");
  check_same(g_, h0_, "h0");
  check_same(g_, w_hh_, "w_hh");
  TORCH_CHECK(g_.dim() == 3 && h0_.dim() == 2 && w_hh_.dim() == 2,
              "rnnlab native tanh_forward: g (steps, batch, hidden), h0 (batch, hidden), "
              "w_hh (hidden, hidden)");
  const int64_t steps = g_.size(0), batch = g_.size(1), hidden = g_.size(2);
  TORCH_CHECK(h0_.size(0) == batch && h0_.size(1) == hidden && w_hh_.size(0) == hidden &&
                  w_hh_.size(1) == hidden,
              "rnnlab native tanh_forward: shapes do not match: g ", g_.sizes(), ", h0 ",
              h0_.sizes(), ", w_hh ", w_hh_.sizes());
  const Tensor g = g_.contiguous(), w = w_hh_.contiguous();
  Tensor hs = at::empty({steps + 1, batch, hidden}, g.options());
  hs[0].copy_(h0_);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "rnnlab_tanh_forward", [&] {
    using T = scalar_t;
    const int64_t H = hidden, plane = batch * hidden;
    const T* gp = g.data_ptr<T>();
    T* hp = hs.data_ptr<T>();  // h_t at hp + t * plane
    forward_loop<T>(plan_team(batch, H), hs, w, 1,
                    [&](int64_t t, int64_t row, int64_t u, const T* a, int64_t, int64_t m) {
                      const int64_t o = row * H + u;
                      tanh_units_forward(gp + t * plane + o, a, hp + (t + 1) * plane + o, m);
                    });
  });
  return hs;
}

std::tuple<Tensor, Tensor, Tensor> tanh_backward(const Tensor& d_out_, const Tensor& d_last_,
                                                 const Tensor& hs, const Tensor& w_hh_) {
  check_cpu(hs, "hs");
  check_same(hs, d_out_, "d_out");
  check_same(hs, d_last_, "d_last");
  check_same(hs, w_hh_, "w_hh");
  TORCH_CHECK(hs.is_contiguous() && hs.dim() == 3, "rnnlab native: hs as tanh_forward made it");
  const int64_t steps = hs.size(0) - 1, batch = hs.size(1), hidden = hs.size(2);
  const Tensor d_out = d_out_.contiguous(), w = w_hh_.contiguous();
  TORCH_CHECK(d_out.sizes() == at::IntArrayRef({steps, batch, hidden}) &&
                  d_last_.sizes() == at::IntArrayRef({batch, hidden}) &&
                  w.sizes() == at::IntArrayRef({hidden, hidden}),
              "rnnlab native tanh_backward: shapes do not match");
  Tensor d_pre = at::empty({steps, batch, hidden}, hs.options());  // dL/da_t = dL/d gh_t
  Tensor dh[2], d_w;
  start_dh(dh, d_out, d_last_);
  AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "rnnlab_tanh_backward", [&] {
    using T = scalar_t;
    const int64_t H = hidden, plane = batch * hidden;
    const T* hp = hs.data_ptr<T>();  // h_t at hp + t * plane
    const T* dop = d_out.data_ptr<T>();
    T* dpp = d_pre.data_ptr<T>();
    T* dhp[2] = {dh[0].data_ptr<T>(), dh[1].data_ptr<T>()};
    d_w = backward_loop<T>(plan_team(batch, H), hs, w, d_pre, dh,
                           [&](int64_t t, int64_t b0, int64_t b1, int64_t u, int64_t m) {
      const int64_t i = steps - 1 - t;
      for (int64_t row = b0; row < b1; ++row) {
        const int64_t o = row * H + u;
        tanh_units_backward(dhp[i % 2] + o, hp + (t + 1) * plane + o,
                            t ? dop + (t - 1) * plane + o : nullptr, dpp + t * plane + o,
                            dhp[(i + 1) % 2] + o, m);
      }
    });
  });
  return {d_pre, dh[steps % 2], d_w};
}

// ---- GRU ----------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> gru_forward(const Tensor& gi_, const Tensor& h0_, const Tensor& w_hh_,
                                       const Tensor& b_hh_) {
  check_cpu(gi_, "gi");
  check_same(gi_, h0_, "h0");
  check_same(gi_, w_hh_, "w_hh");
  check_same(gi_, b_hh_, "b_hh");
  TORCH_CHECK(gi_.dim() == 3 && h0_.dim() == 2 && w_hh_.dim() == 2 && b_hh_.dim() == 1,
              "rnnlab native gru_forward: gi (steps, batch, 3*hidden), h0 (batch, hidden), "
              "w_hh (3*hidden, hidden), b_hh (3*hidden)");
  const int64_t steps = gi_.size(0), batch = h0_.size(0), hidden = h0_.size(1);
  TORCH_CHECK(gi_.size(1) == batch && gi_.size(2) == 3 * hidden && w_hh_.size(0) == 3 * hidden &&
                  w_hh_.size(1) == hidden && b_hh_.size(0) == 3 * hidden,
              "rnnlab native gru_forward: shapes do not match: gi ", gi_.sizes(), ", h0 ",
              h0_.sizes(), ", w_hh ", w_hh_.sizes(), ", b_hh ", b_hh_.sizes());
  const Tensor gi = gi_.contiguous(), w = w_hh_.contiguous(), b = b_hh_.contiguous();
  Tensor hs = at::empty({steps + 1, batch, hidden}, gi.options());
  hs[0].copy_(h0_);
  Tensor gates = at::empty({steps, batch, 4 * hidden}, gi.options());
  AT_DISPATCH_FLOATING_TYPES(gi.scalar_type(), "rnnlab_gru_forward", [&] {
    using T = scalar_t;
    const int64_t H = hidden, plane = batch * hidden;
    const T* gip = gi.data_ptr<T>();  // step t's gi at gip + 3 * t * plane
    const T* bp = b.data_ptr<T>();
    T* hp = hs.data_ptr<T>();  // h_t at hp + t * plane
    T* gp = gates.data_ptr<T>();  // step t's gates at gp + 4 * t * plane
    forward_loop<T>(plan_team(batch, H), hs, w, 3,
                    [&](int64_t t, int64_t row, int64_t u, const T* gh, int64_t s_gh, int64_t m) {
                      const int64_t o = row * H;
                      gru_units_forward(gip + 3 * (t * plane + o) + u, H, gh, s_gh, bp + u, H,
                                        hp + t * plane + o + u, gp + 4 * (t * plane + o) + u, H,
                                        hp + (t + 1) * plane + o + u, m);
                    });
  });
  return {hs, gates};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gru_backward(const Tensor& d_out_,
                                                        const Tensor& d_last_, const Tensor& hs,
                                                        const Tensor& gates,
                                                        const Tensor& w_hh_) {
  check_cpu(hs, "hs");
  check_same(hs, d_out_, "d_out");
  check_same(hs, d_last_, "d_last");
  check_same(hs, gates, "gates");
  check_same(hs, w_hh_, "w_hh");
  TORCH_CHECK(hs.is_contiguous() && gates.is_contiguous() && hs.dim() == 3 && gates.dim() == 3,
              "rnnlab native: hs, gates as gru_forward made them");
  const int64_t steps = gates.size(0), batch = hs.size(1), hidden = hs.size(2);
  const Tensor d_out = d_out_.contiguous(), w = w_hh_.contiguous();
  TORCH_CHECK(d_out.sizes() == at::IntArrayRef({steps, batch, hidden}) &&
                  d_last_.sizes() == at::IntArrayRef({batch, hidden}) &&
                  w.sizes() == at::IntArrayRef({3 * hidden, hidden}),
              "rnnlab native gru_backward: shapes do not match");
  const auto opt = hs.options();
  Tensor d_gi = at::empty({steps, batch, 3 * hidden}, opt);
  // dL/d gh_t (gh with its bias): r's and z's are d_gi's, n's r_t times d_gi's; of every step for
  // the all-steps weight gradient, of one step when stepwise
  const bool stepwise = batch >= kStepwiseGradBatch;
  Tensor d_gh = at::empty({stepwise ? 1 : steps, batch, 3 * hidden}, opt);
  Tensor dh[2], d_w;
  start_dh(dh, d_out, d_last_);
  const Team team = plan_team(batch, hidden);
  // db sums over rows; alone on several threads, one partial sum per thread
  const bool row_threads = team.size == 1 && batch * hidden >= kParallelElements;
  const int64_t parts = row_threads ? at::get_num_threads() : 1;
  Tensor db = at::zeros({parts, 3 * hidden}, opt);
  AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "rnnlab_gru_backward", [&] {
    using T = scalar_t;
    const int64_t H = hidden, plane = batch * hidden;
    const T* hp = hs.data_ptr<T>();  // h_t at hp + t * plane
    const T* gp = gates.data_ptr<T>();  // step t's gates at gp + 4 * t * plane
    const T* dop = d_out.data_ptr<T>();
    T* dgip = d_gi.data_ptr<T>();
    T* dghp = d_gh.data_ptr<T>();  // step t's at dghp + 3 * t * plane (stepwise: at dghp)
    T* dbp = db.data_ptr<T>();
    T* dhp[2] = {dh[0].data_ptr<T>(), dh[1].data_ptr<T>()};
    d_w = backward_loop<T>(team, hs, w, d_gh, dh,
                           [&](int64_t t, int64_t b0, int64_t b1, int64_t u, int64_t m) {
      const int64_t i = steps - 1 - t;
      const int64_t part = std::min<int64_t>(at::get_thread_num(), parts - 1);
      T* dght = dghp + (stepwise ? 0 : 3 * t * plane);
      for (int64_t row = b0; row < b1; ++row) {
        const int64_t o = row * H;
        gru_units_backward(dhp[i % 2] + o + u, gp + 4 * (t * plane + o) + u, hp + t * plane + o + u,
                           t ? dop + (t - 1) * plane + o + u : nullptr,
                           dgip + 3 * (t * plane + o) + u, dght + 3 * o + u,
                           dbp + part * 3 * H + u, dhp[(i + 1) % 2] + o + u, H, m);
      }
    });
  });
  return {d_gi, dh[steps % 2], d_w, parts == 1 ? db[0] : db.sum(0)};
}

// ---- LSTM ---------------------------------------------------------------------------------------
// As the GRU, with two states: c_t's gradient stays with its unit (no product), so a team member
// carries its units' dL/dc from step to step itself. Both biases are in gi (nn.LSTM adds them
// both to the same pre-activation), so dL/d gi is also dL/d gh.

std::tuple<Tensor, Tensor, Tensor> lstm_forward(const Tensor& gi_, const Tensor& h0_,
                                                const Tensor& c0_, const Tensor& w_hh_) {
  check_cpu(gi_, "gi");
  check_same(gi_, h0_, "h0");
  check_same(gi_, c0_, "c0");
  check_same(gi_, w_hh_, "w_hh");
  TORCH_CHECK(gi_.dim() == 3 && h0_.dim() == 2 && c0_.dim() == 2 && w_hh_.dim() == 2,
              "rnnlab native lstm_forward: gi (steps, batch, 4*hidden), h0 and c0 (batch, "
              "hidden), w_hh (4*hidden, hidden)");
  const int64_t steps = gi_.size(0), batch = h0_.size(0), hidden = h0_.size(1);
  TORCH_CHECK(gi_.size(1) == batch && gi_.size(2) == 4 * hidden && c0_.sizes() == h0_.sizes() &&
                  w_hh_.size(0) == 4 * hidden && w_hh_.size(1) == hidden,
              "rnnlab native lstm_forward: shapes do not match: gi ", gi_.sizes(), ", h0 ",
              h0_.sizes(), ", c0 ", c0_.sizes(), ", w_hh ", w_hh_.sizes());
  const Tensor gi = gi_.contiguous(), w = w_hh_.contiguous();
  Tensor hs = at::empty({steps + 1, batch, hidden}, gi.options());
  Tensor cs = at::empty({steps + 1, batch, hidden}, gi.options());
  hs[0].copy_(h0_);
  cs[0].copy_(c0_);
  Tensor gates = at::empty({steps, batch, 5 * hidden}, gi.options());
  AT_DISPATCH_FLOATING_TYPES(gi.scalar_type(), "rnnlab_lstm_forward", [&] {
    using T = scalar_t;
    const int64_t H = hidden, plane = batch * hidden;
    const T* gip = gi.data_ptr<T>();  // step t's gi at gip + 4 * t * plane
    T* hp = hs.data_ptr<T>();  // h_t at hp + t * plane
    T* cp = cs.data_ptr<T>();  // c_t at cp + t * plane
    T* gp = gates.data_ptr<T>();  // step t's gates at gp + 5 * t * plane
    forward_loop<T>(plan_team(batch, H), hs, w, 4,
                    [&](int64_t t, int64_t row, int64_t u, const T* gh, int64_t s_gh, int64_t m) {
                      const int64_t o = row * H;
                      lstm_units_forward(gip + 4 * (t * plane + o) + u, H, gh, s_gh,
                                         cp + t * plane + o + u, gp + 5 * (t * plane + o) + u, H,
                                         cp + (t + 1) * plane + o + u,
                                         hp + (t + 1) * plane + o + u, m);
                    });
  });
  return {hs, cs, gates};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_backward(
    const Tensor& d_out_, const Tensor& d_last_h_, const Tensor& d_last_c_, const Tensor& hs,
    const Tensor& cs, const Tensor& gates, const Tensor& w_hh_) {
  check_cpu(hs, "hs");
  check_same(hs, d_out_, "d_out");
  check_same(hs, d_last_h_, "d_last_h");
  check_same(hs, d_last_c_, "d_last_c");
  check_same(hs, cs, "cs");
  check_same(hs, gates, "gates");
  check_same(hs, w_hh_, "w_hh");
  TORCH_CHECK(hs.is_contiguous() && cs.is_contiguous() && gates.is_contiguous() &&
                  hs.dim() == 3 && cs.sizes() == hs.sizes() && gates.dim() == 3,
              "rnnlab native: hs, cs, gates as lstm_forward made them");
  const int64_t steps = gates.size(0), batch = hs.size(1), hidden = hs.size(2);
  const Tensor d_out = d_out_.contiguous(), w = w_hh_.contiguous();
  TORCH_CHECK(d_out.sizes() == at::IntArrayRef({steps, batch, hidden}) &&
                  d_last_h_.sizes() == at::IntArrayRef({batch, hidden}) &&
                  d_last_c_.sizes() == at::IntArrayRef({batch, hidden}) &&
                  w.sizes() == at::IntArrayRef({4 * hidden, hidden}),
              "rnnlab native lstm_backward: shapes do not match");
  Tensor d_a = at::empty({steps, batch, 4 * hidden}, hs.options());  // dL/d gi_t = dL/d gh_t
  Tensor dc = d_last_c_.contiguous().clone();  // dL/dc_t, each step's gate pass moves it to t-1
  Tensor dh[2], d_w;
  start_dh(dh, d_out, d_last_h_);
  AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "rnnlab_lstm_backward", [&] {
    using T = scalar_t;
    const int64_t H = hidden, plane = batch * hidden;
    const T* cp = cs.data_ptr<T>();  // c_t at cp + t * plane
    const T* gp = gates.data_ptr<T>();  // step t's gates at gp + 5 * t * plane
    const T* dop = d_out.data_ptr<T>();
    T* dap = d_a.data_ptr<T>();  // step t's at dap + 4 * t * plane
    T* dcp = dc.data_ptr<T>();
    T* dhp[2] = {dh[0].data_ptr<T>(), dh[1].data_ptr<T>()};
    d_w = backward_loop<T>(plan_team(batch, H), hs, w, d_a, dh,
                           [&](int64_t t, int64_t b0, int64_t b1, int64_t u, int64_t m) {
      const int64_t i = steps - 1 - t;
      for (int64_t row = b0; row < b1; ++row) {
        const int64_t o = row * H + u;
        lstm_units_backward(dhp[i % 2] + o, dcp + o, gp + 5 * (t * plane + row * H) + u,
                            cp + t * plane + o, t ? dop + (t - 1) * plane + o : nullptr,
                            dap + 4 * (t * plane + row * H) + u, dhp[(i + 1) % 2] + o, H, m);
      }
    });
  });
  return {d_a, dh[steps % 2], dc, d_w};
}

}  // namespace

TORCH_LIBRARY(rnnlab, m) {
  m.def("tanh_forward(Tensor g, Tensor h0, Tensor w_hh) -> Tensor");
  m.def("tanh_backward(Tensor d_out, Tensor d_last, Tensor hs, Tensor w_hh) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("gru_forward(Tensor gi, Tensor h0, Tensor w_hh, Tensor b_hh) -> (Tensor, Tensor)");
  m.def("gru_backward(Tensor d_out, Tensor d_last, Tensor hs, Tensor gates, Tensor w_hh) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("lstm_forward(Tensor gi, Tensor h0, Tensor c0, Tensor w_hh) -> (Tensor, Tensor, Tensor)");
  m.def("lstm_backward(Tensor d_out, Tensor d_last_h, Tensor d_last_c, Tensor hs, Tensor cs, "
        "Tensor gates, Tensor w_hh) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rnnlab, CPU, m) {
  m.impl("tanh_forward", &tanh_forward);
  m.impl("tanh_backward", &tanh_backward);
  m.impl("gru_forward", &gru_forward);
  m.impl("gru_backward", &gru_backward);
  m.impl("lstm_forward", &lstm_forward);
  m.impl("lstm_backward", &lstm_backward);
}
