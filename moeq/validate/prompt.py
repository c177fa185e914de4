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

MAX_TEMPLATE_CHARS = 64 * 1024
MAX_RENDERED_CHARS = 16 * 1024
TIMEOUT_S = 5
EXAMPLE = ({"role": "system", "content": "You are a helpful assistant."},
           {"role": "user", "content": "Which file should I download?"})


def render_example(template: str, bos: str, eos: str) -> tuple[str | None, str | None]:
    """EXAMPLE rendered with `template` and a generation prompt: (the text, None), or (None, why it was not)."""
    if len(template) > MAX_TEMPLATE_CHARS:
        return None, f"the template has {len(template):,} characters, more than moeq renders ({MAX_TEMPLATE_CHARS:,})"
    with multiprocessing.get_context("fork").Pool(1) as pool:
        try:
            text, error = pool.apply_async(_render, (template, bos, eos)).get(TIMEOUT_S)
        except multiprocessing.TimeoutError:
            return None, f"rendering it took over {TIMEOUT_S} s"
    if text is not None and len(text) > MAX_RENDERED_CHARS:
        return None, f"it renders to more than {MAX_RENDERED_CHARS:,} characters"
    return text, error


def _render(template: str, bos: str, eos: str) -> tuple[str | None, str | None]:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=list(EXAMPLE), add_generation_prompt=True, bos_token=bos,
                                                eos_token=eos), None
    except Exception as exc:  # anything a template can raise: it is the file's, not moeq's
        return None, f"the template does not render ({exc.__class__.__name__}: {str(exc)[:200]})"
