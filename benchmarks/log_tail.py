"""Does a llama.cpp tool lose the end of its log? Each tool moeq reads figures from, run as moeq runs it.

The tools: llama-perplexity saving the F16 logits and with --kl-divergence (moeq/kld.py), llama-completion's
buffer sizes and memory breakdown (moeq/bench/runs.py), llama-imatrix (the command of moeq/imatrix/stage.py,
its "Final estimate" line and its file) and llama-bench's JSON (moeq/speed.py); on the example's trained tiny
model, two runs at a time so that the machine is loaded. A run is lost when it exits 0 without the figures moeq
reads. The pinned tools run with moeq's log flush at exit, as moeq runs them; `--unchanged` runs the same
binaries without it too (a folder of links to them, without the library beside them), interleaved.

    .venv/bin/python benchmarks/log_tail.py --runs 200 --unchanged

The last line is `lost L of M runs` for the tools as moeq runs them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from moeq.bench.runs import run_memory
from moeq.errors import ToolError
from moeq.imatrix_file import read_imatrix
from moeq.kld import run_perplexity
from moeq.texts import shipped_evaluation
from moeq.offload import OffloadMode
from moeq.runner import LOG_FLUSH_LIBRARY, run_tool
from moeq.speed import run_speed
from moeq.toolchain import TOOLS, Toolchain, pinned_bin_dir

CPU = OffloadMode.from_name("cpu")
REPO = Path(__file__).resolve().parents[1]
CALIBRATION = REPO / "moeq" / "data" / "calibration.txt"
KINDS = ("perplexity-base", "perplexity-kld", "completion", "imatrix", "bench")


class Lost(Exception):
    pass


def example_f16() -> Path:
    """The example's trained tiny F16, as `moeq fetch` makes it (cached per machine)."""
    proc = subprocess.run([sys.executable, "-m", "moeq", "fetch", "--config", "examples/tiny-phimoe.yaml", "--json"],
                          cwd=REPO, capture_output=True, text=True, check=True)
    return Path(json.loads(proc.stdout)["record"]["output"]["path"])


def unchanged_tools(folder: Path) -> Path:
    """The same binaries, linked from a folder without the log flush library beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOOLS:
        (folder / name).symlink_to(pinned_bin_dir() / name)
    assert not (folder / LOG_FLUSH_LIBRARY).exists()
    return folder


def run_once(kind: str, chain: Toolchain, model: Path, base_kld: Path, work: Path, i: int) -> None:
    log = work / f"{kind}-{i}.log"
    text = shipped_evaluation()
    try:
        if kind == "perplexity-base":
            run_perplexity(chain.path("llama-perplexity"), model, text, log, ctx=256, chunks=4,
                           kld_base=work / f"base-{i}.kld", save_base=True, threads=1, timeout_s=300)
            (work / f"base-{i}.kld").unlink()
        elif kind == "perplexity-kld":
            run_perplexity(chain.path("llama-perplexity"), model, text, log, ctx=256, chunks=4, kld_base=base_kld,
                           save_base=False, threads=1, timeout_s=300)
        elif kind == "completion":
            run_memory(chain.path("llama-completion"), model, CPU, 512, log, threads=1, rpc=None, timeout_s=300)
        elif kind == "imatrix":
            out = work / f"imatrix-{i}.gguf"
            lines: list[str] = []
            run_tool([str(chain.path("llama-imatrix")), "-m", str(model), "-f", CALIBRATION.name, "-o", str(out),
                      "-c", "128", "--chunks", "4", "--output-frequency", "1000000", "-t", "1"], log,
                     on_line=lines.append, timeout_s=300, cwd=CALIBRATION.parent)
            read_imatrix(out)
            out.unlink()
            if not any(line.startswith("Final estimate: PPL") for line in lines):
                raise Lost("no 'Final estimate' line")
        else:
            run_speed(chain.path("llama-bench"), model, CPU, log, n_prompt=32, n_gen=8, repetitions=1, threads=1,
                      rpc=None, timeout_s=300)
    except ToolError as exc:
        if "exited 0 without" in exc.message or "printed no JSON" in exc.message:
            raise Lost(exc.message) from None
        raise
    log.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="runs of each tool (default 200)")
    parser.add_argument("--unchanged", action="store_true",
                        help="also run the same binaries without moeq's log flush, interleaved")
    args = parser.parse_args()
    model = example_f16()
    with tempfile.TemporaryDirectory(prefix="moeq-log-tail-") as tmp:
        work = Path(tmp)
        chains = {"with moeq's log flush": Toolchain(pinned_bin_dir())}
        if args.unchanged:
            chains["unchanged tools"] = Toolchain(unchanged_tools(work / "unchanged"))
        for label, chain in chains.items():
            flush = chain.tool("llama-perplexity").build.log_flush
            print(f"{label}: {chain.path('llama-perplexity').parent} (log flush {flush[:12] if flush else 'none'})")
        base_kld = work / "f16.kld"
        run_perplexity(pinned_bin_dir() / "llama-perplexity", model, shipped_evaluation(), work / "f16.log", ctx=256,
                       chunks=4, kld_base=base_kld, save_base=True, threads=1, timeout_s=300)
        jobs = [(label, kind, i) for i in range(args.runs) for kind in KINDS for label in chains]
        lost: Counter = Counter()
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            futures = {pool.submit(run_once, kind, chains[label], model, base_kld, work / label.replace(" ", "-"), i):
                       (label, kind) for label, kind, i in jobs}
            for future in concurrent.futures.as_completed(futures):
                label, kind = futures[future]
                try:
                    future.result()
                except Lost:
                    lost[label, kind] += 1
        print(f"{len(jobs)} runs in {time.monotonic() - started:.0f} s, two at a time, on {model.name}")
        for label in chains:
            for kind in KINDS:
                print(f"  {label:24} {kind:16} lost {lost[label, kind]} of {args.runs}")
        if args.unchanged:
            gone = sum(lost["unchanged tools", kind] for kind in KINDS)
            print(f"unchanged tools: lost {gone} of {args.runs * len(KINDS)} runs")
        gone = sum(lost["with moeq's log flush", kind] for kind in KINDS)
        print(f"lost {gone} of {args.runs * len(KINDS)} runs")


if __name__ == "__main__":
    main()
