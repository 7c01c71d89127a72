// How one MoE call is laid out: its (token, slot) pairs grouped by expert, and the work items its
// threads take in turn (moe_layer.h runs them).
#pragma once

#ifndef KRASIS_MOE_ITEMS_PER_THREAD
#define KRASIS_MOE_ITEMS_PER_THREAD 8  // the smallest item: the call's bytes / (threads * this)
#endif
#ifndef KRASIS_MOE_GUIDE
#define KRASIS_MOE_GUIDE 2  // an item's bytes: at least the bytes left / (threads * this); 0: all the smallest
#endif

// (token, slot) pairs grouped by expert, experts ascending, tokens ascending within one.
struct Routing {
  std::vector<int64_t> experts;      // the experts hit, ascending
  std::vector<int64_t> start;        // experts[i]'s pairs are [start[i], start[i + 1])
  std::vector<int64_t> token;        // per pair
  std::vector<float> weight;         // per pair
  std::vector<int64_t> token_start;  // token t's pairs are token_pair[token_start[t] : token_start[t + 1]]
  std::vector<int64_t> token_pair;   // pairs by token, ascending within a token: the order their sums take
  std::vector<int64_t> count;
  int64_t unknown = -1;  // index into topk_ids of an expert id out of range, or -1

  void group(const int64_t* id, const float* wt, int64_t tokens, int64_t k, int64_t num_experts) {
    const int64_t pairs = tokens * k;
    experts.clear();
    start.clear();
    count.assign(num_experts + 1, 0);
    unknown = -1;
    for (int64_t p = 0; p < pairs; ++p) {
      if (id[p] < 0 || id[p] >= num_experts) {
        unknown = p;
        return;
      }
      ++count[id[p] + 1];
    }
    for (int64_t e = 0; e < num_experts; ++e) {
      if (count[e + 1] > 0) {
        experts.push_back(e);
        start.push_back(count[e]);
      }
      count[e + 1] += count[e];
    }
    start.push_back(pairs);
    token.resize(pairs);
    weight.resize(pairs);
    for (int64_t p = 0; p < pairs; ++p) {
      const int64_t slot = count[id[p]]++;
      token[slot] = p / k;
      weight[slot] = wt[p];
    }
    index_by_token(tokens);
  }

 private:
  void index_by_token(int64_t tokens) {
    const int64_t pairs = static_cast<int64_t>(token.size());
    token_start.assign(tokens + 1, 0);
    for (int64_t p = 0; p < pairs; ++p) ++token_start[token[p] + 1];
    for (int64_t t = 0; t < tokens; ++t) token_start[t + 1] += token_start[t];
    token_pair.resize(pairs);
    count.assign(token_start.begin(), token_start.end() - 1);
    for (int64_t p = 0; p < pairs; ++p) token_pair[count[token[p]]++] = p;
  }
};

enum class ItemKind : int8_t { x_chunks, gate_up, down, sums };

// [begin, end) of its kind's range: the 32-value chunks of x, token by token; the intermediate rows of
// gate/up, expert by expert in hit order; the output rows of down, the same way; output columns of the sums.
struct WorkItem {
  ItemKind kind;
  int64_t begin, end;
};

constexpr int64_t X_CHUNKS_PER_ITEM = 16;  // a few us of x quantization: a one-token call's x spreads over threads

// What a call's items are cut from: rows of each phase and the bytes one row reads.
struct PhaseSizes {
  int64_t x_chunks, gu_rows, gu_row_bytes, dn_rows, dn_row_bytes, columns;
};

// The items of one call, in the order they are handed out. Weight items read at least
// max(smallest, bytes left / (threads * GUIDE)) bytes: each thread's first item is a long contiguous
// stream, and items shrink towards the call's end, so that the threads finish close together.
inline void plan_items(const PhaseSizes& z, int64_t threads, int64_t nr, std::vector<WorkItem>& items) {
  items.clear();
  for (int64_t c = 0; c < z.x_chunks; c += X_CHUNKS_PER_ITEM)
    items.push_back({ItemKind::x_chunks, c, std::min(z.x_chunks, c + X_CHUNKS_PER_ITEM)});
  int64_t left = z.gu_rows * z.gu_row_bytes + z.dn_rows * z.dn_row_bytes;
  const int64_t smallest = left / (threads * KRASIS_MOE_ITEMS_PER_THREAD);
  // gate/up items quantize whole 32-value chunks of the intermediate; down items keep whole tiles of nr rows.
  auto cut = [&](ItemKind kind, int64_t rows, int64_t row_bytes, int64_t align) {
    for (int64_t begin = 0; begin < rows;) {
      const int64_t bytes = std::max(smallest, KRASIS_MOE_GUIDE ? left / (threads * KRASIS_MOE_GUIDE) : 0);
      const int64_t end = std::min(rows, begin + std::max(align, bytes / row_bytes / align * align));
      items.push_back({kind, begin, end});
      left -= (end - begin) * row_bytes;
      begin = end;
    }
  };
  cut(ItemKind::gate_up, z.gu_rows, z.gu_row_bytes, CHUNK);
  cut(ItemKind::down, z.dn_rows, z.dn_row_bytes, nr);
  const int64_t columns = (z.columns + threads - 1) / threads, per_item = (columns + 15) / 16 * 16;
  for (int64_t c = 0; c < z.columns; c += per_item)
    items.push_back({ItemKind::sums, c, std::min(z.columns, c + per_item)});
}
