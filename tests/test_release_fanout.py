"""The release across machines: an imatrix job, three quant jobs as separate processes with separate workspaces (no
shared folder but the test Hub), each staging its quant on a branch, then one publish commit on main.

One release runs once for the module (random weights, CPU bench: about a minute); each test reads what it left.
The Q2_K job fails first (the Hub answers 500 to its commit on the branch, after its GGUF was uploaded) and is
rerun; a quant job rerun on a fresh runner whose quant is already staged does nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import hub_server
from conftest import HUB_TOKEN, HUB_USER, PER_QUANT, QUICK_IMATRIX_CHUNKS, pipeline_file, run_moeq
from moeq.push.stage import COMMIT_ATTEMPTS
from moeq.runner import tool_env

REPO_ID = f"{HUB_USER}/tiny-phimoe-GGUF"
BRANCH = "release-v1"
LADDER = ("Q8_0", "Q4_K_M", "Q2_K")
BENCH = {"modes": ["cpu"], "n_prompt": 16, "n_gen": 4, "repetitions": 1, "ctx": [256],
         "perplexity": {"ctx": 128, "chunks": 8}}
FILES = {q: f"tiny-phimoe-{q}.gguf" for q in LADDER}


def job(folder: Path) -> Path:
    """A runner's own checkout and workspace: the pipeline file in FOLDER, its workspace FOLDER/work."""
    return pipeline_file(folder, trained=False, bench=BENCH, imatrix={"ctx": 256, "chunks": QUICK_IMATRIX_CHUNKS})


def moeq_process(config: Path, *args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "moeq", *args, "--config", str(config)], cwd=config.parent,
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def quant_job(folder: Path, quant: str, artifact: Path, env: dict) -> subprocess.Popen:
    return moeq_process(job(folder), "build", "--quant", quant, "--imatrix-from", str(artifact), "--stage-to", BRANCH,
                        "--json", env=env)


@pytest.fixture(scope="module")
def release(tmp_path_factory, toolchain):
    root = tmp_path_factory.mktemp("fanout")
    hub = hub_server.TestHub({HUB_TOKEN: HUB_USER})
    env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": HUB_TOKEN, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(root / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    seen: dict = {"env": env, "root": root}
    # The imatrix job: its records/imatrix.json and imatrix/ are the artifact the quant jobs download.
    made = finished(moeq_process(job(root / "imatrix-job"), "imatrix", env=env))
    assert made.returncode == 0, made.stdout + made.stderr
    artifact = root / "artifact"
    (artifact / "records").mkdir(parents=True)
    shutil.copy(root / "imatrix-job" / "work" / "records" / "imatrix.json", artifact / "records")
    shutil.copytree(root / "imatrix-job" / "work" / "imatrix", artifact / "imatrix")
    seen["artifact"] = artifact
    # Two quant jobs at once, each on its own runner; the Hub answers the first commit on the branch with a 429.
    hub.state.faults.append(hub_server.Fault("POST", rf"/api/models/{REPO_ID}/commit/{BRANCH}$", 429, times=1,
                                             headers={"Retry-After": "1"}))
    both = [quant_job(root / f"job-{q}", q, artifact, env) for q in ("Q8_0", "Q4_K_M")]
    seen["jobs"] = {q: finished(p) for q, p in zip(("Q8_0", "Q4_K_M"), both)}
    main_before = hub.state.repos[REPO_ID].refs["main"]
    # The Q2_K job fails: its GGUF was uploaded, but the Hub answered 500 to every try of the commit on the branch.
    hub.state.faults.append(hub_server.Fault("POST", rf"/api/models/{REPO_ID}/commit/{BRANCH}$", 500,
                                             times=COMMIT_ATTEMPTS))
    seen["failed"] = finished(quant_job(root / "job-Q2_K", "Q2_K", artifact, env))
    seen["publish_refused"] = finished(moeq_process(job(root / "publish-job"), "publish", "--from-branch", BRANCH,
                                                    env=env))
    seen["main_unchanged"] = hub.state.repos[REPO_ID].refs["main"] == main_before
    # A rerun of the Q8_0 job on a fresh runner: its quant is on the branch, staged from the same inputs.
    branch_before, received_before = hub.state.repos[REPO_ID].refs[BRANCH], dict(hub.state.received)
    seen["rerun_current"] = finished(quant_job(root / "job-Q8_0-rerun", "Q8_0", artifact, env))
    seen["rerun_changed_nothing"] = (hub.state.repos[REPO_ID].refs[BRANCH] == branch_before
                                     and hub.state.received == received_before)
    seen["rerun_failed"] = finished(quant_job(root / "job-Q2_K", "Q2_K", artifact, env))
    seen["staged_docs"] = {path: data for path, data in hub.state.files(REPO_ID, BRANCH).items()
                           if path.startswith(".moeq-stage/")}
    main_commits = len(hub.state.commits_on(REPO_ID))
    start = len(hub.requests)
    seen["publish"] = finished(moeq_process(job(root / "publish-job"), "publish", "--from-branch", BRANCH, "--json",
                                            env=env))
    seen["publish_requests"] = hub.requests[start:]
    seen["new_main_commits"] = hub.state.commits_on(REPO_ID)[:len(hub.state.commits_on(REPO_ID)) - main_commits]
    seen["check"] = run_moeq("push", "--check", "--config", str(root / "publish-job" / "tiny-phimoe.yaml"), env=env)
    yield hub, seen
    hub.close()


def test_every_job_ran_on_its_own_and_staged_its_quant(release):
    hub, seen = release
    for quant, proc in seen["jobs"].items():
        assert proc.returncode == 0, proc.stdout + proc.stderr
        summary = json.loads(proc.stdout)
        [row] = summary["quants"]
        stages = {s["stage"]: s["status"] for s in row["stages"]}
        assert stages["push"] == "ran" and stages["fetch"] == "ran"
        assert stages["imatrix"] == ("skipped" if quant == "Q8_0" else "up to date")  # the artifact's, checked
    for quant in LADDER:
        workspace = seen["root"] / f"job-{quant}" / "work"
        assert sorted(p.name for p in (workspace / "quants").glob("*.gguf")) == [FILES[quant]]  # no other quant there
    # Hostile round 3: one 429 on a staging commit failed the job; it is retried after comparing again, as a push is
    retried = [q for q, proc in seen["jobs"].items()
               if "the Hub answered 429 to the commit; comparing with the branch again in 1 s" in proc.stderr]
    assert len(retried) == 1, [proc.stderr[-2000:] for proc in seen["jobs"].values()]
    docs = {path: json.loads(data) for path, data in seen["staged_docs"].items()}
    assert sorted(docs) == [f".moeq-stage/{q}.json" for q in sorted(LADDER)]
    assert all(doc["manifest"]["quants"][0]["quant"] == doc["quant"] for doc in docs.values())


def test_a_failed_job_leaves_main_as_it_was_and_publish_names_the_missing_quant(release):
    _hub, seen = release
    failed = seen["failed"]
    assert failed.returncode != 0
    assert "Q2_K: push failed" in failed.stderr and "500" in failed.stderr and "Traceback" not in failed.stderr
    assert failed.stderr.count("the Hub answered 500 to the commit; comparing with the branch again") == COMMIT_ATTEMPTS - 1
    refused = seen["publish_refused"]
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    [line] = [x for x in refused.stderr.splitlines() if x.startswith("error:")]
    assert f"{REPO_ID}@{BRANCH}: Q2_K not staged" in line and "main is unchanged" in line
    assert seen["main_unchanged"]
    assert seen["rerun_failed"].returncode == 0, seen["rerun_failed"].stdout + seen["rerun_failed"].stderr


def test_a_rerun_of_a_job_whose_quant_is_staged_and_current_does_nothing(release):
    _hub, seen = release
    rerun = seen["rerun_current"]
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    [row] = json.loads(rerun.stdout)["quants"]
    assert [(s["stage"], s["status"]) for s in row["stages"]] == [("push", "up to date")]
    assert f"staged on {BRANCH} from the same inputs" in row["stages"][0]["detail"]
    assert not (seen["root"] / "job-Q8_0-rerun" / "work" / "source").exists()  # not even the source was fetched
    assert seen["rerun_changed_nothing"]


def test_publish_makes_one_commit_on_main_with_the_whole_ladder(release):
    hub, seen = release
    assert seen["publish"].returncode == 0, seen["publish"].stdout + seen["publish"].stderr
    [commit] = seen["new_main_commits"]
    files = hub.state.files(REPO_ID)
    assert set(FILES.values()) | {"tiny-phimoe.imatrix", "README.md", "moeq-manifest.json"} <= set(files)
    assert {p for p in files if p.startswith("images/")} == {"images/quality-size.png", "images/gpu-memory.png"}
    assert not any(p.startswith(".moeq-stage/") for p in files)
    manifest = json.loads(files["moeq-manifest.json"])
    assert [q["quant"] for q in manifest["quants"]] == list(LADDER)
    card = files["README.md"].decode()
    for quant in LADDER:
        assert f"llama-server -hf {REPO_ID}:{quant}" in card and FILES[quant] in card
    assert BRANCH not in hub.state.repos[REPO_ID].refs  # the staging branch is gone
    assert seen["check"].returncode == 0, seen["check"].stdout + seen["check"].stderr
    assert run_moeq("card", "verify", str(seen["root"] / "publish-job" / "work" / "repos" / "ladder" /
                                          "README.md")).returncode == 0
    assert commit.message.startswith("Q8_0, Q4_K_M, Q2_K GGUF, card and records")


def test_every_gguf_reached_the_hub_once(release):
    hub, seen = release
    files = hub.state.files(REPO_ID)
    for name in [*FILES.values(), "tiny-phimoe.imatrix"]:
        sha = __import__("hashlib").sha256(files[name]).hexdigest()
        assert hub.state.received[sha] == len(files[name]), name  # once, though the Q2_K job ran twice
    uploads = [r for r in seen["publish_requests"] if r.path.startswith(("/lfs-upload/", "/lfs-part/"))]
    assert sum(r.body_bytes for r in uploads) < 200_000  # the publish sent the charts, no GGUF
    published = json.loads(seen["publish"].stdout)["record"]
    assert {f["path"] for f in published["files"] if f["action"] == "add"} >= set(FILES.values())
    assert published["uploaded_bytes"] < 200_000


def test_llama_cpp_runs_a_quant_from_main(release, tmp_path, toolchain):
    hub, _seen = release
    env = {**os.environ, **tool_env(toolchain.path("llama-completion")), "MODEL_ENDPOINT": hub.url + "/",
           "LLAMA_CACHE": str(tmp_path / "llama-cache")}
    env.pop("HF_TOKEN", None)
    start = len(hub.requests)
    proc = subprocess.run([str(toolchain.path("llama-completion")), "-hf", f"{REPO_ID}:Q4_K_M", "-p", "The", "-n",
                           "4", "--temp", "0", "-no-cnv", "--no-warmup", "-t", "2"], env=env, capture_output=True,
                          text=True, errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = {(r.path.split("/resolve/")[1]) for r in hub.requests[start:] if "/resolve/" in r.path}
    assert resolved == {f"{hub.state.repos[REPO_ID].refs['main']}/{FILES['Q4_K_M']}"}  # main's head, which -hf asks
    [got] = [p for p in (tmp_path / "llama-cache").rglob(FILES["Q4_K_M"]) if p.is_file()]
    assert got.read_bytes() == hub.state.files(REPO_ID)[FILES["Q4_K_M"]]


@pytest.mark.parametrize("tamper, expected", [
    ("doc", ".moeq-stage/Q2_K.json: not a quant Q2_K staged by this moeq"),
    ("json", ".moeq-stage/Q4_K_M.json: not a staged quant moeq can read"),
    ("gguf", "tiny-phimoe-Q8_0.gguf (sha256"),
    ("path", "names the repo file '../../escape.gguf', not a path inside the repo"),
])
def test_publish_refuses_a_branch_that_is_not_as_the_records_say(release, tamper, expected):
    hub, seen = release
    docs = dict(seen["staged_docs"])
    branch = f"hostile-{tamper}"
    if tamper == "doc":
        docs[".moeq-stage/Q2_K.json"] = docs[".moeq-stage/Q8_0.json"]
    elif tamper == "json":
        docs[".moeq-stage/Q4_K_M.json"] = b"{" * 100_000
    elif tamper == "path":
        doc = json.loads(docs[".moeq-stage/Q8_0.json"])
        doc["manifest"]["quants"][0]["files"][0]["name"] = "../../escape.gguf"
        docs[".moeq-stage/Q8_0.json"] = json.dumps(doc).encode()
    else:
        docs[FILES["Q8_0"]] = hub.state.files(REPO_ID)[FILES["Q8_0"]][:-16] + b"\0" * 16
    hub.state.repos[REPO_ID].refs[branch] = hub.state.repos[REPO_ID].refs["main"]
    hub.state.add_files(REPO_ID, docs, ref=branch)
    main_before = hub.state.repos[REPO_ID].refs["main"]
    proc = run_moeq("publish", "--from-branch", branch, "--config",
                    str(seen["root"] / "publish-job" / "tiny-phimoe.yaml"), env=seen["env"])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert expected in line, line
    assert hub.state.repos[REPO_ID].refs["main"] == main_before
    assert branch in hub.state.repos[REPO_ID].refs  # kept, for the maintainer to look at


def test_an_importance_matrix_not_as_its_record_says_is_refused(release, tmp_path):
    _hub, seen = release
    artifact = tmp_path / "artifact"
    shutil.copytree(seen["artifact"], artifact)
    matrix = artifact / "imatrix" / "tiny-phimoe.imatrix"
    matrix.write_bytes(matrix.read_bytes()[:-8] + b"\1" * 8)
    config = job(tmp_path / "job")
    proc = run_moeq("build", "--quant", "Q4_K_M", "--imatrix-from", str(artifact), "--config", str(config),
                    env=seen["env"])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"{matrix}: not the importance matrix its record" in proc.stderr
    # Hostile round 3: the matrix a link leaving the folder (to the very bytes its record names) was an internal error.
    outside = tmp_path / "outside.imatrix"
    shutil.copyfile(seen["artifact"] / "imatrix" / "tiny-phimoe.imatrix", outside)
    matrix.unlink()
    matrix.symlink_to(outside)
    proc = run_moeq("build", "--quant", "Q4_K_M", "--imatrix-from", str(artifact), "--config", str(config),
                    env=seen["env"])
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr
    assert f"its importance matrix {matrix} lies outside {artifact}" in proc.stderr.strip().splitlines()[-1]
    # Made with another calibration text than this pipeline's: its record's key says so.
    data = yaml.safe_load(config.read_text())
    (tmp_path / "other.txt").write_text("Another calibration text, with words enough to fill a chunk. " * 400)
    data["imatrix"] = {**data.get("imatrix", {}), "calibration": str(tmp_path / "other.txt")}
    config.write_text(yaml.safe_dump(data))
    proc = run_moeq("build", "--quant", "Q4_K_M", "--imatrix-from", str(seen["artifact"]), "--config", str(config),
                    env=seen["env"])
    assert proc.returncode != 0 and "calibration_sha256" in proc.stderr and "made from other inputs" in proc.stderr


@pytest.mark.parametrize("branch", ["main", "../up", "a b", "x" * 101, "-dash", "a..b", "x.lock"])
def test_a_staging_branch_name_git_or_the_hub_would_misread_is_refused(tmp_path, branch):
    config = job(tmp_path)
    for args in (["build", "--quant", "Q8_0", "--stage-to", branch], ["publish", "--from-branch", branch]):
        proc = run_moeq(*args, "--config", str(config))
        assert proc.returncode == 2 and "staging branch" in proc.stderr and "Traceback" not in proc.stderr  # usage


@pytest.mark.slow
def test_staging_is_for_the_ladders_one_repo(tmp_path, test_hub):
    config = pipeline_file(tmp_path, trained=False, hub=PER_QUANT)
    proc = run_moeq("build", "--quant", "Q8_0", "--stage-to", BRANCH, "--config", str(config), env=test_hub.env)
    assert proc.returncode != 0 and "hub.layout per-quant" in proc.stderr
    assert not [r for r in test_hub.requests if r.writes]


def test_the_test_hub_answers_the_lfs_batch_per_repo_and_keeps_branches_as_the_hub_does(test_hub):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.lfs import UploadInfo, post_lfs_batch_info

    api = HfApi(endpoint=test_hub.url, token=HUB_TOKEN)
    data = b"GGUF" + bytes(range(256)) * 64
    test_hub.state.add_files(f"{HUB_USER}/a", {"x.gguf": data})
    test_hub.state.create_repo(f"{HUB_USER}/b")
    info = UploadInfo.from_bytes(data)
    headers = {"authorization": f"Bearer {HUB_TOKEN}"}

    def batch(repo: str) -> dict:
        actions, errors, _ = post_lfs_batch_info(upload_infos=[info], repo_id=repo, repo_type="model",
                                                 endpoint=test_hub.url, headers=headers, token=None,
                                                 transfers=["basic"])
        assert not errors
        return actions[0]

    assert "actions" not in batch(f"{HUB_USER}/a")  # stored in this repo: nothing to send
    assert "upload" in batch(f"{HUB_USER}/b")["actions"]  # another repo's object is not this one's
    api.create_branch(f"{HUB_USER}/a", branch="stage")
    with pytest.raises(HfHubHTTPError) as exists:
        api.create_branch(f"{HUB_USER}/a", branch="stage")
    assert exists.value.response.status_code == 409
    api.create_branch(f"{HUB_USER}/a", branch="stage", exist_ok=True)
    assert [b.name for b in api.list_repo_refs(f"{HUB_USER}/a").branches] == ["main", "stage"]
    api.delete_branch(f"{HUB_USER}/a", branch="stage")
    with pytest.raises(HfHubHTTPError) as gone:
        api.delete_branch(f"{HUB_USER}/a", branch="stage")
    assert gone.value.response.status_code == 404
    with pytest.raises(HfHubHTTPError):
        api.delete_branch(f"{HUB_USER}/a", branch="main")


@pytest.mark.slow
def test_one_job_may_stage_several_quants_each_on_its_own(tmp_path, test_hub):
    """A machine that builds Q8_0 and Q4_K_M stages each with a manifest of its own quant; the publish still waits
    for Q2_K, naming it."""
    config = pipeline_file(tmp_path / "job", trained=False, bench={**BENCH, "quality": False})
    proc = run_moeq("build", "--quant", "Q8_0", "--quant", "Q4_K_M", "--stage-to", BRANCH, "--config", str(config),
                    env=test_hub.env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"staged on {BRANCH} (main untouched" in proc.stdout
    staged = test_hub.state.files(REPO_ID, BRANCH)
    docs = {path: json.loads(staged[path]) for path in staged if path.startswith(".moeq-stage/")}
    assert {path: [q["quant"] for q in doc["manifest"]["quants"]] for path, doc in docs.items()} == {
        ".moeq-stage/Q8_0.json": ["Q8_0"], ".moeq-stage/Q4_K_M.json": ["Q4_K_M"]}
    assert {FILES["Q8_0"], FILES["Q4_K_M"]} <= set(staged) and "README.md" not in staged
    assert test_hub.state.files(REPO_ID) == {".gitattributes": test_hub.state.files(REPO_ID)[".gitattributes"]}
    publish = run_moeq("publish", "--from-branch", BRANCH, "--config", str(pipeline_file(tmp_path / "pub",
                                                                                      trained=False)),
                       env=test_hub.env)
    assert publish.returncode == 3 and f"{REPO_ID}@{BRANCH}: Q2_K not staged" in publish.stderr


@pytest.mark.slow
def test_a_quants_inputs_name_the_commit_a_hub_sources_revision_resolves_to(tmp_path, test_hub, monkeypatch):
    """A rerun is "current" only for the same source: a Hub source named by a branch is resolved to its commit, so a
    source repo that moved on makes the quant's inputs differ (and the job builds again)."""
    from moeq.steps.context import Context
    from moeq.steps.release import stage_inputs
    from moeq.config import load_pipeline

    test_hub.state.add_files("someone/src", {"config.json": b"{}"})
    data = yaml.safe_load(pipeline_file(tmp_path, trained=False).read_text())
    data["source"] = {"kind": "hf", "repo": "someone/src", "revision": "main"}
    config = tmp_path / "hf.yaml"
    config.write_text(yaml.safe_dump(data))
    for key, value in test_hub.env.items():
        monkeypatch.setenv(key, value)
    pipeline = load_pipeline(config)
    quant = pipeline.quant("Q8_0")
    before = stage_inputs(Context.of(pipeline), quant, None)
    assert before["source"]["commit"] == test_hub.state.repos["someone/src"].refs["main"]
    assert stage_inputs(Context.of(pipeline), quant, None) == before
    test_hub.state.add_files("someone/src", {"config.json": b'{"moved": true}'})
    after = stage_inputs(Context.of(pipeline), quant, None)
    assert after["source"]["commit"] != before["source"]["commit"]
    assert after["quant"] == before["quant"] == {**after["quant"], "type": "Q8_0"}
