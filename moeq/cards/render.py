"""Facts -> card text, through a sandboxed Jinja environment with StrictUndefined.

A fact the template asks for that does not exist is an InputError naming the template, its line and
the fact; so is a template that does not parse or tries something the sandbox forbids.

    text = render_card(card_facts(manifest), template=None)
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import resource
import signal
import threading
from pathlib import Path
from typing import Iterator

import jinja2
import jinja2.sandbox
from huggingface_hub import ModelCardData
from markupsafe import Markup

from moeq.errors import InputError
from moeq.manifest import MARKER

# Shipped inside the package (a wheel holds them); `templates/` at the top of the repo links here.
BUILTIN_TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
DEFAULT_TEMPLATE = BUILTIN_TEMPLATES / "model-card.md.j2"
# What one rendering may take (README.md, "Limits"): a card is tens of KB and renders in milliseconds.
MAX_SECONDS = 30
MAX_MEMORY = 1 << 30
MAX_OUTPUT = 4 << 20


def card_yaml(frontmatter: dict) -> Markup:
    """The frontmatter as huggingface_hub writes it, so the Hub reads back the same values (YAML quotes them)."""
    return Markup(ModelCardData(**frontmatter).to_yaml())


# Every value a template prints is text from the pipeline or the records: in Markdown prose and table cells it
# can open no tag, link, code span or cell, and ends no line. Code spans and fenced blocks take the filters below.
_PROSE = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\\": "\\\\", "`": "\\`", "[": "\\[",
                        "]": "\\]", "|": "\\|", "\n": " ", "\r": " "})
_BACKTICKS = re.compile(r"`+")


def markdown_text(value: object) -> object:
    """Jinja's finalize: a printed value as Markdown text (Markup, from a filter below, is printed as it is)."""
    if isinstance(value, (Markup, jinja2.Undefined)) or value is None:
        return value
    return str(value).translate(_PROSE)


def code(value: object) -> Markup:
    """A value as one inline code span, fenced with more backticks than it holds (`a``b` cannot close it)."""
    text = " ".join(str(value).splitlines())
    fence = "`" * (1 + max((len(run) for run in _BACKTICKS.findall(text)), default=0))
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return Markup(f"{fence}{pad}{text}{pad}{fence}")


def cell_code(value: object) -> Markup:
    """A value as an inline code span in a table cell: GFM ends a cell at any unescaped `|`, code spans included
    (a tensor named `a|b` would add a column), so each is escaped there."""
    return Markup(str(code(value)).replace("|", "\\|"))


def verbatim(value: object) -> Markup:
    """A value inside a fenced block the template opened: on one line, so it can never start the closing fence."""
    return Markup(" ".join(str(value).splitlines()))


def fenced(value: object, info: str = "") -> Markup:
    """A multi-line value as a whole fenced block, its fence longer than any run of backticks in it."""
    text = str(value).strip("\n")
    fence = "`" * max(3, 1 + max((len(run) for run in _BACKTICKS.findall(text)), default=0))
    return Markup(f"{fence}{info}\n{text}\n{fence}")


def template_files(template: Path | None) -> list[Path]:
    """The template and every file it may include: what a change to the card's look is made of."""
    template = Path(template) if template else DEFAULT_TEMPLATE
    files = {template.resolve()}
    for folder in (template.parent, BUILTIN_TEMPLATES):
        files.update(p.resolve() for p in folder.rglob("*.j2"))
    return sorted(files)


def templates_sha256(template: Path | None) -> str:
    digest = hashlib.sha256()
    for path in template_files(template):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


class _BudgetSpent(Exception):
    """Raised inside a rendering that ran past its budget, so the template line is in the traceback."""


class _Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The sandbox, with `*` and `**` refused where they would build something larger than a card."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator, left, right):
        if operator == "*" and isinstance(left, (str, list, tuple)) != isinstance(right, (str, list, tuple)):
            seq, times = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
            if isinstance(times, int) and len(seq) * times > MAX_OUTPUT:
                raise _BudgetSpent(f"a repetition of {len(seq) * times:,} items, more than a card holds")
        if operator == "**" and isinstance(right, int) and abs(right) > 1000:
            raise _BudgetSpent(f"a power of {right}")
        return super().call_binop(context, operator, left, right)


def _environment(template: Path) -> jinja2.Environment:
    env = _Sandbox(
        loader=jinja2.FileSystemLoader([str(template.parent), str(BUILTIN_TEMPLATES)]),
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True,
        trim_blocks=True, lstrip_blocks=True, finalize=markdown_text,
    )
    env.filters.update(card_yaml=card_yaml, code=code, cell_code=cell_code, verbatim=verbatim, fenced=fenced)
    return env


def _vm_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[0]) * resource.getpagesize()


@contextlib.contextmanager
def _budget() -> Iterator[None]:
    """Time and memory for one rendering: a runaway loop or recursion ends in _BudgetSpent or MemoryError
    inside the template (so its line can be named), not in a machine out of memory.

    Signals work only in the main thread; elsewhere the rendering runs unbounded (the CLI renders in it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def spent(signum, frame):
        raise _BudgetSpent(f"more than {MAX_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, spent)
    signal.setitimer(signal.ITIMER_REAL, MAX_SECONDS)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _vm_bytes() + MAX_MEMORY
    if hard == resource.RLIM_INFINITY or cap < hard:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _template_line(exc: BaseException) -> str:
    """`file:line` of the innermost template frame in a rendering traceback."""
    where = ""
    tb = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename.endswith(".j2"):
            where = f"{filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    return where


def render_card(facts: object, template: Path | None = None) -> str:
    template = Path(template) if template else DEFAULT_TEMPLATE
    if not template.is_file():
        raise InputError(template, "card template not found", "fix card.template in the pipeline file")
    env = _environment(template)
    try:
        with _budget():
            text = env.get_template(template.name).render(**vars(facts), marker=MARKER)
            if len(text) > MAX_OUTPUT:
                raise _BudgetSpent(f"{len(text):,} characters of output")
    except jinja2.TemplateSyntaxError as exc:
        raise InputError(f"{exc.filename or template}:{exc.lineno}", f"template syntax error: {exc.message}",
                         "fix the template") from None
    except jinja2.TemplateNotFound as exc:
        raise InputError(template, f"includes {exc.name!r}, which is neither beside it nor in {BUILTIN_TEMPLATES}",
                         "put the partial beside the template or include one moeq ships") from None
    except jinja2.UndefinedError as exc:
        where = _template_line(exc) or str(template)
        raise InputError(where, f"the template uses a fact that does not exist ({exc.message})",
                         "the facts are listed in README.md, 'Card facts'") from None
    except (_BudgetSpent, MemoryError, RecursionError, OverflowError) as exc:
        where = _template_line(exc) or str(template)
        what = {MemoryError: f"more than {MAX_MEMORY >> 20} MiB of memory", RecursionError: "recursion too deep",
                OverflowError: f"a range or number too large: {exc}"}.get(type(exc), str(exc))
        raise InputError(where, f"the template ran past its budget ({what})",
                         "a card template only formats facts, see README.md, 'Limits'") from None
    except jinja2.exceptions.SecurityError as exc:
        where = _template_line(exc) or str(template)
        raise InputError(where, f"the template tried something the sandbox forbids ({exc})",
                         "use only the facts and filters a card template is given (README, \"Model cards\")") from None
    # Whitespace noise is normalised, not left to lint: no trailing spaces, no runs of blank lines.
    text = "\n".join(line.rstrip() for line in text.splitlines()).strip("\n") + "\n"
    return re.sub(r"\n{3,}", "\n\n", text)
