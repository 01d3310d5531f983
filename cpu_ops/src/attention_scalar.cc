// The portable kernel (no vector intrinsics; the compiler may still vectorize for the baseline ISA).
// Also used for head sizes the vector kernels do not divide into lanes.
#include <cmath>

#include "attention_kernel.h"

namespace neo {
namespace {

struct ScalarOps {
  using V = float;
  static constexpr int kLanes = 1;

  static V zero() { return 0.f; }
  static V set1(float x) { return x; }
  static V load(const float* p) { return *p; }
  static V load(const Bf16* p) { return bf16_to_f32(p->bits); }
  static V load(const F16* p) { return f16_to_f32(p->bits); }
  static void store(float* p, V x) { *p = x; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V fmadd(V a, V b, V c) { return a * b + c; }
  static V max(V a, V b) { return a > b ? a : b; }
  static float reduce_add(V x) { return x; }
  static float reduce_max(V x) { return x; }
  static V exp(V x) { return std::exp(x); }
};

}  // namespace

void attend_chunk_scalar(const ChunkWork& work) { attend_chunk_converting<ScalarOps>(work); }

}  // namespace neo
