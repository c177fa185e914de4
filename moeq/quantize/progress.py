"""Parse llama-quantize's output lines (matched by their suffixes: prefixes change between versions).

A tensor's line may be cut by other messages (with an importance matrix, llama-quantize prints
"did not find weights for ..." and the matrix's loading in the middle of it), so a tensor is complete
once its size has been printed, on whichever line that is."""

from __future__ import annotations

import re
from dataclasses import dataclass

_HEAD_RE = re.compile(
    r"\[\s*(?P<index>\d+)/\s*(?P<total>\d+)\]\s+(?P<name>\S+)\s+-\s+\[(?P<shape>[^\]]*)\],\s+type =\s+(?P<type>\w+),")
_CONVERTING_RE = re.compile(r"converting to (?P<to>\w+) \.\.")
_TENSOR_SIZE_RE = re.compile(r"size =\s+(?P<mib_in>[\d.]+) MiB(?:\s+->\s+(?P<mib_out>[\d.]+) MiB)?")
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


def _tensor(head: re.Match, rest: str) -> TensorLine | None:
    """The tensor whose line began with `head`, once `rest` (what followed it) holds its size."""
    size = _TENSOR_SIZE_RE.search(rest)
    if not size:
        return None
    converting = _CONVERTING_RE.search(rest[:size.start()])
    shape = [int(x) for x in head["shape"].replace(" ", "").split(",") if x]
    while len(shape) > 1 and shape[-1] == 1:
        shape.pop()
    mib_in = float(size["mib_in"])
    return TensorLine(
        index=int(head["index"]), total=int(head["total"]), name=head["name"], shape=shape,
        type_before=head["type"], type_after=converting["to"] if converting else head["type"],
        mib_in=mib_in, mib_out=float(size["mib_out"]) if size["mib_out"] else mib_in,
    )


class QuantizeLogParser:
    """Feed lines; collects tensor lines and the size/BPW totals."""

    def __init__(self) -> None:
        self.summary = QuantizeSummary(tensors=[])
        self._pending: tuple[re.Match, str] | None = None  # a tensor's line still waiting for its size

    def feed(self, line: str) -> TensorLine | None:
        head = _HEAD_RE.search(line)
        if head:
            self._pending = (head, line[head.end():])
        elif self._pending:
            self._pending = (self._pending[0], self._pending[1] + "\n" + line)
        if self._pending:
            tensor = _tensor(*self._pending)
            if tensor:
                self._pending = None
                self.summary.tensors.append(tensor)
                return tensor
            return None
        size = _SIZE_RE.search(line)
        if size:
            setattr(self.summary, f"{size['which']}_size_mib", float(size["mib"]))
            setattr(self.summary, f"{size['which']}_bpw", float(size["bpw"]))
        fallback = _FALLBACK_RE.search(line)
        if fallback:
            self.summary.fallback_tensors = int(fallback["n"])
        return None
