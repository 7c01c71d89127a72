// CPU decode kernels over q8/q4 weights (layout: formats.py). Every row of x is multiplied against
// each weight tile while it is in cache, so the weight is read from memory once per call, whatever
// M is. q8 weights are unpacked a 32-element chunk at a time into fp32 registers and multiplied
// with fp32 FMAs (the scale applied per weight, q * scale exact, or per group for a single row);
// q4 weights meet int8-quantized activations in integer dot products (q4_int8.h). A layer's routed
// experts run in one parallel region (moe_layer.h); bf16 weights at decode sizes in bf16_linear.h.
// Nothing here throws: bad input comes back as a status for the Python wrappers to explain.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
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
constexpr int64_t SCALE_BLOCK = 64;  // scales set out at once: q8 groups', widened to fp32; q4 chunks', as bf16

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// fp32 -> bf16 bits, round to nearest even, as c10::BFloat16.
inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if (std::isnan(f)) return 0x7FC0;
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
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

// fn(begin, end) over [0, total), in chunks of at least `grain`. Dynamic: chunks handed to threads as
// they come free, so a core that the host's other tenants slow down delays the call by one chunk,
// not by its whole share.
template <class F>
void parallel_chunks(int64_t total, const F& fn, int64_t grain = 1) {
  const int64_t threads = at::get_num_threads();
  if (!KRASIS_DYNAMIC || threads == 1) return at::parallel_for(0, total, grain, fn);
  const int64_t chunk = std::max<int64_t>(grain, total / (threads * CHUNKS_PER_THREAD));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, (total + chunk - 1) / chunk), 1, [&](int64_t, int64_t) {
    for (int64_t begin; (begin = next.fetch_add(chunk)) < total;) fn(begin, std::min(total, begin + chunk));
  });
}

// x [M, K] (fp32 or bf16) as contiguous fp32 rows: x's own memory when it is that already, else widened into
// `buffer` (a decode step's linears are small: torch ops for the copy would cost more than the copy).
const float* fp32_rows(const at::Tensor& x, std::vector<float>& buffer) {
  if (x.scalar_type() == at::kFloat && x.is_contiguous()) return x.data_ptr<float>();
  const int64_t m = x.size(0), k = x.size(1), row = x.stride(0), column = x.stride(1);
  const bool fp32 = x.scalar_type() == at::kFloat;
  const auto* f = static_cast<const float*>(x.data_ptr());
  const auto* h = static_cast<const uint16_t*>(x.data_ptr());
  buffer.resize(m * k);
  for (int64_t j = 0; j < m; ++j)
    for (int64_t i = 0; i < k; ++i)
      buffer[j * k + i] = fp32 ? f[j * row + i * column] : bf16_to_float(h[j * row + i * column]);
  return buffer.data();
}

// M rows of fp32 x for a weight format: row pointers (q8), or the int8 rows they quantize to (q4).
struct Activations {
  std::vector<const float*> f;
  Int8Buffer int8;
  std::vector<QRow> q;

  Activations(int fmt, const float* x, int64_t m, int64_t k) {
    if (fmt == Q4) {
      int8.resize(m, k);
      at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) int8.quantize_row(j, x + j * k);
      });
    }
    for (int64_t j = 0; j < m; ++j) {
      if (fmt == Q4) q.push_back(int8.row(j));
      else f.push_back(x + j * k);
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

// Whether q and s are a contiguous CPU weight [..., N, K] (dims dimensions) of format fmt with this
// group size. A test, not a check that throws: a C++ exception from this library crashed the process
// on the H100 machine (torch 2.11, gcc 13), so the kernels report bad input and Python explains it.
bool weight_fits(const at::Tensor& q, const at::Tensor& s, int64_t fmt, int64_t group, int64_t k, int64_t dims) {
  return (fmt == Q8 || fmt == Q4) && q.device().is_cpu() && s.device().is_cpu() && q.dim() == dims &&
         s.dim() == dims && q.is_contiguous() && s.is_contiguous() &&
         q.scalar_type() == (fmt == Q8 ? at::kChar : at::kByte) && s.scalar_type() == at::kBFloat16 && group > 0 &&
         group % CHUNK == 0 && k % group == 0 && q.size(-1) == (fmt == Q8 ? k : k / 2) && s.size(-1) == k / group &&
         s.sizes().slice(0, dims - 1) == q.sizes().slice(0, dims - 1);
}

// x: [M, K] fp32/bf16; qweight/scales: one [N, K] matrix -> [M, N] in x's dtype (undefined if they do not fit).
at::Tensor linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t fmt,
                  int64_t group) {
  if (x.dim() != 2 || !x.device().is_cpu() || (x.scalar_type() != at::kFloat && x.scalar_type() != at::kBFloat16) ||
      !weight_fits(qweight, scales, fmt, group, x.size(1), 2))
    return at::Tensor();  // None in Python: quant_linear validated, so this is a wrapper bug
  const int64_t m = x.size(0), k = x.size(1);
  const int64_t n = qweight.size(0);
  std::vector<float> x_buffer, sums_buffer;
  const Activations xs(static_cast<int>(fmt), fp32_rows(x, x_buffer), m, k);
  at::Tensor y = at::empty({m, n}, x.options());  // in x's dtype: bf16 rounded from the fp32 sums tile by tile
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  if (bf16) sums_buffer.resize(m * n);
  float* sums = bf16 ? sums_buffer.data() : static_cast<float*>(y.data_ptr());
  auto* out_bf16 = static_cast<uint16_t*>(y.data_ptr());
  const QMatrix w = matrix_view(qweight, scales, group, k, 0);
  parallel_chunks((n + NR - 1) / NR, [&](int64_t begin, int64_t end) {
    std::vector<float*> ys(m);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * NR, width = std::min<int64_t>(NR, n - n0);
      for (int64_t j = 0; j < m; ++j) ys[j] = sums + j * n + n0;
      gemv_tile_fmt(static_cast<int>(fmt), w, n0, width, xs.rows(), ys.data(), m);
      if (bf16)
        for (int64_t j = 0; j < m; ++j)
          for (int64_t r = 0; r < width; ++r) out_bf16[j * n + n0 + r] = float_to_bf16(ys[j][r]);
    }
  });
  return y;
}

#include "moe_layer.h"
#include "bf16_linear.h"

#ifndef KRASIS_BF16_MIN_BYTES
#define KRASIS_BF16_MIN_BYTES 32768
#endif

// Whether dense_bf16 takes these: bf16 CPU tensors without autograd, x [..., K] of 1 to max_rows rows, a
// contiguous weight [N, K], bias [N] or empty (numel 0: none).
bool dense_bf16_fits(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, int64_t max_rows) {
  const auto bf16 = at::kBFloat16;
  if (x.scalar_type() != bf16 || w.scalar_type() != bf16 || !x.device().is_cpu() || !w.device().is_cpu() ||
      w.dim() != 2 || x.dim() < 1 || w.size(0) == 0 || w.size(1) == 0 || x.size(-1) != w.size(1) ||
      !w.is_contiguous() || x.requires_grad() || w.requires_grad())
    return false;
  if (bias.numel() > 0 && (bias.scalar_type() != bf16 || !bias.device().is_cpu() || bias.dim() != 1 ||
                           bias.size(0) != w.size(0) || bias.requires_grad()))
    return false;
  const int64_t rows = x.numel() / w.size(1);
  return rows > 0 && rows <= max_rows;
}

// x: [..., K] bf16, w: [N, K] bf16, bias: [N] bf16 or empty -> [..., N] bf16, or an undefined tensor (None
// in Python: "use F.linear") when dense_bf16_fits says no. Never throws.
at::Tensor dense_bf16(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& bias_in, int64_t max_rows) {
  if (!dense_bf16_fits(x_in, w, bias_in, max_rows)) return at::Tensor();
  const int64_t k = w.size(1), n = w.size(0), m = x_in.numel() / k;
  const at::Tensor x = x_in.reshape({m, k}).contiguous(), bias = bias_in.contiguous();
  std::vector<int64_t> out_sizes(x_in.sizes().begin(), x_in.sizes().end());
  out_sizes.back() = n;
  at::Tensor y = at::empty(out_sizes, x.options());
  const auto* xp = static_cast<const uint16_t*>(x.data_ptr());
  const auto* wp = static_cast<const uint16_t*>(w.data_ptr());
  const auto* bp = bias.numel() ? static_cast<const uint16_t*>(bias.data_ptr()) : nullptr;
  auto* yp = static_cast<uint16_t*>(y.data_ptr());
  // A tiny matrix goes to few threads: waking a core costs more than reading a few KB.
  const int64_t tile_bytes = BR * k * 2;
  parallel_chunks((n + BR - 1) / BR, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      bf16_rows(wp, xp, bp, yp, n, k, m, t * BR, std::min<int64_t>(BR, n - t * BR));
  }, (KRASIS_BF16_MIN_BYTES + tile_bytes - 1) / tile_bytes);
  return y;
}

std::string isa() { return ISA; }
std::string bf16_isa() { return BF16_ISA; }

}  // namespace

#define KRASIS_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)  // expands KRASIS_OPS_NS before TORCH_LIBRARY pastes it
KRASIS_LIBRARY(KRASIS_OPS_NS, m) {
  m.def("linear", &linear);
  m.def("experts", &experts);
  m.def("dense_bf16", &dense_bf16);
  m.def("isa", &isa);
  m.def("bf16_isa", &bf16_isa);
}
