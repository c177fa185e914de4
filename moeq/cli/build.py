"""`moeq build`: every stage for the quants asked for, and the summary table."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from moeq.cli.options import ConfigOption, JsonOption, SwitchLayoutOption
from moeq.cli.output import console, open_context, show, quiet_progress_off_terminal, selected_quants
from moeq.units import decimal_size


def build(
    config: ConfigOption = None,
    quant: Annotated[Optional[list[str]], typer.Option("--quant", "-q", help="Quant type(s) of the ladder.")] = None,
    all_quants: Annotated[bool, typer.Option("--all", help="Every quant of the ladder.")] = False,
    push: Annotated[bool, typer.Option("--push", help="Push to the Hub (also when hub.push is true).")] = False,
    skip_bench: Annotated[bool, typer.Option("--skip-bench", help="Leave the bench stage out.")] = False,
    force_stage: Annotated[Optional[str], typer.Option(help="Run this stage and every stage after it again: "
                                                       "fetch, imatrix, recipe, choice, quantize, validate, "
                                                       "bench, compare, shards, card or push.")] = None,
    switch_layout: SwitchLayoutOption = False,
    stage_to: Annotated[Optional[str], typer.Option("--stage-to", metavar="BRANCH", help="One job of a release across "
                                                    "machines: stage the quants on this branch of the ladder's repo "
                                                    "(main untouched) instead of pushing; moeq publish --from-branch "
                                                    "BRANCH publishes them all in one commit.")] = None,
    imatrix_from: Annotated[Optional[Path], typer.Option("--imatrix-from", metavar="FOLDER", help="Use the importance "
                                                         "matrix another workspace made (FOLDER/records/imatrix.json "
                                                         "and the file it names), checked by sha256.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Run fetch -> imatrix -> recipe -> choice -> quantize -> validate -> bench -> compare -> shards -> card -> push
    for each quant, skipping what is current (imatrix only for quants with `imatrix: auto`; recipe only for quants with
    `recipe: search`; choice for quants with an importance matrix or a searched recipe: each candidate made,
    measured, and the better published).

    compare measures the files the pipeline's compare: lists, for the card. Without --push the last stage shows
    the files the push would send, without asking the Hub. The summary says
    why each skipped stage was skipped. Exit 0 when every quant succeeded and every compared file was measured,
    else the exit code of the first failed stage (a compared file refused fails no quant).
    """
    from moeq.build import build as run_build
    from moeq.plan import Release
    from moeq.errors import InputError
    from moeq.push.staging import check_branch
    from moeq.stage_runner import Status

    ctx = open_context(config)
    if bool(quant) == all_quants:
        raise InputError("moeq build", "no quant named", "give --quant TYPE (one or more) or --all")
    quants = selected_quants(ctx.pipeline, None if all_quants else quant)
    if stage_to is not None and push:
        raise InputError("--stage-to and --push", "a job staged on a branch is published by moeq publish", "pass one")
    release = Release(check_branch(stage_to) if stage_to is not None else None, imatrix_from)
    quiet_progress_off_terminal()
    summary = run_build(ctx, quants, push=(push or ctx.pipeline.hub.push) and stage_to is None, skip_bench=skip_bench,
                        force_stage=force_stage, switch_layout=switch_layout, release=release)
    show(as_json, summary.as_dict(), lambda: _print_summary(summary, ctx.ws))
    failures: dict[tuple[str, str], list[str]] = {}  # the shared fetch's failure names every quant once
    for q in summary.quants:
        failed = next((s for s in q.stages if s.status == Status.FAILED), None)
        if failed:
            failures.setdefault((failed.stage, failed.why), []).append(q.quant)
    for p in summary.compared:
        if p.result.status == Status.FAILED:
            failures.setdefault(("compare", p.result.why), []).append(f"{p.peer.repo}/{p.peer.file}")
    if failures:  # one error line, whatever failed
        sys.stderr.write("error: " + "; ".join(f"{', '.join(names)}: {stage} failed: {detail}"
                                              for (stage, detail), names in failures.items()) + "\n")
    if not summary.ok:
        raise typer.Exit(summary.exit_code)


STAGE_COLUMN, QUANT_COLUMN = 12, 17  # the stage column's width with its borders; a quant's column's


def _print_summary(summary, ws) -> None:
    from moeq.plan import STAGES
    from moeq.stage_runner import Status

    colors = {Status.RAN: "green", Status.UP_TO_DATE: "cyan", Status.FAILED: "red", Status.SKIPPED: "yellow"}
    cells, seen = [], set()  # a step shared by quants (fetch, imatrix, the ladder's card) ran once: timed once
    for q in summary.quants:
        row = {}
        for s in q.stages:
            timed = s.status in (Status.RAN, Status.FAILED)
            row[s.stage] = ("[dim]the same run[/]" if timed and id(s) in seen else
                            f"[{colors[s.status]}]{s.status}[/]" + (f" {s.seconds:.1f}s" if timed else ""))
            seen.add(id(s))
        row["size"] = decimal_size(q.artifact_bytes) if q.artifact_bytes else ""
        cells.append(row)
    # One row per stage and a column per quant, as many quants to a table as the terminal's width holds (a cell is
    # at most "the same run" or "failed 1234.5s" wide): no stage name or status is ever cut or wrapped.
    per_table = max(1, (console.width - STAGE_COLUMN) // QUANT_COLUMN)
    parts = [range(i, min(i + per_table, len(cells))) for i in range(0, len(cells), per_table)]
    for number, part in enumerate(parts, 1):
        table = Table(title="moeq build" + (f" ({number} of {len(parts)})" if len(parts) > 1 else ""))
        table.add_column("stage", no_wrap=True)
        for i in part:
            table.add_column(summary.quants[i].quant, no_wrap=True)
        for stage in (*(s for s in STAGES if s != "compare"), "size"):  # compare is per file: the lines below
            table.add_row(stage, *[cells[i].get(stage, "") for i in part])
        console.print(table)
    skips: dict[tuple[str, str], list[str]] = {}  # why each skipped stage was skipped, once for the quants it names
    for q in summary.quants:
        for s in q.stages:
            if s.status == Status.SKIPPED and s.why:
                skips.setdefault((s.stage, s.why), []).append(q.quant)
    for (stage, why), names in skips.items():
        console.print(f"{stage} skipped for {', '.join(names)}: {why}", soft_wrap=True, highlight=False)
    by_repo: dict[str, list] = {}  # the ladder's one repo: one line for its quants
    for q in summary.quants:
        by_repo.setdefault(q.repo_id, []).append(q)
    for repo_id, rows in by_repo.items():
        q = rows[0]
        names = (f"{repo_id}, the ladder's repo" if summary.single_repo
                 else f"{', '.join(r.quant for r in rows)} ({repo_id})")
        if q.commit_url and q.branch:
            console.print(f"{names}: staged on {q.branch} (main untouched; moeq publish --from-branch {q.branch} "
                          f"publishes the ladder): {q.commit_url}", soft_wrap=True)
        elif q.commit_url or q.pr_url:
            console.print(f"{names}: {q.pr_url or q.commit_url}", soft_wrap=True)
        elif summary.pushed and all(r.ok for r in rows):
            console.print(f"{names}: {q.repo_url} (up to date)", soft_wrap=True)
        elif q.push_plan:
            files = ", ".join(f"{f['path']} ({decimal_size(f['size'])})" for f in q.push_plan)
            console.print(f"{names}: push plan (dry run, not compared with the Hub): {files}", soft_wrap=True)
    for p in summary.compared:
        record, result = p.result.record, p.result
        if result.status == Status.FAILED:
            continue  # the error line says why
        figures = (f": mean KLD {record.quality.quant.kld_mean:.6f}"
                   if record is not None and record.quality and record.quality.quant.kld_mean is not None else "")
        why = f" ({escape(result.why)})" if result.status == Status.SKIPPED else ""
        console.print(f"compare {p.peer.repo}/{p.peer.file}: [{colors[result.status]}]{result.status}[/]{why}{figures}",
                      soft_wrap=True, highlight=False)
    cards = "ladder" if summary.single_repo else "<quant>"
    if any(s.stage == "card" and s.status in (Status.RAN, Status.UP_TO_DATE) for q in summary.quants for s in q.stages):
        console.print(f"cards: {ws.repos_dir}/{cards}/README.md, charts in {ws.repos_dir}/{cards}/images/; "
                      f"previews: {ws.root / 'previews'}/{cards}.html", soft_wrap=True)
    console.print(f"records: {ws.records_dir}", soft_wrap=True)
