"""Layer 6: the model table a user asks for, resolved to local paths and kinds.

    inferd serve --model smollm2-135m-instruct --model all-minilm-l6-v2
    inferd serve --model chat=./my-llama-dir --model ./bge-small
    inferd serve --models-file models.yaml
    inferd serve --model-repository ./triton-repo       # one tabular model per folder

A models file (YAML):

    models:
      - name: chat                       # the name clients send as `model` (default: source)
        source: smollm2-135m-instruct    # catalog name, local path, or a store source (hf:..., pypi:...)
        kind: generate                   # optional: generate | embed | tabular (default: inferred)
        options: {max_num_seqs: 32}      # per-model options: LLM engine flags, or embedding batching limits
      - source: all-minilm-l6-v2
        options: {max_batch_tokens: 8192}

Kind inference, first match wins: the catalog entry's task; a .gguf file -> generate; a .onnx / XGBoost / LightGBM
file or a Triton-style model folder -> tabular; a folder with sentence-transformers files (modules.json,
sentence_bert_config.json) or whose config.json names an encoder architecture -> embed; a causal-LM
config.json -> generate.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from inferd.serving import ModelKind, ModelSpec
from inferd.store.catalog import CATALOG
from inferd.store.pull import resolve_model

_SPEC_KEYS = ("name", "source", "kind", "options")
# config.json `architectures` of encoders served as embedding models (BERT family and its relatives).
_ENCODER_ARCHITECTURES = ("BertModel", "BertForMaskedLM", "XLMRobertaModel", "RobertaModel", "NewModel", "MPNetModel")
_TABULAR_SUFFIXES = (".onnx", ".ubj")


def parse_model_arg(text: str) -> tuple[str | None, str]:
    """'[NAME=]SOURCE' -> (NAME or None, SOURCE). A source may itself contain '=' only after a ':' scheme."""
    name, sep, source = text.partition("=")
    if sep and name and ":" not in name and "/" not in name and source:
        return name, source
    return None, text


def detect_kind(path: Path, *, catalog_task: str | None = None) -> ModelKind:
    """The kind of model at a resolved local path (see the module docstring for the order)."""
    if catalog_task is not None:
        return ModelKind.parse(catalog_task, "catalog task")
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelKind.GENERATE
        if path.suffix in _TABULAR_SUFFIXES or (path.suffix in (".json", ".txt") and _looks_like_tree_model(path)):
            return ModelKind.TABULAR
        raise ValueError(f"{path}: cannot tell the model kind from this file; give `kind` in a models file")
    if (path / "modules.json").is_file() or (path / "sentence_bert_config.json").is_file():
        return ModelKind.EMBED
    config_path = path / "config.json"
    if config_path.is_file():
        try:
            architectures = json.loads(config_path.read_text()).get("architectures") or []
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{config_path}: cannot read it ({exc})") from None
        if any(a in _ENCODER_ARCHITECTURES for a in architectures):
            return ModelKind.EMBED
        return ModelKind.GENERATE
    if any(path.glob("*.onnx")) or any(path.glob("*/model.onnx")) or (path / "config.pbtxt").is_file():
        return ModelKind.TABULAR
    raise ValueError(f"{path}: cannot tell the model kind (no config.json, modules.json, .gguf or .onnx)")


def _looks_like_tree_model(path: Path) -> bool:
    """An XGBoost JSON model or a LightGBM text model (read the first bytes only)."""
    with path.open("rb") as f:
        head = f.read(4096)
    return b'"learner"' in head or head.startswith(b"tree\n") or b"\nversion=v" in head[:200]


def resolve_spec(
    source: str, *, name: str | None = None, kind: str | ModelKind | None = None, options: Mapping[str, Any] | None = None
) -> ModelSpec:
    """A ModelSpec whose source is a local path and whose kind is known (pulling catalog models if needed)."""
    resolved = resolve_model(source)
    entry = CATALOG.get(source)
    if kind is None:
        resolved_kind = detect_kind(Path(resolved.path), catalog_task=entry.task if entry is not None else None)
    else:
        resolved_kind = kind if isinstance(kind, ModelKind) else ModelKind.parse(kind)
    options = dict(options or {})
    draft = options.get("speculative_model")
    if isinstance(draft, str) and not draft.startswith("self:"):  # a draft model's catalog name or path
        options["speculative_model"] = str(resolve_model(draft).path)
    return ModelSpec(name=name or source, source=str(resolved.path), kind=resolved_kind, options=options,
                     content_digest=resolved.sha256)


def load_models_file(path: str | Path) -> list[dict[str, Any]]:
    """The entries of a models file, checked for shape (every error names the entry and the key)."""
    import yaml

    try:
        document = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"models file {path}: cannot read it: {exc}") from None
    entries = document.get("models") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"models file {path}: expected a top-level `models:` list with at least one entry")
    checked = []
    for index, entry in enumerate(entries):
        where = f"models file {path}: models[{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a mapping with keys {list(_SPEC_KEYS)}")
        unknown = sorted(set(entry) - set(_SPEC_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known: {list(_SPEC_KEYS)}")
        if not isinstance(entry.get("source"), str) or not entry["source"]:
            raise ValueError(f"{where}.source: required, a catalog name or a path")
        if "options" in entry and not isinstance(entry["options"], dict):
            raise ValueError(f"{where}.options: expected a mapping")
        if "name" in entry and not isinstance(entry["name"], str):
            raise ValueError(f"{where}.name: expected a string")
        checked.append(entry)
    return checked


def repository_specs(repository: str | Path) -> list[ModelSpec]:
    """One tabular model per folder of a Triton-style model repository (`<repo>/<name>/<version>/model.onnx`, with
    an optional `<repo>/<name>/config.pbtxt`), named by its folder, in name order."""
    root = Path(repository).expanduser()
    if not root.is_dir():
        raise ValueError(f"model repository {repository}: not a folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"model repository {repository}: holds no model folders (<repo>/<name>/<version>/model.onnx)")
    return [ModelSpec(name=p.name, source=str(p.resolve()), kind=ModelKind.TABULAR) for p in folders]


def resolve_model_table(
    model_args: Sequence[str] = (),
    *,
    models_file: str | Path | None = None,
    model_repository: str | Path | None = None,
    kind: str | None = None,
    served_model_name: str | None = None,
) -> list[ModelSpec]:
    """Every model `inferd serve` should load, in order: the --model flags, the models file's entries, then the
    folders of a model repository.

    `kind` and `served_model_name` (the single-model flags --kind / --served-model-name) apply only when exactly
    one model is given.
    """
    requests: list[dict[str, Any]] = []
    for text in model_args:
        name, source = parse_model_arg(text)
        requests.append({"name": name, "source": source})
    if models_file is not None:
        requests.extend(load_models_file(models_file))
    extra_specs = repository_specs(model_repository) if model_repository is not None else []
    if not requests and not extra_specs:
        raise ValueError("no model to serve: give --model (repeatable), --models-file or --model-repository")
    if len(requests) > 1 and (kind is not None or served_model_name is not None):
        raise ValueError("--kind and --served-model-name apply to a single model; use NAME=SOURCE or a models file")
    if kind is not None:
        requests[0]["kind"] = kind
    if served_model_name is not None:
        requests[0]["name"] = served_model_name
    specs: list[ModelSpec] = []
    for request in requests:
        spec = resolve_spec(request["source"], name=request.get("name"), kind=request.get("kind"),
                            options=request.get("options"))
        if any(s.name == spec.name for s in specs):
            raise ValueError(f"model name {spec.name!r} is given twice; names must be unique (use NAME=SOURCE)")
        specs.append(spec)
    for spec in extra_specs:
        if any(s.name == spec.name for s in specs):
            raise ValueError(f"model name {spec.name!r} is given twice; names must be unique (use NAME=SOURCE)")
        specs.append(spec)
    return specs
