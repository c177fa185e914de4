"""One function per stage: declare its Stage from the records it is handed and run it through the one stage runner.

None of these calls another: plan.py runs them in order and hands each the records of the steps it needs.

    fetched = wiring.fetch(ctx).record
    made = wiring.quantize(ctx, quant, SourceFile.of(fetched)).record
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from moeq.bench.stage import bench_stage
from moeq.cards.history import PublishedRepo
from moeq.cards.manifest import CardInputs, RepoInputs
from moeq.cards.stage import card_stage
from moeq.choice.stage import choice_stage
from moeq.compare.stage import compare_stage
from moeq.config import IMATRIX_AUTO, CompareSpec, QuantSpec
from moeq.errors import ToolError
from moeq.fetch.stage import HUB_KINDS, fetch_stage, fetched_source
from moeq.imatrix.stage import imatrix_stage
from moeq.kld import compare, eval_options
from moeq.manifest import MANIFEST_NAME
from moeq.push.stage import push_stage
from moeq.quantize.stage import quantize_stage
from moeq.recipe.cost import plan_search
from moeq.recipe.stage import recipe_stage
from moeq.records import (Made, BenchRecord, CardRecord, ChoiceRecord, CompareRecord, FetchRecord, ImatrixRecord,
                          PushRecord, QuantizeRecord, RecipeRecord, ShardsRecord, ValidateRecord)
from moeq.shards.stage import shards_stage
from moeq.stage_runner import StageResult, Status, current, run_stage
from moeq.steps import candidates
from moeq.steps.context import Context
from moeq.workspace import write_bytes_atomic
from moeq.steps.repos import RepoUnit, siblings
from moeq.validate.stage import validate_stage


def fetch(ctx: Context, force: bool = False) -> StageResult[FetchRecord]:
    """Download (and convert) a Hub source, make the synth model, or record a local file."""
    api = ctx.api if ctx.pipeline.source.kind in HUB_KINDS else None
    return run_stage(fetch_stage(ctx.pipeline, ctx.ws, api, ctx.chain, ctx.say), ctx.records, force=force,
                     on_message=ctx.say)


def fetched(ctx: Context) -> StageResult[FetchRecord]:
    """A Hub source as moeq fetch left it: the commands after fetch never download."""
    record = fetched_source(ctx.pipeline, ctx.ws, ctx.records.get(FetchRecord))
    return StageResult("fetch", Status.UP_TO_DATE, "as moeq fetch left it", 0.0, record)


@dataclass
class SourceFile:
    """The source a quant is made from: its path now, and its fetch record when that is ready."""

    path: Path
    record: Callable[[], FetchRecord]

    @classmethod
    def of(cls, fetched: FetchRecord) -> "SourceFile":
        return cls(Path(fetched.output.path), lambda: fetched)


class SourceBeside:
    """A local source's fetch stage run in a thread of its own, started by the first quant that needs it: its first
    hash (an 84 GB read for Phi-3.5-MoE) runs beside llama-quantize, which needs only the path; the quantize stage
    waits for the record only where its key is compared or its record written. `result()` waits for the stage's
    result (or raises its error)."""

    def __init__(self, ctx: Context, force: bool = False):
        self.ctx, self.force = ctx, force
        self.file = SourceFile(Path(ctx.pipeline.source.path), lambda: self.result().record)
        self._done: dict[str, object] = {}
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> SourceFile:
        with self._lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="source-hash", daemon=True)  # Ctrl-C
                self._worker.start()                                                               # does not wait
        return self.file

    def _work(self) -> None:
        try:
            self._done["result"] = fetch(self.ctx, force=self.force)
        except BaseException as exc:  # handed to whoever waits for the result
            self._done["error"] = exc

    def result(self) -> StageResult[FetchRecord]:
        self.start()
        self._worker.join()
        if "error" in self._done:
            raise self._done["error"]
        return self._done["result"]


def imatrix(ctx: Context, source: FetchRecord, force: bool = False) -> StageResult[ImatrixRecord]:
    """The importance matrix of the source with the calibration text (quants[].imatrix: auto uses it)."""
    stage = imatrix_stage(ctx.pipeline, ctx.ws, ctx.chain, source, on_message=ctx.say)
    return run_stage(stage, ctx.records, force=force, on_message=ctx.say)


def candidate(ctx: Context, quant: QuantSpec, name: str, source: SourceFile, *, imatrix: ImatrixRecord | None = None,
              recipe: RecipeRecord | None = None, force: bool = False, threads: int | None = None) -> StageResult[QuantizeRecord]:
    """Candidate `name` of `quant`, current (its file may be measured and deleted). The searched one is quantized
    by llama-quantize from the recipe file and must be the recipe stage's assembled file byte for byte."""
    spec = candidates.spec(quant, name, imatrix=imatrix, recipe=recipe)
    stage = quantize_stage(spec, ctx.ws, ctx.chain, source.path, source.record, threads=threads,
                           on_message=ctx.say, output=candidates.output(ctx.ws, quant, name),
                           record_as=candidates.record_name(quant, name),
                           silence_s=ctx.pipeline.toolchain.quantize_silence_s)
    done = run_stage(stage, ctx.records, force=force, on_message=ctx.say)
    if name == Made.SEARCHED:
        _require_rebuilt(quant, done.record, recipe)
    return done


def _require_rebuilt(quant: QuantSpec, record: QuantizeRecord, found: RecipeRecord) -> None:
    """The searched file llama-quantize made from the recipe file is the one the search assembled and measured;
    the assembled copy is then deleted (the record keeps its sha256)."""
    if record.output.sha256 != found.output.sha256:
        raise ToolError(record.output.path, "llama-quantize made the searched recipe as sha256 "
                        f"{record.output.sha256[:12]}, but the search assembled and measured "
                        f"{found.output.sha256[:12]}", f"run moeq recipe --force --quant {quant.type}")
    Path(found.output.path).unlink(missing_ok=True)


def recipe(ctx: Context, quant: QuantSpec, source: FetchRecord, stock: QuantizeRecord,
           force: bool = False) -> StageResult[RecipeRecord]:
    """The rung's recipe searched under its budget, from the record of its stock candidate (made with the
    importance matrix where the rung has one; only its tensor rows are read, its file may be gone)."""
    stage = recipe_stage(ctx.pipeline, quant, ctx.ws, ctx.chain, source, stock, on_message=ctx.say)
    return run_stage(stage, ctx.records, force=force, on_message=ctx.say)


def recipe_current(ctx: Context, quant: QuantSpec, source: FetchRecord) -> RecipeRecord | None:
    """The rung's finished search when a build would find it up to date (nothing is run)."""
    stock = ctx.records.saved("quantize", candidates.record_name(quant, candidates.names(quant)[0]))
    if stock is None:
        return None
    return current(recipe_stage(ctx.pipeline, quant, ctx.ws, ctx.chain, source, stock.record), ctx.records)


def recipe_plan(ctx: Context, quant: QuantSpec, source: FetchRecord):
    """What the search of `quant` would cost, from the source's header and llama-quantize's dry run (nothing is
    made)."""
    return plan_search(ctx.pipeline, quant, Path(source.output.path), ctx.chain.tool("llama-quantize"))


def choice(ctx: Context, quant: QuantSpec, source: FetchRecord, made: list[tuple[str, QuantizeRecord]],
           remake: Callable[[int], QuantizeRecord], force: bool = False) -> StageResult[ChoiceRecord]:
    """Which file of `quant` is published, each candidate in `made` measured against F16 on the evaluation text;
    `remake(i)` gives candidate i with its file when the choice must measure it after it was deleted."""

    def files(i: int) -> QuantizeRecord:
        return made[i][1] if Path(made[i][1].output.path).is_file() else remake(i)

    stage = choice_stage(ctx.pipeline, quant, ctx.ws, ctx.chain, source, made, files,
                         may_choose=quant.imatrix == IMATRIX_AUTO, on_message=ctx.say)
    done = run_stage(stage, ctx.records, force=force, on_message=ctx.say)
    chosen = done.record
    if not chosen.may_choose and any(compare(c.quality, chosen.published.quality) == "lower" for c in chosen.others()):
        ctx.warn(f"{quant.type}: the importance matrix made it worse ({chosen.why})")
    return done


def quantize(ctx: Context, quant: QuantSpec, source: SourceFile, *, imatrix: ImatrixRecord | None = None,
             chosen: ChoiceRecord | None = None, made: dict[str, QuantizeRecord] | None = None,
             recipe: RecipeRecord | None = None, force: bool = False, threads: int | None = None,
             allow_requantize: bool = False) -> StageResult[QuantizeRecord]:
    """Quantize `quant`: the file the choice `chosen` published, moved into place from its candidate in `made` (a
    searched one named TYPE_MOEQ); without a choice the stock file, made with `imatrix` for `imatrix: auto`."""
    name = chosen.published.name if chosen is not None else candidates.names(quant)[0]  # else the stock one
    spec = candidates.spec(quant, name, imatrix=imatrix, recipe=recipe)
    file = candidates.file_name(quant, name)
    stage = quantize_stage(spec, ctx.ws, ctx.chain, source.path, source.record, threads=threads,
                           allow_requantize=allow_requantize, on_message=ctx.say,
                           adopt=(made or {}).get(name) if chosen is not None else None,
                           output=ctx.ws.quant_path(file), silence_s=ctx.pipeline.toolchain.quantize_silence_s)
    done = run_stage(stage, ctx.records, force=force, on_message=ctx.say)
    if chosen is not None:  # measured and chosen: a Q4_K_M candidate of Phi-3.5-MoE is 25 GB
        for measured in chosen.candidates:
            candidates.output(ctx.ws, quant, measured.name).unlink(missing_ok=True)
    for other in {quant.file, quant.searched_file} - {file}:  # the rung's file under its other name, from before
        for stale in (ctx.ws.quant_path(other), ctx.ws.quant_path(other + ".log")):
            stale.unlink(missing_ok=True)
    return done


def validate(ctx: Context, quant: QuantSpec, quantized: QuantizeRecord, numerics: str = "sample",
             force: bool = False) -> StageResult[ValidateRecord]:
    stage = validate_stage(ctx.pipeline, quant, quantized, numerics, ctx.chain)
    return run_stage(stage, ctx.records, force=force, on_message=ctx.say)


def bench(ctx: Context, quant: QuantSpec, quantized: QuantizeRecord, validated: ValidateRecord | None,
          chosen: ChoiceRecord | None, *, modes: tuple[str, ...] | None = None, rpc: str | None = None,
          force: bool = False) -> StageResult[BenchRecord]:
    stage = bench_stage(ctx.pipeline, quant, ctx.ws, ctx.chain, quantized, validated, modes=modes, rpc=rpc,
                        choice=chosen, on_message=ctx.say)
    return run_stage(stage, ctx.records, force=force, on_message=ctx.say)


def compare_peer(ctx: Context, peer: CompareSpec, source: FetchRecord, force: bool = False) -> StageResult[CompareRecord]:
    """Another publisher's GGUF of the model, fetched and measured beside the ladder (or refused, saying why)."""
    stage = compare_stage(ctx.pipeline, peer, ctx.ws, ctx.chain, ctx.api, source, on_message=ctx.say)
    return run_stage(stage, ctx.records, force=force, on_message=ctx.say)


def compared(ctx: Context, peer: CompareSpec, source: FetchRecord) -> StageResult[CompareRecord]:
    """Its saved record, without asking the Hub, when it was measured against this F16 with the pipeline's
    evaluation options (the commands after compare never download); else skipped, saying what measures it."""
    saved = ctx.records.saved("compare", peer.id)
    key = (saved.key if saved is not None else None) or {}
    options = eval_options(ctx.pipeline, ctx.ws).model_dump(mode="json")
    if (saved is None or saved.record.refused is not None or key.get("source_sha256") != source.output.sha256
            or (key.get("options") or {}).get("perplexity") != options
            or [key.get("repo"), key.get("file"), key.get("label")] != [peer.repo, peer.file, peer.label]):
        return StageResult("compare", Status.SKIPPED, f"not measured: run moeq compare --config {ctx.pipeline.path}")
    return StageResult("compare", Status.UP_TO_DATE, "as moeq compare left it", 0.0, saved.record)


def shards(ctx: Context, quantized: QuantizeRecord, force: bool = False) -> StageResult[ShardsRecord]:
    stage = shards_stage(ctx.pipeline, quantized, ctx.ws, ctx.chain)
    return run_stage(stage, ctx.records, force=force, on_message=ctx.say)


def card(ctx: Context, unit: RepoUnit, listed: list[tuple[QuantSpec, ShardsRecord]],
         force: bool = False, published: PublishedRepo | None = None, prune: bool = False,
         compared: list[CompareRecord] = ()) -> StageResult[CardRecord]:
    """The repo's card from the current records of the quants it lists (`listed`, each with its shards), told what
    it supersedes and changes on the Hub (`published`; `prune`: the push deletes what it supersedes), and the other
    publishers' files measured beside them (`compared`)."""
    warned: list[str] = []

    def warn(message: str) -> None:
        warned.append(message)
        ctx.warn(message)

    quants = [CardInputs.from_records(ctx.records, q, split, warn=warn) for q, split in listed]
    inputs = RepoInputs(unit.repo_id, ctx.pipeline.hub.layout, ctx.records.get(FetchRecord), quants,
                        siblings=siblings(ctx, unit), published=published, prune=prune, compared=list(compared))
    done = run_stage(card_stage(ctx.pipeline, unit.quant, ctx.ws, inputs), ctx.records, force=force,
                     on_message=ctx.say)
    return dataclasses.replace(done, warnings=tuple(warned))


def push(ctx: Context, unit: RepoUnit, card_record: CardRecord, *, create_pr: bool | None = None,
         replace_card: bool = False, switch_layout: bool = False, prune: bool = False) -> StageResult[PushRecord]:
    """The staged repo `card_record` describes, in one commit (or pull request)."""
    stage = push_stage(ctx.pipeline, card_record, [q.type for q in unit.quants], ctx.api, ctx.records,
                       create_pr=create_pr, replace_card=replace_card, switch_layout=switch_layout, prune=prune,
                       on_message=ctx.say)
    done = run_stage(stage, ctx.records, on_message=ctx.say)
    if done.record is not None and done.record.head is not None:  # what the next card compares with offline
        copy = ctx.ws.pushed_manifest(unit.quant)
        copy.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(copy, (Path(card_record.folder) / MANIFEST_NAME).read_bytes())
    return done
