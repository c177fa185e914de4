"""The release rehearsal: Phi-3.5-MoE's real release path, at its real layer dimensions, against the test Hub.

    .venv/bin/python benchmarks/rehearsal.py [--layers 1 2] [--dir DIR] [--keep]

For each layer count N: a Phi-3.5-MoE-shaped checkpoint (every tensor at its real size: hidden 4096, 16 experts
of width 6400, 32/8 heads, a 32064-token vocabulary; bf16 safetensors in shards with an index, README
frontmatter and LICENSE) is served by tests/hub_server.py and taken through `moeq build --all --push`
(source kind hf: download, convert, imatrix, the choice with and without it, Q8_0/Q4_K_M/Q2_K, validate, bench,
card, push), then read back with `llama-completion -hf REPO:Q4_K_M` through llama.cpp's own Hub download.

Printed per N: each stage's wall time (from the build's own summary), the build's peak RSS (moeq's own and the
largest llama.cpp tool's), its peak disk (the most the workspace's free space went down) and `moeq doctor`'s
estimate beside it. The tokenizer is a small SentencePiece model trained on generated text; the converter pads
the vocabulary to the config's 32064 tokens, so every tensor keeps its real shape. Not run in CI: a layer is
about 3 GB of weights and the whole path takes minutes per layer on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "benchmarks")]

from hub_server import TestHub  # noqa: E402
from realdim import measure  # noqa: E402

from moeq.synth import PRESETS  # noqa: E402
from moeq.synth_hf import WORDS, checkpoint_layout, hf_config, train_tokenizer  # noqa: E402
from moeq.toolchain import Toolchain  # noqa: E402

MOEQ = [sys.executable, "-m", "moeq"]
TOKEN, USER = "hf_rehearsalTokenNotARealOne0123456789", "rehearsal"
SOURCE_REPO = "microsoft-rehearsal/Phi-3.5-MoE-shaped"
SHARDS = 4
CHUNK = 1 << 24  # values generated at a time

CARD = """---
license: mit
language:
- en
- multilingual
pipeline_tag: text-generation
tags:
- nlp
- code
---
# A Phi-3.5-MoE-shaped checkpoint for moeq's release rehearsal (random weights)
"""

PIPELINE = """\
model:
  name: Phi-3.5-MoE-shaped-L{layers}
  base_model: microsoft/Phi-3.5-MoE-instruct
  license: mit
  languages: [en]
  quantized_by: moeq
  file_stem: phi-shaped-L{layers}
  parameters: {parameters}
source:
  kind: hf
  repo: {source_repo}
  revision: {commit}
workspace: {workspace}
quants:
  - type: Q8_0
  - {{type: Q4_K_M, imatrix: auto}}
  - {{type: Q2_K, imatrix: auto}}
imatrix:
  ctx: 512
  chunks: 4
hub:
  namespace: {user}
  repo: {user}/Phi-3.5-MoE-shaped-L{layers}-GGUF
  max_shard_size: 50GB
bench:
  modes: [cpu, gpu, cpu-moe]
  n_prompt: 64
  n_gen: 16
  repetitions: 1
  ctx: [4096]
  rpc: local
  perplexity: {{ctx: 512, chunks: 2}}
"""


def write_checkpoint(folder: Path, layers: int) -> None:
    """The checkpoint, written tensor by tensor in bf16 (never more than CHUNK values in memory)."""
    _arch, spec = PRESETS["phi-3.5-moe"]
    spec = replace(spec, layers=layers)
    folder.mkdir(parents=True, exist_ok=True)
    layout = checkpoint_layout(spec)
    total = sum(2 * int(np.prod(shape)) for _name, shape, _fill in layout)
    shards: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
    size = 0
    for tensor in layout:
        if size >= total / SHARDS * len(shards) and len(shards) < SHARDS:
            shards.append([])
        shards[-1].append(tensor)
        size += 2 * int(np.prod(tensor[1]))
    rng = np.random.default_rng(0)
    weight_map = {}
    for index, tensors in enumerate(shards, 1):
        name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for tensor, shape, _fill in tensors:
            end = offset + 2 * int(np.prod(shape))
            header[tensor] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
            weight_map[tensor] = name
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(folder / name, "wb") as out:
            out.write(len(encoded).to_bytes(8, "little") + encoded)
            for _tensor, shape, fill in tensors:
                left = int(np.prod(shape))
                while left:
                    n = min(left, CHUNK)
                    values = (np.ones(n, np.float32) if fill == "ones"
                              else rng.standard_normal(n, dtype=np.float32) * np.float32(0.02))
                    (values.view(np.uint32) >> 16).astype(np.uint16).tofile(out)
                    left -= n
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = hf_config(spec) | {"torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    lines = [" ".join(np.random.default_rng(i).choice(WORDS, size=12)) for i in range(2000)]
    (folder / "tokenizer.model").write_bytes(train_tokenizer(lines, 320))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}, indent=2))
    (folder / "README.md").write_text(CARD)
    (folder / "LICENSE").write_text("MIT License\n\nCopyright (c) Microsoft Corporation.\n")


def serve(hub: TestHub, folder: Path) -> str:
    """The checkpoint's files on the test Hub, memory-mapped (not read into memory); its commit sha."""
    files = {}
    for path in sorted(folder.iterdir()):
        with open(path, "rb") as fh:
            files[path.name] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else b""
    return hub.state.add_files(SOURCE_REPO, files)


def _doctor_disk(config: Path) -> dict:
    proc = subprocess.run(MOEQ + ["doctor", "--config", str(config), "--json"], cwd=config.parent,
                          capture_output=True, text=True)
    return json.loads(proc.stdout)["disk"]


def _last_json(output: str) -> dict:
    """The JSON document `--json` printed, among the progress lines written beside it."""
    decoder = json.JSONDecoder()
    for start in reversed([i for i in range(len(output)) if output.startswith("{", i) and (i == 0 or output[i - 1] == "\n")]):
        try:
            return decoder.raw_decode(output, start)[0]
        except ValueError:
            continue
    raise SystemExit(f"no JSON summary in the build's output:\n{output[-2000:]}")


def rehearse(layers: int, root: Path) -> dict:
    folder = root / f"L{layers}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    write_checkpoint(folder / "checkpoint", layers)
    checkpoint_s = time.perf_counter() - started
    checkpoint_gb = sum(p.stat().st_size for p in (folder / "checkpoint").iterdir()) / 1e9
    hub = TestHub({TOKEN: USER})
    try:
        commit = serve(hub, folder / "checkpoint")
        config = folder / "pipeline.yaml"
        _arch, spec = PRESETS["phi-3.5-moe"]
        parameters = sum(int(np.prod(shape)) for _n, shape, _f in checkpoint_layout(replace(spec, layers=layers)))
        config.write_text(PIPELINE.format(layers=layers, source_repo=SOURCE_REPO, commit=commit, user=USER,
                                          workspace=folder / "work", parameters=parameters))
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1",
               "HF_HOME": str(folder / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
        os.environ.update(env)
        doctor = _doctor_disk(config)  # before the fetch: model.parameters, no layer count
        build = measure(MOEQ + ["build", "--config", str(config), "--all", "--push", "--json"], disk=folder,
                        cwd=folder)
        summary = _last_json(build.out)
        repo = f"{USER}/Phi-3.5-MoE-shaped-L{layers}-GGUF"
        completion = time.perf_counter()
        read_back = subprocess.run(
            [str(Toolchain().path("llama-completion")), "-hf", f"{repo}:Q4_K_M", "-p", "The", "-n", "4",
             "--temp", "0", "-no-cnv", "-c", "512"], capture_output=True, text=True, cwd=folder, timeout=1800,
            env={**os.environ, "MODEL_ENDPOINT": hub.url + "/", "LLAMA_CACHE": str(folder / "llama-cache")},
            stdin=subprocess.DEVNULL)
        completion_s = time.perf_counter() - completion
        fetched = _doctor_disk(config)  # the F16's header read: parameters and layers
    finally:
        hub.close()
    stages: dict[str, float] = {}
    for quant in summary["quants"]:
        for stage in quant["stages"]:
            key = stage["stage"] if stage["stage"] in ("fetch", "imatrix", "card", "push") else \
                f"{stage['stage']} {quant['quant']}"
            stages[key] = max(stages.get(key, 0.0), stage["seconds"])  # a shared stage: once, in the quant that ran it
    return {"layers": layers, "checkpoint_gb": round(checkpoint_gb, 2), "checkpoint_s": round(checkpoint_s, 1),
            "ok": summary["ok"], "stages": stages, "build_s": round(build.wall_s, 1),
            "moeq_rss_mb": round(build.moeq_rss_mb), "tools_rss_mb": round(build.tools_rss_mb),
            "peak_disk_gb": round(build.disk_used_gb, 2),
            "doctor_peak_gb": round(doctor["peak_bytes"] / 1e9, 2) if doctor.get("peak_bytes") else None,
            "doctor_fetched_peak_gb": round(fetched["peak_bytes"] / 1e9, 2) if fetched.get("peak_bytes") else None,
            "doctor_items": fetched.get("items"),
            "read_back_text": read_back.stdout.strip()[:80],
            "read_back_ok": read_back.returncode == 0, "read_back_s": round(completion_s, 1),
            "read_back_tail": (read_back.stdout + read_back.stderr)[-400:] if read_back.returncode else ""}


def report(results: list[dict]) -> None:
    names = list(dict.fromkeys(k for r in results for k in r["stages"]))
    head = "| | " + " | ".join(f"{r['layers']} layer{'s' if r['layers'] != 1 else ''}" for r in results) + " |"
    print(head + "\n|" + " --- |" * (len(results) + 1))
    rows = [("checkpoint (GB, bf16)", "checkpoint_gb"), ("writing it (s)", "checkpoint_s")]
    for label, key in rows:
        print(f"| {label} | " + " | ".join(str(r[key]) for r in results) + " |")
    for name in names:
        print(f"| {name} (s) | " + " | ".join(f"{r['stages'].get(name, 0):.1f}" for r in results) + " |")
    for label, key in (("build, all stages (s)", "build_s"), ("moeq peak RSS (MB)", "moeq_rss_mb"),
                       ("largest tool peak RSS (MB)", "tools_rss_mb"), ("peak disk (GB)", "peak_disk_gb"),
                       ("doctor's peak, before the fetch (GB)", "doctor_peak_gb"),
                       ("doctor's peak, source fetched (GB)", "doctor_fetched_peak_gb"),
                       ("llama-completion -hf (s)", "read_back_s"),
                       ("build ok / read back ok", None)):
        cells = [f"{r['ok']} / {r['read_back_ok']}" if key is None else str(r[key]) for r in results]
        print(f"| {label} | " + " | ".join(cells) + " |")
    for r in results:
        for when, key in (("before the fetch", "doctor_peak_gb"), ("source fetched", "doctor_fetched_peak_gb")):
            if r[key] and r["peak_disk_gb"]:
                print(f"{r['layers']} layer(s): doctor's peak ({when}) / measured peak = "
                      f"{r[key] / r['peak_disk_gb']:.3f}")
        if r["read_back_tail"]:
            print(f"{r['layers']} layer(s): llama-completion failed: {r['read_back_tail']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep each layer count's folder")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="moeq-rehearsal-"))
    results = []
    for layers in args.layers:
        results.append(rehearse(layers, root))
        print(json.dumps(results[-1]), flush=True)
        if not args.keep:
            shutil.rmtree(root / f"L{layers}", ignore_errors=True)
    report(results)


if __name__ == "__main__":
    main()
