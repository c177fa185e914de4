"""Parsers for what llama.cpp's own tools print about memory (matched by suffix, not prefix)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_BUFFER_RE = re.compile(r"(?P<device>\S+)\s+(?P<kind>model|KV|compute|output) buffer size\s*=\s*(?P<mib>[\d.]+) MiB")


@dataclass
class BufferLine:
    kind: str  # model, KV, compute, output
    device: str  # e.g. CPU_Mapped, CPU_REPACK, CUDA0, RPC0[127.0.0.1:50052]
    mib: float


def parse_buffer_sizes(text: str) -> list[BufferLine]:
    return [BufferLine(m["kind"], m["device"], float(m["mib"])) for m in _BUFFER_RE.finditer(text)]


# At exit: `..._memory_breakdown_print: |   - CUDA0 (H200) | total = free + (self = model + context +
# compute) + unaccounted |`, in whole MiB (llama_memory_breakdown_print upstream, common_... in the pinned build).
# llama.cpp drops the vendor from the GPU's name (NVIDIA, GeForce, ...). The host line has no total and free,
# and is not matched.
_BREAKDOWN_RE = re.compile(
    r"memory_breakdown_print:\s*\|\s*-\s*(?P<device>[^\s(|]+)\s*(?:\((?P<description>[^|]*)\))?\s*\|"
    r"\s*(?P<total>\d+)\s*=\s*(?P<free>\d+)\s*\+\s*\(\s*(?P<self>\d+)\s*=\s*(?P<model>\d+)\s*\+"
    r"\s*(?P<context>\d+)\s*\+\s*(?P<compute>\d+)\s*\)\s*\+\s*(?P<unaccounted>-?\d+)\s*\|")


@dataclass
class DeviceBreakdown:
    device: str  # CUDA0, RPC0, ...
    description: str  # the GPU's name less its vendor (H200), or the RPC server's address
    mib: dict[str, int]  # total, free, self, model, context, compute, unaccounted


def parse_memory_breakdown(text: str) -> list[DeviceBreakdown]:
    """The devices of llama.cpp's memory breakdown table (the host line excluded)."""
    keys = ("total", "free", "self", "model", "context", "compute", "unaccounted")
    return [DeviceBreakdown(m["device"], (m["description"] or "").strip(), {k: int(m[k]) for k in keys})
            for m in _BREAKDOWN_RE.finditer(text)]


def breakdown_printed(text: str) -> bool:
    """Whether llama.cpp printed its memory breakdown at exit: its host line, which every run has."""
    return re.search(r"memory_breakdown_print:\s*\|\s*-\s*Host\s*\|", text) is not None


def buffer_total(lines: list[BufferLine], kind: str, device_prefix: str) -> float:
    """Sum of one kind of buffer over the devices whose name starts with `device_prefix`."""
    return sum(line.mib for line in lines if line.kind == kind and line.device.startswith(device_prefix))
