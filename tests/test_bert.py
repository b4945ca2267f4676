"""BERT-family encoder (inferd/models/bert.py) against transformers and sentence-transformers on tiny random
configs made on the fly: hidden states within 1e-5, every pooling mode, and batch composition never changing a
sequence's vector (bitwise).

`make_tiny_sentence_encoder(...)` builds a tiny random BertModel / RobertaModel with a WordPiece tokenizer and
saves it the way sentence-transformers saves a model (modules.json, 1_Pooling, 2_Normalize); tests of the
embedding engine import it too.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from inferd.models.bert import (
    MIN_PACKED_ROWS,
    POOLING_MODES,
    PoolingConfig,
    load_bert_encoder,
    onednn_linear_available,
    read_sentence_encoder_files,
)

import sentence_transformers.sentence_transformer.modules as st_modules  # the pooling reference (test extra)
import transformers  # the encoder reference (test extra)

_LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + _LETTERS + ["##" + c for c in _LETTERS] + [
    w for w in ("the", "fox", "dog", "runs", "##s", "##ing", "code", "def", "(", ")", ":", ".", ",")
]


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (LayerNorm weights and biases included), so a mis-mapped tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("LayerNorm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))


def make_tiny_sentence_encoder(
    out_dir: Path,
    *,
    model_type: str = "bert",
    pooling_mode: str | list[str] = "mean",
    normalize: bool = True,
    max_seq_length: int = 48,
    hidden_act: str = "gelu",
    seed: int = 0,
):
    """A saved sentence-transformers directory around a tiny random encoder; returns the SentenceTransformer."""
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(TINY_VOCAB)}
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    fast = transformers.BertTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )
    common = dict(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_act=hidden_act, type_vocab_size=2,
    )
    if model_type == "bert":
        config = transformers.BertConfig(max_position_embeddings=64, **common)
        model = transformers.BertModel(config, add_pooling_layer=True)
    elif model_type == "roberta":
        config = transformers.RobertaConfig(max_position_embeddings=64 + 2, pad_token_id=0, **common)
        model = transformers.RobertaModel(config, add_pooling_layer=True)
    else:
        raise ValueError(model_type)
    _randomise(model, seed)
    hf_dir = out_dir / "hf"
    model.save_pretrained(hf_dir)
    fast.save_pretrained(hf_dir)
    modules = [st_modules.Transformer(str(hf_dir), max_seq_length=max_seq_length), st_modules.Pooling(32, pooling_mode)]
    if normalize:
        modules.append(st_modules.Normalize())
    st_model = SentenceTransformer(modules=modules, device="cpu")
    st_model.save(str(out_dir / "st"))
    return st_model


def _random_sequences(vocab_size: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # [CLS] ... [SEP] like a tokenizer makes them; body ids avoid the special tokens 0-4
    return [[2] + [rng.randrange(5, vocab_size) for _ in range(n - 2)] + [3] for n in lengths]


def _hf_hidden(hf_model, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(last_hidden_state [B, Lmax, h], attention_mask [B, Lmax]) from transformers on a padded batch."""
    max_len = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), max_len, dtype=torch.long)
    mask = torch.zeros(len(sequences), max_len, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    with torch.no_grad():
        out = hf_model(input_ids=ids, attention_mask=mask)
    return out.last_hidden_state, mask


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "nn-linear"])
@pytest.mark.parametrize(
    "model_type,hidden_act", [("bert", "gelu"), ("bert", "gelu_new"), ("bert", "relu"), ("roberta", "gelu")]
)
def test_hidden_states_match_transformers(tmp_path: Path, model_type: str, hidden_act: str, onednn: bool) -> None:
    st_model = make_tiny_sentence_encoder(tmp_path, model_type=model_type, hidden_act=hidden_act, seed=1)
    hf_model = st_model[0].auto_model.eval()
    ours = load_bert_encoder(tmp_path / "st", onednn=onednn)
    assert ours.uses_onednn == (onednn and onednn_linear_available())
    sequences = _random_sequences(ours.config.vocab_size, [3, 17, 1 + 1, 40, 9, 64], seed=2)
    ref, _mask = _hf_hidden(hf_model, sequences)
    batch = ours.pack(sequences)
    cu_seqlens = batch.cu_seqlens
    with torch.inference_mode():
        hidden = ours(batch)
    for i, seq in enumerate(sequences):
        got = hidden[cu_seqlens[i] : cu_seqlens[i + 1]]
        torch.testing.assert_close(got, ref[i, : len(seq)], atol=1e-5, rtol=0)


@pytest.mark.parametrize("pooling_mode", [*POOLING_MODES, ["cls", "mean"]])
def test_every_pooling_mode_matches_sentence_transformers(tmp_path: Path, pooling_mode) -> None:
    st_model = make_tiny_sentence_encoder(tmp_path, pooling_mode=pooling_mode, normalize=True, seed=3)
    files = read_sentence_encoder_files(str(tmp_path / "st"))
    expected_modes = (pooling_mode,) if isinstance(pooling_mode, str) else tuple(pooling_mode)
    assert files.pooling == PoolingConfig(expected_modes, normalize=True)
    ours = load_bert_encoder(tmp_path / "st")
    sequences = _random_sequences(ours.config.vocab_size, [5, 30, 2, 12, 48], seed=4)
    token_embeddings, mask = _hf_hidden(st_model[0].auto_model.eval(), sequences)
    features = {"token_embeddings": token_embeddings, "attention_mask": mask}
    with torch.no_grad():
        for module in list(st_model)[1:]:  # Pooling, Normalize: the reference pooling on transformers' states
            features = module(features)
    ref = features["sentence_embedding"]
    got = ours.encode(sequences, files.pooling)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_reads_legacy_pooling_flags_and_max_seq_length(tmp_path: Path) -> None:
    """The pre-v5 sentence-transformers layout (all-MiniLM-L6-v2 ships this): pooling_mode_*_tokens flags and
    max_seq_length in sentence_bert_config.json."""
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 8, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    (tmp_path / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    files = read_sentence_encoder_files(str(tmp_path))
    assert files.pooling == PoolingConfig(("cls",), normalize=False)
    assert files.max_seq_length == 128


def test_unknown_module_is_an_error_not_ignored(tmp_path: Path) -> None:
    (tmp_path / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
            ]
        )
    )
    with pytest.raises(ValueError, match="Dense"):
        read_sentence_encoder_files(str(tmp_path))


def test_max_seq_length_from_tokenizer_config(tmp_path: Path) -> None:
    make_tiny_sentence_encoder(tmp_path, max_seq_length=20)
    assert read_sentence_encoder_files(str(tmp_path / "st")).max_seq_length == 20


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "nn-linear"])
def test_batch_composition_never_changes_a_vector(tmp_path: Path, onednn: bool) -> None:
    """Each sequence alone == the same sequence inside batches of other sizes and orders, bitwise."""
    make_tiny_sentence_encoder(tmp_path, seed=5)
    ours = load_bert_encoder(tmp_path / "st", onednn=onednn)
    pooling = PoolingConfig(("mean",), normalize=True)
    rng = random.Random(6)
    lengths = [rng.randrange(2, 65) for _ in range(40)] + [2, 3, 5, 7, 11]
    sequences = _random_sequences(ours.config.vocab_size, lengths, seed=7)
    alone = np.stack([ours.encode([s], pooling)[0].numpy() for s in sequences])
    together = ours.encode(sequences, pooling).numpy()
    order = list(range(len(sequences)))
    rng.shuffle(order)
    shuffled = ours.encode([sequences[i] for i in order], pooling).numpy()
    assert np.array_equal(alone, together)
    assert np.array_equal(alone[order], shuffled)
    assert MIN_PACKED_ROWS >= 12  # the bitwise claim rests on it (module docstring)


def test_rejects_sequences_past_the_position_table(tmp_path: Path) -> None:
    make_tiny_sentence_encoder(tmp_path)
    ours = load_bert_encoder(tmp_path / "st")
    with pytest.raises(ValueError, match="65 tokens exceeds the model's 64 positions"):
        ours.encode([[2] * 65], PoolingConfig())
    with pytest.raises(ValueError, match="at least one token"):
        ours.encode([[2, 3], []], PoolingConfig())


def test_slot_groups_keep_parity_and_batch_independence(tmp_path: Path, monkeypatch) -> None:
    """A long sequence among short ones splits the attention slots into groups (here from 16 tokens on, so the
    tiny model's 64 positions reach it): hidden states still match transformers, vectors still match alone."""
    from inferd.models import bert

    monkeypatch.setattr(bert, "ATTENTION_GROUP_MIN_SPLIT", 16)
    st_model = make_tiny_sentence_encoder(tmp_path, seed=8)
    ours = load_bert_encoder(tmp_path / "st")
    sequences = _random_sequences(ours.config.vocab_size, [64, 3, 40, 9, 17, 2, 33, 5], seed=9)
    batch = ours.pack(sequences)
    assert [g.padded_len for g in batch.groups] == [64, 32, 16] and batch.one_group_rows is None
    ref, _mask = _hf_hidden(st_model[0].auto_model.eval(), sequences)
    with torch.inference_mode():
        hidden = ours(batch)
    for i, seq in enumerate(sequences):
        torch.testing.assert_close(hidden[batch.cu_seqlens[i] : batch.cu_seqlens[i + 1]], ref[i, : len(seq)], atol=1e-5, rtol=0)
    pooling = PoolingConfig(("mean",), normalize=True)
    alone = np.stack([ours.encode([s], pooling)[0].numpy() for s in sequences])
    assert np.array_equal(ours.encode(sequences, pooling).numpy(), alone)
