"""The JSON Schema of moeq-manifest.json: generated from the record types, shipped with moeq, and valid for
the manifests a real build publishes.

Regenerate the shipped copy after changing a record type with
    MOEQ_REGEN_SCHEMA=1 .venv/bin/python -m pytest tests/test_manifest_schema.py
"""

from __future__ import annotations

import json
import os

import jsonschema
import pytest

from moeq.manifest import manifest_schema, shipped_schema_path

from conftest import copy_built


def test_shipped_schema_is_generated_from_the_types():
    generated = json.dumps(manifest_schema(), indent=1) + "\n"
    if os.environ.get("MOEQ_REGEN_SCHEMA") == "1":
        shipped_schema_path().write_text(generated)
    assert shipped_schema_path().read_text() == generated, "see the module docstring to regenerate"
    jsonschema.Draft202012Validator.check_schema(json.loads(generated))


def test_every_field_of_the_schema_says_what_it_holds():
    """A reader of a Hub repo's manifest finds each field described in the schema (from the fields' docstrings)."""
    schema = json.loads(shipped_schema_path().read_text())
    fields = [(name, field, spec) for name, definition in [("Manifest", schema), *schema["$defs"].items()]
              for field, spec in definition.get("properties", {}).items()]
    assert len(fields) > 200
    undescribed = [f"{name}.{field}" for name, field, spec in fields if not spec.get("description", "").strip()]
    assert undescribed == []


@pytest.fixture(scope="module")
def built(tmp_path_factory, example_built):
    folder = tmp_path_factory.mktemp("schema")
    copy_built(example_built, folder)
    return folder / "work" / "repos"


def test_a_real_builds_manifest_is_valid(built):
    """The ladder's one repo: a manifest holding every quant's records."""
    schema = json.loads(shipped_schema_path().read_text())
    manifest = json.loads((built / "ladder" / "moeq-manifest.json").read_text())
    assert [q["quant"] for q in manifest["quants"]] == ["Q8_0", "Q4_K_M", "Q2_K"]
    for quant in manifest["quants"]:
        assert quant["records"]["bench"] is not None and quant["records"]["validate"] is not None
    jsonschema.Draft202012Validator(schema).validate(manifest)


def test_the_schema_refuses_what_a_reader_must_not_trust(built):
    validator = jsonschema.Draft202012Validator(json.loads(shipped_schema_path().read_text()))
    manifest = json.loads((built / "ladder" / "moeq-manifest.json").read_text())
    for path, value in [(("quants", 0, "records", "quantize", "quant_bpw"), "8.5"),
                        (("quants", 1, "records", "bench", "speed", 0, "mode"), 3),
                        (("quants", 0, "files", 0, "sha256"), None), (("manifest_version",), 2),
                        (("layout",), "both")]:
        bad = json.loads(json.dumps(manifest))
        target = bad
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        assert list(validator.iter_errors(bad)), path
    bad = json.loads(json.dumps(manifest))
    bad["quants"][0]["records"]["quantize"]["surprise"] = 1  # an unknown key: not a manifest of this version
    assert list(validator.iter_errors(bad))
