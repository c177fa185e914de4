"""`moeq push`: each staged repo to the Hub in one commit, or its plan (--dry-run, --check)."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer
from rich.table import Table

from moeq.cli.options import ConfigOption, JsonOption, QuantsOption, SwitchLayoutOption
from moeq.cli.output import Results, console, open_context, quiet_progress_off_terminal, selected_quants
from moeq.errors import CheckFailed
from moeq.records import record_json
from moeq.units import decimal_size


def push(
    config: ConfigOption = None,
    quant: QuantsOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan; send nothing that changes the "
                                          "Hub.")] = False,
    create_pr: Annotated[Optional[bool], typer.Option("--create-pr/--no-create-pr", help="Open a pull request "
                                                      "instead of committing to main (default: hub.create_pr).")] = None,
    replace_card: Annotated[bool, typer.Option("--replace-card", help="Replace a README.md on the Hub that moeq did "
                                               "not write.")] = False,
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
    from moeq.plan import Options, run_to
    from moeq.push.stage import plan_notes
    from moeq.steps.repos import check_pushed, push_plan, repo_units

    ctx = open_context(config)
    quiet_progress_off_terminal()
    quants = selected_quants(ctx.pipeline, quant)
    units = repo_units(ctx, quants)
    verdict = check_pushed(ctx, units, replace_card=replace_card, prune=prune) if check else None
    pushed = {} if dry_run or check else run_to(ctx, "push", quants, Options(
        download=False, push=True, create_pr=create_pr, replace_card=replace_card, switch_layout=switch_layout,
        prune=prune))
    results = Results(as_json)
    for index, unit in enumerate(units):
        label = ", ".join(q.type for q in unit.quants)
        if dry_run or check:
            plan = verdict.plans[index] if verdict else push_plan(ctx, unit, replace_card=replace_card,
                                                                  switch_layout=switch_layout, prune=prune)
            files = [f.model_dump() for f in plan.pushed_files()]
            row = {"quant": label, "repo_id": plan.repo_id, "dry_run": True, "repo_exists": plan.repo_exists,
                   "files": files, "upload_bytes": plan.upload_bytes if plan.changes else 0, "record": None,
                   "notes": plan_notes(plan)}
        else:
            record = pushed[("push", unit.quant)].record
            row = {"quant": label, "repo_id": record.repo_id, "dry_run": False, "repo_exists": record.repo_existed,
                   "files": [f.model_dump() for f in record.files], "upload_bytes": record.uploaded_bytes,
                   "record": record_json(record)}
        results.add(row, lambda: _print_push(row))
    results.done()
    if verdict:
        for line in verdict.findings:
            sys.stdout.write(line + "\n")
        if verdict.behind:
            raise CheckFailed("moeq push --check", f"not what the records say: {', '.join(verdict.behind)}",
                              "run moeq push for them")
        if not as_json:
            for plan in verdict.plans:
                same = sum(f.action == "unchanged" for f in plan.pushed_files())
                console.print(f"{plan.repo_id}: main on the Hub holds every staged file as staged ({same} files, "
                              "compared by sha256): nothing to push", soft_wrap=True)


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
    for note in row.get("notes", []):
        console.print(f"note: {note}", soft_wrap=True)
    record = row["record"]
    if row["dry_run"]:
        console.print(f"{len(changes)} change(s), {decimal_size(row['upload_bytes'])} to upload; nothing was sent")
    elif record["commit"] is None:
        console.print(f"{row['quant']}: up to date, no commit")
    else:
        console.print(f"{row['quant']}: {'opened ' + record['pr_url'] if record['pr_url'] else 'committed ' + record['commit_url']}",
                      soft_wrap=True)
