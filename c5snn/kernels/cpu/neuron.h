// The LIF neuron, once for every compiled operator (snntorch's `Leaky`, DESIGN §2). Its Python
// definition, c5snn/neuron.py, holds the same constants, which tests/test_kernels.py reads back
// from the built library (`c5snn::neuron`) and compares.
//
//   forward   U[0] = X[0]                                       (membranes start at zero)
//             U[t] = beta * U[t-1] + X[t] - S[t-1] * threshold   (reset by subtraction)
//             S[t] = H(U[t] - threshold)
//   backward  dL/dU[t] = dL/dS[t] * dS/dU[t] + beta * dL/dU[t+1] (the reset term detached)
//             dS/dU = 1 / (slope * |U - threshold| + 1)^2        (fast-sigmoid surrogate)
//
// With reset to zero instead, U[t] = beta * (1 - S[t-1]) * U[t-1] + X[t] and the carry back is
// beta * (1 - S[t]): `charge` and `discharge` below are the only places that know the rule.
#pragma once

#include <cmath>

namespace {

enum class Reset { kSubtract, kZero };

constexpr float kThreshold = 1.0f;
constexpr float kSlope = 25.0f;  // snntorch.surrogate.fast_sigmoid(slope=25)
constexpr Reset kReset = Reset::kSubtract;

// The membrane U[t] from the state after step t - 1 (membrane u, spike s) and the current x;
// `first`: t = 0, where the state is zero (and decay irrelevant).
inline float charge(float u, float s, float x, float decay, bool first) {
  if (first) return x;
  if constexpr (kReset == Reset::kSubtract) return (u * decay + x) - s * kThreshold;
  return (u * (1.0f - s)) * decay + x;
}

inline float fire(float u) { return u > kThreshold ? 1.0f : 0.0f; }

// dL/dU[t] from dL/dS[t] (gs), the membrane U[t] (u) and dL/dU[t+1] (next; `last`: t = T - 1,
// where nothing flows back from after T).
inline float discharge(float gs, float u, float next, bool last, float decay) {
  float d = std::fabs(u - kThreshold) * kSlope + 1.0f;
  d = d * d;
  if (last) return gs / d;
  if constexpr (kReset == Reset::kSubtract) return gs / d + decay * next;
  return gs / d + (1.0f - fire(u)) * decay * next;
}

}  // namespace
