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
// Threads: torch's intra-op pool (at::parallel_for, compiled with -fopenmp against the libgomp torch loads).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
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

// ---- portable path (any x86 or ARM CPU): dequantize a tile into a buffer, then multiply ---------------------

template <Format F>
void dequant_tile(const Packed& w, int64_t t, float* out /* [16, K] row-major */) {
  const int64_t K = w.K;
  const Half* s = w.scales + t * w.scale_tile_floats();
  const Half* mn = w.mins ? w.mins + t * w.scale_tile_floats() : nullptr;
  if constexpr (F == Format::kQ4) {
    const uint8_t* q = w.qs + t * w.qs_tile_bytes();
    for (int64_t p = 0; p < K / 2; ++p) {
      const int64_t b = 2 * p / kBlock;
      for (int j = 0; j < kTile; ++j) {
        const uint8_t byte = q[p * kTile + j];
        const float sj = static_cast<float>(s[b * kTile + j]), mj = static_cast<float>(mn[b * kTile + j]);
        out[j * K + 2 * p] = std::fma(sj, static_cast<float>(byte & 0x0F), mj);
        out[j * K + 2 * p + 1] = std::fma(sj, static_cast<float>(byte >> 4), mj);
      }
    }
  } else {
    const int8_t* q = reinterpret_cast<const int8_t*>(w.qs) + t * K * kTile;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t b = k / kBlock;
      for (int j = 0; j < kTile; ++j)
        out[j * K + k] = static_cast<float>(s[b * kTile + j]) * static_cast<float>(q[k * kTile + j]);
    }
  }
}

template <Format F>
void tiles_generic(const float* x, int64_t M, const Packed& w, int64_t t0, int64_t t1, float* y, int64_t N) {
  const int64_t K = w.K;
  std::vector<float> buf(kTile * K);
  for (int64_t t = t0; t < t1; ++t) {
    dequant_tile<F>(w, t, buf.data());
    for (int64_t m = 0; m < M; ++m) {
      for (int j = 0; j < kTile; ++j) {
        float acc = 0.f;
        const float* wr = buf.data() + j * K;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < K; ++k) acc += x[m * K + k] * wr[k];
        y[m * N + t * kTile + j] = acc;
      }
    }
  }
}

#if defined(__AVX512F__)
// ---- AVX-512 path ------------------------------------------------------------------------------------------

inline __m512 load_half16(const Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Weights k0 and k0 + 1 (k0 even) of the 16 rows of tile t, given the tile's scale (and min) vectors of k0's
// block.
template <Format F>
inline void dequant_pair(const Packed& w, int64_t t, int64_t k0, __m512 scale, __m512 min, __m512& w0, __m512& w1) {
  if constexpr (F == Format::kQ4) {
    const __m128i nibble = _mm_set1_epi8(0x0F);
    const __m128i packed =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.qs + t * w.qs_tile_bytes() + (k0 / 2) * kTile));
    const __m128i lo = _mm_and_si128(packed, nibble);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), nibble);
    w0 = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), min);
    w1 = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), min);
  } else {
    const uint8_t* q = w.qs + t * w.K * kTile + k0 * kTile;
    w0 = _mm512_mul_ps(scale, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)))));
    w1 = _mm512_mul_ps(scale, _mm512_cvtepi32_ps(
                                  _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + kTile)))));
  }
}

// Tile t dequantized into columns [16t, 16t + 16) of out [K, N] (the transpose of W, row-major).
template <Format F>
void dequant_tile_t(const Packed& w, int64_t t, float* out, int64_t N) {
  for (int64_t b = 0; b < w.K / kBlock; ++b) {
    const __m512 scale = load_half16(w.scales + t * w.scale_tile_floats() + b * kTile);
    const __m512 min = F == Format::kQ4 ? load_half16(w.mins + t * w.scale_tile_floats() + b * kTile) : scale;
    for (int64_t p = 0; p < kBlock / 2; ++p) {
      const int64_t k0 = b * kBlock + 2 * p;
      __m512 w0, w1;
      dequant_pair<F>(w, t, k0, scale, min, w0, w1);
      _mm512_storeu_ps(out + k0 * N + t * kTile, w0);
      _mm512_storeu_ps(out + (k0 + 1) * N + t * kTile, w1);
    }
  }
}
#else
template <Format F>
void dequant_tile_t(const Packed& w, int64_t t, float* out, int64_t N) {
  std::vector<float> buf(kTile * w.K);
  dequant_tile<F>(w, t, buf.data());
  for (int j = 0; j < kTile; ++j)
    for (int64_t k = 0; k < w.K; ++k) out[k * N + t * kTile + j] = buf[j * w.K + k];
}
#endif

#if defined(__AVX512F__)
// TILES tiles x MT activation rows; SPLIT accumulators per output vector (even / odd k) when the chains would
// otherwise be latency-bound (few rows). Every loop bound is a compile-time constant, so accumulators stay in
// registers: TILES * MT * SPLIT <= 16.
template <Format F, int TILES, int MT, int SPLIT>
inline void kernel_avx512(const float* x, int64_t x_stride, const Packed& w, int64_t t, float* y, int64_t N) {
  const int64_t K = w.K;
  __m512 acc[SPLIT][TILES][MT];
  for (int s = 0; s < SPLIT; ++s)
    for (int i = 0; i < TILES; ++i)
      for (int m = 0; m < MT; ++m) acc[s][i][m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < K / kBlock; ++b) {
    __m512 scale[TILES], min[TILES];
    for (int i = 0; i < TILES; ++i) {
      scale[i] = load_half16(w.scales + (t + i) * w.scale_tile_floats() + b * kTile);
      min[i] = F == Format::kQ4 ? load_half16(w.mins + (t + i) * w.scale_tile_floats() + b * kTile) : scale[i];
    }
    for (int64_t p = 0; p < kBlock / 2; ++p) {  // two k per step: k0 = 32b + 2p, k0 + 1
      const int64_t k0 = b * kBlock + 2 * p;
      __m512 w0[TILES], w1[TILES];
      for (int i = 0; i < TILES; ++i) dequant_pair<F>(w, t + i, k0, scale[i], min[i], w0[i], w1[i]);
      for (int m = 0; m < MT; ++m) {
        const __m512 x0 = _mm512_set1_ps(x[m * x_stride + k0]);
        const __m512 x1 = _mm512_set1_ps(x[m * x_stride + k0 + 1]);
        for (int i = 0; i < TILES; ++i) {
          acc[0][i][m] = _mm512_fmadd_ps(x0, w0[i], acc[0][i][m]);
          acc[SPLIT - 1][i][m] = _mm512_fmadd_ps(x1, w1[i], acc[SPLIT - 1][i][m]);
        }
      }
    }
  }
  for (int i = 0; i < TILES; ++i)
    for (int m = 0; m < MT; ++m) {
      __m512 sum = acc[0][i][m];
      if constexpr (SPLIT == 2) sum = _mm512_add_ps(sum, acc[1][i][m]);
      _mm512_storeu_ps(y + m * N + (t + i) * kTile, sum);
    }
}

// ---- many activation rows (prefill): dequantize a tile pair once, then a register-blocked GEMM --------------
//
// With many rows the fused kernel would dequantize every block once per group of rows. Here a pair of tiles
// (32 output rows) is unpacked into wbuf [K, 32] (L2-resident), and MR activation rows at a time run against it:
// 2 * MR accumulators, per k two weight loads and MR broadcasts for 2 * MR FMAs.

template <int MR>
inline void gemm_rows_avx512(const float* x, int64_t K, const float* wbuf, float* y, int64_t N, int64_t col) {
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 wa = _mm512_loadu_ps(wbuf + k * 32);
    const __m512 wb = _mm512_loadu_ps(wbuf + k * 32 + 16);
    for (int r = 0; r < MR; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * K + k]);
      acc[r][0] = _mm512_fmadd_ps(xb, wa, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(xb, wb, acc[r][1]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_ps(y + r * N + col, acc[r][0]);
    _mm512_storeu_ps(y + r * N + col + 16, acc[r][1]);
  }
}

// Tile pairs starting at even t in [t0, t1) (t1 - t0 even), all M rows. Rows go in blocks of kRowBlock, whose
// activations stay in L2 while every tile pair of [t0, t1) passes (each pair is unpacked again per row block:
// cheap next to the 2 * 16 * K * kRowBlock FMAs it feeds).
constexpr int64_t kRowBlock = 96;

template <Format F>
void tiles_blocked_avx512(const float* x, int64_t M, const Packed& w, int64_t t0, int64_t t1, float* y, int64_t N) {
  const int64_t K = w.K;
  std::vector<float> wbuf(K * 32);
  for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
    const int64_t m1 = std::min(M, m0 + kRowBlock);
    for (int64_t t = t0; t < t1; t += 2) {
      for (int i = 0; i < 2; ++i) {  // unpack tiles t, t+1 into wbuf columns [16i, 16i + 16)
        for (int64_t b = 0; b < K / kBlock; ++b) {
          const __m512 scale = load_half16(w.scales + (t + i) * w.scale_tile_floats() + b * kTile);
          const __m512 min =
              F == Format::kQ4 ? load_half16(w.mins + (t + i) * w.scale_tile_floats() + b * kTile) : scale;
          for (int64_t p = 0; p < kBlock / 2; ++p) {
            const int64_t k0 = b * kBlock + 2 * p;
            __m512 w0, w1;
            dequant_pair<F>(w, t + i, k0, scale, min, w0, w1);
            _mm512_storeu_ps(wbuf.data() + k0 * 32 + 16 * i, w0);
            _mm512_storeu_ps(wbuf.data() + (k0 + 1) * 32 + 16 * i, w1);
          }
        }
      }
      const int64_t col = t * kTile;
      int64_t m = m0;
      for (; m + 12 <= m1; m += 12) gemm_rows_avx512<12>(x + m * K, K, wbuf.data(), y + m * N, N, col);
      for (; m + 4 <= m1; m += 4) gemm_rows_avx512<4>(x + m * K, K, wbuf.data(), y + m * N, N, col);
      for (; m < m1; ++m) gemm_rows_avx512<1>(x + m * K, K, wbuf.data(), y + m * N, N, col);
    }
  }
}

// Tiles [t0, t1) for every activation row: rows in groups of 16 / 8 / 4 / 2 / 1.
template <Format F>
void tiles_avx512(const float* x, int64_t M, const Packed& w, int64_t t0, int64_t t1, float* y, int64_t N) {
  const int64_t K = w.K;
  int64_t t = t0;
  for (; t < t1; t += 2) {
    const bool pair = t + 1 < t1;
    int64_t m = 0;
    for (; m + 16 <= M; m += 16) {
      kernel_avx512<F, 1, 16, 1>(x + m * K, K, w, t, y + m * N, N);
      if (pair) kernel_avx512<F, 1, 16, 1>(x + m * K, K, w, t + 1, y + m * N, N);
    }
    for (; m + 8 <= M; m += 8) {
      kernel_avx512<F, 1, 8, 2>(x + m * K, K, w, t, y + m * N, N);
      if (pair) kernel_avx512<F, 1, 8, 2>(x + m * K, K, w, t + 1, y + m * N, N);
    }
    for (; m + 4 <= M; m += 4) {
      if (pair) kernel_avx512<F, 2, 4, 1>(x + m * K, K, w, t, y + m * N, N);
      else kernel_avx512<F, 1, 4, 2>(x + m * K, K, w, t, y + m * N, N);
    }
    for (; m + 2 <= M; m += 2) {
      if (pair) kernel_avx512<F, 2, 2, 2>(x + m * K, K, w, t, y + m * N, N);
      else kernel_avx512<F, 1, 2, 2>(x + m * K, K, w, t, y + m * N, N);
    }
    for (; m < M; ++m) {
      if (pair) kernel_avx512<F, 2, 1, 2>(x + m * K, K, w, t, y + m * N, N);
      else kernel_avx512<F, 1, 1, 2>(x + m * K, K, w, t, y + m * N, N);
    }
  }
}
#endif

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
#if defined(__AVX512F__)
    if (M >= kBlockedMinRows && (t1 - t0) % 2 == 0) {
      tiles_blocked_avx512<F>(xp, M, w, t0, t1, yp, N);
    } else {
      tiles_avx512<F>(xp, M, w, t0, t1, yp, N);
    }
#else
    tiles_generic<F>(xp, M, w, t0, t1, yp, N);
#endif
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
    for (int64_t t = t0; t < t1; ++t) dequant_tile_t<F>(w, t, op, N);
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

bool has_avx512() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

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
