#include "cpu_features.h"

#include <cstdlib>
#include <cstring>

namespace neo {
namespace {

Isa probe() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    // The bf16 kernel needs AVX512_BF16 only (fp16 caches convert with F16C-style instructions), so
    // AMD Zen 4 and Intel Cooper Lake take it as well as Sapphire Rapids.
    if (__builtin_cpu_supports("avx512bf16")) return Isa::kAvx512Bf16;
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

Isa cap_from_env(Isa found) {
  const char* requested = std::getenv("NEO_CPU_ISA");
  Isa isa;
  if (requested != nullptr && isa_from_name(requested, &isa) && isa <= found) return isa;
  return found;
}

}  // namespace

Isa cpu_isa_limit() {
  static const Isa isa = probe();
  return isa;
}

Isa best_isa() {
  static const Isa isa = cap_from_env(cpu_isa_limit());
  return isa;
}

bool isa_from_name(const std::string& name, Isa* isa) {
  for (Isa candidate : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16}) {
    if (isa_name(candidate) == name) {
      *isa = candidate;
      return true;
    }
  }
  return false;
}

std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16: return "avx512_bf16";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kScalar: return "scalar";
  }
  return "scalar";
}

}  // namespace neo
