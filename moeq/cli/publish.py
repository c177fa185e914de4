"""`moeq publish`: the quants staged on a branch by their own builds, published on main in one commit."""

from __future__ import annotations

from typing import Annotated

import typer

from moeq.cli.options import ConfigOption, JsonOption
from moeq.cli.output import console, open_context, show, quiet_progress_off_terminal
from moeq.records import PushAction, record_json
from moeq.units import decimal_size


def publish(
    from_branch: Annotated[str, typer.Option("--from-branch", metavar="BRANCH", help="The staging branch the quant "
                                             "jobs used (moeq build --stage-to BRANCH).")],
    config: ConfigOption = None,
    keep_branch: Annotated[bool, typer.Option("--keep-branch", help="Leave the staging branch on the Hub after the "
                                              "commit.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Publish the whole ladder from a staging branch: read each quant's records there, render the one card, and
    make one commit on main holding every file, the card, the charts and the manifest (the GGUFs are copied on
    the Hub, not uploaded again); then delete the branch. A quant of the ladder not staged is refused, naming it,
    and main is left as it was. Works in a fresh workspace: no GGUF is downloaded.
    """
    from moeq.plan import publish as publish_ladder
    from moeq.push.staging import check_branch

    ctx = open_context(config)
    quiet_progress_off_terminal()
    done = publish_ladder(ctx, check_branch(from_branch), keep_branch=keep_branch)
    show(as_json, {"branch": from_branch, "record": record_json(done.record)}, lambda: _print_published(done.record, from_branch))


def _print_published(record, from_branch: str) -> None:
    copied = [f for f in record.files if f.action in (PushAction.ADD, PushAction.UPDATE) and f.path.endswith(".gguf")]
    if record.commit is None:
        console.print(f"{record.repo_id}: main already holds the ladder as staged on {from_branch}; no commit")
    else:
        console.print(f"{record.repo_id}: {', '.join(record.quants)} published in one commit {record.commit_url} "
                      f"({len(copied)} GGUF file(s) copied from {from_branch}, {decimal_size(record.uploaded_bytes)} "
                      "uploaded)", soft_wrap=True)
