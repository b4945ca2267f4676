"""Triton's model repository layout, read without loading anything:

    <repo>/<name>/config.pbtxt            optional (derived from the ONNX graph when absent)
    <repo>/<name>/<version>/model.onnx    or model.json / model.ubj (XGBoost), model.txt (LightGBM); a config's
                                          default_model_filename names another file

A model path given alone may also be a version directory or a single model file (served as version 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from inferd.tabular.config import ModelConfig, config_from_pbtxt

CONFIG_FILENAME = "config.pbtxt"
# Tried in this order when the config names no file (or names model.onnx and it is absent).
MODEL_FILENAMES = ("model.onnx", "model.json", "model.ubj", "model.txt", "xgboost.json", "xgboost.ubj", "lightgbm.txt")
MODEL_SUFFIXES = (".onnx", ".json", ".ubj", ".txt")


@dataclass(frozen=True)
class ModelDirectory:
    name: str
    config: ModelConfig | None  # from config.pbtxt; None -> derive from the graph
    version_paths: dict[int, Path]  # every version found on disk -> its model file


def _model_file(version_dir: Path, config: ModelConfig | None) -> Path | None:
    names = list(MODEL_FILENAMES)
    if config is not None:
        names.insert(0, config.default_model_filename)
    for filename in names:
        candidate = version_dir / filename
        if candidate.is_file():
            return candidate
    return None


def is_model_directory(path: Path) -> bool:
    """A directory with numeric version subdirectories (or a config.pbtxt)."""
    if not path.is_dir():
        return False
    return (path / CONFIG_FILENAME).is_file() or any(p.is_dir() and p.name.isdigit() for p in path.iterdir())


def read_model_directory(path: str | Path) -> ModelDirectory:
    """Read a model path: a Triton model directory, a version directory, or one model file."""
    path = Path(path)
    if path.is_file():
        if path.suffix not in MODEL_SUFFIXES:
            raise ValueError(f"{path}: a tabular model file ends with one of {list(MODEL_SUFFIXES)}")
        return ModelDirectory(path.stem, None, {1: path})
    if not path.is_dir():
        raise ValueError(f"{path}: no such model file or directory")
    if not is_model_directory(path):
        model_file = _model_file(path, None)
        if model_file is None:
            raise ValueError(f"{path}: no version directories and none of {list(MODEL_FILENAMES)}")
        return ModelDirectory(path.name, None, {1: model_file})
    config = None
    config_path = path / CONFIG_FILENAME
    if config_path.is_file():
        config = config_from_pbtxt(config_path.read_text(), model_name=path.name, where=str(config_path))
    version_paths: dict[int, Path] = {}
    for version_dir in sorted(p for p in path.iterdir() if p.is_dir() and p.name.isdigit()):
        model_file = _model_file(version_dir, config)
        if model_file is not None:
            version_paths[int(version_dir.name)] = model_file
    if not version_paths:
        raise ValueError(f"{path}: no version directory holds a model file ({list(MODEL_FILENAMES)})")
    return ModelDirectory(path.name, config, version_paths)


def list_repository(repo: str | Path) -> dict[str, Path]:
    """Model name -> model directory for every model directory directly under `repo` (sorted by name)."""
    repo = Path(repo)
    if not repo.is_dir():
        raise ValueError(f"model repository {str(repo)!r} is not a directory")
    return {p.name: p for p in sorted(repo.iterdir()) if not p.name.startswith(".") and is_model_directory(p)}
