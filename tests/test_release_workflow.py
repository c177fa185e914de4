"""The release workflow: valid for GitHub, clean under zizmor, and wired to the ladder and to moeq build."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from moeq.config import load_pipeline

from conftest import REPO

WORKFLOW = REPO / ".github" / "workflows" / "release.yml"
BIN = Path(sys.executable).parent


def workflow() -> dict:
    return yaml.load(WORKFLOW.read_text(), Loader=yaml.BaseLoader)  # BaseLoader: 'on' stays a string key


def test_valid_against_the_github_workflow_schema():
    proc = subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_zizmor_finds_nothing():
    proc = subprocess.run([str(BIN / "zizmor"), "--offline", "--no-progress", str(WORKFLOW)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No findings" in proc.stdout + proc.stderr


def test_triggers_matrix_and_jobs():
    wf = workflow()
    assert set(wf["on"]) == {"push", "workflow_dispatch"} and wf["on"]["push"]["tags"] == ["v*"]
    jobs = wf["jobs"]
    assert jobs["build"]["needs"] == "ladder" and jobs["check"]["needs"] == "build"
    assert jobs["build"]["strategy"]["matrix"]["quant"] == "${{ fromJSON(needs.ladder.outputs.quants) }}"
    for job in jobs.values():
        assert "moeq-large-disk" in job["runs-on"] and "self-hosted" in job["runs-on"]
    steps = {s.get("name", s.get("uses")): s for s in jobs["build"]["steps"]}
    build = steps["Build, bench and push ${{ matrix.quant }}"]
    assert build["env"] == {"HF_TOKEN": "${{ secrets.HF_TOKEN }}", "QUANT": "${{ matrix.quant }}"}
    assert build["run"].startswith('.venv/bin/moeq build --config pipeline.yaml --quant "$QUANT" --push --json')
    upload = next(s for s in jobs["build"]["steps"] if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert "work/records/" in upload["with"]["path"] and upload["if"] == "always()"
    check_runs = [s.get("run", "") for s in jobs["check"]["steps"]]
    assert ".venv/bin/moeq push --config pipeline.yaml --check" in check_runs


def test_the_release_measures_with_the_cuda_build():
    """Every job sets up the CUDA tools; the build job's doctor (which pipeline.yaml's toolchain.backend makes
    insist on them) runs before anything is built."""
    jobs = workflow()["jobs"]
    for name, job in jobs.items():
        runs = [s.get("run", "") for s in job["steps"]]
        assert "scripts/setup --backend cuda" in runs and "scripts/setup" not in runs, name
    runs = [s.get("run", "") for s in jobs["build"]["steps"]]
    doctor = runs.index(".venv/bin/moeq doctor --config pipeline.yaml")
    assert runs.index("scripts/setup --backend cuda") < doctor < next(i for i, r in enumerate(runs) if "moeq build" in r)
    assert load_pipeline(REPO / "pipeline.yaml").toolchain.backend == "cuda"


def test_every_action_is_pinned_to_a_commit():
    uses = re.findall(r"uses:\s*(\S+)", WORKFLOW.read_text())
    assert uses and all(re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", u) for u in uses), uses


def test_matrix_script_reads_the_ladder():
    def matrix(*args: str) -> list[str]:
        proc = subprocess.run([sys.executable, "scripts/release-matrix", "pipeline.yaml", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        key, _, value = proc.stdout.strip().partition("=")
        assert key == "quants"
        return json.loads(value)

    assert matrix() == ["Q8_0", "Q4_K_M", "Q2_K"]
    assert matrix("q2_k Q8_0") == ["Q2_K", "Q8_0"]
    proc = subprocess.run([sys.executable, "scripts/release-matrix", "pipeline.yaml", "Q5_K_M"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "no quant 'Q5_K_M' in the ladder" in proc.stderr
