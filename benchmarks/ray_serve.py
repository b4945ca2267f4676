"""inferd on Ray Serve: first token after scale-from-zero, and the router's throughput cost against direct serving.

    PYTHONPATH=. .venv/bin/python benchmarks/ray_serve.py [--model smollm2-135m-instruct] [--cold-starts 3]
        [--concurrency 16] [--new-tokens 64] [--repeats 3] [--skip-overhead] [--skip-cold]

One local Ray (127.0.0.1) for the whole run.
1. Scale from zero (`--cold-starts` times): an application with min_replicas 0 and a 2 s downscale delay; once it
   has no replica, one streaming /v1/completions is sent and the time to its first token is taken (Ray starts a
   replica process, inferd loads the model from its prepared weights, the request runs). Peer in the same run:
   a trivial Ray Serve deployment (a function that answers "ok") with the same autoscaling settings, scaled from
   zero the same way, i.e. what Ray itself costs before any inferd code runs. Each cold start is split with the
   Serve controller's log: request sent -> upscale decided -> replica started (Ray's process start, then the
   constructor) -> first token. `--metrics-interval 10` is Ray's default report interval (what inferd ran before).
2. Router overhead: the same workload (--concurrency streaming clients, all sent at once, --new-tokens each with
   ignore_eos, greedy) against `inferd serve` (a subprocess) and against inferd on Ray Serve (one replica with 2
   CPUs, so both engines get the machine's two torch threads), alternating after a warm-up of each, for each
   layout: one hop (the replica is the application's ingress, what a one-model application with at least one
   replica and no affinity routing gets) and two hops (proxy -> ingress -> replica, what the other applications
   get). Ratios of medians (and of bests) per layout, and each process's CPU per generated token.
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


def _controller_log_events(since_s: float, app: str) -> dict[str, float]:
    """From the Serve controller's log, after `since_s` (time.time()): when the upscale of `app` was decided, when
    its replica reported started, and the constructor's share of that start (seconds, or NaN if not found)."""
    import datetime
    import glob
    import re

    events = {"upscale_at": float("nan"), "started_at": float("nan"), "constructor_s": float("nan"),
              "replica_start_s": float("nan")}
    for path in glob.glob("/tmp/ray/session_latest/logs/serve/controller_*.log"):
        for line in Path(path).read_text(errors="replace").splitlines():
            match = re.match(r"\w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) controller", line)
            if match is None or f"app='{app}'" not in line:
                continue
            at = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if at < since_s:
                continue
            if " Upscaling " in line and " from 0 to " in line and events["upscale_at"] != events["upscale_at"]:
                events["upscale_at"] = at
            started = re.search(r"started successfully .* after ([\d.]+)s .* took ([\d.]+)s", line)
            if started and events["started_at"] != events["started_at"]:
                events.update(started_at=at, replica_start_s=float(started.group(1)),
                              constructor_s=float(started.group(2)))
    return events


def _breakdown(sent_at: float, total_s: float, app: str) -> str:
    time.sleep(0.3)  # the controller's log line is flushed shortly after
    e = _controller_log_events(sent_at - 0.01, app)
    return (f"(decision {e['upscale_at'] - sent_at:5.2f} s, replica start {e['replica_start_s']:4.1f} s of which "
            f"constructor {e['constructor_s']:4.1f} s, after start {sent_at + total_s - e['started_at']:5.2f} s)")


def _process_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) so far of Ray's processes on this machine, by process title (`ray::ProxyActor`,
    `ray::ServeReplica:<app>:<deployment>`, raylet, gcs_server, ...), summed over processes of one title."""
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        title = args[0].decode(errors="replace").split(" ")[0]
        if not (title.startswith("ray::") or title.endswith(("raylet", "gcs_server"))):
            continue
        name = title.rsplit("/", 1)[-1]
        totals[name] = totals.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks_per_s
    return totals


def _pid_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
                             metrics_interval_s=args.metrics_interval, prefix_affinity=False)
    print(f"autoscaling_config of both: {cold.autoscaling_config()}")
    serve.run(ray_serve.build_application(DeployConfig((spec,), {spec.name: cold}), server_options),
              name="cold", route_prefix="/cold", blocking=False)

    @serve.deployment(name="trivial", autoscaling_config=cold.autoscaling_config())
    def trivial(_request) -> str:
        return "ok"

    serve.run(trivial.bind(), name="trivial", route_prefix="/trivial", blocking=False)
    body = {"model": spec.name, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, "stream": True}
    inferd_s, trivial_s = [], []
    for _ in range(args.cold_starts):
        _wait_for(lambda: _running_replicas("cold", f"model-{spec.name}") == 0, 120, "inferd to scale to zero")
        sent_at = time.time()
        inferd_s.append(_first_token_s(f"{base_url}/cold/v1/completions", body))
        print(f"  cold start: inferd first token {inferd_s[-1]:6.2f} s "
              f"{_breakdown(sent_at, inferd_s[-1], 'cold')}", flush=True)
        _wait_for(lambda: _running_replicas("trivial", "trivial") == 0, 120, "the trivial app to scale to zero")
        sent_at = time.time()
        trivial_s.append(_trivial_first_answer_s(f"{base_url}/trivial"))
        print(f"              trivial answer    {trivial_s[-1]:6.2f} s {_breakdown(sent_at, trivial_s[-1], 'trivial')}",
              flush=True)
    print(f"scale from zero, median of {args.cold_starts}: inferd first token {statistics.median(inferd_s):.2f} s "
          f"(goal <= 5 s: {'met' if statistics.median(inferd_s) <= 5 else 'NOT met'}); trivial Ray Serve deployment "
          f"{statistics.median(trivial_s):.2f} s")
    serve.delete("cold")
    serve.delete("trivial")


def overhead(args: argparse.Namespace, base_url: str, server_options, spec, prompt_ids: list[list[int]]) -> None:
    """Direct `inferd serve` against each Ray Serve layout in turn (one application at a time, the direct server up
    throughout), alternating runs; ratios of medians and of bests per layout."""
    from ray import serve

    from inferd.deploy import ray_serve
    from inferd.deploy.config import DeployConfig, DeploymentOptions

    # name -> (one hop?, the model replica's environment); one hop: proxy -> replica, two: proxy -> ingress -> replica
    same_loop = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}  # inferd's app on the replica's own event loop
    layouts = {"one hop": (True, None), "two hops": (False, None), "one hop same loop": (True, same_loop),
               "two hops same loop": (False, same_loop)}
    layouts = {name: layout for name, layout in layouts.items() if name.replace(" ", "-") in args.layouts.split(",")}
    # Every layout once per stream interval (DeploymentOptions.stream_interval_ms), named "<layout>, <ms> ms".
    intervals_ms = [float(ms) for ms in args.stream_intervals_ms.split(",")]
    budget = f", budget {args.stream_messages_per_s:g}/s" if args.stream_messages_per_s > 0 else ""
    layouts = {f"{name}, {ms:g} ms{budget}": (*layout, ms) for name, layout in layouts.items() for ms in intervals_ms}
    log_path = tempfile.NamedTemporaryFile(prefix="inferd-ray-overhead-", suffix=".log", delete=False).name
    process, direct_url = start_server(args, log_path)
    asyncio.run(run_server_async(direct_url, spec.name, prompt_ids, args.new_tokens))  # warm-up
    num_tokens = args.repeats * args.concurrency * args.new_tokens
    summary = []
    try:
        for index, (layout, (is_one_hop, env_vars, interval_ms)) in enumerate(layouts.items()):
            app = f"overhead-{index}"
            one = DeploymentOptions(min_replicas=1, max_replicas=1, num_cpus=2, prefix_affinity=False,
                                    stream_interval_ms=interval_ms, stream_messages_per_s=args.stream_messages_per_s)
            config = DeployConfig((spec,), {spec.name: one})
            serve.run(ray_serve.build_application(config, server_options, one_hop=is_one_hop,
                                                  replica_env_vars=env_vars), name=app,
                      route_prefix=f"/ray{index}", blocking=False)
            _wait_for(lambda: _running_replicas(app, f"model-{spec.name}") == 1, 300, "the Ray replica")
            sides = {"direct": direct_url, f"ray serve, {layout}": f"{base_url}/ray{index}"}
            asyncio.run(run_server_async(sides[f"ray serve, {layout}"], spec.name, prompt_ids, args.new_tokens))
            tps: dict[str, list[float]] = {name: [] for name in sides}
            ray_cpu_s: dict[str, float] = {}  # process title -> CPU seconds during the Ray Serve runs
            direct_cpu_s = 0.0
            for repeat in range(args.repeats):
                for name, url in sides.items():
                    before, direct_before_s = _process_cpu_s(), _pid_cpu_s(process.pid)
                    tps[name].append(asyncio.run(run_server_async(url, spec.name, prompt_ids, args.new_tokens)))
                    if name == "direct":
                        direct_cpu_s += _pid_cpu_s(process.pid) - direct_before_s
                    else:
                        for title, cpu_s in _process_cpu_s().items():
                            ray_cpu_s[title] = ray_cpu_s.get(title, 0.0) + cpu_s - before.get(title, 0.0)
                print(f"  run {repeat + 1}: " + "   ".join(f"{n} {v[-1]:7.1f} tok/s" for n, v in tps.items())
                      + f"   (load average {os.getloadavg()[0]:.2f})", flush=True)
            serve.delete(app)
            print(f"CPU ms per generated token: direct `inferd serve` {1000 * direct_cpu_s / num_tokens:.2f}; "
                  f"Ray Serve {layout}, by process: " + ", ".join(
                      f"{title} {1000 * cpu_s / num_tokens:.2f}"
                      for title, cpu_s in sorted(ray_cpu_s.items(), key=lambda x: -x[1])
                      if cpu_s > 0.005 * num_tokens / 1000))
            for name, values in tps.items():
                print(f"{name:<24} best {max(values):7.1f}  median {statistics.median(values):7.1f} generated tok/s "
                      f"({args.concurrency} streaming clients x {args.new_tokens} tokens)")
            ray_values = tps[f"ray serve, {layout}"]
            best = max(ray_values) / max(tps["direct"])
            median = statistics.median(ray_values) / statistics.median(tps["direct"])
            paired = statistics.median(r / d for r, d in zip(ray_values, tps["direct"]))  # runs side by side
            summary.append(f"ray serve ({layout}) / direct: median {median:.3f}, best {best:.3f}, paired runs' median "
                           f"{paired:.3f}   (goal >= 0.90: "
                           f"{'met' if median >= 0.90 else 'NOT met'})")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
    print("\n".join(summary))


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
    parser.add_argument("--ray-default-niceness", action="store_true",
                        help="leave Ray's workers at its default niceness 15 (inferd's local Ray runs them at 0)")
    parser.add_argument("--layouts", default="one-hop,two-hops",
                        help="Ray Serve layouts the overhead part measures: one-hop (proxy -> model replica), "
                             "two-hops (proxy -> ingress -> model replica), one-hop-same-loop, two-hops-same-loop "
                             "(the replica runs inferd's app on Serve's own event loop instead of a thread of its own)")
    parser.add_argument("--stream-intervals-ms", default=None, metavar="MS[,MS...]",
                        help="DeploymentOptions.stream_interval_ms of the Ray replicas: each layout is measured once "
                             "per value (default: inferd's default; 0 passes every chunk to Ray as it comes)")
    parser.add_argument("--stream-messages-per-s", type=float, default=None, metavar="N",
                        help="DeploymentOptions.stream_messages_per_s of the Ray replicas (default: inferd's; 0: a "
                             "fixed interval per stream, as before the budget)")
    parser.add_argument("--metrics-interval", type=float, default=None, metavar="SECONDS",
                        help="autoscaling_config.metrics_interval_s of both cold-start apps (default: inferd's "
                             "DeploymentOptions default; 10 is Ray's own)")
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
    # A first load from this checkout compiles the kernels and writes the prepared weights (a minute or more): done
    # here, untimed, so that no cold start below pays it.
    from inferd.engine.llm import LLM

    LLM(spec.source, **{**engine, "kv_cache_memory": "64MiB"})
    tokenizer = Tokenizer.from_pretrained(spec.source)
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(args.concurrency)]
    prompt_ids = [tokenizer.encode_chat([{"role": "user", "content": t}], add_generation_prompt=True) for t in texts]
    print(f"model {spec.name}; CPU flags: {cpu_flags_summary()}; {os.cpu_count()} CPUs")

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    from inferd.deploy.config import DeploymentOptions

    if args.metrics_interval is None:
        args.metrics_interval = DeploymentOptions().metrics_interval_s
    if args.stream_intervals_ms is None:
        args.stream_intervals_ms = str(DeploymentOptions().stream_interval_ms)
    if args.stream_messages_per_s is None:
        args.stream_messages_per_s = DeploymentOptions().stream_messages_per_s
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} at start")
    from inferd.deploy.ray_serve import use_local_ray_env

    if not args.ray_default_niceness:
        use_local_ray_env()  # what `inferd serve --ray` does for the local Ray it starts
    print(f"Ray workers' niceness: {os.environ.get('RAY_worker_niceness', 'Ray default (15)')}")
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = int(os.environ.get("INFERD_BENCH_RAY_PORT", "8765"))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base_url = f"http://127.0.0.1:{port}"
    try:
        if not args.skip_cold:
            cold_starts(args, base_url, server_options, spec)
        if not args.skip_overhead:
            overhead(args, base_url, server_options, spec, prompt_ids)
        print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} at the end")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
