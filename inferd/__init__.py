"""inferd: one inference server for LLMs, embedding models and tabular models."""

from inferd.request import CompletionOutput, RequestOutput, SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch; keep `import inferd` light for the bench tool, which must run without torch.
    if name == "LLM":
        from inferd.engine.llm import LLM

        return LLM
    raise AttributeError(name)
