"""Where artifacts live, how they are written whole, hashed once, and locked.

    workspace/
      source/<stem>-F16.gguf         the F16 model every quant is made from
      quants/<file>                  one GGUF per quant, with <file>.log beside it
      records/<stage>-<quant>.json   what each stage did, with the key it ran with (records.py, stage_runner.py)
      repos/<quant>/, repos/ladder/  the staged Hub repo (per quant, or the ladder's one): README.md, the GGUFs
                                     (hard links), the importance matrix, the manifest
      locks/<artifact>.lock          one writer per artifact
      bench/<quant>/, bench/base/    bench logs; the F16 logits for KL divergence
      shards/<quant>/                llama-gguf-split shards of a quant over hub.max_shard_size
      previews/<quant>.html          `moeq card preview`
      sha256-cache.sqlite            sha256 by (path, size, mtime, inode), safe for concurrent processes
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import os
import shutil
import sqlite3
import stat
import threading
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

from moeq.errors import InputError, MoeqError, ResourceError

CHUNK = 8 * 1024 * 1024
DISK_MARGIN = 1.10  # headroom over an estimate: logs, records, filesystem overhead, an estimate's error
DISK_SLACK = 64 * 2**20


class Workspace:
    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def source_dir(self) -> Path:
        return self.root / "source"

    @property
    def quants_dir(self) -> Path:
        return self.root / "quants"

    @property
    def records_dir(self) -> Path:
        return self.root / "records"

    @property
    def repos_dir(self) -> Path:
        return self.root / "repos"

    def repo_dir(self, quant: str | None) -> Path:
        """A quant's staged repo (hub.layout per-quant), or the ladder's one repo (quant None)."""
        return self.repos_dir / (quant or "ladder")

    def bench_dir(self, quant: str) -> Path:
        """Each bench run's full log; `base` holds the F16 logits every quant's KL divergence is measured against."""
        return self.root / "bench" / quant

    def choice_dir(self, quant: str) -> Path:
        """The choice stage's candidates of a quant (one folder each, deleted once chosen) and their logs."""
        return self.root / "choice" / quant

    def compare_dir(self, peer: str) -> Path:
        """A compared file's download (deleted once measured) and its tools' logs."""
        return self.root / "compare" / peer

    def shards_dir(self, quant: str) -> Path:
        return self.root / "shards" / quant

    def pushed_manifest(self, quant: str | None) -> Path:
        """The manifest the last push to a repo published (its push record names its sha256): the repo as this
        workspace left it, which a card made without reading the Hub compares with."""
        return self.root / "pushed" / f"{quant or 'ladder'}.json"

    def preview_path(self, quant: str) -> Path:
        return self.root / "previews" / f"{quant}.html"

    @functools.cached_property
    def hashes(self) -> "HashCache":
        """The workspace's one sha256 cache."""
        return HashCache(self.root / "sha256-cache.sqlite")

    def source_path(self, file_stem: str) -> Path:
        return self.source_dir / f"{file_stem}-F16.gguf"

    def quant_path(self, file: str) -> Path:
        return self.quants_dir / file

    def record_path(self, stage: str, quant: str | None = None) -> Path:
        return self.records_dir / (f"{stage}-{quant}.json" if quant else f"{stage}.json")

    def ensure(self) -> None:
        for folder in (self.source_dir, self.quants_dir, self.records_dir, self.root / "locks"):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ResourceError(self.root, f"cannot make the workspace here ({exc.strerror})",
                                    "point workspace in the pipeline file at a writable folder") from None

    @contextlib.contextmanager
    def lock(self, artifact: str, on_wait: Callable[[str], None] | None = None,
             wait: bool = True) -> Iterator[None]:
        """Hold the artifact's lock; a second moeq waits (after telling on_wait) or refuses."""
        self.ensure()
        path = self.root / "locks" / f"{artifact}.lock"
        with open(path, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                holder = path.read_text().strip() or "another moeq process"
                if not wait:
                    raise ResourceError(artifact, f"being written by {holder}", "wait for it or stop it") from None
                if on_wait:
                    on_wait(f"{artifact}: waiting for {holder} to finish")
                fcntl.flock(fh, fcntl.LOCK_EX)
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()}\n")
            fh.flush()
            try:
                yield
            finally:
                fh.seek(0)
                fh.truncate()
                fcntl.flock(fh, fcntl.LOCK_UN)


def partial_path(final: Path) -> Path:
    return final.with_name(final.name + ".partial")


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def commit_file(partial: Path, final: Path, synced: bool = False) -> None:
    """fsync the finished partial file (unless the caller did) and rename it into place."""
    if not synced:
        fsync_file(partial)
    os.replace(partial, final)
    with contextlib.suppress(OSError):
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def partial_file(final: Path, synced: bool = False) -> Iterator[Path]:
    """The partial-file protocol, written once: the block writes `FINAL.partial` (one left by a killed run is
    removed first); when the block ends it is fsynced (unless `synced`: the block did) and renamed to `final`; on any
    exception it is removed, and `final` is as it was.

        with partial_file(out) as partial:
            partial.write_bytes(data)
    """
    partial = partial_path(final)
    partial.unlink(missing_ok=True)
    try:
        yield partial
        commit_file(partial, final, synced=synced)
    finally:
        partial.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """The one writer of text artifacts: whole under the final name, or nothing (no partial left behind)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """The same for bytes (a chart's PNG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with partial_file(path) as partial:
            partial.write_bytes(data)
    except OSError as exc:
        if exc.filename is None:  # a write that failed (a full disk) names no file: name the one being written
            exc.filename = str(path)
        raise


def write_json_atomic(path: Path, data: object, indent: int = 2) -> None:
    """The one writer of JSON artifacts (records, caches, stamps): whole or nothing, like write_text_atomic."""
    write_text_atomic(path, json.dumps(data, indent=indent) + "\n")


def read_text_limited(path: Path, limit: int, what: str, error: type[MoeqError] = InputError) -> str:
    """The UTF-8 text of a regular file of at most `limit` bytes, else `error` naming it.

    /dev/zero, a FIFO or a huge file is refused before anything is read into memory."""
    path = Path(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise error(path, "not a regular file", f"pass the path of a {what}")
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except FileNotFoundError:
        raise error(path, "no such file", f"pass the path of a {what}") from None
    except IsADirectoryError:
        raise error(path, "a folder", f"pass the path of a {what}") from None
    except OSError as exc:
        raise error(path, f"cannot read the {what} ({exc.strerror or exc.__class__.__name__})",
                    "check its permissions") from None
    if len(data) > limit:
        raise error(path, f"larger than {limit // 1024} KiB, the most moeq reads for a {what}",
                    f"pass a smaller {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise error(path, "not UTF-8 text", f"pass the path of a {what}") from None


def inside(folder: Path, relative: str) -> Path | None:
    """`folder / relative` when that path names something inside `folder`, else None.

    Refused: an empty or absolute path, a `..` part, a backslash or NUL. Every path that comes from outside
    (a Hub listing, a record) goes through here before moeq writes or reads there. The check is of the
    text: links the user made inside the folder (a workspace's quants/ on another disk) are theirs."""
    if not isinstance(relative, str) or not relative or "\\" in relative or "\0" in relative:
        return None
    rel = PurePosixPath(relative)
    if rel.is_absolute() or ".." in rel.parts:
        return None
    return Path(folder) / rel


def disk_needed(estimate: int | float) -> int:
    """The one rule for how much free space an artifact of about `estimate` bytes needs."""
    return int(estimate * DISK_MARGIN) + DISK_SLACK


def require_free(folder: Path, estimate: int | float, what: str) -> None:
    """Refuse to start writing `what` (about `estimate` bytes) into `folder` when the disk cannot hold it."""
    from moeq.units import decimal_size

    need, free = disk_needed(estimate), free_bytes(folder)
    if free < need:
        raise ResourceError(folder, f"{decimal_size(free)} free, {what} needs about {decimal_size(need)}",
                            "free some space or move the workspace")


def free_bytes(path: Path) -> int:
    """Free space on the filesystem that holds `path` (or its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


# ---------------------------------------------------------------- sha256


def sha256_file(path: Path, stop: threading.Event | None = None) -> str:
    """sha256 of a file; `stop` lets an interrupted stage end a long hash early."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            if stop is not None and stop.is_set():
                raise InterruptedError(f"hashing {path} stopped")
            digest.update(chunk)
    return digest.hexdigest()


class HashCache:
    """sha256 of files keyed by (path, size, mtime_ns, inode), so unchanged files are hashed once.

    Kept in SQLite: each moeq process adds and reads rows in its own transactions, so two processes
    working on different quants of one workspace never drop each other's hashes.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection | None]:
        """One transaction on the cache, or None when it cannot be used (a full disk): a cache only saves work."""
        conn = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=60)
            conn.execute("CREATE TABLE IF NOT EXISTS sha256 (path TEXT PRIMARY KEY, size INTEGER, "
                         "mtime_ns INTEGER, inode INTEGER, sha256 TEXT)")
            conn.commit()
        except (sqlite3.Error, OSError):
            if conn is not None:
                conn.close()
            yield None
            return
        try:
            with conn:  # committed on success, rolled back on an error
                yield conn
        except sqlite3.Error:
            pass  # not remembered: the next run hashes the file again
        finally:
            conn.close()

    @staticmethod
    def _key(path: Path) -> tuple[str, tuple[int, int, int]]:
        st = os.stat(path)
        return str(Path(path).resolve()), (st.st_size, st.st_mtime_ns, st.st_ino)

    def lookup(self, path: Path) -> str | None:
        key, stamp = self._key(path)
        row = None
        with self._db() as db:
            if db is not None:
                row = db.execute("SELECT size, mtime_ns, inode, sha256 FROM sha256 WHERE path = ?", (key,)).fetchone()
        return row[3] if row and tuple(row[:3]) == stamp else None

    def remember(self, path: Path, sha256: str) -> None:
        key, stamp = self._key(path)
        with self._db() as db:
            if db is not None:
                db.execute("INSERT OR REPLACE INTO sha256 VALUES (?, ?, ?, ?, ?)", (key, *stamp, sha256))

    def sha256(self, path: Path, stop: threading.Event | None = None) -> str:
        cached = self.lookup(path)
        if cached:
            return cached
        digest = sha256_file(path, stop)
        self.remember(path, digest)
        return digest
