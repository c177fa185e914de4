"""The one way moeq talks to the Hub: an HfApi, and the Hub's errors turned into one-line HubErrors.

The token comes from HF_TOKEN or the huggingface_hub login (`hf auth login`); moeq never prints, logs
or stores it, and scrubs it from any message that could carry it.

    >>> api = hub_api()
    >>> with hub_errors("reading", "moeq/phi-3.5-moe-q8-0-cpu-offload-gguf"):
    ...     api.model_info("moeq/phi-3.5-moe-q8-0-cpu-offload-gguf")
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import httpx2
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError,
                                    RevisionNotFoundError)
from huggingface_hub.utils import get_token

from moeq.errors import HubError


def hub_api() -> HfApi:
    """An HfApi on HF_ENDPOINT (read when called, so tests and CI can point it elsewhere)."""
    endpoint = os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")
    return HfApi(endpoint=endpoint, token=get_token())


def require_token() -> None:
    if not get_token():
        raise HubError("no Hub token: set HF_TOKEN or run `hf auth login` with a token that may write to the "
                       "namespace")


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
        raise HubError(f"{repo_id}: revision not found while {action} ({_first_line(exc)}); check the revision") from None
    except EntryNotFoundError as exc:
        raise HubError(f"{repo_id}: file not found while {action} ({_first_line(exc)}); check the file name") from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo_id}: repository not found while {action} (or it is private and the token may not "
                       "read it); check the repo id and HF_TOKEN") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            raise HubError(f"{repo_id}: the Hub refused the token (401) while {action}; set HF_TOKEN to a valid "
                           "token or run `hf auth login`") from None
        if status == 403:
            namespace = repo_id.split("/")[0]
            raise HubError(f"{repo_id}: the token may not write to the namespace {namespace!r} (403) while "
                           f"{action}; use a token of {namespace} or change hub.namespace") from None
        raise HubError(f"{repo_id}: the Hub answered {status} while {action}, after retries "
                       f"({_first_line(exc)}); run the command again") from None
    except (httpx2.HTTPError, ConnectionError, TimeoutError) as exc:
        raise HubError(f"{repo_id}: the connection to the Hub failed while {action} ({_first_line(exc)}); "
                       "check the network (or HF_ENDPOINT) and run the command again") from None
    except RuntimeError as exc:  # the client wraps a failed LFS upload: "Error while uploading 'X' to the Hub."
        if "to the Hub" not in str(exc):
            raise
        cause = exc.__cause__ or exc
        raise HubError(f"{repo_id}: {_first_line(exc)} while {action} ({_first_line(cause)}); nothing was "
                       "committed, run the command again") from None
