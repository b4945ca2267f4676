"""Layer 6: the `inferd` command.

  inferd pull NAME | list | rm NAME              model store
  inferd generate --model M --prompt P [...]     one completion on stdout (only the completion)
  inferd chat --model M                          interactive terminal chat, streamed
  inferd embed --model M TEXT [TEXT ...]         embedding vectors as JSON on stdout
  inferd serve [--model M ...] [--models-file F]  HTTP server for several models (LLMs, embeddings)
  inferd serve --ray [...] | inferd deploy ray CONFIG   the same routes on Ray Serve, autoscaled per model
  inferd bench serve|plot [...]                  serving benchmark for any OpenAI-compatible server
  inferd plan --slo S --demand R [...]           cheapest deployment meeting a latency SLO (measured or from files)
  inferd collections create|load|query|list|delete   vector collections on a running server

Imports are lazy per command: `inferd bench` must run without torch installed.
"""

from __future__ import annotations

import argparse
import sys

from inferd.config import EngineArgs

def add_sampling_args(p: argparse.ArgumentParser, default_max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=default_max_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed-sampling", dest="sampling_seed", type=int, default=None,
                   help="per-request sampling seed (reproducible output)")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def sampling_params_from(ns: argparse.Namespace):
    from inferd.request import SamplingParams

    return SamplingParams(
        max_tokens=ns.max_tokens,
        temperature=ns.temperature,
        top_p=ns.top_p,
        top_k=ns.top_k,
        min_p=ns.min_p,
        repetition_penalty=ns.repetition_penalty,
        presence_penalty=ns.presence_penalty,
        frequency_penalty=ns.frequency_penalty,
        seed=ns.sampling_seed,
        stop=ns.stop,
    )


# ---------------------------------------------------------------------------- commands
def cmd_pull(ns: argparse.Namespace) -> int:
    from inferd.store import pull

    path = pull(ns.name)
    print(path)
    return 0


def cmd_kernels(ns: argparse.Namespace) -> int:
    from inferd.kernels import (cpu_flags_summary, cpu_kernel_path, cpu_kernel_paths, cpu_kernels_available,
                                kernel_build_error, kernel_build_name)

    if not cpu_kernels_available():  # builds them first if this machine family has no build yet
        print(f"inferd: {kernel_build_error()}", file=sys.stderr)
        return 1
    print(f"build {kernel_build_name()}; path in use {cpu_kernel_path()} (this CPU runs: "
          f"{', '.join(cpu_kernel_paths())}; flags: {cpu_flags_summary()})")
    return 0


def cmd_list(ns: argparse.Namespace) -> int:
    from inferd.store import list_models

    rows = list_models()
    if not rows:
        print("no models pulled yet; try: inferd pull smollm2-135m-instruct")
        return 0
    print(f"{'NAME':<28} {'FORMAT':<6} {'SIZE':>10}  PATH")
    for row in rows:
        print(f"{row.name:<28} {row.format:<6} {row.size_bytes / 1e6:>8.1f}MB  {row.path}")
    return 0


def cmd_rm(ns: argparse.Namespace) -> int:
    from inferd.store import remove

    remove(ns.name)
    print(f"removed {ns.name}")
    return 0


def cmd_generate(ns: argparse.Namespace) -> int:
    from inferd.api import LLM

    params = sampling_params_from(ns)
    llm = LLM(**vars(EngineArgs.from_cli(ns)))
    if ns.chat_template:
        outs = llm.chat([{"role": "user", "content": ns.prompt}], params)
    else:
        outs = llm.generate(ns.prompt, params)
    sys.stdout.write(outs[0].outputs[0].text + "\n")
    sys.stdout.flush()
    return 0


def cmd_chat(ns: argparse.Namespace) -> int:
    from inferd.api import LLM

    llm = LLM(**vars(EngineArgs.from_cli(ns)))
    engine = llm.engine
    messages: list[dict] = []
    if ns.system:
        messages.append({"role": "system", "content": ns.system})
    print(f"inferd chat — model {ns.model}. Empty line or Ctrl-D to quit; /reset clears the history.",
          file=sys.stderr)
    turn = 0
    while True:
        try:
            user = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not user.strip():
            return 0
        if user.strip() == "/reset":
            messages = messages[:1] if ns.system else []
            continue
        messages.append({"role": "user", "content": user})
        prompt_ids = engine.tokenizer.encode_chat(messages, add_generation_prompt=True)
        rid = f"chat-{turn}"
        turn += 1
        try:
            engine.add_request(rid, prompt_ids, sampling_params_from(ns))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            messages.pop()
            continue
        text = ""
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    delta = out.delta_texts[0]
                    if delta:
                        sys.stdout.write(delta)
                        sys.stdout.flush()
                    text = out.outputs[0].text
        except KeyboardInterrupt:
            engine.abort_request(rid)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": text})


def cmd_embed(ns: argparse.Namespace) -> int:
    import json

    from inferd.embeddings import Embedder
    from inferd.store import resolve_model

    texts = list(ns.texts)
    if texts == ["-"]:
        texts = [line.rstrip("\n") for line in sys.stdin]
    if not texts:
        raise ValueError("give at least one text (or - to read one text per line from stdin)")
    resolved = resolve_model(ns.model)
    embedder = Embedder(resolved.path, device=ns.device, dtype=ns.dtype, quantization=ns.quantization)
    vectors = embedder.embed(texts, truncate=not ns.no_truncate)
    data = [{"object": "embedding", "index": i, "embedding": vector.tolist()} for i, vector in enumerate(vectors)]
    json.dump({"object": "list", "model": ns.model, "dimension": embedder.dimension, "data": data}, sys.stdout)
    sys.stdout.write("\n")
    return 0


def cmd_serve(ns: argparse.Namespace) -> int:
    from inferd.config import DEFAULT_MODEL
    from inferd.server.app import serve_main
    from inferd.store import inferd_home
    from inferd.store.model_specs import resolve_model_table

    ray_serve = None
    if ns.ray:  # before resolving (and maybe pulling) models: a missing extra is reported at once
        from inferd.deploy.config import load_ray_serve

        ray_serve = load_ray_serve()
    model_args = ns.model or ([] if ns.models_file or ns.model_repository else [DEFAULT_MODEL])
    specs = resolve_model_table(model_args, models_file=ns.models_file, model_repository=ns.model_repository,
                                kind=ns.kind, served_model_name=ns.served_model_name)
    ns.prepared_weights_dir = str(inferd_home() / "prepared")  # fast keep-alive reloads and replica starts
    from inferd.api import resolve_speculative_model

    ns.speculative_model = resolve_speculative_model(ns.speculative_model)
    if ray_serve is not None:
        from inferd.deploy.config import deploy_config_from_cli
        from inferd.server.app import server_options_from_args

        ray_serve.run(deploy_config_from_cli(ns, specs), server_options_from_args(ns))
        return 0
    return serve_main(ns, specs)


def cmd_deploy_ray(ns: argparse.Namespace) -> int:
    from inferd.deploy.config import load_ray_serve, read_deploy_config

    ray_serve = load_ray_serve()
    config = read_deploy_config(ns.config)
    ray_serve.run(config, ray_serve.default_server_options())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inferd",
        description="inferd: serve LLMs on a laptop CPU or a GPU box, with an OpenAI-compatible API.",
        epilog="Run `inferd COMMAND --help` for a command's flags. Models are stored in $INFERD_HOME "
               "(default ~/.cache/inferd).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="fetch a catalog model into the store ($INFERD_HOME)")
    p.add_argument("name")
    p.set_defaults(func=cmd_pull)
    p = sub.add_parser("kernels", help="build the CPU kernels now (else the first model load does) and say which "
                                       "path this CPU runs (INFERD_CPU_KERNEL forces a lower one)")
    p.set_defaults(func=cmd_kernels)
    p = sub.add_parser("list", help="list pulled models")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("rm", help="remove a pulled model")
    p.add_argument("name")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("generate", help="complete one prompt; prints only the completion")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat-template", action="store_true", help="wrap the prompt as one user chat message")
    EngineArgs.add_cli_args(p)
    add_sampling_args(p, default_max_tokens=64)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive terminal chat, streamed")
    p.add_argument("--system", default=None, help="system message")
    EngineArgs.add_cli_args(p)
    add_sampling_args(p, default_max_tokens=512)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("embed", help="embed texts; prints OpenAI-shaped JSON (data[i].embedding)")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed; a single - reads one per line from stdin")
    p.add_argument("--model", default="all-minilm-l6-v2", help="catalog name, pulled name or model directory")
    p.add_argument("--no-truncate", action="store_true", help="fail on a text longer than max_seq_length")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--quantization", default="none", choices=["none", "int8"],
                   help="int8: most linear layers int8 x int8 on CPU (opt-in; within cosine 0.999 of float32)")
    p.set_defaults(func=cmd_embed)

    # serve needs the engine (torch); bench needs neither. A command whose imports fail stays listed and says why
    # when run, instead of vanishing from --help.
    try:
        from inferd.server.app import add_serve_parser

        serve_parser = add_serve_parser(sub)
        serve_parser.set_defaults(func=cmd_serve)
        from inferd.deploy.config import add_ray_serve_args

        add_ray_serve_args(serve_parser)
    except ImportError as exc:
        _add_unavailable(sub, "serve", exc)
    p = sub.add_parser("deploy", help="deploy on a distributed engine: `inferd deploy ray CONFIG` (Ray Serve)")
    deploy_sub = p.add_subparsers(dest="target", required=True)
    p = deploy_sub.add_parser("ray", help="one autoscaled Ray Serve deployment per model of a deploy config "
                                          "(YAML, see inferd/deploy/config.py); needs pip install 'inferd[ray]'")
    p.add_argument("config", help="deploy config: models (as in --models-file) with per-model `deployment:`")
    p.set_defaults(func=cmd_deploy_ray)
    from inferd.collections.commands import add_collections_parser

    add_collections_parser(sub)
    try:
        from inferd.bench.serve import add_bench_parser

        add_bench_parser(sub)
    except ImportError as exc:
        _add_unavailable(sub, "bench", exc)
    try:
        from inferd.bench.plan import add_plan_parser

        add_plan_parser(sub)
    except ImportError as exc:
        _add_unavailable(sub, "plan", exc)
    return parser


def _add_unavailable(sub: argparse._SubParsersAction, name: str, exc: ImportError) -> None:
    reason = f"{type(exc).__name__}: {exc}"
    p = sub.add_parser(name, help=f"(unavailable here: {reason})", add_help=False)

    def fail(_ns: argparse.Namespace) -> int:
        print(f"inferd: error: `inferd {name}` cannot run here: {reason}", file=sys.stderr)
        return 2

    p.set_defaults(func=fail, takes_any_args=True)  # its real flags are unknown here; main() lets them through


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(ns, "takes_any_args", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(ns.func(ns) or 0)
    except ValueError as e:
        print(f"inferd: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # StoreError and friends: the message says what to do
        if type(e).__name__ != "StoreError":
            raise
        print(f"inferd: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
