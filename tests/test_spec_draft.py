"""Speculative decoding with a draft model: a separate small checkpoint and the self-draft (the target's first K
layers), through the engine and through a real `inferd serve`.

Models: tiny random transformers Llamas saved with one tokenizer: a 2-layer target and a 1-layer draft whose
weights are the target's embedding, first layer, norm and head (so the draft is right often and wrong often; its
proposals equal the self-draft `self:1`'s). The target's second layer is damped and its head sharpened for the same
reason. References: transformers' greedy generate() on the target; the engine with speculation off (greedy token
ids must be identical); the target's exact distribution from transformers (chi-square on the next two tokens);
the draft's distribution from transformers (the q the rejection sampler gets).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from scipy.stats import chisquare

from inferd import LLM, SamplingParams
from inferd.layers.sampler import Sampler

NUM_NEW_TOKENS = 24


def save_pair(out: Path, tokenizer, vocab_size: int, head_scale: float, second_layer_scale: float,
              max_positions: int = 512) -> tuple[Path, Path]:
    """(target dir, draft dir): a 2-layer Llama and a 1-layer Llama made of the target's first layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=max_positions, tie_word_embeddings=False)
    target = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **shape)).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(head_scale)
        second = target.model.layers[1]
        second.self_attn.o_proj.weight.mul_(second_layer_scale)
        second.mlp.down_proj.weight.mul_(second_layer_scale)
    draft = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, **shape)).eval()
    draft.load_state_dict({k: v for k, v in target.state_dict().items() if ".layers.1." not in k})
    dirs = []
    for name, model in (("target", target), ("draft", draft)):
        shutil.rmtree(out / name, ignore_errors=True)
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
        dirs.append(out / name)
    return dirs[0], dirs[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_hf_tokenizer_dir) -> tuple[Path, Path]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_tokenizer_dir)
    return save_pair(tmp_path_factory.mktemp("spec_pair"), tokenizer, len(tokenizer), head_scale=6.0,
                     second_layer_scale=0.5)


def make_llm(target: Path, speculative: str, speculative_model: str | None = None, **kwargs) -> LLM:
    return LLM(model=str(target), kv_cache_memory=kwargs.pop("kv_cache_memory", "16MiB"),
               max_model_len=kwargs.pop("max_model_len", 256), speculative=speculative,
               speculative_model=speculative_model, **kwargs)


@pytest.fixture(scope="module")
def engines(pair):
    target, draft = pair
    return {"off": make_llm(target, "off"), "draft": make_llm(target, "draft", str(draft)),
            "self": make_llm(target, "draft", "self:1")}


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 9, 17, 33, 40, 3, 12, 25, 7, 8, 30, 21, 11, 6, 19, 4]
    return [torch.randint(5, 500, (n,), generator=gen).tolist() for n in lengths]


def greedy(**kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=kwargs.pop("max_tokens", NUM_NEW_TOKENS), ignore_eos=True,
                          **kwargs)


def token_ids(llm: LLM, prompts, params=None) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params or greedy())]


@pytest.fixture(scope="module")
def greedy_off(engines, prompts) -> list[list[int]]:
    return token_ids(engines["off"], prompts)


def assert_no_leaks(llm: LLM) -> None:
    """Both KV caches: books consistent, nothing referenced once every request is done."""
    engine = llm.engine
    for kv in (engine.kv_manager, engine.draft_proposer.kv_manager):
        kv.check_integrity()
        assert kv.usage == 0.0
    assert not engine.draft_proposer._states


def test_off_equals_transformers_greedy(pair, prompts, greedy_off):
    """The peer of every equality below is itself right: transformers' generate() on the target."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(pair[0]).eval()
    for prompt, ids in zip(prompts[:4], greedy_off[:4]):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NUM_NEW_TOKENS, do_sample=False,
                             min_new_tokens=NUM_NEW_TOKENS, pad_token_id=0)
        assert out[0, len(prompt):].tolist() == ids


@pytest.mark.parametrize("which", ["draft", "self"])
def test_greedy_identical_at_batch_1_and_16(engines, prompts, greedy_off, which):
    llm = engines[which]
    before = llm.engine.get_stats()
    assert [token_ids(llm, [p])[0] for p in prompts[:2]] == greedy_off[:2]
    assert token_ids(llm, prompts) == greedy_off
    after = llm.engine.get_stats()
    num_draft = after.num_spec_draft_tokens - before.num_spec_draft_tokens
    num_accepted = after.num_spec_accepted_tokens - before.num_spec_accepted_tokens
    assert 0 < num_accepted < num_draft  # accepted and rejected proposals both happened
    assert_no_leaks(llm)


def test_gemma3_self_draft_greedy_equals_off_and_transformers(tmp_path, tiny_hf_tokenizer_dir, prompts):
    """A Gemma 3 target (a sliding layer, then a global one) with `self:1`: its own forward's early exit, the
    same greedy tokens as speculation off, and those equal transformers' generate()."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_tokenizer_dir)
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=12,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20.0)  # peaked logits: greedy ties cannot decide the comparison
    model.save_pretrained(tmp_path / "gemma")
    tokenizer.save_pretrained(tmp_path / "gemma")
    off = make_llm(tmp_path / "gemma", "off")
    self_draft = make_llm(tmp_path / "gemma", "draft", "self:1")
    some = prompts[:4]
    expected = token_ids(off, some)
    assert token_ids(self_draft, some) == expected
    stats = self_draft.engine.get_stats()
    assert stats.num_spec_draft_tokens > 0 and stats.num_spec_accepted_tokens > 0  # the early exit did propose
    with torch.no_grad():
        for prompt, ours in zip(some, expected, strict=True):
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=NUM_NEW_TOKENS, do_sample=False,
                                 min_new_tokens=NUM_NEW_TOKENS)[0, len(prompt):].tolist()  # fmt: skip
            assert list(ours) == ref
    assert_no_leaks(self_draft)


def test_self_draft_shares_the_target_weights_and_proposes_as_the_copied_draft(engines, prompts):
    """self:1 is a view over the target (no parameter of its own), and proposes exactly what the 1-layer
    checkpoint holding the same weights proposes."""
    own, view = engines["draft"].engine, engines["self"].engine
    draft_model = view.draft_proposer.runner.model
    assert draft_model.target is view.model and not hasattr(draft_model, "parameters")
    for engine in (own, view):
        engine.add_request("probe", prompts[3], greedy())
    proposals = {id(own): [], id(view): []}
    while own.has_unfinished_requests() or view.has_unfinished_requests():
        for engine in (own, view):
            if engine.has_unfinished_requests():
                engine.step()
                req = engine.scheduler.get_request("probe")
                if req is not None and req.spec_token_ids:
                    proposals[id(engine)].append(list(req.spec_token_ids))
    assert proposals[id(own)] and proposals[id(own)] == proposals[id(view)]


@pytest.mark.parametrize("which", ["draft", "self"])
def test_greedy_identical_under_preemption_with_prefix_hits_and_n(pair, prompts, greedy_off, which):
    """A KV cache of 12 blocks (192 tokens) for 6 sequences of up to 64 tokens: recompute preemption, look-ahead
    often refused; then the same prompts again (prefix hits in both caches) and n = 3 siblings."""
    target, draft = pair
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # K and V, 2 layers, 16 slots, 2 KV heads of 16 dims, float32
    small = make_llm(target, "draft", str(draft) if which == "draft" else "self:1", kv_cache_memory=12 * block_bytes)
    chosen = [prompts[i] for i in (3, 4, 10, 7, 12, 13)]
    expected = [greedy_off[i] for i in (3, 4, 10, 7, 12, 13)]
    engine = small.engine
    for i, prompt in enumerate(chosen):
        engine.add_request(f"p{i}", prompt, greedy())
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out.outputs[0].token_ids
        # The runner's own per-request state (built from the scheduler's diffs) equals the scheduler's.
        for req in engine.scheduler.running:
            state = engine.runner.requests[req.request_id]
            assert state.all_token_ids == req.all_token_ids and state.output_token_ids == req.output_token_ids
            assert state.num_computed_tokens <= req.num_computed_tokens
        assert set(engine.runner.requests) <= {r.request_id for r in engine.scheduler.running}
    assert [outputs[f"p{i}"] for i in range(len(chosen))] == expected
    stats = small.engine.get_stats()
    assert stats.num_preemptions > 0 and stats.num_spec_accepted_tokens > 0
    assert_no_leaks(small)

    draft_kv = small.engine.draft_proposer.kv_manager
    assert token_ids(small, chosen[1:2]) == expected[1:2]  # its prompt blocks are cached now, in both caches
    hits_before = (small.engine.get_stats().num_prefix_cache_hits_tokens, draft_kv.num_prefix_cache_hits_tokens)
    assert token_ids(small, chosen[1:2]) == expected[1:2]
    assert small.engine.get_stats().num_prefix_cache_hits_tokens > hits_before[0]
    assert draft_kv.num_prefix_cache_hits_tokens > hits_before[1]
    outs = small.generate([chosen[0]], greedy(n=3))[0].outputs
    assert [o.token_ids for o in outs] == [expected[0]] * 3
    assert_no_leaks(small)


def test_stops_inside_an_accepted_run(engines, prompts, greedy_off):
    """A stop token id, a stop string and max_tokens landing in the middle of a multi-token step: the same output
    as with speculation off."""
    spec, off = engines["draft"], engines["off"]
    engine = spec.engine
    runs: list[tuple[int, int, int]] = []  # (prompt index, first output index, length) of each step's new tokens
    for i, prompt in enumerate(prompts):
        engine.add_request(f"probe-{i}", prompt, greedy())
    while engine.has_unfinished_requests():
        for out in engine.step():
            new = out.delta_token_ids[0]
            if len(new) >= 3:
                runs.append((int(out.request_id.split("-")[1]), len(out.outputs[0].token_ids) - len(new), len(new)))
    assert runs
    tok = spec.tokenizer
    num_checked_strings = 0
    for index, start, _ in runs[:6]:
        middle = start + 1  # a token accepted from a proposal, with more accepted after it
        full_ids = greedy_off[index]
        prompt = prompts[index]
        for params in (greedy(stop_token_ids=[full_ids[middle]]), greedy(max_tokens=middle + 1)):
            a, b = spec.generate([prompt], params)[0].outputs[0], off.generate([prompt], params)[0].outputs[0]
            assert (a.token_ids, a.finish_reason, a.stop_reason) == (b.token_ids, b.finish_reason, b.stop_reason)
            assert len(a.token_ids) <= middle + 1
        piece = tok.decode(full_ids[: middle + 1])[len(tok.decode(full_ids[:middle])):]
        if piece.strip() and piece.isprintable():
            params = greedy(stop=[piece.strip()])
            a, b = spec.generate([prompt], params)[0].outputs[0], off.generate([prompt], params)[0].outputs[0]
            assert (a.text, a.token_ids, a.finish_reason) == (b.text, b.token_ids, b.finish_reason)
            assert a.finish_reason == "stop" and a.stop_reason == piece.strip()
            num_checked_strings += 1
    assert num_checked_strings > 0
    assert_no_leaks(spec)


def test_auto_uses_the_draft_and_turns_down_under_a_large_batch(pair, prompts, greedy_off):
    target, draft = pair
    auto = make_llm(target, "auto", str(draft))
    assert auto.engine.spec_policy.draft is auto.engine.draft_proposer
    assert token_ids(auto, [prompts[0]]) == greedy_off[:1]
    assert auto.engine.get_stats().num_spec_draft_tokens > 0
    before = auto.engine.get_stats().num_spec_draft_tokens
    auto.engine.spec_policy.max_running_requests = 4
    assert token_ids(auto, prompts) == greedy_off
    after = auto.engine.get_stats().num_spec_draft_tokens
    # 16 run at once: no proposals until at most 4 are left.
    assert after - before < sum(map(len, greedy_off)) / 2
    assert_no_leaks(auto)


def test_draft_config_errors(pair, tiny_sentencepiece_hf_dir, tmp_path):
    target, _ = pair
    with pytest.raises(ValueError, match="^speculative 'draft' needs speculative_model"):
        make_llm(target, "draft")
    with pytest.raises(ValueError, match="^speculative_model: a self-draft takes 1 to 1 "):
        make_llm(target, "draft", "self:2")
    with pytest.raises(ValueError, match="^speculative_model: 'self:K'"):
        make_llm(target, "draft", "self:x")
    with pytest.raises(ValueError, match="^speculative_model: unknown model .*missing"):
        LLM(model=str(target), speculative="draft", speculative_model=str(tmp_path / "missing"))
    # A draft with another tokenizer is refused.
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(tiny_sentencepiece_hf_dir)
    _, other_draft = save_pair(tmp_path, other, 535, 1.0, 1.0)
    with pytest.raises(ValueError, match="^speculative_model: .* different tokenizer vocabulary"):
        make_llm(target, "draft", str(other_draft))


def test_cli_flags():
    import argparse

    from inferd.config import EngineArgs

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    args = EngineArgs.from_cli(parser.parse_args(["--speculative", "draft", "--speculative-model", "self:4",
                                                  "--num-speculative-tokens", "3"]))
    assert (args.speculative, args.speculative_model, args.num_speculative_tokens) == ("draft", "self:4", 3)
    assert EngineArgs.from_cli(parser.parse_args([])).speculative_model is None


# ---------------------------------------------------------------------------------------------- sampling
@pytest.fixture(scope="module")
def small_vocab_pair(tmp_path_factory) -> tuple[Path, Path]:
    """Vocabulary 24 (a word-level tokenizer), so the joint of two tokens has 576 cells."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, **{f"w{i}": i for i in range(1, 24)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<eos>")
    return save_pair(tmp_path_factory.mktemp("spec_pair_24"), tokenizer, 24, head_scale=3.0,
                     second_layer_scale=0.7, max_positions=16)


def test_proposals_carry_the_draft_distribution_and_the_sampler_gets_it(small_vocab_pair, monkeypatch):
    """q handed to Sampler.verify is the draft checkpoint's own distribution (transformers), at the request's
    temperature and top_k, for each proposal given the ones before it."""
    from transformers import LlamaForCausalLM

    target, draft = small_vocab_pair
    llm = make_llm(target, "draft", str(draft), max_num_seqs=8, max_model_len=16)
    seen: list[tuple[list[int], list[int], torch.Tensor]] = []  # (context, proposals, q)
    real_verify = Sampler.verify
    engine = llm.engine

    def spy(self, logits, md, proposals, generators, proposal_probs=None):
        req = engine.scheduler.get_request("q")
        assert proposal_probs is not None and proposal_probs[0] is not None
        seen.append((list(req.all_token_ids), list(proposals[0]), proposal_probs[0].clone()))
        return real_verify(self, logits, md, proposals, generators, proposal_probs)

    monkeypatch.setattr(Sampler, "verify", spy)
    params = SamplingParams(temperature=0.7, top_k=10, max_tokens=10, ignore_eos=True)
    engine.add_request("q", [1, 2, 3], params)
    while engine.has_unfinished_requests():
        engine.step()
    assert seen
    hf = LlamaForCausalLM.from_pretrained(draft).eval()
    for context, proposals, q in seen:
        assert q.shape == (len(proposals), 24)
        with torch.no_grad():
            logits = hf(torch.tensor([context + proposals[:-1]])).logits[0, len(context) - 1:].double() / 0.7
        kth = logits.topk(10, dim=-1).values[:, -1:]
        expected = logits.masked_fill(logits < kth, float("-inf")).softmax(-1)
        torch.testing.assert_close(q.double(), expected, atol=2e-5, rtol=1e-4)
        assert all(q[j, d] > 0 for j, d in enumerate(proposals))


def chi_square_pvalue(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Cells expected below 5 draws are pooled into one."""
    expected = expected_probs * counts.sum()
    big = expected >= 5
    observed, wanted = counts[big], expected[big]
    if (~big).any():
        observed = torch.cat([observed, counts[~big].sum()[None]])
        wanted = torch.cat([wanted, expected[~big].sum()[None]])
    return chisquare(observed.numpy(), wanted.numpy() * observed.sum().item() / wanted.sum().item()).pvalue


@pytest.fixture(scope="module")
def small_vocab_logits(small_vocab_pair):
    """transformers logits of the target and the draft after [1, 2], [1, 2, a], [1, 2, a, b], [1, 2, a, b, c]."""
    from transformers import LlamaForCausalLM

    v = 24
    triples = torch.cartesian_prod(torch.arange(v), torch.arange(v), torch.arange(v))  # [V^3, 3]
    ids = torch.cat([torch.tensor([[1, 2]]).expand(v**3, 2), triples], dim=1)
    out = {}
    for name, path in zip(("target", "draft"), small_vocab_pair):
        with torch.no_grad():
            logits = LlamaForCausalLM.from_pretrained(path).eval()(ids).logits.float()  # [V^3, 5, V]
        out[name] = (logits[0, 1], logits[:: v * v, 2], logits[::v, 3].reshape(v, v, v),
                     logits[:, 4].reshape(v, v, v, v))
    return out


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0),
                                    SamplingParams(temperature=0.8, top_k=12, top_p=0.95, repetition_penalty=1.2)],
                         ids=["plain", "filters+penalty"])
def test_next_two_tokens_keep_the_target_distribution(small_vocab_logits, params):
    """20k draws: t1 = a from the target, then 2 proposals drawn from the draft's own distribution (q1 after a,
    q2 after a, d1: context-dependent, as the draft model gives them) verified at once. Chi-square of the two
    tokens after a against the target's exact p(b, c) = sum_a p(a) p(b | a) p(c | a, b)."""
    from test_spec_decode import target_probs, verify_rows

    from inferd.layers.sampler import build_sampling_metadata

    t0, t1, t2, t3 = small_vocab_logits["target"]
    _, q1_logits, q2_logits, _ = small_vocab_logits["draft"]
    v, num_draws = 24, 20_000
    gen = torch.Generator().manual_seed(3)
    p0 = target_probs(t0, [], params)
    p1 = torch.stack([target_probs(t1[a], [a], params) for a in range(v)])  # [a, b]
    p2 = torch.stack([torch.stack([target_probs(t2[a, b], [a, b], params) for b in range(v)])
                      for a in range(v)])  # [a, b, c]
    q1 = torch.stack([target_probs(q1_logits[a], [a], params) for a in range(v)]).float()  # the draft's, [a, d1]
    q2 = torch.stack([torch.stack([target_probs(q2_logits[a, d], [a, d], params) for d in range(v)])
                      for a in range(v)]).float()  # [a, d1, d2]
    firsts = torch.multinomial(p0, num_draws, replacement=True, generator=gen).tolist()
    props, probs, rows = [], [], []
    for a in firsts:
        d1 = int(torch.multinomial(q1[a], 1, generator=gen))
        d2 = int(torch.multinomial(q2[a, d1], 1, generator=gen))
        props.append([d1, d2])
        probs.append(torch.stack([q1[a], q2[a, d1]]))
        rows.append(torch.stack([t1[a], t2[a, d1], t3[a, d1, d2]]))
    sampler = Sampler(torch.Generator().manual_seed(4))
    out = verify_rows(sampler, torch.cat(rows), [params] * num_draws, [[a] for a in firsts], props,
                      proposal_probs=probs)
    pairs = [ids[:2] for ids in out.token_ids if len(ids) >= 2]
    short = [(a, ids[0]) for a, ids in zip(firsts, out.token_ids) if len(ids) == 1]
    assert pairs and short  # accepted and rejected proposals both happened
    md = build_sampling_metadata([params] * len(short), [[1, 2]] * len(short), [[a, b] for a, b in short],
                                 [None] * len(short), [frozenset({0})] * len(short), v, "cpu")
    third = sampler(torch.stack([t2[a, b] for a, b in short]), md).sampled_token_ids
    pairs += [[b, c] for (_, b), c in zip(short, third)]
    counts = torch.zeros(v, v, dtype=torch.float64)
    for b, c in pairs:
        counts[b, c] += 1
    expected = torch.einsum("a,ab,abc->bc", p0, p1, p2)
    assert counts[expected == 0].sum() == 0
    assert chi_square_pvalue(counts, expected) > 1e-3


def test_engine_samples_the_target_distribution_with_the_draft(small_vocab_pair, small_vocab_logits):
    """End to end through the engine: 600 sequences after [1, 2] (6 requests x n = 100), the second token drawn
    under speculation (1 draft proposal, its q). Chi-square of that token against sum_a p(a) p(b | a)."""
    target, draft = small_vocab_pair
    llm = make_llm(target, "draft", str(draft), max_num_seqs=256, max_num_batched_tokens=2048, max_model_len=16)
    outs = llm.generate([[1, 2]] * 6, SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True, n=100))
    stats = llm.engine.get_stats()
    assert 0 < stats.num_spec_accepted_tokens < stats.num_spec_draft_tokens
    assert_no_leaks(llm)
    counts = torch.zeros(24, dtype=torch.float64)
    for out in outs:
        for completion in out.outputs:
            counts[completion.token_ids[1]] += 1
    t0, t1, _, _ = small_vocab_logits["target"]
    expected = t0.double().softmax(-1) @ t1.double().softmax(-1)
    assert chi_square_pvalue(counts, expected) > 1e-3


# ---------------------------------------------------------------------------------------------- server
def test_server_draft_greedy_equals_off(pair):
    """`inferd serve --speculative draft --speculative-model DIR` through the official openai client: greedy
    completions (plain and streamed) equal those of requests with speculation off, and the draft counters rose."""
    import httpx
    from openai import OpenAI
    from server_fixtures import start_inferd_server, stop_inferd_server

    target, draft = pair
    server = start_inferd_server(["--max-model-len", "256", "--speculative", "draft", "--speculative-model", str(draft)],
                                 model=str(target))
    try:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
        texts = ["The quick brown fox", "def add(a, b):", "Numbers: 12345, 3.14", "I'm sure you've seen it"]
        for text in texts:
            common = dict(model=server.model_name, prompt=text, max_tokens=20, temperature=0)
            spec = client.completions.create(**common, extra_body={"ignore_eos": True})
            off = client.completions.create(**common, extra_body={"ignore_eos": True, "speculative": False})
            assert spec.choices[0].text == off.choices[0].text
            streamed = "".join(c.choices[0].text for c in client.completions.create(
                **common, stream=True, extra_body={"ignore_eos": True}) if c.choices)
            assert streamed == off.choices[0].text
        metrics = httpx.get(server.base_url + "/metrics").text
        accepted = [line for line in metrics.splitlines()
                    if line.startswith("inferd:spec_decode_num_accepted_tokens_total")]
        assert accepted and float(accepted[0].rsplit(" ", 1)[1]) > 0
    finally:
        stop_inferd_server(server.process)
