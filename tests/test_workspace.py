"""The workspace's sha256 cache: shared by moeq processes working on one workspace at once."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moeq.workspace import HashCache, sha256_file

from conftest import REPO, pipeline_file

WORKER = """
import sys
from pathlib import Path
from moeq.workspace import HashCache
cache = HashCache(Path(sys.argv[1]))
for name in sys.argv[2:]:
    cache.sha256(Path(name))
"""


def _files(folder, prefix: str, n: int):
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{prefix}-{i}.bin"
        path.write_bytes(f"{prefix} {i}".encode() * 1000)
        paths.append(path)
    return paths


def test_two_caches_open_at_once_keep_each_others_hashes(tmp_path):
    """Two processes each load the cache, then each remembers its own file: both hashes survive."""
    db = tmp_path / "ws" / "sha256-cache.sqlite"
    first, second = HashCache(db), HashCache(db)
    a, b = _files(tmp_path / "files", "a", 1)[0], _files(tmp_path / "files", "b", 1)[0]
    first.sha256(a)
    second.sha256(b)
    fresh = HashCache(db)
    assert fresh.lookup(a) == sha256_file(a) and fresh.lookup(b) == sha256_file(b)


def test_concurrent_processes_lose_no_hash(tmp_path):
    db = tmp_path / "sha256-cache.sqlite"
    groups = [_files(tmp_path / "files", f"p{k}", 25) for k in range(4)]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(db), *map(str, group)], cwd=REPO)
             for group in groups]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    cache = HashCache(db)
    assert all(cache.lookup(path) == sha256_file(path) for group in groups for path in group)


def test_a_changed_file_is_hashed_again(tmp_path):
    cache = HashCache(tmp_path / "sha256-cache.sqlite")
    path = _files(tmp_path / "files", "c", 1)[0]
    old = cache.sha256(path)
    path.write_bytes(b"something else entirely")
    assert cache.lookup(path) is None
    assert cache.sha256(path) == sha256_file(path) != old


@pytest.mark.slow
def test_two_quantize_processes_at_once_keep_both_hashes(tmp_path, toolchain):
    """Two `moeq quantize` on different quants of one workspace, at the same time (locks are per quant)."""
    from moeq.workspace import Workspace

    config = pipeline_file(tmp_path)
    assert subprocess.run([sys.executable, "-m", "moeq", "fetch", "--config", str(config)], cwd=REPO,
                          capture_output=True).returncode == 0
    procs = [subprocess.Popen([sys.executable, "-m", "moeq", "quantize", "--config", str(config), "--quant", q],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for q in ("Q8_0", "Q4_K_M")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    ws = Workspace(tmp_path / "work")
    for name in ("tiny-phimoe-Q8_0.gguf", "tiny-phimoe-Q4_K_M.gguf"):
        path = ws.quant_path(name)
        assert ws.hashes.lookup(path) == sha256_file(path)


def test_the_partial_file_protocol_leaves_the_final_whole_or_as_it_was(tmp_path):
    from moeq.workspace import partial_file

    final = tmp_path / "out.bin"
    final.write_bytes(b"old")
    (tmp_path / "out.bin.partial").write_bytes(b"left by a killed run")
    with pytest.raises(RuntimeError):
        with partial_file(final) as partial:
            assert not partial.exists()  # what a killed run left is removed first
            partial.write_bytes(b"half")
            raise RuntimeError("stopped")
    assert final.read_bytes() == b"old" and not (tmp_path / "out.bin.partial").exists()
    with partial_file(final) as partial:
        partial.write_bytes(b"new")
    assert final.read_bytes() == b"new" and not partial.exists()
