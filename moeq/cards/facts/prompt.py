"""The prompt format section: the chat template the files carry, and a conversation rendered with it (validate's
record: every file's template is the source's, so the first file's stands for all)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from moeq.manifest import QuantEntry

CONFLICT_STARTS = ("<" * 7, ">" * 7, "=" * 7, "|" * 7)  # lines card lint reads as merge-conflict markers


@dataclass(frozen=True)
class PromptFacts:
    text: str | None  # the conversation as rendered (None: it could not be, see why_not)
    as_json: bool  # shown as one JSON string: it has lines a card cannot hold as they are (trailing spaces, ...)
    sha256: str
    chars: str
    why_not: str | None


def prompt_facts(entries: list[QuantEntry]) -> PromptFacts | None:
    """From the first quant whose validate record has a chat template; None when no file carries one."""
    prompt = next((e.records.validate_.prompt for e in entries
                   if e.records.validate_ is not None and e.records.validate_.prompt is not None), None)
    if prompt is None:
        return None
    text, as_json = prompt.rendered, False
    if text is not None and any(line != line.rstrip() or line.startswith(CONFLICT_STARTS) or "\r" in line
                                for line in text.split("\n")):
        text, as_json = json.dumps(text, ensure_ascii=False), True
    return PromptFacts(text, as_json, prompt.template_sha256, f"{prompt.template_chars:,}", prompt.why_not)
