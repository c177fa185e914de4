"""When a validation or a bench fails its quant: the same rule for `moeq validate`, `moeq bench` and a build."""

from __future__ import annotations

from pathlib import Path

from moeq.errors import CheckFailed, ToolError
from moeq.records import BenchRecord, CheckResult


def require_passed(what: str, checks: list[CheckResult], fix: str) -> None:
    """A validation with a failed check fails (exit 7)."""
    failed = [c.name for c in checks if not c.ok]
    if failed:
        raise CheckFailed(what, f"failed {', '.join(failed)}", fix)


def require_measured(benched: list[BenchRecord], records_dir: Path) -> None:
    """A bench with an error in any mode fails (exit 4); the message says what was measured all the same."""
    failed = [f"{record.quant} {error.mode}" for record in benched for error in record.errors]
    if failed:
        measured = [f"{r.quant} {run.mode}" for r in benched for run in r.speed] + [f"{r.quant} quality"
                                                                                    for r in benched if r.quality]
        raise ToolError("bench", f"recorded errors for {', '.join(failed)} ("
                        + (f"measured: {', '.join(measured)}" if measured else "nothing was measured") + ")",
                        f"see the bench records in {records_dir}")
