"""Prepared weights (models/prepared.py): the second load of a model maps the state written by the first, and the
mapped model is the source-built one: every tensor bitwise equal, the same greedy tokens. A torn prepared file is
ignored and rewritten. The reference is the default GGUF loaded from its source without a prepared directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inferd.engine.llm import LLM
from inferd.models import load_model, read_model_arch_config
from inferd.request import SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):"]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach() for name, t in model.state_dict().items()}


@pytest.fixture(autouse=True)
def cpu_kernels() -> None:
    from inferd.kernels import cpu_kernels_available, kernel_build_error

    assert cpu_kernels_available(), kernel_build_error()  # `gguf` keeps Q4 blocks in the kernels' layout


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prepared")


@pytest.fixture(scope="module")
def source_state(default_gguf_path: Path) -> dict[str, torch.Tensor]:
    from inferd.kernels import cpu_kernels_available

    assert cpu_kernels_available()
    return _state(load_model(str(default_gguf_path), "cpu", "float32", "gguf")[0])


def test_prepared_load_equals_the_source_load(default_gguf_path: Path, prepared_dir: Path, source_state) -> None:
    source_config = read_model_arch_config(str(default_gguf_path))
    first_model, _ = load_model(str(default_gguf_path), "cpu", "float32", "gguf", prepared_dir=str(prepared_dir))
    (prepared_file,) = prepared_dir.glob("*.pt")
    mapped_model, mapped_config = load_model(str(default_gguf_path), "cpu", "float32", "gguf",
                                             prepared_dir=str(prepared_dir))
    assert mapped_config == source_config
    reference = source_state
    for model in (first_model, mapped_model):
        state = _state(model)
        assert state.keys() == reference.keys()
        for name, tensor in reference.items():
            assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    # The mapped tensors are pages of the prepared file, not copies (Linux: the file shows in the process's maps).
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(prepared_file) in maps.read_text()


def test_prepared_engine_generates_the_source_tokens(default_gguf_path: Path, prepared_dir: Path) -> None:
    params = SamplingParams(max_tokens=16, temperature=0.0)
    common = {"kv_cache_memory": "64MiB", "max_model_len": 256}
    reference = [o.outputs[0].token_ids for o in LLM(str(default_gguf_path), **common).generate(PROMPTS, params)]
    LLM(str(default_gguf_path), prepared_weights_dir=str(prepared_dir), **common)  # writes the file if not there
    mapped = LLM(str(default_gguf_path), prepared_weights_dir=str(prepared_dir), **common)
    assert [o.outputs[0].token_ids for o in mapped.generate(PROMPTS, params)] == reference


def test_a_torn_prepared_file_is_rebuilt(default_gguf_path: Path, tmp_path: Path, source_state) -> None:
    prepared_dir = tmp_path  # its own directory: the engine test above also wrote auto's (gguf-int8act) file
    load_model(str(default_gguf_path), "cpu", "float32", "gguf", prepared_dir=str(prepared_dir))
    (prepared_file,) = prepared_dir.glob("*.pt")
    size = prepared_file.stat().st_size
    with prepared_file.open("r+b") as f:
        f.truncate(size // 2)  # a write cut short
    model, _ = load_model(str(default_gguf_path), "cpu", "float32", "gguf", prepared_dir=str(prepared_dir))
    assert prepared_file.stat().st_size == size
    assert all(torch.equal(t, source_state[n]) for n, t in _state(model).items())
