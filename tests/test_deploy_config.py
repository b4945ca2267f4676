"""The Ray-free half of inferd/deploy: deploy configs (errors name the key), the federated /metrics text (read
back by prometheus_client's own parser), and `--ray` / `deploy ray` without Ray installed (one line naming the
extra)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from inferd.deploy.config import DeploymentOptions, deployment_options_from, merge_exposition, read_deploy_config

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_deployment_options_become_ray_autoscaling_config() -> None:
    options = deployment_options_from(
        {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 4, "upscale_delay_s": 1,
         "downscale_delay_s": 30}, "d")
    assert options.autoscaling_config() == {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 4,
                                            "upscale_delay_s": 1, "downscale_delay_s": 30,
                                            "look_back_period_s": DeploymentOptions().look_back_period_s,
                                            "metrics_interval_s": DeploymentOptions().metrics_interval_s}
    assert options.num_cpus == DeploymentOptions().num_cpus


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"min_replica": 0}, "d: unknown key(s) ['min_replica']"),
        ({"min_replicas": -1}, "d.min_replicas: must be >= 0"),
        ({"min_replicas": 2, "max_replicas": 1}, "d.max_replicas: must be >= max(1, min_replicas)"),
        ({"max_replicas": "two"}, "d.max_replicas: expected an integer"),
        ({"target_ongoing_requests": 0}, "d.target_ongoing_requests: must be > 0"),
        ({"prefix_affinity": "yes"}, "d.prefix_affinity: expected true or false"),
        ({"metrics_interval_s": 0}, "d.metrics_interval_s: must be > 0"),
        ({"stream_interval_ms": -1}, "d.stream_interval_ms: must be >= 0"),
        ({"stream_interval_ms": "fast"}, "d.stream_interval_ms: expected a number"),
        ({"stream_messages_per_s": -5}, "d.stream_messages_per_s: must be >= 0"),
        ({"look_back_period_s": 1, "metrics_interval_s": 2}, "d.look_back_period_s: must be > metrics_interval_s"),
    ],
)
def test_bad_deployment_options_name_the_key(mapping: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        deployment_options_from(mapping, "d")
    assert message in str(info.value)


def test_deploy_config_resolves_models_and_applies_defaults(inferd_home: Path, tmp_path: Path) -> None:
    config_path = tmp_path / "deploy.yaml"
    config_path.write_text(
        "http: {port: 8123}\n"
        "defaults: {max_replicas: 2}\n"
        "models:\n"
        "  - name: chat\n"
        "    source: smollm2-135m-instruct\n"
        "    deployment: {min_replicas: 0, downscale_delay_s: 5}\n"
    )
    config = read_deploy_config(config_path)
    (spec,) = config.specs
    assert spec.name == "chat" and spec.kind.value == "generate" and Path(spec.source).is_file()
    assert config.deployments["chat"].min_replicas == 0
    assert config.deployments["chat"].max_replicas == 2  # from defaults
    assert config.deployments["chat"].downscale_delay_s == 5
    assert config.port == 8123
    config_path.write_text("models:\n  - source: smollm2-135m-instruct\n    deployment: {max_replica: 2}\n")
    with pytest.raises(ValueError, match=r"models\[0\]\.deployment: unknown key\(s\) \['max_replica'\]"):
        read_deploy_config(config_path)


def _exposition(requests: int, ttft_s: list[float]) -> str:
    registry = CollectorRegistry()
    counter = Counter("inferd:requests", "Requests.", ["model_name"], registry=registry)
    histogram = Histogram("inferd:ttft_seconds", "TTFT.", ["model_name"], buckets=(0.1, 1.0), registry=registry)
    counter.labels("m").inc(requests)
    for value in ttft_s:
        histogram.labels("m").observe(value)
    return generate_latest(registry).decode()


def test_merged_metrics_keep_every_replica_series() -> None:
    texts = {"r1": _exposition(3, [0.05]), "r2": _exposition(5, [0.5, 2.0])}
    merged = merge_exposition(texts)
    samples = {}
    for family in text_string_to_metric_families(merged):  # prometheus_client's parser is the reference reader
        for sample in family.samples:
            samples[(sample.name, sample.labels.get("replica"), sample.labels.get("le"))] = sample.value
            assert sample.labels["replica"] in texts
    for replica, text in texts.items():
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                assert samples[(sample.name, replica, sample.labels.get("le"))] == sample.value
    assert merged.count("# TYPE inferd:ttft_seconds histogram") == 1


@pytest.mark.parametrize("argv", [["serve", "--ray"], ["deploy", "ray", "deploy.yaml"]])
def test_ray_commands_without_ray_fail_in_one_line_naming_the_extra(argv: list[str]) -> None:
    code = ("import sys\n"
            "sys.modules['ray'] = None  # what an environment without Ray looks like to `import ray`\n"
            "from inferd.cli import main\n"
            f"sys.exit(main({argv!r}))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["inferd: error: Ray Serve is not installed: pip install 'inferd[ray]'"]
