"""Building the records manifest: one JSON file, published beside the card, holding every record it was built from.

The card is rendered from this manifest and nothing else, so `moeq card verify` can rebuild the same
facts from the published manifest and check that every figure in the card comes from a record.
Local paths are reduced to file names: a maintainer's folders are nobody's business.

    manifest = build_manifest(pipeline, RepoInputs(repo_id, "single", source, [CardInputs.from_records(...)]), ws)
    manifest.quants[0].records.quantize.quant_bpw
    # -> 8.5
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Callable

from moeq import __version__
from moeq.cards.charts import charts
from moeq.cards.history import PublishedRepo, with_history
from moeq.cards.render import DEFAULT_TEMPLATE, templates_sha256
from moeq.config import Layout, Pipeline, QuantSpec
from moeq.errors import InputError
from moeq.manifest import MANIFEST_NAME, MANIFEST_VERSION, README_NAME, Manifest
from moeq.record_store import R, Records
from moeq.records import (BenchRecord, ChoiceRecord, CompareRecord, FetchRecord, FileRef, ImatrixRecord, QuantizeRecord, RecipeRecord,
                          ShardsRecord, ValidateRecord, record_json)
from moeq.workspace import Workspace, inside

PATH_KEYS = {"path", "file"}


@dataclass
class CardInputs:
    """The records one quant's part of a card is made from, each the current one for the quant's file (a stale
    one is None)."""

    quantized: QuantizeRecord
    validated: ValidateRecord | None
    bench: BenchRecord | None
    shards: ShardsRecord
    imatrix: ImatrixRecord | None = None  # the imatrix stage's record, when the quant was made with its output
    choice: ChoiceRecord | None = None  # how the file was chosen, when its quality figures are the choice's
    recipe: RecipeRecord | None = None  # the search, when its recipe was one of the choice's candidates

    @property
    def quant(self) -> str:
        return self.quantized.quant

    @property
    def imatrix_file(self) -> FileRef | None:
        """The importance matrix the quant was made with: published in its repo."""
        used = self.quantized.options.imatrix
        if used is None:
            return None
        path = Path(used.path)
        return FileRef(path=used.path, size=path.stat().st_size if path.is_file() else 0, sha256=used.sha256)

    @property
    def recipe_file(self) -> FileRef | None:
        """The recipe file the quant was made with (--tensor-type-file): published in its repo."""
        return self.quantized.options.tensor_type_file

    @classmethod
    def from_records(cls, records: Records, quant: QuantSpec, shards: ShardsRecord,
                     warn: Callable[[str], None] = lambda _msg: None) -> "CardInputs":
        quantized = records.require(QuantizeRecord, quant.type)
        imatrix = records.get(ImatrixRecord)
        used = quantized.options.imatrix
        if imatrix is not None and (used is None or imatrix.output.sha256 != used.sha256):
            imatrix = None  # another matrix than the one this file was made with
        bench = _current(records, BenchRecord, quant.type, quantized, warn)
        choice = _choice_of(records.get(ChoiceRecord, quant.type), quantized, bench)
        return cls(quantized=quantized, validated=_current(records, ValidateRecord, quant.type, quantized, warn),
                   bench=bench, shards=shards, imatrix=imatrix, choice=choice,
                   recipe=_recipe_of(records.get(RecipeRecord, quant.type), choice))


@dataclass
class RepoInputs:
    """What one Hub repo's card is made from: the quants it holds, and (per-quant layout) the sibling repos it
    links, each as (quant, its quantize record, its validate record)."""

    repo_id: str
    layout: str
    source: FetchRecord | None
    quants: list[CardInputs]
    siblings: list[tuple[QuantSpec, QuantizeRecord, ValidateRecord | None]] = dataclasses.field(default_factory=list)
    published: PublishedRepo | None = None  # main on the Hub before this release: what it supersedes and changes
    prune: bool = False  # the push deletes what it supersedes (push --prune): nothing is listed as kept
    compared: list[CompareRecord] = dataclasses.field(default_factory=list)  # other publishers' files, measured


def _choice_of(choice: ChoiceRecord | None, quantized: QuantizeRecord,
               bench: BenchRecord | None) -> ChoiceRecord | None:
    """The choice record, when it chose this very file and the bench's quality figures are its own (the card shows
    them side by side with the candidates not published)."""
    if (choice is None or choice.published.file.sha256 != quantized.output.sha256 or bench is None
            or bench.quality is None or bench.quality.quant != choice.published.quality):
        return None
    return choice


def _recipe_of(recipe: RecipeRecord | None, choice: ChoiceRecord | None) -> RecipeRecord | None:
    """The recipe record, when the choice measured the file it describes."""
    if recipe is None or choice is None or all(c.file.sha256 != recipe.output.sha256 for c in choice.candidates):
        return None
    return recipe


def current_validate(records: Records, quant: str) -> ValidateRecord | None:
    """A quant's validate record when it describes its current file."""
    return _current(records, ValidateRecord, quant, records.get(QuantizeRecord, quant), lambda _msg: None)


def _current(records: Records, cls: type[R], quant: str, quantized: QuantizeRecord | None,
             warn: Callable[[str], None]) -> R | None:
    """The validate or bench record of `quant` when it describes the current file; a stale one is ignored."""
    record = records.get(cls, quant)
    stage = cls.stage_name()
    if record is not None and quantized is not None and record.file.sha256 != quantized.output.sha256:
        warn(f"{records.ws.record_path(stage, quant)}: describes an older {quant} file; ignored (run moeq {stage} "
             "again)")
        return None
    return record


def _strip_paths(value: Any, key: str = "") -> Any:
    """Replace local paths by file names, recursively; `X.partial` (what a tool wrote) by X."""
    if isinstance(value, dict):
        return {k: _strip_paths(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_paths(v, key) for v in value]
    if not isinstance(value, str):
        return value
    if (key in PATH_KEYS or key == "command") and "/" in value or value.startswith(("/", "~")):
        value = PurePath(value).name
    if key == "command" and value.endswith(".partial"):
        value = value[: -len(".partial")]
    return value


def _published(record) -> dict | None:
    return _strip_paths(record_json(record)) if record is not None else None


def repo_paths(pipeline: Pipeline, quant: CardInputs) -> list[str]:
    """Where the quant's GGUF files go in its repo. One repo for the ladder keeps a split quant's shards in a folder
    of their own (`<stem>-<QUANT>/<stem>-<QUANT>-00001-of-0000N.gguf`), as llama.cpp and the Hub expect."""
    names = [Path(f.path).name for f in quant.shards.files]
    if pipeline.single_repo and len(names) > 1:
        folder = Path(quant.quantized.output.path).name.removesuffix(".gguf")
        return [f"{folder}/{name}" for name in names]
    return names


def _beside_entry(quant: CardInputs, ref: FileRef | None, what: str, rename: str, taken: dict[str, str],
                  ws: Workspace) -> dict | None:
    """A file the quant was made with (its importance matrix, its recipe file) as a repo file, checked: the one the
    quant was made with, and its name free in the repo (`taken`: path -> sha256 of what already uses it)."""
    if ref is None:
        return None
    name = Path(ref.path).name
    if taken.get(name, ref.sha256) != ref.sha256:
        raise InputError(ref.path,
                         f"the {what} would be published as {name}, a name the repo already uses for another file",
                         rename)
    if not Path(ref.path).is_file() or ws.hashes.sha256(Path(ref.path)) != ref.sha256:
        raise InputError(ref.path, f"not the {what} {quant.quant} was made with (gone or changed since)",
                         f"run moeq quantize --quant {quant.quant} again")
    taken[name] = ref.sha256
    return {"name": name, "size": ref.size, "sha256": ref.sha256}


def _published_license(source: FetchRecord | None) -> FileRef | None:
    """The license file that came with the source, published in every repo of the ladder when it is still there."""
    if source is None or source.license is None or not Path(source.license.path).is_file():
        return None
    return source.license


def _license_entry(source: FetchRecord | None, taken: dict[str, str]) -> dict | None:
    ref = _published_license(source)
    if ref is None:
        return None
    name = Path(ref.path).name
    if name in taken:
        raise InputError(ref.path, f"the license would be published as {name}, a name the repo already uses",
                             "rename the license file")
    taken[name] = ref.sha256
    return {"name": name, "size": ref.size, "sha256": ref.sha256}


def build_manifest(pipeline: Pipeline, inputs: RepoInputs, ws: Workspace) -> Manifest:
    """The repo's quants with their records, its linked siblings and the pipeline's card facts, as one Manifest."""
    taken = {README_NAME: "", MANIFEST_NAME: ""}
    entries = []
    for quant in inputs.quants:
        validated = quant.validated
        if validated is not None and not validated.ok:
            raise InputError(ws.record_path('validate', quant.quant),
                             f"{quant.quant} failed validation ({', '.join(validated.failed)})",
                             "fix the file before making its card")
        files = [{"name": path, "size": f.size, "sha256": f.sha256}
                 for path, f in zip(repo_paths(pipeline, quant), quant.shards.files)]
        for f in files:
            if f["name"] in taken:
                raise InputError(quant.quantized.output.path,
                                 f"would be published as {f['name']}, a name the repo already uses",
                                 "give the quant another file name (quants[].file)")
            taken[f["name"]] = f["sha256"]
        entries.append({
            "quant": quant.quant, "files": files,
            "imatrix_file": _beside_entry(quant, quant.imatrix_file, "importance matrix", "rename the imatrix file",
                                          taken, ws),
            "recipe_file": _beside_entry(quant, quant.recipe_file, "recipe", "give the quant another file name "
                                         "(quants[].file)", taken, ws),
            "records": {"imatrix": _published(quant.imatrix), "choice": _published(quant.choice),
                        "recipe": _published(quant.recipe),
                        "quantize": _published(quant.quantized),
                        "validate": _published(validated), "bench": _published(quant.bench)},
        })
    license_file = _license_entry(inputs.source, taken)
    manifest = _assembled(pipeline, inputs.layout, inputs.repo_id, _published(inputs.source), entries,
                          [_sibling(pipeline, *sibling) for sibling in inputs.siblings], taken, license_file,
                          [_published(record) for record in inputs.compared])
    return with_history(manifest, inputs.published, inputs.prune)


def _assembled(pipeline: Pipeline, layout: str, repo_id: str, source: dict | None, entries: list[dict],
               siblings: list[dict], taken: dict[str, str], license_file: dict | None,
               compared: list[dict] = ()) -> Manifest:
    template = pipeline.card.template or DEFAULT_TEMPLATE
    manifest = Manifest.model_validate({
        "manifest_version": MANIFEST_VERSION,
        "generator": f"moeq {__version__}",
        "layout": layout,
        "repo_id": repo_id,
        "pipeline": {
            "model": _strip_paths(dataclasses.asdict(pipeline.model)),
            "card_extra": dict(pipeline.card.extra),
        },
        "card": {"template": template.name, "builtin": pipeline.card.template is None,
                 "templates_sha256": templates_sha256(template)},
        "source": source,
        "quants": entries,
        "siblings": siblings,
        "repo_files": sorted(taken),
        "license_file": license_file,
        "compared": list(compared),
    })
    images = [chart.path for chart in charts(manifest)]  # drawn from this manifest by the card stage
    return manifest.model_copy(update={"repo_files": sorted([*manifest.repo_files, *images])})


def merge_staged(pipeline: Pipeline, staged: list[tuple[str, Manifest]]) -> Manifest:
    """The ladder's one manifest from the manifests each quant's own build staged (moeq publish): their entries in
    the order given, made by this moeq from one source, under this pipeline's model facts and template.
    `staged`: (where the manifest was read, the manifest) per quant."""
    first_where, first = staged[0]
    taken = {README_NAME: "", MANIFEST_NAME: ""}
    entries = []
    for where, manifest in staged:
        redo = f"stage {manifest.quants[0].quant} again with this moeq and pipeline"
        if manifest.generator != f"moeq {__version__}":
            raise InputError(where, f"staged by {manifest.generator}, this is moeq {__version__}", redo)
        if manifest.repo_id != pipeline.hub.repo or manifest.layout != Layout.SINGLE:
            raise InputError(where, f"staged for {manifest.repo_id} ({manifest.layout}), the pipeline publishes "
                             f"{pipeline.hub.repo} (single)", redo)
        if manifest.source != first.source or manifest.license_file != first.license_file:
            raise InputError(where,
                             f"made from another source than {first_where} (its fetch record or license differs)", redo)
        tool, first_tool = manifest.quants[0].records.quantize.tool, first.quants[0].records.quantize.tool
        if tool.commit != first_tool.commit:
            raise InputError(where, f"made with llama.cpp {tool.commit}, {first_where} with {first_tool.commit}",
                             f"{redo} and llama.cpp build")
        entry = manifest.quants[0]
        license_file = [manifest.license_file] if manifest.license_file else []
        for f in [*entry.files, *(extra for extra in (entry.imatrix_file, entry.recipe_file) if extra), *license_file]:
            if inside(Path("repo"), f.name) is None or f.name.startswith(".") or len(f.name) > 250:
                raise InputError(where,
                                 f"names the repo file {f.name[:80]!r}, not a path inside the repo moeq publishes",
                                 redo)
            if f in license_file:
                continue
            if taken.get(f.name, f.sha256) != f.sha256:
                raise InputError(where, f"publishes {f.name}, which another staged quant publishes with other bytes",
                                 redo)
            taken[f.name] = f.sha256
        entries.append(entry.model_dump(mode="json", by_alias=True))
    license_file = first.license_file.model_dump(mode="json") if first.license_file else None
    if license_file:
        taken[license_file["name"]] = license_file["sha256"]
    source = first.source.model_dump(mode="json") if first.source else None
    return _assembled(pipeline, "single", pipeline.hub.repo, source, entries, [], taken, license_file)


def _sibling(pipeline: Pipeline, quant: QuantSpec, quantized: QuantizeRecord, validated: ValidateRecord | None) -> dict:
    """A sibling repo's row of the ladder table, from its own records."""
    cpu_moe = None
    if validated is not None:
        cpu_moe = validated.plan.placement(validated.plan.n_layer).gpu_bytes  # N = every layer: --cpu-moe
    return {"quant": quant.type, "repo_id": pipeline.repo_id(quant), "file": Path(quantized.output.path).name,
            "size": quantized.output.size, "bpw": quantized.quant_bpw, "cpu_moe_gpu_bytes": cpu_moe}
