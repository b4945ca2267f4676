// inferd CPU kernels with int8 activations: y = x @ W^T for block-quantized W (Q4_0 / Q4_1 / Q4_K as "q4",
// Q8_0 / Q5_0 as "q8", Q6_K as "q6"; see cpu_quant_linear.cpp for the float-activation reference kernels).
//
// Each activation row is quantized per block of 32 values, as llama.cpp's q8_0 / q8_1 activations:
//   d = max|x| / 127, q = round_half_even(x / d) in -127..127 (x * (1 / d), float32), dsum = d * sum(q).
// A block's contribution to an output is then integer work plus two float multiply-adds:
//   q4 (w = s * u + min, u in 0..15):   s * d * sum(u * q)  + min * dsum
//   q8 (w = s * v, v in -127..127):     s * d * sum(v * q)
//   q6 (w = s * (u - 32), u in 0..63, a scale per 16 k):  per half block s * d * (sum(u * q) - 32 * sum(q))
//   q5 (w = s * u + min, u in 0..31; Q5_1, Q5_K):  s * d * sum(u * q)  + min * dsum
// Q4_K's scale and min per 32 (d * sc, -dmin * m: 6-bit integers times a float16) are exact in float32, not in
// float16, so q4 takes float32 scales and mins too (6 bits per weight instead of the file's 4.5); q6 always has
// float32 scales (d * sc, an 8-bit integer times a float16).
// The integer dot products run as u8 x s8 -> int32 sums of 4 (vpdpbusd with VNNI, vpmaddubsw + vpmaddwd
// without); signed q8 weights are made unsigned by adding 128 under VNNI (the extra 128 * sum(q) is removed
// through the min term, min = -128 s) or take the sign trick (|v| times q with v's sign) otherwise.
//
// Packed layout (output rows in tiles of 16, like the float kernels, but 4 consecutive k per row in one dword so
// that one int32 lane accumulates one output row):
//   q4: qs uint8 [N/16, K/8, 64]: byte [t, g, 4j + i] = u[16t+j, 8g+i] | u[16t+j, 8g+4+i] << 4   (i in 0..3)
//   q8: qs int8  [N/16, K/4, 64]: byte [t, g, 4j + i] = v[16t+j, 4g+i]
//   q6: qs uint8 [N/16, K/4, 64]: as q8, holding u
//   q5: qs uint8 [N/16, K/4, 64]: as q8, holding u (a byte per weight: the file's 5.5 / 6 bits become 8)
//   scales, mins: float16 (or float32) [N/16, K/32, 16], as the float kernels; q6 scales float32 [N/16, K/16, 16].
//
// Code paths, chosen at run time (one build carries all the x86 ones through per-region target pragmas):
// avx512-vnni, avx512 (BW), avx2-vnni (AVX-VNNI), avx2, portable. The default is the best the CPU has;
// INFERD_CPU_KERNEL=<path> (older name: INFERD_INT8_KERNEL) or the cpu_kernel_path op forces one (tests run every
// path a machine can). This file owns the choice for the whole library: the other kernels run the code level of
// the path in use (inferd_cpu::kernel_level: avx512* -> x86-64-v4, avx2* -> x86-64-v3, portable -> baseline).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "inferd_cpu.h"

#if defined(INFERD_X86)
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 32;
enum class Format { kQ4, kQ8, kQ6, kQ5 };  // the A8Weight::format numbers 0..3
using Half = c10::Half;
using inferd_cpu::kAvx2;
using inferd_cpu::kAvx2Vnni;
using inferd_cpu::kAvx512;
using inferd_cpu::kAvx512Vnni;
using inferd_cpu::kNumPaths;
using inferd_cpu::kPortable;

struct A8Packed {
  const uint8_t* qs;
  const void* scales;  // Half, or float where f32_scales
  const void* mins;    // q4 and q5 only
  int64_t K;
  Format format;
  bool f32_scales;
  int64_t qs_tile_bytes() const { return format == Format::kQ4 ? K / 2 * 16 : K * 16; }
  int64_t scale_tile_count() const { return (format == Format::kQ6 ? K / 16 : K / kBlock) * 16; }
};

// Quantized activations: q int8 [M, K], d and dsum float32 [M, K/32], isum16 int32 [M, K/16] (sum of q per 16).
struct A8Rows {
  const int8_t* q;
  const float* d;
  const float* dsum;
  const int32_t* isum16;
};

// quantize_rows, once per code level: its rounding (nearbyint) is a libm call per value without SSE4.1.
#define INFERD_LEVEL_BODY "a8_quantize_body.inc"
#include "per_level.inc"

void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* q, float* d, float* dsum, int32_t* isum16) {
  INFERD_LEVEL_CALL(quantize_rows, x, M, K, q, d, dsum, isum16)
}

// ---- portable path ------------------------------------------------------------------------------------------

inline float scale_at(const A8Packed& w, int64_t i) {
  return w.f32_scales ? static_cast<const float*>(w.scales)[i] : static_cast<float>(static_cast<const Half*>(w.scales)[i]);
}
inline float min_at(const A8Packed& w, int64_t i) {
  return w.f32_scales ? static_cast<const float*>(w.mins)[i] : static_cast<float>(static_cast<const Half*>(w.mins)[i]);
}

template <Format F>
void portable_tiles(const A8Rows& x, int64_t M, const A8Packed& w, int64_t t0, int64_t t1, float* y, int64_t N) {
  const int64_t K = w.K, num_blocks = K / kBlock;
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* qt = w.qs + t * w.qs_tile_bytes();
    for (int64_t m = 0; m < M; ++m) {
      for (int j = 0; j < 16; ++j) {
        float acc = 0.f;
        for (int64_t b = 0; b < num_blocks; ++b) {
          const int8_t* xb = x.q + m * K + b * kBlock;
          const int64_t xi = m * num_blocks + b;
          if constexpr (F == Format::kQ6) {
            for (int half = 0; half < 2; ++half) {
              int32_t dot = 0;
              for (int g = 4 * half; g < 4 * half + 4; ++g)
                for (int i = 0; i < 4; ++i) dot += qt[(b * 8 + g) * 64 + 4 * j + i] * xb[4 * g + i];
              dot -= 32 * x.isum16[2 * xi + half];
              const int64_t si = t * w.scale_tile_count() + (2 * b + half) * 16 + j;
              acc = std::fma(static_cast<float>(dot), scale_at(w, si) * x.d[xi], acc);
            }
            continue;
          }
          int32_t dot = 0;
          if constexpr (F == Format::kQ4) {
            for (int g = 0; g < 4; ++g)
              for (int i = 0; i < 4; ++i) {
                const uint8_t byte = qt[(b * 4 + g) * 64 + 4 * j + i];
                dot += (byte & 0x0F) * xb[8 * g + i] + (byte >> 4) * xb[8 * g + 4 + i];
              }
          } else if constexpr (F == Format::kQ5) {
            for (int g = 0; g < 8; ++g)
              for (int i = 0; i < 4; ++i) dot += qt[(b * 8 + g) * 64 + 4 * j + i] * xb[4 * g + i];
          } else {
            for (int g = 0; g < 8; ++g)
              for (int i = 0; i < 4; ++i)
                dot += static_cast<int8_t>(qt[(b * 8 + g) * 64 + 4 * j + i]) * xb[4 * g + i];
          }
          const int64_t si = t * w.scale_tile_count() + b * 16 + j;
          acc = std::fma(static_cast<float>(dot), scale_at(w, si) * x.d[xi], acc);
          if constexpr (F == Format::kQ4 || F == Format::kQ5) acc = std::fma(min_at(w, si), x.dsum[xi], acc);
        }
        y[m * N + t * 16 + j] = acc;
      }
    }
  }
}

void portable_run_tiles(Format f, const A8Rows& x, int64_t M, const A8Packed& w, int64_t t0, int64_t t1, float* y,
                        int64_t N) {
  if (f == Format::kQ4) portable_tiles<Format::kQ4>(x, M, w, t0, t1, y, N);
  else if (f == Format::kQ6) portable_tiles<Format::kQ6>(x, M, w, t0, t1, y, N);
  else if (f == Format::kQ5) portable_tiles<Format::kQ5>(x, M, w, t0, t1, y, N);
  else portable_tiles<Format::kQ8>(x, M, w, t0, t1, y, N);
}

#if defined(INFERD_X86)
// ---- AVX-512: VNNI and BW-only ---------------------------------------------------------------------------------
#define INFERD_A8_AVX512_COMMON                                                                                    \
  constexpr int kLanes = 16, kMaxRows = 4, kGroupTiles = 2;                                                        \
  using VI = __m512i;                                                                                              \
  using VF = __m512;                                                                                               \
  inline VI load_i(const uint8_t* p) { return _mm512_loadu_si512(p); }                                             \
  inline VI bcast4(const int8_t* p) {                                                                              \
    int32_t v;                                                                                                     \
    std::memcpy(&v, p, 4);                                                                                         \
    return _mm512_set1_epi32(v);                                                                                   \
  }                                                                                                                \
  inline VI nib_lo(VI v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0F)); }                                  \
  inline VI nib_hi(VI v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F)); }             \
  inline VI zero_i() { return _mm512_setzero_si512(); }                                                            \
  inline VF zero_f() { return _mm512_setzero_ps(); }                                                               \
  inline VF load_s(const Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); } \
  inline VF load_s(const float* p) { return _mm512_loadu_ps(p); }                                                  \
  inline VI set1_i(int32_t v) { return _mm512_set1_epi32(v); }                                                     \
  inline VI sub_i(VI a, VI b) { return _mm512_sub_epi32(a, b); }                                                   \
  inline VF set1_f(float v) { return _mm512_set1_ps(v); }                                                          \
  inline VF fmadd(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }                                           \
  inline VF mul_f(VF a, VF b) { return _mm512_mul_ps(a, b); }                                                      \
  inline VF cvt_i2f(VI v) { return _mm512_cvtepi32_ps(v); }                                                        \
  inline void store_f(float* p, VF v) { _mm512_storeu_ps(p, v); }

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")
namespace avx512_vnni {
INFERD_A8_AVX512_COMMON
inline VI dot4(VI acc, VI u, VI s) { return _mm512_dpbusd_epi32(acc, u, s); }
struct Q8W {
  VI u;
};
inline Q8W q8_prep(VI v) { return {_mm512_xor_si512(v, _mm512_set1_epi8(static_cast<char>(0x80)))}; }
inline VI q8_dot(VI acc, Q8W w, VI x) { return dot4(acc, w.u, x); }
constexpr float kQ8MinScale = -128.f;
using Q4Acc = VI;
inline Q4Acc q4_zero() { return zero_i(); }
inline Q4Acc q4_dot(Q4Acc acc, VI lo, VI xlo, VI hi, VI xhi) { return dot4(dot4(acc, lo, xlo), hi, xhi); }
inline VI q4_sum(Q4Acc acc) { return acc; }
#include "int8_tiles.inc"
}  // namespace avx512_vnni
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
namespace avx512_bw {
INFERD_A8_AVX512_COMMON
inline VI dot4(VI acc, VI u, VI s) {
  acc = _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
  asm("" : "+v"(acc));  // pins the running sum, as q4_dot below
  return acc;
}
struct Q8W {
  VI magnitude;
  __mmask64 negative;
};
inline Q8W q8_prep(VI v) { return {_mm512_abs_epi8(v), _mm512_movepi8_mask(v)}; }
inline VI q8_dot(VI acc, Q8W w, VI x) {
  return dot4(acc, w.magnitude, _mm512_mask_sub_epi8(x, w.negative, _mm512_setzero_si512(), x));
}
constexpr float kQ8MinScale = 0.f;
// q4 sums u . q in int16 pairs over the whole block: each vpmaddubsw pair is at most 2 * 15 * 127 = 3810 in
// magnitude, a block adds 8 of them (30480 < 32767), so the sums are exact and one vpmaddwd per block turns them
// into int32 (half the multiplies of dot4 twice per group).
using Q4Acc = VI;
inline Q4Acc q4_zero() { return zero_i(); }
inline Q4Acc q4_dot(Q4Acc acc, VI lo, VI xlo, VI hi, VI xhi) {
  acc = _mm512_add_epi16(acc, _mm512_add_epi16(_mm512_maddubs_epi16(lo, xlo), _mm512_maddubs_epi16(hi, xhi)));
  // An empty asm pins the running sum: GCC would otherwise reassociate a block's adds (exact in any order) into
  // one tree that computes every product first and spills them.
  asm("" : "+v"(acc));
  return acc;
}
inline VI q4_sum(Q4Acc acc) { return _mm512_madd_epi16(acc, _mm512_set1_epi16(1)); }
#include "int8_tiles.inc"
}  // namespace avx512_bw
#pragma GCC pop_options

// ---- AVX2: with AVX-VNNI and without --------------------------------------------------------------------------
#define INFERD_A8_AVX2_COMMON                                                                                      \
  /* 2 rows: 4 int32 + 4 float accumulators (one tile's two halves). 4 rows with the float accumulators in y */    \
  /* (touched once per 32 k) spill nothing but measured slower than 2 here (benchmarks/quant_kernels.py) */        \
  constexpr int kLanes = 8, kMaxRows = 2, kGroupTiles = 1;                                                         \
  using VI = __m256i;                                                                                              \
  using VF = __m256;                                                                                               \
  inline VI load_i(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }           \
  inline VI bcast4(const int8_t* p) {                                                                              \
    int32_t v;                                                                                                     \
    std::memcpy(&v, p, 4);                                                                                         \
    return _mm256_set1_epi32(v);                                                                                   \
  }                                                                                                                \
  inline VI nib_lo(VI v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }                                   \
  inline VI nib_hi(VI v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F)); }             \
  inline VI zero_i() { return _mm256_setzero_si256(); }                                                            \
  inline VF zero_f() { return _mm256_setzero_ps(); }                                                               \
  inline VF load_s(const Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); } \
  inline VF load_s(const float* p) { return _mm256_loadu_ps(p); }                                                  \
  inline VI set1_i(int32_t v) { return _mm256_set1_epi32(v); }                                                     \
  inline VI sub_i(VI a, VI b) { return _mm256_sub_epi32(a, b); }                                                   \
  inline VF set1_f(float v) { return _mm256_set1_ps(v); }                                                          \
  inline VF fmadd(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }                                           \
  inline VF mul_f(VF a, VF b) { return _mm256_mul_ps(a, b); }                                                      \
  inline VF cvt_i2f(VI v) { return _mm256_cvtepi32_ps(v); }                                                        \
  inline void store_f(float* p, VF v) { _mm256_storeu_ps(p, v); }

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
namespace avx2_vnni {
INFERD_A8_AVX2_COMMON
inline VI dot4(VI acc, VI u, VI s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
struct Q8W {
  VI u;
};
inline Q8W q8_prep(VI v) { return {_mm256_xor_si256(v, _mm256_set1_epi8(static_cast<char>(0x80)))}; }
inline VI q8_dot(VI acc, Q8W w, VI x) { return dot4(acc, w.u, x); }
constexpr float kQ8MinScale = -128.f;
using Q4Acc = VI;
inline Q4Acc q4_zero() { return zero_i(); }
inline Q4Acc q4_dot(Q4Acc acc, VI lo, VI xlo, VI hi, VI xhi) { return dot4(dot4(acc, lo, xlo), hi, xhi); }
inline VI q4_sum(Q4Acc acc) { return acc; }
#include "int8_tiles.inc"
}  // namespace avx2_vnni
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
INFERD_A8_AVX2_COMMON
inline VI dot4(VI acc, VI u, VI s) {
  acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
  asm("" : "+x"(acc));  // pins the running sum, as q4_dot below
  return acc;
}
struct Q8W {
  VI magnitude;
  VI sign;
};
inline Q8W q8_prep(VI v) { return {_mm256_abs_epi8(v), v}; }
inline VI q8_dot(VI acc, Q8W w, VI x) { return dot4(acc, w.magnitude, _mm256_sign_epi8(x, w.sign)); }
constexpr float kQ8MinScale = 0.f;
// q4 in int16 pairs over the whole block, as avx512_bw (at most 8 * 2 * 15 * 127 = 30480 in magnitude: exact).
using Q4Acc = VI;
inline Q4Acc q4_zero() { return zero_i(); }
inline Q4Acc q4_dot(Q4Acc acc, VI lo, VI xlo, VI hi, VI xhi) {
  acc = _mm256_add_epi16(acc, _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi)));
  // An empty asm pins the running sum: GCC would otherwise reassociate a block's adds (exact in any order) into
  // one tree that computes every product first and spills them.
  asm("" : "+x"(acc));
  return acc;
}
inline VI q4_sum(Q4Acc acc) { return _mm256_madd_epi16(acc, _mm256_set1_epi16(1)); }
#include "int8_tiles.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif  // INFERD_X86

// ---- run-time choice of the path ----------------------------------------------------------------------------

const char* const kPathNames[kNumPaths] = {"portable", "avx2", "avx2-vnni", "avx512", "avx512-vnni"};

bool cpu_runs(int path) {
  if (path == kPortable) return true;
#if defined(INFERD_X86)
  __builtin_cpu_init();
  unsigned a = 0, b = 0, c = 0, d = 0;
  const bool f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29));
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
  switch (path) {
    case kAvx2: return avx2;
    case kAvx2Vnni: {
      // AVX-VNNI: CPUID.(EAX=7, ECX=1):EAX bit 4 (the OS saves ymm state when AVX2 is reported usable).
      const bool vnni = __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 4));
      return avx2 && vnni;
    }
    case kAvx512: return avx512;
    case kAvx512Vnni: return avx512 && __builtin_cpu_supports("avx512vnni");
    default: return false;
  }
#else
  return false;
#endif
}

int path_by_name(const std::string& name) {
  for (int p = 0; p < kNumPaths; ++p)
    if (name == kPathNames[p]) return p;
  TORCH_CHECK(false, "inferd CPU kernels: unknown path '", name,
              "' (one of auto, avx512-vnni, avx512, avx2-vnni, avx2, portable)");
  return kPortable;
}

int best_path() {
  for (int p = kNumPaths - 1; p > 0; --p)
    if (cpu_runs(p)) return p;
  return kPortable;
}

std::atomic<int> g_path{-1};

int set_path(const std::string& name) {
  const int p = name == "auto" ? best_path() : path_by_name(name);
  TORCH_CHECK(cpu_runs(p), "inferd CPU kernels: this CPU cannot run the '", name, "' path");
  g_path.store(p);
  return p;
}

// The first call picks the path: INFERD_CPU_KERNEL, else its older name INFERD_INT8_KERNEL, else the best.
int current_path() {
  int p = g_path.load(std::memory_order_relaxed);
  if (p < 0) {
    const char* env = std::getenv("INFERD_CPU_KERNEL");
    if (!(env && *env)) env = std::getenv("INFERD_INT8_KERNEL");
    p = set_path(env && *env ? env : "auto");
  }
  return p;
}

// ---- ops ----------------------------------------------------------------------------------------------------

A8Packed check_a8_packed(Format f, const at::Tensor& qs, const at::Tensor& scales,
                         const c10::optional<at::Tensor>& mins, int64_t K) {
  TORCH_CHECK(qs.device().is_cpu() && scales.device().is_cpu(), "inferd int8 linear: CPU tensors only");
  TORCH_CHECK(K % kBlock == 0, "inferd int8 linear: input features must be a multiple of 32, got ", K);
  const int64_t num_tiles = qs.size(0);
  const bool is_q4 = f == Format::kQ4, has_mins = is_q4 || f == Format::kQ5;
  TORCH_CHECK(qs.is_contiguous() && qs.dim() == 3 && qs.size(2) == 64 && qs.size(1) == (is_q4 ? K / 8 : K / 4) &&
                  qs.scalar_type() == (f == Format::kQ8 ? at::kChar : at::kByte),
              is_q4 ? "q4 a8: qs must be contiguous uint8 [N/16, K/8, 64]"
                    : "q8 / q6 / q5 a8: qs must be contiguous int8 (q8) / uint8 (q6, q5) [N/16, K/4, 64]");
  const bool f32 = scales.scalar_type() == at::kFloat;
  const int64_t num_scales = f == Format::kQ6 ? K / 16 : K / kBlock;
  TORCH_CHECK((scales.scalar_type() == at::kHalf || (f32 && f != Format::kQ8)) && (f != Format::kQ6 || f32) &&
                  scales.is_contiguous() && scales.sizes() == at::IntArrayRef({num_tiles, num_scales, 16}),
              "scales must be contiguous [N/16, K/32, 16] float16 (q4, q5 also float32) or, for q6, float32 [N/16, K/16, 16]");
  A8Packed w{static_cast<const uint8_t*>(qs.data_ptr()), scales.data_ptr(), nullptr, K, f, f32};
  if (has_mins) {
    TORCH_CHECK(mins.has_value() && mins->sizes() == scales.sizes() && mins->scalar_type() == scales.scalar_type() &&
                    mins->is_contiguous(), "q4 / q5 a8: mins must be contiguous [N/16, K/32, 16], of the scales' dtype");
    w.mins = mins->data_ptr();
  }
  return w;
}

// x [M, K] float32 rows -> y [M, num_tiles * 16]: quantize the rows, then every tile pair on torch's threads.
void a8_linear_raw(Format f, const A8Packed& w, int64_t num_tiles, const float* x, int64_t M, float* yp) {
  const int64_t K = w.K;
  const int64_t N = num_tiles * 16;
  std::vector<int8_t> xq(M * K);
  std::vector<float> xd(M * (K / kBlock)), xdsum(M * (K / kBlock));
  std::vector<int32_t> xisum16(M * (K / 16));
  quantize_rows(x, M, K, xq.data(), xd.data(), xdsum.data(), xisum16.data());
  const A8Rows rows{xq.data(), xd.data(), xdsum.data(), xisum16.data()};
  const int path = current_path();
  // Grain in tile pairs, so that pairs never straddle two threads.
  at::parallel_for(0, (num_tiles + 1) / 2, 4, [&](int64_t p0, int64_t p1) {
    const int64_t t0 = 2 * p0, t1 = std::min(num_tiles, 2 * p1);
    switch (path) {
#if defined(INFERD_X86)
      case kAvx512Vnni: avx512_vnni::run_tiles(f, rows, M, w, t0, t1, yp, N); break;
      case kAvx512: avx512_bw::run_tiles(f, rows, M, w, t0, t1, yp, N); break;
      case kAvx2Vnni: avx2_vnni::run_tiles(f, rows, M, w, t0, t1, yp, N); break;
      case kAvx2: avx2::run_tiles(f, rows, M, w, t0, t1, yp, N); break;
#endif
      default: portable_run_tiles(f, rows, M, w, t0, t1, yp, N);
    }
  });
}

at::Tensor a8_linear(Format f, const at::Tensor& x_in, const at::Tensor& qs, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& mins) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat, "inferd int8 linear: x must be CPU float32");
  const int64_t K = x_in.size(-1);
  const A8Packed w = check_a8_packed(f, qs, scales, mins, K);
  const int64_t num_tiles = qs.size(0);
  const int64_t N = num_tiles * 16;
  const at::Tensor x = x_in.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y.view(out_shape);

  a8_linear_raw(f, w, num_tiles, x.data_ptr<float>(), M, y.data_ptr<float>());
  return y.view(out_shape);
}

at::Tensor q4_a8_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales, const at::Tensor& mins) {
  return a8_linear(Format::kQ4, x, qs, scales, mins);
}
at::Tensor q8_a8_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales) {
  return a8_linear(Format::kQ8, x, qs, scales, c10::nullopt);
}
at::Tensor q6_a8_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales) {
  return a8_linear(Format::kQ6, x, qs, scales, c10::nullopt);
}
at::Tensor q5_a8_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales, const at::Tensor& mins) {
  return a8_linear(Format::kQ5, x, qs, scales, mins);
}

// x float32 [M, K] -> (q int8 [M, K], d float32 [M, K/32], dsum float32 [M, K/32]): the kernels' own activation
// quantization, for tests.
std::tuple<at::Tensor, at::Tensor, at::Tensor> a8_quantize_rows(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() == 2,
              "a8_quantize_rows: x must be CPU float32 [M, K]");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % kBlock == 0, "a8_quantize_rows: K must be a multiple of 32");
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor d = at::empty({M, K / kBlock}, x.options());
  at::Tensor dsum = at::empty({M, K / kBlock}, x.options());
  std::vector<int32_t> isum16(M * (K / 16));
  quantize_rows(x.data_ptr<float>(), M, K, q.data_ptr<int8_t>(), d.data_ptr<float>(), dsum.data_ptr<float>(),
                isum16.data());
  return {q, d, dsum};
}

// "" -> the path in use; a path name (or "auto") -> switch every kernel of the process to it and return it.
std::string cpu_kernel_path(const std::string& name) {
  return kPathNames[name.empty() ? current_path() : set_path(name)];
}

// The paths this CPU runs, best first (the last is "portable").
std::vector<std::string> cpu_kernel_paths() {
  std::vector<std::string> out;
  for (int p = kNumPaths - 1; p >= 0; --p)
    if (cpu_runs(p)) out.emplace_back(kPathNames[p]);
  return out;
}

}  // namespace

namespace inferd_cpu {

int kernel_path() { return current_path(); }

int kernel_level() {
  static const int kLevels[kNumPaths] = {0, 3, 3, 4, 4};  // portable, avx2, avx2-vnni, avx512, avx512-vnni
  return kLevels[current_path()];
}

void a8_check(A8Weight& w) {
  TORCH_CHECK(w.format >= 0 && w.format <= 3, "inferd int8 linear: format must be 0 (q4), 1 (q8), 2 (q6) or 3 (q5)");
  const Format f = static_cast<Format>(w.format);
  const c10::optional<at::Tensor> mins = w.mins ? c10::optional<at::Tensor>(*w.mins) : c10::nullopt;
  check_a8_packed(f, *w.qs, *w.scales, mins, w.in_features);
  w.out_features = w.qs->size(0) * 16;
}

void a8_linear_rows(const A8Weight& w, const float* x, int64_t M, float* y) {
  const Format f = static_cast<Format>(w.format);
  const A8Packed packed{static_cast<const uint8_t*>(w.qs->data_ptr()), w.scales->data_ptr(),
                        w.mins ? w.mins->data_ptr() : nullptr, w.in_features, f,
                        w.scales->scalar_type() == at::kFloat};
  if (M > 0) a8_linear_raw(f, packed, w.qs->size(0), x, M, y);
}

}  // namespace inferd_cpu

TORCH_LIBRARY_FRAGMENT(inferd, m) {
  m.def("q4_a8_linear(Tensor x, Tensor qs, Tensor scales, Tensor mins) -> Tensor");
  m.def("q8_a8_linear(Tensor x, Tensor qs, Tensor scales) -> Tensor");
  m.def("q6_a8_linear(Tensor x, Tensor qs, Tensor scales) -> Tensor");
  m.def("q5_a8_linear(Tensor x, Tensor qs, Tensor scales, Tensor mins) -> Tensor");
  m.def("a8_quantize_rows(Tensor x) -> (Tensor, Tensor, Tensor)");
  m.def("cpu_kernel_path(str name) -> str", &cpu_kernel_path);
  m.def("cpu_kernel_paths() -> str[]", &cpu_kernel_paths);
}

TORCH_LIBRARY_IMPL(inferd, CPU, m) {
  m.impl("q4_a8_linear", &q4_a8_linear);
  m.impl("q8_a8_linear", &q8_a8_linear);
  m.impl("q6_a8_linear", &q6_a8_linear);
  m.impl("q5_a8_linear", &q5_a8_linear);
  m.impl("a8_quantize_rows", &a8_quantize_rows);
}
