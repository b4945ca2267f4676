"""When to speculate, and how many tokens, per request and per step.

Verifying k proposals costs one forward pass of k + 1 tokens instead of 1. That is nearly free while the step is
memory-bound (a few sequences: the weights stream once either way) and pure waste once the batch alone fills the
compute, or when proposals are mostly rejected. Modes:
  off    never propose.
  ngram  prompt lookup for every request, `num_speculative_tokens` each step.
  draft  the draft model (spec_decode/draft_model.py) for every request, `num_speculative_tokens` each step.
  auto   the draft model when one is configured, else prompt lookup, while at most `max_running_requests`
         sequences run; per request, k follows the recent acceptance (an exponential average of accepted /
         proposed): a request whose proposals keep failing rests for `backoff_steps` steps before it tries again.
A request with SamplingParams.speculative false never proposes. Under auto, neither does a seeded sampling
request: whether auto speculates depends on the batch, and a seeded request must draw the same tokens whatever
its batch (verification consumes extra uniforms). Greedy output never depends on speculation.
"""

from __future__ import annotations

from dataclasses import dataclass

from inferd.config import SPECULATIVE_MODES
from inferd.request import Request
from inferd.spec_decode.draft_model import DraftModelProposer
from inferd.spec_decode.ngram import NgramProposer


def make_proposer(mode: str, draft: DraftModelProposer | None = None) -> NgramProposer | DraftModelProposer | None:
    """off -> None; ngram -> prompt lookup; draft -> `draft` (required); auto -> `draft` if given, else lookup."""
    if mode not in SPECULATIVE_MODES:
        raise ValueError(f"speculative must be one of {SPECULATIVE_MODES}, got {mode!r}")
    if mode == "off":
        return None
    if mode == "draft" and draft is None:
        raise ValueError("speculative 'draft' needs a draft model (speculative_model)")
    if mode in ("draft", "auto") and draft is not None:
        return draft
    return NgramProposer()


@dataclass
class _RequestState:
    acceptance_rate: float = 1.0  # exponential average of accepted / proposed
    num_rest_steps: int = 0  # steps left without proposals


class SpeculativePolicy:
    def __init__(
        self,
        mode: str,
        num_speculative_tokens: int = 5,
        max_running_requests: int = 4,
        min_acceptance_rate: float = 0.25,
        backoff_steps: int = 8,
        draft: DraftModelProposer | None = None,
    ) -> None:
        self.mode = mode
        self.proposer = make_proposer(mode, draft)
        self.draft = self.proposer if isinstance(self.proposer, DraftModelProposer) else None
        self.num_speculative_tokens = num_speculative_tokens
        self.max_running_requests = max_running_requests
        self.min_acceptance_rate = min_acceptance_rate
        self.backoff_steps = backoff_steps
        self._states: dict[str, _RequestState] = {}
        self.num_draft_tokens = 0  # cumulative, proposals that were verified
        self.num_accepted_tokens = 0  # cumulative
        self.num_verify_steps = 0  # cumulative request-steps that verified >= 1 proposal

    @property
    def is_enabled(self) -> bool:
        return self.proposer is not None

    def record(self, request_id: str, num_proposed: int, num_accepted: int) -> None:
        """After a step that verified `num_proposed` >= 1 proposals of the request."""
        self.num_draft_tokens += num_proposed
        self.num_accepted_tokens += num_accepted
        self.num_verify_steps += 1
        state = self._states.setdefault(request_id, _RequestState())
        state.acceptance_rate = 0.7 * state.acceptance_rate + 0.3 * (num_accepted / num_proposed)
        if self.mode == "auto" and state.acceptance_rate < self.min_acceptance_rate:
            state.num_rest_steps = self.backoff_steps
            state.acceptance_rate = 0.4  # after the rest: try again with k <= 2 (the rate < 0.5 tier)

    def num_tokens_to_propose(self, request: Request, num_running: int, max_num_tokens: int) -> int:
        """How many proposals the request asks for next step (0: none); a resting request spends a rest step."""
        if self.proposer is None or not request.sampling_params.speculative:
            return 0
        num_tokens = min(self.num_speculative_tokens, max_num_tokens)
        if self.mode == "auto":
            params = request.sampling_params
            if num_running > self.max_running_requests or (params.seed is not None and not params.is_greedy):
                return 0
            state = self._states.get(request.request_id)
            if state is not None:
                if state.num_rest_steps > 0:
                    state.num_rest_steps -= 1
                    return 0
                if state.acceptance_rate < 0.5:
                    num_tokens = min(num_tokens, 2)
        return max(0, num_tokens)

    def propose(self, request: Request, num_running: int, max_num_tokens: int) -> list[int]:
        """Proposals for the request's next step (at most `max_num_tokens`), or []."""
        return self.propose_batch([(request, max_num_tokens)], num_running).get(request.request_id, [])

    def propose_batch(self, requests: list[tuple[Request, int]], num_running: int) -> dict[str, list[int]]:
        """(request, most proposals it may take) pairs -> request_id -> its proposals for the next step (absent:
        none). A draft model proposes for all of them in one batched run."""
        wanted = [(r, k) for r, m in requests if (k := self.num_tokens_to_propose(r, num_running, m)) > 0]
        if not wanted:
            return {}
        if self.draft is not None:
            return self.draft.propose(wanted)
        assert isinstance(self.proposer, NgramProposer)
        proposals = {r.request_id: self.proposer.propose(r.all_token_ids, k) for r, k in wanted}
        return {rid: ids for rid, ids in proposals.items() if ids}

    def take_proposal_probs(self, spec_token_ids: dict[str, list[int]]):
        """request_id -> q [k, V] of the scheduled proposals drawn from a draft distribution (none for lookup or
        greedy drafts: a point mass); see DraftModelProposer.take_proposal_probs."""
        return self.draft.take_proposal_probs(spec_token_ids) if self.draft is not None else {}

    def on_preempted(self, request_id: str) -> None:
        """Its K/V is gone: the draft's is dropped too (its acceptance history stays)."""
        if self.draft is not None:
            self.draft.remove_request(request_id)

    def remove_request(self, request_id: str) -> None:
        self._states.pop(request_id, None)
        if self.draft is not None:
            self.draft.remove_request(request_id)
