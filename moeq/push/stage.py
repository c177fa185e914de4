"""The push stage: a staged repo folder -> its Hub repo, in one commit, only what changed.

Plan first, against the head commit of main: each file of the staged folder (the GGUFs or their shards, the
importance matrix, README.md, moeq-manifest.json, the charts) is compared by sha256 with the Hub: add, update
or unchanged. A file on the Hub the folder no longer holds is deleted only when moeq published it (the manifest
on the Hub lists it); any other file is kept, unless `prune` says to delete it too. A file moeq published for a
quant of the ladder that this workspace's card leaves out (a fresh workspace that built one quant) is refused:
its card would drop that quant. The commit names the head it was planned against (`parent_commit`), so a push
planned before another landed fails instead of overwriting it.
One commit (or pull request) carries all changes, so a card never goes live without its files;
nothing changed means no commit and no upload. The stage has no key: the Hub is what it compares with.

In the ladder's one repo (hub.layout single) a push asked for some quants changes only their files and the
repo's own (README.md, the manifest, the charts, the importance matrix); any other difference is refused,
naming the file. A push
into a repo of the other layout (per the Hub's manifest or this workspace's push records) is refused
unless `switch_layout` is given.

    plan = plan_push(api, card, ladder=["Q8_0", "Q4_K_M"])       # a dry run: read requests only
    result = run_stage(push_stage(pipeline, None, ["Q8_0"], api, records), records)
    result.status, result.record.commit_url
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from huggingface_hub import CommitOperationAdd, CommitOperationCopy, CommitOperationDelete, HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils.sha import git_hash

from moeq import __version__
from moeq.config import Layout, Pipeline
from moeq.errors import HubError, InputError, MoeqError
from moeq.hub.client import hub_errors, interrupt_ends_upload, max_wait_s, remote_text, require_token
from moeq.manifest import (MANIFEST_NAME, MANIFEST_VERSION, MARKER, MAX_CARD_BYTES, MAX_MANIFEST_BYTES, README_NAME,
                           Manifest, parse_manifest, read_manifest)
from moeq.record_store import Records
from moeq.records import CardRecord, PushAction, PushedFile, PushRecord
from moeq.stage_runner import Stage, Status
from moeq.units import decimal_size

RETRY_STATUSES = (429, 500, 502, 503, 504)
MOVED_ON = 412  # the Hub's answer to a commit whose parent_commit is no longer the branch's head
HUB_OWN = (".gitattributes", README_NAME)  # the Hub's and the card's: replaced, never deleted
COMMIT_ATTEMPTS = 4


@dataclass
class PlannedFile:
    path: str
    action: PushAction
    size: int
    sha256: str | None = None
    local: str | None = None


@dataclass
class PushPlan:
    repo_id: str
    repo_exists: bool
    files: list[PlannedFile] = field(default_factory=list)
    foreign_readme: bool = False
    remote_layout: str | None = None  # as the manifest on the Hub says (a version 2 manifest: per-quant)
    older_manifest: str | None = None  # why the manifest on the Hub cannot be read (an older moeq's): its files are kept
    head: str | None = None  # the commit of main the plan was made against: the commit's parent

    @property
    def changes(self) -> list[PlannedFile]:
        return [f for f in self.files if f.action not in (PushAction.UNCHANGED, PushAction.KEPT, PushAction.SUPERSEDED)]

    @property
    def upload_bytes(self) -> int:
        """The bytes the push uploads: a file copied from a staging branch is on the Hub already."""
        return sum(f.size for f in self.files if f.action in (PushAction.ADD, PushAction.UPDATE) and f.local is not None)

    def pushed_files(self) -> list[PushedFile]:
        """Each file's path, action, size and sha256, as the push record keeps them (no local paths)."""
        return [PushedFile(path=f.path, action=f.action, size=f.size, sha256=f.sha256) for f in self.files]


def staged_manifest(card: CardRecord) -> Manifest:
    """The records manifest the card stage staged beside the card, read once per command (by its sha256)."""
    return _staged_manifest(card.folder, card.manifest.sha256)


@functools.lru_cache(maxsize=16)
def _staged_manifest(folder: str, sha256: str) -> Manifest:
    return read_manifest(Path(folder) / MANIFEST_NAME)


def local_files(card: CardRecord) -> dict[str, PlannedFile]:
    """The staged folder as the card stage left it, with sha256 from its records (no re-hashing of GGUFs). A card
    moeq publish made from a staging branch has its LFS files there, not here (`local` None)."""
    folder = Path(card.folder)
    known = {**staged_manifest(card).published_files(), README_NAME: card.readme,
             MANIFEST_NAME: card.manifest}
    files = {}
    for name in card.repo_files:
        path = folder / name
        if not path.is_file():
            if card.from_branch and name in known:
                files[name] = PlannedFile(name, PushAction.ADD, known[name].size, known[name].sha256)
                continue
            raise InputError(path, "missing from the staged repo",
                             f"run moeq card --config CFG{' --quant ' + card.quant if card.quant else ''}")
        # a chart: small, drawn by moeq card, hashed here
        sha = known[name].sha256 if name in known else hashlib.sha256(path.read_bytes()).hexdigest()
        files[name] = PlannedFile(name, PushAction.ADD, path.stat().st_size, sha, str(path))
    if hashlib.sha256((folder / README_NAME).read_bytes()).hexdigest() != card.readme.sha256:
        raise InputError(folder / README_NAME, "changed since moeq card wrote it", "run moeq card again")
    return files


def plan_push(api: HfApi, card: CardRecord, ladder: list[str] | None = None, prune: bool = False) -> PushPlan:
    """Compare the staged folder with the head of the repo's main branch (read requests only).

    `ladder`: the pipeline's quants (a published file of one the card leaves out is refused, not deleted);
    `prune`: delete files on the Hub that moeq did not publish, too."""
    local = local_files(card)
    plan = PushPlan(card.repo_id, repo_exists=True)
    try:
        info = api.model_info(card.repo_id, revision="main", files_metadata=False)
    except RepositoryNotFoundError:
        plan.repo_exists = False
        plan.files = list(local.values())
        return plan
    plan.head = info.sha
    remote_paths = {s.rfilename for s in info.siblings or []}
    remote = {f.path: f for f in api.get_paths_info(card.repo_id, sorted(local), revision=plan.head)
              if isinstance(f, RepoFile)}
    for name, planned in local.items():
        there = remote.get(name)
        if there is not None:
            if there.lfs is not None:
                same = there.lfs.sha256 == planned.sha256
            elif planned.local is None:  # on the staging branch as an LFS file, in git here
                same = False
            else:
                same = there.blob_id == git_hash(Path(planned.local).read_bytes())
            planned.action = PushAction.UNCHANGED if same else PushAction.UPDATE
        plan.files.append(planned)
    published, plan.remote_layout, plan.older_manifest = _published(api, card.repo_id, plan.head,
                                                                      remote.get(MANIFEST_NAME))
    superseded = {s.name for s in staged_manifest(card).superseded}
    for path in sorted(remote_paths - set(local) - set(HUB_OWN)):
        if path in superseded and path in published:  # the card lists it as superseded; --prune made none
            plan.files.append(PlannedFile(path, PushAction.SUPERSEDED, 0))
            continue
        if path not in published:
            plan.files.append(PlannedFile(path, PushAction.DELETE if prune else PushAction.KEPT, 0))
            continue
        quant = published[path]
        if quant is not None and quant not in card.quants and quant in (ladder or []):
            raise InputError(card.repo_id, f"holds {path}, the {quant} that moeq published, but the card staged in "
                             f"{card.folder} leaves {quant} out, so pushing it would drop {quant} from the repo",
                             f"build {quant} in this workspace too (moeq build --quant {quant} ...)")
        plan.files.append(PlannedFile(path, PushAction.DELETE, 0))
    if README_NAME in remote and local[README_NAME].action == PushAction.UPDATE:
        plan.foreign_readme = MARKER not in remote_text(api, card.repo_id, README_NAME, MAX_CARD_BYTES, plan.head)
    return plan


def _published(api: HfApi, repo_id: str, head: str,
               manifest: RepoFile | None) -> tuple[dict[str, str | None], str | None, str | None]:
    """What the manifest on the Hub says moeq published (each file with its quant; None: the repo's own file), the
    layout it names, and why it cannot be read. No manifest, or one this moeq cannot read (an older moeq's), means
    nothing on the Hub is known to be moeq's: the push keeps those files, and says why."""
    if manifest is None:
        return {}, None, None
    text = remote_text(api, repo_id, MANIFEST_NAME, MAX_MANIFEST_BYTES, head, size=manifest.size)
    try:
        theirs = parse_manifest(text, f"{repo_id}/{MANIFEST_NAME}")
    except MoeqError:
        return {}, *_unreadable(text)
    owners: dict[str, str | None] = dict.fromkeys(theirs.repo_files)
    owners.update({f.name: q.quant for q in theirs.quants for f in q.files})
    owners.update({s.name: None for s in theirs.superseded})  # moeq's; deleted once no card lists it
    owners[MANIFEST_NAME] = None
    return owners, theirs.layout, None


def _unreadable(manifest_text: str) -> tuple[str | None, str]:
    """A manifest this moeq cannot read: the layout it names (an older one without it: per-quant), and why."""
    try:
        data = json.loads(manifest_text)
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        return None, "not a records manifest this moeq can read"
    version = data.get("manifest_version")
    why = (f"of manifest version {version}, an older moeq's (this one reads {MANIFEST_VERSION})"
           if isinstance(version, int) and not isinstance(version, bool) else "not a records manifest this moeq can read")
    return data.get("layout", Layout.PER_QUANT), why


def _commit_message(card: CardRecord, head: str | None) -> tuple[str, str]:
    """The title, and a description that tells what this release changed (its update note, made against `head`)."""
    manifest = staged_manifest(card)
    commit = manifest.quants[0].records.quantize.tool.commit
    note = manifest.updates[-1] if manifest.updates and manifest.updates[-1].since == head else None
    changed = "".join(f"\n- {line}" for line in note.lines()) if note else ""
    return (f"{', '.join(card.quants)} GGUF, card and records (moeq {__version__}, llama.cpp {commit})",
            (f"Changes since {head[:12]}:{changed}\n\n" if changed and head else "")
            + f"Published by moeq {__version__} from the records in {MANIFEST_NAME}.")


def check_staged(pipeline: Pipeline, quant: str | None, card: CardRecord) -> None:
    expected = pipeline.hub.repo if quant is None else pipeline.repo_id(pipeline.quant(quant))
    if card.repo_id != expected:
        raise InputError(card.folder, f"staged for {card.repo_id}, but the pipeline now says {expected}",
                         "run moeq card again")


def planned(api: HfApi, pipeline: Pipeline, selected: list[str], records: Records, card: CardRecord, replace_card: bool,
            switch_layout: bool = False, prune: bool = False) -> PushPlan:
    """The push plan; a README.md on the Hub that moeq did not write is replaced only with `replace_card`, a file moeq
    did not publish is deleted only with `prune`."""
    _check_layout_switch(pipeline, records, switch_layout)
    with hub_errors("planning the push", card.repo_id):
        plan = plan_push(api, card, [q.type for q in pipeline.quants], prune)
    if plan.foreign_readme and not replace_card:
        raise HubError(card.repo_id, "README.md on the Hub was not written by moeq",
                       "pass --replace-card to replace it")
    layout = pipeline.hub.layout
    if plan.remote_layout not in (None, layout) and not switch_layout:
        raise HubError(card.repo_id,
                       f"its manifest on the Hub says hub.layout {plan.remote_layout}, the pipeline says {layout}",
                       f"pass --switch-layout to publish it as {layout}")
    if card.quant is None:
        _only_selected(plan, card, selected)
    return plan


def plan_line(plan: PushPlan) -> str:
    """The plan in one line, said before anything is sent: what each file gets and the bytes to upload."""
    counts = {action: sum(f.action == action for f in plan.changes)
              for action in (PushAction.ADD, PushAction.UPDATE, PushAction.DELETE)}
    done = ", ".join(f"{n} to {action.value}" for action, n in counts.items() if n)
    return f"{plan.repo_id}: pushing {done} in one commit ({decimal_size(plan.upload_bytes)} to upload)"


def plan_notes(plan: PushPlan) -> list[str]:
    """What a push plan keeps that the user should know of."""
    kept = [f.path for f in plan.files if f.action == PushAction.KEPT]
    if plan.older_manifest is None or not kept:
        return []
    return [f"{plan.repo_id}: its {MANIFEST_NAME} on the Hub is {plan.older_manifest}, so this moeq cannot tell which "
            f"files it published: {len(kept)} file{'s' if len(kept) != 1 else ''} the new card does not list "
            f"{'are' if len(kept) != 1 else 'is'} kept ({', '.join(kept[:5])}{', ...' if len(kept) > 5 else ''}); "
            "push --prune deletes them"]


def _check_layout_switch(pipeline: Pipeline, records: Records, switch_layout: bool) -> None:
    """Refuse to publish in one layout what this workspace already published in the other."""
    if switch_layout:
        return
    if pipeline.single_repo:
        other = sorted({r.repo_id for q in pipeline.quants if (r := records.get(PushRecord, q.type)) is not None})
    else:
        other = [r.repo_id for r in [records.get(PushRecord)] if r is not None]
    if other:
        was = Layout.PER_QUANT if pipeline.single_repo else Layout.SINGLE
        raise InputError(records.ws.records_dir, f"this workspace published {', '.join(other)} with hub.layout {was}, "
                         f"and the pipeline now says {pipeline.hub.layout}",
                         "pass --switch-layout to publish in the new layout (the old repos are left as they are)")


def _only_selected(plan: PushPlan, card: CardRecord, selected: list[str]) -> None:
    """In the ladder's one repo, a push asked for some quants changes only their files and the repo's own (README.md,
    the manifest, the charts, the importance matrix); the other quants' files must already be on the Hub as staged."""
    if set(card.quants) <= set(selected):
        return
    manifest = staged_manifest(card)
    others = {f.name: q.quant for q in manifest.quants if q.quant not in selected for f in q.files}
    for f in plan.changes:
        if f.path in others:
            quant = others[f.path]
            raise InputError(card.repo_id, f"{f.path} of {quant} is not on the Hub as staged ({f.action})",
                             f"push {quant} too (--quant {quant}) or the whole ladder (moeq push without --quant)")
        if f.path not in card.repo_files:
            raise InputError(card.repo_id, f"holds {f.path}, which the staged card does not list",
                             "push the whole ladder (moeq push without --quant) to delete it, or build its quant and "
                             "push it")


def push_stage(pipeline: Pipeline, card: CardRecord, selected: list[str], api: HfApi, records: Records, *,
               create_pr: bool | None = None, replace_card: bool = False, switch_layout: bool = False, prune: bool = False,
               on_message: Callable[[str], None] = lambda _msg: None) -> Stage[PushRecord]:
    """Publish the repo `card` staged (for a quant, or for the ladder's one repo) in one commit (or pull request);
    `selected`: the quants asked for."""
    quant = card.quant
    check_staged(pipeline, quant, card)
    create_pr = pipeline.hub.create_pr if create_pr is None else create_pr
    require_token()

    def run() -> PushRecord:
        plan = planned(api, pipeline, selected, records, card, replace_card, switch_layout, prune)
        for note in plan_notes(plan):
            on_message(note)
        for f in plan.files:
            if f.action == PushAction.KEPT:
                on_message(f"{card.repo_id}: kept {f.path}, which moeq did not publish (push --prune deletes it)")
            elif f.action == PushAction.SUPERSEDED:
                on_message(f"{card.repo_id}: kept {f.path}, superseded under another name; the card says so "
                           "(push --prune deletes it)")
        if plan.changes:
            on_message(plan_line(plan))
        with hub_errors("creating the repo", card.repo_id):
            if not plan.repo_exists:
                api.create_repo(card.repo_id, private=pipeline.hub.private, exist_ok=True)
        commit = _commit_with_retries(api, card, plan, create_pr, on_message,
                                      lambda: plan_push(api, card, [q.type for q in pipeline.quants], prune))
        head = None if create_pr else (commit.oid if commit else plan.head)
        return PushRecord(
            quant=quant, quants=list(card.quants), repo_id=card.repo_id, create_pr=create_pr,
            repo_existed=plan.repo_exists, commit=commit.oid if commit else None,
            commit_url=commit.commit_url if commit else None, pr_url=commit.pr_url if commit else None,
            files=plan.pushed_files(),
            uploaded_bytes=plan.upload_bytes if commit else 0, readme_sha256=card.readme.sha256,
            manifest_sha256=card.manifest.sha256, head=head,
        )

    return Stage("push", quant, key=lambda: None, run=run, lock=f"repo-{quant or 'ladder'}",
                 status=lambda r: Status.UP_TO_DATE if r.commit is None else Status.RAN)


def _commit_with_retries(api: HfApi, card: CardRecord, plan: PushPlan, create_pr: bool,
                         on_message: Callable[[str], None], replan: Callable[[], PushPlan]):
    """One commit of the plan's changes. The client retries uploads itself but not the commit call: a 429/5xx
    there is retried here after planning again, so a commit that did land is never made twice."""
    summary, description = _commit_message(card, plan.head)
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        if not plan.changes:
            on_message(f"{card.repo_id}: up to date, nothing to commit")
            return None
        operations = []
        for f in plan.changes:
            if f.action == PushAction.DELETE:
                operations.append(CommitOperationDelete(path_in_repo=f.path))
                continue
            if f.local is None:  # stored on the Hub already: main's commit takes it from the staging branch
                operations.append(CommitOperationCopy(src_path_in_repo=f.path, path_in_repo=f.path,
                                                      src_revision=card.from_commit))
                continue
            op = CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=f.local)
            op.upload_info.sha256 = bytes.fromhex(f.sha256)  # known from the records: no second read of the GGUF
            operations.append(op)
        additions = [op for op in operations if isinstance(op, CommitOperationAdd)]
        with hub_errors("uploading", card.repo_id), interrupt_ends_upload(card.repo_id):
            api.preupload_lfs_files(card.repo_id, additions, revision="main", create_pr=create_pr)
        with hub_errors("committing", card.repo_id):
            try:
                return api.create_commit(card.repo_id, operations, commit_message=summary,
                                         commit_description=description, revision="main", create_pr=create_pr,
                                         parent_commit=plan.head)
            except HfHubHTTPError as exc:
                status = exc.response.status_code if exc.response is not None else None
                if status == MOVED_ON:
                    raise HubError(card.repo_id, "main moved on since this push was planned against "
                                   f"{(plan.head or '')[:12]} (another push landed)",
                                   "nothing was committed, run the push again to plan it against the new "
                                   "head") from None
                wait = commit_retry_wait(exc, attempt)
                if wait is None:
                    raise
                on_message(f"{card.repo_id}: the Hub answered {status} to the commit; planning again in {wait} s")
        time.sleep(wait)
        with hub_errors("planning the push again", card.repo_id):
            fresh = replan()
        plan.files, plan.head = fresh.files, fresh.head
    return None


def commit_retry_wait(exc: HfHubHTTPError, attempt: int) -> int | None:
    """The seconds to wait before planning commit attempt `attempt` + 1 after the Hub answered `exc` (a 429 or 5xx,
    attempts left); None: not retried."""
    status = exc.response.status_code if exc.response is not None else None
    if status not in RETRY_STATUSES or attempt == COMMIT_ATTEMPTS:
        return None
    return min(_retry_after(exc) or 2 ** (attempt - 1), max_wait_s())


def _retry_after(exc: HfHubHTTPError) -> int | None:
    value = exc.response.headers.get("Retry-After") if exc.response is not None else None
    return int(value) if value and value.isascii() and value.isdigit() else None
