// Included first by every CPU kernel file. setup.py compiles each csrc/cpu/<loss>.cpp once per
// CPU capability through a generated wrapper that sets the target and defines CPU_CAPABILITY
// (AVX2, AVX512); the plain compile is the DEFAULT build, which alone holds the op registration
// and picks the best compiled variant at run time. Kernels live in namespace
// fastkd::CPU_CAPABILITY, so the variants never collide (the scheme ATen uses for its kernels).
#pragma once

#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#define FASTKD_CPU_DISPATCH 1
#endif

#ifdef FASTKD_CPU_DISPATCH
#include <ATen/Version.h>

#include <string>

namespace fastkd {

enum class CpuCapability { kDefault, kAVX2, kAVX512 };

// The capability ATen itself runs with (so ATEN_CPU_CAPABILITY=avx2|default forces a variant),
// limited to the variants this build contains.
inline CpuCapability cpu_capability() {
#if defined(__x86_64__) || defined(_M_X64)
  static const CpuCapability cap = [] {
    const std::string name = at::get_cpu_capability();
    if (name == "AVX512") return CpuCapability::kAVX512;
    if (name == "AVX2") return CpuCapability::kAVX2;
    return CpuCapability::kDefault;
  }();
  return cap;
#else
  return CpuCapability::kDefault;
#endif
}

}  // namespace fastkd

#if defined(__x86_64__) || defined(_M_X64)
// Declares a kernel (a declaration such as `void f(int)`) in the AVX2 and AVX512 namespaces,
// whose definitions come from the wrapper builds of the same file.
#define FASTKD_CPU_DECLARE_VARIANTS(decl) \
  namespace fastkd {                      \
  namespace AVX512 {                      \
  decl;                                   \
  }                                       \
  namespace AVX2 {                        \
  decl;                                   \
  }                                       \
  }
// Calls fastkd::<capability>::fn(args...) for the capability chosen at run time.
#define FASTKD_CPU_DISPATCH_CALL(fn, ...)             \
  do {                                                \
    switch (::fastkd::cpu_capability()) {             \
      case ::fastkd::CpuCapability::kAVX512:          \
        ::fastkd::AVX512::fn(__VA_ARGS__);            \
        break;                                        \
      case ::fastkd::CpuCapability::kAVX2:            \
        ::fastkd::AVX2::fn(__VA_ARGS__);              \
        break;                                        \
      default:                                        \
        ::fastkd::DEFAULT::fn(__VA_ARGS__);           \
    }                                                 \
  } while (0)
#else
#define FASTKD_CPU_DECLARE_VARIANTS(decl)
#define FASTKD_CPU_DISPATCH_CALL(fn, ...) ::fastkd::DEFAULT::fn(__VA_ARGS__)
#endif

#endif  // FASTKD_CPU_DISPATCH
