"""Our model classes + HF loader + paged attention against Hugging Face transformers, on tiny random models.

Reference: transformers' own implementation of each architecture, fed the same safetensors checkpoint, in
float32. Every parameter (norm weights and biases included) is randomised so that a mis-mapped tensor shows.
"""

from __future__ import annotations

import inspect
import random

import pytest
import torch
from transformers import (AutoModelForCausalLM, DynamicCache, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config,
                          Qwen3Config)

from inferd.layers.attention import allocate_kv_caches, kv_cache_bytes_per_block
from inferd.layers.paged_driver import PagedDriver
from inferd.models import get_model_class, load_model
from inferd.models.arch_config import arch_config_from_hf

LOGITS_ATOL = 1e-4
BLOCK_SIZE = 8

_TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)

CONFIGS = {
    "llama": lambda: LlamaConfig(**_TINY, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "llama_bias": lambda: LlamaConfig(**_TINY, attention_bias=True, mlp_bias=True),
    "qwen2": lambda: Qwen2Config(**_TINY),  # q/k/v bias
    "qwen3": lambda: Qwen3Config(**_TINY, head_dim=16),  # q/k RMSNorm
    "mistral": lambda: MistralConfig(**_TINY, sliding_window=None),
    "mistral_sliding_window": lambda: MistralConfig(**_TINY, sliding_window=12),
    "llama3_rope": lambda: LlamaConfig(
        **_TINY,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            # head_dim 16: wavelengths 6 .. 19869 fall on all three sides of 256/4 and 256/1.
            "original_max_position_embeddings": 256,
        },
    ),
    # Gemma 3: sandwich norms, GELU-tanh, embeddings scaled, q/k norms, a sliding layer (window 12, local RoPE
    # base) then a global one (its own base), query_pre_attn_scalar != head_dim.
    "gemma3": lambda: Gemma3TextConfig(
        **_TINY, head_dim=16, sliding_window=12, layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=24, rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 50000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}},
    ),
    "linear_rope": lambda: LlamaConfig(
        **_TINY, rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0}
    ),
}


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights ~ N(0, 0.15), norm weights ~ 1 + N(0, 0.2): peaked logits, and no parameter left at a value
    (0 bias, 1 norm) that would hide a loading mistake."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        param.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)


def save_tiny_model(name: str, tmp_path, seed: int = 0) -> tuple[torch.nn.Module, str]:
    config = CONFIGS[name]()
    torch.manual_seed(seed)
    hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()
    randomize_(hf_model, seed)
    model_dir = str(tmp_path / name)
    hf_model.save_pretrained(model_dir)
    return hf_model, model_dir


def random_ids(n: int, seed: int, vocab_size: int = 256) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab_size) for _ in range(n)]


@torch.no_grad()
def hf_logits(hf_model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Full causal forward: [len(ids), vocab] float32."""
    return hf_model(torch.tensor([ids])).logits[0].float()


@torch.no_grad()
def hf_next_logits(hf_model: torch.nn.Module, ids: list[int], cache: DynamicCache) -> torch.Tensor:
    """transformers' incremental forward: feed `ids` after what `cache` holds -> logits of the last one [vocab].
    Recent transformers name the cache argument `cache`, older ones `past_key_values`."""
    name = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"
    return hf_model(torch.tensor([ids]), use_cache=True, **{name: cache}).logits[0, -1].float()


def load_ours(model_dir: str):
    model, arch_config = load_model(model_dir, "cpu", "float32")
    return model, arch_config


def assert_prefill_and_greedy_decode_match(
    model, arch_config, hf_model: torch.nn.Module, num_decode_steps: int = 32
) -> None:
    """Our paged prefill + greedy decode vs transformers on an 11-token prompt: logits within LOGITS_ATOL at
    every step, the same greedy token every step. (Also used by test_quant.py for quantized models.)"""
    driver = PagedDriver(model, arch_config, num_blocks=16, block_size=BLOCK_SIZE)
    prompt = random_ids(11, seed=1)

    ours = driver.step([("s", prompt)])
    ref = hf_logits(hf_model, prompt)
    assert (ours - ref).abs().max().item() <= LOGITS_ATOL

    # HF side: transformers' own incremental decoding with its KV cache, fed the same tokens.
    cache = DynamicCache(config=hf_model.config)
    ref_step = hf_next_logits(hf_model, prompt, cache)
    next_id = int(ours[-1].argmax())
    assert next_id == int(ref_step.argmax())
    for _ in range(num_decode_steps):
        ours_step = driver.step([("s", [next_id])])[0]
        ref_step = hf_next_logits(hf_model, [next_id], cache)
        assert (ours_step - ref_step).abs().max().item() <= LOGITS_ATOL
        next_id = int(ours_step.argmax())
        assert next_id == int(ref_step.argmax())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_then_greedy_decode_matches_transformers(name, tmp_path):
    hf_model, model_dir = save_tiny_model(name, tmp_path)
    model, arch_config = load_ours(model_dir)
    assert_prefill_and_greedy_decode_match(model, arch_config, hf_model)


@pytest.mark.parametrize("name", ["llama", "qwen3", "mistral_sliding_window", "gemma3"])
def test_mixed_batches_match_each_sequence_alone(name, tmp_path):
    """Batched steps of every shape the scheduler produces give each sequence the logits transformers gives it
    alone: multi-sequence prefill, chunked prefill attending to its cached first chunk, decode mixed with
    prefills, a prefix-cache hit (shared blocks), decode-only batches of different lengths."""
    hf_model, model_dir = save_tiny_model(name, tmp_path)
    model, arch_config = load_ours(model_dir)
    driver = PagedDriver(model, arch_config, num_blocks=64, block_size=BLOCK_SIZE)
    full = {"a": random_ids(13, seed=2), "b": random_ids(29, seed=3), "c": random_ids(20, seed=4)}
    # d shares c's first two blocks (16 tokens) and continues differently.
    full["d"] = full["c"][:16] + random_ids(9, seed=5)
    ref = {k: hf_logits(hf_model, ids) for k, ids in full.items()}

    def check(chunks, logits):
        row = 0
        for key, new_ids in chunks:
            end = driver.num_cached_tokens(key)
            start = end - len(new_ids)
            diff = (logits[row : row + len(new_ids)] - ref[key][start:end]).abs().max().item()
            assert diff <= LOGITS_ATOL, f"{key} tokens {start}:{end} differ by {diff}"
            row += len(new_ids)

    def run(chunks):
        check(chunks, driver.step(chunks))

    # 1. Two fresh prefills of different lengths; b only gets its first chunk.
    run([("a", full["a"][:12]), ("b", full["b"][:10])])
    # 2. Decode (a) + second chunk of a chunked prefill (b, 10 cached) + fresh prefill (c).
    run([("a", full["a"][12:13]), ("b", full["b"][10:22]), ("c", full["c"])])
    # 3. Prefix-cache hit: d starts with c's two full blocks cached, computes only its own 9 tokens, next to
    #    b's last chunk.
    driver.share_prefix("d", "c", num_blocks=2)
    run([("b", full["b"][22:]), ("d", full["d"][16:])])
    # 4. Decode-only batches of four different lengths, then one sequence alone (no padding mask).
    for step in range(3):
        chunks = []
        for key in ("a", "b", "c", "d"):
            next_id = random_ids(1, seed=100 + step + ord(key))[0]
            full[key].append(next_id)
            chunks.append((key, [next_id]))
        ref = {k: hf_logits(hf_model, ids) for k, ids in full.items()}
        run(chunks)
    full["b"].append(7)
    ref["b"] = hf_logits(hf_model, full["b"])
    run([("b", [7])])


def test_sliding_window_is_exercised(tmp_path):
    """The sliding-window config really cuts context: with a window of 12 the last logits of a 30-token
    sequence differ from the full-attention model with the same weights."""
    hf_model, _ = save_tiny_model("mistral_sliding_window", tmp_path)
    ids = random_ids(30, seed=6)
    windowed = hf_logits(hf_model, ids)[-1]
    hf_model.config.sliding_window = None
    full_attention = AutoModelForCausalLM.from_config(hf_model.config, dtype=torch.float32).eval()
    full_attention.load_state_dict(hf_model.state_dict())
    assert (windowed - hf_logits(full_attention, ids)[-1]).abs().max().item() > 1e-2


def test_unknown_architecture_lists_supported():
    with pytest.raises(ValueError, match="supported: .*llama.*LlamaForCausalLM"):
        get_model_class("GPT2LMHeadModel")
    with pytest.raises(ValueError, match="supported architectures: .*Qwen3ForCausalLM"):
        arch_config_from_hf({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})


def test_unsupported_rope_type_lists_supported():
    cfg = LlamaConfig(**_TINY, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}).to_dict()
    with pytest.raises(ValueError, match="'yarn' is not supported; supported: default, linear, llama3"):
        arch_config_from_hf(cfg)


def test_kv_cache_allocation_matches_bytes_per_block():
    arch_config = arch_config_from_hf(LlamaConfig(**_TINY).to_dict())
    caches = allocate_kv_caches(arch_config, num_blocks=10, block_size=16, dtype=torch.bfloat16, device="cpu")
    assert len(caches) == 2
    assert tuple(caches[0].shape) == (2, 10, 16, 2, 16)
    assert sum(c.numel() * c.element_size() for c in caches) == 10 * kv_cache_bytes_per_block(
        arch_config, 16, torch.bfloat16
    )
    # 2 (K, V) * 2 layers * 16 tokens * 2 kv heads * 16 dims * 2 bytes
    assert kv_cache_bytes_per_block(arch_config, 16, torch.bfloat16) == 4096


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_low_precision_error_is_no_worse_than_transformers(name, dtype, tmp_path):
    """In bf16/fp16 our logits (prefill, then batched decode of two sequences) stay as close to the float32
    reference as transformers' own model run in that dtype."""
    hf_model, model_dir = save_tiny_model(name, tmp_path)
    model, arch_config = load_model(model_dir, "cpu", dtype)
    driver = PagedDriver(model, arch_config, num_blocks=16, block_size=BLOCK_SIZE)
    seqs = {"a": random_ids(30, seed=1), "b": random_ids(21, seed=2)}
    prefill = driver.step([("a", seqs["a"][:25]), ("b", seqs["b"][:16])])
    ours = {"a": [prefill[:25]], "b": [prefill[25:]]}
    for step in range(5):
        logits = driver.step([("a", [seqs["a"][25 + step]]), ("b", [seqs["b"][16 + step]])])
        ours["a"].append(logits[:1])
        ours["b"].append(logits[1:])
    low_precision = AutoModelForCausalLM.from_config(hf_model.config, dtype=getattr(torch, dtype)).eval()
    low_precision.load_state_dict(hf_model.state_dict())
    for key, ids in seqs.items():
        ref = hf_logits(hf_model, ids)
        ours_error = (torch.cat(ours[key]) - ref).abs().max().item()
        hf_error = (hf_logits(low_precision, ids) - ref).abs().max().item()
        assert ours_error <= 1.5 * hf_error + 1e-2, f"{key}: ours {ours_error} vs transformers {hf_error}"


def test_sharded_checkpoint_loads(tmp_path):
    hf_model, _ = save_tiny_model("qwen2", tmp_path)
    model_dir = tmp_path / "sharded"
    hf_model.save_pretrained(model_dir, max_shard_size="50KB")
    assert (model_dir / "model.safetensors.index.json").is_file()
    assert len(list(model_dir.glob("*.safetensors"))) > 1
    model, arch_config = load_model(str(model_dir), "cpu", "float32")
    ids = random_ids(9, seed=3)
    logits = PagedDriver(model, arch_config, num_blocks=4, block_size=BLOCK_SIZE).step([("s", ids)])
    assert (logits - hf_logits(hf_model, ids)).abs().max().item() <= LOGITS_ATOL


def test_generation_config_eos_ids_are_added(tmp_path):
    hf_model, model_dir = save_tiny_model("llama", tmp_path)
    hf_model.generation_config.eos_token_id = [2, 7]
    hf_model.generation_config.save_pretrained(model_dir)
    _, arch_config = load_model(model_dir, "cpu", "float32")
    assert arch_config.eos_token_ids == (2, 7)
    assert arch_config.bos_token_id == 1
