// q4 weights against int8 activations. fp32 unpacking of int4 made q4 compute-bound at batch 1
// (57% of read bandwidth on 16 Xeon cores); integer dot products do 4 multiply-adds per lane per
// instruction (AVX-512 VNNI vpdpbusd, or vpmaddubsw + vpmaddwd on AVX2 / AVX-512BW).
//
// Activations are quantized per 32-element chunk: d = max|x| / 127, xq = round-half-even(x / d)
// (all zero when d is 0); cpu_kernels.int8_activations is the same rounding in torch. A chunk's
// dot product sum (u - 8) * xq over the stored nibbles u (0..15) is exact in int32:
// sum u * xq plus bias = -8 * sum xq, precomputed per x row. Then y += w_scale * d * dot in fp32.
//
// Layout of a quantized row ("int8 order"): blocks of QB chunks (QB = int32 lanes / 4), each the
// 16 even elements of its chunks (which meet the low nibbles), then their 16 odd elements (the
// high nibbles). Chunks past the last whole block form blocks of one. bias and d hold one value
// per 4 bytes of a chunk: 4 per chunk, the int32 lanes of the dot products.
#pragma once

// A byte shuffle's control for one 32-bit lane: bytes 2i, 2i + 1 (bf16 i) as its high half, zeros below.
constexpr int bf16_pick(int i) { return (2 * i + 1) << 24 | 2 * i << 16 | 0x8080; }

#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr int QB = 4;
using vi = __m512i;
inline vi vi_load(const void* p) { return _mm512_loadu_si512(p); }
inline vi low_nibbles(vi v) { return _mm512_and_si512(v, _mm512_set1_epi8(15)); }
inline vi high_nibbles(vi v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(15)); }
inline vf vi_to_float(vi v) { return _mm512_cvtepi32_ps(v); }
// acc + per lane the sum of 4 products of unsigned bytes u and signed bytes s.
inline vi dot4(vi acc, vi u, vi s) {
#if defined(__AVX512VNNI__)
  return _mm512_dpbusd_epi32(acc, u, s);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
}
// The bf16 scales of 4 chunks as stored, each spread over its 4 lanes as fp32: 128-bit lane i of one byte
// shuffle takes bf16 i as the high half of each of its fp32 lanes (a bf16 is the high half of an fp32).
inline vf chunk_lanes(const uint16_t* s) {
  const __m512i pick = _mm512_setr_epi32(bf16_pick(0), bf16_pick(0), bf16_pick(0), bf16_pick(0), bf16_pick(1),
                                         bf16_pick(1), bf16_pick(1), bf16_pick(1), bf16_pick(2), bf16_pick(2),
                                         bf16_pick(2), bf16_pick(2), bf16_pick(3), bf16_pick(3), bf16_pick(3),
                                         bf16_pick(3));
  int64_t bits;
  std::memcpy(&bits, s, sizeof bits);
  return _mm512_castsi512_ps(_mm512_shuffle_epi8(_mm512_set1_epi64(bits), pick));
}
#define KRASIS_Q4_VECTOR 1
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int QB = 2;
using vi = __m256i;
inline vi vi_load(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline vi low_nibbles(vi v) { return _mm256_and_si256(v, _mm256_set1_epi8(15)); }
inline vi high_nibbles(vi v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(15)); }
inline vf vi_to_float(vi v) { return _mm256_cvtepi32_ps(v); }
inline vi dot4(vi acc, vi u, vi s) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
inline vf chunk_lanes(const uint16_t* s) {
  const __m256i pick = _mm256_setr_epi32(bf16_pick(0), bf16_pick(0), bf16_pick(0), bf16_pick(0), bf16_pick(1),
                                         bf16_pick(1), bf16_pick(1), bf16_pick(1));
  int32_t bits;
  std::memcpy(&bits, s, sizeof bits);
  return _mm256_castsi256_ps(_mm256_shuffle_epi8(_mm256_set1_epi32(bits), pick));
}
#define KRASIS_Q4_VECTOR 1
#else
constexpr int QB = 1;
#define KRASIS_Q4_VECTOR 0
#endif

// One quantized activation row: values in int8 order, and per chunk 4 biases and 4 copies of d.
struct QRow {
  const int8_t* q;
  const int32_t* bias;
  const float* d;
};

// Where chunk c of a row with `chunks` chunks starts in int8 order, and the stride of its odd half.
inline int64_t chunk_offset(int64_t c, int64_t chunks, int64_t* odd_stride) {
  const int64_t blocked = chunks / QB * QB, block = c < blocked ? QB : 1;
  *odd_stride = 16 * block;
  return 32 * (c - c % block) + 16 * (c % block);
}

// The largest |x| of a chunk, and each x / d rounded half to even (the MXCSR default, as nearbyint):
// vector division is IEEE exact, so the result equals cpu_kernels.int8_activations bit for bit.
#if defined(__AVX512F__)
inline float chunk_amax(const float* x) {
  const __m512 a = _mm512_abs_ps(_mm512_loadu_ps(x)), b = _mm512_abs_ps(_mm512_loadu_ps(x + 16));
  return _mm512_reduce_max_ps(_mm512_max_ps(a, b));
}
inline void round_chunk(const float* x, float d, int32_t* q) {
  for (int i = 0; i < CHUNK; i += 16)
    _mm512_storeu_si512(q + i, _mm512_cvtps_epi32(_mm512_div_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(d))));
}
#elif defined(__AVX2__)
inline float chunk_amax(const float* x) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 m = _mm256_and_ps(_mm256_loadu_ps(x), abs_mask);
  for (int i = 8; i < CHUNK; i += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask));
  __m128 r = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  r = _mm_max_ps(r, _mm_movehl_ps(r, r));
  return _mm_cvtss_f32(_mm_max_ss(r, _mm_movehdup_ps(r)));
}
inline void round_chunk(const float* x, float d, int32_t* q) {
  for (int i = 0; i < CHUNK; i += 8)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i),
                        _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(d))));
}
#else
inline float chunk_amax(const float* x) {
  float amax = 0.0f;
  for (int i = 0; i < CHUNK; ++i) amax = std::max(amax, std::fabs(x[i]));
  return amax;
}
inline void round_chunk(const float* x, float d, int32_t* q) {
  for (int i = 0; i < CHUNK; ++i) q[i] = static_cast<int32_t>(std::nearbyint(x[i] / d));
}
#endif

// Rows of int8 activations (K values each), filled chunk by chunk, possibly by several threads at
// once (each chunk owns its bytes); grown, never shrunk, so that a reused buffer allocates nothing.
class Int8Buffer {
 public:
  void resize(int64_t rows, int64_t k) {
    k_ = k;
    grow(q_, rows * k);
    grow(bias_, rows * k / 8);
    grow(d_, rows * k / 8);
  }
  QRow row(int64_t j) const { return {q_.data() + j * k_, bias_.data() + j * k_ / 8, d_.data() + j * k_ / 8}; }

  // Chunk c of row j from its 32 fp32 values xc.
  void quantize_chunk(int64_t j, int64_t c, const float* xc) {
    const float d = chunk_amax(xc) / 127.0f;
    int32_t q[CHUNK] = {};
    if (d > 0) round_chunk(xc, d, q);
    int64_t odd;
    int8_t* even_q = q_.data() + j * k_ + chunk_offset(c, k_ / CHUNK, &odd);
    int32_t lane_sums[4] = {0, 0, 0, 0};
    for (int i = 0; i < CHUNK / 2; ++i) {
      even_q[i] = static_cast<int8_t>(q[2 * i]);
      even_q[odd + i] = static_cast<int8_t>(q[2 * i + 1]);
      lane_sums[i / 4] += q[2 * i] + q[2 * i + 1];
    }
    for (int l = 0; l < 4; ++l) {
      bias_[j * k_ / 8 + 4 * c + l] = -8 * lane_sums[l];
      d_[j * k_ / 8 + 4 * c + l] = d;
    }
  }
  void quantize_row(int64_t j, const float* x) {
    for (int64_t c = 0; c < k_ / CHUNK; ++c) quantize_chunk(j, c, x + c * CHUNK);
  }

 private:
  template <class T>
  static void grow(std::vector<T>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  }
  int64_t k_ = 0;
  std::vector<int8_t> q_;
  std::vector<int32_t> bias_;
  std::vector<float> d_;
};

// sum over chunk c of (u - 8) * xq, for the chunk's 16 packed weight bytes w.
inline int32_t chunk_dot(const uint8_t* w, const QRow& x, int64_t c, int64_t chunks) {
  int64_t odd;
  const int8_t* even_q = x.q + chunk_offset(c, chunks, &odd);
  int32_t sum = x.bias[4 * c] + x.bias[4 * c + 1] + x.bias[4 * c + 2] + x.bias[4 * c + 3];
  for (int i = 0; i < CHUNK / 2; ++i) sum += (w[i] & 15) * even_q[i] + (w[i] >> 4) * even_q[odd + i];
  return sum;
}

// Each chunk's weight scale stays bf16 as stored and is widened in the lanes, one broadcast + byte shuffle per
// QB chunks (chunk_lanes). Widening the scales into an fp32 table first, chunk by chunk in scalar code, was ~73%
// of the loop's instructions at g32 and held back the weight loads: q4 experts at one token went from 60 to
// 81 GB/s on 16 Xeon cores (docs/BENCHMARKS.md). The same fp32 values either way, so the same bits.
//
// cs[r][i] = bf16 scale of chunk c0 + i of row r, i < n: at g32 (a scale per chunk) the weight's scale row
// itself, else spread into `table`, `per_group` chunks to a scale. Counters, not a division per chunk: an
// integer division costs more than a chunk's whole dot product.
template <int R>
inline void chunk_scales(const uint16_t* const* s, int64_t per_group, int64_t c0, int64_t n,
                         uint16_t (&table)[R][SCALE_BLOCK], const uint16_t* (&cs)[R]) {
  for (int r = 0; r < R; ++r) {
    if (per_group == 1) {
      cs[r] = s[r] + c0;
      continue;
    }
    int64_t g = c0 / per_group, left = per_group - c0 % per_group;
    uint16_t scale = s[r][g];
    for (int64_t i = 0; i < n; ++i) {
      if (left == 0) {
        scale = s[r][++g];
        left = per_group;
      }
      table[r][i] = scale;
      --left;
    }
    cs[r] = table[r];
  }
}

// y[m][r] = sum_k xq[m][k] * w[n0 + r][k] for r < R, m < M: q4 weights, int8 activations. Out of line: inlined
// into gemv_tile_fmt, its loop ran out of registers and spilled each weight vector to the stack.
template <int R, int M>
__attribute__((noinline)) void tile_q4(const QMatrix& w, int64_t n0, const QRow* x, float* const* y) {
  const int64_t chunks = w.k / CHUNK, blocked = KRASIS_Q4_VECTOR ? chunks / QB * QB : 0;
  const uint8_t* q[R];
  const uint16_t* s[R];
  for (int r = 0; r < R; ++r) {
    q[r] = w.q + (n0 + r) * w.q_row;
    s[r] = w.s + (n0 + r) * w.s_row;
  }
  float tail[R][M] = {};
#if KRASIS_Q4_VECTOR
  vf acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = vzero();
#endif
  uint16_t table[R][SCALE_BLOCK];
  const uint16_t* cs[R];  // the bf16 weight scale of each chunk of this block of chunks
  for (int64_t c0 = 0; c0 < chunks; c0 += SCALE_BLOCK) {
    const int64_t n = std::min(SCALE_BLOCK, chunks - c0);
    chunk_scales<R>(s, w.group / CHUNK, c0, n, table, cs);
#if KRASIS_Q4_VECTOR
    for (int64_t c = c0; c < std::min(c0 + n, blocked); c += QB) {
      vi bias[M], even[M], odd[M];  // this block of every x row, loaded once for all R weight rows
      vf d[M];
      for (int m = 0; m < M; ++m) {
        bias[m] = vi_load(x[m].bias + 4 * c);
        even[m] = vi_load(x[m].q + CHUNK * c);
        odd[m] = vi_load(x[m].q + CHUNK * c + 16 * QB);
        d[m] = vload(x[m].d + 4 * c);
      }
      for (int r = 0; r < R; ++r) {
        const uint8_t* p = q[r] + c * CHUNK / 2;
        if (PREFETCH != 0) __builtin_prefetch(p + (PREFETCH > 0 ? PREFETCH : R * w.q_row));
        const vi packed = vi_load(p), lo = low_nibbles(packed), hi = high_nibbles(packed);
        const vf ws = chunk_lanes(cs[r] + (c - c0));
        for (int m = 0; m < M; ++m) {
          const vi dot = dot4(dot4(bias[m], lo, even[m]), hi, odd[m]);
          acc[r][m] = vfma(vi_to_float(dot), vmul(ws, d[m]), acc[r][m]);
        }
      }
    }
#endif
    for (int64_t c = std::max(c0, blocked); c < c0 + n; ++c)
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m)
          tail[r][m] += bf16_to_float(cs[r][c - c0]) * x[m].d[4 * c] *
                        static_cast<float>(chunk_dot(q[r] + c * CHUNK / 2, x[m], c, chunks));
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
#if KRASIS_Q4_VECTOR
      y[m][r] = vsum(acc[r][m]) + tail[r][m];
#else
      y[m][r] = tail[r][m];
#endif
    }
}
