"""When a validation or a bench fails its quant, and when a compared file fails: the same rule for `moeq validate`,
`moeq bench`, `moeq compare` and a build."""

from __future__ import annotations

from pathlib import Path

from moeq.errors import CheckFailed, InputError, ToolError
from moeq.records import BenchRecord, CheckResult, CompareRecord


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


def require_same_model(compared: CompareRecord) -> None:
    """A compared file that is not a quantization of the F16 fails (exit 3), naming its first difference; it was
    deleted, and its record keeps the refusal until the file on the Hub changes."""
    if compared.refused is not None:
        raise InputError(f"{compared.repo}/{compared.repo_file}@{compared.commit[:12]}", compared.refused,
                         "remove it from compare in the pipeline file, or name a GGUF of the same model")
