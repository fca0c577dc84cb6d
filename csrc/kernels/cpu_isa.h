// Which vector instruction set the kernels are compiled for, shared by every kernel file: x86-64
// builds carry AVX2/FMA/F16C functions (target attribute, chosen at run time after a CPU check) beside
// portable ones; aarch64 builds use NEON, which every arm64 CPU has.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <immintrin.h>
#define AF_X86 1
#define AF_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace anemll {
namespace kernels {
// AVX2 and FMA as the compiler's runtime check sees them (which includes the OS saving the AVX state);
// F16C from CPUID leaf 1 directly, since clang before 16 rejects "f16c" in __builtin_cpu_supports.
inline bool cpu_has_avx2() {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return false;
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C) != 0;
}
}  // namespace kernels
}  // namespace anemll
#elif defined(__aarch64__)
#include <arm_neon.h>
#define AF_NEON 1
#endif
