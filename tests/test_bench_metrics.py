"""The bench tool's arithmetic, arrivals, workloads and stream parsing, on synthetic data (no server, no clock).

Every expected number below is worked out by hand in a comment; percentiles are numpy's default "linear"
method: for n sorted values, p-th percentile = v[floor(k)] + frac(k) * (v[floor(k)+1] - v[floor(k)]) with
k = (n - 1) * p / 100.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import subprocess
import sys

import httpx
import pytest

from inferd.bench import datasets
from inferd.bench.arrivals import arrival_gaps_s
from inferd.bench.client import OpenAIStreamClient, TokenizeEndpoint, build_payload, normalize_base_url
from inferd.bench.metrics import RequestResult, compute_metrics, parse_goodput_slos
from inferd.bench.serve import redacted_command, sweep_points


def ok(prompt: int, output: int, ttft_s: float, e2e_s: float, itl_s: list[float], requested: int,
       has_usage: bool = True) -> RequestResult:
    return RequestResult(is_success=True, prompt_tokens=prompt, output_tokens=output, has_usage=has_usage,
                         requested_output_tokens=requested, ttft_s=ttft_s, e2e_s=e2e_s, itl_s=itl_s)


def failed(error: str) -> RequestResult:
    return RequestResult(is_success=False, error=error)


# Four successes (A-D), three failures; the run took 2.0 s.
#   A: prompt 10, output 5,  TTFT 100 ms, E2E  500 ms, ITL 4 x 100 ms  -> TPOT (500-100)/(5-1)   = 100 ms
#   B: prompt 20, output 3,  TTFT 200 ms, E2E  600 ms, ITL 2 x 200 ms  -> TPOT (600-200)/(3-1)   = 200 ms
#   C: prompt 30, output 1,  TTFT 300 ms, E2E  300 ms, no ITL          -> no TPOT (one token); asked for 4
#   D: prompt 40, output 11, TTFT 400 ms, E2E 1400 ms, ITL 10 x 100 ms -> TPOT (1400-400)/(11-1) = 100 ms; no usage
SYNTHETIC_RESULTS = [
    ok(10, 5, 0.1, 0.5, [0.1] * 4, requested=5),
    ok(20, 3, 0.2, 0.6, [0.2] * 2, requested=3),
    ok(30, 1, 0.3, 0.3, [], requested=4),
    ok(40, 11, 0.4, 1.4, [0.1] * 10, requested=11, has_usage=False),
    failed("HTTP 500: boom"),
    failed("ReadTimeout: "),
    failed("HTTP 500: boom"),
]
DURATION_S = 2.0


def test_counts_throughputs_and_failures() -> None:
    m = compute_metrics(SYNTHETIC_RESULTS, DURATION_S)
    assert m["num_requests"] == 7
    assert m["completed"] == 4
    assert m["failed"] == 3
    # Grouped by message, most frequent first; nothing dropped.
    assert m["errors"] == {"HTTP 500: boom": 2, "ReadTimeout: ": 1}
    assert list(m["errors"]) == ["HTTP 500: boom", "ReadTimeout: "]
    assert m["num_without_usage"] == 1  # D
    assert m["num_output_len_mismatch"] == 1  # C: 1 token for max_tokens 4
    # Tokens of successes only: prompts 10+20+30+40 = 100, outputs 5+3+1+11 = 20.
    assert m["total_input_tokens"] == 100
    assert m["total_output_tokens"] == 20
    assert m["mean_input_tokens"] == pytest.approx(25.0)  # 100 / 4
    assert m["mean_output_tokens"] == pytest.approx(5.0)  # 20 / 4
    assert m["request_throughput"] == pytest.approx(2.0)  # 4 req / 2 s
    assert m["output_throughput"] == pytest.approx(10.0)  # 20 tok / 2 s
    assert m["total_token_throughput"] == pytest.approx(60.0)  # 120 tok / 2 s
    assert m["goodput"] is None  # no SLO given


def test_latency_percentiles() -> None:
    m = compute_metrics(SYNTHETIC_RESULTS, DURATION_S)
    # TTFT ms sorted [100, 200, 300, 400]: mean 250; k=1.5 -> 250; k=2.7 -> 300+0.7*100 = 370; k=2.97 -> 397.
    assert m["mean_ttft_ms"] == pytest.approx(250.0)
    assert m["median_ttft_ms"] == pytest.approx(250.0)
    assert m["p90_ttft_ms"] == pytest.approx(370.0)
    assert m["p99_ttft_ms"] == pytest.approx(397.0)
    # TPOT ms of A, B, D sorted [100, 100, 200] (C has none): mean 400/3; k=1 -> 100; k=1.8 -> 100+0.8*100 = 180;
    # k=1.98 -> 198.
    assert m["mean_tpot_ms"] == pytest.approx(400.0 / 3.0)
    assert m["median_tpot_ms"] == pytest.approx(100.0)
    assert m["p90_tpot_ms"] == pytest.approx(180.0)
    assert m["p99_tpot_ms"] == pytest.approx(198.0)
    # ITL pooled: 14 x 100 ms then 2 x 200 ms (n=16): mean (1400+400)/16 = 112.5; k=7.5 -> 100;
    # k=13.5 -> v[13]=100, v[14]=200 -> 150; k=14.85 -> v[14]=v[15]=200 -> 200.
    assert m["mean_itl_ms"] == pytest.approx(112.5)
    assert m["median_itl_ms"] == pytest.approx(100.0)
    assert m["p90_itl_ms"] == pytest.approx(150.0)
    assert m["p99_itl_ms"] == pytest.approx(200.0)
    # E2E ms sorted [300, 500, 600, 1400]: mean 2800/4 = 700; k=1.5 -> 550; k=2.7 -> 600+0.7*800 = 1160;
    # k=2.97 -> 600+0.97*800 = 1376.
    assert m["mean_e2el_ms"] == pytest.approx(700.0)
    assert m["median_e2el_ms"] == pytest.approx(550.0)
    assert m["p90_e2el_ms"] == pytest.approx(1160.0)
    assert m["p99_e2el_ms"] == pytest.approx(1376.0)


def test_goodput() -> None:
    # ttft<=250 and tpot<=150: A (100, 100) meets both; B tpot 200 misses; C ttft 300 and D ttft 400 miss.
    # 1 good request / 2 s = 0.5 req/s.
    m = compute_metrics(SYNTHETIC_RESULTS, DURATION_S, parse_goodput_slos(["ttft:250", "tpot:150"]))
    assert m["goodput"] == pytest.approx(0.5)
    assert m["goodput_slos_ms"] == {"ttft": 250.0, "tpot": 150.0}
    # e2e<=650: A 500, B 600, C 300 meet; D 1400 misses -> 3 / 2 s = 1.5 req/s. Failures never count.
    m = compute_metrics(SYNTHETIC_RESULTS, DURATION_S, parse_goodput_slos(["e2el:650"]))
    assert m["goodput"] == pytest.approx(1.5)
    # tpot<=50: A, B, D (100, 200, 100) miss; C has one token, no decode phase, so it meets -> 1 / 2 s = 0.5.
    m = compute_metrics(SYNTHETIC_RESULTS, DURATION_S, parse_goodput_slos(["tpot:50"]))
    assert m["goodput"] == pytest.approx(0.5)


def test_all_failed_has_no_latencies() -> None:
    m = compute_metrics([failed("ConnectError: refused")] * 3, 1.0)
    assert (m["completed"], m["failed"], m["errors"]) == (0, 3, {"ConnectError: refused": 3})
    assert m["request_throughput"] == 0.0
    assert m["median_ttft_ms"] is None and m["p99_itl_ms"] is None and m["mean_input_tokens"] is None


def test_goodput_slo_parsing() -> None:
    assert parse_goodput_slos(["ttft:500", "TPOT:50.5", "e2e:2000"]) == {"ttft": 500.0, "tpot": 50.5, "e2el": 2000.0}
    for bad in (["ttft"], ["itl:5"], ["ttft:fast"], ["tpot:0"]):
        with pytest.raises(ValueError):
            parse_goodput_slos(bad)


@pytest.mark.parametrize("burstiness", [0.5, 1.0, 4.0])
def test_gamma_arrivals_have_the_requested_rate_and_shape(burstiness: float) -> None:
    request_rate = 4.0
    num_requests = 20_000
    gaps_s = arrival_gaps_s(num_requests, request_rate, burstiness, seed=7)
    assert len(gaps_s) == num_requests
    # Gamma(k=burstiness, theta=1/(rate*k)): mean 1/rate = 0.25 s, std 1/(rate*sqrt(k)).
    # Standard error of the mean = std/sqrt(n); with n=20000 and k=0.5 it is 0.354/141 = 0.0025 s: allow 5 of them.
    expected_std_s = 1.0 / (request_rate * math.sqrt(burstiness))
    standard_error_s = expected_std_s / math.sqrt(num_requests)
    assert abs(statistics.fmean(gaps_s) - 0.25) < 5 * standard_error_s
    # The coefficient of variation is 1/sqrt(k): 1.41, 1.0, 0.5 (Poisson at k=1); within 5%.
    assert statistics.pstdev(gaps_s) / statistics.fmean(gaps_s) == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)
    assert arrival_gaps_s(50, request_rate, burstiness, seed=7) == gaps_s[:50]  # seeded
    assert arrival_gaps_s(50, request_rate, burstiness, seed=8) != gaps_s[:50]


def test_infinite_rate_sends_all_at_once_and_bad_rates_fail() -> None:
    assert arrival_gaps_s(5, math.inf) == [0.0] * 5
    for rate, burstiness in ((0.0, 1.0), (-1.0, 1.0), (1.0, 0.0)):
        with pytest.raises(ValueError):
            arrival_gaps_s(5, rate, burstiness)


def test_sweep_points() -> None:
    assert [(p.request_rate, p.max_concurrency) for p in sweep_points([math.inf], [1, 4, 16])] == [
        (math.inf, 1), (math.inf, 4), (math.inf, 16)]
    assert [(p.request_rate, p.max_concurrency) for p in sweep_points([1.0, 2.0], None)] == [(1.0, None), (2.0, None)]
    with pytest.raises(ValueError):
        sweep_points([1.0, 2.0], [1, 2])


def characters_over_four(text: str) -> int:
    """A stand-in tokenizer whose count is not one per word, so calibration has to work for it."""
    return max(1, len(text) // 4)


def test_random_prompts_are_seeded_and_calibrated() -> None:
    requests = datasets.random_requests(30, 64, 16, range_ratio=0.5, seed=3, count_tokens=characters_over_four)
    assert requests == datasets.random_requests(30, 64, 16, range_ratio=0.5, seed=3,
                                                count_tokens=characters_over_four)
    assert requests != datasets.random_requests(30, 64, 16, range_ratio=0.5, seed=4,
                                                count_tokens=characters_over_four)
    for request in requests:
        # Lengths uniform in [64*0.5, 64*1.5] = [32, 96] and [8, 24].
        assert 32 <= request.target_prompt_tokens <= 96
        assert 8 <= request.max_tokens <= 24
        # Words are ~6 characters with their space, so the counter moves in steps of 1-2: within 2 of the target.
        assert abs(characters_over_four(request.prompt) - request.target_prompt_tokens) <= 2
    assert len({request.prompt for request in requests}) == 30
    fixed = datasets.random_requests(5, 40, 7, range_ratio=0.0, seed=0)
    assert [(r.target_prompt_tokens, r.max_tokens) for r in fixed] == [(40, 7)] * 5


def test_prefix_repetition_shares_exact_prefixes() -> None:
    requests = datasets.prefix_repetition_requests(12, prefix_len=50, suffix_len=10, num_prefixes=3, output_len=8,
                                                   seed=1, count_tokens=characters_over_four)
    # 12 requests over 3 prefixes: 4 each. A prefix is the text before the suffix, so group by the first 150 chars
    # (prefixes are ~200 characters long).
    heads = [request.prompt[:150] for request in requests]
    assert sorted(heads.count(head) for head in set(heads)) == [4, 4, 4]
    assert len({request.prompt for request in requests}) == 12  # unique suffixes
    assert all(request.max_tokens == 8 for request in requests)


def test_file_dataset(tmp_path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        json.dumps({"prompt": "Once upon a time", "max_tokens": 5}) + "\n\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
    )
    requests = datasets.file_requests(path, 3, default_output_len=9)
    assert [(r.prompt, r.max_tokens) for r in requests] == [("Once upon a time", 5), (None, 9), ("Once upon a time", 5)]
    assert requests[0].as_chat_messages() == [{"role": "user", "content": "Once upon a time"}]
    with pytest.raises(ValueError):
        requests[1].as_prompt()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "messages": []}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        datasets.file_requests(bad, 1, 9)


def test_payload_and_urls() -> None:
    request = datasets.BenchRequest(prompt="hello", messages=None, max_tokens=7)
    payload = build_payload(request, "completions", "m", is_ignore_eos=True, extra_body={"temperature": 0.7})
    assert payload["prompt"] == "hello" and payload["max_tokens"] == 7 and payload["ignore_eos"] is True
    assert payload["stream"] is True and payload["stream_options"] == {"include_usage": True}
    assert payload["temperature"] == 0.7
    chat = build_payload(request, "chat", "m", is_ignore_eos=False, extra_body={})
    assert chat["messages"] == [{"role": "user", "content": "hello"}] and "ignore_eos" not in chat
    assert normalize_base_url("http://h:8000/v1/") == "http://h:8000"
    assert normalize_base_url("http://h:8000") == "http://h:8000"
    assert redacted_command(["inferd", "bench", "serve", "--api-key", "sk-1", "--api-key=sk-2"]) == (
        "inferd bench serve --api-key REDACTED --api-key=REDACTED")


def sse(*chunks: dict | str) -> bytes:
    return b"".join(
        b"data: " + (chunk if isinstance(chunk, str) else json.dumps(chunk)).encode() + b"\n\n" for chunk in chunks
    )


def send_through(handler, request: datasets.BenchRequest, endpoint: str = "chat") -> RequestResult:
    async def run() -> RequestResult:
        client = OpenAIStreamClient("http://bench.test", "m", endpoint, transport=httpx.MockTransport(handler))
        async with client:
            return await client.send(request)

    return asyncio.run(run())


def test_stream_parsing_counts_usage_and_text_chunks() -> None:
    def handler(http_request: httpx.Request) -> httpx.Response:
        assert http_request.url.path == "/v1/chat/completions"
        body = sse(
            {"choices": [{"index": 0, "delta": {"role": "assistant"}}]},  # no text: not the first token
            {"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
            {"choices": [{"index": 0, "delta": {"content": "lo"}}]},
            {"choices": [{"index": 0, "delta": {"content": "!"}, "finish_reason": "length"}]},
            {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}},
            "[DONE]",
        )
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    result = send_through(handler, datasets.BenchRequest("hi", None, max_tokens=3))
    assert result.is_success and result.error == ""
    assert (result.prompt_tokens, result.output_tokens, result.has_usage) == (12, 3, True)
    assert result.output_text == "Hello!"
    assert len(result.itl_s) == 2  # 3 text chunks -> 2 gaps
    assert 0 < result.ttft_s <= result.e2e_s


def test_stream_failures_are_reported_not_hidden() -> None:
    def http_error(_: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"message": "max_tokens too large", "type": "invalid"}})

    result = send_through(http_error, datasets.BenchRequest("hi", None, 3))
    assert not result.is_success and result.error == "HTTP 400: max_tokens too large"

    def stream_error(_: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=sse({"error": {"message": "engine died"}}))

    result = send_through(stream_error, datasets.BenchRequest("hi", None, 3))
    assert not result.is_success and result.error == "stream error: engine died"

    def no_text(_: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=sse({"choices": [{"index": 0, "text": ""}]}, "[DONE]"))

    result = send_through(no_text, datasets.BenchRequest("hi", None, 3), endpoint="completions")
    assert not result.is_success and result.error == "stream ended without output text"

    def refused(http_request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=http_request)

    result = send_through(refused, datasets.BenchRequest("hi", None, 3))
    assert not result.is_success and result.error == "ConnectError: connection refused"


def test_stream_without_usage_counts_text_chunks() -> None:
    def handler(_: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=sse({"choices": [{"index": 0, "text": " a"}]},
                                               {"choices": [{"index": 0, "text": " b"}]}, "[DONE]"))

    result = send_through(handler, datasets.BenchRequest("hi", None, 2), endpoint="completions")
    assert result.is_success and not result.has_usage and result.output_tokens == 2


def test_bench_tool_never_imports_torch_or_the_engine() -> None:
    # Layer 6: the load generator must measure any server the same way, so it stays off our engine.
    code = (
        "import sys, inferd.bench.serve, inferd.bench.client, inferd.bench.plot, inferd.bench.datasets\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'inferd.engine', "
        "'inferd.server', 'inferd.runner', 'inferd.models', 'matplotlib')))\n"
        "print(','.join(bad))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == ""


def tokenize_server(is_llama_cpp: bool):
    """/tokenize as inferd/vLLM answer it ({"model", "prompt"} -> count) or as llama.cpp does ({"content"} ->
    tokens; a body without "content" gets 200 and no tokens)."""

    def handler(http_request: httpx.Request) -> httpx.Response:
        if http_request.url.path != "/tokenize":
            return httpx.Response(404)
        body = json.loads(http_request.content)
        if is_llama_cpp:
            return httpx.Response(200, json={"tokens": list(range(len(body.get("content", "").split())))})
        if "prompt" not in body:
            return httpx.Response(422, json={"error": {"message": "prompt: field required"}})
        num_tokens = len(body["prompt"].split())
        return httpx.Response(200, json={"tokens": list(range(num_tokens)), "count": num_tokens})

    return httpx.MockTransport(handler)


@pytest.mark.parametrize("is_llama_cpp", [False, True])
def test_tokenize_endpoint_finds_the_body_shape_the_server_reads(is_llama_cpp: bool) -> None:
    endpoint = TokenizeEndpoint.open("http://bench.test/v1", "m", transport=tokenize_server(is_llama_cpp))
    assert endpoint is not None
    assert endpoint.body_shape == ("content" if is_llama_cpp else "prompt")
    assert endpoint("one two three") == 3
    endpoint.close()


def test_no_tokenize_endpoint_means_estimates() -> None:
    assert TokenizeEndpoint.open("http://bench.test", "m", transport=httpx.MockTransport(
        lambda _: httpx.Response(404, json={"detail": "Not Found"}))) is None
