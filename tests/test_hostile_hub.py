"""A hostile or busy Hub, through the real command line against the test Hub server: no file written outside the
workspace, no GGUF deleted that moeq did not publish or was not asked to, no push that overwrites another.

Each test checks the documented exit code, one `error:` line, no traceback, no `.partial` left, and the Hub
unchanged where nothing should change.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moeq.config import SynthSpec

from conftest import HUB_TOKEN, REPO, default_sigint, quick_imatrix, run_moeq
from hub_server import Fault
from test_hostile import assert_clean_failure

REPO_ID = "moeq-test/tiny-phimoe-GGUF"
EXAMPLE = (REPO / "examples" / "tiny-phimoe.yaml").read_text()


def workspace(folder: Path, text: str = EXAMPLE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pipeline.yaml").write_text(quick_imatrix(text))
    return folder / "pipeline.yaml"


def moeq(hub, *args: str) -> subprocess.CompletedProcess:
    proc = run_moeq(*args, env=hub.env)
    assert HUB_TOKEN not in proc.stdout + proc.stderr
    return proc


def head(hub) -> str:
    return hub.state.repos[REPO_ID].refs["main"]


# ---------------------------------------------------------------- 1: a tree listing that leaves the download folder

@pytest.mark.slow
@pytest.mark.parametrize("hostile", ["absolute", "climbing"])
def test_a_hostile_tree_listing_writes_nothing_outside_the_workspace(tmp_path, test_hub, toolchain, hostile):
    from moeq.synth_hf import write_tiny_phimoe_hf

    checkpoint = write_tiny_phimoe_hf(tmp_path / "hf", SynthSpec(vocab=320))
    files = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    outside = tmp_path / "outside" / "planted.safetensors"
    # fnmatch's '*' matches '/': LICENSE.* takes a path that climbs out of work/source/hf/<repo>@<commit>/
    name = str(outside) if hostile == "absolute" else "LICENSE./../../../../../outside/planted.safetensors"
    files[name] = b"bytes a hostile Hub wants on your disk\n"
    commit = test_hub.state.add_files("someone/tiny-phimoe-hf", files)
    text = EXAMPLE[:EXAMPLE.index("source:\n")] + ("source:\n  kind: hf\n  repo: someone/tiny-phimoe-hf\n"
                                                   f"  revision: {commit}\n") + EXAMPLE[EXAMPLE.index("\nworkspace:"):]
    config = workspace(tmp_path / "ws", text)
    proc = moeq(test_hub, "fetch", "--config", str(config))
    assert_clean_failure(proc, 5, tmp_path, f"someone/tiny-phimoe-hf@{commit[:12]}: the Hub lists {name!r}, which is "
                                            "not a file inside the download folder", "nothing was downloaded")
    assert not outside.exists() and not (tmp_path / "outside").exists()
    assert not any(r.path.startswith("/someone/tiny-phimoe-hf/resolve/") for r in test_hub.requests)


def test_a_record_whose_path_climbs_out_of_the_workspace_is_not_used(tmp_path, toolchain):
    config = workspace(tmp_path)
    assert run_moeq("quantize", "--config", str(config), "--quant", "Q8_0").returncode == 0
    record = tmp_path / "work" / "records" / "quantize-Q8_0.json"
    data = json.loads(record.read_text())
    data["record"]["output"]["path"] = "../../../etc/passwd"
    record.write_text(json.dumps(data))
    passwd = Path("/etc/passwd").read_bytes()
    proc = run_moeq("validate", "--config", str(config), "--quant", "Q8_0")  # its plan makes the file again
    assert proc.returncode == 0, proc.stderr
    assert f"{record}: names the path '../../../etc/passwd', which leaves the workspace; quantize will run " \
        "again" in proc.stderr
    assert json.loads(record.read_text())["record"]["output"]["path"] == "quants/tiny-phimoe-Q8_0.gguf"
    assert Path("/etc/passwd").read_bytes() == passwd


# ---------------------------------------------------------------- 2, 3: what a push may delete

@pytest.mark.slow
def test_a_fresh_workspace_pushing_one_quant_deletes_no_other(tmp_path, test_hub, toolchain):
    first = workspace(tmp_path / "first")
    proc = moeq(test_hub, "build", "--config", str(first), "--quant", "Q8_0", "--quant", "Q4_K_M", "--skip-bench",
                "--push")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    before = head(test_hub)
    published = dict(test_hub.state.files(REPO_ID))
    fresh = workspace(tmp_path / "fresh")  # a new runner: the same pipeline, nothing built yet
    proc = moeq(test_hub, "build", "--config", str(fresh), "--quant", "Q4_K_M", "--skip-bench", "--push")
    assert_clean_failure(proc, 3, tmp_path, "push failed:", f"{REPO_ID}: holds tiny-phimoe-Q8_0.gguf, the Q8_0 "
                                            "that moeq published, but the card staged in",
                         "build Q8_0 in this workspace too")
    assert head(test_hub) == before and test_hub.state.files(REPO_ID) == published
    # Built there too, the ladder is pushed whole again: Q8_0 stays, nothing is deleted.
    proc = moeq(test_hub, "build", "--config", str(fresh), "--quant", "Q8_0", "--quant", "Q4_K_M", "--skip-bench",
                "--push")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(test_hub.state.files(REPO_ID)) == set(published)


@pytest.mark.slow
def test_a_gguf_moeq_did_not_publish_is_kept_unless_pruned(tmp_path, test_hub, toolchain):
    config = workspace(tmp_path)
    proc = moeq(test_hub, "build", "--config", str(config), "--quant", "Q8_0", "--skip-bench", "--push")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    test_hub.state.add_files(REPO_ID, {"tiny-phimoe-Q5_K_M.gguf": b"GGUF uploaded by someone else"})
    ours = head(test_hub)
    proc = moeq(test_hub, "push", "--config", str(config), "--quant", "Q8_0")
    assert proc.returncode == 0, proc.stderr
    assert (f"{REPO_ID}: kept tiny-phimoe-Q5_K_M.gguf, which moeq did not publish (push --prune deletes it)"
            in proc.stderr)
    assert head(test_hub) == ours and "tiny-phimoe-Q5_K_M.gguf" in test_hub.state.files(REPO_ID)
    proc = moeq(test_hub, "push", "--config", str(config), "--dry-run", "--json")
    [row] = json.loads(proc.stdout)
    assert {"path": "tiny-phimoe-Q5_K_M.gguf", "action": "kept", "size": 0, "sha256": None} in row["files"]
    proc = moeq(test_hub, "push", "--config", str(config), "--quant", "Q8_0", "--prune")
    assert proc.returncode == 0, proc.stderr
    assert "tiny-phimoe-Q5_K_M.gguf" not in test_hub.state.files(REPO_ID)
    assert "tiny-phimoe-Q8_0.gguf" in test_hub.state.files(REPO_ID)


@pytest.mark.slow
def test_a_manifest_on_the_hub_that_is_too_big_or_too_deep(tmp_path, test_hub, toolchain):
    config = workspace(tmp_path)
    assert moeq(test_hub, "build", "--config", str(config), "--quant", "Q8_0", "--skip-bench",
                "--push").returncode == 0
    test_hub.state.add_files(REPO_ID, {"moeq-manifest.json": b"[" * 200_000 + b"]" * 200_000})
    for args in (["push", "--dry-run"], ["push", "--check"]):
        proc = moeq(test_hub, *args, "--config", str(config))
        assert proc.returncode in (0, 7) and "Traceback" not in proc.stderr, proc.stderr
    big = b" " * ((16 << 20) + 1)
    test_hub.state.add_files(REPO_ID, {"moeq-manifest.json": big})
    commits = len(test_hub.state.commits_on(REPO_ID))
    start = len(test_hub.requests)
    proc = moeq(test_hub, "push", "--config", str(config), "--dry-run")
    assert_clean_failure(proc, 5, tmp_path, f"{REPO_ID}/moeq-manifest.json: 16,777,217 bytes on the Hub, more than "
                                            "the 16384 KiB moeq reads for it; nothing was downloaded")
    assert not any("moeq-manifest.json" in r.path and "/resolve/" in r.path for r in test_hub.requests[start:])
    assert len(test_hub.state.commits_on(REPO_ID)) == commits  # moeq committed nothing
    assert test_hub.state.files(REPO_ID)["moeq-manifest.json"] == big


# ---------------------------------------------------------------- 5: two pushes at once

@pytest.mark.slow
def test_a_push_planned_before_another_landed_fails_and_can_be_planned_again(tmp_path, test_hub, toolchain):
    one = workspace(tmp_path / "one")
    assert moeq(test_hub, "build", "--config", str(one), "--quant", "Q8_0", "--skip-bench", "--push").returncode == 0
    two = workspace(tmp_path / "two", EXAMPLE.replace("quantized_by: moeq", "quantized_by: the second runner"))
    assert moeq(test_hub, "build", "--config", str(two), "--quant", "Q8_0", "--skip-bench").returncode == 0
    one.write_text(one.read_text().replace("quantized_by: moeq", "quantized_by: the first runner"))
    assert moeq(test_hub, "card", "--config", str(one), "--quant", "Q8_0").returncode == 0
    test_hub.state.faults.append(Fault("POST", rf"^/api/models/{REPO_ID}/commit/", "sleep", seconds=4))
    commits = sum("/commit/" in r.path for r in test_hub.requests)
    slow = subprocess.Popen([sys.executable, "-m", "moeq", "push", "--config", str(one), "--quant", "Q8_0"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **test_hub.env})
    deadline = time.monotonic() + 60
    while sum("/commit/" in r.path for r in test_hub.requests) == commits and time.monotonic() < deadline:
        time.sleep(0.05)
    proc = moeq(test_hub, "push", "--config", str(two), "--quant", "Q8_0")  # lands while the first one's commit waits
    assert proc.returncode == 0, proc.stderr
    out, err = slow.communicate(timeout=120)
    late = subprocess.CompletedProcess(slow.args, slow.returncode, out, err)
    assert_clean_failure(late, 5, tmp_path, f"{REPO_ID}: main moved on since this push was planned against",
                         "nothing was committed, run the push again")
    assert "the second runner" in test_hub.state.files(REPO_ID)["README.md"].decode()
    proc = moeq(test_hub, "push", "--config", str(one), "--quant", "Q8_0")  # planned again: it lands
    assert proc.returncode == 0, proc.stderr
    assert "the first runner" in test_hub.state.files(REPO_ID)["README.md"].decode()


# ---------------------------------------------------------------- 11: interrupted while uploading

@pytest.mark.slow
def test_sigterm_while_uploading_ends_at_once(tmp_path, test_hub, toolchain):
    config = workspace(tmp_path)
    assert run_moeq("build", "--config", str(config), "--quant", "Q4_K_M", "--skip-bench").returncode == 0
    test_hub.state.faults.append(Fault("PUT", r"^/lfs-upload/", "sleep", seconds=30))
    proc = subprocess.Popen([sys.executable, "-m", "moeq", "push", "--config", str(config), "--quant", "Q4_K_M"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint,
                            env={**os.environ, **test_hub.env})
    deadline = time.monotonic() + 60
    while not any(r.method == "PUT" for r in test_hub.requests) and time.monotonic() < deadline:
        time.sleep(0.05)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 5  # not after the 30 s upload in flight
    assert proc.returncode == 143, out + err
    assert err.splitlines()[-1] == (f"error: interrupted by SIGTERM while uploading to {REPO_ID}; nothing was "
                                    "committed, the repo on the Hub is unchanged; run the push again")
    assert sorted(test_hub.state.files(REPO_ID)) == [".gitattributes"]
