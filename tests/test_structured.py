"""tfb_core.structured: generated text that matches a JSON schema by construction, its tokens'
uncertainty the unconstrained model average's, and the per-field summary."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tiny import prompts
from tfb_core.errors import TFBError
from tfb_core.generation import SamplingParams, TokenInfo, generate
from tfb_core.scoring import score_prompts
from tfb_core.structured import field_uncertainty, json_grammar, top_level_spans

SIGMA = 0.5
# nested: an object in an object, an array of enums, bounded strings and integers (a random
# model would otherwise write one string until max_tokens)
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}, "maxItems": 3},
    "admin": {"type": "boolean"}},
    "required": ["name", "age", "address", "tags", "admin"], "additionalProperties": False}


@pytest.fixture()
def post(llama_post):
    llama_post.sigma = SIGMA
    return llama_post


def test_100_sampled_generations_of_a_nested_schema_are_all_valid(post):
    """Sampled at temperature 1 from a random model (the worst writer of JSON), 100 sequences
    decoded together: every text parses and matches the schema, and the texts differ."""
    grammar = json_grammar(PERSON)
    ids = post.tokenizer("A person, as JSON:").input_ids
    seqs = generate(post, [ids] * 100, [SamplingParams(max_tokens=120, num_samples=2, temperature=1.0, seed=i,
                                                       grammar=grammar) for i in range(100)])
    for s in seqs:
        assert s.finish_reason == "stop", s.text
        jsonschema.validate(json.loads(s.text), PERSON)
    assert len({s.text for s in seqs}) > 90


def test_any_json_object_is_an_object(post):
    """json_object: unbounded strings, so a random model may run to max_tokens; every text it ends
    is one JSON object."""
    ids = post.tokenizer("Some JSON:").input_ids
    seqs = generate(post, [ids] * 10, [SamplingParams(max_tokens=60, num_samples=2, temperature=1.0, seed=i,
                                                      grammar=json_grammar(None)) for i in range(10)])
    ended = [s for s in seqs if s.finish_reason == "stop"]
    assert ended and all(isinstance(json.loads(s.text), dict) for s in ended)
    assert all(s.text.startswith("{") for s in seqs)


def test_the_tokens_uncertainty_is_the_unconstrained_average(post):
    """Each token's logprob, PE and MI are those the posterior gives that token without the
    grammar (the same text scored token by token)."""
    ids = prompts(post.tokenizer)[0]
    seq = generate(post, [ids], SamplingParams(max_tokens=120, num_samples=3, weight_seed=2, grammar=json_grammar(PERSON)))[0]
    jsonschema.validate(json.loads(seq.text), PERSON)
    scored = score_prompts(post, [ids + seq.token_ids], [(2, 3)])[0][len(ids) - 1:]
    for got, want in zip(seq.tokens, scored, strict=True):
        for name in ("logprob", "predictive_entropy", "mutual_information"):
            assert getattr(got, name) == pytest.approx(getattr(want, name), abs=1e-5), name
    assert seq.tokens[0].logprob < -1  # "{" was forced: the model alone would hardly pick it


@pytest.mark.parametrize("schema,says", [
    ({"type": "strange"}, "Invalid type"),
    ({"type": "object", "properties": {"a": {"type": "string", "format": "no-such-format"}}}, "Unknown format"),
    ({"type": "string", "pattern": "(unclosed"}, ""),
])
def test_a_schema_llguidance_refuses_is_a_tfb_error_saying_why(schema, says):
    with pytest.raises(TFBError, match="cannot be enforced") as e:
        json_grammar(schema)
    assert says in str(e.value)


def test_top_level_spans():
    text = '{"a": "x}y", "b": {"c": [1, 2]}, "d": 3.5, "e": "q\\"r"}'
    spans = top_level_spans(text)
    assert {k: text[a:b] for k, (a, b) in spans.items()} == {"a": '"x}y"', "b": '{"c": [1, 2]}', "d": "3.5",
                                                            "e": '"q\\"r"'}
    assert top_level_spans("{}") == {}
    for bad in ('[1, 2]', '{"a": 1', '{"a": 1} x', "", "not json"):
        assert top_level_spans(bad) is None, bad


def test_field_uncertainty_summarises_the_tokens_of_each_value():
    pieces = ['{"', 'a', '":', ' "', 'xy', '",', ' "', 'b', '":', ' 1', '}']
    mi = [0.0, 0.0, 0.0, 0.5, 0.9, 0.2, 0.0, 0.0, 0.0, 0.7, 0.0]
    tokens = [TokenInfo(i, -1.0, 1.0 + m, 1.0, m) for i, m in enumerate(mi)]
    fields = field_uncertainty("".join(pieces), pieces, tokens)
    assert fields["a"]["num_tokens"] == 3 and fields["a"]["max_mutual_information"] == 0.9  # ' "', 'xy', '",'
    assert fields["a"]["mean_mutual_information"] == pytest.approx((0.5 + 0.9 + 0.2) / 3)
    assert fields["b"]["num_tokens"] == 1 and fields["b"]["mean_mutual_information"] == 0.7
    assert field_uncertainty("not json", ["not json"], tokens[:1]) is None
