"""What the card checks (lint, derived figures, verify) report, and the Markdown table reading they share."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Finding:
    line: int
    rule: str
    message: str

    def format(self, path: str) -> str:
        return f"{path}:{self.line}: {self.rule}: {self.message}"


def table_cells(line: str) -> list[str]:
    """The cells of one Markdown table row, an escaped pipe kept inside its cell."""
    row = line.strip()
    row = row[1:] if row.startswith("|") else row
    row = row[:-1] if row.endswith("|") and not row.endswith("\\|") else row
    return [c.strip() for c in re.split(r"(?<!\\)\|", row)]
