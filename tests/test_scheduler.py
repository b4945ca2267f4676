"""Scheduler bookkeeping: tokens scheduled per request per step, ordering, preemption, aborts, n > 1 sharing."""

from __future__ import annotations

import hashlib
import random

import pytest

from inferd.kv_cache.manager import KVCacheManager
from inferd.request import Request, RequestStatus, SamplingParams
from inferd.scheduler import Scheduler, SchedulerOutput, request_needs_sample


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_batched_tokens: int = 64,
    max_num_seqs: int = 16,
    max_model_len: int = 256,
    enable_prefix_caching: bool = True,
    enable_chunked_prefill: bool = True,
) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
    return Scheduler(kv, max_num_batched_tokens, max_num_seqs, max_model_len, block_size, enable_chunked_prefill)


def make_request(request_id: str, token_ids: list[int], max_tokens: int = 8, group_id: str | None = None) -> Request:
    return Request(request_id, token_ids, SamplingParams(max_tokens=max_tokens), group_id=group_id)


def next_token(request: Request) -> int:
    """The simulated model's output: the k-th output token of every request is 500 + k."""
    return 500 + request.num_output_tokens


def step(sched: Scheduler) -> SchedulerOutput:
    """One engine step with a simulated runner; the engine's length stop check finishes requests."""
    out = sched.schedule()
    sampled = {
        r.request_id: [next_token(r)]
        for r in out.scheduled_requests
        if request_needs_sample(r, out.num_scheduled_tokens[r.request_id])
    }
    sched.update(out, sampled)
    for request_id in sampled:
        request = sched.get_request(request_id)
        if request.num_output_tokens >= request.sampling_params.max_tokens:
            sched.finish_request(request_id, RequestStatus.FINISHED_LENGTH)
    sched.kv_manager.check_integrity()
    return out


def ids(out: SchedulerOutput) -> list[str]:
    return [r.request_id for r in out.scheduled_requests]


def test_chunked_prefill_while_decodes_continue():
    sched = make_scheduler(max_num_batched_tokens=8)
    a = make_request("a", [1, 2, 3], max_tokens=10)
    sched.add_request(a)
    assert step(sched).num_scheduled_tokens == {"a": 3}
    sched.add_request(make_request("b", list(range(100, 120)), max_tokens=2))  # 20-token prompt
    expected = [{"a": 1, "b": 7}, {"a": 1, "b": 7}, {"a": 1, "b": 6}, {"a": 1, "b": 1}, {"a": 1}]
    for num_scheduled_tokens in expected:
        out = step(sched)
        assert out.num_scheduled_tokens == num_scheduled_tokens
        assert ids(out) == list(num_scheduled_tokens)  # decode (running, earlier arrival) first
        assert out.total_num_scheduled_tokens == sum(num_scheduled_tokens.values())
    assert sched.get_request("b") is None  # finished after 2 output tokens
    assert a.num_output_tokens == 6 and a.output_token_ids == [500, 501, 502, 503, 504, 505]


def test_budget_splits_between_running_prefills_in_arrival_order():
    sched = make_scheduler(max_num_batched_tokens=10)
    sched.add_request(make_request("a", list(range(16))))
    sched.add_request(make_request("b", list(range(100, 116))))
    assert step(sched).num_scheduled_tokens == {"a": 10}
    assert step(sched).num_scheduled_tokens == {"a": 6, "b": 4}
    assert step(sched).num_scheduled_tokens == {"a": 1, "b": 9}
    assert step(sched).num_scheduled_tokens == {"a": 1, "b": 3}
    assert step(sched).num_scheduled_tokens == {"a": 1, "b": 1}


def test_max_num_seqs_limits_running_requests():
    sched = make_scheduler(max_num_seqs=2)
    for name, max_tokens in (("a", 1), ("b", 3), ("c", 2)):
        sched.add_request(make_request(name, [ord(name)] * 5, max_tokens=max_tokens))
    out = step(sched)
    assert out.num_scheduled_tokens == {"a": 5, "b": 5}
    assert sched.num_running == 1 and sched.num_waiting == 1  # a finished after its one token
    out = step(sched)
    assert out.num_scheduled_tokens == {"b": 1, "c": 5}
    assert ids(out) == ["b", "c"]
    assert step(sched).num_scheduled_tokens == {"b": 1, "c": 1}
    assert not sched.has_unfinished_requests()


def test_whole_prompt_mode_waits_for_budget_but_chunks_oversized_prompts():
    sched = make_scheduler(max_num_batched_tokens=8, enable_chunked_prefill=False)
    sched.add_request(make_request("a", [1] * 5, max_tokens=3))
    sched.add_request(make_request("b", [2] * 6, max_tokens=1))
    sched.add_request(make_request("huge", [3] * 12, max_tokens=1))
    assert step(sched).num_scheduled_tokens == {"a": 5}  # b (6) does not fit the 3 left: waits whole
    # huge can never fit 8 tokens whole, so it is chunked as in chunked mode rather than stuck.
    assert step(sched).num_scheduled_tokens == {"a": 1, "b": 6, "huge": 1}
    assert step(sched).num_scheduled_tokens == {"a": 1, "huge": 7}
    assert step(sched).num_scheduled_tokens == {"huge": 4}
    assert not sched.has_unfinished_requests()


def test_preemption_under_a_tiny_pool_then_all_complete():
    # 5 blocks of 2 tokens; three 3-token prompts that each grow to 7 tokens (4 outputs, the last never computed).
    sched = make_scheduler(num_blocks=5, block_size=2, max_num_batched_tokens=100)
    requests = {name: make_request(name, [10 * i + 1, 10 * i + 2, 10 * i + 3], max_tokens=4)
                for i, name in enumerate("abc", start=1)}
    for r in requests.values():
        sched.add_request(r)
    kv = sched.kv_manager
    trace = []
    while sched.has_unfinished_requests():
        out = step(sched)
        trace.append((out.num_scheduled_tokens, out.preempted_request_ids,
                      {rid: out.block_ids[rid] for rid in out.num_scheduled_tokens}))
        assert len(trace) < 20
    assert trace == [
        ({"a": 3, "b": 3}, [], {"a": [0, 1], "b": [2, 3]}),  # c needs 2 blocks, 1 free: waits
        ({"a": 1, "b": 1}, [], {"a": [0, 1], "b": [2, 3]}),
        ({"a": 1}, ["b"], {"a": [0, 1, 4]}),  # a needs a 3rd block: b (latest arrival) is preempted
        ({"a": 1}, [], {"a": [0, 1, 4]}),  # b (5 tokens, 3 blocks) does not fit the 2 free; a finishes
        # b resumes first (front of the queue) from its own cached blocks 2, 3; c gets a's evicted blocks.
        ({"b": 1, "c": 3}, [], {"b": [2, 3, 4], "c": [1, 0]}),
        ({"b": 1, "c": 1}, [], {"b": [2, 3, 4], "c": [1, 0]}),
        ({"c": 1}, [], {"c": [1, 0, 4]}),  # b freed [4, 3, 2] tail first: 4 heads the queue
        ({"c": 1}, [], {"c": [1, 0, 4]}),
    ]
    for r in requests.values():
        assert r.status == RequestStatus.FINISHED_LENGTH
        assert r.output_token_ids == [500, 501, 502, 503]
    assert requests["b"].num_preemptions == 1 and sched.num_preemptions == 1
    assert requests["b"].num_cached_tokens == 0  # counted at its first scheduling only
    assert kv.num_free_blocks == 5
    kv.check_integrity()


def test_lone_request_that_cannot_grow_preempts_itself_without_looping():
    sched = make_scheduler(num_blocks=2, block_size=2, enable_prefix_caching=False)
    a = make_request("a", [1, 2, 3], max_tokens=4)
    sched.add_request(a)
    assert step(sched).num_scheduled_tokens == {"a": 3}
    assert step(sched).num_scheduled_tokens == {"a": 1}
    out = step(sched)  # 5 tokens need a 3rd block: none exists
    assert out.num_scheduled_tokens == {} and out.preempted_request_ids == ["a"]
    assert a.status == RequestStatus.PREEMPTED and a.num_computed_tokens == 0
    assert step(sched).is_empty  # still does not fit: nothing scheduled, schedule() returns
    assert sched.abort_request("a") is a
    assert sched.kv_manager.num_free_blocks == 2


def test_preemption_victim_is_the_latest_arrival_and_returns_to_the_queue_front():
    sched = make_scheduler(num_blocks=4, block_size=2, enable_prefix_caching=False)
    for name in "abc":
        sched.add_request(make_request(name, [ord(name)] * 2, max_tokens=8))
    d = make_request("d", [9], max_tokens=1)
    assert step(sched).num_scheduled_tokens == {"a": 2, "b": 2, "c": 2}
    sched.add_request(d)
    out = step(sched)  # a takes the last free block; b then preempts c (last), d may not start in this step
    assert out.num_scheduled_tokens == {"a": 1, "b": 1}
    assert out.preempted_request_ids == ["c"]
    assert [r.request_id for r in sched.waiting] == ["c", "d"]


def test_abort_frees_every_block_in_each_state():
    sched = make_scheduler(num_blocks=8, block_size=2, max_num_batched_tokens=6)
    kv = sched.kv_manager
    decoding = make_request("decoding", [1, 2, 3])
    prefilling = make_request("prefilling", list(range(20, 30)))
    waiting = make_request("waiting", [7, 7, 7])
    for r in (decoding, prefilling, waiting):
        sched.add_request(r)
    step(sched)
    out = step(sched)
    assert out.num_scheduled_tokens == {"decoding": 1, "prefilling": 5}
    assert waiting.status == RequestStatus.WAITING and kv.get_block_ids("waiting") == []
    assert prefilling.num_computed_tokens == 8 and kv.get_block_ids("prefilling") == [2, 3, 4, 5]

    assert sched.abort_request("prefilling") is prefilling
    assert prefilling.status == RequestStatus.FINISHED_ABORTED and kv.get_block_ids("prefilling") == []
    kv.check_integrity()
    assert sched.abort_request("decoding") is decoding
    assert kv.get_block_ids("decoding") == []
    assert sched.abort_request("waiting") is waiting
    assert sched.abort_request("waiting") is None and sched.abort_request("never") is None
    assert kv.num_free_blocks == 8 and not sched.has_unfinished_requests()
    assert sched.num_running == 0 and sched.num_waiting == 0
    kv.check_integrity()
    assert step(sched).is_empty

    # A preempted request (waiting again, blocks already freed) aborts cleanly too.
    sched2 = make_scheduler(num_blocks=2, block_size=2, enable_prefix_caching=False)
    r = make_request("r", [1, 2, 3], max_tokens=4)
    sched2.add_request(r)
    for _ in range(3):
        step(sched2)
    assert r.status == RequestStatus.PREEMPTED
    assert sched2.abort_request("r") is r and r.status == RequestStatus.FINISHED_ABORTED
    assert sched2.kv_manager.num_free_blocks == 2


def test_abort_between_schedule_and_update_is_ignored_by_update():
    sched = make_scheduler()
    a = make_request("a", [1, 2, 3])
    b = make_request("b", [4, 5, 6])
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    sched.abort_request("a")
    sched.update(out, {"a": [9], "b": [9]})
    assert a.output_token_ids == [] and b.output_token_ids == [9]
    sched.kv_manager.check_integrity()


def test_siblings_share_prompt_blocks():
    sched = make_scheduler(block_size=4)
    kv = sched.kv_manager
    prompt = list(range(10))
    siblings = [make_request(f"g#{i}", prompt, max_tokens=2, group_id="g") for i in range(3)]
    for r in siblings:
        sched.add_request(r)
    out = step(sched)
    assert out.num_scheduled_tokens == {"g#0": 10}  # the others wait for g#0's prompt blocks
    out = step(sched)
    assert out.num_scheduled_tokens == {"g#0": 1, "g#1": 2, "g#2": 2}
    assert out.num_prefix_hit_tokens == {"g#1": 8, "g#2": 8}
    assert out.block_ids == {"g#0": [0, 1, 2], "g#1": [0, 1, 3], "g#2": [0, 1, 4]}
    assert [b.ref_cnt for b in kv.block_pool.blocks[:5]] == [2, 2, 0, 1, 1]  # g#0 finished (max_tokens 2)
    assert [r.num_cached_tokens for r in siblings] == [0, 8, 8]
    assert kv.num_prefix_cache_queries_tokens == 30 and kv.num_prefix_cache_hits_tokens == 16


def test_siblings_are_not_held_without_prefix_caching():
    sched = make_scheduler(block_size=4, enable_prefix_caching=False)
    for i in range(3):
        sched.add_request(make_request(f"g#{i}", list(range(10)), group_id="g"))
    assert step(sched).num_scheduled_tokens == {"g#0": 10, "g#1": 10, "g#2": 10}
    assert sched.kv_manager.num_prefix_cache_queries_tokens == 0


def test_full_prefix_hit_still_computes_a_token():
    sched = make_scheduler(block_size=4)
    first = make_request("first", list(range(8)), max_tokens=1)
    sched.add_request(first)
    assert step(sched).num_scheduled_tokens == {"first": 8}
    same = make_request("same", list(range(8)), max_tokens=1)
    sched.add_request(same)
    out = step(sched)
    assert out.num_scheduled_tokens == {"same": 4} and out.num_prefix_hit_tokens == {"same": 4}
    assert same.output_token_ids == [500]
    longer = make_request("longer", list(range(9)), max_tokens=1)
    sched.add_request(longer)
    out = step(sched)
    assert out.num_scheduled_tokens == {"longer": 1} and longer.num_cached_tokens == 8


def test_update_rejects_a_missing_or_unexpected_sample():
    sched = make_scheduler(max_num_batched_tokens=4)
    sched.add_request(make_request("a", [1, 2, 3, 4, 5, 6]))
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"a": 4} and not request_needs_sample(out.scheduled_requests[0], 4)
    with pytest.raises(ValueError):
        sched.update(out, {"a": [1]})
    sched2 = make_scheduler()
    sched2.add_request(make_request("a", [1, 2, 3]))
    with pytest.raises(ValueError):
        sched2.update(sched2.schedule(), {})


def _model(token_ids: tuple[int, ...]) -> int:
    """A deterministic stand-in for a model: the next token is a function of the whole prefix."""
    return hashlib.sha256(repr(token_ids).encode()).digest()[0] % 7


@pytest.mark.parametrize("enable_prefix_caching, speculative", [(True, False), (False, False), (True, True),
                                                                 (False, True)])
def test_randomized_workload_outputs_match_unbatched_reference(enable_prefix_caching, speculative):
    """Random arrivals (shared prefixes, n > 1 groups), aborts, a small pool: every request's outputs equal those
    of running the model on it alone, and the simulated runner only ever reads K/V written for its own prefix.
    With `speculative`, running requests carry random proposals (mostly right, some wrong) that the simulated runner
    verifies greedily: rejected proposals' K/V must never be read as context or reach the prefix cache."""
    rng = random.Random(7)
    block_size = 4
    sched = make_scheduler(num_blocks=10, block_size=block_size, max_num_batched_tokens=12, max_num_seqs=5,
                           enable_prefix_caching=enable_prefix_caching)
    kv = sched.kv_manager
    slot_prefix: dict[int, tuple[int, ...]] = {}
    prefixes = [[rng.randrange(7) for _ in range(rng.randrange(1, 12))] for _ in range(3)]
    finished: list[Request] = []
    aborted: set[str] = set()
    all_requests: list[Request] = []
    num_proposed = num_accepted = 0

    def run(out: SchedulerOutput) -> dict[str, list[int]]:
        nonlocal num_proposed, num_accepted
        sampled = {}
        for r in out.scheduled_requests:
            num_new = out.num_scheduled_tokens[r.request_id]
            proposals = out.spec_token_ids.get(r.request_id, [])
            tokens = r.all_token_ids + proposals
            table = out.block_ids[r.request_id]
            assert table == kv.get_block_ids(r.request_id)
            assert r.num_computed_tokens + num_new <= len(tokens)
            for pos in range(r.num_computed_tokens):
                slot = table[pos // block_size] * block_size + pos % block_size
                assert slot_prefix[slot] == tuple(r.all_token_ids[: pos + 1])
            for pos in range(r.num_computed_tokens, r.num_computed_tokens + num_new):
                slot = table[pos // block_size] * block_size + pos % block_size
                slot_prefix[slot] = tuple(tokens[: pos + 1])
            if request_needs_sample(r, num_new):
                emitted = []
                for j in range(len(proposals) + 1):
                    target = _model(tuple(r.all_token_ids + proposals[:j]))
                    emitted.append(target)
                    if j == len(proposals) or target != proposals[j]:
                        break
                num_proposed += len(proposals)
                num_accepted += len(emitted) - 1
                sampled[r.request_id] = emitted
        return sampled

    def propose(r: Request) -> list[int]:
        """Up to 3 proposals, capped so the accepted run cannot pass max_tokens; each right with p = 0.7."""
        k = min(rng.randrange(0, 4), r.sampling_params.max_tokens - r.num_output_tokens - 1)
        proposals: list[int] = []
        for _ in range(max(0, k)):
            right = _model(tuple(r.all_token_ids + proposals))
            proposals.append(right if rng.random() < 0.7 else (right + 1) % 7)
        return proposals

    step_count = 0
    while step_count < 300 and (step_count < 150 or sched.has_unfinished_requests()):
        step_count += 1
        if step_count < 150 and rng.random() < 0.3:
            n = rng.choice([1, 1, 3])
            tokens = rng.choice(prefixes) + [rng.randrange(7) for _ in range(rng.randrange(1, 8))]
            max_tokens = rng.randrange(1, 10)
            for i in range(n):
                r = make_request(f"r{step_count}#{i}", tokens, max_tokens=max_tokens, group_id=f"r{step_count}")
                sched.add_request(r)
                all_requests.append(r)
        if rng.random() < 0.08 and sched.has_unfinished_requests():
            victim = rng.choice(list(sched.requests))
            sched.abort_request(victim)
            aborted.add(victim)
            kv.check_integrity()
        out = sched.schedule()
        assert out.total_num_scheduled_tokens <= 12 and len(out.scheduled_requests) <= 5
        sampled = run(out)
        sched.update(out, sampled)
        for r in out.scheduled_requests:
            if not r.is_finished and r.num_output_tokens >= r.sampling_params.max_tokens:
                sched.finish_request(r.request_id, RequestStatus.FINISHED_LENGTH)
                finished.append(r)
            elif speculative and r.request_id in sampled:
                r.spec_token_ids = propose(r)
        kv.check_integrity()
        for r in sched.running:  # the table never holds a block past the request's tokens after an update
            if r.request_id in sampled:
                assert len(kv.get_block_ids(r.request_id)) <= kv.num_blocks_for_tokens(r.num_tokens)
        assert sched.num_running <= 5

    assert not sched.has_unfinished_requests()
    assert kv.num_free_blocks == 10
    assert {r.request_id for r in finished} | aborted == {r.request_id for r in all_requests}
    for r in finished:
        tokens = list(r.prompt_token_ids)
        for _ in range(r.sampling_params.max_tokens):
            tokens.append(_model(tuple(tokens)))
        assert r.all_token_ids == tokens
    assert sched.num_preemptions > 0
    assert (kv.num_prefix_cache_hits_tokens > 0) == enable_prefix_caching
    if speculative:
        assert 0 < num_accepted < num_proposed  # both accepts and rejects happened


def test_proposals_are_budgeted_as_tokens_and_rolled_back():
    """Exact numbers: 3 proposals ride on a decode, 1 is accepted, the look-ahead block goes back to the pool."""
    sched = make_scheduler(block_size=4, max_num_batched_tokens=64)
    kv = sched.kv_manager
    a = make_request("a", [1, 2, 3], max_tokens=10)
    sched.add_request(a)
    step(sched)  # prefill: a = [1, 2, 3, 500], 3 computed, 1 block
    assert kv.get_block_ids("a") == [0]
    a.spec_token_ids = [7, 8, 9]
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"a": 4} and out.spec_token_ids == {"a": [7, 8, 9]}
    assert out.total_num_scheduled_tokens == 4
    assert out.block_ids == {"a": [0, 1]}  # slots for positions 3..6
    assert a.spec_token_ids == []  # consumed
    sched.update(out, {"a": [7, 42]})  # 7 accepted, 8 rejected (42 instead), 9 dropped
    assert a.all_token_ids == [1, 2, 3, 500, 7, 42] and a.num_computed_tokens == 5
    assert kv.get_block_ids("a") == [0, 1]  # 6 tokens still need 2 blocks
    kv.check_integrity()
    a.spec_token_ids = [1, 1, 1]
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"a": 4} and out.block_ids == {"a": [0, 1, 2]}
    sched.update(out, {"a": [3]})  # all rejected: back to 1 token past the computed ones
    assert a.num_computed_tokens == 6 and a.num_tokens == 7
    assert kv.get_block_ids("a") == [0, 1]  # block 2 held only rejected slots
    assert kv.block_pool.blocks[2].ref_cnt == 0 and not kv.block_pool.blocks[2].is_cached
    kv.check_integrity()
    with pytest.raises(ValueError, match="accepted prefix"):
        a.spec_token_ids = [5, 6]
        out = sched.schedule()
        sched.update(out, {"a": [6, 6]})


def test_proposals_yield_to_budget_and_cache_before_anyone_is_preempted():
    sched = make_scheduler(num_blocks=2, block_size=4, max_num_batched_tokens=6, max_model_len=8)
    a = make_request("a", [1, 2, 3], max_tokens=4)
    b = make_request("b", [4, 5, 6], max_tokens=4)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)  # each holds 1 block; none is free
    a.spec_token_ids = [9] * 8
    out = sched.schedule()
    # The look-ahead would need a third block: a decodes 1 token instead, and nobody is preempted.
    assert out.num_scheduled_tokens == {"a": 1, "b": 1} and out.spec_token_ids == {}
    assert sched.num_preemptions == 0
    sched.update(out, {"a": [1], "b": [1]})
    sched.finish_request("b", RequestStatus.FINISHED_ABORTED)
    a.spec_token_ids = [9] * 8
    out = sched.schedule()
    # a holds 5 tokens; max_model_len 8 leaves room for 3 proposals (positions 5..7, in the second block).
    assert out.num_scheduled_tokens == {"a": 4} and out.spec_token_ids == {"a": [9, 9, 9]}
    sched.kv_manager.check_integrity()


def test_budget_reserves_a_token_for_each_running_request_behind():
    sched = make_scheduler(block_size=4, max_num_batched_tokens=4)
    reqs = [make_request(r, [1, 2, 3], max_tokens=20) for r in "abc"]
    for r in reqs:
        sched.add_request(r)
    step(sched)  # budget 4: a gets 3 tokens, b gets 1 (chunk)
    step(sched)
    step(sched)
    assert all(r.num_computed_tokens == r.num_tokens - 1 for r in reqs)
    reqs[0].spec_token_ids = [9] * 8
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"a": 2, "b": 1, "c": 1} and out.spec_token_ids == {"a": [9]}
