// Which vector instruction sets this CPU offers, probed once at run time.
#pragma once

#include <string>

namespace neo {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

// The best instruction set that both this CPU and this build support; NEO_CPU_ISA
// (scalar|avx2|avx512|avx512_bf16) may lower it, for tests and benchmarks.
Isa best_isa();
// The best instruction set this CPU and build support, ignoring NEO_CPU_ISA.
Isa cpu_isa_limit();
std::string isa_name(Isa isa);
// isa_name's inverse; false for an unknown name.
bool isa_from_name(const std::string& name, Isa* isa);

}  // namespace neo
