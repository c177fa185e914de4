"""One function per llama.cpp tool the bench stage runs, each returning what it parsed from the tool's output.

- llama-bench -o json: tokens/s per test (prompt processing, generation) with the backend it ran on;
- llama-completion -v (one token): model, KV and compute buffer sizes per device;
- llama-perplexity: PPL of the F16 source (saving its logits), then PPL ratio, KL divergence and
  top-token agreement of a quant against those logits.
Every command is logged beside the bench record; a failure is a ToolError quoting the tool.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from moeq.errors import InputError, ToolError
from moeq.llama_logs import parse_buffer_sizes, parse_memory_breakdown
from moeq.offload import OffloadMode
from moeq.runner import run_tool

# The pinned tools now and then exit 0 with the end of their log missing (llama-completion before
# loading anything, llama-perplexity before its final figures): such a run is made again. On a 2-core
# machine llama-perplexity's last lines, and llama-completion's memory breakdown at exit, each went missing
# three times in a row.
PERPLEXITY_TRIES = 6
MEMORY_TRIES = 6


def offload_devices(tool: Path, log: Path, timeout_s: float) -> list[str]:
    """The GPUs llama.cpp finds (`--list-devices`), without loading a model; RPC devices are not listed."""
    lines: list[str] = []
    run_tool([str(tool), "--list-devices"], log, on_line=lines.append, timeout_s=timeout_s)
    start = next((i for i, line in enumerate(lines) if line.startswith("Available devices")), len(lines))
    return [line.strip().split(":")[0] for line in lines[start + 1:] if line.startswith("  ") and ":" in line]


def _rpc(rpc: str | None, flag: str) -> list[str]:
    return [flag, rpc] if rpc else []


def run_speed(tool: Path, model: Path, mode: OffloadMode, log: Path, *, n_prompt: int, n_gen: int, repetitions: int,
              threads: int | None, rpc: str | None, timeout_s: float) -> dict:
    command = [str(tool), "-m", str(model), *mode.bench_flags, "-p", str(n_prompt), "-n", str(n_gen),
               "-r", str(repetitions), "-o", "json", *(["-t", str(threads)] if threads else []), *_rpc(rpc, "-rpc")]
    lines: list[str] = []
    run_tool(command, log, on_line=lines.append, timeout_s=timeout_s)
    text = "\n".join(lines)
    start, end = text.find("["), text.rfind("]")
    try:
        tests = json.loads(text[start:end + 1])
    except ValueError:
        raise ToolError(f"llama-bench printed no JSON results for mode {mode.name}; see {log}") from None
    results = []
    for t in tests:
        if not all(math.isfinite(v) for v in [t["avg_ts"], t["stddev_ts"], *t["samples_ts"]]):
            raise ToolError(f"llama-bench reported a figure that is not a number (NaN or infinity) for mode "
                            f"{mode.name}; see {log}")
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


def run_memory(tool: Path, model: Path, mode: OffloadMode, ctx: int, log: Path, *, threads: int | None, rpc: str | None,
               timeout_s: float) -> dict:
    """Load the model once in `mode` and read llama.cpp's buffer sizes, per device, in MiB."""
    command = [str(tool), "-m", str(model), *mode.completion_flags, "-c", str(ctx), "-n", "1", "-p", "hi",
               "-no-cnv", "-v", *(["-t", str(threads)] if threads else []), *_rpc(rpc, "--rpc")]
    buffers, breakdown = [], []
    for _ in range(MEMORY_TRIES):  # again when the log ends early: without the buffers, or the breakdown at exit
        lines: list[str] = []
        run_tool(command, log, on_line=lines.append, timeout_s=timeout_s)
        text = "\n".join(lines)
        loaded = parse_buffer_sizes(text)
        if any(b.kind == "model" for b in loaded):
            buffers, breakdown = loaded, parse_memory_breakdown(text)
            if breakdown:
                break
    if not buffers:
        raise ToolError(f"llama-completion loaded nothing in mode {mode.name} ({MEMORY_TRIES} tries); see {log}")
    devices: dict[str, dict[str, float]] = {}
    for b in buffers:
        kinds = devices.setdefault(b.device, {})
        kinds[b.kind] = round(kinds.get(b.kind, 0.0) + b.mib, 2)
    return {"mode": mode.name, "ctx": ctx, "command": command, "devices": devices,
            "breakdown": [vars(d) for d in breakdown]}


# llama-perplexity prints nan (or -nan) where an uncertainty cannot be computed, e.g. for a quant whose
# logits barely differ from F16 (`Mean PPL(Q)/PPL(base) : 0.999996 ± -nan`): such a figure is None.
_FLOAT = r"(-?(?:nan|inf|\d[\d.]*(?:e[-+]?\d+)?))"
_PATTERNS = {
    "ppl": rf"Final estimate: PPL = {_FLOAT} \+/- {_FLOAT}",
    "ppl_q": rf"Mean PPL\(Q\)\s*:\s*{_FLOAT}\s*±\s*{_FLOAT}",
    "ppl_base": rf"Mean PPL\(base\)\s*:\s*{_FLOAT}\s*±\s*{_FLOAT}",
    "ppl_ratio": rf"Mean PPL\(Q\)/PPL\(base\)\s*:\s*{_FLOAT}\s*±\s*{_FLOAT}",
    "kld_mean": rf"Mean\s+KLD:\s*{_FLOAT}\s*±\s*{_FLOAT}",
    "kld_max": rf"Maximum KLD:\s*{_FLOAT}",
    "kld_p99": rf"99\.0%\s+KLD:\s*{_FLOAT}",
    "kld_median": rf"Median\s+KLD:\s*{_FLOAT}",
    "same_top_p": rf"Same top p:\s*{_FLOAT}\s*±\s*{_FLOAT} %",
}
# The line each wanted figure comes from, to name the one that is missing.
_LINES = {"ppl": "Final estimate: PPL = ...", "kld_mean": "Mean    KLD: ...", "same_top_p": "Same top p: ...",
          "ppl_ratio": "Mean PPL(Q)/PPL(base) : ..."}


def _number(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None


def parse_perplexity(text: str) -> dict:
    """The figures llama-perplexity printed; each with its ± where it gives one (None where it printed nan)."""
    out = {}
    for key, pattern in _PATTERNS.items():
        match = re.search(pattern, text, flags=re.IGNORECASE)
        if match:
            out[key] = _number(match.group(1))
            if match.lastindex and match.lastindex > 1:
                out[key + "_err"] = _number(match.group(2))
    return out


def run_perplexity(tool: Path, model: Path, text: Path, log: Path, *, ctx: int, chunks: int, kld_base: Path,
                   save_base: bool, threads: int | None, timeout_s: float) -> dict:
    command = [str(tool), "-m", str(model), "-f", str(text), "-c", str(ctx), "--chunks", str(chunks),
               "--kl-divergence-base", str(kld_base), *([] if save_base else ["--kl-divergence"]),
               *(["-t", str(threads)] if threads else [])]
    # llama-perplexity needs 2 x ctx tokens for one chunk, and a token covers at least one byte (plus BOS).
    size = text.stat().st_size
    if size + 1 < 2 * ctx:
        raise InputError(f"{text}: {size} bytes, fewer than the {2 * ctx} tokens llama-perplexity needs for one "
                         f"chunk of {ctx}; use a longer text (bench.perplexity.text) or a smaller bench.perplexity.ctx")
    wanted = ("ppl",) if save_base else ("kld_mean", "same_top_p", "ppl_ratio")
    too_short = False
    never = set(wanted)  # what no try printed: a run cut short (the flake retried here) lacks more, by chance
    for _ in range(PERPLEXITY_TRIES):
        lines: list[str] = []
        run_tool(command, log, on_line=lines.append, timeout_s=timeout_s)
        output = "\n".join(lines)
        figures = parse_perplexity(output)
        if all(key in figures for key in wanted):
            return {"command": command, **figures}
        never &= {key for key in wanted if key not in figures}
        too_short = too_short or "you need at least" in output  # a retried run may stop before saying so
    absent = next((key for key in wanted if key in never), None) or next(k for k in wanted if k not in figures)
    hint = f"; the text is too short for {chunks} chunks of {ctx} tokens (bench.perplexity)" if too_short else ""
    raise ToolError(f"llama-perplexity printed no '{_LINES[absent]}' line for {model.name} ({PERPLEXITY_TRIES} "
                    f"tries){hint}; see {log}")
