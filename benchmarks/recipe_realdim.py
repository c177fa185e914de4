"""A whole recipe search at Phi-3.5-MoE's real dimensions: what it costs, measured, and the release's figures
scaled from it.

    .venv/bin/python benchmarks/recipe_realdim.py [--layers 2] [--quant Q2_K] [--imatrix] [--dir DIR]

Makes `moeq synth tiny-phimoe --preset phi-3.5-moe --layers N` (every tensor and the vocabulary at their real
sizes; random weights, so only the cost means anything), then runs `moeq recipe` on it as a user would, with
the default search settings (runs of 512 x 16 = 8,192 tokens, up to 100 of them): the stock file, the per-type
files, the F16's logits on the selection text, every llama-perplexity run, the recipe chosen. Printed, as a
Markdown table for README "Recipes": the per-type files' time and disk (and what whole files of their types weigh),
the time to assemble one candidate, the seconds per run, the number of runs, the whole search's wall time, its
peak disk (the workspace, sampled every second) and peak memory (the largest process's RSS); then the same
per layer and scaled to the real model's 32 layers. Without `--imatrix` no importance matrix; with it, as the
release's rungs are, `imatrix: auto` on 16 chunks of the calibration text (made before the search, not counted in
it: the imatrix job's cost, measured apart), and the ladder's types that need one (IQ2_S, IQ3_XXS, ...) in the
per-type files.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moeq.gguf_header import read_header  # noqa: E402
from moeq.quant_types import tensor_bytes  # noqa: E402
from moeq.recipe.pure import Part, TypeFiles  # noqa: E402

REAL_LAYERS = 32
PIPELINE = """model: {{name: phi-realdim, base_model: microsoft/Phi-3.5-MoE-instruct, file_stem: phi-realdim,
        license: mit, quantized_by: moeq, languages: [en]}}
source: {{kind: local, path: {source}}}
workspace: {work}
quants:
  - {{type: {quant}, imatrix: {imatrix}, recipe: search, budget: stock}}
imatrix: {{chunks: 16}}
hub: {{namespace: bench}}
"""


def disk_used(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass  # a partial file renamed between the listing and the stat
    return total


def run_search(config: Path, work: Path) -> tuple[list[tuple[float, str]], dict, float, int]:
    """`moeq recipe --json` on `config`: its stderr lines with the second each came, the record, the wall time and
    the workspace's peak disk."""
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], disk_used(work))
            done.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "moeq", "recipe", "--config", str(config), "--json"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[tuple[float, str]] = []
    for line in proc.stderr:
        lines.append((time.monotonic() - started, line.rstrip()))
        print(f"  [{lines[-1][0]:7.1f} s] {line.rstrip()}", flush=True)
    out = proc.stdout.read()
    proc.wait()
    wall = time.monotonic() - started
    done.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"moeq recipe failed ({proc.returncode})")
    return lines, json.loads(out)[0]["record"], wall, peak[0]


def when(lines: list[tuple[float, str]], starts: str) -> float:
    return next(t for t, line in lines if line.startswith(starts) or f" {starts}" in line)


def sparse_model(out: Path, layers: int) -> Path:
    """Phi-3.5-MoE's header at `layers` layers over a sparse file of its size: what a plan reads (the header, and
    llama-quantize --dry-run, which maps the file but reads no weight), with no disk spent on weights."""
    import moeq.synth as synth

    def skip_data(writer, layout, _rng) -> None:
        fout = writer.fout[0]
        for name, _shape, _dtype in layout:
            info = writer.tensors[0].pop(name)
            writer.write_padding(fout, fout.tell())
            fout.seek(info.nbytes, os.SEEK_CUR)
            writer.write_padding(fout, info.nbytes)
        fout.truncate()
        writer.state = synth.gguf.gguf_writer.WriterState.WEIGHTS

    if not out.exists():
        arch, spec = synth.PRESETS["phi-3.5-moe"]
        real, free = synth._write_tensors, synth.require_free
        synth._write_tensors, synth.require_free = skip_data, lambda *_args: None
        try:
            synth.write_synth_model(out, replace(spec, layers=layers), arch)
        finally:
            synth._write_tensors, synth.require_free = real, free
    return out


def release_plan(folder: Path, layers: int) -> dict[str, object]:
    """`moeq recipe --plan`'s figures for pipeline.yaml's searched rungs at the real model's `layers`."""
    from moeq.config import load_pipeline
    from moeq.recipe.cost import plan_search
    from moeq.toolchain import Toolchain

    source = sparse_model(folder / f"phi-header-{layers}-F16.gguf", layers)
    pipeline = load_pipeline(REPO / "pipeline.yaml")
    tool = Toolchain().tool("llama-quantize")
    return {q.type: plan_search(pipeline, q, source, tool) for q in pipeline.quants if q.recipe == "search"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--quant", default="Q2_K")
    parser.add_argument("--imatrix", action="store_true")
    parser.add_argument("--dir", type=Path)
    args = parser.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="moeq-recipe-realdim-"))
    folder.mkdir(parents=True, exist_ok=True)
    source, work = folder / f"phi-real-{args.layers}-F16.gguf", folder / "work"
    if not source.exists():
        subprocess.run([sys.executable, "-m", "moeq", "synth", "tiny-phimoe", str(source), "--preset", "phi-3.5-moe",
                        "--layers", str(args.layers)], check=True, cwd=REPO, capture_output=True)
    config = folder / "pipeline.yaml"
    config.write_text(PIPELINE.format(source=source, work=work, quant=args.quant,
                                      imatrix="auto" if args.imatrix else "none"))
    if args.imatrix:
        subprocess.run([sys.executable, "-m", "moeq", "imatrix", "--config", str(config)], check=True, cwd=REPO)
    print(f"source: {source.stat().st_size / 1e9:.2f} GB, {args.layers} layer(s) at Phi-3.5-MoE's dimensions; "
          f"{os.cpu_count()} CPUs")
    lines, record, wall, peak_disk = run_search(config, work)
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024

    pure_s = when(lines, "llama-perplexity on the F16") - when(lines, "llama-quantize --pure")
    logits_s = when(lines, f"{args.quant}: recipe search") - when(lines, "llama-perplexity on the F16")
    runs_s = wall - when(lines, "recipe 1 of")
    runs = record["runs"]
    made = json.loads(next((work / "recipe" / "pure").glob("*/made.json")).read_text())["parts"]
    pure_folder = next((work / "recipe" / "pure").glob("*/made.json")).parent
    files = TypeFiles("bench", tuple(Part(p["type"], pure_folder / p["file"], frozenset(p["tensors"])) for p in made))
    pure_bytes = files.disk_bytes()
    header = read_header(source)
    quantized = [t for t in header.tensors if t.name in record["stock_types"]]
    whole_bytes = sum(tensor_bytes(t.shape, ggml_type) for t in quantized for ggml_type in record["types"])
    order = [t.name for t in read_header(Path(record["output"]["path"]) if Path(record["output"]["path"]).is_absolute()
                                         else work / record["output"]["path"]).tensors]
    started = time.perf_counter()
    files.assemble(order, record["base_type"], record["tensor_types"], folder / "assembled.gguf")
    assemble_s = time.perf_counter() - started
    candidate_bytes = (folder / "assembled.gguf").stat().st_size
    (folder / "assembled.gguf").unlink()
    per_run = runs_s / max(runs, 1)
    tokens = record["selection"]["ctx"] * record["selection"]["chunks"]
    scale = REAL_LAYERS / args.layers

    rows = [
        ("per-type files: time", f"{pure_s:.0f} s", f"{pure_s * scale / 3600:.1f} h"),
        ("per-type files: disk", f"{pure_bytes / 1e9:.2f} GB ({pure_bytes / whole_bytes:.0%} of whole files of "
                                 f"{', '.join(record['types'])}, {whole_bytes / 1e9:.2f} GB)",
         f"{pure_bytes * scale / 1e9:.0f} GB"),
        ("F16 logits on the selection text", f"{logits_s:.0f} s", f"{logits_s * scale / 60:.0f} min"),
        ("one candidate assembled", f"{assemble_s:.1f} s ({candidate_bytes / 1e9:.2f} GB)",
         f"{assemble_s * scale:.0f} s"),
        (f"one llama-perplexity run of {tokens:,} tokens (with its assembly)", f"{per_run:.1f} s",
         f"{per_run * scale:.0f} s"),
        ("runs", f"{runs}", "up to 100 (recipe.max_evals)"),
        ("the whole search: wall time", f"{wall / 60:.1f} min",
         f"{(pure_s + logits_s) * scale / 3600 + 100 * per_run * scale / 3600:.0f} h (at 100 runs)"),
        ("peak disk (the workspace: F16, stock file, per-type files, candidate)", f"{peak_disk / 1e9:.2f} GB",
         f"{peak_disk * scale / 1e9:.0f} GB"),
        ("peak memory (largest process)", f"{peak_rss / 2**30:.1f} GiB", "-"),
    ]
    print(f"\n{args.quant}, {args.layers} layers of Phi-3.5-MoE, {os.cpu_count()} CPUs; search settings: default "
          f"(ctx {record['selection']['ctx']}, {record['selection']['chunks']} chunks, max_evals 100); chosen: "
          f"{record['evals'][record['chosen']]['label']}\n")
    print(f"| measured | {args.layers} layers | 32 layers, scaled |")
    print("| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
