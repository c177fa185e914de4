"""The quantize stage: F16 source -> one quant of the ladder, whole or not at all.

    >>> outcome = quantize(pipeline, pipeline.quant("Q8_0"), Workspace(pipeline.workspace), Toolchain())
    >>> outcome.skipped, outcome.record.output.sha256
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf

from moeq import quant_types
from moeq.config import Pipeline, QuantSpec
from moeq.errors import InputError, ResourceError, ToolError
from moeq.quantize.progress import QuantizeLogParser, TensorLine
from moeq.records import FileRef, QuantizeRecord, SourceRecord, TensorRow, ToolBuildRef
from moeq.runner import run_tool
from moeq.source import record_source, source_file
from moeq.toolchain import Toolchain
from moeq.gguf_header import GGUFHeader, check_extent, read_header
from moeq.workspace import (Workspace, commit_file, free_bytes, fsync_file, partial_path,
                            sha256_file)

UNQUANTIZED = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
DISK_MARGIN = 1.10
DISK_SLACK = 64 * 2**20
REQUANTIZE_WARNING = ("requantizing an already-quantized model can severely reduce quality compared to "
                      "quantizing from 16 or 32 bit")


@dataclass
class QuantizeOutcome:
    record: QuantizeRecord
    skipped: bool
    log_path: Path


def quantize(pipeline: Pipeline, quant: QuantSpec, ws: Workspace, chain: Toolchain, *,
             force: bool = False, threads: int | None = None, allow_requantize: bool = False,
             on_tensor: Callable[[TensorLine], None] | None = None,
             on_message: Callable[[str], None] | None = None) -> QuantizeOutcome:
    """Quantize the pipeline's source into `quant`; skip when the record says nothing changed."""
    say = on_message or (lambda _msg: None)
    if quant_types.lookup(quant.type) is None:
        raise InputError(f"{quant.type}: unknown quant type; llama-quantize accepts "
                         f"{', '.join(quant_types.QUANT_TYPES)}")
    source = source_file(pipeline, ws)
    tool = chain.tool("llama-quantize")
    options = quant_options(quant, allow_requantize, ws)
    final = ws.quant_path(quant.file)
    log_path = final.with_name(final.name + ".log")
    record_path = ws.record_path("quantize", quant.type)
    hashes = ws.hashes

    with ws.lock(f"quant-{quant.type}", on_wait=say):
        previous = QuantizeRecord.load(record_path)
        if not force and previous and final.is_file():
            # Deciding to skip needs the source hash now (cached after the first time).
            source_record = record_source(pipeline, ws, source, hashes.sha256(source))
            if _up_to_date(previous, source_record, options, tool.build.commit, final, hashes):
                return QuantizeOutcome(previous, skipped=True, log_path=log_path)

        source_header = inspect_source(source, allow_requantize)
        if any(t.type not in UNQUANTIZED for t in source_header.tensors):
            say(f"warning: {source} is already quantized; {REQUANTIZE_WARNING}")

        expected = int(source.stat().st_size * quant_types.QUANT_TYPES[quant.type].approx_bpw / 16
                       * DISK_MARGIN) + DISK_SLACK
        free = free_bytes(ws.quants_dir)
        if free < expected:
            raise ResourceError(f"{ws.quants_dir}: {free / 2**20:.0f} MiB free, {quant.type} needs about "
                                f"{expected / 2**20:.0f} MiB; free some space or move the workspace")

        partial = partial_path(final)
        partial.unlink(missing_ok=True)
        command = build_command(tool.path, quant, options, source, partial, threads)
        parser = QuantizeLogParser()

        def on_line(line: str) -> None:
            tensor = parser.feed(line)
            if tensor and on_tensor:
                on_tensor(tensor)

        started = time.monotonic()
        stop_hashing = threading.Event()
        with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
            # When there is nothing to skip, the source hash overlaps with llama-quantize's work.
            source_hash = pool.submit(hashes.sha256, source, stop_hashing)
            try:
                run_tool(command, log_path, on_line)
                # gguf-py's full open, the output hash and the fsync run side by side; every check
                # on the result happens before the rename, so a failed check leaves no final file.
                output_sha = pool.submit(sha256_file, partial, stop_hashing)
                synced = pool.submit(fsync_file, partial)
                output_reader = _open_output(partial, log_path)
                output_header = read_header(partial)
                check_extent(output_header)
                if len(parser.summary.tensors) != len(output_header.tensors):
                    raise ToolError(f"llama-quantize reported {len(parser.summary.tensors)} tensors but wrote "
                                    f"{len(output_header.tensors)}; see {log_path}")
                source_sha = source_hash.result()
                if hashes.lookup(source) != source_sha:
                    raise InputError(f"{source}: changed while it was being quantized; run again")
                output_digest = output_sha.result()
                synced.result()
                commit_file(partial, final, synced=True)
            except BaseException:
                stop_hashing.set()
                partial.unlink(missing_ok=True)
                raise
        hashes.remember(final, output_digest)
        wall = time.monotonic() - started
        source_record = record_source(pipeline, ws, source, source_sha)
        record = QuantizeRecord(
            quant=quant.type,
            file_type=int(output_reader.fields["general.file_type"].contents()),
            source=source_record.output,
            output=FileRef(str(final), final.stat().st_size, output_digest),
            options=options,
            tool=ToolBuildRef(**tool.build.as_dict()),
            command=command,  # exactly as run: llama-quantize writes NAME.partial, moeq renames it
            wall_s=round(wall, 3),
            tensors=tensor_rows(source_header, output_header),
            model_size_mib=parser.summary.model_size_mib, model_bpw=parser.summary.model_bpw,
            quant_size_mib=parser.summary.quant_size_mib, quant_bpw=parser.summary.quant_bpw,
            fallback_tensors=parser.summary.fallback_tensors, threads=threads,
            model=model_facts(source_header),
        )
        record.save(record_path)
        return QuantizeOutcome(record, skipped=False, log_path=log_path)


def quantize_record(pipeline: Pipeline, quant: QuantSpec, ws: Workspace) -> QuantizeRecord:
    """The quantize record later stages start from, or an error saying to run moeq quantize."""
    record = QuantizeRecord.load(ws.record_path("quantize", quant.type))
    if record is None:
        raise InputError(f"{ws.record_path('quantize', quant.type)}: no quantize record for {quant.type}; "
                         f"run moeq quantize --config {pipeline.path} --quant {quant.type} first")
    return record


def quant_options(quant: QuantSpec, allow_requantize: bool, ws: Workspace) -> dict:
    """Everything that changes llama-quantize's output, as the record keeps it."""
    imatrix = None
    if quant.imatrix is not None:
        if not quant.imatrix.is_file():
            raise InputError(f"{quant.imatrix}: imatrix file not found; fix quants[].imatrix")
        imatrix = {"path": str(quant.imatrix), "sha256": ws.hashes.sha256(quant.imatrix)}
    return {
        "type": quant.type,
        "imatrix": imatrix,
        "tensor_types": dict(quant.tensor_types),
        "output_tensor_type": quant.output_tensor_type,
        "token_embedding_type": quant.token_embedding_type,
        "allow_requantize": allow_requantize,
    }


def build_command(tool: Path, quant: QuantSpec, options: dict, source: Path, out: Path,
                  threads: int | None) -> list[str]:
    command = [str(tool)]
    if options["allow_requantize"]:
        command.append("--allow-requantize")
    if options["imatrix"]:
        command += ["--imatrix", options["imatrix"]["path"]]
    for name, ggml_type in quant.tensor_types:
        command += ["--tensor-type", f"{name}={ggml_type}"]
    if quant.output_tensor_type:
        command += ["--output-tensor-type", quant.output_tensor_type]
    if quant.token_embedding_type:
        command += ["--token-embedding-type", quant.token_embedding_type]
    command += [str(source), str(out), quant.type]
    if threads:
        command.append(str(threads))
    return command


def inspect_source(source: Path, allow_requantize: bool) -> GGUFHeader:
    """Refuse a source that is missing, not a GGUF, or already quantized (unless allowed)."""
    if not source.is_file():
        raise InputError(f"{source}: source model not found; check source in the pipeline file")
    with open(source, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise InputError(f"{source}: not a GGUF file (starts with {magic!r}); point the source at an F16 GGUF")
    header = read_header(source)
    check_extent(header)
    quantized = [t for t in header.tensors if t.type not in UNQUANTIZED]
    if quantized and not allow_requantize:
        raise InputError(f"{source}: already quantized ({quantized[0].name} is {quantized[0].type.name}); "
                         f"quantize from the F16 model, or pass --allow-requantize ({REQUANTIZE_WARNING})")
    return header


def _open_output(partial: Path, log_path: Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(partial)
    except Exception as exc:
        raise ToolError(f"llama-quantize wrote a file gguf-py cannot open ({exc.__class__.__name__}: {exc}); "
                        f"see {log_path}") from None


def tensor_rows(source: GGUFHeader, output: GGUFHeader) -> list[TensorRow]:
    before = {t.name: t for t in source.tensors}
    rows = []
    for t in output.tensors:
        src = before.get(t.name)
        rows.append(TensorRow(
            name=t.name, shape=list(t.shape),
            type_before=src.type.name if src is not None else "absent", type_after=t.type.name,
            bytes_before=src.n_bytes if src is not None else 0, bytes_after=t.n_bytes,
        ))
    return rows


MODEL_KEYS = ("block_count", "expert_count", "expert_used_count", "context_length", "embedding_length",
              "attention.head_count", "attention.head_count_kv")


def model_facts(header: GGUFHeader) -> dict:
    """What later stages (cards) need to know of the model, read once here from the source header."""
    arch = header.metadata.get("general.architecture")
    facts = {"architecture": arch, "parameters": sum(t.n_elements for t in header.tensors),
             "tensors": len(header.tensors)}
    for key in MODEL_KEYS:
        value = header.metadata.get(f"{arch}.{key}")
        facts[key.replace("attention.", "")] = value if isinstance(value, int) else None
    return facts


def _up_to_date(previous: QuantizeRecord, source: SourceRecord, options: dict, commit: str,
                final: Path, hashes) -> bool:
    if not previous.model:  # written before records carried the model's facts
        return False
    if (previous.source.sha256 != source.output.sha256 or previous.options != options
            or previous.tool.commit != commit or not final.is_file()):
        return False
    if os.stat(final).st_size != previous.output.size:
        return False
    return hashes.sha256(final) == previous.output.sha256
