"""What moeq publishes, read by the clients its users run, over a socket from the test Hub server (offline):

- llama.cpp's own Hub download (`llama-completion -hf REPO:QUANT`, pointed at the server with MODEL_ENDPOINT),
- the Hub's own JavaScript libraries from npm (`@huggingface/tasks` for quant labels, `@huggingface/gguf` for
  headers over HTTP Range), pinned in tests/js/package-lock.json and installed by scripts/setup.

The repos are the example's ladder, pushed by `moeq build --all --push` with a shard size that splits Q8_0 and
Q4_K_M, so split files in their folders are read too.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from moeq.manifest import parse_manifest
from moeq.runner import tool_env

from conftest import HUB_TOKEN, HUB_USER, PER_QUANT, REPO, copy_built, example_section, pipeline_file, run_moeq
import hub_server
from hub_server import Fault

JS = REPO / "tests" / "js"
ONE_REPO = f"{HUB_USER}/tiny-phimoe-GGUF"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """One test Hub for the module, holding the ladder published in both layouts."""
    folder = tmp_path_factory.mktemp("hub-clients")
    server = hub_server.TestHub({HUB_TOKEN: HUB_USER})
    server.env = {"HF_ENDPOINT": server.url, "HF_TOKEN": HUB_TOKEN, "HF_HUB_DISABLE_XET": "1",
                  "HF_HOME": str(folder / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    single = pipeline_file(folder / "single", trained=False, hub={**example_section("hub"), "max_shard_size": "2MB"})
    proc = run_moeq("build", "--config", str(single), "--all", "--skip-bench", env=server.env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    copy_built(folder / "single", folder / "per-quant")  # the same files: the layout changes only the repos
    per_quant = pipeline_file(folder / "per-quant", trained=False, hub={**PER_QUANT, "max_shard_size": "2MB"})
    for config in (single, per_quant):
        proc = run_moeq("build", "--config", str(config), "--all", "--skip-bench", "--push", env=server.env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    yield server
    server.close()


def latest_manifest(hub, repo: str):
    return parse_manifest(hub.state.files(repo)["moeq-manifest.json"].decode(), f"{repo}/moeq-manifest.json")


def llama_hf(hub, tmp_path: Path, toolchain, ref: str) -> subprocess.CompletedProcess:
    tool = toolchain.path("llama-completion")
    env = {**os.environ, **tool_env(tool), "MODEL_ENDPOINT": hub.url + "/", "LLAMA_CACHE": str(tmp_path / "llama-cache")}
    env.pop("HF_TOKEN", None)
    return subprocess.run([str(tool), "-hf", ref, "-p", "The", "-n", "8", "--temp", "0",
                           "-no-cnv", "--no-warmup", "-t", "2"],
                          env=env, capture_output=True, text=True, errors="replace", timeout=300)


def asked(hub, start: int) -> list[tuple[str, str]]:
    """(method, path?query) of each request since `start`, storage redirects left out."""
    out = []
    for r in hub.requests[start:]:
        query = "?" + "&".join(f"{k}={v[0]}" for k, v in r.query.items()) if r.query else ""
        if not r.path.startswith("/lfs-objects/"):
            out.append((r.method, r.path + query))
    return out


@pytest.mark.parametrize("layout,ref,quant", [
    ("single", f"{ONE_REPO}:Q4_K_M", "Q4_K_M"),  # split in two shards, in their own folder
    ("single", f"{ONE_REPO}:Q2_K", "Q2_K"),
    ("per-quant", f"{HUB_USER}/tiny-phimoe-q2-k-gguf", "Q2_K"),  # no tag: the repo's one GGUF
])
def test_llama_cpp_downloads_the_quant_by_name_and_runs_it(hub, tmp_path, toolchain, layout, ref, quant):
    repo = ref.split(":")[0]
    entry = latest_manifest(hub, repo).entry(quant)
    commit = hub.state.repos[repo].refs["main"]
    start = len(hub.requests)
    proc = llama_hf(hub, tmp_path, toolchain, ref)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().startswith("The") and len(proc.stdout.strip()) > len("The")  # it generated tokens
    requests = asked(hub, start)
    files = sorted(f.name for f in entry.files)
    assert requests[:2] == [("GET", f"/api/models/{repo}/refs"),
                            ("GET", f"/api/models/{repo}/tree/{commit}?recursive=true")]
    resolved = sorted({path.split(f"/resolve/{commit}/", 1)[1] for _m, path in requests[2:]})
    assert resolved == files  # exactly the quant's file(s): no other quant, not the importance matrix
    for name in files:
        for method in ("HEAD", "GET"):
            assert (method, f"/{repo}/resolve/{commit}/{name}") in requests
    # The downloaded files are the published ones, byte for byte.
    snapshot = tmp_path / "llama-cache"
    for name in files:
        [got] = [p for p in snapshot.rglob(Path(name).name) if p.is_file()]
        assert got.read_bytes() == hub.state.files(repo)[name]


def test_llama_cpp_resumes_a_cut_download_with_range(hub, tmp_path, toolchain):
    """The first body is cut in half: llama.cpp asks again for the rest only, with Range, and runs the model."""
    entry = latest_manifest(hub, ONE_REPO).entry("Q2_K")
    size = entry.files[0].size
    hub.state.faults.append(Fault("GET", r"^/lfs-objects/", "truncate"))
    start = len(hub.requests)
    proc = llama_hf(hub, tmp_path, toolchain, f"{ONE_REPO}:Q2_K")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranged = [r.range for r in hub.requests[start:] if r.method == "GET" and r.range]
    assert ranged and re.fullmatch(r"bytes=(\d+)-", ranged[-1]) and 0 < int(ranged[-1][6:-1]) < size


def test_llama_cpp_says_when_a_quant_is_not_in_the_repo(hub, tmp_path, toolchain):
    proc = llama_hf(hub, tmp_path, toolchain, f"{ONE_REPO}:Q6_K")
    assert proc.returncode != 0
    assert "tiny-phimoe.imatrix" not in proc.stderr  # the importance matrix is never offered as a model


def node_clients(names: list[str], urls: dict[str, str]) -> dict:
    if shutil.which("node") is None or not (JS / "node_modules" / "@huggingface" / "gguf").is_dir():
        pytest.fail("node and tests/js/node_modules are missing: run scripts/setup")
    proc = subprocess.run(["node", str(JS / "read-repo.mjs"), json.dumps({"names": names, "urls": urls})],
                          cwd=JS, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("layout", ["single", "per-quant"])
def test_the_hubs_javascript_labels_and_reads_every_published_file(hub, layout):
    repos = [ONE_REPO] if layout == "single" else [f"{HUB_USER}/tiny-phimoe-{q}-gguf" for q in ("q8-0", "q4-k-m",
                                                                                                 "q2-k")]
    for repo in repos:
        manifest = latest_manifest(hub, repo)
        names = sorted(hub.state.files(repo))
        urls = {n: f"{hub.url}/{repo}/resolve/main/{n}" for n in names if n.endswith(".gguf")}
        found = node_clients(names, urls)
        for entry in manifest.quants:
            quantize = entry.records.quantize
            shards = [f.name for f in entry.files]
            assert len(shards) == (1 if entry.quant == "Q2_K" else 2 if entry.quant == "Q4_K_M" else 3)
            for index, name in enumerate(shards):
                assert found["labels"][name]["label"] == entry.quant, name
                header = found["headers"][name]
                assert header["split_count"] == (len(shards) if len(shards) > 1 else None)
                if index == 0:  # llama-gguf-split keeps the model's metadata in the first shard
                    assert header["architecture"] == quantize.model.architecture
                    assert header["file_type"] == quantize.file_type
            assert sum(found["headers"][name]["tensors"] for name in shards) == len(quantize.tensors)
            if layout == "single" and len(shards) > 1:
                assert all(name.startswith(f"tiny-phimoe-{entry.quant}/") for name in shards)
        # The importance matrix, the card and the manifest are never labelled as a model.
        others = [n for n in names if not n.endswith(".gguf")]
        assert all(found["labels"][n]["label"] is None for n in others)
        if layout == "single":
            assert "tiny-phimoe.imatrix" in others


def card_commands(readme: str, start: str) -> list[list[str]]:
    """The card's shell lines that start with `start`, split as a shell would."""
    blocks = re.findall(r"```sh\n(.*?)```", readme, re.S)
    return [shlex.split(line) for block in blocks for line in block.splitlines() if line.startswith(start)]


def test_the_cards_llama_cpp_snippets_run(hub, tmp_path, toolchain):
    """What the card tells a reader to type: `hf download` of a file, then llama.cpp with each of the card's
    `-hf` and `-m` flag sets (llama-completion takes the same flags as llama-server) and the context it names."""
    readme = hub.state.files(ONE_REPO)["README.md"].decode()
    commands = [c for c in card_commands(readme, "llama-server ") if "--jinja" not in c]  # the chat test's own
    assert commands and all(c[-2] == "-c" and c[-1] == "512" for c in commands)  # the context the card assumes
    downloads = card_commands(readme, "hf download ")
    assert len(downloads) == 3 and any("--include" in d for d in downloads)
    env = {**os.environ, **hub.env}
    for download in downloads:
        proc = subprocess.run([str(REPO / ".venv" / "bin" / "hf"), *download[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    ran = 0
    for command in commands:
        if "-ncmoe" in command and command[command.index("-ncmoe") + 1] == "N":
            command[command.index("-ncmoe") + 1] = "1"
        tool = toolchain.path("llama-completion")
        run_env = {**env, **tool_env(tool), "MODEL_ENDPOINT": hub.url + "/",
                   "LLAMA_CACHE": str(tmp_path / "llama-cache")}
        proc = subprocess.run([str(tool), *command[1:], "-p", "The", "-n", "4", "--temp", "0", "-no-cnv",
                               "--no-warmup", "-t", "2"], cwd=tmp_path, env=run_env, capture_output=True, text=True,
                              errors="replace", timeout=300)
        assert proc.returncode == 0, " ".join(command) + "\n" + proc.stderr[-2000:]
        # the `generate:` line, logged just before generation starts, and the perf tail logged at exit
        assert "n_ctx = 512" in proc.stderr and "total time" in proc.stderr, " ".join(command) + "\n" + proc.stderr[-2000:]
        ran += 1
    assert ran == len(commands) == 5  # three quants by name, the first quant's file twice
    assert "not run by moeq's tests" in readme.split("### Rust")[1].split("\n")[0]


def test_the_cards_chat_request_gets_a_chat_completion_from_llama_server(hub, tmp_path, toolchain):
    """The card's "Chat with it": its `llama-server -hf` line, started against the test Hub, answers the card's
    own curl request with a chat completion, and the prompt the server builds from the file's template for that
    conversation is the one the card shows under "Prompt format"."""
    readme = hub.state.files(ONE_REPO)["README.md"].decode()
    server_block, request_block = re.findall(r"```sh\n(.*?)```", readme.split("### Chat with it\n")[1], re.S)[:2]
    command = shlex.split(server_block.strip())
    assert command[:2] == ["llama-server", "-hf"] and "--jinja" in command and command[-2:] == ["--port", "8080"]
    request = request_block.strip()
    assert request.startswith("curl ") and "http://localhost:8080/v1/chat/completions" in request
    with socket.socket() as probe:  # a free port for this run, in place of the card's 8080
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tool = toolchain.path("llama-server")
    env = {**os.environ, **tool_env(tool), "MODEL_ENDPOINT": hub.url + "/", "LLAMA_CACHE": str(tmp_path / "cache")}
    env.pop("HF_TOKEN", None)
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([str(tool), *command[1:-1], str(port), "--host", "127.0.0.1", "-t", "2",
                                   "-n", "16", "--no-warmup"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while not _answers(base + "/health"):  # 503 while the model downloads and loads
            assert server.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        proc = subprocess.run(["bash", "-c", request.replace("localhost:8080", f"127.0.0.1:{port}")],
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr
        reply = json.loads(proc.stdout)
        assert reply["object"] == "chat.completion", reply
        assert reply["choices"][0]["message"]["role"] == "assistant" and reply["usage"]["completion_tokens"] > 0
        messages = json.loads(shlex.split(request)[-1])["messages"]
        applied = urllib.request.urlopen(urllib.request.Request(
            base + "/apply-template", data=json.dumps({"messages": messages}).encode(),
            headers={"Content-Type": "application/json"}), timeout=60)
        shown = latest_manifest(hub, ONE_REPO).quants[0].records.validate_.prompt
        assert messages == shown.messages and json.load(applied)["prompt"] == shown.rendered
        assert shown.rendered.strip("\n") in readme  # the card shows that very text
    finally:
        server.terminate()
        server.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError):
        return False
