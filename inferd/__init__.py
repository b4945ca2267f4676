"""inferd: one inference server for LLMs, embedding models and tabular models.

The package root is the public facade, above every layer of ARCHITECTURE.md: `LLM` (inferd/api.py) is loaded on
first use only, so `import inferd` stays light for the bench tool, which must run without torch.
"""

import importlib

from inferd.request import CompletionOutput, RequestOutput, SamplingParams

__all__ = ["LLM", "Embedder", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"

_LAZY = {"LLM": "inferd.api", "Embedder": "inferd.api"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(name)
    return getattr(importlib.import_module(module), name)
