"""Per-request sampling for one batch of rows, with logprobs of the raw model distribution.

Processing order for every row (B rows, V vocabulary entries):
  0. grammar bitmask      tokens a constrained row's grammar does not allow -> -inf (structured/)
  1. logit_bias           logits[t] += bias[t]
  2. min_tokens           eos_token_ids and stop_token_ids -> -inf while len(output) < min_tokens
                          (EOS is masked even with ignore_eos, as vLLM does)
  3. repetition_penalty   HF style over prompt + output tokens: logit > 0 divided, logit < 0 multiplied
  4. presence/frequency   OpenAI style over output tokens: logit -= frequency * count + presence * (count > 0)
  5. greedy rows (temperature 0 or top_k 1): argmax; ties go to the lowest token id
     random rows: temperature -> top_k -> top_p -> min_p (the order of transformers' generate), then one draw
Logprobs are taken from the logits as given, before step 1.

Random draws use the exponential race: with E_t ~ Exponential(1) i.i.d., argmax_t(p_t / E_t) is a draw from p.
It needs no sort, no cumulative sum and no host sync, and one [R, V] noise tensor serves a whole batch.
E is made as -log(U), U uniform: on CPU that is ~7x faster than Tensor.exponential_().
Rows whose request carries a seed get their own torch.Generator (made by the caller on the logits' device) and
fill their own noise row from it, one row at a time: a seeded request then draws the same tokens whatever else
is in the batch and whichever row it sits in. All other rows share one generator and are filled in one call.

Speculative verification (`Sampler.verify`): a request that computed k proposed tokens has k + 1 rows, row j
being the distribution after the known tokens and proposals[:j] (its penalties and min_tokens see those
proposals as output). Greedy rows accept proposals while they equal the argmax and then emit the argmax. Random
rows run the rejection sampler of Leviathan et al. / Chen et al. (2023): proposal d drawn from q is accepted with
probability min(1, p(d) / q(d)), where p is the row's final sampling distribution (after penalties,
temperature, top-k, top-p, min-p); on rejection a token is drawn from max(p - q, 0) renormalised and the run
ends; when all k are accepted, one more token is drawn from row k. Each emitted token is then distributed
exactly as p. A proposer without a distribution (n-gram lookup) is a point mass q = 1[d]: accept with p(d),
else draw from p with d removed. Uniforms and the race noise come from the request's own generator when seeded,
so a seeded request is reproducible; with no proposals its draws are those of the plain path.

Work that no row needs is skipped: no count tensor without presence/frequency penalties, no seen-token mask
without a repetition penalty, no noise when every row is greedy, no sort without top_p, and no full sort when
every top_p row also has a top_k well below V (a partial topk ranks the candidates). Each filter and penalty
runs only on the rows that asked for it. The one host sync is reading the results back.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from inferd.kernels import DEFAULT_KERNEL_BACKEND, KernelBackend
from inferd.request import SamplingParams

# top_p without a top_k bound first ranks this many tokens by a partial topk; see _apply_top_p.
_TOP_P_FIRST_TRY_CANDIDATES = 1024


@dataclass
class RowSubset:
    """A parameter that only some rows use: `row_ids` int64 [R] into the rows it applies to, `values` [R]."""

    row_ids: Tensor
    values: Tensor


@dataclass
class SparseLogitEdits:
    """(row, token) pairs to change, flattened: `row_ids`, `token_ids` int64 [N]; `values` float32 [N]."""

    row_ids: Tensor
    token_ids: Tensor
    values: Tensor


@dataclass
class RepetitionPenalty:
    row_ids: Tensor  # int64 [R]: batch rows with repetition_penalty != 1
    penalties: Tensor  # float32 [R]
    is_seen: Tensor  # bool [R, V]: token occurs in the row's prompt or output


@dataclass
class OccurrencePenalties:
    row_ids: Tensor  # int64 [R]: batch rows with a presence or frequency penalty
    frequency_penalties: Tensor  # float32 [R]
    presence_penalties: Tensor  # float32 [R]
    output_token_counts: Tensor  # float32 [R, V]: occurrences of each token in the row's output


@dataclass
class TokenBitmask:
    """Allowed tokens of the constrained rows: `row_ids` int64 [R]; `bitmask` int32 [R, W], W = ceil(V / 32),
    token t allowed iff bit t % 32 of word t // 32 is set (the layout grammar backends write)."""

    row_ids: Tensor
    bitmask: Tensor


# Row b holds the additive mask of the 8 tokens one bitmask byte b covers: 0 where its bit is set, -inf elsewhere.
_ADDITIVE_MASK_OF_BYTE = torch.tensor(
    [[0.0 if (byte >> bit) & 1 else -math.inf for bit in range(8)] for byte in range(256)], dtype=torch.float32
)  # [256, 8]


def token_bitmask_to_additive(bitmask: Tensor, vocab_size: int) -> Tensor:
    """int32 [R, W] -> float32 [R, vocab_size] on the bitmask's device: 0 where allowed, -inf elsewhere (past 32 W too).

    On a little-endian host bit t % 32 of word t // 32 is bit t % 8 of byte t // 8, so one gather of 8-float rows
    by byte value ([R * 4W] indices) writes the whole mask branch-free. masked_fill with a mask that alternates
    often (inside a JSON string nearly every token is allowed, a few are not) costs ~7x more on CPU.
    """
    num_rows, num_words = bitmask.shape
    byte_values = bitmask.contiguous().view(torch.uint8).reshape(-1).to(torch.int64)  # [R * 4W]
    table = _ADDITIVE_MASK_OF_BYTE.to(bitmask.device)
    additive = table.index_select(0, byte_values).view(num_rows, num_words * 32)
    if num_words * 32 >= vocab_size:
        return additive[:, :vocab_size]
    padding = torch.full((num_rows, vocab_size - num_words * 32), -math.inf, device=bitmask.device)
    return torch.cat([additive, padding], dim=1)


def _apply_token_bitmask(logits: Tensor, mask: TokenBitmask) -> None:
    """In place on float [B, V]: -inf wherever a constrained row's grammar disallows the token."""
    additive = token_bitmask_to_additive(mask.bitmask.to(logits.device, non_blocking=True), logits.shape[1])
    logits.index_add_(0, mask.row_ids, additive)


@dataclass
class SamplingMetadata:
    """Everything the sampler needs for one step; built by build_sampling_metadata. Tensors on the logits' device.

    A field is None when no row needs it. Row ids in top_k / top_p / min_p and in `seeded_generators` index the
    random rows (positions in `random_row_ids`), not the batch.
    """

    num_rows: int
    vocab_size: int
    greedy_row_ids: Tensor | None  # int64 [G]
    random_row_ids: Tensor | None  # int64 [R]
    temperatures: Tensor | None  # float32 [R]
    top_k: RowSubset | None  # int64 values, each in [2, V)
    max_top_k: int  # largest value in top_k (0 when None): bounds the one topk call without a host sync
    top_p: RowSubset | None  # float32 values in (0, 1)
    # When every top_p row also has a top_k, at most this many tokens per top_p row can pass top-k (ties aside),
    # and top_p ranks only these candidates instead of sorting the whole vocabulary. None: full sort.
    top_p_num_candidates: int | None
    min_p: RowSubset | None  # float32 values in (0, 1]
    # (random-row position, generator) for rows with their own seed; the other random rows share one generator.
    seeded_generators: list[tuple[int, torch.Generator]]
    unseeded_random_positions: Tensor | None  # int64: random-row positions without their own generator
    logit_bias: SparseLogitEdits | None
    min_tokens_banned: SparseLogitEdits | None  # values unused: each pair becomes -inf
    repetition: RepetitionPenalty | None
    occurrence: OccurrencePenalties | None
    logprob_row_ids: list[int]  # batch rows that asked for logprobs
    num_logprobs: list[int]  # top-N per row of logprob_row_ids (0: the sampled token only)
    token_bitmask: TokenBitmask | None = None  # set by the runner for rows under a grammar

    @property
    def is_all_greedy(self) -> bool:
        return self.random_row_ids is None

    @property
    def is_all_random(self) -> bool:
        return self.greedy_row_ids is None

    @property
    def has_logit_edits(self) -> bool:
        return (
            self.token_bitmask is not None
            or self.logit_bias is not None
            or self.min_tokens_banned is not None
            or self.repetition is not None
            or self.occurrence is not None
        )


@dataclass
class SpecSamplerOutput:
    """Per request (not per row): the emitted tokens, accepted proposals first then one more (1..k + 1)."""

    token_ids: list[list[int]]
    sampled_logprobs: list[list[float]]  # raw-distribution logprob of each emitted token
    logprobs: list[list[dict[int, float]] | None]  # per emitted token, when the request asked for logprobs


@dataclass
class SamplerOutput:
    sampled_token_ids: list[int]  # [B]
    # Per row, when its params.logprobs is not None: {sampled token: logprob, then the top-N by raw logprob}.
    logprobs: list[dict[int, float] | None]
    sampled_logprobs: list[float]  # [B]: raw-distribution logprob of the sampled token


def _ids_tensor(ids: list[int], device: torch.device | str) -> Tensor:
    return torch.tensor(ids, dtype=torch.int64, device=device)


def _flatten_token_lists(token_lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """-> (row positions, token ids), both int64 [sum of lengths]. np.fromiter is ~6x faster than torch.tensor."""
    lengths = np.fromiter((len(ids) for ids in token_lists), dtype=np.int64, count=len(token_lists))
    flat_ids = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64, count=int(lengths.sum()))
    row_positions = np.repeat(np.arange(len(token_lists), dtype=np.int64), lengths)
    return row_positions, flat_ids


def _build_sparse_edits(
    per_row: list[tuple[int, dict[int, float]]], vocab_size: int, device: torch.device | str
) -> SparseLogitEdits | None:
    """Token ids outside [0, V) cannot be sampled, so an edit on one is a no-op and is dropped."""
    row_ids: list[int] = []
    token_ids: list[int] = []
    values: list[float] = []
    for row, edits in per_row:
        for token_id, value in edits.items():
            if 0 <= token_id < vocab_size:
                row_ids.append(row)
                token_ids.append(token_id)
                values.append(float(value))
    if not row_ids:
        return None
    return SparseLogitEdits(
        _ids_tensor(row_ids, device), _ids_tensor(token_ids, device),
        torch.tensor(values, dtype=torch.float32, device=device),
    )


def _build_seen_mask(
    token_lists: list[list[int]], vocab_size: int, device: torch.device | str
) -> Tensor:
    row_positions, flat_ids = _flatten_token_lists(token_lists)
    is_seen = torch.zeros(len(token_lists), vocab_size, dtype=torch.bool, device=device)
    is_seen[torch.from_numpy(row_positions).to(device), torch.from_numpy(flat_ids).to(device)] = True
    return is_seen


def _build_counts(token_lists: list[list[int]], vocab_size: int, device: torch.device | str) -> Tensor:
    row_positions, flat_ids = _flatten_token_lists(token_lists)
    counts = torch.zeros(len(token_lists), vocab_size, dtype=torch.float32, device=device)
    counts.index_put_(
        (torch.from_numpy(row_positions).to(device), torch.from_numpy(flat_ids).to(device)),
        torch.ones(len(flat_ids), dtype=torch.float32, device=device),
        accumulate=True,
    )
    return counts


def _row_subset(
    positions: list[int], values: list[float] | list[int], dtype: torch.dtype, device: torch.device | str
) -> RowSubset | None:
    if not positions:
        return None
    return RowSubset(_ids_tensor(positions, device), torch.tensor(values, dtype=dtype, device=device))


def _num_top_p_candidates(candidate_counts: list[int], vocab_size: int) -> int | None:
    """A partial topk beats a full sort only while it is well short of the vocabulary."""
    num_candidates = max(candidate_counts, default=vocab_size)
    return num_candidates if num_candidates * 8 <= vocab_size else None


def build_sampling_metadata(
    params: list[SamplingParams],
    prompt_token_ids: list[list[int]],
    output_token_ids: list[list[int]],
    generators: list[torch.Generator | None],
    eos_token_ids: list[frozenset[int]],
    vocab_size: int,
    device: torch.device | str,
) -> SamplingMetadata:
    """One entry per batch row in every list. A generator must live on `device`; None shares the default one."""
    num_rows = len(params)
    if not (len(prompt_token_ids) == len(output_token_ids) == len(generators) == len(eos_token_ids) == num_rows):
        raise ValueError("build_sampling_metadata: every per-row list must have one entry per row")

    greedy_rows: list[int] = []
    random_rows: list[int] = []
    temperatures: list[float] = []
    top_k_positions: list[int] = []
    top_k_values: list[int] = []
    top_p_positions: list[int] = []
    top_p_values: list[float] = []
    top_p_candidate_counts: list[int] = []
    min_p_positions: list[int] = []
    min_p_values: list[float] = []
    seeded_generators: list[tuple[int, torch.Generator]] = []
    unseeded_positions: list[int] = []
    for row, p in enumerate(params):
        if p.is_greedy:
            greedy_rows.append(row)
            continue
        position = len(random_rows)
        random_rows.append(row)
        temperatures.append(p.temperature)
        if 0 < p.top_k < vocab_size:
            top_k_positions.append(position)
            top_k_values.append(p.top_k)
        if p.top_p < 1.0:
            top_p_positions.append(position)
            top_p_values.append(p.top_p)
            top_p_candidate_counts.append(p.top_k if 0 < p.top_k < vocab_size else vocab_size)
        if p.min_p > 0.0:
            min_p_positions.append(position)
            min_p_values.append(p.min_p)
        if generators[row] is not None:
            seeded_generators.append((position, generators[row]))
        else:
            unseeded_positions.append(position)

    bias_rows = [(row, p.logit_bias) for row, p in enumerate(params) if p.logit_bias]
    banned_rows = [
        (row, dict.fromkeys(set(eos_token_ids[row]) | set(p.stop_token_ids or ()), -math.inf))
        for row, p in enumerate(params)
        if len(output_token_ids[row]) < p.min_tokens
    ]
    repetition_rows = [row for row, p in enumerate(params) if p.repetition_penalty != 1.0]
    occurrence_rows = [
        row for row, p in enumerate(params) if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
    ]

    repetition = None
    if repetition_rows:
        repetition = RepetitionPenalty(
            row_ids=_ids_tensor(repetition_rows, device),
            penalties=torch.tensor(
                [params[r].repetition_penalty for r in repetition_rows], dtype=torch.float32, device=device
            ),
            is_seen=_build_seen_mask(
                [prompt_token_ids[r] + output_token_ids[r] for r in repetition_rows], vocab_size, device
            ),
        )
    occurrence = None
    if occurrence_rows:
        occurrence = OccurrencePenalties(
            row_ids=_ids_tensor(occurrence_rows, device),
            frequency_penalties=torch.tensor(
                [params[r].frequency_penalty for r in occurrence_rows], dtype=torch.float32, device=device
            ),
            presence_penalties=torch.tensor(
                [params[r].presence_penalty for r in occurrence_rows], dtype=torch.float32, device=device
            ),
            output_token_counts=_build_counts([output_token_ids[r] for r in occurrence_rows], vocab_size, device),
        )

    logprob_rows = [row for row, p in enumerate(params) if p.logprobs is not None]
    return SamplingMetadata(
        num_rows=num_rows,
        vocab_size=vocab_size,
        greedy_row_ids=_ids_tensor(greedy_rows, device) if greedy_rows else None,
        random_row_ids=_ids_tensor(random_rows, device) if random_rows else None,
        temperatures=torch.tensor(temperatures, dtype=torch.float32, device=device) if random_rows else None,
        top_k=_row_subset(top_k_positions, top_k_values, torch.int64, device),
        max_top_k=max(top_k_values, default=0),
        top_p=_row_subset(top_p_positions, top_p_values, torch.float32, device),
        top_p_num_candidates=_num_top_p_candidates(top_p_candidate_counts, vocab_size),
        min_p=_row_subset(min_p_positions, min_p_values, torch.float32, device),
        seeded_generators=seeded_generators,
        unseeded_random_positions=(
            _ids_tensor(unseeded_positions, device) if seeded_generators and unseeded_positions else None
        ),
        logit_bias=_build_sparse_edits(bias_rows, vocab_size, device),
        min_tokens_banned=_build_sparse_edits(banned_rows, vocab_size, device),
        repetition=repetition,
        occurrence=occurrence,
        logprob_row_ids=logprob_rows,
        num_logprobs=[params[r].logprobs for r in logprob_rows],
    )


def apply_logit_edits(logits: Tensor, md: SamplingMetadata) -> Tensor:
    """Steps 1-4 (bias, min_tokens, repetition, presence/frequency) on [B, V] logits. Returns a new tensor when
    any row needs an edit, else `logits` itself; never writes into `logits`."""
    if not md.has_logit_edits:
        return logits
    logits = logits.clone()
    if md.token_bitmask is not None:
        _apply_token_bitmask(logits, md.token_bitmask)
    if md.logit_bias is not None:
        edits = md.logit_bias
        logits.index_put_((edits.row_ids, edits.token_ids), edits.values, accumulate=True)
    if md.min_tokens_banned is not None:
        banned = md.min_tokens_banned
        logits.index_put_((banned.row_ids, banned.token_ids), torch.tensor(-math.inf, device=logits.device))
    if md.repetition is not None:
        rep = md.repetition
        rows = logits.index_select(0, rep.row_ids)  # [R, V]
        penalty = rep.penalties[:, None]
        penalized = torch.where(rows < 0, rows * penalty, rows / penalty)
        logits.index_copy_(0, rep.row_ids, torch.where(rep.is_seen, penalized, rows))
    if md.occurrence is not None:
        occ = md.occurrence
        counts = occ.output_token_counts  # [R, V]
        delta = counts * occ.frequency_penalties[:, None] + (counts > 0) * occ.presence_penalties[:, None]
        logits.index_add_(0, occ.row_ids, delta, alpha=-1.0)
    return logits


def _apply_top_k(logits: Tensor, top_k: RowSubset, max_top_k: int) -> None:
    """In place on [R, V]: keep tokens >= the k-th largest logit of their row (ties with it survive, as in HF)."""
    rows = logits.index_select(0, top_k.row_ids)
    top_values = rows.topk(max_top_k, dim=-1).values  # [r, max_top_k], descending
    kth_values = top_values.gather(1, (top_k.values - 1)[:, None])  # [r, 1]
    logits.index_copy_(0, top_k.row_ids, rows.masked_fill(rows < kth_values, -math.inf))


def _apply_top_p(logits: Tensor, top_p: RowSubset, num_candidates: int | None) -> None:
    """In place on [R, V]: keep the smallest set of most likely tokens whose probability mass reaches top_p.

    In descending order a token is kept while the mass of the tokens strictly more likely than it is < top_p;
    the most likely token always stays. The cut becomes a logit threshold, so tokens tied with the least likely
    kept one all stay (a sort orders ties arbitrarily; a threshold does not).

    Ranking the whole vocabulary is a full sort (~30x a topk of 1024 on CPU). With `num_candidates` (every row
    capped by top_k) a topk suffices. Without it, the top _TOP_P_FIRST_TRY_CANDIDATES are tried first and the
    full sort runs only when some row's nucleus is wider than that; deciding so costs one host sync.
    """
    rows = logits.index_select(0, top_p.row_ids)
    vocab_size = rows.shape[1]
    log_normalizers = rows.logsumexp(dim=-1, keepdim=True)  # [r, 1], over the whole row: exact probabilities
    is_capped_by_top_k = num_candidates is not None
    if num_candidates is None and _TOP_P_FIRST_TRY_CANDIDATES * 8 <= vocab_size:
        num_candidates = _TOP_P_FIRST_TRY_CANDIDATES
    if num_candidates is None:
        descending_logits = rows.sort(dim=-1, descending=True).values  # [r, V]
        mass_through = (descending_logits - log_normalizers).exp().cumsum(dim=-1)
    else:
        descending_logits = rows.topk(num_candidates, dim=-1).values  # [r, C]
        mass_through = (descending_logits - log_normalizers).exp().cumsum(dim=-1)
        # The cut lies among the candidates iff they already hold top_p; else rank the whole vocabulary.
        if not is_capped_by_top_k and not bool((mass_through[:, -1] >= top_p.values).all()):
            descending_logits = rows.sort(dim=-1, descending=True).values
            mass_through = (descending_logits - log_normalizers).exp().cumsum(dim=-1)
    # Exclusive prefix sum taken from the inclusive one, so it stays monotone and the kept set is a prefix.
    mass_before = torch.nn.functional.pad(mass_through[:, :-1], (1, 0))
    # [r, 1]; at least the most likely token, also when a tiny top_p (e.g. 4e-82) rounds to 0 in float32
    num_kept = (mass_before < top_p.values[:, None]).sum(dim=-1, keepdim=True).clamp_(min=1)
    threshold = descending_logits.gather(1, num_kept - 1)
    logits.index_copy_(0, top_p.row_ids, rows.masked_fill(rows < threshold, -math.inf))


def _apply_min_p(logits: Tensor, min_p: RowSubset) -> None:
    """In place on [R, V]: drop tokens with p < min_p * p_max, i.e. logit < max logit + log(min_p)."""
    rows = logits.index_select(0, min_p.row_ids)
    threshold = rows.amax(dim=-1, keepdim=True) + torch.log(min_p.values)[:, None]
    logits.index_copy_(0, min_p.row_ids, rows.masked_fill(rows < threshold, -math.inf))


def apply_sampling_filters(logits: Tensor, md: SamplingMetadata) -> Tensor:
    """Temperature, top_k, top_p, min_p for the random rows. `logits` is [B, V] after apply_logit_edits;
    returns a new [R, V] tensor (R = len(random_row_ids)) whose dropped tokens are -inf."""
    assert md.random_row_ids is not None and md.temperatures is not None
    if md.is_all_random:
        scaled = logits / md.temperatures[:, None]
    else:
        scaled = logits.index_select(0, md.random_row_ids).div_(md.temperatures[:, None])
    if md.top_k is not None:
        _apply_top_k(scaled, md.top_k, md.max_top_k)
    if md.top_p is not None:
        _apply_top_p(scaled, md.top_p, md.top_p_num_candidates)
    if md.min_p is not None:
        _apply_min_p(scaled, md.min_p)
    return scaled


def log_normalizers_of(logits: Tensor, backend: KernelBackend = DEFAULT_KERNEL_BACKEND) -> Tensor:
    """logsumexp of each row [B, V] -> [B]: one fused pass per row on CPU in float32 (torch's takes ~0.17 ms for
    one 49k-token row, a few % of a decode step), else torch's. Row by row either way: batch-independent bits."""
    if logits.dim() == 2 and backend.use_cpu_ops(logits):
        return torch.ops.inferd.logsumexp_rows(logits)
    return logits.logsumexp(dim=-1)


class Sampler:
    """Picks one token per row. `generator` drives the rows without their own seed (None: torch's default RNG
    for the logits' device)."""

    def __init__(self, generator: torch.Generator | None = None,
                 kernel_backend: KernelBackend = DEFAULT_KERNEL_BACKEND) -> None:
        self.generator = generator
        self.kernel_backend = kernel_backend  # the model's: the fused logsumexp or torch's

    def __call__(self, logits: Tensor, md: SamplingMetadata) -> SamplerOutput:
        if logits.shape != (md.num_rows, md.vocab_size):
            raise ValueError(f"logits shape {tuple(logits.shape)} != (rows, vocab) {(md.num_rows, md.vocab_size)}")
        raw_logits = logits.float()
        edited_logits = apply_logit_edits(raw_logits, md)

        if md.is_all_greedy:
            sampled_ids = edited_logits.argmax(dim=-1)
        else:
            random_ids = self._draw(apply_sampling_filters(edited_logits, md), md)
            if md.is_all_random:
                sampled_ids = random_ids
            else:
                sampled_ids = torch.empty(md.num_rows, dtype=torch.int64, device=logits.device)
                sampled_ids[md.random_row_ids] = random_ids
                sampled_ids[md.greedy_row_ids] = edited_logits.index_select(0, md.greedy_row_ids).argmax(dim=-1)

        log_normalizers = log_normalizers_of(raw_logits, self.kernel_backend)  # [B]
        sampled_logprobs = raw_logits.gather(1, sampled_ids[:, None])[:, 0] - log_normalizers
        return self._to_output(raw_logits, log_normalizers, sampled_ids, sampled_logprobs, md)

    def _draw(self, filtered_logits: Tensor, md: SamplingMetadata) -> Tensor:
        """[R, V] filtered logits -> [R] token ids drawn by the exponential race."""
        probs = filtered_logits.softmax(dim=-1)
        noise = torch.empty_like(probs)  # [R, V]: U ~ Uniform[0, 1), then E = -log(U) ~ Exponential(1)
        if not md.seeded_generators:
            noise.uniform_(generator=self.generator)
        else:
            for position, generator in md.seeded_generators:
                noise[position].uniform_(generator=generator)
            if md.unseeded_random_positions is not None:
                shared = torch.empty(
                    len(md.unseeded_random_positions), probs.shape[1], dtype=probs.dtype, device=probs.device
                )
                noise[md.unseeded_random_positions] = shared.uniform_(generator=self.generator)
        # E lies in (0, inf]: U = 0 gives inf, a racer that cannot win; no 0 / 0 can turn a banned token into NaN.
        exponential_noise = noise.log_().neg_()
        return probs.div_(exponential_noise).argmax(dim=-1)

    @staticmethod
    def _to_output(
        raw_logits: Tensor, log_normalizers: Tensor, sampled_ids: Tensor, sampled_logprobs: Tensor,
        md: SamplingMetadata,
    ) -> SamplerOutput:
        logprobs: list[dict[int, float] | None] = [None] * md.num_rows
        sampled_id_list = sampled_ids.tolist()
        sampled_logprob_list = sampled_logprobs.tolist()
        if md.logprob_row_ids:
            max_num_logprobs = max(md.num_logprobs)
            top_ids: list[list[int]] = [[] for _ in md.logprob_row_ids]
            top_logprobs: list[list[float]] = [[] for _ in md.logprob_row_ids]
            if max_num_logprobs > 0:
                row_ids = torch.tensor(md.logprob_row_ids, dtype=torch.int64, device=raw_logits.device)
                top = raw_logits.index_select(0, row_ids).topk(max_num_logprobs, dim=-1)  # [L, N]
                top_ids = top.indices.tolist()
                top_logprobs = (top.values - log_normalizers.index_select(0, row_ids)[:, None]).tolist()
            for i, (row, num) in enumerate(zip(md.logprob_row_ids, md.num_logprobs)):
                row_logprobs = {sampled_id_list[row]: sampled_logprob_list[row]}
                for token_id, logprob in zip(top_ids[i][:num], top_logprobs[i][:num]):
                    row_logprobs.setdefault(token_id, logprob)
                logprobs[row] = row_logprobs
        return SamplerOutput(
            sampled_token_ids=sampled_id_list, logprobs=logprobs, sampled_logprobs=sampled_logprob_list
        )

    # ------------------------------------------------------------------ speculative verification
    def verify(
        self,
        logits: Tensor,
        md: SamplingMetadata,
        proposals: list[list[int]],
        generators: list[torch.Generator | None],
        proposal_probs: list[Tensor | None] | None = None,
    ) -> SpecSamplerOutput:
        """`logits` [N, V] with N = sum(k_i + 1): request i's k_i + 1 rows in a run, in request order; `md` built
        for those N rows. `proposals[i]` holds k_i token ids; `generators[i]` is request i's own generator (None:
        the sampler's shared one); `proposal_probs[i]` [k_i, V] is the proposer's distribution q (None: a point
        mass on each proposal)."""
        if logits.shape != (md.num_rows, md.vocab_size):
            raise ValueError(f"logits shape {tuple(logits.shape)} != (rows, vocab) {(md.num_rows, md.vocab_size)}")
        if sum(len(p) + 1 for p in proposals) != md.num_rows or len(generators) != len(proposals):
            raise ValueError("verify: rows must be sum(len(proposal) + 1) and one generator per request")
        raw_logits = logits.float()
        edited_logits = apply_logit_edits(raw_logits, md)
        num_rows = md.num_rows
        # Host views: greedy targets per row, random-row position per row, p(proposal) per random proposal row.
        greedy_target = [-1] * num_rows
        if md.greedy_row_ids is not None:
            targets = edited_logits.index_select(0, md.greedy_row_ids).argmax(dim=-1).tolist()
            for row, target in zip(md.greedy_row_ids.tolist(), targets):
                greedy_target[row] = target
        random_position = [-1] * num_rows
        probs = None
        if md.random_row_ids is not None:
            probs = apply_sampling_filters(edited_logits, md).softmax(dim=-1)  # [R, V]
            for position, row in enumerate(md.random_row_ids.tolist()):
                random_position[row] = position

        token_ids: list[list[int]] = []
        emitted_rows: list[int] = []
        row = 0
        for i, proposal in enumerate(proposals):
            generator = generators[i] if generators[i] is not None else self.generator
            q = proposal_probs[i] if proposal_probs is not None else None
            emitted: list[int] = []
            for j in range(len(proposal) + 1):
                r = row + j
                emitted_rows.append(r)
                if random_position[r] < 0:
                    emitted.append(greedy_target[r])
                    if j < len(proposal) and greedy_target[r] == proposal[j]:
                        continue
                    break
                p = probs[random_position[r]]  # [V]
                if j == len(proposal):
                    emitted.append(_race(p, generator))
                    break
                d = proposal[j]
                q_d = 1.0 if q is None else float(q[j, d])
                accept_probability = 1.0 if q_d <= 0.0 else min(1.0, float(p[d]) / q_d)
                u = float(torch.rand(1, device=p.device, generator=generator))
                if u < accept_probability:
                    emitted.append(d)
                    continue
                if q is None:
                    residual = p.clone()
                    residual[d] = 0.0
                else:
                    residual = (p - q[j].to(p.dtype)).clamp_(min=0.0)
                emitted.append(_race(residual, generator))
                break
            token_ids.append(emitted)
            row += len(proposal) + 1

        # Raw logprobs of the emitted tokens (exactly those a non-speculative run would report).
        device = raw_logits.device
        rows_t = torch.tensor(emitted_rows, dtype=torch.int64, device=device)
        ids_t = torch.tensor([t for ids in token_ids for t in ids], dtype=torch.int64, device=device)
        emitted_logits = raw_logits.index_select(0, rows_t)  # [E, V]
        log_normalizers = log_normalizers_of(emitted_logits, self.kernel_backend)
        emitted_logprobs = (emitted_logits.gather(1, ids_t[:, None])[:, 0] - log_normalizers).tolist()
        num_logprobs_of_row = dict(zip(md.logprob_row_ids, md.num_logprobs))
        max_num = max((num_logprobs_of_row.get(r, 0) for r in emitted_rows), default=0)
        top_ids: list[list[int]] = []
        top_logprobs: list[list[float]] = []
        if max_num > 0:
            top = emitted_logits.topk(max_num, dim=-1)
            top_ids = top.indices.tolist()
            top_logprobs = (top.values - log_normalizers[:, None]).tolist()
        sampled_logprobs: list[list[float]] = []
        logprobs: list[list[dict[int, float]] | None] = []
        e = 0
        for ids in token_ids:
            sampled_logprobs.append(emitted_logprobs[e : e + len(ids)])
            if emitted_rows[e] in num_logprobs_of_row:
                entries = []
                for k, token_id in enumerate(ids):
                    num = num_logprobs_of_row[emitted_rows[e + k]]
                    entry = {token_id: emitted_logprobs[e + k]}
                    if num > 0:
                        for tid, lp in zip(top_ids[e + k][:num], top_logprobs[e + k][:num]):
                            entry.setdefault(tid, lp)
                    entries.append(entry)
                logprobs.append(entries)
            else:
                logprobs.append(None)
            e += len(ids)
        return SpecSamplerOutput(token_ids=token_ids, sampled_logprobs=sampled_logprobs, logprobs=logprobs)


def _race(weights: Tensor, generator: torch.Generator | None) -> int:
    """One draw from the [V] non-negative `weights` (need not sum to 1) by the exponential race, with one row of
    uniforms from `generator`: the same numbers the plain path draws for a seeded row."""
    noise = torch.empty_like(weights).uniform_(generator=generator)
    return int(weights.div(noise.log_().neg_()).argmax())
