"""Layer 6: what a Ray Serve deployment of inferd is made of, read and checked without importing ray.

A deploy config (YAML) is a models file (store/model_specs.py) whose entries may carry a `deployment:` mapping,
plus the HTTP address of Ray Serve's proxy:

    http: {host: 127.0.0.1, port: 8000}
    models:
      - name: chat
        source: smollm2-135m-instruct
        options: {max_num_seqs: 32}
        deployment:
          min_replicas: 0              # 0: scale to zero when idle (the next request waits for a replica)
          max_replicas: 2
          target_ongoing_requests: 16  # per replica; more scales up
          upscale_delay_s: 2
          downscale_delay_s: 60        # idle this long before a replica goes (to zero, with min_replicas 0)
          look_back_period_s: 30       # window over which ongoing requests are averaged
          metrics_interval_s: 0.5      # how often handles and replicas report load (bounds a scale from zero's wait)
          num_cpus: 1                  # Ray CPUs per replica (its torch threads follow it)
          stream_interval_ms: 50       # a stream's chunks within this long go to Ray as one message (0: each alone)
          stream_messages_per_s: 80    # the replica's message budget shared by its streams (0: the interval alone)
      - source: all-minilm-l6-v2

`inferd serve --ray` builds the same from its --model flags and the --min-replicas ... flags (one set for all).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

RAY_EXTRA_HINT = "pip install 'inferd[ray]'"


@dataclass(frozen=True)
class DeploymentOptions:
    """Ray Serve settings of one model's deployment (the names of Ray Serve's autoscaling_config where they exist)."""

    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None  # None: min_replicas
    target_ongoing_requests: float = 16.0
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 60.0
    look_back_period_s: float = 30.0  # Ray averages ongoing requests over this window before deciding
    # How often every handle and replica records and reports its ongoing requests to Serve's autoscaler (Ray's
    # default: 10 s). It bounds how late a request waiting on a scaled-to-zero model is seen: Ray's immediate
    # "scaled to zero" report sends the handle's recorded samples, which after a first scale-down are all zeros
    # until the next record tick, so the upscale waited for the next record and report (7-10 s; RESULTS.md).
    # Ray 2.60 reads this field (deprecated, but its RAY_SERVE_*_AUTOSCALING_METRIC_PUSH_INTERVAL_S replacements are
    # declared and never read).
    metrics_interval_s: float = 0.5
    # Requests one replica takes at once before the router queues them (an LLM batches up to max_num_seqs).
    max_ongoing_requests: int = 64
    # A replica asked to stop (downscale, redeploy) takes no new request and lets in-flight ones finish for this
    # long; then it is stopped.
    graceful_shutdown_timeout_s: float = 30.0
    num_cpus: float = 1.0
    # generate models: requests sharing a prompt prefix prefer the replica that served it (Ray Serve LLM's
    # PrefixCacheAffinityRouter), unless the replicas' queue lengths differ by more than
    # prefix_imbalance_threshold, when the less loaded one wins (power of two choices).
    prefix_affinity: bool = True
    prefix_imbalance_threshold: float = 8.0
    # A streamed answer's chunks (SSE events) that a replica produces within this many milliseconds of its last
    # message to Ray go as one message, joined whole and in order (deploy/ray_serve.py CoalescingSend). Each Ray
    # message costs the replica and Serve's proxy CPU; with many streams on few cores that cost is most of Ray's
    # overhead. A chunk after a quiet gap (the first token) goes at once; 0 sends every chunk as it comes.
    stream_interval_ms: float = 50.0
    # The replica's budget of streamed messages to Ray per second, shared by its open streams: each stream's interval
    # is the larger of stream_interval_ms and open streams / stream_messages_per_s (16 streams: 200 ms; one: 50 ms).
    # 0: no budget, stream_interval_ms alone.
    stream_messages_per_s: float = 80.0

    def check(self, where: str) -> None:
        if self.min_replicas < 0:
            raise ValueError(f"{where}.min_replicas: must be >= 0, got {self.min_replicas}")
        if self.max_replicas < max(1, self.min_replicas):
            raise ValueError(f"{where}.max_replicas: must be >= max(1, min_replicas), got {self.max_replicas}")
        if self.initial_replicas is not None and not (self.min_replicas <= self.initial_replicas <= self.max_replicas):
            raise ValueError(f"{where}.initial_replicas: must lie in [min_replicas, max_replicas]")
        for name in ("target_ongoing_requests", "max_ongoing_requests", "num_cpus", "look_back_period_s",
                     "metrics_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{where}.{name}: must be > 0, got {getattr(self, name)}")
        for name in ("upscale_delay_s", "downscale_delay_s", "graceful_shutdown_timeout_s",
                     "prefix_imbalance_threshold", "stream_interval_ms", "stream_messages_per_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{where}.{name}: must be >= 0, got {getattr(self, name)}")
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError(f"{where}.look_back_period_s: must be > metrics_interval_s ({self.metrics_interval_s}), "
                             f"got {self.look_back_period_s}")

    def autoscaling_config(self) -> dict[str, Any]:
        """Ray Serve's `autoscaling_config` mapping."""
        config: dict[str, Any] = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "look_back_period_s": self.look_back_period_s,
            "metrics_interval_s": self.metrics_interval_s,
        }
        if self.initial_replicas is not None:
            config["initial_replicas"] = self.initial_replicas
        return config


_OPTION_FIELDS = {f.name: f for f in fields(DeploymentOptions)}


def deployment_options_from(mapping: Mapping[str, Any], where: str, base: DeploymentOptions | None = None
                            ) -> DeploymentOptions:
    """A DeploymentOptions from a YAML mapping (unknown keys and wrong types name the key)."""
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{where}: expected a mapping of {sorted(_OPTION_FIELDS)}")
    unknown = sorted(set(mapping) - set(_OPTION_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(_OPTION_FIELDS)}")
    values: dict[str, Any] = {}
    for key, value in mapping.items():
        default = getattr(DeploymentOptions(), key)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{where}.{key}: expected true or false, got {value!r}")
        elif key in ("min_replicas", "max_replicas", "max_ongoing_requests", "initial_replicas"):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{where}.{key}: expected an integer, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}.{key}: expected a number, got {value!r}")
        values[key] = value
    options = replace(base or DeploymentOptions(), **values)
    options.check(where)
    return options


@dataclass(frozen=True)
class DeployConfig:
    """The model table (resolved ModelSpecs), each model's DeploymentOptions, and where the proxy listens."""

    specs: tuple[Any, ...]  # inferd.serving.ModelSpec, resolved (local path, kind)
    deployments: Mapping[str, DeploymentOptions]  # model name -> options
    host: str = "127.0.0.1"
    port: int = 8000


def read_deploy_config(path: str | Path) -> DeployConfig:
    """Read and check a deploy config, resolving every model through the store (pulling catalog models)."""
    import yaml

    from inferd.store.model_specs import resolve_spec

    try:
        document = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"deploy config {path}: cannot read it: {exc}") from None
    if not isinstance(document, dict):
        raise ValueError(f"deploy config {path}: expected a mapping with `models:` (and optionally `http:`)")
    unknown = sorted(set(document) - {"models", "http", "defaults"})
    if unknown:
        raise ValueError(f"deploy config {path}: unknown key(s) {unknown}; known: ['defaults', 'http', 'models']")
    http = document.get("http") or {}
    if not isinstance(http, dict) or sorted(set(http) - {"host", "port"}):
        raise ValueError(f"deploy config {path}: http: expected a mapping with host and port")
    base = deployment_options_from(document.get("defaults") or {}, f"deploy config {path}: defaults")
    entries = document.get("models")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"deploy config {path}: expected a top-level `models:` list with at least one entry")
    specs = []
    deployments: dict[str, DeploymentOptions] = {}
    for index, entry in enumerate(entries):
        where = f"deploy config {path}: models[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("source"), str):
            raise ValueError(f"{where}: expected a mapping with at least `source`")
        unknown = sorted(set(entry) - {"name", "source", "kind", "options", "deployment"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known: deployment, kind, name, options, source")
        spec = resolve_spec(entry["source"], name=entry.get("name"), kind=entry.get("kind"),
                            options=entry.get("options"))
        if spec.name in deployments:
            raise ValueError(f"{where}.name: model name {spec.name!r} is given twice")
        specs.append(spec)
        deployments[spec.name] = deployment_options_from(entry.get("deployment") or {}, f"{where}.deployment", base)
    return DeployConfig(tuple(specs), deployments, host=str(http.get("host", "127.0.0.1")),
                        port=int(http.get("port", 8000)))


def add_ray_serve_args(parser: argparse.ArgumentParser) -> None:
    """`inferd serve --ray` and the deployment settings it applies to every model."""
    g = parser.add_argument_group("ray serve (--ray)")
    g.add_argument("--ray", action="store_true",
                   help=f"serve on Ray Serve: one autoscaled deployment per model behind the same routes "
                        f"(needs {RAY_EXTRA_HINT}); connects to $RAY_ADDRESS or starts a local Ray")
    d = DeploymentOptions()
    g.add_argument("--min-replicas", type=int, default=d.min_replicas, help="0 scales a model to zero when idle")
    g.add_argument("--max-replicas", type=int, default=d.max_replicas)
    g.add_argument("--target-ongoing-requests", type=float, default=d.target_ongoing_requests,
                   help="requests per replica the autoscaler aims for")
    g.add_argument("--upscale-delay", type=float, default=d.upscale_delay_s, metavar="SECONDS")
    g.add_argument("--downscale-delay", type=float, default=d.downscale_delay_s, metavar="SECONDS")
    g.add_argument("--replica-cpus", type=float, default=d.num_cpus, help="Ray CPUs per replica")
    g.add_argument("--stream-interval-ms", type=float, default=d.stream_interval_ms, metavar="MS",
                   help="a streamed answer's chunks within this long of the replica's last message to Ray go as one "
                        "message (fewer Ray messages per token; 0: every chunk at once)")
    g.add_argument("--stream-messages-per-s", type=float, default=d.stream_messages_per_s, metavar="N",
                   help="a replica's budget of streamed messages to Ray per second, shared by its open streams (each "
                        "stream's interval: the larger of --stream-interval-ms and streams / N; 0: no budget)")


def deployment_options_from_cli(ns: argparse.Namespace) -> DeploymentOptions:
    options = DeploymentOptions(
        min_replicas=ns.min_replicas, max_replicas=ns.max_replicas, target_ongoing_requests=ns.target_ongoing_requests,
        upscale_delay_s=ns.upscale_delay, downscale_delay_s=ns.downscale_delay, num_cpus=ns.replica_cpus,
        graceful_shutdown_timeout_s=ns.drain_timeout, stream_interval_ms=ns.stream_interval_ms,
        stream_messages_per_s=ns.stream_messages_per_s,
    )
    options.check("--ray")
    return options


def deploy_config_from_cli(ns: argparse.Namespace, specs: Sequence[Any]) -> DeployConfig:
    options = deployment_options_from_cli(ns)
    return DeployConfig(tuple(specs), {spec.name: options for spec in specs}, host=ns.host, port=ns.port)


def load_ray_serve() -> Any:
    """inferd.deploy.ray_serve, or a ValueError whose one line names the extra to install when Ray is missing."""
    try:
        from inferd.deploy import ray_serve
    except ImportError as exc:
        if (exc.name or "").split(".")[0] == "ray":
            raise ValueError(f"Ray Serve is not installed: {RAY_EXTRA_HINT}") from None
        raise
    return ray_serve


def merge_exposition(texts: Mapping[str, str], label: str = "replica") -> str:
    """Prometheus text format of several processes as one: every sample gets `label="<key>"`; each family's HELP
    and TYPE lines appear once, its samples from every process after them."""
    families: dict[str, tuple[list[str], list[str]]] = {}
    for key, text in texts.items():
        family = ""
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split(" ", 3)[2]
                header, _ = families.setdefault(family, ([], []))
                if line not in header:
                    header.append(line)
                continue
            if line.startswith("#"):
                continue
            name_end = len(line) if " " not in line else line.index(" ")
            brace = line.find("{")
            value_label = f'{label}="{key}"'
            if 0 <= brace < name_end:
                separator = "" if line[brace + 1:brace + 2] == "}" else ","
                sample = f"{line[:brace + 1]}{value_label}{separator}{line[brace + 1:]}"
            else:
                sample = f"{line[:name_end]}{{{value_label}}}{line[name_end:]}"
            families.setdefault(family, ([], []))[1].append(sample)
    lines = []
    for header, samples in families.values():
        lines += header + samples
    return "\n".join(lines) + "\n"
