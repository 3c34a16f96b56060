// The small operations of a one-token decode step, fused: norms with the residual add, the
// attention of one new query per row (QK-norm, rotary, the cache write and the softmax over the
// cached keys), and the gated activation of the MLP. decode_block.py calls them between the
// weight matrices, which stay gemv.cpp's (or PyTorch's) kernels.
//
// Why: at one token a step, each of these is a few hundred to a few thousand numbers, and
// written as PyTorch ops (model.py) a layer is ~45 of them, each costing its dispatch (~3-6 us
// on a small CPU) more than its arithmetic: ~11-20 ms of a SmolLM2-135M step, as much as the
// weights themselves. Here a layer is 4 calls.
//
// Numbers: everything is computed in fp32 and rounded to the activations' dtype (fp32 or bf16)
// where model.py's ops would round it, so a bf16 step gives model.py's bf16 numbers up to the
// order of the sums (tests/test_decode_block.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

// model.py's norms: NONE is an Identity (a placement without that norm), RMS Llama's (the
// weight multiplies after the cast back), RMS_PLUS_ONE Gemma's (1 + weight, before the cast),
// LAYER nn.LayerNorm (weight and an optional bias).
enum NormKind : int64_t { NONE = 0, RMS = 1, RMS_PLUS_ONE = 2, LAYER = 3 };
enum Activation : int64_t { SILU = 0, GELU_TANH = 1, RELU = 2 };

inline float bf16_bits_to_float(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// v to bf16 bits, rounded to nearest even as c10::BFloat16 does (NaN stays NaN), written
// without a call so that loops over it vectorize.
inline uint16_t float_to_bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t(0x7FC0) : uint16_t(r);
}

// sum of a[i] * b[i] in 16 lanes (the compiler vectorizes the lanes; their order of summing
// is not model.py's, hence differences in the last bits).
inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#ifdef __AVX512F__
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  s = _mm512_reduce_add_ps(acc);
#else
  float lanes[16] = {};
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) lanes[l] += a[i + l] * b[i + l];
  for (int l = 0; l < 16; ++l) s += lanes[l];
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y[0:n] += p * x[0:n]
inline void axpy(float p, const float* x, float* y, int64_t n) {
  int64_t i = 0;
#ifdef __AVX512F__
  const __m512 pv = _mm512_set1_ps(p);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(pv, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += p * x[i];
}

// e^x within ~2 ulp for x in [-87, 88] (0 below), written so that loops over it vectorize
// (std::exp is a library call per element): e^x = 2^n e^r, |r| <= ln2 / 2, e^r by Cephes'
// polynomial, 2^n put straight into the exponent bits.
inline float exp_approx(float x) {
  if (x != x) return x;  // NaN stays NaN
  const float xc = std::min(std::max(x, -87.f), 88.f);
  const float n = std::floor(xc * 1.44269504f + 0.5f);
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return x < -87.f ? 0.f : p * scale;
}

#ifdef __AVX512F__
// exp_approx, 16 lanes (GCC does not vectorize the scalar one).
inline __m512 exp_approx16(__m512 x) {
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __m512 scale = _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_GE_OQ), _mm512_mul_ps(p, scale));
  return _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);  // NaN stays NaN
}

// v rounded to bf16 and back, 16 lanes, as float_to_bf16_bits (NaN stays NaN).
inline __m512 round_bf16_16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i bump = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
  const __m512 r = _mm512_castsi512_ps(_mm512_and_si512(_mm512_add_epi32(u, bump), _mm512_set1_epi32(int(0xFFFF0000u))));
  return _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v);
}
#endif

// A float32 or bfloat16 buffer, read and written as floats (bf16 rounded to nearest even).
struct Floats {
  void* p = nullptr;
  bool bf16 = false;
  Floats() = default;
  explicit Floats(const torch::Tensor& t) : p(t.data_ptr()), bf16(t.scalar_type() == torch::kBFloat16) {
    TORCH_CHECK(t.scalar_type() == torch::kFloat32 || bf16, "decode ops: float32 or bfloat16 tensors, got ",
                t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), "decode ops: contiguous tensors");
  }
  float get(int64_t i) const {
    return bf16 ? bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
  }
  void set(int64_t i, float v) const {
    if (bf16) static_cast<uint16_t*>(p)[i] = float_to_bf16_bits(v);
    else static_cast<float*>(p)[i] = v;
  }
  // n values from element `from` into out, and back: the dtype branch outside the loop.
  void load(int64_t from, int64_t n, float* out) const {
    if (!bf16) {
      std::memcpy(out, static_cast<const float*>(p) + from, n * 4);
      return;
    }
    const uint16_t* h = static_cast<const uint16_t*>(p) + from;
    int64_t i = 0;
#ifdef __AVX512F__
    for (; i + 16 <= n; i += 16)  // widen to 32 bits, shift into the top half
      _mm512_storeu_ps(out + i, _mm512_castsi512_ps(_mm512_slli_epi32(
                                    _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i))), 16)));
#endif
    for (; i < n; ++i) out[i] = bf16_bits_to_float(h[i]);
  }
  void store(int64_t from, int64_t n, const float* in) const {
    if (!bf16) {
      std::memcpy(static_cast<float*>(p) + from, in, n * 4);
      return;
    }
    uint16_t* h = static_cast<uint16_t*>(p) + from;
    int64_t i = 0;
#ifdef __AVX512F__
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(h + i),
                          _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(round_bf16_16(_mm512_loadu_ps(in + i))), 16)));
#endif
    for (; i < n; ++i) h[i] = float_to_bf16_bits(in[i]);
  }
};

// v rounded to the dtype model.py computes in (a no-op for fp32).
inline float rounded(float v, bool bf16) { return bf16 ? bf16_bits_to_float(float_to_bf16_bits(v)) : v; }

struct Norm {
  int64_t kind = NONE;
  std::vector<float> weight, bias;  // as floats, read once a call
  double eps = 1e-5;
};

Norm make_norm(int64_t kind, const c10::optional<torch::Tensor>& weight, const c10::optional<torch::Tensor>& bias,
               double eps, int64_t dim) {
  Norm n;
  n.kind = kind, n.eps = eps;
  if (kind == NONE) return n;
  TORCH_CHECK(weight.has_value() && weight->numel() == dim, "decode ops: a norm weight of ", dim, " features");
  n.weight.resize(dim);
  Floats(*weight).load(0, dim, n.weight.data());
  n.bias.assign(dim, 0.f);
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == dim, "decode ops: a norm bias of ", dim, " features");
    Floats(*bias).load(0, dim, n.bias.data());
  }
  if (kind == RMS_PLUS_ONE)
    for (auto& w : n.weight) w += 1.f;  // Gemma: 1 + weight, in fp32
  return n;
}

// out[0:d] = norm(x[0:d]) rounded as model.py rounds it (x already holds the dtype's values).
void norm_row(const float* x, float* out, int64_t d, const Norm& n, bool bf16) {
  if (n.kind == NONE) {
    std::copy(x, x + d, out);
    return;
  }
  if (n.kind == LAYER) {
    double mean = 0.0, var = 0.0;
    for (int64_t i = 0; i < d; ++i) mean += x[i];
    mean /= d;
    for (int64_t i = 0; i < d; ++i) var += (x[i] - mean) * (x[i] - mean);
    const float m = float(mean), r = float(1.0 / std::sqrt(var / d + n.eps));
    const float *w = n.weight.data(), *b = n.bias.data();
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) out[i] = rounded((x[i] - m) * r * w[i] + b[i], bf16);
    return;
  }
  const float ss = dot(x, x, d);
  const float r = 1.f / std::sqrt(ss / float(d) + float(n.eps));
  const float* w = n.weight.data();
  if (n.kind == RMS_PLUS_ONE) {
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) out[i] = rounded(x[i] * r * w[i], bf16);
  } else if (bf16) {  // Llama: weight * (normed cast back to bf16), in bf16
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) out[i] = rounded(w[i] * rounded(x[i] * r, true), true);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) out[i] = x[i] * r * w[i];
  }
}

// x (..., d); delta (..., d) or None -> [x + post(delta), pre(x + post(delta))] in x's dtype:
// one residual branch landing (post: its output norm, OLMo 2 / Gemma 3) and the next one's input
// norm (pre). Without delta: [x, pre(x)].
std::vector<torch::Tensor> residual_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& delta,
                                         int64_t post_kind, const c10::optional<torch::Tensor>& post_weight,
                                         const c10::optional<torch::Tensor>& post_bias, int64_t pre_kind,
                                         const c10::optional<torch::Tensor>& pre_weight,
                                         const c10::optional<torch::Tensor>& pre_bias, double eps) {
  const int64_t d = x.size(-1), rows = x.numel() / d;
  const Norm post = make_norm(post_kind, post_weight, post_bias, eps, d);
  const Norm pre = make_norm(pre_kind, pre_weight, pre_bias, eps, d);
  const Floats xs(x);
  torch::Tensor out = x;
  if (delta.has_value()) {
    TORCH_CHECK(delta->sizes() == x.sizes() && delta->scalar_type() == x.scalar_type(),
                "residual_norm: delta must match x");
    out = torch::empty_like(x);
  }
  torch::Tensor h = pre_kind == NONE ? out : torch::empty_like(x);
  const Floats outs(out), hs(h);
  thread_local std::vector<float> row, branch, normed;
  row.resize(d), branch.resize(d), normed.resize(d);
  const bool bf16 = xs.bf16;
  for (int64_t r = 0; r < rows; ++r) {
    xs.load(r * d, d, row.data());
    if (delta.has_value()) {
      Floats(*delta).load(r * d, d, branch.data());
      norm_row(branch.data(), normed.data(), d, post, bf16);
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) row[i] = rounded(row[i] + normed[i], bf16);
      outs.store(r * d, d, row.data());
    }
    if (pre_kind != NONE) {
      norm_row(row.data(), normed.data(), d, pre, bf16);
      hs.store(r * d, d, normed.data());
    }
  }
  return {out, h};
}

// Rotate each (x_i, x_{i+D/2}) pair of one head in place, as model.apply_rope does:
// x * cos + cat(-x2, x1) * sin, each product and the sum rounded to the dtype.
inline void rope_head(float* x, const float* cos, const float* sin, int64_t D, bool bf16) {
  const int64_t half = D / 2;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    x[i] = rounded(rounded(x1 * cos[i], bf16) + rounded(-x2 * sin[i], bf16), bf16);
    x[i + half] = rounded(rounded(x2 * cos[i + half], bf16) + rounded(x1 * sin[i + half], bf16), bf16);
  }
}

// Each of the `rows` rows of scores (rows, keys) to e^(score - max), total[j] = 1 / its sum
// (a masked key holds -inf: e^-inf = 0), top[j] its max where top is given.
inline void softmax_rows(float* scores, float* total, int64_t rows, int64_t keys, float* top_out = nullptr) {
  for (int64_t j = 0; j < rows; ++j) {
    float* sj = scores + j * keys;
    float top = -std::numeric_limits<float>::infinity(), sum = 0.f;
    for (int64_t t = 0; t < keys; ++t) top = std::max(top, sj[t]);
    int64_t t0 = 0;
#ifdef __AVX512F__
    __m512 sums = _mm512_setzero_ps();
    for (; t0 + 16 <= keys; t0 += 16) {
      const __m512 e = exp_approx16(_mm512_sub_ps(_mm512_loadu_ps(sj + t0), _mm512_set1_ps(top)));
      _mm512_storeu_ps(sj + t0, e);
      sums = _mm512_add_ps(sums, e);
    }
    sum = _mm512_reduce_add_ps(sums);
#endif
    for (int64_t t = t0; t < keys; ++t) sum += sj[t] = exp_approx(sj[t] - top);
    total[j] = 1.f / sum;
    if (top_out) top_out[j] = top;
  }
}

#ifdef __AVX512F__
// 16 values of a cache row as floats: bf16 widened (shifted into the top half) or fp32 as is.
template <bool BF16>
inline __m512 cache16(const void* p, int64_t at) {
  if constexpr (BF16)
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + at))), 16));
  else
    return _mm512_loadu_ps(static_cast<const float*>(p) + at);
}

// One (row, kv head): its `group` queries qg (group, D) against keys [0, keys) of the cache
// rows at `base`, softmax, times the values -> acc (group, D), the same sums in the same order
// as the portable loop below, with the partial sums in registers instead of memory: each key
// (value) row is read 16 lanes at a time straight from the cache (bf16 widened in registers)
// and multiplies all `group` queries (attention weights) while it is there. D a multiple of
// 16 up to 256, group <= 8 (a template argument: the loops over it unrolled, its sums in registers).
template <bool BF16, int group>
void attend_group(const float* qg, const void* kc, const void* vc, int64_t base, int64_t keys, int64_t D,
                  float s, const bool* mask, float* scores, float* total, float* acc, float* top) {
  const int64_t slices = D / 16;
  for (int64_t t = 0; t < keys; ++t) {
    if (mask && !mask[t]) {
      for (int64_t j = 0; j < group; ++j) scores[j * keys + t] = -std::numeric_limits<float>::infinity();
      continue;
    }
    __m512 dot[group];
    for (int j = 0; j < group; ++j) dot[j] = _mm512_setzero_ps();
    for (int64_t d = 0; d < slices; ++d) {
      const __m512 k = cache16<BF16>(kc, base + t * D + 16 * d);
      for (int j = 0; j < group; ++j) dot[j] = _mm512_fmadd_ps(_mm512_loadu_ps(qg + j * D + 16 * d), k, dot[j]);
    }
    for (int j = 0; j < group; ++j) scores[j * keys + t] = _mm512_reduce_add_ps(dot[j]) * s;
  }
  softmax_rows(scores, total, group, keys, top);
  for (int64_t j = 0; j < group; ++j)  // the attention weights: e^(score - max) / sum
    for (int64_t t = 0; t < keys; ++t) scores[j * keys + t] *= total[j];
  for (int64_t d = 0; d < slices; ++d) {
    __m512 sum[group];
    for (int j = 0; j < group; ++j) sum[j] = _mm512_setzero_ps();
    for (int64_t t = 0; t < keys; ++t) {
      if (mask && !mask[t]) continue;
      const __m512 v = cache16<BF16>(vc, base + t * D + 16 * d);
      for (int j = 0; j < group; ++j) sum[j] = _mm512_fmadd_ps(_mm512_set1_ps(scores[j * keys + t]), v, sum[j]);
    }
    for (int j = 0; j < group; ++j) _mm512_storeu_ps(acc + j * D + 16 * d, sum[j]);
  }
}

// attend_group with its group size as a constant (1 to 8).
template <bool BF16>
void attend_group_of(int64_t group, const float* qg, const void* kc, const void* vc, int64_t base, int64_t keys,
                     int64_t D, float s, const bool* mask, float* scores, float* total, float* acc, float* top) {
  switch (group) {
    case 1: return attend_group<BF16, 1>(qg, kc, vc, base, keys, D, s, mask, scores, total, acc, top);
    case 2: return attend_group<BF16, 2>(qg, kc, vc, base, keys, D, s, mask, scores, total, acc, top);
    case 3: return attend_group<BF16, 3>(qg, kc, vc, base, keys, D, s, mask, scores, total, acc, top);
    case 4: return attend_group<BF16, 4>(qg, kc, vc, base, keys, D, s, mask, scores, total, acc, top);
    case 5: return attend_group<BF16, 5>(qg, kc, vc, base, keys, D, s, mask, scores, total, acc, top);
    case 6: return attend_group<BF16, 6>(qg, kc, vc, base, keys, D, s, mask, scores, total, acc, top);
    case 7: return attend_group<BF16, 7>(qg, kc, vc, base, keys, D, s, mask, scores, total, acc, top);
    default: return attend_group<BF16, 8>(qg, kc, vc, base, keys, D, s, mask, scores, total, acc, top);
  }
}
#endif

// How many runs of keys each (row, kv head) is cut into, one task each (flash-decoding's split):
// at batch 1 SmolLM2 has 3 key heads for 2 threads, so the longest thread did 2 of the 3 and a
// long cache's attention was two thirds serial. Enough runs that the tasks divide evenly among
// the threads, each at least 64 keys; 1 (no split) for a batch with enough (row, head) pairs, a
// single thread, or less work than ATTEND_PARALLEL multiply-adds in all (where waking the other
// core costs more than it saves).
#ifndef ATTEND_PARALLEL
#define ATTEND_PARALLEL (1 << 16)
#endif
inline int64_t key_splits(int64_t pairs, int64_t keys, int64_t work) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || work < ATTEND_PARALLEL || pairs >= 4 * threads) return 1;
  const int64_t even = threads / std::gcd(pairs, threads);  // pairs * even is a multiple of threads
  return std::max<int64_t>(1, std::min(even, keys / 64));
}

#ifdef __AVX512F__
// attend_one's attention with each (row, kv head)'s keys in `splits` runs: each run's softmax
// and weighted values are those of attend_group over its keys alone (max m_r, sum l_r, output
// o_r); a query's output is then sum_r w_r o_r / sum_r w_r with w_r = l_r e^(m_r - max_r m_r),
// the softmax over all the keys. A run whose keys are all masked (left padding) has l_r = 0.
void attend_split(const float* q, const Floats& kc, const Floats& vc, const bool* mk, int64_t mask_stride,
                  const Floats& out, int64_t B, int64_t Hkv, int64_t C, int64_t D, int64_t group, int64_t keys,
                  int64_t splits, float s) {
  const int64_t chunk = (keys + splits - 1) / splits, pairs = B * Hkv, Q = Hkv * group * D;
  std::vector<float> parts(pairs * splits * group * D), tops(pairs * splits * group), totals(pairs * splits * group);
  at::parallel_for(0, pairs * splits, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> scores;
    scores.resize(group * chunk);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t pair = w / splits, t0 = (w % splits) * chunk, n = std::min(chunk, keys - t0);
      const int64_t b = pair / Hkv, g = pair % Hkv;
      float *acc = parts.data() + w * group * D, *top = tops.data() + w * group, *total = totals.data() + w * group;
      if (n <= 0) {  // (chunks rounded up: the last may be empty)
        std::fill(top, top + group, -std::numeric_limits<float>::infinity());
        continue;
      }
      const int64_t base = ((b * Hkv + g) * C + t0) * D;
      const float* qg = q + b * Q + g * group * D;
      const bool* mb = mk ? mk + b * mask_stride + t0 : nullptr;
      if (kc.bf16) attend_group_of<true>(group, qg, kc.p, vc.p, base, n, D, s, mb, scores.data(), total, acc, top);
      else attend_group_of<false>(group, qg, kc.p, vc.p, base, n, D, s, mb, scores.data(), total, acc, top);
    }
  });
  std::vector<float> y(group * D), weight(splits);
  for (int64_t pair = 0; pair < pairs; ++pair) {
    for (int64_t j = 0; j < group; ++j) {
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t r = 0; r < splits; ++r) top = std::max(top, tops[(pair * splits + r) * group + j]);
      float sum = 0.f;
      for (int64_t r = 0; r < splits; ++r) {  // totals hold 1 / l_r
        const int64_t at = (pair * splits + r) * group + j;
        weight[r] = tops[at] == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(tops[at] - top) / totals[at];
        sum += weight[r];
      }
      float* yj = y.data() + j * D;
      std::fill(yj, yj + D, 0.f);
      for (int64_t r = 0; r < splits; ++r)
        if (weight[r] > 0.f) axpy(weight[r] / sum, parts.data() + ((pair * splits + r) * group + j) * D, yj, D);
    }
    out.store(pair * group * D, group * D, y.data());  // pair = b * Hkv + g: (b, g)'s heads in y
  }
}
#endif

// One new token per row attending to the cache (model.Attention.forward at T = 1):
//   qkv (B, (H + 2 Hkv) D): the qkv_proj output;  cos, sin (1 or B, D), or None (no rotary);
//   k_cache, v_cache (B, Hkv, C, D): the layer's buffers; the new key and value go to column
//   `column`, then the query reads columns [0, keys);  mask: None, or bool with keys (every
//   row) or B * keys entries, True where a key may be read;  qk_norm: 0 none, 1 per head,
//   2 over the whole projection (OLMo 2), with q_weight / k_weight of norm kind qk_norm_kind.
// -> y (B, H D): the heads side by side, ready for out_proj.
torch::Tensor attend_one(const torch::Tensor& qkv, const c10::optional<torch::Tensor>& cos,
                         const c10::optional<torch::Tensor>& sin, const torch::Tensor& k_cache,
                         const torch::Tensor& v_cache, int64_t column, int64_t keys,
                         const c10::optional<torch::Tensor>& mask, int64_t n_heads, int64_t n_kv_heads,
                         double scale, int64_t qk_norm, int64_t qk_norm_kind,
                         const c10::optional<torch::Tensor>& q_weight, const c10::optional<torch::Tensor>& k_weight,
                         double eps) {
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "attend_one: (B, Hkv, C, D) caches");
  const int64_t B = k_cache.size(0), Hkv = k_cache.size(1), C = k_cache.size(2), D = k_cache.size(3);
  const int64_t H = n_heads, group = H / Hkv, Q = H * D, KV = Hkv * D;
  TORCH_CHECK(Hkv == n_kv_heads && H % Hkv == 0 && D % 2 == 0, "attend_one: head counts do not fit the cache");
  TORCH_CHECK(qkv.numel() == B * (Q + 2 * KV), "attend_one: qkv must be (B, (H + 2 Hkv) D)");
  TORCH_CHECK(0 <= column && column < C && 1 <= keys && keys <= C, "attend_one: column or keys outside the cache");
  TORCH_CHECK(qkv.scalar_type() == k_cache.scalar_type(), "attend_one: qkv and cache dtypes differ");
  const Floats in(qkv), kc(k_cache), vc(v_cache);
  const bool bf16 = in.bf16;
  std::vector<float> cs, sn;  // (rope_rows, D) as floats
  int64_t rope_rows = 0;
  if (cos.has_value()) {
    TORCH_CHECK(sin.has_value() && cos->numel() == sin->numel() && (cos->numel() == D || cos->numel() == B * D),
                "attend_one: cos and sin must be (1 or B, D)");
    rope_rows = cos->numel() / D;
    cs.resize(rope_rows * D), sn.resize(rope_rows * D);
    Floats(*cos).load(0, rope_rows * D, cs.data()), Floats(*sin).load(0, rope_rows * D, sn.data());
  }
  const bool* mk = nullptr;
  int64_t mask_stride = 0;
  torch::Tensor mask_c;
  if (mask.has_value()) {
    mask_c = mask->contiguous();
    TORCH_CHECK(mask_c.scalar_type() == torch::kBool && (mask_c.numel() == keys || mask_c.numel() == B * keys),
                "attend_one: a bool mask of keys or B * keys entries");
    mk = mask_c.data_ptr<bool>(), mask_stride = mask_c.numel() == keys ? 0 : keys;
  }
  Norm qn, kn;
  if (qk_norm != 0) {
    qn = make_norm(qk_norm_kind, q_weight, c10::nullopt, eps, qk_norm == 1 ? D : Q);
    kn = make_norm(qk_norm_kind, k_weight, c10::nullopt, eps, qk_norm == 1 ? D : KV);
  }
  torch::Tensor y = torch::empty({B, Q}, qkv.options());
  const Floats out(y);
  std::vector<float> q(B * Q), row(Q + 2 * KV), tmp(std::max(Q, KV));

  // 1. q, k: QK-norm and rotary; k and v into the cache (column `column` of row b).
  for (int64_t b = 0; b < B; ++b) {
    in.load(b * (Q + 2 * KV), Q + 2 * KV, row.data());
    float *qb = row.data(), *kb = row.data() + Q, *vb = row.data() + Q + KV;
    if (qk_norm == 2) {
      norm_row(qb, tmp.data(), Q, qn, bf16), std::copy(tmp.begin(), tmp.begin() + Q, qb);
      norm_row(kb, tmp.data(), KV, kn, bf16), std::copy(tmp.begin(), tmp.begin() + KV, kb);
    }
    for (int64_t h = 0; h < H + Hkv; ++h) {  // the H query heads, then the Hkv key heads
      float* x = h < H ? qb + h * D : kb + (h - H) * D;
      if (qk_norm == 1) norm_row(x, tmp.data(), D, h < H ? qn : kn, bf16), std::copy(tmp.begin(), tmp.begin() + D, x);
      if (rope_rows) {
        const int64_t r = rope_rows == 1 ? 0 : b;
        rope_head(x, cs.data() + r * D, sn.data() + r * D, D, bf16);
      }
    }
    std::copy(qb, qb + Q, q.data() + b * Q);
    for (int64_t g = 0; g < Hkv; ++g) {
      const int64_t at = ((b * Hkv + g) * C + column) * D;
      kc.store(at, D, kb + g * D), vc.store(at, D, vb + g * D);
    }
  }

  // 2. Each (row, kv head): its `group` queries against the keys, softmax, values (fp32).
  const float s = scale > 0 ? float(scale) : 1.f / std::sqrt(float(D));
  const int64_t work = B * Hkv, cost = group * keys * D * 2;
  // Threads only for enough work (ATTEND_PARALLEL multiply-adds, key_splits).
  const int64_t grain = std::max<int64_t>(1, ATTEND_PARALLEL / std::max<int64_t>(1, cost));
  const bool fast = D % 16 == 0 && D <= 256 && group <= 8;  // attend_group's registers
#ifdef __AVX512F__
  if (const int64_t splits = fast ? key_splits(work, keys, work * cost) : 1; splits > 1) {
    attend_split(q.data(), kc, vc, mk, mask_stride, out, B, Hkv, C, D, group, keys, splits, s);
    return y;
  }
#endif
  at::parallel_for(0, work, grain, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> scores, total, acc, row_f;  // total: 1 / sum
    scores.resize(group * keys), total.resize(group), acc.resize(group * D), row_f.resize(D);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / Hkv, g = w % Hkv;
      const int64_t base = (b * Hkv + g) * C * D;
      const float* qg = q.data() + b * Q + g * group * D;  // the group's queries, side by side
      const bool* mb = mk ? mk + b * mask_stride : nullptr;
#ifdef __AVX512F__
      if (fast) {
        if (bf16) attend_group_of<true>(group, qg, kc.p, vc.p, base, keys, D, s, mb, scores.data(), total.data(), acc.data(), nullptr);
        else attend_group_of<false>(group, qg, kc.p, vc.p, base, keys, D, s, mb, scores.data(), total.data(), acc.data(), nullptr);
        out.store(b * Q + g * group * D, group * D, acc.data());
        continue;
      }
#endif
      auto row_of = [&](const Floats& cache, int64_t t) -> const float* {  // key or value t as floats
        if (!cache.bf16) return static_cast<const float*>(cache.p) + base + t * D;
        cache.load(base + t * D, D, row_f.data());
        return row_f.data();
      };
      // scores (group, keys): each key row is read once for the group's queries
      for (int64_t t = 0; t < keys; ++t) {
        const bool masked = mb && !mb[t];
        const float* kr = masked ? nullptr : row_of(kc, t);
        for (int64_t j = 0; j < group; ++j)
          scores[j * keys + t] = masked ? -std::numeric_limits<float>::infinity() : dot(qg + j * D, kr, D) * s;
      }
      softmax_rows(scores.data(), total.data(), group, keys);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < keys; ++t) {
        if (mb && !mb[t]) continue;
        const float* vr = row_of(vc, t);
        for (int64_t j = 0; j < group; ++j) {
          const float p = scores[j * keys + t] * total[j];
          axpy(p, vr, acc.data() + j * D, D);
        }
      }
      out.store(b * Q + g * group * D, group * D, acc.data());
    }
  });
  return y;
}

// act(a) * b (b given: a gated MLP, SwiGLU / GeGLU) or act(a), in a's dtype; act 0 silu, 1 the
// tanh-approximated gelu, 2 relu. The activation is rounded before the product, as model.py's two ops.
torch::Tensor activation(const torch::Tensor& a, const c10::optional<torch::Tensor>& b, int64_t act) {
  const Floats as(a);
  torch::Tensor y = torch::empty_like(a);
  const Floats ys(y);
  Floats bs;
  if (b.has_value()) {
    TORCH_CHECK(b->sizes() == a.sizes() && b->scalar_type() == a.scalar_type(), "activation: gate and up must match");
    bs = Floats(*b);
  }
  const float k0 = 0.7978845608028654f;  // sqrt(2 / pi)
  const int64_t n = a.numel();
  const bool bf16 = as.bf16;
  thread_local std::vector<float> fa, fb;
  fa.resize(n), fb.resize(n);
  as.load(0, n, fa.data());
  float *va = fa.data(), *vb = fb.data();
  int64_t i0 = 0;
#ifdef __AVX512F__
  const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.f);
  for (; i0 + 16 <= n; i0 += 16) {
    const __m512 x = _mm512_loadu_ps(va + i0);
    __m512 v;
    if (act == SILU) {
      v = _mm512_div_ps(x, _mm512_add_ps(one, exp_approx16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
    } else if (act == GELU_TANH) {
      const __m512 inner = _mm512_mul_ps(_mm512_set1_ps(k0), _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), x),
                                                                           _mm512_mul_ps(x, x), x));
      const __m512 t = _mm512_sub_ps(_mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(one, exp_approx16(
                                         _mm512_mul_ps(_mm512_set1_ps(-2.f), inner)))), one);  // tanh
      v = _mm512_mul_ps(_mm512_mul_ps(half, x), _mm512_add_ps(one, t));
    } else {
      v = _mm512_max_ps(x, _mm512_setzero_ps());
    }
    _mm512_storeu_ps(va + i0, bf16 ? round_bf16_16(v) : v);
  }
#endif
  for (int64_t i = i0; i < n; ++i) {
    const float x = va[i];
    float v;
    if (act == SILU) v = x / (1.f + exp_approx(-x));
    else if (act == GELU_TANH) v = 0.5f * x * (1.f + (2.f / (1.f + exp_approx(-2.f * k0 * (x + 0.044715f * x * x * x))) - 1.f));
    else v = x > 0.f ? x : 0.f;
    va[i] = rounded(v, bf16);
  }
  if (b.has_value()) {
    bs.load(0, n, vb);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) va[i] *= vb[i];
  }
  ys.store(0, n, va);
  return y;
}

}  // namespace

// gemv.cpp's kernels
torch::Tensor gemv_linear(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& scale);
torch::Tensor gemv_linear_transposed(const torch::Tensor& x, const torch::Tensor& w_t,
                                     const c10::optional<torch::Tensor>& bias);
torch::Tensor gemv_linear_int4(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                               const torch::Tensor& offset, int64_t G);

namespace {

// ---- one block's whole one-token step, in one call -------------------------------------------
// decode_block.py's DecodeBlock step is 5 weight matrices and 5 of the ops above; from Python,
// each call costs its argument parsing and the Python around it (~40 us a layer, ~1.2 ms of a
// SmolLM2-135M step). FusedBlock holds the block's tensors (references, not copies: the
// model's own buffers) and runs the same calls in the same order from C++.

// One decode layer of decode_weights.py, as its decode_spec() describes it:
//   (kind, a, b, c, bias, group_size, cast) with kind 0 gemv (a the bf16 / fp32 / int8 weight,
//   b the int8 layer's fp32 scales), 1 int4 (a, b, c: q, scales, offsets), 2 fp32 transposed
//   (a the (in, out) weight, as TransposedLinear: MKL's GEMV at one row, gemv.cpp's
//   linear_transposed at 2-8); cast 1 / 2: x to bf16 / fp32 first.
constexpr int64_t TRANSPOSED_ROWS = 8;  // cpu_gemv.TRANSPOSED_ROWS
struct Projection {
  int64_t kind = -1;
  torch::Tensor a;
  c10::optional<torch::Tensor> b, c, bias;
  int64_t group = 0, cast = 0;

  torch::Tensor operator()(const torch::Tensor& x) const {  // x (B, in) -> (B, out)
    torch::Tensor x2 = x;
    if (cast == 1 && x2.scalar_type() != torch::kBFloat16) x2 = x2.to(torch::kBFloat16);
    if (cast == 2 && x2.scalar_type() != torch::kFloat32) x2 = x2.to(torch::kFloat32);
    torch::Tensor y;
    if (kind == 0) y = gemv_linear(x2, a, b);
    else if (kind == 1) y = gemv_linear_int4(x2, a, *b, *c, group);
    else if (x2.size(0) >= 2 && x2.size(0) <= TRANSPOSED_ROWS && a.size(1) % 16 == 0 &&
             a.scalar_type() == torch::kFloat32 && x2.scalar_type() == torch::kFloat32)
      return gemv_linear_transposed(x2, a, bias);  // 2-8 rows: our kernel on the (in, out) layout
    else return bias.has_value() ? at::addmm(*bias, x2, a) : at::mm(x2, a);  // 1 row: MKL's GEMV
    return bias.has_value() ? y + *bias : y;
  }
};

using ProjectionSpec = std::tuple<int64_t, c10::optional<torch::Tensor>, c10::optional<torch::Tensor>,
                                  c10::optional<torch::Tensor>, c10::optional<torch::Tensor>, int64_t, int64_t>;
using NormSpec = std::tuple<int64_t, c10::optional<torch::Tensor>, c10::optional<torch::Tensor>>;  // kind, weight, bias

Projection projection(const ProjectionSpec& p) {
  Projection out;
  out.kind = std::get<0>(p);
  if (out.kind < 0) return out;  // absent (the gate of an ungated MLP)
  TORCH_CHECK(out.kind <= 2 && std::get<1>(p).has_value(), "FusedBlock: a projection of kind 0, 1 or 2");
  out.a = *std::get<1>(p), out.b = std::get<2>(p), out.c = std::get<3>(p), out.bias = std::get<4>(p);
  out.group = std::get<5>(p), out.cast = std::get<6>(p);
  TORCH_CHECK(out.kind != 1 || (out.b.has_value() && out.c.has_value()), "FusedBlock: int4 needs scales and offsets");
  return out;
}

class FusedBlock {
 public:
  // norms: attn_norm, attn_post_norm, mlp_norm, mlp_post_norm, q_norm, k_norm (kind, weight, bias);
  // projections: qkv_proj, out_proj, gate_proj (kind -1 without a gate), up_proj, down_proj;
  // attention: n_heads, n_kv_heads, scale (0: 1 / sqrt(head_dim)), qk_norm, qk_norm_kind;
  // activation as decode_ops' activation, eps of every norm.
  FusedBlock(std::vector<NormSpec> norms, std::vector<ProjectionSpec> projections, int64_t n_heads,
             int64_t n_kv_heads, double scale, int64_t qk_norm, int64_t qk_norm_kind, int64_t act, double eps)
      : norms_(std::move(norms)), n_heads_(n_heads), n_kv_heads_(n_kv_heads), scale_(scale), qk_norm_(qk_norm),
        qk_norm_kind_(qk_norm_kind), act_(act), eps_(eps) {
    TORCH_CHECK(norms_.size() == 6 && projections.size() == 5, "FusedBlock: 6 norms and 5 projections");
    for (const auto& p : projections) projections_.push_back(projection(p));
  }

  // x (B, 1, d): the block's one-token step, as DecodeBlock.forward's fused path. Or x (1, T, d):
  // T tokens of one sequence (a speculative round's verify pass), their keys and values going to
  // columns column .. column + T - 1 and token t reading keys [0, keys + t): causal, with each
  // token's attention a call of its own (a few us) and every matrix read once for all T rows.
  torch::Tensor step(const torch::Tensor& x, const c10::optional<torch::Tensor>& cos,
                     const c10::optional<torch::Tensor>& sin, const torch::Tensor& k_cache,
                     const torch::Tensor& v_cache, int64_t column, int64_t keys,
                     const c10::optional<torch::Tensor>& mask) const {
    const int64_t T = x.size(1), B = x.size(0) * T;  // B: rows of the matrices
    TORCH_CHECK(T == 1 || (x.size(0) == 1 && !mask.has_value()), "FusedBlock: T tokens of one row, no mask");
    const NormSpec none{NONE, c10::nullopt, c10::nullopt};
    // [x + post(delta), pre(x + post(delta))], as residual_norm
    auto land = [&](const torch::Tensor& x, const c10::optional<torch::Tensor>& delta, const NormSpec& post,
                    const NormSpec& pre) {
      return residual_norm(x, delta, std::get<0>(post), std::get<1>(post), std::get<2>(post), std::get<0>(pre),
                           std::get<1>(pre), std::get<2>(pre), eps_);
    };
    const Projection &qkv_proj = projections_[0], &out_proj = projections_[1], &gate_proj = projections_[2],
                     &up_proj = projections_[3], &down_proj = projections_[4];
    const torch::Tensor h = land(x, c10::nullopt, none, norms_[0])[1].view({B, -1});  // attn_norm(x)
    const auto attend = [&](const torch::Tensor& qkv, const c10::optional<torch::Tensor>& c,
                            const c10::optional<torch::Tensor>& s, int64_t col, int64_t n_keys) {
      return attend_one(qkv, c, s, k_cache, v_cache, col, n_keys, mask, n_heads_, n_kv_heads_, scale_, qk_norm_,
                        qk_norm_kind_, std::get<1>(norms_[4]), std::get<1>(norms_[5]), eps_);
    };
    torch::Tensor y;  // (B, n_heads * head_dim)
    if (T == 1) {
      y = attend(qkv_proj(h), cos, sin, column, keys);
    } else {
      const torch::Tensor qkv = qkv_proj(h);  // (T, (H + 2 Hkv) D)
      c10::optional<torch::Tensor> c, s;
      if (cos.has_value()) c = cos->reshape({T, -1}).contiguous(), s = sin->reshape({T, -1}).contiguous();
      std::vector<torch::Tensor> ys;
      for (int64_t t = 0; t < T; ++t)
        ys.push_back(attend(qkv.narrow(0, t, 1), c ? c10::optional<torch::Tensor>(c->narrow(0, t, 1)) : c10::nullopt,
                            s ? c10::optional<torch::Tensor>(s->narrow(0, t, 1)) : c10::nullopt, column + t, keys + t));
      y = at::cat(ys, 0);
    }
    const auto xh = land(x, out_proj(y).view(x.sizes()), norms_[1], norms_[2]);  // x, mlp_norm(x)
    const torch::Tensor h2 = xh[1].view({B, -1});
    const torch::Tensor a = gate_proj.kind >= 0 ? activation(gate_proj(h2), up_proj(h2), act_)
                                                : activation(up_proj(h2), c10::nullopt, act_);
    return land(xh[0], down_proj(a).view(x.sizes()), norms_[3], none)[0];
  }

 private:
  std::vector<NormSpec> norms_;
  std::vector<Projection> projections_;
  int64_t n_heads_, n_kv_heads_;
  double scale_;
  int64_t qk_norm_, qk_norm_kind_, act_;
  double eps_;
};

// decode_block.DecodeBlocks' one-token step: x (B, 1, d) through every block's FusedBlock::step
// in turn, from one call. From Python each block's call and the Python around it (the checks,
// nn.Module's call) cost ~50 us a layer, ~2 ms of a smollm2-135m step, as much as its norms,
// attention and activations together. Layer i uses the sliding-window rope and mask where
// local[i]; its cache column and key count follow from `start` (cache.length) and its buffer's
// columns, as DecodeBlock.forward computes them (a ring buffer: position mod columns).
torch::Tensor run_blocks(const std::vector<const FusedBlock*>& blocks, torch::Tensor x, const std::vector<bool>& local,
                         const c10::optional<torch::Tensor>& cos, const c10::optional<torch::Tensor>& sin,
                         const c10::optional<torch::Tensor>& cos_local, const c10::optional<torch::Tensor>& sin_local,
                         const c10::optional<torch::Tensor>& mask, const c10::optional<torch::Tensor>& local_mask,
                         const std::vector<torch::Tensor>& k_caches, const std::vector<torch::Tensor>& v_caches,
                         int64_t start) {
  const size_t n = blocks.size();
  TORCH_CHECK(local.size() == n && k_caches.size() == n && v_caches.size() == n,
              "run_blocks: one local flag and one key and value cache per block");
  const int64_t T = x.size(1);  // > 1: tokens of one row, none past the end of a buffer (DecodeBlocks checks)
  for (size_t i = 0; i < n; ++i) {
    const int64_t columns = k_caches[i].size(2);
    TORCH_CHECK(T == 1 || start + T <= columns, "run_blocks: T tokens past the end of a cache buffer");
    const int64_t column = start < columns ? start : start % columns, keys = start < columns ? start + 1 : columns;
    x = local[i] ? blocks[i]->step(x, cos_local, sin_local, k_caches[i], v_caches[i], column, keys, local_mask)
                 : blocks[i]->step(x, cos, sin, k_caches[i], v_caches[i], column, keys, mask);
  }
  return x;
}

}  // namespace

void register_decode_ops(pybind11::module& m) {
  m.def("residual_norm", &residual_norm, "[x + post(delta), pre(x + post(delta))]: a residual add and the next norm");
  m.def("attend_one", &attend_one, "one query per row: QK-norm, rotary, cache write, attention over the cache");
  m.def("activation", &activation, "act(a) * b or act(a): silu, tanh gelu, relu");
  pybind11::class_<FusedBlock>(m, "FusedBlock", "a block's one-token step in one call (decode_block.py)")
      .def(pybind11::init<std::vector<NormSpec>, std::vector<ProjectionSpec>, int64_t, int64_t, double, int64_t,
                          int64_t, int64_t, double>())
      .def("step", &FusedBlock::step, "x (B, 1, d) -> the block's output, the new key and value cached");
  m.def("run_blocks", &run_blocks, "x through every block's one-token step, in one call (decode_block.DecodeBlocks)");
}
