"""Speculative decoding: the n-gram proposer, the verifying sampler, and the engine with speculation on vs off.

References: the target distribution by transformers' warpers and repetition processor plus OpenAI's penalty
formula on a tiny random transformers Llama (chi-square on the next two tokens); greedy tokens of the same engine
with speculation off on the real default model (which test_engine.py checks against transformers' generate()).
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare
from test_sampler import hf_filtered_logits, hf_repetition_penalized, openai_penalized

from inferd import LLM, SamplingParams
from inferd.layers.sampler import Sampler, build_sampling_metadata
from inferd.spec_decode import NgramProposer, SpeculativePolicy


# ---------------------------------------------------------------------------------------------- proposer
def test_ngram_proposes_what_followed_the_latest_longest_match():
    proposer = NgramProposer(min_n=2, max_n=3)
    #          0  1  2  3  4  5  6  7  8  9 10 11
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3]
    # Last 3 = [1, 2, 3] occurs at 0 -> followed by 4, 5, 9.
    assert proposer.propose(tokens, 3) == [4, 5, 9]
    # Last 3 = [9, 2, 3]? no: tokens end in [7, 2, 3] -> no 3-gram; 2-gram [2, 3] latest earlier match at 6.
    assert proposer.propose([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 7, 2, 3], 2) == [7, 8]
    assert proposer.propose([1, 2, 3, 4], 4) == []  # no earlier occurrence
    assert proposer.propose([5, 6, 5, 6], 4) == [5, 6]  # the continuation stops at the known tokens
    assert proposer.propose(tokens, 0) == []


def test_auto_policy_turns_off_with_a_large_batch_and_low_acceptance():
    from inferd.request import Request

    policy = SpeculativePolicy("auto", num_speculative_tokens=4, max_running_requests=2, backoff_steps=3)
    req = Request("r", [1, 2, 3, 1, 2], SamplingParams(temperature=0))
    assert policy.propose(req, num_running=1, max_num_tokens=10) == [3, 1, 2]
    assert policy.propose(req, num_running=3, max_num_tokens=10) == []
    assert policy.propose(req, num_running=1, max_num_tokens=1) == [3]
    for _ in range(4):
        policy.record("r", 4, 0)  # nothing accepted: rest for backoff_steps steps
    assert [policy.propose(req, 1, 10) for _ in range(4)] == [[], [], [], [3, 1]]  # back at k = 2
    opted_out = Request("o", [1, 2, 3, 1, 2], SamplingParams(temperature=0, speculative=False))
    assert policy.propose(opted_out, 1, 10) == []
    seeded = Request("s", [1, 2, 3, 1, 2], SamplingParams(seed=3))
    assert policy.propose(seeded, 1, 10) == []  # auto never changes a seeded request's draws
    assert SpeculativePolicy("ngram").propose(seeded, 100, 10) == [3, 1, 2]
    assert policy.num_draft_tokens == 16 and policy.num_accepted_tokens == 0
    with pytest.raises(ValueError, match="speculative must be one of"):
        SpeculativePolicy("medusa")
    with pytest.raises(ValueError, match="^speculative 'draft' needs a draft model"):
        SpeculativePolicy("draft")


def test_speculative_engine_args_and_cli_flag():
    import argparse

    from inferd.config import EngineArgs

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    args = EngineArgs.from_cli(parser.parse_args(["--speculative", "ngram", "--num-speculative-tokens", "3"]))
    assert (args.speculative, args.num_speculative_tokens) == ("ngram", 3)
    assert EngineArgs.from_cli(parser.parse_args([])).speculative == "auto"
    with pytest.raises(ValueError, match="^speculative must be one of"):
        EngineArgs(speculative="fast").validate_static()
    with pytest.raises(ValueError, match="^num_speculative_tokens"):
        EngineArgs(num_speculative_tokens=0).validate_static()
    with pytest.raises(ValueError, match="^speculative"):
        SamplingParams(speculative="no")


# ---------------------------------------------------------------------------------------------- verification
def verify_rows(sampler, rows_logits, params, outputs, proposals, generators=None, proposal_probs=None):
    """Runs Sampler.verify the way the runner lays it out: request i's rows see proposals[:j] as output."""
    row_params, row_outputs = [], []
    for p, out, props in zip(params, outputs, proposals):
        for j in range(len(props) + 1):
            row_params.append(p)
            row_outputs.append(out + props[:j])
    md = build_sampling_metadata(row_params, [[1, 2]] * len(row_params), row_outputs, [None] * len(row_params),
                                 [frozenset({0})] * len(row_params), rows_logits.shape[1], "cpu")
    return sampler.verify(rows_logits, md, proposals, generators or [None] * len(proposals), proposal_probs)


def test_greedy_verify_accepts_the_argmax_prefix_and_reports_raw_logprobs():
    torch.manual_seed(0)
    logits = torch.randn(7, 50)
    argmax = logits.argmax(-1).tolist()
    greedy = SamplingParams(temperature=0, logprobs=2)
    # Request 0: 3 proposals, the first two right. Request 1: 2 proposals, both right (bonus token drawn).
    props = [[argmax[0], argmax[1], (argmax[2] + 1) % 50], [argmax[4], argmax[5]]]
    out = verify_rows(Sampler(), logits, [greedy, greedy], [[], []], props)
    assert out.token_ids == [argmax[0:3], argmax[4:7]]
    logprobs = logits.log_softmax(-1)
    assert out.sampled_logprobs[0] == pytest.approx([logprobs[r, argmax[r]].item() for r in range(3)], abs=1e-5)
    assert all(len(entry) == 2 for entry in out.logprobs[1])


def target_probs(logits_row: torch.Tensor, output: list[int], params: SamplingParams) -> torch.Tensor:
    """The distribution the target samples from, by transformers' processors and OpenAI's penalty formula."""
    row = hf_repetition_penalized(logits_row.double(), [1, 2] + output, params.repetition_penalty)
    row = openai_penalized(row, output, params.presence_penalty, params.frequency_penalty)
    return hf_filtered_logits(row, params).softmax(-1)


@pytest.fixture(scope="module")
def tiny_logits():
    """A tiny random Llama (vocabulary 24): logits after the context [1, 2], after [1, 2, a] and [1, 2, a, b]."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=24, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # a peaked distribution, so proposals are often right and sometimes wrong
        v = config.vocab_size
        pairs = torch.cartesian_prod(torch.arange(v), torch.arange(v))  # [V * V, 2]
        ids = torch.cat([torch.tensor([[1, 2]]).expand(v * v, 2), pairs], dim=1)
        logits = model(ids).logits.float()  # [V * V, 4, V]
    after_0 = logits[0, 1]  # [V]
    after_1 = logits[::v, 2]  # [V, V]: row a
    after_2 = logits[:, 3].reshape(v, v, v)  # [a, b, V]
    return after_0, after_1, after_2


SPEC_SAMPLING_CASES = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.8, top_k=12, top_p=0.9, min_p=0.02, repetition_penalty=1.3, presence_penalty=0.4,
                   frequency_penalty=0.3),
]


@pytest.mark.parametrize("with_proposal_distribution", [False, True], ids=["point-mass", "draft-q"])
@pytest.mark.parametrize("params", SPEC_SAMPLING_CASES, ids=["plain", "filters+penalties"])
def test_next_two_tokens_keep_the_target_distribution(tiny_logits, params, with_proposal_distribution):
    """20k draws of the next two tokens with 2 proposals each: chi-square against the target's exact joint
    distribution p(a) p(b | a). Point mass: the n-gram case (fixed proposals, often right, sometimes wrong).
    draft-q: proposals drawn from an arbitrary distribution q, which the rejection sampler corrects."""
    after_0, after_1, after_2 = tiny_logits
    vocab_size = after_0.shape[0]
    num_draws = 20_000
    gen = torch.Generator().manual_seed(1)
    p0 = target_probs(after_0, [], params)
    expected = torch.stack([p0[a] * target_probs(after_1[a], [a], params) for a in range(vocab_size)])  # [a, b]

    if with_proposal_distribution:
        q = torch.softmax(torch.randn(2, vocab_size, generator=gen) * 2.0, dim=-1)  # q(a), q(b), context-free
        props = torch.stack([torch.multinomial(q[j], num_draws, replacement=True, generator=gen)
                             for j in range(2)], dim=1).tolist()
        proposal_probs = [q] * num_draws
    else:
        a0 = int(p0.argmax())
        props = [[a0, int(target_probs(after_1[a0], [a0], params).argmax())]] * num_draws
        proposal_probs = None
    rows = torch.stack([torch.stack([after_0, after_1[a], after_2[a, b]]) for a, b in props]).reshape(-1, vocab_size)
    sampler = Sampler(torch.Generator().manual_seed(2))
    out = verify_rows(sampler, rows, [params] * num_draws, [[]] * num_draws, props, proposal_probs=proposal_probs)

    pairs = [ids[:2] for ids in out.token_ids if len(ids) >= 2]
    short = [ids[0] for ids in out.token_ids if len(ids) == 1]  # first token rejected: one more plain step
    assert pairs and short  # both accepts and rejects happened
    md = build_sampling_metadata([params] * len(short), [[1, 2]] * len(short), [[a] for a in short],
                                 [None] * len(short), [frozenset({0})] * len(short), vocab_size, "cpu")
    second = sampler(after_1[torch.tensor(short)], md).sampled_token_ids
    pairs += [[a, b] for a, b in zip(short, second)]

    counts = torch.zeros(vocab_size, vocab_size, dtype=torch.float64)
    for a, b in pairs:
        counts[a, b] += 1
    assert counts[expected == 0].sum() == 0
    expected_counts = expected * num_draws
    big = expected_counts >= 5  # cells with fewer (but some) expected draws are pooled into one
    small = ~big & (expected > 0)
    observed = torch.cat([counts[big], counts[small].sum()[None]])
    wanted = torch.cat([expected_counts[big], expected_counts[small].sum()[None]])
    if wanted[-1] < 5:  # too few to test on their own: fold the pool into the last big cell
        observed, wanted = observed[:-1], wanted[:-1]
        observed[-1] += counts[small].sum()
        wanted[-1] += expected_counts[small].sum()
    result = chisquare(observed.numpy(), wanted.numpy() * observed.sum().item() / wanted.sum().item())
    assert result.pvalue > 1e-3, (result, params)


def test_seeded_verify_is_reproducible_and_equals_the_plain_path_without_proposals(tiny_logits):
    after_0, after_1, after_2 = tiny_logits
    params = SamplingParams(temperature=1.0, seed=5)
    rows = torch.stack([after_0, after_1[3], after_2[3, 4]])

    def run(props, rows_logits):
        return verify_rows(Sampler(), rows_logits, [params], [[]], [props], [torch.Generator().manual_seed(5)])

    assert run([3, 4], rows).token_ids == run([3, 4], rows).token_ids
    md = build_sampling_metadata([params], [[1, 2]], [[]], [torch.Generator().manual_seed(5)], [frozenset({0})],
                                 after_0.shape[0], "cpu")
    for _ in range(3):
        assert run([], after_0[None]).token_ids == [Sampler()(after_0[None], md).sampled_token_ids]
        md = build_sampling_metadata([params], [[1, 2]], [[]], [torch.Generator().manual_seed(5)],
                                     [frozenset({0})], after_0.shape[0], "cpu")


# ---------------------------------------------------------------------------------------------- engine, greedy
CODE = '''def parse_size_bytes(value, field_name="size"):
    m = _SIZE_RE.match(str(value))
    if not m or (m.group(2) or "").lower() not in _UNITS:
        raise ValueError(f"{field_name}: cannot parse {value!r} as a size")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
'''
TEXT = ("The committee met on Tuesday. The committee agreed that the budget for the new library would be "
        "increased by ten percent, and that the opening would be moved to the spring.")
NUM_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def engines(default_gguf_path):
    def make(speculative: str, **kwargs) -> LLM:
        return LLM(model=str(default_gguf_path), kv_cache_memory=kwargs.pop("kv_cache_memory", "128MiB"),
                   max_model_len=1024, speculative=speculative, **kwargs)
    return {"off": make("off"), "ngram": make("ngram")}


@pytest.fixture(scope="module")
def grounded_prompts(engines) -> list[list[int]]:
    """16 prompts whose answers copy from the input (so proposals fire) and a few that do not."""
    tok = engines["off"].tokenizer
    asks = [f"Repeat this code exactly:\n{CODE}", f"Copy this text word for word:\n{TEXT}",
            f"Rename the function to parse_size in this code and print it:\n{CODE}",
            f"Quote the first sentence of this text:\n{TEXT}"]
    prompts = [tok.encode_chat([{"role": "user", "content": ask}]) for ask in asks]
    prompts += [tok.encode(text) for text in ["1, 2, 3, 4, 5, 6, 7,", "a b c a b c a b", "The capital of France is",
                                             CODE[:120], TEXT[:90], "Once upon a time", "def add(a, b):",
                                             "red green blue red green", "x = 1\ny = 2\nx = 1\n",
                                             "Monday Tuesday Wednesday", "Hello, world! Hello,", "import os\n"]]
    return prompts


def run_greedy(llm: LLM, prompts, **kwargs):
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True, **kwargs)
    return [o.outputs[0] for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def greedy_off(engines, grounded_prompts):
    return [[o.token_ids] for o in run_greedy(engines["off"], grounded_prompts)]


def test_greedy_identical_at_batch_1_and_16(engines, grounded_prompts, greedy_off):
    spec = engines["ngram"]
    stats0 = spec.engine.get_stats()
    alone = [run_greedy(spec, [p])[0].token_ids for p in grounded_prompts[:2]]
    assert alone == [t[0] for t in greedy_off[:2]]
    batch = [o.token_ids for o in run_greedy(spec, grounded_prompts)]
    assert batch == [t[0] for t in greedy_off]
    stats1 = spec.engine.get_stats()
    num_draft = stats1.num_spec_draft_tokens - stats0.num_spec_draft_tokens
    num_accepted = stats1.num_spec_accepted_tokens - stats0.num_spec_accepted_tokens
    assert 0 < num_accepted < num_draft  # accepted and rejected proposals both happened
    spec.engine.kv_manager.check_integrity()
    assert spec.engine.kv_manager.usage == 0.0


def test_greedy_identical_with_prefix_hits_and_under_preemption(default_gguf_path, engines, grounded_prompts,
                                                                greedy_off):
    spec = engines["ngram"]
    before = spec.engine.get_stats().num_prefix_cache_hits_tokens
    again = [o.token_ids for o in run_greedy(spec, grounded_prompts[:4])]  # their prompt blocks are cached now
    assert spec.engine.get_stats().num_prefix_cache_hits_tokens > before
    assert again == [t[0] for t in greedy_off[:4]]
    # 24 blocks (384 tokens) for 6 sequences of up to ~190 tokens: recompute preemption, look-ahead often refused.
    block_bytes = 2 * 30 * 16 * 3 * 64 * 4
    tiny = LLM(model=str(default_gguf_path), kv_cache_memory=24 * block_bytes, max_model_len=1024,
               speculative="ngram")
    prompts = grounded_prompts[:4] + grounded_prompts[6:8]
    assert [o.token_ids for o in run_greedy(tiny, prompts)] == [t[0] for t in greedy_off[:4] + greedy_off[6:8]]
    stats = tiny.engine.get_stats()
    assert stats.num_preemptions > 0 and stats.num_spec_accepted_tokens > 0
    tiny.engine.kv_manager.check_integrity()
    assert tiny.engine.kv_manager.usage == 0.0


def test_stops_inside_an_accepted_run(engines, grounded_prompts, greedy_off):
    """A stop token id, a stop string and max_tokens that land in the middle of a multi-token step."""
    spec = engines["ngram"]
    engine = spec.engine
    prompt = grounded_prompts[0]
    full_ids = greedy_off[0][0]
    tok = spec.tokenizer
    engine.add_request("probe", prompt, SamplingParams(temperature=0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True))
    runs: list[tuple[int, int]] = []  # (first output index, length) of each step's new tokens
    while engine.has_unfinished_requests():
        for out in engine.step():
            new = out.delta_token_ids[0]
            if new:
                runs.append((len(out.outputs[0].token_ids) - len(new), len(new)))
    start, length = max(runs, key=lambda r: r[1])
    assert length >= 3
    middle = start + 1  # a token accepted from a proposal, with more accepted after it
    stop_id = full_ids[middle]
    first = full_ids.index(stop_id)
    out = run_greedy(spec, [prompt], stop_token_ids=[stop_id])[0]
    assert out.token_ids == full_ids[: first + 1] and out.finish_reason == "stop"

    full_text = tok.decode(full_ids)
    text_before = tok.decode(full_ids[:middle])
    stop = tok.decode(full_ids[: middle + 1])[len(text_before):].strip() or "\n"
    cut = full_text.index(stop)
    out = run_greedy(spec, [prompt], stop=[stop])[0]
    assert out.text == full_text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop

    params = SamplingParams(temperature=0, max_tokens=middle + 1, ignore_eos=True)
    out = spec.generate([prompt], params)[0].outputs[0]
    assert out.token_ids == full_ids[: middle + 1] and out.finish_reason == "length"
    engine.kv_manager.check_integrity()
    assert engine.kv_manager.usage == 0.0


def test_min_tokens_logprobs_and_opt_out(engines, grounded_prompts, greedy_off):
    spec, off = engines["ngram"], engines["off"]
    prompt = grounded_prompts[1]
    a = run_greedy(spec, [prompt], logprobs=2)[0]
    b = run_greedy(off, [prompt], logprobs=2)[0]
    assert a.token_ids == b.token_ids
    for x, y in zip(a.logprobs, b.logprobs):
        assert x.keys() == y.keys() and all(abs(x[k] - y[k]) < 1e-3 for k in x)
    msgs = [{"role": "user", "content": "Reply with the single word: yes"}]
    free = spec.chat(msgs, SamplingParams(temperature=0, max_tokens=64))[0].outputs[0]
    assert free.finish_reason == "stop"
    longer = spec.chat(msgs, SamplingParams(temperature=0, max_tokens=64, min_tokens=len(free.token_ids) + 3))
    assert len(longer[0].outputs[0].token_ids) >= len(free.token_ids) + 3
    before = spec.engine.get_stats().num_spec_draft_tokens
    out = run_greedy(spec, [prompt], speculative=False)[0]
    assert out.token_ids == greedy_off[1][0]
    assert spec.engine.get_stats().num_spec_draft_tokens == before
