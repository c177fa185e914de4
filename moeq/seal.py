"""Seals on what moeq saves to resume from (a recipe search's measurements): an HMAC-SHA256 under a key of this
machine's moeq cache, so that a saved result moeq did not make itself (edited, copied in, cut short) is measured
again instead of trusted.

    text = seal_json({"command": [...], "output": [...]})
    unseal_json(text)  # -> the payload, or None when the seal does not hold
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

from moeq.toolchain import cache_dir

KEY_NAME = "seal.key"
MAX_SEALED_BYTES = 1 << 20


def _key() -> bytes:
    path = cache_dir() / KEY_NAME
    try:
        key = path.read_bytes()
        if len(key) == 32:
            return key
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{KEY_NAME}.{os.getpid()}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(secrets.token_bytes(32))
    try:
        os.link(partial, path)  # the first writer's key wins; a racing one reads it
    except FileExistsError:
        pass
    finally:
        partial.unlink(missing_ok=True)
    key = path.read_bytes()
    if len(key) != 32:  # a key file of another shape: replace it (what it sealed is measured again)
        path.unlink(missing_ok=True)
        return _key()
    return key


def _mac(body: str) -> str:
    return hmac.new(_key(), body.encode(), hashlib.sha256).hexdigest()


def seal_json(payload: object) -> str:
    body = json.dumps(payload, sort_keys=True, allow_nan=False)
    return json.dumps({"payload": body, "seal": _mac(body)}) + "\n"


def unseal_json(path: Path) -> object | None:
    """The payload of the sealed file at `path`; None when it is missing, too large, not moeq's, or altered."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_SEALED_BYTES:
            return None
        outer = json.loads(path.read_text(encoding="utf-8"))
        body, seal = outer["payload"], outer["seal"]
        if not (isinstance(body, str) and isinstance(seal, str) and hmac.compare_digest(_mac(body), seal)):
            return None
        return json.loads(body)
    except (OSError, ValueError, KeyError, TypeError):
        return None
