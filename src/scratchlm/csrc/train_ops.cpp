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
        float dot = 0.f;  // sum of gw * xhat
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < D; ++i) dot += (gr[i] * wp[i]) * (xr[i] * inv);
        const float mean = dot / float(D);
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm_forward", &rms_norm_forward, "RMSNorm: (y, 1/rms per row)");
  m.def("rms_norm_backward", &rms_norm_backward, "RMSNorm's gradient: (dx, dweight)");
  m.def("rotate", &rotate, "the rotary embedding (sign 1) or its inverse (sign -1)");
  m.def("swiglu_forward", &swiglu_forward, "silu(gate) * up");
  m.def("swiglu_backward", &swiglu_backward, "the stacked gradient (..., 2F) of silu(gate) * up");
}
