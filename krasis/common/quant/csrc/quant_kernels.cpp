// CPU decode kernels over q8/q4 weights (layout: formats.py). Every row of x is multiplied against
// each weight tile while it is in cache, so the weight is read from memory once per call, whatever
// M is. q8 weights are unpacked a 32-element chunk at a time into fp32 registers and multiplied
// with fp32 FMAs (the scale applied per weight, q * scale exact, or per group for a single row);
// q4 weights meet int8-quantized activations in integer dot products (q4_int8.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t CHUNK = 32;  // elements unpacked at once; group sizes and K are multiples of it
constexpr int Q8 = 0, Q4 = 1;  // format codes, as cpu_kernels.FORMAT_CODES

// ---- one SIMD vector of W floats, per ISA ------------------------------------------------------
// values_q8 returns vector v of the 32-element chunk at p as floats, unscaled.
#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr const char* ISA = "avx512";
constexpr int W = 16, NR_DEFAULT = 4, PREFETCH_DEFAULT = -1;
using vf = __m512;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset1(float a) { return _mm512_set1_ps(a); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
inline vf values_q8(const uint8_t* p, int v) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * v))));
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr const char* ISA = "avx2";
constexpr int W = 8, NR_DEFAULT = 2, PREFETCH_DEFAULT = -1;
using vf = __m256;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset1(float a) { return _mm256_set1_ps(a); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(vf a) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}
inline vf values_q8(const uint8_t* p, int v) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * v))));
}
#else
constexpr const char* ISA = "scalar";
constexpr int W = 1, NR_DEFAULT = 2, PREFETCH_DEFAULT = 0;
using vf = float;
inline vf vzero() { return 0.0f; }
inline vf vset1(float a) { return a; }
inline vf vload(const float* p) { return *p; }
inline vf vmul(vf a, vf b) { return a * b; }
inline vf vfma(vf a, vf b, vf c) { return std::fma(a, b, c); }
inline float vsum(vf a) { return a; }
inline vf values_q8(const uint8_t* p, int v) { return static_cast<float>(static_cast<int8_t>(p[v])); }
#endif

#ifdef KRASIS_NR
constexpr int NR = KRASIS_NR;  // weight rows per tile: independent memory streams and FMA chains
#else
constexpr int NR = NR_DEFAULT;
#endif
#ifdef KRASIS_PREFETCH
constexpr int PREFETCH = KRASIS_PREFETCH;  // bytes ahead of each weight row to prefetch; 0: none, -1: next tile
#else
constexpr int PREFETCH = PREFETCH_DEFAULT;
#endif
constexpr int VPC = CHUNK / W;      // vectors per chunk
constexpr int MR = 4;               // rows of x per tile; more rows re-run the tile from cache
constexpr int64_t SCALE_BLOCK = 64;  // groups (q4: chunks) whose scales are widened to fp32 at once

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// One [N, K] quantized matrix (one expert of a stack).
struct QMatrix {
  const uint8_t* q;
  const uint16_t* s;  // bf16 bits [N, K / group]
  int64_t n, k, group, q_row, s_row;  // rows, K, group size, bytes per q row, scales per row
};

#include "q4_int8.h"

// One group of R weight rows against M rows of x, from column k0, into acc[R][M].
// One row of x: sum q * x over the group, then one FMA with the scale (fewer ops per weight), in
// A partial sums per row so that few rows still keep enough FMAs in flight.
// Several: scale each weight vector once, then FMA it into every row (the multiply is shared).
template <int R, int M>
inline void group_tile(const uint8_t* const* q, const float (&scales)[R][SCALE_BLOCK], int64_t g, int64_t k0,
                       int64_t group, int64_t tile_bytes, const float* const* x, vf (&acc)[R][M]) {
  constexpr int A = R >= 4 || VPC < 2 ? 1 : 2;
  vf part[R][A];
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < A; ++a) part[r][a] = vzero();
  for (int64_t k = k0; k < k0 + group; k += CHUNK) {
    const uint8_t* p[R];
    for (int r = 0; r < R; ++r) p[r] = q[r] + k;
    // The same bytes of the next tile (R rows on): the hardware prefetchers stop at 4 KB pages.
    if (PREFETCH != 0 && k % 64 == 0)
      for (int r = 0; r < R; ++r) __builtin_prefetch(p[r] + (PREFETCH > 0 ? PREFETCH : tile_bytes));
    for (int v = 0; v < VPC; ++v) {
      if (M == 1) {
        const vf xv = vload(x[0] + k + v * W);
        for (int r = 0; r < R; ++r) part[r][v % A] = vfma(values_q8(p[r], v), xv, part[r][v % A]);
        continue;
      }
      vf wv[R];
      for (int r = 0; r < R; ++r) wv[r] = vmul(values_q8(p[r], v), vset1(scales[r][g]));
      for (int m = 0; m < M; ++m) {
        const vf xv = vload(x[m] + k + v * W);
        for (int r = 0; r < R; ++r) acc[r][m] = vfma(wv[r], xv, acc[r][m]);
      }
    }
  }
  if (M == 1)
    for (int r = 0; r < R; ++r) {
      vf sum = part[r][0];
      for (int a = 1; a < A; ++a) sum = sum + part[r][a];
      acc[r][0] = vfma(sum, vset1(scales[r][g]), acc[r][0]);
    }
}

// y[m][r] = sum_k x[m][k] * w[n0 + r][k] for r < R, m < M: q8 weights, fp32 x.
template <int R, int M>
void tile_q8(const QMatrix& w, int64_t n0, const float* const* x, float* const* y) {
  vf acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = vzero();
  const uint8_t* q[R];
  const uint16_t* s[R];
  for (int r = 0; r < R; ++r) {
    q[r] = w.q + (n0 + r) * w.q_row;
    s[r] = w.s + (n0 + r) * w.s_row;
  }
  float scales[R][SCALE_BLOCK];  // fp32 scales, so the inner loop broadcasts them straight from memory
  for (int64_t g0 = 0; g0 < w.s_row; g0 += SCALE_BLOCK) {
    const int64_t groups = std::min(SCALE_BLOCK, w.s_row - g0);
    for (int r = 0; r < R; ++r)
      for (int64_t g = 0; g < groups; ++g) scales[r][g] = bf16_to_float(s[r][g0 + g]);
    for (int64_t g = 0; g < groups; ++g)
      group_tile<R, M>(q, scales, g, (g0 + g) * w.group, w.group, R * w.q_row, x, acc);
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) y[m][r] = vsum(acc[r][m]);
}

// The rows of x as a weight format takes them: fp32 for q8, int8-quantized for q4.
struct XRows {
  const float* const* f;
  const QRow* q;
  XRows from(int64_t j) const { return {f ? f + j : nullptr, q ? q + j : nullptr}; }
};

template <int R>
void tile_rows(int fmt, const QMatrix& w, int64_t n0, const XRows& x, float* const* y, int64_t m) {
  switch (fmt * 4 + static_cast<int>(std::min<int64_t>(m, MR))) {
    case Q8 * 4 + 1: return tile_q8<R, 1>(w, n0, x.f, y);
    case Q8 * 4 + 2: return tile_q8<R, 2>(w, n0, x.f, y);
    case Q8 * 4 + 3: return tile_q8<R, 3>(w, n0, x.f, y);
    case Q8 * 4 + 4: return tile_q8<R, MR>(w, n0, x.f, y);
    case Q4 * 4 + 1: return tile_q4<R, 1>(w, n0, x.q, y);
    case Q4 * 4 + 2: return tile_q4<R, 2>(w, n0, x.q, y);
    case Q4 * 4 + 3: return tile_q4<R, 3>(w, n0, x.q, y);
    default: return tile_q4<R, MR>(w, n0, x.q, y);
  }
}

// ys[j][r] (r < rows) = w[n0 + r] . xs[j] for all j < m: the weight rows are read once, then hit in cache.
void gemv_tile_fmt(int fmt, const QMatrix& w, int64_t n0, int64_t rows, const XRows& xs, float* const* ys,
                   int64_t m) {
  for (int64_t j = 0; j < m; j += MR) {
    int64_t mr = std::min<int64_t>(MR, m - j);
    if (rows == NR) {
      tile_rows<NR>(fmt, w, n0, xs.from(j), ys + j, mr);
      continue;
    }
    for (int64_t r = 0; r < rows; ++r) {  // the ragged last tile, one row at a time
      float* yr[MR];
      for (int64_t i = 0; i < mr; ++i) yr[i] = ys[j + i] + r;
      tile_rows<1>(fmt, w, n0 + r, xs.from(j), yr, mr);
    }
  }
}

#ifndef KRASIS_DYNAMIC
#define KRASIS_DYNAMIC 1
#endif
#ifndef KRASIS_CHUNKS_PER_THREAD
#define KRASIS_CHUNKS_PER_THREAD 8
#endif
constexpr int64_t CHUNKS_PER_THREAD = KRASIS_CHUNKS_PER_THREAD;

// fn(begin, end) over [0, total). Dynamic: chunks handed to threads as they come free, so a core
// that the host's other tenants slow down delays the call by one chunk, not by its whole share.
template <class F>
void parallel_chunks(int64_t total, const F& fn) {
  const int64_t threads = at::get_num_threads();
  if (!KRASIS_DYNAMIC || threads == 1) return at::parallel_for(0, total, 1, fn);
  const int64_t chunk = std::max<int64_t>(1, total / (threads * CHUNKS_PER_THREAD));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, (total + chunk - 1) / chunk), 1, [&](int64_t, int64_t) {
    for (int64_t begin; (begin = next.fetch_add(chunk)) < total;) fn(begin, std::min(total, begin + chunk));
  });
}

// x [M, K] (fp32 or bf16) -> contiguous fp32.
at::Tensor as_fp32(const at::Tensor& x) {
  return x.scalar_type() == at::kFloat ? x.contiguous() : x.to(at::kFloat).contiguous();
}

// M rows of x for a weight format: row pointers (q8), or the int8 rows those pointers quantize to (q4).
struct Activations {
  std::vector<const float*> f;
  std::unique_ptr<Int8Rows> int8;
  std::vector<QRow> q;

  // Row j is x + index[j] * k (index empty: row j is x + j * k), for `rows` rows.
  Activations(int fmt, const float* x, int64_t n_x, int64_t k, const std::vector<int64_t>& index, int64_t rows) {
    if (fmt == Q4) int8 = std::make_unique<Int8Rows>(x, n_x, k);
    for (int64_t j = 0; j < rows; ++j) {
      const int64_t i = index.empty() ? j : index[j];
      if (fmt == Q4) q.push_back(int8->row(i));
      else f.push_back(x + i * k);
    }
  }
  XRows rows() const { return {f.empty() ? nullptr : f.data(), q.empty() ? nullptr : q.data()}; }
};

QMatrix matrix_view(const at::Tensor& q, const at::Tensor& s, int64_t group, int64_t k, int64_t index) {
  int64_t n = q.size(-2), q_row = q.size(-1), s_row = s.size(-1);
  const auto* qb = static_cast<const uint8_t*>(q.data_ptr()) + index * n * q_row;
  const auto* sb = static_cast<const uint16_t*>(s.data_ptr()) + index * n * s_row;
  return QMatrix{qb, sb, n, k, group, q_row, s_row};
}

void check_weight(const at::Tensor& q, const at::Tensor& s, int64_t fmt, int64_t group, int64_t k, int64_t dims,
                  const char* what) {
  TORCH_CHECK_VALUE(fmt == Q8 || fmt == Q4, what, ": unknown format code ", fmt);
  TORCH_CHECK_VALUE(q.device().is_cpu() && s.device().is_cpu(), what, ": weights must be on the CPU");
  TORCH_CHECK_VALUE(q.dim() == dims && s.dim() == dims, what, ": expected ", dims, "-d qweight and scales");
  TORCH_CHECK_VALUE(q.is_contiguous() && s.is_contiguous(), what, ": qweight and scales must be contiguous");
  TORCH_CHECK_VALUE(q.scalar_type() == (fmt == Q8 ? at::kChar : at::kByte), what, ": qweight dtype ", q.scalar_type());
  TORCH_CHECK_VALUE(s.scalar_type() == at::kBFloat16, what, ": scales must be bf16");
  TORCH_CHECK_VALUE(group > 0 && group % CHUNK == 0 && k % group == 0, what, ": group ", group, " does not fit K=", k);
  TORCH_CHECK_VALUE(q.size(-1) == (fmt == Q8 ? k : k / 2) && s.size(-1) == k / group, what, ": K=", k,
              " does not match qweight ", q.sizes(), " / scales ", s.sizes());
  TORCH_CHECK_VALUE(s.sizes().slice(0, dims - 1) == q.sizes().slice(0, dims - 1), what, ": qweight and scales disagree");
}

// x: [M, K] fp32/bf16; qweight/scales: one [N, K] matrix -> [M, N] in x's dtype.
at::Tensor linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t fmt,
                  int64_t group) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.device().is_cpu(), "x must be a 2-d CPU tensor, got ", x.sizes());
  const int64_t m = x.size(0), k = x.size(1);
  check_weight(qweight, scales, fmt, group, k, 2, "linear");
  const int64_t n = qweight.size(0);
  at::Tensor xf = as_fp32(x);
  at::Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat));
  const Activations xs(static_cast<int>(fmt), xf.data_ptr<float>(), m, k, {}, m);
  const QMatrix w = matrix_view(qweight, scales, group, k, 0);
  parallel_chunks((n + NR - 1) / NR, [&](int64_t begin, int64_t end) {
    std::vector<float*> ys(m);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * NR;
      for (int64_t j = 0; j < m; ++j) ys[j] = y.data_ptr<float>() + j * n + n0;
      gemv_tile_fmt(static_cast<int>(fmt), w, n0, std::min<int64_t>(NR, n - n0), xs.rows(), ys.data(), m);
    }
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// (token, slot) pairs grouped by expert, experts ascending, tokens ascending within one.
struct Routing {
  std::vector<int64_t> experts;  // the experts hit, ascending
  std::vector<int64_t> start;    // experts[i]'s pairs are [start[i], start[i + 1])
  std::vector<int64_t> token;    // per pair
  std::vector<float> weight;     // per pair
  int64_t unknown = -1;          // index into topk_ids of an expert id out of range, or -1
};

Routing group_by_expert(const at::Tensor& topk_ids, const at::Tensor& topk_weights, int64_t num_experts) {
  at::Tensor ids = topk_ids.to(at::kLong).contiguous();
  at::Tensor wts = topk_weights.to(at::kFloat).contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  const float* wt = wts.data_ptr<float>();
  const int64_t pairs = ids.numel(), k = ids.size(1);
  std::vector<int64_t> count(num_experts + 1, 0);
  Routing out;
  for (int64_t p = 0; p < pairs; ++p) {
    if (id[p] < 0 || id[p] >= num_experts) {
      out.unknown = p;
      return out;
    }
    ++count[id[p] + 1];
  }
  for (int64_t e = 0; e < num_experts; ++e) {
    if (count[e + 1] > 0) {
      out.experts.push_back(e);
      out.start.push_back(count[e]);
    }
    count[e + 1] += count[e];
  }
  out.start.push_back(pairs);
  out.token.resize(pairs);
  out.weight.resize(pairs);
  for (int64_t p = 0; p < pairs; ++p) {
    int64_t slot = count[id[p]]++;
    out.token[slot] = p / k;
    out.weight[slot] = wt[p];
  }
  return out;
}

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

// act[pair][i] = silu(gate) * up, for rows [n0, n0 + rows) of I.
void gate_up_tile(int gu_fmt, const QMatrix& gu, int64_t inter, int64_t n0, int64_t rows, const XRows& xs,
                  int64_t m, float* act, int64_t pair0) {
  float gate[MR][NR], up[MR][NR];
  float* gs[MR];
  float* us[MR];
  for (int64_t j = 0; j < m; j += MR) {
    const int64_t mr = std::min<int64_t>(MR, m - j);
    for (int64_t i = 0; i < mr; ++i) {
      gs[i] = gate[i];
      us[i] = up[i];
    }
    gemv_tile_fmt(gu_fmt, gu, n0, rows, xs.from(j), gs, mr);
    gemv_tile_fmt(gu_fmt, gu, inter + n0, rows, xs.from(j), us, mr);
    for (int64_t i = 0; i < mr; ++i)
      for (int64_t r = 0; r < rows; ++r) act[(pair0 + j + i) * inter + n0 + r] = silu(gate[i][r]) * up[i][r];
  }
}

// The routed experts of one layer: out[t] = sum_slot weight * down[e](silu(gate[e] x_t) * up[e] x_t), fp32 sum.
// -> (out, -1), or (empty, index into topk_ids) for an unknown expert: bad input is reported, not
// thrown, because a C++ exception thrown from this library crashed the process on the H100 machine
// (torch 2.11, gcc 13). The Python wrappers validate everything else before calling.
std::tuple<at::Tensor, int64_t> experts(const at::Tensor& x, const at::Tensor& gu_q, const at::Tensor& gu_s, int64_t gu_fmt,
                   int64_t gu_group, const at::Tensor& dn_q, const at::Tensor& dn_s, int64_t dn_fmt, int64_t dn_group,
                   const at::Tensor& topk_ids, const at::Tensor& topk_weights) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.device().is_cpu(), "x must be a 2-d CPU tensor, got ", x.sizes());
  const int64_t tokens = x.size(0), hidden_in = x.size(1);
  check_weight(gu_q, gu_s, gu_fmt, gu_group, hidden_in, 3, "gate_up");
  const int64_t num_experts = gu_q.size(0), inter = gu_q.size(1) / 2;
  TORCH_CHECK_VALUE(gu_q.size(1) == 2 * inter, "gate_up has an odd number of rows");
  check_weight(dn_q, dn_s, dn_fmt, dn_group, inter, 3, "down");
  TORCH_CHECK_VALUE(dn_q.size(0) == num_experts, "gate_up has ", num_experts, " experts, down ", dn_q.size(0));
  TORCH_CHECK_VALUE(topk_ids.dim() == 2 && topk_ids.size(0) == tokens && topk_weights.sizes() == topk_ids.sizes(),
              "topk_ids and topk_weights must both be [T, k] with T=", tokens);
  const int64_t hidden_out = dn_q.size(1);
  const Routing routing = group_by_expert(topk_ids, topk_weights, num_experts);
  if (routing.unknown >= 0) return {at::empty({0}, x.options()), routing.unknown};
  const int64_t hit = static_cast<int64_t>(routing.experts.size()), pairs = routing.start.back();

  at::Tensor xf = as_fp32(x);
  const Activations xs(static_cast<int>(gu_fmt), xf.data_ptr<float>(), tokens, hidden_in, routing.token, pairs);
  std::vector<float> act(pairs * inter);
  const int64_t tiles = (inter + NR - 1) / NR;
  parallel_chunks(hit * tiles, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / tiles, n0 = item % tiles * NR, p0 = routing.start[h];
      const QMatrix gu = matrix_view(gu_q, gu_s, gu_group, hidden_in, routing.experts[h]);
      gate_up_tile(static_cast<int>(gu_fmt), gu, inter, n0, std::min<int64_t>(NR, inter - n0), xs.rows().from(p0),
                   routing.start[h + 1] - p0, act.data(), p0);
    }
  });

  at::Tensor out = at::zeros({tokens, hidden_out}, x.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const Activations as(static_cast<int>(dn_fmt), act.data(), pairs, inter, {}, pairs);
  // Each chunk is a range of output columns, walked through every hit expert's rows for it:
  // contiguous streams per expert, and no two threads add into the same element.
  parallel_chunks((hidden_out + NR - 1) / NR, [&](int64_t begin, int64_t end) {
    float y[MR][NR];
    float* ys[MR] = {y[0], y[1], y[2], y[3]};
    for (int64_t h = 0; h < hit; ++h) {
      const QMatrix dn = matrix_view(dn_q, dn_s, dn_group, inter, routing.experts[h]);
      const int64_t p0 = routing.start[h], p1 = routing.start[h + 1];
      for (int64_t n0 = begin * NR; n0 < std::min(end * NR, hidden_out); n0 += NR) {
        const int64_t rows = std::min<int64_t>(NR, hidden_out - n0);
        for (int64_t p = p0; p < p1; p += MR) {
          const int64_t mr = std::min<int64_t>(MR, p1 - p);
          gemv_tile_fmt(static_cast<int>(dn_fmt), dn, n0, rows, as.rows().from(p), ys, mr);
          for (int64_t i = 0; i < mr; ++i)
            for (int64_t r = 0; r < rows; ++r)
              o[routing.token[p + i] * hidden_out + n0 + r] += routing.weight[p + i] * y[i][r];
        }
      }
    }
  });
  return {x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type()), -1};
}

std::string isa() { return ISA; }

}  // namespace

#define KRASIS_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)  // expands KRASIS_OPS_NS before TORCH_LIBRARY pastes it
KRASIS_LIBRARY(KRASIS_OPS_NS, m) {
  m.def("linear", &linear);
  m.def("experts", &experts);
  m.def("isa", &isa);
}
