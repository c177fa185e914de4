"""The one way moeq talks to the Hub: an HfApi, and the Hub's errors turned into one-line HubErrors.

The token comes from HF_TOKEN or the huggingface_hub login (`hf auth login`); moeq never prints, logs
or stores it, and scrubs it from any message that could carry it.

    api = hub_api()
    with hub_errors("reading", "moeq/phi-3.5-moe-q8-0-cpu-offload-gguf"):
        api.model_info("moeq/phi-3.5-moe-q8-0-cpu-offload-gguf")
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

import httpx2
from huggingface_hub import HfApi, constants, set_client_factory
from huggingface_hub.utils._http import default_client_factory  # the client's own factory (pinned <3), extended below
from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError,
                                    RevisionNotFoundError)
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import get_token

from moeq.errors import SIGNAL_EXITS, ConfigError, HubError, MoeqError
from moeq.workspace import read_text_limited


MAX_WAIT_S = 60  # the longest moeq (and the client under it) waits when the Hub says to retry later


def max_wait_s() -> int:
    """MAX_WAIT_S, or MOEQ_HUB_MAX_WAIT_S when set (README.md, "Limits"): whole seconds, 0 to 3600."""
    value = os.environ.get("MOEQ_HUB_MAX_WAIT_S", "").strip()
    if not value:
        return MAX_WAIT_S
    if not (value.isascii() and value.isdigit() and int(value) <= 3600):
        raise ConfigError(f"MOEQ_HUB_MAX_WAIT_S={value[:20]!r}", "not a wait moeq takes",
                          "use a whole number of seconds from 0 to 3600, or unset it (the default is 60)")
    return int(value)
_RATELIMIT_RESET = re.compile(r"(;\s*t=)(\d+)")


def hub_endpoint() -> str:
    """The Hub moeq talks to: HF_ENDPOINT as it is now, else huggingface_hub's default."""
    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def hub_api(on_message: Callable[[str], None] = lambda _msg: None) -> HfApi:
    """An HfApi on HF_ENDPOINT (read when called, so tests and CI can point it elsewhere).

    The client sleeps as long as a 429/503 says (Retry-After, RateLimit reset) before it retries; every
    such wait is capped at MAX_WAIT_S here, and `on_message` is told when one was."""
    endpoint = hub_endpoint()
    max_wait_s()  # a bad MOEQ_HUB_MAX_WAIT_S is refused here, before any request

    def capped_client() -> httpx2.Client:
        client = default_client_factory()
        client.event_hooks["response"] = [*client.event_hooks.get("response", []),
                                          lambda response: _cap_wait(response, on_message)]
        return client

    set_client_factory(capped_client)
    return HfApi(endpoint=endpoint, token=get_token())


def _cap_wait(response: httpx2.Response, on_message: Callable[[str], None]) -> None:
    if response.status_code not in (429, 503):
        return
    cap = max_wait_s()
    asked = []
    value = response.headers.get("Retry-After", "")
    if value.isdigit() and int(value) > cap:
        asked.append(int(value))
        response.headers["Retry-After"] = str(cap)
    ratelimit = response.headers.get("RateLimit", "")
    match = _RATELIMIT_RESET.search(ratelimit)
    if match and int(match.group(2)) > cap:
        asked.append(int(match.group(2)))
        response.headers["RateLimit"] = _RATELIMIT_RESET.sub(rf"\g<1>{cap}", ratelimit)
    if asked:
        on_message(f"warning: the Hub answered {response.status_code} and asked to wait {max(asked)} s before "
                   f"retrying; moeq waits at most {cap} s (then gives up with the Hub's error)")


def require_token() -> None:
    if not get_token():
        raise HubError("HF_TOKEN", "no Hub token",
                       "set HF_TOKEN or run `hf auth login` with a token that may write to the namespace")


WRITING_ROLES = ("admin", "write", "contributor")  # an organization's roles that may push to its repos


def write_access(namespace: str) -> tuple[bool, str]:
    """Whether the token may write to `namespace`, from what the Hub says the token is (whoami), and why."""
    if not get_token():
        return False, "no Hub token (set HF_TOKEN or run `hf auth login`)"
    try:
        with hub_errors("asking the Hub who the token is", namespace):
            info = hub_api().whoami()
    except HubError as exc:
        return False, exc.problem
    return can_write(info if isinstance(info, dict) else {}, namespace)


def can_write(info: dict, namespace: str) -> tuple[bool, str]:
    """The Hub's whoami answer (untrusted: every field checked) read for `namespace`."""
    name = str(info.get("name", "?"))[:100]
    auth = info.get("auth") if isinstance(info.get("auth"), dict) else {}
    token = auth.get("accessToken") if isinstance(auth.get("accessToken"), dict) else {}
    role = token.get("role")
    if role == "read":
        return False, f"the token of {name} is read-only"
    if role == "fineGrained":
        grained = token.get("fineGrained") if isinstance(token.get("fineGrained"), dict) else {}
        scoped = [e for e in grained.get("scoped") or [] if isinstance(e, dict) and isinstance(e.get("entity"), dict)]
        if any(e["entity"].get("name") == namespace and isinstance(e.get("permissions"), list)
               and "repo.write" in e["permissions"] for e in scoped):
            return True, f"the fine-grained token of {name} may write to {namespace} (repo.write)"
        return False, f"the fine-grained token of {name} has no repo.write on {namespace}"
    if namespace == name:
        return True, f"the token is {name}'s, with {role or 'write'} access"
    orgs = [o for o in info.get("orgs") or [] if isinstance(o, dict)]
    org = next((o for o in orgs if o.get("name") == namespace), None)
    if org is None:
        return False, f"the token is {name}'s, who is not a member of {namespace}"
    if org.get("roleInOrg") in WRITING_ROLES:
        return True, f"the token is {name}'s, {org.get('roleInOrg')} in {namespace}"
    return False, f"{name}'s role in {namespace} is {str(org.get('roleInOrg'))[:40]}, which may not write"


def scrub(text: str) -> str:
    token = get_token()
    return text.replace(token, "***") if token else text


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return scrub(lines[0] if lines else exc.__class__.__name__)


@contextlib.contextmanager
def hub_errors(action: str, repo_id: str) -> Iterator[None]:
    """Translate what huggingface_hub raises while `action` on `repo_id` into a HubError."""
    try:
        yield
    except RevisionNotFoundError as exc:
        raise HubError(repo_id, f"revision not found while {action} ({_first_line(exc)})",
                       "check the revision") from None
    except EntryNotFoundError as exc:
        raise HubError(repo_id, f"file not found while {action} ({_first_line(exc)})", "check the file name") from None
    except RepositoryNotFoundError:
        raise HubError(repo_id, f"repository not found while {action} (or it is private and the token may not read it)",
                       "check the repo id and HF_TOKEN") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            raise HubError(repo_id, f"the Hub refused the token (401) while {action}",
                           "set HF_TOKEN to a valid token or run `hf auth login`") from None
        if status == 403:
            namespace = repo_id.split("/")[0]
            raise HubError(repo_id, f"the token may not write to the namespace {namespace!r} (403) while {action}",
                           f"use a token of {namespace} or change hub.namespace") from None
        raise HubError(repo_id, f"the Hub answered {status} while {action}, after retries ({_first_line(exc)})",
                       "run the command again") from None
    except (httpx2.HTTPError, ConnectionError, TimeoutError) as exc:
        raise HubError(repo_id, f"the connection to the Hub failed while {action} ({_first_line(exc)})",
                       "check the network (or HF_ENDPOINT) and run the command again") from None
    except RuntimeError as exc:  # the client wraps a failed LFS upload: "Error while uploading 'X' to the Hub."
        if "to the Hub" not in str(exc):
            raise
        cause = exc.__cause__ or exc
        raise HubError(repo_id, f"{_first_line(exc)} while {action} ({_first_line(cause)})",
                       "nothing was committed, run the command again") from None


def remote_text(api: HfApi, repo_id: str, name: str, limit: int = 16 << 20, revision: str = "main",
                size: int | None = None) -> str:
    """A text file of the repo (a card, a manifest), read only when the Hub lists it at most `limit` bytes long.

    `size`: what the Hub already said of the file (its paths-info), else it is asked first."""
    where = f"{repo_id}/{name}"
    if size is None:
        with hub_errors(f"reading {name}", repo_id):
            listed = api.get_paths_info(repo_id, [name], revision=revision)
        size = next((e.size for e in listed if isinstance(e, RepoFile)), None)
    if isinstance(size, int) and size > limit:
        raise HubError(where, f"{size:,} bytes on the Hub, more than the {limit // 1024} KiB moeq reads for it",
                       "nothing was downloaded; replace the file on the Hub")
    with tempfile.TemporaryDirectory() as tmp, hub_errors(f"reading {name}", repo_id):
        path = Path(api.hf_hub_download(repo_id, name, revision=revision, local_dir=tmp))
        try:
            return read_text_limited(path, limit, f"{name} of {repo_id}")
        except MoeqError as exc:  # named as the Hub names it, not by the temporary folder that is gone
            raise type(exc)(where, exc.problem.replace(str(path), where), exc.fix) from None


@contextlib.contextmanager
def interrupt_ends_upload(repo_id: str) -> Iterator[None]:
    """While the client uploads (from worker threads it would wait for, tens of seconds for a GGUF) and commits,
    SIGINT or SIGTERM end the process at once: nothing is committed before the uploads end, so nothing is lost
    and the Hub is unchanged. In the main thread only; the handlers before are restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    def end_now(signum, frame) -> None:
        name, code = SIGNAL_EXITS[signum]
        sys.stderr.write(f"error: interrupted by {name} while uploading to {repo_id}; nothing was committed, the "
                         "repo on the Hub is unchanged; run the push again\n")
        sys.stderr.flush()
        os._exit(code)

    before = {signum: signal.signal(signum, end_now) for signum in SIGNAL_EXITS}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
