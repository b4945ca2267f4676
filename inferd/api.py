"""Layer 6: the Python API users import (`from inferd import LLM, Embedder`): names resolved through the store.

The engines (layer 4) take local paths only; these thin classes turn a catalog name (pulled on first use), a
store source or a path into one, so `LLM("smollm2-135m-instruct")` works as it reads.
"""

from __future__ import annotations

from inferd.config import DEFAULT_MODEL
from inferd.embeddings.embedder import Embedder as _PathEmbedder
from inferd.engine.llm import LLM as _PathLLM
from inferd.store import resolve_model

DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"


class LLM(_PathLLM):
    """Offline generation: `LLM(model=NAME_OR_PATH, **engine_args)`; see inferd.engine.llm for the methods."""

    def __init__(self, model: str | None = None, **engine_args) -> None:
        name = model or DEFAULT_MODEL
        if engine_args.get("served_model_name") is None:
            engine_args["served_model_name"] = name
        engine_args["speculative_model"] = resolve_speculative_model(engine_args.get("speculative_model"))
        super().__init__(str(resolve_model(name).path), **engine_args)


def resolve_speculative_model(name_or_path: str | None) -> str | None:
    """A draft model's catalog name or path -> its local path; "self:K" and None pass through."""
    if name_or_path is None or str(name_or_path).startswith("self:"):
        return name_or_path
    try:
        return str(resolve_model(name_or_path).path)
    except ValueError as exc:
        raise ValueError(f"speculative_model: {exc}") from exc


class Embedder(_PathEmbedder):
    """Offline embeddings: `Embedder(model=NAME_OR_PATH).embed(texts)` -> float32 [n, dim]; see
    inferd.embeddings.embedder for the options."""

    def __init__(self, model: str | None = None, **options) -> None:
        super().__init__(str(resolve_model(model or DEFAULT_EMBEDDING_MODEL).path), **options)
