"""`moeq card`: render (the card stage), lint, verify and preview model cards."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from moeq.cli.options import ConfigOption, JsonOption, QuantsOption
from moeq.cli.output import Results, console, open_context, print_json, selected_quants
from moeq.errors import CheckFailed, InputError
from moeq.records import record_json

card_app = typer.Typer(help="Model cards: render (with --config/--quant), lint, verify, preview.",
                       invoke_without_command=True)


@card_app.callback()
def card(
    invocation: typer.Context,
    config: ConfigOption = None,
    quant: QuantsOption = None,
    force: Annotated[bool, typer.Option(help="Render even when the records and templates are unchanged.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Render README.md for each repo from its records, lint it, and stage the repo folder.

    The staged folder (WORKSPACE/repos/ladder/ for the ladder's one repo, WORKSPACE/repos/TYPE/ per quant
    with hub.layout per-quant) holds exactly what the Hub repo will: README.md, the GGUFs, the importance
    matrix and moeq-manifest.json (the records the card was built from). In the one repo the card lists the
    quants asked for and those the last push left there.
    """
    if invocation.invoked_subcommand is not None:
        return
    from moeq.plan import Options, run_to
    from moeq.steps.repos import repo_units

    ctx = open_context(config)
    quants = selected_quants(ctx.pipeline, quant)
    made = run_to(ctx, "card", quants, Options(force=frozenset({"card"} if force else ()), download=False))
    results = Results(as_json)
    for unit in repo_units(ctx, quants):
        done = made[("card", unit.quant)]
        results.add({"skipped": done.up_to_date, "warnings": list(done.warnings), "record": record_json(done.record)},
                    lambda: _print_card(done))
    results.done()


def _print_card(done) -> None:
    record = done.record
    state = "up to date" if done.up_to_date else "written"
    console.print(f"{', '.join(record.quants)}: card {state}: {record.readme.path} (repo {record.repo_id})",
                  soft_wrap=True)
    if record.not_measured:
        console.print(f"  not measured: {', '.join(record.not_measured)}", soft_wrap=True)


def _print_findings(file: Path, findings: list, records: bool, as_json: bool) -> None:
    """FILE:LINE: RULE: message per finding (or JSON); exit 7 when there is any."""
    if as_json:
        print_json({"file": str(file), "records": records,
                    "findings": [{"line": f.line, "rule": f.rule, "message": f.message} for f in findings]})
    else:
        for finding in findings:
            sys.stdout.write(finding.format(str(file)) + "\n")
    if findings:
        raise CheckFailed(file, f"{len(findings)} finding(s)", "the lines above name each")
    if not as_json:
        console.print(f"{file}: no findings")


CardArgument = Annotated[Path, typer.Argument(help="The card (README.md) to check.")]
RecordsOption = Annotated[Optional[Path], typer.Option(help="Folder holding moeq-manifest.json (default: the card's "
                                                       "own folder, when it has one).")]
TemplateOption = Annotated[Optional[Path], typer.Option(help="The card's template, when the pipeline had its own "
                                                        "(card.template); default: moeq's.")]


@card_app.command("lint")
def lint(
    file: CardArgument,
    records: RecordsOption = None,
    template: TemplateOption = None,
    as_json: JsonOption = False,
) -> None:
    """Report each problem in a card as FILE:LINE: RULE: message; exit 7 when there is any.

    Rules: conflict-marker, trailing-whitespace, relative-link, insecure-link, frontmatter; with a records
    manifest also hub-link, unrecorded-figure (tables, list items and prose) and unknown-file.
    """
    from moeq.cards.lint import lint_card
    from moeq.manifest import MANIFEST_NAME, read_card, read_manifest

    text = read_card(file)
    manifest = None
    if records is not None:
        manifest = read_manifest(records / MANIFEST_NAME)
    elif (file.parent / MANIFEST_NAME).is_file():
        manifest = read_manifest(file.parent / MANIFEST_NAME)
    else:
        sys.stderr.write(f"note: no {MANIFEST_NAME} beside {file}; hub-link, unrecorded-figure and "
                         "unknown-file were not checked (pass --records DIR)\n")
    _print_findings(file, lint_card(text, str(file), manifest, template), manifest is not None, as_json)


@card_app.command("verify")
def verify(
    file: CardArgument,
    records: RecordsOption = None,
    template: TemplateOption = None,
    as_json: JsonOption = False,
) -> None:
    """Render the card again from its records manifest and report each line that differs; exit 7 when any does.

    Finds what lint cannot: a hand-edited figure anywhere, or another quant's figure in this quant's row.
    """
    from moeq.cards.verify import card_template, verify_card
    from moeq.manifest import MANIFEST_NAME, read_card, read_manifest

    text = read_card(file)
    manifest_path = (records or file.parent) / MANIFEST_NAME
    manifest = read_manifest(manifest_path)
    template, same = card_template(manifest, template, str(manifest_path))
    if not same:
        sys.stderr.write(f"note: the templates at hand ({template.parent}) differ from those the card was rendered "
                         "with; a difference may come from the templates, not from an edit\n")
    _print_findings(file, verify_card(text, manifest, template), True, as_json)


@card_app.command("preview")
def preview(
    file: Annotated[Optional[Path], typer.Argument(help="A card (README.md); or use --quant (and --config).")] = None,
    config: ConfigOption = None,
    quant: Annotated[Optional[str], typer.Option("--quant", "-q", help="Quant of the ladder (hub.layout "
                                                 "per-quant; the one repo needs none).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="HTML file to write (default: WORKSPACE/previews/"
                                                "ladder.html or TYPE.html, or FILE's name with .html in the "
                                                "current folder).")] = None,
) -> None:
    """Write a card as a standalone HTML page, to see it as readers will before pushing."""
    from moeq.cards.preview import write_preview

    if file is None:
        from moeq.steps.repos import preview, repo_units

        ctx = open_context(config)
        if ctx.pipeline.single_repo:
            units = repo_units(ctx, list(ctx.pipeline.quants))
        elif quant is None:
            raise InputError("moeq card", "nothing to check", 
                         "give a card FILE, or --quant TYPE for a quant of the pipeline's ladder")
        else:
            units = repo_units(ctx, [ctx.pipeline.quant(quant)])
        console.print(f"wrote {preview(ctx, units[0], out)}", soft_wrap=True)
        return
    out = out or Path.cwd() / (file.stem + ".html")
    title = str(file)
    write_preview(file, out, title)
    console.print(f"wrote {out}", soft_wrap=True)
