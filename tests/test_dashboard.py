"""`/dashboard` as users meet it: a real `inferd serve` (the default LLM, the default embedding model and a small
sklearn ONNX tabular model, an API key) gets traffic from the official `openai` client and OIP v2 requests, then Debian's headless Chromium, driven by Playwright, loads the page.

Checked: the page loads with no console error; after traffic the charts hold data (read from the DOM); the data
endpoint's generated tokens/s, integrated over its samples, equal the tokens the client received (usage); the
statistics need the API key (the page asks for it) while the page itself does not; a screenshot is saved.
The percentile estimate of the sampler is checked against numpy on observations put into Prometheus buckets.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from inferd.server.dashboard_stats import histogram_quantile
from server_fixtures import DEFAULT_MODEL, InferdServer, start_inferd_server, stop_inferd_server

CHROMIUM_PATH = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
EMBED_MODEL = "all-minilm-l6-v2"
TABULAR_MODEL = "logreg"
NUM_FEATURES = 5
API_KEY = "dashboard-test-key"
NUM_COMPLETIONS, MAX_TOKENS = 6, 12
NUM_EMBEDDING_REQUESTS = 5


def test_histogram_quantile_by_hand() -> None:
    # Buckets <=0.1: 10, (0.1, 0.5]: 50, (0.5, 1]: 40. The median is the 50th observation: 40 of the 50 in the
    # second bucket, linear inside it: 0.1 + (0.5 - 0.1) * 40 / 50.
    bounds, counts = [0.1, 0.5, 1.0, float("inf")], [10.0, 60.0, 100.0, 100.0]
    assert histogram_quantile(0.5, bounds, counts) == pytest.approx(0.1 + 0.4 * 40 / 50)
    assert histogram_quantile(0.05, bounds, counts) == pytest.approx(0.1 * 5 / 10)
    assert histogram_quantile(0.9, bounds, [10.0, 60.0, 80.0, 100.0]) == 1.0  # in +inf: the largest finite bound
    assert histogram_quantile(0.9, bounds, [0.0, 0.0, 0.0, 0.0]) is None


def test_histogram_quantile_lands_in_the_bucket_of_the_true_percentile() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    rng = np.random.default_rng(0)
    values_s = rng.lognormal(mean=-1.5, sigma=1.0, size=2000)
    bounds = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
    histogram = Histogram("h_seconds", "test", buckets=bounds, registry=(registry := CollectorRegistry()))
    for value in values_s:
        histogram.observe(value)
    pairs = sorted((float(s.labels["le"]), s.value) for f in registry.collect() for s in f.samples
                   if s.name == "h_seconds_bucket")
    all_bounds = [b for b, _ in pairs]
    for q in (50, 90, 99):
        estimate = histogram_quantile(q / 100, all_bounds, [c for _, c in pairs])
        true_value = float(np.percentile(values_s, q))
        bucket = next(i for i, b in enumerate(all_bounds) if true_value <= b)
        low = all_bounds[bucket - 1] if bucket else 0.0
        assert low <= estimate <= all_bounds[bucket], (q, estimate, true_value)


def _tabular_repository(root: Path) -> Path:
    """Triton's layout with one sklearn LogisticRegression exported by skl2onnx (FP32 [n, 5] -> label, probabilities)."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, NUM_FEATURES)).astype(np.float32)
    labels = (features[:, 0] + features[:, 1] > 0).astype(np.int64)
    onnx_model = convert_sklearn(LogisticRegression().fit(features, labels),
                                 initial_types=[("input", FloatTensorType([None, NUM_FEATURES]))],
                                 options={"zipmap": False})
    (root / TABULAR_MODEL / "1").mkdir(parents=True)
    (root / TABULAR_MODEL / "1" / "model.onnx").write_bytes(onnx_model.SerializeToString())
    return root


@pytest.fixture(scope="module")
def server(inferd_home: Path, embedding_model_dir: Path, default_gguf_path: Path,
           tmp_path_factory: pytest.TempPathFactory):
    repository = _tabular_repository(tmp_path_factory.mktemp("tabular"))
    server = start_inferd_server(["--api-key", API_KEY, "--metrics-require-key", "--model-repository", str(repository)],
                                 model=[DEFAULT_MODEL, EMBED_MODEL])
    try:
        yield server
    finally:
        stop_inferd_server(server.process)


def _send_traffic(server: InferdServer) -> int:
    """Completions (concurrently) and embeddings; returns the completion tokens the client was given."""
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0)

    def complete(index: int) -> int:
        response = client.completions.create(model=DEFAULT_MODEL, prompt=f"Count to ten, take {index}:",
                                             max_tokens=MAX_TOKENS, temperature=0.0)
        return response.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        num_tokens = sum(pool.map(complete, range(NUM_COMPLETIONS)))
    for index in range(NUM_EMBEDDING_REQUESTS):
        client.embeddings.create(model=EMBED_MODEL, input=[f"text {index}", "another text"])
        rows = [[0.1 * index] * NUM_FEATURES, [-0.2] * NUM_FEATURES]
        response = httpx.post(f"{server.base_url}/v2/models/{TABULAR_MODEL}/infer",
                              headers={"Authorization": f"Bearer {API_KEY}"},
                              json={"inputs": [{"name": "input", "shape": [2, NUM_FEATURES], "datatype": "FP32",
                                                "data": [v for row in rows for v in row]}]})
        assert response.status_code == 200, response.text
    return num_tokens


def _data(server: InferdServer) -> dict:
    response = httpx.get(f"{server.base_url}/dashboard/data", headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 200, response.text
    return response.json()


def _wait_until_idle(server: InferdServer, after_unix_s: float, timeout_s: float = 60.0) -> dict:
    """Data once the sampler has seen the LLM with nothing running for two samples, the last taken after
    `after_unix_s` (the end of the traffic: idle samples from before it would pass too, with the traffic unseen)."""
    deadline = time.monotonic() + timeout_s
    while True:
        data = _data(server)
        running = data["models"][DEFAULT_MODEL]["series"]["num_running"][-2:]
        if len(running) == 2 and running == [0.0, 0.0] and data["t"][-1] > after_unix_s:
            return data
        assert time.monotonic() < deadline, running
        time.sleep(0.5)


def test_dashboard_in_headless_chromium(server: InferdServer, tmp_path: Path) -> None:
    if not os.path.exists(CHROMIUM_PATH):
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    # The statistics are guarded like /metrics (--metrics-require-key); the page holds no data and is open.
    assert httpx.get(f"{server.base_url}/dashboard/data").status_code == 401
    assert httpx.get(f"{server.base_url}/dashboard").status_code == 200

    # The sampler's first sample is the baseline the rates rise from: traffic that ends before it would be invisible.
    deadline = time.monotonic() + 30
    while not _data(server)["t"]:
        assert time.monotonic() < deadline, "the dashboard sampler took no sample in 30 s"
        time.sleep(0.2)
    num_completion_tokens = _send_traffic(server)
    data = _wait_until_idle(server, time.time())
    llm = data["models"][DEFAULT_MODEL]
    assert llm["kind"] == "generate" and data["models"][EMBED_MODEL]["kind"] == "embed"
    assert data["models"][TABULAR_MODEL]["kind"] == "tabular"
    # Each sample's tokens/s is the counter's rise over the seconds since the previous sample: summed back over the
    # samples it gives every token generated since the server started, i.e. what the client received.
    times, rates = data["t"], llm["series"]["generation_tokens_per_s"]
    integrated = sum(rate * (t - t_prev) for t_prev, t, rate in zip(times, times[1:], rates[1:]) if rate)
    assert integrated == pytest.approx(num_completion_tokens, rel=0.01)
    assert any(v is not None and v > 0 for v in llm["series"]["ttft_p90_ms"])
    for model in (EMBED_MODEL, TABULAR_MODEL):
        assert any(v is not None and v > 0 for v in data["models"][model]["series"]["requests_per_s"]), model

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM_PATH, args=CHROMIUM_ARGS)
        try:
            # Without a key the page asks for one.
            page = browser.new_page()
            page.goto(f"{server.base_url}/dashboard")
            page.wait_for_selector("#key-form:not([hidden])", timeout=15_000)
            page.close()

            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            errors: list[str] = []
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.add_init_script(f"sessionStorage.setItem('inferd-dashboard-api-key', '{API_KEY}')")
            page.goto(f"{server.base_url}/dashboard")
            for model, title in ((DEFAULT_MODEL, "time to first token (ms)"), (DEFAULT_MODEL, "tokens/s"),
                                 (DEFAULT_MODEL, "requests"), (EMBED_MODEL, "embeddings requests/s"),
                                 (TABULAR_MODEL, "tabular requests/s")):
                selector = f'.chart[data-model="{model}"][data-title="{title}"]'
                page.wait_for_function(f"document.querySelector('{selector}')?.dataset.numValues > 0",
                                       timeout=30_000)
            num_charts = page.eval_on_selector_all(".chart canvas", "canvases => canvases.length")
            assert num_charts == 8  # six for the LLM, one each for the embedding and the tabular model
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            assert errors == []
        finally:
            browser.close()
    assert (tmp_path / "dashboard.png").read_bytes().startswith(b"\x89PNG")
