"""The GGUF files a quant's repo holds: the quant itself, or its shards when it is over hub.max_shard_size.

Shards are made by llama-gguf-split in a folder beside the quants, checked (every shard a whole
GGUF, split metadata consistent, all the quant's tensors present once), and reused while the quant's
sha256 and the shard size are unchanged.

    >>> files = repo_gguf_files(pipeline, quantize_record(pipeline, pipeline.quant("Q8_0"), ws), ws, chain)
    >>> [Path(f.path).name for f in files]   # under hub.max_shard_size: the quant itself
    ['phi-3.5-moe-Q8_0.gguf']
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from moeq.config import Pipeline
from moeq.errors import InputError, ToolError
from moeq.gguf_header import check_extent, read_header
from moeq.records import FileRef, QuantizeRecord
from moeq.runner import run_tool
from moeq.toolchain import Toolchain
from moeq.workspace import Workspace, write_text_atomic

STAMP = "shards.json"


def split_size_arg(max_bytes: int) -> str:
    """llama-gguf-split takes whole decimal megabytes or gigabytes: 50_000_000_000 -> '50G'."""
    if max_bytes % 10**9 == 0:
        return f"{max_bytes // 10**9}G"
    if max_bytes < 10**6:
        raise InputError(f"hub.max_shard_size {max_bytes} B: llama-gguf-split splits in whole megabytes; use 1MB or more")
    return f"{max_bytes // 10**6}M"


def repo_gguf_files(pipeline: Pipeline, quantized: QuantizeRecord, ws: Workspace,
                    chain: Toolchain | None = None) -> list[FileRef]:
    if quantized.output.size <= pipeline.hub.max_shard_size:
        return [quantized.output]
    folder = ws.shards_dir(quantized.quant)
    size_arg = split_size_arg(pipeline.hub.max_shard_size)
    stamp = {"source_sha256": quantized.output.sha256, "split_max_size": size_arg}
    try:
        previous = json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        previous = None
    if previous and previous.get("stamp") == stamp and all(Path(f["path"]).is_file() for f in previous["files"]):
        return [FileRef(**f) for f in previous["files"]]
    return _split(quantized, folder, size_arg, stamp, ws, chain or Toolchain(pipeline.toolchain.llama_cpp_bin))


def _split(quantized: QuantizeRecord, folder: Path, size_arg: str, stamp: dict, ws: Workspace,
           chain: Toolchain) -> list[FileRef]:
    source = Path(quantized.output.path)
    building = folder.with_name(folder.name + ".partial")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    stem = source.name[: -len(".gguf")] if source.name.endswith(".gguf") else source.name
    command = [str(chain.tool("llama-gguf-split").path), "--split", "--split-max-size", size_arg,
               str(source), str(building / stem)]
    try:
        run_tool(command, building / "llama-gguf-split.log")
        shards = sorted(building.glob(f"{stem}-*-of-*.gguf"))
        _check_shards(source, shards)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    building.rename(folder)
    hashes = ws.hashes
    files = [FileRef(str(folder / s.name), (folder / s.name).stat().st_size, hashes.sha256(folder / s.name))
             for s in shards]
    write_text_atomic(folder / STAMP, json.dumps({"stamp": stamp, "files": [vars(f) for f in files]}, indent=1))
    return files


def _check_shards(source: Path, shards: list[Path]) -> None:
    if not shards:
        raise ToolError(f"llama-gguf-split wrote no shards for {source}")
    expected = {t.name for t in read_header(source).tensors}
    seen: list[str] = []
    for index, shard in enumerate(shards):
        header = read_header(shard)
        check_extent(header)
        count, number = header.metadata.get("split.count"), header.metadata.get("split.no")
        if count != len(shards) or number != index:
            raise ToolError(f"{shard}: split.no {number} of split.count {count}, expected {index} of {len(shards)}")
        seen += [t.name for t in header.tensors]
    if sorted(seen) != sorted(expected):
        raise ToolError(f"the shards of {source} do not hold its tensors exactly once")
