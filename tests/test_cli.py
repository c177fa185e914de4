"""The command line as a user meets it: help, version, errors without tracebacks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from moeq import __version__

from conftest import REPO, run_moeq


def test_help_lists_commands_in_the_order_a_user_meets_them():
    proc = run_moeq("--help", env={"COLUMNS": "100"})
    assert proc.returncode == 0
    listed = re.findall(r"^│ ([a-z-]+) ", proc.stdout.split("Commands")[1], flags=re.MULTILINE)
    assert listed == ["build", "fetch", "imatrix", "recipe", "quantize", "validate", "bench", "compare", "card", "push",
                      "publish", "plan", "check-config", "doctor", "synth"]


def test_help_wraps_each_paragraph_as_the_terminal_allows():
    """A docstring's line breaks are for the code's reader: --help and the list of commands wrap the words to the
    terminal (a line broke mid-sentence where the docstring did), and build's stages include the recipe."""
    listed = run_moeq("--help", env={"COLUMNS": "400"}).stdout
    build_line = next(line for line in listed.splitlines() if line.startswith("│ build "))
    assert "fetch -> imatrix -> recipe -> choice -> quantize" in build_line and "published)." in build_line
    publish_line = next(line for line in listed.splitlines() if line.startswith("│ publish "))
    assert "and make one commit on main" in publish_line
    own = run_moeq("build", "--help", env={"COLUMNS": "400"}).stdout
    assert any("The summary says why each skipped stage was skipped. Exit 0 when every quant succeeded" in line
               for line in own.splitlines())
    assert "recipe, choice, quantize" in own  # --force-stage names every stage


@pytest.mark.parametrize("command", [[], ["build"], ["imatrix"], ["recipe"], ["quantize"], ["validate"], ["bench"],
                                     ["compare"], ["card"],
                                     ["card", "lint"], ["push"], ["publish"], ["doctor"], ["synth", "tiny-phimoe"],
                                     ["synth", "tiny-phimoe-hf"]])
@pytest.mark.slow
def test_flags_do_not_look_like_they_take_a_value(command):
    proc = run_moeq(*command, "--help", env={"COLUMNS": "200"})
    assert proc.returncode == 0 and "--help" in proc.stdout
    assert "<bool>" not in proc.stdout


def _folder_with_pipeline(tmp_path: Path) -> Path:
    folder = tmp_path / "release"
    folder.mkdir()
    (folder / "pipeline.yaml").write_text((REPO / "examples" / "tiny-phimoe.yaml").read_text())
    return folder


def test_config_defaults_to_pipeline_yaml_here(tmp_path):
    folder = _folder_with_pipeline(tmp_path)
    proc = run_moeq("check-config", "--json", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[0] == "pipeline: pipeline.yaml (default)"
    assert json.loads(proc.stdout)["workspace"] == str(folder / "work")
    # MOEQ_CONFIG names another file; --config wins over both.
    other = tmp_path / "other.yaml"
    other.write_text((folder / "pipeline.yaml").read_text().replace("name: tiny-phimoe", "name: other-model"))
    proc = run_moeq("check-config", cwd=folder, env={"MOEQ_CONFIG": str(other)})
    assert proc.stderr.splitlines()[0] == f"pipeline: {other} (MOEQ_CONFIG)" and "other-model" in proc.stdout
    proc = run_moeq("check-config", "--config", "pipeline.yaml", cwd=folder, env={"MOEQ_CONFIG": str(other)})
    assert proc.stderr.splitlines()[0] == "pipeline: pipeline.yaml (--config)" and "other-model" not in proc.stdout


@pytest.mark.parametrize("command", [["build", "--quant", "Q8_0"], ["quantize"], ["validate", "--quant", "Q8_0"],
                                     ["bench"], ["card"], ["card", "preview", "--quant", "Q8_0"], ["push"], ["fetch"],
                                     ["check-config"], ["imatrix"]])
def test_a_missing_default_pipeline_is_one_line(tmp_path, command):
    proc = run_moeq(*command, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == (f"error: {tmp_path / 'pipeline.yaml'}: no pipeline file here; pass --config PATH, "
                           "set MOEQ_CONFIG, or run moeq in the folder that holds pipeline.yaml\n")


def test_check_config_shows_the_default_repo_named_after_the_model(tmp_path):
    folder = _folder_with_pipeline(tmp_path)
    text = (folder / "pipeline.yaml").read_text().replace("name: tiny-phimoe", "name: Qwen3-30B-A3B")
    (folder / "pipeline.yaml").write_text(text)
    proc = run_moeq("check-config", "--json", cwd=folder)
    assert [q["repo"] for q in json.loads(proc.stdout)["quants"]] == ["moeq-test/Qwen3-30B-A3B-GGUF"] * 3
    (folder / "pipeline.yaml").write_text(text.replace("  max_shard_size: 50GB\n",
                                                       "  max_shard_size: 50GB\n  layout: per-quant\n"))
    proc = run_moeq("check-config", "--json", cwd=folder)
    assert [q["repo"] for q in json.loads(proc.stdout)["quants"]] == [
        "moeq-test/Qwen3-30B-A3B-Q8_0-GGUF", "moeq-test/Qwen3-30B-A3B-Q4_K_M-GGUF", "moeq-test/Qwen3-30B-A3B-Q2_K-GGUF"]


def test_version():
    proc = run_moeq("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"moeq {__version__}"


def test_bad_config_is_one_line_without_traceback(tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("model:\n  name: x\n  base_model: a/b\n  license: mit\n  quantized_by: me\n"
                   "source: {kind: synth}\nquants: [Q7_Z]\nhub: {namespace: me}\n")
    proc = run_moeq("check-config", "--config", str(cfg))
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {cfg}:7: quants[0]: unknown quant type 'Q7_Z'")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_debug_shows_the_traceback(tmp_path):
    proc = run_moeq("--debug", "check-config", "--config", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr
    assert proc.stderr.rstrip().endswith("pipeline file not found; pass --config with the path to your pipeline.yaml")


def test_check_config_lists_repos():
    proc = run_moeq("check-config", "--config", "pipeline.yaml", "--json")
    assert proc.returncode == 0, proc.stderr
    assert '"repo": "moeq/Phi-3.5-MoE-instruct-GGUF"' in proc.stdout


def test_the_build_summary_times_a_shared_step_once_and_names_the_ladders_repo(tmp_path):
    """The importance matrix is made once for every rung: its time shows under the first, "the same run" under the
    others (it read "ran 47.4s" under each, as if it had run twice); the push plan of the ladder's one repo is
    named by the repo, not by the first quant."""
    from moeq.build import BuildSummary, QuantRow
    from moeq.cli.build import _print_summary
    from moeq.cli.output import console
    from moeq.stage_runner import StageResult, Status
    from moeq.workspace import Workspace

    imatrix = StageResult("imatrix", Status.RAN, "no record", 47.4)
    plan = [{"path": "tiny-Q2_K.gguf", "action": "add", "size": 1000}]
    rows = [QuantRow(q, "me/tiny-GGUF", "http://hub/me/tiny-GGUF",
                     [imatrix, StageResult("quantize", Status.RAN, "no record", seconds)], plan)
            for q, seconds in (("Q4_K_M", 2.0), ("Q2_K", 1.5))]
    with console.capture() as captured:
        _print_summary(BuildSummary(rows, pushed=False, single_repo=True), Workspace(tmp_path))
    text = captured.get()
    imatrix_line = next(line for line in text.splitlines() if "imatrix" in line)
    assert "ran 47.4s" in imatrix_line and "the same run" in imatrix_line and imatrix_line.count("47.4") == 1
    quantize_line = next(line for line in text.splitlines() if "quantize" in line)
    assert "ran 2.0s" in quantize_line and "ran 1.5s" in quantize_line
    assert "me/tiny-GGUF, the ladder's repo: push plan (dry run, not compared with the Hub): tiny-Q2_K.gguf" in \
        text.replace("\n", "")
