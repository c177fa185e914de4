"""Card lint: the defects hand-written cards ship, found before they are published.

Each finding is `FILE:LINE: RULE: message`. Rules that need to know what the repo holds and which
figures the records hold (hub-link, unrecorded-figure, unknown-file) run when a records manifest is
given.

    findings = lint_card(Path("README.md").read_text(), "README.md", manifest=None)
    [f.rule for f in findings]
    # -> ['conflict-marker', 'relative-link']
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from huggingface_hub import ModelCard
from markdown_it import MarkdownIt

from moeq.cards.derived import derived_findings
from moeq.cards.facts import CardFacts, card_facts
from moeq.cards.findings import Finding
from moeq.cards.render import template_files
from moeq.manifest import Manifest

REQUIRED_FRONTMATTER = ("license", "language", "base_model", "base_model_relation", "quantized_by",
                        "pipeline_tag", "tags")
HUB_HOSTS = {"huggingface.co", "www.huggingface.co", "hf.co"}
# First path segments of huggingface.co that are pages, not model repos.
HUB_PAGES = {"docs", "blog", "papers", "spaces", "datasets", "models", "settings", "join", "login", "pricing",
             "learn", "collections", "organizations", "tasks", "chat", "api", "posts", "enterprise"}

CONFLICT_OPEN, CONFLICT_BASE, CONFLICT_MID, CONFLICT_CLOSE = "<" * 7, "|" * 7, "=" * 7, ">" * 7
# The card's Markdown as the Hub shows it: CommonMark, raw HTML, GFM tables (markdown-it, linear in the text).
MARKDOWN = MarkdownIt("commonmark", {"html": True}).enable(["table"])
# GFM's autolink extension (a bare https://... in text is a link on the Hub), which CommonMark lacks.
BARE_URL = re.compile(r"(?<![(<\w])(?:https?|ftp)://[^\s)>\]]+")
HTML_TAG = re.compile(r"<(!--|/?[A-Za-z][A-Za-z0-9-]*)")  # in the Jinja templates, which are not Markdown
# A figure: a number standing alone (not part of a name such as Q8_0, phi-3.5 or a sha256).
FIGURE = re.compile(r"(?<![\w.\-])-?\d+(?:[.,]\d+)*(?![\w])")
FILE_NAME = re.compile(r"(?<![\w.\-])[\w.\-]+\.gguf\b")  # starts only where a name can start: linear


def lint_card(text: str, path: str = "README.md", manifest: Manifest | None = None,
              template: Path | None = None, facts: CardFacts | None = None) -> list[Finding]:
    """All findings in a card, in line order; `template` (default moeq's own) says which figures are static text;
    `facts`: the manifest's card facts where the caller made them already (the card stage renders from them)."""
    lines = text.split("\n")
    body_start, findings = _frontmatter(text, lines)
    findings += _conflict_markers(lines)
    findings += [Finding(i, "trailing-whitespace", "line ends in spaces or tabs")
                 for i, line in enumerate(lines, 1) if line != line.rstrip()]
    allowed_repos = repo = None
    if manifest is not None:
        repo = (manifest.repo_id.lower(), set(manifest.hub_files))
        allowed_repos = ({manifest.pipeline.model.base_model.lower(), manifest.repo_id.lower()}
                         | {row.repo_id.lower() for row in manifest.siblings}
                         | {compared.repo.lower() for compared in manifest.compared})
    card = read_markdown(lines, body_start)
    for number, url in card.links:
        findings += [Finding(number, rule, msg) for rule, msg in _check_link(url, allowed_repos, repo)]
    written = _template_tags(template)
    seen: set[tuple[int, str]] = set()
    for number, tag in card.tags:
        if tag not in written and (number, tag) not in seen:
            seen.add((number, tag))
            findings.append(Finding(number, "raw-html", f"HTML <{tag}> that the template does not write; a value "
                                                        "from the pipeline or the records is text, escape it"))
    if manifest is not None:
        findings += _figure_findings(card, manifest, template, facts or card_facts(manifest))

    findings += derived_findings(lines)
    return sorted(findings, key=lambda f: (f.line, f.rule))


def _frontmatter(text: str, lines: list[str]) -> tuple[int, list[Finding]]:
    """(index of the first body line, findings) for the YAML frontmatter."""
    if not lines or lines[0].strip() != "---":
        return 0, [Finding(1, "frontmatter", "the card has no YAML frontmatter; the Hub needs license, "
                                             "base_model and tags there")]
    end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), None)
    if end is None:
        return 0, [Finding(1, "frontmatter", "the frontmatter is never closed with a '---' line")]
    try:
        data = ModelCard(text, ignore_metadata_errors=False).data.to_dict()
    except Exception as exc:  # huggingface_hub raises ValueError or YAML errors
        return end + 1, [Finding(1, "frontmatter", f"does not parse: {str(exc).splitlines()[0]}")]
    findings = [Finding(1, "frontmatter", f"required key {key!r} is missing")
                for key in REQUIRED_FRONTMATTER if not data.get(key)]
    if data.get("base_model_relation") and data["base_model_relation"] != "quantized":
        findings.append(Finding(1, "frontmatter", f"base_model_relation is {data['base_model_relation']!r}; "
                                                  "a quant repo says 'quantized'"))
    tags = data.get("tags") or []
    if tags and "gguf" not in tags:
        findings.append(Finding(1, "frontmatter", "tags lack 'gguf'"))
    return end + 1, findings


def _conflict_markers(lines: list[str]) -> list[Finding]:
    findings, depth = [], 0
    for i, line in enumerate(lines, 1):
        if line.startswith(CONFLICT_OPEN):
            depth += 1
        elif line.startswith(CONFLICT_CLOSE):
            depth = max(0, depth - 1)
        elif not (depth and (line.rstrip() == CONFLICT_MID or line.startswith(CONFLICT_BASE))):
            continue
        findings.append(Finding(i, "conflict-marker", f"git merge-conflict marker {line.strip()[:40]!r}; "
                                                      "resolve the merge"))
    return findings


def _template_tags(template: Path | None) -> set[str]:
    """The HTML tags (and comments) the card's templates write themselves."""
    return {t.lower() for p in template_files(template) for t in HTML_TAG.findall(p.read_text(encoding="utf-8"))}


@dataclass
class Cell:
    line: int
    column: int
    header: bool  # a cell of the table's header row
    table: int  # which table of the card
    text: str


@dataclass
class MarkdownCard:
    """What lint reads of a card's body, from markdown-it's tokens as CommonMark (and GFM's tables) parse it: the
    link targets, the HTML tags, the text of prose and of table cells (code spans in, code blocks out), each with
    its line."""

    links: list[tuple[int, str]] = field(default_factory=list)
    tags: list[tuple[int, str]] = field(default_factory=list)
    prose: list[tuple[int, str]] = field(default_factory=list)
    cells: list[Cell] = field(default_factory=list)


def read_markdown(lines: list[str], start: int) -> MarkdownCard:
    """The card's body (`lines` from index `start`) as lint reads it."""
    card = MarkdownCard()
    table = column = row_line = 0
    header = in_cell = False
    for token in MARKDOWN.parse("\n".join(lines[start:])):
        first = start + 1 + (token.map[0] if token.map else 0)
        if token.type == "table_open":
            table += 1
        elif token.type in ("thead_open", "tbody_open"):
            header = token.type == "thead_open"
        elif token.type == "tr_open":
            column, row_line = -1, first
        elif token.type in ("th_open", "td_open"):
            column, in_cell = column + 1, True
        elif token.type in ("th_close", "td_close"):
            in_cell = False
        elif token.type == "html_block":
            _read_html(card, token.content, first)
        elif token.type == "inline":
            for number, text in _read_inline(card, token.children or [], row_line if in_cell else first):
                if in_cell:
                    card.cells.append(Cell(number, column, header, table, text))
                else:
                    card.prose.append((number, text))
    return card


def _read_inline(card: MarkdownCard, children, line: int) -> list[tuple[int, str]]:
    """Each line's text (code spans and link texts in, link targets and autolinks out), and the links and tags on
    the way: a bare URL in text is a link too (GFM's autolink extension), but not in a link's own text."""
    texts: list[tuple[int, str]] = []
    parts: list[str] = []
    link = None  # the markup of the link being read ("autolink" for <https://...>)
    for child in children:
        if child.type in ("softbreak", "hardbreak"):
            texts.append((line, "".join(parts)))
            parts, line = [], line + 1
        elif child.type == "link_open":
            link = child.markup
            card.links.append((line, str(child.attrs.get("href", ""))))
        elif child.type == "link_close":
            link = None
        elif child.type == "image":
            card.links.append((line, str(child.attrs.get("src", ""))))
            parts.append(child.content)
        elif child.type == "html_inline":
            _read_html(card, child.content, line)
        elif child.type == "text" and link != "autolink":
            if link is None:
                card.links += [(line, url) for url in BARE_URL.findall(child.content)]
            parts.append(child.content)
        elif child.type == "code_inline":
            parts.append(child.content)
    texts.append((line, "".join(parts)))
    return [(number, text) for number, text in texts if text]


class _Tags(HTMLParser):
    def __init__(self, card: MarkdownCard, line: int):
        super().__init__(convert_charrefs=True)
        self.card, self.line = card, line

    def _at(self) -> int:
        return self.line + self.getpos()[0] - 1

    def handle_starttag(self, tag, attrs):
        self.card.tags.append((self._at(), tag))
        self.card.links += [(self._at(), value or "") for name, value in attrs if name in ("href", "src")]

    def handle_endtag(self, tag):
        self.card.tags.append((self._at(), "/" + tag))

    def handle_comment(self, data):
        self.card.tags.append((self._at(), "!--"))

    def handle_data(self, data):
        for offset, text in enumerate(data.split("\n")):
            if text.strip():
                self.card.prose.append((self._at() + offset, text))


def _read_html(card: MarkdownCard, html: str, line: int) -> None:
    """The tags (and comments) of raw HTML, the targets of its href and src, its text as prose."""
    parser = _Tags(card, line)
    parser.feed(html)
    parser.close()


def _check_link(url: str, allowed_repos: set[str] | None,
                repo: tuple[str, set[str]] | None = None) -> list[tuple[str, str]]:
    if not url or url.startswith("#"):
        return []
    parsed = urlparse(url)
    if not parsed.scheme:
        return [("relative-link", f"{url!r} is relative: it breaks on the Hub; link with https://huggingface.co/...")]
    if parsed.scheme != "https":
        return [("insecure-link", f"{url!r} is not https")]
    if allowed_repos is None or (parsed.hostname or "").lower() not in HUB_HOSTS:
        return []
    parts = [p for p in parsed.path.split("/") if p]
    if len(parts) < 2 or parts[0].lower() in HUB_PAGES:
        return []
    repo_id = f"{parts[0]}/{parts[1]}".lower()
    if repo_id not in allowed_repos:
        return [("hub-link", f"links {parts[0]}/{parts[1]}, which is neither the base model, this repo, a "
                             "published repo of this ladder nor the repo of a file compared with it")]
    if repo and repo_id == repo[0] and len(parts) > 4 and parts[2] in ("resolve", "blob"):
        path = "/".join(parts[4:])
        if path not in repo[1]:
            return [("unknown-file", f"links {path} (an image or file) in this repo, which it will not hold")]
    return []


# ---------------------------------------------------------------- tables against records


def _figures(value) -> set[str]:
    if dataclasses.is_dataclass(value):
        return _figures(vars(value))
    if isinstance(value, dict):
        return set().union(*(_figures(v) for v in value.values())) if value else set()
    if isinstance(value, (list, tuple)):
        return set().union(*(_figures(v) for v in value)) if value else set()
    if isinstance(value, bool) or value is None:
        return set()
    if isinstance(value, (int, float)):
        return {str(value)}
    return set(FIGURE.findall(str(value)))


def known_figures(facts: CardFacts) -> set[str]:
    """Every figure the card's facts hold, from records: what a table may show (card.extra is not a record)."""
    return _figures({key: value for key, value in vars(facts).items() if key != "extra"})


def template_figures(template: Path | None) -> set[str]:
    """Figures written into the templates themselves ("batches of 32 tokens"): static text, not measurements."""
    return set().union(*(FIGURE.findall(p.read_text(encoding="utf-8")) for p in template_files(template)))


def _figure_findings(card: MarkdownCard, manifest: Manifest, template: Path | None,
                     facts: CardFacts) -> list[Finding]:
    """Figures and file names in tables, list items and prose that no record (or template) holds."""
    figures = known_figures(facts)
    # Outside tables the templates' own words and the pipeline's card.extra (a citation's year) may add figures;
    # inside tables every figure is a measurement and must come from a record.
    prose_figures = figures | template_figures(template) | _figures(manifest.pipeline.card_extra)
    repo_files = set(manifest.hub_files) | {PurePosixPath(name).name for name in manifest.hub_files}
    ladder_files = {row.file for row in manifest.siblings}
    findings = []
    for number, text in card.prose:
        findings += _unrecorded(number, BARE_URL.sub("", text), prose_figures)
    files_tables = {c.table for c in card.cells if c.header and c.column == 0 and c.text.strip().lower() == "file"}
    for cell in card.cells:
        for name in FILE_NAME.findall(cell.text):
            if cell.table in files_tables and cell.column == 0 and not cell.header and name not in repo_files:
                findings.append(Finding(cell.line, "unknown-file", f"the file table names {name}, which this "
                                                                   "repo will not contain"))
            elif name not in repo_files and name not in ladder_files:
                findings.append(Finding(cell.line, "unknown-file", f"names {name}, a file of no repo of this "
                                                                   "ladder"))
        findings += _unrecorded(cell.line, cell.text, figures)
    return findings


def _unrecorded(number: int, text: str, allowed: set[str]) -> list[Finding]:
    """A finding per figure in `text` (file names aside) that `allowed` does not hold."""
    return [Finding(number, "unrecorded-figure", f"{figure} is in no record; figures come from records, not hands")
            for figure in FIGURE.findall(FILE_NAME.sub("", text)) if figure not in allowed]
