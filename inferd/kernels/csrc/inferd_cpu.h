// The row-level entry points the fused decoder (cpu_decoder.cpp) shares with the single ops of
// cpu_int8_linear.cpp and cpu_decode_ops.cpp: one implementation each, so the fused path and the op-by-op path give
// the same bits. Pointers are float32 rows; every function splits its work over torch's intra-op threads.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace inferd_cpu {

// A block-quantized weight as packed for the int8-activation kernels (format 0: q4, 1: q8, 2: q6).
struct A8Weight {
  int64_t format;
  const at::Tensor* qs;
  const at::Tensor* scales;
  const at::Tensor* mins;  // q4 only, else nullptr
  int64_t in_features;
  int64_t out_features;
};

// Checks the packed tensors against `in_features` (throws with the reason) and fills out_features.
void a8_check(A8Weight& w);

// y [M, N] = x [M, K] @ W^T, each row of x quantized to int8 per block of 32 (the a8 linear ops).
void a8_linear_rows(const A8Weight& w, const float* x, int64_t M, float* y);

// out [rows, n] = rms_norm(x) * w.
void rms_norm_rows(const float* x, const float* w, float eps, int64_t rows, int64_t n, float* out);

// sum = x + residual (sum may be residual itself), out = rms_norm(sum) * w; [rows, n] each.
void add_rms_norm_rows(const float* x, const float* residual, const float* w, float eps, int64_t rows, int64_t n,
                       float* out, float* sum);

// RoPE in place on heads 0 .. num_heads-1 (head_dim wide) of T rows `row_stride` floats apart; cos, signed_sin
// [T, head_dim].
void rotary_rows(float* base, int64_t T, int64_t row_stride, const float* cos, const float* signed_sin,
                 int64_t num_heads, int64_t head_dim);

// silu(gate) * up: gate_up [rows, 2 * inter] -> out [rows, inter].
void silu_mul_rows(const float* gate_up, int64_t rows, int64_t inter, float* out);

// Decode attention of B query rows (row b: H heads of D floats at q + b * q_row_stride) against the paged cache
// kv [2, num_blocks, block_size, Hkv, D] (contiguous), block_tables [B, max_blocks], seq_lens [B] (keys each row
// sees) -> out [B, H, D] contiguous. sliding_window 0 = none.
void paged_attention_rows(const float* q, int64_t q_row_stride, int64_t B, int64_t H, int64_t D, const float* kv,
                          int64_t num_blocks, int64_t block_size, int64_t Hkv, const int64_t* block_tables,
                          int64_t max_blocks, const int64_t* seq_lens, float scale, int64_t sliding_window,
                          float* out);

}  // namespace inferd_cpu
