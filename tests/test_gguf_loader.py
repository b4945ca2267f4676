"""GGUF loading against transformers' own GGUF loader and the original Hugging Face weights.

Tiny models: a random HF model is written to GGUF here with gguf.GGUFWriter the way llama.cpp's
convert_hf_to_gguf.py does it (HF names -> GGUF names, Q/K rows permuted for the llama architecture, every tensor
quantized with gguf.quants.quantize), in a mix of F32, F16, BF16, Q8_0, Q4_0, Q4_1. The oracles are
transformers.AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) (same bytes, exact weights) and the
original model (within quantization error).

Real model: SmolLM2-135M-Instruct Q4_1 (pulled by the store fixture in conftest.py): greedy tokens vs transformers.
"""

from __future__ import annotations

import inspect
import os
import random

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from gguf.quants import quantize
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, LlamaConfig, Qwen2Config, Qwen3Config

from inferd.layers.paged_driver import PagedDriver
from inferd.models import load_model
from inferd.models.gguf_loader import read_gguf_metadata
from test_model_parity import _TINY as _PARITY_TINY

# The tiny shape of test_model_parity.py; GGUF files carry rms_norm_eps, so it is set explicitly.
_TINY = dict(_PARITY_TINY, rms_norm_eps=1e-5)
CONFIGS = {
    "llama_tied": lambda: LlamaConfig(**_TINY, tie_word_embeddings=True, rope_theta=10000.0),
    "llama": lambda: LlamaConfig(**_TINY, tie_word_embeddings=False, rope_theta=10000.0),
    "qwen2": lambda: Qwen2Config(**_TINY, tie_word_embeddings=False),
    # transformers' GGUF config mapping for qwen3 has no head_dim key, so it assumes Qwen3Config's 128.
    "qwen3": lambda: Qwen3Config(**_TINY, head_dim=128, tie_word_embeddings=False),
}
GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

# GGUF block tensor name and storage type of each HF projection/norm.
_BLOCK_TENSORS = {
    "input_layernorm": ("attn_norm", QType.F32),
    "self_attn.q_proj": ("attn_q", QType.Q8_0),
    "self_attn.k_proj": ("attn_k", QType.Q8_0),
    "self_attn.v_proj": ("attn_v", QType.BF16),
    "self_attn.o_proj": ("attn_output", QType.Q4_0),
    "self_attn.q_norm": ("attn_q_norm", QType.F32),
    "self_attn.k_norm": ("attn_k_norm", QType.F32),
    "post_attention_layernorm": ("ffn_norm", QType.F32),
    "mlp.gate_proj": ("ffn_gate", QType.Q4_1),
    "mlp.up_proj": ("ffn_up", QType.F16),
    "mlp.down_proj": ("ffn_down", QType.Q8_0),
}
_TOP_TENSORS = {
    "model.embed_tokens": ("token_embd", QType.F16),
    "model.norm": ("output_norm", QType.F32),
    "lm_head": ("output", QType.Q8_0),
}
# Max abs weight error allowed vs the original, as a fraction of the tensor's max abs value.
_QUANT_REL_TOL = {
    QType.F32: 0.0,
    QType.F16: 1e-3,
    QType.BF16: 8e-3,
    QType.Q8_0: 1e-2,
    QType.Q4_0: 0.15,
    QType.Q4_1: 0.1,
}


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q_proj / k_proj rows (and biases) for the llama architecture: its
    rope rotates adjacent pairs (x[2i], x[2i+1]) where HF rotates (x[i], x[i + head_dim/2]), so within every
    head the rows [first half; second half] are interleaved into pairs. k_proj uses the kv head count."""
    rest = weight.shape[1:]
    head_dim = weight.shape[0] // num_heads
    return weight.reshape(num_heads, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def gguf_name_and_type(hf_name: str) -> tuple[str, QType]:
    base, _, leaf = hf_name.rpartition(".")
    if base.startswith("model.layers."):
        _, _, layer_id, part = base.split(".", 3)
        gguf_part, qtype = _BLOCK_TENSORS[part]
        name = f"blk.{layer_id}.{gguf_part}.{leaf}"
    else:
        gguf_part, qtype = _TOP_TENSORS[base]
        name = f"{gguf_part}.{leaf}"
    # Biases and 1-D tensors stay F32, as in llama.cpp.
    return name, (QType.F32 if leaf == "bias" else qtype)


def write_gguf(
    hf_model: torch.nn.Module, arch: str, path: str, raw_tensors: dict[str, tuple[np.ndarray, QType]] | None = None
) -> dict[str, QType]:
    """Returns HF name -> the storage type used. raw_tensors: HF name -> (already encoded uint8 rows, type),
    written as they are instead of the model's weight."""
    raw_tensors = raw_tensors or {}
    cfg = hf_model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)
    if arch == "llama":
        writer.add_rope_dimension_count(cfg.head_dim)
    if getattr(cfg, "head_dim", None) is not None:
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    types: dict[str, QType] = {}
    state = hf_model.state_dict()
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        values = tensor.float().numpy()
        if arch == "llama" and ".q_proj." in hf_name:
            values = llama_cpp_permute(values, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            values = llama_cpp_permute(values, cfg.num_key_value_heads)
        name, qtype = gguf_name_and_type(hf_name)
        if hf_name in raw_tensors:
            encoded, qtype = raw_tensors[hf_name]
            writer.add_tensor(name, encoded, raw_dtype=qtype)
            types[hf_name] = qtype
            continue
        if values.ndim == 1:
            qtype = QType.F32
        writer.add_tensor(name, quantize(values, qtype), raw_dtype=None if qtype in (QType.F32, QType.F16) else qtype)
        types[hf_name] = qtype
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


@torch.no_grad()
def hf_next_logits(hf_model: torch.nn.Module, ids: list[int], cache: DynamicCache) -> torch.Tensor:
    """transformers' incremental forward: feed `ids` after what `cache` holds -> logits of the last one [vocab].
    Recent transformers name the cache argument `cache`, older ones `past_key_values`."""
    name = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"
    return hf_model(torch.tensor([ids]), use_cache=True, **{name: cache}).logits[0, -1].float()


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        param.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)


def our_weight(model: torch.nn.Module, hf_name: str) -> torch.Tensor:
    """Our parameter (or the rows of our stacked parameter) holding HF tensor `hf_name`."""
    cfg = model.arch_config
    prefix, _, leaf = hf_name.rpartition(".")
    parent, _, proj = prefix.rpartition(".")
    q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    rows = {
        "q_proj": (0, q),
        "k_proj": (q, kv),
        "v_proj": (q + kv, kv),
        "gate_proj": (0, inter),
        "up_proj": (inter, inter),
    }
    params = dict(model.named_parameters())
    if proj in rows:
        stacked = "qkv_proj" if proj in ("q_proj", "k_proj", "v_proj") else "gate_up_proj"
        return params[f"{parent}.{stacked}.{leaf}"].narrow(0, *rows[proj])
    if hf_name == "lm_head.weight" and model.lm_head is None:
        return params["model.embed_tokens.weight"]
    return params[hf_name]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tiny_gguf_matches_transformers_and_original(name, tmp_path):
    config = CONFIGS[name]()
    arch = GGUF_ARCH[name.split("_")[0]]
    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize_(original, seed=0)
    path = str(tmp_path / "tiny.gguf")
    types = write_gguf(original, arch, path)
    assert {QType.F32, QType.F16, QType.Q8_0} <= set(types.values())

    model, arch_config = load_model(path, "cpu", "float32")
    assert arch_config.tie_word_embeddings == config.tie_word_embeddings
    assert (arch_config.num_heads, arch_config.num_kv_heads, arch_config.head_dim) == (
        config.num_attention_heads,
        config.num_key_value_heads,
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
    )
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32).eval()
    ref_state = reference.state_dict()
    for hf_name, tensor in original.state_dict().items():
        ours = our_weight(model, hf_name)
        # Same bytes, same dequantization, Q/K permutation undone: transformers' weights exactly.
        torch.testing.assert_close(ours, ref_state[hf_name], rtol=0, atol=0, msg=f"{hf_name} vs transformers")
        qtype = types.get(hf_name, types.get("model.embed_tokens.weight"))
        max_err = (ours - tensor).abs().max().item()
        assert max_err <= _QUANT_REL_TOL[qtype] * tensor.abs().max().item(), f"{hf_name} ({qtype.name}): {max_err}"

    ids = [random.Random(1).randrange(config.vocab_size) for _ in range(20)]
    driver = PagedDriver(model, arch_config, num_blocks=8, block_size=8)
    ours = driver.step([("s", ids)])
    with torch.no_grad():
        ref_logits = reference(torch.tensor([ids])).logits[0]
        original_logits = original(torch.tensor([ids])).logits[0]
    assert (ours - ref_logits).abs().max().item() <= 1e-4
    # Quantization moves logits, but stays close to the unquantized model's.
    cos = torch.nn.functional.cosine_similarity(ours, original_logits, dim=-1)
    assert cos.min().item() > 0.95


def random_k_quant_rows(num_rows: int, num_cols: int, qtype: QType, seed: int) -> np.ndarray:
    """Random bytes in a K-quant layout (gguf-py can dequantize but not quantize these types), with the fp16
    super-block scale(s) set small so the weights come out finite and O(0.1)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(num_rows, num_cols // block_size, type_size), dtype=np.uint8)
    if qtype in (QType.Q4_K, QType.Q5_K):  # d (f16), dmin (f16), 12 bytes of 6-bit scales/mins, [32 bytes of
        blocks[..., 0:4] = np.array([1e-4, 1e-4], dtype=np.float16).view(np.uint8)  # fifth bits,] 128 of nibbles
    elif qtype == QType.Q5_1:  # block of 32 = d (f16), m (f16), 4 bytes of fifth bits, 16 bytes of nibbles
        blocks[..., 0:4] = np.array([4e-3, -6e-2], dtype=np.float16).view(np.uint8)
    elif qtype == QType.Q6_K:  # block = 128 bytes low bits, 64 bytes high bits, 16 int8 scales, d (f16)
        blocks[..., 208:210] = np.array([2e-5], dtype=np.float16).view(np.uint8)
    else:
        raise ValueError(qtype)
    return blocks.reshape(num_rows, -1)


def test_k_quant_tensors_match_transformers(tmp_path):
    """Q4_K (on the permuted q_proj) and Q6_K tensors: exactly transformers' dequantized weights."""
    config = LlamaConfig(**{**_TINY, "hidden_size": 256, "intermediate_size": 256}, tie_word_embeddings=True)
    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize_(original, seed=0)
    q_rows, k_rows = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    raw = {
        "model.layers.0.self_attn.q_proj.weight": (random_k_quant_rows(q_rows, 256, QType.Q4_K, 1), QType.Q4_K),
        "model.layers.1.self_attn.k_proj.weight": (random_k_quant_rows(k_rows, 256, QType.Q4_K, 2), QType.Q4_K),
        "model.layers.0.mlp.down_proj.weight": (random_k_quant_rows(256, 256, QType.Q6_K, 3), QType.Q6_K),
    }
    path = str(tmp_path / "tiny.gguf")
    write_gguf(original, "llama", path, raw_tensors=raw)
    model, arch_config = load_model(path, "cpu", "float32")
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32).eval()
    ref_state = reference.state_dict()
    for hf_name in original.state_dict():
        torch.testing.assert_close(our_weight(model, hf_name), ref_state[hf_name], rtol=0, atol=0, msg=hf_name)
    assert 0.01 < ref_state["model.layers.0.mlp.down_proj.weight"].abs().max().item() < 1.0
    ids = [random.Random(4).randrange(config.vocab_size) for _ in range(12)]
    ours = PagedDriver(model, arch_config, num_blocks=4, block_size=8).step([("s", ids)])
    with torch.no_grad():
        assert (ours - reference(torch.tensor([ids])).logits[0]).abs().max().item() <= 1e-4


def test_q5_tensors_stay_in_their_blocks_under_int8_activations(tmp_path):
    """Q5_K (gate / up) and Q5_1 (down) tensors under gguf-int8act: kept as q5 blocks (not dequantized to
    float32), the file's exact weights (transformers' dequantization), and logits within the int8 activation
    rounding's reach of transformers' on the same file."""
    from inferd.quant import QuantLinear

    config = LlamaConfig(**{**_TINY, "hidden_size": 256, "intermediate_size": 256}, tie_word_embeddings=True)
    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize_(original, seed=0)
    raw = {}
    for layer in range(config.num_hidden_layers):
        for i, (proj, qtype) in enumerate([("gate_proj", QType.Q5_K), ("up_proj", QType.Q5_K),
                                           ("down_proj", QType.Q5_1)]):
            raw[f"model.layers.{layer}.mlp.{proj}.weight"] = (random_k_quant_rows(256, 256, qtype, 10 * layer + i), qtype)
    path = str(tmp_path / "tiny.gguf")
    write_gguf(original, "llama", path, raw_tensors=raw)
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32).eval()
    ref_state = reference.state_dict()
    model, arch_config = load_model(path, "cpu", "float32", quantization="gguf-int8act")
    for layer in range(config.num_hidden_layers):
        mlp = model.model.layers[layer].mlp
        assert isinstance(mlp.gate_up_proj, QuantLinear) and isinstance(mlp.down_proj, QuantLinear)
        assert (mlp.gate_up_proj.kind, mlp.down_proj.kind) == ("q5", "q5")
        gate_up = torch.cat([ref_state[f"model.layers.{layer}.mlp.{p}.weight"] for p in ("gate_proj", "up_proj")])
        assert torch.equal(mlp.gate_up_proj.dequantized_weight(), gate_up)
        assert torch.equal(mlp.down_proj.dequantized_weight(), ref_state[f"model.layers.{layer}.mlp.down_proj.weight"])
    ids = [random.Random(5).randrange(config.vocab_size) for _ in range(12)]
    ours = PagedDriver(model, arch_config, num_blocks=4, block_size=8).step([("s", ids)])
    with torch.no_grad():
        ref_logits = reference(torch.tensor([ids])).logits[0]
    # Measured: ~1-2% of the largest logit (the activations' int8 rounding); a wrong layout or scale is far off.
    assert (ours - ref_logits).abs().max().item() <= 0.05 * ref_logits.abs().max().item()


def test_read_gguf_metadata_decodes_values(tmp_path):
    original = AutoModelForCausalLM.from_config(CONFIGS["llama"](), dtype=torch.float32)
    path = str(tmp_path / "tiny.gguf")
    write_gguf(original, "llama", path)
    metadata = read_gguf_metadata(path)
    assert metadata["general.architecture"] == "llama"
    assert metadata["general.name"] == "tiny-llama"
    assert metadata["llama.block_count"] == 2
    assert metadata["llama.attention.head_count_kv"] == 2
    assert metadata["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert metadata["tokenizer.ggml.bos_token_id"] == 1


# ---- the real default model ---------------------------------------------------------------------------------


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Water boils at a temperature of",
    "1, 2, 3, 4, 5,",
    "The three primary colors are",
]
CHAT_PROMPTS = ["What is the tallest mountain on Earth?", "Write a haiku about autumn leaves."]


@pytest.fixture
def one_torch_thread():
    """Intra-op threads = 1 for the duration of a test: on a shared 2-core CI machine OpenMP's spinning
    workers make every small op of two 135M models stall (10x slower measured) when another process runs."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@torch.no_grad()
def test_default_model_greedy_tokens_match_transformers(default_gguf_path, one_torch_thread):
    model_dir, gguf_file = os.path.split(str(default_gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_file)
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    for message in CHAT_PROMPTS:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    num_new_tokens = 48

    reference = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file, dtype=torch.float32).eval()
    expected = []
    for ids in prompts:
        cache = DynamicCache(config=reference.config)
        logits = hf_next_logits(reference, ids, cache)
        tokens = []
        for _ in range(num_new_tokens):
            tokens.append(int(logits.argmax()))
            logits = hf_next_logits(reference, tokens[-1:], cache)
        expected.append(tokens)
    del reference

    model, arch_config = load_model(default_gguf_path, "cpu", "float32")
    driver = PagedDriver(model, arch_config, num_blocks=64, block_size=16)
    keys = [str(i) for i in range(len(prompts))]
    # All prompts in one prefill step, then one batched decode step per token.
    logits = driver.step(list(zip(keys, prompts, strict=True)))
    last_rows = np.cumsum([len(p) for p in prompts]) - 1
    next_ids = [int(logits[row].argmax()) for row in last_rows]
    generated = [[t] for t in next_ids]
    for _ in range(num_new_tokens - 1):
        logits = driver.step([(k, [t]) for k, t in zip(keys, next_ids, strict=True)])
        next_ids = [int(row.argmax()) for row in logits]
        for tokens, t in zip(generated, next_ids, strict=True):
            tokens.append(t)
    for prompt_text, ours, theirs in zip(PROMPTS + CHAT_PROMPTS, generated, expected, strict=True):
        assert ours == theirs, f"prompt {prompt_text!r}: {tokenizer.decode(ours)!r} != {tokenizer.decode(theirs)!r}"
