// inferd CPU kernels: the small per-layer ops of a decode step, fused. On a CPU a decode step is a few hundred
// tiny tensor ops, and each torch op costs microseconds of dispatch and allocation; these replace chains of them:
//   add_rms_norm     residual add + RMSNorm                   (torch: add, pow, mean, add, rsqrt, mul, mul)
//   rotary_inplace   RoPE on the q and k heads of the fused qkv rows, in place (torch: roll, mul, addcmul, copy)
//   silu_mul         silu(gate) * up of the fused gate_up rows (torch: split, silu, mul)
//   paged_decode_attention  one query token per sequence against its paged K/V, read in place through the
//                    block table (torch: gather the blocks into a copy, then SDPA)
// All float32, accumulation in float32; results match the torch reference code to float32 rounding.
// The vector code is in decode_ops_body.inc, compiled here once per code level (inferd_cpu.h); the row functions
// of inferd_cpu:: run the level of the kernel path in use.

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

#if defined(INFERD_X86)
#include <immintrin.h>
#endif

namespace {

#define INFERD_LEVEL_BODY "decode_ops_body.inc"
#include "per_level.inc"

}  // namespace

namespace inferd_cpu {

void paged_attention_rows(const float* qp, int64_t q_row_stride, int64_t B, int64_t H, int64_t D, const float* kp,
                          int64_t num_blocks, int64_t block_size, int64_t Hkv, const int64_t* bt, int64_t max_blocks,
                          const int64_t* lens, float fscale, int64_t sliding_window, float* op) {
  INFERD_LEVEL_CALL(paged_attention_rows, qp, q_row_stride, B, H, D, kp, num_blocks, block_size, Hkv, bt, max_blocks,
                    lens, fscale, sliding_window, op)
}

void rms_norm_rows(const float* xp, const float* wp, float eps, int64_t rows, int64_t n, float* op) {
  INFERD_LEVEL_CALL(rms_norm_rows, xp, wp, eps, rows, n, op)
}

void add_rms_norm_rows(const float* xp, const float* rp, const float* wp, float eps, int64_t rows, int64_t n,
                       float* op, float* sp) {
  INFERD_LEVEL_CALL(add_rms_norm_rows, xp, rp, wp, eps, rows, n, op, sp)
}

void rotary_rows(float* base, int64_t T, int64_t row_stride, const float* cp, const float* sp, int64_t num_heads,
                 int64_t head_dim) {
  INFERD_LEVEL_CALL(rotary_rows, base, T, row_stride, cp, sp, num_heads, head_dim)
}

void silu_mul_rows(const float* gp, int64_t rows, int64_t inter, float* op) {
  INFERD_LEVEL_CALL(silu_mul_rows, gp, rows, inter, op)
}

}  // namespace inferd_cpu

namespace {

void logsumexp_rows_raw(const float* lp, int64_t B, int64_t V, float* op) {
  INFERD_LEVEL_CALL(logsumexp_rows_raw, lp, B, V, op)
}

void check_f32_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a CPU float32 tensor");
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
  logsumexp_rows_raw(lp, B, V, op);
  return out;
}

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
