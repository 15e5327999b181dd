"""``harness schema``: the JSON Schema of a sweep file, generated from the same pydantic models."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from harness import cli
from harness.spec import ENVIRONMENT_FIELDS, SWEEP_FIELDS, TIMEOUT_FIELDS, sweep_schema

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "scenarios" / "sweeps").glob("*.yaml"))


@pytest.fixture(scope="module")
def validator():
    schema = sweep_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_harness_schema_prints_it(capsys):
    assert cli.main(["schema"]) == cli.EXIT_OK
    printed = json.loads(capsys.readouterr().out)
    assert printed == sweep_schema()
    assert printed["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_every_field_has_help_and_no_object_takes_unknown_keys():
    schema = sweep_schema()
    defs = schema["$defs"]
    env = next(d for d in defs.values() if d.get("title") == "Environment")
    timeouts = next(d for d in defs.values() if d.get("title") == "Timeouts")
    for obj, fields in ((schema, SWEEP_FIELDS), (env, ENVIRONMENT_FIELDS), (timeouts, TIMEOUT_FIELDS)):
        assert obj["additionalProperties"] is False
        assert list(obj["properties"]) == list(fields)
        for name, prop in obj["properties"].items():
            assert prop.get("description"), f"{name} has no description"
    assert all(d["additionalProperties"] is False for d in defs.values())
    assert schema["required"] == ["scenarios", "environments"]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_sweeps_validate_against_the_schema(path, validator):
    validator.validate(yaml.safe_load(path.read_text()))


BASE = {"scenarios": ["seed-binary-classifier"], "environments": {"cpu": {}}}


def test_new_expectations_and_dtype_policy_validate(validator):
    validator.validate({**BASE, "expect": "accurate", "environments": {
        "bf16": {"dtype_policy": "mixed_bfloat16", "expect": {"metric_delta": 0.001}}}})


@pytest.mark.parametrize("doc", [
    {"environments": {"cpu": {}}},                                     # scenarios missing
    {**BASE, "retry": 3},                                              # unknown field
    {**BASE, "environments": {"cpu": {"thread": 2}}},                  # unknown environment field
    {**BASE, "environments": {}},                                      # no environment
    {**BASE, "environments": {"cpu default": {}}},                     # bad environment name
    {**BASE, "formats": ["keras", "savedmodle"]},                      # unknown format
    {**BASE, "formats": ["keras", "keras"]},                           # repeated format
    {**BASE, "tolerance": {"max_ulp": 1.5}},                           # ULPs are whole
    {**BASE, "tolerance": {"atol": -1}},                               # negative
    {**BASE, "expect": "bitwize"},                                     # not a choice
    {**BASE, "retries": 10 ** 21},                                     # beyond the maximum
    {**BASE, "timeouts": {"cell_timeout_s": 0}},                       # not > 0
    {**BASE, "environments": {"cpu": {"threads": "2"}}},               # no str -> int coercion
    {**BASE, "environments": {"cpu": {"cpu_isa": "avx3"}}},            # not an ISA level
    {**BASE, "environments": {"cpu": {"runtime_env": {"pipp": []}}}},  # unknown runtime_env key
    {**BASE, "environments": {"cpu": {"dtype_policy": "bf16"}}},       # not a Keras dtype policy
    {**BASE, "expect": {"metric_delta": -0.1}},                        # a bound >= 0
    {**BASE, "expect": {"metric_delta": 0.1, "x": 1}},                 # nothing else in it
    {**BASE, "expect_save": "accurate"},                               # no oracle for the round trip
])
def test_invalid_documents_are_rejected_by_the_schema(doc, validator):
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(doc)
