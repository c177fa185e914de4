"""Shared fixtures: the real pinned llama.cpp tools and the tiny synthetic model."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moeq.config import SynthSpec
from moeq.synth import write_synth_model
from moeq.runner import LOG_FLUSH_LIBRARY, log_flush_library
from moeq.toolchain import Toolchain

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny-phimoe.yaml"


def example_section(name: str) -> dict:
    """A section of examples/tiny-phimoe.yaml, to change in a copy: {**example_section("hub"), "private": True}."""
    return yaml.safe_load(EXAMPLE.read_text())[name]


PER_QUANT = {**example_section("hub"), "layout": "per-quant",  # hub: a repo per quant
             "repo_template": "{namespace}/tiny-phimoe-{quant_slug}-gguf"}


def pipeline_file(folder: Path, *, trained: bool = True, rpc: str | None = None, **sections) -> Path:
    """examples/tiny-phimoe.yaml as FOLDER/tiny-phimoe.yaml (its workspace FOLDER/work), changed by value, not by
    editing its text: each section given replaces the example's (`hub=PER_QUANT`, `card={"template": T}`), or is
    removed when given as None. `trained=False`: random weights (seeded numpy, the same bytes on every
    machine; the trained model's depend on the CPU torch ran on). `rpc`: bench.rpc (the `rpc_device` fixture).

    The trained model's importance matrix is made from 40 chunks of the calibration text (10,240 tokens, every
    expert still ten times over the coverage bar), not all 200: a build from scratch takes 3 s less, and the tests
    assert what moeq does with the matrix, not its figures. The random-weights builds (the golden cards) keep all."""
    data = yaml.safe_load(EXAMPLE.read_text())
    if trained:
        data["imatrix"] = {**data.get("imatrix", {}), "chunks": QUICK_IMATRIX_CHUNKS}
    else:
        del data["source"]["train"]
    if rpc:
        data["bench"]["rpc"] = rpc
    for name, value in sections.items():
        if value is None:
            data.pop(name, None)
        else:
            data[name] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny-phimoe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


QUICK_IMATRIX_CHUNKS = 40


def quick_imatrix(text: str) -> str:
    """A pipeline file's text with its importance matrix from QUICK_IMATRIX_CHUNKS chunks (see pipeline_file)."""
    return re.sub(r"^imatrix:", f"imatrix:\n  chunks: {QUICK_IMATRIX_CHUNKS}", text, count=1, flags=re.M)


def rebuild_from_card(files: dict[str, bytes], out: str, source: Path, folder: Path, tool: Path) -> bytes:
    """Run the card's `llama-quantize --pure ...` line that makes `out` in `folder`, with the importance matrix and
    recipe file as published (`files`: the repo's) and `source` (the F16) beside them; the bytes it made."""
    [command] = [shlex.split(line) for line in files["README.md"].decode().splitlines()
                 if line.startswith("llama-quantize --pure ") and f" {out} " in line]
    for name in command:
        if name.endswith((".imatrix", ".recipe")):
            (folder / name).write_bytes(files[name])
    (folder / source.name).symlink_to(source)
    proc = subprocess.run([str(tool), *command[1:]], cwd=folder, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return (folder / out).read_bytes()


def copy_built(built: Path, folder: Path) -> None:
    """Everything under `built` (a pipeline file and its workspace) copied into `folder` with `cp -a`. Records hold
    workspace-relative paths, so the copy is current and independent of the original (test_build.py's
    test_a_moved_and_a_copied_workspace shows both): a test starts from a workspace built once per session."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", f"{built}/.", str(folder)], check=True)


def default_sigint() -> None:
    """preexec_fn for a moeq process a test interrupts: a shell that starts the tests in the background (`cmd &`)
    hands every child an ignored SIGINT, and Python keeps it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="session")
def toolchain() -> Toolchain:
    """The tools scripts/setup built. Missing tools fail the tests: they are not optional."""
    chain = Toolchain()
    chain.tool("llama-quantize")
    return chain


# The fixtures that build a workspace, a ladder, a release or an installed wheel (seconds to tens of seconds, once per
# module or session): every test that uses one is slow. Tests slow on their own carry @pytest.mark.slow.
SLOW_FIXTURES = {"built", "benched", "benched_record", "carded_ladder", "carded_per_quant", "chosen", "cuda_tools", "example_built",
                 "hub", "installed", "made", "published", "q8_built", "quantized_ladder", "release", "searched"}


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: runs pipelines or builds a workspace, seconds a test; "
                                       "`pytest -m 'not slow'` is the edit loop")


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def run_target(pipeline, target: str, quant: str | None = None, ctx=None, **options):
    """`target`'s result for `quant` (else the whole ladder) from the plan cut at it, as the commands run it."""
    from moeq.plan import Options, run_to
    from moeq.steps.context import Context

    ctx = ctx or Context.of(pipeline)
    force = frozenset({target} if options.pop("force", False) else ())
    quants = [pipeline.quant(quant)] if quant else list(pipeline.quants)
    ladder = target in ("fetch", "imatrix") or (target in ("card", "push") and pipeline.single_repo)
    return run_to(ctx, target, quants, Options(force=force, **options))[(target, None if ladder else quant)]


def tool_folder(folder: Path, toolchain: Toolchain, wrappers: dict[str, str] | None = None) -> Path:
    """A llama.cpp tool folder for `toolchain.llama_cpp_bin`, with moeq's log flush beside its tools as the pinned
    build has it: each tool the real one, or a sh script around it (`wrappers[NAME]`, where {real} is its path)."""
    from moeq.toolchain import TOOLS

    folder.mkdir(parents=True, exist_ok=True)
    for name in TOOLS:
        if name in (wrappers or {}):
            (folder / name).write_text("#!/bin/sh\n" + wrappers[name].format(real=toolchain.path(name)))
            (folder / name).chmod(0o755)
        else:
            (folder / name).symlink_to(toolchain.path(name))
    link_log_flush(folder, toolchain)
    return folder


def link_log_flush(folder: Path, toolchain: Toolchain) -> None:
    """A test's own tool folder gets moeq's log flush beside its tools, as the pinned build has it."""
    library = log_flush_library(toolchain.path("llama-completion"))
    assert library is not None, "scripts/setup builds the log flush library"
    (folder / LOG_FLUSH_LIBRARY).symlink_to(library)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_synth_model(tmp_path_factory.mktemp("models") / "tiny-phimoe-F16.gguf", SynthSpec())


def run_moeq(*args: str, env: dict | None = None, cwd: Path | None = None,
             process: bool = False) -> subprocess.CompletedProcess:
    """Run the `moeq` command line: in this process through typer's CliRunner, or as a process of its own.

    A process of its own (`python -m moeq`, as a user runs it) where a process boundary is what is tested:
    signals and locks (`process=True`), and an environment of its own (`env`), which the Hub client and
    moeq's limits read when they load."""
    if process or env is not None:
        return subprocess.run([sys.executable, "-m", "moeq", *args], capture_output=True, text=True,
                              env={**os.environ, **(env or {})}, cwd=cwd or REPO, timeout=300)
    from typer.testing import CliRunner

    from moeq.cli import app

    with contextlib.chdir(cwd or REPO):
        result = CliRunner().invoke(app, list(args), prog_name="moeq")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback that a process would hide behind exit 1: show it to the test
    return subprocess.CompletedProcess(["moeq", *args], result.exit_code, result.stdout, result.stderr)


HUB_TOKEN = "hf_moeqTestTokenThatMustNeverLeak0123456789"
HUB_USER = "moeq-test"


@pytest.fixture
def test_hub(tmp_path):
    """A running Hub-protocol server (tests/hub_server.py) and the environment that points moeq at it."""
    from hub_server import TestHub

    hub = TestHub({HUB_TOKEN: HUB_USER, "hf_otherUserToken": "someone-else"})
    hub.env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": HUB_TOKEN, "HF_HUB_DISABLE_XET": "1",
               "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    yield hub
    hub.close()


@pytest.fixture(scope="session")
def rpc_device(toolchain):
    """A ggml-rpc-server on 127.0.0.1: llama.cpp treats it as an offload device, as it would a GPU."""
    from moeq.bench.rpc import rpc_endpoint

    with rpc_endpoint("local", toolchain) as address:
        yield address


@pytest.fixture(scope="session")
def example_built(tmp_path_factory, toolchain, rpc_device) -> Path:
    """The folder of the example pipeline (trained weights; the RPC device stands in for a GPU) after `moeq build
    --all`: every stage but the push. Copy it (copy_built) rather than change it."""
    config = pipeline_file(tmp_path_factory.mktemp("example-built"), rpc=rpc_device)
    proc = run_moeq("build", "--config", str(config), "--all")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return config.parent


@pytest.fixture(scope="session")
def quantized_ladder(tmp_path_factory, toolchain) -> Path:
    """The folder of the example pipeline (random weights) with its ladder quantized, the choice made, nothing
    validated or carded: copy it (cards_support.ladder_copy) rather than change it."""
    from cards_support import build_until_card, copy_example

    config = copy_example(tmp_path_factory.mktemp("quantized-ladder"))
    build_until_card(config, validate=())
    return config.parent


@pytest.fixture(scope="session")
def carded_ladder(tmp_path_factory, quantized_ladder):
    """The example pipeline (one repo for the ladder, random weights) quantized, validated and carded in a workspace
    of its own: (pipeline, workspace, card outcome by repo). Tests that change it put it back."""
    from cards_support import ladder_copy, make_cards

    pipeline, ws = ladder_copy(quantized_ladder, tmp_path_factory.mktemp("cards"))
    return pipeline, ws, make_cards(pipeline)


@pytest.fixture(scope="session")
def carded_per_quant(tmp_path_factory, quantized_ladder):
    """The same with a repo per quant (hub.layout per-quant)."""
    from cards_support import ladder_copy, make_cards

    pipeline, ws = ladder_copy(quantized_ladder, tmp_path_factory.mktemp("cards-per-quant"), hub=PER_QUANT)
    return pipeline, ws, make_cards(pipeline)


@pytest.fixture(scope="session")
def good_card(carded_ladder):
    """The ladder's card and its records manifest, as staged."""
    from cards_support import card_text
    from moeq.manifest import MANIFEST_NAME, read_manifest

    _, ws, _ = carded_ladder
    return card_text(ws), read_manifest(ws.repo_dir(None) / MANIFEST_NAME)
