// inferd CPU kernels: y = x @ W^T with W kept block-quantized (blocks of 32 weights along the input dimension K),
// so that a decode step streams 0.75 (q4) or 1.125 (q8) bytes per weight instead of 4. Activations and
// accumulation stay float32.
//
// Packed layout: output rows n are grouped in tiles of 16 (N % 16 == 0). Inside a tile, one vector load gives the
// same k for 16 rows, so a weight vector is multiplied by a broadcast activation and the 16 lanes accumulate 16
// different outputs: no horizontal sums, and one dequantized vector serves every activation row of the batch.
//   q4: qs     uint8 [N/16, K/2, 16]  byte [t, p, j] = q[16t+j, 2p] | q[16t+j, 2p+1] << 4, q in 0..15
//       scales f16   [N/16, K/32, 16] ; mins f16 [N/16, K/32, 16]   w = scale * q + min
//   q8: qs     int8  [N/16, K, 16]    q[16t+j, k], q in -127..127
//       scales f16   [N/16, K/32, 16]                                w = scale * q
// Scales and mins are float16, as GGUF stores them (a decode step is bound by memory bandwidth: float32 scales
// would add 0.125 bytes per weight to the 0.5 of a q4 nibble).
// Dequantizing with one fused multiply-add gives bit for bit the float32 weights of llama.cpp's and gguf-py's
// Q4_0 / Q4_1 / Q8_0 dequantizers (scale * q is exact in float32; one rounding for + min), so only the order of
// the float32 summation differs from a matmul on the dequantized weights.
//
// The kernels are in quant_linear_body.inc, compiled here once per code level (inferd_cpu.h): AVX-512 at
// x86-64-v4, the portable kernels vectorized by the compiler below it.
//
// Threads: torch's intra-op pool (at::parallel_for, compiled with -fopenmp against the libgomp torch loads).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "inferd_cpu.h"

#if defined(INFERD_X86)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 32;  // weights per scale along K
constexpr int64_t kTile = 16;   // output rows per tile
// From this many activation rows on, unpack-once + register-blocked GEMM beats dequantizing in registers per
// group of rows (benchmarks/quant_kernels.py).
constexpr int64_t kBlockedMinRows = 17;

enum class Format { kQ4, kQ8 };

using Half = c10::Half;

struct Packed {
  const uint8_t* qs;
  const Half* scales;
  const Half* mins;  // nullptr for q8
  int64_t K;
  // Bytes of qs per tile and floats of scales per tile.
  int64_t qs_tile_bytes() const { return K / 2 * kTile; }
  int64_t scale_tile_floats() const { return K / kBlock * kTile; }
};


#define INFERD_LEVEL_BODY "quant_linear_body.inc"
#include "per_level.inc"

void linear_tiles(Format f, const float* x, int64_t M, const Packed& w, int64_t t0, int64_t t1, float* y, int64_t N) {
  INFERD_LEVEL_CALL(linear_tiles, f, x, M, w, t0, t1, y, N)
}

void dequant_tiles_t(Format f, const Packed& w, int64_t t0, int64_t t1, float* out, int64_t N) {
  INFERD_LEVEL_CALL(dequant_tiles_t, f, w, t0, t1, out, N)
}


template <Format F>
Packed check_packed(const at::Tensor& qs, const at::Tensor& scales, const c10::optional<at::Tensor>& mins,
                    int64_t K) {
  TORCH_CHECK(qs.device().is_cpu() && scales.device().is_cpu(), "inferd quant linear: CPU tensors only");
  TORCH_CHECK(K % kBlock == 0, "inferd quant linear: input features must be a multiple of 32, got ", K);
  TORCH_CHECK(qs.is_contiguous() && qs.dim() == 3 && qs.size(2) == kTile, "qs must be contiguous [N/16, *, 16]");
  const int64_t num_tiles = qs.size(0);
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() &&
                  scales.sizes() == at::IntArrayRef({num_tiles, K / kBlock, kTile}),
              "scales must be contiguous float16 [N/16, K/32, 16]");
  Packed w{static_cast<const uint8_t*>(qs.data_ptr()), scales.data_ptr<Half>(), nullptr, K};
  if constexpr (F == Format::kQ4) {
    TORCH_CHECK(qs.scalar_type() == at::kByte && qs.size(1) == K / 2, "q4: qs must be uint8 [N/16, K/2, 16]");
    TORCH_CHECK(mins.has_value() && mins->sizes() == scales.sizes() && mins->scalar_type() == at::kHalf &&
                    mins->is_contiguous(), "q4: mins must be contiguous float16 [N/16, K/32, 16]");
    w.mins = mins->data_ptr<Half>();
  } else {
    TORCH_CHECK(qs.scalar_type() == at::kChar && qs.size(1) == K, "q8: qs must be int8 [N/16, K, 16]");
  }
  return w;
}

template <Format F>
at::Tensor quant_linear(const at::Tensor& x_in, const at::Tensor& qs, const at::Tensor& scales,
                        const c10::optional<at::Tensor>& mins) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat, "inferd quant linear: x must be CPU float32");
  const int64_t K = x_in.size(-1);
  const Packed w = check_packed<F>(qs, scales, mins, K);
  const int64_t num_tiles = qs.size(0);
  const int64_t N = num_tiles * kTile;
  const at::Tensor x = x_in.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Grain in tiles: even, so that tile pairs never straddle two threads.
  at::parallel_for(0, (num_tiles + 1) / 2, 4, [&](int64_t p0, int64_t p1) {
    const int64_t t0 = 2 * p0;
    const int64_t t1 = std::min(num_tiles, 2 * p1);
    linear_tiles(F, xp, M, w, t0, t1, yp, N);
  });
  return y.view(out_shape);
}

// -> W^T, float32 [K, N] row-major (the layout the tiles unpack to with plain vector stores; a GEMM takes the
// transpose for free).
template <Format F>
at::Tensor dequantize_t(const at::Tensor& qs, const at::Tensor& scales, const c10::optional<at::Tensor>& mins) {
  const int64_t K = scales.size(1) * kBlock;
  const Packed w = check_packed<F>(qs, scales, mins, K);
  const int64_t num_tiles = qs.size(0);
  const int64_t N = num_tiles * kTile;
  at::Tensor out = at::empty({K, N}, scales.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  at::parallel_for(0, num_tiles, 8, [&](int64_t t0, int64_t t1) {
    dequant_tiles_t(F, w, t0, t1, op, N);
  });
  return out;
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales, const at::Tensor& mins) {
  return quant_linear<Format::kQ4>(x, qs, scales, mins);
}
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales) {
  return quant_linear<Format::kQ8>(x, qs, scales, c10::nullopt);
}
at::Tensor q4_dequantize_t(const at::Tensor& qs, const at::Tensor& scales, const at::Tensor& mins) {
  return dequantize_t<Format::kQ4>(qs, scales, mins);
}
at::Tensor q8_dequantize_t(const at::Tensor& qs, const at::Tensor& scales) {
  return dequantize_t<Format::kQ8>(qs, scales, c10::nullopt);
}

// Whether the kernel path in use has the AVX-512 float-activation kernels (an avx512 path on an AVX-512 CPU).
bool has_avx512() { return inferd_cpu::kernel_level() >= 4; }

}  // namespace

TORCH_LIBRARY(inferd, m) {
  m.def("q4_linear(Tensor x, Tensor qs, Tensor scales, Tensor mins) -> Tensor");
  m.def("q8_linear(Tensor x, Tensor qs, Tensor scales) -> Tensor");
  m.def("q4_dequantize_t(Tensor qs, Tensor scales, Tensor mins) -> Tensor");
  m.def("q8_dequantize_t(Tensor qs, Tensor scales) -> Tensor");
  m.def("has_avx512() -> bool", &has_avx512);
}

TORCH_LIBRARY_IMPL(inferd, CPU, m) {
  m.impl("q4_linear", &q4_linear);
  m.impl("q8_linear", &q8_linear);
  m.impl("q4_dequantize_t", &q4_dequantize_t);
  m.impl("q8_dequantize_t", &q8_dequantize_t);
}
