// inferd CPU kernels: the small per-layer ops of a decode step, fused. On a CPU a decode step is a few hundred
// tiny tensor ops, and each torch op costs microseconds of dispatch and allocation; these replace chains of them:
//   add_rms_norm     residual add + RMSNorm                   (torch: add, pow, mean, add, rsqrt, mul, mul)
//   rotary_inplace   RoPE on the q and k heads of the fused qkv rows, in place (torch: roll, mul, addcmul, copy)
//   silu_mul         silu(gate) * up of the fused gate_up rows (torch: split, silu, mul)
//   paged_decode_attention  one query token per sequence against its paged K/V, read in place through the
//                    block table (torch: gather the blocks into a copy, then SDPA)
// All float32, accumulation in float32; results match the torch reference code to float32 rounding.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "inferd_cpu.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
// The x86-64-v3 (AVX2 + FMA, no AVX-512) paths below: 8-lane versions of the AVX-512 loops, same arithmetic.
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define INFERD_AVX2_ONLY 1
#endif

namespace {

#if defined(__AVX512F__)
// e^x for 16 floats, within ~2 ulp of expf: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two for an exact
// reduction), e^r by Cephes' degree-6 expf polynomial, then times 2^n by vscalefps. Inputs are clamped to
// [-103, 88.38]: results underflow to 0 below, and e^88.38 is the largest finite float.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-103.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif

#if defined(INFERD_AVX2_ONLY)
// e^x for 8 floats: the same clamp, reduction and polynomial as exp16, so each lane gives exp16's bits. AVX2 has
// no vscalefps, so 2^n (n in [-149, 128]) is applied as two exact power-of-two factors 2^(n>>1) and 2^(n-(n>>1)),
// each a normal float, which rounds once (at the second multiply) as vscalefps does.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-103.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1);
  const __m256i n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, f1), f2);
}

inline float reduce_add8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float reduce_max8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// v[i] = exp(v[i] - shift) for i < n; returns their sum.
inline float exp_shifted_sum(float* v, int64_t n, float shift) {
  float total = 0.f;
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  const __m512 sh = _mm512_set1_ps(shift);
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(v + i), sh));
    _mm512_storeu_ps(v + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  total = _mm512_reduce_add_ps(acc);
#elif defined(INFERD_AVX2_ONLY)
  __m256 acc = _mm256_setzero_ps();
  const __m256 sh = _mm256_set1_ps(shift);
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(v + i), sh));
    _mm256_storeu_ps(v + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  total = reduce_add8(acc);
#endif
  for (; i < n; ++i) {
    v[i] = std::exp(v[i] - shift);
    total += v[i];
  }
  return total;
}

inline float dot(const float* a, const float* b, int64_t n) {
#if defined(__AVX512F__)
  // No `omp simd reduction` here: its 16-lane epilogue (16 dependent scalar adds) would run on every call.
  int64_t i = 0;
  __m512 v = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) v = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), v);
  float acc = _mm512_reduce_add_ps(v);
  for (; i < n; ++i) acc += a[i] * b[i];
  return acc;
#elif defined(INFERD_AVX2_ONLY)
  int64_t i = 0;
  __m256 v = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) v = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), v);
  float acc = reduce_add8(v);
  for (; i < n; ++i) acc += a[i] * b[i];
  return acc;
#else
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
#endif
}

void check_f32_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a CPU float32 tensor");
}

// ---- RMSNorm, with the residual add before it -----------------------------------------------------------------

void rms_norm_row(const float* s, const float* w, float eps, int64_t n, float* out) {
  float sum_sq = 0.f;
#pragma omp simd reduction(+ : sum_sq)
  for (int64_t i = 0; i < n; ++i) sum_sq += s[i] * s[i];
  const float inv_rms = 1.f / std::sqrt(sum_sq / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = s[i] * inv_rms * w[i];
}

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  check_f32_cpu(x_in, "x");
  check_f32_cpu(weight, "weight");
  const int64_t n = weight.numel();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty_like(x);
  inferd_cpu::rms_norm_rows(x.data_ptr<float>(), w.data_ptr<float>(), static_cast<float>(eps), x.numel() / n, n,
                            out.data_ptr<float>());
  return out;
}

// (rms_norm(x + residual) * weight, x + residual)
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x_in, const at::Tensor& residual_in,
                                                const at::Tensor& weight, double eps) {
  check_f32_cpu(x_in, "x");
  check_f32_cpu(residual_in, "residual");
  check_f32_cpu(weight, "weight");
  TORCH_CHECK(x_in.sizes() == residual_in.sizes(), "x and residual must have the same shape");
  const int64_t n = weight.numel();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor res = residual_in.contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty_like(x);
  at::Tensor sum = at::empty_like(x);
  inferd_cpu::add_rms_norm_rows(x.data_ptr<float>(), res.data_ptr<float>(), w.data_ptr<float>(),
                                static_cast<float>(eps), x.numel() / n, n, out.data_ptr<float>(),
                                sum.data_ptr<float>());
  return {out, sum};
}

// ---- RoPE, rotate-half convention, in place ---------------------------------------------------------------------

// qkv [T, W] (row stride any, last dim contiguous): heads 0 .. num_heads-1 of width head_dim are rotated.
// cos, signed_sin [T, 1, head_dim] as RotaryEmbedding.cos_sin gives them (signed_sin = cat(-sin, sin)):
// out[j] = x[j] * cos[j] + x[(j + D/2) % D] * signed_sin[j].
void rotary_inplace(at::Tensor& qkv, const at::Tensor& cos_in, const at::Tensor& signed_sin_in, int64_t num_heads,
                    int64_t head_dim) {
  check_f32_cpu(qkv, "qkv");
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "qkv must be [T, W] with a contiguous last dimension");
  TORCH_CHECK(num_heads * head_dim <= qkv.size(1) && head_dim % 2 == 0, "rotary: bad head count or head_dim");
  const at::Tensor cos = cos_in.contiguous();
  const at::Tensor ssin = signed_sin_in.contiguous();
  const int64_t T = qkv.size(0);
  TORCH_CHECK(cos.numel() == T * head_dim && ssin.numel() == T * head_dim, "cos/sin must be [T, 1, head_dim]");
  inferd_cpu::rotary_rows(qkv.data_ptr<float>(), T, qkv.stride(0), cos.data_ptr<float>(), ssin.data_ptr<float>(),
                          num_heads, head_dim);
}

// ---- SiLU-gated MLP activation --------------------------------------------------------------------------------

at::Tensor silu_mul(const at::Tensor& gate_up_in) {
  check_f32_cpu(gate_up_in, "gate_up");
  const at::Tensor gate_up = gate_up_in.contiguous();
  const int64_t width = gate_up.size(-1);
  TORCH_CHECK(width % 2 == 0, "gate_up's last dimension must be even");
  const int64_t inter = width / 2;
  std::vector<int64_t> shape(gate_up.sizes().begin(), gate_up.sizes().end());
  shape.back() = inter;
  at::Tensor out = at::empty(shape, gate_up.options());
  inferd_cpu::silu_mul_rows(gate_up.data_ptr<float>(), gate_up.numel() / width, inter, out.data_ptr<float>());
  return out;
}

// ---- log-sum-exp of logits rows -------------------------------------------------------------------------------

// logits [B, V] -> [B]: max + log(sum(exp(x - max))) per row, each row on one thread (its bits do not depend on
// the batch). A row of -inf gives -inf, a row holding +inf gives +inf and one holding NaN gives NaN, as
// torch.logsumexp.
at::Tensor logsumexp_rows(const at::Tensor& logits_in) {
  check_f32_cpu(logits_in, "logits");
  TORCH_CHECK(logits_in.dim() == 2, "logsumexp_rows: logits must be [B, V]");
  const at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0), V = logits.size(1);
  at::Tensor out = at::empty({B}, logits.options());
  const float* lp = logits.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* x = lp + b * V;
      float mx = -std::numeric_limits<float>::infinity();
      bool has_nan = false;
      int64_t i = 0;
#if defined(__AVX512F__)
      __m512 vmax = _mm512_set1_ps(mx);
      __mmask16 nan_lanes = 0;
      for (; i + 16 <= V; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        nan_lanes |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        vmax = _mm512_max_ps(vmax, v);
      }
      mx = _mm512_reduce_max_ps(vmax);
      has_nan = nan_lanes != 0;
#elif defined(INFERD_AVX2_ONLY)
      __m256 vmax = _mm256_set1_ps(mx);
      __m256 nan_lanes = _mm256_setzero_ps();
      for (; i + 8 <= V; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        nan_lanes = _mm256_or_ps(nan_lanes, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        vmax = _mm256_max_ps(vmax, v);
      }
      mx = reduce_max8(vmax);
      has_nan = _mm256_movemask_ps(nan_lanes) != 0;
#endif
      for (; i < V; ++i) {
        has_nan |= std::isnan(x[i]);
        mx = std::max(mx, x[i]);
      }
      if (has_nan || std::isinf(mx)) {
        op[b] = has_nan ? std::numeric_limits<float>::quiet_NaN() : mx;  // all -inf, or an +inf
        continue;
      }
      float total = 0.f;
      i = 0;
#if defined(__AVX512F__)
      __m512 acc = _mm512_setzero_ps();
      const __m512 sh = _mm512_set1_ps(mx);
      for (; i + 16 <= V; i += 16) acc = _mm512_add_ps(acc, exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), sh)));
      total = _mm512_reduce_add_ps(acc);
#elif defined(INFERD_AVX2_ONLY)
      __m256 acc = _mm256_setzero_ps();
      const __m256 sh = _mm256_set1_ps(mx);
      for (; i + 8 <= V; i += 8) acc = _mm256_add_ps(acc, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh)));
      total = reduce_add8(acc);
#endif
      for (; i < V; ++i) total += std::exp(x[i] - mx);
      op[b] = mx + std::log(total);
    }
  });
  return out;
}

// ---- paged decode attention -----------------------------------------------------------------------------------

#if defined(__AVX512F__)
// out = sum over visible keys s of p[s] * v_s for one query head, the DC x 16 output floats held in registers.
template <int DC>
void weighted_values_avx512(const float* probs, int64_t first, int64_t len, const int64_t* block_table,
                            int64_t block_size, const float* vp, int64_t Hkv, int64_t g, float* out) {
  constexpr int64_t D = DC * 16;
  __m512 acc[DC];
  for (int c = 0; c < DC; ++c) acc[c] = _mm512_setzero_ps();
  const float* p = probs - first;
  for (int64_t pos = first; pos < len;) {
    const int64_t block = block_table[pos / block_size];
    const int64_t end = std::min(len, (pos / block_size + 1) * block_size);
    const float* v = vp + ((block * block_size + pos % block_size) * Hkv + g) * D;
    for (; pos < end; ++pos, v += Hkv * D) {
      const __m512 pv = _mm512_set1_ps(p[pos]);
      for (int c = 0; c < DC; ++c) acc[c] = _mm512_fmadd_ps(pv, _mm512_loadu_ps(v + 16 * c), acc[c]);
    }
  }
  for (int c = 0; c < DC; ++c) _mm512_storeu_ps(out + 16 * c, acc[c]);
}
#elif defined(INFERD_AVX2_ONLY)
// weighted_values_avx512 with 8 lanes: the DC x 8 output floats held in registers.
template <int DC>
void weighted_values_avx2(const float* probs, int64_t first, int64_t len, const int64_t* block_table,
                          int64_t block_size, const float* vp, int64_t Hkv, int64_t g, float* out) {
  constexpr int64_t D = DC * 8;
  __m256 acc[DC];
  for (int c = 0; c < DC; ++c) acc[c] = _mm256_setzero_ps();
  const float* p = probs - first;
  for (int64_t pos = first; pos < len;) {
    const int64_t block = block_table[pos / block_size];
    const int64_t end = std::min(len, (pos / block_size + 1) * block_size);
    const float* v = vp + ((block * block_size + pos % block_size) * Hkv + g) * D;
    for (; pos < end; ++pos, v += Hkv * D) {
      const __m256 pv = _mm256_set1_ps(p[pos]);
      for (int c = 0; c < DC; ++c) acc[c] = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + 8 * c), acc[c]);
    }
  }
  for (int c = 0; c < DC; ++c) _mm256_storeu_ps(out + 8 * c, acc[c]);
}
#endif

}  // namespace

namespace inferd_cpu {

// One work item per (query row, query head), so that one sequence's few heads still spread over every thread
// (a kv head's K/V rows, read once from memory by the first of its query heads, come from cache for the others).
// A head's scores, softmax and weighted sum are the same operations whatever the split.
void paged_attention_rows(const float* qp, int64_t q_row_stride, int64_t B, int64_t H, int64_t D, const float* kp,
                          int64_t num_blocks, int64_t block_size, int64_t Hkv, const int64_t* bt, int64_t max_blocks,
                          const int64_t* lens, float fscale, int64_t sliding_window, float* op) {
  const int64_t G = H / Hkv;
  const float* vp = kp + num_blocks * block_size * Hkv * D;
  at::parallel_for(0, B * H, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> scores;
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / H, h = w % H, g = h / G;
      const int64_t len = lens[b];
      TORCH_CHECK(len >= 1 && len <= max_blocks * block_size, "seq_len out of the block table's range");
      const int64_t first = sliding_window > 0 ? std::max<int64_t>(0, len - sliding_window) : 0;
      const int64_t n = len - first;
      scores.resize(n);
      const float* qh = qp + b * q_row_stride + h * D;
      const int64_t* table = bt + b * max_blocks;
      // Keys block by block (no division per key): slot = block * block_size + offset.
      for (int64_t pos = first; pos < len;) {
        const int64_t block = table[pos / block_size];
        const int64_t end = std::min(len, (pos / block_size + 1) * block_size);
        const float* k = kp + ((block * block_size + pos % block_size) * Hkv + g) * D;
        for (; pos < end; ++pos, k += Hkv * D) scores[pos - first] = dot(qh, k, D) * fscale;
      }
      float* sc = scores.data();  // softmax over the n visible keys
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t s = 0; s < n; ++s) mx = std::max(mx, sc[s]);
      const float inv = 1.f / exp_shifted_sum(sc, n, mx);
#pragma omp simd
      for (int64_t s = 0; s < n; ++s) sc[s] *= inv;
      float* out_h = op + (b * H + h) * D;
#if defined(__AVX512F__)
      if (D == 64) {
        weighted_values_avx512<4>(sc, first, len, table, block_size, vp, Hkv, g, out_h);
        continue;
      }
      if (D == 128) {
        weighted_values_avx512<8>(sc, first, len, table, block_size, vp, Hkv, g, out_h);
        continue;
      }
#elif defined(INFERD_AVX2_ONLY)
      if (D == 64) {  // 8 accumulators; D = 128 would need 16, all of AVX2's registers, so it takes the loop below
        weighted_values_avx2<8>(sc, first, len, table, block_size, vp, Hkv, g, out_h);
        continue;
      }
#endif
      std::fill(out_h, out_h + D, 0.f);
      for (int64_t pos = first; pos < len;) {
        const int64_t block = table[pos / block_size];
        const int64_t end = std::min(len, (pos / block_size + 1) * block_size);
        const float* v = vp + ((block * block_size + pos % block_size) * Hkv + g) * D;
        for (; pos < end; ++pos, v += Hkv * D) {
          const float p = sc[pos - first];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) out_h[d] += p * v[d];
        }
      }
    }
  });
}

void rms_norm_rows(const float* xp, const float* wp, float eps, int64_t rows, int64_t n, float* op) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) rms_norm_row(xp + r * n, wp, eps, n, op + r * n);
  });
}

void add_rms_norm_rows(const float* xp, const float* rp, const float* wp, float eps, int64_t rows, int64_t n,
                       float* op, float* sp) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* s = sp + r * n;
      const float* xr = xp + r * n;
      const float* rr = rp + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) s[i] = xr[i] + rr[i];
      rms_norm_row(s, wp, eps, n, op + r * n);
    }
  });
}

void rotary_rows(float* base, int64_t T, int64_t row_stride, const float* cp, const float* sp, int64_t num_heads,
                 int64_t head_dim) {
  const int64_t half = head_dim / 2;
  at::parallel_for(0, T * num_heads, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / num_heads;
      float* x = base + t * row_stride + (i % num_heads) * head_dim;
      const float* c = cp + t * head_dim;
      const float* s = sp + t * head_dim;
#pragma omp simd
      for (int64_t j = 0; j < half; ++j) {
        const float x1 = x[j];
        const float x2 = x[j + half];
        x[j] = x1 * c[j] + x2 * s[j];
        x[j + half] = x2 * c[j + half] + x1 * s[j + half];
      }
    }
  });
}

void silu_mul_rows(const float* gp, int64_t rows, int64_t inter, float* op) {
  const int64_t width = 2 * inter;
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = gp + r * width;
      const float* u = g + inter;
      float* o = op + r * inter;
      int64_t i = 0;
#if defined(__AVX512F__)
      const __m512 one = _mm512_set1_ps(1.f);
      for (; i + 16 <= inter; i += 16) {
        const __m512 gv = _mm512_loadu_ps(g + i);
        const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
        _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_mul_ps(gv, sig), _mm512_loadu_ps(u + i)));
      }
#elif defined(INFERD_AVX2_ONLY)
      const __m256 one = _mm256_set1_ps(1.f);
      for (; i + 8 <= inter; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + i)));
      }
#endif
      for (; i < inter; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    }
  });
}

}  // namespace inferd_cpu

namespace {

// q [B, H, D] (one new token per sequence, any strides), kv_cache [2, num_blocks, block_size, Hkv, D] contiguous,
// block_tables [B, max_blocks] int64, seq_lens [B] int64 (keys in the cache, the new token's included).
// sliding_window 0 = none, else only the last sliding_window keys are visible. -> out [B, H, D].
at::Tensor paged_decode_attention(const at::Tensor& q_in, const at::Tensor& kv_cache, const at::Tensor& block_tables_in,
                                  const at::Tensor& seq_lens_in, double scale, int64_t sliding_window) {
  check_f32_cpu(q_in, "q");
  check_f32_cpu(kv_cache, "kv_cache");
  TORCH_CHECK(kv_cache.is_contiguous() && kv_cache.dim() == 5 && kv_cache.size(0) == 2,
              "kv_cache must be a contiguous [2, num_blocks, block_size, Hkv, D] tensor");
  TORCH_CHECK(block_tables_in.scalar_type() == at::kLong && seq_lens_in.scalar_type() == at::kLong,
              "block_tables and seq_lens must be int64");
  const at::Tensor q = q_in.contiguous();
  const at::Tensor block_tables = block_tables_in.contiguous();
  const at::Tensor seq_lens = seq_lens_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t num_blocks = kv_cache.size(1), block_size = kv_cache.size(2), Hkv = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == D && H % Hkv == 0, "q and kv_cache head shapes disagree");
  TORCH_CHECK(block_tables.size(0) >= B && seq_lens.numel() >= B, "block_tables / seq_lens have fewer rows than q");
  at::Tensor out = at::empty({B, H, D}, q.options());
  inferd_cpu::paged_attention_rows(q.data_ptr<float>(), H * D, B, H, D, kv_cache.data_ptr<float>(), num_blocks,
                                   block_size, Hkv, block_tables.data_ptr<int64_t>(), block_tables.size(1),
                                   seq_lens.data_ptr<int64_t>(), static_cast<float>(scale), sliding_window,
                                   out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(inferd, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rotary_inplace(Tensor(a!) qkv, Tensor cos, Tensor signed_sin, int num_heads, int head_dim) -> ()");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("logsumexp_rows(Tensor logits) -> Tensor");
  m.def("paged_decode_attention(Tensor q, Tensor kv_cache, Tensor block_tables, Tensor seq_lens, float scale, "
        "int sliding_window) -> Tensor");
}

TORCH_LIBRARY_IMPL(inferd, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rotary_inplace", &rotary_inplace);
  m.impl("silu_mul", &silu_mul);
  m.impl("logsumexp_rows", &logsumexp_rows);
  m.impl("paged_decode_attention", &paged_decode_attention);
}
