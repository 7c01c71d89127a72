// CPU decode-step kernels that are not about a weight format: one query per head attending its sequence's cached
// rows (the context split across threads, flash-decoding), RMSNorm with the residual add before it, and
// DeepSeek's interleaved rotary. fp32 or bf16 tensors, arithmetic in fp32. Built with -ffp-contract=off: the norm
// and the rotary round each product as torch's unfused ops do; attention asks for its FMAs explicitly.
// Nothing here throws: an input a kernel does not take comes back as an undefined tensor (None in Python).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__FMA__)
#include <immintrin.h>
#endif

#include "amx_tiles.h"

namespace {

// ---- elements: fp32 or bf16 (raw bits), read and written as fp32 ----------------------------------------------
inline float bf16_value(uint16_t bits) {
  const uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t bf16_bits(float f) {  // round to nearest even, NaN kept, as torch rounds
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

template <class T>
struct Elem;
template <>
struct Elem<float> {
  static float load(const float* p, int64_t i) { return p[i]; }
  static void store(float* p, int64_t i, float v) { p[i] = v; }
  static float round(float v) { return v; }
};
template <>
struct Elem<uint16_t> {
  static float load(const uint16_t* p, int64_t i) { return bf16_value(p[i]); }
  static void store(uint16_t* p, int64_t i, float v) { p[i] = bf16_bits(v); }
  static float round(float v) { return bf16_value(bf16_bits(v)); }
};

// ---- SIMD vectors: VW fp32 lanes, and VW pairs of bf16 widened to fp32 as the even and the odd element ----------
// A bf16 is the high half of an fp32: the even element of a 32-bit lane shifted up, the odd one masked.
#if defined(__AVX512F__)
constexpr int64_t VW = 16;
using vf = __m512;
using vb = __m512i;
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vset1(float a) { return _mm512_set1_ps(a); }
inline vb vb_load(const uint16_t* p) { return _mm512_loadu_si512(p); }
inline vb vb_set1(uint32_t x) { return _mm512_set1_epi32(int(x)); }
inline vf bf_even(vb v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
inline vf bf_odd(vb v) { return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xffff0000u)))); }
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define KRASIS_BF16_DOT 1  // vdpbf16ps: 32 bf16 products a step, pairs summed in fp32 (no widening)
inline vf bf_dot(vf acc, vb a, vb b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
// The bf16 elements of rows a and b interleaved into pairs (a low, b high), per 128-bit lane: its first 4 columns
// from pairs_low, its last 4 from pairs_high.
inline vb pairs_low(vb a, vb b) { return _mm512_unpacklo_epi16(a, b); }
inline vb pairs_high(vb a, vb b) { return _mm512_unpackhi_epi16(a, b); }
#endif
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t VW = 8;
using vf = __m256;
using vb = __m256i;
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vset1(float a) { return _mm256_set1_ps(a); }
inline vb vb_load(const uint16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline vb vb_set1(uint32_t x) { return _mm256_set1_epi32(int(x)); }
inline vf bf_even(vb v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
inline vf bf_odd(vb v) { return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xffff0000u)))); }
#else
constexpr int64_t VW = 4;
typedef float vf __attribute__((vector_size(16)));
typedef uint32_t vb __attribute__((vector_size(16)));
inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
inline vf vset1(float a) { return vf{a, a, a, a}; }
inline vb vb_set1(uint32_t x) { return vb{x, x, x, x}; }
inline vb vb_load(const uint16_t* p) {
  vb v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vf bf_even(vb v) { return (vf)(v << 16); }
inline vf bf_odd(vb v) { return (vf)(v & 0xffff0000u); }
#endif
#ifndef KRASIS_BF16_DOT
#define KRASIS_BF16_DOT 0
#endif
inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
typedef uint32_t vu __attribute__((vector_size(sizeof(vf))));  // the lanes' bits

// Each lane rounded to T: bf16 to nearest even as bf16_bits rounds (a NaN kept as it is), fp32 as it is.
template <class T>
inline vf round_lanes(vf x) {
  if constexpr (std::is_same_v<T, float>) return x;
  const vu u = (vu)x, rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  return x == x ? (vf)rounded : x;
}
inline float vsum(vf v) {
  float s = 0.f;
  for (int64_t i = 0; i < VW; ++i) s += v[i];
  return s;
}

// e^x for x <= 0 (scores minus their maximum), within ~2 ulp: x = n ln2 + r, |r| <= ln2 / 2, Cephes' polynomial.
// n is read from the bits of x log2 e + 1.5 * 2^23 (its low mantissa bits), never converted: the same steps lane by
// lane in vexp_nonpositive.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float shifted = x * 1.44269504f + 12582912.0f;  // round to nearest (|x log2 e| < 2^22)
  const float n = shifted - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  uint32_t bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  bits = (bits - 0x4b400000u + 127u) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline vf vmax(vf a, vf b) { return a < b ? b : a; }  // std::max lane by lane

inline vf vexp_nonpositive(vf x) {
  x = vmax(x, vset1(-87.0f));
  const vf shifted = x * vset1(1.44269504f) + vset1(12582912.0f);
  const vf n = shifted - vset1(12582912.0f);
  const vf r = (x - n * vset1(0.693359375f)) + n * vset1(2.12194440e-4f);
  vf p = vset1(1.9875691500e-4f);
  p = p * r + vset1(1.3981999507e-3f);
  p = p * r + vset1(8.3334519073e-3f);
  p = p * r + vset1(4.1665795894e-2f);
  p = p * r + vset1(1.6666665459e-1f);
  p = p * r + vset1(5.0000001201e-1f);
  p = p * (r * r) + r + vset1(1.0f);
  return p * (vf)(((vu)shifted - 0x4b400000u + 127u) << 23);
}

// ---- decode attention -------------------------------------------------------------------------------------------
// The G query heads of a KV head lie across the SIMD lanes (L lanes: G rounded up to whole vectors), so no sum is
// ever reduced across lanes: a score step broadcasts one key element of a cached row (bf16: a pair) into the query
// vectors of all G heads, the softmax runs lane by lane, and the weighted sum broadcasts each head's probability
// into the value columns. The rows stream through in blocks of BLOCK, the softmax merged online from block to
// block, so a block's rows are still in L2 when its values (MLA: a prefix of the same rows) are read.
template <class T>
constexpr bool PAIR_DOT = KRASIS_BF16_DOT && std::is_same_v<T, uint16_t>;  // vdpbf16ps on bf16 pairs as stored
template <class T>
constexpr int64_t KEY_STEP = std::is_same_v<T, uint16_t> ? 2 : 1;  // key elements one broadcast carries
template <class T>
constexpr int64_t QUERY_PARTS = std::is_same_v<T, uint16_t> && !PAIR_DOT<T> ? 2 : 1;  // query vectors a step

constexpr int64_t BLOCK = 128;  // rows of one softmax block (MLA bf16: 147 KB of rows, in L2 until the values)
// Registers: a score tile sums SCORE_ROWS rows (at most) x HV head vectors (HV_MAX at most) in SCORE_SUMS; a value
// tile sums NH_MAX heads (at most) x 2 vectors of columns.
#if defined(__AVX512F__)
constexpr int SCORE_SUMS = 16, SCORE_ROWS = 12, HV_MAX = 2, NH_MAX = 8;  // of 32 (and 12 row pointers)
#else
constexpr int SCORE_SUMS = 12, SCORE_ROWS = 8, HV_MAX = 4, NH_MAX = 6;  // of 16
#endif
// Work items of a call: chunks of a sequence's rows for one KV head, of one size whatever the thread count (so the
// sums, and the bits, do not depend on it): about TARGET_ITEMS of them, MIN_CHUNK to MAX_CHUNK rows each. Fewer,
// longer items write and merge less state ([G][Dv] fp32 each, 32 KB for MLA); enough of them keep a socket busy.
constexpr int64_t TARGET_ITEMS = 64, MIN_CHUNK = 32, MAX_CHUNK = 4096;

// One work item: query heads [G] of one KV head over cached rows [r0, r1) of one sequence.
struct Item {
  int64_t b, h, r0, r1;
};

struct Views {  // k [N, Hkv, D], v [N, Hkv, Dv]: element strides; G query heads per KV head in L lanes; row r of a
  int64_t G, L, D, Dv, Hkv;  // sequence is cache row slots[r] (r itself when there are no slots)
  int64_t kn, kh, vn, vh;
  const int64_t* slots;
};

// fn.operator()<n>() for a runtime 1 <= n <= N.
template <int N, class F>
void dispatch(int64_t n, const F& fn) {
  if constexpr (N > 1)
    if (n < N) return dispatch<N - 1>(n, fn);
  fn.template operator()<N>();
}

// The G query rows [G][D] of one KV head as the score tiles read them: 4-byte cells [steps][QUERY_PARTS][L], a step
// KEY_STEP key elements; bf16 pairs as stored for vdpbf16ps (and for AMX tiles: `pairs`, one part a step), else
// fp32 (bf16: the step's even elements, then its odd ones). Lanes past G, and the element past an odd D, are zero.
template <class T>
void pack_queries(const T* q, int64_t G, int64_t D, int64_t L, float* out, bool pairs) {
  constexpr int64_t S = KEY_STEP<T>;
  const bool as_pairs = std::is_same_v<T, uint16_t> && (PAIR_DOT<T> || pairs);
  const int64_t P = as_pairs ? 1 : QUERY_PARTS<T>, steps = (D + S - 1) / S;
  std::fill(out, out + steps * P * L, 0.f);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t j = 0; j < steps; ++j) {
      const int64_t d = j * S;
      float* cell = out + j * P * L + g;
      if constexpr (std::is_same_v<T, uint16_t>)
        if (as_pairs) {
          const uint32_t bits = q[g * D + d] | (d + 1 < D ? uint32_t(q[g * D + d + 1]) << 16 : 0u);
          std::memcpy(cell, &bits, sizeof bits);
          continue;
        }
      for (int64_t part = 0; part < S && d + part < D; ++part) cell[part * L] = Elem<T>::load(q, g * D + d + part);
    }
}

// One key step into the sums acc[i][h] of NR rows k_i and HV head vectors: the step's query vectors (qj) times the
// rows' elements d (and d + 1 for bf16, unless `lone`: the last element of an odd D) broadcast.
template <class T, int HV, int NR>
inline __attribute__((always_inline)) void score_step(vf (&acc)[NR][HV], const float* qj, int64_t L,
                                                      const T* const* k, int64_t d, bool lone) {
  if constexpr (std::is_same_v<T, float>) {
    vf x[HV];
#pragma GCC unroll 4
    for (int h = 0; h < HV; ++h) x[h] = vload(qj + h * VW);
#pragma GCC unroll 16
    for (int i = 0; i < NR; ++i) {
      const vf key = vset1(k[i][d]);
#pragma GCC unroll 4
      for (int h = 0; h < HV; ++h) acc[i][h] = vfma(x[h], key, acc[i][h]);
    }
  } else {
    const auto pair = [&](int i) {  // elements d (low half) and d + 1 of row i, in every 32-bit lane
      uint32_t bits = k[i][d];
      if (!lone) std::memcpy(&bits, k[i] + d, sizeof bits);
      return vb_set1(bits);
    };
    if constexpr (PAIR_DOT<T>) {
#if KRASIS_BF16_DOT
      vb x[HV];
#pragma GCC unroll 4
      for (int h = 0; h < HV; ++h) x[h] = vb_load(reinterpret_cast<const uint16_t*>(qj + h * VW));
#pragma GCC unroll 16
      for (int i = 0; i < NR; ++i) {
        const vb key = pair(i);
#pragma GCC unroll 4
        for (int h = 0; h < HV; ++h) acc[i][h] = bf_dot(acc[i][h], x[h], key);
      }
#endif
    } else {
      vf even[HV], odd[HV];
#pragma GCC unroll 4
      for (int h = 0; h < HV; ++h) even[h] = vload(qj + h * VW), odd[h] = vload(qj + L + h * VW);
#pragma GCC unroll 16
      for (int i = 0; i < NR; ++i) {
        const vb key = pair(i);
        const vf e = bf_even(key), o = bf_odd(key);
#pragma GCC unroll 4
        for (int h = 0; h < HV; ++h) acc[i][h] = vfma(odd[h], o, vfma(even[h], e, acc[i][h]));
      }
    }
  }
}

// s[i * L + c] = round(q_c . k_i) * scale for NR rows k_i and the HV * VW lanes c of q (packed queries from a head
// vector on, `q_step` cells a key step): scores rounded to T, as a matmul in T rounds them. Not inlined: in a
// function of its own the tile's row pointers stay in registers (inlined, GCC kept some in mask registers).
template <class T, int HV, int NR>
__attribute__((noinline)) void scores_tile(const float* q, int64_t q_step, int64_t L, const T* const* k, int64_t D,
                                           float* s, float scale) {
  vf acc[NR][HV];
#pragma GCC unroll 16
  for (int i = 0; i < NR; ++i)
#pragma GCC unroll 4
    for (int h = 0; h < HV; ++h) acc[i][h] = vset1(0.f);
  const int64_t steps = D / KEY_STEP<T>;
  for (int64_t j = 0; j < steps; ++j) score_step<T, HV, NR>(acc, q + j * q_step, L, k, j * KEY_STEP<T>, false);
  if (D % KEY_STEP<T>) score_step<T, HV, NR>(acc, q + steps * q_step, L, k, D - 1, true);
  for (int i = 0; i < NR; ++i)
    for (int h = 0; h < HV; ++h) vstore(s + i * L + h * VW, round_lanes<T>(acc[i][h]) * vset1(scale));
}

// The scores s [n][L] of a block's n rows k, head vectors HV_MAX at a time, rows in tiles of what the registers hold
// and the rest in tiles of 8, 4, 2 and 1 (a one-row tile waits on its one sum's latency at every step).
template <class T>
void block_scores(const Views& w, const float* q, const T* const* k, int64_t n, float* s, float scale) {
  const int64_t q_step = QUERY_PARTS<T> * w.L, vectors = w.L / VW;
  for (int64_t hv = 0; hv < vectors; hv += HV_MAX)
    dispatch<HV_MAX>(std::min<int64_t>(HV_MAX, vectors - hv), [&]<int HV>() {
      constexpr int NR = std::min(SCORE_ROWS, std::max(1, SCORE_SUMS / HV));
      static_assert(NR <= 16, "the rest of a block takes at most one tile of 8, 4, 2 and 1 rows each");
      int64_t i = 0;
      const auto tile = [&]<int R>() {
        scores_tile<T, HV, R>(q + hv * VW, q_step, w.L, k + i, w.D, s + i * w.L + hv * VW, scale);
        i += R;
      };
      while (i + NR <= n) tile.template operator()<NR>();
      if constexpr (NR > 8) if (i + 8 <= n) tile.template operator()<8>();
      if constexpr (NR > 4) if (i + 4 <= n) tile.template operator()<4>();
      if constexpr (NR > 2) if (i + 2 <= n) tile.template operator()<2>();
      if (i < n) tile.template operator()<1>();
    });
}

// A block's scores s [n][L] -> e^(s - m) per lane against the running maxima m [L], rounded to T (as torch rounds
// the probabilities before the weighted sum); bf16 also as pairs of consecutive rows when given `pairs`
// [ceil(n / 2)][L] (an odd block's last row paired with 0). m and l (sums of the unrounded e^(s - m)) move on to
// include the block; alpha [L] gets e^(old m - new m), the factor of the sums before it.
template <class T>
void block_softmax(float* s, int64_t n, int64_t L, float* m, float* l, float* alpha, uint32_t* pairs) {
  for (int64_t c = 0; c < L; c += VW) {
    vf top = vload(m + c);
    for (int64_t i = 0; i < n; ++i) top = vmax(top, vload(s + i * L + c));
    const vf factor = vexp_nonpositive(vload(m + c) - top);  // the first block: e^-inf, clamped to e^-87, times 0
    vf sum = vload(l + c) * factor;
    for (int64_t i = 0; i < n; ++i) {
      const vf p = vexp_nonpositive(vload(s + i * L + c) - top);
      sum = sum + p;
      vstore(s + i * L + c, round_lanes<T>(p));
    }
    vstore(m + c, top), vstore(l + c, sum), vstore(alpha + c, factor);
    if constexpr (std::is_same_v<T, uint16_t>)
      for (int64_t i = 0; pairs && i < n; i += 2) {
        const vu low = (vu)vload(s + i * L + c) >> 16, high = i + 1 < n ? (vu)vload(s + (i + 1) * L + c) : vu{};
        const vu pair = low | (high & 0xffff0000u);  // (a NaN's low bits kept out of its neighbour)
        std::memcpy(pairs + i / 2 * L + c, &pair, sizeof pair);
      }
  }
}

// Column t of a block of 2 VW value columns as the value tiles keep them: fp32 in order; bf16 widened, the block's
// even columns then its odd ones; bf16 pairs of two rows (vdpbf16ps), as vpunpck{l,h}wd interleave them: per
// 128-bit lane, columns 0-3 of each 8 from the low unpack, 4-7 from the high one.
template <class T>
constexpr int64_t packed_column(int64_t t) {
  const int64_t half = t / VW, k = t % VW;
  if constexpr (PAIR_DOT<T>) return k / 4 * 8 + half * 4 + k % 4;
  else if constexpr (std::is_same_v<T, uint16_t>) return 2 * k + half;
  else return t;
}

// acc[h][col, col + 2 VW) (packed) += sum_i p_i[h] v_i for NH heads (p: their lanes of the probabilities [n][L], or
// of the pairs [n / 2][L] with vdpbf16ps, n even then: an odd block's last row comes twice, paired with 0; acc:
// their rows of [G][Dv]) over the n rows v. Not inlined, as scores_tile.
template <class T, int NH>
__attribute__((noinline)) void values_tile(const float* p, const uint32_t* pairs, int64_t L, const T* const* v,
                                           int64_t n, int64_t col, float* acc, int64_t Dv) {
  vf a[NH][2];
#pragma GCC unroll 8
  for (int h = 0; h < NH; ++h) a[h][0] = vload(acc + h * Dv + col), a[h][1] = vload(acc + h * Dv + col + VW);
  if constexpr (PAIR_DOT<T>) {
#if KRASIS_BF16_DOT
    for (int64_t i = 0; i < n; i += 2) {
      const vb x = vb_load(v[i] + col), y = vb_load(v[i + 1] + col);
      const vb low = pairs_low(x, y), high = pairs_high(x, y);
      const uint32_t* pi = pairs + i / 2 * L;
#pragma GCC unroll 8
      for (int h = 0; h < NH; ++h) {
        const vb weight = vb_set1(pi[h]);
        a[h][0] = bf_dot(a[h][0], low, weight);
        a[h][1] = bf_dot(a[h][1], high, weight);
      }
    }
#endif
  } else {
    for (int64_t i = 0; i < n; ++i) {
      vf x0, x1;
      if constexpr (std::is_same_v<T, float>) {
        x0 = vload(v[i] + col), x1 = vload(v[i] + col + VW);
      } else {
        const vb x = vb_load(v[i] + col);
        x0 = bf_even(x), x1 = bf_odd(x);
      }
#pragma GCC unroll 8
      for (int h = 0; h < NH; ++h) {
        const vf weight = vset1(p[i * L + h]);
        a[h][0] = vfma(weight, x0, a[h][0]);
        a[h][1] = vfma(weight, x1, a[h][1]);
      }
    }
  }
  for (int h = 0; h < NH; ++h) vstore(acc + h * Dv + col, a[h][0]), vstore(acc + h * Dv + col + VW, a[h][1]);
}

// acc [G][Dv] (packed) += the block's probabilities times its n value rows v (n + 1 pointers: the last repeated):
// column blocks outer, so a block's columns of the rows stay in L1 from one tile of heads to the next.
template <class T>
void block_values(const Views& w, const float* p, const uint32_t* pairs, const T* const* v, int64_t n, float* acc) {
  const int64_t whole = w.Dv - w.Dv % (2 * VW), tiles = (w.G + NH_MAX - 1) / NH_MAX;
  const int64_t per_tile = (w.G + tiles - 1) / tiles, rows = PAIR_DOT<T> ? n + n % 2 : n;
  for (int64_t col = 0; col < whole; col += 2 * VW)
    for (int64_t g = 0; g < w.G; g += per_tile)
      dispatch<NH_MAX>(std::min(per_tile, w.G - g), [&]<int NH>() {
        values_tile<T, NH>(p + g, pairs + g, w.L, v, rows, col, acc + g * w.Dv, w.Dv);
      });
  for (int64_t g = 0; g < w.G; ++g)  // the columns past the whole blocks
    for (int64_t i = 0; i < n; ++i)
      for (int64_t d = whole; d < w.Dv; ++d) acc[g * w.Dv + d] += p[i * w.L + g] * Elem<T>::load(v[i], d);
}

// ---- decode attention on AMX tiles (bf16; 16 query lanes a KV head; key and value widths multiples of 32) ----------
// Scores as S^T = K Q^T: tiles of 16 cached rows by 32 key elements, loaded straight from the cache (copied when the
// rows are not evenly spaced), times tiles of the queries' element pairs. Weighted sums as O += P V with the value
// rows loaded straight as well: a tile's 4-byte cells then pair two adjacent columns of one row, so each 16 rows of
// probabilities come as two tiles, one with each probability in the low half of its cell (it meets the even
// columns), one in the high half (the odd columns): acc keeps each 32 columns as their 16 even, then 16 odd ones.

// The next block's rows, fetched into L2 a few lines at a time while this block computes (`pump` at each tile step
// of its scores and its values), so that memory stays busy through the whole block: a core has few requests in
// flight, and the rows of a burst of them would wait their turn behind each other. Row by row, line by line.
struct Fetch {
  const char* const* k = nullptr;
  const char* const* v = nullptr;
  int64_t n = 0, key_lines = 0, lines = 0, per = 0, row = 0, line = 0;

  // The next_n rows at keys[i] (key_bytes each) and values[i] (value_bytes each; null: MLA's values lie in its
  // keys), spread over `slots` pumps.
  void start(const void* const* keys, const void* const* values, int64_t next_n, int64_t key_bytes,
             int64_t value_bytes, int64_t slots) {
    k = reinterpret_cast<const char* const*>(keys), v = reinterpret_cast<const char* const*>(values);
    n = next_n, row = 0, line = 0, key_lines = (key_bytes + 63) / 64;
    lines = key_lines + (v ? (value_bytes + 63) / 64 : 0);
    per = (n * lines + slots - 1) / std::max<int64_t>(1, slots);
  }
  void pump() { pump(per); }
  void pump(int64_t count) {
    for (; count > 0 && row < n; --count) {
      __builtin_prefetch(line < key_lines ? k[row] + line * 64 : v[row] + (line - key_lines) * 64, 0, 2);
      if (++line == lines) line = 0, ++row;
    }
  }
  void finish() { pump(n * lines); }
};

// Column t of a block of 32 value columns as the AMX tiles keep them (even columns, then odd ones).
constexpr int64_t tile_column(int64_t t) { return t < 16 ? 2 * t : 2 * (t - 16) + 1; }

#if KRASIS_AMX
static_assert(BLOCK % 32 == 0 && BLOCK <= 128, "a block's score tiles go 32 rows at a time; its values' tiles fit");

bool amx_fits(const Views& w) { return w.L == 16 && w.D % 32 == 0 && w.Dv % 32 == 0 && amx::permitted(); }

// Rows [i, i + 16) of a block as a tile's source: (first row, bytes between rows) when they are evenly spaced, else
// a copy of their first D elements in `gather` (rows past n zero).
std::pair<const uint16_t*, int64_t> tile_rows(const uint16_t* const* k, int64_t i, int64_t n, int64_t D,
                                              uint16_t* gather) {
  if (i + amx::ROWS <= n) {
    const int64_t step = k[i + 1] - k[i];
    bool even = true;
    for (int64_t r = 2; r < amx::ROWS && even; ++r) even = k[i + r] == k[i] + r * step;
    if (even) return {k[i], step * int64_t(sizeof(uint16_t))};
  }
  for (int64_t r = 0; r < amx::ROWS; ++r) {
    if (i + r < n) std::memcpy(gather + r * D, k[i + r], D * sizeof(uint16_t));
    else std::memset(gather + r * D, 0, D * sizeof(uint16_t));
  }
  return {gather, D * int64_t(sizeof(uint16_t))};
}

// Tile steps of a block of n rows at these widths (Fetch::start's slots): its scores' and its values'.
int64_t tile_steps(const Views& w, int64_t n) {
  const int64_t chunks = (n + amx::ROWS - 1) / amx::ROWS;
  return (chunks + 1) / 2 * (w.D / 32) + chunks * (w.Dv + 63) / 64;
}

// s [n][16] = round(K Q^T) * scale for a block's n rows k (as scores_tile rounds them): 32 rows at a time, the key
// elements in steps of 32, the tiles of odd steps (5-7) apart from those of even ones (2-4) so loads overlap products.
void amx_block_scores(const Views& w, const uint32_t* q, const uint16_t* const* k, int64_t n, float* s, float scale,
                      uint16_t* gather, Fetch& fetch) {
  const int64_t steps = w.D / 32;
  for (int64_t i = 0; i < n; i += 2 * amx::ROWS) {
    const auto [low, low_stride] = tile_rows(k, i, n, w.D, gather);
    const bool two = i + amx::ROWS < n;
    const auto [high, high_stride] =
        two ? tile_rows(k, i + amx::ROWS, n, w.D, gather + amx::ROWS * w.D) : std::pair{low, low_stride};
    KRASIS_TILE_ZERO(0);
    KRASIS_TILE_ZERO(1);
// Step c's products into the sums 0 and 1: the queries' tile b, the two row groups' tiles a0 and a1 (tile numbers are
// the instructions' operands, so literal).
#define KRASIS_SCORE_STEP(c, a0, a1, b)                 \
  do {                                                  \
    KRASIS_TILE_LOAD(b, q + (c) * 16 * 16, 64);         \
    KRASIS_TILE_LOAD(a0, low + (c) * 32, low_stride);   \
    KRASIS_TILE_DOT(0, a0, b);                          \
    fetch.pump();                                       \
    if (two) {                                          \
      KRASIS_TILE_LOAD(a1, high + (c) * 32, high_stride); \
      KRASIS_TILE_DOT(1, a1, b);                        \
    }                                                   \
  } while (0)
    int64_t c = 0;
    for (; c + 1 < steps; c += 2) {
      KRASIS_SCORE_STEP(c, 2, 3, 4);
      KRASIS_SCORE_STEP(c + 1, 5, 6, 7);
    }
    if (c < steps) KRASIS_SCORE_STEP(c, 2, 3, 4);
#undef KRASIS_SCORE_STEP
    KRASIS_TILE_STORE(0, s + i * 16, 64);  // rows past n land inside the block's scores, unread
    if (two) KRASIS_TILE_STORE(1, s + (i + amx::ROWS) * 16, 64);
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < 16; c += VW)
      vstore(s + i * 16 + c, round_lanes<uint16_t>(vload(s + i * 16 + c)) * vset1(scale));
}

// Rows [16c, 16c + 16) of a block's probabilities s [n][16] (rounded to bf16 by block_softmax) as the two tiles
// [16 heads][16 rows] of 4-byte cells that meet a tile of value rows: `even` with each in its cell's low half, `odd`
// in its high half; heads past G and rows past n zero.
void probability_tiles(const float* s, int64_t n, int64_t c, int64_t G, uint32_t* even, uint32_t* odd) {
  const int64_t rows = std::min<int64_t>(amx::ROWS, n - c * amx::ROWS);
  const float* p = s + c * amx::ROWS * 16;
#if defined(__AVX512F__)
  const __m512i index = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(16));
  const __mmask16 live = rows == 16 ? __mmask16(0xffff) : __mmask16((1u << rows) - 1);
  for (int64_t h = 0; h < 16; ++h) {
    const __m512i cells = h < G ? _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, index, p + h, 4)
                                : _mm512_setzero_si512();
    _mm512_storeu_si512(odd + h * 16, cells);
    _mm512_storeu_si512(even + h * 16, _mm512_srli_epi32(cells, 16));
  }
#else
  for (int64_t h = 0; h < 16; ++h)
    for (int64_t r = 0; r < 16; ++r) {
      uint32_t bits = 0;
      if (h < G && r < rows) std::memcpy(&bits, p + r * 16 + h, sizeof bits);
      odd[h * 16 + r] = bits, even[h * 16 + r] = bits >> 16;
    }
#endif
}

// acc [16][Dv] (tile_column order) += P V over a block's n rows v (probabilities s [n][16]): 64 columns at a time in
// the sums 0-3 (even and odd columns of two blocks of 32), 16 rows at a time: their probability tiles (4, 5) times
// their value rows' two blocks of columns (6, 7), loaded straight from the rows (`gather`: a copy of rows not evenly
// spaced, BLOCK x Dv).
void amx_block_values(const Views& w, const float* s, const uint16_t* const* v, int64_t n, float* acc,
                      uint32_t* probs, uint16_t* gather, Fetch& fetch) {
  const int64_t chunks = (n + amx::ROWS - 1) / amx::ROWS;
  std::pair<const uint16_t*, int64_t> rows[BLOCK / amx::ROWS];
  for (int64_t c = 0; c < chunks; ++c) {
    probability_tiles(s, n, c, w.G, probs + c * 512, probs + c * 512 + 256);
    rows[c] = tile_rows(v, c * amx::ROWS, n, w.Dv, gather + c * amx::ROWS * w.Dv);
  }
  const int64_t row_bytes = w.Dv * int64_t(sizeof(float));
  for (int64_t col = 0; col < w.Dv; col += 64) {
    const bool two = col + 32 < w.Dv;
    KRASIS_TILE_LOAD(0, acc + col, row_bytes);
    KRASIS_TILE_LOAD(1, acc + col + 16, row_bytes);
    if (two) {
      KRASIS_TILE_LOAD(2, acc + col + 32, row_bytes);
      KRASIS_TILE_LOAD(3, acc + col + 48, row_bytes);
    }
    for (int64_t c = 0; c < chunks; ++c) {
      const auto [first, stride] = rows[c];
      KRASIS_TILE_LOAD(4, probs + c * 512, 64);
      KRASIS_TILE_LOAD(5, probs + c * 512 + 256, 64);
      KRASIS_TILE_LOAD(6, first + col, stride);
      KRASIS_TILE_DOT(0, 4, 6);
      KRASIS_TILE_DOT(1, 5, 6);
      if (two) {
        KRASIS_TILE_LOAD(7, first + col + 32, stride);
        KRASIS_TILE_DOT(2, 4, 7);
        KRASIS_TILE_DOT(3, 5, 7);
      }
      fetch.pump();
    }
    KRASIS_TILE_STORE(0, acc + col, row_bytes);
    KRASIS_TILE_STORE(1, acc + col + 16, row_bytes);
    if (two) {
      KRASIS_TILE_STORE(2, acc + col + 32, row_bytes);
      KRASIS_TILE_STORE(3, acc + col + 48, row_bytes);
    }
  }
}
#endif

template <class T>
struct Scratch {  // one thread's: a block's scores, then probabilities, and their pairs; the state ([L][Dv]: whole
  std::vector<float> s, m, l, alpha, acc;  // tiles); the row pointers of the block and of the next one; on AMX, the
  std::vector<uint32_t> pairs, probs;  // probability tiles and copies of rows not evenly spaced (32 rows of keys, a
  std::vector<uint16_t> key_gather, value_gather;  // block of values)
  std::vector<const T*> keys, values, next_keys, next_values;

  // The thread's scratch, grown to fit a call's shapes: kept from call to call, as a short context's whole call
  // takes tens of microseconds and allocating (zeroing) ~100 KB a thread would be a good part of that.
  static Scratch& of_thread(const Views& w, bool tiles) {
    thread_local Scratch x;
    const auto fit = [](auto& v, int64_t n) { if (int64_t(v.size()) < n) v.resize(n); };
    fit(x.s, BLOCK * w.L), fit(x.m, w.L), fit(x.l, w.L), fit(x.alpha, w.L), fit(x.acc, w.L * w.Dv);
    fit(x.pairs, (BLOCK / 2 + 1) * w.L);
    for (auto* rows : {&x.keys, &x.values, &x.next_keys, &x.next_values}) fit(*rows, BLOCK + 1);
    if (tiles) fit(x.probs, BLOCK / 16 * 512), fit(x.key_gather, 32 * w.D), fit(x.value_gather, BLOCK * w.Dv);
    return x;
  }
};

// A block's scores s [n][L] from its rows' keys, and its values' share of acc [G][Dv]: on AMX tiles when `tiles`,
// pumping `fetch` as they go.
template <class T>
void block_scores_of(const Views& w, const float* q, int64_t n, float scale, bool tiles, Scratch<T>& x,
                     Fetch& fetch) {
#if KRASIS_AMX
  if constexpr (std::is_same_v<T, uint16_t>)
    if (tiles) {
      const auto* pairs = reinterpret_cast<const uint32_t*>(q);
      return amx_block_scores(w, pairs, x.keys.data(), n, x.s.data(), scale, x.key_gather.data(), fetch);
    }
#endif
  block_scores<T>(w, q, x.keys.data(), n, x.s.data(), scale);
}

template <class T>
void block_values_of(const Views& w, int64_t n, bool tiles, Scratch<T>& x, Fetch& fetch) {
#if KRASIS_AMX
  if constexpr (std::is_same_v<T, uint16_t>)
    if (tiles) return amx_block_values(w, x.s.data(), x.values.data(), n, x.acc.data(), x.probs.data(),
                                       x.value_gather.data(), fetch);
#endif
  block_values<T>(w, x.s.data(), x.pairs.data(), x.values.data(), n, x.acc.data());
}

// Rows [r, r + n) of item `it`: their keys and values (values[n]: the last one again, the pair of an odd n's last).
template <class T>
void block_rows(const Views& w, const T* k, const T* v, const Item& it, int64_t r, int64_t n, const T** keys,
                const T** values) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t row = w.slots ? w.slots[r + i] : r + i;
    keys[i] = k + it.h * w.kh + row * w.kn;
    values[i] = v + it.h * w.vh + row * w.vn;
  }
  values[n] = values[n - 1];
}

// One item's unnormalized softmax state: m [G] (max score), l [G] (sum of e^(s - m)), acc [G][Dv] (sum of
// e^(s - m) v, its columns in the order of `acc_columns`). q: this KV head's packed queries (their pairs on AMX
// tiles). x.keys and x.values hold the rows of the item's first block on entry (block_rows), and on return those of
// the first block of the item claim_next() gave (called once, as the last block starts; null: none). On AMX tiles
// the rows of the block after each are fetched while it computes.
template <class T, class Claim>
void attend_item(const Views& w, const float* q, const T* k, const T* v, const Item& it, const Claim& claim_next,
                 float scale, bool tiles, float* m, float* l, float* acc, Scratch<T>& x) {
  std::fill_n(x.m.begin(), w.L, -INFINITY);
  std::fill_n(x.l.begin(), w.L, 0.f);
  std::fill_n(x.acc.begin(), w.L * w.Dv, 0.f);
  [[maybe_unused]] const bool values_in_keys = v == k && w.vn == w.kn && w.vh == w.kh && w.Dv <= w.D;  // MLA's latent
  Fetch fetch;
  for (int64_t r = it.r0; r < it.r1; r += BLOCK) {
    const int64_t n = std::min(BLOCK, it.r1 - r);
    const Item* following = r + n < it.r1 ? &it : claim_next();  // whose rows come next
    if (following != nullptr) {
      const int64_t from = following == &it ? r + n : following->r0, rows = std::min(BLOCK, following->r1 - from);
      block_rows<T>(w, k, v, *following, from, rows, x.next_keys.data(), x.next_values.data());
#if KRASIS_AMX
      if (tiles) {
        const auto* values = values_in_keys ? nullptr : reinterpret_cast<const void* const*>(x.next_values.data());
        fetch.start(reinterpret_cast<const void* const*>(x.next_keys.data()), values, rows, w.D * sizeof(T),
                    w.Dv * sizeof(T), tile_steps(w, n));
      }
#endif
    }
    block_scores_of<T>(w, q, n, scale, tiles, x, fetch);
    uint32_t* pairs = PAIR_DOT<T> && !tiles ? x.pairs.data() : nullptr;  // for vdpbf16ps
    block_softmax<T>(x.s.data(), n, w.L, x.m.data(), x.l.data(), x.alpha.data(), pairs);
    for (int64_t g = 0; g < w.G; ++g)
      if (x.alpha[g] != 1.f)
#pragma omp simd
        for (int64_t d = 0; d < w.Dv; ++d) x.acc[g * w.Dv + d] *= x.alpha[g];
    block_values_of<T>(w, n, tiles, x, fetch);
    fetch.finish();
    std::swap(x.keys, x.next_keys), std::swap(x.values, x.next_values);
  }
  std::copy(x.m.begin(), x.m.begin() + w.G, m);
  std::copy(x.l.begin(), x.l.begin() + w.G, l);
  std::copy(x.acc.begin(), x.acc.begin() + w.G * w.Dv, acc);
}

// Where each of acc's Dv columns goes in the output: blocks of 32 columns on AMX tiles (tile_column), of 2 VW
// columns otherwise (packed_column), the rest in order.
template <class T>
std::vector<int64_t> acc_columns(int64_t Dv, bool tiles) {
  const int64_t width = tiles ? 32 : 2 * VW, whole = Dv - Dv % width;
  std::vector<int64_t> columns(Dv);
  for (int64_t d = 0; d < Dv; ++d)
    columns[d] = d >= whole ? d : d - d % width + (tiles ? tile_column(d % width) : packed_column<T>(d % width));
  return columns;
}

// The items of the step: each sequence's visible rows, per KV head, in chunks of one size.
std::vector<Item> plan_items(at::IntArrayRef starts, at::IntArrayRef ends, int64_t Hkv) {
  int64_t total = 0;
  for (size_t b = 0; b < starts.size(); ++b) total += (ends[b] - starts[b]) * Hkv;
  const int64_t chunk = std::clamp<int64_t>((total + TARGET_ITEMS - 1) / TARGET_ITEMS, MIN_CHUNK, MAX_CHUNK);
  std::vector<Item> items;
  for (int64_t b = 0; b < int64_t(starts.size()); ++b)
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t r = starts[b]; r < ends[b]; r += chunk) items.push_back({b, h, r, std::min(ends[b], r + chunk)});
  return items;
}

bool attention_fits(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots,
                    at::IntArrayRef starts, at::IntArrayRef ends) {
  const auto dtype = q.scalar_type();
  if (dtype != at::kFloat && dtype != at::kBFloat16) return false;
  for (const auto* t : {&q, &k, &v})
    if (t->device().type() != at::kCPU || t->scalar_type() != dtype || t->stride(-1) != 1) return false;
  if (q.dim() != 3 || k.dim() != 3 || v.dim() != 3) return false;
  const int64_t B = q.size(0), Hkv = k.size(1), N = k.size(0);
  if (v.size(0) != N || v.size(1) != Hkv || k.size(2) != q.size(2) || Hkv == 0 || q.size(1) % Hkv != 0)
    return false;
  if (int64_t(starts.size()) != B || int64_t(ends.size()) != B) return false;
  const bool indexed = slots.numel() > 0;
  if (indexed && (slots.scalar_type() != at::kLong || slots.dim() != 1 || !slots.is_contiguous() ||
                  slots.device().type() != at::kCPU))
    return false;
  const int64_t rows = indexed ? slots.numel() : N;
  for (int64_t b = 0; b < B; ++b)
    if (starts[b] < 0 || starts[b] >= ends[b] || ends[b] > rows) return false;
  if (indexed) {
    const int64_t* p = slots.data_ptr<int64_t>();
    for (int64_t i = 0; i < rows; ++i)
      if (p[i] < 0 || p[i] >= N) return false;
  }
  return true;
}

// Each (sequence, KV head)'s items merged: weights e^(m_i - max m), out = sum w_i acc_i / sum w_i l_i.
template <class T>
void merge_items(const std::vector<Item>& items, int64_t B, int64_t Hq, const Views& w, const float* m,
                 const float* l, const float* acc, const std::vector<int64_t>& columns, T* out) {
  std::vector<int64_t> first(B * w.Hkv + 1);  // items of (b, h) are [first[b * Hkv + h], first[b * Hkv + h + 1])
  int64_t group = 0;
  for (int64_t i = 0; i < int64_t(items.size()); ++i)
    for (const int64_t own = items[i].b * w.Hkv + items[i].h; group <= own;) first[group++] = i;
  while (group <= B * w.Hkv) first[group++] = int64_t(items.size());
  at::parallel_for(0, B * Hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> o(w.Dv);
    for (int64_t bq = begin; bq < end; ++bq) {
      const int64_t b = bq / Hq, h = (bq % Hq) / w.G, g = bq % w.G;
      const int64_t i0 = first[b * w.Hkv + h], i1 = first[b * w.Hkv + h + 1];
      float top = m[i0 * w.G + g], denom = 0.f;
      for (int64_t i = i0 + 1; i < i1; ++i) top = std::max(top, m[i * w.G + g]);
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t i = i0; i < i1; ++i) {
        const float weight = exp_nonpositive(m[i * w.G + g] - top);
        const float* a = acc + (i * w.G + g) * w.Dv;
        denom += weight * l[i * w.G + g];
#pragma omp simd
        for (int64_t d = 0; d < w.Dv; ++d) o[d] += weight * a[d];
      }
      for (int64_t d = 0; d < w.Dv; ++d) Elem<T>::store(out, bq * w.Dv + columns[d], o[d] / denom);
    }
  });
}

template <class T>
void attention_typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots,
                     at::IntArrayRef starts, at::IntArrayRef ends, float scale, at::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), Hkv = k.size(1), G = Hq / Hkv, D = q.size(2);
  const Views w{G, (G + VW - 1) / VW * VW, D, v.size(2), Hkv, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                slots.numel() ? slots.data_ptr<int64_t>() : nullptr};
  const at::Tensor qc = q.contiguous();  // [B, Hq, D]
  const int64_t cells = (D + KEY_STEP<T> - 1) / KEY_STEP<T> * QUERY_PARTS<T> * w.L;  // packed queries of a KV head
  at::Tensor packed = at::empty({B * Hkv * cells}, q.options().dtype(at::kFloat));
  const T* qp = static_cast<const T*>(qc.data_ptr());
  float* pp = packed.data_ptr<float>();
#if KRASIS_AMX
  const bool tiles = std::is_same_v<T, uint16_t> && amx_fits(w);
#else
  const bool tiles = false;
#endif
  at::parallel_for(0, B * Hkv, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, G * D)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) pack_queries<T>(qp + bh * G * D, G, D, w.L, pp + bh * cells, tiles);
  });
  const std::vector<Item> items = plan_items(starts, ends, Hkv);
  const int64_t count = int64_t(items.size());
  at::Tensor state = at::empty({count * G * (2 + w.Dv)}, packed.options());  // m [count, G], l [count, G], acc
  float *m = state.data_ptr<float>(), *l = m + count * G, *acc = l + count * G;
  const T* kp = static_cast<const T*>(k.data_ptr());
  const T* vp = static_cast<const T*>(v.data_ptr());
  // Items are claimed one at a time, not split into equal shares: a thread that falls behind (its core shared for a
  // while) takes fewer. Which thread computes an item does not change its sums. A thread claims its next item as it
  // starts the last block of one, so that it fetches the next one's first rows meanwhile.
  std::atomic<int64_t> claimed{0};
  const int64_t workers = std::min<int64_t>(count, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Scratch<T>& scratch = Scratch<T>::of_thread(w, tiles);
#if KRASIS_AMX
    if (tiles) amx::configure();
#endif
    int64_t i = claimed++;
    if (i < count)  // the first block's rows of the thread's first item; attend_item makes those of each next one
      block_rows<T>(w, kp, vp, items[i], items[i].r0, std::min(BLOCK, items[i].r1 - items[i].r0),
                    scratch.keys.data(), scratch.values.data());
    while (i < count) {
      int64_t next = count;
      const auto claim_next = [&]() -> const Item* { return (next = claimed++) < count ? &items[next] : nullptr; };
      const Item& it = items[i];
      attend_item<T>(w, pp + (it.b * Hkv + it.h) * cells, kp, vp, it, claim_next, scale, tiles, m + i * G, l + i * G,
                     acc + i * G * w.Dv, scratch);
      i = next;
    }
#if KRASIS_AMX
    if (tiles) amx::release();
#endif
  });
  merge_items<T>(items, B, Hq, w, m, l, acc, acc_columns<T>(w.Dv, tiles), static_cast<T*>(out.data_ptr()));
}

// q [B, Hq, D]; k [N, Hkv, D] and v [N, Hkv, Dv]: views of a KV cache layer (any strides, the last 1). Sequence b
// attends rows [starts[b], ends[b]) of the cache, or, given slots (int64 [S]), the cache rows slots[starts[b]:
// ends[b]] -> [B, Hq, Dv] in q's dtype. Scores are rounded to q's dtype before the scale, as a matmul in that
// dtype rounds them; softmax and the weighted sum stay in fp32.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots,
                            at::IntArrayRef starts, at::IntArrayRef ends, double scale) {
  if (!attention_fits(q, k, v, slots, starts, ends)) return at::Tensor();
  at::Tensor out = at::empty({q.size(0), q.size(1), v.size(2)}, q.options());
  if (out.numel() == 0) return out;  // no query heads, or values 0 wide
  if (q.scalar_type() == at::kFloat) attention_typed<float>(q, k, v, slots, starts, ends, float(scale), out);
  else attention_typed<uint16_t>(q, k, v, slots, starts, ends, float(scale), out);
  return out;
}

// Whether bf16 decode attention runs its products on AMX tiles here (built for them, and the OS grants them).
bool attention_on_tiles() {
#if KRASIS_AMX
  return amx::permitted();
#else
  return false;
#endif
}

// ---- per-head products (MLA's absorbed kv_b_proj) ----------------------------------------------------------------
// Element layouts of one row as these products step through it: fp32 rows VW elements a step; bf16 rows 2 VW
// a step, widened to an even and an odd vector. Queries and value sums are kept in the same per-step order
// (`packed`: a step's even elements, then its odd ones), so neither side is ever shuffled.
template <class T>
struct Steps;
template <>
struct Steps<float> {
  static constexpr int64_t STEP = VW;
  template <int NR, class F>
  static void rows(const float* const* r, int64_t d, const F& fn) {  // fn(row, vector, its offset in the step)
#pragma GCC unroll 8
    for (int i = 0; i < NR; ++i) fn(i, vload(r[i] + d), 0);
  }
  static void pack(const float* x, float* out, int64_t n) { std::memcpy(out, x, n * sizeof(float)); }
  static void unpack(const float* x, float* out, int64_t n) { std::memcpy(out, x, n * sizeof(float)); }
};
template <>
struct Steps<uint16_t> {
  static constexpr int64_t STEP = 2 * VW;
  template <int NR, class F>
  static void rows(const uint16_t* const* r, int64_t d, const F& fn) {
#pragma GCC unroll 8
    for (int i = 0; i < NR; ++i) {
      const vb v = vb_load(r[i] + d);
      fn(i, bf_even(v), 0);
      fn(i, bf_odd(v), VW);
    }
  }
  static void pack(const float* x, float* out, int64_t n) {  // whole steps reordered, the tail as it is
    const int64_t whole = n - n % STEP;
    for (int64_t d = 0; d < whole; d += STEP)
      for (int64_t j = 0; j < VW; ++j) {
        out[d + j] = x[d + 2 * j];
        out[d + VW + j] = x[d + 2 * j + 1];
      }
    std::memcpy(out + whole, x + whole, (n - whole) * sizeof(float));
  }
  static void unpack(const float* x, float* out, int64_t n) {
    const int64_t whole = n - n % STEP;
    for (int64_t d = 0; d < whole; d += STEP)
      for (int64_t j = 0; j < VW; ++j) {
        out[d + 2 * j] = x[d + j];
        out[d + 2 * j + 1] = x[d + VW + j];
      }
    std::memcpy(out + whole, x + whole, (n - whole) * sizeof(float));
  }
};

constexpr int ROWS = 4;             // cached rows multiplied together (registers: 2 heads x ROWS sums)

// Query rows as the score loops read them: fp32 packed per step, fp32 as they are (the tail of a row), and with
// vdpbf16ps the bf16 rows themselves ([G][D]; null otherwise), which it multiplies as stored.
struct Queries {
  const float* packed;
  const float* plain;
  const uint16_t* bf16;
};

// s[g * stride + i] = round(q_g . k_i) * scale for query heads g < G and NR rows k, two heads at a time so each
// row vector loaded meets two query vectors.
template <class T, int NR>
void scores_rows(const Queries& q, const T* const* k, int64_t G, int64_t D, float* s, int64_t stride, float scale) {
  using S = Steps<T>;
  constexpr bool bf16_dot = KRASIS_BF16_DOT && std::is_same_v<T, uint16_t>;
  const int64_t whole = D - D % S::STEP;
  for (int64_t g = 0; g < G; g += 2) {
    const int64_t second = std::min(g + 1, G - 1);  // the same head twice when G is odd
    const float *q0 = q.packed + g * D, *q1 = q.packed + second * D;
    vf a0[NR], a1[NR];
#pragma GCC unroll 8
    for (int i = 0; i < NR; ++i) a0[i] = a1[i] = vset1(0.f);
    for (int64_t d = 0; d < whole; d += S::STEP) {
      if constexpr (bf16_dot) {
#if KRASIS_BF16_DOT
        const vb x0 = vb_load(q.bf16 + g * D + d), x1 = vb_load(q.bf16 + second * D + d);
#pragma GCC unroll 8
        for (int i = 0; i < NR; ++i) {
          const vb kv = vb_load(reinterpret_cast<const uint16_t*>(k[i]) + d);
          a0[i] = bf_dot(a0[i], x0, kv);
          a1[i] = bf_dot(a1[i], x1, kv);
        }
#endif
      } else {
        S::template rows<NR>(k, d, [&](int i, vf x, int64_t half) {
          a0[i] = vfma(vload(q0 + d + half), x, a0[i]);
          a1[i] = vfma(vload(q1 + d + half), x, a1[i]);
        });
      }
    }
    for (int i = 0; i < NR; ++i) {
      float d0 = vsum(a0[i]), d1 = vsum(a1[i]);
      for (int64_t d = whole; d < D; ++d) {
        const float x = Elem<T>::load(k[i], d);
        d0 += q.plain[g * D + d] * x;
        d1 += q.plain[second * D + d] * x;
      }
      s[g * stride + i] = Elem<T>::round(d0) * scale;
      s[second * stride + i] = Elem<T>::round(d1) * scale;
    }
  }
}

// acc_g += sum_i p[g * stride + i] * v_i for heads g < G and NR rows v; acc packed fp32 [G][Dv].
template <class T, int NR>
void values_rows(const float* p, int64_t stride, const T* const* v, int64_t G, int64_t Dv, float* acc) {
  using S = Steps<T>;
  const int64_t whole = Dv - Dv % S::STEP;
  for (int64_t g = 0; g < G; ++g) {
    float* a = acc + g * Dv;
    vf pv[NR];
#pragma GCC unroll 8
    for (int i = 0; i < NR; ++i) pv[i] = vset1(p[g * stride + i]);
    for (int64_t d = 0; d < whole; d += S::STEP) {
      vf x[2] = {vload(a + d), S::STEP > VW ? vload(a + d + VW) : vset1(0.f)};
      S::template rows<NR>(v, d, [&](int i, vf y, int64_t half) { x[half != 0] = vfma(pv[i], y, x[half != 0]); });
      vstore(a + d, x[0]);
      if (S::STEP > VW) vstore(a + d + VW, x[1]);
    }
    for (int64_t d = whole; d < Dv; ++d)
      for (int i = 0; i < NR; ++i) a[d] += p[g * stride + i] * Elem<T>::load(v[i], d);
  }
}

// fn<nr>(row pointers, index in the item) over the item's rows [r0, r1) in groups of ROWS, single rows at the end.
template <class T, class F>
void row_groups(const T* base, int64_t row_stride, const int64_t* slots, int64_t r0, int64_t r1, const F& fn) {
  const T* rows[ROWS];
  const auto row = [&](int64_t r) { return base + (slots ? slots[r] : r) * row_stride; };
  int64_t r = r0;
  for (; r + ROWS <= r1; r += ROWS) {
    for (int i = 0; i < ROWS; ++i) rows[i] = row(r + i);
    fn.template operator()<ROWS>(rows, r - r0);
  }
  for (; r < r1; ++r) {
    rows[0] = row(r);
    fn.template operator()<1>(rows, r - r0);
  }
}

constexpr int64_t HEAD_BLOCK = 128;  // weight rows (or columns) of one work item: 16 heads of 512 give 64 items

template <class T>
void heads_matmul_typed(const at::Tensor& x, const at::Tensor& w, bool transposed, at::Tensor& y) {
  // x [M, H, K] (unit last stride), y [M, H, N], both in T; per head its M rows: as given (xraw, the rows vdpbf16ps
  // multiplies), in fp32 (xh), fp32 packed by steps, and the fp32 sums yh, all [H, M, ...]
  const int64_t M = x.size(0), H = x.size(1), K = x.size(2), N = y.size(2);
  std::vector<T> xraw(H * M * K);
  std::vector<float> xh(H * M * K), packed(H * M * K), yh(H * M * N);
  const T* xp = static_cast<const T*>(x.data_ptr());
  for (int64_t h = 0; h < H; ++h)
    for (int64_t m = 0; m < M; ++m) {
      const T* row = xp + m * x.stride(0) + h * x.stride(1);
      const int64_t at = (h * M + m) * K;
      std::copy(row, row + K, xraw.begin() + at);
      for (int64_t k = 0; k < K; ++k) xh[at + k] = Elem<T>::load(row, k);
      Steps<T>::pack(xh.data() + at, packed.data() + at, K);
    }
  const T* wp = static_cast<const T*>(w.data_ptr());
  const int64_t blocks = (N + HEAD_BLOCK - 1) / HEAD_BLOCK;
  at::parallel_for(0, H * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(M * HEAD_BLOCK);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / blocks, n0 = item % blocks * HEAD_BLOCK, n1 = std::min(N, n0 + HEAD_BLOCK);
      const float* xrows = xh.data() + h * M * K;
      float* yrows = yh.data() + h * M * N;
      const T* wh = wp + h * w.stride(0);
      if (transposed) {  // y[m][n] = x_m . w[n]: the rows of w are the keys of `scores_rows`
        const Queries q{packed.data() + h * M * K, xrows, reinterpret_cast<const uint16_t*>(xraw.data()) + h * M * K};
        row_groups(wh, w.stride(1), nullptr, n0, n1, [&]<int NR>(const T* const* rows, int64_t i) {
          scores_rows<T, NR>(q, rows, M, K, yrows + n0 + i, N, 1.0f);
        });
      } else {  // y[m] = sum_k x[m][k] w[k]: the rows of w are the values of `values_rows`, columns [n0, n1)
        const int64_t width = n1 - n0;
        std::fill(acc.begin(), acc.begin() + M * width, 0.f);
        row_groups(wh + n0, w.stride(1), nullptr, 0, K, [&]<int NR>(const T* const* rows, int64_t k) {
          values_rows<T, NR>(xrows + k, K, rows, M, width, acc.data());
        });
        for (int64_t m = 0; m < M; ++m) Steps<T>::unpack(acc.data() + m * width, yrows + m * N + n0, width);
      }
    }
  });
  T* out = static_cast<T*>(y.data_ptr());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t n = 0; n < N; ++n) Elem<T>::store(out, (m * H + h) * N + n, yh[(h * M + m) * N + n]);
}

// x [M, H, K]; w [H, N, K] when `transposed` (y_h = x_h w_h^T, as F.linear per head), else [H, K, N] (y_h = x_h w_h);
// x and w any strides with the last 1 (w: a view of kv_b_proj's weight) -> y [M, H, N] in x's dtype, sums in fp32.
at::Tensor heads_matmul(const at::Tensor& x, const at::Tensor& w, bool transposed) {
  const auto dtype = x.scalar_type();
  if ((dtype != at::kFloat && dtype != at::kBFloat16) || w.scalar_type() != dtype || x.dim() != 3 || w.dim() != 3 ||
      x.device().type() != at::kCPU || w.device().type() != at::kCPU || w.stride(2) != 1 || w.size(0) != x.size(1) ||
      w.size(transposed ? 2 : 1) != x.size(2) || (x.size(2) > 1 && x.stride(2) != 1))
    return at::Tensor();
  at::Tensor y = at::empty({x.size(0), x.size(1), w.size(transposed ? 1 : 2)}, x.options());
  if (dtype == at::kFloat) heads_matmul_typed<float>(x, w, transposed, y);
  else heads_matmul_typed<uint16_t>(x, w, transposed, y);
  return y;
}

constexpr int64_t PARALLEL_ELEMENTS = 1 << 15;  // less elementwise work than this: one thread (waking more costs more)

// ---- RMSNorm ------------------------------------------------------------------------------------------------------
// y = weight * round(x * rsqrt(mean(x^2) + eps)), per row of x [T, H]: the products rounded as torch rounds them.
template <class T>
void rms_norm_rows(const T* x, const T* weight, T* y, int64_t rows, int64_t H, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * H;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < H; ++i) {
      const float v = Elem<T>::load(xr, i);
      sum += v * v;
    }
    const float rstd = 1.0f / std::sqrt(sum / float(H) + eps);
    for (int64_t i = 0; i < H; ++i) {
      const float normed = Elem<T>::round(Elem<T>::load(xr, i) * rstd);
      Elem<T>::store(y + r * H, i, Elem<T>::load(weight, i) * normed);
    }
  }
}

bool norm_fits(const at::Tensor& x, const at::Tensor& weight) {
  const auto dtype = x.scalar_type();
  return (dtype == at::kFloat || dtype == at::kBFloat16) && x.device().type() == at::kCPU && x.dim() >= 1 &&
         weight.scalar_type() == dtype && weight.device().type() == at::kCPU && weight.dim() == 1 &&
         weight.size(0) == x.size(-1) && weight.is_contiguous();
}

at::Tensor norm_into(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t H = x.size(-1), rows = H ? xc.numel() / H : 0;
  const int64_t grain = std::max<int64_t>(1, PARALLEL_ELEMENTS / std::max<int64_t>(1, H));  // a decode row: 1 thread
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    if (x.scalar_type() == at::kFloat)
      rms_norm_rows(xc.data_ptr<float>() + begin * H, weight.data_ptr<float>(), y.data_ptr<float>() + begin * H,
                    end - begin, H, float(eps));
    else
      rms_norm_rows(static_cast<const uint16_t*>(xc.data_ptr()) + begin * H,
                    static_cast<const uint16_t*>(weight.data_ptr()), static_cast<uint16_t*>(y.data_ptr()) + begin * H,
                    end - begin, H, float(eps));
  });
  return y;
}

// x [..., H], weight [H] of x's dtype -> the norm, or undefined.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  if (!norm_fits(x, weight)) return at::Tensor();
  return norm_into(x, weight, eps);
}

// (x + y, its norm): the add rounded to x's dtype, as torch adds, then the norm of the sum.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight,
                                                double eps) {
  if (!norm_fits(x, weight) || y.sizes() != x.sizes() || y.scalar_type() != x.scalar_type() ||
      y.device().type() != at::kCPU)
    return {at::Tensor(), at::Tensor()};
  const at::Tensor xc = x.contiguous(), yc = y.contiguous();
  at::Tensor sum = at::empty_like(xc);
  at::parallel_for(0, xc.numel(), PARALLEL_ELEMENTS, [&](int64_t begin, int64_t end) {
    if (x.scalar_type() == at::kFloat) {
      const float *a = xc.data_ptr<float>(), *b = yc.data_ptr<float>();
      float* s = sum.data_ptr<float>();
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) s[i] = a[i] + b[i];
    } else {
      const auto *a = static_cast<const uint16_t*>(xc.data_ptr()), *b = static_cast<const uint16_t*>(yc.data_ptr());
      auto* s = static_cast<uint16_t*>(sum.data_ptr());
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) s[i] = bf16_bits(bf16_value(a[i]) + bf16_value(b[i]));
    }
  });
  return {sum, norm_into(sum, weight, eps)};
}

// ---- interleaved rotary (DeepSeek) --------------------------------------------------------------------------------
// x [T, heads, d] (fp32 or bf16), cos and signed sin fp32 [T, 1, d] -> x * cos + swapped * sin per pair (2i, 2i+1),
// swapped = (odd, even): each output adds the same two rounded fp32 products as the torch formula, then rounds.
template <class T>
void rotate_rows(const T* x, const float* cos, const float* sin, T* y, int64_t tokens, int64_t heads, int64_t d,
                 int64_t x_token, int64_t x_head, int64_t c_token, int64_t s_token) {
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < heads; ++h) {
      const T* xr = x + t * x_token + h * x_head;
      T* yr = y + (t * heads + h) * d;
      const float *c = cos + t * c_token, *s = sin + t * s_token;
      for (int64_t i = 0; i < d; i += 2) {
        const float even = Elem<T>::load(xr, i), odd = Elem<T>::load(xr, i + 1);
        Elem<T>::store(yr, i, even * c[i] + odd * s[i]);
        Elem<T>::store(yr, i + 1, odd * c[i + 1] + even * s[i + 1]);
      }
    }
}

at::Tensor rotary_interleaved(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const auto dtype = x.scalar_type();
  if ((dtype != at::kFloat && dtype != at::kBFloat16) || x.dim() != 3 || x.size(2) % 2 || x.stride(2) != 1)
    return at::Tensor();
  for (const auto* t : {&x, &cos, &sin})
    if (t->device().type() != at::kCPU) return at::Tensor();
  for (const auto* t : {&cos, &sin})
    if (t->scalar_type() != at::kFloat || t->dim() != 3 || t->size(0) != x.size(0) || t->size(1) != 1 ||
        t->size(2) != x.size(2) || t->stride(2) != 1)
      return at::Tensor();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t heads = x.size(1), d = x.size(2);
  at::parallel_for(0, x.size(0), std::max<int64_t>(1, PARALLEL_ELEMENTS / std::max<int64_t>(1, heads * d)),
                   [&](int64_t begin, int64_t end) {
    const float *c = cos.data_ptr<float>() + begin * cos.stride(0), *s = sin.data_ptr<float>() + begin * sin.stride(0);
    if (dtype == at::kFloat)
      rotate_rows(x.data_ptr<float>() + begin * x.stride(0), c, s, y.data_ptr<float>() + begin * heads * d,
                  end - begin, heads, d, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0));
    else
      rotate_rows(static_cast<const uint16_t*>(x.data_ptr()) + begin * x.stride(0), c, s,
                  static_cast<uint16_t*>(y.data_ptr()) + begin * heads * d, end - begin, heads, d, x.stride(0),
                  x.stride(1), cos.stride(0), sin.stride(0));
  });
  return y;
}

}  // namespace

#define KRASIS_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)  // expands KRASIS_OPS_NS before TORCH_LIBRARY pastes it
KRASIS_LIBRARY(KRASIS_OPS_NS, m) {
  m.def("decode_attention", &decode_attention);
  m.def("attention_on_tiles", &attention_on_tiles);
  m.def("heads_matmul", &heads_matmul);
  m.def("rms_norm", &rms_norm);
  m.def("add_rms_norm", &add_rms_norm);
  m.def("rotary_interleaved", &rotary_interleaved);
}
