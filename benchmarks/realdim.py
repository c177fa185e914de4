"""Every stage at Phi-3.5-MoE's real dimensions, with 1, 2 and 4 layers, and how each stage's cost grows.

    .venv/bin/python benchmarks/realdim.py [--layers 1 2 4] [--quants Q8_0 Q4_K_M Q2_K] [--runs 2] [--quality]
                                           [--dir DIR]

Each model is `moeq synth tiny-phimoe --preset phi-3.5-moe --layers N`: every tensor at its real size
(hidden 4096, 16 experts of width 6400, 32/8 heads, 32064-token vocabulary), so hashing, header reads,
dequantizing, llama-quantize and the RPC device work at the real scale of each tensor. Every stage runs
as `python -m moeq ...`, as a user runs it; a sampler reads /proc while it runs: moeq's own peak RSS
(VmHWM), the llama.cpp tools' peak RSS (reported apart), the bytes moeq read (rchar) and the least free
disk. The quality run (llama-perplexity) is left out unless --quality: on random weights it means nothing.

Printed: one table (stage x layers), the side-by-side ratios of the targets, a least-squares line per
stage (seconds = a + b x layers) and its value at 32 layers, the real model, with what that assumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from moeq.toolchain import Toolchain

REPO = Path(__file__).resolve().parent.parent
MOEQ = [sys.executable, "-m", "moeq"]
REAL_LAYERS = 32


@dataclass
class Run:
    wall_s: float
    moeq_rss_mb: float = 0.0  # the moeq process's own peak
    tools_rss_mb: float = 0.0  # the largest peak among its child processes (llama.cpp tools)
    read_gb: float = 0.0  # bytes moeq read through read(2)/pread(2)
    disk_used_gb: float = 0.0  # the most the free space on the workspace's disk went down
    out: str = ""


def _status(pid: int, key: str) -> float:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(key + ":"):
                return float(line.split()[1]) / 1024  # kB -> MB
    except OSError:
        pass
    return 0.0


def _rchar(pid: int) -> float:
    try:
        for line in open(f"/proc/{pid}/io"):
            if line.startswith("rchar:"):
                return int(line.split()[1]) / 1e9
    except OSError:
        pass
    return 0.0


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                children = open(f"/proc/{parent}/task/{task}/children").read().split()
            except OSError:
                continue
            for child in map(int, children):
                found.append(child)
                todo.append(child)
    return found


def measure(command: list[str], disk: Path | None = None, cwd: Path = REPO) -> Run:
    """Run `command`, sampling its peak memory, its children's, its reads and the disk every 50 ms."""
    os.sync()  # earlier runs' dirty pages are written before the clock starts
    free_before = shutil.disk_usage(disk).free if disk else 0
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
    run = Run(0.0)
    least_free = [free_before]

    def sample() -> None:
        while proc.poll() is None:
            run.moeq_rss_mb = max(run.moeq_rss_mb, _status(proc.pid, "VmHWM"))
            run.read_gb = max(run.read_gb, _rchar(proc.pid))
            for child in _descendants(proc.pid):
                run.tools_rss_mb = max(run.tools_rss_mb, _status(child, "VmHWM"))
            if disk:
                least_free[0] = min(least_free[0], shutil.disk_usage(disk).free)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    run.out = proc.communicate()[0]
    run.wall_s = time.perf_counter() - started
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(command)}\n{run.out[-2000:]}")
    run.disk_used_gb = (free_before - least_free[0]) / 1e9
    return run


def sha256_of(path: Path) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            digest.update(chunk)


PIPELINE = """\
model: {{name: phi-real-L{layers}, base_model: microsoft/Phi-3.5-MoE-instruct, license: mit, languages: [en],
        quantized_by: moeq, file_stem: phi-real-L{layers}}}
source: {{kind: local, path: {source}}}
workspace: {workspace}
quants: [{quants}]
hub: {{namespace: bench}}
bench:
  modes: [cpu, gpu, cpu-moe, 1]
  n_prompt: 64
  n_gen: 16
  repetitions: 1
  ctx: [4096]
  rpc: local
  quality: {quality}
"""


@dataclass
class Size:
    layers: int
    source_gb: float = 0.0
    stages: dict[str, Run] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def bench_size(layers: int, quants: list[str], runs: int, quality: bool, root: Path) -> Size:
    size = Size(layers)
    source = root / f"phi-real-L{layers}-F16.gguf"
    if not source.exists():
        size.stages["synth (F16)"] = measure(MOEQ + ["synth", "tiny-phimoe", str(source), "--preset", "phi-3.5-moe",
                                                     "--layers", str(layers)], disk=root)
    size.source_gb = source.stat().st_size / 1e9
    folder = root / f"L{layers}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    ws = folder / "work"
    config = folder / "pipeline.yaml"
    config.write_text(PIPELINE.format(layers=layers, source=source, workspace=ws, quants=", ".join(quants),
                                      quality="true" if quality else "false"))
    cfg = ["--config", str(config)]
    hashes = ws / "sha256-cache.sqlite"

    size.stages["fetch (hash the source)"] = measure(MOEQ + ["fetch", *cfg], disk=ws.parent)

    # quantize: the first quant side by side with bare llama-quantize + one sha256 of its output
    first = quants[0]
    quantize_bin = str(Toolchain().path("llama-quantize"))
    bare_out = folder / "bare.gguf"
    bare, warm, cold = [], [], []
    for _ in range(runs):
        bare_run = measure([quantize_bin, str(source), str(bare_out), first], disk=ws.parent)
        started = time.perf_counter()
        sha256_of(bare_out)  # the hash any upload of the output needs anyway
        bare.append(bare_run.wall_s + time.perf_counter() - started)
        bare_out.unlink()
        warm_run = measure(MOEQ + ["quantize", *cfg, "--quant", first, "--force"], disk=ws.parent)
        warm.append(warm_run.wall_s)
        hashes.unlink(missing_ok=True)  # cold: the source hashed again, as on a first run
        cold.append(measure(MOEQ + ["quantize", *cfg, "--quant", first, "--force"], disk=ws.parent).wall_s)
    size.stages[f"quantize {first}"] = warm_run
    size.ratios[f"quantize {first}: moeq / (bare + sha256), source hash known"] = \
        statistics.median(warm) / statistics.median(bare)
    size.ratios[f"quantize {first}: moeq / (bare + sha256), cold"] = statistics.median(cold) / statistics.median(bare)
    out_gb = Path(ws / "quants" / f"phi-real-L{layers}-{first}.gguf").stat().st_size / 1e9
    size.notes[f"quantize {first}: peak extra disk / output size"] = f"{warm_run.disk_used_gb / out_gb:.2f}"
    for quant in quants[1:]:
        size.stages[f"quantize {quant}"] = measure(MOEQ + ["quantize", *cfg, "--quant", quant], disk=ws.parent)

    for quant in quants:
        size.stages[f"validate {quant} (sample)"] = measure(MOEQ + ["validate", *cfg, "--quant", quant])
    quant_file = ws / "quants" / f"phi-real-L{layers}-{first}.gguf"
    against = ["--against", str(source)]
    off = measure(MOEQ + ["validate", str(quant_file), *against, "--numerics", "off"])
    full = measure(MOEQ + ["validate", str(quant_file), *against, "--numerics", "full"])
    dump = measure([str(Path(sys.executable).with_name("gguf-dump")), "--no-tensors", str(quant_file)])
    header = measure(MOEQ + ["validate", str(quant_file)])  # no source: header checks and the metadata keys
    size.stages[f"validate {first} (header only)"] = header
    size.stages[f"validate {first} (off, with source)"] = off
    size.stages[f"validate {first} (full)"] = full
    size.stages["gguf-dump --no-tensors"] = dump
    size.ratios["validate header / gguf-dump --no-tensors"] = header.wall_s / dump.wall_s
    size.notes[f"validate {first} full numerics MB/s"] = f"{quant_file.stat().st_size / 1e6 / (full.wall_s - off.wall_s):.0f}"

    differences = []
    for quant in quants:
        size.stages[f"bench {quant}"] = measure(MOEQ + ["bench", *cfg, "--quant", quant])
        record = json.loads((ws / "records" / f"bench-{quant}.json").read_text())["record"]
        differences += [abs(v) for m in record["memory"] for v in m["difference_mib"].values()]
    size.notes["plan - RPC device buffers, largest |difference| MiB"] = f"{max(differences):.2f}"

    size.stages["card (all)"] = measure(MOEQ + ["card", *cfg])
    size.stages["build --all, nothing to do"] = measure(MOEQ + ["build", *cfg, "--all"])
    return size


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x."""
    n, mx, my = len(xs), statistics.mean(xs), statistics.mean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if n > 1 and sxx else 0.0
    return my - b * mx, b


def report(sizes: list[Size]) -> None:
    layers = [s.layers for s in sizes]
    print(f"\nPhi-3.5-MoE dimensions, {os.cpu_count()} cores; F16 source: "
          + ", ".join(f"{s.layers} layer(s) {s.source_gb:.2f} GB" for s in sizes))
    print("cells: wall s / moeq peak RSS MB / tools peak RSS MB / GB read by moeq\n")
    stages = list(dict.fromkeys(name for s in sizes for name in s.stages))
    header = "| stage | " + " | ".join(f"{n} layer{'s' if n > 1 else ''}" for n in layers) + \
             f" | s per layer | at {REAL_LAYERS} layers |"
    print(header)
    print("|" + " --- |" * (len(layers) + 3))
    for name in stages:
        cells, xs, ys = [], [], []
        for s in sizes:
            run = s.stages.get(name)
            if run is None:
                cells.append("")
                continue
            cells.append(f"{run.wall_s:.1f} / {run.moeq_rss_mb:.0f} / {run.tools_rss_mb:.0f} / {run.read_gb:.2f}")
            xs.append(s.layers)
            ys.append(run.wall_s)
        a, b = fit(xs, ys) if len(xs) > 1 else (ys[0] if ys else 0.0, 0.0)
        print(f"| {name} | " + " | ".join(cells) + f" | {b:.2f} | {a + b * REAL_LAYERS:.0f} s |")
    print("\nratios (side by side, medians):")
    for s in sizes:
        for name, value in s.ratios.items():
            print(f"  {s.layers} layer(s): {name}: {value:.3f}")
        for name, value in s.notes.items():
            print(f"  {s.layers} layer(s): {name}: {value}")
    print(f"\nAt {REAL_LAYERS} layers: the line through the measured sizes, assuming each stage's cost is a fixed part "
          "plus a part per layer (every layer has the same tensors; the vocabulary and output layers are the fixed "
          "part), on this machine's disk and page cache; the real F16 (84 GB) does not fit in this machine's RAM, "
          "so reads there come from disk, not from the page cache as here.")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--quants", nargs="+", default=["Q8_0", "Q4_K_M", "Q2_K"])
    ap.add_argument("--runs", type=int, default=2, help="side-by-side quantize runs per size")
    ap.add_argument("--quality", action="store_true", help="also run llama-perplexity (meaningless on random weights)")
    ap.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "moeq" / "realdim")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    sizes = []
    for layers in args.layers:
        print(f"{layers} layer(s)...", flush=True)
        sizes.append(bench_size(layers, args.quants, args.runs, args.quality, args.dir))
        report(sizes)  # what is measured so far, in case a larger size is stopped
    print("\n=== final ===")
    report(sizes)


if __name__ == "__main__":
    main()
