// The small operations around a block's matrices, each forward and backward in one pass over
// memory: RMSNorm, the rotary embedding and the SwiGLU gate. fused_ops.py wraps them in
// autograd Functions; model.py, norms.py and positions.py call those on the CPU in float32.
//
// Why: written as PyTorch ops an RMSNorm is six ops forward and seven backward, a rotation
// five and three, the gate two and four (with a cat), each a pass over its tensor plus its
// dispatch and thread wake-up. At the sizes a small model trains at on a CPU (a few thousand
// rows of 128-1024 numbers) those costs are most of a step beside the matmuls
// (benchmarks/posttrain.py). Here each is one loop over rows, split across PyTorch's threads.
//
// Numbers: fp32 throughout. The rotation is bit for bit PyTorch's (the same products and
// sums, no fused multiply-add: -ffp-contract=off); the norm's mean of squares and the gate's
// exp round differently from PyTorch's vectorized kernels, within float32 rounding
// (tests/test_fused_ops.py compares them).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// Rows per task of at::parallel_for: ~16k numbers, so small tensors stay on one thread (a
// wake-up costs more than they do) and large ones split evenly.
int64_t grain(int64_t row_length) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_length, 1)); }

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
}

// ---- RMSNorm ------------------------------------------------------------------------------
// x (R, D) contiguous, weight (D,) -> y = x * r * weight and r = 1 / sqrt(mean(x^2) + eps) (R,).
std::vector<at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_float(x, "x");
  check_float(weight, "weight");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "rms_norm_forward: contiguous tensors");
  const int64_t D = x.size(-1), R = x.numel() / std::max<int64_t>(D, 1);
  TORCH_CHECK(weight.numel() == D, "rms_norm_forward: weight has ", weight.numel(), " numbers, rows ", D);
  auto y = at::empty_like(x);
  auto rstd = at::empty({R}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  const float epsf = float(eps);
  at::parallel_for(0, R, grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * D;
      float* yr = yp + r * D;
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < D; ++i) squares += xr[i] * xr[i];
      const float inv = 1.f / std::sqrt(squares / float(D) + epsf);
      rp[r] = inv;
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) yr[i] = (xr[i] * inv) * wp[i];
    }
  });
  return {y, rstd};
}

// sum over i of (g_i w_i) (x_i r). Its own function: inlined in the loop below, GCC vectorizes
// it with gathers, 10x slower (measured).
__attribute__((noinline)) float gw_dot_xhat(const float* g, const float* w, const float* x, float r, int64_t D) {
  float dot = 0.f;
#pragma omp simd reduction(+ : dot)
  for (int64_t i = 0; i < D; ++i) dot += (g[i] * w[i]) * (x[i] * r);
  return dot;
}

// The gradient in closed form, with xhat = x * r and gw = g * weight:
//   dx = r * (gw - xhat * mean(gw * xhat)),   dweight = sum over rows of g * xhat.
// dweight is summed per block of rows, then over the blocks: the same blocks whatever the
// thread count, so the same numbers on every run.
std::vector<at::Tensor> rms_norm_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight,
                                          const at::Tensor& rstd, bool weight_grad) {
  check_float(g, "g");
  TORCH_CHECK(g.is_contiguous() && x.is_contiguous() && g.sizes() == x.sizes(), "rms_norm_backward: shapes");
  const int64_t D = x.size(-1), R = x.numel() / std::max<int64_t>(D, 1);
  const int64_t block = grain(D), blocks = (R + block - 1) / block;
  auto dx = at::empty_like(x);
  auto partial = weight_grad ? at::zeros({blocks, D}, x.options()) : at::Tensor();
  const float *gp = g.data_ptr<float>(), *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>(),
              *rp = rstd.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  float* pp = weight_grad ? partial.data_ptr<float>() : nullptr;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      float* acc = pp ? pp + b * D : nullptr;
      for (int64_t r = b * block; r < std::min(R, (b + 1) * block); ++r) {
        const float *gr = gp + r * D, *xr = xp + r * D;
        float* dr = dxp + r * D;
        const float inv = rp[r];
        const float mean = gw_dot_xhat(gr, wp, xr, inv, D) / float(D);
#pragma omp simd
        for (int64_t i = 0; i < D; ++i) {
          const float xhat = xr[i] * inv;
          dr[i] = (gr[i] * wp[i] - xhat * mean) * inv;
        }
        if (acc) {
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) acc[i] += gr[i] * (xr[i] * inv);
        }
      }
    }
  });
  return {dx, weight_grad ? partial.sum(0) : at::Tensor()};
}

// ---- Rotary embedding ---------------------------------------------------------------------
// x (B, H, T, D) with any strides but the last (a transposed view of the q/k projection),
// cos and sin broadcast to it (B or 1, 1, T, D) with any strides but the last. The halves
// x1 = x[..., :D/2], x2 = x[..., D/2:] turn by the angle (sign +1) or back by it (sign -1,
// the backward: the rotation's transpose). Returns y (B, H, T, D) contiguous.
at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t sign) {
  check_float(x, "x");
  check_float(cos, "cos");
  check_float(sin, "sin");
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 4 && sin.dim() == 4, "rotate: 4-d tensors");
  TORCH_CHECK(x.stride(3) == 1 && cos.stride(3) == 1 && sin.stride(3) == 1, "rotate: contiguous last dimension");
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), h = D / 2;
  TORCH_CHECK(D % 2 == 0 && cos.size(3) == D && sin.size(3) == D, "rotate: head_dim even and the tables' width");
  TORCH_CHECK(cos.size(2) == T && sin.size(2) == T && (cos.size(0) == B || cos.size(0) == 1) &&
                  (sin.size(0) == B || sin.size(0) == 1) && cos.size(1) == 1 && sin.size(1) == 1,
              "rotate: tables (B or 1, 1, T, D)");
  auto y = at::empty({B, H, T, D}, x.options());
  const float *xp = x.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t xb = x.stride(0), xh = x.stride(1), xt = x.stride(2);
  const int64_t cb = cos.size(0) == 1 ? 0 : cos.stride(0), ct = cos.stride(2);
  const int64_t sb = sin.size(0) == 1 ? 0 : sin.stride(0), st = sin.stride(2);
  at::parallel_for(0, B * H * T, grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = row % T, bh = row / T, hh = bh % H, b = bh / H;
      const float* xr = xp + b * xb + hh * xh + t * xt;
      const float* c = cp + b * cb + t * ct;
      const float* s = sp + b * sb + t * st;
      float* yr = yp + row * D;
      if (sign > 0) {  // y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2
#pragma omp simd
        for (int64_t i = 0; i < h; ++i) {
          const float x1 = xr[i], x2 = xr[i + h];
          yr[i] = x1 * c[i] - x2 * s[i];
          yr[i + h] = x2 * c[i + h] + x1 * s[i + h];
        }
      } else {  // the transpose: dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1
#pragma omp simd
        for (int64_t i = 0; i < h; ++i) {
          const float x1 = xr[i], x2 = xr[i + h];
          yr[i] = x1 * c[i] + x2 * s[i + h];
          yr[i + h] = x2 * c[i + h] - x1 * s[i];
        }
      }
    }
  });
  return y;
}

// exp(x) as straight-line arithmetic the compiler vectorizes (libm's expf is a call per
// number): x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor series to r^6 (relative
// error ~1e-7, float32's rounding), 2^n built in the exponent bits. x is clamped to where
// 2^n stays a normal float: exp(-87.3) ~ 1e-38, exp(88) ~ 1.7e38.
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.3f), 88.f);
  const float n = std::nearbyint(x * 1.44269504f);
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // ln2 in two parts
  const float p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720))))));
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

// ---- SwiGLU -------------------------------------------------------------------------------
// gate, up (R, F), each row contiguous, any row stride: two matmuls' outputs, or the halves
// of the stacked one's (R, 2F) -> h = silu(gate) * up (R, F).
at::Tensor swiglu_forward(const at::Tensor& gate, const at::Tensor& up) {
  check_float(gate, "gate");
  check_float(up, "up");
  TORCH_CHECK(gate.dim() == 2 && gate.sizes() == up.sizes() && gate.stride(1) == 1 && up.stride(1) == 1,
              "swiglu_forward: gate and up (R, F), rows contiguous");
  const int64_t R = gate.size(0), F = gate.size(1), gs = gate.stride(0), us = up.stride(0);
  auto h = at::empty({R, F}, gate.options());
  const float *gp = gate.data_ptr<float>(), *upp = up.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  at::parallel_for(0, R, grain(2 * F), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float *gr = gp + r * gs, *ur = upp + r * us;
      float* hr = hp + r * F;
#pragma omp simd
      for (int64_t i = 0; i < F; ++i) {
        const float a = gr[i];
        hr[i] = a / (1.f + exp_approx(-a)) * ur[i];
      }
    }
  });
  return h;
}

// d gate = g * up * silu'(gate), silu'(a) = s (1 + a (1 - s)) with s = sigmoid(a);
// d up = g * silu(gate): written side by side, the gradient of the stacked matmul's output.
at::Tensor swiglu_backward(const at::Tensor& g, const at::Tensor& gate_up) {
  check_float(g, "g");
  TORCH_CHECK(g.is_contiguous() && gate_up.is_contiguous(), "swiglu_backward: contiguous tensors");
  const int64_t F2 = gate_up.size(-1), F = F2 / 2, R = gate_up.numel() / std::max<int64_t>(F2, 1);
  TORCH_CHECK(g.numel() == R * F, "swiglu_backward: g has ", g.numel(), " numbers, expected ", R * F);
  auto d = at::empty_like(gate_up);
  const float *gp = g.data_ptr<float>(), *ip = gate_up.data_ptr<float>();
  float* dp = d.data_ptr<float>();
  at::parallel_for(0, R, grain(F2), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float *gate = ip + r * F2, *up = gate + F, *gr = gp + r * F;
      float *dgate = dp + r * F2, *dup = dgate + F;
#pragma omp simd
      for (int64_t i = 0; i < F; ++i) {
        const float a = gate[i], s = 1.f / (1.f + exp_approx(-a));
        dgate[i] = gr[i] * up[i] * (s * (1.f + a * (1.f - s)));
        dup[i] = gr[i] * (a * s);
      }
    }
  });
  return d;
}


// ---- Attention ------------------------------------------------------------------------------
// softmax(scale q k^T + mask) v for the short rows a small model trains on (up to a few hundred
// keys): a row's scores whole (no online softmax), four query rows at a time against sixteen
// keys at a time, each block of products in registers; the grouped query heads of a key/value
// head read its keys once. PyTorch's CPU flash kernel at these sizes spends most of its time
// setting up blocks (benchmarks/fused_ops.py measures both).
//
// q (B, H, T, D), k and v (B, Hkv, S, D), any strides with the last dimension contiguous, D a
// multiple of 16; mask: an additive float (B, T, S) (any strides, keys contiguous; 0 or -inf),
// or none, with causal (query i at position S - T + i sees the keys up to it) or not.
// Out (B, T, H, D) contiguous (the layout the output projection reads), lse (B, H, T): the
// log of each row's softmax denominator, kept for the backward.
constexpr int RB = 4, KB = 16;  // query rows x keys (or features) per block of products

// Row (b, h, t) of a (B, heads, T, D) view, or of the unpadded (n, heads, D) through the map
// ``source`` (B * T,): each position's token, n or more at the padding (a null row).
struct Rows {
  const float* p;
  int64_t sb = 0, sh = 0, st = 0, T = 0, n = 0;
  const int64_t* map = nullptr;
  Rows(const at::Tensor& t, const int64_t* source, int64_t T_) : p(t.data_ptr<float>()), T(T_), map(source) {
    if (map) {
      n = t.size(0);
      st = t.stride(0);
      sh = t.stride(1);
    } else {
      sb = t.stride(0);
      sh = t.stride(1);
      st = t.stride(2);
    }
  }
  const float* row(int64_t b, int64_t h, int64_t t) const {
    if (!map) return p + b * sb + h * sh + t * st;
    const int64_t m = map[b * T + t];
    return m < n ? p + m * st + h * sh : nullptr;
  }
};

// The token of position (b, t) in an output laid out (tokens, heads, D): b * T + t, or the map's.
inline int64_t token_of(const int64_t* map, int64_t b, int64_t t, int64_t T) { return map ? map[b * T + t] : b * T + t; }

int64_t round_up(int64_t n) { return (n + KB - 1) / KB * KB; }

// A key head's S rows (zeros for a null row), as kT (D, Sp) transposed with zeros in the
// columns S .. Sp, and as rows (S, D); either may be nullptr.
void load_head(const Rows& x, int64_t b, int64_t h, int64_t S, int64_t Sp, int64_t D, float* kT, float* rows) {
  if (kT) {
    for (int64_t d = 0; d < D; ++d)
      for (int64_t j = S; j < Sp; ++j) kT[d * Sp + j] = 0.f;
  }
  for (int64_t j = 0; j < S; ++j) {
    const float* r = x.row(b, h, j);
    if (kT) {
      for (int64_t d = 0; d < D; ++d) kT[d * Sp + j] = r ? r[d] : 0.f;
    }
    if (rows) {
      for (int64_t d = 0; d < D; ++d) rows[j * D + d] = r ? r[d] : 0.f;
    }
  }
}

// s[r][j0 .. j0 + W) = a_r . columns j0 .. j0 + W of bT (D, Sp), for four rows a_r: the
// RB x W products in registers.
template <int W>
inline void dot_block(const float* const a[RB], const float* bT, int64_t Sp, int64_t j0, int64_t D, float* s) {
  float acc[RB][W] = {};
  for (int64_t d = 0; d < D; ++d) {
    const float* col = bT + d * Sp + j0;
    for (int r = 0; r < RB; ++r) {
      const float x = a[r][d];
#pragma omp simd
      for (int l = 0; l < W; ++l) acc[r][l] = std::fma(x, col[l], acc[r][l]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int l = 0; l < W; ++l) s[r * Sp + j0 + l] = acc[r][l];
}

// s[r][j] = a_r . column j of bT (D, Sp), for four rows a_r and the columns j < n16 (a
// multiple of 16). s is (RB, Sp). Thirty-two columns at a time where they fit: eight
// independent sums in registers, enough to hide a multiply-add's latency.
inline void rows_dot_columns(const float* const a[RB], const float* bT, int64_t Sp, int64_t n16, int64_t D,
                             float* s) {
  int64_t j0 = 0;
  for (; j0 + 2 * KB <= n16; j0 += 2 * KB) dot_block<2 * KB>(a, bT, Sp, j0, D, s);
  for (; j0 < n16; j0 += KB) dot_block<KB>(a, bT, Sp, j0, D, s);
}

// out_r[d0 .. d0 + W) = sum_{j < n} w[r][j] x_j[d0 .. d0 + W), in registers.
template <int W>
inline void weighted_block(const float* w, int64_t Sp, int64_t n, const float* x0, int64_t stride, int64_t d0,
                           float* const out[RB]) {
  float acc[RB][W] = {};
  for (int64_t j = 0; j < n; ++j) {
    const float* x = x0 + j * stride + d0;
    for (int r = 0; r < RB; ++r) {
      const float wj = w[r * Sp + j];
#pragma omp simd
      for (int l = 0; l < W; ++l) acc[r][l] = std::fma(wj, x[l], acc[r][l]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int l = 0; l < W; ++l) out[r][d0 + l] = acc[r][l];
}

// out_r = sum_{j < n} w[r][j] x_j for four weight rows w (RB, Sp) and rows x_j = x0 + j * stride (D);
// thirty-two features at a time where they fit, as above.
inline void weighted_rows(const float* w, int64_t Sp, int64_t n, const float* x0, int64_t stride, int64_t D,
                          float* const out[RB]) {
  int64_t d0 = 0;
  for (; d0 + 2 * KB <= D; d0 += 2 * KB) weighted_block<2 * KB>(w, Sp, n, x0, stride, d0, out);
  for (; d0 < D; d0 += KB) weighted_block<KB>(w, Sp, n, x0, stride, d0, out);
}

// y_j += sum_r w[r][j] a_r for the rows y_j = y0 + j * stride (D), j < n: the transposed
// product. The four rows' terms as two sums of two (shorter chains of multiply-adds).
inline void add_weighted_sums(const float* w, int64_t Sp, int64_t n, const float* const a[RB], float* y0,
                              int64_t stride, int64_t D) {
  const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3];
  for (int64_t j = 0; j < n; ++j) {
    float* y = y0 + j * stride;
    const float w0 = w[j], w1 = w[Sp + j], w2 = w[2 * Sp + j], w3 = w[3 * Sp + j];
#pragma omp simd
    for (int64_t l = 0; l < D; ++l)
      y[l] += std::fma(w0, a0[l], w1 * a1[l]) + std::fma(w2, a2[l], w3 * a3[l]);
  }
}

// The largest of x[0, n), n a multiple of 16: sixteen running maxima (a float max does not
// vectorize on its own, NaN being kept).
inline float row_max(const float* x, int64_t n) {
  float m[KB];
  for (int l = 0; l < KB; ++l) m[l] = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; j += KB) {
#pragma omp simd
    for (int l = 0; l < KB; ++l) m[l] = x[j + l] > m[l] ? x[j + l] : m[l];
  }
  float top = m[0];
  for (int l = 1; l < KB; ++l) top = m[l] > top ? m[l] : top;
  return top;
}

// p <- exp(s - lse) from the scores s (0 where s is -inf), and ds <- p (dp - Di) scale from
// dp = dO . v: one row of the backward. Its own function: inlined, GCC would not vectorize it.
__attribute__((noinline)) void probabilities_and_their_gradient(float* p, float* ds, int64_t n, float lse,
                                                                float Di, float scale) {
  const float inf = std::numeric_limits<float>::infinity();
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float x = p[j], e = x == -inf ? 0.f : exp_approx(x - lse);
    p[j] = e;
    ds[j] = e * (ds[j] - Di) * scale;
  }
}

struct MaskRows {
  const float* p = nullptr;
  int64_t sb = 0, st = 0;
  bool causal = false;
  MaskRows(const c10::optional<at::Tensor>& mask, bool causal_, int64_t B, int64_t T, int64_t S) : causal(causal_) {
    if (mask.has_value()) {
      check_float(*mask, "mask");
      TORCH_CHECK(mask->dim() == 3 && mask->size(0) == B && mask->size(1) == T && mask->size(2) == S &&
                  mask->stride(2) == 1, "attention: mask (B, T, S), keys contiguous");
      p = mask->data_ptr<float>();
      sb = mask->stride(0);
      st = mask->stride(1);
    }
  }
  // The keys query i can see at all: all S, or up to its position when causal.
  int64_t keys(int64_t i, int64_t T, int64_t S) const { return causal ? std::min<int64_t>(S, S - T + i + 1) : S; }
};

// The scores of four query rows a[r] into s (RB, Sp): scale q . k + mask for the keys j < n[r]
// (n[r] = 0: a row past T or at the padding), -inf past them. Returns the widest row's key
// count rounded up to 16 (the columns of s that were written).
inline int64_t block_scores(const float* const a[RB], const int64_t n[RB], const float* kT, const MaskRows& m,
                            int64_t b, int64_t i0, int64_t Sp, int64_t D, float scale, float* s) {
  int64_t widest = 0;
  for (int r = 0; r < RB; ++r) widest = std::max(widest, n[r]);
  const int64_t n16 = round_up(widest);
  rows_dot_columns(a, kT, Sp, n16, D, s);
  const float inf = std::numeric_limits<float>::infinity();
  for (int r = 0; r < RB; ++r) {
    float* sr = s + r * Sp;
    const float* mr = m.p && n[r] ? m.p + b * m.sb + (i0 + r) * m.st : nullptr;
    const int64_t nr = n[r];
#pragma omp simd
    for (int64_t j = 0; j < nr; ++j) sr[j] = sr[j] * scale + (mr ? mr[j] : 0.f);
    for (int64_t j = nr; j < n16; ++j) sr[j] = -inf;
  }
  return n16;
}

// The four query rows of a block from i0: their row pointers (a zero row where there is none)
// and how many keys each sees.
inline void block_rows(const Rows& qh, const MaskRows& m, int64_t b, int64_t h, int64_t i0, int64_t T, int64_t S,
                       const float* zero, const float* a[RB], int64_t n[RB]) {
  for (int r = 0; r < RB; ++r) {
    const float* q = i0 + r < T ? qh.row(b, h, i0 + r) : nullptr;
    a[r] = q ? q : zero;
    n[r] = q ? m.keys(i0 + r, T, S) : 0;
  }
}

struct Shape {
  int64_t B, H, T, D, Hkv, S;
};

Shape attention_shape(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const c10::optional<at::Tensor>& source, int64_t B, int64_t T) {
  check_float(q, "q");
  check_float(k, "k");
  check_float(v, "v");
  const bool unpadded = source.has_value();
  const int64_t dims = unpadded ? 3 : 4;
  TORCH_CHECK(q.dim() == dims && k.dim() == dims && v.sizes() == k.sizes() && q.stride(-1) == 1 &&
              k.stride(-1) == 1 && v.stride(-1) == 1 && q.size(-1) % KB == 0 && k.size(-1) == q.size(-1),
              "attention: q (B, H, T, D), k and v (B, Hkv, S, D) (unpadded: (n, heads, D)), D contiguous, "
              "a multiple of 16");
  Shape sh;
  sh.D = q.size(-1);
  if (unpadded) {
    TORCH_CHECK(source->scalar_type() == at::kLong && source->is_contiguous() && source->numel() == B * T &&
                k.size(0) == q.size(0), "attention: source (B * T,) int64, q, k, v of the same tokens");
    sh.B = B, sh.T = T, sh.S = T, sh.H = q.size(1), sh.Hkv = k.size(1);
  } else {
    sh.B = q.size(0), sh.H = q.size(1), sh.T = q.size(2), sh.Hkv = k.size(1), sh.S = k.size(2);
    TORCH_CHECK(k.size(0) == sh.B, "attention: q and k of different batches");
  }
  TORCH_CHECK(sh.Hkv > 0 && sh.H % sh.Hkv == 0, "attention: query heads a multiple of key heads");
  return sh;
}

std::vector<at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const c10::optional<at::Tensor>& mask, bool causal, double scale,
                                          const c10::optional<at::Tensor>& source, int64_t batch, int64_t length) {
  const Shape sh = attention_shape(q, k, v, source, batch, length);
  const int64_t B = sh.B, H = sh.H, T = sh.T, D = sh.D, Hkv = sh.Hkv, S = sh.S, Sp = round_up(S), G = H / Hkv;
  const int64_t* map = source.has_value() ? source->data_ptr<int64_t>() : nullptr;
  const MaskRows m(mask, causal, B, T, S);
  // Out (tokens, H, D): (B * T, H, D) padded, (n, H, D) unpadded; lse (B, H, T).
  auto out = at::empty({map ? q.size(0) : B * T, H, D}, q.options());
  auto lse = at::empty({B, H, T}, q.options());
  const Rows qh(q, map, T), kh(k, map, T), vh(v, map, T);
  float *op = out.data_ptr<float>(), *lp = lse.data_ptr<float>();
  const float sc = float(scale), inf = std::numeric_limits<float>::infinity();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kT(D * Sp), vrows(S * D), s(RB * Sp), spare(RB * D), zero(D, 0.f);
    int64_t loaded = -1;  // the (b, kv head) whose keys and values the buffers hold
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, hk = h / G;
      if (loaded != b * Hkv + hk) {
        load_head(kh, b, hk, S, Sp, D, kT.data(), nullptr);
        load_head(vh, b, hk, S, Sp, D, nullptr, vrows.data());
        loaded = b * Hkv + hk;
      }
      for (int64_t i0 = 0; i0 < T; i0 += RB) {
        const float* a[RB];
        int64_t n[RB];
        block_rows(qh, m, b, h, i0, T, S, zero.data(), a, n);
        const int64_t n16 = block_scores(a, n, kT.data(), m, b, i0, Sp, D, sc, s.data());
        float inv[RB] = {0.f, 0.f, 0.f, 0.f};
        float* o[RB];
        for (int r = 0; r < RB; ++r) {
          float* sr = s.data() + r * Sp;
          const float top = n[r] ? row_max(sr, n16) : -inf;
          o[r] = spare.data() + r * D;
          if (i0 + r < T && n[r]) o[r] = op + (token_of(map, b, i0 + r, T) * H + h) * D;
          if (top == -inf) {  // past T, the padding, or a row that sees no key: no weights
            for (int64_t j = 0; j < n16; ++j) sr[j] = 0.f;
            if (i0 + r < T) lp[(b * H + h) * T + i0 + r] = -inf;
            continue;
          }
          float total = 0.f;
#pragma omp simd reduction(+ : total)
          for (int64_t j = 0; j < n16; ++j) {
            const float x = sr[j], e = x == -inf ? 0.f : exp_approx(x - top);
            sr[j] = e;
            total += e;
          }
          inv[r] = 1.f / total;
          lp[(b * H + h) * T + i0 + r] = top + std::log(total);
        }
        weighted_rows(s.data(), Sp, std::min(n16, S), vrows.data(), D, D, o);
        for (int r = 0; r < RB; ++r) {
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) o[r][d] *= inv[r];
        }
      }
    }
  });
  return {out, lse};
}

// The gradient, from the forward's out and lse: p = exp(s - lse), dP_j = dO . v_j,
// dS_j = p_j (dP_j - dO . out), dq = scale sum_j dS_j k_j, dk_j += scale dS_j q, dv_j += p_j dO.
// One task per (b, kv head): its query heads and rows in order, so the sums into dk and dv
// have one order on every run. g and out as the forward's out; dq (tokens, H, D), dk and dv
// (tokens, Hkv, D).
std::vector<at::Tensor> attention_backward(const at::Tensor& g, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                           const c10::optional<at::Tensor>& mask, bool causal, double scale,
                                           const c10::optional<at::Tensor>& source, int64_t batch, int64_t length) {
  const Shape sh = attention_shape(q, k, v, source, batch, length);
  const int64_t B = sh.B, H = sh.H, T = sh.T, D = sh.D, Hkv = sh.Hkv, S = sh.S, Sp = round_up(S), G = H / Hkv;
  const int64_t* map = source.has_value() ? source->data_ptr<int64_t>() : nullptr;
  TORCH_CHECK(g.sizes() == out.sizes() && g.stride(-1) == 1 && out.is_contiguous(),
              "attention_backward: g and out (tokens, H, D), the forward's layout");
  const MaskRows m(mask, causal, B, T, S);
  const int64_t tokens = map ? q.size(0) : B * T, key_tokens = map ? k.size(0) : B * S;
  auto dq = at::empty({tokens, H, D}, q.options());
  auto dk = at::empty({key_tokens, Hkv, D}, q.options());
  auto dv = at::empty({key_tokens, Hkv, D}, q.options());
  const Rows qh(q, map, T), kh(k, map, T), vh(v, map, T);
  const float *gp = g.data_ptr<float>(), *opp = out.data_ptr<float>(), *lp = lse.data_ptr<float>();
  const int64_t gs = g.stride(0), ghs = g.stride(1);
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  const float sc = float(scale), inf = std::numeric_limits<float>::infinity();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kT(D * Sp), vT(D * Sp), krows(S * D), dkrows(S * D), dvrows(S * D);
    std::vector<float> p(RB * Sp), dp(RB * Sp), spare(RB * D), zero(D, 0.f);
    for (int64_t bk = begin; bk < end; ++bk) {
      const int64_t b = bk / Hkv, hk = bk % Hkv;
      load_head(kh, b, hk, S, Sp, D, kT.data(), krows.data());
      load_head(vh, b, hk, S, Sp, D, vT.data(), nullptr);
      std::fill(dkrows.begin(), dkrows.end(), 0.f);
      std::fill(dvrows.begin(), dvrows.end(), 0.f);
      for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
        for (int64_t i0 = 0; i0 < T; i0 += RB) {
          const float *qa[RB], *ga[RB], *oa[RB];
          int64_t n[RB];
          block_rows(qh, m, b, h, i0, T, S, zero.data(), qa, n);
          float* dqa[RB];
          for (int r = 0; r < RB; ++r) {
            const bool real = n[r] > 0;
            const int64_t t = real ? token_of(map, b, i0 + r, T) : 0;
            ga[r] = real ? gp + t * gs + h * ghs : zero.data();
            oa[r] = real ? opp + (t * H + h) * D : zero.data();
            dqa[r] = real ? dqp + (t * H + h) * D : spare.data() + r * D;
          }
          const int64_t n16 = block_scores(qa, n, kT.data(), m, b, i0, Sp, D, sc, p.data());
          rows_dot_columns(ga, vT.data(), Sp, n16, D, dp.data());  // dP = dO v^T
          for (int r = 0; r < RB; ++r) {
            float *pr = p.data() + r * Sp, *dsr = dp.data() + r * Sp;
            const float L = n[r] ? lp[(b * H + h) * T + i0 + r] : -inf;
            if (L == -inf) {  // past T, the padding, or a row that saw no key: no gradient
              for (int64_t j = 0; j < n16; ++j) pr[j] = dsr[j] = 0.f;
              continue;
            }
            float Di = 0.f;
            const float *oi = oa[r], *gi = ga[r];
#pragma omp simd reduction(+ : Di)
            for (int64_t d = 0; d < D; ++d) Di += gi[d] * oi[d];
            probabilities_and_their_gradient(pr, dsr, n16, L, Di, sc);
          }
          const int64_t nk = std::min(n16, S);
          weighted_rows(dp.data(), Sp, nk, krows.data(), D, D, dqa);        // dq = dS k
          add_weighted_sums(dp.data(), Sp, nk, qa, dkrows.data(), D, D);   // dk += dS^T q
          add_weighted_sums(p.data(), Sp, nk, ga, dvrows.data(), D, D);    // dv += p^T dO
        }
      }
      for (int64_t j = 0; j < S; ++j) {  // the real keys' rows out
        const int64_t t = token_of(map, b, j, S);
        if (t >= key_tokens) continue;
        std::memcpy(dkp + (t * Hkv + hk) * D, dkrows.data() + j * D, D * sizeof(float));
        std::memcpy(dvp + (t * Hkv + hk) * D, dvrows.data() + j * D, D * sizeof(float));
      }
    }
  });
  return {dq, dk, dv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm_forward", &rms_norm_forward, "RMSNorm: (y, 1/rms per row)");
  m.def("rms_norm_backward", &rms_norm_backward, "RMSNorm's gradient: (dx, dweight)");
  m.def("rotate", &rotate, "the rotary embedding (sign 1) or its inverse (sign -1)");
  m.def("swiglu_forward", &swiglu_forward, "silu(gate) * up");
  m.def("swiglu_backward", &swiglu_backward, "the stacked gradient (..., 2F) of silu(gate) * up");
  m.def("attention_forward", &attention_forward, "softmax(scale q k^T + mask) v: (out (B, T, H, D), lse (B, H, T))");
  m.def("attention_backward", &attention_backward, "the attention's gradient: (dq (B, T, H, D), dk, dv (B, S, Hkv, D))");
}
