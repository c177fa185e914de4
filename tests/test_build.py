"""`moeq build` end to end: real tools, the test Hub, reruns that do nothing, kills, failures."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moeq.cards.lint import lint_card
from moeq.manifest import parse_manifest
from moeq.toolchain import TOOLS

from conftest import HUB_TOKEN, PER_QUANT, REPO, copy_built, example_section, pipeline_file, run_moeq, tool_folder
from hub_server import Fault

LADDER = ("Q8_0", "Q4_K_M", "Q2_K")
STAGES = ["fetch", "imatrix", "recipe", "choice", "quantize", "validate", "bench", "shards", "card", "push"]


ONE_REPO = "moeq-test/tiny-phimoe-GGUF"  # the example's layout: one repo for the ladder


def repo_id(quant: str, layout: str = "single") -> str:
    return ONE_REPO if layout == "single" else f"moeq-test/tiny-phimoe-{quant.lower().replace('_', '-')}-gguf"


def wrapped_tools(tmp_path: Path, toolchain, fail_quant: str | None = None) -> Path:
    """A tool folder whose every tool logs its start to tmp_path/starts, then runs the real one.

    While tmp_path/slow exists, llama-quantize waits 60 s first (touching tmp_path/quantizing), to be killed."""
    quantize = (f'if [ "$1" != --help ] && [ -f {tmp_path}/slow ]; then touch {tmp_path}/quantizing; sleep 60; fi\n'
                + (f'case " $* " in *" {fail_quant} "*) echo "simulated failure for {fail_quant}" >&2; exit 1;; esac\n'
                   if fail_quant else ""))
    return tool_folder(tmp_path / "bin", toolchain, {
        name: f'echo "{name} $*" >> {tmp_path}/starts\n' + (quantize if name == "llama-quantize" else "")
        + 'exec {real} "$@"\n' for name in TOOLS})


def write_config(tmp_path: Path, bin_dir: Path, template: Path | None = None, layout: str = "single",
                 source: dict | None = None, rpc: str | None = None) -> Path:
    return pipeline_file(tmp_path, rpc=rpc, toolchain={"llama_cpp_bin": str(bin_dir)},
                         source=source or example_section("source"),
                         hub=PER_QUANT if layout == "per-quant" else example_section("hub"),
                         card={**example_section("card"), **({"template": str(template)} if template else {})})


def build(hub, config: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    proc = run_moeq("build", "--config", str(config), *args, "--json", env=hub.env)
    assert HUB_TOKEN not in proc.stdout + proc.stderr
    return proc, (json.loads(proc.stdout) if proc.stdout.strip() else {})


def statuses(summary: dict) -> dict[str, list[str]]:
    return {q["quant"]: [s["status"] for s in q["stages"]] for q in summary["quants"]}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["single", "per-quant"])
def test_build_all_push_then_a_rerun_does_nothing(tmp_path, test_hub, toolchain, example_built, rpc_device, layout):
    # single: every stage from scratch; per-quant: the ladder's files as the single build made them (a copy), so
    # only the repos' own stages run (the layout changes no file)
    if layout == "per-quant":
        copy_built(example_built, tmp_path)
        shutil.rmtree(tmp_path / "work" / "previews")  # the one repo's preview: this layout writes its own
    config = write_config(tmp_path, wrapped_tools(tmp_path, toolchain), layout=layout, rpc=rpc_device)
    proc, summary = build(test_hub, config, "--all", "--push")
    assert proc.returncode == 0, proc.stderr
    made = "ran" if layout == "single" else "up to date"
    # fetch, imatrix, recipe (no rung searches one), choice (Q8_0 has none), then the rest
    assert statuses(summary) == {q: [made, "skipped" if q == "Q8_0" else made, "skipped"]
                                 + ["skipped" if q == "Q8_0" else made] + [made] * 4 + ["ran"] * 2 for q in LADDER}
    repos = sorted({repo_id(q, layout) for q in LADDER})
    assert sorted(test_hub.state.repos) == repos
    for repo in repos:
        files = test_hub.state.files(repo)
        readme = files["README.md"].decode()
        manifest = parse_manifest(files["moeq-manifest.json"].decode(), "moeq-manifest.json")
        assert lint_card(readme, "README.md", manifest) == []
        assert len(test_hub.state.commits_on(repo)) == 2
        assert manifest.layout == layout
        for entry in manifest.quants:
            quant = entry.quant
            assert f"tiny-phimoe-{quant}.gguf" in files
            # Q4_K_M and Q2_K were made with and without the imatrix stage's output and the better published (the
            # other never is); the matrix is published beside a file made with it.
            choice = entry.records.choice
            assert (choice is not None) == (quant != "Q8_0")
            made_with = entry.records.quantize.options.imatrix is not None
            assert (entry.records.imatrix is not None) == made_with
            if choice is not None:
                assert choice.published.file.sha256 == entry.records.quantize.output.sha256
                assert all(other.quality.kld_mean > 0 for other in choice.others())
                assert f"| Figure | This file ({choice.published.name}) | {quant} {choice.others()[0].name} |" in readme
            if made_with:
                assert files["tiny-phimoe.imatrix"] == (tmp_path / "work" / "imatrix" / "tiny-phimoe.imatrix").read_bytes()
        assert ("tiny-phimoe.imatrix" in files) == any(e.records.quantize.options.imatrix for e in manifest.quants)
        assert ("### Importance matrix" in readme) == ("tiny-phimoe.imatrix" in files)
        assert not any(name.startswith("without-imatrix") for name in files)
        assert "#### Speed" in readme and "#### Quality against F16" in readme
        # the trained example's generation_config.json, carried by the converter into every file
        assert '"temperature": 0.7,\n  "top_p": 0.9\n}' in readme and "(`general.sampling.*`: `temp 0.7, top_p 0.9`)" in readme
        assert all(e.records.validate_.sampling == {"temp": 0.7, "top_p": 0.9} for e in manifest.quants)
        # the RPC device stands in for a GPU: its speeds are never quoted as a GPU's
        assert "not measured on a GPU (a CPU stood in for it)" in readme.split("## Which file should I choose?")[1]
        assert "tokens/s generating" not in readme.split("## Prompt format")[0]
        links = {f"https://huggingface.co/{repo_id(q, layout)}" for q in LADDER}
        assert all(f"]({url})" in readme or f"]({url}/resolve/main/" in readme for url in links)
    if layout == "single":
        [manifest_text] = [test_hub.state.files(ONE_REPO)["moeq-manifest.json"].decode()]
        assert [e.quant for e in parse_manifest(manifest_text, "m").quants] == list(LADDER)
    check = run_moeq("push", "--config", str(config), "--check", env=test_hub.env)
    assert check.returncode == 0 and "links" not in check.stdout, check.stdout + check.stderr

    assert not list((tmp_path / "work" / "choice").rglob("*.gguf"))  # measured, then moved into place or deleted
    previews = {p: p.stat().st_mtime_ns for p in (tmp_path / "work" / "previews").glob("*.html")}
    assert len(previews) == len(repos)

    (tmp_path / "starts").unlink()
    start = len(test_hub.requests)
    began = time.monotonic()
    proc, summary = build(test_hub, config, "--all", "--push")
    elapsed = time.monotonic() - began
    assert proc.returncode == 0, proc.stderr
    assert statuses(summary) == {q: ["up to date", "skipped" if q == "Q8_0" else "up to date", "skipped"]
                                 + ["skipped" if q == "Q8_0" else "up to date"] + ["up to date"] * 6 for q in LADDER}
    assert not (tmp_path / "starts").exists(), (tmp_path / "starts").read_text()  # no llama.cpp tool started
    assert all(len(test_hub.state.commits_on(repo)) == 2 for repo in repos)
    assert not [r for r in test_hub.requests[start:] if r.writes]
    assert {p: p.stat().st_mtime_ns for p in previews} == previews  # a build with nothing to do writes nothing
    print(f"second build: {elapsed:.2f} s")


@pytest.mark.slow
def test_template_change_reruns_card_and_push_only(tmp_path, test_hub, toolchain, example_built, rpc_device):
    copy_built(example_built, tmp_path)  # the ladder built: the first build here makes its card and pushes it
    template = tmp_path / "card.md.j2"
    builtin = (REPO / "templates" / "model-card.md.j2").read_text()
    template.write_text(builtin)
    config = write_config(tmp_path, wrapped_tools(tmp_path, toolchain), template, rpc=rpc_device)
    assert build(test_hub, config, "--all", "--push")[0].returncode == 0
    template.write_text(builtin.replace("## Model details", "Published by the release job.\n\n## Model details"))
    (tmp_path / "starts").unlink(missing_ok=True)
    proc, summary = build(test_hub, config, "--all", "--push")
    assert proc.returncode == 0, proc.stderr
    assert statuses(summary) == {q: ["up to date", "skipped" if q == "Q8_0" else "up to date", "skipped"]
                                 + ["skipped" if q == "Q8_0" else "up to date"] + ["up to date"] * 4 + ["ran", "ran"]
                                 for q in LADDER}
    assert not (tmp_path / "starts").exists()
    new, old = test_hub.state.commits_on(ONE_REPO)[:2]
    changed = {p for p in new.files if old.files.get(p) is None or new.files[p].data != old.files[p].data}
    assert changed == {"README.md", "moeq-manifest.json"}  # the manifest names the templates
    assert b"Published by the release job." in new.files["README.md"].data


def start_build(hub, config: Path, *which: str) -> subprocess.Popen:
    """`moeq build --push` of `which` (default --all) in the background, to be killed."""
    return subprocess.Popen([sys.executable, "-m", "moeq", "build", "--config", str(config), *(which or ["--all"]),
                             "--push"],
                            cwd=REPO, env={**os.environ, **hub.env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def assert_released(hub, config: Path, tmp_path: Path) -> None:
    proc = run_moeq("push", "--config", str(config), "--check", env=hub.env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(hub.state.commits_on(ONE_REPO)) == 2  # one moeq commit, never a second
    leftovers = [p for p in (tmp_path / "work").rglob("*.partial")]
    assert leftovers == []


@pytest.mark.slow
def test_killed_during_quantize_resumes(tmp_path, test_hub, toolchain):
    config = write_config(tmp_path, wrapped_tools(tmp_path, toolchain))
    (tmp_path / "slow").touch()
    proc = start_build(test_hub, config, "--quant", "Q8_0")  # one quant: its llama-quantize is the one killed
    wait_for(lambda: (tmp_path / "quantizing").exists(), "llama-quantize to start")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (tmp_path / "work" / "quants" / "tiny-phimoe-Q8_0.gguf").exists()
    (tmp_path / "slow").unlink()
    rerun, summary = build(test_hub, config, "--quant", "Q8_0", "--push")
    assert rerun.returncode == 0, rerun.stderr
    assert_released(test_hub, config, tmp_path)


@pytest.mark.slow
def test_killed_during_push_resumes(tmp_path, test_hub, toolchain, example_built, rpc_device):
    copy_built(example_built, tmp_path)  # the ladder built: the build below goes straight to its card and push
    config = write_config(tmp_path, wrapped_tools(tmp_path, toolchain), rpc=rpc_device)
    test_hub.state.faults.append(Fault("PUT", r"^/lfs-upload/", "sleep", seconds=5))
    proc = start_build(test_hub, config)
    wait_for(lambda: any(r.path.startswith("/lfs-upload/") for r in test_hub.requests), "the first upload",
             timeout=600)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert ONE_REPO not in test_hub.state.repos or len(test_hub.state.commits_on(ONE_REPO)) == 1  # before any commit
    rerun, summary = build(test_hub, config, "--all", "--push")
    assert rerun.returncode == 0, rerun.stderr
    assert statuses(summary)["Q8_0"][:9] == ["up to date", "skipped", "skipped", "skipped"] + ["up to date"] * 5
    assert statuses(summary)["Q8_0"][9] == "ran"
    assert_released(test_hub, config, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["single", "per-quant"])
def test_one_failing_quant_does_not_stop_the_others(tmp_path, test_hub, toolchain, layout):
    """Per quant, the others are published; the ladder's one repo waits for every quant asked for."""
    config = write_config(tmp_path, wrapped_tools(tmp_path, toolchain, fail_quant="Q2_K"), layout=layout)
    proc, summary = build(test_hub, config, "--all", "--push", *(["--skip-bench"] if layout == "single" else []))
    assert proc.returncode == 4  # ToolError: the exit code of the first failed stage
    # Measured (per-quant), Q2_K's first llama-quantize is the choice's; with --skip-bench (single) the quantize's.
    first = "choice" if layout == "per-quant" else "quantize"
    before = ["ran", "ran", "skipped"] + (["skipped"] if first == "quantize" else [])
    assert statuses(summary)["Q2_K"] == before + ["failed"] + ["skipped"] * (9 - len(before))
    if layout == "per-quant":
        assert statuses(summary)["Q8_0"] == ["ran", "skipped", "skipped", "skipped"] + ["ran"] * 6
        assert statuses(summary)["Q4_K_M"] == ["ran", "ran", "skipped"] + ["ran"] * 7
        assert sorted(test_hub.state.repos) == [repo_id(q, layout) for q in ("Q4_K_M", "Q8_0")]
    else:
        assert statuses(summary)["Q8_0"] == ["ran", "skipped", "skipped", "skipped", "ran", "ran", "skipped", "ran",
                                             "skipped", "skipped"]
        waits = summary["quants"][0]["stages"][8]
        assert waits["detail"] == "the ladder's repo waits for Q2_K" and ONE_REPO not in test_hub.state.repos
    failed = summary["quants"][2]["stages"][len(before)]
    assert "simulated failure for Q2_K" in failed["detail"] and failed["exit_code"] == 4
    assert f"error: Q2_K: {first} failed: llama-quantize: exited 1: simulated failure for Q2_K" in proc.stderr
    assert summary["ok"] is False and summary["exit_code"] == 4


@pytest.mark.slow
def test_offline_main_job_ends_with_a_local_push_plan(tmp_path, toolchain):
    config = write_config(tmp_path, wrapped_tools(tmp_path, toolchain))
    proc = run_moeq("build", "--config", str(config), "--quant", "Q8_0", env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert proc.returncode == 0, proc.stderr
    # the plan lists the ladder's repo, not Q8_0's alone: it is named as such
    assert f"{ONE_REPO}, the ladder's repo: push plan (dry run, not compared with the Hub): " in proc.stdout
    assert f"cards: {tmp_path / 'work' / 'repos'}/ladder/README.md" in proc.stdout.replace("\n", "")


@pytest.mark.parametrize("args,code,message", [
    ((), 3, "moeq build: no quant named; give --quant TYPE (one or more) or --all"),
    (("--all", "--force-stage", "polish"), 2, "--force-stage 'polish': not a stage; use one of fetch, imatrix, recipe, choice, quantize"),
])
def test_build_argument_errors(tmp_path, args, code, message):
    config = tmp_path / "p.yaml"
    config.write_text((REPO / "examples" / "tiny-phimoe.yaml").read_text())
    proc = run_moeq("build", "--config", str(config), *args)
    assert proc.returncode == code and message in proc.stderr


@pytest.mark.slow
def test_force_stage_card_reruns_card_and_push_only(tmp_path, toolchain, example_built, rpc_device):
    copy_built(example_built, tmp_path)
    config = write_config(tmp_path, wrapped_tools(tmp_path, toolchain), rpc=rpc_device)
    assert run_moeq("build", "--config", str(config), "--quant", "Q4_K_M").returncode == 0
    proc = run_moeq("build", "--config", str(config), "--quant", "Q4_K_M", "--force-stage", "card", "--json")
    assert proc.returncode == 0, proc.stderr
    assert statuses(json.loads(proc.stdout))["Q4_K_M"] == ["up to date"] * 2 + ["skipped"] + ["up to date"] * 5 + [
        "ran", "skipped"]


@pytest.mark.slow
def test_summary_reads_whole_in_an_80_column_log(tmp_path, toolchain):
    """CI logs and standard terminals are 80 columns: no stage name or status is cut or wrapped."""
    config = write_config(tmp_path, toolchain.path("llama-quantize").parent)
    proc = run_moeq("build", "--config", str(config), "--all", "--skip-bench", env={"COLUMNS": "80"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = proc.stdout.split("moeq build")[1].split("└")[0]
    assert "…" not in table and max(len(line) for line in table.splitlines()) <= 80
    rows = {line.split("│")[1].strip(): line for line in table.splitlines() if line.startswith("│")}
    assert list(rows) == [*STAGES, "size"]
    header = next(line for line in table.splitlines() if line.startswith("┃"))
    assert [cell.strip() for cell in header.split("┃")[1:-1]] == ["stage", *LADDER]
    assert rows["quantize"].count("ran") == 3 and rows["bench"].count("skipped") == 3


@pytest.mark.slow
def test_a_moved_and_a_copied_workspace(tmp_path, toolchain):
    """Records hold workspace-relative paths: a moved workspace is current, an imatrix quant included (its key holds
    the matrix's name and sha256, not its path); a copy is independent of the original."""
    bin_dir = wrapped_tools(tmp_path, toolchain)
    config = write_config(tmp_path, bin_dir)
    proc = run_moeq("build", "--config", str(config), "--quant", "Q2_K", "--skip-bench", "--json")
    assert proc.returncode == 0, proc.stderr
    original = tmp_path / "work"
    saved = json.loads((original / "records" / "quantize-Q2_K.json").read_text())["record"]
    assert saved["output"]["path"] == "quants/tiny-phimoe-Q2_K.gguf"  # relative to the workspace
    assert saved["source"]["path"] == "source/tiny-phimoe-F16.gguf"
    (tmp_path / "work").rename(tmp_path / "moved")
    moved = config.with_name("moved.yaml")
    moved.write_text(config.read_text().replace("workspace: work\n", "workspace: moved\n"))
    (tmp_path / "starts").unlink()
    proc = run_moeq("build", "--config", str(moved), "--quant", "Q2_K", "--skip-bench", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {s["stage"]: s["status"] for s in json.loads(proc.stdout)["quants"][0]["stages"]} == {
        "fetch": "up to date", "imatrix": "up to date", "recipe": "skipped", "choice": "skipped",
        "quantize": "up to date", "validate": "up to date", "bench": "skipped", "shards": "up to date", "card": "up to date", "push": "skipped"}
    assert not (tmp_path / "starts").exists()  # no tool ran
    subprocess.run(["cp", "-a", str(tmp_path / "moved"), str(tmp_path / "copy")], check=True)
    copy = config.with_name("copy.yaml")
    copy.write_text(config.read_text().replace("workspace: work\n", "workspace: copy\n"))
    proc = run_moeq("build", "--config", str(copy), "--quant", "Q2_K", "--skip-bench", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    staged = tmp_path / "copy" / "repos" / "ladder" / "tiny-phimoe-Q2_K.gguf"
    assert os.path.samefile(staged, tmp_path / "copy" / "quants" / "tiny-phimoe-Q2_K.gguf")
    assert not os.path.samefile(staged, tmp_path / "moved" / "quants" / "tiny-phimoe-Q2_K.gguf")
    card = json.loads((tmp_path / "copy" / "records" / "card.json").read_text())["record"]
    assert card["folder"] == "repos/ladder" and card["readme"]["path"] == "repos/ladder/README.md"


@pytest.mark.slow
def test_build_hashes_a_local_source_beside_llama_quantize(tmp_path, toolchain):
    """A local source's first hash runs beside llama-quantize, as `moeq quantize` does: the quantize has started
    before the fetch record exists, and the summary still shows the fetch stage first."""
    model = tmp_path / "big-F16.gguf"
    made = run_moeq("synth", "tiny-phimoe", str(model), "--layers", "4", "--experts", "8", "--embd", "1024",
                    "--ff", "2048")
    assert made.returncode == 0, made.stderr
    assert model.stat().st_size > 300e6  # a hash of a second or so
    bin_dir = wrapped_tools(tmp_path, toolchain)
    quantize = bin_dir / "llama-quantize"
    records = tmp_path / "work" / "records"
    quantize.write_text(quantize.read_text().replace(
        "exec ", f'[ "$1" = --help ] || [ "$1" = --dry-run ] || {{ [ -e {records}/fetch.json ] && echo after '
                 f'|| echo before; }} >> {tmp_path}/order\n'
                 "exec ", 1))
    config = write_config(tmp_path, bin_dir, source={"kind": "local", "path": str(model)})
    proc = run_moeq("build", "--config", str(config), "--quant", "Q8_0", "--skip-bench", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stages = json.loads(proc.stdout)["quants"][0]["stages"]
    assert [(s["stage"], s["status"]) for s in stages][:5] == [("fetch", "ran"), ("imatrix", "skipped"),
                                                               ("recipe", "skipped"), ("choice", "skipped"),
                                                               ("quantize", "ran")]
    assert (tmp_path / "order").read_text().split() == ["before"]
    again = run_moeq("build", "--config", str(config), "--quant", "Q8_0", "--skip-bench", "--json")
    assert [s["status"] for s in json.loads(again.stdout)["quants"][0]["stages"]][:5] == [
        "up to date", "skipped", "skipped", "skipped", "up to date"]
