"""The one orchestrator: the steps a command takes, in order, and one loop that runs them.

A plan is a list of `Step`s: which stage, for which subject (a quant; a candidate of the choice; or the
ladder, for fetch, imatrix, and the card and push of hub.layout single), which steps it takes its records
from (`needs`) and which must merely have passed (`after`: a quant whose bench failed is not published).
Every command runs the plan cut at its target stage: `moeq validate --quant Q8_0` runs the steps Q8_0's
validation needs, then validates; `moeq build` runs all of it. The loop hands each step the records of the
steps it needs; a step runs its stage through the one stage runner (stage_runner.py), which decides from
its record whether it is current, so an up-to-date build makes one runner call per stage and reads each
record once.

    results = run_to(ctx, "quantize", [pipeline.quant("Q8_0")])
    results[("quantize", "Q8_0")].status
    # -> 'up to date'
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from moeq import progress
from moeq.config import IMATRIX_AUTO, RECIPE_SEARCH, CompareSpec, QuantSpec
from moeq.errors import ConfigError, MoeqError, from_os_error
from moeq.fetch.stage import HUB_KINDS
from moeq.records import Made, QuantizeRecord
from moeq.stage_runner import StageResult, Status
from moeq.steps import candidates, policy, release as releases, repos, wiring
from moeq.steps.context import Context
from moeq.steps.repos import RepoUnit
from moeq.steps.wiring import SourceBeside, SourceFile

STAGES = ("fetch", "imatrix", "recipe", "choice", "quantize", "validate", "bench", "compare", "shards", "card", "push")
CANDIDATE = "candidate"  # a step that makes one candidate of the choice (a quantize stage under its own record)
LADDER = None  # the subject of a step run once for the whole ladder
FETCH = ("fetch", LADDER)
IMATRIX = ("imatrix", LADDER)

StepId = tuple[str, str | None]


@dataclass(frozen=True)
class Release:
    """A build that is one job of a release across machines: its quants staged on a branch of the ladder's repo
    instead of pushed (`stage_to`), made with the importance matrix another workspace made (`imatrix_from`)."""

    stage_to: str | None = None
    imatrix_from: Path | None = None


@dataclass(frozen=True)
class Options:
    """What a command asks of the steps: which stages run again (`force`), and the options of the stages."""

    force: frozenset[str] = frozenset()
    download: bool = True  # False: a Hub source as moeq fetch left it (the commands after fetch never download)
    push: bool = False  # the push step pushes; else it is skipped (build shows the staged files)
    skip_bench: bool = False
    release: Release = Release()
    threads: int | None = None
    allow_requantize: bool = False
    numerics: str = "sample"
    modes: tuple[str, ...] | None = None
    rpc: str | None = None
    create_pr: bool | None = None
    replace_card: bool = False
    switch_layout: bool = False
    prune: bool = False


class Inputs:
    """The records of the steps a step needs, by step id (None for a step that was skipped without one)."""

    def __init__(self, results: dict[StepId, StageResult]):
        self._results = results

    def __getitem__(self, step: StepId) -> Any:
        return self._results[step].record

    def get(self, step: StepId) -> Any:
        found = self._results.get(step)
        return found.record if found else None


@dataclass(frozen=True)
class Step:
    stage: str  # a stage of STAGES, or CANDIDATE
    subject: str | None  # the quant it is for, a candidate's record name, or LADDER
    run: Callable[[Inputs], StageResult]
    rows: tuple[str, ...] = ()  # the quants whose summary rows show its result (none: a candidate)
    needs: tuple[StepId, ...] = ()  # the steps whose records it is handed: in a cut plan they run first
    after: tuple[StepId, ...] = ()  # the steps that must not have failed (in a build; a cut plan leaves them out)
    takes: tuple[StepId, ...] = ()  # steps whose records it is handed when they have one; their failure is not its own
    lock: str | None = None  # the build lock it runs under (consecutive steps with the same one share it)
    on_failure: str = ""  # what the steps that need it say when it fails (default: "STAGE failed")
    waits_for: Callable[[list[str]], str] | None = None  # what it says when the steps it needs fail, by subject
    check: Callable[[Any], None] | None = None  # the pass/fail policy of its record, where a later step follows

    @property
    def id(self) -> StepId:
        return (self.stage, self.subject)


def skipped(stage: str, subject: str | None, why: str) -> Step:
    return Step(stage, subject, lambda _got: StageResult(stage, Status.SKIPPED, why), rows=(subject,))


def forced_stages(force_stage: str | None) -> frozenset[str]:
    """--force-stage STAGE: that stage and every stage after it."""
    if force_stage is None:
        return frozenset()
    if force_stage not in STAGES:
        raise ConfigError(f"--force-stage {force_stage!r}", "not a stage", f"use one of {', '.join(STAGES)}")
    return frozenset(STAGES[STAGES.index(force_stage):])


def plan(ctx: Context, quants: list[QuantSpec], target: str | None = None, options: Options = Options()) -> list[Step]:
    """The steps for `quants`, in order: every step of a build (`target` None), or those `target` needs and
    `target`'s own."""
    todo = _Planner(ctx, quants, target, options).steps()
    return todo if target is None else _cut(todo, target)


def _cut(todo: list[Step], target: str) -> list[Step]:
    """The target's steps and, transitively, the steps they need, in plan order; a local source's fetch, which
    runs beside the first quantize, is in every plan that quantizes."""
    by_id = {step.id: step for step in todo}
    wanted: set[StepId] = set()
    stack = [step.id for step in todo if step.stage == target]
    while stack:
        step = stack.pop()
        if step not in wanted:
            wanted.add(step)
            stack += by_id[step].needs + by_id[step].takes
    if FETCH in by_id and any(by_id[s].stage in (CANDIDATE, "quantize") for s in wanted):
        wanted.add(FETCH)
    return [step for step in todo if step.id in wanted]


class _Planner:
    """Builds one plan: the source, the importance matrix, each quant's file stages, then each repo's card and push."""

    def __init__(self, ctx: Context, quants: list[QuantSpec], target: str | None, options: Options):
        self.ctx, self.quants, self.target, self.options = ctx, quants, target, options
        self.force = options.force
        source = ctx.pipeline.source
        self.auto = tuple(q.type for q in quants if q.imatrix == IMATRIX_AUTO)
        # A local source is hashed beside the first llama-quantize: its fetch step comes after the file stages.
        hashed_beside = (source.kind == "local" and Path(source.path).is_file() and not self.auto
                         and target not in ("fetch", "imatrix"))
        self.beside = SourceBeside(ctx, force="fetch" in self.force) if hashed_beside else None
        self.source_needs = () if self.beside else (FETCH,)

    def source(self, got: Inputs) -> SourceFile:
        return self.beside.start() if self.beside else SourceFile.of(got[FETCH])

    def steps(self) -> list[Step]:
        todo = [] if self.beside else [self._fetch()]
        todo += self._imatrix()
        for quant in self.quants:
            todo += self._file_stages(quant)
        if self.beside:
            todo.append(Step("fetch", LADDER, lambda _got: self.beside.result(), self._every()))
        if self.target in (None, "compare", "card", "push"):
            todo += [self._compare(peer) for peer in self.ctx.pipeline.compare]
        if self.target in (None, "shards", "card", "push"):
            for unit in repos.repo_units(self.ctx, self.quants):
                todo += self._repo(unit)
        return todo

    def _every(self) -> tuple[str, ...]:
        return tuple(q.type for q in self.quants)

    def _fetch(self) -> Step:
        ctx = self.ctx
        if self.options.download or ctx.pipeline.source.kind not in HUB_KINDS:
            run = lambda _got: wiring.fetch(ctx, force="fetch" in self.force)
        else:
            run = lambda _got: wiring.fetched(ctx)
        return Step("fetch", LADDER, run, self._every(), on_failure="the source could not be fetched")

    def _compare(self, peer: CompareSpec) -> Step:
        """A file another publisher made, measured (a build, moeq compare) or as it was measured (the card's and
        push's commands: they never download); a file refused is a failed step, which no quant waits for."""
        ctx = self.ctx
        if self.options.skip_bench and self.target is None:
            return Step("compare", peer.id, lambda _got: StageResult("compare", Status.SKIPPED, "--skip-bench"))
        if self.target in (None, "compare"):
            run = lambda got: wiring.compare_peer(ctx, peer, got[FETCH], force="compare" in self.force)
        else:
            run = lambda got: wiring.compared(ctx, peer, got[FETCH])
        return Step("compare", peer.id, run, needs=(FETCH,), check=lambda record: policy.require_same_model(record))

    def _imatrix(self) -> list[Step]:
        ctx, folder = self.ctx, self.options.release.imatrix_from
        todo = []
        if self.auto and folder is not None:
            todo.append(Step("imatrix", LADDER, lambda got: releases.imatrix_from(ctx, folder, got[FETCH]), self.auto,
                             needs=(FETCH,), on_failure="the importance matrix given could not be used"))
        elif self.auto or self.target == "imatrix":
            todo.append(Step("imatrix", LADDER, lambda got: wiring.imatrix(ctx, got[FETCH], force="imatrix" in self.force),
                             self.auto, needs=(FETCH,), on_failure="the importance matrix could not be made"))
        for q in self.quants:
            if q.type not in self.auto:
                todo.append(skipped("imatrix", q.type, f"uses {q.imatrix.name}" if q.imatrix else "imatrix: none"))
        return todo

    def _file_stages(self, q: QuantSpec) -> list[Step]:
        """recipe, the choice's candidates, choice, quantize, validate and bench of one quant."""
        ctx, options, force = self.ctx, self.options, self.force
        lock = f"build-{q.type}"
        matrix = (IMATRIX,) if q.imatrix == IMATRIX_AUTO else ()
        if options.allow_requantize:
            unchosen = "--allow-requantize: the source is no F16 to measure against; the stock file is made"
        else:
            unchosen = candidates.unchosen(ctx.pipeline, q, options.skip_bench)
        names = candidates.names(q)
        made = {name: (CANDIDATE, candidates.record_name(q, name)) for name in names}
        recipe_id, choice_id, quantize_id = ("recipe", q.type), ("choice", q.type), ("quantize", q.type)
        if self.target == "recipe" and q.recipe != RECIPE_SEARCH:
            raise ConfigError(ctx.pipeline.path, f"quants: {q.type} has no recipe: search", "add it to search one")
        searched = q.recipe == RECIPE_SEARCH and (not unchosen or self.target == "recipe")

        def candidate(name: str, got: Inputs, force_it: bool = False):
            return wiring.candidate(ctx, q, name, self.source(got), imatrix=got.get(IMATRIX), recipe=got.get(recipe_id),
                                    force=force_it, threads=options.threads)

        def candidate_step(name: str) -> Step:
            needs = self.source_needs + (matrix if candidates.needs_matrix(q, name) else ()) + \
                ((recipe_id,) if name == Made.SEARCHED else ())
            return Step(CANDIDATE, made[name][1], lambda got: candidate(name, got), needs=needs, lock=lock)

        todo = []
        if searched:
            stock = names[0]
            todo += [candidate_step(stock),
                     Step("recipe", q.type, lambda got: wiring.recipe(ctx, q, self.source(got).record(), got[made[stock]],
                                                                      force="recipe" in force),
                          (q.type,), needs=self.source_needs + (made[stock],), lock=lock,
                          on_failure="the recipe search failed")]
        else:
            why = unchosen if q.recipe == RECIPE_SEARCH else "no recipe: search; llama.cpp's mixture for the type"
            todo.append(skipped("recipe", q.type, why))
        chosen_needs: tuple[StepId, ...] = ()
        if unchosen:
            todo.append(skipped("choice", q.type, unchosen))
        else:
            todo += [candidate_step(name) for name in names if not (searched and name == names[0])]
            searched_needs = (recipe_id,) if searched else ()

            def choose(got: Inputs):
                remade = lambda i: candidate(names[i], got, force_it=True).record
                return wiring.choice(ctx, q, self.source(got).record(), [(n, got[made[n]]) for n in names], remade,
                                     force="choice" in force)

            todo.append(Step("choice", q.type, choose, (q.type,),
                             needs=self.source_needs + matrix + searched_needs + tuple(made.values()), lock=lock,
                             on_failure="the candidates could not be measured"))
            chosen_needs = (choice_id,) + tuple(made.values()) + searched_needs

        def quantize(got: Inputs):
            chosen = got.get(choice_id)
            return wiring.quantize(ctx, q, self.source(got), imatrix=got.get(IMATRIX), chosen=chosen,
                                   made={n: got[made[n]] for n in names} if chosen else None,
                                   recipe=got.get(recipe_id), force="quantize" in force, threads=options.threads,
                                   allow_requantize=options.allow_requantize)

        see = f"see moeq validate --quant {q.type} --config {ctx.pipeline.path}"
        todo += [
            Step("quantize", q.type, quantize, (q.type,), needs=self.source_needs + matrix + chosen_needs, lock=lock),
            Step("validate", q.type, lambda got: wiring.validate(ctx, q, got[quantize_id], options.numerics,
                                                                 force="validate" in force),
                 (q.type,), needs=(quantize_id,), lock=lock,
                 check=lambda record: policy.require_passed(q.type, record.checks, see)),
        ]
        if options.skip_bench:
            todo.append(Step("bench", q.type, lambda _got: StageResult("bench", Status.SKIPPED, "--skip-bench"),
                             (q.type,), after=(("validate", q.type),)))
        else:
            todo.append(Step("bench", q.type, lambda got: wiring.bench(
                ctx, q, got[quantize_id], got[("validate", q.type)], got.get(choice_id), modes=options.modes,
                rpc=options.rpc, force="bench" in force), (q.type,),
                needs=(quantize_id, ("validate", q.type)) + chosen_needs[:1], lock=lock,
                check=lambda record: policy.require_measured([record], ctx.ws.records_dir)))
        return todo

    def _repo(self, unit: RepoUnit) -> list[Step]:
        """The shards of the repo's quants, its card and its push (per quant, or the ladder's one repo, which waits
        for every quant; the push stages the quants on a branch instead with --stage-to)."""
        ctx, options, force = self.ctx, self.options, self.force
        lock = f"build-{unit.quant}" if unit.quant else None  # the ladder's repo is no one quant's
        held = tuple(q.type for q in unit.quants)
        todo = [Step("shards", q.type, lambda got, q=q: wiring.shards(ctx, got[("quantize", q.type)],
                                                                      force="shards" in force),
                     (q.type,), needs=(("quantize", q.type),), after=(("bench", q.type), FETCH),
                     lock=f"build-{q.type}") for q in unit.quants]
        if self.target == "shards":
            return todo
        listed = repos.card_quants(ctx, unit)
        for q in listed:  # a quant the last push left in the one repo: its card line needs its shards
            if q.type not in held:
                todo.append(Step("shards", q.type, lambda _got, q=q: wiring.shards(
                    ctx, ctx.records.require(QuantizeRecord, q.type))))

        pushing = options.push and not options.release.stage_to

        def card(got: Inputs):
            done = wiring.card(ctx, unit, [(q, got[("shards", q.type)]) for q in listed], force="card" in force,
                               published=repos.published_repo(ctx, unit, online=pushing),
                               prune=pushing and options.prune,
                               compared=[got.get(peer) for peer in compared if got.get(peer) is not None])
            repos.preview(ctx, unit)
            return done

        card_id = ("card", unit.quant)
        compared = tuple(("compare", peer.id) for peer in ctx.pipeline.compare)
        if options.release.stage_to:
            branch = options.release.stage_to
            push = lambda got: releases.stage_to_branch(ctx, unit, branch, got[card_id])
        elif options.push:
            push = lambda got: wiring.push(ctx, unit, got[card_id], create_pr=options.create_pr,
                                           replace_card=options.replace_card, switch_layout=options.switch_layout,
                                           prune=options.prune)
        else:
            push = lambda _got: StageResult("push", Status.SKIPPED, "no --push (nor hub.push: true): the push plan "
                                            "below lists what it would send")
        waits = None if unit.quant else (lambda failed: f"the ladder's repo waits for {', '.join(failed)}")
        return todo + [
            Step("card", unit.quant, card, held, needs=tuple(("shards", q.type) for q in listed), lock=lock,
                 waits_for=waits, takes=compared),
            Step("push", unit.quant, push, held, needs=(card_id,), lock=lock),
        ]


def run_plan(ctx: Context, todo: list[Step], target: str | None = None) -> tuple[dict, dict]:
    """Run each step in order, handing it the records of the steps it needs. In a build (`target` None) a step whose
    needs failed is skipped, saying why, and the others go on under the build locks; a cut plan stops at the first
    failure with its error, and leaves the pass/fail policy of its target's records to the command. Returns each
    step's result, and what the steps needing a failed or skipped one say, by step id."""
    results: dict[StepId, StageResult] = {}
    blocked: dict[StepId, str] = {}
    by_id = {step.id: step for step in todo}
    with contextlib.ExitStack() as held:
        holding = None
        for step in todo:
            failed = [need for need in step.needs + step.after if need in blocked]
            if failed:
                results[step.id] = _blocked_result(step, failed, by_id, results, blocked)
                blocked[step.id] = results[step.id].why if results[step.id].status == Status.SKIPPED else \
                    step.on_failure or f"{step.stage} failed"
                continue
            if target is None and step.lock != holding:
                held.close()
                holding = None
            started = time.monotonic()
            try:
                if target is None and step.lock and holding is None:
                    held.enter_context(ctx.ws.lock(step.lock, wait=False))
                    holding = step.lock
                with progress.step(" ".join(str(part) for part in (step.subject, step.stage) if part)):
                    result = step.run(Inputs({need: results[need] for need in step.needs + step.takes
                                              if need in results}))
                if step.check is not None and step.stage != target and result.record is not None:
                    step.check(result.record)
                # a stage that ran beside others (a local source's hash) took longer than the wait for it
                results[step.id] = dataclasses.replace(result, seconds=max(result.seconds, _since(started)))
            except (MoeqError, OSError) as exc:  # an OSError (a full disk) fails this quant's stage, not moeq
                if target is not None:
                    raise
                error = from_os_error(exc) if isinstance(exc, OSError) else exc
                results[step.id] = StageResult(step.stage, Status.FAILED, error.message, _since(started),
                                               exit_code=error.exit_code)
                locked_out = step.lock is not None and holding is None  # another build holds this quant
                blocked[step.id] = ("another build is running" if locked_out
                                    else step.on_failure or f"{step.stage} failed")
    return results, blocked


def _blocked_result(step: Step, failed: list[StepId], by_id: dict, results: dict, blocked: dict) -> StageResult:
    """What a step whose needs failed shows: a failed candidate's error as its own when only candidates failed (a
    candidate has no row: the choice shows it), else skipped with what it waited for."""
    hidden = next((need for need in failed if not by_id[need].rows and results[need].status == Status.FAILED), None)
    if hidden is not None and all(not by_id[need].rows for need in failed):
        return dataclasses.replace(results[hidden], stage=step.stage)
    why = step.waits_for([subject for _stage, subject in failed]) if step.waits_for else blocked[failed[0]]
    return StageResult(step.stage, Status.SKIPPED, why)


def run_to(ctx: Context, target: str, quants: list[QuantSpec], options: Options = Options()) -> dict[StepId, StageResult]:
    """A command's plan: the steps `target` needs for `quants`, and `target`'s own; the first failure is raised."""
    results, _blocked = run_plan(ctx, plan(ctx, quants, target, options), target=target)
    return results


def publish(ctx: Context, branch: str, keep_branch: bool = False) -> StageResult:
    """moeq publish: every quant of the ladder as its build staged it on `branch`, in one commit on main with the
    one card for the ladder, the manifest and the charts; the GGUFs are copied on the Hub, not uploaded."""
    unit = RepoUnit(ctx.pipeline.hub.repo, None, tuple(ctx.pipeline.quants))
    card_id = ("card", LADDER)

    def card(_got: Inputs):
        done = releases.branch_card(ctx, branch)
        repos.preview(ctx, unit)
        return done

    todo = [Step("card", LADDER, card),
            Step("push", LADDER, lambda got: releases.push_from_branch(ctx, unit, got[card_id], branch, keep_branch),
                 needs=(card_id,))]
    results, _blocked = run_plan(ctx, todo, target="push")
    return results[("push", LADDER)]


def _since(started: float) -> float:
    return round(time.monotonic() - started, 3)
