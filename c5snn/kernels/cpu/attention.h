#pragma once

#include "common.h"
#include "lif.h"
#include "neuron.h"

namespace {

// Spike attention of the Q/K/V LIF's spikes, one head of one sequence per task, without softmax
// (DESIGN §2):
//   scores = dropout(q @ kᵀ) * scale      q, k, v: (W, dh) binary column slices of (N, W, 3d)
//   out    = scores @ v
// With q, k in {0, 1} and dh <= 64, q @ kᵀ is popcount(q_bits & k_bits), an exact integer; the
// keep mask is drawn inline from keep_mask's stream (numbered over (heads, N, W, W)). Backward
// keeps q, k, v and the mask as bits only. Every product is a sum of rows weighted by scalars
// (`weighted_rows`) in the rows' order, as the torch path's GEMMs sum them: forward bitwise,
// backward to rounding.
constexpr int64_t kMaxHead = 64;

inline int64_t padded(int64_t n) { return (n + 15) / 16 * 16; }

// keep[j] = 1 where element e0 + j of keep_mask's stream is kept, else 0, for j < n: whole
// words cut into bytes as keep_mask cuts them. buf must hold n + 7 bytes; returns where element
// e0's byte lies.
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

// The spike bits of one row's dh <= 64 columns (bit c: x[c] > 0.5); with AVX-512, 16 columns
// per compare into a mask register (the scalar loop does not vectorize).
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
// With AVX-512 (VPOPCNTDQ, DQ) 16 keys per step, the mask applied as a register mask.
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

// The attention's tasks, one per (head, sequence): out (N, W, d) from the spike bits (3, heads,
// N, W) that the LIF wrote; with dropping, the scores are dropped out with keep_mask's stream
// at drop.seed over (heads, N, W, W), and kbits (heads, N, W, ceil(W / 64)) receives that mask
// as bits for backward (bit j % 64 of word j / 64 of row i: element (i, j) kept).
void attention_tasks(uint64_t* bp, int64_t n_seq, int64_t w, int64_t d, int64_t heads,
                     float alpha, bool dropping, const Dropout& drop, float* dst,
                     uint64_t* kbits) {
  const int64_t dh = d / heads, words = (w + 63) / 64;
  at::parallel_for(0, heads * n_seq, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(w * w);  // (W, W): alpha * kept count
    std::vector<uint8_t> keep(dropping ? w * w + 8 : 0);  // the task's keep mask
    std::vector<float> vf(w * dh);  // v's rows as floats, from its bits
    for (int64_t it = begin; it < end; ++it) {
      // a sequence's heads one after another; the dropout stream is numbered head-major
      const int64_t n = it / heads, head = it % heads, task = head * n_seq + n;
      const uint64_t* qb = bp + ((0 * heads + head) * n_seq + n) * w;
      const uint64_t* kb = bp + ((1 * heads + head) * n_seq + n) * w;
      const uint64_t* vb = bp + ((2 * heads + head) * n_seq + n) * w;
      for (int64_t i = 0; i < w; ++i) bits_to_floats(vb[i], dh, vf.data() + i * dh);
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
      weighted_rows_any(dst + n * w * d + head * dh, d, scores.data(), w, 1, vf.data(), dh, w, w,
                        dh, 1.0f);
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

// The Q/K/V LIF and the attention that reads its spikes, in one operator: LIF(x + bias) of the
// fused projection's currents x (T, B, W, 3d) writes its membranes (for backward) and, instead
// of fp32 spikes, their bits in the attention's layout (3, heads, T * B, W). Blocks of whole
// rows (of 3d neurons) per thread; spikes and membranes bitwise lif_step's.
// One time step of LIF(a + bias) for rows r0 .. r0 + nr of 3d neurons each (a, bias, states u,
// s: nr * 3d values, row after row; out: as many floats of scratch): writes the membranes at
// mem_t (the step's (rows, 3d) membranes, when kept) and the spikes' bits. Out of line, as
// lif_step_out_of_line.
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
    const float v = charge(u[j], s[j], a[j] + bias[j], decay, t == 0);
    const float spike = fire(v);
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
  attention_tasks(bp, steps * batch, w, d, heads, static_cast<float>(alpha), dropping,
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

// LIFAttention's backward walk: one task per batch row b walks time backwards; each step's
// attention backward (sequence n = t * B + b, every head) writes dL/dspikes (W, 3d) into cache,
// where the LIF's backward step turns them into dL/dx, which `sink(t, n, g)` takes. dL/dbias
// sums per thread into sums (threads x 3d) where given, in task order.
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

}  // namespace
