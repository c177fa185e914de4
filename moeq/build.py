"""`moeq build`: fetch -> quantize -> validate -> bench -> card -> push for each quant, doing only what changed.

Each stage decides from its record whether it is current (inputs' sha256, options, tool build); a
forced stage runs again with every stage after it. The first stage that fails stops that quant and
the others go on. One build lock per quant: two builds never write the same artifacts; a build
killed at any point leaves only whole files and records, and the next one resumes.

    >>> summary = build(pipeline, list(pipeline.quants), Workspace(pipeline.workspace), Toolchain(), push=False)
    >>> summary.ok
    True
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from moeq.config import Pipeline, QuantSpec
from moeq.errors import CheckFailed, ConfigError, MoeqError, ToolError, from_os_error
from moeq.toolchain import Toolchain
from moeq.workspace import Workspace

STAGES = ("fetch", "quantize", "validate", "bench", "card", "push")
FILE_STAGES = ("quantize", "validate", "bench")
PUBLISH_STAGES = ("card", "push")


@dataclass
class StageResult:
    stage: str
    status: str  # ran, up to date, failed, skipped
    seconds: float = 0.0
    detail: str = ""
    exit_code: int = 0


@dataclass
class QuantResult:
    quant: str
    repo_id: str
    repo_url: str
    stages: list[StageResult] = field(default_factory=list)
    artifact_bytes: int | None = None
    commit_url: str | None = None
    pr_url: str | None = None
    push_plan: list[dict] = field(default_factory=list)  # path, action, size (a local plan without --push)

    @property
    def ok(self) -> bool:
        return all(s.status != "failed" for s in self.stages)


@dataclass
class BuildSummary:
    quants: list[QuantResult]
    pushed: bool

    @property
    def ok(self) -> bool:
        return all(q.ok for q in self.quants)

    @property
    def exit_code(self) -> int:
        """0, or the exit code of the first failed stage (errors.py), so CI sees what kind of failure."""
        return next((s.exit_code for q in self.quants for s in q.stages if s.status == "failed"), 0)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "exit_code": self.exit_code, "pushed": self.pushed,
                "quants": [{**asdict(q), "ok": q.ok} for q in self.quants]}


def forced_stages(force_stage: str | None) -> set[str]:
    if force_stage is None:
        return set()
    if force_stage not in STAGES:
        raise ConfigError(f"--force-stage {force_stage!r}: use one of {', '.join(STAGES)}")
    return set(STAGES[STAGES.index(force_stage):])


class _Runner:
    """Times a stage, records its outcome, and turns a MoeqError into a failed stage."""

    def __init__(self, result: QuantResult, on_message: Callable[[str], None]):
        self.result, self.on_message = result, on_message

    def run(self, stage: str, fn: Callable[[], bool | str]) -> bool:
        started = time.monotonic()
        try:
            outcome = fn()
        except (MoeqError, OSError) as exc:  # an OSError (a full disk) fails this quant's stage, not moeq
            error = from_os_error(exc) if isinstance(exc, OSError) else exc
            self.result.stages.append(StageResult(stage, "failed", round(time.monotonic() - started, 3),
                                                  error.message, error.exit_code))
            return False
        status = outcome if isinstance(outcome, str) else ("up to date" if outcome else "ran")
        self.result.stages.append(StageResult(stage, status, round(time.monotonic() - started, 3)))
        return True

    def skip_rest(self, after: str, why: str) -> None:
        for stage in STAGES[STAGES.index(after) + 1:]:
            self.result.stages.append(StageResult(stage, "skipped", detail=why))


def build(pipeline: Pipeline, quants: list[QuantSpec], ws: Workspace, chain: Toolchain, *, push: bool,
          api=None, skip_bench: bool = False, force_stage: str | None = None,
          on_message: Callable[[str], None] = lambda _msg: None) -> BuildSummary:
    from moeq.source.fetch import fetch_source

    force = forced_stages(force_stage)
    results = [QuantResult(q.type, pipeline.repo_id(q), f"{_endpoint(api)}/{pipeline.repo_id(q)}") for q in quants]
    fetch_result = StageResult("fetch", "ran")
    started = time.monotonic()
    try:
        # The source has its own lock: a second build waits for the first's fetch, then finds it current.
        outcome = fetch_source(pipeline, ws, api, chain, force="fetch" in force, on_message=on_message)
        fetch_result.status = "up to date" if outcome.skipped else "ran"
    except MoeqError as exc:
        fetch_result = StageResult("fetch", "failed", detail=exc.message, exit_code=exc.exit_code)
    fetch_result.seconds = round(time.monotonic() - started, 3)
    runners = []
    for result in results:
        result.stages.append(fetch_result)
        runners.append(_Runner(result, on_message))
        if fetch_result.status == "failed":
            runners[-1].skip_rest("fetch", "the source could not be fetched")
    # Every quant's file stages first, then the cards: a card's ladder table reads its siblings' records.
    for phase in (FILE_STAGES, PUBLISH_STAGES):
        for quant, runner in zip(quants, runners):
            if not runner.result.ok or len(runner.result.stages) == len(STAGES):
                continue
            try:
                with ws.lock(f"build-{quant.type}", wait=False):
                    steps = _steps(pipeline, quant, ws, chain, api, runner, push=push, skip_bench=skip_bench,
                                   force=force)
                    for stage in phase:
                        if not runner.run(stage, steps[stage]):
                            runner.skip_rest(stage, f"{stage} failed")
                            break
            except MoeqError as exc:  # another build holds this quant
                runner.result.stages.append(StageResult(phase[0], "failed", detail=exc.message,
                                                        exit_code=exc.exit_code))
                runner.skip_rest(phase[0], "another build is running")
    return BuildSummary(results, pushed=push)


def _endpoint(api) -> str:
    from huggingface_hub import constants

    return (api.endpoint if api is not None else constants.ENDPOINT).rstrip("/")


def _steps(pipeline: Pipeline, quant: QuantSpec, ws: Workspace, chain: Toolchain, api, runner: _Runner, *,
           push: bool, skip_bench: bool, force: set[str]) -> dict[str, Callable[[], bool | str]]:
    from moeq.bench.stage import bench_quant
    from moeq.cards.stage import make_card
    from moeq.hub.push import push_quant
    from moeq.quantize.stage import quantize
    from moeq.records import CardRecord
    from moeq.validate.stage import validate_quant

    result = runner.result

    def do_quantize():
        outcome = quantize(pipeline, quant, ws, chain, force="quantize" in force, on_message=runner.on_message)
        result.artifact_bytes = outcome.record.output.size
        return outcome.skipped

    def do_validate():
        outcome = validate_quant(pipeline, quant, ws, force="validate" in force)
        record = outcome.record
        if not record.ok:
            failed = ", ".join(c["name"] for c in record.checks if not c["ok"])
            raise CheckFailed(f"{quant.type}: validation failed ({failed}); see moeq validate --quant "
                              f"{quant.type} --config {pipeline.path}")
        return outcome.skipped

    def do_bench():
        if skip_bench:
            return "skipped"
        outcome = bench_quant(pipeline, quant, ws, chain, force="bench" in force, on_message=runner.on_message)
        if outcome.errors:
            raise ToolError(f"{quant.type}: bench failed in {', '.join(e['mode'] for e in outcome.errors)}: "
                            f"{outcome.errors[0]['error']}")
        return outcome.skipped

    def do_card():
        return make_card(pipeline, quant, ws, force="card" in force, chain=chain).skipped

    def do_push():
        if not push:
            card = CardRecord.load(ws.record_path("card", quant.type))
            folder = Path(card.folder)
            result.push_plan = [{"path": name, "action": "add", "size": (folder / name).stat().st_size}
                                for name in card.repo_files]
            return "skipped"
        outcome = push_quant(pipeline, quant, ws, api, create_pr=None, on_message=runner.on_message)
        record = outcome.record
        result.commit_url, result.pr_url = record.commit_url, record.pr_url
        return record.commit is None

    return {"quantize": do_quantize, "validate": do_validate, "bench": do_bench, "card": do_card, "push": do_push}
