"""A recipe's file assembled from the search's per-type files equals llama-quantize's own, byte for byte.

Real llama-quantize on the tiny model: the per-type files a search keeps (each cut down to the tensors that may
take its type; recipe/pure.py), K and IQ types, then the same recipe quantized directly with `--tensor-type-file`.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from moeq.errors import InputError
from moeq.gguf_header import read_header
from moeq.quant_types import BASE_TENSOR_TYPE, lookup, tensor_bytes
from moeq.recipe.pure import needed_tensors, type_files
from moeq.recipe.search import Ladder
from moeq.records import FileRef, ImatrixRef
from moeq.texts import shipped_calibration
from moeq.recipe_file import recipe_types
from moeq.workspace import Workspace

# per variant: the rung (its general.file_type is written over the base type's file's), and a recipe of K and IQ types
# (those that need an importance matrix entry only where there is a matrix)
VARIANTS = {
    "no imatrix": ("Q3_K_L", [("attn", "q8_0"), ("ffn_down_exps", "iq4_xs"), ("blk\\.0\\.ffn_(gate|up)_exps", "q4_k"),
                              ("ffn_(gate|up)_exps", "q2_k")]),
    "imatrix": ("IQ2_M", [("attn", "q8_0"), ("ffn_down_exps", "iq3_xxs"), ("blk\\.0\\.ffn_(gate|up)_exps", "q4_k"),
                          ("ffn_(gate|up)_exps", "iq2_s")]),
}
ENDS = ["--token-embedding-type", "q8_0", "--output-tensor-type", "q8_0"]


def quantize(toolchain, source: Path, out: Path, base: str, *extra: str) -> Path:
    """llama-quantize run beside the importance matrix, named as the search names it (it is in the metadata)."""
    proc = subprocess.run([str(toolchain.path("llama-quantize")), "--pure", *ENDS, *extra, str(source), str(out),
                           base], capture_output=True, text=True, timeout=300, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module", params=["no imatrix", "imatrix"])
def pure(request, tmp_path_factory, toolchain, tiny_model):
    """The per-type files a search of the recipe's types would keep, made with an importance matrix (computed here
    on moeq's calibration text) or without."""
    folder = tmp_path_factory.mktemp("recipe")
    extra, imatrix = [], None
    if request.param == "imatrix":
        matrix = folder / "tiny.imatrix"
        proc = subprocess.run([str(toolchain.path("llama-imatrix")), "-m", str(tiny_model), "-f",
                               str(shipped_calibration()), "--chunks", "2", "-c", "128", "-o", str(matrix)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        extra, imatrix = ["--imatrix", matrix.name], ImatrixRef(path=str(matrix), sha256=sha256(matrix))
    rung, recipe = VARIANTS[request.param]
    header = read_header(tiny_model)
    names = [t.name for t in header.tensors if t.name.endswith("_exps.weight")
             or ("attn_" in t.name and t.name.endswith(".weight") and "norm" not in t.name)]
    types = recipe_types(recipe, names) | {"token_embd.weight": "Q8_0", "output.weight": "Q8_0"}
    source = FileRef(path=str(tiny_model), size=tiny_model.stat().st_size, sha256=sha256(tiny_model))
    ladder = Ladder.of(imatrix is not None, {t.name: t.shape for t in header.tensors})
    files = type_files(Workspace(folder / "work"), toolchain.tool("llama-quantize"), source, imatrix,
                       needed_tensors(types, BASE_TENSOR_TYPE[rung], ladder), lambda _msg: None)
    return folder, files, types, extra, rung, recipe


def test_an_assembled_file_is_the_file_llama_quantize_makes(pure, toolchain, tiny_model):
    folder, files, types, extra, rung, recipe = pure
    recipe_path = folder / "recipe.txt"
    recipe_path.write_text("".join(f"{pattern}={ggml_type}\n" for pattern, ggml_type in recipe))
    direct = quantize(toolchain, tiny_model, folder / "direct.gguf", rung, *extra, "--tensor-type-file",
                      str(recipe_path))
    gate_up = recipe[-1][1].upper()
    assert types["blk.0.ffn_up_exps.weight"] == "Q4_K" and types["blk.1.ffn_up_exps.weight"] == gate_up  # first wins
    assert types["blk.1.attn_q.weight"] == "Q8_0"
    order = [t.name for t in read_header(direct).tensors]
    assembled = folder / "assembled.gguf"
    files.assemble(order, BASE_TENSOR_TYPE[rung], types, assembled, lookup(rung).file_type)
    assert sha256(assembled) == sha256(direct)
    header = read_header(assembled)
    by_name = {t.name: t.type.name for t in header.tensors}
    assert {by_name[name] for name in order if "ffn_down_exps" in name} == {recipe[1][1].upper()}  # not one type
    assert header.metadata["general.file_type"] == lookup(rung).file_type  # the rung's, not the base type file's


def test_a_per_type_file_holds_only_the_tensors_that_may_take_its_type(pure, tiny_model):
    """With the recipe as the stock types, each file holds the tensors whose type is its own or one beside it, and
    the unquantized ones (norms, router): the Q2_K file no attention tensor (Q8_0, far from Q2_K), the Q6_K file
    no expert; together far less than whole files of their types."""
    _folder, files, types, extra, _rung, _recipe = pure
    held = {part.ggml_type: {t.name for t in read_header(part.path).tensors} for part in files.parts}
    unquantized = {t.name for t in read_header(tiny_model).tensors} - set(types)
    assert unquantized and all("norm" in n or "gate_inp" in n or "rope" in n or ".bias" in n for n in unquantized)

    def stock(*of: str) -> set[str]:
        return {n for n, t in types.items() if t in of} | unquantized

    assert held["Q6_K"] == stock("Q8_0")
    if extra:  # the next type by bits per weight, K or IQ, those that need the matrix's entries too
        assert held["Q2_K"] == stock("IQ2_S", "IQ3_XXS") and held["IQ3_S"] == stock("IQ3_XXS")
        assert held["IQ2_XS"] == stock("IQ2_S") and held["IQ4_XS"] == stock("Q4_K")
    else:  # without a matrix nothing below Q2_K (the IQ2 types need its entries) but for token_embd and output
        assert held["Q3_K"] == stock("Q2_K") and held["IQ4_XS"] == stock("Q4_K", "IQ4_XS")
        assert held["IQ3_S"] == stock("IQ4_XS") and not any(t.startswith(("IQ1", "IQ2")) for t in held)
    shapes = {t.name: t.shape for t in read_header(tiny_model).tensors}
    whole = sum(tensor_bytes(shapes[n], part.ggml_type) for part in files.parts for n in types)
    assert sum(part.path.stat().st_size for part in files.parts) < 0.6 * whole


def test_a_recipe_naming_what_is_not_there_writes_nothing(pure):
    folder, files, types, _extra, rung, _recipe = pure
    out = folder / "bad.gguf"
    with pytest.raises(InputError, match="blk.0.attn_q.weight: no per-type file holds it at Q2_K"):
        files.assemble(list(types), BASE_TENSOR_TYPE[rung], {**types, "blk.0.attn_q.weight": "Q2_K"}, out)
    assert not out.exists() and not list(folder.glob("*.partial"))
