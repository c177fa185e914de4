"""A GGUF's chat template, and a short conversation rendered with it as the Hub's and llama.cpp's `--jinja`
renderers do (Jinja, trim_blocks and lstrip_blocks, the loop controls), for the card's prompt format.

The template comes from the file, so it is untrusted: Jinja's immutable sandbox, a bounded template and
output, and a child process that is stopped after TIMEOUT_S (a sandbox bounds what a template may touch, not
how long its loops run).

    render_example(template, bos="<s>", eos="<|endoftext|>")
    # -> ('<|system|>\\nYou are a helpful assistant.<|end|>\\n<|user|>\\n...<|assistant|>\\n', None)
"""

from __future__ import annotations

import multiprocessing
import signal

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment  # imported before the fork, not in the child

MAX_TEMPLATE_CHARS = 64 * 1024
MAX_RENDERED_CHARS = 16 * 1024
TIMEOUT_S = 5
EXAMPLE = ({"role": "system", "content": "You are a helpful assistant."},
           {"role": "user", "content": "Which file should I download?"})


def render_example(template: str, bos: str, eos: str) -> tuple[str | None, str | None]:
    """EXAMPLE rendered with `template` and a generation prompt: (the text, None), or (None, why it was not)."""
    if len(template) > MAX_TEMPLATE_CHARS:
        return None, f"the template has {len(template):,} characters, more than moeq renders ({MAX_TEMPLATE_CHARS:,})"
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(send, template, bos, eos), daemon=True)
    child.start()
    send.close()
    try:
        if not receive.poll(TIMEOUT_S):
            return None, f"rendering it took over {TIMEOUT_S} s"
        return receive.recv()
    except EOFError:
        return None, "rendering it ended the process that rendered it"
    finally:
        if child.is_alive():
            child.kill()  # SIGKILL: the child holds no file moeq writes
        child.join()
        receive.close()


def _child(send, template: str, bos: str, eos: str) -> None:
    """The rendering process: moeq's own signal handlers (inherited by the fork) would print a traceback here."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    text, error = _render(template, bos, eos)
    if text is not None and len(text) > MAX_RENDERED_CHARS:
        text, error = None, f"it renders to more than {MAX_RENDERED_CHARS:,} characters"
    send.send((text, error))
    send.close()


def _render(template: str, bos: str, eos: str) -> tuple[str | None, str | None]:
    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=list(EXAMPLE), add_generation_prompt=True, bos_token=bos,
                                                eos_token=eos), None
    except Exception as exc:  # anything a template can raise: it is the file's, not moeq's
        return None, f"the template does not render ({exc.__class__.__name__}: {str(exc)[:200]})"
