"""A release across machines: each quant built on its own machine and staged on a branch of the ladder's repo,
made with the importance matrix one job made, then published in one commit (plan.publish).

    inputs = stage_inputs(ctx, quant, imatrix_sha256(ctx, quant))
    staged_already(ctx, quant, "release-1", None)   # why it need not be built again, or None
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from pathlib import Path

from moeq import __version__
from moeq.cards.manifest import merge_staged
from moeq.cards.history import with_history
from moeq.cards.stage import branch_card_stage
from moeq.config import IMATRIX_AUTO, QuantSpec
from moeq.errors import InputError
from moeq.fetch.stage import HUB_KINDS
from moeq.hub.client import hub_errors, require_token
from moeq.push.staging import current_on_branch, delete_branch, read_staged, stage_quant, take_from_branch
from moeq.record_store import load_saved
from moeq.imatrix.stage import imatrix_stage
from moeq.records import CardRecord, FetchRecord, ImatrixRecord, PushRecord
from moeq.stage_runner import StageResult, Status, declared_key, run_stage
from moeq.steps import wiring
from moeq.steps.context import Context
from moeq.steps.repos import RepoUnit, published_repo
from moeq.workspace import inside, partial_file, sha256_file, write_json_atomic


def stage_inputs(ctx: Context, quant: QuantSpec, imatrix_sha256: str | None) -> dict:
    """What a quant staged on a branch was built from: moeq, the llama.cpp build, the source (a Hub source at its
    commit), the quant's entry and every pipeline section its records depend on (a file by its sha256), and the
    importance matrix. Two builds with the same inputs stage the same quant, so a rerun need not build again."""

    def plain(value):
        if isinstance(value, Path):
            path = value if value.is_absolute() else ctx.pipeline.path.parent / value
            if path.is_file() and path.stat().st_size <= 256 << 20:
                return ctx.ws.hashes.sha256(path)  # the workspace's sha256 cache, not a second read
            return f"{path.name}:{path.stat().st_size if path.exists() else 'absent'}"
        raise TypeError(type(value).__name__)

    pipeline = ctx.pipeline
    source = dataclasses.asdict(pipeline.source)
    revision = pipeline.source.revision or "main"
    if pipeline.source.kind in HUB_KINDS and not re.fullmatch(r"[0-9a-f]{40}", revision):
        with hub_errors("resolving the source's revision", pipeline.source.repo):
            source["commit"] = ctx.api.model_info(pipeline.source.repo, revision=revision).sha
    tool = ctx.chain.tool("llama-quantize").build
    sections = {name: dataclasses.asdict(getattr(pipeline, name)) for name in ("model", "bench", "imatrix", "recipe")}
    inputs = {"moeq": __version__, "llama_cpp": {"commit": tool.commit, "backend": tool.backend}, "source": source,
              "quant": dataclasses.asdict(quant), **sections, "imatrix_sha256": imatrix_sha256}
    return json.loads(json.dumps(inputs, default=plain))


def imatrix_sha256(ctx: Context, quant: QuantSpec, imatrix_from: Path | None = None) -> str | None:
    """The importance matrix `quant` is made with, by sha256 (its record's), as far as it is known before the build:
    None without one; "auto" when this workspace has not made it yet."""
    if quant.imatrix is None:
        return None
    if quant.imatrix != IMATRIX_AUTO:
        return ctx.ws.hashes.sha256(Path(quant.imatrix))
    if imatrix_from is not None:
        return imported_imatrix(imatrix_from)[0].record.output.sha256
    made = ctx.records.get(ImatrixRecord)
    return made.output.sha256 if made else IMATRIX_AUTO


def staged_already(ctx: Context, quant: QuantSpec, branch: str, imatrix_from: Path | None) -> str | None:
    """Why `quant` need not be built for `branch`: staged there from the same inputs, its files as its records say."""
    inputs = stage_inputs(ctx, quant, imatrix_sha256(ctx, quant, imatrix_from))
    return current_on_branch(ctx.api, ctx.pipeline.hub.repo, branch, quant.type, inputs)


def stage_to_branch(ctx: Context, unit: RepoUnit, branch: str, card_record: CardRecord) -> StageResult[PushRecord]:
    """Each quant of the ladder's repo this build made, staged on `branch` (moeq build --stage-to); main untouched."""
    started = time.monotonic()
    require_token()
    records = []
    for quant in unit.quants:
        inputs = stage_inputs(ctx, quant, imatrix_sha256(ctx, quant))
        records.append(stage_quant(ctx.api, card_record, quant.type, branch, inputs, ctx.pipeline.hub.private,
                                   on_message=ctx.say))
    last = next((r for r in reversed(records) if r.commit), records[-1])
    merged = last.model_copy(update={"quants": [q.type for q in unit.quants],
                                     "files": [f for r in records for f in r.files],
                                     "uploaded_bytes": sum(r.uploaded_bytes for r in records)})
    status = Status.RAN if any(r.commit for r in records) else Status.UP_TO_DATE
    return StageResult("push", status, f"staged on {branch}", round(time.monotonic() - started, 3), merged)


def imported_imatrix(folder: Path):
    """The imatrix record of another workspace (FOLDER/records/imatrix.json), read bounded, its paths kept inside
    FOLDER, and the matrix file it names checked against its size and sha256: (saved record, the file)."""
    path = Path(folder) / "records" / "imatrix.json"
    if not path.is_file() or path.stat().st_size > 1 << 20:
        raise InputError(path, "no imatrix record of at most 1 MB there",
                         "pass the folder the imatrix job made (its records/imatrix.json and imatrix/)")
    saved, why = load_saved(path, ImatrixRecord)
    if saved is None:
        raise InputError(path, why, "make the importance matrix again with this moeq (moeq imatrix)")
    made = Path(saved.record.output.path)
    if not made.resolve().is_relative_to(Path(folder).resolve()):  # a link out of FOLDER is followed, then refused
        raise InputError(path, f"its importance matrix {made} lies outside {folder} (a link leaving it?)",
                         "pass the folder the imatrix job made, with its files in it")
    if not made.is_file() or made.stat().st_size != saved.record.output.size or \
            sha256_file(made) != saved.record.output.sha256:
        raise InputError(made, f"not the importance matrix its record {path} describes (size or sha256 differ)",
                         "download the imatrix job's files again")
    return saved, made


def imatrix_from(ctx: Context, folder: Path, source: FetchRecord) -> StageResult[ImatrixRecord]:
    """The importance matrix another workspace made (moeq build --imatrix-from), checked by sha256 against its
    record and by its record's key against the inputs this workspace's imatrix stage declares (the same source,
    calibration text, options and llama-imatrix), then put in place, so the imatrix stage here is up to date."""
    saved, made = imported_imatrix(folder)
    stage = imatrix_stage(ctx.pipeline, ctx.ws, ctx.chain, source, on_message=ctx.say)
    key = declared_key(stage)
    if saved.key != key:
        changed = sorted(k for k in {*key, *(saved.key or {})} if (saved.key or {}).get(k) != key.get(k))
        raise InputError(made, f"made from other inputs than this workspace's ({', '.join(changed)} differ)",
                         "use the importance matrix made for this source and pipeline, or make it here (moeq imatrix)")
    record_path = Path(folder) / "records" / "imatrix.json"
    relative = made.resolve().relative_to(Path(folder).resolve()).as_posix()
    here = inside(ctx.ws.root, relative)
    if here is None:
        raise InputError(record_path, f"names {relative}, outside a workspace",
                         "make the record again with this moeq")
    if not (here.is_file() and ctx.ws.hashes.sha256(here) == saved.record.output.sha256):
        here.parent.mkdir(parents=True, exist_ok=True)
        with partial_file(here) as partial:
            shutil.copyfile(made, partial)
    ctx.ws.records_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(ctx.ws.record_path("imatrix"), json.loads(record_path.read_text()))
    done = run_stage(stage, ctx.records, on_message=ctx.say)
    if not done.up_to_date:  # cannot happen with an equal key and an intact file; never a second matrix silently
        raise InputError(made, f"the imatrix stage ran again here ({done.why})", "the quants would differ")
    ctx.say(f"imatrix: {made} (sha256 {saved.record.output.sha256[:12]}) checked against its record and used")
    return dataclasses.replace(done, why=f"from {folder}")


def branch_card(ctx: Context, branch: str) -> StageResult[CardRecord]:
    """moeq publish's card: the ladder's, from the manifests each quant's build staged on `branch`. Refused, main
    unchanged, when a quant of the ladder is not staged."""
    require_token()
    pipeline = ctx.pipeline
    repo_id = pipeline.hub.repo
    ladder = [q.type for q in pipeline.quants]
    staged = read_staged(ctx.api, repo_id, branch, ladder)
    if staged.missing:
        raise InputError(f"{repo_id}@{branch}", f"{', '.join(staged.missing)} not staged (its build did not finish)",
                         f"main is unchanged. Run it (moeq build --quant {staged.missing[0]} --stage-to {branch}), "
                         "then publish again")
    manifest = merge_staged(pipeline, [(f"{repo_id}@{branch}/.moeq-stage/{q}.json", staged.found[q].manifest)
                                       for q in ladder])
    manifest = with_history(manifest, published_repo(ctx, RepoUnit(repo_id, None, ()), online=True), prune=False)
    return run_stage(branch_card_stage(pipeline, ctx.ws, manifest, branch, staged.commit), ctx.records,
                     on_message=ctx.say)


def push_from_branch(ctx: Context, unit: RepoUnit, card_record: CardRecord, branch: str,
                     keep_branch: bool = False) -> StageResult[PushRecord]:
    """moeq publish's push: the ladder's GGUFs copied on the Hub from `branch` (checked first), with the card, the
    manifest and the charts, in one commit on main; then the branch is deleted unless `keep_branch`."""
    repo_id = ctx.pipeline.hub.repo
    for name in take_from_branch(ctx.api, card_record):
        ctx.say(f"{repo_id}@{branch}: {name} read from the branch and checked")
    done = wiring.push(ctx, unit, card_record)
    if not keep_branch:
        delete_branch(ctx.api, repo_id, branch)
        ctx.say(f"{repo_id}: deleted the staging branch {branch}")
    return done
