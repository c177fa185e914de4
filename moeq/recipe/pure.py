"""The per-type files a search assembles its recipes from: for each type, the tensors a search may give that type,
as llama-quantize `--pure` makes them from the source (with the importance matrix where the rung has one).

A search moves each tensor at most one step from the stock file's type (to the next type by bits per weight it can
take, K or IQ), so a type's file needs only the tensors whose stock type is that type or a step beside it
(`needed_tensors`). llama-quantize makes the file with every other tensor at the cheapest type (FILLER: the
quickest to make, too), and moeq keeps only the metadata, the tensors needed and the unquantized ones (norms, the
router), dropping the rest: for Phi-3.5-MoE a searched Q2_K with an importance matrix keeps about a third of six
whole K files. The files are kept by what they are made from (WORKSPACE/recipe/pure/KEY/, KEY the source, the
importance matrix and the llama.cpp commit) and shared by every rung's search of that source and matrix: a search
that needs tensors no file holds yet adds a part with only those (TYPE-2.gguf, ...), and never makes again what is
there.

    files = type_files(ws, tool, source, imatrix, needed_tensors(stock_types, "Q2_K", ladder), print)
    files.path_of("blk.0.ffn_down_exps.weight", "Q4_K")
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Callable

from moeq.errors import InputError
from moeq.gguf_header import UNQUANTIZED, read_header
from moeq.quant_types import tensor_bytes
from moeq.recipe.assemble import assemble
from moeq.recipe.search import TYPE_LADDER, Ladder, recipe_lines
from moeq.recipe_file import ENDS, FILLER, pure_ftype
from moeq.records import FileRef, ImatrixRef
from moeq.runner import run_tool
from moeq.workspace import Workspace, partial_file, require_free, write_json_atomic, write_text_atomic


def needed_tensors(stock_types: dict[str, str], base: str, ladder: Ladder) -> dict[str, frozenset[str]]:
    """For each type a search of this stock file may use, the tensors it may give that type (each tensor's stock
    type and the next type either side on the `ladder`); the base type always has an entry: its file gives a recipe
    its metadata."""
    needs: dict[str, set[str]] = {base: set()}
    for name, stock in stock_types.items():
        for ggml_type in ladder.moves(name, stock).values():
            needs.setdefault(ggml_type, set()).add(name)
    return {t: frozenset(needs[t]) for t in sorted(needs, key=TYPE_LADDER.index)}


def union(*needs: dict[str, frozenset[str]]) -> dict[str, frozenset[str]]:
    out: dict[str, frozenset[str]] = {}
    for need in needs:
        for ggml_type, names in need.items():
            out[ggml_type] = out.get(ggml_type, frozenset()) | names
    return {t: out[t] for t in sorted(out, key=TYPE_LADDER.index)}


def needed_bytes(needs: dict[str, frozenset[str]], shapes: dict[str, list[int]]) -> int:
    """What the tensors of `needs` weigh in the files holding them."""
    return sum(tensor_bytes(shapes[name], ggml_type) for ggml_type, names in needs.items() for name in names)


@dataclass(frozen=True)
class Part:
    """One file of one type: the quantized tensors it holds at that type (and every unquantized tensor)."""

    ggml_type: str
    path: Path
    tensors: frozenset[str]


@dataclass(frozen=True)
class TypeFiles:
    key: str  # what they are made from: the source, the importance matrix, the llama.cpp commit
    parts: tuple[Part, ...]

    def path_of(self, name: str, ggml_type: str) -> Path:
        for part in self.parts:
            if part.ggml_type == ggml_type and name in part.tensors:
                return part.path
        raise InputError(name, f"no per-type file holds it at {ggml_type}", "run the search again: it makes what is "
                         "missing")

    def metadata_file(self, ggml_type: str) -> Path:
        """The file a recipe of this base type takes its metadata and unquantized tensors from."""
        return next(part.path for part in self.parts if part.ggml_type == ggml_type)

    def sizes(self) -> dict[str, dict[str, int]]:
        """Each tensor's bytes at each type a file holds it at."""
        out: dict[str, dict[str, int]] = {}
        for part in self.parts:
            infos = {t.name: t.n_bytes for t in read_header(part.path).tensors}
            out.setdefault(part.ggml_type, {}).update({name: infos[name] for name in part.tensors})
        return out

    @property
    def types(self) -> list[str]:
        """The types the parts hold, lowest to highest."""
        return sorted({part.ggml_type for part in self.parts}, key=TYPE_LADDER.index)

    def disk_bytes(self) -> int:
        return sum(part.path.stat().st_size for part in self.parts)

    def assemble(self, order: list[str], base: str, types: dict[str, str], out: Path,
                 file_type: int | None = None) -> None:
        """Write the recipe giving each tensor of `types` its type (the tensors of `order` it does not name are
        unquantized: taken with the metadata from the base type's file), in `order`, to `out`, as a file of
        `file_type` where given (general.file_type: the rung's, where the base type's file was made as another)."""
        meta = self.metadata_file(base)
        assemble(meta, [(name, self.path_of(name, types[name]) if name in types else meta) for name in order], out,
                 file_type)


def type_files(ws: Workspace, tool, source: FileRef, imatrix: ImatrixRef | None,
               needs: dict[str, frozenset[str]], on_message: Callable[[str], None]) -> TypeFiles:
    """The per-type files of `source` (the F16) holding `needs`, made with `tool` (llama-quantize) and `imatrix`
    where a tensor is missing."""
    key = hashlib.sha256(json.dumps([source.sha256, imatrix.sha256 if imatrix else None,
                                     tool.build.commit]).encode()).hexdigest()[:16]
    folder = ws.root / "recipe" / "pure" / key
    folder.mkdir(parents=True, exist_ok=True)
    with ws.lock(f"pure-{key}", on_wait=on_message):  # one list of parts, written by one search at a time
        parts = _made(ws, folder)
        for ggml_type, names in needs.items():
            held = frozenset().union(*(p.tensors for p in parts if p.ggml_type == ggml_type))
            if names - held or not any(p.ggml_type == ggml_type for p in parts):
                taken = {p.path.name for p in parts}
                path = next(folder / name for n in count(1)
                            if (name := f"{ggml_type}.gguf" if n == 1 else f"{ggml_type}-{n}.gguf") not in taken)
                _make(ws, tool, source, imatrix, ggml_type, names - held, path, on_message)
                parts.append(Part(ggml_type, path, names - held))
                _save(ws, folder, parts)
        return TypeFiles(key, tuple(p for p in parts if p.ggml_type in needs))


def _made(ws: Workspace, folder: Path) -> list[Part]:
    """The parts made.json lists whose file is still the one it made (a changed or missing one is made again)."""
    path = folder / "made.json"
    try:
        listed = json.loads(path.read_text())["parts"] if path.is_file() else []
        parts = [(Part(p["type"], folder / Path(p["file"]).name, frozenset(p["tensors"])), p["sha256"])
                 for p in listed]
    except (ValueError, KeyError, TypeError):
        return []  # another version's list, or a damaged one: everything is made again
    return [part for part, sha in parts if part.path.is_file() and ws.hashes.sha256(part.path) == sha]


def _save(ws: Workspace, folder: Path, parts: list[Part]) -> None:
    write_json_atomic(folder / "made.json", {"parts": [
        {"type": p.ggml_type, "file": p.path.name, "sha256": ws.hashes.sha256(p.path), "tensors": sorted(p.tensors)}
        for p in parts]})


def _make(ws: Workspace, tool, source: FileRef, imatrix: ImatrixRef | None, ggml_type: str,
          names: frozenset[str], path: Path, on_message: Callable[[str], None]) -> None:
    """llama-quantize --pure `ggml_type` with every quantized tensor but `names` at FILLER, cut down to `names` (made
    as the quant type whose --pure type it is: IQ2_M for IQ2_S tensors)."""
    source_path = Path(source.path).resolve()
    header = read_header(source_path)
    shapes = {t.name: t.shape for t in header.tensors}
    quantized = {name: shape for name, shape in shapes.items() if len([d for d in shape if d > 1]) > 1}
    plural = "s" if len(names) != 1 else ""
    on_message(f"llama-quantize --pure {pure_ftype(ggml_type)}: the {len(names)} tensor{plural} a search may give "
               f"{ggml_type} (the rest made {FILLER} and dropped)")
    made = sum(tensor_bytes(shape, ggml_type if name in names else FILLER) for name, shape in quantized.items())
    require_free(path.parent, made + sum(tensor_bytes(shapes[n], ggml_type) for n in names),
                 f"the --pure {ggml_type} file")
    ends = {end: ggml_type.lower() if end in names else FILLER.lower() for end in ENDS}
    filler = path.with_suffix(".filler")
    lines = recipe_lines({name: FILLER for name in quantized if name not in names}, ggml_type)
    write_text_atomic(filler, "".join(f"{pattern}={filler_type}\n" for pattern, filler_type in lines))
    command = [str(tool.path), "--pure", "--token-embedding-type", ends[ENDS[0]],
               "--output-tensor-type", ends[ENDS[1]], "--tensor-type-file", str(filler.resolve())]
    if imatrix is not None:
        command += ["--imatrix", Path(imatrix.path).name]
    whole = path.with_suffix(".whole.gguf")
    try:
        with partial_file(whole) as partial:
            run_tool([*command, str(source_path), str(partial.resolve()), pure_ftype(ggml_type)],
                     path.with_suffix(".log"), cwd=Path(imatrix.path).resolve().parent if imatrix else None)
        kept = [t.name for t in read_header(whole).tensors if t.name in names or t.type in UNQUANTIZED]
        assemble(whole, [(name, whole) for name in kept], path)
    finally:
        whole.unlink(missing_ok=True)
        filler.unlink(missing_ok=True)
