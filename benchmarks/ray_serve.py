"""inferd on Ray Serve: first token after scale-from-zero, and the router's throughput cost against direct serving.

    PYTHONPATH=. .venv/bin/python benchmarks/ray_serve.py [--model smollm2-135m-instruct] [--cold-starts 3]
        [--concurrency 16] [--new-tokens 64] [--repeats 3] [--skip-overhead] [--skip-cold]

One local Ray (127.0.0.1) for the whole run.
1. Scale from zero (`--cold-starts` times): an application with min_replicas 0 and a 2 s downscale delay; once it
   has no replica, one streaming /v1/completions is sent and the time to its first token is taken (Ray starts a
   replica process, inferd loads the model from its prepared weights, the request runs). Peer in the same run:
   a trivial Ray Serve deployment (a function that answers "ok") scaled from zero the same way, i.e. what Ray
   itself costs before any inferd code runs.
2. Router overhead: the same workload (--concurrency streaming clients, all sent at once, --new-tokens each with
   ignore_eos, greedy) against `inferd serve` (a subprocess) and against inferd on Ray Serve (proxy -> ingress ->
   one replica with 2 CPUs, so both engines get the machine's two torch threads), alternating after a warm-up of
   each; the best run per side gives the ratio (contention only slows a run), medians printed beside.
   Goal: Ray Serve >= 0.90 of direct.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_overhead import run_server_async, start_server  # noqa: E402  the same load generator as http_overhead
from offline import PROMPTS  # noqa: E402


def _running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    return serve.status().applications[app].deployments[deployment].replica_states.get("RUNNING", 0)


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def _first_token_s(url: str, body: dict) -> float:
    started = time.perf_counter()
    with httpx.Client(timeout=600) as http, http.stream("POST", url, json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and '"text":' in line:
                return time.perf_counter() - started
    raise SystemExit("the stream ended without a token")


def _trivial_first_answer_s(url: str) -> float:
    started = time.perf_counter()
    response = httpx.get(url, timeout=600)
    response.raise_for_status()
    return time.perf_counter() - started


def cold_starts(args: argparse.Namespace, base_url: str, server_options, spec) -> None:
    from ray import serve

    from inferd.deploy import ray_serve
    from inferd.deploy.config import DeployConfig, DeploymentOptions

    cold = DeploymentOptions(min_replicas=0, max_replicas=1, downscale_delay_s=2, upscale_delay_s=0.0,
                             prefix_affinity=False)
    serve.run(ray_serve.build_application(DeployConfig((spec,), {spec.name: cold}), server_options),
              name="cold", route_prefix="/cold", blocking=False)

    @serve.deployment(name="trivial", autoscaling_config={"min_replicas": 0, "max_replicas": 1,
                                                          "downscale_delay_s": 2, "upscale_delay_s": 0.0})
    def trivial(_request) -> str:
        return "ok"

    serve.run(trivial.bind(), name="trivial", route_prefix="/trivial", blocking=False)
    body = {"model": spec.name, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, "stream": True}
    inferd_s, trivial_s = [], []
    for _ in range(args.cold_starts):
        _wait_for(lambda: _running_replicas("cold", f"model-{spec.name}") == 0, 120, "inferd to scale to zero")
        inferd_s.append(_first_token_s(f"{base_url}/cold/v1/completions", body))
        _wait_for(lambda: _running_replicas("trivial", "trivial") == 0, 120, "the trivial app to scale to zero")
        trivial_s.append(_trivial_first_answer_s(f"{base_url}/trivial"))
        print(f"  cold start: inferd first token {inferd_s[-1]:6.2f} s   trivial deployment answer {trivial_s[-1]:6.2f} s")
    print(f"scale from zero, median of {args.cold_starts}: inferd first token {statistics.median(inferd_s):.2f} s "
          f"(goal <= 5 s: {'met' if statistics.median(inferd_s) <= 5 else 'NOT met'}); trivial Ray Serve deployment "
          f"{statistics.median(trivial_s):.2f} s")
    serve.delete("cold")
    serve.delete("trivial")


def overhead(args: argparse.Namespace, base_url: str, server_options, spec, prompt_ids: list[list[int]]) -> None:
    from ray import serve

    from inferd.deploy import ray_serve
    from inferd.deploy.config import DeployConfig, DeploymentOptions

    one = DeploymentOptions(min_replicas=1, max_replicas=1, num_cpus=2, prefix_affinity=False)
    serve.run(ray_serve.build_application(DeployConfig((spec,), {spec.name: one}), server_options),
              name="direct-peer", route_prefix="/ray", blocking=False)
    _wait_for(lambda: _running_replicas("direct-peer", f"model-{spec.name}") == 1, 300, "the Ray replica")
    log_path = tempfile.NamedTemporaryFile(prefix="inferd-ray-overhead-", suffix=".log", delete=False).name
    process, direct_url = start_server(args, log_path)
    try:
        sides = {"direct": direct_url, "ray serve": f"{base_url}/ray"}
        for url in sides.values():  # warm-up
            asyncio.run(run_server_async(url, spec.name, prompt_ids, args.new_tokens))
        tps: dict[str, list[float]] = {name: [] for name in sides}
        for repeat in range(args.repeats):
            for name, url in sides.items():
                tps[name].append(asyncio.run(run_server_async(url, spec.name, prompt_ids, args.new_tokens)))
            print(f"  run {repeat + 1}: " + "   ".join(f"{n} {v[-1]:7.1f} tok/s" for n, v in tps.items()))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        serve.delete("direct-peer")
    for name, values in tps.items():
        print(f"{name:<10} best {max(values):7.1f}  median {statistics.median(values):7.1f} generated tok/s "
              f"({args.concurrency} streaming clients x {args.new_tokens} tokens)")
    ratio = max(tps["ray serve"]) / max(tps["direct"])
    print(f"ray serve / direct (best) {ratio:.3f}   (goal >= 0.90: {'met' if ratio >= 0.90 else 'NOT met'})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--cold-starts", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--kv-cache-memory", default="512MiB")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-cold", action="store_true")
    parser.add_argument("--metric-push-interval", type=float, default=None, metavar="SECONDS",
                        help="Serve's autoscaling metric push interval for this Ray (default: Ray's own, 10 s; "
                             "`inferd serve --ray` uses 0.5 s for a local Ray)")
    args = parser.parse_args()
    args.device = "cpu"

    import ray
    from ray import serve

    from inferd.engine.tokenizer import Tokenizer
    from inferd.kernels import cpu_flags_summary
    from inferd.server.state import ServerOptions
    from inferd.store import inferd_home
    from inferd.store.model_specs import resolve_spec

    spec = resolve_spec(args.model)
    engine = {"kv_cache_memory": args.kv_cache_memory, "max_model_len": args.max_model_len,
              "max_num_seqs": max(args.concurrency, 1), "prepared_weights_dir": str(inferd_home() / "prepared")}
    # The response cache off, as in the direct peer (http_overhead.start_server): greedy requests repeat, and a
    # cached answer would measure the cache, not the router.
    server_options = ServerOptions(llm_defaults=engine, response_cache_bytes=0)
    tokenizer = Tokenizer.from_pretrained(spec.source)
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(args.concurrency)]
    prompt_ids = [tokenizer.encode_chat([{"role": "user", "content": t}], add_generation_prompt=True) for t in texts]
    print(f"model {spec.name}; CPU flags: {cpu_flags_summary()}; {os.cpu_count()} CPUs")

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    if args.metric_push_interval is not None:
        from inferd.deploy.ray_serve import METRIC_PUSH_INTERVAL_VARIABLES

        for variable in METRIC_PUSH_INTERVAL_VARIABLES:
            os.environ[variable] = str(args.metric_push_interval)
    print(f"Serve autoscaling metric push interval: {args.metric_push_interval or 'Ray default (10 s)'}")
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = int(os.environ.get("INFERD_BENCH_RAY_PORT", "8765"))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base_url = f"http://127.0.0.1:{port}"
    try:
        if not args.skip_cold:
            cold_starts(args, base_url, server_options, spec)
        if not args.skip_overhead:
            overhead(args, base_url, server_options, spec, prompt_ids)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
