"""`inferd collections ...`: the collections API of a running server, from the shell (cli.py wires it).

    inferd collections create NAME (--model EMBED_MODEL | --dimension N) [--metric cosine|dot|l2]
    inferd collections load NAME FILE.jsonl [--batch-size 200]        one {"id", "text"|"vector", "metadata"} a line
    inferd collections query NAME (--text T | --vector JSON | --id ID) [-k 10] [--filter JSON] [--exclude ID ...]
    inferd collections list
    inferd collections delete NAME

Every verb takes --url (default $INFERD_URL or http://127.0.0.1:8000) and --api-key (default $INFERD_API_KEY),
and prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys


def _client(ns: argparse.Namespace):
    from inferd.collections.client import CollectionsClient

    return CollectionsClient(ns.url, api_key=ns.api_key)


def _run(ns: argparse.Namespace) -> int:
    from inferd.collections.client import CollectionsAPIError

    try:
        with _client(ns) as client:
            out = ns.action(client, ns)
    except CollectionsAPIError as e:
        print(f"inferd: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # connection refused, file not found
        print(f"inferd: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2))
    return 0


def _json_arg(text: str | None, flag: str):
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} must be JSON: {e}") from None


def _create(client, ns):
    if (ns.model is None) == (ns.dimension is None):
        raise ValueError("give exactly one of --model and --dimension")
    return client.create(ns.name, model=ns.model, dimension=ns.dimension, metric=ns.metric)


def _load(client, ns):
    num_items = client.load_jsonl(ns.name, ns.file, batch_size=ns.batch_size, progress=not ns.quiet)
    return {"loaded": num_items, "collection": client.describe(ns.name)}


def _query(client, ns):
    given = [x for x in (ns.text, ns.vector, ns.id) if x is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of --text, --vector and --id")
    return client.query(ns.name, text=ns.text, vector=_json_arg(ns.vector, "--vector"), id=ns.id, k=ns.k,
                        filter=_json_arg(ns.filter, "--filter"), exclude=ns.exclude)


def add_collections_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("collections", help="vector collections on a running server: create, load, query, ...")
    verbs = p.add_subparsers(dest="verb", required=True)

    def verb(name: str, help: str, action) -> argparse.ArgumentParser:
        v = verbs.add_parser(name, help=help)
        v.add_argument("--url", default=None, help="server base URL (default $INFERD_URL or http://127.0.0.1:8000)")
        v.add_argument("--api-key", default=None, help="default $INFERD_API_KEY")
        v.set_defaults(func=_run, action=action)
        return v

    v = verb("create", "create a collection", _create)
    v.add_argument("name")
    v.add_argument("--model", default=None, help="embedding model served by the server (text items and queries)")
    v.add_argument("--dimension", type=int, default=None, help="vector dimension (raw-vector collection)")
    v.add_argument("--metric", default="cosine", choices=["cosine", "dot", "l2"])
    v = verb("load", "upsert every line of a JSONL file, with a progress bar", _load)
    v.add_argument("name")
    v.add_argument("file")
    v.add_argument("--batch-size", type=int, default=200, help="items per request")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v = verb("query", "the k most similar items", _query)
    v.add_argument("name")
    v.add_argument("--text", default=None)
    v.add_argument("--vector", default=None, help="a JSON list of numbers")
    v.add_argument("--id", default=None, help="more like this item (leaves it out)")
    v.add_argument("-k", type=int, default=10)
    v.add_argument("--filter", default=None, help='JSON, e.g. \'{"genre": {"$in": ["jazz", "blues"]}}\'')
    v.add_argument("--exclude", nargs="*", default=None, help="item ids to leave out")
    verb("list", "list collections", lambda client, ns: client.list())
    v = verb("delete", "delete a collection and its items", lambda client, ns: client.delete(ns.name))
    v.add_argument("name")
