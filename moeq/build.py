"""`moeq build`: fetch -> imatrix -> quantize -> validate -> bench -> shards -> card -> push for each quant, doing only
what changed (imatrix only when a quant of the ladder has `imatrix: auto`).

Each stage goes through the one stage runner (stage_runner.py), which decides from its record whether it
is current; `--force-stage S` runs S and every stage after it again. The first stage that fails stops
that quant and the others go on. One build lock per quant: two builds never write the same artifacts;
a build killed at any point leaves only whole files and records, and the next one resumes.

    summary = build(Context.of(pipeline), list(pipeline.quants), push=False)
    summary.ok
    # -> True
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from moeq import steps
from moeq.config import IMATRIX_AUTO, QuantSpec
from moeq.errors import CheckFailed, ConfigError, MoeqError, ToolError, from_os_error
from moeq.hub.client import hub_endpoint
from moeq.stage_runner import StageResult
from moeq.steps import Context

STAGES = ("fetch", "imatrix", "quantize", "validate", "bench", "shards", "card", "push")
FILE_STAGES = ("quantize", "validate", "bench")
PUBLISH_STAGES = ("shards", "card", "push")


@dataclass
class StageOutcome:
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
    stages: list[StageOutcome] = field(default_factory=list)
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
    single_repo: bool = False  # hub.layout single: every quant's card and push are the ladder's one repo's

    @property
    def ok(self) -> bool:
        return all(q.ok for q in self.quants)

    @property
    def exit_code(self) -> int:
        """0, or the exit code of the first failed stage (errors.py), so CI sees what kind of failure."""
        return next((s.exit_code for q in self.quants for s in q.stages if s.status == "failed"), 0)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "exit_code": self.exit_code, "pushed": self.pushed, "single_repo": self.single_repo,
                "quants": [{**asdict(q), "ok": q.ok} for q in self.quants]}


def forced_stages(force_stage: str | None) -> set[str]:
    if force_stage is None:
        return set()
    if force_stage not in STAGES:
        raise ConfigError(f"--force-stage {force_stage!r}: use one of {', '.join(STAGES)}")
    return set(STAGES[STAGES.index(force_stage):])


class _Runner:
    """Times a stage, records its outcome, and turns a MoeqError into a failed stage."""

    def __init__(self, result: QuantResult):
        self.result = result

    def run(self, stage: str, fn: Callable[[], StageResult | str]) -> bool:
        started = time.monotonic()
        try:
            done = fn()
        except (MoeqError, OSError) as exc:  # an OSError (a full disk) fails this quant's stage, not moeq
            error = from_os_error(exc) if isinstance(exc, OSError) else exc
            self.result.stages.append(StageOutcome(stage, "failed", round(time.monotonic() - started, 3),
                                                   error.message, error.exit_code))
            return False
        status, why = (done, "") if isinstance(done, str) else (done.status, done.why if done.status == "ran" else "")
        self.result.stages.append(StageOutcome(stage, status, round(time.monotonic() - started, 3), why))
        return True

    def skip_rest(self, after: str, why: str) -> None:
        for stage in STAGES[STAGES.index(after) + 1:]:
            self.result.stages.append(StageOutcome(stage, "skipped", detail=why))


def build(ctx: Context, quants: list[QuantSpec], *, push: bool, skip_bench: bool = False,
          force_stage: str | None = None, switch_layout: bool = False) -> BuildSummary:
    force = forced_stages(force_stage)
    pipeline = ctx.pipeline
    results = [QuantResult(q.type, pipeline.repo_id(q), f"{hub_endpoint()}/{pipeline.repo_id(q)}") for q in quants]
    runners = [_Runner(result) for result in results]
    # fetch and imatrix run once for the ladder. The source has its own lock: a second build waits for the
    # first's fetch, then finds it current.
    steps.require_tools(ctx, quants, skip_bench=skip_bench)
    shared = _Runner(QuantResult("", "", ""))
    wants_imatrix = [q.imatrix == IMATRIX_AUTO for q in quants]
    # A local source is hashed beside the first llama-quantize (as `moeq quantize` does); its outcome is known
    # once the file stages have run. Every other source (and the imatrix) needs the record first.
    pending = (steps.fetch_beside(ctx, force="fetch" in force)
               if pipeline.source.kind == "local" and not any(wants_imatrix) else None)
    if pending is None:
        shared.run("fetch", lambda: steps.fetch(ctx, force="fetch" in force))
    if shared.result.ok and any(wants_imatrix):
        shared.run("imatrix", lambda: steps.imatrix(ctx, force="imatrix" in force))
    for runner, auto, quant in zip(runners, wants_imatrix, quants):
        if pending is None:  # else its outcome goes first once known (_fetched_beside)
            runner.result.stages.append(shared.result.stages[0])
            if shared.result.stages[0].status == "failed":
                runner.skip_rest("fetch", "the source could not be fetched")
                continue
        if auto:
            runner.result.stages.append(shared.result.stages[1])
            if shared.result.stages[1].status == "failed":
                runner.skip_rest("imatrix", "the importance matrix could not be made")
        else:
            runner.result.stages.append(StageOutcome(
                "imatrix", "skipped", detail=f"uses {quant.imatrix.name}" if quant.imatrix else "imatrix: none"))
    # Every quant's file stages first, then the cards: a card reads the records of the quants it lists or links.
    units = {unit.key: unit for unit in steps.repo_units(ctx, quants)}  # per quant, or {None: the ladder's repo}
    phases = (FILE_STAGES, PUBLISH_STAGES) if not pipeline.single_repo else (FILE_STAGES, ("shards",))
    for phase in phases:
        if phase is not FILE_STAGES and pending is not None:
            _fetched_beside(shared, runners, pending)
            pending = None
        for quant, runner in zip(quants, runners):
            if not runner.result.ok or len(runner.result.stages) == len(STAGES):
                continue
            try:
                with ctx.ws.lock(f"build-{quant.type}", wait=False):
                    todo = _steps(ctx, quant, runner.result, units.get(quant.type), push=push, skip_bench=skip_bench,
                                  force=force, switch_layout=switch_layout)
                    for stage in phase:
                        if not runner.run(stage, todo[stage]):
                            runner.skip_rest(stage, f"{stage} failed")
                            break
            except MoeqError as exc:  # another build holds this quant
                runner.result.stages.append(StageOutcome(phase[0], "failed", detail=exc.message,
                                                         exit_code=exc.exit_code))
                runner.skip_rest(phase[0], "another build is running")
    if pipeline.single_repo:
        _publish_ladder(ctx, units[None], runners, push=push, force=force, switch_layout=switch_layout)
    return BuildSummary(results, pushed=push, single_repo=pipeline.single_repo)


def _fetched_beside(shared: _Runner, runners: list[_Runner], pending: Callable[[], StageResult]) -> None:
    """The outcome of a source stage that ran beside the quantize stages, first in each quant's row."""
    shared.run("fetch", pending)
    outcome = shared.result.stages[-1]
    if outcome.status == "ran":  # it ran before this call waited for it
        outcome.seconds = pending().wall_s
    for runner in runners:
        runner.result.stages.insert(0, outcome)


def _publish_ladder(ctx: Context, unit: steps.RepoUnit, runners: list[_Runner], *, push: bool,
                    force: set[str], switch_layout: bool) -> None:
    """hub.layout single: the card and the push run once for the ladder's repo, when every quant asked for built;
    each quant's summary shows their outcome."""
    failed = [r.result.quant for r in runners if not r.result.ok]
    if failed:
        for runner in runners:
            if runner.result.ok:
                runner.skip_rest("shards", f"the ladder's repo waits for {', '.join(failed)}")
        return
    shared = _Runner(QuantResult("", unit.repo_id, ""))
    if shared.run("card", lambda: _card(ctx, unit, force)):
        shared.run("push", lambda: _push(ctx, unit, shared.result, push, switch_layout))
    else:
        shared.skip_rest("card", "card failed")
    for runner in runners:
        runner.result.stages += shared.result.stages
        runner.result.commit_url, runner.result.pr_url = shared.result.commit_url, shared.result.pr_url
        runner.result.push_plan = shared.result.push_plan


def _card(ctx: Context, unit: steps.RepoUnit, force: set[str]) -> StageResult:
    """The card, and its preview page beside the other previews (the build summary says where)."""
    done = steps.card(ctx, unit, force="card" in force)
    steps.preview(ctx, unit)
    return done


def _push(ctx: Context, unit: steps.RepoUnit, result: QuantResult, push: bool,
          switch_layout: bool) -> StageResult | str:
    if not push:
        result.push_plan = steps.staged_files(ctx, unit)
        return "skipped"
    done = steps.push(ctx, unit, switch_layout=switch_layout)
    result.commit_url, result.pr_url = done.record.commit_url, done.record.pr_url
    return done


def _steps(ctx: Context, quant: QuantSpec, result: QuantResult, unit: steps.RepoUnit | None, *, push: bool,
           skip_bench: bool, force: set[str], switch_layout: bool) -> dict[str, Callable[[], StageResult | str]]:
    """The quant's stages; card and push too when it has a repo of its own (`unit`, hub.layout per-quant)."""

    def do_quantize() -> StageResult:
        done = steps.quantize(ctx, quant, force="quantize" in force)
        result.artifact_bytes = done.record.output.size
        return done

    def do_validate() -> StageResult:
        done = steps.validate(ctx, quant, force="validate" in force)
        if not done.record.ok:
            raise CheckFailed(f"{quant.type}: validation failed ({', '.join(done.record.failed)}); see moeq "
                              f"validate --quant {quant.type} --config {ctx.pipeline.path}")
        return done

    def do_bench() -> StageResult | str:
        if skip_bench:
            return "skipped"
        done = steps.bench(ctx, quant, force="bench" in force)
        quality = done.record.quality
        if quality is not None and quality.imatrix_effect() == "raised":
            ctx.warn(f"{quant.type}: the importance matrix made it worse (mean KLD {quality.quant.kld_mean:.6f} with "
                     f"it, {quality.without_imatrix.kld_mean:.6f} without); the card says so")
        if done.record.errors:
            errors = done.record.errors
            raise ToolError(f"{quant.type}: bench failed in {', '.join(e.mode for e in errors)}: {errors[0].error}")
        return done

    todo = {"quantize": do_quantize, "validate": do_validate, "bench": do_bench,
            "shards": lambda: steps.shards(ctx, quant, force="shards" in force)}
    if unit is not None:
        todo["card"] = lambda: _card(ctx, unit, force)
        todo["push"] = lambda: _push(ctx, unit, result, push, switch_layout)
    return todo
