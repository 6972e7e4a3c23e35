#pragma once

#include "common.h"

namespace {

// dL/dW of a linear layer, and the FMA tiles the fused linear maps share:
//   dL/dW (M, N) = scale * gᵀ @ x       g = dL/dY (R, M), x the layer's input (R, N) or its
//                                        uint8 copy (spikes: 1 where nonzero)
// R is every row of a batch (T * B * W), M and N the layer's widths. Each thread sums a
// contiguous range of rows into its own (N, Mp) buffer, dL/dWᵀ (Mp: M rounded up to 16), a
// block of kRows rows at a time. Per block,
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

}  // namespace
