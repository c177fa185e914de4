"""A release across machines: each quant's build stages its files on a branch of the ladder's repo, and one publish
commit on main takes them all (moeq build --stage-to BRANCH, then moeq publish --from-branch BRANCH).

On the branch a quant's build leaves its repo files at their final paths (the GGUF or its shards, the importance
matrix, the recipe file, the license) and `.moeq-stage/QUANT.json`: the quant's records manifest, as its own card
stage made it, and the sha256 of the inputs it was built from. The publish reads those, so no GGUF byte travels
twice: within a repo the Hub stores an LFS object once, and main's commit copies it from the branch.

    staged = read_staged(api, "moeq/Phi-3.5-MoE-instruct-GGUF", "release-v1", ["Q8_0", "Q4_K_M"])
    staged.found["Q8_0"].manifest.quants[0].files[0].sha256
    staged.missing
    # -> ['Q4_K_M']
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils.sha import git_hash

from moeq import __version__
from moeq.errors import HubError, InputError, UsageError
from moeq.hub.client import hub_errors, interrupt_ends_upload, remote_text
from moeq.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, manifest_text, parse_manifest, read_manifest
from moeq.push.stage import COMMIT_ATTEMPTS, commit_retry_wait
from moeq.records import CardRecord, PushAction, PushedFile, PushRecord
from moeq.workspace import write_bytes_atomic

STAGE_DIR = ".moeq-stage"
STAGE_VERSION = 1
REGULAR_MAX = 10 << 20  # the Hub keeps a file this small in git unless it is binary
BRANCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_branch(name: str) -> str:
    """A staging branch's name: letters, digits, `.`, `_` and `-`, at most 100, not main and not a git oddity."""
    if not BRANCH_NAME.fullmatch(name) or ".." in name or name.endswith((".lock", ".")) or name == "main":
        raise UsageError(f"staging branch {name[:120]!r}", "not a branch name moeq stages to",
                         "use 1 to 100 letters, digits, '.', '_' or '-', starting with a letter or digit, not 'main' "
                         "(e.g. release-v1.2.0)")
    return name


def staged_doc_path(quant: str) -> str:
    return f"{STAGE_DIR}/{quant}.json"


def inputs_sha256(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


@dataclass
class StagedQuant:
    """One quant as its build staged it on the branch."""

    quant: str
    inputs_sha256: str
    manifest: Manifest  # its card stage's manifest: its one quant entry, the source, the license

    def repo_files(self) -> list[tuple[str, int, str]]:
        """(path, size, sha256) of each file the quant published: GGUF(s), importance matrix, recipe, license."""
        return [(f.name, f.size, f.sha256) for f in self.manifest.published_files().values()]


@dataclass
class Staged:
    """What the branch holds at `commit`: each quant found, and the quants asked for that are not there."""

    repo_id: str
    branch: str
    commit: str
    found: dict[str, StagedQuant] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def branch_head(api: HfApi, repo_id: str, branch: str) -> str | None:
    """The branch's head commit, or None when the repo or the branch is not on the Hub."""
    with hub_errors(f"reading the branch {branch}", repo_id):
        try:
            refs = api.list_repo_refs(repo_id)
        except RepositoryNotFoundError:
            return None
    return next((b.target_commit for b in refs.branches if b.name == branch), None)


def _repo_exists(api: HfApi, repo_id: str) -> bool:
    try:
        api.model_info(repo_id, files_metadata=False)
    except RepositoryNotFoundError:
        return False
    return True


def read_staged(api: HfApi, repo_id: str, branch: str, quants: list[str], commit: str | None = None) -> Staged:
    """Each of `quants` as staged on `branch` (at its head, or at `commit`), read bounded and checked: a document
    that is not one moeq wrote for that quant is an error naming it."""
    head = commit or branch_head(api, repo_id, branch)
    if head is None:
        raise InputError(repo_id, f"no branch {branch!r} on the Hub", "stage the quants on it first (moeq build "
                         f"--quant TYPE --stage-to {branch}, one run per quant). A publish deletes it once main holds "
                         "the ladder: moeq push --check says whether it does")
    staged = Staged(repo_id, branch, head)
    with hub_errors(f"reading {STAGE_DIR}/ on {branch}", repo_id):
        listed = {f.path: f for f in api.get_paths_info(repo_id, [staged_doc_path(q) for q in quants], revision=head)
                  if isinstance(f, RepoFile)}
    for quant in quants:
        entry = listed.get(staged_doc_path(quant))
        if entry is None:
            staged.missing.append(quant)
            continue
        where = f"{repo_id}@{branch}/{entry.path}"
        text = remote_text(api, repo_id, entry.path, MAX_MANIFEST_BYTES + 65536, head, size=entry.size)
        staged.found[quant] = parse_staged(text, quant, where)
    return staged


def parse_staged(text: str, quant: str, where: str) -> StagedQuant:
    redo = f"run the quant's build again (moeq build --quant {quant} --stage-to BRANCH)"
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise InputError(where, "not a staged quant moeq can read", redo) from None
    if not isinstance(data, dict) or data.get("stage_version") != STAGE_VERSION or data.get("quant") != quant:
        raise InputError(where, f"not a quant {quant} staged by this moeq (stage_version {STAGE_VERSION})", redo)
    digest, manifest = data.get("inputs_sha256"), data.get("manifest")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest) or not isinstance(manifest, dict):
        raise InputError(where, "no inputs_sha256 or manifest", redo)
    parsed = parse_manifest(json.dumps(manifest), where)
    if [q.quant for q in parsed.quants] != [quant]:
        raise InputError(where, f"its manifest holds {[q.quant for q in parsed.quants]}, not {quant} alone", redo)
    return StagedQuant(quant, digest, parsed)


def staged_doc(quant: str, inputs: dict, manifest_json: str) -> bytes:
    return (json.dumps({"stage_version": STAGE_VERSION, "quant": quant, "generator": f"moeq {__version__}",
                        "inputs_sha256": inputs_sha256(inputs), "inputs": inputs,
                        "manifest": json.loads(manifest_json)}, indent=1) + "\n").encode()


def current_on_branch(api: HfApi, repo_id: str, branch: str, quant: str, inputs: dict) -> str | None:
    """Why `quant` need not be built again (staged on the branch from the same inputs, every file there as its
    records say), or None."""
    head = branch_head(api, repo_id, branch)
    if head is None:
        return None
    staged = read_staged(api, repo_id, branch, [quant], head)
    found = staged.found.get(quant)
    if found is None or found.inputs_sha256 != inputs_sha256(inputs):
        return None
    files = found.repo_files()
    if mismatches(branch_files(api, repo_id, head, [p for p, _, _ in files]), files):
        return None
    return f"staged on {branch} from the same inputs (inputs sha256 {found.inputs_sha256[:12]})"


def branch_files(api: HfApi, repo_id: str, revision: str, paths: list[str]) -> dict[str, RepoFile]:
    """What the branch holds at `revision` of `paths`, by path (one paths-info request)."""
    with hub_errors("reading the staged files", repo_id):
        return {f.path: f for f in api.get_paths_info(repo_id, paths, revision=revision) if isinstance(f, RepoFile)}


def mismatches(there: dict[str, RepoFile], files: list[tuple[str, int, str]]) -> list[str]:
    """The files that are not on the branch as (path, size, sha256) says: missing, or an LFS file of another size or
    sha256 (a file kept in git is checked by reading it: take_from_branch)."""
    wrong = []
    for path, size, sha256 in files:
        entry = there.get(path)
        if entry is None:
            wrong.append(f"{path} (missing)")
        elif entry.lfs is not None and entry.size != size:
            wrong.append(f"{path} ({entry.size:,} bytes, the records say {size:,})")
        elif entry.lfs is not None and entry.lfs.sha256 != sha256:
            wrong.append(f"{path} (sha256 {entry.lfs.sha256[:12]}, the records say {sha256[:12]})")
    return wrong


def stage_quant(api: HfApi, card: CardRecord, quant: str, branch: str, inputs: dict, private: bool,
                on_message: Callable[[str], None] = lambda _msg: None) -> PushRecord:
    """Commit `quant`'s files and its staged document to `branch` (made from main when absent); main is untouched.
    Files the branch already holds as they are here are not sent again; nothing changed means no commit. A 429 or
    5xx on the commit is retried after comparing with the branch again, as `moeq push` does, so a commit that did
    land is never made twice."""
    folder = Path(card.folder)
    ladder = read_manifest(folder / MANIFEST_NAME)
    staged = StagedQuant(quant, inputs_sha256(inputs), ladder.model_copy(update={"quants": [ladder.entry(quant)]}))
    doc = staged_doc(quant, inputs, manifest_text(staged.manifest))
    with hub_errors("creating the repo", card.repo_id):
        existed = _repo_exists(api, card.repo_id)
        if not existed:
            api.create_repo(card.repo_id, private=private, exist_ok=True)
    with hub_errors(f"creating the branch {branch}", card.repo_id):
        api.create_branch(card.repo_id, branch=branch, exist_ok=True)
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        pushed, operations = _staging_plan(api, card, staged, doc, branch)
        if not operations:
            on_message(f"{card.repo_id}@{branch}: {quant} already staged as built here, nothing to commit")
            commit = None
            break
        with hub_errors(f"uploading to the branch {branch}", card.repo_id), interrupt_ends_upload(card.repo_id):
            api.preupload_lfs_files(card.repo_id, operations, revision=branch)
        with hub_errors(f"committing to the branch {branch}", card.repo_id):
            try:
                commit = api.create_commit(card.repo_id, operations, revision=branch,
                                           commit_message=f"Stage {quant} for the release (moeq {__version__})")
                break
            except HfHubHTTPError as exc:
                wait = commit_retry_wait(exc, attempt)
                if wait is None:
                    raise
                on_message(f"{card.repo_id}@{branch}: the Hub answered {exc.response.status_code} to the commit; "
                           f"comparing with the branch again in {wait} s")
        time.sleep(wait)
    return PushRecord(quant=None, quants=[quant], repo_id=card.repo_id, create_pr=False, repo_existed=existed,
                      commit=commit.oid if commit else None, commit_url=commit.commit_url if commit else None,
                      pr_url=None, files=pushed, branch=branch,
                      uploaded_bytes=sum(f.size for f in pushed if f.action != PushAction.UNCHANGED),
                      readme_sha256=card.readme.sha256)


def _staging_plan(api: HfApi, card: CardRecord, staged: StagedQuant, doc: bytes, branch: str
                  ) -> tuple[list[PushedFile], list[CommitOperationAdd]]:
    """What the branch lacks of the quant's files and staged document, compared with it now."""
    folder = Path(card.folder)
    files = staged.repo_files()
    with hub_errors(f"comparing with the branch {branch}", card.repo_id):
        paths = [p for p, _, _ in files] + [staged_doc_path(staged.quant)]
        there = {f.path: f for f in api.get_paths_info(card.repo_id, paths, revision=branch) if isinstance(f, RepoFile)}
    pushed, operations = [], []
    for path, size, sha in files:
        local = folder / path
        if not local.is_file():
            raise InputError(local, "missing from the staged repo", "run moeq card --config CFG")
        entry = there.get(path)
        same = entry is not None and (entry.lfs.sha256 == sha if entry.lfs
                                      else entry.blob_id == git_hash(local.read_bytes()))
        pushed.append(PushedFile(path=path, action=PushAction.UNCHANGED if same else (PushAction.UPDATE if entry else PushAction.ADD), size=size,
                                 sha256=sha))
        if not same:
            op = CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(local))
            op.upload_info.sha256 = bytes.fromhex(sha)  # from the records: no second read of the GGUF
            operations.append(op)
    doc_entry = there.get(staged_doc_path(staged.quant))
    if operations or doc_entry is None or doc_entry.blob_id != git_hash(doc):
        operations.append(CommitOperationAdd(path_in_repo=staged_doc_path(staged.quant), path_or_fileobj=doc))
    return pushed, operations


def take_from_branch(api: HfApi, card: CardRecord, limit: int = REGULAR_MAX) -> list[str]:
    """Check every file of the card's repo that is not staged here against the branch at the card's commit: an LFS
    file must have the size and sha256 the manifest says (the publish copies it on the Hub); a file kept in git
    (a license, a recipe text) is downloaded into the staged folder, at most `limit` bytes, and checked by sha256.
    Returns the files downloaded."""
    folder = Path(card.folder)
    known = read_manifest(folder / MANIFEST_NAME).published_files()
    away = [known[name] for name in card.repo_files if not (folder / name).is_file() and name in known]
    where = f"{card.repo_id}@{card.from_branch}"
    there = branch_files(api, card.repo_id, card.from_commit, [f.name for f in away])
    wrong = mismatches(there, [(f.name, f.size, f.sha256) for f in away])
    if wrong:
        raise HubError(where, f"{'; '.join(wrong[:3])} not as the staged records say", "stage the quant again")
    taken = []
    for ref in away:
        if there[ref.name].lfs is not None:
            continue
        if ref.size > limit:
            raise HubError(f"{where}/{ref.name}", f"{ref.size:,} bytes in git, more than the {limit:,} moeq reads",
                           "stage the quant again")
        with tempfile.TemporaryDirectory() as tmp, hub_errors(f"reading {ref.name}", card.repo_id):
            got = Path(api.hf_hub_download(card.repo_id, ref.name, revision=card.from_commit, local_dir=tmp))
            data = got.read_bytes()[: limit + 1]
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise HubError(f"{where}/{ref.name}", f"its sha256 is not the {ref.sha256[:12]} the staged records say",
                           "stage the quant again")
        write_bytes_atomic(folder / ref.name, data)
        taken.append(ref.name)
    return taken


def delete_branch(api: HfApi, repo_id: str, branch: str) -> None:
    with hub_errors(f"deleting the branch {branch}", repo_id):
        api.delete_branch(repo_id, branch=branch)
