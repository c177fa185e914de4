"""Card lint: the defects hand-written cards ship, found before they are published.

Each finding is `FILE:LINE: RULE: message`. Rules that need to know what the repo holds and which
figures the records hold (hub-link, unrecorded-figure, unknown-file) run when a records manifest is
given.

    findings = lint_card(Path("README.md").read_text(), "README.md", manifest=None)
    [f.rule for f in findings]
    # -> ['conflict-marker', 'relative-link']
"""

from __future__ import annotations

import bisect
import dataclasses
import re
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from huggingface_hub import ModelCard

from moeq.cards.derived import derived_findings
from moeq.cards.facts import CardFacts, card_facts
from moeq.cards.findings import Finding, table_cells
from moeq.cards.render import template_files
from moeq.manifest import Manifest

REQUIRED_FRONTMATTER = ("license", "language", "base_model", "base_model_relation", "quantized_by",
                        "pipeline_tag", "tags")
HUB_HOSTS = {"huggingface.co", "www.huggingface.co", "hf.co"}
# First path segments of huggingface.co that are pages, not model repos.
HUB_PAGES = {"docs", "blog", "papers", "spaces", "datasets", "models", "settings", "join", "login", "pricing",
             "learn", "collections", "organizations", "tasks", "chat", "api", "posts", "enterprise"}

CONFLICT_OPEN, CONFLICT_BASE, CONFLICT_MID, CONFLICT_CLOSE = "<" * 7, "|" * 7, "=" * 7, ">" * 7
FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})(.*)$")
# Each repeated part stops where another link could start ('[', '(', '<'), so no line takes quadratic time.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]\\]|\\.)*\]\(\s*<?([^()\s<>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
AUTOLINK = re.compile(r"<([a-zA-Z][a-zA-Z0-9+.-]*:[^\s<>]+)>")
BARE_URL = re.compile(r"(?<![(<\w])(?:https?|ftp)://[^\s)>\]]+")
BACKTICK_RUN = re.compile(r"`+")
HTML_TAG = re.compile(r"<(!--|/?[A-Za-z][A-Za-z0-9-]*)")
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
                         | {row.repo_id.lower() for row in manifest.siblings})
    written = _template_tags(template)
    for number, line in _prose_lines(lines, body_start):
        line = without_code_spans(line)
        for url in _links(line):
            findings += [Finding(number, rule, msg) for rule, msg in _check_link(url, allowed_repos, repo)]
        findings += [Finding(number, "raw-html", f"HTML <{tag}> that the template does not write; a value from the "
                                                 "pipeline or the records is text, escape it")
                     for tag in dict.fromkeys(t.lower() for t in HTML_TAG.findall(line)) if tag not in written]
    if manifest is not None:
        findings += _figure_findings(lines, body_start, manifest, template, facts or card_facts(manifest))

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


def _prose_lines(lines: list[str], start: int):
    """(line number, text) of the lines outside fenced code blocks.

    As CommonMark closes them: only a fence of the same character, at least as long as the one that opened
    the block, with nothing after it (a citation's own ``` inside a ```` block is code)."""
    opened = None
    for i in range(start, len(lines)):
        line = lines[i]
        fence = FENCE.match(line)
        if opened is None:
            if fence:
                opened = fence.group(1)
                continue
            yield i + 1, line
        elif fence and fence.group(1)[0] == opened[0] and len(fence.group(1)) >= len(opened) \
                and not fence.group(2).strip():
            opened = None


def _template_tags(template: Path | None) -> set[str]:
    """The HTML tags (and comments) the card's templates write themselves."""
    return {t.lower() for p in template_files(template) for t in HTML_TAG.findall(p.read_text(encoding="utf-8"))}


def without_code_spans(line: str) -> str:
    """The line less its code spans (a URL or tag in code is an example, not a link or markup), in O(n log n).

    A span opens at a run of backticks and closes at the next run of the same length (CommonMark); a run
    that no later run matches is literal text."""
    runs = [(m.start(), m.end()) for m in BACKTICK_RUN.finditer(line)]
    by_length: dict[int, list[int]] = {}
    for index, (start, end) in enumerate(runs):
        by_length.setdefault(end - start, []).append(index)
    kept, position, i = [], 0, 0
    while i < len(runs):
        start, end = runs[i]
        same = by_length[end - start]
        j = bisect.bisect_right(same, i)
        if j == len(same):
            i += 1
            continue
        close = runs[same[j]]
        kept.append(line[position:start])
        position, i = close[1], same[j] + 1
    kept.append(line[position:])
    return "".join(kept)


def _links(line: str) -> list[str]:
    urls = INLINE_LINK.findall(line) + AUTOLINK.findall(line)
    ref = REFERENCE_DEF.match(line)
    if ref:
        urls.append(ref.group(1))
    rest = AUTOLINK.sub("", INLINE_LINK.sub("", line))
    return urls + BARE_URL.findall(rest)


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
        return [("hub-link", f"links {parts[0]}/{parts[1]}, which is neither the base model, this repo nor a "
                             "published repo of this ladder")]
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


def _figure_findings(lines: list[str], start: int, manifest: Manifest, template: Path | None,
                     facts: CardFacts) -> list[Finding]:
    """Figures and file names in tables, list items and prose that no record (or template) holds."""
    figures = known_figures(facts)
    # Outside tables the templates' own words and the pipeline's card.extra (a citation's year) may add figures;
    # inside tables every figure is a measurement and must come from a record.
    prose_figures = figures | template_figures(template) | _figures(manifest.pipeline.card_extra)
    repo_files = set(manifest.hub_files) | {PurePosixPath(name).name for name in manifest.hub_files}
    ladder_files = {row.file for row in manifest.siblings}
    findings = []
    header: list[str] | None = None
    for number, line in _prose_lines(lines, start):
        if not line.lstrip().startswith("|"):
            header = None
            findings += _unrecorded(number, BARE_URL.sub("", _link_texts(line)), prose_figures)
            continue
        cells = table_cells(line)
        if all(re.fullmatch(r":?-{3,}:?", c) for c in cells if c):
            continue
        if header is None:
            header = cells
        files_table = bool(header) and header[0].lower() == "file"
        for column, cell in enumerate(cells):
            text = _link_texts(cell)
            for name in FILE_NAME.findall(text):
                if files_table and column == 0 and cells is not header and name not in repo_files:
                    findings.append(Finding(number, "unknown-file", f"the file table names {name}, which this "
                                                                    "repo will not contain"))
                elif name not in repo_files and name not in ladder_files:
                    findings.append(Finding(number, "unknown-file", f"names {name}, a file of no repo of this "
                                                                    "ladder"))
            findings += _unrecorded(number, text, figures)
    return findings


def _unrecorded(number: int, text: str, allowed: set[str]) -> list[Finding]:
    """A finding per figure in `text` (file names aside) that `allowed` does not hold."""
    return [Finding(number, "unrecorded-figure", f"{figure} is in no record; figures come from records, not hands")
            for figure in FIGURE.findall(FILE_NAME.sub("", text)) if figure not in allowed]


def _link_texts(text: str) -> str:
    """Markdown links replaced by their text: a URL's digits are not figures."""
    return INLINE_LINK.sub(lambda m: m.group(0)[1:m.group(0).index("]")], text)
