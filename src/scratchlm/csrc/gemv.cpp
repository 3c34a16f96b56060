// Matrix-vector products for decoding: y (M, N) = x (M, K) @ W^T for a few rows of x (8 at a time),
// with W (N, K) row-major as nn.Linear stores it, in fp32, bf16, int8 or int4.
//
// Why our own: one token at a time, every weight is read once and feeds one multiply-add per
// row of x, so a step's speed is how fast the weights stream through the cores. Each output n
// is a dot product over the contiguous row W[n, :]; a thread takes a run of rows and streams
// them front to back. The arithmetic must keep up with memory, which is why the narrow formats
// use the CPU's integer and bf16 dot-product instructions, as llama.cpp does, instead of
// widening every weight to a float:
//
//   fp32  W[n, k]: fused multiply-adds, 16 weights an instruction.
//   bf16  W[n, k] in bf16. With AVX512-BF16, vdpbf16ps: x rounded to bf16 (what the bf16
//         layout computes in anyway), 32 products summed into fp32 an instruction. Without
//         it, a bf16 is the top half of a float: 32 weights a load split into the even and
//         the odd ones by a shift and a mask, x in fp32 (gemv_bf16_split).
//   int8  scale[n] * q[n, k], q in [-127, 127]. With AVX512-VNNI, vpdpwssd: each run of 64
//         inputs of x is quantized to 16-bit integers with its own scale, the weights widened
//         to 16 bits, 32 integer products summed into int32 an instruction, then each run's
//         sums times its scale.
//   int4  scale[n, g] * q[n, k] + offset[n, g], q in [0, 15], g = k / group_size, the scale and
//         offset fp16 (a GGUF Q4_0 / Q4_1 block's own d and m), stored in tiles of 16 rows (the
//         order cpu_gemv.pack_nibbles writes): for tile t (rows 16t..16t+15), run c of 64
//         inputs and step j < 8, 64 bytes hold lane l's (row 16t + l) inputs 64c + 4j + b
//         (b < 4) in their low nibbles and 64c + 32 + 4j + b in their high ones; the scales and
//         offsets likewise, the 16 rows of a tile side by side for each group. Then each
//         output lane of a vector is one row: with VNNI, vpdpbusd multiplies 16 rows' 4 nibbles
//         by the same 4 bytes of x (x in 15 bits, split into a high and a low byte), a group's
//         16 scales are one load, and no sum is reduced across lanes.
// Every sum is in int32 or fp32. Without those instructions (or AVX-512 at all) the same loops
// widen the weights to floats; cpu_gemv.py compiles this file with -march=native.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define GEMV_AVX512 1
#if defined(__AVX512VNNI__)
#define GEMV_VNNI 1
#endif
#if defined(__AVX512BF16__)
#define GEMV_BF16DOT 1
#endif
#endif

namespace {

constexpr int LANES = 16;   // floats per AVX-512 register; K must be a multiple
constexpr int RUN = 64;     // inputs per quantized run of x, and per int4 byte run
constexpr int MAX_M = 8;    // rows of x per pass over the weights (more rows: more passes)

inline float half_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }

// Rows split among threads in runs of >= ~64 KiB of weights: smaller tasks cost more to hand
// out than to do (a 576 x 576 fp32 matrix, 1.3 MB, goes to 2 threads as 2 runs).
inline int64_t grain(int64_t row_bytes) { return std::max<int64_t>(4, (64 << 10) / std::max<int64_t>(1, row_bytes)); }

// M as a compile-time constant, so the accumulators live in registers.
template <typename F>
void with_m(int64_t M, F&& f) {
  switch (M) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// ---- the portable path: weights widened to floats, 16 lanes of fp32 multiply-adds -------------
#ifdef GEMV_AVX512
using Vec = __m512;
// `bytes` from p into the cache, a 64-byte line at a time: the weight rows two passes ahead,
// fetched while these are computed. The loads of the weights were where the loops waited: a
// row of 576 inputs is only 288 bytes (int4), too short a stream for the hardware prefetcher.
inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t at = 0; at < bytes; at += 64) _mm_prefetch(c + at, _MM_HINT_T0);
}
// One line, the one this load's row will need two passes later: the prefetches spread one per
// load instead of a pass's worth (72 lines of bf16 rows) issued at once, which filled the
// core's line-fill buffers and stalled the loads behind them. Measured (Ice Lake server, all
// smollm2-135m matrices, 60 interleaved passes, A/B of two builds): bf16 1.12-1.17x less time
// at one row of x, 1.07-1.12x at 3 and 8; int8 1.10x, 1.06x, 1.03x.
inline void prefetch_line(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(Vec a) { return _mm512_reduce_add_ps(a); }
inline Vec load16(const float* p) { return _mm512_loadu_ps(p); }
inline Vec load16(const uint16_t* p) {  // bf16: widen to 32 bits and shift into the top half
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline Vec load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#else
struct Vec { float v[LANES]; };
inline Vec vzero() { return Vec{}; }
inline Vec vload(const float* p) { Vec r; std::memcpy(r.v, p, sizeof r.v); return r; }
inline Vec vfma(Vec a, Vec b, Vec c) { for (int i = 0; i < LANES; ++i) c.v[i] += a.v[i] * b.v[i]; return c; }
inline float vsum(Vec a) { float s = 0.f; for (int i = 0; i < LANES; ++i) s += a.v[i]; return s; }
inline Vec load16(const float* p) { return vload(p); }
inline Vec load16(const uint16_t* p) {
  Vec r;
  for (int i = 0; i < LANES; ++i) { uint32_t bits = uint32_t(p[i]) << 16; std::memcpy(&r.v[i], &bits, 4); }
  return r;
}
inline Vec load16(const int8_t* p) { Vec r; for (int i = 0; i < LANES; ++i) r.v[i] = p[i]; return r; }
#endif

// Weight rows per pass: enough independent accumulators (M * R) to hide the multiply-add
// latency, few enough to stay in registers (at M = 8, R = 2: 16 accumulators). Two rows, not
// one, from 5 rows of x on: each load of x then feeds two rows' multiply-adds. Measured (Ice
// Lake server, all smollm2-135m matrices, 40 interleaved passes): bf16 at 5 / 8 rows 1.14x /
// 1.47x less time, int8 1.24x / 1.15x, fp32 1.12x / 0.96x.
template <int M> constexpr int rows_per_pass() { return M <= 2 ? 4 : 2; }

// y[m, n] = scale[n] * sum_k x[m, k] * W[n, k] for the R rows n0..n0+R-1
template <int M, int R, typename T>
inline void dot_rows(const T* W, const float* x, int64_t N, int64_t K, const float* scale, float* y,
                     int64_t n0) {
  Vec acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = vzero();
  for (int64_t k = 0; k < K; k += LANES) {
    Vec w[R];
    for (int r = 0; r < R; ++r) w[r] = load16(W + (n0 + r) * K + k);
    for (int m = 0; m < M; ++m) {
      Vec xm = vload(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[m][r] = vfma(xm, w[r], acc[m][r]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) y[m * N + n0 + r] = vsum(acc[m][r]) * (scale ? scale[n0 + r] : 1.f);
}

template <int M, typename T>
void gemv_floats(const T* W, const float* x, int64_t N, int64_t K, const float* scale, float* y) {
  constexpr int R = rows_per_pass<M>();
  at::parallel_for(0, N, grain(K * sizeof(T)), [&](int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + R <= n1; n += R) dot_rows<M, R>(W, x, N, K, scale, y, n);
    for (; n < n1; ++n) dot_rows<M, 1>(W, x, N, K, scale, y, n);
  });
}

// int4 in tiles of 16 rows (the header): where q[n, k] and the scale and offset of (n, g) are.
constexpr int TILE = 16;
inline int64_t nibble_byte(int64_t n, int64_t k, int64_t K) {
  const int64_t i = k % RUN;
  return (((n / TILE) * (K / RUN) + k / RUN) * 8 + (i % (RUN / 2)) / 4) * 64 + (n % TILE) * 4 + i % 4;
}
inline int nibble(const uint8_t* q, int64_t n, int64_t k, int64_t K) {
  const uint8_t b = q[nibble_byte(n, k, K)];
  return k % RUN < RUN / 2 ? (b & 15) : (b >> 4);
}
inline int64_t group_at(int64_t n, int64_t g, int64_t groups) { return ((n / TILE) * groups + g) * TILE + n % TILE; }

template <int M>
void gemv_int4_floats(const uint8_t* q, const uint16_t* scale, const uint16_t* offset, const float* x,
                      int64_t N, int64_t K, int64_t G, float* y) {
  const int64_t groups = K / G;
  at::parallel_for(0, N, grain(K / 2), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      float total[M] = {};
      for (int64_t g = 0; g < groups; ++g) {
        const float s = half_to_float(scale[group_at(n, g, groups)]), o = half_to_float(offset[group_at(n, g, groups)]);
        for (int m = 0; m < M; ++m) {
          float dot = 0.f, xs = 0.f;
          for (int64_t k = g * G; k < (g + 1) * G; ++k) {
            dot += x[m * K + k] * nibble(q, n, k, K);
            xs += x[m * K + k];
          }
          total[m] += s * dot + o * xs;
        }
      }
      for (int m = 0; m < M; ++m) y[m * N + n] = total[m];
    }
  });
}

#ifdef GEMV_VNNI
// ---- int8 / int4 with vpdpwssd -------------------------------------------------------------------
// x quantized per run of 64 inputs to 16 bits: xq = round(x / xs) in [-32767, 32767], xs =
// max|x| / 32767, so that vpdpwssd multiplies 32 pairs of 16-bit integers into int32 sums an
// instruction. 16 bits, not llama.cpp's 8: a run holding one of the large activations LLMs
// have (|x| ~30 next to values ~1) rounds the rest of its run to a few levels in 8 bits, and
// on SmolLM2 that moved the tied head's logits by ~1% and changed greedy tokens; in 16 bits
// x is as good as the float path's (tests/test_cpu_gemv.py).
//
// int4 takes x in 15 bits (levels = 16383), each split into two bytes, xq = 128 hi + lo with hi
// in [-128, 127] and lo in [0, 127]: vpdpbusd then multiplies unsigned nibbles by signed bytes
// of x, once with the high bytes and once with the low ones (int4_tiles), where 16-bit x took
// two widenings and two vpdpwssd; the step is still 2^-14 of the run's max|x|.
struct QuantizedX {
  std::vector<int16_t> xq;     // (M, K)
  std::vector<int8_t> hi, lo;  // (M, K), int4's halves of xq: xq = 128 hi + lo
  std::vector<float> xs;       // (M, K / 64)
  std::vector<float> sum32;    // (M, K / 32) sums of the rounded x over each 32 inputs (int4's offsets)
};

// Into a per-thread buffer: a decode step calls this ~150 times, and allocating each time
// cost more than the quantization.
inline const QuantizedX& quantize_runs(const float* x, int64_t M, int64_t K, float levels = 32767.f) {
  thread_local QuantizedX out;
  const int64_t runs = K / RUN;
  const bool split = levels < 32767.f;  // int4: the bytes too
  out.xq.resize(M * K), out.xs.resize(M * runs), out.sum32.resize(M * K / 32);
  if (split) out.hi.resize(M * K), out.lo.resize(M * K);
  for (int64_t r = 0; r < M * runs; ++r) {
    const float* p = x + r * RUN;
    __m512 v[4], amax = _mm512_setzero_ps();
    for (int j = 0; j < 4; ++j) amax = _mm512_max_ps(amax, _mm512_abs_ps(v[j] = _mm512_loadu_ps(p + 16 * j)));
    const float scale = _mm512_reduce_max_ps(amax) / levels;
    const __m512 inv = _mm512_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
    __m512 rounded[4];
    for (int j = 0; j < 4; ++j) {  // round to nearest (even), as torch.round
      rounded[j] = _mm512_roundscale_ps(_mm512_mul_ps(v[j], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512i xi = _mm512_cvtps_epi32(rounded[j]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.xq.data() + r * RUN + 16 * j), _mm512_cvtsepi32_epi16(xi));
      if (split) {  // hi = floor(xq / 128), lo = xq - 128 hi
        const __m512i hi = _mm512_srai_epi32(xi, 7);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out.hi.data() + r * RUN + 16 * j), _mm512_cvtepi32_epi8(hi));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out.lo.data() + r * RUN + 16 * j),
                         _mm512_cvtepi32_epi8(_mm512_sub_epi32(xi, _mm512_slli_epi32(hi, 7))));
      }
    }
    // Sums of the rounded x, not of x: int4's offsets then multiply the same x as its q, and the
    // result is exactly sum_k x'[k] w[k]. (Offset and q * scale are each larger than w when a
    // group's weights sit away from zero; rounding one and not the other would not cancel.)
    out.sum32[2 * r] = scale * _mm512_reduce_add_ps(_mm512_add_ps(rounded[0], rounded[1]));
    out.sum32[2 * r + 1] = scale * _mm512_reduce_add_ps(_mm512_add_ps(rounded[2], rounded[3]));
    out.xs[r] = scale;
  }
  return out;
}

inline __m512i load_x16(const QuantizedX& x, int64_t at) {
  return _mm512_loadu_si512(x.xq.data() + at);  // 32 inputs of x in 16 bits
}

// R weight rows at a time, as the float path: M * R independent accumulators, so that the
// multiply-add chains (each 2 instructions a run deep) overlap instead of waiting on each other.
template <int M, int R>
inline void int8_rows(const int8_t* W, const QuantizedX& x, int64_t N, int64_t K, const float* scale, float* y,
                      int64_t n0) {
  const int64_t runs = K / RUN;
  const bool ahead = n0 + 3 * R <= N;  // the rows two passes ahead exist (prefetch_line)
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < runs; ++c) {
    __m512i w0[R], w1[R];  // each row's 64 weights, widened to 16 bits 32 at a time
    for (int r = 0; r < R; ++r) {
      const int8_t* w = W + (n0 + r) * K + c * RUN;
      if (ahead) prefetch_line(w + 2 * R * K);
      w0[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
      w1[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32)));
    }
    for (int m = 0; m < M; ++m) {
      const int64_t at = m * K + c * RUN;
      const __m512i x0 = load_x16(x, at), x1 = load_x16(x, at + 32);
      const __m512 xs = _mm512_set1_ps(x.xs[m * runs + c]);
      for (int r = 0; r < R; ++r) {
        const __m512i dot = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(_mm512_setzero_si512(), w0[r], x0), w1[r], x1);
        acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), xs, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) y[m * N + n0 + r] = _mm512_reduce_add_ps(acc[m][r]) * scale[n0 + r];
}

template <int M>
void gemv_int8_vnni(const int8_t* W, const QuantizedX& x, int64_t N, int64_t K, const float* scale, float* y) {
  constexpr int R = rows_per_pass<M>();
  at::parallel_for(0, N, grain(K), [&](int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + R <= n1; n += R) int8_rows<M, R>(W, x, N, K, scale, y, n);
    for (; n < n1; ++n) int8_rows<M, 1>(W, x, N, K, scale, y, n);
  });
}

// T tiles of 16 rows (T * M <= 4: four int32 sums each, in registers) times rows m0..m0+M-1
// of x. For each run of 64 inputs and each of its 8 steps, one 64-byte load holds the tile's
// 4 nibbles of inputs 4j.. (low) and 32 + 4j.. (high) for each of its 16 rows; vpdpbusd
// multiplies them by the 4 bytes of x broadcast, four sums (low / high nibbles times x's high /
// low bytes) so that the chains of dependent vpdpbusd overlap. A run's exact integer dot
// product is then 128 * high-byte sum + low-byte sum, times the group's 16 scales (one load)
// and x's scale, into one fp32 accumulator per (tile, row of x) whose lanes are the outputs.
template <int M, int T, int G>
inline void int4_tiles(const uint8_t* q, const uint16_t* scale, const uint16_t* offset, const QuantizedX& x,
                       const float* xsum, int64_t N, int64_t K, float* y, int64_t tile0, int64_t m0) {
  const int64_t runs = K / RUN, groups = K / G, tile_bytes = TILE * K / 2;
  const __m512i low4 = _mm512_set1_epi8(15);
  __m512 acc[T][M];
  for (int t = 0; t < T; ++t)
    for (int m = 0; m < M; ++m) acc[t][m] = _mm512_setzero_ps();
  for (int64_t c = 0; c < runs; ++c) {
    __m512i sum[T][M][4];  // [0] low nibbles x high bytes, [1] x low bytes, [2] [3] the high nibbles
    for (int t = 0; t < T; ++t)
      for (int m = 0; m < M; ++m)
        for (int i = 0; i < 4; ++i) sum[t][m][i] = _mm512_setzero_si512();
    for (int j = 0; j < 8; ++j) {
      __m512i lo[T], hi[T];
      for (int t = 0; t < T; ++t) {
        const uint8_t* line = q + (((tile0 + t) * runs + c) * 8 + j) * 64;
        if (tile0 + t + 2 * T < N / TILE) _mm_prefetch(reinterpret_cast<const char*>(line + 2 * T * tile_bytes), _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(line);
        lo[t] = _mm512_and_si512(v, low4);
        hi[t] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      }
      for (int m = 0; m < M; ++m) {
        const int64_t at = (m0 + m) * K + c * RUN + 4 * j;
        int32_t xb[4];  // x's 4 high bytes and 4 low bytes of inputs 4j.., then of 32 + 4j..
        std::memcpy(&xb[0], x.hi.data() + at, 4), std::memcpy(&xb[1], x.lo.data() + at, 4);
        std::memcpy(&xb[2], x.hi.data() + at + 32, 4), std::memcpy(&xb[3], x.lo.data() + at + 32, 4);
        for (int t = 0; t < T; ++t)
          for (int i = 0; i < 4; ++i) sum[t][m][i] = _mm512_dpbusd_epi32(sum[t][m][i], i < 2 ? lo[t] : hi[t], _mm512_set1_epi32(xb[i]));
      }
    }
    for (int t = 0; t < T; ++t) {
      const uint16_t* st = scale + (tile0 + t) * groups * TILE;
      auto scales_of = [&](int64_t g) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(st + g * TILE))); };
      for (int m = 0; m < M; ++m) {
        const __m512i first = _mm512_add_epi32(_mm512_slli_epi32(sum[t][m][0], 7), sum[t][m][1]);  // inputs 0-31
        const __m512i second = _mm512_add_epi32(_mm512_slli_epi32(sum[t][m][2], 7), sum[t][m][3]);  // 32-63
        const __m512 dot = G == 32 ? _mm512_fmadd_ps(_mm512_cvtepi32_ps(first), scales_of(2 * c),
                                                     _mm512_mul_ps(_mm512_cvtepi32_ps(second), scales_of(2 * c + 1)))
                                   : _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(first, second)), scales_of(c * RUN / G));
        acc[t][m] = _mm512_fmadd_ps(dot, _mm512_set1_ps(x.xs[(m0 + m) * runs + c]), acc[t][m]);
      }
    }
  }
  // + sum_g offset[g] * xsum[g], the tile's 16 offsets a group
  for (int t = 0; t < T; ++t) {
    const uint16_t* ot = offset + (tile0 + t) * groups * TILE;
    for (int64_t g = 0; g < groups; ++g) {
      const __m512 o = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ot + g * TILE)));
      for (int m = 0; m < M; ++m) acc[t][m] = _mm512_fmadd_ps(o, _mm512_set1_ps(xsum[(m0 + m) * groups + g]), acc[t][m]);
    }
    for (int m = 0; m < M; ++m) _mm512_storeu_ps(y + (m0 + m) * N + (tile0 + t) * TILE, acc[t][m]);
  }
}

template <int G>
void gemv_int4_vnni(const uint8_t* q, const uint16_t* scale, const uint16_t* offset, const QuantizedX& x,
                    int64_t M, int64_t N, int64_t K, float* y) {
  const int64_t groups = K / G, per_group = G / 32;
  // sum of x over each group, for the offsets: sum_k offset[g] x[k] = offset[g] * xsum[g]
  std::vector<float> xsum(M * groups, 0.f);
  for (int64_t i = 0; i < M * groups; ++i)
    for (int64_t j = 0; j < per_group; ++j) xsum[i] += x.sum32[i * per_group + j];
  const float* xs = xsum.data();
  at::parallel_for(0, N / TILE, std::max<int64_t>(1, grain(K / 2) / TILE), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1;) {
      if (M == 1 && t + 2 <= t1) {  // two tiles a pass: eight chains of vpdpbusd
        int4_tiles<1, 2, G>(q, scale, offset, x, xs, N, K, y, t, 0);
        t += 2;
        continue;
      }
      int64_t m = 0;  // rows of x four at a time (the tile's bytes stay in L1 between them)
      for (; m + 4 <= M; m += 4) int4_tiles<4, 1, G>(q, scale, offset, x, xs, N, K, y, t, m);
      for (; m + 2 <= M; m += 2) int4_tiles<2, 1, G>(q, scale, offset, x, xs, N, K, y, t, m);
      for (; m < M; ++m) int4_tiles<1, 1, G>(q, scale, offset, x, xs, N, K, y, t, m);
      ++t;
    }
  });
}
#endif

#ifdef GEMV_BF16DOT
// ---- bf16 with vdpbf16ps: pairs of bf16 products summed into fp32 lanes, 32 weights an instruction
template <int M>
void gemv_bf16_dot(const uint16_t* W, const uint16_t* x, int64_t N, int64_t K, float* y) {
  // R rows a pass, as the float path: R streams of weights in flight per core keep more memory
  // requests outstanding than one (measured: one row at a time read ~7.4 GB/s a core).
  constexpr int R = rows_per_pass<M>();
  auto rows = [&](auto r_const, int64_t n) {
    constexpr int RR = decltype(r_const)::value;
    if (n + 3 * RR <= N) prefetch_bytes(W + (n + 2 * RR) * K, RR * K * 2);  // two passes ahead (bf16: 2 bytes)
    __m512 acc[M][RR];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < RR; ++r) acc[m][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
      __m512bh w[RR];
      for (int r = 0; r < RR; ++r) w[r] = (__m512bh)_mm512_loadu_si512(W + (n + r) * K + k);
      for (int m = 0; m < M; ++m) {
        const __m512bh xm = (__m512bh)_mm512_loadu_si512(x + m * K + k);
        for (int r = 0; r < RR; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xm, w[r]);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < RR; ++r) y[m * N + n + r] = _mm512_reduce_add_ps(acc[m][r]);
  };
  at::parallel_for(0, N, grain(2 * K), [&](int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + R <= n1; n += R) rows(std::integral_constant<int, R>{}, n);
    for (; n < n1; ++n) rows(std::integral_constant<int, 1>{}, n);
  });
}
#endif

#ifdef GEMV_AVX512
// ---- bf16 without vdpbf16ps: two bf16 weights a 32-bit lane, split by one shift or one mask ----
// A 64-byte load holds 32 weights; (w << 16) is the even ones as floats and (w & 0xffff0000) the
// odd ones, so x comes split the same way (split_even_odd: per run of 32 inputs, the 16 even
// then the 16 odd) and 32 weights cost one load, two integer ops and two multiply-adds a row of
// x, where widening 16 at a time (load16) took two loads and four ops. The rows two passes ahead
// are prefetched, a line a load (prefetch_line): a bf16 row of 576 inputs is 1152 bytes, a short
// stream for the hardware prefetcher. Measured on an Ice Lake server (no AVX512-BF16),
// smollm2-135m's matrices at batch 1: 1.15-1.20x the widening loop, median of 200 interleaved
// passes (~19-20 GB/s at best), then ~20-22.6 GB/s with the prefetches spread.
template <int M>
void gemv_bf16_split(const uint16_t* W, const float* xs, int64_t N, int64_t K, const float* scale, float* y) {
  constexpr int R = rows_per_pass<M>();
  const __m512i high = _mm512_set1_epi32(int(0xffff0000u));
  auto rows = [&](auto r_const, int64_t n) {
    constexpr int RR = decltype(r_const)::value;
    const bool ahead = n + 3 * RR <= N;
    __m512 acc[M][RR];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < RR; ++r) acc[m][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
      __m512 even[RR], odd[RR];
      for (int r = 0; r < RR; ++r) {
        const __m512i w = _mm512_loadu_si512(W + (n + r) * K + k);
        if (ahead) prefetch_line(W + (n + 2 * RR + r) * K + k);  // the same line two passes ahead
        even[r] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
        odd[r] = _mm512_castsi512_ps(_mm512_and_si512(w, high));
      }
      for (int m = 0; m < M; ++m) {
        const __m512 xe = _mm512_loadu_ps(xs + m * K + k), xo = _mm512_loadu_ps(xs + m * K + k + 16);
        for (int r = 0; r < RR; ++r) acc[m][r] = _mm512_fmadd_ps(xo, odd[r], _mm512_fmadd_ps(xe, even[r], acc[m][r]));
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < RR; ++r) y[m * N + n + r] = _mm512_reduce_add_ps(acc[m][r]) * (scale ? scale[n + r] : 1.f);
  };
  at::parallel_for(0, N, grain(2 * K), [&](int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + R <= n1; n += R) rows(std::integral_constant<int, R>{}, n);
    for (; n < n1; ++n) rows(std::integral_constant<int, 1>{}, n);
  });
}

// x (rows, K) in gemv_bf16_split's order: per run of 32 inputs, the 16 even ones, then the 16 odd.
inline const float* split_even_odd(const float* x, int64_t rows, int64_t K, std::vector<float>& out) {
  out.resize(rows * K);
  for (int64_t i = 0; i < rows * K; i += 32)
    for (int j = 0; j < 16; ++j) {
      out[i + j] = x[i + 2 * j];
      out[i + 16 + j] = x[i + 2 * j + 1];
    }
  return out.data();
}
#endif

// ---- fp32 on the transposed (K, N) layout, 2-8 rows of x ---------------------------------------
// The fp32 layout keeps W^T (K, N) for MKL, whose GEMV on it is our kernel's equal at one row
// of x; at 2-8 rows (a batch, a speculative verify pass, a short prompt) its product costs
// 1.5-1.8x the one-row time where the weights are read once either way. Here a thread takes
// tiles of 16 J adjacent outputs: for each k it loads W^T[k, n0 : n0 + 16 J] (J vectors) and
// multiplies them by x[m, k] broadcast, M x J accumulators in registers, so no sum is reduced
// across lanes. The tile's rows are N floats apart, a stride the hardware prefetchers follow
// badly at large N: each load prefetches its line PREFETCH_ROWS rows ahead.
constexpr int PREFETCH_ROWS = 32;
template <int M> constexpr int tile_vectors() { return M <= 6 ? 4 : 3; }  // M * J <= 24 accumulators

#ifdef GEMV_AVX512
inline Vec vset1(float a) { return _mm512_set1_ps(a); }
inline void vstore(float* p, Vec a) { _mm512_storeu_ps(p, a); }
#else
inline Vec vset1(float a) { Vec r; for (int i = 0; i < LANES; ++i) r.v[i] = a; return r; }
inline void vstore(float* p, Vec a) { std::memcpy(p, a.v, sizeof a.v); }
inline void prefetch_line(const void*) {}
#endif

// y[m, n0 : n0 + 16 J] = x[m, :] @ Wt[:, n0 : n0 + 16 J] (+ bias)
template <int M, int J>
inline void transposed_tile(const float* Wt, const float* x, int64_t N, int64_t K, const float* bias, float* y,
                            int64_t n0) {
  Vec acc[M][J];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < J; ++j) acc[m][j] = vzero();
  const float* row = Wt + n0;
  const int64_t ahead = std::min<int64_t>(PREFETCH_ROWS, K) * N;
  for (int64_t k = 0; k < K; ++k, row += N) {
    Vec w[J];
    for (int j = 0; j < J; ++j) {
      if (k + PREFETCH_ROWS < K) prefetch_line(row + ahead + j * LANES);
      w[j] = vload(row + j * LANES);
    }
    for (int m = 0; m < M; ++m) {
      const Vec xm = vset1(x[m * K + k]);
      for (int j = 0; j < J; ++j) acc[m][j] = vfma(xm, w[j], acc[m][j]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < J; ++j) {
      Vec out = acc[m][j];
      if (bias) out = vfma(vset1(1.f), vload(bias + n0 + j * LANES), out);
      vstore(y + m * N + n0 + j * LANES, out);
    }
}

template <int M>
void gemv_transposed(const float* Wt, const float* x, int64_t N, int64_t K, const float* bias, float* y) {
  constexpr int J = tile_vectors<M>();
  const int64_t tiles = N / (J * LANES), rest = (N - tiles * J * LANES) / LANES;  // rest: one-vector tiles
  at::parallel_for(0, tiles + rest, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (t < tiles) transposed_tile<M, J>(Wt, x, N, K, bias, y, t * J * LANES);
      else transposed_tile<M, 1>(Wt, x, N, K, bias, y, tiles * J * LANES + (t - tiles) * LANES);
    }
  });
}

void check_x(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "gemv: x must be (M, ", K, "), got ", x.sizes());
  TORCH_CHECK(x.size(0) >= 1, "gemv: x has no rows");
  TORCH_CHECK(K % LANES == 0, "gemv: in_features must be a multiple of ", LANES, ", got ", K);
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16,
              "gemv: x must be float32 or bfloat16, got ", x.scalar_type());
}

// x as M * K floats: itself if it is fp32 and contiguous, else widened into a per-thread buffer
// (no torch op: at ~150 calls a step, each op's dispatch shows).
inline const float* floats_of(const torch::Tensor& x, std::vector<float>& buffer) {
  if (x.scalar_type() == torch::kFloat32 && x.is_contiguous()) return x.data_ptr<float>();
  const torch::Tensor xc = x.contiguous();
  buffer.resize(xc.numel());
  if (xc.scalar_type() == torch::kFloat32) {  // a strided fp32 x (the last position of a prompt's rows)
    std::memcpy(buffer.data(), xc.data_ptr<float>(), xc.numel() * sizeof(float));
    return buffer.data();
  }
  const auto* h = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  for (int64_t i = 0; i < xc.numel(); ++i) {
    const uint32_t bits = uint32_t(h[i]) << 16;
    std::memcpy(&buffer[i], &bits, 4);
  }
  return buffer.data();
}

// y (M, N) in x's dtype from the kernels' fp32 sums.
inline torch::Tensor output(const torch::Tensor& x, const std::vector<float>& sums, int64_t M, int64_t N) {
  torch::Tensor y = torch::empty({M, N}, x.options());
  if (x.scalar_type() == torch::kFloat32) {
    std::memcpy(y.data_ptr<float>(), sums.data(), M * N * sizeof(float));
  } else {
    at::BFloat16* out = y.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < M * N; ++i) out[i] = at::BFloat16(sums[i]);  // round to nearest even
  }
  return y;
}

// x (M, K) fp32 or bf16; w (N, K) fp32, bf16 or int8; scale (N,) fp32 or None -> y (M, N) in x's dtype.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& scale) {
  const int64_t N = w.size(0), K = w.size(1), M = x.size(0);
  check_x(x, K);
  TORCH_CHECK(w.is_contiguous(), "gemv: the weight must be contiguous");
  const auto kind = w.scalar_type();
  TORCH_CHECK(kind == torch::kFloat32 || kind == torch::kBFloat16 || kind == torch::kChar,
              "gemv: weight dtype must be float32, bfloat16 or int8, got ", kind);
  const float* s = nullptr;
  if (scale.has_value()) {
    TORCH_CHECK(scale->scalar_type() == torch::kFloat32 && scale->is_contiguous() && scale->numel() == N,
                "gemv: one float32 scale per output row");
    s = scale->data_ptr<float>();
  }
  thread_local std::vector<float> sums, widened, split;
  sums.resize(M * N);
  // Rows of x MAX_M at a time (a short prompt is a few passes over the weights).
#ifdef GEMV_BF16DOT
  if (kind == torch::kBFloat16 && K % 32 == 0 && s == nullptr) {
    const torch::Tensor xb = x.scalar_type() == torch::kBFloat16 ? x.contiguous() : x.to(torch::kBFloat16);
    const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
    const auto* xp = reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>());
    for (int64_t m0 = 0; m0 < M; m0 += MAX_M)
      with_m(std::min<int64_t>(MAX_M, M - m0), [&](auto m) {
        gemv_bf16_dot<decltype(m)::value>(wp, xp + m0 * K, N, K, sums.data() + m0 * N);
      });
    return output(x, sums, M, N);
  }
#endif
  const float* xp = floats_of(x, widened);
  for (int64_t m0 = 0; m0 < M; m0 += MAX_M) {
    const int64_t rows = std::min<int64_t>(MAX_M, M - m0);
    const float* xc = xp + m0 * K;
    float* yc = sums.data() + m0 * N;
#ifdef GEMV_VNNI
    if (kind == torch::kChar && K % RUN == 0 && s != nullptr) {
      const QuantizedX& xq = quantize_runs(xc, rows, K);
      with_m(rows, [&](auto m) { gemv_int8_vnni<decltype(m)::value>(w.data_ptr<int8_t>(), xq, N, K, s, yc); });
      continue;
    }
#endif
    with_m(rows, [&](auto m) {
      constexpr int MM = decltype(m)::value;
      if (kind == torch::kFloat32) gemv_floats<MM>(w.data_ptr<float>(), xc, N, K, s, yc);
#ifdef GEMV_AVX512
      else if (kind == torch::kBFloat16 && K % 32 == 0)
        gemv_bf16_split<MM>(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()),
                            split_even_odd(xc, MM, K, split), N, K, s, yc);
#endif
      else if (kind == torch::kBFloat16)
        gemv_floats<MM>(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), xc, N, K, s, yc);
      else gemv_floats<MM>(w.data_ptr<int8_t>(), xc, N, K, s, yc);
    });
  }
  return output(x, sums, M, N);
}

// x (M, K) fp32; w_t (K, N) fp32, N a multiple of 16; bias (N,) fp32 or None -> y (M, N) fp32.
torch::Tensor linear_transposed(const torch::Tensor& x, const torch::Tensor& w_t, const c10::optional<torch::Tensor>& bias) {
  const int64_t K = w_t.size(0), N = w_t.size(1), M = x.size(0);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && M >= 1 && x.scalar_type() == torch::kFloat32,
              "gemv: x must be float32 (M, ", K, "), got ", x.sizes());
  TORCH_CHECK(w_t.scalar_type() == torch::kFloat32 && w_t.is_contiguous() && N % LANES == 0,
              "gemv: the transposed weight must be contiguous float32 with a multiple of ", LANES, " outputs");
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == N,
                "gemv: one float32 bias per output");
    b = bias->data_ptr<float>();
  }
  const torch::Tensor xc = x.contiguous();
  torch::Tensor y = torch::empty({M, N}, x.options());
  for (int64_t m0 = 0; m0 < M; m0 += MAX_M)
    with_m(std::min<int64_t>(MAX_M, M - m0), [&](auto m) {
      gemv_transposed<decltype(m)::value>(w_t.data_ptr<float>(), xc.data_ptr<float>() + m0 * K, N, K, b,
                                          y.data_ptr<float>() + m0 * N);
    });
  return y;
}

// x (M, K) fp32 @ w_t[:, ids] for a few ids (C) of a (K, N) fp32 matrix -> (M, C) fp32: the
// exact logits of the rows a HeadScreen leaves, from the transposed table. Each id's column is
// K floats N apart, a cache line apiece; index_select took them one after another (~1.8 ms for
// 224 columns of 576 x 49,152). Here a thread takes runs of 16 ids, gathers row k's 16 floats in
// one instruction and prefetches row k + 16's lines, so the misses overlap.
torch::Tensor columns_transposed(const torch::Tensor& x, const torch::Tensor& w_t, const torch::Tensor& ids) {
  const int64_t K = w_t.size(0), N = w_t.size(1), M = x.size(0), C = ids.numel();
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.scalar_type() == torch::kFloat32,
              "gemv: x must be float32 (M, ", K, "), got ", x.sizes());
  TORCH_CHECK(w_t.scalar_type() == torch::kFloat32 && w_t.is_contiguous() && N < (int64_t(1) << 31),
              "gemv: the transposed weight must be contiguous float32");
  TORCH_CHECK(ids.scalar_type() == torch::kLong && ids.dim() == 1, "gemv: ids must be one int64 vector");
  const torch::Tensor xc = x.contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t c = 0; c < C; ++c) TORCH_CHECK(id[c] >= 0 && id[c] < N, "gemv: id ", id[c], " out of range");
  torch::Tensor y = torch::empty({M, C}, x.options());
  const float *W = w_t.data_ptr<float>(), *xp = xc.data_ptr<float>();
  float* out = y.data_ptr<float>();
  constexpr int64_t AHEAD = 16;
  at::parallel_for(0, (C + LANES - 1) / LANES, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t c0 = r * LANES, n = std::min<int64_t>(LANES, C - c0);
      int32_t cols[LANES];
      for (int64_t j = 0; j < LANES; ++j) cols[j] = int32_t(id[c0 + std::min(j, n - 1)]);  // the tail repeats the last
      for (int64_t m0 = 0; m0 < M; m0 += MAX_M) {
        const int64_t rows = std::min<int64_t>(MAX_M, M - m0);
        float sums[MAX_M][LANES] = {};
#ifdef GEMV_AVX512
        const __m512i vcols = _mm512_loadu_si512(cols);
        __m512 acc[MAX_M];
        for (int64_t m = 0; m < rows; ++m) acc[m] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; ++k) {
          if (k + AHEAD < K)
            for (int64_t j = 0; j < n; ++j) prefetch_line(W + (k + AHEAD) * N + cols[j]);
          const __m512 w = _mm512_i32gather_ps(vcols, W + k * N, 4);
          for (int64_t m = 0; m < rows; ++m)
            acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(xp[(m0 + m) * K + k]), w, acc[m]);
        }
        for (int64_t m = 0; m < rows; ++m) _mm512_storeu_ps(sums[m], acc[m]);
#else
        for (int64_t k = 0; k < K; ++k)
          for (int64_t j = 0; j < LANES; ++j) {
            const float w = W[k * N + cols[j]];
            for (int64_t m = 0; m < rows; ++m) sums[m][j] += xp[(m0 + m) * K + k] * w;
          }
#endif
        for (int64_t m = 0; m < rows; ++m)
          for (int64_t j = 0; j < n; ++j) out[(m0 + m) * C + c0 + j] = sums[m][j];
      }
    }
  });
  return y;
}

// x (M, K) fp32 or bf16; q (N, K / 2) uint8; scale, offset (N, K / G) fp16 -> y (M, N) in x's dtype.
torch::Tensor linear_int4(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                          const torch::Tensor& offset, int64_t G) {
  const int64_t N = q.size(0), K = 2 * q.size(1), M = x.size(0);
  check_x(x, K);
  TORCH_CHECK(K % RUN == 0 && G % 32 == 0 && G <= 128 && K % G == 0, "gemv int4: in_features must be a multiple of ",
              RUN, " and of the group size (32, 64 or 128)");
  TORCH_CHECK(N % TILE == 0, "gemv int4: out_features must be a multiple of ", TILE, " (the tiles), got ", N);
  // scale and offset: fp16, or fp16 bits held as int16 (decode_weights.Int4Linear)
  auto half_bits = [](const torch::Tensor& t) { return t.scalar_type() == torch::kHalf || t.scalar_type() == torch::kShort; };
  TORCH_CHECK(q.scalar_type() == torch::kByte && half_bits(scale) && half_bits(offset),
              "gemv int4: q uint8, scale and offset float16 (or its bits as int16)");
  TORCH_CHECK(q.is_contiguous() && scale.is_contiguous() && offset.is_contiguous(), "gemv int4: contiguous parts");
  TORCH_CHECK(scale.numel() == N * (K / G) && offset.numel() == N * (K / G), "gemv int4: (N, K / G) scales");
  thread_local std::vector<float> sums, widened;
  sums.resize(M * N);
  const float* xp = floats_of(x, widened);
  const auto* sp = static_cast<const uint16_t*>(scale.data_ptr());
  const auto* op = static_cast<const uint16_t*>(offset.data_ptr());
#ifdef GEMV_VNNI
  const QuantizedX& xq = quantize_runs(xp, M, K, 16383.f);
  auto* qp = q.data_ptr<uint8_t>();
  if (G == 32) gemv_int4_vnni<32>(qp, sp, op, xq, M, N, K, sums.data());
  else if (G == 64) gemv_int4_vnni<64>(qp, sp, op, xq, M, N, K, sums.data());
  else gemv_int4_vnni<128>(qp, sp, op, xq, M, N, K, sums.data());
#else
  for (int64_t m0 = 0; m0 < M; m0 += MAX_M) {
    const int64_t rows = std::min<int64_t>(MAX_M, M - m0);
    with_m(rows, [&](auto m) {
      gemv_int4_floats<decltype(m)::value>(q.data_ptr<uint8_t>(), sp, op, xp + m0 * K, N, K, G, sums.data() + m0 * N);
    });
  }
#endif
  return output(x, sums, M, N);
}

// The matrix of an int8 or int4 layer as bf16 (N, K), for a prompt: oneDNN's bf16 matmul (AMX
// where the CPU has it) then does its many rows, where passes of our 8-row kernels would redo
// the integer work once per 8 rows. Each weight is rounded to bf16 once.
#ifdef GEMV_AVX512
inline void store_bf16(uint16_t* out, __m512 v) {  // 16 floats, rounded to nearest even
  const __m512i u = _mm512_castps_si512(v);
  const __m512i bump = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(u, bump), 16)));
}
#endif

torch::Tensor dequantize(const torch::Tensor& q, const torch::Tensor& scale, const c10::optional<torch::Tensor>& offset,
                         int64_t G) {
  const bool int4 = offset.has_value();
  const int64_t N = q.size(0), K = int4 ? 2 * q.size(1) : q.size(1);
  TORCH_CHECK(q.is_contiguous() && scale.is_contiguous() && K % RUN == 0, "dequantize: contiguous, K a multiple of 64");
  TORCH_CHECK(int4 ? (q.scalar_type() == torch::kByte && G % 32 == 0 && K % G == 0 && N % TILE == 0 && scale.numel() == N * (K / G))
                   : (q.scalar_type() == torch::kChar && scale.scalar_type() == torch::kFloat32 && scale.numel() == N),
              "dequantize: int8 (N, K) with N float32 scales, or int4 (N, K / 2) uint8 with (N, K / G) fp16 scales and offsets, N a multiple of 16");
  torch::Tensor w = torch::empty({N, K}, torch::dtype(torch::kBFloat16));
  auto* out = reinterpret_cast<uint16_t*>(w.data_ptr<at::BFloat16>());
  const int64_t groups = int4 ? K / G : 1;
  at::parallel_for(0, N, grain(int4 ? K / 2 : K), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      uint16_t* row = out + n * K;
      if (!int4) {
        const int8_t* qr = q.data_ptr<int8_t>() + n * K;
        const float s = scale.data_ptr<float>()[n];
#ifdef GEMV_AVX512
        for (int64_t k = 0; k < K; k += 16)
          store_bf16(row + k, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                                                reinterpret_cast<const __m128i*>(qr + k)))), _mm512_set1_ps(s)));
#else
        for (int64_t k = 0; k < K; ++k) row[k] = c10::BFloat16(s * float(qr[k])).x;
#endif
        continue;
      }
      const uint8_t* qp = q.data_ptr<uint8_t>();
      const auto* sp = static_cast<const uint16_t*>(scale.data_ptr());
      const auto* op = static_cast<const uint16_t*>(offset->data_ptr());
      for (int64_t k0 = 0; k0 < K; k0 += RUN) {
        // the row's 32 bytes of this run, from the tile's 8 steps (4 bytes each, 64 apart):
        // byte i holds input k0 + i in its low nibble and k0 + 32 + i in its high one
        uint8_t qr[RUN / 2];
        const uint8_t* first = qp + nibble_byte(n, k0, K);
        for (int j = 0; j < 8; ++j) std::memcpy(qr + 4 * j, first + 64 * j, 4);
        for (int half = 0; half < 2; ++half)
          for (int64_t j = 0; j < RUN / 2; j += 16) {
            const int64_t k = k0 + half * (RUN / 2) + j, g = k / G;
            const float s = half_to_float(sp[group_at(n, g, groups)]), o = half_to_float(op[group_at(n, g, groups)]);
#ifdef GEMV_AVX512
            const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qr + j));
            const __m128i v = half ? _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(15)) : _mm_and_si128(b, _mm_set1_epi8(15));
            store_bf16(row + k, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)), _mm512_set1_ps(s), _mm512_set1_ps(o)));
#else
            for (int64_t i = 0; i < 16; ++i) {
              const uint8_t byte = qr[j + i];
              row[k + i] = c10::BFloat16(s * float(half ? byte >> 4 : byte & 15) + o).x;
            }
#endif
          }
      }
    }
  });
  return w;
}

// decode_weights.HeadScreen: which rows of an output head may hold the largest logit, from its
// int8 copy q (N, K) with scale (N,). For each row m of x (M, K) fp32: approx = the int8 logits,
// b[i] = min(per_n1[i] n1, per_n2[i] n2) + per_x_rounding[i] e + per_n1_sums[i] n1 + 1e-6 |approx[i]|
// (n1, n2: x's L1 and L2 norms; e = |x - x'|_2, x' the 16-bit x the int8 kernel multiplies,
// rounded here as quantize_runs does) bounds |exact - approx|, floor = max_i (approx[i] - b[i]) - rounding |floor|;
// row i < limit stays if approx[i] + b[i] >= floor for some m. With top > 1, floor is the top-th
// largest approx[i] - b[i] instead: top rows' exact logits reach it, so every row of the exact
// top-k (ties with the k-th included) stays. Returns the sorted ids, or no ids
// where none stay (a NaN) or more than max_keep do: then the caller computes every logit.
// One call instead of ~10 torch ops over the vocabulary (~0.45 ms a step of smollm2-135m).
torch::Tensor screen_int8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                          const torch::Tensor& per_n1, const torch::Tensor& per_n2, const torch::Tensor& per_x_rounding,
                          const torch::Tensor& per_n1_sums, int64_t limit, double rounding, int64_t max_keep,
                          int64_t top) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "screen: x must be contiguous float32");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(limit >= 1 && limit <= N, "screen: limit must be in [1, ", N, "]");
  TORCH_CHECK(top >= 1 && top <= limit, "screen: top must be in [1, ", limit, "]");
  for (const auto* t : {&per_n1, &per_n2, &per_x_rounding, &per_n1_sums})
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->numel() == N,
                "screen: one float32 coefficient per head row");
  const torch::Tensor approx = (linear)(x, q, scale);  // (M, N) fp32 (parenthesized: not at::linear)
  const float* a = approx.data_ptr<float>();
  const float *c1 = per_n1.data_ptr<float>(), *c2 = per_n2.data_ptr<float>();
  const float *cx = per_x_rounding.data_ptr<float>(), *cs = per_n1_sums.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  std::vector<float> bound(limit), top_lower;
  std::vector<uint8_t> keep(limit, 0);
  for (int64_t m = 0; m < M; ++m) {
    double s1 = 0.0, s2 = 0.0, e2 = 0.0;
    for (int64_t k = 0; k < K; ++k) s1 += std::fabs(xp[m * K + k]), s2 += double(xp[m * K + k]) * xp[m * K + k];
#ifdef GEMV_VNNI
    if (K % RUN == 0)  // linear's int8 path rounds x: the same float ops as quantize_runs
      for (int64_t r = 0; r < K / RUN; ++r) {
        const float* p = xp + m * K + r * RUN;
        float amax = 0.f;
        for (int j = 0; j < RUN; ++j) amax = std::max(amax, std::fabs(p[j]));
        const float scale = amax / 32767.f, inv = scale > 0.f ? 1.f / scale : 0.f;
        for (int j = 0; j < RUN; ++j) {
          const double e = double(p[j]) - double(std::nearbyint(p[j] * inv)) * scale;
          e2 += e * e;
        }
      }
#endif
    const float n1 = float(s1 * (1.0 + 1e-6)), n2 = float(std::sqrt(s2) * (1.0 + 1e-6));
    const float ex = float(std::sqrt(e2) * 1.01);
    const float* am = a + m * N;
    const auto bound_at = [&](int64_t i) {
      return std::min(c1[i] * n1, c2[i] * n2) + cx[i] * ex + cs[i] * n1 + 1e-6f * std::fabs(am[i]);
    };
    float floor = -INFINITY;
    int64_t i = 0;
#ifdef GEMV_AVX512  // 16 rows an instruction: the scalar loop is ~0.15 ms a row of x over 49K rows
    const __m512 vn1 = _mm512_set1_ps(n1), vn2 = _mm512_set1_ps(n2), vex = _mm512_set1_ps(ex);
    const __m512 tiny = _mm512_set1_ps(1e-6f);
    __m512 vfloor = _mm512_set1_ps(-INFINITY);
    for (; i + LANES <= limit; i += LANES) {
      const __m512 ai = _mm512_loadu_ps(am + i);
      __m512 b = _mm512_min_ps(_mm512_mul_ps(_mm512_loadu_ps(c1 + i), vn1), _mm512_mul_ps(_mm512_loadu_ps(c2 + i), vn2));
      b = _mm512_add_ps(b, _mm512_mul_ps(_mm512_loadu_ps(cx + i), vex));
      b = _mm512_add_ps(b, _mm512_mul_ps(_mm512_loadu_ps(cs + i), vn1));
      b = _mm512_add_ps(b, _mm512_mul_ps(tiny, _mm512_abs_ps(ai)));
      _mm512_storeu_ps(bound.data() + i, b);
      vfloor = _mm512_max_ps(_mm512_sub_ps(ai, b), vfloor);  // a NaN lane keeps the floor (the second operand)
    }
    floor = _mm512_reduce_max_ps(vfloor);
#endif
    for (int64_t j = i; j < limit; ++j) {
      bound[j] = bound_at(j);
      floor = std::max(floor, am[j] - bound[j]);  // (a NaN never wins the max)
    }
    if (top > 1) {  // the top-th largest lower bound: top rows' exact logits reach it (top-k sampling)
      std::vector<float>& lower = top_lower;
      lower.resize(limit);
      for (int64_t j = 0; j < limit; ++j) {
        const float l = am[j] - bound[j];
        lower[j] = std::isnan(l) ? -INFINITY : l;  // a NaN row is never a candidate
      }
      std::nth_element(lower.begin(), lower.begin() + (top - 1), lower.end(), std::greater<float>());
      floor = lower[top - 1];
    }
    floor -= float(rounding) * std::fabs(floor);
    i = 0;
#ifdef GEMV_AVX512
    const __m512 vf = _mm512_set1_ps(floor);
    for (; i + LANES <= limit; i += LANES) {
      __mmask16 hit = _mm512_cmp_ps_mask(_mm512_add_ps(_mm512_loadu_ps(am + i), _mm512_loadu_ps(bound.data() + i)),
                                         vf, _CMP_GE_OQ);  // ordered: NaN is false
      for (; hit; hit &= hit - 1) keep[i + __builtin_ctz(hit)] = 1;
    }
#endif
    for (; i < limit; ++i) keep[i] |= am[i] + bound[i] >= floor;  // NaN: false
  }
  std::vector<int64_t> ids;
  for (int64_t i = 0; i < limit; ++i) {
    if (i + 8 <= limit) {  // mostly none kept: 8 at a time
      uint64_t eight;
      std::memcpy(&eight, keep.data() + i, 8);
      if (!eight) { i += 7; continue; }
    }
    if (keep[i] && int64_t(ids.size()) < max_keep + 1) ids.push_back(i);
  }
  if (int64_t(ids.size()) > max_keep) ids.clear();
  torch::Tensor out = torch::empty({int64_t(ids.size())}, torch::kLong);
  std::copy(ids.begin(), ids.end(), out.data_ptr<int64_t>());
  return out;
}

}  // namespace

// For decode_ops.cpp's FusedBlock: the same kernels, called from C++.
torch::Tensor gemv_linear(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& scale) {
  return (linear)(x, w, scale);  // parenthesized: not at::linear, which lookup by argument type also finds
}
torch::Tensor gemv_linear_int4(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                               const torch::Tensor& offset, int64_t G) {
  return linear_int4(x, q, scale, offset, G);
}
torch::Tensor gemv_linear_transposed(const torch::Tensor& x, const torch::Tensor& w_t,
                                     const c10::optional<torch::Tensor>& bias) {
  return linear_transposed(x, w_t, bias);
}

void register_decode_ops(pybind11::module& m);  // decode_ops.cpp: the small ops between the matrices

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_decode_ops(m);
  m.def("linear", &linear, "y = x @ W^T (times one scale per output row), 8 rows of x a pass; W fp32, bf16 or int8");
  m.def("linear_transposed", &linear_transposed, "y = x @ W_t (+ bias), W_t (K, N) fp32, 8 rows of x a pass");
  m.def("columns_transposed", &columns_transposed, "y = x @ W_t[:, ids], a few columns of a (K, N) fp32 matrix");
  m.def("dequantize", &dequantize, "an int8 (N, K) or int4 (N, K / 2) matrix as bf16 (N, K), for prompts");
  m.def("screen_int8", &screen_int8, "the rows of an int8 head that may hold the largest (or top) exact logits");
  m.def("linear_int4", &linear_int4, "y = x @ (scale * q + offset)^T, group-wise, 8 rows of x a pass");
  m.attr("MAX_M") = MAX_M;
#ifdef GEMV_VNNI
  m.attr("VNNI") = true;
#else
  m.attr("VNNI") = false;
#endif
#ifdef GEMV_BF16DOT
  m.attr("BF16DOT") = true;
#else
  m.attr("BF16DOT") = false;
#endif
}
