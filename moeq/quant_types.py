"""Quantization types llama-quantize accepts, as in the pinned build's QUANT_OPTIONS table.

tests/test_toolchain.py checks this table against `llama-quantize --help` of the pinned build,
so a llama.cpp upgrade that changes the list fails loudly instead of drifting.
"""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf

from moeq.runner import run_tool


@dataclass(frozen=True)
class QuantType:
    name: str
    file_type: int  # general.file_type (llama_ftype)
    approx_bpw: float  # whole-model bits per weight of a many-layer MoE, used only for disk-space estimates


# name -> (llama_ftype, approximate bits per weight for a large model)
_TABLE: dict[str, tuple[int, float]] = {
    "Q1_0": (40, 1.125), "Q2_0": (41, 2.25),
    "Q4_0": (2, 4.55), "Q4_1": (3, 5.0), "MXFP4_MOE": (38, 4.25),
    "Q5_0": (8, 5.55), "Q5_1": (9, 6.0),
    "IQ2_XXS": (19, 2.06), "IQ2_XS": (20, 2.31), "IQ2_S": (28, 2.5), "IQ2_M": (29, 2.7),
    "IQ1_S": (24, 1.56), "IQ1_M": (31, 1.75), "TQ1_0": (36, 1.69), "TQ2_0": (37, 2.06),
    "Q2_K": (10, 2.96), "Q2_K_S": (21, 2.96),
    "IQ3_XXS": (23, 3.06), "IQ3_S": (26, 3.44), "IQ3_M": (27, 3.66),
    "Q3_K": (12, 3.91), "IQ3_XS": (22, 3.3),
    "Q3_K_S": (11, 3.5), "Q3_K_M": (12, 3.91), "Q3_K_L": (13, 4.27),
    "IQ4_NL": (25, 4.5), "IQ4_XS": (30, 4.25),
    "Q4_K": (15, 4.89), "Q4_K_S": (14, 4.58), "Q4_K_M": (15, 4.89),
    "Q5_K": (17, 5.7), "Q5_K_S": (16, 5.54), "Q5_K_M": (17, 5.7),
    "Q6_K": (18, 6.56), "Q8_0": (7, 8.5),
    "F16": (1, 16.0), "BF16": (32, 16.0), "F32": (0, 32.0), "COPY": (0, 16.0),
}

# The types whose mixture gives some tensor of a MoE a type llama-quantize makes only with an importance matrix
# (llama-quant.cpp's tensor_requires_imatrix: IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, and Q2_K in a Q2_K_S
# file), as `llama-quantize --dry-run` says of each ("will require an imatrix"); tests/test_toolchain.py checks the
# set against the pinned build on two architectures.
REQUIRES_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S"})

# The tensor type each quant type is made of where no rule of its mixture says otherwise (llama-quant.cpp's
# llama_ftype_get_default_type: what `--pure` gives every tensor); tests/test_toolchain.py checks it against the
# pinned build's --dry-run --pure.
BASE_TENSOR_TYPE = {
    "Q1_0": "Q1_0", "Q2_0": "Q2_0", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "MXFP4_MOE": "MXFP4", "Q5_0": "Q5_0",
    "Q5_1": "Q5_1", "IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS", "IQ2_S": "IQ2_XS", "IQ2_M": "IQ2_S", "IQ1_S": "IQ1_S",
    "IQ1_M": "IQ1_M", "TQ1_0": "TQ1_0", "TQ2_0": "TQ2_0", "Q2_K": "Q2_K", "Q2_K_S": "Q2_K", "IQ3_XXS": "IQ3_XXS",
    "IQ3_S": "IQ3_S", "IQ3_M": "IQ3_S", "Q3_K": "Q3_K", "IQ3_XS": "IQ3_S", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K",
    "Q3_K_L": "Q3_K", "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS", "Q4_K": "Q4_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K",
    "Q5_K": "Q5_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "Q8_0": "Q8_0",
}


def unreadable(quant: str) -> str | None:
    """Why moeq cannot check a file of `quant` (None: it can): gguf-py, which reads and dequantizes every file
    validate checks, must know its base tensor type and dequantize it (asked of gguf-py itself, one zero block)."""
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    import numpy as np

    base = BASE_TENSOR_TYPE.get(quant)
    if base is None:
        return None
    ggml = lookup_ggml_type(base)
    if ggml is None or ggml not in GGML_QUANT_SIZES:
        return f"the gguf package moeq reads files with (gguf-py {_gguf_version()}) does not know {base} tensors"
    block, size = GGML_QUANT_SIZES[ggml]
    try:
        dequantize(np.zeros((1, size * (256 // block if 256 % block == 0 else 1)), dtype=np.uint8), ggml)
    except NotImplementedError:
        return f"the gguf package moeq reads files with (gguf-py {_gguf_version()}) cannot dequantize {base} tensors"
    return None


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "of unknown version"


QUANT_TYPES: dict[str, QuantType] = {
    name: QuantType(name, ftype, bpw) for name, (ftype, bpw) in _TABLE.items()
}


def lookup(name: str) -> QuantType | None:
    """The QuantType for `name`, matched case-insensitively as llama-quantize does."""
    for known in QUANT_TYPES.values():
        if known.name.lower() == name.lower():
            return known
    return None


def ggml_type_names() -> list[str]:
    """Tensor type names accepted by --tensor-type / --output-tensor-type (ggml_type_name)."""
    return [t.name.lower() for t in gguf.GGMLQuantizationType]


def lookup_ggml_type(name: str) -> gguf.GGMLQuantizationType | None:
    for t in gguf.GGMLQuantizationType:
        if t.name.lower() == name.lower():
            return t
    return None


# The _M K-quants give ffn_down (a third of an MoE's weights) Q6_K in "more bits" layers: the first and last
# eighth and every third one between (llama-quant.cpp's use_more_bits, in integer arithmetic): half the layers of
# 32, every layer of 1. approx_bpw is at that half; fewer layers raise the share, and the size.
MORE_BITS = {"Q4_K_M": 6.5625 - 4.5, "Q5_K_M": 6.5625 - 5.5}


def uses_more_bits(layer: int, n_layer: int) -> bool:
    eighth = n_layer // 8
    return layer < eighth or layer >= 7 * n_layer // 8 or (layer - eighth) % 3 == 2


def more_bits_share(n_layer: int) -> float:
    return sum(uses_more_bits(i, n_layer) for i in range(n_layer)) / n_layer


# llama-quant.cpp's tensor_type_fallback, for a tensor whose rows do not hold whole blocks of its type (the
# ladder's types and the search's filler); F16 when the fallback's blocks do not fit either.
_Q = gguf.GGMLQuantizationType
ROW_FALLBACK = {_Q.Q2_K: _Q.Q4_0, _Q.Q3_K: _Q.Q4_0, _Q.TQ1_0: _Q.Q4_0, _Q.Q4_K: _Q.Q5_0, _Q.Q5_K: _Q.Q5_1,
                _Q.Q6_K: _Q.Q8_0}


def row_type(ncols: int, ggml_type: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """The type llama-quantize gives a tensor of rows of `ncols` values that it is told to make `ggml_type`."""
    if ncols % gguf.GGML_QUANT_SIZES[ggml_type][0] == 0:
        return ggml_type
    fallback = ROW_FALLBACK.get(ggml_type, ggml_type)
    return fallback if ncols % gguf.GGML_QUANT_SIZES[fallback][0] == 0 else _Q.F16


def tensor_bytes(shape: list[int], ggml_type: str) -> int:
    """The bytes llama-quantize writes for a tensor of `shape` (ggml order) told to be `ggml_type`."""
    actual = row_type(shape[0], gguf.GGMLQuantizationType[ggml_type])
    block, size = gguf.GGML_QUANT_SIZES[actual]
    return math.prod(shape) // block * size


def estimated_bytes(name: str, parameters: int, n_layer: int | None = None) -> int:
    """About how many bytes `parameters` weights take in quant type `name`, for disk estimates."""
    quant = QUANT_TYPES[name]
    bpw = quant.approx_bpw
    if n_layer and name in MORE_BITS:
        bpw += (more_bits_share(n_layer) - 0.5) * MORE_BITS[name] / 3
    return int(parameters * bpw / 8)


_DRY_RUN_RE = re.compile(r"\]\s+(?P<name>\S+)\s+-\s+\[.*->\s+[\d.]+ MiB \((?P<type>\w+)\)\s*$")
_NEEDS_IMATRIX = "will require an imatrix"


@dataclass(frozen=True)
class Mixture:
    """What llama.cpp's mixture gives a source for a quant type, as `llama-quantize --dry-run` says (it reads the
    header alone and writes nothing)."""

    types: dict[str, str]  # each tensor it quantizes -> its type (the row fallback applied)
    requires_imatrix: bool  # some tensor gets a type made only with an importance matrix


def mixture(tool: Path, source: Path, quant: str, flags: list[str] | tuple[str, ...] = ()) -> Mixture:
    """llama.cpp's mixture for `quant` of `source`, with llama-quantize's type flags (`--pure`, `--tensor-type`,
    ..., as QuantizeOptions.type_flags gives them)."""
    with tempfile.TemporaryDirectory(prefix="moeq-dry-run-") as folder:
        log = Path(folder) / "dry-run.log"
        run_tool([str(tool), "--dry-run", *flags, str(source), str(Path(folder) / "none.gguf"), quant], log)
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    return Mixture({m["name"]: m["type"].upper() for line in lines if (m := _DRY_RUN_RE.search(line))},
                   any(_NEEDS_IMATRIX in line for line in lines))
