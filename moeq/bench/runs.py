"""One function per llama.cpp tool the bench stage runs, each returning what it parsed from the tool's output.

- llama-completion -v (one token): model, KV and compute buffer sizes per device.
(llama-bench's tokens/s and devices are moeq/speed.py's and llama-perplexity's KL divergence moeq/kld.py's, shared
with the choice and compare stages.) Every command is logged
beside the bench record; a failure is a ToolError quoting the tool.
"""

from __future__ import annotations

from pathlib import Path

from moeq.errors import ToolError
from moeq.llama_logs import breakdown_printed, parse_buffer_sizes, parse_memory_breakdown
from moeq.offload import OffloadMode
from moeq.runner import run_tool


def _rpc(rpc: str | None, flag: str) -> list[str]:
    return [flag, rpc] if rpc else []


def run_memory(tool: Path, model: Path, mode: OffloadMode, ctx: int, log: Path, *, threads: int | None, rpc: str | None,
               timeout_s: float) -> dict:
    """Load the model once in `mode` and read llama.cpp's buffer sizes, per device, in MiB."""
    command = [str(tool), "-m", str(model), *mode.completion_flags, "-c", str(ctx), "-n", "1", "-p", "hi",
               "-no-cnv", "-v", *(["-t", str(threads)] if threads else []), *_rpc(rpc, "--rpc")]
    lines: list[str] = []
    run_tool(command, log, on_line=lines.append, timeout_s=timeout_s)
    text = "\n".join(lines)
    buffers, breakdown = parse_buffer_sizes(text), parse_memory_breakdown(text)
    if not any(b.kind == "model" for b in buffers):
        raise ToolError("llama-completion", f"exited 0 without a model buffer line in mode {mode.name}", f"see {log}")
    if not breakdown_printed(text):
        raise ToolError("llama-completion", f"exited 0 without its memory breakdown at exit in mode {mode.name}",
                        f"see {log}")
    devices: dict[str, dict[str, float]] = {}
    for b in buffers:
        kinds = devices.setdefault(b.device, {})
        kinds[b.kind] = round(kinds.get(b.kind, 0.0) + b.mib, 2)
    return {"mode": mode.name, "ctx": ctx, "command": command, "devices": devices,
            "breakdown": [vars(d) for d in breakdown]}
