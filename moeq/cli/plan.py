"""`moeq plan`: where each byte of a GGUF goes under llama.cpp's placement rules."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from moeq.cli.options import JsonOption
from moeq.cli.output import console, show, require_gguf_file
from moeq.errors import InputError
from moeq.records import record_json
from moeq.units import binary_size


def plan(
    file: Annotated[Path, typer.Argument(help="A GGUF file.")],
    ctx_sizes: Annotated[Optional[list[int]], typer.Option("--ctx", help="Context size(s) for the KV cache.")] = None,
    kv_type: Annotated[str, typer.Option(help="KV cache type: f16 or q8_0.")] = "f16",
    compute_allowance_mib: Annotated[int, typer.Option(help="Allowance for compute buffers and context, "
                                                       "per GPU.")] = 1024,
    as_json: JsonOption = False,
) -> None:
    """Where each byte of FILE goes under llama.cpp's placement rules, and what fits which GPU."""
    from moeq.memory_plan import plan_file

    from moeq.config import MAX_CTX

    for size in ctx_sizes or []:
        if not 1 <= size <= MAX_CTX:
            raise InputError(f"--ctx {size}", "out of range", f"a context size is 1 to {MAX_CTX} tokens")
    if compute_allowance_mib < 0:
        raise InputError(f"--compute-allowance-mib {compute_allowance_mib}", "below 0", "use 0 or more")
    require_gguf_file(file)
    result = plan_file(file, ctx_sizes=ctx_sizes or [4096], kv_type=kv_type,
                       compute_allowance=compute_allowance_mib * 2**20)
    show(as_json, record_json(result), lambda: _print_plan(file, result))


def _print_plan(file: Path, result) -> None:
    weights = Table(title=f"{file.name}: weights by placement (computed from the file's tensors)")
    for column in ("mode", "GPU", "system RAM"):
        weights.add_column(column)
    for p in result.weights:
        weights.add_row(p.mode, binary_size(p.gpu_bytes), binary_size(p.cpu_bytes))
    console.print(weights)
    fits = Table(title=f"smallest -ncmoe that fits (KV {result.kv_type}, "
                       f"{result.compute_allowance_bytes // 2**20} MiB compute allowance)")
    fits.add_column("GPU")
    for c in result.kv_bytes:
        fits.add_column(f"ctx {c} (KV {binary_size(result.kv_bytes[c])})")
    for gib in sorted({f.gpu_gib for f in result.fits}):
        fits.add_row(f"{gib} GiB", *[f.advice for f in result.fits if f.gpu_gib == gib])
    console.print(fits)
