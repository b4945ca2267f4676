"""The model table a user asks for (inferd/store/model_specs.py): names, sources, kinds, models files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inferd.serving import ModelKind
from inferd.store.model_specs import detect_kind, load_models_file, parse_model_arg, resolve_model_table


def test_parse_model_arg_splits_an_optional_name():
    assert parse_model_arg("chat=smollm2-135m-instruct") == ("chat", "smollm2-135m-instruct")
    assert parse_model_arg("smollm2-135m-instruct") == (None, "smollm2-135m-instruct")
    assert parse_model_arg("/models/a=b") == (None, "/models/a=b")  # a path with '=' is a source
    assert parse_model_arg("hf:org/repo@rev") == (None, "hf:org/repo@rev")


def test_the_two_defaults_resolve_to_their_kinds(default_gguf_path: Path, embedding_model_dir: Path):
    specs = resolve_model_table(["smollm2-135m-instruct", "minilm=all-minilm-l6-v2"])
    assert [(s.name, s.kind) for s in specs] == [("smollm2-135m-instruct", ModelKind.GENERATE), ("minilm", ModelKind.EMBED)]
    assert Path(specs[0].source) == default_gguf_path
    assert Path(specs[1].source) == embedding_model_dir
    # Without the catalog: the files say it too.
    assert detect_kind(default_gguf_path) is ModelKind.GENERATE
    assert detect_kind(embedding_model_dir) is ModelKind.EMBED


def test_kind_from_config_json_architectures(tmp_path: Path):
    import transformers
    bert = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, architectures=["BertModel"])
    llama = transformers.LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, architectures=["LlamaForCausalLM"])
    for name, config in (("bert", bert), ("llama", llama)):
        (tmp_path / name).mkdir()
        config.save_pretrained(tmp_path / name)
    assert detect_kind(tmp_path / "bert") is ModelKind.EMBED
    assert detect_kind(tmp_path / "llama") is ModelKind.GENERATE
    (tmp_path / "fraud.onnx").write_bytes(b"")
    assert detect_kind(tmp_path / "fraud.onnx") is ModelKind.TABULAR
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot tell the model kind"):
        detect_kind(tmp_path / "empty")


def test_models_file_entries_options_and_kind_override(tmp_path: Path, default_gguf_path: Path, embedding_model_dir: Path):
    models_file = tmp_path / "models.yaml"
    models_file.write_text(
        "models:\n"
        "  - name: chat\n"
        "    source: smollm2-135m-instruct\n"
        "    options: {max_num_seqs: 8}\n"
        f"  - source: {embedding_model_dir}\n"
        "    kind: embed\n"
        "    options: {max_batch_tokens: 4096}\n"
    )
    specs = resolve_model_table(["other=smollm2-135m-instruct"], models_file=models_file)
    assert [s.name for s in specs] == ["other", "chat", str(embedding_model_dir)]
    assert [s.kind for s in specs] == [ModelKind.GENERATE, ModelKind.GENERATE, ModelKind.EMBED]
    assert specs[1].options == {"max_num_seqs": 8} and specs[2].options == {"max_batch_tokens": 4096}
    assert specs[0].options == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models: []\n", "at least one entry"),
        ("models:\n  - {source: a, colour: red}\n", r"models\[0\]: unknown key\(s\) \['colour'\]"),
        ("models:\n  - {name: x}\n", r"models\[0\]\.source: required"),
        ("models:\n  - {source: a, options: [1]}\n", r"models\[0\]\.options: expected a mapping"),
        ("models: {\n", "cannot read it"),
    ],
)
def test_models_file_errors_name_the_entry_and_key(tmp_path: Path, text: str, message: str):
    path = tmp_path / "models.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_models_file(path)


def test_table_errors(default_gguf_path: Path):
    with pytest.raises(ValueError, match="given twice"):
        resolve_model_table(["smollm2-135m-instruct", "smollm2-135m-instruct"])
    with pytest.raises(ValueError, match="apply to a single model"):
        resolve_model_table(["a=smollm2-135m-instruct", "b=smollm2-135m-instruct"], kind="generate")
    with pytest.raises(ValueError, match="kind must be one of"):
        resolve_model_table(["smollm2-135m-instruct"], kind="vision")
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        resolve_model_table(["no-such-model"])
    with pytest.raises(ValueError, match="no model to serve"):
        resolve_model_table([])


def test_a_model_repository_gives_one_tabular_model_per_folder(tmp_path: Path, default_gguf_path: Path):
    for name in ("fraud", "churn"):
        (tmp_path / "repo" / name / "1").mkdir(parents=True)
    specs = resolve_model_table(["smollm2-135m-instruct"], model_repository=tmp_path / "repo")
    assert [(s.name, s.kind) for s in specs] == [
        ("smollm2-135m-instruct", ModelKind.GENERATE), ("churn", ModelKind.TABULAR), ("fraud", ModelKind.TABULAR)
    ]
    assert specs[2].source == str((tmp_path / "repo" / "fraud").resolve())
    with pytest.raises(ValueError, match="holds no model folders"):
        resolve_model_table([], model_repository=tmp_path / "repo" / "fraud" / "1")
