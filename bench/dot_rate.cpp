// The core's rate for the decode attention kernel's instructions, one thread: vdpbf16ps and vfmadd231ps on zmm
// registers in 12 independent chains (the score tile's shape), and the same with each step's broadcast loaded from
// memory. Prints ns per instruction; build: g++ -O2 -march=native bench/dot_rate.cpp -o /tmp/dot_rate
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

template <class F>
double ns_per(F&& body, int64_t count) {
  body();  // warm-up (and the AVX-512 frequency license)
  const auto start = std::chrono::steady_clock::now();
  body();
  return std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count() / count;
}

int main() {
  constexpr int64_t STEPS = 20'000'000;
  std::vector<uint32_t> row(4096, 0x3f803f80u);
  __m512 acc[12];
  for (auto& a : acc) a = _mm512_setzero_ps();
  const __m512i q = _mm512_set1_epi32(0x3f803f80);
  const double dot = ns_per([&] {
    for (int64_t s = 0; s < STEPS; ++s) {
      const __m512i k = _mm512_set1_epi32(int(s));
#pragma GCC unroll 12
      for (int i = 0; i < 12; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)q, (__m512bh)k);
    }
  }, STEPS * 12);
  const double dot_loaded = ns_per([&] {
    for (int64_t s = 0; s < STEPS; ++s) {
#pragma GCC unroll 12
      for (int i = 0; i < 12; ++i)
        acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)q, (__m512bh)_mm512_set1_epi32(int(row[(s + i * 96) & 4095])));
    }
  }, STEPS * 12);
  const __m512 qf = _mm512_set1_ps(1.0001f);
  const double fma = ns_per([&] {
    for (int64_t s = 0; s < STEPS; ++s) {
      const __m512 k = _mm512_set1_ps(float(s));
#pragma GCC unroll 12
      for (int i = 0; i < 12; ++i) acc[i] = _mm512_fmadd_ps(qf, k, acc[i]);
    }
  }, STEPS * 12);
  float sink = 0.f;
  for (auto& a : acc) sink += _mm512_reduce_add_ps(a);
  std::printf("ns per instruction, 12 chains: vdpbf16ps %.3f, with a loaded broadcast %.3f; vfmadd231ps %.3f (%g)\n",
              dot, dot_loaded, fma, double(sink != 0.f));
}
