"""Sampler against independent references: transformers' logits processors and warpers, the OpenAI penalty
formula, torch.log_softmax, and scipy's chi-square test for the drawn distributions."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from inferd.layers.sampler import (
    Sampler,
    SamplingMetadata,
    apply_logit_edits,
    apply_sampling_filters,
    build_sampling_metadata,
)
from inferd.request import SamplingParams

EOS_TOKEN_ID = 7


def make_metadata(
    params: list[SamplingParams],
    vocab_size: int,
    *,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    eos_token_ids: frozenset[int] = frozenset({EOS_TOKEN_ID}),
) -> SamplingMetadata:
    """Builds metadata the way the model runner does: a fresh generator seeded from params.seed, else None."""
    num_rows = len(params)
    generators = [None if p.seed is None else torch.Generator().manual_seed(p.seed) for p in params]
    return build_sampling_metadata(
        params,
        prompts if prompts is not None else [[] for _ in range(num_rows)],
        outputs if outputs is not None else [[] for _ in range(num_rows)],
        generators,
        [eos_token_ids] * num_rows,
        vocab_size,
        "cpu",
    )


def hf_filtered_logits(logits_row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[V] -> [V]: transformers' warpers in the order generate() applies them; dropped tokens are -inf."""
    input_ids = torch.zeros(1, 1, dtype=torch.int64)
    scores = TemperatureLogitsWarper(float(params.temperature))(input_ids, logits_row[None].clone())
    if params.top_k > 0:
        scores = TopKLogitsWarper(params.top_k)(input_ids, scores)
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(input_ids, scores)
    if params.min_p > 0.0:
        scores = MinPLogitsWarper(params.min_p)(input_ids, scores)
    return scores[0]


def hf_repetition_penalized(logits_row: torch.Tensor, seen_token_ids: list[int], penalty: float) -> torch.Tensor:
    if not seen_token_ids:
        return logits_row.clone()
    processor = RepetitionPenaltyLogitsProcessor(penalty=float(penalty))
    return processor(torch.tensor([seen_token_ids]), logits_row[None].clone())[0]


def openai_penalized(
    logits_row: torch.Tensor, output_ids: list[int], presence: float, frequency: float
) -> torch.Tensor:
    """The formula from OpenAI's API docs: mu[j] - c[j] * frequency - (c[j] > 0) * presence."""
    penalized = logits_row.clone()
    for token_id, count in Counter(output_ids).items():
        penalized[token_id] -= count * frequency + presence
    return penalized


# ---------------------------------------------------------------------------------------------- greedy and edits


def test_greedy_rows_take_argmax_in_a_mixed_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(12, 1000)
    params = [
        SamplingParams(temperature=0.0) if i % 3 == 0
        else SamplingParams(temperature=0.8, top_k=1) if i % 3 == 1
        else SamplingParams(temperature=1.0)
        for i in range(12)
    ]
    out = Sampler(torch.Generator().manual_seed(1))(logits, make_metadata(params, 1000))
    expected = logits.argmax(dim=-1).tolist()
    for row, p in enumerate(params):
        if p.is_greedy:
            assert out.sampled_token_ids[row] == expected[row]

    all_greedy = [SamplingParams(temperature=0.0)] * 12
    assert Sampler()(logits, make_metadata(all_greedy, 1000)).sampled_token_ids == expected


def test_sampler_leaves_input_logits_unchanged() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 100)
    before = logits.clone()
    params = [
        SamplingParams(temperature=0.5, top_k=5, top_p=0.8, min_p=0.1, logit_bias={1: 3.0}, repetition_penalty=1.5),
        SamplingParams(temperature=0.0, presence_penalty=1.0, frequency_penalty=0.5, min_tokens=2),
        SamplingParams(temperature=1.0),
    ]
    Sampler()(logits, make_metadata(params, 100, prompts=[[1, 2]] * 3, outputs=[[3, 3]] * 3))
    assert torch.equal(logits, before)


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty: float) -> None:
    torch.manual_seed(1)
    vocab_size = 300
    logits = torch.randn(4, vocab_size) * 3
    prompts = [[5, 6, 7, 5], [10, 11], [], [20, 21, 22]]
    outputs = [[8, 8, 9], [], [30, 31, 30], [21, 40]]
    # Row 1 keeps penalty 1.0: it must come out untouched while its neighbours are penalized.
    params = [SamplingParams(temperature=0.0, repetition_penalty=penalty if row != 1 else 1.0) for row in range(4)]
    md = make_metadata(params, vocab_size, prompts=prompts, outputs=outputs)

    edited = apply_logit_edits(logits, md)
    for row, p in enumerate(params):
        expected = hf_repetition_penalized(logits[row], prompts[row] + outputs[row], p.repetition_penalty)
        torch.testing.assert_close(edited[row], expected, rtol=0, atol=0)
    out = Sampler()(logits, md)
    assert out.sampled_token_ids == [
        int(hf_repetition_penalized(logits[row], prompts[row] + outputs[row], p.repetition_penalty).argmax())
        for row, p in enumerate(params)
    ]


def test_presence_and_frequency_penalties_count_output_tokens_only() -> None:
    torch.manual_seed(2)
    vocab_size = 200
    logits = torch.randn(4, vocab_size)
    prompts = [[1, 2, 3], [4, 4, 4], [5], [6]]
    outputs = [[1, 10, 10, 10, 11], [4, 12], [], [13, 13]]
    settings = [(0.5, 0.0), (0.0, 0.7), (1.5, -0.4), (-2.0, 2.0)]  # (presence, frequency)
    params = [SamplingParams(temperature=0.0, presence_penalty=pr, frequency_penalty=fr) for pr, fr in settings]
    md = make_metadata(params, vocab_size, prompts=prompts, outputs=outputs)
    assert md.repetition is None  # no row asked for a repetition penalty: no seen-token mask is built

    edited = apply_logit_edits(logits, md)
    for row, (presence, frequency) in enumerate(settings):
        expected = openai_penalized(logits[row], outputs[row], presence, frequency)
        torch.testing.assert_close(edited[row], expected, rtol=0, atol=1e-6)


def test_all_edits_apply_in_documented_order() -> None:
    """bias -> min_tokens -> repetition -> presence/frequency, against the references chained by hand."""
    torch.manual_seed(3)
    vocab_size = 64
    logits = torch.randn(2, vocab_size) * 2
    prompts = [[1, 2, 3, 3], [4, 5]]
    outputs = [[2, 9, 9], [5, 5, 6, 50]]
    params = [
        SamplingParams(
            temperature=0.0, logit_bias={2: 1.5, 9: -0.75, 60: 4.0}, min_tokens=5, stop_token_ids=[11],
            repetition_penalty=1.7, presence_penalty=0.3, frequency_penalty=0.2,
        ),
        SamplingParams(temperature=0.0, logit_bias={5: -2.0}, repetition_penalty=0.8, frequency_penalty=1.0),
    ]
    md = make_metadata(params, vocab_size, prompts=prompts, outputs=outputs)
    edited = apply_logit_edits(logits, md)
    for row, p in enumerate(params):
        expected = logits[row].clone()
        for token_id, bias in p.logit_bias.items():
            expected[token_id] += bias
        if len(outputs[row]) < p.min_tokens:
            expected[[EOS_TOKEN_ID, *p.stop_token_ids]] = -math.inf
        expected = hf_repetition_penalized(expected, prompts[row] + outputs[row], p.repetition_penalty)
        expected = openai_penalized(expected, outputs[row], p.presence_penalty, p.frequency_penalty)
        torch.testing.assert_close(edited[row], expected, rtol=0, atol=1e-6)


def test_min_tokens_masks_eos_and_stop_tokens() -> None:
    vocab_size = 100
    stop_token_id = 9
    logits = torch.zeros(1, vocab_size)
    logits[0, EOS_TOKEN_ID] = 10.0
    logits[0, stop_token_id] = 9.0
    logits[0, 42] = 8.0

    def greedy_token(num_output_tokens: int, **kwargs) -> int:
        params = [SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[stop_token_id], **kwargs)]
        md = make_metadata(params, vocab_size, outputs=[[1] * num_output_tokens])
        return Sampler()(logits, md).sampled_token_ids[0]

    assert greedy_token(0) == 42
    assert greedy_token(2) == 42
    assert greedy_token(2, ignore_eos=True) == 42  # vLLM masks EOS under min_tokens even with ignore_eos
    assert greedy_token(3) == EOS_TOKEN_ID

    # Random rows: 2000 draws where EOS and the stop token hold ~80% of the mass, none of them may appear.
    num_rows = 2000
    params = [SamplingParams(temperature=1.0, min_tokens=1, stop_token_ids=[stop_token_id])] * num_rows
    out = Sampler(torch.Generator().manual_seed(4))(logits.expand(num_rows, -1), make_metadata(params, vocab_size))
    assert not {EOS_TOKEN_ID, stop_token_id} & set(out.sampled_token_ids)


def test_logit_bias_bans_and_forces_tokens() -> None:
    torch.manual_seed(5)
    vocab_size = 500
    logits = torch.randn(1, vocab_size)
    top_two = logits[0].topk(2).indices.tolist()
    least_likely = int(logits[0].argmin())

    def greedy(logit_bias: dict[int, float]) -> int:
        md = make_metadata([SamplingParams(temperature=0.0, logit_bias=logit_bias)], vocab_size)
        return Sampler()(logits, md).sampled_token_ids[0]

    assert greedy({top_two[0]: -100.0}) == top_two[1]
    assert greedy({least_likely: 100.0}) == least_likely
    assert greedy({vocab_size + 3: 100.0}) == top_two[0]  # an id outside the vocabulary cannot be drawn anyway

    num_rows = 2000
    batch_logits = logits.expand(num_rows, -1)
    sampler = Sampler(torch.Generator().manual_seed(6))
    forced = [SamplingParams(temperature=1.0, logit_bias={least_likely: 100.0})] * num_rows
    assert set(sampler(batch_logits, make_metadata(forced, vocab_size)).sampled_token_ids) == {least_likely}
    # A flat-ish distribution over 500 tokens: the top token would appear ~2000 * 1% times without the ban.
    banned = [SamplingParams(temperature=2.0, logit_bias={top_two[0]: -100.0})] * num_rows
    assert top_two[0] not in sampler(batch_logits, make_metadata(banned, vocab_size)).sampled_token_ids


# ----------------------------------------------------------------------------------------------- filtering

FILTER_CASES = [
    SamplingParams(temperature=0.6),
    SamplingParams(temperature=1.7),
    SamplingParams(top_k=4),
    SamplingParams(top_k=40, temperature=0.8),
    SamplingParams(top_p=0.5),
    SamplingParams(top_p=0.93, temperature=1.3),
    SamplingParams(min_p=0.2),
    SamplingParams(min_p=0.05, temperature=0.7),
    SamplingParams(top_k=30, top_p=0.8, min_p=0.1, temperature=1.2),
    SamplingParams(top_k=3, top_p=0.999),
    SamplingParams(top_p=1e-6),  # keeps only the most likely token
]


# Every top_p row here also has a top_k, so top_p ranks only top-k candidates instead of sorting the vocabulary.
TOP_K_THEN_TOP_P_CASES = [
    SamplingParams(top_k=30, top_p=0.8, temperature=1.2),
    SamplingParams(top_k=3, top_p=0.999),
    SamplingParams(top_k=12, top_p=0.5, min_p=0.02, temperature=0.7),
    SamplingParams(top_k=20, top_p=1e-6),
    SamplingParams(top_k=5),
]


@pytest.mark.parametrize(
    ("cases", "num_candidates"), [(FILTER_CASES, None), (TOP_K_THEN_TOP_P_CASES, 30)], ids=["sort", "topk"]
)
def test_filters_match_transformers_warpers(cases: list[SamplingParams], num_candidates: int | None) -> None:
    """Surviving token set and renormalized probabilities, every case in one batch with greedy rows between."""
    torch.manual_seed(7)
    vocab_size = 400
    params: list[SamplingParams] = []
    for case in cases:
        params += [case, SamplingParams(temperature=0.0)]
    logits = torch.randn(len(params), vocab_size) * 2.5
    md = make_metadata(params, vocab_size)
    assert md.top_p_num_candidates == num_candidates
    filtered = apply_sampling_filters(apply_logit_edits(logits, md), md)
    assert md.random_row_ids.tolist() == list(range(0, len(params), 2))

    num_kept_per_row = []
    for position, row in enumerate(md.random_row_ids.tolist()):
        expected = hf_filtered_logits(logits[row], params[row])
        is_kept = torch.isfinite(filtered[position])
        assert torch.equal(is_kept, torch.isfinite(expected)), params[row]
        torch.testing.assert_close(filtered[position].softmax(-1), expected.softmax(-1), rtol=0, atol=1e-6)
        num_kept_per_row.append(int(is_kept.sum()))
    # The cases do filter: top_p=1e-6 keeps one token, and no case keeps the whole vocabulary.
    assert num_kept_per_row[-1 if cases is FILTER_CASES else 3] == 1
    assert max(num_kept_per_row[2:]) < vocab_size


@pytest.mark.parametrize("logit_scales", [(6.0, 4.0), (6.0, 0.3)], ids=["narrow", "one-wide"])
def test_top_p_over_a_large_vocabulary_matches_transformers(logit_scales: tuple[float, ...]) -> None:
    """V large enough that top_p first ranks only a partial topk; a flat row's nucleus outgrows it."""
    torch.manual_seed(15)
    vocab_size = 10_000
    logits = torch.cat([torch.randn(1, vocab_size) * scale for scale in logit_scales])
    params = [SamplingParams(top_p=0.9), SamplingParams(top_p=0.95, temperature=1.1)]
    md = make_metadata(params, vocab_size)
    assert md.top_p_num_candidates is None
    filtered = apply_sampling_filters(logits, md)
    nucleus_sizes = []
    for row, p in enumerate(params):
        expected = hf_filtered_logits(logits[row], p)
        assert torch.equal(torch.isfinite(filtered[row]), torch.isfinite(expected)), row
        torch.testing.assert_close(filtered[row].softmax(-1), expected.softmax(-1), rtol=0, atol=1e-6)
        nucleus_sizes.append(int(torch.isfinite(expected).sum()))
    assert nucleus_sizes[0] < 1024 and (nucleus_sizes[1] < 1024) == (logit_scales[1] > 1), nucleus_sizes


@pytest.mark.parametrize("vocab_size", [64, 10_000])
def test_top_p_below_float32_keeps_the_most_likely_token(vocab_size: int) -> None:
    """A valid top_p so small it rounds to 0 in float32 (hypothesis found 4.06e-82) keeps one token, as
    transformers' TopPLogitsWarper does, instead of indexing past the row."""
    torch.manual_seed(3)
    logits = torch.randn(2, vocab_size) * 3
    params = [SamplingParams(top_p=4.06e-82), SamplingParams(top_p=1e-45, temperature=0.7)]
    md = make_metadata(params, vocab_size)
    filtered = apply_sampling_filters(logits, md)
    for row, p in enumerate(params):
        expected = hf_filtered_logits(logits[row], p)
        assert torch.equal(torch.isfinite(filtered[row]), torch.isfinite(expected)), row
        assert torch.isfinite(filtered[row]).nonzero()[:, 0].tolist() == [int(logits[row].argmax())]


def test_ties_at_the_cut_all_survive() -> None:
    """top_k keeps every token tied with the k-th (as transformers does); top_p cuts at a logit, so ties stay."""
    vocab_size = 64
    logits = torch.full((1, vocab_size), -4.0)
    logits[0, :5] = torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0])
    top_k_only = SamplingParams(top_k=2)
    md = make_metadata([top_k_only], vocab_size)
    filtered = apply_sampling_filters(logits, md)[0]
    assert torch.equal(torch.isfinite(filtered), torch.isfinite(hf_filtered_logits(logits[0], top_k_only)))
    assert torch.isfinite(filtered).nonzero()[:, 0].tolist() == [0, 1, 2, 3]

    # Token 0 holds ~47% of the mass after top-k; reaching 60% needs one token of value 2, and all three tie.
    for params in [SamplingParams(top_k=2, top_p=0.6), SamplingParams(top_p=0.6)]:
        md = make_metadata([params], vocab_size)
        assert md.top_p_num_candidates == (2 if params.top_k else None)
        kept = torch.isfinite(apply_sampling_filters(logits, md)[0]).nonzero()[:, 0].tolist()
        assert kept == [0, 1, 2, 3], params


def test_tokens_outside_the_filtered_set_are_never_drawn() -> None:
    torch.manual_seed(8)
    vocab_size = 2000
    logits_row = torch.randn(vocab_size) * 2
    rows_per_case = 300
    params = [case for case in FILTER_CASES for _ in range(rows_per_case)]
    out = Sampler(torch.Generator().manual_seed(9))(
        logits_row.expand(len(params), -1), make_metadata(params, vocab_size)
    )
    for index, case in enumerate(FILTER_CASES):
        allowed = set(torch.isfinite(hf_filtered_logits(logits_row, case)).nonzero()[:, 0].tolist())
        drawn = set(out.sampled_token_ids[index * rows_per_case : (index + 1) * rows_per_case])
        assert drawn <= allowed, case


# ---------------------------------------------------------------------------------------------- distribution

TINY_LOGITS = torch.tensor([2.0, 1.6, 1.1, 0.7, 0.2, -0.3, -0.9, -1.6])
DISTRIBUTION_CASES = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=2.0),
    SamplingParams(top_k=3),
    SamplingParams(top_p=0.7),
    SamplingParams(min_p=0.25),
    SamplingParams(top_k=6, top_p=0.9, min_p=0.1, temperature=1.4),
]


def assert_matches_distribution(drawn_ids: list[int], params: SamplingParams) -> None:
    expected_probs = hf_filtered_logits(TINY_LOGITS.double(), params).softmax(-1)
    counts = torch.bincount(torch.tensor(drawn_ids), minlength=len(TINY_LOGITS)).double()
    is_possible = expected_probs > 0
    assert counts[~is_possible].sum() == 0, (params, counts)
    expected_counts = expected_probs[is_possible] * len(drawn_ids)
    result = chisquare(counts[is_possible].numpy(), expected_counts.numpy())
    assert result.pvalue > 1e-3, (params, counts.tolist(), expected_counts.tolist())


@pytest.mark.parametrize(
    "params", DISTRIBUTION_CASES, ids=lambda p: f"t{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}"
)
def test_drawn_distribution_matches_reference(params: SamplingParams) -> None:
    num_draws = 20_000
    md = make_metadata([params] * num_draws, len(TINY_LOGITS))
    out = Sampler(torch.Generator().manual_seed(10))(TINY_LOGITS.expand(num_draws, -1), md)
    assert_matches_distribution(out.sampled_token_ids, params)


def test_drawn_distribution_with_per_row_generators() -> None:
    """The seeded path (one generator per row) draws from the same distribution as the shared one."""
    num_draws = 5_000
    params = [SamplingParams(top_p=0.9, temperature=1.2, seed=seed) for seed in range(num_draws)]
    out = Sampler()(TINY_LOGITS.expand(num_draws, -1), make_metadata(params, len(TINY_LOGITS)))
    assert_matches_distribution(out.sampled_token_ids, params[0])


# ---------------------------------------------------------------------------------------------- seeds


def draw_steps(sampler: Sampler, logits_steps: list[torch.Tensor], params: list[SamplingParams]) -> list[list[int]]:
    """Several decode steps with one generator per seeded row kept across steps, as the runner keeps them."""
    generators = [None if p.seed is None else torch.Generator().manual_seed(p.seed) for p in params]
    tokens_per_step = []
    for logits in logits_steps:
        md = build_sampling_metadata(
            params, [[]] * len(params), [[]] * len(params), generators,
            [frozenset()] * len(params), logits.shape[1], "cpu",
        )
        tokens_per_step.append(sampler(logits, md).sampled_token_ids)
    return tokens_per_step


def test_seeded_request_draws_the_same_tokens_alone_and_in_a_batch() -> None:
    torch.manual_seed(11)
    vocab_size, num_steps, target_row = 1000, 12, 3
    target_logits = [torch.randn(1, vocab_size) for _ in range(num_steps)]
    target = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)

    alone = [step[0] for step in draw_steps(Sampler(torch.Generator().manual_seed(0)), target_logits, [target])]

    neighbours = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, seed=99),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.1, top_k=20),
    ]
    batch_params = neighbours[:target_row] + [target] + neighbours[target_row:]
    batch_logits = []
    for step_logits in target_logits:
        others = torch.randn(len(neighbours), vocab_size)
        batch_logits.append(torch.cat([others[:target_row], step_logits, others[target_row:]]))
    batch_steps = draw_steps(Sampler(torch.Generator().manual_seed(5)), batch_logits, batch_params)
    in_batch = [step[target_row] for step in batch_steps]

    assert in_batch == alone
    # The draws are random (not a disguised argmax) and the seed matters.
    assert alone != [int(step.argmax()) for step in target_logits]
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, seed=4321)
    assert [step[0] for step in draw_steps(Sampler(), target_logits, [other_seed])] != alone


def test_every_row_gives_the_same_result_in_a_batch_as_alone() -> None:
    torch.manual_seed(12)
    vocab_size = 257
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.2, logprobs=2),
        SamplingParams(temperature=0.8, top_k=10, seed=1, logprobs=0),
        SamplingParams(temperature=1.2, top_p=0.9, min_p=0.05, seed=2, presence_penalty=0.5),
        SamplingParams(top_k=1, logit_bias={3: 2.0}, frequency_penalty=0.4, logprobs=5),
        SamplingParams(temperature=0.6, min_p=0.2, seed=3, min_tokens=4, logprobs=3),
    ]
    prompts = [[1, 2, 3], [4], [5, 5], [6, 3], [7, 8]]
    outputs = [[2, 9], [], [5, 10, 10], [3, 3], [11]]
    logits = torch.randn(len(params), vocab_size) * 2
    batch = Sampler()(logits, make_metadata(params, vocab_size, prompts=prompts, outputs=outputs))
    for row in range(len(params)):
        md = make_metadata([params[row]], vocab_size, prompts=[prompts[row]], outputs=[outputs[row]])
        alone = Sampler()(logits[row : row + 1], md)
        assert alone.sampled_token_ids[0] == batch.sampled_token_ids[row]
        assert alone.sampled_logprobs[0] == batch.sampled_logprobs[row]
        assert alone.logprobs[0] == batch.logprobs[row]


# ---------------------------------------------------------------------------------------------- logprobs


def test_logprobs_are_top_n_of_the_raw_distribution_plus_the_sampled_token() -> None:
    torch.manual_seed(13)
    vocab_size = 3000
    # Penalties, bias and temperature change what is drawn, never the reported logprobs.
    params = [
        SamplingParams(temperature=0.0, logprobs=None),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=1.5, logprobs=1, logit_bias={17: 100.0}),
        SamplingParams(temperature=0.3, top_k=50, logprobs=5, repetition_penalty=2.0, presence_penalty=1.0),
        SamplingParams(temperature=1.0, logprobs=20, seed=7),
        SamplingParams(temperature=0.0, logprobs=3, logit_bias={42: 100.0}),
    ]
    logits = torch.randn(len(params), vocab_size) * 3
    md = make_metadata(params, vocab_size, prompts=[[1, 2]] * len(params), outputs=[[3]] * len(params))
    out = Sampler(torch.Generator().manual_seed(14))(logits, md)
    reference = torch.log_softmax(logits, dim=-1)

    assert len(out.sampled_token_ids) == len(out.sampled_logprobs) == len(out.logprobs) == len(params)
    assert out.sampled_token_ids[2] == 17 and out.sampled_token_ids[5] == 42
    for row, p in enumerate(params):
        sampled = out.sampled_token_ids[row]
        assert out.sampled_logprobs[row] == pytest.approx(float(reference[row, sampled]), abs=1e-5)
        if p.logprobs is None:
            assert out.logprobs[row] is None
            continue
        top_ids = reference[row].topk(p.logprobs).indices.tolist() if p.logprobs else []
        row_logprobs = out.logprobs[row]
        assert set(row_logprobs) == {sampled, *top_ids}
        for token_id, logprob in row_logprobs.items():
            assert logprob == pytest.approx(float(reference[row, token_id]), abs=1e-5)
    # Forced tokens are unlikely under the raw distribution, so they sit beside the top-N, not inside it.
    assert len(out.logprobs[5]) == 4 and len(out.logprobs[2]) == 2


# ---------------------------------------------------------------------------------------------- skipped work


def test_metadata_builds_only_what_some_row_needs() -> None:
    plain = make_metadata([SamplingParams(temperature=0.0), SamplingParams(temperature=0.0)], 50)
    assert plain.is_all_greedy and plain.greedy_row_ids.tolist() == [0, 1]
    assert (plain.temperatures, plain.top_k, plain.top_p, plain.min_p) == (None, None, None, None)
    assert (plain.logit_bias, plain.min_tokens_banned, plain.repetition, plain.occurrence) == (None,) * 4
    assert plain.logprob_row_ids == [] and plain.seeded_generators == []

    mixed = make_metadata(
        [
            SamplingParams(temperature=0.0),
            SamplingParams(top_k=5, seed=3),
            SamplingParams(top_p=0.5, repetition_penalty=1.1),
            SamplingParams(min_p=0.1, top_k=50, logprobs=2),  # top_k >= vocab size filters nothing
        ],
        50,
        prompts=[[1], [2], [3, 4], [5]],
    )
    assert mixed.greedy_row_ids.tolist() == [0] and mixed.random_row_ids.tolist() == [1, 2, 3]
    assert mixed.top_k.row_ids.tolist() == [0] and mixed.top_k.values.tolist() == [5] and mixed.max_top_k == 5
    assert mixed.top_p.row_ids.tolist() == [1] and mixed.min_p.row_ids.tolist() == [2]
    assert [position for position, _ in mixed.seeded_generators] == [0]
    assert mixed.unseeded_random_positions.tolist() == [1, 2]
    assert mixed.repetition.row_ids.tolist() == [2]
    assert mixed.repetition.is_seen.nonzero().tolist() == [[0, 3], [0, 4]]
    assert mixed.occurrence is None and mixed.logit_bias is None and mixed.min_tokens_banned is None
    assert mixed.logprob_row_ids == [3] and mixed.num_logprobs == [2]
