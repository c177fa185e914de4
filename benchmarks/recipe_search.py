"""Searched against stock rungs of the trained example, side by side on the evaluation text.

    .venv/bin/python benchmarks/recipe_search.py [--quants Q2_K Q4_K_M IQ3_M] [--dir DIR]

For each rung, `moeq build` with `recipe: search` and `budget: stock`: the search on the selection text, then
the choice between the stock file with and without the importance matrix and the searched file, all three
measured on the evaluation text. Printed: the Pareto table (size, mean KLD ± uncertainty, same top token,
tokens/s from `llama-bench` on the CPU for the stock file with the importance matrix and the searched one, made
again from their records' commands), which file was published and why, the recipe found (what it changed), its
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
from moeq.record_store import Records  # noqa: E402
from moeq.records import ChoiceRecord, Made, PerplexityFigures, QuantizeRecord, RecipeRecord  # noqa: E402
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
    known = {q["type"] if isinstance(q, dict) else q for q in data["quants"]}
    data["quants"] += [{"type": quant, "imatrix": "auto", "recipe": "search", "budget": "stock"}
                       for quant in args.quants if quant not in known]  # a rung the example does not have (IQ3_M)
    data["recipe"] = {"ctx": 256, "chunks": 32}  # the selection: 32 chunks of 256 tokens
    config = folder / "tiny-phimoe.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    pipeline = load_pipeline(config)
    ws, chain = Workspace(pipeline.workspace), Toolchain()
    records = Records(ws, config)
    for quant in args.quants:
        moeq("build", "--config", str(config), "--quant", quant)
        choice, recipe = records.require(ChoiceRecord, quant), records.require(RecipeRecord, quant)
        stock = remake(chain, records.require(QuantizeRecord, f"{quant}-with-imatrix"), folder / f"stock-{quant}.gguf")
        searched = remake(chain, records.require(QuantizeRecord, f"{quant}-searched"), folder / f"searched-{quant}.gguf")
        tokens = {Made.WITH: speed(chain, stock), Made.SEARCHED: speed(chain, searched)}
        options = choice.options
        print(f"\n## {quant}: evaluation text {options.text}, {options.chunks} chunks of {options.ctx}\n")
        print("| file | bytes | mean KLD | same top token | tokens/s (cpu) |\n| --- | --- | --- | --- | --- |")
        for i, candidate in enumerate(choice.candidates):
            mark = " (published)" if i == choice.chosen else ""
            print(row(f"{quant} {candidate.name}{mark}", candidate.file.size, candidate.quality,
                      tokens.get(candidate.name, "-")))
        print(f"\npublished: {choice.published.name}: {choice.why}")
        chosen = recipe.evals[recipe.chosen]
        print(f"selection text: stock {recipe.evals[0].quality.kld_mean:.6f}, chosen ({chosen.label}) "
              f"{chosen.quality.kld_mean:.6f}, predicted {recipe.predicted_kld}; {len(recipe.evals)} recipes, "
              f"{recipe.runs} llama-perplexity runs, {recipe.seconds:.0f} s")
        print("changed from stock: " + ", ".join(f"{n} {recipe.stock_types[n]}->{t}"
                                                 for n, t in sorted(chosen.changes.items())))
        same = hashlib.sha256(searched.read_bytes()).hexdigest() == recipe.output.sha256
        print(f"made again with the searched candidate's command: {'the same sha256' if same else 'DIFFERENT'}")


def remake(chain: Toolchain, record: QuantizeRecord, out: Path) -> Path:
    """The file `record` describes, made again with its own command (the choice deleted the candidate)."""
    command = [str(chain.path("llama-quantize")), *record.command[1:]]
    command[next(i for i, arg in enumerate(command) if arg.endswith(".partial"))] = str(out)
    imatrix = record.options.imatrix
    subprocess.run(command, check=True, capture_output=True, cwd=Path(imatrix.path).parent if imatrix else None)
    if hashlib.sha256(out.read_bytes()).hexdigest() != record.output.sha256:
        raise SystemExit(f"{out}: not the file {record.quant} recorded")
    return out


if __name__ == "__main__":
    main()
