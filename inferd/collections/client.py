"""A Python client for the collections API of a running `inferd serve` (over httpx).

    client = CollectionsClient("http://127.0.0.1:8000", api_key=None)   # api_key defaults to $INFERD_API_KEY
    client.create("docs", model="all-minilm-l6-v2")           # or dimension=384 for raw vectors; metric="cosine"
    client.upsert("docs", [{"id": "a", "text": "...", "metadata": {"lang": "en"}}])
    client.load_jsonl("docs", "items.jsonl")                  # one item per line, batched, with a progress bar
    client.query("docs", text="...", k=5, filter={"lang": "en"}) -> [{"id", "score", "metadata"}, ...]
    client.query("docs", id="a", k=5)                          # more like this (leaves "a" out)

Numpy vectors travel as base64 float32 (exact, and far cheaper to parse than JSON numbers); lists as JSON numbers.
Errors from the server raise `CollectionsAPIError(status_code, message, param)`.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np

DEFAULT_URL = "http://127.0.0.1:8000"
# Items per request when loading a file: ~1.5 MiB of JSON at 384-d vectors, under the server's 4 MiB default.
DEFAULT_BATCH_SIZE = 200


class CollectionsAPIError(RuntimeError):
    def __init__(self, status_code: int, message: str, param: str | None = None) -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code = status_code
        self.message = message
        self.param = param


class CollectionsClient:
    def __init__(self, base_url: str | None = None, *, api_key: str | None = None, timeout_s: float = 120.0) -> None:
        api_key = api_key if api_key is not None else os.environ.get("INFERD_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url or os.environ.get("INFERD_URL") or DEFAULT_URL,
                                  headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CollectionsClient:
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        response = self._http.request(method, path, json=body)
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                message, param = error.get("message", response.text), error.get("param")
            except (ValueError, KeyError, TypeError):
                message, param = response.text, None
            raise CollectionsAPIError(response.status_code, message, param)
        return response.json()

    @staticmethod
    def _path(name: str, *rest: str) -> str:
        return "/".join(["/v1/collections", quote(name, safe=""), *(quote(r, safe="") for r in rest)])

    # -------------------------------------------------------------------------------------------- collections
    def create(self, name: str, *, model: str | None = None, dimension: int | None = None,
               metric: str = "cosine") -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "metric": metric}
        if model is not None:
            body["model"] = model
        if dimension is not None:
            body["dimension"] = dimension
        return self._request("POST", "/v1/collections", body)

    def list(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/collections")["data"]

    def describe(self, name: str) -> dict[str, Any]:
        return self._request("GET", self._path(name))

    def delete(self, name: str) -> dict[str, Any]:
        return self._request("DELETE", self._path(name))

    # -------------------------------------------------------------------------------------------- items
    def upsert(self, name: str, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """items: {"id", "text" | "vector", "metadata"} each; vectors may be numpy arrays."""
        payload = [{**item, "vector": _as_list(item["vector"])} if "vector" in item else dict(item) for item in items]
        return self._request("POST", self._path(name, "items"), {"items": payload})

    def get(self, name: str, item_id: str) -> dict[str, Any]:
        return self._request("GET", self._path(name, "items", item_id))

    def delete_item(self, name: str, item_id: str) -> dict[str, Any]:
        return self._request("DELETE", self._path(name, "items", item_id))

    def query(self, name: str, *, text: str | None = None, vector: Any = None, id: str | None = None, k: int = 10,
              filter: Mapping[str, Any] | None = None, exclude: Sequence[str] | None = None) -> list[dict[str, Any]]:
        body: dict[str, Any] = {"k": k}
        if text is not None:
            body["text"] = text
        if vector is not None:
            body["vector"] = _as_list(vector)
        if id is not None:
            body["id"] = id
        if filter is not None:
            body["filter"] = dict(filter)
        if exclude:
            body["exclude"] = list(exclude)
        return self._request("POST", self._path(name, "query"), body)["results"]

    def load_jsonl(self, name: str, path: str | Path, *, batch_size: int = DEFAULT_BATCH_SIZE,
                   progress: bool = True) -> int:
        """Upsert every line of a JSONL file ({"id", "text" | "vector", "metadata"}) in batches; returns the count."""
        path = Path(path)
        total_lines = sum(1 for line in path.open() if line.strip()) if progress else None
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total_lines, unit="item", desc=f"loading {path.name} into {name}")
        num_loaded = 0
        try:
            for batch in _batches(_read_jsonl(path), batch_size):
                self.upsert(name, batch)
                num_loaded += len(batch)
                if bar is not None:
                    bar.update(len(batch))
        finally:
            if bar is not None:
                bar.close()
        return num_loaded


def _as_list(vector: Any) -> list[float] | str:
    """A numpy vector as base64 of little-endian float32; anything else as a list of numbers."""
    if isinstance(vector, np.ndarray):
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return list(vector)


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open() as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({e})") from None
            if not isinstance(item, dict) or "id" not in item:
                raise ValueError(f"{path}:{line_number}: each line must be an object with an \"id\"")
            yield item


def _batches(items: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
