"""`moeq push` with the real huggingface_hub client against the Hub-protocol server in tests/hub_server.py."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import gguf
import pytest

from moeq.config import load_pipeline
from moeq.workspace import Workspace

from conftest import HUB_TOKEN, PER_QUANT, REPO, copy_built, example_section, pipeline_file, run_moeq, run_target
from cards_support import make_cards
from hub_server import Blob, Fault

REPO_ID = "moeq-test/tiny-phimoe-GGUF"  # the example's one repo for the ladder


@pytest.fixture(scope="module")
def q8_built(tmp_path_factory, toolchain) -> Path:
    """The example pipeline's folder with its ladder quantized (the choice made) and Q8_0 validated, built once:
    tests copy it. A card lists only the quants asked for and those pushed, so the others change no card."""
    folder = tmp_path_factory.mktemp("q8-built")
    pipeline = load_pipeline(pipeline_file(folder))
    for quant in ("Q8_0", "Q4_K_M", "Q2_K"):
        run_target(pipeline, "quantize", quant)
    run_target(pipeline, "validate", "Q8_0")
    return folder


def staged_pipeline(tmp_path: Path, built: Path, card: dict | None = None, hub: dict | None = None,
                    validate: bool = True):
    """The example pipeline in tmp_path, a copy of `built` (its Q8_0 quantized and validated; the validation's
    record removed unless `validate`), with its repo's card made for Q8_0."""
    copy_built(built, tmp_path)
    config = pipeline_file(tmp_path, **({"card": card} if card else {}), **({"hub": hub} if hub else {}))
    pipeline = load_pipeline(config)
    ws = Workspace(pipeline.workspace)
    if not validate:
        ws.record_path("validate", "Q8_0").unlink()
    make_cards(pipeline, ("Q8_0",))
    return config, pipeline, ws


def push(hub, config: Path, *args: str, env: dict | None = None, quants: tuple[str, ...] = ("Q8_0",)):
    selection = [a for q in quants for a in ("--quant", q)]
    proc = run_moeq("push", "--config", str(config), *selection, *args, env={**hub.env, **(env or {})})
    for stream in (proc.stdout, proc.stderr):
        assert HUB_TOKEN not in stream
    return proc


def mark(hub) -> int:
    return len(hub.requests)


def since(hub, start: int):
    return hub.requests[start:]


def uploaded_bytes(requests) -> int:
    return sum(r.body_bytes for r in requests if r.method == "PUT")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.slow
def test_push_is_one_commit_then_nothing(tmp_path, test_hub, q8_built):
    config, pipeline, ws = staged_pipeline(tmp_path, q8_built)
    proc = push(test_hub, config)
    assert proc.returncode == 0, proc.stderr
    assert f"committed {test_hub.url}/{REPO_ID}/commit/" in proc.stdout
    files = test_hub.state.files(REPO_ID)
    staged = ws.repo_dir(None)
    charts = ["images/gpu-memory.png"]  # no bench: no quality chart
    assert sorted(files) == sorted([".gitattributes", "README.md", "moeq-manifest.json", "tiny-phimoe-Q8_0.gguf",
                                    *charts])
    for name in ("README.md", "moeq-manifest.json", "tiny-phimoe-Q8_0.gguf", *charts):
        assert sha256(files[name]) == sha256((staged / name).read_bytes())
    commits = test_hub.state.commits_on(REPO_ID)
    assert len(commits) == 2 and commits[0].message.startswith("Q8_0 GGUF, card and records (moeq ")
    assert "llama.cpp 0c1e570" in commits[0].message
    record = json.loads(ws.record_path("push").read_text())["record"]
    assert record["commit"] == commits[0].oid and record["uploaded_bytes"] > 4_000_000

    start = mark(test_hub)
    proc = push(test_hub, config, "--json")
    assert proc.returncode == 0, proc.stderr
    [result] = json.loads(proc.stdout)
    assert [f["action"] for f in result["files"]] == ["unchanged"] * 4
    assert result["record"]["commit"] is None and result["upload_bytes"] == 0
    assert len(test_hub.state.commits_on(REPO_ID)) == 2
    assert uploaded_bytes(since(test_hub, start)) == 0
    assert not [r for r in since(test_hub, start) if r.writes]


@pytest.mark.slow
def test_changed_card_commits_only_the_card(tmp_path, test_hub, q8_built):
    template = tmp_path / "card.md.j2"
    builtin = (REPO / "templates" / "model-card.md.j2").read_text()
    template.write_text(builtin)
    config, pipeline, ws = staged_pipeline(tmp_path, q8_built, card={**example_section("card"), "template": str(template)})
    assert push(test_hub, config).returncode == 0
    template.write_text(builtin.replace("## Model details", "A line added to the template.\n\n## Model details"))
    make_cards(pipeline, ("Q8_0",))
    start = mark(test_hub)
    proc = push(test_hub, config, "--json")
    assert proc.returncode == 0, proc.stderr
    [result] = json.loads(proc.stdout)
    # The manifest names the templates the card was rendered with (what moeq card verify renders it with again).
    assert {f["path"]: f["action"] for f in result["files"]} == {
        "README.md": "update", "moeq-manifest.json": "update", "tiny-phimoe-Q8_0.gguf": "unchanged",
        "images/gpu-memory.png": "unchanged"}
    new, old = test_hub.state.commits_on(REPO_ID)[:2]
    changed = {p for p in new.files if new.files[p].data != old.files.get(p, Blob(b"", False)).data}
    assert changed == {"README.md", "moeq-manifest.json"}
    assert json.loads(new.files["moeq-manifest.json"].data)["card"]["templates_sha256"] != \
        json.loads(old.files["moeq-manifest.json"].data)["card"]["templates_sha256"]
    assert uploaded_bytes(since(test_hub, start)) == 0  # the card travels inside the commit, no LFS upload


@pytest.mark.slow
def test_create_pr_opens_refs_pr_1(tmp_path, test_hub, q8_built):
    config, _, _ = staged_pipeline(tmp_path, q8_built)
    test_hub.state.create_repo(REPO_ID)
    proc = push(test_hub, config, "--create-pr")
    assert proc.returncode == 0, proc.stderr
    assert f"opened {test_hub.url}/{REPO_ID}/discussions/1" in proc.stdout
    repo = test_hub.state.repos[REPO_ID]
    assert "refs/pr/1" in repo.refs
    assert "README.md" in test_hub.state.files(REPO_ID, "refs/pr/1")
    assert sorted(test_hub.state.files(REPO_ID)) == [".gitattributes"]  # main untouched


@pytest.mark.slow
def test_dry_run_sends_no_write(tmp_path, test_hub, q8_built):
    config, _, _ = staged_pipeline(tmp_path, q8_built)
    proc = push(test_hub, config, "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    [result] = json.loads(proc.stdout)
    assert result["repo_exists"] is False and {f["action"] for f in result["files"]} == {"add"}
    assert result["upload_bytes"] > 4_000_000
    assert test_hub.requests and not [r for r in test_hub.requests if r.writes]
    assert REPO_ID not in test_hub.state.repos
    # Without a token a dry run still plans; a real push says what is missing.
    proc = push(test_hub, config, "--dry-run", env={"HF_TOKEN": ""})
    assert proc.returncode == 0, proc.stderr
    proc = push(test_hub, config, env={"HF_TOKEN": ""})
    assert proc.returncode == 5 and "HF_TOKEN: no Hub token; set HF_TOKEN" in proc.stderr


@pytest.mark.slow
def test_split_shards_rejoin_to_the_original(tmp_path, test_hub, q8_built, toolchain):
    config, pipeline, ws = staged_pipeline(tmp_path, q8_built, validate=False)
    config = pipeline_file(tmp_path, hub={**example_section("hub"), "max_shard_size": "1MB"})
    pipeline = load_pipeline(config)
    make_cards(pipeline, ("Q8_0",))
    readme = (ws.repo_dir(None) / "README.md").read_text()
    assert push(test_hub, config).returncode == 0
    files = test_hub.state.files(REPO_ID)
    shards = sorted(p for p in files if p.endswith(".gguf"))
    # In the one repo a split quant's shards have a folder of their own, as llama.cpp's -hf and the Hub expect.
    assert len(shards) > 2 and shards[0] == f"tiny-phimoe-Q8_0/tiny-phimoe-Q8_0-00001-of-{len(shards):05d}.gguf"
    assert all(len(files[s]) <= 1_000_000 for s in shards[1:])
    for shard in shards:
        assert f"| [{shard}](" in readme  # the card's file table lists the shards
    out = tmp_path / "download"
    out.mkdir()
    for shard in shards:
        (out / Path(shard).name).write_bytes(files[shard])
    merged = tmp_path / "merged.gguf"
    subprocess.run([str(toolchain.path("llama-gguf-split")), "--merge", str(out / Path(shards[0]).name), str(merged)],
                   check=True, capture_output=True)
    # Equal to the original but for the split.* keys llama-gguf-split --merge leaves in the header.
    original, rejoined = (gguf.GGUFReader(p) for p in (ws.quant_path("tiny-phimoe-Q8_0.gguf"), merged))
    fields = {k: f.contents() for k, f in original.fields.items() if k != "GGUF.kv_count"}
    assert {k: f.contents() for k, f in rejoined.fields.items() if not k.startswith(("split.", "GGUF.kv"))} == fields
    assert [(t.name, t.tensor_type, t.data.tobytes()) for t in rejoined.tensors] == \
        [(t.name, t.tensor_type, t.data.tobytes()) for t in original.tensors]


@pytest.mark.parametrize("fault", [
    Fault("POST", r"/preupload/", 429, headers={"Retry-After": "1"}),
    Fault("PUT", r"^/lfs-upload/", 500),
    Fault("PUT", r"^/lfs-upload/", "drop"),
    Fault("POST", r"/commit/main", 503),
], ids=["429-preupload", "500-upload", "dropped-upload", "503-commit"])
@pytest.mark.slow
def test_push_survives_transient_faults(tmp_path, test_hub, q8_built, fault):
    config, _, ws = staged_pipeline(tmp_path, q8_built)
    test_hub.state.faults.append(fault)
    proc = push(test_hub, config)
    assert proc.returncode == 0, proc.stderr
    assert fault.times == 0  # the fault did happen
    assert len(test_hub.state.commits_on(REPO_ID)) == 2  # one commit, never two
    gguf = test_hub.state.files(REPO_ID)["tiny-phimoe-Q8_0.gguf"]
    assert gguf == ws.quant_path("tiny-phimoe-Q8_0.gguf").read_bytes()


@pytest.mark.slow
def test_failed_push_leaves_the_repo_as_it_was(tmp_path, test_hub, q8_built):
    config, _, _ = staged_pipeline(tmp_path, q8_built)
    test_hub.state.create_repo(REPO_ID)
    before = test_hub.state.repos[REPO_ID].refs["main"]
    test_hub.state.faults.append(Fault("POST", r"/commit/main", 500, times=99))
    proc = push(test_hub, config, env={"MOEQ_HUB_MAX_WAIT_S": "0"})  # the retries, not their waits (1, 2, 4 s)
    assert proc.returncode == 5
    assert proc.stderr.count("the Hub answered 500 to the commit; planning again in 0 s") == 3
    assert proc.stderr.splitlines()[-1].startswith(f"error: {REPO_ID}: the Hub answered 500 while committing")
    assert "Traceback" not in proc.stderr
    assert test_hub.state.repos[REPO_ID].refs["main"] == before


@pytest.mark.slow
def test_bad_token_and_wrong_namespace(tmp_path, test_hub, q8_built):
    config, _, _ = staged_pipeline(tmp_path, q8_built)
    proc = push(test_hub, config, env={"HF_TOKEN": "hf_notAValidToken"})
    assert proc.returncode == 5 and "refused the token (401)" in proc.stderr
    proc = push(test_hub, config, env={"HF_TOKEN": "hf_otherUserToken"})
    assert proc.returncode == 5
    assert "the token may not write to the namespace 'moeq-test' (403)" in proc.stderr
    assert REPO_ID not in test_hub.state.repos


@pytest.mark.slow
def test_foreign_readme_needs_force(tmp_path, test_hub, q8_built):
    config, _, _ = staged_pipeline(tmp_path, q8_built)
    test_hub.state.add_files(REPO_ID, {"README.md": b"# A card someone wrote by hand\n"})
    proc = push(test_hub, config)
    assert proc.returncode == 5 and "README.md on the Hub was not written by moeq; pass --replace-card" in proc.stderr
    assert test_hub.state.files(REPO_ID)["README.md"] == b"# A card someone wrote by hand\n"
    proc = push(test_hub, config, "--replace-card")
    assert proc.returncode == 0, proc.stderr
    assert b"generated by moeq" in test_hub.state.files(REPO_ID)["README.md"]


@pytest.mark.slow
def test_token_never_written_anywhere(tmp_path, test_hub, q8_built):
    config, _, _ = staged_pipeline(tmp_path, q8_built)
    assert push(test_hub, config).returncode == 0
    assert push(test_hub, config, "--json").returncode == 0
    for path in tmp_path.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert HUB_TOKEN.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_multipart_upload_into_a_private_repo(tmp_path, test_hub, q8_built):
    config, _, ws = staged_pipeline(tmp_path, q8_built, hub={**example_section("hub"), "private": True}, validate=False)
    test_hub.state.multipart_threshold = test_hub.state.chunk_size = 1_000_000
    proc = push(test_hub, config)
    assert proc.returncode == 0, proc.stderr
    parts = [r for r in test_hub.requests if r.method == "PUT" and r.path.startswith("/lfs-part/")]
    assert len(parts) == 5  # 4.08 MB in 1 MB parts
    assert [r for r in test_hub.requests if r.path.startswith("/lfs-complete/")]
    repo = test_hub.state.repos[REPO_ID]
    assert repo.private
    assert test_hub.state.files(REPO_ID)["tiny-phimoe-Q8_0.gguf"] == ws.quant_path("tiny-phimoe-Q8_0.gguf").read_bytes()
    # A private repo is invisible without the token: the plan then sees no repo at all.
    proc = push(test_hub, config, "--dry-run", "--json", env={"HF_TOKEN": ""})
    assert proc.returncode == 0 and json.loads(proc.stdout)[0]["repo_exists"] is False


@pytest.mark.slow
def test_check_names_the_lines_edited_on_the_hub(tmp_path, test_hub, q8_built):
    """Someone edits a figure in the card on the Hub: push --check says which line, as moeq card verify does."""
    config, _, ws = staged_pipeline(tmp_path, q8_built)
    assert push(test_hub, config).returncode == 0
    clean = push(test_hub, config, "--check")
    assert clean.returncode == 0
    assert f"{REPO_ID}: main on the Hub holds every staged file as staged (" in clean.stdout.replace("\n", " ")
    card = test_hub.state.files(REPO_ID)["README.md"].decode()
    lines = card.split("\n")
    bullet = next(line for line in lines if line.startswith("- **Source**: "))
    edited = bullet.replace("7.64 MB", "9.64 MB")
    assert edited != bullet
    test_hub.state.add_files(REPO_ID, {"README.md": card.replace(bullet, edited).encode()})
    proc = push(test_hub, config, "--check")
    assert proc.returncode == 7
    assert (f'{REPO_ID}/README.md:{lines.index(bullet) + 1}: edited: expected {json.dumps(bullet)}, '
            f'found {json.dumps(edited)}') in proc.stdout.splitlines()
    assert f"moeq push --check: not what the records say: {REPO_ID}; run moeq push" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", [r"/preupload/", r"/commit/main"])
def test_a_huge_retry_after_is_capped_and_said(tmp_path, test_hub, q8_built, path):
    """`Retry-After: 100000` (28 hours) on the client's own retries and on moeq's commit retry: waits are capped."""
    config, _, _ = staged_pipeline(tmp_path, q8_built)
    test_hub.state.faults.append(Fault("POST", path, 429, headers={"Retry-After": "100000"}))
    proc = push(test_hub, config, env={"MOEQ_HUB_MAX_WAIT_S": "1"})
    assert proc.returncode == 0, proc.stderr
    assert ("warning: the Hub answered 429 and asked to wait 100000 s before retrying; moeq waits at most 1 s"
            in proc.stderr)
    assert len(test_hub.state.commits_on(REPO_ID)) == 2


# ---------------------------------------------------------------- layouts


@pytest.mark.slow
def test_pushing_one_quant_into_the_one_repo_changes_only_its_files(tmp_path, test_hub, q8_built):
    """Q8_0 first, then Q4_K_M alone: the second commit adds Q4_K_M and its importance matrix and rewrites README.md
    and the manifest, which now list both; Q8_0's file is not touched."""
    config, pipeline, ws = staged_pipeline(tmp_path, q8_built)
    assert push(test_hub, config).returncode == 0
    run_target(pipeline, "quantize", "Q4_K_M")
    run_target(pipeline, "validate", "Q4_K_M")
    done = make_cards(pipeline, ("Q4_K_M",))[None]
    assert done.record.quants == ["Q8_0", "Q4_K_M"]  # Q8_0 is in the repo (the push record says so)
    assert "| Q2_K |" not in (ws.repo_dir(None) / "README.md").read_text()  # never built: not listed
    proc = push(test_hub, config, "--json", quants=("Q4_K_M",))
    assert proc.returncode == 0, proc.stderr
    new, old = test_hub.state.commits_on(REPO_ID)[:2]
    changed = {p for p in new.files if new.files[p].data != old.files.get(p, Blob(b"", False)).data}
    assert changed == {"README.md", "moeq-manifest.json", "tiny-phimoe-Q4_K_M.gguf", "tiny-phimoe.imatrix",
                       "images/gpu-memory.png"}  # the memory chart gains Q4_K_M's line
    assert new.message.startswith("Q8_0, Q4_K_M GGUF, card and records")
    assert len(test_hub.state.commits_on(REPO_ID)) == 3
    assert push(test_hub, config, "--check", quants=()).returncode == 0


@pytest.mark.slow
def test_a_push_for_some_quants_refuses_to_change_the_others(tmp_path, test_hub, q8_built):
    config, pipeline, ws = staged_pipeline(tmp_path, q8_built)
    assert push(test_hub, config).returncode == 0
    test_hub.state.add_files(REPO_ID, {"tiny-phimoe-Q3_K_M.gguf": b"GGUF from elsewhere"})
    run_target(pipeline, "quantize", "Q4_K_M")
    make_cards(pipeline, ("Q4_K_M",))
    test_hub.state.add_files(REPO_ID, {"tiny-phimoe-Q8_0.gguf": b"changed on the Hub"})
    head = test_hub.state.repos[REPO_ID].refs["main"]
    proc = push(test_hub, config, quants=("Q4_K_M",))
    assert proc.returncode == 3 and proc.stderr.splitlines()[-1] == (
        f"error: {REPO_ID}: tiny-phimoe-Q8_0.gguf of Q8_0 is not on the Hub as staged (update); push Q8_0 too "
        "(--quant Q8_0) or the whole ladder (moeq push without --quant)")
    assert test_hub.state.repos[REPO_ID].refs["main"] == head
    proc = push(test_hub, config, quants=("Q8_0", "Q4_K_M"))
    assert proc.returncode == 0, proc.stderr
    assert test_hub.state.files(REPO_ID)["tiny-phimoe-Q8_0.gguf"] == ws.quant_path("tiny-phimoe-Q8_0.gguf").read_bytes()
    # A GGUF someone else uploaded is not moeq's to delete: kept, and said.
    assert test_hub.state.files(REPO_ID)["tiny-phimoe-Q3_K_M.gguf"] == b"GGUF from elsewhere"
    assert f"{REPO_ID}: kept tiny-phimoe-Q3_K_M.gguf, which moeq did not publish" in proc.stderr


@pytest.mark.slow
def test_switching_layout_is_refused_unless_asked(tmp_path, test_hub, q8_built):
    config, pipeline, ws = staged_pipeline(tmp_path, q8_built, hub=PER_QUANT)
    assert push(test_hub, config).returncode == 0
    assert "moeq-test/tiny-phimoe-q8-0-gguf" in test_hub.state.repos
    config = pipeline_file(tmp_path, hub=example_section("hub"))
    make_cards(load_pipeline(config), ("Q8_0",))
    proc = push(test_hub, config)
    assert proc.returncode == 3
    assert ("this workspace published moeq-test/tiny-phimoe-q8-0-gguf with hub.layout per-quant, and the pipeline "
            "now says single; pass --switch-layout") in proc.stderr
    assert REPO_ID not in test_hub.state.repos
    assert push(test_hub, config, "--switch-layout").returncode == 0
    assert "tiny-phimoe-Q8_0.gguf" in test_hub.state.files(REPO_ID)
    # A fresh workspace knows nothing of the old repos, but the manifest on the Hub says which layout it holds.
    fresh, _, _ = staged_pipeline(tmp_path / "fresh", q8_built, hub={**example_section("hub"), "repo": "moeq-test/tiny-phimoe-q8-0-gguf"})
    proc = push(test_hub, fresh)
    assert proc.returncode == 5 and ("moeq-test/tiny-phimoe-q8-0-gguf: its manifest on the Hub says hub.layout "
                                     "per-quant, the pipeline says single; pass --switch-layout") in proc.stderr


@pytest.mark.slow
def test_a_per_quant_card_links_only_repos_on_the_hub(tmp_path, test_hub, q8_built):
    """Cards made for the whole ladder link every sibling repo; push --check names a link to a repo that is not on
    the Hub. A push of Q8_0 alone makes its card for Q8_0 alone, which links none."""
    config, pipeline, ws = staged_pipeline(tmp_path, q8_built, hub=PER_QUANT)
    run_target(pipeline, "quantize", "Q2_K")
    make_cards(pipeline, ("Q8_0", "Q2_K"))
    assert "(https://huggingface.co/moeq-test/tiny-phimoe-q2-k-gguf)" in (ws.repo_dir("Q8_0") / "README.md").read_text()
    proc = push(test_hub, config, "--check")  # a staged card: --check reads it as it is
    assert proc.returncode == 7
    assert ("moeq-test/tiny-phimoe-q8-0-gguf/README.md: links moeq-test/tiny-phimoe-q2-k-gguf, which is not on the "
            "Hub; push Q2_K too") in proc.stdout
    # Pushing Q8_0 alone makes its card for what it pushes first: no link to a repo that is not on the Hub.
    assert push(test_hub, config).returncode == 0
    assert "tiny-phimoe-q2-k-gguf" not in (ws.repo_dir("Q8_0") / "README.md").read_text()
    proc = push(test_hub, config, "--check")
    assert proc.returncode == 0 and "links" not in proc.stdout, proc.stdout
    assert push(test_hub, config, quants=("Q2_K",)).returncode == 0
    make_cards(pipeline, ("Q8_0",))  # Q2_K's repo now exists (its push record says so): linked again
    assert "(https://huggingface.co/moeq-test/tiny-phimoe-q2-k-gguf)" in (ws.repo_dir("Q8_0") / "README.md").read_text()


def test_a_staged_file_of_another_size_is_named_by_its_size():
    """Hostile round 3: a wrong size was reported as a sha256 mismatch, with two equal hashes."""
    from huggingface_hub.hf_api import RepoFile

    from moeq.push.staging import mismatches

    sha = "ab" * 32
    there = {"a.gguf": RepoFile(path="a.gguf", size=10, oid="x", lfs={"size": 10, "oid": sha, "pointerSize": 130}),
             "b.gguf": RepoFile(path="b.gguf", size=10, oid="y", lfs={"size": 10, "oid": "cd" * 32, "pointerSize": 130})}
    assert mismatches(there, [("a.gguf", 11, sha), ("b.gguf", 10, sha), ("c.gguf", 1, sha)]) == [
        "a.gguf (10 bytes, the records say 11)", f"b.gguf (sha256 {'cd' * 6}, the records say {'ab' * 6})",
        "c.gguf (missing)"]


@pytest.mark.slow
def test_a_repo_an_older_moeq_published_keeps_its_files_and_says_so(tmp_path, test_hub, q8_built):
    """A repo whose manifest is of an older version (2): the files it names are not known to be moeq's, so they are
    kept, and the plan and the push say why and what deletes them."""
    config, _pipeline, _ws = staged_pipeline(tmp_path, q8_built)
    old = {"manifest_version": 2, "layout": "single",
           "quants": [{"quant": "Q2_K", "files": [{"name": "tiny-phimoe-Q2_K.gguf"}]}]}
    test_hub.state.add_files(REPO_ID, {"moeq-manifest.json": json.dumps(old).encode(),
                                       "tiny-phimoe-Q2_K.gguf": b"GGUF an older moeq published"})
    note = (f"{REPO_ID}: its moeq-manifest.json on the Hub is of manifest version 2, an older moeq's (this one reads "
            "4), so this moeq cannot tell which files it published: 1 file the new card does not list is kept "
            "(tiny-phimoe-Q2_K.gguf); push --prune deletes them")
    proc = push(test_hub, config, "--dry-run")
    assert proc.returncode == 0 and f"note: {note}" in " ".join(proc.stdout.split()), proc.stdout
    proc = push(test_hub, config)
    assert proc.returncode == 0 and note in proc.stderr, proc.stderr
    assert test_hub.state.files(REPO_ID)["tiny-phimoe-Q2_K.gguf"] == b"GGUF an older moeq published"
