"""`inferd bench serve` against a real `inferd serve` subprocess: result JSON with every field, and the PNGs.

Uses the session fixture `inferd_server` (tests/server_fixtures.py, imported by tests/conftest.py).
No timing is asserted: only bookkeeping (counts, tokens from usage) and invariants (p50 <= p90 <= p99).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from inferd.bench.metrics import LATENCY_NAMES
from server_fixtures import InferdServer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
POINT_KEYS = {
    "request_rate", "max_concurrency", "burstiness", "load_avg_1m_before", "load_avg_1m_after",
    "duration_s", "num_requests", "completed", "failed", "errors", "num_without_usage", "num_output_len_mismatch",
    "total_input_tokens", "total_output_tokens", "mean_input_tokens", "mean_output_tokens",
    "request_throughput", "output_throughput", "total_token_throughput", "goodput_slos_ms", "goodput",
} | {f"{stat}_{name}_ms" for stat in ("mean", "median", "std", "p90", "p99") for name in LATENCY_NAMES}
CONFIG_KEYS = {"date", "base_url", "model", "endpoint", "label", "dataset", "is_prompt_len_calibrated", "machine",
               "command", "args"}
NUM_PROMPTS = 10
INPUT_LEN = 32
OUTPUT_LEN = 8


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "inferd.bench", *args], capture_output=True, text=True, timeout=600
    )


def test_bench_serve_against_inferd(inferd_server: InferdServer, tmp_path: Path) -> None:
    base_url, model = inferd_server.base_url, inferd_server.model_name
    result_path, plot_path = tmp_path / "result.json", tmp_path / "result.png"
    run = bench(
        "serve", "--base-url", base_url, "--model", model, "--label", "inferd",
        "--num-prompts", str(NUM_PROMPTS), "--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN),
        "--max-concurrency", "1,4", "--goodput", "ttft:60000", "tpot:60000", "--seed", "0",
        "--result-json", str(result_path), "--plot", str(plot_path), "--disable-tqdm",
    )
    assert run.returncode == 0, run.stderr
    assert "Output token throughput" in run.stdout

    result = json.loads(result_path.read_text())
    assert set(result["config"]) == CONFIG_KEYS
    assert result["config"]["model"] == model and result["config"]["is_prompt_len_calibrated"] is True
    assert [point["max_concurrency"] for point in result["points"]] == [1, 4]
    for point in result["points"]:
        assert set(point) == POINT_KEYS
        assert (point["num_requests"], point["completed"], point["failed"], point["errors"]) == (
            NUM_PROMPTS, NUM_PROMPTS, 0, {})
        # ignore_eos: every request generates exactly max_tokens, counted by the server's usage.
        assert point["num_without_usage"] == 0
        assert point["num_output_len_mismatch"] == 0
        assert point["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
        # Prompts were calibrated with the server's /tokenize: the completions endpoint sees them as counted
        # (the closest count not over the target; a word is at most a few tokens).
        assert INPUT_LEN - 3 <= point["mean_input_tokens"] <= INPUT_LEN
        for name in LATENCY_NAMES:
            assert 0 < point[f"median_{name}_ms"] <= point[f"p90_{name}_ms"] <= point[f"p99_{name}_ms"]
        assert 0 <= point["goodput"] <= point["request_throughput"]
    assert plot_path.read_bytes().startswith(PNG_MAGIC)


def test_bench_chat_endpoint_and_plot_overlay(inferd_server: InferdServer, tmp_path: Path) -> None:
    base_url, model = inferd_server.base_url, inferd_server.model_name
    paths = []
    for label in ("first", "second"):
        path = tmp_path / f"{label}.json"
        run = bench(
            "serve", "--base-url", base_url, "--model", model, "--endpoint", "chat", "--label", label,
            "--num-prompts", "4", "--input-len", "16", "--output-len", "4", "--request-rate", "50",
            "--result-json", str(path), "--disable-tqdm",
        )
        assert run.returncode == 0, run.stderr
        point = json.loads(path.read_text())["points"][0]
        assert (point["completed"], point["failed"], point["total_output_tokens"]) == (4, 0, 16)
        paths.append(str(path))
    overlay = tmp_path / "overlay.png"
    run = bench("plot", *paths, "--out", str(overlay))
    assert run.returncode == 0, run.stderr
    assert overlay.read_bytes().startswith(PNG_MAGIC)
