"""Downloads from the Hub that resume across runs and are checked against what the Hub says of the file.

huggingface_hub's own downloads start over when a process is killed (each try writes a fresh
temporary file); for tens of GB that is not acceptable. So moeq keeps `NAME.partial` in the
workspace and asks the client's `http_get` to continue it with a Range request. The finished file
must have the sha256 the Hub reports (LFS files) or its git blob id (small files); a mismatch is
deleted and reported.

    entry = api.get_paths_info(repo, ["model-F16.gguf"], revision=sha)[0]
    download_verified(api, repo, sha, entry, Path("work/source/model-F16.gguf"))
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Callable

from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
from huggingface_hub.file_download import http_get
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import build_hf_headers

from moeq.errors import HubError
from moeq.hub.client import hub_errors
from moeq.units import decimal_size
from moeq.workspace import CHUNK, commit_file, inside, partial_path


SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def resolve_commit(api: HfApi, repo: str, revision: str | None, key: str, pipeline: Path,
                   on_message: Callable[[str], None]) -> str:
    """The commit `revision` (default main) of `repo` names now; a revision that is no commit sha is warned of,
    naming the pipeline's `key` that gives it. Only a sha is accepted from the Hub: it names download folders."""
    if SHA_RE.match(revision or ""):
        return revision
    with hub_errors("resolving the revision", repo):
        commit = api.model_info(repo, revision=revision or "main").sha
    if not SHA_RE.match(str(commit)):
        raise HubError(repo, f"the Hub gave {str(commit)[:80]!r} as the commit of {revision or 'main'!r}, which is "
                       "not a commit sha", "check HF_ENDPOINT")
    on_message(f"warning: {key} {revision or 'main'!r} is not a commit sha; using {commit}, its commit now. Pin it "
               f"in {pipeline} for a reproducible release")
    return commit


def _digest(path: Path, lfs: bool) -> str:
    """sha256 for LFS files; the git blob sha1 for small files (what the Hub calls their oid)."""
    size = path.stat().st_size
    digest = hashlib.sha256() if lfs else hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_verified(api: HfApi, repo_id: str, commit: str, entry: RepoFile, dest: Path) -> str:
    """Fetch `entry` of `repo_id` at `commit` into `dest` (resuming `dest.partial`); return its sha256."""
    expected = entry.lfs.sha256 if entry.lfs else entry.blob_id
    if dest.is_file() and dest.stat().st_size == entry.size and _digest(dest, entry.lfs is not None) == expected:
        return expected if entry.lfs else _digest(dest, True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(dest)
    have = partial.stat().st_size if partial.is_file() else 0
    if have > entry.size:
        partial.unlink()
        have = 0
    url = hf_hub_url(repo_id, entry.path, revision=commit, endpoint=api.endpoint)
    headers = build_hf_headers(token=api.token)
    with hub_errors(f"downloading {entry.path}", repo_id):
        if have < entry.size:
            meta = get_hf_file_metadata(url, token=api.token)
            with open(partial, "r+b" if have else "wb") as fh:
                fh.seek(have)
                try:
                    http_get(meta.location, fh, resume_size=have, headers=headers, expected_size=entry.size,
                             displayed_filename=entry.path)
                except OSError as exc:
                    if exc.errno is not None:  # the disk's (full, read-only): the workspace's to fix
                        raise
                    # the client's size check: the body ended short of the size the Hub lists, even resumed
                    raise HubError(f"{repo_id}/{entry.path}@{commit[:12]}",
                                   f"the download ended at {fh.tell():,} of the {entry.size:,} bytes the Hub lists",
                                   f"run the command again: it resumes from {partial.name}") from None
                fh.truncate()
    got = _digest(partial, entry.lfs is not None)
    if got != expected:
        partial.unlink()
        kind = "sha256" if entry.lfs else "git blob id"
        raise HubError(f"{repo_id}/{entry.path}@{commit[:12]}",
                       f"downloaded {kind} {got} is not the {expected} the Hub reports",
                       "the file was deleted, run the command again")
    commit_file(partial, dest)
    return expected if entry.lfs else _digest(dest, True)


def listed_files(api: HfApi, repo: str, commit: str, names: list[str], fix: str) -> list[RepoFile]:
    """What the Hub says of each file `names` lists at `commit` (size, LFS sha256); a missing one is refused with
    `fix`."""
    with hub_errors("listing files", repo):
        found = {e.path: e for e in api.get_paths_info(repo, names, revision=commit) if isinstance(e, RepoFile)}
    missing = [n for n in names if n not in found]
    if missing:
        raise HubError(f"{repo}@{commit[:12]}", f"no file {missing[0]}", fix)
    return [found[n] for n in names]


def download_all(api: HfApi, repo: str, commit: str, entries: list[RepoFile], folder: Path,
                 on_message: Callable[[str], None]) -> list[dict]:
    """Each listed file into `folder` (every target checked before any byte): name, size and sha256 of each."""
    targets = [download_target(repo, commit, entry, folder) for entry in entries]
    files = []
    for entry, target in zip(entries, targets):
        on_message(f"{repo}: {entry.path} ({decimal_size(entry.size)})")
        sha = download_verified(api, repo, commit, entry, target)
        files.append({"name": entry.path, "size": entry.size, "sha256": sha})
    return files


def download_target(repo: str, commit: str, entry: RepoFile, folder: Path) -> Path:
    """Where a listed file is downloaded to: inside `folder`, or the listing is refused (a hostile Hub or mirror)."""
    target = inside(folder, entry.path)
    if target is None or not isinstance(entry.size, int) or entry.size < 0:
        raise HubError(f"{repo}@{commit[:12]}",
                       f"the Hub lists {entry.path[:200]!r}, which is not a file inside the download folder {folder}",
                       f"nothing was downloaded. Check the repo {repo} and HF_ENDPOINT")
    return target
