// Dense bf16 weights at decode sizes: y [M, N] = x [M, K] . w [N, K]^T (+ bias), bf16 in and out,
// every sum in fp32 and rounded once, as F.linear. The weight is read from memory once per call,
// whatever M is: each tile of BR weight rows meets every row of x while it is in cache.
//
// A lane of a step sums the pair of elements (2i, 2i + 1): AVX-512 BF16 `vdpbf16ps` does it in one
// instruction (32 products); elsewhere the pair is widened to fp32 (a bf16 is the high half of an
// fp32: the even element shifted up, the odd one masked) and FMA'd, which gives the same sums up to
// fp32 rounding.
#pragma once

constexpr int HIGH_HALF = static_cast<int>(0xFFFF0000u);  // the odd bf16 of a 32-bit lane, as fp32 bits

#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr int BF_STEP = 32;  // bf16 elements per step
using vb = __m512i;
inline vb vb_load(const uint16_t* p) { return _mm512_loadu_si512(p); }
inline vf bf_even(vb v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
inline vf bf_odd(vb v) { return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(HIGH_HALF))); }
#if defined(__AVX512BF16__)
#define KRASIS_BF16_DOT 1
constexpr const char* BF16_ISA = "avx512bf16";
inline vf bf_dot(vf acc, vb w, vb x) { return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x); }
#else
constexpr const char* BF16_ISA = "avx512";
#endif
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int BF_STEP = 16;
constexpr const char* BF16_ISA = "avx2";
using vb = __m256i;
inline vb vb_load(const uint16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline vf bf_even(vb v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
inline vf bf_odd(vb v) { return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(HIGH_HALF))); }
#else
constexpr int BF_STEP = 2;
constexpr const char* BF16_ISA = "scalar";
using vb = uint32_t;
inline vb vb_load(const uint16_t* p) {
  vb v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline vf bf_even(vb v) { return bits_to_float(v << 16); }
inline vf bf_odd(vb v) { return bits_to_float(v & 0xFFFF0000u); }
#endif
#ifndef KRASIS_BF16_DOT
#define KRASIS_BF16_DOT 0
#endif

#if defined(__AVX512F__) || !defined(__AVX2__)
constexpr int BR = 4, BM = 4;  // weight rows and x rows per tile
#else
constexpr int BR = 4, BM = 2;  // 16 ymm registers: 8 sums, 4 x and 2 weight vectors
#endif

// sums[m][r] = sum_k x[m][k] * w[r][k] in fp32, for R rows of w and M rows of x, each K long.
template <int R, int M>
void bf16_tile(const uint16_t* const* w, const uint16_t* const* x, int64_t k, float (&sums)[BM][BR]) {
  // With one x row, a second sum per weight row keeps two FMA chains in flight for the widened pairs.
  constexpr int A = KRASIS_BF16_DOT || M > 1 ? 1 : 2;
  vf acc[R][M][A];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m)
      for (int a = 0; a < A; ++a) acc[r][m][a] = vzero();
  const int64_t steps_end = k / BF_STEP * BF_STEP;
  for (int64_t i = 0; i < steps_end; i += BF_STEP) {
#if KRASIS_BF16_DOT
    vb xv[M];
    for (int m = 0; m < M; ++m) xv[m] = vb_load(x[m] + i);
    for (int r = 0; r < R; ++r) {
      if (PREFETCH != 0) __builtin_prefetch(w[r] + i + (PREFETCH > 0 ? PREFETCH / 2 : R * k));
      const vb wv = vb_load(w[r] + i);
      for (int m = 0; m < M; ++m) acc[r][m][0] = bf_dot(acc[r][m][0], wv, xv[m]);
    }
#else
    vf xe[M], xo[M];
    for (int m = 0; m < M; ++m) {
      const vb v = vb_load(x[m] + i);
      xe[m] = bf_even(v);
      xo[m] = bf_odd(v);
    }
    for (int r = 0; r < R; ++r) {
      if (PREFETCH != 0 && i % 32 == 0) __builtin_prefetch(w[r] + i + (PREFETCH > 0 ? PREFETCH / 2 : R * k));
      const vb v = vb_load(w[r] + i);
      const vf we = bf_even(v), wo = bf_odd(v);
      for (int m = 0; m < M; ++m) {
        acc[r][m][0] = vfma(we, xe[m], acc[r][m][0]);
        acc[r][m][A - 1] = vfma(wo, xo[m], acc[r][m][A - 1]);
      }
    }
#endif
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      float tail = 0.0f;  // K not a multiple of the step
      for (int64_t i = steps_end; i < k; ++i) tail += bf16_to_float(w[r][i]) * bf16_to_float(x[m][i]);
      vf sum = acc[r][m][0];
      for (int a = 1; a < A; ++a) sum = sum + acc[r][m][a];
      sums[m][r] = vsum(sum) + tail;
    }
}

template <int R>
void bf16_tile_rows(const uint16_t* const* w, const uint16_t* const* x, int64_t k, int64_t m, float (&sums)[BM][BR]) {
  switch (m) {
    case 1: return bf16_tile<R, 1>(w, x, k, sums);
    case 2: return bf16_tile<R, 2>(w, x, k, sums);
    case 3: return bf16_tile<R, (BM > 3 ? 3 : BM)>(w, x, k, sums);
    default: return bf16_tile<R, BM>(w, x, k, sums);
  }
}

// Rows [n0, n0 + rows) of y for every row of x; rows <= BR.
void bf16_rows(const uint16_t* w, const uint16_t* x, const uint16_t* bias, uint16_t* y, int64_t n, int64_t k,
               int64_t m, int64_t n0, int64_t rows) {
  const uint16_t* wr[BR];
  for (int64_t r = 0; r < rows; ++r) wr[r] = w + (n0 + r) * k;
  float sums[BM][BR];
  for (int64_t j = 0; j < m; j += BM) {
    const int64_t mr = std::min<int64_t>(BM, m - j);
    const uint16_t* xr[BM];
    for (int64_t i = 0; i < mr; ++i) xr[i] = x + (j + i) * k;
    if (rows == BR) {
      bf16_tile_rows<BR>(wr, xr, k, mr, sums);
    } else {
      for (int64_t r = 0; r < rows; ++r) {  // the ragged last tile, a row at a time
        float one[BM][BR];
        bf16_tile_rows<1>(wr + r, xr, k, mr, one);
        for (int64_t i = 0; i < mr; ++i) sums[i][r] = one[i][0];
      }
    }
    for (int64_t i = 0; i < mr; ++i)
      for (int64_t r = 0; r < rows; ++r) {
        const float b = bias ? bf16_to_float(bias[n0 + r]) : 0.0f;
        y[(j + i) * n + n0 + r] = float_to_bf16(sums[i][r] + b);
      }
  }
}
