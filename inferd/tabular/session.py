"""The one module that imports onnxruntime (lazily: importing inferd.tabular costs nothing without it).

    session = OnnxSession(model_bytes, device="auto", intra_op_threads=1)
    session.inputs / session.outputs     -> [GraphTensor(name, datatype, shape)]
    session.run(["probabilities"], {"input": x})  -> [np.ndarray]; thread-safe (onnxruntime's Run is)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from inferd.tabular.config import GraphTensor
from inferd.tabular.datatypes import ort_type_to_oip

DEVICES = ("auto", "cpu", "cuda")


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("tabular models need onnxruntime: pip install 'inferd[tabular]'") from exc
    return onnxruntime


def available_providers() -> list[str]:
    return list(_ort().get_available_providers())


def _graph_tensor(node_arg: Any) -> GraphTensor:
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in (node_arg.shape or ()))
    return GraphTensor(node_arg.name, ort_type_to_oip(node_arg.type), shape)


class OnnxSession:
    def __init__(self, model: bytes | str, *, device: str = "auto", intra_op_threads: int = 0, inter_op_threads: int = 0) -> None:
        if device not in DEVICES:
            raise ValueError(f"device must be one of {list(DEVICES)}, got {device!r}")
        ort = _ort()
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: tree converters' made-up output shapes warn on every run
        if intra_op_threads > 0:
            options.intra_op_num_threads = intra_op_threads
        if inter_op_threads > 0:
            options.inter_op_num_threads = inter_op_threads
        available = ort.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise ValueError(f"device 'cuda' needs onnxruntime's CUDAExecutionProvider; this onnxruntime has {available}")
        providers = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        try:
            self._session = ort.InferenceSession(model, sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ValueError(f"onnxruntime cannot load the model: {exc}") from exc
        self.providers: list[str] = list(self._session.get_providers())
        self.inputs = [_graph_tensor(a) for a in self._session.get_inputs()]
        self.outputs = [_graph_tensor(a) for a in self._session.get_outputs()]
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 3

    def run(self, output_names: Sequence[str], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self._session.run(list(output_names), dict(feeds), self._run_options)
