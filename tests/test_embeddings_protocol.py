"""The pure parts of /v1/embeddings (inferd/server/protocol_embeddings.py): input forms, errors naming the element,
`dimensions`, base64 as the openai client decodes it."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from inferd.server.protocol_embeddings import (
    MAX_EMBEDDING_INPUTS,
    EmbeddingInputError,
    EmbeddingRequest,
    check_lengths,
    embeddings_response_json,
    encode_vectors,
    parse_embedding_input,
    shorten,
)

VOCAB = 100


def test_every_input_form() -> None:
    assert parse_embedding_input("hi", VOCAB).texts == ["hi"]
    assert parse_embedding_input(["a", "b"], VOCAB).texts == ["a", "b"]
    assert parse_embedding_input([1, 2, 3], VOCAB).token_id_lists == [[1, 2, 3]]
    assert parse_embedding_input([[1, 2], [3]], VOCAB).token_id_lists == [[1, 2], [3]]
    assert len(parse_embedding_input([[1, 2], [3]], VOCAB)) == 2


@pytest.mark.parametrize(
    "value,param,message",
    [
        ([], "input", "input must not be empty"),
        (None, "input", "input must be a string, a list of strings"),
        (["a", ""], "input[1]", "empty strings cannot be embedded"),
        ("", "input[0]", "empty strings cannot be embedded"),
        (["a", 3], "input[1]", "every item must be a string"),
        ([[1], []], "input[1]", "empty token-id lists"),
        ([[1], [2, 100]], "input[1][1]", r"token id 100 is outside the vocabulary \[0, 100\)"),
        ([[1], [2, -1]], "input[1][1]", "token id -1 is outside"),
        ([[1], [2, True]], "input[1][1]", "token ids must be integers"),
        ([[1], [2, 1.5]], "input[1][1]", "token ids must be integers"),
        ([[1], "a"], "input[1]", "must be a list of token ids"),
        ([1, "a"], "input[0]", "must be a list of token ids"),
        (["x"] * (MAX_EMBEDDING_INPUTS + 1), "input", f"more than the limit of {MAX_EMBEDDING_INPUTS} per request"),
    ],
)
def test_bad_input_names_the_element(value, param: str, message: str) -> None:
    with pytest.raises(EmbeddingInputError, match=message) as info:
        parse_embedding_input(value, VOCAB)
    assert info.value.param == param


def test_too_long_names_the_index() -> None:
    check_lengths([[1] * 5, [1] * 6], max_seq_length=6)
    with pytest.raises(EmbeddingInputError, match=r"input\[1\] has 7 tokens, more than the model's limit of 6") as info:
        check_lengths([[1] * 5, [1] * 7], max_seq_length=6)
    assert info.value.param == "input[1]"


def test_request_body_fields() -> None:
    body = EmbeddingRequest.model_validate({"model": "m", "input": "x", "dimensions": 8, "truncate": True, "extra": 1})
    assert (body.encoding_format, body.dimensions, body.truncate) == ("float", 8, True)
    for bad in ({"input": "x", "encoding_format": "int8"}, {"input": "x", "dimensions": 0}, {"input": "x", "dimensions": "8"}):
        with pytest.raises(ValueError):
            EmbeddingRequest.model_validate(bad)


def test_dimensions_truncate_and_renormalise() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    short = shorten(vectors, 4, 8)
    assert short.shape == (3, 4) and short.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(short * np.linalg.norm(vectors[:, :4], axis=1, keepdims=True), vectors[:, :4], rtol=1e-6)
    assert shorten(vectors, None, 8) is vectors
    with pytest.raises(ValueError, match="dimensions must be <= the model's 8"):
        shorten(vectors, 9, 8)


def test_base64_is_what_the_openai_client_decodes() -> None:
    vectors = np.array([[0.5, -1.25, 3.0e-8], [1.0, 2.0, 3.0]], dtype=np.float32)
    encoded = encode_vectors(vectors, "base64")
    # openai-python: np.frombuffer(base64.b64decode(data), dtype="float32")
    decoded = np.stack([np.frombuffer(base64.b64decode(s), dtype="float32") for s in encoded])
    assert np.array_equal(decoded, vectors)
    assert encode_vectors(vectors, "float") == vectors.tolist()


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_response_json_is_what_json_dumps_writes(encoding_format: str) -> None:
    """The fast serializer's body parses to exactly the object json.dumps would have written (every float too)."""
    vectors = np.random.default_rng(0).standard_normal((5, 384)).astype(np.float32) * np.float32(1e-3)
    vectors[0, :4] = [0.0, -0.0, 1.0e-38, 3.4e38]
    body = embeddings_response_json(vectors, encoding_format, "m", 7)
    expected = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(encode_vectors(vectors, encoding_format))],
        "model": "m",
        "usage": {"prompt_tokens": 7, "total_tokens": 7},
    }
    assert json.loads(body) == json.loads(json.dumps(expected))
