"""A recipe's file assembled from per-type `--pure` quantizations equals llama-quantize's own, byte for byte.

Real llama-quantize on the tiny model: one `--pure` file per type (token_embd and output typed explicitly,
as a recipe types them), then the same recipe quantized directly with `--tensor-type-file`.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from moeq.errors import InputError
from moeq.gguf_header import read_header
from moeq.texts import shipped_calibration
from moeq.recipe.assemble import assemble
from moeq.recipe_file import recipe_types

RECIPE = [("attn", "q8_0"), ("ffn_down_exps", "q4_k"), ("blk\\.0\\.ffn_(gate|up)_exps", "q4_k"),
          ("ffn_(gate|up)_exps", "q2_k")]
ENDS = ["--token-embedding-type", "q8_0", "--output-tensor-type", "q8_0"]


def quantize(toolchain, source: Path, out: Path, base: str, *extra: str) -> Path:
    proc = subprocess.run([str(toolchain.path("llama-quantize")), "--pure", *ENDS, *extra, str(source), str(out),
                           base], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture(scope="module", params=["no imatrix", "imatrix"])
def pure(request, tmp_path_factory, toolchain, tiny_model):
    """One --pure file per type, made with an importance matrix (computed here on moeq's calibration text) or
    without."""
    folder = tmp_path_factory.mktemp("recipe")
    extra = []
    if request.param == "imatrix":
        matrix = folder / "tiny.imatrix"
        proc = subprocess.run([str(toolchain.path("llama-imatrix")), "-m", str(tiny_model), "-f",
                               str(shipped_calibration()), "--chunks", "2", "-c", "128", "-o", str(matrix)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        extra = ["--imatrix", str(matrix)]
    files = {t: quantize(toolchain, tiny_model, folder / f"pure-{t}.gguf", t, *extra) for t in ("Q8_0", "Q4_K", "Q2_K")}
    return folder, files, extra


def test_an_assembled_file_is_the_file_llama_quantize_makes(pure, toolchain, tiny_model):
    folder, files, extra = pure
    recipe = folder / "recipe.txt"
    recipe.write_text("".join(f"{pattern}={ggml_type}\n" for pattern, ggml_type in RECIPE))
    direct = quantize(toolchain, tiny_model, folder / "direct.gguf", "Q2_K", *extra, "--tensor-type-file",
                      str(recipe))
    names = [t.name for t in read_header(files["Q2_K"]).tensors]
    types = recipe_types(RECIPE, names)
    assert types["blk.0.ffn_up_exps.weight"] == "Q4_K" and types["blk.1.ffn_up_exps.weight"] == "Q2_K"  # first wins
    assert types["blk.1.attn_q.weight"] == "Q8_0" and "token_embd.weight" not in types
    assembled = folder / "assembled.gguf"
    assemble(files["Q2_K"], files, types, assembled)
    assert assembled.read_bytes() == direct.read_bytes()
    by_name = {t.name: t.type.name for t in read_header(assembled).tensors}
    assert {by_name[name] for name in names if "ffn_down_exps" in name} == {"Q4_K"}  # not a file of one type


def test_a_recipe_naming_what_is_not_there_writes_nothing(pure):
    folder, files, _ = pure
    out = folder / "bad.gguf"
    with pytest.raises(InputError, match="no tensor 'blk.9.attn_q.weight'"):
        assemble(files["Q2_K"], files, {"blk.9.attn_q.weight": "Q8_0"}, out)
    with pytest.raises(InputError, match="no pure quantization for type Q6_K"):
        assemble(files["Q2_K"], files, {"blk.0.attn_q.weight": "Q6_K"}, out)
    assert not out.exists() and not out.with_name("bad.gguf.partial").exists()
