"""Reading an importance matrix: llama-imatrix's GGUF format (and the legacy .dat), and checking it fits a model;
and the calibration text moeq ships to make one (moeq/data/CALIBRATION.md).

The GGUF format holds, for every weight the model multiplies with, `<tensor>.in_sum2` (the summed squared
activations, one row per expert for the 3-D expert tensors) and `<tensor>.counts` (how many tokens each
row saw: for `blk.N.ffn_*_exps`, the tokens the router sent to each expert). The legacy format keeps one
call count per tensor, so it has no per-expert counts.

    facts = read_imatrix(Path("work/imatrix/tiny-phimoe.imatrix.gguf"))
    facts.expert_tokens[0]
    # -> [812, 401, 2210, 673]   (layer 0: tokens routed to experts 0..3)
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gguf import Keys

from moeq.errors import InputError
from moeq.gguf_header import GGUFHeader

GGUF_MAGIC = b"GGUF"
EXPERT_TENSOR = re.compile(r"blk\.(\d+)\.ffn_(?:up|gate|down)_exps\.weight")


@dataclass
class ImatrixFacts:
    format: str  # gguf or dat
    entries: dict[str, tuple[int, int]]  # tensor name -> (values per row, rows: experts, or 1)
    chunks: int | None = None
    chunk_size: int | None = None
    datasets: list[str] = field(default_factory=list)
    expert_tokens: dict[int, list[int]] = field(default_factory=dict)  # layer -> tokens routed to each expert


def read_imatrix(path: Path) -> ImatrixFacts:
    """The imatrix at `path`; an InputError naming the file when it is missing, truncated or not an imatrix."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "imatrix file not found", "fix quants[].imatrix or run moeq imatrix")
    with open(path, "rb") as f:
        magic = f.read(4)
    try:
        return _read_gguf(path) if magic == GGUF_MAGIC else _read_dat(path)
    except InputError:
        raise
    except Exception as exc:  # gguf-py and struct fail in many ways on a cut or foreign file
        raise InputError(path, f"not a readable importance matrix ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:120] if str(exc) else 'truncated?'})",
                         "make it again with moeq imatrix") from None


def _read_gguf(path: Path) -> ImatrixFacts:
    import gguf

    reader = gguf.GGUFReader(path)
    general_type = reader.get_field(Keys.General.TYPE)
    if general_type is None or general_type.contents() != "imatrix":
        raise InputError(path, "a GGUF file but not an importance matrix (general.type is not 'imatrix')",
                         "pass the imatrix file, not a model")
    facts = ImatrixFacts(format="gguf", entries={})
    for key, attr in (("imatrix.chunk_count", "chunks"), ("imatrix.chunk_size", "chunk_size")):
        found = reader.get_field(key)
        setattr(facts, attr, int(found.contents()) if found is not None else None)
    datasets = reader.get_field("imatrix.datasets")
    facts.datasets = list(datasets.contents()) if datasets is not None else []
    counts: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name, _, kind = tensor.name.rpartition(".")
        if kind == "in_sum2":
            values, rows = (int(tensor.shape[0]), int(tensor.shape[1]) if len(tensor.shape) > 1 else 1)
            facts.entries[name] = (values, rows)
        elif kind == "counts":
            counts[name] = np.asarray(tensor.data, dtype=np.float64).reshape(-1)
    for name, rows in counts.items():
        match = EXPERT_TENSOR.fullmatch(name)
        if match and (layer := int(match.group(1))) not in facts.expert_tokens:
            facts.expert_tokens[layer] = [int(round(c)) for c in rows]
    facts.expert_tokens = dict(sorted(facts.expert_tokens.items()))
    return facts


def _read_dat(path: Path) -> ImatrixFacts:
    """llama.cpp's legacy format: int32 count, then per entry: name length, name, call count, value count, floats.

    Mapped, not read: a large file that is no imatrix is refused after its first bytes."""
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size < 4:
            raise ValueError("truncated")
        data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _parse_dat(path, data)
    finally:
        data.close()


def _parse_dat(path: Path, data: mmap.mmap) -> ImatrixFacts:
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return values

    (n_entries,) = take("<i")
    if not 0 < n_entries < 1_000_000:
        raise InputError(path, "neither a GGUF imatrix nor a legacy .dat one", "pass the file llama-imatrix wrote")
    facts = ImatrixFacts(format="dat", entries={})
    for _ in range(n_entries):
        (length,) = take("<i")
        if not 0 < length < 4096:
            raise ValueError("bad entry name length")
        name = data[pos:pos + length].decode()
        pos += length
        _ncall, nval = take("<ii")
        if pos + 4 * nval > len(data):
            raise ValueError("truncated")
        pos += 4 * nval
        facts.entries[name] = (nval, 1)
    return facts


def check_fits(facts: ImatrixFacts, path: Path, model: GGUFHeader, model_path: Path) -> None:
    """Every entry names a tensor of the model with the same input width and expert count; else an InputError."""
    tensors = {t.name: t for t in model.tensors}
    if not facts.entries:
        raise InputError(path, "the importance matrix has no entries", "make it again with moeq imatrix")
    for name, (values, rows) in sorted(facts.entries.items()):
        tensor = tensors.get(name)
        if tensor is None:
            raise InputError(path, f"entry {name} is not a tensor of {model_path.name}",
                             "this importance matrix is of another model: make one for this model with moeq imatrix "
                             "(quants[].imatrix: auto)")
        experts = tensor.shape[2] if len(tensor.shape) > 2 else 1
        width = values if facts.format == "gguf" else values // experts
        if width != tensor.shape[0] or (facts.format == "gguf" and rows != experts):
            raise InputError(path, f"entry {name} is {width} wide over {rows} rows, but the tensor in "
                             f"{model_path.name} is {tensor.shape[0]} wide with {experts} experts",
                             "this importance matrix is of another model: make one for this model with moeq imatrix")
