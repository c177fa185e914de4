"""The quantize stage: F16 source -> one quant of the ladder, whole or not at all.

Its key is the source's sha256 (from the fetch record), the options that change llama-quantize's
output and the tool's commit; the output's checks are the fast header reader's (every tensor's extent
and count); gguf-py's full open of the output is validate's.

    result = run_stage(quantize_stage(pipeline.quant("Q8_0"), ws, Toolchain(), path, lambda: fetched), records)
    result.status, result.record.output.sha256
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from pathlib import Path
from typing import Callable

from gguf import Keys

from moeq import quant_types
from moeq.config import QuantSpec, ToolchainSpec
from moeq.errors import InputError, ToolError
from moeq.architectures import EXPERT_RE, SHARED_EXPERT_RE, require_moe
from moeq.gguf_header import (REQUANTIZE_WARNING, UNQUANTIZED, GGUFHeader, check_extent, read_header,
                              read_source_header)
from moeq.imatrix_file import check_fits, read_imatrix
from moeq.quantize.progress import QuantizeLogParser
from moeq.recipe_file import check_recipe, read_recipe
from moeq.records import (FileRef, ImatrixRef, ModelFacts, QuantizeOptions, QuantizeRecord, FetchRecord,
                          TensorRow, ToolBuildRef)
from moeq.runner import run_tool
from moeq.stage_runner import Stage
from moeq.toolchain import Toolchain
from moeq.workspace import Workspace, commit_file, fsync_file, partial_path, require_free, sha256_file



def quantize_stage(quant: QuantSpec, ws: Workspace, chain: Toolchain, source_path: Path,
                   source_record: Callable[[], FetchRecord], *, threads: int | None = None, allow_requantize: bool = False,
                   on_message: Callable[[str], None] = lambda _msg: None, output: Path | None = None,
                   record_as: str | None = None, adopt: QuantizeRecord | None = None,
                   silence_s: int = ToolchainSpec.quantize_silence_s) -> Stage[QuantizeRecord]:
    """Quantize the F16 at `source_path` into `quant`; `source_record()` gives the fetch stage's record of it, which
    may still be hashing the file (a first run on a local source): llama-quantize does not wait for it.
    `output` and `record_as` place a candidate of the choice stage, which is deleted once chosen or not: its
    record (and sha256) stays current without it. `adopt`: the chosen candidate, made with these very options
    from this source, moved into place instead of quantizing again when its file is still whole. `silence_s`: how
    long llama-quantize may print nothing before it is stopped (toolchain.quantize_silence_s)."""
    if quant_types.lookup(quant.type) is None:
        raise InputError(quant.type, "unknown quant type",
                         f"llama-quantize accepts {', '.join(quant_types.QUANT_TYPES)}")
    tool = chain.tool("llama-quantize")
    final = output or ws.quant_path(quant.file)
    options = quant_options(quant, allow_requantize, ws)

    def key() -> dict:
        return {"source_sha256": source_record().output.sha256, "options": option_key(options)}

    def intact(record: QuantizeRecord) -> bool:
        if record_as is not None and not final.exists():
            return True  # measured and deleted
        return (final.is_file() and os.stat(final).st_size == record.output.size
                and ws.hashes.sha256(final) == record.output.sha256)

    def run() -> QuantizeRecord:
        adopted = _adopt(adopt, options, source_record, ws, final, tool) if adopt is not None else None
        if adopted is not None:
            return adopted
        return _quantize(quant, ws, tool, source_path, source_record, options, threads, on_message,
                         final, silence_s)

    name = record_as or quant.type
    return Stage("quantize", name, key=key, run=run, tool=lambda: tool, intact=intact, lock=f"quant-{name}",
                 lazy_key=True)


def _adopt(candidate: QuantizeRecord, options: QuantizeOptions, source_record: Callable[[], FetchRecord],
           ws: Workspace, final: Path, tool) -> QuantizeRecord | None:
    """The candidate's file renamed to `final` with its record, when it was made exactly as asked now and is whole;
    else None (llama-quantize runs)."""
    made = Path(candidate.output.path)
    if (option_key(candidate.options) != option_key(options) or candidate.tool.commit != tool.build.commit
            or candidate.source.sha256 != source_record().output.sha256 or not made.is_file()
            or made.stat().st_size != candidate.output.size or ws.hashes.sha256(made) != candidate.output.sha256):
        return None
    final.parent.mkdir(parents=True, exist_ok=True)
    commit_file(made, final)  # the candidate is that file: a rename, on the workspace's one filesystem
    if log_path(made).is_file():
        log_path(made).replace(log_path(final))
    ws.hashes.remember(final, candidate.output.sha256)
    return candidate.model_copy(update={"output": candidate.output.model_copy(update={"path": str(final)})})


def log_path(final: Path) -> Path:
    return final.with_name(final.name + ".log")


def _quantize(quant: QuantSpec, ws: Workspace, tool, source_path: Path, source_record: Callable[[], FetchRecord],
              options: QuantizeOptions, threads: int | None, on_message, final: Path,
              silence_s: int) -> QuantizeRecord:
    log = log_path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    source_header = read_source_header(source_path, options.allow_requantize)
    require_moe(source_header, source_path)
    if options.tensor_type_file is not None:
        recipe = Path(options.tensor_type_file.path)
        check_recipe(read_recipe(recipe), source_header, recipe, source_path)
    if options.imatrix is not None:  # llama-quantize would take another model's matrix for tensors of the same name
        check_fits(read_imatrix(Path(options.imatrix.path)), Path(options.imatrix.path), source_header, source_path)
    if any(t.type not in UNQUANTIZED for t in source_header.tensors):
        on_message(f"warning: {source_path} is already quantized; {REQUANTIZE_WARNING}")
    parameters = sum(t.n_elements for t in source_header.tensors)
    n_layer = source_header.arch_value(Keys.LLM.BLOCK_COUNT)
    n_layer = n_layer if isinstance(n_layer, int) and 0 < n_layer <= 65536 else None
    require_free(final.parent, quant_types.estimated_bytes(quant.type, parameters, n_layer),
                 quant.type)  # doctor's estimate, from the source's own header
    partial = partial_path(final)
    partial.unlink(missing_ok=True)
    command = build_command(tool.path, options, source_path, partial, threads)
    parser = QuantizeLogParser()

    def on_line(line: str) -> None:
        parser.feed(line)

    stop_hashing = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        try:
            run_tool(command, log, on_line, idle_s=silence_s,
                     cwd=Path(options.imatrix.path).resolve().parent if options.imatrix else None)
            # The output hash and the fsync run side by side with the header checks; every check on the
            # result happens before the rename, so a failed check leaves no final file.
            output_sha = pool.submit(sha256_file, partial, stop_hashing)
            synced = pool.submit(fsync_file, partial)
            output_header = read_header(partial)
            check_extent(output_header)
            if len(parser.summary.tensors) != len(output_header.tensors):
                raise ToolError("llama-quantize", f"reported {len(parser.summary.tensors)} tensors but wrote "
                                f"{len(output_header.tensors)}", f"see {log}")
            file_type = output_header.metadata.get(Keys.General.FILE_TYPE)
            if not isinstance(file_type, int):
                raise ToolError("llama-quantize", "wrote no general.file_type", f"see {log}")
            recorded = source_record().output  # a first run's source hash finishes beside llama-quantize
            if ws.hashes.lookup(source_path) != recorded.sha256:
                raise InputError(source_path, "changed since the fetch record was made", "run again")
            output_digest = output_sha.result()
            synced.result()
            commit_file(partial, final, synced=True)
        except BaseException:
            stop_hashing.set()
            partial.unlink(missing_ok=True)
            raise
    ws.hashes.remember(final, output_digest)
    return QuantizeRecord(
        quant=quant.type,
        file_type=file_type,
        source=recorded,
        output=FileRef(path=str(final), size=final.stat().st_size, sha256=output_digest),
        options=options,
        tool=ToolBuildRef(**tool.build.as_dict()),
        command=command,  # exactly as run: llama-quantize writes NAME.partial, moeq renames it
        tensors=tensor_rows(source_header, output_header),
        model_size_mib=parser.summary.model_size_mib, model_bpw=parser.summary.model_bpw,
        quant_size_mib=parser.summary.quant_size_mib, quant_bpw=parser.summary.quant_bpw,
        fallback_tensors=parser.summary.fallback_tensors, threads=threads,
        model=model_facts(source_header),
    )


def quant_options(quant: QuantSpec, allow_requantize: bool, ws: Workspace) -> QuantizeOptions:
    """Everything that changes llama-quantize's output, as the record keeps it."""
    imatrix = None
    if quant.imatrix is not None:
        if not quant.imatrix.is_file():
            raise InputError(quant.imatrix, "imatrix file not found", "fix quants[].imatrix")
        imatrix = ImatrixRef(path=str(quant.imatrix), sha256=ws.hashes.sha256(quant.imatrix))
    recipe = None
    if quant.tensor_type_file is not None:
        if not quant.tensor_type_file.is_file():
            raise InputError(quant.tensor_type_file, "recipe file not found", f"fix quants[{quant.type}].recipe")
        recipe = FileRef(path=str(quant.tensor_type_file), size=quant.tensor_type_file.stat().st_size,
                         sha256=ws.hashes.sha256(quant.tensor_type_file))
    return QuantizeOptions(type=quant.type, imatrix=imatrix, tensor_types=dict(quant.tensor_types),
                           output_tensor_type=quant.output_tensor_type,
                           token_embedding_type=quant.token_embedding_type, allow_requantize=allow_requantize,
                           pure=quant.pure, tensor_type_file=recipe)


def option_key(options: QuantizeOptions) -> dict:
    """The options as the key holds them: the importance matrix by its bare name (llama-quantize writes that into
    the file) and its sha256, and the recipe file by its sha256, not their paths, so a moved or copied workspace
    stays current."""
    key = options.model_dump(mode="json")
    if options.imatrix is not None:
        key["imatrix"] = {"name": Path(options.imatrix.path).name, "sha256": options.imatrix.sha256}
    if options.tensor_type_file is not None:
        key["tensor_type_file"] = options.tensor_type_file.sha256
    return key


def build_command(tool: Path, options: QuantizeOptions, source: Path, out: Path, threads: int | None) -> list[str]:
    """The llama-quantize command for `options`: what the record keeps, and what rebuilds the file."""
    before, after = options.type_flags()
    # the importance matrix by its bare name, run from its folder: llama-quantize writes the name into the file
    imatrix = ["--imatrix", Path(options.imatrix.path).name] if options.imatrix else []
    command = [str(tool), *before, *imatrix, *after]
    command += [str(Path(source).resolve()), str(Path(out).resolve()), options.type]
    if threads:
        command.append(str(threads))
    return command


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


MODEL_KEYS = {"block_count": Keys.LLM.BLOCK_COUNT, "expert_count": Keys.LLM.EXPERT_COUNT,
              "expert_used_count": Keys.LLM.EXPERT_USED_COUNT, "context_length": Keys.LLM.CONTEXT_LENGTH,
              "embedding_length": Keys.LLM.EMBEDDING_LENGTH, "head_count": Keys.Attention.HEAD_COUNT,
              "head_count_kv": Keys.Attention.HEAD_COUNT_KV}  # ModelFacts field -> GGUF key


def model_facts(header: GGUFHeader) -> ModelFacts:
    """What later stages (cards) need to know of the model, read once here from the source header."""
    arch = header.architecture
    facts = {"architecture": arch if isinstance(arch, str) else None,
             "parameters": sum(t.n_elements for t in header.tensors), "tensors": len(header.tensors)}
    for field, key in MODEL_KEYS.items():
        value = header.arch_value(key)
        facts[field] = value if isinstance(value, int) else None
    kinds = {pattern: sorted({m.group(0).strip(".") for t in header.tensors if (m := pattern.search(t.name))})
             for pattern in (EXPERT_RE, SHARED_EXPERT_RE)}
    return ModelFacts(**facts, expert_tensors=kinds[EXPERT_RE], shared_experts=kinds[SHARED_EXPERT_RE])
