// The LIF recurrence in one pass each way: each thread owns a block of neurons and walks all T
// steps with their state in a small stack buffer. Forward reads the currents once and writes
// spikes (and, for backward, membranes); backward reads dL/dS and the membranes once and writes
// dL/dX. The currents may carry a residual (X = a + r) or the bias of the linear layer they come
// from (X = a + bias[column], its gradient summed in the backward's pass); the same pass may drop
// the spikes out (the FFN's dropout) and write their uint8 copy for the next layer's backward.
// The forward's float operations are the torch recurrence's (c5snn/lif.py), in its order, built
// without FMA contraction: spikes and membranes are bitwise the torch path's.
//
// The pair: o = LIF1(a + bias), y = LIF2(r + o), the block's two residual sums, in one pass
// each way, so o never goes to memory. Where r is spikes, its uint8 copy is read instead.
#pragma once

#include "common.h"
#include "neuron.h"

namespace {

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
    const float v = charge(u[j], s[j], kAdd != kNone ? a[j] + b[j] : a[j], decay, t == 0);
    const float spike = fire(v);
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

// lif_step out of line: inlined into the fused callers, GCC drops the restrict of its pointers
// and leaves the loop scalar.
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

// (spikes, membranes, bytes) of LIF neurons driven by x (+ residual, or + bias over x's last
// dimension); membranes only when keep. With dropping, the spikes are dropped out (0 or
// factor) with keep_mask's stream at `seed`. With want_bytes, also their uint8 copy (1 where
// nonzero) for the layer that reads them; else an undefined tensor.
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

// One backward step of a LIF for n neurons: dL/dS (gt; with kDrop, dL/d(dropped spikes), the
// forward's draws dt), the membranes ut and dL/dU[t+1] (next) give dL/dU[t] = dL/dX[t] into
// next, summed into total with kColumnSums. Out of line, as lif_step_out_of_line.
template <bool kDrop, bool kColumnSums>
__attribute__((noinline)) void lif_backward_step(int64_t n, bool last, float decay,
                                                 const float* __restrict__ gt,
                                                 const float* __restrict__ ut,
                                                 const int16_t* __restrict__ dt, Dropout dr,
                                                 float* __restrict__ next,
                                                 float* __restrict__ total) {
  for (int64_t j = 0; j < n; ++j) {
    const float gs = kDrop ? (dt[j] >= dr.limit ? gt[j] * dr.factor : 0.0f) : gt[j];
    const float g = discharge(gs, ut[j], next[j], last, decay);
    next[j] = g;
    if (kColumnSums) total[j] += g;
  }
}

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
// The pair: o = LIF1(a + bias), y = LIF2(r + o), the block's LIF(x + LIF(W_o · mixed + b_o))
// and LIF(r1 + LIF(W_2 · hidden + b_2)). The arithmetic is the two passes', in their order:
// spikes and membranes bitwise theirs, gradients to rounding.
// One time step for n <= kChunk neurons: states u1, s1, u2, s2 (updated in place), currents a,
// the bias's values for these neurons, the residual's (r, or its uint8 copy r8 with
// kResidualBytes); writes y, its uint8 copy and both membranes. Out of line, as
// lif_step_out_of_line.
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
    const float v1 = charge(u1[j], s1[j], a[j] + bias[j], decay, t == 0);
    const float o = fire(v1);
    u1[j] = v1;
    s1[j] = o;
    const float x2 = (kResidualBytes ? static_cast<float>(rt8[j]) : rt[j]) + o;
    const float v2 = charge(u2[j], s2[j], x2, decay, t == 0);
    const float y = fire(v2);
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
// into total with kColumnSums. Out of line, as lif_step_out_of_line.
template <bool kColumnSums>
__attribute__((noinline)) void pair_backward_step(int64_t n, bool last, float decay,
                                                  const float* __restrict__ gt,
                                                  const float* __restrict__ u1,
                                                  const float* __restrict__ u2,
                                                  float* __restrict__ next1,
                                                  float* __restrict__ next2,
                                                  float* __restrict__ total) {
  for (int64_t j = 0; j < n; ++j) {  // lif_backward_step's arithmetic, twice
    const float g2 = discharge(gt[j], u2[j], next2[j], last, decay);
    next2[j] = g2;
    const float g1 = discharge(g2, u1[j], next1[j], last, decay);
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
}  // namespace
