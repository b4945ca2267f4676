"""Layer 3: turns a scheduler output into tensors, runs the model, samples.

One step lays the scheduled tokens of every request end to end (T tokens in all, no padding):
  input_ids[T], positions[T], slot_mapping[T]  (slot = block_id * block_size + offset inside the block)
  query_start_loc[B+1], seq_lens[B], block_tables[B, max_blocks]
and samples for each request whose scheduled chunk reaches the end of its known tokens. A request that also
computes k proposed tokens (speculative decoding) gets logits at its last known token and at each proposal
(k + 1 rows) and `Sampler.verify` returns the accepted proposals plus one token.
The runner keeps its own state per request (`CachedRequestState`: tokens, block table, num_computed_tokens),
built from the scheduler output's diff (new requests whole, cached ones as changes, finished ones dropped) and
extended with the tokens it samples; it never reads the scheduler's Request objects.
Step inputs live in persistent host buffers sized once (max_num_batched_tokens, max_num_seqs) so a later
CUDA-graph path can replay on fixed addresses.
Constrained requests (request.grammar_matcher set): their next-token bitmasks are filled on a worker thread while
the forward pass runs (llguidance releases the GIL) and applied by the sampler; with proposals, row j's mask is
the grammar's state after proposals[:j] (advanced, then rolled back), and rows past the first proposal the grammar
refuses get none (verification rejects that proposal, so they are never used).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from inferd.config import EngineConfig
from inferd.kernels import resolve_kernel_backend
from inferd.layers.attention import AttentionMetadata, allocate_kv_caches
from inferd.layers.sampler import Sampler, TokenBitmask, build_sampling_metadata
from inferd.request import SamplingParams
from inferd.scheduler import SchedulerOutput
from inferd.structured import GrammarMatcher, bitmask_width

logger = logging.getLogger("inferd.runner")


@dataclass
class CachedRequestState:
    """The runner's own copy of a request (made from the scheduler's NewRequestData, moved by its diffs); the
    tokens it samples are appended here. Attribute names match Request's, which the sampling code reads."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    all_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    block_ids: list[int]
    num_computed_tokens: int
    grammar_matcher: object | None = None


@dataclass
class StepResult:
    """What one step produced for each request that sampled: 1 token, or 1..k + 1 with k proposals."""

    sampled_token_ids: dict[str, list[int]]
    sampled_logprobs: dict[str, list[float]]
    logprobs: dict[str, list[dict[int, float]]]  # only for requests that asked for logprobs; one per token
    # request_id -> why sampling failed for that request alone (its parameters, penalties, grammar...): the
    # engine fails it and the rest of the batch goes on.
    failed: dict[str, str] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, config: EngineConfig, model: torch.nn.Module, arch_config, num_blocks: int) -> None:
        self.config = config
        self.model = model
        self.arch_config = arch_config
        self.device = torch.device(config.device)
        self.block_size = config.block_size
        self.num_blocks = num_blocks
        self.kv_caches = allocate_kv_caches(
            arch_config, num_blocks, config.block_size, model_dtype(model), self.device
        )
        self.sampler = Sampler(kernel_backend=resolve_kernel_backend(getattr(model, "kernel_backend", None)))
        self.max_blocks_per_seq = (config.max_model_len + config.block_size - 1) // config.block_size
        # Persistent host-side step buffers (int64). Sized for the largest step the scheduler can produce.
        max_tokens = config.max_num_batched_tokens
        max_seqs = config.max_num_seqs
        self._input_ids_np = np.zeros(max_tokens, dtype=np.int64)
        self._positions_np = np.zeros(max_tokens, dtype=np.int64)
        self._slot_mapping_np = np.zeros(max_tokens, dtype=np.int64)
        self._block_tables_np = np.zeros((max_seqs, self.max_blocks_per_seq), dtype=np.int64)
        # Per-request sampling generators, seeded once so a seeded request draws the same numbers
        # whatever else shares its batch.
        self._generators: dict[str, torch.Generator] = {}
        self._grammar_pool: ThreadPoolExecutor | None = None  # one thread, made on the first constrained step
        self.requests: dict[str, CachedRequestState] = {}  # what the scheduler's diffs built, by request_id

    def remove_request(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
        self.requests.pop(request_id, None)

    def _generator_for(self, request: CachedRequestState) -> torch.Generator | None:
        seed = request.sampling_params.seed
        if seed is None:
            return None
        gen = self._generators.get(request.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
            self._generators[request.request_id] = gen
        return gen

    def update_states(self, scheduler_output: SchedulerOutput) -> None:
        """Apply the scheduler's diff: drop finished and preempted requests (a preempted one comes back whole as
        a new request; its generator stays, so a seeded request keeps its stream), add new ones, move cached
        ones' num_computed_tokens and block tables."""
        for request_id in scheduler_output.finished_request_ids:
            self.remove_request(request_id)
        for request_id in scheduler_output.preempted_request_ids:
            self.requests.pop(request_id, None)
        for new in scheduler_output.scheduled_new_reqs:
            self.requests[new.request_id] = CachedRequestState(
                request_id=new.request_id, prompt_token_ids=new.prompt_token_ids,
                output_token_ids=new.output_token_ids, all_token_ids=new.prompt_token_ids + new.output_token_ids,
                sampling_params=new.sampling_params, eos_token_ids=new.eos_token_ids, block_ids=new.block_ids,
                num_computed_tokens=new.num_computed_tokens, grammar_matcher=new.grammar_matcher)
        for cached in scheduler_output.scheduled_cached_reqs:
            state = self.requests[cached.request_id]
            state.num_computed_tokens = cached.num_computed_tokens
            del state.block_ids[cached.num_kept_block_ids:]
            state.block_ids.extend(cached.new_block_ids)

    @torch.inference_mode()
    def execute(
        self,
        scheduler_output: SchedulerOutput,
        proposal_probs: dict[str, torch.Tensor] | None = None,
    ) -> StepResult:
        """Run one step of `scheduler_output` (only its diff fields: the runner keeps its own request states and
        appends the tokens it samples). `proposal_probs`: request_id -> the proposer's distribution q [k, V] each
        of its k proposals was drawn from (a draft model's; absent: a point mass on each proposal, the n-gram
        case)."""
        self.update_states(scheduler_output)
        spec_token_ids = scheduler_output.spec_token_ids
        query_start_loc = [0]
        seq_lens: list[int] = []
        num_computed: list[int] = []
        scheduled: list[CachedRequestState] = []
        sample_rows: list[int] = []  # index into `scheduled` of requests that sample this step
        logits_token_indices: list[int] = []
        t = 0
        for i, (request_id, n) in enumerate(scheduler_output.num_scheduled_tokens.items()):
            req = self.requests[request_id]
            scheduled.append(req)
            start = req.num_computed_tokens
            end = start + n
            block_ids = req.block_ids
            proposals = spec_token_ids.get(request_id, ())
            known_end = end - len(proposals)
            self._input_ids_np[t : t + n - len(proposals)] = req.all_token_ids[start:known_end]
            if proposals:
                self._input_ids_np[t + n - len(proposals) : t + n] = proposals
            self._place_sequence(i, t, start, n, block_ids)
            t += n
            query_start_loc.append(t)
            seq_lens.append(end)
            num_computed.append(start)
            if known_end == len(req.all_token_ids):
                sample_rows.append(i)
                logits_token_indices.extend(range(t - 1 - len(proposals), t))
        num_tokens = t
        masks = self._start_bitmasks([scheduled[i] for i in sample_rows], spec_token_ids)
        hidden = self._forward(num_tokens, query_start_loc, seq_lens, num_computed)
        if not sample_rows:
            return StepResult({}, {}, {})
        idx = torch.tensor(logits_token_indices, dtype=torch.long, device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, idx))

        reqs = [scheduled[i] for i in sample_rows]
        proposal_probs = proposal_probs or {}
        try:
            token_bitmask = masks.result() if masks is not None else None
            result = self._sample(logits, reqs, spec_token_ids, token_bitmask, proposal_probs)
        except Exception:
            # One request's data (a parameter, its penalties, its grammar) can break a whole batch's sampling:
            # sample each request alone so only the ones at fault fail.
            logger.exception("sampling %d request(s) together failed; sampling each alone", len(reqs))
            result = self._sample_each_alone(logits, reqs, spec_token_ids, proposal_probs)
        for request_id, token_ids in result.sampled_token_ids.items():
            state = self.requests[request_id]
            state.output_token_ids.extend(token_ids)
            state.all_token_ids.extend(token_ids)
        return result

    def _place_sequence(self, row: int, token_offset: int, start: int, num_tokens: int, block_ids: Sequence[int]) -> None:
        """Step buffers for one sequence computing positions [start, start + num_tokens) at token rows
        [token_offset, token_offset + num_tokens): positions, KV slots, and block-table row `row`."""
        bs = self.block_size
        t, n = token_offset, num_tokens
        pos = np.arange(start, start + n, dtype=np.int64)
        self._positions_np[t : t + n] = pos
        table = np.asarray(block_ids, dtype=np.int64)
        self._slot_mapping_np[t : t + n] = table[pos // bs] * bs + pos % bs
        self._block_tables_np[row, : len(block_ids)] = table

    @torch.inference_mode()
    def compute_last_logits(self, chunks: list[tuple[Sequence[int], int, list[int]]]) -> torch.Tensor:
        """Run the model over bare token chunks, one per sequence: (token ids to compute, position of the first,
        the sequence's block table covering every position computed). Writes their K/V into this runner's cache
        and returns float32 logits [B, V] at each chunk's last token. At most max_num_batched_tokens tokens and
        max_num_seqs chunks in all (what a draft model's proposer asks; no sampling here)."""
        query_start_loc = [0]
        seq_lens: list[int] = []
        num_computed: list[int] = []
        t = 0
        for i, (token_ids, start, block_ids) in enumerate(chunks):
            n = len(token_ids)
            self._input_ids_np[t : t + n] = token_ids
            self._place_sequence(i, t, start, n, block_ids)
            t += n
            query_start_loc.append(t)
            seq_lens.append(start + n)
            num_computed.append(start)
        hidden = self._forward(t, query_start_loc, seq_lens, num_computed)
        idx = torch.tensor(query_start_loc[1:], dtype=torch.long, device=self.device) - 1
        return self.model.compute_logits(hidden.index_select(0, idx))

    def _forward(self, num_tokens: int, query_start_loc: list[int], seq_lens: list[int],
                 num_computed: list[int]) -> torch.Tensor:
        """The model over the first `num_tokens` entries of the step buffers -> hidden [T, hidden]."""
        bs = self.block_size
        num_seqs = len(seq_lens)
        max_blocks = max((seq_len + bs - 1) // bs for seq_len in seq_lens)
        dev = self.device
        input_ids = torch.from_numpy(self._input_ids_np[:num_tokens]).to(dev, non_blocking=True)
        positions = torch.from_numpy(self._positions_np[:num_tokens]).to(dev, non_blocking=True)
        attn_metadata = AttentionMetadata.build(
            slot_mapping=torch.from_numpy(self._slot_mapping_np[:num_tokens]).to(dev, non_blocking=True),
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            num_computed_tokens=num_computed,
            block_tables=torch.from_numpy(self._block_tables_np[:num_seqs, :max_blocks]).to(dev, non_blocking=True),
            block_size=bs,
            device=dev,
        )
        return self.model(input_ids, positions, attn_metadata, self.kv_caches)

    def _sample(self, logits: torch.Tensor, reqs: list[CachedRequestState], spec_token_ids: dict[str, list[int]],
                token_bitmask: TokenBitmask | None,
                proposal_probs: dict[str, torch.Tensor] | None = None) -> StepResult:
        """`logits` [sum(k_i + 1), V] for `reqs` in order (k_i proposals of request i, 0 without)."""
        if any(r.request_id in spec_token_ids for r in reqs):
            return self._verify(logits, reqs, spec_token_ids, token_bitmask, proposal_probs or {})
        md = build_sampling_metadata(
            params=[r.sampling_params for r in reqs],
            prompt_token_ids=[r.prompt_token_ids for r in reqs],
            output_token_ids=[r.output_token_ids for r in reqs],
            generators=[self._generator_for(r) for r in reqs],
            eos_token_ids=[r.eos_token_ids for r in reqs],
            vocab_size=logits.shape[-1],
            device=logits.device,
        )
        md.token_bitmask = token_bitmask
        out = self.sampler(logits, md)
        result = StepResult({}, {}, {})
        for row, req in enumerate(reqs):
            rid = req.request_id
            result.sampled_token_ids[rid] = [out.sampled_token_ids[row]]
            result.sampled_logprobs[rid] = [out.sampled_logprobs[row]]
            if out.logprobs[row] is not None:
                result.logprobs[rid] = [out.logprobs[row]]
        return result

    def _sample_each_alone(self, logits: torch.Tensor, reqs: list[CachedRequestState], spec_token_ids: dict[str, list[int]],
                           proposal_probs: dict[str, torch.Tensor]) -> StepResult:
        result = StepResult({}, {}, {})
        first_row = 0
        for req in reqs:
            rid = req.request_id
            proposals = spec_token_ids.get(rid, [])
            num_rows = len(proposals) + 1
            try:
                mask = None
                if req.grammar_matcher is not None:
                    mask = _fill_bitmasks([(0, req.grammar_matcher, proposals)], self.arch_config.vocab_size,  # type: ignore[list-item]
                                          self.device)
                alone = self._sample(logits[first_row : first_row + num_rows], [req],
                                     {rid: proposals} if proposals else {}, mask, proposal_probs)
            except Exception as exc:
                logger.exception("request %s: sampling failed", rid)
                result.failed[rid] = f"sampling failed: {type(exc).__name__}: {exc}"
            else:
                result.sampled_token_ids.update(alone.sampled_token_ids)
                result.sampled_logprobs.update(alone.sampled_logprobs)
                result.logprobs.update(alone.logprobs)
            first_row += num_rows
        return result

    def _start_bitmasks(
        self, sampling_reqs: list[CachedRequestState], spec_token_ids: dict[str, list[int]]
    ) -> Future[TokenBitmask] | None:
        """Fill the constrained rows' bitmasks on the grammar thread; rows are laid out as the logits are (request
        i's k_i + 1 rows after those of requests 0..i-1). None when no sampling request has a grammar."""
        entries: list[tuple[int, GrammarMatcher, list[int]]] = []
        first_row = 0
        for req in sampling_reqs:
            proposals = spec_token_ids.get(req.request_id, [])
            if req.grammar_matcher is not None:
                entries.append((first_row, req.grammar_matcher, proposals))  # type: ignore[arg-type]
            first_row += len(proposals) + 1
        if not entries:
            return None
        if self._grammar_pool is None:
            self._grammar_pool = ThreadPoolExecutor(1, thread_name_prefix="inferd-grammar")
        vocab_size = self.arch_config.vocab_size
        return self._grammar_pool.submit(_fill_bitmasks, entries, vocab_size, self.device)

    def _verify(self, logits: torch.Tensor, reqs: list[CachedRequestState], spec_token_ids: dict[str, list[int]],
                token_bitmask: TokenBitmask | None = None,
                proposal_probs: dict[str, torch.Tensor] | None = None) -> StepResult:
        """`logits` [sum(k_i + 1), V]: each request's rows at its last known token and its k_i proposals. Row j of a
        request sees proposals[:j] as output (penalties, min_tokens)."""
        proposals = [spec_token_ids.get(r.request_id, []) for r in reqs]
        row_reqs = [r for r, p in zip(reqs, proposals) for _ in range(len(p) + 1)]
        row_outputs = [r.output_token_ids + p[:j] if j else r.output_token_ids
                       for r, p in zip(reqs, proposals) for j in range(len(p) + 1)]
        generators = [self._generator_for(r) for r in reqs]
        md = build_sampling_metadata(
            params=[r.sampling_params for r in row_reqs],
            prompt_token_ids=[r.prompt_token_ids for r in row_reqs],
            output_token_ids=row_outputs,
            generators=[None] * len(row_reqs),  # verify draws from each request's generator itself
            eos_token_ids=[r.eos_token_ids for r in row_reqs],
            vocab_size=logits.shape[-1],
            device=self.device,
        )
        md.token_bitmask = token_bitmask
        probs_of = proposal_probs or {}
        # q of request i sliced to its scheduled proposals (the scheduler may cut a draft's run short).
        q = [probs_of[r.request_id][: len(p)] if r.request_id in probs_of and p else None
             for r, p in zip(reqs, proposals)]
        out = self.sampler.verify(logits, md, proposals, generators, q)
        result = StepResult({}, {}, {})
        for i, req in enumerate(reqs):
            rid = req.request_id
            result.sampled_token_ids[rid] = out.token_ids[i]
            result.sampled_logprobs[rid] = out.sampled_logprobs[i]
            if out.logprobs[i] is not None:
                result.logprobs[rid] = out.logprobs[i]
        return result


def _fill_bitmasks(
    entries: list[tuple[int, GrammarMatcher, list[int]]], vocab_size: int, device: torch.device
) -> TokenBitmask:
    """(first logits row, matcher, proposals) per constrained request -> the bitmask of each of its rows that the
    grammar can reach: row first_row + j after proposals[:j], for j up to the number of proposals it accepts."""
    num_rows = sum(len(proposals) + 1 for _, _, proposals in entries)
    bitmask = torch.empty(num_rows, bitmask_width(vocab_size), dtype=torch.int32)
    row_ids: list[int] = []
    for first_row, matcher, proposals in entries:
        matcher.fill_bitmask(bitmask, len(row_ids))
        row_ids.append(first_row)
        num_valid = matcher.num_valid_tokens(proposals) if proposals else 0
        for j in range(num_valid):
            matcher.accept_token(proposals[j])
            matcher.fill_bitmask(bitmask, len(row_ids))
            row_ids.append(first_row + j + 1)
        matcher.rollback(num_valid)
    return TokenBitmask(
        row_ids=torch.tensor(row_ids, dtype=torch.int64, device=device),
        bitmask=bitmask[: len(row_ids)].to(device),
    )


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)  # a view over another model's weights (models/early_exit.py) says it
    return dtype if isinstance(dtype, torch.dtype) else next(model.parameters()).dtype
