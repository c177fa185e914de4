"""moeq quantize against bare llama-quantize on the same synthetic F16 model (>= 2 GB).

Interleaved runs, ratio of medians:
  first run, cold: `moeq quantize --force` with the sha256 cache emptied (source and output
             hashed in the run; the fetch stage hashes a `local` source before llama-quantize
             starts, as the quantize stage's key is the source's sha256) vs `llama-quantize SRC OUT TYPE`;
  first run, warm source: the same with the source's sha256 already cached (as after the
             fetch stage, which hashes what it fetches); the output is still hashed;
  skip path: a second `moeq quantize` with nothing changed (wall time of the whole command).

    .venv/bin/python benchmarks/quantize_overhead.py [--runs 3] [--type Q8_0] [--layers 5]
Targets: first-run ratio <= 1.05, skip < 1 s. moeq fsyncs its output before the rename and bare
llama-quantize does not; each timed command starts after an untimed sync.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moeq.config import SynthSpec
from moeq.synth import write_synth_model
from moeq.toolchain import Toolchain


def timed(command: list[str], **kwargs) -> float:
    # Flush every earlier run's dirty pages first (untimed), so no run pays for another's writeback.
    os.sync()
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--type", default="Q8_0")
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()

    root = Path(args.dir or tempfile.mkdtemp(prefix="moeq-bench-"))
    ws = root / "ws"
    spec = SynthSpec(layers=args.layers, experts=16, experts_used=2, embd=2048, ff=2048, heads=16, kv_heads=4,
                     vocab=32064)
    source = root / "big-F16.gguf"
    if not source.exists():
        write_synth_model(source, spec, name="bench-phimoe")
    size_gb = source.stat().st_size / 1e9
    cfg = root / "pipeline.yaml"
    cfg.write_text(f"""\
model: {{name: bench, base_model: microsoft/Phi-3.5-MoE-instruct, license: mit, quantized_by: moeq}}
source: {{kind: local, path: {source}}}
workspace: {ws}
quants: [{args.type}]
hub: {{namespace: bench}}
""")
    quantize_bin = str(Toolchain().path("llama-quantize"))
    moeq = [sys.executable, "-m", "moeq", "quantize", "--config", str(cfg), "--json"]
    bare_out = root / "bare.gguf"
    bare, ours, warm, skip = [], [], [], []
    subprocess.run([quantize_bin, str(source), str(bare_out), args.type], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # warm the page cache once
    for i in range(args.runs):
        bare.append(timed([quantize_bin, str(source), str(bare_out), args.type]))
        (ws / "sha256-cache.sqlite").unlink(missing_ok=True)  # the hash cache: hash everything again
        ours.append(timed(moeq + ["--force"]))
        warm.append(timed(moeq + ["--force"]))
        skip.append(timed(moeq))
        print(f"run {i + 1}: bare {bare[-1]:.2f} s, moeq cold {ours[-1]:.2f} s, moeq warm-source {warm[-1]:.2f} s, "
              f"moeq skip {skip[-1]:.3f} s", flush=True)
    ratio = statistics.median(ours) / statistics.median(bare)
    print(f"source {size_gb:.2f} GB F16 -> {args.type}, {os.cpu_count()} cores, {args.runs} interleaved runs")
    print(f"median bare llama-quantize: {statistics.median(bare):.2f} s")
    print(f"median moeq quantize, cold (all hashing in the run): {statistics.median(ours):.2f} s")
    print(f"ratio of medians, cold: {ratio:.3f}x (target <= 1.05)")
    print(f"median moeq quantize, warm source: {statistics.median(warm):.2f} s")
    print(f"ratio of medians, warm source: {statistics.median(warm) / statistics.median(bare):.3f}x")
    print(f"median skip path: {statistics.median(skip):.3f} s (target < 1 s)")


if __name__ == "__main__":
    main()
