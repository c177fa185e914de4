"""The one stage runner: lock, compare the stored key with the new one, run or say "up to date", save.

A stage is a declaration (`Stage`): the record it writes, the lock it takes, what its output depends on
(`key`: input sha256s and options, and the machine for bench; `tool`: the llama.cpp tool that makes it,
whose commit the runner adds to the key, so no stage can leave it out) and a `run()` that returns its
record. `run_stage` is the only place that decides whether a stage runs, so "up to date" and
`--force` mean the same for every command and for `moeq build`.

    result = run_stage(stage, records, force=False)
    result.status, result.why, result.record.output.sha256
    # -> ('up to date', 'inputs unchanged', '...')
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Callable, Generic, TypeVar

from moeq.record_store import Records, Saved, save_record
from moeq.records import SCHEMA_VERSION, Model, record_json
from moeq.toolchain import Tool

R = TypeVar("R", bound=Model)


class Status(StrEnum):
    """What became of a stage: the runner says ran or up to date; a plan also says failed or skipped."""

    RAN = "ran"
    UP_TO_DATE = "up to date"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass
class Stage(Generic[R]):
    name: str  # the stage, as plan.STAGES names it: fetch, imatrix, recipe, choice, quantize, ... push
    subject: str | None  # whose record it is: a quant type, a candidate's record name (Q4_K_M-with-imatrix), or None
    key: Callable[[], dict[str, Any] | None]  # the declared inputs; None: the stage always runs (push)
    run: Callable[[], R]
    tool: Callable[[], Tool] | None = None  # the llama.cpp tool whose output the record describes
    lock: str | None = None  # default: NAME-QUANT
    intact: Callable[[R], bool] = lambda _record: True  # the outputs the record names are still as it says
    status: Callable[[R], Status] = lambda _record: Status.RAN  # push: up to date when nothing had changed
    # The key may be computed after run() when there is nothing to compare it with (no record, or forced):
    # quantize's key waits on the source's sha256, which a first run computes beside llama-quantize.
    lazy_key: bool = False


@dataclass
class StageResult(Generic[R]):
    """What became of one stage: from the runner, `ran` or `up to date` with its record; in `moeq build` also
    `failed` (why: the error) or `skipped` (why: what it waited for, or why it was not asked for)."""

    stage: str
    status: Status
    why: str = ""  # ran: forced, no record, which key changed, outputs changed; up to date: inputs unchanged
    seconds: float = 0.0  # how long this call took
    record: R | None = None
    exit_code: int = 0  # failed: the error's exit code (errors.py)
    warnings: tuple[str, ...] = ()  # what the step warned of as it went (also said through the context)

    @property
    def up_to_date(self) -> bool:
        return self.status == Status.UP_TO_DATE


def run_stage(stage: Stage[R], records: Records, *, force: bool = False,
              on_message: Callable[[str], None] = lambda _msg: None) -> StageResult[R]:
    """Run `stage` unless its saved record has the same key and its outputs are intact."""
    started = time.monotonic()
    ws = records.ws
    path = ws.record_path(stage.name, stage.subject)
    with ws.lock(stage.lock or (f"{stage.name}-{stage.subject}" if stage.subject else stage.name), on_wait=on_message):
        previous = records.saved(stage.name, stage.subject, fresh=True)  # another process may have written it
        unusable = records.reasons.get((stage.name, stage.subject))  # a record there, of another schema or shape
        later = stage.lazy_key and (force or previous is None)
        key = None if later else declared_key(stage)
        why = _why_run(stage, previous, key, force, unusable)
        if why is None:
            return StageResult(stage.name, Status.UP_TO_DATE, "inputs unchanged", _since(started), previous.record)
        if unusable:
            on_message(f"{path}: {unusable}; {stage.name} will run again")
        running = time.monotonic()
        record = stage.run()
        if later:
            key = declared_key(stage)
        wall = _since(running)
        save_record(path, record, key, wall)
        records.put(stage.name, stage.subject, Saved(schema_version=SCHEMA_VERSION, key=key, wall_s=wall, record=record))
        return StageResult(stage.name, stage.status(record), why, _since(started), record)


def current(stage: Stage[R], records: Records) -> R | None:
    """The saved record of `stage` when `run_stage` would find it up to date (nothing runs, nothing is locked)."""
    previous = records.saved(stage.name, stage.subject, fresh=True)
    if previous is None or stage.lazy_key:
        return None
    return previous.record if _why_run(stage, previous, declared_key(stage), False, None) is None else None


def _since(started: float) -> float:
    return round(time.monotonic() - started, 3)


def _why_run(stage: Stage, previous: Saved | None, key: dict | None, force: bool, unusable: str | None) -> str | None:
    """Why the stage runs (forced, no record, which key changed, its outputs changed), or None: it is up to date."""
    if force:
        return "forced"
    if previous is None:
        return unusable or "no record"
    if key is None:
        return "always runs"
    if previous.key != key:
        before = previous.key or {}
        return "changed: " + ", ".join(sorted(k for k in {*key, *before} if before.get(k) != key.get(k)))
    if not stage.intact(previous.record):
        return "outputs changed since the record"
    return None


def declared_key(stage: Stage) -> dict | None:
    """What the stage declared its output depends on: its inputs, and the commit of the tool that makes it."""
    key = stage.key()
    if key is not None and stage.tool is not None:
        key = {**key, "tool_commit": stage.tool().build.commit}
    return _plain(key)


def _plain(key: dict | None) -> dict | None:
    """The key as JSON gives it back (tuples as lists, int dict keys as strings), so a saved key compares equal."""
    return None if key is None else json.loads(json.dumps(key, default=record_json))
