"""A card as a standalone HTML page, to see it as readers will before pushing.

    html = card_html(Path("README.md").read_text(), title="tiny-phimoe Q8_0")
"""

from __future__ import annotations

import base64
import hashlib
import html
import os
import re
from pathlib import Path

import yaml
from markdown_it import MarkdownIt

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 56rem; margin: 2rem auto; padding: 0 1rem;
       line-height: 1.5; color: #1f2328; }
table { border-collapse: collapse; margin: 1rem 0; } th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; }
th { background: #f6f8fa; } code { background: #f6f8fa; padding: .1rem .3rem; border-radius: 4px; }
pre { background: #f6f8fa; padding: 1rem; overflow-x: auto; } pre code { padding: 0; }
.frontmatter { border: 1px solid #d0d7de; border-radius: 6px; padding: .5rem 1rem; font-size: .9rem; }
.tag { display: inline-block; background: #eef2ff; border-radius: 4px; padding: 0 .4rem; margin: .1rem; }
"""


# An image that did not load is a console error: what a browser test (and a reader's devtools) sees.
IMAGE_CHECK = """
window.addEventListener("load", () => {
  for (const img of document.images) {
    if (!img.complete || img.naturalWidth === 0) console.error("image did not load: " + img.getAttribute("src"));
  }
});
"""
CHECK_IMAGES = f"<script>{IMAGE_CHECK}</script>\n"
# The page runs only moeq's own script: a <script> or an onerror= that reached a card stays inert here.
CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src file: data: https: http:; script-src 'sha256-"
       + base64.b64encode(hashlib.sha256(IMAGE_CHECK.encode()).digest()).decode() + "'")


def split_frontmatter(text: str) -> tuple[dict, str]:
    """(frontmatter as a dict, body); an unparseable or missing block gives ({}, text)."""
    lines = text.split("\n")
    if lines and lines[0].strip() == "---":
        for i in range(1, len(lines)):
            if lines[i].strip() == "---":
                try:
                    data = yaml.safe_load("\n".join(lines[1:i])) or {}
                except yaml.YAMLError:
                    return {}, text
                return (data if isinstance(data, dict) else {}), "\n".join(lines[i + 1:])
    return {}, text


def _frontmatter_html(data: dict) -> str:
    if not data:
        return ""
    rows = []
    for key, value in data.items():
        if isinstance(value, list):
            shown = " ".join(f'<span class="tag">{html.escape(str(v))}</span>' for v in value)
        else:
            shown = html.escape(str(value))
        rows.append(f"<div><b>{html.escape(str(key))}</b>: {shown}</div>")
    return '<div class="frontmatter">' + "\n".join(rows) + "</div>\n"


def card_html(text: str, title: str, local: tuple[str, str] | None = None) -> str:
    """The card as a page; `local` = (the repo's resolve/main URL, a path to the staged folder): the images the
    repo will hold are shown from the staged folder, not from the Hub."""
    data, body = split_frontmatter(text)
    if local is not None:
        body = re.sub(r"!\[([^\]]*)\]\(" + re.escape(local[0]) + r"/", lambda m: f"![{m.group(1)}]({local[1]}/", body)
    renderer = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
    return (f"<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            f"{_frontmatter_html(data)}{renderer.render(body)}{CHECK_IMAGES}</body>\n</html>\n")


def write_preview(card: Path, out: Path, title: str) -> None:
    """Write `card` as HTML to `out` unless it holds that page already; never into a staged repo folder, which
    holds only what is pushed."""
    from moeq.errors import CheckFailed
    from moeq.manifest import MANIFEST_NAME, read_card
    from moeq.workspace import write_text_atomic

    if out.resolve().parent == card.resolve().parent and (card.parent / MANIFEST_NAME).is_file():
        raise CheckFailed(out, "is inside the staged repo folder, which must hold only what is pushed",
                          "choose another --out")
    local = None
    if (card.parent / MANIFEST_NAME).is_file():  # a staged repo: its images from the folder beside the card
        from moeq.manifest import read_manifest

        repo = read_manifest(card.parent / MANIFEST_NAME).repo_id
        local = (f"https://huggingface.co/{repo}/resolve/main",
                 os.path.relpath(card.resolve().parent, out.resolve().parent))
    html = card_html(read_card(card), title=title, local=local)
    try:
        if out.read_text(encoding="utf-8") == html:
            return  # unchanged: a build with nothing to do writes nothing
    except (OSError, UnicodeDecodeError):
        pass
    write_text_atomic(out, html)
