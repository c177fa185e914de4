"""`moeq push` and `moeq fetch`: the two ends that touch the Hub."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer
from rich.table import Table

from moeq.cli.common import (ConfigOption, JsonOption, QuantsOption, SwitchLayoutOption, app, console, guard,
                             open_context, print_json, selected_quants)
from moeq.errors import CheckFailed
from moeq.records import record_json
from moeq.units import decimal_size


def quiet_progress_off_terminal() -> None:
    """huggingface_hub's progress bars on a terminal; in logs (CI) they would be noise."""
    if not sys.stderr.isatty():
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


@app.command()
@guard
def push(
    config: ConfigOption = None,
    quant: QuantsOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan; send nothing that changes the "
                                          "Hub.")] = False,
    create_pr: Annotated[Optional[bool], typer.Option("--create-pr/--no-create-pr", help="Open a pull request "
                                                      "instead of committing to main (default: hub.create_pr).")] = None,
    force: Annotated[bool, typer.Option(help="Replace a README.md on the Hub that moeq did not write.")] = False,
    prune: Annotated[bool, typer.Option("--prune", help="Also delete files on the Hub that moeq did not publish "
                                        "(its manifest there does not list them); without it they are kept.")] = False,
    check: Annotated[bool, typer.Option("--check", help="A dry run that exits 7 unless every repo on the Hub "
                                        "already holds exactly its staged files.")] = False,
    switch_layout: SwitchLayoutOption = False,
    as_json: JsonOption = False,
) -> None:
    """Publish each staged repo (moeq card) in one commit: GGUF(s), importance matrix, README.md and the records
    manifest. In the ladder's one repo (hub.layout single) only the quants asked for change.

    The token comes from HF_TOKEN or `hf auth login`; it is never printed or stored.
    """
    from moeq import steps

    ctx = open_context(config)
    quiet_progress_off_terminal()
    units = steps.repo_units(ctx, selected_quants(ctx.pipeline, quant))
    verdict = steps.check_pushed(ctx, units, force=force, prune=prune) if check else None
    results = []
    for index, unit in enumerate(units):
        label = ", ".join(q.type for q in unit.quants)
        if dry_run or check:
            plan = verdict.plans[index] if verdict else steps.push_plan(ctx, unit, force=force,
                                                                        switch_layout=switch_layout, prune=prune)
            files = [f.model_dump() for f in plan.pushed_files()]
            row = {"quant": label, "repo_id": plan.repo_id, "dry_run": True, "repo_exists": plan.repo_exists,
                   "files": files, "upload_bytes": plan.upload_bytes if plan.changes else 0, "record": None}
        else:
            record = steps.push(ctx, unit, create_pr=create_pr, force=force, switch_layout=switch_layout,
                                prune=prune).record
            row = {"quant": label, "repo_id": record.repo_id, "dry_run": False, "repo_exists": record.repo_existed,
                   "files": [f.model_dump() for f in record.files], "upload_bytes": record.uploaded_bytes,
                   "record": record_json(record)}
        results.append(row)
        if not as_json:
            _print_push(row)
    if as_json:
        print_json(results)
    if verdict:
        for line in verdict.findings:
            sys.stdout.write(line + "\n")
        if verdict.behind:
            raise CheckFailed(f"not what the records say: {', '.join(verdict.behind)}; run moeq push for them")


def _print_push(row: dict) -> None:
    changes = [f for f in row["files"] if f["action"] != "unchanged"]
    title = (f"{row['repo_id']}{'' if row['repo_exists'] else ' (new repo)'}: push plan"
             f"{' (dry run)' if row['dry_run'] else ''}")
    table = Table(title=title)
    for column in ("file", "action", "size"):
        table.add_column(column, overflow="fold")
    for f in row["files"]:
        shown = decimal_size(f["size"]) if f["action"] not in ("delete", "kept") else ""
        table.add_row(f["path"], f["action"], shown)
    console.print(table)
    record = row["record"]
    if row["dry_run"]:
        console.print(f"{len(changes)} change(s), {decimal_size(row['upload_bytes'])} to upload; nothing was sent")
    elif record["commit"] is None:
        console.print(f"{row['quant']}: up to date, no commit")
    else:
        console.print(f"{row['quant']}: {'opened ' + record['pr_url'] if record['pr_url'] else 'committed ' + record['commit_url']}",
                      soft_wrap=True)


@app.command()
@guard
def fetch(
    config: ConfigOption = None,
    force: Annotated[bool, typer.Option(help="Fetch again even when the record says the source is current.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Produce the F16 GGUF source: download (and for safetensors, convert) it, or make the synth model.

    The revision is resolved to a commit sha; each file is checked against the Hub's sha256; an
    interrupted download continues where it stopped.
    """
    from moeq import steps

    ctx = open_context(config)
    quiet_progress_off_terminal()
    done = steps.fetch(ctx, force=force)
    record = done.record
    if as_json:
        print_json({"skipped": done.skipped, "record": record_json(record)})
        return
    state = "up to date" if done.skipped else f"fetched in {done.wall_s:.1f} s"
    console.print(f"source {state}: {record.output.path} ({decimal_size(record.output.size)}), from {record.origin}",
                  soft_wrap=True)


@app.command()
@guard
def build(
    config: ConfigOption = None,
    quant: Annotated[Optional[list[str]], typer.Option("--quant", "-q", help="Quant type(s) of the ladder.")] = None,
    all_quants: Annotated[bool, typer.Option("--all", help="Every quant of the ladder.")] = False,
    push: Annotated[bool, typer.Option("--push", help="Push to the Hub (also when hub.push is true).")] = False,
    skip_bench: Annotated[bool, typer.Option("--skip-bench", help="Leave the bench stage out.")] = False,
    force_stage: Annotated[Optional[str], typer.Option(help="Run this stage and every stage after it again: "
                                                       "fetch, imatrix, quantize, validate, bench, shards, card "
                                                       "or push.")] = None,
    switch_layout: SwitchLayoutOption = False,
    as_json: JsonOption = False,
) -> None:
    """Run fetch -> imatrix -> quantize -> validate -> bench -> shards -> card -> push for each quant, skipping what
    is current (imatrix only for quants with `imatrix: auto`).

    Without --push the last stage shows the files the push would send, without asking the Hub.
    Exit 0 when every quant succeeded, else the exit code of the first failed stage.
    """
    from moeq.build import build as run_build
    from moeq.errors import InputError

    ctx = open_context(config)
    if bool(quant) == all_quants:
        raise InputError("moeq build needs --quant TYPE (one or more) or --all")
    quants = selected_quants(ctx.pipeline, None if all_quants else quant)
    quiet_progress_off_terminal()
    summary = run_build(ctx, quants, push=push or ctx.pipeline.hub.push, skip_bench=skip_bench,
                        force_stage=force_stage, switch_layout=switch_layout)
    if as_json:
        print_json(summary.as_dict())
    else:
        _print_summary(summary, ctx.ws)
    failures: dict[tuple[str, str], list[str]] = {}  # the shared fetch's failure names every quant once
    for q in summary.quants:
        failed = next((s for s in q.stages if s.status == "failed"), None)
        if failed:
            failures.setdefault((failed.stage, failed.detail), []).append(q.quant)
    if failures:  # one error line, whatever failed
        sys.stderr.write("error: " + "; ".join(f"{', '.join(names)}: {stage} failed: {detail}"
                                              for (stage, detail), names in failures.items()) + "\n")
    if not summary.ok:
        raise typer.Exit(summary.exit_code)


def _print_summary(summary, ws) -> None:
    from moeq.build import STAGES

    colors = {"ran": "green", "up to date": "cyan", "failed": "red", "skipped": "yellow"}
    # One row per stage and a column per quant: stage names never wrap in an 80-column terminal or CI log.
    table = Table(title="moeq build")
    table.add_column("stage", no_wrap=True)
    for q in summary.quants:
        table.add_column(q.quant, no_wrap=True)
    cells = [{s.stage: f"[{colors[s.status]}]{s.status}[/]" + (f" {s.seconds:.1f}s" if s.status in ("ran", "failed")
                                                                else "") for s in q.stages} for q in summary.quants]
    for stage in STAGES:
        table.add_row(stage, *[c.get(stage, "") for c in cells])
    table.add_row("size", *[decimal_size(q.artifact_bytes) if q.artifact_bytes else "" for q in summary.quants])
    console.print(table)
    by_repo: dict[str, list] = {}  # the ladder's one repo: one line for its quants
    for q in summary.quants:
        by_repo.setdefault(q.repo_id, []).append(q)
    for repo_id, rows in by_repo.items():
        q, names = rows[0], ", ".join(r.quant for r in rows)
        if q.commit_url or q.pr_url:
            console.print(f"{names}: {q.pr_url or q.commit_url}", soft_wrap=True)
        elif summary.pushed and all(r.ok for r in rows):
            console.print(f"{names}: {q.repo_url} (up to date)", soft_wrap=True)
        elif q.push_plan:
            files = ", ".join(f"{f['path']} ({decimal_size(f['size'])})" for f in q.push_plan)
            console.print(f"{names}: push plan (dry run, not compared with the Hub) for {repo_id}: {files}",
                          soft_wrap=True)
    cards = "ladder" if summary.single_repo else "<quant>"
    if any(s.stage == "card" and s.status in ("ran", "up to date") for q in summary.quants for s in q.stages):
        console.print(f"cards: {ws.repos_dir}/{cards}/README.md, charts in {ws.repos_dir}/{cards}/images/; "
                      f"previews: {ws.root / 'previews'}/{cards}.html", soft_wrap=True)
    console.print(f"records: {ws.records_dir}", soft_wrap=True)
