"""Layer 6: the Python API users import (`from inferd import LLM`): names resolved through the model store.

The engines (layer 4) take local paths only; these thin classes turn a catalog name (pulled on first use), a
store source or a path into one, so `LLM("smollm2-135m-instruct")` works as it reads.
"""

from __future__ import annotations

from inferd.config import DEFAULT_MODEL
from inferd.engine.llm import LLM as _PathLLM
from inferd.store import resolve_model


class LLM(_PathLLM):
    """Offline generation: `LLM(model=NAME_OR_PATH, **engine_args)`; see inferd.engine.llm for the methods."""

    def __init__(self, model: str | None = None, **engine_args) -> None:
        name = model or DEFAULT_MODEL
        if engine_args.get("served_model_name") is None:
            engine_args["served_model_name"] = name
        super().__init__(str(resolve_model(name).path), **engine_args)
