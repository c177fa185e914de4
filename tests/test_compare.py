"""compare: other publishers' GGUFs of the model, fetched from the (test) Hub, checked from their header, measured
beside the ladder on the same text and machine, and shown on the card; hostile ones refused with one line."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import copy_built, run_moeq
from moeq.cards.facts.compare import VERDICTS
from moeq.compare.identity import first_difference
from moeq.config import CompareSpec, SynthSpec
from moeq.gguf_header import read_header
from moeq.kld import compare
from moeq.manifest import MANIFEST_NAME, read_manifest
from moeq.records import Made
from moeq.synth import write_synth_model

PUBLISHER = "other-publisher/tiny-phimoe-GGUF"
PEER = "tiny-phimoe-Q4_K_M.gguf"
OTHER = "other/other-model-Q4_K_M.gguf"


def with_compare(config: Path, peers: list[dict]) -> Path:
    data = yaml.safe_load(config.read_text())
    data["compare"] = peers
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return config


def quantized(toolchain, source: Path, out: Path, quant: str = "Q4_K_M") -> bytes:
    """`source` quantized by plain llama-quantize, as another publisher would (no importance matrix)."""
    proc = subprocess.run([str(toolchain.path("llama-quantize")), str(source), str(out), quant],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out.read_bytes()


def record(folder: Path, repo: str, file: str) -> dict:
    path = folder / "work" / "records" / f"compare-{CompareSpec(repo, file).id}.json"
    return json.loads(path.read_text())["record"]


@pytest.fixture
def built_copy(tmp_path, example_built) -> Path:
    copy_built(example_built, tmp_path)
    return tmp_path / "tiny-phimoe.yaml"


@pytest.mark.slow
def test_a_plain_llama_quantize_file_is_measured_as_moeqs_own_and_another_model_is_refused(
        tmp_path, built_copy, test_hub, toolchain):
    source = tmp_path / "work" / "source" / "tiny-phimoe-F16.gguf"
    peer = quantized(toolchain, source, tmp_path / "peer.gguf")
    other_f16 = write_synth_model(tmp_path / "other-F16.gguf", SynthSpec(layers=2, experts=4, embd=256, ff=256))
    other = quantized(toolchain, other_f16, tmp_path / "other.gguf")
    commit = test_hub.state.add_files(PUBLISHER, {PEER: peer, OTHER: other})
    config = with_compare(built_copy, [{"repo": PUBLISHER, "file": PEER, "label": "plain llama-quantize Q4_K_M"},
                                       {"repo": PUBLISHER, "file": OTHER}])

    proc = run_moeq("build", "--config", str(config), "--all", "--json", env=test_hub.env)
    summary = json.loads(proc.stdout)
    assert proc.returncode == 3, proc.stderr
    # every quant's stages are as the build left them; the card was made again, with the comparison
    assert all(q["ok"] for q in summary["quants"])
    assert [(p["file"], p["status"]) for p in summary["compared"]] == [(PEER, "ran"), (OTHER, "failed")]
    [error] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    difference = first_difference(read_header(source), read_header(tmp_path / "other.gguf"))
    assert difference is not None
    assert error == (f"error: {PUBLISHER}/{OTHER}: compare failed: {PUBLISHER}/{OTHER}@{commit[:12]}: not a "
                     f"quantization of the F16 source: {difference}; remove it from compare in the pipeline file, or "
                     "name a GGUF of the same model")

    measured = record(tmp_path, PUBLISHER, PEER)
    assert measured["commit"] == commit and measured["refused"] is None
    assert measured["files"] == [{"name": PEER, "size": len(peer), "sha256": hashlib.sha256(peer).hexdigest()}]
    # plain llama-quantize is deterministic: the peer is moeq's own candidate made without the matrix, byte for
    # byte, and measured the same
    choice = json.loads((tmp_path / "work" / "records" / "choice-Q4_K_M.json").read_text())["record"]
    [without] = [c for c in choice["candidates"] if c["name"] == "without the importance matrix"]
    assert without["file"]["sha256"] == hashlib.sha256(peer).hexdigest()
    assert measured["quality"]["quant"]["kld_mean"] == without["quality"]["kld_mean"]
    assert measured["quality"]["quant"]["kld_mean_err"] == without["quality"]["kld_mean_err"]
    assert {t["type"] for t in measured["types"]} >= {"Q4_K", "Q6_K", "F32"}
    assert [run["mode"] for run in measured["speed"]] == ["cpu"]  # no GPU here: the offload modes are not run
    refused = record(tmp_path, PUBLISHER, OTHER)
    assert refused["refused"] == f"not a quantization of the F16 source: {difference}"
    assert refused["quality"] is None
    assert not list((tmp_path / "work" / "compare").rglob("*.gguf*"))  # measured or refused, then deleted

    card = tmp_path / "work" / "repos" / "ladder" / "README.md"
    text = card.read_text()
    section = text.split("## Compared with other published files")[1].split("\n## ")[0]
    assert f"### [plain llama-quantize Q4_K_M](https://huggingface.co/{PUBLISHER}/blob/{commit}/{PEER})" in section
    assert f"in [{PUBLISHER}](https://huggingface.co/{PUBLISHER}/tree/{commit})" in section
    assert "| Figure | That file | This repo's Q4_K_M |" in section
    kld = f"{without['quality']['kld_mean']:.6f} ± {without['quality']['kld_mean_err']:.6f}"
    assert f"| Mean KLD | {kld} |" in section
    assert "other-model" not in text
    manifest = read_manifest(card.parent / MANIFEST_NAME)
    assert [r.repo_file for r in manifest.compared] == [PEER]
    # the verdict is the choice's own between the published file and the one made without the matrix: the same file
    choice = manifest.entry("Q4_K_M").records.choice
    [unpublished] = [c for c in choice.candidates if c.name == Made.WITHOUT]
    verdict = VERDICTS[compare(choice.published.quality, unpublished.quality)]
    assert f"by the rule moeq chooses its own files by: {verdict}." in section
    assert "plain llama-quantize Q4_K_M from other-publisher/tiny-phimoe-GGUF" in text  # the chart's alt text
    for check in ("lint", "verify"):
        proc = run_moeq("card", check, str(card))
        assert proc.returncode == 0, proc.stdout + proc.stderr

    # the card's own command takes the comparison as measured, without asking the Hub
    start = len(test_hub.requests)
    proc = run_moeq("card", "--config", str(config), "--force", env=test_hub.env)
    assert proc.returncode == 0, proc.stderr
    assert card.read_text() == text and not test_hub.requests[start:]

    # nothing changed: nothing is downloaded or measured again, and the refusal is said again from its record
    proc = run_moeq("compare", "--config", str(config), "--json", env=test_hub.env)
    assert proc.returncode == 3 and "not a quantization of the F16 source" in proc.stderr
    assert [item["skipped"] for item in json.loads(proc.stdout)] == [True, True]
    assert not [r for r in test_hub.requests[start:] if r.path.startswith(("/lfs-objects/", f"/{PUBLISHER}/resolve"))]


def random_example(tmp_path: Path, peers: list[dict]) -> Path:
    """The example with random weights (made in a second) and `peers` in compare:."""
    from conftest import pipeline_file

    return pipeline_file(tmp_path, trained=False, compare=peers)


def left_behind(tmp_path: Path) -> list[Path]:
    """What a refused compared file left: any file under the compare folder but a log, or a compare record."""
    work = tmp_path / "work"
    return ([p for p in (work / "compare").rglob("*") if p.is_file() and p.suffix != ".log"]
            + list((work / "records").glob("compare-*.json")))


def gguf_claiming(tensors: int) -> bytes:
    """A GGUF header that claims `tensors` tensors and holds none."""
    import struct

    return b"GGUF" + struct.pack("<IQQ", 3, tensors, 0) + bytes(4096)


@pytest.mark.parametrize("case", ["larger than the F16", "truncated", "absurd tensor count"])
def test_a_hostile_file_is_refused_with_one_line_and_nothing_left(tmp_path, test_hub, case):
    config = random_example(tmp_path, [{"repo": PUBLISHER, "file": PEER}])
    run_moeq("fetch", "--config", str(config))
    source = (tmp_path / "work" / "source" / "tiny-phimoe-F16.gguf").read_bytes()
    data = {"larger than the F16": source + bytes(1024), "truncated": source[:-4096],
            "absurd tensor count": gguf_claiming(1 << 39)}[case]
    commit = test_hub.state.add_files(PUBLISHER, {PEER: source if case == "truncated" else data})
    if case == "truncated":  # the Hub lists the whole file; its storage serves a file cut short
        test_hub.state.lfs[hashlib.sha256(source).hexdigest()] = data
    proc = run_moeq("compare", "--config", str(config), env=test_hub.env)
    where = f"{PUBLISHER}/{PEER}@{commit[:12]}"
    expected = {
        "larger than the F16": (f"error: {where}: {len(data) / 1e6:.2f} MB ({len(data):,} bytes), larger than the F16 "
                                f"source ({len(source):,} bytes), so no quantization of it; nothing was downloaded"),
        "truncated": (f"error: {PUBLISHER}/{PEER}@{commit[:12]}: the download ended at {len(data):,} of the "
                      f"{len(source):,} bytes the Hub lists"),
        "absurd tensor count": f"error: {where}: GGUF header claims {1 << 39} tensors and 0 keys, more than its "
                               f"{len(data):,} bytes can hold; the file is corrupt; remove it from compare in {config}",
    }[case]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode in (3, 5) and len(errors) == 1 and errors[0].startswith(expected), proc.stderr
    assert "Traceback" not in proc.stderr
    assert left_behind(tmp_path) == []


def test_the_pipeline_refuses_a_compared_file_it_cannot_name_safely(tmp_path):
    cases = {
        "../outside.gguf": "is not a safe relative name",
        "model.safetensors": "is not a .gguf file",
        "split/model-00002-of-00003.gguf": "is shard 2 of a split file; name its first shard, "
                                           "model-00001-of-00003.gguf",
    }
    for file, problem in cases.items():
        config = random_example(tmp_path, [{"repo": PUBLISHER, "file": file}])
        proc = run_moeq("check-config", "--config", str(config))
        assert proc.returncode == 2 and problem in proc.stderr and "compare[0].file" in proc.stderr, proc.stderr
    config = random_example(tmp_path, [{"repo": PUBLISHER, "file": PEER}] * 2)
    proc = run_moeq("check-config", "--config", str(config))
    assert proc.returncode == 2 and f"{PUBLISHER}/{PEER} is listed twice" in proc.stderr
    config = random_example(tmp_path, [{"repo": PUBLISHER, "file": PEER, "label": "x" * 81}])
    assert "a label is 1 to 80 printable characters" in run_moeq("check-config", "--config", str(config)).stderr
    config = random_example(tmp_path, [{"repo": PUBLISHER, "file": f"f{i}.gguf"} for i in range(17)])
    assert "compare: 17 files; compare at most 16" in run_moeq("check-config", "--config", str(config)).stderr
    from conftest import example_section

    config = random_example(tmp_path, [{"repo": PUBLISHER, "file": PEER}])
    data = yaml.safe_load(config.read_text())
    data["bench"] = {**example_section("bench"), "quality": False}
    config.write_text(yaml.safe_dump(data))
    proc = run_moeq("check-config", "--config", str(config))
    assert proc.returncode == 2 and "they are compared on their KL divergence against F16" in proc.stderr
    assert not (tmp_path / "work").exists()


@pytest.mark.slow
def test_a_compared_file_with_the_rungs_own_figures_is_within_the_uncertainty_and_its_label_stays_text(example_built):
    """The card's comparison agrees with itself: a compared file whose figures are a rung's own is set beside that
    rung, every row equal, the verdict "within"; a hostile label opens no link or cell; one the manifest holds
    without figures is left out."""
    from moeq.cards.facts import card_facts
    from moeq.cards.lint import lint_card
    from moeq.cards.render import render_card
    from moeq.records import CompareRecord, PeerFile, TypeShare

    manifest = read_manifest(example_built / "work" / "repos" / "ladder" / MANIFEST_NAME)
    entry = manifest.entry("Q4_K_M")
    bench, quantized = entry.records.bench, entry.records.quantize
    size = sum(f.size for f in entry.files)
    shares: dict[str, list[int]] = {}
    for t in quantized.tensors:
        shares.setdefault(t.type_after, [0, 0])
        shares[t.type_after][0] += 1
        shares[t.type_after][1] += t.bytes_after
    label = "evil](https://example.com) | cell `x` <b>"
    twin = CompareRecord(peer="p", repo=PUBLISHER, repo_file="q/twin.gguf", revision=None, commit="a" * 40,
                         label=label, files=[PeerFile(name="q/twin.gguf", size=size, sha256="b" * 64)], size=size,
                         bpw=quantized.quant_bpw, types=[TypeShare(type=k, tensors=n, bytes=b) for k, (n, b) in
                                                         sorted(shares.items(), key=lambda kv: -kv[1][1])],
                         machine=bench.machine, tool=bench.tool, options=bench.options, speed=bench.speed,
                         quality=bench.quality)
    cut_short = twin.model_copy(update={"peer": "q", "repo_file": "q/short.gguf", "quality": None})
    compared = manifest.model_copy(update={"compared": [twin, cut_short]})
    text = render_card(card_facts(compared))
    section = text.split("## Compared with other published files")[1].split("\n## ")[0]
    assert section.count("\n### ") == 1 and "short.gguf" not in section
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith(("| Figure", "| ---"))]
    assert len(rows) == 9 and all(line.split(" | ")[1] == line.split(" | ")[2].rstrip(" |") for line in rows), rows
    assert ("by the rule moeq chooses its own files by: the two mean KL divergences against F16 are within twice "
            "their combined uncertainty.") in section
    assert "### [evil\\](https://example.com) \\| cell \\`x\\` &lt;b&gt;](https://huggingface.co/" in section
    assert lint_card(text, "README.md", compared) == []
