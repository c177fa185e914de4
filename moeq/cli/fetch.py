"""`moeq fetch`: the fetch stage: the F16 source, downloaded and converted, made, or found."""

from __future__ import annotations

from typing import Annotated

import typer

from moeq.cli.options import ConfigOption, JsonOption
from moeq.cli.output import console, open_context, quiet_progress_off_terminal, show
from moeq.records import record_json
from moeq.units import decimal_size


def fetch(
    config: ConfigOption = None,
    force: Annotated[bool, typer.Option(help="Fetch again even when the record says the source is current.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Produce the F16 GGUF source: download (and for safetensors, convert) it, or make the synth model.

    The revision is resolved to a commit sha; each file is checked against the Hub's sha256; an
    interrupted download continues where it stopped.
    """
    from moeq.plan import FETCH, Options, run_to

    ctx = open_context(config)
    quiet_progress_off_terminal()
    done = run_to(ctx, "fetch", list(ctx.pipeline.quants), Options(force=frozenset({"fetch"} if force else ())))[FETCH]
    record = done.record
    state = "up to date" if done.up_to_date else f"fetched in {done.seconds:.1f} s"
    show(as_json, {"skipped": done.up_to_date, "record": record_json(record)},
         lambda: console.print(f"source {state}: {record.output.path} ({decimal_size(record.output.size)}), from "
                               f"{record.origin}", soft_wrap=True))
