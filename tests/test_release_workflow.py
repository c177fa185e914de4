"""The release workflow: valid for GitHub, clean under zizmor, and wired as a release across machines: an imatrix job,
quant jobs in parallel that stage on a branch, one publish job."""

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


def runs(job: dict) -> list[str]:
    return [s.get("run", "") for s in job["steps"]]


def test_triggers_and_the_jobs_of_a_release_across_machines():
    wf = workflow()
    assert set(wf["on"]) == {"push", "workflow_dispatch"} and wf["on"]["push"]["tags"] == ["v*"]
    assert set(wf["on"]["workflow_dispatch"]["inputs"]) == {"quants", "branch"}
    jobs = wf["jobs"]
    assert list(jobs) == ["ladder", "imatrix", "quant", "publish"]
    assert jobs["imatrix"]["needs"] == "ladder" and jobs["quant"]["needs"] == ["ladder", "imatrix"]
    assert jobs["publish"]["needs"] == ["ladder", "quant"]  # after every quant job of the matrix
    matrix = jobs["quant"]["strategy"]
    assert matrix["matrix"]["quant"] == "${{ fromJSON(needs.ladder.outputs.quants) }}"
    assert int(matrix["max-parallel"]) > 1 and matrix["fail-fast"] == "false"
    for name in ("imatrix", "quant"):  # the jobs that measure, on a runner with a GPU and the disk for the F16
        assert {"self-hosted", "linux", "gpu", "moeq-large-disk"} <= set(jobs[name]["runs-on"]), name
    assert {"self-hosted", "gpu"} <= set(jobs["publish"]["runs-on"])


def test_no_job_shares_a_workspace_with_another():
    for name, job in workflow()["jobs"].items():
        checkout = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/checkout@"))
        assert checkout["with"].get("clean", "true") == "true", name  # a clean checkout: no work/ left behind
        assert checkout["with"]["persist-credentials"] == "false", name
    uses = re.findall(r"uses:\s*(\S+)", WORKFLOW.read_text())
    assert not [u for u in uses if u.startswith("actions/cache")]


def test_the_importance_matrix_is_made_once_and_handed_over_as_an_artifact():
    jobs = workflow()["jobs"]
    made = runs(jobs["imatrix"])
    fetch = made.index(".venv/bin/moeq fetch --config pipeline.yaml")
    assert made[fetch + 1] == ".venv/bin/moeq imatrix --config pipeline.yaml --json > imatrix.json"
    upload = next(s for s in jobs["imatrix"]["steps"] if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["with"]["name"] == "imatrix"
    assert upload["with"]["path"].split() == ["work/records/imatrix.json", "work/imatrix/*.imatrix"]
    download = next(s for s in jobs["quant"]["steps"] if s.get("uses", "").startswith("actions/download-artifact@"))
    assert download["with"] == {"name": "imatrix", "path": "imatrix-artifact"}
    assert not any("moeq imatrix" in r for r in runs(jobs["quant"]))


def test_quant_jobs_stage_and_the_publish_job_publishes_then_checks_main():
    jobs = workflow()["jobs"]
    build = next(s for s in jobs["quant"]["steps"] if "moeq build" in s.get("run", ""))
    assert build["env"] == {"HF_TOKEN": "${{ secrets.HF_TOKEN }}", "QUANT": "${{ matrix.quant }}",
                            "BRANCH": "${{ needs.ladder.outputs.branch }}"}
    assert " ".join(build["run"].split()) == (
        '.venv/bin/moeq build --config pipeline.yaml --quant "$QUANT" --imatrix-from imatrix-artifact '
        '--stage-to "$BRANCH" --json > "build-$QUANT.json"')
    assert not any("--push" in r for r in runs(jobs["quant"]))
    published = runs(jobs["publish"])
    publish = next(i for i, r in enumerate(published) if "moeq publish" in r)
    assert published[publish] == ('.venv/bin/moeq publish --config pipeline.yaml --from-branch "$BRANCH" --json '
                                  '> publish.json')
    assert published[publish + 1] == ".venv/bin/moeq push --config pipeline.yaml --check"  # it ends with the check
    upload = next(s for s in jobs["quant"]["steps"] if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert "work/records/" in upload["with"]["path"] and upload["if"] == "always()"


def test_the_staging_branch_is_named_for_the_run_or_given():
    ladder = workflow()["jobs"]["ladder"]
    step = next(s for s in ladder["steps"] if s.get("id") == "matrix")
    assert step["env"]["RUN_ID"] == "${{ github.run_id }}" and step["env"]["BRANCH"] == "${{ inputs.branch }}"
    assert 'echo "branch=${BRANCH:-release-$RUN_ID}" >> "$GITHUB_OUTPUT"' in step["run"]


def test_the_release_measures_with_the_cuda_build():
    """Every job sets up the CUDA tools; the jobs that measure run doctor (which pipeline.yaml's toolchain.backend
    makes insist on them) before anything is built."""
    jobs = workflow()["jobs"]
    for name, job in jobs.items():
        assert "scripts/setup --backend cuda" in runs(job) and "scripts/setup" not in runs(job), name
    for name, tool, job in (("imatrix", "moeq fetch", "imatrix"), ("quant", "moeq build", '"$QUANT"')):
        steps = runs(jobs[name])
        doctor = steps.index(f".venv/bin/moeq doctor --config pipeline.yaml --job {job}")  # this job's disk alone
        assert steps.index("scripts/setup --backend cuda") < doctor < next(i for i, r in enumerate(steps) if tool in r)
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
