"""llama-bench's tokens/s of a GGUF: for the bench stage (every offload mode), the choice stage (a searched
recipe's file against the stock one, on the CPU) and the compare stage (another publisher's file); and the GPUs
llama.cpp finds.

llama-bench -o json gives tokens/s per test (prompt processing, generation) with the backend it ran on; the
command is logged, and a failure is a ToolError quoting the tool.

    run_speed(tool, Path("q.gguf"), OffloadMode.from_name("cpu", 32), log, n_prompt=512, n_gen=128,
              repetitions=3, threads=None, rpc=None, timeout_s=600)["tests"][1]["avg_ts"]
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from moeq.errors import ToolError
from moeq.offload import OffloadMode
from moeq.runner import run_tool


def run_speed(tool: Path, model: Path, mode: OffloadMode, log: Path, *, n_prompt: int, n_gen: int, repetitions: int,
              threads: int | None, rpc: str | None, timeout_s: float) -> dict:
    command = [str(tool), "-m", str(model), *mode.bench_flags, "-p", str(n_prompt), "-n", str(n_gen),
               "-r", str(repetitions), "-o", "json", *(["-t", str(threads)] if threads else []), *(["-rpc", rpc] if rpc else [])]
    lines: list[str] = []
    run_tool(command, log, on_line=lines.append, timeout_s=timeout_s)
    text = "\n".join(lines)
    start, end = text.find("["), text.rfind("]")
    try:
        tests = json.loads(text[start:end + 1])
    except ValueError:
        raise ToolError("llama-bench", f"printed no JSON results for mode {mode.name}", f"see {log}") from None
    results = []
    for t in tests:
        if not all(math.isfinite(v) for v in [t["avg_ts"], t["stddev_ts"], *t["samples_ts"]]):
            raise ToolError("llama-bench", f"reported a figure that is not a number (NaN or infinity) for mode {mode.name}",
                            f"see {log}")
        kind = "pp" if t["n_prompt"] and not t["n_gen"] else "tg"
        results.append({
            "test": f"{kind}{t['n_prompt'] or t['n_gen']}", "n_prompt": t["n_prompt"], "n_gen": t["n_gen"],
            "avg_ts": t["avg_ts"], "stddev_ts": t["stddev_ts"], "samples_ts": t["samples_ts"],
            "n_threads": t["n_threads"], "n_cpu_moe": t["n_cpu_moe"], "n_gpu_layers": t["n_gpu_layers"],
        })
    first = tests[0] if tests else {}
    return {"mode": mode.name, "command": command, "backends": first.get("backends"), "gpu_info": first.get("gpu_info"),
            "cpu_info": first.get("cpu_info"), "model_size": first.get("model_size"),
            "model_n_params": first.get("model_n_params"), "build_commit": first.get("build_commit"),
            "tests": results}


def offload_devices(tool: Path, log: Path, timeout_s: float) -> list[str]:
    """The GPUs llama.cpp finds (`--list-devices`), without loading a model; RPC devices are not listed."""
    lines: list[str] = []
    run_tool([str(tool), "--list-devices"], log, on_line=lines.append, timeout_s=timeout_s)
    start = next((i for i, line in enumerate(lines) if line.startswith("Available devices")), len(lines))
    return [line.strip().split(":")[0] for line in lines[start + 1:] if line.startswith("  ") and ":" in line]
