"""Which Hub repo each quant goes to, what its card lists and links, and the read-only checks of a push.

    [unit] = repo_units(ctx, list(ctx.pipeline.quants))   # hub.layout single: the ladder's one repo
    [q.type for q in card_quants(ctx, unit)]
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub.errors import RepositoryNotFoundError

from moeq.cards.history import PublishedRepo
from moeq.cards.manifest import current_validate
from moeq.cards.preview import write_preview
from moeq.cards.verify import card_template, verify_card
from moeq.config import QuantSpec
from moeq.errors import InputError, MoeqError
from moeq.hub.client import hub_errors, remote_text
from moeq.manifest import MANIFEST_NAME, MAX_CARD_BYTES, MAX_MANIFEST_BYTES, README_NAME, parse_manifest
from moeq.push.stage import check_staged, local_files, planned, staged_manifest
from moeq.records import CardRecord, PushAction, PushRecord, QuantizeRecord
from moeq.steps.context import Context
from moeq.workspace import read_text_limited


@dataclass(frozen=True)
class RepoUnit:
    """One Hub repo and the quants a command asks of it: each quant's own repo (hub.layout per-quant, `quant` its
    type), or the ladder's one repo (`quant` None), where the card and push stages run once for the ladder."""

    repo_id: str
    quant: str | None
    quants: tuple[QuantSpec, ...]
    together: tuple[str, ...] = ()  # per-quant: every quant the command publishes, whose repos a card may link


def repo_units(ctx: Context, quants: list[QuantSpec]) -> list[RepoUnit]:
    pipeline = ctx.pipeline
    if pipeline.single_repo:
        return [RepoUnit(pipeline.hub.repo, None, tuple(quants))] if quants else []
    together = tuple(q.type for q in quants)
    return [RepoUnit(pipeline.repo_id(q), q.type, (q,), together) for q in quants]


def published_quants(ctx: Context, quant: str | None, repo_id: str) -> set[str]:
    """The quants this workspace's last push to `repo_id` left there (its push record)."""
    record = ctx.records.get(PushRecord, quant)
    if record is None or record.repo_id != repo_id or record.create_pr:
        return set()
    return set(record.quants) or ({record.quant} if record.quant else set())


def card_quants(ctx: Context, unit: RepoUnit) -> list[QuantSpec]:
    """What the repo's card lists: in one repo, each quant of the ladder with a current file that did not fail
    validation, when it is asked for now or was in the repo at the last push; a quant never built is not listed."""
    if unit.quant is not None:
        return list(unit.quants)
    asked = {q.type for q in unit.quants}
    pushed = published_quants(ctx, None, unit.repo_id)
    listed = []
    for quant in ctx.pipeline.quants:
        if quant.type in asked:
            listed.append(quant)
        elif quant.type in pushed and ctx.records.get(QuantizeRecord, quant.type) is not None:
            validated = current_validate(ctx.records, quant.type)
            if validated is None or validated.ok:
                listed.append(quant)
    return listed


def published_repo(ctx: Context, unit: RepoUnit, online: bool) -> PublishedRepo | None:
    """main on the Hub before this release, which the card tells what it supersedes and changes: read from the Hub
    when the command pushes (`online`), else as this workspace's last push left it (its record and the manifest it
    published); None for a repo never pushed to from here."""
    if online:
        with hub_errors("reading the repo before the push", unit.repo_id):
            try:
                info = ctx.api.model_info(unit.repo_id, revision="main", files_metadata=False)
            except RepositoryNotFoundError:
                return None
            paths = frozenset(s.rfilename for s in info.siblings or [])
            manifest = None
            if MANIFEST_NAME in paths:
                text = remote_text(ctx.api, unit.repo_id, MANIFEST_NAME, MAX_MANIFEST_BYTES, info.sha)
                try:
                    manifest = parse_manifest(text, f"{unit.repo_id}/{MANIFEST_NAME}")
                except MoeqError:  # an older moeq's: the push keeps its files and says why
                    manifest = None
        return PublishedRepo(info.sha, manifest, paths)
    record = ctx.records.get(PushRecord, unit.quant)
    copy = ctx.ws.pushed_manifest(unit.quant)
    if record is None or record.head is None or record.repo_id != unit.repo_id or not copy.is_file():
        return None
    text = read_text_limited(copy, MAX_MANIFEST_BYTES, str(copy))
    if hashlib.sha256(text.encode()).hexdigest() != record.manifest_sha256:
        return None
    return PublishedRepo(record.head, parse_manifest(text, str(copy)),
                         frozenset(f.path for f in record.files if f.action != PushAction.DELETE))


def siblings(ctx: Context, unit: RepoUnit) -> list:
    """Per-quant layout: the other quants' repos the card may link, those that exist on the Hub (pushed from this
    workspace) or are asked for in the same command (pushed with it)."""
    if unit.quant is None:
        return []
    out = []
    for quant in ctx.pipeline.quants:
        quantized = ctx.records.get(QuantizeRecord, quant.type)
        if quant.type == unit.quant or quantized is None:
            continue
        repo_id = ctx.pipeline.repo_id(quant)
        if quant.type in unit.together or quant.type in published_quants(ctx, quant.type, repo_id):
            out.append((quant, quantized, current_validate(ctx.records, quant.type)))
    return out


def preview(ctx: Context, unit: RepoUnit, out: Path | None = None) -> Path:
    """The staged card as a standalone HTML page (WORKSPACE/previews/ladder.html or TYPE.html), its charts shown
    from the staged folder."""
    card = ctx.ws.repo_dir(unit.quant) / "README.md"
    if not card.is_file():
        raise InputError(card, "no card yet",
                         f"run moeq card --config {ctx.pipeline.path}{' --quant ' + unit.quant if unit.quant else ''}")
    out = out or ctx.ws.preview_path(unit.quant or "ladder")
    write_preview(card, out, title=unit.repo_id)
    return out


def push_plan(ctx: Context, unit: RepoUnit, replace_card: bool = False, switch_layout: bool = False,
              prune: bool = False):
    """What `push` would send (read requests only)."""
    card_record = ctx.records.require(CardRecord, unit.quant)
    check_staged(ctx.pipeline, unit.quant, card_record)
    return planned(ctx.api, ctx.pipeline, [q.type for q in unit.quants], ctx.records, card_record, replace_card,
                   switch_layout, prune)


@dataclass
class PushCheck:
    """`moeq push --check`: each repo's plan, and what differs in each README.md moeq would replace."""

    plans: list = field(default_factory=list)  # PushPlan per repo
    findings: list[str] = field(default_factory=list)

    @property
    def behind(self) -> list[str]:
        """The repos that do not hold exactly their staged files."""
        return [plan.repo_id for plan in self.plans if plan.changes]


def check_pushed(ctx: Context, units: list[RepoUnit], replace_card: bool = False, prune: bool = False) -> PushCheck:
    check = PushCheck()
    for unit in units:
        plan = push_plan(ctx, unit, replace_card=replace_card, prune=prune)
        check.plans.append(plan)
        if plan.repo_exists and any(f.path == "README.md" and f.action == PushAction.UPDATE for f in plan.files):
            check.findings += hub_card_findings(ctx, plan.repo_id)  # which lines, as moeq card verify says
        check.findings += hub_link_findings(ctx, plan.repo_id, ctx.records.require(CardRecord, unit.quant))
    return check


def hub_link_findings(ctx: Context, repo_id: str, card_record: CardRecord) -> list[str]:
    """Every Hub repo the staged card links (other than the base model) must exist on the Hub."""
    manifest = staged_manifest(card_record)
    findings = []
    for sibling in manifest.siblings:
        with hub_errors("checking a linked repo", sibling.repo_id):
            if not ctx.api.repo_exists(sibling.repo_id):
                findings.append(f"{repo_id}/{README_NAME}: links {sibling.repo_id}, which is not on the Hub; push "
                                f"{sibling.quant} too")
    return findings


def hub_card_findings(ctx: Context, repo_id: str) -> list[str]:
    """`moeq card verify` on the repo's README.md, against the records manifest beside it on the Hub."""
    where = f"{repo_id}/{README_NAME}"
    with hub_errors("reading the card", repo_id):
        text = remote_text(ctx.api, repo_id, README_NAME, MAX_CARD_BYTES)
        if MANIFEST_NAME not in ctx.api.list_repo_files(repo_id, revision="main"):
            return [f"{where}: no {MANIFEST_NAME} beside it on the Hub, so its lines cannot be checked"]
        manifest_text = remote_text(ctx.api, repo_id, MANIFEST_NAME, MAX_MANIFEST_BYTES)
    try:
        manifest = parse_manifest(manifest_text, f"{repo_id}/{MANIFEST_NAME}")
        template, _same = card_template(manifest, ctx.pipeline.card.template, f"{repo_id}/{MANIFEST_NAME}")
        return [f.format(where) for f in verify_card(text, manifest, template)]
    except InputError as exc:
        return [f"{where}: not checked: {exc.message}"]


def staged_files(ctx: Context, unit: RepoUnit) -> list[dict]:
    """The files the staged repo holds (path, action add, size): what a push would offer, without asking the Hub."""
    return [{"path": f.path, "action": f.action, "size": f.size}
            for f in local_files(ctx.records.require(CardRecord, unit.quant)).values()]
