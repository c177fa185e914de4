"""`moeq build`: the whole plan (plan.py) for the quants asked for, and its summary.

A step that fails skips every step that needs it, and the other quants go on. One build lock per quant:
two builds never write the same artifacts; a build killed at any point leaves only whole files and
records, and the next one resumes.

    summary = build(Context.of(pipeline), list(pipeline.quants), push=False)
    summary.ok
    # -> True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from moeq.config import CompareSpec, QuantSpec
from moeq.errors import ConfigError
from moeq.hub.client import hub_endpoint
from moeq.plan import STAGES, Options, Release, Step, forced_stages, plan, run_plan
from moeq.stage_runner import StageResult, Status
from moeq.steps import release as releases, repos
from moeq.steps.context import Context, require_tools


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
        return all(s.status != Status.FAILED for s in self.stages)

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
class PeerRow:
    """A file of another publisher (compare:): what the compare step made of it."""

    peer: CompareSpec
    result: StageResult

    def as_dict(self) -> dict:
        record = self.result.record
        return {"repo": self.peer.repo, "file": self.peer.file, "status": self.result.status,
                "detail": "" if self.result.why == "inputs unchanged" else self.result.why,
                "exit_code": self.result.exit_code,
                "kld_mean": record.quality.quant.kld_mean if record and record.quality else None}


@dataclass
class BuildSummary:
    quants: list[QuantRow]
    pushed: bool
    single_repo: bool = False  # hub.layout single: every quant's card and push are the ladder's one repo's
    compared: list[PeerRow] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(q.ok for q in self.quants) and all(p.result.status != Status.FAILED for p in self.compared)

    @property
    def exit_code(self) -> int:
        """0, or the exit code of the first failed stage (errors.py), so CI sees what kind of failure: a quant's,
        else a compared file's."""
        failed = [s for q in self.quants for s in q.stages] + [p.result for p in self.compared]
        return next((s.exit_code for s in failed if s.status == Status.FAILED), 0)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "exit_code": self.exit_code, "pushed": self.pushed, "single_repo": self.single_repo,
                "quants": [q.as_dict() for q in self.quants], "compared": [p.as_dict() for p in self.compared]}


def build(ctx: Context, quants: list[QuantSpec], *, push: bool, skip_bench: bool = False,
          force_stage: str | None = None, switch_layout: bool = False, release: Release = Release()) -> BuildSummary:
    force = forced_stages(force_stage)
    require_tools(ctx, quants, skip_bench=skip_bench)
    pipeline = ctx.pipeline
    staged = _staged_already(ctx, quants, release, force)
    if staged:
        ctx.say(f"{', '.join(staged)}: {next(iter(staged.values()))}; nothing to build")
    rows_of_staged = [QuantRow(q.type, pipeline.repo_id(q), f"{hub_endpoint()}/{pipeline.repo_id(q)}",
                               [StageResult("push", Status.UP_TO_DATE, staged[q.type])]) for q in quants if q.type in staged]
    quants = [q for q in quants if q.type not in staged]
    if not quants:
        return BuildSummary(rows_of_staged, pushed=True, single_repo=pipeline.single_repo)
    options = Options(force=force, push=push, skip_bench=skip_bench, switch_layout=switch_layout, release=release)
    todo = plan(ctx, quants, options=options)
    results, blocked = run_plan(ctx, todo)
    shown = {}  # without --push: the files each staged repo would send, without asking the Hub
    for unit in repos.repo_units(ctx, quants):
        if not push and release.stage_to is None and results[("card", unit.quant)].record is not None:
            shown[unit.repo_id] = repos.staged_files(ctx, unit)
    rows = [QuantRow(q.type, pipeline.repo_id(q), f"{hub_endpoint()}/{pipeline.repo_id(q)}",
                     _row(q.type, todo, results, blocked), shown.get(pipeline.repo_id(q), [])) for q in quants]
    compared = [PeerRow(peer, results[("compare", peer.id)]) for peer in pipeline.compare
                if ("compare", peer.id) in results]
    return BuildSummary(rows_of_staged + rows, pushed=push or release.stage_to is not None,
                        single_repo=pipeline.single_repo, compared=compared)


def _staged_already(ctx: Context, quants: list[QuantSpec], release: Release, force: frozenset[str]) -> dict[str, str]:
    """The quants a job staging on a branch need not build: staged there from the same inputs (unless forced)."""
    if release.stage_to is None:
        return {}
    if not ctx.pipeline.single_repo:
        raise ConfigError(ctx.pipeline.path, "--stage-to stages quants for the ladder's one repo (hub.layout single)",
                          "leave out --stage-to: with hub.layout per-quant each quant's build pushes its own repo")
    if force:
        return {}
    found = {q.type: releases.staged_already(ctx, q, release.stage_to, release.imatrix_from) for q in quants}
    return {quant: why for quant, why in found.items() if why}


def _row(quant: str, todo: list[Step], results: dict, blocked: dict) -> list[StageResult]:
    """A quant's results in stage order; after its first failure every later stage says that failure's why."""
    shown = sorted((s for s in todo if quant in s.rows), key=lambda s: STAGES.index(s.stage))
    row, cause = [], None
    for step in shown:
        result = results[step.id]
        if cause is not None and result.status == Status.SKIPPED:
            result = dataclasses.replace(result, why=cause)
        elif cause is None and result.status == Status.FAILED:
            cause = blocked[step.id]
        row.append(result)
    return row
