"""The whole offline engine on the real default model (SmolLM2-135M-Instruct from its GGUF).

Reference: transformers `generate()` on the same GGUF (greedy tokens). Semantics that must never change output
(greedy, exact tokens): batch vs alone, prefix cache on vs off, chunked vs whole prefill, forced preemption under
a tiny KV budget vs ample memory. Plus the engine's own contract: seeds, n > 1, stop rules, logprobs, bad input.
"""

from __future__ import annotations

import os

import pytest
import torch

from inferd import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village, there lived",
    "1, 2, 3, 4, 5,",
]
CHATS = [
    "What is the tallest mountain on Earth?",
    "Write a haiku about autumn leaves.",
    "Give me three tips for sleeping better. Keep each tip short and practical, please.",
    "Why is the sky blue?",
]
NUM_NEW_TOKENS = 32
# The float-activation kernels: exact to transformers' float32 on the file's weights (auto takes int8
# activations, checked in tests/test_quant.py).
EXACT = "gguf"


@pytest.fixture(scope="module")
def llm(default_gguf_path) -> LLM:
    return LLM(model=str(default_gguf_path), kv_cache_memory="256MiB", max_model_len=2048, quantization=EXACT)


@pytest.fixture(scope="module")
def prompt_ids(llm) -> list[list[int]]:
    tok = llm.tokenizer
    ids = [tok.encode(p) for p in PROMPTS]
    ids += [tok.encode_chat([{"role": "user", "content": c}]) for c in CHATS]
    return ids


@pytest.fixture(scope="module")
def greedy_alone(llm, prompt_ids) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    return [llm.generate([p], params)[0].outputs[0].token_ids for p in prompt_ids]


def greedy(llm: LLM, prompts: list[list[int]], max_tokens: int = NUM_NEW_TOKENS) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def test_greedy_tokens_match_transformers_generate(default_gguf_path, prompt_ids, greedy_alone):
    """End to end through scheduler, runner, paged attention and sampler, against transformers' generate()."""
    from transformers import AutoModelForCausalLM

    model_dir, gguf_file = os.path.split(str(default_gguf_path))
    ref = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file, dtype=torch.float32).eval()
    for ids, ours in zip(prompt_ids, greedy_alone):
        with torch.inference_mode():
            out = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NUM_NEW_TOKENS, pad_token_id=2)
        theirs = out[0, len(ids):].tolist()
        # transformers stops at EOS; ours ran on (ignore_eos) and must agree up to and including it.
        assert ours[: len(theirs)] == theirs


def test_batch_equals_alone(llm, prompt_ids, greedy_alone):
    assert greedy(llm, prompt_ids) == greedy_alone
    llm.engine.kv_manager.check_integrity()
    assert llm.engine.kv_manager.usage == 0.0


def test_prefix_cache_on_equals_off(default_gguf_path, llm, prompt_ids, greedy_alone):
    # Same system prompt in every chat: the second run hits the cache for it.
    shared = [p for p in prompt_ids[len(PROMPTS):]]
    before = llm.engine.get_stats().num_prefix_cache_hits_tokens
    outs = llm.generate(shared, SamplingParams(temperature=0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True))
    assert llm.engine.get_stats().num_prefix_cache_hits_tokens > before
    assert all(o.num_cached_tokens > 0 for o in outs)
    assert [o.outputs[0].token_ids for o in outs] == greedy_alone[len(PROMPTS):]

    off = LLM(model=str(default_gguf_path), kv_cache_memory="64MiB", max_model_len=2048, quantization=EXACT,
              enable_prefix_caching=False)
    assert greedy(off, prompt_ids) == greedy_alone
    assert off.engine.get_stats().num_prefix_cache_hits_tokens == 0


def test_chunked_prefill_and_preemption_equal_whole(default_gguf_path, prompt_ids, greedy_alone):
    # 8-token budget: every prompt is computed in several chunks while others decode.
    chunked = LLM(model=str(default_gguf_path), kv_cache_memory="64MiB", max_model_len=2048, quantization=EXACT,
                  max_num_batched_tokens=8)
    assert greedy(chunked, prompt_ids) == greedy_alone
    # A KV budget of 12 blocks (192 tokens) for 8 sequences of up to ~75 tokens forces recompute preemption.
    block_bytes = 2 * 30 * 16 * 3 * 64 * 4  # K and V x layers x block_size x kv heads x head_dim x fp32
    tiny = LLM(model=str(default_gguf_path), kv_cache_memory=12 * block_bytes, max_model_len=2048, quantization=EXACT)
    assert tiny.engine.num_blocks == 12
    assert greedy(tiny, prompt_ids) == greedy_alone
    assert tiny.engine.get_stats().num_preemptions > 0
    tiny.engine.kv_manager.check_integrity()
    assert tiny.engine.kv_manager.usage == 0.0


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm, prompt_ids):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate([prompt_ids[4]], params)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)
    mixed = llm.generate([prompt_ids[0], prompt_ids[4], prompt_ids[5]], [others, params, others])
    assert mixed[1].outputs[0].token_ids == alone
    other_seed = llm.generate([prompt_ids[4]], SamplingParams(temperature=0.9, top_p=0.95, seed=99, max_tokens=24,
                                                              ignore_eos=True))
    assert other_seed[0].outputs[0].token_ids != alone


def test_n_completions_share_the_prompt_blocks(llm, prompt_ids):
    prompt = prompt_ids[6]  # 50+ tokens: several full blocks
    stats0 = llm.engine.get_stats()
    out = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=16, ignore_eos=True))[0]
    stats1 = llm.engine.get_stats()
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 16 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # independent draws
    full_block_tokens = (len(prompt) - 1) // 16 * 16
    # The two siblings found the first one's full prompt blocks in the cache.
    assert stats1.num_prefix_cache_hits_tokens - stats0.num_prefix_cache_hits_tokens >= 2 * full_block_tokens


def test_stop_rules(llm, prompt_ids, greedy_alone):
    tok = llm.tokenizer
    full_ids = greedy_alone[4]
    full_text = tok.decode(full_ids)
    # A stop string taken from the middle of the greedy text: output is cut exactly before it.
    stop = full_text[len(full_text) // 2: len(full_text) // 2 + 4]
    assert stop.strip()
    out = llm.generate([prompt_ids[4]], SamplingParams(temperature=0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True,
                                                       stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full_text[: full_text.index(stop)]
    # A stop token id: generation ends on it.
    stop_id = full_ids[5]
    out = llm.generate([prompt_ids[4]], SamplingParams(temperature=0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True,
                                                       stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.token_ids == full_ids[: full_ids.index(stop_id) + 1]
    # max_tokens
    out = llm.generate([prompt_ids[4]], SamplingParams(temperature=0, max_tokens=5))[0].outputs[0]
    assert out.finish_reason == "length" and out.token_ids == full_ids[:5]


def test_eos_and_min_tokens(llm):
    msgs = [{"role": "user", "content": "Reply with the single word: yes"}]
    free = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=64))[0].outputs[0]
    assert free.finish_reason == "stop" and free.token_ids[-1] in llm.tokenizer.eos_token_ids
    assert "<|im_end|>" not in free.text
    n = len(free.token_ids)
    longer = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=64, min_tokens=n + 3))[0].outputs[0]
    assert len(longer.token_ids) >= n + 3


def test_logprobs_are_the_models(llm, prompt_ids, greedy_alone):
    out = llm.generate([prompt_ids[0]], SamplingParams(temperature=0, max_tokens=4, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == 4
    for token_id, entry in zip(out.token_ids, out.logprobs):
        assert token_id in entry and len(entry) == 3  # greedy: the sampled token is the top one
        assert entry[token_id] == max(entry.values())
        assert all(lp <= 0 for lp in entry.values())


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        SamplingParams(**kwargs)


def test_bad_prompts_are_refused_and_others_finish(llm, prompt_ids, greedy_alone):
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    engine.add_request("good", prompt_ids[0], params)
    engine.step()  # the good request is in flight
    with pytest.raises(ValueError, match="^prompt"):
        engine.add_request("empty", "", params)
    with pytest.raises(ValueError, match="^prompt"):
        engine.add_request("long", [11] * 4096, params)
    with pytest.raises(ValueError, match="^max_tokens"):
        engine.add_request("overflow", prompt_ids[0], SamplingParams(max_tokens=2047))
    with pytest.raises(ValueError, match="^prompt"):
        engine.add_request("bad-id", [1, 10**9], params)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    assert final.request_id == "good" and final.outputs[0].token_ids == greedy_alone[0]


def test_abort_frees_every_block(llm, prompt_ids):
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    for i, p in enumerate(prompt_ids):
        engine.add_request(f"abort-{i}", p, params)
    engine.step()
    engine.step()
    assert engine.kv_manager.usage > 0
    for i in range(len(prompt_ids)):
        engine.abort_request(f"abort-{i}")
    assert not engine.has_unfinished_requests()
    assert engine.kv_manager.usage == 0.0
    engine.kv_manager.check_integrity()
