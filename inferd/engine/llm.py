"""Layer 4: the offline Python API over a local model path (`inferd.LLM`, in inferd/api.py, resolves catalog
names through the model store first and is what users import).

    from inferd import LLM, SamplingParams
    llm = LLM(model="smollm2-135m-instruct")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
    print(outs[0].outputs[0].text)
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence

from tqdm import tqdm

from inferd.config import EngineArgs
from inferd.engine.llm_engine import LLMEngine
from inferd.request import RequestOutput, SamplingParams


class RequestFailedError(RuntimeError):
    """Some prompts of a generate() call failed on their own data; `failures` maps their request ids to why, and
    `outputs` holds every prompt's output in input order (None for the failed ones)."""

    def __init__(self, failures: dict[str, str], outputs: list) -> None:
        super().__init__(f"{len(failures)} request(s) failed: " + "; ".join(f"{k}: {v}" for k, v in failures.items()))
        self.failures = failures
        self.outputs = outputs


class LLM:
    def __init__(self, model: str, **engine_args) -> None:
        """`model`: a local .gguf file or Hugging Face folder."""
        unknown = set(engine_args) - EngineArgs.field_names()
        if unknown:
            raise TypeError(f"unknown engine arguments {sorted(unknown)}; supported: {sorted(EngineArgs.field_names())}")
        self.engine = LLMEngine.from_engine_args(EngineArgs(model=model, **engine_args))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[list[int]] | list[int],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Run every prompt to completion with continuous batching; outputs come back in input order.

        `prompts` is a string, a list of strings, one token-id list, or a list of token-id lists.
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"sampling_params has {len(params_list)} entries for {len(prompts)} prompts; pass one or one per prompt"
                )
        # Validate every prompt before any is queued, so a bad one does not leave the others half-run.
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        added: list[str] = []
        try:
            for rid, prompt, params in zip(ids, prompts, params_list):
                self.engine.add_request(rid, prompt, params)
                added.append(rid)
        except Exception:
            for rid in added:
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.engine.tokenizer.encode_chat(conv, add_generation_prompt=add_generation_prompt)
                   for conv in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        pending = set(ids)
        bar = tqdm(total=len(ids), desc="generate", file=sys.stderr, disable=not use_tqdm)
        failed: dict[str, str] = {}
        while pending:
            for out in self.engine.step():
                if out.finished and out.request_id in pending:
                    final[out.request_id] = out
                    pending.discard(out.request_id)
                    bar.update(1)
            for rid, message in self.engine.pop_failed_requests():
                if rid in pending:  # the others run to the end first
                    failed[rid] = message
                    pending.discard(rid)
        bar.close()
        if failed:
            raise RequestFailedError(failed, [final.get(rid) for rid in ids])
        return [final[rid] for rid in ids]
