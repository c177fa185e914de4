"""`moeq fetch`: gguf and hf sources from the test Hub, checked, resumed, then quantized."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import pytest

from moeq.config import SynthSpec
from moeq.synth import PHI35_CHAT_TEMPLATE

from conftest import HUB_TOKEN, REPO, run_moeq
from hub_server import Fault

SOURCE_REPO = "someone/tiny-phimoe-f16"


def write_config(tmp_path: Path, source: str) -> Path:
    text = (REPO / "examples" / "tiny-phimoe.yaml").read_text()
    start, end = text.index("source:\n"), text.index("\nworkspace:")
    config = tmp_path / "pipeline.yaml"
    config.write_text(text[:start] + "source:\n" + source + text[end:])
    return config


def fetch(hub, config: Path, *args: str):
    proc = run_moeq("fetch", "--config", str(config), *args, env=hub.env)
    assert HUB_TOKEN not in proc.stdout + proc.stderr
    return proc


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.slow
def test_gguf_source_fetched_checked_and_quantized(tmp_path, test_hub, tiny_model, toolchain):
    data = tiny_model.read_bytes()
    commit = test_hub.state.add_files(SOURCE_REPO, {"tiny-phimoe-F16.gguf": data})
    config = write_config(tmp_path, f"  kind: gguf\n  repo: {SOURCE_REPO}\n  revision: main\n"
                                    "  file: tiny-phimoe-F16.gguf\n")
    proc = fetch(test_hub, config, "--json")
    assert proc.returncode == 0, proc.stderr
    assert f"source.revision 'main' is not a commit sha; using {commit}" in proc.stderr
    record = json.loads(proc.stdout)["record"]
    assert record["origin"] == f"{SOURCE_REPO}@{commit}/tiny-phimoe-F16.gguf"
    assert record["output"]["sha256"] == sha256(data) and record["options"]["commit"] == commit
    assert Path(record["output"]["path"]).read_bytes() == data
    start = len(test_hub.requests)
    proc = fetch(test_hub, config, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["skipped"] is True
    assert not [r for r in test_hub.requests[start:] if "/lfs-objects/" in r.path or "/resolve/" in r.path]
    proc = run_moeq("quantize", "--config", str(config), "--quant", "Q8_0", env=test_hub.env)
    assert proc.returncode == 0, proc.stderr


def test_split_gguf_source_is_merged(tmp_path, test_hub, tiny_model, toolchain):
    shards_dir = tmp_path / "shards"
    shards_dir.mkdir()
    subprocess.run([str(toolchain.path("llama-gguf-split")), "--split", "--split-max-size", "2M", str(tiny_model),
                    str(shards_dir / "tiny-phimoe-F16")], check=True, capture_output=True)
    shards = sorted(shards_dir.glob("*.gguf"))
    assert len(shards) > 2
    commit = test_hub.state.add_files(SOURCE_REPO, {s.name: s.read_bytes() for s in shards})
    config = write_config(tmp_path, f"  kind: gguf\n  repo: {SOURCE_REPO}\n  revision: {commit}\n"
                                    f"  file: {shards[0].name}\n")
    proc = fetch(test_hub, config, "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)["record"]
    assert [f["name"] for f in record["options"]["files"]] == [s.name for s in shards]
    merged, original = gguf.GGUFReader(record["output"]["path"]), gguf.GGUFReader(tiny_model)
    assert [(t.name, t.data.tobytes()) for t in merged.tensors] == [(t.name, t.data.tobytes()) for t in original.tensors]
    # Pinned to a commit sha: a second fetch asks the Hub nothing at all.
    start = len(test_hub.requests)
    proc = fetch(test_hub, config)
    assert proc.returncode == 0 and "up to date" in proc.stdout
    assert test_hub.requests[start:] == []


CARD = b"""---
license: mit
language: [en]
tags: [tiny, phimoe]
---
# tiny-phimoe-hf

A checkpoint for moeq's tests.
"""


@pytest.mark.slow
@pytest.mark.parametrize("with_card", [True, False], ids=["with-card", "without-card"])
def test_hf_source_is_downloaded_converted_quantized_and_validated(tmp_path, test_hub, toolchain, with_card):
    from moeq.synth_hf import write_tiny_phimoe_hf

    checkpoint = write_tiny_phimoe_hf(tmp_path / "hf", SynthSpec(vocab=320))
    files = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    files["notes.txt"] = b"not part of a conversion: not downloaded\n"
    if with_card:  # the card carries the license the converter writes into the GGUF
        files["README.md"] = CARD
        files["LICENSE"] = b"MIT License\n"
    else:  # the chat template in chat_template.jinja, as transformers now saves it, not in tokenizer_config.json
        tokenizer_config = json.loads(files["tokenizer_config.json"])
        files["chat_template.jinja"] = tokenizer_config.pop("chat_template").encode()
        files["tokenizer_config.json"] = json.dumps(tokenizer_config).encode()
    commit = test_hub.state.add_files("someone/tiny-phimoe-hf", files)
    config = write_config(tmp_path, f"  kind: hf\n  repo: someone/tiny-phimoe-hf\n  revision: {commit}\n")
    proc = fetch(test_hub, config, "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)["record"]
    assert sorted(f["name"] for f in record["options"]["files"]) == sorted(n for n in files if n != "notes.txt")
    reader = gguf.GGUFReader(record["output"]["path"])
    assert reader.fields["general.architecture"].contents() == "phimoe"
    assert reader.fields["phimoe.expert_count"].contents() == 4
    assert {t.name for t in reader.tensors} >= {"blk.1.ffn_down_exps.weight", "output.bias", "rope_factors_long.weight"}
    if with_card:
        assert reader.fields["general.license"].contents() == "mit"
    else:
        assert "general.license" not in reader.fields
    assert reader.fields["tokenizer.chat_template"].contents() == PHI35_CHAT_TEMPLATE  # wherever the checkpoint had it
    quant = "Q4_K_M" if with_card else "Q8_0"  # one conversion through the imatrix and the choice is enough
    proc = run_moeq("quantize", "--config", str(config), "--quant", quant, env=test_hub.env)
    assert proc.returncode == 0, proc.stderr
    # Every key the source has is carried over; a key it lacks (no card: no license) is not required.
    proc = run_moeq("validate", "--config", str(config), "--quant", quant, "--json", env=test_hub.env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metadata = next(c for c in json.loads(proc.stdout)["checks"] if c["name"] == "metadata")
    assert metadata["ok"] and "carried over unchanged" in metadata["detail"]
    # The license text that came with the checkpoint is kept after conversion, published and linked.
    proc = run_moeq("card", "--config", str(config), "--quant", quant, env=test_hub.env)
    assert proc.returncode == 0, proc.stderr
    staged = tmp_path / "work" / "repos" / "ladder"
    readme = (staged / "README.md").read_text()
    if with_card:
        assert record["license"]["sha256"] == sha256(files["LICENSE"])
        assert (staged / "LICENSE").read_bytes() == files["LICENSE"]
        link = "[LICENSE](https://huggingface.co/moeq-test/tiny-phimoe-GGUF/blob/main/LICENSE)"
        assert f"- **License**: mit, as the base model ({link} in this repo)" in readme
        assert f"published in this repo as {link}." in readme
        assert "LICENSE" in json.loads((staged / "moeq-manifest.json").read_text())["repo_files"]
    else:
        assert record["license"] is None and not (staged / "LICENSE").exists() and "LICENSE" not in readme
    # The F16 deleted after the build (84 GB freed): what is current stays current, keyed by its recorded sha256;
    # a stage that must read it again says it is gone.
    source = tmp_path / "work" / "source" / "tiny-phimoe-F16.gguf"
    assert source.is_file()
    source.unlink()
    proc = run_moeq("card", "--config", str(config), "--quant", quant, "--force", env=test_hub.env)
    assert proc.returncode == 0, proc.stderr
    proc = run_moeq("quantize", "--config", str(config), "--quant", "Q2_K", env=test_hub.env)
    assert proc.returncode == 3 and f"{source}: source model not found" in proc.stderr, proc.stderr
    assert "moeq fetch" in proc.stderr.splitlines()[-1]


def test_tampered_download_is_rejected(tmp_path, test_hub, tiny_model):
    data = tiny_model.read_bytes()
    test_hub.state.add_files(SOURCE_REPO, {"tiny-phimoe-F16.gguf": data})
    test_hub.state.lfs[sha256(data)] = data[:-16] + b"\0" * 16  # what storage serves is not what the Hub lists
    config = write_config(tmp_path, f"  kind: gguf\n  repo: {SOURCE_REPO}\n  revision: main\n"
                                    "  file: tiny-phimoe-F16.gguf\n")
    proc = fetch(test_hub, config)
    assert proc.returncode == 5
    assert f"downloaded sha256 {sha256(data[:-16] + bytes(16))} is not the {sha256(data)} the Hub reports" in proc.stderr
    source = tmp_path / "work" / "source"
    assert not (source / "tiny-phimoe-F16.gguf").exists()
    assert not list(source.rglob("*.partial"))


@pytest.mark.slow
def test_dropped_download_resumes_with_range(tmp_path, test_hub):
    from moeq.synth import write_synth_model

    # Bigger than the client's 10 MB read size, so that a body cut in half has delivered a whole chunk.
    model = write_synth_model(tmp_path / "tiny-phimoe-F16.gguf", SynthSpec(layers=4, ff=1024))
    data = model.read_bytes()
    assert len(data) > 24 * 2**20
    test_hub.state.add_files(SOURCE_REPO, {"tiny-phimoe-F16.gguf": data})
    test_hub.state.faults.append(Fault("GET", r"^/lfs-objects/", "truncate"))
    config = write_config(tmp_path, f"  kind: gguf\n  repo: {SOURCE_REPO}\n  revision: main\n"
                                    "  file: tiny-phimoe-F16.gguf\n")
    proc = fetch(test_hub, config)
    assert proc.returncode == 0, proc.stderr
    gets = [r for r in test_hub.requests if r.method == "GET" and r.path.startswith("/lfs-objects/")]
    assert len(gets) == 2 and gets[0].range is None
    resumed_at = int(gets[1].range.removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= len(data) // 2
    assert (tmp_path / "work" / "source" / "tiny-phimoe-F16.gguf").read_bytes() == data


def half_downloaded(tmp_path: Path, test_hub, tiny_model) -> tuple[bytes, Path, Path]:
    """The tiny model on the test Hub as a gguf source, and the first 3 MB of it left by a killed run:
    (its bytes, the pipeline file, the .partial)."""
    data = tiny_model.read_bytes()
    test_hub.state.add_files(SOURCE_REPO, {"tiny-phimoe-F16.gguf": data})
    config = write_config(tmp_path, f"  kind: gguf\n  repo: {SOURCE_REPO}\n  revision: main\n"
                                    "  file: tiny-phimoe-F16.gguf\n")
    partial = tmp_path / "work" / "source" / "download" / "tiny-phimoe-F16.gguf.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data[:3_000_000])
    return data, config, partial


def test_killed_download_resumes_in_the_next_run(tmp_path, test_hub, tiny_model):
    data, config, partial = half_downloaded(tmp_path, test_hub, tiny_model)
    proc = fetch(test_hub, config)
    assert proc.returncode == 0, proc.stderr
    gets = [r for r in test_hub.requests if r.method == "GET" and r.path.startswith("/lfs-objects/")]
    assert [r.range for r in gets] == ["bytes=3000000-"]
    assert (tmp_path / "work" / "source" / "tiny-phimoe-F16.gguf").read_bytes() == data


@pytest.mark.slow
def test_sigterm_keeps_the_download_and_says_so(tmp_path, test_hub, tiny_model):
    """SIGTERM in the middle of a download: exit 143, the message says the .partial is kept, and it is (resumed)."""
    data, config, partial = half_downloaded(tmp_path, test_hub, tiny_model)
    test_hub.state.faults.append(Fault("GET", r"^/lfs-objects/", "sleep", seconds=30))
    proc = subprocess.Popen([sys.executable, "-m", "moeq", "fetch", "--config", str(config)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **test_hub.env})
    deadline = time.monotonic() + 60
    while not any(r.path.startswith("/lfs-objects/") for r in test_hub.requests) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, out + err
    assert err.splitlines()[-1] == (
        "error: interrupted by SIGTERM; stopped the running tool and removed its partial output (a download keeps "
        "its .partial file); run the command again: a download resumes, a recipe search keeps every measurement it "
        "made, any other step starts over")
    assert partial.read_bytes() == data[:3_000_000]
    assert fetch(test_hub, config).returncode == 0
    assert [r.range for r in test_hub.requests if r.path.startswith("/lfs-objects/")][-1] == "bytes=3000000-"
    assert (tmp_path / "work" / "source" / "tiny-phimoe-F16.gguf").read_bytes() == data


@pytest.mark.parametrize("source,message", [
    ("  kind: gguf\n  repo: someone/missing\n  revision: main\n  file: x.gguf\n",
     "someone/missing: repository not found while resolving the revision"),
    (f"  kind: gguf\n  repo: {SOURCE_REPO}\n  revision: main\n  file: nope.gguf\n", "no file nope.gguf"),
    (f"  kind: gguf\n  repo: {SOURCE_REPO}\n  revision: v9\n  file: x.gguf\n", "revision not found"),
])
@pytest.mark.slow
def test_fetch_errors(tmp_path, test_hub, tiny_model, source, message):
    test_hub.state.add_files(SOURCE_REPO, {"tiny-phimoe-F16.gguf": tiny_model.read_bytes()})
    proc = fetch(test_hub, write_config(tmp_path, source))
    assert proc.returncode == 5 and message in proc.stderr and "Traceback" not in proc.stderr


def test_quantize_before_fetch_says_what_to_do(tmp_path, test_hub):
    config = write_config(tmp_path, f"  kind: gguf\n  repo: {SOURCE_REPO}\n  revision: main\n  file: x.gguf\n")
    proc = run_moeq("quantize", "--config", str(config), env=test_hub.env)
    assert proc.returncode == 3 and "has not been fetched; run moeq fetch --config" in proc.stderr


def test_disk_space_is_checked_before_downloading(tmp_path, test_hub, tiny_model, monkeypatch):
    import shutil

    from huggingface_hub import HfApi

    from moeq.config import load_pipeline
    from moeq.errors import ResourceError
    from moeq.steps import wiring
    from moeq.steps.context import Context

    test_hub.state.add_files(SOURCE_REPO, {"tiny-phimoe-F16.gguf": tiny_model.read_bytes()})
    pipeline = load_pipeline(write_config(tmp_path, f"  kind: gguf\n  repo: {SOURCE_REPO}\n  revision: main\n"
                                                    "  file: tiny-phimoe-F16.gguf\n"))
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=2 * 2**20))  # a nearly full disk
    with pytest.raises(ResourceError) as info:
        ctx = Context.of(pipeline)
        ctx.api = HfApi(endpoint=test_hub.url, token=HUB_TOKEN)
        wiring.fetch(ctx)
    from moeq.units import decimal_size
    from moeq.workspace import disk_needed

    need = decimal_size(disk_needed(tiny_model.stat().st_size))  # the one rule: +10 % and 64 MiB of slack
    assert info.value.message.startswith(f"{pipeline.workspace / 'source'}: 2.10 MB free, the source needs about "
                                         f"{need};")
    assert not [r for r in test_hub.requests if "/lfs-objects/" in r.path or "/resolve/" in r.path]


@pytest.mark.parametrize("files,expected", [
    ({"tokenizer_config.json": '{"chat_template": "A"}', "chat_template.jinja": "B"}, ("A", "tokenizer_config.json")),
    ({"tokenizer_config.json": "{}", "chat_template.jinja": "B"}, ("B", "chat_template.jinja")),
    ({"chat_template.json": '{"chat_template": "C"}'}, ("C", "chat_template.json")),
    ({"tokenizer_config.json": '{"chat_template": [{"name": "default", "template": "A"}]}'}, (None, "")),
    ({"chat_template.jinja": "B", "additional_chat_templates/tool_use.jinja": "D"}, (None, "")),
    ({"tokenizer_config.json": "[1, 2]", "chat_template.json": '"not an object"'}, (None, "")),
    ({}, (None, "")),
])
def test_the_checkpoints_chat_template_is_found_where_the_converter_takes_it(tmp_path, files, expected):
    """The one template the F16 must carry after conversion, found as gguf-py's SpecialVocab finds it; named
    templates and broken files are left to the converter."""
    from moeq.fetch.hub_source import checkpoint_chat_template

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert checkpoint_chat_template(tmp_path) == expected
