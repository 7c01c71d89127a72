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
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__FMA__)
#include <immintrin.h>
#endif

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
inline vf bf_even(vb v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
inline vf bf_odd(vb v) { return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xffff0000u)))); }
#if defined(__AVX512BF16__)
#define KRASIS_BF16_DOT 1  // vdpbf16ps: 32 bf16 products a step, pairs summed in fp32 (no widening)
inline vf bf_dot(vf acc, vb a, vb b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
#endif
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t VW = 8;
using vf = __m256;
using vb = __m256i;
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vset1(float a) { return _mm256_set1_ps(a); }
inline vb vb_load(const uint16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline vf bf_even(vb v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
inline vf bf_odd(vb v) { return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xffff0000u)))); }
#else
constexpr int64_t VW = 4;
typedef float vf __attribute__((vector_size(16)));
typedef uint32_t vb __attribute__((vector_size(16)));
inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
inline vf vset1(float a) { return vf{a, a, a, a}; }
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
inline float vsum(vf v) {
  float s = 0.f;
  for (int64_t i = 0; i < VW; ++i) s += v[i];
  return s;
}

// e^x for x <= 0 (scores minus their maximum), within ~2 ulp: x = n ln2 + r, |r| <= ln2 / 2, Cephes' polynomial.
// Branch-free, so a loop of it vectorizes.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest (|x log2 e| < 2^22)
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const uint32_t bits = uint32_t(int32_t(n) + 127) << 23;  // 2^n (std::bit_cast is C++20: torch 2.11 builds C++17)
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// ---- decode attention -------------------------------------------------------------------------------------------
// Element layouts of one cached row as the kernel steps through it: fp32 rows VW elements a step; bf16 rows 2 VW
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
constexpr int64_t MAX_CHUNK = 512;  // rows of one work item: they stay in L2 from the scores to the values pass
// Work items a call aims at, whatever the thread count (so the sums, and the bits, do not depend on it): enough
// for every thread of a many-core socket, each of at least 32 rows.
constexpr int64_t TARGET_ITEMS = 256;

// One work item: query heads [G] of one KV head over cached rows [r0, r1) of one sequence.
struct Item {
  int64_t b, h, r0, r1;
};

struct Views {  // k [N, Hkv, D], v [N, Hkv, Dv]: element strides; G query heads per KV head; row r of a sequence
  int64_t G, D, Dv, Hkv;  // is cache row slots[r] (r itself when there are no slots)
  int64_t kn, kh, vn, vh;
  const int64_t* slots;
};

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

// One item's unnormalized softmax state: m [G] (max score), l [G] (sum of e^(s - m)), acc [G][Dv] (sum of
// e^(s - m) v, unpacked). q: this KV head's query heads [G][D]. scratch: fp32 [G * (MAX_CHUNK + Dv)].
template <class T>
void attend_item(const Views& w, const Queries& q, const T* k, const T* v, const Item& it, float scale, float* m,
                 float* l, float* acc, float* scratch) {
  const int64_t n = it.r1 - it.r0, G = w.G, Dv = w.Dv;
  float* s = scratch;                  // [G][n] scores, then e^(s - m)
  float* packed = s + G * MAX_CHUNK;  // [G][Dv] value sums, packed
  row_groups(k + it.h * w.kh, w.kn, w.slots, it.r0, it.r1, [&]<int NR>(const T* const* rows, int64_t i) {
    scores_rows<T, NR>(q, rows, G, w.D, s + i, n, scale);
  });
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s + g * n;
    float top = sg[0], sum = 0.f;
    for (int64_t i = 1; i < n; ++i) top = std::max(top, sg[i]);
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) {
      sg[i] = exp_nonpositive(sg[i] - top);
      sum += sg[i];
    }
    m[g] = top;
    l[g] = sum;
  }
  std::fill(packed, packed + G * Dv, 0.f);
  row_groups(v + it.h * w.vh, w.vn, w.slots, it.r0, it.r1, [&]<int NR>(const T* const* rows, int64_t i) {
    values_rows<T, NR>(s + i, n, rows, G, Dv, packed);
  });
  for (int64_t g = 0; g < G; ++g) Steps<T>::unpack(packed + g * Dv, acc + g * Dv, Dv);
}

// The items of the step: each sequence's visible rows, per KV head, in chunks of one size.
std::vector<Item> plan_items(at::IntArrayRef starts, at::IntArrayRef ends, int64_t Hkv) {
  int64_t total = 0;
  for (size_t b = 0; b < starts.size(); ++b) total += (ends[b] - starts[b]) * Hkv;
  const int64_t chunk = std::clamp<int64_t>((total + TARGET_ITEMS - 1) / TARGET_ITEMS, 32, MAX_CHUNK);
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
                 const float* l, const float* acc, T* out) {
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
      for (int64_t d = 0; d < w.Dv; ++d) Elem<T>::store(out, bq * w.Dv + d, o[d] / denom);
    }
  });
}

template <class T>
void attention_typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots,
                     at::IntArrayRef starts, at::IntArrayRef ends, float scale, at::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), Hkv = k.size(1);
  const Views w{Hq / Hkv, q.size(2), v.size(2), Hkv, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                slots.numel() ? slots.data_ptr<int64_t>() : nullptr};
  const at::Tensor qf = q.to(at::kFloat).contiguous(), qc = q.contiguous();  // [B, Hq, D]: fp32 exact for bf16
  at::Tensor qpacked = at::empty_like(qf);
  for (int64_t row = 0; row < B * Hq; ++row)
    Steps<T>::pack(qf.data_ptr<float>() + row * w.D, qpacked.data_ptr<float>() + row * w.D, w.D);
  const std::vector<Item> items = plan_items(starts, ends, Hkv);
  const int64_t count = int64_t(items.size());
  at::Tensor state = at::empty({count * w.G * (2 + w.Dv)}, qf.options());  // m [count, G], l [count, G], acc
  float *m = state.data_ptr<float>(), *l = m + count * w.G, *acc = l + count * w.G;
  const float *qp = qpacked.data_ptr<float>(), *plain = qf.data_ptr<float>();
  const auto* qb = static_cast<const uint16_t*>(qc.data_ptr());  // read only for bf16 queries
  const T* kp = static_cast<const T*>(k.data_ptr());
  const T* vp = static_cast<const T*>(v.data_ptr());
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(w.G * (MAX_CHUNK + w.Dv));
    for (int64_t i = begin; i < end; ++i) {
      const Item& it = items[i];
      const int64_t q0 = (it.b * Hq + it.h * w.G) * w.D;
      attend_item<T>(w, {qp + q0, plain + q0, qb + q0}, kp, vp, it, scale, m + i * w.G, l + i * w.G,
                     acc + i * w.G * w.Dv, scratch.data());
    }
  });
  merge_items<T>(items, B, Hq, w, m, l, acc, static_cast<T*>(out.data_ptr()));
}

// q [B, Hq, D]; k [N, Hkv, D] and v [N, Hkv, Dv]: views of a KV cache layer (any strides, the last 1). Sequence b
// attends rows [starts[b], ends[b]) of the cache, or, given slots (int64 [S]), the cache rows slots[starts[b]:
// ends[b]] -> [B, Hq, Dv] in q's dtype. Scores are rounded to q's dtype before the scale, as a matmul in that
// dtype rounds them; softmax and the weighted sum stay in fp32.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots,
                            at::IntArrayRef starts, at::IntArrayRef ends, double scale) {
  if (!attention_fits(q, k, v, slots, starts, ends)) return at::Tensor();
  at::Tensor out = at::empty({q.size(0), q.size(1), v.size(2)}, q.options());
  if (q.scalar_type() == at::kFloat) attention_typed<float>(q, k, v, slots, starts, ends, float(scale), out);
  else attention_typed<uint16_t>(q, k, v, slots, starts, ends, float(scale), out);
  return out;
}

// ---- per-head products (MLA's absorbed kv_b_proj) ----------------------------------------------------------------
constexpr int64_t HEAD_BLOCK = 128;  // weight rows (or columns) of one work item: 16 heads of 512 give 64 items

template <class T>
void heads_matmul_typed(const at::Tensor& xh, const at::Tensor& xraw, const at::Tensor& w, bool transposed,
                        at::Tensor& yh) {
  // xh fp32 and xraw as given [H, M, K] (the rows of each head together), yh fp32 [H, M, N]
  const int64_t H = xh.size(0), M = xh.size(1), K = xh.size(2), N = yh.size(2);
  const float* xp = xh.data_ptr<float>();
  float* yp = yh.data_ptr<float>();
  const T* wp = static_cast<const T*>(w.data_ptr());
  const int64_t blocks = (N + HEAD_BLOCK - 1) / HEAD_BLOCK;
  at::Tensor packed = at::empty_like(xh);
  for (int64_t row = 0; row < H * M; ++row) Steps<T>::pack(xp + row * K, packed.data_ptr<float>() + row * K, K);
  at::parallel_for(0, H * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(M * HEAD_BLOCK);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / blocks, n0 = item % blocks * HEAD_BLOCK, n1 = std::min(N, n0 + HEAD_BLOCK);
      const float* x = xp + h * M * K;
      float* y = yp + h * M * N;
      const T* wh = wp + h * w.stride(0);
      if (transposed) {  // y[m][n] = x_m . w[n]: the rows of w are the keys of `scores_rows`
        const Queries q{packed.data_ptr<float>() + h * M * K, x,
                        static_cast<const uint16_t*>(xraw.data_ptr()) + h * M * K};
        row_groups(wh, w.stride(1), nullptr, n0, n1, [&]<int NR>(const T* const* rows, int64_t i) {
          scores_rows<T, NR>(q, rows, M, K, y + n0 + i, N, 1.0f);
        });
      } else {  // y[m] = sum_k x[m][k] w[k]: the rows of w are the values of `values_rows`, columns [n0, n1)
        const int64_t width = n1 - n0;
        std::fill(acc.begin(), acc.begin() + M * width, 0.f);
        row_groups(wh + n0, w.stride(1), nullptr, 0, K, [&]<int NR>(const T* const* rows, int64_t k) {
          values_rows<T, NR>(x + k, K, rows, M, width, acc.data());
        });
        for (int64_t m = 0; m < M; ++m) Steps<T>::unpack(acc.data() + m * width, y + m * N + n0, width);
      }
    }
  });
}

// x [M, H, K]; w [H, N, K] when `transposed` (y_h = x_h w_h^T, as F.linear per head), else [H, K, N] (y_h = x_h w_h);
// w any strides with the last 1 (a view of kv_b_proj's weight) -> y [M, H, N] in x's dtype, sums in fp32.
at::Tensor heads_matmul(const at::Tensor& x, const at::Tensor& w, bool transposed) {
  const auto dtype = x.scalar_type();
  if ((dtype != at::kFloat && dtype != at::kBFloat16) || w.scalar_type() != dtype || x.dim() != 3 || w.dim() != 3 ||
      x.device().type() != at::kCPU || w.device().type() != at::kCPU || w.stride(2) != 1 || w.size(0) != x.size(1) ||
      w.size(transposed ? 2 : 1) != x.size(2))
    return at::Tensor();
  const at::Tensor xraw = x.transpose(0, 1).contiguous(), xh = xraw.to(at::kFloat);  // [H, M, K]
  at::Tensor yh = at::empty({x.size(1), x.size(0), w.size(transposed ? 1 : 2)}, xh.options());
  if (dtype == at::kFloat) heads_matmul_typed<float>(xh, xraw, w, transposed, yh);
  else heads_matmul_typed<uint16_t>(xh, xraw, w, transposed, yh);
  return yh.transpose(0, 1).to(dtype).contiguous();
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
  m.def("heads_matmul", &heads_matmul);
  m.def("rms_norm", &rms_norm);
  m.def("add_rms_norm", &add_rms_norm);
  m.def("rotary_interleaved", &rotary_interleaved);
}
