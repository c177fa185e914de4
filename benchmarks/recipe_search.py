"""Searched against stock rungs of the trained example, side by side on the evaluation text.

    .venv/bin/python benchmarks/recipe_search.py [--quants Q2_K Q4_K_M] [--dir DIR]

For each rung: `moeq build` (the stock file, chosen with or without the importance matrix and measured on
the evaluation text), then `moeq recipe` with `budget: stock` (searched on the selection text), then the
searched file measured on the evaluation text the same way, and `llama-bench` (cpu) on the published stock
file and the searched one. Printed: the Pareto table (size, mean KLD ± uncertainty, same top token,
tokens/s) of the stock file with and without the importance matrix and the searched one, whether the
searched file wins by more than twice the combined uncertainty, the recipe found (what it changed), its
predicted against measured KLD on the selection text, the search's cost (runs, wall time), and that the
published rebuild command makes the searched file byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moeq.config import load_pipeline  # noqa: E402
from moeq.kld import base_logits, compare, eval_options, eval_text, measure  # noqa: E402
from moeq.record_store import Records  # noqa: E402
from moeq.records import ChoiceRecord, FetchRecord, PerplexityFigures, RecipeRecord  # noqa: E402
from moeq.toolchain import Toolchain  # noqa: E402
from moeq.workspace import Workspace  # noqa: E402


def moeq(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "moeq", *args], check=True, cwd=REPO)


def speed(chain: Toolchain, model: Path) -> str:
    out = subprocess.run([str(chain.path("llama-bench")), "-m", str(model), "-ngl", "0", "-p", "64", "-n", "16",
                          "-r", "3", "-o", "json"], check=True, capture_output=True, text=True).stdout
    tests = json.loads(out[out.index("["):out.rindex("]") + 1])
    return ", ".join(f"{'pp' if t['n_prompt'] else 'tg'} {t['avg_ts']:.0f} ± {t['stddev_ts']:.0f}" for t in tests)


def row(name: str, size: int, figures: PerplexityFigures, tokens_s: str) -> str:
    return (f"| {name} | {size:,} | {figures.kld_mean:.6f} ± {figures.kld_mean_err:.6f} | "
            f"{figures.same_top_p:.2f} ± {figures.same_top_p_err:.2f} % | {tokens_s} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quants", nargs="+", default=["Q2_K", "Q4_K_M"])
    parser.add_argument("--dir", type=Path)
    args = parser.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="moeq-recipe-"))
    data = yaml.safe_load((REPO / "examples" / "tiny-phimoe.yaml").read_text())
    data["bench"] = {**data["bench"], "modes": ["cpu"]}
    data["bench"].pop("rpc", None)
    data["quants"] = [{**q, "recipe": "search", "budget": "stock"} if isinstance(q, dict) and q["type"] in args.quants
                      else q for q in data["quants"]]
    data["recipe"] = {"ctx": 256, "chunks": 32}
    config = folder / "tiny-phimoe.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    pipeline = load_pipeline(config)
    ws, chain = Workspace(pipeline.workspace), Toolchain()
    records = Records(ws, config)
    for quant in args.quants:
        moeq("build", "--config", str(config), "--quant", quant)
        moeq("recipe", "--config", str(config), "--quant", quant)
        choice, recipe = records.require(ChoiceRecord, quant), records.require(RecipeRecord, quant)
        options = eval_options(pipeline, ws)
        source = records.require(FetchRecord)
        base_kld, _ = base_logits(ws, chain, source.output, options, eval_text(pipeline),
                                  chain.tool("llama-perplexity").build.commit, threads=None, timeout_s=600)
        searched_file = ws.root / "recipe" / quant / Path(pipeline.quant(quant).file).name
        searched = measure(chain, searched_file, eval_text(pipeline), base_kld, options,
                           ws.root / "recipe" / quant / "evaluation.log", threads=None, timeout_s=600)
        published = ws.quant_path(pipeline.quant(quant).file)
        print(f"\n## {quant}: evaluation text {options.text}, {options.chunks} chunks of {options.ctx}\n")
        print("| file | bytes | mean KLD | same top token | tokens/s (cpu) |\n| --- | --- | --- | --- | --- |")
        for i, candidate in enumerate(choice.candidates):
            mark = " (published)" if i == choice.chosen else ""
            tokens = speed(chain, published) if i == choice.chosen else "-"
            print(row(f"stock {candidate.name}{mark}", candidate.file.size, candidate.quality, tokens))
        print(row("searched (budget: stock, with the importance matrix)", searched_file.stat().st_size, searched,
                  speed(chain, searched_file)))
        verdict = compare(searched, choice.published.quality)
        print(f"\nsearched against the published stock file: {verdict} (twice the combined uncertainty); size "
              f"{searched_file.stat().st_size / choice.published.file.size:.3f} of it")
        chosen = recipe.evals[recipe.chosen]
        print(f"selection text: stock {recipe.evals[0].quality.kld_mean:.6f}, chosen ({chosen.label}) "
              f"{chosen.quality.kld_mean:.6f}, predicted {recipe.predicted_kld}; {len(recipe.evals)} recipes, "
              f"{recipe.runs} llama-perplexity runs, {recipe.seconds:.0f} s")
        print("changed from stock: " + ", ".join(f"{n} {recipe.stock_types[n]}->{t}"
                                                 for n, t in sorted(chosen.changes.items())))
        rebuilt = folder / f"rebuilt-{quant}.gguf"
        imatrix = Path(recipe.imatrix.path) if recipe.imatrix else None
        command = [str(chain.path("llama-quantize")), *recipe.command[1:]]
        command[command.index(recipe.recipe_file.path.split("/")[-1])] = str(Path(recipe.recipe_file.path).resolve())
        command[-3] = str(Path(recipe.source.path if recipe.source.path.startswith("/") else ws.root /
                               recipe.source.path).resolve())
        command[-2] = str(rebuilt)
        subprocess.run(command, check=True, capture_output=True, cwd=imatrix.resolve().parent if imatrix else None)
        same = hashlib.sha256(rebuilt.read_bytes()).digest() == hashlib.sha256(searched_file.read_bytes()).digest()
        print(f"rebuilt with the published command: {'the same sha256' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
