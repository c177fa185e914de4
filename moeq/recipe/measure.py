"""The measurements of one search: each recipe assembled from the per-type files and measured once against the
F16 logits on the selection text; a measurement is saved, sealed, the moment it is made (WORKSPACE/recipe/TYPE/
evals/, by the recipe, the options and what the per-type files are made from), and found again by an
interrupted search that runs again."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from moeq.config import Pipeline
from moeq.errors import ToolError
from moeq.kld import figure_lines, measure, parse_perplexity
from moeq.recipe.budget import GpuCount
from moeq.recipe.pure import TypeFiles
from moeq.records import PerplexityFigures, PerplexityOptions, RecipeEval
from moeq.seal import seal_json, unseal_json
from moeq.toolchain import Toolchain
from moeq.workspace import Workspace, write_text_atomic


@dataclass(frozen=True)
class Setup:
    """What every measurement of one search shares."""

    ws: Workspace
    chain: Toolchain
    pipeline: Pipeline
    folder: Path  # WORKSPACE/recipe/TYPE
    files: TypeFiles  # the per-type files
    order: list[str]  # every tensor's name, in llama-quantize's order
    sizes: dict[str, dict[str, int]]  # each tensor's bytes at each type
    base: str  # the type --pure gives the rung's tensors
    file_type: int  # the rung's general.file_type
    stock_types: dict[str, str]  # the stock file's quantized tensors and their types
    fixed: int  # the bytes of the tensors no recipe changes
    text: Path  # the selection text
    options: PerplexityOptions
    base_kld: Path  # the F16's logits on it
    gpu: GpuCount | None  # a GPU budget's count of the bytes on the GPU


class Measurements:
    """The recipes measured so far (`evals`), in order; `evaluate` measures one, or finds it saved."""

    def __init__(self, setup: Setup, planned_runs: int, on_message: Callable[[str], None]):
        self.setup, self.planned_runs, self.on_message = setup, planned_runs, on_message
        self.evals: list[RecipeEval] = []
        self.runs = 0
        self.seconds: list[float] = []  # each llama-perplexity run's wall time in this search
        (setup.folder / "evals").mkdir(parents=True, exist_ok=True)

    def runs_left(self) -> int:
        return self.setup.pipeline.recipe.max_evals - len(self.evals)

    def evaluate(self, label: str, changes: dict[str, str]) -> RecipeEval:
        s = self.setup
        types = {**s.stock_types, **changes}
        tensor_bytes = s.fixed + sum(s.sizes[t][name] for name, t in types.items())
        digest = hashlib.sha256(json.dumps([sorted(types.items()), s.options.model_dump(mode="json"), s.files.key]
                                           ).encode()).hexdigest()[:20]
        saved = s.folder / "evals" / f"{digest}.json"
        figures = _saved(saved, digest)
        if figures is None:
            figures = self._measure(label, types)
            log = (s.folder / "perplexity.log").read_text(encoding="utf-8", errors="replace")
            write_text_atomic(saved, seal_json({"digest": digest, "command": figures.command,
                                                "output": figure_lines(log)}))
        measured = RecipeEval(label=label, changes={n: t for n, t in changes.items() if t != s.stock_types[n]},
                              tensor_bytes=tensor_bytes, quality=figures,
                              gpu_bytes=s.gpu.bytes(types) if s.gpu is not None else None)
        self.evals.append(measured)
        return measured

    def _measure(self, label: str, types: dict[str, str]) -> PerplexityFigures:
        s = self.setup
        left = ""
        if self.seconds:  # the time a run takes on this machine, measured, not assumed
            per_run = sum(self.seconds) / len(self.seconds)
            left = (f" (about {(self.planned_runs - len(self.evals)) * per_run / 60:.1f} min left at "
                    f"{per_run:.1f} s a run here)")
        self.on_message(f"recipe {len(self.evals) + 1} of at most {self.planned_runs}: {label}{left}")
        started = time.monotonic()
        candidate = s.folder / "candidate.gguf"
        s.files.assemble(s.order, s.base, types, candidate, s.file_type)
        try:
            figures = measure(s.chain, candidate, s.text, s.base_kld, s.options, s.folder / "perplexity.log",
                              threads=s.pipeline.bench.threads, timeout_s=s.pipeline.bench.timeout_s)
        finally:
            candidate.unlink(missing_ok=True)
        if figures.kld_mean is None:
            raise ToolError("llama-perplexity", f"gave no mean KL divergence for recipe {label}",
                            f"see {s.folder / 'perplexity.log'}")
        self.runs += 1
        self.seconds.append(time.monotonic() - started)
        return figures


def _saved(saved: Path, digest: str) -> PerplexityFigures | None:
    """A measurement this machine's moeq saved for `digest`: sealed by it, for this recipe, and re-parsed from the
    tool's own output lines. Anything else (edited, cut short, another recipe's) is None: measured again."""
    payload = unseal_json(saved)
    if not isinstance(payload, dict) or payload.get("digest") != digest:
        return None
    output, command = payload.get("output"), payload.get("command")
    if not (isinstance(output, list) and all(isinstance(line, str) for line in output)
            and isinstance(command, list) and all(isinstance(arg, str) for arg in command)):
        return None
    try:
        figures = PerplexityFigures(command=command, **parse_perplexity("\n".join(output)))
    except ValueError:
        return None
    return figures if figures.kld_mean is not None else None
