"""Layer 0 vocabulary: sampling parameters, the engine's per-request state, and outputs.

Nothing here imports torch: the scheduler and KV-cache bookkeeping work on these objects alone.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field

from inferd.errors import InvalidParameterError

# Largest values accepted from callers; a request over these gets a ValueError naming the field.
MAX_LOGPROBS = 20
MAX_N = 128
# A temperature below this samples greedily (as vLLM's _SAMPLING_EPS): dividing float32 logits by less overflows
# them to inf, and the softmax of a row holding inf is NaN.
GREEDY_TEMPERATURE_BELOW = 1e-5
# The smallest repetition penalty: dividing a positive logit by less overflows float32 the same way.
MIN_REPETITION_PENALTY = 0.01


@dataclass(frozen=True)
class StructuredOutputsParams:
    """A constraint on what a request may generate (vLLM's `structured_outputs`); exactly one form is set.

    json: a JSON Schema as JSON text (key order kept: it is the order properties are generated in).
    json_object: any JSON object. regex: the whole output matches it. choice: the output is one of these strings.
    grammar: a Lark grammar (llguidance's dialect, with `%json {...}` for schema-constrained JSON inside) or a
    GBNF grammar (llama.cpp's, recognised by `::=`).
    `source` names the request field it came from, for errors (e.g. "response_format.json_schema"); it is not
    part of the constraint.
    """

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    source: str = field(default="structured_outputs", compare=False)

    def __post_init__(self) -> None:
        forms = [self.json is not None, self.json_object, self.regex is not None, self.choice is not None,
                 self.grammar is not None]
        if sum(forms) != 1:
            raise InvalidParameterError(
                self.source, f"{self.source} must set exactly one of json, json_object, regex, choice, grammar")
        if self.choice is not None:
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise InvalidParameterError(self.source, f"{self.source}.choice must be a non-empty list of non-empty strings")
        for name in ("json", "regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise InvalidParameterError(self.source, f"{self.source}.{name} must be a non-empty string")

    @property
    def cache_key(self) -> tuple:
        return (self.json, self.json_object, self.regex, self.choice, self.grammar)


@dataclass
class SamplingParams:
    """How one request samples and when it stops.

    temperature 0 (or anything below GREEDY_TEMPERATURE_BELOW) means greedy. top_k 0 (or -1) and top_p 1 and min_p 0
    disable those filters. Every float must be finite.
    `logprobs` is the number of top alternatives to return per output token (0 returns only the
    sampled token's own logprob); None returns none. Logprobs are of the raw model distribution
    (log-softmax of the logits before penalties, bias and temperature), as vLLM reports by default.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    speculative: bool = True  # False: this request never verifies proposed tokens (the engine's policy aside)
    # Constrained decoding: every sampled token keeps the output a prefix of the constraint's language, and the
    # request stops once the constraint is complete and cannot be extended.
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise InvalidParameterError(name, f"{name} {why}")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", f"must be an integer >= 1, got {self.n!r}")
        if self.n > MAX_N:
            bad("n", f"must be <= {MAX_N}, got {self.n}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                bad(name, f"must be a finite number, got {value!r}")
        if self.temperature < 0:
            bad("temperature", f"must be >= 0, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", f"must be 0 or -1 (disabled) or a positive integer, got {self.top_k!r}")
        if not (0.0 <= self.min_p <= 1.0):
            bad("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if not (MIN_REPETITION_PENALTY <= self.repetition_penalty <= 10.0):
            bad("repetition_penalty", f"must be in [{MIN_REPETITION_PENALTY}, 10], got {self.repetition_penalty!r}")
        if not (-2.0 <= self.presence_penalty <= 2.0):
            bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty!r}")
        if not (-2.0 <= self.frequency_penalty <= 2.0):
            bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", f"must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if self.logprobs is not None and not (0 <= self.logprobs <= MAX_LOGPROBS):
            bad("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", f"must be an integer, got {self.seed!r}")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            bad("structured_outputs", f"must be a StructuredOutputsParams, got {type(self.structured_outputs).__name__}")
        if not isinstance(self.speculative, bool):
            bad("speculative", f"must be true or false, got {self.speculative!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                bad("stop", "entries must be non-empty strings")
        if self.logit_bias:
            for token_id, bias in self.logit_bias.items():
                if not isinstance(token_id, int) or isinstance(token_id, bool):
                    bad("logit_bias", f"keys must be token ids (integers), got {token_id!r}")
                if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not (-100.0 <= float(bias) <= 100.0):
                    bad("logit_bias", f"values must be in [-100, 100], got {bias!r} for token {token_id}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_BELOW or self.top_k == 1


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


class Request:
    """One sequence inside the engine. A user request with n > 1 becomes n of these sharing `group_id`.

    Token bookkeeping (the scheduler's whole view of a request):
      all_token_ids = prompt_token_ids + output_token_ids
      num_computed_tokens: how many of all_token_ids already have K/V in the cache.
      A step that schedules k tokens computes all_token_ids[num_computed_tokens : num_computed_tokens + k];
      when that reaches the end of all_token_ids the runner samples one new token.
    Speculative decoding: spec_token_ids are proposed next tokens, not yet part of all_token_ids. A decode step
    computes the last token plus these k proposals (k + 1 tokens) and gets 1..k + 1 tokens back: the accepted
    proposals and one more. Rejected proposals were never in all_token_ids; only num_computed_tokens rolls back.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        *,
        eos_token_ids: frozenset[int] | set[int] = frozenset(),
        arrival_time: float | None = None,
        group_id: str | None = None,
        index: int = 0,
        prompt: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.group_id = group_id if group_id is not None else request_id
        self.index = index  # which of the n completions this is
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = frozenset(eos_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.spec_token_ids: list[int] = []  # proposed next tokens for the coming step (see above)
        # The grammar matcher of a constrained request (structured/), advanced by every accepted output token;
        # None for an unconstrained one. Opaque here: layer 0 never calls it.
        self.grammar_matcher: object | None = None
        self.num_cached_tokens = -1  # prompt tokens served from the prefix cache; -1 until first scheduled
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        # Per output token: {token_id: logprob} holding the sampled token and the top-N alternatives.
        self.logprobs: list[dict[int, float]] | None = [] if sampling_params.logprobs is not None else None
        self.cumulative_logprob = 0.0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def truncate_output(self, num_output_tokens: int) -> None:
        """Drop output tokens past the first `num_output_tokens` (a stop inside an accepted speculative run)."""
        num_dropped = self.num_output_tokens - num_output_tokens
        if num_dropped <= 0:
            return
        del self.output_token_ids[num_output_tokens:]
        del self.all_token_ids[self.num_tokens - num_dropped:]
        self.num_computed_tokens = min(self.num_computed_tokens, self.num_tokens)
        if self.logprobs is not None:
            del self.logprobs[num_output_tokens:]

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.value}, prompt={self.num_prompt_tokens}, "
            f"out={self.num_output_tokens}, computed={self.num_computed_tokens})"
        )


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    # Text and ids produced since the previous output for this request (for streaming), per completion.
    delta_texts: list[str] = field(default_factory=list)
    delta_token_ids: list[list[int]] = field(default_factory=list)
