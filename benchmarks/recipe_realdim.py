"""A recipe's file at Phi-3.5-MoE's real dimensions: assembled from per-type files against quantized directly.

    .venv/bin/python benchmarks/recipe_realdim.py [--layers 1] [--dir DIR]

Makes `moeq synth tiny-phimoe --preset phi-3.5-moe --layers N` (every tensor at its real size), one `--pure`
file per type (Q2_K and Q4_K, token_embd and output typed too), then one recipe (attention and
ffn_down_exps at Q4_K, the rest Q2_K) both ways: `moeq.recipe.assemble` from the per-type files, and
`llama-quantize --pure --tensor-type-file` from the F16. Printed: each one's wall time and the disk it adds,
whether the two files are the same bytes, and what a full search of the real model (32 layers) costs with
moeq's default settings, from these measured per-layer costs.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moeq.config import RecipeSpec  # noqa: E402
from moeq.gguf_header import read_header  # noqa: E402
from moeq.recipe.assemble import assemble  # noqa: E402
from moeq.recipe_file import recipe_types  # noqa: E402
from moeq.recipe.search import groups_of  # noqa: E402
from moeq.toolchain import Toolchain  # noqa: E402

RECIPE = [("attn_(q|k|v|output)", "q4_k"), ("ffn_down_exps", "q4_k")]
REAL_LAYERS = 32


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            sha.update(chunk)
    return sha.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--dir", type=Path)
    args = parser.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="moeq-recipe-realdim-"))
    folder.mkdir(parents=True, exist_ok=True)
    quantize = str(Toolchain().path("llama-quantize"))
    source = folder / "phi-real-F16.gguf"
    if not source.exists():
        subprocess.run([sys.executable, "-m", "moeq", "synth", "tiny-phimoe", str(source), "--preset", "phi-3.5-moe",
                        "--layers", str(args.layers)], check=True, cwd=REPO)
    print(f"source: {source.stat().st_size / 1e9:.2f} GB, {args.layers} layer(s) at Phi-3.5-MoE's dimensions")
    pure = {}
    for ggml_type in ("Q2_K", "Q4_K"):
        pure[ggml_type] = folder / f"pure-{ggml_type}.gguf"
        seconds = timed([quantize, "--pure", "--token-embedding-type", ggml_type.lower(), "--output-tensor-type",
                         ggml_type.lower(), str(source), str(pure[ggml_type]), ggml_type])
        print(f"--pure {ggml_type}: {seconds:.1f} s, {pure[ggml_type].stat().st_size / 1e9:.2f} GB")
    recipe_file = folder / "recipe.txt"
    recipe_file.write_text("".join(f"{p}={t}\n" for p, t in RECIPE))
    names = [t.name for t in read_header(pure["Q2_K"]).tensors]
    assembled, direct = folder / "assembled.gguf", folder / "direct.gguf"
    started = time.perf_counter()
    assemble(pure["Q2_K"], pure, recipe_types(RECIPE, names), assembled)
    assemble_s = time.perf_counter() - started
    direct_s = timed([quantize, "--pure", "--tensor-type-file", str(recipe_file), "--token-embedding-type", "q2_k",
                      "--output-tensor-type", "q2_k", str(source), str(direct), "Q2_K"])
    same = digest(assembled) == digest(direct)
    size = assembled.stat().st_size / 1e9
    print(f"assembled: {assemble_s:.1f} s, adds {size:.2f} GB (the candidate; written as .partial, renamed)")
    print(f"quantized directly: {direct_s:.1f} s, adds {direct.stat().st_size / 1e9:.2f} GB")
    print(f"ratio assembled / direct: {assemble_s / direct_s:.3f}; the same bytes: {same}")
    # A full search of the real model with the default settings, from these per-layer costs.
    settings = RecipeSpec()
    per_group = max(1, math.ceil(REAL_LAYERS / 8))
    categories = {n.split(".", 2)[2] for n in names if n.startswith("blk.") and n.endswith(".weight")
                  and "norm" not in n and "gate_inp" not in n}
    stock = {f"blk.{i}.{c}": "Q2_K" for i in range(REAL_LAYERS) for c in categories}
    stock |= {"token_embd.weight": "Q2_K", "output.weight": "Q2_K"}
    groups = len(groups_of(stock, REAL_LAYERS, per_group))
    runs = min(settings.max_evals, 2 + 2 * groups)
    scale = REAL_LAYERS / args.layers
    print(f"the real model ({REAL_LAYERS} layers), defaults: {groups} groups, up to {runs} llama-perplexity runs of "
          f"{settings.ctx * settings.chunks:,} tokens; assembling them ~{runs * assemble_s * scale / 3600:.1f} h "
          f"(quantizing each directly ~{runs * direct_s * scale / 3600:.1f} h), plus 6 --pure files "
          f"(~{sum(p.stat().st_size for p in pure.values()) / 2 * 6 * scale / 1e9:.0f} GB)")


if __name__ == "__main__":
    main()
