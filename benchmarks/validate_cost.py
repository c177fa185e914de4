"""Cost of `moeq validate` on a synthetic phimoe of at least 4 GB.

    .venv/bin/python benchmarks/validate_cost.py [--dir DIR] [--layers 9]

Reports: header-only checks (container/model/tensors/type mix, numerics off, no source) against
gguf-py's own `gguf-dump` on the same file; peak RSS of `moeq validate` in each numerics mode
(/usr/bin/time -v, target < 300 MB); `full` numerics throughput in MB/s of quantized data.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

from moeq.config import SynthSpec
from moeq.synth import write_synth_model
from moeq.toolchain import Toolchain


def run(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of a command, via GNU time."""
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    wall = time.perf_counter() - started
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return wall, rss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path("/tmp/moeq-validate-bench"))
    ap.add_argument("--layers", type=int, default=9)
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    f16 = args.dir / "big-F16.gguf"
    q8 = args.dir / "big-Q8_0.gguf"
    if not f16.exists():
        write_synth_model(f16, SynthSpec(layers=args.layers, experts=16, experts_used=2, embd=2048, ff=2048,
                                         heads=16, kv_heads=4, vocab=32064), name="bench-phimoe")
    if not q8.exists():
        subprocess.run([str(Toolchain().path("llama-quantize")), str(f16), str(q8), "Q8_0"], check=True,
                       capture_output=True)
    moeq = [sys.executable, "-m", "moeq", "validate", "--json"]
    gguf_dump = [sys.executable, "-m", "gguf.scripts.gguf_dump", "--no-tensors", str(f16)]
    print(f"F16 {f16.stat().st_size / 1e9:.2f} GB, Q8_0 {q8.stat().st_size / 1e9:.2f} GB")
    wall, rss = run(moeq + [str(f16), "--numerics", "off", "--quant", "F16"])
    print(f"header checks on the {f16.stat().st_size / 1e9:.1f} GB F16 (numerics off): {wall:.2f} s, peak RSS {rss / 1024:.0f} MB")
    wall, rss = run(gguf_dump)
    print(f"gguf-dump --no-tensors on the same file: {wall:.2f} s, peak RSS {rss / 1024:.0f} MB")
    for mode in ("off", "sample", "full"):
        wall, rss = run(moeq + [str(q8), "--against", str(f16), "--quant", "Q8_0", "--numerics", mode])
        extra = f", {q8.stat().st_size / 1e6 / wall:.0f} MB/s of quantized data" if mode == "full" else ""
        print(f"validate Q8_0 against F16, numerics {mode}: {wall:.2f} s, peak RSS {rss / 1024:.0f} MB{extra}")


if __name__ == "__main__":
    main()
