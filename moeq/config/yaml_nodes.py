"""Walking a YAML document with the line of every node kept, so every error says `FILE:LINE: key.path: what`.

PyYAML's composer keeps a start mark on each node; a `Node` pairs one with its key path. Only plain
scalars, mappings and lists are read: any YAML tag is refused.
"""

from __future__ import annotations

import math
import re
import stat
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from moeq.errors import ConfigError

PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null")}
PORTABLE_NAME = re.compile(r"[A-Za-z0-9._+\-/]+")  # '/' only where a relative path may have folders
MAX_TEXT_BYTES = 256 << 20  # a calibration, selection or evaluation text (moeq compares them line by line)
MAX_NAME = 200  # characters in one file name: the filesystem's limit is 255 bytes, with room for suffixes
CONFIG_FIX = "fix it in the pipeline file (README, \"pipeline.yaml reference\")"
COLLECTION_TAGS = {yaml.MappingNode: "tag:yaml.org,2002:map", yaml.SequenceNode: "tag:yaml.org,2002:seq"}


class Node:
    """A YAML node with its key path, for error messages that point at the line."""

    def __init__(self, file: Path, node: yaml.Node, path: str):
        self.file, self.node, self.path = file, node, path

    @property
    def line(self) -> int:
        return self.node.start_mark.line + 1

    def fail(self, problem: str, fix: str = CONFIG_FIX) -> ConfigError:
        return ConfigError(f"{self.file}:{self.line}: {self.path or '(top level)'}", problem, fix)

    def child_path(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        if len(key) > 80:  # a key is echoed in every error under it: a long one is named by its start and length
            key = f"{key[:40]}...({len(key):,} characters)"
        return f"{self.path}.{key}" if self.path else key

    def mapping(self, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict[str, Node]:
        if not isinstance(self.node, yaml.MappingNode):
            raise self.fail(f"expected a mapping, got {kind_of(self.node)}")
        out: dict[str, Node] = {}
        for key_node, value_node in self.node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise Node(self.file, key_node, self.path).fail("keys must be plain names")
            key = key_node.value
            where = Node(self.file, key_node, self.child_path(key))
            if key not in allowed:
                raise where.fail("unknown key", f"allowed here: {', '.join(allowed)}")
            if key in out:
                raise where.fail(f"duplicate key (first at line {out[key].line})")
            out[key] = Node(self.file, value_node, self.child_path(key))
        for key in required:
            if key not in out:
                raise self.fail(f"missing required key {key!r}")
        return out

    def scalar(self) -> Any:
        if not isinstance(self.node, yaml.ScalarNode):
            raise self.fail(f"expected a single value, got {kind_of(self.node)}")
        if self.node.tag not in PLAIN_TAGS:
            raise self.fail(f"the YAML tag {self.node.tag!r} is not allowed", "write a plain string, number or boolean")
        try:
            value = yaml.safe_load(yaml.serialize(self.node))
        except yaml.YAMLError as exc:
            raise self.fail(f"not a valid value ({first_sentence(exc)})") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(f"{value} is not a usable number")
        return value

    def str(self) -> str:
        value = self.scalar()
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"expected a non-empty string, got {value!r}")
        return value

    def int(self, minimum: int | None = None, maximum: int | None = None) -> int:
        value = self.scalar()
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"expected an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.fail(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.fail(f"must be at most {maximum}, got {value}")
        return value

    def bool(self) -> bool:
        value = self.scalar()
        if not isinstance(value, bool):
            raise self.fail(f"expected true or false, got {value!r}")
        return value

    def list(self) -> list[Node]:
        if not isinstance(self.node, yaml.SequenceNode):
            raise self.fail(f"expected a list, got {kind_of(self.node)}")
        return [Node(self.file, n, self.child_path(i)) for i, n in enumerate(self.node.value)]

    def relative_name(self) -> str:
        """A file name inside a repo or the workspace: relative, no '..', portable characters, not too long."""
        value = self.str()
        pure = PurePosixPath(value)
        if pure.is_absolute() or value.startswith("~") or ".." in pure.parts or "\\" in value:
            raise self.fail(f"{value[:80]!r} is not a safe relative name", "use a plain name like 'model-Q8_0.gguf'")
        if not PORTABLE_NAME.fullmatch(value):
            raise self.fail(f"{value[:80]!r} has characters a file name should not (spaces, control or non-ASCII "
                            "characters)", "use letters, digits and . _ - +")
        if any(len(part) > MAX_NAME for part in pure.parts):
            raise self.fail(f"a name of {len(value)} characters", f"file names are at most {MAX_NAME}")
        return value

    def path_value(self, base: Path, must_exist: bool = False) -> Path:
        """A local path: absolute, or relative to the pipeline file's folder."""
        raw = Path(self.str()).expanduser()
        resolved = raw if raw.is_absolute() else base / raw
        if must_exist and not resolved.exists():
            raise self.fail(f"{resolved} does not exist", f"fix the path (relative paths start at {base})")
        return resolved


    def text_value(self, base: Path) -> Path:
        """A text file (calibration, selection, evaluation): a regular file of at most MAX_TEXT_BYTES, checked before
        anything reads it (a FIFO or a device would be read forever, a folder is no text)."""
        path = self.path_value(base, must_exist=True)
        try:
            info = path.stat()
        except OSError as exc:
            raise self.fail(f"{path}: cannot be read ({exc.strerror})", "fix the path") from None
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file (a pipe or a device)"
            raise self.fail(f"{path} is {kind}", "give a text file")
        if info.st_size > MAX_TEXT_BYTES:
            raise self.fail(f"{path}: {info.st_size:,} bytes, more than a text moeq reads ({MAX_TEXT_BYTES:,})",
                            "give a shorter text")
        return path


def kind_of(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return f"{node.value!r}"


def first_sentence(exc: Exception) -> str:
    return str(exc).strip().split("\n")[0].rstrip(".")


def require_plain_tags(root: Node) -> None:
    """Refuse any YAML tag on a list or mapping (`!!python/tuple`, `!!set`, `!!omap`), wherever it stands; scalars
    are checked where they are read. Each node is visited once, however many aliases name it."""
    seen: set[int] = set()
    todo = [root]
    while todo:
        n = todo.pop()
        if id(n.node) in seen or isinstance(n.node, yaml.ScalarNode):
            continue
        seen.add(id(n.node))
        if n.node.tag != COLLECTION_TAGS[type(n.node)]:
            raise n.fail(f"the YAML tag {n.node.tag!r} is not allowed",
                         f"write a plain {'mapping' if isinstance(n.node, yaml.MappingNode) else 'list'}")
        if isinstance(n.node, yaml.SequenceNode):
            todo += [Node(n.file, item, n.child_path(i)) for i, item in enumerate(n.node.value)]
        else:
            todo += [Node(n.file, value, n.child_path(str(getattr(key, "value", "?"))))
                     for key, value in n.node.value]
