"""One function per stage, as every command and `moeq build` call it: load the records the stage needs
once (through the context's Records), declare the stage, and run it through the one stage runner.

This module and build.py are the only ones that know the order of the stages; the stage packages
never import each other.

    ctx = Context.of(load_pipeline(Path("examples/tiny-phimoe.yaml")))
    steps.quantize(ctx, ctx.pipeline.quant("Q8_0")).status
    # -> 'up to date'
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from moeq.config import IMATRIX_AUTO, RECIPE_SEARCH, Pipeline, QuantSpec
from moeq.record_store import Records
from moeq.errors import CheckFailed, ToolError
from moeq.kld import compare
from moeq.records import (BenchRecord, CardRecord, CheckResult, ChoiceRecord, FetchRecord, ImatrixRecord,
                          PushRecord, QuantizeRecord, RecipeRecord, ShardsRecord, ValidateRecord)
from moeq.stage_runner import StageResult, run_stage
from moeq.toolchain import Toolchain
from moeq.workspace import Workspace


@dataclass
class Context:
    """What one command works with, made once: the pipeline, its workspace and records, the tools, the Hub."""

    pipeline: Pipeline
    ws: Workspace
    records: Records
    say: Callable[[str], None] = lambda _msg: None
    warnings: list[str] = field(default_factory=list)
    # A local source's stage running in a thread of its own (fetch_beside): quantize takes its record from it.
    source_pending: Callable[[], StageResult[FetchRecord]] | None = None

    @classmethod
    def of(cls, pipeline: Pipeline, say: Callable[[str], None] = lambda _msg: None) -> "Context":
        ws = Workspace(pipeline.workspace)
        return cls(pipeline, ws, Records(ws, pipeline.path), say)

    @functools.cached_property
    def chain(self) -> Toolchain:
        return self.pipeline.toolchain.chain()

    @functools.cached_property
    def api(self):
        from moeq.hub.client import hub_api

        return hub_api(on_message=self.say)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self.say(f"warning: {message}")


def fetch(ctx: Context, force: bool = False) -> StageResult[FetchRecord]:
    """The fetch stage: download (and convert) a Hub source, make the synth model, or record a local file."""
    from moeq.fetch.stage import HUB_KINDS, fetch_stage

    api = ctx.api if ctx.pipeline.source.kind in HUB_KINDS else None
    return run_stage(fetch_stage(ctx.pipeline, ctx.ws, api, ctx.chain, ctx.say), ctx.records, force=force,
                     on_message=ctx.say)


def fetch_beside(ctx: Context, force: bool = False) -> Callable[[], StageResult[FetchRecord]]:
    """Run the fetch stage in a thread of its own; the function returned waits for its result (or raises its
    error). A local source's first hash (an 84 GB read for Phi-3.5-MoE) then runs beside llama-quantize, which
    needs only the path; the quantize stage waits for it only where its key is compared or its record written."""
    done: dict[str, StageResult[FetchRecord] | BaseException] = {}

    def work() -> None:
        try:
            done["result"] = fetch(ctx, force=force)
        except BaseException as exc:  # handed to whoever waits for the result
            done["error"] = exc

    worker = threading.Thread(target=work, name="source-hash", daemon=True)  # Ctrl-C does not wait for it
    worker.start()

    def result() -> StageResult[FetchRecord]:
        worker.join()
        if "error" in done:
            raise done["error"]
        return done["result"]

    ctx.source_pending = result
    return result


def tools_needed(pipeline: Pipeline, quants: list[QuantSpec], *, skip_bench: bool = False) -> list[str]:
    """The llama.cpp tools the stages `moeq build` will run for `quants` call, in the order they run."""
    needed = []
    if pipeline.source.kind == "gguf":
        needed.append("llama-gguf-split")  # a split source is merged
    if any(q.imatrix == IMATRIX_AUTO for q in quants):
        needed.append("llama-imatrix")
    needed.append("llama-quantize")
    if not skip_bench:
        needed += ["llama-bench", "llama-completion"]
        if pipeline.bench.quality:
            needed.append("llama-perplexity")
        if pipeline.bench.rpc == "local":
            needed.append("ggml-rpc-server")
    needed.append("llama-gguf-split")  # shards
    return list(dict.fromkeys(needed))


def require_tools(ctx: Context, quants: list[QuantSpec], *, skip_bench: bool = False) -> None:
    """Find every tool the build will need before any stage runs (a ToolError names the first one missing or of
    the wrong backend): a CUDA pipeline without CUDA tools stops before downloading 84 GB, not at the imatrix."""
    for name in tools_needed(ctx.pipeline, quants, skip_bench=skip_bench):
        ctx.chain.tool(name)


def source(ctx: Context) -> FetchRecord:
    """The source every quant is made from: made or recorded now (synth, local), or as moeq fetch left it."""
    from moeq.fetch.stage import HUB_KINDS, fetched_source

    if ctx.pipeline.source.kind in HUB_KINDS:
        return fetched_source(ctx.pipeline, ctx.ws, ctx.records.get(FetchRecord))
    return fetch(ctx).record


def imatrix(ctx: Context, force: bool = False) -> StageResult[ImatrixRecord]:
    """The importance matrix of the source with the calibration text (quants[].imatrix: auto uses it)."""
    from moeq.imatrix.stage import imatrix_stage

    stage = imatrix_stage(ctx.pipeline, ctx.ws, ctx.chain, source(ctx), on_message=ctx.say)
    return run_stage(stage, ctx.records, force=force, on_message=ctx.say)


def choice(ctx: Context, quant: QuantSpec, force: bool = False, threads: int | None = None,
           on_tensor=None) -> StageResult[ChoiceRecord] | None:
    """Which file of `quant` is published: made with and without its importance matrix, and with its searched
    recipe (quants[].recipe: search), each measured against F16 on the evaluation text. None where there is nothing
    to choose (one candidate, or bench.quality off)."""
    if not ctx.pipeline.bench.quality or len(_candidate_names(quant)) < 2:
        return None
    from moeq.choice.stage import choice_stage

    made = _candidates(ctx, quant, threads=threads, on_tensor=on_tensor)

    def files(i: int) -> QuantizeRecord:
        """Candidate i with its file, made again when the choice must measure it after it was deleted."""
        if Path(made[i][1].output.path).is_file():
            return made[i][1]
        return _candidates(ctx, quant, only=i, force=True, threads=threads, on_tensor=on_tensor)[0][1]

    _path, source_record = _source_for_quantize(ctx)  # a local source's hash is done: the candidates waited for it
    stage = choice_stage(ctx.pipeline, quant, ctx.ws, ctx.chain, source_record(), made, files,
                         may_choose=quant.imatrix == IMATRIX_AUTO, on_message=ctx.say)
    done = run_stage(stage, ctx.records, force=force, on_message=ctx.say)
    chosen = done.record
    if not chosen.may_choose and any(compare(c.quality, chosen.published.quality) == "lower" for c in chosen.others()):
        ctx.warn(f"{quant.type}: the importance matrix made it worse ({chosen.why})")
    return done


def _candidate_names(quant: QuantSpec) -> list[str]:
    """The choice's candidates of `quant`, the stock choice first."""
    from moeq.choice.stage import SEARCHED, WITH, WITHOUT

    return ([WITH, WITHOUT] if quant.imatrix is not None else [WITHOUT]) + \
        ([SEARCHED] if quant.recipe == RECIPE_SEARCH else [])


def _candidate_spec(ctx: Context, quant: QuantSpec, name: str) -> tuple[QuantSpec, str]:
    """How candidate `name` of `quant` is made, and its file's name: the searched one from the recipe stage's
    record (--pure, the recipe file and the two end types), labelled TYPE_MOEQ."""
    from moeq.choice.stage import SEARCHED, WITH

    if name == SEARCHED:
        found = recipe(ctx, quant).record
        spec = dataclasses.replace(quant, imatrix=Path(found.imatrix.path) if found.imatrix else None, pure=True,
                                   tensor_type_file=Path(found.recipe_file.path), tensor_types=(),
                                   token_embedding_type=found.token_embedding_type.lower(),
                                   output_tensor_type=found.output_tensor_type.lower(), recipe=None, budget=None)
        return spec, quant.searched_file
    matrix = None
    if name == WITH:
        matrix = Path(imatrix(ctx).record.output.path) if quant.imatrix == IMATRIX_AUTO else quant.imatrix
    return dataclasses.replace(quant, imatrix=matrix), quant.file


def _candidates(ctx: Context, quant: QuantSpec, *, only: int | None = None, force: bool = False,
                threads: int | None = None, on_tensor=None) -> list[tuple[str, QuantizeRecord]]:
    """The choice's candidates of `quant`, each named and current (its file may be measured and deleted), each under
    WORKSPACE/choice/TYPE/FOLDER/ with its own record. The searched one is quantized by llama-quantize from the
    recipe file, and must be the recipe stage's assembled file byte for byte."""
    from moeq.quantize.stage import quantize_stage
    from moeq.choice.stage import FOLDERS, SEARCHED

    path, source_record = _source_for_quantize(ctx)
    made = []
    for i, name in enumerate(_candidate_names(quant)):
        if only is not None and i != only:
            continue
        spec, file = _candidate_spec(ctx, quant, name)
        stage = quantize_stage(spec, ctx.ws, ctx.chain, path, source_record, threads=threads, on_tensor=on_tensor,
                               on_message=ctx.say, output=ctx.ws.choice_dir(quant.type) / FOLDERS[name] / file,
                               record_as=f"{quant.type}-{FOLDERS[name]}",
                               silence_s=ctx.pipeline.toolchain.quantize_silence_s)
        record = run_stage(stage, ctx.records, force=force, on_message=ctx.say).record
        if name == SEARCHED:
            _require_rebuilt(ctx, quant, record)
        made.append((name, record))
    return made


def _require_rebuilt(ctx: Context, quant: QuantSpec, record: QuantizeRecord) -> None:
    """The searched file llama-quantize made from the recipe file is the one the search assembled and measured;
    the assembled copy is then deleted (the record keeps its sha256)."""
    found = ctx.records.require(RecipeRecord, quant.type)
    if record.output.sha256 != found.output.sha256:
        raise ToolError(f"{record.output.path}: llama-quantize made the searched recipe as sha256 "
                        f"{record.output.sha256[:12]}, but the search assembled and measured "
                        f"{found.output.sha256[:12]}; run moeq recipe --force --quant {quant.type}")
    Path(found.output.path).unlink(missing_ok=True)


def recipe(ctx: Context, quant: QuantSpec, force: bool = False) -> StageResult[RecipeRecord]:
    """The rung's recipe searched under its budget (quants[].recipe: search), from the record of its stock file
    (made with the importance matrix where the rung has one)."""
    from moeq.errors import ConfigError
    from moeq.recipe.stage import recipe_stage

    if quant.recipe != RECIPE_SEARCH:
        raise ConfigError(f"{ctx.pipeline.path}: quants: {quant.type} has no recipe: search; add it to search one")
    stock = _candidates(ctx, quant, only=0)[0][1]  # only its tensor rows are read; its file may be gone
    _path, source_record = _source_for_quantize(ctx)
    stage = recipe_stage(ctx.pipeline, quant, ctx.ws, ctx.chain, source_record(), stock, on_message=ctx.say)
    return run_stage(stage, ctx.records, force=force, on_message=ctx.say)


def recipe_plan(ctx: Context, quant: QuantSpec):
    """What the search of `quant` would cost, from the source's header (nothing is run)."""
    from moeq.recipe.stage import plan_search

    return plan_search(ctx.pipeline, quant, Path(source(ctx).output.path))


def quantize(ctx: Context, quant: QuantSpec, force: bool = False, threads: int | None = None,
             allow_requantize: bool = False, on_tensor=None, choose: bool = True) -> StageResult[QuantizeRecord]:
    """Quantize `quant`. With a choice to make (and bench.quality) the choice stage runs first and the file it chose
    is the one made (moved into place from its candidate; a searched one named TYPE_MOEQ). Without the choice
    (`choose` False for build --skip-bench; --allow-requantize, whose source is no F16 to measure against) the
    stock file is made, after the imatrix stage for `imatrix: auto`."""
    from moeq.quantize.stage import quantize_stage
    from moeq.choice.stage import FOLDERS

    chosen = choice(ctx, quant, threads=threads, on_tensor=on_tensor) if choose and not allow_requantize else None
    adopt, spec, file = None, quant, quant.file
    if chosen is not None:
        name = chosen.record.published.name
        spec, file = _candidate_spec(ctx, quant, name)
        adopt = ctx.records.get(QuantizeRecord, f"{quant.type}-{FOLDERS[name]}")
    elif quant.imatrix == IMATRIX_AUTO:
        spec = dataclasses.replace(quant, imatrix=Path(imatrix(ctx).record.output.path))
    path, source_record = _source_for_quantize(ctx)
    stage = quantize_stage(spec, ctx.ws, ctx.chain, path, source_record, threads=threads,
                           allow_requantize=allow_requantize, on_tensor=on_tensor, on_message=ctx.say, adopt=adopt,
                           output=ctx.ws.quant_path(file), silence_s=ctx.pipeline.toolchain.quantize_silence_s)
    done = run_stage(stage, ctx.records, force=force, on_message=ctx.say)
    if chosen is not None:  # measured and chosen: a Q4_K_M candidate of Phi-3.5-MoE is 25 GB
        for candidate in chosen.record.candidates:
            ctx.ws.choice_dir(quant.type).joinpath(FOLDERS[candidate.name], Path(candidate.file.path).name).unlink(
                missing_ok=True)
    for other in {quant.file, quant.searched_file} - {file}:  # the rung's file under its other name, from before
        for stale in (ctx.ws.quant_path(other), ctx.ws.quant_path(other + ".log")):
            stale.unlink(missing_ok=True)
    return done


def _source_for_quantize(ctx: Context) -> tuple[Path, Callable[[], FetchRecord]]:
    """The source's path now, and its record when it is ready: a `local` source is hashed beside
    llama-quantize (fetch_beside); other sources are recorded already (fetch, synth)."""
    spec = ctx.pipeline.source
    if spec.kind != "local" or not Path(spec.path).is_file():  # a missing file: the fetch stage says so
        record = source(ctx)
        return Path(record.output.path), lambda: record
    pending = ctx.source_pending or fetch_beside(ctx)
    return Path(spec.path), lambda: pending().record


def validate(ctx: Context, quant: QuantSpec, numerics: str = "sample", force: bool = False) -> StageResult[ValidateRecord]:
    from moeq.validate.stage import validate_stage

    stage = validate_stage(ctx.pipeline, quant, ctx.records.require(QuantizeRecord, quant.type), numerics)
    return run_stage(stage, ctx.records, force=force, on_message=ctx.say)


def bench(ctx: Context, quant: QuantSpec, modes: tuple[str, ...] | None = None, rpc: str | None = None,
          force: bool = False) -> StageResult[BenchRecord]:
    from moeq.bench.stage import bench_stage

    stage = bench_stage(ctx.pipeline, quant, ctx.ws, ctx.chain, ctx.records.require(QuantizeRecord, quant.type),
                        ctx.records.get(ValidateRecord, quant.type), modes=modes, rpc=rpc,
                        choice=ctx.records.get(ChoiceRecord, quant.type), on_message=ctx.say)
    return run_stage(stage, ctx.records, force=force, on_message=ctx.say)


def require_passed(what: str, checks: list[CheckResult], see: str = "") -> None:
    """A validation with a failed check fails (exit 7), in `moeq validate` and in `moeq build` alike."""
    failed = [c.name for c in checks if not c.ok]
    if failed:
        raise CheckFailed(f"{what}: failed {', '.join(failed)}" + (f"; see {see}" if see else ""))


def require_measured(benched: list[BenchRecord], records_dir: Path) -> None:
    """A bench with an error in any mode fails (exit 4), in `moeq bench` and in `moeq build` alike; the message
    says what was measured all the same."""
    failed = [f"{record.quant} {error.mode}" for record in benched for error in record.errors]
    if failed:
        measured = [f"{r.quant} {run.mode}" for r in benched for run in r.speed] + [f"{r.quant} quality"
                                                                                    for r in benched if r.quality]
        raise ToolError(f"bench recorded errors for {', '.join(failed)}; "
                        + (f"measured: {', '.join(measured)}" if measured else "nothing was measured")
                        + f" (see {records_dir})")


def shards(ctx: Context, quant: QuantSpec, force: bool = False) -> StageResult[ShardsRecord]:
    from moeq.shards.stage import shards_stage

    stage = shards_stage(ctx.pipeline, ctx.records.require(QuantizeRecord, quant.type), ctx.ws, ctx.chain)
    return run_stage(stage, ctx.records, force=force, on_message=ctx.say)


@dataclass(frozen=True)
class RepoUnit:
    """One Hub repo and the quants a command asks of it: each quant's own repo (hub.layout per-quant, `quant` its
    type), or the ladder's one repo (`quant` None), where the card and push stages run once for the ladder."""

    repo_id: str
    quant: str | None
    quants: tuple[QuantSpec, ...]
    together: tuple[str, ...] = ()  # per-quant: every quant the command publishes, whose repos a card may link


def repo_units(ctx: Context, quants: list[QuantSpec]) -> list[RepoUnit]:
    pipeline = ctx.pipeline
    if pipeline.single_repo:
        return [RepoUnit(pipeline.hub.repo, None, tuple(quants))] if quants else []
    together = tuple(q.type for q in quants)
    return [RepoUnit(pipeline.repo_id(q), q.type, (q,), together) for q in quants]


def published_quants(ctx: Context, quant: str | None, repo_id: str) -> set[str]:
    """The quants this workspace's last push to `repo_id` left there (its push record)."""
    record = ctx.records.get(PushRecord, quant)
    if record is None or record.repo_id != repo_id or record.create_pr:
        return set()
    return set(record.quants) or ({record.quant} if record.quant else set())


def card_quants(ctx: Context, unit: RepoUnit) -> list[QuantSpec]:
    """What the repo's card lists: in one repo, each quant of the ladder with a current file that did not fail
    validation, when it is asked for now or was in the repo at the last push; a quant never built is not listed."""
    if unit.quant is not None:
        return list(unit.quants)
    from moeq.cards.manifest import current_validate

    asked = {q.type for q in unit.quants}
    pushed = published_quants(ctx, None, unit.repo_id)
    listed = []
    for quant in ctx.pipeline.quants:
        if quant.type in asked:
            listed.append(quant)
        elif quant.type in pushed and ctx.records.get(QuantizeRecord, quant.type) is not None:
            validated = current_validate(ctx.records, quant.type)
            if validated is None or validated.ok:
                listed.append(quant)
    return listed


def _siblings(ctx: Context, unit: RepoUnit) -> list:
    """Per-quant layout: the other quants' repos the card may link, those that exist on the Hub (pushed from this
    workspace) or are asked for in the same command (pushed with it)."""
    from moeq.cards.manifest import current_validate

    if unit.quant is None:
        return []
    out = []
    for quant in ctx.pipeline.quants:
        quantized = ctx.records.get(QuantizeRecord, quant.type)
        if quant.type == unit.quant or quantized is None:
            continue
        repo_id = ctx.pipeline.repo_id(quant)
        if quant.type in unit.together or quant.type in published_quants(ctx, quant.type, repo_id):
            out.append((quant, quantized, current_validate(ctx.records, quant.type)))
    return out


def card(ctx: Context, unit: RepoUnit, force: bool = False) -> StageResult[CardRecord]:
    """The repo's card, from the current records; each listed quant's shards stage runs first when its record is
    not current."""
    from moeq.cards.manifest import CardInputs, RepoInputs
    from moeq.cards.stage import card_stage

    quants = [CardInputs.from_records(ctx.records, q, shards(ctx, q).record, warn=ctx.warn)
              for q in card_quants(ctx, unit)]
    inputs = RepoInputs(unit.repo_id, ctx.pipeline.hub.layout, ctx.records.get(FetchRecord), quants,
                        siblings=_siblings(ctx, unit))
    return run_stage(card_stage(ctx.pipeline, unit.quant, ctx.ws, inputs), ctx.records, force=force,
                     on_message=ctx.say)


def preview(ctx: Context, unit: RepoUnit, out: Path | None = None) -> Path:
    """The staged card as a standalone HTML page (WORKSPACE/previews/ladder.html or TYPE.html), its charts shown
    from the staged folder."""
    from moeq.cards.preview import write_preview
    from moeq.errors import InputError

    card = ctx.ws.repo_dir(unit.quant) / "README.md"
    if not card.is_file():
        raise InputError(f"{card}: no card yet; run moeq card --config {ctx.pipeline.path}"
                         f"{' --quant ' + unit.quant if unit.quant else ''}")
    out = out or ctx.ws.preview_path(unit.quant or "ladder")
    write_preview(card, out, title=unit.repo_id)
    return out


def push(ctx: Context, unit: RepoUnit, create_pr: bool | None = None, replace_card: bool = False,
         switch_layout: bool = False, prune: bool = False) -> StageResult[PushRecord]:
    from moeq.push.stage import push_stage

    stage = push_stage(ctx.pipeline, unit.quant, [q.type for q in unit.quants], ctx.api, ctx.records,
                       create_pr=create_pr, replace_card=replace_card, switch_layout=switch_layout, prune=prune,
                       on_message=ctx.say)
    return run_stage(stage, ctx.records, on_message=ctx.say)


def push_plan(ctx: Context, unit: RepoUnit, replace_card: bool = False, switch_layout: bool = False,
              prune: bool = False):
    """What `push` would send (read requests only)."""
    from moeq.push.stage import check_staged, planned

    card_record = ctx.records.require(CardRecord, unit.quant)
    check_staged(ctx.pipeline, unit.quant, card_record)
    return planned(ctx.api, ctx.pipeline, [q.type for q in unit.quants], ctx.records, card_record, replace_card,
                   switch_layout, prune)


@dataclass
class PushCheck:
    """`moeq push --check`: each repo's plan, and what differs in each README.md moeq would replace."""

    plans: list = field(default_factory=list)  # PushPlan per repo
    findings: list[str] = field(default_factory=list)

    @property
    def behind(self) -> list[str]:
        """The repos that do not hold exactly their staged files."""
        return [plan.repo_id for plan in self.plans if plan.changes]


def check_pushed(ctx: Context, units: list[RepoUnit], replace_card: bool = False, prune: bool = False) -> PushCheck:
    check = PushCheck()
    for unit in units:
        plan = push_plan(ctx, unit, replace_card=replace_card, prune=prune)
        check.plans.append(plan)
        if plan.repo_exists and any(f.path == "README.md" and f.action == "update" for f in plan.files):
            check.findings += hub_card_findings(ctx, plan.repo_id)  # which lines, as moeq card verify says
        check.findings += hub_link_findings(ctx, plan.repo_id, ctx.records.require(CardRecord, unit.quant))
    return check


def hub_link_findings(ctx: Context, repo_id: str, card_record: CardRecord) -> list[str]:
    """Every Hub repo the staged card links (other than the base model) must exist on the Hub."""
    from moeq.hub.client import hub_errors
    from moeq.manifest import README_NAME, read_manifest

    manifest = read_manifest(Path(card_record.folder) / "moeq-manifest.json")
    findings = []
    for sibling in manifest.siblings:
        with hub_errors("checking a linked repo", sibling.repo_id):
            if not ctx.api.repo_exists(sibling.repo_id):
                findings.append(f"{repo_id}/{README_NAME}: links {sibling.repo_id}, which is not on the Hub; push "
                                f"{sibling.quant} too")
    return findings


def hub_card_findings(ctx: Context, repo_id: str) -> list[str]:
    """`moeq card verify` on the repo's README.md, against the records manifest beside it on the Hub."""
    from moeq.cards.verify import card_template, verify_card
    from moeq.errors import InputError
    from moeq.hub.client import hub_errors, remote_text
    from moeq.manifest import MANIFEST_NAME, MAX_CARD_BYTES, MAX_MANIFEST_BYTES, README_NAME, parse_manifest

    where = f"{repo_id}/{README_NAME}"
    with hub_errors("reading the card", repo_id):
        text = remote_text(ctx.api, repo_id, README_NAME, MAX_CARD_BYTES)
        if MANIFEST_NAME not in ctx.api.list_repo_files(repo_id, revision="main"):
            return [f"{where}: no {MANIFEST_NAME} beside it on the Hub, so its lines cannot be checked"]
        manifest_text = remote_text(ctx.api, repo_id, MANIFEST_NAME, MAX_MANIFEST_BYTES)
    try:
        manifest = parse_manifest(manifest_text, f"{repo_id}/{MANIFEST_NAME}")
        template, _same = card_template(manifest, ctx.pipeline.card.template, f"{repo_id}/{MANIFEST_NAME}")
        return [f.format(where) for f in verify_card(text, manifest, template)]
    except InputError as exc:
        return [f"{where}: not checked: {exc.message}"]


def staged_files(ctx: Context, unit: RepoUnit) -> list[dict]:
    """The files the staged repo holds (path, action add, size): what a push would offer, without asking the Hub."""
    from moeq.push.stage import local_files

    return [{"path": f.path, "action": f.action, "size": f.size}
            for f in local_files(ctx.records.require(CardRecord, unit.quant)).values()]


# ------------------------------------------------------------ a release across machines (staging branch, publish)

def stage_inputs(ctx: Context, quant: QuantSpec, imatrix_sha256: str | None) -> dict:
    """What a quant staged on a branch was built from: moeq, the llama.cpp build, the source (a Hub source at its
    commit), the quant's entry and every pipeline section its records depend on (a file by its sha256), and the
    importance matrix. Two builds with the same inputs stage the same quant, so a rerun need not build again."""
    import json
    import re

    from moeq import __version__
    from moeq.hub.client import hub_errors

    def plain(value):
        if isinstance(value, Path):
            path = value if value.is_absolute() else ctx.pipeline.path.parent / value
            if path.is_file() and path.stat().st_size <= 256 << 20:
                return ctx.ws.hashes.sha256(path)  # the workspace's sha256 cache, not a second read
            return f"{path.name}:{path.stat().st_size if path.exists() else 'absent'}"
        raise TypeError(type(value).__name__)

    from moeq.fetch.stage import HUB_KINDS

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
        return _imported_imatrix(imatrix_from)[0].record.output.sha256
    made = ctx.records.get(ImatrixRecord)
    return made.output.sha256 if made else IMATRIX_AUTO


def staged_already(ctx: Context, quant: QuantSpec, branch: str, imatrix_from: Path | None) -> str | None:
    """Why `quant` need not be built for `branch`: staged there from the same inputs, its files as its records say."""
    from moeq.push.staging import current_on_branch

    inputs = stage_inputs(ctx, quant, imatrix_sha256(ctx, quant, imatrix_from))
    return current_on_branch(ctx.api, ctx.pipeline.hub.repo, branch, quant.type, inputs)


def stage_to_branch(ctx: Context, unit: RepoUnit, branch: str) -> StageResult[PushRecord]:
    """Each quant of the ladder's repo this build made, staged on `branch` (moeq build --stage-to); main untouched."""
    import time

    from moeq.hub.client import require_token
    from moeq.push.staging import stage_quant

    started = time.monotonic()
    require_token()
    card_record = ctx.records.require(CardRecord, None)
    records = []
    for quant in unit.quants:
        inputs = stage_inputs(ctx, quant, imatrix_sha256(ctx, quant))
        records.append(stage_quant(ctx.api, card_record, quant.type, branch, inputs, ctx.pipeline.hub.private,
                                   on_message=ctx.say))
    last = next((r for r in reversed(records) if r.commit), records[-1])
    merged = last.model_copy(update={"quants": [q.type for q in unit.quants],
                                     "files": [f for r in records for f in r.files],
                                     "uploaded_bytes": sum(r.uploaded_bytes for r in records)})
    status = "ran" if any(r.commit for r in records) else "up to date"
    return StageResult("push", status, f"staged on {branch}", round(time.monotonic() - started, 3), merged)


def _imported_imatrix(folder: Path):
    """The imatrix record of another workspace (FOLDER/records/imatrix.json), read bounded, its paths kept inside
    FOLDER, and the matrix file it names checked against its size and sha256: (saved record, the file)."""
    from moeq.errors import InputError
    from moeq.record_store import load_saved
    from moeq.workspace import sha256_file

    path = Path(folder) / "records" / "imatrix.json"
    if not path.is_file() or path.stat().st_size > 1 << 20:
        raise InputError(f"{path}: no imatrix record of at most 1 MB there; pass the folder the imatrix job made "
                         "(its records/imatrix.json and imatrix/)")
    saved, why = load_saved(path, ImatrixRecord)
    if saved is None:
        raise InputError(f"{path}: {why}; make the importance matrix again with this moeq (moeq imatrix)")
    made = Path(saved.record.output.path)
    if not made.resolve().is_relative_to(Path(folder).resolve()):  # a link out of FOLDER is followed, then refused
        raise InputError(f"{path}: its importance matrix {made} lies outside {folder} (a link leaving it?); pass the "
                         "folder the imatrix job made, with its files in it")
    if not made.is_file() or made.stat().st_size != saved.record.output.size or \
            sha256_file(made) != saved.record.output.sha256:
        raise InputError(f"{made}: not the importance matrix its record {path} describes (size or sha256 differ); "
                         "download the imatrix job's files again")
    return saved, made


def imatrix_from(ctx: Context, folder: Path) -> StageResult[ImatrixRecord]:
    """The importance matrix another workspace made (moeq build --imatrix-from), checked by sha256 against its
    record and by its record's key against the inputs this workspace's imatrix stage declares (the same source,
    calibration text, options and llama-imatrix), then put in place, so the imatrix stage here is up to date."""
    import json
    import shutil

    from moeq.errors import InputError
    from moeq.imatrix.stage import imatrix_stage
    from moeq.stage_runner import declared_key
    from moeq.workspace import inside, partial_file, write_json_atomic

    saved, made = _imported_imatrix(folder)
    stage = imatrix_stage(ctx.pipeline, ctx.ws, ctx.chain, source(ctx), on_message=ctx.say)
    key = declared_key(stage)
    if saved.key != key:
        changed = sorted(k for k in {*key, *(saved.key or {})} if (saved.key or {}).get(k) != key.get(k))
        raise InputError(f"{made}: made from other inputs than this workspace's ({', '.join(changed)} differ); use "
                         "the importance matrix made for this source and pipeline, or make it here (moeq imatrix)")
    record_path = Path(folder) / "records" / "imatrix.json"
    relative = made.resolve().relative_to(Path(folder).resolve()).as_posix()
    here = inside(ctx.ws.root, relative)
    if here is None:
        raise InputError(f"{record_path}: names {relative}, outside a workspace")
    if not (here.is_file() and ctx.ws.hashes.sha256(here) == saved.record.output.sha256):
        here.parent.mkdir(parents=True, exist_ok=True)
        with partial_file(here) as partial:
            shutil.copyfile(made, partial)
    ctx.records.ws.records_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(ctx.ws.record_path("imatrix"), json.loads(record_path.read_text()))
    done = run_stage(stage, ctx.records, on_message=ctx.say)
    if not done.up_to_date:  # cannot happen with an equal key and an intact file; never a second matrix silently
        raise InputError(f"{made}: the imatrix stage ran again here ({done.why}); the quants would differ")
    ctx.say(f"imatrix: {made} (sha256 {saved.record.output.sha256[:12]}) checked against its record and used")
    return dataclasses.replace(done, why=f"from {folder}")


def publish(ctx: Context, branch: str, keep_branch: bool = False) -> StageResult[PushRecord]:
    """moeq publish: every quant of the ladder as its build staged it on `branch`, in one commit on main with the
    one card for the ladder, the manifest and the charts; the GGUFs are copied on the Hub, not uploaded. Refused,
    main unchanged, when a quant of the ladder is not staged. Then the branch is deleted."""
    from moeq.cards.manifest import merge_staged
    from moeq.cards.stage import branch_card_stage
    from moeq.errors import InputError
    from moeq.hub.client import require_token
    from moeq.push.staging import delete_branch, read_staged, take_from_branch

    require_token()
    pipeline = ctx.pipeline
    repo_id = pipeline.hub.repo
    ladder = [q.type for q in pipeline.quants]
    staged = read_staged(ctx.api, repo_id, branch, ladder)
    if staged.missing:
        raise InputError(f"{repo_id}@{branch}: {', '.join(staged.missing)} not staged (its build did not finish); "
                         f"main is unchanged. Run it (moeq build --quant {staged.missing[0]} --stage-to {branch}), "
                         "then publish again")
    manifest = merge_staged(pipeline, [(f"{repo_id}@{branch}/.moeq-stage/{q}.json", staged.found[q].manifest)
                                       for q in ladder])
    run_stage(branch_card_stage(pipeline, ctx.ws, manifest, branch, staged.commit), ctx.records, on_message=ctx.say)
    preview(ctx, RepoUnit(repo_id, None, tuple(pipeline.quants)))
    taken = take_from_branch(ctx.api, ctx.records.require(CardRecord, None))
    for name in taken:
        ctx.say(f"{repo_id}@{branch}: {name} read from the branch and checked")
    done = push(ctx, RepoUnit(repo_id, None, tuple(pipeline.quants)))
    if not keep_branch:
        delete_branch(ctx.api, repo_id, branch)
        ctx.say(f"{repo_id}: deleted the staging branch {branch}")
    return done
