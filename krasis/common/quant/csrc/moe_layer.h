// The routed experts of one layer in one parallel region. At decode a layer's selected experts are a
// few MB: two parallel regions (gate/up, then down) with a serial step between cost a visible share of
// the call. Here every thread takes work items off one counter, in this order:
//   x items     a few 32-value chunks of x, converted or quantized for the gate/up format;
//   gate/up     a range of the hit experts' intermediate rows, one flat range over the experts in turn,
//               for all their (token, slot) pairs: act = silu(gate) * up, then (q4 down) those 32-value
//               chunks quantized to int8;
//   down        a range of the hit experts' down rows (one flat range again): each pair's unweighted
//               output columns, into its own row of y, so that an item reads one contiguous weight range;
//   sums        output columns: each token's weighted sum over its pairs, experts ascending, in fp32.
// Items are cut by the bytes they read (moe_plan.h): long ones first, shorter ones towards the end, so
// that threads stream long contiguous ranges and still finish together.
// Items wait only on items handed out before them (gate/up on the x chunks, down on its expert's
// gate/up rows, sums on all down rows), which never wait on later ones, so the region cannot deadlock
// whatever the thread count; an expert's down rows come a whole gate/up phase after its gate/up rows.
#pragma once

#include <thread>

#include "moe_plan.h"

// What one call needs, reused by the next call on the same thread: a decode step allocates nothing.
struct MoeScratch {
  Routing routing;
  std::vector<float> x_f32;    // [T, H] bf16 x widened, for a q8 gate/up
  Int8Buffer x_int8;           // [T] rows, for a q4 gate/up
  std::vector<float> act;      // [pairs, I]
  Int8Buffer act_int8;         // [pairs] rows, for a q4 down
  std::vector<float> y;        // [pairs, H] each pair's down output, unweighted
  std::vector<float> out_f32;  // [T, H] sums, for a bf16 x
  std::vector<WorkItem> items;
  std::vector<const float*> gu_f, dn_f;
  std::vector<QRow> gu_q, dn_q;
};

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

// Until counter >= target: spin briefly, then yield (a thread of ours may be waiting for a core).
inline void wait_for(const std::atomic<int64_t>& counter, int64_t target) {
  for (int spins = 0; counter.load(std::memory_order_acquire) < target; ++spins) {
    if (spins < 2048) cpu_relax();
    else std::this_thread::yield();
  }
}

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

template <class T>
inline void grow(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
}

struct MoeCall {
  int gu_fmt, dn_fmt;
  const at::Tensor &gu_q, &gu_s, &dn_q, &dn_s;
  int64_t gu_group, dn_group, tokens, hidden_in, inter, hidden_out;
  const void* x;  // [T, H], fp32 or bf16
  bool x_bf16;
  float* out_f32;    // [T, H_out] fp32 sums
  uint16_t* out_bf16;  // [T, H_out] bf16 result, or null when out_f32 is the result
  MoeScratch& s;
  std::atomic<int64_t> x_done{0}, dn_done{0};  // chunks of x ready; down rows finished, all experts
  std::unique_ptr<std::atomic<int64_t>[]> gu_done{};  // per hit expert, its intermediate rows finished

  int64_t hit() const { return static_cast<int64_t>(s.routing.experts.size()); }
  // 32-value chunks of x to convert or quantize before gate/up reads them.
  int64_t x_chunks() const { return gu_fmt == Q4 || x_bf16 ? tokens * hidden_in / CHUNK : 0; }

  // Chunks [c0, c1) of token row t of x, as the gate/up format reads them.
  void prepare_x(int64_t t, int64_t c0, int64_t c1) {
    float widened[CHUNK];
    for (int64_t c = c0; c < c1; ++c) {
      const float* xc = static_cast<const float*>(x) + t * hidden_in + c * CHUNK;
      if (x_bf16) {
        const auto* xb = static_cast<const uint16_t*>(x) + t * hidden_in + c * CHUNK;
        float* dst = gu_fmt == Q4 ? widened : s.x_f32.data() + t * hidden_in + c * CHUNK;
        for (int i = 0; i < CHUNK; ++i) dst[i] = bf16_to_float(xb[i]);
        xc = dst;
      }
      if (gu_fmt == Q4) s.x_int8.quantize_chunk(t, c, xc);
    }
  }

  // Rows [n0, n1) of hit expert h's intermediate, for all its pairs.
  void gate_up(int64_t h, int64_t n0, int64_t n1) {
    const Routing& r = s.routing;
    const QMatrix gu = matrix_view(gu_q, gu_s, gu_group, hidden_in, r.experts[h]);
    const int64_t p0 = r.start[h], pairs = r.start[h + 1] - p0;
    const XRows xs = XRows{s.gu_f.empty() ? nullptr : s.gu_f.data(), s.gu_q.empty() ? nullptr : s.gu_q.data()}.from(p0);
    float gate[MR][NR], up[MR][NR];
    float* gs[MR] = {gate[0], gate[1], gate[2], gate[3]};
    float* us[MR] = {up[0], up[1], up[2], up[3]};
    for (int64_t t0 = n0; t0 < n1; t0 += NR) {
      const int64_t rows = std::min<int64_t>(NR, n1 - t0);
      for (int64_t j = 0; j < pairs; j += MR) {
        const int64_t mr = std::min<int64_t>(MR, pairs - j);
        gemv_tile_fmt(gu_fmt, gu, t0, rows, xs.from(j), gs, mr);
        gemv_tile_fmt(gu_fmt, gu, inter + t0, rows, xs.from(j), us, mr);
        for (int64_t i = 0; i < mr; ++i)
          for (int64_t q = 0; q < rows; ++q) s.act[(p0 + j + i) * inter + t0 + q] = silu(gate[i][q]) * up[i][q];
      }
    }
    if (dn_fmt == Q4)
      for (int64_t p = p0; p < p0 + pairs; ++p)
        for (int64_t c = n0 / CHUNK; c < n1 / CHUNK; ++c)
          s.act_int8.quantize_chunk(p, c, s.act.data() + p * inter + c * CHUNK);
  }

  // Rows [n0, n1) of hit expert h's down, for all its pairs: y[pair][n0:n1], unweighted.
  void down(int64_t h, int64_t n0, int64_t n1) {
    const Routing& r = s.routing;
    const QMatrix dn = matrix_view(dn_q, dn_s, dn_group, inter, r.experts[h]);
    const XRows as{s.dn_f.empty() ? nullptr : s.dn_f.data(), s.dn_q.empty() ? nullptr : s.dn_q.data()};
    const int64_t p0 = r.start[h], p1 = r.start[h + 1];
    float* ys[MR];
    for (int64_t t0 = n0; t0 < n1; t0 += NR) {
      const int64_t rows = std::min<int64_t>(NR, n1 - t0);
      for (int64_t p = p0; p < p1; p += MR) {
        const int64_t mr = std::min<int64_t>(MR, p1 - p);
        for (int64_t i = 0; i < mr; ++i) ys[i] = s.y.data() + (p + i) * hidden_out + t0;
        gemv_tile_fmt(dn_fmt, dn, t0, rows, as.from(p), ys, mr);
      }
    }
  }

  // Output columns [c0, c1) of every token: the weighted sum over its pairs, experts ascending.
  void sums(int64_t c0, int64_t c1) {
    const Routing& r = s.routing;
    for (int64_t t = 0; t < tokens; ++t) {
      float* out = out_f32 + t * hidden_out;
      std::fill(out + c0, out + c1, 0.0f);
      for (int64_t j = r.token_start[t]; j < r.token_start[t + 1]; ++j) {
        const int64_t p = r.token_pair[j];
        const float weight = r.weight[p], *y = s.y.data() + p * hidden_out;
        for (int64_t c = c0; c < c1; ++c) out[c] += weight * y[c];
      }
      if (out_bf16)
        for (int64_t c = c0; c < c1; ++c) out_bf16[t * hidden_out + c] = float_to_bf16(out[c]);
    }
  }

  // fn(h, n0, n1) for each part [n0, n1) of a flat range [begin, end) over blocks of `rows` rows (experts, tokens).
  template <class F>
  static void by_block(int64_t begin, int64_t end, int64_t rows, const F& fn) {
    for (int64_t b = begin; b < end;) {
      const int64_t h = b / rows, n0 = b % rows, n1 = std::min(rows, n0 + end - b);
      fn(h, n0, n1);
      b += n1 - n0;
    }
  }

  void run_item(const WorkItem& item) {
    switch (item.kind) {
      case ItemKind::x_chunks:
        by_block(item.begin, item.end, hidden_in / CHUNK,
                 [&](int64_t t, int64_t c0, int64_t c1) { prepare_x(t, c0, c1); });
        x_done.fetch_add(item.end - item.begin, std::memory_order_release);
        return;
      case ItemKind::gate_up:
        wait_for(x_done, x_chunks());
        return by_block(item.begin, item.end, inter, [&](int64_t h, int64_t n0, int64_t n1) {
          gate_up(h, n0, n1);
          gu_done[h].fetch_add(n1 - n0, std::memory_order_release);
        });
      case ItemKind::down:
        return by_block(item.begin, item.end, hidden_out, [&](int64_t h, int64_t n0, int64_t n1) {
          wait_for(gu_done[h], inter);
          down(h, n0, n1);
          dn_done.fetch_add(n1 - n0, std::memory_order_release);
        });
      case ItemKind::sums:
        wait_for(dn_done, hit() * hidden_out);
        return sums(item.begin, item.end);
    }
  }

  // Buffers sized and row pointers set for this call's routing (serial, no quantization yet).
  void prepare_rows() {
    const Routing& r = s.routing;
    const int64_t pairs = r.start.back();
    s.gu_f.clear(), s.gu_q.clear(), s.dn_f.clear(), s.dn_q.clear();
    if (gu_fmt == Q4) s.x_int8.resize(tokens, hidden_in);
    else if (x_bf16) grow(s.x_f32, tokens * hidden_in);
    grow(s.act, pairs * inter);
    if (dn_fmt == Q4) s.act_int8.resize(pairs, inter);
    grow(s.y, pairs * hidden_out);
    const float* xf = x_bf16 ? s.x_f32.data() : static_cast<const float*>(x);
    for (int64_t p = 0; p < pairs; ++p) {
      if (gu_fmt == Q4) s.gu_q.push_back(s.x_int8.row(r.token[p]));
      else s.gu_f.push_back(xf + r.token[p] * hidden_in);
      if (dn_fmt == Q4) s.dn_q.push_back(s.act_int8.row(p));
      else s.dn_f.push_back(s.act.data() + p * inter);
    }
    gu_done.reset(new std::atomic<int64_t>[std::max<int64_t>(1, hit())]);
    for (int64_t h = 0; h < hit(); ++h) gu_done[h].store(0, std::memory_order_relaxed);
  }

  void run() {
    const int64_t threads = at::get_num_threads();
    const int64_t gu_row_bytes = 2 * (gu_q.size(-1) + 2 * gu_s.size(-1));  // a gate row and its up row
    const int64_t dn_row_bytes = dn_q.size(-1) + 2 * dn_s.size(-1);
    plan_items({x_chunks(), hit() * inter, gu_row_bytes, hit() * hidden_out, dn_row_bytes, hidden_out}, threads, NR,
               s.items);
    prepare_rows();
    const int64_t total = static_cast<int64_t>(s.items.size());
    std::atomic<int64_t> next{0};
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < total;) run_item(s.items[i]);
    });
  }
};

thread_local MoeScratch moe_scratch;
// Scratch above this many activation values (a prefill's worth, not a decode step's) is freed after its call.
constexpr int64_t SCRATCH_KEEP_VALUES = int64_t{1} << 20;

// Whether experts() can read these: shapes as quant_experts documents them, weights that fit, CPU tensors.
bool experts_inputs_fit(const at::Tensor& x, const at::Tensor& gu_q, const at::Tensor& gu_s, int64_t gu_fmt,
                        int64_t gu_group, const at::Tensor& dn_q, const at::Tensor& dn_s, int64_t dn_fmt,
                        int64_t dn_group, const at::Tensor& ids, const at::Tensor& wts) {
  if (x.dim() != 2 || !x.device().is_cpu() || (x.scalar_type() != at::kFloat && x.scalar_type() != at::kBFloat16))
    return false;
  const int64_t hidden = x.size(1);
  if (!weight_fits(gu_q, gu_s, gu_fmt, gu_group, hidden, 3) || gu_q.size(1) % 2 != 0) return false;
  const int64_t inter = gu_q.size(1) / 2;
  return inter > 0 && weight_fits(dn_q, dn_s, dn_fmt, dn_group, inter, 3) && dn_q.size(0) == gu_q.size(0) &&
         dn_q.size(1) == hidden && ids.dim() == 2 && ids.size(0) == x.size(0) && wts.sizes() == ids.sizes() &&
         ids.device().is_cpu() && wts.device().is_cpu() && c10::isIntegralType(ids.scalar_type(), false) &&
         c10::isFloatingType(wts.scalar_type());
}

constexpr int64_t EXPERTS_OK = -1, EXPERTS_BAD_INPUT = -2;

// The routed experts of one layer: out[t] = sum_slot weight * down[e](silu(gate[e] x_t) * up[e] x_t), fp32 sum.
// -> (out, EXPERTS_OK); (empty, index into topk_ids) for an unknown expert; (empty, EXPERTS_BAD_INPUT) for
// inputs that do not fit: reported, never thrown (see weight_fits), and explained by the Python wrapper.
std::tuple<at::Tensor, int64_t> experts(const at::Tensor& x_in, const at::Tensor& gu_q, const at::Tensor& gu_s,
                                        int64_t gu_fmt, int64_t gu_group, const at::Tensor& dn_q,
                                        const at::Tensor& dn_s, int64_t dn_fmt, int64_t dn_group,
                                        const at::Tensor& topk_ids, const at::Tensor& topk_weights) {
  if (!experts_inputs_fit(x_in, gu_q, gu_s, gu_fmt, gu_group, dn_q, dn_s, dn_fmt, dn_group, topk_ids, topk_weights))
    return {at::empty({0}, x_in.options()), EXPERTS_BAD_INPUT};
  const at::Tensor x = x_in.contiguous();
  const int64_t tokens = x.size(0), hidden_in = x.size(1), num_experts = gu_q.size(0), inter = gu_q.size(1) / 2;
  const int64_t hidden_out = dn_q.size(1);
  const at::Tensor ids =
      topk_ids.scalar_type() == at::kLong ? topk_ids.contiguous() : topk_ids.to(at::kLong).contiguous();
  const at::Tensor wts =
      topk_weights.scalar_type() == at::kFloat ? topk_weights.contiguous() : topk_weights.to(at::kFloat).contiguous();
  MoeScratch& s = moe_scratch;
  s.routing.group(ids.data_ptr<int64_t>(), wts.data_ptr<float>(), tokens, ids.size(1), num_experts);
  if (s.routing.unknown >= 0) return {at::empty({0}, x.options()), s.routing.unknown};
  const bool x_bf16 = x.scalar_type() == at::kBFloat16;
  at::Tensor out = at::empty({tokens, hidden_out}, x.options());
  if (tokens == 0) return {out, EXPERTS_OK};
  if (x_bf16) grow(s.out_f32, tokens * hidden_out);
  MoeCall call{static_cast<int>(gu_fmt), static_cast<int>(dn_fmt), gu_q, gu_s, dn_q, dn_s, gu_group, dn_group,
               tokens, hidden_in, inter, hidden_out, x.data_ptr(), x_bf16,
               x_bf16 ? s.out_f32.data() : out.data_ptr<float>(),
               x_bf16 ? static_cast<uint16_t*>(out.data_ptr()) : nullptr, s};
  call.run();
  if (std::max({s.act.size(), s.y.size(), s.out_f32.size()}) > static_cast<size_t>(SCRATCH_KEEP_VALUES))
    moe_scratch = MoeScratch();
  return {out, EXPERTS_OK};
}
