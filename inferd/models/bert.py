"""Layer 2: BERT-family encoders (BERT, RoBERTa / XLM-R) for sentence embeddings, over packed variable-length input.

A batch of B sequences is one packed sequence of T = sum(lengths) tokens: every linear layer, LayerNorm and GELU
runs on [T, hidden] rows, so no FLOP is spent on padding there. Attention is bidirectional within each sequence
(no KV cache, no causal mask): one gather puts every sequence in a slot of the batch's longest length (rounded up
to ATTENTION_PAD_MULTIPLE), one masked scaled_dot_product_attention call runs them all, one gather brings the rows
back. Attention is O(L^2 * hidden) per sequence against O(L * hidden^2) for the linear layers, so the slot padding
costs a few percent of a sentence batch's FLOPs, while the number of kernel calls per layer stays constant: on a
busy 2-core machine each 2-thread call waits for both threads, and one call per sequence, or per length bucket,
was several times slower (`benchmarks/embeddings.py attention`). A long input never pads many short ones: once
slots exceed ATTENTION_GROUP_MIN_SPLIT tokens, sequences at most half the slot length start a new slot group (one
more SDPA call and row scatter each), so in slots over 128 tokens attention FLOPs stay within 4x of the unpadded
sum and the gathered q/k/v within about twice the packed rows.

Batch composition does not change a sequence's vector, bitwise, in tests/test_bert.py and tests/test_embeddings.py
(alone == inside shuffled and busy batches): the linear layers are row-wise, pooling reduces a sequence's own
rows, and in attention a longer slot only adds masked keys, whose weights are exact zeros; slots are multiples of
16 so the kernel groups a sequence's real keys the same way whatever the slot (this rests on torch's CPU SDPA
kernel; one that split the key dimension by total length could change the last bits). The packed row count is
padded to at least `MIN_PACKED_ROWS` because MKL's float32 GEMM takes a different summation order for fewer than
about 12 rows (measured: rows 1-3, 5-7, 9-11 differ from the same rows inside a larger GEMM in the last bits; from
12 rows on, every row is bitwise the same whatever the row count). On the oneDNN path (below) only a 1-row
GEMM differs, so batches there are padded to `MIN_PACKED_ROWS_ONEDNN` rows only: a 3-token input costs 3 rows.

On CPU in float32 the four linear layers of each layer run through oneDNN with weights reordered once at load
(`torch.ops.mkldnn._linear_pointwise`, bias and GELU fused) instead of nn.Linear's MKL sgemm: on this project's
AMD EPYC machine MKL ran the encoder's shapes at ~40-60 GFLOP/s on one thread, oneDNN at ~100-150 (MKL does not
take its AVX-512 path on AMD). Both paths are tested against transformers; `load_bert_encoder(onednn=False)`
keeps nn.Linear.

Loaded from a Hugging Face / sentence-transformers directory: config.json + *.safetensors for the encoder;
modules.json, 1_Pooling/config.json (either the `pooling_mode` key or the legacy `pooling_mode_*_tokens` flags)
and sentence_bert_config.json (`max_seq_length`; sentence-transformers >= 5 writes tokenizer_config.json's
`model_max_length` instead) for pooling, normalisation and the length limit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MIN_PACKED_ROWS = 16  # see the module docstring: below ~12 rows MKL sums in another order
MIN_PACKED_ROWS_ONEDNN = 2  # oneDNN's fp32 GEMM sums one row in another order than 2..3000 rows (measured)
ATTENTION_PAD_MULTIPLE = 16  # attention slots are a multiple of this many tokens
# Slots of more tokens than this split off sequences at most half as long. Up to 128-token slots attention is a few
# percent of a token's FLOPs (4 * 128 * hidden against 24 * hidden^2 for hidden 384), so padding there is cheap.
ATTENTION_GROUP_MIN_SPLIT = 128

ENCODER_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")
POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
# (post-op, algorithm) of torch.ops.mkldnn._linear_pointwise for each activation; "gelu"/"none" is the erf GELU
# (bitwise F.gelu's on this CPU), "gelu"/"tanh" the tanh approximation.
_ONEDNN_ACTIVATIONS = {
    "gelu": ("gelu", "none"),
    "gelu_new": ("gelu", "tanh"),
    "gelu_pytorch_tanh": ("gelu", "tanh"),
    "relu": ("relu", ""),
}
_LINEAR_NAMES = ("qkv", "attn_out", "ffn_up", "ffn_down")
# What quantization="int8" quantizes. qkv stays float32: its input (the previous layer's LayerNorm output) has outlier
# dimensions that per-block int8 activations round worst; all-MiniLM-L6-v2 on 320 sentences, lowest cosine against
# sentence-transformers with int8 in: qkv alone 0.99931, attn_out 0.99997, ffn_up 0.99971, ffn_down 0.99983, these
# three 0.99947, all four 0.99878 (below the 0.999 the issue asks).
INT8_LINEAR_NAMES = ("attn_out", "ffn_up", "ffn_down")
QUANTIZATIONS = ("none", "int8")
_ONEDNN_BATCH_HINT = 64  # rows oneDNN picks its weight layout for; measured: any hint runs 16-4096 rows alike
# The sentence-transformers modules we implement; any other module in modules.json is an error, never ignored.
_ST_TRANSFORMER = "Transformer"
_ST_POOLING = "Pooling"
_ST_NORMALIZE = "Normalize"


@dataclass(frozen=True)
class EncoderConfig:
    model_type: str  # bert | roberta | xlm-roberta
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int
    position_offset: int  # RoBERTa numbers positions from pad_token_id + 1; BERT from 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_num_positions(self) -> int:
        """Longest sequence the position table covers, in tokens."""
        return self.max_position_embeddings - self.position_offset

    def flops_per_token(self, seq_len: int) -> int:
        """Multiply-adds x2 of one token of a sequence of `seq_len` tokens through all layers (no embeddings)."""
        h, i = self.hidden_size, self.intermediate_size
        linear = 2 * (4 * h * h + 2 * h * i)
        attention = 2 * 2 * seq_len * h
        return self.num_layers * (linear + attention)


def encoder_config_from_hf(cfg: dict) -> EncoderConfig:
    model_type = cfg.get("model_type", "")
    if model_type not in ENCODER_MODEL_TYPES:
        raise ValueError(f"unsupported encoder model_type {model_type!r}; supported: {', '.join(ENCODER_MODEL_TYPES)}")
    position_type = cfg.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ValueError(f"position_embedding_type {position_type!r} is not supported (only 'absolute')")
    hidden_act = cfg.get("hidden_act", "gelu")
    if hidden_act not in _ACTIVATIONS:
        raise ValueError(f"hidden_act {hidden_act!r} is not supported; supported: {', '.join(_ACTIVATIONS)}")
    pad_token_id = int(cfg.get("pad_token_id", 0) or 0)
    return EncoderConfig(
        model_type=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=int(cfg["num_attention_heads"]),
        intermediate_size=int(cfg["intermediate_size"]),
        hidden_act=hidden_act,
        max_position_embeddings=int(cfg["max_position_embeddings"]),
        type_vocab_size=int(cfg.get("type_vocab_size", 2)),
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
        pad_token_id=pad_token_id,
        position_offset=pad_token_id + 1 if model_type != "bert" else 0,
    )


@dataclass(frozen=True)
class PoolingConfig:
    """How token states become one vector: `modes` concatenated in order (sentence-transformers allows several),
    then L2-normalised when the model has a Normalize module."""

    modes: tuple[str, ...] = ("mean",)
    normalize: bool = False

    def __post_init__(self) -> None:
        for mode in self.modes:
            if mode not in POOLING_MODES:
                raise ValueError(f"pooling mode {mode!r} is not supported; supported: {', '.join(POOLING_MODES)}")
        if not self.modes:
            raise ValueError("pooling needs at least one mode")


@dataclass(frozen=True)
class SentenceEncoderFiles:
    """What a sentence-transformers directory says about using its encoder."""

    pooling: PoolingConfig
    max_seq_length: int | None  # tokens; None: the model's position table is the limit
    do_lower_case: bool


def _read_json(path: str) -> dict | list:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_pooling_config(path: str) -> tuple[str, ...]:
    """Pooling modes from a sentence-transformers Pooling config.json (new or legacy keys)."""
    cfg = _read_json(path)
    assert isinstance(cfg, dict)
    if "pooling_mode" in cfg:
        value = cfg["pooling_mode"]
        modes = (value,) if isinstance(value, str) else tuple(value)
    else:
        modes = tuple(mode for key, mode in _LEGACY_POOLING_KEYS.items() if cfg.get(key))
    if not modes:
        raise ValueError(f"{path}: no pooling mode is set")
    return modes


def read_sentence_encoder_files(model_dir: str) -> SentenceEncoderFiles:
    """Pooling, normalisation and max_seq_length from modules.json & co. A plain HF directory (no modules.json)
    gets mean pooling without normalisation (what sentence-transformers does for a bare transformers model)."""
    modules_path = os.path.join(model_dir, "modules.json")
    modes: tuple[str, ...] = ("mean",)
    normalize = False
    if os.path.isfile(modules_path):
        modules = _read_json(modules_path)
        assert isinstance(modules, list)
        modules = sorted(modules, key=lambda m: int(m.get("idx", 0)))
        kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
        for module, kind in zip(modules, kinds):
            if kind not in (_ST_TRANSFORMER, _ST_POOLING, _ST_NORMALIZE):
                raise ValueError(
                    f"{modules_path}: module {module.get('type')!r} is not supported "
                    f"(supported: {_ST_TRANSFORMER}, {_ST_POOLING}, {_ST_NORMALIZE})"
                )
        if not kinds or kinds[0] != _ST_TRANSFORMER:
            raise ValueError(f"{modules_path}: the first module must be a {_ST_TRANSFORMER}, got {kinds}")
        if _ST_POOLING not in kinds:
            raise ValueError(f"{modules_path}: no {_ST_POOLING} module (token embeddings are not served)")
        pooling_module = modules[kinds.index(_ST_POOLING)]
        modes = read_pooling_config(os.path.join(model_dir, pooling_module.get("path", ""), "config.json"))
        normalize = _ST_NORMALIZE in kinds
    max_seq_length = None
    do_lower_case = False
    sbert_path = os.path.join(model_dir, "sentence_bert_config.json")
    if os.path.isfile(sbert_path):
        sbert = _read_json(sbert_path)
        assert isinstance(sbert, dict)
        if sbert.get("max_seq_length") is not None:
            max_seq_length = int(sbert["max_seq_length"])
        do_lower_case = bool(sbert.get("do_lower_case", False))
    tokenizer_config_path = os.path.join(model_dir, "tokenizer_config.json")
    if max_seq_length is None and os.path.isfile(tokenizer_config_path):
        # sentence-transformers >= 5 keeps the limit as the tokenizer's model_max_length; transformers writes a
        # huge sentinel (int(1e30)) when there is none
        model_max_length = _read_json(tokenizer_config_path).get("model_max_length")  # type: ignore[union-attr]
        if isinstance(model_max_length, int) and model_max_length < 1_000_000:
            max_seq_length = model_max_length
    return SentenceEncoderFiles(PoolingConfig(modes, normalize), max_seq_length, do_lower_case)


# ---------------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class SlotGroup:
    """Sequences whose attention runs in one masked SDPA call, each in a slot of `padded_len` rows."""

    num_seqs: int
    padded_len: int
    slot_offset: int  # where the group's slots start in PackedBatch.gather_rows
    key_mask: torch.Tensor  # [num_seqs, 1, 1, padded_len] bool, True where the key is a real token
    row_slot: torch.Tensor  # [n] the slot of each of the group's packed rows ...
    row_pos: torch.Tensor  # [n] ... its position in that slot ...
    dst_rows: torch.Tensor  # [n] ... and the packed row itself


@dataclass(frozen=True)
class PackedBatch:
    """Per-batch plain data: B sequences laid end to end in T >= min_rows rows (padding rows: id 0), and
    the slots attention uses. Sequences are grouped longest first; a group's slots are its longest length rounded up
    to ATTENTION_PAD_MULTIPLE, and a sequence at most half that long starts a new group once slots exceed
    ATTENTION_GROUP_MIN_SPLIT tokens, so a long input never pads many short ones. Padding slot positions repeat the
    sequence's first row and are masked out as keys."""

    input_ids: torch.Tensor  # [T]
    position_ids: torch.Tensor  # [T]
    cu_seqlens: list[int]  # [B + 1] offsets of each sequence's rows
    gather_rows: torch.Tensor  # [sum of num_seqs * padded_len over groups] the packed row each slot position reads
    groups: list[SlotGroup]
    one_group_rows: tuple[torch.Tensor, torch.Tensor] | None  # one group: (slot, position) of every row [T]

    @property
    def num_seqs(self) -> int:
        return len(self.cu_seqlens) - 1

    @property
    def num_tokens(self) -> int:
        return self.cu_seqlens[-1]

    @classmethod
    def build(
        cls,
        token_id_lists: Sequence[Sequence[int]],
        position_offset: int,
        device: torch.device | str,
        min_rows: int = MIN_PACKED_ROWS,
    ) -> PackedBatch:
        lengths = [len(ids) for ids in token_id_lists]
        cu_seqlens = [0]
        for n in lengths:
            cu_seqlens.append(cu_seqlens[-1] + n)
        num_tokens = cu_seqlens[-1]
        num_pad_rows = max(num_tokens, min_rows) - num_tokens
        flat = [token_id for ids in token_id_lists for token_id in ids] + [0] * num_pad_rows
        positions = [p for n in lengths for p in range(n)] + [0] * num_pad_rows

        def rounded(n: int) -> int:
            return -(-n // ATTENTION_PAD_MULTIPLE) * ATTENTION_PAD_MULTIPLE

        grouped: list[list[int]] = []
        for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            slot_len = rounded(lengths[grouped[-1][0]]) if grouped else 0
            if grouped and not (slot_len > ATTENTION_GROUP_MIN_SPLIT and rounded(lengths[index]) <= slot_len // 2):
                grouped[-1].append(index)
            else:
                grouped.append([index])

        def tensor(values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        gather: list[int] = []
        groups = []
        for seq_indices in grouped:
            padded_len = rounded(lengths[seq_indices[0]])
            slot_offset = len(gather)
            mask: list[list[bool]] = []
            rows: list[tuple[int, int, int]] = []  # (packed row, slot, position)
            for slot, index in enumerate(seq_indices):
                start, n = cu_seqlens[index], lengths[index]
                gather.extend(range(start, start + n))
                gather.extend([start] * (padded_len - n))
                mask.append([True] * n + [False] * (padded_len - n))
                rows.extend((start + pos, slot, pos) for pos in range(n))
            rows.sort()  # packed order
            dst_rows = [r[0] for r in rows]
            row_slot = [r[1] for r in rows]
            row_pos = [r[2] for r in rows]
            groups.append(
                SlotGroup(
                    num_seqs=len(seq_indices),
                    padded_len=padded_len,
                    slot_offset=slot_offset,
                    key_mask=tensor(mask, torch.bool).view(len(seq_indices), 1, 1, padded_len),
                    row_slot=tensor(row_slot),
                    row_pos=tensor(row_pos),
                    dst_rows=tensor(dst_rows),
                )
            )
        one_group_rows = None
        if len(groups) == 1:  # padding rows read slot 0, position 0 (computed, never used)
            one_group_rows = (tensor(row_slot + [0] * num_pad_rows), tensor(row_pos + [0] * num_pad_rows))
        return cls(
            input_ids=tensor(flat),
            position_ids=tensor(positions) + position_offset,
            cu_seqlens=cu_seqlens,
            gather_rows=tensor(gather),
            groups=groups,
            one_group_rows=one_group_rows,
        )


class EncoderLayer(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.hidden_act = config.hidden_act
        self.act = _ACTIVATIONS[config.hidden_act]
        self.qkv = nn.Linear(h, 3 * h)  # query, key, value stacked along the output dim
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.ffn_up = nn.Linear(h, config.intermediate_size)
        self.ffn_down = nn.Linear(config.intermediate_size, h)
        self.ffn_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        # oneDNN-blocked copies of the four weights (pack_onednn_weights); None: nn.Linear (torch's BLAS)
        self.onednn_weights: dict[str, torch.Tensor] | None = None

    def forward(self, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """hidden [T, h] packed rows -> [T, h] (rows past the last sequence are padding: computed, never read)."""
        num_rows = hidden.shape[0]
        qkv = self._linear("qkv", hidden)
        context = self.attention(qkv.view(num_rows, 3, self.num_heads, self.head_dim), batch)
        hidden = self.attn_norm(hidden + self._linear("attn_out", context))
        up = self._linear("ffn_up", hidden, activation=True)
        return self.ffn_norm(hidden + self._linear("ffn_down", up))

    def _linear(self, name: str, x: torch.Tensor, activation: bool = False) -> torch.Tensor:
        """x [n, in] -> [n, out] through the named projection: oneDNN with its prepacked weight (bias and GELU
        fused) when packed, else the module itself (nn.Linear, or QuantLinear after quantize_int8)."""
        module = getattr(self, name)
        packed = self.onednn_weights.get(name) if self.onednn_weights is not None else None
        if packed is not None:
            post_op, algorithm = _ONEDNN_ACTIVATIONS[self.hidden_act] if activation else ("none", "")
            return torch.ops.mkldnn._linear_pointwise(x, packed, module.bias, post_op, [], algorithm)
        out = module(x)
        return self.act(out) if activation else out

    def pack_onednn_weights(self) -> None:
        """Reorder the float nn.Linear weights once into oneDNN's blocked layout; forward then runs them through
        oneDNN's fp32 GEMM with the bias (and GELU) fused."""
        self.onednn_weights = {
            name: torch.ops.mkldnn._reorder_linear_weight(getattr(self, name).weight.detach(), _ONEDNN_BATCH_HINT)
            for name in _LINEAR_NAMES
            if isinstance(getattr(self, name), nn.Linear)
        }

    def quantize_int8(self, names: Sequence[str] = INT8_LINEAR_NAMES) -> None:
        """Replace the named projections by QuantLinear: int8 weights (a float16 scale per 32) and int8 activations
        (each row per block of 32) with integer dot products (inferd/kernels, AVX-512 VNNI where the CPU has it)."""
        from inferd.quant.linear import QuantLinear

        for name in names:
            linear = getattr(self, name)
            quantized = QuantLinear(linear.in_features, linear.out_features, "q8", bias=True, int8_activations=True)
            quantized.load_rows(0, linear.weight.detach().float())
            quantized.finalize()
            with torch.no_grad():
                quantized.bias.copy_(linear.bias.detach().float())
            setattr(self, name, quantized)
            if self.onednn_weights is not None:
                self.onednn_weights.pop(name, None)

    def attention(self, qkv: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """qkv [T, 3, heads, head_dim] -> context [T, heads * head_dim]: one gather into the slots, one masked SDPA
        call per slot group, and the rows back (3 kernel calls per layer for one group, 1 + 3 per group else)."""
        num_rows = qkv.shape[0]
        slots = qkv.index_select(0, batch.gather_rows)  # [num_slot_rows, 3, heads, head_dim]
        if batch.one_group_rows is not None:  # the common case: every row, padding included, back in one gather
            row_slot, row_pos = batch.one_group_rows
            out = self._group_attention(slots, batch.groups[0])
            return out.transpose(1, 2)[row_slot, row_pos].view(num_rows, -1)
        context = qkv.new_empty(num_rows, self.num_heads * self.head_dim)
        if num_rows > batch.num_tokens:
            context[batch.num_tokens :] = 0.0
        for group in batch.groups:
            out = self._group_attention(slots, group)
            context[group.dst_rows] = out.transpose(1, 2)[group.row_slot, group.row_pos].view(len(group.dst_rows), -1)
        return context

    def _group_attention(self, slots: torch.Tensor, group: SlotGroup) -> torch.Tensor:
        g, p = group.num_seqs, group.padded_len
        # [g * p, 3, heads, head_dim] -> [3, g, heads, p, head_dim]
        x = slots[group.slot_offset : group.slot_offset + g * p].view(g, p, 3, self.num_heads, self.head_dim)
        x = x.permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(x[0], x[1], x[2], attn_mask=group.key_mask)  # [g, heads, p, head_dim]


class BertEncoder(nn.Module):
    """Token ids -> last hidden states, for packed sequences. Weights are those of transformers' BertModel /
    RobertaModel (the pooler is not used: sentence-transformers pools token states)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, h)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, h)
        self.embed_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """A packed batch -> hidden [T, h] (T may exceed batch.num_tokens by padding rows).
        Single-segment input: token type 0 everywhere, as sentence-transformers encodes one text."""
        hidden = self.word_embeddings(batch.input_ids) + self.position_embeddings(batch.position_ids)
        hidden = self.embed_norm(hidden + self.token_type_embeddings.weight[0])
        for layer in self.layers:
            hidden = layer(hidden, batch)
        return hidden

    @torch.inference_mode()
    def encode(self, token_id_lists: Sequence[Sequence[int]], pooling: PoolingConfig) -> torch.Tensor:
        """B token-id lists (special tokens included, each within the position table) -> pooled [B, dim]."""
        batch = self.pack(token_id_lists)
        hidden = self(batch)
        return pool(hidden, batch.cu_seqlens, pooling)

    def use_onednn(self) -> bool:
        """Run the linear layers through oneDNN with prepacked weights when it can (CPU, float32, a torch built
        with oneDNN); False when it cannot and nn.Linear stays. Call after load_weights."""
        weight = self.word_embeddings.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or not onednn_linear_available():
            return False
        with torch.no_grad():
            for layer in self.layers:
                layer.pack_onednn_weights()
        return True

    @property
    def uses_onednn(self) -> bool:
        return all(layer.onednn_weights is not None for layer in self.layers)

    def quantize_int8(self) -> None:
        """quantization="int8": INT8_LINEAR_NAMES of every layer run int8 x int8 (EncoderLayer.quantize_int8).
        ValueError when inferd's CPU kernels cannot run here (not CPU float32, or no compiler to build them)."""
        from inferd.kernels import cpu_kernels_available, kernel_build_error

        weight = self.word_embeddings.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            raise ValueError(f"quantization int8 runs on CPU in float32 only, not {weight.device.type} {weight.dtype}")
        if not cpu_kernels_available():
            raise ValueError(f"quantization int8 needs inferd's CPU kernels, which could not be built: {kernel_build_error()}")
        for layer in self.layers:
            layer.quantize_int8()

    def pack(self, token_id_lists: Sequence[Sequence[int]]) -> PackedBatch:
        config = self.config
        lengths = [len(ids) for ids in token_id_lists]
        if not lengths or min(lengths) == 0:
            raise ValueError("every sequence needs at least one token")
        if max(lengths) > config.max_num_positions:
            raise ValueError(f"a sequence of {max(lengths)} tokens exceeds the model's {config.max_num_positions} positions")
        min_rows = MIN_PACKED_ROWS_ONEDNN if self.uses_onednn else MIN_PACKED_ROWS
        return PackedBatch.build(token_id_lists, config.position_offset, self.word_embeddings.weight.device, min_rows)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fill every parameter from transformers' names (bert./roberta. prefixes and gamma/beta accepted)."""
        params = dict(self.named_parameters())
        qkv_parts: dict[int, dict[str, torch.Tensor]] = {}
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name = _map_hf_name(hf_name)
            if name is None:
                continue
            if name.startswith("qkv:"):
                _, layer_str, part = name.split(":")
                qkv_parts.setdefault(int(layer_str), {})[part] = tensor
                continue
            if name not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} maps to unknown parameter {name!r}")
            _copy_param(params[name], tensor, hf_name)
            loaded.add(name)
        for index, parts in qkv_parts.items():
            for suffix in ("weight", "bias"):
                keys = [f"{p}.{suffix}" for p in ("query", "key", "value")]
                missing = [k for k in keys if k not in parts]
                if missing:
                    raise ValueError(f"layer {index}: checkpoint lacks attention tensors {missing}")
                name = f"layers.{index}.qkv.{suffix}"
                _copy_param(params[name], torch.cat([parts[k] for k in keys]), name)
                loaded.add(name)
        missing_params = sorted(set(params) - loaded)
        if missing_params:
            raise ValueError(f"checkpoint lacks tensors for {missing_params[:8]}{' ...' if len(missing_params) > 8 else ''}")


def onednn_linear_available() -> bool:
    """torch has oneDNN (mkldnn) and the prepacked fp32 linear ops (`_reorder_linear_weight`, `_linear_pointwise`,
    private ops that torch.compile's CPU backend uses; missing from a torch built without them)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return callable(torch.ops.mkldnn._linear_pointwise) and callable(torch.ops.mkldnn._reorder_linear_weight)
    except (AttributeError, RuntimeError):
        return False


def _copy_param(param: torch.Tensor, tensor: torch.Tensor, hf_name: str) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(tensor.to(dtype=param.dtype, device=param.device))


_LAYER_NAMES = {
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
    "output.LayerNorm": "ffn_norm",
}
_EMBEDDING_NAMES = {
    "embeddings.word_embeddings": "word_embeddings",
    "embeddings.position_embeddings": "position_embeddings",
    "embeddings.token_type_embeddings": "token_type_embeddings",
    "embeddings.LayerNorm": "embed_norm",
}


def _map_hf_name(hf_name: str) -> str | None:
    """Our parameter name for a transformers tensor name; None for tensors we do not use (pooler, MLM head,
    position_ids buffers); "qkv:<layer>:<query|key|value>.<weight|bias>" for the parts of the fused QKV."""
    name = hf_name
    for prefix in ("bert.", "roberta.", "model."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    module, _, leaf = name.rpartition(".")
    leaf = {"gamma": "weight", "beta": "bias"}.get(leaf, leaf)
    if module in _EMBEDDING_NAMES:
        return f"{_EMBEDDING_NAMES[module]}.{leaf}" if leaf in ("weight", "bias") else None
    if module.startswith("encoder.layer."):
        rest = module[len("encoder.layer.") :]
        index_str, _, sub = rest.partition(".")
        if sub.startswith("attention.self."):
            part = sub[len("attention.self.") :]
            if part in ("query", "key", "value"):
                return f"qkv:{index_str}:{part}.{leaf}"
        if sub in _LAYER_NAMES:
            return f"layers.{index_str}.{_LAYER_NAMES[sub]}.{leaf}"
        raise ValueError(f"unexpected encoder tensor {hf_name!r}")
    return None  # pooler.*, cls.* (MLM head), lm_head.*, embeddings.position_ids buffer


# ---------------------------------------------------------------------------------------------------- pooling


def pool(hidden: torch.Tensor, cu_seqlens: Sequence[int], pooling: PoolingConfig) -> torch.Tensor:
    """hidden [T, h] packed token states -> [B, h * len(modes)], L2-normalised when pooling.normalize.

    Each sequence reduces its own slice (no padding in any sum), so its vector is bitwise independent of the
    other sequences in the batch."""
    starts, ends = list(cu_seqlens[:-1]), list(cu_seqlens[1:])
    parts = []
    for mode in pooling.modes:
        if mode == "cls":
            parts.append(hidden[starts])
        elif mode == "lasttoken":
            parts.append(hidden[[e - 1 for e in ends]])
        elif mode == "max":
            parts.append(torch.stack([hidden[s:e].amax(0) for s, e in zip(starts, ends)]))
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            sums = torch.stack([hidden[s:e].sum(0) for s, e in zip(starts, ends)])
            lengths = torch.tensor([e - s for s, e in zip(starts, ends)], dtype=hidden.dtype, device=hidden.device)
            divisor = lengths if mode == "mean" else lengths.sqrt()
            parts.append(sums / divisor[:, None])
        elif mode == "weightedmean":
            # position weights 1..L, as sentence-transformers' weightedmean
            rows = []
            for s, e in zip(starts, ends):
                weights = torch.arange(1, e - s + 1, dtype=hidden.dtype, device=hidden.device)
                rows.append((hidden[s:e] * weights[:, None]).sum(0) / weights.sum())
            parts.append(torch.stack(rows))
        else:  # PoolingConfig validated the modes
            raise AssertionError(mode)
    pooled = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    if pooling.normalize:
        pooled = F.normalize(pooled, p=2.0, dim=1)
    return pooled


# ---------------------------------------------------------------------------------------------------- loading


def is_encoder_dir(path: str) -> bool:
    """A HF directory whose config.json names an encoder model_type we serve."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        return False
    cfg = _read_json(config_path)
    return isinstance(cfg, dict) and cfg.get("model_type") in ENCODER_MODEL_TYPES


def read_encoder_config(model_dir: str) -> EncoderConfig:
    cfg = _read_json(os.path.join(model_dir, "config.json"))
    assert isinstance(cfg, dict)
    return encoder_config_from_hf(cfg)


def _iter_safetensors_quiet(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    from inferd.models.hf_loader import safetensors_files

    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_bert_encoder(
    model_dir: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    onednn: bool = True,
    quantization: str = "none",
) -> BertEncoder:
    """The encoder of a HF directory, in eval mode on `device` in `dtype`; `onednn`: on CPU in float32, run the
    linear layers through oneDNN with prepacked weights (BertEncoder.use_onednn) where torch has it;
    `quantization` "int8": INT8_LINEAR_NAMES in int8 (BertEncoder.quantize_int8), the rest as before."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown encoder quantization {quantization!r}; supported: {', '.join(QUANTIZATIONS)}")
    model_dir = os.fspath(model_dir)
    config = read_encoder_config(model_dir)
    with torch.device("meta"):
        model = BertEncoder(config)
    model = model.to_empty(device=device).to(dtype).eval()
    model.load_weights(_iter_safetensors_quiet(model_dir))
    if onednn:
        model.use_onednn()
    if quantization == "int8":
        model.quantize_int8()
    return model


__all__ = [
    "ATTENTION_GROUP_MIN_SPLIT",
    "ATTENTION_PAD_MULTIPLE",
    "BertEncoder",
    "PackedBatch",
    "EncoderConfig",
    "INT8_LINEAR_NAMES",
    "MIN_PACKED_ROWS",
    "MIN_PACKED_ROWS_ONEDNN",
    "POOLING_MODES",
    "QUANTIZATIONS",
    "PoolingConfig",
    "SentenceEncoderFiles",
    "encoder_config_from_hf",
    "is_encoder_dir",
    "load_bert_encoder",
    "onednn_linear_available",
    "pool",
    "read_encoder_config",
    "read_sentence_encoder_files",
]
