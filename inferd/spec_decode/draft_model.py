"""Draft-model proposals: a smaller model (or the target's first K layers) guesses the next k tokens, one
forward pass per guessed token, batched over the requests that speculate this step.

The draft keeps its own paged KV cache: a `KVCacheManager` (its own block pool, prefix caching as the target's)
and a `ModelRunner` over the draft model, the same pieces the target uses. Per request it tracks a shadow
`Request` that shares the target request's token lists (so appended and truncated tokens are seen at once) and
carries the draft's own `num_computed_tokens`.

One `propose` call, for requests with k_i >= 1 each:
  1. catch up: every request computes the tokens the draft has not seen yet, all_token_ids[c:L] (L = num_tokens;
     after a step this is the target's new token, plus the last accepted proposal when all were accepted; a new
     request's whole prompt, less its hits in the draft's own prefix cache). The draft's K/V is valid for the
     longest prefix of what it computed that still equals all_token_ids: K/V written for proposals the target
     rejected is dropped (num_computed rolls back, blocks past it are freed) before anything else.
  2. draft: logits at position L - 1 give d_1; then k - 1 one-token passes (d_j at position L + j - 1 gives
     d_{j + 1}), only for the requests that still want more.
The catch-up is bounded by the draft runner's token budget; a request whose backlog does not fit catches up
a chunk this step and proposes next step. A request the draft's cache cannot hold does not propose this step.

Greedy requests propose the draft's argmax. Sampling requests draw d_j from q_j, the draft's distribution after
the request's own logit edits and filters (temperature, top-k, top-p, min-p, penalties over its output plus
d_1..d_{j-1}); q [k, V] is handed to the rejection sampler (`take_proposal_probs`), which keeps the target's
distribution exact for any q the proposals were really drawn from.
"""

from __future__ import annotations

import torch

from inferd.config import EngineConfig
from inferd.kv_cache.manager import KVCacheManager
from inferd.layers.sampler import apply_logit_edits, apply_sampling_filters, build_sampling_metadata
from inferd.request import Request
from inferd.runner.model_runner import ModelRunner


class _DraftState:
    def __init__(self, request: Request, generator: torch.Generator | None) -> None:
        # Shares the token lists with the target's request; num_computed_tokens is the draft's own.
        shadow = Request(request.request_id, [], request.sampling_params)
        shadow.prompt_token_ids = request.prompt_token_ids
        shadow.output_token_ids = request.output_token_ids
        shadow.all_token_ids = request.all_token_ids
        self.shadow = shadow
        # Proposals past all_token_ids[:shadow.num_computed_tokens] whose K/V the draft wrote (d_1..d_{k-1}).
        self.drafted_token_ids: list[int] = []
        self.generator = generator


class DraftModelProposer:
    def __init__(self, config: EngineConfig, draft_model, draft_arch_config, num_blocks: int,
                 target_vocab_size: int) -> None:
        self.runner = ModelRunner(config, draft_model, draft_arch_config, num_blocks)
        self.kv_manager = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_num_seqs = config.max_num_seqs
        self.vocab_size = target_vocab_size  # proposals and q live in the target's vocabulary
        self.device = self.runner.device
        self._states: dict[str, _DraftState] = {}
        self._probs: dict[str, torch.Tensor] = {}  # request_id -> q [k, V] of its last proposals (sampling only)

    # ------------------------------------------------------------------ per-request state
    def remove_request(self, request_id: str) -> None:
        """Finished, aborted or preempted: free the request's draft blocks (it catches up again if it returns)."""
        state = self._states.pop(request_id, None)
        self._probs.pop(request_id, None)
        if state is not None:
            self.kv_manager.free(state.shadow)

    def take_proposal_probs(self, spec_token_ids: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        """q [k', V] of each scheduled request that sampled its proposals (k' = the proposals the scheduler kept);
        forgets every other stored q."""
        probs, self._probs = self._probs, {}
        return {rid: probs[rid][: len(ids)] for rid, ids in spec_token_ids.items() if rid in probs}

    def _state_for(self, request: Request) -> _DraftState:
        state = self._states.get(request.request_id)
        if state is None or state.shadow.all_token_ids is not request.all_token_ids:
            if state is not None:
                self.kv_manager.free(state.shadow)
            seed = request.sampling_params.seed
            generator = None
            if seed is not None and not request.sampling_params.is_greedy:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(seed)
            state = _DraftState(request, generator)
            self._states[request.request_id] = state
        return state

    def _roll_back(self, state: _DraftState) -> None:
        """Keep the draft's K/V only for the longest computed prefix that still equals all_token_ids."""
        shadow = state.shadow
        tokens = shadow.all_token_ids
        num_valid = min(shadow.num_computed_tokens, len(tokens))
        for token_id in state.drafted_token_ids:
            if num_valid >= len(tokens) or tokens[num_valid] != token_id:
                break
            num_valid += 1
        state.drafted_token_ids = []
        # The last known token is always recomputed: its logits start the draft.
        num_valid = min(num_valid, len(tokens) - 1)
        shadow.num_computed_tokens = num_valid
        self.kv_manager.free_slots_past(shadow, num_valid)

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def propose(self, requests: list[tuple[Request, int]]) -> dict[str, list[int]]:
        """(request, k >= 1) pairs -> request_id -> up to k proposed token ids (absent: none this step)."""
        kv = self.kv_manager
        budget = self.max_num_batched_tokens
        chunks: list[tuple[list[int], int, list[int]]] = []
        chunk_states: list[_DraftState] = []
        drafting: list[tuple[int, Request, _DraftState, int]] = []  # (chunk row, request, state, k)
        for request, k in requests:
            if len(chunks) >= self.max_num_seqs or budget <= 0:
                break
            state = self._state_for(request)
            shadow = state.shadow
            self._roll_back(state)
            hit_block_ids: list[int] = []
            if not kv.get_block_ids(shadow.request_id):
                hit_block_ids, num_hit_tokens = kv.get_computed_blocks(shadow)
                shadow.num_computed_tokens = 0
            else:
                num_hit_tokens = 0
            start = shadow.num_computed_tokens + num_hit_tokens
            num_backlog = shadow.num_tokens - start
            num_new = min(num_backlog, budget)
            is_drafting = num_new == num_backlog
            # Slots: the backlog, then d_1..d_{k-1} fed back (d_k is never fed).
            if not kv.allocate_slots(shadow, num_new + (k - 1 if is_drafting else 0), hit_block_ids):
                continue
            if hit_block_ids or start == 0:
                kv.record_prefix_cache_stats(shadow.num_tokens, num_hit_tokens)
            shadow.num_computed_tokens = start
            chunks.append((shadow.all_token_ids[start : start + num_new], start, kv.get_block_ids(shadow.request_id)))
            chunk_states.append(state)
            budget -= num_new
            if is_drafting:
                drafting.append((len(chunks) - 1, request, state, k))
        if not chunks:
            return {}
        logits = self.runner.compute_last_logits(chunks)  # [B, V_draft]
        for (token_ids, _, _), state in zip(chunks, chunk_states):
            state.shadow.num_computed_tokens += len(token_ids)
            kv.cache_full_blocks(state.shadow)
        if not drafting:
            return {}

        rows = torch.tensor([row for row, *_ in drafting], dtype=torch.long, device=self.device)
        logits = logits.index_select(0, rows)
        proposals: list[list[int]] = [[] for _ in drafting]
        probs: list[list[torch.Tensor]] = [[] for _ in drafting]
        active = list(range(len(drafting)))  # indices into drafting that want another token
        while True:
            token_ids, q = self._draw([drafting[i][1] for i in active], [proposals[i] for i in active],
                                      [drafting[i][2].generator for i in active], logits)
            for position, i in enumerate(active):
                proposals[i].append(token_ids[position])
                if q[position] is not None:
                    probs[i].append(q[position])
            active = [i for i in active if len(proposals[i]) < drafting[i][3]]
            if not active:
                break
            step_chunks = []
            for i in active:
                state = drafting[i][2]
                position = state.shadow.num_tokens + len(proposals[i]) - 1
                step_chunks.append(([proposals[i][-1]], position, kv.get_block_ids(state.shadow.request_id)))
            logits = self.runner.compute_last_logits(step_chunks)

        result: dict[str, list[int]] = {}
        for i, (_, request, state, _) in enumerate(drafting):
            rid = request.request_id
            result[rid] = proposals[i]
            state.drafted_token_ids = proposals[i][:-1]
            if probs[i]:
                self._probs[rid] = torch.stack(probs[i])  # [k, V]
        return result

    def _draw(self, requests: list[Request], drafted: list[list[int]], generators: list[torch.Generator | None],
              draft_logits: torch.Tensor) -> tuple[list[int], list[torch.Tensor | None]]:
        """One proposal per row of `draft_logits` [B, V_draft]: the argmax for greedy requests, else a draw from
        q (returned as [V] float32 in the target's vocabulary); None for greedy rows."""
        logits = self._to_target_vocab(draft_logits.float())
        params = [r.sampling_params for r in requests]
        if all(p.is_greedy for p in params):
            return logits.argmax(dim=-1).tolist(), [None] * len(requests)
        md = build_sampling_metadata(
            params=params,
            prompt_token_ids=[r.prompt_token_ids for r in requests],
            output_token_ids=[r.output_token_ids + d for r, d in zip(requests, drafted)],
            generators=[None] * len(requests),
            eos_token_ids=[r.eos_token_ids for r in requests],
            vocab_size=self.vocab_size,
            device=self.device,
        )
        edited = apply_logit_edits(logits, md)
        token_ids = edited.argmax(dim=-1).tolist()
        q: list[torch.Tensor | None] = [None] * len(requests)
        assert md.random_row_ids is not None
        random_probs = apply_sampling_filters(edited, md).softmax(dim=-1)  # [R, V]
        for position, row in enumerate(md.random_row_ids.tolist()):
            q[row] = random_probs[position]
            token_ids[row] = int(torch.multinomial(random_probs[position], 1, generator=generators[row]))
        return token_ids, q

    def _to_target_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, V_draft] -> [B, V_target]: ids past the draft's vocabulary can never be proposed (-inf)."""
        num_draft = logits.shape[1]
        if num_draft == self.vocab_size:
            return logits
        if num_draft > self.vocab_size:
            return logits[:, : self.vocab_size]
        pad = torch.full((logits.shape[0], self.vocab_size - num_draft), float("-inf"), device=logits.device)
        return torch.cat([logits, pad], dim=1)
