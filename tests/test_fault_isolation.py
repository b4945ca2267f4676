"""One request's bad data fails that request alone; the batch it shared goes on (issue 8, item 1).

Failures are injected per request at each place a request's own data is used in a step (its sampling metadata,
its grammar's bitmask, its detokenizer, its speculative proposer), since real inputs that break these are bugs
we fix as we find them. Reference: the same prompts run without the poisoned request give the same greedy tokens.
"""

from __future__ import annotations

import asyncio

import pytest

import inferd.runner.model_runner as model_runner
from inferd.engine.async_engine import AsyncEngine, RequestError
from inferd.engine.detokenizer import IncrementalDetokenizer
from inferd.engine.llm import LLM, RequestFailedError
from inferd.request import SamplingParams, StructuredOutputsParams
from inferd.structured import GrammarMatcher

POISON_SEED = 666_666  # the injected faults fire only for requests carrying this seed
NUM_NEW_TOKENS = 12


class InjectedFault(RuntimeError):
    pass


@pytest.fixture(scope="module")
def llm(default_gguf_path) -> LLM:
    return LLM(model=str(default_gguf_path), kv_cache_memory="128MiB", max_model_len=512, speculative="off")


@pytest.fixture(scope="module")
def prompts(llm) -> list[list[int]]:
    return [llm.tokenizer.encode(text) for text in
            ["The capital of France is", "Once upon a time", "def add(a, b):", "Monday, Tuesday,"]]


def greedy(**kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True, **kwargs)


@pytest.fixture(scope="module")
def clean_tokens(llm, prompts) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, greedy())]


@pytest.fixture
def poisoned_sampling(monkeypatch) -> None:
    """Building the sampling metadata of any batch holding a poisoned request raises."""
    real = model_runner.build_sampling_metadata

    def poisoned(params, *args, **kwargs):
        if any(p.seed == POISON_SEED for p in params):
            raise InjectedFault("sampling metadata")
        return real(params, *args, **kwargs)

    monkeypatch.setattr(model_runner, "build_sampling_metadata", poisoned)


def poison_second(prompts) -> list[SamplingParams]:
    return [greedy(seed=POISON_SEED) if i == 1 else greedy() for i in range(len(prompts))]


def assert_only_second_failed(llm, prompts, clean_tokens, fragment: str) -> None:
    with pytest.raises(RequestFailedError) as info:
        llm.generate(prompts, poison_second(prompts))
    failure = info.value
    assert len(failure.failures) == 1 and fragment in next(iter(failure.failures.values()))
    outputs = failure.outputs
    assert outputs[1] is None
    for i in (0, 2, 3):
        assert outputs[i].outputs[0].token_ids == clean_tokens[i]  # the batch went on, unchanged
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    engine.kv_manager.check_integrity()
    assert engine.kv_manager.usage == 0.0  # the failed request's blocks went back too


def test_a_request_whose_sampling_fails_fails_alone(llm, prompts, clean_tokens, poisoned_sampling):
    assert_only_second_failed(llm, prompts, clean_tokens, "InjectedFault: sampling metadata")


def test_a_request_whose_output_processing_fails_fails_alone(llm, prompts, clean_tokens, monkeypatch):
    real = IncrementalDetokenizer.update

    def poisoned(self, new_token_ids, stop_terminated=False):
        if self.params.seed == POISON_SEED and len(self.output_token_ids) >= 3:
            raise InjectedFault("detokenizer")
        return real(self, new_token_ids, stop_terminated)

    monkeypatch.setattr(IncrementalDetokenizer, "update", poisoned)
    assert_only_second_failed(llm, prompts, clean_tokens, "InjectedFault: detokenizer")


def test_a_request_whose_grammar_fails_fails_alone(llm, prompts, clean_tokens, monkeypatch):
    def poisoned(self, bitmask, row):
        raise InjectedFault("grammar bitmask")

    monkeypatch.setattr(GrammarMatcher, "fill_bitmask", poisoned)
    params = [greedy() for _ in prompts]
    params[1] = greedy(structured_outputs=StructuredOutputsParams(regex="[a-z ]+"))
    with pytest.raises(RequestFailedError) as info:
        llm.generate(prompts, params)
    assert list(info.value.outputs[i].outputs[0].token_ids for i in (0, 2, 3)) == [clean_tokens[i] for i in (0, 2, 3)]
    assert "grammar bitmask" in next(iter(info.value.failures.values()))


def test_a_failing_proposer_costs_only_the_speed_up(default_gguf_path, prompts, clean_tokens, monkeypatch):
    spec = LLM(model=str(default_gguf_path), kv_cache_memory="128MiB", max_model_len=512, speculative="ngram")
    real = spec.engine.spec_policy.propose

    def poisoned(req, *args):
        if req.sampling_params.seed == POISON_SEED:
            raise InjectedFault("proposer")
        return real(req, *args)

    monkeypatch.setattr(spec.engine.spec_policy, "propose", poisoned)
    outputs = spec.generate(prompts, poison_second(prompts))
    assert [o.outputs[0].token_ids for o in outputs] == clean_tokens


def test_async_engine_fails_the_request_and_serves_the_rest(llm, prompts, clean_tokens, poisoned_sampling):

    async def run() -> list:
        engine = AsyncEngine(llm.engine)
        engine.start()
        try:
            async def one(i: int, params: SamplingParams):
                last = None
                try:
                    async for output in engine.generate(prompts[i], params, request_id=f"r{i}"):
                        last = output
                except RequestError as exc:
                    return exc
                return last.outputs[0].token_ids

            return await asyncio.gather(*(one(i, p) for i, p in enumerate(poison_second(prompts))))
        finally:
            engine.shutdown()

    results = asyncio.run(run())
    assert isinstance(results[1], RequestError) and "sampling metadata" in str(results[1])
    assert [results[i] for i in (0, 2, 3)] == [clean_tokens[i] for i in (0, 2, 3)]
