"""Parse llama-quantize's output lines (matched by their suffixes: prefixes change between versions)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_TENSOR_RE = re.compile(
    r"\[\s*(?P<index>\d+)/\s*(?P<total>\d+)\]\s+(?P<name>\S+)\s+-\s+\[(?P<shape>[^\]]*)\],\s+"
    r"type =\s+(?P<type>\w+),\s+(?:converting to (?P<to>\w+) \.\. )?size =\s+(?P<mib_in>[\d.]+) MiB"
    r"(?:\s+->\s+(?P<mib_out>[\d.]+) MiB)?")
_SIZE_RE = re.compile(r"(?P<which>model|quant) size\s+=\s+(?P<mib>[\d.]+) MiB \((?P<bpw>[\d.]+) BPW\)")
_FALLBACK_RE = re.compile(r"(?P<n>\d+) of (?P<m>\d+) tensor\(s\) required fallback quantization")


@dataclass
class TensorLine:
    index: int
    total: int
    name: str
    shape: list[int]
    type_before: str
    type_after: str
    mib_in: float
    mib_out: float


@dataclass
class QuantizeSummary:
    tensors: list[TensorLine]
    model_size_mib: float = 0.0
    model_bpw: float = 0.0
    quant_size_mib: float = 0.0
    quant_bpw: float = 0.0
    fallback_tensors: int = 0


def parse_tensor_line(line: str) -> TensorLine | None:
    match = _TENSOR_RE.search(line)
    if not match:
        return None
    shape = [int(x) for x in match["shape"].replace(" ", "").split(",") if x]
    while len(shape) > 1 and shape[-1] == 1:
        shape.pop()
    mib_in = float(match["mib_in"])
    return TensorLine(
        index=int(match["index"]), total=int(match["total"]), name=match["name"], shape=shape,
        type_before=match["type"], type_after=match["to"] or match["type"],
        mib_in=mib_in, mib_out=float(match["mib_out"]) if match["mib_out"] else mib_in,
    )


class QuantizeLogParser:
    """Feed lines; collects tensor lines and the size/BPW totals."""

    def __init__(self) -> None:
        self.summary = QuantizeSummary(tensors=[])

    def feed(self, line: str) -> TensorLine | None:
        tensor = parse_tensor_line(line)
        if tensor:
            self.summary.tensors.append(tensor)
            return tensor
        size = _SIZE_RE.search(line)
        if size:
            setattr(self.summary, f"{size['which']}_size_mib", float(size["mib"]))
            setattr(self.summary, f"{size['which']}_bpw", float(size["bpw"]))
        fallback = _FALLBACK_RE.search(line)
        if fallback:
            self.summary.fallback_tensors = int(fallback["n"])
        return None
