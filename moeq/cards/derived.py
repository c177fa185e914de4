"""Derived figures: each figure a card computes from others beside it, recomputed from those as printed.

A ratio from its two perplexities, a total from its table's rows, a product from its factors, a short count
from the exact one: a card whose derived figure disagrees with its parts is refused (lint rule
`derived-figure`), whatever put it there: a template, a record or a hand.

    derived_findings(["| Perplexity, F16 | 45.5936 ± 0.1 |", "| Perplexity, this file | 45.6325 ± 0.1 |",
                      "| PPL ratio, this file / F16 | 1.0766 |"])
    # -> [Finding(3, 'derived-figure', 'PPL ratio 1.0766 (column 1) is not 45.6325 / 45.5936 = 1.0009; ...')]
"""

from __future__ import annotations

import re

from moeq.cards.findings import Finding, table_cells
from moeq.units import short_count

RULE = "derived-figure"
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
PPL_ROWS = {"Perplexity, F16": "f16", "Perplexity, this file": "quant", "Perplexity": "quant",
            "PPL ratio, this file / F16": "ratio"}
TYPE_TOTAL = re.compile(r"^Tensor types in the file \((\d[\d,]*) tensors\):$")
EVALUATED = re.compile(r"\*\*Evaluated\*\*: (\d[\d,]*) chunks of (\d[\d,]*) tokens \((\d[\d,]*) tokens\)")
COVERAGE = re.compile(r"each of the (\d[\d,]*) experts \((\d[\d,]*) in each of (\d[\d,]*) layers?\)")
PARAMETERS = re.compile(r"\*\*Parameters\*\*: (\S+) \((\d[\d,]*)\)")


def _value(text: str) -> float | None:
    match = NUMBER.search(text)
    return float(match.group(0).replace(",", "")) if match else None


def _decimals(text: str) -> int:
    match = NUMBER.search(text)
    return len(match.group(0).partition(".")[2]) if match else 0


def derived_findings(lines: list[str]) -> list[Finding]:
    """A finding for each derived figure in `lines` (the card's lines) that its parts do not give."""
    findings: list[Finding] = []
    ppl: dict[str, tuple[int, list[str]]] = {}
    for number, line in enumerate(lines, 1):
        if line.startswith("| "):
            cells = table_cells(line)
            if cells[0] in PPL_ROWS:
                ppl[PPL_ROWS[cells[0]]] = (number, cells[1:])
                if len(ppl) == 3:
                    findings += _ratio(ppl)
                    ppl = {}
        else:
            ppl = {}
        if total := TYPE_TOTAL.match(line):
            findings += _table_total(lines, number, int(total.group(1).replace(",", "")))
        for pattern, what, order in ((EVALUATED, "tokens evaluated", (0, 1, 2)), (COVERAGE, "experts", (1, 2, 0))):
            if match := pattern.search(line):
                a, b, product = (int(match.groups()[i].replace(",", "")) for i in order)
                if a * b != product:
                    findings.append(Finding(number, RULE, f"{product:,} {what} is not {a:,} x {b:,} = {a * b:,}"))
        if match := PARAMETERS.search(line):
            exact = int(match.group(2).replace(",", ""))
            if short_count(exact) != match.group(1):
                findings.append(Finding(number, RULE, f"{match.group(1)} parameters is not {exact:,} "
                                                      f"({short_count(exact)})"))
    return findings


def _ratio(rows: dict[str, tuple[int, list[str]]]) -> list[Finding]:
    """Each column's PPL ratio against its two perplexities, within what their printed decimals allow."""
    findings = []
    line, ratios = rows["ratio"]
    for column, (f16, quant, ratio) in enumerate(zip(rows["f16"][1], rows["quant"][1], ratios)):
        f, q, r = _value(f16), _value(quant), _value(ratio)
        if f is None or q is None or r is None or f <= 0:
            continue
        step = lambda text: 0.5 * 10 ** -_decimals(text)  # noqa: E731 - half the last printed digit
        slack = step(ratio) + (q / f) * (step(quant) / q + step(f16) / f) + 1e-12
        if abs(r - q / f) > slack:
            findings.append(Finding(line, RULE, f"PPL ratio {ratio.split()[0]} (column {column + 1}) is not "
                                                f"{quant.split()[0]} / {f16.split()[0]} = {q / f:.4f}; the ratio "
                                                "must be of the two perplexities beside it"))
    return findings


def _table_total(lines: list[str], number: int, total: int) -> list[Finding]:
    """The `Tensors` column of the table after line `number` adds up to `total`."""
    table = []
    for line in lines[number:]:
        if not line.strip() and table:
            break
        if line.startswith("|"):
            table.append(table_cells(line))
    if len(table) < 3 or "Tensors" not in table[0]:
        return [Finding(number, RULE, f"{total:,} tensors, but no table of tensor counts follows")]
    column = table[0].index("Tensors")
    counted = sum(int(_value(row[column]) or 0) for row in table[2:] if len(row) > column)
    if counted != total:
        return [Finding(number, RULE, f"{total:,} tensors, but the table's rows add up to {counted:,}")]
    return []
