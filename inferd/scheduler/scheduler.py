"""Layer 1: continuous batching that hands out TOKENS under a per-step budget.

There are no prefill and decode phases here, only numbers: a step gives each request some k tokens to compute,
all_token_ids[num_computed_tokens : num_computed_tokens + k]. A decode is k = 1, a prompt chunk is k <= budget,
a prefix-cache hit simply moves num_computed_tokens forward before the first step.

One step's policy:
  1. RUNNING requests, in arrival order, each get min(tokens left, budget left). A request that cannot get a
     block preempts the most recently arrived running request (recompute: its blocks are freed and it returns
     to the front of the waiting queue), possibly itself.
  2. If nobody was preempted: WAITING requests, first come first served, while budget and max_num_seqs allow.
     Each starts from its prefix-cache hit; a prompt larger than the budget left gets a chunk of it.
     A request whose sibling (same group_id, n > 1) is still computing the prompt's full blocks waits, so it
     then finds them in the prefix cache instead of computing them again (prefix caching on only).
So decodes always go first and a long prompt never stalls running streams.

Speculative tokens: a running request at its decode point (one known token left to compute) that carries
proposals (request.spec_token_ids) gets 1 + k tokens, k capped by the budget (one token stays reserved for each
running request behind it), by max_model_len and by the KV cache: when its blocks cannot cover the look-ahead
it decodes one token instead, and only then preempts anyone. `update` takes the accepted tokens, rolls
num_computed_tokens back over the rejected proposals and frees the blocks that held only rejected slots; prefix
cache hashes only ever cover computed tokens of all_token_ids, never a proposal.

The output is also a diff for the runner, which keeps its own state per request (vLLM v1's SchedulerOutput): a
request it has no state for (new, or resumed after preemption) arrives whole as `NewRequestData`; one it holds
arrives as `CachedRequestData` (its num_computed_tokens, and the change to its block table since the runner last
saw it); requests finished or aborted since the previous step are listed so the runner drops them. The runner
appends the tokens it samples itself; stop checks only ever cut tokens from a request that then finishes.

Precondition (the engine's job): every request fits the cache alone, num_tokens <= num_blocks * block_size,
and is finished before num_tokens exceeds max_model_len.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from inferd.kv_cache.manager import KVCacheManager
from inferd.request import Request, RequestStatus, SamplingParams


@dataclass
class NewRequestData:
    """A request the runner holds no state for: scheduled from the waiting queue (new, or resumed after
    preemption). Lists are copies, except `grammar_matcher`: the engine advances it, the runner reads its state
    for next-token bitmasks (opaque here)."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # non-empty when resumed after preemption
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    block_ids: list[int]
    num_computed_tokens: int  # prefix-cache hits included
    grammar_matcher: object | None = None


@dataclass
class CachedRequestData:
    """A request the runner already holds: its table is the first `num_kept_block_ids` entries of the one it has
    (look-ahead blocks of rejected proposals may have been freed since) followed by `new_block_ids`."""

    request_id: str
    num_computed_tokens: int  # after the previous step's update (rejected proposals rolled back)
    num_kept_block_ids: int
    new_block_ids: list[int]


@dataclass
class SchedulerOutput:
    """One step's work. Tokens are laid out in the order of `scheduled_requests` (= of `num_scheduled_tokens`).
    The runner reads only the diff fields: scheduled_new_reqs, scheduled_cached_reqs, num_scheduled_tokens,
    spec_token_ids, finished_request_ids and preempted_request_ids; the engine and `update` use the Requests."""

    scheduled_requests: list[Request]
    num_scheduled_tokens: dict[str, int]  # request_id -> tokens to compute this step
    total_num_scheduled_tokens: int
    # request_id -> the request's whole block table after this step's allocation (a copy).
    block_ids: dict[str, list[int]] = field(default_factory=dict)
    # Requests that left RUNNING for the waiting queue this step (their K/V is gone; they recompute later).
    preempted_request_ids: list[str] = field(default_factory=list)
    # Requests scheduled from the waiting queue this step (new, or resumed after preemption), with the number of
    # their tokens served by the prefix cache (already counted in request.num_computed_tokens).
    new_request_ids: list[str] = field(default_factory=list)
    num_prefix_hit_tokens: dict[str, int] = field(default_factory=dict)
    # request_id -> the k proposed tokens computed after its last known token this step (k >= 1 only).
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)
    scheduled_cached_reqs: list[CachedRequestData] = field(default_factory=list)
    # Requests the runner held that finished or were aborted since the previous schedule().
    finished_request_ids: set[str] = field(default_factory=set)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled_requests


def request_needs_sample(request: Request, num_scheduled_tokens: int) -> bool:
    """True when this step's chunk reaches the end of all_token_ids (and any proposals past it), so the runner
    samples. Call before `Scheduler.update` (which advances num_computed_tokens)."""
    return request.num_computed_tokens + num_scheduled_tokens >= request.num_tokens


class Scheduler:
    def __init__(
        self,
        kv_manager: KVCacheManager,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        enable_chunked_prefill: bool = True,
    ) -> None:
        if block_size != kv_manager.block_size:
            raise ValueError(f"block_size {block_size} differs from the KV cache manager's {kv_manager.block_size}")
        if max_num_batched_tokens < 1 or max_num_seqs < 1 or max_model_len < 1:
            raise ValueError("max_num_batched_tokens, max_num_seqs and max_model_len must all be >= 1")
        self.kv_manager = kv_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.enable_chunked_prefill = enable_chunked_prefill
        self.requests: dict[str, Request] = {}  # every unfinished request, by id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # sorted by arrival (add_request order)
        self._arrival_seq: dict[str, int] = {}
        self._next_arrival_seq = 0
        self.num_preemptions = 0  # since start, all requests
        # What the runner holds: request_id -> the block table it was last sent (see SchedulerOutput's diff).
        self._runner_block_ids: dict[str, list[int]] = {}
        self._finished_request_ids: set[str] = set()

    # ------------------------------------------------------------------ request lifecycle
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already scheduled")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self._arrival_seq[request.request_id] = self._next_arrival_seq
        self._next_arrival_seq += 1
        self.waiting.append(request)

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Remove an unfinished request in any state, free its blocks at once, and set its finished status.
        Returns the request, or None if it is unknown or already finished."""
        if not status.is_finished:
            raise ValueError(f"finish_request needs a finished status, got {status}")
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._arrival_seq.pop(request_id, None)
        self.kv_manager.free(request)
        if self._runner_block_ids.pop(request_id, None) is not None:
            self._finished_request_ids.add(request_id)
        request.status = status
        return request

    def abort_request(self, request_id: str) -> Request | None:
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ------------------------------------------------------------------ the step
    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[Request] = []
        num_scheduled_tokens: dict[str, int] = {}
        preempted_ids: list[str] = []

        spec_token_ids: dict[str, list[int]] = {}
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            proposals, request.spec_token_ids = request.spec_token_ids, []
            num_new_tokens = self._num_tokens_to_compute(request, budget)
            if num_new_tokens <= 0:
                i += 1
                continue
            num_spec = self._num_spec_tokens(request, proposals, num_new_tokens, budget - (len(self.running) - i - 1))
            if num_spec and not self.kv_manager.allocate_slots(request, num_new_tokens + num_spec):
                num_spec = 0  # no look-ahead rather than a preemption
            while not num_spec and not self.kv_manager.allocate_slots(request, num_new_tokens):
                # Victims come from the tail, which was not scheduled yet this step (it is at index >= i).
                victim = self.running.pop()
                self._preempt(victim)
                preempted_ids.append(victim.request_id)
                if victim is request:
                    break
            else:
                scheduled.append(request)
                num_scheduled_tokens[request.request_id] = num_new_tokens + num_spec
                if num_spec:
                    spec_token_ids[request.request_id] = proposals[:num_spec]
                budget -= num_new_tokens + num_spec
                i += 1

        new_request_ids: list[str] = []
        num_prefix_hit_tokens: dict[str, int] = {}
        if not preempted_ids:
            budget = self._schedule_waiting(budget, scheduled, num_scheduled_tokens, new_request_ids,
                                            num_prefix_hit_tokens)

        block_ids = {r.request_id: self.kv_manager.get_block_ids(r.request_id) for r in scheduled}
        new_reqs, cached_reqs = self._runner_diff(scheduled, block_ids, set(new_request_ids))
        finished_ids, self._finished_request_ids = self._finished_request_ids, set()
        return SchedulerOutput(
            scheduled_requests=scheduled,
            num_scheduled_tokens=num_scheduled_tokens,
            total_num_scheduled_tokens=self.max_num_batched_tokens - budget,
            block_ids=block_ids,
            preempted_request_ids=preempted_ids,
            new_request_ids=new_request_ids,
            num_prefix_hit_tokens=num_prefix_hit_tokens,
            spec_token_ids=spec_token_ids,
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached_reqs,
            finished_request_ids=finished_ids,
        )

    def _runner_diff(self, scheduled: list[Request], block_ids: dict[str, list[int]],
                     new_request_ids: set[str]) -> tuple[list[NewRequestData], list[CachedRequestData]]:
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        for request in scheduled:
            rid = request.request_id
            table = block_ids[rid]
            sent = self._runner_block_ids.get(rid)
            if rid in new_request_ids or sent is None:
                new_reqs.append(NewRequestData(
                    request_id=rid, prompt_token_ids=list(request.prompt_token_ids),
                    output_token_ids=list(request.output_token_ids), sampling_params=request.sampling_params,
                    eos_token_ids=request.eos_token_ids, block_ids=list(table),
                    num_computed_tokens=request.num_computed_tokens, grammar_matcher=request.grammar_matcher))
            else:
                # Tables only grow or lose their tail: the common prefix is what the runner keeps.
                num_kept = min(len(sent), len(table))
                if sent[:num_kept] != table[:num_kept]:
                    num_kept = next(i for i, (a, b) in enumerate(zip(sent, table)) if a != b)
                cached_reqs.append(CachedRequestData(rid, request.num_computed_tokens, num_kept, table[num_kept:]))
            self._runner_block_ids[rid] = list(table)
        return new_reqs, cached_reqs

    def _num_spec_tokens(self, request: Request, proposals: list[int], num_new_tokens: int, budget: int) -> int:
        """How many proposals ride along: only when this step reaches the end of the known tokens, within the
        budget and below max_model_len (a proposal at position p needs p < max_model_len)."""
        if not proposals or request.num_computed_tokens + num_new_tokens != request.num_tokens:
            return 0
        return max(0, min(len(proposals), budget - num_new_tokens, self.max_model_len - request.num_tokens))

    def _schedule_waiting(
        self,
        budget: int,
        scheduled: list[Request],
        num_scheduled_tokens: dict[str, int],
        new_request_ids: list[str],
        num_prefix_hit_tokens: dict[str, int],
    ) -> int:
        kv = self.kv_manager
        prefilling_group_ids = {r.group_id for r in self.running if self._is_computing_shareable_prompt(r)}
        held_back: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            if request.group_id in prefilling_group_ids:
                held_back.append(self.waiting.popleft())
                continue
            hit_block_ids, num_hit_tokens = kv.get_computed_blocks(request)
            num_new_tokens = self._num_tokens_to_compute(request, budget, num_computed_tokens=num_hit_tokens)
            if num_new_tokens <= 0:
                break
            if not kv.allocate_slots(request, num_new_tokens, hit_block_ids):
                break  # first come first served: nobody behind it jumps the queue for blocks
            self.waiting.popleft()
            kv.record_prefix_cache_stats(request.num_tokens, num_hit_tokens)
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
            request.status = RequestStatus.RUNNING
            self._insert_running(request)
            if self._is_computing_shareable_prompt(request):
                prefilling_group_ids.add(request.group_id)
            scheduled.append(request)
            num_scheduled_tokens[request.request_id] = num_new_tokens
            new_request_ids.append(request.request_id)
            num_prefix_hit_tokens[request.request_id] = num_hit_tokens
            budget -= num_new_tokens
        self.waiting.extendleft(reversed(held_back))
        return budget

    def _num_tokens_to_compute(self, request: Request, budget: int, num_computed_tokens: int | None = None) -> int:
        """Tokens this request computes this step; 0 when it must wait (whole-prompt mode and over budget)."""
        if num_computed_tokens is None:
            num_computed_tokens = request.num_computed_tokens
        num_left = min(request.num_tokens, self.max_model_len) - num_computed_tokens
        if num_left > budget and not self.enable_chunked_prefill and num_left <= self.max_num_batched_tokens:
            # Whole prompts only; one larger than the whole budget is still chunked, or it would never run.
            return 0
        return min(num_left, budget)

    def _is_computing_shareable_prompt(self, request: Request) -> bool:
        """Whether the request still computes prompt blocks a sibling could take from the prefix cache: the full
        prompt blocks below the last prompt token (a lookup never returns the block holding the last token)."""
        if not self.kv_manager.enable_prefix_caching:
            return False
        num_shareable_tokens = (request.num_prompt_tokens - 1) // self.block_size * self.block_size
        return request.num_computed_tokens < num_shareable_tokens

    def _insert_running(self, request: Request) -> None:
        seq = self._arrival_seq[request.request_id]
        keys = [self._arrival_seq[r.request_id] for r in self.running]
        self.running.insert(bisect.bisect(keys, seq), request)

    def _preempt(self, request: Request) -> None:
        self.kv_manager.free(request)
        self._runner_block_ids.pop(request.request_id, None)  # listed as preempted: the runner drops it
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    # ------------------------------------------------------------------ after the step
    def update(self, scheduler_output: SchedulerOutput, sampled_token_ids: dict[str, list[int]]) -> None:
        """Advance num_computed_tokens by what was scheduled, append the new tokens of each request whose chunk
        reached the end of its tokens, and cache blocks now full of computed tokens. Stop checks are the engine's.

        A request that computed k proposals gets 1..k + 1 tokens: the accepted proposals (a prefix of them) and
        one more. num_computed_tokens rolls back over the rejected ones and the blocks past the request's tokens
        are freed.

        Raises ValueError when a request that had to sample got no token, one that did not got one, or the tokens
        are not an accepted prefix of its proposals plus one.
        """
        for request in scheduler_output.scheduled_requests:
            rid = request.request_id
            if request.is_finished or self.requests.get(rid) is not request:
                continue  # finished or aborted between schedule() and update()
            num_tokens = scheduler_output.num_scheduled_tokens[rid]
            is_sampling = request_needs_sample(request, num_tokens)
            if is_sampling != (rid in sampled_token_ids):
                raise ValueError(
                    f"request {rid!r}: {'no token sampled' if is_sampling else 'a token sampled'} but its chunk "
                    f"{'reaches' if is_sampling else 'does not reach'} the end of its tokens"
                )
            request.num_computed_tokens += num_tokens
            if is_sampling:
                new_token_ids = sampled_token_ids[rid]
                proposals = scheduler_output.spec_token_ids.get(rid, [])
                num_accepted = len(new_token_ids) - 1
                if not (0 <= num_accepted <= len(proposals)) or new_token_ids[:num_accepted] != proposals[:num_accepted]:
                    raise ValueError(
                        f"request {rid!r}: tokens {new_token_ids} are not an accepted prefix of the proposals "
                        f"{proposals} plus one token"
                    )
                request.num_computed_tokens -= len(proposals) - num_accepted
                for token_id in new_token_ids:
                    request.append_output_token(token_id)
                if len(proposals) > num_accepted:
                    self.kv_manager.free_slots_past(request, request.num_tokens)
            self.kv_manager.cache_full_blocks(request)
