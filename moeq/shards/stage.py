"""The shards stage: the GGUF files a quant's repo holds, the quant itself or its shards over hub.max_shard_size.

Shards are made by llama-gguf-split in WORKSPACE/shards/<quant>/, checked (every shard a whole GGUF,
split metadata consistent, all the quant's tensors present once) and recorded in a ShardsRecord that
the card and push stages read. Its key is the quant's sha256 and the shard size, and llama-gguf-split's commit
when it splits.

    result = run_stage(shards_stage(pipeline, quantized, ws, chain), records)
    [Path(f.path).name for f in result.record.files]   # under hub.max_shard_size: the quant itself
    # -> ['phi-3.5-moe-Q8_0.gguf']
"""

from __future__ import annotations

import shutil
from pathlib import Path

from gguf import Keys

from moeq.config import Pipeline
from moeq.errors import InputError, ToolError
from moeq.gguf_header import check_extent, read_header
from moeq.records import FileRef, QuantizeRecord, ShardsRecord
from moeq.runner import run_tool
from moeq.stage_runner import Stage
from moeq.toolchain import Toolchain
from moeq.workspace import Workspace


def split_size_arg(max_bytes: int) -> str:
    """llama-gguf-split takes whole decimal megabytes or gigabytes: 50_000_000_000 -> '50G'."""
    if max_bytes % 10**9 == 0:
        return f"{max_bytes // 10**9}G"
    if max_bytes < 10**6:
        raise InputError(f"hub.max_shard_size {max_bytes} B", "llama-gguf-split splits in whole megabytes",
                         "use 1MB or more")
    return f"{max_bytes // 10**6}M"


def shards_stage(pipeline: Pipeline, quantized: QuantizeRecord, ws: Workspace,
                 chain: Toolchain | None = None) -> Stage[ShardsRecord]:
    max_size = pipeline.hub.max_shard_size
    split = quantized.output.size > max_size
    chain = chain or pipeline.toolchain.chain()

    def key() -> dict:
        return {"quant_sha256": quantized.output.sha256,
                "split_max_size": split_size_arg(max_size) if split else None}

    def intact(record: ShardsRecord) -> bool:
        return all(Path(f.path).is_file() and Path(f.path).stat().st_size == f.size for f in record.files)

    def run() -> ShardsRecord:
        files = [quantized.output]
        if split:
            files = _split(quantized, ws.shards_dir(quantized.quant), split_size_arg(max_size), ws, chain)
        return ShardsRecord(quant=quantized.quant, source=quantized.output, max_shard_size=max_size, files=files)

    splitter = (lambda: chain.tool("llama-gguf-split")) if split else None  # a file kept whole: no tool makes it
    return Stage("shards", quantized.quant, key=key, run=run, tool=splitter, intact=intact)


def _split(quantized: QuantizeRecord, folder: Path, size_arg: str, ws: Workspace, chain: Toolchain) -> list[FileRef]:
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
    return [FileRef(path=str(folder / s.name), size=(folder / s.name).stat().st_size,
                    sha256=hashes.sha256(folder / s.name)) for s in shards]


def _check_shards(source: Path, shards: list[Path]) -> None:
    if not shards:
        raise ToolError("llama-gguf-split", f"wrote no shards for {source}", "see its log in the shards folder")
    expected = {t.name for t in read_header(source).tensors}
    seen: list[str] = []
    for index, shard in enumerate(shards):
        header = read_header(shard)
        check_extent(header)
        count, number = header.metadata.get(Keys.Split.LLM_KV_SPLIT_COUNT), header.metadata.get(Keys.Split.LLM_KV_SPLIT_NO)
        if count != len(shards) or number != index:
            raise ToolError(shard, f"split.no {number} of split.count {count}, expected {index} of {len(shards)}",
                            "make the shards again (--force-stage shards)")
        seen += [t.name for t in header.tensors]
    if sorted(seen) != sorted(expected):
        raise ToolError(source, "its shards do not hold its tensors exactly once",
                        "make the shards again (--force-stage shards)")
