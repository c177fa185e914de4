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


def buffer_total(lines: list[BufferLine], kind: str, device_prefix: str) -> float:
    """Sum of one kind of buffer over the devices whose name starts with `device_prefix`."""
    return sum(line.mib for line in lines if line.kind == kind and line.device.startswith(device_prefix))
