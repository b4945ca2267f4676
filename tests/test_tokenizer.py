"""Tokenizer and chat template against Hugging Face transformers on the same files.

References: transformers' AutoTokenizer (ids, decode, special ids, apply_chat_template) for the real default GGUF,
tiny GGUFs written with the `gguf` package, tiny transformers directories and the all-MiniLM-L6-v2 folder;
gguf.GGUFReader for our metadata reader.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from transformers import AutoTokenizer

from inferd.engine.chat_template import ChatTemplateError
from inferd.engine.tokenizer import (
    SUPPORTED_GGUF_PRE_TOKENIZERS,
    Tokenizer,
    read_gguf_metadata,
)

CORPUS = [
    "Hello, world!",
    "12345 and 3.14",
    "Numbers 1 22 333 4444 55555 and -7.5e10, 0x1F.",
    "😀 emoji 🎉 👍🏽 ❤️ 🇫🇷 and 中文字符，日本語のテキスト and Ünïcödé àccents",
    "def f(x):\n    return x ** 2  # square\n\n\tif x > 0: pass\n",
    "a  b   c    d     e\t\tf\n\n\ng   \n  ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text <|im_end|>",
    "I'm sure you've seen it; they'll say we'd won't can't.",
    " leading space",
    "trailing space ",
    "",
    "\n",
    "<|im_start",  # not a whole special token
    "https://example.com/path?query=1&b=2#frag",
    '{"key": [1, 2, {"nested": null}]}',
]

# Whitespace followed by a digit: where SmolLM's digit-splitting pre-tokenizer differs from a plain GPT-2 split.
WHITESPACE_DIGIT_TEXTS = ["   1", "x   12", "a\n\n 3", "\t\t2", "Total:    42 items", "line\n  7\n   88"]

CONVERSATIONS = {
    "one_user_turn": [{"role": "user", "content": "Hi there!"}],
    "with_system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a color."},
    ],
    "multi_turn": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3? 😀 中文"},
    ],
    "system_multi_turn": [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "Thanks\n\nbye"},
    ],
}


def _hf_chat_ids(hf_tokenizer, messages, **kwargs) -> list[int]:
    ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    return list(ids)


# ------------------------------------------------------------------------------------------------ GGUF metadata
def test_gguf_metadata_reader_matches_gguf_reader(default_gguf_path: Path) -> None:
    from gguf import GGUFReader

    fields = GGUFReader(str(default_gguf_path)).fields
    reference = {k: f.contents() for k, f in fields.items() if not k.startswith("GGUF.")}  # GGUF.*: header, not KV
    ours = read_gguf_metadata(default_gguf_path)
    assert ours.keys() == reference.keys()
    for key, value in reference.items():
        assert ours[key] == value, key


# ------------------------------------------------------------------------------------------------ default model
@pytest.mark.parametrize("text", CORPUS)
def test_default_model_ids_match_transformers(default_tokenizer, hf_default_tokenizer, text: str) -> None:
    for add_special_tokens in (True, False):
        expected = hf_default_tokenizer(text, add_special_tokens=add_special_tokens).input_ids
        assert default_tokenizer.encode(text, add_special_tokens=add_special_tokens) == expected
    ids = default_tokenizer.encode(text)
    for skip in (True, False):
        assert default_tokenizer.decode(ids, skip_special_tokens=skip) == hf_default_tokenizer.decode(
            ids, skip_special_tokens=skip
        )
    assert default_tokenizer.decode(ids, skip_special_tokens=False) == text  # byte-level BPE round-trips exactly


def test_long_text_ids_match_transformers(default_tokenizer, hf_default_tokenizer) -> None:
    """Texts past 16k characters take encode_batch (it releases the GIL); the ids must not change."""
    text = "<|im_start|>user\nWhat is 12 * 7? Answer: 84.<|im_end|>\n" * 600 + " ".join(CORPUS) * 20
    assert len(text) > 16 * 1024
    for add_special_tokens in (True, False):
        expected = hf_default_tokenizer(text, add_special_tokens=add_special_tokens).input_ids
        assert default_tokenizer.encode(text, add_special_tokens=add_special_tokens) == expected


def test_default_model_digit_split_follows_smollm_pre_tokenizer(default_tokenizer, hf_default_tokenizer) -> None:
    """GGUF `tokenizer.ggml.pre = smollm` means SmolLM2's own tokenizer.json pre-tokenizer: Digits(individual)
    then ByteLevel (llama.cpp splits the same way). transformers' GGUF conversion uses the plain GPT-2 split for
    this name, which cuts whitespace runs before a digit differently; the reference here is transformers'
    vocabulary and merges with the pre-tokenizer from SmolLM2-135M-Instruct/tokenizer.json."""
    reference = BackendTokenizer.from_str(hf_default_tokenizer.backend_tokenizer.to_str())
    reference.pre_tokenizer = BackendTokenizer.from_str(
        json.dumps(
            {
                **json.loads(reference.to_str()),
                "pre_tokenizer": {
                    "type": "Sequence",
                    "pretokenizers": [
                        {"type": "Digits", "individual_digits": True},
                        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
                    ],
                },
            }
        )
    ).pre_tokenizer
    for text in WHITESPACE_DIGIT_TEXTS + CORPUS:
        ids = default_tokenizer.encode(text)
        assert ids == reference.encode(text).ids, text
        assert default_tokenizer.decode(ids, skip_special_tokens=False) == text


def test_default_model_special_ids_match_transformers(default_tokenizer, hf_default_tokenizer) -> None:
    ref = hf_default_tokenizer
    assert default_tokenizer.vocab_size == len(ref)
    assert default_tokenizer.bos_token_id == ref.bos_token_id
    assert default_tokenizer.eos_token_id == ref.eos_token_id
    assert default_tokenizer.pad_token_id == ref.pad_token_id
    assert default_tokenizer.eos_token_ids == {ref.eos_token_id}
    assert set(ref.all_special_ids) <= set(default_tokenizer.all_special_ids)
    # all_special_ids is exactly what decode(skip_special_tokens=True) drops.
    dropped = {i for i in range(len(ref)) if ref.decode([i], skip_special_tokens=True) == ""}
    assert set(default_tokenizer.all_special_ids) == dropped
    ids = list(range(0, len(ref), 97))
    assert default_tokenizer.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_default_model_chat_template_matches_transformers(
    default_tokenizer, hf_default_tokenizer, name: str, add_generation_prompt: bool
) -> None:
    messages = CONVERSATIONS[name]
    expected = hf_default_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert default_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    assert default_tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt) == _hf_chat_ids(
        hf_default_tokenizer, messages, add_generation_prompt=add_generation_prompt
    )


def test_default_model_chat_template_source(default_tokenizer, default_gguf_path: Path) -> None:
    assert default_tokenizer.chat_template == read_gguf_metadata(default_gguf_path)["tokenizer.chat_template"]


# ------------------------------------------------------------------------------------------------ tiny GGUF files
@pytest.mark.parametrize(
    ("model", "pre", "arch", "add_bos"),
    [
        ("gpt2", "default", "llama", False),
        ("gpt2", "gpt2", "llama", True),
        ("gpt2", "llama-bpe", "llama", False),
        ("gpt2", "qwen2", "qwen2", False),
        ("llama", None, "llama", True),
        ("llama", None, "llama", False),
    ],
)
def test_tiny_gguf_matches_transformers(write_tiny_gguf, model: str, pre: str | None, arch: str, add_bos: bool) -> None:
    path = write_tiny_gguf(model=model, pre=pre, arch=arch, add_bos=add_bos)
    ours = Tokenizer.from_pretrained(path)
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in CORPUS + WHITESPACE_DIGIT_TEXTS + ["<s>hi</s>", "</s>"]:
        for add_special_tokens in (True, False):
            expected = ref(text, add_special_tokens=add_special_tokens).input_ids
            assert ours.encode(text, add_special_tokens=add_special_tokens) == expected, text
        ids = ours.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
    assert (ours.bos_token_id, ours.eos_token_id) == (ref.bos_token_id, ref.eos_token_id)
    assert ours.vocab_size == len(ref)


def test_gguf_unknown_pre_tokenizer_lists_supported(write_tiny_gguf) -> None:
    path = write_tiny_gguf(model="gpt2", pre="not-a-real-pre")
    with pytest.raises(ValueError, match="not-a-real-pre") as info:
        Tokenizer.from_pretrained(path)
    for name in SUPPORTED_GGUF_PRE_TOKENIZERS:
        assert name in str(info.value)


def test_gguf_chat_template_and_eot_ids(write_tiny_gguf, tiny_hf_tokenizer_dir: Path) -> None:
    template = (tiny_hf_tokenizer_dir / "chat_template.jinja").read_text()
    path = write_tiny_gguf(model="gpt2", pre="qwen2", arch="qwen2", chat_template=template)
    ours = Tokenizer.from_pretrained(path)
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for messages in CONVERSATIONS.values():
        assert ours.apply_chat_template(messages) == ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        assert ours.encode_chat(messages) == _hf_chat_ids(ref, messages, add_generation_prompt=True)


def test_no_chat_template_is_a_clear_error(write_tiny_gguf) -> None:
    ours = Tokenizer.from_pretrained(write_tiny_gguf(model="gpt2", pre="default"))
    assert ours.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])


# ------------------------------------------------------------------------------------------------ HF directories
def _compare_dir_with_transformers(model_dir: Path, texts: list[str]) -> tuple[Tokenizer, object]:
    ours = Tokenizer.from_pretrained(model_dir)
    ref = AutoTokenizer.from_pretrained(model_dir)
    for text in texts:
        for add_special_tokens in (True, False):
            expected = ref(text, add_special_tokens=add_special_tokens).input_ids
            assert ours.encode(text, add_special_tokens=add_special_tokens) == expected, text
        ids = ours.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
    assert ours.bos_token_id == ref.bos_token_id
    assert ours.eos_token_id == ref.eos_token_id
    assert ours.pad_token_id == ref.pad_token_id
    assert set(ref.all_special_ids) <= set(ours.all_special_ids)
    assert ours.vocab_size == len(ref)
    return ours, ref


def test_tiny_hf_dir_matches_transformers(tiny_hf_tokenizer_dir: Path) -> None:
    ours, ref = _compare_dir_with_transformers(tiny_hf_tokenizer_dir, CORPUS + WHITESPACE_DIGIT_TEXTS)
    assert ours.encode("hi")[0] == ref.bos_token_id  # add_bos_token=True in tokenizer_config.json
    for messages in CONVERSATIONS.values():
        for add_generation_prompt in (True, False):
            assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == (
                ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            )
            chat_ids = ours.encode_chat(messages, add_generation_prompt=add_generation_prompt)
            assert chat_ids == _hf_chat_ids(ref, messages, add_generation_prompt=add_generation_prompt)
            # The template writes BOS; encode_chat must not add a second one.
            assert chat_ids[0] == ref.bos_token_id and chat_ids[1] != ref.bos_token_id


def test_tiny_sentencepiece_dir_matches_transformers(tiny_sentencepiece_hf_dir: Path) -> None:
    ours, ref = _compare_dir_with_transformers(tiny_sentencepiece_hf_dir, CORPUS + ["<s>[INST] hi [/INST]</s>"])
    messages = CONVERSATIONS["multi_turn"]
    expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages) == expected
    assert ours.encode_chat(messages) == _hf_chat_ids(ref, messages, add_generation_prompt=True)


def test_embedding_model_dir_matches_transformers(embedding_model_dir: Path) -> None:
    """all-MiniLM-L6-v2: BERT WordPiece with lowercasing, [CLS]/[SEP] post-processing and padding settings in its
    tokenizer.json (which encode must not apply)."""
    ours, _ = _compare_dir_with_transformers(embedding_model_dir, CORPUS + ["[CLS] a [SEP] b [MASK]"])
    assert ours.model_max_length == 512


def test_wordpiece_clean_up_spaces_matches_transformers(embedding_model_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "minilm"
    model_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(embedding_model_dir / name, model_dir / name)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))
    ours, ref = _compare_dir_with_transformers(model_dir, ["Hello , world ! It's fine, isn't it? I'm sure we've won."])
    ids = ours.encode("Hello , world ! It's fine, isn't it? I'm sure we've won.")
    assert ours.decode(ids) != Tokenizer.from_pretrained(embedding_model_dir).decode(ids)  # the clean-up did act


def test_tool_and_named_templates_match_transformers(tiny_hf_tokenizer_dir: Path, tmp_path: Path) -> None:
    """tokenizer_config.json with a list of named templates ("default" + "tool_use"), no chat_template.jinja."""
    model_dir = tmp_path / "named"
    shutil.copytree(tiny_hf_tokenizer_dir, model_dir)
    (model_dir / "chat_template.jinja").unlink()
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    default = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tool_use = (
        "{% if tools %}TOOLS {{ tools | tojson }}\n{% endif %}{% for m in messages %}"
        "{{ m['role'] | upper }}: {{ m['content'] }}{% if m.tool_calls is defined %} CALLS {{ m.tool_calls | tojson }}"
        "{% endif %}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    config["chat_template"] = [{"name": "default", "template": default}, {"name": "tool_use", "template": tool_use}]
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))

    ours = Tokenizer.from_pretrained(model_dir)
    ref = AutoTokenizer.from_pretrained(model_dir)
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather <today> & \"tomorrow\" in a city, 'quoted'",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    tool_call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    messages = [
        {"role": "user", "content": "Weather in Paris? ünï"},
        {"role": "assistant", "content": None, "tool_calls": [tool_call]},  # None: dropped, as OpenAI clients send
        {"role": "tool", "content": "sunny"},
    ]
    assert ours.chat_template == default
    assert ours.apply_chat_template(messages, tools=tools) == ref.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert ours.apply_chat_template(messages) == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_template_exceptions_and_extras_match_transformers(tiny_hf_tokenizer_dir: Path) -> None:
    ours = Tokenizer.from_pretrained(tiny_hf_tokenizer_dir)
    ref = AutoTokenizer.from_pretrained(tiny_hf_tokenizer_dir)
    bad = [{"role": "robot", "content": "beep"}]
    with pytest.raises(Exception, match="unknown role: robot"):
        ref.apply_chat_template(bad, tokenize=False)
    with pytest.raises(ChatTemplateError, match="unknown role: robot"):
        ours.apply_chat_template(bad)

    # Extra keyword arguments are template variables; strftime_now is available.
    template = "{{ strftime_now('%Y') }}|{{ greeting }}|{{ eos_token }}|{{ messages | length }}"
    messages = CONVERSATIONS["one_user_turn"]
    from inferd.engine.chat_template import render_chat_template

    ours_text = render_chat_template(template, messages, special_tokens=ours.special_tokens, greeting="hey")
    ref_text = ref.apply_chat_template(messages, chat_template=template, tokenize=False, greeting="hey")
    assert ours_text == ref_text
