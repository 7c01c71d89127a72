// AMX tiles for the decode kernels: eight tiles of 16 rows x 64 bytes (one configuration for every use), the
// process's permission to use them (Linux grants it on request), and bf16 products summed in fp32 tiles.
// KRASIS_AMX is 1 where the compiler targets AMX-BF16, or under KRASIS_AMX_EMULATE: a plain C++ stand-in for the
// instructions, so machines without AMX (CI) test the code that lays data out for the tiles. KRASIS_NO_AMX builds
// without them (bench/decode_attention.py times both).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(KRASIS_AMX_EMULATE)
#define KRASIS_AMX 1
#elif defined(__AMX_TILE__) && defined(__AMX_BF16__) && !defined(KRASIS_NO_AMX)
#define KRASIS_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define KRASIS_AMX 0
#endif

#if KRASIS_AMX
namespace amx {

constexpr int ROWS = 16, ROW_BYTES = 64;  // every tile

#if defined(KRASIS_AMX_EMULATE)
struct Tiles {  // one thread's tile registers
  alignas(64) uint8_t data[8][ROWS][ROW_BYTES];
};
inline thread_local Tiles tiles;

inline float widen(const uint8_t* p) {  // a bf16 as fp32
  uint32_t bits = uint32_t(p[0] | p[1] << 8) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline bool permitted() { return true; }
inline void configure() {}
inline void release() {}
inline void zero(int t) { std::memset(tiles.data[t], 0, sizeof tiles.data[t]); }
inline void load(int t, const void* base, int64_t stride) {
  const auto* bytes = static_cast<const uint8_t*>(base);
  for (int r = 0; r < ROWS; ++r) std::memcpy(tiles.data[t][r], bytes + r * stride, ROW_BYTES);
}
inline void store(int t, void* base, int64_t stride) {
  for (int r = 0; r < ROWS; ++r) std::memcpy(static_cast<uint8_t*>(base) + r * stride, tiles.data[t][r], ROW_BYTES);
}
// c[m][n] += sum over k of a[m][2k] b[k][2n] + a[m][2k + 1] b[k][2n + 1] (fp32 c, bf16 pairs in a's rows and b's cells)
inline void dot(int c, int a, int b) {
  for (int m = 0; m < ROWS; ++m)
    for (int n = 0; n < ROW_BYTES / 4; ++n) {
      float sum;
      std::memcpy(&sum, tiles.data[c][m] + 4 * n, sizeof sum);
      for (int k = 0; k < ROWS; ++k) {
        sum += widen(tiles.data[a][m] + 4 * k) * widen(tiles.data[b][k] + 4 * n);
        sum += widen(tiles.data[a][m] + 4 * k + 2) * widen(tiles.data[b][k] + 4 * n + 2);
      }
      std::memcpy(tiles.data[c][m] + 4 * n, &sum, sizeof sum);
    }
}
#define KRASIS_TILE_ZERO(t) amx::zero(t)
#define KRASIS_TILE_LOAD(t, base, stride) amx::load(t, base, stride)
#define KRASIS_TILE_STORE(t, base, stride) amx::store(t, base, stride)
#define KRASIS_TILE_DOT(c, a, b) amx::dot(c, a, b)
#else
// Linux hands out the tiles' register state on request, once per process (every thread then has it).
inline bool permitted() {
  static const bool granted = [] {
    constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return granted;
}
struct alignas(64) Config {  // palette 1: tiles 0-7 at 16 rows of 64 bytes
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {ROW_BYTES, ROW_BYTES, ROW_BYTES, ROW_BYTES, ROW_BYTES, ROW_BYTES, ROW_BYTES, ROW_BYTES};
  uint8_t rows[16] = {ROWS, ROWS, ROWS, ROWS, ROWS, ROWS, ROWS, ROWS};
};
inline void configure() {  // per thread, before its first tile instruction
  static const Config config;
  _tile_loadconfig(&config);
}
inline void release() { _tile_release(); }
#define KRASIS_TILE_ZERO(t) _tile_zero(t)
#define KRASIS_TILE_LOAD(t, base, stride) _tile_loadd(t, base, stride)
#define KRASIS_TILE_STORE(t, base, stride) _tile_stored(t, base, stride)
#define KRASIS_TILE_DOT(c, a, b) _tile_dpbf16ps(c, a, b)
#endif

}  // namespace amx
#endif
