"""The one error type: where, problem and fix are fields, each required, printed as one line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from moeq import errors
from moeq.config.load import load_pipeline
from moeq.config.yaml_nodes import CONFIG_FIX
from moeq.errors import ConfigError, InputError, MoeqError
from moeq.gguf_header import read_header

REPO = Path(__file__).resolve().parents[1]
ERROR_TYPES = {name for name, value in vars(errors).items()
               if isinstance(value, type) and issubclass(value, MoeqError)}


def test_every_error_moeq_raises_names_where_problem_and_fix():
    """Read from the source, so a message that would drop its fix is caught before the line ever runs."""
    short = []
    for path in sorted((REPO / "moeq").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ERROR_TYPES:
                if len(node.args) + len(node.keywords) != 3:
                    short.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert ERROR_TYPES >= {"ConfigError", "InputError", "ToolError", "HubError", "ResourceError", "CheckFailed"}
    assert not short, short


def test_an_error_without_a_fix_is_refused():
    with pytest.raises(TypeError):
        InputError("model.gguf", "not a GGUF file", "")
    error = InputError(Path("model.gguf"), "not a GGUF file", "give a .gguf file")
    assert (error.where, str(error)) == ("model.gguf", "model.gguf: not a GGUF file; give a .gguf file")


def test_a_damaged_header_is_named_with_its_fix(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x01")
    with pytest.raises(InputError) as info:
        read_header(junk)
    assert info.value.where == str(junk)
    assert info.value.problem.startswith("GGUF header is truncated at byte ")
    assert info.value.fix == "the file is damaged or cut short; download or make it again"


def test_a_pipeline_error_names_file_line_and_key(tmp_path):
    config = tmp_path / "pipeline.yaml"
    config.write_text((REPO / "examples" / "tiny-phimoe.yaml").read_text().replace("type: Q8_0", "type: Q8_0\n    colour: red", 1))
    line = next(n for n, text in enumerate(config.read_text().splitlines(), 1) if "colour" in text)
    with pytest.raises(ConfigError) as info:
        load_pipeline(config)
    assert info.value.where == f"{config}:{line}: quants[0].colour"
    assert info.value.problem == "unknown key"
    assert info.value.fix.startswith("allowed here: type, ")
    assert CONFIG_FIX.startswith("fix it in the pipeline file")
