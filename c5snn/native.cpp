// c5snn's compiled CPU operators (loaded by c5snn/native.py): the LIF recurrence, the dropout
// keep mask and spike attention, each one pass over memory, fused where one's output was read
// only by the next (LIF pairs, the Q/K/V LIF with the attention), a linear layer's dL/dW, and,
// where oneDNN runs the GEMMs, the linear maps summed inside the LIF operators that read them,
// each way (see "Linear maps with the LIF as their epilogue" below). Built with OpenMP, so
// at::parallel_for runs on torch's threads (without it, ATen's inline parallel_for is a serial
// loop).
//
// LIF.
// The pure-torch recurrence (c5snn/lif.py) runs ~4 elementwise ops per time step over a
// (B, W, d) slice, so every step reads and writes the membranes from memory again. Here each
// thread owns a block of neurons and walks all T steps with the membranes in a small stack
// buffer: forward reads the currents once and writes spikes (and, for backward, membranes);
// backward reads dL/dS and the membranes once and writes dL/dX. Blocks of 1024 neurons (4 KB
// per time step and tensor) and stores that bypass the cache: these passes are memory-bound.
//
//   U[t] = beta * U[t-1] + X[t] - S[t-1]      S[t] = H(U[t] - 1)
//   dL/dU[t] = dL/dS[t] / (25|U[t]-1| + 1)^2 + beta * dL/dU[t+1]
//
// The forward's float operations are those of the torch path, in its order, and the build
// disables FMA contraction (-ffp-contract=off), so spikes and membranes are bitwise the torch
// path's. The backward agrees to rounding (torch's `add_(alpha=beta)` may fuse its multiply).
// Tensors are (T, M): M neurons, contiguous; the currents may be constant over T (T-stride 0,
// the first block's input) and may be the sum of two tensors (a residual, X = a + b) or carry
// the bias of the linear layer they come from (X = a + bias[column]; its gradient is summed in
// the backward's pass). The same pass may drop the spikes out (the FFN's dropout) and write
// their uint8 copy for the next layer's backward, so none of these costs a pass of its own.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace {

constexpr float kThreshold = 1.0f;
constexpr float kSlope = 25.0f;
constexpr int64_t kChunk = 1024;  // neurons whose membranes a thread keeps on its stack

// Dropout. The keep mask of element i comes from a counter-based generator: 64-bit word i/4 is
// splitmix64(seed + i/4), and its (i%4)-th 16-bit lane, read as int16, keeps the element when
// >= threshold (P(drop) = (threshold + 32768) / 65536, the torch path's rule). The stream
// depends on the seed (drawn from torch's generator) only, not on the thread count.
inline uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The 16-bit draws of elements e0 .. e0 + n - 1 (draws must hold n + 7): whole words from the
// stream, cut in memory order (little-endian); returns where element e0's draw lies.
inline const int16_t* cut_draws(uint64_t seed, int64_t e0, int64_t n, int16_t* draws) {
  const int64_t w0 = e0 >> 2, w1 = (e0 + n - 1) >> 2;
  for (int64_t k = w0; k <= w1; ++k) {
    const uint64_t word = splitmix64(seed + static_cast<uint64_t>(k));
    std::memcpy(draws + 4 * (k - w0), &word, sizeof word);
  }
  return draws + (e0 & 3);
}

// Dropout applied to a LIF's spikes inside its pass: element e of the (T, M) output keeps
// keep_mask's draw e (same seed, same numbering), so the spikes equal dropout(LIF(x)) with the
// mask keep_mask(x.shape) would draw; kept spikes become `factor` (1 / (1 - p)).
struct Dropout {
  uint64_t seed = 0;
  int16_t limit = 0;
  float factor = 1.0f;
};

void check_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat,
              name, " must be a float32 CPU tensor");
  TORCH_CHECK(x.dim() >= 1, name, " must have a time dimension");
}

// x itself when it is a (T, M) view with T-stride 0 or M and neurons contiguous, else a copy.
at::Tensor time_major(const at::Tensor& x) {
  if (x.numel() == 0) return x;
  if (x.size(0) <= 1 || x.stride(0) == 0) return x[0].is_contiguous() ? x : x.contiguous();
  return x.is_contiguous() ? x : x.contiguous();
}

int64_t time_stride(const at::Tensor& x, int64_t neurons) {
  return x.size(0) > 1 && x.stride(0) == 0 ? 0 : neurons;
}

// What is added to the currents a: nothing, a residual (T, M) tensor, or a bias over the last
// dimension (columns), broadcast over the rest: LIF(a + residual), LIF(a + bias).
enum Addend { kNone, kResidual, kBias };

// The bias of neurons i0 .. i0 + n - 1 (neuron m is column m % columns), laid out contiguously.
inline void tile_bias(const float* bias, int64_t columns, int64_t i0, int64_t n, float* out) {
  int64_t c = i0 % columns;
  for (int64_t j = 0; j < n; ++j) {
    out[j] = bias[c];
    c = c + 1 == columns ? 0 : c + 1;
  }
}

// Streaming stores: the LIF's outputs (spikes, membranes, uint8 copies; dL/dX backward) are
// larger than the caches and are read next by another pass, so they are written around the
// cache. A plain store first reads the line it writes (read for ownership), so it costs twice
// the bytes. Callers end their task with stream_fence() so that the stores are visible to the
// next reader.
inline void stream_floats(float* __restrict__ dst, const float* __restrict__ src, int64_t n) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j < n && (reinterpret_cast<uintptr_t>(dst + j) & 63); ++j) dst[j] = src[j];
  for (; j + 16 <= n; j += 16) _mm512_stream_ps(dst + j, _mm512_loadu_ps(src + j));
#elif defined(__AVX__)
  for (; j < n && (reinterpret_cast<uintptr_t>(dst + j) & 31); ++j) dst[j] = src[j];
  for (; j + 8 <= n; j += 8) _mm256_stream_ps(dst + j, _mm256_loadu_ps(src + j));
#endif
  for (; j < n; ++j) dst[j] = src[j];
}

inline void stream_bytes(uint8_t* __restrict__ dst, const uint8_t* __restrict__ src, int64_t n) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j < n && (reinterpret_cast<uintptr_t>(dst + j) & 63); ++j) dst[j] = src[j];
  for (; j + 64 <= n; j += 64)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + j),
                        _mm512_loadu_si512(reinterpret_cast<const void*>(src + j)));
#endif
  for (; j < n; ++j) dst[j] = src[j];
}

inline void stream_fence() {
#if defined(__SSE2__) || defined(__x86_64__)
  _mm_sfence();
#endif
}

// One time step of n <= kChunk neurons: membranes u and last spikes s (the neurons' state,
// updated in place) driven by currents a (+ b: the residual's or the bias's values for these
// neurons); writes the spikes (dropped out with draws dt), their uint8 copy and the membranes.
template <Addend kAdd, bool kKeepMembranes, bool kDrop, bool kBytes>
inline void lif_step(int64_t t, int64_t n, float beta, const float* __restrict__ a,
                     const float* __restrict__ b, float* __restrict__ u, float* __restrict__ s,
                     float* __restrict__ st, float* __restrict__ mt, uint8_t* __restrict__ bt8,
                     const int16_t* __restrict__ dt, const Dropout& dr) {
  // t = 0: U = X (zero membrane, no reset), as the torch path's first step
  const float decay = t == 0 ? 0.0f : beta;
  const int16_t limit = dr.limit;
  const float factor = dr.factor;
  float out[kChunk];
  uint8_t out8[kChunk];
  for (int64_t j = 0; j < n; ++j) {
    const float x = kAdd != kNone ? a[j] + b[j] : a[j];
    const float v = t == 0 ? x : (u[j] * decay + x) - s[j];
    const float spike = v > kThreshold ? 1.0f : 0.0f;
    u[j] = v;
    s[j] = spike;
    const float o = kDrop ? (dt[j] >= limit ? factor : 0.0f) * spike : spike;
    out[j] = o;
    if (kBytes) out8[j] = o != 0.0f;
  }
  stream_floats(st, out, n);
  if (kKeepMembranes) stream_floats(mt, u, n);
  if (kBytes) stream_bytes(bt8, out8, n);
}

// lif_step as a function of its own, for callers into which it did not vectorize once inlined
// (GCC lost its pointers' restrict there; see pair_step).
template <Addend kAdd, bool kKeepMembranes, bool kDrop, bool kBytes>
__attribute__((noinline)) void lif_step_out_of_line(
    int64_t t, int64_t n, float beta, const float* __restrict__ a, const float* __restrict__ b,
    float* __restrict__ u, float* __restrict__ s, float* __restrict__ st, float* __restrict__ mt,
    uint8_t* __restrict__ bt8, const int16_t* __restrict__ dt, const Dropout& dr) {
  lif_step<kAdd, kKeepMembranes, kDrop, kBytes>(t, n, beta, a, b, u, s, st, mt, bt8, dt, dr);
}

template <Addend kAdd, bool kKeepMembranes, bool kDrop, bool kBytes>
void forward_chunks(const float* a, int64_t sa, const float* b, int64_t sb, int64_t columns,
                    float* spikes, float* mem, uint8_t* bytes, float beta, int64_t steps,
                    int64_t neurons, Dropout drop) {
  at::parallel_for(0, neurons, 4 * kChunk, [&](int64_t begin, int64_t end) {
    float u[kChunk];
    float s[kChunk];
    float bias[kChunk];
    int16_t draws[kChunk + 8];
    const Dropout dr = drop;  // a local copy: the stores below may not alias it
    for (int64_t i0 = begin; i0 < end; i0 += kChunk) {
      const int64_t n = std::min(kChunk, end - i0);
      if (kAdd == kBias) tile_bias(b, columns, i0, n, bias);
      for (int64_t t = 0; t < steps; ++t) {
        const float* bt =
            kAdd == kResidual ? b + t * sb + i0 : (kAdd == kBias ? bias : nullptr);
        if (t + 1 < steps) {  // the next step's inputs lie on other pages: prefetch them
          for (int64_t j = 0; sa != 0 && j < n; j += 16)
            __builtin_prefetch(a + (t + 1) * sa + i0 + j);
          for (int64_t j = 0; kAdd == kResidual && sb != 0 && j < n; j += 16)
            __builtin_prefetch(b + (t + 1) * sb + i0 + j);
        }
        lif_step<kAdd, kKeepMembranes, kDrop, kBytes>(
            t, n, beta, a + t * sa + i0, bt, u, s, spikes + t * neurons + i0,
            kKeepMembranes ? mem + t * neurons + i0 : nullptr,
            kBytes ? bytes + t * neurons + i0 : nullptr,
            kDrop ? cut_draws(dr.seed, t * neurons + i0, n, draws) : nullptr, dr);
      }
    }
    stream_fence();
  });
}

// Calls f with std::bool_constant<v>: a runtime flag as a template argument.
template <typename F>
void with_flag(bool v, F&& f) {
  v ? f(std::true_type{}) : f(std::false_type{});
}

// (spikes, membranes, bytes) of LIF neurons driven by x (+ residual, or + bias over x's last
// dimension); membranes only when keep. With dropping, the spikes are dropped out (0 or
// factor) with keep_mask's stream at `seed`. With want_bytes, also a uint8 copy (1 where the
// output is nonzero) for a layer that keeps its input for backward: written in this pass, it
// spares that layer a conversion pass over the fp32 spikes; else an undefined tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lif_forward(
    const at::Tensor& x_in, const std::optional<at::Tensor>& residual_in,
    const std::optional<at::Tensor>& bias_in, double beta, bool keep, bool dropping,
    int64_t seed, int64_t threshold, double factor, bool want_bytes) {
  check_input(x_in, "x");
  const at::Tensor x = time_major(x_in);
  std::optional<at::Tensor> residual;
  if (residual_in.has_value()) {
    check_input(*residual_in, "residual");
    TORCH_CHECK(residual_in->sizes() == x.sizes(), "residual must have the shape of x");
    residual = time_major(*residual_in);
  }
  at::Tensor bias;
  if (bias_in.has_value()) {
    check_input(*bias_in, "bias");
    TORCH_CHECK(!residual.has_value() && x.dim() >= 2 && bias_in->dim() == 1 &&
                bias_in->size(0) == x.size(-1), "bias must be (C,) for x (T, ..., C), no residual");
    bias = bias_in->contiguous();
  }
  const int64_t steps = x.size(0);
  const int64_t neurons = steps ? x.numel() / steps : 0;
  at::Tensor spikes = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor mem = keep ? at::empty_like(spikes) : at::Tensor();
  at::Tensor bytes = want_bytes ? at::empty_like(spikes, spikes.options().dtype(at::kByte))
                                : at::Tensor();
  if (x.numel() == 0) return {spikes, mem, bytes};
  const float* ap = x.data_ptr<float>();
  const int64_t sa = time_stride(x, neurons);
  const float* bp = residual.has_value() ? residual->data_ptr<float>()
                    : bias.defined()     ? bias.data_ptr<float>()
                                         : nullptr;
  const int64_t sb = residual.has_value() ? time_stride(*residual, neurons) : 0;
  const int64_t columns = x.size(-1);
  float* sp = spikes.data_ptr<float>();
  float* mp = keep ? mem.data_ptr<float>() : nullptr;
  const float b = static_cast<float>(beta);
  const Dropout drop{static_cast<uint64_t>(seed), static_cast<int16_t>(threshold),
                     static_cast<float>(factor)};
  uint8_t* bytes_p = want_bytes ? bytes.data_ptr<uint8_t>() : nullptr;
  TORCH_CHECK(!(dropping && residual.has_value()), "dropout is fused only without a residual");
  const Addend add = residual.has_value() ? kResidual : bias.defined() ? kBias : kNone;
  with_flag(keep, [&](auto k) {
    with_flag(dropping, [&](auto dr) {
      with_flag(want_bytes, [&](auto by) {
        const auto run = [&](auto kernel) {
          kernel(ap, sa, bp, sb, columns, sp, mp, bytes_p, b, steps, neurons, drop);
        };
        constexpr bool K = decltype(k)::value, D = decltype(dr)::value, B = decltype(by)::value;
        if (add == kResidual) run(forward_chunks<kResidual, K, D, B>);
        else if (add == kBias) run(forward_chunks<kBias, K, D, B>);
        else run(forward_chunks<kNone, K, D, B>);
      });
    });
  });
  return {spikes, mem, bytes};
}

// Adds per-thread sums (threads x columns, each thread's row summed in its own order) into
// out (columns,) in thread order: the same result for the same thread count.
inline void fold_thread_sums(const std::vector<float>& sums, int64_t threads, int64_t columns,
                             float* out) {
  for (int64_t t = 0; t < threads; ++t)
    for (int64_t c = 0; c < columns; ++c) out[c] += sums[t * columns + c];
}

// One backward step of a LIF neuron: dL/dU[t] from dL/dS[t] (gs), the membrane U[t] (u) and
// dL/dU[t+1] (next; `last`: t = T - 1, nothing flows back from after T).
inline float surrogate_step(float gs, float u, float next, bool last, float beta) {
  float d = std::fabs(u - kThreshold) * kSlope + 1.0f;
  d = d * d;
  return last ? gs / d : gs / d + beta * next;
}

// Adds a block's per-neuron sums (neurons i0 .. i0 + n) into per-column sums (neuron m is column
// m % columns): a linear layer's dL/dbias.
inline void add_column_sums(const float* total, int64_t i0, int64_t n, int64_t columns,
                            float* sums) {
  int64_t c = i0 % columns;
  for (int64_t j = 0; j < n; ++j) {
    sums[c] += total[j];
    c = c + 1 == columns ? 0 : c + 1;
  }
}

// One backward step of a LIF for n neurons: dL/dS (gt; with kDrop, dL/d(dropped spikes), the
// forward's draws dt), the membranes ut and dL/dU[t+1] (next) give dL/dU[t] = dL/dX[t] into
// next, summed into total with kColumnSums. Out of line for its pointers' restrict (see
// pair_step).
template <bool kDrop, bool kColumnSums>
__attribute__((noinline)) void lif_backward_step(int64_t n, bool last, float decay,
                                                 const float* __restrict__ gt,
                                                 const float* __restrict__ ut,
                                                 const int16_t* __restrict__ dt, Dropout dr,
                                                 float* __restrict__ next,
                                                 float* __restrict__ total) {
  for (int64_t j = 0; j < n; ++j) {
    const float gs = kDrop ? (dt[j] >= dr.limit ? gt[j] * dr.factor : 0.0f) : gt[j];
    const float g = surrogate_step(gs, ut[j], next[j], last, decay);
    next[j] = g;
    if (kColumnSums) total[j] += g;
  }
}

// What a fused backward's walker keeps of its current block (neurons i0 .. i0 + cnt) beside its
// LIF's state: with kColumnSums, dL/dX summed over time per neuron, added per column into this
// thread's row of the dL/dbias sums when the block ends.
template <bool kColumnSums>
struct BlockSums {
  std::vector<float> total;
  int64_t columns, i0 = 0, cnt = 0;
  float* mine;

  BlockSums(int64_t size, int64_t columns_, float* sums)
      : total(kColumnSums ? size : 0), columns(columns_),
        mine(kColumnSums ? sums + at::get_thread_num() * columns_ : nullptr) {}
  void begin(int64_t first, int64_t count) {
    i0 = first;
    cnt = count;
    if (kColumnSums) std::fill(total.begin(), total.begin() + cnt, 0.0f);
  }
  void end() {
    if (kColumnSums) add_column_sums(total.data(), i0, cnt, columns, mine);
  }
  // Prefetch the block's neurons at step t - 1 of each (T, neurons) stream: they lie on other
  // pages than step t's, where the hardware prefetchers stop.
  void prefetch_before(int64_t t, int64_t neurons, std::initializer_list<const float*> streams) {
    if (t == 0) return;
    for (const float* p : streams)
      for (int64_t j = 0; j < cnt; j += 16) __builtin_prefetch(p + (t - 1) * neurons + i0 + j);
  }
};

// The LIF's backward for one thread's blocks of neurons, walking time backwards: dL/dX from
// dL/dS (gp) and the forward's membranes (up). With kDrop, gp is dL/d(dropped spikes): the
// forward's mask is drawn again and dL/dS = grad * factor where kept, else 0. With kColumnSums,
// also dL/dbias: dL/dX summed over time per neuron, then per column (BlockSums).
template <bool kDrop, bool kColumnSums>
struct LifBackward : BlockSums<kColumnSums> {
  std::vector<float> next;
  std::vector<int16_t> draws;
  const float *gp, *up;
  float beta;
  Dropout dr;
  int64_t neurons;

  LifBackward(int64_t size, const float* gp_, const float* up_, float beta_, Dropout dr_,
              int64_t neurons_, int64_t columns, float* sums)
      : BlockSums<kColumnSums>(size, columns, sums), next(size), draws(kDrop ? size + 8 : 0),
        gp(gp_), up(up_), beta(beta_), dr(dr_), neurons(neurons_) {}
  const float* step(int64_t t, bool last) {
    const int64_t o = t * neurons + this->i0, cnt = this->cnt;
    this->prefetch_before(t, neurons, {gp, up});
    const int16_t* dt = kDrop ? cut_draws(dr.seed, o, cnt, draws.data()) : nullptr;
    lif_backward_step<kDrop, kColumnSums>(cnt, last, last ? 0.0f : beta, gp + o, up + o, dt, dr,
                                          next.data(), this->total.data());
    return next.data();
  }
};

// A LIF backward over (T, M) neurons, kChunk at a time per thread, walking time backwards:
// `Walker` (LifBackward, PairBackward: the LIF's backward step with its state, one per thread)
// gives each step's dL/dX, written to out (T, M) as it comes.
template <typename Walker, typename... Args>
void chunked_backward(int64_t neurons, int64_t steps, float* out, Args&&... args) {
  at::parallel_for(0, neurons, 4 * kChunk, [&](int64_t begin, int64_t end) {
    Walker walker(kChunk, args...);
    for (int64_t i0 = begin; i0 < end; i0 += kChunk) {
      const int64_t n = std::min(kChunk, end - i0);
      walker.begin(i0, n);
      for (int64_t t = steps - 1; t >= 0; --t)
        stream_floats(out + t * neurons + i0, walker.step(t, t == steps - 1), n);
      walker.end();
    }
    stream_fence();
  });
}

// (dL/dX, dL/dbias): dL/dbias (columns,) summed over all but the last dimension when
// bias_columns > 0, else undefined.
std::tuple<at::Tensor, at::Tensor> lif_backward(const at::Tensor& grad_in, const at::Tensor& mem,
                                                double beta, bool dropping, int64_t seed,
                                                int64_t threshold, double factor,
                                                int64_t bias_columns) {
  check_input(mem, "membranes");
  const at::Tensor grad = grad_in.contiguous();
  TORCH_CHECK(grad.sizes() == mem.sizes() && grad.scalar_type() == at::kFloat,
              "grad must be float32 with the membranes' shape");
  at::Tensor out = at::empty_like(mem);
  const int64_t columns = bias_columns;
  TORCH_CHECK(columns == 0 || (mem.dim() >= 2 && mem.size(-1) == columns),
              "bias_columns must be the membranes' last dimension");
  at::Tensor grad_bias = columns > 0 ? at::zeros({columns}, mem.options()) : at::Tensor();
  const int64_t steps = mem.size(0);
  const int64_t neurons = steps ? mem.numel() / steps : 0;
  if (mem.numel() == 0) return {out, grad_bias};
  const Dropout drop{static_cast<uint64_t>(seed), static_cast<int16_t>(threshold),
                     static_cast<float>(factor)};
  // per-thread column sums, added in thread order: the same result for the same thread count
  const int64_t threads = at::get_num_threads();
  std::vector<float> sums(columns > 0 ? threads * columns : 0, 0.0f);
  with_flag(dropping, [&](auto dr) {
    with_flag(columns > 0, [&](auto cs) {
      chunked_backward<LifBackward<decltype(dr)::value, decltype(cs)::value>>(
          neurons, steps, out.data_ptr<float>(), grad.data_ptr<float>(), mem.data_ptr<float>(),
          static_cast<float>(beta), drop, neurons, columns, sums.data());
    });
  });
  if (columns > 0) fold_thread_sums(sums, threads, columns, grad_bias.data_ptr<float>());
  return {out, grad_bias};
}

// A pair of LIF layers where the second reads the first's spikes as a residual:
//   o = LIF1(a + bias),  y = LIF2(r + o)
// the block's `LIF(x + LIF(W_o · mixed + b_o))` and `LIF(r1 + LIF(W_2 · hidden + b_2))`. One
// pass each way: o never goes to memory (it was written by one pass and read by the next), and
// backward writes dL/d(r + o) and dL/d(a + bias) from one walk over time. Per neuron and step
// that is 21 bytes forward (a, r in; y, its uint8 copy, both membranes out) instead of 29, and
// 20 backward instead of 24. The arithmetic is the two separate passes', in their order, so
// spikes and membranes are bitwise theirs and the gradients agree to rounding. Where r is
// spikes (0 or 1: a block's input or r1), kResidualBytes reads their uint8 copy r8 instead,
// the same values in a quarter of the bytes (18 per neuron and step).
// One time step of the pair for n <= kChunk neurons: states u1, s1, u2, s2 (updated in place),
// currents a, the bias's values for these neurons, the residual's (r, or its uint8 copy r8 with
// kResidualBytes); writes y, its uint8 copy and both membranes at these neurons' places. Not
// inlined: inlined into its callers, GCC lost the pointers' restrict and left the loop scalar
// (versioning for aliases, 12x slower).
template <bool kKeepMembranes, bool kBytes, bool kResidualBytes>
__attribute__((noinline)) void pair_step(int64_t t, int64_t n, float beta, const float* __restrict__ a,
                      const float* __restrict__ bias, const float* __restrict__ rt,
                      const uint8_t* __restrict__ rt8, float* __restrict__ u1,
                      float* __restrict__ s1, float* __restrict__ u2, float* __restrict__ s2,
                      float* yt, uint8_t* yt8, float* m1t, float* m2t) {
  float out[kChunk];
  uint8_t out8[kChunk];
  const float decay = t == 0 ? 0.0f : beta;
  for (int64_t j = 0; j < n; ++j) {  // lif_step's arithmetic, twice
    const float x1 = a[j] + bias[j];
    const float v1 = t == 0 ? x1 : (u1[j] * decay + x1) - s1[j];
    const float o = v1 > kThreshold ? 1.0f : 0.0f;
    u1[j] = v1;
    s1[j] = o;
    const float x2 = (kResidualBytes ? static_cast<float>(rt8[j]) : rt[j]) + o;
    const float v2 = t == 0 ? x2 : (u2[j] * decay + x2) - s2[j];
    const float y = v2 > kThreshold ? 1.0f : 0.0f;
    u2[j] = v2;
    s2[j] = y;
    out[j] = y;
    if (kBytes) out8[j] = y != 0.0f;
  }
  stream_floats(yt, out, n);
  if (kKeepMembranes) {
    stream_floats(m1t, u1, n);
    stream_floats(m2t, u2, n);
  }
  if (kBytes) stream_bytes(yt8, out8, n);
}

template <bool kKeepMembranes, bool kBytes, bool kResidualBytes>
void pair_forward_chunks(const float* a, int64_t sa, const float* bias_p, int64_t columns,
                         const float* r, const uint8_t* r8, int64_t sr, float* spikes,
                         uint8_t* bytes, float* mem1, float* mem2, float beta, int64_t steps,
                         int64_t neurons) {
  at::parallel_for(0, neurons, 4 * kChunk, [&](int64_t begin, int64_t end) {
    float u1[kChunk], s1[kChunk], u2[kChunk], s2[kChunk], bias[kChunk];
    for (int64_t i0 = begin; i0 < end; i0 += kChunk) {
      const int64_t n = std::min(kChunk, end - i0);
      tile_bias(bias_p, columns, i0, n, bias);
      for (int64_t t = 0; t < steps; ++t) {
        if (t + 1 < steps) {  // the next step's inputs lie on other pages: prefetch them
          for (int64_t j = 0; sa != 0 && j < n; j += 16)
            __builtin_prefetch(a + (t + 1) * sa + i0 + j);
          if (kResidualBytes)
            for (int64_t j = 0; sr != 0 && j < n; j += 64)
              __builtin_prefetch(r8 + (t + 1) * sr + i0 + j);
          else
            for (int64_t j = 0; sr != 0 && j < n; j += 16)
              __builtin_prefetch(r + (t + 1) * sr + i0 + j);
        }
        const int64_t o = t * neurons + i0;
        pair_step<kKeepMembranes, kBytes, kResidualBytes>(
            t, n, beta, a + t * sa + i0, bias, kResidualBytes ? nullptr : r + t * sr + i0,
            kResidualBytes ? r8 + t * sr + i0 : nullptr, u1, s1, u2, s2, spikes + o,
            kBytes ? bytes + o : nullptr, kKeepMembranes ? mem1 + o : nullptr,
            kKeepMembranes ? mem2 + o : nullptr);
      }
    }
    stream_fence();
  });
}

// The residual as a pair reads it, time-major: r itself, or its uint8 copy r8 where given (r is
// spikes), checked.
at::Tensor residual_as_read(const at::Tensor& r, const std::optional<at::Tensor>& r8) {
  check_input(r, "residual");
  if (!r8.has_value()) return time_major(r);
  TORCH_CHECK(r8->sizes() == r.sizes() && r8->scalar_type() == at::kByte && r8->device().is_cpu(),
              "residual8 must be uint8 with the residual's shape");
  return time_major(*r8);
}

// A pair's outputs, spikes shaped `shape`: (y, its uint8 copy or undefined, membranes of LIF1,
// of LIF2, both undefined without keep).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pair_outputs(
    at::IntArrayRef shape, const at::TensorOptions& options, bool keep, bool want_bytes) {
  at::Tensor spikes = at::empty(shape, options.memory_format(at::MemoryFormat::Contiguous));
  at::Tensor mem1 = keep ? at::empty_like(spikes) : at::Tensor();
  at::Tensor mem2 = keep ? at::empty_like(spikes) : at::Tensor();
  at::Tensor bytes = want_bytes ? at::empty_like(spikes, spikes.options().dtype(at::kByte))
                                : at::Tensor();
  return {spikes, bytes, mem1, mem2};
}

// (y, its uint8 copy or undefined, membranes of LIF1, of LIF2; both undefined without keep).
// With r8, the residual's uint8 copy (r is spikes), r8 is read instead of r.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lif_pair_forward(
    const at::Tensor& a_in, const at::Tensor& bias_in, const at::Tensor& r_in, double beta,
    bool keep, bool want_bytes, const std::optional<at::Tensor>& r8_in) {
  check_input(a_in, "x");
  check_input(bias_in, "bias");
  TORCH_CHECK(r_in.sizes() == a_in.sizes(), "residual must have the shape of x");
  const at::Tensor a = time_major(a_in);
  const bool residual_bytes = r8_in.has_value();
  const at::Tensor r = residual_as_read(r_in, r8_in);
  TORCH_CHECK(a.dim() >= 2 && bias_in.dim() == 1 && bias_in.size(0) == a.size(-1),
              "bias must be (C,) for x (T, ..., C)");
  const at::Tensor bias = bias_in.contiguous();
  const int64_t steps = a.size(0);
  const int64_t neurons = steps ? a.numel() / steps : 0;
  auto [spikes, bytes, mem1, mem2] = pair_outputs(a.sizes(), a.options(), keep, want_bytes);
  if (a.numel() == 0) return {spikes, bytes, mem1, mem2};
  with_flag(keep, [&](auto k) {
    with_flag(want_bytes, [&](auto by) {
      with_flag(residual_bytes, [&](auto rb) {
        pair_forward_chunks<decltype(k)::value, decltype(by)::value, decltype(rb)::value>(
            a.data_ptr<float>(), time_stride(a, neurons), bias.data_ptr<float>(), a.size(-1),
            residual_bytes ? nullptr : r.data_ptr<float>(),
            residual_bytes ? r.data_ptr<uint8_t>() : nullptr, time_stride(r, neurons),
            spikes.data_ptr<float>(), want_bytes ? bytes.data_ptr<uint8_t>() : nullptr,
            keep ? mem1.data_ptr<float>() : nullptr, keep ? mem2.data_ptr<float>() : nullptr,
            static_cast<float>(beta), steps, neurons);
      });
    });
  });
  return {spikes, bytes, mem1, mem2};
}

// (dL/d(r + o), dL/d(a + bias), dL/dbias) from dL/dy and both membranes: LIF2's backward, whose
// dL/d(r + o) is dL/do, then LIF1's, walking time backwards once. dL/dbias (columns,) is dL/da
// summed over all but the last dimension when bias_columns > 0, else undefined.
// One backward step of the pair for n neurons: dL/dy (gt) and both membranes in, dL/d(r + o)
// into next2 and dL/d(a + bias) into next1 (both also dL/dU[t+1] for the step before), summed
// into total with kColumnSums. Out of line for the restrict of its pointers (see pair_step).
template <bool kColumnSums>
__attribute__((noinline)) void pair_backward_step(int64_t n, bool last, float decay,
                                                  const float* __restrict__ gt,
                                                  const float* __restrict__ u1,
                                                  const float* __restrict__ u2,
                                                  float* __restrict__ next1,
                                                  float* __restrict__ next2,
                                                  float* __restrict__ total) {
  for (int64_t j = 0; j < n; ++j) {  // lif_backward_step's arithmetic, twice
    const float g2 = surrogate_step(gt[j], u2[j], next2[j], last, decay);
    next2[j] = g2;
    const float g1 = surrogate_step(g2, u1[j], next1[j], last, decay);
    next1[j] = g1;
    if (kColumnSums) total[j] += g1;
  }
}

// The pair's backward for one thread's blocks: dL/dresidual written out, dL/d(a + bias) given.
template <bool kColumnSums>
struct PairBackward : BlockSums<kColumnSums> {
  std::vector<float> next1, next2;
  const float *gp, *m1, *m2;
  float* gsum;
  float beta;
  int64_t neurons;

  PairBackward(int64_t size, const float* gp_, const float* m1_, const float* m2_, float* gsum_,
               float beta_, int64_t neurons_, int64_t columns, float* sums)
      : BlockSums<kColumnSums>(size, columns, sums), next1(size), next2(size), gp(gp_), m1(m1_),
        m2(m2_), gsum(gsum_), beta(beta_), neurons(neurons_) {}
  const float* step(int64_t t, bool last) {
    const int64_t o = t * neurons + this->i0, cnt = this->cnt;
    this->prefetch_before(t, neurons, {gp, m1, m2});
    pair_backward_step<kColumnSums>(cnt, last, last ? 0.0f : beta, gp + o, m1 + o, m2 + o,
                                    next1.data(), next2.data(), this->total.data());
    stream_floats(gsum + o, next2.data(), cnt);
    return next1.data();
  }
};

// A pair's backward inputs checked: dL/dy, contiguous.
at::Tensor pair_backward_grad(const at::Tensor& grad_in, const at::Tensor& mem1,
                              const at::Tensor& mem2) {
  check_input(mem1, "membranes");
  check_input(mem2, "membranes");
  const at::Tensor grad = grad_in.contiguous();
  TORCH_CHECK(grad.sizes() == mem1.sizes() && mem2.sizes() == mem1.sizes() &&
              grad.scalar_type() == at::kFloat && mem1.is_contiguous() && mem2.is_contiguous(),
              "grad must be float32 with the membranes' shape");
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lif_pair_backward(
    const at::Tensor& grad_in, const at::Tensor& mem1, const at::Tensor& mem2, double beta,
    int64_t bias_columns) {
  const at::Tensor grad = pair_backward_grad(grad_in, mem1, mem2);
  const int64_t columns = bias_columns;
  TORCH_CHECK(columns == 0 || (mem1.dim() >= 2 && mem1.size(-1) == columns),
              "bias_columns must be the membranes' last dimension");
  at::Tensor g1 = at::empty_like(mem1), g2 = at::empty_like(mem1);
  at::Tensor grad_bias = columns > 0 ? at::zeros({columns}, mem1.options()) : at::Tensor();
  const int64_t steps = mem1.size(0);
  const int64_t neurons = steps ? mem1.numel() / steps : 0;
  if (mem1.numel() == 0) return {g2, g1, grad_bias};
  const int64_t threads = at::get_num_threads();
  std::vector<float> sums(columns > 0 ? threads * columns : 0, 0.0f);
  with_flag(columns > 0, [&](auto cs) {
    chunked_backward<PairBackward<decltype(cs)::value>>(
        neurons, steps, g1.data_ptr<float>(), grad.data_ptr<float>(), mem1.data_ptr<float>(),
        mem2.data_ptr<float>(), g2.data_ptr<float>(), static_cast<float>(beta), neurons, columns,
        sums.data());
  });
  if (columns > 0) fold_thread_sums(sums, threads, columns, grad_bias.data_ptr<float>());
  return {g2, g1, grad_bias};
}

}  // namespace

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
// oneDNN where torch carries it. torch's mm on the CPU calls MKL's sgemm, which runs its AVX2
// code on CPUs not made by Intel; oneDNN chooses its kernels by instruction set. The two agree
// to rounding (tests/test_native.py); on the AMD machine measured they summed in the same order
// up to K = 192 (bitwise the same currents) but not at K = 256, so the model's tests compare a
// oneDNN fast path with the reference on oneDNN (tests/test_model.py).
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

at::Tensor keep_mask(at::IntArrayRef size, int64_t seed, int64_t threshold) {
  at::Tensor keep = at::empty(size, at::TensorOptions().dtype(at::kByte));
  const int64_t n = keep.numel();
  uint8_t* kp = keep.data_ptr<uint8_t>();
  const uint64_t base = static_cast<uint64_t>(seed);
  const int16_t limit = static_cast<int16_t>(threshold);
  const int64_t words = n / 4;  // whole words; the last partial one below
  at::parallel_for(0, words, 4096, [&](int64_t begin, int64_t end) {
    // locals, not the closure's references: the byte stores below may alias those
    uint8_t* const kp_ = kp;
    const uint64_t base_ = base;
    const int16_t limit_ = limit;
    for (int64_t w = begin; w < end; ++w) {
      const uint64_t word = splitmix64(base_ + static_cast<uint64_t>(w));
      uint32_t packed = 0;
      for (int lane = 0; lane < 4; ++lane) {
        const int16_t bits = static_cast<int16_t>(word >> (16 * lane));
        packed |= static_cast<uint32_t>(bits >= limit_) << (8 * lane);
      }
      std::memcpy(kp_ + 4 * w, &packed, 4);  // bytes in memory order on little-endian x86
    }
  });
  if (n % 4) {
    const uint64_t word = splitmix64(base + static_cast<uint64_t>(words));
    for (int64_t lane = 0; lane < n % 4; ++lane)
      kp[4 * words + lane] = static_cast<int16_t>(word >> (16 * lane)) >= limit ? 1 : 0;
  }
  return keep;
}


// Spike attention, one head of one sequence per task: out = dropout(q @ kᵀ * scale) @ v without
// softmax (DESIGN §2), q, k, v binary (W, dh) column slices of the fused (N, W, 3d) spikes.
// Because q and k are 0/1 with dh <= 64, q @ kᵀ is a popcount of the AND of two 64-bit words,
// an exact integer; the dropout keep mask is drawn inline from keep_mask's stream (same seed,
// same element numbering over (heads, N, W, W)), so the mask equals keep_mask's. Forward keeps
// for backward only q, k, v as bits (3, heads, N, W); the counts are recomputed from the bits
// and the mask drawn again from its seed. A task's scores and gradients stay in
// its thread's cache; no head slice is copied. Every product is a sum of rows weighted by
// scalars (`weighted_rows`), summed in the rows' order, which the forward shares with the torch
// path's GEMMs ((count * alpha) * v, v in {0, 1}, is exact, so its sums round alike: bitwise
// here, tests/test_native.py); the backward agrees with the torch path to rounding.
constexpr int64_t kMaxHead = 64;

inline int64_t padded(int64_t n) { return (n + 15) / 16 * 16; }

// keep[j] = 1 where element e0 + j of keep_mask's stream is kept, else 0, for j < n: whole
// words cut into bytes as keep_mask cuts them, in a loop that vectorizes (drawn row by row,
// through cut_draws, the words took a fifth of the attention's forward). buf must hold n + 7
// bytes; returns where element e0's byte lies.
inline const uint8_t* keep_bytes(const Dropout& dr, int64_t e0, int64_t n, uint8_t* buf) {
  const int64_t w0 = e0 >> 2, words = ((e0 + n - 1) >> 2) - w0 + 1;
  const uint64_t base = dr.seed + static_cast<uint64_t>(w0);
  const int16_t limit = dr.limit;
  for (int64_t k = 0; k < words; ++k) {
    const uint64_t word = splitmix64(base + static_cast<uint64_t>(k));
    uint32_t packed = 0;
    for (int lane = 0; lane < 4; ++lane)
      packed |= static_cast<uint32_t>(static_cast<int16_t>(word >> (16 * lane)) >= limit)
                << (8 * lane);
    std::memcpy(buf + 4 * k, &packed, 4);
  }
  return buf + (e0 & 3);
}

// 16 floats: one AVX-512 register, two AVX2 ones (GCC/Clang vector extension, any target);
// vec16u is the same at any float's alignment, for loads and stores anywhere in a row.
using vec16 = float __attribute__((vector_size(64)));
using vec16u = float __attribute__((vector_size(64), aligned(4)));
#ifdef __AVX512F__
constexpr int kRegisterBudget = 12;  // vec16 accumulators: 12 of 32 zmm registers
#else
constexpr int kRegisterBudget = 4;  // 8 of 16 ymm registers
#endif

// The attention's sums may fuse their multiply-adds (the file is built without contraction for
// the LIF's bitwise claim): where a factor is a spike (0 or 1) the product is exact and fusing
// changes nothing; the backward's other sums differ from unfused ones by rounding only.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")

// For o < kOut: out_o[0 .. 16 kVec) = scale * sum_{r < count} coef[o * co + r * cr] * row_r,
// where out_o = out + o * ostride, row_r = rows + r * rstride; summed in r's order, kOut outputs
// at once so that each row loaded feeds kOut * kVec accumulators. The coefficient strides let
// a matrix serve as it is or transposed (co = 1), so no transpose is copied.
template <int kVec, int kOut>
inline void weighted_rows_block(float* __restrict__ out, int64_t ostride,
                                const float* __restrict__ coef, int64_t co, int64_t cr,
                                const float* __restrict__ rows, int64_t rstride, int64_t count,
                                float scale) {
  vec16 acc[kOut][kVec] = {};
  for (int64_t r = 0; r < count; ++r) {
    const auto* x = reinterpret_cast<const vec16u*>(rows + r * rstride);
    for (int o = 0; o < kOut; ++o) {
      const float a = coef[o * co + r * cr];
      for (int v = 0; v < kVec; ++v) acc[o][v] += a * x[v];
    }
  }
  for (int o = 0; o < kOut; ++o)
    for (int v = 0; v < kVec; ++v)
      *reinterpret_cast<vec16u*>(out + o * ostride + 16 * v) = acc[o][v] * scale;
}

// `weighted_rows_block` for n outputs of 16 kVec floats; kVec = 0: any length `len` (plain loops).
template <int kVec>
void weighted_rows(float* out, int64_t ostride, const float* coef, int64_t co, int64_t cr,
                   const float* rows, int64_t rstride, int64_t count, int64_t n, int64_t len,
                   float scale) {
  if constexpr (kVec > 0) {
    constexpr int kOut = kRegisterBudget / kVec > 1 ? kRegisterBudget / kVec : 1;
    int64_t o = 0;
    for (; o + kOut <= n; o += kOut)
      weighted_rows_block<kVec, kOut>(out + o * ostride, ostride, coef + o * co, co, cr, rows,
                                      rstride, count, scale);
    for (; o < n; ++o)
      weighted_rows_block<kVec, 1>(out + o * ostride, ostride, coef + o * co, co, cr, rows,
                                   rstride, count, scale);
  } else {
    std::vector<float> acc(len);
    for (int64_t o = 0; o < n; ++o) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t r = 0; r < count; ++r) {
        const float a = coef[o * co + r * cr];
        const float* row = rows + r * rstride;
        for (int64_t c = 0; c < len; ++c) acc[c] += a * row[c];
      }
      for (int64_t c = 0; c < len; ++c) out[o * ostride + c] = acc[c] * scale;
    }
  }
}

#pragma GCC pop_options

// weighted_rows with rows of `len` floats: compiled lengths 16..128 (len % 16 == 0), else loops.
void weighted_rows_any(float* out, int64_t ostride, const float* coef, int64_t co, int64_t cr,
                       const float* rows, int64_t rstride, int64_t count, int64_t n, int64_t len,
                       float scale) {
  const auto run = [&](auto kernel) {
    kernel(out, ostride, coef, co, cr, rows, rstride, count, n, len, scale);
  };
  switch (len % 16 == 0 ? len / 16 : 0) {
    case 1: return run(weighted_rows<1>);
    case 2: return run(weighted_rows<2>);
    case 3: return run(weighted_rows<3>);
    case 4: return run(weighted_rows<4>);
    case 5: return run(weighted_rows<5>);
    case 6: return run(weighted_rows<6>);
    case 7: return run(weighted_rows<7>);
    case 8: return run(weighted_rows<8>);
    default: return run(weighted_rows<0>);
  }
}

// The spike bits of one row's dh <= 64 columns (bit c: x[c] > 0.5). With AVX-512, 16 columns
// per compare into a mask register: the scalar loop does not vectorize, and it took a quarter of
// the attention's forward.
inline uint64_t row_bits(const float* x, int64_t dh) {
  uint64_t bits = 0;
  int64_t c = 0;
#ifdef __AVX512F__
  const __m512 half = _mm512_set1_ps(0.5f);
  for (; c + 16 <= dh; c += 16)
    bits |= static_cast<uint64_t>(_mm512_cmp_ps_mask(_mm512_loadu_ps(x + c), half, _CMP_GT_OQ))
            << c;
#endif
  for (; c < dh; ++c) bits |= static_cast<uint64_t>(x[c] > 0.5f) << c;
  return bits;
}

// out[c] = bit c of `bits` as a float (0 or 1), c < dh <= 64. With AVX-512, 16 columns per
// masked move.
inline void bits_to_floats(uint64_t bits, int64_t dh, float* out) {
  int64_t c = 0;
#ifdef __AVX512F__
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; c + 16 <= dh; c += 16)
    _mm512_storeu_ps(out + c, _mm512_maskz_mov_ps(static_cast<__mmask16>(bits >> c), one));
#endif
  for (; c < dh; ++c) out[c] = static_cast<float>((bits >> c) & 1);
}

// Bit j = byte x[j] nonzero, for j < n <= 64 (a row of a keep mask, as bits).
inline uint64_t byte_bits(const uint8_t* x, int64_t n) {
#ifdef __AVX512BW__
  const __mmask64 lanes = n == 64 ? ~0ull : (1ull << n) - 1;
  const __m512i v = _mm512_maskz_loadu_epi8(lanes, x);  // masked: never past the row
  return _mm512_test_epi8_mask(v, v);
#else
  uint64_t bits = 0;
  for (int64_t j = 0; j < n; ++j) bits |= static_cast<uint64_t>(x[j] != 0) << j;
  return bits;
#endif
}

// out[j] = popcount(q & kb[j]) * scale for j < n (the counts of a query against every key),
// times the keep mask's bit j where `kept` (the row's mask words) is given: (count * keep) *
// scale, keep 0 or 1, as the torch path's counts.mul_(keep) and its scores' (count * alpha).
// With AVX-512 (VPOPCNTDQ, DQ) 16 keys per step, the mask applied as a register mask:
// expanding it to bytes first and multiplying cost backward a tenth of its time, and the
// forward's scalar loop (which GCC did not vectorize) half of its task's time outside the
// product.
inline void count_row(uint64_t q, const uint64_t* kb, int64_t n, const uint64_t* kept,
                      float scale, float* out) {
  int64_t j = 0;
#if defined(__AVX512VPOPCNTDQ__) && defined(__AVX512DQ__)
  const __m512i qv = _mm512_set1_epi64(static_cast<long long>(q));
  for (; j < n; j += 16) {
    const int64_t len = std::min<int64_t>(16, n - j);
    const __mmask16 lanes = static_cast<__mmask16>(len == 16 ? 0xFFFF : (1u << len) - 1);
    const __m512i lo = _mm512_maskz_loadu_epi64(static_cast<__mmask8>(lanes), kb + j);
    const __m512i hi = _mm512_maskz_loadu_epi64(static_cast<__mmask8>(lanes >> 8), kb + j + 8);
    const __m256 flo = _mm512_cvtepi64_ps(_mm512_popcnt_epi64(_mm512_and_si512(lo, qv)));
    const __m256 fhi = _mm512_cvtepi64_ps(_mm512_popcnt_epi64(_mm512_and_si512(hi, qv)));
    __m512 counts = _mm512_insertf32x8(_mm512_castps256_ps512(flo), fhi, 1);
    if (kept) counts = _mm512_maskz_mov_ps(static_cast<__mmask16>(kept[j / 64] >> (j % 64)),
                                           counts);
    _mm512_mask_storeu_ps(out + j, lanes, _mm512_mul_ps(counts, _mm512_set1_ps(scale)));
  }
#endif
  for (; j < n; ++j) {
    const float count = static_cast<float>(__builtin_popcountll(q & kb[j]));
    out[j] = (kept ? count * static_cast<float>((kept[j / 64] >> (j % 64)) & 1) : count) * scale;
  }
}

// row[j] *= keep bit j of the row's mask words, for j < n (gs.mul_(keep) of the torch path).
inline void mask_row(float* row, int64_t n, const uint64_t* kept) {
  int64_t j = 0;
#ifdef __AVX512F__
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; j < n; j += 16) {
    const int64_t len = std::min<int64_t>(16, n - j);
    const __mmask16 lanes = static_cast<__mmask16>(len == 16 ? 0xFFFF : (1u << len) - 1);
    const __m512 keep = _mm512_maskz_mov_ps(static_cast<__mmask16>(kept[j / 64] >> (j % 64)), one);
    const __m512 v = _mm512_maskz_loadu_ps(lanes, row + j);
    _mm512_mask_storeu_ps(row + j, lanes, _mm512_mul_ps(v, keep));
  }
#endif
  for (; j < n; ++j) row[j] *= static_cast<float>((kept[j / 64] >> (j % 64)) & 1);
}

// Spike bits of row i of each third (q, k, v) of one head: bit c = spike in column c.
inline void pack_bits(const float* seq, int64_t w, int64_t d, int64_t dh, int64_t head,
                      uint64_t* qb, uint64_t* kb, uint64_t* vb) {
  for (int64_t i = 0; i < w; ++i) {
    const float* row = seq + i * 3 * d + head * dh;
    qb[i] = row_bits(row, dh);
    kb[i] = row_bits(row + d, dh);
    vb[i] = row_bits(row + 2 * d, dh);
  }
}

// The attention's tasks, one per (head, sequence): out (N, W, d) from the spike bits (3, heads,
// N, W), which are first packed from `src`, the fp32 (N, W, 3d) spikes, where given (else they
// are there already, written by lif_attention_forward); with dropping, the scores are dropped
// out with keep_mask's stream at drop.seed over (heads, N, W, W), and kbits (heads, N, W,
// ceil(W / 64)) receives that mask as bits for backward (bit j % 64 of word j / 64 of row i:
// element (i, j) kept), 1/32 of the scores' bytes: drawn again in backward, it cost a tenth of
// that pass.
void attention_tasks(const float* src, uint64_t* bp, int64_t n_seq, int64_t w, int64_t d,
                     int64_t heads, float alpha, bool dropping, const Dropout& drop, float* dst,
                     uint64_t* kbits) {
  const int64_t dh = d / heads, d3 = 3 * d, words = (w + 63) / 64;
  at::parallel_for(0, heads * n_seq, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(w * w);  // (W, W): alpha * kept count
    std::vector<uint8_t> keep(dropping ? w * w + 8 : 0);  // the task's keep mask
    std::vector<float> vf(src ? 0 : w * dh);  // v's rows as floats, from its bits
    for (int64_t it = begin; it < end; ++it) {
      // a sequence's heads one after another (its rows, read by each, stay in cache); the
      // elements of the dropout stream are numbered head-major, task = head * N + n
      const int64_t n = it / heads, head = it % heads, task = head * n_seq + n;
      uint64_t* qb = bp + ((0 * heads + head) * n_seq + n) * w;
      uint64_t* kb = bp + ((1 * heads + head) * n_seq + n) * w;
      uint64_t* vb = bp + ((2 * heads + head) * n_seq + n) * w;
      const float* v;  // rows of v, of stride vs
      int64_t vs;
      if (src) {
        const float* seq = src + n * w * d3;  // (W, 3d)
        if (head == 0 && n + 1 < n_seq)  // the next sequence's rows, while this one's compute
          for (int64_t e = 0; e < w * d3; e += 16) __builtin_prefetch(seq + w * d3 + e);
        pack_bits(seq, w, d, dh, head, qb, kb, vb);
        v = seq + 2 * d + head * dh;
        vs = d3;
      } else {
        for (int64_t i = 0; i < w; ++i) bits_to_floats(vb[i], dh, vf.data() + i * dh);
        v = vf.data();
        vs = dh;
      }
      if (dropping) {  // the task's elements of the stream from task * W * W
        const uint8_t* kp = keep_bytes(drop, task * w * w, w * w, keep.data());
        uint64_t* kept = kbits + task * w * words;  // (W, words): the mask as bits, for backward
        for (int64_t i = 0; i < w; ++i)
          for (int64_t b = 0; b < words; ++b)
            kept[i * words + b] = byte_bits(kp + i * w + 64 * b, std::min<int64_t>(64, w - 64 * b));
      }
      for (int64_t i = 0; i < w; ++i)  // scores[i][j] = (count * keep) * alpha
        count_row(qb[i], kb, w, dropping ? kbits + task * w * words + i * words : nullptr, alpha,
                  scores.data() + i * w);
      // out[i] = sum_j scores[i][j] v[j]
      weighted_rows_any(dst + n * w * d + head * dh, d, scores.data(), w, 1, v, vs, w, w, dh,
                        1.0f);
    }
  });
}

// Tensors for the attention's outputs: out (N, W, d), bits (3, heads, N, W), keep (heads, N, W,
// ceil(W / 64)) with dropping, else empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_outputs(int64_t n_seq, int64_t w,
                                                                 int64_t d, int64_t heads,
                                                                 bool dropping,
                                                                 const at::TensorOptions& options) {
  at::Tensor out = at::empty({n_seq, w, d}, options);
  at::Tensor bits = at::empty({3, heads, n_seq, w}, options.dtype(at::kLong));
  at::Tensor keep = at::empty(dropping ? at::IntArrayRef{heads, n_seq, w, (w + 63) / 64}
                                       : at::IntArrayRef{0},
                              options.dtype(at::kLong));
  return {out, bits, keep};
}

// (out (N, W, d), bits (3, heads, N, W), keep) from the fp32 spikes qkv (N, W, 3d); see
// attention_tasks.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& qkv_in, int64_t heads, double alpha, int64_t seed, int64_t threshold,
    bool dropping) {
  check_input(qkv_in, "qkv");
  TORCH_CHECK(qkv_in.dim() == 3 && qkv_in.size(2) % 3 == 0, "qkv must be (N, W, 3d)");
  const at::Tensor qkv = qkv_in.contiguous();
  const int64_t n_seq = qkv.size(0), w = qkv.size(1), d = qkv.size(2) / 3;
  TORCH_CHECK(heads > 0 && d % heads == 0 && d / heads <= kMaxHead,
              "heads must divide d into heads of at most 64");
  auto [out, bits, keep] = attention_outputs(n_seq, w, d, heads, dropping, qkv.options());
  if (qkv.numel() == 0) return {out, bits, keep};
  attention_tasks(qkv.data_ptr<float>(), reinterpret_cast<uint64_t*>(bits.data_ptr<int64_t>()),
                  n_seq, w, d, heads, static_cast<float>(alpha), dropping,
                  Dropout{static_cast<uint64_t>(seed), static_cast<int16_t>(threshold)},
                  out.data_ptr<float>(),
                  dropping ? reinterpret_cast<uint64_t*>(keep.data_ptr<int64_t>()) : nullptr);
  return {out, bits, keep};
}

// The Q/K/V LIF and the attention that reads its spikes, in one operator: LIF(x + bias) of the
// fused projection's currents x (T, B, W, 3d) writes its membranes (for backward) and, instead
// of fp32 spikes, their bits in the attention's layout (3, heads, T * B, W). The spikes were a
// (T, B, W, 3d) fp32 tensor that the LIF wrote and the attention read back only to pack into
// these bits: 44 MB each way per d64 layer. Blocks of whole rows (of 3d neurons) per thread;
// the arithmetic is lif_step's, so spikes and membranes are bitwise those of the two passes.
// One time step of LIF(a + bias) for rows r0 .. r0 + nr of 3d neurons each (a, bias, states u,
// s: nr * 3d values, row after row; out: as many floats of scratch): writes the membranes at
// mem_t (the step's (rows, 3d) membranes, when kept) and the spikes' bits into the attention's
// layout (3, heads, T * B, W). Out of line for the restrict of its pointers (see pair_step).
struct SpikeBits {
  uint64_t* bits;
  int64_t batch, w, d, heads, n_seq;
};

template <bool kKeepMembranes>
__attribute__((noinline)) void lif_bits_step(int64_t t, int64_t r0, int64_t nr, float beta,
                                             const float* __restrict__ a,
                                             const float* __restrict__ bias,
                                             float* __restrict__ u, float* __restrict__ s,
                                             float* __restrict__ out, float* mem_t,
                                             const SpikeBits& sb) {
  const int64_t d3 = 3 * sb.d, dh = sb.d / sb.heads, n = nr * d3;
  const float decay = t == 0 ? 0.0f : beta;
  for (int64_t j = 0; j < n; ++j) {  // lif_step's arithmetic (kBias, no dropout)
    const float c = a[j] + bias[j];
    const float v = t == 0 ? c : (u[j] * decay + c) - s[j];
    const float spike = v > kThreshold ? 1.0f : 0.0f;
    u[j] = v;
    s[j] = spike;
    out[j] = spike;
  }
  if (kKeepMembranes) stream_floats(mem_t + r0 * d3, u, n);
  for (int64_t rr = 0; rr < nr; ++rr) {  // row r0 + rr = (b, i): sequence t * B + b
    const int64_t row = r0 + rr, seq = t * sb.batch + row / sb.w, i = row % sb.w;
    for (int64_t third = 0; third < 3; ++third)
      for (int64_t head = 0; head < sb.heads; ++head)
        sb.bits[((third * sb.heads + head) * sb.n_seq + seq) * sb.w + i] =
            row_bits(out + rr * d3 + third * sb.d + head * dh, dh);
  }
}

template <bool kKeepMembranes>
void lif_bits_chunks(const float* a, int64_t sa, const float* bias_p, const SpikeBits& sb,
                     float* mem, float beta, int64_t steps) {
  const int64_t d3 = 3 * sb.d, rows = sb.batch * sb.w, neurons = rows * d3;
  const int64_t per_chunk = kChunk / d3;  // rows per block
  at::parallel_for(0, rows, 4 * per_chunk, [&](int64_t begin, int64_t end) {
    float u[kChunk], s[kChunk], bias[kChunk], out[kChunk];
    tile_bias(bias_p, d3, 0, per_chunk * d3, bias);  // blocks start at a row
    for (int64_t r0 = begin; r0 < end; r0 += per_chunk) {
      const int64_t nr = std::min(per_chunk, end - r0), n = nr * d3, i0 = r0 * d3;
      for (int64_t t = 0; t < steps; ++t) {
        if (t + 1 < steps && sa != 0)  // the next step's currents lie on other pages
          for (int64_t j = 0; j < n; j += 16) __builtin_prefetch(a + (t + 1) * sa + i0 + j);
        lif_bits_step<kKeepMembranes>(t, r0, nr, beta, a + t * sa + i0, bias, u, s, out,
                                      kKeepMembranes ? mem + t * neurons : nullptr, sb);
      }
    }
    stream_fence();
  });
}

// (out (T, B, W, d), membranes (T, B, W, 3d) or, without keep, undefined, bits, keep mask):
// see lif_bits_chunks and attention_tasks. Needs 3d <= kChunk (a row per block).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lif_attention_forward(
    const at::Tensor& x_in, const at::Tensor& bias_in, double beta, bool keep_membranes,
    int64_t heads, double alpha, int64_t seed, int64_t threshold, bool dropping) {
  check_input(x_in, "x");
  check_input(bias_in, "bias");
  TORCH_CHECK(x_in.dim() == 4 && x_in.size(3) % 3 == 0, "x must be (T, B, W, 3d)");
  const at::Tensor x = time_major(x_in), bias = bias_in.contiguous();
  const int64_t steps = x.size(0), batch = x.size(1), w = x.size(2), d = x.size(3) / 3;
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == 3 * d, "bias must be (3d,)");
  TORCH_CHECK(heads > 0 && d % heads == 0 && d / heads <= kMaxHead && 3 * d <= kChunk,
              "heads must divide d into heads of at most 64, and 3d be at most 1024");
  at::Tensor mem = keep_membranes
      ? at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous))
      : at::Tensor();
  auto [out, bits, keep] = attention_outputs(steps * batch, w, d, heads, dropping, x.options());
  if (x.numel() == 0) return {out.view({steps, batch, w, d}), mem, bits, keep};
  auto* bp = reinterpret_cast<uint64_t*>(bits.data_ptr<int64_t>());
  const SpikeBits sb{bp, batch, w, d, heads, steps * batch};
  with_flag(keep_membranes, [&](auto k) {
    lif_bits_chunks<decltype(k)::value>(x.data_ptr<float>(), time_stride(x, x.numel() / steps),
                                        bias.data_ptr<float>(), sb,
                                        keep_membranes ? mem.data_ptr<float>() : nullptr,
                                        static_cast<float>(beta), steps);
  });
  attention_tasks(nullptr, bp, steps * batch, w, d, heads, static_cast<float>(alpha), dropping,
                  Dropout{static_cast<uint64_t>(seed), static_cast<int16_t>(threshold)},
                  out.data_ptr<float>(),
                  dropping ? reinterpret_cast<uint64_t*>(keep.data_ptr<int64_t>()) : nullptr);
  return {out.view({steps, batch, w, d}), mem, bits, keep};
}

// One (head, sequence) task of the attention's backward, with its buffers (one per thread):
// dL/dq, dL/dk, dL/dv (W, dh) each, rows of stride `os` from gq, gk, gv, from dL/dout g (W, dh)
// (rows of stride `gstride`), the task's spike bits and keep mask bits (null: no dropout).
struct AttentionBackwardTask {
  int64_t w, dh, wp, words;
  // q, k (W, dh) and vᵀ (dh, Wp) as floats; kept counts and dL/dscores / alpha
  std::vector<float> qf, kf, vt, counts, gs;

  AttentionBackwardTask(int64_t w_, int64_t dh_)
      : w(w_), dh(dh_), wp(padded(w_)), words((w_ + 63) / 64), qf(w * dh), kf(w * dh),
        vt(dh * wp, 0.0f), counts(w * w), gs(w * wp) {}

  void run(const uint64_t* qb, const uint64_t* kb, const uint64_t* vb, const uint64_t* kept,
           const float* g, int64_t gstride, float alpha, float* gq, float* gk, float* gv,
           int64_t os) {
    for (int64_t i = 0; i < w; ++i) {
      bits_to_floats(qb[i], dh, qf.data() + i * dh);
      bits_to_floats(kb[i], dh, kf.data() + i * dh);
    }
    for (int64_t c = 0; c < dh; ++c)  // by column of v: a loop over rows that vectorizes
      for (int64_t i = 0; i < w; ++i) vt[c * wp + i] = static_cast<float>((vb[i] >> c) & 1);
    // counts[i][j]: the kept count of query i and key j (the forward's mask, `kept`)
    for (int64_t i = 0; i < w; ++i)
      count_row(qb[i], kb, w, kept ? kept + i * words : nullptr, 1.0f, counts.data() + i * w);
    // dL/dv[j] = alpha * sum_i counts[i][j] g[i]  (counts read by column)
    weighted_rows_any(gv, os, counts.data(), 1, w, g, gstride, w, w, dh, alpha);
    // dL/dscores[i] / alpha = keep[i] * sum_c g[i][c] vᵀ[c]  (rows of Wp, zero past W)
    weighted_rows_any(gs.data(), wp, g, gstride, 1, vt.data(), wp, dh, w, wp, 1.0f);
    if (kept)
      for (int64_t i = 0; i < w; ++i) mask_row(gs.data() + i * wp, w, kept + i * words);
    // dL/dq[i] = alpha * sum_j gs[i][j] k[j];  dL/dk[j] = alpha * sum_i gs[i][j] q[i]
    weighted_rows_any(gq, os, gs.data(), wp, 1, kf.data(), dh, w, w, dh, alpha);
    weighted_rows_any(gk, os, gs.data(), 1, wp, qf.data(), dh, w, w, dh, alpha);
  }
};

// The keep mask's bits, checked against the attention's shape: null when empty (no dropout).
const uint64_t* keep_words(const at::Tensor& keep_bits, int64_t heads, int64_t n_seq,
                           int64_t w) {
  if (keep_bits.numel() == 0) return nullptr;
  TORCH_CHECK(keep_bits.dim() == 4 && keep_bits.size(0) == heads && keep_bits.size(1) == n_seq &&
              keep_bits.size(2) == w && keep_bits.size(3) == (w + 63) / 64 &&
              keep_bits.is_contiguous() && keep_bits.scalar_type() == at::kLong,
              "keep must be (heads, N, W, ceil(W / 64)) or empty");
  return reinterpret_cast<const uint64_t*>(keep_bits.data_ptr<int64_t>());
}

// dL/dqkv (N, W, 3d) from dL/dout (N, W, d) and the forward's bits and keep mask (empty
// without dropout).
at::Tensor attention_backward(const at::Tensor& grad_in, const at::Tensor& bits,
                              const at::Tensor& keep_bits, int64_t heads, double alpha_in) {
  check_input(grad_in, "grad");
  TORCH_CHECK(grad_in.dim() == 3 && bits.dim() == 4 && bits.size(0) == 3 && bits.size(1) == heads,
              "grad must be (N, W, d) and bits (3, heads, N, W)");
  const at::Tensor grad = grad_in.contiguous();
  const int64_t n_seq = grad.size(0), w = grad.size(1), d = grad.size(2);
  TORCH_CHECK(d % heads == 0 && d / heads <= kMaxHead && bits.size(2) == n_seq &&
              bits.size(3) == w, "bits do not match grad");
  const int64_t dh = d / heads, d3 = 3 * d, words = (w + 63) / 64;
  at::Tensor out = at::empty({n_seq, w, d3}, grad.options());
  if (grad.numel() == 0) return out;
  const float* gp = grad.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const auto* bp = reinterpret_cast<const uint64_t*>(bits.data_ptr<int64_t>());
  const uint64_t* kbits = keep_words(keep_bits, heads, n_seq, w);
  at::parallel_for(0, heads * n_seq, 4, [&](int64_t begin, int64_t end) {
    AttentionBackwardTask work(w, dh);
    for (int64_t it = begin; it < end; ++it) {
      // a sequence's heads one after another (its rows, read by each, stay in cache); the
      // elements of the dropout stream are numbered head-major, task = head * N + n
      const int64_t n = it / heads, head = it % heads, task = head * n_seq + n;
      if (head == 0 && n + 1 < n_seq)  // the next sequence's gradient rows, ahead of time
        for (int64_t e = 0; e < w * d; e += 16) __builtin_prefetch(gp + (n + 1) * w * d + e);
      float* gq = op + n * w * d3 + head * dh;  // rows of stride 3d
      work.run(bp + ((0 * heads + head) * n_seq + n) * w, bp + ((1 * heads + head) * n_seq + n) * w,
               bp + ((2 * heads + head) * n_seq + n) * w,
               kbits ? kbits + task * w * words : nullptr, gp + n * w * d + head * dh, d,
               static_cast<float>(alpha_in), gq, gq + d, gq + 2 * d, d3);
    }
  });
  return out;
}

// LIFAttention's backward: dL/dx (T, B, W, 3d) and dL/dbias (3d,) (undefined without
// bias_grad) from dL/dout (T * B, W, d), the LIF's membranes (T, B, W, 3d) and the attention's
// bits and keep mask. One task per batch row b walks time backwards: each step's attention
// backward (sequence t * B + b, every head) writes dL/dspikes (W, 3d) into cache, and the LIF's
// backward step (lif_backward_step's arithmetic) turns them into dL/dx there, so dL/dspikes,
// (T, B, W, 3d) fp32, never goes to memory (44 MB each way per d64 layer). The membranes are
// read and dL/dx written a whole sequence (W * 3d, contiguous) at a time. dL/dbias sums per
// thread, in task order, then thread order.
// lif_attention_backward's walk: per batch row b, backwards in time, the attention's backward
// of sequence t * B + b (every head) into cache, then the LIF's backward step; `sink(t, n, g)`
// takes each sequence's dL/dx (W, 3d), g, from cache (n = t * B + b). dL/dbias sums per thread
// into sums (threads x 3d) where given.
template <typename Sink>
void lif_attention_backward_walk(const float* gp, const float* up, const uint64_t* bp,
                                 const uint64_t* kbits, int64_t steps, int64_t batch, int64_t w,
                                 int64_t d, int64_t heads, float alpha, float beta, float* sums,
                                 Sink&& sink) {
  const int64_t d3 = 3 * d, n_seq = steps * batch, block = w * d3, dh = d / heads;
  const int64_t words = (w + 63) / 64;
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    AttentionBackwardTask work(w, dh);
    // dL/dspikes of a sequence (W, 3d); dL/dU[t+1]; dL/dx summed over time
    std::vector<float> spikes_grad(block), next(block), total(block);
    float* const mine = sums ? sums + at::get_thread_num() * d3 : nullptr;
    for (int64_t b = begin; b < end; ++b) {
      std::fill(total.begin(), total.end(), 0.0f);
      for (int64_t t = steps - 1; t >= 0; --t) {
        const int64_t n = t * batch + b;  // the sequence: rows n * W .. of (T * B * W, ...)
        if (t > 0) {  // the previous step's gradient and membranes, ahead of time
          for (int64_t e = 0; e < w * d; e += 16) __builtin_prefetch(gp + (n - batch) * w * d + e);
          for (int64_t e = 0; e < block; e += 16) __builtin_prefetch(up + (n - batch) * block + e);
        }
        for (int64_t head = 0; head < heads; ++head) {
          const int64_t task = head * n_seq + n;
          float* gq = spikes_grad.data() + head * dh;
          work.run(bp + ((0 * heads + head) * n_seq + n) * w,
                   bp + ((1 * heads + head) * n_seq + n) * w,
                   bp + ((2 * heads + head) * n_seq + n) * w,
                   kbits ? kbits + task * w * words : nullptr, gp + n * w * d + head * dh, d,
                   alpha, gq, gq + d, gq + 2 * d, d3);
        }
        const bool last = t == steps - 1;  // nothing flows back from after T
        lif_backward_step<false, true>(block, last, last ? 0.0f : beta, spikes_grad.data(),
                                       up + n * block, nullptr, Dropout{}, next.data(),
                                       total.data());
        sink(t, n, static_cast<const float*>(next.data()));
      }
      if (mine)
        for (int64_t i = 0; i < w; ++i)
          for (int64_t c = 0; c < d3; ++c) mine[c] += total[i * d3 + c];
    }
    stream_fence();
  });
}

// The checks and shapes of the attention's backward inputs: (steps, batch, w, d).
std::tuple<int64_t, int64_t, int64_t, int64_t> attention_backward_shapes(
    const at::Tensor& grad, const at::Tensor& mem, const at::Tensor& bits, int64_t heads) {
  check_input(grad, "grad");
  check_input(mem, "membranes");
  TORCH_CHECK(mem.dim() == 4 && mem.is_contiguous() && mem.size(3) % 3 == 0,
              "membranes must be contiguous (T, B, W, 3d)");
  const int64_t steps = mem.size(0), batch = mem.size(1), w = mem.size(2), d = mem.size(3) / 3;
  const int64_t n_seq = steps * batch;
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == n_seq && grad.size(1) == w && grad.size(2) == d,
              "grad must be (T * B, W, d)");
  TORCH_CHECK(heads > 0 && d % heads == 0 && d / heads <= kMaxHead && bits.dim() == 4 &&
              bits.size(0) == 3 && bits.size(1) == heads && bits.size(2) == n_seq &&
              bits.size(3) == w, "bits must be (3, heads, T * B, W)");
  return {steps, batch, w, d};
}

std::tuple<at::Tensor, at::Tensor> lif_attention_backward(
    const at::Tensor& grad_in, const at::Tensor& mem, const at::Tensor& bits,
    const at::Tensor& keep_bits, int64_t heads, double alpha, double beta, bool bias_grad) {
  const at::Tensor grad = grad_in.contiguous();
  const auto [steps, batch, w, d] = attention_backward_shapes(grad, mem, bits, heads);
  const int64_t block = w * 3 * d;
  at::Tensor dx = at::empty(mem.sizes(), mem.options());
  at::Tensor grad_bias = bias_grad ? at::zeros({3 * d}, mem.options()) : at::Tensor();
  if (mem.numel() == 0) return {dx, grad_bias};
  float* xp = dx.data_ptr<float>();
  const int64_t threads = at::get_num_threads();
  std::vector<float> sums(bias_grad ? threads * 3 * d : 0, 0.0f);
  lif_attention_backward_walk(
      grad.data_ptr<float>(), mem.data_ptr<float>(),
      reinterpret_cast<const uint64_t*>(bits.data_ptr<int64_t>()),
      keep_words(keep_bits, heads, steps * batch, w), steps, batch, w, d, heads,
      static_cast<float>(alpha), static_cast<float>(beta), bias_grad ? sums.data() : nullptr,
      [&](int64_t, int64_t n, const float* g) { stream_floats(xp + n * block, g, block); });
  if (bias_grad) fold_thread_sums(sums, threads, 3 * d, grad_bias.data_ptr<float>());
  return {dx, grad_bias};
}

// dL/dW of a linear layer: gᵀ @ x for dL/dY g (R, M) and the layer's input x (R, N), fp32 or its
// uint8 copy (spikes: 1 where nonzero), times `scale` (a dropped-out spike's value). R is every
// row of the batch (T * B * W, ~57,600 here), M and N the layer's widths (64..384): a GEMM whose
// long dimension is the sum's, which oneDNN ran at 55-65% of its rate on the model's other
// GEMMs (docs/benchmarks.md). Here each thread sums a contiguous range of rows into its own
// (N, Mp) buffer, dL/dWᵀ (Mp: M rounded up to 16), a block of kRows rows at a time. Per block,
// x is copied (uint8 converted) into tiles of kTileN columns laid out row after row, so that a
// tile's kTileN values of a row lie together; a tile of kTileN by kTileV vectors of 16 of M is
// summed over the block's rows in registers, each row of g read as whole vectors where it lies
// and broadcast values of x read in order. Sums start at zero in each block and are then added
// to the thread's buffer, and the threads' buffers in thread order: rows are summed in blocks,
// so the rounding error grows with kRows + R / kRows, not R.
constexpr int64_t kRows = 128;
#ifdef __AVX512F__
constexpr int kTileN = 6, kTileV = 4;  // 24 zmm accumulators, 4 for g and 1 broadcast
#else
constexpr int kTileN = 4, kTileV = 1;  // 8 ymm accumulators
#endif

#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")

// c[i][16v ..] (+)= sum_{k < depth} a(i, k) * g[k * gs + 16v ..] for i < kN, v < kV: each
// output summed over k in order by fused multiply-adds from zero in registers, then added to c
// (kAdd) or stored. a(i, k) is a[k * as + i] with kColumns (the tile's rows are columns of a:
// weight_grad's x, whose sum runs over a's rows) or a[i * as + k] (rows of a times the (depth,
// N) matrix g: a linear map's forward and dL/dx, `project_tile`). pf: rows of g to prefetch
// alongside (or null).
template <int kN, int kV, bool kColumns, bool kAdd>
inline void fma_tile(float* __restrict__ c, int64_t cs, const float* __restrict__ a, int64_t as,
                     const float* __restrict__ g, int64_t gs, int64_t depth, const float* pf) {
  vec16 acc[kN][kV] = {};
  for (int64_t k = 0; k < depth; ++k) {
    const auto* gr = reinterpret_cast<const vec16u*>(g + k * gs);
    if (pf) for (int v = 0; v < kV; ++v) __builtin_prefetch(pf + k * gs + 16 * v);
    vec16 gv[kV];
    for (int v = 0; v < kV; ++v) gv[v] = gr[v];
    for (int i = 0; i < kN; ++i) {
      const float x = kColumns ? a[k * as + i] : a[i * as + k];
      for (int v = 0; v < kV; ++v) acc[i][v] += x * gv[v];
    }
  }
  for (int i = 0; i < kN; ++i)
    for (int v = 0; v < kV; ++v) {
      auto* out = reinterpret_cast<vec16u*>(c + i * cs + 16 * v);
      *out = kAdd ? *out + acc[i][v] : acc[i][v];
    }
}

// c[i][16v ..] += sum_{k < rows} a[k * as + i] * g[k * gs + 16v ..] for i < kN, v < kV.
template <int kN, int kV>
inline void outer_tile(float* c, int64_t cs, const float* a, int64_t as, const float* g,
                       int64_t gs, int64_t rows, const float* pf) {
  fma_tile<kN, kV, true, true>(c, cs, a, as, g, gs, rows, pf);
}

// c[i][16v ..] = sum_{k < depth} a[i * as + k] * g[k * gs + 16v ..] for i < kN, v < kV: rows
// of a times the (depth, N) matrix g, each output summed over k in order by fused multiply-adds
// from zero (the accumulators start at zero and are stored, not added).
template <int kN, int kV>
inline void project_tile(float* c, int64_t cs, const float* a, int64_t as, const float* g,
                         int64_t gs, int64_t depth) {
  fma_tile<kN, kV, false, false>(c, cs, a, as, g, gs, depth, nullptr);
}

#pragma GCC pop_options

// One tile of kN rows of c (N, mp): all mp / 16 vectors of columns.
template <int kN>
void outer_row_tiles(float* c, int64_t mp, const float* a, int64_t as, const float* g, int64_t gs,
                     int64_t rows, const float* pf) {
  const int64_t vectors = mp / 16;
  int64_t v = 0;
  for (; v + kTileV <= vectors; v += kTileV)
    outer_tile<kN, kTileV>(c + 16 * v, mp, a, as, g + 16 * v, gs, rows, pf ? pf + 16 * v : nullptr);
  if constexpr (kTileV > 1) {
    const auto rest = [&](auto width) {
      outer_tile<kN, decltype(width)::value>(c + 16 * v, mp, a, as, g + 16 * v, gs, rows,
                                             pf ? pf + 16 * v : nullptr);
    };
    switch (vectors - v) {
      case 1: rest(std::integral_constant<int, 1>{}); break;
      case 2: if constexpr (kTileV > 2) rest(std::integral_constant<int, 2>{}); break;
      case 3: if constexpr (kTileV > 3) rest(std::integral_constant<int, 3>{}); break;
      default: break;
    }
  }
}

// The tile of x's columns n0 .. n0 + w (w <= kTileN), rows r0 .. r0 + rows: `a` holds them row
// after row (w values per row); `c` is the tile's first row of the (N, mp) sums.
void outer_tile_any(int w, float* c, int64_t mp, const float* a, int64_t as, const float* g,
                    int64_t gs, int64_t rows, const float* pf) {
  switch (w) {
    case 6:
      if constexpr (kTileN >= 6) return outer_row_tiles<6>(c, mp, a, as, g, gs, rows, pf);
      break;
    case 5:
      if constexpr (kTileN >= 5) return outer_row_tiles<5>(c, mp, a, as, g, gs, rows, pf);
      break;
    case 4: return outer_row_tiles<4>(c, mp, a, as, g, gs, rows, pf);
    case 3: return outer_row_tiles<3>(c, mp, a, as, g, gs, rows, pf);
    case 2: return outer_row_tiles<2>(c, mp, a, as, g, gs, rows, pf);
    case 1: return outer_row_tiles<1>(c, mp, a, as, g, gs, rows, pf);
    default: break;
  }
  TORCH_CHECK(false, "weight_grad: bad tile width");
}

// dL/dW (N, K) from the threads' sums of dL/dWᵀ, (threads, K, stride) with stride >= N (rows
// padded), added in thread order, times value.
at::Tensor fold_weight_grad(const std::vector<float>& partial, int64_t threads, int64_t k,
                            int64_t n, int64_t stride, double value,
                            const at::TensorOptions& options) {
  at::Tensor grad_w = at::empty({n, k}, options);
  float* gw = grad_w.data_ptr<float>();
  const float scale = static_cast<float>(value);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < k; ++i) {
      float sum = 0.0f;
      for (int64_t t = 0; t < threads; ++t) sum += partial[(t * k + i) * stride + j];
      gw[j * k + i] = sum * scale;
    }
  return grad_w;
}

at::Tensor weight_grad(const at::Tensor& g_in, const at::Tensor& x_in, double scale) {
  TORCH_CHECK(g_in.dim() == 2 && x_in.dim() == 2 && g_in.size(0) == x_in.size(0),
              "weight_grad needs g (R, M) and x (R, N)");
  TORCH_CHECK(g_in.device().is_cpu() && x_in.device().is_cpu() &&
              g_in.scalar_type() == at::kFloat &&
              (x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kByte),
              "weight_grad takes a float32 g and a float32 or uint8 x, on the CPU");
  const at::Tensor g = g_in.contiguous(), x = x_in.contiguous();
  const int64_t rows = g.size(0), m = g.size(1), n = x.size(1), mp = (m + 15) / 16 * 16;
  at::Tensor out = at::zeros({m, n}, g.options());
  if (out.numel() == 0 || rows == 0) return out;
  const bool bytes = x.scalar_type() == at::kByte;
  const float* gp = g.data_ptr<float>();
  const int64_t threads = at::get_num_threads();
  std::vector<float> partial(threads * n * mp, 0.0f);  // per thread: (N, Mp)
  at::parallel_for(0, rows, 4 * kRows, [&](int64_t begin, int64_t end) {
    float* c = partial.data() + at::get_thread_num() * n * mp;
    std::vector<float> converted(bytes ? kRows * n : 0);  // a block of x as floats
    std::vector<float> padded(m == mp ? 0 : kRows * mp, 0.0f);  // g's rows, zeros past M
    for (int64_t k0 = begin; k0 < end; k0 += kRows) {
      const int64_t count = std::min(kRows, end - k0);
      const float* xb = bytes ? converted.data() : x.data_ptr<float>() + k0 * n;
      if (bytes) {
        const uint8_t* x8 = x.data_ptr<uint8_t>() + k0 * n;
        for (int64_t j = 0; j < count * n; ++j) converted[j] = static_cast<float>(x8[j]);
      }
      const float* gb = gp + k0 * m;
      if (m != mp) {
        for (int64_t k = 0; k < count; ++k)
          std::memcpy(padded.data() + k * mp, gb + k * m, m * sizeof(float));
        gb = padded.data();
      }
      // the first tile of columns prefetches the next block's rows of g into the cache
      const float* next = m == mp && k0 + count < end ? gp + (k0 + count) * m : nullptr;
      for (int64_t n0 = 0; n0 < n; n0 += kTileN)
        outer_tile_any(static_cast<int>(std::min<int64_t>(kTileN, n - n0)), c + n0 * mp, mp,
                       xb + n0, n, gb, m == mp ? m : mp, count,
                       n0 == 0 ? next : nullptr);
    }
  });
  return fold_weight_grad(partial, threads, n, m, mp, scale, g.options());
}

// Linear maps with the LIF as their epilogue. A projection's currents (T * R rows of N) were
// written by the GEMM and read back by the LIF, 4 bytes each way per neuron and step (103 MB
// each way per d64 block). Here a thread takes kTileN rows of the R (fixed over time) and walks
// time: each step's currents of its rows, kTileN x N, are summed into a buffer in cache
// (`outer_tile`'s kernel: per output, products over K added in K's order by fused multiply-adds
// from zero, which is how oneDNN's kernels sum these products: bitwise its currents on the
// machines measured, tests/test_native.py) and the LIF's step reads them there, its membranes
// kept in the thread's buffers between steps. The input is read as the layer's input, or as
// its uint8 copy (spike input of value `value`: 0 or value, as the fp32 tensor holds it).
// Backward the same way round (linear_backward_rows, below): the LIF's backward step leaves
// dL/dcurrents in cache, where dL/dx and the dL/dW sums are taken from it.
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
// outlive it (a loop here, not aten ops: no kernels of its own on a profile).
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

// lif_attention_forward of the currents x @ weightᵀ (the Q/K/V projection, summed in cache a few
// rows at a time as linear_lif_forward sums them): 44 MB of currents each way per d64 block
// never go to memory. (out, membranes or undefined, bits, keep mask), as lif_attention_forward.
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
  attention_tasks(nullptr, bp, steps * batch, w, d, heads, static_cast<float>(alpha), dropping,
                  Dropout{static_cast<uint64_t>(seed), static_cast<int16_t>(threshold)},
                  out.data_ptr<float>(),
                  dropping ? reinterpret_cast<uint64_t*>(keep.data_ptr<int64_t>()) : nullptr);
  return {out.view({steps, batch, w, d}), mem, bits, keep};
}

// The backward of linear_lif_pair_forward in one pass: the pair's backward (lif_pair_backward's
// arithmetic) and the linear map's two products, dL/dx = g @ W and dL/dW = gᵀ @ x, where g =
// dL/dcurrents, read from cache: g (T * R rows of N) was written by the pair's backward and
// read back by oneDNN's dL/dx and by weight_grad (4 bytes out, 8 in, per neuron and step).
// A thread takes kBackRows rows and walks time backwards; each step's g tile feeds dL/dx of its
// rows (project_tile with the weight, written out) and the thread's dL/dW sums (outer_tile,
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

TORCH_LIBRARY(c5snn, m) {
  m.def("lif_forward(Tensor x, Tensor? residual, Tensor? bias, float beta, bool keep, "
        "bool dropping, int seed, int threshold, float factor, bool bytes) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("lif_backward(Tensor grad, Tensor mem, float beta, bool dropping, int seed, "
        "int threshold, float factor, int bias_columns) -> (Tensor, Tensor)");
  m.def("lif_pair_forward(Tensor x, Tensor bias, Tensor residual, float beta, bool keep, "
        "bool bytes, Tensor? residual8=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("lif_pair_backward(Tensor grad, Tensor mem1, Tensor mem2, float beta, "
        "int bias_columns) -> (Tensor, Tensor, Tensor)");
  m.def("keep_mask(int[] size, int seed, int threshold) -> Tensor");
  m.def("gemm(Tensor a, Tensor b) -> Tensor");
  m.def("weight_grad(Tensor g, Tensor x, float scale) -> Tensor");
  m.def("onednn_available() -> bool");
  m.def("fused_linear_available() -> bool");
  m.def("linear_lif_backward(Tensor grad, Tensor mem, Tensor x, float value, Tensor weight, "
        "float beta, bool dropping, int seed, int threshold, float factor, bool bias_grad) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("linear_lif_attention_backward(Tensor grad, Tensor mem, Tensor bits, Tensor keep, "
        "int heads, float alpha, float beta, bool bias_grad, Tensor x, float value, "
        "Tensor weight) -> (Tensor, Tensor, Tensor)");
  m.def("linear_lif_pair_backward(Tensor grad, Tensor mem1, Tensor mem2, Tensor x, float value, "
        "Tensor weight, float beta, bool bias_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_lif_attention_forward(Tensor x, Tensor? x8, float value, Tensor weight, "
        "Tensor bias, float beta, bool keep, int heads, float alpha, int seed, int threshold, "
        "bool dropping) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_lif_forward(Tensor x, Tensor? x8, float value, Tensor weight, Tensor bias, "
        "float beta, bool keep, bool dropping, int seed, int threshold, float factor, "
        "bool bytes) -> (Tensor, Tensor, Tensor)");
  m.def("linear_lif_pair_forward(Tensor x, Tensor? x8, float value, Tensor weight, Tensor bias, "
        "Tensor residual, Tensor? residual8, float beta, bool keep, bool bytes) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("attention_forward(Tensor qkv, int heads, float alpha, int seed, int threshold, "
        "bool dropping) -> (Tensor, Tensor, Tensor)");
  m.def("attention_backward(Tensor grad, Tensor bits, Tensor keep, int heads, float alpha) "
        "-> Tensor");
  m.def("lif_attention_backward(Tensor grad, Tensor mem, Tensor bits, Tensor keep, int heads, "
        "float alpha, float beta, bool bias_grad) -> (Tensor, Tensor)");
  m.def("lif_attention_forward(Tensor x, Tensor bias, float beta, bool keep, int heads, "
        "float alpha, int seed, int threshold, bool dropping) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(c5snn, CPU, m) {
  m.impl("lif_forward", &lif_forward);
  m.impl("lif_backward", &lif_backward);
  m.impl("lif_pair_forward", &lif_pair_forward);
  m.impl("lif_pair_backward", &lif_pair_backward);
  m.impl("gemm", &gemm);
  m.impl("weight_grad", &weight_grad);
  m.impl("linear_lif_pair_forward", &linear_lif_pair_forward);
  m.impl("linear_lif_forward", &linear_lif_forward);
  m.impl("linear_lif_pair_backward", &linear_lif_pair_backward);
  m.impl("linear_lif_backward", &linear_lif_backward);
  m.impl("linear_lif_attention_backward", &linear_lif_attention_backward);
  m.impl("linear_lif_attention_forward", &linear_lif_attention_forward);
  m.impl("attention_forward", &attention_forward);
  m.impl("attention_backward", &attention_backward);
  m.impl("lif_attention_forward", &lif_attention_forward);
  m.impl("lif_attention_backward", &lif_attention_backward);
}

TORCH_LIBRARY_IMPL(c5snn, CompositeExplicitAutograd, m) {
  m.impl("keep_mask", &keep_mask);  // no tensor argument to dispatch on
  m.impl("onednn_available", &onednn_available);
  m.impl("fused_linear_available", &fused_linear_available);
}
