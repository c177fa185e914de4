"""The imatrix stage: llama-imatrix on the F16 source with a calibration text, and how well it covered the experts.

An importance matrix tells llama-quantize which weights matter, which is what keeps Q4_K_M and Q2_K
close to the F16 model. In an MoE model each expert only learns from the tokens routed to it: an expert
the calibration text never reaches gets no statistics (and a low-bit quant of it is made blind). The
record therefore keeps, for every layer and expert, the tokens the router sent to it, read from the
imatrix GGUF's counts, and names every expert under `imatrix.min_expert_tokens`: a warning in the record
and the card, or an error with `imatrix.require_coverage: true`.

    result = run_stage(imatrix_stage(pipeline, ws, Toolchain(), source_record), records)
    result.record.coverage.under
    # -> []
"""

from __future__ import annotations

import codecs
import os
import re
import stat
import statistics
from pathlib import Path
from typing import Callable

from moeq import texts
from moeq.config import Pipeline
from moeq.errors import InputError, ToolError
from moeq.gguf_header import require_source
from moeq.imatrix_file import read_imatrix
from moeq.records import (CalibrationRef, CalibrationSource, ExpertCoverage, ExpertTokens, FileRef, ImatrixRecord,
                          FetchRecord, ToolBuildRef)
from moeq.runner import run_tool
from moeq.stage_runner import Stage
from moeq.toolchain import Toolchain
from moeq.workspace import Workspace, commit_file, partial_path

TOO_SHORT = re.compile(r"you need at least (\d+) tokens for a context of (\d+) tokens")
TOKENIZED = re.compile(r"tokenizes to only (\d+) tokens")
# llama-imatrix evaluates n_seq = batch / ctx chunks at once, and times each such pass
PROGRESS = re.compile(r"computing over (\d+) chunks(?:.*n_seq=(\d+))?|(\d+(?:\.\d+)?) seconds per pass - ETA (.*)")
MAX_LISTED = 12  # experts named in one message; the record keeps them all
MAX_CALIBRATION_BYTES = 32 << 20  # llama-imatrix tokenizes the whole text in memory (1 GB of text took 16 GB)
# What moeq/data/calibration.txt is made of (CALIBRATION.md has the details); the card lists them.
SHIPPED_SOURCES = (
    CalibrationSource(title="The Jargon File, version 4.4.7 (English prose, excerpt)",
                      url="https://www.catb.org/jargon/", license="public domain"),
    CalibrationSource(title="Lu Xun, Call to Arms (呐喊, 1923): the preface and the opening of My Old Home (故乡)",
                      url="https://zh.wikisource.org/wiki/%E5%90%B6%E5%96%8A", license="public domain"),
    CalibrationSource(title="textwrap.py of the Python 3.11 standard library (code)",
                      url="https://github.com/python/cpython/blob/3.11/Lib/textwrap.py", license="PSF-2.0"),
)


def imatrix_path(ws: Workspace, pipeline: Pipeline) -> Path:
    suffix = "imatrix" if pipeline.imatrix.format == "gguf" else "imatrix.dat"  # GGUF inside; not a model file
    return ws.root / "imatrix" / f"{pipeline.model.file_stem}.{suffix}"


def check_calibration(text: Path, config: Path) -> None:
    """A calibration text is a regular, non-empty UTF-8 file of at most MAX_CALIBRATION_BYTES, and not a GGUF."""
    fix = f"fix imatrix.calibration in {config}"
    try:
        st = os.stat(text)
    except FileNotFoundError:
        raise InputError(text, "calibration text not found", fix) from None
    except OSError as exc:
        raise InputError(text, f"cannot read the calibration text ({exc.strerror})", fix) from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(text, "not a regular file (a folder, device or FIFO)", fix)
    if st.st_size == 0 or st.st_size > MAX_CALIBRATION_BYTES:
        size = "empty" if st.st_size == 0 else f"{st.st_size:,} bytes, more than {MAX_CALIBRATION_BYTES >> 20} MiB"
        raise InputError(text, f"the calibration text is {size}; a few hundred KB to a few MB of text is what "
                         "llama-imatrix needs", fix)
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(text, "rb") as fh:
        head = fh.read(4)
        if head == b"GGUF":
            raise InputError(text, "a GGUF file, not a calibration text", fix)
        try:
            decoder.decode(head)
            while chunk := fh.read(1 << 20):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise InputError(text, "not UTF-8 text; a calibration text is plain text", fix) from None


def imatrix_stage(pipeline: Pipeline, ws: Workspace, chain: Toolchain, source: FetchRecord,
                  on_message: Callable[[str], None] = lambda _msg: None) -> Stage[ImatrixRecord]:
    spec = pipeline.imatrix
    text = texts.calibration(pipeline)
    check_calibration(text, pipeline.path)
    tool = chain.tool("llama-imatrix")
    final = imatrix_path(ws, pipeline)

    def key() -> dict:
        return {"source_sha256": source.output.sha256, "calibration_sha256": ws.hashes.sha256(text), "ctx": spec.ctx,
                "chunks": spec.chunks, "format": spec.format, "min_expert_tokens": spec.min_expert_tokens,
                "require_coverage": spec.require_coverage,
                "sources": [shipped.model_dump() for shipped in SHIPPED_SOURCES] if spec.calibration is None else []}

    def intact(record: ImatrixRecord) -> bool:
        return (final.is_file() and final.stat().st_size == record.output.size
                and ws.hashes.sha256(final) == record.output.sha256)

    def run() -> ImatrixRecord:
        require_source(Path(source.output.path))
        shipped = spec.calibration is None
        calibration = CalibrationRef(name=text.name, size=text.stat().st_size, sha256=ws.hashes.sha256(text),
                                     shipped=shipped, sources=list(SHIPPED_SOURCES) if shipped else [])
        return _imatrix(pipeline, ws, tool, source, text, calibration, final, on_message)

    return Stage("imatrix", None, key=key, run=run, tool=lambda: tool, intact=intact)


def _imatrix(pipeline: Pipeline, ws: Workspace, tool, source: FetchRecord, text: Path,
             calibration: CalibrationRef, final: Path, on_message: Callable[[str], None]) -> ImatrixRecord:
    spec = pipeline.imatrix
    final.parent.mkdir(parents=True, exist_ok=True)
    computed = partial_path(final)  # GGUF whatever the name (llama-imatrix notes that it is not .gguf)
    log = final.with_name(final.name + ".log")
    # The text by its bare name, from its folder: llama-imatrix writes the name into the file, which is published.
    command = [str(tool.path), "-m", str(Path(source.output.path).resolve()), "-f", text.name, "-o",
               str(computed.resolve()), "-c", str(spec.ctx), "--output-frequency", "1000000"]  # one write, at the end
    if spec.chunks:
        command += ["--chunks", str(spec.chunks)]
    size = text.stat().st_size
    if size + 1 < 2 * spec.ctx:  # a token covers at least one byte (plus BOS): too short, before any tool runs
        raise InputError(text, f"tokenizes to at most {size + 1} tokens; llama-imatrix needs at least {2 * spec.ctx} "
                         f"(two chunks of imatrix.ctx {spec.ctx})",
                         "use a longer calibration text or a smaller imatrix.ctx")
    outputs = [computed]
    try:
        computed.unlink(missing_ok=True)
        on_message(f"{Path(source.output.path).name}: llama-imatrix on {text.name}, context {spec.ctx}")
        try:
            run_tool(command, log, _progress(on_message), cwd=text.resolve().parent)
        except ToolError as exc:
            raise _short_text(log, text, spec.ctx) or exc from None
        facts = read_imatrix(computed)
        if not facts.expert_tokens:
            raise ToolError(computed, "llama-imatrix recorded no expert tensors (ffn_*_exps)",
                            f"is {source.output.path} a Mixture-of-Experts model? See {log}")
        coverage = expert_coverage(facts.expert_tokens, spec.min_expert_tokens)
        warnings = coverage_findings(coverage, text)
        if warnings and spec.require_coverage:
            raise InputError(text, warnings[0], "use a longer or more varied calibration text (imatrix.calibration), "
                             "or set imatrix.require_coverage: false to publish with a warning")
        written = computed
        if spec.format == "dat":  # llama-imatrix converts its own GGUF output to the legacy format
            written = final.with_name(final.name + ".legacy.partial")
            outputs.append(written)
            run_tool([str(tool.path), "-m", command[2], "--in-file", str(computed.resolve()), "-o",
                      str(written.resolve()), "--output-format", "dat"], final.with_name(final.name + ".convert.log"),
                     cwd=final.parent)
        commit_file(written, final)
    finally:
        for path in outputs:
            path.unlink(missing_ok=True)
    for message in warnings:
        on_message(f"warning: {message}")
    chunks = facts.chunks or 0
    return ImatrixRecord(
        source=source.output, calibration=calibration,
        output=FileRef(path=str(final), size=final.stat().st_size, sha256=ws.hashes.sha256(final)),
        format=spec.format, ctx=facts.chunk_size or spec.ctx, chunks=chunks,
        tokens=chunks * (facts.chunk_size or spec.ctx),
        tool=ToolBuildRef(**tool.build.as_dict()), command=command, coverage=coverage, warnings=warnings,
    )


def expert_coverage(tokens: dict[int, list[int]], bar: int) -> ExpertCoverage:
    flat = [count for counts in tokens.values() for count in counts]
    under = [ExpertTokens(layer=layer, expert=expert, tokens=count)
             for layer, counts in tokens.items() for expert, count in enumerate(counts) if count < bar]
    return ExpertCoverage(min_expert_tokens=bar, tokens=tokens, under=under, min=min(flat),
                          median=statistics.median(flat), max=max(flat), experts=len(flat))


def coverage_findings(coverage: ExpertCoverage, text: Path) -> list[str]:
    """One line naming the experts under the bar (none when all reached it)."""
    if not coverage.under:
        return []
    listed = ", ".join(f"layer {u.layer} expert {u.expert} ({u.tokens})" for u in coverage.under[:MAX_LISTED])
    more = f" and {len(coverage.under) - MAX_LISTED} more" if len(coverage.under) > MAX_LISTED else ""
    return [f"{len(coverage.under)} of {coverage.experts} experts got fewer than {coverage.min_expert_tokens} tokens "
            f"of {text.name} (imatrix.min_expert_tokens): {listed}{more}"]


def _short_text(log: Path, text: Path, ctx: int) -> InputError | None:
    logged = log.read_text(errors="replace") if log.is_file() else ""
    need = TOO_SHORT.search(logged)
    if not need:
        return None
    got = TOKENIZED.search(logged)
    return InputError(text, f"tokenizes to {got.group(1) if got else 'too few'} tokens; llama-imatrix needs at least "
                      f"{need.group(1)} (two chunks of imatrix.ctx {ctx})",
                      "use a longer calibration text or a smaller imatrix.ctx")


def _progress(on_message: Callable[[str], None]) -> Callable[[str], None]:
    """A line handler for llama-imatrix's log that reports its chunk count and each pass's time."""
    per_pass = {"chunks": 1}

    def on_line(line: str) -> None:
        match = PROGRESS.search(line)
        if match and match.group(1):  # the first pass (the only one timed) holds n_seq chunks, or all there are
            per_pass["chunks"] = min(int(match.group(1)), int(match.group(2) or 1))
            on_message(f"llama-imatrix: {match.group(1)} chunks, {per_pass['chunks']} per pass")
        elif match:
            seconds, chunks = float(match.group(3)), per_pass["chunks"]
            each = f"{seconds:.1f} s per pass of {chunks} chunks" if chunks > 1 else f"{seconds:.1f} s per chunk"
            on_message(f"llama-imatrix: {each}, ETA {match.group(4).strip()}")

    return on_line
