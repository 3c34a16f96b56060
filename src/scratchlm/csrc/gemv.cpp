// Matrix-vector products for decoding: y (M, N) = x (M, K) @ W^T for a few rows of x (M <= 8),
// with W (N, K) row-major as nn.Linear stores it, in fp32, bf16, int8 or int4.
//
// Why our own: one token at a time, every weight is read once and feeds one multiply-add per
// row of x, so speed is how well the weights stream from memory, and the general matmul
// kernels of MKL / oneDNN / torch's int8 and int4 kernels stream them at 20-45% of the
// machine's read bandwidth at batch 1 (benchmarks/decode.py). Here each output n is a dot
// product over the contiguous row W[n, :]; a thread takes a run of rows and streams them front
// to back, R rows at a time so that each load of x serves R weight rows.
//
// Weight formats (the dot product differs only in how 16 weights become 16 floats):
//   fp32  W[n, k]
//   bf16  W[n, k]: the top 16 bits of a float
//   int8  scale[n] * q[n, k], q in [-127, 127]                  (decode_weights.Int8Linear)
//   int4  scale[n, g] * q[n, k] + offset[n, g] (fp16 scale and offset: a GGUF Q4_0 / Q4_1 block's own
//         d and m are f16), q in [0, 15], g = k / group_size, two q a byte:
//         byte[n, 16*b + i] holds q[n, 32*b + i] in its low nibble and q[n, 32*b + 16 + i] in
//         its high one (i < 16): one 16-byte load unpacks to two runs of 16 consecutive k.
// Accumulation is in fp32 for every format; x is converted to fp32 once per call.
//
// With AVX-512 (compiled with -march=native where the CPU has it, see cpu_gemv.py) each run of
// 16 weights is one register; elsewhere the same loops run on plain floats.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define GEMV_AVX512 1
#endif

namespace {

constexpr int LANES = 16;   // floats per AVX-512 register; K must be a multiple
constexpr int MAX_M = 8;    // rows of x; for more, a matrix-matrix kernel is the better tool

#ifdef GEMV_AVX512
using Vec = __m512;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vset(float s) { return _mm512_set1_ps(s); }
inline float vsum(Vec a) { return _mm512_reduce_add_ps(a); }
// 16 weights of each format as 16 floats
inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
inline Vec load16(const float* p) { return _mm512_loadu_ps(p); }
inline Vec load16(const uint16_t* p) {  // bf16: widen to 32 bits and shift into the top half
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline Vec load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
// int4: 16 bytes -> q of the 16 low nibbles (lo) and of the 16 high ones (hi)
inline void load32_int4(const uint8_t* p, Vec& lo, Vec& hi) {
  __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
  hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
}
#else
struct Vec { float v[LANES]; };
inline Vec vzero() { return Vec{}; }
inline Vec vload(const float* p) { Vec r; std::memcpy(r.v, p, sizeof r.v); return r; }
inline Vec vfma(Vec a, Vec b, Vec c) { for (int i = 0; i < LANES; ++i) c.v[i] += a.v[i] * b.v[i]; return c; }
inline Vec vset(float s) { Vec r; for (int i = 0; i < LANES; ++i) r.v[i] = s; return r; }
inline float vsum(Vec a) { float s = 0.f; for (int i = 0; i < LANES; ++i) s += a.v[i]; return s; }
inline float half_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }
inline Vec load16(const float* p) { return vload(p); }
inline Vec load16(const uint16_t* p) {
  Vec r;
  for (int i = 0; i < LANES; ++i) { uint32_t bits = uint32_t(p[i]) << 16; std::memcpy(&r.v[i], &bits, 4); }
  return r;
}
inline Vec load16(const int8_t* p) { Vec r; for (int i = 0; i < LANES; ++i) r.v[i] = p[i]; return r; }
inline void load32_int4(const uint8_t* p, Vec& lo, Vec& hi) {
  for (int i = 0; i < LANES; ++i) { lo.v[i] = p[i] & 15; hi.v[i] = p[i] >> 4; }
}
#endif

// Weight rows per pass: enough independent accumulators (M * R) to hide the multiply-add
// latency, few enough to stay in registers.
template <int M> constexpr int rows_per_pass() { return M <= 2 ? 4 : (M <= 4 ? 2 : 1); }

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

// int4: per group of G inputs a partial sum, then acc += scale * partial, plus offset * sum(x in group).
template <int M, int R>
inline void dot_rows_int4(const uint8_t* q, const uint16_t* scale, const uint16_t* offset, const float* x,
                          const float* xsum, int64_t N, int64_t K, int64_t G, float* y, int64_t n0) {
  const int64_t groups = K / G;
  Vec acc[M][R];
  float extra[M][R] = {};
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = vzero();
  for (int64_t g = 0; g < groups; ++g) {
    Vec part[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) part[m][r] = vzero();
    for (int64_t k = g * G; k < (g + 1) * G; k += 2 * LANES) {
      Vec lo[R], hi[R];
      for (int r = 0; r < R; ++r) load32_int4(q + (n0 + r) * (K / 2) + k / 2, lo[r], hi[r]);
      for (int m = 0; m < M; ++m) {
        Vec xlo = vload(x + m * K + k), xhi = vload(x + m * K + k + LANES);
        for (int r = 0; r < R; ++r) part[m][r] = vfma(xhi, hi[r], vfma(xlo, lo[r], part[m][r]));
      }
    }
    for (int r = 0; r < R; ++r) {
      const Vec s = vset(half_to_float(scale[(n0 + r) * groups + g]));
      const float o = half_to_float(offset[(n0 + r) * groups + g]);
      for (int m = 0; m < M; ++m) {
        acc[m][r] = vfma(s, part[m][r], acc[m][r]);
        extra[m][r] += o * xsum[m * groups + g];
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) y[m * N + n0 + r] = vsum(acc[m][r]) + extra[m][r];
}

// Rows split among threads in runs of >= ~64 KiB of weights: smaller tasks cost more to hand
// out than to do (a 576 x 576 fp32 matrix, 1.3 MB, goes to 2 threads as 2 runs).
inline int64_t grain(int64_t row_bytes) { return std::max<int64_t>(4, (64 << 10) / std::max<int64_t>(1, row_bytes)); }

template <int M, typename T>
void gemv(const T* W, const float* x, int64_t N, int64_t K, const float* scale, float* y) {
  constexpr int R = rows_per_pass<M>();
  at::parallel_for(0, N, grain(K * sizeof(T)), [&](int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + R <= n1; n += R) dot_rows<M, R>(W, x, N, K, scale, y, n);
    for (; n < n1; ++n) dot_rows<M, 1>(W, x, N, K, scale, y, n);
  });
}

template <int M>
void gemv_int4(const uint8_t* q, const uint16_t* scale, const uint16_t* offset, const float* x, const float* xsum,
               int64_t N, int64_t K, int64_t G, float* y) {
  constexpr int R = rows_per_pass<M>();
  at::parallel_for(0, N, grain(K / 2), [&](int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + R <= n1; n += R) dot_rows_int4<M, R>(q, scale, offset, x, xsum, N, K, G, y, n);
    for (; n < n1; ++n) dot_rows_int4<M, 1>(q, scale, offset, x, xsum, N, K, G, y, n);
  });
}

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

void check_x(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "gemv: x must be (M, ", K, "), got ", x.sizes());
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= MAX_M, "gemv: 1 to ", MAX_M, " rows of x, got ", x.size(0));
  TORCH_CHECK(K % LANES == 0, "gemv: in_features must be a multiple of ", LANES, ", got ", K);
}

// x (M, K) any float dtype; w (N, K) fp32, bf16 or int8; scale (N,) or None -> y (M, N) in x's dtype.
torch::Tensor linear(const torch::Tensor& x_in, const torch::Tensor& w, const c10::optional<torch::Tensor>& scale) {
  const int64_t N = w.size(0), K = w.size(1), M = x_in.size(0);
  check_x(x_in, K);
  TORCH_CHECK(w.is_contiguous(), "gemv: the weight must be contiguous");
  const torch::Tensor x = x_in.to(torch::kFloat32).contiguous();
  torch::Tensor y = torch::empty({M, N}, x.options());
  torch::Tensor sf;
  const float* s = nullptr;
  if (scale.has_value()) {
    sf = scale->to(torch::kFloat32).contiguous();
    TORCH_CHECK(sf.numel() == N, "gemv: one scale per output row");
    s = sf.data_ptr<float>();
  }
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  with_m(M, [&](auto m) {
    constexpr int MM = decltype(m)::value;
    switch (w.scalar_type()) {
      case torch::kFloat32: gemv<MM>(w.data_ptr<float>(), xp, N, K, s, yp); break;
      case torch::kBFloat16:
        gemv<MM>(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), xp, N, K, s, yp);
        break;
      case torch::kChar: gemv<MM>(w.data_ptr<int8_t>(), xp, N, K, s, yp); break;
      default: TORCH_CHECK(false, "gemv: weight dtype must be float32, bfloat16 or int8, got ", w.scalar_type());
    }
  });
  return y.scalar_type() == x_in.scalar_type() ? y : y.to(x_in.scalar_type());
}

// x (M, K); q (N, K / 2) uint8; scale, offset (N, K / G) fp16 -> y (M, N) in x's dtype.
torch::Tensor linear_int4(const torch::Tensor& x_in, const torch::Tensor& q, const torch::Tensor& scale,
                          const torch::Tensor& offset, int64_t G) {
  const int64_t N = q.size(0), K = 2 * q.size(1), M = x_in.size(0);
  check_x(x_in, K);
  TORCH_CHECK(G % (2 * LANES) == 0 && K % G == 0, "gemv int4: the group size must divide in_features and be "
              "a multiple of ", 2 * LANES);
  // scale and offset: fp16, or fp16 bits held as int16 (decode_weights.Int4Linear)
  auto half_bits = [](const torch::Tensor& t) { return t.scalar_type() == torch::kHalf || t.scalar_type() == torch::kShort; };
  TORCH_CHECK(q.scalar_type() == torch::kByte && half_bits(scale) && half_bits(offset),
              "gemv int4: q uint8, scale and offset float16 (or its bits as int16)");
  TORCH_CHECK(q.is_contiguous() && scale.is_contiguous() && offset.is_contiguous(), "gemv int4: contiguous parts");
  TORCH_CHECK(scale.numel() == N * (K / G) && offset.numel() == N * (K / G), "gemv int4: (N, K / G) scales");
  const torch::Tensor x = x_in.to(torch::kFloat32).contiguous();
  const torch::Tensor xsum = x.view({M, K / G, G}).sum(-1).contiguous();  // (M, groups)
  torch::Tensor y = torch::empty({M, N}, x.options());
  with_m(M, [&](auto m) {
    gemv_int4<decltype(m)::value>(q.data_ptr<uint8_t>(), static_cast<const uint16_t*>(scale.data_ptr()),
                                  static_cast<const uint16_t*>(offset.data_ptr()),
                                  x.data_ptr<float>(), xsum.data_ptr<float>(), N, K, G, y.data_ptr<float>());
  });
  return y.scalar_type() == x_in.scalar_type() ? y : y.to(x_in.scalar_type());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "y = x @ W^T (times one scale per output row) for 1-8 rows of x; W fp32, bf16 or int8");
  m.def("linear_int4", &linear_int4, "y = x @ (scale * q + offset)^T, group-wise, for 1-8 rows of x");
  m.attr("MAX_M") = MAX_M;
#ifdef GEMV_AVX512
  m.attr("AVX512") = true;
#else
  m.attr("AVX512") = false;
#endif
}
