"""Text <-> token ids for a model, from a Hugging Face directory or a GGUF file.

Both formats end up as one `tokenizers.Tokenizer` (the Rust fast tokenizer) plus the facts the engine needs:
special token ids, the set of ids that end generation, and the chat template.

A GGUF file has no tokenizer.json; its metadata (llama.cpp key names) describes the tokenizer instead:
  tokenizer.ggml.model       "gpt2" = byte-level BPE, "llama" = SentencePiece-style BPE with byte fallback
  tokenizer.ggml.tokens      id -> token string (byte-level spelling for gpt2, "▁" for spaces for llama)
  tokenizer.ggml.merges      "left right" pairs, best first (gpt2; llama files may omit them and carry scores)
  tokenizer.ggml.token_type  1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
  tokenizer.ggml.pre         how text is split before BPE, named after the model family (llama.cpp's names)
  tokenizer.ggml.{bos,eos,unknown,padding,eot,eom}_token_id, add_bos_token, add_eos_token, add_space_prefix
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

from inferd.engine.chat_template import (
    ChatTemplates,
    read_gguf_chat_templates,
    read_hf_chat_templates,
    render_chat_template,
    select_chat_template,
)

logger = logging.getLogger(__name__)

# llama.cpp token types (enum llama_token_type).
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# Split patterns applied before byte-level BPE, by `tokenizer.ggml.pre`. Each mirrors the model family's own
# tokenizer.json pre-tokenizer (and llama.cpp's split for that name).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # ByteLevel's own regex is GPT-2's: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _smollm_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # SmolLM's tokenizer.json: every digit is its own piece, then the GPT-2 split on what is left.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def _regex_pre_tokenizer(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


_BYTE_LEVEL_PRE_TOKENIZERS = {
    "default": _gpt2_pre_tokenizer,
    "gpt2": _gpt2_pre_tokenizer,
    "gpt-2": _gpt2_pre_tokenizer,
    "smollm": _smollm_pre_tokenizer,
    "llama-bpe": lambda: _regex_pre_tokenizer(_LLAMA3_SPLIT),
    "llama3": lambda: _regex_pre_tokenizer(_LLAMA3_SPLIT),
    "llama-v3": lambda: _regex_pre_tokenizer(_LLAMA3_SPLIT),
    "smaug-bpe": lambda: _regex_pre_tokenizer(_LLAMA3_SPLIT),
    "dbrx": lambda: _regex_pre_tokenizer(_LLAMA3_SPLIT),
    "falcon3": lambda: _regex_pre_tokenizer(_LLAMA3_SPLIT),
    "qwen2": lambda: _regex_pre_tokenizer(_QWEN2_SPLIT),
    "deepseek-r1-qwen": lambda: _regex_pre_tokenizer(_QWEN2_SPLIT),
}
SUPPORTED_GGUF_PRE_TOKENIZERS = tuple(sorted(_BYTE_LEVEL_PRE_TOKENIZERS))
SUPPORTED_GGUF_TOKENIZER_MODELS = ("gpt2", "llama")

# Named special tokens handed to chat templates (transformers' SPECIAL_TOKENS_ATTRIBUTES).
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map that byte-level BPE vocabularies are spelled in.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, 0x7f-0xa0, 0xad) are
    moved to code points 256, 257, ... in byte order, so a space reads "Ġ" (U+0120) and a newline "Ċ".
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {byte: chr(byte) for byte in printable}
    num_moved = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + num_moved)
            num_moved += 1
    return mapping


_BYTE_TO_UNICODE = _byte_to_unicode()
_BYTE_LEVEL_ALPHABET = frozenset(_BYTE_TO_UNICODE.values())


def _byte_level_spelling(token: str) -> str:
    if set(token) <= _BYTE_LEVEL_ALPHABET:
        return token
    return "".join(_BYTE_TO_UNICODE[b] for b in token.encode("utf-8"))


def _token_content(value: Any) -> str | None:
    """A special token entry of tokenizer_config.json: a string or an AddedToken dict {"content": ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return value.get("content")
    return str(value)


def _as_length(value: Any) -> int | None:
    # transformers writes a huge sentinel (int(1e30)) when the length is unknown.
    return int(value) if isinstance(value, int) and 0 < value < 10**9 else None


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


# Texts this long are encoded without holding the GIL (encode_batch's thread hop costs more on short ones).
_RELEASE_GIL_MIN_CHARS = 16 * 1024


class Tokenizer:
    """A model's tokenizer: encode/decode, special ids, end-of-generation ids, chat template."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        special_tokens: Mapping[str, str | None],
        extra_eos_token_ids: Iterable[int] = (),
        chat_templates: ChatTemplates | None = None,
        clean_up_tokenization_spaces: bool = False,
        model_max_length: int | None = None,
        name_or_path: str = "",
    ) -> None:
        self.backend = backend
        # Longest input the model was trained for, when the tokenizer config states one (encoders use it).
        self.model_max_length = model_max_length
        self.name_or_path = name_or_path
        self.special_tokens = {name: tok for name, tok in special_tokens.items() if tok is not None}
        self.chat_templates = chat_templates
        # transformers skips this clean-up for BPE models, where it would delete real spaces before punctuation.
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces and not isinstance(backend.model, BPE)
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.pad_token = self.special_tokens.get("pad_token")
        self.unk_token = self.special_tokens.get("unk_token")
        self.bos_token_id = self.token_to_id(self.bos_token)
        self.eos_token_id = self.token_to_id(self.eos_token)
        self.pad_token_id = self.token_to_id(self.pad_token)
        self.unk_token_id = self.token_to_id(self.unk_token)
        eos_ids = set(extra_eos_token_ids)
        if self.eos_token_id is not None:
            eos_ids.add(self.eos_token_id)
        self.eos_token_ids: set[int] = eos_ids
        named_ids = {self.token_to_id(tok) for tok in self.special_tokens.values()}
        added_special_ids = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
        # Every id that decode(skip_special_tokens=True) drops, plus the named ones.
        self.all_special_ids: list[int] = sorted((named_ids | added_special_ids) - {None})
        # Vocabulary entries whose string form is held in the model's embedding table (added tokens included).
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load from a Hugging Face model directory or a .gguf file."""
        path = Path(path)
        if path.is_dir():
            return cls._from_hf_dir(path)
        if path.is_file() and path.suffix == ".gguf":
            return cls._from_gguf(path)
        if path.is_file():
            raise ValueError(f"{path} is not a .gguf file; pass a GGUF file or a Hugging Face model directory")
        raise FileNotFoundError(f"no tokenizer at {path}: expected a Hugging Face directory or a .gguf file")

    @classmethod
    def _from_hf_dir(cls, model_dir: Path) -> Tokenizer:
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"{model_dir} has no tokenizer.json; only fast (tokenizers-library) tokenizers are supported"
            )
        backend = BackendTokenizer.from_file(str(tokenizer_file))
        # tokenizer.json may carry fixed-length padding/truncation (sentence-transformers exports do); encode
        # returns exactly the text's ids, and callers truncate against model_max_length themselves.
        backend.no_padding()
        backend.no_truncation()
        config = _read_json(model_dir / "tokenizer_config.json")
        special_map = _read_json(model_dir / "special_tokens_map.json")
        special_tokens = {
            name: _token_content(config.get(name, special_map.get(name))) for name in _NAMED_SPECIAL_TOKENS
        }
        # Named special tokens that the vocabulary holds but tokenizer.json does not mark as added tokens would be
        # split by BPE and survive skip_special_tokens; transformers registers them as special, and so do we.
        vocab = backend.get_vocab(with_added_tokens=True)
        added = {tok.content for tok in backend.get_added_tokens_decoder().values()}
        missing = [tok for tok in special_tokens.values() if tok is not None and tok in vocab and tok not in added]
        if missing:
            backend.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in missing])
        if "add_bos_token" in config or "add_eos_token" in config or backend.post_processor is None:
            # An explicit flag in the config overrides tokenizer.json's post-processor (transformers does the same).
            backend.post_processor = _bos_eos_processor(
                backend,
                special_tokens["bos_token"] if config.get("add_bos_token", False) else None,
                special_tokens["eos_token"] if config.get("add_eos_token", False) else None,
            )
        generation_config = _read_json(model_dir / "generation_config.json")
        return cls(
            backend,
            special_tokens=special_tokens,
            extra_eos_token_ids=_as_id_list(generation_config.get("eos_token_id")),
            chat_templates=read_hf_chat_templates(model_dir, config),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            model_max_length=_as_length(config.get("model_max_length")),
            name_or_path=str(model_dir),
        )

    @classmethod
    def _from_gguf(cls, gguf_path: Path) -> Tokenizer:
        metadata = read_gguf_tokenizer_metadata(gguf_path)
        return cls.from_gguf_metadata(metadata, name_or_path=str(gguf_path))

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], name_or_path: str = "") -> Tokenizer:
        """Build from GGUF metadata already decoded to Python values (strings, ints, lists)."""
        model_type = metadata.get("tokenizer.ggml.model")
        tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
        token_types: list[int] = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        if model_type == "gpt2":
            backend = _byte_level_bpe_from_gguf(metadata, tokens)
            default_add_bos = False
        elif model_type == "llama":
            backend = _sentencepiece_bpe_from_gguf(metadata, tokens)
            default_add_bos = True  # llama.cpp adds BOS to SentencePiece vocabularies that do not say otherwise
        else:
            raise ValueError(
                f"cannot build a tokenizer for GGUF tokenizer.ggml.model={model_type!r}; "
                f"supported: {list(SUPPORTED_GGUF_TOKENIZER_MODELS)}"
            )

        def token_at(key: str) -> str | None:
            token_id = metadata.get(f"tokenizer.ggml.{key}")
            return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

        special_tokens = {
            "bos_token": token_at("bos_token_id"),
            "eos_token": token_at("eos_token_id"),
            "unk_token": token_at("unknown_token_id"),
            "pad_token": token_at("padding_token_id"),
        }
        _add_gguf_added_tokens(backend, tokens, token_types, special_tokens.values(), model_type)
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", default_add_bos))
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        backend.post_processor = _bos_eos_processor(
            backend, special_tokens["bos_token"] if add_bos else None, special_tokens["eos_token"] if add_eos else None
        )
        # End-of-turn / end-of-message tokens also end generation (llama.cpp's "end of generation" set).
        extra_eos_ids = [
            metadata[key] for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if key in metadata
        ]
        return cls(
            backend,
            special_tokens=special_tokens,
            extra_eos_token_ids=extra_eos_ids,
            chat_templates=read_gguf_chat_templates(metadata),
            name_or_path=name_or_path,
        )

    # ----------------------------------------------------------------------------------------------- text <-> ids
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special token strings in the text (e.g. "<|im_start|>") become their single id."""
        if len(text) >= _RELEASE_GIL_MIN_CHARS:
            # tokenizers' encode() holds the GIL throughout (1.8 s for a 3 MB chat: every other thread, the
            # server's event loop included, waits); encode_batch() gives the same ids and releases it.
            return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            text = _clean_up_tokenization(text)
        return text

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self.backend.id_to_token(i) for i in ids]

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    # ----------------------------------------------------------------------------------------------- chat
    @property
    def chat_template(self) -> str | None:
        """The template used when no tools are given (the "default" one), or None if the model has none."""
        if self.chat_templates is None:
            return None
        if isinstance(self.chat_templates, str):
            return self.chat_templates
        return self.chat_templates.get("default")

    @property
    def tool_chat_template(self) -> str | None:
        """The template used when tools are given (a "tool_use" one where the model has it), or None."""
        try:
            return select_chat_template(self.chat_templates, has_tools=True)
        except ValueError:  # no template, or several and none is the default
            return None

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt string for `messages`, as transformers' apply_chat_template(..., tokenize=False) renders it."""
        source = select_chat_template(self.chat_templates, has_tools=tools is not None)
        return render_chat_template(
            source,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            special_tokens=self.special_tokens,
            **kwargs,
        )

    def encode_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Prompt ids for `messages`. The template writes any BOS itself, so no special tokens are added on top."""
        prompt = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs)
        return self.encode(prompt, add_special_tokens=False)

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, bos={self.bos_token_id}, "
            f"eos={sorted(self.eos_token_ids)})"
        )


# --------------------------------------------------------------------------------------------------- helpers
def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _bos_eos_processor(
    backend: BackendTokenizer, bos_token: str | None, eos_token: str | None
) -> processors.PostProcessor:
    single = "$A:0"
    pair = "$A:0 $B:1"
    special: list[tuple[str, int]] = []
    if bos_token is not None and backend.token_to_id(bos_token) is not None:
        single = f"{bos_token}:0 {single}"
        pair = f"{bos_token}:0 $A:0 {bos_token}:1 $B:1"
        special.append((bos_token, backend.token_to_id(bos_token)))
    if eos_token is not None and backend.token_to_id(eos_token) is not None:
        single = f"{single} {eos_token}:0"
        pair = pair.replace("$A:0", f"$A:0 {eos_token}:0") + f" {eos_token}:1"
        special.append((eos_token, backend.token_to_id(eos_token)))
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _byte_level_bpe_from_gguf(metadata: Mapping[str, Any], tokens: list[str]) -> BackendTokenizer:
    pre_name = metadata.get("tokenizer.ggml.pre", "default")
    if pre_name not in _BYTE_LEVEL_PRE_TOKENIZERS:
        raise ValueError(
            f"unsupported GGUF pre-tokenizer tokenizer.ggml.pre={pre_name!r}; "
            f"supported: {list(SUPPORTED_GGUF_PRE_TOKENIZERS)}"
        )
    # A token spelled with characters outside the byte alphabet (a raw space, say) is re-spelled so that BPE can
    # reach it; ids stay those of the file.
    vocab = {_byte_level_spelling(token): token_id for token_id, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges") or []]
    backend = BackendTokenizer(BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = _BYTE_LEVEL_PRE_TOKENIZERS[pre_name]()
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe_from_gguf(metadata: Mapping[str, Any], tokens: list[str]) -> BackendTokenizer:
    """SentencePiece BPE (Llama 1/2, Mistral v0.1): "▁" marks a space, unknown bytes fall back to <0xNN> tokens."""
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    if metadata.get("tokenizer.ggml.merges"):
        merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_scores(vocab, list(metadata["tokenizer.ggml.scores"]))
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk_token = tokens[unk_id] if unk_id is not None else None
    backend = BackendTokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True))
    add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(vocab: Mapping[str, int], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two vocabulary pieces is a
    merge, ranked by the merged token's score (higher first), then by the pieces' lengths, then by piece ids."""
    candidates: list[tuple[float, int, int, int, int, int, str, str]] = []
    for token, token_id in vocab.items():
        for split_at in range(1, len(token)):
            left, right = token[:split_at], token[split_at:]
            if left in vocab and right in vocab:
                score = float(scores[token_id])
                candidates.append((-score, len(left), len(right), token_id, vocab[left], vocab[right], left, right))
    candidates.sort(key=lambda c: (c[0], -c[1], -c[2], c[3], c[4], c[5]))
    return [(c[6], c[7]) for c in candidates]


def _add_gguf_added_tokens(
    backend: BackendTokenizer,
    tokens: list[str],
    token_types: list[int],
    named_special_tokens: Iterable[str | None],
    model_type: str,
) -> None:
    """Register control tokens (and the named bos/eos/unk/pad) as special added tokens, user-defined ones as
    plain added tokens, so text containing them maps to their single id and decode can skip the special ones."""
    is_byte_level = model_type == "gpt2"
    special: dict[str, None] = {}
    plain: dict[str, None] = {}
    for token, token_type in zip(tokens, token_types):
        if token_type == TOKEN_TYPE_CONTROL:
            # In a byte-level vocabulary a control token outside the byte alphabet is a mislabelled entry
            # (llama.cpp files have some); adding it would shadow the real spelling.
            if not is_byte_level or set(token) <= _BYTE_LEVEL_ALPHABET:
                special[token] = None
        elif token_type == TOKEN_TYPE_USER_DEFINED:
            plain[token] = None
    for token in named_special_tokens:
        if token is not None:
            special[token] = None
    if special:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    plain_only = [t for t in plain if t not in special]
    if plain_only:
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain_only])


def _clean_up_tokenization(text: str) -> str:
    """WordPiece decode artefacts: the space a word-joined decode leaves before punctuation and contractions."""
    for before, after in (
        (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
        (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
    ):  # fmt: skip
        text = text.replace(before, after)
    return text


# GGUF metadata value types (gguf spec, enum gguf_metadata_value_type) -> struct format; 8 string, 9 array.
_GGUF_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING = 8
_GGUF_ARRAY = 9
_GGUF_MAGIC = b"GGUF"


def read_gguf_metadata(gguf_path: str | Path, key_prefixes: tuple[str, ...] = ("",)) -> dict[str, Any]:
    """GGUF key/value metadata as Python values (arrays as lists), keeping keys that start with `key_prefixes`.

    Reads only the header, never the tensor data: parsing a 49k-token vocabulary takes tens of milliseconds,
    where gguf.GGUFReader, which also maps every tensor, takes seconds.
    """
    import mmap
    import struct

    with open(gguf_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != _GGUF_MAGIC:
            raise ValueError(f"{gguf_path} is not a GGUF file (magic {bytes(buf[:4])!r})")
        # Files written on big-endian machines store the version byte-swapped; real versions are small numbers.
        endian = "<" if struct.unpack_from("<I", buf, 4)[0] < 0x10000 else ">"
        version = struct.unpack_from(endian + "I", buf, 4)[0]
        if version < 2:
            raise ValueError(f"{gguf_path}: GGUF version {version} is not supported (need 2 or later)")
        num_kv = struct.unpack_from(endian + "Q", buf, 16)[0]
        offset = 24
        u64 = struct.Struct(endian + "Q")
        u32 = struct.Struct(endian + "I")

        def read_string(pos: int) -> tuple[str, int]:
            (length,) = u64.unpack_from(buf, pos)
            start = pos + 8
            return buf[start : start + length].decode("utf-8", errors="replace"), start + length

        def read_value(value_type: int, pos: int) -> tuple[Any, int]:
            if value_type == _GGUF_STRING:
                return read_string(pos)
            if value_type == _GGUF_ARRAY:
                (item_type,) = u32.unpack_from(buf, pos)
                (count,) = u64.unpack_from(buf, pos + 4)
                pos += 12
                if item_type in _GGUF_SCALAR_FORMATS:
                    item = struct.Struct(endian + str(count) + _GGUF_SCALAR_FORMATS[item_type])
                    return list(item.unpack_from(buf, pos)), pos + item.size
                items = []
                for _ in range(count):
                    value, pos = read_value(item_type, pos)
                    items.append(value)
                return items, pos
            if value_type not in _GGUF_SCALAR_FORMATS:
                raise ValueError(f"{gguf_path}: unknown GGUF metadata value type {value_type}")
            scalar = struct.Struct(endian + _GGUF_SCALAR_FORMATS[value_type])
            return scalar.unpack_from(buf, pos)[0], pos + scalar.size

        metadata: dict[str, Any] = {}
        for _ in range(num_kv):
            key, offset = read_string(offset)
            (value_type,) = u32.unpack_from(buf, offset)
            value, offset = read_value(value_type, offset + 4)
            if key.startswith(key_prefixes):
                metadata[key] = value
        return metadata


def read_gguf_tokenizer_metadata(gguf_path: str | Path) -> dict[str, Any]:
    """The tokenizer.* metadata (and general.architecture) of a GGUF file."""
    return read_gguf_metadata(gguf_path, ("tokenizer.", "general.architecture"))
