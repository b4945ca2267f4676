// inferd CPU kernels: a Llama-family decoder's layers in one call (decoder_layers), for models whose four
// projections per layer are int8-activation block-quantized linears (QuantLinear "+a8"). One step of a 30-layer
// model is then one op instead of ~20 torch ops per layer, whose dispatch, allocation and Python glue cost ~1.5 ms
// of an ~8 ms single-stream decode step.
//
// Per layer, for T new tokens (any mix of decode and prefill rows: attention treats every token as a decode row
// whose causal limit is its own position, as layers/attention.py does on CPU):
//   x = rms_norm(h + residual)                    (layer 0: residual = h, x = rms_norm(h))
//   qkv = x @ Wqkv^T (+ bias); RoPE on q and k; K/V rows written to the cache slots
//   a = attention(q, paged K/V)
//   x = rms_norm(a @ Wo^T (+ bias) + residual)
//   h = silu_mul(x @ Wgate_up^T (+ bias)) @ Wdown^T (+ bias)
// and at the end rms_norm(h + residual) with the final norm. Every stage calls the same row functions as the
// single ops (inferd_cpu.h), so the result has the same bits as the op-by-op path (tests/test_fused_decoder.py).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "inferd_cpu.h"

namespace {

// Per layer: input norm weight, post-attention norm weight, then qs, scales, mins, bias for each of the four
// projections (qkv, o, gate_up, down); an absent mins / bias is an empty tensor.
constexpr int64_t kTensorsPerLayer = 2 + 4 * 4;
// Per layer: the block format of each projection (0: q4, 1: q8, 2: q6, 3: q5), then the sliding window (0: none).
constexpr int64_t kIntsPerLayer = 5;

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), "decoder_layers: ", name,
              " must be a contiguous CPU float32 tensor");
}

struct Projection {
  inferd_cpu::A8Weight weight;
  const float* bias;  // nullptr: none
};

Projection projection(at::TensorList tensors, int64_t base, int64_t format, int64_t in_features,
                      int64_t out_features, const char* name) {
  const at::Tensor& mins = tensors[base + 2];
  const at::Tensor& bias = tensors[base + 3];
  Projection p{{format, &tensors[base], &tensors[base + 1], mins.numel() ? &mins : nullptr, in_features, 0},
               nullptr};
  inferd_cpu::a8_check(p.weight);
  TORCH_CHECK(p.weight.out_features == out_features, "decoder_layers: ", name, " has ", p.weight.out_features,
              " output features, expected ", out_features);
  if (bias.numel()) {
    check_f32(bias, "a bias");
    TORCH_CHECK(bias.numel() == out_features, "decoder_layers: ", name, "'s bias has the wrong size");
    p.bias = bias.data_ptr<float>();
  }
  return p;
}

void linear(const Projection& p, const float* x, int64_t T, float* y) {
  inferd_cpu::a8_linear_rows(p.weight, x, T, y);
  if (p.bias == nullptr) return;
  const int64_t n = p.weight.out_features;
  for (int64_t t = 0; t < T; ++t) {
    float* row = y + t * n;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) row[i] += p.bias[i];
  }
}

// hidden [T, hidden_size] (the embeddings of the new tokens), kv_caches: one [2, num_blocks, block_size, Hkv, D]
// per layer (their count is the number of layers run), cos / signed_sin [T, 1, D], slot_mapping [T],
// block_tables [T, max_blocks] and seq_lens [T]: each token's own block table and the number of keys it sees.
// -> final_norm(h + residual) [T, hidden_size].
at::Tensor decoder_layers(const at::Tensor& hidden, at::TensorList tensors, at::IntArrayRef ints,
                          at::TensorList kv_caches,
                          const at::Tensor& cos_in, const at::Tensor& signed_sin_in, const at::Tensor& slot_mapping_in,
                          const at::Tensor& block_tables_in, const at::Tensor& seq_lens_in, const at::Tensor& final_norm,
                          int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t intermediate_size,
                          double eps_in, double scale_in) {
  check_f32(hidden, "hidden");
  check_f32(final_norm, "the final norm weight");
  TORCH_CHECK(hidden.dim() == 2, "decoder_layers: hidden must be [T, hidden_size]");
  const int64_t num_layers = static_cast<int64_t>(kv_caches.size());
  TORCH_CHECK(static_cast<int64_t>(tensors.size()) >= num_layers * kTensorsPerLayer &&
                  static_cast<int64_t>(ints.size()) >= num_layers * kIntsPerLayer,
              "decoder_layers: fewer layer tensors / ints than KV caches");
  const int64_t T = hidden.size(0), hidden_size = hidden.size(1);
  const int64_t H = num_heads, Hkv = num_kv_heads, D = head_dim, I = intermediate_size;
  TORCH_CHECK(H % Hkv == 0 && D % 2 == 0 && final_norm.numel() == hidden_size, "decoder_layers: bad head shapes");
  const int64_t q_width = H * D, kv_width = Hkv * D, qkv_width = q_width + 2 * kv_width;
  const at::Tensor cos = cos_in.contiguous(), signed_sin = signed_sin_in.contiguous();
  check_f32(cos, "cos");
  check_f32(signed_sin, "signed_sin");
  TORCH_CHECK(cos.numel() == T * D && signed_sin.numel() == T * D, "decoder_layers: cos / sin must be [T, 1, D]");
  const at::Tensor slot_mapping = slot_mapping_in.contiguous();
  const at::Tensor block_tables = block_tables_in.contiguous();
  const at::Tensor seq_lens = seq_lens_in.contiguous();
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && block_tables.scalar_type() == at::kLong &&
                  seq_lens.scalar_type() == at::kLong && slot_mapping.numel() == T && seq_lens.numel() == T &&
                  block_tables.dim() == 2 && block_tables.size(0) == T,
              "decoder_layers: slot_mapping [T], block_tables [T, max_blocks], seq_lens [T], all int64");
  const float eps = static_cast<float>(eps_in), scale = static_cast<float>(scale_in);

  // Scratch, [T, width] each: the residual stream, normed input, qkv, attention output, gate_up, activation, h.
  const auto opts = hidden.options();
  at::Tensor residual = hidden.clone();
  at::Tensor normed = at::empty({T, hidden_size}, opts);
  at::Tensor qkv = at::empty({T, qkv_width}, opts);
  at::Tensor attn = at::empty({T, q_width}, opts);
  at::Tensor gate_up = at::empty({T, 2 * I}, opts);
  at::Tensor act = at::empty({T, I}, opts);
  at::Tensor h = at::empty({T, hidden_size}, opts);
  float* rp = residual.data_ptr<float>();
  float* xp = normed.data_ptr<float>();
  float* qkvp = qkv.data_ptr<float>();
  float* ap = attn.data_ptr<float>();
  float* gup = gate_up.data_ptr<float>();
  float* actp = act.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();

  for (int64_t l = 0; l < num_layers; ++l) {
    const int64_t tb = l * kTensorsPerLayer;
    const int64_t* li = ints.data() + l * kIntsPerLayer;
    const at::Tensor& in_norm = tensors[tb];
    const at::Tensor& post_norm = tensors[tb + 1];
    check_f32(in_norm, "a norm weight");
    check_f32(post_norm, "a norm weight");
    TORCH_CHECK(in_norm.numel() == hidden_size && post_norm.numel() == hidden_size, "decoder_layers: norm size");
    const Projection qkv_proj = projection(tensors, tb + 2, li[0], hidden_size, qkv_width, "qkv_proj");
    const Projection o_proj = projection(tensors, tb + 6, li[1], q_width, hidden_size, "o_proj");
    const Projection gate_up_proj = projection(tensors, tb + 10, li[2], hidden_size, 2 * I, "gate_up_proj");
    const Projection down_proj = projection(tensors, tb + 14, li[3], I, hidden_size, "down_proj");
    const at::Tensor& kv = kv_caches[l];
    TORCH_CHECK(kv.device().is_cpu() && kv.scalar_type() == at::kFloat && kv.is_contiguous() && kv.dim() == 5 &&
                    kv.size(0) == 2 && kv.size(3) == Hkv && kv.size(4) == D,
                "decoder_layers: each KV cache must be a contiguous float32 [2, num_blocks, block_size, Hkv, D]");
    const int64_t num_blocks = kv.size(1), block_size = kv.size(2);
    const int64_t num_slots = num_blocks * block_size;

    if (l == 0) inferd_cpu::rms_norm_rows(rp, in_norm.data_ptr<float>(), eps, T, hidden_size, xp);
    else inferd_cpu::add_rms_norm_rows(hp, rp, in_norm.data_ptr<float>(), eps, T, hidden_size, xp, rp);

    linear(qkv_proj, xp, T, qkvp);
    inferd_cpu::rotary_rows(qkvp, T, qkv_width, cos.data_ptr<float>(), signed_sin.data_ptr<float>(), H + Hkv, D);
    float* kp = kv.data_ptr<float>();
    float* vp = kp + num_slots * kv_width;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t slot = slots[t];
      TORCH_CHECK(slot >= 0 && slot < num_slots, "decoder_layers: slot ", slot, " out of the cache's range");
      std::memcpy(kp + slot * kv_width, qkvp + t * qkv_width + q_width, kv_width * sizeof(float));
      std::memcpy(vp + slot * kv_width, qkvp + t * qkv_width + q_width + kv_width, kv_width * sizeof(float));
    }
    inferd_cpu::paged_attention_rows(qkvp, qkv_width, T, H, D, kp, num_blocks, block_size, Hkv,
                                     block_tables.data_ptr<int64_t>(), block_tables.size(1),
                                     seq_lens.data_ptr<int64_t>(), scale, li[4], ap);
    linear(o_proj, ap, T, hp);
    inferd_cpu::add_rms_norm_rows(hp, rp, post_norm.data_ptr<float>(), eps, T, hidden_size, xp, rp);

    linear(gate_up_proj, xp, T, gup);
    inferd_cpu::silu_mul_rows(gup, T, I, actp);
    linear(down_proj, actp, T, hp);
  }
  at::Tensor out = at::empty({T, hidden_size}, opts);
  if (num_layers == 0) {
    inferd_cpu::rms_norm_rows(rp, final_norm.data_ptr<float>(), eps, T, hidden_size, out.data_ptr<float>());
  } else {
    inferd_cpu::add_rms_norm_rows(hp, rp, final_norm.data_ptr<float>(), eps, T, hidden_size, out.data_ptr<float>(),
                                  rp);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(inferd, m) {
  m.def("decoder_layers(Tensor hidden, Tensor[] layer_tensors, int[] layer_ints, Tensor(a!)[] kv_caches, "
        "Tensor cos, Tensor signed_sin, Tensor slot_mapping, Tensor block_tables, Tensor seq_lens, "
        "Tensor final_norm, int num_heads, int num_kv_heads, int head_dim, int intermediate_size, float eps, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(inferd, CPU, m) {
  m.impl("decoder_layers", &decoder_layers);
}
