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
from pathlib import Path

from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
from huggingface_hub.file_download import http_get
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import build_hf_headers

from moeq.errors import HubError
from moeq.hub.client import hub_errors
from moeq.workspace import CHUNK, commit_file, partial_path


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
                http_get(meta.location, fh, resume_size=have, headers=headers, expected_size=entry.size,
                         displayed_filename=entry.path)
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
