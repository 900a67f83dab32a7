// Vector loads and stores shared by the CUDA kernels. A group of N consecutive elements moves in
// as few memory instructions as possible (16 bytes each at most, the widest load sm_80/sm_90 have)
// and is converted to or from the math type (float32; float64 for float64 data) in registers.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace fastkd::cuda {

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements one memory instruction moves when N consecutive elements of T are loaded or stored.
template <typename T, int N>
constexpr int kPerAccess = N * sizeof(T) <= 16 ? N : static_cast<int>(16 / sizeof(T));

// Loads p[0..N) as M. p must be aligned to min(16, N * sizeof(T)) bytes.
template <int N, typename M, typename T>
__device__ __forceinline__ void load_as(const T* p, M (&out)[N]) {
  constexpr int A = kPerAccess<T, N>;
  static_assert(N % A == 0, "a vector is a whole number of accesses");
#pragma unroll
  for (int i = 0; i < N; i += A) {
    const Pack<T, A> pk = *reinterpret_cast<const Pack<T, A>*>(p + i);
#pragma unroll
    for (int j = 0; j < A; ++j) out[i + j] = static_cast<M>(pk.v[j]);
  }
}

// Stores `in` to p[0..N), rounded to T. Same alignment as load_as.
template <int N, typename M, typename T>
__device__ __forceinline__ void store_as(T* p, const M (&in)[N]) {
  constexpr int A = kPerAccess<T, N>;
  static_assert(N % A == 0, "a vector is a whole number of accesses");
#pragma unroll
  for (int i = 0; i < N; i += A) {
    Pack<T, A> pk;
#pragma unroll
    for (int j = 0; j < A; ++j) pk.v[j] = static_cast<T>(in[i + j]);
    *reinterpret_cast<Pack<T, A>*>(p + i) = pk;
  }
}

// Whether `ptr` is aligned to `bytes`.
inline bool is_aligned(const void* ptr, int bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

}  // namespace fastkd::cuda
