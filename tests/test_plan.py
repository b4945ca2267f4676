"""`inferd plan` on hand-made `inferd bench serve` result files whose numbers make every expected rate, cost and
recommendation a line of arithmetic (written below as that arithmetic), its input errors, and one real measurement
against `inferd serve` with the default test model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from inferd.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SLO = "p90_ttft<=1s,p90_tpot<=100ms"
THRESHOLDS_MS = {"ttft": 1000.0, "tpot": 100.0}  # what bench records when run with --goodput ttft:1000 tpot:100
NUM_COMPLETED = 10
MEAN_INPUT_TOKENS, MEAN_OUTPUT_TOKENS = 200, 100
TOKENS_PER_REQUEST = MEAN_INPUT_TOKENS + MEAN_OUTPUT_TOKENS
DEMAND, PEAK, BUSY_HOURS = 10.0, 2.0, 8.0
HOURS_PER_MONTH = 730.0


def bench_point(concurrency: int, throughput: float, goodput: float | None, p90_ttft_ms: float, p90_tpot_ms: float,
                slos_ms: dict[str, float] = THRESHOLDS_MS) -> dict:
    """One point in `inferd bench serve`'s result format (inferd/bench/serve.py + metrics.compute_metrics)."""
    point = {
        "request_rate": "inf", "max_concurrency": concurrency, "burstiness": 1.0,
        "load_avg_1m_before": None, "load_avg_1m_after": None,
        "duration_s": NUM_COMPLETED / throughput, "num_requests": NUM_COMPLETED, "completed": NUM_COMPLETED,
        "failed": 0, "errors": {}, "num_without_usage": 0, "num_output_len_mismatch": 0,
        "total_input_tokens": NUM_COMPLETED * MEAN_INPUT_TOKENS, "total_output_tokens": NUM_COMPLETED * MEAN_OUTPUT_TOKENS,
        "mean_input_tokens": MEAN_INPUT_TOKENS, "mean_output_tokens": MEAN_OUTPUT_TOKENS,
        "request_throughput": throughput, "output_throughput": throughput * MEAN_OUTPUT_TOKENS,
        "total_token_throughput": throughput * TOKENS_PER_REQUEST,
        "goodput_slos_ms": slos_ms, "goodput": goodput,
    }
    for name, p90_ms in (("ttft", p90_ttft_ms), ("tpot", p90_tpot_ms), ("itl", p90_tpot_ms), ("e2el", 5000.0)):
        point.update({f"mean_{name}_ms": p90_ms / 2, f"median_{name}_ms": p90_ms / 2, f"std_{name}_ms": 1.0,
                      f"p90_{name}_ms": p90_ms, f"p99_{name}_ms": p90_ms * 1.5})
    return point


def bench_result(label: str, points: list[dict]) -> dict:
    return {"config": {"date": "2026-12-01T00:00:00+00:00", "base_url": "http://h:8000", "model": "m",
                       "endpoint": "completions", "label": label, "dataset": "random",
                       "is_prompt_len_calibrated": True, "machine": {}, "command": "inferd bench serve", "args": {}},
            "points": points}


@pytest.fixture
def two_deployments(tmp_path: Path) -> list[str]:
    cpu = bench_result("cpu", [
        bench_point(1, throughput=2.0, goodput=2.0, p90_ttft_ms=200, p90_tpot_ms=50),
        bench_point(4, throughput=6.0, goodput=5.0, p90_ttft_ms=800, p90_tpot_ms=90),  # best within the SLO
        bench_point(8, throughput=8.0, goodput=4.0, p90_ttft_ms=3000, p90_tpot_ms=150),  # misses: more throughput
    ])
    gpu = bench_result("gpu", [
        bench_point(8, throughput=40.0, goodput=40.0, p90_ttft_ms=300, p90_tpot_ms=20),
        bench_point(32, throughput=100.0, goodput=96.0, p90_ttft_ms=900, p90_tpot_ms=60),  # best within the SLO
        bench_point(64, throughput=150.0, goodput=60.0, p90_ttft_ms=2500, p90_tpot_ms=70),  # misses TTFT
    ])
    paths = []
    for result in (cpu, gpu):
        path = tmp_path / f"{result['config']['label']}.json"
        path.write_text(json.dumps(result))
        paths.append(str(path))
    return paths


def run_plan(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(["plan", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_plan_from_two_recorded_files(two_deployments: list[str], tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    out_json, out_png = tmp_path / "plan.json", tmp_path / "plan.png"
    code, out, err = run_plan(
        capsys, "--from-results", *two_deployments, "--slo", SLO, "--demand", str(DEMAND), "--peak-factor", str(PEAK),
        "--busy-hours-per-day", str(BUSY_HOURS), "--price-per-hour", "cpu=0.50", "--price-per-hour", "gpu=4.00",
        "--api", "cheap-api=0.15/0.60", "--result-json", str(out_json), "--plot", str(out_png),
    )
    assert code == 0, err
    plan = json.loads(out_json.read_text())
    cpu, gpu = plan["deployments"]
    assert (plan["mean_input_tokens"], plan["mean_output_tokens"]) == (MEAN_INPUT_TOKENS, MEAN_OUTPUT_TOKENS)

    # cpu: c=1 and c=4 meet p90 TTFT <= 1000 ms and p90 TPOT <= 100 ms; c=8 (8 req/s of throughput) does not.
    # The rate is c=4's goodput, 5 req/s, not its 6 req/s of throughput.
    assert cpu["best_point"] == "concurrency 4" and cpu["rate_per_s"] == 5.0 and cpu["is_goodput"] is True
    assert cpu["cost_per_1m_tokens_usd"] == pytest.approx(0.50 / (5.0 * 300 * 3600) * 1e6)  # = $0.0926
    assert cpu["num_replicas"] == math.ceil(10.0 * 2.0 / 5.0) == 4
    assert cpu["monthly_usd_always_on"] == pytest.approx(4 * 0.50 * 730)  # = $1,460
    assert cpu["monthly_usd_scale_to_zero"] == pytest.approx(4 * 0.50 * 8 * 730 / 24)  # = $486.67
    assert [p["misses"] for p in cpu["points"]][2] == ["p90_ttft 3000ms > 1000ms", "p90_tpot 150ms > 100ms"]

    # gpu: c=32 (goodput 96 req/s) is the best point within the SLO; c=64's 150 req/s misses TTFT.
    assert gpu["best_point"] == "concurrency 32" and gpu["rate_per_s"] == 96.0
    assert gpu["cost_per_1m_tokens_usd"] == pytest.approx(4.00 / (96.0 * 300 * 3600) * 1e6)  # = $0.0386
    assert gpu["num_replicas"] == math.ceil(10.0 * 2.0 / 96.0) == 1
    assert gpu["monthly_usd_always_on"] == pytest.approx(1 * 4.00 * 730)  # = $2,920
    assert gpu["monthly_usd_scale_to_zero"] == pytest.approx(1 * 4.00 * 8 * 730 / 24)  # = $973.33

    # The gpu is cheaper per token, but the demand needs a quarter of its capacity: the cpu is cheaper a month.
    assert plan["recommended"] == "cpu"
    assert "recommended: cpu (concurrency 4)" in out and "$1,460.00/month always on" in out

    # API: per request 200 * 0.15 / 1e6 + 100 * 0.60 / 1e6 = $0.00009; 10 req/s for 8 h a day, 730/24 days.
    (api,) = plan["apis"]
    assert api["cost_per_1m_tokens_usd"] == pytest.approx(0.00009 / 300 * 1e6)  # = $0.30
    assert api["monthly_usd"] == pytest.approx(0.00009 * 10.0 * 3600 * 8 * 730 / 24)  # = $788.40
    assert "cheapest hosted API given: cheap-api at $788.40/month (cheaper than the recommendation)" in out
    assert out_png.read_bytes().startswith(PNG_MAGIC)


def test_plan_nothing_meets_the_slo(two_deployments: list[str], capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_plan(capsys, "--from-results", *two_deployments, "--slo", "p90_ttft<=100ms",
                              "--demand", "1", "--price-per-hour", "0.5")
    assert code == 0, err
    assert "nothing meets the SLO p90_ttft<=100ms" in out
    assert "cpu: closest point concurrency 1 misses p90_ttft 200ms > 100ms" in out
    assert "recommended" not in out


def test_plan_without_goodput_for_the_slo_falls_back_to_throughput(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    # Recorded with other goodput thresholds (ttft:500): its goodput does not count this SLO's requests.
    path = tmp_path / "old.json"
    path.write_text(json.dumps(bench_result("old", [
        bench_point(2, throughput=3.0, goodput=1.0, p90_ttft_ms=400, p90_tpot_ms=40, slos_ms={"ttft": 500.0})])))
    out_json = tmp_path / "plan.json"
    code, out, err = run_plan(capsys, "--from-results", str(path), "--slo", SLO, "--demand", "7",
                              "--price-per-hour", "old=1", "--result-json", str(out_json))
    assert code == 0, err
    (old,) = json.loads(out_json.read_text())["deployments"]
    assert (old["rate_per_s"], old["is_goodput"], old["num_replicas"]) == (3.0, False, math.ceil(7 / 3.0))
    assert "* throughput, not goodput" in out


def test_plan_ships_dated_api_prices(two_deployments: list[str], tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    prices = json.loads((Path(__file__).parents[1] / "inferd/bench/data/api_prices.json").read_text())["prices"]
    assert prices and all(p["as_of"] and p["source"].startswith("https://") for p in prices)
    out_json = tmp_path / "plan.json"
    code, _, err = run_plan(capsys, "--from-results", *two_deployments, "--slo", SLO, "--demand", "1",
                            "--api", "all", "--result-json", str(out_json))
    assert code == 0, err
    apis = json.loads(out_json.read_text())["apis"]
    assert [a["name"] for a in apis] == [p["name"] for p in prices]
    first = prices[0]
    assert apis[0]["cost_per_1m_tokens_usd"] == pytest.approx(
        (200 * first["usd_per_1m_input_tokens"] + 100 * first["usd_per_1m_output_tokens"]) / 300)


@pytest.mark.parametrize(("args", "flag"), [
    (["--slo", "p90_ttft<1s"], "--slo"),
    (["--slo", "p95_ttft<=1s"], "--slo"),
    (["--slo", "p90_ttft<=1"], "--slo"),
    (["--price-per-hour", "cpu=abc"], "--price-per-hour"),
    (["--price-per-hour", "cpu=-1"], "--price-per-hour"),
    (["--price-per-hour", "tpu=1.0"], "--price-per-hour"),
    (["--api", "x=0.1"], "--api"),
    (["--api", "no-such-api"], "--api"),
    (["--peak-factor", "0.5"], "--peak-factor"),
    (["--busy-hours-per-day", "25"], "--busy-hours-per-day"),
])
def test_plan_bad_input_names_the_flag(two_deployments: list[str], capsys: pytest.CaptureFixture,
                                       args: list[str], flag: str) -> None:
    defaults = {"--slo": SLO, "--demand": "1"}
    for name, value in zip(args[::2], args[1::2]):
        defaults[name] = value
    code, _, err = run_plan(capsys, "--from-results", *two_deployments,
                            *[item for pair in defaults.items() for item in pair])
    assert code == 2
    assert err.startswith(f"error: {flag}:"), err


def test_plan_measures_this_machine(inferd_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Starts `inferd serve` with the default model, sweeps two concurrency levels with bench's load generator, and
    plans on what it measured: the result file is bench's, and its goodput was counted with the SLO's thresholds."""
    out_json = tmp_path / "plan.json"
    code, out, err = run_plan(
        capsys, "--model", "smollm2-135m-instruct", "--quantization", "auto", "--concurrency", "1,2",
        "--num-prompts", "4", "--input-len", "16", "--output-len", "4",
        "--serve-args", "--max-model-len 2048 --kv-cache-memory 256MiB", "--out-dir", str(tmp_path / "runs"),
        "--slo", "p90_ttft<=60s,p90_tpot<=60s", "--demand", "1", "--price-per-hour", "0.10",
        "--result-json", str(out_json),
    )
    assert code == 0, err
    recorded = json.loads((tmp_path / "runs" / "plan-auto.json").read_text())
    assert [p["max_concurrency"] for p in recorded["points"]] == [1, 2]
    assert all(p["completed"] == 4 and p["goodput_slos_ms"] == {"ttft": 60000.0, "tpot": 60000.0}
               for p in recorded["points"])
    (auto,) = json.loads(out_json.read_text())["deployments"]
    best = max(recorded["points"], key=lambda p: p["goodput"])
    assert auto["is_goodput"] and auto["rate_per_s"] == best["goodput"] > 0
    assert auto["cost_per_1m_tokens_usd"] == pytest.approx(
        0.10 / (best["goodput"] * (best["mean_input_tokens"] + best["mean_output_tokens"]) * 3600) * 1e6)
    assert "recommended: auto" in out
