"""The prompt format section: the chat template the files carry, and a conversation rendered with it (validate's
record: every file's template is the source's, so the first file's stands for all)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from moeq.manifest import QuantEntry

CONFLICT_STARTS = ("<" * 7, ">" * 7, "=" * 7, "|" * 7)  # lines card lint reads as merge-conflict markers


@dataclass(frozen=True)
class PromptFacts:
    text: str | None  # the conversation as rendered (None: it could not be, see why_not)
    as_json: bool  # shown as one JSON string: it has lines a card cannot hold as they are (trailing spaces, ...)
    sha256: str
    chars: str
    why_not: str | None
    request: str | None  # the chat request to llama-server, as a shell command (None: nothing was rendered)
    sampling: str | None  # the files' general.sampling.* keys in words ("temp 0.7, top_p 0.9"); None: they set none


# general.sampling.* keys by the name llama-server's request takes them under (the sampler sequence is left out:
# its names differ between the file and a request).
REQUEST_FIELDS = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                  "penalty_repeat": "repeat_penalty", "penalty_last_n": "repeat_last_n",
                  "xtc_probability": "xtc_probability", "xtc_threshold": "xtc_threshold", "mirostat": "mirostat",
                  "mirostat_tau": "mirostat_tau", "mirostat_eta": "mirostat_eta"}
PORT = 8080


def prompt_facts(entries: list[QuantEntry]) -> PromptFacts | None:
    """From the first quant whose validate record has a chat template; None when no file carries one."""
    validated = next((e.records.validate_ for e in entries
                      if e.records.validate_ is not None and e.records.validate_.prompt is not None), None)
    if validated is None:
        return None
    prompt, sampling = validated.prompt, validated.sampling
    text, as_json = prompt.rendered, False
    if text is not None and any(line != line.rstrip() or line.startswith(CONFLICT_STARTS) or "\r" in line
                                for line in text.split("\n")):
        text, as_json = json.dumps(text, ensure_ascii=False), True
    request = chat_request(prompt.messages, sampling) if prompt.rendered is not None and prompt.messages else None
    return PromptFacts(text, as_json, prompt.template_sha256, f"{prompt.template_chars:,}", prompt.why_not,
                       request, ", ".join(f"{k} {v}" for k, v in sampling.items()) or None)


def chat_request(messages: list[dict[str, str]], sampling: dict[str, float | int | str]) -> str:
    """A curl command sending `messages` to llama-server's chat completions with the files' sampling defaults,
    the JSON one message per line inside single quotes (a quote in the text is closed, escaped and reopened)."""
    lines = [json.dumps({"role": m.get("role", ""), "content": m.get("content", "")}, ensure_ascii=False)
             for m in messages]
    settings = [f'"{REQUEST_FIELDS[k]}": {json.dumps(v)}' for k, v in sampling.items() if k in REQUEST_FIELDS]
    body = "{\n  \"messages\": [\n" + ",\n".join(f"    {line}" for line in lines) + "\n  ]" + \
        "".join(f",\n  {s}" for s in settings) + "\n}"
    return (f"curl -s http://localhost:{PORT}/v1/chat/completions -H 'Content-Type: application/json' -d '"
            + body.replace("'", "'\\''") + "'")
