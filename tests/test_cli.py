"""The command line as a user meets it: help, version, errors without tracebacks."""

from __future__ import annotations

from moeq import __version__

from conftest import run_moeq


def test_help_lists_commands():
    proc = run_moeq("--help")
    assert proc.returncode == 0
    for command in ("doctor", "synth", "check-config"):
        assert command in proc.stdout


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
    assert '"repo": "moeq/phi-3.5-moe-q2-k-cpu-offload-gguf"' in proc.stdout
