"""Layer 4: the synchronous LLM engine. Its step loop is three literal lines:

    scheduler_output = scheduler.schedule()
    step_result = runner.execute(...)
    scheduler.update(scheduler_output, step_result.sampled_token_ids)

around which it tokenizes, checks stop conditions (EOS, stop ids, stop strings, max_tokens, max_model_len) per
new token (a speculative step returns several; a stop inside the run drops the tokens after it), proposes the
next step's speculative tokens (spec_decode/),
detokenizes incrementally and builds RequestOutputs. It is not thread-safe: async_engine.py owns one from a
single thread.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from dataclasses import dataclass, replace

from inferd.config import EngineArgs, EngineConfig
from inferd.device import resolve_device, resolve_dtype, torch_dtype
from inferd.engine.detokenizer import IncrementalDetokenizer
from inferd.engine.tokenizer import Tokenizer
from inferd.kv_cache.manager import KVCacheManager
from inferd.layers.attention import kv_cache_bytes_per_block
from inferd.models import is_gguf_file, load_model
from inferd.models.early_exit import EarlyExitModel, parse_self_draft
from inferd.quant import resolve_quantization
from inferd.request import (
    CompletionOutput,
    Request,
    RequestMetrics,
    RequestOutput,
    RequestStatus,
    SamplingParams,
)
from inferd.runner.model_runner import ModelRunner, StepResult
from inferd.scheduler.scheduler import Scheduler
from inferd.spec_decode import DraftModelProposer, SpeculativePolicy
from inferd.structured import GrammarCompiler

logger = logging.getLogger("inferd.engine")


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks in use, 0..1
    num_free_blocks: int
    num_total_blocks: int
    num_prefix_cache_queries_tokens: int  # cumulative
    num_prefix_cache_hits_tokens: int  # cumulative
    num_preemptions: int  # cumulative
    num_prompt_tokens: int  # cumulative, computed (not cached) and cached
    num_generation_tokens: int  # cumulative
    num_spec_draft_tokens: int = 0  # cumulative: proposed tokens that were verified
    num_spec_accepted_tokens: int = 0  # cumulative: of those, accepted
    # cumulative request-steps that verified >= 1 proposal; mean acceptance length (vLLM's) is
    # 1 + num_spec_accepted_tokens / num_spec_verify_steps
    num_spec_verify_steps: int = 0


class _Group:
    """A user request: n sequences (Request objects) that share a prompt."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], children: list[Request],
                 detokenizers: list[IncrementalDetokenizer], arrival_time: float) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.children = children
        self.detokenizers = detokenizers
        self.num_sent_token_ids = [0] * len(children)
        self.metrics = RequestMetrics(arrival_time=arrival_time)

    @property
    def is_finished(self) -> bool:
        return all(c.is_finished for c in self.children)


class LLMEngine:
    def __init__(self, config: EngineConfig, model, arch_config, tokenizer: Tokenizer, num_blocks: int,
                 draft_model=None, draft_arch_config=None) -> None:
        """`draft_model`: the speculative draft (a loaded model or an EarlyExitModel view of `model`), given with
        its arch config; its KV cache holds as many blocks as the target's."""
        self.config = config
        self.model = model
        self.arch_config = arch_config
        self.tokenizer = tokenizer
        self.num_blocks = num_blocks
        self.kv_manager = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.kv_manager,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            max_model_len=config.max_model_len,
            block_size=config.block_size,
        )
        self.runner = ModelRunner(config, model, arch_config, num_blocks)
        self.draft_proposer = None
        if draft_model is not None and config.speculative in ("auto", "draft"):
            self.draft_proposer = DraftModelProposer(config, draft_model, draft_arch_config, num_blocks,
                                                     target_vocab_size=arch_config.vocab_size)
        self.spec_policy = SpeculativePolicy(config.speculative, config.num_speculative_tokens,
                                             draft=self.draft_proposer)
        self.eos_token_ids = frozenset(tokenizer.eos_token_ids)
        # Constrained decoding: the model's tokenizer is wrapped for the grammar backend on first use.
        self.grammar_compiler = GrammarCompiler(
            lambda: tokenizer.backend.to_str(), vocab_size=arch_config.vocab_size, eos_token_ids=self.eos_token_ids
        )
        self._groups: dict[str, _Group] = {}
        self._group_of_child: dict[str, _Group] = {}
        self._num_prompt_tokens = 0
        self._num_generation_tokens = 0
        # (request_id, why) of user requests that failed on their own data since the last pop_failed_requests().
        self._failed_requests: list[tuple[str, str]] = []
        self.num_failed_requests = 0  # cumulative
        self.load_timings_s: dict[str, float] = {}  # set by from_engine_args

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        """`args.model` is a resolved local path (a .gguf file or a Hugging Face folder): the engine never looks
        names up in the model store; `inferd.LLM` and the CLI resolve catalog names first."""
        args.validate_static()
        if not args.model:
            raise ValueError("model: a local model path is required (a .gguf file or a Hugging Face folder)")
        model_path = Path(args.model)
        if not model_path.exists():
            raise ValueError(f"model: {args.model!r} is not an existing path (resolve catalog names with inferd.LLM)")
        # Seconds per load phase (benchmarks/reload.py prints them): kernels (resolving the quantization builds or
        # loads them; 0 once loaded in this process), weights (read + build the model), tokenizer, kv_cache (the
        # engine with its KV pool).
        load_timings_s: dict[str, float] = {}
        started = time.perf_counter()
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        quantization = resolve_quantization(
            args.quantization, is_gguf=is_gguf_file(str(model_path)), device=device, dtype=dtype)
        load_timings_s["kernels"] = time.perf_counter() - started
        started = time.perf_counter()
        model, arch_config = load_model(str(model_path), device=device, dtype=torch_dtype(dtype),
                                        quantization=quantization, prepared_dir=args.prepared_weights_dir,
                                        kernel_backend=args.kernel_backend)
        load_timings_s["weights"] = time.perf_counter() - started
        weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        if args.served_model_name is None:
            args.served_model_name = model_path.stem if model_path.is_file() else model_path.name
        print(f"inferd: {args.served_model_name} on {device}, {dtype} activations, quantization {quantization}: "
              f"{weight_bytes / 1e6:.0f} MB of weights", file=sys.stderr)
        started = time.perf_counter()
        tokenizer = Tokenizer.from_pretrained(str(model_path))
        load_timings_s["tokenizer"] = time.perf_counter() - started
        config = args.resolve(
            model_path=str(model_path), device=device, dtype=dtype, quantization=quantization,
            model_max_len=arch_config.max_position_embeddings,
        )
        bytes_per_block = kv_cache_bytes_per_block(arch_config, config.block_size, torch_dtype(dtype))
        if config.kv_cache_memory_bytes is not None:
            kv_bytes = config.kv_cache_memory_bytes
        else:  # CUDA: a fraction of what is free once the weights are loaded
            from inferd.device import free_device_memory_bytes

            kv_bytes = int(free_device_memory_bytes(device) * config.gpu_memory_utilization)
        num_blocks = kv_bytes // bytes_per_block
        min_blocks = (config.max_model_len + config.block_size - 1) // config.block_size
        if num_blocks < 2:
            raise ValueError(
                f"kv_cache_memory ({kv_bytes} bytes) holds {num_blocks} blocks of {bytes_per_block} bytes; need at least 2"
            )
        if num_blocks < min_blocks:
            print(
                f"inferd: the KV cache holds {num_blocks * config.block_size} tokens, fewer than max_model_len "
                f"({config.max_model_len}); longer requests are refused",
                file=sys.stderr,
            )
        draft_model = draft_arch_config = None
        if config.speculative_model is not None and config.speculative in ("auto", "draft"):
            started = time.perf_counter()
            draft_model, draft_arch_config = _load_draft_model(
                config.speculative_model, model, arch_config, tokenizer, device=device, dtype=dtype,
                quantization=args.quantization, prepared_dir=args.prepared_weights_dir,
                kernel_backend=config.kernel_backend)
            load_timings_s["draft"] = time.perf_counter() - started
            draft_bytes = kv_cache_bytes_per_block(draft_arch_config, config.block_size, torch_dtype(dtype)) * num_blocks
            print(f"inferd: speculative draft {config.speculative_model} ({draft_arch_config.num_layers} layers), "
                  f"{draft_bytes / 1e6:.0f} MB of draft KV cache", file=sys.stderr)
        started = time.perf_counter()
        engine = cls(config, model, arch_config, tokenizer, num_blocks, draft_model, draft_arch_config)
        load_timings_s["kv_cache"] = time.perf_counter() - started
        engine.load_timings_s = load_timings_s
        return engine

    # ------------------------------------------------------------------ requests
    @property
    def max_tokens_per_sequence(self) -> int:
        """The most tokens (prompt + output) one sequence may hold: model length and KV capacity."""
        return min(self.config.max_model_len, self.num_blocks * self.config.block_size)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        if request_id in self._groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = _copy_params(params)  # defaults resolved below must not leak into the caller's object
        if isinstance(prompt, str):
            prompt_text: str | None = prompt
            prompt_token_ids = self.tokenizer.encode(prompt, add_special_tokens=True) if prompt else []
        else:
            prompt_text = None
            prompt_token_ids = list(prompt)
            vocab_size = self.arch_config.vocab_size
            for tid in prompt_token_ids:
                if not isinstance(tid, int) or not (0 <= tid < vocab_size):
                    raise ValueError(f"prompt token ids must be integers in [0, {vocab_size}), got {tid!r}")
        if not prompt_token_ids:
            raise ValueError("prompt must not be empty")
        limit = self.max_tokens_per_sequence
        num_prompt = len(prompt_token_ids)
        if num_prompt >= limit:
            raise ValueError(
                f"prompt is {num_prompt} tokens; this model's maximum context length is {limit} tokens "
                f"(prompt plus at least 1 generated token)"
            )
        if params.max_tokens is None:
            params.max_tokens = limit - num_prompt
        elif num_prompt + params.max_tokens > limit:
            raise ValueError(
                f"max_tokens ({params.max_tokens}) plus the prompt ({num_prompt} tokens) is over this model's "
                f"maximum context length of {limit} tokens"
            )
        if params.min_tokens > params.max_tokens:
            raise ValueError(f"min_tokens ({params.min_tokens}) must be <= max_tokens ({params.max_tokens})")
        # A bad grammar raises InvalidParameterError (a ValueError) naming the field, before anything is queued.
        grammar = (
            self.grammar_compiler.compile(params.structured_outputs) if params.structured_outputs is not None else None
        )
        now = arrival_time if arrival_time is not None else time.monotonic()
        children: list[Request] = []
        detoks: list[IncrementalDetokenizer] = []
        for i in range(params.n):
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            child_params = params
            if params.seed is not None and params.n > 1:
                # Each of the n completions draws its own numbers, reproducibly.
                child_params = _copy_params(params, seed=params.seed + i)
            child = Request(child_id, prompt_token_ids, child_params, eos_token_ids=self.eos_token_ids,
                            arrival_time=now, group_id=request_id, index=i, prompt=prompt_text)
            if grammar is not None:
                child.grammar_matcher = grammar.new_matcher()
            children.append(child)
            detoks.append(IncrementalDetokenizer(self.tokenizer, prompt_token_ids, child_params))
        group = _Group(request_id, prompt_text, prompt_token_ids, children, detoks, now)
        self._groups[request_id] = group
        for child in children:
            self._group_of_child[child.request_id] = group
            self.scheduler.add_request(child)

    def abort_request(self, request_id: str) -> None:
        group = self._groups.pop(request_id, None)
        if group is None:
            return
        for child in group.children:
            if not child.is_finished:
                self.scheduler.abort_request(child.request_id)
                child.status = RequestStatus.FINISHED_ABORTED
            self._forget_child(child.request_id)

    def pop_failed_requests(self) -> list[tuple[str, str]]:
        """(request_id, message) of every user request that failed alone since the last call: sampling, its
        grammar or its detokenization raised. They produce no further output; the others go on."""
        failed, self._failed_requests = self._failed_requests, []
        return failed

    def _fail_request(self, child_id: str, message: str) -> None:
        """End the user request (all n of its sequences) that `child_id` belongs to, for `message`."""
        group = self._group_of_child.get(child_id)
        if group is None or group.request_id not in self._groups:
            return
        self.abort_request(group.request_id)
        self._failed_requests.append((group.request_id, message))
        self.num_failed_requests += 1

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups)

    def get_num_unfinished_requests(self) -> int:
        return len(self._groups)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        scheduler_output = self.scheduler.schedule()
        for request_id in scheduler_output.preempted_request_ids:
            self.spec_policy.on_preempted(request_id)
        if not scheduler_output.scheduled_requests:
            self.runner.update_states(scheduler_output)  # finished and preempted requests still leave the runner
            return []
        now = time.monotonic()
        for r in scheduler_output.scheduled_requests:
            if r.first_scheduled_time is None:
                r.first_scheduled_time = now
                group = self._group_of_child[r.request_id]
                if group.metrics.first_scheduled_time is None:
                    group.metrics.first_scheduled_time = now
                    self._num_prompt_tokens += r.num_prompt_tokens
        step_result = self.runner.execute(
            scheduler_output, self.spec_policy.take_proposal_probs(scheduler_output.spec_token_ids))
        for request_id, message in step_result.failed.items():
            self._fail_request(request_id, message)  # aborted before update(), which then skips them
        self.scheduler.update(scheduler_output, step_result.sampled_token_ids)

        now = time.monotonic()
        touched: dict[str, _Group] = {}
        still_running: list[Request] = []
        for request_id, token_ids in step_result.sampled_token_ids.items():
            if request_id in step_result.failed or request_id not in self._group_of_child:
                continue  # failed with its group (a sibling's failure ends the whole user request)
            req = self.scheduler.get_request(request_id)
            group = self._group_of_child[request_id]
            try:
                status = self._take_tokens(req, group, token_ids, step_result, scheduler_output.spec_token_ids, now)
            except Exception as exc:  # this request's own data (detokenizer, grammar): it alone fails
                logger.exception("request %s: processing its new tokens failed", request_id)
                self._fail_request(request_id, f"processing output failed: {type(exc).__name__}: {exc}")
                touched.pop(group.request_id, None)
                continue
            if status is not None:
                self.scheduler.finish_request(request_id, status)
                req.status = status
                self.runner.remove_request(request_id)
                self.spec_policy.remove_request(request_id)
            else:
                still_running.append(req)
            touched[group.request_id] = group
        if self.spec_policy.is_enabled:
            self._propose(still_running)

        outputs = []
        for group in touched.values():
            if group.request_id not in self._groups:
                continue  # a sibling failed after this group was touched
            out = self._make_output(group, now)
            outputs.append(out)
            if out.finished:
                self._groups.pop(group.request_id, None)
                for child in group.children:
                    self._forget_child(child.request_id)
        return outputs

    def _propose(self, requests: list[Request]) -> None:
        """Set each running request's proposals for the next step (spec_decode/ decides whether and how many)."""
        candidates = []
        for req in requests:
            if req.is_finished or req.request_id not in self._group_of_child:
                continue
            max_num_proposals = min(req.sampling_params.max_tokens - req.num_output_tokens,
                                    self.max_tokens_per_sequence - req.num_tokens) - 1
            candidates.append((req, max_num_proposals))
        num_running = self.scheduler.num_running
        if self.spec_policy.draft is None:  # prompt lookup: per request, so a failure costs that request alone
            for req, max_num_proposals in candidates:
                try:
                    req.spec_token_ids = self.spec_policy.propose(req, num_running, max_num_proposals)
                except Exception:  # a proposer failure costs only the speed-up
                    logger.exception("request %s: proposing speculative tokens failed; decoding without",
                                     req.request_id)
                    req.spec_token_ids = []
            return
        try:  # a draft model proposes for the whole batch in one run
            proposals = self.spec_policy.propose_batch(candidates, num_running)
        except Exception:  # a proposer failure costs only the speed-up
            logger.exception("the draft model failed to propose for %d request(s); decoding without", len(candidates))
            for req, _ in candidates:
                self.spec_policy.on_preempted(req.request_id)  # the draft's K/V may be half written: start over
            proposals = {}
        for req, _ in candidates:
            req.spec_token_ids = proposals.get(req.request_id, [])

    def _take_tokens(self, req: Request, group: _Group, token_ids: list[int], step_result: StepResult,
                     spec_token_ids: dict[str, list[int]], now: float) -> RequestStatus | None:
        """Record a step's new tokens for one sequence: stats, logprobs, detokenization, grammar, stop checks.
        Returns the status it finishes with, if it does (tokens after a stop are dropped)."""
        request_id = req.request_id
        num_proposed = len(spec_token_ids.get(request_id, ()))
        if num_proposed:
            self.spec_policy.record(request_id, num_proposed, len(token_ids) - 1)
        if req.first_token_time is None:
            req.first_token_time = now
            if group.metrics.first_token_time is None:
                group.metrics.first_token_time = now
        req.last_token_time = now
        detok = group.detokenizers[req.index]
        params = req.sampling_params
        num_output_before = req.num_output_tokens - len(token_ids)
        status = None
        for k, token_id in enumerate(token_ids):
            num_output_tokens = num_output_before + k + 1
            self._num_generation_tokens += 1
            req.cumulative_logprob += step_result.sampled_logprobs[request_id][k]
            if req.logprobs is not None:
                req.logprobs.append(step_result.logprobs[request_id][k])
            is_stop_token = num_output_tokens >= params.min_tokens and (
                (not params.ignore_eos and token_id in req.eos_token_ids) or token_id in params.stop_token_ids
            )
            stop_str = detok.update([token_id], stop_terminated=is_stop_token)
            status = self._check_stop(req, token_id, stop_str, num_output_tokens)
            if req.grammar_matcher is not None and status is None:
                status = self._advance_grammar(req, token_id)
            if status is not None:
                req.truncate_output(num_output_tokens)
                break
        return status

    def _check_stop(self, req: Request, token_id: int, stop_str: str | None,
                    num_output_tokens: int | None = None) -> RequestStatus | None:
        """Whether the request ends at `token_id`, its `num_output_tokens`-th output token (default: the last)."""
        params = req.sampling_params
        num_out = req.num_output_tokens if num_output_tokens is None else num_output_tokens
        if num_out >= params.min_tokens:
            if not params.ignore_eos and token_id in req.eos_token_ids:
                req.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                req.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
            if stop_str is not None:
                req.stop_reason = stop_str
                return RequestStatus.FINISHED_STOPPED
        if num_out >= params.max_tokens or req.num_prompt_tokens + num_out >= self.max_tokens_per_sequence:
            return RequestStatus.FINISHED_LENGTH
        return None

    @staticmethod
    def _advance_grammar(req: Request, token_id: int) -> RequestStatus | None:
        """Feed a kept output token to the request's grammar: FINISHED_STOPPED once the constraint is complete and
        admits nothing more (so a finished choice or JSON value ends without waiting for EOS)."""
        matcher = req.grammar_matcher
        if not matcher.accept_token(token_id):  # type: ignore[union-attr]
            # The bitmask admits only tokens the grammar accepts; getting here is a bug, so end the sequence
            # rather than let it run on unconstrained.
            logger.error("request %s: sampled token %d is outside its grammar (%s); stopping it",
                         req.request_id, token_id, matcher.error)  # type: ignore[union-attr]
            req.stop_reason = None
            return RequestStatus.FINISHED_STOPPED
        if matcher.is_stopped:  # type: ignore[union-attr]
            req.stop_reason = None
            return RequestStatus.FINISHED_STOPPED
        return None

    def _make_output(self, group: _Group, now: float) -> RequestOutput:
        completions: list[CompletionOutput] = []
        delta_texts: list[str] = []
        delta_token_ids: list[list[int]] = []
        for i, (child, detok) in enumerate(zip(group.children, group.detokenizers)):
            finished = child.is_finished
            delta_texts.append(detok.get_next_output_text(finished, delta=True))
            sent = group.num_sent_token_ids[i]
            delta_token_ids.append(child.output_token_ids[sent:])
            group.num_sent_token_ids[i] = child.num_output_tokens
            completions.append(CompletionOutput(
                index=i,
                text=detok.output_text,
                token_ids=list(child.output_token_ids),
                finish_reason=child.status.value if finished else None,
                stop_reason=child.stop_reason,
                logprobs=child.logprobs,
                cumulative_logprob=child.cumulative_logprob,
            ))
        finished = group.is_finished
        if finished:
            group.metrics.finished_time = now
        group.metrics.last_token_time = now
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,
            outputs=completions,
            finished=finished,
            num_cached_tokens=max(0, group.children[0].num_cached_tokens),
            metrics=group.metrics,
            delta_texts=delta_texts,
            delta_token_ids=delta_token_ids,
        )

    def _forget_child(self, child_id: str) -> None:
        self._group_of_child.pop(child_id, None)
        self.runner.remove_request(child_id)
        self.spec_policy.remove_request(child_id)

    # ------------------------------------------------------------------ stats
    def get_stats(self) -> EngineStats:
        kv = self.kv_manager
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=kv.usage,
            num_free_blocks=kv.num_free_blocks,
            num_total_blocks=self.num_blocks,
            num_prefix_cache_queries_tokens=kv.num_prefix_cache_queries_tokens,
            num_prefix_cache_hits_tokens=kv.num_prefix_cache_hits_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            num_prompt_tokens=self._num_prompt_tokens,
            num_generation_tokens=self._num_generation_tokens,
            num_spec_draft_tokens=self.spec_policy.num_draft_tokens,
            num_spec_accepted_tokens=self.spec_policy.num_accepted_tokens,
            num_spec_verify_steps=self.spec_policy.num_verify_steps,
        )


def _load_draft_model(speculative_model: str, target, target_arch_config, tokenizer: Tokenizer, *, device: str,
                      dtype: str, quantization: str, prepared_dir: str | None, kernel_backend: str = "cpu-fused"):
    """(draft model, its arch config) for `speculative_model`: "self:K" (a view of the target's first K layers) or
    a local path to a model with the target's vocabulary."""
    num_self_layers = parse_self_draft(speculative_model)
    if num_self_layers is not None:
        draft = EarlyExitModel(target, num_self_layers)
        return draft, draft.arch_config
    path = Path(speculative_model)
    if not path.exists():
        raise ValueError(f"speculative_model: {speculative_model!r} is not an existing path or self:K "
                         f"(resolve catalog names with inferd.LLM)")
    draft_quantization = resolve_quantization(quantization, is_gguf=is_gguf_file(str(path)), device=device,
                                              dtype=dtype)
    draft, draft_arch_config = load_model(str(path), device=device, dtype=torch_dtype(dtype),
                                          quantization=draft_quantization, prepared_dir=prepared_dir,
                                          kernel_backend=kernel_backend)
    draft_tokenizer = Tokenizer.from_pretrained(str(path))
    if draft_tokenizer.backend.get_vocab() != tokenizer.backend.get_vocab():
        raise ValueError(f"speculative_model: {speculative_model!r} has a different tokenizer vocabulary from the "
                         f"target's; a draft model must share the target's tokenizer")
    return draft, draft_arch_config


def _copy_params(params: SamplingParams, **changes) -> SamplingParams:
    return replace(params, **changes)  # re-runs SamplingParams validation
