"""The choice stage: which of a quant's candidate files is published, chosen on measured KL divergence.

A quant made with an importance matrix is made twice, with it and without it, and a rung with a searched
recipe (quants[].recipe: search) a third time, with that recipe (each by the quantize stage, under
WORKSPACE/choice/TYPE/). Every candidate is measured against the F16 logits on the evaluation text
(moeq/kld.py, the bench's own measurement). The stock choice (the first: with the matrix where there is one)
is published unless another measured a lower mean KL divergence by more than twice the combined uncertainty:
no file measured worse than another is published. Where the pipeline names the matrix (quants[].imatrix:
PATH) the file made without it is never published, and a searched file larger than the stock one never is;
the record still holds every figure, and the card shows them.

Its key is the candidates' sha256s, the evaluation options, the source and the tool's commit. The
quantize stage then moves the chosen candidate into place (it is that file, byte for byte) and the
others are deleted: their records stay current without them.

    result = run_stage(choice_stage(pipeline, quant, ws, chain, fetched, made, files, may_choose=True), records)
    result.record.published.name
    # -> 'without the importance matrix'
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from moeq import texts
from moeq.config import Pipeline, QuantSpec
from moeq.kld import base_logits, compare, eval_options, measure
from moeq.offload import OffloadMode
from moeq.records import (Made, Candidate, ChoiceRecord, FetchRecord, QuantizeRecord, SpeedRun,
                          ToolBuildRef)
from moeq.speed import run_speed
from moeq.stage_runner import Stage
from moeq.toolchain import Toolchain
from moeq.workspace import Workspace



def choice_stage(pipeline: Pipeline, quant: QuantSpec, ws: Workspace, chain: Toolchain, source: FetchRecord,
                 made: list[tuple[str, QuantizeRecord]], files: Callable[[int], QuantizeRecord], *, may_choose: bool,
                 on_message: Callable[[str], None] = lambda _msg: None) -> Stage[ChoiceRecord]:
    """Measure `made` (each candidate's name and record, current, the stock choice first; `files(i)` gives candidate
    i with its file, made again when it was measured and deleted) and choose; `may_choose` False: the pipeline
    named the importance matrix, so the file made without it is not published."""
    options = eval_options(pipeline, ws)
    text = texts.evaluation(pipeline)
    cfg = pipeline.bench
    tool = chain.tool("llama-perplexity")

    timed = {0, *(i for i, (name, _record) in enumerate(made) if name == Made.SEARCHED)} if any(
        name == Made.SEARCHED for name, _record in made) else set()  # a searched recipe's speed against the stock file's
    speed_options = {"n_prompt": cfg.n_prompt, "n_gen": cfg.n_gen, "repetitions": max(3, cfg.repetitions),
                     "threads": cfg.threads}  # three at least: the card compares the two files within their spread

    def key() -> dict:
        return {"candidates": [[name, record.output.sha256] for name, record in made],
                "source_sha256": source.output.sha256, "options": options.model_dump(mode="json"),
                "may_choose": may_choose, "speed": speed_options if timed else None}

    def run() -> ChoiceRecord:
        base_kld, base = base_logits(ws, chain, source.output, options, text, tool.build.commit, threads=cfg.threads,
                                     timeout_s=cfg.timeout_s, on_message=on_message)
        measured = []
        for i, (name, _record) in enumerate(made):
            record = files(i)
            on_message(f"{quant.type} {name}: llama-perplexity with KL divergence against F16")
            figures = measure(chain, Path(record.output.path), text, base_kld, options,
                              ws.choice_dir(quant.type) / f"perplexity-{name.folder}.log", threads=cfg.threads,
                              timeout_s=cfg.timeout_s)
            speed = None
            if i in timed:
                on_message(f"{quant.type} {name}: llama-bench on the CPU")
                speed = SpeedRun(**run_speed(chain.path("llama-bench"), Path(record.output.path),
                                             OffloadMode.from_name("cpu", record.model.block_count or 1),
                                             ws.choice_dir(quant.type) / f"speed-{name.folder}.log",
                                             rpc=None, timeout_s=cfg.timeout_s, **speed_options))
            measured.append(Candidate(name=name, imatrix=record.options.imatrix, file=record.output,
                                      quality=figures, speed=speed))
        chosen, why = choose(measured, may_choose)
        return ChoiceRecord(quant=quant.type, options=options, tool=ToolBuildRef(**tool.build.as_dict()), base=base,
                            candidates=measured, chosen=chosen, may_choose=may_choose, why=why)

    return Stage("choice", quant.type, key=key, run=run, tool=lambda: tool)


def _kld(candidate: Candidate) -> str:
    figures = candidate.quality
    err = f" ± {figures.kld_mean_err:.6f}" if figures.kld_mean_err is not None else ""
    return f"{figures.kld_mean:.6f}{err}" if figures.kld_mean is not None else "not measured"


def choose(candidates: list[Candidate], may_choose: bool) -> tuple[int, str]:
    """The candidate to publish and why: the first (the stock choice) unless another may be published and has a
    lower mean KL divergence by more than twice the combined uncertainty (of those, the lowest). The file made
    without the importance matrix may be published when `may_choose`; the searched recipe's when its file is no
    larger than the stock one."""
    stock = candidates[0]
    figures = "; ".join(f"{_kld(c)} {c.name}" for c in candidates)
    better = [i for i, c in enumerate(candidates) if i and compare(c.quality, stock.quality) == "lower"]
    larger = [i for i in better if candidates[i].name == Made.SEARCHED and candidates[i].file.size > stock.file.size]
    named = [i for i in better if candidates[i].name == Made.WITHOUT and not may_choose]
    eligible = [i for i in better if i not in larger and i not in named]
    notes = "".join(f"; the file made {candidates[i].name} is larger than the stock file ({candidates[i].file.size:,} "
                    f"bytes against {stock.file.size:,}), so it is not published" for i in larger)
    if eligible:
        best = min(eligible, key=lambda i: candidates[i].quality.kld_mean)
        return best, (f"the file made {candidates[best].name} has the lower mean KL divergence against F16 by more "
                      f"than twice the combined uncertainty ({figures}){notes}")
    if not may_choose:
        why = f"quants[].imatrix names the importance matrix, so the file made {stock.name} is published"
        if named:
            return 0, (why + f", though its mean KL divergence against F16 is higher by more than twice the combined "
                       f"uncertainty ({figures}); imatrix: auto would publish the other{notes}")
        return 0, why + f" (mean KL divergence against F16: {figures}){notes}"
    if larger:
        return 0, f"the stock choice, {stock.name}, stays ({figures}){notes}"
    verdicts = {compare(c.quality, stock.quality) for c in candidates[1:]}
    if verdicts == {"higher"}:
        return 0, (f"the file made {stock.name} has the lower mean KL divergence against F16 by more than twice "
                   f"the combined uncertainty ({figures})")
    if None in verdicts:
        return 0, f"a mean KL divergence is missing ({figures}), so the stock choice, {stock.name}, stays"
    return 0, (f"the mean KL divergence against F16 differs by no more than twice the combined uncertainty "
               f"({figures}), so the stock choice, {stock.name}, stays")
