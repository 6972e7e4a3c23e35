// c5snn's compiled CPU operators (loaded by c5snn/native.py): the LIF recurrence and the
// dropout keep mask, each one pass over memory.
//
// LIF.
// The pure-torch recurrence (c5snn/lif.py) runs ~4 elementwise ops per time step over a
// (B, W, d) slice, so every step reads and writes the membranes from memory again. Here each
// thread owns a block of neurons and walks all T steps with the membranes in a small stack
// buffer: forward reads the currents once and writes spikes (and, for backward, membranes);
// backward reads dL/dS and the membranes once and writes dL/dX.
//
//   U[t] = beta * U[t-1] + X[t] - S[t-1]      S[t] = H(U[t] - 1)
//   dL/dU[t] = dL/dS[t] / (25|U[t]-1| + 1)^2 + beta * dL/dU[t+1]
//
// The forward's float operations are those of the torch path, in its order, and the build
// disables FMA contraction (-ffp-contract=off), so spikes and membranes are bitwise the torch
// path's. The backward agrees to rounding (torch's `add_(alpha=beta)` may fuse its multiply).
// Tensors are (T, M): M neurons, contiguous; the currents may be constant over T (T-stride 0,
// the first block's input) and may be the sum of two tensors (a residual, X = a + b).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr float kThreshold = 1.0f;
constexpr float kSlope = 25.0f;
constexpr int64_t kChunk = 256;  // neurons whose membranes a thread keeps on its stack

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

template <bool kResidual, bool kKeepMembranes>
void forward_chunks(const float* a, int64_t sa, const float* b, int64_t sb, float* spikes,
                    float* mem, float beta, int64_t steps, int64_t neurons) {
  at::parallel_for(0, neurons, 4 * kChunk, [&](int64_t begin, int64_t end) {
    float u[kChunk];
    float s[kChunk];
    for (int64_t i0 = begin; i0 < end; i0 += kChunk) {
      const int64_t n = std::min(kChunk, end - i0);
      for (int64_t t = 0; t < steps; ++t) {
        const float* __restrict__ at_ = a + t * sa + i0;
        const float* __restrict__ bt = kResidual ? b + t * sb + i0 : nullptr;
        float* __restrict__ st = spikes + t * neurons + i0;
        float* __restrict__ mt = kKeepMembranes ? mem + t * neurons + i0 : nullptr;
        // t = 0: U = X (zero membrane, no reset), as the torch path's first step
        const float decay = t == 0 ? 0.0f : beta;
        for (int64_t j = 0; j < n; ++j) {
          const float x = kResidual ? at_[j] + bt[j] : at_[j];
          const float v = t == 0 ? x : (u[j] * decay + x) - s[j];
          const float spike = v > kThreshold ? 1.0f : 0.0f;
          u[j] = v;
          s[j] = spike;
          st[j] = spike;
          if (kKeepMembranes) mt[j] = v;
        }
      }
    }
  });
}

// (spikes, membranes) of LIF neurons driven by x (+ residual); membranes only when keep.
std::tuple<at::Tensor, at::Tensor> lif_forward(const at::Tensor& x_in,
                                               const std::optional<at::Tensor>& residual_in,
                                               double beta, bool keep) {
  check_input(x_in, "x");
  const at::Tensor x = time_major(x_in);
  std::optional<at::Tensor> residual;
  if (residual_in.has_value()) {
    check_input(*residual_in, "residual");
    TORCH_CHECK(residual_in->sizes() == x.sizes(), "residual must have the shape of x");
    residual = time_major(*residual_in);
  }
  const int64_t steps = x.size(0);
  const int64_t neurons = steps ? x.numel() / steps : 0;
  at::Tensor spikes = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor mem = keep ? at::empty_like(spikes) : at::Tensor();
  if (x.numel() == 0) return {spikes, mem};
  const int64_t sa = time_stride(x, neurons);
  const float b = static_cast<float>(beta);
  float* mp = keep ? mem.data_ptr<float>() : nullptr;
  if (residual.has_value()) {
    const int64_t sb = time_stride(*residual, neurons);
    if (keep)
      forward_chunks<true, true>(x.data_ptr<float>(), sa, residual->data_ptr<float>(), sb,
                                 spikes.data_ptr<float>(), mp, b, steps, neurons);
    else
      forward_chunks<true, false>(x.data_ptr<float>(), sa, residual->data_ptr<float>(), sb,
                                  spikes.data_ptr<float>(), mp, b, steps, neurons);
  } else {
    if (keep)
      forward_chunks<false, true>(x.data_ptr<float>(), sa, nullptr, 0, spikes.data_ptr<float>(),
                                  mp, b, steps, neurons);
    else
      forward_chunks<false, false>(x.data_ptr<float>(), sa, nullptr, 0, spikes.data_ptr<float>(),
                                   mp, b, steps, neurons);
  }
  return {spikes, mem};
}

// dL/dX from dL/dS (grad) and the forward's membranes, walking time backwards.
at::Tensor lif_backward(const at::Tensor& grad_in, const at::Tensor& mem, double beta) {
  check_input(mem, "membranes");
  const at::Tensor grad = grad_in.contiguous();
  TORCH_CHECK(grad.sizes() == mem.sizes() && grad.scalar_type() == at::kFloat,
              "grad must be float32 with the membranes' shape");
  at::Tensor out = at::empty_like(mem);
  const int64_t steps = mem.size(0);
  const int64_t neurons = steps ? mem.numel() / steps : 0;
  if (mem.numel() == 0) return out;
  const float b = static_cast<float>(beta);
  const float* gp = grad.data_ptr<float>();
  const float* up = mem.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, neurons, 4 * kChunk, [&](int64_t begin, int64_t end) {
    float next[kChunk];  // dL/dU[t+1]
    for (int64_t i0 = begin; i0 < end; i0 += kChunk) {
      const int64_t n = std::min(kChunk, end - i0);
      for (int64_t t = steps - 1; t >= 0; --t) {
        const float* __restrict__ gt = gp + t * neurons + i0;
        const float* __restrict__ ut = up + t * neurons + i0;
        float* __restrict__ ot = op + t * neurons + i0;
        const float decay = t == steps - 1 ? 0.0f : b;  // nothing flows back from after T
        for (int64_t j = 0; j < n; ++j) {
          float d = std::fabs(ut[j] - kThreshold) * kSlope + 1.0f;
          d = d * d;
          const float g = t == steps - 1 ? gt[j] / d : gt[j] / d + decay * next[j];
          next[j] = g;
          ot[j] = g;
        }
      }
    }
  });
  return out;
}

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

at::Tensor keep_mask(at::IntArrayRef size, int64_t seed, int64_t threshold) {
  at::Tensor keep = at::empty(size, at::TensorOptions().dtype(at::kByte));
  const int64_t n = keep.numel();
  uint8_t* kp = keep.data_ptr<uint8_t>();
  const uint64_t base = static_cast<uint64_t>(seed);
  const int16_t limit = static_cast<int16_t>(threshold);
  const int64_t words = n / 4;  // whole words; the last partial one below
  at::parallel_for(0, words, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const uint64_t word = splitmix64(base + static_cast<uint64_t>(w));
      uint32_t packed = 0;
      for (int lane = 0; lane < 4; ++lane) {
        const int16_t bits = static_cast<int16_t>(word >> (16 * lane));
        packed |= static_cast<uint32_t>(bits >= limit) << (8 * lane);
      }
      std::memcpy(kp + 4 * w, &packed, 4);  // bytes in memory order on little-endian x86
    }
  });
  if (n % 4) {
    const uint64_t word = splitmix64(base + static_cast<uint64_t>(words));
    for (int64_t lane = 0; lane < n % 4; ++lane)
      kp[4 * words + lane] = static_cast<int16_t>(word >> (16 * lane)) >= limit ? 1 : 0;
  }
  return keep;
}

}  // namespace

TORCH_LIBRARY(c5snn, m) {
  m.def("lif_forward(Tensor x, Tensor? residual, float beta, bool keep) -> (Tensor, Tensor)");
  m.def("lif_backward(Tensor grad, Tensor mem, float beta) -> Tensor");
  m.def("keep_mask(int[] size, int seed, int threshold) -> Tensor");
}

TORCH_LIBRARY_IMPL(c5snn, CPU, m) {
  m.impl("lif_forward", &lif_forward);
  m.impl("lif_backward", &lif_backward);
}

TORCH_LIBRARY_IMPL(c5snn, CompositeExplicitAutograd, m) {
  m.impl("keep_mask", &keep_mask);  // no tensor argument to dispatch on
}
