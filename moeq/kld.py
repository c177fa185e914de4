"""Quality lost against F16, as llama-perplexity measures it: the F16 source's logits saved once per
evaluation text, then each file's KL divergence, PPL ratio and top-token agreement against them.

The bench stage measures the published file with it, and the choice stage (moeq/choice/stage.py) the
candidates it chooses the published file from; both on the same evaluation text, with the same saved logits.

    options = eval_options(pipeline, ws)
    base_kld, base = base_logits(ws, chain, source.output, options, text, commit, threads=None, timeout_s=600)
    measure(chain, Path("Q2_K.gguf"), text, base_kld, options, log, threads=None, timeout_s=600).kld_mean
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Callable

from moeq import texts
from moeq.config import Pipeline
from moeq.errors import InputError, ToolError
from moeq.records import FileRef, PerplexityFigures, PerplexityOptions
from moeq.runner import run_tool
from moeq.toolchain import Toolchain
from moeq.workspace import Workspace, partial_file, write_json_atomic

def eval_options(pipeline: Pipeline, ws: Workspace) -> PerplexityOptions:
    ppl = pipeline.bench.perplexity
    text = texts.evaluation(pipeline)
    return PerplexityOptions(text=text.name, text_sha256=ws.hashes.sha256(text), ctx=ppl.ctx, chunks=ppl.chunks)


def compare(a: PerplexityFigures, b: PerplexityFigures) -> str | None:
    """`a`'s mean KL divergence against `b`'s: lower, higher, or unclear (the difference is within twice the
    combined uncertainty); None without both figures. A figure without an uncertainty counts as exact."""
    if a.kld_mean is None or b.kld_mean is None:
        return None
    spread = 2 * math.hypot(a.kld_mean_err or 0.0, b.kld_mean_err or 0.0)
    difference = a.kld_mean - b.kld_mean
    return "unclear" if abs(difference) <= spread else ("lower" if difference < 0 else "higher")


def base_logits(ws: Workspace, chain: Toolchain, source: FileRef, options: PerplexityOptions, text: Path,
                tool_commit: str, *, threads: int | None, timeout_s: float, purpose: str = "evaluation",
                on_message: Callable[[str], None] = lambda _msg: None) -> tuple[Path, PerplexityFigures]:
    """The F16 source's logits on the text (saved once per source, text, options and tool build, under
    WORKSPACE/bench/base), and its own figures. One set is kept per `purpose` ("evaluation": the bench's and the
    choice's text, "selection": the recipe search's): making a new one deletes the one of older settings, about
    1 GB at the release's."""
    key = hashlib.sha256(json.dumps([source.sha256, options.model_dump(mode="json"),
                                     tool_commit]).encode()).hexdigest()[:16]
    folder = ws.bench_dir("base")
    stem = f"{purpose}-{key}"
    base_kld, base_json = folder / f"{stem}.kld", folder / f"{stem}.json"
    with ws.lock(f"kld-base-{key}", on_wait=on_message):
        if not (base_kld.is_file() and base_json.is_file()):
            _forget_older_bases(ws, folder, purpose, key, on_message)
            on_message(f"{Path(source.path).name}: llama-perplexity on the F16 source (saved for KLD)")
            folder.mkdir(parents=True, exist_ok=True)
            with partial_file(base_kld) as partial:  # one left by a killed run is started over (we hold the lock)
                base = run_perplexity(chain.path("llama-perplexity"), Path(source.path), text, folder / f"{stem}.log",
                                      ctx=options.ctx, chunks=options.chunks, kld_base=partial, save_base=True,
                                      threads=threads, timeout_s=timeout_s)
            write_json_atomic(base_json, base, indent=1)
        return base_kld, PerplexityFigures(**json.loads(base_json.read_text()))


def _forget_older_bases(ws: Workspace, folder: Path, purpose: str, key: str,
                        on_message: Callable[[str], None]) -> None:
    """Delete the saved F16 logits of `purpose` made with other settings (and those of a moeq that named them by key
    alone), each under its own lock, so none is deleted while it is being made."""
    ours = re.compile(rf"(?:{re.escape(purpose)}-)?([0-9a-f]{{16}})")  # this purpose's, or an older moeq's
    for old in sorted(folder.glob("*.kld")):
        match = ours.fullmatch(old.stem)
        if match is None or match[1] == key:
            continue
        with ws.lock(f"kld-base-{match[1]}", on_wait=on_message):
            for path in (old, old.with_suffix(".json"), old.with_suffix(".log")):
                path.unlink(missing_ok=True)


def measure(chain: Toolchain, model: Path, text: Path, base_kld: Path, options: PerplexityOptions, log: Path, *,
            threads: int | None, timeout_s: float) -> PerplexityFigures:
    """`model`'s figures against the saved F16 logits."""
    return PerplexityFigures(**run_perplexity(chain.path("llama-perplexity"), model, text, log, ctx=options.ctx,
                                              chunks=options.chunks, kld_base=base_kld, save_base=False,
                                              threads=threads, timeout_s=timeout_s))


# llama-perplexity prints nan (or -nan) where an uncertainty cannot be computed, e.g. for a quant whose
# logits barely differ from F16 (`Mean PPL(Q)/PPL(base) : 0.999996 ± -nan`): such a figure is None.
_FLOAT = r"(-?(?:nan|inf|\d[\d.]*(?:e[-+]?\d+)?))"
_PATTERNS = {
    "ppl": rf"Final estimate: PPL = {_FLOAT} \+/- {_FLOAT}",
    "ppl_q": rf"Mean PPL\(Q\)\s*:\s*{_FLOAT}\s*±\s*{_FLOAT}",
    "ppl_base": rf"Mean PPL\(base\)\s*:\s*{_FLOAT}\s*±\s*{_FLOAT}",
    "ppl_ratio": rf"Mean PPL\(Q\)/PPL\(base\)\s*:\s*{_FLOAT}\s*±\s*{_FLOAT}",
    "kld_mean": rf"Mean\s+KLD:\s*{_FLOAT}\s*±\s*{_FLOAT}",
    "kld_max": rf"Maximum KLD:\s*{_FLOAT}",
    "kld_p99": rf"99\.0%\s+KLD:\s*{_FLOAT}",
    "kld_median": rf"Median\s+KLD:\s*{_FLOAT}",
    "same_top_p": rf"Same top p:\s*{_FLOAT}\s*±\s*{_FLOAT} %",
}
# The line each wanted figure comes from, to name the one that is missing.
_LINES = {"ppl": "Final estimate: PPL = ...", "kld_mean": "Mean    KLD: ...", "same_top_p": "Same top p: ...",
          "ppl_ratio": "Mean PPL(Q)/PPL(base) : ..."}


def _number(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None


def parse_perplexity(text: str) -> dict:
    """The figures llama-perplexity printed; each with its ± where it gives one (None where it printed nan)."""
    out = {}
    for key, pattern in _PATTERNS.items():
        match = re.search(pattern, text, flags=re.IGNORECASE)
        if match:
            out[key] = _number(match.group(1))
            if match.lastindex and match.lastindex > 1:
                out[key + "_err"] = _number(match.group(2))
    return out


def figure_lines(text: str) -> list[str]:
    """The lines of llama-perplexity's output that its figures are parsed from."""
    return [line for line in text.splitlines()
            if any(re.search(pattern, line, flags=re.IGNORECASE) for pattern in _PATTERNS.values())]


def run_perplexity(tool: Path, model: Path, text: Path, log: Path, *, ctx: int, chunks: int, kld_base: Path,
                   save_base: bool, threads: int | None, timeout_s: float) -> dict:
    command = [str(tool), "-m", str(model), "-f", str(text), "-c", str(ctx), "--chunks", str(chunks),
               "--kl-divergence-base", str(kld_base), *([] if save_base else ["--kl-divergence"]),
               *(["-t", str(threads)] if threads else [])]
    # llama-perplexity needs 2 x ctx tokens for one chunk, and a token covers at least one byte (plus BOS).
    size = text.stat().st_size
    if size + 1 < 2 * ctx:
        raise InputError(text,
                         f"{size} bytes, fewer than the {2 * ctx} tokens llama-perplexity needs for one chunk of {ctx}",
                         "use a longer text (bench.perplexity.text) or a smaller bench.perplexity.ctx")
    wanted = ("ppl",) if save_base else ("kld_mean", "same_top_p", "ppl_ratio")
    lines: list[str] = []
    run_tool(command, log, on_line=lines.append, timeout_s=timeout_s)
    output = "\n".join(lines)
    figures = parse_perplexity(output)
    absent = next((key for key in wanted if key not in figures), None)
    if absent is not None:
        hint = (f"; the text is too short for {chunks} chunks of {ctx} tokens (bench.perplexity)"
                if "you need at least" in output else "")
        raise ToolError("llama-perplexity", f"exited 0 without its '{_LINES[absent]}' line for {model.name}{hint}",
                        f"see {log}")
    return {"command": command, **figures}
