"""Card verify: render the card again from its records manifest and report every line that differs.

Lint says whether a figure exists in some record; verify says whether each line is exactly what the
records and templates give, so a hand-edited figure (or another quant's figure in this quant's row) is
found wherever it stands.

    findings = verify_card(Path("README.md").read_text(), read_manifest(Path("moeq-manifest.json")))
    [f.format("README.md") for f in findings]
    # -> ['README.md:31: edited: expected "- **File size**: 2.36 MB ...", found "- **File size**: 9.36 MB ..."']
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from moeq.cards.facts import card_facts
from moeq.cards.findings import Finding
from moeq.cards.render import DEFAULT_TEMPLATE, render_card, templates_sha256
from moeq.errors import InputError
from moeq.manifest import Manifest

SHOWN = 100  # characters of a line quoted in a finding


def card_template(manifest: Manifest, template: Path | None, where: str) -> tuple[Path, bool]:
    """The template the manifest says its card was rendered with, and whether the templates at hand are those."""
    made_with = manifest.card
    if template is None:
        if not made_with.builtin:
            raise InputError(where, f"the card was rendered with the pipeline's own template {made_with.template!r} "
                             "(card.template)", "pass --template PATH")
        template = DEFAULT_TEMPLATE
    return template, templates_sha256(template) == made_with.templates_sha256


def _quote(line: str, differs_at: int = 0) -> str:
    """The line quoted, at most SHOWN characters of it: a long one from a little before `differs_at`, so that an
    edit far into a table row is in what is shown."""
    start = max(0, min(differs_at - SHOWN // 4, len(line) - SHOWN))
    text = line[start:start + SHOWN]
    return json.dumps(("..." if start else "") + text + ("..." if start + SHOWN < len(line) else ""),
                      ensure_ascii=False)


def _first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def verify_card(text: str, manifest: Manifest, template: Path | None = None) -> list[Finding]:
    """Every line of `text` that differs from the card rendered from `manifest` with `template`."""
    expected = render_card(card_facts(manifest), template).split("\n")
    found = text.split("\n")
    findings = []
    matcher = difflib.SequenceMatcher(None, expected, found, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        for k in range(max(i2 - i1, j2 - j1)):
            ours = expected[i1 + k] if i1 + k < i2 else None
            theirs = found[j1 + k] if j1 + k < j2 else None
            line = min(j1 + k, j2 - 1) + 1 if j2 > j1 else j1 + 1  # a removed line is reported where it belongs
            if ours is not None and theirs is not None:
                at = _first_difference(ours, theirs)
                findings.append(Finding(line, "edited", f"expected {_quote(ours, at)}, found {_quote(theirs, at)}"))
            elif ours is not None:
                findings.append(Finding(line, "removed", f"expected {_quote(ours)} here"))
            else:
                findings.append(Finding(line, "added", f"{_quote(theirs)} is not in the card the records give"))
    return findings
