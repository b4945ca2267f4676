// The row-level entry points the fused decoder (cpu_decoder.cpp) shares with the single ops of
// cpu_int8_linear.cpp and cpu_decode_ops.cpp: one implementation each, so the fused path and the op-by-op path give
// the same bits. Pointers are float32 rows; every function splits its work over torch's intra-op threads.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

// ---- one library for every x86-64 CPU: per-level copies of the SIMD code, picked at run time ----------------
//
// The library is built for plain x86-64 (-march=x86-64, see inferd/kernels/__init__.py), so its baseline code runs
// on any x86-64 CPU. The SIMD-dependent bodies (the *_body.inc files and int8_tiles.inc) are compiled again inside
// `#pragma GCC target` regions, each copy in its own namespace, with INFERD_LEVEL telling the body which vector
// code to use (GCC's C++ front end does not update __AVX2__ / __AVX512F__ under the pragma); per_level.inc
// writes the three copies of a body file:
//   INFERD_LEVEL 0  portable   the build's baseline (any x86-64, or the compiler's default on other CPUs)
//   INFERD_LEVEL 3  x86-64-v3  AVX2 + FMA + F16C (the int8 kernels add an AVX-VNNI copy)
//   INFERD_LEVEL 4  x86-64-v4  AVX-512 F/BW/VL (the int8 kernels add an AVX-512 VNNI copy)
// Functions defined in a region get its target; templates from headers (std::, at::) instantiated there keep the
// baseline target, so no shared (COMDAT) copy of a header function ever holds AVX-512 code that a baseline caller
// could pick up. The regions need GCC; other compilers (and other CPUs) get the portable copy alone.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define INFERD_X86 1
#define INFERD_PUSH_V3 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define INFERD_PUSH_V4 _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx2,fma,f16c\")")
#define INFERD_POP _Pragma("GCC pop_options")
#endif

namespace inferd_cpu {

// The kernel paths, best last. One is in use for the whole process: the best the CPU runs, unless
// INFERD_CPU_KERNEL (or its older name INFERD_INT8_KERNEL) or the cpu_kernel_path op names a lower one.
enum Path : int { kPortable = 0, kAvx2 = 1, kAvx2Vnni = 2, kAvx512 = 3, kAvx512Vnni = 4, kNumPaths = 5 };

// The path in use (cheap: one atomic load once chosen).
int kernel_path();

// The code level of the path in use: 0 (portable), 3 (x86-64-v3: the avx2 paths), 4 (x86-64-v4: the avx512 paths).
int kernel_level();

}  // namespace inferd_cpu

// `return NS::fn(args)` for the namespace of the level in use: portable, x86_v3 or x86_v4.
#if defined(INFERD_X86)
#define INFERD_LEVEL_CALL(fn, ...)                         \
  switch (inferd_cpu::kernel_level()) {                    \
    case 4: return x86_v4::fn(__VA_ARGS__);                \
    case 3: return x86_v3::fn(__VA_ARGS__);                \
    default: return portable::fn(__VA_ARGS__);             \
  }
#else
#define INFERD_LEVEL_CALL(fn, ...) return portable::fn(__VA_ARGS__);
#endif

namespace inferd_cpu {

// A block-quantized weight as packed for the int8-activation kernels (format 0: q4, 1: q8, 2: q6, 3: q5).
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
