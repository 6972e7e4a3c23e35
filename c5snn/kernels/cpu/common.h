// What every compiled operator shares: the dropout stream, input checks, the blocks of neurons a
// thread walks (and their streaming stores), the per-thread sums and the backward walk over
// time. Tensors are (T, M): M neurons, contiguous; currents may be constant over T (T-stride 0).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kChunk = 1024;  // neurons whose state a thread keeps on its stack

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

// Calls f with std::bool_constant<v>: a runtime flag as a template argument.
template <typename F>
void with_flag(bool v, F&& f) {
  v ? f(std::true_type{}) : f(std::false_type{});
}

// Adds per-thread sums (threads x columns, each thread's row summed in its own order) into
// out (columns,) in thread order: the same result for the same thread count.
inline void fold_thread_sums(const std::vector<float>& sums, int64_t threads, int64_t columns,
                             float* out) {
  for (int64_t t = 0; t < threads; ++t)
    for (int64_t c = 0; c < columns; ++c) out[c] += sums[t * columns + c];
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

}  // namespace
