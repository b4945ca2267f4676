"""Layer 4: tabular models (ONNX through onnxruntime; XGBoost / LightGBM files converted at load) behind dynamic
batching. onnxruntime is imported by `session.py` only, and only when a model loads."""

from inferd.tabular.config import ModelConfig, TensorConfig, config_from_pbtxt
from inferd.tabular.engine import InferResult, TabularEngine
from inferd.tabular.repository import list_repository, read_model_directory
from inferd.tabular.tensors import TensorError, decode_tensor, encode_tensor

__all__ = [
    "InferResult",
    "ModelConfig",
    "TabularEngine",
    "TensorConfig",
    "TensorError",
    "config_from_pbtxt",
    "decode_tensor",
    "encode_tensor",
    "list_repository",
    "read_model_directory",
]
