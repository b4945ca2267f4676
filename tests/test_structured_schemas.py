"""The shared structured-output schema set (tests/structured_schemas.py) is self-consistent: one example and one
prompt per model, every example re-validates from its own JSON, every schema serialises to JSON."""

import json

import pytest

from tests.structured_schemas import EXAMPLES, PROMPTS, SCHEMA_MODELS


def test_every_model_has_one_example_and_one_prompt():
    names = [model.__name__ for model in SCHEMA_MODELS]
    assert len(names) == len(set(names)) >= 24
    assert set(EXAMPLES) == set(names)
    assert set(PROMPTS) == set(names)


@pytest.mark.parametrize("model", SCHEMA_MODELS, ids=lambda m: m.__name__)
def test_example_round_trips_through_its_schema(model):
    example = EXAMPLES[model.__name__]
    assert type(example) is model
    # The JSON a grammar-constrained model would emit parses back to the same object.
    assert model.model_validate_json(example.model_dump_json()) == example


@pytest.mark.parametrize("model", SCHEMA_MODELS, ids=lambda m: m.__name__)
def test_schema_is_json_serialisable(model):
    schema = model.model_json_schema()
    assert json.loads(json.dumps(schema)) == schema
    # Recursive models are a top-level $ref into $defs; the rest are plain objects.
    assert schema.get("type") == "object" or schema["$ref"].startswith("#/$defs/")


def test_schema_set_covers_the_keywords_of_issue_12():
    text = json.dumps([model.model_json_schema() for model in SCHEMA_MODELS])
    for keyword in ['"$defs"', '"$ref"', '"enum"', '"const"', '"anyOf"', '"oneOf"', '"minItems"', '"maxItems"',
                    '"minimum"', '"maximum"', '"exclusiveMinimum"', '"exclusiveMaximum"', '"multipleOf"',
                    '"pattern"', '"minLength"', '"maxLength"', '"additionalProperties"', '"prefixItems"',
                    '"default"', '"boolean"', '"format": "date"', '"format": "date-time"', '"format": "time"',
                    '"format": "email"', '"format": "uuid"', '"format": "uri"']:
        assert keyword in text, keyword
