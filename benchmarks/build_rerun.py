"""How long `moeq build --all` takes when nothing changed, against starting moeq at all.

    .venv/bin/python benchmarks/build_rerun.py [--runs 5]

Builds the tiny example ladder once in a temporary folder (offline, RPC device), then times each
rerun beside `moeq --version` (the cost of Python and moeq's imports) and prints medians and their ratio.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def timed(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "moeq", *args], check=True, capture_output=True, cwd=REPO)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "tiny-phimoe.yaml"
        shutil.copy(REPO / "examples" / "tiny-phimoe.yaml", config)
        first = timed(["build", "--config", str(config), "--all"])
        print(f"first build (3 quants, every stage): {first:.2f} s")
        reruns, starts = [], []
        for i in range(runs):
            reruns.append(timed(["build", "--config", str(config), "--all"]))
            starts.append(timed(["--version"]))
            print(f"run {i + 1}: rerun {reruns[-1]:.2f} s, moeq --version {starts[-1]:.2f} s")
    rerun, start = statistics.median(reruns), statistics.median(starts)
    print(f"median rerun {rerun:.2f} s (target < 2 s), moeq --version {start:.2f} s, ratio {rerun / start:.2f}")


if __name__ == "__main__":
    main()
