// The operators of c5snn's compiled CPU kernels (c5snn/kernels): each concern in its header,
// all in this one translation unit.
#include <torch/library.h>

#include "attention.h"
#include "lif.h"
#include "linear.h"
#include "neuron.h"
#include "weight_grad.h"

namespace {

// The neuron's constants as this build holds them: tests compare them with c5snn/neuron.py.
std::tuple<double, double, std::string> neuron() {
  return {kThreshold, kSlope, kReset == Reset::kSubtract ? "subtract" : "zero"};
}

// The instruction sets this build was compiled for (its -march), as the backend record names it.
std::string isa() {
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
  return "avx512+vpopcntdq";
#elif defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2+fma";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "x86-64";
#endif
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
  m.def("neuron() -> (float, float, str)");
  m.def("isa() -> str");
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
  m.impl("lif_attention_forward", &lif_attention_forward);
  m.impl("lif_attention_backward", &lif_attention_backward);
}

TORCH_LIBRARY_IMPL(c5snn, CompositeExplicitAutograd, m) {
  m.impl("keep_mask", &keep_mask);  // no tensor argument to dispatch on
  m.impl("onednn_available", &onednn_available);
  m.impl("fused_linear_available", &fused_linear_available);
  m.impl("neuron", &neuron);
  m.impl("isa", &isa);
}
