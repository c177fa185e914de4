"""The compare stage: a GGUF of the same model that another publisher made (pipeline compare:), fetched and
measured as the ladder's own files are, into records/compare-ID.json.

Before a byte is downloaded, the file (every shard of a split one) must be listed at the resolved commit, inside
the download folder, and no larger than the F16 it would be a quantization of. Once downloaded and checked against
the Hub's LFS sha256, its header is read by moeq (never by a llama.cpp tool first): a file that is not a
quantization of the F16's model (identity.py) is recorded as refused, with the first difference, and deleted.
Otherwise llama-perplexity measures it against the F16's saved logits on the evaluation text (moeq/kld.py, the
bench's and the choice's measurement) and llama-bench its tokens/s in the bench's modes this machine has a device
for; the file is then deleted (the record keeps its sha256). Its key is the repo, file, commit and the Hub's sha256
of each shard, the label, the F16, the evaluation and speed options, the machine and the tool's commit.

    result = run_stage(compare_stage(pipeline, peer, ws, chain, api, fetched), records)
    result.record.quality.quant.kld_mean
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Callable

from huggingface_hub import HfApi
from huggingface_hub.hf_api import RepoFile

from moeq import texts
from moeq.machine import machine_facts
from moeq.compare.identity import first_difference
from moeq.config import CompareSpec, Pipeline
from moeq.errors import InputError, MoeqError
from moeq.gguf_header import GGUFHeader, check_extent, read_header, read_source_header, shard_names
from moeq.hub.download import download_all, download_target, listed_files, resolve_commit
from moeq.kld import base_logits, eval_options, measure
from moeq.offload import OffloadMode
from moeq.records import (BenchOptions, CompareRecord, FetchRecord, Machine, ModeError, PeerFile, Quality, SpeedRun,
                          ToolBuildRef, type_shares)
from moeq.speed import offload_devices, run_speed
from moeq.stage_runner import Stage
from moeq.toolchain import Toolchain
from moeq.units import decimal_size
from moeq.workspace import Workspace, require_free


def compare_stage(pipeline: Pipeline, peer: CompareSpec, ws: Workspace, chain: Toolchain, api: HfApi,
                  source: FetchRecord, on_message: Callable[[str], None] = lambda _msg: None) -> Stage[CompareRecord]:
    cfg = pipeline.bench
    tool = chain.tool("llama-perplexity")
    machine = Machine(**machine_facts())
    options = BenchOptions(modes=list(cfg.modes), n_prompt=cfg.n_prompt, n_gen=cfg.n_gen,
                           repetitions=cfg.repetitions, threads=cfg.threads, ctx=[], timeout_s=cfg.timeout_s,
                           rpc=False, perplexity=eval_options(pipeline, ws))
    folder = ws.compare_dir(peer.id)
    where = f"compare: {peer.repo}/{peer.file}"
    found: dict[str, object] = {}

    def key() -> dict:
        commit = resolve_commit(api, peer.repo, peer.revision, f"{where} revision", pipeline.path, on_message)
        entries = listed_files(api, peer.repo, commit, shard_names(peer.file), f"check {where} in {pipeline.path}")
        for entry in entries:
            download_target(peer.repo, commit, entry, folder / "download")
        size = sum(e.size for e in entries)
        if size > source.output.size:
            raise InputError(f"{peer.repo}/{peer.file}@{commit[:12]}",
                             f"{decimal_size(size)} ({size:,} bytes), larger than the F16 source "
                             f"({source.output.size:,} bytes), so no quantization of it; nothing was downloaded",
                             f"remove it from compare in {pipeline.path}, or name a quantized file")
        found.update(commit=commit, entries=entries)
        return {"repo": peer.repo, "file": peer.file, "label": peer.label, "commit": commit,
                "files": [[e.path, e.size, _hub_sha256(e)] for e in entries],
                "source_sha256": source.output.sha256, "options": options.model_dump(mode="json"),
                "machine": machine.model_dump(mode="json", include={"cpu", "cores", "ram_bytes", "gpus"})}

    def run() -> CompareRecord:
        commit, entries = found["commit"], found["entries"]
        require_free(folder, sum(e.size for e in entries), f"{peer.repo}/{peer.file}")
        try:
            files = download_all(api, peer.repo, commit, entries, folder / "download", on_message)
            record = CompareRecord(peer=peer.id, repo=peer.repo, repo_file=peer.file, revision=peer.revision,
                                   commit=commit, label=peer.label, files=[PeerFile(**f) for f in files])
            paths = [folder / "download" / e.path for e in entries]
            try:
                header = _merged_header(paths)
            except InputError as exc:  # named as the Hub holds it: the download is deleted below
                name = Path(exc.where).relative_to(folder / "download") if Path(exc.where).is_relative_to(
                    folder / "download") else peer.file
                raise InputError(f"{peer.repo}/{name}@{commit[:12]}", exc.problem,
                                 f"{exc.fix}; remove it from compare in {pipeline.path}") from None
            difference = first_difference(read_source_header(Path(source.output.path)), header)
            if difference is not None:
                return record.model_copy(update={"refused": f"not a quantization of the F16 source: {difference}"})
            return _measured(record, paths, header, chain, ws, source, texts.evaluation(pipeline), options, machine,
                             on_message)
        finally:
            shutil.rmtree(folder / "download", ignore_errors=True)  # measured or refused, the record keeps its sha256

    return Stage("compare", peer.id, key=key, run=run, tool=lambda: tool)


def _hub_sha256(entry: RepoFile) -> str:
    return entry.lfs.sha256 if entry.lfs else entry.blob_id


def _merged_header(paths: list[Path]) -> GGUFHeader:
    """The first shard's header with every shard's tensors: what llama.cpp loads as one model. Each shard holds
    every tensor it lists (a file cut short is refused here)."""
    headers = [read_header(path) for path in paths]
    for header in headers:
        check_extent(header)
    return dataclasses.replace(headers[0], tensors=[t for h in headers for t in h.tensors])


def _measured(record: CompareRecord, paths: list[Path], header: GGUFHeader, chain: Toolchain, ws: Workspace,
              source: FetchRecord, text: Path, options: BenchOptions, machine: Machine,
              on_message: Callable[[str], None]) -> CompareRecord:
    tool = chain.tool("llama-perplexity")
    ppl = options.perplexity
    logs = ws.compare_dir(record.peer)
    base_kld, base = base_logits(ws, chain, source.output, ppl, text, tool.build.commit, threads=options.threads,
                                 timeout_s=options.timeout_s, on_message=on_message)
    on_message(f"{record.repo}/{record.repo_file}: llama-perplexity with KL divergence against F16")
    figures = measure(chain, paths[0], text, base_kld, ppl, logs / "perplexity.log", threads=options.threads,
                      timeout_s=options.timeout_s)
    speed, errors, modes = _speed(chain, paths[0], header, options, logs, on_message)
    n_params = sum(t.n_elements for t in header.tensors)
    n_bytes = sum(t.n_bytes for t in header.tensors)
    return record.model_copy(update={
        "size": sum(f.size for f in record.files), "bpw": round(8 * n_bytes / n_params, 4),
        "types": type_shares((t.type.name, t.n_bytes) for t in header.tensors), "machine": machine, "tool": ToolBuildRef(**tool.build.as_dict()),
        "options": options.model_copy(update={"modes": modes}), "speed": speed, "errors": errors,
        "quality": Quality(base=base, quant=figures, text=ppl.text, ctx=ppl.ctx, chunks=ppl.chunks)})


def _speed(chain: Toolchain, model: Path, header: GGUFHeader, options: BenchOptions, logs: Path,
           on_message: Callable[[str], None]) -> tuple[list[SpeedRun], list[ModeError], list[str | int]]:
    """Tokens/s in each of the bench's modes this machine can run: the CPU mode always, the offload modes where
    llama.cpp finds a GPU."""
    n_layer = int(header.arch_value("block_count", 1) or 1)
    modes = [(setting, OffloadMode.from_setting(setting, n_layer)) for setting in options.modes]
    if any(m.offload for _s, m in modes) and not offload_devices(chain.path("llama-bench"), logs / "devices.log",
                                                                  options.timeout_s):
        modes = [(setting, m) for setting, m in modes if not m.offload]
    speed, errors = [], []
    for _setting, mode in modes:
        on_message(f"{model.name}: llama-bench, mode {mode.name}")
        try:
            speed.append(SpeedRun(**run_speed(chain.path("llama-bench"), model, mode,
                                              logs / f"speed-{mode.name.replace(' ', '-')}.log",
                                              n_prompt=options.n_prompt, n_gen=options.n_gen,
                                              repetitions=options.repetitions, threads=options.threads, rpc=None,
                                              timeout_s=options.timeout_s)))
        except MoeqError as exc:
            errors.append(ModeError(mode=mode.name, error=exc.message))
    return speed, errors, [setting for setting, _m in modes]
