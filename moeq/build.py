"""`moeq build`: a plan, and one loop that runs it.

The plan is a list of steps, in the order they run: which stage, for which subject (a quant, or the ladder
for fetch, imatrix, and the card and push of hub.layout single), after which other steps. Every quant's
file stages come before any card, since a card reads the records of the quants it lists or links. The loop
runs each step through the one stage runner (stage_runner.py), which decides from its record whether it
is current; a step that fails skips every step that needs it, and the other quants go on. One build lock
per quant: two builds never write the same artifacts; a build killed at any point leaves only whole files
and records, and the next one resumes.

    summary = build(Context.of(pipeline), list(pipeline.quants), push=False)
    summary.ok
    # -> True
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from moeq import steps
from moeq.config import IMATRIX_AUTO, RECIPE_SEARCH, QuantSpec
from moeq.errors import ConfigError, MoeqError, from_os_error
from moeq.hub.client import hub_endpoint
from moeq.stage_runner import StageResult
from moeq.steps import Context, RepoUnit

STAGES = ("fetch", "imatrix", "recipe", "choice", "quantize", "validate", "bench", "shards", "card", "push")
LADDER = None  # the subject of a step run once for the whole ladder


@dataclass(frozen=True)
class Step:
    stage: str
    subject: str | None  # the quant it is for, or LADDER
    run: Callable[[], StageResult]
    rows: tuple[str, ...]  # the quants whose summary rows show its result
    needs: tuple[tuple[str, str | None], ...] = ()  # the steps it runs after: when one fails, it is skipped
    lock: str | None = None  # the build lock it runs under (consecutive steps with the same one share it)
    on_failure: str = ""  # what the steps that need it say when it fails (default: "STAGE failed")
    waits_for: Callable[[list[str]], str] | None = None  # what it says when the steps it needs fail, by subject

    @property
    def id(self) -> tuple[str, str | None]:
        return (self.stage, self.subject)


@dataclass
class QuantRow:
    """One quant's line of the summary: each stage's result, and what the build made of it."""

    quant: str
    repo_id: str
    repo_url: str
    stages: list[StageResult] = field(default_factory=list)
    push_plan: list[dict] = field(default_factory=list)  # path, action, size (a local plan without --push)

    @property
    def ok(self) -> bool:
        return all(s.status != "failed" for s in self.stages)

    def record(self, stage: str):
        return next((s.record for s in self.stages if s.stage == stage and s.record is not None), None)

    @property
    def artifact_bytes(self) -> int | None:
        quantized = self.record("quantize")
        return quantized.output.size if quantized else None

    @property
    def commit_url(self) -> str | None:
        pushed = self.record("push")
        return pushed.commit_url if pushed else None

    @property
    def branch(self) -> str | None:
        """The staging branch its push committed to (--stage-to), or None."""
        pushed = self.record("push")
        return pushed.branch if pushed else None

    @property
    def pr_url(self) -> str | None:
        pushed = self.record("push")
        return pushed.pr_url if pushed else None

    def as_dict(self) -> dict:
        return {"quant": self.quant, "repo_id": self.repo_id, "repo_url": self.repo_url,
                "stages": [{"stage": s.stage, "status": s.status, "seconds": s.seconds,
                            "detail": "" if s.why == "inputs unchanged" else s.why, "exit_code": s.exit_code}
                           for s in self.stages],
                "artifact_bytes": self.artifact_bytes, "commit_url": self.commit_url, "pr_url": self.pr_url,
                "push_plan": self.push_plan, "ok": self.ok}


@dataclass
class BuildSummary:
    quants: list[QuantRow]
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
                "quants": [q.as_dict() for q in self.quants]}


def forced_stages(force_stage: str | None) -> set[str]:
    if force_stage is None:
        return set()
    if force_stage not in STAGES:
        raise ConfigError(f"--force-stage {force_stage!r}: use one of {', '.join(STAGES)}")
    return set(STAGES[STAGES.index(force_stage):])


@dataclass(frozen=True)
class Release:
    """A build that is one job of a release across machines: its quants staged on a branch of the ladder's repo
    instead of pushed (`stage_to`), made with the importance matrix another workspace made (`imatrix_from`)."""

    stage_to: str | None = None
    imatrix_from: Path | None = None


def build(ctx: Context, quants: list[QuantSpec], *, push: bool, skip_bench: bool = False,
          force_stage: str | None = None, switch_layout: bool = False, release: Release = Release()) -> BuildSummary:
    force = forced_stages(force_stage)
    steps.require_tools(ctx, quants, skip_bench=skip_bench)
    pipeline = ctx.pipeline
    staged = _staged_already(ctx, quants, release, force)
    if staged:
        ctx.say(f"{', '.join(staged)}: {next(iter(staged.values()))}; nothing to build")
    rows_of_staged = [QuantRow(q.type, pipeline.repo_id(q), f"{hub_endpoint()}/{pipeline.repo_id(q)}",
                               [StageResult("push", "up to date", staged[q.type])]) for q in quants if q.type in staged]
    quants = [q for q in quants if q.type not in staged]
    if not quants:
        return BuildSummary(rows_of_staged, pushed=True, single_repo=pipeline.single_repo)
    # A local source is hashed beside the first llama-quantize (as `moeq quantize` does): started now, waited for
    # once the file stages have run. Every other source (and the imatrix) is needed first.
    hashing = (steps.fetch_beside(ctx, force="fetch" in force)
               if pipeline.source.kind == "local" and not any(q.imatrix == IMATRIX_AUTO for q in quants) else None)
    push_plans: dict[str, list[dict]] = {}
    todo = plan(ctx, quants, hashing, push=push, skip_bench=skip_bench, force=force, switch_layout=switch_layout,
                push_plans=push_plans, release=release)
    results, blocked = run_plan(ctx, todo)
    rows = [QuantRow(q.type, pipeline.repo_id(q), f"{hub_endpoint()}/{pipeline.repo_id(q)}",
                     _row(q.type, todo, results, blocked), push_plans.get(pipeline.repo_id(q), [])) for q in quants]
    return BuildSummary(rows_of_staged + rows, pushed=push or release.stage_to is not None,
                        single_repo=pipeline.single_repo)


def _staged_already(ctx: Context, quants: list[QuantSpec], release: Release, force: set[str]) -> dict[str, str]:
    """The quants a job staging on a branch need not build: staged there from the same inputs (unless forced)."""
    if release.stage_to is None:
        return {}
    if not ctx.pipeline.single_repo:
        raise ConfigError(f"{ctx.pipeline.path}: --stage-to stages quants for the ladder's one repo (hub.layout "
                          "single); with hub.layout per-quant each quant's build pushes its own repo")
    if force:
        return {}
    found = {q.type: steps.staged_already(ctx, q, release.stage_to, release.imatrix_from) for q in quants}
    return {quant: why for quant, why in found.items() if why}


def plan(ctx: Context, quants: list[QuantSpec], hashing: Callable[[], StageResult] | None, *, push: bool,
         skip_bench: bool, force: set[str], switch_layout: bool, push_plans: dict[str, list[dict]],
         release: Release = Release()) -> list[Step]:
    """Every step `moeq build` takes for `quants`, in order; `hashing`: a local source's fetch running beside
    the file stages, whose step comes after them."""
    every = tuple(q.type for q in quants)
    auto = tuple(q.type for q in quants if q.imatrix == IMATRIX_AUTO)
    fetch = ("fetch", LADDER)
    todo: list[Step] = []
    beside = hashing is not None
    if not beside:
        todo.append(Step("fetch", LADDER, lambda: steps.fetch(ctx, force="fetch" in force), every,
                         on_failure="the source could not be fetched"))
    if auto and release.imatrix_from is not None:
        todo.append(Step("imatrix", LADDER, lambda: steps.imatrix_from(ctx, release.imatrix_from), auto,
                         needs=(fetch,), on_failure="the importance matrix given could not be used"))
    elif auto:
        todo.append(Step("imatrix", LADDER, lambda: steps.imatrix(ctx, force="imatrix" in force), auto,
                         needs=(fetch,), on_failure="the importance matrix could not be made"))
    for q in quants:
        if q.type not in auto:
            why = f"uses {q.imatrix.name}" if q.imatrix else "imatrix: none"
            todo.append(Step("imatrix", q.type, lambda why=why: StageResult("imatrix", "skipped", why), (q.type,)))
    for q in quants:
        lock = f"build-{q.type}"
        made = () if beside else (fetch,) + ((("imatrix", LADDER),) if q.type in auto else ())
        unchosen = _unchosen(ctx, q, skip_bench)
        if q.recipe != RECIPE_SEARCH or unchosen:
            why = unchosen if q.recipe == RECIPE_SEARCH else "no recipe: search; llama.cpp's mixture for the type"
            todo.append(Step("recipe", q.type, lambda why=why: StageResult("recipe", "skipped", why), (q.type,)))
        else:
            todo.append(Step("recipe", q.type, lambda q=q: steps.recipe(ctx, q, force="recipe" in force), (q.type,),
                             needs=made, lock=lock, on_failure="the recipe search failed"))
            made = (("recipe", q.type),)
        if unchosen:
            todo.append(Step("choice", q.type, lambda why=unchosen: StageResult("choice", "skipped", why), (q.type,)))
        else:
            todo.append(Step("choice", q.type, lambda q=q: steps.choice(ctx, q, force="choice" in force), (q.type,),
                             needs=made, lock=lock, on_failure="the candidates could not be measured"))
            made = (("choice", q.type),)
        todo += [
            Step("quantize", q.type, lambda q=q: steps.quantize(ctx, q, force="quantize" in force,
                                                                 choose=not skip_bench), (q.type,),
                 needs=made, lock=lock),
            Step("validate", q.type, lambda q=q: _validate(ctx, q, force), (q.type,), needs=(("quantize", q.type),),
                 lock=lock),
            Step("bench", q.type, lambda q=q: _bench(ctx, q, force, skip_bench), (q.type,),
                 needs=(("validate", q.type),), lock=lock),
        ]
    if beside:
        todo.append(Step("fetch", LADDER, hashing, every))
    for unit in steps.repo_units(ctx, quants):  # per quant, or the ladder's one repo after every quant's shards
        held = tuple(q.type for q in unit.quants)
        todo += [Step("shards", q.type, lambda q=q: steps.shards(ctx, q, force="shards" in force), (q.type,),
                      needs=(("bench", q.type), fetch), lock=f"build-{q.type}") for q in unit.quants]
        lock = f"build-{unit.quant}" if unit.quant else None  # the ladder's repo is no one quant's
        todo += _publish(ctx, unit, held, tuple(("shards", q) for q in held), lock, push=push, force=force,
                         switch_layout=switch_layout, push_plans=push_plans, stage_to=release.stage_to)
    return todo


def _unchosen(ctx: Context, quant: QuantSpec, skip_bench: bool) -> str:
    """Why `quant` has no choice to make ("" when it has): a quant with an importance matrix or a searched recipe
    has two candidates or more."""
    if quant.imatrix is None and quant.recipe != RECIPE_SEARCH:
        return "imatrix: none"
    stock = (f"the {'stock ' if quant.recipe == RECIPE_SEARCH else ''}file is made"
             + (" with the importance matrix" if quant.imatrix is not None else ""))
    if not ctx.pipeline.bench.quality:
        return f"bench.quality: false; {stock}"
    if skip_bench:
        return f"--skip-bench; {stock}"
    return ""


def _publish(ctx: Context, unit: RepoUnit, rows: tuple[str, ...], needs: tuple, lock: str | None, *, push: bool,
             force: set[str], switch_layout: bool, push_plans: dict[str, list[dict]],
             stage_to: str | None = None) -> list[Step]:
    """The card and push steps of one repo (per quant, or the ladder's one repo, which waits for every quant); the
    push stages the quants on a branch instead with `stage_to`."""
    subject = unit.quant
    waits = None if subject else (lambda failed: f"the ladder's repo waits for {', '.join(failed)}")
    pushed = ((lambda: steps.stage_to_branch(ctx, unit, stage_to)) if stage_to
              else (lambda: _push(ctx, unit, push, switch_layout, push_plans)))
    return [Step("card", subject, lambda: _card(ctx, unit, force), rows, needs=needs, lock=lock, waits_for=waits),
            Step("push", subject, pushed, rows, needs=(("card", subject),), lock=lock)]


def run_plan(ctx: Context, todo: list[Step]) -> tuple[dict, dict]:
    """Run each step in order; a step whose needs failed (or were skipped for a failure) is skipped, saying why.
    Returns each step's result, and what the steps needing a failed or skipped one say, by step id."""
    results: dict[tuple[str, str | None], StageResult] = {}
    blocked: dict[tuple[str, str | None], str] = {}
    with contextlib.ExitStack() as held:
        holding = None
        for step in todo:
            failed = [need for need in step.needs if need in blocked]
            if failed:
                why = step.waits_for([s for _, s in failed]) if step.waits_for else blocked[failed[0]]
                results[step.id] = StageResult(step.stage, "skipped", why)
                blocked[step.id] = why
                continue
            if step.lock != holding:
                held.close()
                holding = None
            started = time.monotonic()
            try:
                if step.lock and holding is None:
                    held.enter_context(ctx.ws.lock(step.lock, wait=False))
                    holding = step.lock
                result = step.run()
                # a stage that ran beside others (a local source's hash) took longer than the wait for it
                results[step.id] = dataclasses.replace(result, seconds=max(result.seconds, _since(started)))
            except (MoeqError, OSError) as exc:  # an OSError (a full disk) fails this quant's stage, not moeq
                error = from_os_error(exc) if isinstance(exc, OSError) else exc
                results[step.id] = StageResult(step.stage, "failed", error.message, _since(started),
                                               exit_code=error.exit_code)
                locked_out = step.lock is not None and holding is None  # another build holds this quant
                blocked[step.id] = ("another build is running" if locked_out
                                    else step.on_failure or f"{step.stage} failed")
    return results, blocked


def _row(quant: str, todo: list[Step], results: dict, blocked: dict) -> list[StageResult]:
    """A quant's results in stage order; after its first failure every later stage says that failure's why."""
    shown = sorted((s for s in todo if quant in s.rows), key=lambda s: STAGES.index(s.stage))
    row, cause = [], None
    for step in shown:
        result = results[step.id]
        if cause is not None and result.status == "skipped":
            result = dataclasses.replace(result, why=cause)
        elif cause is None and result.status == "failed":
            cause = blocked[step.id]
        row.append(result)
    return row


def _since(started: float) -> float:
    return round(time.monotonic() - started, 3)


def _validate(ctx: Context, quant: QuantSpec, force: set[str]) -> StageResult:
    done = steps.validate(ctx, quant, force="validate" in force)
    steps.require_passed(quant.type, done.record.checks,
                         see=f"moeq validate --quant {quant.type} --config {ctx.pipeline.path}")
    return done


def _bench(ctx: Context, quant: QuantSpec, force: set[str], skip_bench: bool) -> StageResult:
    if skip_bench:
        return StageResult("bench", "skipped")
    done = steps.bench(ctx, quant, force="bench" in force)
    steps.require_measured([done.record], ctx.ws.records_dir)
    return done


def _card(ctx: Context, unit: RepoUnit, force: set[str]) -> StageResult:
    """The card, and its preview page beside the other previews (the build summary says where)."""
    done = steps.card(ctx, unit, force="card" in force)
    steps.preview(ctx, unit)
    return done


def _push(ctx: Context, unit: RepoUnit, push: bool, switch_layout: bool,
          push_plans: dict[str, list[dict]]) -> StageResult:
    if not push:
        push_plans[unit.repo_id] = steps.staged_files(ctx, unit)
        return StageResult("push", "skipped")
    return steps.push(ctx, unit, switch_layout=switch_layout)
