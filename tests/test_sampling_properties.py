"""Property tests over the whole SamplingParams space (issue 8, item 2): every combination either is refused with
an InvalidParameterError naming a real field, or runs to the end with sane output: token ids in the vocabulary,
no NaN logprob, the token limits kept, and greedy where the meaning of an extreme is greedy.

The model is a tiny random-weight Llama made on the fly (transformers), so hundreds of cases run in seconds.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inferd.engine.llm import LLM
from inferd.errors import InvalidParameterError
from inferd.request import GREEDY_TEMPERATURE_BELOW, SamplingParams

VOCAB_SIZE = 512
FIELD_NAMES = {f.name for f in dataclasses.fields(SamplingParams)}

# Every float a JSON body can carry, and the ones Python code can pass (nan, inf), biased toward the edges.
edge_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-45, 1e-38, 1e-30, 1e-6, 1e-5, 0.5, 1.0, 2.0, 10.0, 100.0, 1e30, -1e-30, -1.0]),
)
edge_ints = st.one_of(st.integers(min_value=-(2**63), max_value=2**63 - 1),
                      st.sampled_from([-1, 0, 1, 2, VOCAB_SIZE - 1, VOCAB_SIZE, 10**9]))


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> LLM:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    model_dir = tmp_path_factory.mktemp("tiny-llama")
    config = transformers.LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(VOCAB_SIZE)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text('{"bos_token": "t1", "eos_token": "t2"}')
    return LLM(model=str(model_dir), kv_cache_memory="16MiB", max_model_len=256, speculative="off")


params_kwargs = st.fixed_dictionaries(
    {},
    optional={
        "n": st.one_of(edge_ints, st.integers(1, 4)),
        "temperature": edge_floats,
        "top_p": edge_floats,
        "top_k": edge_ints,
        "min_p": edge_floats,
        "repetition_penalty": edge_floats,
        "presence_penalty": edge_floats,
        "frequency_penalty": edge_floats,
        "seed": st.one_of(st.none(), edge_ints),
        "max_tokens": st.one_of(st.none(), st.integers(-2, 6)),
        "min_tokens": st.integers(-2, 8),
        "ignore_eos": st.booleans(),
        "logprobs": st.one_of(st.none(), st.integers(-1, 25)),
        "logit_bias": st.one_of(st.none(), st.dictionaries(st.integers(-5, VOCAB_SIZE + 5), edge_floats, max_size=4)),
        "stop_token_ids": st.lists(st.integers(0, VOCAB_SIZE - 1), max_size=3),
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kwargs=params_kwargs)
def test_every_sampling_params_is_refused_by_name_or_runs_sanely(tiny_llm, kwargs):
    try:
        params = SamplingParams(**kwargs)
    except InvalidParameterError as exc:
        assert exc.param in FIELD_NAMES, exc.param
        assert str(exc).startswith(exc.param)
        return
    if params.max_tokens is None:
        # A short run; never below min_tokens, which would make the replaced params invalid (hypothesis found it).
        params = dataclasses.replace(params, max_tokens=max(4, params.min_tokens))
    [output] = tiny_llm.generate([[1, 5, 9, 13]], params)
    assert len(output.outputs) == params.n
    for completion in output.outputs:
        assert completion.finish_reason in ("stop", "length")
        assert len(completion.token_ids) <= params.max_tokens
        assert all(0 <= t < VOCAB_SIZE for t in completion.token_ids)
        if completion.finish_reason == "stop" and completion.token_ids[-1:] != [2]:
            assert completion.token_ids[-1] in params.stop_token_ids
        if completion.finish_reason == "stop":
            assert len(completion.token_ids) >= min(params.min_tokens, params.max_tokens)
        assert not math.isnan(completion.cumulative_logprob)
        for entry in completion.logprobs or []:
            assert all(not math.isnan(lp) for lp in entry.values())
    engine = tiny_llm.engine
    assert not engine.has_unfinished_requests() and engine.kv_manager.usage == 0.0


@settings(max_examples=40, deadline=None)
@given(temperature=st.floats(min_value=0.0, max_value=GREEDY_TEMPERATURE_BELOW, exclude_max=True),
       seed=st.one_of(st.none(), st.integers(0, 2**31)))
def test_a_temperature_below_the_threshold_is_greedy(tiny_llm, temperature, seed):
    greedy = tiny_llm.generate([[1, 7, 3]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    tiny = tiny_llm.generate([[1, 7, 3]], SamplingParams(temperature=temperature, seed=seed, max_tokens=6,
                                                         ignore_eos=True))
    assert tiny[0].outputs[0].token_ids == greedy[0].outputs[0].token_ids
