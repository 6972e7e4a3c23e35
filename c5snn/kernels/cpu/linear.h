#pragma once

#include "attention.h"
#include "common.h"
#include "lif.h"
#include "weight_grad.h"

// oneDNN's matmul, as torch's own build carries it (the routine torch's addmm calls for bf16).
// Declared weak: a build of torch without it (or with another signature, hence another mangled
// name) leaves it null, and gemm() below runs torch's mm instead.
namespace at::native {
void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result,
                   float beta, float alpha) __attribute__((weak));
}  // namespace at::native

namespace {

bool onednn_available() { return at::native::mkldnn_matmul != nullptr; }

// Whether the linear_lif operators' sums are fused multiply-adds, as oneDNN's are.
bool fused_linear_available() {
#ifdef __FMA__
  return true;
#else
  return false;
#endif
}

// a @ b for 2-D fp32 a (M, K) and b (K, N), either possibly transposed (a strided view), with
// oneDNN where torch carries it (else torch's mm). oneDNN and MKL agree to rounding, not
// bitwise: the model's tests compare each path with the reference on the same library.
at::Tensor gemm(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0),
              "gemm needs a (M, K) and b (K, N)");
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && a.scalar_type() == at::kFloat &&
              b.scalar_type() == at::kFloat, "gemm takes float32 CPU tensors");
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  if (out.numel() == 0) return out;
  if (a.size(1) == 0) return out.zero_();
  if (onednn_available())
    at::native::mkldnn_matmul(a, b, out, 0.0f, 1.0f);
  else
    at::mm_out(out, a, b);
  return out;
}

// Linear maps with the LIF as their epilogue:
//   currents[t] (R, N) = x[t] (R, K) @ weightᵀ      summed in cache, never in memory
//   spikes[t] = LIF(currents[t] + bias)             lif_step / pair_step / lif_bits_step
// A thread takes kTileN rows of the R (fixed over time) and walks time: each step's currents of
// its rows are summed per output over K in K's order by fused multiply-adds from zero (how
// oneDNN's kernels sum them: bitwise its currents) and read there by the LIF's step. The input
// is the layer's input, or its uint8 copy (spike input of value `value`). Backward the same way
// round (linear_backward_rows): the LIF's backward step leaves dL/dcurrents in cache, where
// dL/dx = g @ W and the dL/dW sums are taken from it.
// project_tile over all n / 16 vectors of columns (n % 16 == 0), kN rows.
template <int kN>
void project_rows(float* c, const float* a, int64_t as, const float* g, int64_t n,
                  int64_t depth) {
  const int64_t vectors = n / 16;
  int64_t v = 0;
  for (; v + kTileV <= vectors; v += kTileV)
    project_tile<kN, kTileV>(c + 16 * v, n, a, as, g + 16 * v, n, depth);
  for (; v < vectors; ++v) project_tile<kN, 1>(c + 16 * v, n, a, as, g + 16 * v, n, depth);
}

// Currents of a (T, R, K) input's rows by a weight transposed, wt (K, N).
struct Projection {
  const float* x;      // (T, R, K) fp32, rows contiguous, or null with x8
  const uint8_t* x8;   // (T, R, K): 1 where the input is `value`, else 0
  float value;
  int64_t sx, k, n;    // time stride of x (elements; 0: constant over T), K, N
  const float* wt;     // (K, N)

  // currents (nr, N) of rows r0 .. r0 + nr (nr <= kTileN) at step t into out; rows holds
  // kTileN * K floats (the uint8 input's rows as floats)
  void currents(int64_t t, int64_t r0, int64_t nr, float* rows, float* out) const {
    const float* a = x ? x + t * sx + r0 * k : rows;
    if (!x) {
      const uint8_t* src = x8 + t * sx + r0 * k;
      for (int64_t j = 0; j < nr * k; ++j) rows[j] = static_cast<float>(src[j]) * value;
    }
    if (nr == kTileN) return project_rows<kTileN>(out, a, k, wt, n, k);
    if constexpr (kTileN > 5) if (nr == 5) return project_rows<5>(out, a, k, wt, n, k);
    if constexpr (kTileN > 4) if (nr == 4) return project_rows<4>(out, a, k, wt, n, k);
    if (nr == 3) return project_rows<3>(out, a, k, wt, n, k);
    if (nr == 2) return project_rows<2>(out, a, k, wt, n, k);
    if (nr == 1) return project_rows<1>(out, a, k, wt, n, k);
    TORCH_CHECK(false, "projection: bad row count");
  }

  // prefetch rows r0 .. r0 + nr of step t
  void prefetch(int64_t t, int64_t r0, int64_t nr) const {
    const int64_t row = t * sx + r0 * k;
    if (x8)
      for (int64_t j = 0; j < nr * k; j += 64) __builtin_prefetch(x8 + row + j);
    else
      for (int64_t j = 0; j < nr * k; j += 16) __builtin_prefetch(x + row + j);
  }
};

// The projection of a (T, ..., K) input x, or of its uint8 copy x8 (entries 0 or value), by
// weight (N, K): checked, time-major, with the weight transposed into wt (K, N), which must
// outlive it.
Projection projection(const at::Tensor& x, const std::optional<at::Tensor>& x8, double value,
                      const at::Tensor& weight_in, std::vector<float>& wt, int64_t rows) {
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.scalar_type() == at::kFloat &&
              weight_in.device().is_cpu() && weight_in.size(1) == x.size(-1) &&
              weight_in.size(0) % 16 == 0,
              "weight must be fp32 (N, K) with N a multiple of 16, K the input's last dimension");
  const at::Tensor weight = weight_in.contiguous();
  const int64_t k = x.size(-1), n = weight.size(0);
  const float* w = weight.data_ptr<float>();
  wt.resize(k * n);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t kk = 0; kk < k; ++kk) wt[kk * n + j] = w[j * k + kk];
  if (x8.has_value()) {
    TORCH_CHECK(x8->sizes() == x.sizes() && x8->scalar_type() == at::kByte && x8->is_contiguous(),
                "x8 must be x's contiguous uint8 copy");
    return {nullptr, x8->data_ptr<uint8_t>(), static_cast<float>(value), rows * k, k, n,
            wt.data()};
  }
  return {x.data_ptr<float>(), nullptr, 1.0f, time_stride(x, rows * k), k, n, wt.data()};
}

// lif_pair_forward of the currents x @ weightᵀ, in one pass: (y, its uint8 copy or undefined,
// membranes of LIF1, of LIF2).
template <bool kKeepMembranes, bool kBytes, bool kResidualBytes>
void linear_pair_rows(const Projection& proj, int64_t rows, const float* bias_p, const float* r,
                      const uint8_t* r8, int64_t sr, float* spikes, uint8_t* bytes, float* mem1,
                      float* mem2, float beta, int64_t steps) {
  const int64_t n = proj.n, neurons = rows * n;
  at::parallel_for(0, (rows + kTileN - 1) / kTileN, 4, [&](int64_t begin, int64_t end) {
    const int64_t size = kTileN * n;
    std::vector<float> u1(size), s1(size), u2(size), s2(size), bias(size), cur(size),
        in_rows(proj.k * kTileN);
    tile_bias(bias_p, n, 0, size, bias.data());
    for (int64_t block = begin; block < end; ++block) {
      const int64_t r0 = block * kTileN, nr = std::min<int64_t>(kTileN, rows - r0), i0 = r0 * n;
      for (int64_t t = 0; t < steps; ++t) {
        if (t + 1 < steps) {  // the next step's rows lie on other pages
          proj.prefetch(t + 1, r0, nr);
          if (sr != 0)
            for (int64_t j = 0; j < nr * n; j += kResidualBytes ? 64 : 16)
              __builtin_prefetch(kResidualBytes ? static_cast<const void*>(r8 + (t + 1) * sr + i0 + j)
                                                : static_cast<const void*>(r + (t + 1) * sr + i0 + j));
        }
        proj.currents(t, r0, nr, in_rows.data(), cur.data());
        for (int64_t p = 0; p < nr * n; p += kChunk) {
          const int64_t len = std::min(kChunk, nr * n - p), o = t * neurons + i0 + p;
          pair_step<kKeepMembranes, kBytes, kResidualBytes>(
              t, len, beta, cur.data() + p, bias.data() + p,
              kResidualBytes ? nullptr : r + t * sr + i0 + p,
              kResidualBytes ? r8 + t * sr + i0 + p : nullptr, u1.data() + p, s1.data() + p,
              u2.data() + p, s2.data() + p, spikes + o, kBytes ? bytes + o : nullptr,
              kKeepMembranes ? mem1 + o : nullptr, kKeepMembranes ? mem2 + o : nullptr);
        }
      }
    }
    stream_fence();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_lif_pair_forward(
    const at::Tensor& x_in, const std::optional<at::Tensor>& x8, double value,
    const at::Tensor& weight, const at::Tensor& bias_in, const at::Tensor& r_in,
    const std::optional<at::Tensor>& r8_in, double beta, bool keep, bool want_bytes) {
  check_input(x_in, "x");
  check_input(bias_in, "bias");
  const at::Tensor x = x8.has_value() ? x_in : time_major(x_in);
  const int64_t steps = x.size(0), n = weight.size(0);
  const int64_t rows = steps ? x.numel() / steps / x.size(-1) : 0;
  TORCH_CHECK(r_in.dim() == x.dim() && r_in.size(-1) == n && r_in.numel() == steps * rows * n,
              "residual must be (T, ..., N)");
  TORCH_CHECK(bias_in.dim() == 1 && bias_in.size(0) == n, "bias must be (N,)");
  const bool residual_bytes = r8_in.has_value();
  const at::Tensor r = residual_as_read(r_in, r8_in);
  const at::Tensor bias = bias_in.contiguous();
  auto [spikes, bytes, mem1, mem2] = pair_outputs(r_in.sizes(), r_in.options(), keep, want_bytes);
  if (spikes.numel() == 0) return {spikes, bytes, mem1, mem2};
  std::vector<float> wt;
  const Projection proj = projection(x, x8, value, weight, wt, rows);
  with_flag(keep, [&](auto k) {
    with_flag(want_bytes, [&](auto by) {
      with_flag(residual_bytes, [&](auto rb) {
        linear_pair_rows<decltype(k)::value, decltype(by)::value, decltype(rb)::value>(
            proj, rows, bias.data_ptr<float>(), residual_bytes ? nullptr : r.data_ptr<float>(),
            residual_bytes ? r.data_ptr<uint8_t>() : nullptr, time_stride(r, rows * n),
            spikes.data_ptr<float>(), want_bytes ? bytes.data_ptr<uint8_t>() : nullptr,
            keep ? mem1.data_ptr<float>() : nullptr, keep ? mem2.data_ptr<float>() : nullptr,
            static_cast<float>(beta), steps);
      });
    });
  });
  return {spikes, bytes, mem1, mem2};
}

// lif_forward of the currents x @ weightᵀ + bias, in one pass (the FFN's first layer: dropout
// and the uint8 copy in the same pass, as lif_forward's).
template <bool kKeepMembranes, bool kDrop, bool kBytes>
void linear_lif_rows(const Projection& proj, int64_t rows, const float* bias_p, float* spikes,
                     float* mem, uint8_t* bytes, float beta, int64_t steps, Dropout drop) {
  const int64_t n = proj.n, neurons = rows * n;
  at::parallel_for(0, (rows + kTileN - 1) / kTileN, 4, [&](int64_t begin, int64_t end) {
    const int64_t size = kTileN * n;
    std::vector<float> u(size), s(size), bias(size), cur(size), in_rows(proj.k * kTileN);
    int16_t draws[kChunk + 8];
    const Dropout dr = drop;  // a local copy: the stores below may not alias it
    tile_bias(bias_p, n, 0, size, bias.data());
    for (int64_t block = begin; block < end; ++block) {
      const int64_t r0 = block * kTileN, nr = std::min<int64_t>(kTileN, rows - r0), i0 = r0 * n;
      for (int64_t t = 0; t < steps; ++t) {
        if (t + 1 < steps) proj.prefetch(t + 1, r0, nr);  // on other pages
        proj.currents(t, r0, nr, in_rows.data(), cur.data());
        for (int64_t p = 0; p < nr * n; p += kChunk) {
          const int64_t len = std::min(kChunk, nr * n - p), o = t * neurons + i0 + p;
          lif_step_out_of_line<kBias, kKeepMembranes, kDrop, kBytes>(
              t, len, beta, cur.data() + p, bias.data() + p, u.data() + p, s.data() + p,
              spikes + o, kKeepMembranes ? mem + o : nullptr, kBytes ? bytes + o : nullptr,
              kDrop ? cut_draws(dr.seed, o, len, draws) : nullptr, dr);
        }
      }
    }
    stream_fence();
  });
}

// (spikes, membranes or undefined, uint8 copy or undefined) of LIF(x @ weightᵀ + bias), as
// lif_forward of the GEMM's currents gives them (dropped out with keep_mask's stream at seed).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_lif_forward(
    const at::Tensor& x_in, const std::optional<at::Tensor>& x8, double value,
    const at::Tensor& weight, const at::Tensor& bias_in, double beta, bool keep, bool dropping,
    int64_t seed, int64_t threshold, double factor, bool want_bytes) {
  check_input(x_in, "x");
  check_input(bias_in, "bias");
  const at::Tensor x = x8.has_value() ? x_in : time_major(x_in);
  const int64_t steps = x.size(0), n = weight.size(0);
  const int64_t rows = steps ? x.numel() / steps / x.size(-1) : 0;
  TORCH_CHECK(bias_in.dim() == 1 && bias_in.size(0) == n, "bias must be (N,)");
  const at::Tensor bias = bias_in.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor spikes = at::empty(shape, x_in.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor mem = keep ? at::empty_like(spikes) : at::Tensor();
  at::Tensor bytes = want_bytes ? at::empty_like(spikes, spikes.options().dtype(at::kByte))
                                : at::Tensor();
  if (spikes.numel() == 0) return {spikes, mem, bytes};
  std::vector<float> wt;
  const Projection proj = projection(x, x8, value, weight, wt, rows);
  const Dropout drop{static_cast<uint64_t>(seed), static_cast<int16_t>(threshold),
                     static_cast<float>(factor)};
  with_flag(keep, [&](auto k) {
    with_flag(dropping, [&](auto dr) {
      with_flag(want_bytes, [&](auto by) {
        linear_lif_rows<decltype(k)::value, decltype(dr)::value, decltype(by)::value>(
            proj, rows, bias.data_ptr<float>(), spikes.data_ptr<float>(),
            keep ? mem.data_ptr<float>() : nullptr,
            want_bytes ? bytes.data_ptr<uint8_t>() : nullptr, static_cast<float>(beta), steps,
            drop);
      });
    });
  });
  return {spikes, mem, bytes};
}

// lif_attention_forward of the currents x @ weightᵀ (the Q/K/V projection, summed in cache as
// linear_lif_forward sums them): (out, membranes or undefined, bits, keep mask).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_lif_attention_forward(
    const at::Tensor& x_in, const std::optional<at::Tensor>& x8, double value,
    const at::Tensor& weight, const at::Tensor& bias_in, double beta, bool keep_membranes,
    int64_t heads, double alpha, int64_t seed, int64_t threshold, bool dropping) {
  check_input(x_in, "x");
  check_input(bias_in, "bias");
  TORCH_CHECK(x_in.dim() == 4 && weight.dim() == 2 && weight.size(0) % 3 == 0,
              "x must be (T, B, W, K) and weight (3d, K)");
  const at::Tensor x = x8.has_value() ? x_in : time_major(x_in);
  const int64_t steps = x.size(0), batch = x.size(1), w = x.size(2), d3 = weight.size(0);
  const int64_t d = d3 / 3, rows = batch * w, neurons = rows * d3;
  TORCH_CHECK(bias_in.dim() == 1 && bias_in.size(0) == d3, "bias must be (3d,)");
  TORCH_CHECK(heads > 0 && d % heads == 0 && d / heads <= kMaxHead,
              "heads must divide d into heads of at most 64");
  const at::Tensor bias = bias_in.contiguous();
  const auto options = x_in.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor mem = keep_membranes ? at::empty({steps, batch, w, d3}, options) : at::Tensor();
  auto [out, bits, keep] = attention_outputs(steps * batch, w, d, heads, dropping, x_in.options());
  if (x.numel() == 0 || d3 == 0) return {out.view({steps, batch, w, d}), mem, bits, keep};
  std::vector<float> wt;
  const Projection proj = projection(x, x8, value, weight, wt, rows);
  auto* bp = reinterpret_cast<uint64_t*>(bits.data_ptr<int64_t>());
  const SpikeBits sb{bp, batch, w, d, heads, steps * batch};
  float* mp = keep_membranes ? mem.data_ptr<float>() : nullptr;
  const float b = static_cast<float>(beta);
  with_flag(keep_membranes, [&](auto k) {
    constexpr bool K = decltype(k)::value;
    at::parallel_for(0, (rows + kTileN - 1) / kTileN, 4, [&](int64_t begin, int64_t end) {
      const int64_t size = kTileN * d3;
      std::vector<float> u(size), s(size), bias_tile(size), cur(size), spikes(size),
          in_rows(proj.k * kTileN);
      tile_bias(bias.data_ptr<float>(), d3, 0, size, bias_tile.data());
      for (int64_t block = begin; block < end; ++block) {
        const int64_t r0 = block * kTileN, nr = std::min<int64_t>(kTileN, rows - r0);
        for (int64_t t = 0; t < steps; ++t) {
          if (t + 1 < steps) proj.prefetch(t + 1, r0, nr);  // on other pages
          proj.currents(t, r0, nr, in_rows.data(), cur.data());
          lif_bits_step<K>(t, r0, nr, b, cur.data(), bias_tile.data(), u.data(), s.data(),
                           spikes.data(), K ? mp + t * neurons : nullptr, sb);
        }
      }
      stream_fence();
    });
  });
  attention_tasks(bp, steps * batch, w, d, heads, static_cast<float>(alpha), dropping,
                  Dropout{static_cast<uint64_t>(seed), static_cast<int16_t>(threshold)},
                  out.data_ptr<float>(),
                  dropping ? reinterpret_cast<uint64_t*>(keep.data_ptr<int64_t>()) : nullptr);
  return {out.view({steps, batch, w, d}), mem, bits, keep};
}

// The fused backwards: the LIF's backward (lif_backward's or lif_pair_backward's arithmetic)
// and the linear map's two products from g = dL/dcurrents in cache, dL/dx = g @ W and
// dL/dW = gᵀ @ x. A thread takes kBackRows rows and walks time backwards; each step's g tile
// feeds dL/dx of its rows (project_tile, written out) and the thread's dL/dW sums (outer_tile,
// added over the tile's rows, then over the thread's tiles, then the threads in order).
constexpr int64_t kBackRows = 96;

// The linear map's part of a fused backward at step t, rows r0 .. r0 + nr: from g = dL/dcurrents
// (nr, N) in cache, dL/dx (nr, K) = g @ W written at those rows of dx, and dL/dWᵀ (K, N) += x
// (nr, K)ᵀ @ g into dw (the input's uint8 copy converted into xr; its value is applied to the
// final sums).
inline void linear_backward_tile(const Projection& proj, const float* w, int64_t t, int64_t r0,
                                 int64_t nr, int64_t rows, const float* g, float* dx, float* dw,
                                 float* xr) {
  const int64_t n = proj.n, k = proj.k;
  float* dxt = dx + (t * rows + r0) * k;
  int64_t i = 0;
  for (; i + kTileN <= nr; i += kTileN) project_rows<kTileN>(dxt + i * k, g + i * n, n, w, k, n);
  for (; i < nr; ++i) project_rows<1>(dxt + i * k, g + i * n, n, w, k, n);
  const float* xt = proj.x ? proj.x + t * proj.sx + r0 * k : xr;
  if (!proj.x) {
    const uint8_t* src = proj.x8 + t * proj.sx + r0 * k;
    for (int64_t j = 0; j < nr * k; ++j) xr[j] = static_cast<float>(src[j]);
  }
  for (int64_t c0 = 0; c0 < k; c0 += kTileN)
    outer_tile_any(static_cast<int>(std::min<int64_t>(kTileN, k - c0)), dw + c0 * n, n, xt + c0,
                   k, g, n, nr, nullptr);
}

// A fused backward's walk: each thread takes kBackRows rows at a time and walks time backwards;
// at each step `Walker::step` (the LIF's backward for these rows, a Walker per thread) gives
// dL/dcurrents in cache, and linear_backward_tile turns it into dL/dx and dL/dW sums. partial
// holds (threads, K, N) sums, added afterwards in thread order.
template <typename Walker, typename... Args>
void linear_backward_rows(const Projection& proj, const float* w, int64_t rows, int64_t steps,
                          float* dx, float* partial, Args&&... args) {
  const int64_t n = proj.n, k = proj.k;
  at::parallel_for(0, (rows + kBackRows - 1) / kBackRows, 1, [&](int64_t begin, int64_t end) {
    Walker walker(kBackRows * n, args...);
    std::vector<float> xr(kBackRows * k);
    float* dw = partial + at::get_thread_num() * k * n;
    for (int64_t block = begin; block < end; ++block) {
      const int64_t r0 = block * kBackRows, nr = std::min(kBackRows, rows - r0);
      walker.begin(r0 * n, nr * n);
      for (int64_t t = steps - 1; t >= 0; --t)
        linear_backward_tile(proj, w, t, r0, nr, rows, walker.step(t, t == steps - 1), dx, dw,
                             xr.data());
      walker.end();
    }
    stream_fence();
  });
}

// The layer's kept input as a Projection (rows of K, fp32 or uint8; no weight), checked.
Projection kept_input(const at::Tensor& x, int64_t steps, int64_t rows, int64_t n) {
  const bool bytes = x.scalar_type() == at::kByte;
  TORCH_CHECK(x.device().is_cpu() && (bytes || x.scalar_type() == at::kFloat) &&
              x.is_contiguous() && x.size(0) == steps && x.numel() == steps * rows * x.size(-1) &&
              x.size(-1) % 16 == 0,
              "x must be a contiguous float32 or uint8 (T, ..., K), K a multiple of 16");
  const int64_t k = x.size(-1);
  return {bytes ? nullptr : x.data_ptr<float>(), bytes ? x.data_ptr<uint8_t>() : nullptr, 1.0f,
          rows * k, k, n, nullptr};
}

// The linear map's side of a fused backward: checks, dL/dx (the input's shape, fp32), the
// threads' dL/dW and dL/dbias sums, and their folds at the end.
struct LinearGrads {
  at::Tensor weight, dx, grad_bias;
  Projection proj;
  int64_t threads, k, n;
  std::vector<float> partial, sums;

  // x: what the layer kept of its input (T, ..., K); its rows: `rows` per step; n: outputs
  LinearGrads(const at::Tensor& x, const at::Tensor& weight_in, int64_t steps, int64_t rows,
              int64_t n_, bool bias_grad, const at::TensorOptions& options)
      : weight(weight_in.contiguous()), threads(at::get_num_threads()), k(x.size(-1)), n(n_) {
    TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.size(0) == n &&
                weight.size(1) == k, "weight must be fp32 (N, K)");
    dx = at::empty(x.sizes(), options);  // fp32 either way
    grad_bias = bias_grad ? at::zeros({n}, options) : at::Tensor();
    if (x.numel() == 0) return;
    proj = kept_input(x, steps, rows, n);
    partial.assign(threads * k * n, 0.0f);
    sums.assign(bias_grad ? threads * n : 0, 0.0f);
  }
  const float* w() const { return weight.data_ptr<float>(); }
  float* sums_or_null() { return sums.empty() ? nullptr : sums.data(); }
  // (dL/dx, dL/dW, dL/dbias or undefined); dL/dW times the input's value
  std::tuple<at::Tensor, at::Tensor, at::Tensor> finish(double value) {
    if (partial.empty()) return {dx, at::zeros({n, k}, dx.options()), grad_bias};
    if (grad_bias.defined()) fold_thread_sums(sums, threads, n, grad_bias.data_ptr<float>());
    return {dx, fold_weight_grad(partial, threads, k, n, n, value, dx.options()), grad_bias};
  }
};

// (dL/dresidual, dL/dx, dL/dW, dL/dbias or undefined) of linear_lif_pair_forward from dL/dy, the
// membranes and what the layer kept of its input: x (fp32) or its uint8 copy (1 where the input
// is `value`).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_lif_pair_backward(
    const at::Tensor& grad_in, const at::Tensor& mem1, const at::Tensor& mem2, const at::Tensor& x,
    double value, const at::Tensor& weight, double beta, bool bias_grad) {
  const at::Tensor grad = pair_backward_grad(grad_in, mem1, mem2);
  const int64_t steps = mem1.size(0), n = mem1.size(-1);
  const int64_t rows = steps ? mem1.numel() / steps / n : 0;
  LinearGrads lin(x, weight, steps, rows, n, bias_grad, mem1.options());
  at::Tensor gsum = at::empty_like(mem1);
  if (mem1.numel() > 0)
    with_flag(bias_grad, [&](auto cs) {
      linear_backward_rows<PairBackward<decltype(cs)::value>>(
          lin.proj, lin.w(), rows, steps, lin.dx.data_ptr<float>(), lin.partial.data(),
          grad.data_ptr<float>(), mem1.data_ptr<float>(), mem2.data_ptr<float>(),
          gsum.data_ptr<float>(), static_cast<float>(beta), rows * n, n, lin.sums_or_null());
    });
  auto [dx, grad_w, grad_bias] = lin.finish(value);
  return {gsum, dx, grad_w, grad_bias};
}

// (dL/dx, dL/dW, dL/dbias or undefined) of linear_lif_forward from dL/d(spikes, dropped out),
// the membranes, the dropout's seed and what the layer kept of its input (as above).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_lif_backward(
    const at::Tensor& grad_in, const at::Tensor& mem, const at::Tensor& x, double value,
    const at::Tensor& weight, double beta, bool dropping, int64_t seed, int64_t threshold,
    double factor, bool bias_grad) {
  check_input(mem, "membranes");
  const at::Tensor grad = grad_in.contiguous();
  TORCH_CHECK(grad.sizes() == mem.sizes() && grad.scalar_type() == at::kFloat &&
              mem.is_contiguous(), "grad must be float32 with the membranes' shape");
  const int64_t steps = mem.size(0), n = mem.size(-1);
  const int64_t rows = steps ? mem.numel() / steps / n : 0;
  LinearGrads lin(x, weight, steps, rows, n, bias_grad, mem.options());
  const Dropout drop{static_cast<uint64_t>(seed), static_cast<int16_t>(threshold),
                     static_cast<float>(factor)};
  if (mem.numel() > 0)
    with_flag(dropping, [&](auto dr) {
      with_flag(bias_grad, [&](auto cs) {
        linear_backward_rows<LifBackward<decltype(dr)::value, decltype(cs)::value>>(
            lin.proj, lin.w(), rows, steps, lin.dx.data_ptr<float>(), lin.partial.data(),
            grad.data_ptr<float>(), mem.data_ptr<float>(), static_cast<float>(beta), drop,
            rows * n, n, lin.sums_or_null());
      });
    });
  return lin.finish(value);
}

// (dL/dx, dL/dW, dL/dbias or undefined) of linear_lif_attention_forward: lif_attention_backward's
// walk, each sequence's dL/dcurrents (W, 3d) turned into dL/dx and dL/dW sums while in cache
// (linear_backward_tile), as the other fused backwards.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_lif_attention_backward(
    const at::Tensor& grad_in, const at::Tensor& mem, const at::Tensor& bits,
    const at::Tensor& keep_bits, int64_t heads, double alpha, double beta, bool bias_grad,
    const at::Tensor& x, double value, const at::Tensor& weight) {
  const at::Tensor grad = grad_in.contiguous();
  const auto [steps, batch, w, d] = attention_backward_shapes(grad, mem, bits, heads);
  const int64_t rows = batch * w;
  LinearGrads lin(x, weight, steps, rows, 3 * d, bias_grad, mem.options());
  if (mem.numel() == 0) return lin.finish(value);
  std::vector<float> xr(lin.threads * w * lin.k);  // a thread's sequence of x as floats
  float* dxp = lin.dx.data_ptr<float>();
  lif_attention_backward_walk(
      grad.data_ptr<float>(), mem.data_ptr<float>(),
      reinterpret_cast<const uint64_t*>(bits.data_ptr<int64_t>()),
      keep_words(keep_bits, heads, steps * batch, w), steps, batch, w, d, heads,
      static_cast<float>(alpha), static_cast<float>(beta), lin.sums_or_null(),
      [&](int64_t t, int64_t seq, const float* g) {
        const int64_t thread = at::get_thread_num();
        linear_backward_tile(lin.proj, lin.w(), t, (seq - t * batch) * w, w, rows, g, dxp,
                             lin.partial.data() + thread * lin.k * lin.n,
                             xr.data() + thread * w * lin.k);
      });
  return lin.finish(value);
}


}  // namespace
